//! Prometheus metrics (kube-proxy's names, so its dashboards and alerts keep working) and node
//! health as kube-proxy serves it on :10256.
//!
//! | metric | meaning |
//! |---|---|
//! | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram: one sync (snapshot → model → diff → maps) |
//! | `kubeproxy_network_programming_duration_seconds` | histogram: EndpointSlice `endpoints.kubernetes.io/last-change-trigger-time` → in the datapath |
//! | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge: unix time of the last successful sync |
//! | `kubeproxy_sync_proxy_rules_service_changes_total` | Services added, changed or removed |
//! | `kubeproxy_sync_proxy_rules_endpoint_changes_total` | EndpointSlices added, changed or removed |
//! | `lb_datapath_events_total{reason}` | the datapath's per-reason counters (`inspect stats`) |
//! | `lb_service_connections_total{namespace,service,frontend}` | new connections per frontend |
//! | `lb_dns_queries_total{type,rcode}` | DNS questions answered (`--dns`), by question type and response code |
//! | `lb_dns_cache_hits_total` | forwarded questions answered from the cache |
//! | `lb_dns_upstream_duration_seconds` | histogram: one forwarded question's round trip upstream |
//! | `lb_dns_answers_behind_total` | cluster-zone answers given while a source change had waited over 100 ms for its sync (0 expected) |
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{http::Response, maps};

/// Who a frontend id belongs to, for labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendLabel {
    pub namespace: String,
    pub service: String,
    pub frontend: String,
}

/// The agent's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    /// Frontend id → labels, replaced after every sync.
    pub frontends: Arc<RwLock<BTreeMap<u32, FrontendLabel>>>,
    /// Packet-path conntrack entries at the last collection, by family.
    pub conntrack_entries: Family<Vec<(String, String)>, Gauge>,
    /// Conntrack entries deleted by the collector, by family.
    pub conntrack_gc_deleted: Family<Vec<(String, String)>, Counter>,
    /// Cluster DNS.
    pub dns: Arc<DnsMetrics>,
}

/// Question types counted by name; others count as `other`.
pub const DNS_TYPES: [(u16, &str); 8] = [
    (1, "A"),
    (28, "AAAA"),
    (33, "SRV"),
    (12, "PTR"),
    (16, "TXT"),
    (5, "CNAME"),
    (6, "SOA"),
    (255, "ANY"),
];
/// Response codes counted by name (by their number); others count as `other`.
pub const DNS_RCODES: [&str; 6] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];

/// The DNS server's counters: created once, so counting a query allocates nothing.
pub struct DnsMetrics {
    /// `[type][rcode]`, the last index of each being `other`.
    queries: Vec<Vec<Counter>>,
    pub cache_hits: Counter,
    pub upstream: Histogram,
    pub behind: Counter,
}

impl DnsMetrics {
    fn new(registry: &mut Registry) -> Self {
        let fam = Family::<Vec<(String, String)>, Counter>::default();
        let types = DNS_TYPES.iter().map(|(_, n)| *n).chain(["other"]);
        let queries = types
            .map(|t| {
                DNS_RCODES
                    .iter()
                    .copied()
                    .chain(["other"])
                    .map(|r| {
                        fam.get_or_create(&vec![
                            ("type".to_owned(), t.to_owned()),
                            ("rcode".to_owned(), r.to_owned()),
                        ])
                        .clone()
                    })
                    .collect()
            })
            .collect();
        registry.register(
            "lb_dns_queries",
            "DNS questions answered, by question type and response code.",
            fam,
        );
        let cache_hits = Counter::default();
        registry.register(
            "lb_dns_cache_hits",
            "Forwarded DNS questions answered from the cache.",
            cache_hits.clone(),
        );
        let upstream = Histogram::new(exponential_buckets(0.000_1, 2.0, 18));
        registry.register(
            "lb_dns_upstream_duration_seconds",
            "Round trip of one forwarded DNS question to the upstream.",
            upstream.clone(),
        );
        let behind = Counter::default();
        registry.register(
            "lb_dns_answers_behind",
            "Cluster-zone answers given while a source change had waited over 100 ms for its sync.",
            behind.clone(),
        );
        Self {
            queries,
            cache_hits,
            upstream,
            behind,
        }
    }

    /// Counts one response (`qtype`: the question's type, `None` for an unreadable message).
    pub fn count(&self, qtype: Option<u16>, rcode: u8) {
        let t = qtype
            .and_then(|q| DNS_TYPES.iter().position(|(n, _)| *n == q))
            .unwrap_or(DNS_TYPES.len());
        let r = usize::from(rcode).min(DNS_RCODES.len());
        self.queries[t][r].inc();
    }
}

