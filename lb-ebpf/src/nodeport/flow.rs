//! A packet's path, written once for both families: the reply path, established flows, the
//! new-flow decision ([`select`], shared with XDP) and its conntrack state ([`commit`], shared
//! with XDP), and the one place a tc program counts and returns ([`finish`]). What differs by
//! family — parsing, routing, the header rewrite, ICMP — is [`Wire`], in `v4` and `v6`.
use super::*;

/// A parsed TCP/UDP packet.
#[repr(C)]
pub(crate) struct Pkt<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
    /// Offset of the L4 header.
    pub(crate) l4: usize,
}

/// A packet's new addresses and ports.
#[repr(C)]
pub(crate) struct Tuple<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// One packet's working set, per CPU: the packet, the conntrack keys and values it reads and
/// writes, its new tuple, its backend. Off the 512-byte BPF stack (three IPv6 conntrack values
/// alone are 168 bytes); a tc or XDP program runs to completion on its CPU, and XDP's run ends
/// before tc's begins.
#[repr(C)]
pub(crate) struct Work<A> {
    pub(crate) p: Pkt<A>,
    /// The conntrack key last looked up (or, in [`commit`], the forward key).
    pub(crate) key: CtKey<A>,
    /// The entry found by [`reply`] / [`established`], or the new forward entry.
    pub(crate) ct: CtVal<A>,
    /// [`commit`]: the new reply entry and its key.
    pub(crate) rev: CtVal<A>,
    pub(crate) rkey: CtKey<A>,
    pub(crate) to: Tuple<A>,
    /// [`select`]: the chosen backend.
    pub(crate) be: Backend<A>,
}

/// What parsing found.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Parsed {
    /// TCP or UDP, in [`Work::p`].
    Flow,
    /// ICMP: maybe an error about a translated flow (its header at [`Pkt::l4`]).
    Icmp,
    /// Anything else: passed untouched.
    Other,
}

/// What the packet path needs of a family beyond its maps.
pub(crate) trait Wire: Family {
    /// This CPU's working set.
    fn work() -> Option<&'static mut Work<Self::A>>;

    /// Parses a TCP/UDP packet into `p`.
    fn parse(ctx: &TcContext, p: &mut Pkt<Self::A>) -> Parsed;

    /// Looks up the route `src → dst` (kept for [`forward`]).
    fn route(ctx: &TcContext, src: &Self::A, dst: &Self::A, proto: u8)
    -> Result<RouteKind, Reason>;

    /// The source address of the route just looked up (SNAT's).
    fn route_src() -> Self::A;

    /// Rewrites the packet's addresses and ports to `to`, checksums fixed.
    fn rewrite(ctx: &TcContext, p: &Pkt<Self::A>, to: &Tuple<Self::A>) -> bool;

    /// Turns the packet into an ICMP unreachable back to the client; `false` when it cannot.
    fn reject(ctx: &TcContext, p: &Pkt<Self::A>) -> bool;

    /// An ICMP error (ICMP header at `l4`) about a translated flow, translated back.
    fn icmp_error(ctx: &TcContext, l4: usize, dir: Dir) -> Outcome;
}

/// One family's program: parse, decide, then [`finish`].
#[inline(always)]
pub(super) fn handle<F: Wire>(ctx: &TcContext, dir: Dir) -> i32 {
    let Some(w) = F::work() else {
        return TC_NEXT;
    };
    let o = match F::parse(ctx, &mut w.p) {
        Parsed::Flow => path::<F>(ctx, w, dir),
        Parsed::Icmp => F::icmp_error(ctx, w.p.l4, dir),
        Parsed::Other => return TC_NEXT,
    };
    finish::<F>(ctx, &w.p, o)
}

