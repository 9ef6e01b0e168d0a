//! NodePort, LoadBalancer IPs and externalIPs from outside the cluster: the tcx packet path on
//! a multi-node test bed (tests/src/multinode.rs), each node with its own agent.
use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    multinode::{EXT_V4, EXT_V6, MultiNode, node_v4, node_v6, pod_v4, pod_v6, slice_on_nodes},
    peer_ip, wait_for,
};
use serde_json::Value;

fn service(name: &str, extra_spec: &str, ports: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n{extra_spec}  ports: {ports}\n{status}"
    )
}

/// Replies (`reply` = "NAME PEER") of successful exchanges, as (backend name, peer IP seen).
fn seen(rs: &[Value]) -> Vec<(String, String)> {
    rs.iter()
        .filter(|r| r["ok"] == true)
        .map(|r| {
            let reply = r["reply"].as_str().expect("reply");
            let (name, peer) = reply.split_once(' ').expect("NAME PEER");
            (name.to_owned(), peer_ip(peer).to_string())
        })
        .collect()
}

fn errors(rs: &[Value]) -> BTreeSet<String> {
    rs.iter()
        .filter(|r| r["ok"] != true)
        .map(|r| r["error"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Waits until `addr` on the external client answers (the agents have programmed it).
fn wait_served(bed: &MultiNode, addr: &str) {
    let ok = wait_for(Duration::from_secs(10), || {
        let r = bed.ext_client(&["tcp", addr, "1"]);
        (r[0]["ok"] == true).then_some(())
    });
    assert!(ok.is_some(), "{addr} never answered\n{}", bed.logs());
}

/// One backend on each node, externalTrafficPolicy Cluster: from outside, node-1's NodePort
/// reaches both. The local backend sees the client's address; the remote one sees node-1's
/// (SNAT), and the reply comes back through node-1 translated to the NodePort. IPv4 and IPv6.
#[test]
fn nodeport_cluster_policy_reaches_local_and_remote_backends() {
    let mut bed = MultiNode::new("np-cluster", &[1, 1]);
    bed.write_manifest(
        "svc.yaml",
        &[
            service(
                "web",
                "  clusterIPs: [198.19.0.10, \"2001:db8:19::10\"]\n  ipFamilies: [IPv4, IPv6]\n",
                "[{name: http, port: 80, nodePort: 30080}]",
                "",
            ),
            slice_on_nodes(
                "web",
                "web-v4",
                "IPv4",
                &[("http", 8080, "TCP")],
                &[(&pod_v4(1, 0), "node-1"), (&pod_v4(2, 0), "node-2")],
            ),
            slice_on_nodes(
                "web",
                "web-v6",
                "IPv6",
                &[("http", 8080, "TCP")],
                &[(&pod_v6(1, 0), "node-1"), (&pod_v6(2, 0), "node-2")],
            ),
        ]
        .join("---\n"),
    );
    bed.start_agents();
    for (node, client) in [
        (format!("{}:30080", node_v4(1)), EXT_V4),
        (format!("[{}]:30080", node_v6(1)), EXT_V6),
    ] {
        wait_served(&bed, &node);
        let rs = bed.ext_client(&["tcp", &node, "40"]);
        assert!(errors(&rs).is_empty(), "{node}: {rs:?}\n{}", bed.logs());
        for r in &rs {
            let want = peer_ip(&node).to_string();
            assert_eq!(
                peer_ip(r["peer"].as_str().unwrap()).to_string(),
                want,
                "client sees the NodePort"
            );
        }
        let s = seen(&rs);
        let names: BTreeSet<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            BTreeSet::from(["n1p0", "n2p0"]),
            "{node}: both nodes' backends"
        );
        let node_ip = peer_ip(&node).to_string();
        for (name, peer) in &s {
            match name.as_str() {
                "n1p0" => assert_eq!(peer, client, "local backend: client address kept"),
                _ => assert_eq!(peer, &node_ip, "remote backend: SNAT to node-1"),
            }
        }
    }
    assert!(
        bed.stat(0, "tc_xlated") >= 80,
        "{}",
        bed.inspect(0, "stats")
    );
    assert!(bed.stat(0, "tc_rev_xlated") > 0);
    // node-2 only forwarded node-1's SNATed packets: nothing translated there.
    assert_eq!(bed.stat(1, "tc_xlated"), 0);
}

fn two_node_slice(svc: &str, ports: &[(&str, u16, &str)], eps: &[(String, &str)]) -> String {
    let eps: Vec<(&str, &str)> = eps.iter().map(|(a, n)| (a.as_str(), *n)).collect();
    slice_on_nodes(svc, &format!("{svc}-v4"), "IPv4", ports, &eps)
}

/// externalTrafficPolicy Local: the node with the endpoint keeps the client's address; the
/// node without one drops (timeout, never a refusal); a Service with no endpoint at all is
/// refused at once (ICMP port unreachable from the datapath), IPv4 and IPv6.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn local_policy_keeps_the_client_address_and_drops_elsewhere() {
    let mut bed = MultiNode::new("np-local", &[1, 1]);
    bed.write_manifest(
        "svc.yaml",
        &[
            service(
                "loc",
                "  clusterIP: 198.19.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n",
                "[{name: http, port: 80, nodePort: 30081}]",
                "",
            ),
            two_node_slice("loc", &[("http", 8080, "TCP")], &[(pod_v4(2, 0), "node-2")]),
            service(
                "none",
                "  clusterIPs: [198.19.0.21, \"2001:db8:19::21\"]\n  ipFamilies: [IPv4, IPv6]\n",
                "[{name: http, port: 80, nodePort: 30082}, {name: dns, port: 53, protocol: UDP, nodePort: 30086}]",
                "",
            ),
        ]
        .join("---\n"),
    );
    bed.start_agents();
    let on2 = format!("{}:30081", node_v4(2));
    wait_served(&bed, &on2);
    let rs = bed.ext_client(&["tcp", &on2, "10"]);
    assert_eq!(
        seen(&rs),
        vec![("n2p0".to_owned(), EXT_V4.to_owned()); 10],
        "Local: the backend sees the client\n{rs:?}"
    );
    // node-1 has no local endpoint: DROP.
    let on1 = format!("{}:30081", node_v4(1));
    let rs = bed.ext_client(&["tcp", &on1, "1"]);
    assert_eq!(
        errors(&rs),
        BTreeSet::from(["ETIMEDOUT".to_owned()]),
        "{rs:?}"
    );
    assert!(bed.drops(0, "drop_no_local") >= 1);
    // No endpoint anywhere: REJECT. TCP over IPv4 within a second; UDP (connected socket)
    // at once over both families.
    let v4 = format!("{}:30082", node_v4(1));
    let rs = bed.ext_client(&["tcp", &v4, "1"]);
    assert_eq!(
        errors(&rs),
        BTreeSet::from(["ECONNREFUSED".to_owned()]),
        "{v4}: {rs:?}\n{}",
        bed.logs()
    );
    assert!(rs[0]["ms"].as_f64().unwrap() < 1000.0, "{v4}: {rs:?}");
    // TCP over IPv6 is refused too, but on this one-machine bed the ICMPv6 error comes back
    // while the client's connect() still holds its socket, and Linux's tcp_v6_err drops it
    // (TcpExt LockDroppedIcmps); the retransmitted SYN's error is taken. A remote client
    // does not race its own connect().
    let v6 = format!("[{}]:30082", node_v6(1));
    let rs = bed.ext_client(&["tcp", &v6, "1"]);
    assert_eq!(
        errors(&rs),
        BTreeSet::from(["ECONNREFUSED".to_owned()]),
        "{v6}: {rs:?}"
    );
    for addr in [
        format!("{}:30086", node_v4(1)),
        format!("[{}]:30086", node_v6(1)),
    ] {
        let rs = bed.ext_client(&["udpc", &addr, "2"]);
        assert_eq!(
            errors(&rs),
            BTreeSet::from(["ECONNREFUSED".to_owned()]),
            "{addr}: {rs:?}"
        );
    }
    assert!(bed.stat(0, "tc_reject_no_backend") >= 5);
    // Health checks: 503 on the node without the endpoint, 200 on the one with it.
    let hc = |n: usize| {
        bed.ext_http(&format!("{}:32001", node_v4(n)), "/")
            .unwrap_or_default()
    };
    let h1 = hc(1);
    assert!(
        h1.starts_with("HTTP/1.1 503") && h1.contains("\"localEndpoints\":0"),
        "{h1}"
    );
    let h2 = hc(2);
    assert!(
        h2.starts_with("HTTP/1.1 200") && h2.contains("\"localEndpoints\":1"),
        "{h2}"
    );
    // The endpoint moves to node-1: the verdicts and the health checks follow.
    bed.write_manifest(
        "svc.yaml",
        &[
            service(
                "loc",
                "  clusterIP: 198.19.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n",
                "[{name: http, port: 80, nodePort: 30081}]",
                "",
            ),
            two_node_slice("loc", &[("http", 8080, "TCP")], &[(pod_v4(1, 0), "node-1")]),
        ]
        .join("---\n"),
    );
    wait_served(&bed, &on1);
    assert_eq!(
        seen(&bed.ext_client(&["tcp", &on1, "3"])),
        vec![("n1p0".to_owned(), EXT_V4.to_owned()); 3]
    );
    let moved = wait_for(Duration::from_secs(5), || {
        (hc(1).contains("\"localEndpoints\":1") && hc(2).starts_with("HTTP/1.1 503")).then_some(())
    });
    assert!(
        moved.is_some(),
        "health checks did not follow: {} / {}",
        hc(1),
        hc(2)
    );
}

/// A LoadBalancer IP and an externalIP, routed to node-1 by the client, reach the backends;
/// loadBalancerSourceRanges let the client in while it matches and drop it once it does not,
/// and do not apply to the externalIP.
#[test]
fn load_balancer_ip_external_ip_and_source_ranges() {
    let mut bed = MultiNode::new("np-lb", &[1, 1]);
    let manifest = |ranges: &str| {
        [
            service(
                "lb",
                &format!("  clusterIP: 198.19.0.30\n  externalIPs: [198.18.200.11]\n  loadBalancerSourceRanges: [{ranges}]\n"),
                "[{name: http, port: 80, nodePort: 30083}]",
                "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.200.10}]\n",
            ),
            two_node_slice(
                "lb",
                &[("http", 8080, "TCP")],
                &[(pod_v4(1, 0), "node-1"), (pod_v4(2, 0), "node-2")],
            ),
        ]
        .join("---\n")
    };
    bed.write_manifest("svc.yaml", &manifest("198.18.100.0/24"));
    bed.start_agents();
    for addr in ["198.18.200.10:80", "198.18.200.11:80"] {
        wait_served(&bed, addr);
        let rs = bed.ext_client(&["tcp", addr, "20"]);
        assert!(errors(&rs).is_empty(), "{addr}: {rs:?}");
        let names: BTreeSet<String> = seen(&rs).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2, "{addr}: both backends");
        assert!(
            rs.iter()
                .all(|r| peer_ip(r["peer"].as_str().unwrap()) == peer_ip(addr))
        );
    }
    bed.write_manifest("svc.yaml", &manifest("198.51.100.0/24"));
    let denied = wait_for(Duration::from_secs(10), || {
        let rs = bed.ext_client(&["tcp", "198.18.200.10:80", "1"]);
        (errors(&rs) == BTreeSet::from(["ETIMEDOUT".to_owned()])).then_some(())
    });
    assert!(
        denied.is_some(),
        "source range not enforced\n{}",
        bed.logs()
    );
    assert!(bed.drops(0, "drop_source_range") >= 1);
    let rs = bed.ext_client(&["tcp", "198.18.200.11:80", "3"]);
    assert!(
        errors(&rs).is_empty(),
        "externalIP: no source ranges: {rs:?}"
    );
    let svcs = bed.inspect(0, "services");
    let lb = svcs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "198.18.200.10:80/TCP (external)")
        .unwrap_or_else(|| panic!("{svcs}"));
    assert_eq!(lb["source_ranges"], serde_json::json!(["198.51.100.0/24"]));
}

