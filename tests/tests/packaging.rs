//! The Debian package on a clean Debian bookworm booted under systemd (systemd-nspawn):
//! `dpkg -i` + `apt-get -f install`, bookworm's systemd accepts every directive of the unit,
//! the unit reaches `active` through READY=1 and serves I/O under its sandbox,
//! `systemctl reload` applies an edited exports.yaml, and `systemctl stop` completes the
//! requests in flight and exits 0. The libvirt consumer is in `libvirt.rs`.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use appliance_tests::blk_raw::{DATA, HEADER, STATUS};
use appliance_tests::frontend::RawFrontend;
use appliance_tests::nspawn::{base_rootfs, Container, Net};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use vvu_transport::split_ring::Buffer;

const UNIT: &str = "vhost-appliance.service";
const TIMEOUT: Duration = Duration::from_secs(30);

/// `systemctl show` properties of the unit, as `Key=value` lines.
fn show(container: &Container, properties: &str) -> String {
    container.sh_ok(&format!("systemctl show {UNIT} -p {properties}"))
}

/// When the daemon logged `message` (its own UTC timestamp, the line's first word), in µs
/// since the epoch.
fn daemon_timestamp_us(container: &Container, message: &str) -> i64 {
    let journal = container.journal(UNIT);
    let line = journal
        .lines()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no {message:?} in:\n{journal}"));
    let stamp = line.split_whitespace().next().unwrap();
    container
        .sh_ok(&format!("date -u -d '{stamp}' +%s%6N"))
        .trim()
        .parse()
        .unwrap()
}

