#!/bin/sh
# Entry point of the frontserver image: writes /etc/nginx/nginx.conf from nginx.conf.in with
# the rollcall server's DNS address (ROLLCALL_RESOLVER, IP:PORT), checks it with `nginx -t`, then
# runs nginx in the foreground under the node agent (`rollcall register`, configured by the
# ROLLCALL_* environment).
#
# With ROLLCALL_LOCAL_ETCD (etcd client URLs, comma-separated) it first starts a rollcall server
# of its own over that etcd, on 0.0.0.0:1053 (DNS) and 0.0.0.0:8053 (API), for nginx to ask
# (ROLLCALL_RESOLVER=127.0.0.1:1053) and the agent to register through first. It runs in its
# own session, so the agent's stop signal reaches nginx only: it answers DNS through the drain
# and nginx's graceful stop, and ends with the container.
set -eu
if [ -z "${ROLLCALL_RESOLVER:-}" ]; then
    echo "frontserver-entrypoint: set ROLLCALL_RESOLVER to the rollcall server's DNS address," \
        "an IP address and port (e.g. -e ROLLCALL_RESOLVER=172.30.53.53:1053)" >&2
    exit 2
fi
sed "s/127\.0\.0\.1:1053/$ROLLCALL_RESOLVER/g" /etc/nginx/nginx.conf.in >/etc/nginx/nginx.conf
nginx -t -q || {
    echo "frontserver-entrypoint: nginx rejects its configuration (ROLLCALL_RESOLVER=$ROLLCALL_RESOLVER)" >&2
    exit 2
}

if [ -n "${ROLLCALL_LOCAL_ETCD:-}" ]; then
    mkdir -p /var/lib/rollcall /etc/rollcall/zones
    env ROLLCALL_ETCD="$ROLLCALL_LOCAL_ETCD" \
        ROLLCALL_DNS_LISTEN=0.0.0.0:1053 ROLLCALL_HTTP_LISTEN=0.0.0.0:8053 \
        ROLLCALL_DATA_DIR=/var/lib/rollcall ROLLCALL_ZONES=/etc/rollcall/zones \
        setsid rollcall-entrypoint serve &
    # Ready = it has listed etcd (its /readyz); nginx starts after, so its first lookups land.
    i=0
    until rollcall check http://127.0.0.1:8053/readyz >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 100 ]; then
            echo "frontserver-entrypoint: the local rollcall server is not ready after 10 s; starting nginx anyway" >&2
            break
        fi
        sleep 0.1
    done
fi
exec rollcall register "$@" -- nginx -g 'daemon off;'
