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

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher as _, Hash, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::k8s::{core::Service, discovery::EndpointSlice};

use crate::Objects;
use crate::few::Few;
use crate::model::{LABEL_SERVICE_NAME, parse_ip};
use crate::tracked::{Tracked, addr};

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

/// Everything one name holds, as one exact list of records (most names hold one kind: a
/// Service's addresses, or its port's SRV records, or nothing at all).
#[derive(Clone, Debug, Default)]
struct Node(Box<[Rec]>);

/// One record of a [`Node`].
#[derive(Clone, Debug)]
enum Rec {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// (weight, port, target); priority is always 0.
    Srv(u16, u16, Arc<str>),
    Cname(Arc<str>),
}

impl Node {
    fn a(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.0.iter().filter_map(|r| match r {
            Rec::A(a) => Some(*a),
            _ => None,
        })
    }

    fn aaaa(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.0.iter().filter_map(|r| match r {
            Rec::Aaaa(a) => Some(*a),
            _ => None,
        })
    }

    fn srv(&self) -> impl Iterator<Item = (u16, u16, &Arc<str>)> + '_ {
        self.0.iter().filter_map(|r| match r {
            Rec::Srv(w, p, t) => Some((*w, *p, t)),
            _ => None,
        })
    }

    fn cname(&self) -> Option<&Arc<str>> {
        self.0.iter().find_map(|r| match r {
            Rec::Cname(c) => Some(c),
            _ => None,
        })
    }
}

/// A [`Node`] being built.
#[derive(Default)]
struct NodeBuf {
    a: Vec<Ipv4Addr>,
    aaaa: Vec<Ipv6Addr>,
    srv: Vec<(u16, u16, Arc<str>)>,
    cname: Option<Arc<str>>,
}

impl NodeBuf {
    fn push(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.a.push(a),
            IpAddr::V6(a) => self.aaaa.push(a),
        }
    }

    fn done(self) -> Node {
        let mut recs = Vec::with_capacity(
            self.a.len() + self.aaaa.len() + self.srv.len() + usize::from(self.cname.is_some()),
        );
        recs.extend(self.a.into_iter().map(Rec::A));
        recs.extend(self.aaaa.into_iter().map(Rec::Aaaa));
        recs.extend(self.srv.into_iter().map(|(w, p, t)| Rec::Srv(w, p, t)));
        recs.extend(self.cname.map(Rec::Cname));
        Node(recs.into_boxed_slice())
    }
}

/// One Service's names, relative to `<svc>.<ns>.svc.<zone>` (`""`: that name itself;
/// `db-0`; `_http._tcp`; the empty non-terminal `_tcp`), and the PTRs it owns. Built once per
/// (Service, slices) pair of objects and shared between indexes while they are unchanged; the
/// index's own entry is all the [`Builder`] keeps of a key.
#[derive(Debug, Default)]
struct SvcZone {
    names: Names,
    /// What it was built from: the Service object (its address), and the slices (addresses,
    /// sorted; headless Services only).
    svc: usize,
    slices: Box<[usize]>,
}

/// A zone's names and PTRs.
#[derive(Debug)]
enum Names {
    /// Every name with its records, sorted for a binary search, and the PTRs (a headless or
    /// ExternalName Service).
    Built {
        names: Box<[(Arc<str>, Node)]>,
        ptr: Box<[(IpAddr, Arc<str>)]>,
    },
    /// A Service with ClusterIPs, whose names follow from its addresses and named ports, made
    /// when asked (built out, they take four allocations a Service): its addresses at its own
    /// name `fq`, each pointing back to it; at `_<port>._<proto>` an SRV record to `fq` for
    /// each named port, with where `_<proto>` (an empty non-terminal) starts in the name.
    Cluster {
        fq: Arc<str>,
        ips: Few<IpAddr>,
        srv: Few<(Arc<str>, u16, u16)>,
    },
}

impl Default for Names {
    fn default() -> Self {
        Self::Built {
            names: Box::default(),
            ptr: Box::default(),
        }
    }
}

/// The weight of each SRV record of a name with `n` targets (priority is always 0).
fn srv_weight(n: usize) -> u16 {
    (100 / n.max(1)).max(1) as u16
}

