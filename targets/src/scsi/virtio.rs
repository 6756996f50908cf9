//! virtio-scsi (virtio 1.x §5.6): one target with many LUNs.
//!
//! Here: the device ([`ScsiDevice`]: LUN table, config space, unit attentions), LUN
//! addressing, the request framing and the request queues ([`RequestQueue`], queues 2..).
//! Queue 0, the control queue ([`ControlQueue`]: task management and asynchronous
//! notification requests), lives in `scsi/control.rs`; queue 1, the event queue
//! ([`EventQueue`]) and its pending events, in `scsi/events.rs`; both are re-exported here.
//!
//! A request is the 51-byte `virtio_scsi_cmd_req` (with a 32-byte CDB) followed by data-out
//! bytes, and the 108-byte `virtio_scsi_cmd_resp` (96-byte sense) followed by data-in bytes.
//! Commands are emulated by [`Lun`]; disk I/O runs on one ring per LUN per queue, all
//! signalling one completion eventfd.
//!
//! A LUN whose capacity grows ([`ScsiDevice::grow_lun`]) reports CAPACITY DATA HAS CHANGED
//! as a unit attention, after any other pending one, and with VIRTIO_SCSI_F_CHANGE as a
//! parameter-change event too.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use virtio_queue::DescriptorChain;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use super::control::ControlQueue;
pub use super::events::{event_lun, EventQueue, EVENT_SIZE};

use super::emulation::{
    data_out_to_gather, ignores_unit_attention, report_luns, IoRequest, Lun, Outcome,
    MAX_TRANSFER_BLOCKS,
};
use super::events::{
    PendingEvents, VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_T_PARAM_CHANGE, VIRTIO_SCSI_T_TRANSPORT_RESET,
};
use super::luns::{LunSlot, LunTable, RingFactory};
use super::sense::{status, Sense, FIXED_SENSE_LEN};
use crate::chain::{
    bounce_alignment, gather, host_iovecs, scatter, split_segments, total, Chain, Memory, Segment,
};
use crate::device::{Completed, QueueHandler, VirtioDevice};
use crate::disk::{DiskCompletion, DiskInfo, DiskOp, DiskQueue};
use crate::inflight::InFlightTable;
use crate::iobuf::AlignedBuf;
use crate::stats::{bump, Failure, LunStats, Op, QueueStats};

/// CDB bytes in a request (the config space's default `cdb_size`).
pub const CDB_SIZE: usize = 32;
/// Sense bytes in a response (the config space's default `sense_size`).
pub const SENSE_SIZE: usize = 96;
/// `virtio_scsi_cmd_req`: lun[8], tag, task_attr, prio, crn, cdb.
pub const REQ_SIZE: usize = 8 + 8 + 3 + CDB_SIZE;
/// `virtio_scsi_cmd_resp`: sense_len, resid, status_qualifier, status, response, sense.
pub const RESP_SIZE: usize = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE;
/// Size of `struct virtio_scsi_config`.
pub const CONFIG_SPACE_SIZE: usize = 36;
/// Bytes of the write-same pattern buffer (the pattern repeated).
const WRITE_SAME_CHUNK: usize = 1 << 20;

/// How long an abort or reset waits for the I/O it affects, unless set otherwise.
const DEFAULT_TMF_TIMEOUT: Duration = Duration::from_secs(30);

/// virtio-scsi response codes.
pub mod response {
    /// Command completed (see status).
    pub const OK: u8 = 0;
    /// Data buffers too small for the transfer.
    pub const OVERRUN: u8 = 1;
    /// No such target.
    pub const BAD_TARGET: u8 = 3;
    /// Request failed (unsupported framing).
    pub const FAILURE: u8 = 9;
    /// TMF: function complete.
    pub const FUNCTION_COMPLETE: u8 = 0;
    /// TMF: function succeeded.
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    /// TMF: function rejected.
    pub const FUNCTION_REJECTED: u8 = 11;
    /// TMF: no such LUN.
    pub const INCORRECT_LUN: u8 = 12;
}

/// Decodes an 8-byte virtio-scsi LUN field: `Some(lun)` for target 0, single level.
pub fn decode_lun(field: &[u8; 8]) -> Option<u16> {
    if field[0] != 1 || field[1] != 0 || field[4..] != [0, 0, 0, 0] {
        return None;
    }
    Some(u16::from_be_bytes([field[2], field[3]]) & 0x3fff)
}

/// One logical unit of an export: its emulation and its disk.
#[derive(Debug)]
pub struct ScsiLun {
    /// LUN number.
    pub id: u16,
    /// Command emulation.
    pub emulation: Lun,
    /// How the backing store was opened.
    pub disk: DiskInfo,
}

