//! IPv4 on the wire: parsing, routing, the header rewrite; ICMP is in [`super::icmp::v4`].
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

#[aya_ebpf::macros::btf_map]
static LB4_WORK: aya_ebpf::btf_maps::PerCpuArray<Work<[u8; 4]>, 1> =
    aya_ebpf::btf_maps::PerCpuArray::new();

/// This CPU's IPv4 working set (tc and XDP).
#[inline(always)]
pub(crate) fn work() -> Option<&'static mut Work<[u8; 4]>> {
    // SAFETY: this CPU's slot; a tc or XDP program runs to completion without re-entry.
    LB4_WORK.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

impl Wire for V4 {
    #[inline(always)]
    fn work() -> Option<&'static mut Work<[u8; 4]>> {
        work()
    }

    /// Out of line: the header copy stays off the entry program's frame.
    #[inline(never)]
    fn parse(ctx: &TcContext, p: &mut Pkt<[u8; 4]>) -> Parsed {
        let Ok(ip) = ctx.load::<Hdr>(IP_OFF) else {
            return Parsed::Other;
        };
        let ihl = usize::from(ip.vihl & 0x0f) * 4;
        if ip.vihl >> 4 != 4 || ihl < 20 {
            return Parsed::Other;
        }
        // Fragments (offset or more-fragments set) carry no or partial L4 headers: pass.
        if u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
            return Parsed::Other;
        }
        let l4 = IP_OFF + ihl;
        if ip.proto == IPPROTO_ICMP {
            p.l4 = l4;
            return Parsed::Icmp;
        }
        if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
            return Parsed::Other;
        }
        let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
            return Parsed::Other;
        };
        let tcp_flags = if ip.proto == IPPROTO_TCP {
            match ctx.load::<u8>(l4 + 13) {
                Ok(f) => f,
                Err(_) => return Parsed::Other,
            }
        } else {
            0
        };
        *p = Pkt {
            src: ip.src,
            dst: ip.dst,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto: ip.proto,
            tcp_flags,
            l4,
        };
        Parsed::Flow
    }

    #[inline(always)]
    fn route(
        ctx: &TcContext,
        src: &[u8; 4],
        dst: &[u8; 4],
        proto: u8,
    ) -> Result<RouteKind, Reason> {
        let params = fib_params().ok_or(Reason::NoRoute)?;
        params.family = AF_INET;
        params.l4_protocol = proto;
        params.ifindex = skb_ifindex(ctx);
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
        fib(ctx, params)
    }

    #[inline(always)]
    fn route_src() -> [u8; 4] {
        match LB_FIB_SCRATCH.get_ptr(0) {
            // SAFETY: the helper filled in the IPv4 member (BPF_FIB_LOOKUP_SRC).
            Some(p) => unsafe { (*p).__bindgen_anon_3.ipv4_src }.to_ne_bytes(),
            None => [0; 4],
        }
    }

    #[inline(always)]
    fn rewrite(ctx: &TcContext, p: &Pkt<[u8; 4]>, to: &Tuple<[u8; 4]>) -> bool {
        let (csum, flags) = l4_csum(p.proto);
        let csum = p.l4 + csum;
        let pseudo = flags | u64::from(BPF_F_PSEUDO_HDR) | 4;
        for (off, old, new) in [(SRC_OFF, p.src, to.src), (DST_OFF, p.dst, to.dst)] {
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
        set_port(ctx, p.l4, csum, flags, p.sport, to.sport)
            && set_port(ctx, p.l4 + 2, csum, flags, p.dport, to.dport)
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, p: &Pkt<[u8; 4]>) -> bool {
        icmp::v4::reject(ctx, p)
    }

    #[inline(always)]
    fn icmp_error(ctx: &TcContext, l4: usize, dir: Dir) -> Outcome {
        icmp::v4::icmp_error(ctx, l4, dir)
    }
}
