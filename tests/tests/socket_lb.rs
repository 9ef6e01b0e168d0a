//! Socket-level `ClusterIP` load balancing on the real kernel: netns + child cgroup + real
//! sockets. Each test builds its own [`Cluster`] and tears it down, pass or fail.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Cluster, Value, peer_ip, pod_v4, pod_v6, service, slice, wait_for};

const VIP4: &str = "198.19.0.10";
const VIP6: &str = "2001:db8:f::10";

/// `web`: 80/TCP (http → 8080) and 53/UDP (dns → 5353) on both families, backends b1..=bn.
fn write_web(c: &Cluster, backends: &[(usize, bool, bool, bool)]) {
    let ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let v4: Vec<(String, bool, bool, bool)> = backends
        .iter()
        .map(|&(i, r, s, t)| (pod_v4(i), r, s, t))
        .collect();
    let v6: Vec<(String, bool, bool, bool)> = backends
        .iter()
        .map(|&(i, r, s, t)| (pod_v6(i), r, s, t))
        .collect();
    c.write_manifest(
        "web.yaml",
        &[
            service(
                "web",
                &[VIP4, VIP6],
                &[("http", 80, "TCP"), ("dns", 53, "UDP")],
            ),
            slice("web-v4", "web", "IPv4", &ports, &eps(&v4)),
            slice("web-v6", "web", "IPv6", &ports, &eps(&v6)),
        ]
        .join("---\n"),
    );
}

fn ready(n: usize) -> Vec<(usize, bool, bool, bool)> {
    (1..=n).map(|i| (i, true, true, false)).collect()
}

fn eps(v: &[(String, bool, bool, bool)]) -> Vec<(&str, bool, bool, bool)> {
    v.iter()
        .map(|(a, r, s, t)| (a.as_str(), *r, *s, *t))
        .collect()
}

/// `reply` of a backend is `NAME PEER`.
fn backend_of(v: &Value) -> (String, IpAddr) {
    let reply = v["reply"]
        .as_str()
        .unwrap_or_else(|| panic!("no reply in {v}"));
    let (name, peer) = reply
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad reply {reply:?}"));
    (name.to_owned(), peer_ip(peer))
}

fn stats(c: &Cluster) -> BTreeMap<String, u64> {
    serde_json::from_value(c.inspect("stats")).expect("stats JSON")
}

fn tally(results: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        assert_eq!(r["ok"], true, "request failed: {r}");
        *m.entry(backend_of(r).0).or_default() += 1;
    }
    m
}

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
    // connect() keeps its reverse NAT in the socket's storage: the cookie-keyed LRU maps (for
    // unconnected UDP) stay empty.
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

