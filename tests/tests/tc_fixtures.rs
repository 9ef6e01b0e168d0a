//! Packet fixtures for the packet path (`tc_nodeport_ingress` / `tc_nodeport_egress`, and the
//! XDP fast path `xdp_nodeport`) through
//! `BPF_PROG_TEST_RUN`: a table of {description, input packet, expected verdict, expected
//! output}, as Katran's fixture tables. Packets are built with etherparse; every output's
//! checksums are recomputed independently and must match.
//!
//! The program runs in a network namespace of its own (for `bpf_fib_lookup`): `fx0`
//! 198.18.100.11/24 (02:00:00:00:00:11) with permanent neighbours for the client
//! 198.18.100.2 (…:02) and the next node 198.18.100.12 (…:12), which routes 198.18.2.0/24.
use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use lb_common::{
    BE_FLAG_LOCAL, Backend4, Backend6, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL,
    SRCR4_FRONTEND_BITS, SVC_FLAG_NO_LOCAL, SVC_FLAG_SRC_RANGES, SrcRange4, Svc4Key, Svc6Key,
    SvcValue,
};
use lb_tests::{Netns, require_privileges, sh};

const TC_NEXT: u32 = u32::MAX; // -1
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x02];
const NEXT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x12];
const NODE: [u8; 4] = [198, 18, 100, 11];
const CLIENT: [u8; 4] = [198, 18, 100, 2];
const REMOTE_POD: [u8; 4] = [198, 18, 2, 10];
const NODE6: &str = "2001:db8:100::11";
const CLIENT6: &str = "2001:db8:100::2";
const REMOTE_POD6: &str = "2001:db8:2::10";

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().expect("v6").octets()
}

/// The program loaded in a fixture namespace, with the maps it uses.
struct Bed {
    ebpf: Ebpf,
    ifindex: u32,
    _netns: Netns,
}

