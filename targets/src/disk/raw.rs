//! Disk backends behind one asynchronous queue interface.
//!
//! A disk ([`RawDisk`], or a [`crate::qcow2::Qcow2Disk`]) is an opened backing store shared
//! by all queues of an export; each virtqueue worker gets its own [`DiskQueue`] (for raw
//! files: its own io_uring). Requests are submitted with a caller-chosen token and complete
//! through [`DiskQueue::reap`]; the queue signals completions on an eventfd so the worker's
//! epoll loop wakes up.
//!
//! Durability: an operation marked `durable` (writethrough, FUA) is durable when it
//! completes. On a raw file or block device a write carries `RWF_DSYNC`, and a discard or
//! zeroing (a fallocate) has an fdatasync linked after it (`IOSQE_IO_LINK`: it runs only
//! once the fallocate succeeded) and completes with that sync. Each queue counts its syncs
//! in [`DiskStats`], before the operation they belong to completes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::stats::DiskStats;

/// One I/O operation on a disk. Offsets and lengths are in bytes.
#[derive(Debug)]
pub enum DiskOp {
    /// Read into the buffers, which stay valid until the operation completes.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination buffers.
        iovecs: Vec<libc::iovec>,
    },
    /// Write from the buffers, which stay valid until the operation completes.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source buffers.
        iovecs: Vec<libc::iovec>,
        /// Make this write durable before completing (writethrough or FUA).
        durable: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Deallocate a range. Later reads return zeroes where [`DiskInfo::discard_zeroes`]
    /// says so; elsewhere a discard may leave the data as it was.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Make the result durable before completing (writethrough): a raw file's
        /// fallocate is followed by a linked fdatasync, a qcow2 image flushes its metadata
        /// and syncs.
        durable: bool,
    },
    /// Make a range read as zeroes, deallocating it when `unmap` is allowed.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The range may be deallocated.
        unmap: bool,
        /// Make the result durable before completing, as for [`DiskOp::Discard`].
        durable: bool,
    },
}

/// Result of a completed operation: bytes transferred, or a negative errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCompletion {
    /// The token given at submission.
    pub token: u64,
    /// Bytes transferred (reads/writes) or 0, or `-errno`.
    pub result: i32,
}

/// Per-queue asynchronous access to a disk.
pub trait DiskQueue: Send {
    /// Queues an operation; it is handed to the kernel by the next [`DiskQueue::submit`].
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()>;
    /// Hands all queued operations to the kernel without waiting.
    fn submit(&mut self) -> io::Result<()>;
    /// Collects finished operations into `out`.
    fn reap(&mut self, out: &mut Vec<DiskCompletion>);
    /// Waits until every submitted operation has finished, collecting them into `out`.
    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()>;
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Readable when completions are ready (reset by [`DiskQueue::reap`]).
    fn completion_fd(&self) -> RawFd;
    /// This queue's sync counters, shared: a caller may keep them after handing the queue
    /// to a request handler.
    fn stats(&self) -> Arc<DiskStats>;
}

/// How the backing file was opened, as it matters to request handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes when opened (a store may grow since: [`RawDisk::current_size`]).
    pub size: u64,
    /// Opened read-only.
    pub readonly: bool,
    /// With O_DIRECT: the alignments the kernel needs. `None` when buffered.
    pub direct: Option<DirectAlignment>,
    /// Block device rather than regular file.
    pub is_block_device: bool,
    /// A [`DiskOp::WriteZeroes`] works, whether or not it may unmap: the range reads back
    /// as zeroes and the request layer need not write zero data itself (virtio-blk offers
    /// WRITE_ZEROES). Raw files and block devices deallocate the range (or zero it in
    /// place); false on file systems without `FALLOC_FL_PUNCH_HOLE` and on block devices
    /// without write-zeroes support. Always true for qcow2 images: v3 images mark zero
    /// clusters, v2 images (no zero flag) deallocate where no backing file can show
    /// through and write zero data elsewhere, as QEMU does.
    pub deallocate_zeroes: bool,
    /// A [`DiskOp::Discard`] leaves the range reading as zeroes (SCSI LBPRZ, and what
    /// the README promises of discarded ranges). False where a discard is a no-op:
    /// backing stores that cannot deallocate, and qcow2 v2 images with a backing file,
    /// where deallocating would expose the backing file's data and the format has no zero
    /// flag (a discard would have to allocate the range to hide it).
    pub discard_zeroes: bool,
}

/// O_DIRECT alignment requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlignment {
    /// Buffer addresses and lengths.
    pub memory: usize,
    /// File offsets and lengths.
    pub offset: usize,
    /// Guest memory cannot be a direct-I/O target at all, whatever its alignment: in
    /// appliance-VM mode it is a PFN-mapped PCI BAR, which the kernel cannot pin. Every
    /// request then goes through a bounce buffer.
    pub bounce_always: bool,
}

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

