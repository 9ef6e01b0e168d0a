//! The standalone control plane (manifest mode) under load:
//!
//! * **Readiness flip → datapath**: 1,000 Services × 10 Pods selected by label, plus a probe
//!   Service whose second Pod turns Ready / not Ready; each flip is a rewrite of the probe's
//!   file, timed until the pinned service map shows the probe frontend's new backend count.
//! * **Cold start**: N Services each selecting 4 Pods (N × 4 Pods, no ClusterIP written: all
//!   allocated), written at once; wall time from the file written to the datapath programmed
//!   (the agent's own "programmed datapath" line with every frontend), and the agent's RSS.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use lb_tests::Cluster;

/// The control plane's flags: a service CIDR that holds every allocation of the bench.
const FLAGS: [&str; 2] = ["--service-cidr", "198.19.0.0/16"];

/// `n` Services named `svc-<i>` selecting `pods` Pods each (`app: svc-<i>`), Pod addresses in
/// 198.18.64.0/18 upwards, no ClusterIPs (allocated).
fn selector_services(n: usize, pods: usize) -> String {
    let mut s = String::with_capacity(n * (300 + pods * 330));
    for i in 0..n {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{selector: {{app: svc-{i}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
        );
        for k in 0..pods {
            let j = i * pods + k;
            let _ = write!(
                s,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{i}-{k}, namespace: bench, labels: {{app: svc-{i}}}}}\n\
                 spec: {{nodeName: node-a, containers: [{{name: c}}]}}\n\
                 status: {{phase: Running, podIP: 198.{}.{}.{}, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n",
                18 + (64 + j / 62_500) / 256 % 2,
                (64 + j / 250) % 256,
                1 + j % 250
            );
        }
    }
    s
}

/// The probe: Service `web` (ClusterIP 198.19.0.10) over Pods `web-a` (always Ready) and
/// `web-b` (Ready when `b_ready`).
fn probe(b_ready: bool) -> String {
    let pod = |name: &str, ip: &str, ready: bool| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: web}}}}\n\
             spec: {{nodeName: node-a, containers: [{{name: c}}]}}\n\
             status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: '{}'}}]}}\n",
            if ready { "True" } else { "False" }
        )
    };
    [
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: bench}\n\
         spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n"
            .to_owned(),
        pod("web-a", "198.18.0.11", true),
        pod("web-b", "198.18.0.12", b_ready),
    ]
    .join("---\n")
}

/// Pod readiness flip → pinned map: (p50 ms, p99 ms, max ms) over `flips`, with `services` ×
/// `pods` other Services loaded.
fn flips(n: usize, services: usize, pods: usize) -> (f64, f64, f64) {
    let mut c = Cluster::new("benchsa", 2);
    c.write_manifest("others.yaml", &selector_services(services, pods));
    c.write_manifest("web.yaml", &probe(false));
    c.start_agent_with(&FLAGS);
    let map = crate::svc4_map(&c);
    crate::wait_count(&map, 1);
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let ready = i % 2 == 0;
        let t = Instant::now();
        c.write_manifest("web.yaml", &probe(ready));
        crate::wait_count(&map, if ready { 2 } else { 1 });
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        // Each flip its own sync, not coalesced with the next.
        std::thread::sleep(Duration::from_millis(30));
    }
    crate::latency_summary(&c, ms)
}

/// Cold start: (wall ms from the file written to the datapath programmed, the agent's sync
/// line, RSS MiB).
fn cold(services: usize, pods: usize) -> (f64, String, u64) {
    let mut c = Cluster::new("benchsc", 1);
    c.start_agent_with(&FLAGS);
    let text = selector_services(services, pods);
    let (took, line) = crate::program(&c, "many.yaml", &text, Duration::from_mins(5));
    let wall = took.as_secs_f64() * 1e3;
    assert!(
        line.contains(&format!("frontends={services} ")),
        "partial programming: {line}"
    );
    let rss = crate::agent_rss_mib(&c);
    (wall, line, rss)
}

/// The section of the report.
pub fn bench(flip_count: usize, cold_services: usize) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Standalone control plane (manifest mode)\n");
    if flip_count > 0 {
        eprintln!("standalone: {flip_count} readiness flips with 1,000 Services × 10 Pods loaded");
        let (p50, p99, max) = flips(flip_count, 1000, 10);
        let _ = writeln!(
            md,
            "Pod readiness flip (file written) → pinned map, 1,000 Services × 10 Pods selected by label \
             loaded: p50 **{p50:.1} ms**, p99 **{p99:.1} ms**, max {max:.1} ms ({flip_count} flips, 30 ms apart)."
        );
    }
    if cold_services > 0 {
        eprintln!(
            "standalone: cold start, {cold_services} Services selecting {} Pods",
            cold_services * 4
        );
        let (wall, line, rss) = cold(cold_services, 4);
        let field = |f: &str| {
            line.split(&format!("{f}="))
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1e3
        };
        let _ = writeln!(
            md,
            "\nCold start, {cold_services} Services selecting {} Pods (4 each, every ClusterIP allocated): \
             **{:.2} s** wall from the file written to the datapath programmed (inside the agent: read + parse + \
             control plane {:.0} ms, model {:.0} ms, diff {:.0} ms); agent RSS **{rss} MiB**.",
            cold_services * 4,
            wall / 1e3,
            field("source_us"),
            field("model_us"),
            field("diff_us"),
        );
    }
    md
}
