//! `scsi_cdb` and `scsi_tmf_an`: virtio-scsi (virtio 1.2 §5.6) through the daemon's
//! [`RequestQueue`], [`ControlQueue`] and [`EventQueue`] on a device with four LUNs on real
//! disks (ids 0, 1, 2 and 5: 512-byte raw buffered with write cache and discard, 4 KiB raw
//! O_DIRECT writethrough, 4 KiB raw read-only, 512-byte qcow2), 1 MiB each on tmpfs.
//! The device and its queues are built anew for every input (the disks are opened once),
//! so an input replays the same way alone.
//!
//! `scsi_cdb` input: flags (u8: bit 0 memory the kernel cannot pin, bit 1 the first
//! LUN's unit attention pending), then up to [`MAX_STEPS`] [`Command`]s. Each is run twice:
//! its CDB cut to its `cdb_len` straight into the addressed LUN's emulation
//! (`Lun::execute`, and `report_luns`), and as a virtio-scsi request on the request queue.
//!
//! `scsi_tmf_an` input: flags (u8: bit 0 as above, bit 1 VIRTIO_SCSI_F_CHANGE acked),
//! then up to [`MAX_STEPS`] steps ([`tmf_step`]): control-queue requests (task management
//! functions and asynchronous notification requests, §5.6.6.2-3) fresh or re-run after a
//! restart, commands left in flight, completions, event buffers, LUNs removed, added back,
//! grown, unit attentions.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use targets::device::{Completed, QueueHandler, VirtioDevice};
use targets::disk::{Disk, Format};
use targets::guest::GuestRam;
use targets::scsi::emulation::{data_out_to_gather, report_luns, Lun, LunSettings};
use targets::scsi::sense::Sense;
use targets::scsi::virtio::{
    encode_lun, ControlQueue, EventQueue, RequestQueue, ScsiDevice, ScsiLun, CDB_SIZE, REQ_SIZE,
    RESP_SIZE,
};
use virtio_bindings::bindings::virtio_scsi::VIRTIO_SCSI_F_CHANGE;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::input::{Input, Output};
use crate::ring::{chain, harness_failure, Guest};
use crate::scratch;

/// Most commands or steps per input.
pub const MAX_STEPS: usize = 16;
/// Data buffers of a command: at most this many bytes each way.
const MAX_DATA: u32 = 0x10_0000;
/// The request header, response, control request and event buffers.
const REQ: u64 = 0x8000;
const RESP: u64 = 0x8100;
const CTRL_REQ: u64 = 0x8200;
const CTRL_RESP: u64 = 0x8300;
const EVENT: u64 = 0x8400;
/// Data-out and data-in buffers, 1 MiB each.
const DATA_OUT: u64 = 0x10_0000;
const DATA_IN: u64 = 0x20_0000;
/// Guest memory: rings and headers, then the two data buffers.
const GUEST: [(u64, usize); 2] = [(0, 0x1_0000), (DATA_OUT, 2 * MAX_DATA as usize)];
/// Ring size of every queue.
const QUEUE_SIZE: u16 = 128;
/// Size of every LUN's disk.
const DISK_SIZE: u64 = 1 << 20;

/// `(id, format, O_DIRECT, read-only, block size, write cache, discard)` of each LUN.
const LUNS: [(u16, Format, bool, bool, u32, bool, bool); 4] = [
    (0, Format::Raw, false, false, 512, true, true),
    (1, Format::Raw, true, false, 4096, false, true),
    (2, Format::Raw, true, true, 4096, false, false),
    (5, Format::Qcow2, false, false, 512, true, true),
];

/// What every input starts from: the opened disks and the guest memory.
struct Base {
    disks: Vec<(u16, Arc<dyn Disk>, LunSettings)>,
    guest: Guest,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let disks = LUNS
            .iter()
            .map(
                |&(id, format, direct, readonly, block_size, write_cache, discard)| {
                    let disk = scratch::disk(
                        &format!("lun{id}.img"),
                        format,
                        direct,
                        readonly,
                        DISK_SIZE,
                        253,
                    );
                    let settings = LunSettings {
                        block_size,
                        blocks: DISK_SIZE / u64::from(block_size),
                        readonly,
                        serial: format!("fuzz-lun-{id}"),
                        wwn: 0x6000_0000_0000_0000 | u64::from(id),
                        rotational: id == 1,
                        write_cache,
                        discard,
                        unmapped_reads_zero: discard,
                    };
                    (id, disk, settings)
                },
            )
            .collect();
        Base {
            disks,
            guest: Guest::new(&GUEST),
        }
    })
}

