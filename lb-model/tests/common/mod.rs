//! A counting allocator for the memory tests: each test binary installs it
//! (`#[global_allocator] static A: common::Counting = common::Counting;`) and reads what is
//! live, exactly, and what was allocated in total.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Every allocation and its size, live and in total.
pub(crate) struct Counting;
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static TOTAL_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        TOTAL_BYTES.fetch_add(l.size(), Ordering::Relaxed);
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

/// What glibc's malloc adds to each allocation (its chunk header, rounded to 16 bytes).
const MALLOC_OVERHEAD: usize = 16;

/// Live heap bytes, with the allocator's own overhead.
pub(crate) fn footprint() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed) + MALLOC_OVERHEAD * LIVE_ALLOCS.load(Ordering::Relaxed)
}

/// Bytes allocated so far (freed or not).
#[allow(dead_code, reason = "each test binary uses the part it needs")]
pub(crate) fn total() -> usize {
    TOTAL_BYTES.load(Ordering::Relaxed)
}

/// [`bench_manifests`]' text parsed.
#[allow(dead_code, reason = "each test binary uses the part it needs")]
pub(crate) fn parse(yaml: &str) -> lb_model::Objects {
    lb_model::manifest::parse_str(std::path::Path::new("m.yaml"), yaml, &mut Vec::new())
        .expect("manifests")
}

/// `n` Services as the bench loads them: a ClusterIP, one named port, one slice of 4
/// endpoints, as one YAML stream.
#[allow(dead_code, reason = "each test binary uses the part it needs")]
pub(crate) fn bench_manifests(n: usize) -> String {
    use std::fmt::Write as _;
    let mut yaml = String::new();
    for i in 0..n {
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
    yaml
}
