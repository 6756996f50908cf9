//! `vhost_user_backend`: a hostile vhost-user frontend on the socket of a running export:
//! the daemon's own serving path in process ([`RunningExport`]: the accept loop, the relay
//! with its inflight and backend-channel handling, vhost-user-backend's request handler,
//! the export's `VirtioBackend` and its queue workers on real disks).
//!
//! Two exports run for the life of the process: a blk export (raw, 2 queues of 64) and a
//! scsi export (LUN 0 raw, LUN 1 qcow2, 1 request queue of 64), 1 MiB disks on tmpfs.
//! Each input is one frontend connection: messages with any header (request code, flags,
//! a size that lies), any payload and any descriptors (guest memory memfds, eventfds,
//! files, sockets, pipes), writes into the guest memory it handed over, and kicks of the
//! eventfds it sent, so queue workers run chains from that memory. Then the connection
//! closes, and a second connection that completes GET_FEATURES proves the export serves
//! again (the accept loop takes the next frontend only after the last session ended);
//! once that one is gone too, the process must be back to the threads and descriptors it
//! had before (an oracle: a connection that leaves either behind aborts the run).
//!
//! Input: export (u8: 0 blk, 1 scsi), then up to [`MAX_STEPS`] steps, op (u8) % 4:
//!
//! | op | step |
//! | --- | --- |
//! | 0, 1 | message: request (u8; 0xff: a u32 follows), flags (u8), size (u8: 0 the payload's, 1 eight more, 2 a u16 follows), payload (blob), descriptors (u8 count % 8, then u8 kind each, [`FdKind`]) |
//! | 2 | kick: u8, which of the eventfds sent so far (once the daemon has handled the messages before it; the step ends when a worker has taken the kick; all such waits of an input together are bounded) |
//! | 3 | guest memory write: u8 region, u32 offset, blob |

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use appliance::export::{RunningExport, SocketSource};
use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::input::{Input, Output};
use crate::leftovers;
use crate::ring::harness_failure;
use crate::scratch;

/// Most steps per input.
pub const MAX_STEPS: usize = 48;
/// Longest wait for the daemon to catch up before a kick, or to take a kick.
const SYNC_WAIT: Duration = Duration::from_millis(20);
/// All the waiting one input may do: kicks of eventfds the daemon never watches (sent as
/// something else, or on a connection it dropped) must not slow fuzzing down.
const WAIT_BUDGET: Duration = Duration::from_millis(100);
/// Bytes of each guest memory memfd.
pub const REGION_SIZE: u64 = 1 << 20;
/// Guest memory regions (memfds) a connection may hand over.
const REGIONS: usize = 2;
/// vhost-user header flags: version 1.
pub const VERSION: u8 = 0x1;
/// NEED_REPLY.
pub const NEED_REPLY: u8 = 0x8;

/// Descriptors a message may carry (`kind % 6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// Guest memory region 0 or 1 (a 1 MiB memfd).
    Region(u8),
    /// A new eventfd (kick, call, err); kicks write to them by the order they were sent.
    Event,
    /// `/dev/null`, read-only.
    DevNull,
    /// A unix stream socket (the other end kept for the connection).
    Socket,
    /// The read end of a pipe.
    Pipe,
}

impl FdKind {
    fn from_byte(b: u8) -> Self {
        match b % 6 {
            0 => FdKind::Region(0),
            1 => FdKind::Region(1),
            2 => FdKind::Event,
            3 => FdKind::DevNull,
            4 => FdKind::Socket,
            _ => FdKind::Pipe,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            FdKind::Region(r) => r % 2,
            FdKind::Event => 2,
            FdKind::DevNull => 3,
            FdKind::Socket => 4,
            FdKind::Pipe => 5,
        }
    }
}

/// The two exports, kept (not leaked) for the life of the process.
static EXPORTS: Mutex<Vec<RunningExport>> = Mutex::new(Vec::new());

