#!/usr/bin/env bash
# Makes a local `debian:12-slim` image with debootstrap, for machines that cannot pull from a
# registry (the images under docker/ start FROM debian:12-slim). Where `docker pull
# debian:12-slim` works, use that instead: this is only the fallback, and the tests' way.
#
#   docker/seed-debian.sh [TAG]          (default TAG: debian:12-slim; needs root)
#
# Does nothing when TAG already exists. Needs debootstrap (apt-get install debootstrap) and a
# Debian mirror (MIRROR, default http://deb.debian.org/debian; SECURITY_MIRROR). About 50-80 s
# and a 74 MB image here (47 s and 80 s measured on the 2-core VM).
set -euo pipefail

tag=${1:-debian:12-slim}
mirror=${MIRROR:-http://deb.debian.org/debian}
security=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "seed-debian.sh: $tag exists; nothing to do" >&2
    exit 0
fi
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || {
    echo "seed-debian.sh: debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
}

root=$(mktemp -d /tmp/seed-debian.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "seed-debian.sh: debootstrap bookworm (minbase) from $mirror" >&2
PATH="$PATH:/usr/sbin:/sbin" debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    echo "seed-debian.sh: debootstrap failed (full log: $root.log)" >&2
    exit 1
}
rm -f "$root.log"

# What the official slim image leaves out: docs, man pages, apt's caches and lists. Keep dpkg's
# own exclusions for later installs, as debian:*-slim does.
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
CFG
echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
echo "deb $mirror bookworm-updates main" >>"$root/etc/apt/sources.list"
echo "deb $security bookworm-security main" >>"$root/etc/apt/sources.list"

tar -C "$root" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$tag" >/dev/null
echo "seed-debian.sh: made $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)" >&2
