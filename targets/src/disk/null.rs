//! The null engine: a disk that stores nothing. Reads complete with zeroes, writes,
//! discards and zeroing are dropped, flushes complete at once. A benchmarking aid, like
//! qemu-storage-daemon's `null-co` driver (with `read-zeroes=on`) and SPDK's null bdev:
//! with it, a benchmark measures the transport and request handling alone.
//!
//! Completions are still delivered the way every engine delivers them: queued by
//! [`DiskQueue::push`], made ready by [`DiskQueue::submit`] (which signals the queue's
//! eventfd) and collected by [`DiskQueue::reap`], so the worker's loop runs its normal path.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::disk::{Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue, Durability};
use crate::stats::DiskStats;

/// A disk of `size` bytes that stores nothing.
#[derive(Debug)]
pub struct NullDisk {
    /// Virtual size in bytes (grows with [`Disk::grow`]), shared with the queues.
    size: Arc<AtomicU64>,
    readonly: bool,
}

impl NullDisk {
    /// A null disk of `size` bytes.
    pub fn new(size: u64, readonly: bool) -> Self {
        NullDisk {
            size: Arc::new(AtomicU64::new(size)),
            readonly,
        }
    }
}

impl Disk for NullDisk {
    fn engine(&self) -> &'static str {
        "null"
    }

    fn info(&self) -> DiskInfo {
        DiskInfo {
            size: self.size.load(Ordering::Relaxed),
            readonly: self.readonly,
            direct: None,
            is_block_device: false,
            deallocate_zeroes: true,
            discard_zeroes: true,
            durability: if self.readonly {
                Durability::ReadOnly
            } else {
                Durability::Nothing
            },
        }
    }

    fn path(&self) -> &Path {
        Path::new("null")
    }

    fn current_size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn grow(&self, size: u64) -> io::Result<u64> {
        Ok(self.size.fetch_max(size, Ordering::Relaxed))
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn open_queue(
        &self,
        _depth: u32,
        notifier: Option<&EventFd>,
    ) -> io::Result<Box<dyn DiskQueue>> {
        let (eventfd, owns_eventfd) = crate::disk::queue_eventfd(notifier)?;
        Ok(Box::new(NullQueue {
            size: Arc::clone(&self.size),
            readonly: self.readonly,
            queued: Vec::new(),
            ready: Vec::new(),
            eventfd,
            owns_eventfd,
            notify: true,
            stats: Arc::new(DiskStats::default()),
        }))
    }
}

/// One queue of a [`NullDisk`].
struct NullQueue {
    /// The disk's size: operations past it fail, as past the end of a block device.
    size: Arc<AtomicU64>,
    readonly: bool,
    /// Pushed, not yet submitted.
    queued: Vec<DiskCompletion>,
    /// Submitted, not yet reaped.
    ready: Vec<DiskCompletion>,
    eventfd: EventFd,
    owns_eventfd: bool,
    /// Signal the eventfd on submit (off while a worker busy-polls).
    notify: bool,
    stats: Arc<DiskStats>,
}

impl NullQueue {
    /// The result a file would give `op`: bytes moved, 0, or `-errno`.
    fn execute(&self, op: &mut DiskOp) -> i32 {
        let (offset, len) = match op {
            DiskOp::Read { offset, buf } | DiskOp::Write { offset, buf, .. } => {
                (*offset, buf.len() as u64)
            }
            DiskOp::Discard { offset, len, .. } | DiskOp::WriteZeroes { offset, len, .. } => {
                (*offset, *len)
            }
            DiskOp::Flush => (0, 0),
        };
        let size = self.size.load(Ordering::Relaxed);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return -libc::EINVAL;
        }
        let writes = !matches!(op, DiskOp::Read { .. } | DiskOp::Flush);
        if writes && self.readonly {
            return -libc::EBADF;
        }
        let moved = i32::try_from(len).unwrap_or(i32::MAX);
        match op {
            DiskOp::Read { buf, .. } => {
                if buf.fill_zero() {
                    moved
                } else {
                    -libc::EINVAL
                }
            }
            DiskOp::Write { .. } => moved,
            DiskOp::Flush | DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => 0,
        }
    }
}

