//! Choosing the backend of a new flow: client-IP affinity, then Maglev, then a random slot.
use super::*;

/// Maglev table size M, set by the agent at load time (`lb_common::maglev::GLOBAL_MAGLEV_M`);
/// 0 = no Maglev.
#[unsafe(no_mangle)]
pub(crate) static LB_MAGLEV_M: u32 = 0;

/// The backend id in entry `hash % M` of frontend `fe_id`'s Maglev table; 0 when there is no
/// Maglev or the table is not (yet) there (the caller then picks a random slot). A plain `u32`
/// rather than an `Option`: the verifier refuses the partly undefined values LLVM makes of
/// `Option`s flowing through the closures of `choose`.
#[inline(always)]
pub(crate) fn maglev(fe_id: u32, hash: u32) -> u32 {
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

/// The backend id for a new flow without (valid) affinity: the Maglev entry, else a random
/// slot's; 0 when the slot is missing.
#[inline(always)]
pub(crate) fn pick(fe: &SvcValue, hash: u32, slot_id: &impl Fn(u16) -> Option<u32>) -> u32 {
    if fe.flags & SVC_FLAG_MAGLEV != 0 {
        let id = maglev(fe.backend_id, hash);
        if id != 0 {
            return id;
        }
    }
    slot_id(select_slot(random(), fe.count)).unwrap_or(0)
}

#[inline(always)]
pub(crate) fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// The backend of a new external flow: client-IP session affinity while it holds, else the
/// frontend's Maglev table entry for the flow's hash (`SVC_FLAG_MAGLEV`), else a random slot.
/// Returns the backend id, 0 when a slot is missing (a `u32`, not a `Result`: see [`maglev`]).
#[inline(always)]
pub(crate) fn choose(
    fe: &SvcValue,
    client: [u8; 16],
    hash: u32,
    slot_id: impl Fn(u16) -> Option<u32>,
) -> u32 {
    if fe.affinity_timeout == 0 {
        return pick(fe, hash, &slot_id);
    }
    let t = now();
    let key = AffxKey {
        client,
        frontend_id: fe.backend_id,
    };
    // SAFETY: copied out at once.
    if let Some(a) = unsafe { LB_AFFX_V1.get(&key) }.copied() {
        let fresh =
            t.wrapping_sub(a.last_used_ns) <= u64::from(fe.affinity_timeout) * 1_000_000_000;
        let member = AffMatchKey {
            backend_id: a.backend_id,
            frontend_id: fe.backend_id,
        };
        if fresh && LB_AFF_MATCH_V1.get_ptr(&member).is_some() {
            let _ = LB_AFFX_V1.insert(
                &key,
                &AffValue {
                    last_used_ns: t,
                    ..a
                },
                0,
            );
            count(Stat::TcAffinityHit);
            return a.backend_id;
        }
    }
    let id = pick(fe, hash, &slot_id);
    if id == 0 {
        return 0;
    }
    let _ = LB_AFFX_V1.insert(
        &key,
        &AffValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: t,
        },
        0,
    );
    id
}
