//! The libblkio end-to-end suite for a blk export, run as it is against the daemon in
//! host mode (`blk_e2e.rs`) and inside the appliance VM (`appliance_vm_blkio.rs`): every
//! operation on a chosen number of queues, 64 requests in flight per queue, out-of-range
//! requests, and a randomized differential against qemu-storage-daemon. Data is checked in
//! the export's backing file wherever it lives, through [`Backing`].

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blkio::ReqFlags;
use md5::{Digest, Md5};

use crate::blkio_frontend::{random_ops, replay, Frontend};
use crate::daemon::{qemu_storage_daemon, scratch_dir};
use crate::rng::Rng;

const MIB: u64 = 1 << 20;

/// The backing file of the export under test, wherever it is.
pub trait Backing {
    /// Hex md5 of the file's bytes `[offset, offset + len)`.
    fn md5(&mut self, offset: u64, len: u64) -> String;
}

/// A backing file on this host.
pub struct HostFile(pub PathBuf);

impl Backing for HostFile {
    fn md5(&mut self, offset: u64, len: u64) -> String {
        let mut buf = vec![0u8; len as usize];
        std::fs::File::open(&self.0)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        md5_hex(&buf)
    }
}

/// Hex md5 of `data`, as `md5sum` prints it.
pub fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Write, read, flush, write-zeroes and discard on each of `num_queues` queues of the
/// export at `socket` (64 MiB); the backing file holds what was written, zeroes where it
/// was zeroed or discarded, and the neighbours untouched.
pub fn all_operations(socket: &Path, num_queues: u32, backing: &mut dyn Backing) {
    let mut fe = Frontend::connect(socket, num_queues as i32);
    assert_eq!(fe.capacity, 64 * MIB);
    let mut rng = Rng::new(0x5eed + u64::from(num_queues));
    const LEN: usize = 256 * 1024;
    for q in 0..num_queues as usize {
        let offset = (q as u64 + 1) * MIB;
        rng.fill(fe.buf(0, LEN));
        let expected = fe.buf(0, LEN).to_vec();
        assert_eq!(fe.write(q, offset, 0, LEN), 0);
        assert_eq!(fe.flush(q), 0);
        assert_eq!(
            backing.md5(offset, LEN as u64),
            md5_hex(&expected),
            "queue {q}: file content"
        );
        fe.buf(MIB as usize, LEN).fill(0);
        assert_eq!(fe.read(q, offset, MIB as usize, LEN), 0);
        assert_eq!(
            fe.buf(MIB as usize, LEN),
            &expected[..],
            "queue {q}: read back"
        );

        assert_eq!(fe.write_zeroes(q, offset, 64 * 1024), 0);
        assert_eq!(fe.discard(q, offset + 64 * 1024, 64 * 1024), 0);
        assert_eq!(fe.flush(q), 0);
        assert_eq!(
            backing.md5(offset, 128 * 1024),
            md5_hex(&[0u8; 128 * 1024]),
            "queue {q}: zeroed/discarded range"
        );
        assert_eq!(
            backing.md5(offset + 128 * 1024, 128 * 1024),
            md5_hex(&expected[128 * 1024..]),
            "queue {q}: neighbours kept"
        );
    }
}

/// 64 writes in flight on each of 2 queues; all complete, each once, and the file holds
/// them.
pub fn queue_depth_64(socket: &Path, backing: &mut dyn Backing) {
    const DEPTH: usize = 64;
    const LEN: usize = 16 * 1024;
    let mut fe = Frontend::connect(socket, 2);
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
    assert_eq!(backing.md5(0, (DEPTH * LEN * 2) as u64), md5_hex(&expected));
}

/// Requests past the end fail with EIO; the export keeps serving.
pub fn out_of_range(socket: &Path) {
    let mut fe = Frontend::connect(socket, 1);
    let capacity = fe.capacity;
    assert_eq!(fe.read(0, capacity - 4096, 0, 4096), 0);
    assert_eq!(fe.read(0, capacity, 0, 4096), -libc::EIO);
    assert_eq!(fe.write(0, capacity - 512, 0, 4096), -libc::EIO);
    assert_eq!(fe.read(0, u64::MAX - 4095, 0, 4096), -libc::EIO);
    assert_eq!(fe.write(0, 0, 0, 4096), 0, "the export still serves");
}

/// Bytes of the differential's image.
pub const DIFFERENTIAL_SIZE: u64 = 32 * MIB;

/// The differential's starting image content (the same for both daemons).
pub fn differential_image() -> Vec<u8> {
    let mut start = vec![0u8; DIFFERENTIAL_SIZE as usize];
    Rng::new(7).fill(&mut start);
    start
}

/// 400 random operations replayed on `qemu-storage-daemon` over a copy of
/// [`differential_image`] and then on our export at `socket` (backed by another copy):
/// the same bytes read, and the same file afterwards.
pub fn differential(socket: &Path, backing: &mut dyn Backing) {
    let dir = scratch_dir();
    let theirs = dir.path().join("theirs.raw");
    std::fs::write(&theirs, differential_image()).unwrap();
    let seed = 0xd1ff;
    let ops = random_ops(seed, 400, DIFFERENTIAL_SIZE);

    let qsd_socket = dir.path().join("qsd.sock");
    let qsd = qemu_storage_daemon(&theirs, &qsd_socket, &dir.path().join("qsd.log"));
    let mut fe = Frontend::connect(&qsd_socket, 1);
    assert_eq!(fe.capacity, DIFFERENTIAL_SIZE);
    let reads_theirs = replay(&mut fe, &ops);
    drop(fe);
    drop(qsd);

    let mut fe = Frontend::connect(socket, 1);
    assert_eq!(fe.capacity, DIFFERENTIAL_SIZE);
    let reads_ours = replay(&mut fe, &ops);
    drop(fe);

    assert!(
        reads_ours == reads_theirs,
        "reads differ from qemu-storage-daemon (seed {seed:#x})"
    );
    let theirs = std::fs::read(&theirs).unwrap();
    assert_eq!(
        backing.md5(0, DIFFERENTIAL_SIZE),
        md5_hex(&theirs),
        "files differ from qemu-storage-daemon's (seed {seed:#x})"
    );
}
