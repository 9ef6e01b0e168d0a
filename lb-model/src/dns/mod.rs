//! Cluster DNS from the same objects the datapath is built from: Kubernetes DNS-Based Service
//! Discovery 1.1.0 (kubernetes/dns docs/specification.md), with CoreDNS's kubernetes plugin as
//! the contract where the specification is silent.
//!
//! * [`Index`]: every name of the cluster zone with its records, built from a snapshot of
//!   Services and EndpointSlices ([`Index::build`]), answering a question with
//!   [`Index::lookup`] — pure, no I/O;
//! * [`wire`]: the DNS message format (RFC 1035, EDNS0 of RFC 6891), parsing queries strictly and
//!   building answers, also pure.
//!
//! Records (`<zone>` = `--cluster-domain`):
//! * `<svc>.<ns>.svc.<zone>` A / AAAA = the ClusterIPs; a missing family is NODATA;
//! * headless Services: one A / AAAA per ready endpoint (no ready endpoint: NXDOMAIN), and
//!   `<hostname>.<svc>.<ns>.svc.<zone>` per endpoint, the hostname being the endpoint's
//!   `hostname` or its dashed address (`172-0-0-2`, `2001-db8--1`);
//! * `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV per named port (priority 0, weights sharing
//!   100, as CoreDNS), targets the Service's name or, headless, every endpoint's name; the
//!   targets' addresses in the additional section;
//! * PTR for ClusterIPs and headless endpoint addresses (`in-addr.arpa`, `ip6.arpa` nibbles);
//! * ExternalName: a CNAME to the target, followed when the target is in the cluster zone (the
//!   server follows others upstream);
//! * `dns-version.<zone>` TXT "1.1.0"; `svc.<zone>` and `<ns>.svc.<zone>` (a namespace with a
//!   Service) exist, as do the empty non-terminals above every name (NODATA, not NXDOMAIN);
//! * negative answers carry the zone's SOA; names outside the zone (and PTR questions for other
//!   addresses) are for the upstream resolver ([`Lookup::Forward`]).
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::Objects;
use crate::model::{LABEL_SERVICE_NAME, parse_ip};

/// The schema version `dns-version.<zone>` answers.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// Query and record types this server knows (RFC 1035, 3596, 2782).
pub mod qtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const ANY: u16 = 255;
}

/// What the index is built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `--cluster-domain`, lower case, no trailing dot (`cluster.local`).
    pub zone: String,
    /// `--dns-ttl`: TTL of every record and of negative answers (SOA minimum).
    pub ttl: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            zone: "cluster.local".into(),
            ttl: 5,
        }
    }
}

/// Record data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(Arc<str>),
    Ptr(Arc<str>),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Arc<str>,
    },
    Txt(Arc<str>),
    /// The zone's SOA (owner: the zone).
    Soa {
        serial: u32,
    },
}

impl RData {
    /// The record type.
    #[must_use]
    pub const fn rtype(&self) -> u16 {
        match self {
            Self::A(_) => qtype::A,
            Self::Aaaa(_) => qtype::AAAA,
            Self::Cname(_) => qtype::CNAME,
            Self::Ptr(_) => qtype::PTR,
            Self::Srv { .. } => qtype::SRV,
            Self::Txt(_) => qtype::TXT,
            Self::Soa { .. } => qtype::SOA,
        }
    }
}

/// A record of an answer: its owner (`None` = the question's name, as asked) and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub owner: Option<Arc<str>>,
    pub data: RData,
}

/// Response codes used (RFC 1035).
pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
}

/// The answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Authoritative: rcode, answer and additional records; negative answers (NXDOMAIN,
    /// NODATA) carry the zone's SOA in the authority section.
    Answer {
        rcode: u8,
        answers: Vec<Rr>,
        additional: Vec<Rr>,
        soa: Option<Rr>,
    },
    /// Not ours: ask the upstream resolver.
    Forward,
    /// An in-zone CNAME chain leads out of the zone: the answers so far, and the name to
    /// resolve upstream for the rest (the server appends what it finds).
    Chase { answers: Vec<Rr>, target: Arc<str> },
}

