#!/usr/bin/env bash
# HTTPS against plain HTTP on the API, in one run, reps interleaved (http, https, http, ...):
#
#   1. renewals: wrk on keep-alive connections, every request a PUT renewing one node
#      (benches/renew.lua), as benches/dns-bench.sh --api does;
#   2. new connections: wrk with `Connection: close`, GET /healthz, so every request pays for a
#      TCP connection and, over HTTPS, a full TLS handshake (wrk resumes no sessions): with
#      CLOSE_CONNS clients at once (`connect`), and one at a time (`connect1`: the time of N new
#      connections in a row is N / requests/s).
#
# Server CPU per request is read from /proc (utime + stime of the server process). The server
# and wrk share both cores, as in dns-bench.sh --api. Certificates: ECDSA P-256, made here with
# Debian's openssl. Needs wrk (Debian's is built with OpenSSL, so it speaks https) and a release
# build (cargo build --release).
#
#   benches/api-tls.sh                       # 3 reps x 10 s of each
#   DURATION=5 REPS=1 benches/api-tls.sh     # a smoke run
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BIN=${ROLLCALL_BIN:-$ROOT/target/release/rollcall}
DURATION=${DURATION:-10}
REPS=${REPS:-3}
CONNS=${CONNS:-64}             # keep-alive connections (renewals)
CLOSE_CONNS=${CLOSE_CONNS:-16} # concurrent new-connection clients
THREADS=${THREADS:-2}
CLK_TCK=$(getconf CLK_TCK)

for tool in wrk openssl curl; do
    command -v $tool >/dev/null || { echo "$tool is missing (apt-get install $tool)" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release" >&2; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- certificates --------------------------------------------------------------------------
ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "$@" 2>/dev/null; }
ec -x509 -keyout "$WORK/ca.key" -out "$WORK/ca.pem" -days 2 -subj /CN=bench-ca
ec -keyout "$WORK/srv.key" -out "$WORK/srv.csr" -subj /CN=localhost
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$WORK/ext"
openssl x509 -req -in "$WORK/srv.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -out "$WORK/srv.pem" -days 2 -extfile "$WORK/ext" 2>/dev/null

# --- servers -------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PORT PID URL
start() {   # start NAME [serve flags...]
    local name=$1; shift
    PORT[$name]=$(free_port)
    mkdir -p "$WORK/data-$name"
    "$BIN" serve --http-listen "127.0.0.1:${PORT[$name]}" --dns-listen 127.0.0.1:0 \
        --dns-threads 1 --data-dir "$WORK/data-$name" --zones "$WORK/nozones" "$@" \
        2>"$WORK/$name.log" &
    PID[$name]=$!
    PIDS+=("$!")
}
start http
start https --tls-cert "$WORK/srv.pem" --tls-key "$WORK/srv.key"
URL[http]="http://127.0.0.1:${PORT[http]}"
URL[https]="https://127.0.0.1:${PORT[https]}"
for name in http https; do
    for _ in $(seq 100); do
        curl -sf --cacert "$WORK/ca.pem" "${URL[$name]}/healthz" >/dev/null && break
        sleep 0.1
    done
    curl -sf --cacert "$WORK/ca.pem" -X PUT "${URL[$name]}/v1/roles/bench/nodes/n1" \
        -d '{"addr":"10.9.0.1","port":8080,"ttl":60}' >/dev/null
done

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# run KIND NAME REP: one wrk run; prints one TSV line
run() {
    local kind=$1 name=$2 rep=$3 out t0 t1 w0 w1
    out=$WORK/$kind-$name-$rep.txt
    t0=$(ticks "${PID[$name]}"); w0=$EPOCHREALTIME
    if [ "$kind" = renew ]; then
        wrk -t "$THREADS" -c "$CONNS" -d "${DURATION}s" --latency -s "$HERE/renew.lua" \
            "${URL[$name]}/v1/roles/bench/nodes/n1" >"$out"
    elif [ "$kind" = connect ]; then
        wrk -t "$THREADS" -c "$CLOSE_CONNS" -d "${DURATION}s" --latency \
            -H 'Connection: close' "${URL[$name]}/healthz" >"$out"
    else
        wrk -t 1 -c 1 -d "${DURATION}s" --latency \
            -H 'Connection: close' "${URL[$name]}/healthz" >"$out"
    fi
    t1=$(ticks "${PID[$name]}"); w1=$EPOCHREALTIME
    awk -v kind="$kind" -v name="$name" -v rep="$rep" -v hz="$CLK_TCK" -v srv=$((t1 - t0)) \
        -v w0="$w0" -v w1="$w1" '
        function ms(x) { if (x ~ /us$/) return x / 1000; if (x ~ /ms$/) return x + 0;
                         if (x ~ /s$/) return x * 1000; return x }
        /Requests\/sec:/    { rps = $2 }
        /^ +Latency +[0-9]/ { avg = ms($2) }
        /^ +99% /           { p99 = ms($2) }
        /Non-2xx or 3xx/    { bad = $NF }
        /Socket errors:/    { err = $0; sub(/.*errors: /, "", err); gsub(/ /, "", err) }
        /requests in/       { n = $1 }
        END { printf "%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%d\t%s\t%.0f\t%.1f\n", kind, name, rep, rps, avg,
                  p99, bad, (err == "" ? "-" : err), 100 * srv / hz / (w1 - w0),
                  (n > 0 ? 1000000 * srv / hz / n : 0) }' "$out"
}

echo "rollcall $("$BIN" --version 2>/dev/null | head -1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1,2); $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "${DURATION} s runs, $REPS reps, interleaved; renew: wrk -t $THREADS -c $CONNS keep-alive PUT; connect: wrk -t $THREADS -c $CLOSE_CONNS, Connection: close, GET /healthz; connect1: the same with -t 1 -c 1"
echo
printf '| test | api | rep | requests/s | avg ms | p99 ms | non-2xx | socket errors | srv%% | server CPU us/request |\n'
printf '| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n'
for kind in renew connect connect1; do
    for rep in $(seq "$REPS"); do
        for name in http https; do
            run "$kind" "$name" "$rep" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }'
        done
    done
done
echo
echo "TLS handshakes counted by the HTTPS server:"
curl -s --cacert "$WORK/ca.pem" "${URL[https]}/metrics" | grep '^rollcall_http_tls_handshakes_total'
