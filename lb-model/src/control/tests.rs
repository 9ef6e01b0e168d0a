use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::manifest::parse_str;
use crate::model::Cidr;

fn objects(yaml: &str) -> Objects {
    let mut errors = Vec::new();
    let o = parse_str(Path::new("t.yaml"), yaml, &mut errors).expect("valid YAML");
    assert!(errors.is_empty(), "{errors:?}");
    o
}

fn ranges() -> Ranges {
    Ranges {
        service_cidrs: vec![
            Cidr::parse("198.19.0.0/24").unwrap(),
            Cidr::parse("2001:db8:f::/112").unwrap(),
        ],
        check_cluster_ips: true,
        node_ports: (30_000, 32_767),
        lb_pools: vec![IpRange::parse("198.19.200.0/29").unwrap()],
    }
}

fn run(cp: &mut ControlPlane, o: &Objects) -> (Objects, Vec<String>) {
    let (out, errors, _) = cp.run(o, "node-1");
    (out, errors.iter().map(ToString::to_string).collect())
}

fn svc<'a>(o: &'a Objects, name: &str) -> &'a Service {
    o.services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("Service {name}"))
}

/// (address, ready, serving, terminating, ports "name:port/proto") of every generated slice.
fn endpoints(o: &Objects, svc: &str) -> Vec<(String, bool, bool, bool, String)> {
    let mut v = Vec::new();
    for s in o.slices.iter().filter(|s| {
        s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::model::LABEL_SERVICE_NAME))
            .is_some_and(|n| n == svc)
    }) {
        let ports: Vec<String> = s
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}:{}/{}",
                    p.name.as_deref().unwrap_or(""),
                    p.port.unwrap_or(0),
                    p.protocol.as_deref().unwrap_or("")
                )
            })
            .collect();
        for e in &s.endpoints {
            let c = e.conditions.unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            v.push((
                e.addresses[0].to_string(),
                ready,
                c.serving.unwrap_or(ready),
                c.terminating.unwrap_or(false),
                ports.join(","),
            ));
        }
    }
    v.sort();
    v
}

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9100}
";

fn pod(
    name: &str,
    labels: &str,
    ip: &str,
    extra_status: &str,
    extra_meta: &str,
    ports: &str,
) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{{labels}}}{extra_meta}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c, ports: [{ports}]}}]}}\n\
         status: {{podIPs: [{ip}]{extra_status}}}\n"
    )
}

#[test]
fn selector_pods_become_slices_with_upstream_conditions_and_ports() {
    let http = "{name: http, containerPort: 8080}";
    let mut y = WEB.to_owned();
    y += &pod("a", "app: web", "{ip: 198.18.0.11}", "", "", http);
    // Not ready by its condition.
    y += &pod(
        "b",
        "app: web",
        "{ip: 198.18.0.12}",
        ", conditions: [{type: Ready, status: 'False'}]",
        "",
        http,
    );
    // Terminating (deletionTimestamp), still Ready.
    y += &pod(
        "c",
        "app: web",
        "{ip: 198.18.0.13}",
        ", conditions: [{type: Ready, status: 'True'}]",
        ", deletionTimestamp: '2026-01-01T00:00:00Z'",
        http,
    );
    // Lacks the named port: only in the metrics port's slice.
    y += &pod(
        "d",
        "app: web",
        "{ip: 198.18.0.14}",
        "",
        "",
        "{name: other, containerPort: 1}",
    );
    // Finished, no IP, other labels, other namespace: left out.
    y += &pod(
        "e",
        "app: web",
        "{ip: 198.18.0.15}",
        ", phase: Succeeded",
        "",
        http,
    );
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: f, namespace: demo, labels: {app: web}}\nspec: {containers: []}\n";
    y += &pod("g", "app: db", "{ip: 198.18.0.17}", "", "", http);
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: h, namespace: other, labels: {app: web}}\nspec: {containers: []}\nstatus: {podIP: 198.18.0.18}\n";
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &objects(&y));
    assert!(errors.is_empty(), "{errors:?}");
    let both = "http:8080/TCP,metrics:9100/TCP";
    assert_eq!(
        endpoints(&out, "web"),
        vec![
            ("198.18.0.11".into(), true, true, false, both.into()),
            ("198.18.0.12".into(), false, false, false, both.into()),
            ("198.18.0.13".into(), false, true, true, both.into()),
            (
                "198.18.0.14".into(),
                true,
                true,
                false,
                "metrics:9100/TCP".into()
            ),
        ]
    );
    let s = &out.slices[0];
    let l = s.metadata.labels.as_ref().unwrap();
    assert_eq!(
        l[endpointslice::LABEL_MANAGED_BY],
        endpointslice::MANAGED_BY_CONTROLLER
    );
    assert_eq!(s.endpoints[0].node_name.as_deref(), Some("node-1"));
    let r = s.endpoints[0].target_ref.as_ref().unwrap();
    assert_eq!(
        (r.kind.as_deref(), r.name.as_deref()),
        (Some("Pod"), Some("a"))
    );
}

