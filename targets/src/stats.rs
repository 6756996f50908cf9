//! Per-queue counters: plain relaxed atomics bumped by the queue's worker thread and summed
//! by whoever reads them (the metrics endpoint), so the I/O path shares no lock.

use std::sync::atomic::AtomicU64;

/// Counters of one virtqueue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Completed reads.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Completed writes.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flush_ops: AtomicU64,
    /// Completed discards.
    pub discard_ops: AtomicU64,
    /// Completed write-zeroes.
    pub write_zeroes_ops: AtomicU64,
    /// Requests answered with an I/O error (bad range, failed disk I/O, ...).
    pub errors: AtomicU64,
    /// Requests answered as unsupported.
    pub unsupported: AtomicU64,
    /// Malformed descriptor chains (wrong framing, direction or length).
    pub malformed: AtomicU64,
    /// virtio-blk requests refused without disk I/O, indexed by `blk::Refusal as usize`.
    pub refused: [AtomicU64; crate::blk::Refusal::ALL.len()],
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
