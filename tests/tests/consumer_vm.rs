//! Consumer-VM tests: a real guest (Debian kernel, stock QEMU 10) uses the appliance's LUNs
//! exactly as users do, attached at boot or hotplugged over QMP. The same guest script also
//! runs against qemu-storage-daemon, which proves the harness as well as the daemon.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use appliance_tests::daemon::{qemu_storage_daemon, scratch_dir, Appliance};
use appliance_tests::vm::{BlkAtBoot, Vm, VmOptions};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Filesystem round trip and a verifying fio run on `/dev/$DEV`, as a user would.
fn filesystem_and_fio_script(dev: &str) -> String {
    format!(
        r#"set -e
DEV=/dev/{dev}
mkfs.ext4 -q -F $DEV
mount $DEV /mnt
i=0; while [ $i -lt 8 ]; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=8 2>/dev/null; i=$((i+1)); done
sha1sum /mnt/f* > /tmp/sums
sync
umount /mnt
e2fsck -f -n $DEV
mount $DEV /mnt
sha1sum -c /tmp/sums
umount /mnt
fio --name=verify --filename=$DEV --ioengine=io_uring --iodepth=16 --direct=1 \
    --rw=randwrite --bs=4k --size=16M --offset=32M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output-format=terse --minimal
echo GUEST-CHECKS-PASSED
"#
    )
}

fn blk_config(exports: &[(&str, &str)]) -> String {
    let mut cfg = String::from("exports:\n");
    for (name, size) in exports {
        cfg.push_str(&format!(
            "  - name: {name}\n    type: blk\n    socket: @DIR@/{name}.sock\n    path: @DIR@/{name}.raw\n    create: {{ size: {size} }}\n    num_queues: 2\n"
        ));
    }
    cfg
}

#[test]
fn guest_filesystem_and_fio_on_a_blk_lun_at_boot() {
    let appliance = Appliance::start(&blk_config(&[("vol0", "128M")]), &["vol0.sock"]);
    let mut vm = Vm::boot(&VmOptions {
        blk: vec![BlkAtBoot {
            id: "vol0".into(),
            socket: appliance.path("vol0.sock"),
            num_queues: 2,
        }],
        ..VmOptions::default()
    });
    let dev = vm.wait_for_blk("vol0", Duration::from_secs(20));
    let size = vm.run_ok(&format!("cat /sys/block/{dev}/size"), MINUTE);
    assert_eq!(
        size.lines().last().unwrap().trim(),
        (128u64 << 20 >> 9).to_string()
    );
    let out = vm.run_ok(&filesystem_and_fio_script(&dev), 5 * MINUTE);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");
    eprintln!("guest output:\n{out}");
    // The guest's writes are in the backing file: it holds an ext4 superblock magic.
    let mut magic = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(appliance.path("vol0.raw")).unwrap(),
        &mut magic,
        1024 + 0x38,
    )
    .unwrap();
    assert_eq!(
        magic,
        [0x53, 0xef],
        "no ext4 superblock in the backing file"
    );
}

#[test]
fn hotplug_and_unplug_a_blk_lun_while_another_keeps_serving() {
    let appliance = Appliance::start(
        &blk_config(&[("vol0", "64M"), ("vol1", "64M")]),
        &["vol0.sock", "vol1.sock"],
    );
    let mut vm = Vm::boot(&VmOptions {
        blk: vec![BlkAtBoot {
            id: "vol0".into(),
            socket: appliance.path("vol0.sock"),
            num_queues: 1,
        }],
        ..VmOptions::default()
    });
    let vol0 = vm.wait_for_blk("vol0", Duration::from_secs(20));

    let qmp = vm.qmp();
    qmp.chardev_add_socket("vol1", &appliance.path("vol1.sock"), 1000)
        .expect("chardev-add");
    qmp.device_add(
        "vhost-user-blk-pci",
        "vol1",
        "hp0",
        json!({ "chardev": "vol1", "num-queues": 2 }),
    )
    .expect("device_add vhost-user-blk-pci");
    let vol1 = vm.wait_for_blk("vol1", Duration::from_secs(60));
    vm.run_ok(
        &format!(
            "set -e; fio --name=hp --filename=/dev/{vol1} --ioengine=io_uring --iodepth=8 --direct=1 \
             --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 --minimal"
        ),
        3 * MINUTE,
    );

    vm.qmp().device_del("vol1", MINUTE);
    vm.qmp().chardev_remove("vol1").expect("chardev-remove");
    vm.wait_for_blk_gone("vol1", Duration::from_secs(30));
    // vol0 keeps working, and the daemon saw vol1's frontend go.
    vm.run_ok(
        &format!("set -e; dd if=/dev/urandom of=/tmp/x bs=64k count=16 2>/dev/null; dd if=/tmp/x of=/dev/{vol0} bs=64k oflag=direct 2>/dev/null; dd if=/dev/{vol0} of=/tmp/y bs=64k count=16 iflag=direct 2>/dev/null; cmp /tmp/x /tmp/y"),
        MINUTE,
    );
    let log = appliance.process.log();
    assert!(
        log.contains("export=\"vol1\"") && log.contains("frontend disconnected"),
        "{log}"
    );

    // Plug it in again: the export survives reconnects.
    let qmp = vm.qmp();
    qmp.chardev_add_socket("vol1b", &appliance.path("vol1.sock"), 1000)
        .expect("chardev-add again");
    qmp.device_add(
        "vhost-user-blk-pci",
        "vol1b",
        "hp1",
        json!({ "chardev": "vol1b" }),
    )
    .expect("device_add again");
    let again = vm.wait_for_blk("vol1", Duration::from_secs(60));
    vm.run_ok(
        &format!("dd if=/dev/{again} of=/dev/null bs=1M count=8 iflag=direct"),
        MINUTE,
    );
}

#[test]
fn the_same_guest_script_passes_against_qemu_storage_daemon() {
    let dir = scratch_dir();
    let image = dir.path().join("qsd.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let socket = dir.path().join("qsd.sock");
    let _qsd = qemu_storage_daemon(&image, &socket, &dir.path().join("qsd.log"));
    let mut vm = Vm::boot(&VmOptions {
        blk: vec![BlkAtBoot {
            id: "qsd0".into(),
            socket: socket.clone(),
            num_queues: 1,
        }],
        ..VmOptions::default()
    });
    // qemu-storage-daemon's GET_ID is fixed; find its disk by position instead.
    let dev = "vda";
    vm.run_ok(&format!("i=0; while [ ! -e /sys/block/{dev} ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; test -e /sys/block/{dev}"), MINUTE);
    let out = vm.run_ok(&filesystem_and_fio_script(dev), 5 * MINUTE);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");
    assert!(Path::new(&image).exists());
}