/// The sockets of the two exports, started once.
fn sockets() -> &'static [PathBuf; 2] {
    static SOCKETS: OnceLock<[PathBuf; 2]> = OnceLock::new();
    SOCKETS.get_or_init(|| {
        let dir = scratch::dir();
        let d = dir.display();
        let text = format!(
            "exports:
  - name: blk
    type: blk
    socket: {d}/blk.sock
    path: {d}/blk.raw
    create: {{ size: 1M }}
    direct: false
    num_queues: 2
    queue_size: 64
  - name: scsi
    type: scsi
    socket: {d}/scsi.sock
    num_queues: 1
    queue_size: 64
    luns:
      - lun: 0
        path: {d}/scsi0.raw
        create: {{ size: 1M }}
        direct: false
      - lun: 1
        path: {d}/scsi1.qcow2
        format: qcow2
        create: {{ size: 1M }}
"
        );
        let config = config::parse_str(&text, &dir.join("exports.yaml"), dir)
            .unwrap_or_else(|e| harness_failure("exports", e));
        let permissions = config::SocketPermissions {
            mode: config::DEFAULT_SOCKET_MODE,
            owner: None,
            group: None,
        };
        let mut paths = Vec::new();
        let mut running = Vec::new();
        for export in &config.exports {
            let config::Transport::Socket(path) = &export.transport else {
                harness_failure("exports", "not a socket export");
            };
            running.push(
                RunningExport::start(export, SocketSource::Path(path, &permissions), None)
                    .unwrap_or_else(|e| harness_failure("export start", e)),
            );
            paths.push(path.clone());
        }
        // They serve for the life of the process.
        *EXPORTS.lock().unwrap_or_else(|p| p.into_inner()) = running;
        [paths[0].clone(), paths[1].clone()]
    })
}

