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
//!    unreachable from the frontend address); else a backend (client-IP affinity or random
//!    slot), a route to it, SNAT to the route's source address when the backend is not on this
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
#![expect(
    clippy::wildcard_imports,
    reason = "the packet path's parts (families, routing, conntrack, checksums, selection, ICMP) share one vocabulary: each uses `super::*`, and this module gathers its parts' helpers"
)]
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, bpf_fib_lookup as FibParams},
    helpers::{
        bpf_csum_diff, bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
    },
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use lb_common::{
    AffMatchKey, AffValue, AffxKey, BE_FLAG_LOCAL, Backend4, CT_DIR_FWD, CT_DIR_REPLY,
    CT_F_CLOSING, CT_F_SEEN_REPLY, CT_F_SNAT, CT_REFRESH_NS, Ct4Key, Ct4Value, Ct6Key, Ct6Value,
    CtTimeouts, IPPROTO_TCP, IPPROTO_UDP, NAT_PORT_TRIES, SCOPE_EXTERNAL, SRCR4_FRONTEND_BITS,
    SRCR6_FRONTEND_BITS, SVC_FLAG_MAGLEV, SVC_FLAG_NO_LOCAL, SVC_FLAG_SRC_RANGES, SrcRange4,
    SrcRange6, Stat, Svc4Key, Svc6Key, SvcValue, ct_timeout_s,
    maglev::{MAGLEV_CHUNK, MaglevKey, flow_hash4, flow_hash6},
    nat_port, select_slot,
};

use crate::maps::{
    LB_AFF_MATCH_V1, LB_AFFX_V1, LB_MAGLEV_V1, LB4_BE_V1, LB4_CT_V1, LB4_SRCR_V1, LB4_SVC_V1,
    LB6_BE_V1, LB6_CT_V1, LB6_SRCR_V1, LB6_SVC_V1, count, count_frontend,
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

/// Not a verdict: the caller must send the ICMP unreachable (out of line, so that the deep
/// new-flow frame and the reject frame are never on the BPF stack together).
const REJECT: i32 = i32::MIN + 1;

/// Where the program is attached (changes only what happens after a reply translation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Ingress,
    Egress,
}

/// Why a packet was consumed instead of passed.
#[derive(Clone, Copy)]
pub(crate) enum Reason {
    NoLocal,
    SourceRange,
    NoRoute,
    PortExhausted,
    CtFull,
    BackendMissing,
}

#[inline(always)]
fn drop_verdict(d: Reason) -> i32 {
    count_drop(d);
    TC_ACT_SHOT
}

/// Counts a tc drop by its reason.
#[inline(always)]
fn count_drop(d: Reason) {
    count(match d {
        Reason::NoLocal => Stat::TcDropNoLocal,
        Reason::SourceRange => Stat::TcDropSourceRange,
        Reason::NoRoute => Stat::TcNoRoute,
        Reason::PortExhausted => Stat::TcNatPortExhausted,
        Reason::CtFull => Stat::TcCtFull,
        Reason::BackendMissing => Stat::TcBackendMissing,
    });
}

/// Drops a packet, counted under `stat` (every drop has its reason).
#[inline(always)]
fn shot(stat: Stat) -> i32 {
    count(stat);
    TC_ACT_SHOT
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
        ETH_P_IP => v4::handle(ctx, dir),
        ETH_P_IPV6 => v6::handle(ctx, dir),
        _ => TC_NEXT,
    }
}

macro_rules! ct_touch {
    ($map:ident, $key:expr, $proto:expr, $tcp_flags:expr, $reply:expr) => {
        if let Some(v) = $map.get_ptr_mut($key) {
            // SAFETY: a value of our own LRU map; torn writes of these plain fields by two
            // CPUs at once only make an entry live a little longer or shorter.
            let v = unsafe { &mut *v };
            if let Some((f, e)) = refresh($proto, v.flags, $tcp_flags, $reply, v.expires_ns, now())
            {
                v.flags = f;
                v.expires_ns = e;
            }
        }
    };
}

mod csum;
mod ct;
mod icmp;
mod route;
mod select;
pub(crate) mod v4;
mod v6;

use csum::*;
use ct::*;
pub(crate) use route::fib_params;
use route::*;
pub(crate) use select::choose;
use select::*;
