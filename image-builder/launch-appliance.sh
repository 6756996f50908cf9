#!/usr/bin/env bash
# Starts the appliance VM: the patched QEMU (qemu-device/build.sh), an intel-iommu, the
# appliance image (build-image.sh appliance), the config drive, and one
# virtio-vhost-user-pci device per consumer socket.
#
#   launch-appliance.sh --config-drive IMG --vvu SOCKET[,uuid=UUID] [--vvu ...] [options]
#   launch-appliance.sh make-config-drive DIR IMG [SIZE]
#
# make-config-drive copies DIR (exports.yaml and any backing images) into a new ext4 image
# of SIZE (default: DIR's apparent size + 1 GiB; images that `create:` makes inside the
# appliance VM need room there too).
# The i-th --vvu device sits at PCI address 0000:00:1<i>.0 in the appliance VM (0000:00:10.0,
# 0000:00:11.0, ...); an export names it there (`vvu: 0000:00:10.0`) or by its uuid. Each
# SOCKET is a listening unix socket a consumer QEMU connects its vhost-user-blk-pci or
# vhost-user-scsi-pci chardev to (add reconnect-ms=1000 on the consumer to ride out
# appliance restarts).
#
# Options:
#   --config-drive IMG       ext4 image holding exports.yaml and the backing images; the VM
#                            sees it as the virtio-blk disk with serial appliance-config
#                            (make one with make-config-drive)
#   --vvu SOCKET[,uuid=U]    add a virtio-vhost-user device serving SOCKET (any further
#                            PROP=VALUE after the socket goes to the device as well, e.g.
#                            the test hook x-recv-delay-ms=N)
#   --memory MIB             appliance VM RAM (default 1024)
#   --cpus N                 vCPUs (default 2)
#   --max-vhost-queues N     vrings per device (default 8; a scsi export uses num_queues+2)
#   --shm-size SIZE          shared-memory BAR per device; must cover the consumer's RAM
#                            (default 4G; all devices together must fit the 64-bit PCI hole)
#   --serial stdio|unix:PATH console and command channel (default stdio)
#   --qmp PATH               QMP monitor socket
#   --image DIR              appliance image (default: build-image.sh appliance)
#   --qemu PATH              patched qemu-system-x86_64 (default: qemu-device/build.sh)
#   --accel kvm|tcg          default: kvm where the CPU has vmx/svm and KVM is not PVM
#   --metrics-port PORT      forward 127.0.0.1:PORT on the host to port 9410 in the VM (the
#                            appliance's management network; set metrics.listen to
#                            0.0.0.0:9410 in exports.yaml)
#   --log-level LEVEL        the daemon's log level (default info)
#   --trace EVENTS           QEMU trace events to log to stderr, e.g. 'vvu_*' for what
#                            passes through the virtio-vhost-user devices (repeatable)
#   --dry-run                print the QEMU command line instead of running it
#
# Inside the VM the daemon starts on /config/exports.yaml and logs to
# /config/appliance.log; `appliance-stop` on the console stops it cleanly and powers off.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
die() { echo "launch-appliance: $*" >&2; exit 2; }

if [ "${1:-}" = make-config-drive ]; then
    [ $# -ge 3 ] || die "usage: launch-appliance.sh make-config-drive DIR IMG [SIZE]"
    dir="$2" img="$3" size="${4:-}"
    [ -f "$dir/exports.yaml" ] || die "$dir/exports.yaml does not exist"
    if [ -z "$size" ]; then
        # Room for the files (sparse files count at their full size) plus 1 GiB for the
        # images `create:` makes and the log; the image file itself stays sparse.
        used_kib="$(du -s --apparent-size -k "$dir" | cut -f1)"
        size="$(( used_kib / 1024 + 1024 ))M"
    fi
    mkfs.ext4 -q -F -L appliance-config -d "$dir" "$img" "$size"
    echo "launch-appliance: config drive $img ($size) from $dir" >&2
    exit 0
fi

config_drive="" memory=1024 cpus=2 max_queues=8 shm_size=4G serial=stdio qmp=""
image="" qemu="" accel="" dry_run=0 log_level=info metrics_port=""
vvus=() traces=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config-drive) config_drive="$2"; shift 2 ;;
        --vvu) vvus+=("$2"); shift 2 ;;
        --memory) memory="$2"; shift 2 ;;
        --cpus) cpus="$2"; shift 2 ;;
        --max-vhost-queues) max_queues="$2"; shift 2 ;;
        --shm-size) shm_size="$2"; shift 2 ;;
        --serial) serial="$2"; shift 2 ;;
        --qmp) qmp="$2"; shift 2 ;;
        --image) image="$2"; shift 2 ;;
        --qemu) qemu="$2"; shift 2 ;;
        --accel) accel="$2"; shift 2 ;;
        --log-level) log_level="$2"; shift 2 ;;
        --metrics-port) metrics_port="$2"; shift 2 ;;
        --trace) traces+=(-trace "$2"); shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$config_drive" ] || die "--config-drive IMG is required"
