//! [`UringFile`]: imago's `Storage` on io_uring, and the per-queue [`Ring`] it submits to.
//!
//! Every data and metadata access imago's qcow2 driver makes ends in a [`UringFile`] method.
//! An access made while a queue polls its requests (see [`Ring::enter`]) goes to that
//! queue's ring: the request is suspended until the completion arrives, so one queue keeps
//! many image requests in flight on one thread. An access made anywhere else (opening the
//! image, a flush from the control path) runs as a plain blocking system call.
//!
//! A ring is only ever used by the thread that polls its queue; the mutex around it exists
//! so the queue can move between threads before it starts, and is never contended. Each
//! ring counts the fdatasyncs completed on it (the queue's [`DiskStats`]).

use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageOpenOptions};
use io_uring::{squeue, IoUring};

use crate::disk::direct_alignment;
use crate::slab::Slab;
use crate::stats::DiskStats;
use crate::uring::{Syscall, PUNCH_HOLE};

thread_local! {
    /// The ring of the queue whose requests this thread is polling, if any.
    static CURRENT_RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
}

fn current_ring() -> Option<Arc<Ring>> {
    CURRENT_RING.with(|r| r.borrow().clone())
}

/// Runs `f` with `ring` (or no ring: blocking system calls) as this thread's current ring.
fn with_current_ring<R>(ring: Option<Arc<Ring>>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<Ring>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT_RING.with(|r| *r.borrow_mut() = previous);
        }
    }
    let previous = CURRENT_RING.with(|r| std::mem::replace(&mut *r.borrow_mut(), ring));
    let _restore = Restore(previous);
    f()
}

/// Runs `f` so that storage accesses inside it are blocking system calls.
pub(crate) fn without_ring<R>(f: impl FnOnce() -> R) -> R {
    with_current_ring(None, f)
}

/// One queue's io_uring and the operations in flight on it.
pub(crate) struct Ring {
    inner: Mutex<RingInner>,
    /// The queue's counters: fdatasyncs completed on this ring.
    stats: Arc<DiskStats>,
}

struct RingInner {
    uring: IoUring,
    slots: Slab<Slot>,
    /// Operations handed to the ring whose completion has not been collected.
    pending: usize,
    /// Operations handed to the ring since it was made (tests check the ring is used).
    #[cfg(test)]
    started: u64,
}

enum Slot {
    Waiting(Waker),
    Done(i32),
}

impl Ring {
    /// A ring of `entries` submission entries that signals `eventfd` on each completion.
    pub(crate) fn new(entries: u32, eventfd: RawFd) -> io::Result<Arc<Self>> {
        let uring = IoUring::builder().build(entries)?;
        uring.submitter().register_eventfd(eventfd)?;
        Ok(Arc::new(Ring {
            inner: Mutex::new(RingInner {
                uring,
                slots: Slab::default(),
                pending: 0,
                #[cfg(test)]
                started: 0,
            }),
            stats: Arc::new(DiskStats::default()),
        }))
    }

    /// The queue's counters.
    pub(crate) fn stats(&self) -> Arc<DiskStats> {
        Arc::clone(&self.stats)
    }

