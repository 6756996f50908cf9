//! Export lifecycle: open the backing store, bind the socket, and serve one frontend
//! connection after another, each with a fresh `VhostUserDaemon` (the crate refuses a second
//! SET_OWNER on a reused one) over the same `Arc` backend, so export state survives
//! reconnects and a frontend that disconnects, even mid-I/O, never stops the daemon; and
//! stop an export (removal by a reload, or daemon exit) without losing accepted requests.
//!
//! The accept loop accepts each frontend itself and carries its control messages to the
//! connection's daemon through [`relay`], which keeps the frontend's backend channel; that
//! is how a resize reaches a virtio-blk frontend (CONFIG_CHANGE_MSG).
//!
//! Capacity: `size:` is applied when the export starts (the store grown to it, refused if
//! the store is larger: shrinking is refused), and [`RunningExport::resize`] grows a running
//! export, for a grown `size:` or a store grown underneath, and tells the frontend. The
//! resize pieces (capacity, store size, size checks, [`Resized`], the backing store's size
//! helpers) live in the `resize` submodule, `export/resize.rs`.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context};
use config::{
    BackingFormat, Device, Disk, Export, ScsiLun, SocketPermissions, VvuDevice, WriteCache,
};
use nix::unistd::{chown, Gid, Group, Uid, User};
use targets::blk::{BlkDevice, BlkQueue, BlkSettings};
use targets::device::{QueueHandler, VirtioDevice};
use targets::disk::{DiskInfo, DiskSpec, Format};
use targets::scsi::emulation::{Lun, LunSettings};
use targets::scsi::virtio::{ControlQueue, EventQueue, RequestQueue, ScsiDevice};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{completion_event, VirtioBackend};
use crate::relay::{self, BackendChannel, PrivateListener};
use crate::vvu::VvuBridge;

pub use resize::Resized;

mod resize;

/// Where an export gets its frontend connections from.
pub enum SocketSource<'a> {
    /// Bind this path with these permissions.
    Path(&'a Path, &'a SocketPermissions),
    /// A listening socket inherited from the parent (`--fd`).
    Fd(RawFd),
    /// A virtio-vhost-user device (appliance-VM mode).
    Vvu(&'a VvuDevice),
}

/// A running export.
pub struct RunningExport {
    name: String,
    backend: Arc<VirtioBackend>,
    /// The device, to grow its capacity and change its LUNs.
    device: DeviceHandle,
    disks: Vec<ExportDisk>,
    /// The export's largest ring.
    queue_size: u16,
    connection: Arc<Connection>,
    /// Appliance-VM mode: the device bridge feeding the accept loop.
    vvu: Option<VvuBridge>,
    acceptor: Option<JoinHandle<()>>,
    /// The listening socket (a duplicate), shut down to wake a blocked accept.
    listening: OwnedFd,
    /// The socket file this export bound, removed when it stops.
    socket_path: Option<PathBuf>,
}

/// The current frontend connection of an export, and whether the export is stopping.
#[derive(Default)]
struct Connection {
    /// Set once, when the export stops: no new connection is served.
    stopping: AtomicBool,
    /// The connected frontend, while there is one.
    session: Mutex<Option<Session>>,
    /// The connected frontend's backend channel, if it offered one.
    channel: BackendChannel,
}

/// What ends a frontend connection from outside.
struct Session {
    /// The connection's daemon.
    daemon: Option<ShutdownHandle>,
    /// The frontend's socket (a duplicate): shut down, it wakes the relay.
    frontend: UnixStream,
}

impl Session {
    fn shutdown(self) {
        if let Some(daemon) = self.daemon {
            daemon.shutdown();
        }
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
    }
}

