//! Prometheus metrics of one node, served as text at `/metrics` on the control socket and on
//! `--metrics-listen`. Counters are counted where things happen; gauges that mirror state
//! (peers, documents, edges up, the process) are read when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Labels naming a peer role.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// head or edge.
    pub role: String,
}

/// Labels of wire traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    /// Role of the peer.
    pub role: String,
    /// in or out.
    pub direction: String,
}

/// Labels giving a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// Labels naming an edge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    /// Edge name.
    pub edge: String,
}

/// Labels of the build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Package version.
    pub version: String,
    /// Commit built from.
    pub commit: String,
}

/// Labels naming a certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `ca` on a head, `node` on an edge.
    pub certificate: String,
}

/// The metrics of one node.
pub struct Metrics {
    registry: Registry,
    /// Connected peers by role.
    pub peers: Family<RoleLabels, Gauge>,
    /// Sync messages applied, by the sending peer's role.
    pub sync_rounds: Family<RoleLabels, Counter>,
    /// Sync messages for one document not sent or not applied (the session went on), by the
    /// peer's role.
    pub sync_failures: Family<RoleLabels, Counter>,
    /// QUIC connection attempts refused or cut off before they sent their first frame, by why.
    pub handshakes_refused: Family<ReasonLabels, Counter>,
    /// Bytes on the wire.
    pub bytes: Family<TrafficLabels, Counter>,
    /// Frames on the wire.
    pub frames: Family<TrafficLabels, Counter>,
    /// Documents held.
    pub documents: Gauge,
    /// Frames queued to peers and not yet written.
    pub pending: Gauge,
    /// EdgeNode documents with changes not yet at every peer that syncs them.
    pub pending_documents: Gauge,
    /// Time to commit one batch of SQLite writes.
    pub sqlite_write: Histogram,
    /// Reconciler runs (edge).
    pub reconcile_runs: Counter,
    /// Reconciler runs that failed (edge).
    pub reconcile_failures: Counter,
    /// Pods refused now (an edge's own; on a head, every edge's as reported).
    pub pods_refused: Gauge,
    /// Pods whose manifest cannot be written now (an edge's own; on a head, every edge's).
    pub pods_not_written: Gauge,
    /// Expiry of certificates (unix seconds).
    pub cert_expiry: Family<CertLabels, Gauge>,
    /// Seconds since each edge was last heard from (head).
    pub last_sync_age: Family<EdgeLabels, Gauge<f64, AtomicU64>>,
    /// Whether each registered edge is connected to this head or to one connected to it
    /// (head).
    pub edge_up: Family<EdgeLabels, Gauge>,
    /// When each registered edge was last heard from, unix seconds; now while its link is up
    /// (QUIC keep-alives hold it) (head).
    pub edge_last_heard: Family<EdgeLabels, Gauge<f64, AtomicU64>>,
    /// When each registered edge's certificate expires, unix seconds (head).
    pub edge_cert_expiry: Family<EdgeLabels, Gauge>,
    /// Whether this head writes the cluster's status (holds the writer Lease; head).
    pub writer: Gauge,
    process: Process,
}

