//! Heap buffers with a chosen alignment: bounce buffers for O_DIRECT when guest buffers are
//! not aligned (and, later, for memory the kernel cannot do direct I/O on), and the zero
//! data a qcow2 v2 image writes for write-zeroes.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

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
