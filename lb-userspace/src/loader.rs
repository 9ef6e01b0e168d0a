//! Load, pin, attach, adopt, clean up.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/lb`):
//! ```text
//! LB4_SVC_V1 LB4_BE_V1 LB6_SVC_V1 … LB_STATS_V4 LB_MAGLEV_V1 (lb_common::ALL_MAPS)   maps
//! links/sock4_connect links/sock4_sendmsg …                                          bpf_links
//! links/tc_in_<ifname> links/tc_eg_<ifname>              tcx links on --nodeport-interfaces
//! links/xdp_<ifname>                                     XDP links (--xdp)
//! ```
//! Maps are pinned by name and reused by the next agent (adoption: the datapath keeps its state
//! and the new agent reads it into its shadow). Links are pinned so that programs stay attached
//! when the agent exits or is killed; a new agent attaches its own programs first and then
//! `rename()`s its link pins over the old ones, so the cgroup is never without the hooks.
use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
    },
};
use lb_common::{ALL_MAPS, MAP_BE4, MAP_BE6, MAP_RNAT4, MAP_RNAT6, MAP_SVC4, MAP_SVC6};

use crate::maps::{self, BpfMaps};

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The datapath's eBPF object (empty when built with `AYA_BUILD_SKIP`), for tests that load it
/// themselves (packet fixtures through `BPF_PROG_TEST_RUN`).
#[must_use]
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Every socket hook, by program (function) name.
pub const PROGRAMS: [&str; 8] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeername",
    "sock6_connect",
    "sock6_sendmsg",
    "sock6_recvmsg",
    "sock6_getpeername",
];

/// The packet-path programs: (program, attach point, link pin prefix).
pub const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("tc_nodeport_ingress", TcAttachType::Ingress, "tc_in_"),
    ("tc_nodeport_egress", TcAttachType::Egress, "tc_eg_"),
];

/// The XDP program and its link pin prefix.
pub const XDP_PROGRAM: (&str, &str) = ("xdp_nodeport", "xdp_");

/// `--xdp`: the XDP fast path in front of the tc packet path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): fastest; the interface's driver must support it.
    Native,
    /// On the skb (`XDP_FLAGS_SKB_MODE`): works on every interface, no faster than tc.
    Generic,
    /// No XDP program: the tc path handles everything.
    Off,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the eBPF object was not built (AYA_BUILD_SKIP was set when lb-agent was compiled)")]
    NotBuilt,
    #[error("{path}: not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("{path}: cannot create or inspect")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object failed")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {what} failed")]
    Program {
        name: &'static str,
        what: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: attach to interface {iface} failed (tcx needs Linux ≥ 6.6)")]
    Interface {
        name: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: the kernel did not give a bpf_link (needs Linux ≥ 5.7)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("program {name}: pinning its link at {path} failed")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error("no cgroup2 mount in /proc/self/mountinfo; pass --cgroup")]
    NoCgroup2,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Map sizes chosen at load time (ignored for maps adopted from pins).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub services: u32,
    pub backends: u32,
    pub revnat: u32,
    /// Slots of the `connect()` reverse-NAT ring (a power of two).
    pub revnat_ring: u32,
    /// Conntrack entries per family (packet path).
    pub conntrack: u32,
    /// Maglev table size M (a prime; 0 = no Maglev): a load-time global of the packet path.
    pub maglev_m: u32,
    /// External frontends that may have a Maglev table.
    pub maglev_frontends: u32,
}

/// Finds the cgroup2 mount point in /proc/self/mountinfo (field 5 of the line whose filesystem
/// type, after the ` - ` separator, is `cgroup2`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Io {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(Error::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(pre.split_whitespace().nth(4)?)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the right type.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the struct.
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64 but not on every target"
    )]
    Ok(i64::from(unsafe { st.assume_init() }.f_type))
}

