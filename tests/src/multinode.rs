//! A test bed of several nodes, each with its own `lb-agent`, and a client outside the cluster.
//!
//! ```text
//!                        lan (bridge, in its own netns)
//!      ┌──────────────────────┼───────────────────────┐
//!   ext 198.18.100.2     node-1 eth0 198.18.100.11   node-2 eth0 198.18.100.12
//!   2001:db8:100::2        2001:db8:100::11            2001:db8:100::12
//!                          br0 198.18.1.1/24           br0 198.18.2.1/24
//!                          pods 198.18.1.1N            pods 198.18.2.1N
//! ```
//! Nodes route each other's pod subnets over the lan; pods' default route is their node. The
//! external client routes only the node addresses (on-link) and the LoadBalancer / external IP
//! range 198.18.200.0/24 via node-1: it has no route to any pod, so a packet the datapath fails
//! to translate goes nowhere. Nothing is connected to the root namespace.
//!
//! Each agent runs inside its node's network namespace with its own cgroup, bpffs directory and
//! `--node-name`, and the packet path on that node's `eth0`. All agents read the same manifest
//! directory: one cluster state.
use std::{
    fmt::Write as _,
    fs::{self, File},
    path::PathBuf,
    time::Duration,
};

use serde_json::Value;

use crate::{
    Bpffs, Cgroup, Netns, Proc, TempDir, command_in, ensure_bpffs, lb_agent, lbt,
    require_privileges, sh, wait_for,
};

/// The external client's addresses.
pub const EXT_V4: &str = "198.18.100.2";
pub const EXT_V6: &str = "2001:db8:100::2";
/// Where LoadBalancer and external IPs come from (routed to node-1 by the client).
pub const LB_RANGE_V4: &str = "198.18.200.0/24";
pub const LB_RANGE_V6: &str = "2001:db8:200::/64";

/// Node `n`'s (1-based) lan addresses.
#[must_use]
pub fn node_v4(n: usize) -> String {
    format!("198.18.100.{}", 10 + n)
}
#[must_use]
pub fn node_v6(n: usize) -> String {
    format!("2001:db8:100::{}", 10 + n)
}
/// Pod `i` (0-based) of node `n`.
#[must_use]
pub fn pod_v4(n: usize, i: usize) -> String {
    format!("198.18.{n}.{}", 10 + i)
}
#[must_use]
pub fn pod_v6(n: usize, i: usize) -> String {
    format!("2001:db8:{n}::{}", 10 + i)
}

/// One node: namespace, agent guards, pods.
pub struct Node {
    pub name: String,
    pub netns: Netns,
    pub cgroup: Cgroup,
    pub bpffs: Bpffs,
    pub agent: Option<Proc>,
    pub pods: Vec<Netns>,
    log: PathBuf,
}

/// The multi-node test bed (see the module docs). Fields drop in declaration order: servers and
/// agents first, then pins, then namespaces.
pub struct MultiNode {
    pub servers: Vec<Proc>,
    pub nodes: Vec<Node>,
    pub ext: Netns,
    pub lan: Netns,
    pub manifests: TempDir,
    pub logs: TempDir,
    pub tag: String,
}

