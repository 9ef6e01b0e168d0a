//! Cluster DNS: `lb-agent --dns` against knot (`knotd`), unbound (`local-data`) and dnsmasq,
//! serving the same records, measured with `dnsperf` — all in one network namespace the bench
//! creates (servers and dnsperf on its loopback), one server running at a time, rounds
//! interleaved.
//!
//! The zone: N Services `svc-<i>.bench.svc.cluster.local` (A, SRV `_http._tcp`, PTR of the
//! ClusterIP). The query mix, per Service sampled: an A that exists, an AAAA that is NODATA, an
//! A with an ndots-style search suffix that is NXDOMAIN, the SRV, the PTR.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{Cluster, Netns, TempDir, command_in, wait_for};

/// The servers, in report order.
pub const SERVERS: [&str; 4] = ["lb", "knot", "unbound", "dnsmasq"];

fn vip(i: usize) -> [u8; 4] {
    [198, 19, 128 + (i / 250) as u8, 1 + (i % 250) as u8]
}

fn dotted(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

fn name(i: usize) -> String {
    format!("svc-{i}.bench.svc.cluster.local")
}

/// The manifests of the N Services (ClusterIPs given, one endpoint each).
fn manifests(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: {}, ports: [{{name: http, port: 80}}]}}\n---\n",
            dotted(vip(i))
        );
    }
    s
}

/// dnsperf's query file: `name type` lines.
fn queries(n: usize) -> String {
    let mut s = String::new();
    let step = (n / 1000).max(1);
    for i in (0..n).step_by(step) {
        let v = vip(i);
        let _ = writeln!(s, "{} A", name(i));
        let _ = writeln!(s, "{} AAAA", name(i));
        let _ = writeln!(s, "{}.bench.svc.cluster.local A", name(i));
        let _ = writeln!(s, "_http._tcp.{} SRV", name(i));
        let _ = writeln!(s, "{}.{}.{}.{}.in-addr.arpa PTR", v[3], v[2], v[1], v[0]);
    }
    s
}

/// Config files of the three peers, written into `dir`.
fn peer_configs(dir: &Path, n: usize) {
    // knot: the zone file and a reverse zone.
    let mut z = String::from(
        "$ORIGIN cluster.local.\n$TTL 5\n@ SOA ns.dns hostmaster 1 7200 1800 86400 5\n@ NS ns.dns\nns.dns A 198.18.0.53\n",
    );
    let mut rev = String::from(
        "$ORIGIN 19.198.in-addr.arpa.\n$TTL 5\n@ SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ NS ns.dns.cluster.local.\n",
    );
    let mut unbound = String::from(
        "server:\n  interface: 127.0.0.1@5302\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  num-threads: 1\n  module-config: \"iterator\"\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"cluster.local.\" static\n  local-zone: \"19.198.in-addr.arpa.\" static\n",
    );
    let _ = writeln!(unbound, "  directory: \"{}\"", dir.display());
    let mut hosts = String::new();
    let mut dnsmasq = String::new();
    for i in 0..n {
        let (nm, v) = (name(i), vip(i));
        let rel = nm.trim_end_matches(".cluster.local");
        let _ = writeln!(z, "{rel} A {}", dotted(v));
        let _ = writeln!(z, "_http._tcp.{rel} SRV 0 100 80 {nm}.");
        let _ = writeln!(rev, "{}.{} PTR {nm}.", v[3], v[2]);
        let _ = writeln!(unbound, "  local-data: \"{nm}. 5 IN A {}\"", dotted(v));
        let _ = writeln!(
            unbound,
            "  local-data: \"_http._tcp.{nm}. 5 IN SRV 0 100 80 {nm}.\""
        );
        let _ = writeln!(unbound, "  local-data-ptr: \"{} {nm}.\"", dotted(v));
        let _ = writeln!(hosts, "{} {nm}", dotted(v));
        let _ = writeln!(dnsmasq, "srv-host=_http._tcp.{nm},{nm},80,0,100");
    }
    unbound.push_str("remote-control:\n  control-enable: no\n");
    fs::write(dir.join("cluster.local.zone"), z).expect("zone");
    fs::write(dir.join("rev.zone"), rev).expect("reverse zone");
    fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  listen: 127.0.0.1@5301\n  rundir: {d}\n  background-workers: 1\n  udp-workers: 1\n  tcp-workers: 1\n\
             database:\n  storage: {d}\n\
             zone:\n  - domain: cluster.local\n    file: {d}/cluster.local.zone\n  - domain: 19.198.in-addr.arpa\n    file: {d}/rev.zone\n",
            d = dir.display()
        ),
    )
    .expect("knot.conf");
    fs::write(dir.join("unbound.conf"), unbound).expect("unbound.conf");
    fs::write(dir.join("hosts"), hosts).expect("hosts");
    let _ = writeln!(
        dnsmasq,
        "port=5303\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\naddn-hosts={}/hosts\nlocal=/cluster.local/\nlocal=/19.198.in-addr.arpa/\nlocal-ttl=5\nuser=root\npid-file=",
        dir.display()
    );
    fs::write(dir.join("dnsmasq.conf"), dnsmasq).expect("dnsmasq.conf");
}

