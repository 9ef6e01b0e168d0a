use std::{collections::BTreeSet, convert::Infallible};

use proptest::prelude::*;

use super::*;
use crate::k8s::Str;
use crate::{
    arbitrary::arb_desired,
    model::{AddrSet, FrontendState, NsName, Proto, Scope},
};

/// A writer that checks, after every single write, what a concurrent datapath could observe.
/// `external`: the frontends allowed to have no VIP marker during this one transition (those
/// reached by external addresses before or after it). Built afresh for every transition, never
/// carried from one case to the next: a set that only grew would end up excusing every frontend.
struct Checked {
    shadow: Shadow,
    external: BTreeSet<SvcKey>,
}

/// The frontends reached by external addresses in these desired states: they have no VIP marker.
fn externals(ds: &[&Desired]) -> BTreeSet<SvcKey> {
    ds.iter()
        .flat_map(|d| {
            d.frontends
                .iter()
                .filter(|(_, st)| st.external)
                .map(|(f, _)| SvcKey::frontend(f))
        })
        .collect()
}

/// The frontends a shadow holds without a VIP marker: after a converged step, exactly the
/// external ones of that step's desired state (checked at the end of every [`converge`]).
fn unmarked(s: &Shadow) -> BTreeSet<SvcKey> {
    s.svc
        .keys()
        .filter(|k| k.slot == 0 && !k.is_marker() && !s.svc.contains_key(&SvcKey::marker(k.addr)))
        .copied()
        .collect()
}

fn check_consistent(s: &Shadow, external: &BTreeSet<SvcKey>) -> Result<(), String> {
    // Every table entry names an existing backend (the datapath may read any chunk any time).
    for (k, ids) in &s.maglev {
        if let Some(id) = ids
            .iter()
            .find(|id| **id != 0 && !s.backends.contains_key(id))
        {
            return Err(format!("maglev {k:?}: backend {id} missing"));
        }
    }
    for (k, v) in &s.svc {
        if v.flags & lb_common::SVC_FLAG_MAGLEV != 0 && k.slot == 0 {
            let chunks = lb_common::maglev::chunks(crate::arbitrary::MAGLEV_M);
            for chunk in 0..chunks {
                let key = lb_common::maglev::MaglevKey {
                    frontend_id: v.backend_id,
                    chunk,
                };
                if !s.maglev.contains_key(&key) {
                    return Err(format!("{k:?}: Maglev flag but chunk {chunk} missing"));
                }
            }
        }
    }
    for (k, v) in &s.svc {
        if k.slot != 0 || k.is_marker() {
            continue;
        }
        let external = external.contains(k);
        if !external && !s.svc.contains_key(&SvcKey::marker(k.addr)) {
            return Err(format!("frontend {k:?} without its VIP marker"));
        }
        if v.flags & lb_common::SVC_FLAG_SRC_RANGES != 0
            && !s.src_ranges.iter().any(|r| r.frontend == *k)
        {
            return Err(format!(
                "{k:?}: source-range flag without a range (all dropped)"
            ));
        }
        for slot in 1..=v.count {
            let Some(sv) = s.svc.get(&k.with_slot(slot)) else {
                return Err(format!("{k:?}: count {} but slot {slot} missing", v.count));
            };
            if !s.backends.contains_key(&sv.backend_id) {
                return Err(format!(
                    "{k:?} slot {slot}: backend {} missing",
                    sv.backend_id
                ));
            }
        }
    }
    Ok(())
}

impl MapWriter for Checked {
    type Error = Infallible;
    fn write(&mut self, op: &MapOp) -> Result<(), Infallible> {
        self.shadow.apply(op);
        if let Err(e) = check_consistent(&self.shadow, &self.external) {
            panic!("after {op:?}: {e}");
        }
        Ok(())
    }
}

/// Diffs and applies one transition to `desired` through a [`Checked`] writer; at the end only
/// `desired`'s external frontends may lack a marker.
fn converge(desired: &Desired, shadow: &mut Shadow) -> Vec<MapOp> {
    let mut external = externals(&[desired]);
    external.extend(unmarked(shadow));
    let ops = diff(desired, shadow);
    let mut w = Checked {
        shadow: shadow.clone(),
        external,
    };
    apply(&ops, &mut w, shadow).expect("infallible");
    assert_eq!(w.shadow, *shadow);
    if let Err(e) = check_consistent(shadow, &externals(&[desired])) {
        panic!("after converging: {e}");
    }
    ops
}

