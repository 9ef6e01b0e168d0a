//! IPv6 (no extension headers: a packet whose next header is not TCP/UDP/ICMPv6 passes):
//! parse, the reply path, established flows, new flows. ICMPv6 is in [`super::icmp::v6`].
use super::icmp::v6::{icmp_error, reject};
use super::*;

pub(crate) const IP_OFF: usize = ETH_HLEN;
pub(crate) const SRC_OFF: usize = IP_OFF + 8;
pub(crate) const DST_OFF: usize = IP_OFF + 24;
pub(crate) const L4_OFF: usize = IP_OFF + 40;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Hdr {
    pub(crate) vtc_flow: [u8; 4],
    pub(crate) payload_len: [u8; 2],
    pub(crate) next: u8,
    pub(crate) hop_limit: u8,
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
}

pub(crate) struct Pkt {
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
}

pub(super) fn handle(ctx: &TcContext, dir: Dir) -> i32 {
    let Ok(ip) = ctx.load::<Hdr>(IP_OFF) else {
        return TC_NEXT;
    };
    if ip.vtc_flow[0] >> 4 != 6 {
        return TC_NEXT;
    }
    if ip.next == IPPROTO_ICMPV6 {
        return icmp_error(ctx, &ip, dir);
    }
    if ip.next != IPPROTO_TCP && ip.next != IPPROTO_UDP {
        return TC_NEXT;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(L4_OFF) else {
        return TC_NEXT;
    };
    let tcp_flags = if ip.next == IPPROTO_TCP {
        match ctx.load::<u8>(L4_OFF + 13) {
            Ok(f) => f,
            Err(_) => return TC_NEXT,
        }
    } else {
        0
    };
    let p = Pkt {
        src: ip.src,
        dst: ip.dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: ip.next,
        tcp_flags,
    };
    let r = reply_path(ctx, &p, dir);
    if r != NOT_HANDLED || dir == Dir::Egress {
        return if r == NOT_HANDLED { TC_NEXT } else { r };
    }
    let r = established(ctx, &p);
    if r != NOT_HANDLED {
        return r;
    }
    match fwd(ctx, &p) {
        REJECT => reject(ctx, &ip),
        COMMIT => commit(ctx, &p),
        v => v,
    }
}

/// Not a verdict: `fwd` chose a backend; [`commit`] rewrites and sends the packet.
pub(crate) const COMMIT: i32 = i32::MIN + 2;

/// Rewrites the packet to the tuple `fwd` left in the scratch space and sends it.
#[inline(never)]
pub(crate) fn commit(ctx: &TcContext, p: &Pkt) -> i32 {
    let Some(sc) = LB6_SCRATCH.get_ptr(0) else {
        return shot(Stat::TcRewriteFailed);
    };
    // SAFETY: this CPU's slot, written by `fwd` in this same run.
    let sc = unsafe { &*sc };
    if !rewrite(ctx, p, &sc.to) {
        return shot(Stat::TcRewriteFailed);
    }
    count(Stat::TcXlated);
    count_frontend(sc.fwd.frontend_id);
    forward(ctx, sc.route)
}

/// Not a verdict: the path found nothing to do.
pub(crate) const NOT_HANDLED: i32 = i32::MIN;

/// A reply of a translated flow: translated back and sent on.
#[inline(never)]
pub(crate) fn reply_path(ctx: &TcContext, p: &Pkt, dir: Dir) -> i32 {
    match reply(p) {
        Some(v) => rev_xlate(ctx, p, &v, dir),
        None => NOT_HANDLED,
    }
}

/// Out of line: each of these paths has its own 512-byte stack frame.
#[inline(never)]
pub(crate) fn fwd(ctx: &TcContext, p: &Pkt) -> i32 {
    match new_flow(ctx, p) {
        Ok(v) => v,
        Err(d) => drop_verdict(d),
    }
}

pub(crate) fn key(p: &Pkt, dir: u8) -> Ct6Key {
    Ct6Key {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub(crate) fn reply(p: &Pkt) -> Option<Ct6Value> {
    let k = key(p, CT_DIR_REPLY);
    // SAFETY: copied out at once.
    let v = unsafe { LB6_CT_V1.get(&k) }.copied()?;
    ct_touch!(LB6_CT_V1, &k, p.proto, p.tcp_flags, true);
    if p.tcp_flags & 0x04 != 0 {
        let fk = Ct6Key {
            src: v.nat_addr,
            dst: v.addr,
            sport: v.nat_port,
            dport: v.port,
            proto: p.proto,
            dir: CT_DIR_FWD,
            _pad: [0; 2],
        };
        ct_touch!(LB6_CT_V1, &fk, p.proto, p.tcp_flags, false);
    }
    Some(v)
}

/// A packet's new addresses and ports.
pub(crate) struct Tuple {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

/// Where a packet is routed, and the source address that route uses.
pub(crate) struct Routed {
    pub(crate) route: Route,
    pub(crate) src: [u8; 16],
}

impl Routed {
    pub(crate) const fn new() -> Self {
        Self {
            route: Route::LOCAL,
            src: [0; 16],
        }
    }
}

/// Out of line (IPv6 addresses are large on the BPF stack): rewrites the packet to `to`
/// with checksum fixes.
#[inline(never)]
pub(crate) fn rewrite(ctx: &TcContext, p: &Pkt, to: &Tuple) -> bool {
    let (csum, flags) = l4_csum(p.proto);
    let csum = L4_OFF + csum;
    let pseudo = flags | u64::from(BPF_F_PSEUDO_HDR);
    set_addr(ctx, (SRC_OFF | csum << 16) as u32, pseudo, &p.src, &to.src)
        && set_addr(ctx, (DST_OFF | csum << 16) as u32, pseudo, &p.dst, &to.dst)
        && set_port(ctx, L4_OFF, csum, flags, p.sport, to.sport)
        && set_port(ctx, L4_OFF + 2, csum, flags, p.dport, to.dport)
}

/// Writes address `new` over `old` at `offs & 0xffff`, fixing the checksum at `offs >> 16`
/// (`flags`: `BPF_F_PSEUDO_HDR` for an address in the pseudo-header).
#[inline(never)]
pub(crate) fn set_addr(
    ctx: &TcContext,
    offs: u32,
    flags: u64,
    old: &[u8; 16],
    new: &[u8; 16],
) -> bool {
    if old == new {
        return true;
    }
    let Some(d) = csum_diff16(old, new) else {
        return false;
    };
    let (off, csum) = ((offs & 0xffff) as usize, (offs >> 16) as usize);
    ctx.l4_csum_replace(csum, 0, d, flags).is_ok() && ctx.store(off, new, 0).is_ok()
}

/// `bpf_fib_lookup` for `src → dst`; `false` = no usable route.
#[inline(never)]
pub(crate) fn route(
    ctx: &TcContext,
    src: &[u8; 16],
    dst: &[u8; 16],
    proto: u8,
    out: &mut Routed,
) -> bool {
    let Some(params) = fib_params() else {
        return false;
    };
    params.family = AF_INET6;
    params.l4_protocol = proto;
    params.ifindex = skb_ifindex(ctx);
    // SAFETY: [u8; 16] and [u32; 4] have the same size; every bit pattern is valid.
    unsafe {
        params.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(*src);
        params.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(*dst);
    }
    match fib(ctx, params) {
        Ok(r) => {
            out.route = r;
            // SAFETY: the helper filled in the IPv6 member (BPF_FIB_LOOKUP_SRC).
            out.src = unsafe {
                core::mem::transmute::<[u32; 4], [u8; 16]>(params.__bindgen_anon_3.ipv6_src)
            };
            true
        }
        Err(_) => false,
    }
}

#[inline(always)]
pub(crate) fn rev_xlate(ctx: &TcContext, p: &Pkt, v: &Ct6Value, dir: Dir) -> i32 {
    let to = Tuple {
        src: v.addr,
        dst: v.nat_addr,
        sport: v.port,
        dport: v.nat_port,
    };
    if !rewrite(ctx, p, &to) {
        return shot(Stat::TcRewriteFailed);
    }
    count(Stat::TcRevXlated);
    if dir == Dir::Egress {
        return TC_NEXT;
    }
    let mut r = Routed::new();
    if !route(ctx, &v.addr, &v.nat_addr, p.proto, &mut r) {
        return drop_verdict(Reason::NoRoute);
    }
    forward(ctx, r.route)
}

/// A packet of a flow with a live forward entry whose backend still exists as recorded:
/// the same backend (and SNAT) again.
#[inline(never)]
pub(crate) fn established(ctx: &TcContext, p: &Pkt) -> i32 {
    let mut k = key(p, CT_DIR_FWD);
    // SAFETY: copied out at once.
    let Some(v) = unsafe { LB6_CT_V1.get(&k) }.copied() else {
        return NOT_HANDLED;
    };
    // SAFETY: copied out at once.
    match unsafe { LB6_BE_V1.get(&v.backend_id) } {
        Some(be) if be.address == v.addr && be.port == v.port => {}
        _ => return NOT_HANDLED,
    }
    if is_new_syn(p.proto, p.tcp_flags, v.flags) {
        // A new connection on the tuple of a closed one: a new flow (as IPv4).
        return NOT_HANDLED;
    }
    ct_touch!(LB6_CT_V1, &k, p.proto, p.tcp_flags, false);
    if p.tcp_flags & 0x04 != 0 {
        // RST ends the flow both ways (the key is reused: the stack is tight here).
        k = Ct6Key {
            src: v.addr,
            dst: v.nat_addr,
            sport: v.port,
            dport: v.nat_port,
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        ct_touch!(LB6_CT_V1, &k, p.proto, p.tcp_flags, true);
    }
    let to = if v.flags & CT_F_SNAT != 0 {
        Tuple {
            src: v.nat_addr,
            dst: v.addr,
            sport: v.nat_port,
            dport: v.port,
        }
    } else {
        Tuple {
            src: p.src,
            dst: v.addr,
            sport: p.sport,
            dport: v.port,
        }
    };
    let mut r = Routed::new();
    if !route(ctx, &to.src, &to.dst, p.proto, &mut r) {
        return drop_verdict(Reason::NoRoute);
    }
    if !rewrite(ctx, p, &to) {
        return shot(Stat::TcRewriteFailed);
    }
    count(Stat::TcXlated);
    forward(ctx, r.route)
}

/// Per-CPU scratch space for the new-flow path (a 56-byte value thrice over would not fit
/// the 512-byte BPF stack next to the route lookup).
#[repr(C)]
pub(crate) struct Scratch {
    fwd: Ct6Value,
    rev: Ct6Value,
    rkey: Ct6Key,
    fkey: Ct6Key,
    to: Tuple,
    route: Route,
}

#[aya_ebpf::macros::btf_map]
pub(crate) static LB6_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<Scratch, 1> =
    aya_ebpf::btf_maps::PerCpuArray::new();

/// Is the NAT port of `sc.rkey` (taken) free for a new flow? See [`nat_port_reusable`].
#[inline(always)]
pub(crate) fn nat_port_free(sc: &Scratch) -> bool {
    // SAFETY: read of a plain field of our own map's value.
    unsafe { LB6_CT_V1.get(&sc.rkey) }.is_none_or(|v| nat_port_reusable(v.expires_ns, now()))
}

#[inline(always)]
#[expect(
    clippy::too_many_lines,
    reason = "the IPv6 new-flow decision and commit in one piece, as the verifier sees it"
)]
pub(crate) fn new_flow(ctx: &TcContext, p: &Pkt) -> Result<i32, Reason> {
    let skey = Svc6Key {
        address: p.dst,
        dport: p.dport,
        backend_slot: 0,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(fe) = unsafe { LB6_SVC_V1.get(&skey) }.copied() else {
        return Ok(TC_NEXT);
    };
    if fe.flags & SVC_FLAG_SRC_RANGES != 0 {
        let k = LpmKey::new(
            SRCR6_FRONTEND_BITS + 128,
            SrcRange6 {
                frontend: p.dst,
                port_be: p.dport.to_be_bytes(),
                proto: p.proto,
                _pad: 0,
                client: p.src,
            },
        );
        if LB6_SRCR_V1.get(&k).is_none() {
            return Err(Reason::SourceRange);
        }
    }
    if fe.count == 0 {
        if fe.flags & SVC_FLAG_NO_LOCAL != 0 {
            return Err(Reason::NoLocal);
        }
        return Ok(REJECT);
    }
    let hash = flow_hash6(&p.src, &p.dst, p.sport, p.dport, p.proto);
    let id = choose(&fe, p.src, hash, |slot| {
        // SAFETY: copied out at once.
        unsafe {
            LB6_SVC_V1.get(&Svc6Key {
                backend_slot: slot,
                ..skey
            })
        }
        .map(|v| v.backend_id)
    });
    if id == 0 {
        return Err(Reason::BackendMissing);
    }
    // SAFETY: copied out at once.
    let be = unsafe { LB6_BE_V1.get(&id) }
        .copied()
        .ok_or(Reason::BackendMissing)?;
    let mut routed = Routed::new();
    if !route(ctx, &p.src, &be.address, p.proto, &mut routed) {
        return Err(Reason::NoRoute);
    }
    let (r, route_src) = (routed.route, routed.src);
    let snat = be.flags & BE_FLAG_LOCAL == 0 && !r.is_local();
    let sc = LB6_SCRATCH.get_ptr_mut(0).ok_or(Reason::CtFull)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on it while we do.
    let sc = unsafe { &mut *sc };
    let expires = now() + ct_timeout_s(p.proto, 0, &timeouts()) * 1_000_000_000;
    sc.fwd = Ct6Value {
        addr: be.address,
        nat_addr: p.src,
        port: be.port,
        nat_port: p.sport,
        flags: 0,
        _pad: 0,
        frontend_id: fe.backend_id,
        backend_id: id,
        expires_ns: expires,
    };
    sc.rev = Ct6Value {
        addr: p.dst,
        nat_addr: p.src,
        port: p.dport,
        nat_port: p.sport,
        flags: 0,
        _pad: 0,
        frontend_id: fe.backend_id,
        backend_id: id,
        expires_ns: expires,
    };
    sc.rkey = Ct6Key {
        src: be.address,
        dst: p.src,
        sport: be.port,
        dport: p.sport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    sc.fkey = key(p, CT_DIR_FWD);
    if snat {
        sc.fwd.flags = CT_F_SNAT;
        sc.rev.flags = CT_F_SNAT;
        sc.fwd.nat_addr = route_src;
        sc.rkey.dst = route_src;
        let mut done = false;
        for _ in 0..NAT_PORT_TRIES {
            sc.rkey.dport = nat_port(random());
            // BPF_NOEXIST (1): a port a live flow holds is not taken over; one whose flow
            // is closing or expired is.
            if LB6_CT_V1.insert(&sc.rkey, &sc.rev, 1).is_ok()
                || (nat_port_free(sc) && LB6_CT_V1.insert(&sc.rkey, &sc.rev, 0).is_ok())
            {
                done = true;
                break;
            }
        }
        if !done {
            return Err(Reason::PortExhausted);
        }
        sc.fwd.nat_port = sc.rkey.dport;
    } else if LB6_CT_V1.insert(&sc.rkey, &sc.rev, 0).is_err() {
        return Err(Reason::CtFull);
    }
    if LB6_CT_V1.insert(&sc.fkey, &sc.fwd, 0).is_err() {
        let _ = LB6_CT_V1.remove(&sc.rkey);
        return Err(Reason::CtFull);
    }
    sc.to = Tuple {
        src: sc.fwd.nat_addr,
        dst: be.address,
        sport: sc.fwd.nat_port,
        dport: be.port,
    };
    sc.route = r;
    Ok(COMMIT)
}
