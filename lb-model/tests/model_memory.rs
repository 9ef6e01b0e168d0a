//! What the kept model costs in memory per Service, counted exactly by a counting allocator
//! (this test binary's own), beside what the API objects themselves take: the model's cache
//! must stay under 4 KiB per Service, and a copy of the desired state must copy pointers.
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Live allocations and their bytes.
struct Counting;
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: a pointer this allocator returned, with its layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Live heap bytes, with glibc's 16 bytes per allocation.
fn footprint() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed) + 16 * LIVE_ALLOCS.load(Ordering::Relaxed)
}

#[test]
fn the_kept_model_costs_less_than_4_kib_per_service_and_a_desired_copy_copies_pointers() {
    const N: usize = 10_000;
    // As the bench loads them: a ClusterIP, one named port, one slice of 4 endpoints.
    let mut yaml = String::new();
    for i in 0..N {
        let (a, e) = (512 + i, 1 + i % 250);
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [198.18.64.{e}]}}, {{addresses: [198.18.65.{e}]}}, {{addresses: [198.18.66.{e}]}}, {{addresses: [198.18.67.{e}]}}]\n---\n",
            a / 256,
            a % 256
        );
    }
    let f0 = footprint();
    let mut errors = Vec::new();
    let o = lb_model::manifest::parse_str(std::path::Path::new("m.yaml"), &yaml, &mut errors)
        .expect("manifests");
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
    assert!(model < 4096, "the kept model takes {model} B per Service");
    assert!(
        desired < 128,
        "a copy of the desired state takes {desired} B per Service: the states were copied"
    );
    drop(copy);
}
