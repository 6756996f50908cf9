//! A fault-injecting engine for tests (feature `fault-injection`): [`FaultDisk`] wraps
//! another [`Disk`] and, following the rules a test sets through its [`FaultControl`],
//! fails chosen operations with an errno, delays them, or holds them until the test
//! releases them, which reorders completions (hold request A, let B complete, release A).
//! Operations no rule matches go to the wrapped engine unchanged.
//!
//! A held or delayed operation stays owned by the queue (with its buffers) until it is
//! handed to the wrapped engine; draining a queue (and dropping it) releases everything
//! held first, so nothing is lost and no buffer outlives its operation.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue};
use crate::stats::DiskStats;

/// Which operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`DiskOp::Read`].
    Read,
    /// [`DiskOp::Write`].
    Write,
    /// [`DiskOp::Flush`].
    Flush,
    /// [`DiskOp::Discard`].
    Discard,
    /// [`DiskOp::WriteZeroes`].
    WriteZeroes,
}

impl OpKind {
    fn of(op: &DiskOp) -> Self {
        match op {
            DiskOp::Read { .. } => OpKind::Read,
            DiskOp::Write { .. } => OpKind::Write,
            DiskOp::Flush => OpKind::Flush,
            DiskOp::Discard { .. } => OpKind::Discard,
            DiskOp::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }
}

/// What happens to a matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Complete at once with `-errno`, without touching the disk.
    Fail(i32),
    /// Hand it to the disk only after this long.
    Delay(Duration),
    /// Keep it until [`FaultControl::release_oldest`] or [`FaultControl::release_all`].
    Hold,
}

/// Selects operations: by kind and byte offset (`None` matches any).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpMatch {
    /// The operation's kind.
    pub kind: Option<OpKind>,
    /// The operation's byte offset (flushes have none and never match an offset).
    pub offset: Option<u64>,
}

impl OpMatch {
    /// Every operation of `kind`.
    pub fn kind(kind: OpKind) -> Self {
        OpMatch {
            kind: Some(kind),
            offset: None,
        }
    }

    /// Operations of `kind` at byte offset `offset`.
    pub fn at(kind: OpKind, offset: u64) -> Self {
        OpMatch {
            kind: Some(kind),
            offset: Some(offset),
        }
    }

    fn matches(&self, op: &DiskOp) -> bool {
        let offset = match op {
            DiskOp::Read { offset, .. }
            | DiskOp::Write { offset, .. }
            | DiskOp::Discard { offset, .. }
            | DiskOp::WriteZeroes { offset, .. } => Some(*offset),
            DiskOp::Flush => None,
        };
        self.kind.is_none_or(|k| k == OpKind::of(op))
            && self.offset.is_none_or(|o| Some(o) == offset)
    }
}

struct Rule {
    select: OpMatch,
    fault: Fault,
    /// Operations it still applies to (`None`: every one).
    remaining: Option<usize>,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    /// Held operations, oldest first, by id.
    held: VecDeque<u64>,
    /// Held operations the test released, not yet handed to the disk.
    released: HashSet<u64>,
    next_id: u64,
    /// Every queue's eventfd, to wake it when something is released.
    wakers: Vec<EventFd>,
}

/// The test's handle on a [`FaultDisk`]'s rules and held operations; clones share them.
#[derive(Clone, Default)]
pub struct FaultControl(Arc<Mutex<State>>);

impl fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultControl")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl FaultControl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `fault` to the next `times` operations `select` matches (`None`: all of
    /// them from now on). Rules are tried in the order they were added.
    pub fn inject(&self, select: OpMatch, fault: Fault, times: Option<usize>) {
        self.lock().rules.push(Rule {
            select,
            fault,
            remaining: times,
        });
    }

    /// Removes every rule (held operations stay held).
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Operations held now.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Releases the operation held longest; false if none is.
    pub fn release_oldest(&self) -> bool {
        let mut state = self.lock();
        let Some(id) = state.held.pop_front() else {
            return false;
        };
        state.released.insert(id);
        wake(&state);
        true
    }

    /// Releases every held operation.
    pub fn release_all(&self) {
        let mut state = self.lock();
        let ids: Vec<u64> = state.held.drain(..).collect();
        state.released.extend(ids);
        wake(&state);
    }

    /// The fault for `op`, if a rule matches it (using one of the rule's applications).
    fn fault_for(&self, op: &DiskOp) -> Option<Fault> {
        let mut state = self.lock();
        let rule = state
            .rules
            .iter_mut()
            .find(|r| r.remaining != Some(0) && r.select.matches(op))?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        Some(rule.fault)
    }

    /// Registers a held operation; returns its id.
    fn hold(&self) -> u64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.held.push_back(id);
        id
    }

    /// Whether held operation `id` was released (consuming the release).
    fn take_release(&self, id: u64) -> bool {
        self.lock().released.remove(&id)
    }

    /// Forgets held operation `id` (released by a drain).
    fn forget(&self, id: u64) {
        let mut state = self.lock();
        state.held.retain(|h| *h != id);
        state.released.remove(&id);
    }
}

