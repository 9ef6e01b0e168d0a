//! The agent's DNS server (`--dns ADDR:PORT`, UDP and TCP): answers the cluster zone from the
//! index the sync builds from the same snapshot as the datapath (`lb_model::dns`), and forwards
//! everything else to `--dns-upstream` (default: the host's `/etc/resolv.conf` nameservers),
//! relaying the upstream's answer as it is — its rcode and negative SOA included — through a
//! bounded cache.
//!
//! * Before the first complete sync every question is SERVFAIL, never NXDOMAIN: a resolver must
//!   not cache "does not exist" for a name that only is not known yet.
//! * Bounded: at most [`MAX_FORWARDS`] forwarded questions in flight (beyond: SERVFAIL), at
//!   most [`MAX_TCP`] TCP connections, each idle at most [`TCP_IDLE`], messages at most
//!   65,535 bytes; a malformed query is FORMERR or dropped (`lb_model::dns::wire`), never a
//!   crash.
//! * An in-zone CNAME to a name outside the zone (ExternalName) is followed upstream and the
//!   upstream's records appended, as CoreDNS does.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_model::dns::{Index, Lookup, qtype, rcode, wire};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

/// Forwarded questions in flight at once.
pub const MAX_FORWARDS: usize = 1024;
/// TCP connections served at once per listener.
pub const MAX_TCP: usize = 256;
/// A TCP connection idle this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long one upstream gets to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries of the forwarding cache.
pub const CACHE_ENTRIES: usize = 10_000;
/// Longest time an upstream answer is cached, whatever its TTLs.
pub const CACHE_MAX_TTL: u32 = 300;

/// Problems starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on --dns {addr} ({proto})")]
    Listen {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the server answers from: the index of the last sync (`None` before the first).
pub struct Shared {
    index: RwLock<Option<Arc<Index>>>,
    upstreams: Vec<SocketAddr>,
    cache: Mutex<Cache>,
    forwards: Arc<Semaphore>,
    metrics: Option<Arc<crate::metrics::DnsMetrics>>,
    /// When the oldest source change not yet synced arrived, in µs since `epoch` (0: none is
    /// waiting). An atomic: read on every answer.
    pending_since: AtomicU64,
    epoch: Instant,
}

/// How long a change may wait for its sync before answers count as behind.
pub const BEHIND: Duration = Duration::from_millis(100);

impl Shared {
    #[must_use]
    pub fn new(
        upstreams: Vec<SocketAddr>,
        metrics: Option<Arc<crate::metrics::DnsMetrics>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(None),
            upstreams,
            cache: Mutex::new(Cache::default()),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
            metrics,
            pending_since: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// A source change arrived at `t` (the run loop), or (`None`) everything is synced.
    pub fn pending(&self, t: Option<Instant>) {
        match t {
            Some(t) => {
                let us = t.duration_since(self.epoch).as_micros() as u64 + 1;
                // Only the oldest change counts: set when nothing is waiting.
                let _ = self.pending_since.compare_exchange(
                    0,
                    us,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            None => self.pending_since.store(0, Ordering::Relaxed),
        }
    }

    /// Has a change waited longer than [`BEHIND`] for its sync?
    fn behind(&self) -> bool {
        let since = self.pending_since.load(Ordering::Relaxed);
        since != 0 && self.epoch.elapsed().as_micros() as u64 > since + BEHIND.as_micros() as u64
    }

    /// Counts one response.
    fn count(&self, qtype: Option<u16>, msg: &[u8]) {
        if let (Some(m), Some(b)) = (&self.metrics, msg.get(3)) {
            m.count(qtype, b & 0x0f);
        }
    }

    /// Replaces the index (after a sync).
    pub fn set(&self, ix: Arc<Index>) {
        *self.index.write().expect("dns index lock") = Some(ix);
    }

    fn index(&self) -> Option<Arc<Index>> {
        self.index.read().expect("dns index lock").clone()
    }
}

/// The nameservers of a resolv.conf (port 53).
#[must_use]
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Binds UDP and TCP on each address (failing at once) and serves in the background. Returns
/// the bound addresses (for port 0).
pub async fn serve(addrs: &[SocketAddr], shared: &Arc<Shared>) -> Result<Vec<SocketAddr>, Error> {
    let mut bound = Vec::new();
    for &addr in addrs {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                addr,
                proto: "udp",
                source,
            })?;
        let local = udp.local_addr().map_err(|source| Error::Listen {
            addr,
            proto: "udp",
            source,
        })?;
        // TCP on the same port as UDP (port 0: the one UDP got).
        let tcp = TcpListener::bind(local)
            .await
            .map_err(|source| Error::Listen {
                addr: local,
                proto: "tcp",
                source,
            })?;
        info!(addr = %local, "serving DNS");
        // One receive loop per CPU on the same socket: answers are computed where they are
        // received, with no hand-off between tasks.
        let udp = Arc::new(udp);
        let loops = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        for _ in 0..loops {
            tokio::spawn(udp_loop(udp.clone(), shared.clone()));
        }
        tokio::spawn(tcp_loop(tcp, shared.clone()));
        bound.push(local);
    }
    Ok(bound)
}

async fn udp_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "dns udp receive");
                continue;
            }
        };
        match respond_local(&buf[..n], &shared, false) {
            Reply::Now(r, qt) => {
                shared.count(qt, &r);
                let _ = sock.send_to(&r, peer).await;
            }
            Reply::None => {}
            Reply::Upstream(q, prefix) => {
                let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                    let _ = sock.send_to(&wire::error(&q, rcode::SERVFAIL), peer).await;
                    continue;
                };
                let (sock, shared, msg) = (sock.clone(), shared.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    let r = upstream(&shared, &q, &msg, prefix, false).await;
                    shared.count(Some(q.qtype), &r);
                    let _ = sock.send_to(&r, peer).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "dns tcp accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tcp_conn(stream, &shared).await;
            drop(permit);
        });
    }
}