impl Connection {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The device of an export, typed, for the control path.
enum DeviceHandle {
    Blk(Arc<BlkDevice>),
    Scsi(Arc<ScsiDevice>),
}

/// One backing store of an export.
struct ExportDisk {
    /// The SCSI LUN it backs; `None` for a blk export.
    lun: Option<u16>,
    /// Logical block size in bytes.
    block_size: u64,
    /// Shared with the rings of LUNs added to a live export.
    backing: Arc<dyn targets::disk::Disk>,
}

impl RunningExport {
    /// Opens the backing stores, binds the socket and starts accepting frontends. State
    /// that must outlive the daemon (a blk driver's write cache choice) is kept in
    /// `state_dir`, if given.
    pub fn start(
        export: &Export,
        socket: SocketSource<'_>,
        state_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let (backend, device, disks) = match &export.device {
            Device::Blk(disk) => build_blk(export, disk, state_dir)?,
            Device::Scsi(luns) => build_scsi(export, luns)?,
        };
        // Through a virtio-vhost-user device, guest memory is a PCI BAR mapping, which the
        // kernel cannot pin for direct I/O: a property of the memory this transport hands
        // the queues.
        backend.set_guest_memory_pinnable(!matches!(socket, SocketSource::Vvu(_)));
        let private = PrivateListener::new().context("cannot create the relay socket")?;
        let mut vvu = None;
        let mut socket_path = None;
        let listener = match socket {
            SocketSource::Path(path, permissions) => {
                let listener = bind_socket(path, permissions)?;
                socket_path = Some(path.to_path_buf());
                listener
            }
            SocketSource::Fd(fd) => listener_from_fd(fd)?,
            SocketSource::Vvu(device) => {
                let (listener, bridge) =
                    VvuBridge::start(&export.name, device, backend.num_queues() as u32)?;
                vvu = Some(bridge);
                listener
            }
        };
        // SAFETY: the listener's fd is open for the duration of this call; the borrow only
        // serves to duplicate it.
        let listening = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) }
            .try_clone_to_owned()
            .context("cannot duplicate the listening socket")?;
        let connection = Arc::new(Connection::default());
        let acceptor = {
            let name = export.name.clone();
            let backend = Arc::clone(&backend);
            let connection = Arc::clone(&connection);
            std::thread::Builder::new()
                .name(format!("accept-{}", export.name))
                .spawn(move || {
                    serve_connections(&name, &backend, listener, &private, &connection)
                })?
        };
        tracing::info!(
            export = export.name,
            transport = %export.transport,
            queues = export.num_queues,
            kind = match export.device { Device::Blk(_) => "blk", Device::Scsi(_) => "scsi" },
            "export ready"
        );
        Ok(RunningExport {
            name: export.name.clone(),
            backend,
            device,
            disks,
            queue_size: export.queue_size,
            connection,
            vvu,
            acceptor: Some(acceptor),
            listening,
            socket_path,
        })
    }

    /// Adds LUN `spec` to this running scsi export: opens its backing store, gives every
    /// request queue a ring on it, then tells the initiator (a rescan event and REPORTED
    /// LUNS DATA HAS CHANGED).
    pub fn add_lun(&mut self, spec: &ScsiLun) -> anyhow::Result<()> {
        let DeviceHandle::Scsi(device) = &self.device else {
            bail!("not a scsi export");
        };
        let (lun, disk) = open_lun(spec)?;
        let rings = Arc::clone(&disk);
        let depth = u32::from(self.queue_size);
        device.add_lun(
            lun,
            Box::new(move |notifier| rings.open_queue(depth, Some(notifier))),
        )?;
        self.backend.refresh_queues();
        device.report_lun_change(spec.lun, true);
        self.disks.push(ExportDisk {
            lun: Some(spec.lun),
            block_size: u64::from(spec.disk.logical_block_size),
            backing: disk,
        });
        Ok(())
    }

    /// Applies changed `socket_permissions` to this export's socket (host mode; nothing to
    /// do for an inherited fd or a VVU device). Connected frontends keep their connection.
    pub fn apply_socket_permissions(&self, permissions: &SocketPermissions) -> anyhow::Result<()> {
        match &self.socket_path {
            Some(path) => apply_permissions(path, permissions),
            None => Ok(()),
        }
    }

    /// The export's backend (for metrics registration).
    pub fn backend(&self) -> &VirtioBackend {
        &self.backend
    }

    /// Removes LUN `id` from this running scsi export: new commands to it fail, the
    /// commands it has in flight complete, the initiator is told (a removal event and
    /// REPORTED LUNS DATA HAS CHANGED), and its backing store is synced and closed.
    pub fn remove_lun(&mut self, id: u16) -> anyhow::Result<()> {
        let DeviceHandle::Scsi(device) = &self.device else {
            bail!("not a scsi export");
        };
        if device.remove_lun(id).is_none() {
            bail!("LUN {id} does not exist");
        }
        self.backend.refresh_queues();
        device.report_lun_change(id, false);
        if let Some(at) = self.disks.iter().position(|d| d.lun == Some(id)) {
            let disk = self.disks.remove(at);
            if let Err(e) = disk.backing.sync() {
                tracing::error!(
                    export = self.name,
                    lun = id,
                    "final sync of the removed LUN failed: {e}"
                );
            }
        }
        Ok(())
    }

    /// Stops the export: accepts no new frontend and takes no new request, completes every
    /// request already accepted (on the used ring, the driver notified), then disconnects
    /// the frontend, makes written data durable and removes the socket (the VVU device is
    /// released). The frontend sees a clean disconnect with nothing it submitted lost.
    pub fn stop(mut self) {
        self.backend.connections().stopping();
        self.connection.stopping.store(true, Ordering::SeqCst);
        self.backend.quiesce();
        let in_flight = self.backend.complete_accepted();
        tracing::info!(
            export = self.name,
            in_flight,
            "stopping: accepted requests completed, disconnecting the frontend"
        );
        if let Some(session) = self.connection.lock().take() {
            session.shutdown();
        }
        // A blocked accept returns once its socket is shut down.
        if let Err(e) =
            nix::sys::socket::shutdown(self.listening.as_raw_fd(), nix::sys::socket::Shutdown::Both)
        {
            tracing::debug!(
                export = self.name,
                "shutting down the listening socket: {e}"
            );
        }
        if let Some(bridge) = self.vvu.as_mut() {
            bridge.stop();
        }
        if let Some(acceptor) = self.acceptor.take() {
            if acceptor.join().is_err() {
                tracing::error!(export = self.name, "the accept thread panicked");
            }
        }
        for disk in self.disks.iter().map(|d| &d.backing) {
            if let Err(e) = disk.sync() {
                tracing::error!(
                    export = self.name,
                    path = %disk.path().display(),
                    "final sync of the backing file failed: {e}"
                );
            }
        }
        if let Some(path) = &self.socket_path {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!(
                    export = self.name,
                    "cannot remove socket {}: {e}",
                    path.display()
                );
            }
        }
    }
}

