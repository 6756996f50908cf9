//! qcow2 images, through `imago` (by QEMU's qcow2 maintainer) on io_uring: backing chains,
//! compressed clusters, internal snapshots left intact, discard and write-zeroes as qcow2
//! operations.
//!
//! Zeroing follows QEMU's qcow2 driver. A v3 image marks clusters zero in its metadata
//! (partial clusters get zero data). A v2 image (compat=0.10) has no zero flag: where no
//! backing file can show through, unmapping deallocates whole clusters, which then read as
//! zeroes; everywhere else zeroes are written as data, in bounded chunks from one shared
//! zero buffer. A discard must not expose a backing file either: on a v2 image with a
//! backing file it is a no-op (and [`DiskInfo::discard_zeroes`] says so, so SCSI LUNs do
//! not claim LBPRZ). A request marked `durable` (writethrough, FUA) flushes imago's
//! metadata and syncs the image before it completes.
//!
//! imago's qcow2 driver is async and runs on no runtime: each virtqueue gets a
//! [`Qcow2Queue`], a small executor that turns every request into a task and polls it on the
//! queue's own thread. The storage underneath (`UringFile`) submits the data and metadata
//! accesses of those tasks to the queue's io_uring, so a queue keeps many image requests in
//! flight without helper threads; completions and wake-ups from other queues (imago's
//! metadata locks are shared) arrive on the queue's eventfd. One [`FormatAccess`] is shared
//! by all queues; discards need exclusive access and take the write side of an async lock
//! that reads and writes share.
//!
//! Images are locked the way QEMU locks them (`lock`), so this daemon and a QEMU or
//! qemu-img cannot both open an image for writing. Headers imago would trip over are
//! refused before it parses them (`header`).

mod header;
mod lock;
mod queue;
#[cfg(test)]
mod tests;
mod uring_file;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};

use imago::file::File as ImagoFile;
use imago::format::PreallocateMode;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::ShallowMapping;
use imago::{FormatAccess, FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate};
use imago::{Storage, StorageCreateOptions, StorageOpenOptions};
use tokio::sync::RwLock;
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{DirectAlignment, Disk, DiskInfo, DiskOp, DiskQueue, Durability, OpenError};
use crate::iobuf::{AlignedBuf, IoBuf};
use lock::lock_image;
use queue::Executor;
pub use queue::Qcow2Queue;
use uring_file::{without_ring, UringFile};

type Image = RwLock<FormatAccess<UringFile>>;

/// Bytes of zero data written per request to the image when the format cannot mark a range
/// zero (qcow2 v2): the size of the one zero buffer every queue shares.
const ZERO_CHUNK: usize = 1 << 20;

/// How an image can make a range read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Zeroing {
    /// Zero clusters in the metadata (qcow2 v3).
    zero_clusters: bool,
    /// A backing file shows through unallocated clusters.
    backing: bool,
}

/// Options for [`Qcow2Disk::open`].
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// The image.
    pub path: PathBuf,
    /// Open read-only.
    pub readonly: bool,
    /// Use O_DIRECT for the image and its backing chain (imago pads unaligned requests).
    pub direct: bool,
    /// Create the image when missing: its virtual size and optional backing file
    /// (as written into the image: relative paths are resolved against the image's folder).
    pub create: Option<(u64, Option<PathBuf>)>,
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    shared: Arc<Shared>,
    info: DiskInfo,
    path: PathBuf,
    /// Holds the QEMU-style image locks for as long as the image is open.
    _lock: std::fs::File,
}

