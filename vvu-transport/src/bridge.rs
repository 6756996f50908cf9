//! The bridge between a virtio-vhost-user device and an ordinary vhost-user backend.
//!
//! A vhost-user backend (the daemon's, unchanged) serves a unix stream; the device delivers
//! the frontend's messages on rxq without file descriptors. The bridge forwards each message
//! to a stream connected to the backend and stands in for the descriptors the frontend sent
//! (`design/VVU-SPEC.md`, "Frontend memory" and "Notifications"):
//!
//! - memory regions (SET_MEM_TABLE, ADD_MEM_REG) become the shared-memory BAR's file (the
//!   VFIO device fd) with `mmap_offset` moved to where the device placed the region, so the
//!   backend maps frontend memory out of the BAR by itself; the inflight area
//!   (SET_INFLIGHT_FD, which the device maps into the BAR the same way) likewise. The
//!   backend's answer to GET_INFLIGHT_FD goes out without its file: the device creates the
//!   area the frontend keeps;
//! - SET_VRING_KICK becomes the eventfd of the vring's kick MSI-X vector, so the backend's
//!   worker wakes on the interrupt directly;
//! - SET_VRING_CALL/ERR become a fresh eventfd wired to the vring's doorbell with
//!   [`VvuDriver::wire_doorbell`]: the backend's worker thread signals its call eventfd as
//!   it always does and the kernel performs the doorbell store. Calls take no extra hop and
//!   the backend needs no notifier abstraction.
//!
//! Replies go back on txq. A backend channel (SET_BACKEND_REQ_FD) becomes a socket pair: the
//! backend's requests on it go out on txq (without the REPLY flag, which tells the device
//! they are requests), and the frontend's replies, which arrive on rxq with the REPLY flag,
//! go back to the backend on it. One frontend connection is one session, delimited by the
//! configuration interrupts the device raises when FRONTEND_UP changes; when a session ends
//! the backend's stream is closed so the backend drains and resets, and the bridge
//! acknowledges the end (BACKEND_UP written again) before the device takes the next
//! frontend [ours: an extension of `design/VVU-SPEC.md`, which lets messages of
//! consecutive sessions interleave otherwise]. Messages that would need a descriptor the device cannot carry
//! (their protocol features are masked by the device), regions outside the BAR, bad vring
//! indices and a backend that closes its end are protocol errors: the bridge drops the
//! frontend by cycling BACKEND_UP, and a frontend with `reconnect-ms` comes back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::driver::{DriverError, VvuDriver, BUFFER_SIZE, FRONTEND_UP, HEADER_SIZE};
use crate::pci::PciTransport;

/// vhost-user request codes the bridge acts on (the `vhost` crate's `FrontendReq`).
mod request {
    use vhost::vhost_user::message::FrontendReq;

    pub const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
    pub const SET_LOG_BASE: u32 = FrontendReq::SET_LOG_BASE as u32;
    pub const SET_LOG_FD: u32 = FrontendReq::SET_LOG_FD as u32;
    pub const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
    pub const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
    pub const SET_VRING_ERR: u32 = FrontendReq::SET_VRING_ERR as u32;
    pub const SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
    pub const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
    pub const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
    pub const REM_MEM_REG: u32 = FrontendReq::REM_MEM_REG as u32;
    pub const SET_DEVICE_STATE_FD: u32 = FrontendReq::SET_DEVICE_STATE_FD as u32;
}

/// The REPLY flag of a message header.
const REPLY: u32 = vhost::vhost_user::message::VhostUserHeaderFlag::REPLY.bits();
/// Vring index bits of a SET_VRING_* payload.
const VRING_INDEX_MASK: u64 = 0xff;
/// "No file descriptor" flag of a SET_VRING_* payload.
const VRING_NOFD: u64 = 0x100;
/// Size of one memory region description.
const REGION_SIZE: usize = 32;
/// Offset of `mmap_offset` in a region description.
const REGION_MMAP_OFFSET: usize = 24;
/// Bytes of a `VhostUserInflight` that carry fields (C pads it to 24).
const INFLIGHT_PAYLOAD_MIN: usize = 20;
/// How long a reply may wait for a free tx buffer before the session is given up.
const TX_WAIT: Duration = Duration::from_secs(5);

/// Bridge errors.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The device failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The connection to the backend failed.
    #[error("backend connection: {0}")]
    Backend(#[from] io::Error),
    /// The frontend (through the device) or the backend broke the protocol: the session
    /// ends, the device and the bridge carry on.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The device entered DEVICE_NEEDS_RESET: it must be reset and driven anew.
    #[error("the device needs a reset (it found an error in what the driver did)")]
    NeedsReset,
}

