//! The fuzzer's state and its sequences: what QEMU and the fake front-end are ([`Machine`],
//! which also replays traces), the driver's model of the device, and the weighted choice of
//! the next operation.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use crate::rng::Rng;

use super::device::{status, Layout, Qt, BUF_BASE, MSI_BASE, MSI_STRIDE};
use super::frontend::FakeFrontend;
use super::guest::Vq;
use super::messages::{self, header, le64, req, FrontendCtx, NEED_REPLY, REPLY, VERSION};
use super::qtest::{Failure, Qemu, DEVICE_SLOT};
use super::trace::{Action, DeviceParams};

/// qtest round trips per `fe settle`: QEMU's main loop takes a message's header and payload
/// in separate iterations, and each round trip is at least one iteration.
const SETTLE_ROUND_TRIPS: usize = 8;

/// QEMU and the front-ends: all a trace needs to be replayed.
pub struct Machine {
    /// The QEMU under test.
    pub qemu: Qemu,
    /// A fake front-end per device.
    pub fes: Vec<FakeFrontend>,
    /// The device `fe` actions are for.
    pub cur: usize,
}

impl Machine {
    /// Starts QEMU with the devices as `params` says, sockets in `dir`.
    pub fn start(binary: &Path, params: &DeviceParams, dir: &Path) -> Result<Machine, Failure> {
        let qemu = Qemu::start(binary, params, dir).map_err(|e| Failure::Died(e.to_string()))?;
        let fes = qemu.chardevs.iter().map(|c| FakeFrontend::new(c)).collect();
        Ok(Machine { qemu, fes, cur: 0 })
    }

    /// The current device's front-end.
    pub fn fe(&mut self) -> &mut FakeFrontend {
        &mut self.fes[self.cur]
    }

    /// Stops QEMU (front-ends first) and returns any report it wrote.
    pub fn stop(self) -> Option<Failure> {
        let Machine { qemu, fes, .. } = self;
        drop(fes);
        qemu.stop()
    }

    /// Performs one action; returns qtest's answer for qtest commands.
    pub fn exec(&mut self, action: &Action) -> Result<String, Failure> {
        match action {
            Action::Qtest(line) => return self.qemu.cmd(line),
            Action::Connect => {
                if self.fe().connect().is_err() {
                    // QEMU's listening socket is gone: QEMU is.
                    self.qemu.check()?;
                }
            }
            Action::Close => self.fe().close(),
            Action::Send { bytes, fds } => self
                .fe()
                .send(bytes, fds)
                .map_err(|e| Failure::Died(format!("front-end: {e}")))?,
            Action::Signal(id) => self.fe().signal(*id),
            Action::Poke { id, offset, data } => self.fe().poke(*id, *offset, data),
            Action::Backend(bytes) => self.fe().backend_send(bytes),
            Action::BackendClose => self.fe().backend_close(),
            Action::Settle => {
                for _ in 0..SETTLE_ROUND_TRIPS {
                    self.qemu.cmd("endianness")?;
                }
            }
            Action::Device(k) => {
                if (*k as usize) < self.fes.len() {
                    self.cur = *k as usize;
                }
            }
            Action::OracleStart => {}
            // An fd the trace never created passes: a minimized trace must keep its creation.
            Action::ExpectSignal(id) => {
                if self.fe().has_fd(*id) && self.fe().take_signals(*id) == 0 {
                    return Err(Failure::Oracle(format!("eventfd #{id} was not signalled")));
                }
            }
            Action::ExpectMemfd { id, offset, data } => {
                let seen = self.fe().peek(*id, *offset, data.len());
                if self.fe().has_fd(*id) && seen.as_deref() != Some(data.as_slice()) {
                    return Err(Failure::Oracle(format!(
                        "memfd #{id} at {offset:#x}: expected {data:02x?}, holds {seen:02x?}"
                    )));
                }
            }
            Action::ExpectRead { value, read } => {
                let seen = super::qtest::value(&self.qemu.cmd(read)?);
                if seen != *value {
                    return Err(Failure::Oracle(format!(
                        "{read}: expected {value:#x}, read {seen:#x}"
                    )));
                }
            }
        }
        Ok(String::new())
    }
}