impl Qcow2Disk {
    /// Opens (and if asked, creates) a qcow2 image with its backing chain.
    pub fn open(options: &Qcow2Options) -> Result<Self, OpenError> {
        let path = options.path.clone();
        let fail = |source: io::Error| OpenError::Open {
            path: path.clone(),
            source,
        };
        if !path.exists() {
            match &options.create {
                None => return Err(OpenError::Missing(path)),
                Some((size, backing)) => {
                    create_image(&path, *size, backing.as_deref()).map_err(|source| {
                        OpenError::Create {
                            path: path.clone(),
                            source,
                        }
                    })?
                }
            }
        }
        let lock = lock_image(&path, !options.readonly).map_err(fail)?;
        header::check(&lock).map_err(fail)?;
        let qcow2 = block_on(
            Qcow2::<UringFile>::builder_path(&path)
                .write(!options.readonly)
                .storage_open_options(
                    StorageOpenOptions::new()
                        .write(!options.readonly)
                        .direct(options.direct),
                )
                .open(PermissiveImplicitOpenGate::default()),
        )
        .map_err(fail)?;
        let backing = qcow2.implicit_backing_file().is_some();
        let image = FormatAccess::new(qcow2);
        let zeroing = Zeroing {
            zero_clusters: image.inner().zero_granularity().is_some(),
            backing,
        };
        if !zeroing.zero_clusters && !options.readonly {
            tracing::info!(
                path = %path.display(),
                backing,
                "qcow2 v2 image (compat=0.10, no zero clusters): write-zeroes writes zero data{}",
                if backing {
                    "; discard is a no-op (it would expose the backing file)"
                } else {
                    " except where it may deallocate whole clusters"
                }
            );
        }
        let info = DiskInfo {
            size: image.size(),
            readonly: options.readonly,
            // imago pads unaligned offsets itself; buffers it would otherwise copy are
            // bounced by the request layer into buffers of the alignment it needs.
            direct: options.direct.then(|| DirectAlignment {
                memory: image.mem_align(),
                offset: 1,
            }),
            is_block_device: false,
            // Zero clusters, deallocation or zero data: write-zeroes works on every image.
            deallocate_zeroes: true,
            discard_zeroes: zeroing.zero_clusters || !zeroing.backing,
            durability: if options.readonly {
                Durability::ReadOnly
            } else {
                Durability::FormatFlushThenDataSync
            },
        };
        let zero_align = image.mem_align().max(1);
        Ok(Qcow2Disk {
            shared: Arc::new(Shared {
                image: RwLock::new(image),
                executors: Mutex::new(Vec::new()),
                zeroing,
                zero_align,
                zero_chunk: OnceLock::new(),
            }),
            info,
            path,
            _lock: lock,
        })
    }

    /// Size and mode.
    pub fn info(&self) -> DiskInfo {
        self.info
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's virtual size now, in bytes.
    pub fn current_size(&self) -> u64 {
        block_on(async { self.shared.image.read().await.size() })
    }

    /// Grows the image's virtual size to `size` bytes through imago (the L1 table grows,
    /// nothing is allocated), as `qemu-img resize` does: the new range reads as zeroes,
    /// also where a longer backing file lies underneath (imago's `PreallocateMode::Zero`
    /// then marks it zero). The header is written and the image synced before this returns.
    /// A smaller or equal size changes nothing. Requests keep running meanwhile: growth
    /// only takes imago's own metadata locks. Returns the size before.
    pub fn grow(&self, size: u64) -> io::Result<u64> {
        if self.info.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is open read-only", self.path.display()),
            ));
        }
        let mode = if self.shared.zeroing.backing {
            PreallocateMode::Zero
        } else {
            PreallocateMode::None
        };
        block_on(async {
            let image = self.shared.image.read().await;
            let before = image.size();
            if size > before {
                image.resize_grow(size, mode).await?;
                image.flush().await?;
                image.sync().await?;
            }
            Ok(before)
        })
    }

    /// Writes cached metadata and makes everything durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.info.readonly {
            return Ok(());
        }
        block_on(async {
            let image = self.shared.image.read().await;
            image.flush().await?;
            image.sync().await
        })
    }

    /// A queue with its own io_uring for about `depth` requests in flight, signalling
    /// `notifier` (or an eventfd of its own) on completion.
    pub fn new_queue(&self, depth: u32, notifier: Option<&EventFd>) -> io::Result<Qcow2Queue> {
        Qcow2Queue::new(Arc::clone(&self.shared), depth, notifier)
    }
}

impl Disk for Qcow2Disk {
    fn engine(&self) -> &'static str {
        "qcow2"
    }

    fn info(&self) -> DiskInfo {
        self.info
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn current_size(&self) -> io::Result<u64> {
        Ok(Qcow2Disk::current_size(self))
    }

    fn grow(&self, size: u64) -> io::Result<u64> {
        Qcow2Disk::grow(self, size)
    }

    fn sync(&self) -> io::Result<()> {
        Qcow2Disk::sync(self)
    }

    fn open_queue(&self, depth: u32, notifier: Option<&EventFd>) -> io::Result<Box<dyn DiskQueue>> {
        Ok(Box::new(self.new_queue(depth, notifier)?))
    }
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn create_image(path: &Path, size: u64, backing: Option<&Path>) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if let Some(backing) = backing {
        // Refuse a dangling backing file now rather than at first read.
        let resolved = match path.parent() {
            Some(dir) if backing.is_relative() => dir.join(backing),
            _ => backing.to_path_buf(),
        };
        if !resolved.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("backing file {} does not exist", resolved.display()),
            ));
        }
    }
    // Creating is a one-off on the control path: imago's own blocking file does it.
    block_on(async {
        let file = ImagoFile::create_open(StorageCreateOptions::new().filename(path)).await?;
        let mut builder = Qcow2::<ImagoFile>::create_builder(file).size(size);
        if let Some(backing) = backing {
            let format = backing_format(path, backing);
            builder = builder.backing(backing.to_string_lossy().into_owned(), format.into());
        }
        builder.create().await
    })
}

