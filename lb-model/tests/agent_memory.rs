//! What the agent keeps per Service in manifest mode, stage by stage, counted exactly by a
//! counting allocator (this test binary's own): the parsed objects, the control plane's
//! allocated copies, the kept model, the shadow of the maps and the DNS builder, for 10,000
//! Services of the bench's shape. Each stage has a budget a little above what it takes, so a
//! change that makes the agent fatter per Service fails here, by name, before any bench.
mod common;

use common::footprint;

#[global_allocator]
static A: common::Counting = common::Counting;

struct Null;
impl lb_model::sync::MapWriter for Null {
    type Error = std::convert::Infallible;
    fn write(&mut self, _: &lb_model::sync::MapOp) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[test]
fn each_stage_keeps_no_more_than_its_budget_per_service() {
    const N: usize = 10_000;
    let yaml = common::bench_manifests(N);
    let f0 = footprint();
    let o = common::parse(&yaml);
    let f1 = footprint();
    let mut cp = lb_model::control::ControlPlane::new(
        lb_model::control::Ranges::default(),
        lb_model::control::State::default(),
    );
    let (o2, errs, _) = cp.run(&o, "node-a");
    assert!(errs.is_empty(), "{errs:?}");
    let f2 = footprint();
    let cfg = lb_model::model::Config::default();
    let mut cache = lb_model::model::Cache::default();
    let (_, problems) = lb_model::model::update(&o2.services, &o2.slices, &cfg, &mut cache);
    assert!(problems.is_empty(), "{problems:?}");
    let f3 = footprint();
    let mut shadow = lb_model::sync::Shadow::default();
    let ops = lb_model::sync::diff(cache.desired(), &shadow);
    lb_model::sync::apply(&ops, &mut Null, &mut shadow).unwrap();
    drop(ops);
    let _ = shadow.svc.len();
    let f4 = footprint();
    let mut b = lb_model::dns::Builder::default();
    let ix = b.build(&o2, &lb_model::dns::Config::default(), 1);
    let f5 = footprint();
    let per = |a: usize, b: usize| (b - a) / N;
    let stages = [
        ("parsed objects", per(f0, f1), 1_536),
        ("control plane", per(f1, f2), 1_408),
        ("model", per(f2, f3), 1_024),
        ("shadow", per(f3, f4), 320),
        ("DNS", per(f4, f5), 544),
    ];
    let total: usize = stages.iter().map(|s| s.1).sum();
    eprintln!(
        "per Service: {stages:?}; total {total} B; DNS names {}",
        ix.len()
    );
    for (stage, bytes, budget) in stages {
        assert!(
            bytes <= budget,
            "{stage}: {bytes} B per Service, over its budget of {budget} B"
        );
    }
    assert!(total <= 4_864, "{total} B per Service in all");
}
