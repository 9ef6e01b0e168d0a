//! The kube-proxy-shapes benchmark (`cargo xtask bench`): connections through a ClusterIP with
//! `lb`'s socket-LB, with kube-proxy's iptables-mode rules (iptables-nft and iptables-legacy)
//! and nftables-mode rules, and straight to the backend, at several Service counts, side by side
//! in one run with the rounds interleaved.
//!
//! Every lane has a bed of its own, built alike (all inside namespaces this creates):
//! ```text
//! client 198.18.10.2 ── node 198.18.10.1 | 198.18.20.1 ── backend 198.18.20.10-13 (:8080)
//! ```
//! The client routes the Service range (198.19.0.0/16) and the backends via the node; the rules
//! of the rule lanes live in the node namespace (PREROUTING DNAT, as on a kube-proxy node);
//! `lb`'s client runs in a cgroup with the socket hooks (its connect() goes to the backend,
//! through the same node). Every Service has 4 endpoints (the same 4 backend addresses); the
//! probed Service is placed first, in the middle and last in rule order.
use std::{
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::Value;

use crate::kubeproxy;

use lb_tests::{
    Bpffs, Cgroup, Netns, Proc, TempDir, command_in, ensure_bpffs, lb_agent, lbt,
    require_privileges, services_manifest as manifests, sh, vip, wait_for,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Opts {
    pub scales: Vec<usize>,
    pub rounds: usize,
    pub round_secs: f64,
    pub threads: usize,
    /// Largest Service count the nftables lane is loaded with: `nft -f` (nftables 1.0.6 here)
    /// grows superlinearly with the ruleset (measured: 2,500 Services 1.1 s, 5,000 5.1 s,
    /// 10,000 45 s), so 50,000 would take the better part of an hour.
    pub nft_max: usize,
    /// The rule lanes to run (direct and lb always run): all of them by default. Without the
    /// rule lanes, many rounds of lb against direct fit in a few minutes.
    pub rule_lanes: Vec<Lane>,
}

/// A lane: one way of reaching the Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Lane {
    Direct,
    SocketLb,
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Lane {
    pub const RULES: [Self; 3] = [Self::IptablesNft, Self::IptablesLegacy, Self::Nftables];

    /// The rule lane named on the command line: `iptables-nft`, `iptables-legacy`, `nftables`.
    #[must_use]
    pub fn rule_lane(name: &str) -> Option<Self> {
        match name {
            "iptables-nft" => Some(Self::IptablesNft),
            "iptables-legacy" => Some(Self::IptablesLegacy),
            "nftables" => Some(Self::Nftables),
            _ => None,
        }
    }

    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to backend",
            Self::SocketLb => "lb socket-LB",
            Self::IptablesNft => "kube-proxy iptables (nft)",
            Self::IptablesLegacy => "kube-proxy iptables (legacy)",
            Self::Nftables => "kube-proxy nftables",
        }
    }
}

/// Probe positions in rule order.
const POSITIONS: [&str; 3] = ["first", "middle", "last"];

fn probe_index(pos: &str, n: usize) -> usize {
    match pos {
        "first" => 0,
        "middle" => n / 2,
        _ => n - 1,
    }
}

/// One bed (see the module docs).
struct Bed {
    client: Netns,
    node: Netns,
    _backend: Netns,
    _server: Proc,
}

