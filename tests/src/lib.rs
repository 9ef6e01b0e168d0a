//! Privileged test bed for `lb`: network namespaces, a child cgroup, a private bpffs directory,
//! an `lb-agent` process, backends and clients — each behind a Drop guard, so a failing test
//! still removes everything it made.
//!
//! Topology of a [`Cluster`] (all in namespaces this harness creates; nothing is linked to the
//! root namespace, and no namespace has a default route, so an address that is not rewritten
//! fails with ENETUNREACH instead of leaving):
//! ```text
//!   client pod (198.18.0.10, 2001:db8::10)  ─veth─┐
//!   backend b1 (198.18.0.11, 2001:db8::11)  ─veth─┤ br0 in the node namespace
//!   backend bN (198.18.0.1N, 2001:db8::1N)  ─veth─┘
//!   VIPs: 198.19.0.0/24, 2001:db8:f::/64 — not routed anywhere
//! ```
//! Clients run inside the client namespace *and* the test's child cgroup, where the agent
//! attaches the socket hooks. The agent itself runs in the root namespace with
//! `--cgroup <child> --bpffs <private dir>`.
use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use serde_json::Value;

pub mod apiserver;
pub mod multinode;
pub mod web;

/// Runs a shell command; panics with its output when it fails.
pub fn sh(cmd: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails (never skips) when the test bed cannot be built on this machine.
pub fn require_privileges() {
    // SAFETY: plain syscall without arguments.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged tests must run as root (they create netns, cgroups and BPF programs)"
    );
    for tool in ["ip", "bpftool"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: run `cargo xtask setup`"
        );
    }
}

/// Path of a binary of this workspace, next to the running test's target directory.
#[must_use]
pub fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // A binary's siblings are in its own directory (target/<profile>/); a test binary lives one
    // level deeper (target/<profile>/deps/).
    let dir = exe.parent().expect("exe dir");
    let candidates = [dir.join(name), dir.parent().expect("target dir").join(name)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} not built next to {}; run through `cargo xtask test` (or set {env})",
                exe.display()
            )
        })
}

#[must_use]
pub fn lb_agent() -> PathBuf {
    workspace_bin("lb-agent", "LB_AGENT")
}

#[must_use]
pub fn lbt() -> PathBuf {
    workspace_bin("lbt", "LBT")
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
#[must_use]
pub fn cgroup2_root() -> PathBuf {
    let mi = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mi.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(pre.split_whitespace().nth(4).expect("mount point")))
        })
        .expect("no cgroup2 mount on this machine")
}

