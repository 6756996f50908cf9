//! The virtio-scsi event queue (queue 1): events the device queues (LUNs added or removed,
//! capacity changes) wait in a bounded list until the driver posts a buffer for them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::DescriptorChain;

use super::device::ScsiDevice;
use crate::chain::{scatter, total, Chain, Memory, Segment};
use crate::device::{Completed, QueueHandler};
use crate::guest::GuestRam;
use crate::stats::QueueStats;

/// Size of `struct virtio_scsi_event`: event, `lun[8]`, reason.
pub const EVENT_SIZE: usize = 16;
/// Events kept while the driver has no event buffer; beyond that they are dropped and the
/// next one delivered carries VIRTIO_SCSI_T_EVENTS_MISSED.
const MAX_PENDING_EVENTS: usize = 64;
pub(super) const VIRTIO_SCSI_T_TRANSPORT_RESET: u32 = 1;
pub(super) const VIRTIO_SCSI_T_PARAM_CHANGE: u32 = 3;
const VIRTIO_SCSI_T_EVENTS_MISSED: u32 = 0x8000_0000;
pub(super) const VIRTIO_SCSI_EVT_RESET_RESCAN: u32 = 0;
pub(super) const VIRTIO_SCSI_EVT_RESET_REMOVED: u32 = 2;

/// Events waiting for an event-queue buffer (the device's `events`).
#[derive(Debug, Default)]
pub(super) struct PendingEvents {
    queue: std::collections::VecDeque<[u8; EVENT_SIZE]>,
    missed: bool,
}

/// The LUN field of an event (`virtio_scsi_event.lun`) for target 0, as QEMU writes it and
/// REPORT LUNS gives LUNs: peripheral addressing below 256, flat (0x40) from 256. Linux
/// looks the device up by bytes 2..3 as they are, so LUN 1 must not carry the flat-space
/// bit that requests use.
pub fn event_lun(lun: u16) -> [u8; 8] {
    let mut field = [1, 0, 0, lun as u8, 0, 0, 0, 0];
    if lun >= 256 {
        field[2] = 0x40 | ((lun >> 8) as u8 & 0x3f);
    }
    field
}

impl ScsiDevice {
    /// Queues an event for the event queue and wakes its worker.
    pub(super) fn push_event(&self, event: [u8; EVENT_SIZE]) {
        {
            let mut pending = self.events.lock().unwrap_or_else(|p| p.into_inner());
            if pending.queue.len() < MAX_PENDING_EVENTS {
                pending.queue.push_back(event);
            } else {
                pending.missed = true;
            }
        }
        if let Err(e) = self.event_notifier.write(1) {
            tracing::warn!("cannot wake the event queue: {e}");
        }
    }

    /// The next event to deliver, flagged if events were dropped before it.
    fn next_event(&self) -> Option<[u8; EVENT_SIZE]> {
        let mut pending = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut event = match pending.queue.pop_front() {
            Some(e) => e,
            // VIRTIO_SCSI_T_NO_EVENT, to carry the EVENTS_MISSED flag alone.
            None if pending.missed => [0u8; EVENT_SIZE],
            None => return None,
        };
        if std::mem::take(&mut pending.missed) {
            let kind = u32::from_le_bytes([event[0], event[1], event[2], event[3]]);
            event[0..4].copy_from_slice(&(kind | VIRTIO_SCSI_T_EVENTS_MISSED).to_le_bytes());
        }
        Some(event)
    }
}

/// The event queue: the driver's buffers wait here until the device has an event.
pub struct EventQueue {
    device: Arc<ScsiDevice>,
    /// Buffers taken from the ring, waiting for events: head and writable bytes.
    buffers: std::collections::VecDeque<(u16, Vec<Segment>, Arc<Memory>)>,
    /// Kicks and notifications only.
    stats: Arc<QueueStats>,
}

impl EventQueue {
    /// The event queue of `device`.
    pub fn new(device: Arc<ScsiDevice>) -> Self {
        EventQueue {
            device,
            buffers: std::collections::VecDeque::new(),
            stats: Arc::new(QueueStats::without_luns()),
        }
    }

    /// Puts queued events into waiting buffers.
    fn deliver(&mut self, done: &mut Vec<Completed>) {
        while !self.buffers.is_empty() {
            let Some(event) = self.device.next_event() else {
                return;
            };
            if let Some((head, segs, mem)) = self.buffers.pop_front() {
                let used_len = scatter(&mem, &segs, &event).unwrap_or(0) as u32;
                done.push(Completed { head, used_len });
            }
        }
    }
}

impl QueueHandler for EventQueue {
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    ) {
        let Chain { head, writable, .. } = Chain::collect(chain);
        if total(&writable) < EVENT_SIZE {
            tracing::debug!(head, "event buffer too small");
            done.push(Completed { head, used_len: 0 });
            return;
        }
        self.buffers
            .push_back((head, writable, Arc::clone(mem.map())));
        self.deliver(done);
    }

    fn reap(&mut self, done: &mut Vec<Completed>) {
        let _ = self.device.event_notifier.read();
        self.deliver(done);
    }

    /// The ring is stopping: held buffers go back holding VIRTIO_SCSI_T_NO_EVENT.
    fn drain(&mut self, done: &mut Vec<Completed>) -> io::Result<()> {
        for (head, segs, mem) in self.buffers.drain(..) {
            let used_len = scatter(&mem, &segs, &[0u8; EVENT_SIZE]).unwrap_or(0) as u32;
            done.push(Completed { head, used_len });
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.device.event_notifier.as_raw_fd())
    }

    fn stats(&self) -> Option<Arc<QueueStats>> {
        Some(Arc::clone(&self.stats))
    }
}
