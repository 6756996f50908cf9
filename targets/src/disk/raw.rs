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
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
        let ring = IoUring::builder().build(entries)?;
        let (eventfd, owns_eventfd) = match shared {
            Some(e) => (e.try_clone()?, false),
            None => (EventFd::new(EFD_NONBLOCK)?, true),
        };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(RawQueue {
            ring,
            file,
            eventfd,
            owns_eventfd,
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
        if self.owns_eventfd {
            let _ = self.eventfd.read();
        }
        let completed: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completed {
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
mod tests {
    use super::*;
    use crate::iobuf::{AlignedBuf, IoBuf};

    /// Tokens and results, without the buffers.
    fn results(done: &[DiskCompletion]) -> Vec<(u64, i32)> {
        done.iter().map(|c| (c.token, c.result)).collect()
    }

    /// An owned buffer of `len` bytes filled with `byte`.
    fn filled(len: usize, align: usize, byte: u8) -> IoBuf {
        let mut buf = AlignedBuf::new(len, align).unwrap();
        buf.as_mut_slice().fill(byte);
        IoBuf::owned(buf)
    }

    fn disk_with(size: u64, direct: bool) -> (tempfile::TempDir, RawDisk) {
        // Under the target directory (ext4 here), not /tmp, so O_DIRECT is meaningful.
        let scratch = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
        std::fs::create_dir_all(scratch).unwrap();
        let dir = tempfile::tempdir_in(scratch).unwrap();
        let disk = RawDisk::open(&RawDiskOptions {
            path: dir.path().join("sub/disk.raw"),
            readonly: false,
            direct,
            create_size: Some(size),
        })
        .unwrap();
        (dir, disk)
    }

    #[test]
    fn deallocation_probe_leaves_size_and_data_alone() {
        let (dir, disk) = disk_with(10_000, false);
        assert!(disk.info().deallocate_zeroes, "ext4 punches holes");
        let path = dir.path().join("sub/disk.raw");
        std::fs::write(&path, vec![0x42u8; 10_000]).unwrap();
        let reopened = RawDisk::open(&RawDiskOptions {
            path: path.clone(),
            readonly: false,
            direct: false,
            create_size: None,
        })
        .unwrap();
        assert!(reopened.info().deallocate_zeroes);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 10_000]);
        let readonly = RawDisk::open(&RawDiskOptions {
            path,
            readonly: true,
            direct: false,
            create_size: None,
        })
        .unwrap();
        assert!(!readonly.info().deallocate_zeroes, "never probed read-only");
    }

    #[test]
    fn create_makes_sparse_file_of_size() {
        let (_dir, disk) = disk_with(1 << 20, false);
        assert_eq!(disk.info().size, 1 << 20);
        assert_eq!(disk.info().direct, None);
    }

    #[test]
    fn grow_is_sparse_durable_and_never_shrinks() {
        use std::os::unix::fs::FileExt;
        let (dir, disk) = disk_with(1 << 20, true);
        let path = dir.path().join("sub/disk.raw");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0x77; 4096], 0)
            .unwrap();
        assert_eq!(disk.grow(3 << 20).unwrap(), 1 << 20);
        assert_eq!(disk.current_size().unwrap(), 3 << 20);
        assert_eq!(
            disk.grow(2 << 20).unwrap(),
            3 << 20,
            "a smaller size is no shrink"
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 3 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "the new range is a hole");
        // Grown underneath (truncate -s): seen at once.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(5 << 20)
            .unwrap();
        assert_eq!(disk.current_size().unwrap(), 5 << 20);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..4096], &[0x77; 4096][..]);
    }

    #[test]
    fn missing_file_without_create_is_refused() {
        let err = RawDisk::open(&RawDiskOptions {
            path: "/nonexistent/x.raw".into(),
            readonly: false,
            direct: false,
            create_size: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn write_read_zero_discard_round_trip_direct() {
        let (_dir, disk) = disk_with(1 << 20, true);
        assert!(disk.info().direct.is_some());
        let mut q = disk.new_queue(8).unwrap();
        q.push(
            DiskOp::Write {
                offset: 4096,
                buf: filled(8192, 4096, 0xab),
                durable: false,
            },
            1,
        )
        .unwrap();
        q.push(DiskOp::Flush, 2).unwrap();
        let mut done = Vec::new();
        q.drain(&mut done).unwrap();
        done.sort_by_key(|c| c.token);
        assert_eq!(results(&done), [(1, 8192), (2, 0)]);

        q.push(
            DiskOp::WriteZeroes {
                offset: 4096,
                len: 4096,
                unmap: false,
                durable: false,
            },
            3,
        )
        .unwrap();
        q.push(
            DiskOp::Discard {
                offset: 8192,
                len: 4096,
                durable: false,
            },
            4,
        )
        .unwrap();
        done.clear();
        q.drain(&mut done).unwrap();
        assert!(done.iter().all(|c| c.result == 0), "{done:?}");

        q.push(
            DiskOp::Read {
                offset: 0,
                buf: filled(12288, 4096, 0x55),
            },
            5,
        )
        .unwrap();
        q.submit().unwrap();
        done.clear();
        q.drain(&mut done).unwrap();
        assert_eq!(results(&done), [(5, 12288)]);
        let data = done[0].buf.as_ref().and_then(IoBuf::as_slice).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0), "never written");
        assert!(data[4096..8192].iter().all(|&b| b == 0), "zeroed");
        assert!(data[8192..].iter().all(|&b| b == 0), "discarded");
    }

    /// Pushes `op`, then reaps as the worker does (on eventfd wake-ups) until it completes;
    /// returns its result and the syncs counted by then.
    fn complete_one(q: &mut RawQueue, op: DiskOp) -> (i32, u64) {
        q.push(op, 7).unwrap();
        q.submit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            let mut pfd = libc::pollfd {
                fd: q.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(n, 1, "no completion within 5 s");
            q.reap(&mut done);
        }
        assert_eq!(done.len(), 1);
        assert_eq!(q.in_flight(), 0, "nothing left behind the completion");
        (done[0].result, q.stats().syncs.load(Ordering::Relaxed))
    }

    #[test]
    fn durable_zeroing_and_discard_complete_after_their_linked_sync() {
        for direct in [false, true] {
            let (dir, disk) = disk_with(1 << 20, direct);
            std::fs::write(dir.path().join("sub/disk.raw"), vec![0x42u8; 1 << 20]).unwrap();
            let mut q = disk.new_queue(2).unwrap();
            let mut syncs = 0;
            let ops = [
                (0u64, false, false),
                (65536, true, false),
                (131072, false, true),
            ];
            for durable in [false, true] {
                for &(offset, unmap, discard) in &ops {
                    let offset = offset + if durable { 4096 } else { 0 };
                    let len = 4096;
                    let op = if discard {
                        DiskOp::Discard {
                            offset,
                            len,
                            durable,
                        }
                    } else {
                        DiskOp::WriteZeroes {
                            offset,
                            len,
                            unmap,
                            durable,
                        }
                    };
                    let (result, now) = complete_one(&mut q, op);
                    assert_eq!(result, 0);
                    assert_eq!(
                        now - syncs,
                        u64::from(durable),
                        "direct {direct}, durable {durable}, offset {offset}"
                    );
                    syncs = now;
                }
            }
            // Every zeroed block reads zero, the blocks between them kept their data.
            let data = std::fs::read(dir.path().join("sub/disk.raw")).unwrap();
            for &(offset, _, _) in &ops {
                let at = offset as usize;
                assert!(data[at..at + 8192].iter().all(|&b| b == 0));
                assert!(data[at + 8192..at + 12288].iter().all(|&b| b == 0x42));
            }
        }
    }

    #[test]
    fn a_failed_fallocate_cancels_its_linked_sync() {
        let (_dir, disk) = disk_with(1 << 16, false);
        let mut q = disk.new_queue(2).unwrap();
        // offset + len overflows a signed file offset: the kernel refuses with EFBIG.
        let (result, syncs) = complete_one(
            &mut q,
            DiskOp::WriteZeroes {
                offset: 1 << 62,
                len: 1 << 62,
                unmap: true,
                durable: true,
            },
        );
        assert_eq!(result, -libc::EFBIG);
        assert_eq!(syncs, 0, "the linked fdatasync never ran");
        // The ring is fine afterwards: flushes and durable writes are counted.
        assert_eq!(complete_one(&mut q, DiskOp::Flush), (0, 1));
        let (result, _) = complete_one(
            &mut q,
            DiskOp::Write {
                offset: 0,
                buf: filled(4096, 1, 1),
                durable: true,
            },
        );
        assert_eq!(result, 4096);
        assert_eq!(q.stats().dsync_writes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn completions_signal_the_eventfd() {
        let (_dir, disk) = disk_with(1 << 16, false);
        let mut q = disk.new_queue(4).unwrap();
        q.push(DiskOp::Flush, 9).unwrap();
        q.submit().unwrap();
        let mut pfd = libc::pollfd {
            fd: q.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "completion eventfd never became readable");
        let mut done = Vec::new();
        while done.is_empty() {
            q.reap(&mut done);
        }
        assert_eq!(done[0].token, 9);
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn misaligned_direct_offset_is_refused_by_the_kernel() {
        let (_dir, disk) = disk_with(1 << 16, true);
        let align = disk.info().direct.unwrap().offset;
        let mut q = disk.new_queue(4).unwrap();
        // Holes skip the alignment check: write real data first.
        q.push(
            DiskOp::Write {
                offset: 0,
                buf: filled(align, 4096, 0),
                durable: true,
            },
            0,
        )
        .unwrap();
        let mut done = Vec::new();
        q.drain(&mut done).unwrap();
        assert_eq!(done[0].result, align as i32);
        done.clear();
        q.push(
            DiskOp::Read {
                offset: 1,
                buf: filled(align, 4096, 0),
            },
            1,
        )
        .unwrap();
        q.drain(&mut done).unwrap();
        assert_eq!(done[0].result, -libc::EINVAL);
    }
}
