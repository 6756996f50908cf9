//! The system calls the disk engines make, as io_uring submission entries or run blocking:
//! the one place submission entries are built (raw rings in [`crate::disk`], the qcow2
//! storage in `qcow2/uring_file.rs`).
//!
//! Building an entry is safe; handing it to a ring is not (the kernel then reads and writes
//! the buffers it names until the completion arrives), so pushing stays with the engines,
//! which own those buffers until then.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

/// `fallocate` mode that deallocates a range (it reads back as zeroes) without changing
/// the file size.
pub(crate) const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode that zeroes a range in place (it stays allocated) without changing the
/// file size.
pub(crate) const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// One system call on a file.
#[derive(Debug)]
pub(crate) enum Syscall<'a> {
    /// `preadv` at a byte offset into the buffers.
    Readv {
        fd: RawFd,
        offset: u64,
        iovecs: &'a [libc::iovec],
    },
    /// `pwritev2` at a byte offset from the buffers; `dsync` adds `RWF_DSYNC`.
    Writev {
        fd: RawFd,
        offset: u64,
        iovecs: &'a [libc::iovec],
        dsync: bool,
    },
    /// `fallocate(mode)` over `len` bytes at `offset`.
    Fallocate {
        fd: RawFd,
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// `fdatasync`.
    Fdatasync { fd: RawFd },
}

impl Syscall<'_> {
    /// The submission entry (user data 0: the engine sets it).
    pub(crate) fn entry(&self) -> squeue::Entry {
        match *self {
            Syscall::Readv { fd, offset, iovecs } => {
                opcode::Readv::new(types::Fd(fd), iovecs.as_ptr(), iov_count(iovecs))
                    .offset(offset)
                    .build()
            }
            Syscall::Writev {
                fd,
                offset,
                iovecs,
                dsync,
            } => opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), iov_count(iovecs))
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Syscall::Fallocate {
                fd,
                offset,
                len,
                mode,
            } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build(),
            Syscall::Fdatasync { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    /// Runs the call on this thread; the result as a completion would carry it (bytes, or
    /// `-errno`).
    ///
    /// # Safety
    /// The iovecs describe memory that is valid (and, for a read, not otherwise borrowed)
    /// for the duration of the call.
    pub(crate) unsafe fn run_blocking(&self) -> i32 {
        // SAFETY: (all arms) a bad fd only makes the call fail; the iovecs are valid for
        // the call (the caller's contract).
        let rc: i64 = unsafe {
            match *self {
                Syscall::Readv { fd, offset, iovecs } => libc::preadv(
                    fd,
                    iovecs.as_ptr(),
                    iov_count(iovecs) as libc::c_int,
                    offset as libc::off_t,
                ) as i64,
                Syscall::Writev {
                    fd,
                    offset,
                    iovecs,
                    dsync,
                } => libc::pwritev2(
                    fd,
                    iovecs.as_ptr(),
                    iov_count(iovecs) as libc::c_int,
                    offset as libc::off_t,
                    if dsync { libc::RWF_DSYNC } else { 0 },
                ) as i64,
                Syscall::Fallocate {
                    fd,
                    offset,
                    len,
                    mode,
                } => libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) as i64,
                Syscall::Fdatasync { fd } => libc::fdatasync(fd) as i64,
            }
        };
        if rc < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            rc.min(i64::from(i32::MAX)) as i32
        }
    }
}

/// An iovec count as the kernel takes it (`UIO_MAXIOV` is far below `u32::MAX`; a larger
/// array fails with EINVAL either way).
fn iov_count(iovecs: &[libc::iovec]) -> u32 {
    u32::try_from(iovecs.len()).unwrap_or(u32::MAX)
}
