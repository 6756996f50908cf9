//! The virtio-scsi device ([`ScsiDevice`]): its LUN table, config space (virtio 1.2
//! §5.6.4), unit attentions, the events it queues, and the wait of task management
//! functions for the I/O they affect.
//!
//! A LUN whose capacity grows ([`ScsiDevice::grow_lun`]) reports CAPACITY DATA HAS CHANGED
//! as a unit attention, after any other pending one, and with VIRTIO_SCSI_F_CHANGE as a
//! parameter-change event too.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::emulation::{Lun, MAX_TRANSFER_BLOCKS};
use super::events::{
    event_lun, PendingEvents, EVENT_SIZE, VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_EVT_RESET_RESCAN, VIRTIO_SCSI_T_PARAM_CHANGE, VIRTIO_SCSI_T_TRANSPORT_RESET,
};
use super::luns::{Idle, LunSlot, LunTable, RingFactory};
use super::sense::Sense;
use super::wire::{CDB_SIZE, CONFIG_SPACE_SIZE, SENSE_SIZE};
use crate::device::{ConfigWriteError, VirtioDevice};
use crate::disk::DiskInfo;

/// How long an abort or reset waits for the I/O it affects, unless set otherwise.
const DEFAULT_TMF_TIMEOUT: Duration = Duration::from_secs(30);

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

/// [`ScsiDevice::add_lun`] with the id of a LUN the device has.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("LUN {0} exists")]
pub struct LunExists(pub u16);

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
    /// Signalled whenever a LUN's last request in flight is published: what a TMF waits
    /// on.
    idle: Arc<Idle>,
    /// How long a TMF waits for them, in milliseconds, before it answers FAILURE.
    tmf_timeout_ms: AtomicU64,
}

impl ScsiDevice {
    /// A device with these LUNs (sorted by id here) and `request_queues` request queues.
    pub fn new(luns: Vec<ScsiLun>, request_queues: u16, queue_size: u16) -> io::Result<Self> {
        let idle = Arc::new(Idle::default());
        let slots = luns
            .into_iter()
            .map(|lun| Arc::new(LunSlot::new(lun, None, Arc::clone(&idle))))
            .collect();
        Ok(ScsiDevice {
            idle,
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
        self.idle.wait(Instant::now() + timeout, || {
            luns.iter().all(|l| l.busy() == 0)
        })
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
    pub fn add_lun(&self, lun: ScsiLun, open_ring: RingFactory) -> Result<(), LunExists> {
        let id = lun.id;
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let new = table
            .with(Arc::new(LunSlot::new(
                lun,
                Some(open_ring),
                Arc::clone(&self.idle),
            )))
            .ok_or(LunExists(id))?;
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
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        let current = self.config_bytes();
        let (start, end) = (offset as usize, offset as usize + data.len());
        if start < 20 || end > 28 || current[start..end] != *data {
            return Err(ConfigWriteError::UnsupportedSize {
                offset,
                len: data.len(),
                sense_size: SENSE_SIZE,
                cdb_size: CDB_SIZE,
            });
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
