//! libblkio's virtio-blk-vhost-user driver (the `blkio` crate) as a test frontend,
//! randomized operation sequences to replay through it, and a [`Verifier`] doing verified
//! I/O on a thread while a test changes the daemon's configuration.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::rng::Rng;

/// Bytes of the frontend's mapped buffer region.
pub const BUF_SIZE: usize = 16 << 20;

/// A connected blkio frontend with one mapped buffer region.
pub struct Frontend {
    /// The started queues.
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
    /// Device capacity in bytes.
    pub capacity: u64,
    // Dropped last: the queues and region belong to it.
    _blkio: Blkio,
}

impl Frontend {
    pub fn connect(socket: &Path, num_queues: i32) -> Self {
        Self::connect_with(socket, num_queues, false)
    }

    pub fn connect_with(socket: &Path, num_queues: i32, read_only: bool) -> Self {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.set_bool("read-only", read_only).unwrap();
        blkio.connect().unwrap();
        blkio.set_i32("queue-size", 128).unwrap();
        blkio.set_i32("num-queues", num_queues).unwrap();
        let outcome = blkio.start().unwrap();
        let region = blkio.alloc_mem_region(BUF_SIZE).unwrap();
        blkio.map_mem_region(&region).unwrap();
        let capacity = blkio.get_u64("capacity").unwrap();
        Frontend {
            queues: outcome.queues,
            region,
            capacity,
            _blkio: blkio,
        }
    }

    pub fn buf(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= BUF_SIZE);
        // SAFETY: the region is a live mapping of BUF_SIZE bytes owned by this frontend.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + offset) as *mut u8, len) }
    }

    pub fn ptr(&self, offset: usize) -> *mut u8 {
        (self.region.addr + offset) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns `(user_data, ret)` pairs.
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut timeout = Duration::from_secs(30);
            let want = n - got.len();
            let k = self.queues[q]
                .do_io(&mut completions[..want], want, Some(&mut timeout), None)
                .unwrap();
            assert!(k > 0, "no completion within 30 s");
            for c in &completions[..k] {
                // SAFETY: do_io initialised the first k completions.
                let c = unsafe { c.assume_init_ref() };
                got.push((c.user_data, c.ret));
            }
        }
        got
    }

    /// One completion of queue `q` within `timeout`, as `(user_data, ret)`; `None` when
    /// none came in time or the connection failed (a backend that died).
    pub fn try_wait_one(&mut self, q: usize, timeout: Duration) -> Option<(usize, i32)> {
        let mut completions = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = timeout;
        match self.queues[q].do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(1) => {
                // SAFETY: do_io initialised the one completion it reported.
                let c = unsafe { completions[0].assume_init_ref() };
                Some((c.user_data, c.ret))
            }
            _ => None,
        }
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let ptr = self.ptr(buf_off);
        self.queues[q].write(offset, ptr, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let ptr = self.ptr(buf_off);
        self.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }
}

/// One randomized operation sequence, replayed against a frontend.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Write { offset: u64, len: usize, seed: u64 },
    Read { offset: u64, len: usize },
    WriteZeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
}

pub fn random_ops(seed: u64, count: usize, capacity: u64) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let blocks = capacity / 4096;
    (0..count)
        .map(|_| {
            let offset = rng.below(blocks - 64) * 4096;
            match rng.below(10) {
                0..=4 => Op::Write {
                    offset,
                    len: (1 + rng.below(32) as usize) * 4096,
                    seed: rng.next_u64(),
                },
                5 | 6 => Op::Read {
                    offset,
                    len: (1 + rng.below(32) as usize) * 4096,
                },
                7 => Op::WriteZeroes {
                    offset,
                    len: (1 + rng.below(64)) * 4096,
                },
                8 => Op::Discard {
                    offset,
                    len: (1 + rng.below(64)) * 4096,
                },
                _ => Op::Flush,
            }
        })
        .collect()
}

/// Runs `ops`; returns a digest of everything read so the two backends can be compared.
pub fn replay(fe: &mut Frontend, ops: &[Op]) -> Vec<u8> {
    let mut reads = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let ret = match *op {
            Op::Write { offset, len, seed } => {
                Rng::new(seed).fill(fe.buf(0, len));
                fe.write(0, offset, 0, len)
            }
            Op::Read { offset, len } => {
                let ret = fe.read(0, offset, 0, len);
                reads.extend_from_slice(fe.buf(0, len));
                ret
            }
            Op::WriteZeroes { offset, len } => fe.write_zeroes(0, offset, len),
            Op::Discard { offset, len } => fe.discard(0, offset, len),
            Op::Flush => fe.flush(0),
        };
        assert_eq!(ret, 0, "op {i} {op:?} failed");
    }
    assert_eq!(fe.flush(0), 0);
    reads
}

/// Verified I/O on an export until stopped: 64 KiB writes of a fresh pattern at random
/// offsets, each read back and compared, alternating queues. Returns the operations done.
pub struct Verifier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Verifier {
    /// Connects libblkio to `socket` with two queues and verifies on a thread until
    /// [`Verifier::finish`], within the capacity seen at connect.
    pub fn start(socket: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut fe = Frontend::connect(&socket, 2);
            let blocks = fe.capacity / 65536;
            let mut rng = Rng::new(7);
            let mut ops = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let q = (ops % 2) as usize;
                let offset = rng.below(blocks) * 65536;
                rng.fill(fe.buf(0, 65536));
                let pattern = fe.buf(0, 65536).to_vec();
                assert_eq!(fe.write(q, offset, 0, 65536), 0, "write {ops} failed");
                assert_eq!(fe.read(q, offset, 65536, 65536), 0, "read {ops} failed");
                assert!(fe.buf(65536, 65536) == &pattern[..], "data {ops} differs");
                ops += 2;
            }
            ops
        });
        Verifier {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the operations done; a failed check fails the test here.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().unwrap().join() {
            Ok(ops) => ops,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