/// Carries out an outcome and counts it: the only place a tc program counts a verdict.
#[inline(always)]
fn finish<F: Wire>(ctx: &TcContext, p: &Pkt<F::A>, o: Outcome) -> i32 {
    let (verdict, stat) = match o.kind {
        Kind::Ignore => return TC_NEXT,
        Kind::Pass => (TC_NEXT, o.stat),
        Kind::Drop => (TC_ACT_SHOT, o.stat),
        Kind::Send => match forward(ctx, o.route) {
            Some(v) => (v, o.stat),
            None => (TC_ACT_SHOT, Stat::TcRewriteFailed),
        },
        Kind::Reject if F::reject(ctx, p) => {
            // SAFETY: plain integers; back out of the interface the packet came in on.
            let v = unsafe { bpf_redirect(skb_ifindex(ctx), 0) as i32 };
            (v, Stat::TcRejectNoBackend)
        }
        Kind::Reject => (TC_ACT_SHOT, Stat::TcRejectDropped),
    };
    count(stat);
    verdict
}

/// Ingress: 1. reply, 2. established, 3. new flow. Egress: 1 only.
#[inline(always)]
fn path<F: Wire>(ctx: &TcContext, w: &mut Work<F::A>, dir: Dir) -> Outcome {
    if reply::<F>(w) {
        return rev_xlate::<F>(ctx, w, dir);
    }
    if dir == Dir::Egress {
        return Outcome::IGNORE;
    }
    if established::<F>(w) {
        return fwd_xlate::<F>(ctx, w);
    }
    new_flow::<F>(ctx, w)
}

/// Is the packet in `w.p` a reply of a translated flow? Its reply entry is then in `w.ct`,
/// refreshed (an RST ends the forward entry too).
#[inline(always)]
pub(crate) fn reply<F: Family>(w: &mut Work<F::A>) -> bool {
    let p = &w.p;
    w.key = CtKey::new(p.src, p.dst, p.sport, p.dport, p.proto, CT_DIR_REPLY);
    let Some(v) = F::ct(&w.key) else {
        return false;
    };
    // SAFETY: a value of our own map, copied out at once.
    w.ct = unsafe { *v };
    touch(v, p.proto, p.tcp_flags, true);
    if p.tcp_flags & 0x04 != 0 {
        // RST ends the flow both ways.
        let c = &w.ct;
        w.key = CtKey::new(c.nat_addr, c.addr, c.nat_port, c.port, p.proto, CT_DIR_FWD);
        if let Some(f) = F::ct(&w.key) {
            touch(f, p.proto, p.tcp_flags, false);
        }
    }
    true
}

/// Is the packet in `w.p` one of a live flow whose backend still exists as recorded? Its
/// forward entry is then in `w.ct`, refreshed.
#[inline(always)]
pub(crate) fn established<F: Family>(w: &mut Work<F::A>) -> bool {
    let p = &w.p;
    w.key = CtKey::new(p.src, p.dst, p.sport, p.dport, p.proto, CT_DIR_FWD);
    let Some(v) = F::ct(&w.key) else {
        return false;
    };
    // SAFETY: a value of our own map, copied out at once.
    w.ct = unsafe { *v };
    match F::backend(w.ct.backend_id) {
        Some(be) if be.address == w.ct.addr && be.port == w.ct.port => {}
        _ => return false,
    }
    if is_new_syn(p.proto, p.tcp_flags, w.ct.flags) {
        // A new connection on the tuple of a closed one (the client reused its port): a new
        // flow with a new NAT port and state. The old reply entry keeps the old port until it
        // expires (see `nat_port_reusable`).
        return false;
    }
    touch(v, p.proto, p.tcp_flags, false);
    if p.tcp_flags & 0x04 != 0 {
        // RST ends the flow both ways.
        let c = &w.ct;
        w.key = CtKey::new(
            c.addr,
            c.nat_addr,
            c.port,
            c.nat_port,
            p.proto,
            CT_DIR_REPLY,
        );
        if let Some(r) = F::ct(&w.key) {
            touch(r, p.proto, p.tcp_flags, true);
        }
    }
    true
}

