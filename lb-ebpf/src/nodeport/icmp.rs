//! ICMP for both families: REJECT as a port unreachable from the frontend address, and ICMP
//! errors about translated flows translated back (outer and quoted headers).
use lb_common::{Ct4Key, Ct6Key};

use super::*;
use crate::maps::{LB4_CT_V1, LB6_CT_V1};

/// Shrinks the packet to `keep` bytes and grows `grow` bytes of headroom in front: what an
/// ICMP error needs (its headers, then the start of the offending packet).
#[inline(always)]
pub(crate) fn make_room(ctx: &TcContext, keep: u32, grow: u32) -> bool {
    // SAFETY: helpers taking this program's own skb and plain integers.
    unsafe {
        bpf_skb_change_tail(ctx.skb.skb.cast(), keep, 0) == 0
            && bpf_skb_change_head(ctx.skb.skb.cast(), grow, 0) == 0
    }
}

pub(crate) mod v4 {
    use super::super::v4::*;
    use super::*;

    /// REJECT: turns the packet into an ICMP port unreachable from the frontend address back
    /// to the client, out of the interface it came in on.
    ///
    /// The quote is the IP header and the first 8 bytes of UDP, or the 20-byte fixed TCP
    /// header: a TCP packet received with `CHECKSUM_PARTIAL` (a veth peer's offload) cannot
    /// be trimmed before its checksum field (`bpf_skb_change_tail` refuses, Linux's
    /// `__bpf_skb_min_len`). Packets with IP options are dropped instead (rare; not worth a
    /// variable-length quote).
    #[inline(never)]
    pub(crate) fn reject(ctx: &TcContext, p: &Pkt<[u8; 4]>) -> bool {
        let (Ok(ip), Ok(macs)) = (ctx.load::<Hdr>(IP_OFF), ctx.load::<[u8; 12]>(0)) else {
            return false;
        };
        if ip.vihl != 0x45 {
            return false;
        }
        let tcp = p.proto == IPPROTO_TCP;
        let mut l4 = [0u8; 20];
        if tcp {
            match ctx.load::<[u8; 20]>(p.l4) {
                Ok(b) => l4 = b,
                Err(_) => return false,
            }
        } else {
            match ctx.load::<[u8; 8]>(p.l4) {
                Ok(b) => l4[..8].copy_from_slice(&b),
                Err(_) => return false,
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
        if tcp {
            let ic = finish(partial(&mut out[34..82], 0));
            out[36..38].copy_from_slice(&ic);
            make_room(ctx, 14 + 40, 28) && ctx.store(0, &out, 0).is_ok()
        } else {
            let ic = finish(partial(&mut out[34..70], 0));
            out[36..38].copy_from_slice(&ic);
            let Ok(head) = <[u8; 70]>::try_from(&out[..70]) else {
                return false;
            };
            make_room(ctx, 14 + 28, 28) && ctx.store(0, &head, 0).is_ok()
        }
    }

    /// An ICMP error quoting a packet of a translated flow: find the flow from the quote
    /// (which is a packet *we* sent, so its reverse is a reply key... or a forward key for
    /// errors coming from the client side) and translate outer and inner headers back.
    #[inline(never)]
    #[expect(
        clippy::too_many_lines,
        reason = "outer and quoted headers of an ICMP error, checked and rewritten in one pass"
    )]
    pub(crate) fn icmp_error(ctx: &TcContext, l4: usize, dir: Dir) -> Outcome {
        let (Ok(ip), Ok(icmp)) = (ctx.load::<Hdr>(IP_OFF), ctx.load::<[u8; 4]>(l4)) else {
            return Outcome::IGNORE;
        };
        // Destination unreachable (3), time exceeded (11), parameter problem (12).
        if !matches!(icmp[0], 3 | 11 | 12) {
            return Outcome::IGNORE;
        }
        let inner = l4 + 8;
        let Ok(q) = ctx.load::<Hdr>(inner) else {
            return Outcome::IGNORE;
        };
        if q.vihl != 0x45 || (q.proto != IPPROTO_TCP && q.proto != IPPROTO_UDP) {
            return Outcome::IGNORE;
        }
        let ql4 = inner + 20;
        let Ok(qp) = ctx.load::<[u8; 4]>(ql4) else {
            return Outcome::IGNORE;
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
                None => return Outcome::IGNORE,
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
            return Outcome::IGNORE;
        };
        buf[24..].copy_from_slice(&rest);
        // The ICMP checksum covers the quote: fold in the difference of its first 28 bytes.
        let Ok(mut old) = ctx.load::<[u8; 28]>(inner) else {
            return Outcome::IGNORE;
        };
        // SAFETY: both buffers are 28 bytes on our stack.
        let d =
            unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 28, buf.as_mut_ptr().cast(), 28, 0) };
        if d < 0
            || ctx.l4_csum_replace(l4 + 2, 0, d as u64, 0).is_err()
            || ctx.store(inner, &buf, 0).is_err()
        {
            return Outcome::drop(Stat::TcRewriteFailed);
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
                return Outcome::drop(Stat::TcRewriteFailed);
            }
        }
        if dir == Dir::Egress {
            return Outcome::pass(Stat::TcIcmpXlated);
        }
        match V4::route(ctx, &outer_src, &a, IPPROTO_ICMP) {
            Ok(r) => Outcome::send(r, Stat::TcIcmpXlated),
            Err(d) => Outcome::drop(d.tc()),
        }
    }
}

