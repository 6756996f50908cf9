//! `format: rbd` exports against a real one-node Ceph cluster (`tests/src/ceph.rs`):
//! libblkio runs a randomized verified workload on 1 and 4 queues, 64 requests in flight
//! per queue (with busy-polling workers) and a byte-identical differential against
//! qemu-storage-daemon's rbd driver, data checked in the image itself (`rbd export`); an
//! image grown by `rbd resize` reaches the frontend; a consumer guest uses an rbd blk LUN
//! and an rbd SCSI LUN; a missing pool, image or librados is a clear error.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use appliance_tests::blk_suite::{self, Backing};
use appliance_tests::ceph::{self, Cluster, RbdImage};
use appliance_tests::daemon::{qemu_storage_daemon_rbd, scratch_dir, Appliance};

/// A blk export of image `rbd/IMAGE` of `cluster` on `@DIR@/vol.sock`.
fn config(cluster: &Cluster, image: &str, num_queues: u32, extra: &str) -> String {
    format!(
        "state_dir: @DIR@/state
exports:
  - name: vol
    type: blk
    socket: @DIR@/vol.sock
    format: rbd
    rbd: {{ pool: rbd, image: {image}, conf: {conf}{extra} }}
    create: {{ size: 64M }}
    num_queues: {num_queues}
",
        conf = cluster.conf().display()
    )
}

fn random_verified(image: &str, num_queues: u32, seed: u64) {
    let cluster = ceph::shared();
    let appliance = Appliance::start(&config(cluster, image, num_queues, ""), &["vol.sock"]);
    let mut backing = RbdImage {
        cluster,
        name: image.into(),
    };
    blk_suite::random_verified(
        &appliance.path("vol.sock"),
        num_queues as usize,
        150,
        seed,
        &mut backing,
    );
    assert!(
        appliance.process.log().contains("rbd image created"),
        "the image was created by create:"
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_random_verified_one_queue() {
    random_verified("verified1", 1, 0x1b0d);
}

#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_random_verified_four_queues() {
    random_verified("verified4", 4, 0x4b0d);
}

#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_queue_depth_64_in_flight_on_every_queue_busy_polling() {
    let cluster = ceph::shared();
    // Busy-polling workers look at the callbacks' list (DiskQueue::ready) between sleeps.
    let cfg = config(cluster, "qd64", 2, "") + "    poll: { max_us: 50 }\n";
    let appliance = Appliance::start(&cfg, &["vol.sock"]);
    let mut backing = RbdImage {
        cluster,
        name: "qd64".into(),
    };
    blk_suite::queue_depth_64(&appliance.path("vol.sock"), &mut backing);
}

#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph and QEMU's rbd driver from tests/scripts/install-deps.sh"]
fn rbd_differential_against_qemu_storage_daemon() {
    let cluster = ceph::shared();
    let start = blk_suite::differential_image();
    cluster.import("diff-ours", &start);
    cluster.import("diff-theirs", &start);
    let dir = scratch_dir();
    let qsd_socket = dir.path().join("qsd.sock");
    let qsd = qemu_storage_daemon_rbd(
        "rbd",
        "diff-theirs",
        &cluster.conf(),
        &qsd_socket,
        &dir.path().join("qsd.log"),
    );
    let cfg = config(cluster, "diff-ours", 1, "").replace("    create: { size: 64M }\n", "");
    let appliance = Appliance::start(&cfg, &["vol.sock"]);
    let mut theirs = RbdImage {
        cluster,
        name: "diff-theirs".into(),
    };
    let mut ours = RbdImage {
        cluster,
        name: "diff-ours".into(),
    };
    blk_suite::differential_between(
        &qsd_socket,
        &mut theirs,
        &appliance.path("vol.sock"),
        &mut ours,
    );
    drop(qsd);
    // Not vacuous: the workload changed the images.
    assert_ne!(
        ours.md5(0, blk_suite::DIFFERENTIAL_SIZE),
        blk_suite::md5_hex(&start)
    );
}

