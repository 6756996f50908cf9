//! qcow2 images, through `imago` (by QEMU's qcow2 maintainer): backing chains, compressed
//! clusters, internal snapshots left intact, discard and write-zeroes as qcow2 operations.
//!
//! imago runs in its synchronous mode. Each virtqueue gets a [`Qcow2Queue`]: a helper thread
//! that executes that queue's operations in order and signals completions on the queue's
//! eventfd, so the queue's worker thread never blocks on image I/O or metadata. One
//! [`FormatAccess`] is shared by all queues (imago is `Sync`); discards need exclusive
//! access and take the write side of a lock that reads and writes share.
//!
//! Images are locked the way QEMU locks them (OFD locks on bytes 100+perm and 200+perm), so
//! this daemon and a QEMU or qemu-img cannot both open an image for writing.

use std::fs::OpenOptions;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate};
use imago::{Storage, StorageCreateOptions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::{DiskCompletion, DiskInfo, DiskOp, DiskQueue, OpenError};

type Image = FormatAccess<ImagoFile>;

/// Options for [`Qcow2Disk::open`].
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// The image.
    pub path: PathBuf,
    /// Open read-only.
    pub readonly: bool,
    /// Create the image when missing: its virtual size and optional backing file
    /// (as written into the image: relative paths are resolved against the image's folder).
    pub create: Option<(u64, Option<PathBuf>)>,
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    image: Arc<RwLock<Image>>,
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
        let qcow2 = Qcow2::<ImagoFile>::builder_path(&path)
            .write(!options.readonly)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(fail)?;
        let image = FormatAccess::new(qcow2);
        let info = DiskInfo {
            size: image.size(),
            readonly: options.readonly,
            direct: None,
            is_block_device: false,
            // imago's discard_to_zero makes the range read back as zeroes in any image.
            deallocate_zeroes: true,
        };
        Ok(Qcow2Disk {
            image: Arc::new(RwLock::new(image)),
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

    /// Writes cached metadata and makes everything durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.info.readonly {
            return Ok(());
        }
        let image = self.image.read().unwrap_or_else(|p| p.into_inner());
        image.flush()?;
        image.sync()
    }

    /// A queue whose operations run on a helper thread, signalling `notifier` (or an eventfd
    /// of its own) on completion.
    pub fn new_queue(&self, notifier: Option<&EventFd>) -> io::Result<Qcow2Queue> {
        Qcow2Queue::new(Arc::clone(&self.image), notifier)
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
    let file = ImagoFile::create_open(StorageCreateOptions::new().filename(path))?;
    let mut builder = Qcow2::<ImagoFile>::create_builder(file).size(size);
    if let Some(backing) = backing {
        let format = backing_format(path, backing);
        builder = builder.backing(backing.to_string_lossy().into_owned(), format.into());
    }
    builder.create()
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

/// QEMU's block permission bits, as locked on the image (`raw_apply_lock_bytes`).
const PERM_CONSISTENT_READ: u64 = 0;
const PERM_WRITE: u64 = 1;
const PERM_RESIZE: u64 = 3;
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

fn ofd_lock(
    fd: RawFd,
    byte: i64,
    cmd: libc::c_int,
    kind: libc::c_short,
) -> io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: fcntl with an OFD lock command reads and (for GETLK) writes the flock struct,
    // which lives for the whole call.
    let rc = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if rc == 0 {
        Ok(fl)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes the locks QEMU takes for our use of the image, after checking nobody else's use
/// conflicts: readers share everything but resize; writers also do not share writing.
fn lock_image(path: &Path, writable: bool) -> io::Result<std::fs::File> {
    let file = OpenOptions::new().read(true).open(path)?;
    let fd = file.as_raw_fd();
    let mut perms = vec![PERM_CONSISTENT_READ];
    let mut unshared = vec![PERM_RESIZE];
    if writable {
        perms.push(PERM_WRITE);
        unshared.push(PERM_WRITE);
    }
    // Someone who does not share a permission we need, or holds one we do not share.
    let conflicts = perms
        .iter()
        .map(|p| (LOCK_SHARED_BASE + *p as i64, *p, "does not share"))
        .chain(
            unshared
                .iter()
                .map(|p| (LOCK_PERM_BASE + *p as i64, *p, "holds")),
        );
    for (byte, perm, what) in conflicts {
        let probe = ofd_lock(fd, byte, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short)?;
        if probe.l_type != libc::F_UNLCK as libc::c_short {
            let name = match perm {
                PERM_WRITE => "write",
                PERM_RESIZE => "resize",
                _ => "consistent read",
            };
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "image {} is in use: another process {what} the \"{name}\" permission (is a QEMU or another daemon using it?)",
                    path.display()
                ),
            ));
        }
    }
    for p in &perms {
        ofd_lock(
            fd,
            LOCK_PERM_BASE + *p as i64,
            libc::F_OFD_SETLK,
            libc::F_RDLCK as libc::c_short,
        )?;
    }
    for p in &unshared {
        ofd_lock(
            fd,
            LOCK_SHARED_BASE + *p as i64,
            libc::F_OFD_SETLK,
            libc::F_RDLCK as libc::c_short,
        )?;
    }
    Ok(file)
}

