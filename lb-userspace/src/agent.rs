//! `lb-agent run`: load and attach the datapath, adopt what the maps hold, then keep them equal
//! to the source (manifest files or the Kubernetes API) — level-triggered: every change takes a
//! complete snapshot of the source, rebuilds the desired state and diffs it against the shadow.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use lb_model::k8s::{core::Service, discovery::EndpointSlice};

pub use crate::error::{Error, Result, chain};
use crate::{
    http,
    loader::{self, Sizes},
    maps::BpfMaps,
    metrics::{Health, Metrics},
    model,
    source::{ManifestDir, Objects, api::ApiSource},
    sync::{self, Shadow},
};

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone)]
pub enum SourceOpt {
    /// A directory of manifest files, watched with inotify.
    Manifests(PathBuf),
    /// The Kubernetes API: `--kubeconfig`, else the in-cluster service account.
    Api { kubeconfig: Option<PathBuf> },
}

/// One `--nodeport-addresses` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// The node's addresses inside this prefix.
    Cidr(model::Cidr),
    /// The Node's primary addresses (first InternalIP per family).
    Primary,
}

/// `--dns`: where cluster DNS is served, the zone, and where other names go.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    pub addrs: Vec<SocketAddr>,
    pub config: lb_model::dns::Config,
    pub upstreams: Vec<SocketAddr>,
}

/// Manifest mode's control plane: what it allocates from and where it keeps what it allocated.
#[derive(Debug, Clone)]
pub struct Standalone {
    pub ranges: lb_model::control::Ranges,
    pub state_file: PathBuf,
    /// `--cluster-dns`: the ClusterIPs of the DNS Service the agent creates itself.
    pub cluster_dns: Vec<std::net::IpAddr>,
}

/// The Service `--cluster-dns` creates: what kubeadm's kube-dns Service is.
pub const CLUSTER_DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

