//! Online resize against the real daemon: `size:` grown in exports.yaml (rewritten the way
//! editors do) while libblkio does verified I/O on the export; a raw frontend with a backend
//! channel gets CONFIG_CHANGE_MSG, reads the new capacity with GET_CONFIG (before it
//! answers, as QEMU does) and writes into the new range; a qcow2 export grows through
//! imago; a SCSI LUN reports CAPACITY DATA HAS CHANGED and READ CAPACITY shows the new size;
//! shrinking is refused with file, line and field, at start and on reload; stores grown
//! underneath (`truncate -s`) are picked up at the next SIGHUP unless `size:` pins them; a
//! block device (a loop device here; needs root) is grown by its owner, never by `size:`.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::blk_raw::{self, DATA};
use appliance_tests::blkio_frontend::Verifier;
use appliance_tests::daemon::{scratch_dir, Appliance};
use appliance_tests::frontend::RawFrontend;
use appliance_tests::scsi_frontend::ScsiFrontend;

const TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// The NEED_REPLY header flag.
const NEED_REPLY: u32 = 0x8;

/// A blk export creating its file of `create` bytes (none if empty), with `extra` lines
/// (`size:`, `format:`) last.
fn blk(name: &str, file: &str, create: &str, extra: &str) -> String {
    let create = if create.is_empty() {
        String::new()
    } else {
        format!("    create: {{ size: {create} }}\n")
    };
    format!(
        "  - name: {name}
    type: blk
    socket: @DIR@/{name}.sock
    path: @DIR@/{file}
{create}    num_queues: 2
{extra}"
    )
}

/// A scratch directory holding a raw file `name` of `len` bytes.
fn dir_with_file(name: &str, len: u64) -> tempfile::TempDir {
    let dir = scratch_dir();
    std::fs::File::create(dir.path().join(name))
        .unwrap()
        .set_len(len)
        .unwrap();
    dir
}

fn config(exports: &[&str]) -> String {
    format!("exports:\n{}", exports.concat())
}

/// Capacity in bytes from the virtio-blk config space.
fn capacity(fe: &mut RawFrontend) -> u64 {
    let c = fe.config(8);
    u64::from_le_bytes(c[..8].try_into().unwrap()) * 512
}