/// An operation for the helper thread. The iovecs point into guest memory or bounce buffers
/// that the submitter keeps alive until the completion is reaped.
struct Job {
    op: DiskOp,
    token: u64,
}

// SAFETY: the raw iovec pointers in `op` stay valid until the job's completion is reaped
// (the submitter's in-flight table owns the memory), and only the helper thread touches
// them meanwhile.
unsafe impl Send for Job {}

/// One queue's qcow2 I/O, executed in order on its helper thread.
pub struct Qcow2Queue {
    jobs: Option<Sender<Job>>,
    done: Receiver<DiskCompletion>,
    eventfd: EventFd,
    owns_eventfd: bool,
    queued: Vec<Job>,
    in_flight: usize,
    thread: Option<JoinHandle<()>>,
}

impl Qcow2Queue {
    fn new(image: Arc<RwLock<Image>>, notifier: Option<&EventFd>) -> io::Result<Self> {
        let (eventfd, owns_eventfd) = match notifier {
            Some(e) => (e.try_clone()?, false),
            None => (EventFd::new(EFD_NONBLOCK)?, true),
        };
        let signal = eventfd.try_clone()?;
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("qcow2-io".into())
            .spawn(move || {
                for job in job_rx {
                    let result = execute(&image, &job.op);
                    if done_tx
                        .send(DiskCompletion {
                            token: job.token,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                    let _ = signal.write(1);
                }
            })?;
        Ok(Qcow2Queue {
            jobs: Some(job_tx),
            done: done_rx,
            eventfd,
            owns_eventfd,
            queued: Vec::new(),
            in_flight: 0,
            thread: Some(thread),
        })
    }
}

/// Runs one operation; bytes transferred, or `-errno`.
fn execute(image: &RwLock<Image>, op: &DiskOp) -> i32 {
    let errno = |e: io::Error| -e.raw_os_error().unwrap_or(libc::EIO);
    let shared = || image.read().unwrap_or_else(|p| p.into_inner());
    match op {
        DiskOp::Read { offset, iovecs } => {
            let slices: Vec<IoSliceMut<'_>> = iovecs
                .iter()
                .map(|v| {
                    // SAFETY: see `Job`: each iovec is valid and writable for iov_len bytes
                    // until this operation completes, and nothing else accesses it meanwhile.
                    let bytes = unsafe {
                        std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                    };
                    IoSliceMut::new(bytes)
                })
                .collect();
            let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
            match shared().readv(IoVectorMut::from(slices), *offset) {
                Ok(()) => len as i32,
                Err(e) => errno(e),
            }
        }
        DiskOp::Write {
            offset,
            iovecs,
            durable,
        } => {
            let slices: Vec<IoSlice<'_>> = iovecs
                .iter()
                .map(|v| {
                    // SAFETY: see `Job`: each iovec is valid and readable for iov_len bytes
                    // until this operation completes.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
                    IoSlice::new(bytes)
                })
                .collect();
            let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
            let img = shared();
            let result = img.writev(IoVector::from(slices), *offset).and_then(|()| {
                if *durable {
                    img.flush()?;
                    img.sync()
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => len as i32,
                Err(e) => errno(e),
            }
        }
        DiskOp::Flush => {
            let img = shared();
            match img.flush().and_then(|()| img.sync()) {
                Ok(()) => 0,
                Err(e) => errno(e),
            }
        }
        // Discarded ranges read back as zeroes (SCSI LBPRZ and virtio-blk rely on it), and
        // never fall through to a backing file.
        DiskOp::Discard { offset, len }
        | DiskOp::WriteZeroes {
            offset,
            len,
            unmap: true,
        } => {
            let mut img = image.write().unwrap_or_else(|p| p.into_inner());
            match img.discard_to_zero(*offset, *len) {
                Ok(()) => 0,
                Err(e) => errno(e),
            }
        }
        DiskOp::WriteZeroes {
            offset,
            len,
            unmap: false,
        } => match shared().write_zeroes(*offset, *len) {
            Ok(()) => 0,
            Err(e) => errno(e),
        },
    }
}

impl DiskQueue for Qcow2Queue {
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()> {
        self.queued.push(Job { op, token });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        let Some(jobs) = &self.jobs else {
            return Err(io::Error::other("qcow2 queue is shut down"));
        };
        for job in self.queued.drain(..) {
            jobs.send(job)
                .map_err(|_| io::Error::other("qcow2 I/O thread is gone"))?;
            self.in_flight += 1;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        if self.owns_eventfd {
            let _ = self.eventfd.read();
        }
        while let Ok(c) = self.done.try_recv() {
            self.in_flight -= 1;
            out.push(c);
        }
    }

    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()> {
        self.submit()?;
        while self.in_flight > 0 {
            let c = self
                .done
                .recv()
                .map_err(|_| io::Error::other("qcow2 I/O thread is gone"))?;
            self.in_flight -= 1;
            out.push(c);
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.queued.len()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // Finish what the kernel-less "ring" holds before the memory it points to goes.
        let mut sink = Vec::new();
        if let Err(e) = self.drain(&mut sink) {
            tracing::error!("draining qcow2 I/O before drop failed: {e}");
        }
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
