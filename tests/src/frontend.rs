//! A raw vhost-user frontend for tests: the `vhost` crate's `Frontend` for the control
//! plane, shared memfd "guest" memory, and a driver-side split ring from `vvu-transport`.
//! Unlike a real driver it can build any descriptor chain, including malformed ones, so the
//! daemon's answers to hostile input can be checked over its real socket. It can open a
//! backend channel (SET_BACKEND_REQ_FD) whose requests the test reads and answers itself.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vvu_transport::split_ring::{Buffer, SplitRing};

/// Size of the shared "guest" memory.
pub const MEM_SIZE: usize = 16 << 20;
/// Where the ring lives in guest memory; buffers go above [`DATA_START`].
const RING_BASE: u64 = 0x1000;
/// First guest address free for test buffers.
pub const DATA_START: u64 = 0x10_0000;

/// One virtqueue driven by the frontend.
struct DriverQueue {
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
}

/// Guest memory reserved for each queue's ring.
const RING_STRIDE: u64 = 0x1_0000;

/// A zero-filled memfd of `len` bytes: memory a frontend can share over vhost-user.
pub fn memfd(len: usize) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"frontend-memory".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).expect("size memfd");
    file
}

/// SET_VRING_ADDR's payload for `ring` of `queue_size` entries: its descriptor table, used
/// and available rings as addresses in this process (vhost-user spec, "Vring address
/// description").
fn vring_addresses(mem: &GuestMemoryMmap, ring: &SplitRing, queue_size: u16) -> VringConfigData {
    let host = |gpa: GuestAddress| mem.get_host_address(gpa).expect("host address") as u64;
    VringConfigData {
        queue_max_size: queue_size,
        queue_size,
        flags: 0,
        desc_table_addr: host(ring.desc_addr()),
        used_ring_addr: host(ring.used_addr()),
        avail_ring_addr: host(ring.avail_addr()),
        log_addr: None,
    }
}

/// How [`RawFrontend::connect_with`] sets up the device.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Queues `0..num_queues` are set up and enabled.
    pub num_queues: usize,
    /// Entries per queue.
    pub queue_size: u16,
    /// Virtio features acked where offered.
    pub wanted_features: u64,
    /// Leave this value in each ring's used.idx at SET_VRING_ADDR and zero it only after
    /// the ring is enabled, as a driver that initialises its ring late would.
    pub stale_used_idx: Option<u16>,
    /// Send SET_VRING_BASE before SET_VRING_ADDR (QEMU's order) instead of after.
    pub base_first: bool,
    /// Negotiate INFLIGHT_SHMFD and keep the backend's inflight area (GET_INFLIGHT_FD, then
    /// SET_INFLIGHT_FD on every connection), as QEMU's vhost-user-blk and -scsi do.
    pub inflight: bool,
    /// Ack VIRTIO_RING_F_EVENT_IDX where offered. The ring keeps used_event at 0, so the
    /// device signals few completions: wait for them by looking at the used ring (not
    /// [`RawFrontend::strict_calls`]).
    pub event_idx: bool,
}

impl Setup {
    /// Queues `0..num_queues` of `queue_size` entries with `wanted_features`, set up as
    /// QEMU sets up a fresh device (base after address, zeroed rings), no inflight area,
    /// no EVENT_IDX.
    pub fn plain(num_queues: usize, queue_size: u16, wanted_features: u64) -> Self {
        Setup {
            num_queues,
            queue_size,
            wanted_features,
            stale_used_idx: None,
            base_first: false,
            inflight: false,
            event_idx: false,
        }
    }
}

/// A connected frontend driving the queues of a vhost-user device.
pub struct RawFrontend {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<DriverQueue>,
    /// Virtio features acked (without PROTOCOL_FEATURES).
    pub features: u64,
    /// The frontend's end of the backend channel, if it opened one.
    backend_channel: Option<UnixStream>,
    memfd: File,
    setup: Setup,
    /// The backend's inflight area, kept across connections (INFLIGHT_SHMFD).
    inflight: Option<(File, VhostUserInflight)>,
    /// Waits for used elements look at the used ring only after the call eventfd fired, as
    /// a driver that sleeps until its interrupt does: a used element the backend did not
    /// signal then fails the wait instead of being found by polling.
    pub strict_calls: bool,
}

