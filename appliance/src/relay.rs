//! The frontend side of every connection: a small relay of vhost-user control messages
//! between the frontend's socket and the vhost-user-backend daemon, and the backend channel
//! it keeps so the daemon can send the frontend requests of its own.
//!
//! Why a relay: after an online resize a virtio-blk frontend must be told
//! (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend channel, vhost-user spec "Back-end
//! message types"; QEMU then re-reads the config space and raises a configuration change
//! interrupt). vhost-user-backend 0.24 accepts the frontend itself and hands the channel of
//! SET_BACKEND_REQ_FD to the backend as a vhost 0.18 `Backend`, which can send no
//! CONFIG_CHANGE_MSG and does not give its socket out; the crates are pinned. So the
//! export's accept loop accepts the frontend, the daemon is connected to a
//! [`PrivateListener`] (a socket only this process can reach), and [`relay`] carries each
//! message between the two unchanged, file descriptors included, in both directions. When
//! the frontend hands over a backend channel (with BACKEND_REQ negotiated), the relay keeps
//! a duplicate of it in [`BackendChannel`].
//!
//! The relay is off the data path: kicks and calls are eventfds the frontend hands over,
//! and guest memory is mapped from the memory fds, so no request or completion passes
//! through it; it sees only the handful of messages of connection set-up and teardown.
//! Hostile input (a size beyond the protocol's 4 KiB, more descriptors than it allows, a
//! truncated message, a memory region past the end of its file: `regions`) ends only that
//! connection.
//!
//! The relay also answers the inflight area messages (GET_INFLIGHT_FD, SET_INFLIGHT_FD),
//! which vhost-user-backend 0.24 refuses, through [`InflightFds`] (`crate::inflight`), and
//! wraps a SET_VRING_KICK on a running vring in SET_VRING_ENABLE 0/1, which the crate needs
//! to poll the new fd (`vrings`).
//!
//! In appliance-VM mode the frontend side of the relay is the `vvu_transport` bridge, whose
//! backend channel is a socket pair it carries over the device's queues: a CONFIG_CHANGE_MSG
//! written here goes out on txq and the frontend's reply comes back on rxq.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockType,
};
use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserInflight, VhostUserProtocolFeatures,
};

mod regions;
mod vrings;

/// Size of a vhost-user message header: request, flags, payload size (u32 each).
const HEADER_SIZE: usize = 12;
/// Largest payload the protocol allows (vhost 0.18 `MAX_MSG_SIZE`; QEMU's is smaller).
const MAX_PAYLOAD: usize = 0x1000;
/// Most descriptors one message may carry (vhost 0.18 `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;
/// Header flags (vhost-user spec, "Message Specification").
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// How long a frontend may take to take and answer a backend request.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a relayed connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A message carried more file descriptors than a vhost-user message may.
    #[error("more than {MAX_FDS} file descriptors in a message")]
    TooManyFds,
    /// The peer closed inside a message (header or payload).
    #[error("the connection closed inside a message")]
    Truncated,
    /// A memory region (SET_MEM_TABLE, ADD_MEM_REG) that does not lie inside the file
    /// handed over for it (`regions`).
    #[error("memory region {index} ({size:#x} bytes at offset {offset:#x}) lies past the end of its {file_len:#x}-byte file")]
    RegionPastEof {
        /// Its position in the message.
        index: usize,
        /// `mmap_offset`, in bytes.
        offset: u64,
        /// `memory_size`, in bytes.
        size: u64,
        /// Length of the file, in bytes.
        file_len: u64,
    },
    /// A header announcing a payload beyond the protocol's limit.
    #[error(
        "a message of {size} bytes (request {request}) is beyond the protocol's {MAX_PAYLOAD}"
    )]
    Oversized {
        /// Payload bytes announced.
        size: usize,
        /// Its request code.
        request: u32,
    },
}

impl From<Errno> for RelayError {
    fn from(e: Errno) -> Self {
        RelayError::Io(io::Error::from(e))
    }
}

