//! The model's vocabulary: frontends, their desired state, the node's configuration.
use lb_common::IPPROTO_SCTP;
use lb_common::IPPROTO_TCP;
use lb_common::IPPROTO_UDP;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::net::{SocketAddr, SocketAddrV4};

use super::parse_ip;

/// Label on an `EndpointSlice` naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Node label naming its zone (`hints.forZones`).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Label asking a specific proxy to handle a Service; others must ignore it.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// `namespace/name` of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NsName {
    pub namespace: crate::k8s::Str,
    pub name: crate::k8s::Str,
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
    pub(crate) fn parse(s: Option<&str>) -> Option<Self> {
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

impl Cidr {
    /// Whether `ip` is inside this prefix (same family).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = u32::MAX
                    .checked_shl(u32::from(32 - self.prefix))
                    .unwrap_or(0);
                u32::from(a) & m == u32::from(n)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = u128::MAX
                    .checked_shl(u32::from(128 - self.prefix))
                    .unwrap_or(0);
                u128::from(a) & m == u128::from(n)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A set of socket addresses, sorted, held as one exact allocation: a frontend's backends.
/// IPv4 addresses take 6 bytes each (a `SocketAddr` takes 32): four IPv4 backends are one
/// 24-byte allocation, where a B-tree set allocates a node for eleven, 384 bytes. Reads like
/// the `BTreeSet` it replaces, by value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AddrSet(Addrs);

/// Every address IPv4 (and so the empty set), or not: one form per set, so that equal sets
/// are equal values.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Addrs {
    V4(Box<[SocketAddrV4]>),
    Any(Box<[SocketAddr]>),
}

impl Default for AddrSet {
    fn default() -> Self {
        Self(Addrs::V4(Box::default()))
    }
}

impl AddrSet {
    #[must_use]
    pub fn len(&self) -> usize {
        match &self.0 {
            Addrs::V4(v) => v.len(),
            Addrs::Any(v) => v.len(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[must_use]
    pub fn contains(&self, a: &SocketAddr) -> bool {
        match (&self.0, a) {
            (Addrs::V4(v), SocketAddr::V4(a)) => v.binary_search(a).is_ok(),
            (Addrs::V4(_), SocketAddr::V6(_)) => false,
            (Addrs::Any(v), a) => v.binary_search(a).is_ok(),
        }
    }

    /// The addresses, in order.
    pub fn iter(&self) -> AddrIter<'_> {
        let (v4, any): (&[SocketAddrV4], &[SocketAddr]) = match &self.0 {
            Addrs::V4(v) => (v, &[]),
            Addrs::Any(v) => (&[], v),
        };
        AddrIter { v4, any }
    }

    #[must_use]
    pub fn first(&self) -> Option<SocketAddr> {
        self.iter().next()
    }
}

/// [`AddrSet::iter`] (one of the two slices is empty).
pub struct AddrIter<'a> {
    v4: &'a [SocketAddrV4],
    any: &'a [SocketAddr],
}

impl Iterator for AddrIter<'_> {
    type Item = SocketAddr;
    fn next(&mut self) -> Option<SocketAddr> {
        if let Some((a, rest)) = self.v4.split_first() {
            self.v4 = rest;
            return Some(SocketAddr::V4(*a));
        }
        let (a, rest) = self.any.split_first()?;
        self.any = rest;
        Some(*a)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.v4.len() + self.any.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for AddrIter<'_> {}

impl fmt::Debug for AddrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<SocketAddr> for AddrSet {
    fn from_iter<I: IntoIterator<Item = SocketAddr>>(it: I) -> Self {
        let mut v: Vec<SocketAddr> = it.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        let v4: Option<Box<[SocketAddrV4]>> = v
            .iter()
            .map(|a| match a {
                SocketAddr::V4(a) => Some(*a),
                SocketAddr::V6(_) => None,
            })
            .collect();
        Self(match v4 {
            Some(v4) => Addrs::V4(v4),
            None => Addrs::Any(v.into_boxed_slice()),
        })
    }
}

impl<'a> FromIterator<&'a SocketAddr> for AddrSet {
    fn from_iter<I: IntoIterator<Item = &'a SocketAddr>>(it: I) -> Self {
        it.into_iter().copied().collect()
    }
}

impl From<BTreeSet<SocketAddr>> for AddrSet {
    fn from(s: BTreeSet<SocketAddr>) -> Self {
        s.into_iter().collect()
    }
}

impl<const N: usize> From<[SocketAddr; N]> for AddrSet {
    fn from(a: [SocketAddr; N]) -> Self {
        a.into_iter().collect()
    }
}

impl PartialEq<BTreeSet<SocketAddr>> for AddrSet {
    fn eq(&self, o: &BTreeSet<SocketAddr>) -> bool {
        self.len() == o.len() && self.iter().eq(o.iter().copied())
    }
}

impl<'a> IntoIterator for &'a AddrSet {
    type Item = SocketAddr;
    type IntoIter = AddrIter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// What a frontend should lead to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is one independent SVC_FLAG_* bit of the frontend's map entry"
)]
pub struct FrontendState {
    /// Shared by the Service's frontends.
    pub service: std::sync::Arc<NsName>,
    /// The service port's name ("" when unnamed).
    pub port_name: crate::k8s::Str,
    /// Usable backends (ready, else serving+terminating, within the traffic policy and
    /// topology); empty = REJECT, or DROP when `no_local`.
    pub backends: AddrSet,
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
    /// A port-53 ClusterIP frontend of the node-local DNS Service (`--dns-service`): steered to
    /// the agent's own DNS listener while it is alive.
    pub node_dns: bool,
    /// The backends that are on this node (the packet path does not SNAT flows to them).
    pub local: AddrSet,
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
    /// Shared with the model's per-Service results: a copy of the desired state copies pointers.
    pub frontends: BTreeMap<Frontend, std::sync::Arc<FrontendState>>,
    /// healthCheckNodePort servers this node runs: port → what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// A LoadBalancer Service with externalTrafficPolicy Local, as its healthCheckNodePort
/// reports it (docs/semantics.md, "Health").
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
    /// `--dns-service`: the Service whose port-53 ClusterIP frontends go to this node's DNS
    /// listener while it is alive.
    pub node_dns: Option<NsName>,
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
            node_dns: None,
        }
    }
}

/// A Node's primary addresses, as kube-proxy's default `--nodeport-addresses=primary` takes
/// them: the first InternalIP of each family, else the first ExternalIP of that family.
#[must_use]
pub fn primary_addresses(node: Option<&crate::k8s::core::Node>) -> Vec<IpAddr> {
    let addrs: Vec<(crate::k8s::Str, IpAddr)> = node
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

/// Most backend slots a frontend can have (`SvcValue::count` is a `u16`).
pub const MAX_BACKENDS: usize = u16::MAX as usize;
