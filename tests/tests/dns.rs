//! Cluster DNS served by the agent (`--dns`), asked by `dig` over real sockets: the
//! specification's records, forwarding (with a stand-in upstream on loopback: no query leaves
//! the machine), truncation and TCP, propagation of a change, and malformed queries.
use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_model::dns::{Lookup, RData, Rr, qtype, rcode, wire};
use lb_tests::{
    Cluster, service, wait_for,
    web::{VIP4, VIP6, ready, write_web},
};

/// A stand-in upstream resolver on loopback: `db.example.org` A 198.18.200.53, anything else
/// NXDOMAIN with a SOA. Returns its address; the thread ends with the test process.
fn upstream() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind upstream");
    let addr = s.local_addr().expect("upstream addr");
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            let Ok(q) = wire::parse_query(&buf[..n]) else {
                continue;
            };
            let l = if q.name == "db.example.org" && q.qtype == qtype::A {
                Lookup::Answer {
                    rcode: rcode::NOERROR,
                    answers: vec![Rr {
                        owner: None,
                        data: RData::A([198, 18, 200, 53].into()),
                    }],
                    additional: Vec::new(),
                    soa: None,
                }
            } else {
                Lookup::Answer {
                    rcode: rcode::NXDOMAIN,
                    answers: Vec::new(),
                    additional: Vec::new(),
                    soa: Some(Rr {
                        owner: Some("example.org".into()),
                        data: RData::Soa { serial: 42 },
                    }),
                }
            };
            let _ = s.send_to(&wire::answer(&q, &l, 60, "example.org", 512), peer);
        }
    });
    addr
}

/// The agent's DNS address, from its log.
fn dns_addr(c: &Cluster) -> SocketAddr {
    let log = c.agent_log();
    log.lines()
        .filter_map(|l| {
            l.contains("serving DNS")
                .then(|| l.split("addr=").nth(1))
                .flatten()
        })
        .next_back()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no DNS address in the log:\n{log}"))
}

