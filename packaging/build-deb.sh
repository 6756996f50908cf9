#!/usr/bin/env bash
# Builds the Debian package of the daemon: target/debian/vhost-appliance_VERSION-1_amd64.deb
# (path printed as the last line of stdout) and its debug symbols, vhost-appliance-dbgsym_*.ddeb.
#
#   packaging/build-deb.sh                  release build, man pages, cargo deb
#   packaging/build-deb.sh --install-tool   only make sure cargo-deb is there (install-deps.sh)
#
# cargo-deb is installed once with `cargo install --locked` into
# $VHOST_APPLIANCE_CACHE/cargo-deb-VERSION (default /var/cache/vhost-appliance; ~2 min on
# 2 cores), outside the checkout. The package's contents are listed in appliance/Cargo.toml
# ([package.metadata.deb]); the unit and tmpfiles.d entry are the files next to this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
log() { echo "build-deb: $*" >&2; }

CARGO_DEB_VERSION=3.8.0
cache="${VHOST_APPLIANCE_CACHE:-/var/cache/vhost-appliance}"
tool_root="$cache/cargo-deb-$CARGO_DEB_VERSION"

ensure_cargo_deb() {
    if [ -x "$tool_root/bin/cargo-deb" ]; then
        log "cargo-deb $CARGO_DEB_VERSION present ($tool_root)"
        return 0
    fi
    log "building cargo-deb $CARGO_DEB_VERSION (cargo install, once)"
    local tmp
    tmp="$(mktemp -d)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --root "$tmp" -q >&2
    mkdir -p "$cache"
    rm -rf "$tool_root"
    mv "$tmp" "$tool_root"
    chmod 0755 "$tool_root"
}

ensure_cargo_deb
if [ "${1:-}" = "--install-tool" ]; then
    exit 0
fi
[ "$#" -eq 0 ] || { echo "usage: build-deb.sh [--install-tool]" >&2; exit 2; }

target="${CARGO_TARGET_DIR:-$repo/target}"
cd "$repo"
log "cargo build --release (vhost-appliance)"
cargo build --release --locked --quiet -p appliance --bin vhost-appliance >&2
log "man pages (vhost-appliance generate-man)"
rm -rf "$target/release/man"
"$target/release/vhost-appliance" generate-man "$target/release/man" >&2
gzip -9n "$target"/release/man/*.8
log "cargo deb"
rm -f "$target"/debian/vhost-appliance_*.deb "$target"/debian/vhost-appliance-dbgsym_*.ddeb
# --dbgsym: the binary stripped as Debian policy wants, its debug info (the release profile
# keeps some for profiling) in vhost-appliance-dbgsym_*.ddeb next to it.
PATH="$tool_root/bin:$PATH" cargo deb --no-build --locked --dbgsym -p appliance >&2
deb="$(ls "$target"/debian/vhost-appliance_*.deb)"
log "built $deb"
echo "$deb"
