//! `lb-agent inspect`: reads the pinned maps (no running agent needed) and prints frontends with
//! their backends, like `cilium bpf lb list`.
use std::{fmt::Write as _, net::SocketAddr, path::Path};

use lb_common::SVC_FLAG_VIP_MARKER;
use serde::Serialize;

use crate::{
    maps::{self, BpfMaps},
    model::Proto,
    sync::Shadow,
};

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub address: std::net::IpAddr,
    pub port: u16,
    pub protocol: String,
    /// `in-node` (socket hooks) or `external` (packet path, externalTrafficPolicy applied).
    pub scope: &'static str,
    /// Backends in slot order; `null` marks a slot that does not resolve (never expected).
    pub backends: Vec<Option<SocketAddr>>,
    /// `loadBalancerSourceRanges` (external LB IP frontends); empty = every client.
    pub source_ranges: Vec<String>,
    /// New flows choose by Maglev: the table's entries (M); `null` = a random slot.
    pub maglev_entries: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: SocketAddr,
    pub protocol: String,
    /// How many frontend slots point at this backend.
    pub slots: usize,
    /// On this node (no SNAT on the packet path).
    pub local: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub services: Vec<ServiceRow>,
    pub backends: Vec<BackendRow>,
    pub vips: Vec<std::net::IpAddr>,
    pub stats: std::collections::BTreeMap<&'static str, u64>,
}

fn proto_name(p: u8) -> String {
    Proto::from_number(p).map_or_else(|| format!("proto {p}"), |p| p.to_string())
}

/// Everything `inspect` can show, from the maps pinned in `bpffs`.
pub fn report(bpffs: &Path) -> maps::Result<Report> {
    let shadow = BpfMaps::from_pins(bpffs)?.read_shadow()?;
    Ok(build(
        &shadow,
        maps::read_stats(bpffs)?
            .into_iter()
            .map(|(s, v)| (s.name(), v))
            .collect(),
    ))
}

fn build(shadow: &Shadow, stats: std::collections::BTreeMap<&'static str, u64>) -> Report {
    let services = shadow
        .frontends()
        .into_iter()
        .map(|(k, (v, bes))| {
            let external = k.scope == lb_common::SCOPE_EXTERNAL;
            let maglev_entries = (v.flags & lb_common::SVC_FLAG_MAGLEV != 0).then(|| {
                let key = |chunk| lb_common::maglev::MaglevKey {
                    frontend_id: v.backend_id,
                    chunk,
                };
                shadow
                    .maglev
                    .range(key(0)..=key(u32::MAX))
                    .map(|(_, ids)| ids.iter().filter(|id| **id != 0).count())
                    .sum()
            });
            ServiceRow {
                frontend: format!(
                    "{}/{}{}",
                    SocketAddr::new(k.addr, k.port),
                    proto_name(k.proto),
                    if external { " (external)" } else { "" }
                ),
                address: k.addr,
                port: k.port,
                protocol: proto_name(k.proto),
                scope: if external { "external" } else { "in-node" },
                backends: bes.into_iter().map(|b| b.map(|b| b.addr)).collect(),
                source_ranges: shadow
                    .src_ranges
                    .iter()
                    .filter(|r| r.frontend == k)
                    .map(|r| r.cidr.to_string())
                    .collect(),
                maglev_entries,
            }
        })
        .collect();
    let backends = shadow
        .backends
        .iter()
        .map(|(id, b)| BackendRow {
            id: *id,
            address: b.addr,
            protocol: proto_name(b.proto),
            slots: shadow
                .svc
                .iter()
                .filter(|(k, v)| k.slot > 0 && v.backend_id == *id)
                .count(),
            local: b.local,
        })
        .collect();
    let vips = shadow
        .svc
        .iter()
        .filter(|(_, v)| v.flags & SVC_FLAG_VIP_MARKER != 0)
        .map(|(k, _)| k.addr)
        .collect();
    Report {
        services,
        backends,
        vips,
        stats,
    }
}

/// `inspect services` as a table.
#[must_use]
pub fn services_table(r: &Report) -> String {
    let mut s = String::new();
    let w = r
        .services
        .iter()
        .map(|x| x.frontend.len())
        .max()
        .unwrap_or(0)
        .max("FRONTEND".len());
    let _ = writeln!(s, "{:<w$}  BACKENDS", "FRONTEND");
    for row in &r.services {
        if row.backends.is_empty() {
            let _ = writeln!(s, "{:<w$}  (none: connections are refused)", row.frontend);
        }
        for (i, b) in row.backends.iter().enumerate() {
            let fe = if i == 0 { row.frontend.as_str() } else { "" };
            let b = b.map_or_else(|| "<unresolved slot>".to_owned(), |b| b.to_string());
            let _ = writeln!(s, "{fe:<w$}  {b} (slot {})", i + 1);
        }
    }
    s
}

/// `inspect backends` as a table.
#[must_use]
pub fn backends_table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:>6}  {:<44}  {:<5}  SLOTS", "ID", "ADDRESS", "PROTO");
    for b in &r.backends {
        let _ = writeln!(
            s,
            "{:>6}  {:<44}  {:<5}  {}",
            b.id,
            b.address.to_string(),
            b.protocol,
            b.slots
        );
    }
    s
}

/// `inspect conntrack` as a table.
#[must_use]
pub fn conntrack_table(flows: &[crate::conntrack::Flow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<5} {:<46} {:<46} {:>9}  FLAGS",
        "DIR", "PROTO", "PACKET", "REWRITTEN TO", "EXPIRES"
    );
    for f in flows {
        let flags: Vec<&str> = [
            (f.snat, "snat"),
            (f.seen_reply, "replied"),
            (f.closing, "closing"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        let _ = writeln!(
            s,
            "{:<8} {:<5} {:<46} {:<46} {:>8.0}s  {}",
            f.dir,
            f.proto,
            format!("{} → {}", f.from, f.to),
            format!("{} → {}", f.new_from, f.new_to),
            f.expires_in_s,
            flags.join(",")
        );
    }
    s
}

/// `inspect stats` as a table.
#[must_use]
pub fn stats_table(r: &Report) -> String {
    let mut s = String::new();
    for (k, v) in &r.stats {
        let _ = writeln!(s, "{k:<24} {v}");
    }
    s
}
