//! Appliance-VM mode end to end: the daemon runs inside an appliance VM started by
//! `image-builder/launch-appliance.sh` (patched QEMU, intel-iommu, config drive, one
//! virtio-vhost-user-pci device per consumer socket) and serves consumer VMs running stock
//! QEMU, which attach `vhost-user-blk-pci` at boot and hotplug `vhost-user-scsi-pci` over
//! QMP. The guests format, fsck and fio-verify the LUNs; the bytes must then be in the
//! backing files inside the appliance VM. Consumers are killed mid-I/O and replaced while
//! the appliance VM keeps running, and 50 sessions through the bridge leave the daemon's
//! fds, threads and address space where they were.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::appliance_vm::{self, free_port, md5_of, ApplianceVmOptions, VvuSocket};
use appliance_tests::blk_raw;
use appliance_tests::daemon::scratch_dir;
use appliance_tests::frontend::RawFrontend;
use appliance_tests::prom;
use appliance_tests::vm::{filesystem_and_fio_script, BlkAtBoot, Vm, VmOptions};
use serde_json::json;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VringConfigData};

const MINUTE: Duration = Duration::from_secs(60);
const SCSI_UUID: &str = "0b7c3a52-91d4-4c1e-8f3a-5e2d7c9b1a60";

const EXPORTS: &str = "\
metrics:
  listen: 0.0.0.0:9410
exports:
  - name: vol0
    type: blk
    vvu: 0000:00:10.0
    path: vol0.raw
    create: { size: 64M }
    num_queues: 2
  - name: scsi0
    type: scsi
    vvu: 0b7c3a52-91d4-4c1e-8f3a-5e2d7c9b1a60
    luns:
      - path: lun0.raw
        create: { size: 64M }
        direct: false
      - lun: 1
        path: lun1.qcow2
        format: qcow2
        create: { size: 32M }
";