/// A reply (entry in `w.ct`): source → frontend, destination → client; on ingress, routed.
/// Out of line: its frame and the new-flow path's are never on the BPF stack together.
#[inline(never)]
fn rev_xlate<F: Wire>(ctx: &TcContext, w: &mut Work<F::A>, dir: Dir) -> Outcome {
    let c = &w.ct;
    w.to = Tuple {
        src: c.addr,
        dst: c.nat_addr,
        sport: c.port,
        dport: c.nat_port,
    };
    if !F::rewrite(ctx, &w.p, &w.to) {
        return Outcome::drop(Stat::TcRewriteFailed);
    }
    if dir == Dir::Egress {
        return Outcome::pass(Stat::TcRevXlated);
    }
    match F::route(ctx, &w.to.src, &w.to.dst, w.p.proto) {
        Ok(r) => Outcome::send(r, Stat::TcRevXlated),
        Err(d) => Outcome::drop(d.tc()),
    }
}

/// An established flow (entry in `w.ct`): the same backend (and SNAT) again.
#[inline(never)]
fn fwd_xlate<F: Wire>(ctx: &TcContext, w: &mut Work<F::A>) -> Outcome {
    let (c, p) = (&w.ct, &w.p);
    w.to = if c.flags & CT_F_SNAT != 0 {
        Tuple {
            src: c.nat_addr,
            dst: c.addr,
            sport: c.nat_port,
            dport: c.port,
        }
    } else {
        Tuple {
            src: p.src,
            dst: c.addr,
            sport: p.sport,
            dport: c.port,
        }
    };
    let r = match F::route(ctx, &w.to.src, &w.to.dst, p.proto) {
        Ok(r) => r,
        Err(d) => return Outcome::drop(d.tc()),
    };
    if !F::rewrite(ctx, p, &w.to) {
        return Outcome::drop(Stat::TcRewriteFailed);
    }
    Outcome::send(r, Stat::TcXlated)
}

/// The first packet of a flow: [`select`], a route to the backend, SNAT to the route's source
/// address when the backend is not on this node, [`commit`], rewrite.
#[inline(never)]
fn new_flow<F: Wire>(ctx: &TcContext, w: &mut Work<F::A>) -> Outcome {
    let c = select::<F>(&w.p, &mut w.be);
    match c.kind {
        Selected::NotOurs => return Outcome::IGNORE,
        Selected::Reject => return Outcome::REJECT,
        Selected::Drop => return Outcome::drop(c.reason.tc()),
        Selected::Backend => {}
    }
    let r = match F::route(ctx, &w.p.src, &w.be.address, w.p.proto) {
        Ok(r) => r,
        Err(d) => return Outcome::drop(d.tc()),
    };
    let snat = w.be.flags & BE_FLAG_LOCAL == 0 && r != RouteKind::Local;
    let src = F::route_src();
    if let Err(d) = commit::<F>(w, c.fe_id, c.id, snat, &src) {
        return Outcome::drop(d.tc());
    }
    w.to = Tuple {
        src: w.ct.nat_addr,
        dst: w.be.address,
        sport: w.ct.nat_port,
        dport: w.be.port,
    };
    if !F::rewrite(ctx, &w.p, &w.to) {
        return Outcome::drop(Stat::TcRewriteFailed);
    }
    count_frontend(c.fe_id);
    Outcome::send(r, Stat::TcXlated)
}