/// What the datapath would serve for each frontend, as backend address sets.
fn served(s: &Shadow) -> BTreeMap<SvcKey, BTreeSet<SocketAddr>> {
    s.frontends()
        .into_iter()
        .map(|(k, (_, bes))| {
            (
                k,
                bes.into_iter()
                    .map(|b| b.expect("slot resolves").addr)
                    .collect(),
            )
        })
        .collect()
}

fn expected(d: &Desired) -> BTreeMap<SvcKey, BTreeSet<SocketAddr>> {
    d.frontends
        .iter()
        .map(|(fe, st)| (SvcKey::frontend(fe), st.backends.iter().collect()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any sequence of desired states: every intermediate write is consistent, the end state
    /// serves exactly what is desired, a second diff is empty, and nothing is left behind.
    #[test]
    fn converges_through_any_sequence(seq in proptest::collection::vec(arb_desired(), 1..6)) {
        let mut shadow = Shadow::default();
        for d in &seq {
            converge(d, &mut shadow);
            prop_assert_eq!(served(&shadow), expected(d));
            prop_assert!(diff(d, &shadow).is_empty(), "second diff not empty");
            let vips: BTreeSet<IpAddr> = d.frontends.iter().filter(|(_, st)| !st.external).map(|(f, _)| f.addr).collect();
            let markers: BTreeSet<IpAddr> = shadow.svc.keys().filter(|k| k.is_marker()).map(|k| k.addr).collect();
            prop_assert_eq!(markers, vips, "markers exactly for served VIPs");
            let used: BTreeSet<u32> = shadow.svc.iter().filter(|(k, _)| k.slot > 0).map(|(_, v)| v.backend_id).collect();
            let have: BTreeSet<u32> = shadow.backends.keys().copied().collect();
            prop_assert_eq!(used, have, "no unreferenced backend left");
            // Frontend ids: non-zero and unique; affinity memberships exactly the backends of
            // the frontends with affinity; flags and timeouts as desired.
            let mut ids = BTreeSet::new();
            let mut want_match = BTreeSet::new();
            for (fe, st) in &d.frontends {
                let v = shadow.svc[&SvcKey::frontend(fe)];
                prop_assert!(v.backend_id != 0 && ids.insert(v.backend_id), "frontend id {} reused", v.backend_id);
                prop_assert_eq!(v.affinity_timeout, st.affinity_timeout);
                prop_assert_eq!(v.flags & lb_common::SVC_FLAG_NO_LOCAL != 0, st.no_local);
                if st.affinity_timeout > 0 {
                    for s in 1..=v.count {
                        want_match.insert(AffMatch { backend_id: shadow.svc[&SvcKey::frontend(fe).with_slot(s)].backend_id, frontend_id: v.backend_id });
                    }
                }
            }
            prop_assert_eq!(&shadow.aff_match, &want_match);
        }
    }


    /// Leftovers of an interrupted apply (any prefix of the ops) are repaired by the next diff.
    #[test]
    fn recovers_from_an_interrupted_apply(a in arb_desired(), b in arb_desired(), cut in 0usize..64) {
        let mut shadow = Shadow::default();
        converge(&a, &mut shadow);
        let ops = diff(&b, &shadow);
        for op in ops.iter().take(cut) {
            shadow.apply(op);
        }
        check_consistent(&shadow, &externals(&[&a, &b])).map_err(TestCaseError::fail)?;
        converge(&b, &mut shadow);
        prop_assert_eq!(served(&shadow), expected(&b));
    }
}

#[test]
fn removing_one_backend_moves_the_last_slot_into_the_hole() {
    let fe = Frontend {
        addr: "198.19.0.1".parse().unwrap(),
        port: 80,
        proto: Proto::Tcp,
        scope: Scope::InNode,
    };
    let addrs: Vec<SocketAddr> = (1..=4)
        .map(|i| format!("198.18.0.{i}:80").parse().unwrap())
        .collect();
    let st = |b: &[SocketAddr]| {
        std::sync::Arc::new(FrontendState {
            service: NsName {
                namespace: "ns".into(),
                name: "s".into(),
            }
            .into(),
            port_name: Str::default(),
            backends: b.iter().copied().collect(),
            ..FrontendState::default()
        })
    };
    let mut shadow = Shadow::default();
    converge(
        &Desired {
            frontends: [(fe, st(&addrs))].into(),
            ..Desired::default()
        },
        &mut shadow,
    );
    let key = SvcKey::frontend(&fe);
    let gone = shadow.svc[&key.with_slot(2)].backend_id;
    let last = shadow.svc[&key.with_slot(4)].backend_id;
    let keep: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| *a != shadow.backends[&gone].addr)
        .collect();
    let ops = converge(
        &Desired {
            frontends: [(fe, st(&keep))].into(),
            ..Desired::default()
        },
        &mut shadow,
    );
    assert_eq!(
        ops,
        vec![
            MapOp::PutSvc {
                key: key.with_slot(2),
                value: SvcValue {
                    backend_id: last,
                    ..SvcValue::default()
                }
            },
            MapOp::PutSvc {
                key,
                value: SvcValue {
                    backend_id: 1, // the frontend id, unchanged
                    count: 3,
                    ..SvcValue::default()
                }
            },
            MapOp::DelSvc {
                key: key.with_slot(4)
            },
            MapOp::DelBackend {
                id: gone,
                backend: Backend {
                    addr: addrs[1],
                    proto: 6,
                    local: false,
                }
            },
        ]
    );
}

#[test]
fn a_service_without_endpoints_keeps_a_zero_count_frontend() {
    let fe = Frontend {
        addr: "198.19.0.9".parse().unwrap(),
        port: 53,
        proto: Proto::Udp,
        scope: Scope::InNode,
    };
    let st = std::sync::Arc::new(FrontendState {
        service: NsName {
            namespace: "ns".into(),
            name: "dns".into(),
        }
        .into(),
        port_name: Str::default(),
        backends: AddrSet::default(),
        ..FrontendState::default()
    });
    let mut shadow = Shadow::default();
    converge(
        &Desired {
            frontends: [(fe, st)].into(),
            ..Desired::default()
        },
        &mut shadow,
    );
    assert_eq!(shadow.svc[&SvcKey::frontend(&fe)].count, 0);
    assert!(shadow.svc.contains_key(&SvcKey::marker(fe.addr)));
    assert!(shadow.backends.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the capacities: the peak of the resulting apply fits, frontends already in the
    /// maps keep serving (their desired or their current backends), and what fits is unchanged.
    #[test]
    fn fit_never_overflows_and_never_evicts(a in arb_desired(), b in arb_desired(), caps in (0usize..40, 0usize..40, 0usize..12, 0usize..12)) {
        let big = Capacity { svc4: 1000, svc6: 1000, be4: 1000, be6: 1000 };
        let mut shadow = Shadow::default();
        let mut a = a;
        fit(&mut a, &shadow, &big, None);
        converge(&a, &mut shadow);
        let cap = Capacity { svc4: caps.0 + count(&shadow, 0), svc6: caps.1 + count(&shadow, 1), be4: caps.2 + count(&shadow, 2), be6: caps.3 + count(&shadow, 3) };
        let mut d = b.clone();
        let refused = fit(&mut d, &shadow, &cap, None);
        // Peak usage: union of what is there and what will be written.
        let ops = diff(&d, &shadow);
        let mut peak = shadow.clone();
        for op in &ops {
            if !matches!(op, MapOp::DelSvc { .. } | MapOp::DelBackend { .. }) {
                peak.apply(op);
            }
        }
        prop_assert!(count(&peak, 0) <= cap.svc4 && count(&peak, 1) <= cap.svc6, "service maps overflow");
        prop_assert!(count(&peak, 2) <= cap.be4 && count(&peak, 3) <= cap.be6, "backend maps overflow");
        let before = served(&shadow);
        converge(&d, &mut shadow);
        let after = served(&shadow);
        for (fe, _) in &refused {
            let k = SvcKey::frontend(fe);
            prop_assert_eq!(after.get(&k), before.get(&k), "a refused frontend keeps what it had");
        }
        for (fe, st) in &b.frontends {
            if !refused.iter().any(|(r, _)| r == fe) {
                prop_assert_eq!(after.get(&SvcKey::frontend(fe)).cloned().map(AddrSet::from), Some(st.backends.clone()), "admitted as desired");
            }
        }
    }
}

/// Entries per map of a shadow: 0 = svc4, 1 = svc6, 2 = be4, 3 = be6.
fn count(s: &Shadow, which: usize) -> usize {
    match which {
        0 | 1 => s
            .svc
            .keys()
            .filter(|k| usize::from(k.addr.is_ipv6()) == which)
            .count(),
        _ => s
            .backends
            .values()
            .filter(|b| usize::from(b.addr.is_ipv6()) == which - 2)
            .count(),
    }
}

#[test]
fn fit_refuses_only_the_newcomer() {
    let st = |n: u8| {
        std::sync::Arc::new(FrontendState {
            service: NsName {
                namespace: "ns".into(),
                name: format!("s{n}").into(),
            }
            .into(),
            port_name: Str::default(),
            backends: (1..=n)
                .map(|i| SocketAddr::new(format!("198.18.0.{i}").parse().unwrap(), 80))
                .collect(),
            ..FrontendState::default()
        })
    };
    let fe = |last: u8| Frontend {
        addr: format!("198.19.0.{last}").parse().unwrap(),
        port: 80,
        proto: Proto::Tcp,
        scope: Scope::InNode,
    };
    let mut shadow = Shadow::default();
    converge(
        &Desired {
            frontends: [(fe(1), st(2))].into(),
            ..Desired::default()
        },
        &mut shadow,
    ); // marker + fe + 2 slots = 4
    let cap = Capacity {
        svc4: 7,
        svc6: 0,
        be4: 2,
        be6: 0,
    };
    // Newcomer needs marker + fe + 2 slots = 4 more: 8 > 7.
    let mut d = Desired {
        frontends: [(fe(1), st(2)), (fe(2), st(2))].into(),
        ..Desired::default()
    };
    assert_eq!(
        fit(&mut d, &shadow, &cap, None),
        vec![(fe(2), (*st(2).service).clone())]
    );
    assert!(!d.frontends.contains_key(&fe(2)));
    assert_eq!(d.frontends[&fe(1)], st(2));
    // A grown incumbent beyond the backend capacity keeps its current backends.
    let mut d = Desired {
        frontends: [(fe(1), st(3))].into(),
        ..Desired::default()
    };
    assert_eq!(
        fit(&mut d, &shadow, &cap, None),
        vec![(fe(1), (*st(3).service).clone())]
    );
    assert_eq!(d.frontends[&fe(1)].backends, st(2).backends);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// The scoped diff over the changed frontends gives exactly the maps the full diff gives,
    /// consistent after every write, and leaves nothing for a full resync to do.
    #[test]
    fn scoped_diff_equals_the_full_diff(a in arb_desired(), b in arb_desired()) {
        let mut full = Shadow::default();
        converge(&a, &mut full);
        let mut scoped = full.clone();
        converge(&b, &mut full);

        let dirty = changed(&a, &b);
        let ops = diff_scoped(&b, &b, &scoped, &dirty);
        // Given only the dirty frontends' states (as the agent does), the same writes.
        let only_dirty = Desired {
            frontends: b.frontends.iter().filter(|(f, _)| dirty.contains(f)).map(|(f, s)| (*f, s.clone())).collect(),
            health_checks: b.health_checks.clone(),
        };
        prop_assert_eq!(&diff_scoped(&only_dirty, &b, &scoped, &dirty), &ops);
        let mut w = Checked { shadow: scoped.clone(), external: externals(&[&a, &b]) };
        apply(&ops, &mut w, &mut scoped).expect("infallible");
        prop_assert_eq!(&scoped, &full, "scoped ≠ full");
        prop_assert!(diff(&b, &scoped).is_empty(), "a full resync after a scoped one has work left");
    }

    /// Chains of scoped syncs stay equal to the desired state.
    #[test]
    fn scoped_syncs_chain(seq in proptest::collection::vec(arb_desired(), 2..6)) {
        let mut shadow = Shadow::default();
        converge(&seq[0], &mut shadow);
        for w in seq.windows(2) {
            let ops = diff_scoped(&w[1], &w[1], &shadow, &changed(&w[0], &w[1]));
            let mut c = Checked { shadow: shadow.clone(), external: externals(&[&w[0], &w[1]]) };
            apply(&ops, &mut c, &mut shadow).expect("infallible");
            prop_assert_eq!(served(&shadow), expected(&w[1]));
            prop_assert!(diff(&w[1], &shadow).is_empty());
            // The index kept in step by the writes is the index of what the mirror holds.
            prop_assert_eq!(shadow.index(), &super::ShadowIndex::of(&shadow));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// With the maps synced to `a`, fitting `b` over its changed frontends decides exactly as
    /// fitting all of it.
    #[test]
    fn scoped_fit_equals_full_fit(a in arb_desired(), b in arb_desired(), caps in (0usize..30, 0usize..30, 0usize..10, 0usize..10)) {
        let big = Capacity { svc4: 1000, svc6: 1000, be4: 1000, be6: 1000 };
        let mut a = a;
        let mut shadow = Shadow::default();
        fit(&mut a, &shadow, &big, None);
        converge(&a, &mut shadow);
        let cap = Capacity { svc4: caps.0 + count(&shadow, 0), svc6: caps.1 + count(&shadow, 1), be4: caps.2 + count(&shadow, 2), be6: caps.3 + count(&shadow, 3) };
        let (mut full, mut scoped) = (b.clone(), b.clone());
        let r_full = fit(&mut full, &shadow, &cap, None);
        let r_scoped = fit(&mut scoped, &shadow, &cap, Some(&changed(&a, &b)));
        prop_assert_eq!(r_full, r_scoped);
        prop_assert_eq!(full, scoped);
    }
}

/// The checker itself: a frontend without its VIP marker is caught however many cases with
/// external frontends ran before (a set of excused frontends that outlived its case once made
/// the marker check pass for everything after a few dozen cases).
#[test]
fn a_missing_marker_is_caught_after_any_number_of_cases() {
    let fe = |scope| Frontend {
        addr: "198.19.0.1".parse().unwrap(),
        port: 80,
        proto: Proto::Tcp,
        scope,
    };
    let st = |external| {
        std::sync::Arc::new(FrontendState {
            service: NsName {
                namespace: "ns".into(),
                name: "s".into(),
            }
            .into(),
            backends: ["198.18.0.10:80".parse().unwrap()].into(),
            external,
            ..FrontendState::default()
        })
    };
    // Earlier cases: the same frontend, reached by an external address (no marker).
    for _ in 0..100 {
        let mut shadow = Shadow::default();
        converge(
            &Desired {
                frontends: [(fe(Scope::InNode), st(true))].into(),
                ..Desired::default()
            },
            &mut shadow,
        );
    }
    // Now a ClusterIP frontend whose marker is missing.
    let d = Desired {
        frontends: [(fe(Scope::InNode), st(false))].into(),
        ..Desired::default()
    };
    let mut shadow = Shadow::default();
    for op in diff(&d, &Shadow::default()) {
        if !matches!(&op, MapOp::PutSvc { key, .. } if key.is_marker()) {
            shadow.apply(&op);
        }
    }
    let err = check_consistent(&shadow, &externals(&[&d])).expect_err("missing marker caught");
    assert!(err.contains("without its VIP marker"), "{err}");
    let caught = std::panic::catch_unwind(|| {
        let mut w = Checked {
            shadow: Shadow::default(),
            external: externals(&[&d]),
        };
        for op in diff(&d, &Shadow::default()) {
            if !matches!(&op, MapOp::PutSvc { key, .. } if key.is_marker()) {
                w.write(&op).expect("infallible");
            }
        }
    });
    assert!(
        caught.is_err(),
        "the writer lets a frontend without marker through"
    );
}

#[test]
fn a_cold_write_fills_the_mirror_at_once_as_one_by_one() {
    let st = |i: u32, n: u32| {
        std::sync::Arc::new(FrontendState {
            service: NsName {
                namespace: "ns".into(),
                name: format!("s{i}").into(),
            }
            .into(),
            backends: (1..=n)
                .map(|b| SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 8000 + b as u16)))
                .collect(),
            ..FrontendState::default()
        })
    };
    let fe = |i: u32| Frontend {
        addr: std::net::Ipv4Addr::from(0xc613_0000 + i).into(),
        port: 80,
        proto: Proto::Tcp,
        scope: Scope::InNode,
    };
    let mut d = Desired::default();
    for i in 0..2_000 {
        d.frontends.insert(fe(i), st(i, 4));
    }
    let mut shadow = Shadow::default();
    let ops = diff(&d, &shadow);
    let mut plain = Shadow::default();
    for op in &ops {
        plain.apply(op);
    }
    assert!(Shadow::default().fill(&ops));
    converge(&d, &mut shadow);
    assert_eq!(shadow, plain);
    // Not empty any more: a later write is applied one by one, and builds on the filled mirror
    // (and its index) as on the other.
    d.frontends.insert(fe(7), st(7, 2));
    d.frontends.remove(&fe(8));
    d.frontends.insert(fe(5_000), st(5_000, 3));
    let ops = diff(&d, &shadow);
    assert_eq!(ops, diff(&d, &plain));
    assert!(!shadow.clone().fill(&ops));
    converge(&d, &mut shadow);
    for op in &ops {
        plain.apply(op);
    }
    assert_eq!(shadow, plain);
    assert!(diff(&d, &shadow).is_empty());
    assert_eq!(served(&shadow), expected(&d));
    // A key put twice keeps its later value; a write with a delete is applied one by one.
    let key = SvcKey::frontend(&fe(1));
    let v = |count| SvcValue {
        backend_id: 1,
        count,
        ..SvcValue::default()
    };
    let twice = [
        MapOp::PutSvc { key, value: v(1) },
        MapOp::PutSvc { key, value: v(2) },
    ];
    let mut s = Shadow::default();
    assert!(s.fill(&twice));
    assert_eq!(s.svc[&key], v(2));
    assert!(!Shadow::default().fill(&[MapOp::DelSvc { key }]));
}
