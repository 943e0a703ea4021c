#!/usr/bin/env bash
# big-role-churn.sh - what a big role costs the API: registering it, changing one of its nodes,
# and every other client's latency while someone churns it. One or more rollcall binaries side
# by side (before/after), interleaved per rep.
#
#   benches/big-role-churn.sh [-n NODES] [--churn S] [--reps R] BIN [BIN...]
#
# For each rep and each BIN: start `BIN serve` on loopback (in memory, server pinned to CPU 1),
# then, with the client on CPU 0:
#   register   NODES nodes (default 20,000, with ports: A, SRV and PTR data) into role `big`
#              over 32 keep-alive connections; wall time;
#   change     200 sequential PUTs that change one node of `big` (its weight): p50 / p99;
#   churn      4 connections change nodes of `big` as fast as they can for S seconds (default
#              10) while one client PUTs (unchanged) into the small role `small`: that client's
#              p50 / p99, and the churn rate;
#   dns        after the churn, `dig` checks that big.cluster still answers over TCP.
# Prints one table row per binary (medians over reps). The server is stopped by its PID.
set -euo pipefail
export LC_ALL=C
NODES=20000; CHURN=10; REPS=3; BINS=()
while [ $# -gt 0 ]; do
    case $1 in
        -n) NODES=$2; shift ;;
        --churn) CHURN=$2; shift ;;
        --reps) REPS=$2; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) BINS+=("$(realpath "$1")") ;;
    esac
    shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "usage: big-role-churn.sh [-n NODES] BIN [BIN...]" >&2; exit 2; }
work=$(mktemp -d); pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

cat >"$work/client.py" <<'PY'
import asyncio, json, sys, time
mode, port = sys.argv[1], int(sys.argv[2])

async def conn():
    return await asyncio.open_connection("127.0.0.1", port)

async def put(rw, role, node, body):
    r, w = rw
    body = json.dumps(body).encode()
    w.write(f"PUT /v1/roles/{role}/nodes/{node} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await w.drain()
    status = int((await r.readline()).split()[1]); clen = 0
    while True:
        h = await r.readline()
        if h in (b"\r\n", b""):
            break
        if h.lower().startswith(b"content-length:"):
            clen = int(h.split(b":")[1])
    await r.readexactly(clen)
    assert status == 200, status

def addr(i):
    return "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)

def pct(lat, p):
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000

async def register(n):
    async def worker(k):
        rw = await conn()
        for i in range(k, n, 32):
            await put(rw, "big", f"n{i}", {"addr": addr(i), "port": 8080, "ttl": 86400})
    t = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(32)))
    print(f"{time.monotonic() - t:.2f}")

async def change(count):
    rw = await conn(); lat = []
    for i in range(count):
        t = time.monotonic()
        await put(rw, "big", "n1", {"addr": addr(1), "port": 8080, "ttl": 86400, "weight": i % 60000 + 1})
        lat.append(time.monotonic() - t)
    print(f"{pct(lat, .5):.2f} {pct(lat, .99):.2f}")

async def churn(seconds):
    stop = time.monotonic() + seconds; done = 0; lat = []
    async def churner(k):
        nonlocal done
        rw = await conn(); i = 0
        while time.monotonic() < stop:
            i += 1
            await put(rw, "big", f"n{k}", {"addr": addr(k), "port": 8080, "ttl": 86400, "weight": i % 60000 + 1})
            done += 1
    async def bystander():
        rw = await conn()
        while time.monotonic() < stop:
            t = time.monotonic()
            await put(rw, "small", "s1", {"addr": "10.200.0.1", "port": 8080, "ttl": 86400})
            lat.append(time.monotonic() - t)
            await asyncio.sleep(0.01)
    await asyncio.gather(*(churner(k) for k in range(4)), bystander())
    print(f"{pct(lat, .5):.2f} {pct(lat, .99):.2f} {done / seconds:.0f}")

asyncio.run({"register": register, "change": change, "churn": churn}[mode](float(sys.argv[3]) if mode == "churn" else int(sys.argv[3])))
PY

declare -A results
for rep in $(seq "$REPS"); do
    for bin in "${BINS[@]}"; do
        dns=127.0.0.1:25411; http=127.0.0.1:25412
        taskset -c 1 "$bin" serve --dns-listen "$dns" --http-listen "$http" --dns-threads 1 \
            --data-dir '' --zones "$work/none" --max-nodes 1000000 --max-nodes-per-role 1000000 \
            2>"$work/serve.log" &
        pid=$!
        for _ in $(seq 100); do curl -fs "http://$http/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
        reg=$(taskset -c 0 python3 "$work/client.py" register 25412 "$NODES")
        read -r c50 c99 < <(taskset -c 0 python3 "$work/client.py" change 25412 200)
        read -r b50 b99 rate < <(taskset -c 0 python3 "$work/client.py" churn 25412 "$CHURN")
        tc=$(dig +tcp +time=5 +tries=1 -p 25411 @127.0.0.1 big.cluster A | awk '/ANSWER:/ {gsub(",", ""); for (i = 1; i <= NF; i++) if ($i == "ANSWER:") print $(i + 1)}')
        name="$(basename "$bin")"
        echo "rep $rep $name: register ${reg}s; change p50 ${c50} p99 ${c99} ms; bystander p50 ${b50} p99 ${b99} ms at ${rate} changes/s; big.cluster over TCP: ${tc} answers" >&2
        results["$bin reg"]+="$reg "; results["$bin c50"]+="$c50 "; results["$bin c99"]+="$c99 "
        results["$bin b50"]+="$b50 "; results["$bin b99"]+="$b99 "; results["$bin rate"]+="$rate "
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| binary | nodes | register (s) | change p50 / p99 (ms) | bystander p50 / p99 (ms) | churn (changes/s) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for bin in "${BINS[@]}"; do
    m() { echo "${results["$bin $1"]}" | median; }
    echo "| $(basename "$bin") | $NODES | $(m reg) | $(m c50) / $(m c99) | $(m b50) / $(m b99) | $(m rate) |"
done
