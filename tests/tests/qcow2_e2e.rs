//! qcow2 exports end to end: the real daemon driven by libblkio, every result checked by
//! QEMU's own tools (`qemu-img check`, `compare`, `snapshot`, `qemu-io`): randomized
//! workloads against a raw reference, backing chains, write-zeroes on a v2 overlay,
//! internal snapshots, and refusals (corrupt images, missing backing files, images locked
//! by another process).

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::blkio_frontend::{random_ops, Frontend, Op};
use appliance_tests::daemon::{scratch_dir, Appliance};
use appliance_tests::rng::Rng;
use blkio::ReqFlags;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn qemu_img_ok(args: &[&str]) -> String {
    let (ok, text) = qemu_img(args);
    assert!(ok, "qemu-img {args:?} failed:\n{text}");
    text
}

/// A 16 MiB qcow2 image at `path` whose every byte is 0x5a (written by qemu-io).
fn base_image_of_0x5a(path: &str) {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", path, "16M"]);
    let io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 16M", path])
        .output()
        .unwrap();
    assert!(
        io.status.success(),
        "{}",
        String::from_utf8_lossy(&io.stderr)
    );
}

fn export(name: &str, path: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    type: blk\n    socket: @DIR@/{name}.sock\n    path: @DIR@/{path}\n    format: qcow2\n    num_queues: 2\n{extra}"
    )
}

/// Applies `ops` to a raw reference file the way the device must: writes, and zeroes for
/// write-zeroes and discard (qcow2 discards read back as zeroes).
fn apply_to_reference(path: &Path, ops: &[Op]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let mut buf = vec![0u8; len];
                Rng::new(seed).fill(&mut buf);
                file.write_all_at(&buf, offset).unwrap();
            }
            Op::WriteZeroes { offset, len } | Op::Discard { offset, len } => {
                file.write_all_at(&vec![0u8; len as usize], offset).unwrap();
            }
            Op::Read { .. } | Op::Flush => {}
        }
    }
}

/// Runs `ops` alternating between the frontend's queues.
fn replay_on_queues(fe: &mut Frontend, ops: &[Op]) {
    let queues = fe.queues.len();
    for (i, op) in ops.iter().enumerate() {
        let q = i % queues;
        let ret = match *op {
            Op::Write { offset, len, seed } => {
                Rng::new(seed).fill(fe.buf(0, len));
                fe.write(q, offset, 0, len)
            }
            Op::Read { offset, len } => fe.read(q, offset, 0, len),
            Op::WriteZeroes { offset, len } => fe.write_zeroes(q, offset, len),
            Op::Discard { offset, len } => fe.discard(q, offset, len),
            Op::Flush => fe.flush(q),
        };
        assert_eq!(ret, 0, "op {i} {op:?} failed");
    }
}

#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn randomized_workload_matches_a_raw_reference_and_checks_clean() {
    const SIZE: u64 = 64 * MIB;
    let cfg = format!(
        "exports:\n{}",
        export("q", "q.qcow2", "    create: { size: 64M }\n")
    );
    let mut appliance = Appliance::start(&cfg, &["q.sock"]);
    let reference = appliance.path("reference.raw");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let mut fe = Frontend::connect(&appliance.path("q.sock"), 2);
    assert_eq!(fe.capacity, SIZE);
    let ops = random_ops(0x9c0, 500, SIZE);
    replay_on_queues(&mut fe, &ops);
    // Both queues at once: 64 writes in flight, 16 KiB each, so every 64 KiB cluster gets
    // its four pieces from both queues (the daemon's two workers allocate it concurrently).
    const PIECE: usize = 16 << 10;
    let mut rng = Rng::new(11);
    rng.fill(fe.buf(0, 64 * PIECE));
    for i in 0..64usize {
        let q = i % 2;
        let ptr = fe.ptr(i * PIECE);
        fe.queues[q].write(
            (32 * MIB) + (i * PIECE) as u64,
            ptr,
            PIECE,
            i,
            ReqFlags::empty(),
        );
    }
    let a = fe.wait(0, 32);
    let b = fe.wait(1, 32);
    assert!(a.iter().chain(&b).all(|&(_, ret)| ret == 0));
    let concurrent = fe.buf(0, 64 * PIECE).to_vec();
    assert_eq!(fe.flush(0), 0);
    drop(fe);
    apply_to_reference(&reference, &ops);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&reference)
        .unwrap()
        .write_all_at(&concurrent, 32 * MIB)
        .unwrap();

    // qemu-img needs the daemon's image lock released.
    assert!(appliance
        .process
        .terminate(Duration::from_secs(20))
        .success());
    let image = appliance.path("q.qcow2");
    let image = image.to_str().unwrap();
    let check = qemu_img_ok(&["check", image]);
    assert!(check.contains("No errors were found"), "{check}");
    let compare = qemu_img_ok(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        reference.to_str().unwrap(),
        image,
    ]);
    assert!(compare.contains("Images are identical"), "{compare}");
}

