//! The vhost-user backend of every export: glue between vhost-user-backend's vring threads
//! and a `targets` device (virtio-blk or virtio-scsi).
//!
//! Queue *i* is served by worker thread *i* (`queues_per_thread`), which owns queue *i*'s
//! [`QueueHandler`] and its io_uring(s). A queue's completion eventfd is registered in that
//! thread's epoll loop as [`completion_event`], so completions arrive as events on the
//! thread that submitted them; no lock is shared between queues on the I/O path. The
//! `Mutex` around each worker is only contended by the control path (GET_VRING_BASE drain,
//! disconnect). GET_VRING_BASE can stop a ring between two of its worker's pops, so a worker
//! checks that its ring is started and touches it in one hold of the vring's lock
//! (`if_started`); a ring that is stopped, or whose avail ring cannot be read (an index more
//! than a ring ahead, an entry outside guest memory), ends the worker's pass.
//!
//! Per-connection resources end with the connection ([`VirtioBackend::end_session`]): the
//! vrings, the guest memory mapping and the exit-event fds vhost-user-backend leaves open.
//!
//! Each worker also counts its queue's kicks (a vring event: [`VirtioBackend::handle_event`]
//! calling `process_queue`) and notifications (used-ring signals in `Worker::publish`) in the
//! queue's own [`QueueStats`], which the metrics collector reads without this lock.
//!
//! With INFLIGHT_SHMFD negotiated, each worker records the chains it accepts in its region
//! of the frontend's inflight area and clears them as they go on the used ring; a worker
//! given a region re-runs what it holds first (`crate::inflight`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use targets::blk::Memory;
use targets::device::{Completed, QueueHandler, VirtioDevice};
use targets::guest::GuestRam;
use targets::stats::{bump, QueueStats};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::inflight::{self, InflightArea, InflightQueue};
use crate::metrics::ConnectionStats;
use crate::poll::Poller;
use crate::vring::SessionVring;

/// The vring type of every export.
type Mem = GuestMemoryAtomic<Memory>;
type Vring = SessionVring<Mem>;

/// Largest vhost-user config space (VHOST_USER_CONFIG_SIZE).
const MAX_CONFIG_READ: usize = 256;

/// One queue's handler and the vring it completes into.
struct Worker {
    queue: Box<dyn QueueHandler>,
    /// The vring of the current connection, known from its first event.
    vring: Option<Vring>,
    done: Vec<Completed>,
    /// The queue's counters (kicks and notifications are counted here).
    stats: Option<Arc<QueueStats>>,
    /// Busy-polling state, with the export's `poll:`.
    poller: Option<Poller>,
    /// The queue's region of the frontend's inflight area (INFLIGHT_SHMFD), if any.
    inflight: Option<InflightQueue>,
    /// The region was (re)installed: re-run what it holds before popping new chains.
    recover_inflight: bool,
    /// The avail ring could not be read the last time (a broken driver: logged once, when
    /// it starts).
    ring_fault: bool,
}

impl Worker {
    /// Hands queued disk I/O to the kernel, logging a failure.
    fn submit(&mut self) {
        if let Err(e) = self.queue.submit() {
            tracing::error!("submitting I/O failed: {e}");
        }
    }

    /// Puts finished requests on the used ring and notifies the driver if it wants it.
    fn publish(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let Some(vring) = &self.vring else {
            self.done.clear();
            self.queue.published();
            return;
        };
        let heads: Vec<u16> = match &self.inflight {
            Some(inflight) => {
                let heads: Vec<u16> = self.done.iter().map(|c| c.head).collect();
                inflight.prepare_batch(&heads);
                heads
            }
            None => Vec::new(),
        };
        // One lock of the vring for the whole batch.
        let needs_notification = {
            let mut state = vring.get_mut();
            for c in self.done.drain(..) {
                if let Err(e) = state.add_used(c.head, c.used_len) {
                    tracing::warn!("cannot add to the used ring: {e:?}");
                }
            }
            if let Some(inflight) = &self.inflight {
                inflight.finish_batch(&heads, state.get_queue().next_used());
            }
            state.needs_notification()
        };
        match needs_notification {
            Ok(false) => {}
            Ok(true) | Err(_) => match vring.signal_used_queue() {
                Ok(()) => {
                    if let Some(stats) = &self.stats {
                        bump(&stats.notifications, 1);
                    }
                }
                Err(e) => tracing::debug!("cannot signal the used ring: {e}"),
            },
        }
        self.queue.published();
    }

