//! One scratch folder per fuzzing process, for backing files, images and sockets: on tmpfs
//! (`/dev/shm`, which takes O_DIRECT since Linux 6.6) when there is one, so disk I/O is
//! real but never touches a disk; removed when the process exits normally.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::ring::harness_failure;

static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The process's scratch folder.
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = match tempfile::Builder::new()
            .prefix("appliance-fuzz-")
            .tempdir_in(base)
        {
            Ok(d) => d.keep(),
            Err(e) => harness_failure("scratch folder", e),
        };
        // SAFETY: `remove_dir` is an `extern "C" fn()` that stays valid for the life of
        // the process; atexit only records it.
        unsafe { libc::atexit(remove_dir) };
        dir
    })
}
