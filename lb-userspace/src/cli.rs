//! Command line of `lb-agent`. Later tools depend on these names: change them only additively.
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// eBPF socket-level load balancer for Kubernetes Services.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the datapath, then keep its maps equal to the Services and
    /// `EndpointSlices` found in the manifest directory.
    Run(Box<RunArgs>),
    /// Print what the pinned maps hold (no running agent needed).
    Inspect(InspectArgs),
    /// Detach every hook and remove every pin the agent made.
    Cleanup(CleanupArgs),
    /// Print the Services and EndpointSlices the standalone control plane serves (allocated
    /// addresses and ports, slices made from Pods), as `kubectl get` prints them: from the
    /// running agent, or computed from --manifests and --state-file without one.
    Get(GetArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GetWhat {
    /// Services, as `kubectl get services`.
    #[value(alias = "svc", alias = "service")]
    Services,
    /// EndpointSlices, as `kubectl get endpointslices`.
    #[value(alias = "endpointslices", alias = "ep")]
    Endpoints,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GetOutput {
    /// The table with more columns (a Service's selector).
    Wide,
    /// The objects as a cluster would store them, in a `List`.
    Json,
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[arg(value_enum)]
    pub what: GetWhat,
    /// Namespace to list.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// List every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format (default: a table).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<GetOutput>,
    /// The running agent's --metrics-addr (it serves what it programmed there).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: std::net::SocketAddr,
    /// Without asking an agent: read this manifest directory and --state-file (read-only)
    /// and print what an agent started with the same flags would serve.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// This node's name (its Node object), for --manifests.
    #[arg(long, env = "NODE_NAME", value_name = "N", default_value = "")]
    pub node_name: String,
    #[command(flatten)]
    pub standalone: StandaloneArgs,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Read Services and EndpointSlices from this directory of manifests (*.yaml, *.yml, *.json;
    /// multi-document and `kind: List` allowed) instead of the Kubernetes API. Watched.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API. Without it (and without --manifests) the agent uses
    /// the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Least time between two syncs: bursts of changes within it are applied together
    /// (kube-proxy's --iptables-min-sync-period, default there 1 s).
    #[arg(long, value_name = "DURATION", default_value = "20ms", value_parser = parse_duration)]
    pub min_sync_interval: std::time::Duration,
    /// This node's name (for node-local endpoint selection). Default: $NODE_NAME, else the hostname.
    #[arg(long, env = "NODE_NAME", value_name = "N")]
    pub node_name: Option<String>,
    /// cgroup v2 directory to attach the socket hooks to. Default: the cgroup2 mount root found
    /// in /proc/self/mountinfo (every process on the node).
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Directory on a BPF filesystem where maps and links are pinned.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    pub bpffs: PathBuf,
    /// Only handle Services labelled service.kubernetes.io/service-proxy-name=<NAME> (and
    /// unlabelled ones); by default Services carrying that label are left to their proxy.
    #[arg(long, value_name = "NAME")]
    pub proxy_name: Option<String>,
    /// `max_entries` of each service map (frontends + backend slots + one marker per VIP).
    #[arg(long, default_value_t = lb_common::DEFAULT_SVC_ENTRIES)]
    pub max_service_entries: u32,
    /// `max_entries` of each backend map.
    #[arg(long, default_value_t = lb_common::DEFAULT_BE_ENTRIES)]
    pub max_backend_entries: u32,
    /// `max_entries` of each per-socket reverse-NAT LRU map (unconnected UDP).
    #[arg(long, default_value_t = lb_common::DEFAULT_RNAT_ENTRIES)]
    pub max_revnat_entries: u32,
    /// Slots of the `connect()` reverse-NAT ring (a power of two; 48 bytes each). A socket's
    /// record stays there until this many later translated sockets have passed, and for good
    /// once the socket asks for its peer (getpeername, recvmsg); a socket that first asks
    /// later than that sees the backend's address as its peer.
    #[arg(long, default_value_t = lb_common::DEFAULT_RNAT_RING_ENTRIES, value_parser = parse_ring_size)]
    pub revnat_ring_entries: u32,
    /// `max_entries` of each packet-path conntrack/NAT LRU map (two entries per flow).
    #[arg(long, default_value_t = lb_common::DEFAULT_CT_ENTRIES)]
    pub max_conntrack_entries: u32,
    /// Maglev lookup-table size M for NodePort / LoadBalancer / externalIP traffic from outside:
    /// every node picks the same backend for a flow (ECMP in front of the nodes), and removing
    /// one of N backends moves about 1/N of flows. A prime from 251 to 131071; 0 = random
    /// backend selection. Each table costs 4 × M bytes of kernel memory.
    #[arg(long, default_value_t = lb_common::maglev::DEFAULT_MAGLEV_M, value_parser = parse_maglev_size)]
    pub maglev_table_size: u32,
    /// XDP fast path on the --nodeport-interfaces, in front of the tc path: IPv4 TCP/UDP flows
    /// to backends on other nodes that leave by the interface they came in on are translated
    /// and sent back out (XDP_TX) before the kernel allocates anything; source-range and
    /// Local-policy drops happen there too. Everything else goes on to tc unchanged.
    /// `generic` works everywhere but is no faster than tc; `native` needs driver support.
    #[arg(long, value_enum, default_value = "off")]
    pub xdp: crate::loader::XdpMode,
    /// External frontends (address, port, protocol) that may have a Maglev table; beyond it,
    /// frontends choose random backends (and a warning names them).
    #[arg(long, default_value_t = lb_common::maglev::DEFAULT_MAGLEV_FRONTENDS)]
    pub max_maglev_frontends: u32,
    /// Interfaces that receive NodePort / externalIP / LoadBalancer traffic from outside
    /// (tcx ingress + egress), comma-separated. Default: the interfaces holding a
    /// `--node-address`, plus the IPv4 default route's. `none`: no packet path.
    #[arg(long, value_name = "IFACES", value_delimiter = ',')]
    pub nodeport_interfaces: Option<Vec<String>>,
    /// Packet-path conntrack: an established TCP flow is forgotten after this long idle.
    #[arg(long, value_name = "DURATION", default_value = "6h", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_established: u64,
    /// Packet-path conntrack: a TCP flow not yet answered.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_syn: u64,
    /// Packet-path conntrack: a TCP flow after FIN or RST; its SNAT port is free only after
    /// this. Below 60s (Linux's TIME_WAIT) a backend may refuse a reused port's new SYN.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_close: u64,
    /// Packet-path conntrack: UDP (and other) flows.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    pub conntrack_udp_timeout: u64,
    /// How often expired packet-path conntrack entries are deleted.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub conntrack_gc_interval: std::time::Duration,
    /// The host's network namespace: sockets in it may use `127.0.0.1:<nodePort>`.
    #[arg(long, value_name = "PATH", default_value = "/proc/self/ns/net")]
    pub host_netns: PathBuf,
    /// Node address serving NodePorts to in-node clients (repeatable). Added to the Node's
    /// primary addresses (first InternalIP per family) when the source knows the Node (the API,
    /// or a manifest `kind: Node` named --node-name). With neither, NodePorts are served on
    /// every address of the node, as kube-proxy's iptables mode does.
    #[arg(long = "node-address", value_name = "IP")]
    pub node_addresses: Vec<std::net::IpAddr>,
    /// kube-proxy's --nodeport-addresses: NodePorts are served on the node's addresses inside
    /// these CIDRs, and with `primary` on the Node's primary addresses (repeatable or
    /// comma-separated). Default: the Node's primary addresses when the Node is known, else
    /// every address of the node.
    #[arg(long, value_name = "CIDR|primary", value_delimiter = ',', value_parser = parse_nodeport_address)]
    pub nodeport_addresses: Vec<crate::agent::NodePortAddress>,
    /// The standalone control plane (manifest mode).
    #[command(flatten)]
    pub standalone: StandaloneArgs,
    /// Serve cluster DNS on this address, UDP and TCP (repeatable; off when not given): the
    /// cluster zone from the same model as the datapath, other names forwarded upstream.
    #[arg(long = "dns", value_name = "ADDR:PORT")]
    pub dns: Vec<std::net::SocketAddr>,
    /// The cluster's DNS zone.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// TTL of cluster DNS answers, and of their negative answers, in seconds (CoreDNS's default).
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub dns_ttl: u32,
    /// Node-local DNS: connections and datagrams from this node to this Service's ClusterIP
    /// port 53 (`NAMESPACE/NAME`, e.g. kube-system/kube-dns) go to this agent's --dns listener
    /// (its first IPv4 and IPv6 address, which pods must reach: the node's address) while the
    /// agent is alive, and to the Service's endpoints otherwise (killed, restarting). Its
    /// upstream must not be that Service itself.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_ns_name, requires = "dns")]
    pub dns_service: Option<lb_model::model::NsName>,
    /// Manifest mode: create the cluster DNS Service `kube-system/kube-dns` with this ClusterIP
    /// (repeatable, one per family), ports 53/UDP and 53/TCP, so pods have a nameserver; it is
    /// the --dns-service unless another is given.
    #[arg(long, value_name = "IP", requires = "dns", requires = "manifests")]
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// Where names outside the cluster zone are resolved (repeatable, `IP` or `IP:PORT`).
    /// Default: the nameservers of /etc/resolv.conf.
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_upstream)]
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// Prometheus metrics (kube-proxy's names): GET /metrics.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: std::net::SocketAddr,
    /// Node health as kube-proxy serves it: GET /healthz and /livez.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub healthz_addr: std::net::SocketAddr,
    /// Address the healthCheckNodePort listeners bind to (port: each Service's).
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub healthcheck_bind_address: std::net::IpAddr,
    /// A change not in the datapath after this long fails /healthz and /livez.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub health_timeout: std::time::Duration,
    /// Full resync interval in seconds, in addition to file events.
    #[arg(long, default_value_t = 30)]
    pub resync_seconds: u64,
}

/// What the standalone control plane allocates from and where it keeps it (`run` and `get`).
#[derive(Debug, Clone, clap::Args)]
pub struct StandaloneArgs {
    /// Manifest mode: the service CIDRs ClusterIPs are allocated from, at most one per family,
    /// the primary family first (repeatable or comma-separated). When given, requested
    /// ClusterIPs must be inside them; by default (10.96.0.0/12 and fd00:10:96::/112) a
    /// manifest's own ClusterIPs are served as they are and only missing ones are allocated.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub service_cidr: Vec<lb_model::model::Cidr>,
    /// Manifest mode: NodePorts (and healthCheckNodePorts) are allocated from this range.
    #[arg(long, value_name = "FIRST-LAST", default_value = "30000-32767", value_parser = parse_port_range)]
    pub service_node_port_range: (u16, u16),
    /// Manifest mode: LoadBalancer ingress IPs are allocated from these pools (a CIDR or
    /// `first-last`; repeatable or comma-separated), honouring `spec.loadBalancerIP`. Without a
    /// pool, LoadBalancer Services stay pending, as on a cluster with no load-balancer controller.
    #[arg(long, value_name = "CIDR|RANGE", value_delimiter = ',', value_parser = parse_ip_range)]
    pub lb_ip_pool: Vec<lb_model::control::IpRange>,
    /// Manifest mode: the file that keeps the allocations (ClusterIPs, NodePorts, LoadBalancer
    /// IPs), so that they survive restarts; written atomically before the maps change.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/lb/standalone-state.json"
    )]
    pub state_file: PathBuf,
}

