//! Legacy `v1 Endpoints` of selector-less Services → EndpointSlices, as the upstream
//! EndpointSliceMirroring controller writes them (pkg/controller/endpointslicemirroring):
//!
//! * only for an existing Service without a selector (a selector's Endpoints belong to the
//!   endpoints controller), and never for Endpoints labelled
//!   `endpointslice.kubernetes.io/skip-mirror: "true"`;
//! * each subset: at most [`MAX_ENDPOINTS_PER_SUBSET`] addresses (ready ones first), `addresses`
//!   ready, `notReadyAddresses` not ready; subsets with the same port set are merged and
//!   addresses deduplicated; one slice family per address type, by the address itself;
//! * an address that is not an IP literal is reported, naming the field, and left out.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::k8s::core::{EndpointAddress, Endpoints, Service};
use crate::k8s::discovery::{Endpoint, EndpointConditions, EndpointSlice};

use super::Error;
use super::endpointslice::{Group, PortKey, chunked};
use crate::model::{NsName, ObjectRef, parse_ip};

/// Label that keeps an Endpoints object from being mirrored.
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// The mirroring controller's `managed-by` value.
pub const MANAGED_BY_MIRRORING: &str = "endpointslicemirroring-controller.k8s.io";
/// Upstream `--mirroring-max-endpoints-per-subset` default.
pub const MAX_ENDPOINTS_PER_SUBSET: usize = 1000;

/// Whether an Endpoints object is to be mirrored at all (the label test; the Service test is
/// the caller's).
pub(crate) fn mirrored(ep: &Endpoints) -> bool {
    ep.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SKIP_MIRROR))
        .is_none_or(|v| v != "true")
}

/// The slices the mirroring controller keeps for one Endpoints object.
pub(crate) fn slices_for(
    ep: &Endpoints,
    svc: &Service,
    id: &NsName,
    errors: &mut Vec<Error>,
) -> Vec<Arc<EndpointSlice>> {
    let object = ObjectRef {
        kind: "Endpoints",
        id: id.clone(),
    };
    // (v6, port set) → address → endpoint (first occurrence wins, ready before not ready).
    let mut groups: BTreeMap<Group, BTreeMap<IpAddr, Endpoint>> = BTreeMap::new();
    for (s, subset) in ep.subsets.iter().flatten().enumerate() {
        let mut ports: Vec<PortKey> = Vec::new();
        for (i, p) in subset.ports.iter().flatten().enumerate() {
            if !(1..=65_535).contains(&p.port) {
                errors.push(Error::BadPort {
                    object: object.clone(),
                    field: format!("subsets[{s}].ports[{i}].port"),
                    value: p.port.into(),
                });
                continue;
            }
            ports.push(PortKey {
                name: p.name.clone(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: p.port,
                app_protocol: p.app_protocol.clone(),
            });
        }
        ports.sort();
        let ready = subset
            .addresses
            .iter()
            .flatten()
            .map(|a| (a, true, "addresses"));
        let not_ready = subset
            .not_ready_addresses
            .iter()
            .flatten()
            .map(|a| (a, false, "notReadyAddresses"));
        // Upstream counts per field; keep the indices for error messages.
        let mut taken = 0;
        let mut idx: BTreeMap<&str, usize> = BTreeMap::new();
        for (addr, is_ready, field) in ready.chain(not_ready) {
            let i = idx.entry(field).or_default();
            let at = *i;
            *i += 1;
            if taken == MAX_ENDPOINTS_PER_SUBSET {
                continue; // upstream truncates the subset
            }
            let ip = match parse_ip(&addr.ip) {
                Ok(ip) => ip,
                Err(reason) => {
                    errors.push(Error::BadAddress {
                        object: object.clone(),
                        field: format!("subsets[{s}].{field}[{at}].ip"),
                        value: addr.ip.to_string(),
                        reason,
                    });
                    continue;
                }
            };
            taken += 1;
            groups
                .entry((ip.is_ipv6(), ports.clone()))
                .or_default()
                .entry(ip)
                .or_insert_with(|| endpoint(addr, ip, is_ready));
        }
    }
    let groups = groups
        .into_iter()
        .map(|(g, eps)| (g, eps.into_values().collect()));
    chunked(
        svc,
        id,
        groups,
        MAX_ENDPOINTS_PER_SUBSET,
        MANAGED_BY_MIRRORING,
    )
}

fn endpoint(addr: &EndpointAddress, ip: IpAddr, ready: bool) -> Endpoint {
    Endpoint {
        addresses: crate::few::Few::One(compact_str::ToCompactString::to_compact_string(&ip)),
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            ..EndpointConditions::default()
        }),
        hostname: addr.hostname.clone(),
        node_name: addr.node_name.clone(),
        target_ref: addr.target_ref.clone(),
        ..Endpoint::default()
    }
}
