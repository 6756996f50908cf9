//! The virtio-vhost-user-pci device delivers every kick of the vhost-user session a stock QEMU
//! `vhost-user-scsi-pci` consumer runs while its guest boots (issue #18: such consumers
//! booting through the appliance VM now and then hung in the first SCSI scan, after the
//! handshake of the Linux driver's reset, as if kicks stopped reaching the appliance).
//!
//! The test replays that session against the patched QEMU under qtest, playing the consumer's
//! QEMU (`qfuzz::frontend` on the device's chardev) and the appliance's driver (`qfuzz::guest`
//! over qtest): rxq/txq in guest RAM, GET_* and NEED_REPLY requests answered on txq, vring i's
//! kick mapped to MSI-X vector 3 + i through the notification structure (as vvu-transport
//! does), those vectors' MSI-X entries aimed at RAM so each MSI is a store qtest can read.
//! 1. SeaBIOS: GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
//!    SET_FEATURES, SET_MEM_TABLE (one memfd region, NEED_REPLY as REPLY_ACK makes it), then
//!    vring 2 only: SET_VRING_NUM, _BASE, _ADDR, _KICK, _ENABLE 1, _CALL; kicks on vring 2.
//! 2. The Linux driver's reset: SET_VRING_ENABLE 0 of vrings 0-2, GET_VRING_BASE 2,
//!    RESET_DEVICE, SET_FEATURES, vrings 0-2 set up again, ENABLE 1 and SET_VRING_CALL of
//!    each; kicks on each vring, interleaved, one at a time and in a burst.
//!
//! Every kick eventfd is new and sent holding 1, as QEMU creates its host notifiers.
//! "A kick is delivered" ([`Rig::expect_msis`]): the kick vectors' slots in RAM are cleared,
//! the eventfds written (or a fresh one sent), and QEMU's main loop runs until the device has
//! read each of them back to 0 (seen in /proc/self/fdinfo, without reading it); then each
//! kicked vring's vector has stored its MSI and no other vring's has, and once the slots are
//! cleared again nothing more arrives without a new write. The device coalesces writes it has
//! not read yet, so after each SET_VRING_KICK and each single write that is exactly one MSI;
//! after a burst, at least one on each vector written and none elsewhere. Also checked: every
//! message reaches rxq once, in order; the front-end gets every reply; the vectors read back
//! unchanged across GET_VRING_BASE and RESET_DEVICE; the kick eventfd released at
//! GET_VRING_BASE raises nothing; the front-end stays connected; the device's trace shows
//! each kick eventfd wired and no kick dropped for want of a vector.
//!
//! Three runs: plain; with the device holding each socket read that carried fds
//! (`x-recv-delay-ms`); and with the driver starving rxq (one buffer at a time, none while
//! each phase's vring setup is sent and the guest kicks), so messages wait in the socket and
//! the device, and kicks come before the device has taken their eventfds. QEMU runs with
//! `-trace vvu_*`; a failure prints the trace.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use appliance_tests::daemon::scratch_dir;
use appliance_tests::qfuzz::device::Qt;
use appliance_tests::qfuzz::fuzzer::Fuzzer;
use appliance_tests::qfuzz::guest::Seg;
use appliance_tests::qfuzz::messages::{header, msg, req, HDR, NEED_REPLY, REPLY, VERSION};
use appliance_tests::qfuzz::trace::{Action, DeviceParams, FdSpec};
use appliance_tests::rng::Rng;
use appliance_tests::vm::{eventfd_count, patched_qemu};

