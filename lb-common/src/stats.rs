//! Datapath counters: indices into the per-CPU array `LB_STATS_V4`.
//!
//! One counter per outcome of a hook, so that every verdict the datapath computes is visible to
//! operators, and each packet or call is counted once, under its program and reason (the XDP
//! and tc paths have counters of their own) (`lb-agent inspect stats`, and the agent's metrics). The datapath only ever adds
//! one to its own CPU's slot; userspace sums over CPUs.

/// A datapath outcome. `repr(u32)` is only the index into `LB_STATS_V4`; no map stores the enum.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// `connect()` to a frontend rewritten to a backend.
    ConnectXlated = 0,
    /// Unconnected `sendmsg()` to a frontend rewritten to a backend.
    SendmsgXlated = 1,
    /// Known frontend with no usable endpoint: ECONNREFUSED.
    RejectNoBackend = 2,
    /// Known VIP, but no frontend for this port/protocol: ECONNREFUSED.
    RejectNoPort = 3,
    /// A slot or backend id the frontend points at is missing (should never happen: the agent
    /// writes backends before slots before counts). ECONNREFUSED rather than a wrong address.
    RejectBackendMissing = 4,
    /// `getpeername()`/`recvmsg()` address translated back to the VIP.
    RevNatHit = 5,
    /// The reverse-NAT entry could not be written; `getpeername()` will show the backend.
    RevNatUpdateFailed = 6,
    /// internalTrafficPolicy Local, endpoints only on other nodes: ETIMEDOUT (DROP).
    DropNoLocal = 7,
    /// sessionAffinity: the client's pinned backend was used.
    AffinityHit = 8,
    /// sessionAffinity: a client was pinned (first time, after the timeout, or because its
    /// backend left the Service).
    AffinityPin = 9,
    /// Packet path: a packet from outside translated to a backend (forward direction).
    TcXlated = 10,
    /// Packet path: a reply translated back to the frontend.
    TcRevXlated = 11,
    /// Packet path: externalTrafficPolicy Local with no endpoint on this node: dropped.
    TcDropNoLocal = 12,
    /// Packet path: client not in loadBalancerSourceRanges: dropped.
    TcDropSourceRange = 13,
    /// Packet path: no endpoint at all: ICMP unreachable sent back.
    TcRejectNoBackend = 14,
    /// Packet path: no free SNAT port for the flow: dropped.
    TcNatPortExhausted = 15,
    /// Packet path: no route to the chosen backend: dropped.
    TcNoRoute = 16,
    /// Packet path: a conntrack entry could not be written: dropped.
    TcCtFull = 17,
    /// Packet path: an ICMP error about a translated flow translated back.
    TcIcmpXlated = 18,
    /// Packet path: a new flow followed the client's affinity entry.
    TcAffinityHit = 19,
    /// XDP: a packet of a new or established flow translated and sent on (XDP_TX).
    XdpXlated = 20,
    /// XDP: a reply translated back and sent on.
    XdpRevXlated = 21,
    /// XDP: a frontend's packet handed to the tc path (local backend, REJECT, no neighbour,
    /// IP options, fragments...).
    XdpPassed = 22,
    /// XDP: externalTrafficPolicy Local with no endpoint on this node: dropped.
    XdpDropNoLocal = 23,
    /// XDP: client not in loadBalancerSourceRanges: dropped.
    XdpDropSourceRange = 24,
    /// XDP: no free SNAT port for the flow: dropped.
    XdpNatPortExhausted = 25,
    /// XDP: a conntrack entry could not be written: dropped.
    XdpCtFull = 26,
    /// XDP: the packet could not be rewritten (shorter than parsed): dropped.
    XdpRewriteFailed = 27,
    /// Packet path: a slot or backend id the frontend points at is missing (should never
    /// happen, see `RejectBackendMissing`): dropped.
    TcBackendMissing = 28,
    /// Packet path: a translated packet could not be rewritten or redirected (a helper
    /// failed): dropped.
    TcRewriteFailed = 29,
    /// Packet path: no endpoint at all, but the ICMP unreachable could not be built (IPv4
    /// options, IPv6 extension headers, a failing helper): dropped instead.
    TcRejectDropped = 30,
}

impl Stat {
    /// Number of counters (`max_entries` of `LB_STATS_V4`).
    pub const COUNT: u32 = 31;

    /// Every counter in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::ConnectXlated,
        Self::SendmsgXlated,
        Self::RejectNoBackend,
        Self::RejectNoPort,
        Self::RejectBackendMissing,
        Self::RevNatHit,
        Self::RevNatUpdateFailed,
        Self::DropNoLocal,
        Self::AffinityHit,
        Self::AffinityPin,
        Self::TcXlated,
        Self::TcRevXlated,
        Self::TcDropNoLocal,
        Self::TcDropSourceRange,
        Self::TcRejectNoBackend,
        Self::TcNatPortExhausted,
        Self::TcNoRoute,
        Self::TcCtFull,
        Self::TcIcmpXlated,
        Self::TcAffinityHit,
        Self::XdpXlated,
        Self::XdpRevXlated,
        Self::XdpPassed,
        Self::XdpDropNoLocal,
        Self::XdpDropSourceRange,
        Self::XdpNatPortExhausted,
        Self::XdpCtFull,
        Self::XdpRewriteFailed,
        Self::TcBackendMissing,
        Self::TcRewriteFailed,
        Self::TcRejectDropped,
    ];

    /// Stable `snake_case` name used in metrics and `inspect` output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::ConnectXlated => "connect_xlated",
            Self::SendmsgXlated => "sendmsg_xlated",
            Self::RejectNoBackend => "reject_no_backend",
            Self::RejectNoPort => "reject_no_port",
            Self::RejectBackendMissing => "reject_backend_missing",
            Self::RevNatHit => "revnat_hit",
            Self::RevNatUpdateFailed => "revnat_update_failed",
            Self::DropNoLocal => "drop_no_local",
            Self::AffinityHit => "affinity_hit",
            Self::AffinityPin => "affinity_pin",
            Self::TcXlated => "tc_xlated",
            Self::TcRevXlated => "tc_rev_xlated",
            Self::TcDropNoLocal => "tc_drop_no_local",
            Self::TcDropSourceRange => "tc_drop_source_range",
            Self::TcRejectNoBackend => "tc_reject_no_backend",
            Self::TcNatPortExhausted => "tc_nat_port_exhausted",
            Self::TcNoRoute => "tc_no_route",
            Self::TcCtFull => "tc_ct_update_failed",
            Self::TcIcmpXlated => "tc_icmp_xlated",
            Self::TcAffinityHit => "tc_affinity_hit",
            Self::XdpXlated => "xdp_xlated",
            Self::XdpRevXlated => "xdp_rev_xlated",
            Self::XdpPassed => "xdp_passed_to_tc",
            Self::XdpDropNoLocal => "xdp_drop_no_local",
            Self::XdpDropSourceRange => "xdp_drop_source_range",
            Self::XdpNatPortExhausted => "xdp_nat_port_exhausted",
            Self::XdpCtFull => "xdp_ct_update_failed",
            Self::XdpRewriteFailed => "xdp_rewrite_failed",
            Self::TcBackendMissing => "tc_backend_missing",
            Self::TcRewriteFailed => "tc_rewrite_failed",
            Self::TcRejectDropped => "tc_reject_dropped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Stat;

    #[test]
    fn indices_are_dense_and_in_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{} out of place", s.name());
        }
    }
}
