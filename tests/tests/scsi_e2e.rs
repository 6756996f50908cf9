//! vhost-user-scsi end to end: the real daemon serving a 3-LUN export, driven over its
//! socket by the raw frontend speaking virtio-scsi (control queue 0, event queue 1, request
//! queue 2). Data is checked in the backing files.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use appliance_tests::daemon::{scratch_dir, Appliance};
use appliance_tests::scsi_frontend::{ScsiFrontend as Scsi, DATA, REQ, REQUEST_QUEUE, RESP};
use vvu_transport::split_ring::Buffer;

const TIMEOUT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

const CONFIG: &str = "exports:
  - name: s0
    type: scsi
    socket: @DIR@/s0.sock
    num_queues: 1
    queue_size: 64
    luns:
      - path: @DIR@/lun0.raw
        create: { size: 8M }
      - lun: 1
        path: @DIR@/lun1.raw
        create: { size: 16M }
        logical_block_size: 4096
        serial: LUNONE
      - lun: 2
        path: @DIR@/lun2.raw
        readonly: true
";

fn file_bytes(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn start() -> Appliance {
    let dir = scratch_dir();
    std::fs::write(dir.path().join("lun2.raw"), vec![0x22u8; 4 * MIB]).unwrap();
    Appliance::start_in(dir, CONFIG, &["s0.sock"])
}

#[test]
fn inquiry_report_luns_capacity_and_unit_attention() {
    let appliance = start();
    let mut s = Scsi::connect(&appliance.path("s0.sock"), 1);
    // INQUIRY and REPORT LUNS do not consume the power-on unit attention.
    let inq = s.good(0, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!((inq[0], &inq[8..16]), (0x00, &b"VHOSTAPP"[..]));
    let luns = s.good(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(
        u32::from_be_bytes(luns[0..4].try_into().unwrap()),
        24,
        "three LUNs"
    );
    assert_eq!(&luns[8..10], &[0, 0]);
    assert_eq!(&luns[16..18], &[0, 1]);
    assert_eq!(&luns[24..26], &[0, 2]);
    for lun in 0..3 {
        s.clear_ua(lun);
    }
    let cap = s.good(
        1,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    );
    assert_eq!(
        u64::from_be_bytes(cap[0..8].try_into().unwrap()),
        16 * MIB as u64 / 4096 - 1
    );
    assert_eq!(u32::from_be_bytes(cap[8..12].try_into().unwrap()), 4096);
    let serial = s.good(1, &[0x12, 1, 0x80, 0, 64, 0], &[], 64);
    assert_eq!(&serial[4..], b"LUNONE");
    let ids = s.good(0, &[0x12, 1, 0x83, 0, 64, 0], &[], 64);
    assert_eq!(ids[5] & 0x0f, 3, "NAA designator");
    // A LUN that does not exist, and a target that does not exist.
    let inq = s.good(9, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(inq[0], 0x7f);
    let r = s.command(9, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!((r.status, r.sense), (2, (0x05, 0x25, 0x00)));
    let r = s.command_raw([1, 3, 0, 0, 0, 0, 0, 0], &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.response, 3, "BAD_TARGET");
}

#[test]
fn write_read_unmap_write_same_land_in_the_backing_files() {
    let appliance = start();
    let mut s = Scsi::connect(&appliance.path("s0.sock"), 1);
    s.clear_ua(1);
    let lun1 = appliance.path("lun1.raw");
    // WRITE(10) 2 blocks at LBA 3, FUA; READ(16) them back.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    s.good(1, &[0x2a, 0x08, 0, 0, 0, 3, 0, 0, 2, 0], &pattern, 0);
    assert_eq!(file_bytes(&lun1, 3 * 4096, 8192), pattern);
    let back = s.good(
        1,
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0],
        &[],
        8192,
    );
    assert_eq!(back, pattern);
    // A read buffer larger than the transfer: the residual says so.
    let r = s.command(1, &[0x28, 0, 0, 0, 0, 3, 0, 0, 1, 0], &[], 8192);
    assert_eq!((r.status, r.residual), (0, 4096));
    // Too small a buffer for the transfer: OVERRUN.
    let r = s.command(1, &[0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0], &[], 4096);
    assert_eq!(r.response, 1, "OVERRUN");
    // UNMAP LBA 3 (one block): reads zero, LBA 4 kept.
    let mut list = vec![0u8; 8];
    list[0..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list.extend_from_slice(&3u64.to_be_bytes());
    list.extend_from_slice(&1u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    s.good(1, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
    assert!(file_bytes(&lun1, 3 * 4096, 4096).iter().all(|&b| b == 0));
    assert_eq!(file_bytes(&lun1, 4 * 4096, 4096), pattern[4096..]);
    // WRITE SAME(16) of a pattern block over 300 blocks (more than one 1 MiB chunk).
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8 + 1).collect();
    let mut ws = [0u8; 16];
    ws[0] = 0x93;
    ws[2..10].copy_from_slice(&100u64.to_be_bytes());
    ws[10..14].copy_from_slice(&300u32.to_be_bytes());
    s.good(1, &ws, &block, 0);
    let written = file_bytes(&lun1, 100 * 4096, 300 * 4096);
    assert!(written.chunks(4096).all(|c| c == &block[..]));
    // WRITE SAME(16) with NDOB and UNMAP zeroes them again.
    ws[1] = 0x09;
    s.good(1, &ws, &[], 0);
    assert!(file_bytes(&lun1, 100 * 4096, 300 * 4096)
        .iter()
        .all(|&b| b == 0));
    // SYNCHRONIZE CACHE(10).
    s.good(1, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    // Out of range.
    let r = s.command(1, &[0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], &[], 4096);
    assert_eq!((r.status, r.sense), (2, (0x05, 0x21, 0x00)));
}

#[test]
fn readonly_lun_refuses_writes_and_file_is_untouched() {
    let appliance = start();
    let mut s = Scsi::connect(&appliance.path("s0.sock"), 1);
    s.clear_ua(2);
    let r = s.command(2, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0x55; 512], 0);
    assert_eq!((r.status, r.sense), (2, (0x07, 0x27, 0x00)), "DATA PROTECT");
    let mode = s.good(2, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(mode[2] & 0x80, 0x80, "WP in MODE SENSE");
    let data = s.good(2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);
    assert!(data.iter().all(|&b| b == 0x22));
    assert!(std::fs::read(appliance.path("lun2.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0x22));
}

#[test]
fn control_queue_tmfs_and_malformed_requests() {
    let appliance = start();
    let mut s = Scsi::connect(&appliance.path("s0.sock"), 1);
    s.clear_ua(0);
    // LOGICAL UNIT RESET on LUN 0 (TMF subtype 5): succeeded, then a unit attention.
    let mut tmf = vec![0u8; 24];
    tmf[4..8].copy_from_slice(&5u32.to_le_bytes());
    tmf[8..16].copy_from_slice(&Scsi::lun_field(0));
    s.fe.write_mem(REQ, &tmf);
    s.fe.write_mem(RESP, &[0xee]);
    let head =
        s.fe.submit_on(0, &[Buffer::readable(REQ, 24), Buffer::writable(RESP, 1)]);
    assert_eq!(s.fe.wait_used_on(0, TIMEOUT), (head, 1));
    assert_eq!(s.fe.read_mem(RESP, 1)[0], 10, "FUNCTION SUCCEEDED");
    let r = s.command(0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.sense, (0x06, 0x29, 0x03), "LUN reset unit attention");
    // ABORT TASK on a missing LUN, and an AN query.
    tmf[4..8].copy_from_slice(&0u32.to_le_bytes());
    tmf[8..16].copy_from_slice(&Scsi::lun_field(77));
    s.fe.write_mem(REQ, &tmf);
    let head =
        s.fe.submit_on(0, &[Buffer::readable(REQ, 24), Buffer::writable(RESP, 1)]);
    assert_eq!(s.fe.wait_used_on(0, TIMEOUT), (head, 1));
    assert_eq!(s.fe.read_mem(RESP, 1)[0], 12, "INCORRECT LUN");
    let mut an = vec![0u8; 16];
    an[0..4].copy_from_slice(&1u32.to_le_bytes());
    s.fe.write_mem(REQ, &an);
    let head =
        s.fe.submit_on(0, &[Buffer::readable(REQ, 16), Buffer::writable(RESP, 5)]);
    assert_eq!(s.fe.wait_used_on(0, TIMEOUT), (head, 5));
    assert_eq!(s.fe.read_mem(RESP, 5), [0, 0, 0, 0, 0]);
    // Malformed: a response buffer too small to answer in, a short request header,
    // and a bidirectional request.
    let head = s.fe.submit_on(
        REQUEST_QUEUE,
        &[Buffer::readable(REQ, 51), Buffer::writable(RESP, 20)],
    );
    assert_eq!(s.fe.wait_used_on(REQUEST_QUEUE, TIMEOUT), (head, 0));
    let head = s.fe.submit_on(
        REQUEST_QUEUE,
        &[Buffer::readable(REQ, 20), Buffer::writable(RESP, 108)],
    );
    assert_eq!(s.fe.wait_used_on(REQUEST_QUEUE, TIMEOUT), (head, 108));
    assert_eq!(s.fe.read_mem(RESP + 11, 1)[0], 9, "FAILURE");
    let head = s.fe.submit_on(
        REQUEST_QUEUE,
        &[
            Buffer::readable(REQ, 51),
            Buffer::readable(DATA, 512),
            Buffer::writable(RESP, 108),
            Buffer::writable(DATA + 4096, 512),
        ],
    );
    assert_eq!(s.fe.wait_used_on(REQUEST_QUEUE, TIMEOUT).0, head);
    assert_eq!(s.fe.read_mem(RESP + 11, 1)[0], 9, "bidirectional: FAILURE");
    // The queue still works.
    let r = s.command(0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.status, 0, "{r:?}");
}

#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn qcow2_lun_serves_scsi_io_and_checks_clean() {
    let config = "exports:
  - name: s0
    type: scsi
    socket: @DIR@/s0.sock
    luns:
      - path: @DIR@/lun0.qcow2
        format: qcow2
        create: { size: 8M }
";
    let mut appliance = Appliance::start(config, &["s0.sock"]);
    let mut s = Scsi::connect(&appliance.path("s0.sock"), 1);
    s.clear_ua(0);
    let cap = s.good(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(
        u32::from_be_bytes(cap[0..4].try_into().unwrap()),
        (8 * MIB / 512) as u32 - 1
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    s.good(0, &[0x2a, 0, 0, 0, 0, 16, 0, 0, 8, 0], &pattern, 0);
    assert_eq!(
        s.good(0, &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], &[], 4096),
        pattern
    );
    let mut list = vec![0u8; 8];
    list[0..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list.extend_from_slice(&16u64.to_be_bytes());
    list.extend_from_slice(&8u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    s.good(0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
    assert!(s
        .good(0, &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], &[], 4096)
        .iter()
        .all(|&b| b == 0));
    s.good(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    drop(s);
    assert!(appliance.process.terminate(TIMEOUT).success());
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(appliance.path("lun0.qcow2"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No errors were found"),
        "{out:?}"
    );
}

/// Mounts a ramfs (no `fallocate` at all) on `dir`; unmounts it when dropped.
struct Ramfs(std::path::PathBuf);

impl Ramfs {
    fn mount(dir: std::path::PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a ramfs needs root");
        Ramfs(dir)
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn lun_on_a_file_system_without_punch_hole_writes_zeroes_as_data() {
    const RAMFS_CONFIG: &str = "exports:
  - name: s0
    type: scsi
    socket: @DIR@/s0.sock
    num_queues: 1
    queue_size: 64
    luns:
      - path: @DIR@/ramfs/lun0.raw
        create: { size: 8M }
        direct: false
      - lun: 1
        path: @DIR@/lun1.raw
        create: { size: 8M }
";
    let dir = scratch_dir();
    let _ramfs = Ramfs::mount(dir.path().join("ramfs"));
    let appliance = Appliance::start_in(dir, RAMFS_CONFIG, &["s0.sock"]);
    let mut s = Scsi::connect(&appliance.path("s0.sock"), 1);
    s.clear_ua(0);
    s.clear_ua(1);
    // READ CAPACITY(16): both LUNs take UNMAP (LBPME); only the one whose file system
    // punches holes promises that unmapped blocks read zero (LBPRZ).
    let read_capacity = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let ramfs_lun = s.good(0, &read_capacity, &[], 32);
    let ext4_lun = s.good(1, &read_capacity, &[], 32);
    assert_eq!(ramfs_lun[14] & 0xc0, 0x80, "ramfs: LBPME without LBPRZ");
    assert_eq!(ext4_lun[14] & 0xc0, 0xc0, "ext4: LBPME and LBPRZ");
    // Data, then WRITE SAME(16) NDOB+UNMAP over it: zeroes land in the file as data.
    let lun0 = appliance.path("ramfs/lun0.raw");
    s.good(0, &[0x2a, 0, 0, 0, 0, 10, 0, 0, 8, 0], &[0x5au8; 4096], 0);
    assert!(file_bytes(&lun0, 10 * 512, 4096).iter().all(|&b| b == 0x5a));
    let mut ws = [0u8; 16];
    ws[0] = 0x93;
    ws[1] = 0x09;
    ws[2..10].copy_from_slice(&10u64.to_be_bytes());
    ws[10..14].copy_from_slice(&8u32.to_be_bytes());
    s.good(0, &ws, &[], 0);
    assert!(file_bytes(&lun0, 10 * 512, 4096).iter().all(|&b| b == 0));
    // A zero-pattern WRITE SAME(10) with UNMAP as well.
    s.good(0, &[0x2a, 0, 0, 0, 0, 20, 0, 0, 1, 0], &[0x33u8; 512], 0);
    s.good(0, &[0x41, 0x08, 0, 0, 0, 20, 0, 0, 1, 0], &[0u8; 512], 0);
    assert!(file_bytes(&lun0, 20 * 512, 512).iter().all(|&b| b == 0));
}
