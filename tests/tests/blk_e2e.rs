//! VM-less end-to-end tests: the real `vhost-appliance` binary driven by libblkio's
//! virtio-blk-vhost-user driver (the `blkio` crate), a frontend nobody here wrote. Every
//! data check reads the backing file itself, not only what the frontend saw.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use appliance_tests::blk_suite::{self, HostFile};
use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::daemon::{scratch_dir, Appliance};

const MIB: u64 = 1 << 20;

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn config(num_queues: u32, readonly: bool) -> String {
    format!(
        "state_dir: @DIR@/state
exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: {{ size: 64M }}
    num_queues: {num_queues}
    readonly: {readonly}
"
    )
}

fn exercise_all_operations(num_queues: u32) {
    let appliance = Appliance::start(&config(num_queues, false), &["vol0.sock"]);
    let mut backing = HostFile(appliance.path("vol0.raw"));
    blk_suite::all_operations(&appliance.path("vol0.sock"), num_queues, &mut backing);
}

#[test]
fn one_queue_write_read_flush_discard_write_zeroes() {
    exercise_all_operations(1);
}

#[test]
fn four_queues_write_read_flush_discard_write_zeroes() {
    exercise_all_operations(4);
}

#[test]
fn queue_depth_64_in_flight_on_every_queue() {
    let appliance = Appliance::start(&config(2, false), &["vol0.sock"]);
    let mut backing = HostFile(appliance.path("vol0.raw"));
    blk_suite::queue_depth_64(&appliance.path("vol0.sock"), &mut backing);
}

/// blkio sees VIRTIO_BLK_F_RO and refuses writes itself (EBADF); the daemon's own IOERR for
/// writes that do arrive is tested with the raw frontend in `bad_input.rs`.
#[test]
fn readonly_export_is_read_only_to_blkio_and_file_untouched() {
    let dir = scratch_dir();
    let image = dir.path().join("vol0.raw");
    std::fs::write(&image, vec![0xa5u8; 4 * MIB as usize]).unwrap();
    let cfg = "exports:\n  - name: vol0\n    type: blk\n    socket: @DIR@/vol0.sock\n    path: @DIR@/vol0.raw\n    readonly: true\n";
    let appliance = Appliance::start_in(dir, cfg, &["vol0.sock"]);
    // A frontend that opens a read-only device for writing is refused by blkio itself.
    let mut fe = Frontend::connect_with(&appliance.path("vol0.sock"), 1, true);
    fe.buf(0, 4096).fill(0x11);
    assert_eq!(fe.write(0, 0, 0, 4096), -libc::EBADF);
    assert!(fe.write_zeroes(0, 0, 4096) < 0);
    assert!(fe.discard(0, 0, 4096) < 0);
    assert_eq!(fe.read(0, 4096, 8192, 4096), 0);
    assert!(fe.buf(8192, 4096).iter().all(|&b| b == 0xa5));
    assert!(file_bytes(&image, 0, 4 * MIB as usize)
        .iter()
        .all(|&b| b == 0xa5));
}

#[test]
fn out_of_range_requests_fail_and_the_export_keeps_serving() {
    let appliance = Appliance::start(&config(1, false), &["vol0.sock"]);
    blk_suite::out_of_range(&appliance.path("vol0.sock"));
}

#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn differential_against_qemu_storage_daemon() {
    let dir = scratch_dir();
    std::fs::write(dir.path().join("ours.raw"), blk_suite::differential_image()).unwrap();
    let cfg = "exports:\n  - name: ours\n    type: blk\n    socket: @DIR@/ours.sock\n    path: @DIR@/ours.raw\n";
    let appliance = Appliance::start_in(dir, cfg, &["ours.sock"]);
    let mut backing = HostFile(appliance.path("ours.raw"));
    blk_suite::differential(&appliance.path("ours.sock"), &mut backing);
}

/// The `null` backing (a benchmarking aid): every operation succeeds, reads return zeroes
/// whatever was written, the capacity is `size:`, and no file appears.
#[test]
fn null_backing_reads_zeroes_and_drops_writes() {
    let cfg = "exports:\n  - name: nul\n    type: blk\n    socket: @DIR@/nul.sock\n    format: null\n    size: 256M\n    num_queues: 2\n";
    let appliance = Appliance::start(cfg, &["nul.sock"]);
    let mut fe = Frontend::connect(&appliance.path("nul.sock"), 2);
    assert_eq!(fe.capacity, 256 * MIB);
    for q in 0..2 {
        fe.buf(0, 65536).fill(0x5a);
        assert_eq!(fe.write(q, MIB, 0, 65536), 0);
        assert_eq!(fe.flush(q), 0);
        assert_eq!(fe.read(q, MIB, 0, 65536), 0);
        assert!(fe.buf(0, 65536).iter().all(|&b| b == 0), "queue {q}");
        assert_eq!(fe.discard(q, 0, MIB), 0);
        assert_eq!(fe.write_zeroes(q, 0, MIB), 0);
    }
    // Past the end fails like any disk's.
    assert!(fe.read(0, 256 * MIB, 0, 4096) < 0);
    let files: Vec<_> = std::fs::read_dir(appliance.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        files.iter().all(|f| f.ends_with(".sock")
            || f.ends_with(".log")
            || f.ends_with(".yaml")
            || f == "state"),
        "{files:?}"
    );
}
