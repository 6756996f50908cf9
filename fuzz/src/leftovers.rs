//! The leftovers oracle of `vhost_user_backend`: once a frontend connection (and the probe
//! after it) is over, the daemon must be back to the threads and descriptors it had before
//! any connection; a connection that leaves either behind for [`SETTLE`] aborts the run
//! with the list of descriptors. Waiting for that also keeps one input's teardown out of
//! the next input.
//!
//! Pipes the sanitizer runtime opens to its symbolizer (libFuzzer prints the functions a
//! new input reached) are not the daemon's: a pipe counts only if the input itself made it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a connection's teardown may take.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Threads and descriptors (number to what it is, as /proc shows it) at some point.
#[derive(Debug, Clone)]
pub struct Resources {
    threads: usize,
    fds: BTreeMap<String, String>,
}

/// What /proc/self/fd/`name` is (`pipe:[inode]`, `socket:[inode]`, a path).
pub fn fd_target(name: &str) -> String {
    std::fs::read_link(format!("/proc/self/fd/{name}"))
        .map(|t| t.display().to_string())
        .unwrap_or_default()
}

/// The process's threads and descriptors now.
pub fn snapshot() -> Resources {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let target = fd_target(&name);
                    (name, target)
                })
                .collect()
        })
        .unwrap_or_default();
    Resources { threads, fds }
}

/// Descriptors open now that were not at `baseline`, less pipes the input did not make
/// (`pipes`: their targets) and the folder handle of the listing itself.
fn left_over(baseline: &Resources, now: &Resources, pipes: &[String]) -> Vec<(String, String)> {
    now.fds
        .iter()
        .filter(|(name, target)| {
            !baseline.fds.contains_key(*name)
                && !target.starts_with("/proc/")
                && (!target.starts_with("pipe:") || pipes.contains(target))
        })
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect()
}

/// Waits until the threads and descriptors are back to `baseline`; aborts after
/// [`SETTLE`].
pub fn settle(baseline: &Resources, pipes: &[String]) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = snapshot();
        let extra = left_over(baseline, &now, pipes);
        if now.threads <= baseline.threads && extra.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "vhost_user_backend oracle: a connection left {} threads (of {}) and these descriptors behind:",
                now.threads.saturating_sub(baseline.threads),
                now.threads
            );
            for (name, target) in extra {
                eprintln!("  fd {name} -> {target}");
            }
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