impl Standalone {
    /// `kube-system/kube-dns` with the `--cluster-dns` addresses, ports 53/UDP and 53/TCP, no
    /// selector: pods have a nameserver, steered to this agent (`--dns-service` defaults to it).
    #[must_use]
    pub fn cluster_dns_service(&self) -> Option<Arc<Service>> {
        if self.cluster_dns.is_empty() {
            return None;
        }
        let ips: Vec<lb_model::k8s::Str> = self
            .cluster_dns
            .iter()
            .map(compact_str::ToCompactString::to_compact_string)
            .collect();
        let port = |name: &str, proto: &str| lb_model::k8s::core::ServicePort {
            name: Some(name.into()),
            port: 53,
            protocol: Some(proto.into()),
            ..Default::default()
        };
        Some(Arc::new(Service {
            metadata: lb_model::k8s::ObjectMeta {
                name: Some(CLUSTER_DNS_SERVICE.1.into()),
                namespace: Some(CLUSTER_DNS_SERVICE.0.into()),
                labels: Some(lb_model::k8s::Labels::from([(
                    "k8s-app".to_owned(),
                    "kube-dns".to_owned(),
                )])),
                ..Default::default()
            },
            spec: Some(lb_model::k8s::core::ServiceSpec {
                cluster_ip: ips.first().cloned(),
                ip_family_policy: Some(
                    if ips.len() > 1 {
                        "RequireDualStack"
                    } else {
                        "SingleStack"
                    }
                    .into(),
                ),
                cluster_ips: Some(ips.into()),
                ports: Some([port("dns", "UDP"), port("dns-tcp", "TCP")].into()),
                ..Default::default()
            }),
            status: None,
        }))
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub source: SourceOpt,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub sizes: Sizes,
    /// `--nodeport-interfaces`: `None` = detect, `["none"]` = no packet path.
    pub nodeport_interfaces: Option<Vec<String>>,
    /// `--xdp`: the XDP fast path on the nodeport interfaces.
    pub xdp: loader::XdpMode,
    pub conntrack_gc_interval: Duration,
    pub conntrack_timeouts: lb_common::CtTimeouts,
    pub model: model::Config,
    /// Full resync even without file events (missed inotify events, clock-driven safety net).
    pub resync_every: Duration,
    /// Quiet time after an event before syncing, so a burst (an editor's write sequence, a
    /// rollout's EndpointSlice updates) is one sync.
    pub debounce: Duration,
    /// Least time between the starts of two syncs (kube-proxy's minSyncPeriod).
    pub min_sync_interval: Duration,
    /// The host's network namespace (for host-only `127.0.0.1:<nodePort>` frontends).
    pub host_netns: PathBuf,
    /// Prometheus metrics listener.
    pub metrics_addr: SocketAddr,
    /// `/healthz` and `/livez` listener.
    pub healthz_addr: SocketAddr,
    /// Address for the healthCheckNodePort listeners.
    pub healthcheck_bind: std::net::IpAddr,
    /// A change not in the datapath after this long makes `/healthz` and `/livez` fail.
    pub health_timeout: Duration,
    /// `--nodeport-addresses` (empty: the default, see [`node_addresses`]).
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Manifest mode: the standalone control plane's ranges and state file.
    pub standalone: Standalone,
    /// Cluster DNS (`None`: off).
    pub dns: Option<DnsOptions>,
}

/// The addresses NodePorts are served on, as kube-proxy picks them: `--node-address` values,
/// plus with `--nodeport-addresses` the node's addresses in those CIDRs (and the Node's
/// primary addresses for `primary`); without it the Node's primary addresses, or — when neither
/// a Node nor a `--node-address` is known — every address of the node.
#[must_use]
pub fn node_addresses(
    flags: &[std::net::IpAddr],
    nodeport_addresses: &[NodePortAddress],
    node: Option<&lb_model::k8s::core::Node>,
    local: &[std::net::IpAddr],
) -> Vec<std::net::IpAddr> {
    let mut out = flags.to_vec();
    let mut add = |ip: std::net::IpAddr| {
        if !out.contains(&ip) {
            out.push(ip);
        }
    };
    if nodeport_addresses.is_empty() {
        if node.is_some() {
            model::primary_addresses(node)
                .into_iter()
                .for_each(&mut add);
        } else if flags.is_empty() {
            local.iter().copied().for_each(&mut add);
        }
    } else {
        for ip in local {
            if nodeport_addresses
                .iter()
                .any(|a| matches!(a, NodePortAddress::Cidr(c) if c.contains(*ip)))
            {
                add(*ip);
            }
        }
        if nodeport_addresses.contains(&NodePortAddress::Primary) {
            model::primary_addresses(node)
                .into_iter()
                .for_each(&mut add);
        }
    }
    out
}

/// The running source.
enum Source {
    /// The files, and the control plane that turns them into what a cluster's API would serve.
    Manifests {
        dir: ManifestDir,
        control: Box<lb_model::control::ControlPlane>,
        state_file: PathBuf,
        node_name: String,
        health: Arc<Mutex<Health>>,
        /// Services the agent adds itself (`--cluster-dns`), ahead of the files' own.
        own: Vec<Arc<Service>>,
    },
    Api(ApiSource),
}

impl Source {
    /// A complete snapshot and the problems met taking it.
    fn snapshot(&mut self) -> (Objects, Vec<String>) {
        match self {
            Self::Manifests {
                dir,
                control,
                state_file,
                node_name,
                health,
                own,
            } => {
                let (mut files, errors) = dir.read();
                if !own.is_empty() {
                    files.services.splice(0..0, own.iter().cloned());
                }
                let (o, control_errors, changed) = control.run(&files, node_name);
                // Persisted before anything is programmed: a value the datapath serves is
                // never handed to another Service after a crash.
                if changed {
                    let r = lb_model::control::save_state(state_file, control.state());
                    let problem = r.err().map(|e| {
                        format!(
                            "cannot write the allocation state {}: {e}",
                            state_file.display()
                        )
                    });
                    health
                        .lock()
                        .expect("health lock")
                        .fault("allocation state", problem);
                }
                let errors = errors
                    .iter()
                    .map(|e| chain(e))
                    .chain(control_errors.iter().map(ToString::to_string))
                    .collect();
                (o, errors)
            }
            Self::Api(a) => (a.snapshot(), Vec::new()),
        }
    }
}

struct State {
    src: Source,
    cfg: model::Config,
    maps: BpfMaps,
    bpffs: PathBuf,
    capacity: sync::Capacity,
    shadow: Shadow,
    /// How long the last source snapshot (read + parse) and DNS update took, for the sync log
    /// line.
    t_source: Duration,
    t_dns: Duration,
    /// Problems already reported, so a resync does not repeat them.
    reported: BTreeSet<String>,
    metrics: Arc<Metrics>,
    health: Arc<Mutex<Health>>,
    /// The previous snapshot's objects, to count changes (objects unchanged since the last
    /// snapshot are the same `Arc`, in the same order).
    prev_services: Vec<Arc<Service>>,
    prev_slices: Vec<Arc<EndpointSlice>>,
    synced_once: bool,
    /// When the heap was last trimmed ([`trim_heap`]).
    last_trim: Instant,
    /// The last sync left the maps as desired: the next event-driven sync then diffs only the
    /// frontends that changed since (else it looks at all of them).
    in_sync: bool,
    /// Frontends refused for want of room last time (retried), and those Maglev is off for.
    refused: BTreeSet<model::Frontend>,
    maglev_off: BTreeSet<model::Frontend>,
    /// The desired state, kept between syncs: a sync recomputes what its changed objects touch.
    model_cache: model::Cache,
    /// `--node-address` values.
    node_addresses_flag: Vec<std::net::IpAddr>,
    /// `--nodeport-addresses` values.
    nodeport_addresses: Vec<NodePortAddress>,
    /// This node's own addresses (at start).
    local_addresses: Vec<std::net::IpAddr>,
    /// healthCheckNodePort listeners.
    health_checks: crate::healthcheck::HealthChecks,
    /// Manifest mode: what the control plane serves, for `lb-agent get` (`None` in API mode).
    served: Option<Arc<std::sync::RwLock<crate::get::Served>>>,
    /// Cluster DNS: the server's shared index, the zone's configuration, the addresses it
    /// listens on, and the builder keeping each Service's records between syncs (`None`: off).
    dns: Option<DnsState>,
}

type DnsState = (
    Arc<crate::dns::Shared>,
    lb_model::dns::Config,
    Vec<SocketAddr>,
    lb_model::dns::Builder,
);

/// Between two snapshots (unchanged objects are the same `Arc`s, in the same order): the
/// objects that are new or changed, and how many namespace/names were added, changed or
/// removed; `prev` becomes `now`. Costs what changed ([`lb_model::Window`]), not what the
/// snapshots hold.
fn changes<'a, K: lb_model::k8s::Object>(
    prev: &mut Vec<Arc<K>>,
    now: &'a [Arc<K>],
) -> (Vec<&'a Arc<K>>, u64) {
    let w = lb_model::Window::of(prev, now);
    if w.is_empty() {
        return (Vec::new(), 0);
    }
    let (old, new) = (&prev[w.prefix..w.old_end], &now[w.prefix..w.new_end]);
    let addrs = |v: &[Arc<K>]| -> HashSet<*const K> { v.iter().map(Arc::as_ptr).collect() };
    let (old_set, new_set) = (addrs(old), addrs(new));
    let fresh: Vec<&Arc<K>> = new
        .iter()
        .filter(|o| !old_set.contains(&Arc::as_ptr(o)))
        .collect();
    let gone = old.iter().filter(|o| !new_set.contains(&Arc::as_ptr(o)));
    let names: HashSet<(Option<&str>, Option<&str>)> = fresh
        .iter()
        .copied()
        .chain(gone)
        .map(|o| {
            (
                o.metadata().namespace.as_deref(),
                o.metadata().name.as_deref(),
            )
        })
        .collect();
    let n = names.len() as u64;
    drop(names);
    // `prev` becomes `now`, replacing only the window.
    w.apply(prev, now);
    (fresh, n)
}