/// What ends a session: a message the bridge cannot carry, or a peer that let go.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The backend closed its end of the session's stream (or of the backend channel).
    #[error("the backend closed its end")]
    BackendClosed,
    /// A backend message larger than a device buffer.
    #[error("backend message of {size} bytes does not fit a {BUFFER_SIZE}-byte buffer")]
    OversizedBackendMessage {
        /// Payload bytes announced in its header.
        size: usize,
    },
    /// The driver found a malformed message on rxq.
    #[error("malformed message from the device: {0}")]
    MalformedFromDevice(String),
    /// SET_MEM_TABLE whose payload does not hold the regions it counts.
    #[error("SET_MEM_TABLE of {payload_len} bytes does not hold {count} regions")]
    MemTableSize {
        /// Payload bytes.
        payload_len: usize,
        /// Regions it claims.
        count: usize,
    },
    /// SET_INFLIGHT_FD whose payload is no inflight area description.
    #[error("SET_INFLIGHT_FD of {payload_len} bytes")]
    InflightMessageSize {
        /// Payload bytes.
        payload_len: usize,
    },
    /// ADD_MEM_REG/REM_MEM_REG whose payload is not one region.
    #[error("memory region message of {payload_len} bytes")]
    RegionMessageSize {
        /// Payload bytes.
        payload_len: usize,
    },
    /// A region outside the shared-memory BAR.
    #[error("memory region at {offset:#x} of {size:#x} bytes lies outside the {bar_len:#x}-byte shared-memory BAR")]
    RegionOutsideBar {
        /// Offset in the shared-memory area.
        offset: u64,
        /// Bytes.
        size: u64,
        /// Bytes of the shared-memory area.
        bar_len: u64,
    },
    /// SET_VRING_KICK/CALL/ERR whose payload is not a u64.
    #[error("vring message {request} of {payload_len} bytes")]
    VringMessageSize {
        /// Request code.
        request: u32,
        /// Payload bytes.
        payload_len: usize,
    },
    /// A vring index the device has no queue for.
    #[error("vring {vring} is beyond the device's {max} vhost queues")]
    VringOutOfRange {
        /// The vring index.
        vring: u32,
        /// The device's max_vhost_queues.
        max: u32,
    },
    /// A vring whose kick has no MSI-X vector (the device has too few).
    #[error("vring {vring} has no MSI-X vector for its kick")]
    NoKickVector {
        /// The vring index.
        vring: u32,
    },
    /// A request whose file descriptor the device cannot carry (its protocol feature is
    /// masked by the device, so a conforming frontend never sends it).
    #[error("request {request} needs a file descriptor the device cannot carry")]
    FdNotCarried {
        /// Request code.
        request: u32,
    },
    /// The backend sent a reply on its backend channel, which carries requests only.
    #[error("the backend sent a reply on its backend channel")]
    ReplyOnBackendChannel,
    /// A message arrived while no session was open.
    #[error("no session")]
    NoSession,
}

/// One frontend connection.
struct Session {
    stream: UnixStream,
    /// Counts sessions, so readiness polled for one is never taken for the next.
    id: u64,
    /// Call/err eventfds wired to doorbells, by doorbell index.
    wired: BTreeMap<u32, EventFd>,
    /// Our end of the backend channel, once the frontend offered one.
    backend_channel: Option<UnixStream>,
}

/// Carries one device's frontend sessions to a vhost-user backend.
pub struct Bridge<T: PciTransport, C> {
    driver: VvuDriver<T>,
    /// Maps the shared-memory BAR from `memory_base`.
    memory: File,
    memory_base: u64,
    memory_len: u64,
    /// Opens a stream to the backend for a new session.
    connect: C,
    session: Option<Session>,
    sessions: u64,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(s);
    Some(u64::from_le_bytes(v))
}

/// Reads one vhost-user message from a backend stream; end of stream is a protocol error.
fn read_message(stream: &mut UnixStream) -> Result<Vec<u8>, BridgeError> {
    let mut msg = vec![0u8; HEADER_SIZE];
    stream.read_exact(&mut msg).map_err(|e| {
        // A peer that closes with our last message unread resets the connection instead.
        if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) {
            BridgeError::Protocol(ProtocolError::BackendClosed)
        } else {
            BridgeError::Backend(e)
        }
    })?;
    let size = le32(&msg, 8).unwrap_or(0) as usize;
    if HEADER_SIZE + size > BUFFER_SIZE {
        return Err(ProtocolError::OversizedBackendMessage { size }.into());
    }
    msg.resize(HEADER_SIZE + size, 0);
    stream.read_exact(&mut msg[HEADER_SIZE..])?;
    Ok(msg)
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

impl<T: PciTransport, C: FnMut() -> io::Result<UnixStream>> Bridge<T, C> {
    /// A bridge over a driven device; `connect` opens a stream to the backend.
    pub fn new(driver: VvuDriver<T>, connect: C) -> Result<Self, BridgeError> {
        let shm = driver.shared_memory();
        let (memory, base) = driver.pci().bar_file(shm.bar)?;
        Ok(Bridge {
            driver,
            memory,
            memory_base: base + shm.offset,
            memory_len: shm.length,
            connect,
            session: None,
            sessions: 0,
        })
    }

    /// The device driver.
    pub fn driver(&self) -> &VvuDriver<T> {
        &self.driver
    }