/// UDP NodePort from a fixed client port: the flow sticks to its backend, follows a
/// replacement of that backend at once (the stale conntrack entry is not used), and an ICMP
/// port unreachable from a backend reaches the client translated (ECONNREFUSED on a connected
/// socket) — from a remote backend (SNAT, ingress path) and a local one (egress path).
#[test]
fn udp_nodeport_follows_a_backend_replacement_and_translates_icmp() {
    let mut bed = MultiNode::new("np-udp", &[1, 2]);
    let manifest = |pod: usize| {
        [
            service(
                "dns",
                "  clusterIP: 198.19.0.40\n",
                "[{name: dns, port: 53, protocol: UDP, nodePort: 30053}, {name: closed, port: 54, protocol: UDP, nodePort: 30054}, {name: closedl, port: 55, protocol: UDP, nodePort: 30055}]",
                "",
            ),
            slice_on_nodes(
                "dns",
                "dns-a",
                "IPv4",
                &[("dns", 5353, "UDP"), ("closed", 5999, "UDP")],
                &[(&pod_v4(2, pod), "node-2")],
            ),
            slice_on_nodes(
                "dns",
                "dns-b",
                "IPv4",
                &[("closedl", 5999, "UDP")],
                &[(&pod_v4(1, 0), "node-1")],
            ),
        ]
        .join("---\n")
    };
    bed.write_manifest("svc.yaml", &manifest(0));
    bed.start_agents();
    let addr = format!("{}:30053", node_v4(1));
    let ok = wait_for(Duration::from_secs(10), || {
        let r = bed.ext_client(&["udpc", &addr, "1", "40000"]);
        (r[0]["ok"] == true).then_some(())
    });
    assert!(ok.is_some(), "UDP NodePort never answered\n{}", bed.logs());
    let rs = bed.ext_client(&["udpc", &addr, "5", "40000"]);
    assert_eq!(
        seen(&rs),
        vec![("n2p0".to_owned(), node_v4(1)); 5],
        "remote backend, SNAT, one flow: {rs:?}"
    );
    bed.write_manifest("svc.yaml", &manifest(1));
    let moved = wait_for(Duration::from_secs(10), || {
        let rs = bed.ext_client(&["udpc", &addr, "1", "40000"]);
        (seen(&rs).first().map(|(n, _)| n.as_str()) == Some("n2p1")).then_some(())
    });
    assert!(
        moved.is_some(),
        "same source port still on the old backend\n{}",
        bed.logs()
    );
    // Nothing listens on the target port: the backend's ICMP error comes back translated.
    for port in [30054, 30055] {
        let a = format!("{}:{port}", node_v4(1));
        let rs = bed.ext_client(&["udpc", &a, "2"]);
        assert_eq!(
            errors(&rs),
            BTreeSet::from(["ECONNREFUSED".to_owned()]),
            "{a}: {rs:?}\n{}",
            bed.logs()
        );
    }
    assert!(
        bed.stat(0, "tc_icmp_xlated") >= 2,
        "{}",
        bed.inspect(0, "stats")
    );
}

