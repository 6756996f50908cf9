//! Per-queue counters: plain relaxed atomics written by the queue's worker thread and summed
//! by whoever reads them (the appliance's metrics collector, at scrape time), so the I/O path
//! takes no lock and allocates nothing for them.
//!
//! Every counter of a [`QueueStats`] has one writer at a time: the thread that holds the
//! queue (its worker thread; the control path only while it holds the same queue). So an
//! increment is a relaxed load and store ([`bump`]), not a locked read-modify-write, and a
//! reader on another thread sees each counter's latest value or a slightly older one, never
//! a torn one.
//!
//! What is counted, per LUN slot ([`LunStats`]; a virtio-blk queue has one, a virtio-scsi
//! request queue one per LUN plus one for requests addressed to no LUN):
//! - every request answered with a status, by [`Op`]: count, bytes (moved by reads and
//!   writes, covered by discards and write-zeroes; successful requests only), and its
//!   latency from the descriptor chain being popped to its used-ring entry being produced,
//!   in a histogram with the fixed buckets [`LATENCY_BUCKETS_NS`];
//! - failed requests by op and [`Failure`];
//! - SCSI CHECK CONDITIONs by sense key;
//! - requests with disk I/O in flight (a gauge).
//!
//! Chains that cannot carry a status at all (no writable status byte, or a response buffer
//! too short) are not requests: they count only in [`QueueStats::malformed`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Adds `n` to a counter that only the calling thread writes (see the module docs): a
/// relaxed load and store, cheaper than a locked `fetch_add`.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// Subtracts `n` from a gauge that only the calling thread writes, stopping at zero.
#[inline]
fn drop_by(gauge: &AtomicU64, n: u64) {
    gauge.store(
        gauge.load(Ordering::Relaxed).saturating_sub(n),
        Ordering::Relaxed,
    );
}

/// The operation class of a request (metric label `op`).
///
/// SCSI commands map as: READ(6/10/12/16) and VERIFY → `Read`, WRITE(6/10/12/16) →
/// `Write`, SYNCHRONIZE CACHE → `Flush`, UNMAP → `Discard`, WRITE SAME → `WriteZeroes`,
/// everything else → `Other`. virtio-blk GET_ID, unknown types and chains whose header
/// cannot be read are `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes (cache synchronisation).
    Flush,
    /// Discards (deallocation).
    Discard,
    /// Write-zeroes (and SCSI WRITE SAME).
    WriteZeroes,
    /// Everything else (identification, inquiries, management commands).
    Other,
}

/// Number of [`Op`] values.
pub const OPS: usize = 6;

impl Op {
    /// Every op, in declaration order (`Op as usize` indexes this).
    pub const ALL: [Op; OPS] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::Other,
    ];

    /// snake_case name (the metric label value).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::Other => "other",
        }
    }
}

/// Why a request failed (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backing store failed the I/O (or the target could not run it: a full disk queue,
    /// an internal failure).
    IoError,
    /// The request broke the framing or named an invalid range, field or buffer.
    Invalid,
    /// The operation, flag or feature is not implemented or was not offered.
    Unsupported,
    /// A write-type request to a read-only LUN.
    ReadOnly,
    /// SCSI: a pending unit attention was reported instead of running the command.
    UnitAttention,
    /// SCSI: VERIFY/COMPARE found different data.
    Miscompare,
}

/// Number of [`Failure`] values.
pub const FAILURES: usize = 6;

impl Failure {
    /// Every reason, in declaration order (`Failure as usize` indexes this).
    pub const ALL: [Failure; FAILURES] = [
        Failure::IoError,
        Failure::Invalid,
        Failure::Unsupported,
        Failure::ReadOnly,
        Failure::UnitAttention,
        Failure::Miscompare,
    ];

    /// snake_case name (the metric label value).
    pub fn name(self) -> &'static str {
        match self {
            Failure::IoError => "io_error",
            Failure::Invalid => "invalid",
            Failure::Unsupported => "unsupported",
            Failure::ReadOnly => "read_only",
            Failure::UnitAttention => "unit_attention",
            Failure::Miscompare => "miscompare",
        }
    }
}

/// Upper bounds of the request latency histogram buckets, in nanoseconds: 10, 25, 50, 100,
/// 250 and 500 µs, 1, 2.5, 5, 10, 25, 50, 100 and 250 ms, 1 s and 5 s. A last, unbounded
/// bucket (`+Inf`) follows.
pub const LATENCY_BUCKETS_NS: [u64; 16] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// Buckets of the latency histogram: one per bound plus `+Inf`.
pub const LATENCY_SLOTS: usize = LATENCY_BUCKETS_NS.len() + 1;

