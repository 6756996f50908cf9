//! Every zeroing, discard and durability operation the two devices offer, on every kind of
//! backing store they are offered for: one table of backing kinds × one table of
//! operations, each cell in both write cache modes. VM-less, with real io_uring and real
//! files: qemu-img makes the images (qcow2 v2 and v3, with and without a backing file)
//! and checks them afterwards; a loop device stands in for a block device.
//!
//! Each cell prepares a disk with data in known places (a backing file full of
//! [`BACKING`], the top layer's own data [`DATA`] in some clusters), sends one request
//! through the device's request handling as a guest would, and then checks:
//! - the request succeeded, or was not offered and was refused as such;
//! - the range reads back as what the request promises (zeroes, the written pattern; for a
//!   discard without a read-back promise each block its old data or zeroes), never the
//!   backing file's data where the top layer had data or zeroes were promised;
//! - everything outside the range is untouched;
//! - when the request changed anything and the mode is writethrough (or it is a FLUSH,
//!   SYNCHRONIZE CACHE or FUA write), the disk queue had counted a sync by the moment the
//!   completion was reaped, and in writeback mode it counted none;
//! - for qcow2: `qemu-img check` is clean, QEMU reads the image as the device did, and
//!   the backing file never changed.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use targets::blk::{BlkDevice, BlkQueue, BlkSettings, Memory};
use targets::device::{Completed, QueueHandler};
use targets::disk::{DiskInfo, DiskOp, DiskQueue, RawDisk, RawDiskOptions};
use targets::guest::GuestRam;
use targets::qcow2::{Qcow2Disk, Qcow2Options};
use targets::scsi::emulation::{Lun, LunSettings};
use targets::scsi::virtio::{encode_lun, RequestQueue, ScsiDevice, ScsiLun, REQ_SIZE, RESP_SIZE};
use targets::stats::DiskStats;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable};

const KIB: u64 = 1024;
/// Virtual disk size: 16 qcow2 clusters of 64 KiB.
const SIZE: u64 = 1024 * KIB;
/// Logical block size of both devices.
const BLOCK: u64 = 512;
/// The range every request covers: a partial cluster at each end (in an allocated cluster
/// at the head, an unallocated one at the tail), three whole clusters between.
const RANGE: (u64, u64) = (60 * KIB, 200 * KIB);
/// Where the top layer holds data of its own before the request.
const DATA_AT: [(u64, u64); 3] = [(0, 64 * KIB), (128 * KIB, 64 * KIB), (384 * KIB, 64 * KIB)];
/// Byte of the top layer's own data.
const DATA: u8 = 0xd1;
/// Byte of the backing file's data.
const BACKING: u8 = 0xba;
/// Byte the data-carrying requests write.
const WRITTEN: u8 = 0x3e;

// Guest memory layout of a request.
const HEADER: u64 = 0x10_0000;
const PARAMS: u64 = 0x18_0000;
const DATA_BUF: u64 = 0x20_0000;
const STATUS: u64 = 0x80_0000;

/// A kind of backing store.
#[derive(Debug, Clone, Copy)]
enum Store {
    RawFile,
    /// A loop device over a file.
    BlockDevice,
    Qcow2 {
        /// `0.10` (v2) or `1.1` (v3).
        compat: &'static str,
        backing: bool,
    },
}

struct BackingKind {
    name: &'static str,
    store: Store,
    direct: bool,
    /// Discarded ranges read as zeroes (SCSI LBPRZ). Everywhere else a discard is a hint:
    /// a qcow2 v2 image with a backing file cannot deallocate without exposing it.
    discard_zeroes: bool,
}