/// The EndpointSlice annotation the EndpointSlice controller sets to the time of the change
/// that triggered the slice update.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl State {
    /// One level-triggered sync. `full`: diff against every frontend (start-up, periodic
    /// resync: also repairs anything left over); otherwise only the frontends whose desired
    /// state changed since the last successful sync. Returns whether the datapath now matches
    /// the source.
    fn sync(&mut self, full: bool) -> bool {
        let started = Instant::now();
        let (objs, source_errors) = self.src.snapshot();
        self.t_source = started.elapsed();
        if let Some(served) = &self.served {
            *served.write().expect("served lock") = crate::get::Served {
                services: objs.services.clone(),
                slices: objs.slices.clone(),
            };
        }
        // DNS before the maps: a change is in DNS no later than in the datapath. The builder
        // costs what changed, and keeps the index (and its serial) when nothing did.
        if let Some((shared, cfg, _, builder)) = &mut self.dns {
            let serial = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as u32;
            if let Some(ix) = builder.update(&objs, cfg, serial) {
                shared.set(Arc::new(ix));
            }
        }
        self.t_dns = started.elapsed().saturating_sub(self.t_source);
        let ok = self.sync_snapshot(&objs, source_errors, started, full);
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        let (changed, big) = self.account(&objs, ok);
        // A trim walks the whole heap: after every bulk change, and after smaller ones (or a
        // resync) at most every TRIM_EVERY, which also returns what serving (DNS answers on the
        // runtime's threads) left behind.
        if big || ((changed || full) && self.last_trim.elapsed() >= TRIM_EVERY) {
            trim_heap();
            self.last_trim = Instant::now();
        }
        ok
    }

    /// Metrics and health after a sync of `objs`. Returns whether any object changed, and
    /// whether it was a big sync (the first, or [`TRIM_AFTER`] objects changed or more).
    fn account(&mut self, objs: &Objects, ok: bool) -> (bool, bool) {
        let (_, services) = changes(&mut self.prev_services, &objs.services);
        let (fresh_slices, slices) = changes(&mut self.prev_slices, &objs.slices);
        if self.synced_once {
            self.metrics.service_changes.inc_by(services);
            self.metrics.endpoint_changes.inc_by(slices);
        }
        if ok {
            let now_wall = std::time::SystemTime::now();
            self.metrics.last_sync.set(
                now_wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
            // Network programming latency: slices that changed since the last sync, measured
            // from the change that triggered them (not on the first sync: those changes are
            // older than this agent).
            if self.synced_once {
                let since_epoch = now_wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let now_ts =
                    k8s_openapi::jiff::Timestamp::from_nanosecond(since_epoch.as_nanos() as i128)
                        .unwrap_or_default();
                for s in &fresh_slices {
                    let trig = s
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(TRIGGER_TIME));
                    if let Some(t) =
                        trig.and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                        && let Ok(d) = now_ts.duration_since(t).try_into()
                    {
                        let d: std::time::Duration = d;
                        self.metrics.network_programming.observe(d.as_secs_f64());
                    }
                }
            }
            let mut h = self.health.lock().expect("health lock");
            h.last_updated = now_wall;
            h.pending_since = None;
            if let Some((dns, ..)) = &self.dns {
                dns.pending(None);
            }
        }
        self.health.lock().expect("health lock").node_eligible =
            crate::metrics::node_eligible(objs.node.as_deref());
        let first = !self.synced_once;
        self.synced_once = true;
        (
            first || services + slices > 0,
            first || services + slices >= TRIM_AFTER,
        )
    }

    fn sync_snapshot(
        &mut self,
        objs: &Objects,
        source_errors: Vec<String>,
        started: Instant,
        full: bool,
    ) -> bool {
        // The zone can change with the Node's labels: take it from this snapshot.
        self.cfg.zone = objs.node.as_ref().and_then(|n| {
            Some(
                n.metadata
                    .labels
                    .as_ref()?
                    .get(model::LABEL_ZONE)?
                    .to_string(),
            )
        });
        self.cfg.node_addresses = node_addresses(
            &self.node_addresses_flag,
            &self.nodeport_addresses,
            objs.node.as_deref(),
            &self.local_addresses,
        );
        let (changed, model_errors) = model::update(
            &objs.services,
            &objs.slices,
            &self.cfg,
            &mut self.model_cache,
        );
        let (dirty, mut desired, no_maglev) = self.scope(changed, full);
        let t_model = started.elapsed();
        let refused = sync::fit(&mut desired, &self.shadow, &self.capacity, dirty.as_ref());
        let t_fit = started.elapsed();
        self.refused = refused.iter().map(|(f, _)| *f).collect();
        self.report(source_errors, &model_errors, &refused, no_maglev);
        self.health_checks.sync(&desired.health_checks);
        let ops = match &dirty {
            Some(d) => sync::diff_scoped(&desired, self.model_cache.desired(), &self.shadow, d),
            None => sync::diff(&desired, &self.shadow),
        };
        let t_diff = started.elapsed();
        let us = |a: Duration, b: Duration| a.saturating_sub(b).as_micros() as u64;
        if ops.is_empty() {
            debug!(
                frontends = self.model_cache.desired().frontends.len(),
                elapsed_us = t_diff.as_micros() as u64,
                source_us = self.t_source.as_micros() as u64,
                dns_us = self.t_dns.as_micros() as u64,
                model_us = us(t_model, self.t_source + self.t_dns),
                scoped = dirty.as_ref().map(BTreeSet::len),
                "datapath already up to date"
            );
            self.in_sync = true;
            return true;
        }
        // Frontend ids (of the frontends looked at) before the writes, to find the freed ones.
        let ids_before = self.frontend_ids(dirty.as_ref());
        match sync::apply(&ops, &mut self.maps, &mut self.shadow) {
            Ok(n) => {
                let t_apply = started.elapsed();
                info!(
                    ops = n,
                    frontends = self.model_cache.desired().frontends.len(),
                    services = objs.services.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    source_us = self.t_source.as_micros() as u64,
                    dns_us = self.t_dns.as_micros() as u64,
                    model_us = us(t_model, self.t_source + self.t_dns),
                    fit_us = us(t_fit, t_model),
                    diff_us = us(t_diff, t_fit),
                    apply_us = us(t_apply, t_diff),
                    scoped = dirty.as_ref().map(BTreeSet::len),
                    "programmed datapath"
                );
                self.after_apply(&desired, dirty.as_ref(), &ids_before);
                self.in_sync = true;
                true
            }
            Err((applied, e)) => {
                self.in_sync = false; // the next sync looks at everything
                error!(
                    error = %chain(&e),
                    applied,
                    pending = ops.len() - applied,
                    "map update failed; what was written is consistent, retrying on the next sync"
                );
                false
            }
        }
    }

    /// After a write: the metrics' frontend labels, and no counters for freed frontend ids
    /// (`ids_before`: the ids of the frontends looked at, before the write).
    fn after_apply(
        &self,
        desired: &model::Desired,
        dirty: Option<&BTreeSet<model::Frontend>>,
        ids_before: &BTreeSet<u32>,
    ) {
        let ids_after = self.frontend_ids(dirty);
        let freed: BTreeSet<u32> = ids_before.difference(&ids_after).copied().collect();
        self.label_frontends(desired, dirty.is_some(), &freed);
        let r = match dirty {
            Some(_) => crate::maps::remove_frontend_counts(&self.bpffs, &freed),
            // A full sync also collects what an earlier run left.
            None => crate::maps::gc_frontend_counts(&self.bpffs, &ids_after),
        };
        if let Err(e) = r {
            warn!(error = %chain(&e), "cannot remove counters of removed frontends");
        }
    }

    /// The frontends a sync looks at (None: all of them) — those whose desired state changed,
    /// those refused for room last time, and those Maglev was turned on or off for — with
    /// their desired states (only theirs are copied) and the Maglev messages.
    fn scope(
        &mut self,
        changed: model::Changed,
        full: bool,
    ) -> (
        Option<BTreeSet<model::Frontend>>,
        model::Desired,
        Vec<String>,
    ) {
        let all = self.model_cache.desired();
        let (maglev_off, no_maglev) =
            sync::maglev_off(self.model_cache.maglev(), all, self.maps.maglev_chunks());
        let dirty = match (changed, full, self.in_sync) {
            (Some(mut d), false, true) => {
                d.extend(self.refused.iter().copied());
                d.extend(maglev_off.symmetric_difference(&self.maglev_off).copied());
                Some(d)
            }
            _ => None,
        };
        let mut desired = match &dirty {
            Some(d) => model::Desired {
                frontends: d
                    .iter()
                    .filter_map(|f| Some((*f, all.frontends.get(f)?.clone())))
                    .collect(),
                health_checks: all.health_checks.clone(),
            },
            None => all.clone(),
        };
        for fe in &maglev_off {
            if let Some(st) = desired.frontends.get_mut(fe) {
                Arc::make_mut(st).maglev = 0;
            }
        }
        self.maglev_off = maglev_off;
        (dirty, desired, no_maglev)
    }

    /// The frontend ids the maps hold for `dirty` (None: for every frontend).
    fn frontend_ids(&self, dirty: Option<&BTreeSet<model::Frontend>>) -> BTreeSet<u32> {
        match dirty {
            Some(d) => d
                .iter()
                .filter_map(|fe| self.shadow.svc.get(&sync::SvcKey::frontend(fe)))
                .map(|v| v.backend_id)
                .collect(),
            None => self
                .shadow
                .svc
                .iter()
                .filter(|(k, _)| k.slot == 0 && !k.is_marker())
                .map(|(_, v)| v.backend_id)
                .collect(),
        }
    }

    /// Warns once about each problem of this sync that the last one did not have.
    fn report(
        &mut self,
        source_errors: Vec<String>,
        model_errors: &[model::Error],
        refused: &[(model::Frontend, model::NsName)],
        no_maglev: Vec<String>,
    ) {
        let capacity_errors = refused.iter().map(|(fe, owner)| {
            format!(
                "Service {owner}: {fe}: not programmed, the maps are full (max entries: services v4 {} v6 {}, backends v4 {} v6 {}); \
                 it keeps what it had, raise --max-service-entries/--max-backend-entries",
                self.capacity.svc4, self.capacity.svc6, self.capacity.be4, self.capacity.be6
            )
        });
        let now: BTreeSet<String> = source_errors
            .into_iter()
            .chain(model_errors.iter().map(ToString::to_string))
            .chain(capacity_errors)
            .chain(no_maglev)
            .collect();
        for e in now.difference(&self.reported) {
            warn!(error = %e, "invalid input skipped");
        }
        self.reported = now;
    }

    /// Frontend id → Service labels for `lb_service_connections_total`, from the shadow (ids)
    /// and the desired state (owners): for the frontends of `desired` (`scoped`: only those
    /// changed; else all), and without the `freed` ids.
    fn label_frontends(&self, desired: &model::Desired, scoped: bool, freed: &BTreeSet<u32>) {
        let labels = desired.frontends.iter().filter_map(|(fe, st)| {
            let v = self.shadow.svc.get(&sync::SvcKey::frontend(fe))?;
            Some((
                v.backend_id,
                crate::metrics::FrontendLabel {
                    namespace: st.service.namespace.to_string(),
                    service: st.service.name.to_string(),
                    frontend: fe.to_string(),
                },
            ))
        });
        let mut map = self.metrics.frontends.write().expect("labels lock");
        if !scoped {
            map.clear();
        }
        for id in freed {
            map.remove(id);
        }
        map.extend(labels);
    }
}