/// A LUN of the base, as the device takes it.
fn scsi_lun(id: u16, disk: &Arc<dyn Disk>, settings: &LunSettings) -> ScsiLun {
    ScsiLun {
        id,
        emulation: Lun::new(settings.clone()),
        disk: disk.info(),
    }
}

/// The device and its queues, built for one input.
struct Device {
    device: Arc<ScsiDevice>,
    request: RequestQueue,
    control: ControlQueue,
    events: EventQueue,
    ram: GuestRam,
    done: Vec<Completed>,
}

impl Device {
    fn new(pinnable: bool) -> Self {
        let base = base();
        base.guest.reset_range(0, 0x1_0000);
        let luns = base
            .disks
            .iter()
            .map(|(id, disk, settings)| scsi_lun(*id, disk, settings))
            .collect();
        let device = Arc::new(
            ScsiDevice::new(luns, 1, QUEUE_SIZE)
                .unwrap_or_else(|e| harness_failure("scsi device", e)),
        );
        // One thread runs every queue here: a TMF must not wait for I/O only this thread
        // would complete.
        device.set_tmf_timeout(Duration::ZERO);
        let request = RequestQueue::new(Arc::clone(&device), |i, notifier| {
            base.disks[i]
                .1
                .open_queue(u32::from(QUEUE_SIZE), Some(notifier))
        })
        .unwrap_or_else(|e| harness_failure("request queue", e));
        Device {
            control: ControlQueue::new(Arc::clone(&device)),
            events: EventQueue::new(Arc::clone(&device)),
            device,
            request,
            ram: base.guest.ram(pinnable),
            done: Vec::new(),
        }
    }

    /// Pops the one chain `descs` makes (from descriptor 0) and hands it to `handler`.
    fn one_chain(&mut self, which: Queue3, descs: &[[u8; 16]], resubmit: bool) {
        let guest = &base().guest;
        let mem = &*guest.mem;
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        for (i, d) in descs.iter().enumerate() {
            guest.write(vq.desc_table_addr().0 + 16 * i as u64, d);
        }
        let avail = vq.avail_addr().0;
        guest.write(avail + 2, &1u16.to_le_bytes());
        guest.write(avail + 4, &0u16.to_le_bytes());
        let mut queue: Queue = vq
            .create_queue()
            .unwrap_or_else(|e| harness_failure("queue", e));
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return;
        };
        let handler: &mut dyn QueueHandler = match which {
            Queue3::Control => &mut self.control,
            Queue3::Event => &mut self.events,
            Queue3::Request => &mut self.request,
        };
        if resubmit {
            handler.resubmit_chain(chain, &self.ram, &mut self.done);
        } else {
            handler.handle_chain(chain, &self.ram, &mut self.done);
        }
        let _ = handler.submit();
    }

    /// Collects what finished on the request queue and puts it "on the used ring".
    fn reap(&mut self) {
        self.request.reap(&mut self.done);
        self.events.reap(&mut self.done);
        self.publish();
    }

    fn publish(&mut self) {
        self.done.clear();
        self.request.published();
        self.control.published();
        self.events.published();
    }

    /// Completes everything in flight.
    fn drain(&mut self) {
        let _ = self.request.submit();
        if let Err(e) = self.request.drain(&mut self.done) {
            harness_failure("drain", e);
        }
        let _ = self.events.drain(&mut self.done);
        self.publish();
    }
}

/// Which queue a chain goes to.
#[derive(Clone, Copy)]
enum Queue3 {
    Control,
    Event,
    Request,
}