/// One TCP connection: length-prefixed messages until idle, closed or broken.
async fn tcp_conn(mut s: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
            return Ok(());
        };
        let len = usize::from(len?);
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf[..len]))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let r = match respond_local(&buf[..len], shared, true) {
            Reply::Now(r, qt) => {
                shared.count(qt, &r);
                r
            }
            Reply::None => return Ok(()),
            Reply::Upstream(q, prefix) => {
                let r = upstream(shared, &q, &buf[..len], prefix, true).await;
                shared.count(Some(q.qtype), &r);
                r
            }
        };
        s.write_u16(r.len() as u16).await?;
        s.write_all(&r).await?;
    }
}

/// What to do with a message.
enum Reply {
    /// This response; the question's type (`None`: unreadable), for the metrics.
    Now(Vec<u8>, Option<u16>),
    /// Nothing (not even a header).
    None,
    /// Resolve upstream; the in-zone records to put first (an ExternalName's CNAME).
    Upstream(wire::Query, Option<Lookup>),
}

/// The answer when the index (or a refusal) gives it at once.
fn respond_local(msg: &[u8], shared: &Shared, tcp: bool) -> Reply {
    let q = match wire::parse_query(msg) {
        Ok(q) => q,
        Err(wire::Reject::Drop) => return Reply::None,
        Err(wire::Reject::Rcode { id, rd, rcode }) => {
            return Reply::Now(wire::bare(id, rd, rcode), None);
        }
    };
    if let Err(rc) = wire::supported(&q) {
        return Reply::Now(wire::error(&q, rc), Some(q.qtype));
    }
    let Some(ix) = shared.index() else {
        return Reply::Now(wire::error(&q, rcode::SERVFAIL), Some(q.qtype));
    };
    let l = ix.lookup(&q.name, q.qtype);
    match l {
        Lookup::Forward => Reply::Upstream(q, None),
        Lookup::Chase { .. } => Reply::Upstream(q, Some(l)),
        Lookup::Answer { .. } => {
            if let Some(m) = &shared.metrics
                && shared.behind()
            {
                m.behind.inc();
            }
            let cfg = ix.config();
            Reply::Now(
                wire::answer(&q, &l, cfg.ttl, &cfg.zone, wire::limit(&q, tcp)),
                Some(q.qtype),
            )
        }
    }
}

