//! `lbt`: the traffic helper the privileged tests and the demo run inside test namespaces.
//!
//! * `lbt serve NAME tcp|udp ADDR` — a backend: answers every TCP connection / UDP datagram with
//!   `NAME PEER` where PEER is the client address it saw.
//! * `lbt tcp ADDR N` — N × (connect, getpeername, send, read, close); one JSON line each.
//! * `lbt udp ADDR N` — unconnected: N × (sendto ADDR, recvfrom); prints the source seen.
//! * `lbt udpc ADDR N [SRCPORT]` — connected UDP (from SRCPORT when given): connect, then
//!   N × (send, recv, getpeername).
//! * `lbt uloop ADDR MILLIS` — connected UDP ping-pong as fast as possible for MILLIS ms (200 ms
//!   reply timeout); prints `{"ok":n,"failed":m}`.
//! * `lbt load ADDR MILLIS THREADS` — THREADS closed-loop TCP clients (connect, request,
//!   response, abortive close) for MILLIS ms; prints `{"ok","failed","p50_us","p99_us",
//!   "errors"}`, the percentiles over every connection's connect time.
//! * `lbt http ADDR PATH` — one HTTP/1.1 GET; prints the raw response (exit 1 on no answer).
//! * `lbt loop ADDR MILLIS` — TCP connect+request+close as fast as possible for MILLIS ms;
//!   prints `{"ok":n,"failed":m,"errors":{...}}`.
//! * `lbt peers ADDR N` — long-lived TCP connections `asked` and `quiet`; N more connections
//!   through ADDR with a getpeername of `asked` at once and after each (a client logging its
//!   peer), then N more without; then getpeername of both. Prints `{"asked_during": [distinct peers],
//!   "asked","quiet","churn_failed"}`.
//!
//! * `lbt dnsserve ADDR IP` — a stand-in DNS server (UDP): every A question is answered with IP.
//! * `lbt dns ADDR NAME` — one A lookup over a connected UDP socket (1 s); prints
//!   `{"answer": ip}` or `{"error": ...}`.
//! * `lbt resolve NAME` — a stub resolver as glibc's: the `nameserver`, `search` and
//!   `options ndots:N` of the resolv.conf named by `$LBT_RESOLV_CONF` (kubelet's file for the
//!   pod); prints `{"name": the name that answered, "answer": ip, "tried": [...]}`. `lbt tcp`
//!   takes `NAME:PORT` too and resolves it so.
//! * `lbt dnsloop ADDR NAME MILLIS` — A lookups back to back for MILLIS ms, each as a resolver
//!   does it: a fresh connected UDP socket per attempt, 300 ms per attempt, up to 5 attempts;
//!   prints `{"ok","failed","retried","answers":{ip: n}}`.
//!
//! Every outcome is printed as JSON (never a panic for network errors), so tests assert on
//! errno values such as ECONNREFUSED.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(2);

fn errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ETIMEDOUT | libc::EAGAIN) => "ETIMEDOUT".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(n) => format!("errno {n}"),
        // `connect_timeout` reports its own deadline without an errno.
        None if e.kind() == std::io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => e.to_string(),
    }
}

fn serve(name: &str, proto: &str, addr: SocketAddr) {
    match proto {
        "tcp" => {
            let l = TcpListener::bind(addr).expect("bind tcp");
            println!("ready");
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let name = name.to_owned();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(TIMEOUT));
                    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                    let mut buf = [0u8; 64];
                    if s.read(&mut buf).is_ok() {
                        let _ = s.write_all(format!("{name} {peer}\n").as_bytes());
                    }
                });
            }
        }
        "udp" => {
            let s = UdpSocket::bind(addr).expect("bind udp");
            println!("ready");
            let mut buf = [0u8; 64];
            loop {
                if let Ok((_, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(format!("{name} {peer}\n").as_bytes(), peer);
                }
            }
        }
        _ => panic!("serve: protocol must be tcp or udp"),
    }
}

fn tcp_once(addr: SocketAddr) -> serde_json::Value {
    let started = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            return json!({"ok": false, "error": errno(&e), "ms": started.elapsed().as_secs_f64() * 1e3});
        }
    };
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|p| p.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let mut reply = String::new();
    let res = s
        .write_all(b"hi")
        .and_then(|()| s.read_to_string(&mut reply));
    match res {
        Ok(_) => json!({"ok": true, "peer": peer, "local": local, "reply": reply.trim()}),
        Err(e) => json!({"ok": false, "error": errno(&e), "peer": peer}),
    }
}

