//! Desired state → map operations. `diff` is pure; `apply` runs the operations against a
//! [`MapWriter`] and keeps the [`Shadow`] (our mirror of the maps) in step.
//!
//! # Write order
//! The datapath reads a frontend's count, picks a slot in `1..=count`, then reads the slot's
//! backend id and the backend. `diff` orders its operations in phases so that at every instant
//! each count points only at populated slots and each slot only at an existing backend:
//!
//! 1. new backends;
//! 2. new VIP markers;
//! 3. changed or new backend slots; changed or new Maglev table chunks;
//! 4. changed or new frontends (counts), removed frontends;
//! 5. slots beyond the new counts and of removed frontends; table chunks no longer wanted;
//! 6. backends no longer referenced;
//! 7. VIP markers no longer needed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use lb_common::{
    SVC_FLAG_HOST_ONLY, SVC_FLAG_MAGLEV, SVC_FLAG_NO_LOCAL, SVC_FLAG_NODE_DNS, SVC_FLAG_SRC_RANGES,
    SVC_FLAG_VIP_MARKER, SvcValue,
    maglev::{MAGLEV_CHUNK, MaglevKey},
};

use crate::model::{Cidr, Desired, Frontend, FrontendState, Scope};

/// A service-map key, family-independent (the writer picks `LB4_SVC_V1` or `LB6_SVC_V1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    pub addr: IpAddr,
    /// 0 in VIP markers.
    pub port: u16,
    /// `IPPROTO_*`; 0 in VIP markers.
    pub proto: u8,
    /// `SCOPE_*` ([`Scope::number`]); 0 in VIP markers.
    pub scope: u8,
    /// 0 = frontend or marker; 1..=count = backend slot.
    pub slot: u16,
}

impl SvcKey {
    #[must_use]
    pub fn frontend(fe: &Frontend) -> Self {
        Self {
            addr: fe.addr,
            port: fe.port,
            proto: fe.proto.number(),
            scope: fe.scope.number(),
            slot: 0,
        }
    }

    /// The model frontend of a frontend or slot key (`None` for markers and unknown values).
    #[must_use]
    pub fn to_frontend(&self) -> Option<Frontend> {
        Some(Frontend {
            addr: self.addr,
            port: self.port,
            proto: crate::model::Proto::from_number(self.proto)?,
            scope: Scope::from_number(self.scope)?,
        })
    }

    #[must_use]
    pub const fn marker(addr: IpAddr) -> Self {
        Self {
            addr,
            port: 0,
            proto: 0,
            scope: 0,
            slot: 0,
        }
    }

    #[must_use]
    pub const fn is_marker(&self) -> bool {
        self.port == 0 && self.proto == 0 && self.slot == 0 && self.scope == 0
    }

    #[must_use]
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// A backend, identified by address and protocol (ids are shared by every frontend using it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    pub proto: u8,
    /// On this node (`BE_FLAG_LOCAL`): the packet path does not SNAT flows to it.
    pub local: bool,
}

/// One `loadBalancerSourceRanges` entry of a frontend (an LPM trie entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    /// The frontend's slot-0 key.
    pub frontend: SvcKey,
    pub cidr: Cidr,
}

/// One chunk of a Maglev table: [`MAGLEV_CHUNK`] backend ids (0 past the table's end).
pub type MaglevIds = Arc<[u32]>;

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        backend: Backend,
    },
    PutSvc {
        key: SvcKey,
        value: SvcValue,
    },
    DelSvc {
        key: SvcKey,
    },
    DelBackend {
        id: u32,
        backend: Backend,
    },
    /// `backend_id` serves `frontend_id` (affinity frontends only).
    PutAffMatch(AffMatch),
    DelAffMatch(AffMatch),
    /// A source range a frontend with `SVC_FLAG_SRC_RANGES` lets through.
    PutSrcRange(SrcRange),
    DelSrcRange(SrcRange),
    /// A chunk of the Maglev table of a frontend with `SVC_FLAG_MAGLEV`.
    PutMaglev {
        key: MaglevKey,
        ids: MaglevIds,
    },
    DelMaglev {
        key: MaglevKey,
    },
}

/// An entry of the affinity match map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffMatch {
    pub backend_id: u32,
    pub frontend_id: u32,
}

/// Our mirror of the service and backend maps: exactly what is in the kernel, as far as we
/// know. Filled from the pinned maps on start (adoption), then kept in step by [`apply`].
///
/// Beside the maps it keeps an index ([`ShadowIndex`]: backend ids by backend, slot references
/// per backend, free ids, entries per family), built on first use and kept in step by
/// [`Shadow::apply`], so a scoped sync never walks the whole mirror. The fields may be filled
/// directly only before the first diff (adoption).
#[derive(Clone, Debug, Default)]
pub struct Shadow {
    pub svc: BTreeMap<SvcKey, SvcValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub aff_match: BTreeSet<AffMatch>,
    pub src_ranges: BTreeSet<SrcRange>,
    /// Maglev table chunks by {frontend id, chunk}.
    pub maglev: BTreeMap<MaglevKey, MaglevIds>,
    idx: std::sync::OnceLock<ShadowIndex>,
}

