//! `qcow2_open`: mutated qcow2 images (header, L1/L2 tables, refcounts, snapshots,
//! compressed clusters, backing file names) opened read-only through the daemon's qcow2
//! engine ([`targets::disk::open`], imago on io_uring), then read where the data is: every
//! failure must be an error, never a panic or a hang.
//!
//! Input: flags (u8: bit 0 O_DIRECT), a read offset (u32, in 512-byte sectors), then the
//! image file. The image is written to the scratch folder next to `base.raw` (1 MiB of a
//! pattern), which the seeds with a backing file name.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use targets::disk::{DiskOp, DiskSpec, Format};
use targets::iobuf::{AlignedBuf, IoBuf};

use crate::input::{Input, Output};
use crate::ring::harness_failure;
use crate::scratch;

/// Bytes read per read.
const READ: usize = 4096;

/// The image's path, with `base.raw` created next to it once.
fn image_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = scratch::dir();
        let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 241) as u8).collect();
        if let Err(e) = std::fs::write(dir.join("base.raw"), base) {
            harness_failure("backing file", e);
        }
        dir.join("image.qcow2")
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let sector = u64::from(input.u32());
    let path = image_path();
    if let Err(e) = std::fs::write(path, input.rest()) {
        harness_failure("image", e);
    }
    let disk = match targets::disk::open(&DiskSpec {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        readonly: true,
        direct: flags & 1 != 0,
        create: None,
        rbd: None,
    }) {
        Ok(disk) => disk,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let size = disk.info().size;
    let _ = disk.current_size();
    let Ok(mut queue) = disk.open_queue(8, None) else {
        return;
    };
    let last = size.saturating_sub(READ as u64) / 512 * 512;
    let offsets = [
        0,
        size / 2 / 512 * 512,
        last,
        sector.wrapping_mul(512) % size.max(1),
    ];
    for (token, offset) in offsets.into_iter().enumerate() {
        let Some(buf) = AlignedBuf::new(READ, 4096) else {
            harness_failure("buffer", "allocation");
        };
        let _ = queue.push(
            DiskOp::Read {
                offset,
                buf: IoBuf::owned(buf),
            },
            token as u64,
        );
    }
    let _ = queue.submit();
    let mut done = Vec::new();
    if let Err(e) = queue.drain(&mut done) {
        harness_failure("drain", e);
    }
}

/// Runs `program args` in `dir`; false if it is missing or fails.
fn sh(dir: &Path, program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .is_ok_and(|s| s.success())
}

/// The seeds, made with `qemu-img` and `qemu-io` (left out where they are missing): small
/// images (512-byte and 4 KiB clusters, 1 MiB virtual) empty, with data, zero clusters,
/// compressed clusters, v2 (compat=0.10), a backing file, an internal snapshot, extended
/// L2 entries.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => harness_failure("seed folder", e),
    };
    let d = dir.path();
    // 64 KiB of a pattern, then zeroes: a small compressed image.
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| if i < 1 << 16 { (i % 239) as u8 } else { 0 })
        .collect();
    if std::fs::write(d.join("data.raw"), &pattern).is_err() {
        return Vec::new();
    }
    let img = |name: &str, opts: &str| {
        sh(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, name, "1M"],
        )
    };
    let io = |name: &str, cmd: &str| sh(d, "qemu-io", &["-f", "qcow2", "-c", cmd, name]);
    let mut made = Vec::new();
    let mut add = |name: &str, ok: bool| {
        if ok {
            made.push(name.to_string());
        }
    };
    add("empty-512", img("empty-512", "cluster_size=512"));
    add(
        "data-512",
        img("data-512", "cluster_size=512")
            && io("data-512", "write -P 0xab 0 4k")
            && io("data-512", "write -P 0xcd 768k 1k"),
    );
    add(
        "zero-4k",
        img("zero-4k", "cluster_size=4096")
            && io("zero-4k", "write -P 0x11 0 16k")
            && io("zero-4k", "write -z 4k 8k"),
    );
    add(
        "compressed-4k",
        sh(
            d,
            "qemu-img",
            &[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "data.raw",
                "compressed-4k",
            ],
        ),
    );
    add(
        "v2-512",
        img("v2-512", "cluster_size=512,compat=0.10") && io("v2-512", "write -P 0x22 0 2k"),
    );
    add(
        "backing-512",
        sh(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "base.raw",
                "-o",
                "cluster_size=512",
                "backing-512",
                "1M",
            ],
        ),
    );
    add(
        "snapshot-512",
        img("snapshot-512", "cluster_size=512")
            && io("snapshot-512", "write -P 0x33 0 1k")
            && sh(d, "qemu-img", &["snapshot", "-c", "s1", "snapshot-512"])
            && io("snapshot-512", "write -P 0x44 0 512"),
    );
    add(
        "extended-l2-16k",
        img("extended-l2-16k", "cluster_size=16384,extended_l2=on")
            && io("extended-l2-16k", "write -P 0x55 4k 2k"),
    );
    made.into_iter()
        .filter_map(|name| {
            let image = std::fs::read(d.join(&name)).ok()?;
            let mut out = Output::new();
            out.u8(0).u32(0x100).bytes(&image);
            Some((name, out.finish()))
        })
        .collect()
}
