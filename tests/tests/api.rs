//! The agent against the Kubernetes API-server double (`lb_tests::apiserver`), on the real
//! kernel: list/watch, changes mid-watch, cut watches, 410 Gone and relist, deletes while
//! disconnected — the maps converge with no stale entry, unchanged Services undisturbed.
use std::time::{Duration, Instant};

use lb_tests::{
    Cluster, Value,
    apiserver::{ApiServer, Kind},
    pod_v4, service, slice, wait_for,
};

const VIP: &str = "198.19.0.10";

fn node(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
    )
}

/// A one-port TCP Service `name` on `vip` with endpoints on the given backends.
fn svc(name: &str, vip: &str, backends: &[usize]) -> String {
    let eps: Vec<String> = backends.iter().map(|i| pod_v4(*i)).collect();
    let eps: Vec<(&str, bool, bool, bool)> = eps
        .iter()
        .map(|a| (a.as_str(), true, true, false))
        .collect();
    [
        service(name, &[vip], &[("http", 80, "TCP")]),
        slice(
            &format!("{name}-1"),
            name,
            "IPv4",
            &[("http", 8080, "TCP")],
            &eps,
        ),
    ]
    .join("\n---\n")
}

fn want(backends: &[usize]) -> Vec<String> {
    backends
        .iter()
        .map(|i| format!("{}:8080", pod_v4(*i)))
        .collect()
}

fn api_cluster(tag: &str, n: usize) -> (Cluster, ApiServer) {
    let mut c = Cluster::new(tag, n);
    let api = ApiServer::start(&c.logs.path);
    api.apply_yaml(&node("node-a", "zone-a"));
    c.kubeconfig = Some(api.kubeconfig.clone());
    (c, api)
}

/// Waits until `frontend` serves exactly `backends` (`None`: absent); returns the time taken.
fn converge(c: &Cluster, frontend: &str, backends: Option<&[String]>) -> Duration {
    let t = Instant::now();
    wait_for(Duration::from_secs(10), || {
        (c.backends_of(frontend).as_deref() == backends).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{frontend}: wanted {backends:?}, have {:?}\n{}",
            c.backends_of(frontend),
            c.agent_log()
        )
    });
    t.elapsed()
}

#[test]
fn the_api_source_programs_services_and_follows_changes_mid_watch() {
    let (mut c, api) = api_cluster("api", 3);
    api.apply_yaml(&svc("web", VIP, &[1, 2]));
    c.start_agent();
    let fe = format!("{VIP}:80/TCP");
    converge(&c, &fe, Some(&want(&[1, 2])));
    let r = &c.client(&["tcp", &format!("{VIP}:80"), "4"]);
    assert!(
        r.iter()
            .all(|r| r["ok"] == true && r["peer"] == format!("{VIP}:80")),
        "{r:?}"
    );

    // Mid-watch: endpoints change, a Service appears, one is deleted.
    api.apply_yaml(&svc("web", VIP, &[2, 3]));
    assert!(converge(&c, &fe, Some(&want(&[2, 3]))) < Duration::from_secs(1));
    api.apply_yaml(&svc("new", "198.19.0.11", &[1]));
    assert!(converge(&c, "198.19.0.11:80/TCP", Some(&want(&[1]))) < Duration::from_secs(1));
    assert!(api.delete(Kind::Service, "test", "new"));
    assert!(converge(&c, "198.19.0.11:80/TCP", None) < Duration::from_secs(1));
    let r = &c.client(&["tcp", "198.19.0.11:80", "1"])[0];
    assert_eq!(
        r["error"], "ENETUNREACH",
        "a deleted Service's VIP is gone entirely: {r}"
    );
    // Deleting only the slice leaves a known Service without endpoints: REJECT.
    assert!(api.delete(Kind::EndpointSlice, "test", "web-1"));
    converge(&c, &fe, Some(&[]));
    assert_eq!(
        c.client(&["tcp", &format!("{VIP}:80"), "1"])[0]["error"],
        "ECONNREFUSED"
    );
}