impl SvcZone {
    /// The records at `rel`; `None` when the name does not exist.
    fn get(&self, rel: &str) -> Option<Cow<'_, Node>> {
        match &self.names {
            Names::Built { names, .. } => names
                .binary_search_by(|(n, _)| (**n).cmp(rel))
                .ok()
                .map(|i| Cow::Borrowed(&names[i].1)),
            Names::Cluster { fq, ips, srv } => {
                // In the order a built node holds them: A, then AAAA, then SRV.
                let recs: Box<[Rec]> = if rel.is_empty() {
                    let a = ips.iter().filter_map(|ip| match ip {
                        IpAddr::V4(a) => Some(Rec::A(*a)),
                        IpAddr::V6(_) => None,
                    });
                    let aaaa = ips.iter().filter_map(|ip| match ip {
                        IpAddr::V6(a) => Some(Rec::Aaaa(*a)),
                        IpAddr::V4(_) => None,
                    });
                    a.chain(aaaa).collect()
                } else {
                    let ours = srv.iter().filter(|(n, ..)| **n == *rel);
                    let recs: Box<[Rec]> = ours
                        .map(|(_, port, _)| Rec::Srv(srv_weight(1), *port, fq.clone()))
                        .collect();
                    // `_<proto>`: an empty non-terminal above its ports' names.
                    let ent = || srv.iter().any(|(n, _, at)| n[usize::from(*at)..] == *rel);
                    if recs.is_empty() && !ent() {
                        return None;
                    }
                    recs
                };
                Some(Cow::Owned(Node(recs)))
            }
        }
    }

    /// The PTRs it owns: (address, the name it points back to).
    fn ptrs(&self) -> Vec<(IpAddr, &Arc<str>)> {
        match &self.names {
            Names::Built { ptr, .. } => ptr.iter().map(|(ip, n)| (*ip, n)).collect(),
            Names::Cluster { fq, ips, .. } => ips.iter().map(|ip| (*ip, fq)).collect(),
        }
    }

    /// Every name it holds (for [`Index::dump`]).
    #[cfg(test)]
    fn rels(&self) -> Vec<String> {
        let mut out: Vec<String> = match &self.names {
            Names::Built { names, .. } => names.iter().map(|(n, _)| n.to_string()).collect(),
            Names::Cluster { srv, .. } => std::iter::once(String::new())
                .chain(
                    srv.iter()
                        .flat_map(|(n, _, at)| [n.to_string(), n[usize::from(*at)..].to_string()]),
                )
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }
}

/// Shards of a map, each behind an `Arc`: a clone of the whole is a clone of 64 pointers, and
/// a change copies the one shard it touches (when an older index still shares it). An index
/// update costs what changed, not what the index holds, and the index the server answers
/// from is never copied whole.
#[derive(Clone, Debug)]
struct Shards<K, V> {
    /// Picks the shard (independent of the maps' own hasher, so a shard's keys still spread
    /// over its buckets).
    pick: RandomState,
    maps: Vec<Arc<HashMap<K, V>>>,
}

const SHARDS: usize = 64;

impl<K: Hash + Eq + Clone, V: Clone> Shards<K, V> {
    fn new() -> Self {
        Self {
            pick: RandomState::new(),
            maps: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        (self.pick.hash_one(k) % SHARDS as u64) as usize
    }

    fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.maps[self.shard(k)].get(k)
    }

    /// The key stored equal to `k` (to share it).
    fn key<Q>(&self, k: &Q) -> Option<&K>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.maps[self.shard(k)].get_key_value(k).map(|(k, _)| k)
    }

    /// The shard of `k`, made this map's own.
    fn map_mut<Q: Hash + ?Sized>(&mut self, k: &Q) -> &mut HashMap<K, V> {
        let i = self.shard(k);
        Arc::make_mut(&mut self.maps[i])
    }

    fn len(&self) -> usize {
        self.maps.iter().map(|m| m.len()).sum()
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.maps.iter().flat_map(|m| m.iter())
    }
}

/// The names an address points back to (almost always one): sorted, no duplicates.
type Ptrs = Few<Arc<str>>;

