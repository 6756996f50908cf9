//! The virtio-vhost-user-pci device model, seen from inside an appliance VM (patched QEMU,
//! intel-iommu) before any driver exists: PCI identity, capabilities 6/7/8 and the config
//! space as the spec fixes them; BACKEND_UP gating front-end connections; and stock or
//! hostile front-ends connecting and vanishing while the appliance VM keeps running.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::daemon::{scratch_dir, Process};
use appliance_tests::frontend::memfd;
use appliance_tests::vm::{patched_qemu, ConsumerImage, Vm, VmOptions};
use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MINUTE: Duration = Duration::from_secs(60);
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
const CONFIG_CHANGE_MSG: u32 = BackendReq::CONFIG_CHANGE_MSG as u32;
const REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
const UUID: &str = "6c1e7d52-3b0a-4f4e-9d41-0123456789ab";
const MAX_VHOST_QUEUES: u32 = 8;
const SHM_SIZE: u64 = 1 << 30;

/// What the guest sees of the device.
struct Probe {
    config: Vec<u8>,
    /// BAR base addresses from sysfs `resource`.
    bars: Vec<u64>,
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A vendor-specific virtio capability: (cfg_type, bar, id, offset, length, cap bytes).
#[derive(Debug, Clone)]
struct VirtioCap {
    cfg_type: u8,
    bar: u8,
    id: u8,
    offset: u64,
    length: u64,
    raw: Vec<u8>,
}

fn virtio_caps(config: &[u8]) -> (Vec<VirtioCap>, Option<u16>) {
    let mut caps = Vec::new();
    let mut msix_table_size = None;
    let mut at = usize::from(config[0x34]);
    let mut guard = 0;
    while at != 0 && guard < 48 {
        guard += 1;
        let id = config[at];
        let next = usize::from(config[at + 1]);
        if id == 0x11 {
            msix_table_size = Some((le16(config, at + 2) & 0x7ff) + 1);
        }
        if id == 0x09 {
            let len = usize::from(config[at + 2]);
            let raw = config[at..at + len].to_vec();
            let mut offset = u64::from(le32(&raw, 8));
            let mut length = u64::from(le32(&raw, 12));
            if raw[3] == 8 && len >= 24 {
                offset |= u64::from(le32(&raw, 16)) << 32;
                length |= u64::from(le32(&raw, 20)) << 32;
            }
            caps.push(VirtioCap {
                cfg_type: raw[3],
                bar: raw[4],
                id: raw[5],
                offset,
                length,
                raw,
            });
        }
        at = next;
    }
    (caps, msix_table_size)
}

const PROBE: &str = r#"set -e
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x106b ]; then dev=$d; fi
done
[ -n "$dev" ] || { echo "no 1af4:106b device"; exit 1; }
if [ -e $dev/driver ]; then echo $(basename $dev) > $dev/driver/unbind; fi
# memory space + bus master
printf '\006\000' | dd of=$dev/config bs=1 seek=4 conv=notrunc 2>/dev/null
echo "CLASS=$(cat $dev/class)"
echo "CONFIG=$(hexdump -v -e '1/1 "%02x"' $dev/config)"
i=0; while read start end flags; do echo "BAR$i=$start"; i=$((i+1)); done < $dev/resource
"#;

