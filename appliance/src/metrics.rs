//! Prometheus metrics: the registry, the collector that builds every family at scrape time,
//! and the interface the export lifecycle and config reload report through.
//!
//! The I/O path never sees this module. Each queue counts into its own
//! [`targets::stats::QueueStats`] (plain relaxed atomics written by the queue's thread); the
//! [`Collector`] here sums those per export, LUN and op when `/metrics` is scraped. The only
//! lock is the export table's, taken by scrapes and by export registration (control path).
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
//!   `queue_notifications_total`, `queue_malformed_requests_total`, with `export`, `queue`.
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

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use targets::device::VirtioDevice;
use targets::stats::{
    Failure, Op, QueueStats, FAILURES, LATENCY_BUCKETS_NS, LATENCY_SLOTS, OPS, SENSE_KEYS,
    TMF_FUNCTIONS,
};

use crate::backend::VirtioBackend;

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

/// Starts a family; `name` without the `_total` a counter gets.
fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    metric_type: MetricType,
) -> Result<MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, None, metric_type)
}

fn counter(family: &mut MetricEncoder<'_>, labels: &impl EncodeLabelSet, v: u64) -> Fmt {
    family
        .encode_family(labels)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    family: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    v: V,
) -> Fmt {
    family.encode_family(labels)?.encode_gauge(&v)
}

type Fmt = Result<(), std::fmt::Error>;

/// One LUN's counters summed over the export's queues.
#[derive(Debug, Clone)]
struct LunTotals {
    requests: [u64; OPS],
    bytes: [u64; OPS],
    duration_ns: [u64; OPS],
    buckets: [[u64; LATENCY_SLOTS]; OPS],
    failed: [[u64; FAILURES]; OPS],
    check_conditions: [u64; 16],
    inflight: u64,
}

impl Default for LunTotals {
    fn default() -> Self {
        LunTotals {
            requests: [0; OPS],
            bytes: [0; OPS],
            duration_ns: [0; OPS],
            buckets: [[0; LATENCY_SLOTS]; OPS],
            failed: [[0; FAILURES]; OPS],
            check_conditions: [0; 16],
            inflight: 0,
        }
    }
}

/// One queue's counters.
#[derive(Debug)]
struct QueueTotals {
    index: usize,
    requests: u64,
    inflight: u64,
    kicks: u64,
    notifications: u64,
    malformed: u64,
}

/// One export, as read at the start of a scrape.
#[derive(Debug)]
struct ExportSnapshot {
    name: String,
    kind: &'static str,
    transport: &'static str,
    /// LUN label → counters; LUN numbers in order, then `none`.
    luns: BTreeMap<LunKey, LunTotals>,
    capacities: Vec<(u16, u64)>,
    queues: Vec<QueueTotals>,
    refused: Vec<u64>,
    tmf: [u64; TMF_FUNCTIONS.len()],
    connected: bool,
    connections: u64,
    disconnects: [u64; 3],
}

/// A LUN slot's label: a LUN number, or none (sorts last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LunKey {
    Lun(u16),
    None,
}