/// Every name of the cluster zone and every PTR: one [`SvcZone`] per Service, so a change
/// rebuilds only its own Service's ([`Builder`]); every map is sharded ([`Shards`]), so a
/// change copies only what it touches.
#[derive(Clone, Debug)]
pub struct Index {
    cfg: Config,
    serial: u32,
    /// `<svc>.<ns>` (lower case) → that Service's names.
    services: Shards<Arc<str>, Arc<SvcZone>>,
    /// Namespace → how many Services it has (`<ns>.svc.<zone>` exists while any).
    namespaces: Shards<Arc<str>, u32>,
    /// Address → the names it points back to.
    ptr: Shards<IpAddr, Ptrs>,
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
    /// No hostname given: named by its address.
    dashed: bool,
}

/// Builds indexes incrementally. Objects are recognised by identity (`Arc::ptr_eq`) and the
/// snapshot is compared with the last one by [`crate::Window`], so a sync costs what changed: the
/// zones of the Services whose objects (or slices) changed are rebuilt and only their entries
/// of the index are touched.
#[derive(Default)]
pub struct Builder {
    cfg: Option<Config>,
    /// The last index built (its shards shared with what the server answers from).
    current: Option<Index>,
    /// The last snapshot's Services by the key they define, and slices by the key of the
    /// Service they label (`<svc>.<ns>`, lower case). More than one Service with a key: a
    /// duplicate, and the first in the snapshot's order is used.
    services: Tracked<Service, Arc<str>>,
    slices: Tracked<EndpointSlice, Arc<str>>,
    /// Shared relative names (`""`, `_tcp`, `_http._tcp`): the same in many Services.
    labels: HashMap<Box<str>, Arc<str>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("services", &self.services.len())
            .field("slices", &self.slices.len())
            .finish_non_exhaustive()
    }
}

/// The namespace of a key (`<svc>.<ns>`: a Service's name has no dot).
fn namespace_of(key: &str) -> &str {
    key.split_once('.').map_or("", |(_, ns)| ns)
}

/// `<svc>.<ns>`, lower case.
fn key_of(name: &str, ns: Option<&str>) -> Arc<str> {
    let ns = ns.unwrap_or("default");
    let mut k = String::with_capacity(name.len() + 1 + ns.len());
    k.push_str(name);
    k.push('.');
    k.push_str(ns);
    k.make_ascii_lowercase();
    Arc::from(k.as_str())
}

/// The key of a Service.
fn svc_key(svc: &Service) -> Option<Arc<str>> {
    let name = svc.metadata.name.as_deref()?;
    Some(key_of(name, svc.metadata.namespace.as_deref()))
}

/// The key of the Service a slice belongs to.
fn slice_key(s: &EndpointSlice) -> Option<Arc<str>> {
    let svc = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(key_of(svc, s.metadata.namespace.as_deref()))
}

impl Builder {
    /// The index of a snapshot. `serial`: the SOA serial (the agent passes the sync's time).
    pub fn build(&mut self, objs: &Objects, cfg: &Config, serial: u32) -> Index {
        match self.update(objs, cfg, serial) {
            Some(ix) => ix,
            None => self.current.clone().expect("an index was built"),
        }
    }

    /// The index of a snapshot, or `None` when it is the last one unchanged. A new index's SOA
    /// serial is `serial`, or one more than the last one's when that is not less.
    pub fn update(&mut self, objs: &Objects, cfg: &Config, serial: u32) -> Option<Index> {
        let zone = cfg.zone.trim_end_matches('.').to_ascii_lowercase();
        let cfg = Config {
            zone: zone.clone(),
            ttl: cfg.ttl,
        };
        if self.cfg.as_ref() != Some(&cfg) {
            *self = Self {
                cfg: Some(cfg.clone()),
                ..Self::default()
            };
        }
        let dirty = self.diff(objs);
        if dirty.is_empty() && self.current.is_some() {
            return None; // nothing changed: the same index, the same serial
        }
        let serial = match &self.current {
            Some(c) if c.serial >= serial => c.serial.wrapping_add(1),
            _ => serial,
        };
        let mut ix = self.current.take().unwrap_or_else(|| Index {
            cfg: cfg.clone(),
            serial,
            services: Shards::new(),
            namespaces: Shards::new(),
            ptr: Shards::new(),
            soa: Rr {
                owner: None,
                data: RData::Soa { serial },
            },
        });
        ix.serial = serial;
        ix.soa = Rr {
            owner: Some(Arc::from(zone.as_str())),
            data: RData::Soa { serial },
        };
        for key in dirty {
            self.define(&mut ix, &key, &objs.services, &zone);
        }
        self.current = Some(ix.clone());
        Some(ix)
    }

