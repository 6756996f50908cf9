//! The raw engine: a file or block device, one io_uring per queue ([`RawQueue`]).
//!
//! Discard punches a hole; write-zeroes zeroes the range in place, or punches a hole when
//! it may unmap (or where ZERO_RANGE is missing); a discard the file system cannot do is a
//! successful no-op. Durable discards and zeroings link an fdatasync after the fallocate.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{squeue, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::{
    DirectAlignment, Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue, Durability, OpenError,
};
use crate::slab::Slab;
use crate::stats::DiskStats;
use crate::uring::{Syscall, PUNCH_HOLE, ZERO_RANGE};

/// Options for [`RawDisk::open`].
#[derive(Debug, Clone)]
pub struct RawDiskOptions {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Open read-only.
    pub readonly: bool,
    /// Use O_DIRECT.
    pub direct: bool,
    /// Create a sparse file of this size when `path` does not exist.
    pub create_size: Option<u64>,
}

/// A raw backing file or block device.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    info: DiskInfo,
    path: PathBuf,
}

impl RawDisk {
    /// Opens (and if asked, creates) a raw backing file.
    pub fn open(options: &RawDiskOptions) -> Result<Self, OpenError> {
        let path = options.path.clone();
        match std::fs::metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => match options.create_size {
                None => return Err(OpenError::Missing(path)),
                Some(size) => create_sparse(&path, size).map_err(|source| OpenError::Create {
                    path: path.clone(),
                    source,
                })?,
            },
            Err(source) => return Err(OpenError::Open { path, source }),
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!options.readonly);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let mut file = open.open(&path).map_err(|source| OpenError::Open {
            path: path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| OpenError::Open {
            path: path.clone(),
            source,
        })?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(OpenError::NotAFileOrDevice(path));
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| OpenError::Open {
                path: path.clone(),
                source,
            })?;
        let direct = options.direct.then(|| {
            let (memory, offset) = direct_alignment(&file);
            DirectAlignment { memory, offset }
        });
        let deallocate_zeroes = !options.readonly && deallocate_zeroes(&file, size, &meta);
        if !options.readonly && !deallocate_zeroes {
            tracing::info!(
                path = %path.display(),
                "the backing store cannot deallocate ranges: discard is a no-op and zeroes are written as data"
            );
        }
        Ok(RawDisk {
            file,
            info: DiskInfo {
                size,
                readonly: options.readonly,
                direct,
                is_block_device,
                deallocate_zeroes,
                // Punched holes and device write-zeroes read back as zeroes.
                discard_zeroes: deallocate_zeroes,
                durability: if options.readonly {
                    Durability::ReadOnly
                } else {
                    Durability::DataSync
                },
            },
            path,
        })
    }

    /// Size, mode and alignment.
    pub fn info(&self) -> DiskInfo {
        self.info
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size of the backing store now, in bytes: a file's length or a block device's
    /// size (`lseek(SEEK_END)`), which may have grown since it was opened (`truncate -s`,
    /// `lvextend`).
    pub fn current_size(&self) -> io::Result<u64> {
        (&self.file).seek(SeekFrom::End(0))
    }

    /// Grows a backing file to `size` bytes, sparsely (`ftruncate`: no data is written and
    /// the new range reads as zeroes), and makes the new length durable. A file already that
    /// large is left as it is. A block device is grown by its owner (`lvextend`, a SAN
    /// resize), never here: that, and a read-only disk, is an `Unsupported` /
    /// `PermissionDenied` error. Returns the size before.
    pub fn grow(&self, size: u64) -> io::Result<u64> {
        let before = self.current_size()?;
        if size <= before {
            return Ok(before);
        }
        if self.info.is_block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is a block device of {before} bytes: it is grown by its owner (e.g. lvextend), not by the daemon",
                    self.path.display()
                ),
            ));
        }
        if self.info.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is open read-only", self.path.display()),
            ));
        }
        self.file.set_len(size)?;
        // The length is metadata a later fdatasync would write too; growth is rare and
        // should survive a crash on its own.
        self.file.sync_all()?;
        Ok(before)
    }

    /// Makes completed writes durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        if self.info.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// A new per-queue io_uring for up to `depth` operations in flight, with its own
    /// completion eventfd.
    pub fn new_queue(&self, depth: u32) -> io::Result<RawQueue> {
        RawQueue::new(self.file.try_clone()?, depth, None)
    }

    /// As [`RawDisk::new_queue`], signalling completions on `notifier`, which several
    /// rings may share; its owner resets it before reaping them all.
    pub fn new_queue_with_notifier(&self, depth: u32, notifier: &EventFd) -> io::Result<RawQueue> {
        RawQueue::new(self.file.try_clone()?, depth, Some(notifier))
    }
}

fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(size)?;
    file.sync_all()
}

