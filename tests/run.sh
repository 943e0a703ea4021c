#!/usr/bin/env bash
# Runs every test of rollcall: unit, in-process integration, and system tests against real
# dig, nginx, redis-server and etcd. Installs the system packages the tests need when they are
# missing (apt-get, as root or through sudo). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v nsd >/dev/null 2>&1 || [ -x /usr/sbin/nsd ] || need+=(nsd)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
/usr/bin/python3 -c 'import bottle' >/dev/null 2>&1 || need+=(python3-bottle)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
# etcd mode's tests run a real 3-member cluster (Debian 12: etcd 3.4.23) and use etcdctl.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
# Forwarding's tests use dnsmasq as a real upstream (the binary only, no system service).
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)

if [ ${#need[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${need[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# schemathesis (PyPI) checks the API against its OpenAPI document.
if ! command -v st >/dev/null 2>&1; then
    echo "tests/run.sh: installing schemathesis (pip)" >&2
    python3 -m pip install --quiet schemathesis 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages schemathesis
fi

# System tests find nginx in /usr/sbin.
export PATH="$PATH:/usr/sbin:/sbin"
# The system tests start the real binary; build it once, then run everything.
cargo build --locked --bins
exec cargo test --locked --all-targets "$@"