/// What a run did, for the summary: how far it got as much as how long it ran.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Sequences completed with QEMU alive and no report.
    pub sequences: u64,
    /// Actions executed (qtest commands and front-end steps).
    pub actions: u64,
    /// qtest commands, including settles' round trips.
    pub qtest_commands: u64,
    /// Messages the front-end sent.
    pub fe_messages: u64,
    /// QEMU instances started.
    pub qemu_starts: u64,
    /// Of those, the ones under KVM.
    pub kvm_instances: u64,
    /// Driver bring-ups done.
    pub bring_ups: u64,
    /// Messages the guest received on rxq.
    pub rx_messages: u64,
    /// Messages the guest put on txq.
    pub tx_msgs: u64,
    /// Times the guest found DEVICE_NEEDS_RESET set.
    pub needs_reset: u64,
    /// Oracle checks passed: memory through the BAR, doorbell to eventfd, kick to MSI-X.
    pub oracle_memory: u64,
    /// See `oracle_memory`.
    pub oracle_doorbell: u64,
    /// See `oracle_memory`.
    pub oracle_kick: u64,
    /// Oracle checks that could not set up their session (not failures).
    pub oracle_skipped: u64,
}

impl Stats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &Stats) {
        self.sequences += o.sequences;
        self.actions += o.actions;
        self.qtest_commands += o.qtest_commands;
        self.fe_messages += o.fe_messages;
        self.qemu_starts += o.qemu_starts;
        self.kvm_instances += o.kvm_instances;
        self.bring_ups += o.bring_ups;
        self.rx_messages += o.rx_messages;
        self.tx_msgs += o.tx_msgs;
        self.needs_reset += o.needs_reset;
        self.oracle_memory += o.oracle_memory;
        self.oracle_doorbell += o.oracle_doorbell;
        self.oracle_kick += o.oracle_kick;
        self.oracle_skipped += o.oracle_skipped;
    }
}

/// The fuzzer on one QEMU instance.
pub struct Fuzzer {
    /// The generator (seeded by the run).
    pub rng: Rng,
    /// QEMU and the front-end.
    pub m: Machine,
    /// The front-end's message generator.
    pub ctx: FrontendCtx,
    /// The device's properties.
    pub params: DeviceParams,
    /// Where the device's structures are.
    pub layout: Layout,
    /// A hostile config write may have moved a BAR: place them again after the sequence.
    pub layout_dirty: bool,
    /// rxq and txq as the driver set them up.
    pub queues: [Vq; 2],
    /// Every action so far on this instance.
    pub trace: Vec<Action>,
    /// Counters.
    pub stats: Stats,
    /// Requests the guest saw and has not answered yet.
    pub pending: VecDeque<u32>,
    /// Regions the guest was told of: (BAR offset, size).
    pub shm_regions: Vec<(u64, u64)>,
    /// Next free buffer address.
    pub buf_next: u64,
    /// The driver brought the device up (and has not reset it since).
    pub up: bool,
    /// The device being driven (index; at PCI slot `DEVICE_SLOT + dev`).
    pub dev: usize,
    /// The other devices' driver state while they are not being driven.
    pub parked: Vec<Option<DevState>>,
    /// A sequence stops early at this time (the run's end).
    pub deadline: Option<Instant>,
}

/// One device's driver state (the fields of [`Fuzzer`] that are per device).
#[derive(Default)]
pub struct DevState {
    ctx: FrontendCtx,
    layout: Layout,
    layout_dirty: bool,
    queues: [Vq; 2],
    pending: VecDeque<u32>,
    shm_regions: Vec<(u64, u64)>,
    up: bool,
}

impl Qt for Fuzzer {
    fn qt(&mut self, line: String) -> Result<String, Failure> {
        self.stats.actions += 1;
        let answer = self.m.qemu.cmd(&line);
        self.trace.push(Action::Qtest(line));
        answer
    }

    fn slot(&self) -> u32 {
        DEVICE_SLOT + self.dev as u32
    }
}

