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
    let qsd_socket = dir.path().join("qsd.sock");
    let qsd = qemu_storage_daemon(&theirs, &qsd_socket, &dir.path().join("qsd.log"));
    differential_between(&qsd_socket, &mut HostFile(theirs), socket, backing);
    drop(qsd);
}

/// The differential proper: 400 random operations replayed on the reference export at
/// `theirs_socket` and then on ours at `socket`, both over a copy of
/// [`differential_image`]: the same bytes read, and the same backing store afterwards.
pub fn differential_between(
    theirs_socket: &Path,
    theirs: &mut dyn Backing,
    socket: &Path,
    backing: &mut dyn Backing,
) {
    let seed = 0xd1ff;
    let ops = random_ops(seed, 400, DIFFERENTIAL_SIZE);

    let mut fe = Frontend::connect(theirs_socket, 1);
    assert_eq!(fe.capacity, DIFFERENTIAL_SIZE);
    let reads_theirs = replay(&mut fe, &ops);
    drop(fe);

    let mut fe = Frontend::connect(socket, 1);
    assert_eq!(fe.capacity, DIFFERENTIAL_SIZE);
    let reads_ours = replay(&mut fe, &ops);
    drop(fe);

    assert!(
        reads_ours == reads_theirs,
        "reads differ from qemu-storage-daemon (seed {seed:#x})"
    );
    assert_eq!(
        backing.md5(0, DIFFERENTIAL_SIZE),
        theirs.md5(0, DIFFERENTIAL_SIZE),
        "backing stores differ from qemu-storage-daemon's (seed {seed:#x})"
    );
}

/// What a test knows of one 4 KiB block of a disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Holds the model's bytes.
    Known,
    /// Discarded: holds the model's bytes or zeroes (a discard is a hint).
    DataOrZeroes,
}

/// A randomized verified workload on `num_queues` queues at once: each queue owns a slice
/// of the disk and runs `ops_per_queue` random writes, reads, write-zeroes, discards and
/// flushes in it, one request in flight per queue, all queues in flight together. Every
/// read is checked against a model of the disk (a discarded block may read as its old
/// data or as zeroes); at the end the whole disk is read back through the export and the
/// backing store holds exactly what the model says.
pub fn random_verified(
    socket: &Path,
    num_queues: usize,
    ops_per_queue: usize,
    seed: u64,
    backing: &mut dyn Backing,
) {
    const BLOCK: usize = 4096;
    const MAX_BLOCKS: u64 = 64;
    let mut fe = Frontend::connect(socket, num_queues as i32);
    let capacity = fe.capacity;
    let blocks_per_queue = capacity / BLOCK as u64 / num_queues as u64;
    assert!(blocks_per_queue > MAX_BLOCKS);
    let mut model = vec![0u8; capacity as usize];
    // The disk's starting content, read through the export.
    let mut rng = Rng::new(seed);
    for chunk in 0..capacity / MIB {
        assert_eq!(fe.read(0, chunk * MIB, 0, MIB as usize), 0);
        let at = (chunk * MIB) as usize;
        model[at..at + MIB as usize].copy_from_slice(fe.buf(0, MIB as usize));
    }
    let mut state = vec![Block::Known; (capacity / BLOCK as u64) as usize];
    // Each queue's buffer area in the frontend's region.
    let area = |q: usize| q * (2 * MAX_BLOCKS as usize * BLOCK);
    let check = |what: &str, data: &[u8], offset: u64, model: &mut [u8], state: &mut [Block]| {
        for (i, got) in data.chunks(BLOCK).enumerate() {
            let at = offset as usize + i * BLOCK;
            let b = at / BLOCK;
            let want = &model[at..at + BLOCK];
            let ok =
                got == want || (state[b] == Block::DataOrZeroes && got.iter().all(|&x| x == 0));
            assert!(ok, "{what}: block at byte {at} differs from the model");
            // What it read is what it holds from now on.
            model[at..at + BLOCK].copy_from_slice(got);
            state[b] = Block::Known;
        }
    };
    for round in 0..ops_per_queue {
        // (queue, op kind, offset, len): chosen and submitted on every queue first.
        let mut issued = Vec::with_capacity(num_queues);
        for q in 0..num_queues {
            let base = q as u64 * blocks_per_queue;
            let len_blocks = 1 + rng.below(MAX_BLOCKS);
            let offset = (base + rng.below(blocks_per_queue - len_blocks)) * BLOCK as u64;
            let len = (len_blocks as usize) * BLOCK;
            let kind = rng.below(10);
            let ptr = fe.ptr(area(q));
            match kind {
                0..=3 => {
                    rng.fill(fe.buf(area(q), len));
                    fe.queues[q].write(offset, ptr, len, q, ReqFlags::empty());
                }
                4..=6 => fe.queues[q].read(offset, ptr, len, q, ReqFlags::empty()),
                7 => fe.queues[q].write_zeroes(offset, len as u64, q, ReqFlags::empty()),
                8 => fe.queues[q].discard(offset, len as u64, q, ReqFlags::empty()),
                _ => fe.queues[q].flush(q, ReqFlags::empty()),
            }
            issued.push((kind, offset, len));
        }
        for (q, &(kind, offset, len)) in issued.iter().enumerate() {
            let done = fe.wait(q, 1);
            assert_eq!(
                done[0].1, 0,
                "round {round} queue {q}: op {kind} at {offset} failed"
            );
            let at = offset as usize;
            let blocks = at / BLOCK..(at + len) / BLOCK;
            match kind {
                0..=3 => {
                    let data = fe.buf(area(q), len).to_vec();
                    model[at..at + len].copy_from_slice(&data);
                    state[blocks].fill(Block::Known);
                }
                4..=6 => {
                    let data = fe.buf(area(q), len).to_vec();
                    check(
                        &format!("round {round} queue {q} read"),
                        &data,
                        offset,
                        &mut model,
                        &mut state,
                    );
                }
                7 => {
                    model[at..at + len].fill(0);
                    state[blocks].fill(Block::Known);
                }
                8 => state[blocks].fill(Block::DataOrZeroes),
                _ => {}
            }
        }
    }
    assert_eq!(fe.flush(0), 0);
    for chunk in 0..capacity / MIB {
        assert_eq!(fe.read(0, chunk * MIB, 0, MIB as usize), 0);
        let data = fe.buf(0, MIB as usize).to_vec();
        check("final read", &data, chunk * MIB, &mut model, &mut state);
    }
    drop(fe);
    assert_eq!(
        backing.md5(0, capacity),
        md5_hex(&model),
        "the backing store differs from what the export acknowledged"
    );
}
