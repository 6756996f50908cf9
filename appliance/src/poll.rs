//! How long a queue's worker busy-polls before it sleeps (an export's `poll:`).
//!
//! Polling trades CPU for latency: a worker that keeps looking at its avail ring and its
//! disk completions for a few µs after its last piece of work catches the next request
//! and the next completion without a guest kick, an eventfd signal and a thread wake-up
//! (several µs each, more under virtualization).
//!
//! Adaptive polling follows QEMU's iothread (`util/aio-posix.c`, `adjust_polling_time`):
//! with `block` the time from the start of a poll window to the next piece of work,
//! - work found while polling (`block` within the window): no change;
//! - work after a sleep longer than `max`: polling would not have caught it, so the window
//!   is reset to 0 (no polling until work comes quickly again);
//! - work after a sleep shorter than `max`: a longer window would have caught it, so the
//!   window grows (from 4 µs, doubling, up to `max`).
//!
//! Fixed polling always polls `max` (SPDK's pollers poll forever; a fixed window is the
//! bounded form of that).

use std::time::{Duration, Instant};

/// The first window adaptive polling tries after a reset (QEMU's is 4 µs).
const GROW_FROM: Duration = Duration::from_micros(4);

/// One worker's polling state.
#[derive(Debug)]
pub struct Poller {
    max: Duration,
    adaptive: bool,
    /// The adaptive window now.
    window: Duration,
    /// When the current (unsuccessful so far) window began; `None` when the worker is
    /// not between a poll window and the next piece of work.
    since: Option<Instant>,
}

impl Poller {
    /// A poller for `config` (`max_us` µs, adaptive or fixed). An adaptive poller starts
    /// with the full window.
    pub fn new(config: config::Poll) -> Self {
        let max = Duration::from_micros(u64::from(config.max_us));
        Poller {
            max,
            adaptive: config.adaptive,
            window: max,
            since: None,
        }
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        if self.adaptive {
            self.window
        } else {
            self.max
        }
    }

    /// A poll window starts now.
    pub fn start(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// Polling found work (the window caught it: nothing to adapt).
    pub fn found(&mut self) {
        self.since = None;
    }

    /// Work woke the worker at `now` after it slept: adapts the window to how long the
    /// work took to come since the last window began.
    pub fn woke(&mut self, now: Instant) {
        let Some(since) = self.since.take() else {
            return;
        };
        if !self.adaptive {
            return;
        }
        let block = now.saturating_duration_since(since);
        if block <= self.window {
            return;
        }
        if block > self.max {
            self.window = Duration::ZERO;
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                GROW_FROM
            } else {
                self.window * 2
            }
            .min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poller(adaptive: bool) -> Poller {
        Poller::new(config::Poll {
            max_us: 32,
            adaptive,
        })
    }

    fn after(p: &mut Poller, us: u64) {
        let t0 = Instant::now();
        p.start(t0);
        p.woke(t0 + Duration::from_micros(us));
    }

    #[test]
    fn adaptive_window_resets_when_work_is_slow_and_grows_when_it_is_quick() {
        let mut p = poller(true);
        assert_eq!(p.window(), Duration::from_micros(32));
        // Work 10 µs after a full window began: the window caught it, no change.
        after(&mut p, 10);
        assert_eq!(p.window(), Duration::from_micros(32));
        // Work 1 ms later: polling is useless, stop.
        after(&mut p, 1000);
        assert_eq!(p.window(), Duration::ZERO);
        // Work within max again: grow 4, 8, 16, 32 and no further.
        for want in [4, 8, 16, 32, 32] {
            after(&mut p, 20);
            assert_eq!(p.window(), Duration::from_micros(want));
        }
        // Found while polling: unchanged, and the next wake-up adapts nothing.
        p.start(Instant::now());
        p.found();
        p.woke(Instant::now() + Duration::from_secs(1));
        assert_eq!(p.window(), Duration::from_micros(32));
    }

    #[test]
    fn fixed_window_never_changes() {
        let mut p = poller(false);
        after(&mut p, 1000);
        assert_eq!(p.window(), Duration::from_micros(32));
    }
}