impl LunKey {
    fn label(self) -> String {
        match self {
            LunKey::Lun(id) => id.to_string(),
            LunKey::None => "none".to_string(),
        }
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl ExportSnapshot {
    fn read(name: &str, source: &ExportSource) -> Self {
        let capacities = source.device.lun_capacities();
        let mut luns: BTreeMap<LunKey, LunTotals> = capacities
            .iter()
            .map(|&(id, _)| (LunKey::Lun(id), LunTotals::default()))
            .collect();
        let mut queues = Vec::with_capacity(source.queues.len());
        let mut refused = vec![0u64; targets::blk::Refusal::ALL.len()];
        let mut tmf = [0u64; TMF_FUNCTIONS.len()];
        for (index, stats) in &source.queues {
            let mut q = QueueTotals {
                index: *index,
                requests: 0,
                inflight: 0,
                kicks: load(&stats.kicks),
                notifications: load(&stats.notifications),
                malformed: load(&stats.malformed),
            };
            for lun in stats.luns() {
                let key = lun.lun.map_or(LunKey::None, LunKey::Lun);
                let t = luns.entry(key).or_default();
                for op in 0..OPS {
                    let o = &lun.ops[op];
                    // The histogram's count is the sum of its buckets, read once, so the
                    // exposition is self-consistent even while the queue is counting.
                    let mut count = 0;
                    for (slot, b) in o.buckets.iter().enumerate() {
                        let n = load(b);
                        t.buckets[op][slot] += n;
                        count += n;
                    }
                    t.requests[op] += load(&o.requests);
                    t.bytes[op] += load(&o.bytes);
                    t.duration_ns[op] += load(&o.duration_ns);
                    q.requests += count;
                    for (reason, f) in lun.failed[op].iter().enumerate() {
                        t.failed[op][reason] += load(f);
                    }
                }
                for (key, c) in lun.check_conditions.iter().enumerate() {
                    t.check_conditions[key] += load(c);
                }
                let inflight = load(&lun.inflight);
                t.inflight += inflight;
                q.inflight += inflight;
            }
            for (total, c) in refused.iter_mut().zip(&stats.refused) {
                *total += load(c);
            }
            for (total, c) in tmf.iter_mut().zip(&stats.tmf) {
                *total += load(c);
            }
            queues.push(q);
        }
        let c = &source.connections;
        ExportSnapshot {
            name: name.to_string(),
            kind: source.kind,
            transport: source.transport,
            luns,
            capacities,
            queues,
            refused,
            tmf,
            connected: c.connected.load(Ordering::Relaxed),
            connections: load(&c.connections),
            disconnects: [0, 1, 2].map(|i| load(&c.disconnects[i])),
        }
    }
}

/// Daemon, export, LUN and queue families.
#[derive(Debug)]
struct StateCollector(Arc<State>);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (snapshots, states) = {
            let exports = self.0.exports.lock().unwrap_or_else(|p| p.into_inner());
            let snapshots: Vec<ExportSnapshot> = exports
                .iter()
                .filter_map(|(name, e)| e.source.as_ref().map(|s| ExportSnapshot::read(name, s)))
                .collect();
            let mut states = [0u64; 2];
            for e in exports.values() {
                states[e.state as usize] += 1;
            }
            (snapshots, states)
        };
        self.daemon(&mut encoder, states)?;
        export_families(&mut encoder, &snapshots)?;
        lun_families(&mut encoder, &snapshots)?;
        queue_families(&mut encoder, &snapshots)
    }
}

impl StateCollector {
    fn daemon(&self, encoder: &mut DescriptorEncoder<'_>, states: [u64; 2]) -> Fmt {
        let s = &self.0;
        let mut f = family(
            encoder,
            "vhost_appliance_build_info",
            "Build of the running daemon (always 1).",
            MetricType::Gauge,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)];
        gauge(&mut f, &labels, 1u64)?;

        let mut f = family(
            encoder,
            "vhost_appliance_config_reloads",
            "Configuration reload attempts (file change or SIGHUP), by result.",
            MetricType::Counter,
        )?;
        for (i, result) in ["success", "failure"].into_iter().enumerate() {
            counter(&mut f, &[("result", result)], load(&s.reloads[i]))?;
        }
        family(
            encoder,
            "vhost_appliance_config_last_reload_successful",
            "Whether the last configuration load or reload succeeded (1) or was refused (0).",
            MetricType::Gauge,
        )?
        .encode_gauge(&u64::from(s.last_reload_ok.load(Ordering::Relaxed)))?;
        family(
            encoder,
            "vhost_appliance_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully, in seconds since the epoch.",
            MetricType::Gauge,
        )?
        .encode_gauge(&f64::from_bits(
            s.last_reload_success.load(Ordering::Relaxed),
        ))?;

