//! Disk engines behind one interface: [`Disk`] (an opened backing store, shared by all
//! queues of an export) and [`DiskQueue`] (one virtqueue worker's asynchronous access to
//! it), with [`open`] as the one factory.
//!
//! Engines: [`RawDisk`] (raw files and block devices on io_uring, `disk/raw.rs`),
//! [`crate::qcow2::Qcow2Disk`] (qcow2 images through imago on io_uring),
//! [`NullDisk`] (stores nothing: a benchmarking aid), and, for tests,
//! `fault::FaultDisk` (feature `fault-injection`), which wraps another engine and fails,
//! delays or reorders chosen requests, and [`rbd::RbdDisk`] (Ceph RBD images through
//! librbd, loaded at run time, `disk/rbd/`). Adding an engine is: an
//! [`Format`] variant, a [`Disk`] implementation, and one arm in [`open`].
//!
//! Requests are submitted with a caller-chosen token and complete through
//! [`DiskQueue::reap`]; a queue signals completions on an eventfd so the worker's epoll
//! loop wakes up. An operation owns its data buffers ([`IoBuf`]) from [`DiskQueue::push`]
//! until its completion hands them back: safe code cannot free memory the kernel or an
//! image driver still accesses, and a queue dropped with operations in flight waits for
//! them first.
//!
//! Durability: an operation marked `durable` (writethrough, FUA) is durable when it
//! completes. On a raw file or block device a write carries `RWF_DSYNC`, and a discard or
//! zeroing (a fallocate) has an fdatasync linked after it (`IOSQE_IO_LINK`: it runs only
//! once the fallocate succeeded) and completes with that sync. Each queue counts its syncs
//! in [`DiskStats`], before the operation they belong to completes.

#[cfg(feature = "fault-injection")]
pub mod fault;
mod null;
mod raw;
pub mod rbd;

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::iobuf::IoBuf;
use crate::qcow2::{Qcow2Disk, Qcow2Options};
use crate::stats::DiskStats;

pub use null::NullDisk;
pub(crate) use raw::direct_alignment;
pub use raw::{RawDisk, RawDiskOptions, RawQueue};

/// One I/O operation on a disk. Offsets and lengths are in bytes.
#[derive(Debug)]
pub enum DiskOp {
    /// Read into `buf` (which must be writable: [`IoBuf::is_writable`]).
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination, owned by the operation until it completes.
        buf: IoBuf,
    },
    /// Write from `buf`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source, owned by the operation until it completes.
        buf: IoBuf,
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

impl DiskOp {
    /// Bytes a read or write transfers when it succeeds in full; 0 for the others.
    pub fn transfer_len(&self) -> u64 {
        match self {
            DiskOp::Read { buf, .. } | DiskOp::Write { buf, .. } => buf.len() as u64,
            DiskOp::Flush | DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => 0,
        }
    }

    /// Bytes the operation moves or covers (the metric): a transfer's length, a discarded
    /// or zeroed range's length.
    pub fn covered_len(&self) -> u64 {
        match self {
            DiskOp::Discard { len, .. } | DiskOp::WriteZeroes { len, .. } => *len,
            _ => self.transfer_len(),
        }
    }

    /// The operation's buffer, if it has one.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            DiskOp::Read { buf, .. } | DiskOp::Write { buf, .. } => Some(buf),
            DiskOp::Flush | DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => None,
        }
    }
}

/// A completed operation: its result, and its buffer handed back.
#[derive(Debug)]
pub struct DiskCompletion {
    /// The token given at submission.
    pub token: u64,
    /// Bytes transferred (reads/writes) or 0, or `-errno`.
    pub result: i32,
    /// The operation's buffer, handed back by every engine for every read and write (a
    /// bounce buffer holds the data read); its length is what the operation had to move.
    pub buf: Option<IoBuf>,
}