/// LUN fields a command may carry: the four LUNs, a missing one, flat addressing, another
/// target; index 7 reads the eight bytes from the input.
fn lun_field(input: &mut Input<'_>) -> [u8; 8] {
    match input.u8() % 8 {
        0 => encode_lun(0),
        1 => encode_lun(1),
        2 => encode_lun(2),
        3 => encode_lun(5),
        4 => encode_lun(3),
        5 => [1, 0, 0x40, 0x05, 0, 0, 0, 0],
        6 => [1, 1, 0x40, 0x00, 0, 0, 0, 0],
        _ => input.array(),
    }
}

/// One SCSI command as a virtio-scsi request.
#[derive(Debug, Clone)]
pub struct Command {
    /// The LUN field (index into [`lun_field`]'s table; 7: `raw_lun`).
    pub lun: u8,
    /// The eight LUN bytes when `lun` is 7.
    pub raw_lun: [u8; 8],
    /// How many CDB bytes the emulation sees in the direct call.
    pub cdb_len: u8,
    /// The CDB field.
    pub cdb: [u8; CDB_SIZE],
    /// Data-out bytes (the rest zeroes).
    pub data_out_len: u32,
    /// Their first bytes.
    pub data_out: Vec<u8>,
    /// Data-in bytes.
    pub data_in_len: u32,
    /// Framing: bits 0-1 data-out descriptors - 1, bits 2-3 data-in descriptors - 1, bit
    /// 4 a short response buffer, bit 5 the request header over two descriptors, bit 6
    /// complete everything in flight after it.
    pub shape: u8,
}

impl Command {
    fn read(input: &mut Input<'_>) -> Self {
        let lun = input.u8();
        let raw_lun = if lun % 8 == 7 { input.array() } else { [0; 8] };
        Command {
            lun,
            raw_lun,
            cdb_len: input.u8(),
            cdb: input.array(),
            data_out_len: input.u32() % (MAX_DATA + 1),
            data_out: input.blob().to_vec(),
            data_in_len: input.u32() % (MAX_DATA + 1),
            shape: input.u8(),
        }
    }

    /// Writes it in the format `read` reads.
    pub fn write(&self, out: &mut Output) {
        out.u8(self.lun);
        if self.lun % 8 == 7 {
            out.bytes(&self.raw_lun);
        }
        out.u8(self.cdb_len)
            .bytes(&self.cdb)
            .u32(self.data_out_len)
            .blob(&self.data_out)
            .u32(self.data_in_len)
            .u8(self.shape);
    }

    fn lun_bytes(&self) -> [u8; 8] {
        let mut raw = Output::new();
        raw.u8(self.lun).bytes(&self.raw_lun);
        let raw = raw.finish();
        lun_field(&mut Input::new(&raw))
    }

    /// Runs it straight into the addressed LUN's emulation, then as a request.
    fn run(&self, dev: &mut Device) {
        let guest = &base().guest;
        let out_len = self.data_out_len as usize;
        let params_len = out_len.min(data_out_to_gather(&self.cdb));
        let mut params = vec![0u8; params_len];
        let n = self.data_out.len().min(params_len);
        params[..n].copy_from_slice(&self.data_out[..n]);
        let cdb = &self.cdb[..usize::from(self.cdb_len) % (CDB_SIZE + 1)];
        let lun = self.lun_bytes();
        let table = dev.device.luns();
        if let Some(slot) = targets::scsi::virtio::decode_lun(&lun).and_then(|id| table.find(id)) {
            let _ = slot.lun.emulation.execute(cdb, &params);
        }
        // The transport answers REPORT LUNS on the whole CDB field.
        let _ = report_luns(&self.cdb, &table.ids());

        // The request in guest memory: header, data-out, response, data-in.
        let mut req = lun.to_vec();
        req.extend_from_slice(&0x1234_5678u64.to_le_bytes());
        req.extend_from_slice(&[0, 0, 0]);
        req.extend_from_slice(&self.cdb);
        guest.write(REQ, &req);
        guest.reset_range(DATA_OUT, out_len);
        guest.write(DATA_OUT, &self.data_out[..self.data_out.len().min(out_len)]);
        let mut bufs = Vec::new();
        if self.shape & 0x20 != 0 {
            bufs.push((REQ, 7, false));
            bufs.push((REQ + 7, REQ_SIZE as u32 - 7, false));
        } else {
            bufs.push((REQ, REQ_SIZE as u32, false));
        }
        split(
            &mut bufs,
            DATA_OUT,
            self.data_out_len,
            self.shape & 3,
            false,
        );
        let resp_len = if self.shape & 0x10 != 0 {
            10
        } else {
            RESP_SIZE as u32
        };
        bufs.push((RESP, resp_len, true));
        split(
            &mut bufs,
            DATA_IN,
            self.data_in_len,
            (self.shape >> 2) & 3,
            true,
        );
        dev.one_chain(Queue3::Request, &chain(0, &bufs), false);
        if self.shape & 0x40 != 0 {
            dev.drain();
        } else if dev.request.poll_ready() {
            dev.reap();
        }
    }
}

