//! Types and constants shared by the `lb` datapath (lb-ebpf) and the agent (lb-userspace).
//!
//! Everything that crosses the kernel/user boundary is defined here once: map names, key and
//! value layouts, datapath counter indices, and the small pieces of decision logic (backend slot
//! selection) that must behave identically on both sides and are unit-tested on the host.
//!
//! # Layout rules
//! * `#[repr(C)]`, `Copy`, explicit `_pad` fields, no implicit padding, no `bool`/enum/`Option`.
//! * Addresses are byte arrays in network order (`[198, 19, 0, 10]`), so they read naturally in
//!   `bpftool map dump`. Ports are **host order** `u16` for the same reason; the datapath
//!   converts once per `connect()`.
//! * Any change to a layout or its meaning bumps the `_Vn` suffix of the map name. Never change a
//!   layout in place: a restarted agent adopts the pinned maps of the previous one.
#![no_std]
// `_pad` fields are public so both crates can build these types with struct literals; STYLE.md
// asks for explicit padding, and the underscore says "no meaning".
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit, named padding in kernel ABI types"
)]

pub mod maglev;
pub mod nat;
pub mod stats;

pub use nat::*;
pub use stats::Stat;

/// IANA protocol numbers as found in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// SCTP.
pub const IPPROTO_SCTP: u8 = 132;

/// Scope of a frontend entry: what the socket hooks look up (in-cluster clients: pods and
/// host processes of this node). The field was reserved for this from the start, so adding
/// [`SCOPE_EXTERNAL`] changed no layout.
pub const SCOPE_ALL: u8 = 0;
/// Scope of a frontend entry: what the TC program looks up for packets from outside the node
/// (NodePort on node addresses, externalIPs, LoadBalancer IPs), with externalTrafficPolicy
/// applied: Local keeps only this node's endpoints.
pub const SCOPE_EXTERNAL: u8 = 1;

/// `SvcValue::flags`: this is the VIP marker entry (`dport = 0, proto = 0, slot = 0`), present
/// for every address that is a frontend on any port. A `connect()` to a marked VIP on a port or
/// protocol without a frontend is rejected rather than routed.
pub const SVC_FLAG_VIP_MARKER: u16 = 1 << 0;

/// `SvcValue::flags`: internalTrafficPolicy Local and this node has no usable endpoint while
/// other nodes do. `count` is 0; the datapath DROPs instead of REJECTing: `connect()` fails with
/// ETIMEDOUT at once — the errno a dropped SYN ends in, without the two-minute wait, and no
/// packet for the VIP ever leaves unrewritten.
pub const SVC_FLAG_NO_LOCAL: u16 = 1 << 1;

/// `SvcValue::flags`: only sockets in the host's network namespace are translated (the
/// `127.0.0.1:<nodePort>` frontends: reachable from host processes, not from pods, as with
/// kube-proxy). For any other socket the entry does not exist.
pub const SVC_FLAG_HOST_ONLY: u16 = 1 << 2;

/// `SvcValue::flags` (external scope): the frontend has `loadBalancerSourceRanges`; only
/// clients matching its entries in `LB4_SRCR_V1`/`LB6_SRCR_V1` pass, others are dropped.
pub const SVC_FLAG_SRC_RANGES: u16 = 1 << 3;

/// `SvcValue::flags` (external scope): new flows choose their backend from the frontend's
/// Maglev table in `LB_MAGLEV_V1` ([`maglev`]) instead of a random slot.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 4;

/// `SvcValue::flags` (socket hooks): a ClusterIP frontend, port 53, of the `--dns-service`
/// Service. While the agent's DNS listener is alive ([`NodeDns::expires_ns`] in the future),
/// connections and datagrams to it go to that listener on this node instead of a backend; once
/// it is not (agent killed, restarting), to the Service's endpoints as any frontend's. Older
/// datapaths ignore the bit.
pub const SVC_FLAG_NODE_DNS: u16 = 1 << 5;