impl PartialEq for Shadow {
    fn eq(&self, o: &Self) -> bool {
        self.svc == o.svc
            && self.backends == o.backends
            && self.aff_match == o.aff_match
            && self.src_ranges == o.src_ranges
            && self.maglev == o.maglev
    }
}

impl Eq for Shadow {}

/// Ids from 1 up, and the lowest free one from a point, without a scan of the used ones: the
/// holes below the highest used id are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ids {
    top: u32,
    holes: BTreeSet<u32>,
}

impl Ids {
    fn take(&mut self, id: u32) {
        if id > self.top {
            // Ids are handed out lowest-free, so a jump is small; a huge one (a foreign map)
            // leaves its gap unrecorded rather than filling memory.
            if id - self.top <= 1 << 20 {
                self.holes.extend(self.top + 1..id);
            }
            self.top = id;
        } else {
            self.holes.remove(&id);
        }
    }

    fn free(&mut self, id: u32) {
        if id == self.top {
            self.top -= 1;
            while self.top > 0 && self.holes.remove(&self.top) {
                self.top -= 1;
            }
        } else if id < self.top {
            self.holes.insert(id);
        }
    }

    /// The lowest free id at or above `from` (from 1).
    fn lowest_free(&self, from: u32) -> u32 {
        let from = from.max(1);
        self.holes
            .range(from..)
            .next()
            .copied()
            .unwrap_or_else(|| from.max(self.top + 1))
    }
}

/// What a diff needs to know of the whole mirror, kept in step with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ShadowIndex {
    /// Backend → its id.
    by_backend: HashMap<Backend, u32>,
    backend_ids: Ids,
    /// Backend id → the slots that refer to it.
    refs: HashMap<u32, u32>,
    /// Frontend ids (slot 0 of a frontend entry).
    fe_ids: Ids,
    fe_id_count: HashMap<u32, u32>,
    /// Service-map entries and backends per family: `[svc4, svc6, be4, be6]`.
    usage: Usage,
}

fn is_fe(k: &SvcKey, v: &SvcValue) -> bool {
    k.slot == 0 && v.flags & SVC_FLAG_VIP_MARKER == 0
}

fn family(ip: &IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

impl ShadowIndex {
    fn of(s: &Shadow) -> Self {
        let mut ix = Self::default();
        for (k, v) in &s.svc {
            ix.put_svc(k, v);
        }
        for (id, b) in &s.backends {
            ix.put_backend(*id, b);
        }
        ix
    }

    fn put_svc(&mut self, k: &SvcKey, v: &SvcValue) {
        self.usage[family(&k.addr)] += 1;
        if k.slot > 0 {
            *self.refs.entry(v.backend_id).or_default() += 1;
        } else if is_fe(k, v) {
            let n = self.fe_id_count.entry(v.backend_id).or_default();
            *n += 1;
            if *n == 1 {
                self.fe_ids.take(v.backend_id);
            }
        }
    }

    fn del_svc(&mut self, k: &SvcKey, v: &SvcValue) {
        self.usage[family(&k.addr)] -= 1;
        if k.slot > 0 {
            if let Some(n) = self.refs.get_mut(&v.backend_id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&v.backend_id);
                }
            }
        } else if is_fe(k, v)
            && let Some(n) = self.fe_id_count.get_mut(&v.backend_id)
        {
            *n -= 1;
            if *n == 0 {
                self.fe_id_count.remove(&v.backend_id);
                self.fe_ids.free(v.backend_id);
            }
        }
    }

    fn put_backend(&mut self, id: u32, b: &Backend) {
        self.usage[2 + family(&b.addr.ip())] += 1;
        self.by_backend.insert(*b, id);
        self.backend_ids.take(id);
    }

    fn del_backend(&mut self, id: u32, b: &Backend) {
        self.usage[2 + family(&b.addr.ip())] -= 1;
        if self.by_backend.get(b) == Some(&id) {
            self.by_backend.remove(b);
        }
        self.backend_ids.free(id);
    }
}

impl Shadow {
    fn is_empty(&self) -> bool {
        self.svc.is_empty()
            && self.backends.is_empty()
            && self.aff_match.is_empty()
            && self.src_ranges.is_empty()
            && self.maglev.is_empty()
    }