/// A running peer server (killed and reaped on drop).
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_peer(ns: &Netns, which: &str, dir: &Path) -> Peer {
    let (prog, args): (&str, Vec<String>) = match which {
        "knot" => (
            "/usr/sbin/knotd",
            vec!["-c".into(), format!("{}/knot.conf", dir.display())],
        ),
        "unbound" => (
            "/usr/sbin/unbound",
            vec![
                "-d".into(),
                "-c".into(),
                format!("{}/unbound.conf", dir.display()),
            ],
        ),
        "dnsmasq" => (
            "/usr/sbin/dnsmasq",
            vec![
                "-k".into(),
                format!("--conf-file={}/dnsmasq.conf", dir.display()),
            ],
        ),
        other => panic!("unknown peer {other}"),
    };
    let log = fs::File::create(dir.join(format!("{which}.log"))).expect("peer log");
    let child = command_in(ns, None, Path::new(prog))
        .args(&args)
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {which}: {e}"));
    Peer(child)
}

fn port(which: &str) -> u16 {
    match which {
        "lb" => 5300,
        "knot" => 5301,
        "unbound" => 5302,
        _ => 5303,
    }
}

/// `dnsperf` against `port` for `secs` (`qps`: a fixed load, 0 = as fast as it goes; `verbose`:
/// per-query latencies). Returns its output.
fn dnsperf(ns: &Netns, port: u16, qfile: &Path, secs: u32, qps: u32, verbose: bool) -> String {
    let mut cmd = command_in(ns, None, Path::new("/usr/bin/dnsperf"));
    cmd.args(["-s", "127.0.0.1", "-p", &port.to_string()])
        .arg("-d")
        .arg(qfile)
        .args(["-l", &secs.to_string(), "-c", "4", "-q", "200", "-t", "2"]);
    if qps > 0 {
        cmd.args(["-Q", &qps.to_string()]);
    }
    if verbose {
        cmd.arg("-v");
    }
    let out = cmd.stderr(Stdio::null()).output().expect("run dnsperf");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (queries per second, lost queries) from dnsperf's summary.
fn summary(out: &str) -> (f64, u64) {
    let field = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field("Queries per second"), field("Queries lost") as u64)
}

/// p99 latency (µs) of dnsperf -v's per-query lines (`> RCODE name type latency`).
fn p99_us(out: &str) -> f64 {
    let mut v: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    crate::percentile(&v, 0.99)
}

/// Waits until `port` answers a query (dig), so a round never measures a start-up.
fn wait_ready(ns: &Netns, port: u16) {
    let ok = wait_for(Duration::from_secs(20), || {
        let out = command_in(ns, None, Path::new("/usr/bin/dig"))
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+tries=1",
                "+time=1",
                "+short",
            ])
            .arg(name(0))
            .output()
            .ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    assert!(ok.is_some(), "DNS server on port {port} never answered");
}

