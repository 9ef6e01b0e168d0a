use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::k8s::{core::Service, discovery::EndpointSlice};

use super::*;

fn objs(
    yaml: &str,
) -> (
    Vec<std::sync::Arc<Service>>,
    Vec<std::sync::Arc<EndpointSlice>>,
) {
    let mut errors = Vec::new();
    let o = crate::manifest::parse_str(std::path::Path::new("t.yaml"), yaml, &mut errors)
        .expect("yaml");
    assert!(errors.is_empty(), "{errors:?}");
    (o.services, o.slices)
}

fn run(yaml: &str) -> (Desired, Vec<Error>) {
    let (s, e) = objs(yaml);
    build(&s, &e, &Config::default(), &mut Cache::default())
}

fn fe(s: &str, proto: Proto) -> Frontend {
    let sa: SocketAddr = s.parse().expect("socket addr");
    Frontend {
        addr: sa.ip(),
        port: sa.port(),
        proto,
        scope: Scope::InNode,
    }
}

fn backends(d: &Desired, f: &Frontend) -> Vec<String> {
    d.frontends
        .get(f)
        .expect("frontend present")
        .backends
        .iter()
        .map(|b| b.to_string())
        .collect()
}

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [198.19.0.10, '2001:db8:1::10']
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
";

#[test]
fn ports_match_by_name_and_protocol_across_slices() {
    let (d, errors) = run(&format!("{WEB}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-a, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}, {{name: http, port: 9999, protocol: UDP}}]
endpoints:
- addresses: [198.18.1.1]
- addresses: [198.18.1.2]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-b, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [198.18.1.2]
- addresses: [198.18.1.3]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: ['2001:db8:2::1']
"));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        backends(&d, &fe("198.19.0.10:80", Proto::Tcp)),
        ["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"],
        "merged across slices, deduplicated, UDP port 9999 of the same name not used"
    );
    assert_eq!(
        backends(&d, &fe("198.19.0.10:53", Proto::Udp)),
        ["198.18.1.1:5353", "198.18.1.2:5353"]
    );
    assert_eq!(
        backends(&d, &fe("[2001:db8:1::10]:80", Proto::Tcp)),
        ["[2001:db8:2::1]:8080"]
    );
    assert!(
        backends(&d, &fe("[2001:db8:1::10]:53", Proto::Udp)).is_empty(),
        "no IPv6 dns endpoints → REJECT"
    );
    assert_eq!(d.frontends.len(), 4);
}

#[test]
fn ready_then_serving_terminating_fallback() {
    let slice = |eps: &str| {
        format!(
            "{WEB}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: w, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: {eps}
"
        )
    };
    let f = fe("198.19.0.10:80", Proto::Tcp);
    // One ready (nil ready ⇒ ready), one terminating+serving: only the ready one.
    let (d, _) = run(&slice(
        "[{addresses: [198.18.1.1]}, {addresses: [198.18.1.2], conditions: {ready: false, serving: true, terminating: true}}]",
    ));
    assert_eq!(backends(&d, &f), ["198.18.1.1:8080"]);
    // None ready: fall back to serving+terminating, never to not-serving ones.
    let (d, _) = run(&slice(
        "[{addresses: [198.18.1.1], conditions: {ready: false, serving: false, terminating: true}}, {addresses: [198.18.1.2], conditions: {ready: false, serving: true, terminating: true}}]",
    ));
    assert_eq!(backends(&d, &f), ["198.18.1.2:8080"]);
    // Not ready and not terminating: nothing usable.
    let (d, _) = run(&slice(
        "[{addresses: [198.18.1.1], conditions: {ready: false}}]",
    ));
    assert!(backends(&d, &f).is_empty());
}

#[test]
fn headless_externalname_and_foreign_proxy_are_ignored() {
    let (d, errors) = run("
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 198.19.0.11, ports: [{port: 80}]}
");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(d.frontends.is_empty(), "{d:?}");
    let (s, e) = objs(
        "
apiVersion: v1
kind: Service
metadata: {name: mine, labels: {service.kubernetes.io/service-proxy-name: lb}}
spec: {clusterIP: 198.19.0.11, ports: [{port: 80}]}
",
    );
    let (d, _) = build(
        &s,
        &e,
        &Config {
            proxy_name: Some("lb".into()),
            ..Config::default()
        },
        &mut Cache::default(),
    );
    assert_eq!(d.frontends.len(), 1, "our own proxy name is served");
}

#[test]
fn bad_input_is_named_and_only_it_is_skipped() {
    let (d, errors) = run("
apiVersion: v1
kind: Service
metadata: {name: octal, namespace: ns}
spec: {clusterIP: 010.0.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ports, namespace: ns}
spec: {clusterIP: 198.19.0.20, ports: [{name: a, port: 0}, {name: b, port: 70000}, {name: c, port: 81, protocol: ICMP}, {name: d, port: 82}]}
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: ns}
spec: {clusterIP: 198.19.0.21, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good-1, namespace: ns, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ['2001:db8::1']
- addresses: [198.018.1.1]
- addresses: [198.18.1.7]
");
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let has = |s: &str| msgs.iter().any(|m| m.contains(s));
    assert!(
        has("Service ns/octal: spec.clusterIP[0]: invalid IP address \"010.0.0.1\""),
        "{msgs:#?}"
    );
    assert!(
        has("Service ns/ports: spec.ports[0].port: port 0"),
        "{msgs:#?}"
    );
    assert!(
        has("Service ns/ports: spec.ports[1].port: port 70000"),
        "{msgs:#?}"
    );
    assert!(
        has("Service ns/ports: spec.ports[2].protocol: unknown protocol \"ICMP\""),
        "{msgs:#?}"
    );
    assert!(
        has(
            "EndpointSlice ns/good-1: endpoints[0].addresses[0]: 2001:db8::1 is not an IPv4 address"
        ),
        "{msgs:#?}"
    );
    assert!(
        has(
            "EndpointSlice ns/good-1: endpoints[1].addresses[0]: invalid IP address \"198.018.1.1\""
        ),
        "{msgs:#?}"
    );
    assert_eq!(msgs.len(), 6, "{msgs:#?}");
    assert_eq!(
        backends(&d, &fe("198.19.0.21:80", Proto::Tcp)),
        ["198.18.1.7:8080"]
    );
    assert!(
        d.frontends.contains_key(&fe("198.19.0.20:82", Proto::Tcp)),
        "the valid port of a partly bad Service is kept"
    );
    assert_eq!(d.frontends.len(), 2);
}

#[test]
fn duplicate_frontend_goes_to_the_oldest_service() {
    let svc = |name: &str, ts: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns, creationTimestamp: '{ts}'}}\nspec: {{clusterIP: 198.19.0.30, ports: [{{port: 80}}, {{port: 81}}]}}\n"
        )
    };
    // Younger first in input order: the older one must still win.
    let (d, errors) = run(&format!(
        "{}---\n{}",
        svc("young", "2025-01-02T00:00:00Z"),
        svc("old", "2025-01-01T00:00:00Z")
    ));
    assert_eq!(
        d.frontends
            .get(&fe("198.19.0.30:80", Proto::Tcp))
            .expect("fe")
            .service
            .name,
        "old"
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].to_string().contains("Service ns/young")
            && errors[0]
                .to_string()
                .contains("already served by Service ns/old")
    );
    // Same timestamp: namespace/name decides.
    let (d, _) = run(&format!(
        "{}---\n{}",
        svc("b", "2025-01-01T00:00:00Z"),
        svc("a", "2025-01-01T00:00:00Z")
    ));
    assert_eq!(
        d.frontends
            .get(&fe("198.19.0.30:81", Proto::Tcp))
            .expect("fe")
            .service
            .name,
        "a"
    );
}

