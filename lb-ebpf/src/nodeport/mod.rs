//! The packet path: NodePort, externalIPs and LoadBalancer IPs for traffic from outside the
//! node, on its interfaces (tcx ingress + egress).
//!
//! Ingress, per IPv4/IPv6 TCP or UDP packet:
//! 1. **reply** entry of the conntrack table hit (a backend answering a translated flow, to the
//!    client or — SNATed — to this node's NAT port): source → frontend, destination → client;
//!    routed with `bpf_fib_lookup` and redirected.
//! 2. **forward** entry hit, backend still present: the flow's backend (and SNAT) again.
//! 3. external-scope frontend hit {dst, dport, proto, scope 1}: source ranges (LPM; miss →
//!    DROP), no endpoint → DROP (Local policy, endpoints elsewhere) or REJECT (ICMP port
//!    unreachable from the frontend address); else a backend (client-IP affinity, Maglev or a
//!    random slot: `crate::select`), a route to it, SNAT to the route's source address when the backend is not on this
//!    node, both conntrack entries, rewrite, redirect.
//! 4. anything else passes untouched.
//!
//! ICMP errors (destination unreachable / packet too big / time exceeded) about a translated
//! flow are translated back: outer addresses and the quoted packet's addresses and ports.
//!
//! Egress: only step 1, for flows DNATed to a backend on this node (their replies leave through
//! the stack, not through step 1 at ingress).
//!
//! Malformed, truncated, fragmented or non-TCP/UDP packets pass to the stack untouched: the
//! datapath never drops what it does not understand (the kernel's own checks apply).
//!
//! Each step decides an [`Outcome`] (a verdict kind, a route, one counter); `flow::finish`
//! carries it out and counts it — the only place a tc program counts a verdict. The steps are
//! written once over [`crate::family::Family`] (in `flow.rs`); `v4.rs` and `v6.rs` only parse,
//! route and rewrite their family's headers. Per-packet state lives in a per-CPU [`Work`]
//! value, not on the 512-byte BPF stack.
#![expect(
    clippy::wildcard_imports,
    reason = "the packet path's parts (routing, conntrack, checksums, flows, ICMP, families) share one vocabulary: each uses `super::*`, and this module gathers its parts' helpers"
)]
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, bpf_fib_lookup as FibParams},
    helpers::{
        bpf_csum_diff, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head,
        bpf_skb_change_tail,
    },
    programs::TcContext,
};
use lb_common::{
    BE_FLAG_LOCAL, CT_DIR_FWD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_SEEN_REPLY, CT_F_SNAT,
    CT_REFRESH_NS, CtTimeouts, IPPROTO_TCP, IPPROTO_UDP, NAT_PORT_TRIES, SCOPE_EXTERNAL,
    SVC_FLAG_NO_LOCAL, SVC_FLAG_SRC_RANGES, Stat, ct_timeout_s, nat_port,
};

use crate::{
    family::{Backend, CtKey, CtVal, Family, SvcKey, V4, V6},
    maps::{LB_AFFX_V1, count, count_frontend},
    select::{Hash, Pins, now, random},
};

/// `TCX_NEXT` (= `TC_ACT_UNSPEC`): not ours, or translated for the stack — the next program
/// in the tcx chain (a CNI's, say) runs, else the stack takes the packet. Linux 6.6, commit
/// e420bed02507 ("bpf: Add fd-based tcx multi-prog infra with link support").
const TC_NEXT: i32 = -1;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where the program is attached (changes only what happens after a reply translation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Ingress,
    Egress,
}

/// Why a packet of a frontend's flow was dropped.
#[derive(Clone, Copy)]
pub(crate) enum Reason {
    NoLocal,
    SourceRange,
    NoRoute,
    PortExhausted,
    CtFull,
    BackendMissing,
}

impl Reason {
    /// The tc program's counter for a drop of this reason.
    #[inline(always)]
    const fn tc(self) -> Stat {
        match self {
            Self::NoLocal => Stat::TcDropNoLocal,
            Self::SourceRange => Stat::TcDropSourceRange,
            Self::NoRoute => Stat::TcNoRoute,
            Self::PortExhausted => Stat::TcNatPortExhausted,
            Self::CtFull => Stat::TcCtFull,
            Self::BackendMissing => Stat::TcBackendMissing,
        }
    }
}

/// What the program does with a packet: its verdict and the one counter it bumps. A plain
/// struct of small integers, returned in a register (an enum with payloads is copied with its
/// unset bytes, which the verifier rejects as reads of uninitialised registers; a larger
/// struct would need a return pointer, which BPF calls do not have).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Outcome {
    pub(crate) kind: Kind,
    /// For `Kind::Send`: where (the rest of the route is in the fib scratch space).
    pub(crate) route: RouteKind,
    /// Counted for `Pass`, `Drop` and `Send` (a `Send` whose redirect fails counts
    /// `TcRewriteFailed` instead).
    pub(crate) stat: Stat,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Not a frontend's packet: untouched, uncounted, to the next program or the stack.
    Ignore,
    /// Translated for the stack (egress replies): to the next program or the stack.
    Pass,
    /// Dropped.
    Drop,
    /// Translated and sent on along `route`.
    Send,
    /// No endpoint: turned into an ICMP unreachable back to the client.
    Reject,
}

impl Outcome {
    pub(crate) const IGNORE: Self = Self::new(Kind::Ignore, Stat::TcXlated);
    pub(crate) const REJECT: Self = Self::new(Kind::Reject, Stat::TcRejectNoBackend);

    #[inline(always)]
    pub(crate) const fn new(kind: Kind, stat: Stat) -> Self {
        Self {
            kind,
            route: RouteKind::Local,
            stat,
        }
    }

    #[inline(always)]
    pub(crate) const fn drop(stat: Stat) -> Self {
        Self::new(Kind::Drop, stat)
    }

    #[inline(always)]
    pub(crate) const fn pass(stat: Stat) -> Self {
        Self::new(Kind::Pass, stat)
    }

    #[inline(always)]
    pub(crate) const fn send(route: RouteKind, stat: Stat) -> Self {
        Self {
            kind: Kind::Send,
            route,
            stat,
        }
    }
}

#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the program's own context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The entry point for both hooks: parse Ethernet, dispatch by family. Never fails a packet it
/// cannot parse.
#[inline(always)]
pub(crate) fn handle(ctx: &TcContext, dir: Dir) -> i32 {
    let Ok(proto) = ctx.load::<[u8; 2]>(12) else {
        return TC_NEXT;
    };
    match u16::from_be_bytes(proto) {
        ETH_P_IP => flow::handle::<V4>(ctx, dir),
        ETH_P_IPV6 => flow::handle::<V6>(ctx, dir),
        _ => TC_NEXT,
    }
}

mod csum;
mod ct;
mod flow;
mod icmp;
mod route;
mod v4;
mod v6;

use csum::*;
use ct::*;
use flow::{Parsed, Wire};
pub(crate) use flow::{Pkt, Selected, Tuple, Work, commit, established, reply, select};
use route::*;
pub(crate) use route::{RouteKind, fib_params};
pub(crate) use v4::work as work4;