/// `dig @addr args…`: (status, flags, answer lines).
fn dig(addr: SocketAddr, args: &[&str]) -> (String, String, Vec<String>) {
    let out = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string()])
        .args(["+noall", "+comments", "+answer", "+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("run dig (bind9-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_owned();
    let flags = text
        .split("flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .to_owned();
    let mut answers: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    answers.sort();
    (status, flags, answers)
}

/// (status, sorted answer lines) a `dig` should print.
type Expect = (String, Vec<String>);

#[test]
#[expect(clippy::too_many_lines, reason = "one zone, every record kind")]
fn the_zone_is_served_as_the_specification_says() {
    let up = upstream();
    let mut c = Cluster::new("dns", 2);
    write_web(&c, &ready(2));
    c.write_manifest(
        "more.yaml",
        &[
            service("v4only", &["198.19.0.11"], &[("http", 80, "TCP")]),
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: test}\nspec: {type: ExternalName, externalName: db.example.org}\n".to_owned(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: test}\nspec: {clusterIP: None, ports: [{name: pg, port: 5432}]}\n".to_owned(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, namespace: test, labels: {kubernetes.io/service-name: db}}\n\
             addressType: IPv4\nports: [{name: pg, port: 5432}]\nendpoints: [{addresses: [198.18.0.21], hostname: db-0}, {addresses: [198.18.0.22]}]\n".to_owned(),
        ]
        .join("---\n"),
    );
    let upstream_flag = up.to_string();
    c.start_agent_with(&["--dns", "127.0.0.1:0", "--dns-upstream", &upstream_flag]);
    let dns = dns_addr(&c);
    let z = "svc.cluster.local";
    let ok = |answers: &[&str]| {
        (
            "NOERROR".to_owned(),
            answers.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
    };
    let cases: Vec<(Vec<String>, Expect)> = vec![
        (
            vec![format!("web.test.{z}"), "A".into()],
            ok(&[&format!("web.test.{z}. 5 IN A {VIP4}")]),
        ),
        (
            vec![format!("WEB.Test.{z}"), "AAAA".into()],
            ok(&[&format!("WEB.Test.{z}. 5 IN AAAA {VIP6}")]),
        ),
        (vec![format!("v4only.test.{z}"), "AAAA".into()], ok(&[])),
        (
            vec![format!("_http._tcp.web.test.{z}"), "SRV".into()],
            ok(&[&format!(
                "_http._tcp.web.test.{z}. 5 IN SRV 0 100 80 web.test.{z}."
            )]),
        ),
        (
            vec!["-x".into(), VIP4.into()],
            ok(&[&format!("10.0.19.198.in-addr.arpa. 5 IN PTR web.test.{z}.")]),
        ),
        (
            vec!["-x".into(), VIP6.into()],
            ok(&[&format!(
                "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.f.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa. 5 IN PTR web.test.{z}."
            )]),
        ),
        (
            vec![format!("db.test.{z}"), "A".into()],
            ok(&[
                &format!("db.test.{z}. 5 IN A 198.18.0.21"),
                &format!("db.test.{z}. 5 IN A 198.18.0.22"),
            ]),
        ),
        (
            vec![format!("db-0.db.test.{z}"), "A".into()],
            ok(&[&format!("db-0.db.test.{z}. 5 IN A 198.18.0.21")]),
        ),
        (
            vec!["dns-version.cluster.local".into(), "TXT".into()],
            ok(&["dns-version.cluster.local. 5 IN TXT \"1.1.0\""]),
        ),
        // ExternalName: the CNAME, and the target's address from upstream.
        (
            vec![format!("ext.test.{z}"), "A".into()],
            ok(&[
                "db.example.org. 5 IN A 198.18.200.53",
                &format!("ext.test.{z}. 5 IN CNAME db.example.org."),
            ]),
        ),
        (
            vec![format!("nope.test.{z}"), "A".into()],
            ("NXDOMAIN".into(), Vec::new()),
        ),
        // Outside the zone: the upstream's own answer, rcode included.
        (
            vec!["db.example.org".into(), "A".into()],
            ok(&["db.example.org. 60 IN A 198.18.200.53"]),
        ),
        (
            vec!["missing.example.org".into(), "A".into()],
            ("NXDOMAIN".into(), Vec::new()),
        ),
    ];
    for (args, (status, answers)) in &cases {
        for tcp in [false, true] {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            if tcp {
                a.push("+tcp");
            }
            let (st, flags, got) = dig(dns, &a);
            assert_eq!((&st, &got), (status, answers), "dig {a:?} (flags {flags})");
        }
    }
    // Negative answers are authoritative and carry the zone's SOA.
    let out = Command::new("dig")
        .args([&format!("@{}", dns.ip()), "-p", &dns.port().to_string()])
        .args([
            "+noall",
            "+comments",
            "+authority",
            &format!("nope.test.{z}"),
        ])
        .output()
        .expect("dig");
    let text = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.contains("flags: qr aa"), "{text}");
    assert!(
        text.contains("cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local."),
        "{text}"
    );

    // Counted: by type and rcode, cache hits of the forwarded name, nothing answered behind.
    let m = c.http_get("metrics", "/metrics");
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    assert!(
        value("lb_dns_queries_total{type=\"A\",rcode=\"NOERROR\"}") >= 10.0,
        "{m}"
    );
    assert!(
        value("lb_dns_queries_total{type=\"A\",rcode=\"NXDOMAIN\"}") >= 4.0,
        "{m}"
    );
    assert!(
        value("lb_dns_queries_total{type=\"PTR\",rcode=\"NOERROR\"}") >= 4.0,
        "{m}"
    );
    assert!(
        value("lb_dns_cache_hits_total") >= 1.0,
        "the second ask of db.example.org: {m}"
    );
    assert!(
        value("lb_dns_upstream_duration_seconds_count") >= 1.0,
        "{m}"
    );
    assert!(
        value("lb_dns_answers_behind_total").abs() < f64::EPSILON,
        "{m}"
    );

    // A change is answered within the sync time: a new Service, and an endpoint gone.
    let t = Instant::now();
    c.write_manifest(
        "new.yaml",
        &service("fresh", &["198.19.0.12"], &[("http", 80, "TCP")]),
    );
    wait_for(Duration::from_secs(5), || {
        (dig(dns, &[&format!("fresh.test.{z}")]).2.len() == 1).then_some(())
    })
    .expect("new Service in DNS");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    c.write_manifest(
        "more.yaml",
        &[
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: test}\nspec: {clusterIP: None, ports: [{name: pg, port: 5432}]}\n",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, namespace: test, labels: {kubernetes.io/service-name: db}}\n\
             addressType: IPv4\nports: [{name: pg, port: 5432}]\nendpoints: [{addresses: [198.18.0.21], hostname: db-0}]\n",
        ]
        .join("---\n"),
    );
    wait_for(Duration::from_secs(5), || {
        (dig(dns, &[&format!("db.test.{z}")]).2.len() == 1).then_some(())
    })
    .expect("removed endpoint gone from DNS");
    // An ExternalName retargeted: the new CNAME.
    c.write_manifest(
        "ext2.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: test}\nspec: {type: ExternalName, externalName: db2.example.org}\n",
    );
    // (The old definition in more.yaml was replaced above; this one is the only `ext`.)
    wait_for(Duration::from_secs(5), || {
        dig(dns, &[&format!("ext.test.{z}"), "CNAME"])
            .2
            .iter()
            .any(|l| l.ends_with("CNAME db2.example.org."))
            .then_some(())
    })
    .expect("ExternalName change in DNS");
}

#[test]
fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let mut c = Cluster::new("dnstc", 1);
    let eps: String = (1..=60)
        .map(|i| format!("{{addresses: [198.18.1.{i}]}}"))
        .collect::<Vec<_>>()
        .join(", ");
    c.write_manifest(
        "big.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: test}}\nspec: {{clusterIP: None}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-1, namespace: test, labels: {{kubernetes.io/service-name: big}}}}\n\
             addressType: IPv4\nendpoints: [{eps}]\n"
        ),
    );
    c.start_agent_with(&["--dns", "127.0.0.1:0", "--dns-upstream", "127.0.0.1:9"]);
    let dns = dns_addr(&c);
    let name = "big.test.svc.cluster.local";
    let (_, flags, got) = dig(dns, &[name, "+noedns", "+ignore"]);
    assert!(
        flags.contains("tc"),
        "no EDNS: 512 bytes, truncated: {flags}"
    );
    assert!(got.is_empty());
    // dig retries over TCP by itself on TC.
    let (st, _, got) = dig(dns, &[name, "+noedns"]);
    assert_eq!((st.as_str(), got.len()), ("NOERROR", 60));
    // With EDNS 1232 they fit in one datagram.
    let (_, flags, got) = dig(dns, &[name, "+bufsize=1232", "+ignore"]);
    assert!(
        !flags.contains("tc") && got.len() == 60,
        "{flags} {}",
        got.len()
    );
}

