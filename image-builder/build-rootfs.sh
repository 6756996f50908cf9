#!/usr/bin/env bash
# Builds a Debian bookworm root file system that boots under systemd-nspawn with systemd as
# its init, for the packaging tests (tests/tests/packaging.rs).
#
#   build-rootfs.sh base      debootstrap minbase + systemd, dbus; apt's package lists
#                             fetched (a clean bookworm where `apt-get -f install` works)
#   build-rootfs.sh libvirt   base + libvirt-daemon-system and qemu-system-x86 (bookworm's:
#                             libvirt 9.0, QEMU 7.2) without recommends, and procps (what
#                             the project's package needs beyond minbase: its tests boot
#                             this one without network)
#
# Packages come from deb.debian.org. The result is cached by content hash (this script) under
# $VHOST_APPLIANCE_CACHE (default /var/cache/vhost-appliance) as rootfs-KIND-HASH; a build
# takes ~3 min (base) and ~2 min more (libvirt), a cache hit well under a second. Tests never
# write to it: they boot it with --volatile=overlay. Prints the directory as the last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kind="${1:-base}"
log() { echo "build-rootfs: $*" >&2; }
case "$kind" in
    base|libvirt) ;;
    *) echo "usage: build-rootfs.sh base | libvirt" >&2; exit 2 ;;
esac
MIRROR=http://deb.debian.org/debian
cache="${VHOST_APPLIANCE_CACHE:-/var/cache/vhost-appliance}"
[ "$(id -u)" -eq 0 ] || { echo "build-rootfs: run as root (debootstrap, systemd-nspawn)" >&2; exit 1; }
command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null || {
    echo "build-rootfs: needs debootstrap and systemd-container (tests/scripts/install-deps.sh)" >&2
    exit 1
}

key="$(sha256sum < "$0" | cut -c1-16)"
out="$cache/rootfs-$kind-$key"
if [ -f "$out/.complete" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
partial="$out.partial"
rm -rf "$partial"

# Runs a command in the tree (not booted): /proc, /dev, resolv.conf set up by nspawn.
in_tree() {
    systemd-nspawn -q --register=no --keep-unit --pipe -D "$partial" \
        env DEBIAN_FRONTEND=noninteractive "$@"
}

if [ "$kind" = base ]; then
    log "debootstrap bookworm (minbase + systemd, dbus) into $partial"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
        bookworm "$partial" "$MIRROR" >&2
    cat > "$partial/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
    # No login prompt on the container console; nothing waits for a network.
    in_tree systemctl mask console-getty.service systemd-networkd-wait-online.service >&2
    in_tree apt-get update -q >&2
    in_tree apt-get upgrade -y -q >&2
else
    base="$(bash "$here/build-rootfs.sh" base | tail -n 1)"
    log "copying $base, then libvirt-daemon-system and qemu-system-x86"
    cp -a "$base" "$partial"
    rm -f "$partial/.complete"
    in_tree apt-get update -q >&2
    in_tree apt-get install -y -q --no-install-recommends \
        libvirt-daemon-system libvirt-clients qemu-system-x86 procps >&2
fi
in_tree apt-get clean >&2
echo "$kind $key" > "$partial/.complete"
rm -rf "$out"
mv "$partial" "$out"
log "built $out ($(du -sh "$out" | cut -f1))"
# Keep the two newest of this kind.
ls -dt "$cache/rootfs-$kind"-*/.complete 2>/dev/null | tail -n +3 | while read -r old; do
    rm -rf "$(dirname "$old")"
done
echo "$out"
