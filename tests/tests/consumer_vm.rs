//! Consumer-VM tests: a real guest (Debian kernel, stock QEMU 10) uses the appliance's LUNs
//! exactly as users do, attached at boot or hotplugged over QMP. The same guest script also
//! runs against qemu-storage-daemon, which proves the harness as well as the daemon.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use appliance_tests::daemon::{qemu_storage_daemon, scratch_dir, Appliance};
use appliance_tests::vm::{filesystem_and_fio_script, BlkAtBoot, Vm, VmOptions};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

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
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
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
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
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
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
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

const SCSI_CONFIG: &str = "exports:
  - name: s0
    type: scsi
    socket: @DIR@/s0.sock
    num_queues: 2
    luns:
      - path: @DIR@/lun0.raw
        create: { size: 128M }
      - lun: 1
        path: @DIR@/lun1.raw
        create: { size: 64M }
        logical_block_size: 4096
      - lun: 2
        path: @DIR@/lun2.raw
        readonly: true
";

/// Shell helpers: the block and sg device of LUN $1 of SCSI host 0.
const SCSI_HELPERS: &str = r#"
blk_of() { basename $(ls -d /sys/bus/scsi/devices/*:0:0:$1/block/* | head -1); }
sg_of() { basename $(ls -d /sys/bus/scsi/devices/*:0:0:$1/scsi_generic/* | head -1); }
wait_luns() { i=0; while [ $(ls -d /sys/bus/scsi/devices/*:0:0:* 2>/dev/null | wc -l) -lt $1 ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; }
"#;

/// libiscsi suites for commands this target deliberately does not implement (or that need
/// iSCSI or a second initiator); failures anywhere else fail the test.
const NOT_IMPLEMENTED_SUITES: &[&str] = &[
    "CompareAndWrite",
    "ExtendedCopy",
    "GetLBAStatus",
    "OrWrite",
    "Prefetch10",
    "Prefetch16",
    "PreventAllow",
    "ReadDefectData10",
    "ReadDefectData12",
    "ReceiveCopyResults",
    "Reserve6",
    "Release6",
    "PrinReadKeys",
    "PrinServiceactionRange",
    "PrinReportCapabilities",
    "ProutRegister",
    "ProutReserve",
    "ProutClear",
    "ProutPreempt",
    "Sanitize",
    "WriteVerify10",
    "WriteVerify12",
    "WriteVerify16",
    "Verify12",
    "Read6",
    "Write6",
    "NoMedia",
    "Multipath",
    "iSCSIcmdsn",
    "iSCSIdatasn",
    "iSCSIResiduals",
    "iSCSITMF",
    "iSCSISendTargets",
    "iSCSINop",
    "iSCSICHAP",
    "ModeSelect10",
];

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn guest_checks_a_three_lun_scsi_export() {
    let dir = scratch_dir();
    std::fs::write(dir.path().join("lun2.raw"), vec![0x2au8; 8 << 20]).unwrap();
    let appliance = Appliance::start_in(dir, SCSI_CONFIG, &["s0.sock"]);
    let mut vm = Vm::boot(&VmOptions {
        extra_args: vec![
            "-chardev".into(),
            format!("socket,id=s0,path={}", appliance.path("s0.sock").display()),
            "-device".into(),
            "vhost-user-scsi-pci,chardev=s0,num_queues=2".into(),
        ],
        ..VmOptions::default()
    });
    let script = format!(
        r#"set -e
{SCSI_HELPERS}
wait_luns 3
D0=$(blk_of 0); D1=$(blk_of 1); D2=$(blk_of 2)
sg_inq /dev/$D0 | grep -q VHOSTAPP
sg_vpd -p 0x83 /dev/$D0 | grep -qi 'NAA'
sg_vpd -p 0xb0 /dev/$D0 | grep -qi 'Maximum unmap LBA count'
sg_vpd -p 0xb2 /dev/$D0 | grep -qi 'Unmap command supported (LBPU): 1'
sg_readcap -l /dev/$D1 | grep -q 'Logical block length=4096 bytes'
sg_readcap -l /dev/$D0 | grep -q 'Logical block length=512 bytes'
sg_unmap --lba=0 --num=8 /dev/$D0
sg_sync /dev/$D0
test "$(cat /sys/block/$D2/ro)" = 1
cmp /dev/$D2 /dev/zero 2>&1 | grep -q differ
mkfs.ext4 -q -F /dev/$D0
mount /dev/$D0 /mnt
i=0; while [ $i -lt 8 ]; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=8 2>/dev/null; i=$((i+1)); done
sha1sum /mnt/f* > /tmp/sums
rm /mnt/f7
sync
fstrim -v /mnt
umount /mnt
e2fsck -f -n /dev/$D0
mount /dev/$D0 /mnt
grep -v f7 /tmp/sums | sha1sum -c
umount /mnt
fio --name=verify --filename=/dev/$D1 --ioengine=io_uring --iodepth=16 --direct=1 \
    --rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --randrepeat=0 --minimal
echo SCSI-GUEST-CHECKS-PASSED
"#
    );
    let out = vm.run_ok(&script, 5 * MINUTE);
    assert!(out.contains("SCSI-GUEST-CHECKS-PASSED"), "{out}");
    assert!(out.contains("trimmed"), "fstrim reported nothing:\n{out}");

    // libiscsi's SBC/SPC conformance suite against the guest's /dev/sgN of LUN 1.
    let cu = vm.run(
        &format!(
            "{SCSI_HELPERS}\niscsi-test-cu --dataloss /dev/$(sg_of 1) > /tmp/cu.log 2>&1; \
             awk '/^Suite:/{{s=$2}} /^  Test:/{{t=$2}} /FAILED/{{print \"FAILED \" s \".\" t}}' /tmp/cu.log | sort -u; \
             grep -A3 'Run Summary' /tmp/cu.log"
        ),
        10 * MINUTE,
    );
    eprintln!("iscsi-test-cu on LUN 1:\n{}", cu.output);
    assert!(
        cu.output.contains("Run Summary"),
        "iscsi-test-cu did not run:\n{}",
        cu.output
    );
    let unexpected: Vec<&str> = cu
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("FAILED "))
        .filter(|t| {
            !NOT_IMPLEMENTED_SUITES
                .iter()
                .any(|s| t.split('.').next() == Some(*s))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "conformance failures in implemented commands: {unexpected:?}"
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn hotplug_and_unplug_a_scsi_export() {
    let dir = scratch_dir();
    std::fs::write(dir.path().join("lun2.raw"), vec![0x2au8; 8 << 20]).unwrap();
    let appliance = Appliance::start_in(dir, SCSI_CONFIG, &["s0.sock"]);
    let mut vm = Vm::boot(&VmOptions::default());
    let qmp = vm.qmp();
    qmp.chardev_add_socket("s0", &appliance.path("s0.sock"), 1000)
        .expect("chardev-add");
    qmp.device_add(
        "vhost-user-scsi-pci",
        "s0",
        "hp0",
        json!({ "chardev": "s0", "num_queues": 1 }),
    )
    .expect("device_add vhost-user-scsi-pci");
    let out = vm.run_ok(
        &format!(
            "set -e\n{SCSI_HELPERS}\nwait_luns 3\nD1=$(blk_of 1)\n\
             dd if=/dev/urandom of=/tmp/x bs=4k count=64 2>/dev/null\n\
             dd if=/tmp/x of=/dev/$D1 bs=4k oflag=direct 2>/dev/null\n\
             dd if=/dev/$D1 of=/tmp/y bs=4k count=64 iflag=direct 2>/dev/null\n\
             cmp /tmp/x /tmp/y && echo HOTPLUG-IO-OK"
        ),
        2 * MINUTE,
    );
    assert!(out.contains("HOTPLUG-IO-OK"), "{out}");
    vm.qmp().device_del("s0", MINUTE);
    vm.qmp().chardev_remove("s0").expect("chardev-remove");
    vm.run_ok(
        "i=0; while ls -d /sys/bus/scsi/devices/*:0:0:* >/dev/null 2>&1 && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; \
         ! ls -d /sys/bus/scsi/devices/*:0:0:* 2>/dev/null",
        MINUTE,
    );
    let log = appliance.process.log();
    assert!(log.contains("frontend disconnected"), "{log}");
}
