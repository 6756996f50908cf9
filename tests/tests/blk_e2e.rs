//! VM-less end-to-end tests: the real `vhost-appliance` binary driven by libblkio's
//! virtio-blk-vhost-user driver (the `blkio` crate), a frontend nobody here wrote. Every
//! data check reads the backing file itself, not only what the frontend saw.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use appliance_tests::blkio_frontend::{random_ops, replay, Frontend};
use appliance_tests::daemon::{qemu_storage_daemon, scratch_dir, Appliance};
use appliance_tests::rng::Rng;
use blkio::ReqFlags;

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
    let image = appliance.path("vol0.raw");
    let mut fe = Frontend::connect(&appliance.path("vol0.sock"), num_queues as i32);
    assert_eq!(fe.capacity, 64 * MIB);

    let mut rng = Rng::new(0x5eed + u64::from(num_queues));
    for q in 0..num_queues as usize {
        let offset = (q as u64 + 1) * MIB;
        rng.fill(fe.buf(0, 256 * 1024));
        let expected = fe.buf(0, 256 * 1024).to_vec();
        assert_eq!(fe.write(q, offset, 0, 256 * 1024), 0);
        assert_eq!(fe.flush(q), 0);
        assert_eq!(
            file_bytes(&image, offset, 256 * 1024),
            expected,
            "queue {q}: file content"
        );
        fe.buf(MIB as usize, 256 * 1024).fill(0);
        assert_eq!(fe.read(q, offset, MIB as usize, 256 * 1024), 0);
        assert_eq!(
            fe.buf(MIB as usize, 256 * 1024),
            &expected[..],
            "queue {q}: read back"
        );

        assert_eq!(fe.write_zeroes(q, offset, 64 * 1024), 0);
        assert_eq!(fe.discard(q, offset + 64 * 1024, 64 * 1024), 0);
        assert_eq!(fe.flush(q), 0);
        let after = file_bytes(&image, offset, 256 * 1024);
        assert!(
            after[..128 * 1024].iter().all(|&b| b == 0),
            "queue {q}: zeroed/discarded range"
        );
        assert_eq!(
            after[128 * 1024..],
            expected[128 * 1024..],
            "queue {q}: neighbours kept"
        );
    }
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
    const DEPTH: usize = 64;
    const LEN: usize = 16 * 1024;
    let appliance = Appliance::start(&config(2, false), &["vol0.sock"]);
    let image = appliance.path("vol0.raw");
    let mut fe = Frontend::connect(&appliance.path("vol0.sock"), 2);
    let mut rng = Rng::new(42);
    rng.fill(fe.buf(0, DEPTH * LEN * 2));
    for q in 0..2 {
        for i in 0..DEPTH {
            let buf = (q * DEPTH + i) * LEN;
            let ptr = fe.ptr(buf);
            fe.queues[q].write(buf as u64, ptr, LEN, i, ReqFlags::empty());
        }
    }
    for q in 0..2 {
        let done = fe.wait(q, DEPTH);
        assert!(done.iter().all(|&(_, ret)| ret == 0), "{done:?}");
        let mut ids: Vec<usize> = done.iter().map(|d| d.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..DEPTH).collect::<Vec<_>>());
    }
    let expected = fe.buf(0, DEPTH * LEN * 2).to_vec();
    assert_eq!(file_bytes(&image, 0, DEPTH * LEN * 2), expected);
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
    let mut fe = Frontend::connect(&appliance.path("vol0.sock"), 1);
    let capacity = fe.capacity;
    assert_eq!(fe.read(0, capacity - 4096, 0, 4096), 0);
    assert_eq!(fe.read(0, capacity, 0, 4096), -libc::EIO);
    assert_eq!(fe.write(0, capacity - 512, 0, 4096), -libc::EIO);
    assert_eq!(fe.read(0, u64::MAX - 4095, 0, 4096), -libc::EIO);
    assert_eq!(fe.write(0, 0, 0, 4096), 0, "the export still serves");
}

#[test]
fn differential_against_qemu_storage_daemon() {
    const SIZE: u64 = 32 * MIB;
    let dir = scratch_dir();
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    // The same starting content in both files.
    let mut start = vec![0u8; SIZE as usize];
    Rng::new(7).fill(&mut start);
    std::fs::write(&ours, &start).unwrap();
    std::fs::write(&theirs, &start).unwrap();
    drop(start);

    let seed = 0xd1ff;
    let ops = random_ops(seed, 400, SIZE);

    let qsd_socket = dir.path().join("qsd.sock");
    let qsd = qemu_storage_daemon(&theirs, &qsd_socket, &dir.path().join("qsd.log"));
    let mut fe = Frontend::connect(&qsd_socket, 1);
    assert_eq!(fe.capacity, SIZE);
    let reads_theirs = replay(&mut fe, &ops);
    drop(fe);
    drop(qsd);

    let cfg = "exports:\n  - name: ours\n    type: blk\n    socket: @DIR@/ours.sock\n    path: @DIR@/ours.raw\n";
    let appliance = Appliance::start_in(dir, cfg, &["ours.sock"]);
    let mut fe = Frontend::connect(&appliance.path("ours.sock"), 1);
    let reads_ours = replay(&mut fe, &ops);
    drop(fe);

    assert!(
        reads_ours == reads_theirs,
        "reads differ from qemu-storage-daemon (seed {seed:#x})"
    );
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "files differ (seed {seed:#x})");
}