impl MultiNode {
    /// `pods[n]` backends on node `n + 1`, each serving TCP :8080 and UDP :5353 (dual-stack)
    /// and answering with its name (`n1p0`, …) and the client address it saw.
    #[must_use]
    pub fn new(tag: &str, pods: &[usize]) -> Self {
        require_privileges();
        ensure_bpffs();
        let tag = format!("{tag}-{}", std::process::id());
        let lan = Netns::new(&format!("lbm-{tag}-lan"));
        sh(&format!(
            "ip -n {0} link add lanbr type bridge && ip -n {0} link set lanbr up",
            lan.name
        ));
        let ext = Netns::new(&format!("lbm-{tag}-ext"));
        sh(&format!(
            "ip -n {lan} link add x type veth peer name eth0 netns {ext} && \
             ip -n {lan} link set x master lanbr up && \
             ip -n {ext} addr add {EXT_V4}/24 dev eth0 && \
             ip -n {ext} addr add {EXT_V6}/64 dev eth0 nodad && ip -n {ext} link set eth0 up && \
             ip -n {ext} route add {LB_RANGE_V4} via {n1} && \
             ip -n {ext} -6 route add {LB_RANGE_V6} via {n1v6}",
            lan = lan.name,
            ext = ext.name,
            n1 = node_v4(1),
            n1v6 = node_v6(1),
        ));
        let manifests = TempDir::new(&format!("lbm-{tag}-manifests"));
        let logs = TempDir::new(&format!("lbm-{tag}-logs"));
        let mut nodes = Vec::new();
        let count = pods.len();
        for (k, &npods) in pods.iter().enumerate() {
            let n = k + 1;
            let ns = Netns::new(&format!("lbm-{tag}-n{n}"));
            let mut cmd = format!(
                "ip -n {lan} link add n{n} type veth peer name eth0 netns {ns} && \
                 ip -n {lan} link set n{n} master lanbr up && \
                 ip -n {ns} addr add {v4}/24 dev eth0 && \
                 ip -n {ns} addr add {v6}/64 dev eth0 nodad && ip -n {ns} link set eth0 up && \
                 ip -n {ns} link add br0 type bridge && ip -n {ns} link set br0 up && \
                 ip -n {ns} addr add 198.18.{n}.1/24 dev br0 && \
                 ip -n {ns} addr add 2001:db8:{n}::1/64 dev br0 nodad && \
                 ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
                lan = lan.name,
                ns = ns.name,
                v4 = node_v4(n),
                v6 = node_v6(n),
            );
            for m in (1..=count).filter(|m| *m != n) {
                let _ = write!(
                    cmd,
                    " && ip -n {ns} route add 198.18.{m}.0/24 via {gw} && \
                     ip -n {ns} -6 route add 2001:db8:{m}::/64 via {gw6}",
                    ns = ns.name,
                    gw = node_v4(m),
                    gw6 = node_v6(m),
                );
            }
            sh(&cmd);
            let mut pod_ns = Vec::new();
            for i in 0..npods {
                let p = Netns::new(&format!("lbm-{tag}-n{n}p{i}"));
                sh(&format!(
                    "ip -n {ns} link add p{i} type veth peer name eth0 netns {p} && \
                     ip -n {ns} link set p{i} master br0 up && \
                     ip -n {p} addr add {v4}/24 dev eth0 && \
                     ip -n {p} addr add {v6}/64 dev eth0 nodad && ip -n {p} link set eth0 up && \
                     ip -n {p} route add default via 198.18.{n}.1 && \
                     ip -n {p} -6 route add default via 2001:db8:{n}::1",
                    ns = ns.name,
                    p = p.name,
                    v4 = pod_v4(n, i),
                    v6 = pod_v6(n, i),
                ));
                pod_ns.push(p);
            }
            let cgroup = Cgroup::new(&format!("lbm-{tag}-n{n}"));
            let bpffs = Bpffs::new(&format!("/sys/fs/bpf/lbm-{tag}-n{n}"), &cgroup.path);
            nodes.push(Node {
                name: format!("node-{n}"),
                netns: ns,
                cgroup,
                bpffs,
                agent: None,
                pods: pod_ns,
                log: logs.path.join(format!("agent-n{n}.log")),
            });
        }
        let mut bed = Self {
            servers: Vec::new(),
            nodes,
            ext,
            lan,
            manifests,
            logs,
            tag,
        };
        for n in 0..count {
            for i in 0..bed.nodes[n].pods.len() {
                bed.start_server(n, i, "tcp", "[::]:8080");
                bed.start_server(n, i, "udp", "[::]:5353");
            }
        }
        bed
    }

    /// Starts a server in pod `i` of node index `n` (0-based).
    pub fn start_server(&mut self, n: usize, i: usize, proto: &str, addr: &str) {
        let name = format!("n{}p{i}", n + 1);
        let p = crate::serve(&self.nodes[n].pods[i], &name, proto, addr);
        self.servers.push(p);
    }

