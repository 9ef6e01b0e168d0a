//! The conformance table: question → rcode and answer set, for every record kind of the
//! specification, on one set of objects.
use std::fmt::Write as _;
use std::path::Path;

use super::*;

const OBJECTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIPs: [198.19.0.10, '2001:db8:f::10']
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}, {port: 9100}]
---
apiVersion: v1
kind: Service
metadata: {name: v4only, namespace: demo}
spec: {clusterIP: 198.19.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec: {clusterIP: None, ports: [{name: pg, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: demo, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
- {addresses: [198.18.0.21], hostname: db-0}
- {addresses: [198.18.0.22]}
- {addresses: [198.18.0.23], conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: db.example.org}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: demo}
spec: {type: ExternalName, externalName: web.demo.svc.cluster.local.}
";

fn index() -> Index {
    let mut errors = Vec::new();
    let o = crate::manifest::parse_str(Path::new("t.yaml"), OBJECTS, &mut errors).expect("YAML");
    assert!(errors.is_empty(), "{errors:?}");
    Index::build(&o, &Config::default(), 7)
}

/// (rcode, answers as text, additional as text, SOA present).
fn ask(ix: &Index, name: &str, qt: u16) -> Shown {
    let show = |r: &Rr| {
        let owner = r.owner.as_deref().unwrap_or("@");
        let d = match &r.data {
            RData::A(a) => format!("A {a}"),
            RData::Aaaa(a) => format!("AAAA {a}"),
            RData::Cname(n) => format!("CNAME {n}"),
            RData::Ptr(n) => format!("PTR {n}"),
            RData::Srv {
                priority,
                weight,
                port,
                target,
            } => format!("SRV {priority} {weight} {port} {target}"),
            RData::Txt(t) => format!("TXT {t}"),
            RData::Soa { serial } => format!("SOA {serial}"),
        };
        format!("{owner} {d}")
    };
    match ix.lookup(name, qt) {
        Lookup::Answer {
            rcode,
            answers,
            additional,
            soa,
        } => {
            let mut a: Vec<String> = answers.iter().map(show).collect();
            a.sort();
            let mut x: Vec<String> = additional.iter().map(show).collect();
            x.sort();
            (rcode, a, x, soa.is_some())
        }
        Lookup::Forward => (255, vec!["forward".into()], Vec::new(), false),
        Lookup::Chase { answers, target } => {
            let mut a: Vec<String> = answers.iter().map(show).collect();
            a.push(format!("chase {target}"));
            (rcode::NOERROR, a, Vec::new(), false)
        }
    }
}

fn v(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

/// (rcode, answers, additional, SOA present) as [`ask`] shows them.
type Shown = (u8, Vec<String>, Vec<String>, bool);

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "the conformance table, one row per item"
)]
fn the_specification_item_by_item() {
    let ix = index();
    let z = "cluster.local";
    let nx = (rcode::NXDOMAIN, Vec::new(), Vec::new(), true);
    let nodata = (rcode::NOERROR, Vec::new(), Vec::new(), true);
    let cases: Vec<(String, u16, Shown)> = vec![
        // 2.2 schema version.
        (
            format!("dns-version.{z}"),
            qtype::TXT,
            (0, v(&["@ TXT 1.1.0"]), vec![], false),
        ),
        // 2.3.1 A / AAAA of ClusterIPs; the missing family is NODATA.
        (
            format!("web.demo.svc.{z}"),
            qtype::A,
            (0, v(&["@ A 198.19.0.10"]), vec![], false),
        ),
        (
            format!("web.demo.svc.{z}"),
            qtype::AAAA,
            (0, v(&["@ AAAA 2001:db8:f::10"]), vec![], false),
        ),
        (format!("v4only.demo.svc.{z}"), qtype::AAAA, nodata.clone()),
        (format!("web.demo.svc.{z}"), qtype::TXT, nodata.clone()),
        // 2.3.2 SRV per named port (not the unnamed one), the Service's addresses additional.
        (
            format!("_http._tcp.web.demo.svc.{z}"),
            qtype::SRV,
            (
                0,
                v(&["@ SRV 0 100 80 web.demo.svc.cluster.local"]),
                v(&[
                    "web.demo.svc.cluster.local A 198.19.0.10",
                    "web.demo.svc.cluster.local AAAA 2001:db8:f::10",
                ]),
                false,
            ),
        ),
        (
            format!("_dns._udp.web.demo.svc.{z}"),
            qtype::SRV,
            (
                0,
                v(&["@ SRV 0 100 53 web.demo.svc.cluster.local"]),
                v(&[
                    "web.demo.svc.cluster.local A 198.19.0.10",
                    "web.demo.svc.cluster.local AAAA 2001:db8:f::10",
                ]),
                false,
            ),
        ),
        (
            format!("_dns._tcp.web.demo.svc.{z}"),
            qtype::SRV,
            nx.clone(),
        ),
        // An empty non-terminal exists: NODATA.
        (format!("_tcp.web.demo.svc.{z}"), qtype::SRV, nodata.clone()),
        // 2.3.3 PTR of ClusterIPs, both families.
        (
            "10.0.19.198.in-addr.arpa".into(),
            qtype::PTR,
            (0, v(&["@ PTR web.demo.svc.cluster.local"]), vec![], false),
        ),
        (
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.f.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa".into(),
            qtype::PTR,
            (0, v(&["@ PTR web.demo.svc.cluster.local"]), vec![], false),
        ),
        // Other addresses' PTRs are the upstream's.
        (
            "1.1.168.192.in-addr.arpa".into(),
            qtype::PTR,
            (255, v(&["forward"]), vec![], false),
        ),
        // 2.4.1 headless: one A per ready endpoint; hostnames, or the dashed address.
        (
            format!("db.demo.svc.{z}"),
            qtype::A,
            (0, v(&["@ A 198.18.0.21", "@ A 198.18.0.22"]), vec![], false),
        ),
        (
            format!("db-0.db.demo.svc.{z}"),
            qtype::A,
            (0, v(&["@ A 198.18.0.21"]), vec![], false),
        ),
        (
            format!("198-18-0-22.db.demo.svc.{z}"),
            qtype::A,
            (0, v(&["@ A 198.18.0.22"]), vec![], false),
        ),
        (format!("198-18-0-23.db.demo.svc.{z}"), qtype::A, nx.clone()),
        // Headless with no ready endpoint: NXDOMAIN.
        (format!("empty.demo.svc.{z}"), qtype::A, nx.clone()),
        // 2.4.2 SRV: N endpoints × M named ports, targets the endpoints' names.
        (
            format!("_pg._tcp.db.demo.svc.{z}"),
            qtype::SRV,
            (
                0,
                v(&[
                    "@ SRV 0 50 5432 198-18-0-22.db.demo.svc.cluster.local",
                    "@ SRV 0 50 5432 db-0.db.demo.svc.cluster.local",
                ]),
                v(&[
                    "198-18-0-22.db.demo.svc.cluster.local A 198.18.0.22",
                    "db-0.db.demo.svc.cluster.local A 198.18.0.21",
                ]),
                false,
            ),
        ),
        // 2.4.3 PTR of endpoint addresses.
        (
            "21.0.18.198.in-addr.arpa".into(),
            qtype::PTR,
            (
                0,
                v(&["@ PTR db-0.db.demo.svc.cluster.local"]),
                vec![],
                false,
            ),
        ),
        // 2.5 ExternalName: a CNAME, followed upstream when outside the zone …
        (
            format!("ext.demo.svc.{z}"),
            qtype::A,
            (
                0,
                v(&["@ CNAME db.example.org", "chase db.example.org"]),
                vec![],
                false,
            ),
        ),
        (
            format!("ext.demo.svc.{z}"),
            qtype::CNAME,
            (0, v(&["@ CNAME db.example.org"]), vec![], false),
        ),
        // … and inside it.
        (
            format!("alias.demo.svc.{z}"),
            qtype::A,
            (
                0,
                v(&[
                    "@ CNAME web.demo.svc.cluster.local",
                    "web.demo.svc.cluster.local A 198.19.0.10",
                ]),
                vec![],
                false,
            ),
        ),
        // svc.<zone>, <ns>.svc.<zone> exist; other names in the zone do not; the apex's SOA.
        (format!("svc.{z}"), qtype::A, nodata.clone()),
        (format!("demo.svc.{z}"), qtype::A, nodata.clone()),
        (format!("nope.svc.{z}"), qtype::A, nx.clone()),
        (format!("web.nope.svc.{z}"), qtype::A, nx.clone()),
        (
            format!("web.demo.svc.{z}.demo.svc.{z}"),
            qtype::A,
            nx.clone(),
        ),
        (format!("a-b-c-d.demo.pod.{z}"), qtype::A, nx.clone()),
        (
            z.to_owned(),
            qtype::SOA,
            (0, v(&["@ SOA 7"]), vec![], false),
        ),
        // Names outside the zone are the upstream's; so is a name merely ending like it.
        (
            "example.org".into(),
            qtype::A,
            (255, v(&["forward"]), vec![], false),
        ),
        (
            "notcluster.local".into(),
            qtype::A,
            (255, v(&["forward"]), vec![], false),
        ),
    ];
    for (name, qt, want) in cases {
        assert_eq!(ask(&ix, &name, qt), want, "{name} type {qt}");
    }
}

#[test]
fn reverse_names_parse_strictly() {
    assert_eq!(
        reverse("4.3.2.1.in-addr.arpa"),
        Some("1.2.3.4".parse().unwrap())
    );
    assert_eq!(reverse("04.3.2.1.in-addr.arpa"), None, "leading zero");
    assert_eq!(reverse("3.2.1.in-addr.arpa"), None);
    assert_eq!(reverse("256.3.2.1.in-addr.arpa"), None);
    assert_eq!(reverse("x.1.ip6.arpa"), None);
}

#[test]
fn wire_answers_fit_their_limits() {
    use super::wire::{self, parse_query};
    let ix = index();
    let ask_wire = |name: &str, qt: u16, edns: Option<u16>| {
        let q = parse_query(&wire::tests_query(name, qt, edns)).expect("query");
        let l = ix.lookup(&q.name, q.qtype);
        wire::answer(&q, &l, 5, "cluster.local", wire::limit(&q, false))
    };
    // A positive answer: AA, one A record pointing at the question name.
    let m = ask_wire("Web.Demo.svc.cluster.local", qtype::A, None);
    assert_eq!(m[3] & 0x0f, 0, "NOERROR");
    assert_ne!(m[2] & 0x04, 0, "AA");
    assert_eq!(u16::from_be_bytes([m[6], m[7]]), 1, "one answer");
    assert!(m.ends_with(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 198, 19, 0, 10]));
    // NXDOMAIN with the SOA in authority.
    let m = ask_wire("nope.svc.cluster.local", qtype::A, Some(1232));
    assert_eq!(m[3] & 0x0f, rcode::NXDOMAIN);
    assert_eq!(u16::from_be_bytes([m[8], m[9]]), 1, "SOA");
    assert_eq!(u16::from_be_bytes([m[10], m[11]]), 1, "OPT");
}

#[test]
fn a_large_answer_is_truncated_only_when_the_answers_do_not_fit() {
    use super::wire::{self, parse_query};
    // A headless Service with 60 endpoints: 60 A records (16 bytes each, compressed) ≈ 1 KB.
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: d}\nspec: {clusterIP: None, ports: [{name: p, port: 1}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: big-1, namespace: d, labels: {kubernetes.io/service-name: big}}\naddressType: IPv4\nendpoints:\n",
    );
    for i in 0..60 {
        let _ = writeln!(y, "- {{addresses: [198.18.1.{}]}}", i + 1);
    }
    let mut errors = Vec::new();
    let o = crate::manifest::parse_str(Path::new("t.yaml"), &y, &mut errors).unwrap();
    let ix = Index::build(&o, &Config::default(), 1);
    let run = |name: &str, qt: u16, edns: Option<u16>| {
        let q = parse_query(&wire::tests_query(name, qt, edns)).unwrap();
        let l = ix.lookup(&q.name, q.qtype);
        wire::answer(&q, &l, 5, "cluster.local", wire::limit(&q, false))
    };
    // No EDNS: 512 bytes; the 60 answers do not fit: TC and no answers.
    let m = run("big.d.svc.cluster.local", qtype::A, None);
    assert!(m.len() <= 512);
    assert_ne!(m[2] & 0x02, 0, "TC");
    assert_eq!(u16::from_be_bytes([m[6], m[7]]), 0);
    // With EDNS 1232 they fit.
    let m = run("big.d.svc.cluster.local", qtype::A, Some(4096));
    assert!(m.len() <= wire::MAX_UDP);
    assert_eq!(m[2] & 0x02, 0, "no TC");
    assert_eq!(u16::from_be_bytes([m[6], m[7]]), 60);
    // SRV: 60 answers fit in 512? No: TC. The additional A records alone never set TC.
    let m = run("_p._tcp.big.d.svc.cluster.local", qtype::SRV, Some(1232));
    let answers = u16::from_be_bytes([m[6], m[7]]);
    let tc = m[2] & 0x02 != 0;
    assert!(m.len() <= 1232);
    assert!(
        tc == (answers == 0),
        "TC only without answers: {answers} {tc}"
    );
}

