//! Services + `EndpointSlices` → the desired set of frontends, each with its usable backends.
//!
//! This is where a Service becomes frontends (../shared/SEMANTICS.md, `ClusterIP` part). Pure: no
//! I/O, no maps. Bad input is reported per object/field and skipped; everything else is kept.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::Service,
    discovery::v1::{Endpoint, EndpointSlice},
};
use lb_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

/// Label on an `EndpointSlice` naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Node label naming its zone (`hints.forZones`).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Label asking a specific proxy to handle a Service; others must ignore it.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// `namespace/name` of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NsName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The object an error is about, e.g. `Service default/web`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub id: NsName,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}

/// A transport protocol a frontend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The IANA number stored in map keys.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
            Self::Sctp => IPPROTO_SCTP,
        }
    }

    /// Inverse of [`Proto::number`].
    #[must_use]
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Kubernetes spelling; `None` (unset) means TCP.
    fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Which clients a frontend entry is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Sockets of this node (pods and host processes): the socket hooks.
    #[default]
    InNode,
    /// Packets from outside the node: the TC program, externalTrafficPolicy applied.
    External,
}

impl Scope {
    /// The `scope` byte of a service-map key.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::InNode => lb_common::SCOPE_ALL,
            Self::External => lb_common::SCOPE_EXTERNAL,
        }
    }

    /// Inverse of [`Scope::number`].
    #[must_use]
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::SCOPE_ALL => Some(Self::InNode),
            lb_common::SCOPE_EXTERNAL => Some(Self::External),
            _ => None,
        }
    }
}

/// A frontend: what a client addresses, and for which clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )?;
        if self.scope == Scope::External {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}

/// A CIDR of `loadBalancerSourceRanges`, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::/n` strictly (addresses as [`parse_ip`]).
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (a, n) = s.trim().split_once('/').ok_or("missing /prefix")?;
        let addr = parse_ip(a)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = n.parse().map_err(|_| "bad prefix length")?;
        if prefix > max {
            return Err("prefix length too long for the family");
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
                IpAddr::from((u32::from(a) & m).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let m = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
                IpAddr::from((u128::from(a) & m).to_be_bytes())
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a frontend should lead to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendState {
    pub service: NsName,
    /// The service port's name ("" when unnamed).
    pub port_name: String,
    /// Usable backends (ready, else serving+terminating, within the traffic policy and
    /// topology); empty = REJECT, or DROP when `no_local`.
    pub backends: BTreeSet<SocketAddr>,
    /// internalTrafficPolicy Local with endpoints only on other nodes: DROP, not REJECT.
    pub no_local: bool,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
    /// Reached by an externalIP or LoadBalancer ingress IP rather than a ClusterIP. Such an
    /// address may be a real host's: only the Service's ports are translated, and no VIP marker
    /// makes its other ports refuse (unlike a ClusterIP, which is nothing but a VIP).
    pub external: bool,
    /// `127.0.0.1:<nodePort>`: translated for host processes only, never for pods.
    pub host_only: bool,
    /// The backends that are on this node (the packet path does not SNAT flows to them).
    pub local: BTreeSet<SocketAddr>,
    /// External scope, LoadBalancer IPs: `loadBalancerSourceRanges` of this family; empty =
    /// every client.
    pub source_ranges: BTreeSet<Cidr>,
    /// External scope: the size M of the Maglev table new flows choose their backend from
    /// (`--maglev-table-size`); 0 = a random slot.
    pub maglev: u32,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// healthCheckNodePort servers this node runs: port → what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// A LoadBalancer Service with externalTrafficPolicy Local, as its healthCheckNodePort
/// reports it (../shared/SEMANTICS.md, Health).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: NsName,
    /// Distinct ready endpoint addresses on this node.
    pub local_endpoints: usize,
}

/// What this node proxies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub ipv4: bool,
    pub ipv6: bool,
    /// Our `service.kubernetes.io/service-proxy-name`; Services labelled with another are ignored.
    pub proxy_name: Option<String>,
    /// This node's name (endpoint `nodeName`, `hints.forNodes`).
    pub node_name: String,
    /// This node's `topology.kubernetes.io/zone` label (`hints.forZones`), when known.
    pub zone: Option<String>,
    /// Addresses NodePorts are served on to in-node clients (plus `127.0.0.1` for host
    /// processes). Empty: only `127.0.0.1`.
    pub node_addresses: Vec<IpAddr>,
    /// Maglev table size for external-scope frontends (0 = random selection).
    pub maglev: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ipv4: true,
            ipv6: true,
            proxy_name: None,
            node_name: String::new(),
            zone: None,
            node_addresses: Vec::new(),
            maglev: 0,
        }
    }
}

