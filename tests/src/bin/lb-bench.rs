//! `cargo xtask bench`: socket-LB cost, measured side by side in one run.
//!
//! Lanes (same client namespace and cgroup, same single backend, rounds interleaved so machine
//! noise hits both alike): `direct` = connect to the backend's own address; `vip` = connect to
//! the `ClusterIP`, rewritten by `sock4_connect`. Each round is one closed-loop
//! connect + request + response + close client (`lbt loop`) for a fixed time.
//! Measured with 1 Service loaded, then with N Services × 4 endpoints, and the wall time from
//! writing the N-Service manifest to the agent reporting the datapath programmed.
use std::{
    fmt::Write as _,
    fs,
    time::{Duration, Instant},
};

use lb_tests::{Cluster, Value, pod_v4, service, slice, wait_for};

struct Args {
    services: usize,
    round_secs: f64,
    rounds: usize,
    /// Changes written to the API double for the latency measurement (0 = skip the API phase).
    api_changes: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        services: 10_000,
        round_secs: 1.0,
        rounds: 5,
        api_changes: 100,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).expect("flag value");
        match pair[0].as_str() {
            "--services" => a.services = val.parse().expect("--services"),
            "--round-secs" => a.round_secs = val.parse().expect("--round-secs"),
            "--rounds" => a.rounds = val.parse().expect("--rounds"),
            "--api-changes" => a.api_changes = val.parse().expect("--api-changes"),
            f => panic!("unknown flag {f}"),
        }
    }
    a
}

