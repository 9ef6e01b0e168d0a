//! Traffic policies at socket level: sessionAffinity ClientIP and internalTrafficPolicy Local.
use std::time::Duration;

use lb_tests::{
    Cluster, pod_v4, wait_for,
    web::{stats, tally},
};

/// A one-port Service on 198.19.0.60:80 with `spec_extra` and endpoints given as YAML flow
/// mappings (each needs `addresses`).
fn policy_service(c: &Cluster, spec_extra: &str, endpoints: &[String]) {
    c.write_manifest(
        "policy.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: pol, namespace: test}}\nspec: {{clusterIP: 198.19.0.60, ports: [{{name: http, port: 80}}]{spec_extra}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: pol-1, namespace: test, labels: {{kubernetes.io/service-name: pol}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ),
    );
}

fn ep(i: usize, extra: &str) -> String {
    format!("{{addresses: ['{}']{extra}}}", pod_v4(i))
}

#[test]
fn client_ip_affinity_pins_expires_and_repins_when_the_backend_leaves() {
    let mut c = Cluster::new("aff", 3);
    let aff = ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}";
    policy_service(&c, aff, &[ep(1, ""), ep(2, ""), ep(3, "")]);
    c.start_agent();
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.60:80/TCP").filter(|b| b.len() == 3)
    })
    .expect("programmed");

    let s0 = stats(&c);
    let t = tally(&c.client(&["tcp", "198.19.0.60:80", "20"]));
    assert_eq!(
        t.len(),
        1,
        "one client, one backend while the affinity holds: {t:?}"
    );
    let s1 = stats(&c);
    assert_eq!(s1["affinity_pin"] - s0["affinity_pin"], 1, "{s1:?}");
    assert_eq!(s1["affinity_hit"] - s0["affinity_hit"], 19, "{s1:?}");

    // Idle longer than timeoutSeconds: the next connection is pinned anew.
    std::thread::sleep(Duration::from_millis(1300));
    tally(&c.client(&["tcp", "198.19.0.60:80", "1"]));
    assert_eq!(stats(&c)["affinity_pin"] - s0["affinity_pin"], 2);

    // The pinned backend leaves the Service: the client is re-pinned to a live one at once.
    let t = tally(&c.client(&["tcp", "198.19.0.60:80", "1"]));
    let pinned = t.keys().next().unwrap().clone();
    let left: usize = pinned.trim_start_matches('b').parse().unwrap();
    let rest: Vec<String> = (1..=3).filter(|i| *i != left).map(|i| ep(i, "")).collect();
    policy_service(&c, aff, &rest);
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.60:80/TCP").filter(|b| b.len() == 2)
    })
    .expect("applied");
    let t = tally(&c.client(&["tcp", "198.19.0.60:80", "10"]));
    assert_eq!(t.len(), 1, "{t:?}");
    assert!(
        !t.contains_key(&pinned),
        "still sent to {pinned}, which left: {t:?}"
    );
}

#[test]
fn internal_traffic_policy_local_uses_node_local_endpoints_or_drops() {
    let mut c = Cluster::new("itp", 2);
    let local = ", internalTrafficPolicy: Local";
    // The harness runs the agent with --node-name node-a.
    policy_service(
        &c,
        local,
        &[ep(1, ", nodeName: node-a"), ep(2, ", nodeName: node-b")],
    );
    c.start_agent();
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.60:80/TCP").filter(|b| b.len() == 1)
    })
    .expect("programmed");
    let t = tally(&c.client(&["tcp", "198.19.0.60:80", "20"]));
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["b1"],
        "only this node's endpoint: {t:?}"
    );

    // Endpoints on other nodes only: DROP (ETIMEDOUT at once), not REJECT.
    policy_service(&c, local, &[ep(2, ", nodeName: node-b")]);
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.60:80/TCP").filter(Vec::is_empty)
    })
    .expect("applied");
    let r = &c.client(&["tcp", "198.19.0.60:80", "1"])[0];
    assert_eq!(r["error"], "ETIMEDOUT", "{r}");
    assert!(r["ms"].as_f64().unwrap() < 1000.0, "{r}");
    assert!(stats(&c)["drop_no_local"] >= 1);
    // No endpoints anywhere: REJECT.
    policy_service(&c, local, &[]);
    wait_for(Duration::from_secs(5), || {
        (c.client(&["tcp", "198.19.0.60:80", "1"])[0]["error"] == "ECONNREFUSED").then_some(())
    })
    .expect("REJECT");
}
