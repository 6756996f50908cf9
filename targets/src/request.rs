//! The request layer shared by virtio-blk and virtio-scsi: requests with disk I/O in flight,
//! from the moment a device hands their [`DiskOp`]s to a disk queue until the device has
//! written their response.
//!
//! [`IoQueue`] is one virtqueue's part of it: its disk rings (one per LUN, signalling one
//! eventfd), the one in-flight table of requests (a [`Slab`], whose key travels with each
//! operation as its token), reaping and draining, and counting. A device describes a
//! request by what it must remember to answer it (a [`Pending`]: where the status or
//! response goes, bounce targets...) and its operations, which own their buffers
//! ([`crate::iobuf::IoBuf`]); when the last operation completes, [`Pending::finish`] gets
//! the outcome and the buffers back and writes the answer.
//!
//! [`DeviceQueue`] puts a device's request handling ([`IoDevice`]: virtio-blk's
//! `BlkRequests`, virtio-scsi's `ScsiRequests`) together with its `IoQueue` and is the
//! queue's one `QueueHandler` implementation: submitting, reaping, draining and publishing
//! are written once.
//!
//! Counting happens in one place, [`Accounting`]: requests answered at once and requests
//! finished after I/O both end in [`Accounting::record`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::DescriptorChain;
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{Chain, Memory};
use crate::device::{Completed, QueueHandler};
use crate::disk::{DiskCompletion, DiskOp, DiskQueue};
use crate::guest::GuestRam;
use crate::iobuf::IoBuf;
use crate::slab::Slab;
use crate::stats::QueueStats;
use crate::stats::{Failure, LunStats, Op};

/// How one request counts: its LUN's counters (if the device has the LUN), its op, the
/// bytes it moves or covers, and when its chain was popped (latency).
#[derive(Debug, Clone)]
pub(crate) struct Accounting {
    pub(crate) stats: Option<Arc<LunStats>>,
    pub(crate) op: Op,
    pub(crate) bytes: u64,
    pub(crate) started: Instant,
}

impl Accounting {
    /// Counts the request as answered: `failure` is why it failed, `sense_key` the key of
    /// a SCSI CHECK CONDITION.
    pub(crate) fn record(&self, failure: Option<Failure>, sense_key: Option<u8>) {
        let Some(stats) = &self.stats else {
            return;
        };
        if let Some(key) = sense_key {
            stats.check_condition(key);
        }
        stats.record(self.op, self.bytes, self.started, failure);
    }
}

/// A request's answer, as the transport and the counters see it.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// What goes on the used ring.
    pub(crate) completed: Completed,
    /// Why it failed, if it did (metric label `reason`).
    pub(crate) failure: Option<Failure>,
    /// SCSI: the sense key of a CHECK CONDITION.
    pub(crate) sense_key: Option<u8>,
}

/// How a request's disk operations ended.
#[derive(Debug)]
pub struct IoOutcome {
    /// The first failure, as `-errno`: a failed operation, one that moved fewer bytes than
    /// asked (`-EIO`), or one that could not be queued (`-EAGAIN`). `None` if every
    /// operation succeeded in full.
    pub(crate) error: Option<i32>,
    /// The buffer of the first operation, handed back (a bounced read's data, a
    /// compare's).
    pub(crate) buf: Option<IoBuf>,
}

/// What a device remembers of a request whose disk I/O runs.
pub trait Pending: Send {
    /// Kept after the answer until the transport published it (SCSI: the LUN, whose
    /// in-flight count a TMF waits on).
    type Receipt: Send;

    /// Writes the answer of the request whose operations ended with `outcome`.
    fn finish(self, outcome: IoOutcome) -> (Answer, Self::Receipt);
}

/// A request as the transport popped it.
pub struct Popped<'a> {
    /// Its descriptor chain, split into readable and writable bytes.
    pub(crate) chain: Chain,
    /// When it was popped (request latency).
    pub(crate) started: Instant,
    /// The guest memory it is in.
    pub(crate) mem: &'a GuestRam,
}

/// A device's request handling on one virtqueue whose requests run on an [`IoQueue`]
/// ([`DeviceQueue`] puts the two together).
pub trait IoDevice: Send {
    /// What the device remembers of a request in flight.
    type Request: Pending;
    /// Handles one request: starts its disk I/O on `io`, or answers it into `done`.
    fn handle(&mut self, io: &mut IoQueue<Self::Request>, req: Popped, done: &mut Vec<Completed>);
    /// An answer was published on the used ring.
    fn published(_receipt: <Self::Request as Pending>::Receipt) {}
    /// See [`QueueHandler::refresh`].
    fn refresh(&mut self, _io: &mut IoQueue<Self::Request>, _done: &mut Vec<Completed>) {}
}

/// One virtqueue of a device built on the request layer: the device's request handling,
/// the queue's requests in flight and its counters. Submitting, reaping, draining and
/// publishing are written here once, for both devices.
pub struct DeviceQueue<D: IoDevice> {
    pub(crate) device: D,
    pub(crate) io: IoQueue<D::Request>,
    stats: Arc<QueueStats>,
}

