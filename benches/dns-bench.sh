#!/usr/bin/env bash
# dns-bench.sh - rollcall against established authoritative DNS servers (NSD, Knot, dnsmasq,
# BIND) and the transport floor (a null responder), on the service-discovery workload, on this
# machine; optionally under API churn (--churn) and the API alone (--api). One command, one
# Markdown table, written to benches/results/<date>-<host>.md.
#
#   benches/dns-bench.sh                     # N=2 frontservers, M=10 appservers, 3 reps of 10 s
#   benches/dns-bench.sh -m 1000             # a 1,000-instance role (answers need TCP)
#   benches/dns-bench.sh --churn --api       # + DNS under API churn, + wrk against the API
#   benches/dns-bench.sh --duration 2 --reps 1 --servers 'rollcall nsd'   # smoke run
#
# What it does, in order:
#   1. installs missing tools with apt-get when run as root (dnsperf, dnsutils, nsd, knot,
#      dnsmasq-base, bind9, wrk, curl), builds rollcall, the null responder and the churn load
#      generator (cargo build --release)
#   2. generates the dataset (benches/gen-dataset.py: zone cluster., N frontservers, M
#      appservers, a dnsperf query file, the expected answers)
#   3. for each rep (interleaved: rep 1 of every server, then rep 2, ..., the order rotated),
#      for each server: starts it pinned (taskset) with one worker on 127.0.0.1:<its own port>,
#      checks its answers over TCP (rcode, answer count and answer set of every distinct query
#      of the query file; the null responder is exempt), runs dnsperf pinned on the other CPU
#      (-l DURATION -c C -q Q -T 1) for every --loads setting, and stops it by its PID
#   4. --churn: "rollcall+churn" joins the rotation: rollcall while examples/churn.rs hits its
#      API with ~5,000 renewals/s (of the very nodes dnsperf asks about) and 100 registrations
#      + 100 expiries per second (ttl-1 nodes of role `churn`, never renewed); the answers are
#      checked again while the churn runs
#   5. --api: wrk on keep-alive connections renewing one node (PUT, benches/renew.lua), both
#      cores shared by rollcall and wrk
#   5b. --forward: an NSD upstream serving fwd.test (100 names) and three more entries in the
#      rotation: "rollcall-fwd" (rollcall with --forward on, asked the usual query file: the
#      authoritative path with forwarding enabled, to compare with "rollcall"), and
#      "rollcall-cache" / "dnsmasq-cache" (the same rollcall, and dnsmasq with cache-size=10000,
#      both forwarding fwd.test to that NSD, asked for the fwd.test names: answers from the
#      forwarding cache after the first query of each name)
#   6. prints the Markdown report and writes it to benches/results/
#
# Columns: QPS median/min/max over reps (best load by median QPS); lat = median of dnsperf's
# average latency; lost = sum over reps; srv% = server CPU (100 = one core), from
# /proc/<pid>/stat utime+stime of every process in the server's session; QPS/core = completed
# queries per server CPU-second (dnsperf on one core cannot ask faster than ~120k/s, so
# servers that idle part of the time are compared by this); other% = CPU used meanwhile by
# processes that are neither the server nor the load generators (another tenant: if it is
# high, the run was disturbed); × nsd, × null: QPS/core relative to NSD's and to the null
# responder's in the same run.
#
# Pinning: server on CPU 1, dnsperf on CPU 0 (--server-cpu/--client-cpu). Knot pins its UDP
# worker i to CPU (i mod nproc) itself, overriding taskset, so its only worker always runs on
# CPU 0: for Knot the two CPUs are swapped. Peers get one worker (NSD server-count: 1, Knot
# udp-workers: 1, named -n 1; dnsmasq is single-threaded), rollcall --dns-threads 1.
#
# Every process this script starts runs in its own session (setsid) and is stopped through
# its PID/process group, on exit too (Ctrl-C included); nothing else is ever killed. Ports
# are picked from --base-port (default 25300, below the ephemeral range) and checked free.
set -euo pipefail
export LC_ALL=C          # "." decimal separator for awk and EPOCHREALTIME

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CMDLINE="benches/dns-bench.sh${*:+ $(printf '%q ' "$@")}"; CMDLINE=${CMDLINE% }

# ---------------------------------------------------------------------------- defaults --
N=2; M=10
DURATION=10; REPS=3
LOADS="8:50 8:100 8:500"          # dnsperf -c:-q settings; the best median QPS is reported
SERVERS="rollcall null nsd knot dnsmasq bind"
BASELINE_BIN=""
CHURN=0; API=0; VERIFY_ONLY=0; FORWARD=0
CHURN_RENEW=5000; CHURN_REGISTER=100; CHURN_CONNS=64
API_CONNS=64; API_THREADS=2
SERVER_CPU=1; CLIENT_CPU=0; CHURN_CPU=""
ADDR=127.0.0.1
BASE_PORT=25300
INSTALL=1; BUILD=1; KEEP=0
WORKDIR=""; OUT=""
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    cat <<EOF

