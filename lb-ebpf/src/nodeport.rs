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
/// `bpf_fib_lookup` flag: fill in the source address the route would use. Linux 6.7, commit
/// dab4e1f06cab ("bpf: Add BPF_FIB_LOOKUP_SRC flag").
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;
const FIB_SUCCESS: i64 = 0;
const FIB_NOT_FWDED: i64 = 4;
const FIB_NO_NEIGH: i64 = 7;

/// Not a verdict: the caller must send the ICMP unreachable (out of line, so that the deep
/// new-flow frame and the reject frame are never on the BPF stack together).
const REJECT: i32 = i32::MIN + 1;

/// Where the program is attached (changes only what happens after a reply translation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Ingress,
    Egress,
}

/// What to do with a translated packet. A plain struct, every field always written: a Rust
/// enum with payloads is copied with its unset bytes, which the verifier rejects as reads of
/// uninitialised registers.
#[derive(Clone, Copy)]
struct Route {
    kind: RouteKind,
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum RouteKind {
    /// Redirect out `ifindex` with these MAC addresses.
    Fib,
    /// Redirect out `ifindex`, resolving the neighbour in the kernel.
    Neigh,
    /// The destination is this node: up the stack.
    Local,
}

impl Route {
    const LOCAL: Self = Self {
        kind: RouteKind::Local,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };

    const fn with_ifindex(self, ifindex: u32) -> Self {
        Self { ifindex, ..self }
    }

