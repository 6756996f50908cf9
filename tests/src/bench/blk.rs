//! Runs a [`Workload`] against a vhost-user-blk socket through libblkio's
//! virtio-blk-vhost-user driver: one thread per queue, each keeping `depth` requests in
//! flight and timing each from submission to completion.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};

use super::{file_size, Measured, Window, Workload};
use crate::blkio_frontend::{Frontend, BUF_SIZE};
use crate::rng::Rng;

/// Unmeasured time at the start of each run (caches, the first kicks).
pub const WARMUP: Duration = Duration::from_millis(300);

/// Runs `w` for `seconds` (after [`WARMUP`]) on the export at `socket`, charging the CPU
/// time of process `server` inside the measured window to it.
pub fn run(socket: &Path, w: &Workload, seconds: f64, server: u32) -> Measured {
    let mut fe = Frontend::connect(socket, w.queues as i32);
    assert!(
        fe.capacity >= file_size(),
        "the export is smaller than the benchmark file"
    );
    assert!(
        w.queues * w.depth * w.block <= BUF_SIZE,
        "buffers do not fit"
    );
    let queues = std::mem::take(&mut fe.queues);
    let base = fe.ptr(0) as usize;
    let start = Instant::now();
    let from = start + WARMUP;
    let window = Window {
        from,
        end: from + Duration::from_secs_f64(seconds),
    };
    let cpu = window.sample_cpu(server);
    let lats: Vec<Vec<u32>> = std::thread::scope(|s| {
        let threads: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let bufs = base + i * w.depth * w.block;
                s.spawn(move || queue_loop(q, i, w, bufs, window))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let all: Vec<u32> = lats.into_iter().flatten().collect();
    let mut m = Measured::from_latencies(all, seconds, w.block);
    Window::charge_cpu(&mut m, cpu);
    m
}

/// One queue's loop; returns the latencies (ns) of requests completed in the window.
fn queue_loop(mut q: Blkioq, index: usize, w: &Workload, bufs: usize, window: Window) -> Vec<u32> {
    let mut rng = Rng::new(0x5eed + index as u64);
    let blocks = file_size() / w.block as u64;
    let span = blocks / w.queues as u64;
    let mut next_seq = index as u64 * span;
    let mut started = vec![Instant::now(); w.depth];
    let mut submit = |q: &mut Blkioq, slot: usize, started: &mut [Instant]| {
        let block = if w.pattern.sequential() {
            let b = next_seq;
            next_seq += 1;
            if next_seq >= (index as u64 + 1) * span {
                next_seq = index as u64 * span;
            }
            b
        } else {
            rng.below(blocks)
        };
        let offset = block * w.block as u64;
        let ptr = (bufs + slot * w.block) as *mut u8;
        started[slot] = Instant::now();
        if w.pattern.is_write(rng.below(100)) {
            q.write(offset, ptr, w.block, slot, ReqFlags::empty());
        } else {
            q.read(offset, ptr, w.block, slot, ReqFlags::empty());
        }
    };
    for slot in 0..w.depth {
        submit(&mut q, slot, &mut started);
    }
    let mut lat = Vec::with_capacity(1 << 20);
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = w.depth;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert!(n > 0, "no completion within 30 s");
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O failed: {}", c.ret);
            let slot = c.user_data;
            in_flight -= 1;
            if window.complete(&mut lat, started[slot], now) {
                submit(&mut q, slot, &mut started);
                in_flight += 1;
            }
        }
    }
    lat
}