/// One vhost-user message and the descriptors that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    /// A message of the relay's own, without descriptors.
    fn new(bytes: Vec<u8>) -> Self {
        Message {
            bytes,
            fds: Vec::new(),
        }
    }

    fn request(&self) -> u32 {
        le32(&self.bytes, 0)
    }

    fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_SIZE..]
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

/// Receives into `buf` (all of it, unless the peer closes first), collecting descriptors.
/// Returns the bytes received: fewer than `buf.len()` only at end of stream.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, RelayError> {
    let mut filled = 0;
    while filled < buf.len() {
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf[filled..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let received = msg.bytes;
        // Errs when descriptors were cut off (MSG_CTRUNC): more than a message may carry.
        let cmsgs = msg.cmsgs().map_err(|_| RelayError::TooManyFds)?;
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for this
                    // message (SCM_RIGHTS); nothing else knows of it, so it is owned here.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if fds.len() > MAX_FDS {
            return Err(RelayError::TooManyFds);
        }
        if received == 0 {
            break;
        }
        filled += received;
    }
    Ok(filled)
}

/// Reads one message; `None` when the peer closed between messages.
fn read_message(stream: &UnixStream) -> Result<Option<Message>, RelayError> {
    let mut fds = Vec::new();
    let mut bytes = vec![0u8; HEADER_SIZE];
    match recv_exact(stream, &mut bytes, &mut fds)? {
        0 => return Ok(None),
        HEADER_SIZE => {}
        _ => return Err(RelayError::Truncated),
    }
    let size = le32(&bytes, 8) as usize;
    if size > MAX_PAYLOAD {
        return Err(RelayError::Oversized {
            size,
            request: le32(&bytes, 0),
        });
    }
    bytes.resize(HEADER_SIZE + size, 0);
    if recv_exact(stream, &mut bytes[HEADER_SIZE..], &mut fds)? != size {
        return Err(RelayError::Truncated);
    }
    Ok(Some(Message { bytes, fds }))
}

/// Sends one message with its descriptors (they go with its first byte).
fn send_message(stream: &UnixStream, msg: &Message) -> Result<(), RelayError> {
    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&msg.bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    // A stream socket may take part of it; the descriptors went with that part.
    (&*stream).write_all(&msg.bytes[sent..])?;
    Ok(())
}