/// Objects changed in one sync from which freed memory is returned to the kernel: a trim
/// walks the whole heap (milliseconds at 50,000 Services), worth it after a bulk change, not
/// after every endpoint flip.
const TRIM_AFTER: u64 = 1024;

/// Least time between two trims after small changes.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Returns freed memory to the kernel after a big sync: a 10,000-Service resync allocates (and
/// frees) a few hundred MiB of YAML trees, which glibc would otherwise keep as RSS.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One malloc arena for the whole agent, for an agent fed by the API server (call before any
/// thread starts; an operator's `MALLOC_ARENA_MAX` is left to decide). Its bulk work runs on
/// one thread at a time there: the watches store what they list, then one sync builds on it.
/// With glibc's arena per thread (up to 8 a CPU), the holes the lists' transient objects leave
/// among the stored ones stay in their arena, while the sync allocates the model, DNS and
/// shadow in another: 192 MiB RSS at 50,000 Services, 45 MB of it free heap. In one arena the
/// sync fills them: 165 MiB, with no slower start (`cargo xtask bench`, growth). Manifest mode
/// keeps the default: it parses files on every CPU, and one arena doubled its cold start.
pub fn single_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Starts the metrics and health listeners (failing at once when an address is taken). In
/// manifest mode the metrics listener also serves what the control plane serves, under the API
/// server's paths, for `lb-agent get`.
async fn serve_http(
    opts: &Options,
    served: Option<Arc<std::sync::RwLock<crate::get::Served>>>,
) -> Result<(Arc<Metrics>, Arc<Mutex<Health>>)> {
    let health = Arc::new(Mutex::new(Health::new(opts.health_timeout)));
    let metrics = Arc::new(Metrics::new(opts.bpffs.clone(), health.clone()));
    let m = metrics.clone();
    let json = |v: serde_json::Value| http::Response::new(200, "application/json", v.to_string());
    http::serve(
        "metrics",
        opts.metrics_addr,
        Arc::new(move |path| match (path, &served) {
            ("/metrics", _) => m.render(),
            (crate::get::SERVICES_PATH, Some(s)) => {
                json(crate::get::list(&s.read().expect("served lock").services))
            }
            (crate::get::SLICES_PATH, Some(s)) => {
                json(crate::get::list(&s.read().expect("served lock").slices))
            }
            _ => http::Response::new(404, "text/plain", "not found\n".into()),
        }),
    )
    .await
    .map_err(|source| Error::Listen {
        flag: "--metrics-addr",
        addr: opts.metrics_addr,
        source,
    })?;
    let h = health.clone();
    http::serve(
        "healthz",
        opts.healthz_addr,
        Arc::new(move |path| {
            let h = h.lock().expect("health lock").clone();
            match path {
                "/healthz" => h.respond(false, Instant::now(), std::time::SystemTime::now()),
                "/livez" => h.respond(true, Instant::now(), std::time::SystemTime::now()),
                _ => http::Response::new(404, "text/plain", "not found\n".into()),
            }
        }),
    )
    .await
    .map_err(|source| Error::Listen {
        flag: "--healthz-addr",
        addr: opts.healthz_addr,
        source,
    })?;

    Ok((metrics, health))
}