/// The daemon's metrics, scraped from the host's 127.0.0.1:`port` (the forwarded port).
fn scrape(port: u16) -> prom::Scrape {
    prom::scrape(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The appliance VM as a user starts it, serving vol0.sock (0000:00:10.0) and scsi0.sock
/// (by uuid), with the metrics port forwarded to `metrics_port` on the host.
fn start_appliance(sockets: &Path, metrics_port: u16) -> Vm {
    let mut options = ApplianceVmOptions::new(
        EXPORTS,
        vec![
            VvuSocket::at("vol0.sock"),
            VvuSocket::with_uuid("scsi0.sock", SCSI_UUID),
        ],
        2,
    );
    options.metrics_port = Some(metrics_port);
    appliance_vm::start(sockets, &options)
}

/// An md5 of the first `mib` MiB of a guest block device, read past the page cache.
fn device_md5(vm: &mut Vm, dev: &str, mib: u32) -> String {
    let out = vm.run_ok(
        &format!("dd if=/dev/{dev} bs=1M count={mib} iflag=direct 2>/dev/null | md5sum"),
        MINUTE,
    );
    md5_of(&out)
}

/// The backing file inside the appliance VM holds what the consumer reads.
fn assert_backing_file_matches(appliance: &mut Vm, file: &str, consumer_md5: &str) {
    let out = appliance.run_ok(&format!("md5sum /config/{file}"), MINUTE);
    assert_eq!(
        md5_of(&out),
        consumer_md5,
        "{file} inside the appliance VM differs from what the consumer reads"
    );
}

fn consumer(sockets: &Path) -> Vm {
    Vm::boot(&VmOptions {
        blk: vec![BlkAtBoot {
            id: "vol0".into(),
            socket: sockets.join("vol0.sock"),
            num_queues: 2,
        }],
        hotplug_ports: 1,
        ..VmOptions::default()
    })
}

/// Hotplugs the scsi export and returns the block device of its LUN 0.
fn hotplug_scsi(vm: &mut Vm, sockets: &Path, id: &str) -> String {
    let qmp = vm.qmp();
    qmp.chardev_add_socket(id, &sockets.join("scsi0.sock"), 1000)
        .expect("chardev-add");
    qmp.device_add(
        "vhost-user-scsi-pci",
        id,
        "hp0",
        json!({ "chardev": id, "num_queues": 1 }),
    )
    .expect("device_add vhost-user-scsi-pci");
    let out = vm.run_ok(
        "i=0; while ! ls -d /sys/bus/scsi/devices/*:0:0:0/block/* >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; basename $(ls -d /sys/bus/scsi/devices/*:0:0:0/block/* | head -1)",
        2 * MINUTE,
    );
    out.lines().last().unwrap().trim().to_string()
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn consumers_are_served_from_inside_the_appliance_vm() {
    let sockets = scratch_dir();
    let metrics_port = free_port();
    let mut appliance = start_appliance(sockets.path(), metrics_port);

    // The management network: the daemon's metrics endpoint inside the VM is reachable
    // from the host through the forwarded port.
    let metrics = scrape(metrics_port);
    assert_eq!(
        metrics.value("vhost_appliance_exports", &[("state", "serving")]),
        2.0
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_consumers(&mut appliance, sockets.path(), metrics_port)
    }));
    if let Err(panic) = result {
        // What the appliance VM saw, for the failure report.
        let out = appliance.run("tail -40 /config/appliance.log; dmesg | tail -20", MINUTE);
        eprintln!("appliance VM after the failure:\n{}", out.output);
        std::panic::resume_unwind(panic);
    }
}

fn serve_consumers(appliance: &mut Vm, sockets: &Path, metrics_port: u16) {
    // vhost-user-blk at boot: the whole guest-side check, then the bytes inside the
    // appliance VM.
    let mut first = consumer(sockets);
    let blk = first.wait_for_blk("vol0", MINUTE);
    let out = first.run_ok(&filesystem_and_fio_script(&blk), 10 * MINUTE);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");
    let md5 = device_md5(&mut first, &blk, 64);
    assert_backing_file_matches(appliance, "vol0.raw", &md5);

    // vhost-user-scsi hotplugged on QMP: a new LUN, the same checks.
    let sd = hotplug_scsi(&mut first, sockets, "scsi0");
    let out = first.run_ok(&filesystem_and_fio_script(&sd), 10 * MINUTE);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");
    let md5 = device_md5(&mut first, &sd, 64);
    assert_backing_file_matches(appliance, "lun0.raw", &md5);

    // LUN 1 is a qcow2 image opened with O_DIRECT inside the appliance VM: its requests
    // bounce out of the BAR into pinnable buffers. Verified writes here, the image itself
    // on the host once the daemon has stopped.
    let qcow2_lun = first.run_ok(
        "basename $(ls -d /sys/bus/scsi/devices/*:0:0:1/block/* | head -1)",
        MINUTE,
    );
    let qcow2_lun = qcow2_lun.lines().last().unwrap().trim().to_string();
    first.run_ok(
        &format!(
            "set -e; fio --name=q --filename=/dev/{qcow2_lun} --ioengine=io_uring --iodepth=16 --direct=1 \
             --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 --minimal; \
             dd if=/dev/urandom of=/tmp/q bs=64k count=64 2>/dev/null; \
             dd if=/tmp/q of=/dev/{qcow2_lun} bs=64k seek=256 oflag=direct 2>/dev/null; \
             dd if=/dev/{qcow2_lun} of=/tmp/r bs=64k skip=256 count=64 iflag=direct 2>/dev/null; cmp /tmp/q /tmp/r"
        ),
        5 * MINUTE,
    );
    let qcow2_md5 = device_md5(&mut first, &qcow2_lun, 32);

    // Stopped mid-I/O: the consumer's QEMU gets SIGTERM (SIGKILL 5 s on) with writes in
    // flight on both exports, and stops the rings (GET_VRING_BASE) while it exits.
    first.run_ok(
        &format!(
            "for d in {blk} {sd}; do fio --name=bg-$d --filename=/dev/$d --ioengine=io_uring --iodepth=16 --direct=1 --rw=randwrite --bs=4k --size=32M --time_based --runtime=120 >/dev/null 2>&1 & done; sleep 3"
        ),
        MINUTE,
    );
    drop(first);
    // The disconnect is logged (counted in the whole log since the daemon started, not in
    // a tail), and the daemon is still the one that started, 2 s on.
    appliance_vm::wait_for_daemon_log(appliance, "frontend disconnected", 1);
    appliance.run_ok("sleep 2", MINUTE);
    assert!(
        appliance_vm::daemon_alive(appliance),
        "{}",
        appliance_vm::daemon_log(appliance)
    );

    // Session churn through the bridge: frontends that connect, ask one thing and vanish.
    // Each gets its answer from the daemon inside the VM; none disturbs the next. (The
    // vhost crate's frontend has no timeouts, so a watchdog turns a hang into a failure.)
    let socket = sockets.join("vol0.sock");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // First a frontend whose vring addresses map nothing (it sent no memory table): the
        // backend inside the VM refuses it and ends the session, the bridge drops it, and
        // nothing else is disturbed.
        let hostile = || -> Result<(), String> {
            let frontend = Frontend::connect(&socket, 1).map_err(|e| format!("hostile: {e}"))?;
            frontend.set_owner().map_err(|e| format!("hostile: {e}"))?;
            let nowhere = VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: 0xdead_0000,
                used_ring_addr: 0xdead_1000,
                avail_ring_addr: 0xdead_2000,
                log_addr: None,
            };
            let _ = frontend.set_vring_addr(0, &nowhere);
            match frontend.get_features() {
                Err(_) => Ok(()),
                Ok(_) => Err("hostile: the session survived vring addresses outside memory".into()),
            }
        };
        if let Err(e) = hostile() {
            let _ = done.send(Err(e));
            return;
        }
        let result = (0..10).try_for_each(|i| {
            let frontend = Frontend::connect(&socket, 1).map_err(|e| format!("{i}: {e}"))?;
            let features = frontend.get_features().map_err(|e| format!("{i}: {e}"))?;
            if features & (1 << 32) == 0 {
                return Err(format!("{i}: VIRTIO_F_VERSION_1 not offered"));
            }
            if i % 2 == 0 {
                frontend.set_owner().map_err(|e| format!("{i}: {e}"))?;
            }
            Ok(())
        });
        let _ = done.send(result);
    });
    match finished.recv_timeout(2 * MINUTE) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("frontend {e}"),
        Err(_) => panic!("a frontend got no answer through the bridge within 2 minutes"),
    }

    // 50 whole sessions through the bridge (memory table, vrings, one read each, hang
    // up): the daemon inside the VM holds the same fds and threads afterwards, and its
    // address space has not grown by more than allocator noise.
    let before = settled_usage(appliance, None);
    let socket = sockets.join("vol0.sock");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..50u64 {
            let mut fe = RawFrontend::connect(&socket, 64, u64::MAX);
            let (used, status) = blk_raw::read(&mut fe, i * 8, 4096);
            if (used, status) != (4097, 0) {
                let _ = done.send(Err(format!(
                    "session {i}: read answered {used} bytes, status {status}"
                )));
                return;
            }
        }
        let _ = done.send(Ok(()));
    });
    match finished.recv_timeout(5 * MINUTE) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("50 sessions through the bridge did not finish within 5 minutes"),
    }
    let after = settled_usage(appliance, Some(before));
    let connections = scrape(metrics_port).value(
        "vhost_appliance_export_connections_total",
        &[("export", "vol0")],
    );
    assert!(
        connections >= 50.0,
        "vol0 counted {connections} connections"
    );
    eprintln!("daemon in the appliance VM before 50 sessions: {before:?}, after: {after:?}");
    assert!(
        after.2 <= before.2 + 32 * 1024,
        "address space grew from {} to {} KiB over 50 sessions",
        before.2,
        after.2
    );

    // A second consumer on the same sockets, without restarting the appliance VM.
    let mut second = consumer(sockets);
    let blk = second.wait_for_blk("vol0", MINUTE);
    let sd = hotplug_scsi(&mut second, sockets, "scsi0b");
    for dev in [&blk, &sd] {
        second.run_ok(
            &format!(
                "set -e; fio --name=again --filename=/dev/{dev} --ioengine=io_uring --iodepth=8 --direct=1 \
                 --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 --minimal"
            ),
            5 * MINUTE,
        );
    }
    let md5 = device_md5(&mut second, &blk, 64);
    assert_backing_file_matches(appliance, "vol0.raw", &md5);
    let md5 = device_md5(&mut second, &sd, 64);
    assert_backing_file_matches(appliance, "lun0.raw", &md5);

    // A clean unplug ends that session; the daemon then stops cleanly on request.
    second.qmp().device_del("scsi0b", MINUTE);
    drop(second);
    let log = appliance.run_ok("cat /config/appliance.log", MINUTE);
    eprintln!("appliance log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("device failed"), "{log}");
    let out = appliance.run_ok(
        "appliance-stop --no-poweroff; kill -0 $(cat /run/appliance.pid) 2>/dev/null || echo DAEMON-STOPPED",
        MINUTE,
    );
    assert!(out.contains("DAEMON-STOPPED"), "{out}");
    // appliance-stop also unmounted the config drive: the host may read it now.
    let mounts = appliance.run_ok("cat /proc/mounts", MINUTE);
    assert!(!mounts.contains(" /config "), "{mounts}");
    assert_qcow2_on_config_drive_matches(&sockets.join("config.img"), "lun1.qcow2", &qcow2_md5);
}