/// Appends `len` bytes at `addr` as up to `pieces + 1` descriptors (none when `len` is 0).
fn split(bufs: &mut Vec<(u64, u32, bool)>, addr: u64, len: u32, pieces: u8, write: bool) {
    let n = u32::from(pieces) + 1;
    let step = (len / n).max(1);
    let mut at = 0;
    for i in 0..n {
        if at >= len {
            break;
        }
        let piece = if i + 1 == n {
            len - at
        } else {
            step.min(len - at)
        };
        bufs.push((addr + u64::from(at), piece, write));
        at += piece;
    }
}

/// Runs one `scsi_cdb` input.
pub fn run_cdb(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut dev = Device::new(flags & 1 == 0);
    if flags & 2 != 0 {
        dev.device
            .set_unit_attention(Some(0), Sense::I_T_NEXUS_LOSS);
    }
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        Command::read(&mut input).run(&mut dev);
    }
    dev.drain();
}

/// One step of `scsi_tmf_an`: op (u8) and its operands.
///
/// | op % 8 | step |
/// | --- | --- |
/// | 0, 1 | control request: blob (request bytes), u8 response bytes, u8 framing (bit 0 request over two descriptors, bit 1 a readable descriptor after the response); 1 re-runs it as after a restart |
/// | 2 | a [`Command`] on the request queue, left in flight |
/// | 3 | completions reaped and published |
/// | 4 | an event buffer of u8 bytes |
/// | 5 | LUN change: u8 which (remove, add back, report added/removed, unit attention, grow by u16 blocks) and u8 LUN index |
/// | 6 | request queue refresh (takes LUN changes over) |
/// | 7 | everything completed |
fn tmf_step(dev: &mut Device, input: &mut Input<'_>) {
    let guest = &base().guest;
    match input.u8() % 8 {
        op @ (0 | 1) => {
            let req = input.blob();
            let resp_len = u32::from(input.u8());
            let framing = input.u8();
            guest.reset_range(CTRL_REQ, 0x100);
            guest.write(CTRL_REQ, &req[..req.len().min(0x100)]);
            let req_len = req.len().min(0x100) as u32;
            let mut bufs = Vec::new();
            if framing & 1 != 0 && req_len > 1 {
                bufs.push((CTRL_REQ, 1, false));
                bufs.push((CTRL_REQ + 1, req_len - 1, false));
            } else if req_len > 0 {
                bufs.push((CTRL_REQ, req_len, false));
            }
            bufs.push((CTRL_RESP, resp_len, true));
            if framing & 2 != 0 {
                bufs.push((CTRL_REQ, 4, false));
            }
            dev.one_chain(Queue3::Control, &chain(0, &bufs), op == 1);
        }
        2 => Command::read(input).run(dev),
        3 => dev.reap(),
        4 => {
            let len = u32::from(input.u8());
            dev.one_chain(Queue3::Event, &chain(0, &[(EVENT, len, true)]), false);
            dev.reap();
        }
        5 => {
            let which = input.u8();
            let (id, disk, settings) = &base().disks[usize::from(input.u8()) % LUNS.len()];
            match which % 6 {
                0 => {
                    dev.device.remove_lun(*id);
                }
                1 => {
                    let disk_for_ring = Arc::clone(disk);
                    let _ = dev.device.add_lun(
                        scsi_lun(*id, disk, settings),
                        Box::new(move |notifier| {
                            disk_for_ring.open_queue(u32::from(QUEUE_SIZE), Some(notifier))
                        }),
                    );
                }
                2 | 3 => dev.device.report_lun_change(*id, which % 6 == 2),
                4 => dev
                    .device
                    .set_unit_attention(Some(*id), Sense::LUN_RESET_OCCURRED),
                _ => {
                    let blocks = DISK_SIZE / u64::from(settings.block_size);
                    let _ = dev.device.grow_lun(*id, blocks + u64::from(input.u16()));
                }
            }
        }
        6 => {
            dev.request.refresh(&mut dev.done);
            dev.publish();
        }
        _ => dev.drain(),
    }
}

