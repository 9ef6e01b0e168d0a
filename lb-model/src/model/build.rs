//! The whole desired state from all Services and slices, kept between syncs: a sync resolves
//! only the Services whose objects (or slices) changed, and re-decides only the frontends they
//! claim or claimed. Conflicts between Services: oldest wins.
//!
//! Objects are recognised by identity (`Arc::ptr_eq`): a source hands out the same `Arc` for an
//! object until it changes (kube-rs stores; the manifest source for unchanged objects), and
//! keeps its objects in a stable order, so the changed objects are the [`crate::Window`]
//! between the unchanged prefix and suffix of the snapshot. The cache holds the `Arc`s, so an
//! address can never be reused by another object while an entry refers to it.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::k8s::core::Service;
use crate::k8s::discovery::EndpointSlice;

use super::{
    Claimed, Config, Desired, Error, Frontend, FrontendState, HealthCheck, LABEL_SERVICE_NAME,
    NsName, ObjectRef, Slice, SvcRes, ns_name, resolve_frontends, resolve_service, resolve_slice,
};
use crate::few::Few;
use crate::tracked::Tracked;

/// An object's namespace/name, shared by the maps that key on it.
type Id = Arc<NsName>;

/// What is kept of a resolved Service: what its claims are decided by (its id and age), the
/// frontends it claims, with where in the Service each came from (for a conflict's message),
/// and its healthCheckNodePort. The rest of the resolution (addresses, ports) is dropped.
#[derive(Debug)]
struct Kept {
    id: Id,
    created: Option<k8s_openapi::jiff::Timestamp>,
    frontends: Box<[Claimed]>,
    /// (healthCheckNodePort, distinct ready local endpoint addresses).
    health: Option<(u16, usize)>,
}

impl From<SvcRes> for Kept {
    fn from(r: SvcRes) -> Self {
        Self {
            id: r.svc.id,
            created: r.svc.created,
            frontends: r.frontends.into_boxed_slice(),
            health: r.health,
        }
    }
}

/// A Service's claim of a frontend (or healthCheckNodePort): its result, and where in it the
/// frontend is.
#[derive(Debug, Clone)]
struct Claim {
    res: Arc<Kept>,
    index: usize,
}

impl Claim {
    fn state(&self) -> &Arc<FrontendState> {
        &self.res.frontends[self.index].1
    }

    fn id(&self) -> &NsName {
        &self.res.id
    }

    /// Who claims first: the oldest Service (no timestamp: last), then by namespace/name;
    /// within one Service, its first frontend of the kind.
    fn age(&self) -> (bool, Option<k8s_openapi::jiff::Timestamp>, &NsName, usize) {
        let s = &self.res;
        (s.created.is_none(), s.created, &s.id, self.index)
    }
}

/// What the last build left: per-object results, who claims what, and the desired state.
/// [`build`] and [`update`] take a sync's snapshot and change only what its changed objects
/// touch; a change of [`Config`] (say, the node's zone) starts afresh.
#[derive(Debug, Default)]
pub struct Cache {
    cfg: Option<Config>,
    /// The last snapshot's objects by their own namespace/name (more than one object: a
    /// duplicate, and the first in the snapshot's order is used; no name: counted).
    service_objs: Tracked<Service, Id>,
    slice_objs: Tracked<EndpointSlice, Id>,
    /// Slice id → the object used, what it resolved to, and the Service it is for.
    slices: HashMap<Id, SliceEntry>,
    /// Service id → the ids of the slices labelled for it.
    /// (Sorted vectors: a Service has one slice or a few, and a one-entry B-tree set
    /// allocates room for eleven.)
    by_service: HashMap<Id, Few<Id>>,
    /// Service id → the object used, the slice objects it was resolved with, the result (`None`:
    /// it resolved to nothing) and the problems found.
    services: HashMap<Id, SvcEntry>,
    claims: HashMap<Frontend, Few<Claim>>,
    health: HashMap<u16, Few<Claim>>,
    desired: Desired,
    /// The desired frontends with a Maglev table (Maglev on, some backend), and its size.
    maglev: std::collections::BTreeMap<Frontend, u32>,
    /// Where problems are, so a build reports them all without looking at every object.
    slices_with_errors: BTreeSet<Id>,
    services_with_errors: BTreeSet<Id>,
    duplicate_services: BTreeSet<Id>,
    duplicate_slices: BTreeSet<Id>,
    contested: BTreeSet<Frontend>,
    contested_health: BTreeSet<u16>,
}