/// sessionAffinity ClientIP on a NodePort: every connection of the external client goes to
/// the same backend.
/// (New flows choose by Maglev here, so without affinity 30 connections from 30 source ports
/// would spread over the three backends.)
#[test]
fn nodeport_session_affinity_pins_the_client() {
    let mut bed = MultiNode::new("np-aff", &[2, 1]);
    bed.write_manifest(
        "svc.yaml",
        &[
            service(
                "aff",
                "  clusterIP: 198.19.0.50\n  sessionAffinity: ClientIP\n",
                "[{name: http, port: 80, nodePort: 30084}]",
                "",
            ),
            two_node_slice(
                "aff",
                &[("http", 8080, "TCP")],
                &[
                    (pod_v4(1, 0), "node-1"),
                    (pod_v4(1, 1), "node-1"),
                    (pod_v4(2, 0), "node-2"),
                ],
            ),
        ]
        .join("---\n"),
    );
    bed.start_agents();
    let addr = format!("{}:30084", node_v4(1));
    wait_served(&bed, &addr);
    let rs = bed.ext_client(&["tcp", &addr, "30"]);
    let names: BTreeSet<String> = seen(&rs).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.len(),
        1,
        "affinity: one backend for the client, got {names:?}"
    );
    assert!(
        bed.stat(0, "tc_affinity_hit") >= 29,
        "{}",
        bed.inspect(0, "stats")
    );
}

