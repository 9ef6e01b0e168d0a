//! `cargo xtask bench`: socket-LB cost, measured side by side in one run.
//!
//! Lanes (same client namespace and cgroup, same single backend, rounds interleaved so machine
//! noise hits both alike): `direct` = connect to the backend's own address; `vip` = connect to
//! the `ClusterIP`, rewritten by `sock4_connect`. Each round is one closed-loop
//! connect + request + response + close client (`lbt loop`) for a fixed time.
//! Measured with 1 Service loaded, then with N Services × 4 endpoints, and the wall time from
//! writing the N-Service manifest to the agent reporting the datapath programmed.
//!
//! NodePort from outside (`--nodeport-rounds`): two identical multi-node beds
//! (tests/src/multinode.rs), one with `lb-agent`s (tcx packet path), one with kube-proxy's
//! iptables rules (same chains and matches kube-proxy writes for a NodePort Service with
//! externalTrafficPolicy Cluster, plus `--nodeport-services` other Services in
//! KUBE-SERVICES). The backend is on node-2, the client hits node-1's NodePort: both lanes DNAT
//! and SNAT. Rounds alternate between the beds: TCP connection rate (connect, request,
//! response, close) and UDP request/response rate on one flow.
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use lb_bench::{agent_rss_mib, latency_summary, svc4_map, wait_count};
use lb_tests::{Cluster, Value, multinode::MultiNode, pod_v4, pod_v6, service, slice, wait_for};

#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per section a run may be limited to"
)]
struct Args {
    services: usize,
    round_secs: f64,
    rounds: usize,
    /// Changes written to the API double for the latency measurement (0 = skip the API phase).
    api_changes: usize,
    /// Rounds of the NodePort comparison (0 = skip).
    nodeport_rounds: usize,
    /// Other Services in both NodePort beds (kube-proxy's KUBE-SERVICES length).
    nodeport_services: usize,
    /// Only the NodePort comparison.
    only_nodeport: bool,
    /// The kube-proxy-shapes comparison at these Service counts (empty = skip).
    kp_scales: Vec<usize>,
    /// Client threads of the kube-proxy-shapes comparison.
    kp_threads: usize,
    /// Rounds of the kube-proxy-shapes comparison.
    kp_rounds: usize,
    /// Only the kube-proxy-shapes comparison.
    only_kube_proxy: bool,
    /// Largest Service count for the nftables lane.
    kp_nft_max: usize,
    kp_lanes: Vec<lb_bench::kpbench::Lane>,
    /// Pod readiness flips of the standalone section (0 = skip it).
    standalone_flips: usize,
    /// Services (× 4 Pods) of the standalone cold start (0 = skip it).
    standalone_services: usize,
    /// Only the standalone section.
    only_standalone: bool,
    /// Service counts of the DNS comparison (empty = skip).
    dns_scales: Vec<usize>,
    /// Rounds of the DNS comparison.
    dns_rounds: usize,
    /// Only the DNS comparison.
    only_dns: bool,
    /// Service counts of the growth table (empty = skip).
    growth_scales: Vec<usize>,
    /// Only the growth table.
    only_growth: bool,
    /// Service counts of the per-hook cost table (empty = skip).
    hook_scales: Vec<usize>,
    /// Only the per-hook cost table.
    only_hooks: bool,
    /// Where the results (JSON, Markdown) go.
    out_dir: Option<String>,
    /// Where the whole Markdown report is written (e.g. BENCHMARKS.md).
    benchmarks_md: Option<String>,
}

/// A list flag's value: `1000,10000` (empty: none).
fn counts(flag: &str, val: &str) -> Vec<usize> {
    val.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{flag}: {s:?} is not a count"))
        })
        .collect()
}

