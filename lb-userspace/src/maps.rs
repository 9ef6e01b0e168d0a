//! The pinned BPF maps, seen from the agent: a [`MapWriter`] for `sync`, and readers that turn
//! the maps back into a [`Shadow`] (adoption on start, `inspect`) and sum the counters.
use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        HashMap, IterableMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    sys::SyscallError,
};
use lb_common::{
    ALL_MAPS, AffMatchKey, BE_FLAG_LOCAL, Backend4, Backend6, MAP_AFF_MATCH, MAP_BE4, MAP_BE6,
    MAP_SRCR4, MAP_SRCR6, MAP_STATS, MAP_SVC4, MAP_SVC6, SRCR4_FRONTEND_BITS, SRCR6_FRONTEND_BITS,
    SrcRange4, SrcRange6, Stat, Svc4Key, Svc6Key, SvcValue,
    maglev::{MAGLEV_CHUNK, MAP_MAGLEV, MaglevChunk, MaglevKey},
};

use crate::{
    model::Cidr,
    sync::{Backend, MapOp, MapWriter, Shadow, SrcRange, SvcKey},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("map {name}: {op} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name} is not pinned at {path} (is the agent installed with this --bpffs?)")]
    NotPinned {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "map {name}: pinned map has key/value size {found:?}, this build expects {expected:?}; \
             a different lb version owns {dir}: run `lb-agent cleanup` or use another --bpffs"
    )]
    Layout {
        name: &'static str,
        dir: PathBuf,
        found: (u32, u32),
        expected: (u32, u32),
    },
    #[error("cannot read the possible CPUs (/sys/devices/system/cpu/possible)")]
    Cpus(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Expected (key, value) sizes per map name: guards against adopting a foreign map.
#[must_use]
pub fn expected_sizes(name: &str) -> Option<(u32, u32)> {
    use lb_common::{MAP_RNAT4, MAP_RNAT6, RevNat4Key, RevNat4Value, RevNat6Key, RevNat6Value};
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match name {
        n if n == MAP_SVC4 => s(size_of::<Svc4Key>(), size_of::<SvcValue>()),
        n if n == MAP_SVC6 => s(size_of::<Svc6Key>(), size_of::<SvcValue>()),
        n if n == MAP_BE4 => s(4, size_of::<Backend4>()),
        n if n == MAP_BE6 => s(4, size_of::<Backend6>()),
        n if n == MAP_RNAT4 => s(size_of::<RevNat4Key>(), size_of::<RevNat4Value>()),
        n if n == MAP_RNAT6 => s(size_of::<RevNat6Key>(), size_of::<RevNat6Value>()),
        n if n == MAP_STATS => s(4, 8),
        n if n == lb_common::MAP_AFF => s(
            size_of::<lb_common::AffKey>(),
            size_of::<lb_common::AffValue>(),
        ),
        n if n == MAP_AFF_MATCH => s(size_of::<AffMatchKey>(), 4),
        n if n == lb_common::MAP_SVC_CNT => s(4, 8),
        n if n == lb_common::MAP_CT4 => s(
            size_of::<lb_common::Ct4Key>(),
            size_of::<lb_common::Ct4Value>(),
        ),
        n if n == lb_common::MAP_CT6 => s(
            size_of::<lb_common::Ct6Key>(),
            size_of::<lb_common::Ct6Value>(),
        ),
        n if n == MAP_MAGLEV => s(size_of::<MaglevKey>(), size_of::<MaglevChunk>()),
        n if n == lb_common::MAP_RNAT_SKS => s(4, size_of::<lb_common::RevNatSk>()),
        n if n == lb_common::MAP_RNAT_RING => s(4, size_of::<lb_common::RevNatRing>()),
        n if n == MAP_SRCR4 => s(4 + size_of::<SrcRange4>(), 1),
        n if n == MAP_SRCR6 => s(4 + size_of::<SrcRange6>(), 1),
        n if n == lb_common::MAP_NODE_DNS => s(4, size_of::<lb_common::NodeDns>()),
        n if n == lb_common::MAP_AFFX => s(
            size_of::<lb_common::AffxKey>(),
            size_of::<lb_common::AffValue>(),
        ),
        _ => None,
    }
}

/// Checks every pinned map in `dir` against this build's layouts.
pub fn check_layouts(dir: &Path) -> Result<()> {
    for name in ALL_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let md = MapData::from_pin(&path).map_err(|source| Error::NotPinned {
            name,
            path: path.clone(),
            source,
        })?;
        let info = md.info().map_err(|source| Error::Map {
            name,
            op: "info",
            source,
        })?;
        let found = (info.key_size(), info.value_size());
        let expected = expected_sizes(name).expect("every map has sizes");
        // A counters map from an older build with fewer counters would silently lose new ones.
        let short_stats = name == MAP_STATS && info.max_entries() < Stat::COUNT;
        if found != expected || short_stats {
            return Err(Error::Layout {
                name,
                dir: dir.to_owned(),
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// The service and backend maps.
pub struct BpfMaps {
    svc4: HashMap<MapData, Svc4Key, SvcValue>,
    svc6: HashMap<MapData, Svc6Key, SvcValue>,
    be4: HashMap<MapData, u32, Backend4>,
    be6: HashMap<MapData, u32, Backend6>,
    aff_match: HashMap<MapData, AffMatchKey, u32>,
    srcr4: LpmTrie<MapData, SrcRange4, u8>,
    srcr6: LpmTrie<MapData, SrcRange6, u8>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    /// Table chunks the desired state may use: half the map (see `sync::limit_maglev`).
    maglev_chunks: usize,
    capacity: crate::sync::Capacity,
    /// Whether `BPF_MAP_UPDATE_BATCH` works here (hash maps, Linux 5.6+); off after the first
    /// refusal, and writes go one by one.
    batch: bool,
}

fn lpm<K: aya::Pod>(map: Map, name: &'static str) -> Result<LpmTrie<MapData, K, u8>> {
    LpmTrie::try_from(map).map_err(|source| Error::Map {
        name,
        op: "open as LPM trie",
        source,
    })
}

/// The LPM key of a source range: the whole frontend, then the CIDR's bits.
fn srcr4_key(r: &SrcRange, fe: Ipv4Addr, net: Ipv4Addr) -> LpmKey<SrcRange4> {
    LpmKey::new(
        SRCR4_FRONTEND_BITS + u32::from(r.cidr.prefix),
        SrcRange4 {
            frontend: fe.octets(),
            port_be: r.frontend.port.to_be_bytes(),
            proto: r.frontend.proto,
            _pad: 0,
            client: net.octets(),
        },
    )
}

fn srcr6_key(r: &SrcRange, fe: Ipv6Addr, net: Ipv6Addr) -> LpmKey<SrcRange6> {
    LpmKey::new(
        SRCR6_FRONTEND_BITS + u32::from(r.cidr.prefix),
        SrcRange6 {
            frontend: fe.octets(),
            port_be: r.frontend.port.to_be_bytes(),
            proto: r.frontend.proto,
            _pad: 0,
            client: net.octets(),
        },
    )
}

fn open_pinned(dir: &Path, name: &'static str) -> Result<Map> {
    Ok(open_sized(dir, name)?.0)
}

/// Opens a pinned map and reads its `max_entries`.
fn open_sized(dir: &Path, name: &'static str) -> Result<(Map, usize)> {
    let path = dir.join(name);
    let md = MapData::from_pin(&path).map_err(|source| Error::NotPinned { name, path, source })?;
    let max = md
        .info()
        .map_err(|source| Error::Map {
            name,
            op: "info",
            source,
        })?
        .max_entries() as usize;
    Ok((
        Map::from_map_data(md).map_err(|source| Error::Map {
            name,
            op: "open",
            source,
        })?,
        max,
    ))
}

fn hash<K: aya::Pod, V: aya::Pod>(map: Map, name: &'static str) -> Result<HashMap<MapData, K, V>> {
    HashMap::try_from(map).map_err(|source| Error::Map {
        name,
        op: "open as hash",
        source,
    })
}

impl BpfMaps {
    /// Opens the maps pinned under `dir` (no running agent needed).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        check_layouts(dir)?;
        let (svc4, c_svc4) = open_sized(dir, MAP_SVC4)?;
        let (svc6, c_svc6) = open_sized(dir, MAP_SVC6)?;
        let (be4, c_be4) = open_sized(dir, MAP_BE4)?;
        let (be6, c_be6) = open_sized(dir, MAP_BE6)?;
        let (maglev, c_maglev) = open_sized(dir, MAP_MAGLEV)?;
        Ok(Self {
            svc4: hash(svc4, MAP_SVC4)?,
            svc6: hash(svc6, MAP_SVC6)?,
            be4: hash(be4, MAP_BE4)?,
            be6: hash(be6, MAP_BE6)?,
            aff_match: hash(open_pinned(dir, MAP_AFF_MATCH)?, MAP_AFF_MATCH)?,
            srcr4: lpm(open_pinned(dir, MAP_SRCR4)?, MAP_SRCR4)?,
            srcr6: lpm(open_pinned(dir, MAP_SRCR6)?, MAP_SRCR6)?,
            maglev: hash(maglev, MAP_MAGLEV)?,
            maglev_chunks: c_maglev / 2,
            capacity: crate::sync::Capacity {
                svc4: c_svc4,
                svc6: c_svc6,
                be4: c_be4,
                be6: c_be6,
            },
            batch: true,
        })
    }

    /// Maglev table chunks the desired state may use (`sync::limit_maglev`).
    #[must_use]
    pub const fn maglev_chunks(&self) -> usize {
        self.maglev_chunks
    }

    /// `max_entries` of each map, as the kernel has them (an adopted map keeps its own size).
    #[must_use]
    pub const fn capacity(&self) -> crate::sync::Capacity {
        self.capacity
    }

    /// Reads the maps into a shadow: what a restarted agent adopts.
    #[expect(
        clippy::too_many_lines,
        reason = "a reader per map, side by side, mirrors the writer"
    )]
    pub fn read_shadow(&self) -> Result<Shadow> {
        let mut s = Shadow::default();
        // Every scope is read back: an entry this build does not know (a scope from a newer
        // build) is adopted and then deleted by the first full sync, never left behind.
        let svc = |addr: IpAddr, port, proto, scope, slot| SvcKey {
            addr,
            port,
            proto,
            scope,
            slot,
        };
        for kv in entries(&self.svc4, MAP_SVC4) {
            let (k, v) = kv?;
            s.svc.insert(
                svc(
                    Ipv4Addr::from(k.address).into(),
                    k.dport,
                    k.proto,
                    k.scope,
                    k.backend_slot,
                ),
                v,
            );
        }
        for kv in entries(&self.svc6, MAP_SVC6) {
            let (k, v) = kv?;
            s.svc.insert(
                svc(
                    Ipv6Addr::from(k.address).into(),
                    k.dport,
                    k.proto,
                    k.scope,
                    k.backend_slot,
                ),
                v,
            );
        }
        let be = |ip: IpAddr, port, proto, flags: u8| Backend {
            addr: SocketAddr::new(ip, port),
            proto,
            local: flags & BE_FLAG_LOCAL != 0,
        };
        for kv in entries(&self.be4, MAP_BE4) {
            let (id, b) = kv?;
            s.backends.insert(
                id,
                be(Ipv4Addr::from(b.address).into(), b.port, b.proto, b.flags),
            );
        }
        for kv in entries(&self.be6, MAP_BE6) {
            let (id, b) = kv?;
            s.backends.insert(
                id,
                be(Ipv6Addr::from(b.address).into(), b.port, b.proto, b.flags),
            );
        }
        let iter_err = |name| {
            move |source| Error::Map {
                name,
                op: "iterate",
                source,
            }
        };
        for k in self.srcr4.keys() {
            let k = k.map_err(iter_err(MAP_SRCR4))?;
            let d = k.data();
            s.src_ranges.insert(SrcRange {
                frontend: svc(
                    Ipv4Addr::from(d.frontend).into(),
                    u16::from_be_bytes(d.port_be),
                    d.proto,
                    lb_common::SCOPE_EXTERNAL,
                    0,
                ),
                cidr: Cidr {
                    addr: Ipv4Addr::from(d.client).into(),
                    prefix: u8::try_from(k.prefix_len().saturating_sub(SRCR4_FRONTEND_BITS))
                        .unwrap_or(32),
                },
            });
        }
        for k in self.srcr6.keys() {
            let k = k.map_err(iter_err(MAP_SRCR6))?;
            let d = k.data();
            s.src_ranges.insert(SrcRange {
                frontend: svc(
                    Ipv6Addr::from(d.frontend).into(),
                    u16::from_be_bytes(d.port_be),
                    d.proto,
                    lb_common::SCOPE_EXTERNAL,
                    0,
                ),
                cidr: Cidr {
                    addr: Ipv6Addr::from(d.client).into(),
                    prefix: u8::try_from(k.prefix_len().saturating_sub(SRCR6_FRONTEND_BITS))
                        .unwrap_or(128),
                },
            });
        }
        for k in self.aff_match.keys() {
            let k = k.map_err(|source| Error::Map {
                name: MAP_AFF_MATCH,
                op: "iterate",
                source,
            })?;
            s.aff_match.insert(crate::sync::AffMatch {
                backend_id: k.backend_id,
                frontend_id: k.frontend_id,
            });
        }
        for kv in entries(&self.maglev, MAP_MAGLEV) {
            let (k, c) = kv?;
            s.maglev
                .insert(k, crate::sync::MaglevIds::from(&c.backend_ids[..]));
        }
        Ok(s)
    }
}

/// A pinned hash map's entries, naming the map in errors.
fn entries<'a, K: aya::Pod, V: aya::Pod>(
    m: &'a HashMap<MapData, K, V>,
    name: &'static str,
) -> impl Iterator<Item = Result<(K, V)>> + 'a {
    m.iter().map(move |kv| {
        kv.map_err(|source| Error::Map {
            name,
            op: "iterate",
            source,
        })
    })
}