/// A burst of short connections through SNAT to one backend: every one succeeds. A NAT port
/// is only handed out again after its previous flow's TIME_WAIT could have ended at the
/// backend; reusing it sooner loses SYNs to the backend's PAWS check (TcpExt PAWSTimewait).
#[test]
fn snat_connection_burst_never_meets_the_backends_time_wait() {
    let mut bed = MultiNode::new("np-burst", &[0, 1]);
    bed.write_manifest(
        "svc.yaml",
        &[
            service(
                "burst",
                "  clusterIP: 198.19.0.60\n",
                "[{name: http, port: 80, nodePort: 30087}]",
                "",
            ),
            two_node_slice(
                "burst",
                &[("http", 8080, "TCP")],
                &[(pod_v4(2, 0), "node-2")],
            ),
        ]
        .join("---\n"),
    );
    bed.start_agents();
    let addr = format!("{}:30087", node_v4(1));
    wait_served(&bed, &addr);
    // At most 12,000 connections: each holds its NAT port for TIME_WAIT (60 s), so a burst
    // bounded only by time fills the 31,744-port range on a fast machine (26,846 in 3 s here),
    // and then a drop for want of a port is the right answer, not a fault.
    let r = &bed.ext_client(&["loop", &addr, "3000", "12000"])[0];
    assert_eq!(r["failed"], 0, "{r}\n{}", bed.inspect(0, "stats"));
    assert!(
        r["ok"].as_u64().unwrap() > 1000,
        "too few connections to mean anything: {r}"
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.nodes[1].pods[0].name,
            "cat",
            "/proc/net/netstat",
        ])
        .output()
        .expect("netstat");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let paws = lines
        .chunks(2)
        .flat_map(|c| c[0].split_whitespace().zip(c[1].split_whitespace()))
        .find(|(k, _)| *k == "PAWSTimewait")
        .map(|(_, v)| v.to_owned());
    assert_eq!(
        paws.as_deref(),
        Some("0"),
        "backend refused SYNs in TIME_WAIT"
    );
    assert_eq!(bed.drops(0, "nat_port_exhausted"), 0, "{r}");
}

