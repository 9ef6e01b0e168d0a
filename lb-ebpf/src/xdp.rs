//! XDP fast path for NodePort / LoadBalancer / externalIP traffic from outside (`--xdp`).
//!
//! It runs before the kernel allocates an skb and handles the common north-south case on its
//! own: an IPv4 TCP/UDP flow to a backend on another node, SNATed and DNATed, that leaves by the
//! interface it came in on (`XDP_TX`), and its replies. Everything else goes on to the tc path
//! unchanged (`XDP_PASS`), which handles it as before:
//! - IPv6, IP options, fragments, ICMP (error translation), other protocols;
//! - flows to backends on this node (they leave by the pod bridge, not by this interface);
//! - frontends without endpoints (the tc path builds the ICMP unreachable);
//! - routes via another interface or without a resolved neighbour.
//!
//! XDP drops what is certain to be dropped: source ranges, Local policy without a local
//! endpoint. XDP and tc share the conntrack/NAT maps and the same flow code ([`reply`],
//! [`established`]; [`select`] decides, [`commit`] records), so either can carry any packet of a flow:
//! a flow XDP started is continued by tc when, say, its next packet carries IP options, and the
//! other way round.
use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{BE_FLAG_LOCAL, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP, Stat};

use crate::{
    family::V4,
    maps::{count, count_frontend},
    nodeport::{
        Kind, Outcome, Pkt, Reason, RouteKind, Selected, Tuple, Work, commit, established,
        fib_params, reply, select, work4,
    },
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_OFF: usize = ETH_HLEN;
/// IPv4 without options: the only header XDP rewrites.
const L4_OFF: usize = IP_OFF + 20;
const AF_INET: u8 = 2;
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;
const FIB_SUCCESS: i64 = 0;

/// To the tc path, counted.
const PASSED: Outcome = Outcome::pass(Stat::XdpPassed);

/// A pointer to `T` at `off` in the packet, when the packet is long enough.
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The program: parse, decide ([`path`]), then count and return — the one counting point.
#[inline(always)]
pub(crate) fn handle(ctx: &XdpContext) -> u32 {
    let Some(w) = work4() else {
        return XDP_PASS;
    };
    if !parse(ctx, &mut w.p) {
        return XDP_PASS;
    }
    let o = path(ctx, w);
    let (action, stat) = match o.kind {
        Kind::Ignore => return XDP_PASS,
        // No endpoint: tc builds the ICMP unreachable.
        Kind::Pass | Kind::Reject => (XDP_PASS, Stat::XdpPassed),
        Kind::Drop => (XDP_DROP, o.stat),
        Kind::Send => (XDP_TX, o.stat),
    };
    count(stat);
    action
}

/// The counter of an XDP drop: XDP's own, so that a packet is counted once, by the program
/// that dropped it.
#[inline(always)]
const fn drop_stat(d: Reason) -> Stat {
    match d {
        Reason::NoLocal => Stat::XdpDropNoLocal,
        Reason::SourceRange => Stat::XdpDropSourceRange,
        Reason::PortExhausted => Stat::XdpNatPortExhausted,
        Reason::CtFull => Stat::XdpCtFull,
        // Not dropped by XDP (it passes them to tc), counted where tc would.
        Reason::NoRoute => Stat::TcNoRoute,
        Reason::BackendMissing => Stat::TcBackendMissing,
    }
}

/// An IPv4 packet without options or fragmentation, TCP (full 20-byte header) or UDP, into
/// `p`; else `false` (the tc path takes it).
#[inline(always)]
fn parse(ctx: &XdpContext, p: &mut Pkt<[u8; 4]>) -> bool {
    let Some(eth) = at::<[u8; ETH_HLEN]>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds checked by `at`.
    let eth = unsafe { &*eth };
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
        return false;
    }
    let Some(ip) = at::<[u8; 20]>(ctx, IP_OFF) else {
        return false;
    };
    // SAFETY: bounds checked by `at`.
    let ip = unsafe { &*ip };
    // Version 4, no options; no fragment offset, no more-fragments.
    if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return false;
    }
    let proto = ip[9];
    let tcp_flags = match proto {
        IPPROTO_TCP => match at::<[u8; 20]>(ctx, L4_OFF) {
            // SAFETY: bounds checked by `at`.
            Some(h) => unsafe { (*h)[13] },
            None => return false,
        },
        IPPROTO_UDP if at::<[u8; 8]>(ctx, L4_OFF).is_some() => 0,
        _ => return false,
    };
    let Some(ports) = at::<[u8; 4]>(ctx, L4_OFF) else {
        return false;
    };
    // SAFETY: bounds checked by `at`.
    let ports = unsafe { &*ports };
    *p = Pkt {
        src: [ip[12], ip[13], ip[14], ip[15]],
        dst: [ip[16], ip[17], ip[18], ip[19]],
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        l4: L4_OFF,
    };
    true
}