/// A vhost-user message: header (request, flags, size) and payload.
pub fn message(request: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A new memfd of `size` bytes.
fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        harness_failure("memfd", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    if let Err(e) = file.set_len(size) {
        harness_failure("memfd size", e);
    }
    file
}

/// What one connection holds on the frontend's side.
struct Frontend {
    stream: UnixStream,
    regions: Vec<File>,
    events: Vec<EventFd>,
    /// Other descriptors sent (and the peers of sockets and pipes), closed at the end.
    kept: Vec<OwnedFd>,
    /// Reply bytes read and not yet taken apart.
    replies: Vec<u8>,
    /// What is left of [`WAIT_BUDGET`].
    budget: Duration,
    /// The pipes made for the connection (as /proc names them), for the leftovers oracle.
    pipes: Vec<String>,
}

impl Frontend {
    fn connect(socket: &PathBuf) -> Self {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| harness_failure("connect", e));
        Frontend {
            stream,
            regions: (0..REGIONS).map(|_| memfd(REGION_SIZE)).collect(),
            events: Vec::new(),
            kept: Vec::new(),
            replies: Vec::new(),
            budget: WAIT_BUDGET,
            pipes: Vec::new(),
        }
    }

    /// A descriptor of `kind` to send (kept open here until the connection ends).
    fn fd(&mut self, kind: FdKind) -> RawFd {
        match kind {
            FdKind::Region(r) => self.regions[usize::from(r) % REGIONS].as_raw_fd(),
            FdKind::Event => {
                let e =
                    EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| harness_failure("eventfd", e));
                let fd = e.as_raw_fd();
                self.events.push(e);
                fd
            }
            FdKind::DevNull => {
                let f = File::open("/dev/null").unwrap_or_else(|e| harness_failure("null", e));
                let fd = f.as_raw_fd();
                self.kept.push(f.into());
                fd
            }
            FdKind::Socket => {
                let (a, b) = UnixStream::pair().unwrap_or_else(|e| harness_failure("pair", e));
                let fd = a.as_raw_fd();
                self.kept.push(a.into());
                self.kept.push(b.into());
                fd
            }
            FdKind::Pipe => {
                let mut fds = [0; 2];
                // SAFETY: `fds` has room for the two descriptors pipe2 writes.
                if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                    harness_failure("pipe", std::io::Error::last_os_error());
                }
                // SAFETY: pipe2 just created both descriptors; each is owned once here.
                let (r, w) =
                    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
                let fd = r.as_raw_fd();
                self.pipes.push(leftovers::fd_target(&fd.to_string()));
                self.kept.push(r);
                self.kept.push(w);
                fd
            }
        }
    }

    /// Sends `bytes` with `fds` (they go with the first byte).
    fn send(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let sent = match self.stream.send_with_fds(&[bytes], fds) {
            Ok(n) => n,
            // The daemon dropped the connection (a message it refused): nothing more
            // reaches it.
            Err(_) => return,
        };
        let _ = self.stream.write_all(&bytes[sent..]);
    }

    /// Reads whatever replies are there without waiting.
    fn drain_replies(&mut self) {
        let _ = self.stream.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = self.stream.read(&mut buf) {
            self.replies.extend_from_slice(&buf[..n]);
        }
        let _ = self.stream.set_nonblocking(false);
    }

    /// Takes the complete replies read so far; true if one answers GET_FEATURES.
    fn take_replies(&mut self) -> bool {
        let mut features = false;
        while self.replies.len() >= 12 {
            let size = u32::from_le_bytes([
                self.replies[8],
                self.replies[9],
                self.replies[10],
                self.replies[11],
            ]) as usize;
            if self.replies.len() < 12 + size {
                break;
            }
            let request = u32::from_le_bytes([
                self.replies[0],
                self.replies[1],
                self.replies[2],
                self.replies[3],
            ]);
            tracing::debug!(request, size, "fuzz frontend: reply");
            features |= request == FrontendReq::GET_FEATURES as u32;
            self.replies.drain(..12 + size);
        }
        features
    }

    /// Waits (a little) until the daemon has handled every message sent so far: a
    /// GET_FEATURES, which changes nothing, answered. Without it a kick could arrive
    /// before the daemon has set up the ring it kicks. Gives up after [`SYNC_WAIT`] (the
    /// input's framing may have the daemon waiting for more bytes).
    fn sync(&mut self) {
        self.drain_replies();
        self.take_replies();
        if self.budget.is_zero() {
            return;
        }
        let started = Instant::now();
        let request = FrontendReq::GET_FEATURES as u32;
        self.send(&message(request, u32::from(VERSION), 0, &[]), &[]);
        let _ = self
            .stream
            .set_read_timeout(Some(SYNC_WAIT.min(self.budget)));
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n @ 1..) => self.replies.extend_from_slice(&buf[..n]),
                Ok(0) => {
                    // The daemon dropped the connection: nothing more to wait for.
                    self.budget = Duration::ZERO;
                    break;
                }
                Err(_) => break,
            }
            if self.take_replies() {
                break;
            }
        }
        let _ = self.stream.set_read_timeout(None);
        self.budget = self.budget.saturating_sub(started.elapsed());
    }

    /// Kicks eventfd `k` (of those sent so far) and waits (up to [`SYNC_WAIT`]) until a
    /// worker of the daemon has read it: it is then popping the ring, and a GET_VRING_BASE
    /// that follows waits for it.
    fn kick(&mut self, k: usize) {
        if self.events.is_empty() {
            return;
        }
        let kick = &self.events[k % self.events.len()];
        let _ = kick.write(1);
        let mut pfd = libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let started = Instant::now();
        let deadline = started + SYNC_WAIT.min(self.budget);
        // SAFETY: one valid pollfd for the duration of each call, no timeout.
        while unsafe { libc::poll(&mut pfd, 1, 0) } == 1 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        self.budget = self.budget.saturating_sub(started.elapsed());
    }

    /// Closes the sending side and reads until the daemon closes: the connection is over.
    fn finish(mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 4096];
        while matches!(self.stream.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// GET_FEATURES on a fresh connection, answered: the export serves again.
fn probe(socket: &PathBuf) {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| harness_failure("probe connect", e));
    let request = FrontendReq::GET_FEATURES as u32;
    if let Err(e) = stream.write_all(&message(request, u32::from(VERSION), 0, &[])) {
        harness_failure("probe send", e);
    }
    let mut reply = [0u8; 20];
    if let Err(e) = stream.read_exact(&mut reply) {
        harness_failure("probe reply (the export stopped serving)", e);
    }
}

