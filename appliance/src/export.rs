//! Export lifecycle: open the backing store, bind the socket, and serve one frontend
//! connection after another, each with a fresh `VhostUserDaemon` (the crate refuses a second
//! SET_OWNER on a reused one) over the same `Arc` backend, so export state survives
//! reconnects and a frontend that disconnects, even mid-I/O, never stops the daemon.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use config::{
    BackingFormat, Device, Disk, Export, ScsiLun, SocketPermissions, VvuDevice, WriteCache,
};
use nix::unistd::{chown, Gid, Group, Uid, User};
use targets::blk::{BlkDevice, BlkQueue, BlkSettings};
use targets::device::{QueueHandler, VirtioDevice};
use targets::disk::{DiskInfo, DiskQueue, RawDisk, RawDiskOptions};
use targets::qcow2::{Qcow2Disk, Qcow2Options};
use targets::scsi::emulation::{Lun, LunSettings};
use targets::scsi::virtio::{ControlQueue, EventQueue, RequestQueue, ScsiDevice};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{completion_event, VirtioBackend};
use crate::vvu::VvuBridge;

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
    disks: Vec<Backing>,
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    /// Appliance-VM mode: the device bridge feeding the accept loop.
    vvu: Mutex<Option<VvuBridge>>,
    _acceptor: JoinHandle<()>,
}

impl RunningExport {
    /// Opens the backing stores, binds the socket and starts accepting frontends.
    pub fn start(export: &Export, socket: SocketSource<'_>) -> anyhow::Result<Self> {
        // Through a virtio-vhost-user device, guest memory is a PCI BAR mapping.
        let bar_memory = matches!(socket, SocketSource::Vvu(_));
        let (backend, disks) = match &export.device {
            Device::Blk(disk) => build_blk(export, disk, bar_memory)?,
            Device::Scsi(luns) => build_scsi(export, luns, bar_memory)?,
        };
        let mut vvu = None;
        let listener = match socket {
            SocketSource::Path(path, permissions) => bind_socket(path, permissions)?,
            SocketSource::Fd(fd) => listener_from_fd(fd)?,
            SocketSource::Vvu(device) => {
                let (listener, bridge) =
                    VvuBridge::start(&export.name, device, backend.num_queues() as u32)?;
                vvu = Some(bridge);
                listener
            }
        };
        let connection = Arc::new(Mutex::new(None));
        let acceptor = {
            let name = export.name.clone();
            let backend = Arc::clone(&backend);
            let connection = Arc::clone(&connection);
            std::thread::Builder::new()
                .name(format!("accept-{}", export.name))
                .spawn(move || serve_connections(&name, &backend, listener, &connection))?
        };
        for (disk, spec) in disks.iter().zip(export.disks()) {
            let info = device_view(disk, bar_memory);
            let io = match info.direct {
                None => "buffered".to_string(),
                Some(d) if d.bounce_always => {
                    format!("O_DIRECT via bounce buffers (align {})", d.memory)
                }
                Some(d) => format!(
                    "O_DIRECT (memory align {}, offset align {})",
                    d.memory, d.offset
                ),
            };
            tracing::info!(
                export = export.name,
                path = %spec.path.display(),
                size = info.size,
                readonly = spec.readonly,
                io,
                "backing store open"
            );
        }
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
            disks,
            connection,
            vvu: Mutex::new(vvu),
            _acceptor: acceptor,
        })
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The export's backend (for metrics registration).
    pub fn backend(&self) -> &VirtioBackend {
        &self.backend
    }

    /// Disconnects the frontend, completes in-flight I/O and makes written data durable.
    pub fn stop(&self) {
        self.backend.connections().stopping();
        if let Some(bridge) = self.vvu.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            bridge.stop();
        }
        if let Some(handle) = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            handle.shutdown();
        }
        self.backend.disconnected();
        for disk in &self.disks {
            if let Err(e) = disk.sync() {
                tracing::error!(
                    export = self.name,
                    path = %disk.path().display(),
                    "final sync of the backing file failed: {e}"
                );
            }
        }
    }
}

/// An open backing store: a raw file or block device, or a qcow2 image.
enum Backing {
    Raw(RawDisk),
    Qcow2(Qcow2Disk),
}

impl Backing {
    fn open(disk: &Disk) -> anyhow::Result<Self> {
        Ok(match disk.format {
            BackingFormat::Raw => Backing::Raw(RawDisk::open(&RawDiskOptions {
                path: disk.path.clone(),
                readonly: disk.readonly,
                direct: disk.direct,
                create_size: disk.create.as_ref().map(|c| c.size),
            })?),
            BackingFormat::Qcow2 => Backing::Qcow2(Qcow2Disk::open(&Qcow2Options {
                path: disk.path.clone(),
                readonly: disk.readonly,
                direct: disk.direct,
                create: disk.create.as_ref().map(|c| (c.size, c.backing.clone())),
            })?),
        })
    }

    fn info(&self) -> DiskInfo {
        match self {
            Backing::Raw(d) => d.info(),
            Backing::Qcow2(d) => d.info(),
        }
    }

    fn path(&self) -> &Path {
        match self {
            Backing::Raw(d) => d.path(),
            Backing::Qcow2(d) => d.path(),
        }
    }

    fn sync(&self) -> io::Result<()> {
        match self {
            Backing::Raw(d) => d.sync(),
            Backing::Qcow2(d) => d.sync(),
        }
    }