/// Loads and attaches the datapath (socket hooks on the cgroup, tcx on `ifaces`).
fn load(opts: &Options, host: u64, ifaces: &[String]) -> Result<BpfMaps> {
    if opts.conntrack_timeouts.tcp_closing_s < lb_common::CT_TIMEOUT_TCP_CLOSING_S {
        warn!(
            seconds = opts.conntrack_timeouts.tcp_closing_s,
            "--conntrack-tcp-timeout-close is below Linux's TIME_WAIT (60s): backends may refuse new connections on reused SNAT ports"
        );
    }
    loader::load_and_attach(
        &opts.bpffs,
        &opts.cgroup,
        opts.sizes,
        host,
        ifaces,
        opts.xdp,
        &opts.conntrack_timeouts,
    )
    .map_err(|e| Error::Load(Box::new(e)))
}

/// `--nodeport-interfaces`: as given, none, or detected from the node addresses known at
/// start (the flags; in manifest mode also the defaults of [`node_addresses`] without a Node).
fn nodeport_interfaces(opts: &Options, local: &[std::net::IpAddr]) -> Vec<String> {
    match &opts.nodeport_interfaces {
        Some(v) if v.iter().any(|i| i == "none") => Vec::new(),
        Some(v) => v.iter().filter(|i| !i.is_empty()).cloned().collect(),
        None => {
            let addrs = match opts.source {
                SourceOpt::Manifests(_) => node_addresses(
                    &opts.model.node_addresses,
                    &opts.nodeport_addresses,
                    None,
                    local,
                ),
                SourceOpt::Api { .. } => opts.model.node_addresses.clone(),
            };
            loader::detect_nodeport_interfaces(&addrs)
        }
    }
}