        let mut f = family(
            encoder,
            "vhost_appliance_exports",
            "Exports declared in the configuration, by state (failed: could not be started).",
            MetricType::Gauge,
        )?;
        for state in ExportState::ALL {
            gauge(&mut f, &[("state", state.name())], states[state as usize])?;
        }
        Ok(())
    }
}

fn export_families(encoder: &mut DescriptorEncoder<'_>, exports: &[ExportSnapshot]) -> Fmt {
    let mut f = family(
        encoder,
        "vhost_appliance_export_info",
        "A running export (always 1): device type and transport.",
        MetricType::Gauge,
    )?;
    for e in exports {
        let labels = [
            ("export", e.name.as_str()),
            ("type", e.kind),
            ("transport", e.transport),
        ];
        gauge(&mut f, &labels, 1u64)?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_export_frontend_connected",
        "Whether a frontend is connected to the export (1) or not (0).",
        MetricType::Gauge,
    )?;
    for e in exports {
        gauge(
            &mut f,
            &[("export", e.name.as_str())],
            u64::from(e.connected),
        )?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_export_connections",
        "Frontend connections accepted by the export.",
        MetricType::Counter,
    )?;
    for e in exports {
        counter(&mut f, &[("export", e.name.as_str())], e.connections)?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_export_disconnects",
        "Frontend connections ended, by reason (clean: closed by the frontend; error: protocol or transport error; removed: ended by the daemon).",
        MetricType::Counter,
    )?;
    for e in exports {
        for reason in DisconnectReason::ALL {
            let labels = [("export", e.name.as_str()), ("reason", reason.name())];
            counter(&mut f, &labels, e.disconnects[reason as usize])?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_scsi_task_management",
        "virtio-scsi task management functions received, by function.",
        MetricType::Counter,
    )?;
    for e in exports.iter().filter(|e| e.kind == "scsi") {
        for (function, n) in TMF_FUNCTIONS.iter().zip(e.tmf) {
            let labels = [("export", e.name.as_str()), ("function", *function)];
            counter(&mut f, &labels, n)?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_blk_refusals",
        "virtio-blk requests refused without disk I/O, by refusal (the detail of requests_failed_total's invalid, unsupported and read_only reasons).",
        MetricType::Counter,
    )?;
    for e in exports.iter().filter(|e| e.kind == "blk") {
        for (refusal, n) in targets::blk::Refusal::ALL.iter().zip(&e.refused) {
            if *n > 0 {
                let labels = [("export", e.name.as_str()), ("reason", refusal.name())];
                counter(&mut f, &labels, *n)?;
            }
        }
    }
    Ok(())
}

fn lun_families(encoder: &mut DescriptorEncoder<'_>, exports: &[ExportSnapshot]) -> Fmt {
    // (export, lun label, counters) for every LUN slot.
    let luns: Vec<(&str, String, &LunTotals)> = exports
        .iter()
        .flat_map(|e| {
            e.luns
                .iter()
                .map(move |(key, t)| (e.name.as_str(), key.label(), t))
        })
        .collect();
    let mut f = family(
        encoder,
        "vhost_appliance_lun_capacity_bytes",
        "Current size of the LUN, in bytes.",
        MetricType::Gauge,
    )?;
    for e in exports {
        for (id, bytes) in &e.capacities {
            let lun = id.to_string();
            gauge(
                &mut f,
                &[("export", e.name.as_str()), ("lun", &lun)],
                *bytes,
            )?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_lun_inflight_requests",
        "Requests of the LUN handed to the disk and not completed yet.",
        MetricType::Gauge,
    )?;
    // Requests to no LUN never reach a disk.
    for (export, lun, t) in luns.iter().filter(|(_, lun, _)| lun != "none") {
        gauge(&mut f, &[("export", *export), ("lun", lun)], t.inflight)?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_requests",
        "Requests answered (successful or not), by operation.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            let labels = [("export", *export), ("lun", lun), ("op", op.name())];
            counter(&mut f, &labels, t.requests[op as usize])?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_requests_failed",
        "Requests answered with an error, by operation and reason.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            for reason in Failure::ALL {
                let n = t.failed[op as usize][reason as usize];
                if n > 0 {
                    let labels = [
                        ("export", *export),
                        ("lun", lun.as_str()),
                        ("op", op.name()),
                        ("reason", reason.name()),
                    ];
                    counter(&mut f, &labels, n)?;
                }
            }
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_request_bytes",
        "Bytes moved (read, write) or covered (discard, write_zeroes) by successful requests.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            let labels = [("export", *export), ("lun", lun), ("op", op.name())];
            counter(&mut f, &labels, t.bytes[op as usize])?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_request_duration_seconds",
        "Request latency from the descriptor chain being taken off the available ring to its used-ring entry being produced, in seconds.",
        MetricType::Histogram,
    )?;
    let bounds: Vec<f64> = LATENCY_BUCKETS_NS
        .iter()
        .map(|&ns| ns as f64 / 1e9)
        .chain([f64::INFINITY])
        .collect();
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_SLOTS);
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            let counts = &t.buckets[op as usize];
            buckets.clear();
            buckets.extend(bounds.iter().copied().zip(counts.iter().copied()));
            let count = counts.iter().sum();
            let sum = t.duration_ns[op as usize] as f64 / 1e9;
            let labels = [
                ("export", *export),
                ("lun", lun.as_str()),
                ("op", op.name()),
            ];
            f.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_scsi_check_conditions",
        "SCSI commands answered with CHECK CONDITION, by sense key.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for (key, n) in SENSE_KEYS.iter().zip(t.check_conditions) {
            if n > 0 {
                let labels = [
                    ("export", *export),
                    ("lun", lun.as_str()),
                    ("sense_key", key),
                ];
                counter(&mut f, &labels, n)?;
            }
        }
    }
    Ok(())
}