Options:
  -n, --frontservers N   frontserver instances (default $N)
  -m, --appservers M     appserver instances (default $M)
  --duration S           seconds per dnsperf / wrk run (default $DURATION)
  --reps R               repetitions, interleaved across servers (default $REPS)
  --loads 'C:Q ...'      dnsperf -c:-q settings to try (default '$LOADS')
  --servers 'LIST'       subset of: rollcall null nsd knot dnsmasq bind hickory
  --baseline BIN         also run another rollcall binary as server "baseline" (before/after)
                         (default '$SERVERS'; hickory only if hickory-dns is installed)
  --churn                also run rollcall under API churn (rollcall+churn)
  --churn-rates R:G      renewals/s : registrations/s (default $CHURN_RENEW:$CHURN_REGISTER)
  --churn-cpu C          CPU of the churn generator (default: the client CPU)
  --churn-conns C        keep-alive connections (= requests in flight) of the churn generator
                         (default $CHURN_CONNS)
  --api                  also run wrk against the API (PUT renewals, keep-alive)
  --forward              also measure forwarding: rollcall-fwd, rollcall-cache, dnsmasq-cache
  --api-conns C          wrk connections (default $API_CONNS; threads: $API_THREADS)
  --verify-only          start each server, check its answers, print the UDP probe, stop
  --server-cpu C, --client-cpu C   CPUs for the server and dnsperf (default $SERVER_CPU, $CLIENT_CPU)
  --base-port P          first of the ports used (default $BASE_PORT; moved up if busy)
  --no-install           never apt-get (fail if something is missing)
  --no-build             use the binaries in $TARGET_DIR/release as they are
  --workdir DIR          configs, logs and raw results here (default: a temp dir)
  --keep                 keep the temp workdir
  --out FILE             report file (default benches/results/<date>-<host>.md)
  -h, --help             this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        -n|--frontservers) N=$2; shift ;;
        -m|--appservers) M=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --loads) LOADS=$2; shift ;;
        --servers) SERVERS=$2; shift ;;
        --baseline) BASELINE_BIN=$(realpath "$2"); SERVERS="$SERVERS baseline"; shift ;;
        --churn) CHURN=1 ;;
        --churn-rates) CHURN_RENEW=${2%%:*}; CHURN_REGISTER=${2##*:}; shift ;;
        --churn-cpu) CHURN_CPU=$2; shift ;;
        --churn-conns) CHURN_CONNS=$2; shift ;;
        --api) API=1 ;;
        --forward) FORWARD=1 ;;
        --api-conns) API_CONNS=$2; shift ;;
        --verify-only) VERIFY_ONLY=1 ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --base-port) BASE_PORT=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --workdir) WORKDIR=$2; shift ;;
        --keep) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in N M DURATION REPS BASE_PORT SERVER_CPU CLIENT_CPU CHURN_RENEW CHURN_REGISTER CHURN_CONNS API_CONNS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a number, not '${!v}'" >&2; exit 2; }
done
for s in $SERVERS; do
    case $s in rollcall|baseline|null|nsd|knot|dnsmasq|bind|hickory) ;;
        *) echo "unknown server '$s' (see --help)" >&2; exit 2 ;; esac
done
for l in $LOADS; do
    [[ $l =~ ^[0-9]+:[0-9]+$ ]] || { echo "bad load '$l': want C:Q, e.g. 8:100" >&2; exit 2; }
done
[ -n "$CHURN_CPU" ] || CHURN_CPU=$CLIENT_CPU

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ process bookkeeping --
# Everything runs under setsid, so its PID is its process group and session: `kill -- -PID`
# stops it and whatever it forked (NSD's children, candidate.sh's rollcall), nothing else.
declare -A PIDS=()

spawn() {   # spawn LABEL LOGFILE CMD...: start CMD in its own session, remember its PID
    local label=$1 logf=$2; shift 2
    setsid "$@" >"$logf" 2>&1 </dev/null &
    PIDS[$label]=$!
}

stop() {    # stop LABEL [SIGNAL]
    local label=$1 sig=${2:-TERM} pid=${PIDS[$1]:-}
    [ -n "$pid" ] || return 0
    kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$label (pid $pid) still running after SIG$sig, sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$label]"
}

cleanup() {
    local l
    trap - INT TERM
    for l in "${!PIDS[@]}"; do stop "$l"; done
    if [ "$KEEP" = 0 ] && [ -n "${TMP_WORKDIR:-}" ]; then rm -rf "$TMP_WORKDIR"; fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# ------------------------------------------------------------------- install and build --
need_cmds() {   # command:package pairs for what this run uses
    echo dnsperf:dnsperf dig:dnsutils taskset:util-linux setsid:util-linux python3:python3 \
         curl:curl ss:iproute2
    for s in $SERVERS; do
        case $s in nsd) echo nsd:nsd ;; knot) echo knotd:knot ;; dnsmasq) echo dnsmasq:dnsmasq-base ;;
            bind) echo named:bind9 ;; esac
    done
    [ "$API" = 0 ] || echo wrk:wrk
    [ "$FORWARD" = 0 ] || echo nsd:nsd dnsmasq:dnsmasq-base
}

install_missing() {
    local pkgs=() c
    for c in $(need_cmds); do command -v "${c%%:*}" >/dev/null || pkgs+=("${c#*:}"); done
    [ ${#pkgs[@]} -gt 0 ] || return 0
    [ "$INSTALL" = 1 ] || die "missing: ${pkgs[*]} (--no-install given)"
    [ "$(id -u)" = 0 ] || die "missing: ${pkgs[*]}: run as root, or: sudo apt-get install ${pkgs[*]}"
    log "apt-get install ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; } ||
        die "apt-get install ${pkgs[*]} failed"
}

hickory_bin() {
    local c
    for c in "${HICKORY_DNS:-}" "$(command -v hickory-dns || true)" /opt/hickory/bin/hickory-dns \
             "$HOME/.cargo/bin/hickory-dns"; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    return 1
}

ROLLCALL_BIN=$TARGET_DIR/release/rollcall
NULL_BIN=$TARGET_DIR/release/examples/null_responder
CHURN_BIN=$TARGET_DIR/release/examples/churn

build() {
    local args=(--bin rollcall)
    [[ " $SERVERS " == *" null "* ]] && args+=(--example null_responder)
    [ "$CHURN" = 1 ] && args+=(--example churn)
    if [ "$BUILD" = 1 ]; then
        log "cargo build --release ${args[*]} (a few minutes when out of date)"
        (cd "$ROOT" && cargo build --release --quiet "${args[@]}") || die "cargo build failed"
    fi
    [ -x "$ROLLCALL_BIN" ] || die "no $ROLLCALL_BIN (build it, or drop --no-build)"
    if [[ " $SERVERS " == *" null "* ]]; then [ -x "$NULL_BIN" ] || die "no $NULL_BIN"; fi
    if [ "$CHURN" = 1 ]; then [ -x "$CHURN_BIN" ] || die "no $CHURN_BIN"; fi
}

# ----------------------------------------------------------------------- ports and CPUs --
port_of() {
    case $1 in rollcall|rollcall+churn) echo $((BASE_PORT + 1)) ;; null) echo $((BASE_PORT + 2)) ;;
        nsd) echo $((BASE_PORT + 3)) ;; knot) echo $((BASE_PORT + 4)) ;;
        dnsmasq) echo $((BASE_PORT + 5)) ;; bind) echo $((BASE_PORT + 6)) ;;
        hickory) echo $((BASE_PORT + 7)) ;; api) echo $((BASE_PORT + 8)) ;; baseline) echo $((BASE_PORT + 9)) ;;
        upstream) echo $((BASE_PORT + 10)) ;; rollcall-fwd) echo $((BASE_PORT + 11)) ;;
        rollcall-cache) echo $((BASE_PORT + 12)) ;; dnsmasq-cache) echo $((BASE_PORT + 13)) ;; esac
}
http_port_of() { echo $(( $(port_of "$1") + 1000 )); }   # candidate.sh's contract