impl Bed {
    fn new(tag: &str) -> Self {
        require_privileges();
        let ns = Netns::new(&format!("lbfx-{tag}-{}", std::process::id()));
        sh(&format!(
            "ip -n {n} link add fx0 address 02:00:00:00:00:11 type veth peer name fx1 && \
             ip -n {n} link set fx0 up && ip -n {n} link set fx1 up && \
             ip -n {n} addr add 198.18.100.11/24 dev fx0 && \
             ip -n {n} addr add {NODE6}/64 dev fx0 nodad && \
             ip -n {n} neigh add 198.18.100.2 lladdr 02:00:00:00:00:02 dev fx0 nud permanent && \
             ip -n {n} neigh add 198.18.100.12 lladdr 02:00:00:00:00:12 dev fx0 nud permanent && \
             ip -n {n} neigh add {CLIENT6} lladdr 02:00:00:00:00:02 dev fx0 nud permanent && \
             ip -n {n} neigh add 2001:db8:100::12 lladdr 02:00:00:00:00:12 dev fx0 nud permanent && \
             ip -n {n} route add 198.18.2.0/24 via 198.18.100.12 && \
             ip -n {n} -6 route add 2001:db8:2::/64 via 2001:db8:100::12 && \
             ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
            n = ns.name
        ));
        // The test thread enters the namespace: BPF_PROG_TEST_RUN runs in the caller's.
        let f = File::open(ns.path()).expect("open netns");
        // SAFETY: setns on this thread with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let ifindex = std::fs::read_to_string("/sys/class/net/fx0/ifindex")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                // /sys shows the namespace it was mounted in; ask the kernel instead.
                let name = std::ffi::CString::new("fx0").unwrap();
                // SAFETY: a NUL-terminated name.
                unsafe { libc::if_nametoindex(name.as_ptr()) }
            });
        assert!(ifindex > 0, "fx0 ifindex");
        let object = lb_userspace::loader::object();
        assert!(!object.is_empty(), "eBPF object not built");
        let mut ebpf = EbpfLoader::new().load(object).expect("load object");
        for name in ["tc_nodeport_ingress", "tc_nodeport_egress"] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program")
                .try_into()
                .expect("classifier");
            p.load()
                .unwrap_or_else(|e| panic!("verifier refused {name}: {e:?}"));
        }
        let x: &mut Xdp = ebpf
            .program_mut("xdp_nodeport")
            .expect("program")
            .try_into()
            .expect("xdp");
        x.load()
            .unwrap_or_else(|e| panic!("verifier refused xdp_nodeport: {e:?}"));
        Self {
            ebpf,
            ifindex,
            _netns: ns,
        }
    }

    fn svc4(
        &mut self,
        addr: [u8; 4],
        port: u16,
        proto: u8,
        flags: u16,
        backends: &[(u32, Backend4)],
    ) {
        let fe_id = 100 + u32::from(port);
        let mut be: HashMap<_, u32, Backend4> =
            HashMap::try_from(self.ebpf.map_mut("LB4_BE_V1").expect("map")).expect("hash");
        for (id, b) in backends {
            be.insert(id, b, 0).expect("backend");
        }
        let mut svc: HashMap<_, Svc4Key, SvcValue> =
            HashMap::try_from(self.ebpf.map_mut("LB4_SVC_V1").expect("map")).expect("hash");
        let key = |slot| Svc4Key {
            address: addr,
            dport: port,
            backend_slot: slot,
            proto,
            scope: SCOPE_EXTERNAL,
            _pad: [0; 2],
        };
        for (i, (id, _)) in backends.iter().enumerate() {
            let v = SvcValue {
                backend_id: *id,
                ..SvcValue::default()
            };
            svc.insert(key(i as u16 + 1), v, 0).expect("slot");
        }
        let fe = SvcValue {
            backend_id: fe_id,
            count: backends.len() as u16,
            flags,
            affinity_timeout: 0,
        };
        svc.insert(key(0), fe, 0).expect("frontend");
    }

    fn svc6(&mut self, addr: [u8; 16], port: u16, proto: u8, backends: &[(u32, Backend6)]) {
        let mut be: HashMap<_, u32, Backend6> =
            HashMap::try_from(self.ebpf.map_mut("LB6_BE_V1").expect("map")).expect("hash");
        for (id, b) in backends {
            be.insert(id, b, 0).expect("backend");
        }
        let mut svc: HashMap<_, Svc6Key, SvcValue> =
            HashMap::try_from(self.ebpf.map_mut("LB6_SVC_V1").expect("map")).expect("hash");
        let key = |slot| Svc6Key {
            address: addr,
            dport: port,
            backend_slot: slot,
            proto,
            scope: SCOPE_EXTERNAL,
            _pad: [0; 2],
        };
        for (i, (id, _)) in backends.iter().enumerate() {
            let v = SvcValue {
                backend_id: *id,
                ..SvcValue::default()
            };
            svc.insert(key(i as u16 + 1), v, 0).expect("slot");
        }
        let fe = SvcValue {
            backend_id: 200 + u32::from(port),
            count: backends.len() as u16,
            flags: 0,
            affinity_timeout: 0,
        };
        svc.insert(key(0), fe, 0).expect("frontend");
    }

    fn allow4(&mut self, fe: [u8; 4], port: u16, proto: u8, net: [u8; 4], prefix: u32) {
        let mut t: LpmTrie<_, SrcRange4, u8> =
            LpmTrie::try_from(self.ebpf.map_mut("LB4_SRCR_V1").expect("map")).expect("lpm");
        let k = LpmKey::new(
            SRCR4_FRONTEND_BITS + prefix,
            SrcRange4 {
                frontend: fe,
                port_be: port.to_be_bytes(),
                proto,
                _pad: 0,
                client: net,
            },
        );
        t.insert(&k, 1, 0).expect("range");
    }

    /// LB IP 198.18.200.10:80/TCP → `backend`, open only to 203.0.113.0/24 (so not to
    /// [`CLIENT`]).
    fn lb_ip_open_to_test_net_3(&mut self, backend: Backend4) {
        self.svc4(
            [198, 18, 200, 10],
            80,
            IPPROTO_TCP,
            SVC_FLAG_SRC_RANGES,
            &[(1, backend)],
        );
        self.allow4([198, 18, 200, 10], 80, IPPROTO_TCP, [203, 0, 113, 0], 24);
    }

    /// Runs `prog` on `pkt` as received on fx0; (verdict, output packet).
    fn run(&mut self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let xdp = prog.starts_with("xdp");
        let ctx = if xdp {
            // struct xdp_md: data_end at 4 (must be the packet's length), ingress_ifindex at
            // 12 (24 bytes in all).
            let mut ctx = vec![0u8; 24];
            ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&self.ifindex.to_ne_bytes());
            ctx
        } else {
            // struct __sk_buff: ifindex at 40 (192 bytes in all); the kernel takes the device
            // from it.
            let mut ctx = vec![0u8; 192];
            ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
            ctx
        };
        let mut out = vec![0u8; pkt.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(pkt);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let p = self.ebpf.program_mut(prog).expect("program");
        let r = if xdp {
            <&mut Xdp>::try_from(p).expect("xdp").test_run(opts)
        } else {
            <&mut SchedClassifier>::try_from(p)
                .expect("classifier")
                .test_run(opts)
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

/// RFC 1071 sum of `data`, folded, not inverted.
fn sum(data: &[u8], init: u32) -> u32 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// Every checksum of an Ethernet/IP/{TCP,UDP,ICMP,ICMPv6} packet is right.
fn assert_checksums(pkt: &[u8], what: &str) {
    let h = PacketHeaders::from_ethernet_slice(pkt).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (l4, pseudo) = match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            let hl = ip.header_len();
            let ihdr = &pkt[14..14 + hl];
            assert_eq!(sum(ihdr, 0), 0xffff, "{what}: IPv4 header checksum");
            let l4 = &pkt[14 + hl..14 + usize::from(ip.total_len)];
            let mut ph = Vec::new();
            ph.extend_from_slice(&ip.source);
            ph.extend_from_slice(&ip.destination);
            ph.extend_from_slice(&[0, ip.protocol.0]);
            ph.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            (l4, if ip.protocol.0 == 1 { Vec::new() } else { ph })
        }
        Some(NetHeaders::Ipv6(ip, _)) => {
            let l4 = &pkt[54..54 + usize::from(ip.payload_length)];
            let mut ph = Vec::new();
            ph.extend_from_slice(&ip.source);
            ph.extend_from_slice(&ip.destination);
            ph.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, ip.next_header.0]);
            (l4, ph)
        }
        None => panic!("{what}: no IP header"),
    };
    if matches!(h.transport, Some(TransportHeader::Udp(ref u)) if u.checksum == 0) {
        return; // IPv4 UDP without checksum
    }
    assert_eq!(sum(l4, sum(&pseudo, 0)), 0xffff, "{what}: L4 checksum");
}

fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, b"").expect("build");
    v
}

fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, b"hello").expect("build");
    v
}

fn tcp6(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(v6(src), v6(dst), 64)
        .tcp(sport, dport, 1000, 64240)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, b"").expect("build");
    v
}

fn udp6(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(v6(src), v6(dst), 64)
        .udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, b"hello").expect("build");
    v
}

/// A check of a (checksum-verified) output packet.
type Check = Box<dyn Fn(&PacketHeaders<'_>, &[u8])>;

/// What a fixture expects of the output.
enum Expect {
    /// Verdict only; the packet must come out unchanged.
    Unchanged(u32),
    /// Verdict, and a check of the output.
    Out(u32, Check),
}

struct Fixture {
    what: &'static str,
    prog: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn run_table(bed: &mut Bed, table: Vec<Fixture>) {
    for f in table {
        let (verdict, out) = bed.run(f.prog, &f.input);
        match f.expect {
            Expect::Unchanged(v) => {
                assert_eq!(verdict, v, "{}: verdict", f.what);
                assert_eq!(out, f.input, "{}: packet must be untouched", f.what);
            }
            Expect::Out(v, check) => {
                assert_eq!(verdict, v, "{}: verdict", f.what);
                assert_checksums(&out, f.what);
                let h = PacketHeaders::from_ethernet_slice(&out).expect("parse output");
                check(&h, &out);
            }
        }
    }
}

fn ip4(h: &PacketHeaders<'_>) -> ([u8; 4], [u8; 4]) {
    match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => (ip.source, ip.destination),
        _ => panic!("not IPv4"),
    }
}

fn ports(h: &PacketHeaders<'_>) -> (u16, u16) {
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => (t.source_port, t.destination_port),
        Some(TransportHeader::Udp(u)) => (u.source_port, u.destination_port),
        _ => panic!("no ports"),
    }
}

fn macs(out: &[u8]) -> ([u8; 6], [u8; 6]) {
    (
        out[..6].try_into().expect("dst mac"),
        out[6..12].try_into().expect("src mac"),
    )
}