/// One conntrack garbage collection (on a blocking thread: it walks whole maps).
async fn collect_conntrack(bpffs: &std::path::Path, metrics: &Metrics) {
    let dir = bpffs.to_owned();
    match tokio::task::spawn_blocking(move || crate::conntrack::gc(&dir)).await {
        Ok(Ok(r)) => {
            metrics.conntrack(&r);
            if r.deleted != [0, 0] {
                debug!(entries = ?r.entries, deleted = ?r.deleted, "conntrack collected");
            }
        }
        Ok(Err(e)) => warn!(error = %chain(&e), "conntrack collection failed"),
        Err(e) => warn!(error = %e, "conntrack collection panicked"),
    }
}

/// Runs one sync off the async runtime, on a blocking thread: a cold sync of 50,000 Services
/// takes seconds, during which probes, health checks, watchers and signals must stay answered.
/// The state moves to that thread and back; a sync that panics ends the agent (the datapath
/// keeps what was written: every prefix of a sync is consistent).
async fn sync_off_runtime(mut state: State, full: bool) -> Result<State> {
    tokio::task::spawn_blocking(move || {
        state.sync(full);
        state
    })
    .await
    .map_err(|_| Error::SyncPanicked)
}

/// Starts the DNS server (`--dns`); it answers SERVFAIL until the first sync.
async fn start_dns(opts: &Options, metrics: &Metrics) -> Result<Option<DnsState>> {
    Ok(match &opts.dns {
        Some(d) => {
            if d.upstreams.is_empty() {
                warn!(
                    "--dns: no upstream nameserver (--dns-upstream, /etc/resolv.conf): names outside the cluster zone get SERVFAIL"
                );
            }
            let shared = crate::dns::Shared::new(d.upstreams.clone(), Some(metrics.dns.clone()));
            let bound = crate::dns::serve(&d.addrs, &shared).await?;
            Some((
                shared,
                d.config.clone(),
                bound,
                lb_model::dns::Builder::default(),
            ))
        }
        None => None,
    })
}

