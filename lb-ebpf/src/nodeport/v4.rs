//! IPv4: parse, the reply path, established flows, new flows (shared with XDP: [`select`] and
//! [`commit`]). ICMP is in [`super::icmp::v4`].
use super::icmp::v4::{icmp_error, reject};
use super::*;

pub(crate) const IP_OFF: usize = ETH_HLEN;
pub(crate) const CSUM_OFF: usize = IP_OFF + 10;
pub(crate) const SRC_OFF: usize = IP_OFF + 12;
pub(crate) const DST_OFF: usize = IP_OFF + 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Hdr {
    pub(crate) vihl: u8,
    pub(crate) tos: u8,
    pub(crate) tot_len: [u8; 2],
    pub(crate) id: [u8; 2],
    pub(crate) frag: [u8; 2],
    pub(crate) ttl: u8,
    pub(crate) proto: u8,
    pub(crate) csum: [u8; 2],
    pub(crate) src: [u8; 4],
    pub(crate) dst: [u8; 4],
}

/// A parsed TCP/UDP packet.
pub(crate) struct Pkt {
    pub(crate) src: [u8; 4],
    pub(crate) dst: [u8; 4],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
    pub(crate) l4: usize,
}

pub(super) fn handle(ctx: &TcContext, dir: Dir) -> i32 {
    let Ok(ip) = ctx.load::<Hdr>(IP_OFF) else {
        return TC_NEXT;
    };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return TC_NEXT;
    }
    // Fragments (offset or more-fragments set) carry no or partial L4 headers: pass.
    if u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
        return TC_NEXT;
    }
    let l4 = IP_OFF + ihl;
    if ip.proto == IPPROTO_ICMP {
        return icmp_error(ctx, &ip, l4, dir);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return TC_NEXT;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
        return TC_NEXT;
    };
    let tcp_flags = if ip.proto == IPPROTO_TCP {
        match ctx.load::<u8>(l4 + 13) {
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
        proto: ip.proto,
        tcp_flags,
        l4,
    };
    let r = reply_path(ctx, &p, dir);
    if r != NOT_HANDLED || dir == Dir::Egress {
        return if r == NOT_HANDLED { TC_NEXT } else { r };
    }
    match fwd(ctx, &p) {
        REJECT => reject(ctx, &p, &ip),
        v => v,
    }
}

/// Out of line: each of these paths has its own 512-byte stack frame.
#[inline(never)]
pub(crate) fn fwd(ctx: &TcContext, p: &Pkt) -> i32 {
    match fwd_xlate(ctx, p) {
        Ok(v) => v,
        Err(d) => drop_verdict(d),
    }
}

/// Not a verdict: the path found nothing to do.
pub(crate) const NOT_HANDLED: i32 = i32::MIN;

/// A reply of a translated flow: translated back and sent on. Out of line, so that its
/// frame and the new-flow path's are never on the BPF stack together.
#[inline(never)]
pub(crate) fn reply_path(ctx: &TcContext, p: &Pkt, dir: Dir) -> i32 {
    match reply(p) {
        Some(v) => rev_xlate(ctx, p, &v, dir),
        None => NOT_HANDLED,
    }
}

