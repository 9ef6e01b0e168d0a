//! What the kept model costs in memory per Service, counted exactly by a counting allocator
//! (this test binary's own), beside what the API objects themselves take: the model's cache
//! must stay under 4 KiB per Service, and a copy of the desired state must copy pointers.
mod common;

use common::footprint;

#[global_allocator]
static A: common::Counting = common::Counting;

#[test]
fn the_kept_model_costs_less_than_4_kib_per_service_and_a_desired_copy_copies_pointers() {
    const N: usize = 10_000;
    let yaml = common::bench_manifests(N);
    let f0 = footprint();
    let o = common::parse(&yaml);
    let f1 = footprint();
    let cfg = lb_model::model::Config::default();
    let mut cache = lb_model::model::Cache::default();
    let (_, problems) = lb_model::model::update(&o.services, &o.slices, &cfg, &mut cache);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(cache.desired().frontends.len(), N);
    let f2 = footprint();
    let copy = cache.desired().clone();
    let f3 = footprint();
    let (objects, model, desired) = ((f1 - f0) / N, (f2 - f1) / N, (f3 - f2) / N);
    eprintln!(
        "per Service: API objects {objects} B, the kept model {model} B, a copy of the desired state {desired} B"
    );
    assert!(model < 1024, "the kept model takes {model} B per Service");
    assert!(
        desired < 128,
        "a copy of the desired state takes {desired} B per Service: the states were copied"
    );
    drop(copy);
}
