//! The buffers disk operations do their I/O on.
//!
//! - [`AlignedBuf`]: a heap buffer with a chosen alignment: bounce buffers for O_DIRECT when
//!   guest buffers are not aligned or guest memory cannot be pinned, and the zero data a
//!   qcow2 v2 image writes for write-zeroes.
//! - [`IoBuf`]: the data of one disk operation, owned by it: guest memory (the mapping kept
//!   alive by a handle, the segments validated against it when the buffer is made), an
//!   owned [`AlignedBuf`], or a shared read-only one (the pattern of a WRITE SAME). A disk
//!   queue holds an operation's `IoBuf` until its completion is reaped and then hands it
//!   back, so no safe code can free or reuse memory the kernel may still access.

use std::alloc::{self, Layout};
use std::io::{IoSlice, IoSliceMut};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::chain::{Memory, Segment};

/// A zero-initialised, aligned heap buffer.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: like a `Box<[u8]>`, a shared `&AlignedBuf` only reads the bytes (`as_slice`);
// writing needs `&mut` (`as_mut_slice`), so threads sharing one cannot race.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes aligned to `align` (a power of two). `None` if the layout is
    /// invalid or the allocation fails.
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// True for a zero-length buffer (never: allocations are at least one byte).
    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    /// The whole buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` initialised bytes, uniquely
        // borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The whole buffer, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`, shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Where an [`IoBuf`]'s bytes live; holding it keeps them alive.
#[derive(Debug)]
enum Owner {
    /// Guest memory: the mapping stays while the table is held.
    Guest(#[allow(dead_code)] Arc<Memory>),
    /// An owned heap buffer.
    Owned(AlignedBuf),
    /// A shared heap buffer, only ever read through this one.
    Shared(#[allow(dead_code)] Arc<AlignedBuf>),
}

/// The data buffers of one disk operation, owned by it (see the module doc).
#[derive(Debug)]
pub struct IoBuf {
    owner: Owner,
    /// The bytes, as the kernel takes them; every one points into `owner`'s memory, which
    /// does not move while `owner` is alive (mappings and heap allocations stay put).
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into memory `owner` keeps alive and that is not tied to a
// thread (guest memory mappings, heap allocations); `Arc<Memory>` and `AlignedBuf` are
// `Send`, and the raw pointers are only handed to the kernel or turned into slices borrowed
// from `self`.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// The whole of `buf`, readable and writable.
    pub fn owned(mut buf: AlignedBuf) -> Self {
        let iovecs = vec![libc::iovec {
            iov_base: buf.as_mut_slice().as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        IoBuf {
            owner: Owner::Owned(buf),
            iovecs,
        }
    }

    /// The first `len` bytes of `buf`, read-only: only a write may use it. `None` if `buf`
    /// is shorter.
    pub fn shared(buf: Arc<AlignedBuf>, len: usize) -> Option<Self> {
        if len > buf.len() {
            return None;
        }
        let iovecs = vec![libc::iovec {
            iov_base: buf.as_slice().as_ptr().cast_mut().cast(),
            iov_len: len,
        }];
        Some(IoBuf {
            owner: Owner::Shared(buf),
            iovecs,
        })
    }

    /// Guest segments `segs` of `mem` (a segment may span memory regions); `None` if any
    /// byte is outside guest memory.
    pub(crate) fn guest(mem: &Arc<Memory>, segs: &[Segment]) -> Option<Self> {
        use vm_memory::GuestMemoryBackend;
        let mut iovecs = Vec::with_capacity(segs.len());
        for s in segs {
            for slice in mem.get_slices(s.addr, s.len) {
                let slice = slice.ok()?;
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Some(IoBuf {
            owner: Owner::Guest(Arc::clone(mem)),
            iovecs,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iovecs.iter().map(|v| v.iov_len).sum()
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A read may fill it (false for a shared buffer).
    pub fn is_writable(&self) -> bool {
        !matches!(self.owner, Owner::Shared(_))
    }

    /// Every buffer's address and length are multiples of `align` (O_DIRECT's memory
    /// alignment).
    pub fn aligned_to(&self, align: usize) -> bool {
        self.iovecs
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
    }

    /// The buffers as iovecs, for the kernel; valid while `self` is alive and unchanged.
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// The bytes of an owned buffer (a bounce buffer's data after a read).
    pub fn as_slice(&self) -> Option<&[u8]> {
        match &self.owner {
            Owner::Owned(buf) => Some(buf.as_slice()),
            Owner::Guest(_) | Owner::Shared(_) => None,
        }
    }

    /// The owned buffer back.
    pub fn into_owned(self) -> Option<AlignedBuf> {
        match self.owner {
            Owner::Owned(buf) => Some(buf),
            Owner::Guest(_) | Owner::Shared(_) => None,
        }
    }

    /// Fills every byte with zero, as a read of a hole would (the null engine's reads).
    /// False, and nothing written, for a shared (read-only) buffer.
    pub(crate) fn fill_zero(&mut self) -> bool {
        if !self.is_writable() {
            return false;
        }
        for v in &self.iovecs {
            // SAFETY: each iovec points to `iov_len` writable bytes that `self.owner` keeps
            // mapped (guest memory the driver handed as device-writable, or an owned
            // allocation); raw-pointer writes create no reference, so iovecs that overlap
            // are fine.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        true
    }

    /// No two buffers share a byte.
    fn disjoint(&self) -> bool {
        let mut spans: Vec<(usize, usize)> = self
            .iovecs
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        spans.sort_unstable();
        spans
            .windows(2)
            .all(|w| w[0].0.saturating_add(w[0].1) <= w[1].0)
    }

    /// The bytes as slices, for an engine that takes them (qcow2 writes).
    pub(crate) fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.iovecs
            .iter()
            .filter(|v| v.iov_len > 0)
            .map(|v| {
                // SAFETY: each iovec points to `iov_len` bytes that `self.owner` keeps
                // mapped for the borrow of `self`. Guest memory is shared with the driver,
                // which may change it (or hand the same page to another request) while the
                // slice lives: strictly, Rust's aliasing rules do not hold for such memory.
                // The slices go only to the image engine, which copies them or hands them
                // to the kernel; a racing driver changes the data moved, as on any device.
                // Volatile access for this path is left to the hostile-input work.
                let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast(), v.iov_len) };
                IoSlice::new(bytes)
            })
            .collect()
    }

    /// The bytes as mutable slices, for an engine that fills them (qcow2 reads); `None`
    /// for a shared (read-only) buffer, and for guest buffers that overlap each other
    /// (a driver may name the same memory twice; two `&mut` slices must not alias).
    pub(crate) fn io_slices_mut(&mut self) -> Option<Vec<IoSliceMut<'_>>> {
        if !self.is_writable() || !self.disjoint() {
            return None;
        }
        Some(
            self.iovecs
                .iter()
                .filter(|v| v.iov_len > 0)
                .map(|v| {
                    // SAFETY: as in `io_slices`; the buffer is writable (guest memory the
                    // driver handed as device-writable, or an owned allocation), the iovecs
                    // do not overlap (checked above), and the slices are borrowed from
                    // `&mut self`, so nothing else reads or writes them through this buffer
                    // meanwhile.
                    let bytes =
                        unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast(), v.iov_len) };
                    IoSliceMut::new(bytes)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new(8192, 4096).unwrap();
        assert_eq!(b.as_mut_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(b.len(), 8192);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert!(AlignedBuf::new(16, 3).is_none());
    }
}
