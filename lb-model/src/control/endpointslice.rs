//! Pods + a Service's `spec.selector` → EndpointSlices, with the rules of the upstream
//! EndpointSlice controller (pkg/controller/endpointslice, staging k8s.io/endpointslice):
//!
//! * Pods of the Service's namespace whose labels contain every selector pair; a Pod without an
//!   IP, or in phase Failed / Succeeded, is left out;
//! * one slice family per address type the Service has (`spec.ipFamilies`, else its ClusterIP's
//!   family, else both), each Pod contributing its `status.podIPs` entry of that family;
//! * `serving` = the Pod's Ready condition, `terminating` = `deletionTimestamp` set, `ready` =
//!   `publishNotReadyAddresses` || (serving && !terminating). A hand-written Pod without any
//!   `status.conditions` counts as Ready: files have no kubelet (documented deviation);
//! * ports resolved per Pod: a numeric `targetPort` (or none: the `port`) as is, a named one
//!   against the Pod's container ports by name and protocol; a Pod lacking it loses only that
//!   port. Pods are grouped by their resolved port set, as upstream;
//! * at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints per slice; `nodeName`, `zone` (from the Node
//!   object, when the manifests have one), `hostname` (when the Pod's `subdomain` is the
//!   Service's name), `targetRef`; labels `kubernetes.io/service-name` and
//!   `endpointslice.kubernetes.io/managed-by`.
//!
//! Slice names are derived from the Service, the address type, the port set and the chunk, so
//! that a re-read yields the same names (upstream uses `generateName`).
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use crate::few::Few;
use crate::k8s::ObjectReference;
use crate::k8s::core::{Pod, Service, ServicePort};
use crate::k8s::discovery::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use crate::k8s::{ObjectMeta, Str};
use compact_str::ToCompactString as _;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Error, fnv1a};
use crate::model::{LABEL_SERVICE_NAME, NsName, ObjectRef, parse_ip};

/// Label naming the controller that manages a slice.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The upstream EndpointSlice controller's `managed-by` value; ours is the same, since our
/// slices stand for exactly what it would write.
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// Upstream `--max-endpoints-per-slice` default.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// Address types (`IPv4`, `IPv6`) a Service's slices are made for, as upstream
/// `getAddressTypesForService`: `spec.ipFamilies`, else the ClusterIP's family, else both.
pub(crate) fn address_types(svc: &Service) -> Vec<bool> {
    let spec = svc.spec.as_ref();
    let mut v6s: Vec<bool> = spec
        .and_then(|s| s.ip_families.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(false),
            "IPv6" => Some(true),
            _ => None,
        })
        .collect();
    v6s.dedup();
    if !v6s.is_empty() {
        return v6s;
    }
    if let Some(ip) = spec
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
        && let Ok(ip) = parse_ip(ip)
    {
        return vec![ip.is_ipv6()];
    }
    vec![false, true]
}

/// The Pod's Ready condition; no conditions at all (a hand-written Pod) counts as Ready.
fn pod_ready(pod: &Pod) -> bool {
    match pod.status.as_ref().and_then(|s| s.conditions.as_ref()) {
        None => true,
        Some(c) if c.is_empty() => true,
        Some(c) => c.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
    }
}

/// The port a Pod serves a Service port on (upstream `podutil.FindPort`), `None` when a named
/// `targetPort` is not among its containers' ports with the service port's protocol.
fn find_port(pod: &Pod, sp: &ServicePort) -> Option<i32> {
    match &sp.target_port {
        None | Some(IntOrString::Int(0)) => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            let proto = sp.protocol.as_deref().unwrap_or("TCP");
            let spec = pod.spec.as_ref()?;
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == proto
                })
                .map(|p| p.container_port)
        }
    }
}

/// A Pod's addresses (`status.podIPs`, else `status.podIP`), parsed strictly; `Err` names the
/// bad field.
fn pod_ips(pod: &Pod, object: &ObjectRef) -> Result<Vec<IpAddr>, Box<Error>> {
    let Some(st) = pod.status.as_ref() else {
        return Ok(Vec::new());
    };
    let raw: Vec<(String, &str)> = match st.pod_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(ips) => ips
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.as_str()))
            .collect(),
        None => st
            .pod_ip
            .iter()
            .filter(|ip| !ip.is_empty())
            .map(|ip| ("status.podIP".to_owned(), ip.as_str()))
            .collect(),
    };
    raw.into_iter()
        .map(|(field, ip)| {
            parse_ip(ip).map_err(|reason| {
                Box::new(Error::BadAddress {
                    object: object.clone(),
                    field,
                    value: ip.to_owned(),
                    reason,
                })
            })
        })
        .collect()
}

/// Whether a Pod is an endpoint at all (upstream `ShouldPodBeInEndpoints` with terminating
/// Pods included): it has an IP and has not finished.
fn eligible(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Failed" | "Succeeded"))
}