/// Whether `FALLOC_FL_PUNCH_HOLE` works on `file` (a writable file or block device of
/// `size` bytes). A regular file is asked directly with a punch past its end, which leaves
/// data and size alone; a block device punches through write-zeroes (`BLKDEV_ZERO_NOFALLBACK`),
/// so its queue must advertise `write_zeroes_max_bytes`.
fn deallocate_zeroes(file: &File, size: u64, meta: &std::fs::Metadata) -> bool {
    if meta.file_type().is_block_device() {
        let dev = meta.rdev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        // A partition's queue limits live in its parent disk's directory.
        ["queue", "../queue"].iter().any(|queue| {
            let limit = format!("/sys/dev/block/{major}:{minor}/{queue}/write_zeroes_max_bytes");
            std::fs::read_to_string(limit)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|bytes| bytes > 0)
        })
    } else {
        const PROBE: i64 = 4096;
        let past_end = (size as i64).saturating_add(PROBE - 1) / PROBE * PROBE;
        // SAFETY: fallocate only reads its integer arguments; `file` is a valid open fd.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                past_end,
                PROBE,
            )
        };
        r == 0
    }
}

/// Byte layout of `struct statx` fields this module reads (glibc's `libc::statx` lacks them).
const STATX_DIOALIGN: u32 = 0x2000;
const STATX_MASK_OFFSET: usize = 0;
const STATX_DIO_MEM_ALIGN_OFFSET: usize = 0x98;
const STATX_DIO_OFFSET_ALIGN_OFFSET: usize = 0x9c;

/// O_DIRECT alignment of `file` as `(memory, offset)`, from `statx(STATX_DIOALIGN)`; the
/// conservative `(4096, 4096)` when the kernel or file system does not say.
pub(crate) fn direct_alignment(file: &File) -> (usize, usize) {
    const CONSERVATIVE: (usize, usize) = (4096, 4096);
    let mut buf = [0u8; 256];
    // SAFETY: statx writes at most 256 bytes (sizeof(struct statx)) into `buf`; the empty
    // path with AT_EMPTY_PATH makes it describe `file` itself.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            buf.as_mut_ptr(),
        )
    };
    let field = |off: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&buf[off..off + 4]);
        u32::from_ne_bytes(b) as usize
    };
    if rc != 0 || field(STATX_MASK_OFFSET) as u32 & STATX_DIOALIGN == 0 {
        return CONSERVATIVE;
    }
    match (
        field(STATX_DIO_MEM_ALIGN_OFFSET),
        field(STATX_DIO_OFFSET_ALIGN_OFFSET),
    ) {
        (mem, offset) if mem.is_power_of_two() && offset.is_power_of_two() => (mem, offset),
        _ => CONSERVATIVE,
    }
}

impl Disk for RawDisk {
    fn engine(&self) -> &'static str {
        "raw"
    }

    fn info(&self) -> DiskInfo {
        self.info
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn current_size(&self) -> io::Result<u64> {
        RawDisk::current_size(self)
    }

    fn grow(&self, size: u64) -> io::Result<u64> {
        RawDisk::grow(self, size)
    }

    fn sync(&self) -> io::Result<()> {
        RawDisk::sync(self)
    }

    fn open_queue(&self, depth: u32, notifier: Option<&EventFd>) -> io::Result<Box<dyn DiskQueue>> {
        Ok(Box::new(RawQueue::new(
            self.file.try_clone()?,
            depth,
            notifier,
        )?))
    }
}

/// An operation owned by the ring until it completes: its buffer (and the iovec array the
/// kernel reads) stays here until the completion is reaped.
struct Slot {
    token: u64,
    op: DiskOp,
    /// What to do if the file system does not support the operation.
    unsupported: Unsupported,
    /// Which counter a success bumps.
    counts_as: Counts,
    /// An fdatasync is linked after the operation (a durable discard or zeroing).
    linked_sync: bool,
    /// Completions still to come: the operation's, and its linked fdatasync's.
    pending: u8,
    /// The operation's own result, once its completion arrived.
    result: Option<i32>,
    /// The linked fdatasync's result (`-ECANCELED` when the operation failed).
    sync_result: Option<i32>,
}

/// Which [`DiskStats`] counter an operation's success bumps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counts {
    Nothing,
    Sync,
    DsyncWrite,
}

/// Handling of `EOPNOTSUPP` for an operation.
#[derive(Clone, Copy)]
enum Unsupported {
    /// Report it.
    Fail,
    /// Report success: discard is only a hint.
    Succeed,
    /// ZERO_RANGE is missing here: punch a hole instead, which also reads back as zeroes.
    PunchHole { offset: u64, len: u64 },
}

/// The bit of a completion's user data that marks the linked fdatasync; the other bits
/// are the slot key.
const SYNC_PART: u64 = 1;

