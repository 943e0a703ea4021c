#!/usr/bin/env bash
# Starts rollcall as a benchmark candidate on a generated dataset and stays in the foreground.
#
# It serves the dataset the way rollcall is meant to be used: the zone file supplies only the
# apex (SOA, NS and the name server's address); every instance of services.tsv is registered
# over the HTTP API (ttl 86400, weight 10 like the dataset's SRV records).
#
# Registration happens before DNS listens on DNSB_PORT, so "answers cluster. SOA" (what a
# harness waits for) also means "every instance is registered": a first rollcall (DNS on a
# throw-away port) takes the registrations into a data dir, stops, and the real one starts from
# that data dir. The HTTP API stays on the same port, DNSB_PORT + 1000.
#
# Environment (set by benches/dns-bench.sh, or by a harness with the same contract):
#   DNSB_ADDR, DNSB_PORT     where DNS must listen
#   DNSB_DATA_DIR            dataset directory (cluster.zone, services.tsv)
#   DNSB_THREADS             UDP sockets/threads
#   ROLLCALL_BIN             binary (default: target/release/rollcall next to this script)
#   ROLLCALL_EXTRA_ARGS      more `rollcall serve` options (word-split)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${ROLLCALL_BIN:-$here/../target/release/rollcall}
work=$(mktemp -d "${TMPDIR:-/tmp}/rollcall-candidate.XXXXXX")
mkdir -p "$work/zones"
# The apex only: everything before the first role block of the generated zone.
awk '/^; role/ { exit } { print }' "$DNSB_DATA_DIR/cluster.zone" >"$work/zones/cluster.zone"
http_port=$((DNSB_PORT + 1000))
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
trap 'exit 143' TERM INT

serve() {   # serve DNS-LISTEN LOG
    # shellcheck disable=SC2086
    "$bin" serve --dns-listen "$1" --http-listen "127.0.0.1:$http_port" \
        --zones "$work/zones" --data-dir "$work/data" --dns-threads "${DNSB_THREADS:-1}" \
        ${ROLLCALL_EXTRA_ARGS:-} 2>>"$2" &
    pid=$!
    for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$http_port/healthz" >/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "rollcall exited; see $2:" >&2; tail -5 "$2" >&2; exit 1; }
        sleep 0.05
    done
    echo "rollcall: no /healthz on 127.0.0.1:$http_port" >&2; exit 1
}

# 1. register every instance (many at once: the registry batches them)
serve "$DNSB_ADDR:0" "$work/load.log"
grep -v '^#' "$DNSB_DATA_DIR/services.tsv" | while IFS=$'\t' read -r role fqdn addr port; do
    node=${fqdn%%.*}
    printf 'url = "http://127.0.0.1:%s/v1/roles/%s/nodes/%s"\n-X PUT\ndata = "{\\"addr\\":\\"%s\\",\\"port\\":%s,\\"weight\\":10,\\"ttl\\":86400}"\n-o /dev/null\n-f\nnext\n' \
        "$http_port" "$role" "$node" "$addr" "$port"
done | sed '$d' >"$work/curl.cfg"   # no "next" after the last URL
curl -s --parallel --parallel-max 32 -K "$work/curl.cfg" ||
    { echo "registering services.tsv failed; see $work/load.log" >&2; exit 1; }
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""

# 2. serve DNS on the real port, from the data dir
serve "$DNSB_ADDR:$DNSB_PORT" "$work/serve.log"
wait "$pid"