#[test]
fn families_the_node_does_not_run_are_skipped() {
    let (s, e) = objs(WEB);
    let (d, errors) = build(
        &s,
        &e,
        &Config {
            ipv6: false,
            ..Config::default()
        },
        &mut Cache::default(),
    );
    assert!(errors.is_empty());
    assert!(d.frontends.keys().all(|f| f.addr.is_ipv4()));
    assert_eq!(d.frontends.len(), 2);
}

#[test]
fn parse_ip_refuses_leading_zeros() {
    assert!(parse_ip("010.0.0.1").is_err());
    assert!(parse_ip("10.0.0.01").is_err());
    assert!(parse_ip("10.0.0.0").is_ok());
    assert!(
        parse_ip("2001:db8::0010").is_ok(),
        "IPv6 groups may have leading zeros"
    );
    assert!(parse_ip("1.2.3").is_err());
}

fn policy_case(svc_extra: &str, endpoints: &str, cfg: &Config) -> FrontendState {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: p, namespace: ns}}\nspec: {{clusterIP: 198.19.0.5, ports: [{{port: 80}}]{svc_extra}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: p-1, namespace: ns, labels: {{kubernetes.io/service-name: p}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: {endpoints}\n"
    );
    let (s, e) = objs(&yaml);
    let (d, errors) = build(&s, &e, cfg, &mut Cache::default());
    assert!(errors.is_empty(), "{errors:?}");
    (*d.frontends[&fe("198.19.0.5:80", Proto::Tcp)]).clone()
}

fn addrs(st: &FrontendState) -> Vec<String> {
    st.backends.iter().map(|b| b.ip().to_string()).collect()
}

fn on_node(node: &str, zone: Option<&str>) -> Config {
    Config {
        node_name: node.into(),
        zone: zone.map(Into::into),
        ..Config::default()
    }
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_or_drops() {
    let eps = "[{addresses: [198.18.0.1], nodeName: a}, {addresses: [198.18.0.2], nodeName: b}, {addresses: [198.18.0.3], nodeName: a, conditions: {ready: false, serving: true, terminating: true}}]";
    let local = ", internalTrafficPolicy: Local";
    let st = policy_case(local, eps, &on_node("a", None));
    assert_eq!(addrs(&st), ["198.18.0.1"]);
    assert!(!st.no_local);
    // Only a terminating local endpoint: it is used (local serving+terminating fallback).
    let eps_t = "[{addresses: [198.18.0.2], nodeName: b}, {addresses: [198.18.0.3], nodeName: a, conditions: {ready: false, serving: true, terminating: true}}]";
    assert_eq!(
        addrs(&policy_case(local, eps_t, &on_node("a", None))),
        ["198.18.0.3"]
    );
    // Endpoints elsewhere only: DROP, not REJECT.
    let st = policy_case(local, eps, &on_node("c", None));
    assert!(st.backends.is_empty() && st.no_local);
    // No endpoints anywhere: REJECT.
    let st = policy_case(local, "[]", &on_node("a", None));
    assert!(st.backends.is_empty() && !st.no_local);
    // Cluster policy ignores node names.
    assert_eq!(
        addrs(&policy_case("", eps, &on_node("c", None))),
        ["198.18.0.1", "198.18.0.2"]
    );
}

#[test]
fn topology_hints_as_kube_proxy_reads_them() {
    let zoned = "[{addresses: [198.18.0.1], hints: {forZones: [{name: z1}]}}, {addresses: [198.18.0.2], hints: {forZones: [{name: z2}]}}]";
    assert_eq!(
        addrs(&policy_case("", zoned, &on_node("a", Some("z1")))),
        ["198.18.0.1"]
    );
    assert_eq!(
        addrs(&policy_case("", zoned, &on_node("a", Some("z2")))),
        ["198.18.0.2"]
    );
    // No endpoint for our zone, or no zone label: hints ignored, all used.
    assert_eq!(
        addrs(&policy_case("", zoned, &on_node("a", Some("z3")))).len(),
        2
    );
    assert_eq!(addrs(&policy_case("", zoned, &on_node("a", None))).len(), 2);
    // One ready endpoint without hints: hints ignored.
    let partial =
        "[{addresses: [198.18.0.1], hints: {forZones: [{name: z1}]}}, {addresses: [198.18.0.2]}]";
    assert_eq!(
        addrs(&policy_case("", partial, &on_node("a", Some("z1")))).len(),
        2
    );
    // A not-ready endpoint without hints does not count.
    let nr = "[{addresses: [198.18.0.1], hints: {forZones: [{name: z1}]}}, {addresses: [198.18.0.2], conditions: {ready: false}}]";
    assert_eq!(
        addrs(&policy_case("", nr, &on_node("a", Some("z1")))),
        ["198.18.0.1"]
    );
    // Node hints (PreferSameNode) win over zone hints; without one for us, zone hints apply.
    let noded = "[{addresses: [198.18.0.1], hints: {forNodes: [{name: a}], forZones: [{name: z1}]}}, {addresses: [198.18.0.2], hints: {forNodes: [{name: b}], forZones: [{name: z1}]}}]";
    assert_eq!(
        addrs(&policy_case(
            ", trafficDistribution: PreferSameNode",
            noded,
            &on_node("b", Some("z1"))
        )),
        ["198.18.0.2"]
    );
    assert_eq!(
        addrs(&policy_case(
            ", trafficDistribution: PreferSameNode",
            noded,
            &on_node("c", Some("z1"))
        ))
        .len(),
        2
    );
}

#[test]
fn session_affinity_timeouts() {
    let eps = "[{addresses: [198.18.0.1]}]";
    assert_eq!(policy_case("", eps, &Config::default()).affinity_timeout, 0);
    assert_eq!(
        policy_case(", sessionAffinity: ClientIP", eps, &Config::default()).affinity_timeout,
        DEFAULT_AFFINITY_TIMEOUT
    );
    let t = ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}";
    assert_eq!(policy_case(t, eps, &Config::default()).affinity_timeout, 60);
    let (s, e) = objs(
        "apiVersion: v1\nkind: Service\nmetadata: {name: p, namespace: ns}\nspec: {clusterIP: 198.19.0.5, ports: [{port: 80}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}}\n",
    );
    let (d, errors) = build(&s, &e, &Config::default(), &mut Cache::default());
    assert!(errors[0].to_string().contains("Service ns/p: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 90000 is outside 1-86400"), "{errors:?}");
    assert_eq!(
        d.frontends.len(),
        1,
        "the Service is still served, with the default timeout"
    );
}

#[test]
fn the_cache_gives_the_same_results_as_a_fresh_build() {
    let yaml = |eps: &str, port: u16| {
        format!(
            "{WEB}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: w, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints: {eps}
---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: shop}}
spec: {{clusterIP: 010.0.0.1, ports: [{{port: 80}}]}}
"
        )
    };
    let mut cache = Cache::default();
    let cfg = Config::default();
    let (s1, e1) = objs(&yaml("[{addresses: [198.18.1.1]}]", 8080));
    let fresh = |s: &[Arc<Service>], e: &[Arc<EndpointSlice>], cfg: &Config| {
        build(s, e, cfg, &mut Cache::default())
    };
    assert_eq!(build(&s1, &e1, &cfg, &mut cache), fresh(&s1, &e1, &cfg));
    // Same objects again: served from the cache, errors still reported.
    let (d, errors) = build(&s1, &e1, &cfg, &mut cache);
    assert_eq!((d, errors.len()), (fresh(&s1, &e1, &cfg).0, 1));
    // The slice changes (a new object): the Service is recomputed.
    let (_, e2) = objs(&yaml("[{addresses: [198.18.1.2]}]", 9090));
    let mixed = build(&s1, &e2, &cfg, &mut cache);
    assert_eq!(mixed, fresh(&s1, &e2, &cfg));
    assert_eq!(
        backends(&mixed.0, &fe("198.19.0.10:80", Proto::Tcp)),
        ["198.18.1.2:9090"]
    );
    // A config change (zone) empties the cache rather than serving stale results.
    let zoned = Config {
        zone: Some("z".into()),
        ..Config::default()
    };
    assert_eq!(build(&s1, &e2, &zoned, &mut cache), fresh(&s1, &e2, &zoned));
    // Objects gone from the input are gone from the cache.
    let _ = build(&[], &[], &cfg, &mut cache);
    assert_eq!(build(&s1, &e1, &cfg, &mut cache), fresh(&s1, &e1, &cfg));
}