/// Relays messages between `frontend` and `daemon` until either closes (`Ok`) or breaks the
/// framing; a backend channel the frontend hands over is kept in `channel`. Both sockets are
/// blocking: a side that stops inside a message holds only this connection.
pub fn relay(
    frontend: &UnixStream,
    daemon: &UnixStream,
    channel: &BackendChannel,
    inflight: &dyn InflightFds,
) -> Result<(), RelayError> {
    let mut acked_protocol = 0u64;
    let mut vrings = vrings::Vrings::default();
    loop {
        let mut fds = [
            PollFd::new(frontend.as_fd(), PollFlags::POLLIN),
            PollFd::new(daemon.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let (from_frontend, from_daemon) = (ready(&fds[0]), ready(&fds[1]));
        if from_frontend {
            let Some(msg) = read_message(frontend)? else {
                return Ok(());
            };
            if let Some(reply) = answer_inflight(&msg, acked_protocol, inflight) {
                if let Some(reply) = reply {
                    send_message(frontend, &reply)?;
                }
                continue;
            }
            regions::check(&msg)?;
            let offered = inspect(&msg, &mut acked_protocol)?;
            let replaced = vrings.on_frontend_message(msg.request(), msg.payload());
            if let Some(vring) = replaced {
                tracing::debug!(
                    vring,
                    "kick fd replaced on a running vring: disabled around it"
                );
                send_message(
                    daemon,
                    &Message::new(vrings::set_vring_enable(vring, false)),
                )?;
            }
            send_message(daemon, &msg)?;
            if let Some(vring) = replaced {
                send_message(daemon, &Message::new(vrings::set_vring_enable(vring, true)))?;
            }
            if let Some(stream) = offered {
                let ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
                channel.set(stream, acked_protocol & ack != 0);
            }
        }
        if from_daemon {
            let Some(msg) = read_message(daemon)? else {
                return Ok(());
            };
            send_message(frontend, &msg)?;
        }
    }
}

/// The daemon side of the inflight area messages (vhost-user spec, "Inflight I/O
/// tracking"), which vhost-user-backend 0.24 refuses: the relay answers GET_INFLIGHT_FD and
/// SET_INFLIGHT_FD itself through this.
pub trait InflightFds {
    /// GET_INFLIGHT_FD: a new zeroed area for the queues `request` describes; returns its
    /// description and file.
    fn get_inflight_fd(&self, request: &VhostUserInflight)
        -> io::Result<(VhostUserInflight, File)>;
    /// SET_INFLIGHT_FD: the area to track requests in from now on.
    fn set_inflight_fd(&self, area: &VhostUserInflight, file: File) -> io::Result<()>;
}

/// Size of `VhostUserInflight` on the wire (two u64, two u16, padded as C lays it out).
const INFLIGHT_PAYLOAD: usize = 24;

/// Answers an inflight area message (with INFLIGHT_SHMFD acked) in place of the daemon:
/// `None` for any other message, `Some(reply)` otherwise (`Some(None)`: nothing to send).
/// A failed GET_INFLIGHT_FD answers `mmap_size` 0 and no descriptor, which QEMU takes as
/// "no inflight tracking"; a failed SET_INFLIGHT_FD acks with failure when asked to.
fn answer_inflight(
    msg: &Message,
    acked_protocol: u64,
    inflight: &dyn InflightFds,
) -> Option<Option<Message>> {
    let request = msg.request();
    let get = request == FrontendReq::GET_INFLIGHT_FD as u32;
    let set = request == FrontendReq::SET_INFLIGHT_FD as u32;
    if !(get || set) || acked_protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() == 0 {
        return None;
    }
    let mut raw = [0u8; INFLIGHT_PAYLOAD];
    let payload = msg.payload();
    let described_ok = payload.len() >= 20;
    let n = payload.len().min(INFLIGHT_PAYLOAD);
    raw[..n].copy_from_slice(&payload[..n]);
    let u64_at = |at: usize| u64::from(le32(&raw, at)) | u64::from(le32(&raw, at + 4)) << 32;
    let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
    let described = VhostUserInflight::new(u64_at(0), u64_at(8), u16_at(16), u16_at(18));
    let reply = |payload: &[u8], fds: Vec<OwnedFd>| {
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds }
    };
    if get {
        let answer = if described_ok {
            inflight.get_inflight_fd(&described)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "short GET_INFLIGHT_FD",
            ))
        };
        let (area, fds) = match answer {
            Ok((area, file)) => (area, vec![OwnedFd::from(file)]),
            Err(e) => {
                tracing::warn!("GET_INFLIGHT_FD failed: {e}");
                (
                    VhostUserInflight::new(0, 0, described.num_queues, described.queue_size),
                    Vec::new(),
                )
            }
        };
        let mut payload = [0u8; INFLIGHT_PAYLOAD];
        payload[0..8].copy_from_slice(&area.mmap_size.to_le_bytes());
        payload[8..16].copy_from_slice(&area.mmap_offset.to_le_bytes());
        payload[16..18].copy_from_slice(&area.num_queues.to_le_bytes());
        payload[18..20].copy_from_slice(&area.queue_size.to_le_bytes());
        return Some(Some(reply(&payload, fds)));
    }
    let result = match (described_ok, msg.fds.as_slice()) {
        (true, [fd]) => fd
            .try_clone()
            .and_then(|fd| inflight.set_inflight_fd(&described, File::from(fd))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SET_INFLIGHT_FD without its description and one descriptor",
        )),
    };
    if let Err(e) = &result {
        tracing::warn!("SET_INFLIGHT_FD failed: {e}");
    }
    let wants_ack = le32(&msg.bytes, 4) & NEED_REPLY != 0;
    Some(wants_ack.then(|| reply(&u64::from(result.is_err()).to_le_bytes(), Vec::new())))
}