/// An ephemeral UDP socket of `addr`'s family with the read timeout set.
fn udp_client(addr: SocketAddr) -> UdpSocket {
    udp_client_from(addr, 0)
}

fn udp_client_from(addr: SocketAddr, port: u16) -> UdpSocket {
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    };
    let s = UdpSocket::bind(any).expect("bind");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s
}

fn udp_unconnected(addr: SocketAddr, n: usize) {
    let s = udp_client(addr);
    let mut buf = [0u8; 128];
    for _ in 0..n {
        if let Err(e) = s.send_to(b"hi", addr) {
            println!(
                "{}",
                json!({"ok": false, "error": errno(&e), "stage": "sendto"})
            );
            continue;
        }
        match s.recv_from(&mut buf) {
            Ok((len, from)) => {
                let reply = String::from_utf8_lossy(&buf[..len]).trim().to_owned();
                println!(
                    "{}",
                    json!({"ok": true, "from": from.to_string(), "reply": reply, "local": s.local_addr().unwrap().to_string()})
                );
            }
            Err(e) => println!(
                "{}",
                json!({"ok": false, "error": errno(&e), "stage": "recvfrom"})
            ),
        }
    }
}

fn udp_connected(addr: SocketAddr, n: usize, from: u16) {
    let s = udp_client_from(addr, from);
    if let Err(e) = s.connect(addr) {
        println!(
            "{}",
            json!({"ok": false, "error": errno(&e), "stage": "connect"})
        );
        return;
    }
    let mut buf = [0u8; 128];
    for _ in 0..n {
        let r = s.send(b"hi").and_then(|_| s.recv(&mut buf));
        match r {
            Ok(len) => {
                let reply = String::from_utf8_lossy(&buf[..len]).trim().to_owned();
                let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                println!("{}", json!({"ok": true, "peer": peer, "reply": reply}));
            }
            Err(e) => println!("{}", json!({"ok": false, "error": errno(&e)})),
        }
    }
}

