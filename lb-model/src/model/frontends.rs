//! One Service → its frontends: ClusterIPs, externalIPs, LoadBalancer IPs, NodePorts, with
//! affinity, source ranges and health checks.
use crate::k8s::core::Service;
use compact_str::format_compact;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::net::IpAddr;

use super::{
    Cidr, Config, DEFAULT_AFFINITY_TIMEOUT, Ep, Error, Frontend, FrontendState,
    LABEL_SERVICE_PROXY_NAME, MAX_BACKENDS, NsName, ObjectRef, Proto, Scope, Selected, Slice,
    ns_name, parse_ip, port_u16, select,
};

/// A Service port, resolved.
#[derive(Debug)]
pub(crate) struct SvcPort {
    pub(crate) name: crate::k8s::Str,
    pub(crate) proto: Proto,
    pub(crate) port: u16,
    pub(crate) index: usize,
    /// `spec.ports[].nodePort` (NodePort and LoadBalancer Services).
    pub(crate) node_port: Option<u16>,
}

/// One address a Service is reached by.
#[derive(Debug)]
pub(crate) struct SvcAddr {
    pub(crate) ip: IpAddr,
    /// Where it came from, for error messages (`spec.clusterIPs[0]`, `spec.externalIPs[1]`, …).
    /// (Shared with the frontends made from it.)
    pub(crate) field: crate::k8s::Str,
    /// externalIPs / LoadBalancer ingress: not a cluster VIP (no marker, see FrontendState).
    pub(crate) external: bool,
    /// A LoadBalancer ingress IP (`loadBalancerSourceRanges` apply).
    pub(crate) lb: bool,
}

/// The frontend-relevant parts of one valid Service.
#[derive(Debug)]
pub(crate) struct Svc {
    /// Shared with every frontend state of the Service.
    pub(crate) id: std::sync::Arc<NsName>,
    pub(crate) created: Option<k8s_openapi::jiff::Timestamp>,
    /// ClusterIPs, then externalIPs, then LoadBalancer ingress IPs.
    pub(crate) addrs: Vec<SvcAddr>,
    pub(crate) ports: Vec<SvcPort>,
    /// internalTrafficPolicy: Local.
    pub(crate) local_only: bool,
    /// externalTrafficPolicy: Local.
    pub(crate) ext_local: bool,
    /// loadBalancerSourceRanges (valid ones).
    pub(crate) source_ranges: Vec<Cidr>,
    /// sessionAffinity ClientIP timeout (0 = none).
    pub(crate) affinity_timeout: u32,
    /// healthCheckNodePort (LoadBalancer Services with externalTrafficPolicy Local).
    pub(crate) health_check_port: Option<u16>,
}

/// healthCheckNodePort of a LoadBalancer Service with externalTrafficPolicy Local.
pub(crate) fn health_check_port(
    spec: &crate::k8s::core::ServiceSpec,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Option<u16> {
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.more().external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let raw = spec.more().health_check_node_port?;
    let port = port_u16(raw);
    if port.is_none() {
        errors.push(Error::BadPort {
            object: object.clone(),
            field: "spec.healthCheckNodePort".into(),
            value: raw.into(),
        });
    }
    port
}

/// sessionAffinity ClientIP → timeout in seconds (0 = none). The API server defaults the
/// timeout to 10800 and validates 1–86400; a bad value is reported and the default used.
pub(crate) fn affinity_timeout(
    spec: &crate::k8s::core::ServiceSpec,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> u32 {
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .more()
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match t {
            None => DEFAULT_AFFINITY_TIMEOUT,
            Some(t) if (1..=86_400).contains(&t) => t as u32,
            Some(t) => {
                errors.push(Error::BadAffinityTimeout {
                    object: object.clone(),
                    field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    value: t.into(),
                });
                DEFAULT_AFFINITY_TIMEOUT
            }
        }
    } else {
        0
    }
}

/// The addresses a Service is reached by, in the families this node runs: its ClusterIPs, its
/// externalIPs and its LoadBalancer ingress IPs (ipMode VIP, the default). Bad ones are named.
pub(crate) fn service_addrs(
    svc: &Service,
    raw_ips: &[crate::k8s::Str],
    field_ips: &str,
    cfg: &Config,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Vec<SvcAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    let mut add = |raw: &str, field: crate::k8s::Str, external: bool, errors: &mut Vec<Error>| {
        match parse_ip(raw) {
            Ok(ip) if (ip.is_ipv4() && cfg.ipv4) || (ip.is_ipv6() && cfg.ipv6) => {
                let lb = field.starts_with("status.");
                addrs.push(SvcAddr {
                    ip,
                    field,
                    external,
                    lb,
                });
            }
            Ok(_) => {} // a family this node does not run
            Err(reason) => errors.push(Error::BadAddress {
                object: object.clone(),
                field: field.into(),
                value: raw.to_owned(),
                reason,
            }),
        }
    };
    for (i, raw) in raw_ips.iter().enumerate() {
        add(raw, format_compact!("{field_ips}[{i}]"), false, errors);
    }
    for (i, raw) in spec.more().external_ips.iter().flatten().enumerate() {
        add(raw, format_compact!("spec.externalIPs[{i}]"), true, errors);
    }
    // LoadBalancer ingress IPs with ipMode VIP (the default); ipMode Proxy means in-cluster
    // traffic to that IP must go to the load balancer, not be short-circuited.
    let ingress = svc
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        if let Some(raw) = &ing.ip
            && ing.ip_mode.as_deref() != Some("Proxy")
        {
            add(
                raw,
                format_compact!("status.loadBalancer.ingress[{i}].ip"),
                true,
                errors,
            );
        }
    }
    addrs
}

