//! The standalone control plane (manifest mode only): what kube-apiserver and
//! kube-controller-manager would do with the objects of a manifest directory, done on the node,
//! so that manifests as people write them serve traffic with no cluster:
//!
//! * [`alloc`]: ClusterIPs, NodePorts, `healthCheckNodePort`s and LoadBalancer IPs, stable
//!   across re-reads and restarts ([`State`], kept by the agent in `--state-file`);
//! * [`endpointslice`]: Pods matching a Service's selector → EndpointSlices;
//! * [`mirror`]: legacy `v1 Endpoints` of selector-less Services → EndpointSlices.
//!
//! [`ControlPlane::run`] turns a snapshot of the files into the snapshot a cluster's API would
//! serve — allocated Services, hand-written plus generated slices, this Node — and that goes
//! through exactly the same model as the API source's. Unchanged inputs give the very same
//! `Arc`s, so the model's per-object cache keeps working.
pub mod alloc;
pub mod endpointslice;
pub mod mirror;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use crate::k8s::Str;
use crate::k8s::core::{Endpoints, Pod, Service};
use crate::k8s::discovery::EndpointSlice;

pub use alloc::{IpRange, Ranges, Record, State};

use crate::Objects;
use crate::model::{LABEL_ZONE, NsName, ObjectRef};

/// Problems of the control plane, each naming the object and field (upstream's wording where
/// an API server or controller has one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{object}: {field}: invalid IP address {value:?}: {reason}; skipped")]
    BadAddress {
        object: ObjectRef,
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{object}: {field}: port {value} is outside 1-65535; skipped")]
    BadPort {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error("{object}: {field}: Invalid value: {value}: {reason}")]
    Invalid {
        object: ObjectRef,
        field: String,
        value: String,
        reason: String,
    },
    #[error("{object}: {field}: {reason}; skipped")]
    Exhausted {
        object: ObjectRef,
        field: String,
        reason: String,
    },
    #[error(
        "{object}: LoadBalancer ingress pending: no --lb-ip-pool address for it (as on a cluster without a load-balancer controller)"
    )]
    Pending { object: ObjectRef },
    #[error(
        "{object}: spec.selector: {selector} matches no Pod: the Service has no endpoints (connections are refused)"
    )]
    NoMatch { object: ObjectRef, selector: String },
    #[error("{object}: defined more than once; the first definition is used")]
    Duplicate { object: ObjectRef },
}

/// A state file that cannot be read: the agent refuses to start rather than allocate afresh
/// (which could move every allocation).
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot read the allocation state: {reason}")]
pub struct StateError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// 64-bit FNV-1a: stable names and allocation start points (never a security boundary).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn id_of(meta: &crate::k8s::ObjectMeta) -> Option<NsName> {
    Some(NsName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone()?,
    })
}

/// One Service's generated slices and the inputs they were made from.
type SelEntry = (
    Arc<Service>,
    Vec<Arc<Pod>>,
    Vec<Arc<EndpointSlice>>,
    Vec<Error>,
);
type MirrorEntry = (
    Arc<Endpoints>,
    Arc<Service>,
    Vec<Arc<EndpointSlice>>,
    Vec<Error>,
);

/// The control plane's memory between runs: the allocations and per-object results.
#[derive(Debug)]
pub struct ControlPlane {
    ranges: Ranges,
    state: State,
    /// Service → (input, its record, the allocated copy).
    allocated: HashMap<NsName, (Arc<Service>, Record, Arc<Service>)>,
    /// Service → (allocated Service, Pods matched, slices made, problems).
    selected: HashMap<NsName, SelEntry>,
    /// Endpoints → (object, its Service, slices made, problems).
    mirrored: HashMap<NsName, MirrorEntry>,
    /// Node name → zone, as of the last run (a change remakes every slice).
    zones: HashMap<Str, Str>,
    /// The last allocation: its input Services, its output and its problems.
    last: Option<LastAlloc>,
}

/// Input Services, allocated Services, problems.
type LastAlloc = (Vec<Arc<Service>>, Allocated, Vec<Error>);

/// The allocated Services, in allocation order (shared between runs while the input is the
/// same).
type Allocated = Arc<[(NsName, Arc<Service>)]>;

impl ControlPlane {
    /// A control plane that goes on from `state` (what an earlier run recorded).
    #[must_use]
    pub fn new(ranges: Ranges, state: State) -> Self {
        Self {
            ranges,
            state,
            allocated: HashMap::new(),
            selected: HashMap::new(),
            mirrored: HashMap::new(),
            zones: HashMap::new(),
            last: None,
        }
    }