pub(crate) fn key(p: &Pkt, dir: u8) -> Ct4Key {
    Ct4Key {
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
pub(crate) fn reply(p: &Pkt) -> Option<Ct4Value> {
    let k = key(p, CT_DIR_REPLY);
    // SAFETY: copied out at once.
    let v = unsafe { LB4_CT_V1.get(&k) }.copied()?;
    ct_touch!(LB4_CT_V1, &k, p.proto, p.tcp_flags, true);
    if p.tcp_flags & 0x04 != 0 {
        // RST ends the flow both ways.
        let fk = Ct4Key {
            src: v.nat_addr,
            dst: v.addr,
            sport: v.nat_port,
            dport: v.port,
            proto: p.proto,
            dir: CT_DIR_FWD,
            _pad: [0; 2],
        };
        ct_touch!(LB4_CT_V1, &fk, p.proto, p.tcp_flags, false);
    }
    Some(v)
}

/// Rewrites source and destination (addresses and ports) with checksum fixes.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &TcContext,
    p: &Pkt,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
) -> bool {
    let (csum, flags) = l4_csum(p.proto);
    let csum = p.l4 + csum;
    let pseudo = flags | u64::from(BPF_F_PSEUDO_HDR) | 4;
    for (off, old, new) in [(SRC_OFF, p.src, src), (DST_OFF, p.dst, dst)] {
        if old == new {
            continue;
        }
        let (o, n) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
        if ctx
            .l4_csum_replace(csum, u64::from(o), u64::from(n), pseudo)
            .is_err()
            || ctx
                .l3_csum_replace(CSUM_OFF, u64::from(o), u64::from(n), 4)
                .is_err()
            || ctx.store(off, &new, 0).is_err()
        {
            return false;
        }
    }
    set_port(ctx, p.l4, csum, flags, p.sport, sport)
        && set_port(ctx, p.l4 + 2, csum, flags, p.dport, dport)
}

#[inline(always)]
pub(crate) fn route(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    p: &Pkt,
) -> (Result<Route, Reason>, [u8; 4]) {
    let Some(params) = fib_params() else {
        return (Err(Reason::NoRoute), src);
    };
    params.family = AF_INET;
    params.l4_protocol = p.proto;
    params.ifindex = skb_ifindex(ctx);
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    let r = fib(ctx, params);
    // SAFETY: the helper filled in the IPv4 member (BPF_FIB_LOOKUP_SRC).
    let s = unsafe { params.__bindgen_anon_3.ipv4_src };
    (r, s.to_ne_bytes())
}

#[inline(always)]
pub(crate) fn rev_xlate(ctx: &TcContext, p: &Pkt, v: &Ct4Value, dir: Dir) -> i32 {
    if !rewrite(ctx, p, v.addr, v.port, v.nat_addr, v.nat_port) {
        return shot(Stat::TcRewriteFailed);
    }
    count(Stat::TcRevXlated);
    if dir == Dir::Egress {
        return TC_NEXT;
    }
    match route(ctx, v.addr, v.nat_addr, p).0 {
        Ok(r) => forward(ctx, r),
        Err(d) => drop_verdict(d),
    }
}

/// The backend of a live forward entry, if it still exists as recorded.
#[inline(always)]
pub(crate) fn established(p: &Pkt) -> Option<Ct4Value> {
    let k = key(p, CT_DIR_FWD);
    // SAFETY: copied out at once.
    let v = unsafe { LB4_CT_V1.get(&k) }.copied()?;
    // SAFETY: copied out at once.
    let be = unsafe { LB4_BE_V1.get(&v.backend_id) }.copied()?;
    if be.address != v.addr || be.port != v.port {
        return None;
    }
    if is_new_syn(p.proto, p.tcp_flags, v.flags) {
        // A new connection on the tuple of a closed one (the client reused its port):
        // a new flow with a new NAT port and state. The old reply entry keeps the old
        // port until it expires (see `nat_port_reusable`).
        return None;
    }
    ct_touch!(LB4_CT_V1, &k, p.proto, p.tcp_flags, false);
    if p.tcp_flags & 0x04 != 0 {
        // RST ends the flow both ways.
        let rk = Ct4Key {
            src: v.addr,
            dst: v.nat_addr,
            sport: v.port,
            dport: v.nat_port,
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        ct_touch!(LB4_CT_V1, &rk, p.proto, p.tcp_flags, true);
    }
    Some(v)
}

pub(crate) fn fwd_xlate(ctx: &TcContext, p: &Pkt) -> Result<i32, Reason> {
    if let Some(v) = established(p) {
        let (src, sport) = if v.flags & CT_F_SNAT != 0 {
            (v.nat_addr, v.nat_port)
        } else {
            (p.src, p.sport)
        };
        let (r, _) = route(ctx, src, v.addr, p);
        let r = r?;
        if !rewrite(ctx, p, src, sport, v.addr, v.port) {
            return Ok(shot(Stat::TcRewriteFailed));
        }
        count(Stat::TcXlated);
        return Ok(forward(ctx, r));
    }
    let c = select(p);
    let (fe_id, id, be) = match c.kind {
        Selected::NotOurs => return Ok(TC_NEXT),
        Selected::Reject => return Ok(REJECT),
        Selected::Drop => return Err(c.drop),
        Selected::Backend => (c.fe_id, c.id, c.be),
    };
    let (r, route_src) = route(ctx, p.src, be.address, p);
    let r = r?;
    let snat = be.flags & BE_FLAG_LOCAL == 0 && !r.is_local();
    let fwd = commit(p, fe_id, id, &be, snat, route_src)?;
    if !rewrite(ctx, p, fwd.nat_addr, fwd.nat_port, be.address, be.port) {
        return Ok(shot(Stat::TcRewriteFailed));
    }
    count(Stat::TcXlated);
    count_frontend(fe_id);
    Ok(forward(ctx, r))
}

/// What the first packet of a flow meets at an external frontend. A plain struct with every
/// field always written (see [`Route`]): `drop` matters for `Selected::Drop`, the rest for
/// `Selected::Backend`.
pub(crate) struct Chosen {
    pub(crate) kind: Selected,
    pub(crate) drop: Reason,
    pub(crate) fe_id: u32,
    pub(crate) id: u32,
    pub(crate) be: Backend4,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Selected {
    /// Not an external frontend: not ours.
    NotOurs,
    /// No endpoint: REJECT (an ICMP unreachable).
    Reject,
    /// Dropped, for `Chosen::drop`.
    Drop,
    /// A backend was chosen.
    Backend,
}

impl Chosen {
    const fn verdict(kind: Selected, drop: Reason) -> Self {
        Self {
            kind,
            drop,
            fe_id: 0,
            id: 0,
            be: Backend4 {
                address: [0; 4],
                port: 0,
                proto: 0,
                flags: 0,
            },
        }
    }
}

/// The new-flow decision at an external frontend, shared by tc and XDP: frontend lookup,
/// source ranges, no-endpoint verdicts, then the backend (affinity, Maglev, random slot).
#[inline(always)]
pub(crate) fn select(p: &Pkt) -> Chosen {
    let skey = Svc4Key {
        address: p.dst,
        dport: p.dport,
        backend_slot: 0,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(fe) = unsafe { LB4_SVC_V1.get(&skey) }.copied() else {
        return Chosen::verdict(Selected::NotOurs, Reason::BackendMissing);
    };
    if fe.flags & SVC_FLAG_SRC_RANGES != 0 {
        let k = LpmKey::new(
            SRCR4_FRONTEND_BITS + 32,
            SrcRange4 {
                frontend: p.dst,
                port_be: p.dport.to_be_bytes(),
                proto: p.proto,
                _pad: 0,
                client: p.src,
            },
        );
        if LB4_SRCR_V1.get(&k).is_none() {
            return Chosen::verdict(Selected::Drop, Reason::SourceRange);
        }
    }
    if fe.count == 0 {
        if fe.flags & SVC_FLAG_NO_LOCAL != 0 {
            return Chosen::verdict(Selected::Drop, Reason::NoLocal);
        }
        return Chosen::verdict(Selected::Reject, Reason::BackendMissing);
    }
    let mut client = [0u8; 16];
    client[10] = 0xff;
    client[11] = 0xff;
    client[12..].copy_from_slice(&p.src);
    let hash = flow_hash4(p.src, p.dst, p.sport, p.dport, p.proto);
    let id = choose(&fe, client, hash, |slot| {
        // SAFETY: copied out at once.
        unsafe {
            LB4_SVC_V1.get(&Svc4Key {
                backend_slot: slot,
                ..skey
            })
        }
        .map(|v| v.backend_id)
    });
    // SAFETY: copied out at once.
    match (id, unsafe { LB4_BE_V1.get(&id) }.copied()) {
        (0, _) | (_, None) => Chosen::verdict(Selected::Drop, Reason::BackendMissing),
        (id, Some(be)) => Chosen {
            kind: Selected::Backend,
            drop: Reason::BackendMissing,
            fe_id: fe.backend_id,
            id,
            be,
        },
    }
}

/// The conntrack state of a new flow to backend `id`: the reply entry (with a NAT port when
/// `snat`, source `route_src`), then the forward entry, which it returns. Shared by the tc
/// and XDP paths, so either can carry any packet of the flow.
#[inline(always)]
pub(crate) fn commit(
    p: &Pkt,
    fe_id: u32,
    id: u32,
    be: &Backend4,
    snat: bool,
    route_src: [u8; 4],
) -> Result<Ct4Value, Reason> {
    let t = now();
    let mut fwd = Ct4Value {
        addr: be.address,
        nat_addr: p.src,
        port: be.port,
        nat_port: p.sport,
        flags: 0,
        _pad: 0,
        frontend_id: fe_id,
        backend_id: id,
        expires_ns: t + ct_timeout_s(p.proto, 0, &timeouts()) * 1_000_000_000,
    };
    let rev = Ct4Value {
        addr: p.dst,
        nat_addr: p.src,
        port: p.dport,
        nat_port: p.sport,
        ..fwd
    };
    let mut rkey = Ct4Key {
        src: be.address,
        dst: p.src,
        sport: be.port,
        dport: p.sport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    if snat {
        fwd.flags = CT_F_SNAT;
        fwd.nat_addr = route_src;
        rkey.dst = route_src;
        let mut done = false;
        let snat_rev = Ct4Value {
            flags: CT_F_SNAT,
            ..rev
        };
        for _ in 0..NAT_PORT_TRIES {
            rkey.dport = nat_port(random());
            // BPF_NOEXIST (1): a port a live flow holds is not taken over; one whose flow
            // is closing or expired is.
            if LB4_CT_V1.insert(&rkey, &snat_rev, 1).is_ok()
                || (nat_port_free(&rkey, t) && LB4_CT_V1.insert(&rkey, &snat_rev, 0).is_ok())
            {
                done = true;
                break;
            }
        }
        if !done {
            return Err(Reason::PortExhausted);
        }
        fwd.nat_port = rkey.dport;
    } else if LB4_CT_V1.insert(&rkey, &rev, 0).is_err() {
        return Err(Reason::CtFull);
    }
    if LB4_CT_V1.insert(&key_of(p), &fwd, 0).is_err() {
        let _ = LB4_CT_V1.remove(&rkey);
        return Err(Reason::CtFull);
    }
    Ok(fwd)
}

/// Is the NAT port of reply key `rkey` (taken) free for a new flow? See
/// [`nat_port_reusable`].
#[inline(always)]
pub(crate) fn nat_port_free(rkey: &Ct4Key, t: u64) -> bool {
    // SAFETY: read of a plain field of our own map's value.
    unsafe { LB4_CT_V1.get(rkey) }.is_none_or(|v| nat_port_reusable(v.expires_ns, t))
}

#[inline(always)]
pub(crate) fn key_of(p: &Pkt) -> Ct4Key {
    key(p, CT_DIR_FWD)
}