#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn backing_chain_reads_fall_through_and_writes_copy_on_write() {
    let dir = scratch_dir();
    let base = dir.path().join("base.qcow2");
    let base_s = base.to_str().unwrap();
    base_image_of_0x5a(base_s);
    let before = std::fs::read(&base).unwrap();
    // The daemon creates the overlay, with a relative backing path as qemu-img would.
    let cfg = format!(
        "exports:\n{}",
        export(
            "o",
            "overlay.qcow2",
            "    create: { size: 16M, backing: base.qcow2 }\n"
        )
    );
    let mut appliance = Appliance::start_in(dir, &cfg, &["o.sock"]);
    let mut fe = Frontend::connect(&appliance.path("o.sock"), 2);
    assert_eq!(fe.read(0, 4 * MIB, 0, 65536), 0);
    assert!(
        fe.buf(0, 65536).iter().all(|&b| b == 0x5a),
        "read falls through to the base"
    );
    fe.buf(0, 65536).fill(0xc3);
    assert_eq!(fe.write(1, 4 * MIB, 0, 65536), 0);
    assert_eq!(fe.discard(0, 8 * MIB, 65536), 0);
    assert_eq!(fe.flush(0), 0);
    assert_eq!(fe.read(0, 4 * MIB - 4096, MIB as usize, 8192), 0);
    let got = fe.buf(MIB as usize, 8192).to_vec();
    assert!(got[..4096].iter().all(|&b| b == 0x5a) && got[4096..].iter().all(|&b| b == 0xc3));
    assert_eq!(fe.read(1, 8 * MIB, 0, 65536), 0);
    assert!(
        fe.buf(0, 65536).iter().all(|&b| b == 0),
        "discarded range reads zero, not the base"
    );
    drop(fe);
    assert!(appliance
        .process
        .terminate(Duration::from_secs(20))
        .success());
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "the base image is byte-identical"
    );
    let overlay = appliance.path("overlay.qcow2");
    let info = qemu_img_ok(&["info", overlay.to_str().unwrap()]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    qemu_img_ok(&["check", overlay.to_str().unwrap()]);
}