    const fn is_local(&self) -> bool {
        matches!(self.kind, RouteKind::Local)
    }
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

/// Conntrack timeouts (seconds; 0 = default), set by the agent at load time
/// (`lb_common::GLOBALS_CT_TIMEOUTS`).
#[unsafe(no_mangle)]
static LB_CT_TCP_EST_S: u64 = 0;
#[unsafe(no_mangle)]
static LB_CT_TCP_SYN_S: u64 = 0;
#[unsafe(no_mangle)]
static LB_CT_TCP_CLOSE_S: u64 = 0;
#[unsafe(no_mangle)]
static LB_CT_OTHER_S: u64 = 0;

/// The conntrack timeouts in force.
#[inline(always)]
fn timeouts() -> CtTimeouts {
    // SAFETY: reads of load-time constants; volatile so the compiler keeps the loads (the
    // loader patches the values after compilation).
    let g = |p: *const u64, d: u64| match unsafe { core::ptr::read_volatile(p) } {
        0 => d,
        v => v,
    };
    let d = CtTimeouts::DEFAULT;
    CtTimeouts {
        tcp_established_s: g(&raw const LB_CT_TCP_EST_S, d.tcp_established_s),
        tcp_syn_s: g(&raw const LB_CT_TCP_SYN_S, d.tcp_syn_s),
        tcp_closing_s: g(&raw const LB_CT_TCP_CLOSE_S, d.tcp_closing_s),
        other_s: g(&raw const LB_CT_OTHER_S, d.other_s),
    }
}

/// Maglev table size M, set by the agent at load time (`lb_common::maglev::GLOBAL_MAGLEV_M`);
/// 0 = no Maglev.
#[unsafe(no_mangle)]
static LB_MAGLEV_M: u32 = 0;

/// The backend id in entry `hash % M` of frontend `fe_id`'s Maglev table; 0 when there is no
/// Maglev or the table is not (yet) there (the caller then picks a random slot). A plain `u32`
/// rather than an `Option`: the verifier refuses the partly undefined values LLVM makes of
/// `Option`s flowing through the closures of `choose`.
#[inline(always)]
fn maglev(fe_id: u32, hash: u32) -> u32 {
    // SAFETY: read of a load-time constant (volatile: patched after compilation).
    let m = unsafe { core::ptr::read_volatile(&raw const LB_MAGLEV_M) };
    if m == 0 {
        return 0;
    }
    let idx = hash % m;
    let key = MaglevKey {
        frontend_id: fe_id,
        chunk: idx / MAGLEV_CHUNK,
    };
    // SAFETY: a read of one u32 of the value; the agent replaces values whole.
    match unsafe { LB_MAGLEV_V1.get(&key) } {
        Some(c) => c.backend_ids[(idx & (MAGLEV_CHUNK - 1)) as usize],
        None => 0,
    }
}

/// The backend id for a new flow without (valid) affinity: the Maglev entry, else a random
/// slot's; 0 when the slot is missing.
#[inline(always)]
fn pick(fe: &SvcValue, hash: u32, slot_id: &impl Fn(u16) -> Option<u32>) -> u32 {
    if fe.flags & SVC_FLAG_MAGLEV != 0 {
        let id = maglev(fe.backend_id, hash);
        if id != 0 {
            return id;
        }
    }
    slot_id(select_slot(random(), fe.count)).unwrap_or(0)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
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

/// The L4 checksum field's offset from the L4 header, and the flags for `bpf_l4_csum_replace`.
#[inline(always)]
fn l4_csum(proto: u8) -> (usize, u64) {
    if proto == IPPROTO_TCP {
        (16, 0)
    } else {
        // UDP: a zero checksum (IPv4: "none") stays zero; a computed zero is written as 0xffff.
        (6, u64::from(BPF_F_MARK_MANGLED_0))
    }
}

/// Rewrites a 16-bit port at `off` and fixes the L4 checksum at `csum_off`.
#[inline(always)]
fn set_port(ctx: &TcContext, off: usize, csum_off: usize, flags: u64, old: u16, new: u16) -> bool {
    if old == new {
        return true;
    }
    let (o, n) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(csum_off, u64::from(o), u64::from(n), flags | 2)
        .is_ok()
        && ctx.store(off, &n, 0).is_ok()
}

/// Sends a translated packet on its way.
#[inline(always)]
fn forward(ctx: &TcContext, route: Route) -> i32 {
    match route.kind {
        RouteKind::Fib => {
            let mut eth = [0u8; 12];
            eth[..6].copy_from_slice(&route.dmac);
            eth[6..].copy_from_slice(&route.smac);
            if ctx.store(0, &eth, 0).is_err() {
                return shot(Stat::TcRewriteFailed);
            }
            // SAFETY: plain integers; the verdict is the helper's return value.
            unsafe { bpf_redirect(route.ifindex, 0) as i32 }
        }
        // SAFETY: the context pointer of this program; no nexthop parameters (the kernel
        // looks the route up itself). Linux 5.10, commit b4ab31414970 ("bpf: Add
        // redirect_neigh helper as redirect drop-in").
        RouteKind::Neigh => unsafe {
            bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        RouteKind::Local => TC_NEXT,
    }
}

/// Per-CPU space for `bpf_fib_lookup`'s parameters: 64 bytes off the BPF stack, and map memory
/// the helper writes without the verifier tracking spilled registers in it.
#[aya_ebpf::macros::btf_map]
static LB_FIB_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<FibParams, 1> =
    aya_ebpf::btf_maps::PerCpuArray::new();

/// This CPU's zeroed fib-lookup parameters.
#[inline(always)]
pub(crate) fn fib_params() -> Option<&'static mut FibParams> {
    let p = LB_FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; a TC program runs to completion on one CPU without re-entry.
    let p = unsafe { &mut *p };
    // Every input field, with volatile writes: a plain zeroing is merged into a `memset` call
    // that the verifier refuses. Outputs (MACs, ifindex, source) are written by the helper.
    // SAFETY: writes of plain integers into our own map value.
    unsafe {
        #[expect(
            clippy::cast_ptr_alignment,
            reason = "a map value: the kernel aligns it to 8 bytes"
        )]
        let b = core::ptr::from_mut(p).cast::<u64>();
        for i in 0..(core::mem::size_of::<FibParams>() / 8) {
            core::ptr::write_volatile(b.add(i), 0);
        }
    }
    Some(p)
}

/// Runs `bpf_fib_lookup` and turns the answer into a [`Route`]; `params` keeps the source
/// address the route uses (for SNAT).
#[inline(always)]
fn fib(ctx: &TcContext, params: &mut FibParams) -> Result<Route, Reason> {
    // SAFETY: `params` is a valid, fully initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    match rc {
        FIB_SUCCESS => Ok(Route {
            kind: RouteKind::Fib,
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
        }),
        FIB_NO_NEIGH => Ok(Route {
            kind: RouteKind::Neigh,
            ..Route::LOCAL
        }
        .with_ifindex(params.ifindex)),
        FIB_NOT_FWDED => Ok(Route::LOCAL),
        _ => Err(Reason::NoRoute),
    }
}

/// Next `expires_ns` and flags for a conntrack entry seeing a packet, or `None` when neither
/// moved enough to be worth a write.
#[inline(always)]
fn refresh(
    proto: u8,
    flags: u16,
    tcp_flags: u8,
    reply: bool,
    expires: u64,
    t: u64,
) -> Option<(u16, u64)> {
    let mut f = flags;
    if reply {
        f |= CT_F_SEEN_REPLY;
    }
    // FIN (0x01) or RST (0x04).
    if proto == IPPROTO_TCP && tcp_flags & 0x05 != 0 {
        f |= CT_F_CLOSING;
    }
    let next = t + ct_timeout_s(proto, f, &timeouts()) * 1_000_000_000;
    if f != flags || next > expires + CT_REFRESH_NS || next < expires {
        Some((f, next))
    } else {
        None
    }
}