/// The backing kinds: every one the daemon opens.
const KINDS: &[BackingKind] = &[
    BackingKind {
        name: "raw file, O_DIRECT",
        store: Store::RawFile,
        direct: true,
        discard_zeroes: true,
    },
    BackingKind {
        name: "raw file, buffered",
        store: Store::RawFile,
        direct: false,
        discard_zeroes: true,
    },
    BackingKind {
        name: "block device, O_DIRECT",
        store: Store::BlockDevice,
        direct: true,
        discard_zeroes: true,
    },
    BackingKind {
        name: "block device, buffered",
        store: Store::BlockDevice,
        direct: false,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v3",
        store: Store::Qcow2 {
            compat: "1.1",
            backing: false,
        },
        direct: false,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v3, O_DIRECT",
        store: Store::Qcow2 {
            compat: "1.1",
            backing: false,
        },
        direct: true,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v3 + backing",
        store: Store::Qcow2 {
            compat: "1.1",
            backing: true,
        },
        direct: false,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v3 + backing, O_DIRECT",
        store: Store::Qcow2 {
            compat: "1.1",
            backing: true,
        },
        direct: true,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v2",
        store: Store::Qcow2 {
            compat: "0.10",
            backing: false,
        },
        direct: false,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v2, O_DIRECT",
        store: Store::Qcow2 {
            compat: "0.10",
            backing: false,
        },
        direct: true,
        discard_zeroes: true,
    },
    BackingKind {
        name: "qcow2 v2 + backing",
        store: Store::Qcow2 {
            compat: "0.10",
            backing: true,
        },
        direct: false,
        discard_zeroes: false,
    },
    BackingKind {
        name: "qcow2 v2 + backing, O_DIRECT",
        store: Store::Qcow2 {
            compat: "0.10",
            backing: true,
        },
        direct: true,
        discard_zeroes: false,
    },
];

/// What a request must leave in [`RANGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Zeroes,
    Written,
    /// A discard: zeroes where the device promises them, else each block its old data or
    /// zeroes.
    Discarded,
    Unchanged,
}

/// A request as a guest sends it.
#[derive(Debug, Clone, Copy)]
enum Request {
    BlkWriteZeroes {
        unmap: bool,
    },
    BlkDiscard,
    BlkWrite,
    BlkFlush,
    ScsiWriteFua,
    /// WRITE SAME(16) of one zero block (UNMAP set or not).
    ScsiWriteSameZero {
        unmap: bool,
    },
    /// WRITE SAME(16) with NDOB: zeroes without a data-out buffer.
    ScsiWriteSameNdob,
    ScsiWriteSamePattern,
    ScsiUnmap,
    ScsiSynchronizeCache,
}

struct Operation {
    name: &'static str,
    request: Request,
    effect: Effect,
    /// Durable at completion whatever the cache mode (FLUSH, SYNCHRONIZE CACHE, FUA).
    always_durable: bool,
}

/// The operations: every request that zeroes, discards or promises durability.
const OPERATIONS: &[Operation] = &[
    Operation {
        name: "blk WRITE_ZEROES (unmap)",
        request: Request::BlkWriteZeroes { unmap: true },
        effect: Effect::Zeroes,
        always_durable: false,
    },
    Operation {
        name: "blk WRITE_ZEROES (no unmap)",
        request: Request::BlkWriteZeroes { unmap: false },
        effect: Effect::Zeroes,
        always_durable: false,
    },
    Operation {
        name: "blk DISCARD",
        request: Request::BlkDiscard,
        effect: Effect::Discarded,
        always_durable: false,
    },
    Operation {
        name: "blk WRITE",
        request: Request::BlkWrite,
        effect: Effect::Written,
        always_durable: false,
    },
    Operation {
        name: "blk FLUSH",
        request: Request::BlkFlush,
        effect: Effect::Unchanged,
        always_durable: true,
    },
    Operation {
        name: "scsi WRITE(16) FUA",
        request: Request::ScsiWriteFua,
        effect: Effect::Written,
        always_durable: true,
    },
    Operation {
        name: "scsi WRITE SAME(16) zeroes, UNMAP",
        request: Request::ScsiWriteSameZero { unmap: true },
        effect: Effect::Zeroes,
        always_durable: false,
    },
    Operation {
        name: "scsi WRITE SAME(16) zeroes",
        request: Request::ScsiWriteSameZero { unmap: false },
        effect: Effect::Zeroes,
        always_durable: false,
    },
    Operation {
        name: "scsi WRITE SAME(16) NDOB",
        request: Request::ScsiWriteSameNdob,
        effect: Effect::Zeroes,
        always_durable: false,
    },
    Operation {
        name: "scsi WRITE SAME(16) pattern",
        request: Request::ScsiWriteSamePattern,
        effect: Effect::Written,
        always_durable: false,
    },
    Operation {
        name: "scsi UNMAP",
        request: Request::ScsiUnmap,
        effect: Effect::Discarded,
        always_durable: false,
    },
    Operation {
        name: "scsi SYNCHRONIZE CACHE(16)",
        request: Request::ScsiSynchronizeCache,
        effect: Effect::Unchanged,
        always_durable: true,
    },
];

