//! Socket-level ClusterIP load balancing on the real kernel (netns + child cgroup + real
//! sockets): what clients and backends see, the spread, changes, and the REJECT verdicts. Each test
//! builds its own [`Cluster`] and tears it down, pass or fail.
use std::{net::IpAddr, process::Command, time::Duration};

use lb_tests::{
    Cluster, Value, pod_v4, pod_v6, service, slice, wait_for,
    web::{VIP4, VIP6, backend_of, ready, stats, tally, time_until, write_web},
};

#[test]
fn tcp_v4_v6_and_v4_mapped_reach_a_backend_and_getpeername_shows_the_vip() {
    let mut c = Cluster::new("tcp", 2);
    write_web(&c, &ready(2));
    c.start_agent();

    for (target, want_peer, client_ip) in [
        (format!("{VIP4}:80"), format!("{VIP4}:80"), pod_v4(0)),
        (format!("[{VIP6}]:80"), format!("[{VIP6}]:80"), pod_v6(0)),
        // An AF_INET6 socket to an IPv4-mapped ClusterIP (Java and other dual-stack clients).
        (
            format!("[::ffff:{VIP4}]:80"),
            format!("[::ffff:{VIP4}]:80"),
            pod_v4(0),
        ),
    ] {
        let results = c.client(&["tcp", &target, "5"]);
        assert_eq!(results.len(), 5);
        for r in &results {
            assert_eq!(r["ok"], true, "{target}: {r}");
            assert_eq!(
                r["peer"],
                want_peer.as_str(),
                "getpeername must show the VIP: {r}"
            );
            let (name, seen) = backend_of(r);
            assert!(name == "b1" || name == "b2", "{r}");
            assert_eq!(
                seen,
                client_ip.parse::<IpAddr>().unwrap(),
                "the backend sees the client's own address: {r}"
            );
        }
    }
    let s = stats(&c);
    assert!(s["connect_xlated"] >= 15, "{s:?}");
    assert!(
        s["revnat_hit"] >= 15,
        "getpeername went through reverse NAT: {s:?}"
    );
    // connect() keeps its reverse NAT in the ring (then the socket's storage): the cookie-keyed
    // LRU maps (for unconnected UDP) stay empty.
    for map in ["LB4_RNAT_SK_V1", "LB6_RNAT_SK_V1"] {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(c.bpffs.path.join(map))
            .output()
            .expect("bpftool");
        let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        assert_eq!(v.as_array().map(Vec::len), Some(0), "{map}: {v}");
    }
}

/// The `connect()` reverse-NAT ring wraps under churn: a socket that asked for its peer keeps
/// the VIP (its record moved into its own storage); one that had not asked reads its backend's
/// address once its slot is taken, never another socket's VIP.
#[test]
fn a_socket_that_asked_for_its_peer_keeps_the_vip_after_the_ring_wraps() {
    let mut c = Cluster::new("ring", 2);
    write_web(&c, &ready(2));
    c.start_agent_with(&["--revnat-ring-entries", "16"]);
    for (target, backends) in [
        (
            format!("{VIP4}:80"),
            [1, 2].map(|i| format!("{}:8080", pod_v4(i))),
        ),
        (
            format!("[{VIP6}]:80"),
            [1, 2].map(|i| format!("[{}]:8080", pod_v6(i))),
        ),
    ] {
        // 16 slots: `asked` asks after each of 100 connections, then 100 more take every slot
        // many times over.
        let r = &c.client(&["peers", &target, "100"])[0];
        assert_eq!(r["churn_failed"], 0, "{r}");
        assert_eq!(r["asked_during"], serde_json::json!([target]), "{r}");
        assert_eq!(
            r["asked"],
            target.as_str(),
            "kept after the ring wrapped: {r}"
        );
        let quiet = r["quiet"].as_str().unwrap_or_default();
        assert!(
            quiet == target || backends.iter().any(|b| b == quiet),
            "a socket's peer is its VIP or its backend: {r}"
        );
    }
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(c.bpffs.path.join("LB_RNAT_RING_V1"))
        .output()
        .expect("bpftool");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    assert_eq!(v["max_entries"], 16, "the ring has the asked size: {v}");
}