fn svc4_key(k: &SvcKey, a: Ipv4Addr) -> Svc4Key {
    Svc4Key {
        address: a.octets(),
        dport: k.port,
        backend_slot: k.slot,
        proto: k.proto,
        scope: k.scope,
        _pad: [0; 2],
    }
}

fn svc6_key(k: &SvcKey, a: Ipv6Addr) -> Svc6Key {
    Svc6Key {
        address: a.octets(),
        dport: k.port,
        backend_slot: k.slot,
        proto: k.proto,
        scope: k.scope,
        _pad: [0; 2],
    }
}

impl MapWriter for BpfMaps {
    type Error = Error;

    /// Runs of [`MIN_BATCH`] or more puts to one map go as `BPF_MAP_UPDATE_BATCH` calls, in
    /// order (the kernel writes a batch's elements in order too, so the phase order holds);
    /// everything else, and everything on a kernel without batches, one by one.
    fn write_all(&mut self, ops: &[MapOp]) -> std::result::Result<(), (usize, Error)> {
        let mut i = 0;
        while i < ops.len() {
            let kind = batch_kind(&ops[i]);
            let end = kind.map_or(i + 1, |k| {
                i + ops[i..]
                    .iter()
                    .take_while(|op| batch_kind(op) == Some(k))
                    .count()
            });
            match kind {
                Some(k) if self.batch && end - i >= MIN_BATCH => {
                    match self.put_batch(k, &ops[i..end]) {
                        Ok(()) => i = end,
                        Err((0, _, io_error)) if batch_unsupported(&io_error) => {
                            tracing::info!(error = %io_error, "no batched map updates here; writing one by one");
                            self.batch = false;
                        }
                        Err((n, name, io_error)) => {
                            return Err((
                                i + n,
                                Error::Map {
                                    name,
                                    op: "batch update",
                                    source: MapError::SyscallError(SyscallError {
                                        call: "bpf_map_update_batch",
                                        io_error,
                                    }),
                                },
                            ));
                        }
                    }
                }
                _ => {
                    self.write(&ops[i]).map_err(|err| (i, err))?;
                    i += 1;
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, op: &MapOp) -> Result<()> {
        let e = |name, op| move |source| Error::Map { name, op, source };
        match *op {
            MapOp::PutSvc { key, value } => match key.addr {
                IpAddr::V4(a) => self
                    .svc4
                    .insert(svc4_key(&key, a), value, 0)
                    .map_err(e(MAP_SVC4, "update")),
                IpAddr::V6(a) => self
                    .svc6
                    .insert(svc6_key(&key, a), value, 0)
                    .map_err(e(MAP_SVC6, "update")),
            },
            MapOp::DelSvc { key } => match key.addr {
                IpAddr::V4(a) => ignore_missing(self.svc4.remove(&svc4_key(&key, a)))
                    .map_err(e(MAP_SVC4, "delete")),
                IpAddr::V6(a) => ignore_missing(self.svc6.remove(&svc6_key(&key, a)))
                    .map_err(e(MAP_SVC6, "delete")),
            },
            MapOp::PutBackend { id, ref backend } => {
                if backend.addr.is_ipv4() {
                    (self.be4.insert(id, backend4(backend), 0)).map_err(e(MAP_BE4, "update"))
                } else {
                    (self.be6.insert(id, backend6(backend), 0)).map_err(e(MAP_BE6, "update"))
                }
            }
            MapOp::PutAffMatch(m) => {
                let k = AffMatchKey {
                    backend_id: m.backend_id,
                    frontend_id: m.frontend_id,
                };
                self.aff_match
                    .insert(k, 0, 0)
                    .map_err(e(MAP_AFF_MATCH, "update"))
            }
            MapOp::DelAffMatch(m) => {
                let k = AffMatchKey {
                    backend_id: m.backend_id,
                    frontend_id: m.frontend_id,
                };
                ignore_missing(self.aff_match.remove(&k)).map_err(e(MAP_AFF_MATCH, "delete"))
            }
            MapOp::PutSrcRange(r) | MapOp::DelSrcRange(r) => {
                let put = matches!(op, MapOp::PutSrcRange(_));
                match (r.frontend.addr, r.cidr.addr) {
                    (IpAddr::V4(fe), IpAddr::V4(net)) => {
                        let k = srcr4_key(&r, fe, net);
                        if put {
                            self.srcr4.insert(&k, 1, 0).map_err(e(MAP_SRCR4, "update"))
                        } else {
                            ignore_missing(self.srcr4.remove(&k)).map_err(e(MAP_SRCR4, "delete"))
                        }
                    }
                    (IpAddr::V6(fe), IpAddr::V6(net)) => {
                        let k = srcr6_key(&r, fe, net);
                        if put {
                            self.srcr6.insert(&k, 1, 0).map_err(e(MAP_SRCR6, "update"))
                        } else {
                            ignore_missing(self.srcr6.remove(&k)).map_err(e(MAP_SRCR6, "delete"))
                        }
                    }
                    // The model filters ranges by the frontend's family.
                    _ => Ok(()),
                }
            }
            MapOp::PutMaglev { key, ref ids } => {
                let mut c = MaglevChunk {
                    backend_ids: [0; MAGLEV_CHUNK as usize],
                };
                c.backend_ids[..ids.len()].copy_from_slice(ids);
                self.maglev
                    .insert(key, c, 0)
                    .map_err(e(MAP_MAGLEV, "update"))
            }
            MapOp::DelMaglev { key } => {
                ignore_missing(self.maglev.remove(&key)).map_err(e(MAP_MAGLEV, "delete"))
            }
            MapOp::DelBackend { id, backend } => match backend.addr {
                SocketAddr::V4(_) => {
                    ignore_missing(self.be4.remove(&id)).map_err(e(MAP_BE4, "delete"))
                }
                SocketAddr::V6(_) => {
                    ignore_missing(self.be6.remove(&id)).map_err(e(MAP_BE6, "delete"))
                }
            },
        }
    }
}

/// Ops of one kind that go to one map and may be written as one batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BatchKind {
    Svc4,
    Svc6,
    Be4,
    Be6,
}

fn batch_kind(op: &MapOp) -> Option<BatchKind> {
    match op {
        MapOp::PutSvc { key, .. } => Some(if key.addr.is_ipv4() {
            BatchKind::Svc4
        } else {
            BatchKind::Svc6
        }),
        MapOp::PutBackend { backend, .. } => Some(if backend.addr.is_ipv4() {
            BatchKind::Be4
        } else {
            BatchKind::Be6
        }),
        _ => None,
    }
}

/// Runs shorter than this go one by one: a batch saves nothing on a handful.
const MIN_BATCH: usize = 16;
/// Elements per `BPF_MAP_UPDATE_BATCH` call (the kernel reschedules inside a call, but a
/// bounded call keeps the key and value buffers small).
const MAX_BATCH: usize = 16_384;

/// `BPF_MAP_UPDATE_BATCH` (aya 0.14 has no batch API): writes `keys[i] → values[i]` in order,
/// one system call per [`MAX_BATCH`] elements. On failure, how many were written and why.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> std::result::Result<(), (usize, io::Error)> {
    /// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(MAX_BATCH);
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0, // BPF_ANY
            flags: 0,
        };
        // SAFETY: `attr` points at `n` keys and `n` values of the map's own sizes (the layouts
        // were checked when the maps were opened); the kernel reads them and writes back only
        // `attr.count`, which lives as long as the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            return Err((done + (attr.count as usize).min(n), err));
        }
        done += n;
    }
    Ok(())
}

