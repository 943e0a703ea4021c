#!/usr/bin/env bash
# big-role.sh - DNS on one very big role: A for single nodes vs PTR for their addresses, for
# one or more rollcall binaries side by side (before/after), pinned like dns-bench.sh.
#
#   benches/big-role.sh [-n NODES] [--duration S] [--reps R] BIN [BIN...]
#
# For each rep and each BIN (interleaved): start `BIN serve` on loopback with one DNS thread
# pinned to CPU 1, register NODES nodes (default 50,000) in role `big` over the API, then run
# dnsperf pinned to CPU 0 twice: node A queries (`nNNN.big.cluster A`) and PTR queries of the
# same nodes' addresses. Prints the median QPS of each; the server is stopped by its PID.
set -euo pipefail
export LC_ALL=C
NODES=50000; DURATION=5; REPS=3; BINS=()
while [ $# -gt 0 ]; do
    case $1 in
        -n) NODES=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --reps) REPS=$2; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) BINS+=("$(realpath "$1")") ;;
    esac
    shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "usage: big-role.sh [-n NODES] BIN [BIN...]" >&2; exit 2; }
command -v dnsperf >/dev/null || { echo "dnsperf is missing: apt-get install dnsperf" >&2; exit 1; }
work=$(mktemp -d); pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

python3 - "$NODES" "$work" <<'PY'
import random, sys
n, work = int(sys.argv[1]), sys.argv[2]
random.seed(1)
pick = [random.randrange(n) for _ in range(2000)]
def ip(i): return "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)
open(work + "/a.txt", "w").write("".join("n%d.big.cluster A\n" % i for i in pick))
open(work + "/ptr.txt", "w").write("".join(
    "%s.in-addr.arpa PTR\n" % ".".join(reversed(ip(i).split("."))) for i in pick))
PY

register() {   # $1 = API address: NODES PUTs over 8 keep-alive connections
    python3 - "$1" "$NODES" <<'PY'
import http.client, sys, threading
api, n = sys.argv[1], int(sys.argv[2])
host, port = api.split(":")
def ip(i): return "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)
def work(k):
    c = http.client.HTTPConnection(host, int(port))
    for i in range(k, n, 8):
        c.request("PUT", "/v1/roles/big/nodes/n%d" % i, body='{"addr":"%s","ttl":86400}' % ip(i))
        r = c.getresponse(); r.read()
        assert r.status == 200, (r.status, i)
ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}

declare -A results
for rep in $(seq "$REPS"); do
    for bin in "${BINS[@]}"; do
        dns=127.0.0.1:25401; http=127.0.0.1:25402
        taskset -c 1 "$bin" serve --dns-listen "$dns" --http-listen "$http" --dns-threads 1 \
            --data-dir '' --zones "$work/none" --max-nodes 1000000 --max-nodes-per-role 1000000 \
            2>"$work/serve.log" &
        pid=$!
        for _ in $(seq 100); do curl -fs "http://$http/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
        register "$http"
        for kind in a ptr; do
            qps=$(taskset -c 0 dnsperf -s 127.0.0.1 -p 25401 -d "$work/$kind.txt" -l "$DURATION" \
                -c 8 -q 100 -T 1 2>/dev/null | awk '/Queries per second/ {print int($4)}')
            results["$bin $kind"]+="$qps "
            echo "rep $rep $(basename "$(dirname "$(dirname "$bin")")")/$(basename "$bin") $kind: $qps QPS" >&2
        done
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| binary | nodes in the role | A (one node) QPS, median | PTR QPS, median | PTR / A |"
echo "| --- | ---: | ---: | ---: | ---: |"
for bin in "${BINS[@]}"; do
    a=$(echo "${results["$bin a"]}" | median); p=$(echo "${results["$bin ptr"]}" | median)
    echo "| $bin | $NODES | $a | $p | $(awk -v p="$p" -v a="$a" 'BEGIN {printf "%.2f", p / a}') |"
done