/// The field fault: write-zeroes (unmap allowed, as libblkio sends it) on a qcow2 v2
/// (compat=0.10) overlay of a base that holds data used to fail with EIO, since v2 has no
/// zero clusters. It must succeed, read back as zeroes, never show the base, and leave an
/// image QEMU finds clean and reads the same way.
#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn write_zeroes_on_a_v2_overlay_hides_the_backing_file() {
    let dir = scratch_dir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (base_s, top_s) = (base.to_str().unwrap(), top.to_str().unwrap());
    base_image_of_0x5a(base_s);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top_s,
    ]);
    let before = std::fs::read(&base).unwrap();
    let cfg = format!("exports:\n{}", export("t", "top.qcow2", ""));
    let mut appliance = Appliance::start_in(dir, &cfg, &["t.sock"]);
    let mut fe = Frontend::connect(&appliance.path("t.sock"), 2);
    // Data of the overlay's own in the first cluster, then zeroes over part of it, a few
    // whole clusters and part of the next: every kind of cluster the range can touch.
    fe.buf(0, 65536).fill(0xc3);
    assert_eq!(fe.write(0, 0, 0, 65536), 0);
    let (start, len) = (32768u64, 3 * MIB);
    assert_eq!(
        fe.write_zeroes(1, start, len),
        0,
        "write-zeroes on a v2 overlay"
    );
    // And one more on the other queue, cluster-aligned.
    assert_eq!(fe.write_zeroes(0, 8 * MIB, MIB), 0);
    assert_eq!(fe.flush(0), 0);

    assert_eq!(fe.read(0, 0, 0, 5 * MIB as usize), 0);
    let back = fe.buf(0, 5 * MIB as usize).to_vec();
    let (s, e) = (start as usize, (start + len) as usize);
    assert!(back[..s].iter().all(|&b| b == 0xc3), "before the range");
    assert!(
        back[s..e].iter().all(|&b| b == 0),
        "the zeroed range shows {:#x} (0x5a is the base)",
        back[s..e].iter().find(|&&b| b != 0).unwrap()
    );
    assert!(
        back[e..].iter().all(|&b| b == 0x5a),
        "after the range: the base"
    );
    assert_eq!(fe.read(1, 8 * MIB, 0, MIB as usize), 0);
    assert!(fe.buf(0, MIB as usize).iter().all(|&b| b == 0));
    drop(fe);
    assert!(appliance
        .process
        .terminate(Duration::from_secs(20))
        .success());

    let check = qemu_img_ok(&["check", top_s]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(qemu_img_ok(&["info", top_s]).contains("compat: 0.10"));
    for (offset, len, pattern) in [
        (0, start, 0xc3),
        (start, len, 0),
        (start + len, 8 * MIB - start - len, 0x5a),
        (8 * MIB, MIB, 0),
        (9 * MIB, 7 * MIB, 0x5a),
    ] {
        let cmd = format!("read -P {pattern:#x} {offset} {len}");
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-c", &cmd, top_s])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "QEMU reads {cmd}: {text}"
        );
    }
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "the base is untouched"
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn internal_snapshots_keep_their_data() {
    let dir = scratch_dir();
    let image = dir.path().join("s.qcow2");
    let image_s = image.to_str().unwrap().to_string();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &image_s, "8M"]);
    let io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 8M", &image_s])
        .output()
        .unwrap();
    assert!(io.status.success());
    qemu_img_ok(&["snapshot", "-c", "s1", &image_s]);
    let cfg = format!("exports:\n{}", export("s", "s.qcow2", ""));
    let mut appliance = Appliance::start_in(dir, &cfg, &["s.sock"]);
    let mut fe = Frontend::connect(&appliance.path("s.sock"), 2);
    fe.buf(0, MIB as usize).fill(0x77);
    assert_eq!(fe.write(0, 0, 0, MIB as usize), 0);
    assert_eq!(fe.write_zeroes(1, 2 * MIB, MIB), 0);
    assert_eq!(fe.flush(0), 0);
    drop(fe);
    assert!(appliance
        .process
        .terminate(Duration::from_secs(20))
        .success());
    let check = qemu_img_ok(&["check", &image_s]);
    assert!(check.contains("No errors were found"), "{check}");
    // The current state has the new data; the snapshot still has the old.
    let current = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x77 0 1M", &image_s])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&current.stdout).contains("read 1048576"),
        "{}",
        String::from_utf8_lossy(&current.stdout)
    );
    qemu_img_ok(&["snapshot", "-a", "s1", &image_s]);
    let snap = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x11 0 8M", &image_s])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&snap.stdout);
    assert!(
        text.contains("read 8388608") && !text.contains("Pattern verification failed"),
        "{text}"
    );
}

