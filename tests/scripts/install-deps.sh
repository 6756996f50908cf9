#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian bookworm machine, idempotently:
#   - bookworm-backports in apt sources (QEMU 10.0 lives there),
#   - qemu-utils 10.0 (qemu-storage-daemon: the reference backend of differential tests),
#   - qemu-system-x86 10.0 (the consumer VMs of the guest tests).
# The consumer image's own packages are installed by image-builder/build-image.sh.
# Runs as root, or through sudo when available. Does nothing when all is present.
set -euo pipefail

. "$(dirname "$0")/debian.sh"

qemu_major() {
    "$1" --version 2>/dev/null | sed -n '1s/.* version \([0-9]*\)\..*/\1/p'
}

missing=()
if [ "$(qemu_major qemu-storage-daemon)" != "10" ]; then
    missing+=(qemu-utils)
fi
if [ "$(qemu_major qemu-system-x86_64)" != "10" ]; then
    missing+=(qemu-system-x86)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: everything present"
    exit 0
fi
ensure_backports_sources || true
# Installed (possibly older) versions are upgraded from backports.
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports "${missing[@]}"
