#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian bookworm machine, idempotently:
#   - bookworm-backports in apt sources (QEMU 10.0 lives there),
#   - qemu-utils 10.0 (qemu-storage-daemon: the reference backend of differential tests),
#   - qemu-system-x86 10.0 (the consumer VMs of the guest tests).
# The consumer image's own packages are installed by image-builder/build-consumer.sh.
# Runs as root, or through sudo when available. Does nothing when all is present.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: run as root (or install sudo)" >&2; exit 1; }
    SUDO=sudo
fi

BACKPORTS_SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources

add_backports() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    echo "install-deps: adding bookworm-backports to $BACKPORTS_SOURCES"
    $SUDO tee "$BACKPORTS_SOURCES" >/dev/null <<'SOURCES'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
}

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
add_backports
echo "install-deps: installing ${missing[*]} from bookworm-backports"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports "${missing[@]}"
