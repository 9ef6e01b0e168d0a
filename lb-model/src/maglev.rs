//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, §3.4), built by the agent for north-south frontends; the packet path
//! indexes them with a 5-tuple hash (`lb_common::maglev`).
//!
//! A table depends only on the backends' addresses and M, never on this node's backend ids'
//! numbering or on the order endpoints arrived in: every node builds the same table for the same
//! endpoints, so every node picks the same backend for a flow.
use std::net::SocketAddr;

use lb_common::maglev::{MAX_MAGLEV_M, hash_bytes};

/// Seeds of the two permutation hashes (offset, skip) of a backend's name.
const SEED_OFFSET: u32 = 0x6d61_676c; // "magl"
const SEED_SKIP: u32 = 0x6576_3031; // "ev01"

#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Checks `--maglev-table-size`: 0 (off) or a prime in 251..=131071.
///
/// # Errors
/// What is wrong with `m`, for the command line.
pub fn check_size(m: u32) -> Result<u32, String> {
    if m == 0 {
        return Ok(0);
    }
    if !(251..=MAX_MAGLEV_M).contains(&m) {
        return Err(format!(
            "{m} is out of range: 0 (off) or a prime from 251 to {MAX_MAGLEV_M}"
        ));
    }
    if !is_prime(m) {
        return Err(format!(
            "{m} is not prime (Maglev needs a prime table size; e.g. 251, 1021, 4093, 16381, 65521)"
        ));
    }
    Ok(m)
}

/// The lookup table of `m` entries (m prime) for `backends` (address, this node's backend id):
/// each entry is a backend id. Empty when there are no backends.
///
/// Each backend walks its own permutation of the entries (offset and skip from hashes of its
/// address); in turn, in address order, each takes its next entry not yet taken, until all are.
/// Every backend so gets ⌊m/n⌋ or ⌈m/n⌉ entries.
#[must_use]
pub fn table(backends: &[(SocketAddr, u32)], m: u32) -> Vec<u32> {
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    let mut bes: Vec<(SocketAddr, u32)> = backends.to_vec();
    bes.sort_unstable();
    bes.dedup_by_key(|b| b.0);
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = bes
        .iter()
        .map(|(addr, _)| {
            let name = addr.to_string();
            let offset = u64::from(hash_bytes(name.as_bytes(), SEED_OFFSET)) % m64;
            let skip = u64::from(hash_bytes(name.as_bytes(), SEED_SKIP)) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; bes.len()];
    let mut entry = vec![0u32; m as usize];
    let mut taken = vec![false; m as usize];
    let mut filled = 0u32;
    loop {
        for (i, &(offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while taken[c as usize] {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            taken[c as usize] = true;
            entry[c as usize] = bes[i].1;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return entry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lb_common::maglev::{DEFAULT_MAGLEV_M, flow_hash4};
    use proptest::prelude::*;

    use super::*;

    fn bes(n: u32) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    format!("198.18.{}.{}:8080", 1 + i / 200, 10 + i % 200)
                        .parse()
                        .unwrap(),
                    100 + i,
                )
            })
            .collect()
    }

    fn shares(t: &[u32]) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for id in t {
            *m.entry(*id).or_default() += 1;
        }
        m
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(check_size(0), Ok(0));
        assert_eq!(check_size(16381), Ok(16381));
        assert_eq!(check_size(251), Ok(251));
        assert!(check_size(16384).unwrap_err().contains("not prime"));
        assert!(check_size(7).unwrap_err().contains("out of range"));
        assert!(check_size(131_101).unwrap_err().contains("out of range"));
        assert!(is_prime(65521) && !is_prime(65535) && !is_prime(1));
    }

    #[test]
    fn every_backend_gets_floor_or_ceil_of_m_over_n() {
        for n in [1, 2, 3, 4, 7, 10, 100] {
            let t = table(&bes(n), DEFAULT_MAGLEV_M);
            assert_eq!(t.len(), DEFAULT_MAGLEV_M as usize);
            let s = shares(&t);
            assert_eq!(s.len(), n as usize, "n={n}");
            let lo = DEFAULT_MAGLEV_M / n;
            for (id, c) in s {
                assert!(
                    c == lo as usize || c == lo as usize + 1,
                    "n={n}: backend {id} has {c} entries, want {lo} or {}",
                    lo + 1
                );
            }
        }
    }

    #[test]
    fn empty_without_backends() {
        assert!(table(&[], DEFAULT_MAGLEV_M).is_empty());
    }

    /// Removing one of N backends moves its own entries and only a few others. Measured over
    /// N = 2..=32 at M = 16381: the extra moves stay under 2% of the table (the paper reports
    /// the same order).
    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let m = DEFAULT_MAGLEV_M;
        for n in [2u32, 3, 4, 5, 8, 16, 32] {
            let all = bes(n);
            let before = table(&all, m);
            for gone in [0, n / 2, n - 1] {
                let rest: Vec<_> = all.iter().copied().filter(|b| b.1 != 100 + gone).collect();
                let after = table(&rest, m);
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let own = before.iter().filter(|id| **id == 100 + gone).count();
                let extra = moved - own;
                assert!(
                    (extra as f64) < 0.02 * f64::from(m),
                    "n={n}, removed {gone}: {own} own entries moved, and {extra} others"
                );
                assert!(after.iter().all(|id| *id != 100 + gone));
            }
        }
    }

    #[test]
    fn flows_spread_evenly_through_the_table() {
        let t = table(&bes(4), DEFAULT_MAGLEV_M);
        let mut hits = BTreeMap::<u32, u32>::new();
        for sport in 1024..(1024 + 40_000u16) {
            let h = flow_hash4([198, 18, 100, 2], [198, 18, 200, 1], sport, 80, 6);
            *hits.entry(t[(h % DEFAULT_MAGLEV_M) as usize]).or_default() += 1;
        }
        for (id, c) in &hits {
            assert!((9_400..=10_600).contains(c), "backend {id}: {c} of 40000");
        }
    }

    proptest! {
        /// The same endpoints in any order give the same table: the nodes agree.
        #[test]
        fn independent_of_endpoint_order(n in 1u32..24, seed in any::<u64>()) {
            let mut all = bes(n);
            let a = table(&all, 1021);
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..all.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                all.swap(i, (s % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(a, table(&all, 1021));
        }
    }
}
