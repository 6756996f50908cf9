//! The daemon's own resource use, read from `/proc/self` for the standard `process_*`
//! metrics (the names client_golang's process collector uses, so existing dashboards work).
//! Each value is `None` when it cannot be read; a scrape never fails for it.

use std::fs;

use nix::sys::resource::{getrlimit, Resource};
use nix::unistd::{sysconf, SysconfVar};

/// A reading of the process's resource use.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Process start time, in seconds since the epoch.
    pub start_time_seconds: Option<f64>,
}

/// Reads the calling process's resource use.
pub fn read() -> ProcessStats {
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .map(|t| t as f64);
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok());
    let stat = fs::read_to_string("/proc/self/stat").ok();
    let fields = stat.as_deref().map(stat_fields).unwrap_or_default();
    let field = |n: usize| fields.get(n).and_then(|f| f.parse::<u64>().ok());
    let boot_time = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| boot_time(&s));
    ProcessStats {
        cpu_seconds: match (field(UTIME), field(STIME), ticks) {
            (Some(u), Some(s), Some(t)) => Some((u + s) as f64 / t),
            _ => None,
        },
        resident_bytes: field(RSS).zip(page).map(|(p, size)| p * size),
        virtual_bytes: field(VSIZE),
        open_fds: fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
        max_fds: getrlimit(Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft),
        start_time_seconds: match (field(STARTTIME), ticks, boot_time) {
            (Some(start), Some(t), Some(boot)) => Some(boot as f64 + start as f64 / t),
            _ => None,
        },
    }
}

// Indexes into the fields after the command name of /proc/PID/stat (proc(5) numbers them
// from 1 with pid and comm first, so field N is index N - 3 here).
const UTIME: usize = 14 - 3;
const STIME: usize = 15 - 3;
const STARTTIME: usize = 22 - 3;
const VSIZE: usize = 23 - 3;
const RSS: usize = 24 - 3;

/// The fields of `/proc/PID/stat` after `(comm)`, which may itself hold spaces and
/// parentheses.
fn stat_fields(stat: &str) -> Vec<&str> {
    match stat.rfind(')') {
        Some(end) => stat[end + 1..].split_whitespace().collect(),
        None => Vec::new(),
    }
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_skip_a_command_name_with_spaces_and_parentheses() {
        let stat =
            "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 300";
        let f = stat_fields(stat);
        assert_eq!(f[0], "S");
        assert_eq!(f[UTIME], "250");
        assert_eq!(f[STIME], "50");
        assert_eq!(f[STARTTIME], "12345");
        assert_eq!(f[VSIZE], "1000000");
        assert_eq!(f[RSS], "300");
    }

    #[test]
    fn reads_this_process() {
        let p = read();
        assert!(p.cpu_seconds.is_some());
        assert!(p.resident_bytes.is_some_and(|r| r > 0));
        assert!(p.open_fds.is_some_and(|n| n >= 3));
        assert!(p.start_time_seconds.is_some_and(|t| t > 1.0e9));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }
}
