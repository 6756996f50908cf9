//! Power cut of the appliance VM: its QEMU is SIGKILLed while a consumer writes, and every
//! write the consumer saw acknowledged as durable must survive.
//!
//! The appliance VM serves three virtio-blk LUNs from its config drive (which
//! `launch-appliance.sh` opens with `cache=none`, so what the appliance guest flushed is in
//! the host file and nothing else is): a raw image through the appliance guest's page cache
//! (`direct: false`, so only an fdatasync gets its data out) and a qcow2 image (whose
//! metadata imago caches until a flush) in writeback mode, where the
//! consumer writes 4 KiB records with buffered `dd` and `fsync`s every eighth one (a record
//! counts as acknowledged once an fsync after it returned), and a raw image in writethrough
//! mode (page cache too), where every direct write that completes is acknowledged. Once each LUN has a few
//! acknowledged syncs, the appliance VM's QEMU is killed. Then:
//!
//! - on the host, a copy of the config drive gets its journal replayed (`e2fsck`), and the
//!   images dumped from it hold every acknowledged record; `qemu-img check` finds the qcow2
//!   image clean or with leaked clusters only (reclaimed by `-r leaks`), never corrupt;
//! - the appliance VM is started again on the same drive, the consumer reconnects
//!   (`reconnect-ms`) and reads every acknowledged record back through the daemon.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::appliance_vm::{self, ApplianceVmOptions, VvuSocket};
use appliance_tests::daemon::scratch_dir;
use appliance_tests::vm::{Vm, VmOptions};

const MINUTE: Duration = Duration::from_secs(60);
/// Bytes of a record (one per 4 KiB block, block i holds record i).
const RECORD: usize = 4096;
/// Acknowledged records each LUN must have before the power cut.
const ACKED_BEFORE_CUT: u32 = 24;

const EXPORTS: &str = "\
exports:
  - name: rawwb
    type: blk
    vvu: 0000:00:10.0
    path: rawwb.img
    create: { size: 16M }
    direct: false
  - name: qcowwb
    type: blk
    vvu: 0000:00:11.0
    path: qcowwb.qcow2
    format: qcow2
    create: { size: 16M }
  - name: rawwt
    type: blk
    vvu: 0000:00:12.0
    path: rawwt.img
    create: { size: 16M }
    direct: false
    write_cache: writethrough
";

/// The LUNs: export name (also the disk's serial), image file, whether each write is
/// acknowledged on its own (writethrough) rather than by the fsync after it.
const LUNS: [(&str, &str, bool); 3] = [
    ("rawwb", "rawwb.img", false),
    ("qcowwb", "qcowwb.qcow2", false),
    ("rawwt", "rawwt.img", true),
];

fn appliance_options(reuse: bool) -> ApplianceVmOptions {
    let mut options = ApplianceVmOptions::new(
        EXPORTS,
        LUNS.iter()
            .map(|(name, _, _)| VvuSocket::at(&format!("{name}.sock")))
            .collect(),
        LUNS.len(),
    );
    options.reuse_config_drive = reuse;
    options
}

/// The record in block `i` of LUN `name`: a text line, zero-padded to 4 KiB by `dd`.
fn record(name: &str, i: u32) -> String {
    format!("rec {name} {i:08}\n")
}

/// The background writer of one LUN in the consumer: record after record at block i,
/// appending i to /tmp/NAME.acked when it is durable; stops at /tmp/stop.
fn writer(name: &str, dev: &str, writethrough: bool) -> String {
    let write = if writethrough {
        format!(
            "dd if=/tmp/{name}.rec of=/dev/{dev} bs=4096 seek=$i count=1 conv=notrunc,sync oflag=direct 2>/dev/null || break; echo $i >> /tmp/{name}.acked"
        )
    } else {
        format!(
            "if [ $((i % 8)) -eq 0 ]; then c=notrunc,sync,fsync; else c=notrunc,sync; fi; \
             dd if=/tmp/{name}.rec of=/dev/{dev} bs=4096 seek=$i count=1 conv=$c 2>/dev/null || break; \
             [ $((i % 8)) -eq 0 ] && echo $i >> /tmp/{name}.acked"
        )
    };
    format!(
        "(i=0; while [ ! -f /tmp/stop ] && [ $i -lt 4000 ]; do i=$((i+1)); \
         printf 'rec {name} %08d\\n' $i > /tmp/{name}.rec; {write}; done) </dev/null >/dev/null 2>&1 &"
    )
}

/// The highest acknowledged record of each LUN, as the consumer saw it.
fn acked(vm: &mut Vm) -> Vec<u32> {
    LUNS.iter()
        .map(|(name, _, _)| {
            let out = vm.run_ok(
                &format!("tail -n 1 /tmp/{name}.acked 2>/dev/null || echo 0"),
                MINUTE,
            );
            out.lines().last().unwrap().trim().parse().unwrap_or(0)
        })
        .collect()
}

