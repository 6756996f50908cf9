//! The daemon's sandbox (appliance/src/sandbox.rs), seen from outside: the seccomp filter,
//! no-new-privileges and the reduced capability sets are in place in a daemon that serves
//! I/O; a syscall outside the filter's list kills it with SIGSYS and a log line naming the
//! syscall (and does not with `--seccomp off`, so the test can tell); `run_as:` serves as an
//! unprivileged user with no capabilities left. Every other end-to-end test runs the daemon
//! with its default `--seccomp kill`, which proves the list covers the paths they take.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::daemon::{appliance_binary, fault_appliance_binary, Appliance};

const CONFIG: &str = "exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: { size: 16M }
    direct: false
";

/// A field of /proc/PID/status.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Writes a pattern through blkio and reads it back.
fn verified_io(appliance: &Appliance) {
    let mut fe = Frontend::connect(&appliance.path("vol0.sock"), 1);
    fe.buf(0, 8192).fill(0x5a);
    assert_eq!(fe.write(0, 4096, 0, 8192), 0);
    assert_eq!(fe.flush(0), 0);
    assert_eq!(fe.read(0, 4096, 65536, 8192), 0);
    assert!(fe.buf(65536, 8192).iter().all(|&b| b == 0x5a));
}

/// The fault-injecting build, told to call personality(2) from a new thread 1.5 s after
/// entering its sandbox.
fn daemon_with_forbidden_syscall(seccomp: &str) -> Appliance {
    let mut command = Command::new(fault_appliance_binary());
    command
        .env("VHOST_APPLIANCE_FORBIDDEN_SYSCALL_AFTER_MS", "1500")
        .arg("--seccomp")
        .arg(seccomp);
    Appliance::start_command(command, CONFIG, &["vol0.sock"])
}

#[test]
fn filter_is_on_while_serving_and_a_forbidden_syscall_kills_the_daemon() {
    let mut appliance = daemon_with_forbidden_syscall("kill");
    let pid = appliance.process.pid();
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, IPC_LOCK: bits 0, 1, 2, 3 and 14.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(pid, set), "000000000000400f", "{set}");
    }
    verified_io(&appliance);
    let status = appliance.process.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{status}\n{}",
        appliance.process.log()
    );
    let log = appliance.process.log();
    let line = format!("forbidden syscall {} ", libc::SYS_personality);
    assert!(log.contains(&line), "no {line:?} in the log:\n{log}");
}

#[test]
fn with_seccomp_off_the_same_syscall_is_allowed() {
    let mut appliance = daemon_with_forbidden_syscall("off");
    let pid = appliance.process.pid();
    assert_eq!(status_field(pid, "Seccomp"), "0");
    appliance
        .process
        .wait_for_log("personality(2) was allowed", 1, Duration::from_secs(20));
    verified_io(&appliance);
    assert!(appliance.process.try_wait().is_none(), "the daemon exited");
}

#[test]
fn run_as_serves_as_an_unprivileged_user_and_a_change_waits_for_a_restart() {
    // `nobody` must reach every path: a directory of its own under /tmp, not the 0700
    // scratch directories under target/.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let config = format!("{CONFIG}run_as: {{ user: nobody, group: \"65534\" }}\n");
    let mut appliance = Appliance::start_in(dir, &config, &["vol0.sock"]);
    let pid = appliance.process.pid();
    assert_eq!(status_field(pid, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    verified_io(&appliance);
    let owner = |name: &str| {
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(appliance.path(name)).unwrap())
    };
    assert_eq!(
        owner("vol0.raw"),
        65534,
        "the backing file is created as nobody"
    );
    assert_eq!(
        owner("state"),
        65534,
        "the state directory is given to nobody"
    );

    appliance.rewrite_config(&format!("{CONFIG}run_as: {{ user: root }}\n"));
    let log =
        appliance
            .process
            .wait_for_log("field \"run_as\": changed", 1, Duration::from_secs(20));
    assert!(log.contains("until the next start"), "{log}");
    assert_eq!(status_field(pid, "Uid"), "65534\t65534\t65534\t65534");
    verified_io(&appliance);
}

#[test]
fn run_as_an_unknown_user_is_a_clear_start_error() {
    let config = format!("{CONFIG}run_as: {{ user: no-such-user-here }}\n");
    let dir = appliance_tests::daemon::scratch_dir();
    std::fs::write(
        dir.path().join("exports.yaml"),
        config.replace("@DIR@", &dir.path().display().to_string()),
    )
    .unwrap();
    let out = Command::new(appliance_binary())
        .arg("--config")
        .arg(dir.path().join("exports.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run_as.user: no user \"no-such-user-here\""),
        "{stderr}"
    );
    assert!(
        !dir.path().join("vol0.sock").exists(),
        "nothing may serve outside the sandbox"
    );
}

/// Two SCSI exports of one daemon: each frontend sees only its own export's LUNs. REPORT
/// LUNS lists them, a LUN number of the other export is not there (peripheral qualifier 3,
/// LOGICAL UNIT NOT SUPPORTED), no target or LUN encoding reaches the other's store, and
/// a read-only export refuses writes in the daemon (DATA PROTECT), however they are sent.
#[test]
fn an_export_reaches_only_its_own_luns_and_read_only_is_enforced() {
    const TWO: &str = "exports:
  - name: a
    type: scsi
    socket: @DIR@/a.sock
    luns:
      - path: @DIR@/a0.raw
        create: { size: 4M }
      - lun: 1
        path: @DIR@/a1.raw
        create: { size: 4M }
  - name: b
    type: scsi
    socket: @DIR@/b.sock
    luns:
      - lun: 0
        path: @DIR@/b0.raw
        readonly: true
";
    use appliance_tests::scsi_frontend::ScsiFrontend;
    let dir = appliance_tests::daemon::scratch_dir();
    std::fs::write(dir.path().join("b0.raw"), vec![0u8; 4 << 20]).unwrap();
    let appliance = Appliance::start_in(dir, TWO, &["a.sock", "b.sock"]);
    let mut b = ScsiFrontend::connect(&appliance.path("b.sock"), 1);
    let luns = b.good(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(
        u32::from_be_bytes(luns[0..4].try_into().unwrap()),
        8,
        "export b lists one LUN"
    );
    assert_eq!(&luns[8..10], &[0, 0]);
    // LUN 1 exists in export a only.
    let inq = b.good(1, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(inq[0], 0x7f, "export a's LUN 1 seen through export b");
    let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let r = b.command(1, &write, &[0xee; 512], 0);
    assert_eq!((r.status, r.sense), (2, (0x05, 0x25, 0x00)));
    // Another target, and the flat-space LUN encoding of LUN 1.
    let r = b.command_raw([1, 1, 0, 0, 0, 0, 0, 0], &write, &[0xee; 512], 0);
    assert_eq!(r.response, 3, "BAD_TARGET");
    let r = b.command_raw([1, 0, 0x40, 1, 0, 0, 0, 0], &write, &[0xee; 512], 0);
    assert_ne!(r.status, 0, "a write through a flat-space LUN 1 succeeded");
    // b's own LUN is read-only: the daemon refuses the write (DATA PROTECT, WRITE PROTECTED).
    b.clear_ua(0);
    let r = b.command(0, &write, &[0xee; 512], 0);
    assert_eq!((r.status, r.sense), (2, (0x07, 0x27, 0x00)));
    for file in ["a0.raw", "a1.raw", "b0.raw"] {
        let bytes = std::fs::read(appliance.path(file)).unwrap();
        assert!(
            bytes.iter().all(|&x| x == 0),
            "{file} was written through export b"
        );
    }
}