/// Runs one `scsi_tmf_an` input.
pub fn run_tmf(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut dev = Device::new(flags & 1 == 0);
    if flags & 2 != 0 {
        dev.device.set_acked_features(1 << VIRTIO_SCSI_F_CHANGE);
    }
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        tmf_step(&mut dev, &mut input);
    }
    dev.drain();
}

/// A command to LUN index `lun` (0..4: ids 0, 1, 2, 5) with CDB `cdb`.
fn command(lun: u8, cdb: &[u8], data_out: Vec<u8>, data_in_len: u32) -> Command {
    let mut field = [0u8; CDB_SIZE];
    field[..cdb.len()].copy_from_slice(cdb);
    Command {
        lun,
        raw_lun: [0; 8],
        cdb_len: cdb.len() as u8,
        cdb: field,
        data_out_len: data_out.len() as u32,
        data_out,
        data_in_len,
        shape: 0,
    }
}

/// The CDBs of the seeds, for a LUN with `bs`-byte blocks: every implemented command
/// (and a few of its variants), well formed.
fn seed_commands(lun: u8, bs: u32) -> Vec<(String, Command)> {
    let blocks = |n: u32| n * bs;
    let pattern: Vec<u8> = (0..blocks(2)).map(|i| (i % 251) as u8).collect();
    let mut caching = vec![0u8, 0, 0, 0, 0x08, 0x12, 0x04];
    caching.resize(4 + 20, 0);
    let mut caching10 = vec![0u8; 8];
    caching10.extend_from_slice(&caching[4..]);
    let mut unmap = vec![0, 22, 0, 16, 0, 0, 0, 0];
    unmap.extend_from_slice(&8u64.to_be_bytes());
    unmap.extend_from_slice(&2u32.to_be_bytes());
    unmap.extend_from_slice(&[0; 4]);
    let one_block: Vec<u8> = (0..bs).map(|i| (i % 7) as u8).collect();
    let c = |cdb: &[u8], out: Vec<u8>, din: u32| command(lun, cdb, out, din);
    vec![
        ("test-unit-ready", c(&[0x00, 0, 0, 0, 0, 0], vec![], 0)),
        ("request-sense", c(&[0x03, 0, 0, 0, 252, 0], vec![], 252)),
        ("inquiry", c(&[0x12, 0, 0, 0, 96, 0], vec![], 96)),
        (
            "inquiry-vpd-00",
            c(&[0x12, 1, 0x00, 0, 255, 0], vec![], 255),
        ),
        (
            "inquiry-vpd-80",
            c(&[0x12, 1, 0x80, 0, 255, 0], vec![], 255),
        ),
        ("inquiry-vpd-83", c(&[0x12, 1, 0x83, 1, 0, 0], vec![], 256)),
        ("inquiry-vpd-b0", c(&[0x12, 1, 0xb0, 0, 64, 0], vec![], 64)),
        ("inquiry-vpd-b1", c(&[0x12, 1, 0xb1, 0, 64, 0], vec![], 64)),
        ("inquiry-vpd-b2", c(&[0x12, 1, 0xb2, 0, 64, 0], vec![], 64)),
        ("mode-sense-6", c(&[0x1a, 0, 0x3f, 0, 255, 0], vec![], 255)),
        (
            "mode-sense-10",
            c(&[0x5a, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0], vec![], 256),
        ),
        ("mode-select-6", c(&[0x15, 0x10, 0, 0, 24, 0], caching, 0)),
        (
            "mode-select-10",
            c(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, 28, 0], caching10, 0),
        ),
        ("start-stop-unit", c(&[0x1b, 0, 0, 0, 1, 0], vec![], 0)),
        (
            "read-capacity-10",
            c(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![], 8),
        ),
        (
            "read-capacity-16",
            c(
                &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                vec![],
                32,
            ),
        ),
        ("read-6", c(&[0x08, 0, 0, 8, 2, 0], vec![], blocks(2))),
        ("write-6", c(&[0x0a, 0, 0, 8, 2, 0], pattern.clone(), 0)),
        (
            "read-10",
            c(&[0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0], vec![], blocks(2)),
        ),
        (
            "write-10-fua",
            c(&[0x2a, 0x08, 0, 0, 0, 8, 0, 0, 2, 0], pattern.clone(), 0),
        ),
        (
            "read-12",
            c(&[0xa8, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0], vec![], blocks(2)),
        ),
        (
            "write-12",
            c(&[0xaa, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0], pattern.clone(), 0),
        ),
        (
            "read-16",
            c(
                &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0],
                vec![],
                blocks(2),
            ),
        ),
        (
            "write-16",
            c(
                &[0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0],
                pattern.clone(),
                0,
            ),
        ),
        (
            "verify-10-bytchk",
            c(&[0x2f, 0x02, 0, 0, 0, 8, 0, 0, 2, 0], pattern.clone(), 0),
        ),
        (
            "verify-16",
            c(
                &[0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0],
                vec![],
                0,
            ),
        ),
        (
            "synchronize-cache-10",
            c(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![], 0),
        ),
        (
            "synchronize-cache-16",
            c(
                &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                vec![],
                0,
            ),
        ),
        (
            "write-same-10",
            c(&[0x41, 0, 0, 0, 0, 8, 0, 0, 4, 0], one_block.clone(), 0),
        ),
        (
            "write-same-16-unmap",
            c(
                &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 4, 0, 0],
                vec![0; bs as usize],
                0,
            ),
        ),
        ("unmap", c(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap, 0)),
        (
            "report-luns",
            c(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], vec![], 256),
        ),
        (
            "report-supported-opcodes",
            c(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], vec![], 4096),
        ),
        (
            "report-supported-opcode-one",
            c(
                &[0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 0, 64, 0, 0],
                vec![],
                64,
            ),
        ),
    ]
    .into_iter()
    .map(|(name, cmd)| (name.to_string(), cmd))
    .collect()
}

