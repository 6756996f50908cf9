//! What the churn tests share: short verified frontend sessions (libblkio for blk, the raw
//! virtio-scsi frontend for scsi) and waiting until the daemon's fds, threads and mapped
//! frontend memory are back to a baseline.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::blkio_frontend::Frontend;
use crate::daemon::{usage, Usage};
use crate::scsi_frontend::ScsiFrontend;

/// One in-process frontend on `socket` (`kind` "blk" or "scsi", `queues` request queues):
/// connects, writes a pattern derived from `n` to one of 64 blocks, reads it back,
/// disconnects. Panics on any error.
pub fn short_session(socket: &Path, kind: &str, queues: usize, n: usize) {
    match kind {
        "blk" => {
            let mut fe = Frontend::connect(socket, queues as i32);
            let q = n % queues;
            let pattern = [(n % 251) as u8; 4096];
            fe.buf(0, 4096).copy_from_slice(&pattern);
            assert_eq!(fe.write(q, (n % 64) as u64 * 4096, 0, 4096), 0);
            assert_eq!(fe.read(q, (n % 64) as u64 * 4096, 4096, 4096), 0);
            assert_eq!(fe.buf(4096, 4096), &pattern[..], "session {n}");
        }
        _ => {
            let mut fe = ScsiFrontend::connect(socket, queues);
            let lba = (n % 64) as u8;
            let pattern = vec![(n % 251) as u8; 512];
            // The first command of a session may meet a unit attention; answer it.
            let write = [0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0];
            if fe.command(0, &write, &pattern, 0).status != 0 {
                fe.good(0, &write, &pattern, 0);
            }
            let back = fe.good(0, &[0x28, 0, 0, 0, 0, lba, 0, 0, 1, 0], &[], 512);
            assert_eq!(back, pattern, "session {n}");
        }
    }
}

/// Waits (up to `timeout`) until the daemon `pid` holds as many fds, threads and memfd
/// mappings as `baseline` (it releases a connection's or an export's resources
/// asynchronously); fails with its fd listing. Returns the settled reading.
pub fn settled(pid: u32, baseline: Usage, after: &str, timeout: Duration) -> Usage {
    let deadline = Instant::now() + timeout;
    loop {
        let now = usage(pid);
        let same = (now.fds, now.threads, now.memfd_maps)
            == (baseline.fds, baseline.threads, baseline.memfd_maps);
        if same {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "after {after}: daemon holds {now:?}, baseline {baseline:?}\n{}",
            fd_listing(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/proc/PID/fd`, one `fd -> target` per line.
pub fn fd_listing(pid: u32) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        out += &format!(
            "{} -> {}\n",
            entry.file_name().to_string_lossy(),
            target.display()
        );
    }
    out
}