    /// Takes in the snapshot's objects; returns the keys whose definition may have changed:
    /// those of every object in the changed windows (new, gone, or moved, which can change
    /// which of two duplicates is first).
    fn diff(&mut self, objs: &Objects) -> HashSet<Arc<str>> {
        let mut dirty = HashSet::new();
        // One key per Service, shared by its slices' entries and its own.
        let services = &self.services;
        self.slices.take(
            &objs.slices,
            |s| slice_key(s).map(|k| services.key(&k).cloned().unwrap_or(k)),
            &mut dirty,
        );
        let slices = &self.slices;
        self.services.take(
            &objs.services,
            |s| svc_key(s).map(|k| slices.key(&k).cloned().unwrap_or(k)),
            &mut dirty,
        );
        dirty
    }

    /// Brings `key` in the index up to date with its first Service object (in `services`'
    /// order) and its slices, or takes it out.
    fn define(&mut self, ix: &mut Index, key: &Arc<str>, services: &[Arc<Service>], zone: &str) {
        let svc = self.services.first(key, services);
        let slices = self.slices.of(key);
        let from: Vec<usize> = if svc.as_deref().is_some_and(is_headless) {
            let mut v: Vec<usize> = slices.iter().map(addr).collect();
            v.sort_unstable();
            v
        } else {
            Vec::new() // a ClusterIP's names do not depend on its endpoints
        };
        let old = ix.services.get(key).cloned();
        if let (Some(o), Some(s)) = (&old, &svc)
            && o.svc == addr(s)
            && *o.slices == *from
        {
            return; // the same objects: the same zone
        }
        if let Some(o) = old {
            ix.remove(key, &o);
        }
        let Some(svc) = svc else { return };
        if !key.contains('.') {
            return;
        }
        let fqdn = format!("{key}.svc.{zone}");
        let z = SvcZone {
            svc: addr(&svc),
            slices: from.into(),
            ..svc_zone(&svc, slices, &fqdn, &mut self.labels)
        };
        ix.add(key, Arc::new(z));
    }
}

/// A Service without ClusterIPs (and not an ExternalName): its names are its endpoints'.
fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|spec| {
        spec.type_.as_deref() != Some("ExternalName") && cluster_ips(spec).is_empty()
    })
}

fn cluster_ips(spec: &crate::k8s::core::ServiceSpec) -> Vec<IpAddr> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(v), _) if !v.is_empty() => v.to_vec(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
    .iter()
    .filter_map(|s| parse_ip(s).ok())
    .collect()
}