/// The daemon's open fds, threads and address space (KiB) inside the appliance VM, once
/// fds and threads equal `baseline`'s (or are stable, without one): the daemon releases a
/// session's resources asynchronously to the frontend hanging up.
fn settled_usage(appliance: &mut Vm, baseline: Option<(u64, u64, u64)>) -> (u64, u64, u64) {
    let mut last = None;
    for _ in 0..40 {
        let out = appliance.run_ok(
            "p=$(cat /run/appliance.pid); echo USAGE $(ls /proc/$p/fd | wc -l) $(ls /proc/$p/task | wc -l) $(awk '/^VmSize/ {print $2}' /proc/$p/status)",
            MINUTE,
        );
        let line = out.lines().find_map(|l| l.strip_prefix("USAGE ")).unwrap();
        let v: Vec<u64> = line
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        let now = (v[0], v[1], v[2]);
        let target = baseline.or(last);
        if target.is_some_and(|t| (t.0, t.1) == (now.0, now.1)) {
            return now;
        }
        last = Some(now);
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("the daemon in the appliance VM holds fds/threads/KiB {last:?}, expected {baseline:?}");
}

/// Takes `file` out of the config drive (unmounted in the appliance VM by now): a
/// clean `qemu-img check`, and its guest-visible contents hash to `md5`.
fn assert_qcow2_on_config_drive_matches(drive: &Path, file: &str, md5: &str) {
    let dir = scratch_dir();
    let image = dir.path().join(file);
    let raw = dir.path().join("contents.raw");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd:?}: {text}");
        text
    };
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /{file} {}", image.display()))
        .arg(drive));
    let check = run(Command::new("qemu-img").arg("check").arg(&image));
    assert!(check.contains("No errors were found"), "{check}");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&image)
        .arg(&raw));
    let sum = run(Command::new("md5sum").arg(&raw));
    assert_eq!(
        md5_of(&sum),
        md5,
        "the qcow2 image differs from what the consumer read"
    );
}
