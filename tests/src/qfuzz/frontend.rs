//! The fake front-end: a vhost-user front-end that connects to the device's chardev and sends
//! whatever the fuzzer asks for, valid or not, with real file descriptors. A thread drains
//! what the device sends back (replies, error replies, the inflight memfd), so the device
//! never blocks on a full socket, and counts it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::trace::{FdKind, FdSpec};

/// What the device sent the front-end (all connections of this front-end).
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes read from the device socket.
    pub bytes: AtomicU64,
    /// File descriptors received (the inflight memfd of GET_INFLIGHT_FD replies).
    pub fds: AtomicU64,
    /// Bytes read from backend channels (backend requests from the guest's txq).
    pub backend_bytes: AtomicU64,
}

/// A file descriptor the front-end created and keeps its side of.
enum Kept {
    Memfd(File),
    Eventfd(File),
    /// Nothing to keep: the fd was only sent.
    Other,
}

/// A connection's reader thread.
struct Drain {
    stream: UnixStream,
    thread: JoinHandle<()>,
}

impl Drain {
    fn start(stream: UnixStream, received: Arc<Received>, backend: bool) -> std::io::Result<Drain> {
        let reader = stream.try_clone()?;
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut cmsg = nix::cmsg_space!([RawFd; 16]);
            loop {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = match recvmsg::<()>(
                    reader.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(msg) => msg,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break,
                };
                if msg.bytes == 0 {
                    break;
                }
                let counter = if backend {
                    &received.backend_bytes
                } else {
                    &received.bytes
                };
                counter.fetch_add(msg.bytes as u64, Ordering::Relaxed);
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            received.fds.fetch_add(fds.len() as u64, Ordering::Relaxed);
                            for fd in fds {
                                // SAFETY: the kernel just installed `fd` for this process
                                // and nothing else owns it; dropping the File closes it.
                                drop(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                            }
                        }
                    }
                }
            }
        });
        Ok(Drain { stream, thread })
    }

    fn stop(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = self.thread.join();
    }
}

/// The fake front-end of one QEMU instance.
pub struct FakeFrontend {
    path: PathBuf,
    conn: Option<Drain>,
    backend: Option<Drain>,
    kept: HashMap<u32, Kept>,
    /// Counts of what the device sent.
    pub received: Arc<Received>,
    /// Messages sent (including malformed ones).
    pub sent: u64,
}

fn memfd(size: u64) -> std::io::Result<File> {
    let fd: OwnedFd = memfd_create(c"vvu-fuzz", MFdFlags::MFD_CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file)
}

fn eventfd() -> std::io::Result<File> {
    let fd = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
    )?;
    Ok(File::from(OwnedFd::from(fd)))
}

impl FakeFrontend {
    /// A front-end for the device chardev at `path` (not yet connected).
    pub fn new(path: &Path) -> FakeFrontend {
        FakeFrontend {
            path: path.to_path_buf(),
            conn: None,
            backend: None,
            kept: HashMap::new(),
            received: Arc::new(Received::default()),
            sent: 0,
        }
    }

    /// Whether a connection is open (QEMU may not have accepted it yet).
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Connects, closing any previous connection first.
    pub fn connect(&mut self) -> std::io::Result<()> {
        self.close();
        let mut tries = 0;
        let stream = loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    let _ = e;
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        // A device that stops reading must not block the fuzzer forever.
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        self.conn = Some(Drain::start(stream, Arc::clone(&self.received), false)?);
        Ok(())
    }