#[test]
fn external_ips_and_load_balancer_ingress_are_frontends_without_markers() {
    let (d, errors) = run("
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.40
  externalIPs: [198.51.100.7, 0198.51.100.8]
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.10}
    - {ip: 203.0.113.11, ipMode: Proxy}
    - {hostname: lb.example.com}
");
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0]
            .contains("Service ns/lb: spec.externalIPs[1]: invalid IP address \"0198.51.100.8\""),
        "{msgs:?}"
    );
    let ext = |a: &str| d.frontends.get(&fe(a, Proto::Tcp)).map(|st| st.external);
    assert_eq!(
        ext("198.19.0.40:80"),
        Some(false),
        "ClusterIP: a VIP with a marker"
    );
    assert_eq!(ext("198.51.100.7:80"), Some(true));
    assert_eq!(ext("203.0.113.10:80"), Some(true));
    assert_eq!(
        ext("203.0.113.11:80"),
        None,
        "ipMode Proxy is not short-circuited"
    );
    // Plus the packet path's view of the externalIP and the LB IP.
    assert_eq!(d.frontends.len(), 5);
    for a in ["198.51.100.7:80", "203.0.113.10:80"] {
        let x = Frontend {
            scope: Scope::External,
            ..fe(a, Proto::Tcp)
        };
        assert!(d.frontends.contains_key(&x), "{a} external scope");
    }
}