    /// Writes (or replaces) a manifest all agents read.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.path.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("write manifest");
        fs::rename(&tmp, self.manifests.path.join(file)).expect("rename manifest");
    }

    /// Starts every node's agent (packet path on `eth0`) and waits until each is ready.
    pub fn start_agents(&mut self) {
        self.start_agents_with(&[]);
    }

    /// [`MultiNode::start_agents`] with extra `run` flags.
    pub fn start_agents_with(&mut self, extra: &[&str]) {
        for n in 0..self.nodes.len() {
            self.start_agent(n, extra);
        }
    }

    /// Kills node `n`'s (0-based) agent with SIGKILL and starts a new one, which adopts the
    /// pinned maps and hands the links over.
    pub fn restart_agent(&mut self, n: usize, extra: &[&str]) {
        if let Some(mut p) = self.nodes[n].agent.take() {
            p.kill9();
        }
        self.start_agent(n, extra);
    }

    fn start_agent(&mut self, n: usize, extra: &[&str]) {
        let node = &self.nodes[n];
        let log = File::create(&node.log).expect("agent log");
        // The agent runs in the node's network namespace (its interfaces, its host netns for
        // 127.0.0.1 NodePorts) but in no test cgroup of its own: only the hooks go there.
        let child = command_in(&node.netns, None, &lb_agent())
            .arg("run")
            .arg("--manifests")
            .arg(&self.manifests.path)
            .arg("--cgroup")
            .arg(&node.cgroup.path)
            .arg("--bpffs")
            .arg(&node.bpffs.path)
            .args(["--node-name", &node.name])
            .arg("--state-file")
            .arg(node.log.with_extension("state.json"))
            .args(["--node-address", &node_v4(n + 1)])
            .args(["--node-address", &node_v6(n + 1)])
            .args(["--nodeport-interfaces", "eth0"])
            // `LB_TEST_XDP=generic|native`: every scenario again with the XDP path in front
            // (unless the test sets `--xdp` itself).
            .args(if extra.contains(&"--xdp") {
                Vec::new()
            } else {
                vec![
                    "--xdp".to_owned(),
                    std::env::var("LB_TEST_XDP").unwrap_or_else(|_| "off".into()),
                ]
            })
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--healthz-addr",
                "127.0.0.1:0",
            ])
            .args(["--conntrack-gc-interval", "1s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn lb-agent");
        let mut p = Proc { child };
        let path = node.log.clone();
        let ready = wait_for(Duration::from_secs(20), || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "lb-agent on {} exited with {st}:\n{}",
                    node.name,
                    fs::read_to_string(&path).unwrap_or_default()
                );
            }
            fs::read_to_string(&path)
                .ok()
                .filter(|l| l.contains("agent ready"))
                .map(|_| ())
        });
        assert!(
            ready.is_some(),
            "lb-agent on {} not ready in 20 s:\n{}",
            node.name,
            fs::read_to_string(&path).unwrap_or_default()
        );
        self.nodes[n].agent = Some(p);
    }

    /// Agent logs of every node.
    #[must_use]
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Routes the LoadBalancer range from the external client via node `n` (1-based), as an
    /// ECMP router in front of the nodes might for any flow.
    pub fn route_lb_via(&self, n: usize) {
        sh(&format!(
            "ip -n {ext} route replace {LB_RANGE_V4} via {v4} && ip -n {ext} -6 route replace {LB_RANGE_V6} via {v6}",
            ext = self.ext.name,
            v4 = node_v4(n),
            v6 = node_v6(n),
        ));
    }

    /// Runs `lbt ARGS…` on the external client; one JSON value per line.
    #[must_use]
    pub fn ext_client(&self, args: &[&str]) -> Vec<Value> {
        crate::lbt_json(
            command_in(&self.ext, None, &lbt()).args(args),
            &format!("{args:?}"),
        )
    }

    /// `GET path` from the external client (HTTP/1.1, raw response), `None` on no answer.
    #[must_use]
    pub fn ext_http(&self, addr: &str, path: &str) -> Option<String> {
        let out = command_in(&self.ext, None, &lbt())
            .args(["http", addr, path])
            .output()
            .expect("run lbt http");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lb-agent inspect WHAT -o json` against node `n`'s (0-based) pins.
    #[must_use]
    pub fn inspect(&self, n: usize, what: &str) -> Value {
        crate::inspect(&self.nodes[n].bpffs.path, what)
    }

    /// Datapath counter `name` on node `n` (0-based).
    #[must_use]
    pub fn stat(&self, n: usize, name: &str) -> u64 {
        let s = self.inspect(n, "stats");
        s.get(name)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no counter {name} in {s}"))
    }

    /// Packets node `n` dropped for `reason` (`drop_no_local`, `nat_port_exhausted`, …), by tc
    /// or by XDP in front of it (`LB_TEST_XDP`): each program counts its own drops.
    pub fn drops(&self, n: usize, reason: &str) -> u64 {
        self.stat(n, &format!("tc_{reason}")) + self.stat(n, &format!("xdp_{reason}"))
    }
}

/// An EndpointSlice whose endpoints carry `nodeName`: `(address, node)`.
#[must_use]
pub fn slice_on_nodes(
    svc: &str,
    name: &str,
    family: &str,
    ports: &[(&str, u16, &str)],
    eps: &[(&str, &str)],
) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: \"{n}\", port: {p}, protocol: {proto}}}"))
        .collect();
    let eps: Vec<String> = eps
        .iter()
        .map(|(a, node)| format!("{{addresses: [\"{a}\"], nodeName: {node}}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: {family}\nports: [{}]\nendpoints: [{}]\n",
        ports.join(", "),
        eps.join(", ")
    )
}