/// Value 0 of `LB_NODE_DNS_V1` (an array of one): where this node's DNS listener is, per
/// family, and until when it is known to be alive. The agent renews `expires_ns` every
/// [`NODE_DNS_HEARTBEAT_MS`] while its listener serves, and zeroes it on a clean exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeDns {
    /// IPv6 listener address (network order); `port6` 0 = none.
    pub addr6: [u8; 16],
    /// IPv4 listener address (network order); `port4` 0 = none.
    pub addr4: [u8; 4],
    /// Listener ports, host order.
    pub port4: u16,
    pub port6: u16,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) after which the listener is presumed dead.
    pub expires_ns: u64,
}

/// How often the agent renews [`NodeDns::expires_ns`].
pub const NODE_DNS_HEARTBEAT_MS: u64 = 50;
/// How long a renewal holds: a killed agent's queries fall back to the Service's endpoints
/// within this.
pub const NODE_DNS_LEASE_MS: u64 = 200;

/// `Backend4::flags`/`Backend6::flags`: the endpoint is on this node. The packet path SNATs
/// only flows to backends without it. (The byte was reserved as 0 = "not known to be local",
/// which is the safe reading for an older agent's entries.)
pub const BE_FLAG_LOCAL: u8 = 1 << 0;

/// Name of the datapath's load-time global holding the host netns cookie (`u64`), set by the
/// agent from `SO_NETNS_COOKIE` of a socket in the host namespace.
pub const GLOBAL_HOST_NETNS: &str = "LB_HOST_NETNS";

// ---------------------------------------------------------------------------------------------
// Map names. ≤ 15 bytes (the kernel keeps 15 + NUL). Mirrored by the `#[btf_map]` statics in
// lb-ebpf; lb-userspace tests that the loaded object carries every one of them.
// ---------------------------------------------------------------------------------------------

/// IPv4 services: [`Svc4Key`] → [`SvcValue`].
pub const MAP_SVC4: &str = "LB4_SVC_V1";
/// IPv4 backends: backend id (`u32`) → [`Backend4`].
pub const MAP_BE4: &str = "LB4_BE_V1";
/// IPv6 services: [`Svc6Key`] → [`SvcValue`].
pub const MAP_SVC6: &str = "LB6_SVC_V1";
/// IPv6 backends: backend id (`u32`) → [`Backend6`].
pub const MAP_BE6: &str = "LB6_BE_V1";
/// IPv4 per-socket reverse NAT: [`RevNat4Key`] → [`RevNat4Value`].
pub const MAP_RNAT4: &str = "LB4_RNAT_SK_V1";
/// IPv6 per-socket reverse NAT: [`RevNat6Key`] → [`RevNat6Value`].
pub const MAP_RNAT6: &str = "LB6_RNAT_SK_V1";
/// Reverse NAT of connected sockets, in socket storage: → [`RevNatSk`].
pub const MAP_RNAT_SKS: &str = "LB_RNAT_SKS_V1";
/// Reverse NAT of translated `connect()`s, a ring indexed by socket cookie: `cookie & (N − 1)`
/// → [`RevNatRing`] (an array; N a power of two).
pub const MAP_RNAT_RING: &str = "LB_RNAT_RING_V1";
/// Per-CPU datapath counters: [`Stat`] index (`u32`) → `u64`.
pub const MAP_STATS: &str = "LB_STATS_V4";

/// sessionAffinity ClientIP state: [`AffKey`] → [`AffValue`] (LRU, written by the datapath).
pub const MAP_AFF: &str = "LB_AFF_V1";
/// Which backends belong to which frontend, for affinity: [`AffMatchKey`] → `u32` (0).
/// Written by the agent, for frontends with affinity only.
pub const MAP_AFF_MATCH: &str = "LB_AFF_MATCH_V1";

