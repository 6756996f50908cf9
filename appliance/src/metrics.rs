//! Prometheus metrics: the registry and the interface the export lifecycle and config reload
//! report through. The collectors that build every family at scrape time, and their encoding
//! helpers, live in the `collector` submodule (`metrics/collector.rs`).
//!
//! The I/O path never sees this module. Each queue counts into its own
//! [`targets::stats::QueueStats`] (plain relaxed atomics written by the queue's thread); the
//! collector sums those per export, LUN and op when `/metrics` is scraped. The only lock is
//! the export table's, taken by scrapes and by export registration (control path).
//!
//! Output is the Prometheus text format 0.0.4 (`prometheus-client`'s `prometheus_text`
//! encoder): its OpenMetrics encoder writes counters under a `_total`-less family name that
//! promtool 2.42 (Debian bookworm) reports as "no help text". Counters are registered
//! without `_total` (the encoder appends it). All names are in base units.
//!
//! Families (prefix `vhost_appliance_`, labels in braces; `lun` is the SCSI LUN number, `0`
//! for virtio-blk, `none` for SCSI requests addressed to no LUN of the export):
//! - daemon: `build_info{version,commit}`, `config_reloads_total{result}`,
//!   `config_last_reload_successful`, `config_last_reload_success_timestamp_seconds`,
//!   `exports{state}`; and the standard `process_cpu_seconds_total`,
//!   `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//!   `process_max_fds`, `process_start_time_seconds`;
//! - export: `export_info{export,type,transport}`, `export_frontend_connected{export}`,
//!   `export_connections_total{export}`, `export_disconnects_total{export,reason}`,
//!   `scsi_task_management_total{export,function}`, `blk_refusals_total{export,reason}`;
//! - LUN: `lun_capacity_bytes`, `lun_inflight_requests`, `requests_total{op}`,
//!   `requests_failed_total{op,reason}`, `request_bytes_total{op}`,
//!   `request_duration_seconds{op}` (histogram), `scsi_check_conditions_total{sense_key}`,
//!   all with `export` and `lun`;
//! - queue: `queue_requests_total`, `queue_inflight_requests`, `queue_kicks_total`,
//!   `queue_notifications_total`, `queue_polled_events_total`, `queue_malformed_requests_total`, with `export`, `queue`.
//!
//! Small fixed label sets are always written (zeroes included) so `rate()` sees the first
//! increment; the sparse per-LUN failure families (`requests_failed_total`,
//! `scsi_check_conditions_total`, `blk_refusals_total`) are written once non-zero, as a
//! client library's labelled counter would be. Export names are the only free-form label
//! values; paths never appear.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use targets::device::VirtioDevice;
use targets::stats::QueueStats;

use crate::backend::VirtioBackend;
use collector::{ProcessCollector, StateCollector};

mod collector;

/// Where the metrics endpoint listens when `metrics.listen` is not set: loopback only, so
/// nothing is exposed beyond the host (or the appliance VM) unless the operator says so.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9410);

/// The commit the daemon was built from (`build.rs`), or `unknown`.
const COMMIT: &str = env!("VHOST_APPLIANCE_COMMIT");

/// State of an export (metric `exports{state}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportState {
    /// Listening for (or serving) frontends.
    Serving,
    /// Declared in the config but could not be started (e.g. its backing file could not
    /// be opened).
    Failed,
}

impl ExportState {
    const ALL: [ExportState; 2] = [ExportState::Serving, ExportState::Failed];

    fn name(self) -> &'static str {
        match self {
            ExportState::Serving => "serving",
            ExportState::Failed => "failed",
        }
    }
}

/// Why a frontend connection ended (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The frontend closed the connection.
    Clean,
    /// The connection ended on a protocol or transport error.
    Error,
    /// The daemon ended it: the export was stopped or removed.
    Removed,
}

impl DisconnectReason {
    const ALL: [DisconnectReason; 3] = [
        DisconnectReason::Clean,
        DisconnectReason::Error,
        DisconnectReason::Removed,
    ];

    fn name(self) -> &'static str {
        match self {
            DisconnectReason::Clean => "clean",
            DisconnectReason::Error => "error",
            DisconnectReason::Removed => "removed",
        }
    }
}

/// Frontend connections of one export, counted by its accept thread.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    connected: AtomicBool,
    connections: AtomicU64,
    disconnects: [AtomicU64; 3],
    stopping: AtomicBool,
}

impl ConnectionStats {
    /// A frontend connected.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    /// The frontend's connection ended; `clean` when the frontend closed it. Counted as
    /// [`DisconnectReason::Removed`] once [`ConnectionStats::stopping`] was called.
    pub fn disconnected(&self, clean: bool) {
        let reason = if self.stopping.load(Ordering::Relaxed) {
            DisconnectReason::Removed
        } else if clean {
            DisconnectReason::Clean
        } else {
            DisconnectReason::Error
        };
        self.disconnects[reason as usize].fetch_add(1, Ordering::Relaxed);
        self.connected.store(false, Ordering::Relaxed);
    }

    /// The export is being stopped: connections that end from now on were ended by the
    /// daemon.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

/// What the collector reads of a running export.
struct ExportSource {
    kind: &'static str,
    transport: &'static str,
    device: Arc<dyn VirtioDevice>,
    /// Queue index and counters.
    queues: Vec<(usize, Arc<QueueStats>)>,
    connections: Arc<ConnectionStats>,
}

impl std::fmt::Debug for ExportSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSource")
            .field("kind", &self.kind)
            .field("transport", &self.transport)
            .field("queues", &self.queues.len())
            .finish()
    }
}