/// One Service's names (`fqdn`: `<svc>.<ns>.svc.<zone>`, lower case). `labels` shares the
/// relative names many Services have.
fn svc_zone(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
    fqdn: &str,
    labels: &mut HashMap<Box<str>, Arc<str>>,
) -> SvcZone {
    let mut label = |s: &str| -> Arc<str> {
        if let Some(l) = labels.get(s) {
            return l.clone();
        }
        let l: Arc<str> = Arc::from(s);
        labels.insert(s.into(), l.clone());
        l
    };
    let mut names: BTreeMap<Arc<str>, NodeBuf> = BTreeMap::new();
    let mut ptr = Vec::new();
    let Some(spec) = svc.spec.as_ref() else {
        return SvcZone::default();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.more().external_name.as_deref();
        if let Some(target) = target.filter(|t| !t.is_empty()) {
            let t = target.trim_end_matches('.').to_ascii_lowercase();
            names.entry(label("")).or_default().cname = Some(Arc::from(t.as_str()));
        }
        return finish(names, ptr);
    }
    let ips = cluster_ips(spec);
    let headless = ips.is_empty();
    if !headless {
        return cluster_zone(spec, ips, Arc::from(fqdn), &mut label);
    }
    // Ready endpoints, deduplicated by address.
    let mut ready: BTreeMap<IpAddr, Ep> = BTreeMap::new();
    if headless {
        for e in slices.iter().flat_map(|s| s.endpoints.iter()) {
            let ok = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(ip) = e.addresses.first().and_then(|a| parse_ip(a).ok()) else {
                continue;
            };
            if ok {
                let given = e.hostname.as_deref().filter(|h| !h.is_empty());
                let ep = Ep {
                    ip,
                    dashed: given.is_none(),
                    hostname: given.map_or_else(|| dashed(ip), str::to_ascii_lowercase),
                };
                // An address in two slices: the same choice whatever their order (a given
                // hostname over the dashed address, then the least).
                match ready.entry(ip) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(ep);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if (ep.dashed, &ep.hostname) < (o.get().dashed, &o.get().hostname) {
                            o.insert(ep);
                        }
                    }
                }
            }
        }
        if ready.is_empty() {
            // No ready endpoint: the Service's name does not exist (NXDOMAIN).
            return SvcZone::default();
        }
    }
    let top = names.entry(label("")).or_default();
    if headless {
        for e in ready.values() {
            top.push(e.ip);
        }
    } else {
        for ip in &ips {
            top.push(*ip);
        }
    }
    // SRV targets: each endpoint's own name.
    let mut targets: Vec<Arc<str>> = Vec::new();
    for e in ready.values() {
        let name: Arc<str> = Arc::from(format!("{}.{fqdn}", e.hostname).as_str());
        names
            .entry(Arc::from(e.hostname.as_str()))
            .or_default()
            .push(e.ip);
        ptr.push((e.ip, name.clone()));
        targets.push(name);
    }
    let weight = srv_weight(targets.len());
    for p in spec.ports.iter().flatten() {
        let Some(pname) = p.name.as_deref().filter(|n| !n.is_empty()) else {
            continue; // unnamed ports have no SRV record
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
        names.entry(label(&format!("_{proto}"))).or_default();
        let node = names
            .entry(label(&format!("_{}._{proto}", pname.to_ascii_lowercase())))
            .or_default();
        node.srv
            .extend(targets.iter().map(|t| (weight, port, t.clone())));
    }
    finish(names, ptr)
}

/// The names of a Service with ClusterIPs `ips` ([`Names::Cluster`]).
fn cluster_zone(
    spec: &crate::k8s::core::ServiceSpec,
    ips: Vec<IpAddr>,
    fq: Arc<str>,
    label: &mut impl FnMut(&str) -> Arc<str>,
) -> SvcZone {
    let srv: Vec<(Arc<str>, u16, u16)> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let pname = p.name.as_deref().filter(|n| !n.is_empty())?; // no SRV unnamed
            let port = u16::try_from(p.port).ok()?;
            let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
            let name = format!("_{}._{proto}", pname.to_ascii_lowercase());
            let at = u16::try_from(name.len() - proto.len() - 1).ok()?;
            Some((label(&name), port, at))
        })
        .collect();
    SvcZone {
        names: Names::Cluster {
            fq,
            ips: ips.into(),
            srv: srv.into(),
        },
        ..SvcZone::default()
    }
}

fn finish(names: BTreeMap<Arc<str>, NodeBuf>, ptr: Vec<(IpAddr, Arc<str>)>) -> SvcZone {
    SvcZone {
        names: Names::Built {
            names: names.into_iter().map(|(k, n)| (k, n.done())).collect(),
            ptr: ptr.into(),
        },
        ..SvcZone::default()
    }
}

impl Index {
    /// Takes a key's zone out of the index.
    fn remove(&mut self, key: &Arc<str>, z: &SvcZone) {
        self.services.map_mut(key).remove(key);
        let ns = namespace_of(key);
        let m = self.namespaces.map_mut(ns);
        if let Some(n) = m.get_mut(ns) {
            *n -= 1;
            if *n == 0 {
                m.remove(ns);
            }
        }
        for (ip, name) in z.ptrs() {
            let m = self.ptr.map_mut(&ip);
            let Some(p) = m.get_mut(&ip) else { continue };
            p.retain(|n| n != name);
            if p.is_empty() {
                m.remove(&ip);
            }
        }
    }

