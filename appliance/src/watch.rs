//! What makes the daemon reload or stop: inotify on the config file's directory and the
//! signals SIGHUP, SIGTERM and SIGINT, in one `poll` on the main thread; also
//! [`store_changed`], which disk engines that hear of a store resized underneath (RBD)
//! signal so that the new capacity reaches the frontend at once.
//!
//! The directory is watched, not the file: editors and config managers write a new file
//! and rename it over the old one, and Kubernetes swaps a `..data` symlink, none of which
//! an inotify watch on the file itself survives (Envoy and Prometheus watch directories
//! for the same reason). Events arrive in bursts (write, close, rename), so a reload runs
//! once the directory has been quiet for [`SETTLE`]; SIGHUP reloads at once.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The reason a SIGHUP reload gives.
pub const SIGHUP: &str = "SIGHUP";

/// How long the config directory must be quiet before a reload.
pub const SETTLE: Duration = Duration::from_millis(200);

/// The eventfd a disk engine writes when a backing store may have changed size underneath
/// (another client resized an RBD image); the main loop then checks every export's stores.
/// `None` if it could not be created (then such changes wait for the next reload).
pub fn store_changed() -> Option<&'static vmm_sys_util::eventfd::EventFd> {
    use std::sync::OnceLock;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    static FD: OnceLock<Option<EventFd>> = OnceLock::new();
    FD.get_or_init(|| match EventFd::new(EFD_NONBLOCK) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!("no store-change eventfd ({e}): stores resized underneath are picked up at the next reload");
            None
        }
    })
    .as_ref()
}

/// Why the main loop wakes up.
#[derive(Debug)]
pub enum Event {
    /// Reload the configuration (the reason, for the log).
    Reload(&'static str),
    /// Stop the daemon.
    Stop(Signal),
    /// A disk engine heard that a backing store changed underneath.
    StoreChanged,
    /// The retry interval asked for has passed.
    Retry,
}

/// The config file's directory and the daemon's signals.
pub struct ConfigWatch {
    inotify: Inotify,
    signals: SignalFd,
    /// The config file's name in its directory.
    file_name: OsString,
    /// A file event seen, not reloaded yet: reload once the directory is quiet past this.
    pending: Option<Instant>,
}

impl ConfigWatch {
    /// Watches `path`'s directory and takes `signals` (already blocked in every thread).
    pub fn new(path: &Path, signals: &SigSet) -> anyhow::Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let file_name = path
            .file_name()
            .context("the config path names no file")?
            .to_os_string();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("cannot create an inotify instance")?;
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        inotify
            .add_watch(dir, mask)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
        let signals = SignalFd::with_flags(signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("cannot create a signalfd")?;
        tracing::info!(
            "watching {} for changes to {} (and SIGHUP)",
            dir.display(),
            file_name.to_string_lossy()
        );
        Ok(ConfigWatch {
            inotify,
            signals,
            file_name,
            pending: None,
        })
    }

    /// Blocks until there is something to do, or until `retry` has passed
    /// ([`Event::Retry`]).
    pub fn next_event(&mut self, retry: Option<Duration>) -> Event {
        let retry_due = retry.map(|d| Instant::now() + d);
        loop {
            if let Some(signal) = self.take_signal() {
                match signal {
                    Signal::SIGHUP => {
                        self.pending = None;
                        return Event::Reload(SIGHUP);
                    }
                    other => return Event::Stop(other),
                }
            }
            if self.take_file_events() {
                self.pending = Some(Instant::now() + SETTLE);
            }
            if store_changed().is_some_and(|fd| fd.read().is_ok()) {
                return Event::StoreChanged;
            }
            let settle_left = match self.pending {
                Some(due) => {
                    let left = due.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.pending = None;
                        return Event::Reload("file changed");
                    }
                    Some(left)
                }
                None => None,
            };
            let retry_left = match retry_due {
                Some(due) => {
                    let left = due.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Event::Retry;
                    }
                    Some(left)
                }
                None => None,
            };
            let timeout = match settle_left.into_iter().chain(retry_left).min() {
                Some(left) => PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(fd) = store_changed() {
                use std::os::fd::{AsRawFd, BorrowedFd};
                // SAFETY: the eventfd lives in a static for the rest of the process.
                let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            if let Err(e) = poll(&mut fds, timeout) {
                if e != nix::errno::Errno::EINTR {
                    tracing::warn!("waiting for config changes and signals failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn take_signal(&mut self) -> Option<Signal> {
        match self.signals.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("reading the signalfd failed: {e}");
                None
            }
        }
    }

    /// Reads pending inotify events; true if any concerns the config file (or a
    /// Kubernetes-style `..data` swap).
    fn take_file_events(&mut self) -> bool {
        let mut relevant = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => return relevant,
                Ok(events) => {
                    relevant |= events.iter().any(|e| {
                        e.name.as_ref().is_some_and(|name| {
                            *name == self.file_name || name.to_string_lossy().starts_with("..")
                        })
                    });
                }
                Err(nix::errno::Errno::EAGAIN) => return relevant,
                Err(e) => {
                    tracing::warn!("reading inotify events failed: {e}");
                    return relevant;
                }
            }
        }
    }
}