/// A request the backend sent on the backend channel: its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendRequest {
    /// Request code (2: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG).
    pub request: u32,
    /// Header flags (0x8: NEED_REPLY).
    pub flags: u32,
    /// Payload size.
    pub size: u32,
}

/// Connects and negotiates: SET_OWNER, features (`wanted & offered`, EVENT_IDX only if
/// `setup.event_idx`, which then must be negotiated),
/// protocol features (CONFIG, REPLY_ACK, MQ, RESET_DEVICE where offered, and BACKEND_REQ /
/// INFLIGHT_SHMFD as asked).
/// Returns the frontend and the virtio features acked (without PROTOCOL_FEATURES).
fn handshake(socket: &Path, setup: &Setup, backend_channel: bool) -> (Frontend, u64) {
    let mut frontend = Frontend::connect(socket, setup.num_queues as u64)
        .expect("connect to the vhost-user socket");
    frontend.set_owner().expect("SET_OWNER");
    let offered = frontend.get_features().expect("GET_FEATURES");
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert!(
        offered & protocol_bit != 0,
        "backend must offer PROTOCOL_FEATURES"
    );
    // The ring does not maintain used_event, so EVENT_IDX is acked only when asked for.
    let event_idx = 1u64 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    let unwanted = if setup.event_idx { 0 } else { event_idx };
    let features = offered & setup.wanted_features & !protocol_bit & !unwanted;
    assert!(
        !setup.event_idx || features & event_idx != 0,
        "EVENT_IDX must be negotiated (offered {offered:#x}, wanted {:#x})",
        setup.wanted_features
    );
    frontend
        .set_features(features | protocol_bit)
        .expect("SET_FEATURES");
    let protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    // RESET_DEVICE only changes what a frontend may send (`reset_device_and_restart`).
    let mut wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE;
    if backend_channel {
        assert!(
            protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ),
            "the backend must offer BACKEND_REQ: {protocol:?}"
        );
        wanted |= VhostUserProtocolFeatures::BACKEND_REQ;
    }
    if setup.inflight {
        assert!(
            protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "the backend must offer INFLIGHT_SHMFD: {protocol:?}"
        );
        wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    frontend
        .set_protocol_features(protocol & wanted)
        .expect("SET_PROTOCOL_FEATURES");
    if protocol & VhostUserProtocolFeatures::REPLY_ACK == VhostUserProtocolFeatures::REPLY_ACK {
        // Every later message waits for the backend's acknowledgement, as QEMU's do.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    (frontend, features)
}

impl RawFrontend {
    /// Connects and sets up queue 0 with `queue_size` entries, acking `features & offered`.
    pub fn connect(socket: &Path, queue_size: u16, wanted_features: u64) -> Self {
        Self::connect_queues(socket, 1, queue_size, wanted_features)
    }

    /// Connects and sets up queues `0..num_queues`.
    pub fn connect_queues(
        socket: &Path,
        num_queues: usize,
        queue_size: u16,
        wanted_features: u64,
    ) -> Self {
        Self::connect_with(
            socket,
            &Setup::plain(num_queues, queue_size, wanted_features),
        )
    }

    /// Connects and sets up the queues as `setup` says.
    pub fn connect_with(socket: &Path, setup: &Setup) -> Self {
        Self::connect_inner(socket, setup, false)
    }

    /// As [`RawFrontend::connect_queues`], and opens a backend channel (BACKEND_REQ acked,
    /// SET_BACKEND_REQ_FD with one end of a socket pair), which the backend must offer.
    pub fn connect_with_backend_channel(
        socket: &Path,
        num_queues: usize,
        queue_size: u16,
        wanted_features: u64,
    ) -> Self {
        let setup = Setup::plain(num_queues, queue_size, wanted_features);
        Self::connect_inner(socket, &setup, true)
    }

    fn connect_inner(socket: &Path, setup: &Setup, backend_channel: bool) -> Self {
        let (mut frontend, features) = handshake(socket, setup, backend_channel);
        let backend_channel = backend_channel.then(|| {
            let (ours, theirs) = UnixStream::pair().expect("backend channel socket pair");
            frontend
                .set_backend_request_fd(&theirs)
                .expect("SET_BACKEND_REQ_FD");
            ours
        });
        let inflight = setup.inflight.then(|| {
            let request = VhostUserInflight::new(0, 0, setup.num_queues as u16, setup.queue_size);
            let (area, file) = frontend.get_inflight_fd(&request).expect("GET_INFLIGHT_FD");
            (file, area)
        });
        let memfd = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(memfd.try_clone().expect("dup memfd"), 0)),
        )])
        .expect("map guest memory");
        let mut queues = Vec::with_capacity(setup.num_queues);
        for q in 0..setup.num_queues {
            let base = GuestAddress(RING_BASE + q as u64 * RING_STRIDE);
            let (ring, _) = SplitRing::new(&mem, base, setup.queue_size).expect("ring");
            if let Some(idx) = setup.stale_used_idx {
                // A driver that has not zeroed its ring yet: used.idx holds garbage.
                mem.write_obj(idx.to_le(), ring.used_addr().unchecked_add(2))
                    .expect("poison used.idx");
            }
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd");
            let call = EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd");
            queues.push(DriverQueue { ring, kick, call });
        }
        let mut fe = RawFrontend {
            frontend,
            mem,
            queues,
            features,
            backend_channel,
            memfd,
            setup: *setup,
            inflight,
            strict_calls: false,
        };
        fe.start_device();
        for q in 0..fe.queues.len() {
            // The driver initialises its ring only now.
            let used_idx_addr = fe.queues[q].ring.used_addr().unchecked_add(2);
            fe.mem
                .write_obj(0u16, used_idx_addr)
                .expect("zero used.idx");
        }
        fe
    }

    /// SET_INFLIGHT_FD (if negotiated), SET_MEM_TABLE and every queue's set-up, with each
    /// avail base at the queue's used index in guest memory (0 on a fresh ring).
    fn start_device(&mut self) {
        if let Some((file, area)) = &self.inflight {
            self.frontend
                .set_inflight_fd(area, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        let host = |gpa: u64| {
            self.mem
                .get_host_address(GuestAddress(gpa))
                .expect("host address") as u64
        };
        self.frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_SIZE as u64,
                userspace_addr: host(0),
                mmap_offset: 0,
                mmap_handle: self.memfd.as_raw_fd(),
            }])
            .expect("SET_MEM_TABLE");
        let queue_size = self.setup.queue_size;
        for (q, dq) in self.queues.iter().enumerate() {
            let ring = &dq.ring;
            let avail_base = u16::from_le(
                self.mem
                    .read_obj(ring.used_addr().unchecked_add(2))
                    .expect("read used.idx"),
            );
            let avail_base = if self.setup.stale_used_idx.is_some() {
                0
            } else {
                avail_base
            };
            self.frontend
                .set_vring_num(q, queue_size)
                .expect("SET_VRING_NUM");
            if self.setup.base_first {
                self.frontend
                    .set_vring_base(q, avail_base)
                    .expect("SET_VRING_BASE");
            }
            self.frontend
                .set_vring_addr(q, &vring_addresses(&self.mem, ring, queue_size))
                .expect("SET_VRING_ADDR");
            if !self.setup.base_first {
                self.frontend
                    .set_vring_base(q, avail_base)
                    .expect("SET_VRING_BASE");
            }
            self.frontend
                .set_vring_call(q, &dq.call)
                .expect("SET_VRING_CALL");
            self.frontend
                .set_vring_kick(q, &dq.kick)
                .expect("SET_VRING_KICK");
            self.frontend
                .set_vring_enable(q, true)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// Connects again to `socket` (a restarted backend) as QEMU does after its backend
    /// died: the same features, memory and rings, the avail base of each queue rewound to
    /// its used index (QEMU's `virtio_queue_restore_last_avail_idx` when GET_VRING_BASE
    /// fails), and the inflight area kept from the first connection, if any.
    pub fn reconnect(&mut self, socket: &Path) {
        let (frontend, features) = handshake(socket, &self.setup, false);
        assert_eq!(
            features, self.features,
            "the restarted backend offers the same"
        );
        self.frontend = frontend;
        self.backend_channel = None;
        self.start_device();
    }

    /// What QEMU 10.0 sends a vhost-user-scsi back-end when the guest's driver resets the
    /// device and starts it again (the Linux driver's probe after SeaBIOS used the disk), in
    /// its order and with its acknowledgements:
    /// - the stop (`vhost_dev_stop`): SET_VRING_ENABLE 0 on every queue, each acknowledged,
    ///   then GET_VRING_BASE on every queue;
    /// - the reset: RESET_DEVICE, unacknowledged;
    /// - the start (`vhost_dev_start`): SET_FEATURES; no memory message (QEMU sends only
    ///   the ADD_MEM_REG/REM_MEM_REG difference with CONFIGURE_MEM_SLOTS, none when the
    ///   guest's RAM is unchanged, so the back-end must keep its table across the reset);
    ///   SET_VRING_NUM, _BASE, _ADDR and _KICK per queue on zeroed rings, the kick
    ///   eventfds new and already holding 1 (`virtio_bus_set_host_notifier`); then
    ///   SET_VRING_ENABLE 1 per queue, each acknowledged; last SET_VRING_CALL per queue with
    ///   new eventfds, unacknowledged (`vhost_scsi_common_start` sets the guest notifiers
    ///   after the device started).
    ///
    /// The unacknowledged messages race the caller's next kicks, and the back-end may
    /// complete a request before it has the new call eventfd. A refused acknowledged message
    /// panics; a refused unacknowledged one shows as a request never answered. Not for a
    /// frontend with an inflight area (QEMU would get a new one).
    pub fn reset_device_and_restart(&mut self) {
        assert!(
            self.inflight.is_none(),
            "a restart with an inflight area is not modelled"
        );
        let n = self.queues.len();
        for q in 0..n {
            self.frontend
                .set_vring_enable(q, false)
                .expect("SET_VRING_ENABLE 0");
        }
        for q in 0..n {
            self.frontend.get_vring_base(q).expect("GET_VRING_BASE");
        }
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        self.frontend.reset_device().expect("RESET_DEVICE");
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(self.features | protocol_bit)
            .expect("SET_FEATURES");
        let queue_size = self.setup.queue_size;
        for (q, dq) in self.queues.iter_mut().enumerate() {
            let base = GuestAddress(RING_BASE + q as u64 * RING_STRIDE);
            self.mem
                .write_slice(&[0u8; RING_STRIDE as usize], base)
                .expect("zero the ring");
            let (ring, _) = SplitRing::new(&self.mem, base, queue_size).expect("ring");
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd");
            kick.write(1).expect("kick eventfd holding 1");
            let call = EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd");
            self.frontend
                .set_vring_num(q, queue_size)
                .expect("SET_VRING_NUM");
            self.frontend.set_vring_base(q, 0).expect("SET_VRING_BASE");
            self.frontend
                .set_vring_addr(q, &vring_addresses(&self.mem, &ring, queue_size))
                .expect("SET_VRING_ADDR");
            self.frontend
                .set_vring_kick(q, &kick)
                .expect("SET_VRING_KICK");
            *dq = DriverQueue { ring, kick, call };
        }
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        for q in 0..n {
            self.frontend
                .set_vring_enable(q, true)
                .expect("SET_VRING_ENABLE 1");
        }
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        for (q, dq) in self.queues.iter().enumerate() {
            self.frontend
                .set_vring_call(q, &dq.call)
                .expect("SET_VRING_CALL");
        }
        // Later messages are acknowledged again (the crate waits only if REPLY_ACK was acked).
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    /// Waits up to `timeout` for the backend's next request on the backend channel and
    /// returns its header (reading its payload, if any). Answer it with
    /// [`RawFrontend::reply_backend_request`] when it has NEED_REPLY.
    pub fn next_backend_request(&mut self, timeout: Duration) -> BackendRequest {
        let channel = self.backend_channel.as_mut().expect("no backend channel");
        channel.set_read_timeout(Some(timeout)).expect("timeout");
        let mut header = [0u8; 12];
        channel
            .read_exact(&mut header)
            .unwrap_or_else(|e| panic!("no backend request within {timeout:?}: {e}"));
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let request = BackendRequest {
            request: word(0),
            flags: word(4),
            size: word(8),
        };
        let mut payload = vec![0u8; request.size as usize];
        channel
            .read_exact(&mut payload)
            .expect("backend request payload");
        request
    }

    /// Answers `request` on the backend channel with `value` (0: success), as a reply.
    pub fn reply_backend_request(&mut self, request: BackendRequest, value: u64) {
        let channel = self.backend_channel.as_mut().expect("no backend channel");
        let mut reply = Vec::with_capacity(20);
        reply.extend_from_slice(&request.request.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes()); // VERSION | REPLY
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&value.to_le_bytes());
        channel
            .write_all(&reply)
            .expect("reply on the backend channel");
    }

    /// The shared guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Makes a chain available on queue 0 and kicks the device; returns its head.
    pub fn submit(&mut self, buffers: &[Buffer]) -> u16 {
        self.submit_on(0, buffers)
    }

    /// Makes a chain available on queue `q` and kicks it; returns its head.
    pub fn submit_on(&mut self, q: usize, buffers: &[Buffer]) -> u16 {
        let dq = &mut self.queues[q];
        let head = dq.ring.add(&self.mem, buffers).expect("add chain");
        dq.kick.write(1).expect("kick");
        head
    }

    /// Makes a chain available on queue `q` without kicking; returns its head.
    pub fn add_on(&mut self, q: usize, buffers: &[Buffer]) -> u16 {
        let dq = &mut self.queues[q];
        dq.ring.add(&self.mem, buffers).expect("add chain")
    }

    /// Kicks queue `q`.
    pub fn kick(&mut self, q: usize) {
        self.queues[q].kick.write(1).expect("kick");
    }

    /// Whether the backend still answers on the vhost-user socket.
    pub fn connected(&mut self) -> bool {
        self.frontend.get_features().is_ok()
    }

    /// Makes a chain available on queue 0 through an indirect table at `table`.
    pub fn submit_indirect(&mut self, table: u64, buffers: &[Buffer]) -> u16 {
        let dq = &mut self.queues[0];
        let head = dq
            .ring
            .add_indirect(&self.mem, GuestAddress(table), buffers)
            .expect("add indirect chain");
        dq.kick.write(1).expect("kick");
        head
    }

    /// As [`RawFrontend::submit`] with explicit descriptor flags.
    pub fn submit_with_flags(&mut self, buffers: &[Buffer], flags: &[u16]) -> u16 {
        let dq = &mut self.queues[0];
        let head = dq
            .ring
            .add_with_flags(&self.mem, buffers, flags)
            .expect("add chain");
        dq.kick.write(1).expect("kick");
        head
    }

    /// Waits for the next used element of queue 0: `(head, written_len)`.
    pub fn wait_used(&mut self, timeout: Duration) -> (u16, u32) {
        self.wait_used_on(0, timeout)
    }

    /// Waits for the next used element of queue `q`.
    /// With [`RawFrontend::strict_calls`], only a used element signalled by a call counts.
    pub fn wait_used_on(&mut self, q: usize, timeout: Duration) -> (u16, u32) {
        let deadline = std::time::Instant::now() + timeout;
        let mut called = false;
        loop {
            let dq = &mut self.queues[q];
            // Strictly, the ring is looked at once per call.
            if std::mem::take(&mut called) || !self.strict_calls {
                if let Some(used) = dq.ring.pop_used(&self.mem).expect("used ring") {
                    return used;
                }
            }
            if std::time::Instant::now() >= deadline {
                let unsignalled = dq.ring.pop_used(&self.mem).expect("used ring").is_some();
                assert!(
                    !unsignalled,
                    "queue {q}: a used element but no call within {timeout:?}"
                );
                panic!("queue {q}: no used element within {timeout:?}");
            }
            let mut pfd = libc::pollfd {
                fd: dq.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            called |= dq.call.read().is_ok();
        }
    }

    /// The next used element of queue `q` if there is one now.
    pub fn try_used_on(&mut self, q: usize) -> Option<(u16, u32)> {
        self.queues[q].ring.pop_used(&self.mem).expect("used ring")
    }

    /// Reads and resets queue `q`'s call eventfd: how many times the device signalled it
    /// since the last read (0 if never).
    pub fn take_calls(&mut self, q: usize) -> u64 {
        self.queues[q].call.read().unwrap_or(0)
    }

    /// Installs a fresh call eventfd on queue `q` (SET_VRING_CALL), as a frontend switching
    /// notifiers does.
    pub fn replace_call(&mut self, q: usize) {
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd");
        self.frontend
            .set_vring_call(q, &call)
            .expect("SET_VRING_CALL");
        self.queues[q].call = call;
    }

    /// Installs another kick eventfd on queue `q` while its ring runs (SET_VRING_KICK, no
    /// GET_VRING_BASE first): a new eventfd, or (`same_file`) a duplicate of the current one,
    /// as a virtio-vhost-user bridge hands over the same MSI-X eventfd every time. Returns
    /// the previous one (kicks written to it must come to nothing).
    pub fn replace_kick(&mut self, q: usize, same_file: bool) -> EventFd {
        let kick = if same_file {
            self.queues[q].kick.try_clone().expect("dup kick eventfd")
        } else {
            EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd")
        };
        self.frontend
            .set_vring_kick(q, &kick)
            .expect("SET_VRING_KICK");
        std::mem::replace(&mut self.queues[q].kick, kick)
    }

    /// Stops queue `q` (GET_VRING_BASE) and returns the avail index the device stopped at.
    /// Every request the device took must be on the used ring before it answers. A reply
    /// not there within `timeout` fails the call: the `vhost` crate's frontend waits for
    /// ever (it retries a socket receive timeout), so a watchdog shuts the socket down.
    pub fn stop_queue(&mut self, q: usize, timeout: Duration) -> u16 {
        let fd = self.frontend.as_raw_fd();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let late = matches!(
                finished.recv_timeout(timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if late {
                // SAFETY: `fd` is the frontend's socket, open until this thread is joined
                // below; shutting it down only makes the blocked reply read fail.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            late
        });
        let base = self.frontend.get_vring_base(q);
        let _ = done.send(());
        let late = watchdog.join().expect("GET_VRING_BASE watchdog");
        assert!(
            !late,
            "queue {q}: GET_VRING_BASE not answered within {timeout:?}"
        );
        u16::try_from(base.expect("GET_VRING_BASE")).expect("a 16-bit vring base")
    }

    /// Stops queue `q` and starts it again with its avail ring at guest address `avail`
    /// (GET_VRING_BASE, SET_VRING_ADDR, SET_VRING_BASE with the base it stopped at,
    /// SET_VRING_KICK with the same eventfd), as a broken driver that places the ring where
    /// guest memory may end before the ring does. Returns that base; the queue's own
    /// bookkeeping still refers to the old ring, so only raw writes make sense after it.
    pub fn move_avail_ring(&mut self, q: usize, avail: u64, timeout: Duration) -> u16 {
        let base = self.stop_queue(q, timeout);
        let mut addresses = vring_addresses(&self.mem, &self.queues[q].ring, self.setup.queue_size);
        addresses.avail_ring_addr = self
            .mem
            .get_host_address(GuestAddress(avail))
            .expect("host address") as u64;
        self.frontend
            .set_vring_addr(q, &addresses)
            .expect("SET_VRING_ADDR");
        self.frontend
            .set_vring_base(q, base)
            .expect("SET_VRING_BASE");
        self.frontend
            .set_vring_kick(q, &self.queues[q].kick)
            .expect("SET_VRING_KICK");
        base
    }

    /// Writes `idx` into queue `q`'s avail.idx, as a broken driver would, without adding
    /// chains or kicking.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let addr = self.queues[q].ring.avail_addr().unchecked_add(2);
        self.mem
            .write_obj(idx.to_le(), addr)
            .expect("write avail.idx");
    }

    /// Disables and enables queue `q` again (SET_VRING_ENABLE 0, then 1).
    pub fn cycle_enable(&mut self, q: usize) {
        for enable in [false, true] {
            self.frontend
                .set_vring_enable(q, enable)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// used.idx of queue `q` as the device left it in guest memory.
    pub fn used_idx(&self, q: usize) -> u16 {
        let addr = self.queues[q].ring.used_addr().unchecked_add(2);
        u16::from_le(self.mem.read_obj(addr).expect("read used.idx"))
    }

    /// Reads `len` bytes of the device config space.
    pub fn config(&mut self, len: u32) -> Vec<u8> {
        let (_, payload) = self
            .frontend
            .get_config(
                0,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .expect("GET_CONFIG");
        payload.to_vec()
    }

    /// Writes `data` at `offset` of the device config space (SET_CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .expect("SET_CONFIG");
    }

    /// Writes bytes to guest memory.
    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("guest write");
    }

    /// Element `n` (counted from the start of the ring, not modulo its size) of queue `q`'s
    /// used ring as the device wrote it: `(id, len)`, unchecked, unlike the driver's view.
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let ring = &self.queues[q].ring;
        let at = ring
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(n % ring.size()));
        let e: [u8; 8] = self.mem.read_obj(at).expect("read a used element");
        (
            u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        )
    }

    /// Reads bytes from guest memory.
    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("guest read");
        buf
    }
}