#[test]
fn publish_not_ready_addresses_makes_every_pod_ready() {
    let y = WEB.replace("selector:", "publishNotReadyAddresses: true\n  selector:")
        + &pod(
            "b",
            "app: web",
            "{ip: 198.18.0.12}",
            ", conditions: [{type: Ready, status: 'False'}]",
            "",
            "",
        );
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, _) = run(&mut cp, &objects(&y));
    let eps = endpoints(&out, "web");
    assert_eq!(eps.len(), 1);
    assert!(eps[0].1, "ready: {eps:?}");
}

#[test]
fn dual_stack_pods_give_a_slice_per_family_and_big_services_are_chunked() {
    let mut y = WEB.replace("selector:", "ipFamilyPolicy: PreferDualStack\n  selector:");
    for i in 0..150 {
        y += &pod(
            &format!("p{i:03}"),
            "app: web",
            &format!(
                "{{ip: 198.18.{}.{}}}, {{ip: '2001:db8::{i:x}'}}",
                1 + i / 200,
                1 + i % 200
            ),
            "",
            "",
            "{name: http, containerPort: 8080}",
        );
    }
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &objects(&y));
    assert!(errors.is_empty(), "{errors:?}");
    let sizes: Vec<(String, usize)> = out
        .slices
        .iter()
        .map(|s| (s.address_type.to_string(), s.endpoints.len()))
        .collect();
    assert_eq!(
        sizes,
        vec![
            ("IPv4".into(), 100),
            ("IPv4".into(), 50),
            ("IPv6".into(), 100),
            ("IPv6".into(), 50)
        ]
    );
    let names: std::collections::BTreeSet<_> =
        out.slices.iter().map(|s| s.metadata.name.clone()).collect();
    assert_eq!(names.len(), 4, "distinct names");
    assert_eq!(
        svc(&out, "web")
            .spec
            .as_ref()
            .unwrap()
            .cluster_ips
            .as_ref()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn hostname_subdomain_and_zone() {
    let y = WEB.to_owned()
        + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-1, labels: {topology.kubernetes.io/zone: z1}}\n"
        + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo, labels: {app: web}}\n\
           spec: {hostname: a0, subdomain: web, nodeName: node-1, containers: []}\nstatus: {podIP: 198.18.0.11}\n"
        + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: demo, labels: {app: web}}\n\
           spec: {hostname: b0, subdomain: other, containers: []}\nstatus: {podIP: 198.18.0.12}\n";
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, _) = run(&mut cp, &objects(&y));
    let eps = &out.slices[0].endpoints;
    assert_eq!(eps[0].hostname.as_deref(), Some("a0"));
    assert_eq!(eps[0].zone.as_deref(), Some("z1"));
    assert_eq!(eps[1].hostname, None, "subdomain names another Service");
    assert_eq!(
        out.node.as_ref().and_then(|n| n.metadata.name.as_deref()),
        Some("node-1")
    );
}

#[test]
fn bad_pod_ip_and_empty_selector_are_reported() {
    let y = WEB.to_owned()
        + &pod("a", "app: web", "{ip: 010.18.0.1}", "", "", "")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: lonely, namespace: demo}\nspec: {selector: {app: nobody}, ports: [{port: 80}]}\n";
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (_, errors) = run(&mut cp, &objects(&y));
    assert!(
        errors
            .iter()
            .any(|e| e
                .contains("Pod demo/a: status.podIPs[0].ip: invalid IP address \"010.18.0.1\"")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("Service demo/lonely: spec.selector: app=nobody matches no Pod")),
        "{errors:?}"
    );
}

#[test]
fn unchanged_inputs_give_the_same_objects() {
    let y = WEB.to_owned() + &pod("a", "app: web", "{ip: 198.18.0.11}", "", "", "");
    let o = objects(&y);
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (a, _, changed1) = cp.run(&o, "node-1");
    let (b, _, changed2) = cp.run(&o, "node-1");
    assert!(changed1 && !changed2);
    assert!(Arc::ptr_eq(&a.services[0], &b.services[0]));
    assert!(Arc::ptr_eq(&a.slices[0], &b.slices[0]));
}

