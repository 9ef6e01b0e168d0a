//! What kube-apiserver allocates for a Service, done on the node: ClusterIPs from the service
//! CIDRs, NodePorts (and `healthCheckNodePort`) from the node-port range, and — what a cloud's
//! load-balancer controller would do — LoadBalancer ingress IPs from `--lb-ip-pool`.
//!
//! Allocations are stable for a Service's lifetime, across re-reads and restarts: they are
//! recorded in a [`State`] the agent keeps in a file, and each pass goes
//! 1. **explicit** values (`clusterIP(s)`, `nodePort`, `healthCheckNodePort`, `loadBalancerIP`),
//!    oldest Service first: the upstream errors for one out of range or already taken, and the
//!    Service is skipped (an API server would have refused to create it);
//! 2. right after each Service's explicit values, what it had **recorded**: so an incumbent's
//!    allocation is taken before any younger Service's request and never moves;
//! 3. **new** values, Services in namespace/name order, each search starting at a hash of the
//!    Service's name (so fresh allocations are reproducible), in the upper ("dynamic") band of
//!    the range first, as upstream: the lowest min(max(16, size/16), 256) addresses and
//!    min(max(16, size/32), 128) ports are the "static" band, left for explicit requests.
//!
//! A Service that is gone releases everything it held.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::k8s::core::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};

use super::{Error, fnv1a};
use crate::model::{Cidr, NsName, ObjectRef, parse_ip};

/// Default `--service-cidr` (kubeadm's IPv4 default, kind's IPv6 one).
pub const DEFAULT_SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/12", "fd00:10:96::/112"];
/// Default `--service-node-port-range`.
pub const DEFAULT_NODE_PORTS: (u16, u16) = (30_000, 32_767);
/// Annotations asking for LoadBalancer IPs (MetalLB's, Cilium LB-IPAM's), besides the
/// deprecated `spec.loadBalancerIP`.
pub const LB_IP_ANNOTATIONS: [&str; 3] = [
    "metallb.io/loadBalancerIPs",
    "metallb.universe.tf/loadBalancerIPs",
    "lbipam.cilium.io/ips",
];
/// At most this many addresses of a (large IPv6) range are used, as upstream caps its bitmap.
const MAX_RANGE: u128 = 1 << 20;

/// An inclusive range of addresses of one family: a CIDR or `first-last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from(v.to_be_bytes())
    } else {
        IpAddr::from((v as u32).to_be_bytes())
    }
}

impl IpRange {
    /// `a.b.c.d/n`, `x::/n` (every address of the prefix) or `first-last` (same family).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some((a, b)) = s.split_once('-') {
            let first = parse_ip(a.trim()).map_err(|r| format!("{a:?}: {r}"))?;
            let last = parse_ip(b.trim()).map_err(|r| format!("{b:?}: {r}"))?;
            if first.is_ipv6() != last.is_ipv6() || to_u128(first) > to_u128(last) {
                return Err(format!("{s:?}: not a range of one family, low to high"));
            }
            return Ok(Self { first, last });
        }
        let c = Cidr::parse(s).map_err(|r| format!("{s:?}: {r}"))?;
        let bits = if c.addr.is_ipv6() { 128 } else { 32 };
        let host = u32::from(bits - c.prefix);
        let span = 1u128.checked_shl(host).map_or(u128::MAX, |v| v - 1);
        Ok(Self {
            first: c.addr,
            last: from_u128(to_u128(c.addr) + span, c.addr.is_ipv6()),
        })
    }

    fn v6(&self) -> bool {
        self.first.is_ipv6()
    }

    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.v6()
            && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(ip))
    }

    /// Addresses in the range (at most 2^20 are used).
    #[must_use]
    pub fn size(&self) -> u128 {
        (to_u128(self.last) - to_u128(self.first) + 1).min(MAX_RANGE)
    }

    fn nth(&self, i: u128) -> IpAddr {
        from_u128(to_u128(self.first) + i, self.v6())
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The allocatable addresses of a service CIDR, as upstream's ipallocator: the network address
/// is never handed out, nor (IPv4) the broadcast address.
fn service_range(c: &Cidr) -> IpRange {
    let all = IpRange::parse(&c.to_string()).expect("a Cidr prints as a valid CIDR");
    let v6 = c.addr.is_ipv6();
    let (lo, hi) = (to_u128(all.first), to_u128(all.last));
    if hi - lo < 2 {
        return all; // /31, /32, /127, /128: nothing to spare
    }
    IpRange {
        first: from_u128(lo + 1, v6),
        last: from_u128(if v6 { hi } else { hi - 1 }, v6),
    }
}

/// What the control plane allocates from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges {
    /// Service CIDRs, at most one per family, the cluster's primary family first.
    pub service_cidrs: Vec<Cidr>,
    /// `--service-cidr` was given: requested ClusterIPs must then be inside it (with the
    /// default, a dump of a cluster with another range loads as it is).
    pub check_cluster_ips: bool,
    pub node_ports: (u16, u16),
    /// `--lb-ip-pool`; empty: LoadBalancer Services stay pending, as on a cluster with no cloud.
    pub lb_pools: Vec<IpRange>,
}

