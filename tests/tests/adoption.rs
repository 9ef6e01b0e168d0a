//! Adoption against the real kernel: whatever sequence of desired states the agent wrote to the
//! pinned maps, reading the pins back (`BpfMaps::read_shadow`, what a restarted agent does)
//! yields exactly the shadow the writer kept, and the diff of the last desired state against it
//! is empty — a restart rewrites nothing. (A host-only version of this compared the shadow with
//! its own clone, so it could not fail.)
use std::path::Path;

use lb_model::{
    arbitrary::{MAGLEV_M, arb_desired},
    model::Desired,
    sync::{Shadow, apply, diff},
};
use lb_tests::{Bpffs, Cgroup, ensure_bpffs, require_privileges};
use lb_userspace::loader::{self, Sizes, XdpMode};
use proptest::{prelude::*, test_runner::TestRunner};

/// Writes `seq` one desired state after the other through the real maps, then reads the pins
/// back as a restarted agent would.
fn write_then_adopt(bpffs: &Path, seq: &[Desired]) -> Result<(), TestCaseError> {
    let mut maps = lb_userspace::maps::BpfMaps::from_pins(bpffs).expect("open pinned maps");
    let mut shadow = maps.read_shadow().expect("read pinned maps");
    for d in seq {
        let ops = diff(d, &shadow);
        apply(&ops, &mut maps, &mut shadow).map_err(|(n, e)| {
            TestCaseError::fail(format!("write {n} of {} failed: {e}", ops.len()))
        })?;
    }
    let adopted = lb_userspace::maps::BpfMaps::from_pins(bpffs)
        .expect("reopen pinned maps")
        .read_shadow()
        .expect("read pinned maps back");
    prop_assert_eq!(
        &adopted,
        &shadow,
        "the pins hold something else than was written"
    );
    let last = seq.last().expect("non-empty sequence");
    let rest = diff(last, &adopted);
    prop_assert!(rest.is_empty(), "a restarted agent would write {rest:?}");
    Ok(())
}

#[test]
fn pinned_maps_read_back_exactly_what_was_written_and_adoption_writes_nothing() {
    require_privileges();
    ensure_bpffs();
    let tag = format!("adopt-{}", std::process::id());
    let cgroup = Cgroup::new(&format!("lbt-{tag}"));
    let bpffs = Bpffs::new(&format!("/sys/fs/bpf/lbt-{tag}"), &cgroup.path);
    let host = loader::netns_cookie(Path::new("/proc/self/ns/net")).expect("netns cookie");
    let sizes = Sizes {
        services: 4096,
        backends: 4096,
        revnat: 4096,
        revnat_ring: 4096,
        conntrack: 1024,
        maglev_m: MAGLEV_M,
        maglev_frontends: 64,
    };
    let maps = loader::load_and_attach(
        &bpffs.path,
        &cgroup.path,
        sizes,
        host,
        &[],
        XdpMode::Off,
        &lb_common::CtTimeouts::DEFAULT,
    )
    .expect("load and attach the datapath to the test cgroup");
    drop(maps);

    let mut runner = TestRunner::new(ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    });
    let cases = std::cell::Cell::new(0u32);
    runner
        .run(&proptest::collection::vec(arb_desired(), 1..5), |seq| {
            cases.set(cases.get() + 1);
            write_then_adopt(&bpffs.path, &seq)
        })
        .expect("adoption property");
    // Every case started from what the previous one left: end empty, and read that back too.
    write_then_adopt(&bpffs.path, &[Desired::default()]).expect("emptied maps adopt");
    let empty = lb_userspace::maps::BpfMaps::from_pins(&bpffs.path)
        .expect("open pinned maps")
        .read_shadow()
        .expect("read");
    assert_eq!(
        empty,
        Shadow::default(),
        "deleting everything empties the maps"
    );
    assert!(cases.get() >= 96, "only {} cases ran", cases.get());
}
