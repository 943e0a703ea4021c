#!/bin/sh
# One-shot setup of the etcd members of docker/docker-compose.etcd.yml, run from the etcd image
# as root, idempotent (a second `up` changes nothing):
#
#   etcd-setup pki   writes a CA, the members' certificate (server and peer, every member's
#                    name and address) and rollcall's client certificate into $PKI (a volume),
#                    with a random password for the etcd users `root` and `rollcall`, unless
#                    they are there already. Keys are readable only by whoever uses them: the
#                    members' by the etcd user, rollcall's by uid 10053 (the rollcall images).
#   etcd-setup auth  waits for the cluster, then creates the user `root`, the user and role
#                    `rollcall` (read and write under /rollcall/, nothing else) and enables
#                    etcd's authentication, unless that is done already.
#
# Settings (environment): PKI (default /etc/rollcall-etcd), ETCD_MEMBERS (name=address, ...),
# ETCD_ENDPOINTS (for `auth`), ROLLCALL_UID (default 10053), ROLLCALL_PREFIX (default /rollcall/).
set -eu
PKI=${PKI:-/etc/rollcall-etcd}
say() { echo "etcd-setup: $*" >&2; }

pki() {
    mkdir -p "$PKI"
    if [ -s "$PKI/ca.pem" ] && [ -s "$PKI/etcd.pem" ] && [ -s "$PKI/rollcall.pem" ] &&
        [ -s "$PKI/rollcall-password" ] && [ -s "$PKI/root-password" ]; then
        say "certificates and passwords already in $PKI: kept"
        return
    fi
    uid=${ROLLCALL_UID:-10053}
    san="DNS:localhost,IP:127.0.0.1"
    for m in $(echo "${ETCD_MEMBERS:?set ETCD_MEMBERS to name=address,...}" | tr ',' ' '); do
        san="$san,DNS:${m%%=*},IP:${m#*=}"
    done
    tmp=$(mktemp -d)
    cd "$tmp"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=rollcall etcd CA" -keyout ca.key -out ca.pem 2>/dev/null
    # The members' certificate serves clients and peers, and is the client side towards peers.
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=etcd-member" \
        -keyout etcd.key -out etcd.csr 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >etcd.ext
    openssl x509 -req -in etcd.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile etcd.ext -out etcd.pem 2>/dev/null
    # rollcall's client certificate, without a CommonName: etcd 3.4's JSON gateway (which
    # rollcall speaks) refuses calls made with a certificate that has one (etcd would take the
    # CN as the user); the user is `rollcall`, by its password.
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=rollcall" \
        -keyout rollcall.key -out rollcall.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >rollcall.ext
    openssl x509 -req -in rollcall.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile rollcall.ext -out rollcall.pem 2>/dev/null
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >root-password
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >rollcall-password
    install -m 0644 ca.pem etcd.pem rollcall.pem "$PKI/"
    install -m 0400 ca.key root-password "$PKI/"
    install -m 0400 -o etcd etcd.key "$PKI/"
    install -m 0400 -o "$uid" rollcall.key rollcall-password "$PKI/"
    cd /
    rm -rf "$tmp"
    say "wrote a CA, the members' and rollcall's certificates and the users' passwords to $PKI"
}

auth() {
    set -- --endpoints "${ETCD_ENDPOINTS:?set ETCD_ENDPOINTS}" --cacert "$PKI/ca.pem" \
        --cert "$PKI/etcd.pem" --key "$PKI/etcd.key" --dial-timeout 2s --command-timeout 5s
    export ETCDCTL_API=3
    root="root:$(cat "$PKI/root-password")"
    i=0
    until etcdctl "$@" endpoint health >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 120 ]; then
            say "etcd is not healthy after 60 s at $ETCD_ENDPOINTS:"
            etcdctl "$@" endpoint health >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    if etcdctl "$@" --user "$root" role get rollcall >/dev/null 2>&1; then
        say "authentication already enabled, user rollcall present: nothing to do"
        return
    fi
    prefix=${ROLLCALL_PREFIX:-/rollcall/}
    # Each step tolerates "already exists" (an earlier run stopped half-way).
    step() { out=$(etcdctl "$@" 2>&1) || case "$out" in *"already exists"*) ;; *) say "$out"; exit 1 ;; esac; }
    step "$@" user add root --new-user-password "$(cat "$PKI/root-password")"
    step "$@" user grant-role root root
    step "$@" role add rollcall
    step "$@" role grant-permission rollcall --prefix=true readwrite "$prefix"
    step "$@" user add rollcall --new-user-password "$(cat "$PKI/rollcall-password")"
    step "$@" user grant-role rollcall rollcall
    step "$@" auth enable
    etcdctl "$@" --user "rollcall:$(cat "$PKI/rollcall-password")" get --prefix --keys-only \
        --limit 1 "$prefix" >/dev/null
    say "authentication enabled: users root and rollcall (read and write under $prefix)"
}

case "${1:-}" in
pki) pki ;;
auth) auth ;;
*) echo "usage: etcd-setup pki|auth" >&2; exit 2 ;;
esac