#[test]
fn cut_watches_410_and_deletes_while_disconnected_converge_without_disturbing_others() {
    let (mut c, api) = api_cluster("apifail", 3);
    api.apply_yaml(&svc("steady", VIP, &[1, 2]));
    api.apply_yaml(&svc("moving", "198.19.0.12", &[1]));
    api.apply_yaml(&svc("doomed", "198.19.0.13", &[2]));
    c.start_agent();
    converge(&c, "198.19.0.13:80/TCP", Some(&want(&[2])));
    let steady = c.backends_of(&format!("{VIP}:80/TCP"));
    let lp = c.client_bg(&["loop", &format!("{VIP}:80"), "6000"]);

    // 1. The watch is cut; a change made meanwhile arrives after the reconnect.
    api.cut_watches();
    api.apply_yaml(&svc("moving", "198.19.0.12", &[1, 3]));
    converge(&c, "198.19.0.12:80/TCP", Some(&want(&[1, 3])));

    // 2. History compacted and the watch cut: resuming gets 410 Gone, the watcher relists.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.contains("/api/v1/services") && !r.contains("watch="))
        .count();
    // Bookmarks keep a watcher's resourceVersion current, so the change and the compaction
    // happen while it is disconnected: its resume point is then older than the history.
    api.set_online(false);
    api.apply_yaml(&svc("moving", "198.19.0.12", &[3]));
    api.compact();
    api.set_online(true);
    converge(&c, "198.19.0.12:80/TCP", Some(&want(&[3])));
    let relisted = wait_for(Duration::from_secs(10), || {
        let n = api
            .requests()
            .iter()
            .filter(|r| r.contains("/api/v1/services") && !r.contains("watch="))
            .count();
        (n > lists_before).then_some(n)
    });
    assert!(
        relisted.is_some(),
        "410 must force the Service watcher to relist\n{}",
        c.agent_log()
    );
    assert!(api.gone_sent() >= 1, "the double never answered 410");

    // 3. Offline: a Service and an EndpointSlice are deleted while the agent cannot see it.
    api.set_online(false);
    assert!(api.delete(Kind::Service, "test", "doomed"));
    assert!(api.delete(Kind::EndpointSlice, "test", "moving-1"));
    api.compact(); // and the history is gone, as after a long outage
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        c.backends_of("198.19.0.13:80/TCP"),
        Some(want(&[2])),
        "nothing changes while disconnected"
    );
    api.set_online(true);
    converge(&c, "198.19.0.13:80/TCP", None);
    converge(&c, "198.19.0.12:80/TCP", Some(&[]));

    let out = lp.wait_with_output().expect("loop");
    let v: Value = serde_json::from_slice(&out.stdout).expect("loop JSON");
    assert_eq!(
        v["failed"],
        0,
        "the unchanged Service was disturbed: {v}\n{}",
        c.agent_log()
    );
    assert!(v["ok"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(c.backends_of(&format!("{VIP}:80/TCP")), steady);
    // No stale entry anywhere: exactly the two remaining frontends and their VIPs.
    let services = c.inspect("services");
    let fes: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["frontend"].as_str().unwrap())
        .collect();
    assert_eq!(
        fes,
        [format!("{VIP}:80/TCP"), "198.19.0.12:80/TCP".to_owned()]
    );
    let backends = c.inspect("backends");
    assert_eq!(
        backends.as_array().unwrap().len(),
        2,
        "unreferenced backends removed: {backends}"
    );
}

#[test]
fn an_agent_that_cannot_reach_the_api_keeps_the_adopted_datapath() {
    let (mut c, api) = api_cluster("apidown", 1);
    api.apply_yaml(&svc("web", VIP, &[1]));
    c.start_agent();
    converge(&c, &format!("{VIP}:80/TCP"), Some(&want(&[1])));
    c.kill_agent();
    api.set_online(false);
    // A restarted agent that cannot list must not withdraw anything.
    let log = c.logs.path.join("agent-down.log");
    let mut child = std::process::Command::new(lb_tests::lb_agent())
        .args(["run", "--kubeconfig"])
        .arg(&api.kubeconfig)
        .args(["--nodeport-interfaces", "none"])
        .arg("--cgroup")
        .arg(&c.cgroup.path)
        .arg("--bpffs")
        .arg(&c.bpffs.path)
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--healthz-addr",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.backends_of(&format!("{VIP}:80/TCP")), Some(want(&[1])));
    assert_eq!(c.client(&["tcp", &format!("{VIP}:80"), "1"])[0]["ok"], true);
    api.set_online(true);
    let ready = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("agent ready"))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready.is_some(),
        "agent never became ready after the API came back"
    );
}