/// What the relay learns from a frontend message: the protocol features it acked, and the
/// backend channel it offers (a duplicate, when BACKEND_REQ was acked and the descriptor is
/// a unix stream socket; the daemon gets the message unchanged either way).
fn inspect(msg: &Message, acked_protocol: &mut u64) -> Result<Option<UnixStream>, RelayError> {
    let request = msg.request();
    if request == FrontendReq::SET_PROTOCOL_FEATURES as u32 {
        if let Ok(bits) = <[u8; 8]>::try_from(msg.payload()) {
            *acked_protocol = u64::from_le_bytes(bits);
        }
        return Ok(None);
    }
    let backend_req = VhostUserProtocolFeatures::BACKEND_REQ.bits();
    if request != FrontendReq::SET_BACKEND_REQ_FD as u32 || *acked_protocol & backend_req == 0 {
        return Ok(None);
    }
    let [fd] = msg.fds.as_slice() else {
        return Ok(None);
    };
    let stream = UnixStream::from(fd.try_clone()?);
    let is_unix_stream = stream.local_addr().is_ok()
        && getsockopt(&stream, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    if !is_unix_stream {
        tracing::debug!("SET_BACKEND_REQ_FD with a descriptor that is no unix stream socket");
        return Ok(None);
    }
    Ok(Some(stream))
}

/// The backend channel of an export's current frontend, if it offered one: the daemon's
/// way to send it requests (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG after a resize).
#[derive(Default)]
pub struct BackendChannel {
    state: Mutex<Option<Channel>>,
}

struct Channel {
    stream: UnixStream,
    /// REPLY_ACK was negotiated: requests carry NEED_REPLY and the frontend answers.
    need_reply: bool,
}

impl BackendChannel {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, stream: UnixStream, need_reply: bool) {
        *self.lock() = Some(Channel { stream, need_reply });
    }

    /// Forgets the channel (its frontend connection ended).
    pub fn clear(&self) {
        self.lock().take();
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no payload): the device's configuration
    /// space changed, the frontend reads it again (GET_CONFIG) and interrupts its driver.
    /// With REPLY_ACK negotiated the request carries NEED_REPLY and the frontend's answer
    /// (a u64, 0 for success) is awaited, for up to 5 s. Returns false when the frontend
    /// offered no backend channel. A channel that failed once is dropped: the frontend
    /// broke the protocol or went away.
    pub fn config_changed(&self) -> io::Result<bool> {
        let mut state = self.lock();
        let Some(channel) = state.as_mut() else {
            return Ok(false);
        };
        let result = channel.config_change();
        if result.is_err() {
            state.take();
        }
        result.map(|()| true)
    }
}

impl Channel {
    fn config_change(&mut self) -> io::Result<()> {
        let request = BackendReq::CONFIG_CHANGE_MSG as u32;
        let flags = VERSION | if self.need_reply { NEED_REPLY } else { 0 };
        let mut header = [0u8; HEADER_SIZE];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        self.stream.set_write_timeout(Some(CHANNEL_TIMEOUT))?;
        self.stream.write_all(&header)?;
        if !self.need_reply {
            return Ok(());
        }
        self.stream.set_read_timeout(Some(CHANNEL_TIMEOUT))?;
        let mut reply = [0u8; HEADER_SIZE + 8];
        self.stream.read_exact(&mut reply[..HEADER_SIZE])?;
        let (code, flags, size) = (le32(&reply, 0), le32(&reply, 4), le32(&reply, 8));
        if code != request || flags & REPLY == 0 || size != 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the answer (request {code}, flags {flags:#x}, {size} bytes) is no reply to CONFIG_CHANGE_MSG"),
            ));
        }
        self.stream.read_exact(&mut reply[HEADER_SIZE..])?;
        let mut value = [0u8; 8];
        value.copy_from_slice(&reply[HEADER_SIZE..]);
        match u64::from_le_bytes(value) {
            0 => Ok(()),
            failure => Err(io::Error::other(format!(
                "the frontend answered CONFIG_CHANGE_MSG with failure {failure}"
            ))),
        }
    }
}

