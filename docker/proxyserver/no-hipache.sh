#!/usr/bin/env bash
# What port 80 answers when no hipache runs in the proxyserver (the image's `sync` stage, or
# HIPACHE_CMD empty): one HTTP request on stdin/stdout (start.sh runs it under
# `socat TCP-LISTEN:80,fork`), answered 503 with a page that says why and names the
# frontservers to ask directly (from the list hipache-sync keeps in redis).
set -u
# Read the request head first (closing with unread data would reset the connection).
while IFS= read -r -t 5 line; do
    line=${line%$'\r'}
    [ -z "$line" ] && break
done
first=${ROLLCALL_FRONTEND:-localhost}
first=${first%%,*}
backends=$(redis-cli -p "${REDIS_PORT:-6379}" lrange "frontend:$first" 1 -1 2>/dev/null | sed 's/^/  /')
body="503 Service Unavailable: no hipache in this proxyserver.

This image was built at its 'sync' stage (ROLLCALL_PROXY_STAGE=sync), or runs with HIPACHE_CMD
empty: redis and 'rollcall hipache-sync' run and keep frontend:$first up to date, but no proxy
listens behind this port. Build the 'hipache' stage for the real proxy (the default; see
docker/proxyserver/README.md: it needs the npm registry, or a tarball given with
HIPACHE_TARBALL), or ask a frontserver directly. The frontservers hipache would use now:
${backends:-  (none registered yet)}
"
printf 'HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "$(printf '%s' "$body" | wc -c)" "$body"