/// A slice object, what it resolved to, and the Service it is for.
///
/// A slice's resolved form is not kept: it is made again from the object whenever its Service
/// is resolved (a few microseconds), which saves holding every endpoint twice.
type SliceEntry = (Arc<EndpointSlice>, Box<[Error]>, Option<Id>);

/// A Service object, its slice objects, its result and its problems.
type SvcEntry = (
    Arc<Service>,
    Few<Arc<EndpointSlice>>,
    Option<Arc<Kept>>,
    Box<[Error]>,
);

/// What a build changed: the frontends whose desired state differs from the last build's
/// (`None`: possibly all of them — the first build, or after a change of [`Config`]).
pub type Changed = Option<BTreeSet<Frontend>>;

/// Builds the desired state. Returns it with every problem found; a problem only ever removes
/// the object (or endpoint, or port) it is about. `cache` carries the state from one build to
/// the next (pass `&mut Cache::default()` for a one-off build).
pub fn build(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    cfg: &Config,
    cache: &mut Cache,
) -> (Desired, Vec<Error>) {
    let (_, errors) = update(services, slices, cfg, cache);
    (cache.desired.clone(), errors)
}

/// [`build`] without the copy: the desired state stays in the cache ([`Cache::desired`]);
/// returns the frontends that changed and every problem found.
pub fn update(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    cfg: &Config,
    cache: &mut Cache,
) -> (Changed, Vec<Error>) {
    let fresh = cache.cfg.as_ref() != Some(cfg);
    if fresh {
        *cache = Cache {
            cfg: Some(cfg.clone()),
            ..Cache::default()
        };
    }
    let mut dirty_services = BTreeSet::new();
    cache.take_slices(slices, &mut dirty_services);
    let by_service = &cache.by_service;
    cache.service_objs.take(
        services,
        |s| id_of_service(s, by_service),
        &mut dirty_services,
    );
    let mut touched = BTreeSet::new();
    let mut touched_health = BTreeSet::new();
    cache.resolve(
        &dirty_services,
        services,
        cfg,
        &mut touched,
        &mut touched_health,
    );
    let changed = cache.decide(&touched, &touched_health);
    let errors = cache.errors();
    (if fresh { None } else { Some(changed) }, errors)
}

impl Cache {
    /// The desired state as of the last build.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The desired frontends that want a Maglev table, with its size, in frontend order
    /// (for [`crate::sync::maglev_off`]).
    #[must_use]
    pub fn maglev(&self) -> &std::collections::BTreeMap<Frontend, u32> {
        &self.maglev
    }

    /// Takes in the snapshot's slices; marks the Services whose slices changed.
    fn take_slices(&mut self, slices: &[Arc<EndpointSlice>], dirty: &mut BTreeSet<Id>) {
        let mut ids = BTreeSet::new();
        self.slice_objs.take(slices, id_of_slice, &mut ids);
        for id in ids {
            self.define_slice(&id, slices, dirty);
        }
    }