    /// Closes the connection and the backend channel, and drops the session's fds (the
    /// device dropped its copies on disconnect).
    pub fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            c.stop();
        }
        self.backend_close();
        self.kept.clear();
    }

    /// Closes the backend channel.
    pub fn backend_close(&mut self) {
        if let Some(b) = self.backend.take() {
            b.stop();
        }
    }

    fn create(&mut self, spec: FdSpec) -> std::io::Result<OwnedFd> {
        let (send, keep): (OwnedFd, Kept) = match spec.kind {
            FdKind::Memfd(size) => {
                let f = memfd(size)?;
                (f.try_clone()?.into(), Kept::Memfd(f))
            }
            FdKind::Eventfd => {
                let f = eventfd()?;
                (f.try_clone()?.into(), Kept::Eventfd(f))
            }
            FdKind::Socketpair => {
                let (ours, theirs) = UnixStream::pair()?;
                ours.set_write_timeout(Some(Duration::from_secs(5)))?;
                self.backend_close();
                self.backend = Some(Drain::start(ours, Arc::clone(&self.received), true)?);
                (theirs.into(), Kept::Other)
            }
            FdKind::DevNull => (File::open("/dev/null")?.into(), Kept::Other),
            FdKind::Pipe => {
                let (r, w) = nix::unistd::pipe()?;
                drop(w);
                (r, Kept::Other)
            }
        };
        self.kept.insert(spec.id, keep);
        Ok(send)
    }

    /// A second descriptor of the eventfd or memfd `id` the front-end created (same open
    /// file description, so the same file status flags); None if it has none by that id.
    pub fn dup_fd(&self, id: u32) -> Option<File> {
        match self.kept.get(&id)? {
            Kept::Memfd(f) | Kept::Eventfd(f) => f.try_clone().ok(),
            Kept::Other => None,
        }
    }

    /// Sends `bytes` with the fds `fds` describes (created now). Without a connection, the
    /// fds are still created (later lines may name them) and nothing is sent.
    pub fn send(&mut self, bytes: &[u8], fds: &[FdSpec]) -> std::io::Result<()> {
        self.send_preset(bytes, fds, 0)
    }

    /// Like [`FakeFrontend::send`], with each eventfd's counter already at `count` when it
    /// is sent: QEMU's host notifiers (the kick fds of SET_VRING_KICK) are created with a
    /// count of 1 (`virtio_bus_set_host_notifier`), so a kick that came before the back-end
    /// polled the fd is not lost.
    pub fn send_preset(&mut self, bytes: &[u8], fds: &[FdSpec], count: u64) -> std::io::Result<()> {
        let owned = fds
            .iter()
            .map(|s| self.create(*s))
            .collect::<std::io::Result<Vec<_>>>()?;
        if count != 0 {
            for spec in fds {
                if let Some(Kept::Eventfd(f)) = self.kept.get_mut(&spec.id) {
                    f.write_all(&count.to_ne_bytes())?;
                }
            }
        }
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        self.sent += 1;
        let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
        // A message with fds and no bytes cannot carry them; send one zero byte instead
        // would change the stream, so such a message is sent without its fds.
        let mut off = 0;
        while off < bytes.len() {
            let cmsgs = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if off == 0 && !raw.is_empty() {
                &cmsgs
            } else {
                &[]
            };
            let iov = [IoSlice::new(&bytes[off..])];
            match sendmsg::<()>(
                conn.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => off += n,
                Err(nix::errno::Errno::EINTR) => {}
                // The device closed the connection: what is left is lost, as on a real socket.
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Whether the front-end created fd `id` (and has not forgotten it).
    pub fn has_fd(&self, id: u32) -> bool {
        self.kept.contains_key(&id)
    }

    /// Writes 1 to eventfd `id` (a kick), if the front-end created it.
    pub fn signal(&mut self, id: u32) {
        if let Some(Kept::Eventfd(f)) = self.kept.get_mut(&id) {
            let _ = f.write_all(&1u64.to_ne_bytes());
        }
    }

    /// Reads (and clears) eventfd `id`'s counter: 0 if it was not signalled.
    pub fn take_signals(&mut self, id: u32) -> u64 {
        let mut buf = [0u8; 8];
        match self.kept.get_mut(&id) {
            Some(Kept::Eventfd(f)) => match f.read(&mut buf) {
                Ok(8) => u64::from_ne_bytes(buf),
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Writes `data` into memfd `id` at `offset`.
    pub fn poke(&mut self, id: u32, offset: u64, data: &[u8]) {
        if let Some(Kept::Memfd(f)) = self.kept.get(&id) {
            let _ = f.write_all_at(data, offset);
        }
    }

    /// Reads `len` bytes of memfd `id` at `offset` (None if there is no such memfd).
    pub fn peek(&self, id: u32, offset: u64, len: usize) -> Option<Vec<u8>> {
        let Some(Kept::Memfd(f)) = self.kept.get(&id) else {
            return None;
        };
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// Sends bytes on the backend channel, if there is one.
    pub fn backend_send(&mut self, bytes: &[u8]) {
        if let Some(b) = &mut self.backend {
            let _ = (&b.stream).write_all(bytes);
        }
    }
}

impl Drop for FakeFrontend {
    fn drop(&mut self) {
        self.close();
    }
}
