//! The standalone control plane through the real datapath: `examples/tutorial/` as people write
//! manifests — Pods and selectors, a selector-less Service with `v1 Endpoints`, NodePort and
//! LoadBalancer Services with nothing allocated — loaded as is; Pod changes; allocations across
//! a `kill -9` and restart; bad input named.
use std::{collections::BTreeSet, fs, net::IpAddr, path::Path, time::Duration};

use lb_tests::{Cluster, NODE_V4, Value, pod_v4, wait_for, web::tally};

/// The flags the tutorial's README gives (the sandbox's ranges).
const FLAGS: [&str; 6] = [
    "--service-cidr",
    "198.19.0.0/16,2001:db8:f::/112",
    "--lb-ip-pool",
    "198.19.255.0/28",
    "--service-node-port-range",
    "30000-32767",
];

fn tutorial() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tutorial")
}

/// Copies every manifest of `examples/tutorial` into the bed, unchanged.
fn load_tutorial(c: &Cluster) {
    for e in fs::read_dir(tutorial())
        .expect("examples/tutorial")
        .flatten()
    {
        let name = e.file_name().into_string().expect("utf8 name");
        if e.path().extension().is_some_and(|x| x == "yaml") {
            c.write_manifest(&name, &fs::read_to_string(e.path()).expect("read example"));
        }
    }
}

/// The agent's allocation state file.
fn state(c: &Cluster) -> Value {
    let text = fs::read_to_string(c.state_file()).expect("state file written");
    serde_json::from_str(&text).expect("state JSON")
}

fn record(c: &Cluster, svc: &str) -> Value {
    state(c)["services"][format!("tutorial/{svc}")].clone()
}

fn first_ip(v: &Value, field: &str) -> IpAddr {
    v[field][0]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
        .parse()
        .expect("IP")
}

/// Waits until `frontend`'s backends are `want` (sorted `addr:port` strings).
fn wait_backends(c: &Cluster, frontend: &str, want: &[String]) {
    wait_for(Duration::from_secs(5), || {
        (c.backends_of(frontend).as_deref() == Some(want)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{frontend}: backends {:?}, want {want:?}\n{}",
            c.backends_of(frontend),
            c.agent_log()
        )
    });
}