port_busy() { ss -Hlnu "sport = :$1" 2>/dev/null | grep -q . || ss -Hlnt "sport = :$1" 2>/dev/null | grep -q .; }

pick_ports() {   # move BASE_PORT up until every port of this run is free
    local tries p busy
    for tries in $(seq 40); do
        busy=""
        for p in $(seq $((BASE_PORT + 1)) $((BASE_PORT + 13))) \
                 $((BASE_PORT + 1001)) $((BASE_PORT + 1008)) $((BASE_PORT + 1011)) $((BASE_PORT + 1012)); do
            if port_busy "$p"; then busy=$p; break; fi
        done
        [ -z "$busy" ] && return 0
        log "port $busy is in use; trying base port $((BASE_PORT + 20))"
        BASE_PORT=$((BASE_PORT + 20))
    done
    die "no free port range found from --base-port upwards"
}

PIN=1
if [ "$(nproc)" -lt 2 ]; then
    log "warning: one CPU only: nothing is pinned, server and dnsperf share it"; PIN=0
fi
cpus_for() {   # "SERVER_CPU CLIENT_CPU" for NAME (Knot: swapped, see the header)
    if [ "$1" = knot ] && [ "$SERVER_CPU" != 0 ]; then echo "0 $SERVER_CPU"
    else echo "$SERVER_CPU $CLIENT_CPU"; fi
}
pin() {   # pin CPU: the taskset prefix, or nothing
    [ "$PIN" = 1 ] && printf '%s\n' taskset -c "$1"
    return 0
}

# ------------------------------------------------------------------ server launchers --
# conf_NAME DIR PORT writes the configuration into DIR and prints the command, one word a line.
conf_nsd() {
    cat >"$1/nsd.conf" <<EOF
server:
    ip-address: $ADDR@$2
    port: $2
    do-ip6: no
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "$1"
    database: ""
    zonelistfile: "$1/zone.list"
    xfrdfile: "$1/xfrd.state"
    xfrdir: "$1"
    pidfile: "$1/nsd.pid"
    logfile: "$1/nsd.log"
    verbosity: 0
    minimal-responses: yes
    round-robin: yes
    # Debian's NSD rate-limits responses by default (200 qps per /24, then drops and TC
    # slips): off, or the benchmark measures the limiter.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: cluster.
    zonefile: "$DATA/cluster.zone"
EOF
    printf '%s\n' nsd -d -c "$1/nsd.conf"
}

conf_knot() {
    cat >"$1/knot.conf" <<EOF
server:
    rundir: "$1"
    listen: $ADDR@$2
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
    answer-rotation: on
log:
  - target: "$1/knot.log"
    any: warning
database:
    storage: "$1"
template:
  - id: default
    storage: "$1"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: off
zone:
  - domain: cluster.
    file: "$DATA/cluster.zone"
EOF
    printf '%s\n' knotd -c "$1/knot.conf"
}

conf_dnsmasq() {
    # auth-server on the listening address: authoritative answers (AA, SOA in negative
    # answers) from local data; no-resolv and local=/cluster/: nothing is ever forwarded.
    cat >"$1/dnsmasq.conf" <<EOF
port=$2
listen-address=$ADDR
bind-interfaces
no-resolv
no-hosts
no-poll
no-negcache
addn-hosts=$DATA/dnsmasq.hosts
conf-file=$DATA/dnsmasq.conf
auth-server=ns1.cluster,$ADDR
user=$(id -un)
group=$(id -gn)
pid-file=
log-facility=$1/dnsmasq.log
EOF
    printf '%s\n' dnsmasq -k -C "$1/dnsmasq.conf"
}

conf_bind() {
    cat >"$1/named.conf" <<EOF
options {
    directory "$1";
    pid-file "$1/named.pid";
    session-keyfile "$1/session.key";
    listen-on port $2 { $ADDR; };
    listen-on-v6 { none; };
    recursion no;
    allow-query { any; };
    minimal-responses yes;
    dnssec-validation no;
    notify no;
    # BIND >= 9.18.28 refuses to load an RRset of more than 100 records by default: a role of
    # more than 100 instances would not load at all. 0 = unlimited.
    max-records-per-type 0;
};
controls { };
logging {
    channel f { file "$1/named.log"; severity warning; };
    category default { f; };
    category lame-servers { null; };
};
zone "cluster." { type primary; file "$DATA/cluster.zone"; };
EOF
    printf '%s\n' named -f -4 -n 1 -c "$1/named.conf"
}

conf_hickory() {
    cat >"$1/named.toml" <<EOF
listen_addrs_ipv4 = ["$ADDR"]
listen_port = $2
directory = "$DATA"
drop_privileges = false

[[zones]]
zone = "cluster"
zone_type = "Primary"

[zones.stores]
type = "file"
zone_path = "cluster.zone"
EOF
    printf '%s\n' "$(hickory_bin)" -q --workers 1 -c "$1/named.toml"
}

conf_null() { printf '%s\n' "$NULL_BIN" "$ADDR:$2" 1; }