/// Names of the virtio-scsi task management functions, indexed by their `subtype`
/// (virtio 1.2 §5.6.6.1); the last entry counts unknown subtypes.
pub const TMF_FUNCTIONS: [&str; 9] = [
    "abort_task",
    "abort_task_set",
    "clear_aca",
    "clear_task_set",
    "i_t_nexus_reset",
    "logical_unit_reset",
    "query_task",
    "query_task_set",
    "other",
];

/// snake_case names of the SCSI sense keys (SPC-4 table 49), indexed by the key.
pub const SENSE_KEYS: [&str; 16] = [
    "no_sense",
    "recovered_error",
    "not_ready",
    "medium_error",
    "hardware_error",
    "illegal_request",
    "unit_attention",
    "data_protect",
    "blank_check",
    "vendor_specific",
    "copy_aborted",
    "aborted_command",
    "equal",
    "volume_overflow",
    "miscompare",
    "completed",
];

/// Counters of one op on one LUN slot of one queue.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Requests answered (successful or not).
    pub requests: AtomicU64,
    /// Bytes moved (read, write) or covered (discard, write-zeroes) by successful requests.
    pub bytes: AtomicU64,
    /// Sum of the latencies of the requests counted in `requests`, in nanoseconds.
    pub duration_ns: AtomicU64,
    /// Latency histogram: requests per bucket of [`LATENCY_BUCKETS_NS`] (not cumulative;
    /// the last slot is `+Inf`). Its sum equals `requests` once the writer is idle.
    pub buckets: [AtomicU64; LATENCY_SLOTS],
}

/// Counters of one LUN slot of one queue.
#[derive(Debug)]
pub struct LunStats {
    /// The LUN this slot counts; `None` for requests addressed to no LUN of the device.
    pub lun: Option<u16>,
    /// Per op, indexed by `Op as usize`.
    pub ops: [OpStats; OPS],
    /// Failed requests, indexed by `[Op as usize][Failure as usize]`.
    pub failed: [[AtomicU64; FAILURES]; OPS],
    /// SCSI CHECK CONDITIONs, indexed by sense key.
    pub check_conditions: [AtomicU64; 16],
    /// Requests handed to the disk whose completion has not been produced yet (a gauge).
    pub inflight: AtomicU64,
}

impl LunStats {
    fn new(lun: Option<u16>) -> Self {
        LunStats {
            lun,
            ops: Default::default(),
            failed: Default::default(),
            check_conditions: Default::default(),
            inflight: AtomicU64::new(0),
        }
    }

    /// The counters of `op`.
    pub fn op(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    /// Failed requests of `op` for `reason` so far.
    pub fn failed(&self, op: Op, reason: Failure) -> u64 {
        self.failed[op as usize][reason as usize].load(Ordering::Relaxed)
    }

    /// Counts a request answered now that was popped at `started`: `bytes` (counted only if
    /// it succeeded) and the outcome. One clock read.
    #[inline]
    pub fn record(&self, op: Op, bytes: u64, started: Instant, failure: Option<Failure>) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let stats = &self.ops[op as usize];
        bump(&stats.requests, 1);
        bump(&stats.duration_ns, ns);
        let bucket = LATENCY_BUCKETS_NS.partition_point(|&bound| bound < ns);
        if let Some(slot) = stats.buckets.get(bucket) {
            bump(slot, 1);
        }
        match failure {
            None => bump(&stats.bytes, bytes),
            Some(reason) => bump(&self.failed[op as usize][reason as usize], 1),
        }
    }

    /// Counts a CHECK CONDITION with sense key `key` (low 4 bits).
    #[inline]
    pub fn check_condition(&self, key: u8) {
        bump(&self.check_conditions[usize::from(key & 0x0f)], 1);
    }

    /// One more request with disk I/O in flight.
    #[inline]
    pub fn started_io(&self) {
        bump(&self.inflight, 1);
    }

    /// One request with disk I/O in flight fewer.
    #[inline]
    pub fn finished_io(&self) {
        drop_by(&self.inflight, 1);
    }
}

/// Counters of one virtqueue.
#[derive(Debug)]
pub struct QueueStats {
    /// LUN slots. The queue's thread keeps its own `Arc`s of them (no lock on the request
    /// path); the list changes only when the control path changes the device's LUNs, and
    /// the collector reads it at scrape time.
    luns: RwLock<Vec<Arc<LunStats>>>,
    /// Guest notifications (kicks) the queue's worker handled.
    pub kicks: AtomicU64,
    /// Used-ring notifications (call eventfd signals) sent to the guest.
    pub notifications: AtomicU64,
    /// Times a busy-polling worker found work (a request or a completion) without a kick
    /// or a completion signal (export `poll:`).
    pub polled: AtomicU64,
    /// Malformed descriptor chains (wrong framing, direction or length), whether or not
    /// they could be answered with a status.
    pub malformed: AtomicU64,
    /// virtio-blk requests refused without disk I/O, indexed by `blk::Refusal as usize`.
    pub refused: [AtomicU64; crate::blk::Refusal::ALL.len()],
    /// virtio-scsi task management functions received, indexed like [`TMF_FUNCTIONS`].
    pub tmf: [AtomicU64; TMF_FUNCTIONS.len()],
}