/// max-vhost-queues: a scsi consumer's three vrings (control, event, request) and one more
/// that no message names (its vector must stay quiet too).
const QUEUES: u64 = 4;
/// vvu-transport's FIRST_KICK_VECTOR: vring i's kicks go to MSI-X vector 3 + i.
const FIRST_KICK_VECTOR: u64 = 3;
/// The data word of kick vector v's MSI-X message is `MSI_DATA + v`.
const MSI_DATA: u64 = 0x6b00;
/// How long the device holds a read that carried fds, in the held-reads run (ms).
const HOLD_MS: u32 = 100;
/// The longest any one wait may take.
const WAIT: Duration = Duration::from_secs(20);
/// Settles (8 qtest round trips each) that let a late or spurious MSI land before a check.
const QUIET_SETTLES: usize = 6;
/// The consumer's one memory region: guest address 0, this size, in a memfd.
const REGION: u64 = 16 << 20;
/// Its userspace address in the consumer's QEMU (as `FrontendCtx::plain_region` sets it).
const UADDR: u64 = 0x7f00_0000_0000;
/// Bytes of every reply the front-end reads: the header and a u64 or a vring state.
const REPLY_LEN: u64 = 20;
/// GET_FEATURES answer: VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
const FEATURES: u64 = (1 << 32) | (1 << 30);
/// GET/SET_PROTOCOL_FEATURES: MQ, REPLY_ACK and RESET_DEVICE.
const PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 3) | (1 << 13);
/// What QEMU's stderr must not hold: a refused message, a dropped session, a kick dropped
/// for want of a vector or because the vector is not in use.
const BAD_STDERR: [&str; 5] = [
    "refused request",
    "protocol error",
    "disconnecting",
    "vvu_kick_unrouted",
    "vvu_pci_notify_unused",
];
/// The last avail index the back-end reports for vring 2 at GET_VRING_BASE.
const LAST_AVAIL: u32 = 0x2a;

/// How the driver and the device are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// rx buffers always posted, reads not held.
    Plain,
    /// The device holds each read that carried fds for `HOLD_MS`.
    HeldReads,
    /// The driver posts one rx buffer at a time, and none during each phase's vring setup.
    StarvedRx,
}

/// A kick eventfd the front-end sent: its id and our own descriptor of it.
struct Kick {
    id: u32,
    file: File,
}

impl Kick {
    /// Its counter (reading the eventfd would clear it).
    fn count(&self) -> u64 {
        let fd = self.file.as_raw_fd();
        eventfd_count(std::process::id(), fd)
            .unwrap_or_else(|| panic!("fd {fd}: no eventfd-count in /proc/self/fdinfo"))
    }

    /// A kick: writes 1, as the consumer's guest does through its ioeventfd.
    fn write(&self) {
        (&self.file).write_all(&1u64.to_ne_bytes()).unwrap();
    }
}

/// The device under test, its front-end and its driver.
struct Rig {
    f: Fuzzer,
    mode: Mode,
    /// rx buffers the driver keeps posted.
    rx_target: usize,
    /// Every message the front-end sent, in order.
    sent: Vec<Vec<u8>>,
    /// How many of them reached rxq.
    delivered: usize,
    /// Replies the front-end must have received.
    replies: u64,
    /// Each vring's current kick eventfd.
    kicks: Vec<Option<Kick>>,
    /// Where in the scenario the test is, for failure messages.
    step: String,
}

fn request_name(request: u32) -> &'static str {
    match request {
        req::GET_FEATURES => "GET_FEATURES",
        req::SET_FEATURES => "SET_FEATURES",
        req::SET_OWNER => "SET_OWNER",
        req::SET_MEM_TABLE => "SET_MEM_TABLE",
        req::SET_VRING_NUM => "SET_VRING_NUM",
        req::SET_VRING_ADDR => "SET_VRING_ADDR",
        req::SET_VRING_BASE => "SET_VRING_BASE",
        req::GET_VRING_BASE => "GET_VRING_BASE",
        req::SET_VRING_KICK => "SET_VRING_KICK",
        req::SET_VRING_CALL => "SET_VRING_CALL",
        req::GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
        req::SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
        req::GET_QUEUE_NUM => "GET_QUEUE_NUM",
        req::SET_VRING_ENABLE => "SET_VRING_ENABLE",
        req::RESET_DEVICE => "RESET_DEVICE",
        _ => "?",
    }
}

fn wants_reply(request: u32, flags: u32) -> bool {
    matches!(
        request,
        req::GET_FEATURES | req::GET_PROTOCOL_FEATURES | req::GET_QUEUE_NUM | req::GET_VRING_BASE
    ) || flags & NEED_REPLY != 0
}

