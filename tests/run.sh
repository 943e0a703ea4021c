#!/usr/bin/env bash
# Runs every test of rollcall: unit, in-process integration, and system tests against real
# dig, nginx, redis-server, etcd and docker. Installs the system packages the tests need when they are
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
# The shipped systemd unit is checked with systemd-analyze.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# The container stack's system test (tests/docker.rs): Debian's docker daemon and compose 1.29,
# and debootstrap to seed the debian:12-slim base image when it cannot be pulled.
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
# --version carries the git revision (build.rs asks git; tests/cli.rs checks it).
command -v git >/dev/null 2>&1 || need+=(git)
# tests/openapi.rs: a real Prometheus discovers its targets through GET /v1/sd/prometheus (the
# test starts its own; the package's service is not needed).
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# schemathesis goes into a virtualenv of its own (below), so the system Python is untouched:
# Debian's python3 needs python3-venv for that (a fresh Debian 12 has neither venv nor pip).
venv=target/schemathesis-venv
if ! command -v st >/dev/null 2>&1 && [ ! -x "$venv/bin/st" ]; then
    /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
fi

if [ ${#need[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${need[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# schemathesis (PyPI) checks the API against its OpenAPI document (tests/openapi.rs runs `st`
# from PATH). One already on PATH is used; else it is installed into $venv (kept for the next
# run; `rm -rf target/schemathesis-venv` removes it).
if ! command -v st >/dev/null 2>&1; then
    if [ ! -x "$venv/bin/st" ]; then
        echo "tests/run.sh: installing schemathesis into $venv (pip, in a virtualenv)" >&2
        rm -rf "$venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet schemathesis
    fi
    PATH="$PWD/$venv/bin:$PATH"
    export PATH
fi

# System tests find nginx in /usr/sbin.
export PATH="$PATH:/usr/sbin:/sbin"

# A docker daemon for tests/docker.rs: the one running, else one started here and stopped at
# the end (its log: $TMPDIR/rollcall-tests-dockerd.log).
dockerd_pid=""
if ! docker info >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log="${TMPDIR:-/tmp}/rollcall-tests-dockerd.log"
    echo "tests/run.sh: starting dockerd (log: $log)" >&2
    $sudo dockerd >"$log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 300); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 0.1
    done
    docker info >/dev/null 2>&1 || { tail -20 "$log" >&2; echo "tests/run.sh: dockerd did not start" >&2; exit 1; }
fi
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}
trap stop_dockerd EXIT

# The system tests start the real binary; build it once, then run everything. (tests/docker.rs
# builds the release binary the images ship.) --no-fail-fast: one failing test binary does not
# hide the results of the others.
cargo build --locked --bins
cargo test --locked --all-targets --no-fail-fast "$@"