    /// Runs `f` with this ring as the thread's current ring.
    pub(crate) fn enter<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        with_current_ring(Some(Arc::clone(self)), f)
    }

    fn lock(&self) -> MutexGuard<'_, RingInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `entry`; `waker` is woken when it completes. Returns its slot.
    fn start(&self, entry: squeue::Entry, waker: Waker) -> io::Result<usize> {
        let mut inner = self.lock();
        let slot = inner.slots.insert(Slot::Waiting(waker));
        let entry = entry.user_data(slot as u64);
        // SAFETY: the buffers and iovec array `entry` points to belong to the `UringOp` that
        // built it, which does not release them before the completion for this slot arrives
        // (its `Drop` waits for it).
        let mut pushed = unsafe { inner.uring.submission().push(&entry).is_ok() };
        if !pushed {
            if let Err(e) = inner.uring.submit() {
                inner.slots.remove(slot);
                return Err(e);
            }
            // SAFETY: as above.
            pushed = unsafe { inner.uring.submission().push(&entry).is_ok() };
        }
        if !pushed {
            inner.slots.remove(slot);
            return Err(io::Error::other("io_uring submission queue stays full"));
        }
        inner.pending += 1;
        #[cfg(test)]
        {
            inner.started += 1;
        }
        Ok(slot)
    }

    /// The result of the operation in `slot` once it completed (freeing the slot), else
    /// `waker` replaces the one to wake.
    fn poll_slot(&self, slot: usize, waker: &Waker) -> Poll<i32> {
        let mut inner = self.lock();
        match inner.slots.get_mut(slot) {
            Some(Slot::Done(result)) => {
                let result = *result;
                inner.slots.remove(slot);
                Poll::Ready(result)
            }
            Some(Slot::Waiting(w)) => {
                if !w.will_wake(waker) {
                    *w = waker.clone();
                }
                Poll::Pending
            }
            None => Poll::Ready(-libc::EINVAL),
        }
    }

    /// Hands queued submissions to the kernel.
    pub(crate) fn submit(&self) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.uring.submission().is_empty() {
            return Ok(());
        }
        inner.uring.submit().map(|_| ())
    }

    /// Collects completions and wakes the operations they belong to.
    pub(crate) fn complete(&self) {
        let mut wakers = Vec::new();
        {
            let mut inner = self.lock();
            let RingInner {
                uring,
                slots,
                pending,
                ..
            } = &mut *inner;
            for cqe in uring.completion() {
                let Some(slot) = slots.get_mut(cqe.user_data() as usize) else {
                    continue;
                };
                if let Slot::Waiting(waker) = std::mem::replace(slot, Slot::Done(cqe.result())) {
                    wakers.push(waker);
                    *pending -= 1;
                }
            }
        }
        for waker in wakers {
            waker.wake();
        }
    }

    /// Operations handed to the ring and not yet completed.
    pub(crate) fn pending(&self) -> usize {
        self.lock().pending
    }

    /// Operations handed to the ring since it was made.
    #[cfg(test)]
    pub(crate) fn started(&self) -> u64 {
        self.lock().started
    }

    /// Waits until at least one more operation completes, then collects completions.
    pub(crate) fn wait(&self) -> io::Result<()> {
        {
            let inner = self.lock();
            if inner.pending == 0 {
                return Ok(());
            }
            match inner.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.complete();
        Ok(())
    }

    /// Blocks until the operation in `slot` completed and frees the slot.
    fn wait_for(&self, slot: usize) {
        loop {
            if self.poll_slot(slot, Waker::noop()).is_ready() {
                return;
            }
            if let Err(e) = self.wait() {
                // Without the completion the buffers must stay alive: leak rather than let
                // the kernel write to freed memory.
                tracing::error!("waiting for an io_uring completion failed: {e}");
                std::thread::park();
            }
        }
    }
}

// SAFETY: the ring holds no thread-bound state; it is used by one thread at a time (the
// one polling its queue) through the mutex.
unsafe impl Send for RingInner {}

/// One system call, submitted to the current ring or run blocking; it owns the iovec array
/// the kernel reads (the buffers belong to the future that awaits it).
enum Request {
    Readv {
        fd: RawFd,
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    Writev {
        fd: RawFd,
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    Fallocate {
        fd: RawFd,
        offset: u64,
        len: u64,
        mode: i32,
    },
    Fdatasync {
        fd: RawFd,
    },
}

impl Request {
    fn syscall(&self) -> Syscall<'_> {
        match *self {
            Request::Readv {
                fd,
                offset,
                ref iovecs,
            } => Syscall::Readv { fd, offset, iovecs },
            Request::Writev {
                fd,
                offset,
                ref iovecs,
            } => Syscall::Writev {
                fd,
                offset,
                iovecs,
                dsync: false,
            },
            Request::Fallocate {
                fd,
                offset,
                len,
                mode,
            } => Syscall::Fallocate {
                fd,
                offset,
                len,
                mode,
            },
            Request::Fdatasync { fd } => Syscall::Fdatasync { fd },
        }
    }
}

/// A [`Request`] in flight: resolves to the byte count, or an error.
struct UringOp {
    request: Request,
    state: OpState,
}

enum OpState {
    New,
    InFlight { ring: Arc<Ring>, slot: usize },
    Finished,
}

// SAFETY: the iovecs point to buffers owned by the future that awaits this operation; which
// thread holds the operation does not change their validity.
unsafe impl Send for UringOp {}

/// Runs `request` on the current ring (or blocking): the byte count, or the error.
async fn run(request: Request) -> io::Result<u64> {
    let result = UringOp {
        request,
        state: OpState::New,
    }
    .await;
    if result >= 0 {
        Ok(result as u64)
    } else {
        Err(io::Error::from_raw_os_error(-result))
    }
}

impl Future for UringOp {
    type Output = i32;