impl Bed {
    fn new(tag: &str) -> Self {
        let client = Netns::new(&format!("{tag}-c"));
        let node = Netns::new(&format!("{tag}-n"));
        let backend = Netns::new(&format!("{tag}-b"));
        sh(&format!(
            "ip -n {n} link add c0 type veth peer name eth0 netns {c} && \
             ip -n {n} link add b0 type veth peer name eth0 netns {b} && \
             ip -n {n} addr add 198.18.10.1/24 dev c0 && ip -n {n} addr add 198.18.20.1/24 dev b0 && \
             ip -n {n} link set c0 up && ip -n {n} link set b0 up && \
             ip -n {c} addr add 198.18.10.2/24 dev eth0 && ip -n {c} link set eth0 up && \
             ip -n {c} route add 198.19.0.0/16 via 198.18.10.1 && \
             ip -n {c} route add 198.18.20.0/24 via 198.18.10.1 && \
             ip -n {b} addr add 198.18.20.10/24 dev eth0 && ip -n {b} addr add 198.18.20.11/24 dev eth0 && \
             ip -n {b} addr add 198.18.20.12/24 dev eth0 && ip -n {b} addr add 198.18.20.13/24 dev eth0 && \
             ip -n {b} link set eth0 up && ip -n {b} route add 198.18.10.0/24 via 198.18.20.1 && \
             ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1",
            n = node.name,
            c = client.name,
            b = backend.name,
        ));
        let server = lb_tests::serve(&backend, "b", "tcp", "0.0.0.0:8080");
        Self {
            client,
            node,
            _backend: backend,
            _server: server,
        }
    }

    fn node_sh(&self, cmd: &str) -> Duration {
        let t = Instant::now();
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.node.name));
        t.elapsed()
    }
}

/// The `lb` agent of the socket-LB lane, with its cgroup, pins and manifest directory.
struct Agent {
    proc: Option<Proc>,
    _bpffs: Bpffs,
    cgroup: Cgroup,
    manifests: TempDir,
    log: PathBuf,
    _logs: TempDir,
}

impl Agent {
    fn start(tag: &str) -> Self {
        let cgroup = Cgroup::new(tag);
        let bpffs = Bpffs::new(&format!("/sys/fs/bpf/{tag}"), &cgroup.path);
        let manifests = TempDir::new(&format!("{tag}-m"));
        let logs = TempDir::new(&format!("{tag}-l"));
        let log = logs.path.join("agent.log");
        let f = File::create(&log).expect("log");
        let child = Command::new(lb_agent())
            .args(["run", "--manifests"])
            .arg(&manifests.path)
            .arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--bpffs")
            .arg(&bpffs.path)
            .args(["--node-name", "bench", "--nodeport-interfaces", "none"])
            .arg("--state-file")
            .arg(logs.path.join("state.json"))
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--healthz-addr",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn lb-agent");
        let a = Self {
            proc: Some(Proc { child }),
            _bpffs: bpffs,
            cgroup,
            manifests,
            log,
            _logs: logs,
        };
        wait_for(Duration::from_secs(20), || {
            fs::read_to_string(&a.log)
                .ok()
                .filter(|l| l.contains("agent ready"))
        })
        .expect("lb-agent ready");
        a
    }

    fn syncs(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("programmed datapath")
            .count()
    }

    /// Writes `file` and waits until a sync reports `frontends` frontends; the wall time.
    fn program(&self, file: &str, yaml: &str, frontends: usize) -> Duration {
        let tmp = self.manifests.path.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("write manifest");
        let t = Instant::now();
        fs::rename(&tmp, self.manifests.path.join(file)).expect("rename");
        let want = format!("frontends={frontends} ");
        wait_for(Duration::from_mins(5), || {
            fs::read_to_string(&self.log)
                .ok()?
                .lines()
                .rev()
                .find(|l| l.contains("programmed datapath"))
                .filter(|l| l.contains(&want))
                .map(|_| ())
        })
        .unwrap_or_else(|| panic!("lb never programmed {frontends} frontends"));
        t.elapsed()
    }

    fn rss_mib(&self) -> u64 {
        let pid = self.proc.as_ref().map_or(0, Proc::pid);
        fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    }
}

/// `n` Services × 4 endpoints as manifests, from index `from`.
/// Busy CPU time of the whole machine so far, in microseconds (`/proc/stat`).
fn cpu_busy_us() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …, in USER_HZ (100/s) ticks.
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy * 10_000
}

/// One round of one lane: connections/s, connect p50/p99 µs, machine CPU µs per connection.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub conn_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_us_per_conn: f64,
}