/// A Node's primary addresses, as kube-proxy's default `--nodeport-addresses=primary` takes
/// them: the first InternalIP of each family, else the first ExternalIP of that family.
#[must_use]
pub fn primary_addresses(node: Option<&k8s_openapi::api::core::v1::Node>) -> Vec<IpAddr> {
    let addrs: Vec<(String, IpAddr)> = node
        .and_then(|n| n.status.as_ref()?.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a.type_.clone(), parse_ip(&a.address).ok()?)))
        .collect();
    let mut out = Vec::new();
    for v6 in [false, true] {
        let pick = |t: &str| {
            addrs
                .iter()
                .find(|(ty, ip)| ty == t && ip.is_ipv6() == v6)
                .map(|(_, ip)| *ip)
        };
        if let Some(ip) = pick("InternalIP").or_else(|| pick("ExternalIP")) {
            out.push(ip);
        }
    }
    out
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours), as the API server sets it.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Bad input, always naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{object}: {field}: invalid IP address {value:?}: {reason}")]
    BadAddress {
        object: ObjectRef,
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{object}: {field}: port {value} is outside 1-65535")]
    BadPort {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error("{object}: {field}: unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    BadProtocol {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value} is not an {expected} address")]
    WrongFamily {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: {frontend} is already served by Service {winner}; skipped")]
    Conflict {
        object: ObjectRef,
        field: String,
        frontend: Frontend,
        winner: NsName,
    },
    #[error("{object}: defined more than once; the first definition is used")]
    Duplicate { object: ObjectRef },
    #[error("{object}: {field}: {value} is outside 1-86400 seconds")]
    BadAffinityTimeout {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error(
        "{object}: spec.healthCheckNodePort: {port} is already used by Service {winner}; skipped"
    )]
    HealthCheckConflict {
        object: ObjectRef,
        port: u16,
        winner: NsName,
    },
    #[error("{object}: {field}: invalid CIDR {value:?}: {reason}; ignored")]
    BadCidr {
        object: ObjectRef,
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{kind} without metadata.name")]
    MissingName { kind: &'static str },
    #[error("{object}: {field}: {count} backends exceed the limit of {limit}; skipped")]
    TooManyBackends {
        object: ObjectRef,
        field: String,
        count: usize,
        limit: usize,
    },
}

/// Most backend slots a frontend can have (`SvcValue::count` is a `u16`).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// Parses an IP literal strictly: IPv4 with leading zeros is refused (CVE-2021-29923: `010.0.0.1`
/// must never mean 8.0.0.1 nor 10.0.0.1).
pub fn parse_ip(s: &str) -> Result<IpAddr, &'static str> {
    if !s.contains(':') && s.split('.').any(|o| o.len() > 1 && o.starts_with('0')) {
        return Err("IPv4 octet with a leading zero (ambiguous, CVE-2021-29923)");
    }
    s.parse::<IpAddr>().map_err(|_| "not an IP literal")
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<NsName> {
    Some(NsName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone()?,
    })
}

fn port_u16(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p != 0)
}

/// One `EndpointSlice` port, resolved.
#[derive(Debug)]
struct SlicePort {
    name: String,
    proto: Proto,
    port: u16,
}

/// An endpoint address with its conditions, resolved.
#[derive(Debug)]
struct Ep {
    addr: IpAddr,
    ready: bool,
    serving_terminating: bool,
    node: Option<String>,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// The parts of one valid `EndpointSlice` the model uses.
#[derive(Debug)]
struct Slice {
    v6: bool,
    ports: Vec<SlicePort>,
    endpoints: Vec<Ep>,
}

fn conditions(ep: &Endpoint) -> (bool, bool, bool) {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving, terminating)
}

fn resolve_slice(
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
                value: p.protocol.clone().unwrap_or_default(),
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
        let field = format!("endpoints[{i}].addresses[0]");
        let addr = match parse_ip(first) {
            Ok(a) => a,
            Err(reason) => {
                errors.push(Error::BadAddress {
                    object: object.clone(),
                    field,
                    value: first.clone(),
                    reason,
                });
                continue;
            }
        };
        if addr.is_ipv6() != v6 {
            errors.push(Error::WrongFamily {
                object: object.clone(),
                field,
                value: first.clone(),
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
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map_or_else(Vec::new, |z| z.iter().map(|z| z.name.clone()).collect()),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map_or_else(Vec::new, |n| n.iter().map(|n| n.name.clone()).collect()),
        });
    }
    Some(Slice {
        v6,
        ports,
        endpoints,
    })
}

/// A Service port, resolved.
#[derive(Debug)]
struct SvcPort {
    name: String,
    proto: Proto,
    port: u16,
    index: usize,
    /// `spec.ports[].nodePort` (NodePort and LoadBalancer Services).
    node_port: Option<u16>,
}

/// One address a Service is reached by.
#[derive(Debug)]
struct SvcAddr {
    ip: IpAddr,
    /// Where it came from, for error messages (`spec.clusterIPs[0]`, `spec.externalIPs[1]`, …).
    field: String,
    /// externalIPs / LoadBalancer ingress: not a cluster VIP (no marker, see FrontendState).
    external: bool,
    /// A LoadBalancer ingress IP (`loadBalancerSourceRanges` apply).
    lb: bool,
}

/// The frontend-relevant parts of one valid Service.
#[derive(Debug)]
struct Svc {
    id: NsName,
    created: Option<k8s_openapi::jiff::Timestamp>,
    /// ClusterIPs, then externalIPs, then LoadBalancer ingress IPs.
    addrs: Vec<SvcAddr>,
    ports: Vec<SvcPort>,
    /// internalTrafficPolicy: Local.
    local_only: bool,
    /// externalTrafficPolicy: Local.
    ext_local: bool,
    /// loadBalancerSourceRanges (valid ones).
    source_ranges: Vec<Cidr>,
    /// sessionAffinity ClientIP timeout (0 = none).
    affinity_timeout: u32,
    /// healthCheckNodePort (LoadBalancer Services with externalTrafficPolicy Local).
    health_check_port: Option<u16>,
}

/// healthCheckNodePort of a LoadBalancer Service with externalTrafficPolicy Local.
fn health_check_port(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Option<u16> {
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let raw = spec.health_check_node_port?;
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
fn affinity_timeout(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> u32 {
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
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
fn service_addrs(
    svc: &Service,
    raw_ips: &[String],
    field_ips: &str,
    cfg: &Config,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Vec<SvcAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    let mut add =
        |raw: &str, field: String, external: bool, errors: &mut Vec<Error>| match parse_ip(raw) {
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
                field,
                value: raw.to_owned(),
                reason,
            }),
        };
    for (i, raw) in raw_ips.iter().enumerate() {
        add(raw, format!("{field_ips}[{i}]"), false, errors);
    }
    for (i, raw) in spec.external_ips.iter().flatten().enumerate() {
        add(raw, format!("spec.externalIPs[{i}]"), true, errors);
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
                format!("status.loadBalancer.ingress[{i}].ip"),
                true,
                errors,
            );
        }
    }
    addrs
}

/// `spec.loadBalancerSourceRanges`, the valid ones (an invalid one is reported and ignored,
/// as kube-proxy does).
fn source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    object: &ObjectRef,
    errors: &mut Vec<Error>,
) -> Vec<Cidr> {
    let mut out = Vec::new();
    let ranges = spec.load_balancer_source_ranges.iter().flatten();
    for (i, raw) in ranges.enumerate() {
        match Cidr::parse(raw) {
            Ok(c) => out.push(c),
            Err(reason) => errors.push(Error::BadCidr {
                object: object.clone(),
                field: format!("spec.loadBalancerSourceRanges[{i}]"),
                value: raw.clone(),
                reason,
            }),
        }
    }
    out
}