impl DiskQueue for NullQueue {
    fn push(&mut self, mut op: DiskOp, token: u64) -> io::Result<()> {
        let result = self.execute(&mut op);
        self.queued.push(DiskCompletion {
            token,
            result,
            buf: op.into_buf(),
        });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.ready.append(&mut self.queued);
        if self.notify {
            self.eventfd.write(1)?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        if self.owns_eventfd && self.notify {
            let _ = self.eventfd.read();
        }
        out.append(&mut self.ready);
    }

    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()> {
        if self.owns_eventfd {
            let _ = self.eventfd.read();
        }
        self.ready.append(&mut self.queued);
        out.append(&mut self.ready);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.ready.len()
    }

    fn ready(&mut self) -> bool {
        !self.ready.is_empty()
    }

    fn set_notify(&mut self, enabled: bool) {
        self.notify = enabled;
        if enabled && self.owns_eventfd {
            let _ = self.eventfd.read();
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn stats(&self) -> Arc<DiskStats> {
        Arc::clone(&self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iobuf::{AlignedBuf, IoBuf};

    fn owned(len: usize, byte: u8) -> IoBuf {
        let mut buf = AlignedBuf::new(len, 512).unwrap();
        buf.as_mut_slice().fill(byte);
        IoBuf::owned(buf)
    }

    #[test]
    fn reads_zeroes_and_drops_writes() {
        let disk = NullDisk::new(1 << 20, false);
        let mut q = disk.open_queue(8, None).unwrap();
        let write = DiskOp::Write {
            offset: 0,
            buf: owned(4096, 0xaa),
            durable: true,
        };
        q.push(write, 1).unwrap();
        q.push(
            DiskOp::Read {
                offset: 0,
                buf: owned(4096, 0xff),
            },
            2,
        )
        .unwrap();
        assert_eq!(q.in_flight(), 2);
        let mut out = Vec::new();
        q.reap(&mut out);
        assert!(out.is_empty(), "nothing completes before submit");
        q.submit().unwrap();
        assert_eq!(disk_eventfd_count(&*q), 1);
        q.reap(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].token, out[0].result), (1, 4096));
        assert_eq!((out[1].token, out[1].result), (2, 4096));
        let data = out[1].buf.take().unwrap().into_owned().unwrap();
        assert!(data.as_slice().iter().all(|&b| b == 0));
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn out_of_range_and_readonly_fail() {
        let disk = NullDisk::new(8192, true);
        let mut q = disk.open_queue(8, None).unwrap();
        q.push(
            DiskOp::Read {
                offset: 8192,
                buf: owned(512, 0),
            },
            1,
        )
        .unwrap();
        let write = DiskOp::Write {
            offset: 0,
            buf: owned(512, 0),
            durable: false,
        };
        q.push(write, 2).unwrap();
        q.push(DiskOp::Flush, 3).unwrap();
        let mut out = Vec::new();
        q.drain(&mut out).unwrap();
        let results: Vec<_> = out.iter().map(|c| (c.token, c.result)).collect();
        assert_eq!(results, [(1, -libc::EINVAL), (2, -libc::EBADF), (3, 0)]);
        assert_eq!(disk.info().durability, Durability::ReadOnly);
    }

    #[test]
    fn grows_never_shrinks() {
        let disk = NullDisk::new(4096, false);
        assert_eq!(disk.grow(8192).unwrap(), 4096);
        assert_eq!(disk.grow(4096).unwrap(), 8192);
        assert_eq!(disk.current_size().unwrap(), 8192);
    }

    fn disk_eventfd_count(q: &dyn DiskQueue) -> u64 {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from the queue's live, non-blocking eventfd.
        let n = unsafe {
            libc::read(
                q.completion_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        assert_eq!(n, 8, "the eventfd was signalled");
        value
    }
}
