#!/usr/bin/env bash
# Rolling replacement of a scaled service, one replica at a time, so that its role is never
# empty: compose itself (v2 as well as 1.29) recreates every replica at once when the image or
# a setting changes, and the role answers NXDOMAIN until the new ones register.
#
#   docker/roll.sh SERVICE        e.g. docker/roll.sh appserver   (after a new build)
#
# For each running replica: start one new container from the current image and settings,
# wait until it is registered in rollcall (checked inside the rollcall container), wait
# ROLL_SETTLE more (default 3s: nginx re-resolves every second), then `docker stop` the old
# one (its agent deregisters and drains) and remove it.
#
# Environment: COMPOSE (default: `docker compose`, else `docker-compose`), COMPOSE_PROJECT_NAME
# and COMPOSE_FILE as compose reads them, ROLL_SETTLE, ROLL_TIMEOUT (wait for a registration,
# default 60 s), ROLLCALL_SERVICE (the rollcall server's service name, default rollcall).
# The role is taken from the new container's ROLLCALL_ROLE.
set -euo pipefail
cd "$(dirname "$0")"

svc=${1:?usage: roll.sh SERVICE}
settle=${ROLL_SETTLE:-3}
timeout=${ROLL_TIMEOUT:-60}
server_svc=${ROLLCALL_SERVICE:-rollcall}
if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
fi
say() { echo "roll.sh: $*" >&2; }

server=$("${compose[@]}" ps -q "$server_svc")
[ -n "$server" ] || {
    say "no running $server_svc container in compose project" \
        "${COMPOSE_PROJECT_NAME:-docker (the default, named after this directory)}: start the stack" \
        "first, or, if it runs under another name (-p NAME) or other files (-f FILE), give" \
        "roll.sh the same as COMPOSE_PROJECT_NAME=NAME / COMPOSE_FILE=FILE:FILE"
    exit 1
}
project=$(docker inspect -f '{{index .Config.Labels "com.docker.compose.project"}}' "$server")
running() {
    docker ps -q --no-trunc --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$svc" | sort
}
# Stopped replicas (a killed one, say) would be started again instead of new ones: remove them.
"${compose[@]}" rm -f "$svc" >/dev/null 2>&1 || true
mapfile -t old < <(running)
[ ${#old[@]} -gt 0 ] || { say "no running $svc container"; exit 1; }
n=${#old[@]}
say "replacing ${n} ${svc} container(s), one at a time"

for c in "${old[@]}"; do
    before=$(running)
    "${compose[@]}" up -d --no-deps --no-recreate --scale "$svc=$((n + 1))" "$svc" >/dev/null 2>&1 || {
        say "compose could not start a new $svc container"; exit 1; }
    new=$(comm -13 <(echo "$before") <(running) | head -n1)
    [ -n "$new" ] || { say "no new $svc container appeared"; exit 1; }
    node=$(docker inspect -f '{{.Config.Hostname}}' "$new" | cut -d. -f1 | tr 'A-Z' 'a-z')
    role=$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$new" |
        sed -n 's/^ROLLCALL_ROLE=//p' | tail -n1)
    role=${role:-$svc}
    say "started ${new:0:12} (node $node); waiting for it in role $role"
    deadline=$((SECONDS + timeout))
    until docker exec "$server" rollcall check \
        "http://127.0.0.1:8053/v1/roles/$role/nodes/$node" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            say "${new:0:12} did not register within ${timeout}s; leaving ${c:0:12} running"
            exit 1
        fi
        sleep 0.2
    done
    sleep "$settle"
    say "registered; stopping ${c:0:12}"
    docker stop "$c" >/dev/null
    docker rm "$c" >/dev/null
done
say "done: $(running | wc -l) ${svc} container(s), all new"