impl<D: IoDevice> DeviceQueue<D> {
    pub(crate) fn from_parts(device: D, io: IoQueue<D::Request>, stats: Arc<QueueStats>) -> Self {
        DeviceQueue { device, io, stats }
    }

    /// Counters of this queue (shared with the metrics endpoint).
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Requests submitted to the disk and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }
}

impl<D: IoDevice> QueueHandler for DeviceQueue<D> {
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    ) {
        let req = Popped {
            started: Instant::now(),
            chain: Chain::collect(chain),
            mem,
        };
        self.device.handle(&mut self.io, req, done);
    }

    fn submit(&mut self) -> io::Result<()> {
        self.io.submit()
    }

    fn reap(&mut self, done: &mut Vec<Completed>) {
        self.io.reap(done);
    }

    fn drain(&mut self, done: &mut Vec<Completed>) -> io::Result<()> {
        self.io.drain(done)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.io.completion_fd()
    }

    fn polls(&self) -> bool {
        true
    }

    fn poll_ready(&mut self) -> bool {
        self.io.rings.iter_mut().any(|(_, ring)| ring.ready())
    }

    fn set_completion_notify(&mut self, enabled: bool) {
        for (_, ring) in &mut self.io.rings {
            ring.set_notify(enabled);
        }
        if enabled {
            // As each ring does with an eventfd of its own (`DiskQueue::set_notify`).
            if let Some(notifier) = &self.io.notifier {
                let _ = notifier.read();
            }
        }
    }

    fn published(&mut self) {
        self.io.published().for_each(D::published);
    }

    fn refresh(&mut self, done: &mut Vec<Completed>) {
        self.device.refresh(&mut self.io, done);
    }

    fn stats(&self) -> Option<Arc<QueueStats>> {
        Some(Arc::clone(&self.stats))
    }
}

/// A request in the in-flight table.
struct Entry<P> {
    request: P,
    accounting: Accounting,
    /// Operations not yet completed.
    remaining: usize,
    error: Option<i32>,
    /// The first operation's buffer, once it completed.
    first_buf: Option<IoBuf>,
}

/// The bits of a token that hold the request's key; the bits above hold the operation's
/// index within the request.
const KEY_BITS: u32 = 32;

/// One virtqueue's requests in flight and the disk rings they run on.
pub struct IoQueue<P: Pending> {
    requests: Slab<Entry<P>>,
    /// The rings, by LUN (virtio-blk: one, LUN 0).
    rings: Vec<(u16, Box<dyn DiskQueue>)>,
    /// The eventfd every ring signals, reset once before reaping them all; `None` when
    /// the one ring resets its own.
    notifier: Option<EventFd>,
    /// Answered, not yet published by the transport.
    receipts: Vec<P::Receipt>,
    scratch: Vec<DiskCompletion>,
}

