//! The benchmark behind `cargo xtask bench` (binary `lb-bench`): lanes measured side by side in
//! one run, on the test beds of `lb-tests`.
//!
//! * [`kpbench`]: lb against kube-proxy's own rule shapes at 100–50,000 Services;
//! * [`dns`]: cluster DNS against knot, unbound and dnsmasq with dnsperf;
//! * [`standalone`]: the manifest mode's control plane (Pod readiness → datapath, cold start);
//! * [`kubeproxy`]: those rule shapes (iptables and nftables modes), generated as kube-proxy
//!   writes them.
pub mod dns;
pub mod kpbench;
pub mod kubeproxy;
pub mod standalone;

use std::{
    fs,
    time::{Duration, Instant},
};

use lb_tests::Cluster;

/// The bed's pinned IPv4 service map.
#[must_use]
pub fn svc4_map(
    c: &Cluster,
) -> aya::maps::HashMap<aya::maps::MapData, lb_common::Svc4Key, lb_common::SvcValue> {
    let map =
        aya::maps::MapData::from_pin(c.bpffs.path.join(lb_common::MAP_SVC4)).expect("pinned map");
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("hash map")
}

/// Polls the pinned service map until the probe frontend (198.19.0.10:80/TCP) has `count`
/// backends; returns when it does.
pub fn wait_count(
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
pub fn agent_rss_mib(c: &Cluster) -> u64 {
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

/// The `p` quantile of sorted samples.
#[must_use]
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Change → datapath samples (ms) as (p50, p99, max), after printing the agent's last sync
/// line (its per-phase timings).
#[must_use]
pub fn latency_summary(c: &Cluster, mut ms: Vec<f64>) -> (f64, f64, f64) {
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
    )
}

/// Writes manifest `file` and waits (at most `timeout`) for the agent's next "programmed
/// datapath" line: the wall time from the write, and that line (its per-phase timings).
pub fn program(c: &Cluster, file: &str, text: &str, timeout: Duration) -> (Duration, String) {
    let before = c.agent_log().matches("programmed datapath").count();
    let t = Instant::now();
    c.write_manifest(file, text);
    let line = lb_tests::wait_for(timeout, || {
        let log = c.agent_log();
        (log.matches("programmed datapath").count() > before).then(|| {
            log.lines()
                .rfind(|l| l.contains("programmed datapath"))
                .unwrap_or("")
                .to_owned()
        })
    })
    .expect("agent programmed the Services");
    (t.elapsed(), line)
}

/// Run time per call of the socket hooks (`sock4_connect`, …) while `work` runs, from the
/// kernel's own accounting (`BPF_ENABLE_STATS`: on only while this holds its fd, so nothing
/// else on the machine pays for it). Returns (program, calls, ns per call) for every hook of
/// the bed's agent that ran (its programs: those using the bed's pinned service map).
pub fn hook_costs(c: &Cluster, work: impl FnOnce()) -> Vec<(String, u64, f64)> {
    let svc_map = aya::maps::MapData::from_pin(c.bpffs.path.join(lb_common::MAP_SVC4))
        .and_then(|m| m.info())
        .expect("the bed's pinned service map")
        .id();
    let sample = || -> std::collections::BTreeMap<(u32, String), (u64, u64)> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.contains(&svc_map))
            })
            .filter_map(|p| {
                let name = p.name_as_str()?.to_owned();
                name.starts_with("sock").then(|| {
                    (
                        (p.id(), name),
                        (p.run_count(), p.run_time().as_nanos() as u64),
                    )
                })
            })
            .collect()
    };
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (run time)");
    let before = sample();
    work();
    let after = sample();
    let mut out: Vec<(String, u64, f64)> = after
        .into_iter()
        .filter_map(|((id, name), (n, t))| {
            let (n0, t0) = before.get(&(id, name.clone())).copied().unwrap_or((0, 0));
            let calls = n - n0;
            (calls > 0).then(|| (name, calls, (t - t0) as f64 / calls as f64))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
