//! What the DNS index costs in memory, and what an update allocates, counted exactly by a
//! counting allocator (this test binary's own): the index of 10,000 Services must stay under
//! 20 MiB, and a change of one Service must allocate what that Service's records take, not a
//! copy of the index.
mod common;

use std::sync::Arc;

use common::footprint;
use lb_model::k8s::{
    core::{Service, ServicePort, ServiceSpec},
    discovery::{Endpoint, EndpointPort, EndpointSlice},
};
use lb_model::{
    Objects,
    dns::{Builder, Config},
};

#[global_allocator]
static A: common::Counting = common::Counting;

/// A Service as the DNS bench has them: a ClusterIP, one named port, one slice of two
/// endpoints.
fn service(i: usize, ip: &str) -> (Arc<Service>, Arc<EndpointSlice>) {
    let mut s = Service::default();
    s.metadata.name = Some(format!("svc-{i}").into());
    s.metadata.namespace = Some(format!("ns-{}", i % 100).into());
    s.spec = Some(ServiceSpec {
        cluster_ip: Some(ip.into()),
        cluster_ips: Some([ip.into()].into()),
        ports: Some(
            [ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]
            .into(),
        ),
        ..ServiceSpec::default()
    });
    let mut e = EndpointSlice {
        address_type: "IPv4".into(),
        ..EndpointSlice::default()
    };
    e.metadata.name = Some(format!("svc-{i}-abcde").into());
    e.metadata.namespace.clone_from(&s.metadata.namespace);
    e.metadata.labels = Some(
        [("kubernetes.io/service-name".to_owned(), format!("svc-{i}"))]
            .into_iter()
            .collect(),
    );
    e.endpoints = (0..2)
        .map(|k| Endpoint {
            addresses: lb_model::few::Few::One(
                format!("198.18.{}.{}", (2 * i + k) / 250, 1 + (2 * i + k) % 250).into(),
            ),
            ..Endpoint::default()
        })
        .collect();
    e.ports = Some(
        [EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..EndpointPort::default()
        }]
        .into(),
    );
    (Arc::new(s), Arc::new(e))
}

fn vip(i: usize) -> String {
    format!("198.19.{}.{}", 128 + i / 250, 1 + i % 250)
}

#[test]
fn the_index_of_10000_services_is_small_and_an_update_copies_only_what_it_touches() {
    const N: usize = 10_000;
    let mut objs = Objects::default();
    for i in 0..N {
        let (s, e) = service(i, &vip(i));
        objs.services.push(s);
        objs.slices.push(e);
    }
    let cfg = Config::default();
    let before = footprint();
    let mut b = Builder::default();
    let one = b.build(&objs, &cfg, 1);
    let held = footprint() - before;
    let per_service = held / N;
    eprintln!(
        "DNS index + builder for {N} Services: {held} bytes ({per_service} per Service, {:.1} MiB)",
        held as f64 / 1_048_576.0
    );
    assert!(
        held < 6 << 20,
        "{held} bytes for {N} Services: over the 6 MiB the index may take"
    );
    assert_eq!(one.len(), N);

    // One Service changes its ClusterIP while the server still answers from `one`.
    let total = common::total();
    let (s, _) = service(17, "198.19.200.1");
    objs.services[17] = s;
    let two = b.build(&objs, &cfg, 2);
    let allocated = common::total() - total;
    eprintln!("an update of one Service allocated {allocated} bytes");
    assert!(
        allocated < held / 50,
        "an update of one Service allocated {allocated} bytes, the index holds {held}: a copy of the index"
    );
    assert_eq!(two.len(), N);
    drop(one);
    // Once the older index is gone, the two share no more than they did.
    let after = footprint() - before;
    assert!(
        after < held + held / 50,
        "{after} bytes held after the update, {held} before"
    );
}