/// The node-local DNS lease: the listener's addresses (the first bound address of each family
/// that is not unspecified) and an expiry [`lb_common::NODE_DNS_LEASE_MS`] ahead, renewed
/// every [`lb_common::NODE_DNS_HEARTBEAT_MS`] by a task of the async runtime — so the lease
/// ends when the agent stops serving, killed or hung. A clean exit ends it at once
/// ([`node_dns_release`]).
fn node_dns_heartbeat(bpffs: &std::path::Path, bound: &[SocketAddr]) -> Result<()> {
    let mut v = lb_common::NodeDns::default();
    for a in bound.iter().filter(|a| !a.ip().is_unspecified()) {
        match a.ip() {
            std::net::IpAddr::V4(ip) if v.port4 == 0 => {
                (v.addr4, v.port4) = (ip.octets(), a.port());
            }
            std::net::IpAddr::V6(ip) if v.port6 == 0 => {
                (v.addr6, v.port6) = (ip.octets(), a.port());
            }
            _ => {}
        }
    }
    if v.port4 == 0 && v.port6 == 0 {
        warn!(
            "--dns-service: no --dns address names this node (0.0.0.0 / [::] cannot be steered to); node-local DNS is off"
        );
        return Ok(());
    }
    let mut map = crate::maps::NodeDnsMap::open(bpffs).map_err(|e| Error::ReadPins(Box::new(e)))?;
    info!(
        ipv4 = v.port4 != 0,
        ipv6 = v.port6 != 0,
        "node-local DNS: steering the --dns-service to this agent while it serves"
    );
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(Duration::from_millis(lb_common::NODE_DNS_HEARTBEAT_MS));
        let mut failing = false;
        loop {
            tick.tick().await;
            v.expires_ns = monotonic_ns() + lb_common::NODE_DNS_LEASE_MS * 1_000_000;
            match map.set(&v) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %chain(&e), "node-local DNS lease not renewed; queries fall back to the Service's endpoints");
                }
                Err(_) => {}
            }
        }
    });
    Ok(())
}

/// Ends the node-local DNS lease at once (clean exit): the next query goes to the endpoints.
fn node_dns_release(bpffs: &std::path::Path) {
    if let Ok(mut map) = crate::maps::NodeDnsMap::open(bpffs) {
        let _ = map.set(&lb_common::NodeDns::default());
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Installs a signal handler.
fn handler(kind: SignalKind, signal_name: &'static str) -> Result<tokio::signal::unix::Signal> {
    signal(kind).map_err(|source| Error::Signal {
        signal: signal_name,
        source,
    })
}

/// Starts the source: the manifest directory with its inotify watch (kept alive by the caller),
/// or the API watchers, waiting for their first complete lists. `None`: a signal came first.
async fn start_source(
    opts: &Options,
    tx: &mpsc::Sender<()>,
    health: &Arc<Mutex<Health>>,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Result<Option<(Source, Option<notify::RecommendedWatcher>)>> {
    match &opts.source {
        SourceOpt::Manifests(dir) => {
            let tx = tx.clone();
            let h = health.clone();
            let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Opening and reading a file is no change: the agent's own reads would wake
                // it again, and every sync would cause the next.
                if let Ok(e) = &res
                    && !changes_files(e.kind)
                {
                    return;
                }
                // An inotify error (say, a queue overflow) may have lost events: report it, and
                // wake the loop anyway so a complete re-read repairs whatever was missed.
                let problem = res.err().map(|e| e.to_string());
                h.lock()
                    .expect("health lock")
                    .fault("manifest inotify", problem);
                let _ = tx.try_send(());
            })
            .map_err(Error::Inotify)?;
            w.watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| Error::Watch {
                    dir: dir.clone(),
                    source,
                })?;
            let st = &opts.standalone;
            let state = lb_model::control::load_state(&st.state_file)
                .map_err(|e| Error::State(Box::new(e)))?;
            info!(
                state_file = %st.state_file.display(),
                services = state.services.len(),
                "standalone control plane: allocations loaded"
            );
            let source = Source::Manifests {
                dir: ManifestDir::new(dir),
                control: Box::new(lb_model::control::ControlPlane::new(
                    st.ranges.clone(),
                    state,
                )),
                state_file: st.state_file.clone(),
                node_name: opts.node_name.clone(),
                health: health.clone(),
                own: st.cluster_dns_service().into_iter().collect(),
            };
            Ok(Some((source, Some(w))))
        }
        SourceOpt::Api { kubeconfig } => {
            let client = crate::source::api::client(kubeconfig.as_deref()).await?;
            let api = ApiSource::start(&client, &opts.node_name, tx, health);
            info!("waiting for the first list of Services, EndpointSlices and this Node");
            // Until every store is complete the adopted maps stay exactly as they are.
            tokio::select! {
                () = api.ready() => {}
                _ = term.recv() => return Ok(None),
                _ = int.recv() => return Ok(None),
            }
            Ok(Some((Source::Api(api), None)))
        }
    }
}

