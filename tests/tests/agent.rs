//! The agent's run loop: what must keep answering while it programs the maps.
use std::{
    fs,
    time::{Duration, Instant},
};

use lb_tests::{Cluster, services_manifest, wait_for};

/// kubelet's probe of `/healthz` has a 1 s timeout. A cold sync of 50,000 Services takes seconds,
/// so it runs off the async runtime: `/healthz` must answer within 100 ms all the while.
#[test]
fn healthz_answers_within_100_ms_during_a_50000_service_sync() {
    const SERVICES: usize = 50_000;
    let mut c = Cluster::new("hzsync", 0);
    c.write_manifest("many.yaml", &services_manifest(0, SERVICES));
    let log = c.spawn_agent_with(&["--resync-seconds", "3600"]);
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    // The health listener is up before the first sync starts.
    wait_for(Duration::from_secs(30), || {
        read_log().contains("what=healthz addr=").then_some(())
    })
    .unwrap_or_else(|| panic!("no healthz listener:\n{}", read_log()));

    let started = Instant::now();
    let mut probes = Vec::new();
    while !read_log().contains("agent ready") {
        assert!(
            started.elapsed() < Duration::from_mins(10),
            "no sync in 10 minutes:\n{}",
            read_log()
        );
        let t = Instant::now();
        let r = c.http_get("healthz", "/healthz");
        let took = t.elapsed();
        assert!(r.starts_with("HTTP/1.1 "), "not an HTTP answer: {r}");
        probes.push(took);
        std::thread::sleep(Duration::from_millis(20));
    }
    let sync_took = started.elapsed();
    let text = read_log();
    assert!(
        text.contains(&format!("services={SERVICES}")),
        "the sync did not program all Services:\n{text}"
    );
    let worst = probes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} /healthz probes during a {:.2} s cold sync of {SERVICES} Services: worst {:.1} ms",
        probes.len(),
        sync_took.as_secs_f64(),
        worst.as_secs_f64() * 1e3
    );
    // The probes really overlapped the sync: many of them, over a sync that took a while.
    assert!(
        sync_took > Duration::from_millis(500) && probes.len() >= 10,
        "only {} probes in {sync_took:?}: the test did not overlap the sync",
        probes.len()
    );
    assert!(
        worst < Duration::from_millis(100),
        "/healthz took {worst:?} while the sync ran ({} probes)",
        probes.len()
    );
}

/// `kubeproxy_sync_proxy_rules_duration_seconds_count`: syncs so far.
fn syncs(c: &Cluster) -> u64 {
    let text = c.http_get("metrics", "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no sync count in /metrics:\n{text}")) as u64
}

/// The agent reads the manifest directory it watches: its own opens and reads must not count
/// as changes, or every sync would cause the next and an idle agent would never rest.
#[test]
fn an_idle_agent_does_not_sync_and_a_change_syncs_once() {
    let mut c = Cluster::new("idle", 0);
    c.write_manifest("a.yaml", &services_manifest(0, 20));
    c.start_agent_with(&["--resync-seconds", "3600"]);
    std::thread::sleep(Duration::from_millis(300));
    let settled = syncs(&c);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(syncs(&c), settled, "the agent synced with nothing changed");

    c.write_manifest("b.yaml", &services_manifest(20, 1));
    wait_for(Duration::from_secs(5), || {
        (syncs(&c) > settled).then_some(())
    })
    .expect("a change of the files was not synced");
    std::thread::sleep(Duration::from_millis(300));
    let after = syncs(&c);
    // A write-then-rename may land in one or two syncs, never in a stream of them.
    assert!(
        (settled + 1..=settled + 2).contains(&after),
        "{} syncs for one change",
        after - settled
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        syncs(&c),
        after,
        "the agent went on syncing after the change"
    );
}

/// An event-driven sync looks at the frontends of the Services that changed, and at nothing
/// else: one endpoint of one of 500 Services changes → one frontend looked at, its slot
/// rewritten, no other Service's entries touched.
#[test]
fn an_event_driven_sync_looks_only_at_what_changed() {
    let mut c = Cluster::new("scoped", 0);
    c.write_manifest("many.yaml", &services_manifest(0, 500));
    c.start_agent_with(&["--resync-seconds", "3600"]);
    let lines = |c: &Cluster| -> Vec<String> {
        c.agent_log()
            .lines()
            .filter(|l| l.contains("programmed datapath"))
            .map(str::to_owned)
            .collect()
    };
    let before = lines(&c).len();
    let field = |l: &str, k: &str| -> String {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {l}"))
            .to_owned()
    };
    // Service s7 loses one of its four endpoints (its own file, so the big one is unchanged).
    let one = services_manifest(7, 1).replace(", {addresses: [198.18.20.13]}", "");
    let many = services_manifest(0, 500).replace(&services_manifest(7, 1), "");
    c.write_manifest("many.yaml", &many);
    c.write_manifest("s7.yaml", &one);
    let line = wait_for(Duration::from_secs(10), || {
        let l = lines(&c);
        let last = l.last()?;
        (l.len() > before && field(last, "services") == "500").then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("no sync after the change:\n{}", c.agent_log()));
    assert_eq!(field(&line, "scoped"), "1", "frontends looked at: {line}");
    // Slot 4 goes, the count changes; the backend entry may go too: a handful, not 500.
    let ops: usize = field(&line, "ops").parse().expect("ops");
    assert!(
        (1..=4).contains(&ops),
        "{ops} map writes for one endpoint: {line}"
    );
}