/// Records `1..=acked` of `name` that `image` (raw bytes) does not hold.
fn missing_records(image: &[u8], name: &str, acked: u32) -> Vec<u32> {
    (1..=acked)
        .filter(|&i| {
            let at = i as usize * RECORD;
            let want = record(name, i);
            image.get(at..at + want.len()) != Some(want.as_bytes())
        })
        .collect()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    eprintln!(
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What a restart would find: the config drive's journal replayed (on a copy), the images
/// dumped to `dir`.
fn dump_images(drive: &Path, dir: &Path) {
    let copy = dir.join("config-after-cut.img");
    std::fs::copy(drive, &copy).expect("copy the config drive");
    let fsck = run(Command::new("e2fsck").arg("-fy").arg(&copy));
    // 0: clean, 1: errors corrected (a replayed journal counts as one).
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "the config drive's file system is damaged beyond repair"
    );
    for (_, file, _) in LUNS {
        let out = run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{file} {}", dir.join(file).display()))
            .arg(&copy));
        assert!(out.status.success(), "debugfs dump of {file}");
    }
}

#[test]
#[ignore = "full tier (tests/run.sh): boots an appliance VM twice and a consumer VM"]
fn acknowledged_writes_survive_a_power_cut_of_the_appliance_vm() {
    let sockets = scratch_dir();
    let mut appliance = appliance_vm::start(sockets.path(), &appliance_options(false));
    let chardevs = LUNS.iter().flat_map(|(name, _, _)| {
        [
            "-chardev".to_string(),
            format!(
                "socket,id={name},path={},reconnect-ms=1000",
                sockets.path().join(format!("{name}.sock")).display()
            ),
            "-device".to_string(),
            format!("vhost-user-blk-pci,id={name},chardev={name},num-queues=1"),
        ]
    });
    let mut vm = Vm::boot(&VmOptions {
        extra_args: chardevs.collect(),
        ..VmOptions::default()
    });
    let devs: Vec<String> = LUNS
        .iter()
        .map(|(name, _, _)| vm.wait_for_blk(name, Duration::from_secs(60)))
        .collect();
    let writers: Vec<String> = LUNS
        .iter()
        .zip(&devs)
        .map(|((name, _, wt), dev)| writer(name, dev, *wt))
        .collect();
    vm.run_ok(&writers.join("\n"), MINUTE);

    let deadline = Instant::now() + 10 * MINUTE;
    loop {
        let now = acked(&mut vm);
        if now.iter().all(|&a| a >= ACKED_BEFORE_CUT) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writers did not get going: {now:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // The cut. Nothing can be acknowledged after it: the LUNs are gone.
    appliance.kill();
    vm.run_ok("touch /tmp/stop", MINUTE);
    let acked = acked(&mut vm);
    eprintln!("acknowledged before the power cut: {acked:?}");
    drop(appliance);

    // What is on the host file.
    let dumps = scratch_dir();
    dump_images(&sockets.path().join("config.img"), dumps.path());
    // Clean, or leaked clusters only: a cut between a cluster's refcount update and the L2
    // entry that would use it leaves the cluster allocated but unused (the qcow2 crash model;
    // QEMU's own driver leaves the same). Leaks are reclaimed with `-r leaks`; anything else
    // (exit 2: corruption) fails.
    let qcow2 = dumps.path().join("qcowwb.qcow2");
    let check = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&qcow2));
    match check.status.code() {
        Some(0) => {}
        Some(3) => {
            let repair = run(Command::new("qemu-img")
                .args(["check", "-r", "leaks", "-f", "qcow2"])
                .arg(&qcow2));
            assert_eq!(
                repair.status.code(),
                Some(0),
                "leaks were not all reclaimed"
            );
        }
        other => panic!("qemu-img check found the qcow2 image damaged: {other:?}"),
    }
    let qraw = dumps.path().join("qcowwb.raw");
    let convert = run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(dumps.path().join("qcowwb.qcow2"))
        .arg(&qraw));
    assert!(convert.status.success());
    for ((name, file, _), &n) in LUNS.iter().zip(&acked) {
        let path = if *file == "qcowwb.qcow2" {
            qraw.clone()
        } else {
            dumps.path().join(file)
        };
        let image = std::fs::read(&path).expect("read a dumped image");
        // Informative: how far the writer got beyond what was acknowledged (what a cut may
        // lose: the page cache of the appliance guest, imago's unflushed metadata).
        let beyond = (n + 1..4000)
            .take_while(|&i| missing_records(&image, name, i).is_empty())
            .count();
        eprintln!("{name}: {n} records acknowledged, {beyond} more on disk after the cut");
        let missing = missing_records(&image, name, n);
        assert!(
            missing.is_empty(),
            "{name}: acknowledged records lost in the host file: {missing:?}"
        );
    }

    // Restarted on the same drive, the appliance serves them again and the consumer, which
    // reconnects by itself, reads every acknowledged record back.
    let mut appliance = appliance_vm::start(sockets.path(), &appliance_options(true));
    for ((name, _, _), (dev, &n)) in LUNS.iter().zip(devs.iter().zip(&acked)) {
        let out = vm.run_ok(
            &format!(
                "i=1; bad=0; while [ $i -le {n} ]; do \
                 got=$(dd if=/dev/{dev} bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | head -n 1); \
                 [ \"$got\" = \"$(printf 'rec {name} %08d' $i)\" ] || {{ echo MISSING $i; bad=1; }}; \
                 i=$((i+1)); done; echo CHECKED {name} {n}; exit $bad"
            ),
            5 * MINUTE,
        );
        assert!(out.contains(&format!("CHECKED {name} {n}")), "{out}");
    }
    let log = appliance.run_ok(
        "grep -ciE 'panicked|error' /config/appliance.log || true",
        MINUTE,
    );
    eprintln!("appliance log errors after the restart: {log}");
}
