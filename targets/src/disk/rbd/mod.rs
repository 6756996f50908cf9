//! The Ceph RBD engine: an image in a Ceph pool through librbd's asynchronous C API
//! (`ffi`, loaded at run time), one cluster handle per daemon and client identity, one
//! image handle per LUN shared by all its queues (`queue::RbdQueue`).
//!
//! - RBD's client cache is off (`rbd_cache = false`, as QEMU's `cache.direct=on` and SPDK
//!   do): a write completes once every replica has it, so the guest's write cache and
//!   flush semantics stay the daemon's ([`Durability::Replicated`]).
//! - Discard is a hint on RBD: librbd drops the parts of a discard smaller than its
//!   discard granularity, so a discarded range need not read back as zeroes
//!   (`discard_zeroes` false: SCSI LBPRZ clear). Zeroing is `rbd_aio_write_zeroes`, which
//!   always reads back as zeroes (thick: in place, when the request may not unmap).
//! - A writable image is held under librbd's exclusive lock in its managed mode
//!   (`rbd_lock_acquire`): other clients are refused the lock instead of being handed it,
//!   so two appliances never write one image. Opening an image whose lock another client
//!   holds fails at once with [`OpenError::RbdLockHeld`]; the daemon retries it (a
//!   standby). The lock of an appliance that died is broken (its client blocklisted) by the
//!   next attempt after its watch on the image expired (`osd_client_watch_timeout`, 30 s by
//!   default): that is failover.
//! - The image's size is librbd's view of its header, kept current by librbd's own watch:
//!   growth by another client (`rbd resize`) shows in [`Disk::current_size`], and
//!   [`Disk::on_change`] calls back when the header changes.
//! - [`RbdOptions::io_timeout`] bounds how long an operation waits for an unreachable
//!   cluster (librados `rados_osd_op_timeout`): past it the operation fails with
//!   `ETIMEDOUT`, which the guest sees as an I/O error. Unset, I/O waits for the cluster
//!   as long as it takes, as QEMU's rbd driver does.

mod ffi;
mod queue;

use std::ffi::{c_int, c_void, CString};
use std::io;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{Disk, DiskInfo, DiskQueue, Durability, OpenError};
use queue::RbdQueue;

/// Where an RBD image is and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// Pool name.
    pub pool: String,
    /// RADOS namespace inside the pool (`None`: the default namespace).
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// `ceph.conf` (`None`: librados's search: `$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...).
    pub conf: Option<PathBuf>,
    /// Client id without `client.` (`None`: `admin`).
    pub client_id: Option<String>,
    /// Keyring file (`None`: what `ceph.conf` says).
    pub keyring: Option<PathBuf>,
    /// How long an operation may wait for an unreachable cluster before it fails with
    /// `ETIMEDOUT` (librados `rados_osd_op_timeout`, `rados_mon_op_timeout`); `None`:
    /// as long as it takes. Whole seconds (librados's unit); at least 1 s.
    pub io_timeout: Option<Duration>,
}

impl RbdOptions {
    /// `pool/namespace/image`, as `rbd` spells an image.
    pub fn spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

/// How long `rados_connect` may take: the cluster's monitors must answer within it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `ceph.conf`, client id, keyring and timeout: what makes two cluster handles different.
type ClusterKey = (
    Option<PathBuf>,
    Option<String>,
    Option<PathBuf>,
    Option<Duration>,
);

/// A connected librados client (`rados_t`), shared by every image opened with the same
/// [`ClusterKey`]; it runs ~17 threads of its own. Kept for the daemon's life once
/// connected: a standby retrying an image every second, or a reload that reopens one,
/// reuses it instead of reconnecting.
struct Cluster {
    api: &'static ffi::Api,
    handle: ffi::RadosT,
    key: ClusterKey,
}

// SAFETY: a `rados_t` is used from any thread (librados serialises internally); this type
// only passes the handle to librados calls.
unsafe impl Send for Cluster {}
// SAFETY: as above; shared access only calls thread-safe librados functions.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was connected in `Cluster::connect`; every ioctx and image of
        // it holds an `Arc<Cluster>`, so none is left.
        unsafe { (self.api.rados_shutdown)(self.handle) };
    }
}

/// `-errno` from a Ceph call as an `io::Error` with `what` in front.
fn ceph_err(rc: c_int, what: impl std::fmt::Display) -> io::Error {
    let e = io::Error::from_raw_os_error(-rc);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cstring(text: &str, what: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {text:?} contains a NUL byte"),
        )
    })
}

