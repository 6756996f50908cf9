//! The executor and io_uring storage under concurrency: several queues on their own
//! threads allocating the same clusters, checked against the expected bytes and by
//! `qemu-img check`.

use std::path::Path;
use std::process::Command;

use super::*;
use crate::disk::DiskCompletion;

const BLOCK: usize = 4096;

fn scratch_dir() -> tempfile::TempDir {
    let scratch = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
    std::fs::create_dir_all(scratch).unwrap();
    tempfile::tempdir_in(scratch).unwrap()
}

fn create(path: &Path, size: u64) -> Qcow2Disk {
    create_with(path, size, false)
}

fn create_with(path: &Path, size: u64, direct: bool) -> Qcow2Disk {
    Qcow2Disk::open(&Qcow2Options {
        path: path.to_path_buf(),
        readonly: false,
        direct,
        create: Some((size, None)),
    })
    .unwrap()
}

/// An owned buffer holding `bytes`, for an operation to own.
fn owned(bytes: &[u8]) -> IoBuf {
    let mut buf = AlignedBuf::new(bytes.len(), 1).unwrap();
    buf.as_mut_slice().copy_from_slice(bytes);
    IoBuf::owned(buf)
}

/// The bytes block `block` holds after writer `writer` wrote it.
fn pattern(writer: usize, block: usize) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (writer * 31 + block * 7 + i / 64) as u8 | 1)
        .collect()
}