/// The process's threads and descriptors with the exports up and no connection.
fn baseline() -> &'static leftovers::Resources {
    static BASELINE: OnceLock<leftovers::Resources> = OnceLock::new();
    BASELINE.get_or_init(|| {
        sockets();
        leftovers::snapshot()
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let baseline = baseline();
    let mut input = Input::new(data);
    let socket = &sockets()[usize::from(input.u8() % 2)];
    let mut frontend = Frontend::connect(socket);
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 4 {
            0 | 1 => {
                let request = match input.u8() {
                    0xff => input.u32(),
                    r => u32::from(r),
                };
                let flags = u32::from(input.u8());
                let size_mode = input.u8();
                let claimed = match size_mode % 3 {
                    1 => Some(8),
                    2 => Some(u32::from(input.u16())),
                    _ => None,
                };
                let payload = input.blob();
                let size = match claimed {
                    Some(8) => payload.len() as u32 + 8,
                    Some(n) => n,
                    None => payload.len() as u32,
                };
                let count = input.u8() % 8;
                let kinds: Vec<FdKind> =
                    (0..count).map(|_| FdKind::from_byte(input.u8())).collect();
                let fds: Vec<RawFd> = kinds.into_iter().map(|k| frontend.fd(k)).collect();
                tracing::debug!(
                    request,
                    flags,
                    size,
                    fds = fds.len(),
                    "fuzz frontend: message"
                );
                frontend.send(&message(request, flags, size, payload), &fds);
                frontend.drain_replies();
                frontend.take_replies();
            }
            2 => {
                let k = usize::from(input.u8());
                frontend.sync();
                frontend.kick(k);
            }
            _ => {
                let r = usize::from(input.u8()) % REGIONS;
                let offset = u64::from(input.u32()) % REGION_SIZE;
                let bytes = input.blob();
                let _ = frontend.regions[r].write_all_at(bytes, offset);
            }
        }
    }
    let pipes = std::mem::take(&mut frontend.pipes);
    frontend.finish();
    probe(socket);
    leftovers::settle(baseline, &pipes);
}

/// Writes steps in the format [`run`] reads (for the seeds).
pub struct Script {
    out: Output,
}

impl Script {
    /// A connection to export `export` (0 blk, 1 scsi).
    pub fn new(export: u8) -> Self {
        let mut out = Output::new();
        out.u8(export);
        Script { out }
    }

    /// A well-formed message with version 1 and `extra` flags.
    pub fn msg(
        &mut self,
        request: FrontendReq,
        extra: u8,
        payload: &[u8],
        fds: &[FdKind],
    ) -> &mut Self {
        self.out
            .u8(0)
            .u8(request as u32 as u8)
            .u8(VERSION | extra)
            .u8(0)
            .blob(payload)
            .u8(fds.len() as u8);
        for k in fds {
            self.out.u8(k.to_byte());
        }
        self
    }

    /// Kicks the `k`th eventfd sent.
    pub fn kick(&mut self, k: u8) -> &mut Self {
        self.out.u8(2).u8(k);
        self
    }

    /// Writes `bytes` at `offset` of guest memory region `r`.
    pub fn mem(&mut self, r: u8, offset: u32, bytes: &[u8]) -> &mut Self {
        self.out.u8(3).u8(r).u32(offset).blob(bytes);
        self
    }

    /// The input.
    pub fn finish(&mut self) -> Vec<u8> {
        self.out.finish()
    }
}

/// Where the frontend "maps" guest memory region 0 (any address: only its mapping to
/// guest addresses matters to the backend).
const USER_ADDR: u64 = 0x7f00_0000_0000;
/// Guest addresses of the seeds' request buffers (all in region 0, at guest address 0).
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x1_1000;
const STATUS: u64 = 0x1_2000;

