#!/usr/bin/env bash
# Entry point of the proxyserver container: a private redis, `rollcall hipache-sync` filling it
# from rollcall, and hipache reading it. Runs in the foreground; SIGTERM/SIGINT stops all three,
# and if any of them dies the others are stopped too (so the container restarts as a whole).
#
#   client -> hipache (:80) --reads--> redis (127.0.0.1:6379) <--writes-- rollcall hipache-sync
#                                                                          |  blocking query
#                                                                          v
#                                                          rollcall serve (ROLLCALL_API)
#
# Settings (environment; every ROLLCALL_* variable is the twin of a hipache-sync flag, see
# `rollcall hipache-sync --help`):
#   ROLLCALL_API        rollcall's HTTP API                     (default http://dns:8053)   SET ME
#   ROLLCALL_ROLE       role the frontservers register under    (default frontserver)
#   ROLLCALL_FRONTEND   Host name(s) hipache serves, comma-separated, e.g.
#                       "www.example.com,*.example.com"         (default localhost)         SET ME
#   ROLLCALL_PORT       port of the frontservers, when they do not register one (default: the
#                       registered port, else 80)
#   ROLLCALL_TOKEN      API token, when rollcall runs with --token-reads
#   REDIS_PORT          port of the private redis               (default 6379; must match the
#                       "driver" in config.json)
#   HIPACHE_CONFIG      hipache's configuration                 (default /etc/hipache/config.json)
#   HIPACHE_CMD         how to start hipache                    (default: node --expose-gc
#                       /usr/local/lib/node_modules/hipache/bin/hipache --config ...; empty: no
#                       hipache here, redis and hipache-sync only, as in the image's `sync`
#                       stage, and port 80 answers 503 with a page saying so)
#
# Needs on PATH: redis-server, redis-cli, rollcall, node with hipache 0.3.1 installed
# (npm install -g hipache@0.3.1); socat and no-hipache.sh for the 503 page without hipache.
set -euo pipefail

: "${ROLLCALL_API:=http://dns:8053}"
: "${ROLLCALL_ROLE:=frontserver}"
: "${ROLLCALL_FRONTEND:=localhost}"
: "${REDIS_PORT:=6379}"
: "${HIPACHE_CONFIG:=/etc/hipache/config.json}"
HIPACHE_CMD=${HIPACHE_CMD-node --expose-gc /usr/local/lib/node_modules/hipache/bin/hipache --config $HIPACHE_CONFIG}
export ROLLCALL_API ROLLCALL_FRONTEND REDIS_PORT
# hipache-sync's own names for these (ROLLCALL_ROLE and ROLLCALL_PORT are the agent's).
export ROLLCALL_HIPACHE_ROLE="$ROLLCALL_ROLE"
if [ -n "${ROLLCALL_PORT:-}" ]; then export ROLLCALL_HIPACHE_PORT="$ROLLCALL_PORT"; fi
export ROLLCALL_REDIS="redis://127.0.0.1:${REDIS_PORT}"

pids=()
stop() {
    trap - TERM INT
    # Reverse order: hipache first (stops taking requests), redis last.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    wait
}
trap 'stop; exit 0' TERM INT

# 1. redis, in memory only, reachable from this container only. Nothing needs saving:
#    hipache-sync rewrites every list when it starts and whenever redis comes back empty.
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no &
pids+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done

# 2. hipache-sync: follows ROLLCALL_ROLE with blocking queries and keeps, for every host in
#    ROLLCALL_FRONTEND, frontend:<host> = [role, http://<addr>:<port>, ...] (one MULTI/EXEC per
#    change, dead:<host> cleared with it). It retries rollcall and redis with backoff, so the
#    start order does not matter; the last known list stays while rollcall is unreachable.
rollcall hipache-sync &
pids+=($!)

# No hipache (the image's `sync` stage): port 80 is published all the same, so answer it with a
# 503 page that says why, instead of a bare connection reset.
if [ -z "$HIPACHE_CMD" ]; then
    echo "start.sh: HIPACHE_CMD is empty (the image's sync stage): NO PROXY on port 80, which" \
        "answers 503 with a page saying so; redis and hipache-sync run. Ask a frontserver" \
        "directly (redis-cli lrange frontend:${ROLLCALL_FRONTEND%%,*} 0 -1 lists them), or build" \
        "the hipache stage (docker/proxyserver/README.md)" >&2
    socat -T 10 TCP-LISTEN:80,reuseaddr,fork EXEC:/usr/local/bin/no-hipache.sh &
    pids+=($!)
fi

# Give hipache a filled list to start with (up to 30 s; it starts anyway, and answers 400 for
# the hosts until the list arrives).
first=${ROLLCALL_FRONTEND%%,*}
for _ in $(seq 300); do
    [ "$(redis-cli -p "$REDIS_PORT" exists "frontend:${first}")" = 1 ] && break
    sleep 0.1
done

# 3. hipache (none in the image's `sync` stage).
if [ -n "$HIPACHE_CMD" ]; then
    $HIPACHE_CMD &
    pids+=($!)
fi

# Whichever stops first (crash, or exit), stop the rest and pass its status on.
set +e
wait -n
status=$?
echo "start.sh: a process of the proxyserver exited with status $status; stopping the others" >&2
stop
exit "$status"