fn wake(state: &State) {
    for w in &state.wakers {
        let _ = w.write(1);
    }
}

/// A disk whose queues inject the faults its [`FaultControl`] describes.
pub struct FaultDisk {
    inner: Arc<dyn Disk>,
    control: FaultControl,
}

impl fmt::Debug for FaultDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultDisk")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl FaultDisk {
    /// Wraps `inner`; the returned control sets the faults.
    pub fn new(inner: Arc<dyn Disk>) -> (Self, FaultControl) {
        let control = FaultControl::default();
        (
            FaultDisk {
                inner,
                control: control.clone(),
            },
            control,
        )
    }
}

impl Disk for FaultDisk {
    fn engine(&self) -> &'static str {
        "fault"
    }

    fn info(&self) -> DiskInfo {
        self.inner.info()
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn current_size(&self) -> io::Result<u64> {
        self.inner.current_size()
    }

    fn grow(&self, size: u64) -> io::Result<u64> {
        self.inner.grow(size)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn open_queue(&self, depth: u32, notifier: Option<&EventFd>) -> io::Result<Box<dyn DiskQueue>> {
        let (eventfd, owns_eventfd) = crate::disk::queue_eventfd(notifier)?;
        // The wrapped queue signals this queue's eventfd, and is reaped through it.
        let inner = self.inner.open_queue(depth, Some(&eventfd))?;
        self.control.lock().wakers.push(eventfd.try_clone()?);
        Ok(Box::new(FaultQueue {
            inner,
            control: self.control.clone(),
            eventfd,
            owns_eventfd,
            held: Vec::new(),
            failed: Vec::new(),
        }))
    }
}

/// An operation kept back from the wrapped queue.
struct Held {
    id: u64,
    /// Handed on at this time (a delay) or when released (`None`).
    until: Option<Instant>,
    op: DiskOp,
    token: u64,
}

/// One queue of a [`FaultDisk`].
struct FaultQueue {
    inner: Box<dyn DiskQueue>,
    control: FaultControl,
    eventfd: EventFd,
    owns_eventfd: bool,
    held: Vec<Held>,
    /// Failed at once, not yet reaped.
    failed: Vec<DiskCompletion>,
}

impl FaultQueue {
    /// Hands the held operations that are due (or all, `everything`) to the wrapped queue.
    fn release_due(&mut self, everything: bool) -> io::Result<()> {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(self.held.len());
        let mut result = Ok(());
        for h in std::mem::take(&mut self.held) {
            let due = everything
                || h.until.is_some_and(|t| t <= now)
                || (h.until.is_none() && self.control.take_release(h.id));
            if !due || result.is_err() {
                kept.push(h);
                continue;
            }
            self.control.forget(h.id);
            if let Err(e) = self.inner.push(h.op, h.token) {
                result = Err(e);
            }
        }
        self.held = kept;
        result
    }
}

impl DiskQueue for FaultQueue {
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()> {
        match self.control.fault_for(&op) {
            None => self.inner.push(op, token),
            Some(Fault::Fail(errno)) => {
                self.failed.push(DiskCompletion {
                    token,
                    result: -errno,
                    buf: op.into_buf(),
                });
                self.eventfd.write(1)
            }
            Some(Fault::Delay(delay)) => {
                let id = self.control.hold();
                self.control.forget(id);
                self.held.push(Held {
                    id,
                    until: Some(Instant::now() + delay),
                    op,
                    token,
                });
                let waker = self.eventfd.try_clone()?;
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = waker.write(1);
                });
                Ok(())
            }
            Some(Fault::Hold) => {
                let id = self.control.hold();
                self.held.push(Held {
                    id,
                    until: None,
                    op,
                    token,
                });
                Ok(())
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.release_due(false)?;
        self.inner.submit()
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        if self.owns_eventfd {
            let _ = self.eventfd.read();
        }
        // Released operations are submitted here: the eventfd woke the worker for them.
        if let Err(e) = self.release_due(false).and_then(|()| self.inner.submit()) {
            tracing::warn!("fault engine: handing on released operations failed: {e}");
        }
        self.inner.reap(out);
        out.append(&mut self.failed);
    }

    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()> {
        self.release_due(true)?;
        self.inner.drain(out)?;
        out.append(&mut self.failed);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len() + self.failed.len()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn stats(&self) -> Arc<DiskStats> {
        self.inner.stats()
    }
}

impl Drop for FaultQueue {
    fn drop(&mut self) {
        // Held operations go to the disk and complete before the wrapped queue (which
        // drains on drop) goes; their buffers are freed after that.
        if let Err(e) = self.release_due(true) {
            tracing::error!("fault engine: releasing held operations on drop failed: {e}");
        }
    }
}