fn queue_families(encoder: &mut DescriptorEncoder<'_>, exports: &[ExportSnapshot]) -> Fmt {
    type Get = fn(&QueueTotals) -> u64;
    let families: [(&str, &str, MetricType, Get); 5] = [
        (
            "vhost_appliance_queue_requests",
            "Requests answered by the virtqueue.",
            MetricType::Counter,
            |q| q.requests,
        ),
        (
            "vhost_appliance_queue_inflight_requests",
            "Requests of the virtqueue handed to the disk and not completed yet.",
            MetricType::Gauge,
            |q| q.inflight,
        ),
        (
            "vhost_appliance_queue_kicks",
            "Guest notifications (kicks) handled by the virtqueue's worker.",
            MetricType::Counter,
            |q| q.kicks,
        ),
        (
            "vhost_appliance_queue_notifications",
            "Used-ring notifications (call eventfd signals) sent to the guest.",
            MetricType::Counter,
            |q| q.notifications,
        ),
        (
            "vhost_appliance_queue_malformed_requests",
            "Descriptor chains that broke the virtio framing (with or without a status to answer).",
            MetricType::Counter,
            |q| q.malformed,
        ),
    ];
    for (name, help, metric_type, get) in families {
        let mut f = family(encoder, name, help, metric_type)?;
        for e in exports {
            for q in &e.queues {
                let queue = q.index.to_string();
                let labels = [("export", e.name.as_str()), ("queue", &queue)];
                match metric_type {
                    MetricType::Counter => counter(&mut f, &labels, get(q))?,
                    _ => gauge(&mut f, &labels, get(q))?,
                }
            }
        }
    }
    Ok(())
}

/// The standard `process_*` families, read from `/proc/self` at scrape time.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = crate::process::read();
        if let Some(cpu) = p.cpu_seconds {
            family(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, f64, f64>(&cpu, None)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                family(&mut encoder, name, help, MetricType::Gauge)?.encode_gauge(&v)?;
            }
        }
        if let Some(start) = p.start_time_seconds {
            family(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                MetricType::Gauge,
            )?
            .encode_gauge(&start)?;
        }
        Ok(())
    }
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