impl Fuzzer {
    /// Starts QEMU and finds the device.
    pub fn start(
        binary: &Path,
        params: DeviceParams,
        dir: &Path,
        rng: Rng,
    ) -> Result<Fuzzer, Failure> {
        let kvm = params.kvm;
        let m = Machine::start(binary, &params, dir)?;
        let ctx = FrontendCtx {
            max_vhost_queues: params.max_vhost_queues,
            shm_size: params.shm_size,
            ..FrontendCtx::default()
        };
        let mut f = Fuzzer {
            rng,
            m,
            ctx,
            params,
            layout: Layout::default(),
            layout_dirty: false,
            queues: [Vq::default(), Vq::default()],
            trace: Vec::new(),
            stats: Stats {
                qemu_starts: 1,
                kvm_instances: u64::from(kvm),
                ..Stats::default()
            },
            pending: VecDeque::new(),
            shm_regions: Vec::new(),
            buf_next: BUF_BASE,
            up: false,
            dev: 0,
            parked: Vec::new(),
            deadline: None,
        };
        let devices = f.params.devices.max(1) as usize;
        f.parked = (0..devices).map(|_| None).collect();
        for k in (0..devices).rev() {
            f.switch_device(k)?;
            f.ctx = FrontendCtx {
                max_vhost_queues: f.params.max_vhost_queues,
                shm_size: f.params.shm_size,
                ..FrontendCtx::default()
            };
            f.layout = Layout::discover(&mut f)?;
        }
        Ok(f)
    }

    /// Drives device `k` from now on (its driver state and front-end).
    pub fn switch_device(&mut self, k: usize) -> Result<(), Failure> {
        if k >= self.parked.len() {
            return Ok(());
        }
        if k != self.dev {
            let current = DevState {
                ctx: std::mem::take(&mut self.ctx),
                layout: std::mem::take(&mut self.layout),
                layout_dirty: self.layout_dirty,
                queues: std::mem::take(&mut self.queues),
                pending: std::mem::take(&mut self.pending),
                shm_regions: std::mem::take(&mut self.shm_regions),
                up: self.up,
            };
            self.parked[self.dev] = Some(current);
            let next = self.parked[k].take().unwrap_or_default();
            self.ctx = next.ctx;
            self.layout = next.layout;
            self.layout_dirty = next.layout_dirty;
            self.queues = next.queues;
            self.pending = next.pending;
            self.shm_regions = next.shm_regions;
            self.up = next.up;
            self.dev = k;
        }
        self.act(Action::Device(k as u32))
    }

    /// Where this device's MSI-X messages aimed at RAM land (vector v at +4v).
    pub fn msi_base(&self) -> u64 {
        MSI_BASE + self.dev as u64 * MSI_STRIDE
    }

    /// Performs and records a front-end action.
    pub fn act(&mut self, action: Action) -> Result<(), Failure> {
        self.stats.actions += 1;
        if matches!(action, Action::Send { .. }) {
            self.stats.fe_messages += 1;
        }
        if matches!(action, Action::Close | Action::Connect) {
            self.ctx.regions.clear();
        }
        let r = self.m.exec(&action);
        self.trace.push(action);
        r.map(|_| ())
    }

    /// Sends a front-end message and lets QEMU take it.
    pub fn send(&mut self, bytes: Vec<u8>, fds: Vec<super::trace::FdSpec>) -> Result<(), Failure> {
        self.act(Action::Send { bytes, fds })?;
        self.act(Action::Settle)
    }

    /// One sequence: steer towards a live session, then 20-100 random operations, then
    /// put the BARs back and check QEMU.
    pub fn sequence(&mut self) -> Result<(), Failure> {
        let st = self.read(self.layout.common + super::device::common::STATUS, 1)? as u8;
        if st & status::NEEDS_RESET != 0 {
            self.stats.needs_reset += 1;
        }
        let needs_reset = st & status::NEEDS_RESET != 0 && self.rng.below(10) < 7;
        if !self.up || needs_reset || self.rng.below(10) == 0 {
            let clean = self.rng.below(3) != 0;
            self.bring_up(clean)?;
        }
        if !self.m.fe().connected() || self.rng.below(10) == 0 {
            self.fe_session()?;
        }
        for _ in 0..20 + self.rng.below(80) {
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            self.op()?;
        }
        if self.layout_dirty {
            self.layout_dirty = false;
            let mut layout = self.layout.clone();
            layout.place(self)?;
            self.msix_setup()?;
        }
        self.handle_rx()?;
        self.m.qemu.check()?;
        self.stats.sequences += 1;
        Ok(())
    }