fn probe(vm: &mut Vm) -> Probe {
    let out = vm.run_ok(PROBE, MINUTE);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing in:\n{out}"))
            .trim()
            .to_string()
    };
    // QEMU's PCI_CLASS_OTHERS (0x00ff), as virtio-rng uses.
    assert_eq!(field("CLASS"), "0x00ff00", "PCI_CLASS_OTHERS");
    let config = hex_bytes(&field("CONFIG"));
    assert!(config.len() >= 256, "only {} config bytes", config.len());
    let bars = (0..6)
        .map(|i| {
            u64::from_str_radix(field(&format!("BAR{i}")).trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    Probe { config, bars }
}

/// Address of the device-specific config structure (virtio cap cfg_type 4).
fn device_cfg_addr(p: &Probe) -> u64 {
    let (caps, _) = virtio_caps(&p.config);
    let dev = caps
        .iter()
        .find(|c| c.cfg_type == 4)
        .expect("device cfg cap");
    p.bars[usize::from(dev.bar)] + dev.offset
}

fn devmem_read32(vm: &mut Vm, addr: u64) -> u32 {
    let out = vm.run_ok(&format!("devmem {addr:#x} 32"), MINUTE);
    let v = out.lines().last().unwrap().trim();
    u32::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("devmem said {out}"))
}

fn devmem_write32(vm: &mut Vm, addr: u64, value: u32) {
    vm.run_ok(&format!("devmem {addr:#x} 32 {value:#x}"), MINUTE);
}

/// Polls the device status until it equals `want`.
fn wait_status(vm: &mut Vm, addr: u64, want: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = devmem_read32(vm, addr);
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "device status {status:#x}, wanted {want:#x}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn appliance_options(socket: &Path) -> VmOptions {
    VmOptions {
        qemu: patched_qemu().to_path_buf(),
        heap_checks: true,
        // no_timer_check as launch-appliance.sh: with interrupt remapping on, a vCPU
        // slowed by a loaded host fails the boot-time timer check and the kernel panics.
        kernel_args: "intel_iommu=on no_timer_check".into(),
        extra_args: vec![
            "-device".into(),
            "intel-iommu,intremap=on".into(),
            "-chardev".into(),
            format!("socket,id=vvu0,path={},server=on,wait=off", socket.display()),
            "-device".into(),
            format!(
                "virtio-vhost-user-pci,chardev=vvu0,iommu_platform=on,uuid={UUID},max-vhost-queues={MAX_VHOST_QUEUES},shm-size={SHM_SIZE}"
            ),
        ],
        ..VmOptions::default()
    }
}

fn appliance_vm(socket: &Path) -> Vm {
    Vm::boot(&appliance_options(socket))
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn guest_sees_the_spec_identity_capabilities_and_config() {
    let dir = scratch_dir();
    let socket = dir.path().join("vvu.sock");
    let mut vm = appliance_vm(&socket);
    let p = probe(&mut vm);
    let c = &p.config;
    assert_eq!((le16(c, 0), le16(c, 2)), (0x1af4, 0x106b), "vendor/device");
    assert_eq!(c[8], 1, "modern virtio revision");

    let (caps, msix) = virtio_caps(c);
    let by_type = |t: u8| {
        caps.iter()
            .find(|x| x.cfg_type == t)
            .cloned()
            .unwrap_or_else(|| panic!("cap {t} missing: {caps:?}"))
    };
    for standard in [1u8, 2, 3, 4] {
        assert_eq!(
            by_type(standard).bar,
            4,
            "standard virtio cap {standard} in BAR 4"
        );
    }
    let doorbell = by_type(6);
    assert_eq!(
        doorbell.raw.len(),
        20,
        "doorbell cap carries the multiplier"
    );
    assert_eq!(le32(&doorbell.raw, 16), 4, "doorbell_off_multiplier");
    assert_eq!(doorbell.bar, 0);
    assert!(
        doorbell.length >= u64::from(2 * MAX_VHOST_QUEUES + 1) * 4,
        "room for call, err and log doorbells"
    );
    let notification = by_type(7);
    assert_eq!((notification.bar, notification.length), (0, 4));
    assert_ne!(notification.offset, doorbell.offset, "separate structures");
    let shm = by_type(8);
    assert_eq!(shm.raw.len(), 24, "virtio_pci_cap64");
    assert_eq!(
        (shm.bar, shm.id, shm.offset, shm.length),
        (2, 1, 0, SHM_SIZE)
    );
    assert_ne!(shm.bar, doorbell.bar, "shared memory has a BAR of its own");
    // BAR 2 is a 64-bit prefetchable memory BAR.
    let bar2 = le32(c, 0x18);
    assert_eq!(bar2 & 0xf, 0b1100, "BAR2 flags {bar2:#x}");
    assert_eq!(
        msix,
        Some(3 + MAX_VHOST_QUEUES as u16),
        "config + rxq + txq + one per vhost queue"
    );

    // Device config: status, max_vhost_queues, uuid.
    let cfg = device_cfg_addr(&p);
    assert_eq!(devmem_read32(&mut vm, cfg), 0, "status after reset");
    assert_eq!(devmem_read32(&mut vm, cfg + 4), MAX_VHOST_QUEUES);
    let mut uuid = Vec::new();
    for i in 0..4 {
        uuid.extend_from_slice(&devmem_read32(&mut vm, cfg + 8 + 4 * i).to_le_bytes());
    }
    let want: Vec<u8> = hex_bytes(&UUID.replace('-', ""));
    assert_eq!(uuid, want, "uuid");

    // The notification structure: unmapped after reset, range-checked vectors.
    let notify = p.bars[0] + notification.offset;
    vm.run_ok(&format!("devmem {notify:#x} 16 3"), MINUTE);
    assert_eq!(
        devmem_read32(&mut vm, notify) >> 16,
        0xffff,
        "queue 3 unmapped"
    );
    vm.run_ok(&format!("devmem {:#x} 16 5", notify + 2), MINUTE);
    assert_eq!(devmem_read32(&mut vm, notify) >> 16, 5, "vector 5 mapped");
    vm.run_ok(&format!("devmem {:#x} 16 4000", notify + 2), MINUTE);
    assert_eq!(
        devmem_read32(&mut vm, notify) >> 16,
        0xffff,
        "out-of-range vector refused"
    );
    vm.run_ok(
        &format!("devmem {notify:#x} 16 200; devmem {:#x} 16 1", notify + 2),
        MINUTE,
    );
    assert_eq!(
        devmem_read32(&mut vm, notify) >> 16,
        0xffff,
        "out-of-range select reads unmapped"
    );
    assert!(vm.is_running());
}

/// A stock consumer QEMU pointed at the device's socket.
fn stock_consumer(socket: &Path, dir: &Path) -> Process {
    let image = ConsumerImage::get();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "q35,accel=tcg",
        "-m",
        "256M",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args([
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa",
        "node,memdev=mem",
    ])
    .arg("-kernel")
    .arg(image.dir.join("vmlinuz"))
    .arg("-chardev")
    .arg(format!("socket,id=blk0,path={}", socket.display()))
    .args(["-device", "vhost-user-blk-pci,chardev=blk0"]);
    Process::spawn(cmd, &dir.join("consumer.log"), "consumer qemu")
}

/// Waits (up to a minute) until vvu-probe has logged `line`, and returns its log.
fn probe_log_once(vm: &mut Vm, line: &str) -> String {
    vm.run(
        &format!(
            "i=0; while ! grep -q '{line}' /tmp/probe.log && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; cat /tmp/probe.log"
        ),
        2 * MINUTE,
    )
    .output
}

/// Waits for the device to report the session over, then acknowledges it as a driver does.
fn session_ended(vm: &mut Vm, status: u64) {
    wait_status(vm, status, 1, Duration::from_secs(10));
    devmem_write32(vm, status, 1);
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn backend_up_gates_frontends_and_hostile_frontends_leave_the_vm_running() {
    let dir = scratch_dir();
    let socket = dir.path().join("vvu.sock");
    let mut vm = appliance_vm(&socket);
    let p = probe(&mut vm);
    let status = device_cfg_addr(&p);

    // Without BACKEND_UP a connecting front-end is not taken on.
    let idle = UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(devmem_read32(&mut vm, status), 0);
    devmem_write32(&mut vm, status, 1);
    wait_status(&mut vm, status, 3, Duration::from_secs(10));
    drop(idle);
    wait_status(&mut vm, status, 1, Duration::from_secs(10));
    // The next front-end waits until the driver acknowledges the end of the session by
    // writing BACKEND_UP again, so its messages cannot mix with the last session's.
    let waiting = UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(devmem_read32(&mut vm, status), 1, "taken on before the ack");
    devmem_write32(&mut vm, status, 1);
    wait_status(&mut vm, status, 3, Duration::from_secs(10));
    drop(waiting);
    session_ended(&mut vm, status);

    // A stock QEMU vhost-user-blk front-end connects; the device accepts it and forwards
    // its first request, which waits for the (absent) driver's rx buffers.
    let mut consumer = stock_consumer(&socket, dir.path());
    wait_status(&mut vm, status, 3, Duration::from_secs(30));
    assert!(
        consumer.try_wait().is_none(),
        "consumer exited:\n{}",
        consumer.log()
    );
    drop(consumer); // killed mid-handshake
    session_ended(&mut vm, status);

    // Garbage, a bad version, an oversized size: each ends that session only.
    let hostile: Vec<Vec<u8>> = vec![
        vec![0xff; 37],
        [1u32.to_le_bytes(), 2u32.to_le_bytes(), 0u32.to_le_bytes()].concat(),
        [
            1u32.to_le_bytes(),
            1u32.to_le_bytes(),
            1_000_000u32.to_le_bytes(),
        ]
        .concat(),
        // SET_MEM_TABLE claiming one region but carrying no file descriptor.
        [
            SET_MEM_TABLE.to_le_bytes(),
            1u32.to_le_bytes(),
            40u32.to_le_bytes(),
            1u32.to_le_bytes(),
            0u32.to_le_bytes(),
        ]
        .concat()
        .into_iter()
        .chain(vec![0u8; 32])
        .collect(),
    ];
    for junk in hostile {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(&junk);
        let mut buf = [0u8; 64];
        // The device hangs up on us (EOF), or we time out if it keeps waiting for bytes.
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "device answered garbage");
        drop(s);
        session_ended(&mut vm, status);
        assert!(vm.is_running());
    }

    // A request the device refuses with NEED_REPLY set gets an error reply, not a hang-up.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    wait_status(&mut vm, status, 3, Duration::from_secs(10));
    let kick_beyond_max: u64 = 200 | (1 << 8); // vring 200, NOFD
    let msg = [
        &SET_VRING_KICK.to_le_bytes()[..],
        &(1u32 | NEED_REPLY).to_le_bytes()[..],
        &8u32.to_le_bytes()[..],
        &kick_beyond_max.to_le_bytes()[..],
    ]
    .concat();
    s.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(le32(&reply, 0), 12, "reply to SET_VRING_KICK");
    assert_eq!(le32(&reply, 4) & 0x4, 0x4, "REPLY flag");
    assert_eq!(
        u64::from_le_bytes(reply[12..20].try_into().unwrap()),
        1,
        "error status"
    );
    drop(s);
    wait_status(&mut vm, status, 1, Duration::from_secs(10));

    // A driver that writes reserved status bits breaks only the device.
    devmem_write32(&mut vm, status, 0x5);
    assert!(vm.is_running());
    vm.run_ok("true", MINUTE);
    // Clearing BACKEND_UP closes any session and leaves the device idle.
    devmem_write32(&mut vm, status, 0);
    assert!(vm.is_running());
}

/// An appliance VM with the device bound to vfio-pci and vvu-probe driving it (for ten
/// minutes), BACKEND_UP set.
fn probe_vm(socket: &Path) -> Vm {
    let probe = appliance_tests::daemon::workspace_binary("vvu-probe");
    let image = ConsumerImage::appliance(&[&probe]);
    let mut vm = Vm::boot(&VmOptions {
        image: Some(image),
        ..appliance_options(socket)
    });
    vm.run_ok(
        r#"set -e
modprobe vfio_pci
modprobe vfio_iommu_type1
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x106b ]; then dev=$d; fi
done
bdf=$(basename $dev)
echo vfio-pci > $dev/driver_override
if [ -e $dev/driver ]; then echo $bdf > $dev/driver/unbind; fi
echo $bdf > /sys/bus/pci/drivers_probe
test "$(basename $(readlink $dev/driver))" = vfio-pci
ls /dev/vfio/
vvu-probe $dev 600 > /tmp/probe.log 2>&1 &
i=0; while ! grep -q BACKEND_UP /tmp/probe.log && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
cat /tmp/probe.log
grep -q BACKEND_UP /tmp/probe.log"#,
        MINUTE,
    );
    vm
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn vfio_driver_brings_the_device_up_and_answers_a_stock_frontend() {
    let dir = scratch_dir();
    let socket = dir.path().join("vvu.sock");
    let mut vm = probe_vm(&socket);
    let consumer = stock_consumer(&socket, dir.path());
    let log = probe_log_once(&mut vm, "replied to request=15");
    eprintln!("vvu-probe log:\n{log}");
    assert!(log.contains("frontend connected"), "{log}");
    assert!(
        log.contains("message request=1 "),
        "GET_FEATURES not received:\n{log}"
    );
    assert!(
        log.contains("replied to request=1\n") || log.contains("replied to request=1\r"),
        "{log}"
    );
    assert!(
        log.contains("message request=15 "),
        "the frontend did not continue after our reply:\n{log}"
    );
    drop(consumer);
    assert!(vm.is_running());

    // A second frontend on the same socket hands over a call eventfd: the probe wires a
    // doorbell to an eventfd of its own with VFIO_DEVICE_IOEVENTFD and signals that, so the
    // kernel does the MMIO store and ours fires with no thread forwarding it.
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let deadline = Instant::now() + MINUTE;
    let mut frontend = loop {
        // The device takes a new frontend once it has dropped the last one's session.
        let f = Frontend::connect(&socket, 1).unwrap();
        if f.set_owner().is_ok() && f.set_vring_call(0, &call).is_ok() {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "the device refused a second frontend"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, 60_000) };
    let out = vm.run("cat /tmp/probe.log", MINUTE);
    assert_eq!(
        ready, 1,
        "the call eventfd never fired; probe log:\n{}",
        out.output
    );
    assert_eq!(call.read().unwrap(), 1);
    assert!(
        out.output
            .contains("call of vring 0 signalled through the kernel"),
        "{}",
        out.output
    );
    assert!(
        !out.output.contains("kick of vring"),
        "no frontend has kicked yet:\n{}",
        out.output
    );
    // A kick from the frontend arrives on the MSI-X vector the driver chose for vring 0.
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    kick.write(1).unwrap();
    let log = probe_log_once(&mut vm, "kick of vring 0 received");
    assert!(log.contains("kick of vring 0 received"), "{log}");

    // Frontend memory: a region taken from 2 MiB into a memfd appears in the shared-memory
    // BAR at the offset the device chose; the probe maps it through VFIO and checksums it.
    const REGION: usize = 4 << 20;
    const FD_OFFSET: usize = 2 << 20;
    let memfd = memfd_with(FD_OFFSET + REGION, |i| ((i * 7 + i / 4096) % 251) as u8);
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x4000_0000,
            memory_size: REGION as u64,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: FD_OFFSET as u64,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .unwrap();
    let mut contents = vec![0u8; REGION];
    memfd
        .read_exact_at(&mut contents, FD_OFFSET as u64)
        .unwrap();
    let want = format!("fnv1a={:016x}", fnv1a(&contents));
    let out = vm.run(
        "i=0; while ! grep -q 'region 0 gpa=0x40000000' /tmp/probe.log && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; grep 'region 0' /tmp/probe.log",
        2 * MINUTE,
    );
    eprintln!("{}", out.output);
    assert!(
        out.output.contains("size=4194304") && out.output.contains(&want),
        "the appliance did not see the frontend's memory ({want}):\n{}",
        out.output
    );

    // The backend channel: the frontend hands over a socket with SET_BACKEND_REQ_FD, the
    // probe sends a backend request (CONFIG_CHANGE_MSG, reply wanted) on txq, the device
    // writes it to that socket, and our reply comes back to the probe on rxq.
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let offered = frontend.get_protocol_features().unwrap();
    assert!(
        offered.contains(VhostUserProtocolFeatures::BACKEND_REQ),
        "the device masked BACKEND_REQ off: {offered:?}"
    );
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::BACKEND_REQ)
        .unwrap();
    let (mut channel, theirs) = UnixStream::pair().unwrap();
    frontend.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    channel.set_read_timeout(Some(MINUTE)).unwrap();
    let mut request = [0u8; 12];
    channel
        .read_exact(&mut request)
        .expect("no backend request arrived on the backend channel");
    assert_eq!(
        le32(&request, 0),
        CONFIG_CHANGE_MSG,
        "CONFIG_CHANGE_MSG expected"
    );
    assert_eq!(le32(&request, 4), 1 | NEED_REPLY, "version 1, reply wanted");
    assert_eq!(le32(&request, 8), 0, "no payload");
    let mut reply = CONFIG_CHANGE_MSG.to_le_bytes().to_vec();
    reply.extend_from_slice(&(1u32 | REPLY).to_le_bytes());
    reply.extend_from_slice(&8u32.to_le_bytes());
    reply.extend_from_slice(&0u64.to_le_bytes());
    channel.write_all(&reply).unwrap();
    let log = probe_log_once(&mut vm, "message request=2 flags=0x5 size=8");
    assert!(
        log.contains("message request=2 flags=0x5 size=8"),
        "our reply on the backend channel did not reach the appliance:\n{log}"
    );
    // Something that is not a reply on the channel makes the device close the channel; the
    // session and the appliance VM carry on.
    let mut bogus = CONFIG_CHANGE_MSG.to_le_bytes().to_vec();
    bogus.extend_from_slice(&1u32.to_le_bytes());
    bogus.extend_from_slice(&0u32.to_le_bytes());
    channel.write_all(&bogus).unwrap();
    let mut rest = Vec::new();
    let closed = channel.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)),
        "the device kept a channel that sent a request: {closed:?}"
    );
    assert_eq!(frontend.get_features().unwrap(), features);

    // A driver error: the probe answers SET_VRING_ENABLE with a message shorter than a
    // header. The device enters DEVICE_NEEDS_RESET (QEMU and the appliance VM carry on),
    // the probe sees it on the config interrupt, resets the device and drives it anew, and
    // the next frontend is answered.
    frontend.set_vring_enable(0, true).unwrap();
    let log = probe_log_once(&mut vm, "device up again");
    for line in [
        "sent a malformed message",
        "device needs a reset",
        "device up again",
    ] {
        assert!(log.contains(line), "no '{line}':\n{log}");
    }
    drop(frontend);
    let (answered, answer) = std::sync::mpsc::channel();
    let next_socket = socket.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + MINUTE;
        let result = loop {
            // The vhost crate's frontend has no timeouts: this thread may hang, the test not.
            match Frontend::connect(&next_socket, 1).and_then(|f| f.get_features()) {
                Ok(features) => break Ok(features),
                Err(e) if Instant::now() > deadline => break Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        let _ = answered.send(result);
    });
    let next = answer
        .recv_timeout(2 * MINUTE)
        .expect("no frontend was answered after the device reset");
    assert_eq!(next.unwrap(), features);
    assert!(vm.is_running());
}