/// Waits on the queue's eventfd until `n` completions arrived.
fn reap_all(q: &mut Qcow2Queue, n: usize) -> Vec<DiskCompletion> {
    let mut done = Vec::new();
    while done.len() < n {
        let mut pfd = libc::pollfd {
            fd: q.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert!(rc > 0, "no completion within 10 s ({} of {n})", done.len());
        q.reap(&mut done);
    }
    assert_eq!(done.len(), n);
    done
}

/// Reads `len` bytes from offset 0 through `q` into a buffer filled with `fill` first, and
/// checks the whole read completed.
fn read_back(q: &mut Qcow2Queue, len: usize, fill: u8) -> Vec<u8> {
    let op = DiskOp::Read {
        offset: 0,
        buf: owned(&vec![fill; len]),
    };
    q.push(op, 0).unwrap();
    let mut done = Vec::new();
    q.drain(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, len as i32, "short or failed read");
    let back = done.pop().and_then(|c| c.buf).and_then(IoBuf::into_owned);
    back.unwrap().as_slice().to_vec()
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img (tests/scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): needs qemu-img from tests/scripts/install-deps.sh"]
fn queues_on_threads_allocating_the_same_clusters_keep_every_write() {
    queues_allocating_the_same_clusters(false);
}

#[test]
#[ignore = "full tier (tests/run.sh): needs qemu-img from tests/scripts/install-deps.sh"]
fn queues_allocating_the_same_clusters_with_o_direct_keep_every_write() {
    queues_allocating_the_same_clusters(true);
}

fn queues_allocating_the_same_clusters(direct: bool) {
    const WRITERS: usize = 4;
    const BLOCKS: usize = 1024; // 4 MiB: 64 clusters of 64 KiB, each shared by all writers
    const BATCH: usize = 32;
    let dir = scratch_dir();
    let path = dir.path().join("shared.qcow2");
    let disk = create_with(&path, (BLOCKS * BLOCK) as u64, direct);
    assert_eq!(disk.info().direct.is_some(), direct);

    std::thread::scope(|s| {
        for writer in 0..WRITERS {
            let mut q = disk.new_queue(BATCH as u32, None).unwrap();
            s.spawn(move || {
                // Block b belongs to writer b % WRITERS: neighbours in one cluster belong to
                // different queues, so cluster allocation races between threads.
                let blocks: Vec<usize> = (writer..BLOCKS).step_by(WRITERS).collect();
                for batch in blocks.chunks(BATCH) {
                    for &b in batch {
                        let op = DiskOp::Write {
                            offset: (b * BLOCK) as u64,
                            buf: owned(&pattern(writer, b)),
                            durable: false,
                        };
                        q.push(op, b as u64).unwrap();
                    }
                    q.submit().unwrap();
                    for c in reap_all(&mut q, batch.len()) {
                        assert_eq!(c.result, BLOCK as i32, "write of block {}", c.token);
                    }
                }
                assert!(
                    q.ring().started() >= blocks.len() as u64,
                    "writes went through the queue's io_uring ({} started)",
                    q.ring().started()
                );
            });
        }
    });

    let mut q = disk.new_queue(8, None).unwrap();
    let all = read_back(&mut q, BLOCKS * BLOCK, 0);
    q.push(DiskOp::Flush, 1).unwrap();
    let mut done = Vec::new();
    q.drain(&mut done).unwrap();
    assert_eq!(done[0].result, 0);
    for (b, got) in all.chunks(BLOCK).enumerate() {
        assert!(
            got == pattern(b % WRITERS, b).as_slice(),
            "block {b} lost its write"
        );
    }
    drop(q);
    drop(disk);
    qemu_img_check(&path);
}

#[test]
fn dropping_a_queue_finishes_what_it_started() {
    let dir = scratch_dir();
    let path = dir.path().join("drop.qcow2");
    let disk = create(&path, 1 << 20);
    let mut q = disk.new_queue(16, None).unwrap();
    for b in 0..16 {
        let op = DiskOp::Write {
            offset: (b * BLOCK) as u64,
            buf: owned(&pattern(0, b)),
            durable: false,
        };
        q.push(op, b as u64).unwrap();
    }
    q.submit().unwrap();
    // The queue owns the buffers: dropping it finishes the writes before they go.
    drop(q);

    let mut q = disk.new_queue(4, None).unwrap();
    let back = read_back(&mut q, 16 * BLOCK, 0);
    for (b, got) in back.chunks(BLOCK).enumerate() {
        assert!(got == pattern(0, b).as_slice(), "block {b}");
    }
}

#[test]
#[ignore = "full tier (tests/run.sh): needs qemu-img from tests/scripts/install-deps.sh"]
fn discard_and_write_zeroes_from_two_queues_read_back_as_zeroes() {
    let dir = scratch_dir();
    let path = dir.path().join("zero.qcow2");
    let disk = create(&path, 4 << 20);
    let mut data: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    let mut q0 = disk.new_queue(8, None).unwrap();
    let mut q1 = disk.new_queue(8, None).unwrap();
    q0.push(
        DiskOp::Write {
            offset: 0,
            buf: owned(&data),
            durable: true,
        },
        0,
    )
    .unwrap();
    let mut done = Vec::new();
    q0.drain(&mut done).unwrap();
    assert_eq!(done[0].result, 4 << 20);

    // Whole clusters, a partial cluster, and zeroes without unmapping, on both queues at once.
    let ranges = [
        (0u64, 1u64 << 20, true),
        (1 << 20, 100_000, false),
        (3 << 20, 65536, true),
    ];
    for (i, &(offset, len, discard)) in ranges.iter().enumerate() {
        let op = if discard {
            DiskOp::Discard {
                offset,
                len,
                durable: false,
            }
        } else {
            DiskOp::WriteZeroes {
                offset,
                len,
                unmap: false,
                durable: false,
            }
        };
        let q = if i % 2 == 0 { &mut q0 } else { &mut q1 };
        q.push(op, i as u64).unwrap();
        q.submit().unwrap();
    }
    done.clear();
    q0.drain(&mut done).unwrap();
    q1.drain(&mut done).unwrap();
    assert_eq!(done.len(), ranges.len());
    assert!(done.iter().all(|c| c.result == 0), "{done:?}");

    let back = read_back(&mut q1, 4 << 20, 0xff);
    for &(offset, len, _) in &ranges {
        data[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(back == data, "zeroed ranges or the data around them differ");
    drop((q0, q1));
    drop(disk);
    qemu_img_check(&path);
}

#[test]
#[ignore = "full tier (tests/run.sh): needs qemu-img from tests/scripts/install-deps.sh"]
fn a_grown_image_reads_zeroes_past_the_old_end_even_over_a_longer_backing_file() {
    let dir = scratch_dir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xaa; 4 << 20]).unwrap();
    let path = dir.path().join("grow.qcow2");
    let disk = Qcow2Disk::open(&Qcow2Options {
        path: path.clone(),
        readonly: false,
        direct: false,
        create: Some((1 << 20, Some("base.raw".into()))),
    })
    .unwrap();
    // A queue opened before the growth serves the new range after it.
    let mut q = disk.new_queue(8, None).unwrap();
    assert_eq!(disk.grow(4 << 20).unwrap(), 1 << 20);
    assert_eq!(disk.current_size(), 4 << 20);
    assert_eq!(disk.grow(2 << 20).unwrap(), 4 << 20, "never shrinks");
    assert_eq!(disk.current_size(), 4 << 20);

    let block = pattern(1, 768);
    q.push(
        DiskOp::Write {
            offset: 3 << 20,
            buf: owned(&block),
            durable: false,
        },
        0,
    )
    .unwrap();
    let mut done = Vec::new();
    q.drain(&mut done).unwrap();
    assert_eq!(done[0].result, BLOCK as i32);
    let back = read_back(&mut q, 4 << 20, 0x55);
    assert!(back[..1 << 20].iter().all(|&b| b == 0xaa), "the base below");
    let (grown, written) = back[1 << 20..].split_at(2 << 20);
    assert!(grown.iter().all(|&b| b == 0), "zeroes over the base");
    assert!(written[..BLOCK] == block[..], "a write into the new range");
    assert!(written[BLOCK..].iter().all(|&b| b == 0));
    drop(q);
    drop(disk);
    qemu_img_check(&path);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&path)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 4 << 20)),
        "{info}"
    );
}