/// Everything one name holds.
#[derive(Clone, Debug, Default)]
struct Node {
    a: Vec<Ipv4Addr>,
    aaaa: Vec<Ipv6Addr>,
    srv: Vec<(u16, u16, Arc<str>)>,
    cname: Option<Arc<str>>,
}

impl Node {
    fn push(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.a.push(a),
            IpAddr::V6(a) => self.aaaa.push(a),
        }
    }
}

/// One Service's names, relative to `<svc>.<ns>.svc.<zone>` (`""`: that name itself;
/// `db-0`; `_http._tcp`; the empty non-terminal `_tcp`), and the PTRs it owns. Built once per
/// (Service, slices) pair of objects and shared between indexes while they are unchanged.
#[derive(Debug, Default)]
struct SvcZone {
    names: HashMap<Box<str>, Node>,
    ptr: Vec<(IpAddr, Arc<str>)>,
}

/// Every name of the cluster zone and every PTR: one [`SvcZone`] per Service, so a change
/// rebuilds only its own Service's ([`Builder`]).
#[derive(Clone, Debug)]
pub struct Index {
    cfg: Config,
    serial: u32,
    /// `<svc>.<ns>` (lower case) → that Service's names.
    services: HashMap<Box<str>, Arc<SvcZone>>,
    /// Namespaces with a Service (`<ns>.svc.<zone>` exists).
    namespaces: HashSet<Box<str>>,
    /// Address → the names it points back to.
    ptr: HashMap<IpAddr, Vec<Arc<str>>>,
    /// The zone's SOA record, shared by every negative answer.
    soa: Rr,
}

/// `172-0-0-2`, `2001-db8--1`: an endpoint's name without a hostname (CoreDNS's form).
#[must_use]
pub fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// An endpoint of a headless Service.
struct Ep {
    ip: IpAddr,
    hostname: String,
}

/// Builds indexes, keeping each Service's [`SvcZone`] while its Service and slices are the
/// very same objects (`Arc::ptr_eq`): a change rebuilds one Service, not the zone.
#[derive(Debug, Default)]
pub struct Builder {
    cfg: Option<Config>,
    cache: HashMap<(Box<str>, Box<str>), CacheEntry>,
}

/// A Service, its slices, and the zone built from them.
type CacheEntry = (Arc<Service>, Vec<Arc<EndpointSlice>>, Arc<SvcZone>);

impl Builder {
    /// The index of a snapshot. `serial`: the SOA serial (the agent passes the sync's time).
    pub fn build(&mut self, objs: &Objects, cfg: &Config, serial: u32) -> Index {
        let zone = cfg.zone.trim_end_matches('.').to_ascii_lowercase();
        let cfg = Config {
            zone: zone.clone(),
            ttl: cfg.ttl,
        };
        if self.cfg.as_ref() != Some(&cfg) {
            self.cache.clear();
            self.cfg = Some(cfg.clone());
        }
        let mut by_svc: HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = HashMap::new();
        for s in &objs.slices {
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
            {
                let ns = s.metadata.namespace.as_deref().unwrap_or("default");
                by_svc.entry((ns, svc.as_str())).or_default().push(s);
            }
        }
        let mut ix = Index {
            soa: Rr {
                owner: Some(Arc::from(zone.as_str())),
                data: RData::Soa { serial },
            },
            cfg,
            serial,
            services: HashMap::with_capacity(objs.services.len()),
            namespaces: HashSet::new(),
            ptr: HashMap::new(),
        };
        let mut next = HashMap::with_capacity(objs.services.len());
        let none = Vec::new();
        for svc in &objs.services {
            let Some(name) = svc.metadata.name.as_deref() else {
                continue;
            };
            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
            let slices = by_svc.get(&(ns, name)).unwrap_or(&none);
            let key: (Box<str>, Box<str>) = (
                ns.to_ascii_lowercase().into(),
                name.to_ascii_lowercase().into(),
            );
            if next.contains_key(&key) {
                continue; // a duplicate: the first definition is used
            }
            let z = match self.cache.remove(&key) {
                Some((s, sl, z))
                    if Arc::ptr_eq(&s, svc)
                        && sl.len() == slices.len()
                        && sl.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b)) =>
                {
                    z
                }
                _ => Arc::new(svc_zone(
                    svc,
                    slices,
                    &format!("{}.{}.svc.{zone}", key.1, key.0),
                )),
            };
            ix.namespaces.insert(key.0.clone());
            for (ip, name) in &z.ptr {
                ix.ptr.entry(*ip).or_default().push(name.clone());
            }
            ix.services
                .insert(format!("{}.{}", key.1, key.0).into(), z.clone());
            next.insert(
                key,
                (
                    svc.clone(),
                    slices.iter().map(|s| (*s).clone()).collect(),
                    z,
                ),
            );
        }
        for v in ix.ptr.values_mut() {
            v.sort();
            v.dedup();
        }
        self.cache = next;
        ix
    }
}