fn measure(ns: &Netns, cgroup: Option<&Cgroup>, target: &str, o: &Opts) -> Sample {
    let ms = ((o.round_secs * 1000.0) as u64).to_string();
    let cpu0 = cpu_busy_us();
    let out = command_in(ns, cgroup, &lbt())
        .args(["load", target, &ms, &o.threads.to_string()])
        .output()
        .expect("run lbt load");
    let cpu = cpu_busy_us().saturating_sub(cpu0);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lbt load {target}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        v["failed"], 0,
        "{target}: failed connections in a round: {v}"
    );
    let ok = v["ok"].as_f64().expect("ok");
    Sample {
        conn_per_s: ok / o.round_secs,
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
        p99_us: v["p99_us"].as_f64().unwrap_or(0.0),
        cpu_us_per_conn: if ok > 0.0 { cpu as f64 / ok } else { 0.0 },
    }
}

/// Medians of a lane at one position and scale.
#[derive(Clone, Debug, Serialize)]
pub struct LaneResult {
    pub scale: usize,
    pub lane: Lane,
    pub position: &'static str,
    pub conn_per_s: f64,
    /// Median over rounds of (this lane ÷ direct, same round).
    pub ratio_to_direct: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_us_per_conn: f64,
    pub samples: Vec<Sample>,
}

/// Programming times at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct Programming {
    pub scale: usize,
    pub lane: Lane,
    pub cold_ms: f64,
    pub add_one_ms: f64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub lanes: Vec<LaneResult>,
    pub programming: Vec<Programming>,
    /// (scale, agent RSS MiB, BPF map memory MiB).
    pub lb_memory: Vec<(usize, u64, f64)>,
    /// Lanes that could not run here, with the reason.
    pub unavailable: Vec<(String, String)>,
    pub conditions: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// IPVS, detected: the kernel must have the `ip_vs` module (built in or loadable).
fn ipvs_unavailable() -> Option<String> {
    if Path::new("/proc/net/ip_vs").exists() || Path::new("/sys/module/ip_vs").exists() {
        return None;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let m = Command::new("modprobe").arg("ip_vs").output();
    match m {
        Ok(o) if o.status.success() && Path::new("/sys/module/ip_vs").exists() => None,
        Ok(o) => Some(format!(
            "kernel {release} has no ip_vs (no /proc/net/ip_vs; modprobe ip_vs: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!(
            "kernel {release} has no ip_vs (no /proc/net/ip_vs, /sys/module/ip_vs; modprobe: {e})"
        )),
    }
}

/// BPF map memory of the pinned `lb` maps (`bpftool map show`: `bytes_memlock`), MiB.
fn lb_map_mib() -> f64 {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .ok();
    let v: Value = out
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null);
    let bytes: u64 = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("LB") && n.contains("_V"))
        })
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum();
    bytes as f64 / (1024.0 * 1024.0)
}