#[test]
fn malformed_queries_never_stop_the_server() {
    let mut c = Cluster::new("dnsbad", 1);
    write_web(&c, &ready(1));
    c.start_agent_with(&["--dns", "127.0.0.1:0", "--dns-upstream", "127.0.0.1:9"]);
    let dns = dns_addr(&c);
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let ask = |m: &[u8]| -> Option<Vec<u8>> {
        s.send_to(m, dns).expect("send");
        let mut b = [0u8; 2048];
        s.recv(&mut b).ok().map(|n| b[..n].to_vec())
    };
    // Too short for a header: no answer.
    assert_eq!(ask(&[1, 2, 3]), None);
    let head = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let formerr = |r: Option<Vec<u8>>| {
        r.is_some_and(|r| r[..2] == [0xab, 0xcd] && r[3] & 0xf == rcode::FORMERR)
    };
    // Truncated question, a pointer loop, 255 questions, garbage after the question.
    let mut cut = head.to_vec();
    cut.extend_from_slice(&[3, b'w', b'e']);
    assert!(formerr(ask(&cut)));
    let mut looped = head.to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert!(formerr(ask(&looped)));
    let mut many = head.to_vec();
    many[5] = 255;
    many.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert!(formerr(ask(&many)));
    let mut big = head.to_vec();
    big.extend_from_slice(&[0, 0, 1, 0, 1]);
    big.extend(std::iter::repeat_n(0xff, 3000));
    assert!(formerr(ask(&big)));
    // Still answering.
    let (st, _, got) = dig(dns, &["web.test.svc.cluster.local"]);
    assert_eq!((st.as_str(), got.len()), ("NOERROR", 1));
}