/// The `scsi_cdb` seeds: every command to the first LUN, the block-size dependent ones to
/// the others, and a few framings and LUN fields.
pub fn cdb_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let one = |flags: u8, cmds: &[&Command]| {
        let mut out = Output::new();
        out.u8(flags);
        for c in cmds {
            c.write(&mut out);
        }
        out.finish()
    };
    for (name, cmd) in seed_commands(0, 512) {
        seeds.push((format!("l0-{name}"), one(0, &[&cmd])));
    }
    for (lun, id, bs) in [(1u8, 1, 4096), (2, 2, 4096), (3, 5, 512)] {
        for (name, cmd) in seed_commands(lun, bs) {
            if ["read", "write", "verify", "unmap", "same"]
                .iter()
                .any(|k| name.contains(k))
            {
                seeds.push((format!("l{id}-{name}"), one(0, &[&cmd])));
            }
        }
    }
    let cmds = seed_commands(0, 512);
    let find = |n: &str| {
        cmds.iter()
            .find(|(name, _)| name == n)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| harness_failure("seed", n))
    };
    let mut split = find("write-10-fua");
    split.shape = 0x20 | 3;
    let mut read = find("read-10");
    read.shape = 3 << 2 | 0x40;
    seeds.push(("l0-split-write-read".into(), one(1, &[&split, &read])));
    let mut absent = find("inquiry");
    absent.lun = 4;
    let mut flat = find("report-luns");
    flat.lun = 5;
    seeds.push(("absent-and-flat-luns".into(), one(2, &[&absent, &flat])));
    seeds
}

