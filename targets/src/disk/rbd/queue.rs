//! One virtqueue worker's access to an RBD image: operations go to librbd's asynchronous
//! API at once (`rbd_aio_readv/writev/flush/discard/write_zeroes`; there is no separate
//! submission step), and each completion callback, which runs on a librbd thread, only
//! records `(slot, return value)` in the queue's list and writes the queue's eventfd, which
//! the worker's epoll loop watches: no thread per request, no blocking on the worker.
//!
//! Buffers stay owned by their slot until [`DiskQueue::reap`] hands them back, after librbd
//! called back: librbd reads and writes guest memory in place (a write's data is not
//! copied), so nothing may free it before.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{ffi, Image};
use crate::disk::{DiskCompletion, DiskOp, DiskQueue};
use crate::slab::Slab;
use crate::stats::DiskStats;

/// What completion callbacks and the queue share.
struct Shared {
    /// Finished operations not reaped yet: slot key and librbd's return value.
    done: Mutex<Vec<(usize, isize)>>,
    /// Signalled with `done` for [`DiskQueue::drain`].
    finished: Condvar,
    /// The worker's completion eventfd (its own, or a notifier shared by several queues).
    eventfd: EventFd,
}

/// The argument of one operation's completion callback, owned by the callback.
struct CallbackArg {
    api: &'static ffi::Api,
    shared: Arc<Shared>,
    key: usize,
}