fn udp_loop(addr: SocketAddr, millis: u64) {
    let s = udp_client(addr);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    if let Err(e) = s.connect(addr) {
        println!("{}", json!({"ok": 0, "failed": 1, "error": errno(&e)}));
        return;
    }
    let end = Instant::now() + Duration::from_millis(millis);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut buf = [0u8; 128];
    while Instant::now() < end {
        match s.send(b"hi").and_then(|_| s.recv(&mut buf)) {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    println!("{}", json!({"ok": ok, "failed": failed}));
}

/// SO_LINGER 0: closing sends an RST instead of a FIN.
fn abort(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own with a properly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn load(addr: SocketAddr, millis: u64, threads: usize) {
    let end = Instant::now() + Duration::from_millis(millis);
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            std::thread::spawn(move || {
                let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                let mut buf = [0u8; 64];
                while Instant::now() < end {
                    let t = Instant::now();
                    let r = TcpStream::connect_timeout(&addr, TIMEOUT).and_then(|mut s| {
                        let connected = t.elapsed();
                        s.set_read_timeout(Some(TIMEOUT))?;
                        s.write_all(b"hi")?;
                        // Until the reply's end of line, then an abortive close (RST): no
                        // TIME_WAIT on either end, so source-port reuse never meets an old
                        // connection's state and rounds measure the path alone.
                        loop {
                            let n = s.read(&mut buf)?;
                            if n == 0 || buf[..n].contains(&b'\n') {
                                break;
                            }
                        }
                        abort(&s);
                        Ok(connected)
                    });
                    match r {
                        Ok(d) => lat.push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
                        Err(e) => *errors.entry(errno(&e)).or_default() += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let (l, e) = w.join().expect("load thread");
        lat.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let failed: u64 = errors.values().sum();
    println!(
        "{}",
        json!({"ok": lat.len(), "failed": failed, "p50_us": pct(0.5), "p99_us": pct(0.99), "errors": errors})
    );
}

/// Connections in a closed loop for `millis`, at most `max` of them.
fn run_loop(addr: SocketAddr, millis: u64, max: u64) {
    let end = Instant::now() + Duration::from_millis(millis);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while Instant::now() < end && ok + failed < max {
        let v = tcp_once(addr);
        if v["ok"] == true {
            ok += 1;
        } else {
            failed += 1;
            *errors
                .entry(v["error"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
    }
    println!("{}", json!({"ok": ok, "failed": failed, "errors": errors}));
}

/// Peers of long-lived connections after `n` later ones (see the module doc).
fn peers(addr: SocketAddr, n: u64) {
    let peer = |s: &TcpStream| s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let connect = || TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    let mut churn_failed = 0;
    let mut churn = |k: u64| {
        for _ in 0..k {
            if tcp_once(addr)["ok"] != true {
                churn_failed += 1;
            }
        }
    };
    let asked = connect();
    let mut asked_during = std::collections::BTreeSet::from([peer(&asked)]);
    let quiet = connect();
    for _ in 0..n {
        churn(1);
        asked_during.insert(peer(&asked));
    }
    churn(n);
    println!(
        "{}",
        json!({"asked_during": asked_during, "asked": peer(&asked), "quiet": peer(&quiet),
               "churn_failed": churn_failed})
    );
}

/// A query message for `name` A, id `id`.
fn dns_query(name: &str, id: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// One attempt: the first A record's address of the answer, or an error.
fn dns_once(addr: SocketAddr, name: &str, id: u16, timeout: Duration) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| errno(&e))?;
    s.connect(addr).map_err(|e| errno(&e))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| errno(&e))?;
    s.send(&dns_query(name, id)).map_err(|e| errno(&e))?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).map_err(|e| errno(&e))?;
    let m = &buf[..n];
    if n < 12 || m[..2] != id.to_be_bytes() {
        return Err("bad answer".into());
    }
    match lb_model::dns::wire::answer_records(m) {
        Some((0, rrs)) => rrs
            .iter()
            .find_map(|r| match r.data {
                lb_model::dns::RData::A(a) => Some(a.to_string()),
                _ => None,
            })
            .ok_or_else(|| "no A record".to_owned()),
        Some((rc, _)) => Err(format!("rcode {rc}")),
        None => Err("unreadable answer".into()),
    }
}

/// glibc's order: a name with at least `ndots` dots is tried as is first, then with each
/// search domain; one with fewer, the search domains first. NXDOMAIN / no A record moves on.
fn resolve(name: &str) -> Result<(String, String, Vec<String>), String> {
    let path = std::env::var("LBT_RESOLV_CONF").unwrap_or_else(|_| "/etc/resolv.conf".into());
    let conf = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut server = None;
    let mut search: Vec<String> = Vec::new();
    let mut ndots = 1;
    for l in conf.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["nameserver", ip, ..] if server.is_none() => {
                server = ip
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53));
            }
            ["search", rest @ ..] => search = rest.iter().map(|s| (*s).to_owned()).collect(),
            ["options", opts @ ..] => {
                for o in opts {
                    if let Some(n) = o.strip_prefix("ndots:") {
                        ndots = n.parse().unwrap_or(1);
                    }
                }
            }
            _ => {}
        }
    }
    let server = server.ok_or("no nameserver")?;
    let bare = name.trim_end_matches('.').to_owned();
    let searched = search.iter().map(|d| format!("{bare}.{d}"));
    let candidates: Vec<String> = if name.ends_with('.') {
        vec![bare]
    } else if name.matches('.').count() >= ndots {
        std::iter::once(bare.clone()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(bare.clone())).collect()
    };
    let mut tried = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        tried.push(c.clone());
        if let Ok(ip) = dns_once(server, c, 100 + i as u16, Duration::from_secs(1)) {
            return Ok((c.clone(), ip, tried));
        }
    }
    Err(format!("no answer for {name} (tried {tried:?})"))
}

/// `HOST:PORT` → an address, resolving HOST when it is not an IP.
fn target(s: &str) -> SocketAddr {
    if let Ok(a) = s.parse() {
        return a;
    }
    let (host, port) = s.rsplit_once(':').expect("NAME:PORT");
    let (_, ip, _) = resolve(host).unwrap_or_else(|e| {
        println!("{}", json!({"ok": false, "error": e}));
        std::process::exit(0)
    });
    SocketAddr::new(ip.parse().expect("an IP"), port.parse().expect("a port"))
}

fn dns_serve(addr: SocketAddr, ip: std::net::Ipv4Addr) {
    use lb_model::dns::{Lookup, RData, Rr, qtype, wire};
    let s = UdpSocket::bind(addr).expect("bind udp");
    println!("ready");
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, peer)) = s.recv_from(&mut buf) else {
            continue;
        };
        let Ok(q) = wire::parse_query(&buf[..n]) else {
            continue;
        };
        let answers = if q.qtype == qtype::A {
            vec![Rr {
                owner: None,
                data: RData::A(ip),
            }]
        } else {
            Vec::new()
        };
        let l = Lookup::Answer {
            rcode: 0,
            answers,
            additional: Vec::new(),
            soa: None,
        };
        let _ = s.send_to(&wire::answer(&q, &l, 5, "", 512), peer);
    }
}