fn path_cstring(path: &Path, what: &str) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {} contains a NUL byte", path.display()),
        )
    })
}

impl Cluster {
    /// The daemon's handle for `key`, connecting one the first time.
    fn get(api: &'static ffi::Api, key: ClusterKey) -> io::Result<Arc<Cluster>> {
        static CLUSTERS: Mutex<Vec<Arc<Cluster>>> = Mutex::new(Vec::new());
        let mut clusters = CLUSTERS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clusters.iter().find(|c| c.key == key) {
            return Ok(Arc::clone(c));
        }
        let cluster = Arc::new(Cluster::connect(api, key)?);
        clusters.push(Arc::clone(&cluster));
        Ok(cluster)
    }

    fn connect(api: &'static ffi::Api, key: ClusterKey) -> io::Result<Cluster> {
        let (conf, client_id, keyring, timeout) = &key;
        let id = cstring(client_id.as_deref().unwrap_or("admin"), "client id")?;
        let mut handle: ffi::RadosT = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; `id` a NUL-terminated string that
        // librados copies.
        let rc = unsafe { (api.rados_create)(&mut handle, id.as_ptr()) };
        if rc < 0 {
            return Err(ceph_err(rc, "rados_create"));
        }
        // From here the handle is shut down on every path (Drop).
        let cluster = Cluster {
            api,
            handle,
            key: key.clone(),
        };
        let conf_c = conf
            .as_deref()
            .map(|p| path_cstring(p, "ceph.conf"))
            .transpose()?;
        // SAFETY: a created, unconnected handle; a NUL-terminated path or NULL (search the
        // default locations).
        let rc = unsafe {
            (api.rados_conf_read_file)(handle, conf_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        if rc < 0 {
            let which = match conf {
                Some(p) => p.display().to_string(),
                None => "the default ceph.conf ($CEPH_CONF, /etc/ceph/ceph.conf)".into(),
            };
            return Err(ceph_err(rc, format!("cannot read {which}")));
        }
        let mut settings = vec![
            ("rbd_cache", "false".to_string()),
            (
                "client_mount_timeout",
                CONNECT_TIMEOUT.as_secs().to_string(),
            ),
        ];
        if let Some(t) = timeout {
            let secs = t.as_secs().max(1).to_string();
            settings.push(("rados_osd_op_timeout", secs.clone()));
            settings.push(("rados_mon_op_timeout", secs));
        }
        if let Some(k) = keyring {
            settings.push(("keyring", k.display().to_string()));
        }
        for (name, value) in settings {
            let (n, v) = (cstring(name, "option")?, cstring(&value, name)?);
            // SAFETY: unconnected handle, NUL-terminated strings librados copies.
            let rc = unsafe { (api.rados_conf_set)(handle, n.as_ptr(), v.as_ptr()) };
            if rc < 0 {
                return Err(ceph_err(rc, format!("cannot set {name} = {value}")));
            }
        }
        // SAFETY: a configured handle.
        let rc = unsafe { (api.rados_connect)(handle) };
        if rc < 0 {
            return Err(ceph_err(
                rc,
                format!(
                    "cannot connect to the Ceph cluster (monitors of {}, within {} s)",
                    conf.as_deref()
                        .map_or("the default ceph.conf".into(), |p| p.display().to_string()),
                    CONNECT_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(cluster)
    }
}

/// What the header-change callback of an image reaches: a hook set after opening.
type ChangeHook = Mutex<Option<Box<dyn Fn() + Send>>>;

/// An open image (`rbd_image_t`) and its pool context; closed (releasing its lock) when the
/// disk and all its queues are gone.
struct Image {
    api: &'static ffi::Api,
    handle: ffi::RbdImageT,
    ioctx: ffi::RadosIoctxT,
    /// `rbd_update_watch` handle, with the hook its callback argument points to.
    watch: Option<(u64, *const ChangeHook)>,
    _cluster: Arc<Cluster>,
}

// SAFETY: librbd image handles are thread-safe (QEMU and SPDK submit from several threads
// to one); the raw hook pointer is only dereferenced by librbd's callback and freed after
// `rbd_update_unwatch`, which waits for running callbacks.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some((handle, hook)) = self.watch.take() {
            // SAFETY: a watch registered on this open image; unwatching waits for a
            // callback in progress, so the hook is freed after its last use.
            unsafe {
                (self.api.rbd_update_unwatch)(self.handle, handle);
                drop(Box::from_raw(hook.cast_mut()));
            }
        }
        // SAFETY: the image (when `open_image` got that far) was opened on `ioctx`; no
        // queue is left (they hold an `Arc` of this image), so nothing is in flight.
        // Closing releases the exclusive lock.
        unsafe {
            if !self.handle.is_null() {
                (self.api.rbd_close)(self.handle);
            }
            (self.api.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

/// Called by librbd (on one of its threads) when the image header changed.
unsafe extern "C" fn header_changed(arg: *mut c_void) {
    // SAFETY: `arg` is the `ChangeHook` registered with the watch, alive until unwatched.
    let hook = unsafe { &*(arg as *const ChangeHook) };
    if let Ok(hook) = hook.lock() {
        if let Some(f) = hook.as_ref() {
            f();
        }
    }
}

/// An RBD image as a [`Disk`].
pub struct RbdDisk {
    image: Arc<Image>,
    info: DiskInfo,
    /// `rbd:pool/image`, for logs and [`Disk::path`].
    name: PathBuf,
}

impl std::fmt::Debug for RbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDisk")
            .field("image", &self.name)
            .field("info", &self.info)
            .finish()
    }
}

impl RbdDisk {
    /// Connects (or reuses the daemon's connection) to the cluster, opens the image
    /// (creating it with `create_size` bytes when missing) and, unless `readonly`, takes
    /// its exclusive lock.
    pub fn open(
        options: &RbdOptions,
        readonly: bool,
        create_size: Option<u64>,
    ) -> Result<Self, OpenError> {
        let name = PathBuf::from(format!("rbd:{}", options.spec()));
        let fail = |message: String| OpenError::Rbd {
            image: options.spec(),
            message,
        };
        let api = ffi::api().map_err(|e| fail(e.to_string()))?;
        let key = (
            options.conf.clone(),
            options.client_id.clone(),
            options.keyring.clone(),
            options.io_timeout,
        );
        let cluster = Cluster::get(api, key).map_err(|e| fail(e.to_string()))?;
        let image = open_image(api, cluster, options, readonly, create_size).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<LockHeld>()) {
                OpenError::RbdLockHeld {
                    image: options.spec(),
                }
            } else {
                fail(e.to_string())
            }
        })?;
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let rc = unsafe { (api.rbd_get_size)(image.handle, &mut size) };
        if rc < 0 {
            return Err(fail(ceph_err(rc, "rbd_get_size").to_string()));
        }
        Ok(RbdDisk {
            image: Arc::new(image),
            info: DiskInfo {
                size,
                readonly,
                direct: None,
                is_block_device: false,
                deallocate_zeroes: !readonly,
                discard_zeroes: false,
                durability: if readonly {
                    Durability::ReadOnly
                } else {
                    Durability::Replicated
                },
            },
            name,
        })
    }
}

fn open_image(
    api: &'static ffi::Api,
    cluster: Arc<Cluster>,
    options: &RbdOptions,
    readonly: bool,
    create_size: Option<u64>,
) -> io::Result<Image> {
    let pool = cstring(&options.pool, "pool")?;
    let image_name = cstring(&options.image, "image")?;
    let mut ioctx: ffi::RadosIoctxT = ptr::null_mut();
    // SAFETY: a connected cluster handle, a NUL-terminated pool name, a valid out-pointer.
    let rc = unsafe { (api.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
    if rc == -libc::ENOENT {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("pool {:?} does not exist", options.pool),
        ));
    }
    if rc < 0 {
        return Err(ceph_err(rc, format!("cannot open pool {:?}", options.pool)));
    }
    let mut image = Image {
        api,
        handle: ptr::null_mut(),
        ioctx,
        watch: None,
        _cluster: cluster,
    };
    if let Some(ns) = &options.namespace {
        let ns = cstring(ns, "namespace")?;
        // SAFETY: a valid ioctx; librados copies the name.
        unsafe { (api.rados_ioctx_set_namespace)(ioctx, ns.as_ptr()) };
    }
    let open = |handle: &mut ffi::RbdImageT| {
        let f = if readonly {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        // SAFETY: a valid ioctx, NUL-terminated name, valid out-pointer, no snapshot.
        unsafe { f(ioctx, image_name.as_ptr(), handle, ptr::null()) }
    };
    let mut handle: ffi::RbdImageT = ptr::null_mut();
    let mut rc = open(&mut handle);
    if rc == -libc::ENOENT {
        let Some(size) = create_size else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the image does not exist (add `create: {size: ...}` to create it)",
            ));
        };
        let mut order: c_int = 0;
        // SAFETY: a valid ioctx, NUL-terminated name, valid out-pointer (0: default order).
        let created = unsafe { (api.rbd_create)(ioctx, image_name.as_ptr(), size, &mut order) };
        if created < 0 && created != -libc::EEXIST {
            return Err(ceph_err(
                created,
                format!("cannot create the image ({size} bytes)"),
            ));
        }
        tracing::info!(image = options.spec(), size, "rbd image created");
        rc = open(&mut handle);
    }
    if rc < 0 {
        return Err(ceph_err(rc, "cannot open the image"));
    }
    // From here `Drop` closes it.
    image.handle = handle;
    if !readonly {
        lock(&image, options)?;
    }
    let hook: *const ChangeHook = Box::into_raw(Box::new(Mutex::new(None)));
    let mut watch = 0u64;
    // SAFETY: an open image; the callback argument lives until `rbd_update_unwatch`
    // (Image::drop).
    let rc = unsafe {
        (api.rbd_update_watch)(handle, &mut watch, header_changed, hook.cast_mut().cast())
    };
    if rc < 0 {
        // SAFETY: not registered, so nothing else holds it.
        drop(unsafe { Box::from_raw(hook.cast_mut()) });
        return Err(ceph_err(rc, "rbd_update_watch"));
    }
    image.watch = Some((watch, hook));
    Ok(image)
}

