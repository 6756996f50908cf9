//! The raw engine against real files: probing, growth, every operation with and without
//! O_DIRECT, linked syncs and completion signalling.

use super::*;
use crate::iobuf::{AlignedBuf, IoBuf};

/// Tokens and results, without the buffers.
fn results(done: &[DiskCompletion]) -> Vec<(u64, i32)> {
    done.iter().map(|c| (c.token, c.result)).collect()
}

/// An owned buffer of `len` bytes filled with `byte`.
fn filled(len: usize, align: usize, byte: u8) -> IoBuf {
    let mut buf = AlignedBuf::new(len, align).unwrap();
    buf.as_mut_slice().fill(byte);
    IoBuf::owned(buf)
}

fn disk_with(size: u64, direct: bool) -> (tempfile::TempDir, RawDisk) {
    // Under the target directory (ext4 here), not /tmp, so O_DIRECT is meaningful.
    let scratch = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
    std::fs::create_dir_all(scratch).unwrap();
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let disk = RawDisk::open(&RawDiskOptions {
        path: dir.path().join("sub/disk.raw"),
        readonly: false,
        direct,
        create_size: Some(size),
    })
    .unwrap();
    (dir, disk)
}

#[test]
fn deallocation_probe_leaves_size_and_data_alone() {
    let (dir, disk) = disk_with(10_000, false);
    assert!(disk.info().deallocate_zeroes, "ext4 punches holes");
    let path = dir.path().join("sub/disk.raw");
    std::fs::write(&path, vec![0x42u8; 10_000]).unwrap();
    let reopened = RawDisk::open(&RawDiskOptions {
        path: path.clone(),
        readonly: false,
        direct: false,
        create_size: None,
    })
    .unwrap();
    assert!(reopened.info().deallocate_zeroes);
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 10_000]);
    let readonly = RawDisk::open(&RawDiskOptions {
        path,
        readonly: true,
        direct: false,
        create_size: None,
    })
    .unwrap();
    assert!(!readonly.info().deallocate_zeroes, "never probed read-only");
}

#[test]
fn create_makes_sparse_file_of_size() {
    let (_dir, disk) = disk_with(1 << 20, false);
    assert_eq!(disk.info().size, 1 << 20);
    assert_eq!(disk.info().direct, None);
}

#[test]
fn grow_is_sparse_durable_and_never_shrinks() {
    use std::os::unix::fs::FileExt;
    let (dir, disk) = disk_with(1 << 20, true);
    let path = dir.path().join("sub/disk.raw");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[0x77; 4096], 0)
        .unwrap();
    assert_eq!(disk.grow(3 << 20).unwrap(), 1 << 20);
    assert_eq!(disk.current_size().unwrap(), 3 << 20);
    assert_eq!(
        disk.grow(2 << 20).unwrap(),
        3 << 20,
        "a smaller size is no shrink"
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 3 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "the new range is a hole");
    // Grown underneath (truncate -s): seen at once.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    assert_eq!(disk.current_size().unwrap(), 5 << 20);
    let data = std::fs::read(&path).unwrap();
    assert_eq!(&data[..4096], &[0x77; 4096][..]);
}

#[test]
fn missing_file_without_create_is_refused() {
    let err = RawDisk::open(&RawDiskOptions {
        path: "/nonexistent/x.raw".into(),
        readonly: false,
        direct: false,
        create_size: None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn write_read_zero_discard_round_trip_direct() {
    let (_dir, disk) = disk_with(1 << 20, true);
    assert!(disk.info().direct.is_some());
    let mut q = disk.new_queue(8).unwrap();
    q.push(
        DiskOp::Write {
            offset: 4096,
            buf: filled(8192, 4096, 0xab),
            durable: false,
        },
        1,
    )
    .unwrap();
    q.push(DiskOp::Flush, 2).unwrap();
    let mut done = Vec::new();
    q.drain(&mut done).unwrap();
    done.sort_by_key(|c| c.token);
    assert_eq!(results(&done), [(1, 8192), (2, 0)]);

    q.push(
        DiskOp::WriteZeroes {
            offset: 4096,
            len: 4096,
            unmap: false,
            durable: false,
        },
        3,
    )
    .unwrap();
    q.push(
        DiskOp::Discard {
            offset: 8192,
            len: 4096,
            durable: false,
        },
        4,
    )
    .unwrap();
    done.clear();
    q.drain(&mut done).unwrap();
    assert!(done.iter().all(|c| c.result == 0), "{done:?}");

    q.push(
        DiskOp::Read {
            offset: 0,
            buf: filled(12288, 4096, 0x55),
        },
        5,
    )
    .unwrap();
    q.submit().unwrap();
    done.clear();
    q.drain(&mut done).unwrap();
    assert_eq!(results(&done), [(5, 12288)]);
    let data = done[0].buf.as_ref().and_then(IoBuf::as_slice).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0), "never written");
    assert!(data[4096..8192].iter().all(|&b| b == 0), "zeroed");
    assert!(data[8192..].iter().all(|&b| b == 0), "discarded");
}

/// Pushes `op`, then reaps as the worker does (on eventfd wake-ups) until it completes;
/// returns its result and the syncs counted by then.
fn complete_one(q: &mut RawQueue, op: DiskOp) -> (i32, u64) {
    q.push(op, 7).unwrap();
    q.submit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        let mut pfd = libc::pollfd {
            fd: q.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "no completion within 5 s");
        q.reap(&mut done);
    }
    assert_eq!(done.len(), 1);
    assert_eq!(q.in_flight(), 0, "nothing left behind the completion");
    (done[0].result, q.stats().syncs.load(Ordering::Relaxed))
}