    /// An empty mirror filled by a write of puts only (a cold start), as [`Shadow::apply`] of
    /// each would: every map built at once from its sorted entries, so that every B-tree node
    /// is full. Inserted one by one, in key order as a cold start's are, each node is left a
    /// little over half full: a third more memory for the same entries. `false` (nothing
    /// done) when the mirror is not empty or an operation is not a put.
    fn fill(&mut self, ops: &[MapOp]) -> bool {
        if !self.is_empty() {
            return false;
        }
        let (mut svc, mut backends, mut aff, mut ranges, mut maglev) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for op in ops {
            match *op {
                MapOp::PutSvc { key, value } => svc.push((key, value)),
                MapOp::PutBackend { id, backend } => backends.push((id, backend)),
                MapOp::PutAffMatch(m) => aff.push(m),
                MapOp::PutSrcRange(r) => ranges.push(r),
                MapOp::PutMaglev { key, ref ids } => maglev.push((key, Arc::clone(ids))),
                _ => return false,
            }
        }
        // A key put twice keeps its later value, as when applied in order (a B-tree built from
        // entries keeps the last of equal keys).
        self.svc = svc.into_iter().collect();
        self.backends = backends.into_iter().collect();
        self.aff_match = aff.into_iter().collect();
        self.src_ranges = ranges.into_iter().collect();
        self.maglev = maglev.into_iter().collect();
        // The index, when built, from the filled maps (as it would be built on first use).
        if self.idx.get().is_some() {
            self.idx = std::sync::OnceLock::from(ShadowIndex::of(self));
        }
        true
    }

    /// The index of the mirror (built on first use).
    pub(crate) fn index(&self) -> &ShadowIndex {
        self.idx.get_or_init(|| ShadowIndex::of(self))
    }

    /// Applies one operation to the mirror (and its index, once built).
    pub fn apply(&mut self, op: &MapOp) {
        if let Some(ix) = self.idx.get_mut() {
            match *op {
                MapOp::PutBackend { id, backend } => {
                    if let Some(old) = self.backends.get(&id) {
                        ix.del_backend(id, old);
                    }
                    ix.put_backend(id, &backend);
                }
                MapOp::DelBackend { id, .. } => {
                    if let Some(old) = self.backends.get(&id) {
                        ix.del_backend(id, old);
                    }
                }
                MapOp::PutSvc { key, value } => {
                    if let Some(old) = self.svc.get(&key) {
                        ix.del_svc(&key, old);
                    }
                    ix.put_svc(&key, &value);
                }
                MapOp::DelSvc { key } => {
                    if let Some(old) = self.svc.get(&key) {
                        ix.del_svc(&key, old);
                    }
                }
                _ => {}
            }
        }
        self.apply_maps(op);
    }

    fn apply_maps(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutMaglev { key, ref ids } => {
                self.maglev.insert(key, Arc::clone(ids));
            }
            MapOp::DelMaglev { key } => {
                self.maglev.remove(&key);
            }
            MapOp::PutBackend { id, backend } => {
                self.backends.insert(id, backend);
            }
            MapOp::PutSvc { key, value } => {
                self.svc.insert(key, value);
            }
            MapOp::DelSvc { key } => {
                self.svc.remove(&key);
            }
            MapOp::DelBackend { id, .. } => {
                self.backends.remove(&id);
            }
            MapOp::PutAffMatch(m) => {
                self.aff_match.insert(m);
            }
            MapOp::PutSrcRange(r) => {
                self.src_ranges.insert(r);
            }
            MapOp::DelSrcRange(r) => {
                self.src_ranges.remove(&r);
            }
            MapOp::DelAffMatch(m) => {
                self.aff_match.remove(&m);
            }
        }
    }

    /// The backend ids in slots `1..=count` of a frontend, in slot order (missing slots skipped).
    fn slots(&self, fe: SvcKey, count: u16) -> Vec<u32> {
        (1..=count)
            .filter_map(|s| self.svc.get(&fe.with_slot(s)).map(|v| v.backend_id))
            .collect()
    }

    /// Frontends with their backend addresses as the datapath would serve them (for `inspect`
    /// and for tests). Markers are left out.
    #[must_use]
    pub fn frontends(&self) -> BTreeMap<SvcKey, (SvcValue, Vec<Option<Backend>>)> {
        self.svc
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map(|(k, v)| {
                let bes = (1..=v.count)
                    .map(|s| {
                        self.svc
                            .get(&k.with_slot(s))
                            .and_then(|sv| self.backends.get(&sv.backend_id))
                            .copied()
                    })
                    .collect();
                (*k, (*v, bes))
            })
            .collect()
    }
}

const MARKER: SvcValue = SvcValue {
    backend_id: 0,
    count: 0,
    flags: SVC_FLAG_VIP_MARKER,
    affinity_timeout: 0,
};

/// Maglev tables by (M, backends with their ids), as chunks: built once per sync for all the
/// frontends that share them.
type TableMemo = HashMap<(u32, Vec<(SocketAddr, u32)>), Vec<MaglevIds>>;

/// The complete contents the maps should have, with backend ids reused from `current`.
fn image(desired: &Desired, current: &Shadow) -> Shadow {
    image_of(desired.frontends.iter().map(|(f, st)| (f, &**st)), current)
}