impl<P: Pending> IoQueue<P> {
    /// One ring with an eventfd of its own (virtio-blk).
    pub(crate) fn single(ring: Box<dyn DiskQueue>) -> Self {
        IoQueue {
            requests: Slab::default(),
            rings: vec![(0, ring)],
            notifier: None,
            receipts: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Rings that all signal `notifier` (virtio-scsi, one per LUN).
    pub(crate) fn shared(notifier: EventFd, rings: Vec<(u16, Box<dyn DiskQueue>)>) -> Self {
        IoQueue {
            requests: Slab::default(),
            rings,
            notifier: Some(notifier),
            receipts: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The eventfd the rings signal (for a new ring to signal too).
    pub(crate) fn notifier(&self) -> Option<&EventFd> {
        self.notifier.as_ref()
    }

    /// Whether there is a ring for `lun`.
    pub(crate) fn has_ring(&self, lun: u16) -> bool {
        self.rings.iter().any(|(id, _)| *id == lun)
    }

    /// Adds the ring of a new LUN.
    pub(crate) fn add_ring(&mut self, lun: u16, ring: Box<dyn DiskQueue>) {
        self.rings.push((lun, ring));
    }

    /// Removes the rings of LUNs `keep` rejects, completing what they have in flight into
    /// `done`.
    pub(crate) fn retain_rings(&mut self, keep: impl Fn(u16) -> bool, done: &mut Vec<Completed>) {
        let mut kept = Vec::with_capacity(self.rings.len());
        let mut completions = Vec::new();
        for (id, mut ring) in std::mem::take(&mut self.rings) {
            if keep(id) {
                kept.push((id, ring));
                continue;
            }
            while ring.in_flight() > 0 {
                if let Err(e) = ring.drain(&mut completions) {
                    tracing::error!(lun = id, "draining the removed LUN failed: {e}");
                    break;
                }
            }
        }
        self.rings = kept;
        self.complete(&mut completions, done);
    }

    /// Requests with disk I/O in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Readable when completions are ready.
    pub(crate) fn completion_fd(&self) -> Option<RawFd> {
        match &self.notifier {
            Some(n) => Some(n.as_raw_fd()),
            None => self.rings.first().map(|(_, r)| r.completion_fd()),
        }
    }

    /// Queues `ops` (at least one) on LUN `lun`'s ring for `request`, which is answered
    /// once they all completed. If not even the first can be queued (no ring, ring full),
    /// the request is handed back to be answered at once; operations after a queued one
    /// that cannot be queued fail the request (`-EAGAIN`) when the queued ones completed.
    pub(crate) fn start(
        &mut self,
        lun: u16,
        request: P,
        ops: impl IntoIterator<Item = DiskOp>,
        accounting: Accounting,
    ) -> Result<(), P> {
        let Some(ring) = self
            .rings
            .iter_mut()
            .find(|(id, _)| *id == lun)
            .map(|(_, r)| r)
        else {
            tracing::error!(lun, "no ring for the LUN on this queue");
            return Err(request);
        };
        let key = self.requests.insert(Entry {
            request,
            accounting,
            remaining: 0,
            error: None,
            first_buf: None,
        });
        let mut pushed = 0;
        let mut refused = false;
        for (index, op) in ops.into_iter().enumerate() {
            let token = key as u64 | (index as u64) << KEY_BITS;
            if let Err(e) = ring.push(op, token) {
                tracing::warn!("cannot queue disk I/O: {e}");
                refused = true;
                break;
            }
            pushed += 1;
        }
        let Some(entry) = self.requests.get_mut(key) else {
            return Ok(());
        };
        if pushed == 0 {
            return match self.requests.remove(key) {
                Some(entry) => Err(entry.request),
                None => Ok(()),
            };
        }
        entry.remaining = pushed;
        if refused {
            entry.error = Some(-libc::EAGAIN);
        }
        if let Some(stats) = &entry.accounting.stats {
            stats.started_io();
        }
        Ok(())
    }

    /// Hands queued operations of every ring to the kernel.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        for (_, ring) in &mut self.rings {
            ring.submit()?;
        }
        Ok(())
    }

    /// Answers the requests whose operations all completed, into `done`.
    pub(crate) fn reap(&mut self, done: &mut Vec<Completed>) {
        // One reset of a shared notifier, then every ring: no completion is missed. Reset
        // while the worker polls too: an engine that keeps signalling (qcow2) would
        // otherwise leave it readable, and `DiskQueue::ready` says "ready" for ever.
        if let Some(notifier) = &self.notifier {
            let _ = notifier.read();
        }
        let mut completions = std::mem::take(&mut self.scratch);
        for (_, ring) in &mut self.rings {
            ring.reap(&mut completions);
        }
        self.complete(&mut completions, done);
        self.scratch = completions;
    }

    /// Waits for every request in flight and answers it into `done`.
    pub(crate) fn drain(&mut self, done: &mut Vec<Completed>) -> io::Result<()> {
        while self.in_flight() > 0 {
            let mut completions = Vec::new();
            for (_, ring) in &mut self.rings {
                ring.drain(&mut completions)?;
            }
            if completions.is_empty() {
                // Nothing left on any ring, yet requests in flight: their rings are gone.
                break;
            }
            self.complete(&mut completions, done);
        }
        Ok(())
    }

    /// The receipts of answers the transport has now published.
    pub(crate) fn published(&mut self) -> std::vec::Drain<'_, P::Receipt> {
        self.receipts.drain(..)
    }

    fn complete(&mut self, completions: &mut Vec<DiskCompletion>, done: &mut Vec<Completed>) {
        for c in completions.drain(..) {
            let key = (c.token & ((1 << KEY_BITS) - 1)) as usize;
            let index = (c.token >> KEY_BITS) as usize;
            let Some(entry) = self.requests.get_mut(key) else {
                tracing::error!(token = c.token, "completion for an unknown request");
                continue;
            };
            // A read or write succeeds only in full: its buffer comes back with it, and
            // its length is what the operation had to move.
            let full = c.buf.as_ref().is_none_or(|b| c.result as usize == b.len());
            if (c.result < 0 || !full) && entry.error.is_none() {
                entry.error = Some(if c.result < 0 { c.result } else { -libc::EIO });
            }
            if index == 0 {
                entry.first_buf = c.buf;
            }
            entry.remaining = entry.remaining.saturating_sub(1);
            if entry.remaining > 0 {
                continue;
            }
            let Some(entry) = self.requests.remove(key) else {
                continue;
            };
            if let Some(stats) = &entry.accounting.stats {
                stats.finished_io();
            }
            let (answer, receipt) = entry.request.finish(IoOutcome {
                error: entry.error,
                buf: entry.first_buf,
            });
            entry.accounting.record(answer.failure, answer.sense_key);
            self.receipts.push(receipt);
            done.push(answer.completed);
        }
    }
}
