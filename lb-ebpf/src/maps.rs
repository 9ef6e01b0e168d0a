//! The datapath's maps. Names, layouts and meaning are documented in lb-common; the exported
//! symbol of each static is its map name (BTF-defined maps, so `bpftool map dump` prints field
//! names). `max_entries` here are defaults the agent overrides at load time.
//!
//! Service and backend maps are `BPF_F_NO_PREALLOC`: kernel memory follows the entries in use,
//! so a generous `max_entries` (room for 50,000 Services × 4 endpoints) costs nothing on a small
//! cluster; lookups are as fast as in a preallocated map. LRU maps must preallocate.
use aya_ebpf::btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage};
use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::btf_map};
/// `FLAGS` of the agent-written hash maps.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

use lb_common::maglev::{
    DEFAULT_MAGLEV_FRONTENDS, DEFAULT_MAGLEV_M, MaglevChunk, MaglevKey, chunks,
};
use lb_common::{
    AffKey, AffMatchKey, AffValue, AffxKey, Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value,
    DEFAULT_AFF_ENTRIES, DEFAULT_AFF_MATCH_ENTRIES, DEFAULT_AFFX_ENTRIES, DEFAULT_BE_ENTRIES,
    DEFAULT_CT_ENTRIES, DEFAULT_RNAT_ENTRIES, DEFAULT_RNAT_RING_ENTRIES, DEFAULT_SRCR_ENTRIES,
    DEFAULT_SVC_CNT_ENTRIES, DEFAULT_SVC_ENTRIES, NodeDns, RevNat4Key, RevNat4Value, RevNat6Key,
    RevNat6Value, RevNatRing, RevNatSk, SrcRange4, SrcRange6, Stat, Svc4Key, Svc6Key, SvcValue,
};

#[btf_map]
pub(crate) static LB4_SVC_V1: HashMap<
    Svc4Key,
    SvcValue,
    { DEFAULT_SVC_ENTRIES as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map]
pub(crate) static LB6_SVC_V1: HashMap<
    Svc6Key,
    SvcValue,
    { DEFAULT_SVC_ENTRIES as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map]
pub(crate) static LB4_BE_V1: HashMap<u32, Backend4, { DEFAULT_BE_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub(crate) static LB6_BE_V1: HashMap<u32, Backend6, { DEFAULT_BE_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

/// Maglev lookup tables of external frontends (`lb_common::maglev`). Sized by the agent.
#[btf_map]
pub(crate) static LB_MAGLEV_V1: HashMap<
    MaglevKey,
    MaglevChunk,
    { (DEFAULT_MAGLEV_FRONTENDS * chunks(DEFAULT_MAGLEV_M)) as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Node-local DNS: where the agent's listener is and until when it is alive
/// (`lb_common::NodeDns`).
#[btf_map]
pub(crate) static LB_NODE_DNS_V1: Array<NodeDns, 1> = Array::new();

/// Reverse NAT of sockets whose `connect()` was translated and that asked for their peer
/// (freed with the socket).
#[btf_map]
pub(crate) static LB_RNAT_SKS_V1: SkStorage<RevNatSk> = SkStorage::new();

/// Reverse NAT of translated `connect()`s, slot `cookie & mask` (`lb_common::RevNatRing`).
/// Sized by the agent (a power of two).
#[btf_map]
pub(crate) static LB_RNAT_RING_V1: Array<RevNatRing, { DEFAULT_RNAT_RING_ENTRIES as usize }> =
    Array::new();

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists (no global lock on insert and eviction).
const NO_COMMON_LRU: usize = 2;

#[btf_map]
pub(crate) static LB4_RNAT_SK_V1: LruHashMap<
    RevNat4Key,
    RevNat4Value,
    { DEFAULT_RNAT_ENTRIES as usize },
    NO_COMMON_LRU,
> = LruHashMap::new();

#[btf_map]
pub(crate) static LB6_RNAT_SK_V1: LruHashMap<
    RevNat6Key,
    RevNat6Value,
    { DEFAULT_RNAT_ENTRIES as usize },
    NO_COMMON_LRU,
> = LruHashMap::new();

#[btf_map]
pub(crate) static LB_STATS_V4: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub(crate) static LB_AFF_V1: LruHashMap<AffKey, AffValue, { DEFAULT_AFF_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub(crate) static LB_AFF_MATCH_V1: HashMap<
    AffMatchKey,
    u32,
    { DEFAULT_AFF_MATCH_ENTRIES as usize },
    NO_PREALLOC,
> = HashMap::new();

/// New connections per frontend id (`lb_common::MAP_SVC_CNT`).
#[btf_map]
pub(crate) static LB_SVC_CNT_V2: PerCpuArray<u64, { DEFAULT_SVC_CNT_ENTRIES as usize }> =
    PerCpuArray::new();

/// Packet-path connection tracking / NAT (lb_common::nat). LRU: preallocated.
#[btf_map]
pub(crate) static LB4_CT_V1: LruHashMap<Ct4Key, Ct4Value, { DEFAULT_CT_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub(crate) static LB6_CT_V1: LruHashMap<Ct6Key, Ct6Value, { DEFAULT_CT_ENTRIES as usize }> =
    LruHashMap::new();

/// `loadBalancerSourceRanges` per frontend (LPM tries must be `BPF_F_NO_PREALLOC`).
#[btf_map]
pub(crate) static LB4_SRCR_V1: LpmTrie<SrcRange4, u8, { DEFAULT_SRCR_ENTRIES as usize }> =
    LpmTrie::new();

#[btf_map]
pub(crate) static LB6_SRCR_V1: LpmTrie<SrcRange6, u8, { DEFAULT_SRCR_ENTRIES as usize }> =
    LpmTrie::new();

/// Client-IP session affinity of the packet path.
#[btf_map]
pub(crate) static LB_AFFX_V1: LruHashMap<AffxKey, AffValue, { DEFAULT_AFFX_ENTRIES as usize }> =
    LruHashMap::new();

/// Adds one to this CPU's connection counter of frontend `id` (not counted beyond the array).
#[inline(always)]
pub(crate) fn count_frontend(id: u32) {
    if let Some(c) = LB_SVC_CNT_V2.get_ptr_mut(id) {
        // SAFETY: this CPU's slot of a preallocated per-CPU array; only this CPU writes it.
        unsafe { *c += 1 };
    }
}

/// Adds one to this CPU's counter for `stat`.
#[inline(always)]
pub(crate) fn count(stat: Stat) {
    if let Some(c) = LB_STATS_V4.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot of a preallocated array; only this CPU writes it, and the program
        // cannot be preempted by itself on the same CPU in this hook type.
        unsafe { *c += 1 };
    }
}
