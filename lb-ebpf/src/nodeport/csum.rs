//! Checksums: L4 checksum offsets and flags, port rewrites, one's-complement sums.
use super::*;

/// The L4 checksum field's offset from the L4 header, and the flags for `bpf_l4_csum_replace`.
#[inline(always)]
pub(crate) fn l4_csum(proto: u8) -> (usize, u64) {
    if proto == IPPROTO_TCP {
        (16, 0)
    } else {
        // UDP: a zero checksum (IPv4: "none") stays zero; a computed zero is written as 0xffff.
        (6, u64::from(BPF_F_MARK_MANGLED_0))
    }
}

/// Rewrites a 16-bit port at `off` and fixes the L4 checksum at `csum_off`.
#[inline(always)]
pub(crate) fn set_port(
    ctx: &TcContext,
    off: usize,
    csum_off: usize,
    flags: u64,
    old: u16,
    new: u16,
) -> bool {
    if old == new {
        return true;
    }
    let (o, n) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(csum_off, u64::from(o), u64::from(n), flags | 2)
        .is_ok()
        && ctx.store(off, &n, 0).is_ok()
}

/// Partial one's-complement sum of `buf` (length a multiple of 4) added to `seed`, by
/// `bpf_csum_diff`: native-order 16-bit words, which [`finish`] folds into checksum bytes.
#[inline(always)]
pub(crate) fn partial(buf: &mut [u8], seed: u32) -> u32 {
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
pub(crate) fn finish(sum: u32) -> [u8; 2] {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}

/// The difference between two 16-byte addresses as `bpf_csum_diff` computes it.
#[inline(always)]
pub(crate) fn csum_diff16(from: &[u8; 16], to: &[u8; 16]) -> Option<u64> {
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