/// The system call of `op` on `fd`, reading or writing the operation's buffer.
fn syscall(fd: RawFd, op: &DiskOp) -> Syscall<'_> {
    match op {
        DiskOp::Read { offset, buf } => Syscall::Readv {
            fd,
            offset: *offset,
            iovecs: buf.iovecs(),
        },
        DiskOp::Write {
            offset,
            buf,
            durable,
        } => Syscall::Writev {
            fd,
            offset: *offset,
            iovecs: buf.iovecs(),
            dsync: *durable,
        },
        DiskOp::Flush => Syscall::Fdatasync { fd },
        DiskOp::Discard { offset, len, .. } => Syscall::Fallocate {
            fd,
            offset: *offset,
            len: *len,
            mode: PUNCH_HOLE,
        },
        DiskOp::WriteZeroes {
            offset, len, unmap, ..
        } => Syscall::Fallocate {
            fd,
            offset: *offset,
            len: *len,
            mode: if *unmap { PUNCH_HOLE } else { ZERO_RANGE },
        },
    }
}

/// A raw file's per-queue io_uring.
pub struct RawQueue {
    ring: IoUring,
    file: File,
    eventfd: EventFd,
    owns_eventfd: bool,
    /// The eventfd is signalled (off while a worker busy-polls: [`DiskQueue::set_notify`]).
    notify: bool,
    /// Reused by each reap for the completion entries it takes (no allocation per reap).
    reaped: Vec<(u64, i32)>,
    slots: Slab<Slot>,
    /// Submission entries pushed, not yet handed to the kernel.
    queued: usize,
    /// Submission entries handed to the kernel whose completion has not been reaped.
    in_flight: usize,
    stats: Arc<DiskStats>,
}

impl RawQueue {
    fn new(file: File, depth: u32, shared: Option<&EventFd>) -> io::Result<Self> {
        let entries = depth.max(1).next_power_of_two();
        // No IORING_SETUP_COOP_TASKRUN / DEFER_TASKRUN: they leave completions from io-wq
        // and interrupts as task work until this thread enters the kernel, which a worker
        // busy-polling the completion ring never does (and measured on tmpfs, COOP_TASKRUN
        // raised QD32 throughput but lengthened QD1 latency). No SINGLE_ISSUER: a drain
        // (GET_VRING_BASE) submits from the control thread.
        let ring = IoUring::builder().build(entries)?;
        let (eventfd, owns_eventfd) = crate::disk::queue_eventfd(shared)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(RawQueue {
            ring,
            file,
            eventfd,
            owns_eventfd,
            notify: true,
            reaped: Vec::new(),
            slots: Slab::default(),
            queued: 0,
            in_flight: 0,
            stats: Arc::new(DiskStats::default()),
        })
    }

    /// Puts `entries` (one operation, or one linked to its fdatasync) on the submission
    /// queue, making room by submitting what is queued; never splits a linked pair.
    ///
    /// # Safety
    /// The buffers the entries point to stay valid until their completions are reaped.
    unsafe fn push_entries(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: the caller's contract.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) };
            if pushed.is_ok() {
                self.queued += entries.len();
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel to make room.
            let before = self.queued;
            self.submit()?;
            if self.queued == before {
                // The kernel took nothing (completion queue overflowing): the caller
                // must reap first.
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "io_uring submission queue full",
                ));
            }
        }
    }

    /// The result of a finished slot, after its `EOPNOTSUPP` handling and sync counting;
    /// `None` when it was resubmitted (a zeroing retried as a hole punch).
    fn settle(&mut self, slot: Slot) -> Option<DiskCompletion> {
        let op_result = slot.result.unwrap_or(-libc::EIO);
        let result = match (op_result, slot.unsupported) {
            // Nothing changed, so there is nothing to make durable either.
            (r, Unsupported::Succeed) if r == -libc::EOPNOTSUPP => 0,
            (r, Unsupported::PunchHole { offset, len }) if r == -libc::EOPNOTSUPP => {
                let retry = DiskOp::WriteZeroes {
                    offset,
                    len,
                    unmap: true,
                    durable: slot.linked_sync,
                };
                match self.push(retry, slot.token) {
                    Ok(()) => return None,
                    Err(_) => r,
                }
            }
            (r, _) if r < 0 => r,
            (r, _) => match slot.sync_result {
                Some(sync) if slot.linked_sync && sync < 0 => sync,
                _ => {
                    if slot.linked_sync {
                        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                    }
                    match slot.counts_as {
                        Counts::Sync => {
                            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                        }
                        Counts::DsyncWrite => {
                            self.stats.dsync_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Counts::Nothing => {}
                    }
                    r
                }
            },
        };
        Some(DiskCompletion {
            token: slot.token,
            result,
            buf: slot.op.into_buf(),
        })
    }
}