pub(crate) mod v6 {
    use super::super::v6::*;
    use super::*;

    /// REJECT: ICMPv6 port unreachable from the frontend address back to the client. The
    /// quote is the IPv6 header and 8 bytes of UDP or the 20-byte fixed TCP header (see the
    /// IPv4 `reject` for why).
    #[inline(never)]
    pub(crate) fn reject(ctx: &TcContext) -> bool {
        let (Ok(ip), Ok(macs)) = (ctx.load::<Hdr>(IP_OFF), ctx.load::<[u8; 12]>(0)) else {
            return false;
        };
        let tcp = ip.next == IPPROTO_TCP;
        // [eth 14][ip6 40][icmp6 8][quoted ip6 40][quoted l4 8 or 20]: 110 or 122 bytes.
        let mut out = [0u8; 122];
        if tcp {
            match ctx.load::<[u8; 60]>(IP_OFF) {
                Ok(q) => out[62..].copy_from_slice(&q),
                Err(_) => return false,
            }
        } else {
            match ctx.load::<[u8; 48]>(IP_OFF) {
                Ok(q) => out[62..110].copy_from_slice(&q),
                Err(_) => return false,
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
        if tcp {
            let c = finish(partial(&mut out[54..122], sum));
            out[56..58].copy_from_slice(&c);
            make_room(ctx, 14 + 60, 48) && ctx.store(0, &out, 0).is_ok()
        } else {
            let c = finish(partial(&mut out[54..110], sum));
            out[56..58].copy_from_slice(&c);
            let Ok(head) = <[u8; 110]>::try_from(&out[..110]) else {
                return false;
            };
            make_room(ctx, 14 + 48, 48) && ctx.store(0, &head, 0).is_ok()
        }
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
    pub(crate) static LB6_ICMP_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<IcmpScratch, 1> =
        aya_ebpf::btf_maps::PerCpuArray::new();

    /// ICMPv6 errors (destination unreachable 1, packet too big 2, time exceeded 3, parameter
    /// problem 4) quoting a packet of a translated flow: translated back like IPv4's.
    #[inline(never)]
    pub(crate) fn icmp_error(ctx: &TcContext, dir: Dir) -> Outcome {
        let (Ok(ip), Ok(icmp)) = (ctx.load::<Hdr>(IP_OFF), ctx.load::<[u8; 4]>(L4_OFF)) else {
            return Outcome::IGNORE;
        };
        if !matches!(icmp[0], 1..=4) {
            return Outcome::IGNORE;
        }
        let inner = L4_OFF + 8;
        let ql4 = inner + 40;
        let (Ok(next), Ok(qp)) = (ctx.load::<u8>(inner + 6), ctx.load::<[u8; 4]>(ql4)) else {
            return Outcome::IGNORE;
        };
        if next != IPPROTO_TCP && next != IPPROTO_UDP {
            return Outcome::IGNORE;
        }
        let Some(sc) = LB6_ICMP_SCRATCH.get_ptr_mut(0) else {
            return Outcome::IGNORE;
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
            _ => return Outcome::IGNORE,
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
                return Outcome::IGNORE;
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
            return Outcome::drop(Stat::TcRewriteFailed);
        }
        if dir == Dir::Egress {
            return Outcome::pass(Stat::TcIcmpXlated);
        }
        match V6::route(ctx, &sc.outer_src, &sc.a, IPPROTO_ICMPV6) {
            Ok(r) => Outcome::send(r, Stat::TcIcmpXlated),
            Err(d) => Outcome::drop(d.tc()),
        }
    }
}