/// librbd's completion callback (`rbd_callback_t`), on a librbd thread.
unsafe extern "C" fn completed(c: ffi::RbdCompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<CallbackArg>` leaked for this completion in `submit_op`;
    // librbd calls back exactly once per completion, so the box is reclaimed once.
    let arg = unsafe { Box::from_raw(arg.cast::<CallbackArg>()) };
    // SAFETY: `c` is the finished completion this callback belongs to; released here, as
    // QEMU's rbd driver does, and not used after.
    let ret = unsafe {
        let ret = (arg.api.rbd_aio_get_return_value)(c);
        (arg.api.rbd_aio_release)(c);
        ret
    };
    let mut done = arg.shared.done.lock().unwrap_or_else(|p| p.into_inner());
    done.push((arg.key, ret));
    drop(done);
    arg.shared.finished.notify_all();
    // A full eventfd counter (2^64 - 2 writes unread) cannot happen: the worker reads it.
    let _ = arg.shared.eventfd.write(1);
}

/// An operation owned by the queue until its completion is reaped.
struct Slot {
    token: u64,
    op: DiskOp,
}

/// A queue's access to an RBD image (see the module doc).
pub(super) struct RbdQueue {
    image: Arc<Image>,
    shared: Arc<Shared>,
    owns_eventfd: bool,
    slots: Slab<Slot>,
    stats: Arc<DiskStats>,
    /// The last completion was an error (errors are logged when they start and end, not
    /// once per request).
    failing: bool,
}

impl RbdQueue {
    pub(super) fn new(image: Arc<Image>, notifier: Option<&EventFd>) -> io::Result<Self> {
        let (eventfd, owns_eventfd) = crate::disk::queue_eventfd(notifier)?;
        Ok(RbdQueue {
            image,
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                finished: Condvar::new(),
                eventfd,
            }),
            owns_eventfd,
            slots: Slab::default(),
            stats: Arc::new(DiskStats::default()),
            failing: false,
        })
    }

    /// Records a result that never reached librbd (refused at submission) as a completion.
    fn complete_now(&self, key: usize, ret: isize) {
        self.shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, ret));
        self.shared.finished.notify_all();
        let _ = self.shared.eventfd.write(1);
    }

    /// Hands the operation in slot `key` to librbd.
    fn submit_op(&mut self, key: usize) {
        let api = self.image.api;
        let image = self.image.handle;
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let zero_length = matches!(&slot.op, DiskOp::Read { buf, .. } | DiskOp::Write { buf, .. } if buf.is_empty());
        if zero_length {
            self.complete_now(key, 0);
            return;
        }
        let arg = Box::into_raw(Box::new(CallbackArg {
            api,
            shared: Arc::clone(&self.shared),
            key,
        }));
        let mut c: ffi::RbdCompletionT = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback reclaims it (or below, when the
        // completion is not used); `completed` has the `rbd_callback_t` signature.
        let rc = unsafe { (api.rbd_aio_create_completion)(arg.cast(), completed, &mut c) };
        let rc = if rc < 0 {
            rc
        } else {
            // SAFETY: `image` is open while `self.image` lives, and every buffer and iovec
            // array passed below belongs to the slot, which keeps it (unmoved: the iovecs
            // live on the heap) until the completion is reaped, after librbd called back.
            unsafe {
                match &slot.op {
                    DiskOp::Read { offset, buf } => {
                        let iov = buf.iovecs();
                        (api.rbd_aio_readv)(image, iov.as_ptr(), iov.len() as i32, *offset, c)
                    }
                    DiskOp::Write { offset, buf, .. } => {
                        let iov = buf.iovecs();
                        (api.rbd_aio_writev)(image, iov.as_ptr(), iov.len() as i32, *offset, c)
                    }
                    DiskOp::Flush => (api.rbd_aio_flush)(image, c),
                    DiskOp::Discard { offset, len, .. } => {
                        (api.rbd_aio_discard)(image, *offset, *len, c)
                    }
                    DiskOp::WriteZeroes {
                        offset, len, unmap, ..
                    } => {
                        // As QEMU: without leave to unmap, zero in place (thick).
                        let flags = if *unmap {
                            0
                        } else {
                            ffi::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
                        };
                        (api.rbd_aio_write_zeroes)(image, *offset, *len as usize, c, flags, 0)
                    }
                }
            }
        };
        if rc < 0 {
            // Refused before starting: librbd will not call back.
            // SAFETY: `c` (if created) was not handed to an operation; `arg` was not
            // consumed by a callback.
            unsafe {
                if !c.is_null() {
                    (api.rbd_aio_release)(c);
                }
                drop(Box::from_raw(arg));
            }
            self.complete_now(key, rc as isize);
        }
    }

    fn take_done(&mut self, done: Vec<(usize, isize)>, out: &mut Vec<DiskCompletion>) {
        for (key, ret) in done {
            let Some(slot) = self.slots.remove(key) else {
                continue;
            };
            let result = if ret < 0 {
                i32::try_from(ret).unwrap_or(-libc::EIO)
            } else {
                match &slot.op {
                    // librbd reports the bytes read; a write succeeds whole.
                    DiskOp::Read { .. } => i32::try_from(ret).unwrap_or(-libc::EIO),
                    DiskOp::Write { buf, durable, .. } => {
                        if *durable {
                            // With the cache off a completed write is on every replica.
                            self.stats.dsync_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        i32::try_from(buf.len()).unwrap_or(-libc::EIO)
                    }
                    DiskOp::Flush => {
                        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                        0
                    }
                    DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => 0,
                }
            };
            if result < 0 && !self.failing {
                let e = io::Error::from_raw_os_error(-result);
                let hint = match -result {
                    libc::ETIMEDOUT => " (the cluster did not answer within io_timeout)",
                    libc::ESHUTDOWN => {
                        " (this client was blocklisted: another client broke the image's lock)"
                    }
                    libc::EROFS => " (the image's exclusive lock is lost)",
                    _ => "",
                };
                tracing::error!(token = slot.token, "rbd operation failed: {e}{hint}; failing requests until the cluster answers again");
                self.failing = true;
            } else if result >= 0 && self.failing {
                tracing::info!("rbd operations succeed again");
                self.failing = false;
            }
            out.push(DiskCompletion {
                token: slot.token,
                result,
                buf: slot.op.into_buf(),
            });
        }
    }
}

impl DiskQueue for RbdQueue {
    fn push(&mut self, op: DiskOp, token: u64) -> io::Result<()> {
        if matches!(&op, DiskOp::Read { buf, .. } if !buf.is_writable()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a read into a read-only buffer",
            ));
        }
        let key = self.slots.insert(Slot { token, op });
        self.submit_op(key);
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        // librbd started each operation when it was pushed.
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        // Reset the eventfd first so a callback after the scan re-arms it. A shared
        // notifier is reset by its owner.
        if self.owns_eventfd {
            let _ = self.shared.eventfd.read();
        }
        let done = std::mem::take(&mut *self.shared.done.lock().unwrap_or_else(|p| p.into_inner()));
        self.take_done(done, out);
    }

    fn drain(&mut self, out: &mut Vec<DiskCompletion>) -> io::Result<()> {
        while !self.slots.is_empty() {
            let done = {
                let mut done = self.shared.done.lock().unwrap_or_else(|p| p.into_inner());
                while done.is_empty() {
                    done = self
                        .shared
                        .finished
                        .wait(done)
                        .unwrap_or_else(|p| p.into_inner());
                }
                std::mem::take(&mut *done)
            };
            self.take_done(done, out);
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.slots.len()
    }

    fn completion_fd(&self) -> RawFd {
        self.shared.eventfd.as_raw_fd()
    }

    /// The callbacks' list, not the eventfd: no system call for a busy-polling worker.
    /// (The eventfd keeps being signalled either way: librbd's threads are not ours to
    /// quiet, and a signal is one write per completion.)
    fn ready(&mut self) -> bool {
        !self
            .shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn stats(&self) -> Arc<DiskStats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // librbd may still read or write the buffers of operations in flight: wait for
        // every callback before they are freed (an unreachable cluster without io_timeout
        // blocks here, as it blocks QEMU's rbd driver).
        let mut sink = Vec::new();
        let _ = self.drain(&mut sink);
    }
}