/// A batch refused as a whole because the kernel or the map type has no batch update.
fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524 /* ENOTSUPP */)
    )
}

impl BpfMaps {
    /// Writes one run of same-kind puts as batches; on failure, how many were written, the
    /// map and the error.
    fn put_batch(
        &mut self,
        kind: BatchKind,
        ops: &[MapOp],
    ) -> std::result::Result<(), (usize, &'static str, io::Error)> {
        fn svc(op: &MapOp) -> (&SvcKey, SvcValue) {
            match op {
                MapOp::PutSvc { key, value } => (key, *value),
                _ => unreachable!("a Svc batch holds only PutSvc"),
            }
        }
        fn be(op: &MapOp) -> (u32, &Backend) {
            match op {
                MapOp::PutBackend { id, backend } => (*id, backend),
                _ => unreachable!("a Be batch holds only PutBackend"),
            }
        }
        let v4 = |a: IpAddr| match a {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => unreachable!("a v4 batch"),
        };
        let v6 = |a: IpAddr| match a {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => unreachable!("a v6 batch"),
        };
        let values: Vec<SvcValue>;
        let (name, r) = match kind {
            BatchKind::Svc4 => {
                let keys: Vec<Svc4Key> = ops
                    .iter()
                    .map(|op| {
                        let (k, _) = svc(op);
                        svc4_key(k, v4(k.addr))
                    })
                    .collect();
                values = ops.iter().map(|op| svc(op).1).collect();
                (
                    MAP_SVC4,
                    update_batch(self.svc4.map().fd().as_fd(), &keys, &values),
                )
            }
            BatchKind::Svc6 => {
                let keys: Vec<Svc6Key> = ops
                    .iter()
                    .map(|op| {
                        let (k, _) = svc(op);
                        svc6_key(k, v6(k.addr))
                    })
                    .collect();
                values = ops.iter().map(|op| svc(op).1).collect();
                (
                    MAP_SVC6,
                    update_batch(self.svc6.map().fd().as_fd(), &keys, &values),
                )
            }
            BatchKind::Be4 => {
                let keys: Vec<u32> = ops.iter().map(|op| be(op).0).collect();
                let vals: Vec<Backend4> = ops.iter().map(|op| backend4(be(op).1)).collect();
                (
                    MAP_BE4,
                    update_batch(self.be4.map().fd().as_fd(), &keys, &vals),
                )
            }
            BatchKind::Be6 => {
                let keys: Vec<u32> = ops.iter().map(|op| be(op).0).collect();
                let vals: Vec<Backend6> = ops.iter().map(|op| backend6(be(op).1)).collect();
                (
                    MAP_BE6,
                    update_batch(self.be6.map().fd().as_fd(), &keys, &vals),
                )
            }
        };
        r.map_err(|(n, e)| (n, name, e))
    }
}