/// A TCP SYN (without ACK) on a flow that has closed: the start of a new connection.
#[inline(always)]
fn is_new_syn(proto: u8, tcp_flags: u8, ct_flags: u16) -> bool {
    proto == IPPROTO_TCP && tcp_flags & 0x12 == 0x02 && ct_flags & CT_F_CLOSING != 0
}

/// May a NAT port whose reply entry expires at `expires` be given to a new flow? Only once
/// expired: a closed TCP flow holds its port for Linux's TIME_WAIT length
/// (`CT_TIMEOUT_TCP_CLOSING_S`), because the backend keeps a TIME_WAIT socket for that
/// 4-tuple and refuses a new SYN whose timestamp is older than the last one it saw (PAWS).
/// Measured: reusing ports of closed flows at once lost one SYN in about 60 to that.
#[inline(always)]
fn nat_port_reusable(expires: u64, t: u64) -> bool {
    expires < t
}

/// The backend of a new external flow: client-IP session affinity while it holds, else the
/// frontend's Maglev table entry for the flow's hash (`SVC_FLAG_MAGLEV`), else a random slot.
/// Returns the backend id, 0 when a slot is missing (a `u32`, not a `Result`: see [`maglev`]).
#[inline(always)]
pub(crate) fn choose(
    fe: &SvcValue,
    client: [u8; 16],
    hash: u32,
    slot_id: impl Fn(u16) -> Option<u32>,
) -> u32 {
    if fe.affinity_timeout == 0 {
        return pick(fe, hash, &slot_id);
    }
    let t = now();
    let key = AffxKey {
        client,
        frontend_id: fe.backend_id,
    };
    // SAFETY: copied out at once.
    if let Some(a) = unsafe { LB_AFFX_V1.get(&key) }.copied() {
        let fresh =
            t.wrapping_sub(a.last_used_ns) <= u64::from(fe.affinity_timeout) * 1_000_000_000;
        let member = AffMatchKey {
            backend_id: a.backend_id,
            frontend_id: fe.backend_id,
        };
        if fresh && LB_AFF_MATCH_V1.get_ptr(&member).is_some() {
            let _ = LB_AFFX_V1.insert(
                &key,
                &AffValue {
                    last_used_ns: t,
                    ..a
                },
                0,
            );
            count(Stat::TcAffinityHit);
            return a.backend_id;
        }
    }
    let id = pick(fe, hash, &slot_id);
    if id == 0 {
        return 0;
    }
    let _ = LB_AFFX_V1.insert(
        &key,
        &AffValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: t,
        },
        0,
    );
    id
}

/// Partial one's-complement sum of `buf` (length a multiple of 4) added to `seed`, by
/// `bpf_csum_diff`: native-order 16-bit words, which [`finish`] folds into checksum bytes.
#[inline(always)]
fn partial(buf: &mut [u8], seed: u32) -> u32 {
    // SAFETY: `buf` is on our stack and its length is passed; `from` is empty.
    unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            seed,
        ) as u32
    }
}

/// Folds a partial sum into the checksum field's bytes (as they go on the wire).
#[inline(always)]
fn finish(sum: u32) -> [u8; 2] {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}

/// Shrinks the packet to `keep` bytes and grows `grow` bytes of headroom in front: what an
/// ICMP error needs (its headers, then the start of the offending packet).
#[inline(always)]
fn make_room(ctx: &TcContext, keep: u32, grow: u32) -> bool {
    // SAFETY: helpers taking this program's own skb and plain integers.
    unsafe {
        bpf_skb_change_tail(ctx.skb.skb.cast(), keep, 0) == 0
            && bpf_skb_change_head(ctx.skb.skb.cast(), grow, 0) == 0
    }
}