/// Makes sure /sys/fs/bpf is a BPF filesystem.
pub fn ensure_bpffs() {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("mounts");
    if !mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        sh("mount -t bpf bpf /sys/fs/bpf");
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[must_use]
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Self {
            name: name.to_owned(),
        }
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child cgroup of the cgroup2 root. On drop, kills the processes still in it (only ever
/// ours: clients this harness put there) and removes it.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    #[must_use]
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        let _ = fs::remove_dir(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: sending a signal to a PID read from our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// A process we started, killed (by PID) and reaped on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `Command` that enters `netns` (and `cgroup`, if given) between fork and exec.
#[must_use]
pub fn command_in(netns: &Netns, cgroup: Option<&Cgroup>, program: &Path) -> Command {
    let ns = File::open(netns.path()).expect("open netns");
    let procs = cgroup.map(|c| {
        OpenOptions::new()
            .write(true)
            .open(c.path.join("cgroup.procs"))
            .expect("open cgroup.procs")
    });
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &procs
                && libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Starts `lbt serve NAME PROTO ADDR` in `netns` and waits for its `ready` line.
#[must_use]
pub fn serve(netns: &Netns, name: &str, proto: &str, addr: &str) -> Proc {
    let mut child = command_in(netns, None, &lbt())
        .args(["serve", name, proto, addr])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn backend");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("backend ready line");
    assert_eq!(line.trim(), "ready", "backend {name} {proto} did not start");
    Proc { child }
}

/// Runs an `lbt` command to completion; one JSON value per output line. Panics (with its
/// stderr) when it fails.
#[must_use]
pub fn lbt_json(cmd: &mut Command, what: &str) -> Vec<Value> {
    let out = cmd.output().expect("run lbt");
    assert!(
        out.status.success(),
        "lbt {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON from lbt: {l}: {e}")))
        .collect()
}

/// `lb-agent inspect WHAT -o json` against the pins in `bpffs`.
#[must_use]
pub fn inspect(bpffs: &Path, what: &str) -> Value {
    let out = Command::new(lb_agent())
        .args(["inspect", what, "-o", "json", "--bpffs"])
        .arg(bpffs)
        .output()
        .expect("inspect");
    assert!(
        out.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

/// A private directory on bpffs; on drop, `lb-agent cleanup` detaches and unpins everything.
pub struct Bpffs {
    pub path: PathBuf,
    cgroup: PathBuf,
}

impl Bpffs {
    /// A guard for `path` (pins made under it are removed on drop).
    pub fn new(path: &str, cgroup: &Path) -> Self {
        Self {
            path: PathBuf::from(path),
            cgroup: cgroup.to_owned(),
        }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let mut cmd = Command::new(lb_agent());
        cmd.args(["cleanup", "--bpffs"])
            .arg(&self.path)
            .stdout(Stdio::null());
        if self.cgroup.exists() {
            cmd.arg("--cgroup").arg(&self.cgroup);
        }
        let _ = cmd.status();
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    #[must_use]
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("mkdir temp");
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Polls `f` every 5 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The node's address in the test bed (on the node namespace's bridge).
pub const NODE_V4: &str = "198.18.0.1";
pub const NODE_V6: &str = "2001:db8::1";

/// Agent flags for cluster DNS in a bed: served on the node's address, the cluster DNS Service
/// at 198.19.0.53 created and steered to it, no upstream (nothing leaves the bed).
pub const CLUSTER_DNS_FLAGS: [&str; 6] = [
    "--dns",
    "198.18.0.1:53",
    "--cluster-dns",
    "198.19.0.53",
    "--dns-upstream",
    "127.0.0.1:9",
];

/// IPv4 and IPv6 address of pod `i` (0 = client, 1.. = backends).
#[must_use]
pub fn pod_v4(i: usize) -> String {
    format!("198.18.0.{}", 10 + i)
}

#[must_use]
pub fn pod_v6(i: usize) -> String {
    format!("2001:db8::{}", 10 + i)
}

/// The whole test bed. Field order is drop order: agent, servers, pins (cleanup needs the
/// cgroup), cgroup, files, netns.
pub struct Cluster {
    pub agent: Option<Proc>,
    pub servers: Vec<Proc>,
    pub bpffs: Bpffs,
    pub cgroup: Cgroup,
    pub manifests: TempDir,
    pub logs: TempDir,
    pub backends: Vec<Netns>,
    pub client: Netns,
    pub node: Netns,
    pub tag: String,
    agent_starts: usize,
    /// `Some(kubeconfig)`: the agent learns from an API server instead of `manifests`.
    pub kubeconfig: Option<PathBuf>,
    /// A command the agent is started through (e.g. `setpriv --bounding-set=…`).
    pub agent_prefix: Vec<String>,
}

impl Cluster {
    /// Builds the namespaces and starts `n` backends, each serving TCP :8080 and UDP :5353
    /// (dual-stack) and answering with its name (`b1`, `b2`, …) and the client address it saw.
    #[must_use]
    pub fn new(tag: &str, n: usize) -> Self {
        require_privileges();
        ensure_bpffs();
        let tag = format!("{tag}-{}", std::process::id());
        let node = Netns::new(&format!("lbt-{tag}-node"));
        // br0 carries the node's own address (198.18.0.1, 2001:db8::1): NodePort tests use it.
        sh(&format!(
            "ip -n {0} link add br0 type bridge && ip -n {0} link set br0 up && \
             ip -n {0} addr add {NODE_V4}/24 dev br0 && ip -n {0} addr add {NODE_V6}/64 dev br0 nodad",
            node.name
        ));
        let mk_pod = |i: usize, role: &str| {
            let ns = Netns::new(&format!("lbt-{tag}-{role}"));
            sh(&format!(
                "ip -n {node} link add p{i} type veth peer name eth0 netns {ns} && \
                 ip -n {node} link set p{i} master br0 up && \
                 ip -n {ns} addr add {v4}/24 dev eth0 && \
                 ip -n {ns} addr add {v6}/64 dev eth0 nodad && \
                 ip -n {ns} link set eth0 up",
                node = node.name,
                ns = ns.name,
                v4 = pod_v4(i),
                v6 = pod_v6(i),
            ));
            ns
        };
        let client = mk_pod(0, "client");
        let backends: Vec<Netns> = (1..=n).map(|i| mk_pod(i, &format!("b{i}"))).collect();
        let cgroup = Cgroup::new(&format!("lbt-{tag}"));
        let bpffs = Bpffs {
            path: PathBuf::from(format!("/sys/fs/bpf/lbt-{tag}")),
            cgroup: cgroup.path.clone(),
        };
        let mut c = Self {
            agent: None,
            servers: Vec::new(),
            bpffs,
            cgroup,
            manifests: TempDir::new(&format!("lbt-{tag}-manifests")),
            logs: TempDir::new(&format!("lbt-{tag}-logs")),
            backends,
            client,
            node,
            tag,
            agent_starts: 0,
            kubeconfig: None,
            agent_prefix: Vec::new(),
        };
        for i in 0..n {
            c.start_server(i, "tcp", "[::]:8080");
            c.start_server(i, "udp", "[::]:5353");
        }
        c
    }

    fn start_server(&mut self, i: usize, proto: &str, addr: &str) {
        let p = serve(&self.backends[i], &format!("b{}", i + 1), proto, addr);
        self.servers.push(p);
    }

    fn source_args(&self) -> Vec<std::ffi::OsString> {
        match &self.kubeconfig {
            Some(k) => vec!["--kubeconfig".into(), k.into()],
            None => vec!["--manifests".into(), self.manifests.path.clone().into()],
        }
    }

    /// Writes (or replaces) a manifest file.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        // Write-then-rename, as `kubectl`/editors do, so the agent never reads a torn file.
        let tmp = self.manifests.path.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("write manifest");
        fs::rename(&tmp, self.manifests.path.join(file)).expect("rename manifest");
    }

    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests.path.join(file)).expect("remove manifest");
    }

    #[must_use]
    pub fn agent_log(&self) -> String {
        (1..=self.agent_starts)
            .map(|n| {
                fs::read_to_string(self.logs.path.join(format!("agent-{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts `lb-agent run` and waits until it watches the manifests.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// [`Cluster::start_agent`] with extra `run` flags.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        let log_path = self.spawn_agent_with(extra);
        let p = self.agent.as_mut().expect("just spawned");
        let ready = wait_for(Duration::from_secs(20), || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "lb-agent exited with {st}:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            fs::read_to_string(&log_path)
                .ok()
                .filter(|l| l.contains("agent ready"))
                .map(|_| ())
        });
        assert!(
            ready.is_some(),
            "lb-agent not ready in 20 s:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// Starts `lb-agent run` with extra flags and returns its log's path at once, without waiting
    /// for it to be ready.
    pub fn spawn_agent_with(&mut self, extra: &[&str]) -> PathBuf {
        self.agent_starts += 1;
        let log_path = self
            .logs
            .path
            .join(format!("agent-{}.log", self.agent_starts));
        let log = File::create(&log_path).expect("agent log");
        let mut cmd = match self.agent_prefix.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(lb_agent());
                c
            }
            None => Command::new(lb_agent()),
        };
        let child = cmd
            .arg("run")
            .args(self.source_args())
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--bpffs")
            .arg(&self.bpffs.path)
            .args(["--node-name", "node-a"])
            // The standalone control plane's allocations: this bed's own, across restarts.
            .arg("--state-file")
            .arg(self.state_file())
            // The agent runs in the root namespace here: never let it pick interfaces there.
            .args(["--nodeport-interfaces", "none"])
            // Ephemeral ports: tests run in parallel; the bound addresses are in the log.
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--healthz-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            // LB_AGENT_LOG=debug (say) to see more of what an agent did.
            .env(
                "RUST_LOG",
                std::env::var("LB_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn lb-agent");
        self.agent = Some(Proc { child });
        log_path
    }

    /// Runs the agent (from its next start) in the node's network namespace, as on a real node:
    /// its listeners (DNS, metrics) are then on the node's addresses, reachable from pods.
    pub fn agent_on_node(&mut self) {
        self.agent_prefix = vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}", self.node.name),
        ];
    }

    /// Where the agent keeps its standalone allocations (`--state-file`).
    #[must_use]
    pub fn state_file(&self) -> PathBuf {
        self.logs.path.join("standalone-state.json")
    }

    /// Kills the agent with SIGKILL (the datapath stays attached: pinned links).
    pub fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill9();
        }
    }

    /// `GET path` from `addr`; `None` when nothing listens there.
    pub fn get(addr: &str, path: &str) -> Option<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// The address the agent's `what` listener ("metrics" or "healthz") bound, from its log.
    #[must_use]
    pub fn listen_addr(&self, what: &str) -> String {
        let log = self.agent_log();
        let tag = format!("what={what} addr=");
        log.lines()
            .filter_map(|l| l.split(&tag).nth(1))
            .next_back()
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {what} address in the agent log:\n{log}"))
            .to_owned()
    }

    /// `GET path` from the agent's `what` listener ("metrics" or "healthz"; the bound address is
    /// read from the agent's log). Returns the raw response (status line, headers, body).
    pub fn http_get(&self, what: &str, path: &str) -> String {
        use std::io::{Read as _, Write as _};
        let addr = self.listen_addr(what);
        let mut s =
            std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read response");
        out
    }

    /// Runs `lbt ARGS…` in `netns` and the test cgroup; one JSON value per line.
    fn lbt_in(&self, netns: &Netns, args: &[&str]) -> Vec<Value> {
        lbt_json(
            command_in(netns, Some(&self.cgroup), &lbt()).args(args),
            &format!("{args:?}"),
        )
    }

    /// Runs `lbt ARGS…` as a pod: in the client namespace and the test cgroup.
    #[must_use]
    pub fn client(&self, args: &[&str]) -> Vec<Value> {
        self.lbt_in(&self.client, args)
    }

    /// Runs `lbt ARGS…` as a host process: in the node namespace and the test cgroup.
    #[must_use]
    pub fn host_client(&self, args: &[&str]) -> Vec<Value> {
        self.lbt_in(&self.node, args)
    }

    /// Like [`Cluster::client`] but started in the background.
    #[must_use]
    pub fn client_bg(&self, args: &[&str]) -> Child {
        command_in(&self.client, Some(&self.cgroup), &lbt())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client")
    }

    /// `lb-agent cleanup --bpffs <ours> --cgroup <ours>`; panics when it fails.
    pub fn cleanup(&self) -> String {
        let out = Command::new(lb_agent())
            .args(["cleanup", "--bpffs"])
            .arg(&self.bpffs.path)
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .output()
            .expect("spawn lb-agent cleanup");
        assert!(
            out.status.success(),
            "cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `bpftool cgroup show <our cgroup>`: the programs attached there.
    pub fn attached_hooks(&self) -> String {
        attached_hooks(&self.cgroup.path)
    }

    /// `lb-agent inspect <what> -o json`.
    #[must_use]
    pub fn inspect(&self, what: &str) -> Value {
        inspect(&self.bpffs.path, what)
    }

    /// Backends of `frontend` (e.g. `198.19.0.10:80/TCP`) as `inspect` shows them, sorted.
    #[must_use]
    pub fn backends_of(&self, frontend: &str) -> Option<Vec<String>> {
        let v = self.inspect("services");
        v.as_array()?
            .iter()
            .find(|s| s["frontend"] == frontend)
            .map(|s| {
                let mut b: Vec<String> = s["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap_or("?").to_owned())
                    .collect();
                b.sort();
                b
            })
    }
}

/// `bpftool cgroup show <cgroup>`: the programs attached there.
pub fn attached_hooks(cgroup: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("spawn bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Service manifest: `ClusterIPs` and ports `(name, port, protocol)`.
#[must_use]
pub fn service(name: &str, ips: &[&str], ports: &[(&str, u16, &str)]) -> String {
    let ips = ips
        .iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let ports = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: {n}, port: {p}, protocol: {proto}}}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec: {{clusterIPs: [{ips}], ports: [{ports}]}}\n"
    )
}

/// An `EndpointSlice`: `endpoints` are `(address, ready, serving, terminating)`.
#[must_use]
pub fn slice(
    name: &str,
    service: &str,
    family: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&str, bool, bool, bool)],
) -> String {
    let ports = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: {n}, port: {p}, protocol: {proto}}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let eps = endpoints
        .iter()
        .map(|(a, r, s, t)| {
            format!(
                "{{addresses: ['{a}'], conditions: {{ready: {r}, serving: {s}, terminating: {t}}}}}"
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: test, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: [{ports}]\nendpoints: [{eps}]\n"
    )
}

/// The IP of a `SocketAddr` string, IPv4-mapped IPv6 folded to IPv4 (a dual-stack backend
/// reports an IPv4 client as `[::ffff:a.b.c.d]:port`).
#[must_use]
pub fn peer_ip(s: &str) -> std::net::IpAddr {
    s.parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{s:?} is not a socket address: {e}"))
        .ip()
        .to_canonical()
}

/// Turns transmit checksum offload off on `ifname` in `netns` (`ETHTOOL_STXCSUM` through the
/// `SIOCETHTOOL` ioctl; there is no ethtool binary here). A veth otherwise hands its peer frames
/// whose TCP/UDP checksum is only partial (`CHECKSUM_PARTIAL`), which native XDP cannot tell:
/// real NICs never deliver such frames.
pub fn tx_checksum_off(netns: &Netns, ifname: &str) {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    /// `struct ifreq` (40 bytes): the name, then the `ifr_data` member of its union.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let path = netns.path();
    let name = ifname.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this short-lived thread with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0, "socket");
        let mut v = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        let mut r = IfReq {
            name: [0; 16],
            data: (&raw mut v).cast(),
            _pad: [0; 16],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `r` is a valid ifreq whose data points at a live ethtool_value.
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut r) };
        let err = std::io::Error::last_os_error();
        // SAFETY: our own socket.
        unsafe { libc::close(fd) };
        assert_eq!(rc, 0, "ETHTOOL_STXCSUM off on {name}: {err}");
    })
    .join()
    .expect("ethtool thread");
}

/// The ClusterIP:port of the `i`-th Service of [`services_manifest`].
pub fn vip(i: usize) -> String {
    format!("198.19.{}.{}:80", i / 250, 1 + i % 250)
}

/// Services `from..from + n` (VIPs from 198.19.0.1, named `s<i>` in namespace `bench`), each
/// with one slice of 4 endpoints, as one multi-document manifest.
pub fn services_manifest(from: usize, n: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(n * 520);
    for i in from..from + n {
        let ip = vip(i);
        let ip = ip.trim_end_matches(":80");
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [198.18.20.10]}}, {{addresses: [198.18.20.11]}}, {{addresses: [198.18.20.12]}}, {{addresses: [198.18.20.13]}}]\n"
        );
    }
    s
}