fn resolve_service(svc: &Service, cfg: &Config, errors: &mut Vec<Error>) -> Option<Svc> {
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
    let raw_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
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
                value: p.protocol.clone().unwrap_or_default(),
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
    Some(Svc {
        id,
        created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        addrs,
        ports,
        local_only: spec.internal_traffic_policy.as_deref() == Some("Local"),
        ext_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        source_ranges,
        health_check_port: health_check_port(spec, &object, errors),
        affinity_timeout,
    })
}

/// One EndpointSlice, resolved once per object (kept while the object is unchanged).
#[derive(Debug)]
struct SliceRes {
    slice: Option<Slice>,
    errors: Vec<Error>,
}

/// One Service with its frontends, resolved once per (Service, slices) pair of objects.
#[derive(Debug)]
struct SvcRes {
    svc: Svc,
    /// (frontend, state, address field, `spec.ports` index) before conflict resolution.
    frontends: Vec<(Frontend, FrontendState, String, usize)>,
    /// (healthCheckNodePort, distinct ready local endpoint addresses).
    health: Option<(u16, usize)>,
    errors: Vec<Error>,
}

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
type SliceEntry = (Arc<EndpointSlice>, Arc<SliceRes>);
/// A Service object, the slice objects it was resolved with, and the result.
type SvcEntry = (Arc<Service>, Vec<Arc<EndpointSlice>>, Arc<SvcRes>);