/// The image's exclusive lock is held by another client.
#[derive(Debug, thiserror::Error)]
#[error("another client holds the image's exclusive lock")]
struct LockHeld;

/// Takes `image`'s exclusive lock in managed mode (other clients' requests for it are
/// refused while we hold it); fails with [`LockHeld`] while another client holds it.
fn lock(image: &Image, options: &RbdOptions) -> io::Result<()> {
    let api = image.api;
    let mut features = 0u64;
    // SAFETY: an open image and a valid out-pointer.
    let rc = unsafe { (api.rbd_get_features)(image.handle, &mut features) };
    if rc < 0 {
        return Err(ceph_err(rc, "rbd_get_features"));
    }
    if features & ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the image lacks the exclusive-lock feature, without which two appliances could write it at once (enable it: rbd feature enable {} exclusive-lock)",
                options.spec()
            ),
        ));
    }
    // SAFETY: an open image with the exclusive-lock feature.
    let rc = unsafe { (api.rbd_lock_acquire)(image.handle, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
    match -rc {
        0 => Ok(()),
        // librbd's answers while a live (or not yet expired) holder keeps the lock.
        libc::EROFS | libc::EBUSY | libc::EAGAIN | libc::ETIMEDOUT => {
            Err(io::Error::other(LockHeld))
        }
        _ => Err(ceph_err(rc, "cannot take the image's exclusive lock")),
    }
}

impl Disk for RbdDisk {
    fn engine(&self) -> &'static str {
        "rbd"
    }

    fn info(&self) -> DiskInfo {
        self.info
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn current_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let rc = unsafe { (self.image.api.rbd_get_size)(self.image.handle, &mut size) };
        if rc < 0 {
            return Err(ceph_err(rc, "rbd_get_size"));
        }
        Ok(size)
    }

    fn grow(&self, size: u64) -> io::Result<u64> {
        let before = self.current_size()?;
        if size <= before {
            return Ok(before);
        }
        if self.info.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is open read-only", self.name.display()),
            ));
        }
        // SAFETY: an open, writable image whose lock we hold.
        let rc = unsafe { (self.image.api.rbd_resize)(self.image.handle, size) };
        if rc < 0 {
            return Err(ceph_err(rc, "rbd_resize"));
        }
        Ok(before)
    }

    fn sync(&self) -> io::Result<()> {
        if self.info.readonly {
            return Ok(());
        }
        // SAFETY: an open image.
        let rc = unsafe { (self.image.api.rbd_flush)(self.image.handle) };
        if rc < 0 {
            return Err(ceph_err(rc, "rbd_flush"));
        }
        Ok(())
    }

    fn open_queue(
        &self,
        _depth: u32,
        notifier: Option<&EventFd>,
    ) -> io::Result<Box<dyn DiskQueue>> {
        Ok(Box::new(RbdQueue::new(Arc::clone(&self.image), notifier)?))
    }

    /// Calls `hook` (on a librbd thread) whenever the image's header changes: a resize by
    /// another client, a snapshot, a lock change. Replaces an earlier hook.
    fn on_change(&self, hook: Box<dyn Fn() + Send>) -> bool {
        let Some((_, h)) = self.image.watch else {
            return false;
        };
        // SAFETY: the hook lives until the image is dropped, which `self` prevents.
        let h = unsafe { &*h };
        *h.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
        true
    }
}