/// A virtio-scsi device: its LUNs and what all queues share.
#[derive(Debug)]
pub struct ScsiDevice {
    /// The LUNs now; queues take a new table over when refreshed (see [`LunTable`]).
    table: RwLock<Arc<LunTable>>,
    request_queues: u16,
    queue_size: u16,
    acked_features: AtomicU64,
    /// Events waiting for an event-queue buffer.
    pub(super) events: Mutex<PendingEvents>,
    /// Signalled when an event is queued; the event queue's worker waits on it.
    pub(super) event_notifier: EventFd,
    /// How long a TMF waits for them, in milliseconds, before it answers FAILURE.
    tmf_timeout_ms: AtomicU64,
}

/// The 8-byte virtio-scsi LUN field for target 0, `lun` (flat addressing, as Linux's
/// virtio_scsi writes it in requests).
pub fn encode_lun(lun: u16) -> [u8; 8] {
    [
        1,
        0,
        0x40 | ((lun >> 8) as u8 & 0x3f),
        lun as u8,
        0,
        0,
        0,
        0,
    ]
}

impl ScsiDevice {
    /// A device with these LUNs (sorted by id here) and `request_queues` request queues.
    pub fn new(luns: Vec<ScsiLun>, request_queues: u16, queue_size: u16) -> io::Result<Self> {
        let slots = luns
            .into_iter()
            .map(|lun| Arc::new(LunSlot::new(lun, None)))
            .collect();
        Ok(ScsiDevice {
            table: RwLock::new(Arc::new(LunTable::new(slots))),
            request_queues,
            queue_size,
            acked_features: AtomicU64::new(0),
            events: Mutex::new(PendingEvents::default()),
            event_notifier: EventFd::new(EFD_NONBLOCK)?,
            tmf_timeout_ms: AtomicU64::new(DEFAULT_TMF_TIMEOUT.as_millis() as u64),
        })
    }