#[test]
#[expect(clippy::too_many_lines, reason = "the fixture table is the test")]
fn ipv4_fixtures() {
    let mut bed = Bed::new("v4");
    let remote = Backend4 {
        address: REMOTE_POD,
        port: 8080,
        proto: IPPROTO_TCP,
        flags: 0,
    };
    let local = Backend4 {
        address: [198, 18, 100, 50],
        port: 8080,
        proto: IPPROTO_TCP,
        flags: BE_FLAG_LOCAL,
    };
    bed.svc4(NODE, 30080, IPPROTO_TCP, 0, &[(1, remote)]);
    bed.svc4(NODE, 30081, IPPROTO_TCP, 0, &[(2, local)]);
    bed.svc4(NODE, 30082, IPPROTO_UDP, 0, &[]);
    bed.svc4(NODE, 30083, IPPROTO_TCP, SVC_FLAG_NO_LOCAL, &[]);
    bed.svc4(NODE, 30085, IPPROTO_TCP, 0, &[]);
    bed.lb_ip_open_to_test_net_3(remote);
    let syn = tcp4(CLIENT, 40000, NODE, 30080, true);
    // Complete IP header, TCP header cut after 2 bytes (BPF_PROG_TEST_RUN itself refuses a
    // cut IP header).
    let mut truncated = syn.clone();
    truncated.truncate(14 + 20 + 2);
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x43;
    let mut fragment = udp4(CLIENT, 40001, NODE, 30082);
    fragment[20] = 0x20; // more fragments
    let nat = std::rc::Rc::new(std::cell::Cell::new(0u16));
    let (nat1, nat2) = (nat.clone(), nat.clone());
    let table = vec![
        Fixture {
            what: "SYN to a NodePort with a remote backend: DNAT + SNAT, redirected to the next hop",
            prog: "tc_nodeport_ingress",
            input: syn.clone(),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(move |h, out| {
                    assert_eq!(ip4(h), (NODE, REMOTE_POD));
                    let (sport, dport) = ports(h);
                    assert!(
                        (lb_common::NAT_PORT_MIN..=lb_common::NAT_PORT_MAX).contains(&sport),
                        "NAT port {sport}"
                    );
                    nat1.set(sport);
                    assert_eq!(dport, 8080);
                    assert_eq!(macs(out), (NEXT_MAC, NODE_MAC));
                }),
            ),
        },
        Fixture {
            what: "the same flow's next packet: same backend, same NAT port (conntrack)",
            prog: "tc_nodeport_ingress",
            input: tcp4(CLIENT, 40000, NODE, 30080, false),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(move |h, _| {
                    assert_eq!(ip4(h), (NODE, REMOTE_POD));
                    assert_eq!(ports(h), (nat2.get(), 8080), "the flow's NAT port again");
                }),
            ),
        },
        Fixture {
            what: "SYN to a NodePort with a local backend: DNAT only, client address kept",
            prog: "tc_nodeport_ingress",
            input: tcp4(CLIENT, 40002, NODE, 30081, true),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, _| {
                    assert_eq!(ip4(h), (CLIENT, [198, 18, 100, 50]));
                    assert_eq!(ports(h), (40002, 8080));
                }),
            ),
        },
        Fixture {
            what: "the local backend's reply on egress: source back to the NodePort",
            prog: "tc_nodeport_egress",
            input: tcp4([198, 18, 100, 50], 8080, CLIENT, 40002, false),
            expect: Expect::Out(
                TC_NEXT,
                Box::new(|h, _| {
                    assert_eq!(ip4(h), (NODE, CLIENT));
                    assert_eq!(ports(h), (30081, 40002));
                }),
            ),
        },
        Fixture {
            what: "UDP to a NodePort without endpoints: ICMP port unreachable back to the client",
            prog: "tc_nodeport_ingress",
            input: udp4(CLIENT, 40003, NODE, 30082),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, out| {
                    assert_eq!(ip4(h), (NODE, CLIENT));
                    assert_eq!(macs(out), (CLIENT_MAC, NODE_MAC));
                    assert!(
                        matches!(h.transport, Some(TransportHeader::Icmpv4(_))),
                        "not ICMP"
                    );
                    assert_eq!((out[34], out[35]), (3, 3), "destination/port unreachable");
                    // The quote is the client's packet as sent.
                    let quote = &out[14 + 20 + 8..];
                    assert_eq!(&quote[12..16], &CLIENT);
                    assert_eq!(&quote[16..20], &NODE);
                    assert_eq!(&quote[20..22], &40003u16.to_be_bytes());
                }),
            ),
        },
        Fixture {
            what: "TCP SYN to a NodePort without endpoints: ICMP quoting the whole TCP header",
            prog: "tc_nodeport_ingress",
            input: tcp4(CLIENT, 40008, NODE, 30085, true),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, out| {
                    assert_eq!(ip4(h), (NODE, CLIENT));
                    assert_eq!(
                        out.len(),
                        14 + 20 + 8 + 40,
                        "IP + 20-byte TCP header quoted"
                    );
                    assert_eq!((out[34], out[35]), (3, 3));
                    assert_eq!(&out[42 + 20..42 + 22], &40008u16.to_be_bytes());
                }),
            ),
        },
        Fixture {
            what: "Local policy, endpoints elsewhere: dropped",
            prog: "tc_nodeport_ingress",
            input: tcp4(CLIENT, 40004, NODE, 30083, true),
            expect: Expect::Unchanged(TC_ACT_SHOT),
        },
        Fixture {
            what: "LB IP, client outside loadBalancerSourceRanges: dropped",
            prog: "tc_nodeport_ingress",
            input: tcp4(CLIENT, 40005, [198, 18, 200, 10], 80, true),
            expect: Expect::Unchanged(TC_ACT_SHOT),
        },
        Fixture {
            what: "LB IP, client inside loadBalancerSourceRanges: translated",
            prog: "tc_nodeport_ingress",
            input: tcp4([203, 0, 113, 7], 40006, [198, 18, 200, 10], 80, true),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, _| assert_eq!(ip4(h).1, REMOTE_POD)),
            ),
        },
        Fixture {
            what: "not a frontend port: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: tcp4(CLIENT, 40007, NODE, 22, true),
            expect: Expect::Unchanged(TC_NEXT),
        },
        Fixture {
            what: "truncated TCP header: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: truncated,
            expect: Expect::Unchanged(TC_NEXT),
        },
        Fixture {
            what: "IHL below 5: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: bad_ihl,
            expect: Expect::Unchanged(TC_NEXT),
        },
        Fixture {
            what: "fragment: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: fragment,
            expect: Expect::Unchanged(TC_NEXT),
        },
        Fixture {
            what: "ARP: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: {
                let mut a = vec![0xff; 6];
                a.extend_from_slice(&CLIENT_MAC);
                a.extend_from_slice(&[0x08, 0x06]);
                a.extend_from_slice(&[0u8; 28]);
                a
            },
            expect: Expect::Unchanged(TC_NEXT),
        },
    ];
    run_table(&mut bed, table);

    // ICMP errors about the SNATed flow of the first fixture, from its backend.
    let nat_port = nat.get();
    let quote = |src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(NODE_MAC, NEXT_MAC)
            .ipv4(src, dst, 63)
            .tcp(sport, dport, 1000, 64240)
            .syn()
            .write(&mut v, b"")
            .expect("build quote");
        v[14..14 + 28].to_vec()
    };
    let icmp = |from: [u8; 4], to: [u8; 4], code: u8, quoted: &[u8]| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(NEXT_MAC, NODE_MAC)
            .ipv4(from, to, 64)
            .icmpv4_raw(3, code, [0; 4])
            .write(&mut v, quoted)
            .expect("build icmp");
        v
    };
    let table = vec![
        Fixture {
            what: "port unreachable from the backend about the SNATed flow: back to the client, \
                   outer and quoted headers translated",
            prog: "tc_nodeport_ingress",
            input: icmp(
                REMOTE_POD,
                NODE,
                3,
                &quote(NODE, nat_port, REMOTE_POD, 8080),
            ),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, out| {
                    assert_eq!(ip4(h), (NODE, CLIENT), "from the frontend to the client");
                    assert_eq!(macs(out), (CLIENT_MAC, NODE_MAC));
                    let q = &out[42..];
                    assert_eq!(sum(&q[..20], 0), 0xffff, "quoted IPv4 header checksum");
                    assert_eq!(&q[12..16], &CLIENT, "quoted source: the client");
                    assert_eq!(&q[16..20], &NODE, "quoted destination: the NodePort");
                    assert_eq!(&q[20..22], &40000u16.to_be_bytes());
                    assert_eq!(&q[22..24], &30080u16.to_be_bytes());
                }),
            ),
        },
        Fixture {
            what: "frag-needed from a router about the SNATed flow: translated likewise, router \
                   source kept",
            prog: "tc_nodeport_ingress",
            input: icmp(
                [198, 18, 100, 1],
                NODE,
                4,
                &quote(NODE, nat_port, REMOTE_POD, 8080),
            ),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, out| {
                    assert_eq!(ip4(h), ([198, 18, 100, 1], CLIENT));
                    assert_eq!(&out[42 + 12..42 + 16], &CLIENT);
                }),
            ),
        },
        Fixture {
            what: "ICMP about a flow nobody translated: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: icmp(REMOTE_POD, NODE, 3, &quote(NODE, 9, REMOTE_POD, 8080)),
            expect: Expect::Unchanged(TC_NEXT),
        },
    ];
    run_table(&mut bed, table);
}

