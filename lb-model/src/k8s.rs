//! The Kubernetes objects `lb` reads, slim: only the fields the model, the control plane and
//! DNS use, with the API's own field names and shapes (so they read like `k8s-openapi`'s),
//! and nothing else — serde skips every other field as it parses. A Service, an EndpointSlice,
//! a Pod kept for 50,000 Services is what a node agent pays on every node, so unused fields,
//! `managedFields`, the `kubectl.kubernetes.io/last-applied-configuration` annotation and the
//! full `ObjectMeta` are never held.
//!
//! Strings are a [`Str`], which holds up to 24 bytes in place: names, namespaces, addresses,
//! port names and the API's enum values (`TCP`, `IPv4`, `ClusterIP`) cost no allocation.
//! Labels, annotations and selectors are a [`Labels`]: a sorted boxed slice, not a B-tree (a
//! B-tree with one label allocates a node for eleven), with well-known keys and values as
//! static strings. Lists are boxed slices, exactly as long as they are. A uid is a [`Uid`]: a
//! UUID's 16 bytes. An endpoint's addresses are a [`crate::few::Few`], which holds one address
//! in place. An endpoint's target reference keeps kind, namespace, name and uid (the agent
//! drops it from slices of the API server); owner references are not kept (nothing reads
//! them). Timestamps and `IntOrString` are `k8s-openapi`'s own types.
//!
//! Serializing writes the fields kept, in the API's spelling (`lb-agent get -o yaml`).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString};

/// A string of an object: up to 24 bytes (names, namespaces, addresses, ports' names, the
/// API's enum values) held in place, without an allocation of its own.
pub type Str = compact_str::CompactString;

/// String → string, sorted by key, one entry per key: labels, annotations, selectors. Reads
/// like the `BTreeMap<Str, Str>` of the API types (`get`, `iter`, `insert`, …). One exact
/// allocation: a boxed slice, 16 bytes in place where a vector takes 24, in every object's
/// labels and annotations and every selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(Str, Str)]>);

/// Label and annotation keys and values that most objects of a cluster carry and that are
/// longer than a [`Str`] holds in place: each is held as one static string, where it would
/// take an allocation on every object (every EndpointSlice has the first two keys, the
/// controller's value and the trigger-time annotation).
const WELL_KNOWN: [&str; 21] = [
    "kubernetes.io/service-name",
    "endpointslice.kubernetes.io/managed-by",
    "endpointslice-controller.k8s.io",
    "endpointslicemirroring-controller.k8s.io",
    "endpoints.kubernetes.io/last-change-trigger-time",
    "endpoints.kubernetes.io/managed-by",
    "service.kubernetes.io/headless",
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
    "kubernetes.io/cluster-service",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "node.kubernetes.io/instance-type",
    "kubectl.kubernetes.io/restartedAt",
    "kubectl.kubernetes.io/default-container",
];

/// `s`, as the static string of [`WELL_KNOWN`] when it is one and would take an allocation.
fn shared(s: Str) -> Str {
    if !s.is_heap_allocated() {
        return s;
    }
    match WELL_KNOWN.iter().find(|w| **w == s) {
        Some(w) => Str::const_new(w),
        None => s,
    }
}

impl Labels {
    /// From entries sorted by key, one per key: well-known strings shared, no spare room.
    fn new(v: impl Iterator<Item = (Str, Str)>) -> Self {
        Self(v.map(|(k, v)| (shared(k), shared(v))).collect())
    }