    /// Waits for all in-flight I/O and completes it (the vring is being stopped). Returns
    /// how many requests that completed.
    fn drain(&mut self) -> usize {
        if let Err(e) = self.queue.drain(&mut self.done) {
            tracing::error!("draining in-flight I/O failed: {e}");
        }
        let completed = self.done.len();
        self.publish();
        completed
    }

    /// Re-runs the requests the inflight region holds (accepted by an earlier daemon or
    /// connection, never completed), oldest first, and resumes the ring after them.
    fn resubmit_inflight(&mut self, index: usize, vring: &Vring, mem: &GuestRam) {
        self.recover_inflight = false;
        let Some(inflight) = self.inflight.as_mut() else {
            return;
        };
        let used = match vring.queue_used_idx() {
            Ok(used) => used,
            Err(e) => {
                tracing::warn!("cannot read the used index to recover in-flight requests: {e}");
                return;
            }
        };
        let heads = inflight.recover(used);
        vring.resume(used.wrapping_add(heads.len() as u16), used);
        if !heads.is_empty() {
            tracing::info!(
                queue = index,
                requests = heads.len(),
                "re-running requests in flight at the last disconnect"
            );
        }
        let state = vring.get_ref().get_queue().state();
        for head in heads {
            let (queue, done) = (&mut self.queue, &mut self.done);
            let rerun = inflight::with_chain(mem, state, head, |chain| {
                queue.resubmit_chain(chain, mem, done)
            });
            if let Err(e) = rerun {
                tracing::error!(head, "cannot re-run an in-flight request: {e}");
            }
        }
    }
}

/// An export's backend, shared (`Arc`) by successive connections.
pub struct VirtioBackend {
    device: Arc<dyn VirtioDevice>,
    workers: Vec<Mutex<Worker>>,
    memory: RwLock<GuestMemoryAtomic<Memory>>,
    event_idx: AtomicBool,
    /// Bumped whenever the frontend's memory table changes, so a queue that took a
    /// snapshot of it notices a newer one.
    memory_generation: AtomicU64,
    /// The export is stopping: kicks no longer pop requests.
    quiesced: AtomicBool,
    /// The kernel can pin the frontend's memory for direct I/O (false through a
    /// virtio-vhost-user device, where it is a PCI BAR mapping).
    pinnable: AtomicBool,
    /// Consumer ends of the exit events handed to vhost-user-backend for the current
    /// connection. vhost-user-backend 0.24 registers each in its epoll with `into_raw_fd`
    /// and never closes it (one eventfd per worker thread per connection), so
    /// [`VirtioBackend::end_session`] closes them once the connection's threads are joined.
    exit_consumers: Mutex<Vec<RawFd>>,
    /// Each queue's counters, by queue index (`None` for a queue that keeps none).
    stats: Vec<Option<Arc<QueueStats>>>,
    /// Frontend connections of the export.
    connections: Arc<ConnectionStats>,
}