/// New connections per frontend: frontend id (`u32`, an index) → per-CPU `u64`; a per-CPU
/// array, whose lookup the verifier inlines (a hash lookup cost ~60 ns per `connect()`).
/// Written by the datapath; the agent labels it with the Service and zeroes the counters of
/// removed frontends. Frontend ids are dense (lowest free first); ids beyond the array are not
/// counted.
pub const MAP_SVC_CNT: &str = "LB_SVC_CNT_V2";

/// Connection tracking / NAT of the packet path, IPv4 ([`nat`]).
pub const MAP_CT4: &str = "LB4_CT_V1";
/// Connection tracking / NAT of the packet path, IPv6.
pub const MAP_CT6: &str = "LB6_CT_V1";
/// `loadBalancerSourceRanges`, IPv4 ([`SrcRange4`]).
pub const MAP_SRCR4: &str = "LB4_SRCR_V1";
/// `loadBalancerSourceRanges`, IPv6 ([`SrcRange6`]).
pub const MAP_SRCR6: &str = "LB6_SRCR_V1";
/// Client-IP session affinity for traffic from outside ([`AffxKey`]).
pub const MAP_AFFX: &str = "LB_AFFX_V1";
/// Node-local DNS: index 0 → [`NodeDns`] (written by the agent).
pub const MAP_NODE_DNS: &str = "LB_NODE_DNS_V1";

/// Every map the datapath object must define.
pub const ALL_MAPS: [&str; 19] = [
    MAP_SVC4,
    MAP_BE4,
    MAP_SVC6,
    MAP_BE6,
    MAP_RNAT4,
    MAP_RNAT6,
    MAP_STATS,
    MAP_AFF,
    MAP_AFF_MATCH,
    MAP_SVC_CNT,
    MAP_CT4,
    MAP_CT6,
    MAP_SRCR4,
    MAP_SRCR6,
    MAP_AFFX,
    MAP_RNAT_SKS,
    MAP_RNAT_RING,
    maglev::MAP_MAGLEV,
    MAP_NODE_DNS,
];

/// Maps of earlier layouts that this build replaced (a new name per layout): their pins are
/// removed once this build's programs are attached, so an upgrade leaves nothing behind.
pub const SUPERSEDED_MAPS: [&str; 4] = [
    "LB_STATS_V1",
    "LB_STATS_V2",
    "LB_STATS_V3",
    // A per-CPU hash (frontend id → u64) before it became a per-CPU array.
    "LB_SVC_CNT_V1",
];

/// `max_entries` of the per-frontend connection counters (frontend ids 0..65,536): a per-CPU
/// array, 512 KiB of kernel memory per CPU.
pub const DEFAULT_SVC_CNT_ENTRIES: u32 = 1 << 16;

/// Default `max_entries` of the service maps (frontends + backend slots + VIP markers).
/// 10,000 Services × (1 frontend + 4 slots + 1 marker) = 60,000; the default leaves room for
/// 50,000 × 4. Overridden at load time by `lb-agent run --max-service-entries`.
pub const DEFAULT_SVC_ENTRIES: u32 = 1 << 19;
/// Default `max_entries` of the backend maps.
pub const DEFAULT_BE_ENTRIES: u32 = 1 << 18;
/// Default `max_entries` of the affinity LRU map (one entry per client netns × frontend).
pub const DEFAULT_AFF_ENTRIES: u32 = 1 << 16;
/// Default `max_entries` of the affinity match map (backends of frontends with affinity).
pub const DEFAULT_AFF_MATCH_ENTRIES: u32 = 1 << 18;
/// Default `max_entries` of the LRU reverse-NAT maps (one entry per socket × backend). LRU maps
/// are preallocated: 131,072 entries ≈ 10 MiB of kernel memory per family.
pub const DEFAULT_RNAT_ENTRIES: u32 = 1 << 17;
/// Default entries of the `connect()` reverse-NAT ring (a power of two): 65,536 × 48 B = 3 MiB of
/// kernel memory. A record lives there until 65,536 later translated sockets have taken its
/// slot, and for good once its socket asks for its peer (see [`RevNatRing`]).
pub const DEFAULT_RNAT_RING_ENTRIES: u32 = 1 << 16;
/// Name of the datapath's load-time global holding the ring's index mask (entries − 1).
pub const GLOBAL_RNAT_RING_MASK: &str = "LB_RNAT_RING_MASK";
/// Conntrack entries per family (two per flow); `--max-conntrack-entries`.
pub const DEFAULT_CT_ENTRIES: u32 = 1 << 18;
/// Source-range entries per family.
pub const DEFAULT_SRCR_ENTRIES: u32 = 1 << 14;
/// External client-IP affinity entries.
pub const DEFAULT_AFFX_ENTRIES: u32 = 1 << 16;