#[test]
fn zone_hints_follow_the_nodes_zone_label() {
    let (mut c, api) = api_cluster("zone", 2); // node-a in zone-a
    let hinted = |i: usize, zone: &str| {
        format!(
            "{{addresses: ['{}'], hints: {{forZones: [{{name: {zone}}}]}}}}",
            pod_v4(i)
        )
    };
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: near, namespace: test}}\nspec: {{clusterIP: 198.19.0.70, trafficDistribution: PreferClose, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: near-1, namespace: test, labels: {{kubernetes.io/service-name: near}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}, {}]\n",
        hinted(1, "zone-a"),
        hinted(2, "zone-b")
    ));
    c.start_agent();
    converge(&c, "198.19.0.70:80/TCP", Some(&want(&[1])));
    let r = c.client(&["tcp", "198.19.0.70:80", "10"]);
    assert!(
        r.iter()
            .all(|r| r["reply"].as_str().unwrap().starts_with("b1 ")),
        "{r:?}"
    );
    // The Node moves to zone-b (its label changes): the same-zone endpoint changes with it.
    api.apply_yaml(&node("node-a", "zone-b"));
    converge(&c, "198.19.0.70:80/TCP", Some(&want(&[2])));
    // A zone no endpoint is hinted for: hints are ignored.
    api.apply_yaml(&node("node-a", "zone-c"));
    converge(&c, "198.19.0.70:80/TCP", Some(&want(&[1, 2])));
}

#[test]
fn metrics_and_health_as_kube_proxy_serves_them() {
    let (mut c, api) = api_cluster("metrics", 2);
    api.apply_yaml(&svc("web", VIP, &[1, 2]));
    c.start_agent();
    converge(&c, &format!("{VIP}:80/TCP"), Some(&want(&[1, 2])));
    let r = c.client(&["tcp", &format!("{VIP}:80"), "7"]);
    assert!(r.iter().all(|r| r["ok"] == true));

    let m = c.http_get("metrics", "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for want in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "lb_datapath_events_total{reason=\"connect_xlated\"} 7",
        "lb_service_connections_total{namespace=\"test\",service=\"web\",frontend=\"198.19.0.10:80/TCP\"} 7",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    let metric = |body: &str, name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    let changes_before = metric(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total");

    // An EndpointSlice change carrying the controller's trigger time: network programming
    // latency is observed, and the change counter moves.
    let mut slice_obj: Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(
            svc("web", VIP, &[2]).split("\n---\n").nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let now = c.http_get("healthz", "/healthz");
    let current = now
        .split("\"currentTime\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("currentTime")
        .to_owned();
    slice_obj["metadata"]["annotations"] =
        serde_json::json!({"endpoints.kubernetes.io/last-change-trigger-time": current});
    api.apply(slice_obj);
    converge(&c, &format!("{VIP}:80/TCP"), Some(&want(&[2])));
    let m = c.http_get("metrics", "/metrics");
    assert!(
        metric(&m, "kubeproxy_network_programming_duration_seconds_count") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") > changes_before,
        "{m}"
    );

    // Health: 200 with kube-proxy's JSON; the Node tainted for deletion → /healthz 503, /livez 200.
    let h = c.http_get("healthz", "/healthz");
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    for want in [
        "Content-Type: application/json",
        "X-Content-Type-Options: nosniff",
        "\"lastUpdated\":",
        "\"currentTime\":",
        "\"nodeEligible\":true",
    ] {
        assert!(h.contains(want), "healthz lacks {want}: {h}");
    }
    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n\
         spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\n",
    );
    let h = wait_for(Duration::from_secs(5), || {
        let h = c.http_get("healthz", "/healthz");
        h.starts_with("HTTP/1.1 503").then_some(h)
    })
    .expect("healthz 503 for a node being deleted");
    assert!(h.contains("\"nodeEligible\":false"), "{h}");
    assert!(c.http_get("healthz", "/livez").starts_with("HTTP/1.1 200"));
    assert!(c.http_get("healthz", "/nope").starts_with("HTTP/1.1 404"));
}

#[test]
fn affinity_local_policy_and_dual_stack_through_the_api() {
    let (mut c, api) = api_cluster("apisem", 2); // the agent runs as node-a
    let ep = |i: usize, node: &str| format!("{{addresses: ['{}'], nodeName: {node}}}", pod_v4(i));
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: test}}\n\
         spec: {{clusterIPs: [198.19.0.80, '2001:db8:f::80'], ipFamilies: [IPv4, IPv6], sessionAffinity: ClientIP, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sticky-4, namespace: test, labels: {{kubernetes.io/service-name: sticky}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}, {}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sticky-6, namespace: test, labels: {{kubernetes.io/service-name: sticky}}}}\n\
         addressType: IPv6\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['{}']}}, {{addresses: ['{}']}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: test}}\nspec: {{clusterIP: 198.19.0.81, internalTrafficPolicy: Local, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: local-1, namespace: test, labels: {{kubernetes.io/service-name: local}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}, {}]\n",
        ep(1, "node-a"),
        ep(2, "node-b"),
        lb_tests::pod_v6(1),
        lb_tests::pod_v6(2),
        ep(1, "node-b"),
        ep(2, "node-a"),
    ));
    c.start_agent();
    converge(
        &c,
        "[2001:db8:f::80]:80/TCP",
        Some(&[
            format!("[{}]:8080", lb_tests::pod_v6(1)),
            format!("[{}]:8080", lb_tests::pod_v6(2)),
        ]),
    );
    converge(&c, "198.19.0.81:80/TCP", Some(&want(&[2])));

    // Dual-stack ClusterIPs, each with session affinity: one backend per family for this client.
    for target in ["198.19.0.80:80", "[2001:db8:f::80]:80"] {
        let r = c.client(&["tcp", target, "12"]);
        let names: std::collections::BTreeSet<&str> = r
            .iter()
            .map(|r| r["reply"].as_str().unwrap().split(' ').next().unwrap())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "{target}: affinity must keep one backend: {names:?}"
        );
        assert!(r.iter().all(|r| r["peer"] == target), "{r:?}");
    }
    // internalTrafficPolicy Local: only node-a's endpoint (b2); after it moves away, DROP.
    let r = c.client(&["tcp", "198.19.0.81:80", "6"]);
    assert!(
        r.iter()
            .all(|r| r["reply"].as_str().unwrap().starts_with("b2 ")),
        "{r:?}"
    );
    api.apply_yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: local-1, namespace: test, labels: {{kubernetes.io/service-name: local}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        ep(1, "node-b")
    ));
    converge(&c, "198.19.0.81:80/TCP", Some(&[]));
    assert_eq!(
        c.client(&["tcp", "198.19.0.81:80", "1"])[0]["error"],
        "ETIMEDOUT"
    );
}