impl DiskQueue for RawQueue {
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()> {
        if matches!(&op, DiskOp::Read { buf, .. } if !buf.is_writable()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a read into a read-only buffer",
            ));
        }
        let linked_sync = matches!(
            op,
            DiskOp::Discard { durable: true, .. } | DiskOp::WriteZeroes { durable: true, .. }
        );
        let unsupported = match op {
            DiskOp::Discard { .. } => Unsupported::Succeed,
            DiskOp::WriteZeroes {
                offset,
                len,
                unmap: false,
                ..
            } => Unsupported::PunchHole { offset, len },
            _ => Unsupported::Fail,
        };
        let counts_as = match op {
            DiskOp::Flush => Counts::Sync,
            DiskOp::Write { durable: true, .. } => Counts::DsyncWrite,
            _ => Counts::Nothing,
        };
        let key = self.slots.insert(Slot {
            token,
            op,
            unsupported,
            counts_as,
            linked_sync,
            pending: if linked_sync { 2 } else { 1 },
            result: None,
            sync_result: None,
        });
        let user_data = (key as u64) << 1;
        let fd = self.file.as_raw_fd();
        // The entry points at the buffer (and iovec array) of the operation its slot now
        // owns; neither moves while the slot holds it.
        let entry = match self.slots.get_mut(key) {
            Some(slot) => syscall(fd, &slot.op).entry().user_data(user_data),
            None => return Err(io::Error::other("in-flight slot vanished")),
        };
        let pushed = if linked_sync {
            // The fdatasync starts only once the fallocate succeeded (a failed one cancels
            // it), and the request completes only once both have: a writethrough discard
            // or zeroing is durable when the guest hears of it.
            let sync = Syscall::Fdatasync { fd }
                .entry()
                .user_data(user_data | SYNC_PART);
            // SAFETY: the entry's buffers belong to the slot, which is removed only when
            // its completions have been reaped (`reap`), or after `drain` on drop.
            unsafe { self.push_entries(&[entry.flags(squeue::Flags::IO_LINK), sync]) }
        } else {
            // SAFETY: as above.
            unsafe { self.push_entries(&[entry]) }
        };
        if let Err(e) = pushed {
            self.slots.remove(key);
            return Err(e);
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(n) => {
                    self.in_flight += n;
                    self.queued -= n.min(self.queued);
                    if self.queued == 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue full: the caller reaps, then we retry.
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        // Reset the eventfd first so a completion arriving after the scan re-arms it. A
        // shared notifier is reset by its owner, once, before it reaps every ring.
        if self.owns_eventfd && self.notify {
            let _ = self.eventfd.read();
        }
        let mut completed = std::mem::take(&mut self.reaped);
        completed.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for (user_data, result) in completed.drain(..) {
            self.in_flight = self.in_flight.saturating_sub(1);
            let key = (user_data >> 1) as usize;
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            if user_data & SYNC_PART != 0 {
                slot.sync_result = Some(result);
            } else {
                slot.result = Some(result);
            }
            slot.pending = slot.pending.saturating_sub(1);
            if slot.pending > 0 {
                continue;
            }
            let Some(slot) = self.slots.remove(key) else {
                continue;
            };
            if let Some(completion) = self.settle(slot) {
                out.push(completion);
            }
        }
        self.reaped = completed;
    }

    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()> {
        self.submit()?;
        while self.in_flight + self.queued > 0 {
            self.submit()?;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.reap(out);
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        // Operations, not submission entries: a linked fdatasync is part of its operation.
        self.slots.len()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn set_notify(&mut self, enabled: bool) {
        // IORING_CQ_EVENTFD_DISABLED in the completion ring's flags (Linux 5.8).
        self.notify = enabled;
        let cq = self.ring.completion();
        if enabled {
            cq.enable_eventfd();
            // The caller's next look at the ring's tail must not be ordered before this
            // store (a completion posted in between would signal nobody and be unseen).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            // A signal from before polling began would wake the worker for nothing (and
            // reap skipped the reset while polling); completions since are in the ring,
            // which the caller checks next.
            if self.owns_eventfd {
                let _ = self.eventfd.read();
            }
        } else {
            cq.disable_eventfd();
        }
    }

    fn stats(&self) -> Arc<DiskStats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for RawQueue {
    fn drop(&mut self) {
        // Never free buffers the kernel may still write to.
        let mut sink = Vec::new();
        if let Err(e) = self.drain(&mut sink) {
            tracing::error!("draining io_uring before drop failed: {e}");
            // Without the completions the buffers must stay alive: leak them rather than
            // let the kernel write to freed memory.
            for slot in self.slots.drain() {
                std::mem::forget(slot.op);
            }
        }
    }
}

#[cfg(test)]
mod tests;
