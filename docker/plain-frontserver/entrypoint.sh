#!/bin/sh
# Entry point of the plain frontserver image: writes /etc/nginx/nginx.conf from nginx.conf.in
# with the rollcall server's DNS address (RESOLVER, IP:PORT), checks it, runs nginx, and on
# SIGTERM/SIGINT keeps it serving DRAIN seconds before a graceful stop (SIGQUIT): `rollcall
# docker` deregisters the container when docker sends the signal, and the requests already on
# their way still land.
set -eu
if [ -z "${RESOLVER:-}" ]; then
    echo "frontserver-entrypoint: set RESOLVER to the rollcall server's DNS address," \
        "an IP address and port (e.g. -e RESOLVER=172.30.53.53:1053)" >&2
    exit 2
fi
sed "s/127\.0\.0\.1:1053/$RESOLVER/g" /etc/nginx/nginx.conf.in >/etc/nginx/nginx.conf
nginx -t -q || {
    echo "frontserver-entrypoint: nginx rejects its configuration (RESOLVER=$RESOLVER)" >&2
    exit 2
}
nginx -g 'daemon off;' &
pid=$!
stop() {
    sleep "${DRAIN:-2}"
    kill -QUIT "$pid" 2>/dev/null || true
}
trap stop TERM INT
# The first wait ends when a trapped signal arrives (or nginx exits); the second one waits
# for nginx's graceful stop.
wait "$pid" || true
wait "$pid" 2>/dev/null || true
