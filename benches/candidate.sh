#!/usr/bin/env bash
# Starts rollcall as a benchmark candidate on a generated dataset and stays in the foreground.
#
# It serves the dataset the way rollcall is meant to be used: the zone file supplies only the
# apex (SOA, NS and the name server's address); every instance of services.tsv is registered
# over the HTTP API (ttl 86400, weight 10 like the dataset's SRV records).
#
# Environment (set by benches/dns-bench.sh, or by a harness with the same contract):
#   DNSB_ADDR, DNSB_PORT     where DNS must listen
#   DNSB_DATA_DIR            dataset directory (cluster.zone, services.tsv)
#   DNSB_THREADS             UDP sockets/threads
#   ROLLCALL_BIN             binary (default: target/release/rollcall next to this script)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${ROLLCALL_BIN:-$here/../target/release/rollcall}
work=$(mktemp -d "${TMPDIR:-/tmp}/rollcall-candidate.XXXXXX")
mkdir -p "$work/zones"
# The apex only: everything before the first role block of the generated zone.
awk '/^; role/ { exit } { print }' "$DNSB_DATA_DIR/cluster.zone" >"$work/zones/cluster.zone"
http_port=$((DNSB_PORT + 1000))
"$bin" serve --dns-listen "$DNSB_ADDR:$DNSB_PORT" --http-listen "127.0.0.1:$http_port" \
    --zones "$work/zones" --data-dir "" --dns-threads "${DNSB_THREADS:-1}" \
    ${ROLLCALL_EXTRA_ARGS:-} 2>"$work/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$http_port/healthz" >/dev/null && break
    sleep 0.05
done
# Register every instance (many at once: the registry batches them).
grep -v '^#' "$DNSB_DATA_DIR/services.tsv" | while IFS=$'\t' read -r role fqdn addr port; do
    node=${fqdn%%.*}
    printf 'url = "http://127.0.0.1:%s/v1/roles/%s/nodes/%s"\n-X PUT\ndata = "{\\"addr\\":\\"%s\\",\\"port\\":%s,\\"weight\\":10,\\"ttl\\":86400}"\n-o /dev/null\nnext\n' \
        "$http_port" "$role" "$node" "$addr" "$port"
done | sed '$d' >"$work/curl.cfg"   # no "next" after the last URL
curl -sf --parallel --parallel-max 32 -K "$work/curl.cfg"
wait $pid