fn dns_loop(addr: SocketAddr, name: &str, millis: u64) {
    let end = Instant::now() + Duration::from_millis(millis);
    let (mut ok, mut failed, mut retried) = (0u64, 0u64, 0u64);
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut id: u16 = 0;
    while Instant::now() < end {
        let mut got = None;
        for attempt in 0..5 {
            id = id.wrapping_add(1);
            if let Ok(a) = dns_once(addr, name, id, Duration::from_millis(300)) {
                got = Some(a);
                if attempt > 0 {
                    retried += 1;
                }
                break;
            }
        }
        match got {
            Some(a) => {
                ok += 1;
                *answers.entry(a).or_default() += 1;
            }
            None => failed += 1,
        }
    }
    println!(
        "{}",
        json!({"ok": ok, "failed": failed, "retried": retried, "answers": answers})
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .expect("address argument")
            .parse()
            .expect("socket address")
    };
    let num = |i: usize| -> usize { args.get(i).map_or(1, |s| s.parse().expect("number")) };
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1], &args[2], addr(3)),
        Some("tcp") => {
            let to = target(&args[1]);
            for _ in 0..num(2) {
                println!("{}", tcp_once(to));
            }
        }
        Some("resolve") => match resolve(&args[1]) {
            Ok((name, answer, tried)) => {
                println!(
                    "{}",
                    json!({"name": name, "answer": answer, "tried": tried})
                );
            }
            Err(e) => println!("{}", json!({"error": e})),
        },
        Some("udp") => udp_unconnected(addr(1), num(2)),
        Some("udpc") => udp_connected(
            addr(1),
            num(2),
            args.get(3).map_or(0, |p| p.parse().expect("source port")),
        ),
        Some("dnsserve") => dns_serve(
            addr(1),
            args.get(2).expect("IP").parse().expect("IPv4 address"),
        ),
        Some("dns") => match dns_once(addr(1), &args[2], 7, Duration::from_secs(1)) {
            Ok(a) => println!("{}", json!({"answer": a})),
            Err(e) => println!("{}", json!({"error": e})),
        },
        Some("dnsloop") => dns_loop(addr(1), &args[2], num(3) as u64),
        Some("loop") => run_loop(
            addr(1),
            num(2) as u64,
            args.get(3).map_or(u64::MAX, |n| n.parse().expect("number")),
        ),
        Some("peers") => peers(addr(1), num(2) as u64),
        Some("uloop") => udp_loop(addr(1), num(2) as u64),
        Some("load") => load(addr(1), num(2) as u64, num(3)),
        Some("http") => {
            let mut s = TcpStream::connect_timeout(&addr(1), TIMEOUT).unwrap_or_else(|e| {
                eprintln!("{}", errno(&e));
                std::process::exit(1)
            });
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let path = args.get(2).map_or("/", String::as_str);
            let mut out = String::new();
            let r = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
                .and_then(|()| s.read_to_string(&mut out));
            if let Err(e) = r {
                eprintln!("{}", errno(&e));
                std::process::exit(1);
            }
            print!("{out}");
        }
        _ => {
            eprintln!(
                "usage: lbt serve NAME tcp|udp ADDR | tcp ADDR N | udp ADDR N | udpc ADDR N [SRCPORT] | loop ADDR MILLIS [MAX]"
            );
            std::process::exit(2);
        }
    }
}
