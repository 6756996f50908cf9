//! One scratch folder per fuzzing process, for backing files, images and sockets: on tmpfs
//! (`/dev/shm`, which takes O_DIRECT since Linux 6.6) when there is one, so disk I/O is
//! real but never touches a disk; removed when the process exits normally.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use targets::disk::{Disk, DiskSpec, Format};

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

/// A disk of `size` bytes in the scratch folder, opened through `targets::disk::open`. A
/// read-only one is first filled with bytes `i % modulus` (so reads return known data); a
/// writable one is created.
pub fn disk(
    name: &str,
    format: Format,
    direct: bool,
    readonly: bool,
    size: u64,
    modulus: u64,
) -> Arc<dyn Disk> {
    let path = dir().join(name);
    if readonly {
        let data: Vec<u8> = (0..size).map(|i| (i % modulus) as u8).collect();
        if let Err(e) = std::fs::write(&path, data) {
            harness_failure("read-only disk", e);
        }
    }
    targets::disk::open(&DiskSpec {
        path,
        format,
        readonly,
        direct,
        create: Some((size, None)),
        rbd: None,
    })
    .unwrap_or_else(|e| harness_failure("disk", e))
}
