//! The agent's life on a node: restarts under load, pins, cleanup, failing loudly, the least
//! privileges, and adopting what an earlier agent wrote.
use std::{process::Command, time::Duration};

use lb_tests::{
    Cluster, Value, pod_v4, pod_v6, service, slice,
    web::{VIP4, eps, ready, tally, time_until, write_web},
};

#[test]
fn agent_kill9_and_restart_under_a_connect_loop_loses_no_connection() {
    let mut c = Cluster::new("restart", 2);
    write_web(&c, &ready(2));
    c.start_agent();
    let before = c.inspect("services");

    let lp = c.client_bg(&["loop", &format!("{VIP4}:80"), "4000"]);
    std::thread::sleep(Duration::from_millis(600));
    c.kill_agent();
    std::thread::sleep(Duration::from_millis(600));
    c.start_agent();
    std::thread::sleep(Duration::from_millis(300));
    c.kill_agent();
    c.start_agent();
    let out = lp.wait_with_output().expect("loop");
    let v: Value = serde_json::from_slice(&out.stdout).expect("loop JSON");
    assert_eq!(
        v["failed"],
        0,
        "connections failed across restarts: {v}\n{}",
        c.agent_log()
    );
    assert!(
        v["ok"].as_u64().unwrap() > 100,
        "too few connections to mean anything: {v}"
    );

    // The restarted agent adopted the maps: nothing was rewritten, nothing duplicated.
    assert_eq!(c.inspect("services"), before);
    let log = c.agent_log();
    assert_eq!(
        log.matches("programmed datapath").count(),
        1,
        "only the first agent should write:\n{log}"
    );
    let attached = lb_tests::attached_hooks(&c.cgroup.path);
    let lines = attached.lines().filter(|l| l.contains("sock")).count();
    assert_eq!(
        lines, 8,
        "exactly one program per hook after handovers:\n{attached}"
    );
}

#[test]
fn maps_are_pinned_with_btf_and_cleanup_removes_everything() {
    let mut c = Cluster::new("pins", 1);
    write_web(&c, &ready(1));
    // The counters map of an older build, as an upgrade finds it: unpinned by the new agent.
    std::fs::create_dir_all(&c.bpffs.path).expect("bpffs dir");
    let old = c.bpffs.path.join("LB_STATS_V2");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "20",
        ])
        .args(["name", "LB_STATS_V2"])
        .output()
        .expect("bpftool");
    assert!(made.status.success(), "{made:?}");
    c.start_agent();
    assert!(!old.exists(), "superseded map still pinned");
    for name in lb_common::ALL_MAPS {
        assert!(c.bpffs.path.join(name).exists(), "map {name} not pinned");
    }
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(c.bpffs.path.join(lb_common::MAP_SVC4))
        .output()
        .expect("bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "\"address\": [198,19,0,10",
        "\"dport\": 80",
        "\"backend_slot\"",
        "\"count\": 1",
        "\"backend_id\"",
    ] {
        assert!(
            dump.contains(field),
            "bpftool dump lacks {field:?} (BTF field names):\n{dump}"
        );
    }
    let be = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(c.bpffs.path.join(lb_common::MAP_BE4))
        .output()
        .expect("bpftool");
    assert!(String::from_utf8_lossy(&be.stdout).contains("\"port\": 8080"));

    c.kill_agent();
    c.cleanup();
    assert!(!c.bpffs.path.exists(), "pins left behind");
    let attached = lb_tests::attached_hooks(&c.cgroup.path);
    assert!(!attached.contains("sock"), "hooks left attached");
    let r = &c.client(&["tcp", &format!("{VIP4}:80"), "1"])[0];
    assert_eq!(
        r["error"], "ENETUNREACH",
        "after cleanup the VIP is no longer translated: {r}"
    );
}