/// Errors opening a backing file; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The backing file does not exist and nothing asked to create it.
    #[error("backing file {0} does not exist (add `create: {{size: ...}}` to create it)")]
    Missing(PathBuf),
    /// Creating the backing file failed.
    #[error("cannot create backing file {path}")]
    Create {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening failed (permissions, O_DIRECT unsupported, ...).
    #[error("cannot open backing file {path}")]
    Open {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("backing file {0} is neither a regular file nor a block device")]
    NotAFileOrDevice(PathBuf),
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
            DirectAlignment {
                memory,
                offset,
                bounce_always: false,
            }
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

/// An operation owned by the ring until it completes (its iovec array must stay put).
struct Slot {
    token: u64,
    _iovecs: Vec<libc::iovec>,
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
/// are the slot index.
const SYNC_PART: u64 = 1;

// SAFETY: the iovecs point into guest memory or bounce buffers owned by the caller, who keeps
// them alive until completion; the raw pointers are only handed to the kernel, never
// dereferenced here, so moving a `Slot` between threads is sound.
unsafe impl Send for Slot {}

/// A raw file's per-queue io_uring.
pub struct RawQueue {
    ring: IoUring,
    file: File,
    eventfd: EventFd,
    owns_eventfd: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
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
            slots: Vec::new(),
            free: Vec::new(),
            queued: 0,
            in_flight: 0,
            stats: Arc::new(DiskStats::default()),
        })
    }

    fn entry(&self, op: &DiskOp) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        match op {
            DiskOp::Read { offset, iovecs } => {
                opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(*offset)
                    .build()
            }
            DiskOp::Write {
                offset,
                iovecs,
                durable,
            } => opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(*offset)
                .rw_flags(if *durable { libc::RWF_DSYNC } else { 0 })
                .build(),
            DiskOp::Flush => self.fdatasync(),
            DiskOp::Discard { offset, len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            DiskOp::WriteZeroes {
                offset, len, unmap, ..
            } => {
                let mode = if *unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
            }
        }
    }

    fn fdatasync(&self) -> squeue::Entry {
        opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    }

    /// Puts `entries` (one operation, or one linked to its fdatasync) on the submission
    /// queue, making room by submitting what is queued; never splits a linked pair.
    fn push_entries(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: the entries' buffers (the iovec array in the slot, and the memory it
            // points to, kept alive by the caller) stay valid until the completions are
            // reaped.
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
}

impl DiskQueue for RawQueue {
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let user_data = (index as u64) << 1;
        let entry = self.entry(&op).user_data(user_data);
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
        let iovecs = match op {
            DiskOp::Read { iovecs, .. } | DiskOp::Write { iovecs, .. } => iovecs,
            _ => Vec::new(),
        };
        self.slots[index] = Some(Slot {
            token,
            _iovecs: iovecs,
            unsupported,
            counts_as,
            linked_sync,
            pending: if linked_sync { 2 } else { 1 },
            result: None,
            sync_result: None,
        });
        let pushed = if linked_sync {
            // The fdatasync starts only once the fallocate succeeded (a failed one cancels
            // it), and the request completes only once both have: a writethrough discard
            // or zeroing is durable when the guest hears of it.
            let sync = self.fdatasync().user_data(user_data | SYNC_PART);
            self.push_entries(&[entry.flags(squeue::Flags::IO_LINK), sync])
        } else {
            self.push_entries(&[entry])
        };
        if let Err(e) = pushed {
            self.slots[index] = None;
            self.free.push(index);
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
            let index = (user_data >> 1) as usize;
            let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
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
            let Some(slot) = self.slots.get_mut(index).and_then(Option::take) else {
                continue;
            };
            self.free.push(index);
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
                        Ok(()) => continue,
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
            out.push(DiskCompletion {
                token: slot.token,
                result,
            });
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
        self.slots.len() - self.free.len()
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iobuf::AlignedBuf;

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

    fn iov(buf: &mut [u8]) -> Vec<libc::iovec> {
        vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]
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
        let mut wbuf = AlignedBuf::new(8192, 4096).unwrap();
        wbuf.as_mut_slice().fill(0xab);
        let wiov = iov(wbuf.as_mut_slice());
        q.push(
            DiskOp::Write {
                offset: 4096,
                iovecs: wiov,
                durable: false,
            },
            1,
        )
        .unwrap();
        q.push(DiskOp::Flush, 2).unwrap();
        let mut done = Vec::new();
        q.drain(&mut done).unwrap();
        done.sort_by_key(|c| c.token);
        assert_eq!(
            done,
            [
                DiskCompletion {
                    token: 1,
                    result: 8192
                },
                DiskCompletion {
                    token: 2,
                    result: 0
                }
            ]
        );

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

        let mut rbuf = AlignedBuf::new(12288, 4096).unwrap();
        rbuf.as_mut_slice().fill(0x55);
        let riov = iov(rbuf.as_mut_slice());
        q.push(
            DiskOp::Read {
                offset: 0,
                iovecs: riov,
            },
            5,
        )
        .unwrap();
        q.submit().unwrap();
        done.clear();
        q.drain(&mut done).unwrap();
        assert_eq!(
            done,
            [DiskCompletion {
                token: 5,
                result: 12288
            }]
        );
        let data = rbuf.as_mut_slice();
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
        let mut buf = vec![1u8; 4096];
        let (result, _) = complete_one(
            &mut q,
            DiskOp::Write {
                offset: 0,
                iovecs: iov(&mut buf),
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
        let mut buf = AlignedBuf::new(align, 4096).unwrap();
        // Holes skip the alignment check: write real data first.
        q.push(
            DiskOp::Write {
                offset: 0,
                iovecs: iov(buf.as_mut_slice()),
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
                iovecs: iov(buf.as_mut_slice()),
            },
            1,
        )
        .unwrap();
        q.drain(&mut done).unwrap();
        assert_eq!(done[0].result, -libc::EINVAL);
    }
}
