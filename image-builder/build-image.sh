#!/usr/bin/env bash
# Builds a guest image: Debian's cloud kernel plus a busybox initramfs.
#
#   build-image.sh consumer                 the consumer test VM: fio, sg3-utils, e2fsprogs,
#                                           util-linux, iscsi-test-cu, storage modules
#   build-image.sh appliance [PROGRAM...]   the appliance VM: the same tools plus the VFIO and
#                                           ext4 modules, the appliance init (appliance/init:
#                                           config drive, daemon start) and PROGRAMs in
#                                           /usr/bin; without PROGRAMs, builds vhost-appliance
#                                           (cargo, release) and takes that
#
# The result is cached by content hash (this script, the init, the kernel and tool package
# versions) under $VHOST_APPLIANCE_CACHE (default /var/cache/vhost-appliance), outside the
# checkout; a cache hit takes well under a second. Prints the image directory (holding
# vmlinuz, initrd.img, kernel-release) as the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kind="${1:-consumer}"
shift || true
extra_programs=("$@")
log() { echo "build-image: $*" >&2; }
case "$kind" in
    consumer)
        [ "${#extra_programs[@]}" -eq 0 ] || { echo "build-image: consumer takes no programs" >&2; exit 2; }
        init="$here/consumer/init" ;;
    appliance)
        init="$here/appliance/init"
        if [ "${#extra_programs[@]}" -eq 0 ]; then
            log "building vhost-appliance (cargo build --release)"
            (cd "$here/.." && cargo build --release --quiet -p appliance --bin vhost-appliance) >&2
            extra_programs=("$here/../target/release/vhost-appliance")
        fi ;;
    *) echo "usage: build-image.sh consumer | appliance [PROGRAM...]" >&2; exit 2 ;;
esac
cache="${VHOST_APPLIANCE_CACHE:-/var/cache/vhost-appliance}"

. "$here/../tests/scripts/debian.sh"
tools=(busybox-static fio sg3-utils libiscsi-bin e2fsprogs util-linux kmod cpio)
ensure_debs "${tools[@]}"

kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)"
if [ -z "$kernel_pkg" ]; then
    $SUDO apt-get update -q >&2
    kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)"
fi
[ -n "$kernel_pkg" ] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
kernel_ver="$(apt-cache policy "$kernel_pkg" | sed -n 's/ *Candidate: //p')"

key="$( {
    cat "$0" "$init"
    echo "$kernel_pkg $kernel_ver"
    dpkg-query -W "${tools[@]}"
    echo "$kind"
    # Name and content: the image installs each program under its file name.
    for p in "${extra_programs[@]}"; do basename "$p"; sha256sum < "$p"; done
} | sha256sum | cut -c1-16)"
out="$cache/$kind-$key"
if [ -f "$out/initrd.img" ] && [ -f "$out/vmlinuz" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

log "building $out (kernel $kernel_pkg $kernel_ver)"
log "step 1/4: kernel package"
$SUDO mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "$kernel_pkg=$kernel_ver" >&2 2>/dev/null || apt-get download "$kernel_pkg" >&2)
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
kver="$(ls "$work/kernel/lib/modules")"
depmod -b "$work/kernel" "$kver"   # the package ships no modules.dep

log "step 2/4: programs and their libraries"
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,tmp,mnt,run}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$init" "$root/init"

# Binaries and every shared library they load (ldd), at the same paths.
binaries=(/usr/bin/fio /usr/bin/iscsi-test-cu /sbin/mkfs.ext4 /sbin/e2fsck /sbin/fsck.ext4
          /sbin/blkdiscard /usr/bin/lsblk /sbin/blockdev /sbin/fstrim)
for b in /usr/bin/sg_*; do binaries+=("$b"); done
for p in "${extra_programs[@]}"; do
    [ -x "$p" ] || { log "$p is not an executable"; exit 1; }
    install -D -m 0755 "$p" "$root/usr/bin/$(basename "$p")"
    ldd "$p" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
done
for b in "${binaries[@]}"; do
    [ -e "$b" ] || { log "missing $b"; exit 1; }
    mkdir -p "$root$(dirname "$b")"
    cp -L "$b" "$root$b"
    ldd "$b" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
done

log "step 3/4: kernel modules"
# The storage modules with their dependencies; depmod builds a modules.dep for the subset.
moddir="$work/kernel/lib/modules/$kver"
wanted=(virtio_pci virtio_blk virtio_scsi sd_mod sg)
[ "$kind" = appliance ] && wanted+=(vfio_pci vfio_iommu_type1 ext4 virtio_net)
declare -A seen=()
add_module() {
    local name="$1" path dep
    path="$(modinfo -b "$work/kernel" -k "$kver" -n "$name" 2>/dev/null)" || return 0
    case "$path" in /*) ;; *) return 0 ;; esac   # built in
    [ -n "${seen[$path]:-}" ] && return 0
    seen[$path]=1
    mkdir -p "$root$(dirname "${path#"$work/kernel"}")"
    cp "$path" "$root${path#"$work/kernel"}"
    for dep in $(modinfo -b "$work/kernel" -k "$kver" -F depends "$name" | tr ',' ' '); do
        add_module "$dep"
    done
}
for m in "${wanted[@]}"; do add_module "$m"; done
cp "$moddir"/modules.builtin* "$moddir"/modules.order "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"

log "step 4/4: initramfs"
tmp_out="$(mktemp -d "$cache/.$kind-XXXXXX")"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$tmp_out/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$tmp_out/vmlinuz"
echo "$kver" > "$tmp_out/kernel-release"
rm -rf "$out"
mv "$tmp_out" "$out"
chmod 0755 "$out"
log "built $out ($(du -sh "$out/initrd.img" | cut -f1) initramfs)"
# Every daemon or test-program change makes a new image: keep the six newest of this kind.
ls -dt "$cache/$kind"-* 2>/dev/null | tail -n +7 | while read -r old; do rm -rf "$old"; done
echo "$out"