impl Default for Ranges {
    fn default() -> Self {
        Self {
            service_cidrs: DEFAULT_SERVICE_CIDRS
                .iter()
                .map(|c| Cidr::parse(c).expect("valid default CIDR"))
                .collect(),
            check_cluster_ips: false,
            node_ports: DEFAULT_NODE_PORTS,
            lb_pools: Vec::new(),
        }
    }
}

/// What one Service was given: recorded in the state file, keyed by `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
    /// `<port>/<protocol>` → nodePort.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    #[serde(
        default,
        rename = "loadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_ips: Vec<IpAddr>,
}

/// Every allocation, as persisted (`--state-file`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Layout version of this file.
    pub version: u32,
    /// `namespace/name` → what that Service holds.
    pub services: BTreeMap<String, Record>,
}

/// Current layout of [`State`].
pub const STATE_VERSION: u32 = 1;

/// One value a Service needs: its slot (family, port) and what it asks for.
struct Need<T> {
    /// Record key / hash input: `v4`, `80/TCP`, `health`.
    key: String,
    /// Field for messages.
    field: String,
    requested: Option<T>,
    value: Option<T>,
}

/// A Service's needs, worked out before anything is claimed.
pub(crate) struct Plan {
    id: NsName,
    object: ObjectRef,
    /// One per ClusterIP family, in `spec.ipFamilies` order.
    cluster: Vec<(bool, Need<IpAddr>)>,
    /// One per service port that gets a nodePort: (port index, port number, need).
    node_ports: Vec<(usize, i32, Need<u16>)>,
    health: Option<Need<u16>>,
    /// LoadBalancer without status: one per family wanted.
    lb: Vec<(bool, Need<IpAddr>)>,
    lb_pending: bool,
}

/// Owners of taken values.
#[derive(Default)]
struct Taken {
    ips: HashMap<IpAddr, NsName>,
    ports: HashMap<u16, NsName>,
    lb: HashMap<IpAddr, NsName>,
}

/// The outcome of one allocation run.
pub(crate) struct Allocated {
    /// Services that may be served, in input order: (id, input, what was allocated for it
    /// — `None`: nothing to allocate, serve the input as it is —, its record). [`apply`] makes
    /// the allocated copy, for the caller to do only when its cached copy is stale.
    pub(crate) services: Vec<(NsName, Arc<Service>, Option<Plan>, Record)>,
    pub(crate) state: State,
}

fn band(size: u128, div: u128, max: u128) -> u128 {
    (size / div).clamp(16, max).min(size)
}

/// The first free value from a hash start, upper band first, then the static band.
fn search(size: u128, static_band: u128, seed: u64, free: impl Fn(u128) -> bool) -> Option<u128> {
    let dynamic = size - static_band;
    let scan = |base: u128, len: u128| {
        if len == 0 {
            return None;
        }
        let start = u128::from(seed) % len;
        (0..len)
            .map(|i| base + (start + i) % len)
            .find(|&o| free(o))
    };
    scan(static_band, dynamic).or_else(|| scan(0, static_band))
}