/// Node-local DNS: a pod's queries to the cluster DNS Service's ClusterIP go to this node's
/// agent while it serves, and to the Service's endpoints (here a stand-in DNS pod answering
/// 198.18.200.1 for everything) while it does not — across a `kill -9` under a lookup loop
/// with no failed lookup.
#[test]
fn node_local_dns_is_steered_to_the_agent_and_falls_back_without_it() {
    use lb_tests::{Proc, command_in, lbt};
    use std::io::BufRead as _;
    let mut c = Cluster::new("dnsnl", 1);
    write_web(&c, &ready(1));
    c.write_manifest(
        "kube-dns.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: kube-system}\n\
         spec: {clusterIP: 198.19.0.53, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: kube-dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}\n\
         addressType: IPv4\nports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]\n\
         endpoints: [{addresses: [198.18.0.11]}]\n",
    );
    // The cluster's "real" DNS pod, on b1.
    let mut child = command_in(&c.backends[0], None, &lbt())
        .args(["dnsserve", "0.0.0.0:53", "198.18.200.1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn lbt dnsserve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    c.servers.push(Proc { child });
    // The agent on the node (its namespace: the address pods reach it by).
    c.agent_on_node();
    let flags = [
        "--dns",
        "198.18.0.1:53",
        "--dns-service",
        "kube-system/kube-dns",
        "--dns-upstream",
        "127.0.0.1:9",
    ];
    c.start_agent_with(&flags);
    let name = "web.test.svc.cluster.local";
    let ask = |c: &Cluster| c.client(&["dns", "198.19.0.53:53", name])[0].clone();
    let agent = || serde_json::json!({"answer": VIP4});
    let real = || serde_json::json!({"answer": "198.18.200.1"});
    wait_for(Duration::from_secs(5), || {
        (ask(&c) == agent()).then_some(())
    })
    .unwrap_or_else(|| panic!("not steered to the agent: {}\n{}", ask(&c), c.agent_log()));
    // Killed: within the lease (200 ms) the Service's own endpoint answers.
    c.kill_agent();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(ask(&c), real(), "fallback to the Service's endpoints");
    c.start_agent_with(&flags);
    wait_for(Duration::from_secs(5), || {
        (ask(&c) == agent()).then_some(())
    })
    .expect("steered again after the restart");
    // A lookup loop across kill -9 and restart: no lookup fails.
    let lp = c.client_bg(&["dnsloop", "198.19.0.53:53", name, "3000"]);
    thread::sleep(Duration::from_millis(700));
    c.kill_agent();
    thread::sleep(Duration::from_millis(800));
    c.start_agent_with(&flags);
    let out = lp.wait_with_output().expect("dnsloop");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dnsloop JSON");
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["answers"][VIP4].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(
        v["answers"]["198.18.200.1"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    eprintln!("dnsloop across kill -9: {v}");
}

/// Manifest mode's `--cluster-dns`: the agent creates `kube-system/kube-dns` with that
/// ClusterIP and steers it to itself; with the agent gone and no endpoints, the ClusterIP
/// refuses at once (a resolver moves on) rather than timing out.
#[test]
fn cluster_dns_creates_the_dns_service_and_steers_it_here() {
    let mut c = Cluster::new("dnscd", 1);
    write_web(&c, &ready(1));
    c.agent_on_node();
    c.start_agent_with(&lb_tests::CLUSTER_DNS_FLAGS);
    let ask =
        |c: &Cluster| c.client(&["dns", "198.19.0.53:53", "web.test.svc.cluster.local"])[0].clone();
    wait_for(Duration::from_secs(5), || {
        (ask(&c) == serde_json::json!({"answer": VIP4})).then_some(())
    })
    .unwrap_or_else(|| panic!("{}\n{}", ask(&c), c.agent_log()));
    let svcs = c.client(&[
        "dns",
        "198.19.0.53:53",
        "kube-dns.kube-system.svc.cluster.local",
    ]);
    assert_eq!(
        svcs[0],
        serde_json::json!({"answer": "198.19.0.53"}),
        "the Service exists"
    );
    c.kill_agent();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(ask(&c), serde_json::json!({"error": "ECONNREFUSED"}));
}
