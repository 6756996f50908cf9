//! Online resize seen from a consumer guest (stock QEMU 10, Debian kernel): `size:` of a
//! vhost-user-blk export and of a vhost-user-scsi LUN grown in exports.yaml while the guest
//! runs. The blk disk's `/sys/block/vdX/size` changes with no rescan (CONFIG_CHANGE_MSG →
//! QEMU → configuration change interrupt); the SCSI disk shows its new size after the
//! standard `rescan`; on both the guest writes the new last MiB and reads it back, and the
//! blk data is in the backing file where the guest put it.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use appliance_tests::daemon::Appliance;
use appliance_tests::vm::{BlkAtBoot, Vm, VmOptions};

const MINUTE: Duration = Duration::from_secs(60);

fn config(blk_size: &str, lun_size: &str) -> String {
    format!(
        "exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: {{ size: 64M }}
    size: {blk_size}
  - name: s0
    type: scsi
    socket: @DIR@/s0.sock
    luns:
      - path: @DIR@/lun0.raw
        create: {{ size: 32M }}
        size: {lun_size}
"
    )
}

/// The last `key=value` line's value in guest output.
fn value(out: &str, key: &str) -> String {
    out.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in guest output:\n{out}"))
        .trim()
        .to_string()
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn a_guest_sees_its_blk_and_scsi_luns_grow() {
    let mut appliance = Appliance::start(&config("64M", "32M"), &["vol0.sock", "s0.sock"]);
    let mut vm = Vm::boot(&VmOptions {
        blk: vec![BlkAtBoot {
            id: "vol0".into(),
            socket: appliance.path("vol0.sock"),
            num_queues: 1,
        }],
        extra_args: vec![
            "-chardev".into(),
            format!("socket,id=s0,path={}", appliance.path("s0.sock").display()),
            "-device".into(),
            "vhost-user-scsi-pci,chardev=s0,num_queues=1".into(),
        ],
        ..VmOptions::default()
    });
    let vd = vm.wait_for_blk("vol0", Duration::from_secs(20));
    let find_sd = "i=0; while [ ! -d /sys/bus/scsi/devices/*:0:0:0/block ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; \
                   SD=$(basename $(ls -d /sys/bus/scsi/devices/*:0:0:0/block/* | head -1)); SDEV=$(ls -d /sys/class/scsi_device/*:0:0:0 | head -1)";
    let out = vm.run_ok(
        &format!("set -e; {find_sd}; echo VD_SECTORS=$(cat /sys/block/{vd}/size); echo SD_SECTORS=$(cat /sys/block/$SD/size)"),
        MINUTE,
    );
    assert_eq!(value(&out, "VD_SECTORS"), (64u64 << 20 >> 9).to_string());
    assert_eq!(value(&out, "SD_SECTORS"), (32u64 << 20 >> 9).to_string());

    appliance.rewrite_config(&config("96M", "48M"));
    appliance
        .process
        .wait_for_log("resized (size: changed)", 2, MINUTE);

    // virtio-blk: the size changes by itself; the new last MiB is usable.
    let blk_sectors = 96u64 << 20 >> 9;
    let out = vm.run_ok(
        &format!(
            "set -e
i=0; while [ \"$(cat /sys/block/{vd}/size)\" != {blk_sectors} ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
echo VD_SECTORS=$(cat /sys/block/{vd}/size)
dd if=/dev/urandom of=/tmp/x bs=1M count=1 2>/dev/null
dd if=/tmp/x of=/dev/{vd} bs=1M seek=95 oflag=direct 2>/dev/null
dd if=/dev/{vd} of=/tmp/y bs=1M skip=95 count=1 iflag=direct 2>/dev/null
cmp /tmp/x /tmp/y
echo VD_TAIL=$(md5sum < /tmp/x | cut -d' ' -f1)
"
        ),
        MINUTE,
    );
    eprintln!("guest, blk:\n{out}");
    assert_eq!(value(&out, "VD_SECTORS"), blk_sectors.to_string());
    let mut tail = vec![0u8; 1 << 20];
    std::fs::File::open(appliance.path("vol0.raw"))
        .unwrap()
        .read_exact_at(&mut tail, 95 << 20)
        .unwrap();
    let host_md5 = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&tail)?;
            child.wait_with_output()
        })
        .unwrap();
    let host_md5 = String::from_utf8_lossy(&host_md5.stdout);
    assert_eq!(
        host_md5.split_whitespace().next().unwrap(),
        value(&out, "VD_TAIL"),
        "the guest's last MiB is the file's"
    );

    // SCSI: after the standard rescan (the guest may have rescanned on the
    // parameter-change event already), the new size, and the new last MiB is usable.
    let sd_sectors = 48u64 << 20 >> 9;
    let out = vm.run_ok(
        &format!(
            "set -e; {find_sd}
sleep 1
echo SD_BEFORE_RESCAN=$(cat /sys/block/$SD/size)
echo 1 > $SDEV/device/rescan
echo SD_SECTORS=$(cat /sys/block/$SD/size)
dd if=/dev/urandom of=/tmp/x bs=1M count=1 2>/dev/null
dd if=/tmp/x of=/dev/$SD bs=1M seek=47 oflag=direct 2>/dev/null
dd if=/dev/$SD of=/tmp/y bs=1M skip=47 count=1 iflag=direct 2>/dev/null
cmp /tmp/x /tmp/y
echo SCSI-RESIZE-OK
"
        ),
        MINUTE,
    );
    eprintln!("guest, scsi:\n{out}");
    assert_eq!(value(&out, "SD_SECTORS"), sd_sectors.to_string());
    assert!(out.contains("SCSI-RESIZE-OK"), "{out}");
    let log = appliance.process.log();
    assert!(
        log.contains("frontend told by CONFIG_CHANGE_MSG on the backend channel"),
        "{log}"
    );
}