/// Mistakes in an rbd export are refused at start with a message naming the image: a pool
/// that does not exist, an image that does not exist without `create:`. The daemon serves
/// its other exports.
#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_missing_pool_or_image_is_a_clear_error() {
    let cluster = ceph::shared();
    let conf = cluster.conf();
    let cfg = format!(
        "state_dir: @DIR@/state
exports:
  - name: nopool
    type: blk
    socket: @DIR@/nopool.sock
    format: rbd
    rbd: {{ pool: nosuchpool, image: x, conf: {conf} }}
  - name: noimage
    type: blk
    socket: @DIR@/noimage.sock
    format: rbd
    rbd: {{ pool: rbd, image: nosuchimage, conf: {conf} }}
  - name: file
    type: blk
    socket: @DIR@/file.sock
    path: @DIR@/file.raw
    create: {{ size: 1M }}
",
        conf = conf.display()
    );
    let mut appliance = Appliance::start(&cfg, &["file.sock"]);
    let log = appliance.process.wait_for_log(
        "rbd image rbd/nosuchimage: the image does not exist",
        1,
        Duration::from_secs(30),
    );
    assert!(
        log.contains("rbd image nosuchpool/x: pool \"nosuchpool\" does not exist"),
        "{log}"
    );
    assert!(!appliance.path("nopool.sock").exists());
    assert!(!appliance.path("noimage.sock").exists());
    assert!(
        appliance.process.try_wait().is_none(),
        "the daemon is alive"
    );
}

/// `rbd resize` by another client while the daemon serves the image (holding its
/// exclusive lock: librbd forwards the resize to the lock owner): the frontend hears of the
/// new capacity at once (CONFIG_CHANGE_MSG on its backend channel, then GET_CONFIG), without
/// a reload, and writes into the new range land in the image.
#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_image_grown_by_another_client_reaches_the_frontend() {
    use appliance_tests::blk_raw::{self, DATA};
    use appliance_tests::frontend::RawFrontend;
    const MIB: u64 = 1 << 20;
    let cluster = ceph::shared();
    let mut appliance = Appliance::start(&config(cluster, "grown", 1, ""), &["vol.sock"]);
    let mut fe =
        RawFrontend::connect_with_backend_channel(&appliance.path("vol.sock"), 1, 128, u64::MAX);
    let capacity = |fe: &mut RawFrontend| {
        let c = fe.config(8);
        u64::from_le_bytes(c[..8].try_into().unwrap()) * 512
    };
    assert_eq!(capacity(&mut fe), 64 * MIB);
    cluster.rbd(&["resize", "--size", "96M", "rbd/grown"]);
    let request = fe.next_backend_request(Duration::from_secs(20));
    assert_eq!(request.request, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    fe.reply_backend_request(request, 0);
    assert_eq!(capacity(&mut fe), 96 * MIB);
    fe.write_mem(DATA, &[0xc4; 4096]);
    assert_eq!(blk_raw::write(&mut fe, (96 * MIB - 4096) / 512, 4096).1, 0);
    let image = cluster.export("grown");
    assert_eq!(image.len() as u64, 96 * MIB);
    assert!(image[image.len() - 4096..].iter().all(|&b| b == 0xc4));
    appliance.process.wait_for_log(
        "resized (backing store grew underneath (the store reported a change))",
        1,
        Duration::from_secs(5),
    );
}