/// The process's own metrics, read from `/proc/self` when scraped.
#[derive(Default)]
struct Process {
    resident: Gauge,
    cpu: Counter<f64, AtomicU64>,
    /// CPU seconds counted so far, to add what was used since.
    cpu_seen: std::sync::Mutex<f64>,
    open_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

impl Process {
    fn read(&self) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
        if let Some(kib) = rss_kib {
            self.resident.set(kib * 1024);
        }
        // utime and stime, fields 14 and 15, in USER_HZ (100 per second on Linux).
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (ticks(14), ticks(15)) {
            let total = (user + system) / 100.0;
            let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
            if total > *seen {
                self.cpu.inc_by(total - *seen);
                *seen = total;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
    }
}

/// The histogram of SQLite batch commit times (made by the store, registered here).
pub fn sqlite_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    /// All metrics, registered; `sqlite_write` is the store's histogram.
    pub fn new(sqlite_write: Histogram) -> Metrics {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("edgesync");
        let m = Metrics {
            peers: Family::default(),
            sync_rounds: Family::default(),
            sync_failures: Family::default(),
            handshakes_refused: Family::default(),
            bytes: Family::default(),
            frames: Family::default(),
            documents: Gauge::default(),
            pending: Gauge::default(),
            pending_documents: Gauge::default(),
            sqlite_write,
            reconcile_runs: Counter::default(),
            reconcile_failures: Counter::default(),
            pods_refused: Gauge::default(),
            pods_not_written: Gauge::default(),
            cert_expiry: Family::default(),
            last_sync_age: Family::default(),
            edge_up: Family::default(),
            edge_last_heard: Family::default(),
            edge_cert_expiry: Family::default(),
            writer: Gauge::default(),
            process: Process::default(),
            registry: Registry::default(),
        };
        // Counters start at zero for each peer role, so that the first failure is an increase.
        for role in ["head", "edge"] {
            let labels = RoleLabels { role: role.into() };
            m.peers.get_or_create(&labels).set(0);
            m.sync_rounds.get_or_create(&labels).inc_by(0);
            m.sync_failures.get_or_create(&labels).inc_by(0);
        }
        registry.register("peers_connected", "Connected peers", m.peers.clone());
        registry.register(
            "sync_rounds",
            "Sync messages received and applied",
            m.sync_rounds.clone(),
        );
        registry.register(
            "sync_failures",
            "Sync messages for one document not sent or not applied; the session went on",
            m.sync_failures.clone(),
        );
        registry.register(
            "handshakes_refused",
            "Connection attempts refused or cut off before their first frame",
            m.handshakes_refused.clone(),
        );
        registry.register_with_unit(
            "wire",
            "Bytes sent and received",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register("frames", "Frames sent and received", m.frames.clone());
        registry.register("documents", "Documents held", m.documents.clone());
        registry.register(
            "pending_frames",
            "Frames queued to peers, not yet written",
            m.pending.clone(),
        );
        registry.register(
            "pending_documents",
            "EdgeNodes with changes a peer that syncs them does not have yet (or none has synced)",
            m.pending_documents.clone(),
        );
        registry.register_with_unit(
            "sqlite_write",
            "Time to commit a batch of database writes",
            Unit::Seconds,
            m.sqlite_write.clone(),
        );
        registry.register(
            "reconcile_runs",
            "Reconciler runs",
            m.reconcile_runs.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciler runs that failed",
            m.reconcile_failures.clone(),
        );
        registry.register("pods_refused", "Pods refused now", m.pods_refused.clone());
        registry.register(
            "pods_not_written",
            "Pods whose manifest cannot be written now",
            m.pods_not_written.clone(),
        );
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "When a certificate expires (unix time)",
            Unit::Seconds,
            m.cert_expiry.clone(),
        );
        registry.register_with_unit(
            "last_sync_age",
            "Time since an edge was last heard from",
            Unit::Seconds,
            m.last_sync_age.clone(),
        );
        registry.register(
            "edge_up",
            "Whether a registered edge is connected (to this head or to one connected to it)",
            m.edge_up.clone(),
        );
        registry.register_with_unit(
            "edge_last_heard_timestamp",
            "When a registered edge was last heard from (unix time; now while connected)",
            Unit::Seconds,
            m.edge_last_heard.clone(),
        );
        registry.register_with_unit(
            "edge_certificate_expiry_timestamp",
            "When a registered edge's certificate expires (unix time)",
            Unit::Seconds,
            m.edge_cert_expiry.clone(),
        );
        registry.register(
            "head_writer",
            "Whether this head writes the cluster's status (holds the writer Lease)",
            m.writer.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: crate::version::VERSION.into(),
                commit: crate::version::COMMIT.into(),
            })
            .set(1);
        registry.register("build_info", "The build: version and commit", build);
        let process = &m.process;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        process.start_time.set(started);
        root.register_with_unit(
            "process_resident_memory",
            "Resident memory",
            Unit::Bytes,
            process.resident.clone(),
        );
        root.register_with_unit(
            "process_cpu",
            "CPU time used, user and system",
            Unit::Seconds,
            process.cpu.clone(),
        );
        root.register(
            "process_open_fds",
            "Open file descriptors",
            process.open_fds.clone(),
        );
        root.register_with_unit(
            "process_start_time",
            "When the process started (unix time)",
            Unit::Seconds,
            process.start_time.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Counts one frame of `bytes` to or from a peer of `role`.
    pub fn traffic(&self, role: &str, direction: &str, bytes: u64) {
        let labels = TrafficLabels {
            role: role.to_string(),
            direction: direction.to_string(),
        };
        self.bytes.get_or_create(&labels).inc_by(bytes);
        self.frames.get_or_create(&labels).inc();
    }

    /// Records when certificate `name` expires.
    pub fn cert_expires(&self, name: &str, der: &rustls::pki_types::CertificateDer<'_>) {
        if let Some(t) = crate::transport::tls::not_after(der) {
            let labels = CertLabels {
                certificate: name.to_string(),
            };
            self.cert_expiry
                .get_or_create(&labels)
                .set(t.unix_timestamp());
        }
    }

    /// The text exposition format, with the process's metrics read now.
    pub fn render(&self) -> String {
        self.process.read();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The Prometheus text format (0.0.4) of OpenMetrics text: a counter's help and type name
/// its `_total` samples, and the `# UNIT` and `# EOF` lines go.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                text.push_str(&format!("{prefix}{name}{total} {tail}"));
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new(sqlite_histogram());
        m.traffic("edge", "out", 120);
        m.sqlite_write.observe(0.002);
        m.reconcile_runs.inc();
        let text = m.render();
        for name in [
            "edgesync_wire_bytes_total{role=\"edge\",direction=\"out\"} 120",
            "edgesync_frames_total{role=\"edge\",direction=\"out\"} 1",
            "edgesync_sqlite_write_seconds_count 1",
            "edgesync_reconcile_runs_total 1",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
        let plain = to_text_format(&text);
        assert!(plain.contains("# HELP edgesync_reconcile_runs_total Reconciler runs."));
        assert!(plain.contains("# TYPE edgesync_reconcile_runs_total counter"));
        assert!(plain.contains("# TYPE edgesync_documents gauge"));
        assert!(!plain.contains("# EOF") && !plain.contains("# UNIT"));
        assert!(plain.contains("edgesync_reconcile_runs_total 1\n"));
    }
}
