//! The benchmark suite: this daemon side by side with qemu-storage-daemon (and
//! vhost-device-scsi for SCSI) and fio on the file, in one run, on the same files. Prints a
//! table and writes `bench.json` and `bench.svg`. Not a test: figures depend on the machine
//! and its load; compare rows of one run, not runs.
//!
//!     bash tests/scripts/install-deps.sh          # fio, qemu-storage-daemon, qemu-img, vhost-device-scsi
//!     cargo build --release --workspace --bins
//!     target/release/bench [--seconds 3] [--backing raw-tmpfs ...] [--workload qd1 ...]
//!
//! Rows: `fio` (io_uring on the file, librbd on the RBD image: the limit), the peer (`qsd`: qemu-storage-daemon
//! 10.0 with one iothread, its default adaptive polling and io_uring; `vhost-device-scsi`
//! for SCSI), `ours` (default settings), `ours-poll` (`poll: {max_us, adaptive: true}`) and
//! `ours-poll-fixed` (`adaptive: false`). Appliance-VM rows (`ours-vvu`, the null export
//! served from inside the appliance VM) run where KVM boots guests, or with `--vvu`.

// A benchmark program: failures abort with their message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use appliance_tests::bench::report::{self, Row};
use appliance_tests::bench::servers::{self, Backing, Places, Poll, Store};
use appliance_tests::bench::{self, blk, scsi, Measured, Workload};
use appliance_tests::ceph;
use appliance_tests::daemon::Process;
use appliance_tests::vm::{preferred_accel, Accel};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Benchmark vhost-appliance against qemu-storage-daemon and fio")]
struct Args {
    /// Measured seconds per row (after a 0.3 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds: every row is measured this many times, servers taking turns, and the
    /// median round reported.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Backings to run (raw-tmpfs, raw-direct, qcow2-tmpfs, null, scsi-raw-tmpfs, rbd); all by default.
    #[arg(long, num_args = 1..)]
    backing: Vec<String>,
    /// Only workloads whose name contains one of these (e.g. qd1, 4q).
    #[arg(long, num_args = 1..)]
    workload: Vec<String>,
    /// Only these servers' rows (fio, qsd, vhost-device-scsi, ours, ours-poll, ours-poll-fixed); all by default.
    #[arg(long, num_args = 1..)]
    server: Vec<String>,
    /// Busy-poll budget of the ours-poll rows, µs (0: no poll rows).
    #[arg(long, default_value_t = 32)]
    poll_us: u32,
    /// MiB of the file (image) each backing's rows run on.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Directory for bench.json and bench.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Directory on tmpfs for the tmpfs backings.
    #[arg(long, default_value = "/dev/shm/vhost-appliance-bench")]
    tmpfs: PathBuf,
    /// Directory on a disk file system (O_DIRECT) for the raw-direct backing.
    #[arg(long, default_value = "/var/tmp/vhost-appliance-bench")]
    disk: PathBuf,
    /// Measure nothing: draw the table and chart of an earlier run's bench.json again
    /// (into --out).
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Run the appliance-VM rows even where guests run under TCG (their figures then say
    /// nothing about performance).
    #[arg(long)]
    vvu: bool,
}

/// Runs `w` against the server `p` (whose CPU time is sampled over the measured window)
/// through the frontend of `backing`.
fn measure(
    socket: &Path,
    backing: Backing,
    w: &Workload,
    seconds: f64,
    p: &Process,
) -> Option<Measured> {
    let pid = p.pid();
    let run = std::panic::catch_unwind(|| {
        if backing.scsi() {
            scsi::run(socket, w, seconds, pid)
        } else {
            blk::run(socket, w, seconds, pid)
        }
    });
    let Ok(m) = run else {
        eprintln!(
            "bench: {} {} failed: the row is left out (see the message above)",
            backing.name(),
            w.name
        );
        return None;
    };
    Some(m)
}

fn main() {
    let args = Args::parse();
    bench::set_file_size(args.size_mib.max(8) << 20);
    if let Some(path) = &args.from_json {
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        std::fs::create_dir_all(&args.out).unwrap();
        let rows = report::rows_from_json(&doc);
        println!("{}", write_outputs(&args.out, &rows, &doc["machine"]));
        return;
    }
    let backings: Vec<Backing> = Backing::ALL
        .into_iter()
        .filter(|b| args.backing.is_empty() || args.backing.iter().any(|n| n == b.name()))
        .collect();
    std::fs::create_dir_all(&args.tmpfs).unwrap();
    std::fs::create_dir_all(&args.disk).unwrap();
    std::fs::create_dir_all(&args.out).unwrap();
    let machine = machine();
    eprintln!("bench: {machine}");
    let vds = servers::vhost_device_scsi();
    let mut rows: Vec<Row> = Vec::new();
    let mut polls = vec![("ours", None)];
    if args.poll_us > 0 {
        let max_us = args.poll_us;
        polls.push((
            "ours-poll",
            Some(Poll {
                max_us,
                adaptive: true,
            }),
        ));
        polls.push((
            "ours-poll-fixed",
            Some(Poll {
                max_us,
                adaptive: false,
            }),
        ));
    }
    // The rbd rows run on a one-node cluster of their own, where Ceph is installed.
    let mut backings = backings;
    let cluster = if !backings.contains(&Backing::Rbd) {
        None
    } else if Path::new("/usr/bin/ceph-mon").exists() {
        eprintln!("bench: starting a one-node Ceph cluster for the rbd rows");
        Some(ceph::Cluster::start())
    } else {
        println!("rbd rows skipped: Ceph is not installed (tests/scripts/install-deps.sh)");
        backings.retain(|b| *b != Backing::Rbd);
        None
    };
    let places = Places {
        tmpfs: args.tmpfs.clone(),
        disk: args.disk.clone(),
        ceph_conf: cluster.as_ref().map(ceph::Cluster::conf),
    };
    for backing in backings {
        backing.prepare(&places);
        let store = backing.store(&places);
        let file = match &store {
            Store::File(f) => Some(f.clone()),
            _ => None,
        };
        // virtio-scsi (vhost-device-scsi serves one queue) and the test cluster: one queue.
        let max_queues = if backing.scsi() || backing == Backing::Rbd {
            1
        } else {
            4
        };
        let workloads: Vec<Workload> = bench::suite(max_queues)
            .into_iter()
            .filter(|w| {
                args.workload.is_empty()
                    || args.workload.iter().any(|f| w.name.contains(f.as_str()))
            })
            .collect();
        for w in workloads {
            let wanted =
                |server: &str| args.server.is_empty() || args.server.iter().any(|s| s == server);
            // Each round measures every server once, in turn; a row is the round with the
            // median figure of merit, so a burst of load on the machine hits all servers
            // alike and is outvoted.
            let mut runs: Vec<(String, Vec<Measured>)> = Vec::new();
            let mut record = |server: &str, measured: Option<Measured>| {
                let Some(measured) = measured else {
                    return;
                };
                eprintln!(
                    "bench: {:<14} {:<20} {:<16} {:>9.0} IOPS {:>8.1} µs mean",
                    backing.name(),
                    w.name,
                    server,
                    measured.iops(),
                    measured.lat_us[0]
                );
                match runs.iter_mut().find(|(s, _)| s == server) {
                    Some((_, all)) => all.push(measured),
                    None => runs.push((server.to_string(), vec![measured])),
                }
            };
            for _ in 0..args.rounds.max(1) {
                if backing.has_limit() && wanted("fio") {
                    record(
                        "fio",
                        Some(servers::run_fio(backing, &store, &w, args.seconds)),
                    );
                }
                let dir = scratch(&args.out);
                let socket = dir.path().join("bench.sock");
                if backing.scsi() && wanted("vhost-device-scsi") {
                    match (&vds, &file) {
                        (Some(vds), Some(f)) => {
                            let p = servers::start_vhost_device_scsi(dir.path(), vds, f);
                            let m = measure(&socket, backing, &w, args.seconds, &p);
                            record("vhost-device-scsi", m);
                        }
                        _ => eprintln!("bench: vhost-device-scsi not installed (tests/scripts/install-deps.sh): no peer row"),
                    }
                } else if !backing.scsi() && wanted("qsd") {
                    let p = servers::start_qsd(dir.path(), backing, &store, w.queues);
                    record("qsd", measure(&socket, backing, &w, args.seconds, &p));
                }
                for (name, poll) in polls.iter().filter(|(name, _)| wanted(name)) {
                    let p = servers::start_ours(dir.path(), backing, &store, w.queues, *poll);
                    record(name, measure(&socket, backing, &w, args.seconds, &p));
                }
            }
            for (server, all) in runs {
                rows.push(Row {
                    backing: backing.name(),
                    workload: w,
                    server,
                    measured: report::median(&w, all),
                });
            }
        }
        write_outputs(&args.out, &rows, &machine);
    }
    vvu_rows(&args, &mut rows);
    // The appliance-VM rows join their backing's section.
    let order = |b: &str| Backing::ALL.iter().position(|x| x.name() == b);
    rows.sort_by_key(|r| order(r.backing));
    let table = write_outputs(&args.out, &rows, &machine);
    println!("{table}");
    eprintln!(
        "bench: wrote {0}/bench.json, {0}/bench.svg, {0}/bench.txt",
        args.out.display()
    );
}

/// Writes the JSON, the chart and the table of `rows` into `out` (after each backing too,
/// so a long run that is stopped keeps what it measured); returns the table.
fn write_outputs(out: &Path, rows: &[Row], machine: &serde_json::Value) -> String {
    let table = report::table(rows);
    let json = report::json(rows, machine.clone());
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    std::fs::write(out.join("bench.svg"), report::svg(rows)).unwrap();
    std::fs::write(out.join("bench.txt"), &table).unwrap();
    table
}

/// The appliance-VM rows: the null export served from inside the appliance VM through the
/// virtio-vhost-user device, next to the host-mode null rows.
fn vvu_rows(args: &Args, rows: &mut Vec<Row>) {
    if !(args.backing.is_empty() || args.backing.iter().any(|b| b == "null")) {
        return;
    }
    let accel = preferred_accel();
    if accel != Accel::Kvm && !args.vvu {
        println!(
            "appliance-VM rows skipped: KVM cannot boot guests on this host (no vmx/svm, or PVM), and \
             under TCG the appliance VM's I/O figures are emulation speed, not performance (--vvu runs them anyway)"
        );
        return;
    }
    use appliance_tests::appliance_vm::{self, ApplianceVmOptions, VvuSocket};
    let exports = format!(
        "exports:\n  - name: bench\n    type: blk\n    vvu: 0000:00:10.0\n    format: null\n    size: {}\n    num_queues: 4\n",
        bench::file_size()
    );
    let sockets = scratch(&args.out);
    let options = ApplianceVmOptions::new(&exports, vec![VvuSocket::at("bench.sock")], 1);
    let _vm = appliance_vm::start(sockets.path(), &options);
    let socket = sockets.path().join("bench.sock");
    let server = format!(
        "ours-vvu-{}",
        if accel == Accel::Kvm { "kvm" } else { "tcg" }
    );
    for w in bench::suite(4).into_iter().filter(|w| {
        args.workload.is_empty() || args.workload.iter().any(|f| w.name.contains(f.as_str()))
    }) {
        // The daemon runs inside the VM: no server process here to charge CPU to.
        let mut measured = blk::run(&socket, &w, args.seconds, std::process::id());
        measured.cpu_s_per_mio = None;
        eprintln!(
            "bench: null {:<20} {server:<16} {:>9.0} IOPS",
            w.name,
            measured.iops()
        );
        rows.push(Row {
            backing: Backing::Null.name(),
            workload: w,
            server: server.clone(),
            measured,
        });
    }
}

/// A scratch directory for one server's socket, config and log, under `out`.
fn scratch(out: &Path) -> tempfile::TempDir {
    let parent = out.join("run");
    std::fs::create_dir_all(&parent).unwrap();
    tempfile::tempdir_in(parent).unwrap()
}

/// Facts about the machine and the run, for the JSON and the README.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": run("uname", &["-r"]),
        "load_average": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "qemu_storage_daemon": run("qemu-storage-daemon", &["--version"]),
        "fio": run("fio", &["--version"]),
        "commit": run("git", &["rev-parse", "--short", "HEAD"]),
        "date": run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}