/// The map contents `frontends` need (their markers, frontend entries, slots, backends and
/// affinity memberships), ids reused from `current`. Used over all desired frontends by
/// [`diff`] and over the changed ones by [`diff_scoped`].
#[expect(
    clippy::too_many_lines,
    reason = "one pass per frontend: ids, slots, memberships, ranges, flags read best together"
)]
fn image_of<'a>(
    frontends: impl Iterator<Item = (&'a Frontend, &'a FrontendState)>,
    current: &Shadow,
) -> Shadow {
    let cix = current.index();
    let known = &cix.by_backend;
    let mut next_id = 1u32;
    let mut ids: HashMap<Backend, u32> = HashMap::new();
    let mut want = Shadow::default();
    // Frontend ids (slot 0 `backend_id`, keying affinity state): kept while the frontend
    // exists, else the lowest id no frontend uses.
    let mut used_fe_ids: BTreeSet<u32> = BTreeSet::new();
    let mut next_fe_id = 1u32;
    // Frontends of one Service port share their endpoints (node addresses, LB IPs): one table.
    let mut tables: TableMemo = HashMap::new();

    for (fe, st) in frontends {
        let key = SvcKey::frontend(fe);
        if !st.external {
            want.svc.insert(SvcKey::marker(fe.addr), MARKER);
        }

        // Backend ids: reuse what the maps hold, else the lowest free id.
        let mut desired_ids = BTreeSet::new();
        for addr in &st.backends {
            let be = Backend {
                addr,
                proto: key.proto,
                local: st.local.contains(&addr),
            };
            let id = *ids.entry(be).or_insert_with(|| {
                known.get(&be).copied().unwrap_or_else(|| {
                    next_id = cix.backend_ids.lowest_free(next_id);
                    while want.backends.contains_key(&next_id) {
                        next_id = cix.backend_ids.lowest_free(next_id + 1);
                    }
                    next_id
                })
            });
            want.backends.insert(id, be);
            desired_ids.insert(id);
        }

        // Slots: keep each retained backend where it is when that position survives, fill the
        // holes with the rest in id order. Minimises slot writes on a change.
        let count = u16::try_from(desired_ids.len()).expect("model caps backends at u16::MAX");
        let cur_count = current
            .svc
            .get(&key)
            .filter(|v| v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map_or(0, |v| v.count);
        let mut slots: Vec<Option<u32>> = vec![None; usize::from(count)];
        let mut placed = BTreeSet::new();
        for (pos, id) in current.slots(key, cur_count).into_iter().enumerate() {
            if pos < slots.len() && desired_ids.contains(&id) && placed.insert(id) {
                slots[pos] = Some(id);
            }
        }
        let mut rest = desired_ids.difference(&placed).copied();
        for s in &mut slots {
            if s.is_none() {
                *s = rest.next();
            }
        }
        for (pos, id) in slots.into_iter().enumerate() {
            let id = id.expect("every slot filled");
            let slot = u16::try_from(pos + 1).expect("count fits u16");
            want.svc.insert(
                key.with_slot(slot),
                SvcValue {
                    backend_id: id,
                    ..SvcValue::default()
                },
            );
        }
        let kept = current
            .svc
            .get(&key)
            .filter(|v| is_fe(&key, v))
            .map(|v| v.backend_id)
            .filter(|id| *id != 0 && !used_fe_ids.contains(id));
        let fe_id = kept.unwrap_or_else(|| {
            next_fe_id = cix.fe_ids.lowest_free(next_fe_id);
            while used_fe_ids.contains(&next_fe_id) {
                next_fe_id = cix.fe_ids.lowest_free(next_fe_id + 1);
            }
            next_fe_id
        });
        used_fe_ids.insert(fe_id);
        if st.affinity_timeout > 0 {
            want.aff_match
                .extend(desired_ids.iter().map(|&backend_id| AffMatch {
                    backend_id,
                    frontend_id: fe_id,
                }));
        }
        want.src_ranges
            .extend(st.source_ranges.iter().map(|&cidr| SrcRange {
                frontend: key,
                cidr,
            }));
        let maglev = st.maglev > 0 && count > 0;
        if maglev {
            let bes: Vec<(SocketAddr, u32)> = st
                .backends
                .iter()
                .map(|a| {
                    let be = Backend {
                        addr: a,
                        proto: key.proto,
                        local: st.local.contains(&a),
                    };
                    (a, ids[&be])
                })
                .collect();
            let chunks = tables
                .entry((st.maglev, bes))
                .or_insert_with_key(|(m, bes)| {
                    crate::maglev::table(bes, *m)
                        .chunks(MAGLEV_CHUNK as usize)
                        .map(|c| {
                            let mut v = c.to_vec();
                            v.resize(MAGLEV_CHUNK as usize, 0);
                            MaglevIds::from(v)
                        })
                        .collect()
                });
            for (i, c) in chunks.iter().enumerate() {
                let key = MaglevKey {
                    frontend_id: fe_id,
                    chunk: u32::try_from(i).expect("≤ 128 chunks"),
                };
                want.maglev.insert(key, Arc::clone(c));
            }
        }
        let flags = if st.no_local { SVC_FLAG_NO_LOCAL } else { 0 }
            | if st.host_only { SVC_FLAG_HOST_ONLY } else { 0 }
            | if st.node_dns { SVC_FLAG_NODE_DNS } else { 0 }
            | if st.source_ranges.is_empty() {
                0
            } else {
                SVC_FLAG_SRC_RANGES
            }
            | if maglev { SVC_FLAG_MAGLEV } else { 0 };
        want.svc.insert(
            key,
            SvcValue {
                backend_id: fe_id,
                count,
                flags,
                affinity_timeout: st.affinity_timeout,
            },
        );
    }
    want
}

/// The operations that turn `current` into `desired`, in an order that never exposes a
/// half-written service (see the module docs).
#[must_use]
pub fn diff(desired: &Desired, current: &Shadow) -> Vec<MapOp> {
    let want = image(desired, current);
    let changed = |k: &SvcKey, v: &SvcValue| current.svc.get(k) != Some(v);
    let mut ops = Vec::new();

    // 1. new backends (ids are reused by identity, so an existing id never changes meaning)
    for (&id, &backend) in &want.backends {
        if current.backends.get(&id) != Some(&backend) {
            ops.push(MapOp::PutBackend { id, backend });
        }
    }
    // 1b. affinity memberships (before slots can point at the backend)
    for m in want.aff_match.difference(&current.aff_match) {
        ops.push(MapOp::PutAffMatch(*m));
    }
    // 1c. source ranges (before a frontend's flag makes the datapath consult them)
    for r in want.src_ranges.difference(&current.src_ranges) {
        ops.push(MapOp::PutSrcRange(*r));
    }
    let puts = |pred: &dyn Fn(&SvcKey) -> bool, ops: &mut Vec<MapOp>| {
        for (k, v) in want.svc.iter().filter(|(k, v)| pred(k) && changed(k, v)) {
            ops.push(MapOp::PutSvc { key: *k, value: *v });
        }
    };
    let dels = |pred: &dyn Fn(&SvcKey) -> bool, ops: &mut Vec<MapOp>| {
        for k in current
            .svc
            .keys()
            .filter(|k| pred(k) && !want.svc.contains_key(k))
        {
            ops.push(MapOp::DelSvc { key: *k });
        }
    };
    // 2. markers, 3. slots and table chunks, 4. frontends (puts, then removals)
    puts(&SvcKey::is_marker, &mut ops);
    puts(&|k| k.slot > 0, &mut ops);
    maglev_puts(&want, current, &mut ops);
    puts(&|k| k.slot == 0 && !k.is_marker(), &mut ops);
    dels(&|k| k.slot == 0 && !k.is_marker(), &mut ops);
    // 5. slots beyond counts / of removed frontends, table chunks no longer wanted
    dels(&|k| k.slot > 0, &mut ops);
    ops.extend(
        current
            .maglev
            .keys()
            .filter(|k| !want.maglev.contains_key(k))
            .map(|&key| MapOp::DelMaglev { key }),
    );
    // 6. memberships that ended (a pinned client re-pins), then unreferenced backends
    for m in current.aff_match.difference(&want.aff_match) {
        ops.push(MapOp::DelAffMatch(*m));
    }
    for r in current.src_ranges.difference(&want.src_ranges) {
        ops.push(MapOp::DelSrcRange(*r));
    }
    for (&id, &backend) in &current.backends {
        if !want.backends.contains_key(&id) {
            ops.push(MapOp::DelBackend { id, backend });
        }
    }
    // 7. markers of VIPs no longer served
    dels(&SvcKey::is_marker, &mut ops);
    ops
}

/// Phase 3: table chunks that differ from what the maps hold (only those are written, as
/// Katran does: a changed backend set rewrites the chunks whose entries moved).
fn maglev_puts(want: &Shadow, current: &Shadow, ops: &mut Vec<MapOp>) {
    for (k, ids) in &want.maglev {
        if current.maglev.get(k) != Some(ids) {
            ops.push(MapOp::PutMaglev {
                key: *k,
                ids: Arc::clone(ids),
            });
        }
    }
}

/// `max_entries` of the maps the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub svc4: usize,
    pub svc6: usize,
    pub be4: usize,
    pub be6: usize,
}