const DB: &str = "
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec: {ports: [{name: pg, port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: demo}
subsets:
- addresses: [{ip: 198.18.5.1, nodeName: n2}, {ip: 198.18.5.2}, {ip: '2001:db8::5'}]
  notReadyAddresses: [{ip: 198.18.5.3}, {ip: 198.18.5.300}]
  ports: [{name: pg, port: 5432}]
";

#[test]
fn endpoints_of_selectorless_services_are_mirrored() {
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &objects(DB));
    assert_eq!(
        errors,
        vec![
            "Endpoints demo/db: subsets[0].notReadyAddresses[1].ip: invalid IP address \"198.18.5.300\": not an IP literal; skipped"
                .to_owned()
        ]
    );
    let eps = endpoints(&out, "db");
    let p = "pg:5432/TCP".to_owned();
    assert_eq!(
        eps,
        vec![
            ("198.18.5.1".into(), true, true, false, p.clone()),
            ("198.18.5.2".into(), true, true, false, p.clone()),
            ("198.18.5.3".into(), false, false, false, p.clone()),
            ("2001:db8::5".into(), true, true, false, p),
        ]
    );
    assert!(
        out.slices
            .iter()
            .all(
                |s| s.metadata.labels.as_ref().unwrap()[endpointslice::LABEL_MANAGED_BY]
                    == mirror::MANAGED_BY_MIRRORING
            )
    );
    // skip-mirror, and a Service with a selector: nothing mirrored.
    let skip = DB.replace(
        "kind: Endpoints\nmetadata: {name: db, namespace: demo}",
        "kind: Endpoints\nmetadata: {name: db, namespace: demo, labels: {endpointslice.kubernetes.io/skip-mirror: 'true'}}",
    );
    let (out, _) = run(&mut cp, &objects(&skip));
    assert!(out.slices.is_empty());
    let sel = DB.replace("spec: {ports:", "spec: {selector: {app: db}, ports:");
    let (out, _) = run(&mut cp, &objects(&sel));
    assert!(out.slices.is_empty());
}

fn svc_yaml(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"
    )
}

fn cluster_ips(o: &Objects, name: &str) -> Vec<IpAddr> {
    svc(o, name)
        .spec
        .as_ref()
        .unwrap()
        .cluster_ips
        .iter()
        .flatten()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn node_ports(o: &Objects, name: &str) -> Vec<i32> {
    svc(o, name)
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port.unwrap_or(0))
        .collect()
}

fn lb_ips(o: &Objects, name: &str) -> Vec<String> {
    svc(o, name)
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| Some(i.ip.as_deref()?.to_owned()))
        .collect()
}

#[test]
fn cluster_ips_come_from_the_upper_band_and_stay_across_restarts() {
    let mut y = String::new();
    for i in 0..20 {
        y += &svc_yaml(&format!("s{i}"), "{ports: [{port: 80}]}");
    }
    let o = objects(&y);
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (a, errors) = run(&mut cp, &o);
    assert!(errors.is_empty(), "{errors:?}");
    let mut all = std::collections::BTreeSet::new();
    for i in 0..20 {
        let ips = cluster_ips(&a, &format!("s{i}"));
        let [IpAddr::V4(ip)] = ips.as_slice() else {
            panic!("one IPv4 ClusterIP (SingleStack, primary family): {ips:?}")
        };
        let last = ip.octets()[3];
        assert!(
            (16..255).contains(&last),
            "dynamic band, not .0 / .255: {ip}"
        );
        assert!(all.insert(*ip), "unique");
    }
    // A restart from the saved state, with the files in another order and a Service added
    // that sorts first: nothing moves.
    let dir = crate::scratch::Scratch::new("lb-state");
    let file = dir.join("state.json");
    save_state(&file, cp.state()).expect("save");
    let mut y2 = svc_yaml("a-new", "{ports: [{port: 80}]}");
    for i in (0..20).rev() {
        y2 += &svc_yaml(&format!("s{i}"), "{ports: [{port: 80}]}");
    }
    let mut cp2 = ControlPlane::new(ranges(), load_state(&file).expect("load"));
    let (b, _) = run(&mut cp2, &objects(&y2));
    for i in 0..20 {
        let n = format!("s{i}");
        assert_eq!(cluster_ips(&a, &n), cluster_ips(&b, &n), "{n}");
    }
    // Deleting a Service releases its address.
    let (_, _, changed) = cp2.run(&objects(&svc_yaml("s0", "{ports: [{port: 80}]}")), "n");
    assert!(changed);
    assert_eq!(cp2.state().services.len(), 1);
}