fn le(values: &[u64], widths: &[usize]) -> Vec<u8> {
    values
        .iter()
        .zip(widths)
        .flat_map(|(v, w)| v.to_le_bytes()[..*w].to_vec())
        .collect()
}

/// Ring `q` of 64 entries at guest address `q * 0x1000`: descriptor table, avail ring at
/// +0x400, used ring at +0x800.
fn ring_gpa(q: u64) -> (u64, u64, u64) {
    let base = q * 0x1000;
    (base, base + 0x400, base + 0x800)
}

/// The messages QEMU sends to bring up rings `queues` of a device (features, memory
/// table with region 0 at guest address 0, each ring's size, addresses, base, kick, call,
/// enable), with `protocol` protocol features acked and `config_size` bytes of config
/// space read (none: 0).
fn bring_up(s: &mut Script, features: u64, protocol: u64, config_size: u32, queues: &[u64]) {
    s.msg(FrontendReq::GET_FEATURES, 0, &[], &[])
        .msg(FrontendReq::GET_PROTOCOL_FEATURES, 0, &[], &[])
        .msg(
            FrontendReq::SET_PROTOCOL_FEATURES,
            0,
            &protocol.to_le_bytes(),
            &[],
        )
        .msg(FrontendReq::GET_QUEUE_NUM, 0, &[], &[])
        .msg(FrontendReq::GET_MAX_MEM_SLOTS, 0, &[], &[])
        .msg(FrontendReq::SET_OWNER, 0, &[], &[]);
    // A device that keeps its config space in the frontend (scsi) is not asked for it.
    if config_size > 0 {
        let mut get_config = le(&[0, u64::from(config_size), 0], &[4, 4, 4]);
        get_config.resize(12 + config_size as usize, 0);
        s.msg(FrontendReq::GET_CONFIG, 0, &get_config, &[]);
    }
    s.msg(FrontendReq::SET_FEATURES, 0, &features.to_le_bytes(), &[]);
    let table = le(&[1, 0, 0, REGION_SIZE, USER_ADDR, 0], &[4, 4, 8, 8, 8, 8]);
    s.msg(
        FrontendReq::SET_MEM_TABLE,
        NEED_REPLY,
        &table,
        &[FdKind::Region(0)],
    );
    for &q in queues {
        let (desc, avail, used) = ring_gpa(q);
        s.msg(FrontendReq::SET_VRING_NUM, 0, &le(&[q, 64], &[4, 4]), &[])
            .msg(
                FrontendReq::SET_VRING_ADDR,
                0,
                &le(
                    &[
                        q,
                        0,
                        USER_ADDR + desc,
                        USER_ADDR + used,
                        USER_ADDR + avail,
                        0,
                    ],
                    &[4, 4, 8, 8, 8, 8],
                ),
                &[],
            )
            .msg(FrontendReq::SET_VRING_BASE, 0, &le(&[q, 0], &[4, 4]), &[])
            .msg(
                FrontendReq::SET_VRING_KICK,
                0,
                &q.to_le_bytes(),
                &[FdKind::Event],
            )
            .msg(
                FrontendReq::SET_VRING_CALL,
                0,
                &q.to_le_bytes(),
                &[FdKind::Event],
            )
            .msg(FrontendReq::SET_VRING_ENABLE, 0, &le(&[q, 1], &[4, 4]), &[]);
    }
}

/// Puts the chain `bufs` (guest address, length, device-writable) on ring `q` as its
/// first request, with `writes` (guest address, bytes) in guest memory.
fn request(s: &mut Script, q: u64, bufs: &[(u64, u32, bool)], writes: &[(u64, Vec<u8>)]) {
    let (desc, avail, _) = ring_gpa(q);
    let table: Vec<u8> = crate::ring::chain(0, bufs).concat();
    s.mem(0, desc as u32, &table)
        .mem(0, avail as u32, &le(&[0, 1, 0], &[2, 2, 2]));
    for (addr, bytes) in writes {
        s.mem(0, *addr as u32, bytes);
    }
}