fn family_name(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Works out what a Service needs; `Err` = the Service is invalid as written.
#[expect(
    clippy::too_many_lines,
    reason = "every field an API server allocates, in one place"
)]
fn plan(svc: &Service, id: &NsName, ranges: &Ranges) -> Result<Option<Plan>, Vec<Error>> {
    let object = ObjectRef {
        kind: "Service",
        id: id.clone(),
    };
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        return Ok(None);
    }
    let invalid = |field: String, value: String, reason: String| Error::Invalid {
        object: object.clone(),
        field,
        value,
        reason,
    };
    let mut errors = Vec::new();
    // Requested ClusterIPs.
    let (field, raw): (&str, Vec<crate::k8s::Str>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(v), _) if !v.is_empty() => ("spec.clusterIPs", v.to_vec()),
        (_, Some(ip)) if !ip.is_empty() => ("spec.clusterIP", vec![ip.clone()]),
        _ => ("spec.clusterIPs", Vec::new()),
    };
    let headless = raw.first().is_some_and(|ip| ip == "None");
    let mut requested: Vec<IpAddr> = Vec::new();
    if !headless {
        for (i, r) in raw.iter().enumerate() {
            match parse_ip(r) {
                Ok(ip) => requested.push(ip),
                Err(reason) => errors.push(Error::BadAddress {
                    object: object.clone(),
                    field: format!("{field}[{i}]"),
                    value: r.to_string(),
                    reason,
                }),
            }
        }
    }
    let configured: Vec<bool> = ranges
        .service_cidrs
        .iter()
        .map(|c| c.addr.is_ipv6())
        .collect();
    // Unset: RequireDualStack when two families are written (as the API server defaults it),
    // else SingleStack.
    let two = requested.len() == 2 || spec.ip_families.as_ref().is_some_and(|f| f.len() == 2);
    let policy = spec.ip_family_policy.as_deref().unwrap_or(if two {
        "RequireDualStack"
    } else {
        "SingleStack"
    });
    let mut families: Vec<bool> = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        match f.as_str() {
            "IPv4" => families.push(false),
            "IPv6" => families.push(true),
            other => errors.push(invalid(
                format!("spec.ipFamilies[{i}]"),
                format!("{other:?}"),
                "supported values: \"IPv4\", \"IPv6\"".into(),
            )),
        }
    }
    if families.is_empty() {
        families = requested.iter().map(IpAddr::is_ipv6).collect();
    }
    if families.is_empty() {
        families.extend(configured.first().copied());
    }
    if policy == "SingleStack" && families.len() > 1 {
        errors.push(invalid(
            "spec.ipFamilyPolicy".into(),
            "\"SingleStack\"".into(),
            format!(
                "{} families requested; PreferDualStack or RequireDualStack serves two",
                families.len()
            ),
        ));
    }
    if policy != "SingleStack" && families.len() == 1 {
        let other = !families[0];
        if configured.contains(&other) {
            families.push(other);
        } else if policy == "RequireDualStack" {
            errors.push(invalid(
                "spec.ipFamilyPolicy".into(),
                "\"RequireDualStack\"".into(),
                "this cluster is not configured for dual-stack services".into(),
            ));
        }
    }
    for (i, ip) in requested.iter().enumerate() {
        if families.get(i) != Some(&ip.is_ipv6()) {
            errors.push(invalid(
                format!("{field}[{i}]"),
                ip.to_string(),
                "expected an IP of the family in spec.ipFamilies".into(),
            ));
        }
    }
    if families.len() > 2 || (families.len() == 2 && families[0] == families[1]) {
        errors.push(invalid(
            "spec.ipFamilies".into(),
            format!("{:?}", spec.ip_families.clone().unwrap_or_default()),
            "at most one of each family".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let cluster: Vec<(bool, Need<IpAddr>)> = if headless {
        Vec::new()
    } else {
        families
            .iter()
            .enumerate()
            .map(|(i, &v6)| {
                (
                    v6,
                    Need {
                        key: if v6 { "v6" } else { "v4" }.into(),
                        field: format!("{field}[{i}]"),
                        requested: requested.get(i).copied(),
                        value: None,
                    },
                )
            })
            .collect()
    };
    let wants_node_ports = match ty {
        "NodePort" => true,
        "LoadBalancer" => spec.more().allocate_load_balancer_node_ports != Some(false),
        _ => false,
    };
    let mut node_ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let requested = p.node_port.filter(|&n| n != 0);
        if !wants_node_ports && requested.is_none() {
            continue;
        }
        let requested = match requested.map(u16::try_from) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => {
                errors.push(Error::BadPort {
                    object: object.clone(),
                    field: format!("spec.ports[{i}].nodePort"),
                    value: p.node_port.unwrap_or_default().into(),
                });
                continue;
            }
        };
        node_ports.push((
            i,
            p.port,
            Need {
                key: format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")),
                field: format!("spec.ports[{i}].nodePort"),
                requested,
                value: None,
            },
        ));
    }
    let health = (ty == "LoadBalancer"
        && spec.more().external_traffic_policy.as_deref() == Some("Local"))
    .then(|| Need {
        key: "health".into(),
        field: "spec.healthCheckNodePort".into(),
        requested: spec
            .more()
            .health_check_node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0),
        value: None,
    });
    // LoadBalancer IPs: a status written in the manifest (a dump of a cluster) is served as
    // it is; otherwise the pool's job, per family of the Service.
    let has_status = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .is_some_and(|i| !i.is_empty());
    let mut lb = Vec::new();
    let mut lb_pending = false;
    if ty == "LoadBalancer" && !has_status {
        // What the Service asks for: the (deprecated) field, or the request annotation of
        // MetalLB / Cilium LB-IPAM, comma-separated, one address per family.
        let mut asked: Vec<(String, IpAddr)> = Vec::new();
        let annotations = svc.metadata.annotations.as_ref();
        let requests = spec
            .more()
            .load_balancer_ip
            .iter()
            .filter(|s| !s.is_empty())
            .map(|raw| ("spec.loadBalancerIP".to_owned(), raw.as_str()))
            .chain(LB_IP_ANNOTATIONS.iter().flat_map(|a| {
                annotations
                    .and_then(|m| m.get(a))
                    .into_iter()
                    .flat_map(|v| v.split(','))
                    .map(move |raw| (format!("metadata.annotations[{a}]"), raw.trim()))
                    .filter(|(_, raw)| !raw.is_empty())
            }));
        for (field, raw) in requests {
            match parse_ip(raw) {
                Ok(ip) if asked.iter().any(|(_, a)| a.is_ipv6() == ip.is_ipv6()) => {
                    errors.push(invalid(
                        field,
                        ip.to_string(),
                        format!(
                            "a second {} address; one per family",
                            family_name(ip.is_ipv6())
                        ),
                    ));
                }
                Ok(ip) => asked.push((field, ip)),
                Err(reason) => errors.push(Error::BadAddress {
                    object: object.clone(),
                    field,
                    value: raw.into(),
                    reason,
                }),
            }
        }
        if ranges.lb_pools.is_empty() {
            lb_pending = true;
        } else if asked.is_empty() {
            for &v6 in &families {
                if ranges.lb_pools.iter().any(|p| p.v6() == v6) {
                    lb.push((
                        v6,
                        Need {
                            key: format!("lb-{}", family_name(v6)),
                            field: "status.loadBalancer.ingress".into(),
                            requested: None,
                            value: None,
                        },
                    ));
                }
            }
            lb_pending = lb.is_empty();
        } else {
            for (field, ip) in asked {
                lb.push((
                    ip.is_ipv6(),
                    Need {
                        key: format!("lb-{}", family_name(ip.is_ipv6())),
                        field,
                        requested: Some(ip),
                        value: None,
                    },
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Some(Plan {
        id: id.clone(),
        object,
        cluster,
        node_ports,
        health,
        lb,
        lb_pending,
    }))
}

/// Runs the three passes over `services` (sorted oldest first by the caller) and applies the
/// result to copies of them. Errors name the Service and field, with upstream's wording.
#[expect(
    clippy::too_many_lines,
    reason = "the three passes over the four kinds of value read best together"
)]
pub(crate) fn allocate(
    services: &[(NsName, Arc<Service>)],
    ranges: &Ranges,
    prev: &State,
    errors: &mut Vec<Error>,
) -> Allocated {
    let mut taken = Taken::default();
    let cidr_of = |v6: bool| ranges.service_cidrs.iter().find(|c| c.addr.is_ipv6() == v6);
    let (np_lo, np_hi) = ranges.node_ports;
    let np_range = format!("{np_lo}-{np_hi}");
    // Services with nothing to allocate (ExternalName) pass through as they are.
    let mut passthrough = vec![false; services.len()];
    let mut plans: Vec<Option<Plan>> = services
        .iter()
        .zip(&mut passthrough)
        .map(|((id, svc), pass)| match plan(svc, id, ranges) {
            Ok(p) => {
                *pass = p.is_none();
                p
            }
            Err(e) => {
                errors.extend(e);
                None
            }
        })
        .collect();

    // 1. Explicit values, oldest Service first; any refusal skips the whole Service.
    for slot in &mut plans {
        let Some(p) = slot.as_mut() else { continue };
        let mut refused = Vec::new();
        let invalid = |field: &str, value: String, reason: String| Error::Invalid {
            object: p.object.clone(),
            field: field.to_owned(),
            value,
            reason,
        };
        for (v6, n) in &p.cluster {
            let Some(ip) = n.requested else { continue };
            let cidr = cidr_of(*v6);
            if ranges.check_cluster_ips {
                match cidr {
                    None => refused.push(invalid(
                        &n.field,
                        ip.to_string(),
                        format!(
                            "failed to allocate IP {ip}: {} is not configured on this cluster",
                            family_name(*v6)
                        ),
                    )),
                    Some(c) if !IpRange::parse(&c.to_string()).is_ok_and(|r| r.contains(ip)) => {
                        refused.push(invalid(
                            &n.field,
                            ip.to_string(),
                            format!("failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {c}"),
                        ));
                    }
                    Some(_) => {}
                }
            }
            if let Some(owner) = taken.ips.get(&ip) {
                refused.push(invalid(
                    &n.field,
                    ip.to_string(),
                    format!("failed to allocate IP {ip}: provided IP is already allocated (to Service {owner})"),
                ));
            }
        }
        let ports = p
            .node_ports
            .iter()
            .map(|(_, _, n)| n)
            .chain(p.health.iter());
        for n in ports {
            let Some(port) = n.requested else { continue };
            if !(np_lo..=np_hi).contains(&port) {
                refused.push(invalid(
                    &n.field,
                    port.to_string(),
                    format!("provided port is not in the valid range. The range of valid ports is {np_range}"),
                ));
            } else if let Some(owner) = taken.ports.get(&port).filter(|o| **o != p.id) {
                refused.push(invalid(
                    &n.field,
                    port.to_string(),
                    format!("provided port is already allocated (to Service {owner})"),
                ));
            }
        }
        if !refused.is_empty() {
            errors.extend(refused);
            *slot = None;
            continue;
        }
        for (_, n) in &mut p.cluster {
            if let Some(ip) = n.requested {
                taken.ips.insert(ip, p.id.clone());
                n.value = Some(ip);
            }
        }
        for n in p
            .node_ports
            .iter_mut()
            .map(|(_, _, n)| n)
            .chain(p.health.iter_mut())
        {
            if let Some(port) = n.requested {
                taken.ports.insert(port, p.id.clone());
                n.value = Some(port);
            }
        }
        // LoadBalancer IPs asked for: a failure leaves the Service pending, not refused.
        for (_, n) in &mut p.lb {
            let Some(ip) = n.requested else { continue };
            let reason = if ranges.lb_pools.iter().any(|r| r.contains(ip)) {
                taken.lb.get(&ip).map(|owner| {
                    format!("already allocated to Service {owner}; the Service stays pending")
                })
            } else {
                Some(format!(
                    "not in any --lb-ip-pool ({}); the Service stays pending",
                    ranges
                        .lb_pools
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            };
            if let Some(reason) = reason {
                errors.push(Error::Invalid {
                    object: p.object.clone(),
                    field: n.field.clone(),
                    value: ip.to_string(),
                    reason,
                });
            } else {
                taken.lb.insert(ip, p.id.clone());
                n.value = Some(ip);
            }
        }
        // 2. Then what this Service held before, where it still fits: before any younger
        //    Service's explicit request, so an incumbent is never moved by a newcomer.
        if let Some(rec) = prev.services.get(&p.id.to_string()) {
            claim_recorded(p, rec, &mut taken, ranges);
        }
    }

    // 3. New values, Services in namespace/name order.
    let mut order: Vec<usize> = (0..plans.len()).filter(|&i| plans[i].is_some()).collect();
    order.sort_by(|&a, &b| services[a].0.cmp(&services[b].0));
    let np_size = u128::from(np_hi - np_lo) + 1;
    for i in order {
        let p = plans[i].as_mut().expect("filtered above");
        let seed = |key: &str| fnv1a(format!("{}/{key}", p.id).as_bytes());
        let mut failed = Vec::new();
        for (v6, n) in &mut p.cluster {
            if n.value.is_some() {
                continue;
            }
            let Some(c) = cidr_of(*v6) else {
                failed.push((
                    n.field.clone(),
                    format!("{} is not configured on this cluster", family_name(*v6)),
                ));
                continue;
            };
            let r = service_range(c);
            let size = r.size();
            match search(size, band(size, 16, 256), seed(&n.key), |o| {
                !taken.ips.contains_key(&r.nth(o))
            }) {
                Some(o) => {
                    let ip = r.nth(o);
                    taken.ips.insert(ip, p.id.clone());
                    n.value = Some(ip);
                }
                None => failed.push((
                    n.field.clone(),
                    format!("failed to allocate a serviceIP: range is full ({c})"),
                )),
            }
        }
        for idx in 0..p.node_ports.len() + usize::from(p.health.is_some()) {
            share_node_ports(&mut p.node_ports);
            let n = match p.node_ports.get_mut(idx) {
                Some((_, _, n)) => n,
                None => p.health.as_mut().expect("counted above"),
            };
            if n.value.is_some() {
                continue;
            }
            match search(np_size, band(np_size, 32, 128), seed(&n.key), |o| {
                !taken.ports.contains_key(&(np_lo + o as u16))
            }) {
                Some(o) => {
                    let port = np_lo + o as u16;
                    taken.ports.insert(port, p.id.clone());
                    n.value = Some(port);
                }
                None => failed.push((
                    n.field.clone(),
                    format!("failed to allocate a nodePort: range is full ({np_range})"),
                )),
            }
        }
        if !failed.is_empty() {
            for (field, reason) in failed {
                errors.push(Error::Exhausted {
                    object: p.object.clone(),
                    field,
                    reason,
                });
            }
            plans[i] = None;
            continue;
        }
        for (v6, n) in &mut p.lb {
            if n.value.is_some() || n.requested.is_some() {
                continue;
            }
            let pools: Vec<&IpRange> = ranges.lb_pools.iter().filter(|r| r.v6() == *v6).collect();
            let total: u128 = pools.iter().map(|r| r.size()).sum();
            let nth = |mut o: u128| {
                for r in &pools {
                    if o < r.size() {
                        return r.nth(o);
                    }
                    o -= r.size();
                }
                unreachable!("offset within the pools' total")
            };
            match search(total, 0, seed(&n.key), |o| !taken.lb.contains_key(&nth(o))) {
                Some(o) => {
                    let ip = nth(o);
                    taken.lb.insert(ip, p.id.clone());
                    n.value = Some(ip);
                }
                None => errors.push(Error::Exhausted {
                    object: p.object.clone(),
                    field: n.field.clone(),
                    reason: format!(
                        "no free {} address in --lb-ip-pool; the Service stays pending",
                        family_name(*v6)
                    ),
                }),
            }
        }
    }

    // Apply and record.
    let mut out = Vec::new();
    let mut state = State {
        version: STATE_VERSION,
        services: BTreeMap::new(),
    };
    for (((id, svc), p), pass) in services.iter().zip(plans).zip(passthrough) {
        let Some(p) = p else {
            // Refused ones are left out.
            if pass {
                out.push((id.clone(), svc.clone(), None, Record::default()));
            }
            continue;
        };
        if p.lb_pending {
            errors.push(Error::Pending {
                object: p.object.clone(),
            });
        }
        let rec = Record {
            cluster_ips: p.cluster.iter().filter_map(|(_, n)| n.value).collect(),
            node_ports: p
                .node_ports
                .iter()
                .filter_map(|(_, _, n)| Some((n.key.clone(), n.value?)))
                .collect(),
            health_check_node_port: p.health.as_ref().and_then(|n| n.value),
            load_balancer_ips: p.lb.iter().filter_map(|(_, n)| n.value).collect(),
        };
        state.services.insert(id.to_string(), rec.clone());
        out.push((id.clone(), svc.clone(), Some(p), rec));
    }
    Allocated {
        services: out,
        state,
    }
}

/// Pass 2 for one Service: its recorded values, where they are free and still in range.
fn claim_recorded(p: &mut Plan, rec: &Record, taken: &mut Taken, ranges: &Ranges) {
    let cidr_of = |v6: bool| ranges.service_cidrs.iter().find(|c| c.addr.is_ipv6() == v6);
    let (np_lo, np_hi) = ranges.node_ports;
    for (v6, n) in &mut p.cluster {
        if n.value.is_some() {
            continue;
        }
        let fits = |ip: &IpAddr| {
            ip.is_ipv6() == *v6
                && !taken.ips.contains_key(ip)
                && cidr_of(*v6).is_some_and(|c| service_range(c).contains(*ip))
        };
        if let Some(ip) = rec.cluster_ips.iter().find(|ip| fits(ip)) {
            taken.ips.insert(*ip, p.id.clone());
            n.value = Some(*ip);
        }
    }
    // Ports sharing a number with an explicit sibling take its nodePort.
    share_node_ports(&mut p.node_ports);
    let recorded = |n: &Need<u16>| {
        if n.key == "health" {
            rec.health_check_node_port
        } else {
            rec.node_ports.get(&n.key).copied()
        }
    };
    for n in p
        .node_ports
        .iter_mut()
        .map(|(_, _, n)| n)
        .chain(p.health.iter_mut())
    {
        if n.value.is_some() {
            continue;
        }
        if let Some(port) = recorded(n).filter(|port| {
            (np_lo..=np_hi).contains(port) && taken.ports.get(port).is_none_or(|o| *o == p.id)
        }) {
            taken.ports.insert(port, p.id.clone());
            n.value = Some(port);
        }
    }
    share_node_ports(&mut p.node_ports);
    for (v6, n) in &mut p.lb {
        if n.value.is_some() || n.requested.is_some() {
            continue;
        }
        let fits = |ip: &IpAddr| {
            ip.is_ipv6() == *v6
                && !taken.lb.contains_key(ip)
                && ranges.lb_pools.iter().any(|r| r.contains(*ip))
        };
        if let Some(ip) = rec.load_balancer_ips.iter().find(|ip| fits(ip)) {
            taken.lb.insert(*ip, p.id.clone());
            n.value = Some(*ip);
        }
    }
}

/// Ports of one Service with the same `port` number share one nodePort (53/TCP + 53/UDP).
fn share_node_ports(ports: &mut [(usize, i32, Need<u16>)]) {
    for i in 0..ports.len() {
        if ports[i].2.value.is_some() {
            continue;
        }
        let number = ports[i].1;
        if let Some(v) = ports
            .iter()
            .find(|(_, n, need)| *n == number && need.value.is_some())
            .and_then(|(_, _, need)| need.value)
        {
            ports[i].2.value = Some(v);
        }
    }
}

/// A copy of `svc` with the allocated values written in (what an API server would store).
pub(crate) fn apply(svc: &Arc<Service>, p: &Plan, rec: &Record) -> Arc<Service> {
    let mut s = (**svc).clone();
    let spec = s.spec.get_or_insert_with(Default::default);
    if !p.cluster.is_empty() {
        let ips: Vec<crate::k8s::Str> = rec
            .cluster_ips
            .iter()
            .map(compact_str::ToCompactString::to_compact_string)
            .collect();
        spec.cluster_ip = ips.first().cloned();
        spec.cluster_ips = Some(ips.into());
        spec.ip_families = Some(
            p.cluster
                .iter()
                .map(|(v6, _)| family_name(*v6).into())
                .collect(),
        );
        let two = p.cluster.len() == 2;
        spec.ip_family_policy.get_or_insert_with(|| {
            if two {
                "RequireDualStack"
            } else {
                "SingleStack"
            }
            .into()
        });
    }
    if let Some(ports) = spec.ports.as_mut() {
        for (i, _, n) in &p.node_ports {
            if let (Some(port), Some(v)) = (ports.get_mut(*i), n.value) {
                port.node_port = Some(i32::from(v));
            }
        }
    }
    if let Some(v) = rec.health_check_node_port {
        spec.more_mut().health_check_node_port = Some(i32::from(v));
    }
    if !rec.load_balancer_ips.is_empty() {
        s.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    rec.load_balancer_ips
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(compact_str::ToCompactString::to_compact_string(ip)),
                            ip_mode: Some("VIP".into()),
                            ..LoadBalancerIngress::default()
                        })
                        .collect(),
                ),
            }),
        });
    }
    Arc::new(s)
}
