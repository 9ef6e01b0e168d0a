//! Choosing a frontend's backend, for the socket hooks, tc and XDP alike: client affinity while
//! it holds, else the frontend's Maglev table entry for the flow's hash (`SVC_FLAG_MAGLEV`,
//! external frontends), else a uniformly random slot.
//!
//! Affinity pins live in an LRU map whose key says who the client is: the socket hooks key it
//! by network namespace (`LB_AFF_V1`, a pod), the packet path by client address (`LB_AFFX_V1`).
use aya_ebpf::{
    btf_maps::LruHashMap,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    AffMatchKey, AffValue, SVC_FLAG_MAGLEV, Stat, SvcValue,
    maglev::{MAGLEV_CHUNK, MaglevKey},
    select_slot,
};

use crate::{
    family::{Backend, Family, SvcKey, slot},
    maps::{LB_AFF_MATCH_V1, LB_MAGLEV_V1, count},
};

/// Maglev table size M, set by the agent at load time (`lb_common::maglev::GLOBAL_MAGLEV_M`);
/// 0 = no Maglev.
#[unsafe(no_mangle)]
pub(crate) static LB_MAGLEV_M: u32 = 0;

#[inline(always)]
pub(crate) fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The backend id in entry `hash % M` of frontend `fe_id`'s Maglev table; 0 when there is no
/// Maglev or the table is not (yet) there (the caller then picks a random slot). A plain `u32`
/// rather than an `Option`: the verifier refuses the partly undefined values LLVM makes of
/// `Option`s flowing through [`choose`].
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

/// How a flow is identified for Maglev: by its 5-tuple hash (the packet path), or not at all
/// (the socket hooks: a `connect()` has no source port yet, and ClusterIP frontends have no
/// Maglev table).
#[derive(Clone, Copy)]
pub(crate) enum Hash {
    None,
    Flow(u32),
}

/// The backend id without (valid) affinity: the Maglev entry, else a random slot's; 0 when the
/// slot is missing.
#[inline(always)]
fn pick<F: Family>(fe: &SvcValue, key: &SvcKey<F::A>, hash: Hash) -> u32 {
    if let Hash::Flow(hash) = hash
        && fe.flags & SVC_FLAG_MAGLEV != 0
    {
        let id = maglev(fe.backend_id, hash);
        if id != 0 {
            return id;
        }
    }
    slot::<F>(key, select_slot(random(), fe.count))
}

/// Where a frontend's affinity pins live, and what a hit (and a new pin) counts.
pub(crate) struct Pins<K: 'static, const N: usize> {
    pub(crate) map: &'static LruHashMap<K, AffValue, N>,
    pub(crate) hit: Stat,
    pub(crate) pin: Option<Stat>,
}

/// The backend id for a new flow or connection to frontend `fe` (slot-0 entry at `key`):
/// the client's pinned backend while the affinity holds (within the timeout, and the backend
/// still serves the frontend), else [`pick`] — and, with affinity, the new pin is recorded.
/// `pin_key` is only called with affinity. 0 when a slot is missing (a `u32`, not an `Option`:
/// see [`maglev`]).
#[inline(always)]
pub(crate) fn choose<F: Family, K, const N: usize>(
    fe: &SvcValue,
    key: &SvcKey<F::A>,
    hash: Hash,
    pins: &Pins<K, N>,
    pin_key: impl FnOnce() -> K,
) -> u32 {
    if fe.affinity_timeout == 0 {
        return pick::<F>(fe, key, hash);
    }
    let t = now();
    let pk = pin_key();
    // SAFETY: copied out at once.
    if let Some(a) = unsafe { pins.map.get(&pk) }.copied() {
        let fresh =
            t.wrapping_sub(a.last_used_ns) <= u64::from(fe.affinity_timeout) * 1_000_000_000;
        let member = AffMatchKey {
            backend_id: a.backend_id,
            frontend_id: fe.backend_id,
        };
        if fresh && LB_AFF_MATCH_V1.get_ptr(&member).is_some() {
            let _ = pins.map.insert(
                &pk,
                &AffValue {
                    last_used_ns: t,
                    ..a
                },
                0,
            );
            count(pins.hit);
            return a.backend_id;
        }
    }
    let id = pick::<F>(fe, key, hash);
    if id == 0 {
        return 0;
    }
    let _ = pins.map.insert(
        &pk,
        &AffValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: t,
        },
        0,
    );
    if let Some(s) = pins.pin {
        count(s);
    }
    id
}

/// [`choose`], then the chosen backend copied into `be`; `false` when a slot or the backend
/// is missing.
#[inline(always)]
pub(crate) fn backend<F: Family, K, const N: usize>(
    fe: &SvcValue,
    key: &SvcKey<F::A>,
    hash: Hash,
    pins: &Pins<K, N>,
    pin_key: impl FnOnce() -> K,
    be: &mut Backend<F::A>,
) -> u32 {
    let id = choose::<F, K, N>(fe, key, hash, pins, pin_key);
    if id == 0 {
        return 0;
    }
    match F::backend(id) {
        Some(b) => {
            *be = b;
            id
        }
        None => 0,
    }
}
