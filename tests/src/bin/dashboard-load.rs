//! The load behind the Grafana dashboard's picture (`appliance/grafana/capture.sh`): one
//! daemon with raw and qcow2 exports (O_DIRECT and buffered), each driven in turn with 4k
//! random writes then reads at QD32 through libblkio, while Prometheus scrapes the daemon.
//! Prints IOPS per phase. Not the benchmark: that is `bench` (side by side with
//! qemu-storage-daemon and fio).
//!
//!     cargo run --release -p appliance-tests --bin dashboard-load [seconds per phase] [backend...]
//!
//! `BENCH_METRICS_LISTEN=HOST:PORT` puts the daemon's metrics endpoint there.

// A load generator: failures abort with their message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::daemon::Appliance;
use appliance_tests::rng::Rng;
use blkio::{Completion, ReqFlags};

const SIZE: u64 = 512 << 20;
const BS: usize = 4096;
const DEPTH: usize = 32;

/// Keeps `DEPTH` requests in flight for `secs`; returns completed operations.
fn run(fe: &mut Frontend, write: bool, secs: f64, seed: u64) -> (u64, f64) {
    let mut rng = Rng::new(seed);
    rng.fill(fe.buf(0, DEPTH * BS));
    let blocks = SIZE / BS as u64;
    let submit = |fe: &mut Frontend, rng: &mut Rng, slot: usize| {
        let offset = rng.below(blocks) * BS as u64;
        let ptr = fe.ptr(slot * BS);
        if write {
            fe.queues[0].write(offset, ptr, BS, slot, ReqFlags::empty());
        } else {
            fe.queues[0].read(offset, ptr, BS, slot, ReqFlags::empty());
        }
    };
    for slot in 0..DEPTH {
        submit(fe, &mut rng, slot);
    }
    let start = Instant::now();
    let mut done = 0u64;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = DEPTH;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(10);
        let n = fe.queues[0]
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .unwrap();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O failed");
            done += 1;
            in_flight -= 1;
            if start.elapsed().as_secs_f64() < secs {
                submit(fe, &mut rng, c.user_data);
                in_flight += 1;
            }
        }
    }
    (done, start.elapsed().as_secs_f64())
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3.0);
    let config = "exports:
  - name: raw
    type: blk
    socket: @DIR@/raw.sock
    path: @DIR@/disk.raw
    create: { size: 512M }
  - name: raw-buffered
    type: blk
    socket: @DIR@/raw-buffered.sock
    path: @DIR@/disk-buffered.raw
    direct: false
    create: { size: 512M }
  - name: qcow2
    type: blk
    socket: @DIR@/qcow2.sock
    path: @DIR@/disk.qcow2
    format: qcow2
    create: { size: 512M }
  - name: qcow2-buffered
    type: blk
    socket: @DIR@/qcow2-buffered.sock
    path: @DIR@/disk-buffered.qcow2
    format: qcow2
    direct: false
    create: { size: 512M }
";
    let config = match std::env::var("BENCH_METRICS_LISTEN") {
        Ok(listen) => format!("metrics:\n  listen: {listen}\n{config}"),
        Err(_) => config.to_string(),
    };
    let backends = ["raw", "qcow2", "raw-buffered", "qcow2-buffered"];
    let sockets: Vec<String> = backends.iter().map(|b| format!("{b}.sock")).collect();
    let sockets: Vec<&str> = sockets.iter().map(String::as_str).collect();
    let appliance = Appliance::start(&config, &sockets);
    println!(
        "{:<15} {:<22} {:>10} {:>10}",
        "backend", "workload", "IOPS", "MiB/s"
    );
    // O_DIRECT is the default; each format also runs through the page cache.
    // Optional backend names after the seconds pick a subset.
    let only: Vec<String> = std::env::args().skip(2).collect();
    for backend in backends
        .into_iter()
        .filter(|b| only.is_empty() || only.iter().any(|o| o == b))
    {
        let mut fe = Frontend::connect(&appliance.path(&format!("{backend}.sock")), 1);
        // First writes allocate (qcow2 clusters, file blocks); then rewrite and read.
        for (name, write) in [
            ("4k randwrite (fresh)", true),
            ("4k randwrite", true),
            ("4k randread", false),
        ] {
            let (ops, elapsed) = run(&mut fe, write, secs, 42);
            let iops = ops as f64 / elapsed;
            let mibs = iops * BS as f64 / f64::from(1 << 20);
            println!("{backend:<15} {name:<22} {iops:>10.0} {mibs:>10.1}");
        }
    }
    println!("(QD {DEPTH}, one queue, {secs} s per phase, 512 MiB export)");
}