/// A consumer guest (stock QEMU, Debian kernel) on an rbd blk LUN and an rbd SCSI LUN at
/// once: mkfs.ext4, e2fsck, file checksums across a remount, fio verify; the SCSI LUN
/// reports LBPRZ clear (a discard on RBD is a hint) and the guest's file system is in the
/// images themselves.
#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph from tests/scripts/install-deps.sh and boots a QEMU guest"]
fn rbd_guest_filesystem_and_fio_on_blk_and_scsi_luns() {
    use appliance_tests::vm::{filesystem_and_fio_script, BlkAtBoot, Vm, VmOptions};
    const MINUTE: Duration = Duration::from_secs(60);
    let cluster = ceph::shared();
    let conf = cluster.conf();
    let cfg = format!(
        "exports:
  - name: vmblk
    type: blk
    socket: @DIR@/vmblk.sock
    num_queues: 2
    format: rbd
    rbd: {{ pool: rbd, image: vm-blk, conf: {conf} }}
    create: {{ size: 128M }}
  - name: vmscsi
    type: scsi
    socket: @DIR@/vmscsi.sock
    luns:
      - format: rbd
        rbd: {{ pool: rbd, image: vm-scsi, conf: {conf} }}
        create: {{ size: 128M }}
",
        conf = conf.display()
    );
    let appliance = Appliance::start(&cfg, &["vmblk.sock", "vmscsi.sock"]);
    let mut vm = Vm::boot(&VmOptions {
        blk: vec![BlkAtBoot {
            id: "vmblk".into(),
            socket: appliance.path("vmblk.sock"),
            num_queues: 2,
        }],
        extra_args: vec![
            "-chardev".into(),
            format!(
                "socket,id=s0,path={}",
                appliance.path("vmscsi.sock").display()
            ),
            "-device".into(),
            "vhost-user-scsi-pci,chardev=s0,num_queues=1".into(),
        ],
        ..VmOptions::default()
    });
    let blk = vm.wait_for_blk("vmblk", Duration::from_secs(20));
    let out = vm.run_ok(&filesystem_and_fio_script(&blk), 5 * MINUTE);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");
    let scsi = vm.run_ok(
        "i=0; while ! ls -d /sys/bus/scsi/devices/*:0:0:0/block/* >/dev/null 2>&1 && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; \
         basename $(ls -d /sys/bus/scsi/devices/*:0:0:0/block/* | head -1)",
        MINUTE,
    );
    let scsi = scsi.lines().last().unwrap().trim().to_string();
    let lbprz = vm.run_ok(&format!("sg_readcap -l /dev/{scsi}"), MINUTE);
    assert!(lbprz.contains("lbprz=0"), "{lbprz}");
    let out = vm.run_ok(&filesystem_and_fio_script(&scsi), 5 * MINUTE);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");
    drop(vm);
    for image in ["vm-blk", "vm-scsi"] {
        let bytes = cluster.export(image);
        assert_eq!(
            bytes[1024 + 0x38..1024 + 0x3a],
            [0x53, 0xef],
            "no ext4 superblock in {image}"
        );
    }
}

/// On a host without Ceph's client libraries (here: librados masked by /dev/null in a
/// private mount namespace) the daemon starts, serves its file exports, and refuses the
/// rbd export with a message that says what is missing.
#[test]
#[ignore = "full tier (tests/run.sh): needs root for a private mount namespace (unshare)"]
fn without_ceph_libraries_an_rbd_export_fails_clearly_and_the_rest_serves() {
    let daemon = appliance_tests::daemon::appliance_binary();
    let mut command = std::process::Command::new("unshare");
    command.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind /dev/null \"$(readlink -f /usr/lib/x86_64-linux-gnu/librados.so.2)\" && exec \"$@\"",
        "sh",
    ]);
    command.arg(daemon);
    let cfg = "exports:
  - name: vol
    type: blk
    socket: @DIR@/vol.sock
    format: rbd
    rbd: { pool: rbd, image: x }
  - name: file
    type: blk
    socket: @DIR@/file.sock
    path: @DIR@/file.raw
    create: { size: 1M }
";
    let mut appliance = Appliance::start_command(command, cfg, &["file.sock"]);
    let log = appliance.process.wait_for_log(
        "export not started: rbd image rbd/x: cannot load librados.so.2",
        1,
        Duration::from_secs(20),
    );
    assert!(
        log.contains("rbd exports need Ceph's client libraries"),
        "{log}"
    );
    let mut fe =
        appliance_tests::blkio_frontend::Frontend::connect(&appliance.path("file.sock"), 1);
    assert_eq!(fe.write(0, 0, 0, 4096), 0);
    assert!(!appliance.path("vol.sock").exists());
    assert!(
        appliance.process.try_wait().is_none(),
        "the daemon is alive"
    );
}