/// The seeds: QEMU's bring-up of each export and requests on it, and the messages around
/// it (inflight area, memory slots, config writes, backend channel, device reset).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    const EVENT_IDX: u64 = 1 << 29;
    // MQ, REPLY_ACK, BACKEND_REQ, CONFIG, INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS.
    const PROTOCOL: u64 = 1 | 1 << 3 | 1 << 5 | 1 << 9 | 1 << 12 | 1 << 13 | 1 << 15;
    let features = VERSION_1 | PROTOCOL_FEATURES;
    let blk_header = |t: u32, sector: u64| le(&[u64::from(t), 0, sector], &[4, 4, 8]);
    let mut seeds = Vec::new();

    let mut s = Script::new(0);
    bring_up(&mut s, features, PROTOCOL, 60, &[0, 1]);
    request(
        &mut s,
        0,
        &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        &[(HDR, blk_header(VIRTIO_BLK_T_IN, 8))],
    );
    s.kick(0);
    s.msg(FrontendReq::GET_VRING_BASE, 0, &le(&[0, 0], &[4, 4]), &[]);
    seeds.push(("blk-read".to_string(), s.finish()));

    let mut s = Script::new(0);
    bring_up(&mut s, features, PROTOCOL, 60, &[0, 1]);
    request(
        &mut s,
        1,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
        &[
            (HDR, blk_header(VIRTIO_BLK_T_OUT, 16)),
            (DATA, vec![0x5a; 4096]),
        ],
    );
    s.kick(2);
    s.msg(FrontendReq::GET_VRING_BASE, 0, &le(&[1, 0], &[4, 4]), &[]);
    seeds.push(("blk-write".to_string(), s.finish()));

    // With EVENT_IDX (as QEMU, libblkio and Linux negotiate it): a read, then avail.idx
    // moved far beyond the ring and kicked again, the ring stopped (GET_VRING_BASE must be
    // answered: the worker gives the ring up); set up again with its avail ring in the last
    // 4 bytes of the region (idx readable, entries not) and kicked; and a write on the
    // other queue.
    let mut s = Script::new(0);
    bring_up(&mut s, features | EVENT_IDX, PROTOCOL, 60, &[0, 1]);
    request(
        &mut s,
        0,
        &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        &[(HDR, blk_header(VIRTIO_BLK_T_IN, 8))],
    );
    s.kick(0);
    let (_, avail, _) = ring_gpa(0);
    s.mem(0, (avail + 2) as u32, &le(&[1000], &[2]))
        .kick(0)
        .msg(FrontendReq::GET_VRING_BASE, 0, &le(&[0, 0], &[4, 4]), &[]);
    let (desc, _, used) = ring_gpa(0);
    let end = REGION_SIZE - 4;
    s.msg(
        FrontendReq::SET_VRING_ADDR,
        0,
        &le(
            &[0, 0, USER_ADDR + desc, USER_ADDR + used, USER_ADDR + end, 0],
            &[4, 4, 8, 8, 8, 8],
        ),
        &[],
    )
    .msg(FrontendReq::SET_VRING_BASE, 0, &le(&[0, 1], &[4, 4]), &[])
    .msg(
        FrontendReq::SET_VRING_KICK,
        0,
        &0u64.to_le_bytes(),
        &[FdKind::Event],
    )
    .mem(0, (end + 2) as u32, &le(&[2], &[2]))
    .kick(4)
    .msg(FrontendReq::GET_VRING_BASE, 0, &le(&[0, 0], &[4, 4]), &[]);
    request(
        &mut s,
        1,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
        &[(HDR, blk_header(VIRTIO_BLK_T_OUT, 16))],
    );
    s.kick(2);
    seeds.push(("blk-event-idx-avail-beyond-ring".to_string(), s.finish()));

    // Inflight area, memory slots, a config write, the backend channel, a reset.
    let mut s = Script::new(0);
    s.msg(
        FrontendReq::SET_PROTOCOL_FEATURES,
        0,
        &PROTOCOL.to_le_bytes(),
        &[],
    )
    .msg(FrontendReq::SET_OWNER, 0, &[], &[])
    .msg(FrontendReq::SET_FEATURES, 0, &features.to_le_bytes(), &[])
    .msg(
        FrontendReq::GET_INFLIGHT_FD,
        0,
        &le(&[0, 0, 2, 64], &[8, 8, 2, 2, 4]),
        &[],
    )
    .msg(
        FrontendReq::SET_INFLIGHT_FD,
        NEED_REPLY,
        &le(&[0x4000, 0, 2, 64, 0], &[8, 8, 2, 2, 4]),
        &[FdKind::Region(1)],
    );
    let region = le(&[0, 0, REGION_SIZE, USER_ADDR, 0], &[8, 8, 8, 8, 8]);
    s.msg(
        FrontendReq::ADD_MEM_REG,
        NEED_REPLY,
        &region,
        &[FdKind::Region(0)],
    );
    let second = le(
        &[0, REGION_SIZE, REGION_SIZE, USER_ADDR + REGION_SIZE, 0],
        &[8, 8, 8, 8, 8],
    );
    s.msg(
        FrontendReq::ADD_MEM_REG,
        NEED_REPLY,
        &second,
        &[FdKind::Region(1)],
    )
    .msg(FrontendReq::REM_MEM_REG, NEED_REPLY, &second, &[])
    .msg(
        FrontendReq::SET_CONFIG,
        NEED_REPLY,
        &le(&[32, 1, 0, 0], &[4, 4, 4, 1]),
        &[],
    )
    .msg(
        FrontendReq::SET_BACKEND_REQ_FD,
        NEED_REPLY,
        &[],
        &[FdKind::Socket],
    )
    .msg(FrontendReq::RESET_DEVICE, 0, &[], &[]);
    seeds.push(("blk-inflight-slots-config".to_string(), s.finish()));

    // scsi: control, event and one request queue; INQUIRY then READ(10) on LUN 1.
    let mut s = Script::new(1);
    bring_up(
        &mut s,
        features,
        PROTOCOL & !(1 << 9 | 1 << 5),
        0,
        &[0, 1, 2],
    );
    let mut req = vec![1, 0, 0, 1, 0, 0, 0, 0];
    req.extend_from_slice(&[0; 11]);
    let mut cdb = [0u8; 32];
    cdb[..6].copy_from_slice(&[0x12, 0, 0, 0, 96, 0]);
    let mut inquiry = req.clone();
    inquiry.extend_from_slice(&cdb);
    request(
        &mut s,
        2,
        &[(HDR, 51, false), (STATUS, 108, true), (DATA, 96, true)],
        &[(HDR, inquiry)],
    );
    s.kick(4);
    let mut read = req;
    cdb[..10].copy_from_slice(&[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0]);
    read.extend_from_slice(&cdb);
    let (desc, avail, _) = ring_gpa(2);
    let table: Vec<u8> = crate::ring::chain(
        3,
        &[
            (HDR + 64, 51, false),
            (STATUS + 128, 108, true),
            (DATA, 2048, true),
        ],
    )
    .concat();
    s.mem(0, (desc + 3 * 16) as u32, &table)
        .mem(0, (HDR + 64) as u32, &read)
        .mem(0, (avail + 2) as u32, &le(&[2, 3], &[2, 2]))
        .kick(4);
    // A LOGICAL UNIT RESET on the control queue.
    let (cdesc, cavail, _) = ring_gpa(0);
    let mut tmf = le(&[0, 5], &[4, 4]);
    tmf.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0]);
    tmf.extend_from_slice(&[0; 8]);
    let table: Vec<u8> =
        crate::ring::chain(0, &[(HDR + 256, 24, false), (STATUS + 512, 1, true)]).concat();
    s.mem(0, cdesc as u32, &table)
        .mem(0, (HDR + 256) as u32, &tmf)
        .mem(0, cavail as u32, &le(&[0, 1, 0], &[2, 2, 2]))
        .kick(0)
        .msg(FrontendReq::GET_VRING_BASE, 0, &le(&[2, 0], &[4, 4]), &[]);
    seeds.push(("scsi-io-and-tmf".to_string(), s.finish()));
    seeds
}