/// Opens a backing store (the engine its format needs: `targets::disk::open`) and applies
/// `size:` to it.
fn open_sized(spec: &Disk) -> anyhow::Result<Arc<dyn targets::disk::Disk>> {
    let disk = targets::disk::open(&DiskSpec {
        path: spec.path.clone(),
        format: match spec.format {
            BackingFormat::Raw => Format::Raw,
            BackingFormat::Qcow2 => Format::Qcow2,
            BackingFormat::Rbd => Format::Rbd,
            BackingFormat::Null => Format::Null,
        },
        readonly: spec.readonly,
        direct: spec.direct,
        create: spec.create.as_ref().map(|c| (c.size, c.backing.clone())),
        rbd: spec.rbd.as_ref().map(|r| targets::disk::rbd::RbdOptions {
            pool: r.pool.clone(),
            namespace: r.namespace.clone(),
            image: r.image.clone(),
            conf: r.conf.clone(),
            client_id: r.client_id.clone(),
            keyring: r.keyring.clone(),
            io_timeout: r.io_timeout.map(std::time::Duration::from_secs),
        }),
    })?;
    if let Some(size) = spec.size {
        resize::apply_size(&*disk, size)?;
    }
    if let Some(fd) = crate::watch::store_changed() {
        if let Ok(fd) = fd.try_clone() {
            disk.on_change(Box::new(move || {
                let _ = fd.write(1);
            }));
        }
    }
    #[cfg(feature = "fault-injection")]
    let disk = crate::faults::wrap(disk)?;
    Ok(disk)
}

/// How request handling sees a disk: as opened, with its size now.
fn current_info(disk: &dyn targets::disk::Disk) -> DiskInfo {
    let mut info = disk.info();
    if let Ok(size) = disk.current_size() {
        info.size = size;
    }
    info
}

type Built = (Arc<VirtioBackend>, DeviceHandle, Vec<ExportDisk>);

fn build_blk(export: &Export, spec: &Disk, state_dir: Option<&Path>) -> anyhow::Result<Built> {
    let disk = open_sized(spec)?;
    let settings = BlkSettings {
        logical_block_size: spec.logical_block_size,
        readonly: spec.readonly,
        serial: spec.serial.clone(),
        num_queues: export.num_queues,
        queue_size: export.queue_size,
        writeback: spec.write_cache == WriteCache::Writeback,
        writeback_state: state_dir.map(|d| d.join(format!("{}.writeback", export.name))),
    };
    let device = Arc::new(BlkDevice::new(settings, current_info(&*disk))?);
    let mut queues: Vec<Box<dyn QueueHandler>> = Vec::new();
    for _ in 0..export.num_queues {
        let ring = disk
            .open_queue(u32::from(export.queue_size), None)
            .context("cannot create the I/O context of a queue")?;
        queues.push(Box::new(BlkQueue::new(Arc::clone(&device), ring)));
    }
    let handle = DeviceHandle::Blk(Arc::clone(&device));
    let device: Arc<dyn VirtioDevice> = device;
    let disk = ExportDisk {
        lun: None,
        block_size: u64::from(spec.logical_block_size),
        backing: disk,
    };
    Ok((
        Arc::new(VirtioBackend::new(device, queues, export.poll)),
        handle,
        vec![disk],
    ))
}

