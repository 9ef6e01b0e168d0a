//! Maglev consistent hashing for north-south frontends (shared by the packet path and the agent).
//!
//! Every node builds the same lookup table for a frontend from the same endpoints (the agent,
//! `lb-model/src/maglev.rs`), and the packet path indexes it with a hash of the flow's
//! 5-tuple that is the same on every node ([`flow_hash4`], [`flow_hash6`]). So whichever node an
//! ECMP router in front of the cluster picks, a flow's first packet chooses the same backend, and
//! removing one of N backends moves only the flows that were on it (plus a small fraction).
//!
//! The table of a frontend (M entries, M prime) lives in `LB_MAGLEV_V1` as chunks of
//! [`MAGLEV_CHUNK`] backend ids: key {frontend id, chunk}, entry `hash % M` is in chunk
//! `(hash % M) / MAGLEV_CHUNK` at `(hash % M) % MAGLEV_CHUNK`. A frontend uses its table when its
//! slot-0 value has [`crate::SVC_FLAG_MAGLEV`].
//!
//! The hash is part of the cluster's wire contract: nodes running different `lb` versions must
//! agree on it during a rolling upgrade. A golden-value test pins it.

/// The Maglev lookup tables: [`MaglevKey`] → [`MaglevChunk`]. Written by the agent only.
pub const MAP_MAGLEV: &str = "LB_MAGLEV_V1";

/// Load-time global of the packet path: the table size M (0 = no Maglev).
pub const GLOBAL_MAGLEV_M: &str = "LB_MAGLEV_M";

/// Backend ids per map value (a power of two: the packet path masks instead of dividing).
pub const MAGLEV_CHUNK: u32 = 1024;

/// Default table size M: a prime, as Maglev needs (Katran's and Cilium's default too). About
/// 100 × the backends of a large Service keeps the shares within 1% of each other.
pub const DEFAULT_MAGLEV_M: u32 = 16381;

/// Largest M accepted (`--maglev-table-size`): 128 chunks.
pub const MAX_MAGLEV_M: u32 = 131_071;

/// Default number of frontends with a Maglev table (`--max-maglev-frontends`).
pub const DEFAULT_MAGLEV_FRONTENDS: u32 = 4096;

/// Key of `LB_MAGLEV_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MaglevKey {
    /// The frontend's id (`SvcValue::backend_id` of its slot 0).
    pub frontend_id: u32,
    /// Which [`MAGLEV_CHUNK`] entries of the table.
    pub chunk: u32,
}

/// Value of `LB_MAGLEV_V1`: backend ids (0 past the table's end).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    pub backend_ids: [u32; MAGLEV_CHUNK as usize],
}

/// Chunks of a table of `m` entries.
#[must_use]
pub const fn chunks(m: u32) -> u32 {
    m.div_ceil(MAGLEV_CHUNK)
}

const SEED4: u32 = 0x4c42_3446; // "LB4F"
const SEED6: u32 = 0x4c42_3646; // "LB6F"

/// One murmur3-32 round.
#[expect(
    clippy::inline_always,
    reason = "runs in eBPF: every call must be inlined for the verifier"
)]
#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3-32 finalisation.
#[expect(
    clippy::inline_always,
    reason = "runs in eBPF: every call must be inlined for the verifier"
)]
#[inline(always)]
const fn fmix(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow hash of an IPv4 5-tuple as the client sent it (addresses in network order, ports
/// in host order): murmur3-32 over the words {src, dst, sport << 16 | dport, proto}.
#[expect(
    clippy::inline_always,
    reason = "runs in eBPF: every call must be inlined for the verifier"
)]
#[inline(always)]
#[must_use]
pub const fn flow_hash4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = mix(SEED4, u32::from_be_bytes(src));
    h = mix(h, u32::from_be_bytes(dst));
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    fmix(h, 16)
}

/// The flow hash of an IPv6 5-tuple: murmur3-32 over {src (4 words), dst (4 words),
/// sport << 16 | dport, proto}.
#[expect(
    clippy::inline_always,
    reason = "runs in eBPF: every call must be inlined for the verifier"
)]
#[inline(always)]
#[must_use]
pub fn flow_hash6(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let w = |a: &[u8; 16], i: usize| u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut h = SEED6;
    h = mix(h, w(src, 0));
    h = mix(h, w(src, 4));
    h = mix(h, w(src, 8));
    h = mix(h, w(src, 12));
    h = mix(h, w(dst, 0));
    h = mix(h, w(dst, 4));
    h = mix(h, w(dst, 8));
    h = mix(h, w(dst, 12));
    h = mix(h, (u32::from(sport) << 16) | u32::from(dport));
    h = mix(h, u32::from(proto));
    fmix(h, 40)
}

/// murmur3-32 of a byte string with a seed (the agent's permutation hashes of backend names).
#[must_use]
pub fn hash_bytes(bytes: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut words = bytes.chunks_exact(4);
    for c in &mut words {
        h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        h ^= k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
    }
    fmix(h, bytes.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference murmur3-32 (x86_32) vectors: the byte hash is the real algorithm.
    #[test]
    fn hash_bytes_is_murmur3_32() {
        assert_eq!(hash_bytes(b"", 0), 0);
        assert_eq!(hash_bytes(b"", 1), 0x514e_28b7);
        assert_eq!(hash_bytes(b"hello", 0), 0x248b_fa47);
        assert_eq!(hash_bytes(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            hash_bytes(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    /// Golden values: every node, of every version, must hash a flow the same way. A change
    /// here breaks consistency across a rolling upgrade: bump the map version with it.
    #[test]
    fn flow_hashes_are_stable() {
        let v4 = flow_hash4([198, 18, 100, 2], [198, 18, 200, 1], 40000, 80, 6);
        let v6 = flow_hash6(
            &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            &[
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0,
            ],
            40000,
            80,
            17,
        );
        assert_eq!((v4, v6), (GOLDEN4, GOLDEN6), "{v4:#x} {v6:#x}");
        assert_ne!(
            flow_hash4([198, 18, 100, 2], [198, 18, 200, 1], 40001, 80, 6),
            v4
        );
    }

    const GOLDEN4: u32 = 0xbaa2_1120;
    const GOLDEN6: u32 = 0xb4cc_f454;

    #[test]
    fn chunks_cover_the_table() {
        assert_eq!(chunks(DEFAULT_MAGLEV_M), 16);
        assert_eq!(chunks(1024), 1);
        assert_eq!(chunks(1031), 2);
        assert_eq!(chunks(MAX_MAGLEV_M), 128);
    }
}
