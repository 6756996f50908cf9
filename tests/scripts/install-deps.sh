#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian bookworm machine, idempotently:
#   - bookworm-backports in apt sources (QEMU 10.0 lives there),
#   - qemu-utils 10.0 (qemu-storage-daemon: the reference backend of differential tests),
#   - qemu-system-x86 10.0 (the consumer VMs of the guest tests),
#   - promtool (bookworm's `prometheus` package, 2.42) for the metrics tests: the .deb is
#     downloaded and unpacked into /var/cache/vhost-appliance/prometheus-VERSION, never
#     installed (no service, no web UI assets in /usr),
#   - shellcheck, the lint gate for the project's shell scripts,
#   - Ceph's ceph-mon and ceph-osd (bookworm, 16.2 Pacific; ~51 MB download, no services
#     started) for the throwaway one-node cluster of the RBD tests (ceph-cluster.sh), and
#     qemu-block-extra (QEMU's rbd driver) for their differential against
#     qemu-storage-daemon (librbd1/librados2 come with them),
#   - fio (the benchmark's limit rows) and vhost-device-scsi 0.1.0 (rust-vmm; the
#     benchmark's SCSI peer), built once with `cargo install` into
#     /var/cache/vhost-appliance/vhost-device-scsi-0.1.0 (~3 min on 2 cores),
#   - the packaging tests' tools: systemd-container (systemd-nspawn) and debootstrap for the
#     bookworm containers (image-builder/build-rootfs.sh), and cargo-deb, built once with
#     `cargo install` into /var/cache/vhost-appliance/cargo-deb-VERSION by
#     packaging/build-deb.sh --install-tool (~3 min on 2 cores).
# The consumer image's own packages are installed by image-builder/build-image.sh.
# Runs as root, or through sudo when available. Does nothing when all is present.
set -euo pipefail

. "$(dirname "$0")/debian.sh"

qemu_major() {
    "$1" --version 2>/dev/null | sed -n '1s/.* version \([0-9]*\)\..*/\1/p'
}

# promtool: `dpkg -x` of the package into a versioned cache folder, once.
CACHE_DIR=/var/cache/vhost-appliance
PROMETHEUS_CACHE=$CACHE_DIR
ensure_promtool() {
    local found
    found=$(ls -d "$PROMETHEUS_CACHE"/prometheus-*/usr/bin/promtool 2>/dev/null | tail -n 1 || true)
    if [ -n "$found" ] && "$found" --version >/dev/null 2>&1; then
        echo "install-deps: promtool present ($found)"
        return 0
    fi
    local version
    version=$(apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: //p')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        $SUDO apt-get update -q
        version=$(apt-cache policy prometheus | sed -n 's/^ *Candidate: //p')
    fi
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        echo "install-deps: no prometheus package in the apt sources" >&2
        return 1
    fi
    local tmp dest="$PROMETHEUS_CACHE/prometheus-$version"
    tmp=$(mktemp -d)
    # apt fetches as _apt when it can write there (no "unsandboxed" warning).
    chmod 0755 "$tmp"
    $SUDO chown _apt "$tmp" 2>/dev/null || true
    if ! (cd "$tmp" && $SUDO apt-get download -q "prometheus=$version"); then
        # Package lists older than the mirror: refresh them and ask again.
        $SUDO apt-get update -q
        version=$(apt-cache policy prometheus | sed -n 's/^ *Candidate: //p')
        dest="$PROMETHEUS_CACHE/prometheus-$version"
        (cd "$tmp" && $SUDO apt-get download -q "prometheus=$version")
    fi
    $SUDO mkdir -p "$PROMETHEUS_CACHE"
    $SUDO rm -rf "$dest.partial"
    $SUDO dpkg -x "$tmp"/prometheus_*.deb "$dest.partial"
    $SUDO rm -rf "$dest"
    $SUDO mv "$dest.partial" "$dest"
    $SUDO rm -rf "$tmp"
    "$dest/usr/bin/promtool" --version
}
ensure_promtool
ensure_debs shellcheck fio
APT_NO_RECOMMENDS=1 ensure_debs systemd-container debootstrap
bash "$(dirname "$0")/../../packaging/build-deb.sh" --install-tool
APT_NO_RECOMMENDS=1 ensure_debs ceph-mon ceph-osd

# vhost-device-scsi: not packaged by Debian; crates.io has it.
VDS_VERSION=0.1.0
ensure_vhost_device_scsi() {
    local root="$CACHE_DIR/vhost-device-scsi-$VDS_VERSION"
    if [ -x "$root/bin/vhost-device-scsi" ]; then
        echo "install-deps: vhost-device-scsi present ($root)"
        return 0
    fi
    echo "install-deps: building vhost-device-scsi $VDS_VERSION (cargo install, once)"
    local tmp
    tmp=$(mktemp -d)
    cargo install vhost-device-scsi --version "$VDS_VERSION" --locked --root "$tmp" -q
    $SUDO mkdir -p "$CACHE_DIR"
    $SUDO rm -rf "$root"
    $SUDO mv "$tmp" "$root"
    $SUDO chmod 0755 "$root"
}
ensure_vhost_device_scsi

missing=()
if [ "$(qemu_major qemu-storage-daemon)" != "10" ]; then
    missing+=(qemu-utils)
fi
if [ "$(qemu_major qemu-system-x86_64)" != "10" ]; then
    missing+=(qemu-system-x86)
fi
if [ ! -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ]; then
    missing+=(qemu-block-extra)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: everything present"
    exit 0
fi
ensure_backports_sources || true
# Installed (possibly older) versions are upgraded from backports.
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports "${missing[@]}"
