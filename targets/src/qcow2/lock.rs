//! QEMU-compatible image locking: OFD locks on bytes 100+perm (permissions held) and
//! 200+perm (permissions not shared), as `raw_apply_lock_bytes` in QEMU's file-posix.c.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// QEMU's block permission bits, as locked on the image (`raw_apply_lock_bytes`).
const PERM_CONSISTENT_READ: u64 = 0;
const PERM_WRITE: u64 = 1;
const PERM_RESIZE: u64 = 3;
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

fn ofd_lock(
    fd: RawFd,
    byte: i64,
    cmd: libc::c_int,
    kind: libc::c_short,
) -> io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: fcntl with an OFD lock command reads and (for GETLK) writes the flock struct,
    // which lives for the whole call.
    let rc = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if rc == 0 {
        Ok(fl)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes the locks QEMU takes for our use of the image, after checking nobody else's use
/// conflicts: readers share everything but resize; writers also do not share writing.
pub(crate) fn lock_image(path: &Path, writable: bool) -> io::Result<std::fs::File> {
    let file = OpenOptions::new().read(true).open(path)?;
    let fd = file.as_raw_fd();
    let mut perms = vec![PERM_CONSISTENT_READ];
    let mut unshared = vec![PERM_RESIZE];
    if writable {
        perms.push(PERM_WRITE);
        unshared.push(PERM_WRITE);
    }
    // Someone who does not share a permission we need, or holds one we do not share.
    let conflicts = perms
        .iter()
        .map(|p| (LOCK_SHARED_BASE + *p as i64, *p, "does not share"))
        .chain(
            unshared
                .iter()
                .map(|p| (LOCK_PERM_BASE + *p as i64, *p, "holds")),
        );
    for (byte, perm, what) in conflicts {
        let probe = ofd_lock(fd, byte, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short)?;
        if probe.l_type != libc::F_UNLCK as libc::c_short {
            let name = match perm {
                PERM_WRITE => "write",
                PERM_RESIZE => "resize",
                _ => "consistent read",
            };
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "image {} is in use: another process {what} the \"{name}\" permission (is a QEMU or another daemon using it?)",
                    path.display()
                ),
            ));
        }
    }
    for p in &perms {
        ofd_lock(
            fd,
            LOCK_PERM_BASE + *p as i64,
            libc::F_OFD_SETLK,
            libc::F_RDLCK as libc::c_short,
        )?;
    }
    for p in &unshared {
        ofd_lock(
            fd,
            LOCK_SHARED_BASE + *p as i64,
            libc::F_OFD_SETLK,
            libc::F_RDLCK as libc::c_short,
        )?;
    }
    Ok(file)
}