/// One Service's names (`fqdn`: `<svc>.<ns>.svc.<zone>`, lower case).
fn svc_zone(svc: &Service, slices: &[&Arc<EndpointSlice>], fqdn: &str) -> SvcZone {
    let mut z = SvcZone::default();
    let Some(spec) = svc.spec.as_ref() else {
        return z;
    };
    let fq: Arc<str> = Arc::from(fqdn);
    if spec.type_.as_deref() == Some("ExternalName") {
        if let Some(target) = spec.external_name.as_deref().filter(|t| !t.is_empty()) {
            let t = target.trim_end_matches('.').to_ascii_lowercase();
            z.names.entry("".into()).or_default().cname = Some(Arc::from(t.as_str()));
        }
        return z;
    }
    let ips: Vec<IpAddr> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(v), _) if !v.is_empty() => v.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
    .iter()
    .filter_map(|s| parse_ip(s).ok())
    .collect();
    let headless = ips.is_empty();
    // Ready endpoints, deduplicated by address.
    let mut ready: BTreeMap<IpAddr, Ep> = BTreeMap::new();
    if headless {
        for e in slices.iter().flat_map(|s| s.endpoints.iter()) {
            let ok = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(ip) = e.addresses.first().and_then(|a| parse_ip(a).ok()) else {
                continue;
            };
            if ok {
                let hostname = e
                    .hostname
                    .clone()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| dashed(ip))
                    .to_ascii_lowercase();
                ready.entry(ip).or_insert(Ep { ip, hostname });
            }
        }
        if ready.is_empty() {
            return z; // no ready endpoint: the Service's name does not exist (NXDOMAIN)
        }
    }
    let top = z.names.entry("".into()).or_default();
    if headless {
        for e in ready.values() {
            top.push(e.ip);
        }
    } else {
        for ip in &ips {
            top.push(*ip);
        }
    }
    // SRV targets: the Service, or each endpoint's own name.
    let targets: Vec<Arc<str>> = if headless {
        let mut t = Vec::new();
        for e in ready.values() {
            let name: Arc<str> = Arc::from(format!("{}.{fqdn}", e.hostname).as_str());
            z.names
                .entry(e.hostname.as_str().into())
                .or_default()
                .push(e.ip);
            z.ptr.push((e.ip, name.clone()));
            t.push(name);
        }
        t
    } else {
        z.ptr.extend(ips.iter().map(|ip| (*ip, fq.clone())));
        vec![fq]
    };
    let weight = (100 / targets.len().max(1)).max(1) as u16;
    for p in spec.ports.iter().flatten() {
        let Some(pname) = p.name.as_deref().filter(|n| !n.is_empty()) else {
            continue; // unnamed ports have no SRV record
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
        z.names.entry(format!("_{proto}").into()).or_default();
        let node = z
            .names
            .entry(format!("_{}._{proto}", pname.to_ascii_lowercase()).into())
            .or_default();
        node.srv
            .extend(targets.iter().map(|t| (weight, port, t.clone())));
    }
    z
}