    /// Brings one slice id up to date with its first object.
    fn define_slice(&mut self, id: &Id, order: &[Arc<EndpointSlice>], dirty: &mut BTreeSet<Id>) {
        let first = self.slice_objs.first(id, order);
        if self.slice_objs.of(id).len() > 1 {
            self.duplicate_slices.insert(id.clone());
        } else {
            self.duplicate_slices.remove(id);
        }
        if let (Some(f), Some((o, _, _))) = (&first, self.slices.get(id))
            && Arc::ptr_eq(f, o)
        {
            return; // the same object
        }
        if let Some((_, _, Some(svc))) = self.slices.remove(id) {
            if let Some(set) = self.by_service.get_mut(&svc) {
                if let Ok(i) = set.as_slice().binary_search(id) {
                    set.remove(i);
                }
                if set.is_empty() {
                    self.by_service.remove(&svc);
                }
            }
            dirty.insert(svc);
        }
        self.slices_with_errors.remove(id);
        let Some(slice) = first else { return };
        let svc = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .map(|name| {
                let key = NsName {
                    namespace: id.namespace.clone(),
                    name: name.clone(),
                };
                // One id per Service, shared by its slices and its own entries.
                let known = self.by_service.get_key_value(&key).map(|(k, _)| k);
                match known.or_else(|| self.services.get_key_value(&key).map(|(k, _)| k)) {
                    Some(k) => k.clone(),
                    None => Arc::new(key),
                }
            });
        let Some(svc) = svc else {
            // Not managed for a Service: no resolution, no problems.
            self.slices
                .insert(id.clone(), (slice, Box::default(), None));
            return;
        };
        let mut errs = Vec::new();
        let object = ObjectRef {
            kind: "EndpointSlice",
            id: (**id).clone(),
        };
        // Only its problems are kept (see SliceEntry).
        let _ = resolve_slice(&slice, &object, &mut errs);
        if !errs.is_empty() {
            self.slices_with_errors.insert(id.clone());
        }
        let set = self.by_service.entry(svc.clone()).or_default();
        if let Err(i) = set.as_slice().binary_search(id) {
            set.insert(i, id.clone());
        }
        self.slices
            .insert(id.clone(), (slice, errs.into(), Some(svc.clone())));
        dirty.insert(svc);
    }

    /// Resolves the dirty Services (in parallel when there are many) and moves their claims.
    fn resolve(
        &mut self,
        dirty: &BTreeSet<Id>,
        order: &[Arc<Service>],
        cfg: &Config,
        touched: &mut BTreeSet<Frontend>,
        touched_health: &mut BTreeSet<u16>,
    ) {
        let mut work = Vec::new();
        for id in dirty {
            if self.service_objs.of(id).len() > 1 {
                self.duplicate_services.insert(id.clone());
            } else {
                self.duplicate_services.remove(id);
            }
            let svc = self.service_objs.first(id, order);
            let slice_objs: Vec<Arc<EndpointSlice>> = self
                .by_service
                .get(id)
                .map_or(&[][..], Few::as_slice)
                .iter()
                .map(|s| self.slices[s].0.clone())
                .collect();
            let same = match (&svc, self.services.get(id)) {
                (Some(s), Some((o, sl, _, _))) => {
                    Arc::ptr_eq(s, o)
                        && sl.len() == slice_objs.len()
                        && sl.iter().zip(&slice_objs).all(|(a, b)| Arc::ptr_eq(a, b))
                }
                _ => false,
            };
            if same {
                continue;
            }
            if let Some((_, _, res, _)) = self.services.remove(id) {
                self.services_with_errors.remove(id);
                if let Some(res) = res {
                    self.unclaim(&res, touched, touched_health);
                }
            }
            if let Some(svc) = svc {
                work.push((id.clone(), svc, slice_objs));
            }
        }
        let results = resolve_parallel(&work, cfg);
        for ((id, svc, slice_objs), (res, errs)) in work.into_iter().zip(results) {
            if let Some(res) = &res {
                self.claim(res, touched, touched_health);
            }
            if !errs.is_empty() {
                self.services_with_errors.insert(id.clone());
            }
            self.services
                .insert(id, (svc, slice_objs.into(), res, errs.into()));
        }
    }