#[test]
fn requested_cluster_ips_get_upstream_errors() {
    let y = svc_yaml("old", "{clusterIP: 198.19.0.10, ports: [{port: 80}]}")
        + &svc_yaml("taken", "{clusterIP: 198.19.0.10, ports: [{port: 80}]}")
        + &svc_yaml("outside", "{clusterIP: 198.18.9.9, ports: [{port: 80}]}")
        + &svc_yaml("octal", "{clusterIP: 198.19.0.011, ports: [{port: 80}]}");
    let mut o = objects(&y);
    // `old` is the oldest.
    for (i, s) in o.services.iter_mut().enumerate() {
        Arc::make_mut(s).metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap(),
            ));
    }
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &o);
    assert_eq!(
        cluster_ips(&out, "old"),
        vec!["198.19.0.10".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(out.services.len(), 1, "the others are refused");
    let want = [
        "Service demo/taken: spec.clusterIP[0]: Invalid value: 198.19.0.10: failed to allocate IP 198.19.0.10: provided IP is already allocated (to Service demo/old)",
        "Service demo/outside: spec.clusterIP[0]: Invalid value: 198.18.9.9: failed to allocate IP 198.18.9.9: the provided IP (198.18.9.9) is not in the valid range. The range of valid IPs is 198.19.0.0/24",
        "Service demo/octal: spec.clusterIP[0]: invalid IP address \"198.19.0.011\"",
    ];
    for w in want {
        assert!(errors.iter().any(|e| e.starts_with(w)), "{w}\n{errors:#?}");
    }
    // Without --service-cidr, a manifest's own ClusterIPs are served as they are.
    let mut cp = ControlPlane::new(
        Ranges {
            check_cluster_ips: false,
            ..ranges()
        },
        State::default(),
    );
    let (out, _) = run(&mut cp, &o);
    assert_eq!(
        cluster_ips(&out, "outside"),
        vec!["198.18.9.9".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn node_ports_are_allocated_shared_by_port_number_and_checked() {
    let y = svc_yaml(
        "dns",
        "{type: NodePort, ports: [{name: a, port: 53, protocol: UDP}, {name: b, port: 53, protocol: TCP}, {name: c, port: 9153}]}",
    ) + &svc_yaml("fixed", "{type: NodePort, ports: [{port: 80, nodePort: 30080}]}")
        // Same age (none): namespace/name decides, and `fixed` sorts first.
        + &svc_yaml("z-clash", "{type: NodePort, ports: [{port: 80, nodePort: 30080}]}")
        + &svc_yaml("far", "{type: NodePort, ports: [{port: 80, nodePort: 8080}]}")
        + &svc_yaml("nolb", "{type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}")
        + &svc_yaml("local", "{type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}");
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &objects(&y));
    let dns = node_ports(&out, "dns");
    assert_eq!(dns[0], dns[1], "53/UDP and 53/TCP share one nodePort");
    assert_ne!(dns[0], dns[2]);
    // Dynamic band: above the lowest 85 ports (2768 / 32).
    assert!(dns.iter().all(|p| (30_085..=32_767).contains(p)), "{dns:?}");
    assert_eq!(node_ports(&out, "fixed"), vec![30_080]);
    assert_eq!(node_ports(&out, "nolb"), vec![0]);
    let local = svc(&out, "local").spec.as_ref().unwrap();
    assert!(
        local
            .more()
            .health_check_node_port
            .is_some_and(|p| p >= 30_000)
    );
    assert!(errors.iter().any(|e| e.starts_with(
        "Service demo/far: spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid range. The range of valid ports is 30000-32767"
    )), "{errors:#?}");
    assert!(errors.iter().any(|e| e.contains("Service demo/z-clash: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated")), "{errors:#?}");
}

#[test]
fn load_balancer_ips_from_the_pool_or_pending() {
    let y = svc_yaml(
        "asks",
        "{type: LoadBalancer, loadBalancerIP: 198.19.200.3, ports: [{port: 80}]}",
    ) + &svc_yaml("any", "{type: LoadBalancer, ports: [{port: 80}]}")
        + &svc_yaml(
            "outside",
            "{type: LoadBalancer, loadBalancerIP: 198.19.9.9, ports: [{port: 80}]}",
        );
    let o = objects(&y);
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &o);
    assert_eq!(lb_ips(&out, "asks"), vec!["198.19.200.3"]);
    let any = lb_ips(&out, "any");
    assert_eq!(any.len(), 1);
    assert!(
        IpRange::parse("198.19.200.0/29")
            .unwrap()
            .contains(any[0].parse().unwrap())
    );
    assert!(lb_ips(&out, "outside").is_empty());
    assert!(errors.iter().any(|e| e.starts_with("Service demo/outside: spec.loadBalancerIP: Invalid value: 198.19.9.9: not in any --lb-ip-pool")), "{errors:#?}");
    // No pool: pending, reported; ClusterIP and NodePort still allocated.
    let mut cp = ControlPlane::new(
        Ranges {
            lb_pools: Vec::new(),
            ..ranges()
        },
        State::default(),
    );
    let (out, errors) = run(&mut cp, &o);
    assert!(lb_ips(&out, "any").is_empty());
    assert_eq!(cluster_ips(&out, "any").len(), 1);
    assert!(node_ports(&out, "any")[0] >= 30_000);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("Service demo/any: LoadBalancer ingress pending")),
        "{errors:#?}"
    );
    // An exhausted pool (8 addresses).
    let mut y = String::new();
    for i in 0..9 {
        y += &svc_yaml(
            &format!("lb{i}"),
            "{type: LoadBalancer, ports: [{port: 80}]}",
        );
    }
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &objects(&y));
    let served = (0..9)
        .filter(|i| !lb_ips(&out, &format!("lb{i}")).is_empty())
        .count();
    assert_eq!(served, 8);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("no free IPv4 address in --lb-ip-pool")),
        "{errors:#?}"
    );
}