conf_rollcall() {   # candidate.sh registers services.tsv over the API, then serves DNS
    printf '%s\n' env DNSB_ADDR="$ADDR" DNSB_PORT="$2" DNSB_DATA_DIR="$DATA" DNSB_THREADS=1 \
        ROLLCALL_BIN="$ROLLCALL_BIN" TMPDIR="$1" bash "$HERE/candidate.sh"
}
conf_api() { conf_rollcall "$@"; }
conf_rollcall-fwd() {   # rollcall forwarding fwd.test to the NSD upstream
    printf '%s\n' env DNSB_ADDR="$ADDR" DNSB_PORT="$2" DNSB_DATA_DIR="$DATA" DNSB_THREADS=1 \
        ROLLCALL_BIN="$ROLLCALL_BIN" TMPDIR="$1" \
        ROLLCALL_EXTRA_ARGS="--forward fwd.test=$ADDR:$(port_of upstream)" bash "$HERE/candidate.sh"
}
conf_rollcall-cache() { conf_rollcall-fwd "$@"; }
conf_dnsmasq-cache() {   # dnsmasq forwarding fwd.test to the same upstream, with a cache
    cat >"$1/dnsmasq.conf" <<EOF
port=$2
listen-address=$ADDR
bind-interfaces
no-resolv
no-hosts
no-poll
cache-size=10000
server=/fwd.test/$ADDR#$(port_of upstream)
user=$(id -un)
group=$(id -gn)
pid-file=
log-facility=$1/dnsmasq.log
EOF
    printf '%s\n' dnsmasq -k -C "$1/dnsmasq.conf"
}
queries_of() {   # the dnsperf query file for NAME
    case $1 in *-cache) echo "$DATA/queries-fwd.txt" ;; *) echo "$DATA/queries.txt" ;; esac
}
start_upstream() {   # NSD serving fwd.test: 100 names, TTL 3600 (the caches keep them)
    local d=$WORKDIR/servers/upstream port
    port=$(port_of upstream); mkdir -p "$d"
    { printf '$ORIGIN fwd.test.\n$TTL 3600\n@ IN SOA ns hostmaster 1 60 10 600 60\n@ IN NS ns\nns IN A %s\n' "$ADDR"
      for i in $(seq 100); do printf 'n%s IN A 10.77.%s.%s\n' "$i" $((i / 250)) $((i % 250 + 1)); done
    } >"$d/fwd.test.zone"
    for i in $(seq 100); do printf 'n%s.fwd.test A\n' "$i"; done >"$DATA/queries-fwd.txt"
    conf_nsd "$d" "$port" >/dev/null
    sed -i "s|name: cluster.|name: fwd.test.|; s|zonefile: \"$DATA/cluster.zone\"|zonefile: \"$d/fwd.test.zone\"|" "$d/nsd.conf"
    spawn upstream "$d/stdout.log" $(pin "$CLIENT_CPU") nsd -d -c "$d/nsd.conf"
    for _ in $(seq 100); do
        dig +time=1 +tries=1 -p "$port" @"$ADDR" n1.fwd.test A 2>/dev/null | grep -q 'ANSWER: 1' && return 0
        sleep 0.1
    done
    die "the NSD upstream for fwd.test did not answer"
}
conf_baseline() {   # another rollcall binary (--baseline BIN), served the same way: before/after
    printf '%s\n' env DNSB_ADDR="$ADDR" DNSB_PORT="$2" DNSB_DATA_DIR="$DATA" DNSB_THREADS=1 \
        ROLLCALL_BIN="$BASELINE_BIN" TMPDIR="$1" bash "$HERE/candidate.sh"
}   # the API benchmark: the same rollcall, not pinned

ready() {   # ready NAME PORT: answers cluster. SOA (the null responder: answers at all)
    if [ "$1" = dnsmasq-cache ]; then
        dig +time=1 +tries=1 -p "$2" @"$ADDR" n1.fwd.test A 2>/dev/null | grep -q 'ANSWER: 1'
    elif [ "$1" = null ]; then
        python3 "$HERE/gen-dataset.py" --ping "$ADDR:$2"
    else
        dig +time=1 +tries=1 +norecurse -p "$2" @"$ADDR" cluster. SOA 2>/dev/null |
            grep -q 'ANSWER: [1-9]'
    fi
}

start_server() {   # start_server NAME [unpinned]: configure, launch, wait until it answers
    local name=$1 base=${1%+churn} port d cmd=() prefix=() cpus
    port=$(port_of "$name")
    d=$WORKDIR/servers/$name; mkdir -p "$d"
    port_busy "$port" && { log "port $port is in use, cannot start $name"; return 1; }
    read -r -a cpus < <(cpus_for "$base")
    [ "${2:-}" = unpinned ] || mapfile -t prefix < <(pin "${cpus[0]}")
    mapfile -t cmd < <("conf_$base" "$d" "$port")
    echo "${prefix[*]} ${cmd[*]}" >"$d/cmdline"
    spawn "$name" "$d/stdout.log" "${prefix[@]}" "${cmd[@]}"
    for _ in $(seq 600); do                       # up to 60 s (BIND, a big zone)
        if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
            log "$name exited during start-up; see $d/"; tail -5 "$d/stdout.log" >&2 || true
            wait "${PIDS[$name]}" 2>/dev/null || true; unset "PIDS[$name]"; return 1
        fi
        ready "$base" "$port" && return 0
        sleep 0.1
    done
    log "$name did not answer on $ADDR:$port within 60 s"; stop "$name"; return 1
}

check_answers() {   # check_answers NAME WHEN: compare with expected.tsv, append to checks.tsv
    local name=$1 when=$2 res
    if [ "${name%+churn}" = null ]; then res="exempt"
    elif [[ $name == *-cache ]]; then
        # forwarded names: the upstream's answer for a few names of the query file
        res="ok (forwarded)"
        for i in 1 50 100; do
            [ "$(dig +short -p "$(port_of "$name")" @"$ADDR" "n$i.fwd.test" A)" = \
              "$(dig +short -p "$(port_of upstream)" @"$ADDR" "n$i.fwd.test" A)" ] ||
                res="MISMATCH (n$i.fwd.test)"
        done
    else
        res=$(python3 "$HERE/gen-dataset.py" --out "$DATA" --check "$ADDR:$(port_of "$name")" \
              2>>"$WORKDIR/servers/$name/check.log") || true
        [ -n "$res" ] || res="MISMATCH (checker failed)"
        [[ $res == ok* ]] || log "$name: answers $when: $res (see $WORKDIR/servers/$name/check.log)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$when" "$res" >>"$WORKDIR/checks.tsv"
}