/// Epoll data value of the per-thread io_uring completion eventfd (above the vring range).
pub fn completion_event(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

impl VirtioBackend {
    /// A backend over `device`, with one queue handler per virtqueue.
    pub fn new(
        device: Arc<dyn VirtioDevice>,
        queues: Vec<Box<dyn QueueHandler>>,
        poll: Option<config::Poll>,
    ) -> Self {
        let stats: Vec<_> = queues.iter().map(|q| q.stats()).collect();
        VirtioBackend {
            device,
            workers: queues
                .into_iter()
                .zip(&stats)
                .map(|(queue, stats)| {
                    // Only queues with disk I/O poll (not virtio-scsi's control and event
                    // queues).
                    let poller = poll.filter(|_| queue.polls()).map(Poller::new);
                    Mutex::new(Worker {
                        queue,
                        vring: None,
                        done: Vec::new(),
                        stats: stats.clone(),
                        poller,
                        inflight: None,
                        recover_inflight: false,
                        ring_fault: false,
                    })
                })
                .collect(),
            memory: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            memory_generation: AtomicU64::new(0),
            quiesced: AtomicBool::new(false),
            pinnable: AtomicBool::new(true),
            exit_consumers: Mutex::new(Vec::new()),
            stats,
            connections: Arc::new(ConnectionStats::default()),
        }
    }

    /// The device (LUNs and capacities, for the metrics collector).
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// Each queue's counters, by queue index.
    pub fn queue_stats(&self) -> &[Option<Arc<QueueStats>>] {
        &self.stats
    }

    /// Frontend connection counters of the export.
    pub fn connections(&self) -> &Arc<ConnectionStats> {
        &self.connections
    }

    fn worker(&self, index: usize) -> Option<MutexGuard<'_, Worker>> {
        self.workers
            .get(index)
            .map(|w| w.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The completion eventfd of queue `index`, if it does disk I/O.
    pub fn completion_fd(&self, index: usize) -> Option<std::os::fd::RawFd> {
        self.worker(index).and_then(|w| w.queue.completion_fd())
    }

    /// A new frontend session: the device may need to tell the driver (unit attentions).
    pub fn session_started(&self) {
        self.device.session_started();
    }

    /// Completes all in-flight I/O and forgets the connection's vrings. Request queues go
    /// first: a virtio-scsi TMF on the control queue (queue 0) may be waiting for them.
    pub fn disconnected(&self) {
        for i in (0..self.workers.len()).rev() {
            if let Some(mut w) = self.worker(i) {
                w.drain();
                w.vring = None;
                w.ring_fault = false;
            }
        }
    }

    /// Takes no new request from the rings from now on (the export is stopping); requests
    /// already accepted still complete.
    pub fn quiesce(&self) {
        self.quiesced.store(true, Ordering::SeqCst);
    }

    /// Completes every accepted request onto its used ring, notifying the driver, while the
    /// frontend stays connected. Returns how many were still in flight.
    pub fn complete_accepted(&self) -> usize {
        let mut completed = 0;
        for i in (0..self.workers.len()).rev() {
            if let Some(mut w) = self.worker(i) {
                completed += w.drain();
            }
        }
        completed
    }

    /// Lets every queue take a change of the device over (LUNs added or removed), each
    /// under its worker's lock, and publishes what that completed.
    pub fn refresh_queues(&self) {
        for i in 0..self.workers.len() {
            if let Some(mut w) = self.worker(i) {
                let w = &mut *w;
                w.queue.refresh(&mut w.done);
                w.publish();
            }
        }
    }

    /// Ends a connection whose `VhostUserDaemon` has been dropped (its worker threads
    /// joined): completes in-flight I/O, unmaps the frontend's memory and closes the fds
    /// vhost-user-backend left open, so a connection leaves nothing behind.
    pub fn end_session(&self) {
        self.disconnected();
        self.set_inflight(None);
        *self.memory.write().unwrap_or_else(|p| p.into_inner()) =
            GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let fds = std::mem::take(
            &mut *self
                .exit_consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for fd in fds {
            // SAFETY: `fd` is the consumer end of an exit event created by `exit_event`;
            // vhost-user-backend 0.24 (pinned exactly in Cargo.toml) took it with
            // `into_raw_fd`, registered it in its epoll and never closes it. The connection's
            // daemon is dropped, so its worker threads are joined and its epoll is closed:
            // nothing else refers to this fd number, and it is closed exactly once here.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }

    /// Whether the kernel can pin the memory the transport maps for direct I/O (set once,
    /// before the first connection, by the transport that serves the export).
    pub fn set_guest_memory_pinnable(&self, pinnable: bool) {
        self.pinnable.store(pinnable, Ordering::Relaxed);
    }

    /// Installs the frontend's inflight area (SET_INFLIGHT_FD), or removes it (`None`): each
    /// queue records its requests in its region from now on and, on its next kick, first
    /// re-runs what the region holds.
    pub fn set_inflight(&self, area: Option<&InflightArea>) {
        for i in 0..self.workers.len() {
            if let Some(mut w) = self.worker(i) {
                w.inflight = area.and_then(|a| a.queue(i));
                w.recover_inflight = w.inflight.is_some();
            }
        }
    }

    /// The guest memory table now, as the transport maps it.
    fn current_memory(&self) -> GuestRam {
        let map = self
            .memory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .memory()
            .into_inner();
        if self.pinnable.load(Ordering::Relaxed) {
            GuestRam::new(map)
        } else {
            GuestRam::unpinnable(map)
        }
    }

    fn process_queue(&self, index: usize, vring: &Vring) -> io::Result<()> {
        let Some(mut worker) = self.worker(index) else {
            return Ok(());
        };
        if let Some(stats) = &worker.stats {
            bump(&stats.kicks, 1);
        }
        if !vring.get_ref().get_queue().ready() || self.quiesced.load(Ordering::SeqCst) {
            return Ok(());
        }
        if worker.vring.is_none() {
            worker.vring = Some(vring.clone());
        }
        let worker = &mut *worker;
        if worker.recover_inflight {
            worker.resubmit_inflight(index, vring, &self.current_memory());
        }
        if worker.poller.is_some() {
            return self.serve_polling(index, worker, Some(vring));
        }
        let mut mem = MemoryView::new(self);
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                match if_started(vring, |state| state.disable_notification()) {
                    Some(done) => done.map_err(queue_error)?,
                    None => break,
                }
            }
            if !self.take_available(index, worker, vring, &mut mem) || !event_idx {
                break;
            }
            // Notifications back on, then one more look for chains made available meanwhile.
            let more = if_started(vring, |state| state.enable_notification());
            if !more.transpose().map_err(queue_error)?.unwrap_or(false) {
                break;
            }
        }
        Ok(())
    }

    /// Pops every chain available on `vring` into the queue's handler, hands the disk I/O
    /// to the kernel and publishes what completed at once. Returns whether the ring can be
    /// served on: false once it is stopped (GET_VRING_BASE), or when its avail ring cannot be
    /// read (logged once, when that starts; notifications are turned back on so the driver's
    /// next kick comes), and then the caller leaves the ring until its next event.
    fn take_available(
        &self,
        index: usize,
        worker: &mut Worker,
        vring: &Vring,
        mem: &mut MemoryView,
    ) -> bool {
        let mut open = true;
        loop {
            let popped = if_started(vring, |state| {
                let queue = state.get_queue_mut();
                next_avail_entry_readable(queue, &mem.ram)?;
                queue
                    .iter(&*mem.ram)
                    .map(|mut avail| avail.next())
                    .map_err(|e| e.to_string())
            });
            let chain = match popped {
                Some(Ok(Some(chain))) => chain,
                Some(Ok(None)) => break,
                Some(Err(e)) => {
                    // The ring may be in memory the frontend added since the view's copy.
                    if let Some((ram, generation)) = mem.newer(self) {
                        *mem = MemoryView { ram, generation };
                        continue;
                    }
                    if !std::mem::replace(&mut worker.ring_fault, true) {
                        tracing::warn!(
                            queue = index,
                            "cannot read the avail ring, the queue takes no requests until \
                             the driver fixes it or sets the ring up again: {e}"
                        );
                    }
                    // Notifications may be suppressed (NO_NOTIFY, a polling pass): the
                    // driver kicks again.
                    let _ = if_started(vring, |state| state.enable_notification());
                    open = false;
                    break;
                }
                None => {
                    open = false;
                    break;
                }
            };
            worker.ring_fault = false;
            if let Some(inflight) = worker.inflight.as_mut() {
                inflight.begin(chain.head_index());
            }
            // The frontend may have added memory (ADD_MEM_REG, SET_MEM_TABLE) after the
            // view took its snapshot and before it made this chain available: the chain's
            // buffers are then only in the new table. Making the chain visible came after
            // the table change (the handler bumps the generation before it acknowledges),
            // so checking after the pop is enough.
            match mem.newer(self) {
                None => worker.queue.handle_chain(chain, &mem.ram, &mut worker.done),
                Some((fresh, generation)) => {
                    worker.queue.handle_chain(chain, &fresh, &mut worker.done);
                    *mem = MemoryView {
                        ram: fresh,
                        generation,
                    };
                }
            }
        }
        worker.submit();
        // What completed during the submission (page-cache reads, the null engine) goes
        // out with this pass, not after another trip through epoll.
        if worker.queue.poll_ready() {
            worker.queue.reap(&mut worker.done);
        }
        worker.publish();
        open
    }

    fn process_completions(&self, index: usize) -> io::Result<()> {
        let Some(mut worker) = self.worker(index) else {
            return Ok(());
        };
        let worker = &mut *worker;
        // A ring waiting to re-run its inflight requests pops nothing before they are.
        if worker.poller.is_some() && !worker.recover_inflight {
            let vring = worker.vring.clone();
            return self.serve_polling(index, worker, vring.as_ref());
        }
        worker.queue.reap(&mut worker.done);
        // Resubmissions (e.g. a write-zeroes fallback) may have been queued while reaping.
        worker.submit();
        worker.publish();
        Ok(())
    }

    /// Serves the queue with busy-polling (the export's `poll:`): handles what is there,
    /// then keeps checking the avail ring and the disk completions for the poller's window
    /// with guest kicks and completion signals off, and turns them back on only to sleep.
    fn serve_polling(
        &self,
        index: usize,
        worker: &mut Worker,
        vring: Option<&Vring>,
    ) -> io::Result<()> {
        let Some(mut poller) = worker.poller.take() else {
            return Ok(());
        };
        poller.woke(Instant::now());
        let result = self.poll_loop(index, worker, vring, &mut poller);
        worker.poller = Some(poller);
        result
    }

    fn poll_loop(
        &self,
        index: usize,
        worker: &mut Worker,
        vring: Option<&Vring>,
        poller: &mut Poller,
    ) -> io::Result<()> {
        let mut mem = MemoryView::new(self);
        // The ring served: none while the export stops (quiesced), and none from the moment
        // it is stopped (GET_VRING_BASE) or its avail ring cannot be read; disk completions
        // are still reaped and published.
        let mut ring = vring;
        let quiesced = || self.quiesced.load(Ordering::SeqCst);
        // Work that keeps coming keeps the worker polling; it lets go of its lock (the
        // control path waits on it) at least this often, and picks up where it was.
        let began = Instant::now();
        let mut yielding = false;
        loop {
            if let Some(vring) = ring.filter(|_| !quiesced()) {
                match if_started(vring, |state| state.disable_notification()) {
                    Some(done) => done.map_err(queue_error)?,
                    None => ring = None,
                }
            }
            worker.queue.set_completion_notify(false);
            loop {
                if worker.queue.poll_ready() {
                    worker.queue.reap(&mut worker.done);
                }
                match ring.filter(|_| !quiesced()) {
                    Some(vring) => {
                        if !self.take_available(index, worker, vring, &mut mem) {
                            ring = None;
                        }
                    }
                    None => {
                        worker.submit();
                        worker.publish();
                    }
                }
                // The window starts even when it is empty: the time until the next work
                // is what adapts it.
                let start = Instant::now();
                poller.start(start);
                let window = poller.window();
                if window.is_zero() {
                    break;
                }
                let found = loop {
                    if worker.queue.poll_ready()
                        || ring.is_some_and(|v| !quiesced() && avail_pending(v, &mem.ram))
                    {
                        break true;
                    }
                    if start.elapsed() >= window {
                        break false;
                    }
                    std::hint::spin_loop();
                };
                if !found {
                    break;
                }
                poller.found();
                if let Some(stats) = &worker.stats {
                    bump(&stats.polled, 1);
                }
                if began.elapsed() >= YIELD_AFTER {
                    yielding = true;
                    break;
                }
            }
            // About to sleep: signals back on, then one more look for what came meanwhile.
            worker.queue.set_completion_notify(true);
            let more = match ring.filter(|_| !quiesced()) {
                Some(vring) => if_started(vring, |state| state.enable_notification())
                    .transpose()
                    .map_err(queue_error)?
                    .unwrap_or(false),
                None => false,
            };
            if yielding {
                // Back through epoll (the queue's own completion eventfd) to the work
                // that is waiting.
                if let Some(fd) = worker.queue.completion_fd() {
                    // SAFETY: `fd` is the queue's live completion eventfd; writing an 8-byte
                    // counter to an eventfd has no other effect.
                    unsafe { libc::eventfd_write(fd, 1) };
                }
                return Ok(());
            }
            if !more && !worker.queue.poll_ready() {
                return Ok(());
            }
        }
    }
}

/// How long a busy-polling worker serves before it lets go of its lock once.
const YIELD_AFTER: std::time::Duration = std::time::Duration::from_millis(2);

/// Runs `f` on `vring`'s state under the ring's lock if the ring is started. GET_VRING_BASE
/// stops a ring by clearing its `ready` under this lock (vhost-user-backend's
/// `get_vring_base`), and from then on the ring is the frontend's again (vhost-user spec,
/// "Ring states": a stopped ring is not processed), so a worker checks and touches the ring
/// in one hold of the lock: `None`, and nothing read or written, once it is stopped.
fn if_started<T>(vring: &Vring, f: impl FnOnce(&mut VringState<Mem>) -> T) -> Option<T> {
    let mut state = vring.get_mut();
    if state.get_queue().ready() {
        Some(f(&mut state))
    } else {
        None
    }
}

/// Checks that the avail ring entry `queue` pops next (virtio 1.2, 2.7.6: `ring[]` after the
/// 4-byte `flags` and `idx`) can be read from `mem`, with the one aligned 2-byte load
/// virtio-queue's `AvailIter` makes. That iterator ends at an entry it cannot read as if the
/// ring were empty, so a ring running out of guest memory, split across two regions or
/// misaligned would look busy for ever (avail.idx ahead). Errors: what could not be read.
fn next_avail_entry_readable(queue: &virtio_queue::Queue, mem: &Memory) -> Result<(), String> {
    let entry = queue
        .next_avail()
        .checked_rem(queue.size())
        .and_then(|slot| GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(slot)));
    match entry {
        Some(at) if mem.load::<u16>(at, Ordering::Acquire).is_ok() => Ok(()),
        _ => Err(format!(
            "avail ring entry for index {} at guest address {:#x} cannot be read",
            queue.next_avail(),
            entry.map_or(u64::MAX, |e| e.raw_value())
        )),
    }
}

/// Whether the driver made chains available that the device has not popped yet. An avail
/// index more than a ring ahead is a broken driver's, not work: popping refuses it
/// (`InvalidAvailRingIndex`), so counting it would keep a polling worker busy for ever.
fn avail_pending(vring: &Vring, mem: &Memory) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| {
            let pending = idx.0.wrapping_sub(queue.next_avail());
            pending != 0 && pending <= queue.size()
        })
}