/// Writes `len` bytes of `byte` at `offset` through the raw frontend, reads them back.
fn write_read(fe: &mut RawFrontend, offset: u64, len: u32, byte: u8) {
    fe.write_mem(DATA, &vec![byte; len as usize]);
    assert_eq!(
        blk_raw::write(fe, offset / 512, len).1,
        0,
        "write at {offset}"
    );
    fe.write_mem(DATA, &vec![0; len as usize]);
    assert_eq!(
        blk_raw::read(fe, offset / 512, len).1,
        0,
        "read at {offset}"
    );
    assert_eq!(fe.read_mem(DATA, len as usize), vec![byte; len as usize]);
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// SCSI TEST UNIT READY: status and sense key/ASC/ASCQ.
fn tur(fe: &mut ScsiFrontend, lun: u16) -> (u8, (u8, u8, u8)) {
    let r = fe.command(lun, &[0, 0, 0, 0, 0, 0], &[], 0);
    (r.status, r.sense)
}

/// READ CAPACITY(16): (blocks, block size).
fn read_capacity(fe: &mut ScsiFrontend, lun: u16) -> (u64, u32) {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let d = fe.good(lun, &cdb, &[], 32);
    (
        u64::from_be_bytes(d[..8].try_into().unwrap()) + 1,
        u32::from_be_bytes(d[8..12].try_into().unwrap()),
    )
}

/// WRITE(16) then READ(16) of one block at `lba`, checked.
fn scsi_write_read(fe: &mut ScsiFrontend, lun: u16, lba: u64, bs: u32, byte: u8) {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = 1;
    fe.good(lun, &cdb, &vec![byte; bs as usize], 0);
    cdb[0] = 0x88;
    assert_eq!(fe.good(lun, &cdb, &[], bs), vec![byte; bs as usize]);
}

const GOOD: (u8, (u8, u8, u8)) = (0, (0, 0, 0));
const CAPACITY_CHANGED: (u8, (u8, u8, u8)) = (2, (0x06, 0x2a, 0x09));

#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn growing_size_reaches_blk_frontends_while_libblkio_io_runs() {
    // A: libblkio verifying; B: a raw frontend with a backend channel; C: qcow2. A's
    // size: is above create: at start, so the daemon grows the new file right away.
    let a = |size: &str| blk("a", "a.raw", "16M", &format!("    size: {size}\n"));
    let b = |size: &str| blk("b", "b.raw", "16M", &format!("    size: {size}\n"));
    let c = |size: &str| {
        blk(
            "c",
            "c.qcow2",
            "16M",
            &format!("    format: qcow2\n    size: {size}\n"),
        )
    };
    let mut appliance = Appliance::start(
        &config(&[&a("24M"), &b("16M"), &c("16M")]),
        &["a.sock", "b.sock", "c.sock"],
    );
    assert_eq!(
        file_len(&appliance.path("a.raw")),
        24 * MIB,
        "grown at start"
    );
    let verifier = Verifier::start(appliance.path("a.sock"));
    let mut fe =
        RawFrontend::connect_with_backend_channel(&appliance.path("b.sock"), 1, 128, u64::MAX);
    assert_eq!(capacity(&mut fe), 16 * MIB);
    let mut fe_c =
        RawFrontend::connect_with_backend_channel(&appliance.path("c.sock"), 1, 128, u64::MAX);
    std::thread::sleep(Duration::from_millis(300));

    appliance.rewrite_config(&config(&[&a("48M"), &b("40M"), &c("64M")]));
    // B hears of it; like QEMU it reads the config space before it answers.
    let request = fe.next_backend_request(TIMEOUT);
    assert_eq!(request.request, CONFIG_CHANGE_MSG, "{request:?}");
    assert_eq!(request.size, 0);
    assert_ne!(request.flags & NEED_REPLY, 0, "REPLY_ACK was negotiated");
    assert_eq!(capacity(&mut fe), 40 * MIB);
    fe.reply_backend_request(request, 0);
    // The new last MiB is usable and lands in the file, which grew sparsely.
    write_read(&mut fe, 39 * MIB, 1 << 20, 0x5b);
    let path = appliance.path("b.raw");
    assert_eq!(file_len(&path), 40 * MIB);
    let data = std::fs::read(&path).unwrap();
    assert!(data[(39 * MIB) as usize..].iter().all(|&x| x == 0x5b));

    let request = fe_c.next_backend_request(TIMEOUT);
    assert_eq!(request.request, CONFIG_CHANGE_MSG);
    fe_c.reply_backend_request(request, 0);
    assert_eq!(capacity(&mut fe_c), 64 * MIB);
    write_read(&mut fe_c, 63 * MIB, 1 << 20, 0xc4);

    let log = appliance
        .process
        .wait_for_log("resized (size: changed)", 3, TIMEOUT);
    for (name, old, new, told) in [
        ("a", 24, 48, "no backend channel to tell a frontend"),
        (
            "b",
            16,
            40,
            "frontend told by CONFIG_CHANGE_MSG on the backend channel",
        ),
        (
            "c",
            16,
            64,
            "frontend told by CONFIG_CHANGE_MSG on the backend channel",
        ),
    ] {
        let line = log
            .lines()
            .find(|l| {
                l.contains("resized (size: changed)") && l.contains(&format!("export=\"{name}\""))
            })
            .unwrap_or_else(|| panic!("no resize line for {name}:\n{log}"));
        eprintln!("{line}");
        assert!(
            line.contains(&format!("{} -> {} bytes; {told}", old * MIB, new * MIB)),
            "{line}"
        );
    }
    assert_eq!(file_len(&appliance.path("a.raw")), 48 * MIB);
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(appliance.path("c.qcow2"))
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 64 * MIB)),
        "{info}"
    );
    assert!(log.contains("configuration reload succeeded"), "{log}");

    // libblkio saw no error through the resize, and still works.
    assert!(verifier.finish() > 0);
    drop((fe, fe_c));
    appliance.process.terminate(TIMEOUT);
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(appliance.path("c.qcow2"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

const SCSI: &str = "  - name: s
    type: scsi
    socket: @DIR@/s.sock
    luns:
      - path: @DIR@/l0.raw
        create: { size: 8M }
      - lun: 1
        path: @DIR@/l1.raw
        create: { size: 8M }
        logical_block_size: 4096
        size: 8M
";

#[test]
fn a_grown_scsi_lun_reports_capacity_data_has_changed_and_serves_the_new_blocks() {
    let mut appliance = Appliance::start(&config(&[SCSI]), &["s.sock"]);
    let mut fe = ScsiFrontend::connect(&appliance.path("s.sock"), 1);
    fe.clear_ua(0);
    fe.clear_ua(1);
    assert_eq!(read_capacity(&mut fe, 1), (2048, 4096));

    appliance.rewrite_config(&config(&[
        &SCSI.replace("        size: 8M\n", "        size: 20M\n")
    ]));
    let log = appliance
        .process
        .wait_for_log("resized (size: changed)", 1, TIMEOUT);
    assert!(
        log.contains(&format!(
            "{} -> {} bytes; frontend told by the unit attention CAPACITY DATA HAS CHANGED",
            8 * MIB,
            20 * MIB
        )),
        "{log}"
    );
    // INQUIRY neither reports nor clears it; the next other command does, once.
    fe.good(1, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(tur(&mut fe, 1), CAPACITY_CHANGED);
    assert_eq!(tur(&mut fe, 1), GOOD);
    assert_eq!(tur(&mut fe, 0), GOOD, "LUN 0 did not change");
    assert_eq!(read_capacity(&mut fe, 1), (5120, 4096));
    assert_eq!(read_capacity(&mut fe, 0), (16384, 512));
    scsi_write_read(&mut fe, 1, 5119, 4096, 0x1d);
    let data = std::fs::read(appliance.path("l1.raw")).unwrap();
    assert_eq!(data.len() as u64, 20 * MIB);
    assert!(data[(20 * MIB - 4096) as usize..]
        .iter()
        .all(|&x| x == 0x1d));
}

#[test]
fn shrinking_is_refused_with_file_line_and_field() {
    // No create: (a size: below it would not validate): the file is there.
    let a = |size: &str| blk("a", "a.raw", "", &format!("    size: {size}\n"));
    let scsi = "  - name: s
    type: scsi
    socket: @DIR@/s.sock
    luns:
      - path: @DIR@/l0.raw
";
    let dir = dir_with_file("a.raw", 16 * MIB);
    std::fs::File::create(dir.path().join("l0.raw"))
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mut appliance =
        Appliance::start_in(dir, &config(&[&a("16M"), scsi]), &["a.sock", "s.sock"]);
    let mut fe =
        RawFrontend::connect_with_backend_channel(&appliance.path("a.sock"), 1, 128, u64::MAX);
    let file = appliance.path("exports.yaml").display().to_string();

    // A smaller size: than the running one, and a new size: below a LUN's store: both
    // refused, field by field; everything else in the file (the same) stays.
    let lun0_pinned = format!("{scsi}        size: 4M\n");
    appliance.rewrite_config(&config(&[&a("8M"), &lun0_pinned]));
    let log = appliance
        .process
        .wait_for_log("configuration change refused", 2, TIMEOUT);
    assert!(
        log.contains(&format!(
            "{file}:7: export \"a\": field \"size\": {} is smaller than the running size {}: shrinking is refused",
            8 * MIB,
            16 * MIB
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "{file}:13: export \"s\": field \"luns[0].size\": {} is smaller than the backing store ({} bytes): shrinking is refused",
            4 * MIB,
            8 * MIB
        )),
        "{log}"
    );
    assert!(log.contains("configuration reload failed"), "{log}");
    assert_eq!(capacity(&mut fe), 16 * MIB);
    assert_eq!(file_len(&appliance.path("a.raw")), 16 * MIB);

    // At start: a backing store larger than size: is not served; the other export is.
    drop(fe);
    appliance.process.terminate(TIMEOUT);
    let dir = dir_with_file("a.raw", 16 * MIB);
    std::fs::write(dir.path().join("big.raw"), vec![0u8; (2 * MIB) as usize]).unwrap();
    let big = "  - name: big
    type: blk
    socket: @DIR@/big.sock
    path: @DIR@/big.raw
    size: 1M
";
    let mut appliance = Appliance::start_in(dir, &config(&[big, &a("16M")]), &["a.sock"]);
    let log = appliance
        .process
        .wait_for_log("export not started", 1, TIMEOUT);
    let file = appliance.path("exports.yaml").display().to_string();
    assert!(
        log.contains(&format!("{file}:2: export not started")),
        "the refusal names the export's line: {log}"
    );
    assert!(
        log.contains(&format!(
            "size: {} is smaller than the backing store {} ({} bytes): shrinking is refused",
            MIB,
            appliance.path("big.raw").display(),
            2 * MIB
        )),
        "{log}"
    );
    assert!(!appliance.path("big.sock").exists());
    assert_eq!(file_len(&appliance.path("big.raw")), 2 * MIB, "untouched");
}

#[test]
fn stores_grown_underneath_are_picked_up_at_the_next_sighup() {
    let a = blk("a", "a.raw", "16M", "");
    let mut appliance = Appliance::start(&config(&[&a, SCSI]), &["a.sock", "s.sock"]);
    let mut fe =
        RawFrontend::connect_with_backend_channel(&appliance.path("a.sock"), 1, 128, u64::MAX);
    let mut scsi = ScsiFrontend::connect(&appliance.path("s.sock"), 1);
    scsi.clear_ua(0);
    scsi.clear_ua(1);
    let grow = |name: &str, len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(appliance.path(name))
            .unwrap()
            .set_len(len)
            .unwrap();
    };
    // As `truncate -s` (or lvextend) would; LUN 1 is pinned by its size: 8M.
    grow("a.raw", 24 * MIB);
    grow("l0.raw", 12 * MIB);
    grow("l1.raw", 12 * MIB);
    appliance.process.signal(libc::SIGHUP).unwrap();
    let request = fe.next_backend_request(TIMEOUT);
    assert_eq!(request.request, CONFIG_CHANGE_MSG);
    fe.reply_backend_request(request, 0);
    assert_eq!(capacity(&mut fe), 24 * MIB);
    write_read(&mut fe, 23 * MIB, 1 << 20, 0xa7);

    let log = appliance.process.wait_for_log(
        "resized (backing store grew underneath (SIGHUP))",
        2,
        TIMEOUT,
    );
    assert!(
        log.contains(&format!(
            "{} -> {} bytes; frontend told by CONFIG_CHANGE_MSG",
            16 * MIB,
            24 * MIB
        )),
        "{log}"
    );
    assert!(log.contains("the backing store is 12582912 bytes, more than size: 8388608; the capacity stays at size:"), "{log}");
    assert_eq!(tur(&mut scsi, 0), CAPACITY_CHANGED);
    assert_eq!(read_capacity(&mut scsi, 0), (12 * MIB / 512, 512));
    scsi_write_read(&mut scsi, 0, 12 * MIB / 512 - 1, 512, 0x0e);
    assert_eq!(tur(&mut scsi, 1), GOOD, "LUN 1 stays pinned");
    assert_eq!(read_capacity(&mut scsi, 1), (2048, 4096));

    // Nothing grew since: the next SIGHUP changes nothing.
    appliance.process.signal(libc::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tur(&mut scsi, 0), GOOD);
    assert_eq!(
        appliance.process.log().matches("resized (").count(),
        2,
        "{}",
        appliance.process.log()
    );
}

/// A loop device over a file, detached when dropped (the test needs root).
struct LoopDevice(std::path::PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (this test needs root and a free loop device)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(String::from_utf8_lossy(&out.stdout).trim().into())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_block_device_is_grown_by_its_owner_and_then_picked_up() {
    let dir = dir_with_file("dev.img", 8 * MIB);
    std::fs::File::create(dir.path().join("big.img"))
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let dev = LoopDevice::attach(&dir.path().join("dev.img"));
    let big = LoopDevice::attach(&dir.path().join("big.img"));
    let export = |name: &str, dev: &LoopDevice, extra: &str| {
        format!(
            "  - name: {name}\n    type: blk\n    socket: @DIR@/{name}.sock\n    path: {}\n{extra}",
            dev.0.display()
        )
    };
    // size: beyond a block device: the daemon cannot grow it, so the export is refused.
    let mut appliance = Appliance::start_in(
        dir,
        &config(&[
            &export("d", &dev, ""),
            &export("big", &big, "    size: 16M\n"),
        ]),
        &["d.sock"],
    );
    let log = appliance
        .process
        .wait_for_log("export not started", 1, TIMEOUT);
    assert!(
        log.contains(&format!(
            "{} is a block device of {} bytes: it is grown by its owner (e.g. lvextend), not by the daemon",
            big.0.display(),
            8 * MIB
        )),
        "{log}"
    );
    let mut fe =
        RawFrontend::connect_with_backend_channel(&appliance.path("d.sock"), 1, 128, u64::MAX);
    assert_eq!(capacity(&mut fe), 8 * MIB);

    // Its owner grows it (as lvextend would; here the file and the loop device's capacity).
    std::fs::OpenOptions::new()
        .write(true)
        .open(appliance.path("dev.img"))
        .unwrap()
        .set_len(12 * MIB)
        .unwrap();
    let out = Command::new("losetup")
        .arg("-c")
        .arg(&dev.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup -c: {out:?}");
    appliance.process.signal(libc::SIGHUP).unwrap();
    let request = fe.next_backend_request(TIMEOUT);
    assert_eq!(request.request, CONFIG_CHANGE_MSG);
    fe.reply_backend_request(request, 0);
    assert_eq!(capacity(&mut fe), 12 * MIB);
    write_read(&mut fe, 11 * MIB, 1 << 20, 0x6e);
    appliance
        .process
        .wait_for_log(&format!("{} -> {} bytes", 8 * MIB, 12 * MIB), 1, TIMEOUT);
    drop(fe);
    appliance.process.terminate(TIMEOUT);
}