/// Removes a pin made by a test.
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn cleanup_detaches_hooks_kept_alive_outside_our_pins() {
    let mut c = Cluster::new("orphan", 1);
    write_web(&c, &ready(1));
    c.start_agent();
    c.kill_agent();
    // Another holder of one of our links (a second pin made by some other tool): removing our
    // pins alone would leave that hook attached.
    let show = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(c.bpffs.path.join("links/sock4_connect"))
        .output()
        .expect("bpftool");
    let id = serde_json::from_slice::<Value>(&show.stdout).expect("link JSON")["id"]
        .as_u64()
        .expect("link id");
    let extra = std::path::PathBuf::from(format!("/sys/fs/bpf/lbt-{}-extra", c.tag));
    lb_tests::sh(&format!("bpftool link pin id {id} {}", extra.display()));
    let _extra = Unpin(extra);

    let cleaned = c.cleanup();
    assert!(cleaned.contains("detached 1 unpinned hooks"), "{cleaned}");
    let attached = lb_tests::attached_hooks(&c.cgroup.path);
    assert!(
        !attached.contains("sock"),
        "hooks left attached: {attached}"
    );
}

#[test]
fn run_fails_loudly_when_it_cannot_load_or_attach() {
    lb_tests::require_privileges();
    lb_tests::ensure_bpffs();
    let tag = format!("lbt-fail-{}", std::process::id());
    let manifests = lb_tests::TempDir::new(&format!("{tag}-m"));
    let run = |extra: &[&str]| {
        let out = Command::new(lb_tests::lb_agent())
            .args(["run", "--manifests"])
            .arg(&manifests.path)
            .args(["--nodeport-interfaces", "none"])
            .args(extra)
            .env("NO_COLOR", "1")
            .output()
            .expect("spawn lb-agent");
        assert!(!out.status.success(), "lb-agent {extra:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bpffs = format!("/sys/fs/bpf/{tag}");
    let _pins = lb_tests::Bpffs::new(&bpffs, &lb_tests::cgroup2_root().join("does-not-exist"));
    let err = run(&["--cgroup", "/nonexistent/cgroup", "--bpffs", &bpffs]);
    assert!(
        err.contains("cannot open cgroup /nonexistent/cgroup"),
        "{err}"
    );
    let not_bpf = lb_tests::TempDir::new(&format!("{tag}-notbpf"));
    let cg = lb_tests::Cgroup::new(&tag);
    let err = run(&[
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--bpffs",
        not_bpf.path.to_str().unwrap(),
    ]);
    assert!(err.contains("not on a BPF filesystem"), "{err}");
    // A map of another layout pinned under our name: refuse to adopt it, touch nothing.
    std::fs::create_dir_all(&bpffs).expect("mkdir bpffs dir");
    lb_tests::sh(&format!(
        "bpftool map create {bpffs}/LB4_SVC_V1 type hash key 4 value 4 entries 8 name LB4_SVC_V1"
    ));
    let err = run(&["--cgroup", cg.path.to_str().unwrap(), "--bpffs", &bpffs]);
    assert!(
        err.contains(
            "map LB4_SVC_V1: pinned map has key/value size (4, 4), this build expects (12, 12)"
        ),
        "{err}"
    );
    assert!(
        std::path::Path::new(&format!("{bpffs}/LB4_SVC_V1")).exists(),
        "the foreign pin is left alone"
    );
    let attached = lb_tests::attached_hooks(&cg.path);
    assert!(attached.trim().is_empty(), "nothing attached on failure");
}

#[test]
fn runs_with_only_cap_bpf_and_cap_net_admin() {
    // As deploy/daemonset.yaml grants: uid 0, bounding set {CAP_BPF, CAP_NET_ADMIN}.
    let mut c = Cluster::new("caps", 1);
    write_web(&c, &ready(1));
    c.agent_prefix = ["setpriv", "--bounding-set=-all,+bpf,+net_admin"]
        .map(String::from)
        .to_vec();
    c.start_agent();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", c.agent.as_ref().unwrap().pid()))
            .expect("status");
    let eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .expect("CapEff");
    // CAP_NET_ADMIN = 12, CAP_BPF = 39.
    assert_eq!(
        eff.split_whitespace().nth(1),
        Some("0000008000001000"),
        "{eff}"
    );
    let t = tally(&c.client(&["tcp", &format!("{VIP4}:80"), "5"]));
    assert_eq!(t.get("b1"), Some(&5));
    assert_eq!(c.client(&["udp", &format!("{VIP4}:53"), "2"]).len(), 2);

    // Each of the two is necessary.
    for (caps, why) in [
        ("+bpf", "Operation not permitted"),
        ("+net_admin", "Operation not permitted"),
    ] {
        let dir = format!(
            "/sys/fs/bpf/lbt-caps-{}-{}",
            caps.trim_start_matches('+'),
            std::process::id()
        );
        let _pins = lb_tests::Bpffs::new(&dir, &c.cgroup.path);
        let out = Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg(lb_tests::lb_agent())
            .args(["run", "--manifests"])
            .arg(&c.manifests.path)
            .args(["--nodeport-interfaces", "none"])
            .arg("--cgroup")
            .arg(&c.cgroup.path)
            .args([
                "--bpffs",
                &dir,
                "--metrics-addr",
                "127.0.0.1:0",
                "--healthz-addr",
                "127.0.0.1:0",
            ])
            .output()
            .expect("spawn");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "with only {caps}: {err}"
        );
    }
}

/// 300 dual-stack Services: runs of hundreds of puts per map, which the agent writes with
/// `BPF_MAP_UPDATE_BATCH`. Every entry must land where one-by-one writes would put it: the
/// Services answer, `inspect` reads them back, and a restarted agent adopts them with nothing
/// to rewrite.
#[test]
fn hundreds_of_services_written_in_batches_read_back_and_adopt_exactly() {
    const N: usize = 300;
    let mut c = Cluster::new("batch", 2);
    let vip4 = |i: usize| format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250);
    let vip6 = |i: usize| format!("2001:db8:f::1:{i:x}");
    let manifests = |backends: usize| {
        let v4: Vec<(String, bool, bool, bool)> = (1..=backends)
            .map(|b| (pod_v4(b), true, true, false))
            .collect();
        let v6: Vec<(String, bool, bool, bool)> = (1..=backends)
            .map(|b| (pod_v6(b), true, true, false))
            .collect();
        let ports = [("http", 8080, "TCP")];
        (0..N)
            .flat_map(|i| {
                let name = format!("s{i}");
                let (a4, a6) = (vip4(i), vip6(i));
                [
                    service(&name, &[&a4, &a6], &[("http", 80, "TCP")]),
                    slice(&format!("{name}-4"), &name, "IPv4", &ports, &eps(&v4)),
                    slice(&format!("{name}-6"), &name, "IPv6", &ports, &eps(&v6)),
                ]
            })
            .collect::<Vec<_>>()
            .join("---\n")
    };
    c.write_manifest("many.yaml", &manifests(2));
    c.start_agent();
    let log = c.agent_log();
    assert!(
        log.contains(&format!("frontends={} ", 2 * N)),
        "one sync for all:\n{log}"
    );
    assert!(
        !log.contains("one by one"),
        "this kernel has batched updates:\n{log}"
    );
    let services = c.inspect("services");
    let listed = services.as_array().expect("services array");
    assert_eq!(listed.len(), 2 * N, "every frontend reads back");
    let mut two = vec![format!("{}:8080", pod_v4(1)), format!("{}:8080", pod_v4(2))];
    two.sort();
    assert_eq!(c.backends_of(&format!("{}:80/TCP", vip4(N - 1))), Some(two));
    assert_eq!(
        c.backends_of(&format!("[{}]:80/TCP", vip6(N - 1)))
            .map(|b| b.len()),
        Some(2)
    );
    for target in [
        format!("{}:80", vip4(0)),
        format!("{}:80", vip4(N - 1)),
        format!("[{}]:80", vip6(0)),
        format!("[{}]:80", vip6(N - 1)),
    ] {
        let t = tally(&c.client(&["tcp", &target, "6"]));
        assert_eq!(t.values().sum::<usize>(), 6, "{target}: {t:?}");
    }

    // Adoption reads every batched entry back: nothing to rewrite.
    c.kill_agent();
    c.start_agent();
    assert_eq!(c.inspect("services"), services);
    let log = c.agent_log();
    assert_eq!(
        log.matches("programmed datapath").count(),
        1,
        "the restarted agent found the maps exactly as wanted:\n{log}"
    );

    // One endpoint fewer everywhere: a batch of rewritten slots, deletes one by one.
    c.write_manifest("many.yaml", &manifests(1));
    let took = time_until(
        &c,
        &format!("{}:80/TCP", vip4(N - 1)),
        &[format!("{}:8080", pod_v4(1))],
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        c.backends_of(&format!("[{}]:80/TCP", vip6(0))),
        Some(vec![format!("[{}]:8080", pod_v6(1))])
    );
    let t = tally(&c.client(&["tcp", &format!("{}:80", vip4(N / 2)), "4"]));
    assert_eq!(t.get("b1"), Some(&4), "{t:?}");
}