/// `spec.loadBalancerSourceRanges`, the valid ones (an invalid one is reported and ignored,
/// as kube-proxy does).
pub(crate) fn source_ranges(
    spec: &crate::k8s::core::ServiceSpec,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Vec<Cidr> {
    let mut out = Vec::new();
    let ranges = spec.more().load_balancer_source_ranges.iter().flatten();
    for (i, raw) in ranges.enumerate() {
        match Cidr::parse(raw) {
            Ok(c) => out.push(c),
            Err(reason) => errors.push(Error::BadCidr {
                object: object.clone(),
                field: format!("spec.loadBalancerSourceRanges[{i}]"),
                value: raw.to_string(),
                reason,
            }),
        }
    }
    out
}

pub(crate) fn resolve_service(svc: &Service, cfg: &Config, errors: &mut Vec<Error>) -> Option<Svc> {
    let Some(id) = ns_name(&svc.metadata) else {
        errors.push(Error::MissingName { kind: "Service" });
        return None;
    };
    let object = ObjectRef {
        kind: "Service",
        id: id.clone(),
    };
    if let Some(owner) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
        && cfg.proxy_name.as_deref() != Some(owner.as_str())
    {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let raw_ips: Vec<crate::k8s::Str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.to_vec(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => return None,
    };
    if raw_ips.iter().any(|ip| ip == "None") {
        return None; // headless
    }
    let field_ips = if spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty()) {
        "spec.clusterIPs"
    } else {
        "spec.clusterIP"
    };
    let addrs = service_addrs(svc, &raw_ips, field_ips, cfg, &object, errors);
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
            errors.push(Error::BadProtocol {
                object: object.clone(),
                field: format!("spec.ports[{i}].protocol"),
                value: p.protocol.clone().unwrap_or_default().into(),
            });
            continue;
        };
        let Some(port) = port_u16(p.port) else {
            errors.push(Error::BadPort {
                object: object.clone(),
                field: format!("spec.ports[{i}].port"),
                value: p.port.into(),
            });
            continue;
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) => {
                if let Some(np) = port_u16(np) {
                    Some(np)
                } else {
                    errors.push(Error::BadPort {
                        object: object.clone(),
                        field: format!("spec.ports[{i}].nodePort"),
                        value: np.into(),
                    });
                    None
                }
            }
        };
        ports.push(SvcPort {
            name: p.name.clone().unwrap_or_default(),
            proto,
            port,
            index: i,
            node_port,
        });
    }
    let affinity_timeout = affinity_timeout(spec, &object, errors);
    let source_ranges = source_ranges(spec, &object, errors);
    // Kept for as long as the Service is: exactly as long as they are (a vector pushed to
    // has room for 4).
    let (mut addrs, mut ports) = (addrs, ports);
    addrs.shrink_to_fit();
    ports.shrink_to_fit();
    Some(Svc {
        id: std::sync::Arc::new(id),
        created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        addrs,
        ports,
        local_only: spec.internal_traffic_policy.as_deref() == Some("Local"),
        ext_local: spec.more().external_traffic_policy.as_deref() == Some("Local"),
        source_ranges,
        health_check_port: health_check_port(spec, &object, errors),
        affinity_timeout,
    })
}

/// A frontend a Service claims: (frontend, state, address field, `spec.ports` index).
pub(crate) type Claimed = (
    Frontend,
    std::sync::Arc<FrontendState>,
    crate::k8s::Str,
    usize,
);

/// One Service with its frontends, resolved once per (Service, slices) pair of objects.
#[derive(Debug)]
pub(crate) struct SvcRes {
    pub(crate) svc: Svc,
    /// (frontend, state, address field, `spec.ports` index) before conflict resolution.
    pub(crate) frontends: Vec<Claimed>,
    /// (healthCheckNodePort, distinct ready local endpoint addresses).
    pub(crate) health: Option<(u16, usize)>,
    pub(crate) errors: Vec<Error>,
}