/// Forwards `q` (the message `msg`) upstream, or — for a CNAME chase — asks upstream for the
/// target and appends its records to the in-zone ones.
async fn upstream(
    shared: &Shared,
    q: &wire::Query,
    msg: &[u8],
    chase: Option<Lookup>,
    tcp: bool,
) -> Vec<u8> {
    let Some(Lookup::Chase { answers, target }) = chase else {
        return match forward(shared, q, msg).await {
            Some(r) => r,
            None => wire::error(q, rcode::SERVFAIL),
        };
    };
    // Ask upstream for the target; its answer records follow the CNAME.
    let tq = wire::Query {
        id: q.id,
        rd: true,
        name: target.to_string(),
        qtype: q.qtype,
        qclass: q.qclass,
        question: encode_question(&target, q.qtype, q.qclass),
        edns: None,
    };
    let tmsg = query_message(&tq);
    let Some(up) = forward(shared, &tq, &tmsg).await else {
        return wire::error(q, rcode::SERVFAIL);
    };
    let (rc, extra) = wire::answer_records(&up).unwrap_or((rcode::SERVFAIL, Vec::new()));
    let ix = shared.index();
    let (ttl, zone) = ix.as_ref().map_or((5, String::new()), |ix| {
        (ix.config().ttl, ix.config().zone.clone())
    });
    let l = Lookup::Chase { answers, target };
    wire::answer_with(q, &l, ttl, &zone, wire::limit(q, tcp), Some(rc), &extra)
}

/// The question section of a query for `name`.
fn encode_question(name: &str, qt: u16, qc: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 6);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        let l = &l.as_bytes()[..l.len().min(63)];
        v.push(l.len() as u8);
        v.extend_from_slice(l);
    }
    v.push(0);
    v.extend_from_slice(&qt.to_be_bytes());
    v.extend_from_slice(&qc.to_be_bytes());
    v
}

/// A whole query message for `q` (RD set, no EDNS).
fn query_message(q: &wire::Query) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + q.question.len());
    m.extend_from_slice(&q.id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&q.question);
    m
}

/// The upstream's answer to `msg` (cached), with `q`'s id; `None` when no upstream answers.
async fn forward(shared: &Shared, q: &wire::Query, msg: &[u8]) -> Option<Vec<u8>> {
    let key = (q.name.clone(), q.qtype, q.qclass, q.edns.is_some());
    if let Some(r) = shared.cache.lock().expect("dns cache lock").get(&key, q.id) {
        if let Some(m) = &shared.metrics {
            m.cache_hits.inc();
        }
        return Some(r);
    }
    for up in &shared.upstreams {
        let started = Instant::now();
        let r = match ask_udp(*up, msg).await {
            Some(r) if r.len() > 2 && r[2] & 0x02 != 0 => ask_tcp(*up, msg).await,
            r => r,
        };
        let Some(mut r) = r else { continue };
        if r.len() < 12 || r[..2] != msg[..2] {
            continue;
        }
        if let Some(m) = &shared.metrics {
            m.upstream.observe(started.elapsed().as_secs_f64());
        }
        r[..2].copy_from_slice(&q.id.to_be_bytes());
        shared.cache.lock().expect("dns cache lock").put(key, &r);
        return Some(r);
    }
    None
}

async fn ask_udp(up: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).await.ok()?;
    s.connect(up).await.ok()?;
    s.send(msg).await.ok()?;
    let mut buf = vec![0u8; 65_535];
    let end = Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let left = end.checked_duration_since(Instant::now())?;
        let n = tokio::time::timeout(left, s.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        // Only the answer to this query (its id and a response): anything else is ignored.
        if n >= 12 && buf[..2] == msg[..2] && buf[2] & 0x80 != 0 {
            return Some(buf[..n].to_vec());
        }
    }
}

async fn ask_tcp(up: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let go = async {
        let mut s = TcpStream::connect(up).await.ok()?;
        s.write_u16(msg.len() as u16).await.ok()?;
        s.write_all(msg).await.ok()?;
        let len = usize::from(s.read_u16().await.ok()?);
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, go).await.ok()?
}

type CacheKey = (String, u16, u16, bool);