/// `qcow2` if the backing file starts with the qcow2 magic, else `raw`.
fn backing_format(image: &Path, backing: &Path) -> &'static str {
    let resolved = match image.parent() {
        Some(dir) if backing.is_relative() => dir.join(backing),
        _ => backing.to_path_buf(),
    };
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(resolved)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 {
        "qcow2"
    } else {
        "raw"
    }
}

/// Polls `future` to completion on this thread, with storage accesses as blocking system
/// calls (for the control path: opening, creating, flushing from outside a queue).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    without_ring(|| loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    })
}

/// A guest request as its task sees it: the operation, which owns its buffers for as long
/// as the task runs.
struct Request(DiskOp);

impl Request {
    /// Runs the request against the image: bytes transferred, or `-errno`; and the
    /// operation's buffer, handed back.
    async fn execute(self, shared: Arc<Shared>) -> (i32, Option<IoBuf>) {
        let Request(op) = self;
        match op {
            DiskOp::Read { offset, mut buf } => {
                let result = Self::read(&shared, offset, &mut buf).await;
                (errno_result(result), Some(buf))
            }
            DiskOp::Write {
                offset,
                buf,
                durable,
            } => {
                let result = Self::write(&shared, offset, &buf, durable).await;
                (errno_result(result), Some(buf))
            }
            op => (errno_result(Self::other(&shared, op).await), None),
        }
    }

    /// Reads into `buf`, borrowed for the read (the task owns it).
    async fn read(shared: &Shared, offset: u64, buf: &mut IoBuf) -> io::Result<usize> {
        let len = buf.len();
        let bufs = buf.io_slices_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a read into a read-only or self-overlapping buffer",
            )
        })?;
        let img = shared.image.read().await;
        img.readv(IoVectorMut::from(bufs), offset)
            .await
            .map(|()| len)
    }

    /// Writes `buf`, borrowed for the write (the task owns it).
    async fn write(shared: &Shared, offset: u64, buf: &IoBuf, durable: bool) -> io::Result<usize> {
        let len = buf.len();
        let img = shared.image.read().await;
        let mut result = img.writev(IoVector::from(buf.io_slices()), offset).await;
        if durable && result.is_ok() {
            result = img.flush().await;
            if result.is_ok() {
                result = img.sync().await;
            }
        }
        result.map(|()| len)
    }

    /// Flush, discard and write-zeroes: no data buffers.
    async fn other(shared: &Shared, op: DiskOp) -> io::Result<usize> {
        let image = &shared.image;
        match op {
            DiskOp::Read { .. } | DiskOp::Write { .. } => Err(io::ErrorKind::InvalidInput.into()),
            DiskOp::Flush => {
                let img = image.read().await;
                match img.flush().await {
                    Ok(()) => img.sync().await.map(|()| 0),
                    Err(e) => Err(e),
                }
            }
            DiskOp::Discard {
                offset,
                len,
                durable,
            } => {
                if shared.zeroing.zero_clusters || !shared.zeroing.backing {
                    // Discarded ranges read back as zeroes (SCSI LBPRZ relies on it) and
                    // never fall through to a backing file.
                    shared.deallocate(offset, len, durable).await.map(|()| 0)
                } else {
                    // v2 with a backing file: deallocating would expose the backing file
                    // and hiding it would allocate the range. A discard is a hint.
                    Ok(0)
                }
            }
            DiskOp::WriteZeroes {
                offset,
                len,
                unmap,
                durable,
            } => {
                let zeroing = shared.zeroing;
                let result = if unmap && (zeroing.zero_clusters || !zeroing.backing) {
                    shared.deallocate(offset, len, durable).await
                } else if zeroing.zero_clusters {
                    let img = image.read().await;
                    let result = img.write_zeroes(offset, len).await;
                    durable_after(&img, result, durable).await
                } else {
                    // No zero flag (v2): zero data, as QEMU writes it.
                    let img = image.read().await;
                    let result = shared.write_zero_data(&img, offset, len).await;
                    durable_after(&img, result, durable).await
                };
                result.map(|()| 0)
            }
        }
    }
}

