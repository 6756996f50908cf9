//! Consumer memory hotplug through the appliance VM: a stock-QEMU consumer with
//! `-m 1G,slots=2,maxmem=3G` does verified I/O on a blk export served from inside the
//! appliance VM while a memfd backend and a `pc-dimm` are added over QMP. The consumer's
//! QEMU hands the new memory to the backend with ADD_MEM_REG (CONFIGURE_MEM_SLOTS), the
//! device maps it into the shared-memory BAR while the rings are running, and the guest
//! then does its I/O from buffers in that memory (its highest zone, which allocations
//! prefer).

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use appliance_tests::appliance_vm::{self, ApplianceVmOptions, VvuSocket};
use appliance_tests::daemon::scratch_dir;
use appliance_tests::vm::{BlkAtBoot, Vm, VmOptions};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

const EXPORTS: &str = "\
exports:
  - name: vol0
    type: blk
    vvu: 0000:00:10.0
    path: vol0.raw
    create: { size: 128M }
    num_queues: 2
";

/// MemTotal of the guest in KiB.
fn mem_total_kib(vm: &mut Vm) -> u64 {
    let out = vm.run_ok("grep MemTotal /proc/meminfo", MINUTE);
    out.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out}"))
}

/// ADD_MEM_REG messages the bridge has passed to the daemon so far (logged at debug).
fn add_mem_regs(appliance: &mut Vm) -> u64 {
    let out = appliance.run(
        "echo ADDED $(grep -c 'vvu: to the backend request=37' /config/appliance.log)",
        MINUTE,
    );
    out.output
        .lines()
        .find_map(|l| l.strip_prefix("ADDED "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {}", out.output))
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn consumer_memory_hotplug_keeps_verified_io_going_through_the_appliance_vm() {
    let sockets = scratch_dir();
    let mut options = ApplianceVmOptions::new(EXPORTS, vec![VvuSocket::at("vol0.sock")], 1);
    // The BAR covers the consumer's 1 GiB, the 1 GiB added and the 2 MiB alignment gaps.
    options.shm_size = "4G".into();
    options.log_level = Some("debug".into());
    let mut appliance = appliance_vm::start(sockets.path(), &options);

    let mut consumer = Vm::boot(&VmOptions {
        memory_mib: 1024,
        max_memory_mib: Some(3072),
        kernel_args: "memhp_default_state=online".into(),
        blk: vec![BlkAtBoot {
            id: "vol0".into(),
            socket: sockets.path().join("vol0.sock"),
            num_queues: 2,
        }],
        ..VmOptions::default()
    });
    let dev = consumer.wait_for_blk("vol0", 2 * MINUTE);
    let before = mem_total_kib(&mut consumer);

    // Verified I/O in the background while the memory arrives.
    consumer.run_ok(
        &format!(
            "(fio --name=during --filename=/dev/{dev} --ioengine=io_uring --iodepth=16 --direct=1 \
             --rw=randwrite --bs=4k --size=32M --loops=4 --verify=crc32c --verify_fatal=1 \
             --do_verify=1 --randrepeat=0 --minimal > /tmp/during.log 2>&1; echo $? > /tmp/during.rc) \
             > /dev/null 2>&1 < /dev/null &"
        ),
        MINUTE,
    );
    let before_hotplug = add_mem_regs(&mut appliance);
    let qmp = consumer.qmp();
    qmp.execute(
        "object-add",
        json!({ "qom-type": "memory-backend-memfd", "id": "mem1", "size": 1u64 << 30, "share": true }),
    )
    .expect("object-add memory-backend-memfd");
    qmp.execute(
        "device_add",
        json!({ "driver": "pc-dimm", "id": "dimm1", "memdev": "mem1" }),
    )
    .expect("device_add pc-dimm");
    // The memory arrived while the verifying fio was still running.
    let running = consumer.run("test ! -f /tmp/during.rc", MINUTE);
    assert_eq!(
        running.status, 0,
        "fio had finished before the memory was added; the test proves nothing"
    );
    let out = consumer.run_ok(
        "i=0; while [ ! -f /tmp/during.rc ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done; cat /tmp/during.rc /tmp/during.log",
        6 * MINUTE,
    );
    assert_eq!(
        out.lines()
            .find(|l| l.trim().chars().all(|c| c.is_ascii_digit()) && !l.trim().is_empty()),
        Some("0"),
        "fio during the hotplug failed:\n{out}"
    );
    let after = mem_total_kib(&mut consumer);
    assert!(
        after >= before + 900 * 1024,
        "the guest did not online the added memory: MemTotal {before} -> {after} KiB"
    );

    // User allocations prefer the highest zone, which the added memory (above 4 GiB) is:
    // fio's buffers now come from it.
    let out = consumer.run_ok(
        &format!(
            "set -e
echo NORMAL-PRESENT $(awk '/zone +Normal/ {{z=1}} z && /present/ {{print $2; exit}}' /proc/zoneinfo)
fio --name=after --filename=/dev/{dev} --ioengine=io_uring --iodepth=16 --direct=1 \
    --rw=randwrite --bs=64k --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --randrepeat=0 --minimal > /dev/null
echo HOTPLUG-IO-OK"
        ),
        6 * MINUTE,
    );
    assert!(out.contains("HOTPLUG-IO-OK"), "{out}");
    let normal: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("NORMAL-PRESENT "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        normal > 0,
        "the added memory is not in a Normal zone the allocator prefers:\n{out}"
    );

    // The region reached the backend as ADD_MEM_REG, and nothing was refused.
    let after_hotplug = add_mem_regs(&mut appliance);
    let log = appliance_vm::daemon_log(&mut appliance);
    assert!(
        after_hotplug > before_hotplug,
        "no ADD_MEM_REG reached the daemon for the new memory ({before_hotplug} before, {after_hotplug} after):\n{log}"
    );
    assert!(appliance_vm::daemon_alive(&mut appliance), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let qemu = appliance.qemu_log();
    assert!(
        !qemu.contains("refused") && !qemu.contains("protocol error"),
        "{qemu}"
    );
}
