//! exports.yaml applied live: the real daemon, its config file rewritten the way editors do
//! (a new file renamed over the old one) or SIGHUP, while frontends do I/O. Removed exports
//! complete what they accepted before their socket goes; invalid edits change nothing and
//! name file, line and field; refused changes leave the running export as it was; 200
//! rewrites leave fds, threads and memory flat; `check-config` validates offline.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::blk_raw::{DATA, HEADER, STATUS};
use appliance_tests::blkio_frontend::{Frontend, Verifier};
use appliance_tests::daemon::{appliance_binary, scratch_dir, usage, Appliance};
use appliance_tests::frontend::RawFrontend;
use appliance_tests::prom;
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use vvu_transport::split_ring::Buffer;

const TIMEOUT: Duration = Duration::from_secs(20);

fn blk(name: &str, size: &str) -> String {
    format!(
        "  - name: {name}
    type: blk
    socket: @DIR@/{name}.sock
    path: @DIR@/{name}.raw
    create: {{ size: {size} }}
    num_queues: 2
"
    )
}

fn config(exports: &[&str]) -> String {
    format!("exports:\n{}", exports.concat())
}

fn wait_gone(path: &std::path::Path) {
    let deadline = Instant::now() + TIMEOUT;
    while path.exists() {
        assert!(Instant::now() < deadline, "{} still exists", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exports_are_added_and_removed_live_while_io_runs() {
    let a = blk("a", "32M");
    let c = blk("c", "16M");
    let mut appliance = Appliance::start(&config(&[&a, &c]), &["a.sock", "c.sock"]);
    let verifier = Verifier::start(appliance.path("a.sock"));

    // C: 32 writes of 64 KiB made available at once, one kick; once the first completes the
    // daemon has accepted all of them (it pops every available chain before completing any).
    let mut fe_c = RawFrontend::connect(&appliance.path("c.sock"), 128, u64::MAX);
    const WRITES: u64 = 32;
    const LEN: u64 = 0x1_0000;
    for i in 0..WRITES {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..].copy_from_slice(&(i * LEN / 512).to_le_bytes());
        fe_c.write_mem(HEADER + i * 16, &header);
        fe_c.write_mem(DATA + i * LEN, &[0xc0 | (i as u8 & 0x0f); LEN as usize]);
        fe_c.write_mem(STATUS + i, &[0xee]);
        fe_c.add_on(
            0,
            &[
                Buffer::readable(HEADER + i * 16, 16),
                Buffer::readable(DATA + i * LEN, LEN as u32),
                Buffer::writable(STATUS + i, 1),
            ],
        );
    }
    fe_c.kick(0);
    let mut completed = vec![fe_c.wait_used(TIMEOUT)];

    // The edit: B added, C removed, A grown from 32 to 48 MiB. SIGHUP applies it at once.
    let b = blk("b", "8M");
    let a_grown = a.replace("    num_queues: 2\n", "    num_queues: 2\n    size: 48M\n");
    appliance.rewrite_config(&config(&[&a_grown, &b]));
    appliance.process.signal(libc::SIGHUP).unwrap();
    appliance
        .process
        .wait_for_path(&appliance.path("b.sock"), TIMEOUT);
    wait_gone(&appliance.path("c.sock"));

    // Everything C accepted completed, successfully, before its socket went away.
    while (completed.len() as u64) < WRITES {
        completed.push(fe_c.wait_used(TIMEOUT));
    }
    for i in 0..WRITES {
        assert_eq!(fe_c.read_mem(STATUS + i, 1)[0], 0, "write {i} to C");
    }
    assert!(!fe_c.connected(), "C's frontend is disconnected");
    let c_file = std::fs::read(appliance.path("c.raw")).unwrap();
    for i in 0..WRITES as usize {
        let at = i * LEN as usize;
        assert!(
            c_file[at..at + LEN as usize]
                .iter()
                .all(|&b| b == 0xc0 | (i as u8 & 0x0f)),
            "write {i} is in c.raw"
        );
    }

    // B serves.
    let mut fe_b = Frontend::connect(&appliance.path("b.sock"), 2);
    fe_b.buf(0, 4096).fill(0xbb);
    assert_eq!(fe_b.write(1, 4096, 0, 4096), 0);
    assert_eq!(fe_b.read(0, 4096, 4096, 4096), 0);
    assert_eq!(fe_b.buf(4096, 4096), &[0xbb; 4096][..]);

    // A saw no error through all of it, and a new frontend sees its new size.
    let ops = verifier.finish();
    assert!(ops > 0);
    appliance.process.wait_for_log(
        "resized (size: changed): 33554432 -> 50331648 bytes",
        1,
        TIMEOUT,
    );
    let mut fe_a = Frontend::connect(&appliance.path("a.sock"), 2);
    assert_eq!(fe_a.capacity, 48 << 20);
    fe_a.buf(0, 4096).fill(0xaa);
    assert_eq!(
        fe_a.write(0, (48 << 20) - 4096, 0, 4096),
        0,
        "the new last block"
    );
    let log = appliance.process.log();
    assert!(log.contains("export removed export=\"c\""), "{log}");
    let stopping = log
        .lines()
        .find(|l| l.contains("stopping: accepted requests completed") && l.contains("\"c\""))
        .unwrap_or_else(|| panic!("no stop line for C:\n{log}"));
    eprintln!("{stopping}");
    assert!(log.contains("configuration reload (SIGHUP): 1 added, 1 removed, 1 changed"));
}

#[test]
fn invalid_edits_change_nothing_and_the_next_valid_one_applies() {
    let a = blk("a", "16M");
    // A metrics endpoint on a free port: the failures are counted there too.
    let config = |exports: &[&str]| format!("metrics:\n  listen: 127.0.0.1:0\n{}", config(exports));
    let mut appliance = Appliance::start(&config(&[&a]), &["a.sock"]);
    let metrics = prom::endpoint(&appliance);
    let mut fe = Frontend::connect(&appliance.path("a.sock"), 2);
    let file = appliance.path("exports.yaml").display().to_string();
    let b_missing = "  - name: b
    type: blk
    socket: @DIR@/b.sock
    path: @DIR@/nowhere.raw
";
    let a_duplicate = "  - name: b
    type: blk
    socket: @DIR@/a.sock
    path: @DIR@/b.raw
    create: { size: 1M }
";
    // (the edit, what the error must say)
    let edits: [(String, Vec<String>); 4] = [
        (
            format!("{}  - name: [\n", config(&[&a])),
            vec![format!("{file}:10:")],
        ),
        (
            config(&[&a]).replace(
                "    num_queues: 2\n",
                "    num_queues: 2\n    colour: red\n",
            ),
            vec![format!("{file}:10:"), "unknown field `colour`".into()],
        ),
        (
            config(&[&a, a_duplicate]),
            vec![
                format!("{file}:12: export \"b\": field \"socket\""),
                "duplicate socket".into(),
            ],
        ),
        (
            config(&[&a, b_missing]),
            vec![
                format!("{file}:13: export \"b\": field \"path\""),
                "nowhere.raw does not exist".into(),
            ],
        ),
    ];
    for (n, (edit, expected)) in edits.iter().enumerate() {
        appliance.rewrite_config(edit);
        let log = appliance.process.wait_for_log(
            "configuration reload (file changed) failed, keeping the running configuration",
            n + 1,
            TIMEOUT,
        );
        let line = log
            .lines()
            .filter(|l| l.contains("keeping the running configuration"))
            .nth(n)
            .unwrap();
        for e in expected {
            assert!(line.contains(e.as_str()), "edit {n}: {e:?} not in {line:?}");
        }
        assert!(
            !line.contains(" at line "),
            "the line is given once: {line:?}"
        );
        // A still serves on its connection.
        assert_eq!(fe.write(0, 0, 0, 4096), 0, "after edit {n}");
    }
    assert!(!appliance.path("b.sock").exists());
    let scrape = prom::scrape(metrics);
    let reloads = |s: &prom::Scrape, result: &str| {
        s.value(
            "vhost_appliance_config_reloads_total",
            &[("result", result)],
        )
    };
    assert_eq!(
        (reloads(&scrape, "failure"), reloads(&scrape, "success")),
        (4.0, 0.0)
    );
    assert_eq!(
        scrape.value("vhost_appliance_config_last_reload_successful", &[]),
        0.0
    );
    assert_eq!(
        scrape.value("vhost_appliance_exports", &[("state", "serving")]),
        1.0
    );
    // The next valid edit applies.
    appliance.rewrite_config(&config(&[&a, &blk("b", "4M")]));
    appliance
        .process
        .wait_for_path(&appliance.path("b.sock"), TIMEOUT);
    assert_eq!(fe.read(1, 0, 0, 4096), 0);
    appliance
        .process
        .wait_for_log("configuration reload succeeded", 1, TIMEOUT);
    let scrape = prom::scrape(metrics);
    assert_eq!(
        (reloads(&scrape, "failure"), reloads(&scrape, "success")),
        (4.0, 1.0)
    );
    assert_eq!(
        scrape.value("vhost_appliance_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(
        scrape.value("vhost_appliance_exports", &[("state", "serving")]),
        2.0
    );
}

#[test]
fn changes_a_live_export_cannot_take_are_refused_and_the_rest_applies() {
    let a = blk("a", "16M");
    let mut appliance = Appliance::start(&config(&[&a]), &["a.sock"]);
    let mut fe = Frontend::connect(&appliance.path("a.sock"), 2);
    let changed = a.replace("num_queues: 2", "num_queues: 4").replace(
        "create: { size: 16M }",
        "create: { size: 16M }\n    logical_block_size: 4096",
    );
    appliance.rewrite_config(&config(&[&changed, &blk("b", "4M")]));
    appliance.process.signal(libc::SIGHUP).unwrap();
    appliance
        .process
        .wait_for_path(&appliance.path("b.sock"), TIMEOUT);
    let file = appliance.path("exports.yaml").display().to_string();
    let log = appliance
        .process
        .wait_for_log("configuration change refused", 2, TIMEOUT);
    assert!(
        log.contains(&format!(
            "{file}:8: export \"a\": field \"num_queues\": cannot change while the export is live (running: 2, file: 4)"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "{file}:7: export \"a\": field \"logical_block_size\": cannot change while the export is live (running: 512, file: 4096)"
        )),
        "{log}"
    );
    assert!(log.contains("configuration reload failed"), "{log}");
    // A keeps running as it was, on the same connection.
    assert_eq!(fe.write(1, 512, 0, 512), 0, "512-byte blocks still");
}

#[test]
fn two_hundred_rewrites_with_io_running_keep_fds_threads_and_memory_flat() {
    let a = blk("a", "16M");
    let e = blk("e", "1M");
    let mut appliance = Appliance::start(&config(&[&a]), &["a.sock"]);
    let pid = appliance.process.pid();
    let verifier = Verifier::start(appliance.path("a.sock"));
    let round = |appliance: &mut Appliance, with_e: bool| {
        if with_e {
            appliance.rewrite_config(&config(&[&a, &e]));
        } else {
            appliance.rewrite_config(&config(&[&a]));
        }
        appliance.process.signal(libc::SIGHUP).unwrap();
        if with_e {
            appliance
                .process
                .wait_for_path(&appliance.path("e.sock"), TIMEOUT);
        } else {
            wait_gone(&appliance.path("e.sock"));
        }
    };
    for i in 0..10 {
        round(&mut appliance, i % 2 == 0);
    }
    std::thread::sleep(Duration::from_millis(300));
    let baseline = usage(pid);
    for i in 0..200 {
        round(&mut appliance, i % 2 == 0);
    }
    std::thread::sleep(Duration::from_millis(300));
    let end = usage(pid);
    eprintln!("baseline {baseline:?}, after 200 rewrites {end:?}");
    assert_eq!(
        (end.fds, end.threads),
        (baseline.fds, baseline.threads),
        "fds and threads"
    );
    assert!(
        end.rss_kib <= baseline.rss_kib + 16 * 1024,
        "RSS grew from {} to {} KiB",
        baseline.rss_kib,
        end.rss_kib
    );
    assert!(verifier.finish() > 0);
}

#[test]
fn check_config_validates_offline() {
    let dir = scratch_dir();
    let run = |text: &str| {
        let path = dir.path().join("exports.yaml");
        std::fs::write(
            &path,
            text.replace("@DIR@", &dir.path().display().to_string()),
        )
        .unwrap();
        let out = Command::new(appliance_binary())
            .arg("check-config")
            .arg(&path)
            .args(["--log-level", "warn"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(&config(&[&blk("a", "1M")]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("valid, 1 exports"), "{out}");
    let (code, out) = run(&config(&[&blk("a", "1M"), &blk("a", "1M")]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("exports.yaml:8: export \"a\": field \"name\""),
        "{out}"
    );
    let missing = "  - name: m\n    type: blk\n    socket: @DIR@/m.sock\n    path: @DIR@/m.raw\n";
    let (code, out) = run(&config(&[missing]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("exports.yaml:5: export \"m\": field \"path\""),
        "{out}"
    );
    // Nothing was created or started by checking.
    assert!(!dir.path().join("a.raw").exists());
    assert!(!dir.path().join("a.sock").exists());
}

#[test]
fn scsi_luns_are_added_and_removed_live() {
    use appliance_tests::scsi_frontend::{ScsiFrontend, REQUEST_QUEUE};
    let lun = |n: u16, size: &str| {
        format!("      - lun: {n}\n        path: @DIR@/lun{n}.raw\n        create: {{ size: {size} }}\n")
    };
    let scsi = |luns: &[&str]| {
        format!(
            "exports:\n  - name: s\n    type: scsi\n    socket: @DIR@/s.sock\n    luns:\n{}",
            luns.concat()
        )
    };
    let (lun0, lun1) = (lun(0, "8M"), lun(1, "4M"));
    let mut appliance = Appliance::start(&scsi(&[&lun0]), &["s.sock"]);
    let mut s = ScsiFrontend::connect(&appliance.path("s.sock"), 1);
    s.clear_ua(0);
    const EVENT: u64 = 0x40_0000;
    let event = |s: &mut ScsiFrontend| {
        s.fe.write_mem(EVENT, &[0xee; 16]);
        let head = s.fe.submit_on(1, &[Buffer::writable(EVENT, 16)]);
        (head, s.fe.wait_used_on(1, TIMEOUT))
    };

    // Add LUN 1: a rescan event for it, REPORTED LUNS DATA HAS CHANGED on LUN 0, and it serves.
    appliance.rewrite_config(&scsi(&[&lun0, &lun1]));
    let (head, used) = event(&mut s);
    assert_eq!(used, (head, 16));
    let e = s.fe.read_mem(EVENT, 16);
    assert_eq!(
        &e[0..4],
        &1u32.to_le_bytes(),
        "VIRTIO_SCSI_T_TRANSPORT_RESET"
    );
    assert_eq!(&e[4..8], &[1, 0, 0, 1], "LUN 1, as Linux looks it up");
    assert_eq!(
        &e[12..16],
        &0u32.to_le_bytes(),
        "VIRTIO_SCSI_EVT_RESET_RESCAN"
    );
    let r = s.command(0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!((r.status, r.sense), (2, (0x06, 0x3f, 0x0e)), "{r:?}");
    let luns = s.good(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(
        u32::from_be_bytes([luns[0], luns[1], luns[2], luns[3]]),
        16,
        "two LUNs"
    );
    let r = s.command(1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.status, 2, "the new LUN's unit attention first: {r:?}");
    let data = vec![0x11u8; 4096];
    s.good(1, &[0x2a, 0, 0, 0, 0, 8, 0, 0, 8, 0], &data, 0);
    assert_eq!(
        s.good(1, &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], &[], 4096),
        data
    );

    // Remove LUN 1 with writes in flight: all complete, then it is gone.
    for i in 0..16u8 {
        let cdb = [0x2a, 0, 0, 0, 0, 16 + i * 8, 0, 0, 8, 0];
        s.submit_raw(
            REQUEST_QUEUE,
            ScsiFrontend::lun_field(1),
            &cdb,
            &[0x22; 4096],
            0,
        );
    }
    appliance.rewrite_config(&scsi(&[&lun0]));
    appliance.process.signal(libc::SIGHUP).unwrap();
    for _ in 0..16 {
        s.fe.wait_used_on(REQUEST_QUEUE, TIMEOUT);
    }
    appliance.process.wait_for_log("LUN removed", 1, TIMEOUT);
    let (head, used) = event(&mut s);
    assert_eq!(used, (head, 16));
    let e = s.fe.read_mem(EVENT, 16);
    assert_eq!(
        &e[12..16],
        &2u32.to_le_bytes(),
        "VIRTIO_SCSI_EVT_RESET_REMOVED"
    );
    let r = s.command(1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(
        (r.status, r.sense),
        (2, (0x05, 0x25, 0x00)),
        "LUN 1 gone: {r:?}"
    );
    let r = s.command(0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.sense, (0x06, 0x3f, 0x0e), "LUN 0 is told again: {r:?}");
    s.good(0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);

    // Changing the path of a LUN in use is refused; the LUN keeps its file.
    appliance.rewrite_config(&scsi(&[&lun0.replace("lun0.raw", "other.raw")]));
    let log = appliance
        .process
        .wait_for_log("configuration change refused", 1, TIMEOUT);
    assert!(
        log.contains("field \"luns[0].path\": cannot change while the export is live"),
        "{log}"
    );
    s.good(0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);
}

#[test]
fn sighup_retries_an_export_that_failed_to_start() {
    let b = "  - name: b\n    type: blk\n    socket: @DIR@/b.sock\n    path: @DIR@/b.raw\n";
    let mut appliance = Appliance::start(&config(&[&blk("a", "4M"), b]), &["a.sock"]);
    appliance
        .process
        .wait_for_log("export not started: backing file", 1, TIMEOUT);
    assert!(!appliance.path("b.sock").exists());
    // The operator provides the missing file; the config file itself is unchanged.
    std::fs::write(appliance.path("b.raw"), vec![0u8; 1 << 20]).unwrap();
    appliance.process.signal(libc::SIGHUP).unwrap();
    appliance
        .process
        .wait_for_path(&appliance.path("b.sock"), TIMEOUT);
    let mut fe = Frontend::connect(&appliance.path("b.sock"), 1);
    assert_eq!(fe.read(0, 0, 0, 4096), 0);
}

#[test]
fn an_empty_or_half_written_file_changes_nothing() {
    let a = blk("a", "4M");
    let mut appliance = Appliance::start(&config(&[&a]), &["a.sock"]);
    let mut fe = Frontend::connect(&appliance.path("a.sock"), 2);
    // Truncated in place, as a slow writer leaves it before its content lands.
    std::fs::write(appliance.path("exports.yaml"), "").unwrap();
    let log = appliance
        .process
        .wait_for_log("keeping the running configuration", 1, TIMEOUT);
    assert!(log.contains("field \"exports\": is missing"), "{log}");
    assert!(appliance.path("a.sock").exists());
    assert_eq!(fe.write(0, 0, 0, 4096), 0);
    // Deleted, then the same text restored: applied again (and counted), not skipped.
    std::fs::remove_file(appliance.path("exports.yaml")).unwrap();
    appliance.process.signal(libc::SIGHUP).unwrap();
    appliance.process.wait_for_log("cannot read", 1, TIMEOUT);
    appliance.rewrite_config(&config(&[&a]));
    appliance
        .process
        .wait_for_log("configuration reload succeeded", 1, TIMEOUT);
    assert_eq!(fe.read(1, 0, 0, 4096), 0);
    // A FIFO in its place is refused, not opened (which would block the main loop).
    let fifo = std::ffi::CString::new(appliance.path("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::rename(appliance.path("fifo"), appliance.path("exports.yaml")).unwrap();
    appliance.process.signal(libc::SIGHUP).unwrap();
    appliance
        .process
        .wait_for_log("not a regular file", 1, TIMEOUT);
    assert!(
        appliance.process.terminate(TIMEOUT).success(),
        "SIGTERM still stops it"
    );
}

#[test]
fn an_export_that_failed_to_start_neither_blocks_edits_nor_stays_failed_once_removed() {
    let gone =
        "  - name: gone\n    type: blk\n    socket: @DIR@/gone.sock\n    path: @DIR@/gone.raw\n";
    let a = blk("a", "4M");
    let with_metrics =
        |exports: &[&str]| format!("metrics:\n  listen: 127.0.0.1:0\n{}", config(exports));
    let mut appliance = Appliance::start(&with_metrics(&[&a, gone]), &["a.sock"]);
    let metrics = prom::endpoint(&appliance);
    let failed = |addr| prom::scrape(addr).value("vhost_appliance_exports", &[("state", "failed")]);
    assert_eq!(failed(metrics), 1.0);
    // An unrelated addition applies although `gone` still cannot start.
    appliance.rewrite_config(&with_metrics(&[&a, gone, &blk("b", "1M")]));
    appliance
        .process
        .wait_for_path(&appliance.path("b.sock"), TIMEOUT);
    // Removed from the file, it is no longer reported as failed.
    appliance.rewrite_config(&with_metrics(&[&a, &blk("b", "1M")]));
    appliance
        .process
        .wait_for_log("configuration reload succeeded", 1, TIMEOUT);
    assert_eq!(
        prom::scrape(metrics)
            .get("vhost_appliance_exports", &[("state", "failed")])
            .unwrap_or(0.0),
        0.0
    );
}

#[test]
fn socket_permissions_apply_to_running_sockets_and_aliases_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let a = blk("a", "4M");
    let mut appliance = Appliance::start(&config(&[&a]), &["a.sock"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&appliance.path("a.sock")), 0o660);
    appliance.rewrite_config(&format!(
        "socket_permissions:\n  mode: \"0600\"\n{}",
        config(&[&a])
    ));
    appliance
        .process
        .wait_for_log("socket_permissions applied", 1, TIMEOUT);
    assert_eq!(mode(&appliance.path("a.sock")), 0o600);
    // The same backing file under another name, for a second writable export: refused.
    std::os::unix::fs::symlink(appliance.path("a.raw"), appliance.path("alias.raw")).unwrap();
    let alias = "  - name: b\n    type: blk\n    socket: @DIR@/b.sock\n    path: @DIR@/alias.raw\n";
    appliance.rewrite_config(&config(&[&a, alias]));
    let log = appliance.process.wait_for_log(
        "is the same file as the backing file of export \"a\"",
        1,
        TIMEOUT,
    );
    assert!(log.contains("field \"path\""), "{log}");
    assert!(!appliance.path("b.sock").exists());
}