/// A frontend region for the layout test: its description, the bytes the appliance must
/// see, and the file that holds them (kept open while the region is in use).
struct Layout {
    what: &'static str,
    info: VhostUserMemoryRegionInfo,
    expected: Vec<u8>,
    _file: std::fs::File,
}

fn region(what: &'static str, file: std::fs::File, gpa: u64, size: u64, offset: u64) -> Layout {
    let mut expected = vec![0u8; size as usize];
    // Past the end of the file the region reads as zeroes.
    let len = file.metadata().unwrap().len();
    let available = len.saturating_sub(offset).min(size) as usize;
    read_region_bytes(&file, &mut expected[..available], offset);
    Layout {
        what,
        info: VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: 0x7f00_0000_0000 + gpa,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        },
        expected,
        _file: file,
    }
}

/// Reads `buf.len()` bytes at `offset` through a mapping (hugetlbfs files cannot be read).
fn read_region_bytes(file: &std::fs::File, buf: &mut [u8], offset: u64) {
    if buf.is_empty() {
        return;
    }
    let page = 2u64 << 20;
    let start = offset / page * page;
    let len = (offset - start) as usize + buf.len();
    // SAFETY: a fresh shared read-only mapping of the file, unmapped below; nothing else
    // refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap of a region file");
    // SAFETY: the mapping covers `len` bytes from `addr`.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    buf.copy_from_slice(&bytes[(offset - start) as usize..]);
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
}