#[test]
fn compressed_clusters_read_back() {
    let dir = scratch_dir();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 4 * MIB as usize];
    Rng::new(3).fill(&mut data[..MIB as usize]);
    data[MIB as usize..].fill(0x6b);
    std::fs::write(&raw, &data).unwrap();
    let image = dir.path().join("c.qcow2");
    qemu_img_ok(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert!(qemu_img_ok(&["info", image.to_str().unwrap()]).contains("compression type: zlib"));
    let cfg = format!("exports:\n{}", export("c", "c.qcow2", ""));
    let appliance = Appliance::start_in(dir, &cfg, &["c.sock"]);
    let mut fe = Frontend::connect(&appliance.path("c.sock"), 1);
    assert_eq!(fe.read(0, 0, 0, 4 * MIB as usize), 0);
    assert!(
        fe.buf(0, 4 * MIB as usize) == &data[..],
        "compressed clusters differ"
    );
    // Overwriting part of a compressed cluster copies it out.
    fe.buf(0, 4096).fill(0x01);
    assert_eq!(fe.write(0, 8192, 0, 4096), 0);
    assert_eq!(fe.read(0, 0, 0, 65536), 0);
    let back = fe.buf(0, 65536).to_vec();
    assert_eq!(&back[..8192], &data[..8192]);
    assert!(back[8192..12288].iter().all(|&b| b == 1));
    assert_eq!(&back[12288..], &data[12288..65536]);
}

#[test]
fn broken_missing_and_locked_images_are_refused_and_others_serve() {
    let dir = scratch_dir();
    let d = dir.path();
    // Not a qcow2 at all; a truncated header; a dangling backing file.
    std::fs::write(d.join("garbage.qcow2"), vec![0xabu8; 1 << 20]).unwrap();
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        d.join("trunc.qcow2").to_str().unwrap(),
        "8M",
    ]);
    std::fs::File::options()
        .write(true)
        .open(d.join("trunc.qcow2"))
        .unwrap()
        .set_len(40)
        .unwrap();
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        d.join("b.qcow2").to_str().unwrap(),
        "8M",
    ]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        d.join("o.qcow2").to_str().unwrap(),
    ]);
    std::fs::remove_file(d.join("b.qcow2")).unwrap();
    // zstd compression: an incompatible feature imago does not support.
    let zstd = d.join("zstd.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        zstd.to_str().unwrap(),
        "8M",
    ]);
    // Held for writing by qemu-storage-daemon.
    let locked = d.join("locked.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        locked.to_str().unwrap(),
        "8M",
    ]);
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            locked.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            d.join("qsd.sock").display()
        ))
        .spawn()
        .unwrap();
    let mut qsd = KillOnDrop(qsd);
    for _ in 0..200 {
        if d.join("qsd.sock").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg = format!(
        "exports:\n{}{}{}{}{}{}",
        export("zstd", "zstd.qcow2", ""),
        export("garbage", "garbage.qcow2", ""),
        export("trunc", "trunc.qcow2", ""),
        export("dangling", "o.qcow2", ""),
        export("locked", "locked.qcow2", ""),
        export("good", "good.qcow2", "    create: { size: 8M }\n"),
    );
    let appliance = Appliance::start_in(dir, &cfg, &["good.sock"]);
    let mut fe = Frontend::connect(&appliance.path("good.sock"), 1);
    assert_eq!(fe.write(0, 0, 0, 4096), 0, "the good export serves");
    let log = appliance.process.log();
    for name in ["zstd", "garbage", "trunc", "dangling", "locked"] {
        assert!(
            !appliance.path(&format!("{name}.sock")).exists(),
            "{name} must not be served"
        );
        assert!(
            log.contains(&format!("export=\"{name}\"")),
            "no error logged for {name}:\n{log}"
        );
    }
    assert!(
        log.contains("is in use"),
        "lock conflict not explained:\n{log}"
    );
    assert!(log.contains("serving 1 of 6 exports"), "{log}");
    assert!(
        log.contains("incompatible feature"),
        "zstd refusal not explained:\n{log}"
    );
    qsd.kill();
    // And the other way round: while the daemon has an image open for writing, QEMU's
    // tools see its lock.
    let good = appliance.path("good.qcow2");
    let (ok, text) = qemu_img(&["info", good.to_str().unwrap()]);
    assert!(
        !ok && text.contains("lock"),
        "qemu-img did not see the daemon's lock:\n{text}"
    );
    drop(fe);
}

/// Kills a child on drop.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