    fn claim(
        &mut self,
        res: &Arc<Kept>,
        touched: &mut BTreeSet<Frontend>,
        touched_health: &mut BTreeSet<u16>,
    ) {
        for (i, (fe, ..)) in res.frontends.iter().enumerate() {
            let v = self.claims.entry(*fe).or_default();
            let c = Claim {
                res: res.clone(),
                index: i,
            };
            let at = v.as_slice().partition_point(|x| x.age() < c.age());
            v.insert(at, c);
            touched.insert(*fe);
        }
        if let Some((port, _)) = res.health {
            let v = self.health.entry(port).or_default();
            let c = Claim {
                res: res.clone(),
                index: 0,
            };
            let at = v.as_slice().partition_point(|x| x.age() < c.age());
            v.insert(at, c);
            touched_health.insert(port);
        }
    }

    fn unclaim(
        &mut self,
        res: &Arc<Kept>,
        touched: &mut BTreeSet<Frontend>,
        touched_health: &mut BTreeSet<u16>,
    ) {
        for (fe, ..) in &res.frontends {
            if let Some(v) = self.claims.get_mut(fe) {
                v.retain(|c| !Arc::ptr_eq(&c.res, res));
                if v.is_empty() {
                    self.claims.remove(fe);
                }
            }
            touched.insert(*fe);
        }
        if let Some((port, _)) = res.health {
            if let Some(v) = self.health.get_mut(&port) {
                v.retain(|c| !Arc::ptr_eq(&c.res, res));
                if v.is_empty() {
                    self.health.remove(&port);
                }
            }
            touched_health.insert(port);
        }
    }

    /// Re-decides the touched frontends and healthCheckNodePorts from their claims; returns the
    /// frontends whose desired state changed.
    fn decide(
        &mut self,
        touched: &BTreeSet<Frontend>,
        touched_health: &BTreeSet<u16>,
    ) -> BTreeSet<Frontend> {
        let mut changed = BTreeSet::new();
        // No desired frontend yet (a first build): the winners are built into the B-tree at
        // once, in order, which fills every node; inserted one by one in order, each node is
        // left a little over half full.
        let cold = self.desired.frontends.is_empty();
        let mut won = Vec::new();
        for fe in touched {
            let claims = self.claims.get(fe).map_or(&[][..], Few::as_slice);
            let winner = claims.first();
            if claims.iter().any(|c| c.id() != claims[0].id()) {
                self.contested.insert(*fe);
            } else {
                self.contested.remove(fe);
            }
            match winner.map(Claim::state) {
                Some(st) if st.maglev != 0 && !st.backends.is_empty() => {
                    self.maglev.insert(*fe, st.maglev);
                }
                _ => {
                    self.maglev.remove(fe);
                }
            }
            let now = self.desired.frontends.get(fe);
            match (winner, now) {
                (Some(w), Some(st)) if w.state() == st => {}
                (Some(w), _) if cold => {
                    won.push((*fe, w.state().clone()));
                    changed.insert(*fe);
                }
                (Some(w), _) => {
                    self.desired.frontends.insert(*fe, w.state().clone());
                    changed.insert(*fe);
                }
                (None, Some(_)) => {
                    self.desired.frontends.remove(fe);
                    changed.insert(*fe);
                }
                (None, None) => {}
            }
        }
        if cold {
            self.desired.frontends = won.into_iter().collect();
        }
        for port in touched_health {
            let claims = self.health.get(port).map_or(&[][..], Few::as_slice);
            if claims.len() > 1 {
                self.contested_health.insert(*port);
            } else {
                self.contested_health.remove(port);
            }
            match claims.first() {
                Some(w) => {
                    let local_endpoints = w.res.health.map_or(0, |(_, n)| n);
                    self.desired.health_checks.insert(
                        *port,
                        HealthCheck {
                            service: (*w.res.id).clone(),
                            local_endpoints,
                        },
                    );
                }
                None => {
                    self.desired.health_checks.remove(port);
                }
            }
        }
        changed
    }