#[test]
fn ipv6_fixtures() {
    let mut bed = Bed::new("v6");
    let remote = Backend6 {
        address: v6(REMOTE_POD6),
        port: 8080,
        proto: IPPROTO_TCP,
        flags: 0,
    };
    bed.svc6(v6(NODE6), 30080, IPPROTO_TCP, &[(1, remote)]);
    bed.svc6(v6(NODE6), 30082, IPPROTO_UDP, &[]);
    let mut truncated = tcp6(CLIENT6, 40000, NODE6, 30080);
    truncated.truncate(14 + 40 + 2);
    let table = vec![
        Fixture {
            what: "IPv6 SYN to a NodePort with a remote backend: DNAT + SNAT",
            prog: "tc_nodeport_ingress",
            input: tcp6(CLIENT6, 40000, NODE6, 30080),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, out| {
                    match &h.net {
                        Some(NetHeaders::Ipv6(ip, _)) => {
                            assert_eq!(ip.source, v6(NODE6));
                            assert_eq!(ip.destination, v6(REMOTE_POD6));
                        }
                        _ => panic!("not IPv6"),
                    }
                    assert_eq!(ports(h).1, 8080);
                    assert_eq!(macs(out), (NEXT_MAC, NODE_MAC));
                }),
            ),
        },
        Fixture {
            what: "IPv6 UDP without endpoints: ICMPv6 port unreachable",
            prog: "tc_nodeport_ingress",
            input: udp6(CLIENT6, 40001, NODE6, 30082),
            expect: Expect::Out(
                TC_ACT_REDIRECT,
                Box::new(|h, out| {
                    match &h.net {
                        Some(NetHeaders::Ipv6(ip, _)) => {
                            assert_eq!(ip.source, v6(NODE6));
                            assert_eq!(ip.destination, v6(CLIENT6));
                        }
                        _ => panic!("not IPv6"),
                    }
                    assert!(
                        matches!(h.transport, Some(TransportHeader::Icmpv6(_))),
                        "not ICMPv6"
                    );
                    assert_eq!((out[54], out[55]), (1, 4), "destination/port unreachable");
                }),
            ),
        },
        Fixture {
            what: "truncated IPv6 TCP header: passed on untouched",
            prog: "tc_nodeport_ingress",
            input: truncated,
            expect: Expect::Unchanged(TC_NEXT),
        },
    ];
    run_table(&mut bed, table);
    let _ = Ipv4Addr::LOCALHOST;
}

