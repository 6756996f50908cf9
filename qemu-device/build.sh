#!/usr/bin/env bash
# Builds qemu-system-x86_64 with the virtio-vhost-user-pci device, from Debian's QEMU
# 10.0.2 source (the bookworm-backports orig tarball) plus the files in this folder.
#
# The result is cached under $VHOST_APPLIANCE_CACHE (default /var/cache/vhost-appliance)
# keyed by the hash of this script and the device sources, so CI rebuilds only when they
# change. A full build takes about 5-6 minutes on 2 cores; a cache hit is instant.
# Prints the path of the built qemu-system-x86_64 as the last line of stdout.
# Stock QEMU (Debian's package) stays the consumer side.
#
# `build.sh --asan` builds the variant the device fuzzer runs (tests/scripts/qemu-fuzz.sh):
# AddressSanitizer and UndefinedBehaviorSanitizer, -O0 with QEMU's debug checks, no TCG, and
# only the devices q35 itself selects plus virtio-pci and this device. It can run guests only
# under `-accel qtest` (or KVM); cached separately, as qemu-asan-<key>. About 6 minutes cold.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${VHOST_APPLIANCE_CACHE:-/var/cache/vhost-appliance}"
variant=vvu
case "${1:-}" in
    "") ;;
    --asan) variant=asan ;;
    *) echo "usage: $0 [--asan]" >&2; exit 2 ;;
esac
QEMU_VERSION=10.0.2
TARBALL="qemu_${QEMU_VERSION}+ds.orig.tar.xz"
log() { echo "qemu-device: $*" >&2; }

. "$here/../tests/scripts/debian.sh"

key="$( (echo "$variant"; cat "$0"; find "$here/hw" "$here/include" "$here/patches" -type f | sort | xargs cat) | sha256sum | cut -c1-16)"
out="$cache/qemu-$variant-$key"
if [ -x "$out/qemu-system-x86_64" ]; then
    log "cached: $out"
    echo "$out/qemu-system-x86_64"
    exit 0
fi

# Build dependencies.
ensure_debs build-essential ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev \
    liburing-dev libcap-ng-dev libslirp-dev flex bison python3-venv xz-utils
python3 -c 'import mesonbuild' 2>/dev/null && python3 -c 'import pycotap' 2>/dev/null ||
    pip install -q meson pycotap >&2

# Source: the orig tarball of Debian's qemu in bookworm-backports (the .dsc may 404).
src_dir="$cache/qemu-src"
$SUDO mkdir -p "$src_dir"
if [ ! -f "$src_dir/$TARBALL" ]; then
    ensure_backports_sources || true
    $SUDO apt-get update -q >&2
    log "downloading the QEMU source"
    (cd "$src_dir" && apt-get source --download-only -t bookworm-backports qemu >&2 || true)
    [ -f "$src_dir/$TARBALL" ] || { log "could not download $TARBALL"; exit 1; }
fi

work="$cache/qemu-build-$key"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
log "unpacking"
tar -C "$work" -xf "$src_dir/$TARBALL"
tree="$work/qemu-$QEMU_VERSION"

log "adding the virtio-vhost-user device"
cp "$here/hw/virtio/virtio-vhost-user.c" "$here/hw/virtio/virtio-vhost-user-pci.c" "$tree/hw/virtio/"
cp "$here/include/hw/virtio/virtio-vhost-user.h" "$tree/include/hw/virtio/"
for p in "$here"/patches/*.patch; do
    patch -d "$tree" -p1 --forward --quiet < "$p"
done
# Debian removed the EDK2 firmware blobs from the tarball: do not try to unpack them.
sed -i 's/^    unpack_edk2_blobs = bzip2.found()/    unpack_edk2_blobs = false/' "$tree/meson.build"

log "configuring ($variant)"
mkdir -p "$tree/build"
# --prefix=/usr: firmware (SeaBIOS, option ROMs) comes from Debian's qemu-system-data.
if [ "$variant" = asan ]; then
    # What `-M q35 -accel qtest -device virtio-vhost-user-pci` needs, and nothing else: a
    # third of the normal build's objects, each slower to compile under the sanitizers.
    printf '%s\n' CONFIG_Q35=y CONFIG_VIRTIO_PCI=y CONFIG_VIRTIO_VHOST_USER=y \
        > "$tree/configs/devices/x86_64-softmmu/vvu-fuzz.mak"
    (cd "$tree/build" && ../configure --prefix=/usr --target-list=x86_64-softmmu \
        --without-default-features --without-default-devices --with-devices-x86_64=vvu-fuzz \
        --disable-docs --disable-install-blobs --disable-tcg --enable-kvm --enable-vhost-user \
        --enable-debug --enable-asan --enable-ubsan >&2)
else
    (cd "$tree/build" && ../configure --prefix=/usr --target-list=x86_64-softmmu \
        --without-default-features --disable-docs --disable-install-blobs \
        --enable-kvm --enable-vhost-user --enable-vhost-kernel --enable-linux-io-uring \
        --enable-fdt=system --enable-tcg --enable-slirp >&2)
fi
log "building (this takes several minutes)"
start=$(date +%s)
ninja -C "$tree/build" qemu-system-x86_64 >&2
log "built in $(( $(date +%s) - start ))s"

tmp_out="$(mktemp -d "$cache/.qemu-$variant-XXXXXX")"
cp "$tree/build/qemu-system-x86_64" "$tmp_out/"
rm -rf "$out"
mv "$tmp_out" "$out"
chmod 0755 "$out"
# Keep the three newest builds (older device sources are not coming back).
ls -dt "$cache/qemu-$variant-"* 2>/dev/null | tail -n +4 | while read -r old; do rm -rf "$old"; done
echo "$out/qemu-system-x86_64"