#[test]
fn health_check_node_ports_follow_local_endpoints_and_ports() {
    let (mut c, api) = api_cluster("hcnp", 2); // the agent is node-a
    let port1 = 31_000 + (std::process::id() % 500) as u16 * 2;
    let port2 = port1 + 1;
    let lb = |hc: u16, b1_node: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: test}}\n\
             spec: {{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {hc}, clusterIP: 198.19.0.99, ports: [{{name: http, port: 80, nodePort: 30099}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: lb-1, namespace: test, labels: {{kubernetes.io/service-name: lb}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['{}'], nodeName: {b1_node}}}, {{addresses: ['{}'], nodeName: node-b}}]\n",
            pod_v4(1),
            pod_v4(2)
        )
    };
    api.apply_yaml(&lb(port1, "node-a"));
    c.start_agent_with(&["--healthcheck-bind-address", "127.0.0.1"]);
    let at = |p: u16| format!("127.0.0.1:{p}");
    let r = wait_for(Duration::from_secs(5), || {
        Cluster::get(&at(port1), "/anything")
    })
    .expect("health check listening");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    for want in [
        "Content-Type: application/json",
        "X-Content-Type-Options: nosniff",
        "X-Load-Balancing-Endpoint-Weight: 1",
        r#"{"service":{"namespace":"test","name":"lb"},"localEndpoints":1,"serviceProxyHealthy":true}"#,
    ] {
        assert!(r.contains(want), "lacks {want}: {r}");
    }
    // The local endpoint moves to another node: 503, no local endpoints.
    api.apply_yaml(&lb(port1, "node-b"));
    let r = wait_for(Duration::from_secs(5), || {
        Cluster::get(&at(port1), "/").filter(|r| r.starts_with("HTTP/1.1 503"))
    })
    .expect("503");
    assert!(r.contains(r#""localEndpoints":0"#), "{r}");
    // The port changes: the old listener closes, the new one answers.
    api.apply_yaml(&lb(port2, "node-a"));
    wait_for(Duration::from_secs(5), || {
        Cluster::get(&at(port2), "/").filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .expect("new port");
    wait_for(Duration::from_secs(5), || {
        Cluster::get(&at(port1), "/").is_none().then_some(())
    })
    .expect("old port closed");
    // The Service goes away: so does its listener.
    assert!(api.delete(Kind::Service, "test", "lb"));
    wait_for(Duration::from_secs(5), || {
        Cluster::get(&at(port2), "/").is_none().then_some(())
    })
    .expect("closed with the Service");
}