/// Conntrack entries of a packet-path flow live while packets flow (the flow keeps its NAT
/// port), and are collected once the flow has been idle past its timeout.
#[test]
fn conntrack_entries_live_while_used_and_are_collected_after() {
    let mut bed = MultiNode::new("np-ct", &[0, 1]);
    bed.write_manifest(
        "svc.yaml",
        &[
            service(
                "ct",
                "  clusterIP: 198.19.0.70\n",
                "[{name: dns, port: 53, protocol: UDP, nodePort: 30088}]",
                "",
            ),
            two_node_slice("ct", &[("dns", 5353, "UDP")], &[(pod_v4(2, 0), "node-2")]),
        ]
        .join("---\n"),
    );
    bed.start_agents_with(&["--conntrack-udp-timeout", "3s"]);
    let addr = format!("{}:30088", node_v4(1));
    let served = wait_for(Duration::from_secs(10), || {
        (bed.ext_client(&["udpc", &addr, "1", "41000"])[0]["ok"] == true).then_some(())
    });
    assert!(
        served.is_some(),
        "UDP NodePort never answered\n{}",
        bed.logs()
    );
    let flows = || -> Vec<Value> {
        bed.inspect(0, "conntrack")
            .as_array()
            .expect("flows")
            .iter()
            .filter(|f| f["proto"] == "UDP")
            .cloned()
            .collect()
    };
    let nat_of = |fs: &[Value]| -> String {
        fs.iter().find(|f| f["dir"] == "forward").map_or_else(
            || panic!("no forward entry: {fs:?}"),
            |f| f["new_from"].as_str().unwrap().to_owned(),
        )
    };
    let first = flows();
    assert_eq!(first.len(), 2, "a forward and a reply entry: {first:?}");
    assert!(first.iter().all(|f| f["snat"] == true));
    let nat = nat_of(&first);
    // Busy for twice the timeout: the same flow throughout.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        let r = bed.ext_client(&["udpc", &addr, "1", "41000"]);
        assert_eq!(r[0]["ok"], true, "{r:?}");
        assert_eq!(nat_of(&flows()), nat, "the flow kept its NAT port");
    }
    // Idle: collected after the 3 s timeout (and a 1 s collection interval).
    let gone = wait_for(Duration::from_secs(10), || flows().is_empty().then_some(()));
    assert!(gone.is_some(), "entries not collected: {:?}", flows());
}