#[test]
fn ranges_parse() {
    let r = IpRange::parse("198.19.1.10-198.19.1.20").unwrap();
    assert_eq!(r.size(), 11);
    assert!(IpRange::parse("198.19.1.20-198.19.1.10").is_err());
    assert!(IpRange::parse("198.19.1.1-2001:db8::1").is_err());
    let c = IpRange::parse("2001:db8::/64").unwrap();
    assert_eq!(c.size(), 1 << 20, "capped like upstream's bitmap");
}

#[test]
fn a_newcomer_requesting_an_incumbents_allocation_is_refused() {
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (a, _) = run(
        &mut cp,
        &objects(&svc_yaml("web", "{type: NodePort, ports: [{port: 80}]}")),
    );
    let ip = cluster_ips(&a, "web")[0];
    let np = node_ports(&a, "web")[0];
    // Younger (its name sorts first, but it has a later creationTimestamp than web's record,
    // which was made first): explicit requests for web's values.
    let y = svc_yaml("web", "{type: NodePort, ports: [{port: 80}]}")
        + &svc_yaml(
            "aaa",
            &format!("{{clusterIP: {ip}, type: NodePort, ports: [{{port: 80, nodePort: {np}}}]}}"),
        );
    let mut o = objects(&y);
    for (i, s) in o.services.iter_mut().enumerate() {
        Arc::make_mut(s).metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap(),
            ));
    }
    let (b, errors) = run(&mut cp, &o);
    assert_eq!(
        cluster_ips(&b, "web"),
        vec![ip],
        "the incumbent keeps its ClusterIP"
    );
    assert_eq!(node_ports(&b, "web"), vec![np], "and its nodePort");
    assert!(
        b.services
            .iter()
            .all(|s| s.metadata.name.as_deref() != Some("aaa"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("Service demo/aaa: spec.clusterIP[0]")
                && e.contains("provided IP is already allocated (to Service demo/web)")),
        "{errors:#?}"
    );
}

#[test]
fn load_balancer_ips_by_annotation_and_single_stack_checks() {
    let y = svc_yaml(
        "ann",
        "{type: LoadBalancer, ports: [{port: 80}]}",
    )
    .replace(
        "metadata: {name: ann, namespace: demo}",
        "metadata: {name: ann, namespace: demo, annotations: {metallb.io/loadBalancerIPs: '198.19.200.5'}}",
    ) + &svc_yaml(
        "two",
        "{ipFamilyPolicy: SingleStack, clusterIPs: [198.19.0.50, '2001:db8:f::50'], ports: [{port: 80}]}",
    );
    let mut cp = ControlPlane::new(ranges(), State::default());
    let (out, errors) = run(&mut cp, &objects(&y));
    assert_eq!(lb_ips(&out, "ann"), vec!["198.19.200.5"]);
    assert!(
        errors.iter().any(|e| e.starts_with(
            "Service demo/two: spec.ipFamilyPolicy: Invalid value: \"SingleStack\": 2 families"
        )),
        "{errors:#?}"
    );
    assert!(
        out.services
            .iter()
            .all(|s| s.metadata.name.as_deref() != Some("two"))
    );
}