fn parse_args() -> Args {
    let mut a = Args {
        services: 10_000,
        round_secs: 1.0,
        rounds: 5,
        api_changes: 100,
        nodeport_rounds: 0,
        nodeport_services: 1000,
        only_nodeport: false,
        kp_scales: Vec::new(),
        kp_threads: 2,
        kp_rounds: 3,
        only_kube_proxy: false,
        kp_nft_max: 10_000,
        kp_lanes: lb_bench::kpbench::Lane::RULES.to_vec(),
        standalone_flips: 100,
        standalone_services: 10_000,
        only_standalone: false,
        dns_scales: vec![100, 10_000],
        dns_rounds: 3,
        only_dns: false,
        growth_scales: Vec::new(),
        only_growth: false,
        hook_scales: Vec::new(),
        only_hooks: false,
        out_dir: None,
        benchmarks_md: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).expect("flag value");
        match pair[0].as_str() {
            "--services" => a.services = val.parse().expect("--services"),
            "--round-secs" => a.round_secs = val.parse().expect("--round-secs"),
            "--rounds" => a.rounds = val.parse().expect("--rounds"),
            "--api-changes" => a.api_changes = val.parse().expect("--api-changes"),
            "--nodeport-rounds" => a.nodeport_rounds = val.parse().expect("--nodeport-rounds"),
            "--nodeport-services" => {
                a.nodeport_services = val.parse().expect("--nodeport-services");
            }
            "--only-nodeport" => a.only_nodeport = val.parse().expect("--only-nodeport"),
            "--kp-scales" => a.kp_scales = counts("--kp-scales", val),
            "--kp-threads" => a.kp_threads = val.parse().expect("--kp-threads"),
            "--kp-rounds" => a.kp_rounds = val.parse().expect("--kp-rounds"),
            "--only-kube-proxy" => a.only_kube_proxy = val.parse().expect("--only-kube-proxy"),
            "--kp-nft-max" => a.kp_nft_max = val.parse().expect("--kp-nft-max"),
            "--kp-lanes" => {
                a.kp_lanes = val
                    .split(',')
                    .filter(|s| !s.is_empty() && *s != "none")
                    .map(|s| {
                        lb_bench::kpbench::Lane::rule_lane(s).unwrap_or_else(|| {
                            panic!("--kp-lanes: unknown lane {s:?} (iptables-nft, iptables-legacy, nftables, none)")
                        })
                    })
                    .collect();
            }
            "--standalone-flips" => a.standalone_flips = val.parse().expect("--standalone-flips"),
            "--standalone-services" => {
                a.standalone_services = val.parse().expect("--standalone-services");
            }
            "--only-standalone" => a.only_standalone = val.parse().expect("--only-standalone"),
            "--dns-scales" => a.dns_scales = counts("--dns-scales", val),
            "--dns-rounds" => a.dns_rounds = val.parse().expect("--dns-rounds"),
            "--only-dns" => a.only_dns = val.parse().expect("--only-dns"),
            "--growth-scales" => a.growth_scales = counts("--growth-scales", val),
            "--only-growth" => a.only_growth = val.parse().expect("--only-growth"),
            "--hook-scales" => a.hook_scales = counts("--hook-scales", val),
            "--only-hooks" => a.only_hooks = val.parse().expect("--only-hooks"),
            "--out-dir" => a.out_dir = Some(val.clone()),
            "--benchmarks-md" => a.benchmarks_md = Some(val.clone()),
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
    let (d, v, mut r) = lane_rounds(c, a);
    let (mut d, mut v) = (d, v);
    (median(&mut d), median(&mut v), median(&mut r))
}

/// [`lanes`]' rounds: (direct rates, VIP rates, per-round VIP ÷ direct ratios).
fn lane_rounds(c: &Cluster, a: &Args) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
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
    (d, v, r)
}

/// The ClusterIP of loaded Service `i`: every address of 198.19.2.0–198.19.255.255 in turn
/// (198.19.0.0/23 is the bed's own), then of 198.18.96.0–198.18.255.255 (the bed's pods are
/// in 198.18.0.0/24, the loaded endpoints in 198.18.64.0/19): 105,984 distinct ClusterIPs, as
/// a cluster's would be (two Services cannot share one).
fn loaded_vip(i: usize) -> String {
    const HIGH: usize = 65_536 - 512;
    const LOW: usize = 40_960;
    assert!(i < HIGH + LOW, "at most {} loaded Services", HIGH + LOW);
    if i < HIGH {
        let a = 512 + i;
        format!("198.19.{}.{}", a / 256, a % 256)
    } else {
        let a = 96 * 256 + (i - HIGH);
        format!("198.18.{}.{}", a / 256, a % 256)
    }
}