/// IPv6 from outside: externalTrafficPolicy Local keeps the client's address on the node with
/// the endpoint and drops on the other; the LoadBalancer IP honours its IPv6 source ranges.
#[test]
fn ipv6_local_policy_and_source_ranges() {
    let mut bed = MultiNode::new("np-v6", &[1, 1]);
    let manifest = |range: &str| {
        [
            service(
                "v6",
                &format!(
                    "  clusterIPs: [198.19.0.80, \"2001:db8:19::80\"]\n  ipFamilies: [IPv4, IPv6]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32002\n  loadBalancerSourceRanges: [\"{range}\"]\n"
                ),
                "[{name: http, port: 80, nodePort: 30089}]",
                "status:\n  loadBalancer:\n    ingress: [{ip: \"2001:db8:200::10\"}]\n",
            ),
            slice_on_nodes(
                "v6",
                "v6-v6",
                "IPv6",
                &[("http", 8080, "TCP")],
                &[(&pod_v6(1, 0), "node-1")],
            ),
        ]
        .join("---\n")
    };
    bed.write_manifest("svc.yaml", &manifest("2001:db8:100::/64"));
    bed.start_agents();
    let on1 = format!("[{}]:30089", node_v6(1));
    wait_served(&bed, &on1);
    assert_eq!(
        seen(&bed.ext_client(&["tcp", &on1, "5"])),
        vec![("n1p0".to_owned(), EXT_V6.to_owned()); 5],
        "Local: client address kept"
    );
    let on2 = format!("[{}]:30089", node_v6(2));
    let rs = bed.ext_client(&["tcp", &on2, "1"]);
    assert_eq!(
        errors(&rs),
        BTreeSet::from(["ETIMEDOUT".to_owned()]),
        "{rs:?}"
    );
    let lb = "[2001:db8:200::10]:80";
    wait_served(&bed, lb);
    assert_eq!(
        seen(&bed.ext_client(&["tcp", lb, "5"])),
        vec![("n1p0".to_owned(), EXT_V6.to_owned()); 5]
    );
    bed.write_manifest("svc.yaml", &manifest("2001:db8:ff::/64"));
    let denied = wait_for(Duration::from_secs(10), || {
        let rs = bed.ext_client(&["tcp", lb, "1"]);
        (errors(&rs) == BTreeSet::from(["ETIMEDOUT".to_owned()])).then_some(())
    });
    assert!(
        denied.is_some(),
        "IPv6 source range not enforced\n{}",
        bed.logs()
    );
    // The NodePort is not an LB IP: no source ranges there.
    assert_eq!(seen(&bed.ext_client(&["tcp", &on1, "1"])).len(), 1);
}

/// What the agents' Maglev tables and the packet path's flow hash predict for a UDP flow from
/// the external client to `vip:53` from `sport`: the backend's name.
fn maglev_prediction(backends: &[(String, &str)], vip: [u8; 4], sport: u16) -> String {
    use lb_common::maglev::{DEFAULT_MAGLEV_M, flow_hash4};
    let bes: Vec<(std::net::SocketAddr, u32)> = backends
        .iter()
        .enumerate()
        .map(|(i, (a, _))| (format!("{a}:5353").parse().unwrap(), i as u32 + 1))
        .collect();
    let table = lb_userspace::maglev::table(&bes, DEFAULT_MAGLEV_M);
    let ext: std::net::Ipv4Addr = EXT_V4.parse().unwrap();
    let h = flow_hash4(ext.octets(), vip, sport, 53, 17);
    let id = table[(h % DEFAULT_MAGLEV_M) as usize];
    let addr = bes.iter().find(|b| b.1 == id).unwrap().0.ip().to_string();
    backends
        .iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, name)| (*name).to_owned())
        .unwrap()
}

/// LoadBalancer IP 198.18.200.60, UDP 53 → 5353 on `bes` (name `n1…` on node-1, else node-2).
fn maglev_manifest(bes: &[(String, &str)]) -> String {
    let eps: Vec<(String, &str)> = bes
        .iter()
        .map(|(a, n)| {
            let node = if n.starts_with("n1") {
                "node-1"
            } else {
                "node-2"
            };
            (a.clone(), node)
        })
        .collect();
    [
        service(
            "mg",
            "  clusterIP: 198.19.0.60\n",
            "[{name: dns, port: 53, protocol: UDP, nodePort: 30060}]",
            "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.200.60}]\n",
        ),
        two_node_slice("mg", &[("dns", 5353, "UDP")], &eps),
    ]
    .join("---\n")
}