/// The XDP fast path: flows to a backend on another node are translated and sent back out
/// (`XDP_TX`) in both directions, with the conntrack entries the tc path reads (a tc fixture
/// continues an XDP flow); certain drops happen in XDP; everything else passes on untouched.
#[test]
#[expect(clippy::too_many_lines, reason = "the fixture table is the test")]
fn xdp_fixtures() {
    let mut bed = Bed::new("xdp");
    let remote = Backend4 {
        address: REMOTE_POD,
        port: 8080,
        proto: IPPROTO_TCP,
        flags: 0,
    };
    let remote_udp = Backend4 {
        proto: IPPROTO_UDP,
        port: 5353,
        ..remote
    };
    let local = Backend4 {
        address: [198, 18, 100, 50],
        port: 8080,
        proto: IPPROTO_TCP,
        flags: BE_FLAG_LOCAL,
    };
    bed.svc4(NODE, 30080, IPPROTO_TCP, 0, &[(1, remote)]);
    bed.svc4(NODE, 30081, IPPROTO_TCP, 0, &[(2, local)]);
    bed.svc4(NODE, 30082, IPPROTO_UDP, 0, &[]);
    bed.svc4(NODE, 30083, IPPROTO_TCP, SVC_FLAG_NO_LOCAL, &[]);
    bed.svc4(NODE, 30084, IPPROTO_UDP, 0, &[(3, remote_udp)]);
    bed.lb_ip_open_to_test_net_3(remote);

    // New flow: SNAT + DNAT, back out of fx0 to the next hop.
    let (v, out) = bed.run("xdp_nodeport", &tcp4(CLIENT, 40000, NODE, 30080, true));
    assert_eq!(v, XDP_TX, "SYN to a remote backend");
    assert_checksums(&out, "xdp SYN");
    let h = PacketHeaders::from_ethernet_slice(&out).expect("parse");
    assert_eq!(ip4(&h), (NODE, REMOTE_POD));
    let (nat_port, dport) = ports(&h);
    assert!((lb_common::NAT_PORT_MIN..=lb_common::NAT_PORT_MAX).contains(&nat_port));
    assert_eq!(dport, 8080);
    assert_eq!(macs(&out), (NEXT_MAC, NODE_MAC));
    // The next packet, by XDP and by tc: the same NAT port (shared conntrack).
    for prog in ["xdp_nodeport", "tc_nodeport_ingress"] {
        let (v, out) = bed.run(prog, &tcp4(CLIENT, 40000, NODE, 30080, false));
        assert!(v == XDP_TX || v == TC_ACT_REDIRECT, "{prog}: verdict {v}");
        assert_checksums(&out, prog);
        let h = PacketHeaders::from_ethernet_slice(&out).expect("parse");
        assert_eq!(
            (ip4(&h), ports(&h)),
            ((NODE, REMOTE_POD), (nat_port, 8080)),
            "{prog}"
        );
    }
    // The backend's reply to the NAT port: back to the client from the NodePort.
    let (v, out) = bed.run(
        "xdp_nodeport",
        &tcp4(REMOTE_POD, 8080, NODE, nat_port, false),
    );
    assert_eq!(v, XDP_TX, "reply");
    assert_checksums(&out, "xdp reply");
    let h = PacketHeaders::from_ethernet_slice(&out).expect("parse");
    assert_eq!((ip4(&h), ports(&h)), ((NODE, CLIENT), (30080, 40000)));
    assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));

    // UDP, with and without a checksum (IPv4 UDP may carry none: it stays none).
    let (v, out) = bed.run("xdp_nodeport", &udp4(CLIENT, 40010, NODE, 30084));
    assert_eq!(v, XDP_TX, "UDP to a remote backend");
    assert_checksums(&out, "xdp UDP");
    let mut no_csum = udp4(CLIENT, 40011, NODE, 30084);
    no_csum[40..42].copy_from_slice(&[0, 0]);
    let (v, out) = bed.run("xdp_nodeport", &no_csum);
    assert_eq!(v, XDP_TX, "UDP without checksum");
    assert_eq!(&out[40..42], &[0, 0], "no checksum stays none");
    let h = PacketHeaders::from_ethernet_slice(&out).expect("parse");
    assert_eq!(ip4(&h), (NODE, REMOTE_POD));
    assert_checksums(&out, "xdp UDP without checksum");

    let syn = tcp4(CLIENT, 40020, NODE, 30080, true);
    let mut truncated = syn.clone();
    truncated.truncate(14 + 20 + 2);
    let mut options = syn.clone();
    options[14] = 0x46;
    let mut fragment = udp4(CLIENT, 40021, NODE, 30084);
    fragment[20] = 0x20;
    let icmp = {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv4(CLIENT, NODE, 64)
            .icmpv4_echo_request(1, 1);
        let mut v = Vec::new();
        b.write(&mut v, b"ping").expect("build");
        v
    };
    let x = "xdp_nodeport";
    let table = vec![
        Fixture {
            what: "XDP: local backend: to tc untouched",
            prog: x,
            input: tcp4(CLIENT, 40030, NODE, 30081, true),
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: no endpoints: to tc (which sends the ICMP unreachable)",
            prog: x,
            input: udp4(CLIENT, 40031, NODE, 30082),
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: Local policy without a local endpoint: dropped",
            prog: x,
            input: tcp4(CLIENT, 40032, NODE, 30083, true),
            expect: Expect::Unchanged(XDP_DROP),
        },
        Fixture {
            what: "XDP: client outside loadBalancerSourceRanges: dropped",
            prog: x,
            input: tcp4(CLIENT, 40033, [198, 18, 200, 10], 80, true),
            expect: Expect::Unchanged(XDP_DROP),
        },
        Fixture {
            what: "XDP: not a frontend: untouched",
            prog: x,
            input: tcp4(CLIENT, 40034, NODE, 9999, true),
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: IP options: to tc untouched",
            prog: x,
            input: options,
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: fragment: to tc untouched",
            prog: x,
            input: fragment,
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: truncated TCP header: untouched",
            prog: x,
            input: truncated,
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: ICMP: to tc (error translation) untouched",
            prog: x,
            input: icmp,
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: IPv6: to tc untouched",
            prog: x,
            input: tcp6(CLIENT6, 40035, NODE6, 30080),
            expect: Expect::Unchanged(XDP_PASS),
        },
        Fixture {
            what: "XDP: ARP: untouched",
            prog: x,
            input: {
                let mut a = vec![0xff; 6];
                a.extend_from_slice(&CLIENT_MAC);
                a.extend_from_slice(&[0x08, 0x06]);
                a.extend_from_slice(&[0u8; 28]);
                a
            },
            expect: Expect::Unchanged(XDP_PASS),
        },
    ];
    run_table(&mut bed, table);
}