/// Creates `dir` (and `dir/links`) on a BPF filesystem.
pub fn prepare_bpffs(dir: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir.join(LINKS_DIR)).map_err(io)?;
    if statfs_type(dir).map_err(io)? != BPF_FS_MAGIC {
        return Err(Error::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// The netns cookie of the network namespace at `path` (e.g. `/proc/self/ns/net`): a thread
/// enters it (unless it is ours), opens a socket and asks for `SO_NETNS_COOKIE` (Linux 5.14). Only that thread
/// changes namespace.
pub fn netns_cookie(path: &Path) -> Result<u64> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let ns = File::open(path).map_err(io)?;
    // Entering a namespace needs CAP_SYS_ADMIN, even our own: on a node the host netns *is*
    // ours (hostNetwork), so only a different one is entered.
    let enter = {
        use std::os::unix::fs::MetadataExt as _;
        let target = ns.metadata().map_err(io)?;
        let own = fs::metadata("/proc/thread-self/ns/net").map_err(io)?;
        (target.dev(), target.ino()) != (own.dev(), own.ino())
    };
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<u64> {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on this thread only, with an fd we own.
            if enter && unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let mut cookie = 0u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            // SAFETY: valid socket fd and a correctly sized out-buffer.
            let rc = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NETNS_COOKIE,
                    (&raw mut cookie).cast(),
                    &raw mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(cookie)
        })
        .join()
        .expect("netns cookie thread")
    })
    .map_err(io)
}

/// Slots of the `connect()` reverse-NAT ring: a pinned ring's own size when one is adopted (the
/// programs index it with this mask), else `wanted` rounded up to a power of two.
fn ring_entries(bpffs: &Path, wanted: u32) -> u32 {
    let pinned = aya::maps::MapData::from_pin(bpffs.join(lb_common::MAP_RNAT_RING))
        .and_then(|m| m.info())
        .map(|i| i.max_entries())
        .ok()
        .filter(|n| n.is_power_of_two());
    if let Some(n) = pinned
        && n != wanted
    {
        tracing::warn!(
            map = lb_common::MAP_RNAT_RING,
            "keeping the pinned ring's {n} slots (asked for {wanted}); remove the pin to resize"
        );
    }
    pinned.unwrap_or_else(|| wanted.next_power_of_two().max(1))
}

/// Loads the datapath, adopting pinned maps, and attaches every hook to `cgroup`, replacing the
/// links of a previous agent without a gap. Returns the map handles for `sync`.
pub fn load_and_attach(
    bpffs: &Path,
    cgroup: &Path,
    sizes: Sizes,
    host_netns_cookie: u64,
    nodeport_ifaces: &[String],
    xdp: XdpMode,
    timeouts: &lb_common::CtTimeouts,
) -> Result<BpfMaps> {
    if OBJECT.is_empty() {
        return Err(Error::NotBuilt);
    }
    prepare_bpffs(bpffs)?;
    maps::check_layouts(bpffs)?;
    let cg = File::open(cgroup).map_err(|source| Error::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;

    let pins: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|n| (*n, bpffs.join(n))).collect();
    let mut loader = EbpfLoader::new();
    loader.override_global(lb_common::GLOBAL_HOST_NETNS, &host_netns_cookie, true);
    let t = [
        timeouts.tcp_established_s,
        timeouts.tcp_syn_s,
        timeouts.tcp_closing_s,
        timeouts.other_s,
    ];
    for (name, v) in lb_common::GLOBALS_CT_TIMEOUTS.iter().zip(&t) {
        loader.override_global(name, v, true);
    }
    loader.override_global(lb_common::maglev::GLOBAL_MAGLEV_M, &sizes.maglev_m, true);
    let ring_mask = ring_entries(bpffs, sizes.revnat_ring) - 1;
    loader.override_global(lb_common::GLOBAL_RNAT_RING_MASK, &ring_mask, true);
    // Twice the room the tables need: a sync writes new chunks before deleting old ones.
    let maglev_entries =
        2 * sizes.maglev_frontends.max(1) * lb_common::maglev::chunks(sizes.maglev_m.max(1));
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(MAP_SVC4, sizes.services)
        .map_max_entries(MAP_SVC6, sizes.services)
        .map_max_entries(MAP_BE4, sizes.backends)
        .map_max_entries(MAP_BE6, sizes.backends)
        .map_max_entries(MAP_RNAT4, sizes.revnat)
        .map_max_entries(MAP_RNAT6, sizes.revnat)
        .map_max_entries(lb_common::MAP_RNAT_RING, ring_mask + 1)
        .map_max_entries(lb_common::MAP_CT4, sizes.conntrack)
        .map_max_entries(lb_common::MAP_CT6, sizes.conntrack)
        .map_max_entries(lb_common::maglev::MAP_MAGLEV, maglev_entries);
    let mut ebpf: Ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;

    // Attach everything first; only when all hooks are attached replace the old pins.
    let mut links: Vec<(String, FdLink)> = Vec::new();
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = loaded(&mut ebpf, name, CgroupSockAddr::load)?;
        // `Single` = flags 0: BPF_LINK_CREATE for cgroups rejects any flag and always attaches
        // with multi-program semantics (kernel/bpf/cgroup.c, cgroup_bpf_link_attach), so we
        // coexist with other programs on the cgroup and with our predecessor during handover.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| Error::Program {
                name,
                what: "attach",
                source,
            })?;
        let link = prog.take_link(id).map_err(|source| Error::Program {
            name,
            what: "take link",
            source,
        })?;
        let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
        links.push((name.to_owned(), link));
    }
    links.extend(attach_tc(&mut ebpf, nodeport_ifaces)?);
    links.extend(attach_xdp(&mut ebpf, bpffs, nodeport_ifaces, xdp)?);
    // Packet-path links on interfaces no longer configured (or XDP turned off): unpinning
    // detaches them.
    let wanted: Vec<&String> = links.iter().map(|(n, _)| n).collect();
    for old in pinned_links(bpffs) {
        if (old.starts_with("tc_") || old.starts_with(XDP_PROGRAM.1))
            && !wanted.iter().any(|w| **w == old)
        {
            let p = bpffs.join(LINKS_DIR).join(&old);
            fs::remove_file(&p).map_err(|source| Error::Io { path: p, source })?;
        }
    }
    for (pin_name, link) in links {
        let fin = bpffs.join(LINKS_DIR).join(&pin_name);
        // bpffs refuses names with dots (kernel/bpf/inode.c, bpf_lookup).
        let tmp = bpffs.join(LINKS_DIR).join(format!("{pin_name}_new"));
        let _ = fs::remove_file(&tmp);
        let pinned: PinnedLink = link.pin(&tmp).map_err(|source| Error::PinLink {
            name: "link",
            path: tmp.clone(),
            source,
        })?;
        // Atomic replace: the old link (if any) loses its last reference and detaches.
        fs::rename(&tmp, &fin).map_err(|source| Error::Io {
            path: fin.clone(),
            source,
        })?;
        drop(pinned); // the pin keeps it attached
    }
    // Our programs replaced the ones that used maps of older layouts: unpin those maps (the
    // kernel frees them with their last reference).
    for name in lb_common::SUPERSEDED_MAPS {
        let p = bpffs.join(name);
        if p.exists() {
            fs::remove_file(&p).map_err(|source| Error::Io { path: p, source })?;
        }
    }
    drop(ebpf); // programs live on in their pinned links, maps in their pins
    Ok(BpfMaps::from_pins(bpffs)?)
}

