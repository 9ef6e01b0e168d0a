//! The whole desired state from all Services and slices: per-object cache, parallel
//! resolution, conflicts between Services (oldest wins).
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::HashMap;
use std::sync::Arc;

use super::{
    Config, Desired, Error, HealthCheck, LABEL_SERVICE_NAME, NsName, ObjectRef, Slice, SliceRes,
    SvcRes, ns_name, resolve_frontends, resolve_service, resolve_slice,
};

/// Results of the previous build, reused for objects that are the very same (`Arc::ptr_eq`):
/// a source hands out the same `Arc` for an object until it changes (kube-rs stores; the
/// manifest source for unchanged files). The cache holds the `Arc`s, so an address can never be
/// reused by another object while an entry refers to it. Entries not used by a build are
/// dropped; a change of [`Config`] (say, the node's zone) empties it.
#[derive(Debug, Default)]
pub struct Cache {
    cfg: Option<Config>,
    slices: HashMap<NsName, SliceEntry>,
    services: HashMap<NsName, SvcEntry>,
}

/// A slice object and what it resolved to.
pub(crate) type SliceEntry = (Arc<EndpointSlice>, Arc<SliceRes>);
/// A Service object, the slice objects it was resolved with, and the result.
pub(crate) type SvcEntry = (Arc<Service>, Vec<Arc<EndpointSlice>>, Arc<SvcRes>);

/// Builds the desired state. Returns it with every problem found; a problem only ever removes
/// the object (or endpoint, or port) it is about. `cache` carries per-object results from one
/// build to the next (pass `&mut Cache::default()` for a one-off build).
pub fn build(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    cfg: &Config,
    cache: &mut Cache,
) -> (Desired, Vec<Error>) {
    if cache.cfg.as_ref() != Some(cfg) {
        *cache = Cache {
            cfg: Some(cfg.clone()),
            ..Cache::default()
        };
    }
    let mut errors = Vec::new();
    let (next_slices, by_service) = slices_phase(slices, cache, &mut errors);
    let (next_services, mut resolved) =
        services_phase(services, &by_service, cfg, cache, &mut errors);
    cache.slices = next_slices;
    cache.services = next_services;
    // `None` timestamps sort last: an object without one cannot prove it is older.
    resolved.sort_by(|a, b| {
        let (a, b) = (&a.svc, &b.svc);
        (a.created.is_none(), a.created, &a.id).cmp(&(b.created.is_none(), b.created, &b.id))
    });

    let desired = assemble(&resolved, &mut errors);
    (desired, errors)
}

/// Slices: deduplicated, resolved (or taken from the cache), grouped by their Service.
pub(crate) fn slices_phase(
    slices: &[Arc<EndpointSlice>],
    cache: &Cache,
    errors: &mut Vec<Error>,
) -> (
    HashMap<NsName, SliceEntry>,
    HashMap<NsName, Vec<SliceEntry>>,
) {
    let mut next_slices = HashMap::with_capacity(slices.len());
    let mut by_service: HashMap<NsName, Vec<SliceEntry>> = HashMap::new();
    for slice in slices {
        let Some(id) = ns_name(&slice.metadata) else {
            errors.push(Error::MissingName {
                kind: "EndpointSlice",
            });
            continue;
        };
        if next_slices.contains_key(&id) {
            errors.push(Error::Duplicate {
                object: ObjectRef {
                    kind: "EndpointSlice",
                    id,
                },
            });
            continue;
        }
        let Some(svc_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue; // not managed for a Service
        };
        let res = match cache.slices.get(&id) {
            Some((a, r)) if Arc::ptr_eq(a, slice) => r.clone(),
            _ => {
                let mut errs = Vec::new();
                let object = ObjectRef {
                    kind: "EndpointSlice",
                    id: id.clone(),
                };
                let slice_res = resolve_slice(slice, &object, &mut errs);
                Arc::new(SliceRes {
                    slice: slice_res,
                    errors: errs,
                })
            }
        };
        errors.extend(res.errors.iter().cloned());
        by_service
            .entry(NsName {
                namespace: id.namespace.clone(),
                name: svc_name.clone(),
            })
            .or_default()
            .push((slice.clone(), res.clone()));
        next_slices.insert(id, (slice.clone(), res));
    }

    (next_slices, by_service)
}