probe() {   # appserver.cluster A over UDP / UDP+EDNS 1232 / TCP, once per server
    local name=$1
    grep -q "^$name	" "$WORKDIR/probe.tsv" 2>/dev/null && return 0
    [ "$name" = null ] || [ "$name" = rollcall+churn ] || [[ $name == *-cache ]] && return 0
    printf '%s\t%s\n' "$name" \
        "$(python3 "$HERE/gen-dataset.py" --out "$DATA" --probe "$ADDR:$(port_of "$name")")" \
        >>"$WORKDIR/probe.tsv"
}

# -------------------------------------------------------------------------- measuring --
CLK_TCK=$(getconf CLK_TCK)
session_ticks() {   # utime+stime (ticks) of every process in the sessions given
    local sid p f t=0
    for sid in "$@"; do
        for p in $(ps -s "$sid" -o pid= 2>/dev/null); do
            read -r f <"/proc/$p/stat" 2>/dev/null || continue
            f=${f##*) }; set -- $f; t=$((t + ${12} + ${13}))   # fields 14, 15 of /proc/PID/stat
        done
    done
    echo "$t"
}
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 }' /proc/stat; }   # user+nice+system, all CPUs

# measured LABEL OUT CMD...: run CMD in its own session, wait for it; its CPU ticks (children's
# utime+stime, read by the wrapping shell once CMD is done) land in OUT.ticks.
measured() {
    local label=$1 out=$2; shift 2
    spawn "$label" "$out" bash -c '"$@"; rc=$?
        read -r f </proc/$$/stat; f=${f##*) }; set -- $f; echo $(( ${14} + ${15} )) >"$0.ticks"
        exit $rc' "$out" "$@"
    wait "${PIDS[$label]}" 2>/dev/null || true
    unset "PIDS[$label]"
}

run_dnsperf() {   # run_dnsperf NAME LOAD REP [EXTRA-SESSION]: one line into results.tsv
    local name=$1 load=$2 rep=$3 extra=${4:-} port out cpus prefix=() s0 s1 g0 g1 b0 b1 w0 w1
    port=$(port_of "$name")
    read -r -a cpus < <(cpus_for "${name%+churn}")
    mapfile -t prefix < <(pin "${cpus[1]}")
    out=$WORKDIR/servers/$name/dnsperf-${load/:/x}-rep$rep.txt
    s0=$(session_ticks "${PIDS[$name]}"); g0=0; [ -z "$extra" ] || g0=$(session_ticks "$extra")
    b0=$(busy_ticks); w0=$EPOCHREALTIME
    measured client "$out" "${prefix[@]}" dnsperf -s "$ADDR" -p "$port" -d "$(queries_of "$name")" \
        -l "$DURATION" -c "${load%%:*}" -q "${load##*:}" -T 1 \
        -O suppress=timeouts,congestion,unexpected
    s1=$(session_ticks "${PIDS[$name]}"); g1=0; [ -z "$extra" ] || g1=$(session_ticks "$extra")
    b1=$(busy_ticks); w1=$EPOCHREALTIME
    awk -v s="$name" -v l="$load" -v r="$rep" -v hz="$CLK_TCK" -v srv=$((s1 - s0)) \
        -v cli="$(cat "$out.ticks" 2>/dev/null || echo 0)" -v gen=$((g1 - g0)) \
        -v busy=$((b1 - b0)) -v w0="$w0" -v w1="$w1" '
        /Queries sent:/       { sent = $3 }
        /Queries completed:/  { done = $3 }
        /Queries lost:/       { lost = $3 }
        /Queries per second:/ { qps = $4 }
        /Average Latency/     { lat = $4 * 1000 }
        /Response codes:/     { sub(/.*Response codes: */, ""); gsub(/ /, ""); rc = $0 }
        END { t = w1 - w0
              other = busy - srv - cli - gen; if (other < 0) other = 0
              printf "%s\t%s\t%s\t%.0f\t%.3f\t%d\t%d\t%d\t%.1f\t%.0f\t%.1f\t%.1f\t%.1f\t%s\n",
                  s, l, r, qps, lat, lost, sent, done, 100 * srv / hz / t,
                  (srv > 0 ? done * hz / srv : 0), 100 * other / hz / t, 100 * cli / hz / t,
                  100 * gen / hz / t, (rc == "" ? "-" : rc) }' \
        "$out" >>"$WORKDIR/results.tsv"
    tail -1 "$WORKDIR/results.tsv" | awk -F'\t' '{ printf "  %-15s %-6s rep %s: %7d qps %7.3f ms lost %-5d srv %3d%% %7d qps/core other %3d%%\n", $1, $2, $3, $4, $5, $6, $9, $10, $11 }' >&2
}

# ------------------------------------------------------------------------------ churn --
churn_start() {   # the churn generator against rollcall+churn's API
    local prefix=()
    mapfile -t prefix < <(pin "$CHURN_CPU")
    CHURN_T0=$EPOCHREALTIME
    spawn churn "$WORKDIR/servers/rollcall+churn/churn-rep$1.txt" "${prefix[@]}" "$CHURN_BIN" \
        --api "http://127.0.0.1:$(http_port_of rollcall+churn)" --services "$DATA/services.tsv" \
        --renew-rate "$CHURN_RENEW" --register-rate "$CHURN_REGISTER" --register-ttl 1 \
        --connections "$CHURN_CONNS"
}

churn_stop() {   # stop the generator, append its report and CPU to churn.tsv
    local rep=$1 ticks secs report
    ticks=$(session_ticks "${PIDS[churn]}")
    secs=$(awk -v a="$CHURN_T0" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')
    stop churn INT
    report=$(grep -h '^elapsed_s=' "$WORKDIR/servers/rollcall+churn/churn-rep$rep.txt" || true)
    [ -n "$report" ] || { log "churn generator: no report; see $WORKDIR/servers/rollcall+churn/churn-rep$rep.txt"; report="failed=1"; }
    printf '%s\t%s\tgen_cpu_pct=%.0f\n' "$rep" "$report" \
        "$(awk -v t="$ticks" -v hz="$CLK_TCK" -v s="$secs" 'BEGIN { print 100 * t / hz / s }')" \
        >>"$WORKDIR/churn.tsv"
    log "churn rep $rep: $report"
}

# -------------------------------------------------------------------------------- API --
run_api() {   # run_api REP: rollcall on both cores, wrk renewing one node, one line to api.tsv
    local rep=$1 http out s0 s1 b0 b1 w0 w1
    start_server api unpinned || { log "rollcall (api) did not start"; return 0; }
    http=$(http_port_of api)
    curl -sf -X PUT "http://127.0.0.1:$http/v1/roles/bench/nodes/n1" \
        -d '{"addr":"10.9.0.1","port":8080,"ttl":60}' >/dev/null || log "api: first PUT failed"
    out=$WORKDIR/servers/api/wrk-rep$rep.txt
    s0=$(session_ticks "${PIDS[api]}"); b0=$(busy_ticks); w0=$EPOCHREALTIME
    measured client "$out" wrk -t "$API_THREADS" -c "$API_CONNS" -d "${DURATION}s" --latency \
        -s "$HERE/renew.lua" "http://127.0.0.1:$http/v1/roles/bench/nodes/n1"
    s1=$(session_ticks "${PIDS[api]}"); b1=$(busy_ticks); w1=$EPOCHREALTIME
    stop api
    awk -v r="$rep" -v hz="$CLK_TCK" -v srv=$((s1 - s0)) -v busy=$((b1 - b0)) -v w0="$w0" -v w1="$w1" \
        -v cli="$(cat "$out.ticks" 2>/dev/null || echo 0)" -v c="$API_CONNS" '
        function ms(x) { if (x ~ /us$/) return x / 1000; if (x ~ /ms$/) return x + 0;
                         if (x ~ /s$/) return x * 1000; return x }
        /Requests\/sec:/        { rps = $2 }
        /^ +Latency +[0-9]/     { avg = ms($2) }
        /^ +99% /               { p99 = ms($2) }
        /Non-2xx or 3xx/        { bad = $NF }
        /Socket errors:/        { err = $0; sub(/.*errors: /, "", err); gsub(/ /, "", err) }
        /requests in/           { n = $1 }
        END { t = w1 - w0; other = busy - srv - cli; if (other < 0) other = 0
              printf "%s\t%d\t%.0f\t%.3f\t%.3f\t%d\t%s\t%.0f\t%.0f\t%.0f\t%.0f\n", r, c, rps, avg, p99,
                  bad, (err == "" ? "-" : err), 100 * srv / hz / t, (srv > 0 ? n * hz / srv : 0),
                  100 * cli / hz / t, 100 * other / hz / t }' "$out" >>"$WORKDIR/api.tsv"
    tail -1 "$WORKDIR/api.tsv" | awk -F'\t' '{ printf "  api rep %s: %7d req/s  avg %.3f ms  p99 %.3f ms  non-2xx %d  srv %d%%\n", $1, $3, $4, $5, $6, $8 }' >&2
}

# ------------------------------------------------------------------------------ report --
versions() {
    local s
    echo "| component | version |"; echo "| --- | --- |"
    echo "| rollcall | $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') ($("$ROLLCALL_BIN" --version 2>/dev/null || echo '?'); $(rustc --version 2>/dev/null | cut -d' ' -f1,2)) |"
    for s in $SERVERS; do
        case $s in
            nsd) echo "| nsd | $(nsd -v 2>&1 | head -1) |" ;;
            knot) echo "| knot | $(knotd -V | head -1) |" ;;
            dnsmasq) echo "| dnsmasq | $(dnsmasq -v | head -1 | sed 's/  Copyright.*//') |" ;;
            bind) echo "| bind | $(named -v) |" ;;
            hickory) echo "| hickory | $("$(hickory_bin)" --version) |" ;;
            baseline) echo "| baseline | $BASELINE_BIN ($("$BASELINE_BIN" --version 2>/dev/null || echo '?')) |" ;;
        esac
    done
    echo "| dnsperf | $(dnsperf -h 2>&1 | awk '/^Version/ { print $2 }') |"
    [ "$API" = 0 ] || echo "| wrk | $(wrk -v 2>&1 | head -1 | cut -d' ' -f1,2) |"
}

