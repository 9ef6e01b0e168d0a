//! Routing a translated packet: `bpf_fib_lookup` into a [`Route`], and sending it on.
use super::*;

/// `bpf_fib_lookup` flag: fill in the source address the route would use. Linux 6.7, commit
/// dab4e1f06cab ("bpf: Add BPF_FIB_LOOKUP_SRC flag").
pub(crate) const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;

pub(crate) const FIB_SUCCESS: i64 = 0;

pub(crate) const FIB_NOT_FWDED: i64 = 4;

pub(crate) const FIB_NO_NEIGH: i64 = 7;

/// What to do with a translated packet. A plain struct, every field always written: a Rust
/// enum with payloads is copied with its unset bytes, which the verifier rejects as reads of
/// uninitialised registers.
#[derive(Clone, Copy)]
pub(crate) struct Route {
    pub(crate) kind: RouteKind,
    pub(crate) ifindex: u32,
    pub(crate) smac: [u8; 6],
    pub(crate) dmac: [u8; 6],
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RouteKind {
    /// Redirect out `ifindex` with these MAC addresses.
    Fib,
    /// Redirect out `ifindex`, resolving the neighbour in the kernel.
    Neigh,
    /// The destination is this node: up the stack.
    Local,
}

impl Route {
    pub(crate) const LOCAL: Self = Self {
        kind: RouteKind::Local,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };

    pub(crate) const fn with_ifindex(self, ifindex: u32) -> Self {
        Self { ifindex, ..self }
    }

    pub(crate) const fn is_local(&self) -> bool {
        matches!(self.kind, RouteKind::Local)
    }
}

/// Sends a translated packet on its way.
#[inline(always)]
pub(crate) fn forward(ctx: &TcContext, route: Route) -> i32 {
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

/// Runs `bpf_fib_lookup` and turns the answer into a [`Route`]; `params` keeps the source
/// address the route uses (for SNAT).
#[inline(always)]
pub(crate) fn fib(ctx: &TcContext, params: &mut FibParams) -> Result<Route, Reason> {
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