/// N Services ([`loaded_vip`]) × 4 endpoints each, in one multi-document file.
fn many_services(n: usize) -> String {
    let mut s = String::with_capacity(n * 700);
    for i in 0..n {
        let vip = loaded_vip(i);
        let name = format!("svc-{i}");
        s.push_str(&service(&name, &[&vip], &[("http", 80, "TCP")]));
        s.push_str("---\n");
        let eps: Vec<String> = (0..4)
            .map(|k| {
                format!(
                    "198.18.{}.{}",
                    64 + (i * 4 + k) / 250 % 32,
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

/// Change written to the API double → visible in the pinned map: p50/p99 over `n` changes, with
/// `loaded` other Services × 4 endpoints in the API. Returns (p50 ms, p99 ms, max ms, RSS MiB).
/// What [`api_latency`] measured: change → map p50 / p99 / max (ms), the agent's RSS (MiB),
/// and agent start → every loaded Service programmed (s).
struct ApiRun {
    p50: f64,
    p99: f64,
    max: f64,
    rss: u64,
    start_s: f64,
}

/// The `frontends=` count of an agent's "programmed datapath" log line.
fn frontends_of(line: &str) -> Option<usize> {
    let rest = line.split("frontends=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn api_latency(n: usize, loaded: usize, flags: &[&str]) -> ApiRun {
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
    let t = Instant::now();
    c.start_agent_with(flags);
    // The probe's frontend and every loaded Service's.
    lb_tests::wait_for(Duration::from_mins(5), || {
        c.agent_log()
            .lines()
            .any(|l| {
                l.contains("programmed datapath") && frontends_of(l).is_some_and(|f| f > loaded)
            })
            .then_some(())
    })
    .expect("the agent programmed every Service from the API");
    let start_s = t.elapsed().as_secs_f64();
    let map = svc4_map(&c);
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
    let (p50, p99, max) = latency_summary(&c, ms);
    ApiRun {
        p50,
        p99,
        max,
        rss,
        start_s,
    }
}

/// kube-proxy's iptables rules (iptables mode, `lb_bench::kubeproxy`) for Service `np`:
/// ClusterIP 198.19.0.90:80 (TCP) / :53 (UDP), NodePorts 30090/30091, `NP_PODS` endpoints on
/// node-2, ETP Cluster, plus `others` Services ahead of it in KUBE-SERVICES.
fn kube_proxy_rules(others: usize) -> String {
    use lb_bench::kubeproxy::SvcSpec;
    let ep = |port| -> Vec<(std::net::Ipv4Addr, u16)> {
        (0..NP_PODS)
            .map(|i| (np_pod(i).parse().expect("pod address"), port))
            .collect()
    };
    let spec = |name: String, port_name: &str, proto, vip: [u8; 4], port, node_port, eps| SvcSpec {
        namespace: "bench".into(),
        name,
        port_name: port_name.into(),
        proto,
        vip: vip.into(),
        port,
        node_port,
        endpoints: eps,
    };
    let mut svcs: Vec<SvcSpec> = (0..others)
        .map(|i| {
            let vip = [198, 19, (1 + i / 250) as u8, (1 + i % 250) as u8];
            spec(format!("o{i}"), "http", "tcp", vip, 80, None, ep(8080))
        })
        .collect();
    let vip = [198, 19, 0, 90];
    svcs.push(spec(
        "np".into(),
        "http",
        "tcp",
        vip,
        80,
        Some(30090),
        ep(8080),
    ));
    svcs.push(spec(
        "np".into(),
        "dns",
        "udp",
        vip,
        53,
        Some(30091),
        ep(5353),
    ));
    lb_bench::kubeproxy::iptables_restore(&svcs, "10.0.0.0/8")
}

/// Backends of the NodePort bench, all on node-2: each (node address, backend) pair has its
/// own SNAT port space (31,744 ports, held 60 s after close in lb, 64,512 for 120 s in
/// kube-proxy), so several backends keep a long run clear of port exhaustion in both lanes.
const NP_PODS: usize = 4;

fn np_pod(i: usize) -> String {
    format!("198.18.2.{}", 10 + i)
}

/// Manifests for the lb bed: the same Service `np` and `others` ClusterIP Services.
fn nodeport_manifest(others: usize) -> String {
    let mut m = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: default}\n\
         spec: {type: NodePort, clusterIP: 198.19.0.90, ports: [{name: http, port: 80, nodePort: 30090}, {name: dns, port: 53, protocol: UDP, nodePort: 30091}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]\n\
         endpoints: [",
    );
    let eps: Vec<String> = (0..NP_PODS)
        .map(|i| format!("{{addresses: [{}], nodeName: node-2}}", np_pod(i)))
        .collect();
    m.push_str(&eps.join(", "));
    m.push_str("]\n");
    for i in 0..others {
        let _ = write!(
            m,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: o{i}, namespace: default}}\nspec: {{clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80}}]}}\n",
            1 + i / 250,
            1 + i % 250
        );
    }
    m
}

/// One lane round on a bed's external client: (TCP conn/s, UDP req/resp per s).
fn np_round(bed: &MultiNode, secs: f64) -> (f64, f64) {
    let ms = ((secs * 1000.0) as u64).to_string();
    let t = &bed.ext_client(&["loop", "198.18.100.11:30090", &ms])[0];
    assert_eq!(
        t["failed"],
        0,
        "TCP failures in a NodePort round: {t}\n{}",
        if bed.nodes[0].agent.is_some() {
            bed.inspect(0, "stats").to_string()
        } else {
            String::new()
        }
    );
    let u = &bed.ext_client(&["uloop", "198.18.100.11:30091", &ms])[0];
    assert_eq!(u["failed"], 0, "UDP losses in a NodePort round: {u}");
    (
        t["ok"].as_f64().expect("ok") / secs,
        u["ok"].as_f64().expect("ok") / secs,
    )
}

/// A NodePort lane: its bed, and whether the lb agents run (and with which `--xdp`).
struct NpLane {
    name: &'static str,
    bed: MultiNode,
    /// Native XDP lane: the pass-through XDP program on the lan-side peer of node-1's eth0.
    _peer: Option<aya::Ebpf>,
    xdp: Option<&'static str>,
    tcp: Vec<f64>,
    udp: Vec<f64>,
}

/// Every lane's senders (the client, node-2's pods) send full checksums, as frames from a real
/// NIC have them: native XDP on veth would otherwise see partial ones (`tx_checksum_off`).
fn full_checksums(bed: &MultiNode) {
    lb_tests::tx_checksum_off(&bed.ext, "eth0");
    for pod in &bed.nodes[1].pods {
        lb_tests::tx_checksum_off(pod, "eth0");
    }
}

/// Native XDP on veth: `XDP_TX` hands frames to the peer veth, which takes them only when it
/// runs NAPI itself, i.e. has an XDP program of its own. This loads `xdp_nodeport` with empty
/// maps (so it passes every packet) on `n1`, the lan side of node-1's eth0.
fn xdp_pass_on_peer(bed: &MultiNode) -> aya::Ebpf {
    use std::os::fd::AsRawFd as _;
    let lan = bed.lan.path();
    std::thread::spawn(move || {
        let f = fs::File::open(&lan).expect("open lan netns");
        // SAFETY: setns on this (short-lived) thread with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let mut e = aya::EbpfLoader::new()
            .load(lb_userspace::loader::object())
            .expect("load object");
        let p: &mut aya::programs::Xdp = e
            .program_mut("xdp_nodeport")
            .expect("program")
            .try_into()
            .expect("xdp");
        p.load().expect("load xdp");
        p.attach("n1", aya::programs::xdp::XdpMode::Driver)
            .expect("attach pass-through XDP to the peer");
        e
    })
    .join()
    .expect("peer XDP thread")
}

/// The NodePort comparison; returns its Markdown. Lanes: lb with tc only, lb with XDP in front
/// (generic; native when the veth bed lets it forward), kube-proxy's iptables rules.
#[expect(
    clippy::too_many_lines,
    reason = "a linear benchmark script reads best top to bottom"
)]
fn nodeport_bench(a: &Args) -> String {
    eprintln!(
        "NodePort from outside: lb (tc, XDP generic, XDP native) vs kube-proxy iptables, {} other Services, {} rounds × {} s",
        a.nodeport_services, a.nodeport_rounds, a.round_secs
    );
    let mut lanes: Vec<NpLane> = Vec::new();
    let mut unavailable: Vec<String> = Vec::new();
    for (name, tag, xdp) in [
        ("lb tc", "bnp-tc", "off"),
        ("lb XDP generic", "bnp-xg", "generic"),
        ("lb XDP native", "bnp-xn", "native"),
    ] {
        let mut bed = MultiNode::new(tag, &[0, NP_PODS]);
        full_checksums(&bed);
        bed.write_manifest("np.yaml", &nodeport_manifest(a.nodeport_services));
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bed.start_agents_with(&["--xdp", xdp]);
        }));
        if started.is_err() {
            unavailable.push(format!("{name}: the agent could not attach it here"));
            continue;
        }
        let peer = (xdp == "native").then(|| xdp_pass_on_peer(&bed));
        lanes.push(NpLane {
            name,
            bed,
            _peer: peer,
            xdp: Some(xdp),
            tcp: Vec::new(),
            udp: Vec::new(),
        });
    }
    let ipt = MultiNode::new("bnp-ipt", &[0, NP_PODS]);
    full_checksums(&ipt);
    let rules = lb_tests::TempDir::new(&format!("bnp-rules-{}", std::process::id()));
    let file = rules.path.join("rules");
    fs::write(&file, kube_proxy_rules(a.nodeport_services)).expect("write rules");
    lb_tests::sh(&format!(
        "ip netns exec {} iptables-restore < {}",
        ipt.nodes[0].netns.name,
        file.display()
    ));
    lanes.push(NpLane {
        name: "kube-proxy iptables",
        bed: ipt,
        _peer: None,
        xdp: None,
        tcp: Vec::new(),
        udp: Vec::new(),
    });
    lanes.retain(|l| {
        let ok = wait_for(Duration::from_secs(20), || {
            (l.bed.ext_client(&["tcp", "198.18.100.11:30090", "1"])[0]["ok"] == true)
                .then_some(())
        });
        if ok.is_none() {
            unavailable.push(format!(
                "{}: attached, but the NodePort never answered through it on this veth bed \
                 (node-1 counters: xdp_xlated {}, xdp_rev_xlated {}, xdp_passed_to_tc {}, tc_xlated {})",
                l.name,
                l.bed.stat(0, "xdp_xlated"),
                l.bed.stat(0, "xdp_rev_xlated"),
                l.bed.stat(0, "xdp_passed_to_tc"),
                l.bed.stat(0, "tc_xlated"),
            ));
            assert!(l.xdp.is_some_and(|x| x == "native"), "{} never answered\n{}", l.name, l.bed.logs());
            return false;
        }
        np_round(&l.bed, 0.2); // warm-up: ARP, conntrack, caches
        true
    });
    for i in 0..a.nodeport_rounds {
        let n = lanes.len();
        let mut line = format!("  round {i}:");
        for k in 0..n {
            // Rotate the order every round.
            let l = &mut lanes[(k + i) % n];
            let (t, u) = np_round(&l.bed, a.round_secs);
            l.tcp.push(t);
            l.udp.push(u);
            let _ = write!(line, " {} {t:.0}/{u:.0};", l.name);
        }
        eprintln!("{line}");
    }
    for l in &lanes {
        match l.xdp {
            Some("off") => assert!(l.bed.stat(0, "tc_xlated") > 0, "{}: tc unused", l.name),
            Some(_) => assert!(
                l.bed.stat(0, "xdp_xlated") > 0 && l.bed.stat(0, "xdp_rev_xlated") > 0,
                "{}: XDP unused: {}",
                l.name,
                l.bed.inspect(0, "stats")
            ),
            None => {}
        }
    }
    let base = lanes
        .iter()
        .position(|l| l.xdp.is_none())
        .expect("iptables lane");
    let ratio = |v: &[f64], b: &[f64]| {
        let mut r: Vec<f64> = v.iter().zip(b).map(|(x, y)| x / y).collect();
        median(&mut r)
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| NodePort from outside, {NP_PODS} backends on another node ({} other Services) | TCP conn/s | ÷ iptables | UDP req/resp/s | ÷ iptables |",
        a.nodeport_services
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for l in &lanes {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.3} | {:.0} | {:.3} |",
            l.name,
            median(&mut l.tcp.clone()),
            ratio(&l.tcp, &lanes[base].tcp),
            median(&mut l.udp.clone()),
            ratio(&l.udp, &lanes[base].udp),
        );
    }
    for u in &unavailable {
        let _ = writeln!(md, "\nNot run: {u}.");
    }
    let _ = writeln!(
        md,
        "\nConditions: external client → node-1 NodePort → SNAT + DNAT → backend on node-2, all beds built alike (veth + bridges, netns), {} rounds of {} s per lane and protocol in rotating order, one closed-loop client; ratios are medians of per-round ratios. Senders' transmit checksum offload is off in every lane (full checksums, as from a real NIC; native XDP cannot see that a veth frame's checksum is only partial). On veth, generic XDP runs after the skb is built, and native XDP gets frames the sending veth already built skbs for (and XDP_TX needs an XDP program on the peer veth, which the native lane adds as a pass-through): neither saves the allocation that makes native XDP fast on real NICs, only the stack's work between XDP and tc.",
        a.nodeport_rounds, a.round_secs
    );
    md
}