fn backend4(b: &Backend) -> Backend4 {
    let IpAddr::V4(a) = b.addr.ip() else {
        unreachable!("a v4 backend")
    };
    Backend4 {
        address: a.octets(),
        port: b.addr.port(),
        proto: b.proto,
        flags: if b.local { BE_FLAG_LOCAL } else { 0 },
    }
}

fn backend6(b: &Backend) -> Backend6 {
    let IpAddr::V6(a) = b.addr.ip() else {
        unreachable!("a v6 backend")
    };
    Backend6 {
        address: a.octets(),
        port: b.addr.port(),
        proto: b.proto,
        flags: if b.local { BE_FLAG_LOCAL } else { 0 },
    }
}

/// Deleting what is already gone is success: the shadow may lag a crashed predecessor.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// The pinned per-frontend connection counters.
fn frontend_count_map(dir: &Path) -> Result<PerCpuArray<MapData, u64>> {
    let name = lb_common::MAP_SVC_CNT;
    PerCpuArray::try_from(open_pinned(dir, name)?).map_err(|source| Error::Map {
        name,
        op: "open as per-CPU array",
        source,
    })
}

fn count_error(op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        name: lb_common::MAP_SVC_CNT,
        op,
        source,
    }
}

/// New connections of frontend ids `ids`, summed over CPUs (ids beyond the array are not
/// counted and not listed).
pub fn read_frontend_counts(
    dir: &Path,
    ids: impl IntoIterator<Item = u32>,
) -> Result<std::collections::BTreeMap<u32, u64>> {
    let map = frontend_count_map(dir)?;
    let len = map.len();
    ids.into_iter()
        .filter(|id| *id < len)
        .map(|id| {
            let v = map.get(&id, 0).map_err(count_error("lookup"))?;
            Ok((id, v.iter().sum()))
        })
        .collect()
}

