//! The guest memory regions a frontend hands over (SET_MEM_TABLE, ADD_MEM_REG: vhost-user
//! spec, "Memory regions description"), checked before the daemon maps them: a region of a
//! regular file (a memfd, a file on /dev/shm or hugetlbfs) must lie inside that file's
//! pages: up to its length rounded up to a page, since the kernel maps whole pages and only
//! a page wholly past the end faults (libblkio hands over rings in a memfd of 0x3b10 bytes
//! for a 0x4000-byte region, issue #18).
//!
//! vm-memory 0.18 maps `memory_size` bytes at `mmap_offset` of a file without comparing
//! them with the file's length, and the first access past the end raises SIGBUS, which
//! ends the daemon and every export with it: a frontend lying about one region took them
//! all down (found by the `vhost_user_backend` fuzz target). A lying region ends only its
//! connection, like the relay's other framing errors.
//!
//! Descriptors of other kinds are not checked: the VFIO device of a virtio-vhost-user BAR,
//! where the bridge has placed every region inside the BAR (`vvu_transport::bridge`). A
//! frontend that shrinks its file after handing it over can still fault the daemon; QEMU's
//! memory-backend-memfd seals its memfds against that by default.

use nix::sys::stat::{fstat, SFlag};
use vhost::vhost_user::message::FrontendReq;

use super::{le32, Message, RelayError, HEADER_SIZE};

/// Size of a region description: guest address, size, user address, mmap offset.
const REGION_SIZE: usize = 32;

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// The smallest page of the host, in bytes (4 KiB where sysconf cannot tell).
fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

/// Checks the regions of a SET_MEM_TABLE or ADD_MEM_REG against the descriptors that came
/// with them (region *i*, descriptor *i*); other messages pass. Regions without a
/// descriptor are the daemon's to refuse.
pub(super) fn check(msg: &Message) -> Result<(), RelayError> {
    let request = msg.request();
    let first = if request == FrontendReq::SET_MEM_TABLE as u32 {
        // num_regions (u32), padding (u32), the regions.
        HEADER_SIZE + 8
    } else if request == FrontendReq::ADD_MEM_REG as u32 {
        // padding (u64), one region.
        HEADER_SIZE + 8
    } else {
        return Ok(());
    };
    for (index, fd) in msg.fds.iter().enumerate() {
        let at = first + index * REGION_SIZE;
        if msg.bytes.len() < at + REGION_SIZE {
            break;
        }
        let (size, offset) = (le64(&msg.bytes, at + 8), le64(&msg.bytes, at + 24));
        let stat = fstat(fd)?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            continue;
        }
        let file_len = u64::try_from(stat.st_size).unwrap_or(0);
        let mapped = file_len.div_ceil(page_size()).saturating_mul(page_size());
        if offset.checked_add(size).is_none_or(|end| end > mapped) {
            return Err(RelayError::RegionPastEof {
                index,
                offset,
                size,
                file_len,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::fs::File;
    use std::io::{self, IoSlice};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use vhost::vhost_user::message::VhostUserInflight;

    use super::*;
    use crate::relay::{read_message, relay, BackendChannel, InflightFds, VERSION};

    const MIB: u64 = 1 << 20;

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"regions-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file.into()
    }

    /// A SET_MEM_TABLE (`add`: an ADD_MEM_REG of the first) of regions `(size, offset)`.
    fn regions_message(add: bool, regions: &[(u64, u64)]) -> Vec<u8> {
        let (request, mut payload) = if add {
            (FrontendReq::ADD_MEM_REG, vec![0u8; 8])
        } else {
            let mut p = (regions.len() as u32).to_le_bytes().to_vec();
            p.extend_from_slice(&[0; 4]);
            (FrontendReq::SET_MEM_TABLE, p)
        };
        for (i, &(size, offset)) in regions.iter().enumerate().take(if add { 1 } else { 8 }) {
            let gpa = i as u64 * 16 * MIB;
            for v in [gpa, size, 0x7f00_0000_0000 + gpa, offset] {
                payload.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut m = (request as u32).to_le_bytes().to_vec();
        m.extend_from_slice(&VERSION.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(&payload);
        m
    }

    fn checked(add: bool, regions: &[(u64, u64)], fds: Vec<OwnedFd>) -> Result<(), RelayError> {
        check(&Message {
            bytes: regions_message(add, regions),
            fds,
        })
    }

    #[test]
    fn regions_inside_their_files_pass() {
        checked(
            false,
            &[(MIB, 0), (MIB, MIB)],
            vec![memfd(MIB), memfd(2 * MIB)],
        )
        .unwrap();
        checked(true, &[(4096, MIB - 4096)], vec![memfd(MIB)]).unwrap();
        // A file shorter than the region, but not by a whole page (libblkio's rings).
        checked(true, &[(0x4000, 0)], vec![memfd(0x3b10)]).unwrap();
        // Not a regular file: mapped as the bridge placed it.
        let (a, _b) = UnixStream::pair().unwrap();
        checked(false, &[(MIB, 1 << 40)], vec![a.into()]).unwrap();
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        for (add, regions) in [
            (false, vec![(MIB, 0), (MIB, 4096)]),
            (false, vec![(2 * MIB, 0)]),
            (true, vec![(4096, MIB)]),
            (true, vec![(u64::MAX, 4096)]),
            (true, vec![(MIB + 1, 0)]),
        ] {
            let fds = regions.iter().map(|_| memfd(MIB)).collect();
            let result = checked(add, &regions, fds);
            assert!(
                matches!(result, Err(RelayError::RegionPastEof { file_len: MIB, .. })),
                "{regions:?}: {result:?}"
            );
        }
    }

    struct NoInflight;

    impl InflightFds for NoInflight {
        fn get_inflight_fd(&self, _: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
            Err(io::Error::other("no inflight area"))
        }
        fn set_inflight_fd(&self, _: &VhostUserInflight, _: File) -> io::Result<()> {
            Err(io::Error::other("no inflight area"))
        }
    }

    /// The input the fuzz target found, reduced: a SET_MEM_TABLE whose one region runs
    /// past its memfd. The daemon never sees it (it would map it and fault), and only
    /// this connection ends.
    #[test]
    fn the_relay_ends_a_connection_that_hands_over_a_region_past_its_file() {
        let (frontend, frontend_end) = UnixStream::pair().unwrap();
        let (daemon, daemon_end) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || {
            relay(
                &frontend_end,
                &daemon_end,
                &BackendChannel::default(),
                &NoInflight,
            )
        });
        let fd = memfd(MIB);
        let bytes = regions_message(false, &[(MIB, 0x1000)]);
        let rights = [fd.as_raw_fd()];
        sendmsg::<()>(
            frontend.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&rights)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let result = thread.join().unwrap();
        assert!(
            matches!(
                result,
                Err(RelayError::RegionPastEof {
                    index: 0,
                    offset: 0x1000,
                    size: MIB,
                    file_len: MIB,
                })
            ),
            "{result:?}"
        );
        assert!(
            read_message(&daemon).unwrap().is_none(),
            "nothing reached the daemon"
        );
        drop(frontend);
    }
}