/// The frontends that lose Maglev ([`FrontendState::maglev`]): Maglev stays on the external
/// frontends, in frontend order, whose tables fit in `chunks` entries of the table map; the
/// rest choose random slots. `wanting`: the frontends with a table (Maglev on and some
/// backend) and its size, in frontend order ([`crate::model::Cache::maglev`]). Returns them with
/// one message per frontend, naming its Service. (The map itself has twice the room: a sync
/// writes new chunks before it deletes old ones.)
pub fn maglev_off<'a>(
    wanting: impl IntoIterator<Item = (&'a Frontend, &'a u32)>,
    desired: &Desired,
    chunks: usize,
) -> (BTreeSet<Frontend>, Vec<String>) {
    let mut used = 0usize;
    let (mut off, mut msgs) = (BTreeSet::new(), Vec::new());
    for (fe, m) in wanting {
        let need = lb_common::maglev::chunks(*m) as usize;
        if used + need > chunks {
            off.insert(*fe);
            let owner = desired.frontends.get(fe).map(|st| &st.service);
            msgs.push(format!(
                "Service {}: {fe}: random backend selection instead of Maglev, the table map is full \
                 (--max-maglev-frontends)",
                owner.map_or_else(String::new, ToString::to_string)
            ));
        } else {
            used += need;
        }
    }
    (off, msgs)
}