    /// Every problem of the current state: costs what is wrong, not what is there.
    fn errors(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        for _ in 0..self.service_objs.keyless() {
            errors.push(Error::MissingName { kind: "Service" });
        }
        for _ in 0..self.slice_objs.keyless() {
            errors.push(Error::MissingName {
                kind: "EndpointSlice",
            });
        }
        for id in &self.slices_with_errors {
            errors.extend(self.slices[id].1.iter().cloned());
        }
        dup_errors(
            "EndpointSlice",
            &self.duplicate_slices,
            &self.slice_objs,
            &mut errors,
        );
        for id in &self.services_with_errors {
            errors.extend(self.services[id].3.iter().cloned());
        }
        dup_errors(
            "Service",
            &self.duplicate_services,
            &self.service_objs,
            &mut errors,
        );
        for fe in &self.contested {
            let claims = self.claims[fe].as_slice();
            let winner = claims[0].id();
            for c in claims.iter().filter(|c| c.id() != winner) {
                let (_, _, addr_field, port_index) = &c.res.frontends[c.index];
                errors.push(Error::Conflict {
                    object: ObjectRef {
                        kind: "Service",
                        id: c.id().clone(),
                    },
                    field: format!("{addr_field} / spec.ports[{port_index}]"),
                    frontend: *fe,
                    winner: winner.clone(),
                });
            }
        }
        for port in &self.contested_health {
            let claims = self.health[port].as_slice();
            for c in &claims[1..] {
                errors.push(Error::HealthCheckConflict {
                    object: ObjectRef {
                        kind: "Service",
                        id: c.id().clone(),
                    },
                    port: *port,
                    winner: claims[0].id().clone(),
                });
            }
        }
        errors
    }
}

fn dup_errors<T>(
    kind: &'static str,
    ids: &BTreeSet<Id>,
    objs: &Tracked<T, Id>,
    errors: &mut Vec<Error>,
) {
    for id in ids {
        for _ in 1..objs.of(id).len().max(1) {
            errors.push(Error::Duplicate {
                object: ObjectRef {
                    kind,
                    id: (**id).clone(),
                },
            });
        }
    }
}

/// A slice's own namespace/name.
fn id_of_slice(s: &EndpointSlice) -> Option<Id> {
    ns_name(&s.metadata).map(Arc::new)
}

/// A Service's own namespace/name (the id its slices already share, when they came first).
fn id_of_service(s: &Service, by_service: &HashMap<Id, Few<Id>>) -> Option<Id> {
    let id = ns_name(&s.metadata)?;
    Some(match by_service.get_key_value(&id) {
        Some((k, _)) => k.clone(),
        None => Arc::new(id),
    })
}

/// A Service to resolve: its id, the object and its slice objects.
type Work = (Id, Arc<Service>, Vec<Arc<EndpointSlice>>);

/// Resolves each Service of `work` (its result, or `None`, and its problems), in parallel when
/// there are many (a cold start), merged in order.
fn resolve_parallel(work: &[Work], cfg: &Config) -> Vec<(Option<Arc<Kept>>, Vec<Error>)> {
    let one = |(id, svc, slices): &Work| {
        let mut errs = Vec::new();
        let Some(mut s) = resolve_service(svc, cfg, &mut errs) else {
            return (None, errs);
        };
        // The same name: the model's own id, so that the result and its frontends' states
        // share it rather than hold a copy each Service.
        debug_assert_eq!(*s.id, **id);
        s.id = id.clone();
        // The slices again (their problems were recorded when they were taken in, so this
        // pass's are dropped, and so is the name it would put in them).
        let unnamed = ObjectRef {
            kind: "EndpointSlice",
            id: NsName::default(),
        };
        let mut dropped = Vec::new();
        let resolved: Vec<Slice> = slices
            .iter()
            .filter_map(|o| resolve_slice(o, &unnamed, &mut dropped))
            .collect();
        let valid: Vec<&Slice> = resolved.iter().collect();
        let mut res = resolve_frontends(s, &valid, cfg, errs);
        let errs = std::mem::take(&mut res.errors);
        (Some(Arc::new(Kept::from(res))), errs)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(work.len().div_ceil(1024).max(1));
    if threads <= 1 {
        return work.iter().map(one).collect();
    }
    let per = work.len().div_ceil(threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = work
            .chunks(per)
            .map(|chunk| sc.spawn(move || chunk.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("model thread"))
            .collect()
    })
}