/// Loads `n` of `svcs` into a rule lane's node (cold, from empty), then the last of `svcs` the
/// way kube-proxy adds one Service; the two wall times.
fn program_rules(
    lane: Lane,
    bed: &Bed,
    svcs: &[kubeproxy::SvcSpec],
    n: usize,
    dir: &Path,
) -> (Duration, Duration) {
    let cidr = "198.18.0.0/15";
    let (base, extra) = svcs.split_at(n);
    if lane == Lane::Nftables {
        let full = dir.join("full.nft");
        fs::write(&full, kubeproxy::nft_script(base, cidr)).expect("write");
        // Only the new Service's chains and map element: nftables mode syncs incrementally.
        let script = kubeproxy::nft_script(extra, cidr);
        let incremental = script
            .lines()
            .filter(|l| l.contains("service-") || l.contains("endpoint-"))
            .filter(|l| !l.starts_with("add map") && !l.contains("@service-ips"))
            .fold(String::new(), |mut acc, l| {
                let _ = writeln!(acc, "{l}");
                acc
            });
        let one = dir.join("one.nft");
        fs::write(&one, incremental).expect("write");
        bed.node_sh("nft flush ruleset");
        let c = bed.node_sh(&format!("nft -f {}", full.display()));
        let a = bed.node_sh(&format!("nft -f {}", one.display()));
        return (c, a);
    }
    let tool = if lane == Lane::IptablesNft {
        "iptables-nft-restore"
    } else {
        "iptables-legacy-restore"
    };
    let full = dir.join("full.rules");
    fs::write(&full, kubeproxy::iptables_restore(base, cidr)).expect("write");
    // kube-proxy's partial sync (1.28+): KUBE-SERVICES rewritten whole, the new Service's
    // chains added, everything else left alone.
    let all = kubeproxy::iptables_restore(svcs, cidr);
    let pn = extra[0].port_name_string();
    let mut new_chains = vec![kubeproxy::svc_chain(&pn, "tcp")];
    new_chains.extend(
        extra[0]
            .endpoints
            .iter()
            .map(|(ip, p)| kubeproxy::sep_chain(&pn, "tcp", &format!("{ip}:{p}"))),
    );
    let mut partial = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for c in &new_chains {
        let _ = writeln!(partial, ":{c} - [0:0]");
    }
    for l in all.lines().filter(|l| {
        l.starts_with("-A KUBE-SERVICES ")
            || new_chains
                .iter()
                .any(|c| l.starts_with(&format!("-A {c} ")))
    }) {
        let _ = writeln!(partial, "{l}");
    }
    partial.push_str("COMMIT\n");
    let one = dir.join("one.rules");
    fs::write(&one, partial).expect("write");
    let c = bed.node_sh(&format!("{tool} < {}", full.display()));
    let a = bed.node_sh(&format!("{tool} --noflush < {}", one.display()));
    (c, a)
}