/// Services: resolved with their slices (or taken from the cache).
pub(crate) fn services_phase(
    services: &[Arc<Service>],
    by_service: &HashMap<NsName, Vec<SliceEntry>>,
    cfg: &Config,
    cache: &Cache,
    errors: &mut Vec<Error>,
) -> (HashMap<NsName, SvcEntry>, Vec<Arc<SvcRes>>) {
    let mut next_services = HashMap::with_capacity(services.len());
    let mut resolved: Vec<Arc<SvcRes>> = Vec::new();
    let empty = Vec::new();
    // Each Service with its slices, and its cached result when the objects are the same.
    let work: Vec<Work<'_>> = services
        .iter()
        .map(|svc| {
            let mine = ns_name(&svc.metadata)
                .and_then(|id| by_service.get(&id))
                .unwrap_or(&empty);
            let cached = ns_name(&svc.metadata)
                .and_then(|id| cache.services.get(&id))
                .filter(|(a, sl, _)| {
                    Arc::ptr_eq(a, svc)
                        && sl.len() == mine.len()
                        && sl.iter().zip(mine).all(|(x, (y, _))| Arc::ptr_eq(x, y))
                })
                .map(|(_, _, r)| r.clone());
            (svc, mine, cached)
        })
        .collect();
    // The rest resolved in parallel (pure per object), one chunk per CPU; merged in order.
    let fresh = resolve_parallel(&work, cfg);
    for ((svc, mine, cached), fresh) in work.iter().zip(fresh) {
        let res = match (cached, fresh) {
            (Some(r), _) => r.clone(),
            (None, Ok(r)) => r,
            (None, Err(errs)) => {
                errors.extend(errs);
                continue;
            }
        };
        errors.extend(res.errors.iter().cloned());
        if next_services.contains_key(&res.svc.id) {
            errors.push(Error::Duplicate {
                object: ObjectRef {
                    kind: "Service",
                    id: res.svc.id.clone(),
                },
            });
            continue;
        }
        let slice_arcs: Vec<Arc<EndpointSlice>> = mine.iter().map(|(a, _)| a.clone()).collect();
        next_services.insert(
            res.svc.id.clone(),
            ((*svc).clone(), slice_arcs, res.clone()),
        );
        resolved.push(res);
    }
    (next_services, resolved)
}

/// Resolution of the entries of `work` without a cached result (`Ok` for cached ones is never
/// read): `Err` carries the errors of a Service that resolved to nothing.
pub(crate) type Resolved = Result<Arc<SvcRes>, Vec<Error>>;

/// A Service to resolve: the object, its slices, and its cached result when still valid.
pub(crate) type Work<'a> = (&'a Arc<Service>, &'a Vec<SliceEntry>, Option<Arc<SvcRes>>);

pub(crate) fn resolve_parallel(work: &[Work<'_>], cfg: &Config) -> Vec<Resolved> {
    let one = |(svc, mine, cached): &Work<'_>| {
        if cached.is_some() {
            return Err(Vec::new());
        }
        let mut errs = Vec::new();
        let Some(s) = resolve_service(svc, cfg, &mut errs) else {
            return Err(errs);
        };
        let valid: Vec<&Slice> = mine.iter().filter_map(|(_, r)| r.slice.as_ref()).collect();
        Ok(Arc::new(resolve_frontends(s, &valid, cfg, errs)))
    };
    let todo = work.iter().filter(|w| w.2.is_none()).count();
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(todo.div_ceil(1024).max(1));
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

/// Frontends of the resolved Services, oldest Service first; later claimants of a frontend are
/// reported, never served.
pub(crate) fn assemble(resolved: &[Arc<SvcRes>], errors: &mut Vec<Error>) -> Desired {
    let mut desired = Desired::default();
    for res in resolved {
        let svc = &res.svc;
        for (fe, st, addr_field, port_index) in &res.frontends {
            if let Some(winner) = desired.frontends.get(fe) {
                if winner.service != svc.id {
                    errors.push(Error::Conflict {
                        object: ObjectRef {
                            kind: "Service",
                            id: svc.id.clone(),
                        },
                        field: format!("{addr_field} / spec.ports[{port_index}]"),
                        frontend: *fe,
                        winner: winner.service.clone(),
                    });
                }
                continue;
            }
            desired.frontends.insert(*fe, st.clone());
        }
        if let Some((port, local_endpoints)) = res.health {
            match desired.health_checks.get(&port) {
                Some(winner) => errors.push(Error::HealthCheckConflict {
                    object: ObjectRef {
                        kind: "Service",
                        id: svc.id.clone(),
                    },
                    port,
                    winner: winner.service.clone(),
                }),
                None => {
                    desired.health_checks.insert(
                        port,
                        HealthCheck {
                            service: svc.id.clone(),
                            local_endpoints,
                        },
                    );
                }
            }
        }
    }
    desired
}
