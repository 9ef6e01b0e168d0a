//! The socket-LB test fixture: Service `web` (80/TCP and 53/UDP on both families, VIPs
//! [`VIP4`] and [`VIP6`]) over backends b1..=bn of a [`Cluster`], and helpers to read what
//! clients saw. Shared by the socket-LB test files (`tests/tests/clusterip.rs`, …).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{Cluster, Value, peer_ip, pod_v4, pod_v6, service, slice, wait_for};

pub const VIP4: &str = "198.19.0.10";
pub const VIP6: &str = "2001:db8:f::10";

/// `web`: 80/TCP (http → 8080) and 53/UDP (dns → 5353) on both families, backends b1..=bn.
pub fn write_web(c: &Cluster, backends: &[(usize, bool, bool, bool)]) {
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

pub fn ready(n: usize) -> Vec<(usize, bool, bool, bool)> {
    (1..=n).map(|i| (i, true, true, false)).collect()
}

pub fn eps(v: &[(String, bool, bool, bool)]) -> Vec<(&str, bool, bool, bool)> {
    v.iter()
        .map(|(a, r, s, t)| (a.as_str(), *r, *s, *t))
        .collect()
}

/// `reply` of a backend is `NAME PEER`.
pub fn backend_of(v: &Value) -> (String, IpAddr) {
    let reply = v["reply"]
        .as_str()
        .unwrap_or_else(|| panic!("no reply in {v}"));
    let (name, peer) = reply
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad reply {reply:?}"));
    (name.to_owned(), peer_ip(peer))
}

pub fn stats(c: &Cluster) -> BTreeMap<String, u64> {
    serde_json::from_value(c.inspect("stats")).expect("stats JSON")
}

pub fn tally(results: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        assert_eq!(r["ok"], true, "request failed: {r}");
        *m.entry(backend_of(r).0).or_default() += 1;
    }
    m
}

/// Polls `inspect` until `frontend`'s backends equal `want`; returns how long it took.
pub fn time_until(c: &Cluster, frontend: &str, want: &[String]) -> Duration {
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