impl Index {
    /// An index with nothing but the zone's fixed names.
    #[must_use]
    pub fn empty(cfg: &Config, serial: u32) -> Self {
        Self::build(&Objects::default(), cfg, serial)
    }

    /// The index of a snapshot, built from scratch ([`Builder`] keeps per-Service results).
    #[must_use]
    pub fn build(objs: &Objects, cfg: &Config, serial: u32) -> Self {
        Builder::default().build(objs, cfg, serial)
    }

    /// The configuration the index was built with.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Services in the index.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether the index holds no Service.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// `name` below the zone, relative to it (`""` for the apex); `None` when outside.
    fn relative<'a>(&self, name: &'a str) -> Option<&'a str> {
        let z = self.cfg.zone.as_str();
        if name == z {
            return Some("");
        }
        let rest = name.strip_suffix(z)?;
        rest.strip_suffix('.')
    }

    /// What a name (lower case, no trailing dot) is in the zone: `Err(true)` exists without
    /// records (NODATA), `Err(false)` does not exist (NXDOMAIN), `Ok(node)` has records.
    fn find(&self, rel: &str) -> Result<&Node, bool> {
        match rel {
            "" | "svc" => return Err(true),
            "dns-version" => return Ok(&DNS_VERSION),
            _ => {}
        }
        let Some(r) = rel.strip_suffix(".svc") else {
            return Err(false); // no pod records, no other subdomains
        };
        let (rest, ns) = r.rsplit_once('.').unwrap_or(("", r));
        if rest.is_empty() {
            return Err(self.namespaces.contains(ns));
        }
        let (prefix, svc) = match rest.rsplit_once('.') {
            Some((p, s)) => (p, s),
            None => ("", rest),
        };
        let key = format!("{svc}.{ns}");
        let z = self.services.get(key.as_str()).ok_or(false)?;
        match z.names.get(prefix) {
            Some(n) => Ok(n),
            None => Err(false),
        }
    }

    /// The answer to `name` (lower case, without the trailing dot) of type `qt`.
    #[must_use]
    pub fn lookup(&self, name: &str, qt: u16) -> Lookup {
        if qt == qtype::PTR
            && let Some(ip) = reverse(name)
        {
            return match self.ptr.get(&ip) {
                Some(targets) => Lookup::Answer {
                    rcode: rcode::NOERROR,
                    answers: targets
                        .iter()
                        .map(|t| Rr {
                            owner: None,
                            data: RData::Ptr(t.clone()),
                        })
                        .collect(),
                    additional: Vec::new(),
                    soa: None,
                },
                None => Lookup::Forward,
            };
        }
        let Some(rel) = self.relative(name) else {
            return Lookup::Forward;
        };
        if rel.is_empty() && (qt == qtype::SOA || qt == qtype::ANY) {
            return Lookup::Answer {
                rcode: rcode::NOERROR,
                answers: vec![Rr {
                    owner: None,
                    data: self.soa.data.clone(),
                }],
                additional: Vec::new(),
                soa: None,
            };
        }
        let mut answers = Vec::new();
        let mut additional = Vec::new();
        let mut rel = rel;
        let mut owner: Option<Arc<str>> = None;
        // Follow in-zone CNAMEs (ExternalName Services naming other Services), at most 8.
        for _ in 0..8 {
            let node = match self.find(rel) {
                Ok(n) => n,
                Err(exists) => {
                    let rc = if exists {
                        rcode::NOERROR
                    } else {
                        rcode::NXDOMAIN
                    };
                    return Lookup::Answer {
                        rcode: rc,
                        answers,
                        additional,
                        soa: Some(self.soa.clone()),
                    };
                }
            };
            if let Some(target) = &node.cname
                && qt != qtype::CNAME
            {
                answers.push(Rr {
                    owner: owner.clone(),
                    data: RData::Cname(target.clone()),
                });
                let Some(next) = self.relative(target) else {
                    return Lookup::Chase {
                        answers,
                        target: target.clone(),
                    };
                };
                owner = Some(target.clone());
                rel = next;
                continue;
            }
            self.records(node, rel, qt, owner.as_ref(), &mut answers, &mut additional);
            if answers.is_empty() {
                return self.negative(rcode::NOERROR);
            }
            return Lookup::Answer {
                rcode: rcode::NOERROR,
                answers,
                additional,
                soa: None,
            };
        }
        Lookup::Answer {
            rcode: rcode::SERVFAIL,
            answers: Vec::new(),
            additional: Vec::new(),
            soa: None,
        }
    }

    /// The records of `node` for `qt`, and for SRV the targets' addresses as additional data.
    fn records(
        &self,
        node: &Node,
        rel: &str,
        qt: u16,
        owner: Option<&Arc<str>>,
        answers: &mut Vec<Rr>,
        additional: &mut Vec<Rr>,
    ) {
        let rr = |data| Rr {
            owner: owner.cloned(),
            data,
        };
        let any = qt == qtype::ANY;
        if qt == qtype::A || any {
            answers.extend(node.a.iter().map(|a| rr(RData::A(*a))));
        }
        if qt == qtype::AAAA || any {
            answers.extend(node.aaaa.iter().map(|a| rr(RData::Aaaa(*a))));
        }
        if qt == qtype::CNAME || any {
            answers.extend(node.cname.iter().map(|c| rr(RData::Cname(c.clone()))));
        }
        if (qt == qtype::TXT || any) && rel == "dns-version" {
            answers.push(rr(RData::Txt(Arc::from(SCHEMA_VERSION))));
        }
        if qt == qtype::SRV || any {
            for (weight, port, target) in &node.srv {
                answers.push(rr(RData::Srv {
                    priority: 0,
                    weight: *weight,
                    port: *port,
                    target: target.clone(),
                }));
                if let Some(t) = self.relative(target).and_then(|r| self.find(r).ok()) {
                    let extra = |data| Rr {
                        owner: Some(target.clone()),
                        data,
                    };
                    additional.extend(t.a.iter().map(|a| extra(RData::A(*a))));
                    additional.extend(t.aaaa.iter().map(|a| extra(RData::Aaaa(*a))));
                }
            }
        }
    }

    fn negative(&self, rcode: u8) -> Lookup {
        Lookup::Answer {
            rcode,
            answers: Vec::new(),
            additional: Vec::new(),
            soa: Some(self.soa.clone()),
        }
    }

    /// The SOA record of the zone (for SOA questions at the apex).
    #[must_use]
    pub fn soa(&self) -> &Rr {
        &self.soa
    }

    /// The SOA serial.
    #[must_use]
    pub fn serial(&self) -> u32 {
        self.serial
    }
}

/// `dns-version.<zone>`: a name with a TXT record only (added by `records`).
static DNS_VERSION: Node = Node {
    a: Vec::new(),
    aaaa: Vec::new(),
    srv: Vec::new(),
    cname: None,
};

/// The address a reverse name stands for: `d.c.b.a.in-addr.arpa` or 32 nibbles `.ip6.arpa`.
#[must_use]
pub fn reverse(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut o = [0u8; 4];
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() != 4 {
            return None;
        }
        for (i, l) in labels.iter().enumerate() {
            if l.is_empty() || l.len() > 3 || (l.len() > 1 && l.starts_with('0')) {
                return None;
            }
            o[3 - i] = l.parse().ok()?;
        }
        return Some(IpAddr::from(o));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.len() != 32 {
        return None;
    }
    let mut v: u128 = 0;
    for (i, l) in labels.iter().enumerate() {
        let [c] = l.as_bytes() else { return None };
        let d = (*c as char).to_digit(16)?;
        v |= u128::from(d) << (4 * i);
    }
    Some(IpAddr::from(v.to_be_bytes()))
}

#[cfg(test)]
mod tests;