/// Opens one LUN's backing store (applying its `size:`) and builds its emulation.
fn open_lun(
    spec: &ScsiLun,
) -> anyhow::Result<(targets::scsi::virtio::ScsiLun, Arc<dyn targets::disk::Disk>)> {
    let disk = open_sized(&spec.disk).with_context(|| format!("LUN {}", spec.lun))?;
    let info = current_info(&*disk);
    let bs = u64::from(spec.disk.logical_block_size);
    info.check_block_size(spec.disk.logical_block_size)
        .with_context(|| format!("LUN {}", spec.lun))?;
    let lun = targets::scsi::virtio::ScsiLun {
        id: spec.lun,
        emulation: Lun::new(LunSettings {
            block_size: spec.disk.logical_block_size,
            blocks: info.size / bs,
            readonly: spec.disk.readonly,
            serial: spec.disk.serial.clone(),
            wwn: spec.wwn,
            rotational: spec.rotational,
            write_cache: spec.disk.write_cache == WriteCache::Writeback,
            discard: !spec.disk.readonly,
            unmapped_reads_zero: info.discard_zeroes,
        }),
        disk: info,
    };
    Ok((lun, disk))
}

fn build_scsi(export: &Export, specs: &[ScsiLun]) -> anyhow::Result<Built> {
    let mut disks = Vec::with_capacity(specs.len());
    let mut luns = Vec::with_capacity(specs.len());
    for spec in specs {
        let (lun, disk) = open_lun(spec)?;
        luns.push(lun);
        disks.push(disk);
    }
    let device = Arc::new(ScsiDevice::new(luns, export.num_queues, export.queue_size)?);
    // The device sorted its LUNs by id; open each queue's rings in that order.
    let order: Vec<usize> = device
        .luns()
        .iter()
        .filter_map(|l| specs.iter().position(|s| s.lun == l.id()))
        .collect();
    let mut queues: Vec<Box<dyn QueueHandler>> = vec![
        Box::new(ControlQueue::new(Arc::clone(&device))),
        Box::new(EventQueue::new(Arc::clone(&device))),
    ];
    for _ in 0..export.num_queues {
        let queue = RequestQueue::new(Arc::clone(&device), |i, notifier| {
            disks[order[i]].open_queue(u32::from(export.queue_size), Some(notifier))
        })
        .context("cannot create the io_urings of a queue")?;
        queues.push(Box::new(queue));
    }
    let handle = DeviceHandle::Scsi(Arc::clone(&device));
    let device: Arc<dyn VirtioDevice> = device;
    let disks = disks
        .into_iter()
        .zip(specs)
        .map(|(backing, spec)| ExportDisk {
            lun: Some(spec.lun),
            block_size: u64::from(spec.disk.logical_block_size),
            backing,
        })
        .collect();
    Ok((
        Arc::new(VirtioBackend::new(device, queues, export.poll)),
        handle,
        disks,
    ))
}

