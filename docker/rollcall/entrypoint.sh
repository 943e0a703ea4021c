#!/bin/sh
# Entry point of the rollcall server image: fills in the image's zone, then execs
# `rollcall "$@"` (default: serve), which stays PID 1's only process.
#
# Unless zone files of your own are in /etc/rollcall/zones (mounted there), it writes
# /etc/rollcall/zones/cluster.zone from /usr/share/rollcall/zones/cluster.zone, at every start
# (a restarted container may have a new address), with:
#   ns.cluster           this container's address (ROLLCALL_NS_ADDR, default: `hostname -i`)
#   proxyserver.cluster  ROLLCALL_PROXY_ADDR (no record when unset)
set -eu
zones=${ROLLCALL_ZONES:-/etc/rollcall/zones}
marker="; written by rollcall-entrypoint"
ours() { [ ! -e "$zones/cluster.zone" ] || head -n1 "$zones/cluster.zone" | grep -qxF "$marker"; }
if [ "${1:-serve}" = serve ] && [ -d "$zones" ] && [ -w "$zones" ] && ours &&
    [ "$(ls "$zones" | grep -c '\.zone$' || true)" -le 1 ]; then
    ns=${ROLLCALL_NS_ADDR:-$(hostname -i | cut -d' ' -f1)}
    proxy=${ROLLCALL_PROXY_ADDR:-}
    {
        echo "$marker"
        if [ -n "$proxy" ]; then
            sed -e "s/@NS_ADDR@/$ns/" -e "s/@PROXY_ADDR@/$proxy/" /usr/share/rollcall/zones/cluster.zone
        else
            sed -e "s/@NS_ADDR@/$ns/" -e '/@PROXY_ADDR@/d' /usr/share/rollcall/zones/cluster.zone
        fi
    } >"$zones/cluster.zone.tmp"
    mv "$zones/cluster.zone.tmp" "$zones/cluster.zone"
    echo "rollcall-entrypoint: wrote $zones/cluster.zone (ns.cluster=$ns${proxy:+, proxyserver.cluster=$proxy})" >&2
fi
exec rollcall "$@"
