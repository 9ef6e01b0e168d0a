//! `cargo xtask demo`: a throw-away sandbox (netns pods + a child cgroup), `lb-agent` on the
//! example manifests, real traffic through `ClusterIPs`, a table of what happened, the
//! `lb-agent inspect` output, then teardown (Drop guards, also on failure).
use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Cluster, Value, peer_ip, wait_for};

/// The flags `examples/tutorial/README.md` gives: ranges inside the sandbox.
const TUTORIAL_FLAGS: [&str; 4] = [
    "--service-cidr",
    "198.19.0.0/16,2001:db8:f::/112",
    "--lb-ip-pool",
    "198.19.255.0/28",
];

/// A pod's resolv.conf as kubelet writes it for namespace `demo`.
const RESOLV_CONF: &str = "nameserver 198.19.0.53\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";

struct Row {
    what: &'static str,
    target: String,
    result: String,
    backends: String,
    client_view: String,
    backend_view: String,
}

fn summarize(results: &[Value], addr_field: &str) -> (String, String, String, String) {
    let ok = results.iter().filter(|r| r["ok"] == true).count();
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    let mut views = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        if r["ok"] == true {
            let reply = r["reply"].as_str().unwrap_or("");
            if let Some((name, peer)) = reply.split_once(' ') {
                *hits.entry(name.to_owned()).or_default() += 1;
                seen.insert(peer_ip(peer).to_string());
            }
            views.insert(r[addr_field].as_str().unwrap_or("").to_owned());
        } else {
            *errors
                .entry(r["error"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
    }
    let result = if errors.is_empty() {
        format!("{ok}/{} ok", results.len())
    } else {
        let ms = results
            .iter()
            .filter_map(|r| r["ms"].as_f64())
            .fold(0.0, f64::max);
        let e: Vec<String> = errors.iter().map(|(e, n)| format!("{e} ×{n}")).collect();
        if ms > 0.0 {
            format!("{} in {ms:.2} ms", e.join(", "))
        } else {
            e.join(", ")
        }
    };
    let hits = if hits.is_empty() {
        "-".into()
    } else {
        hits.iter()
            .map(|(b, n)| format!("{b}:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let j = |s: std::collections::BTreeSet<String>| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.into_iter().collect::<Vec<_>>().join(", ")
        }
    };
    (result, hits, j(views), j(seen))
}

#[expect(
    clippy::too_many_lines,
    reason = "a linear demo script reads best top to bottom"
)]
fn main() {
    let rc = std::env::temp_dir().join(format!("lb-demo-resolv-{}.conf", std::process::id()));
    fs::write(&rc, RESOLV_CONF).expect("resolv.conf");
    // SAFETY: set before any thread exists; every pod command the demo runs inherits it.
    unsafe { std::env::set_var("LBT_RESOLV_CONF", &rc) };
    let examples = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: lb-demo <examples/demo dir>"),
    );
    let t0 = Instant::now();
    println!("lb demo: socket-level ClusterIP load balancing in a throw-away sandbox\n");
    let mut c = Cluster::new("demo", 3);
    println!(
        "sandbox   netns {}-{{node,client,b1,b2,b3}}, cgroup {}, bpffs {}",
        c.node.name.trim_end_matches("-node"),
        c.cgroup.path.display(),
        c.bpffs.path.display()
    );
    for e in fs::read_dir(&examples).expect("examples dir").flatten() {
        let name = e.file_name().into_string().expect("utf8 name");
        c.write_manifest(&name, &fs::read_to_string(e.path()).expect("read example"));
        println!("manifest  {}", e.path().display());
    }
    let started = Instant::now();
    // The agent on the node (its namespace: the address pods reach its DNS listener by), with
    // the standalone control plane's ranges (README of examples/tutorial) and cluster DNS.
    c.agent_on_node();
    let mut flags = TUTORIAL_FLAGS.to_vec();
    flags.extend(lb_tests::CLUSTER_DNS_FLAGS);
    c.start_agent_with(&flags);
    wait_for(Duration::from_secs(5), || {
        c.backends_of("198.19.0.20:80/TCP")
    })
    .expect("agent programmed the examples");
    println!(
        "agent     attached and programmed in {:.0} ms\n",
        started.elapsed().as_secs_f64() * 1e3
    );

    let mut rows = Vec::new();
    let mut push = |what, target: &str, results: Vec<Value>, field: &str| {
        let (result, backends, client_view, backend_view) = summarize(&results, field);
        rows.push(Row {
            what,
            target: target.to_owned(),
            result,
            backends,
            client_view,
            backend_view,
        });
    };
    push(
        "TCP, IPv4 ClusterIP",
        "198.19.0.10:80",
        c.client(&["tcp", "198.19.0.10:80", "30"]),
        "peer",
    );
    push(
        "TCP, IPv6 ClusterIP",
        "[2001:db8:f::10]:80",
        c.client(&["tcp", "[2001:db8:f::10]:80", "30"]),
        "peer",
    );
    push(
        "UDP sendto/recvfrom",
        "198.19.0.10:53",
        c.client(&["udp", "198.19.0.10:53", "10"]),
        "from",
    );
    push(
        "TCP, no endpoints",
        "198.19.0.20:80",
        c.client(&["tcp", "198.19.0.20:80", "1"]),
        "peer",
    );
    push(
        "TCP, port not served",
        "198.19.0.10:81",
        c.client(&["tcp", "198.19.0.10:81", "1"]),
        "peer",
    );
    push(
        "TCP, not a Service",
        "198.19.0.99:80",
        c.client(&["tcp", "198.19.0.99:80", "1"]),
        "peer",
    );

    // A live change: the draining endpoint b3 becomes ready again.
    let web = fs::read_to_string(examples.join("web.yaml")).expect("web.yaml");
    let changed = Instant::now();
    c.write_manifest(
        "web.yaml",
        &web.replace(
            "{ready: false, serving: true, terminating: true}",
            "{ready: true}",
        ),
    );
    let want: Vec<String> = (11..=13).map(|i| format!("198.18.0.{i}:8080")).collect();
    wait_for(Duration::from_secs(5), || {
        (c.backends_of("198.19.0.10:80/TCP").as_deref() == Some(&want[..])).then_some(())
    })
    .expect("change applied");
    let took = changed.elapsed();
    push(
        "TCP after b3 turns ready",
        "198.19.0.10:80",
        c.client(&["tcp", "198.19.0.10:80", "30"]),
        "peer",
    );

    println!(
        "{:<26} {:<22} {:<28} {:<16} {:<22} BACKEND SEES CLIENT",
        "WHAT", "CLIENT → TARGET", "RESULT", "BACKENDS HIT", "CLIENT SEES PEER"
    );
    for r in &rows {
        println!(
            "{:<26} {:<22} {:<28} {:<16} {:<22} {}",
            r.what, r.target, r.result, r.backends, r.client_view, r.backend_view
        );
    }
    println!(
        "\nmanifest change → datapath: {:.0} ms (file written → `inspect` shows it)",
        took.as_secs_f64() * 1e3
    );

    for what in ["services", "stats"] {
        let out = Command::new(lb_tests::lb_agent())
            .args(["inspect", what, "--bpffs"])
            .arg(&c.bpffs.path)
            .output()
            .expect("inspect");
        println!(
            "\n$ lb-agent inspect {what} --bpffs {}\n{}",
            c.bpffs.path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let dir = examples.join("../tutorial");
    tutorial(&c, &dir.canonicalize().unwrap_or(dir));
    names(&c);
    drop(c);
    let _ = fs::remove_file(&rc);
    println!(
        "sandbox removed; demo took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Part three: connecting by name, with the pod's resolv.conf (kubelet's: the cluster DNS
/// Service, the namespace's search list, ndots:5) — answered by this node's agent through the
/// socket hooks.
fn names(c: &Cluster) {
    println!(
        "Connecting by name (resolv.conf: {})",
        RESOLV_CONF.replace('\n', "; ")
    );
    println!(
        "{:<27} {:<28} {:<38} {:<13} CONNECT",
        "WHAT", "NAME", "ANSWERED AS", "ADDRESS"
    );
    for (what, name, port) in [
        ("short name, search list", "web", 80),
        ("name.namespace", "web.demo", 80),
        ("fully qualified", "web.demo.svc.cluster.local.", 80),
        ("ExternalName (CNAME)", "www", 80),
        ("headless: a pod", "web-pods", 8080),
        ("headless: one pod by name", "web-1.web-pods", 8080),
    ] {
        let r = c.client(&["resolve", name]);
        let (fqdn, ip) = (
            r[0]["name"].as_str().unwrap_or("-").to_owned(),
            r[0]["answer"].as_str().unwrap_or("-").to_owned(),
        );
        let (result, hits, _, _) =
            summarize(&c.client(&["tcp", &format!("{name}:{port}"), "6"]), "peer");
        println!("{what:<27} {name:<28} {fqdn:<38} {ip:<13} {result} {hits}");
    }
    let srv = lb_tests::command_in(&c.client, Some(&c.cgroup), std::path::Path::new("dig"))
        .args([
            "@198.19.0.53",
            "+short",
            "_http._tcp.web.demo.svc.cluster.local",
            "SRV",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    println!(
        "\n$ dig @198.19.0.53 +short _http._tcp.web.demo.svc.cluster.local SRV   (from a pod)\n{srv}"
    );
}

/// Part two: the manifests of `examples/tutorial` — Pods and selectors, Endpoints, NodePort and
/// LoadBalancer Services with nothing allocated — loaded as they are.
fn tutorial(c: &Cluster, dir: &std::path::Path) {
    println!("Services as people write them: {}", dir.display());
    for e in fs::read_dir(dir).expect("examples/tutorial").flatten() {
        if e.path().extension().is_some_and(|x| x == "yaml") {
            // Beside the demo's own files (both have a web.yaml).
            let name = format!(
                "tutorial-{}",
                e.file_name().into_string().expect("utf8 name")
            );
            c.write_manifest(&name, &fs::read_to_string(e.path()).expect("read example"));
            println!("manifest  {}", e.path().display());
        }
    }
    let metrics = c.listen_addr("metrics");
    let get = |args: &[&str]| {
        // In the node's namespace, where the agent's metrics listener is.
        let out = lb_tests::command_in(&c.node, None, &lb_tests::lb_agent())
            .arg("get")
            .args(args)
            .args(["--metrics-addr", &metrics])
            .output()
            .expect("lb-agent get");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Wait until the control plane has made and served all of it.
    let svcs = wait_for(Duration::from_secs(5), || {
        let t = get(&["services", "-n", "tutorial"]);
        (t.lines().count() == 6 && t.contains("198.19.255.10")).then_some(t)
    })
    .expect("tutorial Services served");
    let col = |name: &str, i: usize| -> String {
        svcs.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(i).map(str::to_owned))
            .unwrap_or_default()
    };
    let port_of = |name: &str| -> String {
        // PORT(S) `80:31234/TCP` → the nodePort.
        col(name, 4)
            .split([':', '/'])
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    };
    let targets = [
        (
            "selector + named targetPort",
            format!("{}:80", col("web", 2)),
        ),
        (
            "selector-less + Endpoints",
            format!("{}:5432", col("db", 2)),
        ),
        (
            "NodePort, port allocated",
            format!("{}:{}", lb_tests::NODE_V4, port_of("web-nodeport")),
        ),
        (
            "LoadBalancer, loadBalancerIP",
            format!("{}:80", col("web-lb", 3)),
        ),
        (
            "LoadBalancer, from the pool",
            format!("{}:8000", col("web-lb-auto", 3)),
        ),
    ];
    wait_for(Duration::from_secs(5), || {
        c.backends_of(&format!("{}/TCP", targets[0].1))
            .filter(|b| b.len() == 3)
    })
    .expect("tutorial programmed");
    println!(
        "\n{:<30} {:<22} {:<12} BACKENDS HIT",
        "WHAT", "CLIENT → TARGET", "RESULT"
    );
    for (what, target) in &targets {
        let (result, hits, _, _) = summarize(&c.client(&["tcp", target, "12"]), "peer");
        println!("{what:<30} {target:<22} {result:<12} {hits}");
    }
    println!("\n$ lb-agent get services -n tutorial\n{svcs}");
    println!(
        "$ lb-agent get endpoints -n tutorial\n{}",
        get(&["endpoints", "-n", "tutorial"])
    );
}