/// The kube-proxy-shapes comparison; its Markdown, with JSON and Markdown written to
/// `--out-dir` when given.
fn kube_proxy_bench(a: &Args) -> String {
    let o = lb_bench::kpbench::Opts {
        scales: a.kp_scales.clone(),
        rounds: a.kp_rounds,
        round_secs: a.round_secs,
        threads: a.kp_threads,
        nft_max: a.kp_nft_max,
        rule_lanes: a.kp_lanes.clone(),
    };
    let r = lb_bench::kpbench::run(&o);
    let md = lb_bench::kpbench::markdown(&r);
    if let Some(dir) = &a.out_dir {
        fs::create_dir_all(dir).expect("out dir");
        fs::write(
            format!("{dir}/kube-proxy-shapes.json"),
            serde_json::to_string_pretty(&r).expect("json"),
        )
        .expect("write json");
        fs::write(format!("{dir}/kube-proxy-shapes.md"), &md).expect("write md");
        for c in lb_bench::kpbench::charts(&r, Path::new(dir)) {
            eprintln!("wrote {}", c.display());
        }
    }
    md
}

/// Agent flags for `n` loaded Services: service maps big enough for 1 frontend, 4 slots and a
/// marker each, with room for a sync's new-before-old writes.
fn capacity_flags(n: usize) -> Vec<String> {
    let need = (n * 6 * 5 / 4).max(lb_common::DEFAULT_SVC_ENTRIES as usize);
    vec!["--max-service-entries".into(), need.to_string()]
}

