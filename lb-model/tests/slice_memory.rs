//! What one Service's slice costs the agent in a real cluster, counted exactly by a counting
//! allocator (this test binary's own, so that nothing else allocates while it counts).
mod common;

use common::footprint;

#[global_allocator]
static A: common::Counting = common::Counting;

/// A slice as the EndpointSlice controller writes it (its labels and annotation, every
/// endpoint's conditions, node, zone and Pod), as the agent keeps it from the API server
/// (without target references): what one Service's slice of 4 endpoints costs in a real
/// cluster, where the bench's plain slices understate it.
#[test]
fn a_real_clusters_slice_from_the_api_keeps_no_target_references() {
    const N: usize = 10_000;
    let slice = |i: usize| {
        let ep = |j: usize| {
            serde_json::json!({
                "addresses": [format!("198.18.{}.{}", 64 + j, 1 + i % 250)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", (i + j) % 100),
                "zone": format!("zone-{}", (i + j) % 3),
                "targetRef": {
                    "kind": "Pod", "namespace": "bench",
                    "name": format!("svc-{i}-7d9f8c6b5-{j:05}"),
                    "uid": format!("0b8f3a52-6c1e-4f0e-9d6a-{:012x}", i * 4 + j),
                },
            })
        };
        serde_json::json!({
            "metadata": {
                "name": format!("svc-{i}-x7k2p"), "namespace": "bench",
                "uid": format!("1c8f3a52-6c1e-4f0e-9d6a-{i:012x}"),
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {
                    "kubernetes.io/service-name": format!("svc-{i}"),
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T00:00:00Z"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": (0..4).map(ep).collect::<Vec<_>>(),
        })
    };
    let json: Vec<String> = (0..N).map(|i| slice(i).to_string()).collect();
    let f0 = footprint();
    let full: Vec<lb_model::k8s::discovery::EndpointSlice> = json
        .iter()
        .map(|j| serde_json::from_str(j).expect("slice"))
        .collect();
    let f1 = footprint();
    let kept: Vec<lb_model::k8s::discovery::EndpointSlice> = full
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.drop_target_refs();
            s
        })
        .collect();
    let f2 = footprint();
    let (with, without) = ((f1 - f0) / N, (f2 - f1) / N);
    eprintln!(
        "a real cluster's slice of 4 endpoints: {with} B with target references, {without} B as kept"
    );
    assert!(
        kept.iter()
            .all(|s| s.endpoints.iter().all(|e| e.target_ref.is_none()))
    );
    assert!(
        without <= 1_088,
        "{without} B per slice as kept, over its budget of 1,088 B"
    );
    assert!(
        with - without >= 400,
        "target references took only {} B",
        with - without
    );
}