/// A vring state payload (index, num).
fn state(vring: u64, num: u32) -> Vec<u8> {
    [(vring as u32).to_le_bytes(), num.to_le_bytes()].concat()
}

/// The patched QEMU with the device's trace events on: a launcher that execs it with
/// `-trace vvu_*` (the events go to stderr, which the harness keeps and a failure prints).
fn traced_qemu(dir: &Path) -> PathBuf {
    let path = dir.join("qemu-traced");
    let script = format!(
        "#!/bin/sh\nexec '{}' -trace 'vvu_*' \"$@\"\n",
        patched_qemu().display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

impl Rig {
    /// Starts QEMU, brings the driver up, connects the front-end and routes the kick vectors.
    fn start(mode: Mode, dir: &Path) -> Rig {
        let params = DeviceParams {
            max_vhost_queues: QUEUES as u32,
            recv_delay_ms: if mode == Mode::HeldReads { HOLD_MS } else { 0 },
            ..DeviceParams::default()
        };
        let qemu = traced_qemu(dir);
        let f = Fuzzer::start(&qemu, params, dir, Rng::new(18))
            .unwrap_or_else(|e| panic!("{mode:?}: starting QEMU: {}", e.detail()));
        let mut rig = Rig {
            f,
            mode,
            rx_target: if mode == Mode::StarvedRx { 1 } else { 4 },
            sent: Vec::new(),
            delivered: 0,
            replies: 0,
            kicks: (0..QUEUES).map(|_| None).collect(),
            step: "bring-up".into(),
        };
        match rig.f.fresh_session() {
            Ok(true) => {}
            Ok(false) => rig.fail("the device did not take the front-end's connection".into()),
            Err(e) => rig.fail(format!("bring-up: {}", e.detail())),
        }
        let l = rig.f.layout.clone();
        if l.msix_entries < (FIRST_KICK_VECTOR + QUEUES) as u16 {
            rig.fail(format!("only {} MSI-X vectors", l.msix_entries));
        }
        for v in 0..QUEUES {
            let vector = FIRST_KICK_VECTOR + v;
            let entry = l.msix_table + 16 * vector;
            let slot = rig.slot(v);
            rig.wr(entry, 4, slot);
            rig.wr(entry + 4, 4, 0);
            rig.wr(entry + 8, 4, MSI_DATA + vector);
            rig.wr(entry + 12, 4, 0); // unmasked
            rig.wr(l.notification, 2, v);
            rig.wr(l.notification + 2, 2, vector);
        }
        rig.check_vectors();
        rig.clear_slots();
        rig
    }

    /// Panics with what failed, where, and the device's trace.
    fn fail(&self, what: String) -> ! {
        let last = self.sent.len().checked_sub(1).map_or("none".into(), |k| {
            let (request, _, _) = header(&self.sent[k]);
            format!("#{k} {}", request_name(request))
        });
        let stderr = self.f.m.qemu.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(120)..].join("\n");
        panic!(
            "{:?} run, {}: {what}\n(last message sent: {last}; {} of {} delivered on rxq)\n\
             QEMU stderr (-trace vvu_*), last lines:\n{tail}",
            self.mode,
            self.step,
            self.delivered,
            self.sent.len()
        );
    }

    fn rd(&mut self, addr: u64, width: u8) -> u64 {
        match self.f.read(addr, width) {
            Ok(v) => v,
            Err(e) => self.fail(format!("qtest read {addr:#x}: {}", e.detail())),
        }
    }

    fn wr(&mut self, addr: u64, width: u8, val: u64) {
        if let Err(e) = self.f.write(addr, width, val) {
            self.fail(format!("qtest write {addr:#x}: {}", e.detail()));
        }
    }

    /// Runs the driver for `QUIET_SETTLES` settles.
    fn quiet(&mut self) {
        for _ in 0..QUIET_SETTLES {
            self.settle();
            self.pump();
        }
    }

    /// Lets QEMU's main loop run (qtest round trips).
    fn settle(&mut self) {
        if let Err(e) = self.f.act(Action::Settle) {
            self.fail(format!("settle: {}", e.detail()));
        }
    }

    /// Where vring v's kick vector stores its MSI.
    fn slot(&self, vring: u64) -> u64 {
        self.f.msi_base() + 4 * (FIRST_KICK_VECTOR + vring)
    }

    fn slots(&mut self) -> Vec<u64> {
        (0..QUEUES).map(|v| self.rd(self.slot(v), 4)).collect()
    }

    fn clear_slots(&mut self) {
        for v in 0..QUEUES {
            self.wr(self.slot(v), 4, 0);
        }
    }

    fn count(&self, vring: u64) -> u64 {
        self.kicks[vring as usize].as_ref().map_or(0, Kick::count)
    }

    fn kick(&self, vring: u64) {
        match &self.kicks[vring as usize] {
            Some(k) => k.write(),
            None => self.fail(format!("vring {vring} has no kick eventfd")),
        }
    }

    /// Each vring's kick vector reads back as mapped.
    fn check_vectors(&mut self) {
        let n = self.f.layout.notification;
        for v in 0..QUEUES {
            self.wr(n, 2, v);
            let got = self.rd(n + 2, 2);
            if got != FIRST_KICK_VECTOR + v {
                self.fail(format!(
                    "vring {v}'s kick vector reads back {got:#x}, mapped {}",
                    FIRST_KICK_VECTOR + v
                ));
            }
        }
    }

    /// Sends a message (with its eventfds at `preset`), as the consumer's QEMU does: one
    /// that expects a reply is waited for before anything else is sent.
    fn send(&mut self, request: u32, flags: u32, payload: &[u8], fds: &[FdSpec], preset: u64) {
        let bytes = msg(request, flags, payload);
        if let Err(e) = self.f.m.fe().send_preset(&bytes, fds, preset) {
            self.fail(format!("front-end: sending {}: {e}", request_name(request)));
        }
        self.sent.push(bytes);
        self.settle();
        if wants_reply(request, flags) {
            self.replies += 1;
            self.sync();
        }
    }

    fn plain(&mut self, request: u32, payload: &[u8]) {
        self.send(request, VERSION, payload, &[], 0);
    }

    /// SET_VRING_ADDR of `vring`: its rings in the consumer's region, as user addresses.
    fn set_vring_addr(&mut self, vring: u64) {
        let base = UADDR + 0x10_0000 + vring * 0x1_0000;
        let mut p = state(vring, 0); // index, flags
        for addr in [base, base + 0x2000, base + 0x1000, 0] {
            p.extend_from_slice(&addr.to_le_bytes()); // desc, used, avail, log
        }
        self.plain(req::SET_VRING_ADDR, &p);
    }

    /// SET_VRING_KICK of `vring` with a new eventfd holding 1; then, unless rxq is starved,
    /// checks that this makes exactly one MSI on the vring's vector.
    fn set_vring_kick(&mut self, vring: u64) {
        let spec = self.vring_fd(req::SET_VRING_KICK, vring, 1);
        let Some(file) = self.f.m.fe().dup_fd(spec.id) else {
            self.fail(format!("the front-end lost eventfd #{}", spec.id))
        };
        self.kicks[vring as usize] = Some(Kick { id: spec.id, file });
        if self.rx_target != 0 {
            self.sync();
            let what = format!("SET_VRING_KICK of vring {vring} (eventfd sent holding 1)");
            self.expect_msis(&what, &[vring]);
        }
    }

    /// SET_VRING_KICK or _CALL of `vring` with a new eventfd holding `preset`.
    fn vring_fd(&mut self, request: u32, vring: u64, preset: u64) -> FdSpec {
        let spec = self.f.ctx.eventfd();
        let index = vring.to_le_bytes();
        self.send(request, VERSION, &index, &[spec], preset);
        spec
    }

    /// The driver's side: takes what rxq delivered (checking it is what the front-end sent,
    /// in order), answers requests on txq, and keeps `rx_target` rx buffers posted.
    fn pump(&mut self) {
        let msgs = match self.f.poll_rx() {
            Ok(m) => m,
            Err(e) => self.fail(format!("polling rxq: {}", e.detail())),
        };
        for (_, m) in msgs {
            let k = self.delivered;
            let Some(sent) = self.sent.get(k) else {
                self.fail(format!("rxq delivered a message never sent: {m:02x?}"))
            };
            // The header and the first 8 payload bytes (vring index, feature bits, region
            // count): nothing the device rewrites.
            let n = (HDR + 8).min(sent.len());
            if m.get(..n) != sent.get(..n) {
                let (r, _, _) = header(sent);
                self.fail(format!(
                    "rxq message {k} ({}): the front-end sent {:02x?}, rxq holds {:02x?}",
                    request_name(r),
                    &sent[..n],
                    &m[..n.min(m.len())]
                ));
            }
            self.delivered += 1;
            let (request, flags, _) = header(&m);
            if wants_reply(request, flags) {
                self.answer(request);
            }
        }
        let mut posted = false;
        while self.f.queues[0].chains.len() < self.rx_target {
            if !matches!(self.f.post_rx_page(), Ok(true)) {
                self.fail("posting an rx buffer".into());
            }
            posted = true;
        }
        if posted {
            if let Err(e) = self.f.notify(0) {
                self.fail(format!("notifying rxq: {}", e.detail()));
            }
        }
    }

    /// The back-end's reply to `request`, put on txq.
    fn answer(&mut self, request: u32) {
        let payload = match request {
            req::GET_FEATURES => FEATURES.to_le_bytes().to_vec(),
            req::GET_PROTOCOL_FEATURES => PROTOCOL_FEATURES.to_le_bytes().to_vec(),
            req::GET_QUEUE_NUM => 3u64.to_le_bytes().to_vec(),
            req::GET_VRING_BASE => state(2, LAST_AVAIL),
            _ => 0u64.to_le_bytes().to_vec(), // REPLY_ACK: success
        };
        let reply = msg(request, VERSION | REPLY, &payload);
        let addr = self.f.alloc(reply.len() as u64);
        let seg = Seg {
            addr,
            len: reply.len() as u32,
            write: false,
        };
        let ok = self.f.write_bytes(addr, &reply).is_ok()
            && matches!(self.f.post_plain(1, vec![seg]), Ok(true))
            && self.f.notify(1).is_ok();
        if !ok {
            self.fail(format!("answering {} on txq", request_name(request)));
        }
    }

    /// Runs the driver until everything sent is on rxq and the front-end has every reply.
    fn sync(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.pump();
            let received = self.f.m.fe().received.bytes.load(Ordering::Relaxed);
            if self.delivered == self.sent.len() && received == self.replies * REPLY_LEN {
                return;
            }
            if received > self.replies * REPLY_LEN {
                self.fail(format!(
                    "the front-end received {received} bytes, {} replies expected",
                    self.replies
                ));
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "timed out after {WAIT:?} waiting for messages on rxq and replies \
                     ({received} of {} reply bytes received)",
                    self.replies * REPLY_LEN
                ));
            }
            self.settle();
        }
    }

    /// The check of the module doc: the writes (or fresh eventfds) of `fired` are read back
    /// to 0 by the device, each of those vrings' vectors stored its MSI, no other vring's
    /// did, and nothing more comes without a new write. Leaves every slot clear.
    fn expect_msis(&mut self, what: &str, fired: &[u64]) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.pump();
            // Counts first: once the device has read an eventfd, its MSI was sent in the
            // same main-loop dispatch, before the next qtest command is served.
            let counts: Vec<u64> = fired.iter().map(|&v| self.count(v)).collect();
            if counts.iter().all(|&c| c == 0) {
                let slots = self.slots();
                if fired
                    .iter()
                    .all(|&v| slots[v as usize] == MSI_DATA + FIRST_KICK_VECTOR + v)
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                let slots = self.slots();
                self.fail(format!(
                    "no MSI-X message after {what} within {WAIT:?}: vrings {fired:?} have \
                     eventfd counts {counts:?}; slots of vectors 3-6 hold {slots:x?}"
                ));
            }
            self.settle();
        }
        self.quiet();
        let slots = self.slots();
        for v in (0..QUEUES).filter(|v| !fired.contains(v)) {
            if slots[v as usize] != 0 {
                self.fail(format!(
                    "MSI-X vector {} (vring {v}) fired after {what}; kicked: {fired:?}",
                    FIRST_KICK_VECTOR + v
                ));
            }
        }
        self.clear_slots();
        self.quiet();
        let slots = self.slots();
        if let Some(v) = (0..QUEUES).find(|&v| slots[v as usize] != 0) {
            self.fail(format!(
                "MSI-X vector {} (vring {v}) fired again after {what}, with no new kick",
                FIRST_KICK_VECTOR + v
            ));
        }
    }

    /// StarvedRx: the driver stops posting rx buffers. Returns where the run starts.
    fn starve(&mut self) -> usize {
        if self.mode == Mode::StarvedRx {
            self.rx_target = 0;
        }
        self.sent.len()
    }

    /// StarvedRx: checks that messages since `from` waited for rx buffers and that the
    /// `kicked` vrings' eventfds were not read yet (counts `expect`), then posts buffers again
    /// and checks the kicks all arrived.
    fn feed(&mut self, from: usize, kicked: &[u64], expect: u64) {
        if self.mode != Mode::StarvedRx {
            return;
        }
        self.quiet();
        let run = self.sent.len() - from;
        let held = self.sent.len() - self.delivered;
        // At most one buffer was posted when the run started.
        if held + 1 < run {
            self.fail(format!("only {held} of {run} messages waited for rx"));
        }
        for &v in kicked {
            let c = self.count(v);
            if c != expect {
                self.fail(format!(
                    "vring {v}'s kick eventfd counts {c} while its SET_VRING_KICK waits \
                     (expected {expect}: 1 when sent plus the guest's kicks)"
                ));
            }
        }
        eprintln!("{}: {held} of {run} messages waited for rx", self.step);
        self.rx_target = 1;
        self.sync();
        let what = format!("feeding rxq ({held} messages held, kicks of {kicked:?} pending)");
        self.expect_msis(&what, kicked);
    }

    /// One write to each of `vrings`, each checked on its own.
    fn kicks_one_by_one(&mut self, vrings: &[u64]) {
        for &v in vrings {
            self.kick(v);
            self.expect_msis(&format!("a kick of vring {v}"), &[v]);
        }
    }
}

