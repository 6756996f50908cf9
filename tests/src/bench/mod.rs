//! The benchmark suite (`cargo run --release -p appliance-tests --bin bench`): the same
//! workloads through the same frontend against this daemon and its peers, in one run on
//! one file, with fio on the file as the limit.
//!
//! - [`Workload`]: what is run (pattern, block size, queues, depth) and [`suite`], the list.
//! - [`Measured`]: what one run of one workload against one server gives: IOPS, MB/s,
//!   latency (mean, p50, p99, p99.9, µs) and the server's CPU seconds per million I/Os.
//! - `blk`: runs a workload through libblkio's virtio-blk-vhost-user driver.
//! - `scsi`: runs it as READ(10)/WRITE(10) over a virtio-scsi request queue.
//! - `servers`: starts this daemon, qemu-storage-daemon, vhost-device-scsi; runs fio.
//! - `report`: the table, the JSON and the SVG chart.

pub mod blk;
pub mod report;
pub mod scsi;
pub mod servers;

use std::time::Duration;

use serde_json::{json, Value};

/// Bytes of the file (image, device) every row of a backing runs on: 512 MiB unless
/// [`set_file_size`] chose another (a multiple of 1 MiB).
pub fn file_size() -> u64 {
    FILE_SIZE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`file_size`], before any backing is prepared.
pub fn set_file_size(bytes: u64) {
    FILE_SIZE.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

static FILE_SIZE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(512 << 20);

/// The access pattern of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random reads.
    RandRead,
    /// Uniformly random writes.
    RandWrite,
    /// Random, 70% reads and 30% writes.
    RandMix70,
    /// Sequential reads (each queue from its own start).
    SeqRead,
    /// Sequential writes.
    SeqWrite,
}

impl Pattern {
    /// fio's `rw=` for the pattern.
    pub fn fio_rw(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandMix70 => "randrw",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }

    /// Whether the `i`-th request (drawn with `roll` in 0..100) is a write.
    pub fn is_write(self, roll: u64) -> bool {
        match self {
            Pattern::RandRead | Pattern::SeqRead => false,
            Pattern::RandWrite | Pattern::SeqWrite => true,
            Pattern::RandMix70 => roll >= 70,
        }
    }

    /// Sequential rather than random offsets.
    pub fn sequential(self) -> bool {
        matches!(self, Pattern::SeqRead | Pattern::SeqWrite)
    }
}

/// One workload of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Short name, e.g. `4k-randread-qd1`.
    pub name: &'static str,
    pub pattern: Pattern,
    /// Bytes per request.
    pub block: usize,
    /// Virtqueues (one frontend thread each).
    pub queues: usize,
    /// Requests in flight on each queue.
    pub depth: usize,
    /// The figure the workload is about: latency (QD1) or throughput.
    pub latency: bool,
}

/// The suite: 4 KiB random read and write at QD1 (latency) and QD32 (IOPS), a 70/30 mix
/// at QD32 and 128 KiB sequential at QD8 per queue, each throughput workload on 1 queue
/// and on 4 queues (QD8 each: the same 32 requests in flight).
pub fn suite(max_queues: usize) -> Vec<Workload> {
    let w = |name, pattern, block, queues, depth, latency| Workload {
        name,
        pattern,
        block,
        queues,
        depth,
        latency,
    };
    let mut all = vec![
        w("4k-randread-qd1", Pattern::RandRead, 4096, 1, 1, true),
        w("4k-randwrite-qd1", Pattern::RandWrite, 4096, 1, 1, true),
        w("4k-randread-qd32", Pattern::RandRead, 4096, 1, 32, false),
        w("4k-randwrite-qd32", Pattern::RandWrite, 4096, 1, 32, false),
        w("4k-mix70-qd32", Pattern::RandMix70, 4096, 1, 32, false),
        w("128k-seqread-qd8", Pattern::SeqRead, 128 << 10, 1, 8, false),
        w(
            "128k-seqwrite-qd8",
            Pattern::SeqWrite,
            128 << 10,
            1,
            8,
            false,
        ),
        w("4k-randread-4q-qd8", Pattern::RandRead, 4096, 4, 8, false),
        w("4k-randwrite-4q-qd8", Pattern::RandWrite, 4096, 4, 8, false),
        w("4k-mix70-4q-qd8", Pattern::RandMix70, 4096, 4, 8, false),
        w(
            "128k-seqread-4q-qd2",
            Pattern::SeqRead,
            128 << 10,
            4,
            2,
            false,
        ),
    ];
    all.retain(|w| w.queues <= max_queues);
    all
}