    fn op(&mut self) -> Result<(), Failure> {
        match self.rng.below(100) {
            0..=11 => self.op_post_rx(),
            12..=23 => self.op_send_tx(),
            24..=31 => self.handle_rx().map(|_| ()),
            32..=41 => self.op_register(),
            42..=46 => self.op_common(),
            47..=50 => self.op_device_cfg(),
            51..=57 => self.op_doorbell(),
            58..=61 => self.op_msix(),
            62..=64 => self.op_pci_config(),
            65 if self.parked.len() > 1 => {
                let k = self.rng.below(self.parked.len() as u64) as usize;
                self.switch_device(k)
            }
            65 => self.bring_up(false),
            66 if !self.params.kvm => {
                // qtest owns the virtual clock only under the qtest accelerator.
                let ns = 1 + self.rng.below(1_000_000_000);
                self.qt(format!("clock_step {ns}")).map(|_| ())
            }
            66..=80 => {
                let (bytes, fds) = self.ctx.message(&mut self.rng);
                self.send(bytes, fds)
            }
            81..=83 => {
                let id = 1 + self.rng.below(u64::from(self.ctx.next_fd.max(1))) as u32;
                self.act(Action::Signal(id))?;
                self.act(Action::Settle)
            }
            84 | 85 | 99 => {
                let action = if self.rng.below(5) == 0 {
                    Action::BackendClose
                } else {
                    Action::Backend(messages::backend_reply(&mut self.rng))
                };
                self.act(action)?;
                self.act(Action::Settle)
            }
            86..=88 => {
                let action = if self.rng.below(2) == 0 {
                    Action::Connect
                } else {
                    Action::Close
                };
                self.act(action)?;
                self.act(Action::Settle)
            }
            89 | 90 => self.fe_session(),
            91..=93 => self.partial_message(),
            94 => self.oracle_memory(),
            95 => self.region_storm(),
            96 | 97 => self.oracle_doorbell(),
            _ => self.oracle_kick(),
        }
    }

    /// Many small regions at once (ADD_MEM_REG), past the device's 32 slots, then some
    /// removed again.
    fn region_storm(&mut self) -> Result<(), Failure> {
        for i in 0..20 + self.rng.below(20) {
            let (d, fd) = self.ctx.plain_region(0x1_0000_0000 + (i << 21), 0x1000);
            let payload = [&[0u8; 8][..], &d].concat();
            self.send(messages::msg(req::ADD_MEM_REG, VERSION, &payload), vec![fd])?;
            if i % 4 == 0 {
                self.handle_rx()?;
            }
        }
        for _ in 0..self.rng.below(8) {
            let (bytes, fds) = self.ctx.rem_region(&mut self.rng);
            self.send(bytes, fds)?;
        }
        self.handle_rx().map(|_| ())
    }

    /// Part of a message, then the connection closes (or not).
    fn partial_message(&mut self) -> Result<(), Failure> {
        let (mut bytes, fds) = self.ctx.message(&mut self.rng);
        let keep = self.rng.below(bytes.len() as u64) as usize;
        bytes.truncate(keep.max(1));
        self.send(bytes, fds)?;
        if self.rng.below(2) == 0 {
            self.act(Action::Close)?;
            self.act(Action::Settle)?;
        }
        Ok(())
    }