#[test]
fn a_change_rebuilds_only_its_own_service() {
    let mut errors = Vec::new();
    let mut o =
        crate::manifest::parse_str(Path::new("t.yaml"), OBJECTS, &mut errors).expect("YAML");
    let mut b = Builder::default();
    let cfg = Config::default();
    let one = b.build(&o, &cfg, 1);
    // `v4only` changes (a new object); every other Service keeps its zone.
    let i = o
        .services
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("v4only"))
        .expect("v4only");
    let mut changed = (*o.services[i]).clone();
    changed.spec.as_mut().expect("spec").cluster_ip = Some("198.19.0.12".into());
    o.services[i] = std::sync::Arc::new(changed);
    let two = b.build(&o, &cfg, 2);
    for (k, z) in one.services.iter() {
        let same = std::sync::Arc::ptr_eq(z, two.services.get(k).expect("kept"));
        assert_eq!(same, &**k != "v4only.demo", "{k}");
    }
    // Shards the change did not touch are shared with the older index, not copied.
    let shared = (0..SHARDS)
        .filter(|i| Arc::ptr_eq(&one.services.maps[*i], &two.services.maps[*i]))
        .count();
    assert_eq!(shared, SHARDS - 1);
    assert_eq!(
        ask(&two, "v4only.demo.svc.cluster.local", qtype::A).1,
        vec!["@ A 198.19.0.12".to_owned()]
    );
    assert_eq!(
        ask(&two, "12.0.19.198.in-addr.arpa", qtype::PTR).1,
        vec!["@ PTR v4only.demo.svc.cluster.local".to_owned()]
    );
    assert_eq!(
        ask(&two, "11.0.19.198.in-addr.arpa", qtype::PTR).0,
        255,
        "old PTR gone"
    );
}