/// The bed's Service `web`: both families, 80/TCP (→ 8080) and 53/UDP (→ 5353).
const WEB_VIP4: &str = "198.19.0.10";
const WEB_VIP6: &str = "2001:db8:f::10";
/// `web`'s frontends: two families × two ports.
const WEB_FRONTENDS: usize = 4;

/// A bed with one backend pod and the Service `web` ([`WEB_VIP4`], [`WEB_VIP6`]) on it, its
/// agent started with `flags` and `web` programmed.
fn web_bed(name: &str, flags: &[&str]) -> Cluster {
    let mut c = Cluster::new(name, 1);
    let ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    c.write_manifest(
        "web.yaml",
        &[
            service(
                "web",
                &[WEB_VIP4, WEB_VIP6],
                &[("http", 80, "TCP"), ("dns", 53, "UDP")],
            ),
            slice(
                "web-1",
                "web",
                "IPv4",
                &ports,
                &[(&pod_v4(1), true, true, false)],
            ),
            slice(
                "web-2",
                "web",
                "IPv6",
                &ports,
                &[(&pod_v6(1), true, true, false)],
            ),
        ]
        .join("---\n"),
    );
    c.start_agent_with(flags);
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.10:80/TCP")
    })
    .expect("web programmed");
    c
}

/// How the costs grow: at each scale, cold programming from a manifest directory (wall, RSS
/// after it, the connect hook's run time per call), and one-change propagation through the API
/// double (p99, RSS). One scale at a time, each in a fresh bed.
fn growth_bench(a: &Args) -> String {
    let mut rows = Vec::new();
    for &n in &a.growth_scales {
        let flags = capacity_flags(n);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let c = web_bed("benchgrow", &flags);
        eprintln!("growth {n}: cold programming");
        let (wall, line) =
            lb_bench::program(&c, "many.yaml", &many_services(n), Duration::from_mins(5));
        assert!(
            line.contains(&format!("frontends={}", n + WEB_FRONTENDS)),
            "partial programming: {line}"
        );
        eprintln!("  {line}");
        let rss = agent_rss_mib(&c);
        rate(&c, "198.19.0.10:80", 0.2);
        let hooks = lb_bench::hook_costs(&c, || {
            rate(&c, "198.19.0.10:80", 1.0);
        });
        let connect_ns = hooks
            .iter()
            .find(|h| h.0 == "sock4_connect")
            .map_or(f64::NAN, |h| h.2);
        drop(c);
        eprintln!("growth {n}: {} changes through the API", a.api_changes);
        let api = api_latency(a.api_changes, n, &flags);
        rows.push(lb_bench::GrowthRow {
            services: n,
            cold_s: wall.as_secs_f64(),
            rss_mib: rss,
            connect_ns,
            p99_ms: api.p99,
            api_rss_mib: api.rss,
            api_start_s: api.start_s,
        });
    }
    let mut md = String::from(
        "| Services × 4 endpoints | cold programming (manifests) | agent RSS after it | `sock4_connect` ns per call | agent start → programmed (API) | change → map p99 (API) | agent RSS (API) |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.2} s | {} MiB | {:.0} | {:.2} s | {:.1} ms | {} MiB |",
            r.services, r.cold_s, r.rss_mib, r.connect_ns, r.api_start_s, r.p99_ms, r.api_rss_mib
        );
    }
    if let Some(dir) = &a.out_dir {
        fs::create_dir_all(dir).expect("out dir");
        fs::write(format!("{dir}/growth.md"), &md).expect("write growth.md");
        if let Some(p) = lb_bench::growth_chart(&rows, Path::new(dir)) {
            eprintln!("wrote {}", p.display());
        }
    }
    md
}