    /// The result; a transient error (EINTR, EAGAIN) resubmits the same request.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = self.get_mut();
        loop {
            let result = match &this.state {
                OpState::New => match current_ring() {
                    // SAFETY: the iovecs describe buffers of the future awaiting this
                    // operation, valid while it is polled.
                    None => unsafe { this.request.syscall().run_blocking() },
                    Some(ring) => {
                        match ring.start(this.request.syscall().entry(), cx.waker().clone()) {
                            Ok(slot) => {
                                this.state = OpState::InFlight { ring, slot };
                                return Poll::Pending;
                            }
                            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                        }
                    }
                },
                OpState::InFlight { ring, slot } => match ring.poll_slot(*slot, cx.waker()) {
                    Poll::Ready(result) => {
                        // Counted before the request that waits for it can complete.
                        if result >= 0 && matches!(this.request, Request::Fdatasync { .. }) {
                            ring.stats.syncs.fetch_add(1, Ordering::Relaxed);
                        }
                        result
                    }
                    Poll::Pending => return Poll::Pending,
                },
                OpState::Finished => return Poll::Ready(-libc::EINVAL),
            };
            if result == -libc::EINTR || result == -libc::EAGAIN {
                this.state = OpState::New;
                continue;
            }
            this.state = OpState::Finished;
            return Poll::Ready(result);
        }
    }
}

impl Drop for UringOp {
    fn drop(&mut self) {
        // The kernel may still use our buffers: wait for the completion before they go.
        if let OpState::InFlight { ring, slot } = &self.state {
            ring.wait_for(*slot);
        }
    }
}

/// An image file (or a file of its backing chain) accessed through io_uring.
pub struct UringFile {
    file: File,
    path: PathBuf,
    /// Alignment the kernel needs for buffers and offsets (1 when buffered).
    mem_align: usize,
    req_align: usize,
    /// File system block size: the granularity of hole punching.
    block_size: usize,
    /// The file length, grown by every write that reaches past it.
    size: AtomicU64,
    /// Writes hold it shared and resizing exclusively, so a resize sees every write's growth.
    growth: tokio::sync::RwLock<()>,
    helper: CommonStorageHelper,
}

