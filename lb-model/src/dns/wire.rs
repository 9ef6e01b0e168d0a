//! The DNS message format, for one question per query (RFC 1035 §4, EDNS0 of RFC 6891).
//!
//! [`parse_query`] is strict and never panics: a message too short for a header is dropped
//! (nothing to answer), a response, a compression pointer in the question (so no pointer
//! loop is ever followed), a name or label too long, a question count other than one, or
//! trailing garbage is FORMERR; opcodes other than QUERY are NOTIMP. [`answer`] builds the
//! response: the question echoed as asked (so owner names keep the client's case), names
//! compressed, and the size limit enforced here rather than trusted to a library — 512 bytes
//! without EDNS, the client's advertised size with it (at most [`MAX_UDP`]); when the answer
//! records do not fit, TC is set and they are left out (the client retries over TCP), while
//! additional records that do not fit are only dropped (no TC, RFC 2181 §9).
use std::fmt::Write as _;

use super::{Lookup, RData, Rr, qtype, rcode};

/// Largest UDP answer we send, whatever a client advertises (the DNS flag day's 1232).
pub const MAX_UDP: usize = 1232;
/// UDP answer size without EDNS.
pub const CLASSIC_UDP: usize = 512;
/// The EDNS payload size we advertise.
pub const OUR_EDNS_SIZE: u16 = 1232;

const CLASS_IN: u16 = 1;
const HEADER: usize = 12;

/// A parsed query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired (copied to the answer).
    pub rd: bool,
    /// The question name, lower case, without the trailing dot (`""` = the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as received (name, type, class), echoed in the answer.
    pub question: Vec<u8>,
    /// EDNS: the client's UDP payload size (`None`: no OPT record).
    pub edns: Option<u16>,
}

/// Why a message is not a query we answer normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not even a header: nothing to answer.
    Drop,
    /// Answer with this rcode and no question section (FORMERR, NOTIMP).
    Rcode { id: u16, rd: bool, rcode: u8 },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses a query message.
pub fn parse_query(msg: &[u8]) -> Result<Query, Reject> {
    if msg.len() < HEADER {
        return Err(Reject::Drop);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        return Err(Reject::Drop); // a response: never answer one (reflection loops)
    }
    let rd = flags & 0x0100 != 0;
    let formerr = Reject::Rcode {
        id,
        rd,
        rcode: rcode::FORMERR,
    };
    let opcode = (flags >> 11) & 0xf;
    if opcode != 0 {
        return Err(Reject::Rcode {
            id,
            rd,
            rcode: rcode::NOTIMP,
        });
    }
    let qd = u16_at(msg, 4).unwrap_or(0);
    let an = u16_at(msg, 6).unwrap_or(0);
    let ns = u16_at(msg, 8).unwrap_or(0);
    let ar = u16_at(msg, 10).unwrap_or(0);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return Err(formerr);
    }
    // The question name: labels only, no compression pointer.
    let mut at = HEADER;
    let mut name = String::new();
    loop {
        let Some(&len) = msg.get(at) else {
            return Err(formerr);
        };
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 || len > 63 {
            return Err(formerr);
        }
        let Some(label) = msg.get(at..at + usize::from(len)) else {
            return Err(formerr);
        };
        at += usize::from(len);
        if !name.is_empty() {
            name.push('.');
        }
        for &c in label {
            // Names are matched case-insensitively (RFC 4343); other bytes are kept as is,
            // escaped so that a dot inside a label can never pass for a separator.
            match c {
                b'.' | b'\\' => {
                    name.push('\\');
                    name.push(char::from(c));
                }
                c if c.is_ascii_graphic() => name.push(char::from(c.to_ascii_lowercase())),
                c => {
                    let _ = write!(name, "\\{c:03}");
                }
            }
        }
        if at - HEADER > 255 {
            return Err(formerr);
        }
    }
    let (Some(qtype), Some(qclass)) = (u16_at(msg, at), u16_at(msg, at + 2)) else {
        return Err(formerr);
    };
    let question = msg[HEADER..at + 4].to_vec();
    at += 4;
    let mut edns = None;
    if ar == 1 {
        // OPT: root name, type 41, class = payload size, TTL, RDLENGTH, options.
        if msg.get(at) != Some(&0) || u16_at(msg, at + 1) != Some(qtype::OPT) {
            return Err(formerr);
        }
        let size = u16_at(msg, at + 3).ok_or(formerr.clone())?;
        let rdlen = u16_at(msg, at + 9).ok_or(formerr.clone())?;
        at += 11 + usize::from(rdlen);
        if at > msg.len() {
            return Err(formerr);
        }
        edns = Some(size.max(CLASSIC_UDP as u16));
    }
    if at != msg.len() {
        return Err(formerr);
    }
    Ok(Query {
        id,
        rd,
        name,
        qtype,
        qclass,
        question,
        edns,
    })
}