#[test]
fn node_ports_for_in_node_clients() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: np, namespace: ns}
spec: {type: NodePort, clusterIP: 198.19.0.41, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 70000}]}
";
    let (s, e) = objs(yaml);
    let cfg = Config {
        node_addresses: vec![
            "198.18.0.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ],
        ..Config::default()
    };
    let (d, errors) = build(&s, &e, &cfg, &mut Cache::default());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .contains("Service ns/np: spec.ports[1].nodePort: port 70000"),
        "{errors:?}"
    );
    let st = |a: &str| {
        d.frontends
            .get(&fe(a, Proto::Tcp))
            .map(|st| (st.external, st.host_only))
    };
    assert_eq!(
        st("198.18.0.1:30080"),
        Some((true, false)),
        "node address: no marker, any client"
    );
    assert_eq!(st("[2001:db8::1]:30080"), Some((true, false)));
    assert_eq!(
        st("127.0.0.1:30080"),
        Some((true, true)),
        "loopback: host processes only"
    );
    assert_eq!(st("198.19.0.41:80"), Some((false, false)));
    assert_eq!(
        d.frontends.len(),
        7,
        "ClusterIP :80 and :81, three NodePort frontends, two of them also for the packet path"
    );
    let loopback_external = Frontend {
        scope: Scope::External,
        ..fe("127.0.0.1:30080", Proto::Tcp)
    };
    assert!(!d.frontends.contains_key(&loopback_external));
}