// ---------------------------------------------------------------------------------------------
// Service maps.
// ---------------------------------------------------------------------------------------------

/// Key of `LB4_SVC_V1`. Written by the agent only.
///
/// `backend_slot == 0` is the frontend entry (its value carries the backend count);
/// `1..=count` are the backend slots (their value carries a backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Svc4Key {
    /// Frontend address, network order.
    pub address: [u8; 4],
    /// Frontend port, host order. 0 in the VIP marker.
    pub dport: u16,
    /// 0 = frontend, 1..=count = backend slot.
    pub backend_slot: u16,
    /// `IPPROTO_*`. 0 in the VIP marker.
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Key of `LB6_SVC_V1`; same meaning as [`Svc4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Svc6Key {
    /// Frontend address, network order.
    pub address: [u8; 16],
    /// Frontend port, host order. 0 in the VIP marker.
    pub dport: u16,
    /// 0 = frontend, 1..=count = backend slot.
    pub backend_slot: u16,
    /// `IPPROTO_*`. 0 in the VIP marker.
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Value of `LB4_SVC_V1` / `LB6_SVC_V1`.
///
/// * frontend (slot 0): `count` = number of backend slots, `flags`, `affinity_timeout`;
///   `backend_id` = the frontend's id (stable while it exists; keys the affinity maps).
///   `count == 0` means "known service, no usable endpoint" → REJECT (DROP with
///   [`SVC_FLAG_NO_LOCAL`]).
/// * backend slot (slot ≥ 1): `backend_id` = key into the backend map; other fields 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SvcValue {
    /// Backend id (slots ≥ 1); frontend id (slot 0).
    pub backend_id: u32,
    /// Backend count (slot 0).
    pub count: u16,
    /// `SVC_FLAG_*` (slot 0).
    pub flags: u16,
    /// Session-affinity timeout in seconds, 0 = none (slot 0). Reserved for `ClientIP` affinity.
    pub affinity_timeout: u32,
}

// ---------------------------------------------------------------------------------------------
// Backend maps.
// ---------------------------------------------------------------------------------------------

/// Value of `LB4_BE_V1` (key: backend id `u32`, never 0). Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Backend4 {
    /// Backend address, network order.
    pub address: [u8; 4],
    /// Backend port, host order.
    pub port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `BE_FLAG_*`.
    pub flags: u8,
}

/// Value of `LB6_BE_V1` (key: backend id `u32`, never 0). Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Backend6 {
    /// Backend address, network order.
    pub address: [u8; 16],
    /// Backend port, host order.
    pub port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `BE_FLAG_*`.
    pub flags: u8,
}

// ---------------------------------------------------------------------------------------------
// Per-socket reverse NAT. Written by the datapath (connect/sendmsg), read by the datapath
// (getpeername/recvmsg); the agent only reads it for `inspect` and clears it on `cleanup`.
//
// connect() (TCP, connected UDP): a ring indexed by socket cookie (`LB_RNAT_RING_V1`, an
// array: the write is plain stores, no helper), moved into the socket's own storage
// (`LB_RNAT_SKS_V1`, freed with the socket) the first time the socket asks for its peer.
// sendmsg() of unconnected UDP: an LRU hash keyed by socket cookie (`LB4/6_RNAT_SK_V1`), since
// such a socket talks to several backends at once. Cookies are never reused within a boot, so
// a record outliving its socket is harmless and ages out.
// Measured (kernel 6.18, 2 vCPUs, `sock4_connect` per call, 1,000 Services): 1.09–1.12 µs
// creating socket storage in connect(), 1.35–1.41 µs with a per-CPU-list LRU insert (lookup
// first, as Cilium does), 0.89–0.91 µs for a preallocated hash insert + delete, 0.50–0.53 µs
// with no record at all; the ring costs a cookie and six stores.
// ---------------------------------------------------------------------------------------------

/// Key of `LB4_RNAT_SK_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat4Key {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address the socket was sent to, network order.
    pub address: [u8; 4],
    /// Backend port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Value of `LB4_RNAT_SK_V1`: the frontend the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat4Value {
    /// VIP, network order.
    pub address: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of `LB6_RNAT_SK_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat6Key {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address, network order.
    pub address: [u8; 16],
    /// Backend port, host order.
    pub port: u16,
    /// Two scalar pad fields rather than `[u8; 6]`: zeroing a 6-byte array compiles to a
    /// byte loop whose stack pointer arithmetic the verifier refuses without CAP_PERFMON.
    pub _pad: u16,
    pub _pad2: u32,
}

/// Value of `LB_RNAT_SKS_V1`, the socket storage of a socket whose `connect()` was translated:
/// the backend it was sent to and the frontend the application addressed. IPv4 addresses are
/// stored IPv4-mapped. 8-byte aligned: the datapath copies it as five `u64` words (a struct
/// copy compiles to a byte loop the verifier refuses without `CAP_PERFMON`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatSk {
    pub backend: [u8; 16],
    pub vip: [u8; 16],
    /// Host order.
    pub backend_port: u16,
    /// Host order.
    pub vip_port: u16,
    pub _pad: u32,
}

/// Value of `LB_RNAT_RING_V1`: a [`RevNatSk`] and the cookie of the socket it belongs to. A
/// reader trusts it only when the cookie is its own and the backend is the one it talks to; a
/// slot taken by a later socket reads as "not translated" (the peer shows the backend), never
/// as another socket's VIP.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatRing {
    /// `bpf_get_socket_cookie()` of the socket; 0 = empty.
    pub cookie: u64,
    pub sk: RevNatSk,
}

/// Value of `LB6_RNAT_SK_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat6Value {
    /// VIP, network order.
    pub address: [u8; 16],
    /// Frontend port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

// ---------------------------------------------------------------------------------------------
// Session affinity (sessionAffinity: ClientIP).
// ---------------------------------------------------------------------------------------------

/// Key of `LB_AFF_V1`. The client is its network namespace: at `connect()` the source address is
/// not chosen yet, and a pod's address is its netns (host-network processes share the node's,
/// which is also one client IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffKey {
    /// `bpf_get_netns_cookie()` of the client socket.
    pub netns_cookie: u64,
    /// Frontend id (slot 0 `backend_id`).
    pub frontend_id: u32,
    pub _pad: u32,
}

/// Value of `LB_AFF_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffValue {
    /// The backend this client is pinned to.
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connection that used the pin.
    pub last_used_ns: u64,
}

/// Key of `LB_AFF_MATCH_V1`: present while `backend_id` is a backend of `frontend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AffMatchKey {
    pub backend_id: u32,
    pub frontend_id: u32,
}