/// A response with no question (FORMERR, NOTIMP to a message we could not read).
#[must_use]
pub fn bare(id: u16, rd: bool, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags(false, false, rd, rcode).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

fn flags(aa: bool, tc: bool, rd: bool, rcode: u8) -> u16 {
    0x8000 // QR
        | if aa { 0x0400 } else { 0 }
        | if tc { 0x0200 } else { 0 }
        | if rd { 0x0100 } else { 0 }
        | 0x0080 // RA: names outside the zone are resolved upstream
        | u16::from(rcode & 0xf)
}

/// Writes names with compression: every suffix written is remembered by its offset. Answers
/// name few distinct suffixes, so a list searched in order beats a hash map, and an answer
/// whose records all point at the question (A, AAAA, TXT) allocates nothing for it.
struct Writer {
    out: Vec<u8>,
    suffixes: Vec<(Box<str>, u16)>,
}

impl Writer {
    fn name(&mut self, name: &str) {
        let mut rest = name.trim_end_matches('.');
        loop {
            if rest.is_empty() {
                self.out.push(0);
                return;
            }
            if let Some((_, off)) = self.suffixes.iter().find(|(s, _)| **s == *rest) {
                self.out.extend_from_slice(&(0xc000 | off).to_be_bytes());
                return;
            }
            if self.out.len() < 0x3fff {
                self.suffixes.push((rest.into(), self.out.len() as u16));
            }
            let (label, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let label = &label.as_bytes()[..label.len().min(63)];
            self.out.push(label.len() as u8);
            self.out.extend_from_slice(label);
            rest = tail;
        }
    }

    /// One resource record; `qname_at`: the offset of the question's name.
    fn rr(&mut self, rr: &Rr, ttl: u32, zone: &str) {
        match &rr.owner {
            None => self
                .out
                .extend_from_slice(&(0xc000 | HEADER as u16).to_be_bytes()),
            Some(n) => self.name(n),
        }
        self.out.extend_from_slice(&rr.data.rtype().to_be_bytes());
        self.out.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.out.extend_from_slice(&ttl.to_be_bytes());
        let len_at = self.out.len();
        self.out.extend_from_slice(&[0, 0]);
        match &rr.data {
            RData::A(a) => self.out.extend_from_slice(&a.octets()),
            RData::Aaaa(a) => self.out.extend_from_slice(&a.octets()),
            RData::Cname(n) | RData::Ptr(n) => self.name(n),
            RData::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                self.out.extend_from_slice(&priority.to_be_bytes());
                self.out.extend_from_slice(&weight.to_be_bytes());
                self.out.extend_from_slice(&port.to_be_bytes());
                self.name(target);
            }
            RData::Txt(t) => {
                for chunk in t.as_bytes().chunks(255) {
                    self.out.push(chunk.len() as u8);
                    self.out.extend_from_slice(chunk);
                }
            }
            RData::Soa { serial } => {
                self.name(&format!("ns.dns.{zone}"));
                self.name(&format!("hostmaster.{zone}"));
                for v in [*serial, 7200, 1800, 86_400, ttl] {
                    self.out.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        let len = (self.out.len() - len_at - 2) as u16;
        self.out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
    }
}

/// The size limit for an answer to `q`: 512 without EDNS, the advertised size with it (at most
/// [`MAX_UDP`]); `tcp`: 65,535.
#[must_use]
pub fn limit(q: &Query, tcp: bool) -> usize {
    if tcp {
        return usize::from(u16::MAX);
    }
    q.edns
        .map_or(CLASSIC_UDP, |s| usize::from(s).clamp(CLASSIC_UDP, MAX_UDP))
}

/// The response to `q` from an authoritative lookup (`Lookup::Answer`); `ttl` for every
/// record, `zone` for the SOA's names; at most `max` bytes.
#[must_use]
pub fn answer(q: &Query, l: &Lookup, ttl: u32, zone: &str, max: usize) -> Vec<u8> {
    answer_with(q, l, ttl, zone, max, None, &[])
}

/// [`answer`], with `extra` answer records after the lookup's (what the upstream said of an
/// ExternalName's target) and its rcode instead of the lookup's.
#[must_use]
pub fn answer_with(
    q: &Query,
    l: &Lookup,
    ttl: u32,
    zone: &str,
    max: usize,
    rcode_override: Option<u8>,
    extra: &[Rr],
) -> Vec<u8> {
    let (rc, answers, additional, soa): (u8, &[Rr], &[Rr], Option<&Rr>) = match l {
        Lookup::Answer {
            rcode,
            answers,
            additional,
            soa,
        } => (*rcode, answers, additional, soa.as_ref()),
        Lookup::Chase { answers, .. } => (rcode::NOERROR, answers, &[], None),
        Lookup::Forward => (rcode::SERVFAIL, &[], &[], None),
    };
    let aa = !matches!(l, Lookup::Forward);
    let opt_len = if q.edns.is_some() { 11 } else { 0 };
    let mut w = Writer {
        out: Vec::with_capacity(512),
        suffixes: Vec::new(),
    };
    w.out.extend_from_slice(&q.id.to_be_bytes());
    w.out.extend_from_slice(&[0; 10]);
    w.out.extend_from_slice(&q.question);
    let mut counts = [1u16, 0, 0, 0];
    let mut tc = false;
    let base = w.out.len();
    let rc = rcode_override.unwrap_or(rc);
    for rr in answers.iter().chain(extra) {
        w.rr(rr, ttl, zone);
        counts[1] += 1;
    }
    if let Some(s) = soa {
        w.rr(s, ttl, zone);
        counts[2] += 1;
    }
    if w.out.len() + opt_len > max {
        // The answer itself does not fit: TC, and the client asks again over TCP.
        w.out.truncate(base);
        counts[1] = 0;
        counts[2] = 0;
        tc = true;
    } else {
        for rr in additional {
            let before = w.out.len();
            w.rr(rr, ttl, zone);
            if w.out.len() + opt_len > max {
                w.out.truncate(before); // only additional data lost: no TC
                break;
            }
            counts[3] += 1;
        }
    }
    if q.edns.is_some() {
        w.out.push(0);
        w.out.extend_from_slice(&qtype::OPT.to_be_bytes());
        w.out.extend_from_slice(&OUR_EDNS_SIZE.to_be_bytes());
        w.out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        counts[3] += 1;
    }
    w.out[2..4].copy_from_slice(&flags(aa, tc, q.rd, rc).to_be_bytes());
    for (i, c) in counts.iter().enumerate() {
        w.out[4 + 2 * i..6 + 2 * i].copy_from_slice(&c.to_be_bytes());
    }
    w.out
}

/// Reads a (possibly compressed) name at `at`: the name (lower case, no trailing dot) and the
/// offset after it. Pointers must point backwards, at most 32 of them: no loop is followed.
#[must_use]
pub fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut next = None;
    let mut hops = 0;
    loop {
        let len = *msg.get(at)?;
        match len & 0xc0 {
            0xc0 => {
                let ptr = usize::from(u16::from_be_bytes([len, *msg.get(at + 1)?]) & 0x3fff);
                if ptr >= at || hops == 32 {
                    return None;
                }
                hops += 1;
                next.get_or_insert(at + 2);
                at = ptr;
            }
            0 if len == 0 => {
                return Some((name, next.unwrap_or(at + 1)));
            }
            0 => {
                let label = msg.get(at + 1..at + 1 + usize::from(len))?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.extend(label.iter().map(|c| char::from(c.to_ascii_lowercase())));
                if name.len() > 255 {
                    return None;
                }
                at += 1 + usize::from(len);
            }
            _ => return None,
        }
    }
}

/// Walks every resource record of a message: `f(offset of its TYPE field, type)`. `None` when
/// the message is malformed.
fn walk(msg: &[u8], mut f: impl FnMut(usize, u16)) -> Option<()> {
    let count = |i: usize| u16_at(msg, 4 + 2 * i).map(usize::from);
    let (qd, rrs) = (count(0)?, count(1)? + count(2)? + count(3)?);
    let mut at = HEADER;
    for _ in 0..qd {
        at = read_name(msg, at)?.1 + 4;
    }
    for _ in 0..rrs {
        at = read_name(msg, at)?.1;
        let t = u16_at(msg, at)?;
        let rdlen = usize::from(u16_at(msg, at + 8)?);
        f(at, t);
        at += 10 + rdlen;
        if at > msg.len() {
            return None;
        }
    }
    Some(())
}

/// Offsets and values of every TTL field of a message but OPT's (for the forwarding cache).
#[must_use]
pub fn ttl_offsets(msg: &[u8]) -> Option<Vec<(usize, u32)>> {
    let mut v = Vec::new();
    walk(msg, |at, t| {
        if t != qtype::OPT
            && let Some(b) = msg.get(at + 4..at + 8)
        {
            v.push((at + 4, u32::from_be_bytes([b[0], b[1], b[2], b[3]])));
        }
    })?;
    Some(v)
}

/// The rcode and the A / AAAA / CNAME records of a response's answer section (what the
/// upstream said of an ExternalName's target).
#[must_use]
pub fn answer_records(msg: &[u8]) -> Option<(u8, Vec<Rr>)> {
    let an = usize::from(u16_at(msg, 6)?);
    walk(msg, |_, _| {})?; // the whole layout is valid
    let mut out = Vec::new();
    let mut bad = false;
    let mut at = HEADER;
    for _ in 0..u16_at(msg, 4)? {
        at = read_name(msg, at)?.1 + 4;
    }
    for _ in 0..an {
        let (owner, next) = read_name(msg, at)?;
        let t = u16_at(msg, next)?;
        let rdlen = usize::from(u16_at(msg, next + 8)?);
        let rdata = msg.get(next + 10..next + 10 + rdlen)?;
        let data = match (t, rdata.len()) {
            (qtype::A, 4) => Some(RData::A(std::net::Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            (qtype::AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                Some(RData::Aaaa(std::net::Ipv6Addr::from(b)))
            }
            (qtype::CNAME, _) => read_name(msg, next + 10).map(|(n, _)| RData::Cname(n.into())),
            _ => None,
        };
        if t == qtype::CNAME && data.is_none() {
            bad = true;
        }
        if let Some(data) = data {
            out.push(Rr {
                owner: Some(owner.into()),
                data,
            });
        }
        at = next + 10 + rdlen;
    }
    if bad {
        return None;
    }
    Some((msg[3] & 0x0f, out))
}

/// A SERVFAIL (or other rcode) for a parsed query, with its question (before the first
/// sync, when the upstream fails).
#[must_use]
pub fn error(q: &Query, rc: u8) -> Vec<u8> {
    let l = Lookup::Answer {
        rcode: rc,
        answers: Vec::new(),
        additional: Vec::new(),
        soa: None,
    };
    let mut out = answer(q, &l, 0, "", usize::from(u16::MAX));
    // Not authoritative.
    let f = flags(false, false, q.rd, rc);
    out[2..4].copy_from_slice(&f.to_be_bytes());
    out
}

/// Whether `q` is a question this server answers from the index at all (class IN; qtypes
/// other than the zone-transfer ones).
pub fn supported(q: &Query) -> Result<(), u8> {
    if q.qclass != CLASS_IN && q.qclass != qtype::ANY {
        return Err(rcode::REFUSED);
    }
    if matches!(q.qtype, 251 | 252) {
        return Err(rcode::NOTIMP); // IXFR, AXFR
    }
    Ok(())
}

/// A query for `name`/`qt`, optionally with EDNS (tests of this crate).
#[cfg(test)]
pub(crate) fn tests_query(name: &str, qt: u16, edns: Option<u16>) -> Vec<u8> {
    tests::query(name, qt, edns)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name`/`qt`, optionally with EDNS.
    pub(crate) fn query(name: &str, qt: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(edns.is_some()),
        ];
        for l in name.split('.').filter(|l| !l.is_empty()) {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qt.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some(s) = edns {
            m.push(0);
            m.extend_from_slice(&qtype::OPT.to_be_bytes());
            m.extend_from_slice(&s.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn queries_parse_case_insensitively() {
        let q = parse_query(&query("Web.Demo.SVC.cluster.local", qtype::A, Some(4096))).unwrap();
        assert_eq!(q.name, "web.demo.svc.cluster.local");
        assert_eq!((q.id, q.qtype, q.edns), (0x1234, qtype::A, Some(4096)));
        assert!(q.rd);
    }

    #[test]
    fn bad_messages_are_dropped_or_formerr() {
        assert_eq!(parse_query(&[0; 11]), Err(Reject::Drop));
        let formerr = |m: &[u8]| {
            matches!(
                parse_query(m),
                Err(Reject::Rcode {
                    rcode: rcode::FORMERR,
                    ..
                })
            )
        };
        let good = query("a.b", qtype::A, None);
        // Truncated at every offset past the header.
        for n in HEADER..good.len() {
            assert!(formerr(&good[..n]), "cut at {n}");
        }
        // A compression pointer in the question (also a loop: it points at itself).
        let mut p = good[..HEADER].to_vec();
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(formerr(&p));
        // 255 questions.
        let mut many = good.clone();
        many[5] = 255;
        assert!(formerr(&many));
        // A label over 63, a name over 255.
        let mut long = good[..HEADER].to_vec();
        long.push(64);
        long.extend_from_slice(&[b'a'; 64]);
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(formerr(&long));
        let big = query(&vec!["abcdefghij"; 30].join("."), qtype::A, None);
        assert!(formerr(&big));
        // Trailing bytes.
        let mut trail = good.clone();
        trail.push(0);
        assert!(formerr(&trail));
        // A response is never answered; another opcode is NOTIMP.
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(Reject::Drop));
        let mut notify = good;
        notify[2] |= 4 << 3;
        assert!(matches!(
            parse_query(&notify),
            Err(Reject::Rcode {
                rcode: rcode::NOTIMP,
                ..
            })
        ));
    }

    #[test]
    fn a_dot_inside_a_label_never_passes_for_a_separator() {
        let mut m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.push(7);
        m.extend_from_slice(b"web.svc");
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m).unwrap().name, "web\\.svc");
    }
}