/// When systemd logged `message` about the unit (the entry's source time), in µs since the
/// epoch.
fn systemd_timestamp_us(container: &Container, message: &str) -> i64 {
    let json = container.sh_ok(&format!("journalctl -b -u {UNIT} -o json --no-pager"));
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|entry| {
            entry["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .and_then(|entry| {
            entry["_SOURCE_REALTIME_TIMESTAMP"]
                .as_str()
                .or(entry["__REALTIME_TIMESTAMP"].as_str())
                .and_then(|t| t.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {message:?} from systemd in:\n{json}"))
}

#[test]
#[ignore = "full tier (tests/run.sh): builds the .deb (release) and boots bookworm under systemd-nspawn"]
fn deb_installs_and_the_unit_serves_reloads_and_drains() {
    // The host's network: `apt-get -f install` fetches what minbase lacks (procps, for the
    // unit's ExecReload=/bin/kill) from the Debian mirror.
    let container = Container::boot_and_install(base_rootfs(), &[], Net::Host);

    // The package's files, the conffile among them.
    let files = container.sh_ok("dpkg -L vhost-appliance");
    for path in [
        "/usr/bin/vhost-appliance",
        "/usr/share/man/man8/vhost-appliance.8.gz",
        "/usr/share/man/man8/vhost-appliance-check-config.8.gz",
        "/lib/systemd/system/vhost-appliance.service",
        "/usr/lib/tmpfiles.d/vhost-appliance.conf",
        "/usr/share/vhost-appliance/grafana/dashboard.json",
    ]
    .iter()
    .chain(&["/etc/vhost-appliance/exports.yaml"])
    {
        let found = files.lines().any(|l| l == *path || l.ends_with(path));
        assert!(found, "{path} is not in the package:\n{files}");
    }
    assert_eq!(
        container
            .sh_ok("cat /var/lib/dpkg/info/vhost-appliance.conffiles")
            .trim(),
        "/etc/vhost-appliance/exports.yaml"
    );
    // The man page: clap's sections and the hand-written ones.
    let man = container.sh_ok("zcat /usr/share/man/man8/vhost-appliance.8.gz");
    for section in [
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH SUBCOMMANDS",
        ".SH SIGNALS",
    ] {
        assert!(man.contains(section), "{section} missing:\n{man}");
    }

    // Bookworm's systemd accepts every directive: `verify` prints a line for any it does not
    // know or cannot apply.
    let verify = container.sh(&format!(
        "systemd-analyze verify --man=no /lib/systemd/system/{UNIT}"
    ));
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Enabled and started by the package's postinst; active only once READY=1 came (Type=notify),
    // which the daemon sends after its exports are listening.
    container.wait_until(
        &format!("systemctl is-active --quiet {UNIT}"),
        "the unit is active",
        UNIT,
        TIMEOUT,
    );
    assert_eq!(
        container
            .sh_ok(&format!("systemctl is-enabled {UNIT}"))
            .trim(),
        "enabled"
    );
    let props = show(&container, "Type,ActiveState,SubState,MainPID,NRestarts");
    assert!(props.contains("Type=notify\n"), "{props}");
    assert!(props.contains("SubState=running\n"), "{props}");
    assert!(props.contains("NRestarts=0\n"), "{props}");
    let main_pid = props
        .lines()
        .find_map(|l| l.strip_prefix("MainPID="))
        .unwrap()
        .to_string();
    // Systemd logged the start after the daemon said it was serving. Journald stamps a
    // service's stderr lines when it reads them (possibly after systemd's own message), so
    // the daemon's line is placed by its own timestamp.
    let serving = "serving 1 of 1 exports from /etc/vhost-appliance/exports.yaml";
    container.wait_until(
        &format!("journalctl -b -u {UNIT} -o cat | grep -q '{serving}'"),
        "the daemon's serving line in the journal",
        UNIT,
        TIMEOUT,
    );
    let (serving_us, started_us) = (
        daemon_timestamp_us(&container, serving),
        systemd_timestamp_us(&container, "Started vhost-appliance.service"),
    );
    assert!(
        serving_us <= started_us,
        "systemd started the unit {} µs before the daemon was serving:\n{}",
        serving_us - started_us,
        container.journal(UNIT)
    );

    // Under the unit's sandbox, the daemon's own: seccomp filter on, no new privileges, no
    // capability beyond the five it keeps (SETUID and SETGID of the unit's bounding set
    // dropped; IPC_LOCK only where the container has it: nspawn's default set does not).
    let status = container.sh_ok(&format!("cat /proc/{main_pid}/status"));
    for field in ["Seccomp:\t2\n", "NoNewPrivs:\t1\n"] {
        assert!(status.contains(field), "no {field:?} in:\n{status}");
    }
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    assert_eq!(cap_eff & !0x400f, 0, "CapEff {cap_eff:#x}:\n{status}");
    assert_eq!(cap_eff & 0xf, 0xf, "CapEff {cap_eff:#x}:\n{status}");

    // The example config's export, made by the daemon under the sandbox (state and runtime
    // directories), answers a real frontend: 32 writes of 64 KiB made available at once.
    container.sh_ok(
        "test -S /run/vhost-appliance/vol0.sock && test -f /var/lib/vhost-appliance/vol0.raw \
         && test \"$(stat -c %a /run/vhost-appliance)\" = 755",
    );
    let mut fe = RawFrontend::connect(
        &container.host_path("/run/vhost-appliance/vol0.sock"),
        128,
        u64::MAX,
    );
    const WRITES: u64 = 32;
    const LEN: u64 = 0x1_0000;
    let pattern = |i: u64| 0xa0 | (i as u8 & 0x0f);
    for i in 0..WRITES {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..].copy_from_slice(&(i * LEN / 512).to_le_bytes());
        fe.write_mem(HEADER + i * 16, &header);
        fe.write_mem(DATA + i * LEN, &[pattern(i); LEN as usize]);
        fe.write_mem(STATUS + i, &[0xee]);
        fe.add_on(
            0,
            &[
                Buffer::readable(HEADER + i * 16, 16),
                Buffer::readable(DATA + i * LEN, LEN as u32),
                Buffer::writable(STATUS + i, 1),
            ],
        );
    }

    // Reload: an edit adding an export whose backing file is missing is refused by the
    // daemon's own file watch; once the file exists only SIGHUP brings the export up (the
    // config file did not change again), and `systemctl reload` is what sends it.
    let config = container.sh_ok("cat /etc/vhost-appliance/exports.yaml");
    let edited = format!(
        "{config}  - name: vol1\n    type: blk\n    socket: /run/vhost-appliance/vol1.sock\n    \
         path: /var/lib/vhost-appliance/vol1.raw\n    num_queues: 1\n"
    );
    container.sh_ok(&format!(
        "cat > /etc/vhost-appliance/exports.yaml.new <<'EOF'\n{edited}EOF\n\
         mv /etc/vhost-appliance/exports.yaml.new /etc/vhost-appliance/exports.yaml"
    ));
    container.wait_until(
        &format!("journalctl -b -u {UNIT} -o cat | grep -q 'reload (file changed) failed'"),
        "the daemon refuses the edit naming a missing file",
        UNIT,
        TIMEOUT,
    );
    container.sh_ok("! test -e /run/vhost-appliance/vol1.sock");
    container.sh_ok("truncate -s 64M /var/lib/vhost-appliance/vol1.raw");
    container.sh_ok(&format!("systemctl reload {UNIT}"));
    container.wait_until(
        "test -S /run/vhost-appliance/vol1.sock",
        "vol1's socket appears after systemctl reload",
        UNIT,
        TIMEOUT,
    );
    let journal = container.journal(UNIT);
    assert!(
        journal.contains("configuration reload (SIGHUP) applied: serving 2 exports: vol0, vol1"),
        "{journal}"
    );
    assert!(
        show(&container, "MainPID").contains(&format!("MainPID={main_pid}\n")),
        "reload restarted the daemon"
    );

    // Stop with requests in flight: the writes are kicked, the first completion shows the
    // daemon took them all (it pops every available chain first), then `systemctl stop`.
    fe.kick(0);
    let mut completed = vec![fe.wait_used(TIMEOUT)];
    container.sh_ok(&format!("systemctl stop {UNIT}"));
    while (completed.len() as u64) < WRITES {
        completed.push(fe.wait_used(TIMEOUT));
    }
    for i in 0..WRITES {
        assert_eq!(
            fe.read_mem(STATUS + i, 1)[0],
            0,
            "write {i} completed with OK"
        );
    }
    assert!(!fe.connected(), "the frontend is disconnected at stop");
    // systemctl prints them in its own order.
    let mut props: Vec<String> = show(&container, "ActiveState,Result,ExecMainCode,ExecMainStatus")
        .lines()
        .map(String::from)
        .collect();
    props.sort();
    assert_eq!(
        props,
        [
            "ActiveState=inactive",
            "ExecMainCode=1",
            "ExecMainStatus=0",
            "Result=success"
        ],
        "{}",
        container.journal(UNIT)
    );
    let journal = container.journal(UNIT);
    assert!(
        journal.contains("SIGTERM: completing in-flight I/O and exiting"),
        "{journal}"
    );
    // Every write is in the backing file; the sockets are gone; the socket directory stays.
    let file = std::fs::read(container.host_path("/var/lib/vhost-appliance/vol0.raw")).unwrap();
    for i in 0..WRITES as usize {
        let at = i * LEN as usize;
        assert!(
            file[at..at + LEN as usize]
                .iter()
                .all(|&b| b == pattern(i as u64)),
            "write {i} is in vol0.raw"
        );
    }
    container.sh_ok(
        "test -d /run/vhost-appliance && ! test -e /run/vhost-appliance/vol0.sock \
         && ! test -e /run/vhost-appliance/vol1.sock",
    );
}