#[test]
fn primary_node_addresses() {
    use crate::k8s::core::{Node, NodeAddress, NodeStatus};
    let addr = |t: &str, a: &str| NodeAddress {
        type_: t.into(),
        address: a.into(),
    };
    let node = Node {
        status: Some(NodeStatus {
            addresses: Some(vec![
                addr("Hostname", "n1"),
                addr("ExternalIP", "203.0.113.5"),
                addr("InternalIP", "198.18.0.1"),
                addr("InternalIP", "198.18.0.2"),
                addr("ExternalIP", "2001:db8::5"),
            ]),
        }),
        ..Node::default()
    };
    let want: Vec<IpAddr> = vec![
        "198.18.0.1".parse().unwrap(),
        "2001:db8::5".parse().unwrap(),
    ];
    assert_eq!(primary_addresses(Some(&node)), want);
    assert!(primary_addresses(None).is_empty());
}

#[test]
fn internal_traffic_policy_applies_to_cluster_ips_only() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: itp, namespace: ns}
spec: {clusterIP: 198.19.0.42, externalIPs: [198.51.100.9], internalTrafficPolicy: Local, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: itp-1, namespace: ns, labels: {kubernetes.io/service-name: itp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.0.1], nodeName: a}, {addresses: [198.18.0.2], nodeName: b}]
";
    let (s, e) = objs(yaml);
    let (d, _) = build(
        &s,
        &e,
        &Config {
            node_name: "a".into(),
            ..Config::default()
        },
        &mut Cache::default(),
    );
    assert_eq!(
        backends(&d, &fe("198.19.0.42:80", Proto::Tcp)),
        ["198.18.0.1:8080"],
        "ClusterIP: local only"
    );
    assert_eq!(
        backends(&d, &fe("198.51.100.9:80", Proto::Tcp)).len(),
        2,
        "externalIP: all endpoints"
    );
}

#[test]
fn external_scope_applies_external_traffic_policy_and_source_ranges() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.50
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: [198.51.100.0/24, 198.18.7.9/16, 2001:db8:9::/48, bogus]
  ports: [{port: 80, nodePort: 30090}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.20}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: ns, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.1.10], nodeName: me}, {addresses: [198.18.2.10], nodeName: other}]