/// Random edits of a small cluster (Services added, changed, removed, duplicated; slices
/// added, changed, removed; endpoints turning ready and not): after each, the index the
/// builder updated answers exactly as one built from scratch.
mod incremental {
    use super::*;
    use crate::k8s::discovery::{Endpoint, EndpointConditions};
    use proptest::prelude::*;

    fn service(i: u8, ns: u8, variant: u8) -> Arc<Service> {
        let spec = match variant % 4 {
            0 => format!("{{clusterIP: 198.19.0.{i}, ports: [{{name: http, port: 80}}]}}"),
            1 => "{clusterIP: None, ports: [{name: pg, port: 5432}, {port: 1}]}".to_owned(),
            2 => format!(
                "{{type: ExternalName, externalName: s{}.n0.svc.cluster.local}}",
                i / 2
            ),
            _ => format!(
                "{{clusterIPs: [198.19.1.{i}, '2001:db8::{i}'], ports: [{{name: dns, port: 53, protocol: UDP}}]}}"
            ),
        };
        let y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n{ns}}}\nspec: {spec}\n"
        );
        let mut e = Vec::new();
        let o = crate::manifest::parse_str(Path::new("p.yaml"), &y, &mut e).expect("YAML");
        o.services[0].clone()
    }

    fn slice(svc: u8, ns: u8, eps: &[(u8, bool)]) -> Arc<EndpointSlice> {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        };
        s.metadata.name = Some(format!("s{svc}-x").into());
        s.metadata.namespace = Some(format!("n{ns}").into());
        s.metadata.labels = Some(
            [(LABEL_SERVICE_NAME.to_owned(), format!("s{svc}"))]
                .into_iter()
                .collect(),
        );
        s.endpoints = eps
            .iter()
            .map(|(a, ready)| Endpoint {
                addresses: crate::few::Few::One(format!("198.18.0.{a}").into()),
                hostname: (a % 3 == 0).then(|| format!("h{a}").into()),
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect();
        Arc::new(s)
    }

    #[derive(Debug, Clone)]
    enum Edit {
        AddService(u8, u8, u8),
        RemoveService(usize),
        ReplaceService(usize, u8),
        AddSlice(u8, u8, Vec<(u8, bool)>),
        RemoveSlice(usize),
        Swap(usize, usize),
        SwapSlices(usize, usize),
        /// The very same object twice in the snapshot.
        Repeat(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (0u8..6, 0u8..2, 0u8..4).prop_map(|(i, n, v)| Edit::AddService(i, n, v)),
            (0usize..16).prop_map(Edit::RemoveService),
            (0usize..16, 0u8..4).prop_map(|(i, v)| Edit::ReplaceService(i, v)),
            (
                0u8..6,
                0u8..2,
                proptest::collection::vec((0u8..8, any::<bool>()), 0..4)
            )
                .prop_map(|(i, n, e)| Edit::AddSlice(i, n, e)),
            (0usize..16).prop_map(Edit::RemoveSlice),
            (0usize..16, 0usize..16).prop_map(|(a, b)| Edit::Swap(a, b)),
            (0usize..16, 0usize..16).prop_map(|(a, b)| Edit::SwapSlices(a, b)),
            (0usize..16).prop_map(Edit::Repeat),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn an_updated_index_answers_as_one_built_from_scratch(
            edits in proptest::collection::vec(edit(), 1..24)
        ) {
            let mut o = Objects::default();
            let mut b = Builder::default();
            let cfg = Config::default();
            let mut held = Vec::new();
            for (n, e) in edits.into_iter().enumerate() {
                match e {
                    Edit::AddService(i, ns, v) => o.services.push(service(i, ns, v)),
                    Edit::RemoveService(k) if !o.services.is_empty() => {
                        let k = k % o.services.len();
                        o.services.remove(k);
                    }
                    Edit::ReplaceService(k, v) if !o.services.is_empty() => {
                        let k = k % o.services.len();
                        let s = &o.services[k];
                        let name = s.metadata.name.clone().unwrap_or_default();
                        let ns = s.metadata.namespace.clone().unwrap_or_default();
                        let i: u8 = name[1..].parse().unwrap_or(0);
                        let nsi: u8 = ns[1..].parse().unwrap_or(0);
                        o.services[k] = service(i, nsi, v);
                    }
                    Edit::AddSlice(i, ns, eps) => o.slices.push(slice(i, ns, &eps)),
                    Edit::RemoveSlice(k) if !o.slices.is_empty() => {
                        let k = k % o.slices.len();
                        o.slices.remove(k);
                    }
                    Edit::Swap(a, b) if !o.services.is_empty() => {
                        let l = o.services.len();
                        o.services.swap(a % l, b % l);
                    }
                    Edit::SwapSlices(a, b) if !o.slices.is_empty() => {
                        let l = o.slices.len();
                        o.slices.swap(a % l, b % l);
                    }
                    Edit::Repeat(k) if !o.services.is_empty() => {
                        let s = o.services[k % o.services.len()].clone();
                        o.services.push(s);
                        if !o.slices.is_empty() {
                            let s = o.slices[k % o.slices.len()].clone();
                            o.slices.insert(0, s);
                        }
                    }
                    _ => {}
                }
                let serial = u32::try_from(n).expect("small");
                let updated = b.build(&o, &cfg, serial);
                let fresh = Index::build(&o, &cfg, serial);
                let dump = updated.dump();
                prop_assert_eq!(&dump, &fresh.dump());
                held.push((dump, updated)); // older indexes stay alive, sharing shards
            }
            // Later updates do not disturb an older index (the server may still answer from it).
            for (dump, ix) in &held {
                prop_assert_eq!(dump, &ix.dump());
            }
        }
    }
}