/// Resolves one Service with its (valid) slices into frontends.
#[expect(
    clippy::too_many_lines,
    reason = "every frontend a Service yields (ClusterIP, external, NodePort; both scopes) in one place"
)]
fn resolve_frontends(svc: Svc, slices: &[&Slice], cfg: &Config, mut errors: Vec<Error>) -> SvcRes {
    let object = ObjectRef {
        kind: "Service",
        id: svc.id.clone(),
    };
    let mut frontends = Vec::new();
    let state = |sp: &SvcPort, sel: Selected, external, host_only| FrontendState {
        service: svc.id.clone(),
        port_name: sp.name.clone(),
        backends: sel.backends,
        no_local: sel.no_local,
        affinity_timeout: svc.affinity_timeout,
        external,
        host_only,
        local: sel.local,
        source_ranges: BTreeSet::new(),
        maglev: 0,
    };
    // The packet path: externalTrafficPolicy Local keeps this node's endpoints only (DROP
    // when they are all elsewhere), Cluster uses all (SEMANTICS.md).
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
            // an externalIP or LoadBalancer IP may use all endpoints (SEMANTICS.md).
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
            frontends.push((fe, st, addr.field.clone(), sp.index));
            if addr.external {
                let sel = sel_of(ip.is_ipv6(), svc.ext_local);
                let (fe, st) = external(sp, ip, sp.port, addr.lb, sel);
                frontends.push((fe, st, addr.field.clone(), sp.index));
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
            let field = format!("spec.ports[{}].nodePort", sp.index);
            frontends.push((fe, st, field.clone(), sp.index));
            if !host_only {
                let sel = sel_of(ip.is_ipv6(), svc.ext_local);
                let (fe, st) = external(sp, ip, np, false, sel);
                frontends.push((fe, st, field, sp.index));
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
    SvcRes {
        svc,
        frontends,
        health,
        errors,
    }
}

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
fn slices_phase(
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
fn services_phase(
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
type Resolved = Result<Arc<SvcRes>, Vec<Error>>;

/// A Service to resolve: the object, its slices, and its cached result when still valid.
type Work<'a> = (&'a Arc<Service>, &'a Vec<SliceEntry>, Option<Arc<SvcRes>>);

fn resolve_parallel(work: &[Work<'_>], cfg: &Config) -> Vec<Resolved> {
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
fn assemble(resolved: &[Arc<SvcRes>], errors: &mut Vec<Error>) -> Desired {
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

/// The backends a frontend uses.
#[derive(Clone)]
struct Selected {
    backends: BTreeSet<SocketAddr>,
    /// Those of `backends` on this node.
    local: BTreeSet<SocketAddr>,
    /// Local policy, endpoints only elsewhere: DROP.
    no_local: bool,
}

/// Topology filter decided from the endpoints' hints (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    Any,
    SameNode,
    SameZone,
}

/// Node hints when every ready endpoint has them and one is for this node; else zone hints on
/// the same terms; else none. Endpoints without hints make the hints meaningless.
fn topology(eps: &[(&Ep, u16)], cfg: &Config) -> Topology {
    let ready = || eps.iter().filter(|(e, _)| e.ready);
    if ready().next().is_none() {
        return Topology::Any;
    }
    if ready().all(|(e, _)| !e.node_hints.is_empty())
        && ready().any(|(e, _)| e.node_hints.contains(&cfg.node_name))
    {
        return Topology::SameNode;
    }
    if let Some(zone) = &cfg.zone
        && ready().all(|(e, _)| !e.zone_hints.is_empty())
        && ready().any(|(e, _)| e.zone_hints.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

fn allowed(e: &Ep, t: Topology, cfg: &Config) -> bool {
    match t {
        Topology::Any => true,
        Topology::SameNode => e.node_hints.contains(&cfg.node_name),
        Topology::SameZone => cfg.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    }
}

/// Usable backends of one service port for one address family, as kube-proxy's
/// `CategorizeEndpoints` picks them for ClusterIP traffic:
/// * Cluster policy: ready endpoints within the topology; if none is ready anywhere, serving and
///   terminating ones (KEP-1669).
/// * Local policy: this node's ready endpoints, else its serving and terminating ones; with
///   none here but some elsewhere the traffic is dropped (`no_local`).
fn select(slices: &[&Slice], v6: bool, sp: &SvcPort, local_only: bool, cfg: &Config) -> Selected {
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

#[cfg(test)]
mod tests;
