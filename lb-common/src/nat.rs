//! Maps of the packet path (TC on node interfaces): connection tracking / NAT, source ranges,
//! and client-IP session affinity for traffic from outside the cluster.
//!
//! # Connection tracking
//! One LRU hash per family holds two entries per translated flow, told apart by `dir`:
//!
//! * **forward** (`CT_DIR_FWD`), keyed by the packet as the client sent it
//!   (client → frontend). Value: the backend to send it to (`addr:port`) and, when the flow is
//!   SNATed (`CT_F_SNAT`), the node address and port to use as its source (`nat_addr:nat_port`).
//!   It keeps every packet of a flow on the backend chosen for its first packet.
//! * **reply** (`CT_DIR_REPLY`), keyed by the reply as it arrives at this node
//!   (backend → client, or backend → node address:NAT port when SNATed). Value: the frontend to
//!   restore as the source (`addr:port`) and the client to restore as the destination
//!   (`nat_addr:nat_port`).
//!
//! Written by the datapath only. Liveness: the datapath moves `expires_ns` (`bpf_ktime_get_ns`,
//! i.e. `CLOCK_MONOTONIC`) forward at most once a second per entry; the agent's garbage
//! collector deletes a pair once both halves are past it. The LRU evicts under pressure.
//! Ports are host order, addresses network order, as in the service maps.

/// Forward entry: the packet as the client sent it.
pub const CT_DIR_FWD: u8 = 0;
/// Reply entry: the packet as the backend sent it.
pub const CT_DIR_REPLY: u8 = 1;

/// The flow is source-NATed to `nat_addr:nat_port` (externalTrafficPolicy Cluster, backend on
/// another node).
pub const CT_F_SNAT: u16 = 1 << 0;
/// A TCP FIN or RST was seen: the short closing timeout applies.
pub const CT_F_CLOSING: u16 = 1 << 1;
/// A packet was seen in the reply direction (a TCP flow is established).
pub const CT_F_SEEN_REPLY: u16 = 1 << 2;

/// Timeouts: an established TCP flow lives 6 hours without packets (Cilium's default); one not
/// yet answered, 60 s; UDP 60 s. A closing one (FIN or RST seen) 60 s: Linux's TIME_WAIT
/// length, during which a backend refuses a new connection on the same 4-tuple whose
/// timestamps are older (PAWS) — its NAT port must not be handed out sooner. nf_conntrack
/// (kube-proxy) holds them 120 s.
pub const CT_TIMEOUT_TCP_ESTABLISHED_S: u64 = 21_600;
pub const CT_TIMEOUT_TCP_SYN_S: u64 = 60;
pub const CT_TIMEOUT_TCP_CLOSING_S: u64 = 60;
pub const CT_TIMEOUT_NON_TCP_S: u64 = 60;
/// `expires_ns` is rewritten only when it would move by more than this.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Source ports used for SNAT: below Linux's default ephemeral range (32768–60999), so a NATed
/// flow never takes the port of a connection the node itself makes to the same backend (a
/// kubelet probe, say): such a reply would be taken for the NATed flow's. 31,744 ports per
/// (node address, backend address:port), each held until its flow expired: about 500 new
/// SNATed connections per second to one backend sustained (kube-proxy's MASQUERADE: 64,512
/// ports / 120 s).
pub const NAT_PORT_MIN: u16 = 1_024;
pub const NAT_PORT_MAX: u16 = 32_767;
/// Random probes for a free NAT port before the packet is dropped (`tc_nat_port_exhausted`).
/// Ports stay held for TIME_WAIT, so a burst fills the range: measured, a 3 s burst of 21,000
/// connections to one backend held two thirds of it, and 16 probes then missed about once in
/// 10,000 connections (0.66^16); 64 miss once in 10^11 there and still once in 30 at 95 %
/// occupancy (Cilium probes up to 128). The loop ends at the first free port, so the common
/// case costs one probe.
pub const NAT_PORT_TRIES: u32 = 64;

/// Conntrack timeouts in seconds, set by the agent at load time (load-time globals named in
/// [`GLOBALS_CT_TIMEOUTS`], `--conntrack-*-timeout`); 0 in a global means the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_established_s: u64,
    pub tcp_syn_s: u64,
    pub tcp_closing_s: u64,
    pub other_s: u64,
}

impl CtTimeouts {
    pub const DEFAULT: Self = Self {
        tcp_established_s: CT_TIMEOUT_TCP_ESTABLISHED_S,
        tcp_syn_s: CT_TIMEOUT_TCP_SYN_S,
        tcp_closing_s: CT_TIMEOUT_TCP_CLOSING_S,
        other_s: CT_TIMEOUT_NON_TCP_S,
    };
}

/// The load-time globals holding [`CtTimeouts`], in field order (u64 seconds each).
pub const GLOBALS_CT_TIMEOUTS: [&str; 4] = [
    "LB_CT_TCP_EST_S",
    "LB_CT_TCP_SYN_S",
    "LB_CT_TCP_CLOSE_S",
    "LB_CT_OTHER_S",
];

/// How long an entry stays after its last packet.
#[must_use]
pub const fn ct_timeout_s(proto: u8, flags: u16, t: &CtTimeouts) -> u64 {
    if proto != crate::IPPROTO_TCP {
        t.other_s
    } else if flags & CT_F_CLOSING != 0 {
        t.tcp_closing_s
    } else if flags & CT_F_SEEN_REPLY != 0 {
        t.tcp_established_s
    } else {
        t.tcp_syn_s
    }
}