impl UringFile {
    fn open_file(path: &Path, writable: bool, direct: bool) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(writable);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path)?;
        let size = file.metadata()?.len();
        let (mem_align, req_align) = if direct {
            direct_alignment(&file)
        } else {
            (1, 1)
        };
        let block_size = fs_block_size(&file).max(req_align);
        Ok(UringFile {
            file,
            path: path.to_path_buf(),
            mem_align,
            req_align,
            block_size,
            size: AtomicU64::new(size),
            growth: tokio::sync::RwLock::new(()),
            helper: CommonStorageHelper::default(),
        })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Punches a hole over the part of the range inside the file (reads back as zeroes).
    async fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        let size = self.size.load(Ordering::Relaxed);
        if offset >= size {
            return Ok(());
        }
        let request = Request::Fallocate {
            fd: self.fd(),
            offset,
            len: length.min(size - offset),
            mode: PUNCH_HOLE,
        };
        run(request).await.map(|_| ())
    }

    /// Grows the file to `end` (never shrinks it).
    async fn grow_to(&self, end: u64) -> io::Result<()> {
        let _exclusive = self.growth.write().await;
        if end > self.size.load(Ordering::Relaxed) {
            self.file.set_len(end)?;
            self.size.fetch_max(end, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The file system's block size (4096 when it cannot be read).
fn fs_block_size(file: &File) -> usize {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a `struct statfs` into the buffer, which is large enough.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return 4096;
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    let frsize = unsafe { stat.assume_init() }.f_frsize;
    usize::try_from(frsize)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

impl fmt::Debug for UringFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringFile")
            .field("path", &self.path)
            .field("size", &self.size.load(Ordering::Relaxed))
            .finish()
    }
}

impl fmt::Display for UringFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

impl Storage for UringFile {
    async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::other("no file name given"))?;
        UringFile::open_file(path, opts.get_writable(), opts.get_direct())
    }

    fn mem_align(&self) -> usize {
        self.mem_align
    }

    fn req_align(&self) -> usize {
        self.req_align
    }

    fn zero_align(&self) -> usize {
        self.block_size
    }

    fn discard_align(&self) -> usize {
        self.block_size
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let dir = self
            .path
            .parent()
            .ok_or_else(|| io::Error::other("image path has no parent folder"))?;
        Ok(dir.join(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    async unsafe fn pure_readv(
        &self,
        mut bufv: IoVectorMut<'_>,
        mut offset: u64,
    ) -> io::Result<()> {
        while !bufv.is_empty() {
            // SAFETY: the iovecs describe `bufv`, which outlives the request (`UringOp`
            // waits for its completion even when dropped).
            let iovecs = unsafe { bufv.as_iovec() }.to_vec();
            let request = Request::Readv {
                fd: self.fd(),
                offset,
                iovecs,
            };
            let len = run(request).await?;
            if len == 0 {
                // End of file: the rest reads as zeroes.
                bufv.fill(0);
                break;
            }
            bufv = bufv.split_tail_at(len);
            offset = offset
                .checked_add(len)
                .ok_or_else(|| io::Error::other("read offset overflow"))?;
        }
        Ok(())
    }

    async unsafe fn pure_writev(&self, mut bufv: IoVector<'_>, mut offset: u64) -> io::Result<()> {
        let _shared = self.growth.read().await;
        while !bufv.is_empty() {
            // SAFETY: as in `pure_readv`.
            let iovecs = unsafe { bufv.as_iovec() }.to_vec();
            let request = Request::Writev {
                fd: self.fd(),
                offset,
                iovecs,
            };
            let len = run(request).await?;
            if len == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bufv = bufv.split_tail_at(len);
            offset = offset
                .checked_add(len)
                .ok_or_else(|| io::Error::other("write offset overflow"))?;
            self.size.fetch_max(offset, Ordering::Relaxed);
        }
        Ok(())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| io::Error::other("write-zeroes range wraps around"))?;
        self.punch_hole(offset, length).await?;
        // Unlike a discard, writing zeroes grows the file when the range reaches past it.
        if end > self.size.load(Ordering::Relaxed) {
            self.grow_to(end).await?;
        }
        Ok(())
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let _shared = self.growth.read().await;
        let request = Request::Fallocate {
            fd: self.fd(),
            offset,
            len: length,
            mode: libc::FALLOC_FL_ZERO_RANGE,
        };
        run(request).await?;
        self.size
            .fetch_max(offset.saturating_add(length), Ordering::Relaxed);
        Ok(())
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        match self.punch_hole(offset, length).await {
            // A discard may do nothing at all.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        // Nothing is buffered in user space.
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        run(Request::Fdatasync { fd: self.fd() }).await.map(|_| ())
    }

    // Every request completes before its future goes away (`UringOp`'s `Drop` waits), so
    // no write can land after it was dropped: there is nothing to settle.
    async fn settle_writes(&self) -> io::Result<()> {
        Ok(())
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    async fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        match prealloc_mode {
            PreallocateMode::None | PreallocateMode::Zero => {}
            _ => return Err(io::ErrorKind::Unsupported.into()),
        }
        let _exclusive = self.growth.write().await;
        self.file.set_len(new_size)?;
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }
}