report() {
    local smoke=""
    if [ "$DURATION" -lt 10 ] || [ "$REPS" -lt 3 ]; then
        smoke="> **Smoke run** (${DURATION} s runs, $REPS rep(s)): checks that everything works; not figures to quote."
    fi
    cat <<EOF
# DNS benchmark: rollcall and peers, $(date -u '+%Y-%m-%d %H:%M UTC')
${smoke:+
$smoke
}
Command: \`$CMDLINE\`

Machine: $HOST, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), Linux $(uname -r), $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}"); load average before the run: $LOAD_BEFORE.

Dataset: N=$N frontservers, M=$M appservers; $(wc -l <"$DATA/queries.txt") queries in blocks of 6 (A frontserver, A appserver, SRV _http._tcp.appserver, A instance, A missing name, AAAA instance); dnsperf \`-l $DURATION -c C -q Q -T 1\`, loads \`$LOADS\`, best median QPS kept; $REPS rep(s), interleaved. Pinned: server on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU (Knot: swapped), one worker each.

$(versions)

EOF
    python3 - "$WORKDIR" "$CHURN_RENEW" "$CHURN_REGISTER" "$API_THREADS" <<'EOF'
import os, sys, statistics as st
from collections import defaultdict
wd, renew_target, reg_target, api_threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def rows(name, cols):
    p = os.path.join(wd, name)
    if not os.path.exists(p):
        return []
    return [dict(zip(cols, l.rstrip("\n").split("\t", len(cols) - 1))) for l in open(p) if l.strip()]

res = rows("results.tsv", "server load rep qps lat lost sent done srv qpc other cli gen rcodes".split())
checks = defaultdict(list)
for c in rows("checks.tsv", ["server", "when", "result"]):
    checks[c["server"]].append((c["when"], c["result"]))
probes = {p["server"]: p["probe"] for p in rows("probe.tsv", ["server", "probe"])}

def check_of(s):
    v = checks.get(s, [])
    if not v:
        return "?"
    if all(r == "exempt" for _, r in v):
        return "exempt"
    bad = [r for _, r in v if not r.startswith("ok")]
    return "ok" if not bad else "**MISMATCH**"

def check_details(s):
    return sorted({f"{w}: {r}" for w, r in checks.get(s, []) if r not in ("exempt",) and not r.startswith("ok")})

def rcode_ok(r):
    """5 of 6 queries NOERROR, 1 of 6 NXDOMAIN (the missing name), nothing else.
    dnsperf's line, spaces removed: NOERROR500(83.33%),NXDOMAIN100(16.67%)"""
    codes = {}
    for part in r["rcodes"].split(")"):
        head = part.strip(",").split("(")[0]
        if "(" in part and head:
            codes["".join(c for c in head if c.isalpha())] = int("".join(c for c in head if c.isdigit()) or 0)
    done = sum(codes.values())
    if not done:
        return True
    nx = codes.get("NXDOMAIN", 0) / done
    return set(codes) <= {"NOERROR", "NXDOMAIN"} and abs(nx - 1 / 6) < 0.01

by = defaultdict(list)
for r in res:
    by[(r["server"], r["load"])].append(r)
best = {}       # server -> (median qps, load, runs)
clean = {}      # server -> same, best load without lost queries
for (s, l), v in by.items():
    med = st.median(float(r["qps"]) for r in v)
    if s not in best or med > best[s][0]:
        best[s] = (med, l, v)
    if all(int(r["lost"]) == 0 for r in v) and (s not in clean or med > clean[s][0]):
        clean[s] = (med, l, v)

def md(v, k):
    return st.median(float(r[k]) for r in v)

def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "—"

base = {s: (b[0], md(b[2], "qpc")) for s, b in best.items()}
order = sorted(best, key=lambda s: -base[s][1])
if res:
    print("## DNS, pinned\n")
    print("| server | answers | -c:-q | QPS med | min | max | lat ms | lost | srv% | QPS/core "
          "| other% | dnsperf% | QPS/core × nsd | QPS/core × null | QPS × nsd | QPS × idle |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def line(s, mark, b):
        med, l, v = b
        q = [float(r["qps"]) for r in v]
        qpc = md(v, "qpc")
        ans = check_of(s)
        # the -cache entries ask forwarded names only: all NOERROR, not the dataset's mix
        if not s.startswith("null") and not s.endswith("-cache") and not all(rcode_ok(r) for r in v):
            ans += " (rcode mix off!)"
        idle = ratio(med, base["rollcall"][0]) if s == "rollcall+churn" and "rollcall" in base else ""
        print(f"| {s}{mark} | {ans} | {l} | {med:.0f} | {min(q):.0f} | {max(q):.0f} | {md(v, 'lat'):.3f} "
              f"| {sum(int(r['lost']) for r in v)} | {md(v, 'srv'):.0f} | {qpc:.0f} | {md(v, 'other'):.0f} "
              f"| {md(v, 'cli'):.0f} "
              f"| {ratio(qpc, base.get('nsd', (0, 0))[1])} | {ratio(qpc, base.get('null', (0, 0))[1])} "
              f"| {ratio(med, base.get('nsd', (0, 0))[0])} | {idle} |")
    for s in order:
        line(s, "", best[s])
        if any(int(r["lost"]) for r in best[s][2]) and s in clean:
            line(s, " \\*", clean[s])
    print()
    print("Best load per server by median QPS; `*`: best load without any lost query. "
          "lat ms, srv%, QPS/core, other%: medians over the reps; lost: sum over the reps. "
          "dnsperf%: the client's CPU (near 100: the client is the limit). `× nsd`, `× null`: ratios to NSD's and the null responder's figures of this run; "
          "`QPS × idle`: rollcall under churn relative to rollcall idle. `answers`: every distinct "
          "query checked over TCP (rcode, count, set, SOA in negative answers) at each start, "
          "and for rollcall+churn again while the churn runs; dnsperf's rcode mix is checked too.")
    print()

churn = []
for l in open(os.path.join(wd, "churn.tsv")) if os.path.exists(os.path.join(wd, "churn.tsv")) else []:
    rep, *kv = l.rstrip("\n").split("\t")
    d = {"rep": rep}
    for part in " ".join(kv).split():
        if "=" in part:
            k, v = part.split("=", 1)
            d[k] = v
    churn.append(d)
if churn:
    print(f"## rollcall under churn (target: {renew_target} renewals/s, {reg_target} registrations/s "
          "+ as many expiries/s)\n")
    if "rollcall" in best and "rollcall+churn" in best:
        i, c = best["rollcall"], best["rollcall+churn"]
        print(f"Idle: {i[0]:.0f} QPS, {md(i[2], 'qpc'):.0f} QPS/core; under churn: {c[0]:.0f} QPS, "
              f"{md(c[2], 'qpc'):.0f} QPS/core (server CPU includes the API work) → "
              f"**{100 * c[0] / i[0]:.0f} %** of the idle QPS, "
              f"{100 * md(c[2], 'qpc') / md(i[2], 'qpc'):.0f} % of the idle QPS/core. "
              f"The generator shares the client CPU with dnsperf (gen%).\n")
    print("| rep | renewals/s | registrations/s | expiries/s | PUT errors | behind | renew p50 ms "
          "| renew p99 ms | register p99 ms | live churn nodes (max) | gen% |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in churn:
        g = d.get
        print(f"| {d['rep']} | {g('renewals_per_s', '?')} | {g('registrations_per_s', '?')} "
              f"| {g('expiries_per_s', '?')} | {g('errors', '?')} | {g('behind', '?')} "
              f"| {g('renew_p50_ms', '?')} | {g('renew_p99_ms', '?')} | {g('register_p99_ms', '?')} "
              f"| {g('live_churn_max', '?')} | {g('gen_cpu_pct', '?')} |")
    print()

api = rows("api.tsv", "rep conns rps avg p99 non2xx errors srv rpc cli other".split())
if api:
    print(f"## HTTP API: renewals (wrk -t {api_threads}, keep-alive, PUT; rollcall with a data dir "
          "on disk; both cores shared by rollcall and wrk)\n")
    print("| rep | connections | requests/s | avg ms | p99 ms | non-2xx | socket errors | srv% "
          "| requests per server CPU-s | wrk% | other% |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for a in api:
        print(f"| {a['rep']} | {a['conns']} | {a['rps']} | {a['avg']} | {a['p99']} | {a['non2xx']} "
              f"| {a['errors']} | {a['srv']} | {a['rpc']} | {a['cli']} | {a.get('other', '?')} |")
    if len(api) > 1:
        print(f"\nMedian: {st.median(float(a['rps']) for a in api):.0f} requests/s")
    print()

if probes:
    print("## `appserver.cluster A` over UDP without EDNS, UDP with EDNS 1232, TCP\n")
    print("(rcode, answers, TC, bytes)\n")
    print("| server | UDP | UDP, EDNS 1232 | TCP |")
    print("| --- | --- | --- | --- |")
    for s in sorted(probes):
        print(f"| {s} | " + " | ".join(probes[s].split("\t")) + " |")
    print()
if checks and not res:
    print("## Answer check\n")
    print("| server | answers |")
    print("| --- | --- |")
    for s in sorted(checks):
        print(f"| {s} | {check_of(s)} |")
    print()
bad = [s for s in checks if check_of(s) not in ("ok", "exempt")]
if bad:
    print("**Answer check failed** (details in servers/<name>/check.log of the workdir):\n")
    for s in sorted(bad):
        for d in check_details(s):
            print(f"- {s}, {d}")
    print()
EOF
}

# -------------------------------------------------------------------------------- main --
install_missing
if [[ " $SERVERS " == *" hickory "* ]] && ! hickory_bin >/dev/null; then
    log "hickory-dns not installed (cargo install hickory-dns): left out"
    SERVERS=$(echo " $SERVERS " | sed 's/ hickory / /; s/^ *//; s/ *$//')
fi
build
pick_ports
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
HOST=$(hostname -s 2>/dev/null || uname -n)

if [ -z "$WORKDIR" ]; then
    WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/dns-bench.XXXXXX")
    [ "$KEEP" = 1 ] || TMP_WORKDIR=$WORKDIR
fi
mkdir -p "$WORKDIR"
: >"$WORKDIR/results.tsv"; : >"$WORKDIR/checks.tsv"; : >"$WORKDIR/probe.tsv"
rm -f "$WORKDIR/churn.tsv" "$WORKDIR/api.tsv"
DATA=$WORKDIR/data
python3 "$HERE/gen-dataset.py" --out "$DATA" -n "$N" -m "$M" >&2

ENTRIES=()
for s in $SERVERS; do ENTRIES+=("$s"); done
[ "$CHURN" = 1 ] && ENTRIES+=("rollcall+churn")
if [ "$FORWARD" = 1 ]; then
    ENTRIES+=("rollcall-fwd" "rollcall-cache" "dnsmasq-cache")
    start_upstream
fi
log "workdir $WORKDIR; ports $((BASE_PORT + 1))-$((BASE_PORT + 8)) (+1000 for HTTP); N=$N M=$M; ${DURATION}s x $REPS reps; loads '$LOADS'"

if [ ${#ENTRIES[@]} -gt 0 ]; then
  for rep in $(seq "$REPS"); do
    [ "$VERIFY_ONLY" = 1 ] && [ "$rep" -gt 1 ] && break
    k=$(( (rep - 1) % ${#ENTRIES[@]} ))          # rotate the order every rep
    for s in "${ENTRIES[@]:k}" "${ENTRIES[@]:0:k}"; do
        log "rep $rep: $s"
        if ! start_server "$s"; then
            printf '%s\t%s\t%s\n' "$s" "start" "failed to start" >>"$WORKDIR/checks.tsv"; continue
        fi
        check_answers "$s" "start"
        probe "$s"
        if [ "$VERIFY_ONLY" = 1 ]; then stop "$s"; continue; fi
        if [ "$s" = rollcall+churn ]; then
            churn_start "$rep"; sleep 1.5             # warm-up: leases start expiring after 1 s
            for load in $LOADS; do run_dnsperf "$s" "$load" "$rep" "${PIDS[churn]:-}"; done
            check_answers "$s" "under churn"
            churn_stop "$rep"
        else
            for load in $LOADS; do run_dnsperf "$s" "$load" "$rep"; done
        fi
        stop "$s"
    done
  done
fi
if [ "$API" = 1 ] && [ "$VERIFY_ONLY" = 0 ]; then
    for rep in $(seq "$REPS"); do log "api rep $rep"; run_api "$rep"; done
fi

REPORT=$(report)
echo "$REPORT"
if [ -z "$OUT" ]; then
    mkdir -p "$HERE/results"
    OUT=$HERE/results/$(date +%F)-$HOST.md; i=2
    while [ -e "$OUT" ]; do OUT=$HERE/results/$(date +%F)-$HOST-$i.md; i=$((i + 1)); done
fi
printf '%s\n' "$REPORT" >"$OUT"
log "report written to $OUT"
if [ -n "${TMP_WORKDIR:-}" ]; then log "raw results are deleted on exit (--keep or --workdir to keep them)"
else log "raw results: $WORKDIR"; fi