// Compile-time layout guards: these sizes and offsets are ABI with pinned maps.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Svc4Key>() == 12);
    assert!(offset_of!(Svc4Key, dport) == 4);
    assert!(offset_of!(Svc4Key, backend_slot) == 6);
    assert!(offset_of!(Svc4Key, proto) == 8);
    assert!(offset_of!(Svc4Key, scope) == 9);
    assert!(size_of::<Svc6Key>() == 24);
    assert!(offset_of!(Svc6Key, dport) == 16);
    assert!(offset_of!(Svc6Key, proto) == 20);
    assert!(size_of::<SvcValue>() == 12);
    assert!(offset_of!(SvcValue, count) == 4);
    assert!(offset_of!(SvcValue, affinity_timeout) == 8);
    assert!(size_of::<Backend4>() == 8);
    assert!(size_of::<Backend6>() == 20);
    assert!(size_of::<RevNat4Key>() == 16);
    assert!(offset_of!(RevNat4Key, address) == 8);
    assert!(size_of::<RevNat4Value>() == 8);
    assert!(size_of::<RevNat6Key>() == 32);
    assert!(offset_of!(RevNat6Key, _pad2) == 28);
    assert!(size_of::<RevNat6Value>() == 20);
    assert!(size_of::<RevNatSk>() == 40);
    assert!(size_of::<RevNatRing>() == 48);
    assert!(size_of::<AffKey>() == 16);
    assert!(size_of::<AffValue>() == 16);
    assert!(offset_of!(AffValue, last_used_ns) == 8);
    assert!(size_of::<AffMatchKey>() == 8);
    assert!(size_of::<NodeDns>() == 32);
    assert!(offset_of!(NodeDns, addr4) == 16);
    assert!(offset_of!(NodeDns, expires_ns) == 24);
    assert!(size_of::<maglev::MaglevKey>() == 8);
    assert!(size_of::<maglev::MaglevChunk>() == 4 * maglev::MAGLEV_CHUNK as usize);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type here is repr(C), Copy, made only of integers and byte arrays, with all
    // padding explicit (checked by the layout guards above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Svc4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeDns {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Svc6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SvcValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat4Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat6Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNatRing {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffMatchKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maglev::MaglevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maglev::MaglevChunk {}
}