    /// Takes what the device delivered on rxq, notes requests to answer and regions the
    /// guest may now touch, re-posts rx buffers, and acknowledges the end of a session
    /// (BACKEND_UP again) when FRONTEND_UP went away. Returns the messages.
    pub fn handle_rx(&mut self) -> Result<Vec<(u64, Vec<u8>)>, Failure> {
        let msgs = self.poll_rx()?;
        for (_, m) in &msgs {
            self.stats.rx_messages += 1;
            let (request, flags, _) = header(m);
            if flags & REPLY != 0 {
                continue; // a backend-channel reply
            }
            let wants_reply = matches!(
                request,
                req::GET_FEATURES
                    | req::GET_PROTOCOL_FEATURES
                    | req::GET_QUEUE_NUM
                    | req::GET_VRING_BASE
                    | req::GET_CONFIG
                    | req::GET_INFLIGHT_FD
                    | req::GET_MAX_MEM_SLOTS
                    | req::GET_STATUS
            ) || flags & NEED_REPLY != 0;
            if wants_reply && self.pending.len() < 64 {
                self.pending.push_back(request);
            }
            let p = messages::HDR;
            match request {
                req::SET_MEM_TABLE => {
                    let n = (le64(m, p) & 0xffff_ffff).min(8) as usize;
                    for i in 0..n {
                        let d = p + 8 + 32 * i;
                        self.shm_regions.push((le64(m, d + 24), le64(m, d + 8)));
                    }
                }
                req::ADD_MEM_REG => self.shm_regions.push((le64(m, p + 32), le64(m, p + 16))),
                req::SET_INFLIGHT_FD => self.shm_regions.push((le64(m, p + 8), le64(m, p))),
                _ => {}
            }
        }
        if self.shm_regions.len() > 64 {
            self.shm_regions.drain(..32);
        }
        // Not always: a device left without rx buffers must hold the message until the
        // driver posts one.
        let posted = self.queues[0].chains.len();
        if self.queues[0].size != 0 && posted < 4 && self.rng.below(2) == 0 {
            for _ in posted..4 {
                self.post_rx_page()?;
            }
            self.notify(0)?;
        }
        if self.up && self.rng.below(4) != 0 {
            let cfg = self.read(self.layout.device_cfg, 4)?;
            if cfg & 3 == 1 {
                self.write(self.layout.device_cfg, 4, 1)?; // the end of a session, seen
            }
        }
        Ok(msgs)
    }

    /// Connects (if not connected, or now and then anyway) and sends the start of a
    /// well-behaved session, answering requests as they come.
    pub fn fe_session(&mut self) -> Result<(), Failure> {
        if !self.m.fe().connected() || self.rng.below(3) == 0 {
            self.act(Action::Connect)?;
            self.act(Action::Settle)?;
            self.handle_rx()?;
        }
        let n = u64::from(self.params.max_vhost_queues).min(2);
        let features = (1u64 << 32) | (1 << 30); // VERSION_1, PROTOCOL_FEATURES
        let mut msgs = vec![
            (messages::msg(req::GET_FEATURES, VERSION, &[]), vec![]),
            (messages::msg(req::SET_OWNER, VERSION, &[]), vec![]),
            (
                messages::msg(req::SET_FEATURES, VERSION, &features.to_le_bytes()),
                vec![],
            ),
            (
                messages::msg(req::GET_PROTOCOL_FEATURES, VERSION, &[]),
                vec![],
            ),
            (
                messages::msg(
                    req::SET_PROTOCOL_FEATURES,
                    VERSION,
                    &0x1_b209u64.to_le_bytes(),
                ),
                vec![],
            ),
        ];
        let mut table = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
        let (d, fd) = self.ctx.plain_region(0, 0x20_0000);
        table.extend_from_slice(&d);
        msgs.push((messages::msg(req::SET_MEM_TABLE, VERSION, &table), vec![fd]));
        if self.rng.below(2) == 0 {
            let fd = self.ctx.socketpair();
            msgs.push((
                messages::msg(req::SET_BACKEND_REQ_FD, VERSION, &[]),
                vec![fd],
            ));
        }
        for v in 0..n {
            let state = |num: u32| [(v as u32).to_le_bytes(), num.to_le_bytes()].concat();
            msgs.push((
                messages::msg(req::SET_VRING_NUM, VERSION, &state(128)),
                vec![],
            ));
            msgs.push((
                messages::msg(req::SET_VRING_BASE, VERSION, &state(0)),
                vec![],
            ));
            for request in [req::SET_VRING_KICK, req::SET_VRING_CALL] {
                let fd = self.ctx.eventfd();
                msgs.push((messages::msg(request, VERSION, &v.to_le_bytes()), vec![fd]));
            }
        }
        for (bytes, fds) in msgs {
            self.send(bytes, fds)?;
            self.handle_rx()?;
            if !self.pending.is_empty() {
                self.op_send_tx()?;
            }
        }
        Ok(())
    }
}