/// Whether a watched directory's event can change what its files hold: not a mere open, read
/// or close after reading.
fn changes_files(kind: notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Runs the agent until SIGTERM/SIGINT. The datapath stays attached after exit (pinned), so
/// traffic keeps flowing across restarts; `lb-agent cleanup` removes it. A signal that arrives
/// during a sync is handled when that sync has finished, so nothing is left half-written.
pub async fn run(opts: Options) -> Result<()> {
    let host = loader::netns_cookie(&opts.host_netns).map_err(|e| Error::HostNetns(Box::new(e)))?;
    let local_addresses = loader::node_local_addresses();
    let ifaces = nodeport_interfaces(&opts, &local_addresses);
    let maps = load(&opts, host, &ifaces)?;
    info!(interfaces = ?ifaces, "packet path attached");
    let shadow = maps
        .read_shadow()
        .map_err(|e| Error::ReadPins(Box::new(e)))?;
    info!(
        node = %opts.node_name,
        cgroup = %opts.cgroup.display(),
        bpffs = %opts.bpffs.display(),
        adopted_entries = shadow.svc.len(),
        adopted_backends = shadow.backends.len(),
        "datapath attached"
    );
    let capacity = maps.capacity();

    let served = matches!(opts.source, SourceOpt::Manifests(_))
        .then(|| Arc::new(std::sync::RwLock::new(crate::get::Served::default())));
    let (metrics, health) = serve_http(&opts, served.clone()).await?;
    let dns = start_dns(&opts, &metrics).await?;

    // Every source wakes the loop through a 1-slot channel: a burst leaves one pending wake-up.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
    let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
    let Some((src, _inotify)) = start_source(&opts, &tx, &health, &mut term, &mut int).await?
    else {
        return Ok(()); // a signal came before the first list
    };
    let mut state = State {
        src,
        cfg: opts.model.clone(),
        maps,
        bpffs: opts.bpffs.clone(),
        capacity,
        shadow,
        t_source: Duration::ZERO,
        t_dns: Duration::ZERO,
        reported: BTreeSet::new(),
        metrics,
        health: health.clone(),
        prev_services: Vec::new(),
        prev_slices: Vec::new(),
        synced_once: false,
        last_trim: Instant::now(),
        in_sync: false,
        refused: BTreeSet::new(),
        maglev_off: BTreeSet::new(),
        model_cache: model::Cache::default(),
        node_addresses_flag: opts.model.node_addresses.clone(),
        nodeport_addresses: opts.nodeport_addresses.clone(),
        local_addresses,
        health_checks: crate::healthcheck::HealthChecks::new(opts.healthcheck_bind, health.clone()),
        served,
        dns,
    };
    let metrics = state.metrics.clone();
    state = sync_off_runtime(state, true).await?;
    // Node-local DNS only once the index holds the first complete sync: until then the
    // Service's endpoints answer (a listener without it would only say SERVFAIL).
    if let (Some((_, _, bound, _)), Some(_)) = (&state.dns, &opts.model.node_dns) {
        node_dns_heartbeat(&opts.bpffs, bound)?;
    }
    let mut last_sync = Instant::now();
    info!(source = ?opts.source, "agent ready");

    let mut resync = tokio::time::interval(opts.resync_every);
    resync.reset();
    let mut ct_gc =
        tokio::time::interval(opts.conntrack_gc_interval.max(Duration::from_millis(100)));
    ct_gc.reset();
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                health.lock().expect("health lock").pending_since.get_or_insert_with(Instant::now);
                if let Some((dns, ..)) = &state.dns {
                    dns.pending(Some(Instant::now()));
                }
                let at = (Instant::now() + opts.debounce).max(last_sync + opts.min_sync_interval);
                tokio::time::sleep_until(at.into()).await;
                while rx.try_recv().is_ok() {}
                last_sync = Instant::now();
                state = sync_off_runtime(state, false).await?;
            }
            _ = resync.tick() => {
                last_sync = Instant::now();
                state = sync_off_runtime(state, true).await?;
            }
            _ = ct_gc.tick() => collect_conntrack(&opts.bpffs, &metrics).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if opts.model.node_dns.is_some() {
        node_dns_release(&opts.bpffs);
    }
    info!("exiting; the datapath stays attached (run `lb-agent cleanup` to remove it)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{NodePortAddress, node_addresses};

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn node_port_addresses_follow_kube_proxy() {
        let local = ips(&["198.18.0.1", "198.18.9.1", "2001:db8::1"]);
        let node: lb_model::k8s::core::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}
        }))
        .unwrap();
        // Neither a Node nor a flag: every address of the node.
        assert_eq!(node_addresses(&[], &[], None, &local), local);
        // A Node: its primary addresses; flags add to them.
        assert_eq!(
            node_addresses(&ips(&["198.18.0.7"]), &[], Some(&node), &local),
            ips(&["198.18.0.7", "198.18.0.1"])
        );
        // A flag alone: only it.
        assert_eq!(
            node_addresses(&ips(&["198.18.0.7"]), &[], None, &local),
            ips(&["198.18.0.7"])
        );
        // --nodeport-addresses: the node's addresses in the CIDRs, and `primary`.
        let cidr = NodePortAddress::Cidr(lb_model::model::Cidr::parse("198.18.9.0/24").unwrap());
        assert_eq!(
            node_addresses(&[], &[cidr], Some(&node), &local),
            ips(&["198.18.9.1"])
        );
        assert_eq!(
            node_addresses(&[], &[cidr, NodePortAddress::Primary], Some(&node), &local),
            ips(&["198.18.9.1", "198.18.0.1"])
        );
    }
}