/// Key of `LB4_CT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Key {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Host order.
    pub sport: u16,
    /// Host order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_FWD` or `CT_DIR_REPLY`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `LB4_CT_V1` (meaning of `addr`/`nat_addr` by direction: see the module docs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Value {
    pub addr: [u8; 4],
    pub nat_addr: [u8; 4],
    pub port: u16,
    pub nat_port: u16,
    /// `CT_F_*`.
    pub flags: u16,
    pub _pad: u16,
    /// The frontend (slot-0 `backend_id`) and backend the flow was balanced to.
    pub frontend_id: u32,
    pub backend_id: u32,
    /// `CLOCK_MONOTONIC` nanoseconds after which the entry is garbage.
    pub expires_ns: u64,
}

/// Key of `LB6_CT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Key {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `LB6_CT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Value {
    pub addr: [u8; 16],
    pub nat_addr: [u8; 16],
    pub port: u16,
    pub nat_port: u16,
    pub flags: u16,
    pub _pad: u16,
    pub frontend_id: u32,
    pub backend_id: u32,
    pub expires_ns: u64,
}

/// `loadBalancerSourceRanges`: LPM trie data of `LB4_SRCR_V1` / `LB6_SRCR_V1`. The prefix
/// covers the whole frontend (`addr`, `port`, `proto`, `_pad`: 64 bits for IPv4, 160 for
/// IPv6) plus the CIDR's length, so one trie serves every frontend. Value: `1`. Written by the
/// agent; a frontend with `SVC_FLAG_SRC_RANGES` lets through only clients matching an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SrcRange4 {
    pub frontend: [u8; 4],
    /// Network order (LPM compares bytes in order).
    pub port_be: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
    pub client: [u8; 4],
}

/// IPv6 counterpart of [`SrcRange4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SrcRange6 {
    pub frontend: [u8; 16],
    pub port_be: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
    pub client: [u8; 16],
}

/// Bits of [`SrcRange4`] before the client address.
pub const SRCR4_FRONTEND_BITS: u32 = 64;
/// Bits of [`SrcRange6`] before the client address.
pub const SRCR6_FRONTEND_BITS: u32 = 160;

/// `sessionAffinity: ClientIP` for traffic from outside: `LB_AFFX_V1`, an LRU hash keyed by the
/// client's address (IPv4 as IPv4-mapped IPv6) and the frontend id; value [`crate::AffValue`].
/// Written by the datapath; entries whose backend no longer serves the frontend (checked in
/// `LB_AFF_MATCH_V1`) or older than the timeout are replaced.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffxKey {
    pub client: [u8; 16],
    pub frontend_id: u32,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Ct4Key>() == 16);
    assert!(offset_of!(Ct4Key, sport) == 8);
    assert!(offset_of!(Ct4Key, proto) == 12);
    assert!(offset_of!(Ct4Key, dir) == 13);
    assert!(size_of::<Ct4Value>() == 32);
    assert!(offset_of!(Ct4Value, port) == 8);
    assert!(offset_of!(Ct4Value, flags) == 12);
    assert!(offset_of!(Ct4Value, frontend_id) == 16);
    assert!(offset_of!(Ct4Value, expires_ns) == 24);
    assert!(size_of::<Ct6Key>() == 40);
    assert!(offset_of!(Ct6Key, sport) == 32);
    assert!(offset_of!(Ct6Key, dir) == 37);
    assert!(size_of::<Ct6Value>() == 56);
    assert!(offset_of!(Ct6Value, port) == 32);
    assert!(offset_of!(Ct6Value, expires_ns) == 48);
    assert!(size_of::<SrcRange4>() == 12);
    assert!(size_of::<SrcRange6>() == 36);
    assert!(size_of::<AffxKey>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, integers and byte arrays only, padding explicit (guards above).
    unsafe impl aya::Pod for super::Ct4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ct4Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ct6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ct6Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SrcRange4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SrcRange6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffxKey {}
}

/// The NAT port for probe `try_n` of a flow: spread over `NAT_PORT_MIN..=NAT_PORT_MAX` by a
/// random number (the datapath passes `bpf_get_prandom_u32()`).
#[expect(
    clippy::inline_always,
    reason = "runs in eBPF: every call must be inlined for the verifier"
)]
#[inline(always)]
#[must_use]
pub fn nat_port(random: u32) -> u16 {
    let span = u64::from(NAT_PORT_MAX - NAT_PORT_MIN) + 1;
    let off = (u64::from(random) * span) >> 32;
    NAT_PORT_MIN + off as u16
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn timeouts_follow_the_flow_state() {
        use crate::{IPPROTO_TCP, IPPROTO_UDP};
        assert_eq!(ct_timeout_s(IPPROTO_TCP, 0, &CtTimeouts::DEFAULT), 60);
        assert_eq!(
            ct_timeout_s(IPPROTO_TCP, CT_F_SEEN_REPLY, &CtTimeouts::DEFAULT),
            21_600
        );
        assert_eq!(
            ct_timeout_s(
                IPPROTO_TCP,
                CT_F_SEEN_REPLY | CT_F_CLOSING,
                &CtTimeouts::DEFAULT
            ),
            60
        );
        assert_eq!(
            ct_timeout_s(IPPROTO_UDP, CT_F_SEEN_REPLY, &CtTimeouts::DEFAULT),
            60
        );
    }

    #[test]
    fn nat_port_edges() {
        assert_eq!(nat_port(0), NAT_PORT_MIN);
        assert_eq!(nat_port(u32::MAX), NAT_PORT_MAX);
    }

    proptest! {
        #[test]
        fn nat_port_stays_in_range(r in any::<u32>()) {
            prop_assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&nat_port(r)));
        }
    }
}
