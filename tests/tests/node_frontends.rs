//! Frontends that are not ClusterIPs, for clients on the node: externalIPs, LoadBalancer IPs
//! and NodePorts (pods and host processes; localhost only for the host).
use std::time::Duration;

use lb_tests::{Cluster, pod_v4, wait_for, web::stats};

#[test]
fn external_ips_and_load_balancer_ips_are_translated_for_in_cluster_clients() {
    let mut c = Cluster::new("extip", 1);
    c.write_manifest(
        "ext.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: test}}\n\
             spec: {{type: LoadBalancer, clusterIP: 198.19.0.90, externalIPs: [198.19.5.1], ports: [{{name: http, port: 80}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: 198.19.6.1}}, {{ip: 198.19.6.2, ipMode: Proxy}}]}}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ext-1, namespace: test, labels: {{kubernetes.io/service-name: ext}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['{}']}}]\n",
            pod_v4(1)
        ),
    );
    c.start_agent();
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.6.1:80/TCP")
    })
    .expect("LB IP programmed");
    for target in ["198.19.5.1:80", "198.19.6.1:80"] {
        let r = &c.client(&["tcp", target, "3"]);
        assert!(
            r.iter().all(|r| r["ok"] == true && r["peer"] == target),
            "{target}: {r:?}"
        );
    }
    // Other ports of an external address are not ours: untouched (unroutable in the test bed),
    // where a ClusterIP's other ports are refused.
    assert_eq!(
        c.client(&["tcp", "198.19.5.1:22", "1"])[0]["error"],
        "ENETUNREACH"
    );
    assert_eq!(
        c.client(&["tcp", "198.19.0.90:22", "1"])[0]["error"],
        "ECONNREFUSED"
    );
    // ipMode Proxy: in-cluster traffic goes to the load balancer itself, not short-circuited.
    assert_eq!(c.backends_of("198.19.6.2:80/TCP"), None);
    assert_eq!(
        c.client(&["tcp", "198.19.6.2:80", "1"])[0]["error"],
        "ENETUNREACH"
    );
}

#[test]
fn node_ports_serve_pods_and_host_processes_and_localhost_only_the_host() {
    let mut c = Cluster::new("nodeport", 1);
    c.write_manifest(
        "np.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: test}}\n\
             spec: {{type: NodePort, clusterIP: 198.19.0.95, ports: [{{name: http, port: 80, nodePort: 30080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: np-1, namespace: test, labels: {{kubernetes.io/service-name: np}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['{}']}}]\n",
            pod_v4(1)
        ),
    );
    // The test bed's node namespace plays the host: its address, and its netns for 127.0.0.1.
    let host_netns = format!("/run/netns/{}", c.node.name);
    c.start_agent_with(&[
        "--node-address",
        lb_tests::NODE_V4,
        "--host-netns",
        &host_netns,
    ]);
    let node_port = format!("{}:30080", lb_tests::NODE_V4);
    wait_for(Duration::from_secs(5), || {
        c.backends_of(&format!("{node_port}/TCP"))
    })
    .expect("NodePort programmed");

    // A pod to <node address>:<nodePort>.
    let r = c.client(&["tcp", &node_port, "3"]);
    assert!(
        r.iter()
            .all(|r| r["ok"] == true && r["peer"] == node_port.as_str()),
        "{r:?}"
    );
    // A host process to 127.0.0.1:<nodePort> and to <node address>:<nodePort>.
    for target in ["127.0.0.1:30080", node_port.as_str()] {
        let r = c.host_client(&["tcp", target, "3"]);
        assert!(
            r.iter().all(|r| r["ok"] == true && r["peer"] == target),
            "{target}: {r:?}"
        );
    }
    // A pod to 127.0.0.1:<nodePort>: not translated (its own loopback has no listener).
    let before = stats(&c);
    assert_eq!(
        c.client(&["tcp", "127.0.0.1:30080", "1"])[0]["error"],
        "ECONNREFUSED"
    );
    // The node address's other ports are the node's own: untouched, not refused by us.
    assert_eq!(
        c.client(&["tcp", &format!("{}:22", lb_tests::NODE_V4), "1"])[0]["error"],
        "ECONNREFUSED"
    );
    let after = stats(&c);
    assert_eq!(
        after["connect_xlated"], before["connect_xlated"],
        "nothing translated"
    );
    assert_eq!(
        after["reject_no_port"], before["reject_no_port"],
        "nothing refused by the datapath"
    );
}