/// One round: connections completed per second.
fn rate(c: &Cluster, target: &str, secs: f64) -> f64 {
    let ms = (secs * 1000.0) as u64;
    let v: Vec<Value> = c.client(&["loop", target, &ms.to_string()]);
    let r = &v[0];
    assert_eq!(r["failed"], 0, "{target}: failures in a bench round: {r}");
    r["ok"].as_f64().expect("ok count") / secs
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// Interleaved rounds: direct, vip, direct, vip, … Returns (median direct, median vip, median
/// of per-round vip/direct ratios).
fn lanes(c: &Cluster, a: &Args) -> (f64, f64, f64) {
    let (mut d, mut v, mut r) = (Vec::new(), Vec::new(), Vec::new());
    // Warm-up round for each lane (page cache, ARP/ND, socket caches).
    rate(c, &format!("{}:8080", pod_v4(1)), 0.2);
    rate(c, "198.19.0.10:80", 0.2);
    for i in 0..a.rounds {
        // Alternate which lane goes first, so drift within a pair cancels out.
        let (x, y) = if i % 2 == 0 {
            let x = rate(c, &format!("{}:8080", pod_v4(1)), a.round_secs);
            (x, rate(c, "198.19.0.10:80", a.round_secs))
        } else {
            let y = rate(c, "198.19.0.10:80", a.round_secs);
            (rate(c, &format!("{}:8080", pod_v4(1)), a.round_secs), y)
        };
        eprintln!(
            "  round {}: direct {x:.0}/s  vip {y:.0}/s  ratio {:.3}",
            i + 1,
            y / x
        );
        d.push(x);
        v.push(y);
        r.push(y / x);
    }
    (median(&mut d), median(&mut v), median(&mut r))
}

/// N Services (VIPs 198.19.128.0 upwards) × 4 endpoints each, in one multi-document file.
fn many_services(n: usize) -> String {
    let mut s = String::with_capacity(n * 700);
    for i in 0..n {
        let vip = format!("198.19.{}.{}", 128 + i / 250, 1 + i % 250);
        let name = format!("svc-{i}");
        s.push_str(&service(&name, &[&vip], &[("http", 80, "TCP")]));
        s.push_str("---\n");
        let eps: Vec<String> = (0..4)
            .map(|k| {
                format!(
                    "198.18.{}.{}",
                    64 + (i * 4 + k) / 250 % 128,
                    1 + (i * 4 + k) % 250
                )
            })
            .collect();
        let eps: Vec<(&str, bool, bool, bool)> = eps
            .iter()
            .map(|e| (e.as_str(), true, true, false))
            .collect();
        s.push_str(&slice(
            &format!("{name}-1"),
            &name,
            "IPv4",
            &[("http", 8080, "TCP")],
            &eps,
        ));
        s.push_str("---\n");
    }
    s
}

/// Polls the pinned service map until the probe frontend (198.19.0.10:80/TCP) has `count`
/// backends; returns when it does.
fn wait_count(
    map: &aya::maps::HashMap<aya::maps::MapData, lb_common::Svc4Key, lb_common::SvcValue>,
    count: u16,
) {
    let key = lb_common::Svc4Key {
        address: [198, 19, 0, 10],
        dport: 80,
        backend_slot: 0,
        proto: 6,
        scope: 0,
        _pad: [0; 2],
    };
    let end = Instant::now() + Duration::from_secs(10);
    while map.get(&key, 0).map_or(true, |v| v.count != count) {
        assert!(Instant::now() < end, "change never reached the datapath");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The agent's resident set size in MiB.
fn agent_rss_mib(c: &Cluster) -> u64 {
    let pid = c.agent.as_ref().expect("agent").pid();
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Change written to the API double → visible in the pinned map: p50/p99 over `n` changes, with
/// `loaded` other Services × 4 endpoints in the API. Returns (p50 ms, p99 ms, max ms, RSS MiB).
fn api_latency(n: usize, loaded: usize) -> (f64, f64, f64, u64) {
    use lb_tests::apiserver::ApiServer;
    let mut c = Cluster::new("benchapi", 2);
    let api = ApiServer::start(&c.logs.path);
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n");
    let probe = |n: usize| {
        let eps: Vec<String> = (1..=n).map(pod_v4).collect();
        let eps: Vec<(&str, bool, bool, bool)> = eps
            .iter()
            .map(|e| (e.as_str(), true, true, false))
            .collect();
        [
            service("web", &["198.19.0.10"], &[("http", 80, "TCP")]),
            slice("web-1", "web", "IPv4", &[("http", 8080, "TCP")], &eps),
        ]
        .join("\n---\n")
    };
    api.apply_yaml(&probe(1));
    if loaded > 0 {
        api.apply_yaml(&many_services(loaded).replace("---\n", "\n---\n"));
    }
    c.kubeconfig = Some(api.kubeconfig.clone());
    c.start_agent();
    let map =
        aya::maps::MapData::from_pin(c.bpffs.path.join(lb_common::MAP_SVC4)).expect("pinned map");
    let map: aya::maps::HashMap<_, lb_common::Svc4Key, lb_common::SvcValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("hash map");
    wait_count(&map, 1);
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let want = if i % 2 == 0 { 2 } else { 1 };
        let t = Instant::now();
        api.apply_yaml(&probe(want));
        wait_count(&map, want as u16);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        // Space changes out so that each is its own sync (not coalesced with the next).
        std::thread::sleep(Duration::from_millis(30));
    }
    let rss = agent_rss_mib(&c);
    if let Some(line) = c
        .agent_log()
        .lines()
        .rfind(|l| l.contains("programmed datapath"))
    {
        eprintln!(
            "  last sync: {}",
            line.split("programmed datapath")
                .nth(1)
                .unwrap_or("")
                .trim()
        );
    }
    ms.sort_by(f64::total_cmp);
    (
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms[ms.len() - 1],
        rss,
    )
}

#[expect(
    clippy::too_many_lines,
    reason = "a linear benchmark script reads best top to bottom"
)]
fn main() {
    let a = parse_args();
    let mut c = Cluster::new("bench", 1);
    c.write_manifest(
        "web.yaml",
        &[
            service("web", &["198.19.0.10"], &[("http", 80, "TCP")]),
            slice(
                "web-1",
                "web",
                "IPv4",
                &[("http", 8080, "TCP")],
                &[(&pod_v4(1), true, true, false)],
            ),
        ]
        .join("---\n"),
    );
    c.start_agent();
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.10:80/TCP")
    })
    .expect("web programmed");

    eprintln!(
        "lane pair with 1 Service loaded ({} rounds × {} s each lane)",
        a.rounds, a.round_secs
    );
    let one = lanes(&c, &a);

    eprintln!(
        "programming {} Services × 4 endpoints from a manifest directory",
        a.services
    );
    let text = many_services(a.services);
    let log_before = c.agent_log().matches("programmed datapath").count();
    let t = Instant::now();
    c.write_manifest("many.yaml", &text);
    let line = wait_for(Duration::from_mins(2), || {
        let log = c.agent_log();
        (log.matches("programmed datapath").count() > log_before).then(|| {
            log.lines()
                .rfind(|l| l.contains("programmed datapath"))
                .unwrap_or("")
                .to_owned()
        })
    })
    .expect("agent programmed the Services");
    let program_wall = t.elapsed();
    let frontends = a.services + 1;
    assert!(
        line.contains(&format!("frontends={frontends}")),
        "partial programming: {line}"
    );
    let internal_us: u64 = line
        .split("elapsed_us=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let ops: u64 = line
        .split("ops=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    eprintln!("  {line}");

    eprintln!("lane pair with {frontends} Services loaded");
    let many = lanes(&c, &a);

    let rss_mib = agent_rss_mib(&c);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "| Services loaded | direct conn/s | via ClusterIP conn/s | ClusterIP ÷ direct (median of rounds) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    let _ = writeln!(md, "| 1 | {:.0} | {:.0} | {:.3} |", one.0, one.1, one.2);
    let _ = writeln!(
        md,
        "| {frontends} | {:.0} | {:.0} | {:.3} |",
        many.0, many.1, many.2
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Programming {} Services × 4 endpoints from a manifest directory: {:.0} ms wall (file written → maps complete), \
         of which read+parse+diff+apply inside the agent {:.0} ms; {ops} map writes; agent RSS {} MiB.",
        a.services,
        program_wall.as_secs_f64() * 1e3,
        internal_us as f64 / 1e3,
        rss_mib
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Conditions: one closed-loop TCP client (connect, 2-byte request, response, close), {} interleaved rounds of {} s per lane, client and backend in separate netns on one veth bridge, {} CPUs, kernel {}.",
        a.rounds,
        a.round_secs,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    if a.api_changes > 0 {
        drop(c);
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "| Kubernetes API source | change → datapath p50 | p99 | max | agent RSS |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for loaded in [0, a.services] {
            eprintln!(
                "API latency: {} changes with {loaded} other Services loaded",
                a.api_changes
            );
            let (p50, p99, max, rss) = api_latency(a.api_changes, loaded);
            let what = if loaded == 0 {
                "probe Service only".to_owned()
            } else {
                format!("probe + {loaded} Services × 4 endpoints")
            };
            let _ = writeln!(
                md,
                "| {what} | {p50:.1} ms | {p99:.1} ms | {max:.1} ms | {rss} MiB |"
            );
        }
        let _ = writeln!(
            md,
            "\nChange = an EndpointSlice of the probe Service updated in the API double (1 ↔ 2 endpoints), timed until the pinned map shows the new count; {} changes each, 30 ms apart.",
            a.api_changes
        );
    }
    println!("\n{md}");
}
