//! Bad input and full maps: reported by name, and nothing else disturbed.
use std::time::Duration;

use lb_tests::{
    Cluster, pod_v4, service, slice, wait_for,
    web::{VIP4, eps, ready, tally, time_until, write_web},
};

#[test]
fn bad_manifests_are_reported_by_name_and_the_rest_keeps_working() {
    let mut c = Cluster::new("bad", 1);
    write_web(&c, &ready(1));
    c.write_manifest(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: octal, namespace: test}\nspec: {clusterIP: 010.19.0.1, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: hugeport, namespace: test}\nspec: {clusterIP: 198.19.0.30, ports: [{name: a, port: 70000}, {name: b, port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: thief, namespace: test, creationTimestamp: '2099-01-01T00:00:00Z'}\nspec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: hugeport-1, namespace: test, labels: {kubernetes.io/service-name: hugeport}}\naddressType: IPv4\nports: [{name: b, port: 8080}]\nendpoints: [{addresses: ['2001:db8::11']}, {addresses: ['198.18.0.11']}]\n",
    );
    c.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n  spec: [\n",
    );
    c.start_agent();
    let fe = format!("{VIP4}:80/TCP");
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.30:80/TCP")
    })
    .expect("valid port of a partly bad Service programmed");
    let log = wait_for(Duration::from_secs(5), || {
        let l = c.agent_log();
        l.contains("EndpointSlice test/hugeport-1").then_some(l)
    })
    .unwrap_or_else(|| panic!("errors not logged:\n{}", c.agent_log()));
    for want in [
        "Service test/octal: spec.clusterIP[0]: invalid IP address \"010.19.0.1\"",
        "Service test/hugeport: spec.ports[0].port: port 70000 is outside 1-65535",
        // The standalone control plane refuses it as an API server would (the oldest wins).
        "Service test/thief: spec.clusterIP[0]: Invalid value: 198.19.0.10: failed to allocate IP 198.19.0.10: provided IP is already allocated (to Service test/web)",
        "EndpointSlice test/hugeport-1: endpoints[0].addresses[0]: 2001:db8::11 is not an IPv4 address",
        "broken.yaml: not valid YAML/JSON",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    assert_eq!(
        c.backends_of(&fe),
        Some(vec![format!("{}:8080", pod_v4(1))]),
        "the winner is never disturbed"
    );
    assert_eq!(
        c.backends_of("198.19.0.30:80/TCP"),
        Some(vec![format!("{}:8080", pod_v4(1))])
    );
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "10"]));
    assert_eq!(t.get("b1"), Some(&10));
}

#[test]
fn full_maps_refuse_only_the_new_service_and_it_lands_once_it_fits() {
    let mut c = Cluster::new("full", 2);
    write_web(&c, &ready(2)); // per family: marker + 80/TCP (1 + 2 slots) + 53/UDP (1 + 2) = 7 entries
    c.start_agent_with(&["--max-service-entries", "10", "--max-backend-entries", "8"]);
    let more = |n: usize| {
        let v: Vec<(String, bool, bool, bool)> =
            (1..=n).map(|i| (pod_v4(i), true, true, false)).collect();
        [
            service("more", &["198.19.0.40"], &[("http", 80, "TCP")]),
            slice("more-1", "more", "IPv4", &[("http", 8080, "TCP")], &eps(&v)),
        ]
        .join("---\n")
    };
    // Needs marker + frontend + 2 slots = 4 more entries; 3 are left.
    c.write_manifest("more.yaml", &more(2));
    let log = wait_for(Duration::from_secs(5), || {
        let l = c.agent_log();
        l.contains("198.19.0.40:80/TCP: not programmed, the maps are full")
            .then_some(l)
    })
    .unwrap_or_else(|| panic!("capacity error not reported:\n{}", c.agent_log()));
    assert!(log.contains("Service test/more"), "{log}");
    assert_eq!(
        c.backends_of("198.19.0.40:80/TCP"),
        None,
        "nothing half-written"
    );
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "20"]));
    assert_eq!(
        t.values().sum::<usize>(),
        20,
        "the incumbent keeps working: {t:?}"
    );
    assert_eq!(
        c.backends_of(&format!("{VIP4}:80/TCP")).map(|b| b.len()),
        Some(2)
    );

    // Shrunk to one endpoint it needs 3 entries: it fits and is programmed.
    c.write_manifest("more.yaml", &more(1));
    let took = time_until(&c, "198.19.0.40:80/TCP", &[format!("{}:8080", pod_v4(1))]);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let r = &c.client(&["tcp", "198.19.0.40:80", "1"])[0];
    assert_eq!(r["ok"], true, "{r}");
}