/// [`maglev_off`] applied to a whole desired state (for one-off builds and tests).
pub fn limit_maglev(desired: &mut Desired, chunks: usize) -> Vec<String> {
    let wanting: Vec<(Frontend, u32)> = desired
        .frontends
        .iter()
        .filter(|(_, st)| st.maglev != 0 && !st.backends.is_empty())
        .map(|(f, st)| (*f, st.maglev))
        .collect();
    let (off, msgs) = maglev_off(wanting.iter().map(|(f, m)| (f, m)), desired, chunks);
    for fe in &off {
        if let Some(st) = desired.frontends.get_mut(fe) {
            Arc::make_mut(st).maglev = 0;
        }
    }
    msgs
}

/// Entries per map: `[svc4, svc6, be4, be6]`.
type Usage = [usize; 4];

fn exceeds(u: &Usage, cap: &Capacity) -> bool {
    u[0] > cap.svc4 || u[1] > cap.svc6 || u[2] > cap.be4 || u[3] > cap.be6
}

/// The service-map keys and backend identities a frontend occupies.
fn footprint(fe: &Frontend, st: &FrontendState) -> (Vec<SvcKey>, Vec<Backend>) {
    let key = SvcKey::frontend(fe);
    let backends = &st.backends;
    let n = u16::try_from(backends.len()).unwrap_or(u16::MAX);
    let mut keys = if st.external {
        vec![key]
    } else {
        vec![SvcKey::marker(fe.addr), key]
    };
    keys.extend((1..=n).map(|s| key.with_slot(s)));
    (
        keys,
        backends
            .iter()
            .map(|a| Backend {
                addr: a,
                proto: key.proto,
                local: st.local.contains(&a),
            })
            .collect(),
    )
}

/// Backends a frontend currently has in the maps (`None`: not in the maps).
fn current_backends(current: &Shadow, fe: &Frontend) -> Option<Vec<Backend>> {
    let key = SvcKey::frontend(fe);
    let v = current
        .svc
        .get(&key)
        .filter(|v| v.flags & SVC_FLAG_VIP_MARKER == 0)?;
    Some(
        current
            .slots(key, v.count)
            .iter()
            .filter_map(|id| current.backends.get(id))
            .copied()
            .collect(),
    )
}

/// Makes `desired` fit the maps (with `dirty`, considering only those frontends: the others are
/// in the maps already). `diff` writes every new entry before deleting any old one, so
/// the peak is |current ∪ desired| per map. Frontends that need no new entry always pass; the
/// others (new, grown, or moved to new backends) are admitted in frontend order while they fit.
/// A refused frontend keeps exactly what the maps hold for it now (or stays absent when new):
/// nothing existing is evicted or half-written, and every other change still goes through.
/// Returns the refused frontends with their Services.
pub fn fit(
    desired: &mut Desired,
    current: &Shadow,
    cap: &Capacity,
    dirty: Option<&BTreeSet<Frontend>>,
) -> Vec<(Frontend, crate::model::NsName)> {
    let fam = family;
    let cix = current.index();
    let mut usage: Usage = cix.usage;
    let known = &cix.by_backend;
    // Only frontends that change can grow: with a dirty set, only those are looked at.
    let candidates: Vec<Frontend> = match dirty {
        Some(d) => d
            .iter()
            .filter(|f| desired.frontends.contains_key(f))
            .copied()
            .collect(),
        None => desired.frontends.keys().copied().collect(),
    };
    // Fast path: even if every candidate's entries were all new (marker, frontend, one slot
    // and one backend per endpoint), would everything fit? Then nothing is refused, and the
    // exact accounting below (set lookups per entry: 0.1 s at 50,000 Services) is skipped.
    let mut bound = usage;
    for fe in &candidates {
        let n = desired.frontends[fe].backends.len();
        bound[fam(&fe.addr)] += 2 + n;
        bound[2 + fam(&fe.addr)] += n;
    }
    if !exceeds(&bound, cap) {
        return Vec::new();
    }
    let (mut added_keys, mut added_bes) = (BTreeSet::new(), BTreeSet::new());
    let mut refused = Vec::new();
    for fe in candidates {
        let (ks, bs) = footprint(&fe, &desired.frontends[&fe]);
        let new_keys: BTreeSet<SvcKey> = ks
            .into_iter()
            .filter(|k| !current.svc.contains_key(k) && !added_keys.contains(k))
            .collect();
        let new_bes: BTreeSet<Backend> = bs
            .into_iter()
            .filter(|b| !known.contains_key(b) && !added_bes.contains(b))
            .collect();
        if new_keys.is_empty() && new_bes.is_empty() {
            continue; // occupies only entries that exist already
        }
        let mut u = usage;
        for k in &new_keys {
            u[fam(&k.addr)] += 1;
        }
        for b in &new_bes {
            u[2 + fam(&b.addr.ip())] += 1;
        }
        if exceeds(&u, cap) {
            refused.push((fe, (*desired.frontends[&fe].service).clone()));
            match current_backends(current, &fe) {
                Some(now) => {
                    // Exactly what the maps hold: its backends, and no marker if it has none.
                    let st = Arc::make_mut(desired.frontends.get_mut(&fe).expect("present"));
                    st.backends = now.iter().map(|b| b.addr).collect();
                    st.local = now.iter().filter(|b| b.local).map(|b| b.addr).collect();
                    st.external = !current.svc.contains_key(&SvcKey::marker(fe.addr));
                    let key = SvcKey::frontend(&fe);
                    st.source_ranges = current
                        .src_ranges
                        .iter()
                        .filter(|r| r.frontend == key)
                        .map(|r| r.cidr)
                        .collect();
                }
                None => {
                    desired.frontends.remove(&fe);
                }
            }
        } else {
            usage = u;
            added_keys.extend(new_keys);
            added_bes.extend(new_bes);
        }
    }
    refused
}