/// Program `name` of the object, as type `T`, loaded into the kernel (verified).
fn loaded<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    load: impl FnOnce(&mut T) -> std::result::Result<(), aya::programs::ProgramError>,
) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut T = ebpf
        .program_mut(name)
        .ok_or(Error::Program {
            name,
            what: "find",
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| Error::Program {
            name,
            what: "type check",
            source,
        })?;
    load(prog).map_err(|source| Error::Program {
        name,
        what: "load (verifier)",
        source,
    })?;
    Ok(prog)
}

/// Loads the packet-path programs and attaches them with tcx to each interface, first in the
/// chain (so a CNI's programs after ours see translated packets). Returns (pin name, link).
fn attach_tc(ebpf: &mut Ebpf, ifaces: &[String]) -> Result<Vec<(String, FdLink)>> {
    let mut out = Vec::new();
    if ifaces.is_empty() {
        return Ok(out);
    }
    for (name, attach_type, prefix) in TC_PROGRAMS {
        let prog: &mut SchedClassifier = loaded(ebpf, name, SchedClassifier::load)?;
        for iface in ifaces {
            let id = prog
                .attach_with_options(
                    iface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|source| Error::Interface {
                    name,
                    iface: iface.clone(),
                    source,
                })?;
            let link = prog.take_link(id).map_err(|source| Error::Program {
                name,
                what: "take link",
                source,
            })?;
            let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
            out.push((format!("{prefix}{}", iface.replace('.', "_")), link));
        }
    }
    Ok(out)
}

