//! Many exports under churn: 64 exports (blk and scsi, raw and qcow2, one and two queues)
//! served by one daemon, frontends connecting to them concurrently while the config is
//! rewritten again and again (a quarter of the exports removed and added back, extra
//! exports coming and going). Afterwards every export serves, and the daemon's open fds,
//! threads and mapped frontend memory are back to their baseline, its resident memory
//! within a bound. Prints the before/after counts.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_tests::churn::{settled, short_session};
use appliance_tests::daemon::{appliance_binary, usage, Appliance};
use appliance_tests::rng::Rng;

const EXPORTS: usize = 64;
/// Exports 48..64 are removed and added back by the storm; 0..48 stay and take sessions.
const STABLE: usize = 48;
/// Config rewrites in the storm.
const REWRITES: usize = 40;
/// Concurrent frontend threads during the storm.
const FRONTENDS: usize = 4;
/// Resident memory the daemon may keep over its baseline after the run (allocator caches,
/// qcow2 metadata caches of re-added images); one leaked 16 MiB guest mapping per session
/// would be gigabytes.
const RSS_SLACK_KIB: u64 = 48 << 10;

/// Export `i`: (kind, format, queues).
fn shape(i: usize) -> (&'static str, &'static str, usize) {
    let kind = if i.is_multiple_of(2) { "blk" } else { "scsi" };
    let format = if i % 4 < 2 { "raw" } else { "qcow2" };
    let queues = if i % 8 < 4 { 1 } else { 2 };
    (kind, format, queues)
}

fn export_yaml(name: &str, i: usize) -> String {
    let (kind, format, queues) = shape(i);
    let ext = if format == "raw" { "raw" } else { "qcow2" };
    let disk = format!(
        "path: @DIR@/{name}.{ext}\n    format: {format}\n    create: {{ size: 4M }}\n    direct: false"
    );
    match kind {
        "blk" => format!(
            "  - name: {name}\n    type: blk\n    socket: @DIR@/{name}.sock\n    num_queues: {queues}\n    {disk}\n"
        ),
        _ => format!(
            "  - name: {name}\n    type: scsi\n    socket: @DIR@/{name}.sock\n    num_queues: {queues}\n    luns:\n      - {}\n",
            disk.replace("\n    ", "\n        ")
        ),
    }
}

/// The config with the exports of `present` (indices) and extra blk exports `extras`.
fn config(present: impl Iterator<Item = usize>, extras: &[usize]) -> String {
    let mut text = String::from("metrics:\n  listen: 127.0.0.1:0\nexports:\n");
    for i in present {
        text += &export_yaml(&format!("e{i:02}"), i);
    }
    for &x in extras {
        text += &export_yaml(&format!("extra{x}"), 0);
    }
    text
}

fn socket(i: usize) -> String {
    format!("e{i:02}.sock")
}

#[test]
#[ignore = "full tier (tests/run.sh): 64 exports, a 40-rewrite reload storm (~30 s)"]
fn sixty_four_exports_under_a_reload_storm_leave_nothing_behind() {
    let mut command = Command::new(appliance_binary());
    // Two malloc arenas, so the resident memory measures leaks rather than how many
    // per-thread arenas glibc happened to create (as in connection_churn.rs).
    command.env("MALLOC_ARENA_MAX", "2");
    let sockets: Vec<String> = (0..EXPORTS).map(socket).collect();
    let names: Vec<&str> = sockets.iter().map(String::as_str).collect();
    let mut appliance = Appliance::start_command(command, &config(0..EXPORTS, &[]), &names);
    let pid = appliance.process.pid();

    // Warm up: one session per export, so that lazily created state exists.
    for i in 0..EXPORTS {
        let (kind, _, queues) = shape(i);
        short_session(&appliance.path(&socket(i)), kind, queues, i);
    }
    std::thread::sleep(Duration::from_millis(500));
    let baseline = usage(pid);
    eprintln!("baseline (64 exports, idle): {baseline:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..FRONTENDS)
        .map(|t| {
            let stop = stop.clone();
            let sessions = sessions.clone();
            let dir = appliance.dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    let i = n % STABLE;
                    let (kind, _, queues) = shape(i);
                    short_session(&dir.join(socket(i)), kind, queues, n);
                    sessions.fetch_add(1, Ordering::Relaxed);
                    n += FRONTENDS;
                }
            })
        })
        .collect();

    let mut rng = Rng::new(0x6a5e_ed64);
    let started = Instant::now();
    for round in 0..REWRITES {
        let churned: Vec<usize> = (STABLE..EXPORTS).filter(|_| rng.below(2) == 1).collect();
        let extras: Vec<usize> = (0..rng.below(4) as usize).map(|k| round * 4 + k).collect();
        appliance.rewrite_config(&config((0..STABLE).chain(churned), &extras));
        // Longer than the daemon's settle time for file events (200 ms), so most rewrites
        // are reloads of their own rather than coalesced.
        std::thread::sleep(Duration::from_millis(250 + rng.below(150)));
    }
    // Back to the 64 exports of the start.
    let all_back = "applied: serving 64 exports";
    let before = appliance.process.log().matches(all_back).count();
    appliance.rewrite_config(&config(0..EXPORTS, &[]));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .expect("a frontend thread failed (see its panic above)");
    }
    let storm = started.elapsed();

    // The last reload brought every export back: each serves a session.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..EXPORTS).all(|i| appliance.path(&socket(i)).exists()) {
        assert!(
            Instant::now() < deadline,
            "not every socket came back:\n{}",
            appliance.process.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    appliance
        .process
        .wait_for_log(all_back, before + 1, Duration::from_secs(30));
    for i in 0..EXPORTS {
        let (kind, _, queues) = shape(i);
        short_session(&appliance.path(&socket(i)), kind, queues, 1000 + i);
    }
    let reloads = appliance
        .process
        .log()
        .matches("configuration reload succeeded")
        .count();
    let end = settled(pid, baseline, "the reload storm", Duration::from_secs(30));
    eprintln!(
        "after {REWRITES} rewrites ({reloads} reloads applied) and {} sessions in {:.1}s: {end:?}",
        sessions.load(Ordering::Relaxed),
        storm.as_secs_f64()
    );
    eprintln!(
        "| resource | baseline | after |\n|---|---|---|\n| open fds | {} | {} |\n| threads | {} | {} |\n| memfd mappings | {} | {} |\n| RSS KiB | {} | {} |",
        baseline.fds,
        end.fds,
        baseline.threads,
        end.threads,
        baseline.memfd_maps,
        end.memfd_maps,
        baseline.rss_kib,
        end.rss_kib
    );
    assert!(reloads >= REWRITES / 2, "only {reloads} reloads applied");
    assert!(
        sessions.load(Ordering::Relaxed) >= FRONTENDS,
        "the frontends did not get through"
    );
    assert!(
        end.rss_kib <= baseline.rss_kib + RSS_SLACK_KIB,
        "resident memory grew: baseline {baseline:?}, end {end:?}"
    );
}
