//! EndpointSlices → endpoints with conditions; which endpoints a frontend uses (readiness,
//! terminating fallback, traffic policy, topology hints).
use crate::k8s::discovery::Endpoint;
use crate::k8s::discovery::EndpointSlice;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::net::SocketAddr;

use super::{Config, Error, ObjectRef, Proto, SvcPort, parse_ip, port_u16};

/// One `EndpointSlice` port, resolved.
#[derive(Debug)]
pub(crate) struct SlicePort {
    pub(crate) name: crate::k8s::Str,
    pub(crate) proto: Proto,
    pub(crate) port: u16,
}

/// An endpoint address with its conditions, resolved.
#[derive(Debug)]
pub(crate) struct Ep {
    pub(crate) addr: IpAddr,
    pub(crate) ready: bool,
    pub(crate) serving_terminating: bool,
    pub(crate) node: Option<crate::k8s::Str>,
    /// Topology hints, when the endpoint has any (most have none: boxed).
    pub(crate) hints: Option<Box<Hints>>,
}

/// An endpoint's `hints.forZones` and `hints.forNodes` names.
#[derive(Debug)]
pub(crate) struct Hints {
    zones: Vec<crate::k8s::Str>,
    nodes: Vec<crate::k8s::Str>,
}

impl Ep {
    pub(crate) fn zone_hints(&self) -> &[crate::k8s::Str] {
        self.hints.as_ref().map_or(&[], |h| &h.zones)
    }

    pub(crate) fn node_hints(&self) -> &[crate::k8s::Str] {
        self.hints.as_ref().map_or(&[], |h| &h.nodes)
    }
}

/// The parts of one valid `EndpointSlice` the model uses.
#[derive(Debug)]
pub(crate) struct Slice {
    pub(crate) v6: bool,
    pub(crate) ports: Vec<SlicePort>,
    pub(crate) endpoints: Vec<Ep>,
}

pub(crate) fn conditions(ep: &Endpoint) -> (bool, bool, bool) {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving, terminating)
}

pub(crate) fn resolve_slice(
    slice: &EndpointSlice,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Option<Slice> {
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return None, // FQDN slices are not proxied.
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
            errors.push(Error::BadProtocol {
                object: object.clone(),
                field: format!("ports[{i}].protocol"),
                value: p.protocol.clone().unwrap_or_default().into(),
            });
            continue;
        };
        // A slice port without a number means "all ports" for selector-less services; kube-proxy
        // ignores it for proxying.
        let Some(raw) = p.port else { continue };
        let Some(port) = port_u16(raw) else {
            errors.push(Error::BadPort {
                object: object.clone(),
                field: format!("ports[{i}].port"),
                value: raw.into(),
            });
            continue;
        };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            proto,
            port,
        });
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(first) = ep.addresses.first() else {
            continue;
        };
        let field = || format!("endpoints[{i}].addresses[0]");
        let addr = match parse_ip(first) {
            Ok(a) => a,
            Err(reason) => {
                errors.push(Error::BadAddress {
                    object: object.clone(),
                    field: field(),
                    value: first.to_string(),
                    reason,
                });
                continue;
            }
        };
        if addr.is_ipv6() != v6 {
            errors.push(Error::WrongFamily {
                object: object.clone(),
                field: field(),
                value: first.to_string(),
                expected: if v6 { "IPv6" } else { "IPv4" },
            });
            continue;
        }
        let (ready, serving, terminating) = conditions(ep);
        let hints = ep.hints.as_ref();
        endpoints.push(Ep {
            addr,
            ready,
            serving_terminating: serving && terminating,
            node: ep.node_name.clone(),
            hints: hints.map(|h| {
                Box::new(Hints {
                    zones: h
                        .for_zones
                        .iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    nodes: h
                        .for_nodes
                        .iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                })
            }),
        });
    }
    Some(Slice {
        v6,
        ports,
        endpoints,
    })
}

