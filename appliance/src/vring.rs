//! [`SessionVring`]: vhost-user-backend's `VringRwLock` with three set-up rules of QEMU's
//! libvhost-user, which vhost-user-backend 0.24 does not follow.
//!
//! - **Used index at set-up.** vhost-user-backend takes the next used index from guest memory
//!   at SET_VRING_ADDR. A frontend that sends SET_VRING_ADDR before its driver zeroed the
//!   ring (other VMMs do) would make the first completion land in a stale slot. Every
//!   request this daemon accepted was on the used ring before GET_VRING_BASE answered, and
//!   after a crash the frontend rewinds the base to the used index: the next used index is
//!   the avail base of SET_VRING_BASE (vhost-user spec, "Ring states"; libvhost-user
//!   `vu_set_vring_base_exec` sets `used_idx` from the base the same way). Requests still in
//!   flight at a crash come back from the inflight area, whose recovery sets both indices
//!   ([`SessionVring::resume`]).
//! - **Kick after SET_VRING_KICK.** Like libvhost-user with inflight tracking
//!   (`vu_check_queue_inflights`), a newly installed kick fd is signalled once, so the
//!   worker looks at its ring (and re-runs requests in flight at a crash, `crate::inflight`)
//!   without waiting for a driver that is itself waiting for those requests.
//! - **Call after SET_VRING_CALL.** A completion published while the frontend had no call fd
//!   installed (reconnect, migration, notifier switch) would never interrupt the driver.
//!   Like libvhost-user (`vu_set_vring_call_exec`), the vring signals a newly installed call
//!   fd once; a spurious interrupt costs the driver one look at its used ring.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

/// A vring of one export, as every connection's worker threads see it.
#[derive(Clone)]
pub struct SessionVring<M: GuestAddressSpace> {
    inner: VringRwLock<M>,
}

impl<M: 'static + GuestAddressSpace> SessionVring<M> {
    /// Resumes the ring at these indices (recovery from the inflight area, where the avail
    /// base is the used index plus the requests re-run).
    pub fn resume(&self, next_avail: u16, next_used: u16) {
        self.inner.set_queue_next_avail(next_avail);
        self.inner.set_queue_next_used(next_used);
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for SessionVring<M> {
    type G = <VringRwLock<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for SessionVring<M> {
    type G = <VringRwLock<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for SessionVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(SessionVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    /// SET_VRING_BASE: the avail base is also the next used index (no inflight area).
    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base);
        self.inner.set_queue_next_used(base);
    }

    /// Called by vhost-user-backend at SET_VRING_ADDR with the used index it read from guest
    /// memory, which may be stale: ignored, [`Self::set_queue_next_avail`] decides.
    fn set_queue_next_used(&self, idx: u16) {
        let next_used = self.inner.get_ref().get_queue().next_used();
        if idx != next_used {
            tracing::debug!(
                guest_used_idx = idx,
                next_used,
                "ignoring the used index in guest memory at SET_VRING_ADDR"
            );
        }
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    /// SET_VRING_KICK: installs the fd and signals it once (see the module doc).
    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file);
        let state = self.inner.get_ref();
        if let Some(kick) = state.get_kick() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local buffer to the kick eventfd, which the
            // vring owns and keeps open while `state` (its read guard) is held.
            let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if n != one.len() as isize {
                tracing::debug!(
                    "cannot signal the new kick fd: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    /// SET_VRING_CALL: installs the fd and signals it once (see the module doc).
    fn set_call(&self, file: Option<File>) {
        let installed = file.is_some();
        self.inner.set_call(file);
        if installed {
            if let Err(e) = self.inner.signal_used_queue() {
                tracing::debug!("cannot signal the new call fd: {e}");
            }
        }
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