/// One scale: median qps per server over `rounds`, and p99 under a fixed load.
fn scale(n: usize, rounds: usize, secs: u32, load: u32) -> String {
    let mut c = Cluster::new("benchdns", 0);
    let dir = TempDir::new(&format!("lbb-dns-{}", std::process::id()));
    peer_configs(&dir.path, n);
    let qfile: PathBuf = dir.path.join("queries.txt");
    fs::write(&qfile, queries(n)).expect("queries");
    c.write_manifest("svcs.yaml", &manifests(n));
    // The agent in the node's namespace, so its DNS listener shares dnsperf's loopback.
    c.agent_on_node();
    c.start_agent_with(&["--dns", "127.0.0.1:5300", "--dns-upstream", "127.0.0.1:9"]);
    let ns = &c.node;
    wait_ready(ns, port("lb"));
    let mut qps: Vec<Vec<f64>> = vec![Vec::new(); SERVERS.len()];
    let mut p99 = vec![f64::NAN; SERVERS.len()];
    for round in 0..rounds {
        for (k, which) in SERVERS.iter().enumerate() {
            let peer = (*which != "lb").then(|| start_peer(ns, which, &dir.path));
            wait_ready(ns, port(which));
            let out = dnsperf(ns, port(which), &qfile, secs, 0, false);
            let (q, lost) = summary(&out);
            let codes = out
                .lines()
                .find(|l| l.contains("Response codes:"))
                .unwrap_or("")
                .trim();
            eprintln!("  dns {n} round {round} {which}: {q:.0} qps, {lost} lost; {codes}");
            qps[k].push(q);
            if round == 0 {
                p99[k] = p99_us(&dnsperf(ns, port(which), &qfile, secs, load, true));
            }
            drop(peer);
        }
    }
    let (change_p50, change_p99) = change_latency(&c, 50);
    let with_dns = crate::agent_rss_mib(&c);
    c.kill_agent();
    c.start_agent();
    // The same objects without --dns (start_agent waited for it to be ready): what the index
    // and the server cost in memory.
    std::thread::sleep(Duration::from_millis(500));
    let without_dns = crate::agent_rss_mib(&c);
    eprintln!(
        "  dns {n}: change → answer p50 {change_p50:.1} ms p99 {change_p99:.1} ms; agent RSS {with_dns} MiB with --dns, {without_dns} MiB without"
    );
    let med: Vec<f64> = qps
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    let mut md = String::new();
    let _ = write!(md, "| {n} |");
    for (k, _) in SERVERS.iter().enumerate() {
        let _ = write!(md, " {:.0} ({:.2}×) |", med[k], med[0] / med[k].max(1.0));
    }
    for p in &p99 {
        let _ = write!(md, " {p:.0} |");
    }
    let _ = writeln!(
        md,
        " {change_p50:.1} / {change_p99:.1} ms | {} MiB |",
        with_dns.saturating_sub(without_dns)
    );
    md
}

/// A change → the DNS answer: a headless Service `probe` flips between one and two endpoints
/// (a manifest written), timed until the agent's DNS answers with the new count, polled from a
/// thread inside the bed's namespace. (p50, p99) in ms over `n` changes.
fn change_latency(c: &Cluster, n: usize) -> (f64, f64) {
    let probe = |k: usize| {
        let eps: Vec<String> = (0..k)
            .map(|i| format!("{{addresses: [198.18.9.{}]}}", i + 1))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: probe, namespace: bench}}\nspec: {{clusterIP: None}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: probe-1, namespace: bench, labels: {{kubernetes.io/service-name: probe}}}}\n\
             addressType: IPv4\nendpoints: [{}]\n",
            eps.join(", ")
        )
    };
    let ns = std::fs::File::open(c.node.path()).expect("open netns");
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // The polling thread enters the bed's namespace; the bench's own threads stay where they are.
    let poller = std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on this thread only, with a namespace fd we own.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.connect("127.0.0.1:5300").expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["probe", "bench", "svc", "cluster", "local"] {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 512];
        while let Ok(want) = rx.recv() {
            loop {
                if s.send(&q).is_ok()
                    && let Ok(n) = s.recv(&mut buf)
                    && n >= 12
                    && usize::from(u16::from_be_bytes([buf[6], buf[7]])) == want
                {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            done_tx.send(()).expect("done");
        }
    });
    let mut ms = Vec::with_capacity(n);
    for i in 0..=n {
        let k = 1 + (i % 2);
        let t = Instant::now();
        c.write_manifest("probe.yaml", &probe(k));
        tx.send(k).expect("send");
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("change answered");
        if i > 0 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    drop(tx);
    poller.join().expect("poller");
    crate::print_last_sync(c);
    ms.sort_by(f64::total_cmp);
    (crate::percentile(&ms, 0.5), crate::percentile(&ms, 0.99))
}

/// The section of the report.
pub fn bench(scales: &[usize], rounds: usize, secs: u32, load: u32) -> String {
    let started = Instant::now();
    let mut md = String::from(
        "### Cluster DNS\n\nqueries/s (median of rounds; lb ÷ peer in brackets) and p99 latency in µs at a fixed load of ",
    );
    let _ = writeln!(
        md,
        "{load} queries/s; `dnsperf` with 4 clients, each server alone on the bench namespace's loopback, {rounds} interleaved rounds × {secs} s.\n"
    );
    md.push_str("| Services | lb | knot | unbound | dnsmasq | p99 lb | p99 knot | p99 unbound | p99 dnsmasq | lb: change → answer p50 / p99 | lb: RSS of --dns |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for &n in scales {
        md.push_str(&scale(n, rounds, secs, load));
    }
    let _ = writeln!(
        md,
        "\nQuery mix per sampled Service: A (answer), AAAA (NODATA), A with a search suffix (NXDOMAIN), SRV, PTR. ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    md
}