    /// The allocations as of the last run (to persist).
    #[must_use]
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Turns the files' objects into what a cluster's API would serve. Returns the objects, the
    /// problems found, and whether the allocations changed (the caller persists them before it
    /// programs anything, so a crash can never hand a served value to another Service).
    pub fn run(&mut self, objs: &Objects, node_name: &str) -> (Objects, Vec<Error>, bool) {
        let mut errors = Vec::new();
        let (services, changed) = self.allocate(&objs.services, &mut errors);

        let zones: HashMap<Str, Str> = objs
            .nodes
            .iter()
            .filter_map(|n| {
                let zone = n.metadata.labels.as_ref()?.get(LABEL_ZONE)?;
                Some((n.metadata.name.clone()?, zone.clone()))
            })
            .collect();
        if zones != self.zones {
            self.selected.clear();
            self.zones = zones;
        }
        let mut slices: Vec<Arc<EndpointSlice>> = objs.slices.clone();
        self.select(&services, &objs.pods, &mut slices, &mut errors);
        self.mirror(&services, &objs.endpoints, &mut slices, &mut errors);

        let node = objs.node.clone().or_else(|| {
            objs.nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node_name))
                .cloned()
        });
        let out = Objects {
            services: services.iter().map(|(_, s)| s.clone()).collect(),
            slices,
            node,
            pods: objs.pods.clone(),
            endpoints: objs.endpoints.clone(),
            nodes: objs.nodes.clone(),
        };
        (out, errors, changed)
    }

    /// Allocation (oldest Service first, as conflicts are decided), with allocated copies
    /// reused while a Service and its record are unchanged. Also returns whether any record
    /// changed.
    fn allocate(&mut self, input: &[Arc<Service>], errors: &mut Vec<Error>) -> (Allocated, bool) {
        // The very same Services as last time: the same allocations (and problems).
        if let Some((prev_in, out, errs)) = &self.last
            && prev_in.len() == input.len()
            && prev_in.iter().zip(input).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            errors.extend(errs.iter().cloned());
            return (out.clone(), false);
        }
        let first = errors.len();
        let (out, changed) = self.allocate_all(input, errors);
        let out: Allocated = out.into();
        self.last = Some((input.to_vec(), out.clone(), errors[first..].to_vec()));
        (out, changed)
    }

    fn allocate_all(
        &mut self,
        input: &[Arc<Service>],
        errors: &mut Vec<Error>,
    ) -> (Vec<(NsName, Arc<Service>)>, bool) {
        let mut seen = std::collections::HashSet::new();
        let mut services: Vec<(NsName, Arc<Service>)> = Vec::with_capacity(input.len());
        for s in input {
            let Some(id) = id_of(&s.metadata) else {
                continue; // the model reports it
            };
            if seen.insert(id.clone()) {
                services.push((id, s.clone()));
            }
        }
        services.sort_by(|(a, x), (b, y)| {
            let (ta, tb) = (
                x.metadata.creation_timestamp.as_ref().map(|t| t.0),
                y.metadata.creation_timestamp.as_ref().map(|t| t.0),
            );
            (ta.is_none(), ta, a).cmp(&(tb.is_none(), tb, b))
        });
        let result = alloc::allocate(&services, &self.ranges, &self.state, errors);
        let mut next = HashMap::with_capacity(result.services.len());
        let mut out = Vec::with_capacity(result.services.len());
        for (id, input, plan, rec) in result.services {
            let kept = match (self.allocated.get(&id), &plan) {
                (Some((i, r, o)), _) if Arc::ptr_eq(i, &input) && *r == rec => o.clone(),
                (_, Some(p)) => alloc::apply(&input, p, &rec),
                (_, None) => input.clone(),
            };
            next.insert(id.clone(), (input, rec, kept.clone()));
            out.push((id, kept));
        }
        self.allocated = next;
        let changed = result.state != self.state;
        self.state = result.state;
        (out, changed)
    }

    /// Slices for every Service with a selector, from the Pods it matches.
    fn select(
        &mut self,
        services: &[(NsName, Arc<Service>)],
        pods: &[Arc<Pod>],
        slices: &mut Vec<Arc<EndpointSlice>>,
        errors: &mut Vec<Error>,
    ) {
        let index = PodIndex::new(pods, errors);
        let mut next = HashMap::new();
        for (id, svc) in services {
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let Some(selector) = spec.selector.as_ref() else {
                continue; // selector-less: hand-written slices or mirrored Endpoints
            };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let matched = index.matching(&id.namespace, selector);
            let entry = match self.selected.remove(id) {
                Some(e)
                    if Arc::ptr_eq(&e.0, svc)
                        && e.1.len() == matched.len()
                        && e.1.iter().zip(&matched).all(|(a, b)| Arc::ptr_eq(a, b)) =>
                {
                    e
                }
                _ => {
                    let mut errs = Vec::new();
                    let made = endpointslice::slices_for(svc, id, &matched, &self.zones, &mut errs);
                    (svc.clone(), matched, made, errs)
                }
            };
            if entry.1.is_empty() {
                errors.push(Error::NoMatch {
                    object: ObjectRef {
                        kind: "Service",
                        id: id.clone(),
                    },
                    selector: selector
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                });
            }
            errors.extend(entry.3.iter().cloned());
            slices.extend(entry.2.iter().cloned());
            next.insert(id.clone(), entry);
        }
        self.selected = next;
    }

    /// Slices mirrored from the Endpoints of selector-less Services.
    fn mirror(
        &mut self,
        services: &[(NsName, Arc<Service>)],
        endpoints: &[Arc<Endpoints>],
        slices: &mut Vec<Arc<EndpointSlice>>,
        errors: &mut Vec<Error>,
    ) {
        if endpoints.is_empty() && self.mirrored.is_empty() {
            return;
        }
        let selectorless: HashMap<&NsName, &Arc<Service>> = services
            .iter()
            .filter(|(_, s)| s.spec.as_ref().is_some_and(|s| s.selector.is_none()))
            .map(|(id, s)| (id, s))
            .collect();
        let mut next: HashMap<NsName, MirrorEntry> = HashMap::new();
        for ep in endpoints {
            let Some(id) = id_of(&ep.metadata) else {
                continue;
            };
            let Some(svc) = selectorless.get(&id).copied() else {
                continue;
            };
            if !mirror::mirrored(ep) {
                continue;
            }
            if next.contains_key(&id) {
                errors.push(Error::Duplicate {
                    object: ObjectRef {
                        kind: "Endpoints",
                        id,
                    },
                });
                continue;
            }
            let entry = match self.mirrored.remove(&id) {
                Some(e) if Arc::ptr_eq(&e.0, ep) && Arc::ptr_eq(&e.1, svc) => e,
                _ => {
                    let mut errs = Vec::new();
                    let made = mirror::slices_for(ep, svc, &id, &mut errs);
                    (ep.clone(), svc.clone(), made, errs)
                }
            };
            errors.extend(entry.3.iter().cloned());
            slices.extend(entry.2.iter().cloned());
            next.insert(id, entry);
        }
        self.mirrored = next;
    }
}