/// The forwarding cache: upstream answers by question, for their smallest TTL (at most
/// [`CACHE_MAX_TTL`]); TTLs are counted down when served. At most [`CACHE_ENTRIES`]
/// entries: when full, expired entries go, then the one expiring first.
#[derive(Default)]
struct Cache {
    map: HashMap<CacheKey, Cached>,
}

struct Cached {
    msg: Vec<u8>,
    stored: Instant,
    expires: Instant,
    /// Offsets of the TTL fields in `msg`, with their values.
    ttls: Vec<(usize, u32)>,
}

impl Cache {
    fn get(&mut self, key: &CacheKey, id: u16) -> Option<Vec<u8>> {
        let now = Instant::now();
        let e = self.map.get(key)?;
        if e.expires <= now {
            self.map.remove(key);
            return None;
        }
        let age = now.duration_since(e.stored).as_secs() as u32;
        let mut m = e.msg.clone();
        m[..2].copy_from_slice(&id.to_be_bytes());
        for (at, ttl) in &e.ttls {
            m[*at..*at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
        Some(m)
    }

    fn put(&mut self, key: CacheKey, msg: &[u8]) {
        // Only clean answers: NOERROR or NXDOMAIN, not truncated.
        let rc = msg[3] & 0x0f;
        if (rc != rcode::NOERROR && rc != rcode::NXDOMAIN) || msg[2] & 0x02 != 0 {
            return;
        }
        let Some(ttls) = wire::ttl_offsets(msg) else {
            return;
        };
        let min = ttls
            .iter()
            .map(|(_, t)| *t)
            .min()
            .unwrap_or(0)
            .min(CACHE_MAX_TTL);
        if min == 0 {
            return;
        }
        let now = Instant::now();
        if self.map.len() >= CACHE_ENTRIES {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= CACHE_ENTRIES
                && let Some(k) = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
            {
                self.map.remove(&k);
            }
        }
        self.map.insert(
            key,
            Cached {
                msg: msg.to_vec(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(min)),
                ttls,
            },
        );
    }
}

/// Whether a question type is one the cache and index treat normally (for metrics later).
#[must_use]
pub fn known_type(qt: u16) -> bool {
    matches!(
        qt,
        qtype::A | qtype::AAAA | qtype::SRV | qtype::PTR | qtype::TXT | qtype::CNAME | qtype::SOA
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `web.d.svc.cluster.local` A.
    fn query() -> Vec<u8> {
        let mut m = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["web", "d", "svc", "cluster", "local"] {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    #[test]
    fn before_the_first_sync_everything_is_servfail_then_the_index_answers() {
        let shared = Shared::new(Vec::new(), None);
        let Reply::Now(r, _) = respond_local(&query(), &shared, false) else {
            panic!("answered at once")
        };
        assert_eq!(
            r[3] & 0x0f,
            rcode::SERVFAIL,
            "never NXDOMAIN before the first sync"
        );
        shared.set(Arc::new(Index::empty(&lb_model::dns::Config::default(), 1)));
        let Reply::Now(r, _) = respond_local(&query(), &shared, false) else {
            panic!("answered at once")
        };
        assert_eq!(r[3] & 0x0f, rcode::NXDOMAIN);
    }

    #[test]
    fn the_cache_counts_ttls_down_and_keeps_the_id() {
        let mut c = Cache::default();
        // An answer: web.d... A 198.18.0.1 TTL 30.
        let mut m = query();
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 198, 18, 0, 1]);
        let key = ("web.d.svc.cluster.local".to_owned(), 1, 1, false);
        c.put(key.clone(), &m);
        let r = c.get(&key, 0x4242).expect("cached");
        assert_eq!(r[..2], [0x42, 0x42]);
        assert_eq!(r[r.len() - 10..r.len() - 6], 30u32.to_be_bytes());
        c.map.get_mut(&key).expect("entry").stored -= Duration::from_secs(10);
        let r = c.get(&key, 1).expect("cached");
        assert_eq!(r[r.len() - 10..r.len() - 6], 20u32.to_be_bytes());
    }

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let t = "# comment\nsearch example\nnameserver 198.18.0.53\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\noptions ndots:5\n";
        let v = resolv_conf_nameservers(t);
        assert_eq!(
            v,
            vec![
                "198.18.0.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