#[test]
fn udp_unconnected_and_connected_show_the_vip() {
    let mut c = Cluster::new("udp", 2);
    write_web(&c, &ready(2));
    c.start_agent();

    for (target, client_ip) in [
        (format!("{VIP4}:53"), pod_v4(0)),
        (format!("[{VIP6}]:53"), pod_v6(0)),
    ] {
        // Unconnected: sendto(VIP) / recvfrom() must report the VIP as the source.
        let results = c.client(&["udp", &target, "5"]);
        assert_eq!(results.len(), 5);
        for r in &results {
            assert_eq!(r["ok"], true, "{target}: {r}");
            assert_eq!(
                r["from"],
                target.as_str(),
                "recvfrom source must be the VIP: {r}"
            );
            assert_eq!(backend_of(r).1, client_ip.parse::<IpAddr>().unwrap(), "{r}");
        }
        // Connected: connect(VIP), send/recv, getpeername shows the VIP.
        let results = c.client(&["udpc", &target, "3"]);
        for r in &results {
            assert_eq!(r["ok"], true, "{target}: {r}");
            assert_eq!(r["peer"], target.as_str(), "{r}");
        }
    }
    let s = stats(&c);
    assert!(s["sendmsg_xlated"] >= 10, "{s:?}");
}

#[test]
fn new_connections_spread_uniformly_over_three_backends() {
    let mut c = Cluster::new("spread", 3);
    write_web(&c, &ready(3));
    c.start_agent();
    let n = 900;
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), &n.to_string()]));
    // Binomial(900, 1/3): mean 300, sd 14.1. ±70 is ~5 sd: a false failure is ~1 in 10^6.
    assert_eq!(t.len(), 3, "{t:?}");
    for (b, hits) in &t {
        assert!(
            (230..=370).contains(hits),
            "{b}: {hits} of {n} connections ({t:?})"
        );
    }
    // And a chi-square bound over the three (2 degrees of freedom, p ≈ 1e-6 at 27.6).
    let chi2: f64 = t
        .values()
        .map(|&h| (h as f64 - 300.0).powi(2) / 300.0)
        .sum();
    assert!(chi2 < 27.6, "chi-square {chi2:.1} for {t:?}");
}

#[test]
fn endpoint_changes_take_effect_within_a_second() {
    let mut c = Cluster::new("churn", 3);
    write_web(&c, &ready(2));
    c.start_agent();
    let fe = format!("{VIP4}:80/TCP");
    let be = |is: &[usize]| {
        is.iter()
            .map(|i| format!("{}:8080", pod_v4(*i)))
            .collect::<Vec<_>>()
    };
    assert_eq!(c.backends_of(&fe), Some(be(&[1, 2])));

    // Added.
    write_web(&c, &ready(3));
    let took = time_until(&c, &fe, &be(&[1, 2, 3]));
    assert!(took < Duration::from_secs(1), "add took {took:?}");
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "90"]));
    assert!(
        t.contains_key("b3"),
        "the new backend gets connections: {t:?}"
    );

    // Removed: no new connection reaches it once applied.
    write_web(&c, &[(2, true, true, false), (3, true, true, false)]);
    let took = time_until(&c, &fe, &be(&[2, 3]));
    assert!(took < Duration::from_secs(1), "remove took {took:?}");
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "90"]));
    assert!(!t.contains_key("b1"), "removed backend still chosen: {t:?}");

    // Turned terminating (ready=false, serving=true): not used while a ready one exists.
    write_web(&c, &[(2, false, true, true), (3, true, true, false)]);
    let took = time_until(&c, &fe, &be(&[3]));
    assert!(took < Duration::from_secs(1), "terminating took {took:?}");
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "40"]));
    assert_eq!(t.keys().collect::<Vec<_>>(), ["b3"], "{t:?}");

    // Every endpoint terminating but serving: fall back to them (KEP-1669).
    write_web(&c, &[(2, false, true, true), (3, false, true, true)]);
    let took = time_until(&c, &fe, &be(&[2, 3]));
    assert!(took < Duration::from_secs(1), "fallback took {took:?}");
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "60"]));
    assert_eq!(t.len(), 2, "{t:?}");

    // Every endpoint gone: connections are refused within a second.
    write_web(&c, &[(2, false, false, true), (3, false, false, true)]);
    let took = time_until(&c, &fe, &[]);
    assert!(took < Duration::from_secs(1), "emptying took {took:?}");
    let r = &c.client(&["tcp", &format!("{VIP4}:80"), "1"])[0];
    assert_eq!(r["error"], "ECONNREFUSED", "{r}");
}