#[test]
fn durable_zeroing_and_discard_complete_after_their_linked_sync() {
    for direct in [false, true] {
        let (dir, disk) = disk_with(1 << 20, direct);
        std::fs::write(dir.path().join("sub/disk.raw"), vec![0x42u8; 1 << 20]).unwrap();
        let mut q = disk.new_queue(2).unwrap();
        let mut syncs = 0;
        let ops = [
            (0u64, false, false),
            (65536, true, false),
            (131072, false, true),
        ];
        for durable in [false, true] {
            for &(offset, unmap, discard) in &ops {
                let offset = offset + if durable { 4096 } else { 0 };
                let len = 4096;
                let op = if discard {
                    DiskOp::Discard {
                        offset,
                        len,
                        durable,
                    }
                } else {
                    DiskOp::WriteZeroes {
                        offset,
                        len,
                        unmap,
                        durable,
                    }
                };
                let (result, now) = complete_one(&mut q, op);
                assert_eq!(result, 0);
                assert_eq!(
                    now - syncs,
                    u64::from(durable),
                    "direct {direct}, durable {durable}, offset {offset}"
                );
                syncs = now;
            }
        }
        // Every zeroed block reads zero, the blocks between them kept their data.
        let data = std::fs::read(dir.path().join("sub/disk.raw")).unwrap();
        for &(offset, _, _) in &ops {
            let at = offset as usize;
            assert!(data[at..at + 8192].iter().all(|&b| b == 0));
            assert!(data[at + 8192..at + 12288].iter().all(|&b| b == 0x42));
        }
    }
}

#[test]
fn a_failed_fallocate_cancels_its_linked_sync() {
    let (_dir, disk) = disk_with(1 << 16, false);
    let mut q = disk.new_queue(2).unwrap();
    // offset + len overflows a signed file offset: the kernel refuses with EFBIG.
    let (result, syncs) = complete_one(
        &mut q,
        DiskOp::WriteZeroes {
            offset: 1 << 62,
            len: 1 << 62,
            unmap: true,
            durable: true,
        },
    );
    assert_eq!(result, -libc::EFBIG);
    assert_eq!(syncs, 0, "the linked fdatasync never ran");
    // The ring is fine afterwards: flushes and durable writes are counted.
    assert_eq!(complete_one(&mut q, DiskOp::Flush), (0, 1));
    let (result, _) = complete_one(
        &mut q,
        DiskOp::Write {
            offset: 0,
            buf: filled(4096, 1, 1),
            durable: true,
        },
    );
    assert_eq!(result, 4096);
    assert_eq!(q.stats().dsync_writes.load(Ordering::Relaxed), 1);
}

#[test]
fn completions_signal_the_eventfd() {
    let (_dir, disk) = disk_with(1 << 16, false);
    let mut q = disk.new_queue(4).unwrap();
    q.push(DiskOp::Flush, 9).unwrap();
    q.submit().unwrap();
    let mut pfd = libc::pollfd {
        fd: q.completion_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "completion eventfd never became readable");
    let mut done = Vec::new();
    while done.is_empty() {
        q.reap(&mut done);
    }
    assert_eq!(done[0].token, 9);
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn misaligned_direct_offset_is_refused_by_the_kernel() {
    let (_dir, disk) = disk_with(1 << 16, true);
    let align = disk.info().direct.unwrap().offset;
    let mut q = disk.new_queue(4).unwrap();
    // Holes skip the alignment check: write real data first.
    q.push(
        DiskOp::Write {
            offset: 0,
            buf: filled(align, 4096, 0),
            durable: true,
        },
        0,
    )
    .unwrap();
    let mut done = Vec::new();
    q.drain(&mut done).unwrap();
    assert_eq!(done[0].result, align as i32);
    done.clear();
    q.push(
        DiskOp::Read {
            offset: 1,
            buf: filled(align, 4096, 0),
        },
        1,
    )
    .unwrap();
    q.drain(&mut done).unwrap();
    assert_eq!(done[0].result, -libc::EINVAL);
}