/// Picks a backend slot in `1..=count` from a 32-bit random number, uniformly.
///
/// Multiply-shift (Lemire) instead of `%`: no division on the hot path and no modulo bias beyond
/// `count / 2^32`. `count` must be ≥ 1; callers reject `count == 0` before asking.
#[expect(
    clippy::inline_always,
    reason = "runs in eBPF: every call must be inlined for the verifier"
)]
#[inline(always)]
#[must_use]
pub fn select_slot(random: u32, count: u16) -> u16 {
    // (random * count) >> 32 is in 0..count; the product fits in u64.
    let idx = (u64::from(random) * u64::from(count)) >> 32;
    idx as u16 + 1
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
            assert!(name.contains("_V"), "{name} carries no layout version");
        }
    }

    #[test]
    fn select_slot_covers_the_edges() {
        assert_eq!(select_slot(0, 1), 1);
        assert_eq!(select_slot(u32::MAX, 1), 1);
        assert_eq!(select_slot(0, 3), 1);
        assert_eq!(select_slot(u32::MAX, 3), 3);
        assert_eq!(select_slot(u32::MAX, u16::MAX), u16::MAX);
    }

    #[test]
    fn select_slot_is_uniform() {
        // Walk the 32-bit space in a fixed stride: every slot gets the same share within 1.
        let count = 7u16;
        let mut hits = [0u32; 8];
        let step = 65_537u32;
        let mut r = 0u32;
        let mut n = 0u32;
        loop {
            hits[usize::from(select_slot(r, count))] += 1;
            n += 1;
            match r.checked_add(step) {
                Some(next) => r = next,
                None => break,
            }
        }
        let expect = n / u32::from(count);
        for (slot, h) in hits.iter().enumerate().skip(1) {
            assert!(
                h.abs_diff(expect) <= 1,
                "slot {slot}: {h} hits, expected {expect}"
            );
        }
        assert_eq!(hits[0], 0);
    }

    proptest! {
        #[test]
        fn select_slot_stays_in_range(r in any::<u32>(), count in 1u16..) {
            let s = select_slot(r, count);
            prop_assert!((1..=count).contains(&s));
        }
    }
}