/// The reply path, the established-flow path, the new-flow path.
#[inline(always)]
fn path(ctx: &XdpContext, w: &mut Work<[u8; 4]>) -> Outcome {
    // A reply of a SNATed flow (backend on another node → this node's NAT port).
    if reply::<V4>(w) {
        if w.ct.flags & CT_F_SNAT == 0 {
            return PASSED;
        }
        let c = &w.ct;
        w.to = Tuple {
            src: c.addr,
            dst: c.nat_addr,
            sport: c.port,
            dport: c.nat_port,
        };
        return send(ctx, w, Stat::XdpRevXlated);
    }
    // A packet of a flow already going to a backend on another node.
    if established::<V4>(w) {
        if w.ct.flags & CT_F_SNAT == 0 {
            return PASSED;
        }
        let c = &w.ct;
        w.to = Tuple {
            src: c.nat_addr,
            dst: c.addr,
            sport: c.nat_port,
            dport: c.port,
        };
        return send(ctx, w, Stat::XdpXlated);
    }
    new_flow(ctx, w)
}

/// The first packet of a flow to an external frontend: the decision is tc's own
/// ([`select`]); XDP carries it out when the backend is on another node.
#[inline(always)]
fn new_flow(ctx: &XdpContext, w: &mut Work<[u8; 4]>) -> Outcome {
    let c = select::<V4>(&w.p, &mut w.be);
    match c.kind {
        Selected::NotOurs => return Outcome::IGNORE,
        // No endpoint: tc builds the ICMP unreachable. A missing backend: tc decides too.
        Selected::Reject => return PASSED,
        Selected::Drop if matches!(c.reason, Reason::BackendMissing) => return PASSED,
        Selected::Drop => return Outcome::drop(drop_stat(c.reason)),
        Selected::Backend => {}
    }
    if w.be.flags & BE_FLAG_LOCAL != 0 {
        return PASSED; // leaves by the pod bridge: tc
    }
    let Some(r) = route(ctx, w.p.src, w.be.address, w.p.proto) else {
        return PASSED;
    };
    if let Err(d) = commit::<V4>(w, c.fe_id, c.id, true, &r.src) {
        return Outcome::drop(drop_stat(d));
    }
    count_frontend(c.fe_id);
    w.to = Tuple {
        src: w.ct.nat_addr,
        dst: w.be.address,
        sport: w.ct.nat_port,
        dport: w.be.port,
    };
    emit(ctx, w, &r, Stat::XdpXlated)
}