/// The difference between two 16-byte addresses as `bpf_csum_diff` computes it.
#[inline(always)]
fn csum_diff16(from: &[u8; 16], to: &[u8; 16]) -> Option<u64> {
    // SAFETY: both buffers are 16 bytes (a multiple of 4, as the helper requires); the helper
    // only reads them.
    let d = unsafe {
        bpf_csum_diff(
            from.as_ptr().cast_mut().cast(),
            16,
            to.as_ptr().cast_mut().cast(),
            16,
            0,
        )
    };
    (d >= 0).then_some(d as u64)
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

// ---------------------------------------------------------------------------------------------
// IPv4
// ---------------------------------------------------------------------------------------------
pub(crate) mod v4 {
    #[expect(
        clippy::wildcard_imports,
        reason = "the family module is the parent's packet path for IPv4"
    )]
    use super::*;

    const IP_OFF: usize = ETH_HLEN;
    const CSUM_OFF: usize = IP_OFF + 10;
    const SRC_OFF: usize = IP_OFF + 12;
    const DST_OFF: usize = IP_OFF + 16;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Hdr {
        vihl: u8,
        tos: u8,
        tot_len: [u8; 2],
        id: [u8; 2],
        frag: [u8; 2],
        ttl: u8,
        proto: u8,
        csum: [u8; 2],
        src: [u8; 4],
        dst: [u8; 4],
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
    fn fwd(ctx: &TcContext, p: &Pkt) -> i32 {
        match fwd_xlate(ctx, p) {
            Ok(v) => v,
            Err(d) => drop_verdict(d),
        }
    }

    /// Not a verdict: the path found nothing to do.
    const NOT_HANDLED: i32 = i32::MIN;

    /// A reply of a translated flow: translated back and sent on. Out of line, so that its
    /// frame and the new-flow path's are never on the BPF stack together.
    #[inline(never)]
    fn reply_path(ctx: &TcContext, p: &Pkt, dir: Dir) -> i32 {
        match reply(p) {
            Some(v) => rev_xlate(ctx, p, &v, dir),
            None => NOT_HANDLED,
        }
    }

    fn key(p: &Pkt, dir: u8) -> Ct4Key {
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
    fn rewrite(
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
    fn route(
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
    fn rev_xlate(ctx: &TcContext, p: &Pkt, v: &Ct4Value, dir: Dir) -> i32 {
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

    fn fwd_xlate(ctx: &TcContext, p: &Pkt) -> Result<i32, Reason> {
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
    fn nat_port_free(rkey: &Ct4Key, t: u64) -> bool {
        // SAFETY: read of a plain field of our own map's value.
        unsafe { LB4_CT_V1.get(rkey) }.is_none_or(|v| nat_port_reusable(v.expires_ns, t))
    }

    #[inline(always)]
    fn key_of(p: &Pkt) -> Ct4Key {
        key(p, CT_DIR_FWD)
    }

    /// REJECT: turns the packet into an ICMP port unreachable from the frontend address back
    /// to the client, out of the interface it came in on.
    ///
    /// The quote is the IP header and the first 8 bytes of UDP, or the 20-byte fixed TCP
    /// header: a TCP packet received with `CHECKSUM_PARTIAL` (a veth peer's offload) cannot
    /// be trimmed before its checksum field (`bpf_skb_change_tail` refuses, Linux's
    /// `__bpf_skb_min_len`). Packets with IP options are dropped instead (rare; not worth a
    /// variable-length quote).
    #[inline(never)]
    fn reject(ctx: &TcContext, p: &Pkt, ip: &Hdr) -> i32 {
        if ip.vihl != 0x45 {
            return shot(Stat::TcRejectDropped);
        }
        let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
            return shot(Stat::TcRejectDropped);
        };
        let tcp = p.proto == IPPROTO_TCP;
        let mut l4 = [0u8; 20];
        if tcp {
            match ctx.load::<[u8; 20]>(p.l4) {
                Ok(b) => l4 = b,
                Err(_) => return shot(Stat::TcRejectDropped),
            }
        } else {
            match ctx.load::<[u8; 8]>(p.l4) {
                Ok(b) => l4[..8].copy_from_slice(&b),
                Err(_) => return shot(Stat::TcRejectDropped),
            }
        }
        let quote_l4: u16 = if tcp { 20 } else { 8 };
        // [eth 14][ip 20][icmp 8][quoted ip 20][quoted l4 8 or 20]: 70 or 82 bytes.
        let mut out = [0u8; 82];
        out[..6].copy_from_slice(&macs[6..]);
        out[6..12].copy_from_slice(&macs[..6]);
        out[12] = 0x08;
        out[14] = 0x45;
        out[16..18].copy_from_slice(&(48 + quote_l4).to_be_bytes());
        out[22] = 64;
        out[23] = IPPROTO_ICMP;
        out[26..30].copy_from_slice(&p.dst);
        out[30..34].copy_from_slice(&p.src);
        let c = finish(partial(&mut out[14..34], 0));
        out[24..26].copy_from_slice(&c);
        // ICMP destination unreachable, port unreachable; the quote as received.
        out[34] = 3;
        out[35] = 3;
        out[42] = 0x45;
        out[43] = ip.tos;
        out[44..46].copy_from_slice(&ip.tot_len);
        out[46..48].copy_from_slice(&ip.id);
        out[48..50].copy_from_slice(&ip.frag);
        out[50] = ip.ttl;
        out[51] = ip.proto;
        out[52..54].copy_from_slice(&ip.csum);
        out[54..58].copy_from_slice(&ip.src);
        out[58..62].copy_from_slice(&ip.dst);
        out[62..].copy_from_slice(&l4);
        let ok = if tcp {
            let ic = finish(partial(&mut out[34..82], 0));
            out[36..38].copy_from_slice(&ic);
            make_room(ctx, 14 + 40, 28) && ctx.store(0, &out, 0).is_ok()
        } else {
            let ic = finish(partial(&mut out[34..70], 0));
            out[36..38].copy_from_slice(&ic);
            let head: [u8; 70] = match out[..70].try_into() {
                Ok(h) => h,
                Err(_) => return shot(Stat::TcRejectDropped),
            };
            make_room(ctx, 14 + 28, 28) && ctx.store(0, &head, 0).is_ok()
        };
        if !ok {
            return shot(Stat::TcRejectDropped);
        }
        count(Stat::TcRejectNoBackend);
        // SAFETY: plain integers; back out of the interface the packet came in on.
        unsafe { bpf_redirect(skb_ifindex(ctx), 0) as i32 }
    }

    /// An ICMP error quoting a packet of a translated flow: find the flow from the quote
    /// (which is a packet *we* sent, so its reverse is a reply key... or a forward key for
    /// errors coming from the client side) and translate outer and inner headers back.
    #[inline(never)]
    #[expect(
        clippy::too_many_lines,
        reason = "outer and quoted headers of an ICMP error, checked and rewritten in one pass"
    )]
    fn icmp_error(ctx: &TcContext, ip: &Hdr, l4: usize, dir: Dir) -> i32 {
        let Ok(icmp) = ctx.load::<[u8; 4]>(l4) else {
            return TC_NEXT;
        };
        // Destination unreachable (3), time exceeded (11), parameter problem (12).
        if !matches!(icmp[0], 3 | 11 | 12) {
            return TC_NEXT;
        }
        let inner = l4 + 8;
        let Ok(q) = ctx.load::<Hdr>(inner) else {
            return TC_NEXT;
        };
        if q.vihl != 0x45 || (q.proto != IPPROTO_TCP && q.proto != IPPROTO_UDP) {
            return TC_NEXT;
        }
        let ql4 = inner + 20;
        let Ok(qp) = ctx.load::<[u8; 4]>(ql4) else {
            return TC_NEXT;
        };
        // The quote is a packet this node sent after translation; its reverse is a packet
        // the node received. Backend → client side: that reverse is a reply key; client →
        // backend side (e.g. frag-needed from a router on the client's path): a forward key.
        let mut k = Ct4Key {
            src: q.dst,
            dst: q.src,
            sport: u16::from_be_bytes([qp[2], qp[3]]),
            dport: u16::from_be_bytes([qp[0], qp[1]]),
            proto: q.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        // (a, ap) → (b, bp): the quote as the error's addressee sent it.
        // SAFETY: copied out at once.
        let (a, ap, b, bp) = if let Some(v) = unsafe { LB4_CT_V1.get(&k) }.copied() {
            (v.nat_addr, v.nat_port, v.addr, v.port)
        } else {
            k.dir = CT_DIR_FWD;
            // SAFETY: copied out at once.
            match unsafe { LB4_CT_V1.get(&k) }.copied() {
                Some(v) => {
                    let (na, np) = if v.flags & CT_F_SNAT != 0 {
                        (v.nat_addr, v.nat_port)
                    } else {
                        (q.dst, k.sport)
                    };
                    (v.addr, v.port, na, np)
                }
                None => return TC_NEXT,
            }
        };
        // Outer: to the quote's sender; an error sent by the quote's addressee itself comes
        // from what the sender believes it talked to.
        let outer_src = if ip.src == q.dst { b } else { ip.src };
        let mut buf = [0u8; 28];
        buf[..20].copy_from_slice(&[
            q.vihl,
            q.tos,
            q.tot_len[0],
            q.tot_len[1],
            q.id[0],
            q.id[1],
            q.frag[0],
            q.frag[1],
            q.ttl,
            q.proto,
            0,
            0,
            a[0],
            a[1],
            a[2],
            a[3],
            b[0],
            b[1],
            b[2],
            b[3],
        ]);
        let qc = finish(partial(&mut buf[..20], 0));
        buf[10..12].copy_from_slice(&qc);
        buf[20..22].copy_from_slice(&ap.to_be_bytes());
        buf[22..24].copy_from_slice(&bp.to_be_bytes());
        // Inner L4 checksum left as is: receivers do not verify a truncated quote's checksum.
        let Ok(rest) = ctx.load::<[u8; 4]>(ql4 + 4) else {
            return TC_NEXT;
        };
        buf[24..].copy_from_slice(&rest);
        // The ICMP checksum covers the quote: fold in the difference of its first 28 bytes.
        let Ok(mut old) = ctx.load::<[u8; 28]>(inner) else {
            return TC_NEXT;
        };
        // SAFETY: both buffers are 28 bytes on our stack.
        let d =
            unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 28, buf.as_mut_ptr().cast(), 28, 0) };
        if d < 0
            || ctx.l4_csum_replace(l4 + 2, 0, d as u64, 0).is_err()
            || ctx.store(inner, &buf, 0).is_err()
        {
            return shot(Stat::TcRewriteFailed);
        }
        // Outer header: plain L3 rewrite (ICMP has no pseudo-header).
        for (off, old, new) in [(SRC_OFF, ip.src, outer_src), (DST_OFF, ip.dst, a)] {
            if old == new {
                continue;
            }
            let (o, n) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
            if ctx
                .l3_csum_replace(CSUM_OFF, u64::from(o), u64::from(n), 4)
                .is_err()
                || ctx.store(off, &new, 0).is_err()
            {
                return shot(Stat::TcRewriteFailed);
            }
        }
        count(Stat::TcIcmpXlated);
        if dir == Dir::Egress {
            return TC_NEXT;
        }
        let p = Pkt {
            src: outer_src,
            dst: a,
            sport: 0,
            dport: 0,
            proto: IPPROTO_ICMP,
            tcp_flags: 0,
            l4,
        };
        match route(ctx, outer_src, a, &p).0 {
            Ok(r) => forward(ctx, r),
            Err(d) => drop_verdict(d),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6 (no extension headers: a packet whose next header is not TCP/UDP/ICMPv6 passes)
// ---------------------------------------------------------------------------------------------
mod v6 {
    #[expect(
        clippy::wildcard_imports,
        reason = "the family module is the parent's packet path for IPv6"
    )]
    use super::*;

    const IP_OFF: usize = ETH_HLEN;
    const SRC_OFF: usize = IP_OFF + 8;
    const DST_OFF: usize = IP_OFF + 24;
    const L4_OFF: usize = IP_OFF + 40;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Hdr {
        vtc_flow: [u8; 4],
        payload_len: [u8; 2],
        next: u8,
        hop_limit: u8,
        src: [u8; 16],
        dst: [u8; 16],
    }

    struct Pkt {
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
        tcp_flags: u8,
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
    const COMMIT: i32 = i32::MIN + 2;

    /// Rewrites the packet to the tuple `fwd` left in the scratch space and sends it.
    #[inline(never)]
    fn commit(ctx: &TcContext, p: &Pkt) -> i32 {
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
    const NOT_HANDLED: i32 = i32::MIN;

    /// A reply of a translated flow: translated back and sent on.
    #[inline(never)]
    fn reply_path(ctx: &TcContext, p: &Pkt, dir: Dir) -> i32 {
        match reply(p) {
            Some(v) => rev_xlate(ctx, p, &v, dir),
            None => NOT_HANDLED,
        }
    }

    /// Out of line: each of these paths has its own 512-byte stack frame.
    #[inline(never)]
    fn fwd(ctx: &TcContext, p: &Pkt) -> i32 {
        match new_flow(ctx, p) {
            Ok(v) => v,
            Err(d) => drop_verdict(d),
        }
    }

    fn key(p: &Pkt, dir: u8) -> Ct6Key {
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
    fn reply(p: &Pkt) -> Option<Ct6Value> {
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
    struct Routed {
        route: Route,
        src: [u8; 16],
    }

    impl Routed {
        const fn new() -> Self {
            Self {
                route: Route::LOCAL,
                src: [0; 16],
            }
        }
    }

    /// Out of line (IPv6 addresses are large on the BPF stack): rewrites the packet to `to`
    /// with checksum fixes.
    #[inline(never)]
    fn rewrite(ctx: &TcContext, p: &Pkt, to: &Tuple) -> bool {
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
    fn set_addr(ctx: &TcContext, offs: u32, flags: u64, old: &[u8; 16], new: &[u8; 16]) -> bool {
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
    fn route(ctx: &TcContext, src: &[u8; 16], dst: &[u8; 16], proto: u8, out: &mut Routed) -> bool {
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
    fn rev_xlate(ctx: &TcContext, p: &Pkt, v: &Ct6Value, dir: Dir) -> i32 {
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
    fn established(ctx: &TcContext, p: &Pkt) -> i32 {
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
    static LB6_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<Scratch, 1> =
        aya_ebpf::btf_maps::PerCpuArray::new();

    /// Is the NAT port of `sc.rkey` (taken) free for a new flow? See [`nat_port_reusable`].
    #[inline(always)]
    fn nat_port_free(sc: &Scratch) -> bool {
        // SAFETY: read of a plain field of our own map's value.
        unsafe { LB6_CT_V1.get(&sc.rkey) }.is_none_or(|v| nat_port_reusable(v.expires_ns, now()))
    }

    #[inline(always)]
    #[expect(
        clippy::too_many_lines,
        reason = "the IPv6 new-flow decision and commit in one piece, as the verifier sees it"
    )]
    fn new_flow(ctx: &TcContext, p: &Pkt) -> Result<i32, Reason> {
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

    /// REJECT: ICMPv6 port unreachable from the frontend address back to the client. The
    /// quote is the IPv6 header and 8 bytes of UDP or the 20-byte fixed TCP header (see the
    /// IPv4 `reject` for why).
    #[inline(never)]
    fn reject(ctx: &TcContext, ip: &Hdr) -> i32 {
        let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
            return shot(Stat::TcRejectDropped);
        };
        let tcp = ip.next == IPPROTO_TCP;
        // [eth 14][ip6 40][icmp6 8][quoted ip6 40][quoted l4 8 or 20]: 110 or 122 bytes.
        let mut out = [0u8; 122];
        if tcp {
            match ctx.load::<[u8; 60]>(IP_OFF) {
                Ok(q) => out[62..].copy_from_slice(&q),
                Err(_) => return shot(Stat::TcRejectDropped),
            }
        } else {
            match ctx.load::<[u8; 48]>(IP_OFF) {
                Ok(q) => out[62..110].copy_from_slice(&q),
                Err(_) => return shot(Stat::TcRejectDropped),
            }
        }
        let len: u8 = if tcp { 68 } else { 56 };
        out[..6].copy_from_slice(&macs[6..]);
        out[6..12].copy_from_slice(&macs[..6]);
        out[12] = 0x86;
        out[13] = 0xdd;
        out[14] = 0x60;
        out[19] = len;
        out[20] = IPPROTO_ICMPV6;
        out[21] = 64;
        out[22..38].copy_from_slice(&ip.dst);
        out[38..54].copy_from_slice(&ip.src);
        // Destination unreachable (1), port unreachable (4).
        out[54] = 1;
        out[55] = 4;
        // Pseudo-header: src, dst, upper-layer length, next header 58; then the message.
        let mut lens = [0, 0, 0, len, 0, 0, 0, IPPROTO_ICMPV6];
        let sum = partial(&mut lens, partial(&mut out[22..54], 0));
        let ok = if tcp {
            let c = finish(partial(&mut out[54..122], sum));
            out[56..58].copy_from_slice(&c);
            make_room(ctx, 14 + 60, 48) && ctx.store(0, &out, 0).is_ok()
        } else {
            let c = finish(partial(&mut out[54..110], sum));
            out[56..58].copy_from_slice(&c);
            let head: [u8; 110] = match out[..110].try_into() {
                Ok(h) => h,
                Err(_) => return shot(Stat::TcRejectDropped),
            };
            make_room(ctx, 14 + 48, 48) && ctx.store(0, &head, 0).is_ok()
        };
        if !ok {
            return shot(Stat::TcRejectDropped);
        }
        count(Stat::TcRejectNoBackend);
        // SAFETY: plain integers; back out of the interface the packet came in on.
        unsafe { bpf_redirect(skb_ifindex(ctx), 0) as i32 }
    }

    /// Working set of [`icmp_error`], off the BPF stack.
    pub(crate) struct IcmpScratch {
        k: Ct6Key,
        qsrc: [u8; 16],
        qdst: [u8; 16],
        a: [u8; 16],
        b: [u8; 16],
        outer_src: [u8; 16],
    }

    #[aya_ebpf::macros::btf_map]
    static LB6_ICMP_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<IcmpScratch, 1> =
        aya_ebpf::btf_maps::PerCpuArray::new();

    /// ICMPv6 errors (destination unreachable 1, packet too big 2, time exceeded 3, parameter
    /// problem 4) quoting a packet of a translated flow: translated back like IPv4's.
    #[inline(never)]
    fn icmp_error(ctx: &TcContext, ip: &Hdr, dir: Dir) -> i32 {
        let Ok(icmp) = ctx.load::<[u8; 4]>(L4_OFF) else {
            return TC_NEXT;
        };
        if !matches!(icmp[0], 1..=4) {
            return TC_NEXT;
        }
        let inner = L4_OFF + 8;
        let ql4 = inner + 40;
        let (Ok(next), Ok(qp)) = (ctx.load::<u8>(inner + 6), ctx.load::<[u8; 4]>(ql4)) else {
            return TC_NEXT;
        };
        if next != IPPROTO_TCP && next != IPPROTO_UDP {
            return TC_NEXT;
        }
        let Some(sc) = LB6_ICMP_SCRATCH.get_ptr_mut(0) else {
            return TC_NEXT;
        };
        // SAFETY: this CPU's slot; a TC program runs to completion without re-entry.
        let sc = unsafe { &mut *sc };
        match (
            ctx.load::<[u8; 16]>(inner + 8),
            ctx.load::<[u8; 16]>(inner + 24),
        ) {
            (Ok(a), Ok(b)) => {
                sc.qsrc = a;
                sc.qdst = b;
            }
            _ => return TC_NEXT,
        }
        sc.k = Ct6Key {
            src: sc.qdst,
            dst: sc.qsrc,
            sport: u16::from_be_bytes([qp[2], qp[3]]),
            dport: u16::from_be_bytes([qp[0], qp[1]]),
            proto: next,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        // As IPv4: (a, ap) → (b, bp) is the quote as the error's addressee sent it.
        let (ap, bp);
        // SAFETY: a value of our own map, read while the program runs (RCU).
        if let Some(v) = unsafe { LB6_CT_V1.get(&sc.k) } {
            sc.a = v.nat_addr;
            sc.b = v.addr;
            (ap, bp) = (v.nat_port, v.port);
        } else {
            sc.k.dir = CT_DIR_FWD;
            // SAFETY: as above.
            let Some(v) = (unsafe { LB6_CT_V1.get(&sc.k) }) else {
                return TC_NEXT;
            };
            sc.a = v.addr;
            ap = v.port;
            if v.flags & CT_F_SNAT != 0 {
                sc.b = v.nat_addr;
                bp = v.nat_port;
            } else {
                sc.b = sc.qdst;
                bp = sc.k.sport;
            }
        }
        sc.outer_src = if ip.src == sc.qdst { sc.b } else { ip.src };
        // ICMPv6's checksum covers the pseudo-header (outer addresses, BPF_F_PSEUDO_HDR) and
        // the quote: each field is written with its checksum difference folded in.
        let csum = ((L4_OFF + 2) << 16) as u32;
        let pseudo = u64::from(BPF_F_PSEUDO_HDR);
        let ports = [ap.to_be_bytes(), bp.to_be_bytes()];
        let np = u32::from_ne_bytes([ports[0][0], ports[0][1], ports[1][0], ports[1][1]]);
        if !set_addr(ctx, SRC_OFF as u32 | csum, pseudo, &ip.src, &sc.outer_src)
            || !set_addr(ctx, DST_OFF as u32 | csum, pseudo, &ip.dst, &sc.a)
            || !set_addr(ctx, (inner + 8) as u32 | csum, 0, &sc.qsrc, &sc.a)
            || !set_addr(ctx, (inner + 24) as u32 | csum, 0, &sc.qdst, &sc.b)
            || ctx
                .l4_csum_replace(
                    L4_OFF + 2,
                    u64::from(u32::from_ne_bytes(qp)),
                    u64::from(np),
                    4,
                )
                .is_err()
            || ctx.store(ql4, &ports, 0).is_err()
        {
            return shot(Stat::TcRewriteFailed);
        }
        count(Stat::TcIcmpXlated);
        if dir == Dir::Egress {
            return TC_NEXT;
        }
        let mut r = Routed::new();
        if !route(ctx, &sc.outer_src, &sc.a, IPPROTO_ICMPV6, &mut r) {
            return drop_verdict(Reason::NoRoute);
        }
        forward(ctx, r.route)
    }
}