/// Polls `inspect` until `frontend`'s backends equal `want`; returns how long it took.
fn time_until(c: &Cluster, frontend: &str, want: &[String]) -> Duration {
    let started = Instant::now();
    wait_for(Duration::from_secs(5), || {
        (c.backends_of(frontend).as_deref() == Some(want)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{frontend} never became {want:?}; now {:?}\n{}",
            c.backends_of(frontend),
            c.agent_log()
        )
    });
    started.elapsed()
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
        "Service test/thief: spec.clusterIP[0] / spec.ports[0]: 198.19.0.10:80/TCP is already served by Service test/web",
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
fn agent_kill9_and_restart_under_a_connect_loop_loses_no_connection() {
    let mut c = Cluster::new("restart", 2);
    write_web(&c, &ready(2));
    c.start_agent();
    let before = c.inspect("services");

    let lp = c.client_bg(&["loop", &format!("{VIP4}:80"), "4000"]);
    std::thread::sleep(Duration::from_millis(600));
    c.kill_agent();
    std::thread::sleep(Duration::from_millis(600));
    c.start_agent();
    std::thread::sleep(Duration::from_millis(300));
    c.kill_agent();
    c.start_agent();
    let out = lp.wait_with_output().expect("loop");
    let v: Value = serde_json::from_slice(&out.stdout).expect("loop JSON");
    assert_eq!(
        v["failed"],
        0,
        "connections failed across restarts: {v}\n{}",
        c.agent_log()
    );
    assert!(
        v["ok"].as_u64().unwrap() > 100,
        "too few connections to mean anything: {v}"
    );

    // The restarted agent adopted the maps: nothing was rewritten, nothing duplicated.
    assert_eq!(c.inspect("services"), before);
    let log = c.agent_log();
    assert_eq!(
        log.matches("programmed datapath").count(),
        1,
        "only the first agent should write:\n{log}"
    );
    let attached = lb_tests::attached_hooks(&c.cgroup.path);
    let lines = attached.lines().filter(|l| l.contains("sock")).count();
    assert_eq!(
        lines, 8,
        "exactly one program per hook after handovers:\n{attached}"
    );
}

#[test]
fn maps_are_pinned_with_btf_and_cleanup_removes_everything() {
    let mut c = Cluster::new("pins", 1);
    write_web(&c, &ready(1));
    // The counters map of an older build, as an upgrade finds it: unpinned by the new agent.
    std::fs::create_dir_all(&c.bpffs.path).expect("bpffs dir");
    let old = c.bpffs.path.join("LB_STATS_V2");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "20",
        ])
        .args(["name", "LB_STATS_V2"])
        .output()
        .expect("bpftool");
    assert!(made.status.success(), "{made:?}");
    c.start_agent();
    assert!(!old.exists(), "superseded map still pinned");
    for name in lb_common::ALL_MAPS {
        assert!(c.bpffs.path.join(name).exists(), "map {name} not pinned");
    }
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(c.bpffs.path.join(lb_common::MAP_SVC4))
        .output()
        .expect("bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "\"address\": [198,19,0,10",
        "\"dport\": 80",
        "\"backend_slot\"",
        "\"count\": 1",
        "\"backend_id\"",
    ] {
        assert!(
            dump.contains(field),
            "bpftool dump lacks {field:?} (BTF field names):\n{dump}"
        );
    }
    let be = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(c.bpffs.path.join(lb_common::MAP_BE4))
        .output()
        .expect("bpftool");
    assert!(String::from_utf8_lossy(&be.stdout).contains("\"port\": 8080"));

    c.kill_agent();
    c.cleanup();
    assert!(!c.bpffs.path.exists(), "pins left behind");
    let attached = lb_tests::attached_hooks(&c.cgroup.path);
    assert!(!attached.contains("sock"), "hooks left attached");
    let r = &c.client(&["tcp", &format!("{VIP4}:80"), "1"])[0];
    assert_eq!(
        r["error"], "ENETUNREACH",
        "after cleanup the VIP is no longer translated: {r}"
    );
}