/// `30s`, `10m`, `6h` → whole seconds, at least 1.
fn parse_timeout(s: &str) -> Result<u64, String> {
    let (num, scale) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => return Err(format!("{s:?}: give a unit, e.g. 60s, 10m or 6h")),
    };
    let v: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of {num:?} units"))?;
    match v.checked_mul(scale) {
        Some(secs) if (1..=7 * 24 * 3600).contains(&secs) => Ok(secs),
        _ => Err(format!("{s:?} is out of range (1s to 7 days)")),
    }
}

/// `250ms`, `1s`, `1.5s`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("{s:?}: give a unit, e.g. 50ms or 1s"));
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    if !(0.0..=3600.0).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(v * scale))
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum What {
    /// Frontends with their backends.
    #[default]
    Services,
    /// Backends with their ids.
    Backends,
    /// Datapath counters, summed over CPUs.
    Stats,
    /// Packet-path connection tracking: every flow entry and its rewrite.
    Conntrack,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// What to list.
    #[arg(value_enum, default_value_t = What::Services)]
    pub what: What,
    /// Directory where the agent pinned its maps.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    pub bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// Directory where the agent pinned its maps and links.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    pub bpffs: PathBuf,
    /// cgroup the hooks were attached to: after unpinning, any `lb` hook still attached there
    /// (say, its pins were deleted by hand) is detached too.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
}