    /// A per-queue I/O context, signalling `notifier` if given.
    fn new_queue(&self, depth: u32, notifier: Option<&EventFd>) -> io::Result<Box<dyn DiskQueue>> {
        Ok(match (self, notifier) {
            (Backing::Raw(d), None) => Box::new(d.new_queue(depth)?),
            (Backing::Raw(d), Some(n)) => Box::new(d.new_queue_with_notifier(depth, n)?),
            (Backing::Qcow2(d), n) => Box::new(d.new_queue(depth, n)?),
        })
    }
}

/// How request handling sees a disk. Guest memory mapped from a PCI BAR cannot be an
/// O_DIRECT target (the kernel cannot pin PFN-mapped pages), so direct I/O always bounces.
fn device_view(disk: &Backing, bar_memory: bool) -> DiskInfo {
    let mut info = disk.info();
    if let Some(direct) = info.direct.as_mut() {
        direct.bounce_always = bar_memory;
    }
    info
}

fn build_blk(
    export: &Export,
    spec: &Disk,
    bar_memory: bool,
) -> anyhow::Result<(Arc<VirtioBackend>, Vec<Backing>)> {
    let disk = Backing::open(spec)?;
    let settings = BlkSettings {
        logical_block_size: spec.logical_block_size,
        readonly: spec.readonly,
        serial: spec.serial.clone(),
        num_queues: export.num_queues,
        queue_size: export.queue_size,
        writeback: spec.write_cache == WriteCache::Writeback,
    };
    let device = Arc::new(BlkDevice::new(settings, device_view(&disk, bar_memory))?);
    let mut queues: Vec<Box<dyn QueueHandler>> = Vec::new();
    for _ in 0..export.num_queues {
        let ring = disk
            .new_queue(u32::from(export.queue_size), None)
            .context("cannot create the I/O context of a queue")?;
        queues.push(Box::new(BlkQueue::new(Arc::clone(&device), ring)));
    }
    let device: Arc<dyn VirtioDevice> = device;
    Ok((Arc::new(VirtioBackend::new(device, queues)), vec![disk]))
}

fn build_scsi(
    export: &Export,
    specs: &[ScsiLun],
    bar_memory: bool,
) -> anyhow::Result<(Arc<VirtioBackend>, Vec<Backing>)> {
    let mut disks = Vec::with_capacity(specs.len());
    let mut luns = Vec::with_capacity(specs.len());
    for spec in specs {
        let disk = Backing::open(&spec.disk).with_context(|| format!("LUN {}", spec.lun))?;
        let info = device_view(&disk, bar_memory);
        let bs = u64::from(spec.disk.logical_block_size);
        if let Some(direct) = info.direct {
            if direct.offset as u64 > bs {
                anyhow::bail!(
                    "LUN {}: the backing file needs {}-byte aligned direct I/O but logical_block_size is {bs}; set logical_block_size: {} or direct: false",
                    spec.lun, direct.offset, direct.offset
                );
            }
        }
        if info.size < bs {
            anyhow::bail!(
                "LUN {}: the backing file is smaller than one logical block",
                spec.lun
            );
        }
        luns.push(targets::scsi::virtio::ScsiLun {
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
                unmapped_reads_zero: info.deallocate_zeroes,
            }),
            disk: info,
        });
        disks.push(disk);
    }
    let device = Arc::new(ScsiDevice::new(luns, export.num_queues, export.queue_size)?);
    // The device sorted its LUNs by id; open each queue's rings in that order.
    let order: Vec<usize> = device
        .luns()
        .iter()
        .filter_map(|l| specs.iter().position(|s| s.lun == l.id))
        .collect();
    let mut queues: Vec<Box<dyn QueueHandler>> = vec![
        Box::new(ControlQueue::new(Arc::clone(&device))),
        Box::new(EventQueue::new(Arc::clone(&device))),
    ];
    for _ in 0..export.num_queues {
        let queue = RequestQueue::new(Arc::clone(&device), |i, notifier| {
            disks[order[i]].new_queue(u32::from(export.queue_size), Some(notifier))
        })
        .context("cannot create the io_urings of a queue")?;
        queues.push(Box::new(queue));
    }
    let device: Arc<dyn VirtioDevice> = device;
    Ok((Arc::new(VirtioBackend::new(device, queues)), disks))
}

/// Accept loop of one export; runs until the process exits.
fn serve_connections(
    name: &str,
    backend: &Arc<VirtioBackend>,
    mut listener: Listener,
    connection: &Mutex<Option<ShutdownHandle>>,
) {
    loop {
        if let Err(e) = serve_one(name, backend, &mut listener, connection) {
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
    listener: &mut Listener,
    connection: &Mutex<Option<ShutdownHandle>>,
) -> anyhow::Result<()> {
    let result = run_connection(name, backend, listener, connection);
    // The connection's daemon is dropped (its vring threads joined): complete whatever they
    // left in flight and release what the connection held.
    backend.end_session();
    result
}

fn run_connection(
    name: &str,
    backend: &Arc<VirtioBackend>,
    listener: &mut Listener,
    connection: &Mutex<Option<ShutdownHandle>>,
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
        .start(listener)
        .map_err(|e| anyhow::anyhow!("accepting a frontend failed: {e:?}"))?;
    tracing::info!(export = name, "frontend connected");
    backend.connections().connected();
    *connection.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
    let result = daemon.wait();
    connection.lock().unwrap_or_else(|p| p.into_inner()).take();
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
    Ok(Listener::from(listener))
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