#[test]
fn no_endpoint_and_unserved_port_are_refused_at_once() {
    let mut c = Cluster::new("refuse", 1);
    write_web(&c, &ready(1));
    c.write_manifest(
        "empty.yaml",
        &service(
            "empty",
            &["198.19.0.20", "2001:db8:f::20"],
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        ),
    );
    c.start_agent();
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.20:80/TCP")
    })
    .expect("empty service programmed");

    let refused_fast = |r: &Value| {
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"], "ECONNREFUSED", "{r}");
    };
    for target in [
        "198.19.0.20:80",
        "[2001:db8:f::20]:80",
        &format!("{VIP4}:81"),
        &format!("[{VIP6}]:81"),
    ] {
        let r = &c.client(&["tcp", target, "1"])[0];
        refused_fast(r);
        assert!(
            r["ms"].as_f64().unwrap() < 1000.0,
            "{target}: refused after {} ms",
            r["ms"]
        );
    }
    // UDP: sendto() itself fails with ECONNREFUSED for a service without endpoints …
    for target in ["198.19.0.20:53", "[2001:db8:f::20]:53"] {
        let r = &c.client(&["udp", target, "1"])[0];
        refused_fast(r);
        assert_eq!(r["stage"], "sendto", "{r}");
    }
    // … and for a known VIP on a protocol it does not serve (web has 53/UDP, not 80/UDP).
    let r = &c.client(&["udp", &format!("{VIP4}:80"), "1"])[0];
    refused_fast(r);
    // Connected UDP: connect() refuses.
    let r = &c.client(&["udpc", "198.19.0.20:53", "1"])[0];
    refused_fast(r);
    assert_eq!(r["stage"], "connect", "{r}");

    // Not a service address: untouched, and unroutable in the test bed.
    let r = &c.client(&["tcp", "198.19.0.99:80", "1"])[0];
    assert_eq!(r["error"], "ENETUNREACH", "{r}");

    let s = stats(&c);
    assert!(s["reject_no_backend"] >= 5, "{s:?}");
    assert!(s["reject_no_port"] >= 3, "{s:?}");
}

#[test]
fn sctp_ports_become_their_own_frontends() {
    // This kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) = EPROTONOSUPPORT), so
    // only the programming is tested here; the hooks read the protocol from bpf_sock_addr.
    let mut c = Cluster::new("sctp", 1);
    c.write_manifest(
        "sig.yaml",
        &[
            service(
                "sig",
                &["198.19.0.50"],
                &[("diameter", 3868, "SCTP"), ("http", 80, "TCP")],
            ),
            slice(
                "sig-1",
                "sig",
                "IPv4",
                &[("diameter", 3868, "SCTP"), ("http", 8080, "TCP")],
                &[(&pod_v4(1), true, true, false)],
            ),
        ]
        .join("---\n"),
    );
    c.start_agent();
    let sctp = wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.50:3868/SCTP")
    })
    .expect("SCTP frontend programmed");
    assert_eq!(sctp, [format!("{}:3868", pod_v4(1))]);
    assert_eq!(
        c.backends_of("198.19.0.50:80/TCP"),
        Some(vec![format!("{}:8080", pod_v4(1))])
    );
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(c.bpffs.path.join(lb_common::MAP_SVC4))
        .output()
        .expect("bpftool");
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains("\"proto\": 132"),
        "SCTP keys carry IPPROTO_SCTP"
    );
    // The TCP port of the same VIP works; TCP to the SCTP-only port is refused (wrong protocol).
    assert_eq!(c.client(&["tcp", "198.19.0.50:80", "1"])[0]["ok"], true);
    assert_eq!(
        c.client(&["tcp", "198.19.0.50:3868", "1"])[0]["error"],
        "ECONNREFUSED"
    );
}