    /// Serves frontends until `stop` is signalled: BACKEND_UP while running, cleared (which
    /// disconnects any frontend) on return.
    pub fn run(&mut self, stop: &EventFd) -> Result<(), BridgeError> {
        self.driver.set_backend_up(true)?;
        let result = loop {
            match self.poll(stop, -1) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        self.end_session();
        let down = self.driver.set_backend_up(false);
        result.and(down.map_err(BridgeError::from))
    }

    /// Waits up to `timeout_ms` (-1: no limit) and handles whatever is ready. Returns true
    /// when `stop` fired. Errors are the device's; session errors are handled here.
    pub fn poll(&mut self, stop: &EventFd, timeout_ms: i32) -> Result<bool, BridgeError> {
        let mut fds = vec![
            pollfd(stop.as_raw_fd()),
            pollfd(self.driver.config_event().as_raw_fd()),
            pollfd(self.driver.rx_event().as_raw_fd()),
        ];
        let polled_session = self.session.as_ref().map(|s| {
            fds.push(pollfd(s.stream.as_raw_fd()));
            if let Some(channel) = &s.backend_channel {
                fds.push(pollfd(channel.as_raw_fd()));
            }
            s.id
        });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e.into()),
            };
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
        if fds[1].revents != 0 {
            self.on_config()?;
        }
        if fds[2].revents != 0 {
            self.on_rx()?;
        }
        let backend_ready = fds.get(3).is_some_and(|f| f.revents != 0);
        if backend_ready && self.session.as_ref().map(|s| s.id) == polled_session {
            if let Err(e) = self.on_backend() {
                self.fail_session(&e)?;
            }
        }
        let channel_ready = fds.get(4).is_some_and(|f| f.revents != 0);
        if channel_ready && self.session.as_ref().map(|s| s.id) == polled_session {
            if let Err(e) = self.on_backend_channel() {
                self.fail_session(&e)?;
            }
        }
        Ok(false)
    }

    /// A configuration interrupt means FRONTEND_UP changed. When it is clear, the session
    /// is over: the messages the frontend sent before leaving are passed on, the session
    /// is closed, and the end is acknowledged by writing BACKEND_UP again, which is what
    /// lets the device take the next frontend, so a new session's messages can never
    /// reach the previous one. When it is set, a session starts (unless its first message
    /// already started it).
    fn on_config(&mut self) -> Result<(), BridgeError> {
        let _ = self.driver.config_event().read();
        if self.driver.needs_reset()? {
            return Err(BridgeError::NeedsReset);
        }
        if self.driver.device_status()? & FRONTEND_UP != 0 {
            if self.session.is_none() {
                self.start_session()?;
            }
            return Ok(());
        }
        if self.session.is_some() {
            self.on_rx()?;
            tracing::info!("vvu: frontend disconnected");
            self.end_session();
        }
        self.driver.set_backend_up(true)?;
        Ok(())
    }

    fn start_session(&mut self) -> Result<(), BridgeError> {
        match (self.connect)() {
            Ok(stream) => {
                self.sessions += 1;
                self.session = Some(Session {
                    stream,
                    id: self.sessions,
                    wired: BTreeMap::new(),
                    backend_channel: None,
                });
                tracing::info!("vvu: frontend connected");
                Ok(())
            }
            Err(e) => self.fail_session(&BridgeError::Backend(e)),
        }
    }

    fn on_rx(&mut self) -> Result<(), BridgeError> {
        let _ = self.driver.rx_event().read();
        loop {
            let msg = match self.driver.recv() {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                Err(DriverError::Malformed(m)) => {
                    self.fail_session(&ProtocolError::MalformedFromDevice(m).into())?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if self.session.is_none() && self.driver.device_status()? & FRONTEND_UP != 0 {
                // Interrupts of different vectors race: a new frontend's first message
                // may be here before its connect interrupt.
                self.start_session()?;
            }
            if self.session.is_none() {
                tracing::warn!(
                    request = le32(&msg, 0),
                    "vvu: message outside a frontend session dropped"
                );
                continue;
            }
            let result = if le32(&msg, 4).is_some_and(|flags| flags & REPLY != 0) {
                self.reply_on_backend_channel(&msg)
            } else {
                self.forward(msg)
            };
            if let Err(e) = result {
                self.fail_session(&e)?;
            }
        }
    }

    /// Sends one frontend message to the backend with the descriptors it stands for.
    fn forward(&mut self, mut msg: Vec<u8>) -> Result<(), BridgeError> {
        let request = le32(&msg, 0).unwrap_or(0);
        let payload_len = msg.len() - HEADER_SIZE;
        let mut fds: Vec<RawFd> = Vec::new();
        // The backend's end of a new backend channel, kept open until it is sent.
        let mut channel_end = None;
        match request {
            request::SET_MEM_TABLE => {
                let count = le32(&msg, HEADER_SIZE).unwrap_or(0) as usize;
                if payload_len != 8 + count * REGION_SIZE {
                    return Err(ProtocolError::MemTableSize { payload_len, count }.into());
                }
                for i in 0..count {
                    self.relocate_region(&mut msg, HEADER_SIZE + 8 + i * REGION_SIZE)?;
                    fds.push(self.memory.as_raw_fd());
                }
            }
            request::ADD_MEM_REG | request::REM_MEM_REG => {
                if payload_len != 8 + REGION_SIZE {
                    return Err(ProtocolError::RegionMessageSize { payload_len }.into());
                }
                self.relocate_region(&mut msg, HEADER_SIZE + 8)?;
                if request == request::ADD_MEM_REG {
                    fds.push(self.memory.as_raw_fd());
                }
            }
            request::SET_VRING_KICK | request::SET_VRING_CALL | request::SET_VRING_ERR => {
                let value = le64(&msg, HEADER_SIZE).filter(|_| payload_len == 8).ok_or(
                    ProtocolError::VringMessageSize {
                        request,
                        payload_len,
                    },
                )?;
                let vring = (value & VRING_INDEX_MASK) as u32;
                if vring >= self.driver.max_vhost_queues() {
                    return Err(ProtocolError::VringOutOfRange {
                        vring,
                        max: self.driver.max_vhost_queues(),
                    }
                    .into());
                }
                if value & VRING_NOFD == 0 {
                    fds.push(self.stand_in_fd(request, vring)?);
                } else if request != request::SET_VRING_KICK {
                    self.unwire(self.doorbell_index(request, vring));
                }
            }
            request::SET_BACKEND_REQ_FD => {
                let (ours, backends) = UnixStream::pair()?;
                fds.push(backends.as_raw_fd());
                channel_end = Some(backends);
                if let Some(session) = self.session.as_mut() {
                    session.backend_channel = Some(ours);
                }
            }
            request::SET_INFLIGHT_FD => {
                // VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size.
                if payload_len < INFLIGHT_PAYLOAD_MIN {
                    return Err(ProtocolError::InflightMessageSize { payload_len }.into());
                }
                self.relocate(&mut msg, HEADER_SIZE, HEADER_SIZE + 8)?;
                fds.push(self.memory.as_raw_fd());
            }
            request::SET_LOG_BASE | request::SET_LOG_FD | request::SET_DEVICE_STATE_FD => {
                return Err(ProtocolError::FdNotCarried { request }.into());
            }
            _ => {}
        }
        tracing::debug!(
            request,
            size = payload_len,
            fds = fds.len(),
            "vvu: to the backend"
        );
        let session = self.session.as_mut().ok_or(ProtocolError::NoSession)?;
        let sent = session
            .stream
            .send_with_fds(&[&msg[..]], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // A stream may take part of a message; the descriptors went with the first part.
        session.stream.write_all(&msg[sent..])?;
        drop(channel_end);
        Ok(())
    }

    /// Passes a frontend's reply from rxq to the backend on the backend channel.
    fn reply_on_backend_channel(&mut self, msg: &[u8]) -> Result<(), BridgeError> {
        let channel = self
            .session
            .as_mut()
            .and_then(|s| s.backend_channel.as_mut());
        match channel {
            Some(channel) => {
                tracing::debug!(request = le32(msg, 0), "vvu: reply to the backend channel");
                // The backend may have dropped its end; its requests then went unanswered.
                if let Err(e) = channel.write_all(msg) {
                    tracing::warn!("vvu: backend channel: {e}");
                }
            }
            None => tracing::warn!(
                request = le32(msg, 0),
                "vvu: a reply without a backend channel dropped"
            ),
        }
        Ok(())
    }

    /// Sends one backend request from the backend channel to the frontend (txq).
    fn on_backend_channel(&mut self) -> Result<(), BridgeError> {
        let Some(channel) = self
            .session
            .as_mut()
            .and_then(|s| s.backend_channel.as_mut())
        else {
            return Ok(());
        };
        let msg = match read_message(channel) {
            Ok(msg) => msg,
            Err(BridgeError::Protocol(ProtocolError::BackendClosed)) => {
                // The backend let go of the channel: it sends no more requests.
                if let Some(session) = self.session.as_mut() {
                    session.backend_channel = None;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if le32(&msg, 4).is_some_and(|flags| flags & REPLY != 0) {
            return Err(ProtocolError::ReplyOnBackendChannel.into());
        }
        tracing::debug!(
            request = le32(&msg, 0),
            "vvu: backend request to the frontend"
        );
        self.send_to_frontend(&msg)
    }

    /// Moves a region's `mmap_offset` from the shared-memory area to the BAR file, after
    /// checking the region lies inside the BAR.
    fn relocate_region(&self, msg: &mut [u8], at: usize) -> Result<(), BridgeError> {
        self.relocate(msg, at + 8, at + REGION_MMAP_OFFSET)
    }

    /// Moves the shared-memory offset at `offset_at` of an area of the size at `size_at`
    /// (a memory region, the inflight area) to the BAR file, after checking the area lies
    /// inside the BAR.
    fn relocate(
        &self,
        msg: &mut [u8],
        size_at: usize,
        offset_at: usize,
    ) -> Result<(), BridgeError> {
        let size = le64(msg, size_at).unwrap_or(0);
        let offset = le64(msg, offset_at).unwrap_or(0);
        if offset
            .checked_add(size)
            .is_none_or(|end| end > self.memory_len)
        {
            return Err(ProtocolError::RegionOutsideBar {
                offset,
                size,
                bar_len: self.memory_len,
            }
            .into());
        }
        let file_offset = self.memory_base + offset;
        msg[offset_at..offset_at + 8].copy_from_slice(&file_offset.to_le_bytes());
        Ok(())
    }

    fn doorbell_index(&self, request: u32, vring: u32) -> u32 {
        match request {
            request::SET_VRING_ERR => self.driver.max_vhost_queues() + vring,
            _ => vring,
        }
    }

    /// The descriptor that stands for a kick, call or err eventfd of `vring`.
    fn stand_in_fd(&mut self, request: u32, vring: u32) -> Result<RawFd, BridgeError> {
        if request == request::SET_VRING_KICK {
            return self
                .driver
                .kick_event(vring as usize)
                .map(AsRawFd::as_raw_fd)
                .ok_or_else(|| ProtocolError::NoKickVector { vring }.into());
        }
        let index = self.doorbell_index(request, vring);
        let session = self.session.as_mut().ok_or(ProtocolError::NoSession)?;
        // One eventfd per doorbell for the whole session. A frontend switches its call fd
        // (masked and unmasked notifiers) while the backend may still signal the previous
        // one; the device follows the frontend's switch, and the backend's old and new fd
        // are the same eventfd here, so no call is lost in between.
        if let Some(event) = session.wired.get(&index) {
            return Ok(event.as_raw_fd());
        }
        let event = EventFd::new(EFD_NONBLOCK)?;
        self.driver.wire_doorbell(index, Some(&event))?;
        let fd = event.as_raw_fd();
        session.wired.insert(index, event);
        Ok(fd)
    }

    /// Removes doorbell `index`'s wiring, for the session and in the kernel.
    fn unwire(&mut self, index: u32) {
        if let Some(session) = self.session.as_mut() {
            session.wired.remove(&index);
        }
        self.unwire_doorbell(index);
    }

    fn unwire_doorbell(&self, index: u32) {
        if let Err(e) = self.driver.wire_doorbell(index, None) {
            tracing::warn!("vvu: unwiring doorbell {index}: {e}");
        }
    }

    /// Forwards one backend message (a reply) to txq.
    fn on_backend(&mut self) -> Result<(), BridgeError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let msg = read_message(&mut session.stream)?;
        tracing::debug!(request = le32(&msg, 0), "vvu: to the frontend");
        self.send_to_frontend(&msg)
    }

    /// Puts a message on txq, waiting a while for a free buffer.
    fn send_to_frontend(&mut self, msg: &[u8]) -> Result<(), BridgeError> {
        let deadline = Instant::now() + TX_WAIT;
        loop {
            match self.driver.send(msg) {
                Err(DriverError::TxFull) if Instant::now() < deadline => {
                    let mut fd = [pollfd(self.driver.tx_event().as_raw_fd())];
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(fd.as_mut_ptr(), 1, 10) };
                    let _ = self.driver.tx_event().read();
                }
                other => return other.map_err(BridgeError::from),
            }
        }
    }

    /// Closes the session's stream (the backend drains and resets) and unwires its doorbells.
    fn end_session(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        for index in session.wired.keys() {
            self.unwire_doorbell(*index);
        }
        let _ = session.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Ends the session after a protocol error and drops the frontend by cycling
    /// BACKEND_UP. Only a device failure is returned.
    fn fail_session(&mut self, error: &BridgeError) -> Result<(), BridgeError> {
        tracing::warn!("vvu: dropping the frontend: {error}");
        self.end_session();
        self.driver.set_backend_up(false)?;
        self.driver.set_backend_up(true)?;
        Ok(())
    }
}

/// Serves frontends through `bridge` until `stop` fires. When the device fails (it entered
/// DEVICE_NEEDS_RESET, or stopped answering), the bridge is dropped, which releases the
/// device, and `bring_up` resets and drives it anew, every `retry` until it succeeds: one
/// failure takes the export away for a moment, not until the appliance restarts.
pub fn serve<T, C, E>(
    bridge: Bridge<T, C>,
    mut bring_up: impl FnMut() -> Result<Bridge<T, C>, E>,
    stop: &EventFd,
    retry: Duration,
) where
    T: PciTransport,
    C: FnMut() -> io::Result<UnixStream>,
    E: std::fmt::Display,
{
    let mut bridge = bridge;
    loop {
        match bridge.run(stop) {
            Ok(()) => return,
            Err(e) => tracing::error!("vvu: the device failed: {e}; bringing it up again"),
        }
        drop(bridge);
        bridge = loop {
            if stopped_within(stop, retry) {
                return;
            }
            match bring_up() {
                Ok(b) => {
                    tracing::info!("vvu: the device is up again");
                    break b;
                }
                Err(e) => tracing::warn!("vvu: bringing the device up again failed: {e}"),
            }
        };
    }
}

/// Waits up to `timeout` for `stop`; true if it fired.
fn stopped_within(stop: &EventFd, timeout: Duration) -> bool {
    let mut fd = [pollfd(stop.as_raw_fd())];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(fd.as_mut_ptr(), 1, ms) };
    n > 0 && fd[0].revents != 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::FileExt;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::driver::FIRST_KICK_VECTOR;
    use crate::fake::{FakeVvu, SHM_FILE_OFFSET, SHM_SIZE};

    const QUEUES: u32 = 4;

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn region(gpa: u64, size: u64, offset: u64) -> Vec<u8> {
        [gpa, size, 0x7f00_0000_0000 + gpa, offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// A bridge over the fake device with an active session; returns the backend's end.
    fn connected() -> (
        Bridge<FakeVvu, impl FnMut() -> io::Result<UnixStream>>,
        UnixStream,
        EventFd,
    ) {
        let fake = FakeVvu::new(3 + QUEUES as u16, QUEUES);
        let driver = VvuDriver::new(fake, 16, GuestAddress(0)).unwrap();
        let (bridge_end, backend_end) = UnixStream::pair().unwrap();
        let mut slot = Some(bridge_end);
        let mut bridge = Bridge::new(driver, move || {
            slot.take()
                .ok_or_else(|| io::Error::other("one session only"))
        })
        .unwrap();
        bridge.driver.set_backend_up(true).unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        bridge.driver.pci().frontend(true);
        assert!(!bridge.poll(&stop, 1000).unwrap());
        assert!(bridge.session.is_some(), "FRONTEND_UP starts a session");
        (bridge, backend_end, stop)
    }

    /// Receives one message and its descriptors on the backend's end.
    fn backend_recv(stream: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        // A message that never comes fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; BUFFER_SIZE];
        let mut fds = [-1; 8];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, alive and unaliased for the call.
        let (len, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        buf.truncate(len);
        // SAFETY: the kernel installed `nfds` fresh descriptors for this process.
        let fds = fds[..nfds]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        (buf, fds)
    }

    fn deliver(
        bridge: &mut Bridge<FakeVvu, impl FnMut() -> io::Result<UnixStream>>,
        stop: &EventFd,
        msg: &[u8],
    ) {
        assert!(bridge.driver.pci().push_rx(msg));
        assert!(!bridge.poll(stop, 1000).unwrap());
    }

    #[test]
    fn memory_regions_become_the_bar_file_at_the_device_offsets() {
        let (mut bridge, backend, stop) = connected();
        let shm = &bridge.driver.pci().shm;
        shm.write_all_at(b"region one", SHM_FILE_OFFSET + (2 << 20))
            .unwrap();
        let mut payload = 2u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 4]);
        payload.extend(region(0, 1 << 20, 0));
        payload.extend(region(1 << 32, 4 << 20, 2 << 20));
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_MEM_TABLE, &payload),
        );
        let (msg, fds) = backend_recv(&backend);
        assert_eq!(fds.len(), 2, "one descriptor per region");
        assert_eq!(le64(&msg, 12 + 8 + 24), Some(SHM_FILE_OFFSET));
        let second = le64(&msg, 12 + 8 + 32 + 24).unwrap();
        assert_eq!(second, SHM_FILE_OFFSET + (2 << 20));
        assert_eq!(le64(&msg, 12 + 8 + 32), Some(1 << 32), "gpa unchanged");
        let mut got = [0u8; 10];
        File::from(fds.into_iter().nth(1).unwrap())
            .read_exact_at(&mut got, second)
            .unwrap();
        assert_eq!(&got, b"region one");

        let mut add = vec![0u8; 8];
        add.extend(region(1 << 33, 2 << 20, 8 << 20));
        deliver(&mut bridge, &stop, &message(request::ADD_MEM_REG, &add));
        let (msg, fds) = backend_recv(&backend);
        assert_eq!(fds.len(), 1);
        assert_eq!(le64(&msg, 12 + 8 + 24), Some(SHM_FILE_OFFSET + (8 << 20)));
    }

    #[test]
    fn the_inflight_area_becomes_the_bar_file_at_the_device_offset() {
        let (mut bridge, backend, stop) = connected();
        let mut inflight = Vec::new();
        inflight.extend_from_slice(&4224u64.to_le_bytes());
        inflight.extend_from_slice(&(4u64 << 20).to_le_bytes());
        inflight.extend_from_slice(&2u16.to_le_bytes());
        inflight.extend_from_slice(&128u16.to_le_bytes());
        inflight.extend_from_slice(&[0; 4]);
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_INFLIGHT_FD, &inflight),
        );
        let (msg, fds) = backend_recv(&backend);
        assert_eq!(fds.len(), 1, "the BAR file");
        assert_eq!(le64(&msg, 12), Some(4224), "mmap_size unchanged");
        assert_eq!(le64(&msg, 12 + 8), Some(SHM_FILE_OFFSET + (4 << 20)));
        assert_eq!(&msg[12 + 16..12 + 20], &inflight[16..20]);
        // GET_INFLIGHT_FD passes as it is (the device creates the file).
        let get = message(
            vhost::vhost_user::message::FrontendReq::GET_INFLIGHT_FD as u32,
            &[0; 24],
        );
        deliver(&mut bridge, &stop, &get);
        let (msg, fds) = backend_recv(&backend);
        assert_eq!((msg, fds.len()), (get, 0));
        // An area outside the BAR drops the frontend.
        inflight[8..16].copy_from_slice(&SHM_SIZE.to_le_bytes());
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_INFLIGHT_FD, &inflight),
        );
        assert!(bridge.session.is_none());
    }

    #[test]
    fn a_region_outside_the_bar_drops_the_frontend() {
        let (mut bridge, backend, stop) = connected();
        let mut add = vec![0u8; 8];
        add.extend(region(0, 4 << 20, SHM_SIZE - (2 << 20)));
        deliver(&mut bridge, &stop, &message(request::ADD_MEM_REG, &add));
        assert!(bridge.session.is_none());
        let mut byte = [0u8; 1];
        assert_eq!((&backend).read(&mut byte).unwrap(), 0, "backend sees EOF");
        let writes = bridge.driver.pci().state.borrow().status_writes.clone();
        assert_eq!(writes, [1, 0, 1], "BACKEND_UP cycled to drop the frontend");
    }

    #[test]
    fn calls_are_eventfds_wired_to_doorbells_and_kicks_are_msix_eventfds() {
        let (mut bridge, backend, stop) = connected();
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_VRING_CALL, &1u64.to_le_bytes()),
        );
        let (_, fds) = backend_recv(&backend);
        let call = File::from(fds.into_iter().next().unwrap());
        (&call).write_all(&1u64.to_ne_bytes()).unwrap();
        bridge.driver.pci().deliver_signals();
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_VRING_ERR, &2u64.to_le_bytes()),
        );
        let (_, fds) = backend_recv(&backend);
        let err = File::from(fds.into_iter().next().unwrap());
        (&err).write_all(&1u64.to_ne_bytes()).unwrap();
        bridge.driver.pci().deliver_signals();
        // Doorbell i at 4*i: call of vring 1, err of vring 2 = index QUEUES + 2.
        assert_eq!(
            bridge.driver.pci().state.borrow().doorbell_writes,
            [(4, 2), (4 * (u64::from(QUEUES) + 2), 2)]
        );

        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_VRING_KICK, &3u64.to_le_bytes()),
        );
        let (_, fds) = backend_recv(&backend);
        let kick = File::from(fds.into_iter().next().unwrap());
        bridge.driver.pci().signal(FIRST_KICK_VECTOR + 3);
        let mut count = [0u8; 8];
        (&kick).read_exact(&mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 1, "the kick vector's eventfd");

        // Disconnect: the session ends and its doorbells are unwired.
        bridge.driver.pci().frontend(false);
        assert!(!bridge.poll(&stop, 1000).unwrap());
        assert!(bridge.session.is_none());
        (&call).write_all(&1u64.to_ne_bytes()).unwrap();
        bridge.driver.pci().deliver_signals();
        assert_eq!(bridge.driver.pci().state.borrow().doorbell_writes.len(), 2);
    }

    #[test]
    fn a_call_on_the_previous_call_fd_still_rings_the_doorbell() {
        let (mut bridge, backend, stop) = connected();
        let call = message(request::SET_VRING_CALL, &1u64.to_le_bytes());
        deliver(&mut bridge, &stop, &call);
        let (_, first) = backend_recv(&backend);
        // The frontend switches notifiers; the backend signals the old fd before it has
        // processed the new SET_VRING_CALL.
        deliver(&mut bridge, &stop, &call);
        let (_, second) = backend_recv(&backend);
        assert_eq!(second.len(), 1);
        let old = File::from(first.into_iter().next().unwrap());
        (&old).write_all(&1u64.to_ne_bytes()).unwrap();
        bridge.driver.pci().deliver_signals();
        assert_eq!(
            bridge.driver.pci().state.borrow().doorbell_writes,
            [(4, 2)],
            "the call on the previous fd reached the doorbell"
        );
    }

    #[test]
    fn replies_go_to_txq_and_bad_requests_drop_the_frontend() {
        let (mut bridge, backend, stop) = connected();
        let get_features = message(1, &[]);
        deliver(&mut bridge, &stop, &get_features);
        let (msg, fds) = backend_recv(&backend);
        assert_eq!(msg, get_features, "forwarded unchanged");
        assert!(fds.is_empty());
        let reply = message(1, &(1u64 << 32).to_le_bytes());
        (&backend).write_all(&reply).unwrap();
        assert!(!bridge.poll(&stop, 1000).unwrap());
        assert_eq!(bridge.driver.pci().pop_tx(), Some(reply));

        let vring = u64::from(QUEUES);
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_VRING_CALL, &vring.to_le_bytes()),
        );
        assert!(bridge.session.is_none(), "vring beyond max_vhost_queues");
    }

    #[test]
    fn a_first_message_ahead_of_its_connect_interrupt_opens_the_session() {
        let fake = FakeVvu::new(3 + QUEUES as u16, QUEUES);
        let driver = VvuDriver::new(fake, 16, GuestAddress(0)).unwrap();
        let (bridge_end, backend) = UnixStream::pair().unwrap();
        let mut slot = Some(bridge_end);
        let mut bridge = Bridge::new(driver, move || {
            slot.take()
                .ok_or_else(|| io::Error::other("one session only"))
        })
        .unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        bridge.driver.pci().state.borrow_mut().vvu_status |= FRONTEND_UP;
        let get_features = message(1, &[]);
        deliver(&mut bridge, &stop, &get_features);
        assert_eq!(backend_recv(&backend).0, get_features);
        // The late connect interrupt belongs to this session and does not end it.
        bridge.driver.pci().frontend(true);
        assert!(!bridge.poll(&stop, 1000).unwrap());
        assert_eq!(bridge.session.as_ref().map(|s| s.id), Some(1));
        // The next interrupt is a disconnect, which the bridge acknowledges by writing
        // BACKEND_UP so the device takes the next frontend.
        let writes = bridge.driver.pci().state.borrow().status_writes.len();
        bridge.driver.pci().frontend(false);
        assert!(!bridge.poll(&stop, 1000).unwrap());
        assert!(bridge.session.is_none());
        let state = bridge.driver.pci().state.borrow();
        assert_eq!(state.status_writes.len(), writes + 1);
        assert_eq!(state.status_writes.last(), Some(&1));
    }

    #[test]
    fn requests_needing_uncarried_descriptors_drop_the_frontend() {
        let (mut bridge, backend, stop) = connected();
        deliver(
            &mut bridge,
            &stop,
            &message(request::SET_LOG_BASE, &[0; 16]),
        );
        assert!(bridge.session.is_none());
        let mut byte = [0u8; 1];
        assert_eq!((&backend).read(&mut byte).unwrap(), 0);
    }

    #[test]
    fn a_backend_channel_carries_requests_out_and_replies_back() {
        let (mut bridge, backend, stop) = connected();
        let offer = message(request::SET_BACKEND_REQ_FD, &[]);
        deliver(&mut bridge, &stop, &offer);
        let (msg, mut fds) = backend_recv(&backend);
        assert_eq!(msg, offer);
        assert_eq!(
            fds.len(),
            1,
            "the backend gets a channel to send requests on"
        );
        let mut channel = UnixStream::from(fds.remove(0));
        channel
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();

        // CONFIG_CHANGE_MSG, reply wanted: out on txq as the backend wrote it.
        let mut config_change = 2u32.to_le_bytes().to_vec();
        config_change.extend_from_slice(&(1u32 | 1 << 3).to_le_bytes());
        config_change.extend_from_slice(&0u32.to_le_bytes());
        channel.write_all(&config_change).unwrap();
        assert!(!bridge.poll(&stop, 1000).unwrap());
        assert_eq!(bridge.driver.pci().pop_tx(), Some(config_change));

        // The frontend's reply arrives on rxq with the REPLY flag and goes to the channel,
        // not to the session's stream.
        let mut reply = 2u32.to_le_bytes().to_vec();
        reply.extend_from_slice(&(1u32 | REPLY).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        deliver(&mut bridge, &stop, &reply);
        let mut got = vec![0u8; reply.len()];
        channel.read_exact(&mut got).unwrap();
        assert_eq!(got, reply);

        // A backend that drops its channel keeps its session.
        drop(channel);
        assert!(!bridge.poll(&stop, 1000).unwrap());
        let session = bridge.session.as_ref().expect("the session goes on");
        assert!(session.backend_channel.is_none());
        let get_features = message(1, &[]);
        deliver(&mut bridge, &stop, &get_features);
        assert_eq!(backend_recv(&backend).0, get_features);
    }

    type Connect = Box<dyn FnMut() -> io::Result<UnixStream>>;

    /// A bridge over a fresh fake device, BACKEND_UP, no session.
    fn fresh_bridge() -> Bridge<FakeVvu, Connect> {
        let fake = FakeVvu::new(3 + QUEUES as u16, QUEUES);
        let driver = VvuDriver::new(fake, 16, GuestAddress(0)).unwrap();
        let connect: Connect = Box::new(|| UnixStream::pair().map(|(ours, _)| ours));
        let bridge = Bridge::new(driver, connect).unwrap();
        bridge.driver.set_backend_up(true).unwrap();
        bridge
    }

    #[test]
    fn a_device_that_needs_a_reset_is_brought_up_again() {
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut bridge = fresh_bridge();
        bridge.driver.pci().needs_reset();
        assert!(matches!(
            bridge.poll(&stop, 1000),
            Err(BridgeError::NeedsReset)
        ));

        // The loop drops the failed bridge and brings the device up again; the first
        // attempt fails, the second succeeds and (to end the test) stops the loop, which
        // then serves the new device until it sees the stop.
        bridge.driver.pci().needs_reset();
        let mut attempts = 0;
        let stop_fd = stop.try_clone().unwrap();
        serve(
            bridge,
            || {
                attempts += 1;
                if attempts == 1 {
                    return Err("the device is still resetting");
                }
                stop_fd.write(1).unwrap();
                Ok(fresh_bridge())
            },
            &stop,
            Duration::from_millis(10),
        );
        assert_eq!(attempts, 2);
    }
}