/// Per-queue asynchronous access to a disk.
pub trait DiskQueue: Send {
    /// Queues an operation; it is handed to the kernel by the next [`DiskQueue::submit`].
    /// The queue owns the operation (and its buffers) until its completion is reaped.
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
    /// Whether completions wait to be reaped, for a worker that busy-polls. The default
    /// asks the completion fd (a system call); engines with a shared-memory completion
    /// queue look at it instead.
    fn ready(&mut self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call, no timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }
    /// Stops (`false`) or restarts signalling the completion fd, while a worker busy-polls
    /// [`DiskQueue::ready`]. Completions that arrive while it is off are not signalled
    /// later: after turning it back on, check [`DiskQueue::ready`] once more. The default
    /// keeps signalling.
    fn set_notify(&mut self, _enabled: bool) {}
    /// This queue's sync counters, shared: a caller may keep them after handing the queue
    /// to a request handler.
    fn stats(&self) -> Arc<DiskStats>;
}

/// The eventfd a new queue signals: a clone of the `shared` notifier (which its owner
/// resets) or one of its own; `true` when it is its own, which the queue then resets
/// when it reaps.
pub(crate) fn queue_eventfd(shared: Option<&EventFd>) -> io::Result<(EventFd, bool)> {
    Ok(match shared {
        Some(e) => (e.try_clone()?, false),
        None => (EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?, true),
    })
}

/// What a completed flush (and a `durable` operation) guarantees, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` of the file or device (raw).
    DataSync,
    /// The image driver's cached metadata written out, then `fdatasync` (qcow2).
    FormatFlushThenDataSync,
    /// Nothing to make durable (opened read-only).
    ReadOnly,
    /// Every completed write is already on all replicas of a Ceph pool (RBD with librbd's
    /// cache off); a flush (`rbd_aio_flush`) only waits for writes in flight.
    Replicated,
    /// Nothing is stored (the null engine).
    Nothing,
}

/// A disk's capabilities, as request handling needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes when opened (a store may grow since: [`Disk::current_size`]).
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
    /// What a flush does.
    pub durability: Durability,
}

/// O_DIRECT alignment requirements, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlignment {
    /// Buffer addresses and lengths.
    pub memory: usize,
    /// File offsets and lengths.
    pub offset: usize,
}

/// Why a disk cannot back a device with `block_size`-byte logical blocks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockSizeError {
    /// O_DIRECT needs larger alignment than the exported block size.
    #[error("the backing file needs {alignment}-byte aligned direct I/O but logical_block_size is {block_size}; set logical_block_size: {alignment} or direct: false")]
    DirectAlignment {
        /// Required file offset alignment, in bytes.
        alignment: usize,
        /// Exported logical block size, in bytes.
        block_size: u32,
    },
    /// The disk is smaller than one logical block.
    #[error("the backing file is smaller than one logical block ({0} bytes)")]
    TooSmall(u32),
}

impl DiskInfo {
    /// Checks that a device can export this disk with `block_size`-byte logical blocks:
    /// every request is then block-aligned, which meets O_DIRECT's offset alignment, and
    /// the disk holds at least one block. The one place both devices check it.
    pub fn check_block_size(&self, block_size: u32) -> Result<(), BlockSizeError> {
        if let Some(direct) = self.direct {
            if direct.offset as u64 > u64::from(block_size) {
                return Err(BlockSizeError::DirectAlignment {
                    alignment: direct.offset,
                    block_size,
                });
            }
        }
        if self.size < u64::from(block_size) {
            return Err(BlockSizeError::TooSmall(block_size));
        }
        Ok(())
    }

    /// How the engine does I/O, for logs.
    pub fn io_mode(&self) -> String {
        match self.direct {
            None => "buffered".to_string(),
            Some(d) => format!(
                "O_DIRECT (memory align {}, offset align {})",
                d.memory, d.offset
            ),
        }
    }
}

