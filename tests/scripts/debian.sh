# shellcheck shell=bash
# Shared by the project's set-up scripts (sourced, not run): installing Debian packages
# and adding bookworm-backports, where QEMU 10.0 lives. Runs apt as root, or through sudo.

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "run as root (or install sudo)" >&2; exit 1; }
    SUDO=sudo
fi

# Adds bookworm-backports (deb and deb-src) to apt's sources unless it is there.
ensure_backports_sources() {
    local file=/etc/apt/sources.list.d/bookworm-backports.sources
    if grep -rqs 'deb-src' "$file"; then
        return 1
    fi
    echo "adding bookworm-backports to $file" >&2
    $SUDO tee "$file" >/dev/null <<'SOURCES'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
}

# Installs the packages of "$@" that are missing; APT_SUITE (if set) selects a suite,
# APT_NO_RECOMMENDS=1 leaves recommended packages out.
ensure_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    echo "installing ${missing[*]}" >&2
    $SUDO apt-get update -q >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        ${APT_SUITE:+-t "$APT_SUITE"} ${APT_NO_RECOMMENDS:+--no-install-recommends} \
        "${missing[@]}" >&2
}