/// Zeroes the counters of `ids` that are not zero; returns how many there were.
fn zero_frontend_counts(
    map: &mut PerCpuArray<MapData, u64>,
    ids: impl IntoIterator<Item = u32>,
) -> Result<usize> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
    let len = map.len();
    let mut n = 0;
    for id in ids.into_iter().filter(|id| *id < len) {
        let v = map.get(&id, 0).map_err(count_error("lookup"))?;
        if v.iter().any(|c| *c != 0) {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(Error::Cpus)?;
            map.set(id, zeros, 0).map_err(count_error("zero"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Zeroes the connection counters of frontend ids that no longer exist, so that an id given to
/// a new frontend later starts from zero. Returns how many were zeroed.
pub fn gc_frontend_counts(dir: &Path, live: &std::collections::BTreeSet<u32>) -> Result<usize> {
    let mut map = frontend_count_map(dir)?;
    let dead: Vec<u32> = (0..map.len()).filter(|id| !live.contains(id)).collect();
    zero_frontend_counts(&mut map, dead)
}

/// Zeroes the connection counters of these (freed) frontend ids. Returns how many there were.
pub fn remove_frontend_counts(
    dir: &Path,
    freed: &std::collections::BTreeSet<u32>,
) -> Result<usize> {
    if freed.is_empty() {
        return Ok(0);
    }
    zero_frontend_counts(&mut frontend_count_map(dir)?, freed.iter().copied())
}

/// Datapath counters summed over CPUs, in [`Stat::ALL`] order.
pub fn read_stats(dir: &Path) -> Result<Vec<(Stat, u64)>> {
    let map = open_pinned(dir, MAP_STATS)?;
    let arr: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(map).map_err(|source| Error::Map {
            name: MAP_STATS,
            op: "open as per-CPU array",
            source,
        })?;
    Stat::ALL
        .iter()
        .map(|s| {
            let v = arr.get(&(*s as u32), 0).map_err(|source| Error::Map {
                name: MAP_STATS,
                op: "lookup",
                source,
            })?;
            Ok((*s, v.iter().sum()))
        })
        .collect()
}

/// Node-local DNS: the pinned `LB_NODE_DNS_V1`, written by the agent's heartbeat.
pub struct NodeDnsMap(aya::maps::Array<MapData, lb_common::NodeDns>);

impl NodeDnsMap {
    /// Opens the pin under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self> {
        let name = lb_common::MAP_NODE_DNS;
        let path = bpffs.join(name);
        let md = MapData::from_pin(&path).map_err(|source| Error::NotPinned {
            name,
            path: path.clone(),
            source,
        })?;
        aya::maps::Array::try_from(aya::maps::Map::Array(md))
            .map(Self)
            .map_err(|source| Error::Map {
                name,
                op: "open",
                source,
            })
    }

    /// Writes the value.
    pub fn set(&mut self, v: &lb_common::NodeDns) -> Result<()> {
        self.0.set(0, v, 0).map_err(|source| Error::Map {
            name: lb_common::MAP_NODE_DNS,
            op: "update",
            source,
        })
    }
}