";
    let (s, e) = objs(yaml);
    let cfg = Config {
        node_name: "me".into(),
        node_addresses: vec!["198.18.0.1".parse().unwrap()],
        ..Config::default()
    };
    let (d, errors) = build(&s, &e, &cfg, &mut Cache::default());
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        msgs,
        vec![
            "Service ns/lb: spec.loadBalancerSourceRanges[3]: invalid CIDR \"bogus\": missing /prefix; ignored"
        ]
    );
    let ext = |a: &str| {
        d.frontends
            .get(&Frontend {
                scope: Scope::External,
                ..fe(a, Proto::Tcp)
            })
            .cloned()
            .expect(a)
    };
    let here: SocketAddr = "198.18.1.10:8080".parse().unwrap();
    let there: SocketAddr = "198.18.2.10:8080".parse().unwrap();
    // From outside: Local policy, only this node's endpoint, marked local.
    let lb = ext("203.0.113.20:80");
    assert_eq!(lb.backends, BTreeSet::from([here]));
    assert_eq!(lb.local, BTreeSet::from([here]));
    // Source ranges: this family's, host bits cleared; the IPv6 one is not for an IPv4 LB IP.
    let ranges: Vec<String> = lb.source_ranges.iter().map(ToString::to_string).collect();
    assert_eq!(ranges, vec!["198.18.0.0/16", "198.51.100.0/24"]);
    // NodePort from outside: Local policy too, but no source ranges (LB IPs only).
    let np = ext("198.18.0.1:30090");
    assert_eq!(np.backends, BTreeSet::from([here]));
    assert!(np.source_ranges.is_empty());
    // From inside the node: every endpoint, locality still recorded.
    let inner = &d.frontends[&fe("198.18.0.1:30090", Proto::Tcp)];
    assert_eq!(inner.backends, BTreeSet::from([here, there]));
    assert_eq!(inner.local, BTreeSet::from([here]));
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: np, namespace: ns}
spec: {type: NodePort, clusterIP: 198.19.0.51, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30091}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: ns, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.2.10], nodeName: other}]
";
    let (s, e) = objs(yaml);
    let cfg = Config {
        node_name: "me".into(),
        node_addresses: vec!["198.18.0.1".parse().unwrap()],
        ..Config::default()
    };
    let (d, _) = build(&s, &e, &cfg, &mut Cache::default());
    let st = &d.frontends[&Frontend {
        scope: Scope::External,
        ..fe("198.18.0.1:30091", Proto::Tcp)
    }];
    assert!(st.backends.is_empty());
    assert!(st.no_local, "endpoints only elsewhere: DROP, not REJECT");
    // Cluster-wide from inside the node.
    assert_eq!(
        d.frontends[&fe("198.18.0.1:30091", Proto::Tcp)]
            .backends
            .len(),
        1
    );
}

#[test]
fn cidr_parsing_is_strict() {
    assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    assert_eq!(Cidr::parse(" 0.0.0.0/0 ").unwrap().to_string(), "0.0.0.0/0");
    assert_eq!(
        Cidr::parse("2001:db8::1/128").unwrap().to_string(),
        "2001:db8::1/128"
    );
    assert!(Cidr::parse("10.0.0.0/33").is_err());
    assert!(Cidr::parse("010.0.0.0/8").is_err());
    assert!(Cidr::parse("10.0.0.0").is_err());
}

/// Above 1,024 Services the resolution runs on several threads: same result, same order
/// (the first of two same-named Services wins, the second is reported).
#[test]
fn many_services_resolve_in_parallel_in_order() {
    use std::fmt::Write as _;
    let mut yaml = String::new();
    for i in 0..3000 {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec: {{clusterIP: 198.19.{}.{}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.0.{}]}}]\n",
            i / 250,
            1 + i % 250,
            1 + i % 200
        );
    }
    yaml.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: s7, namespace: ns}\nspec: {clusterIP: 198.19.250.1, ports: [{port: 80}]}\n");
    let (s, e) = objs(&yaml);
    let (d, errors) = build(&s, &e, &Config::default(), &mut Cache::default());
    assert_eq!(d.frontends.len(), 3000);
    assert!(d.frontends.values().all(|st| st.backends.len() == 1));
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        msgs,
        vec!["Service ns/s7: defined more than once; the first definition is used"]
    );
    assert!(d.frontends.contains_key(&fe("198.19.0.8:80", Proto::Tcp)));
    assert!(!d.frontends.contains_key(&fe("198.19.250.1:80", Proto::Tcp)));
    // The cache gives the same result on the next build.
    let mut cache = Cache::default();
    let first = build(&s, &e, &Config::default(), &mut cache);
    assert_eq!(build(&s, &e, &Config::default(), &mut cache), first);
}