/// The whole session of the module doc, `mode` one way.
fn scenario(mode: Mode) {
    let dir = scratch_dir();
    let mut r = Rig::start(mode, dir.path());

    r.step = "SeaBIOS handshake".into();
    r.plain(req::GET_FEATURES, &[]);
    r.plain(req::SET_OWNER, &[]);
    r.plain(req::GET_PROTOCOL_FEATURES, &[]);
    r.plain(req::SET_PROTOCOL_FEATURES, &PROTOCOL_FEATURES.to_le_bytes());
    r.plain(req::GET_QUEUE_NUM, &[]);
    r.plain(req::SET_FEATURES, &FEATURES.to_le_bytes());
    let (region, memfd) = r.f.ctx.plain_region(0, REGION);
    let table = [&1u64.to_le_bytes()[..], &region].concat();
    let need = VERSION | NEED_REPLY; // REPLY_ACK
    r.send(req::SET_MEM_TABLE, need, &table, &[memfd], 0);
    r.expect_msis("the SeaBIOS handshake before any kick eventfd", &[]);

    r.step = "SeaBIOS: vring 2".into();
    let from = r.starve();
    r.plain(req::SET_VRING_NUM, &state(2, 128));
    r.plain(req::SET_VRING_BASE, &state(2, 0));
    r.set_vring_addr(2);
    r.set_vring_kick(2);
    r.plain(req::SET_VRING_ENABLE, &state(2, 1));
    r.vring_fd(req::SET_VRING_CALL, 2, 0);
    if mode == Mode::StarvedRx {
        // The guest kicks before the device has taken the kick eventfd.
        r.kick(2);
        r.kick(2);
    }
    r.feed(from, &[2], 3);
    r.sync();
    r.expect_msis("SET_VRING_ENABLE and SET_VRING_CALL of vring 2", &[]);
    r.kicks_one_by_one(&[2, 2, 2]);

    r.step = "Linux reset: stop".into();
    for v in 0..3 {
        r.plain(req::SET_VRING_ENABLE, &state(v, 0));
    }
    r.plain(req::GET_VRING_BASE, &state(2, 0));
    r.check_vectors();
    // GET_VRING_BASE stopped vring 2: the device released its kick eventfd.
    let Some(old) = r.kicks[2].take() else {
        r.fail("vring 2 lost its kick eventfd".into())
    };
    old.write();
    r.expect_msis("a kick on vring 2's released eventfd", &[]);
    let (id, count) = (old.id, old.count());
    if count != 1 {
        r.fail(format!(
            "the device read #{id} after releasing it (count {count})"
        ));
    }

    r.step = "Linux reset: restart".into();
    let from = r.starve();
    r.plain(req::RESET_DEVICE, &[]);
    r.plain(req::SET_FEATURES, &FEATURES.to_le_bytes());
    for v in 0..3 {
        r.plain(req::SET_VRING_NUM, &state(v, 128));
        let base = if v == 2 { LAST_AVAIL } else { 0 };
        r.plain(req::SET_VRING_BASE, &state(v, base));
        r.set_vring_addr(v);
        r.set_vring_kick(v);
    }
    (0..3).for_each(|v| r.plain(req::SET_VRING_ENABLE, &state(v, 1)));
    (0..3).for_each(|v| _ = r.vring_fd(req::SET_VRING_CALL, v, 0));
    if mode == Mode::StarvedRx {
        [2, 0, 1].into_iter().for_each(|v| r.kick(v));
    }
    r.feed(from, &[0, 1, 2], 2);
    r.sync();
    r.expect_msis("SET_VRING_ENABLE and SET_VRING_CALL of vrings 0-2", &[]);
    r.check_vectors();

    r.step = "Linux: kicks".into();
    for order in [[2, 0, 1], [0, 2, 1], [1, 0, 2], [2, 1, 0]] {
        r.kicks_one_by_one(&order);
    }
    for v in [2, 0, 1, 2, 0, 1, 2] {
        r.kick(v);
    }
    r.expect_msis("a burst of 7 kicks on vrings 2, 0, 1", &[0, 1, 2]);
    r.kicks_one_by_one(&[0, 1, 2]);

    r.step = "end".into();
    r.check_vectors();
    r.sync();
    let status = r.rd(r.f.layout.device_cfg, 4);
    if status & 3 != 3 {
        r.fail(format!("device status {status:#x}: front-end gone"));
    }
    if let Err(e) = r.f.m.qemu.check() {
        r.fail(format!("QEMU: {}", e.detail()));
    }
    // QEMU's stderr comes through a pipe and the harness's reader thread: wait for it.
    let deadline = Instant::now() + WAIT;
    let stderr = loop {
        let stderr = r.f.m.qemu.stderr();
        if stderr.matches("vvu_kick_wire").count() >= 4 || Instant::now() > deadline {
            break stderr;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for bad in BAD_STDERR {
        if stderr.contains(bad) {
            r.fail(format!("QEMU's stderr holds {bad:?}"));
        }
    }
    let wired = stderr.matches("vvu_kick_wire").count();
    if wired != 4 {
        let n = stderr.len();
        r.fail(format!(
            "the trace ({n} bytes) shows {wired} kick fds wired, not 4"
        ));
    }
    eprintln!(
        "{mode:?}: {} messages delivered, {} replies, {} qtest commands",
        r.delivered, r.replies, r.f.m.qemu.commands
    );
    if let Some(report) = r.f.m.stop() {
        panic!("{mode:?}: QEMU: {}", report.detail());
    }
}

#[test]
#[ignore = "full tier (tests/run.sh): runs the patched QEMU under qtest"]
fn a_stock_scsi_consumers_boot_session_delivers_every_kick() {
    // One after another: each run starts QEMU through a launcher script written just before,
    // which must not be open for writing in a child another thread forks meanwhile.
    for mode in [Mode::Plain, Mode::HeldReads, Mode::StarvedRx] {
        let start = Instant::now();
        scenario(mode);
        eprintln!("{mode:?}: passed in {:.1?}", start.elapsed());
    }
}