/// Reads the pinned datapath counters at scrape time.
#[derive(Debug)]
struct Datapath {
    bpffs: PathBuf,
    frontends: Arc<RwLock<BTreeMap<u32, FrontendLabel>>>,
    health: Arc<Mutex<Health>>,
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A map that cannot be read (the agent's own pins: should not happen) yields no sample
        // rather than a failed scrape, and a fault in /healthz (logged once) until it reads again.
        let stats = maps::read_stats(&self.bpffs);
        let ids: Vec<u32> = self
            .frontends
            .read()
            .expect("labels lock")
            .keys()
            .copied()
            .collect();
        let counts = maps::read_frontend_counts(&self.bpffs, ids);
        {
            let mut h = self.health.lock().expect("health lock");
            h.fault(
                "datapath counters",
                stats.as_ref().err().map(|e| crate::error::chain(e)),
            );
            h.fault(
                "frontend counters",
                counts.as_ref().err().map(|e| crate::error::chain(e)),
            );
        }
        if let Ok(stats) = stats {
            let mut fam = encoder.encode_descriptor(
                "lb_datapath_events",
                "Socket-LB datapath outcomes by reason (summed over CPUs).",
                None,
                MetricType::Counter,
            )?;
            for (stat, v) in stats {
                let labels = [("reason", stat.name())];
                ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
            }
        }
        if let Ok(counts) = counts {
            let labels = self.frontends.read().expect("labels lock");
            let mut fam = encoder.encode_descriptor(
                "lb_service_connections",
                "New connections (and unconnected datagrams) translated per Service frontend.",
                None,
                MetricType::Counter,
            )?;
            for (id, v) in counts {
                if let Some(l) = labels.get(&id) {
                    let set = [
                        ("namespace", l.namespace.as_str()),
                        ("service", l.service.as_str()),
                        ("frontend", l.frontend.as_str()),
                    ];
                    ConstCounter::new(v).encode(fam.encode_family(&set)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Metrics {
    #[must_use]
    pub fn new(bpffs: PathBuf, health: Arc<Mutex<Health>>) -> Self {
        let mut registry = Registry::default();
        let kp = registry.sub_registry_with_prefix("kubeproxy");
        // kube-proxy's buckets start at 1 ms; socket-LB syncs are often faster, so the same
        // doubling series starts at 0.1 ms here.
        let sync_duration = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        let network_programming = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let service_changes = Counter::default();
        let endpoint_changes = Counter::default();
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes.clone(),
        );
        let conntrack_entries = Family::<Vec<(String, String)>, Gauge>::default();
        let conntrack_gc_deleted = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "lb_conntrack_entries",
            "Packet-path conntrack/NAT entries (two per flow) at the last garbage collection.",
            conntrack_entries.clone(),
        );
        registry.register(
            "lb_conntrack_gc_deleted",
            "Packet-path conntrack/NAT entries deleted by the garbage collector.",
            conntrack_gc_deleted.clone(),
        );
        let dns = Arc::new(DnsMetrics::new(&mut registry));
        let frontends = Arc::new(RwLock::new(BTreeMap::new()));
        registry.register_collector(Box::new(Datapath {
            bpffs,
            frontends: frontends.clone(),
            health,
        }));
        Self {
            registry,
            sync_duration,
            network_programming,
            last_sync,
            service_changes,
            endpoint_changes,
            frontends,
            conntrack_entries,
            conntrack_gc_deleted,
            dns,
        }
    }

    /// Records one conntrack collection.
    pub fn conntrack(&self, r: &crate::conntrack::Report) {
        for (i, fam) in ["ipv4", "ipv6"].into_iter().enumerate() {
            let l = vec![("family".to_owned(), fam.to_owned())];
            self.conntrack_entries
                .get_or_create(&l)
                .set(i64::try_from(r.entries[i]).unwrap_or(i64::MAX));
            self.conntrack_gc_deleted
                .get_or_create(&l)
                .inc_by(r.deleted[i] as u64);
        }
    }

    /// The text exposition format.
    #[must_use]
    pub fn render(&self) -> Response {
        let mut body = String::new();
        if prometheus_client::encoding::text::encode(&mut body, &self.registry).is_err() {
            return Response::new(500, "text/plain", "encoding failed\n".into());
        }
        Response::new(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    }
}

/// Node and sync health, as kube-proxy's `/healthz` and `/livez` judge them.
#[derive(Clone, Debug)]
pub struct Health {
    /// The last successful sync.
    pub last_updated: SystemTime,
    /// The oldest change not yet in the datapath.
    pub pending_since: Option<Instant>,
    /// False while the Node is being deleted or tainted `ToBeDeletedByClusterAutoscaler`.
    pub node_eligible: bool,
    /// How long a change may wait before the agent counts as stalled.
    pub timeout: Duration,
    /// Standing failures (a watch task that died, inotify errors, unreadable maps) by what
    /// failed: while any stands, `/healthz` answers 503 and names them.
    pub faults: BTreeMap<&'static str, String>,
}

/// Taint the cluster autoscaler puts on nodes it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

impl Health {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self {
            last_updated: SystemTime::now(),
            pending_since: None,
            node_eligible: true,
            timeout,
            faults: BTreeMap::new(),
        }
    }

    /// Records (`Some`) or clears (`None`) the failure of `what`; logs only changes, so a
    /// failure that repeats on every scrape or event is logged once.
    pub fn fault(&mut self, what: &'static str, problem: Option<String>) {
        match problem {
            Some(p) => {
                if self.faults.get(what) != Some(&p) {
                    tracing::error!(what, error = %p, "failing; /healthz reports it until it recovers");
                    self.faults.insert(what, p);
                }
            }
            None => {
                if self.faults.remove(what).is_some() {
                    tracing::info!(what, "recovered");
                }
            }
        }
    }

    /// Updates are applied in time.
    #[must_use]
    pub fn syncing(&self, now: Instant) -> bool {
        self.pending_since
            .is_none_or(|t| now.duration_since(t) <= self.timeout)
    }

    /// `/healthz` (`livez = false`) or `/livez` (`livez = true`): `/livez` ignores the node.
    #[must_use]
    pub fn respond(&self, livez: bool, now: Instant, wall: SystemTime) -> Response {
        let healthy =
            self.syncing(now) && (livez || (self.node_eligible && self.faults.is_empty()));
        let ts = |t: SystemTime| {
            let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            k8s_openapi::jiff::Timestamp::from_nanosecond(d.as_nanos() as i128)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let body = if livez {
            format!(
                "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\"}}",
                ts(self.last_updated),
                ts(wall)
            )
        } else {
            let faults = if self.faults.is_empty() {
                String::new()
            } else {
                let list: BTreeMap<&str, &str> =
                    self.faults.iter().map(|(k, v)| (*k, v.as_str())).collect();
                format!(
                    ",\"faults\":{}",
                    serde_json::to_string(&list).unwrap_or_default()
                )
            };
            format!(
                "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\",\"nodeEligible\":{}{faults}}}",
                ts(self.last_updated),
                ts(wall),
                self.node_eligible
            )
        };
        let mut r = Response::new(if healthy { 200 } else { 503 }, "application/json", body);
        r.headers.push(("X-Content-Type-Options", "nosniff".into()));
        r
    }
}

/// Is this node eligible for traffic (not being deleted, not tainted for deletion)?
#[must_use]
pub fn node_eligible(node: Option<&lb_model::k8s::core::Node>) -> bool {
    let Some(n) = node else { return true };
    let deleting = n.metadata.deletion_timestamp.is_some();
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    !deleting && !tainted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_pending_changes_and_the_node() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut h = Health::new(Duration::from_secs(2));
        assert_eq!(h.respond(false, t0, wall).status, 200);
        h.pending_since = Some(t0);
        assert_eq!(
            h.respond(false, t0 + Duration::from_secs(1), wall).status,
            200,
            "within the timeout"
        );
        assert_eq!(
            h.respond(false, t0 + Duration::from_secs(3), wall).status,
            503,
            "stalled"
        );
        assert_eq!(
            h.respond(true, t0 + Duration::from_secs(3), wall).status,
            503,
            "livez also fails when stalled"
        );
        h.pending_since = None;
        h.node_eligible = false;
        let r = h.respond(false, t0, wall);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("\"nodeEligible\":false"), "{}", r.body);
        assert_eq!(
            h.respond(true, t0, wall).status,
            200,
            "livez ignores the node"
        );
        assert!(
            r.headers
                .contains(&("X-Content-Type-Options", "nosniff".into()))
        );
    }

    #[test]
    fn standing_faults_fail_healthz_until_they_clear() {
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let mut h = Health::new(Duration::from_secs(2));
        h.fault(
            "Service watch",
            Some("Service: the watch task panicked".into()),
        );
        h.fault(
            "Service watch",
            Some("Service: the watch task panicked".into()),
        );
        assert_eq!(h.faults.len(), 1, "the same fault is recorded once");
        let r = h.respond(false, t0, wall);
        assert_eq!(r.status, 503);
        assert!(
            r.body
                .contains(r#""faults":{"Service watch":"Service: the watch task panicked"}"#),
            "{}",
            r.body
        );
        assert_eq!(
            h.respond(true, t0, wall).status,
            200,
            "livez ignores faults"
        );
        h.fault("Service watch", None);
        let r = h.respond(false, t0, wall);
        assert_eq!(r.status, 200);
        assert!(!r.body.contains("faults"), "{}", r.body);
    }

    #[test]
    fn node_eligibility() {
        use lb_model::k8s::core::{Node, NodeSpec, Taint};
        assert!(node_eligible(None));
        let mut n = Node::default();
        assert!(node_eligible(Some(&n)));
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TAINT_TO_BE_DELETED.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(!node_eligible(Some(&n)));
    }

    #[test]
    fn metrics_use_kube_proxy_names() {
        let m = Metrics::new(
            PathBuf::from("/nonexistent"),
            Arc::new(Mutex::new(Health::new(Duration::from_secs(1)))),
        );
        m.sync_duration.observe(0.002);
        m.service_changes.inc();
        let body = m.render().body;
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 0",
        ] {
            assert!(body.contains(name), "{name} missing:\n{body}");
        }
    }
}