/// Frontends whose desired state differs between two desired states (added, removed or
/// changed): the dirty set for [`diff_scoped`].
#[must_use]
pub fn changed(prev: &Desired, next: &Desired) -> BTreeSet<Frontend> {
    let mut dirty: BTreeSet<Frontend> = next
        .frontends
        .iter()
        .filter(|(f, st)| prev.frontends.get(f) != Some(st))
        .map(|(f, _)| *f)
        .collect();
    dirty.extend(
        prev.frontends
            .keys()
            .filter(|f| !next.frontends.contains_key(f)),
    );
    dirty
}

/// Like [`diff`], but only for the frontends in `dirty`: the other frontends of `desired` must
/// already be in `current` exactly as desired (true when `dirty = changed(prev, desired)` and
/// `current` was synced to `prev`). Same write phases and the same resulting maps as [`diff`],
/// at a cost proportional to the change rather than to every Service. `desired` needs only
/// the dirty frontends' states (as they are to be written: after [`fit`] and Maglev limits);
/// `all` is the whole desired state, for whether a VIP is still used by a frontend that is not
/// dirty (its marker stays). [`diff`] remains the
/// one for starting up and periodic resyncs: it also repairs anything left over.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "the write phases, in order, are the point; split they would hide it"
)]
pub fn diff_scoped(
    desired: &Desired,
    all: &Desired,
    current: &Shadow,
    dirty: &BTreeSet<Frontend>,
) -> Vec<MapOp> {
    let want = image_of(
        dirty
            .iter()
            .filter_map(|f| desired.frontends.get_key_value(f))
            .map(|(f, st)| (f, &**st)),
        current,
    );
    let mut ops = Vec::new();

    // What the dirty frontends occupy now.
    let range = |fe: &Frontend| {
        let k = SvcKey::frontend(fe);
        current
            .svc
            .range(k..=k.with_slot(u16::MAX))
            .map(|(k, v)| (*k, *v))
    };
    let old: Vec<(SvcKey, SvcValue)> = dirty.iter().flat_map(range).collect();
    let old_fe_ids: BTreeSet<u32> = old
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    let old_aff: Vec<AffMatch> = current
        .aff_match
        .iter()
        .filter(|m| old_fe_ids.contains(&m.frontend_id))
        .copied()
        .collect();
    let dirty_keys: BTreeSet<SvcKey> = dirty.iter().map(SvcKey::frontend).collect();
    let old_ranges: Vec<SrcRange> = current
        .src_ranges
        .iter()
        .filter(|r| dirty_keys.contains(&r.frontend))
        .copied()
        .collect();

    // Markers of the dirty frontends' VIPs: wanted while any desired frontend uses the VIP.
    let vips: BTreeSet<IpAddr> = dirty.iter().map(|f| f.addr).collect();
    let vip_used = |ip: IpAddr| {
        let lo = Frontend {
            addr: ip,
            port: 0,
            proto: crate::model::Proto::Tcp,
            scope: Scope::InNode,
        };
        // A dirty frontend as it is to be written (absent: refused or gone); the others as
        // they are desired (and already are).
        all.frontends
            .range(lo..)
            .take_while(|(f, _)| f.addr == ip)
            .any(|(f, st)| {
                if dirty.contains(f) {
                    desired.frontends.get(f).is_some_and(|st| !st.external)
                } else {
                    !st.external
                }
            })
    };

    // 1. new backends, 1b. new memberships
    for (&id, &backend) in &want.backends {
        if !current.backends.contains_key(&id) {
            ops.push(MapOp::PutBackend { id, backend });
        }
    }
    for m in want.aff_match.difference(&current.aff_match) {
        ops.push(MapOp::PutAffMatch(*m));
    }
    // 1c. source ranges
    for r in want.src_ranges.difference(&current.src_ranges) {
        ops.push(MapOp::PutSrcRange(*r));
    }
    // 2. markers
    for &ip in &vips {
        let k = SvcKey::marker(ip);
        if vip_used(ip) && current.svc.get(&k) != Some(&MARKER) {
            ops.push(MapOp::PutSvc {
                key: k,
                value: MARKER,
            });
        }
    }
    // 3. slots, 4. frontends (puts, then removals)
    let changed_puts = |pred: &dyn Fn(&SvcKey) -> bool, ops: &mut Vec<MapOp>| {
        for (k, v) in want
            .svc
            .iter()
            .filter(|(k, v)| pred(k) && !k.is_marker() && current.svc.get(k) != Some(v))
        {
            ops.push(MapOp::PutSvc { key: *k, value: *v });
        }
    };
    changed_puts(&|k| k.slot > 0, &mut ops);
    maglev_puts(&want, current, &mut ops);
    changed_puts(&|k| k.slot == 0, &mut ops);
    let removed = |slots: bool, ops: &mut Vec<MapOp>| {
        let gone = old
            .iter()
            .filter(|(k, _)| (k.slot > 0) == slots && !want.svc.contains_key(k));
        ops.extend(gone.map(|(k, _)| MapOp::DelSvc { key: *k }));
    };
    removed(false, &mut ops);
    // 5. slots beyond the new counts / of removed frontends, their unwanted table chunks
    removed(true, &mut ops);
    for &id in &old_fe_ids {
        let lo = MaglevKey {
            frontend_id: id,
            chunk: 0,
        };
        let hi = MaglevKey {
            frontend_id: id,
            chunk: u32::MAX,
        };
        ops.extend(
            current
                .maglev
                .range(lo..=hi)
                .filter(|(k, _)| !want.maglev.contains_key(k))
                .map(|(&key, _)| MapOp::DelMaglev { key }),
        );
    }
    // 6. memberships that ended, then backends no slot refers to any more
    for m in &old_aff {
        if !want.aff_match.contains(m) {
            ops.push(MapOp::DelAffMatch(*m));
        }
    }
    for r in &old_ranges {
        if !want.src_ranges.contains(r) {
            ops.push(MapOp::DelSrcRange(*r));
        }
    }
    let candidates: BTreeSet<u32> = old
        .iter()
        .filter(|(k, _)| k.slot > 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    for id in unreferenced(&candidates, current, &want, dirty) {
        if let Some(&backend) = current.backends.get(&id) {
            ops.push(MapOp::DelBackend { id, backend });
        }
    }
    // 7. markers of VIPs no longer served
    for &ip in &vips {
        let k = SvcKey::marker(ip);
        if !vip_used(ip) && current.svc.contains_key(&k) {
            ops.push(MapOp::DelSvc { key: k });
        }
    }
    ops
}

/// The `candidates` no slot refers to after a scoped change: references from clean frontends
/// (their slots stay) plus those from the dirty frontends' new image.
fn unreferenced(
    candidates: &BTreeSet<u32>,
    current: &Shadow,
    want: &Shadow,
    dirty: &BTreeSet<Frontend>,
) -> Vec<u32> {
    if candidates.is_empty() {
        return Vec::new();
    }
    // References from slots now (the index), less those of the dirty frontends (rewritten),
    // plus those of what they become.
    let mut refs: HashMap<u32, i64> = candidates
        .iter()
        .map(|id| {
            let n = current.index().refs.get(id).copied().unwrap_or(0);
            (*id, i64::from(n))
        })
        .collect();
    for fe in dirty {
        let k = SvcKey::frontend(fe);
        for (_, v) in current.svc.range(k.with_slot(1)..=k.with_slot(u16::MAX)) {
            if let Some(n) = refs.get_mut(&v.backend_id) {
                *n -= 1;
            }
        }
    }
    for (k, v) in &want.svc {
        if k.slot > 0
            && let Some(n) = refs.get_mut(&v.backend_id)
        {
            *n += 1;
        }
    }
    candidates
        .iter()
        .copied()
        .filter(|id| refs.get(id).copied().unwrap_or(0) == 0)
        .collect()
}

/// Something that can execute map operations: the pinned BPF maps, or a test double.
pub trait MapWriter {
    type Error;
    fn write(&mut self, op: &MapOp) -> Result<(), Self::Error>;

    /// Runs `ops` in order, stopping at the first failure: how many were written and the
    /// error. A writer may group operations (batches) as long as the order holds.
    fn write_all(&mut self, ops: &[MapOp]) -> Result<(), (usize, Self::Error)> {
        for (i, op) in ops.iter().enumerate() {
            self.write(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Runs `ops` in order; the shadow follows every successful write. On the first failure the
/// remaining operations are not run (the phase order guarantees what was written is consistent)
/// and the error is returned with the number of operations applied.
pub fn apply<W: MapWriter>(
    ops: &[MapOp],
    writer: &mut W,
    shadow: &mut Shadow,
) -> Result<usize, (usize, W::Error)> {
    let r = writer.write_all(ops);
    let n = r.as_ref().map_or_else(|(n, _)| *n, |()| ops.len());
    if !shadow.fill(&ops[..n]) {
        for op in &ops[..n] {
            shadow.apply(op);
        }
    }
    r.map(|()| n)
}

#[cfg(test)]
mod tests;