/// Where a rewritten packet goes: back out of the interface it came in on, to `dmac`.
struct Tx {
    src: [u8; 4],
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// `bpf_fib_lookup` from `src` to `dst`; `Some` only for a forwarded route with a resolved
/// neighbour out of the ingress interface (the `XDP_TX` case).
#[inline(always)]
fn route(ctx: &XdpContext, src: [u8; 4], dst: [u8; 4], proto: u8) -> Option<Tx> {
    let params = fib_params()?;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `params` is a valid, fully initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            params,
            size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    if rc != FIB_SUCCESS || params.ifindex != ifindex {
        return None;
    }
    // SAFETY: the helper filled in the IPv4 member (BPF_FIB_LOOKUP_SRC).
    let s = unsafe { params.__bindgen_anon_3.ipv4_src };
    Some(Tx {
        src: s.to_ne_bytes(),
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// Routes and rewrites a packet of a known flow to `w.to`; tc takes it when the route is not
/// an `XDP_TX` one.
#[inline(always)]
fn send(ctx: &XdpContext, w: &Work<[u8; 4]>, stat: Stat) -> Outcome {
    match route(ctx, w.to.src, w.to.dst, w.p.proto) {
        Some(r) => emit(ctx, w, &r, stat),
        None => PASSED,
    }
}

/// Rewrites the packet to `w.to` with checksums fixed, sets the MAC addresses, and sends it
/// back out (`XDP_TX`).
#[inline(always)]
fn emit(ctx: &XdpContext, w: &Work<[u8; 4]>, r: &Tx, stat: Stat) -> Outcome {
    if !rewrite(ctx, &w.p, &w.to) {
        return Outcome::drop(Stat::XdpRewriteFailed);
    }
    let Some(eth) = at::<[u8; 12]>(ctx, 0) else {
        return Outcome::drop(Stat::XdpRewriteFailed);
    };
    // SAFETY: bounds checked by `at`; the packet is ours to write.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&r.dmac);
    eth[6..].copy_from_slice(&r.smac);
    Outcome::send(RouteKind::Fib, stat)
}

/// One's-complement update of a checksum for 16-bit words replaced (RFC 1624, eqn. 3).
#[inline(always)]
fn csum_update(csum: u16, old: &[u16; 6], new: &[u16; 6], words: usize) -> u16 {
    let mut s = u32::from(!csum);
    for i in 0..6 {
        if i < words {
            s += u32::from(!old[i]) + u32::from(new[i]);
        }
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn words(a: [u8; 4], b: [u8; 4], pa: u16, pb: u16) -> [u16; 6] {
    [
        u16::from_be_bytes([a[0], a[1]]),
        u16::from_be_bytes([a[2], a[3]]),
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
        pa,
        pb,
    ]
}

/// Source and destination (addresses and ports) rewritten; IPv4 and L4 checksums updated.
#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Pkt<[u8; 4]>, to: &Tuple<[u8; 4]>) -> bool {
    let (src, dst, sport, dport) = (to.src, to.dst, to.sport, to.dport);
    let Some(ip) = at::<[u8; 20]>(ctx, IP_OFF) else {
        return false;
    };
    let old = words(p.src, p.dst, p.sport, p.dport);
    let new = words(src, dst, sport, dport);
    // SAFETY: bounds checked by `at`; the packet is ours to write.
    unsafe {
        let ip = &mut *ip;
        let c = csum_update(u16::from_be_bytes([ip[10], ip[11]]), &old, &new, 4);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
    }
    let Some(ports) = at::<[u8; 4]>(ctx, L4_OFF) else {
        return false;
    };
    // SAFETY: bounds checked by `at`; the packet is ours to write.
    let ports = unsafe { &mut *ports };
    ports[0..2].copy_from_slice(&sport.to_be_bytes());
    ports[2..4].copy_from_slice(&dport.to_be_bytes());
    let csum_off = if p.proto == IPPROTO_TCP { 16 } else { 6 };
    let Some(c) = at::<[u8; 2]>(ctx, L4_OFF + csum_off) else {
        return false;
    };
    // SAFETY: bounds checked by `at`; the packet is ours to write (the ports' borrow ended).
    let c = unsafe { &mut *c };
    let old_c = u16::from_be_bytes(*c);
    // UDP over IPv4 may carry no checksum (0): it stays so. A computed 0 is sent as 0xffff.
    if !(p.proto == IPPROTO_UDP && old_c == 0) {
        let mut n = csum_update(old_c, &old, &new, 6);
        if p.proto == IPPROTO_UDP && n == 0 {
            n = 0xffff;
        }
        *c = n.to_be_bytes();
    }
    true
}