[ -f "$config_drive" ] || die "config drive $config_drive does not exist"
[ "${#vvus[@]}" -gt 0 ] || die "give at least one --vvu SOCKET"
[ "${#vvus[@]}" -le 16 ] || die "at most 16 --vvu devices"

[ -n "$qemu" ] || qemu="$(bash "$here/../qemu-device/build.sh" | tail -1)"
[ -n "$image" ] || image="$(bash "$here/build-image.sh" appliance | tail -1)"
if [ -z "$accel" ]; then
    accel=tcg
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ] && [ -w /dev/kvm ]; then
        accel=kvm
    fi
fi
echo "launch-appliance: accelerator $accel" >&2

machine="q35,accel=$accel"
cpu=max
if [ "$accel" = kvm ]; then
    # Interrupt remapping under KVM needs the split irqchip.
    machine="$machine,kernel-irqchip=split"
    cpu=host
fi
# The config drive holds the backing images: cache=none (O_DIRECT), so what the appliance
# guest wrote and flushed is in the host file when this QEMU dies, and nothing it did not
# flush is (a power cut of the appliance VM loses exactly what a real one would). A host
# file system without O_DIRECT (tmpfs) gets writeback caching instead.
drive_cache=none
if ! dd if="$config_drive" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then
    echo "launch-appliance: $config_drive does not support O_DIRECT; config drive cache=writeback" >&2
    drive_cache=writeback
fi
# no_timer_check: the kernel's boot-time check that the IO-APIC timer ticks runs a fixed
# busy loop; a vCPU slowed by a loaded host (TCG especially) misses it, and with interrupt
# remapping on the kernel then panics ("timer doesn't work through Interrupt-remapped
# IO-APIC") instead of falling back. QEMU's emulated timer works; the check only hurts.
# QEMU options are comma-separated lists: the commas are not array separators.
# shellcheck disable=SC2054
args=(-L /usr/share/seabios -L /usr/share/qemu
      -M "$machine" -cpu "$cpu" -smp "$cpus" -m "${memory}M"
      -device intel-iommu,intremap=on
      -kernel "$image/vmlinuz" -initrd "$image/initrd.img"
      -append "console=ttyS0 loglevel=4 panic=-1 intel_iommu=on no_timer_check appliance.log=$log_level"
      -display none -no-reboot -nodefaults -monitor none
      -drive "file=$config_drive,if=none,id=config,format=raw,cache=$drive_cache"
      -device virtio-blk-pci,drive=config,serial=appliance-config)
case "$serial" in
    stdio) args+=(-serial stdio) ;;
    unix:*) args+=(-chardev "socket,id=serial0,path=${serial#unix:},server=on,wait=off" -serial chardev:serial0) ;;
    *) die "--serial takes stdio or unix:PATH" ;;
esac
[ -z "$qmp" ] || args+=(-qmp "unix:$qmp,server=on,wait=off")
args+=("${traces[@]}")
if [ -n "$metrics_port" ]; then
    # restrict=on: the VM reaches nothing; only the forward reaches the VM.
    # shellcheck disable=SC2054
    args+=(-netdev "user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:$metrics_port-10.0.2.15:9410"
           -device virtio-net-pci,netdev=mgmt,romfile=)
    echo "launch-appliance: metrics at http://127.0.0.1:$metrics_port/ (port 9410 in the VM)" >&2
fi
i=0
for spec in "${vvus[@]}"; do
    socket="${spec%%,*}"
    extra=""
    [ "$socket" = "$spec" ] || extra=",${spec#*,}"
    slot="$(printf '0x%x' $((0x10 + i)))"
    args+=(-chardev "socket,id=vvu$i,path=$socket,server=on,wait=off"
           -device "virtio-vhost-user-pci,chardev=vvu$i,addr=$slot,iommu_platform=on,max-vhost-queues=$max_queues,shm-size=$shm_size$extra")
    printf 'launch-appliance: vvu device 0000:00:%02x.0 serves %s\n' $((0x10 + i)) "$socket" >&2
    i=$((i + 1))
done

if [ "$dry_run" = 1 ]; then
    printf '%q ' "$qemu" "${args[@]}"
    echo
    exit 0
fi
exec "$qemu" "${args[@]}"