/// An opened backing store, shared by all queues of an export (and the control path).
pub trait Disk: Send + Sync + fmt::Debug {
    /// The engine's name (`raw`, `qcow2`, ...), for logs.
    fn engine(&self) -> &'static str;
    /// Capabilities as opened.
    fn info(&self) -> DiskInfo;
    /// The path it was opened from.
    fn path(&self) -> &Path;
    /// The virtual size now, in bytes (it may have grown since it was opened).
    fn current_size(&self) -> io::Result<u64>;
    /// Grows the virtual size to `size` bytes (never shrinks); returns the size before.
    fn grow(&self, size: u64) -> io::Result<u64>;
    /// Makes completed writes durable, from the control path.
    fn sync(&self) -> io::Result<()>;
    /// A new per-queue I/O context for up to `depth` operations in flight, signalling
    /// `notifier` (shared by several queues, reset by its owner) or an eventfd of its own.
    fn open_queue(&self, depth: u32, notifier: Option<&EventFd>) -> io::Result<Box<dyn DiskQueue>>;
    /// Asks to have `hook` called (on any thread) when the store may have changed size
    /// underneath, for engines that hear of it (RBD: another client resized the image).
    /// Returns false when the engine cannot tell (files: growth is picked up at a reload).
    fn on_change(&self, _hook: Box<dyn Fn() + Send>) -> bool {
        false
    }
}

/// Image formats [`open`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A raw file or block device.
    Raw,
    /// A qcow2 image (and its backing chain).
    Qcow2,
    /// A Ceph RBD image ([`DiskSpec::rbd`] says which; `path` is only its name in logs).
    Rbd,
    /// Nothing: reads return zeroes, writes are dropped ([`NullDisk`], a benchmarking
    /// aid). The size is `create`'s; the path is not used.
    Null,
}

/// What to open.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Backing file, block device or image.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Open read-only.
    pub readonly: bool,
    /// Use O_DIRECT.
    pub direct: bool,
    /// Create it when missing: virtual size in bytes, and (qcow2) a backing file as
    /// written into the image.
    pub create: Option<(u64, Option<PathBuf>)>,
    /// The image and cluster of a [`Format::Rbd`] disk.
    pub rbd: Option<rbd::RbdOptions>,
}

/// Opens a backing store with the engine its format needs, and logs what it found once
/// (engine, size, I/O mode).
pub fn open(spec: &DiskSpec) -> Result<Arc<dyn Disk>, OpenError> {
    let disk: Arc<dyn Disk> = match spec.format {
        Format::Raw => Arc::new(RawDisk::open(&RawDiskOptions {
            path: spec.path.clone(),
            readonly: spec.readonly,
            direct: spec.direct,
            create_size: spec.create.as_ref().map(|(size, _)| *size),
        })?),
        Format::Qcow2 => Arc::new(Qcow2Disk::open(&Qcow2Options {
            path: spec.path.clone(),
            readonly: spec.readonly,
            direct: spec.direct,
            create: spec.create.clone(),
        })?),
        Format::Rbd => {
            let options = spec.rbd.as_ref().ok_or_else(|| OpenError::Rbd {
                image: spec.path.display().to_string(),
                message: "format rbd without the image's pool and name".into(),
            })?;
            Arc::new(rbd::RbdDisk::open(
                options,
                spec.readonly,
                spec.create.as_ref().map(|(size, _)| *size),
            )?)
        }
        Format::Null => Arc::new(NullDisk::new(
            spec.create.as_ref().map_or(0, |(size, _)| *size),
            spec.readonly,
        )),
    };
    let info = disk.info();
    tracing::info!(
        path = %spec.path.display(),
        engine = disk.engine(),
        size = info.size,
        readonly = info.readonly,
        io = info.io_mode(),
        "backing store open"
    );
    Ok(disk)
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
    /// An RBD image cannot be opened: librbd missing, cluster unreachable, no such pool or
    /// image, ...
    #[error("rbd image {image}: {message}")]
    Rbd {
        /// `pool/image` or `pool/namespace/image`.
        image: String,
        /// What failed, in words an operator can act on.
        message: String,
    },
    /// Another client (another appliance) holds the RBD image's exclusive lock: try again
    /// later (a standby waiting to take over).
    #[error("rbd image {image}: another client holds its exclusive lock (another appliance serving it?)")]
    RbdLockHeld {
        /// `pool/image` or `pool/namespace/image`.
        image: String,
    },
}