/// Maglev on the packet path: a LoadBalancer IP with two backends on each node. The same UDP
/// 5-tuple sent through node-1 and then through node-2 (the client's route switched, as an
/// ECMP router might) reaches the same backend, and exactly the one the agent's table and the
/// shared flow hash predict. Removing one of the four backends moves only the flows that were
/// on it (node-2 keeps the others' conntrack entries; the moved ones follow the new table).
#[test]
fn maglev_sends_a_flow_to_the_same_backend_through_either_node() {
    let mut bed = MultiNode::new("np-maglev", &[2, 2]);
    let all = [
        (pod_v4(1, 0), "n1p0"),
        (pod_v4(1, 1), "n1p1"),
        (pod_v4(2, 0), "n2p0"),
        (pod_v4(2, 1), "n2p1"),
    ];
    bed.write_manifest("svc.yaml", &maglev_manifest(&all));
    bed.start_agents();
    let vip = "198.18.200.60:53";
    let ok = wait_for(Duration::from_secs(10), || {
        let r = bed.ext_client(&["udpc", vip, "1", "39999"]);
        (r[0]["ok"] == true).then_some(())
    });
    assert!(ok.is_some(), "LB IP never answered\n{}", bed.logs());
    let ports: Vec<u16> = (40_000..40_032).collect();
    let via = |n: usize| -> Vec<String> {
        bed.route_lb_via(n);
        ports
            .iter()
            .map(|p| {
                let rs = bed.ext_client(&["udpc", vip, "1", &p.to_string()]);
                seen(&rs)
                    .first()
                    .unwrap_or_else(|| panic!("port {p} via node-{n}: {rs:?}\n{}", bed.logs()))
                    .0
                    .clone()
            })
            .collect()
    };
    let through1 = via(1);
    let through2 = via(2);
    assert_eq!(
        through1, through2,
        "same 5-tuple, same backend, either node"
    );
    let predicted: Vec<String> = ports
        .iter()
        .map(|p| maglev_prediction(&all, [198, 18, 200, 60], *p))
        .collect();
    assert_eq!(through1, predicted, "the agent's table and the flow hash");
    let used: BTreeSet<&String> = through1.iter().collect();
    assert!(used.len() >= 3, "32 flows over 4 backends: {through1:?}");
    // By tc, or by XDP when the suite runs with LB_TEST_XDP.
    let xlated = |n| bed.stat(n, "tc_xlated") + bed.stat(n, "xdp_xlated");
    assert!(
        xlated(0) >= 32 && xlated(1) >= 32,
        "both nodes translated: {} {}",
        bed.inspect(0, "stats"),
        bed.inspect(1, "stats")
    );
    let svcs = bed.inspect(0, "services");
    let fe = svcs
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "198.18.200.60:53/UDP (external)")
        .unwrap_or_else(|| panic!("{svcs}"));
    assert_eq!(fe["maglev_entries"], 16381, "{fe}");

    // One of four backends goes: node-2 still has every flow in conntrack; only the flows of
    // the removed backend move, each to what the new table says.
    let rest: Vec<(String, &str)> = all.iter().filter(|(_, n)| *n != "n2p1").cloned().collect();
    bed.write_manifest("svc.yaml", &maglev_manifest(&rest));
    let gone = wait_for(Duration::from_secs(10), || {
        let s = bed.inspect(1, "services");
        s.as_array()?
            .iter()
            .find(|f| f["frontend"] == "198.18.200.60:53/UDP (external)")
            .filter(|f| f["backends"].as_array().is_some_and(|b| b.len() == 3))
            .map(|_| ())
    });
    assert!(gone.is_some(), "removal never programmed\n{}", bed.logs());
    let after = via(2);
    let mut moved = 0;
    for ((p, before), now) in ports.iter().zip(&through2).zip(&after) {
        if before == "n2p1" {
            moved += 1;
            assert_eq!(
                *now,
                maglev_prediction(&rest, [198, 18, 200, 60], *p),
                "port {p}: a moved flow follows the new table"
            );
        } else {
            assert_eq!(now, before, "port {p}: a flow on a remaining backend stays");
        }
    }
    assert!(
        moved > 0,
        "some flows were on the removed backend: {through2:?}"
    );
}