fn web_backends(ids: &[usize]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|&i| format!("{}:8080", pod_v4(i))).collect();
    v.sort();
    v
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: load, serve, change, restart"
)]
fn tutorial_manifests_serve_as_written_and_keep_their_allocations() {
    let mut c = Cluster::new("tutorial", 3);
    load_tutorial(&c);
    c.start_agent_with(&FLAGS);

    // Allocated: ClusterIPs in the service CIDRs (web is dual-stack), nodePorts in the range,
    // LoadBalancer IPs from the pool (web-lb's requested one).
    let web = record(&c, "web");
    let vip4 = first_ip(&web, "clusterIPs");
    let vip6: IpAddr = web["clusterIPs"][1]
        .as_str()
        .expect("IPv6 ClusterIP")
        .parse()
        .unwrap();
    assert!(
        matches!(vip4, IpAddr::V4(a) if a.octets()[..2] == [198, 19]),
        "{web}"
    );
    assert!(vip6.to_string().starts_with("2001:db8:f::"), "{web}");
    let np = record(&c, "web-nodeport")["nodePorts"]["80/TCP"]
        .as_u64()
        .expect("nodePort allocated");
    assert!((30_000..=32_767).contains(&np));
    assert_eq!(
        record(&c, "web-lb")["loadBalancerIPs"][0],
        "198.19.255.10",
        "{}",
        state(&c)
    );
    let auto = first_ip(&record(&c, "web-lb-auto"), "loadBalancerIPs");
    assert!(
        matches!(auto, IpAddr::V4(a) if a.octets()[..3] == [198, 19, 255] && a.octets()[3] < 16)
    );
    let db = first_ip(&record(&c, "db"), "clusterIPs");

    // Traffic through each shape: ClusterIP (both families), the mirrored Endpoints, the
    // NodePort on the Node's address, both LoadBalancer IPs.
    let all = web_backends(&[1, 2, 3]);
    wait_backends(&c, &format!("{vip4}:80/TCP"), &all);
    let hits = tally(&c.client(&["tcp", &format!("{vip4}:80"), "30"]));
    assert_eq!(hits.len(), 3, "every Pod serves: {hits:?}");
    let r = c.client(&["tcp", &format!("[{vip6}]:80"), "5"]);
    assert!(r.iter().all(|r| r["ok"] == true), "{r:?}");
    let r = c.client(&["udp", &format!("{vip4}:53"), "5"]);
    assert!(
        r.iter().all(|r| r["ok"] == true),
        "named UDP targetPort: {r:?}"
    );
    let r = c.client(&["tcp", &format!("{db}:5432"), "3"]);
    assert_eq!(
        tally(&r).keys().collect::<Vec<_>>(),
        ["b3"],
        "Endpoints mirrored"
    );
    for target in [
        format!("{NODE_V4}:{np}"),
        "198.19.255.10:80".to_owned(),
        format!("{auto}:8000"),
    ] {
        let r = c.client(&["tcp", &target, "3"]);
        assert!(r.iter().all(|r| r["ok"] == true), "{target}: {r:?}");
    }

    // What the control plane did, as `kubectl get` would show it: from the running agent, and
    // computed from the files and the state file alone.
    let get = |args: &[&str]| {
        let out = std::process::Command::new(lb_tests::lb_agent())
            .arg("get")
            .args(args)
            .output()
            .expect("spawn lb-agent get");
        assert!(
            out.status.success(),
            "get {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let metrics = c.listen_addr("metrics");
    let svcs = get(&["services", "-n", "tutorial", "--metrics-addr", &metrics]);
    let row = |name: &str| {
        svcs.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{svcs}"))
            .split_whitespace()
            .take(5)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(svcs.starts_with("NAME "), "{svcs}");
    assert_eq!(
        row("web"),
        format!("web ClusterIP {vip4} <none> 80/TCP,53/UDP")
    );
    assert_eq!(row("db"), format!("db ClusterIP {db} <none> 5432/TCP"));
    assert!(
        row("web-nodeport").ends_with(&format!(
            "NodePort {} <none> 80:{np}/TCP",
            first_ip(&record(&c, "web-nodeport"), "clusterIPs")
        )),
        "{svcs}"
    );
    assert!(
        row("web-lb").contains(" LoadBalancer ") && row("web-lb").contains(" 198.19.255.10 "),
        "{svcs}"
    );
    let eps = get(&["endpoints", "-n", "tutorial", "--metrics-addr", &metrics]);
    assert!(
        eps.lines().any(|l| l.starts_with("web-")
            && l.contains(" IPv4 ")
            && l.contains("8080,5353")
            && l.contains("198.18.0.11,198.18.0.12,198.18.0.13")),
        "{eps}"
    );
    assert!(
        eps.lines()
            .any(|l| l.starts_with("db-") && l.contains("198.18.0.13")),
        "{eps}"
    );
    let yaml = get(&[
        "endpoints",
        "-n",
        "tutorial",
        "-o",
        "yaml",
        "--metrics-addr",
        &metrics,
    ]);
    assert!(
        yaml.contains("endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io"),
        "{yaml}"
    );
    assert!(
        yaml.contains("endpointslicemirroring-controller.k8s.io"),
        "{yaml}"
    );
    let state_file = c.state_file();
    let offline = get(&[
        "services",
        "-n",
        "tutorial",
        "--manifests",
        c.manifests.path.to_str().expect("utf8 path"),
        "--state-file",
        state_file.to_str().expect("utf8 path"),
        FLAGS[0],
        FLAGS[1],
        FLAGS[2],
        FLAGS[3],
    ]);
    let cols = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        cols(&offline),
        cols(&svcs),
        "the same allocations without an agent"
    );

    // Pod changes: web-1 turns unready, web-2 loses its label, web-3 is deleted.
    let frontend = format!("{vip4}:80/TCP");
    let web_yaml = fs::read_to_string(tutorial().join("web.yaml")).expect("web.yaml");
    let docs: Vec<&str> = web_yaml.split("\n---\n").collect();
    assert_eq!(docs.len(), 4, "Service + 3 Pods");
    let write = |docs: &[String]| c.write_manifest("web.yaml", &docs.join("\n---\n"));
    let mut now: Vec<String> = docs.iter().map(|d| (*d).to_owned()).collect();
    now[1] = now[1].replace("status: \"True\"", "status: \"False\"");
    write(&now);
    wait_backends(&c, &frontend, &web_backends(&[2, 3]));
    now[2] = now[2].replace("app: web,", "app: retired,");
    write(&now);
    wait_backends(&c, &frontend, &web_backends(&[3]));
    now.remove(3);
    write(&now);
    wait_backends(&c, &frontend, &[]);
    let r = c.client(&["tcp", &format!("{vip4}:80"), "1"]);
    assert_eq!(r[0]["error"], "ECONNREFUSED", "no endpoint: REJECT, {r:?}");
    now[1] = now[1].replace("status: \"False\"", "status: \"True\"");
    write(&now);
    wait_backends(&c, &frontend, &web_backends(&[1]));

    // kill -9 and a restart: the same allocations, written before anything was programmed.
    let before = state(&c);
    c.kill_agent();
    c.start_agent_with(&FLAGS);
    assert_eq!(state(&c), before, "allocations survive a restart unchanged");
    let r = c.client(&["tcp", &format!("{vip4}:80"), "3"]);
    assert_eq!(tally(&r).keys().collect::<Vec<_>>(), ["b1"]);

    // Bad input, each named; nothing else disturbed.
    c.write_manifest(
        "bad.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: thief, namespace: tutorial}}\n\
             spec: {{clusterIP: {vip4}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: far, namespace: tutorial}}\n\
             spec: {{type: NodePort, ports: [{{port: 80, nodePort: {np}}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: outside, namespace: tutorial}}\n\
             spec: {{type: LoadBalancer, loadBalancerIP: 198.19.254.1, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: odd, namespace: tutorial, labels: {{app: web}}}}\n\
             spec: {{containers: []}}\nstatus: {{podIP: 198.18.0.011}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: nobody, namespace: tutorial}}\n\
             spec: {{selector: {{app: nobody}}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d, namespace: tutorial}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: copycat, namespace: tutorial}}\n\
             spec: {{type: LoadBalancer, loadBalancerIP: 198.19.255.10, ports: [{{port: 80}}]}}\n"
        ),
    );
    // 15 more LoadBalancer Services for a pool of 16 that holds 2 already: one finds none.
    let many: Vec<String> = (0..15)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: lb-{i:02}, namespace: tutorial}}\n\
                 spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: 80}}]}}\n"
            )
        })
        .collect();
    c.write_manifest("many-lb.yaml", &many.join("---\n"));
    let want = [
        format!(
            "Service tutorial/thief: spec.clusterIP[0]: Invalid value: {vip4}: failed to allocate IP {vip4}: provided IP is already allocated (to Service tutorial/web)"
        ),
        format!(
            "Service tutorial/far: spec.ports[0].nodePort: Invalid value: {np}: provided port is already allocated (to Service tutorial/web-nodeport)"
        ),
        "Service tutorial/outside: spec.loadBalancerIP: Invalid value: 198.19.254.1: not in any --lb-ip-pool".to_owned(),
        "Pod tutorial/odd: status.podIP: invalid IP address \"198.18.0.011\"".to_owned(),
        "Service tutorial/nobody: spec.selector: app=nobody matches no Pod".to_owned(),
        "Deployment tutorial/d: kind \"Deployment\" (apiVersion \"apps/v1\") is not one lb reads".to_owned(),
        "Service tutorial/copycat: spec.loadBalancerIP: Invalid value: 198.19.255.10: already allocated to Service tutorial/web-lb".to_owned(),
        "status.loadBalancer.ingress: no free IPv4 address in --lb-ip-pool; the Service stays pending".to_owned(),
    ];
    wait_for(Duration::from_secs(5), || {
        let log = c.agent_log();
        want.iter().all(|w| log.contains(w.as_str())).then_some(())
    })
    .unwrap_or_else(|| {
        let log = c.agent_log();
        let missing: Vec<_> = want.iter().filter(|w| !log.contains(w.as_str())).collect();
        panic!("not reported: {missing:#?}\n{log}")
    });
    let r = c.client(&["tcp", &format!("{vip4}:80"), "3"]);
    assert_eq!(
        tally(&r).keys().collect::<Vec<_>>(),
        ["b1"],
        "the incumbent is undisturbed"
    );
    let services: BTreeSet<String> = state(&c)["services"]
        .as_object()
        .expect("services")
        .keys()
        .cloned()
        .collect();
    assert!(!services.contains("tutorial/thief") && !services.contains("tutorial/far"));
}
