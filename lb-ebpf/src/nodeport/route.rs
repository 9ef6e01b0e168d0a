//! Routing a translated packet: `bpf_fib_lookup` into a [`RouteKind`], and sending it on.
use super::*;

/// `bpf_fib_lookup` flag: fill in the source address the route would use. Linux 6.7, commit
/// dab4e1f06cab ("bpf: Add BPF_FIB_LOOKUP_SRC flag").
pub(crate) const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;

pub(crate) const FIB_SUCCESS: i64 = 0;

pub(crate) const FIB_NOT_FWDED: i64 = 4;

pub(crate) const FIB_NO_NEIGH: i64 = 7;

/// Where a translated packet goes. The rest of the route (interface, MAC addresses, the
/// source address the route uses) stays in the fib scratch space ([`fib_params`]) until the
/// packet is sent: one lookup per packet.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RouteKind {
    /// Redirect out the looked-up interface with the looked-up MAC addresses.
    Fib,
    /// Redirect out the looked-up interface, resolving the neighbour in the kernel.
    Neigh,
    /// The destination is this node: up the stack.
    Local,
}

/// Sends a translated packet on its way along the last lookup's route; `None` when the
/// Ethernet header could not be written.
#[inline(always)]
pub(crate) fn forward(ctx: &TcContext, route: RouteKind) -> Option<i32> {
    if route == RouteKind::Local {
        return Some(TC_NEXT);
    }
    let p = LB_FIB_SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's slot, filled in by this packet's lookup.
    let (ifindex, smac, dmac) = unsafe { ((*p).ifindex, (*p).smac, (*p).dmac) };
    if route == RouteKind::Neigh {
        // SAFETY: the context pointer of this program; no nexthop parameters (the kernel
        // looks the route up itself). Linux 5.10, commit b4ab31414970 ("bpf: Add
        // redirect_neigh helper as redirect drop-in").
        return Some(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 });
    }
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&dmac);
    eth[6..].copy_from_slice(&smac);
    ctx.store(0, &eth, 0).ok()?;
    // SAFETY: plain integers; the verdict is the helper's return value.
    Some(unsafe { bpf_redirect(ifindex, 0) as i32 })
}

/// Per-CPU space for `bpf_fib_lookup`'s parameters: 64 bytes off the BPF stack, and map memory
/// the helper writes without the verifier tracking spilled registers in it.
#[aya_ebpf::macros::btf_map]
pub(crate) static LB_FIB_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<FibParams, 1> =
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

/// Runs `bpf_fib_lookup` with `params` (this CPU's [`fib_params`]); the route's interface,
/// MAC addresses and source address stay there for [`forward`] and SNAT.
#[inline(always)]
pub(crate) fn fib(ctx: &TcContext, params: &mut FibParams) -> Result<RouteKind, Reason> {
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
        FIB_SUCCESS => Ok(RouteKind::Fib),
        FIB_NO_NEIGH => Ok(RouteKind::Neigh),
        FIB_NOT_FWDED => Ok(RouteKind::Local),
        _ => Err(Reason::NoRoute),
    }
}
