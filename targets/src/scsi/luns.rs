//! The LUN table of a virtio-scsi target, which can change while frontends use it.
//!
//! A [`LunTable`] is immutable: adding or removing a LUN builds a new table, which the device
//! publishes, and each request queue takes it over when the control path refreshes that
//! queue under its worker's lock. Requests therefore never look a LUN up under a lock; what
//! a LUN carries for every queue (in-flight count, pending unit attention) lives in its
//! [`LunSlot`], shared by the tables that contain it.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::device::ScsiLun;
use super::sense::Sense;
use crate::disk::DiskQueue;

/// Opens one request queue's ring on a LUN's backing store, signalling the given eventfd
/// on completions.
pub type RingFactory = Box<dyn Fn(&EventFd) -> io::Result<Box<dyn DiskQueue>> + Send + Sync>;

/// Wakes a task management function waiting for LUNs to become idle (no request in flight):
/// signalled by the queue that publishes a LUN's last one.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    lock: Mutex<()>,
    changed: Condvar,
}

impl Idle {
    /// Waits until `idle()` holds, re-checked on every signal; false if it still does not
    /// at `deadline`.
    pub(crate) fn wait(&self, deadline: Instant, idle: impl Fn() -> bool) -> bool {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if idle() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Checked and waited on under the lock that `signal` takes: no signal is lost.
            guard = self
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn signal(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }
}

/// One LUN and the state all queues share for it.
pub struct LunSlot {
    /// The LUN: id, command emulation, disk.
    pub lun: ScsiLun,
    /// Requests accepted for disk I/O whose completion is not on a used ring yet. A TMF
    /// answers only once the requests it affects are done (virtio-scsi 5.6.6.1).
    busy: AtomicU32,
    /// Pending unit attention (SAM-5 5.14).
    unit_attention: Mutex<Option<Sense>>,
    /// Opens a ring for a queue that did not exist when the LUN was added (LUNs added to a
    /// live device); `None` for LUNs whose rings the queues opened at creation.
    open_ring: Option<RingFactory>,
    /// The device's idle signal, raised when `busy` drops to 0.
    idle: Arc<Idle>,
}

impl std::fmt::Debug for LunSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LunSlot")
            .field("id", &self.lun.id)
            .field("busy", &self.busy())
            .finish_non_exhaustive()
    }
}

impl LunSlot {
    /// A slot for `lun`; `open_ring` opens its rings for queues created before it; `idle`
    /// is signalled when its last request in flight is published.
    pub(crate) fn new(lun: ScsiLun, open_ring: Option<RingFactory>, idle: Arc<Idle>) -> Self {
        LunSlot {
            lun,
            busy: AtomicU32::new(0),
            unit_attention: Mutex::new(None),
            open_ring,
            idle,
        }
    }

    /// LUN number.
    pub fn id(&self) -> u16 {
        self.lun.id
    }

    /// Requests with disk I/O not yet on a used ring.
    pub fn busy(&self) -> u32 {
        self.busy.load(Ordering::Acquire)
    }

    pub(crate) fn started(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn published(&self) {
        if self.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.signal();
        }
    }

    /// Raises `sense` as this LUN's unit attention (replacing a pending one).
    pub fn set_unit_attention(&self, sense: Sense) {
        *self
            .unit_attention
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(sense);
    }

    pub(crate) fn take_unit_attention(&self) -> Option<Sense> {
        self.unit_attention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Opens a ring on this LUN for a queue, signalling `notifier`.
    pub(crate) fn open_ring(&self, notifier: &EventFd) -> io::Result<Box<dyn DiskQueue>> {
        match &self.open_ring {
            Some(open) => open(notifier),
            None => Err(io::Error::other(format!(
                "LUN {} has no way to open a ring for a new queue",
                self.lun.id
            ))),
        }
    }
}

/// The LUNs of a target, sorted by id.
#[derive(Debug, Default, Clone)]
pub struct LunTable {
    slots: Vec<Arc<LunSlot>>,
}

impl LunTable {
    /// A table of `slots` (sorted here).
    pub fn new(mut slots: Vec<Arc<LunSlot>>) -> Self {
        slots.sort_by_key(|s| s.id());
        LunTable { slots }
    }

    /// The LUN with number `id`.
    pub fn find(&self, id: u16) -> Option<&Arc<LunSlot>> {
        self.slots
            .binary_search_by_key(&id, |s| s.id())
            .ok()
            .and_then(|i| self.slots.get(i))
    }

    /// Every LUN, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<LunSlot>> {
        self.slots.iter()
    }

    /// Number of LUNs.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True without LUNs.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// LUN numbers, ascending (REPORT LUNS).
    pub fn ids(&self) -> Vec<u16> {
        self.slots.iter().map(|s| s.id()).collect()
    }

    /// This table with `slot` added; `None` if its id is taken.
    pub fn with(&self, slot: Arc<LunSlot>) -> Option<LunTable> {
        if self.find(slot.id()).is_some() {
            return None;
        }
        let mut slots = self.slots.clone();
        slots.push(slot);
        Some(LunTable::new(slots))
    }

    /// This table without LUN `id`, and the slot removed.
    pub fn without(&self, id: u16) -> Option<(LunTable, Arc<LunSlot>)> {
        let removed = Arc::clone(self.find(id)?);
        let slots = self
            .slots
            .iter()
            .filter(|s| s.id() != id)
            .cloned()
            .collect();
        Some((LunTable { slots }, removed))
    }
}