/// The socket hooks, in table order.
const HOOKS: [&str; 8] = [
    "sock4_connect",
    "sock4_getpeername",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock6_connect",
    "sock6_getpeername",
    "sock6_sendmsg",
    "sock6_recvmsg",
];

/// Every socket hook's kernel run time per call, and ClusterIP ÷ direct connection rates with
/// a 95 % confidence interval, at each scale in a fresh bed (`web` + n loaded Services).
fn hooks_bench(a: &Args) -> String {
    let mut md = format!(
        "| Services loaded | ClusterIP ÷ direct, mean of {} rounds (95 % CI) | {} | `sock4_connect` ns, not a Service |\n|---:|---:|{}---:|\n",
        a.rounds,
        HOOKS.map(|h| format!("`{h}` ns")).join(" | "),
        "---:|".repeat(HOOKS.len())
    );
    for &n in &a.hook_scales {
        let flags = capacity_flags(n);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let c = web_bed("benchhook", &flags);
        if n > 0 {
            let (_, line) =
                lb_bench::program(&c, "many.yaml", &many_services(n), Duration::from_mins(5));
            assert!(
                line.contains(&format!("frontends={}", n + WEB_FRONTENDS)),
                "partial programming: {line}"
            );
        }
        eprintln!("hooks {n}: {} interleaved rounds", a.rounds);
        let (_, _, ratios) = lane_rounds(&c, a);
        let (mean, half) = lb_bench::mean_ci95(&ratios);
        let v4 = format!("{WEB_VIP4}:80");
        let v6 = format!("[{WEB_VIP6}]:80");
        let hooks = lb_bench::hook_costs(&c, || {
            rate(&c, &v4, 1.0);
            rate(&c, &v6, 1.0);
            for vip in [format!("{WEB_VIP4}:53"), format!("[{WEB_VIP6}]:53")] {
                let r = c.client(&["udp", &vip, "2000"]);
                assert!(r.iter().all(|r| r["ok"] == true), "{vip}: {r:?}");
            }
        });
        // Every other connection in the cgroup pays the look-up that finds no Service.
        let direct = lb_bench::hook_costs(&c, || {
            rate(&c, &format!("{}:8080", pod_v4(1)), 1.0);
        });
        // The kernel keeps 15 bytes of a program's name (`sock4_getpeerna`).
        let cell = |costs: &[(String, u64, f64)], h: &str| {
            costs
                .iter()
                .find(|x| h.starts_with(x.0.as_str()))
                .map_or_else(|| "–".to_owned(), |x| format!("{:.0}", x.2))
        };
        let _ = writeln!(
            md,
            "| {} | {mean:.3} ± {half:.3} | {} | {} |",
            n + 1,
            HOOKS.map(|h| cell(&hooks, h)).join(" | "),
            cell(&direct, "sock4_connect")
        );
        eprintln!("  {}", md.lines().last().unwrap_or_default());
    }
    let _ = writeln!(
        md,
        "\nConditions: `web` (both families, 80/TCP and 53/UDP) plus the loaded Services × 4 \
         endpoints; {} interleaved rounds of {} s per lane (one closed-loop client: connect, \
         request, response, close); hook costs by `BPF_ENABLE_STATS` over 1 s of TCP \
         connections per family (connect, getpeername), 2,000 unconnected UDP \
         request/replies per family (sendmsg, recvmsg), and 1 s of TCP connections straight to \
         the backend pod (not a Service).",
        a.rounds, a.round_secs
    );
    if let Some(dir) = &a.out_dir {
        fs::create_dir_all(dir).expect("out dir");
        fs::write(format!("{dir}/hooks.md"), &md).expect("write hooks.md");
    }
    md
}