/// The slices the EndpointSlice controller would keep for `svc` (which has a selector and is
/// not ExternalName) given the Pods its selector matches. `zones`: Node name → zone label.
pub(crate) fn slices_for(
    svc: &Service,
    id: &NsName,
    pods: &[Arc<Pod>],
    zones: &HashMap<Str, Str>,
    errors: &mut Vec<Error>,
) -> Vec<Arc<EndpointSlice>> {
    let spec = svc.spec.as_ref();
    let publish_not_ready = spec
        .and_then(|s| s.more().publish_not_ready_addresses)
        .unwrap_or(false);
    let svc_ports: &[ServicePort] = spec.and_then(|s| s.ports.as_deref()).unwrap_or(&[]);
    // (v6, port set) → endpoints, each with the Pod name it sorts by.
    let mut groups: BTreeMap<Group, Vec<(Str, Endpoint)>> = BTreeMap::new();
    let families = address_types(svc);
    for pod in pods {
        if !eligible(pod) {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let object = ObjectRef {
            kind: "Pod",
            id: NsName {
                namespace: id.namespace.clone(),
                name: name.clone(),
            },
        };
        let ips = match pod_ips(pod, &object) {
            Ok(ips) if ips.is_empty() => continue,
            Ok(ips) => ips,
            Err(e) => {
                errors.push(*e);
                continue;
            }
        };
        let ports: Vec<PortKey> = svc_ports
            .iter()
            .filter_map(|sp| {
                Some(PortKey {
                    name: sp.name.clone(),
                    protocol: sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port: find_port(pod, sp)?,
                    app_protocol: sp.app_protocol.clone(),
                })
            })
            .collect();
        let serving = pod_ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = publish_not_ready || (serving && !terminating);
        let pspec = pod.spec.as_ref();
        let node = pspec.and_then(|s| s.node_name.clone());
        let hostname = pspec
            .filter(|s| s.subdomain.as_deref() == Some(id.name.as_str()))
            .and_then(|s| s.hostname.clone())
            .filter(|h| !h.is_empty());
        for &v6 in &families {
            let Some(ip) = ips.iter().find(|ip| ip.is_ipv6() == v6) else {
                continue;
            };
            let ep = Endpoint {
                addresses: Few::One(ip.to_compact_string()),
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                hostname: hostname.clone(),
                node_name: node.clone(),
                zone: node.as_ref().and_then(|n| zones.get(n)).cloned(),
                target_ref: Some(Box::new(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some(id.namespace.clone()),
                    name: Some(name.clone()),
                    uid: pod.metadata.uid.clone(),
                })),
                ..Endpoint::default()
            };
            groups
                .entry((v6, ports.clone()))
                .or_default()
                .push((name.clone(), ep));
        }
    }
    let groups = groups.into_iter().map(|(g, mut eps)| {
        eps.sort_by(|a, b| a.0.cmp(&b.0));
        (g, eps.into_iter().map(|(_, e)| e).collect())
    });
    chunked(
        svc,
        id,
        groups,
        MAX_ENDPOINTS_PER_SLICE,
        MANAGED_BY_CONTROLLER,
    )
}

/// The slices of endpoint groups (family, port set → endpoints), at most `max` endpoints each.
pub(crate) fn chunked(
    svc: &Service,
    id: &NsName,
    groups: impl Iterator<Item = (Group, Vec<Endpoint>)>,
    max: usize,
    managed_by: &str,
) -> Vec<Arc<EndpointSlice>> {
    let mut out = Vec::new();
    for ((v6, ports), eps) in groups {
        let ports: Vec<EndpointPort> = ports.into_iter().map(PortKey::into_port).collect();
        for (chunk, eps) in eps.chunks(max).enumerate() {
            out.push(Arc::new(make_slice(
                svc,
                id,
                v6,
                &ports,
                chunk,
                managed_by,
                eps.to_vec(),
            )));
        }
    }
    out
}

/// Endpoints go to slices by address family (`true` = IPv6) and resolved port set.
pub(crate) type Group = (bool, Vec<PortKey>);

/// A slice port as grouping key (`EndpointPort` has no `Ord`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PortKey {
    pub(crate) name: Option<Str>,
    pub(crate) protocol: Str,
    pub(crate) port: i32,
    pub(crate) app_protocol: Option<Str>,
}

impl PortKey {
    pub(crate) fn into_port(self) -> EndpointPort {
        EndpointPort {
            name: self.name,
            protocol: Some(self.protocol),
            port: Some(self.port),
            app_protocol: self.app_protocol,
        }
    }
}

/// One generated slice, named `<service>-<hash of address type, ports, chunk>`, created when
/// its Service was (what the controller would have done at once).
pub(crate) fn make_slice(
    svc: &Service,
    id: &NsName,
    v6: bool,
    ports: &[EndpointPort],
    chunk: usize,
    managed_by: &str,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let mut key = format!("{managed_by}/{v6}/{chunk}");
    for p in ports {
        let _ = write!(
            key,
            "/{}:{}:{}",
            p.name.as_deref().unwrap_or(""),
            p.protocol.as_deref().unwrap_or(""),
            p.port.unwrap_or(0)
        );
    }
    let address_type = if v6 { "IPv6" } else { "IPv4" };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(compact_str::format_compact!(
                "{}-{:08x}",
                id.name,
                fnv1a(key.as_bytes()) as u32
            )),
            namespace: Some(id.namespace.clone()),
            creation_timestamp: svc.metadata.creation_timestamp.clone(),
            labels: Some(crate::k8s::Labels::from([
                (Str::from(LABEL_SERVICE_NAME), id.name.clone()),
                (LABEL_MANAGED_BY.into(), managed_by.into()),
            ])),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints: endpoints.into(),
        ports: Some(ports.into()),
    }
}
