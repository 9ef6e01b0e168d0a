//! Connection tracking: timeouts (load-time globals), entry refresh, TCP state, NAT port reuse.
use super::*;

/// Conntrack timeouts (seconds; 0 = default), set by the agent at load time
/// (`lb_common::GLOBALS_CT_TIMEOUTS`).
#[unsafe(no_mangle)]
pub(crate) static LB_CT_TCP_EST_S: u64 = 0;

#[unsafe(no_mangle)]
pub(crate) static LB_CT_TCP_SYN_S: u64 = 0;

#[unsafe(no_mangle)]
pub(crate) static LB_CT_TCP_CLOSE_S: u64 = 0;

#[unsafe(no_mangle)]
pub(crate) static LB_CT_OTHER_S: u64 = 0;

/// The conntrack timeouts in force.
#[inline(always)]
pub(crate) fn timeouts() -> CtTimeouts {
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

/// A conntrack entry (in its map) seeing a packet: flags and expiry moved on when worth a
/// write ([`refresh`]).
#[inline(always)]
pub(crate) fn touch<A>(v: *mut CtVal<A>, proto: u8, tcp_flags: u8, reply: bool) {
    // SAFETY: a value of our own LRU map; torn writes of these plain fields by two CPUs at
    // once only make an entry live a little longer or shorter.
    let v = unsafe { &mut *v };
    if let Some((f, e)) = refresh(proto, v.flags, tcp_flags, reply, v.expires_ns, now()) {
        v.flags = f;
        v.expires_ns = e;
    }
}

/// Next `expires_ns` and flags for a conntrack entry seeing a packet, or `None` when neither
/// moved enough to be worth a write.
#[inline(always)]
pub(crate) fn refresh(
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
pub(crate) fn is_new_syn(proto: u8, tcp_flags: u8, ct_flags: u16) -> bool {
    proto == IPPROTO_TCP && tcp_flags & 0x12 == 0x02 && ct_flags & CT_F_CLOSING != 0
}

/// May a NAT port whose reply entry expires at `expires` be given to a new flow? Only once
/// expired: a closed TCP flow holds its port for Linux's TIME_WAIT length
/// (`CT_TIMEOUT_TCP_CLOSING_S`), because the backend keeps a TIME_WAIT socket for that
/// 4-tuple and refuses a new SYN whose timestamp is older than the last one it saw (PAWS).
/// Measured: reusing ports of closed flows at once lost one SYN in about 60 to that.
#[inline(always)]
pub(crate) fn nat_port_reusable(expires: u64, t: u64) -> bool {
    expires < t
}