/// Resolves one Service with its (valid) slices into frontends.
#[expect(
    clippy::too_many_lines,
    reason = "every frontend a Service yields (ClusterIP, external, NodePort; both scopes) in one place"
)]
pub(crate) fn resolve_frontends(
    svc: Svc,
    slices: &[&Slice],
    cfg: &Config,
    mut errors: Vec<Error>,
) -> SvcRes {
    let object = ObjectRef {
        kind: "Service",
        id: (*svc.id).clone(),
    };
    let mut frontends = Vec::new();
    let state = |sp: &SvcPort, sel: Selected, external, host_only| FrontendState {
        service: svc.id.clone(),
        port_name: sp.name.clone(),
        backends: sel.backends.into(),
        no_local: sel.no_local,
        affinity_timeout: svc.affinity_timeout,
        external,
        host_only,
        node_dns: !external
            && sp.port == 53
            && matches!(sp.proto, Proto::Tcp | Proto::Udp)
            && cfg.node_dns.as_ref() == Some(&*svc.id),
        local: sel.local.into(),
        source_ranges: BTreeSet::new(),
        maglev: 0,
    };
    // The packet path: externalTrafficPolicy Local keeps this node's endpoints only (DROP
    // when they are all elsewhere), Cluster uses all (docs/semantics.md).
    let external = |sp: &SvcPort, ip: IpAddr, port: u16, lb: bool, sel: Selected| {
        let fe = Frontend {
            addr: ip,
            port,
            proto: sp.proto,
            scope: Scope::External,
        };
        let mut st = state(sp, sel, true, false);
        st.maglev = cfg.maglev;
        if lb {
            // kube-proxy applies each family's ranges to that family's LB IPs; a family
            // without ranges is open.
            st.source_ranges = svc
                .source_ranges
                .iter()
                .filter(|c| c.addr.is_ipv6() == ip.is_ipv6())
                .copied()
                .collect();
        }
        (fe, st)
    };
    for sp in &svc.ports {
        // A port's selection depends only on the family and the policy, not on the address:
        // computed once each and shared by every frontend of the port.
        let mut memo: HashMap<(bool, bool), Selected> = HashMap::new();
        let mut sel_of = |v6: bool, local_only: bool| {
            memo.entry((v6, local_only))
                .or_insert_with(|| select(slices, v6, sp, local_only, cfg))
                .clone()
        };
        for addr in &svc.addrs {
            let ip = addr.ip;
            // internalTrafficPolicy governs ClusterIP traffic only: in-cluster clients going to
            // an externalIP or LoadBalancer IP may use all endpoints (docs/semantics.md).
            let sel = sel_of(ip.is_ipv6(), svc.local_only && !addr.external);
            if sel.backends.len() > MAX_BACKENDS {
                errors.push(Error::TooManyBackends {
                    object: object.clone(),
                    field: format!("spec.ports[{}]", sp.index),
                    count: sel.backends.len(),
                    limit: MAX_BACKENDS,
                });
                continue;
            }
            let fe = Frontend {
                addr: ip,
                port: sp.port,
                proto: sp.proto,
                scope: Scope::InNode,
            };
            let st = state(sp, sel, addr.external, false);
            frontends.push((fe, st.into(), addr.field.clone(), sp.index));
            if addr.external {
                let sel = sel_of(ip.is_ipv6(), svc.ext_local);
                let (fe, st) = external(sp, ip, sp.port, addr.lb, sel);
                frontends.push((fe, st.into(), addr.field.clone(), sp.index));
            }
        }
        // NodePort for in-node clients: each node address, and 127.0.0.1 for host processes.
        let Some(np) = sp.node_port else { continue };
        let node_addrs = cfg
            .node_addresses
            .iter()
            .filter(|ip| (ip.is_ipv4() && cfg.ipv4) || (ip.is_ipv6() && cfg.ipv6));
        let loopback = cfg.ipv4.then_some(IpAddr::from([127, 0, 0, 1]));
        for (ip, host_only) in node_addrs
            .map(|ip| (*ip, false))
            .chain(loopback.map(|ip| (ip, true)))
        {
            // From inside the node, a NodePort leads to all usable endpoints, whatever the
            // external traffic policy (kube-proxy sends locally-originated traffic to the
            // cluster-wide endpoints too).
            let sel = sel_of(ip.is_ipv6(), false);
            if sel.backends.len() > MAX_BACKENDS {
                continue; // reported for the ClusterIP frontend of the same port
            }
            let fe = Frontend {
                addr: ip,
                port: np,
                proto: sp.proto,
                scope: Scope::InNode,
            };
            let st = state(sp, sel, true, host_only);
            let field = format_compact!("spec.ports[{}].nodePort", sp.index);
            frontends.push((fe, st.into(), field.clone(), sp.index));
            if !host_only {
                let sel = sel_of(ip.is_ipv6(), svc.ext_local);
                let (fe, st) = external(sp, ip, np, false, sel);
                frontends.push((fe, st.into(), field, sp.index));
            }
        }
    }
    let health = svc.health_check_port.map(|port| {
        let here = |e: &&Ep| e.ready && e.node.as_deref() == Some(cfg.node_name.as_str());
        let local: BTreeSet<IpAddr> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter().filter(here).map(|e| e.addr))
            .collect();
        (port, local.len())
    });
    frontends.shrink_to_fit();
    SvcRes {
        svc,
        frontends,
        health,
        errors,
    }
}
