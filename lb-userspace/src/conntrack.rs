//! Garbage collection of the packet path's connection-tracking / NAT table (`LB4_CT_V1`,
//! `LB6_CT_V1`, layouts in `lb_common::nat`).
//!
//! The datapath moves an entry's `expires_ns` forward as packets pass (at most once a second);
//! a flow's two entries (forward and reply) live as long as either is unexpired, so a flow that
//! is busy in one direction only is never cut. The collector runs every
//! `--conntrack-gc-interval` and deletes the pairs that are past it, and orphans.
use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    path::Path,
};

use aya::maps::{HashMap as BpfHash, MapData, MapError};
use lb_common::{CT_DIR_FWD, CT_DIR_REPLY, Ct4Key, Ct4Value, Ct6Key, Ct6Value, MAP_CT4, MAP_CT6};

/// A conntrack entry, either family.
pub trait Entry: Copy {
    type Key: Copy + Eq + Hash + aya::Pod;
    /// The other half of the flow.
    fn partner(key: &Self::Key, v: &Self) -> Self::Key;
    fn expires_ns(&self) -> u64;
}

/// Both families' entries have the same fields; only the address width differs.
macro_rules! impl_entry {
    ($value:ty, $key:ident) => {
        impl Entry for $value {
            type Key = $key;
            fn partner(k: &$key, v: &Self) -> $key {
                // Forward value: backend (addr:port) and the source sent to it
                // (nat_addr:nat_port); its reply comes from the backend to that source. Reply
                // value: frontend (addr:port) and client (nat_addr:nat_port); the forward key is
                // client → frontend.
                let fwd = k.dir == CT_DIR_FWD;
                $key {
                    src: if fwd { v.addr } else { v.nat_addr },
                    dst: if fwd { v.nat_addr } else { v.addr },
                    sport: if fwd { v.port } else { v.nat_port },
                    dport: if fwd { v.nat_port } else { v.port },
                    proto: k.proto,
                    dir: if fwd { CT_DIR_REPLY } else { CT_DIR_FWD },
                    _pad: [0; 2],
                }
            }
            fn expires_ns(&self) -> u64 {
                self.expires_ns
            }
        }
    };
}

impl_entry!(Ct4Value, Ct4Key);
impl_entry!(Ct6Value, Ct6Key);

/// The keys to delete at `now`: entries expired whose partner is expired or absent.
#[must_use]
pub fn plan<V: Entry, S: BuildHasher>(entries: &HashMap<V::Key, V, S>, now: u64) -> Vec<V::Key> {
    entries
        .iter()
        .filter(|(k, v)| {
            v.expires_ns() <= now
                && entries
                    .get(&V::partner(k, v))
                    .is_none_or(|p| p.expires_ns() <= now)
        })
        .map(|(k, _)| *k)
        .collect()
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// What one collection saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries (both directions) per family before the collection: [IPv4, IPv6].
    pub entries: [usize; 2],
    /// Entries deleted: [IPv4, IPv6].
    pub deleted: [usize; 2],
}

#[derive(Debug, thiserror::Error)]
#[error("conntrack map {name}: {op} failed")]
pub struct Error {
    name: &'static str,
    op: &'static str,
    #[source]
    source: MapError,
}

fn collect<V: Entry + aya::Pod>(
    dir: &Path,
    name: &'static str,
    now: u64,
) -> Result<(usize, usize), Error> {
    let err = |op| move |source| Error { name, op, source };
    let entries: HashMap<V::Key, V> = read::<V>(dir, name)?.into_iter().collect();
    let md = MapData::from_pin(dir.join(name)).map_err(err("open pin"))?;
    let mut map: BpfHash<MapData, V::Key, V> =
        BpfHash::try_from(aya::maps::Map::LruHashMap(md)).map_err(err("open"))?;
    let doomed = plan(&entries, now);
    let mut deleted = 0;
    for k in &doomed {
        match map.remove(k) {
            Ok(()) => deleted += 1,
            Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(err("delete")(e)),
        }
    }
    Ok((entries.len(), deleted))
}

/// One conntrack entry as `inspect conntrack` shows it: the packet it matches and what that
/// packet is rewritten to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Flow {
    /// `forward` (client → frontend) or `reply` (backend → client or NAT port).
    pub dir: &'static str,
    pub proto: String,
    pub from: std::net::SocketAddr,
    pub to: std::net::SocketAddr,
    pub new_from: std::net::SocketAddr,
    pub new_to: std::net::SocketAddr,
    pub snat: bool,
    pub closing: bool,
    pub seen_reply: bool,
    /// Seconds until the entry may be collected (negative: expired, not yet collected).
    pub expires_in_s: f64,
}