/// The backends a frontend uses.
#[derive(Clone)]
pub(crate) struct Selected {
    pub(crate) backends: BTreeSet<SocketAddr>,
    /// Those of `backends` on this node.
    pub(crate) local: BTreeSet<SocketAddr>,
    /// Local policy, endpoints only elsewhere: DROP.
    pub(crate) no_local: bool,
}

/// Topology filter decided from the endpoints' hints (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topology {
    Any,
    SameNode,
    SameZone,
}

/// Node hints when every ready endpoint has them and one is for this node; else zone hints on
/// the same terms; else none. Endpoints without hints make the hints meaningless.
pub(crate) fn topology(eps: &[(&Ep, u16)], cfg: &Config) -> Topology {
    let ready = || eps.iter().filter(|(e, _)| e.ready);
    if ready().next().is_none() {
        return Topology::Any;
    }
    if ready().all(|(e, _)| !e.node_hints().is_empty())
        && ready().any(|(e, _)| has(e.node_hints(), &cfg.node_name))
    {
        return Topology::SameNode;
    }
    if let Some(zone) = &cfg.zone
        && ready().all(|(e, _)| !e.zone_hints().is_empty())
        && ready().any(|(e, _)| has(e.zone_hints(), zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

/// Does a hint list name `name`?
fn has(hints: &[crate::k8s::Str], name: &str) -> bool {
    hints.iter().any(|h| h == name)
}

pub(crate) fn allowed(e: &Ep, t: Topology, cfg: &Config) -> bool {
    match t {
        Topology::Any => true,
        Topology::SameNode => has(e.node_hints(), &cfg.node_name),
        Topology::SameZone => cfg.zone.as_ref().is_some_and(|z| has(e.zone_hints(), z)),
    }
}

/// Usable backends of one service port for one address family, as kube-proxy's
/// `CategorizeEndpoints` picks them for ClusterIP traffic:
/// * Cluster policy: ready endpoints within the topology; if none is ready anywhere, serving and
///   terminating ones (KEP-1669).
/// * Local policy: this node's ready endpoints, else its serving and terminating ones; with
///   none here but some elsewhere the traffic is dropped (`no_local`).
pub(crate) fn select(
    slices: &[&Slice],
    v6: bool,
    sp: &SvcPort,
    local_only: bool,
    cfg: &Config,
) -> Selected {
    let mut eps: Vec<(&Ep, u16)> = Vec::new();
    for s in slices.iter().filter(|s| s.v6 == v6) {
        for p in s
            .ports
            .iter()
            .filter(|p| p.name == sp.name && p.proto == sp.proto)
        {
            eps.extend(s.endpoints.iter().map(|e| (e, p.port)));
        }
    }
    let here = |e: &Ep| e.node.as_deref() == Some(cfg.node_name.as_str());
    let pick = |f: &dyn Fn(&Ep) -> bool| -> BTreeSet<SocketAddr> {
        eps.iter()
            .filter(|(e, _)| f(e))
            .map(|(e, port)| SocketAddr::new(e.addr, *port))
            .collect()
    };
    if local_only {
        let mut backends = pick(&|e| e.ready && here(e));
        if backends.is_empty() {
            backends = pick(&|e| e.serving_terminating && here(e));
        }
        let no_local =
            backends.is_empty() && eps.iter().any(|(e, _)| e.ready || e.serving_terminating);
        let local = backends.clone();
        return Selected {
            backends,
            local,
            no_local,
        };
    }
    let t = topology(&eps, cfg);
    let mut backends = pick(&|e| e.ready && allowed(e, t, cfg));
    if backends.is_empty() {
        backends = pick(&|e| e.serving_terminating && allowed(e, t, cfg));
    }
    // An address can only be an endpoint on one node: those of `backends` whose endpoint is
    // here.
    let local = eps
        .iter()
        .filter(|(e, _)| here(e))
        .map(|(e, port)| SocketAddr::new(e.addr, *port))
        .filter(|a| backends.contains(a))
        .collect();
    Selected {
        local,
        backends,
        no_local: false,
    }
}
