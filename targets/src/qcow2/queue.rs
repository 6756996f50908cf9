//! A qcow2 queue ([`Qcow2Queue`]): a small executor that turns every request into a task
//! and polls it on the queue's own thread, over the queue's own io_uring; wake-ups from
//! other queues (imago's metadata locks are shared) arrive on the queue's eventfd.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::uring_file::Ring;
use super::{Request, Shared};
use crate::disk::{DiskCompletion, DiskOp, DiskQueue};
use crate::iobuf::IoBuf;
use crate::slab::Slab;
use crate::stats::DiskStats;

/// A request's future. imago declares its boxed futures without `Send` (`?Send`).
struct RequestFuture(Pin<Box<dyn Future<Output = (i32, Option<IoBuf>)>>>);

// SAFETY: a queue's tasks are polled by one thread at a time (the queue's owner: its worker,
// or the control path draining it under the worker's mutex). Nothing thread-bound is held
// across a suspension point: imago's async mode keeps only tokio::sync guards (which are
// `Send`) across awaits and documents its parking_lot locks as never held across one; our
// own operations (`UringOp`) are `Send`. The missing bound is a declaration, not a property.
unsafe impl Send for RequestFuture {}

/// A request being executed.
struct Task {
    future: RequestFuture,
    waker: Waker,
    token: u64,
}

/// Tasks woken and due to be polled, shared with their wakers (which other queues' threads
/// may call when they release a lock a task waits for).
struct ReadyTasks {
    ids: Mutex<Vec<usize>>,
    changed: Condvar,
    /// The owning queue is polling: it will see a pushed id without being signalled.
    polling: AtomicBool,
    eventfd: EventFd,
}

impl ReadyTasks {
    fn push(&self, id: usize) {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        self.changed.notify_one();
        if !self.polling.load(Ordering::SeqCst) {
            let _ = self.eventfd.write(1);
        }
    }

    fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *self.ids.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn is_empty(&self) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Waits (bounded) for a task to be woken.
    fn wait(&self) {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.is_empty() {
            let _ = self.changed.wait_timeout(ids, Duration::from_millis(10));
        }
    }
}

struct TaskWaker {
    id: usize,
    ready: Arc<ReadyTasks>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.id);
    }
}

/// One queue's tasks over its own io_uring.
pub(super) struct Executor {
    ring: Arc<Ring>,
    ready: Arc<ReadyTasks>,
    tasks: Slab<Task>,
    /// Finished, not yet reaped.
    finished: Vec<DiskCompletion>,
}

impl Executor {
    /// Makes `request` a task, due to be polled.
    fn start(&mut self, shared: &Arc<Shared>, request: Request, token: u64) {
        let id = self.tasks.insert(Task {
            future: RequestFuture(Box::pin(request.execute(Arc::clone(shared)))),
            waker: Waker::noop().clone(),
            token,
        });
        if let Some(task) = self.tasks.get_mut(id) {
            task.waker = Waker::from(Arc::new(TaskWaker {
                id,
                ready: Arc::clone(&self.ready),
            }));
        }
        self.ready
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
    }

    /// Polls woken tasks until none is left, collecting finished ones into `self.finished`.
    /// Polls the tasks of a queue whose owner is not polling it (see
    /// `Shared::drive_others`); wakes the owner to reap what finished.
    pub(super) fn run_for_owner(&mut self) {
        self.run();
        if !self.finished.is_empty() {
            let _ = self.ready.eventfd.write(1);
        }
    }

    fn run(&mut self) {
        let ring = Arc::clone(&self.ring);
        ring.enter(|| loop {
            self.ring.complete();
            self.ready.polling.store(true, Ordering::SeqCst);
            let ids = self.ready.take();
            if ids.is_empty() {
                self.ready.polling.store(false, Ordering::SeqCst);
                // A wake between `take` and clearing `polling` did not signal the eventfd.
                if self.ready.is_empty() {
                    break;
                }
                continue;
            }
            for id in ids {
                self.poll_task(id);
            }
            if let Err(e) = self.ring.submit() {
                tracing::error!("qcow2 io_uring submit failed: {e}");
            }
        });
    }