    /// Changes the entries as a vector (rare: the control plane's own labels).
    fn edit<R>(&mut self, f: impl FnOnce(&mut Vec<(Str, Str)>) -> R) -> R {
        let mut v = std::mem::take(&mut self.0).into_vec();
        let r = f(&mut v);
        self.0 = v.into_boxed_slice();
        r
    }

    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Str> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    #[must_use]
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key`; returns the value it had.
    pub fn insert(&mut self, key: impl Into<Str>, value: impl Into<Str>) -> Option<Str> {
        let (key, value) = (shared(key.into()), shared(value.into()));
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.edit(|v| v.insert(i, (key, value)));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Str> {
        let i = self.find(key).ok()?;
        Some(self.edit(|v| v.remove(i).1))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Str, &Str)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Str> {
        self.0.iter().map(|(k, _)| k)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = Str;
    /// The value of `key`; panics when there is none, as a map's index does.
    fn index(&self, key: &str) -> &Str {
        self.get(key)
            .unwrap_or_else(|| panic!("no entry {key:?} in {self:?}"))
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a Str, &'a Str);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Str, Str)>, fn(&'a (Str, Str)) -> (&'a Str, &'a Str)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K: Into<Str>, V: Into<Str>> FromIterator<(K, V)> for Labels {
    /// The last value of a repeated key wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(it: I) -> Self {
        let map: BTreeMap<Str, Str> = it.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Self::new(map.into_iter())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(m: BTreeMap<String, String>) -> Self {
        // Already sorted, one entry per key.
        Self::new(m.into_iter().map(|(k, v)| (k.into(), v.into())))
    }
}

impl<K: Into<Str>, V: Into<Str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(a: [(K, V); N]) -> Self {
        a.into_iter().collect()
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `key: null` values are dropped, as the API server drops them.
        // The map is sorted with one entry per key already: straight into the slice.
        let m = BTreeMap::<Str, Option<Str>>::deserialize(d)?;
        Ok(Self::new(m.into_iter().filter_map(|(k, v)| Some((k, v?)))))
    }
}

/// Annotations too large to be worth keeping and never read (`kubectl apply`'s copy of the
/// whole object).
const DROPPED_ANNOTATIONS: [&str; 1] = ["kubectl.kubernetes.io/last-applied-configuration"];

fn annotations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Labels>, D::Error> {
    let Some(mut a) = Option::<Labels>::deserialize(d)? else {
        return Ok(None);
    };
    for k in DROPPED_ANNOTATIONS {
        a.remove(k);
    }
    Ok(Some(a))
}

/// A list exactly as long as it is: serde grows a vector as it reads (to room for 4 items
/// at first), and one Service port in room for 4 is 336 bytes nobody uses, per object.
fn vec<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(opt_vec(d)?.unwrap_or_default())
}

/// A field the API calls required, read as `k8s-openapi` reads it: absent or `null` is the
/// default (an EndpointSlice with no endpoints comes with `endpoints: null`), so that the model
/// names the field when its value is no good, and a watch never fails on one object.
fn or_default<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn opt_vec<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    let mut v = Option::<Vec<T>>::deserialize(d)?;
    if let Some(v) = &mut v {
        v.shrink_to_fit();
    }
    Ok(v)
}

/// The metadata kept: identity, labels and annotations, creation and deletion, owners.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<Uid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(
        default,
        deserialize_with = "annotations",
        skip_serializing_if = "Option::is_none"
    )]
    pub annotations: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
}

impl From<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> for ObjectMeta {
    /// The kept fields of the API's metadata (the API source's watch reads the full type,
    /// which kube-rs needs, and keeps this).
    fn from(m: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        let map = |m: Option<BTreeMap<String, String>>| m.map(Labels::from);
        let mut annotations = map(m.annotations);
        if let Some(a) = &mut annotations {
            for k in DROPPED_ANNOTATIONS {
                a.remove(k);
            }
        }
        Self {
            name: m.name.map(Str::from),
            namespace: m.namespace.map(Str::from),
            uid: m.uid.as_deref().map(Uid::parse),
            labels: map(m.labels),
            annotations,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
        }
    }
}

/// An object's uid. The API server makes them UUIDs, held here as their 16 bytes (36
/// characters would take an allocation of their own on every object); anything else is kept
/// as it was written.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Uid {
    Uuid([u8; 16]),
    Other(Str),
}

impl Uid {
    /// A UUID in its canonical form (lower-case hex, 8-4-4-4-12) as 16 bytes, so that it is
    /// written back exactly as it was read; anything else as it is.
    #[must_use]
    pub fn parse(s: &str) -> Self {
        let b = s.as_bytes();
        let dashes = [8, 13, 18, 23];
        let mut out = [0u8; 16];
        let mut n = 0;
        let canonical = b.len() == 36
            && b.iter().enumerate().all(|(i, &c)| {
                if dashes.contains(&i) {
                    return c == b'-';
                }
                let v = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return false,
                };
                out[n / 2] |= if n % 2 == 0 { v << 4 } else { v };
                n += 1;
                true
            });
        if canonical {
            Self::Uuid(out)
        } else {
            Self::Other(s.into())
        }
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uuid(b) => {
                for (i, x) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{x:02x}")?;
                }
                Ok(())
            }
            Self::Other(s) => f.write_str(s),
        }
    }
}

impl std::fmt::Debug for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl From<&str> for Uid {
    fn from(s: &str) -> Self {
        Self::parse(s)
    }
}

impl Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Uid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&Str::deserialize(d)?))
    }
}

/// Another object an object names (an endpoint's Pod): what `lb-agent get` shows of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<Uid>,
}

/// What every slim object has: its metadata, and the API's `kind` / `apiVersion`.
pub trait Object {
    const KIND: &'static str;
    const API_VERSION: &'static str;
    fn metadata(&self) -> &ObjectMeta;
}

macro_rules! object {
    ($t:ident, $kind:literal, $api:literal) => {
        impl Object for $t {
            const KIND: &'static str = $kind;
            const API_VERSION: &'static str = $api;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
        }
    };
}

pub mod core {
    //! `v1`: Service, Pod, Node, Endpoints.
    use serde::{Deserialize, Serialize};

    pub use super::ObjectReference;
    use super::{IntOrString, Labels, Object, ObjectMeta, Str};

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct Service {
        #[serde(default, deserialize_with = "super::or_default")]
        pub metadata: ObjectMeta,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub spec: Option<ServiceSpec>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub status: Option<ServiceStatus>,
    }
    object!(Service, "Service", "v1");

    /// A Service's `spec`. The fields most Services leave unset are behind one box
    /// ([`ServiceSpec::more`]): 192 bytes per Service instead of 408. Read and written as the
    /// API's flat `spec`.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(from = "FlatServiceSpec", into = "FlatServiceSpec")]
    pub struct ServiceSpec {
        pub type_: Option<Str>,
        pub cluster_ip: Option<Str>,
        pub cluster_ips: Option<Box<[Str]>>,
        pub ip_families: Option<Box<[Str]>>,
        pub ip_family_policy: Option<Str>,
        pub ports: Option<Box<[ServicePort]>>,
        pub selector: Option<Labels>,
        pub internal_traffic_policy: Option<Str>,
        pub session_affinity: Option<Str>,
        /// `None`: every field of [`ServiceSpecMore`] unset.
        pub more: Option<Box<ServiceSpecMore>>,
    }

    /// The fields of a Service's `spec` that most Services leave unset.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct ServiceSpecMore {
        pub external_ips: Option<Vec<Str>>,
        pub external_name: Option<Str>,
        pub load_balancer_ip: Option<Str>,
        pub load_balancer_source_ranges: Option<Vec<Str>>,
        pub load_balancer_class: Option<Str>,
        pub allocate_load_balancer_node_ports: Option<bool>,
        pub external_traffic_policy: Option<Str>,
        pub health_check_node_port: Option<i32>,
        pub session_affinity_config: Option<SessionAffinityConfig>,
        pub publish_not_ready_addresses: Option<bool>,
        pub traffic_distribution: Option<Str>,
    }

    /// Every field unset.
    static NO_MORE: ServiceSpecMore = ServiceSpecMore {
        external_ips: None,
        external_name: None,
        load_balancer_ip: None,
        load_balancer_source_ranges: None,
        load_balancer_class: None,
        allocate_load_balancer_node_ports: None,
        external_traffic_policy: None,
        health_check_node_port: None,
        session_affinity_config: None,
        publish_not_ready_addresses: None,
        traffic_distribution: None,
    };

    impl ServiceSpec {
        /// The fields most Services leave unset (all `None` when there are none).
        #[must_use]
        pub fn more(&self) -> &ServiceSpecMore {
            self.more.as_deref().unwrap_or(&NO_MORE)
        }

        /// The same, to set one.
        pub fn more_mut(&mut self) -> &mut ServiceSpecMore {
            self.more.get_or_insert_default()
        }
    }

    impl From<FlatServiceSpec> for ServiceSpec {
        fn from(f: FlatServiceSpec) -> Self {
            let more = ServiceSpecMore {
                external_ips: f.external_ips,
                external_name: f.external_name,
                load_balancer_ip: f.load_balancer_ip,
                load_balancer_source_ranges: f.load_balancer_source_ranges,
                load_balancer_class: f.load_balancer_class,
                allocate_load_balancer_node_ports: f.allocate_load_balancer_node_ports,
                external_traffic_policy: f.external_traffic_policy,
                health_check_node_port: f.health_check_node_port,
                session_affinity_config: f.session_affinity_config,
                publish_not_ready_addresses: f.publish_not_ready_addresses,
                traffic_distribution: f.traffic_distribution,
            };
            Self {
                type_: f.type_,
                cluster_ip: f.cluster_ip,
                cluster_ips: f.cluster_ips.map(Vec::into_boxed_slice),
                ip_families: f.ip_families.map(Vec::into_boxed_slice),
                ip_family_policy: f.ip_family_policy,
                ports: f.ports.map(Vec::into_boxed_slice),
                selector: f.selector,
                internal_traffic_policy: f.internal_traffic_policy,
                session_affinity: f.session_affinity,
                more: (more != NO_MORE).then(|| Box::new(more)),
            }
        }
    }

    impl From<ServiceSpec> for FlatServiceSpec {
        fn from(s: ServiceSpec) -> Self {
            let more = s.more.map(|m| *m).unwrap_or_default();
            Self {
                type_: s.type_,
                cluster_ip: s.cluster_ip,
                cluster_ips: s.cluster_ips.map(Into::into),
                ip_families: s.ip_families.map(Into::into),
                ip_family_policy: s.ip_family_policy,
                ports: s.ports.map(Into::into),
                selector: s.selector,
                internal_traffic_policy: s.internal_traffic_policy,
                session_affinity: s.session_affinity,
                external_ips: more.external_ips,
                external_name: more.external_name,
                load_balancer_ip: more.load_balancer_ip,
                load_balancer_source_ranges: more.load_balancer_source_ranges,
                load_balancer_class: more.load_balancer_class,
                allocate_load_balancer_node_ports: more.allocate_load_balancer_node_ports,
                external_traffic_policy: more.external_traffic_policy,
                health_check_node_port: more.health_check_node_port,
                session_affinity_config: more.session_affinity_config,
                publish_not_ready_addresses: more.publish_not_ready_addresses,
                traffic_distribution: more.traffic_distribution,
            }
        }
    }

    /// `spec` as the API writes it: what [`ServiceSpec`] is read from and written as.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct FlatServiceSpec {
        #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
        type_: Option<Str>,
        #[serde(rename = "clusterIP", skip_serializing_if = "Option::is_none")]
        cluster_ip: Option<Str>,
        #[serde(
            rename = "clusterIPs",
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        cluster_ips: Option<Vec<Str>>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        ip_families: Option<Vec<Str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ip_family_policy: Option<Str>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        ports: Option<Vec<ServicePort>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        selector: Option<Labels>,
        #[serde(
            rename = "externalIPs",
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        external_ips: Option<Vec<Str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        external_name: Option<Str>,
        #[serde(rename = "loadBalancerIP", skip_serializing_if = "Option::is_none")]
        load_balancer_ip: Option<Str>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        load_balancer_source_ranges: Option<Vec<Str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        load_balancer_class: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        allocate_load_balancer_node_ports: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        external_traffic_policy: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        internal_traffic_policy: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        health_check_node_port: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_affinity: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_affinity_config: Option<SessionAffinityConfig>,
        #[serde(skip_serializing_if = "Option::is_none")]
        publish_not_ready_addresses: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        traffic_distribution: Option<Str>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ServicePort {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub protocol: Option<Str>,
        #[serde(default, deserialize_with = "super::or_default")]
        pub port: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub target_port: Option<IntOrString>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub node_port: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub app_protocol: Option<Str>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SessionAffinityConfig {
        #[serde(rename = "clientIP", skip_serializing_if = "Option::is_none")]
        pub client_ip: Option<ClientIPConfig>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ClientIPConfig {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeout_seconds: Option<i32>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceStatus {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub load_balancer: Option<LoadBalancerStatus>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LoadBalancerStatus {
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub ingress: Option<Vec<LoadBalancerIngress>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LoadBalancerIngress {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ip: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub hostname: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ip_mode: Option<Str>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct Node {
        #[serde(default, deserialize_with = "super::or_default")]
        pub metadata: ObjectMeta,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub spec: Option<NodeSpec>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub status: Option<NodeStatus>,
    }
    object!(Node, "Node", "v1");

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NodeSpec {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub unschedulable: Option<bool>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub taints: Option<Vec<Taint>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Taint {
        #[serde(default, deserialize_with = "super::or_default")]
        pub key: Str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub value: Option<Str>,
        #[serde(default, deserialize_with = "super::or_default")]
        pub effect: Str,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NodeStatus {
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub addresses: Option<Vec<NodeAddress>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NodeAddress {
        #[serde(default, deserialize_with = "super::or_default")]
        pub address: Str,
        #[serde(rename = "type", default, deserialize_with = "super::or_default")]
        pub type_: Str,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct Pod {
        #[serde(default, deserialize_with = "super::or_default")]
        pub metadata: ObjectMeta,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub spec: Option<PodSpec>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub status: Option<PodStatus>,
    }
    object!(Pod, "Pod", "v1");

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodSpec {
        #[serde(default, deserialize_with = "super::vec")]
        pub containers: Vec<Container>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub init_containers: Option<Vec<Container>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub node_name: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub hostname: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub subdomain: Option<Str>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Container {
        #[serde(default, deserialize_with = "super::or_default")]
        pub name: Str,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub ports: Option<Vec<ContainerPort>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub restart_policy: Option<Str>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ContainerPort {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<Str>,
        #[serde(default, deserialize_with = "super::or_default")]
        pub container_port: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub protocol: Option<Str>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodStatus {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub phase: Option<Str>,
        #[serde(rename = "podIP", skip_serializing_if = "Option::is_none")]
        pub pod_ip: Option<Str>,
        #[serde(
            rename = "podIPs",
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub pod_ips: Option<Vec<PodIP>>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub conditions: Option<Vec<PodCondition>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct PodIP {
        #[serde(default, deserialize_with = "super::or_default")]
        pub ip: Str,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct PodCondition {
        #[serde(rename = "type", default, deserialize_with = "super::or_default")]
        pub type_: Str,
        #[serde(default, deserialize_with = "super::or_default")]
        pub status: Str,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct Endpoints {
        #[serde(default, deserialize_with = "super::or_default")]
        pub metadata: ObjectMeta,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub subsets: Option<Vec<EndpointSubset>>,
    }
    object!(Endpoints, "Endpoints", "v1");

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSubset {
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub addresses: Option<Vec<EndpointAddress>>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub not_ready_addresses: Option<Vec<EndpointAddress>>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub ports: Option<Vec<EndpointPort>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointAddress {
        #[serde(default, deserialize_with = "super::or_default")]
        pub ip: Str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub hostname: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub node_name: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub target_ref: Option<Box<ObjectReference>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointPort {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<Str>,
        #[serde(default, deserialize_with = "super::or_default")]
        pub port: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub protocol: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub app_protocol: Option<Str>,
    }
}

pub mod discovery {
    //! `discovery.k8s.io/v1`: EndpointSlice.
    use serde::{Deserialize, Serialize};

    use super::{Object, ObjectMeta, ObjectReference, Str};
    use crate::few::Few;

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSlice {
        #[serde(default, deserialize_with = "super::or_default")]
        pub metadata: ObjectMeta,
        #[serde(default, deserialize_with = "super::or_default")]
        pub address_type: Str,
        #[serde(default, deserialize_with = "super::or_default")]
        pub endpoints: Box<[Endpoint]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ports: Option<Box<[EndpointPort]>>,
    }
    object!(EndpointSlice, "EndpointSlice", "discovery.k8s.io/v1");

    impl EndpointSlice {
        /// Drops the endpoints' target references, as the agent keeps a slice from the API
        /// server. Nothing there reads them (only the standalone control plane shows them, of
        /// the slices it makes), and the EndpointSlice controller gives every endpoint one:
        /// its Pod's kind, namespace, name and uid, over 100 bytes an endpoint.
        pub fn drop_target_refs(&mut self) {
            for e in &mut self.endpoints {
                e.target_ref = None;
            }
        }
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        #[serde(default)]
        pub addresses: Few<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub conditions: Option<EndpointConditions>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub hostname: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub node_name: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub zone: Option<Str>,
        /// Boxed: most endpoints have none, and an endpoint is held per address of every
        /// slice.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub hints: Option<Box<EndpointHints>>,
        /// Boxed: the agent drops it from slices of the API server
        /// ([`EndpointSlice::drop_target_refs`]).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub target_ref: Option<Box<ObjectReference>>,
    }

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointConditions {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ready: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub serving: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub terminating: Option<bool>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointHints {
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub for_zones: Option<Vec<ForZone>>,
        #[serde(
            default,
            deserialize_with = "super::opt_vec",
            skip_serializing_if = "Option::is_none"
        )]
        pub for_nodes: Option<Vec<ForNode>>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct ForZone {
        #[serde(default, deserialize_with = "super::or_default")]
        pub name: Str,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct ForNode {
        #[serde(default, deserialize_with = "super::or_default")]
        pub name: Str,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointPort {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub port: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub protocol: Option<Str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub app_protocol: Option<Str>,
    }
}

#[cfg(test)]
mod tests {
    use super::{Labels, Str, Uid, core::Service, discovery::EndpointSlice};

    #[test]
    fn a_uuid_uid_is_held_as_16_bytes_and_written_back_as_read() {
        for s in [
            "0b8f3a52-6c1e-4f0e-9d6a-2f1c3b4a5d6e",
            "0B8F3A52-6C1E-4F0E-9D6A-2F1C3B4A5D6E",
            "uid-7",
            "",
        ] {
            let u = Uid::parse(s);
            assert_eq!(u.to_string(), s);
            let json = serde_json::to_string(&u).unwrap();
            assert_eq!(serde_json::from_str::<Uid>(&json).unwrap(), u);
        }
        assert!(matches!(
            Uid::parse("0b8f3a52-6c1e-4f0e-9d6a-2f1c3b4a5d6e"),
            Uid::Uuid(_)
        ));
        assert!(matches!(
            Uid::parse("0B8F3A52-6C1E-4F0E-9D6A-2F1C3B4A5D6E"),
            Uid::Other(_)
        ));
        assert!(std::mem::size_of::<Option<Uid>>() <= 32);
    }

    #[test]
    fn well_known_label_strings_take_no_allocation_and_read_as_written() {
        let json = serde_json::json!({
            "metadata": {
                "name": "web-abcde",
                "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "example.com/a-label-key-longer-than-24": "x",
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-08T00:00:00Z"},
            },
            "addressType": "IPv4",
            "endpoints": [],
        });
        let s: EndpointSlice = serde_json::from_value(json.clone()).unwrap();
        let m = &s.metadata;
        let labels = m.labels.as_ref().unwrap();
        for (k, v) in labels.iter().chain(m.annotations.as_ref().unwrap().iter()) {
            let own = k.as_str() == "example.com/a-label-key-longer-than-24";
            assert_eq!(k.is_heap_allocated(), own, "{k}");
            assert!(!v.is_heap_allocated(), "{v}");
        }
        assert_eq!(labels.get("kubernetes.io/service-name").unwrap(), "web");
        assert_eq!(
            serde_json::to_value(&s).unwrap()["metadata"],
            json["metadata"]
        );
        // Built in code, inserted, or converted from the API's type: shared alike.
        let mut l = Labels::from([("app.kubernetes.io/instance", "web")]);
        l.insert("service.kubernetes.io/headless", "");
        let api = Labels::from(std::collections::BTreeMap::from([(
            "topology.kubernetes.io/zone".to_string(),
            "zone-a".to_string(),
        )]));
        assert!(l.keys().chain(api.keys()).all(|k| !k.is_heap_allocated()));
        // Each is one a string would allocate for.
        assert!(super::WELL_KNOWN.iter().all(|w| w.len() > 24));
    }

    #[test]
    fn a_services_rarely_set_fields_are_boxed_only_when_set() {
        let plain: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"type": "ClusterIP", "clusterIP": "198.19.0.1", "ports": [{"port": 80}]}
        }))
        .unwrap();
        let spec = plain.spec.as_ref().unwrap();
        assert!(spec.more.is_none());
        assert!(std::mem::size_of::<super::core::ServiceSpec>() <= 192);
        assert_eq!(spec.more().external_ips, None);
        let lb = serde_json::json!({
            "metadata": {"name": "b"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "198.19.0.2",
                "externalIPs": ["198.18.9.9"], "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 30100, "publishNotReadyAddresses": true
            }
        });
        let svc: Service = serde_json::from_value(lb.clone()).unwrap();
        let more = svc.spec.as_ref().unwrap().more();
        assert_eq!(
            more.external_ips.as_deref(),
            Some(&["198.18.9.9".into()][..])
        );
        assert_eq!(more.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(more.health_check_node_port, Some(30100));
        assert_eq!(more.publish_not_ready_addresses, Some(true));
        // Written back flat, as the API writes it.
        assert_eq!(serde_json::to_value(&svc).unwrap(), lb);
        let mut s = plain.spec.clone().unwrap();
        s.more_mut().health_check_node_port = Some(30101);
        assert_eq!(
            serde_json::to_value(&s).unwrap()["healthCheckNodePort"],
            30101
        );
    }

    #[test]
    fn labels_read_like_a_map_and_stay_sorted() {
        let mut l: Labels = [
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(l.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(l.get("b").map(Str::as_str), Some("2"));
        assert_eq!(l.insert("a", "9").as_deref(), Some("1"));
        assert_eq!(l.insert("c", "3"), None);
        assert_eq!(l.remove("b").as_deref(), Some("2"));
        assert_eq!(
            l.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            [("a", "9"), ("c", "3")]
        );
        assert!(!l.contains_key("b"));
        assert_eq!(l["c"], "3");
    }

    /// Unknown fields are skipped, null label values dropped, `kubectl apply`'s copy of the
    /// object dropped, lists kept exactly as long as they are, and what the API requires
    /// still required.
    #[test]
    fn an_object_parses_into_only_what_is_kept() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "t", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                "labels": {"app": "web", "gone": null},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"huge\": true}",
                    "keep": "me"
                }
            },
            "spec": {
                "clusterIPs": ["198.19.0.10"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                "someFutureField": {"a": 1}
            },
            "status": {"conditions": []}
        }))
        .expect("a Service");
        let m = &svc.metadata;
        assert_eq!(m.labels.as_ref().map(Labels::len), Some(1));
        let a = m.annotations.as_ref().expect("annotations");
        assert_eq!((a.len(), a.get("keep").map(Str::as_str)), (1, Some("me")));
        let spec = svc.spec.as_ref().expect("spec");
        // Boxed slices: exactly as long as they are.
        assert_eq!(spec.ports.as_ref().map(|p| p.len()), Some(1));
        assert_eq!(spec.cluster_ips.as_ref().map(|p| p.len()), Some(1));

        // Required by the API, absent or null here: the default, as k8s-openapi reads it
        // (the model then names the field).
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"}, "spec": {"ports": [{"name": "http", "port": null}]}
        }))
        .expect("a port without its number");
        assert_eq!(svc.spec.expect("spec").ports.expect("ports")[0].port, 0);
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": null, "addressType": "IPv4", "endpoints": null
        }))
        .expect("a slice with no endpoints");
        assert!(s.endpoints.is_empty());
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "addressType": "IPv4", "endpoints": [{"conditions": {"ready": true}}]
        }))
        .expect("an endpoint without addresses");
        assert!(s.endpoints[0].addresses.is_empty());
    }
}