#[derive(Debug)]
struct ExportEntry {
    state: ExportState,
    source: Option<ExportSource>,
}

/// Everything the collector reports, shared with the control path.
#[derive(Debug)]
struct State {
    exports: Mutex<BTreeMap<String, ExportEntry>>,
    /// `[success, failure]`.
    reloads: [AtomicU64; 2],
    last_reload_ok: AtomicBool,
    /// Seconds since the epoch, as `f64` bits.
    last_reload_success: AtomicU64,
}

/// The daemon's metrics: cheap to clone, shared by the control path and the HTTP thread.
#[derive(Debug, Clone)]
pub struct Metrics {
    state: Arc<State>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics with no export yet. The configuration the daemon started with counts as the
    /// last successful load (as Prometheus and its exporters report it), not as a reload.
    pub fn new() -> Self {
        let state = Arc::new(State {
            exports: Mutex::new(BTreeMap::new()),
            reloads: Default::default(),
            last_reload_ok: AtomicBool::new(true),
            last_reload_success: AtomicU64::new(now_seconds().to_bits()),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StateCollector(Arc::clone(&state))));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            state,
            registry: Arc::new(registry),
        }
    }

    /// Starts reporting a running export (state `serving`), replacing whatever was
    /// reported under its name.
    pub fn add_export(&self, export: &config::Export, backend: &VirtioBackend) {
        let source = ExportSource {
            kind: match export.device {
                config::Device::Blk(_) => "blk",
                config::Device::Scsi(_) => "scsi",
            },
            transport: match export.transport {
                config::Transport::Socket(_) => "socket",
                config::Transport::Vvu(_) => "vvu",
            },
            device: Arc::clone(backend.device()),
            queues: backend
                .queue_stats()
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, Arc::clone(s))))
                .collect(),
            connections: Arc::clone(backend.connections()),
        };
        self.exports().insert(
            export.name.clone(),
            ExportEntry {
                state: ExportState::Serving,
                source: Some(source),
            },
        );
    }

    /// Stops reporting export `name` (removed from the config).
    pub fn remove_export(&self, name: &str) {
        self.exports().remove(name);
    }

    /// Sets the state export `name` is counted under in `exports{state}`; an export not
    /// added yet (one that failed to start) is counted from now on.
    pub fn set_export_state(&self, name: &str, state: ExportState) {
        self.exports()
            .entry(name.to_string())
            .and_modify(|e| e.state = state)
            .or_insert(ExportEntry {
                state,
                source: None,
            });
    }

    /// Records a configuration reload attempt (file change or SIGHUP): `ok` when the new
    /// configuration was valid and applied.
    pub fn record_reload(&self, ok: bool) {
        let s = &self.state;
        s.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        s.last_reload_ok.store(ok, Ordering::Relaxed);
        if ok {
            s.last_reload_success
                .store(now_seconds().to_bits(), Ordering::Relaxed);
        }
    }

    /// Starts the HTTP endpoint on `listen` (`metrics.listen`), or [`DEFAULT_LISTEN`] when
    /// not configured. Storage keeps being served if it cannot start: the error is logged.
    pub fn serve(&self, listen: Option<SocketAddr>) {
        let addr = listen.unwrap_or(DEFAULT_LISTEN);
        match crate::http::serve(addr, self.clone()) {
            Ok(bound) => tracing::info!(addr = %bound, "metrics endpoint listening"),
            Err(e) => tracing::error!(
                addr = %addr,
                "metrics endpoint not started (set metrics.listen to another address): {e}"
            ),
        }
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(64 << 10);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ExportEntry>> {
        self.state.exports.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[test]
    fn reloads_and_export_states() {
        let m = Metrics::new();
        let before = m.encode().unwrap();
        assert_eq!(
            sample(&before, "vhost_appliance_config_last_reload_successful").as_deref(),
            Some("1")
        );
        m.record_reload(true);
        m.record_reload(false);
        m.record_reload(false);
        m.set_export_state("a", ExportState::Failed);
        m.set_export_state("b", ExportState::Failed);
        m.remove_export("b");
        let text = m.encode().unwrap();
        let get =
            |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
        assert_eq!(
            get("vhost_appliance_config_reloads_total{result=\"success\"}"),
            "1"
        );
        assert_eq!(
            get("vhost_appliance_config_reloads_total{result=\"failure\"}"),
            "2"
        );
        assert_eq!(get("vhost_appliance_config_last_reload_successful"), "0");
        assert_eq!(get("vhost_appliance_exports{state=\"failed\"}"), "1");
        assert_eq!(get("vhost_appliance_exports{state=\"serving\"}"), "0");
        let ts: f64 = get("vhost_appliance_config_last_reload_success_timestamp_seconds")
            .parse()
            .unwrap();
        assert!(ts > 1.0e9);
        // A failed export has no per-export series.
        assert!(!text.contains("export=\"a\""));
        assert!(text.contains("\nprocess_resident_memory_bytes "));
    }

    #[test]
    fn connection_reasons() {
        let c = ConnectionStats::default();
        c.connected();
        assert!(c.connected.load(Ordering::Relaxed));
        c.disconnected(true);
        c.connected();
        c.disconnected(false);
        c.connected();
        c.stopping();
        c.disconnected(true);
        assert!(!c.connected.load(Ordering::Relaxed));
        assert_eq!(load(&c.connections), 3);
        assert_eq!(c.disconnects.each_ref().map(load), [1, 1, 1]);
    }
}