    /// How long an abort or reset waits for the I/O it affects (default 30 s); after that
    /// it answers FAILURE and the initiator escalates.
    pub fn set_tmf_timeout(&self, timeout: Duration) {
        self.tmf_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Waits until no LUN in `luns` has requests outstanding; false on timeout.
    pub(super) fn wait_idle(&self, luns: &[Arc<LunSlot>]) -> bool {
        let timeout = Duration::from_millis(self.tmf_timeout_ms.load(Ordering::Relaxed));
        let deadline = Instant::now() + timeout;
        loop {
            if luns.iter().all(|l| l.busy() == 0) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Tells the initiator that LUN `id` appeared (`added`) or went away: a TRANSPORT_RESET
    /// event makes Linux rescan or remove it, and every LUN raises REPORTED LUNS DATA
    /// CHANGED (SPC-4) for initiators that do not listen to events.
    pub fn report_lun_change(&self, id: u16, added: bool) {
        let reason = if added {
            VIRTIO_SCSI_EVT_RESET_RESCAN
        } else {
            VIRTIO_SCSI_EVT_RESET_REMOVED
        };
        let mut event = [0u8; EVENT_SIZE];
        event[0..4].copy_from_slice(&VIRTIO_SCSI_T_TRANSPORT_RESET.to_le_bytes());
        event[4..12].copy_from_slice(&event_lun(id));
        event[12..16].copy_from_slice(&reason.to_le_bytes());
        self.set_unit_attention(None, Sense::REPORTED_LUNS_DATA_CHANGED);
        self.push_event(event);
    }

    /// Grows LUN `id` to `blocks` logical blocks (online resize; the backing store already
    /// holds them) and tells the initiator: the LUN's next command that reports unit
    /// attentions gets CAPACITY DATA HAS CHANGED (ASC 2Ah/ASCQ 09h, SPC-4), and a driver
    /// that accepted VIRTIO_SCSI_F_CHANGE also gets a VIRTIO_SCSI_T_PARAM_CHANGE event with
    /// that ASC/ASCQ (virtio 1.2 §5.6.6.3.2), on which Linux rescans the LUN by itself.
    /// Returns the capacity before, in blocks; `None` if there is no such LUN.
    pub fn grow_lun(&self, id: u16, blocks: u64) -> Option<u64> {
        let luns = self.luns();
        let before = luns.find(id)?.lun.emulation.grow(blocks);
        let change = 1u64 << VIRTIO_SCSI_F_CHANGE;
        if blocks > before && self.acked_features.load(Ordering::Relaxed) & change != 0 {
            let sense = Sense::CAPACITY_DATA_HAS_CHANGED;
            let mut event = [0u8; EVENT_SIZE];
            event[0..4].copy_from_slice(&VIRTIO_SCSI_T_PARAM_CHANGE.to_le_bytes());
            event[4..12].copy_from_slice(&event_lun(id));
            let reason = u32::from(sense.asc) | u32::from(sense.ascq) << 8;
            event[12..16].copy_from_slice(&reason.to_le_bytes());
            self.push_event(event);
        }
        Some(before)
    }

    /// The LUNs now, by id.
    pub fn luns(&self) -> Arc<LunTable> {
        Arc::clone(&self.table.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds a LUN to the live device. Queues serve it once refreshed (the transport's
    /// `QueueHandler::refresh`), opening their rings with `open_ring`; then call
    /// [`ScsiDevice::report_lun_change`] so the initiator scans it. Fails if the id is taken.
    pub fn add_lun(&self, lun: ScsiLun, open_ring: RingFactory) -> Result<(), String> {
        let id = lun.id;
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let new = table
            .with(Arc::new(LunSlot::new(lun, Some(open_ring))))
            .ok_or_else(|| format!("LUN {id} exists"))?;
        *table = Arc::new(new);
        Ok(())
    }

    /// Removes LUN `id` from the live device: new commands to it get LOGICAL UNIT NOT
    /// SUPPORTED once the queues are refreshed, which completes its requests in flight and
    /// closes its rings. Returns the LUN, or `None` if there is none with that id.
    pub fn remove_lun(&self, id: u16) -> Option<Arc<LunSlot>> {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let (new, removed) = table.without(id)?;
        *table = Arc::new(new);
        Some(removed)
    }

    /// Raises `sense` as a unit attention on LUN `id` (`Some`) or on every LUN.
    pub fn set_unit_attention(&self, id: Option<u16>, sense: Sense) {
        for slot in self.luns().iter() {
            if id.is_none_or(|i| i == slot.id()) {
                slot.set_unit_attention(sense);
            }
        }
    }

    /// `seg_max`: the ring minus request and response headers.
    fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    fn config_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let luns = self.luns();
        // The largest block size any LUN may have (LUNs come and go on a live device).
        let max_block = luns
            .iter()
            .map(|l| l.lun.emulation.settings().block_size)
            .max()
            .unwrap_or(512)
            .max(4096);
        let max_sectors = MAX_TRANSFER_BLOCKS * (max_block / 512);
        // Linux scans LUNs up to max_lun: the flat-addressing limit, so LUNs added later
        // are found by a rescan.
        let max_lun = 16383u32;
        let fields: [(usize, u32); 8] = [
            (0, u32::from(self.request_queues)),
            (4, self.seg_max()),
            (8, max_sectors),
            (12, u32::from(self.queue_size)), // cmd_per_lun
            (16, 16),                         // event_info_size
            (20, SENSE_SIZE as u32),
            (24, CDB_SIZE as u32),
            (32, max_lun),
        ];
        for (off, v) in fields {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        }
        // max_channel (28, u16) = 0, max_target (30, u16) = 0: one target.
        c
    }
}

impl VirtioDevice for ScsiDevice {
    fn num_queues(&self) -> usize {
        2 + usize::from(self.request_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    /// VIRTIO_SCSI_F_CHANGE: parameter-change events are sent when a LUN's capacity grows
    /// ([`ScsiDevice::grow_lun`]); QEMU's vhost-user-scsi passes the guest's ack through.
    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_SCSI_F_HOTPLUG,
            VIRTIO_SCSI_F_CHANGE,
        ]
        .into_iter()
        .fold(0, |acc, bit| acc | (1u64 << bit))
    }

    /// QEMU's vhost-user-scsi keeps its own config space (and warns about CONFIG).
    fn offers_config(&self) -> bool {
        false
    }

    fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn config_space(&self) -> Vec<u8> {
        self.config_bytes().to_vec()
    }

    /// Only `sense_size` and `cdb_size` are driver-writable; only their defaults are
    /// supported.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), String> {
        let current = self.config_bytes();
        let (start, end) = (offset as usize, offset as usize + data.len());
        if start < 20 || end > 28 || current[start..end] != *data {
            return Err(format!(
                "config write of {} bytes at {offset}: only the default sense_size {SENSE_SIZE} and cdb_size {CDB_SIZE} are supported",
                data.len()
            ));
        }
        Ok(())
    }

    /// Every LUN reports POWER ON, RESET OR BUS DEVICE RESET to the new initiator.
    fn session_started(&self) {
        self.set_unit_attention(None, Sense::POWER_ON_RESET);
    }

    fn lun_capacities(&self) -> Vec<(u16, u64)> {
        self.luns()
            .iter()
            .map(|l| {
                let block_size = u64::from(l.lun.emulation.settings().block_size);
                (l.id(), l.lun.emulation.blocks() * block_size)
            })
            .collect()
    }
}

/// The response to write into `virtio_scsi_cmd_resp`.
struct Response {
    response: u8,
    status: u8,
    sense: Option<Sense>,
    /// Sense INFORMATION field (e.g. the offset of a miscompare).
    information: Option<u32>,
    residual: u32,
}

impl Response {
    fn ok(residual: u32) -> Self {
        Response {
            response: response::OK,
            status: status::GOOD,
            sense: None,
            information: None,
            residual,
        }
    }

    fn check(sense: Sense, residual: u32) -> Self {
        Response {
            response: response::OK,
            status: status::CHECK_CONDITION,
            sense: Some(sense),
            information: None,
            residual,
        }
    }

    fn transport(code: u8) -> Self {
        Response {
            response: code,
            status: status::GOOD,
            sense: None,
            information: None,
            residual: 0,
        }
    }

    fn bytes(&self) -> [u8; RESP_SIZE] {
        let mut r = [0u8; RESP_SIZE];
        if let Some(sense) = self.sense {
            r[0..4].copy_from_slice(&(FIXED_SENSE_LEN as u32).to_le_bytes());
            let bytes = match self.information {
                Some(info) => sense.fixed_with_information(info),
                None => sense.fixed(),
            };
            r[12..12 + FIXED_SENSE_LEN].copy_from_slice(&bytes);
        }
        r[4..8].copy_from_slice(&self.residual.to_le_bytes());
        r[10] = self.status;
        r[11] = self.response;
        r
    }
}

impl Response {
    /// Why the command failed, if it did (metric label `reason`).
    fn failure(&self) -> Option<Failure> {
        if self.response != response::OK {
            // OVERRUN, BAD_TARGET, FAILURE: the request's framing or addressing.
            return Some(Failure::Invalid);
        }
        if self.status == status::GOOD {
            return None;
        }
        Some(match self.sense {
            Some(s) if s == Sense::SPACE_ALLOCATION_FAILED => Failure::IoError,
            Some(s)
                if s == Sense::INVALID_OPCODE || s == Sense::SAVING_PARAMETERS_NOT_SUPPORTED =>
            {
                Failure::Unsupported
            }
            Some(Sense { key: 0x05, .. }) => Failure::Invalid,
            Some(Sense { key: 0x06, .. }) => Failure::UnitAttention,
            Some(Sense { key: 0x07, .. }) => Failure::ReadOnly,
            Some(Sense { key: 0x0e, .. }) => Failure::Miscompare,
            _ => Failure::IoError,
        })
    }
}

/// The metric op of a SCSI command, by operation code (see [`Op`]).
fn cdb_op(opcode: u8) -> Op {
    match opcode {
        // READ(6/10/12/16), VERIFY(10/16)
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0x8f => Op::Read,
        // WRITE(6/10/12/16)
        0x0a | 0x2a | 0xaa | 0x8a => Op::Write,
        // SYNCHRONIZE CACHE(10/16)
        0x35 | 0x91 => Op::Flush,
        // UNMAP
        0x42 => Op::Discard,
        // WRITE SAME(10/16)
        0x41 | 0x93 => Op::WriteZeroes,
        _ => Op::Other,
    }
}

/// How a request is counted: its LUN slot, op and when its chain was popped.
#[derive(Debug, Clone, Copy)]
struct Counted {
    /// The LUN addressed, if the device has it.
    lun: Option<u16>,
    op: Op,
    started: Instant,
}

/// Which disk operation a request runs, for completion handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    Read,
    Compare,
    Write,
    Flush,
    Unmap,
    Zero,
}

impl IoKind {
    /// The metric op (as [`cdb_op`] gives for the command).
    fn op(self) -> Op {
        match self {
            IoKind::Read | IoKind::Compare => Op::Read,
            IoKind::Write => Op::Write,
            IoKind::Flush => Op::Flush,
            IoKind::Unmap => Op::Discard,
            IoKind::Zero => Op::WriteZeroes,
        }
    }
}

/// A request with disk I/O in flight (one or more operations).
struct InFlight {
    /// Its LUN.
    lun: Arc<LunSlot>,
    head: u16,
    mem: Arc<Memory>,
    resp: Vec<Segment>,
    kind: IoKind,
    /// Bytes a read or write moves (checked against each operation's result).
    bytes: u64,
    data_in_len: usize,
    /// Where a bounced read's data goes.
    read_into: Vec<Segment>,
    pending: usize,
    failed: Option<i32>,
    /// Bounce buffer (reads and writes), compare buffer, or write-same pattern buffer.
    buffer: Option<AlignedBuf>,
    /// What a compare must find.
    expected: Vec<u8>,
    /// Bytes the request moves or covers (the metric).
    counted_bytes: u64,
    /// When the chain was popped (request latency).
    started: Instant,
}

/// A request queue of a virtio-scsi device.
pub struct RequestQueue {
    device: Arc<ScsiDevice>,
    /// The LUN table this queue serves (the device's, as of the last refresh).
    table: Arc<LunTable>,
    /// One ring per LUN, by LUN id.
    disks: Vec<(u16, Box<dyn DiskQueue>)>,
    notifier: EventFd,
    inflight: InFlightTable<InFlight>,
    /// Finished requests the transport has not published yet, by LUN.
    unpublished: Vec<Arc<LunSlot>>,
    stats: Arc<QueueStats>,
    /// The LUN slots of `stats` (the last for requests addressed to no LUN), kept here so
    /// requests take no lock; changed with the LUN table.
    lun_stats: Vec<Arc<LunStats>>,
}

impl RequestQueue {
    /// A queue over `device`; `make_disk(lun_index, notifier)` opens each LUN's ring,
    /// signalling `notifier`.
    pub fn new(
        device: Arc<ScsiDevice>,
        mut make_disk: impl FnMut(usize, &EventFd) -> io::Result<Box<dyn DiskQueue>>,
    ) -> io::Result<Self> {
        let notifier = EventFd::new(EFD_NONBLOCK)?;
        let table = device.luns();
        let disks = table
            .iter()
            .enumerate()
            .map(|(i, slot)| Ok((slot.id(), make_disk(i, &notifier)?)))
            .collect::<io::Result<Vec<_>>>()?;
        // One counter slot per LUN, then one for requests addressed to no LUN.
        let slots: Vec<Option<u16>> = table.iter().map(|l| Some(l.id())).chain([None]).collect();
        let stats = Arc::new(QueueStats::new(&slots));
        let lun_stats = stats.luns();
        Ok(RequestQueue {
            device,
            table,
            disks,
            notifier,
            inflight: InFlightTable::new(),
            unpublished: Vec::new(),
            stats,
            lun_stats,
        })
    }

    fn ring(&mut self, id: u16) -> Option<&mut Box<dyn DiskQueue>> {
        self.disks
            .iter_mut()
            .find(|(lun, _)| *lun == id)
            .map(|(_, ring)| ring)
    }

    /// Counters of this queue.
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn respond(
        mem: &Memory,
        head: u16,
        resp: &[Segment],
        r: &Response,
        data_written: usize,
        done: &mut Vec<Completed>,
    ) {
        let used_len = match scatter(mem, resp, &r.bytes()) {
            Some(n) if n == RESP_SIZE => (RESP_SIZE + data_written) as u32,
            _ => 0,
        };
        done.push(Completed { head, used_len });
    }

    /// The counters of LUN `lun` on this queue (`None`: requests addressed to no LUN).
    fn lun_stats(&self, lun: Option<u16>) -> Option<&Arc<LunStats>> {
        self.lun_stats.iter().find(|s| s.lun == lun)
    }

    /// Counts a request to `lun` answered with `r`.
    fn account(&self, lun: Option<u16>, op: Op, bytes: u64, started: Instant, r: &Response) {
        let Some(lun) = self.lun_stats(lun) else {
            return;
        };
        if let (status::CHECK_CONDITION, Some(sense)) = (r.status, r.sense) {
            lun.check_condition(sense.key);
        }
        lun.record(op, bytes, started, r.failure());
    }

    /// Counts a request answered at once with `r` and writes the response.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        counted: Counted,
        mem: &Memory,
        head: u16,
        resp: &[Segment],
        r: &Response,
        data_written: usize,
        done: &mut Vec<Completed>,
    ) {
        self.account(counted.lun, counted.op, 0, counted.started, r);
        Self::respond(mem, head, resp, r, data_written, done);
    }

    fn handle(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &Arc<Memory>,
        done: &mut Vec<Completed>,
    ) {
        let started = Instant::now();
        let Chain {
            head,
            readable,
            writable,
            misordered,
        } = Chain::collect(chain);
        let (req_segs, data_out) = split_segments(&readable, REQ_SIZE);
        let (resp, data_in) = split_segments(&writable, RESP_SIZE);
        let mut req = [0u8; REQ_SIZE];
        if misordered || total(&resp) < RESP_SIZE || gather(mem, &req_segs, &mut req).is_none() {
            tracing::debug!(head, "malformed virtio-scsi request");
            bump(&self.stats.malformed, 1);
            if total(&resp) >= RESP_SIZE {
                self.answer(
                    Counted {
                        lun: None,
                        op: Op::Other,
                        started,
                    },
                    mem,
                    head,
                    &resp,
                    &Response::transport(response::FAILURE),
                    0,
                    done,
                );
            } else {
                done.push(Completed { head, used_len: 0 });
            }
            return;
        }
        let data_out_len = total(&data_out);
        let data_in_len = total(&data_in);
        let mut lun_field = [0u8; 8];
        lun_field.copy_from_slice(&req[..8]);
        let cdb = &req[19..19 + CDB_SIZE];
        let lun_id = decode_lun(&lun_field);
        let slot = lun_id.and_then(|id| self.table.find(id).cloned());
        let counted = Counted {
            lun: slot.as_ref().map(|s| s.id()),
            op: cdb_op(cdb[0]),
            started,
        };
        if data_out_len > 0 && data_in_len > 0 {
            // Bidirectional commands need VIRTIO_SCSI_F_INOUT, which is not offered.
            self.answer(
                counted,
                mem,
                head,
                &resp,
                &Response::transport(response::FAILURE),
                0,
                done,
            );
            return;
        }
        if lun_id.is_none() {
            self.answer(
                counted,
                mem,
                head,
                &resp,
                &Response::transport(response::BAD_TARGET),
                0,
                done,
            );
            return;
        }
        let outcome = match slot {
            None => Self::absent_lun(cdb, &self.table.ids()),
            Some(slot) => {
                let ua = if ignores_unit_attention(cdb) {
                    None
                } else {
                    slot.take_unit_attention()
                        .or_else(|| slot.lun.emulation.take_capacity_changed())
                };
                match ua {
                    Some(sense) => Outcome::Check(sense),
                    None => {
                        let mut params = vec![0u8; data_out_len.min(data_out_to_gather(cdb))];
                        if gather(mem, &data_out, &mut params).is_none() {
                            params.clear();
                        }
                        match slot.lun.emulation.execute(cdb, &params) {
                            Outcome::Io(io) => {
                                let data = if matches!(io, IoRequest::Read { .. }) {
                                    data_in
                                } else {
                                    data_out
                                };
                                if let Err(r) = self.submit_io(
                                    &slot,
                                    io,
                                    head,
                                    mem,
                                    resp.clone(),
                                    data,
                                    data_in_len,
                                    started,
                                ) {
                                    self.answer(counted, mem, head, &resp, &r, 0, done);
                                }
                                return;
                            }
                            Outcome::ReportLuns => report_luns(cdb, &self.table.ids()),
                            other => other,
                        }
                    }
                }
            }
        };
        let (r, written) = match outcome {
            Outcome::Good => (Response::ok(data_in_len as u32), 0),
            Outcome::Check(sense) => (Response::check(sense, data_in_len as u32), 0),
            Outcome::Data(bytes) if bytes.len() > data_in_len => {
                (Response::transport(response::OVERRUN), 0)
            }
            Outcome::Data(bytes) => match scatter(mem, &data_in, &bytes) {
                Some(n) => (Response::ok((data_in_len - n) as u32), n),
                None => (Response::transport(response::FAILURE), 0),
            },
            // Both were turned into something else above.
            Outcome::Io(_) | Outcome::ReportLuns => (Response::transport(response::FAILURE), 0),
        };
        self.answer(counted, mem, head, &resp, &r, written, done);
    }

    /// Commands to a LUN that does not exist (SPC-4 4.6.20).
    fn absent_lun(cdb: &[u8], luns: &[u16]) -> Outcome {
        match cdb[0] {
            0x12 if cdb[1] & 0x01 == 0 => {
                let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
                let mut d = Lun::standard_inquiry(true);
                d.truncate(alloc);
                Outcome::Data(d)
            }
            0xa0 => report_luns(cdb, luns),
            0x03 => {
                let mut d = Sense::LUN_NOT_SUPPORTED.fixed().to_vec();
                d.truncate(usize::from(cdb[4]));
                Outcome::Data(d)
            }
            _ => Outcome::Check(Sense::LUN_NOT_SUPPORTED),
        }
    }

    /// Turns an I/O request into disk operations; `Err` is the response to give at once.
    #[allow(clippy::too_many_arguments)]
    fn submit_io(
        &mut self,
        lun: &Arc<LunSlot>,
        io: IoRequest,
        head: u16,
        mem: &Arc<Memory>,
        resp: Vec<Segment>,
        data: Vec<Segment>,
        data_in_len: usize,
        started: Instant,
    ) -> Result<(), Response> {
        let settings = lun.lun.emulation.settings();
        let bs = u64::from(settings.block_size);
        let direct = lun.lun.disk.direct;
        let write_cache = settings.write_cache;
        let internal = Response::check(Sense::INTERNAL_TARGET_FAILURE, 0);
        let mut buffer = None;
        let mut read_into = Vec::new();
        let mut expected = Vec::new();
        let (kind, bytes, ops) = match io {
            IoRequest::Compare {
                lba,
                blocks,
                expected: e,
            } => {
                let bytes = u64::from(blocks) * bs;
                let mut b = AlignedBuf::new(bytes as usize, 4096).ok_or(internal)?;
                let iovecs = vec![libc::iovec {
                    iov_base: b.as_mut_slice().as_mut_ptr().cast(),
                    iov_len: b.len(),
                }];
                buffer = Some(b);
                expected = e;
                (
                    IoKind::Compare,
                    bytes,
                    vec![DiskOp::Read {
                        offset: lba * bs,
                        iovecs,
                    }],
                )
            }
            IoRequest::Read { lba, blocks } | IoRequest::Write { lba, blocks, .. } => {
                let is_read = matches!(io, IoRequest::Read { .. });
                let bytes = u64::from(blocks) * bs;
                if (total(&data) as u64) < bytes {
                    return Err(Response::transport(response::OVERRUN));
                }
                let (segs, _) = split_segments(&data, bytes as usize);
                let mut iovecs = host_iovecs(mem, &segs)
                    .ok_or_else(|| Response::transport(response::FAILURE))?;
                if let Some(align) = bounce_alignment(direct, &iovecs) {
                    let mut b = AlignedBuf::new(bytes as usize, align).ok_or(internal)?;
                    if !is_read {
                        gather(mem, &segs, b.as_mut_slice())
                            .ok_or_else(|| Response::transport(response::FAILURE))?;
                    }
                    iovecs = vec![libc::iovec {
                        iov_base: b.as_mut_slice().as_mut_ptr().cast(),
                        iov_len: b.len(),
                    }];
                    buffer = Some(b);
                    if is_read {
                        read_into = segs;
                    }
                }
                let offset = lba * bs;
                let op = match io {
                    IoRequest::Write { fua, .. } => DiskOp::Write {
                        offset,
                        iovecs,
                        durable: fua || !write_cache,
                    },
                    _ => DiskOp::Read { offset, iovecs },
                };
                (
                    if is_read { IoKind::Read } else { IoKind::Write },
                    bytes,
                    vec![op],
                )
            }
            IoRequest::Flush => (IoKind::Flush, 0, vec![DiskOp::Flush]),
            // Without a volatile write cache (WCE=0) every command is durable at GOOD.
            IoRequest::Unmap(ranges) => {
                let ops = ranges
                    .into_iter()
                    .map(|(lba, blocks)| DiskOp::Discard {
                        offset: lba * bs,
                        len: u64::from(blocks) * bs,
                        durable: !write_cache,
                    })
                    .collect();
                (IoKind::Unmap, 0, ops)
            }
            IoRequest::WriteZeroes { lba, blocks, unmap } => (
                IoKind::Zero,
                0,
                vec![DiskOp::WriteZeroes {
                    offset: lba * bs,
                    len: u64::from(blocks) * bs,
                    unmap,
                    durable: !write_cache,
                }],
            ),
            IoRequest::WriteSame {
                lba,
                blocks,
                pattern,
            } => {
                let len = u64::from(blocks) * bs;
                let chunk = (len as usize).min(WRITE_SAME_CHUNK);
                let mut b = AlignedBuf::new(chunk, 4096).ok_or(internal)?;
                for block in b.as_mut_slice().chunks_mut(pattern.len()) {
                    block.copy_from_slice(&pattern[..block.len()]);
                }
                let base = b.as_mut_slice().as_mut_ptr();
                let mut ops = Vec::new();
                let mut done_bytes = 0u64;
                while done_bytes < len {
                    let n = (len - done_bytes).min(chunk as u64);
                    ops.push(DiskOp::Write {
                        offset: lba * bs + done_bytes,
                        iovecs: vec![libc::iovec {
                            iov_base: base.cast(),
                            iov_len: n as usize,
                        }],
                        durable: !write_cache,
                    });
                    done_bytes += n;
                }
                buffer = Some(b);
                (IoKind::Zero, 0, ops)
            }
        };
        let counted_bytes = match kind {
            IoKind::Unmap | IoKind::Zero => ops
                .iter()
                .map(|op| match op {
                    DiskOp::Discard { len, .. } | DiskOp::WriteZeroes { len, .. } => *len,
                    DiskOp::Write { iovecs, .. } => iovecs.iter().map(|v| v.iov_len as u64).sum(),
                    DiskOp::Read { .. } | DiskOp::Flush => 0,
                })
                .sum(),
            _ => bytes,
        };
        let slot = self.inflight.reserve();
        let count = ops.len();
        let token = slot as u64;
        let mut pushed = 0;
        match self.ring(lun.id()) {
            Some(ring) => {
                for op in ops {
                    if let Err(e) = ring.push(op, token) {
                        tracing::warn!("cannot queue disk I/O: {e}");
                        break;
                    }
                    pushed += 1;
                }
            }
            None => tracing::error!(lun = lun.id(), "no ring for the LUN on this queue"),
        }
        if pushed == 0 {
            self.inflight.release(slot);
            return Err(Response::check(Sense::INTERNAL_TARGET_FAILURE, 0));
        }
        lun.started();
        self.inflight.fill(
            slot,
            InFlight {
                lun: Arc::clone(lun),
                head,
                mem: Arc::clone(mem),
                resp,
                kind,
                bytes,
                data_in_len,
                read_into,
                pending: pushed,
                expected,
                // Operations that could not be queued count as failed.
                failed: (pushed < count).then_some(-libc::EAGAIN),
                buffer,
                counted_bytes,
                started,
            },
        );
        if let Some(stats) = self.lun_stats(Some(lun.id())) {
            stats.started_io();
        }
        Ok(())
    }

    fn complete_all(&mut self, completions: Vec<DiskCompletion>, done: &mut Vec<Completed>) {
        for c in completions {
            let slot = (c.token & 0xffff_ffff) as usize;
            let Some(request) = self.inflight.get_mut(slot) else {
                tracing::error!(token = c.token, "completion for an unknown request");
                continue;
            };
            let expected_ok = match request.kind {
                IoKind::Read | IoKind::Write | IoKind::Compare => {
                    c.result >= 0 && c.result as u64 == request.bytes
                }
                _ => c.result >= 0,
            };
            if !expected_ok && request.failed.is_none() {
                request.failed = Some(if c.result < 0 { c.result } else { -libc::EIO });
            }
            request.pending -= 1;
            if request.pending > 0 {
                continue;
            }
            let Some(request) = self.inflight.take(slot) else {
                continue;
            };
            self.finish(request, done);
        }
    }

    fn finish(&mut self, request: InFlight, done: &mut Vec<Completed>) {
        self.unpublished.push(Arc::clone(&request.lun));
        let mut written = 0;
        let r = match request.failed {
            None => {
                let bounced_ok = match (&request.buffer, request.kind, request.read_into.is_empty())
                {
                    (Some(b), IoKind::Read, false) => {
                        scatter(&request.mem, &request.read_into, b.as_slice()) == Some(b.len())
                    }
                    _ => true,
                };
                let miscompare = match (&request.buffer, request.kind) {
                    (Some(b), IoKind::Compare) => b
                        .as_slice()
                        .iter()
                        .zip(&request.expected)
                        .position(|(have, want)| have != want),
                    _ => None,
                };
                if let Some(offset) = miscompare {
                    Response {
                        information: Some(offset as u32),
                        ..Response::check(
                            Sense::MISCOMPARE_DURING_VERIFY,
                            request.data_in_len as u32,
                        )
                    }
                } else if bounced_ok {
                    if request.kind == IoKind::Read {
                        written = request.bytes as usize;
                    }
                    Response::ok((request.data_in_len - written) as u32)
                } else {
                    Response::check(Sense::INTERNAL_TARGET_FAILURE, request.data_in_len as u32)
                }
            }
            Some(err) => {
                tracing::warn!(kind = ?request.kind, result = err, "SCSI disk I/O failed");
                let sense = match (err, request.kind) {
                    (e, _) if e == -libc::ENOSPC => Sense::SPACE_ALLOCATION_FAILED,
                    (_, IoKind::Read | IoKind::Compare) => Sense::UNRECOVERED_READ_ERROR,
                    (_, IoKind::Unmap) => Sense::INTERNAL_TARGET_FAILURE,
                    _ => Sense::WRITE_ERROR,
                };
                Response::check(sense, request.data_in_len as u32)
            }
        };
        let lun = Some(request.lun.id());
        if let Some(stats) = self.lun_stats(lun) {
            stats.finished_io();
        }
        self.account(
            lun,
            request.kind.op(),
            request.counted_bytes,
            request.started,
            &r,
        );
        Self::respond(&request.mem, request.head, &request.resp, &r, written, done);
    }
}

impl QueueHandler for RequestQueue {
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &Arc<Memory>,
        done: &mut Vec<Completed>,
    ) {
        self.handle(chain, mem, done);
    }

    fn submit(&mut self) -> io::Result<()> {
        for (_, d) in &mut self.disks {
            d.submit()?;
        }
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<Completed>) {
        // One reset of the shared notifier, then every ring: no completion is missed.
        let _ = self.notifier.read();
        let mut completions = Vec::new();
        for (_, d) in &mut self.disks {
            d.reap(&mut completions);
        }
        self.complete_all(completions, done);
    }

    fn drain(&mut self, done: &mut Vec<Completed>) -> io::Result<()> {
        while self.in_flight() > 0 {
            let mut completions = Vec::new();
            for (_, d) in &mut self.disks {
                d.drain(&mut completions)?;
            }
            self.complete_all(completions, done);
        }
        Ok(())
    }

    /// Takes the device's LUN table over: opens rings on added LUNs, completes what is in
    /// flight on removed ones and closes their rings.
    fn refresh(&mut self, done: &mut Vec<Completed>) {
        let table = self.device.luns();
        if Arc::ptr_eq(&table, &self.table) {
            return;
        }
        for slot in table.iter() {
            if self.ring(slot.id()).is_none() {
                match slot.open_ring(&self.notifier) {
                    Ok(ring) => self.disks.push((slot.id(), ring)),
                    Err(e) => {
                        tracing::error!(lun = slot.id(), "cannot open a ring on the new LUN: {e}")
                    }
                }
            }
        }
        let mut kept = Vec::with_capacity(self.disks.len());
        for (id, mut ring) in std::mem::take(&mut self.disks) {
            if table.find(id).is_some() {
                kept.push((id, ring));
                continue;
            }
            let mut completions = Vec::new();
            while ring.in_flight() > 0 {
                if let Err(e) = ring.drain(&mut completions) {
                    tracing::error!(lun = id, "draining the removed LUN failed: {e}");
                    break;
                }
            }
            self.complete_all(completions, done);
        }
        self.disks = kept;
        // Counter slots follow the LUNs: a removed LUN's series go, an added one's start.
        for slot in self.table.iter() {
            if table.find(slot.id()).is_none() {
                self.stats.remove_lun(slot.id());
            }
        }
        for slot in table.iter() {
            if self.table.find(slot.id()).is_none() {
                self.stats.add_lun(slot.id());
            }
        }
        self.lun_stats = self.stats.luns();
        self.table = table;
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.notifier.as_raw_fd())
    }

    fn stats(&self) -> Option<Arc<QueueStats>> {
        Some(Arc::clone(&self.stats))
    }

    fn published(&mut self) {
        for lun in self.unpublished.drain(..) {
            lun.published();
        }
    }
}