/// Attempts at attaching XDP where a predecessor's link is still being released, and the pause
/// between them: 2 s in all.
const XDP_REPLACE_TRIES: u32 = 40;
const XDP_REPLACE_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Loads the XDP program and attaches it to each interface in `mode` (none when off).
///
/// An interface takes one XDP link: a predecessor's is detached first (its pin removed), then
/// ours attached. In between, packets simply take the tc path, which handles all of them.
fn attach_xdp(
    ebpf: &mut Ebpf,
    bpffs: &Path,
    ifaces: &[String],
    mode: XdpMode,
) -> Result<Vec<(String, FdLink)>> {
    let mut out = Vec::new();
    let flags = match mode {
        XdpMode::Off => return Ok(out),
        XdpMode::Native => aya::programs::xdp::XdpMode::Driver,
        XdpMode::Generic => aya::programs::xdp::XdpMode::Skb,
    };
    if ifaces.is_empty() {
        return Ok(out);
    }
    let (name, prefix) = XDP_PROGRAM;
    let prog: &mut Xdp = loaded(ebpf, name, Xdp::load)?;
    for iface in ifaces {
        let pin_name = format!("{prefix}{}", iface.replace('.', "_"));
        let old = bpffs.join(LINKS_DIR).join(&pin_name);
        let replacing = old.exists();
        if replacing {
            fs::remove_file(&old).map_err(|source| Error::Io { path: old, source })?;
        }
        // The predecessor's link goes away with its last reference, which the kernel may drop
        // a moment after the pin (and a killed agent's descriptors) are gone: until then the
        // interface is busy. Retry for a while before calling it a failure.
        let mut tries = 0;
        let id = loop {
            match prog.attach(iface, flags) {
                Ok(id) => break id,
                Err(_) if replacing && tries < XDP_REPLACE_TRIES => {
                    tries += 1;
                    std::thread::sleep(XDP_REPLACE_PAUSE);
                }
                Err(source) => {
                    return Err(Error::Interface {
                        name,
                        iface: iface.clone(),
                        source,
                    });
                }
            }
        };
        let link = prog.take_link(id).map_err(|source| Error::Program {
            name,
            what: "take link",
            source,
        })?;
        let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
        out.push((pin_name, link));
    }
    Ok(out)
}

/// Interfaces for the packet path when `--nodeport-interfaces` is not given: those holding one
/// of `addrs` (the node addresses NodePorts are served on), plus the one of the IPv4 default
/// route. Loopback never.
pub fn detect_nodeport_interfaces(addrs: &[std::net::IpAddr]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |n: String| {
        if n != "lo" && !out.contains(&n) {
            out.push(n);
        }
    };
    for (name, ip) in interface_addresses() {
        if addrs.contains(&ip) {
            push(name);
        }
    }
    // /proc/net/route: Iface, Destination (hex), …; destination 00000000 = default.
    if let Ok(t) = fs::read_to_string("/proc/net/route") {
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 2 && f[1] == "00000000" {
                push(f[0].to_owned());
            }
        }
    }
    out
}