impl Default for QueueStats {
    /// One slot, for LUN 0: a virtio-blk queue.
    fn default() -> Self {
        QueueStats::new(&[Some(0)])
    }
}

impl QueueStats {
    /// Counters with one slot per entry of `luns` (`None`: requests addressed to no LUN).
    pub fn new(luns: &[Option<u16>]) -> Self {
        QueueStats {
            luns: RwLock::new(
                luns.iter()
                    .map(|&lun| Arc::new(LunStats::new(lun)))
                    .collect(),
            ),
            kicks: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            polled: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            refused: Default::default(),
            tmf: Default::default(),
        }
    }

    /// Counters of a queue that serves no LUN (a control or event queue).
    pub fn without_luns() -> Self {
        QueueStats::new(&[])
    }

    /// The LUN slots now.
    pub fn luns(&self) -> Vec<Arc<LunStats>> {
        self.luns.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// LUN slot `index`.
    pub fn lun(&self, index: usize) -> Option<Arc<LunStats>> {
        self.luns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
            .cloned()
    }

    /// A new slot for LUN `lun` (added to a live device); its counters start at zero.
    pub fn add_lun(&self, lun: u16) -> Arc<LunStats> {
        let slot = Arc::new(LunStats::new(Some(lun)));
        self.luns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&slot));
        slot
    }

    /// Drops the slot of LUN `lun` (removed from a live device): its series go away.
    pub fn remove_lun(&self, lun: u16) {
        self.luns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|l| l.lun != Some(lun));
    }

    /// Requests of `op` answered so far, over all LUN slots.
    pub fn requests(&self, op: Op) -> u64 {
        self.luns()
            .iter()
            .map(|l| l.op(op).requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Bytes of `op` so far, over all LUN slots.
    pub fn bytes(&self, op: Op) -> u64 {
        self.luns()
            .iter()
            .map(|l| l.op(op).bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Failed requests of `op` for `reason` so far, over all LUN slots.
    pub fn failed(&self, op: Op, reason: Failure) -> u64 {
        self.luns().iter().map(|l| l.failed(op, reason)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_le_bucket() {
        let lun = LunStats::new(Some(0));
        let now = Instant::now();
        lun.record(Op::Read, 4096, now, None);
        lun.record(Op::Read, 4096, now, Some(Failure::IoError));
        let read = lun.op(Op::Read);
        assert_eq!(read.requests.load(Ordering::Relaxed), 2);
        assert_eq!(read.bytes.load(Ordering::Relaxed), 4096);
        let in_buckets: u64 = read.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        assert_eq!(in_buckets, 2);
        assert_eq!(lun.failed(Op::Read, Failure::IoError), 1);
        // A bound itself belongs to its bucket (Prometheus `le`).
        assert_eq!(
            LATENCY_BUCKETS_NS.partition_point(|&b| b < 10_000),
            0,
            "10 µs is in le=1e-05"
        );
        assert_eq!(LATENCY_BUCKETS_NS.partition_point(|&b| b < 10_001), 1);
        assert_eq!(
            LATENCY_BUCKETS_NS.partition_point(|&b| b < u64::MAX),
            LATENCY_SLOTS - 1
        );
    }

    #[test]
    fn gauge_never_goes_below_zero() {
        let lun = LunStats::new(None);
        lun.started_io();
        lun.finished_io();
        lun.finished_io();
        assert_eq!(lun.inflight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn label_names_are_snake_case() {
        let names = Op::ALL
            .iter()
            .map(|o| o.name())
            .chain(Failure::ALL.iter().map(|f| f.name()))
            .chain(TMF_FUNCTIONS)
            .chain(SENSE_KEYS);
        for name in names {
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
    }
}

/// Counters of one queue's disk I/O context (a raw file's io_uring, or a qcow2 queue's):
/// the durability work that guest requests do not show by themselves. Each is bumped when
/// the kernel reports the operation done, before the request it belongs to completes, so
/// whoever sees a request's completion also sees its sync counted.
#[derive(Debug, Default)]
pub struct DiskStats {
    /// fdatasync operations completed on this queue's ring: FLUSH requests, the fdatasync
    /// linked after a fallocate (zeroing, discard) in writethrough mode, and the syncs a
    /// qcow2 image does to make a writethrough or FUA request durable. Failed ones and ones
    /// the kernel cancelled are not counted.
    pub syncs: AtomicU64,
    /// Writes completed with `RWF_DSYNC` (writethrough, FUA): durable by themselves.
    pub dsync_writes: AtomicU64,
}