fn parse_ns_name(s: &str) -> Result<lb_model::model::NsName, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(lb_model::model::NsName {
                namespace: ns.into(),
                name: name.into(),
            })
        }
        _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
    }
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT` (port 53 when not given).
fn parse_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    lb_model::model::parse_ip(s)
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|e| format!("{s:?}: {e}"))
}

fn parse_cidr(s: &str) -> Result<lb_model::model::Cidr, String> {
    lb_model::model::Cidr::parse(s).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_ip_range(s: &str) -> Result<lb_model::control::IpRange, String> {
    lb_model::control::IpRange::parse(s)
}

fn parse_nodeport_address(s: &str) -> Result<crate::agent::NodePortAddress, String> {
    if s == "primary" {
        return Ok(crate::agent::NodePortAddress::Primary);
    }
    parse_cidr(s).map(crate::agent::NodePortAddress::Cidr)
}

/// `30000-32767`.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (a, b) = (port(a)?, port(b)?);
    if a > b {
        return Err(format!("{s:?}: the first port is above the last"));
    }
    Ok((a, b))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n.is_power_of_two() && (1..=1 << 24).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n}: a power of two from 1 to 16777216"))
    }
}

fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let m: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    crate::maglev::check_size(m)
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_timeout};

    #[test]
    fn timeouts_take_units_and_stay_in_range() {
        assert_eq!(parse_timeout("60s"), Ok(60));
        assert_eq!(parse_timeout("10m"), Ok(600));
        assert_eq!(parse_timeout("6h"), Ok(21_600));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("60").is_err());
        assert!(parse_timeout("1.5h").is_err());
        assert!(parse_timeout("200h").is_err());
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(super::parse_port_range("30000-32767"), Ok((30_000, 32_767)));
        assert!(super::parse_port_range("32767-30000").is_err());
        assert!(super::parse_port_range("0-10").is_err());
        assert!(super::parse_port_range("30000").is_err());
    }

    #[test]
    fn durations_take_ms_and_s() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration("1.5s"),
            Ok(std::time::Duration::from_millis(1500))
        );
        assert!(parse_duration("1").is_err());
    }
}