/// Removes a pin made by a test.
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn cleanup_detaches_hooks_kept_alive_outside_our_pins() {
    let mut c = Cluster::new("orphan", 1);
    write_web(&c, &ready(1));
    c.start_agent();
    c.kill_agent();
    // Another holder of one of our links (a second pin made by some other tool): removing our
    // pins alone would leave that hook attached.
    let show = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(c.bpffs.path.join("links/sock4_connect"))
        .output()
        .expect("bpftool");
    let id = serde_json::from_slice::<Value>(&show.stdout).expect("link JSON")["id"]
        .as_u64()
        .expect("link id");
    let extra = std::path::PathBuf::from(format!("/sys/fs/bpf/lbt-{}-extra", c.tag));
    lb_tests::sh(&format!("bpftool link pin id {id} {}", extra.display()));
    let _extra = Unpin(extra);

    let cleaned = c.cleanup();
    assert!(cleaned.contains("detached 1 unpinned hooks"), "{cleaned}");
    let attached = lb_tests::attached_hooks(&c.cgroup.path);
    assert!(
        !attached.contains("sock"),
        "hooks left attached: {attached}"
    );
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

#[test]
fn run_fails_loudly_when_it_cannot_load_or_attach() {
    lb_tests::require_privileges();
    lb_tests::ensure_bpffs();
    let tag = format!("lbt-fail-{}", std::process::id());
    let manifests = lb_tests::TempDir::new(&format!("{tag}-m"));
    let run = |extra: &[&str]| {
        let out = Command::new(lb_tests::lb_agent())
            .args(["run", "--manifests"])
            .arg(&manifests.path)
            .args(["--nodeport-interfaces", "none"])
            .args(extra)
            .env("NO_COLOR", "1")
            .output()
            .expect("spawn lb-agent");
        assert!(!out.status.success(), "lb-agent {extra:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bpffs = format!("/sys/fs/bpf/{tag}");
    let _pins = lb_tests::Bpffs::new(&bpffs, &lb_tests::cgroup2_root().join("does-not-exist"));
    let err = run(&["--cgroup", "/nonexistent/cgroup", "--bpffs", &bpffs]);
    assert!(
        err.contains("cannot open cgroup /nonexistent/cgroup"),
        "{err}"
    );
    let not_bpf = lb_tests::TempDir::new(&format!("{tag}-notbpf"));
    let cg = lb_tests::Cgroup::new(&tag);
    let err = run(&[
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--bpffs",
        not_bpf.path.to_str().unwrap(),
    ]);
    assert!(err.contains("not on a BPF filesystem"), "{err}");
    // A map of another layout pinned under our name: refuse to adopt it, touch nothing.
    std::fs::create_dir_all(&bpffs).expect("mkdir bpffs dir");
    lb_tests::sh(&format!(
        "bpftool map create {bpffs}/LB4_SVC_V1 type hash key 4 value 4 entries 8 name LB4_SVC_V1"
    ));
    let err = run(&["--cgroup", cg.path.to_str().unwrap(), "--bpffs", &bpffs]);
    assert!(
        err.contains(
            "map LB4_SVC_V1: pinned map has key/value size (4, 4), this build expects (12, 12)"
        ),
        "{err}"
    );
    assert!(
        std::path::Path::new(&format!("{bpffs}/LB4_SVC_V1")).exists(),
        "the foreign pin is left alone"
    );
    let attached = lb_tests::attached_hooks(&cg.path);
    assert!(attached.trim().is_empty(), "nothing attached on failure");
}

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

#[test]
fn runs_with_only_cap_bpf_and_cap_net_admin() {
    // As deploy/daemonset.yaml grants: uid 0, bounding set {CAP_BPF, CAP_NET_ADMIN}.
    let mut c = Cluster::new("caps", 1);
    write_web(&c, &ready(1));
    c.agent_prefix = ["setpriv", "--bounding-set=-all,+bpf,+net_admin"]
        .map(String::from)
        .to_vec();
    c.start_agent();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", c.agent.as_ref().unwrap().pid()))
            .expect("status");
    let eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .expect("CapEff");
    // CAP_NET_ADMIN = 12, CAP_BPF = 39.
    assert_eq!(
        eff.split_whitespace().nth(1),
        Some("0000008000001000"),
        "{eff}"
    );
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "5"]));
    assert_eq!(t.get("b1"), Some(&5));
    assert_eq!(c.client(&["udp", &format!("{VIP4}:53"), "2"]).len(), 2);

    // Each of the two is necessary.
    for (caps, why) in [
        ("+bpf", "Operation not permitted"),
        ("+net_admin", "Operation not permitted"),
    ] {
        let dir = format!(
            "/sys/fs/bpf/lbt-caps-{}-{}",
            caps.trim_start_matches('+'),
            std::process::id()
        );
        let _pins = lb_tests::Bpffs::new(&dir, &c.cgroup.path);
        let out = Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg(lb_tests::lb_agent())
            .args(["run", "--manifests"])
            .arg(&c.manifests.path)
            .args(["--nodeport-interfaces", "none"])
            .arg("--cgroup")
            .arg(&c.cgroup.path)
            .args([
                "--bpffs",
                &dir,
                "--metrics-addr",
                "127.0.0.1:0",
                "--healthz-addr",
                "127.0.0.1:0",
            ])
            .output()
            .expect("spawn");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "with only {caps}: {err}"
        );
    }
}

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