/// The XDP path (`--xdp generic`) in front of tc: flows to the backend on the other node are
/// translated and sent back out by XDP in both directions (XDP counters; tc never sees them),
/// flows to the local backend are handed to tc, a denied source range is dropped in XDP, and
/// an agent restart (the XDP link handed over) keeps everything working.
#[test]
fn xdp_carries_remote_flows_and_hands_the_rest_to_tc() {
    let mut bed = MultiNode::new("np-xdp", &[1, 1]);
    let manifest = |ranges: &str| {
        [
            service(
                "web",
                &format!("  clusterIP: 198.19.0.70\n  loadBalancerSourceRanges: [{ranges}]\n"),
                "[{name: http, port: 80, nodePort: 30070}, {name: dns, port: 53, protocol: UDP, nodePort: 30071}]",
                "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.200.70}]\n",
            ),
            two_node_slice(
                "web",
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
                &[(pod_v4(1, 0), "node-1"), (pod_v4(2, 0), "node-2")],
            ),
        ]
        .join("---\n")
    };
    bed.write_manifest("svc.yaml", &manifest("198.18.100.0/24"));
    bed.start_agents_with(&["--xdp", "generic"]);
    let np = format!("{}:30070", node_v4(1));
    wait_served(&bed, &np);
    let before_tc = bed.stat(0, "tc_xlated");
    let rs = bed.ext_client(&["tcp", &np, "40"]);
    assert!(errors(&rs).is_empty(), "{rs:?}\n{}", bed.logs());
    let s = seen(&rs);
    let remote = s.iter().filter(|(n, _)| n == "n2p0").count() as u64;
    let local = s.iter().filter(|(n, _)| n == "n1p0").count() as u64;
    assert!(remote > 0 && local > 0, "both backends: {s:?}");
    for (name, peer) in &s {
        let want = if name == "n2p0" {
            node_v4(1)
        } else {
            EXT_V4.to_owned()
        };
        assert_eq!(peer, &want, "{name}: SNAT for the remote backend only");
    }
    // Each remote connection: SYN, ACK, request, FIN, ACK at least 3 packets forward through
    // XDP, and its replies back through XDP.
    assert!(
        bed.stat(0, "xdp_xlated") >= 3 * remote,
        "{}",
        bed.inspect(0, "stats")
    );
    assert!(bed.stat(0, "xdp_rev_xlated") >= 2 * remote);
    assert!(
        bed.stat(0, "xdp_passed_to_tc") >= local,
        "local flows go to tc"
    );
    // tc translated the local flows' packets only: fewer than a remote flow's worth each.
    let tc = bed.stat(0, "tc_xlated") - before_tc;
    assert!(tc >= local && tc < 8 * local + 8, "tc_xlated grew by {tc}");

    // UDP through XDP from a fixed client port, to whichever backend the table says; the
    // reply comes back translated.
    let lb_udp = "198.18.200.70:53";
    let rs = bed.ext_client(&["udpc", lb_udp, "4", "41000"]);
    assert_eq!(seen(&rs).len(), 4, "{rs:?}");

    // A range that excludes the client: dropped in XDP.
    bed.write_manifest("svc.yaml", &manifest("198.51.100.0/24"));
    let denied = wait_for(Duration::from_secs(10), || {
        let rs = bed.ext_client(&["tcp", "198.18.200.70:80", "1"]);
        (errors(&rs) == BTreeSet::from(["ETIMEDOUT".to_owned()])).then_some(())
    });
    assert!(
        denied.is_some(),
        "source range not enforced\n{}",
        bed.logs()
    );
    assert!(
        bed.stat(0, "xdp_drop_source_range") >= 1,
        "{}",
        bed.inspect(0, "stats")
    );

    // The agent on node-1 restarts: its XDP link is handed over, and XDP keeps translating.
    bed.restart_agent(0, &["--xdp", "generic"]);
    let before = bed.stat(0, "xdp_xlated");
    let rs = bed.ext_client(&["tcp", &np, "20"]);
    assert!(
        errors(&rs).is_empty(),
        "after restart: {rs:?}\n{}",
        bed.logs()
    );
    assert!(bed.stat(0, "xdp_xlated") > before, "XDP attached again");
}