/// The guest memory table a worker uses, re-read when the frontend changed it.
struct MemoryView {
    ram: GuestRam,
    generation: u64,
}

impl MemoryView {
    fn new(backend: &VirtioBackend) -> Self {
        let generation = backend.memory_generation.load(Ordering::Acquire);
        MemoryView {
            ram: backend.current_memory(),
            generation,
        }
    }

    /// The current table and its generation, if the frontend changed it since.
    fn newer(&self, backend: &VirtioBackend) -> Option<(GuestRam, u64)> {
        let now = backend.memory_generation.load(Ordering::Acquire);
        (now != self.generation).then(|| (backend.current_memory(), now))
    }
}

fn queue_error(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

impl VhostUserBackend for VirtioBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.max_queue_size())
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.device.offers_config() {
            // A backend channel carries CONFIG_CHANGE_MSG when the config space changes
            // (online resize); the accept loop's relay keeps it (`crate::relay`).
            features | VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ
        } else {
            features
        }
    }

    fn reset_device(&self) {
        self.disconnected();
        self.device.session_started();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        let Some(end) = offset.checked_add(size).filter(|&e| e <= MAX_CONFIG_READ) else {
            tracing::debug!(offset, size, "config read out of range");
            return Vec::new();
        };
        // Fields past the ones we offer read as zero.
        let mut space = self.device.config_space();
        space.resize(MAX_CONFIG_READ, 0);
        space[offset..end].to_vec()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device.write_config(offset, buf).map_err(|e| {
            tracing::debug!("refused config write: {e}");
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Memory>) -> io::Result<()> {
        *self.memory.write().unwrap_or_else(|p| p.into_inner()) = mem;
        self.memory_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, dropping the daemon would join worker threads nothing tells to stop.
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: every accepted request must be on the used ring first. A fault
        // of the ring ends with it (the next set-up is logged anew).
        if let Some(mut w) = self.worker(queue_index as usize) {
            w.drain();
            w.ring_fault = false;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let num_queues = self.workers.len();
        tracing::trace!(device_event, thread_id, "event");
        // Events and `vrings` are local to this thread: with one queue per thread
        // (`queues_per_thread`), local vring 0 is queue `thread_id`.
        let result = match usize::from(device_event) {
            _ if evset != EventSet::IN => {
                Err(io::Error::other(format!("unexpected event set {evset:?}")))
            }
            0 => match vrings.first() {
                Some(vring) => self.process_queue(thread_id, vring),
                None => Ok(()),
            },
            e if e as u64 == completion_event(num_queues) => self.process_completions(thread_id),
            other => Err(io::Error::other(format!("unknown event {other}"))),
        };
        if let Err(e) = &result {
            // vhost-user-backend ends this queue's worker thread on an error, silently
            // until the connection ends: say so now, or a stuck queue has no trace.
            tracing::error!(queue = thread_id, "virtqueue worker stops: {e}");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test, with its message.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::*;

    /// A started queue of 64 entries with its avail ring at `avail`.
    fn queue_with_avail_at(avail: u64) -> Queue {
        let mut queue = Queue::new(64).unwrap();
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(0x800), Some(0));
        queue.set_ready(true);
        queue
    }

    #[test]
    fn an_avail_entry_in_guest_memory_is_readable() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let mut queue = queue_with_avail_at(0x1000);
        assert_eq!(next_avail_entry_readable(&queue, &mem), Ok(()));
        // The last slot, and past it: the index wraps to slot 0.
        queue.set_next_avail(63);
        assert_eq!(next_avail_entry_readable(&queue, &mem), Ok(()));
        queue.set_next_avail(64);
        assert_eq!(next_avail_entry_readable(&queue, &mem), Ok(()));
    }

    #[test]
    fn an_avail_entry_beyond_guest_memory_is_not() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        // idx at 0xffe is in memory, ring[0] at 0x1000 is not.
        let queue = queue_with_avail_at(0xffc);
        let err = next_avail_entry_readable(&queue, &mem).unwrap_err();
        assert!(err.contains("index 0 at guest address 0x1000"), "{err}");
    }

    #[test]
    fn an_avail_entry_split_across_regions_is_not() {
        // Region 0 ends at an odd address: ring[0] at 0x1000 has one byte in each region.
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x1001), (GuestAddress(0x1001), 0x1000)])
            .unwrap();
        let queue = queue_with_avail_at(0xffc);
        // Every byte is in some region, so a range check would let it through ...
        assert!(mem.check_range(GuestAddress(0x1000), 2));
        // ... but virtio-queue's load of the entry fails, and so does the check.
        assert!(next_avail_entry_readable(&queue, &mem).is_err());
    }
}