    fn poll_task(&mut self, id: usize) {
        // A stale wake-up for a finished task.
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        let mut cx = Context::from_waker(&task.waker);
        // A bug in the image driver (a corrupt image it did not expect) fails the request,
        // not the queue's thread.
        let polled =
            std::panic::catch_unwind(AssertUnwindSafe(|| task.future.0.as_mut().poll(&mut cx)))
                .unwrap_or_else(|_| {
                    tracing::error!("the qcow2 driver panicked on a request; failing it with EIO");
                    Poll::Ready((-libc::EIO, None))
                });
        if let Poll::Ready((result, buf)) = polled {
            if let Some(task) = self.tasks.remove(id) {
                self.finished.push(DiskCompletion {
                    token: task.token,
                    result,
                    buf,
                });
            }
        }
    }
}

/// One queue's qcow2 I/O: an executor for its requests over its own io_uring.
pub struct Qcow2Queue {
    shared: Arc<Shared>,
    exec: Arc<Mutex<Executor>>,
    /// Pushed, not yet started.
    queued: Vec<(Request, u64)>,
    eventfd: EventFd,
    owns_eventfd: bool,
}

impl Qcow2Queue {
    pub(super) fn new(
        shared: Arc<Shared>,
        depth: u32,
        notifier: Option<&EventFd>,
    ) -> io::Result<Self> {
        let (eventfd, owns_eventfd) = crate::disk::queue_eventfd(notifier)?;
        // A guest request can become several image accesses (one per cluster run).
        let ring = Ring::new(depth.clamp(16, 1024) * 2, eventfd.as_raw_fd())?;
        let exec = Arc::new(Mutex::new(Executor {
            ring,
            ready: Arc::new(ReadyTasks {
                ids: Mutex::new(Vec::new()),
                changed: Condvar::new(),
                polling: AtomicBool::new(false),
                eventfd: eventfd.try_clone()?,
            }),
            tasks: Slab::default(),
            finished: Vec::new(),
        }));
        let mut executors = shared.executors.lock().unwrap_or_else(|p| p.into_inner());
        executors.retain(|e| e.strong_count() > 0);
        executors.push(Arc::downgrade(&exec));
        drop(executors);
        Ok(Qcow2Queue {
            shared,
            exec,
            queued: Vec::new(),
            eventfd,
            owns_eventfd,
        })
    }

    fn exec(&self) -> std::sync::MutexGuard<'_, Executor> {
        self.exec.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the queued requests and polls them as far as they go.
    fn start_queued_and_run(&mut self) -> std::sync::MutexGuard<'_, Executor> {
        let queued = std::mem::take(&mut self.queued);
        let mut exec = self.exec.lock().unwrap_or_else(|p| p.into_inner());
        for (request, token) in queued {
            exec.start(&self.shared, request, token);
        }
        exec.run();
        exec
    }

    #[cfg(test)]
    pub(super) fn ring(&self) -> Arc<Ring> {
        Arc::clone(&self.exec().ring)
    }
}

impl DiskQueue for Qcow2Queue {
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()> {
        // The task owns the operation and its buffers until it finished; the queue's drop
        // drains every task first.
        self.queued.push((Request(op), token));
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        let finished = !self.start_queued_and_run().finished.is_empty();
        // Requests that finished without waiting (cached metadata, unallocated reads):
        // make sure the worker comes to reap them.
        if finished {
            self.eventfd.write(1)?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        // A shared notifier is reset by its owner, once, before it reaps every queue.
        if self.owns_eventfd {
            let _ = self.eventfd.read();
        }
        out.append(&mut self.start_queued_and_run().finished);
    }

    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()> {
        loop {
            let (ring, ready) = {
                let mut exec = self.start_queued_and_run();
                out.append(&mut exec.finished);
                if exec.tasks.is_empty() {
                    return Ok(());
                }
                (Arc::clone(&exec.ring), Arc::clone(&exec.ready))
            };
            if ring.pending() > 0 {
                ring.wait()?;
            } else {
                // Waiting for a lock another queue's task holds.
                self.shared.drive_others(&self.exec);
                ready.wait();
            }
        }
    }

    fn in_flight(&self) -> usize {
        let exec = self.exec();
        self.queued.len() + exec.tasks.len() + exec.finished.len()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn stats(&self) -> Arc<DiskStats> {
        self.exec().ring.stats()
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // Finish every request before the guest memory it points to goes.
        let mut sink = Vec::new();
        if let Err(e) = self.drain(&mut sink) {
            tracing::error!("draining qcow2 I/O before drop failed: {e}");
        }
    }
}