/// What the first packet of a flow meets at an external frontend. A plain struct with every
/// field always written: `reason` matters for `Selected::Drop`, the ids for
/// `Selected::Backend` (whose backend [`select`] wrote to its caller's `be`).
pub(crate) struct Chosen {
    pub(crate) kind: Selected,
    pub(crate) reason: Reason,
    pub(crate) fe_id: u32,
    pub(crate) id: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Selected {
    /// Not an external frontend: not ours.
    NotOurs,
    /// No endpoint: REJECT (an ICMP unreachable).
    Reject,
    /// Dropped, for `Chosen::reason`.
    Drop,
    /// A backend was chosen.
    Backend,
}

impl Chosen {
    #[inline(always)]
    const fn verdict(kind: Selected, reason: Reason) -> Self {
        Self {
            kind,
            reason,
            fe_id: 0,
            id: 0,
        }
    }
}

/// The new-flow decision at an external frontend, shared by tc and XDP: frontend lookup,
/// source ranges, no-endpoint verdicts, then the backend (client-IP affinity, Maglev, random
/// slot: [`crate::select`], as the socket hooks choose theirs), copied into `be`.
#[inline(always)]
pub(crate) fn select<F: Family>(p: &Pkt<F::A>, be: &mut Backend<F::A>) -> Chosen {
    let key = SvcKey::frontend(p.dst, p.dport, p.proto, SCOPE_EXTERNAL);
    let Some(fe) = F::svc(&key) else {
        return Chosen::verdict(Selected::NotOurs, Reason::BackendMissing);
    };
    if fe.flags & SVC_FLAG_SRC_RANGES != 0 && !F::source_allowed(&p.dst, p.dport, p.proto, &p.src) {
        return Chosen::verdict(Selected::Drop, Reason::SourceRange);
    }
    if fe.count == 0 {
        if fe.flags & SVC_FLAG_NO_LOCAL != 0 {
            return Chosen::verdict(Selected::Drop, Reason::NoLocal);
        }
        return Chosen::verdict(Selected::Reject, Reason::BackendMissing);
    }
    let hash = F::hash(&p.src, &p.dst, p.sport, p.dport, p.proto);
    let pins = Pins {
        map: &LB_AFFX_V1,
        hit: Stat::TcAffinityHit,
        pin: None,
    };
    let client = || lb_common::AffxKey {
        client: F::client(&p.src),
        frontend_id: fe.backend_id,
    };
    match crate::select::backend::<F, _, _>(&fe, &key, Hash::Flow(hash), &pins, client, be) {
        0 => Chosen::verdict(Selected::Drop, Reason::BackendMissing),
        id => Chosen {
            kind: Selected::Backend,
            reason: Reason::BackendMissing,
            fe_id: fe.backend_id,
            id,
        },
    }
}

/// The conntrack state of a new flow to backend `id` (in `w.be`): the reply entry (with a NAT
/// port when `snat`, source `route_src`), then the forward entry, left in `w.ct`. Shared by
/// the tc and XDP paths, so either can carry any packet of the flow.
#[inline(always)]
pub(crate) fn commit<F: Family>(
    w: &mut Work<F::A>,
    fe_id: u32,
    id: u32,
    snat: bool,
    route_src: &F::A,
) -> Result<(), Reason> {
    let t = now();
    let (p, be) = (&w.p, &w.be);
    w.ct = CtVal {
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
    w.rev = CtVal {
        addr: p.dst,
        port: p.dport,
        ..w.ct
    };
    w.rkey = CtKey::new(be.address, p.src, be.port, p.sport, p.proto, CT_DIR_REPLY);
    w.key = CtKey::new(p.src, p.dst, p.sport, p.dport, p.proto, CT_DIR_FWD);
    if snat {
        w.ct.flags = CT_F_SNAT;
        w.ct.nat_addr = *route_src;
        w.rev.flags = CT_F_SNAT;
        w.rkey.dst = *route_src;
        let mut done = false;
        for _ in 0..NAT_PORT_TRIES {
            w.rkey.dport = nat_port(random());
            // BPF_NOEXIST (1): a port a live flow holds is not taken over; one whose flow is
            // closing or expired is.
            if F::ct_insert(&w.rkey, &w.rev, 1)
                || (nat_port_free::<F>(&w.rkey, t) && F::ct_insert(&w.rkey, &w.rev, 0))
            {
                done = true;
                break;
            }
        }
        if !done {
            return Err(Reason::PortExhausted);
        }
        w.ct.nat_port = w.rkey.dport;
    } else if !F::ct_insert(&w.rkey, &w.rev, 0) {
        return Err(Reason::CtFull);
    }
    if !F::ct_insert(&w.key, &w.ct, 0) {
        F::ct_remove(&w.rkey);
        return Err(Reason::CtFull);
    }
    Ok(())
}

/// Is the NAT port of reply key `rkey` (taken) free for a new flow? See
/// [`nat_port_reusable`].
#[inline(always)]
fn nat_port_free<F: Family>(rkey: &CtKey<F::A>, t: u64) -> bool {
    // SAFETY: read of a plain field of our own map's value.
    F::ct(rkey).is_none_or(|v| nat_port_reusable(unsafe { (*v).expires_ns }, t))
}