/// Puts `/proc/sys/vm/nr_hugepages` back to what it was when dropped.
struct HugePagePool {
    previous: Option<u64>,
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        if let Some(n) = self.previous {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", n.to_string());
        }
    }
}

/// A 2 MiB memfd on hugetlbfs filled with a pattern, if the host can give one huge page
/// (reserving one in `/proc/sys/vm/nr_hugepages` when none is free; `pool` puts the
/// reservation back when the test ends).
fn hugetlb_memfd(pool: &mut HugePagePool) -> Option<std::fs::File> {
    const HUGE: usize = 2 << 20;
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")
                .map(|v| v.trim().parse::<u64>())
        })?
        .ok()?;
    if free == 0 {
        let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        std::fs::write("/proc/sys/vm/nr_hugepages", (total + 1).to_string()).ok()?;
        pool.previous = Some(total);
    }
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"frontend-hugetlb".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(HUGE as u64).ok()?;
    // SAFETY: a fresh shared mapping of the whole file, unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the mapping covers HUGE writable bytes from `addr`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, HUGE) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 239) as u8;
    }
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, HUGE) };
    Some(file)
}

/// The probe's line for a region at `gpa` (`region N gpa=...` or `added region N gpa=...`).
fn probe_region_line(log: &str, gpa: u64) -> Option<&str> {
    let needle = format!(" gpa={gpa:#x} ");
    log.lines()
        .rev()
        .find(|l| l.contains("region") && l.contains(&needle))
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn the_device_maps_every_region_layout_a_frontend_may_send() {
    let dir = scratch_dir();
    let socket = dir.path().join("vvu.sock");
    let mut vm = probe_vm(&socket);
    let mut frontend = Frontend::connect(&socket, 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
        .unwrap();
    // Every request asks for an acknowledgement: a refused one is an error reply.
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let slots = frontend.get_max_mem_slots().unwrap();
    assert_eq!(slots, 32, "the device caps memory slots at its own 32");

    // SET_MEM_TABLE with one region of each kind.
    let mut table = vec![
        // libblkio's ring memfd: 0x3b10 bytes of file for a 0x4000-byte region.
        region(
            "memfd shorter than the region",
            memfd_with(0x3b10, |i| (i % 253) as u8 | 1),
            0x1000_0000,
            0x4000,
            0,
        ),
        // A file of one page for a region of four: three pages past its end.
        region(
            "memfd ending pages before the region",
            memfd_with(0x1000, |i| (i % 249) as u8 | 2),
            0x1800_0000,
            0x4000,
            0,
        ),
        region(
            "memfd from 2 MiB in",
            memfd_with(6 << 20, |i| ((i * 7 + i / 4096) % 251) as u8),
            0x2000_0000,
            4 << 20,
            2 << 20,
        ),
    ];
    let plain = dir.path().join("plain-file-memory");
    std::fs::write(
        &plain,
        (0..(1usize << 20))
            .map(|i| (i % 241) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let plain = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&plain)
        .unwrap();
    table.push(region("plain file", plain, 0x3000_0000, 1 << 20, 0));
    let mut pool = HugePagePool { previous: None };
    let hugetlb = hugetlb_memfd(&mut pool);
    let hugetlb_fd = hugetlb.as_ref().map(|f| f.as_raw_fd());
    match hugetlb {
        Some(file) => table.push(region("hugetlbfs", file, 0x4000_0000, 2 << 20, 0)),
        None => eprintln!(
            "vvu_device: SKIPPED LAYOUT: no huge page on this host, hugetlbfs not covered"
        ),
    }
    let infos: Vec<_> = table.iter().map(|r| r.info).collect();
    frontend.set_mem_table(&infos).unwrap();
    let log = probe_log_once(&mut vm, &format!("region {} gpa=", table.len() - 1));
    for r in &table {
        let line = probe_region_line(&log, r.info.guest_phys_addr)
            .unwrap_or_else(|| panic!("{}: no region line in\n{log}", r.what));
        let want = format!("size={} ", r.info.memory_size);
        assert!(line.contains(&want), "{}: {line}", r.what);
        let want = format!("fnv1a={:016x}", fnv1a(&r.expected));
        assert!(line.contains(&want), "{}: wanted {want} in {line}", r.what);
    }

    // ADD_MEM_REG of small regions up to the slot limit, each seen by the appliance.
    let mut added = Vec::new();
    for i in table.len()..slots as usize {
        let gpa = 0x1_0000_0000 + (i as u64) * 0x10_0000;
        let r = region(
            "small added region",
            memfd_with(64 << 10, move |b| (b + i) as u8),
            gpa,
            64 << 10,
            0,
        );
        frontend.add_mem_region(&r.info).unwrap();
        added.push(r);
    }
    let last = added.last().unwrap().info.guest_phys_addr;
    let log = probe_log_once(&mut vm, &format!("gpa={last:#x} "));
    for r in &added {
        let line = probe_region_line(&log, r.info.guest_phys_addr)
            .unwrap_or_else(|| panic!("no line for {:#x}:\n{log}", r.info.guest_phys_addr));
        assert!(line.contains("added region"), "{line}");
        assert!(
            line.contains(&format!("fnv1a={:016x}", fnv1a(&r.expected))),
            "{line}"
        );
    }
    // One more than the slots: an error reply to this frontend, which carries on.
    let extra = region(
        "one too many",
        memfd_with(4096, |_| 1),
        0x7000_0000,
        4096,
        0,
    );
    assert!(frontend.add_mem_region(&extra.info).is_err());
    // A freed slot is reused.
    let gone = added.pop().unwrap();
    frontend.remove_mem_region(&gone.info).unwrap();
    frontend.add_mem_region(&extra.info).unwrap();
    let log = probe_log_once(&mut vm, "gpa=0x70000000 ");
    let line = probe_region_line(&log, 0x7000_0000).unwrap();
    assert!(
        line.contains(&format!("fnv1a={:016x}", fnv1a(&extra.expected))),
        "{line}"
    );
    // On hugetlbfs, an mmap_offset that is not a multiple of the huge page is refused.
    if let Some(fd) = hugetlb_fd {
        let misaligned = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x7800_0000,
            memory_size: 4096,
            userspace_addr: 0x7f70_0000_0000,
            mmap_offset: 4096,
            mmap_handle: fd,
        };
        frontend.remove_mem_region(&extra.info).unwrap();
        assert!(frontend.add_mem_region(&misaligned).is_err());
        frontend.add_mem_region(&extra.info).unwrap();
        assert!(
            vm.qemu_log()
                .contains("is not aligned to its file's page size"),
            "no clear error for a misaligned hugetlbfs region:\n{}",
            vm.qemu_log()
        );
    }
    // A region larger than the whole BAR: refused with a clear error, the frontend goes on.
    frontend.remove_mem_region(&extra.info).unwrap();
    let huge = memfd(SHM_SIZE as usize + (2 << 20));
    let too_big = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0x8_0000_0000,
        memory_size: SHM_SIZE + (2 << 20),
        userspace_addr: 0x7f80_0000_0000,
        mmap_offset: 0,
        mmap_handle: huge.as_raw_fd(),
    };
    assert!(frontend.add_mem_region(&too_big).is_err());
    assert_eq!(frontend.get_features().unwrap(), features);
    let qemu = vm.qemu_log();
    assert!(
        qemu.contains("does not fit the"),
        "no clear error for the oversized region in QEMU's log:\n{qemu}"
    );
    drop(frontend);
    assert!(vm.is_running());
}

/// FNV-1a, 64-bit, as vvu-probe prints it.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A memfd of `len` bytes, byte `i` set to `byte(i)`.
fn memfd_with(len: usize, byte: impl Fn(usize) -> u8) -> std::fs::File {
    let file = memfd(len);
    let data: Vec<u8> = (0..len).map(byte).collect();
    file.write_all_at(&data, 0).unwrap();
    file
}