/// Runs the whole comparison.
#[must_use]
#[expect(clippy::too_many_lines, reason = "the benchmark's steps, in order")]
pub fn run(o: &Opts) -> Results {
    require_privileges();
    ensure_bpffs();
    let tag = format!("lbk-{}", std::process::id());
    let plain = Bed::new(&format!("{tag}-plain"));
    let rule_beds: Vec<(Lane, Bed)> = Lane::RULES
        .iter()
        .filter(|l| o.rule_lanes.contains(l))
        .map(|&l| {
            let short = match l {
                Lane::IptablesNft => "ipn",
                Lane::IptablesLegacy => "ipl",
                _ => "nft",
            };
            (l, Bed::new(&format!("{tag}-{short}")))
        })
        .collect();
    let agent = Agent::start(&format!("{tag}-lb"));
    let mut res = Results::default();
    if let Some(why) = ipvs_unavailable() {
        eprintln!("IPVS lane unavailable: {why}");
        res.unavailable.push(("kube-proxy IPVS".into(), why));
    }
    for &n in &o.scales {
        eprintln!("scale {n}: programming {n} Services × 4 endpoints in every lane");
        let svcs = kubeproxy::bench_services(n + 1);
        // lb: from empty to n (cold), then one more.
        let _ = fs::remove_file(agent.manifests.path.join("add.yaml"));
        let cold = agent.program("svc.yaml", &manifests(0, n), n);
        let add = agent.program("add.yaml", &manifests(n, 1), n + 1);
        res.programming.push(Programming {
            scale: n,
            lane: Lane::SocketLb,
            cold_ms: cold.as_secs_f64() * 1e3,
            add_one_ms: add.as_secs_f64() * 1e3,
        });
        res.lb_memory.push((n, agent.rss_mib(), lb_map_mib()));
        let _ = agent.syncs();
        let active: Vec<&(Lane, Bed)> = rule_beds
            .iter()
            .filter(|(l, _)| *l != Lane::Nftables || n <= o.nft_max)
            .collect();
        if n > o.nft_max && o.rule_lanes.contains(&Lane::Nftables) {
            res.unavailable.push((
                format!("kube-proxy nftables at {n} Services"),
                format!(
                    "`nft -f` grows superlinearly with the ruleset (this machine: 2,500 Services 1.1 s, 5,000 5.1 s, 10,000 45 s); loaded up to {} (`--kp-nft-max`)",
                    o.nft_max
                ),
            ));
        }
        for (lane, bed) in active.iter().map(|x| (&x.0, &x.1)) {
            let dir = TempDir::new(&format!("{tag}-rules-{n}"));
            let (cold, add) = program_rules(*lane, bed, &svcs, n, &dir.path);
            res.programming.push(Programming {
                scale: n,
                lane: *lane,
                cold_ms: cold.as_secs_f64() * 1e3,
                add_one_ms: add.as_secs_f64() * 1e3,
            });
        }
        // Warm up every path once.
        let direct = "198.18.20.10:8080";
        let warm = Opts {
            round_secs: 0.2,
            ..o.clone()
        };
        let _ = measure(&plain.client, None, direct, &warm);
        for pos in POSITIONS {
            let t = vip(probe_index(pos, n));
            let _ = measure(&plain.client, Some(&agent.cgroup), &t, &warm);
            for (_, bed) in &active {
                let _ = measure(&bed.client, None, &t, &warm);
            }
        }
        // Rounds: direct, then every lane × position; order alternates between rounds.
        let mut rows: Vec<(Lane, &'static str, Vec<Sample>, Vec<f64>)> = Vec::new();
        let mut direct_samples = Vec::new();
        let per_round = 1 + POSITIONS.len() * (1 + active.len());
        let bar = indicatif::ProgressBar::new((o.rounds * per_round) as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "  {prefix:>14} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
            )
            .expect("progress template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{n} Services"));
        for r in 0..o.rounds {
            bar.set_message(format!("round {}/{}: direct", r + 1, o.rounds));
            let d = measure(&plain.client, None, direct, o);
            bar.inc(1);
            direct_samples.push(d);
            let mut jobs: Vec<(Lane, &'static str)> = Vec::new();
            for pos in POSITIONS {
                jobs.push((Lane::SocketLb, pos));
                for (l, _) in &active {
                    jobs.push((*l, pos));
                }
            }
            if r % 2 == 1 {
                jobs.reverse();
            }
            for (lane, pos) in jobs {
                bar.set_message(format!(
                    "round {}/{}: {} {pos}",
                    r + 1,
                    o.rounds,
                    lane.label()
                ));
                bar.inc(1);
                let t = vip(probe_index(pos, n));
                let s = if lane == Lane::SocketLb {
                    measure(&plain.client, Some(&agent.cgroup), &t, o)
                } else {
                    let bed = &rule_beds.iter().find(|(l, _)| *l == lane).expect("bed").1;
                    measure(&bed.client, None, &t, o)
                };
                let i = rows
                    .iter()
                    .position(|(l, p, _, _)| *l == lane && *p == pos)
                    .unwrap_or_else(|| {
                        rows.push((lane, pos, Vec::new(), Vec::new()));
                        rows.len() - 1
                    });
                rows[i].2.push(s);
                rows[i].3.push(s.conn_per_s / d.conn_per_s);
            }
        }
        bar.finish_and_clear();
        let summary = |lane, pos, s: &[Sample], ratios: Vec<f64>| LaneResult {
            scale: n,
            lane,
            position: pos,
            conn_per_s: median(s.iter().map(|x| x.conn_per_s).collect()),
            ratio_to_direct: median(ratios),
            p50_us: median(s.iter().map(|x| x.p50_us).collect()),
            p99_us: median(s.iter().map(|x| x.p99_us).collect()),
            cpu_us_per_conn: median(s.iter().map(|x| x.cpu_us_per_conn).collect()),
            samples: s.to_vec(),
        };
        res.lanes.push(summary(
            Lane::Direct,
            "-",
            &direct_samples,
            vec![1.0; direct_samples.len()],
        ));
        for (lane, pos, s, ratios) in rows {
            res.lanes.push(summary(lane, pos, &s, ratios));
        }
    }
    res.conditions = format!(
        "{} rounds × {} s per lane and position, {} client threads (closed loop: connect, 2-byte request, response, close), {} CPUs, kernel {}",
        o.rounds,
        o.round_secs,
        o.threads,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    res
}

/// The results as Markdown tables.
#[must_use]
pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| Services | lane | probe | conn/s | ÷ direct | connect p50 µs | p99 µs | CPU µs/conn |"
    );
    let _ = writeln!(md, "|---:|---|---|---:|---:|---:|---:|---:|");
    for l in &r.lanes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.3} | {:.0} | {:.0} | {:.0} |",
            l.scale,
            l.lane.label(),
            l.position,
            l.conn_per_s,
            l.ratio_to_direct,
            l.p50_us,
            l.p99_us,
            l.cpu_us_per_conn
        );
    }
    let _ = writeln!(
        md,
        "\n| Services | lane | program all (cold) | add one Service |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|");
    for p in &r.programming {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.1} ms |",
            p.scale,
            p.lane.label(),
            p.cold_ms,
            p.add_one_ms
        );
    }
    let _ = writeln!(md, "\n| Services | lb agent RSS | lb BPF map memory |");
    let _ = writeln!(md, "|---:|---:|---:|");
    for (n, rss, maps) in &r.lb_memory {
        let _ = writeln!(md, "| {n} | {rss} MiB | {maps:.1} MiB |");
    }
    for (lane, why) in &r.unavailable {
        let _ = writeln!(md, "\n{lane}: not run — {why}.");
    }
    let _ = writeln!(md, "\nConditions: {}.", r.conditions);
    md
}