/// A request's result as a completion carries it: bytes, or `-errno`.
fn errno_result(result: io::Result<usize>) -> i32 {
    match result {
        Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Makes a successful `result` durable when asked: imago's cached metadata written out,
/// then the image synced.
async fn durable_after(
    img: &FormatAccess<UringFile>,
    result: io::Result<()>,
    durable: bool,
) -> io::Result<()> {
    result?;
    if durable {
        img.flush().await?;
        img.sync().await?;
    }
    Ok(())
}

/// The image, and every queue's executor: a queue waiting for a lock can drive the queue
/// whose task holds it when no thread polls that one (a disconnect drains queues one by
/// one, on one thread).
struct Shared {
    image: Image,
    executors: Mutex<Vec<Weak<Mutex<Executor>>>>,
    zeroing: Zeroing,
    /// Alignment of the zero buffer (imago's memory alignment), so O_DIRECT needs no copy.
    zero_align: usize,
    /// [`ZERO_CHUNK`] zero bytes, allocated on first use and only ever read: the data of
    /// every zeroing an image without zero clusters does.
    zero_chunk: OnceLock<Option<AlignedBuf>>,
}

impl Shared {
    /// Makes `[offset, offset + len)` read as zeroes, deallocating what may be: zero
    /// clusters on v3 (imago's discard_to_zero); on v2, only where no backing file shows
    /// through, whole clusters deallocated and the partial ones around them zeroed as data.
    /// Takes the image exclusively: deallocating breaks mappings other requests may hold.
    async fn deallocate(&self, offset: u64, len: u64, durable: bool) -> io::Result<()> {
        let mut img = self.image.write().await;
        let result = if self.zeroing.zero_clusters {
            img.discard_to_zero(offset, len).await
        } else if self.zeroing.backing {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "deallocating would expose the backing file",
            ))
        } else {
            self.deallocate_v2(&mut img, offset, len).await
        };
        durable_after(&img, result, durable).await
    }

    /// v2 without a backing file: unallocated clusters read as zeroes, so whole clusters are
    /// deallocated and the rest of the range gets zero data.
    async fn deallocate_v2(
        &self,
        img: &mut FormatAccess<UringFile>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut pos = offset;
        while pos < end {
            // The whole clusters of [pos, end), as far as one L2 table reaches.
            let (start, done) = img.inner_mut().discard_to_backing(pos, end - pos).await?;
            if done == 0 {
                break;
            }
            self.write_zero_data(img, pos, start.saturating_sub(pos))
                .await?;
            pos = start.saturating_add(done);
        }
        self.write_zero_data(img, pos, end.saturating_sub(pos))
            .await
    }

    /// Writes zeroes as data over `[offset, offset + len)` where it does not read as zeroes
    /// already (this layer's zero or, without a backing file, unallocated clusters), in
    /// [`ZERO_CHUNK`] pieces from the shared zero buffer.
    async fn write_zero_data(
        &self,
        img: &FormatAccess<UringFile>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut pos = offset;
        while pos < end {
            let (already_zero, past_end, mapped) = {
                let (mapping, mapped) = img.get_shallow_mapping(pos, end - pos).await?;
                (
                    matches!(mapping, ShallowMapping::Zero { .. }),
                    matches!(mapping, ShallowMapping::Eof { .. }),
                    mapped.min(end - pos),
                )
            };
            if past_end || mapped == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !already_zero {
                let zeroes = self.zero_chunk()?;
                let piece_end = pos + mapped;
                let mut at = pos;
                while at < piece_end {
                    let n = (piece_end - at).min(zeroes.len() as u64) as usize;
                    img.write(&zeroes[..n], at).await?;
                    at += n as u64;
                }
            }
            pos += mapped;
        }
        Ok(())
    }

    /// The shared zero buffer.
    fn zero_chunk(&self) -> io::Result<&[u8]> {
        self.zero_chunk
            .get_or_init(|| AlignedBuf::new(ZERO_CHUNK, self.zero_align))
            .as_ref()
            .map(AlignedBuf::as_slice)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    /// Polls every other queue's tasks that no thread is polling right now.
    fn drive_others(&self, own: &Arc<Mutex<Executor>>) {
        let others: Vec<Arc<Mutex<Executor>>> = self
            .executors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|e| !Arc::ptr_eq(e, own))
            .collect();
        for other in others {
            if let Ok(mut exec) = other.try_lock() {
                exec.run_for_owner();
            }
        }
    }
}
