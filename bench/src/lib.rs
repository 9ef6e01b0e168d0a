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

/// Prints the agent's last "programmed datapath" line (its per-phase timings).
pub fn print_last_sync(c: &Cluster) {
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
    print_last_sync(c);
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
/// the bed's agent that ran (its programs: those using the bed's pinned stats map).
pub fn hook_costs(c: &Cluster, work: impl FnOnce()) -> Vec<(String, u64, f64)> {
    // Every socket hook counts into the stats map (the reverse hooks use no service map).
    let stats_map = aya::maps::MapData::from_pin(c.bpffs.path.join(lb_common::MAP_STATS))
        .and_then(|m| m.info())
        .expect("the bed's pinned stats map")
        .id();
    let sample = || -> std::collections::BTreeMap<(u32, String), (u64, u64)> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.contains(&stats_map))
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

/// Mean of `v` and the half-width of its 95 % confidence interval (Student's t, n − 1 degrees
/// of freedom; NaN half-width for fewer than two samples).
#[must_use]
pub fn mean_ci95(v: &[f64]) -> (f64, f64) {
    // t(0.975, df) for df = 1..=30; beyond, the normal 1.96 is within 2 %.
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

/// One scale of the growth table.
pub struct GrowthRow {
    pub services: usize,
    /// Cold programming from a manifest directory, wall seconds.
    pub cold_s: f64,
    /// Agent RSS after it.
    pub rss_mib: u64,
    /// `sock4_connect` run time per call.
    pub connect_ns: f64,
    /// One change through the API double → pinned map, p99.
    pub p99_ms: f64,
    /// Agent RSS in that run.
    pub api_rss_mib: u64,
    /// From the API: agent started → every Service programmed, wall seconds (program load
    /// and attach, the watches' lists, the first sync).
    pub api_start_s: f64,
}

/// One line of a chart: its label, colour and points.
pub type Line = (String, plotters::style::RGBColor, Vec<(f64, f64)>);

/// A line chart against the Service count (log scale from `x_from` to 1.5 × `x_max`; y from 0
/// to `ymax`), written to `path` as SVG. Lines without points are left out.
pub fn line_chart(
    path: &std::path::Path,
    title: &str,
    (x_from, x_max): (f64, f64),
    ymax: f64,
    lines: &[Line],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x_from..x_max * 1.5).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("Services × 4 endpoints")
        .draw()?;
    for (label, color, pts) in lines.iter().filter(|l| !l.2.is_empty()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The growth chart (`growth.svg` in `dir`): agent RSS, cold programming time (manifests),
/// agent start → programmed (API) and one-change p99 against the Service count.
pub fn growth_chart(rows: &[GrowthRow], dir: &std::path::Path) -> Option<std::path::PathBuf> {
    use plotters::style::{BLACK, BLUE, GREEN, MAGENTA, RED};
    let path = dir.join("growth.svg");
    let max_n = rows.iter().map(|r| r.services).max()? as f64;
    let pts = |f: &dyn Fn(&GrowthRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.services as f64, f(r))).collect()
    };
    let lines: [Line; 5] = [
        (
            "agent RSS, manifests (MiB)".into(),
            BLUE,
            pts(&|r| r.rss_mib as f64),
        ),
        (
            "agent RSS, API (MiB)".into(),
            GREEN,
            pts(&|r| r.api_rss_mib as f64),
        ),
        (
            "cold programming, manifests (×100 ms)".into(),
            RED,
            pts(&|r| r.cold_s * 10.0),
        ),
        (
            "agent start → programmed, API (×100 ms)".into(),
            MAGENTA,
            pts(&|r| r.api_start_s * 10.0),
        ),
        ("change → map p99 (ms)".into(), BLACK, pts(&|r| r.p99_ms)),
    ];
    let ymax = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1))
        .fold(1.0_f64, f64::max)
        * 1.1;
    match line_chart(
        &path,
        "How the agent's costs grow",
        (500.0, max_n),
        ymax,
        &lines,
    ) {
        Ok(()) => Some(path),
        Err(e) => {
            eprintln!("chart growth.svg: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mean_ci95;

    #[test]
    fn confidence_interval_of_a_known_sample() {
        // Mean 2, sample variance 2/3, n = 4: half-width t(3) × √(2/3) / √4.
        let (m, h) = mean_ci95(&[1.0, 2.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12);
        let sd = (2.0f64 / 3.0).sqrt();
        assert!((h - 3.182 * sd / 2.0).abs() < 1e-9, "{h}");
        assert!(mean_ci95(&[5.0]).1.is_nan());
        // Beyond 31 samples the normal quantile; identical samples: no width.
        let (m, h) = mean_ci95(&[0.5; 40]);
        assert!((m - 0.5).abs() < 1e-12 && h.abs() < 1e-12, "{m} {h}");
        let (_, h) = mean_ci95(&(0..40).map(f64::from).collect::<Vec<_>>());
        let sd = (40.0f64 * 41.0 / 12.0).sqrt();
        assert!((h - 1.96 * sd / 40f64.sqrt()).abs() < 1e-9, "{h}");
    }
}
