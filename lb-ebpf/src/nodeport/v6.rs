//! IPv6 on the wire (no extension headers: a packet whose next header is not TCP/UDP/ICMPv6
//! passes): parsing, routing, the header rewrite; ICMPv6 is in [`super::icmp::v6`].
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

#[aya_ebpf::macros::btf_map]
static LB6_WORK: aya_ebpf::btf_maps::PerCpuArray<Work<[u8; 16]>, 1> =
    aya_ebpf::btf_maps::PerCpuArray::new();

impl Wire for V6 {
    #[inline(always)]
    fn work() -> Option<&'static mut Work<[u8; 16]>> {
        // SAFETY: this CPU's slot; a tc program runs to completion without re-entry.
        LB6_WORK.get_ptr_mut(0).map(|w| unsafe { &mut *w })
    }

    /// Out of line: the header copy stays off the entry program's frame.
    #[inline(never)]
    fn parse(ctx: &TcContext, p: &mut Pkt<[u8; 16]>) -> Parsed {
        let Ok(ip) = ctx.load::<Hdr>(IP_OFF) else {
            return Parsed::Other;
        };
        if ip.vtc_flow[0] >> 4 != 6 {
            return Parsed::Other;
        }
        if ip.next == IPPROTO_ICMPV6 {
            p.l4 = L4_OFF;
            return Parsed::Icmp;
        }
        if ip.next != IPPROTO_TCP && ip.next != IPPROTO_UDP {
            return Parsed::Other;
        }
        let Ok(ports) = ctx.load::<[u8; 4]>(L4_OFF) else {
            return Parsed::Other;
        };
        let tcp_flags = if ip.next == IPPROTO_TCP {
            match ctx.load::<u8>(L4_OFF + 13) {
                Ok(f) => f,
                Err(_) => return Parsed::Other,
            }
        } else {
            0
        };
        p.src = ip.src;
        p.dst = ip.dst;
        p.sport = u16::from_be_bytes([ports[0], ports[1]]);
        p.dport = u16::from_be_bytes([ports[2], ports[3]]);
        p.proto = ip.next;
        p.tcp_flags = tcp_flags;
        p.l4 = L4_OFF;
        Parsed::Flow
    }

    /// Out of line (IPv6 addresses are large on the BPF stack).
    #[inline(never)]
    fn route(
        ctx: &TcContext,
        src: &[u8; 16],
        dst: &[u8; 16],
        proto: u8,
    ) -> Result<RouteKind, Reason> {
        let params = fib_params().ok_or(Reason::NoRoute)?;
        params.family = AF_INET6;
        params.l4_protocol = proto;
        params.ifindex = skb_ifindex(ctx);
        // SAFETY: [u8; 16] and [u32; 4] have the same size; every bit pattern is valid.
        unsafe {
            params.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(*src);
            params.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(*dst);
        }
        fib(ctx, params)
    }

    #[inline(always)]
    fn route_src() -> [u8; 16] {
        match LB_FIB_SCRATCH.get_ptr(0) {
            // SAFETY: the helper filled in the IPv6 member (BPF_FIB_LOOKUP_SRC); same size.
            Some(p) => unsafe {
                core::mem::transmute::<[u32; 4], [u8; 16]>((*p).__bindgen_anon_3.ipv6_src)
            },
            None => [0; 16],
        }
    }

    /// Out of line (IPv6 addresses are large on the BPF stack).
    #[inline(never)]
    fn rewrite(ctx: &TcContext, p: &Pkt<[u8; 16]>, to: &Tuple<[u8; 16]>) -> bool {
        let (csum, flags) = l4_csum(p.proto);
        let csum = L4_OFF + csum;
        let pseudo = flags | u64::from(BPF_F_PSEUDO_HDR);
        set_addr(ctx, (SRC_OFF | csum << 16) as u32, pseudo, &p.src, &to.src)
            && set_addr(ctx, (DST_OFF | csum << 16) as u32, pseudo, &p.dst, &to.dst)
            && set_port(ctx, L4_OFF, csum, flags, p.sport, to.sport)
            && set_port(ctx, L4_OFF + 2, csum, flags, p.dport, to.dport)
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, _p: &Pkt<[u8; 16]>) -> bool {
        icmp::v6::reject(ctx)
    }

    #[inline(always)]
    fn icmp_error(ctx: &TcContext, _l4: usize, dir: Dir) -> Outcome {
        icmp::v6::icmp_error(ctx, dir)
    }
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