/// The `scsi_tmf_an` seeds: each task management function and asynchronous notification
/// request on LUN 0 with I/O in flight, on a missing LUN, and after LUN changes.
pub fn tmf_seeds() -> Vec<(String, Vec<u8>)> {
    use virtio_bindings::bindings::virtio_scsi::*;
    let tmf = |subtype: u32, lun: [u8; 8]| {
        let mut r = VIRTIO_SCSI_T_TMF.to_le_bytes().to_vec();
        r.extend_from_slice(&subtype.to_le_bytes());
        r.extend_from_slice(&lun);
        r.extend_from_slice(&0x1234_5678u64.to_le_bytes());
        r
    };
    let an = |kind: u32| {
        let mut r = kind.to_le_bytes().to_vec();
        r.extend_from_slice(&encode_lun(0));
        r.extend_from_slice(&u32::MAX.to_le_bytes());
        r
    };
    let write = seed_commands(0, 512)
        .into_iter()
        .find(|(n, _)| n == "write-10-fua")
        .map(|(_, c)| c)
        .unwrap_or_else(|| harness_failure("seed", "write"));
    let control = |out: &mut Output, req: &[u8], resp: u8, framing: u8, resubmit: bool| {
        out.u8(u8::from(resubmit)).blob(req).u8(resp).u8(framing);
    };
    let mut seeds = Vec::new();
    let subtypes = [
        ("abort-task", VIRTIO_SCSI_T_TMF_ABORT_TASK),
        ("abort-task-set", VIRTIO_SCSI_T_TMF_ABORT_TASK_SET),
        ("clear-aca", VIRTIO_SCSI_T_TMF_CLEAR_ACA),
        ("clear-task-set", VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET),
        ("i-t-nexus-reset", VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET),
        ("logical-unit-reset", VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET),
        ("query-task", VIRTIO_SCSI_T_TMF_QUERY_TASK),
        ("query-task-set", VIRTIO_SCSI_T_TMF_QUERY_TASK_SET),
    ];
    for (name, subtype) in subtypes {
        let mut out = Output::new();
        out.u8(0);
        // A write in flight, the TMF, then the write completes and the TMF comes again.
        out.u8(2);
        write.write(&mut out);
        control(&mut out, &tmf(subtype, encode_lun(0)), 1, 0, false);
        out.u8(3);
        control(&mut out, &tmf(subtype, encode_lun(0)), 1, 1, false);
        control(&mut out, &tmf(subtype, encode_lun(3)), 1, 0, false);
        control(&mut out, &tmf(subtype, encode_lun(0)), 1, 0, true);
        seeds.push((format!("tmf-{name}"), out.finish()));
    }
    for (name, kind) in [
        ("an-query", VIRTIO_SCSI_T_AN_QUERY),
        ("an-subscribe", VIRTIO_SCSI_T_AN_SUBSCRIBE),
    ] {
        let mut out = Output::new();
        out.u8(0);
        control(&mut out, &an(kind), AN_RESP as u8, 0, false);
        control(&mut out, &an(kind), AN_RESP as u8, 2, true);
        seeds.push((name.to_string(), out.finish()));
    }
    // LUN 1 removed with a command in flight, the queue refreshed, an event delivered,
    // LUN 1 back, grown, and a reset of it.
    let mut out = Output::new();
    out.u8(2);
    out.u8(2);
    write.write(&mut out);
    out.u8(5).u8(0).u8(1);
    out.u8(6);
    out.u8(5).u8(3).u8(1);
    out.u8(4).u8(16);
    out.u8(5).u8(1).u8(1);
    out.u8(5).u8(2).u8(1);
    out.u8(6);
    out.u8(5).u8(5).u8(1).u16(64);
    out.u8(4).u8(16);
    control(
        &mut out,
        &tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, encode_lun(1)),
        1,
        0,
        false,
    );
    seeds.push(("lun-changes".into(), out.finish()));
    seeds
}

/// Size of `virtio_scsi_ctrl_an_resp`.
const AN_RESP: usize = 5;