/// Every entry of both families' pinned tables.
pub fn list(dir: &Path) -> Result<Vec<Flow>, Error> {
    use std::net::{IpAddr, SocketAddr};
    let now = monotonic_ns();
    let mut out = Vec::new();
    let flow = |d: u8,
                p: u8,
                from: SocketAddr,
                to: SocketAddr,
                a: SocketAddr,
                n: SocketAddr,
                flags: u16,
                exp: u64| {
        let fwd = d == CT_DIR_FWD;
        let snat = flags & lb_common::CT_F_SNAT != 0;
        Flow {
            dir: if fwd { "forward" } else { "reply" },
            proto: crate::model::Proto::from_number(p)
                .map_or_else(|| p.to_string(), |p| p.to_string()),
            from,
            to,
            new_from: if fwd { if snat { n } else { from } } else { a },
            new_to: if fwd { a } else { n },
            snat,
            closing: flags & lb_common::CT_F_CLOSING != 0,
            seen_reply: flags & lb_common::CT_F_SEEN_REPLY != 0,
            expires_in_s: (i128::from(exp) - i128::from(now)) as f64 / 1e9,
        }
    };
    for (k, v) in read::<Ct4Value>(dir, MAP_CT4)? {
        let sa = |a: [u8; 4], p| SocketAddr::new(IpAddr::from(a), p);
        out.push(flow(
            k.dir,
            k.proto,
            sa(k.src, k.sport),
            sa(k.dst, k.dport),
            sa(v.addr, v.port),
            sa(v.nat_addr, v.nat_port),
            v.flags,
            v.expires_ns,
        ));
    }
    for (k, v) in read::<Ct6Value>(dir, MAP_CT6)? {
        let sa = |a: [u8; 16], p| SocketAddr::new(IpAddr::from(a), p);
        out.push(flow(
            k.dir,
            k.proto,
            sa(k.src, k.sport),
            sa(k.dst, k.dport),
            sa(v.addr, v.port),
            sa(v.nat_addr, v.nat_port),
            v.flags,
            v.expires_ns,
        ));
    }
    Ok(out)
}

/// The entries of one pinned table.
fn read<V: Entry + aya::Pod>(dir: &Path, name: &'static str) -> Result<Vec<(V::Key, V)>, Error> {
    let err = |op| move |source| Error { name, op, source };
    let md = MapData::from_pin(dir.join(name)).map_err(err("open pin"))?;
    let map: BpfHash<MapData, V::Key, V> =
        BpfHash::try_from(aya::maps::Map::LruHashMap(md)).map_err(err("open"))?;
    let mut out = Vec::new();
    for kv in &map {
        match kv {
            Ok(e) => out.push(e),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err("iterate")(e)),
        }
    }
    Ok(out)
}

/// One collection over both families' pinned tables.
pub fn gc(dir: &Path) -> Result<Report, Error> {
    let now = monotonic_ns();
    let (e4, d4) = collect::<Ct4Value>(dir, MAP_CT4, now)?;
    let (e6, d6) = collect::<Ct6Value>(dir, MAP_CT6, now)?;
    Ok(Report {
        entries: [e4, e6],
        deleted: [d4, d6],
    })
}

#[cfg(test)]
mod tests {
    use lb_common::IPPROTO_TCP;

    use super::*;

    fn pair(client_port: u16, fwd_exp: u64, rev_exp: u64) -> [(Ct4Key, Ct4Value); 2] {
        let client = [198, 18, 9, 1];
        let fe = [198, 18, 0, 1];
        let be = [198, 18, 2, 10];
        let nat = [198, 18, 0, 1];
        let fk = Ct4Key {
            src: client,
            dst: fe,
            sport: client_port,
            dport: 30080,
            proto: IPPROTO_TCP,
            dir: CT_DIR_FWD,
            _pad: [0; 2],
        };
        let fv = Ct4Value {
            addr: be,
            nat_addr: nat,
            port: 8080,
            nat_port: 20_000 + client_port,
            expires_ns: fwd_exp,
            ..Ct4Value::default()
        };
        let rk = Ct4Value::partner(&fk, &fv);
        let rv = Ct4Value {
            addr: fe,
            nat_addr: client,
            port: 30080,
            nat_port: client_port,
            expires_ns: rev_exp,
            ..Ct4Value::default()
        };
        assert_eq!(
            Ct4Value::partner(&rk, &rv),
            fk,
            "partners point at each other"
        );
        [(fk, fv), (rk, rv)]
    }

    #[test]
    fn a_pair_lives_while_either_half_does() {
        let mut m = HashMap::new();
        m.extend(pair(1, 100, 100)); // both expired at 150
        m.extend(pair(2, 100, 200)); // reply still live
        m.extend(pair(3, 200, 100)); // forward still live
        let [(orphan_k, orphan_v), _] = pair(4, 100, 0);
        m.insert(orphan_k, orphan_v); // reply half already gone
        let mut doomed = plan(&m, 150);
        doomed.sort_by_key(|k| k.sport);
        let ports: Vec<u16> = doomed
            .iter()
            .map(|k| {
                if k.dir == CT_DIR_FWD {
                    k.sport
                } else {
                    k.dport
                }
            })
            .collect();
        // Pair 1 (both halves: forward by client port, reply by NAT port) and the orphan.
        assert_eq!(doomed.len(), 3, "{doomed:?}");
        assert!(ports.contains(&1) && ports.contains(&4), "{ports:?}");
        assert!(plan(&m, 50).is_empty(), "nothing expired yet");
    }
}
