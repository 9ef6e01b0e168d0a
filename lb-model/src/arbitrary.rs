//! Random desired states for property tests (feature `proptest`, and this crate's own tests):
//! up to 8 frontends on 3 VIPs of both families, both scopes and protocols, 0–4 backends each
//! (locality by address), Local policy, affinity, source ranges and Maglev (M = 251) on
//! external frontends. The sync's property tests and the privileged adoption test (which writes
//! them to real pinned maps) draw from the same states.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use proptest::prelude::*;

use crate::model::{Cidr, Desired, Frontend, FrontendState, NsName, Proto, Scope};

/// The Maglev table size of external frontends.
pub const MAGLEV_M: u32 = 251;

/// A random desired state.
pub fn arb_desired() -> impl Strategy<Value = Desired> {
    let vip = prop_oneof![
        Just("198.19.0.1".parse::<IpAddr>().unwrap()),
        Just("198.19.0.2".parse::<IpAddr>().unwrap()),
        Just("2001:db8:1::1".parse::<IpAddr>().unwrap()),
    ];
    let fe = (
        vip,
        prop_oneof![Just(80u16), Just(81)],
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
        prop_oneof![3 => Just(Scope::InNode), 1 => Just(Scope::External)],
    )
        .prop_map(|(addr, port, proto, scope)| Frontend {
            addr,
            port,
            proto,
            scope,
        });
    let be_idx = proptest::collection::btree_set(0u8..6, 0..5);
    let policy = (
        any::<bool>(),
        prop_oneof![Just(0u32), Just(30u32)],
        prop_oneof![4 => Just(false), 1 => Just(true)],
        0usize..3,
    );
    proptest::collection::btree_map(fe, (be_idx, policy), 0..8).prop_map(|m| Desired {
        frontends: m
            .into_iter()
            .map(
                |(fe, (idx, (no_local, affinity_timeout, external, ranges)))| {
                    let backends: BTreeSet<SocketAddr> = idx
                        .into_iter()
                        .map(|i| {
                            let ip: IpAddr = if fe.addr.is_ipv4() {
                                format!("198.18.0.{}", 10 + i).parse().unwrap()
                            } else {
                                format!("2001:db8:2::{}", 10 + i).parse().unwrap()
                            };
                            SocketAddr::new(ip, 8000 + u16::from(i % 2))
                        })
                        .collect();
                    // Locality is a property of the address (as endpoints' nodeName makes it).
                    let local = backends
                        .iter()
                        .filter(|a| match a.ip() {
                            IpAddr::V4(v) => v.octets()[3] < 13,
                            IpAddr::V6(v) => v.octets()[15] < 13,
                        })
                        .copied()
                        .collect();
                    let external_scope = fe.scope == Scope::External;
                    let source_ranges = if external_scope {
                        let pool: [&str; 2] = if fe.addr.is_ipv4() {
                            ["198.18.0.0/15", "198.51.100.0/24"]
                        } else {
                            ["2001:db8::/32", "2001:db8:ff::/48"]
                        };
                        pool[..ranges.min(2)]
                            .iter()
                            .map(|c| Cidr::parse(c).unwrap())
                            .collect()
                    } else {
                        BTreeSet::new()
                    };
                    (
                        fe,
                        std::sync::Arc::new(FrontendState {
                            service: NsName {
                                namespace: "ns".into(),
                                name: "s".into(),
                            }
                            .into(),
                            port_name: crate::k8s::Str::default(),
                            backends: backends.into(),
                            no_local,
                            affinity_timeout,
                            external: external || external_scope,
                            host_only: false,
                            node_dns: false,
                            local,
                            source_ranges,
                            maglev: if external_scope { MAGLEV_M } else { 0 },
                        }),
                    )
                },
            )
            .collect(),
        ..Desired::default()
    })
}