/// The datapath counters, summed over CPUs, by name.
fn stats(bed: &Bed) -> std::collections::BTreeMap<&'static str, u64> {
    let map: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(bed.ebpf.map(lb_common::MAP_STATS).expect("stats map"))
            .expect("per-CPU array");
    lb_common::Stat::ALL
        .iter()
        .map(|s| {
            let v = map.get(&(*s as u32), 0).expect("counter");
            (s.name(), v.iter().sum())
        })
        .collect()
}

/// Every drop is counted once, under the program that dropped it and its reason: no counter
/// for a verdict that did not happen (a REJECT that could not be built is a drop), none twice.
#[test]
fn every_drop_is_counted_once_under_its_program_and_reason() {
    let mut bed = Bed::new("fxcnt");
    let remote = Backend4 {
        address: REMOTE_POD,
        port: 8080,
        proto: IPPROTO_TCP,
        flags: 0,
    };
    bed.svc4(NODE, 30082, IPPROTO_UDP, 0, &[]);
    bed.svc4(NODE, 30083, IPPROTO_TCP, SVC_FLAG_NO_LOCAL, &[]);
    bed.lb_ip_open_to_test_net_3(remote);
    // An IPv4 header with one option word (IHL 6): the ICMP unreachable is not built for it.
    let with_options = {
        let p = udp4(CLIENT, 40100, NODE, 30082);
        let mut v = p[..14].to_vec();
        let mut ip = p[14..34].to_vec();
        ip[0] = 0x46;
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        ip.extend_from_slice(&[1, 1, 1, 0]); // NOP, NOP, NOP, end of options
        let c = !(sum(&ip, 0) as u16);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        v.extend_from_slice(&ip);
        v.extend_from_slice(&p[34..]);
        v
    };
    let cases: [(&str, &str, Vec<u8>, u32, &str); 6] = [
        (
            "tc: no endpoints: ICMP unreachable sent",
            "tc_nodeport_ingress",
            udp4(CLIENT, 40101, NODE, 30082),
            TC_ACT_REDIRECT,
            "tc_reject_no_backend",
        ),
        (
            "tc: no endpoints, IP options: no ICMP can be built, dropped",
            "tc_nodeport_ingress",
            with_options,
            TC_ACT_SHOT,
            "tc_reject_dropped",
        ),
        (
            "tc: Local policy without a local endpoint",
            "tc_nodeport_ingress",
            tcp4(CLIENT, 40102, NODE, 30083, true),
            TC_ACT_SHOT,
            "tc_drop_no_local",
        ),
        (
            "tc: client outside loadBalancerSourceRanges",
            "tc_nodeport_ingress",
            tcp4(CLIENT, 40103, [198, 18, 200, 10], 80, true),
            TC_ACT_SHOT,
            "tc_drop_source_range",
        ),
        (
            "XDP: Local policy without a local endpoint",
            "xdp_nodeport",
            tcp4(CLIENT, 40104, NODE, 30083, true),
            XDP_DROP,
            "xdp_drop_no_local",
        ),
        (
            "XDP: client outside loadBalancerSourceRanges",
            "xdp_nodeport",
            tcp4(CLIENT, 40105, [198, 18, 200, 10], 80, true),
            XDP_DROP,
            "xdp_drop_source_range",
        ),
    ];
    for (what, prog, pkt, verdict, counter) in cases {
        let before = stats(&bed);
        let (v, _) = bed.run(prog, &pkt);
        assert_eq!(v, verdict, "{what}: verdict");
        let after = stats(&bed);
        let grew: Vec<(&str, u64)> = after
            .iter()
            .filter(|(k, v)| **v != before[*k])
            .map(|(k, v)| (*k, v - before[k]))
            .collect();
        assert_eq!(grew, vec![(counter, 1)], "{what}: counters that moved");
    }
}