/// Accept loop of one export; runs until the export stops.
fn serve_connections(
    name: &str,
    backend: &Arc<VirtioBackend>,
    listener: Listener,
    private: &PrivateListener,
    connection: &Connection,
) {
    while !connection.stopping.load(Ordering::SeqCst) {
        if let Err(e) = serve_one(name, backend, &listener, private, connection) {
            if connection.stopping.load(Ordering::SeqCst) {
                break;
            }
            tracing::error!(export = name, "connection failed: {e:#}");
            // Do not spin if accept itself keeps failing.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Serves one frontend connection; whatever happens, the connection's resources are
/// released before the next one is accepted.
fn serve_one(
    name: &str,
    backend: &Arc<VirtioBackend>,
    listener: &Listener,
    private: &PrivateListener,
    connection: &Connection,
) -> anyhow::Result<()> {
    let frontend = loop {
        match listener.accept() {
            Ok(Some(stream)) => break stream,
            // The connection was aborted before it was accepted.
            Ok(None) => continue,
            Err(e) => bail!("accepting a frontend failed: {e:?}"),
        }
    };
    let result = run_connection(name, backend, frontend, private, connection);
    // The connection's daemon is dropped (its vring threads joined): complete whatever they
    // left in flight and release what the connection held.
    backend.end_session();
    result
}

/// Serves `frontend`: a fresh daemon on the private listener, and the relay between them
/// on this thread until either side ends the connection.
fn run_connection(
    name: &str,
    backend: &Arc<VirtioBackend>,
    frontend: UnixStream,
    private: &PrivateListener,
    connection: &Connection,
) -> anyhow::Result<()> {
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(name.to_string(), Arc::clone(backend), memory)
        .map_err(|e| anyhow::anyhow!("cannot create the vhost-user daemon: {e:?}"))?;
    let event = completion_event(backend.num_queues());
    for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        if let Some(fd) = backend.completion_fd(thread) {
            handler
                .register_listener(fd, EventSet::IN, event)
                .context("cannot register the io_uring eventfd")?;
        }
    }
    backend.session_started();
    daemon
        .start_client(&private.path())
        .map_err(|e| anyhow!("connecting the daemon to the relay failed: {e:?}"))?;
    let inner = private
        .accept_own()
        .context("accepting the daemon's relay connection")?;
    tracing::info!(export = name, "frontend connected");
    backend.connections().connected();
    {
        let mut current = connection.lock();
        *current = Some(Session {
            daemon: daemon.shutdown_handle(),
            frontend: frontend
                .try_clone()
                .context("cannot duplicate the frontend socket")?,
        });
        // The export began stopping while this frontend was being accepted.
        if connection.stopping.load(Ordering::SeqCst) {
            if let Some(session) = current.take() {
                session.shutdown();
            }
        }
    }
    let relayed = relay::relay(&frontend, &inner, &connection.channel, &**backend);
    connection.channel.clear();
    // Whichever side ended the connection, the other one ends with it.
    let _ = inner.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    if let Err(e) = relayed {
        tracing::warn!(export = name, "frontend connection dropped: {e}");
    }
    let result = daemon.wait();
    connection.lock().take();
    let clean = match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => {
            tracing::info!(export = name, "frontend disconnected");
            true
        }
        Err(e) => {
            tracing::warn!(export = name, "frontend connection ended: {e:?}");
            false
        }
    };
    backend.connections().disconnected(clean);
    // Joins this connection's vring threads.
    drop(daemon);
    Ok(())
}

/// Binds `path`, replacing a stale socket but never a live one or a non-socket file.
fn bind_socket(path: &Path, permissions: &SocketPermissions) -> anyhow::Result<Listener> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create socket directory {}", parent.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!("socket {} is in use by another process", path.display());
            }
            fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind socket {}", path.display()))?;
    apply_permissions(path, permissions)?;
    Ok(Listener::from(listener))
}

/// Gives socket `path` the mode and ownership of `permissions`.
fn apply_permissions(path: &Path, permissions: &SocketPermissions) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(permissions.mode))
        .with_context(|| format!("cannot set mode of {}", path.display()))?;
    let uid = permissions.owner.as_deref().map(resolve_user).transpose()?;
    let gid = permissions
        .group
        .as_deref()
        .map(resolve_group)
        .transpose()?;
    if uid.is_some() || gid.is_some() {
        chown(path, uid, gid).with_context(|| format!("cannot chown {}", path.display()))?;
    }
    Ok(())
}

fn resolve_user(name: &str) -> anyhow::Result<Uid> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(Uid::from_raw(id));
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok(user.uid),
        _ => bail!("socket owner {name:?} is not a known user"),
    }
}

fn resolve_group(name: &str) -> anyhow::Result<Gid> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(Gid::from_raw(id));
    }
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        _ => bail!("socket group {name:?} is not a known group"),
    }
}

/// Takes ownership of an inherited listening unix socket.
fn listener_from_fd(fd: RawFd) -> anyhow::Result<Listener> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a `struct stat` into the provided buffer and touches nothing else.
    let rc = unsafe { libc::fstat(fd, stat.as_mut_ptr()) };
    if rc != 0 {
        bail!("--fd {fd}: {}", io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialised the buffer.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("--fd {fd} is not a socket");
    }
    // SAFETY: the caller handed this fd to the process for exclusive use as the listening
    // vhost-user socket (QEMU's backend-program convention); it is a socket (checked above)
    // and nothing else in the process owns it.
    Ok(unsafe { Listener::from_raw_fd(fd) })
}