    /// Puts a key's zone into the index.
    fn add(&mut self, key: &Arc<str>, z: Arc<SvcZone>) {
        // One copy of a namespace's name, shared by its Services.
        let ns = namespace_of(key);
        let ns = self
            .namespaces
            .key(ns)
            .cloned()
            .unwrap_or_else(|| Arc::from(ns));
        *self.namespaces.map_mut(&*ns).entry(ns).or_default() += 1;
        for (ip, name) in z.ptrs() {
            let p = self.ptr.map_mut(&ip).entry(ip).or_default();
            if let Err(i) = p.binary_search(name) {
                p.insert(i, name.clone());
            }
        }
        self.services.map_mut(key).insert(key.clone(), z);
    }
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
        self.services.len() == 0
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
    fn find(&self, rel: &str) -> Result<Cow<'_, Node>, bool> {
        match rel {
            "" | "svc" => return Err(true),
            "dns-version" => return Ok(Cow::Borrowed(&DNS_VERSION)),
            _ => {}
        }
        let Some(r) = rel.strip_suffix(".svc") else {
            return Err(false); // no pod records, no other subdomains
        };
        let (rest, ns) = r.rsplit_once('.').unwrap_or(("", r));
        if rest.is_empty() {
            return Err(self.namespaces.get(ns).is_some());
        }
        // `<svc>.<ns>` is the tail of `r`: the key, without copying.
        let (prefix, key) = match rest.rsplit_once('.') {
            Some((p, s)) => (p, &r[p.len() + 1..p.len() + 1 + s.len() + 1 + ns.len()]),
            None => ("", r),
        };
        let z = self.services.get(key).ok_or(false)?;
        z.get(prefix).ok_or(false)
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
                        .as_slice()
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
        let asked = rel;
        // The in-zone target of the CNAME followed last (`None`: the name asked).
        let mut owner: Option<Arc<str>> = None;
        // Follow in-zone CNAMEs (ExternalName Services naming other Services), at most 8.
        for _ in 0..8 {
            let rel = match &owner {
                Some(t) => self.relative(t).unwrap_or_default(),
                None => asked,
            };
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
            if let Some(target) = node.cname()
                && qt != qtype::CNAME
            {
                answers.push(Rr {
                    owner: owner.clone(),
                    data: RData::Cname(target.clone()),
                });
                if self.relative(target).is_none() {
                    return Lookup::Chase {
                        answers,
                        target: target.clone(),
                    };
                }
                owner = Some(target.clone());
                continue;
            }
            self.records(
                &node,
                rel,
                qt,
                owner.as_ref(),
                &mut answers,
                &mut additional,
            );
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
            answers.extend(node.a().map(|a| rr(RData::A(a))));
        }
        if qt == qtype::AAAA || any {
            answers.extend(node.aaaa().map(|a| rr(RData::Aaaa(a))));
        }
        if qt == qtype::CNAME || any {
            answers.extend(node.cname().map(|c| rr(RData::Cname(c.clone()))));
        }
        if (qt == qtype::TXT || any) && rel == "dns-version" {
            answers.push(rr(RData::Txt(Arc::from(SCHEMA_VERSION))));
        }
        if qt == qtype::SRV || any {
            for (weight, port, target) in node.srv() {
                answers.push(rr(RData::Srv {
                    priority: 0,
                    weight,
                    port,
                    target: target.clone(),
                }));
                if let Some(t) = self.relative(target).and_then(|r| self.find(r).ok()) {
                    let extra = |data| Rr {
                        owner: Some(target.clone()),
                        data,
                    };
                    additional.extend(t.a().map(|a| extra(RData::A(a))));
                    additional.extend(t.aaaa().map(|a| extra(RData::Aaaa(a))));
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

    /// Every name and PTR with its records, sorted: two indexes answer alike when these are
    /// equal.
    #[cfg(test)]
    fn dump(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, z) in self.services.iter() {
            for rel in z.rels() {
                let n = z.get(&rel).expect("a name it holds");
                out.push(format!(
                    "{rel}|{key}: a {:?} aaaa {:?} srv {:?} cname {:?}",
                    n.a().collect::<Vec<_>>(),
                    n.aaaa().collect::<Vec<_>>(),
                    n.srv().collect::<Vec<_>>(),
                    n.cname()
                ));
            }
        }
        for (ns, n) in self.namespaces.iter() {
            out.push(format!("ns {ns} {n}"));
        }
        for (ip, p) in self.ptr.iter() {
            out.push(format!("ptr {ip} {:?}", p.as_slice()));
        }
        out.sort();
        out
    }
}

/// `dns-version.<zone>`: a name with a TXT record only (added by `records`).
static DNS_VERSION: std::sync::LazyLock<Node> = std::sync::LazyLock::new(Node::default);

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