/// Pods by namespace and by label pair, for selector matching without a scan of every Pod.
struct PodIndex<'a> {
    pods: Vec<&'a Arc<Pod>>,
    by_ns: HashMap<&'a str, Vec<usize>>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> PodIndex<'a> {
    fn new(all: &'a [Arc<Pod>], errors: &mut Vec<Error>) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut idx = Self {
            pods: Vec::with_capacity(all.len()),
            by_ns: HashMap::new(),
            by_label: HashMap::new(),
        };
        for pod in all {
            let Some(name) = pod.metadata.name.as_deref() else {
                continue;
            };
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            if !seen.insert((ns, name)) {
                errors.push(Error::Duplicate {
                    object: ObjectRef {
                        kind: "Pod",
                        id: NsName {
                            namespace: ns.into(),
                            name: name.into(),
                        },
                    },
                });
                continue;
            }
            let i = idx.pods.len();
            idx.pods.push(pod);
            idx.by_ns.entry(ns).or_default().push(i);
            for (k, v) in pod.metadata.labels.iter().flatten() {
                idx.by_label.entry((ns, k, v)).or_default().push(i);
            }
        }
        idx
    }

    /// Pods of `ns` whose labels hold every pair of `selector` (an empty selector: all of
    /// them), in file order.
    fn matching(&self, ns: &str, selector: &crate::k8s::Labels) -> Vec<Arc<Pod>> {
        let candidates: &[usize] = if selector.is_empty() {
            self.by_ns.get(ns).map_or(&[], Vec::as_slice)
        } else {
            let lists: Option<Vec<&Vec<usize>>> = selector
                .iter()
                .map(|(k, v)| self.by_label.get(&(ns, k.as_str(), v.as_str())))
                .collect();
            match lists.and_then(|l| l.into_iter().min_by_key(|l| l.len())) {
                Some(l) => l,
                None => &[],
            }
        };
        candidates
            .iter()
            .map(|&i| self.pods[i])
            .filter(|p| {
                let labels = p.metadata.labels.as_ref();
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .cloned()
            .collect()
    }
}

/// Reads a state file; a missing file is an empty state (a first start).
pub fn load_state(path: &Path) -> Result<State, StateError> {
    let fail = |reason: String| StateError {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let st: State = serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string()))?;
            if st.version != alloc::STATE_VERSION {
                return Err(fail(format!(
                    "layout version {} (this build reads {})",
                    st.version,
                    alloc::STATE_VERSION
                )));
            }
            Ok(st)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
            version: alloc::STATE_VERSION,
            services: BTreeMap::new(),
        }),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Writes a state file atomically (a temporary file beside it, fsynced, then renamed): a crash
/// leaves the old state or the new one, never half of one.
pub fn save_state(path: &Path, state: &State) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests;