/// The addresses of this node that NodePorts may be served on: every address of this network
/// namespace but loopback and link-local ones (kube-proxy iptables mode's default).
#[must_use]
pub fn node_local_addresses() -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = Vec::new();
    for (_, ip) in interface_addresses() {
        let link_local = match ip {
            std::net::IpAddr::V4(a) => a.is_link_local(),
            std::net::IpAddr::V6(a) => a.is_unicast_link_local(),
        };
        if !ip.is_loopback() && !link_local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// (interface name, address) of every address of this network namespace (`getifaddrs`).
fn interface_addresses() -> Vec<(String, std::net::IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `ifa_addr` is non-null and points at a sockaddr of the family it names.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in>());
                    Some(std::net::IpAddr::from(sa.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in6>());
                    Some(std::net::IpAddr::from(sa.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            out.push((name, ip));
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Detaches every hook and removes every pin under `bpffs`. Returns what was removed.
pub fn cleanup(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = bpffs.join(LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            let p = e.path();
            // Unpinning drops the last reference to the bpf_link: the program detaches.
            fs::remove_file(&p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            removed.push(p);
        }
        fs::remove_dir(&links).map_err(|source| Error::Io {
            path: links.clone(),
            source,
        })?;
    }
    for name in ALL_MAPS {
        let p = bpffs.join(name);
        if p.exists() {
            fs::remove_file(&p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            removed.push(p);
        }
    }
    if bpffs.exists() {
        fs::remove_dir(bpffs).map_err(|source| Error::Io {
            path: bpffs.to_owned(),
            source,
        })?;
    }
    Ok(removed)
}

/// Detaches every `lb` socket hook still attached to `cgroup` through a `bpf_link` that nobody
/// pinned (its pin removed by hand, say). Walks all links with `BPF_LINK_GET_NEXT_ID`, keeps the
/// cgroup links whose cgroup id is `cgroup`'s inode and whose program carries one of our names,
/// and `BPF_LINK_DETACH`es them. Returns how many were detached.
pub fn detach_leftovers(cgroup: &Path) -> Result<usize> {
    use std::os::unix::fs::MetadataExt as _;
    let cg_id = fs::metadata(cgroup)
        .map_err(|source| Error::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?
        .ino();
    let mut detached = 0;
    let mut id = 0u32;
    while let Some(next) = raw::next_link_id(id) {
        id = next;
        let Some(fd) = raw::link_fd(id) else { continue };
        let Some(info) = raw::link_info(&fd) else {
            continue;
        };
        if info.link_type != raw::BPF_LINK_TYPE_CGROUP || info.cgroup_id != cg_id {
            continue;
        }
        let Some(name) = raw::prog_name(info.prog_id) else {
            continue;
        };
        // The kernel keeps 15 bytes of a program name.
        if PROGRAMS
            .iter()
            .any(|p| p.as_bytes()[..p.len().min(15)] == *name.as_bytes())
        {
            raw::link_detach(&fd).map_err(|source| Error::Io {
                path: cgroup.to_owned(),
                source,
            })?;
            detached += 1;
        }
    }
    Ok(detached)
}

/// The few `bpf(2)` commands `detach_leftovers` needs and aya does not expose.
mod raw {
    use std::{
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
    const BPF_LINK_DETACH: libc::c_long = 34;
    pub(super) const BPF_LINK_TYPE_CGROUP: u32 = 3;

    /// Large enough for every union member of `union bpf_attr` we use.
    #[repr(C, align(8))]
    #[derive(Default)]
    struct Attr([u32; 16]);

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
        // SAFETY: `attr` is a valid, zero-initialised bpf_attr of sufficient size for `cmd`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                size_of::<Attr>(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn fd_from(rc: i64) -> OwnedFd {
        // SAFETY: the kernel returned a new file descriptor that nobody else owns.
        unsafe { OwnedFd::from_raw_fd(rc as i32) }
    }

    pub(super) fn next_link_id(start: u32) -> Option<u32> {
        let mut a = Attr::default();
        a.0[0] = start;
        bpf(BPF_LINK_GET_NEXT_ID, &mut a).ok().map(|_| a.0[1])
    }

    pub(super) fn link_fd(id: u32) -> Option<OwnedFd> {
        let mut a = Attr::default();
        a.0[0] = id;
        bpf(BPF_LINK_GET_FD_BY_ID, &mut a).ok().map(fd_from)
    }

    fn info_by_fd(fd: &OwnedFd, buf: &mut [u64]) -> Option<()> {
        let mut a = Attr::default();
        a.0[0] = fd.as_raw_fd() as u32;
        a.0[1] = (buf.len() * 8) as u32;
        let ptr = buf.as_mut_ptr() as u64;
        a.0[2] = ptr as u32;
        a.0[3] = (ptr >> 32) as u32;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).ok().map(|_| ())
    }

    pub(super) struct LinkInfo {
        pub(super) link_type: u32,
        pub(super) prog_id: u32,
        pub(super) cgroup_id: u64,
    }

    /// `struct bpf_link_info`: type u32 @0, id u32 @4, `prog_id` u32 @8, `cgroup.cgroup_id` u64 @16.
    pub(super) fn link_info(fd: &OwnedFd) -> Option<LinkInfo> {
        let mut buf = [0u64; 8];
        info_by_fd(fd, &mut buf)?;
        Some(LinkInfo {
            link_type: buf[0] as u32,
            prog_id: buf[1] as u32,
            cgroup_id: buf[2],
        })
    }

    /// `struct bpf_prog_info`: name[16] @64.
    pub(super) fn prog_name(prog_id: u32) -> Option<String> {
        let mut a = Attr::default();
        a.0[0] = prog_id;
        let fd = fd_from(bpf(BPF_PROG_GET_FD_BY_ID, &mut a).ok()?);
        let mut buf = [0u64; 32];
        info_by_fd(&fd, &mut buf)?;
        let bytes: Vec<u8> = buf[8..10]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .take_while(|b| *b != 0)
            .collect();
        String::from_utf8(bytes).ok()
    }

    pub(super) fn link_detach(fd: &OwnedFd) -> io::Result<()> {
        let mut a = Attr::default();
        a.0[0] = fd.as_raw_fd() as u32;
        bpf(BPF_LINK_DETACH, &mut a).map(|_| ())
    }
}

/// Names of the links currently pinned (for `inspect` and tests).
#[must_use]
pub fn pinned_links(bpffs: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(bpffs.join(LINKS_DIR))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let mi = "25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                  42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let optional = "41 31 0:38 / /sys/fs/cgroup rw shared:9 master:1 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(optional),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / /a\\040b rw - cgroup2 c rw\n"),
            Some(PathBuf::from("/a b"))
        );
        assert_eq!(
            parse_cgroup2_mount("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