/// 300 dual-stack Services: runs of hundreds of puts per map, which the agent writes with
/// `BPF_MAP_UPDATE_BATCH`. Every entry must land where one-by-one writes would put it: the
/// Services answer, `inspect` reads them back, and a restarted agent adopts them with nothing
/// to rewrite.
#[test]
fn hundreds_of_services_written_in_batches_read_back_and_adopt_exactly() {
    const N: usize = 300;
    let mut c = Cluster::new("batch", 2);
    let vip4 = |i: usize| format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250);
    let vip6 = |i: usize| format!("2001:db8:f::1:{i:x}");
    let manifests = |backends: usize| {
        let v4: Vec<(String, bool, bool, bool)> = (1..=backends)
            .map(|b| (pod_v4(b), true, true, false))
            .collect();
        let v6: Vec<(String, bool, bool, bool)> = (1..=backends)
            .map(|b| (pod_v6(b), true, true, false))
            .collect();
        let ports = [("http", 8080, "TCP")];
        (0..N)
            .flat_map(|i| {
                let name = format!("s{i}");
                let (a4, a6) = (vip4(i), vip6(i));
                [
                    service(&name, &[&a4, &a6], &[("http", 80, "TCP")]),
                    slice(&format!("{name}-4"), &name, "IPv4", &ports, &eps(&v4)),
                    slice(&format!("{name}-6"), &name, "IPv6", &ports, &eps(&v6)),
                ]
            })
            .collect::<Vec<_>>()
            .join("---\n")
    };
    c.write_manifest("many.yaml", &manifests(2));
    c.start_agent();
    let log = c.agent_log();
    assert!(
        log.contains(&format!("frontends={} ", 2 * N)),
        "one sync for all:\n{log}"
    );
    assert!(
        !log.contains("one by one"),
        "this kernel has batched updates:\n{log}"
    );
    let services = c.inspect("services");
    let listed = services.as_array().expect("services array");
    assert_eq!(listed.len(), 2 * N, "every frontend reads back");
    let mut two = vec![format!("{}:8080", pod_v4(1)), format!("{}:8080", pod_v4(2))];
    two.sort();
    assert_eq!(c.backends_of(&format!("{}:80/TCP", vip4(N - 1))), Some(two));
    assert_eq!(
        c.backends_of(&format!("[{}]:80/TCP", vip6(N - 1)))
            .map(|b| b.len()),
        Some(2)
    );
    for target in [
        format!("{}:80", vip4(0)),
        format!("{}:80", vip4(N - 1)),
        format!("[{}]:80", vip6(0)),
        format!("[{}]:80", vip6(N - 1)),
    ] {
        let t = tally(&c.client(&["tcp", &target, "6"]));
        assert_eq!(t.values().sum::<usize>(), 6, "{target}: {t:?}");
    }

    // Adoption reads every batched entry back: nothing to rewrite.
    c.kill_agent();
    c.start_agent();
    assert_eq!(c.inspect("services"), services);
    let log = c.agent_log();
    assert_eq!(
        log.matches("programmed datapath").count(),
        1,
        "the restarted agent found the maps exactly as wanted:\n{log}"
    );

    // One endpoint fewer everywhere: a batch of rewritten slots, deletes one by one.
    c.write_manifest("many.yaml", &manifests(1));
    let took = time_until(
        &c,
        &format!("{}:80/TCP", vip4(N - 1)),
        &[format!("{}:8080", pod_v4(1))],
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        c.backends_of(&format!("[{}]:80/TCP", vip6(0))),
        Some(vec![format!("[{}]:8080", pod_v6(1))])
    );
    let t = tally(&c.client(&["tcp", &format!("{}:80", vip4(N / 2)), "4"]));
    assert_eq!(t.get("b1"), Some(&4), "{t:?}");
}