/// Random edits of a small cluster — Services added, changed (addresses that collide, ages,
/// NodePorts, health-check ports), removed, duplicated, moved; slices added, changed, removed,
/// unlabelled, nameless — and after each sync: the kept state equals a build from scratch,
/// the problems are the same, and the frontends reported changed are exactly those whose
/// desired state changed (none of a Service that did not change).
mod incremental {
    use super::*;
    use proptest::prelude::*;

    fn one<T: Clone>(yaml: &str, pick: impl Fn(&crate::Objects) -> Vec<Arc<T>>) -> Arc<T> {
        let mut errors = Vec::new();
        let o = crate::manifest::parse_str(std::path::Path::new("p.yaml"), yaml, &mut errors)
            .expect("yaml");
        pick(&o)[0].clone()
    }

    fn service(i: u8, v: u8) -> Arc<Service> {
        let age = v % 3;
        let spec = match v % 4 {
            0 => format!(
                "{{clusterIP: 198.19.0.{}, ports: [{{name: http, port: 80}}]}}",
                i % 3
            ),
            1 => format!(
                "{{type: NodePort, clusterIP: 198.19.1.{i}, ports: [{{name: http, port: 80, nodePort: {}}}]}}",
                30000 + u16::from(i % 2)
            ),
            2 => format!(
                "{{type: LoadBalancer, clusterIP: 198.19.2.{i}, externalTrafficPolicy: Local, healthCheckNodePort: {}, ports: [{{name: http, port: 80, nodePort: {}}}]}}",
                32000 + u16::from(i % 2),
                31000 + u16::from(i)
            ),
            _ => format!(
                "{{clusterIPs: [198.19.3.{i}, '2001:db8::{i}'], ipFamilies: [IPv4, IPv6], ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: http, port: 80}}]}}"
            ),
        };
        let y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n, creationTimestamp: '2024-01-01T00:00:0{age}Z'}}\nspec: {spec}\n"
        );
        one(&y, |o| o.services.clone())
    }

    fn slice(name: u8, svc: u8, eps: &[(u8, bool)], labelled: bool) -> Arc<EndpointSlice> {
        let labels = if labelled {
            format!("labels: {{kubernetes.io/service-name: s{svc}}}")
        } else {
            "labels: {}".to_owned()
        };
        let eps: Vec<String> = eps
            .iter()
            .map(|(a, ready)| {
                format!(
                    "{{addresses: [198.18.0.{a}], conditions: {{ready: {ready}}}, nodeName: node-{}}}",
                    a % 2
                )
            })
            .collect();
        let y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{name}, namespace: n, {labels}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 53, protocol: UDP}}]\nendpoints: [{}]\n",
            eps.join(", ")
        );
        one(&y, |o| o.slices.clone())
    }

    #[derive(Debug, Clone)]
    enum Edit {
        AddService(u8, u8),
        RemoveService(usize),
        ReplaceService(usize, u8),
        AddSlice(u8, u8, Vec<(u8, bool)>, bool),
        RemoveSlice(usize),
        SwapServices(usize, usize),
        Repeat(usize),
        Nameless,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (0u8..5, 0u8..8).prop_map(|(i, v)| Edit::AddService(i, v)),
            (0usize..16).prop_map(Edit::RemoveService),
            (0usize..16, 0u8..8).prop_map(|(i, v)| Edit::ReplaceService(i, v)),
            (
                0u8..6,
                0u8..5,
                proptest::collection::vec((0u8..6, any::<bool>()), 0..4),
                proptest::bool::weighted(0.9)
            )
                .prop_map(|(n, s, e, l)| Edit::AddSlice(n, s, e, l)),
            (0usize..16).prop_map(Edit::RemoveSlice),
            (0usize..16, 0usize..16).prop_map(|(a, b)| Edit::SwapServices(a, b)),
            (0usize..16).prop_map(Edit::Repeat),
            Just(Edit::Nameless),
        ]
    }

    fn apply(e: Edit, s: &mut Vec<Arc<Service>>, l: &mut Vec<Arc<EndpointSlice>>) {
        match e {
            Edit::AddService(i, v) => s.push(service(i, v)),
            Edit::RemoveService(k) if !s.is_empty() => {
                let k = k % s.len();
                s.remove(k);
            }
            Edit::ReplaceService(k, v) if !s.is_empty() => {
                let k = k % s.len();
                let i: u8 = s[k]
                    .metadata
                    .name
                    .as_deref()
                    .map_or(0, |n| n[1..].parse().unwrap_or(0));
                s[k] = service(i, v);
            }
            Edit::AddSlice(n, svc, eps, labelled) => l.push(slice(n, svc, &eps, labelled)),
            Edit::RemoveSlice(k) if !l.is_empty() => {
                let k = k % l.len();
                l.remove(k);
            }
            Edit::SwapServices(a, b) if !s.is_empty() => {
                let n = s.len();
                s.swap(a % n, b % n);
            }
            Edit::Repeat(k) if !s.is_empty() => {
                let o = s[k % s.len()].clone();
                s.push(o);
            }
            Edit::Nameless => {
                let mut o = (*service(9, 0)).clone();
                o.metadata.name = None;
                s.insert(0, Arc::new(o));
            }
            _ => {}
        }
    }

    fn sorted(errors: &[Error]) -> Vec<String> {
        let mut v: Vec<String> = errors.iter().map(ToString::to_string).collect();
        v.sort();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn an_updated_model_equals_one_built_from_scratch(
            edits in proptest::collection::vec(edit(), 1..24)
        ) {
            let cfg = Config {
                node_name: "node-0".into(),
                maglev: 251,
                ..Config::default()
            };
            let (mut s, mut l) = (Vec::new(), Vec::new());
            let mut cache = Cache::default();
            let _ = update(&s, &l, &cfg, &mut cache);
            for e in edits {
                let before = cache.desired().clone();
                apply(e, &mut s, &mut l);
                let (changed, errors) = update(&s, &l, &cfg, &mut cache);
                let (fresh, fresh_errors) = build(&s, &l, &cfg, &mut Cache::default());
                prop_assert_eq!(cache.desired(), &fresh);
                prop_assert_eq!(sorted(&errors), sorted(&fresh_errors));
                let changed = changed.expect("the same Config: a scoped change");
                prop_assert_eq!(changed, crate::sync::changed(&before, &fresh));
                let maglev: std::collections::BTreeMap<Frontend, u32> = fresh
                    .frontends
                    .iter()
                    .filter(|(_, st)| st.maglev != 0 && !st.backends.is_empty())
                    .map(|(f, st)| (*f, st.maglev))
                    .collect();
                prop_assert_eq!(cache.maglev(), &maglev);
            }
        }
    }
}

#[test]
fn addr_set_is_sorted_deduplicated_and_one_form_per_set() {
    let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    let v4 = AddrSet::from([a("198.18.0.2:80"), a("198.18.0.1:80"), a("198.18.0.2:80")]);
    assert_eq!(
        v4.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        ["198.18.0.1:80", "198.18.0.2:80"]
    );
    assert_eq!(v4, AddrSet::from([a("198.18.0.1:80"), a("198.18.0.2:80")]));
    assert!(v4.contains(&a("198.18.0.2:80")));
    assert!(!v4.contains(&a("[2001:db8::1]:80")));
    assert_eq!(v4.first(), Some(a("198.18.0.1:80")));
    let mixed = AddrSet::from([a("[2001:db8::1]:80"), a("198.18.0.1:80")]);
    assert_eq!(mixed.len(), 2);
    assert_eq!(mixed.first(), Some(a("198.18.0.1:80")), "IPv4 sorts first");
    assert!(mixed.contains(&a("[2001:db8::1]:80")));
    assert_eq!(
        AddrSet::default(),
        std::iter::empty::<std::net::SocketAddr>().collect::<AddrSet>()
    );
    assert!(AddrSet::default().is_empty());
}