#[test]
#[ignore = "full tier (tests/run.sh): needs qemu-img from tests/scripts/install-deps.sh, and root for losetup"]
fn every_offered_operation_works_on_every_backing_kind() {
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut report = String::new();
    let mut failures = Vec::new();
    for (k, kind) in KINDS.iter().enumerate() {
        let kind_dir = scratch.path().join(format!("kind{k}"));
        std::fs::create_dir_all(&kind_dir).unwrap();
        let base = match kind.store {
            Store::Qcow2 {
                compat,
                backing: true,
            } => Some(make_base(&kind_dir, compat)),
            _ => None,
        };
        let base_before = base.as_ref().map(|b| std::fs::read(b).unwrap());
        for (o, op) in OPERATIONS.iter().enumerate() {
            for writeback in [true, false] {
                let mode = if writeback {
                    "writeback"
                } else {
                    "writethrough"
                };
                let dir = kind_dir.join(format!("op{o}-{mode}"));
                std::fs::create_dir_all(&dir).unwrap();
                let outcome = run_cell(kind, op, writeback, &dir, base.as_deref());
                let outcome = outcome.and_then(|(note, promise)| {
                    if promise == kind.discard_zeroes {
                        Ok(note)
                    } else {
                        Err(format!(
                            "discarded ranges promised to read as zeroes: {promise}, \
                             expected {}",
                            kind.discard_zeroes
                        ))
                    }
                });
                let line = match &outcome {
                    Ok(note) => format!("ok    {note}"),
                    Err(e) => format!("FAIL  {e}"),
                };
                writeln!(report, "{:30} {:36} {:12} {line}", kind.name, op.name, mode).unwrap();
                if let Err(e) = &outcome {
                    failures.push(format!("{} / {} / {mode}: {e}", kind.name, op.name));
                }
                // Keep the files of failed cells for a look; the rest go.
                if outcome.is_ok() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        if let (Some(base), Some(before)) = (&base, &base_before) {
            if std::fs::read(base).unwrap() != *before {
                failures.push(format!("{}: the backing file changed", kind.name));
            }
        }
    }
    println!("{report}");
    if !failures.is_empty() {
        println!("files of the failed cells: {}", scratch.keep().display());
    }
    assert!(
        failures.is_empty(),
        "{} of {} cells failed:\n{}\n\nwhole matrix:\n{report}",
        failures.len(),
        KINDS.len() * OPERATIONS.len() * 2,
        failures.join("\n")
    );
}

/// One cell: a fresh disk of `kind`, one request, every check. `Ok` carries a note for the
/// report and whether the device promised that discarded ranges read as zeroes.
fn run_cell(
    kind: &BackingKind,
    op: &Operation,
    writeback: bool,
    dir: &Path,
    base: Option<&Path>,
) -> Result<(String, bool), String> {
    let (disk, before) = prepare(kind, dir, base)?;
    let info = disk.info();
    let mut device = Device::new(op.request, &disk, info, writeback)?;
    let syncs_before = device.durable_ops();
    let outcome = device.run(op.request)?;
    let syncs = device.durable_ops() - syncs_before;
    let promise = device.discard_promise;
    drop(device);

    let after = disk.read_all()?;
    let mut note = format!("syncs {syncs}");
    // Every kind in the table can zero ranges: nothing may be refused.
    let effect = match outcome {
        Outcome::Good => op.effect,
        Outcome::NotOffered => return Err("not offered on this backing kind".into()),
    };
    check_contents(effect, promise, &before, &after, base.is_some())?;
    let changed = before != after;
    if effect == Effect::Discarded {
        note.push_str(match (promise, changed) {
            (true, _) => ", reads zeroes (promised)",
            (false, true) => ", deallocated (no promise)",
            (false, false) => ", no-op (no promise)",
        });
    }
    let must_sync = op.always_durable || (!writeback && changed);
    if must_sync && syncs == 0 {
        return Err("completed before any sync: not durable".into());
    }
    if !must_sync && syncs != 0 {
        return Err(format!("{syncs} syncs in writeback mode"));
    }
    disk.close_and_check(&after)?;
    Ok((note, promise))
}

/// The disk's bytes as a guest would read them before the request: the backing file's data
/// (or zeroes), with the top layer's own data over it.
fn expected_initial(backing: bool) -> Vec<u8> {
    let mut bytes = vec![if backing { BACKING } else { 0 }; SIZE as usize];
    for (offset, len) in DATA_AT {
        bytes[offset as usize..(offset + len) as usize].fill(DATA);
    }
    bytes
}

fn range() -> std::ops::Range<usize> {
    RANGE.0 as usize..(RANGE.0 + RANGE.1) as usize
}

fn check_contents(
    effect: Effect,
    promise: bool,
    before: &[u8],
    after: &[u8],
    has_backing: bool,
) -> Result<(), String> {
    let r = range();
    for (at, (&b, &a)) in before.iter().zip(after).enumerate() {
        if !r.contains(&at) && a != b {
            return Err(format!(
                "byte {at:#x} outside the range changed from {b:#04x} to {a:#04x}"
            ));
        }
    }
    let inside = &after[r.clone()];
    let first_not = |want: u8| inside.iter().position(|&x| x != want);
    let bad = match effect {
        Effect::Zeroes => first_not(0).map(|i| format!("not zero at {:#x}", r.start + i)),
        Effect::Written => first_not(WRITTEN).map(|i| format!("not written at {:#x}", r.start + i)),
        Effect::Unchanged => (inside != &before[r.clone()]).then(|| "range changed".to_string()),
        Effect::Discarded if promise => {
            first_not(0).map(|i| format!("discard promised zeroes, not zero at {:#x}", r.start + i))
        }
        Effect::Discarded => {
            // Each block: what it was, or zeroes; never newly the backing file's data.
            inside
                .chunks(BLOCK as usize)
                .zip(before[r.clone()].chunks(BLOCK as usize))
                .position(|(a, b)| a != b && a.iter().any(|&x| x != 0))
                .map(|i| {
                    format!(
                        "discarded block at {:#x} is neither old data nor zero",
                        r.start + i * BLOCK as usize
                    )
                })
        }
    };
    if let Some(bad) = bad {
        let shows_backing = has_backing && inside.contains(&BACKING);
        return Err(format!(
            "{bad}{}",
            if shows_backing {
                " (the backing file's data shows)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Backing stores

/// An opened disk of one cell, and what keeps it alive.
enum Disk {
    Raw {
        disk: RawDisk,
        _loop: Option<LoopDevice>,
    },
    Qcow2 {
        disk: Qcow2Disk,
        path: PathBuf,
    },
}

impl Disk {
    fn info(&self) -> DiskInfo {
        match self {
            Disk::Raw { disk, .. } => disk.info(),
            Disk::Qcow2 { disk, .. } => disk.info(),
        }
    }

    /// A queue of its own, signalling `notifier` if given.
    fn queue(&self, notifier: Option<&vmm_sys_util::eventfd::EventFd>) -> Box<dyn DiskQueue> {
        match (self, notifier) {
            (Disk::Raw { disk, .. }, None) => Box::new(disk.new_queue(16).unwrap()),
            (Disk::Raw { disk, .. }, Some(n)) => {
                Box::new(disk.new_queue_with_notifier(16, n).unwrap())
            }
            (Disk::Qcow2 { disk, .. }, n) => Box::new(disk.new_queue(16, n).unwrap()),
        }
    }

    /// Everything the disk holds, read through a queue of its own.
    fn read_all(&self) -> Result<Vec<u8>, String> {
        let mut q = self.queue(None);
        let mut buf = targets::iobuf::AlignedBuf::new(SIZE as usize, 4096).unwrap();
        buf.as_mut_slice().fill(0x55);
        let op = DiskOp::Read {
            offset: 0,
            buf: targets::iobuf::IoBuf::owned(buf),
        };
        q.push(op, 0).unwrap();
        let mut done = Vec::new();
        q.drain(&mut done).unwrap();
        if done.len() != 1 || done[0].result != SIZE as i32 {
            return Err(format!("reading the disk back failed: {done:?}"));
        }
        let data = done.pop().and_then(|c| c.buf);
        Ok(data.as_ref().and_then(|b| b.as_slice()).unwrap().to_vec())
    }

    /// Closes the disk; a qcow2 image must then check clean and read, through QEMU, as the
    /// device read it.
    fn close_and_check(self, seen: &[u8]) -> Result<(), String> {
        let Disk::Qcow2 { disk, path } = self else {
            return Ok(());
        };
        disk.sync().map_err(|e| format!("final sync: {e}"))?;
        drop(disk);
        let (ok, text) = run(
            "qemu-img",
            &["check", "-f", "qcow2", path.to_str().unwrap()],
        );
        if !ok || !text.contains("No errors were found") {
            return Err(format!("qemu-img check: {text}"));
        }
        let raw = path.with_extension("raw");
        let (ok, text) = run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                path.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        if !ok {
            return Err(format!("qemu-img convert: {text}"));
        }
        if std::fs::read(&raw).unwrap() != seen {
            return Err("QEMU reads the image differently from the device".into());
        }
        Ok(())
    }
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (tests/scripts/install-deps.sh installs it): {e}")
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A backing file full of [`BACKING`].
fn make_base(dir: &Path, compat: &str) -> PathBuf {
    let base = dir.join("base.qcow2");
    let b = base.to_str().unwrap();
    let (ok, text) = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            b,
            &SIZE.to_string(),
        ],
    );
    assert!(ok, "qemu-img create: {text}");
    let (ok, text) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {BACKING:#x} 0 {SIZE}"),
            b,
        ],
    );
    assert!(ok, "qemu-io: {text}");
    base
}

/// A fresh disk of `kind` in `dir` holding [`expected_initial`], opened as the daemon opens
/// it; and those bytes as the device reads them.
fn prepare(kind: &BackingKind, dir: &Path, base: Option<&Path>) -> Result<(Disk, Vec<u8>), String> {
    let initial = expected_initial(base.is_some());
    let disk = match kind.store {
        Store::RawFile | Store::BlockDevice => {
            let file = dir.join("disk.raw");
            let f = std::fs::File::create(&file).unwrap();
            f.set_len(SIZE).unwrap();
            for (offset, len) in DATA_AT {
                f.write_all_at(&vec![DATA; len as usize], offset).unwrap();
            }
            f.sync_all().unwrap();
            drop(f);
            let (path, loop_device) = match kind.store {
                Store::BlockDevice => {
                    let dev = LoopDevice::attach(&file)?;
                    (dev.path.clone(), Some(dev))
                }
                _ => (file, None),
            };
            let disk = RawDisk::open(&RawDiskOptions {
                path,
                readonly: false,
                direct: kind.direct,
                create_size: None,
            })
            .map_err(|e| format!("open: {e}"))?;
            if kind.store.is_block_device() != disk.info().is_block_device {
                return Err("opened as the wrong kind of file".into());
            }
            Disk::Raw {
                disk,
                _loop: loop_device,
            }
        }
        Store::Qcow2 { compat, backing } => {
            let path = dir.join("top.qcow2");
            let p = path.to_str().unwrap();
            let compat = format!("compat={compat}");
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &compat];
            let base_s;
            if backing {
                base_s = base
                    .expect("a base for a backing kind")
                    .to_str()
                    .unwrap()
                    .to_string();
                args.extend(["-b", &base_s, "-F", "qcow2"]);
            }
            let size = SIZE.to_string();
            args.extend([p, &size]);
            let (ok, text) = run("qemu-img", &args);
            if !ok {
                return Err(format!("qemu-img create: {text}"));
            }
            let mut io = vec!["-f".to_string(), "qcow2".to_string()];
            for (offset, len) in DATA_AT {
                io.push("-c".into());
                io.push(format!("write -P {DATA:#x} {offset} {len}"));
            }
            io.push(p.to_string());
            let io: Vec<&str> = io.iter().map(String::as_str).collect();
            let (ok, text) = run("qemu-io", &io);
            if !ok {
                return Err(format!("qemu-io: {text}"));
            }
            let disk = Qcow2Disk::open(&Qcow2Options {
                path: path.clone(),
                readonly: false,
                direct: kind.direct,
                create: None,
            })
            .map_err(|e| format!("open: {e}"))?;
            Disk::Qcow2 { disk, path }
        }
    };
    let before = disk.read_all()?;
    if before != initial {
        return Err("the prepared disk does not read as prepared".into());
    }
    Ok((disk, before))
}

impl Store {
    fn is_block_device(self) -> bool {
        matches!(self, Store::BlockDevice)
    }
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup (the block-device cells need it): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f --show {} failed (the block-device cells need root and a free loop device): {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: losetup -d {} failed", self.path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Devices

/// How a request ended.
enum Outcome {
    Good,
    /// Refused as unsupported; allowed only where the device does not offer it.
    NotOffered,
}

/// The device a request goes to, with its one request queue on the cell's disk.
struct Device {
    mem: Arc<Memory>,
    queue: Box<dyn QueueHandler>,
    completion_fd: RawFd,
    stats: Arc<DiskStats>,
    blk: Option<Arc<BlkDevice>>,
    /// What the device tells the guest about discarded ranges: SCSI LBPRZ, and for
    /// virtio-blk what the disk promises (the README's promise for qcow2 images).
    discard_promise: bool,
}

impl Device {
    fn new(request: Request, disk: &Disk, info: DiskInfo, writeback: bool) -> Result<Self, String> {
        let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
        if request.is_blk() {
            let device = Arc::new(
                BlkDevice::new(
                    BlkSettings {
                        logical_block_size: BLOCK as u32,
                        readonly: false,
                        serial: "matrix".into(),
                        num_queues: 1,
                        queue_size: 16,
                        writeback,
                        writeback_state: None,
                    },
                    info,
                )
                .map_err(|e| format!("virtio-blk device: {e}"))?,
            );
            // The driver accepts everything (CONFIG_WCE: the configured cache mode holds).
            device.set_acked_features(device.features());
            let disk_queue = disk.queue(None);
            let stats = disk_queue.stats();
            let queue = BlkQueue::new(Arc::clone(&device), disk_queue);
            let completion_fd = queue.completion_fd().unwrap();
            return Ok(Device {
                mem,
                queue: Box::new(queue),
                completion_fd,
                stats,
                blk: Some(device),
                discard_promise: info.discard_zeroes,
            });
        }
        // As the daemon builds a LUN (appliance/src/export.rs).
        let lun = ScsiLun {
            id: 0,
            emulation: Lun::new(LunSettings {
                block_size: BLOCK as u32,
                blocks: info.size / BLOCK,
                readonly: false,
                serial: "matrix".into(),
                wwn: 0x3000_0000_0000_0001,
                rotational: false,
                write_cache: writeback,
                discard: true,
                unmapped_reads_zero: info.discard_zeroes,
            }),
            disk: info,
        };
        let device = Arc::new(ScsiDevice::new(vec![lun], 1, 16).unwrap());
        let mut stats = None;
        let queue = RequestQueue::new(device, |_, notifier| {
            let q = disk.queue(Some(notifier));
            stats = Some(q.stats());
            Ok(q)
        })
        .unwrap();
        let completion_fd = queue.completion_fd().unwrap();
        let mut device = Device {
            mem,
            queue: Box::new(queue),
            completion_fd,
            stats: stats.unwrap(),
            blk: None,
            discard_promise: false,
        };
        device.discard_promise = device.lbprz()?;
        Ok(device)
    }

    /// Syncs and durable writes the disk queue completed so far.
    fn durable_ops(&self) -> u64 {
        self.stats.syncs.load(Ordering::Relaxed) + self.stats.dsync_writes.load(Ordering::Relaxed)
    }

    /// Sends one chain and reaps, as the worker does on eventfd wake-ups, until it
    /// completes: what is counted by then was done before the guest heard of it.
    fn send(&mut self, descs: &[RawDescriptor]) -> Completed {
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut done = Vec::new();
        self.queue
            .handle_chain(chain, &GuestRam::new(Arc::clone(&self.mem)), &mut done);
        self.queue.submit().unwrap();
        while done.is_empty() {
            let mut pfd = libc::pollfd {
                fd: self.completion_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
            assert_eq!(n, 1, "no completion within 10 s");
            self.queue.reap(&mut done);
        }
        assert_eq!(done.len(), 1);
        done[0]
    }

    fn run(&mut self, request: Request) -> Result<Outcome, String> {
        let (offset, len) = RANGE;
        let pattern = vec![WRITTEN; len as usize];
        match request {
            Request::BlkWriteZeroes { unmap } => {
                let flags = if unmap {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                let offered = self.blk_offers(VIRTIO_BLK_F_WRITE_ZEROES);
                self.blk_segment(VIRTIO_BLK_T_WRITE_ZEROES, flags, offered)
            }
            Request::BlkDiscard => {
                let offered = self.blk_offers(VIRTIO_BLK_F_DISCARD);
                self.blk_segment(VIRTIO_BLK_T_DISCARD, 0, offered)
            }
            Request::BlkWrite => {
                self.mem
                    .write_slice(&pattern, GuestAddress(DATA_BUF))
                    .unwrap();
                self.blk_header(VIRTIO_BLK_T_OUT, offset / 512);
                let status = self.blk_status(&[
                    readable(HEADER, 16),
                    readable(DATA_BUF, len as u32),
                    writable(STATUS, 1),
                ]);
                blk_outcome(status, true)
            }
            Request::BlkFlush => {
                self.blk_header(VIRTIO_BLK_T_FLUSH, 0);
                let status = self.blk_status(&[readable(HEADER, 16), writable(STATUS, 1)]);
                blk_outcome(status, true)
            }
            Request::ScsiWriteFua => {
                self.mem
                    .write_slice(&pattern, GuestAddress(DATA_BUF))
                    .unwrap();
                let cdb = cdb16(0x8a, 0x08, offset / BLOCK, (len / BLOCK) as u32);
                self.scsi(&cdb, Some(len as u32), None)
                    .map(|_| Outcome::Good)
            }
            Request::ScsiWriteSameZero { unmap } => {
                self.mem
                    .write_slice(&[0u8; BLOCK as usize], GuestAddress(DATA_BUF))
                    .unwrap();
                let flags = if unmap { 0x08 } else { 0 };
                let cdb = cdb16(0x93, flags, offset / BLOCK, (len / BLOCK) as u32);
                self.scsi(&cdb, Some(BLOCK as u32), None)
                    .map(|_| Outcome::Good)
            }
            Request::ScsiWriteSameNdob => {
                let cdb = cdb16(0x93, 0x01, offset / BLOCK, (len / BLOCK) as u32);
                self.scsi(&cdb, None, None).map(|_| Outcome::Good)
            }
            Request::ScsiWriteSamePattern => {
                self.mem
                    .write_slice(&[WRITTEN; BLOCK as usize], GuestAddress(DATA_BUF))
                    .unwrap();
                let cdb = cdb16(0x93, 0, offset / BLOCK, (len / BLOCK) as u32);
                self.scsi(&cdb, Some(BLOCK as u32), None)
                    .map(|_| Outcome::Good)
            }
            Request::ScsiUnmap => {
                let mut params = [0u8; 24];
                params[0..2].copy_from_slice(&22u16.to_be_bytes());
                params[2..4].copy_from_slice(&16u16.to_be_bytes());
                params[8..16].copy_from_slice(&(offset / BLOCK).to_be_bytes());
                params[16..20].copy_from_slice(&((len / BLOCK) as u32).to_be_bytes());
                self.mem
                    .write_slice(&params, GuestAddress(DATA_BUF))
                    .unwrap();
                let mut cdb = [0u8; 10];
                cdb[0] = 0x42;
                cdb[7..9].copy_from_slice(&24u16.to_be_bytes());
                self.scsi(&cdb, Some(24), None).map(|_| Outcome::Good)
            }
            Request::ScsiSynchronizeCache => {
                let cdb = cdb16(0x91, 0, 0, 0);
                self.scsi(&cdb, None, None).map(|_| Outcome::Good)
            }
        }
    }

    fn blk_offers(&self, feature: u32) -> bool {
        self.blk
            .as_ref()
            .is_some_and(|d| d.features() & (1 << feature) != 0)
    }

    fn blk_header(&self, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    }

    fn blk_status(&mut self, descs: &[RawDescriptor]) -> u8 {
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        self.send(descs);
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A discard or write-zeroes request over [`RANGE`].
    fn blk_segment(
        &mut self,
        request_type: u32,
        flags: u32,
        offered: bool,
    ) -> Result<Outcome, String> {
        let (offset, len) = RANGE;
        self.blk_header(request_type, 0);
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&(offset / 512).to_le_bytes());
        seg[8..12].copy_from_slice(&((len / 512) as u32).to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&seg, GuestAddress(PARAMS)).unwrap();
        let status = self.blk_status(&[
            readable(HEADER, 16),
            readable(PARAMS, 16),
            writable(STATUS, 1),
        ]);
        blk_outcome(status, offered)
    }

    /// Sends `cdb` with `data_out` bytes at [`DATA_BUF`] or `data_in` bytes into it; the
    /// data-in bytes, or the failure with its sense.
    fn scsi(
        &mut self,
        cdb: &[u8],
        data_out: Option<u32>,
        data_in: Option<u32>,
    ) -> Result<Vec<u8>, String> {
        let mut req = [0u8; REQ_SIZE];
        req[..8].copy_from_slice(&encode_lun(0));
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write_slice(&req, GuestAddress(HEADER)).unwrap();
        self.mem
            .write_slice(&[0xee; RESP_SIZE], GuestAddress(STATUS))
            .unwrap();
        let mut descs = vec![readable(HEADER, REQ_SIZE as u32)];
        if let Some(n) = data_out {
            descs.push(readable(DATA_BUF, n));
        }
        descs.push(writable(STATUS, RESP_SIZE as u32));
        if let Some(n) = data_in {
            descs.push(writable(DATA_BUF, n));
        }
        self.send(&descs);
        let mut resp = [0u8; RESP_SIZE];
        self.mem
            .read_slice(&mut resp, GuestAddress(STATUS))
            .unwrap();
        let (status, response) = (resp[10], resp[11]);
        if response != 0 || status != 0 {
            return Err(format!(
                "SCSI response {response}, status {status:#x}, sense key {:#x} ASC/ASCQ {:#04x}/{:#04x}",
                resp[12 + 2] & 0x0f,
                resp[12 + 12],
                resp[12 + 13]
            ));
        }
        let mut data = vec![0u8; data_in.unwrap_or(0) as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(DATA_BUF))
            .unwrap();
        Ok(data)
    }

    /// READ CAPACITY(16)'s LBPRZ bit.
    fn lbprz(&mut self) -> Result<bool, String> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let data = self.scsi(&cdb, None, Some(32))?;
        Ok(data[14] & 0x40 != 0)
    }
}

impl Request {
    fn is_blk(self) -> bool {
        matches!(
            self,
            Request::BlkWriteZeroes { .. }
                | Request::BlkDiscard
                | Request::BlkWrite
                | Request::BlkFlush
        )
    }
}

/// A 16-byte CDB with an LBA and a block count.
fn cdb16(opcode: u8, byte1: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[1] = byte1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn blk_outcome(status: u8, offered: bool) -> Result<Outcome, String> {
    match u32::from(status) {
        VIRTIO_BLK_S_OK => Ok(Outcome::Good),
        VIRTIO_BLK_S_UNSUPP if !offered => Ok(Outcome::NotOffered),
        VIRTIO_BLK_S_UNSUPP => Err("offered, but refused as unsupported".into()),
        VIRTIO_BLK_S_IOERR => Err("failed with IOERR".into()),
        other => Err(format!("status {other}")),
    }
}
