//! Prometheus `/metrics`: kube-proxy's metric names where they mean the same
//! (`kubeproxy_sync_proxy_rules_*`, `kubeproxy_network_programming_duration_seconds`), and the
//! datapath's own counters and map fill levels, read from the pinned maps at each scrape.

use std::{
    fmt,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use aya::maps::{HashMap, MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::{Affinity, AffinityKey, STAT_MAX, SockFlow, SockFlowKey, stat_is_drop, stat_name};

use crate::objects::Skipped;

use crate::datapath::{open_pinned, open_pinned_hash};

/// Metrics the sync loop updates.
#[derive(Clone)]
pub struct SyncMetrics {
    pub sync_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub network_programming: Histogram,
    pub sync_failures: Counter,
    /// Changes seen from the API server (kube-proxy's change trackers count the same).
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    /// Objects skipped as malformed, by kind.
    pub skipped_objects: Family<Vec<(String, String)>, Gauge>,
    /// Entries a full sync found changed behind ebpf-proxy's back and repaired, by map.
    pub drift_repaired: Family<Vec<(String, String)>, Counter>,
}

impl SyncMetrics {
    fn new() -> Self {
        Self {
            // kube-proxy's buckets: 1 ms doubling to ~16 s.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            network_programming: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            sync_failures: Counter::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            skipped_objects: Family::default(),
            drift_repaired: Family::default(),
        }
    }

    /// Counts what a full sync found drifted (and is about to repair).
    pub fn count_drift(&self, drift: &crate::reconcile::Drift) {
        for (map, changed, missing, unexpected) in &drift.maps {
            let n = (changed + missing + unexpected) as u64;
            self.drift_repaired.get_or_create(&vec![("map".into(), (*map).into())]).inc_by(n);
        }
    }

    /// Records the skipped objects of the latest model (a gauge: what is skipped now).
    pub fn set_skipped(&self, skipped: &[Skipped]) {
        self.skipped_objects.clear();
        for s in skipped {
            let kind = s.kind.as_str();
            self.skipped_objects.get_or_create(&vec![("kind".into(), kind.into())]).inc();
        }
    }
}

/// The connection table as its collector last saw it: counting it at scrape time would walk every
/// connection on every scrape.
#[derive(Clone, Default)]
pub struct ConntrackMetrics {
    /// Connections alive after the last collection.
    pub alive: Arc<std::sync::atomic::AtomicU64>,
    pub capacity: Arc<std::sync::atomic::AtomicU64>,
    /// Entries the collector removed: dead connections, reply tuples left without one.
    pub removed: Family<Vec<(String, String)>, Counter>,
    pub failures: Counter,
}

impl ConntrackMetrics {
    /// Records one collection.
    pub fn record(&self, result: &Result<crate::conntrack::Collected>) {
        use std::sync::atomic::Ordering::Relaxed;
        match result {
            Ok(c) => {
                self.alive.store(c.alive as u64, Relaxed);
                let kind = |k: &str| vec![("kind".to_owned(), k.to_owned())];
                self.removed.get_or_create(&kind("dead")).inc_by(c.dead as u64);
                self.removed.get_or_create(&kind("orphan_reply")).inc_by(c.orphans as u64);
            }
            Err(_) => {
                self.failures.inc();
            }
        }
    }
}

/// The pinned maps read at scrape time (opened again from their pins: the running datapath keeps its
/// own handles), with the capacities of the state maps.
struct PinnedMaps {
    stats: PerCpuArray<MapData, u64>,
    affinity: (HashMap<MapData, AffinityKey, Affinity>, u32),
    sock_flows: (HashMap<MapData, SockFlowKey, SockFlow>, u32),
}

impl PinnedMaps {
    fn open(bpffs: &Path) -> Result<Self> {
        Ok(Self {
            stats: PerCpuArray::try_from(open_pinned(bpffs, "STATS")?.0)?,
            affinity: open_pinned_hash(bpffs, "AFFINITY")?,
            sock_flows: open_pinned_hash(bpffs, "SOCK_FLOWS")?,
        })
    }
}

struct DatapathCollector(Mutex<PinnedMaps>, ConntrackMetrics);

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

fn per_reason(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'static str, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
    for (reason, v) in values {
        ConstCounter::new(v).encode(family.encode_family(&[("reason", reason)])?)?;
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let maps = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stats: Vec<(u32, u64)> =
            (0..STAT_MAX).filter_map(|i| maps.stats.get(&i, 0).ok().map(|v| (i, v.iter().sum()))).collect();
        let named = |drops: bool| {
            stats.iter().filter(move |(i, _)| stat_is_drop(*i) == drops).filter_map(|(i, v)| Some((stat_name(*i)?, *v)))
        };
        per_reason(
            &mut encoder,
            "ebpf_proxy_datapath_packets",
            "Packets and socket calls handled by the datapath, by outcome",
            named(false),
        )?;
        per_reason(
            &mut encoder,
            "ebpf_proxy_datapath_drops",
            "Packets dropped by the datapath, by reason",
            named(true),
        )?;
        // Fill levels: connections as of the collector's last pass; entries currently in the LRU maps
        // (expired ones count until evicted).
        let ct = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed) as usize;
        let fills = [
            ("conntrack", ct(&self.1.alive), ct(&self.1.capacity) as u32),
            ("affinity", maps.affinity.0.keys().count(), maps.affinity.1),
            ("sock_flows", maps.sock_flows.0.keys().count(), maps.sock_flows.1),
        ];
        let mut family = encoder.encode_descriptor(
            "ebpf_proxy_map_entries",
            "Entries in the datapath's state maps",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, n, _) in &fills {
            ConstGauge::new(*n as i64).encode(family.encode_family(&[("map", *map)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ebpf_proxy_map_capacity",
            "Capacity of the datapath's state maps",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, _, cap) in &fills {
            ConstGauge::new(i64::from(*cap)).encode(family.encode_family(&[("map", *map)])?)?;
        }
        Ok(())
    }
}

/// The registry with everything registered.
pub struct Metrics {
    registry: Registry,
    pub sync: SyncMetrics,
    pub conntrack: ConntrackMetrics,
}

impl Metrics {
    pub fn new(bpffs: &Path, conntrack_capacity: u32) -> Result<Self> {
        let sync = SyncMetrics::new();
        let conntrack = ConntrackMetrics::default();
        conntrack.capacity.store(u64::from(conntrack_capacity), std::sync::atomic::Ordering::Relaxed);
        let mut registry = Registry::default();
        let kp = registry.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync.sync_duration.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            sync.last_sync_timestamp.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            sync.last_queued_timestamp.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            sync.network_programming.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            sync.service_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            sync.endpoint_changes.clone(),
        );
        let own = registry.sub_registry_with_prefix("ebpf_proxy");
        own.register("sync_failures", "Syncs that failed and were retried", sync.sync_failures.clone());
        own.register(
            "skipped_objects",
            "Kubernetes objects skipped as malformed, by kind",
            sync.skipped_objects.clone(),
        );
        own.register(
            "sync_drift_repaired",
            "Map entries a full sync found changed, missing or unexpected (written behind ebpf-proxy's back) and repaired, by map",
            sync.drift_repaired.clone(),
        );
        own.register(
            "conntrack_gc_removed",
            "Entries the conntrack collector removed: dead connections, reply tuples without one",
            conntrack.removed.clone(),
        );
        own.register("conntrack_gc_failures", "Conntrack collections that failed", conntrack.failures.clone());
        registry
            .register_collector(Box::new(DatapathCollector(Mutex::new(PinnedMaps::open(bpffs)?), conntrack.clone())));
        Ok(Self { registry, sync, conntrack })
    }

    pub fn encode(&self) -> Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Serves `/metrics` on `addr` until the task is dropped.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
        let app = Router::new()
            .route(
                "/metrics",
                get(|State(m): State<Arc<Metrics>>| async move {
                    match m.encode() {
                        Ok(text) => (
                            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                            text,
                        )
                            .into_response(),
                        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                    }
                }),
            )
            .with_state(self);
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics on {addr}"))?;
        Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                log::error!("metrics server on {addr}: {e}");
            }
        }))
    }
}
