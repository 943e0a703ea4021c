#!/bin/sh
# Entry point of the frontserver image: writes /etc/nginx/nginx.conf from nginx.conf.in with
# the rollcall server's DNS address (ROLLCALL_RESOLVER, IP:PORT), checks it with `nginx -t`, then
# runs nginx in the foreground under the node agent (`rollcall register`, configured by the
# ROLLCALL_* environment).
set -eu
if [ -z "${ROLLCALL_RESOLVER:-}" ]; then
    echo "frontserver-entrypoint: set ROLLCALL_RESOLVER to the rollcall server's DNS address," \
        "an IP address and port (e.g. -e ROLLCALL_RESOLVER=172.30.53.53:1053)" >&2
    exit 2
fi
sed "s/127\.0\.0\.1:1053/$ROLLCALL_RESOLVER/g" /etc/nginx/nginx.conf.in >/etc/nginx/nginx.conf
nginx -t -q || {
    echo "frontserver-entrypoint: nginx rejects its configuration (ROLLCALL_RESOLVER=$ROLLCALL_RESOLVER)" >&2
    exit 2
}
exec rollcall register "$@" -- nginx -g 'daemon off;'