/// The measured part of a run: requests completing in `[from, end)` count.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from: std::time::Instant,
    pub end: std::time::Instant,
}

impl Window {
    /// Samples the CPU time of process `pid` (the server) at the window's start and end,
    /// on a thread; joining it gives the CPU the server used inside the window.
    pub fn sample_cpu(&self, pid: u32) -> std::thread::JoinHandle<Duration> {
        let window = *self;
        std::thread::spawn(move || {
            std::thread::sleep(
                window
                    .from
                    .saturating_duration_since(std::time::Instant::now()),
            );
            let start = cpu_time(pid);
            std::thread::sleep(
                window
                    .end
                    .saturating_duration_since(std::time::Instant::now()),
            );
            cpu_time(pid).saturating_sub(start)
        })
    }

    /// Sets `m`'s CPU seconds per million requests from a [`Window::sample_cpu`] thread.
    pub fn charge_cpu(m: &mut Measured, sampler: std::thread::JoinHandle<Duration>) {
        if let Ok(cpu) = sampler.join() {
            m.cpu_s_per_mio = Some(cpu.as_secs_f64() / (m.ios.max(1) as f64 / 1e6));
        }
    }

    /// Records the latency (ns) of a request started at `started` and completed at `now`
    /// if `now` is inside the window; returns whether the run goes on (a new request
    /// should take its place).
    pub fn complete(
        &self,
        lat: &mut Vec<u32>,
        started: std::time::Instant,
        now: std::time::Instant,
    ) -> bool {
        if now >= self.from && now < self.end {
            let ns = now.duration_since(started).as_nanos();
            lat.push(u32::try_from(ns).unwrap_or(u32::MAX));
        }
        now < self.end
    }
}

/// What one run of a workload gave.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Completed requests.
    pub ios: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Mean, p50, p99 and p99.9 completion latency in µs (from submission to completion
    /// as the frontend sees it).
    pub lat_us: [f64; 4],
    /// Bytes per request.
    pub block: usize,
    /// CPU seconds (user + system) the server process used per million requests; `None`
    /// for fio (no server).
    pub cpu_s_per_mio: Option<f64>,
}

impl Measured {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds.max(1e-9)
    }

    /// MB/s (10^6 bytes).
    pub fn mbps(&self) -> f64 {
        self.iops() * self.block as f64 / 1e6
    }

    /// From per-request latencies in ns.
    pub fn from_latencies(mut lat_ns: Vec<u32>, seconds: f64, block: usize) -> Self {
        lat_ns.sort_unstable();
        let pick = |q: f64| {
            if lat_ns.is_empty() {
                0.0
            } else {
                let i = ((lat_ns.len() as f64 * q) as usize).min(lat_ns.len() - 1);
                f64::from(lat_ns[i]) / 1000.0
            }
        };
        let mean = if lat_ns.is_empty() {
            0.0
        } else {
            lat_ns.iter().map(|&n| f64::from(n)).sum::<f64>() / lat_ns.len() as f64 / 1000.0
        };
        Measured {
            ios: lat_ns.len() as u64,
            seconds,
            lat_us: [mean, pick(0.5), pick(0.99), pick(0.999)],
            block,
            cpu_s_per_mio: None,
        }
    }

    /// The JSON object of a result.
    pub fn json(&self) -> Value {
        json!({
            "ios": self.ios,
            "seconds": self.seconds,
            "iops": self.iops(),
            "mb_per_s": self.mbps(),
            "lat_us": { "mean": self.lat_us[0], "p50": self.lat_us[1], "p99": self.lat_us[2], "p99_9": self.lat_us[3] },
            "cpu_s_per_million_ios": self.cpu_s_per_mio,
        })
    }
}

/// User + system CPU time of process `pid` so far (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 are the 12th and 13th after the paren (field 3 is the first).
    let total = ticks(11) + ticks(12);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(total * 1_000_000_000 / hz)
}