/// SVG charts of connections/s and connect p99 against the Service count, one line per lane
/// (probe placed last in rule order: the worst case of a linear rule walk). Returns the files.
pub fn charts(r: &Results, dir: &Path) -> Vec<PathBuf> {
    use plotters::style::{BLACK, BLUE, GREEN, MAGENTA, RED};
    let lanes = [
        Lane::Direct,
        Lane::SocketLb,
        Lane::IptablesNft,
        Lane::IptablesLegacy,
        Lane::Nftables,
    ];
    let colors = [BLACK, BLUE, RED, MAGENTA, GREEN];
    let series = |lane: Lane, f: &dyn Fn(&LaneResult) -> f64| -> Vec<(f64, f64)> {
        r.lanes
            .iter()
            .filter(|l| l.lane == lane && (l.position == "last" || l.position == "-"))
            .map(|l| (l.scale as f64, f(l)))
            .collect()
    };
    let max_scale = r.lanes.iter().map(|l| l.scale).max().unwrap_or(100) as f64;
    let mut out = Vec::new();
    for (file, title, f) in [
        (
            "conn-per-s.svg",
            "connections/s (probe Service last in rule order)",
            &(|l: &LaneResult| l.conn_per_s) as &dyn Fn(&LaneResult) -> f64,
        ),
        (
            "p99-connect-us.svg",
            "connect p99 µs (probe Service last in rule order)",
            &(|l: &LaneResult| l.p99_us) as &dyn Fn(&LaneResult) -> f64,
        ),
    ] {
        let path = dir.join(file);
        let ymax = r.lanes.iter().map(f).fold(1.0_f64, f64::max) * 1.1;
        let plotted: Vec<crate::Line> = lanes
            .iter()
            .zip(colors)
            .map(|(lane, color)| (lane.label().to_string(), color, series(*lane, f)))
            .collect();
        match crate::line_chart(&path, title, (50.0, max_scale), ymax, &plotted) {
            Ok(()) => out.push(path),
            Err(e) => eprintln!("chart {file}: {e}"),
        }
    }
    out
}