#[expect(
    clippy::too_many_lines,
    reason = "a linear benchmark script reads best top to bottom"
)]
fn main() {
    let a = parse_args();
    if a.only_growth {
        println!("\n{}", growth_bench(&a));
        return;
    }
    if a.only_hooks {
        println!("\n{}", hooks_bench(&a));
        return;
    }
    if a.only_kube_proxy {
        let md = kube_proxy_bench(&a);
        println!("\n{md}");
        write_report(&a, &md);
        return;
    }
    if a.only_dns {
        println!(
            "\n{}",
            lb_bench::dns::bench(&a.dns_scales, a.dns_rounds, 5, 20_000)
        );
        return;
    }
    if a.only_standalone {
        println!(
            "\n{}",
            lb_bench::standalone::bench(a.standalone_flips, a.standalone_services)
        );
        return;
    }
    let kp = if a.kp_scales.is_empty() {
        String::new()
    } else {
        kube_proxy_bench(&a)
    };
    if a.only_nodeport {
        println!("\n{}", nodeport_bench(&a));
        return;
    }

    let c = web_bed("bench", &[]);

    eprintln!(
        "lane pair with 1 Service loaded ({} rounds × {} s each lane)",
        a.rounds, a.round_secs
    );
    let one = lanes(&c, &a);
    let hooks_one = lb_bench::hook_costs(&c, || {
        rate(&c, "198.19.0.10:80", 1.0);
    });

    eprintln!(
        "programming {} Services × 4 endpoints from a manifest directory",
        a.services
    );
    let text = many_services(a.services);
    let (program_wall, line) = lb_bench::program(&c, "many.yaml", &text, Duration::from_mins(2));
    let frontends = a.services + WEB_FRONTENDS;
    let loaded = a.services + 1;
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

    eprintln!("lane pair with {loaded} Services loaded");
    let many = lanes(&c, &a);
    let hooks_many = lb_bench::hook_costs(&c, || {
        rate(&c, "198.19.0.10:80", 1.0);
    });

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
        "| {loaded} | {:.0} | {:.0} | {:.3} |",
        many.0, many.1, many.2
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Socket hooks, kernel run time per call (`BPF_ENABLE_STATS`, 1 s of the ClusterIP lane):\n\n| Services loaded | hook | calls | ns per call |\n|---:|---|---:|---:|"
    );
    for (n, hooks) in [(1, &hooks_one), (loaded, &hooks_many)] {
        for (name, calls, ns) in hooks {
            let _ = writeln!(md, "| {n} | `{name}` | {calls} | {ns:.0} |");
        }
    }
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
            let ApiRun {
                p50, p99, max, rss, ..
            } = api_latency(a.api_changes, loaded, &[]);
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
    if a.nodeport_rounds > 0 {
        let _ = writeln!(md);
        md.push_str(&nodeport_bench(&a));
    }
    if !a.dns_scales.is_empty() {
        let _ = writeln!(md);
        md.push_str(&lb_bench::dns::bench(
            &a.dns_scales,
            a.dns_rounds,
            5,
            20_000,
        ));
    }
    if !a.growth_scales.is_empty() {
        let _ = writeln!(md, "\n### How the costs grow\n");
        md.push_str(&growth_bench(&a));
    }
    if !a.hook_scales.is_empty() {
        let _ = writeln!(
            md,
            "\n### Socket hooks: cost per call, and ClusterIP ÷ direct\n"
        );
        md.push_str(&hooks_bench(&a));
    }
    if a.standalone_flips > 0 || a.standalone_services > 0 {
        let _ = writeln!(md);
        md.push_str(&lb_bench::standalone::bench(
            a.standalone_flips,
            a.standalone_services,
        ));
    }
    let md = if kp.is_empty() {
        md
    } else {
        format!("{kp}\n{md}")
    };
    println!("\n{md}");
    write_report(&a, &md);
}

/// `--benchmarks-md`: the report with its date and machine.
fn write_report(a: &Args, md: &str) {
    let Some(path) = &a.benchmarks_md else {
        return;
    };
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let out = a.out_dir.as_deref().unwrap_or("target/bench");
    // Charts are linked relative to the report.
    let rel = Path::new(out)
        .strip_prefix(Path::new(path).parent().unwrap_or(Path::new("")))
        .map_or_else(|_| out.to_owned(), |p| p.display().to_string());
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kernel = kernel.trim();
    let report = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` on {date}: {cpus} CPUs ({cpu}), kernel {kernel}. \
         Ratios measured side by side in this one run are the claims; absolute rates are context \
         (a shared machine: single rounds vary by ±10 %). Raw samples and charts: `{rel}/` \
         (`kube-proxy-shapes.json`, `conn-per-s.svg`, `p99-connect-us.svg`).\n\n\
         ![connections/s vs Services]({rel}/conn-per-s.svg)\n\n\
         ![connect p99 vs Services]({rel}/p99-connect-us.svg)\n\n{md}"
    );
    fs::write(path, report).expect("write the benchmarks report");
    eprintln!("wrote {path}");
}