/// A listening socket only this process can reach, which the vhost-user-backend daemon
/// connects to for each frontend connection the relay carries. It is bound under the
/// temporary directory, opened `O_PATH` and unlinked at once: no other process can name it
/// any more, while this one connects through `/proc/self/fd/N` of the `O_PATH` descriptor
/// (Linux resolves the socket's inode through it). A connection from another process (one
/// that raced the unlink) is closed unserved by its credentials (SO_PEERCRED).
pub struct PrivateListener {
    listener: UnixListener,
    path: OwnedFd,
}

impl PrivateListener {
    /// Binds a new private listener.
    pub fn new() -> io::Result<Self> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "vhost-appliance-{}-{}-{nanos:x}.sock",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let bound = std::env::temp_dir().join(name);
        let listener = UnixListener::bind(&bound)?;
        let path = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&bound);
        let unlinked = std::fs::remove_file(&bound);
        let path = OwnedFd::from(path?);
        unlinked?;
        Ok(PrivateListener { listener, path })
    }

    /// The path a connector in this process uses: `/proc/self/fd/N`.
    pub fn path(&self) -> String {
        format!("/proc/self/fd/{}", self.path.as_raw_fd())
    }

    /// Accepts the next connection made by this process; others are closed.
    pub fn accept_own(&self) -> io::Result<UnixStream> {
        let own = nix::unistd::getpid().as_raw();
        loop {
            let (stream, _) = self.listener.accept()?;
            match getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(cred) if cred.pid() == own => return Ok(stream),
                Ok(cred) => tracing::warn!(
                    pid = cred.pid(),
                    uid = cred.uid(),
                    "a connection to the private relay socket from another process refused"
                ),
                Err(e) => tracing::warn!("cannot read the credentials of a relay connection: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&VERSION.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let n = sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(n, bytes.len());
    }

    /// A relay between a test frontend and a test daemon, on a thread.
    /// Reads a backend request on the frontend's end of a channel and answers it with
    /// REPLY and the u64 `value` (0: success); returns the request's header.
    fn answer_request(stream: &UnixStream, value: u64) -> [u8; HEADER_SIZE] {
        let mut header = [0u8; HEADER_SIZE];
        (&*stream).read_exact(&mut header).unwrap();
        let mut r = header.to_vec();
        r[4..8].copy_from_slice(&(VERSION | REPLY).to_le_bytes());
        r[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.extend_from_slice(&value.to_le_bytes());
        (&*stream).write_all(&r).unwrap();
        header
    }

    /// Refuses every inflight area.
    struct NoInflight;

    impl InflightFds for NoInflight {
        fn get_inflight_fd(&self, _: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
            Err(io::Error::other("no inflight area"))
        }
        fn set_inflight_fd(&self, _: &VhostUserInflight, _: File) -> io::Result<()> {
            Err(io::Error::other("no inflight area"))
        }
    }

    fn relayed() -> (
        UnixStream,
        UnixStream,
        std::sync::Arc<BackendChannel>,
        std::thread::JoinHandle<Result<(), RelayError>>,
    ) {
        let (frontend, frontend_end) = UnixStream::pair().unwrap();
        let (daemon, daemon_end) = UnixStream::pair().unwrap();
        let channel = std::sync::Arc::new(BackendChannel::default());
        let relay_channel = std::sync::Arc::clone(&channel);
        let thread = std::thread::spawn(move || {
            relay(&frontend_end, &daemon_end, &relay_channel, &NoInflight)
        });
        (frontend, daemon, channel, thread)
    }

    #[test]
    fn messages_and_descriptors_pass_both_ways_and_the_backend_channel_is_kept() {
        let (frontend, daemon, channel, thread) = relayed();
        // SET_PROTOCOL_FEATURES with BACKEND_REQ and REPLY_ACK, then the channel.
        let features =
            (VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::REPLY_ACK).bits();
        let set = message(
            FrontendReq::SET_PROTOCOL_FEATURES as u32,
            &features.to_le_bytes(),
        );
        send(&frontend, &set, &[]);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let offer = message(FrontendReq::SET_BACKEND_REQ_FD as u32, &[]);
        send(&frontend, &offer, &[theirs.as_raw_fd()]);
        drop(theirs);
        let got = read_message(&daemon).unwrap().unwrap();
        assert_eq!(got.bytes, set);
        let got = read_message(&daemon).unwrap().unwrap();
        assert_eq!(got.bytes, offer);
        assert_eq!(got.fds.len(), 1, "the descriptor went to the daemon too");
        drop(got);
        // A reply with a descriptor comes back.
        let (probe, _) = UnixStream::pair().unwrap();
        let reply = message(FrontendReq::GET_FEATURES as u32, &7u64.to_le_bytes());
        send(&daemon, &reply, &[probe.as_raw_fd()]);
        let back = read_message(&frontend).unwrap().unwrap();
        assert_eq!((back.bytes, back.fds.len()), (reply, 1));

        // CONFIG_CHANGE_MSG with NEED_REPLY reaches the frontend's end of the channel.
        let answer = std::thread::spawn(move || (answer_request(&ours, 0), ours));
        assert!(channel.config_changed().unwrap());
        let (header, ours) = answer.join().unwrap();
        assert_eq!(le32(&header, 0), 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
        assert_eq!(le32(&header, 4), VERSION | NEED_REPLY);
        assert_eq!(le32(&header, 8), 0);

        // A failure answer drops the channel.
        let answer = std::thread::spawn(move || {
            answer_request(&ours, 1);
        });
        assert!(channel.config_changed().is_err());
        answer.join().unwrap();
        assert!(!channel.config_changed().unwrap(), "no channel any more");

        drop(frontend);
        assert!(
            thread.join().unwrap().is_ok(),
            "a close ends the relay cleanly"
        );
        assert!(
            read_message(&daemon).unwrap().is_none(),
            "and closes the daemon's side"
        );
    }

    #[test]
    fn no_channel_is_kept_without_backend_req() {
        let (frontend, daemon, channel, thread) = relayed();
        let (_ours, theirs) = UnixStream::pair().unwrap();
        send(
            &frontend,
            &message(FrontendReq::SET_BACKEND_REQ_FD as u32, &[]),
            &[theirs.as_raw_fd()],
        );
        assert!(read_message(&daemon).unwrap().is_some());
        assert!(!channel.config_changed().unwrap());
        drop(frontend);
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn hostile_framing_ends_the_relay() {
        for (bad, oversized) in [
            // A payload beyond 4 KiB.
            (
                message(1, &[])
                    .iter()
                    .take(8)
                    .copied()
                    .chain(0x2000u32.to_le_bytes())
                    .collect::<Vec<u8>>(),
                true,
            ),
            // A header cut short by a close.
            (vec![1, 0, 0], false),
            // A payload cut short by a close.
            (message(1, &[0; 8])[..15].to_vec(), false),
        ] {
            let (frontend, _daemon, _channel, thread) = relayed();
            (&frontend).write_all(&bad).unwrap();
            drop(frontend);
            let result = thread.join().unwrap();
            let expected = if oversized {
                matches!(result, Err(RelayError::Oversized { size: 0x2000, .. }))
            } else {
                matches!(result, Err(RelayError::Truncated))
            };
            assert!(expected, "{bad:?}: {result:?}");
        }
        // Too many descriptors.
        let (frontend, _daemon, _channel, thread) = relayed();
        let (a, _b) = UnixStream::pair().unwrap();
        let fds = vec![a.as_raw_fd(); MAX_FDS + 1];
        let _ = sendmsg::<()>(
            frontend.as_raw_fd(),
            &[IoSlice::new(&message(1, &[]))],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        );
        drop(frontend);
        assert!(thread.join().unwrap().is_err());
    }

    #[test]
    fn the_private_listener_takes_this_process_only() {
        let listener = PrivateListener::new().unwrap();
        let path = listener.path();
        assert!(path.starts_with("/proc/self/fd/"));
        let client = UnixStream::connect(&path).unwrap();
        let server = listener.accept_own().unwrap();
        (&client).write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        (&server).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }
}
