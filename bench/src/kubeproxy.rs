//! kube-proxy's own rule shapes, generated for the benchmark's comparison lanes: what
//! kube-proxy v1.33 writes for ClusterIP Services in iptables mode (`iptables-restore` input)
//! and in nftables mode (an `nft -f` script). Chain names are hashed exactly as
//! pkg/proxy/iptables/proxier.go (`KUBE-SVC-`/`KUBE-SEP-` + base32(sha256(…))[:16]) and
//! pkg/proxy/nftables/proxier.go (`service-`/`endpoint-` + base32(sha256(…))[:8] + name) do.
//!
//! ClusterIPs in both shapes; NodePorts (externalTrafficPolicy Cluster) in the iptables shape.
use std::{fmt::Write as _, net::Ipv4Addr};

use data_encoding::BASE32;
use sha2::{Digest as _, Sha256};

/// One Service port with its endpoints.
#[derive(Clone, Debug)]
pub struct SvcSpec {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// `tcp` or `udp`, as kube-proxy writes it.
    pub proto: &'static str,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// NodePort (iptables shape only: KUBE-NODEPORTS → KUBE-EXT → KUBE-SVC, externalTrafficPolicy
    /// Cluster).
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl SvcSpec {
    /// kube-proxy's `ServicePortName.String()`: `ns/name:port`.
    #[must_use]
    pub fn port_name_string(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

fn b32_sha256(s: &str) -> String {
    BASE32.encode(&Sha256::digest(s.as_bytes()))
}

/// `KUBE-SVC-…` for a Service port (protocol lower case, as kube-proxy passes it).
#[must_use]
pub fn svc_chain(port_name: &str, proto: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        &b32_sha256(&format!("{port_name}{proto}"))[..16]
    )
}

/// `KUBE-EXT-…` for a Service port's traffic from outside (NodePorts, external IPs).
#[must_use]
pub fn ext_chain(port_name: &str, proto: &str) -> String {
    format!(
        "KUBE-EXT-{}",
        &b32_sha256(&format!("{port_name}{proto}"))[..16]
    )
}

/// `KUBE-SEP-…` for one endpoint (`ip:port`) of a Service port.
#[must_use]
pub fn sep_chain(port_name: &str, proto: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        &b32_sha256(&format!("{port_name}{proto}{endpoint}"))[..16]
    )
}

/// nftables chain names: the readable base prefixed by 8 hash characters, at most 200 bytes.
fn nft_hashed(base: &str) -> String {
    let name = format!("{}-{base}", &b32_sha256(base)[..8]);
    if name.len() > 200 {
        format!("{}...", &name[..197])
    } else {
        name
    }
}

/// `service-…` chain of a Service port (nftables mode).
#[must_use]
pub fn nft_service_chain(s: &SvcSpec) -> String {
    format!(
        "service-{}",
        nft_hashed(&format!(
            "{}/{}/{}/{}",
            s.namespace, s.name, s.proto, s.port_name
        ))
    )
}

/// `endpoint-…` chain of one endpoint of a Service port (nftables mode).
#[must_use]
pub fn nft_endpoint_chain(s: &SvcSpec, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}",
        nft_hashed(&format!(
            "{}/{}/{}/{}__{}/{}",
            s.namespace, s.name, s.proto, s.port_name, ep.0, ep.1
        ))
    )
}

/// `iptables-restore` input for `svcs` in kube-proxy's iptables-mode shape: filter table
/// (KUBE-FORWARD's conntrack checks on every forwarded packet) and nat table (KUBE-SERVICES,
/// one rule per Service port in `svcs` order, then the NodePorts jump; KUBE-SVC with the
/// masquerade rule for traffic from outside `cluster_cidr` and the `statistic` cascade;
/// KUBE-SEP with the hairpin mark and the DNAT).
#[must_use]
pub fn iptables_restore(svcs: &[SvcSpec], cluster_cidr: &str) -> String {
    let mut r = String::with_capacity(svcs.len() * 1200 + 4096);
    r.push_str(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    r.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let chains: Vec<(String, Vec<String>)> = svcs
        .iter()
        .map(|s| {
            let pn = s.port_name_string();
            let seps = s
                .endpoints
                .iter()
                .map(|(ip, port)| sep_chain(&pn, s.proto, &format!("{ip}:{port}")))
                .collect();
            (svc_chain(&pn, s.proto), seps)
        })
        .collect();
    for (s, (svc, seps)) in svcs.iter().zip(&chains) {
        if s.node_port.is_some() {
            let _ = writeln!(r, ":{} - [0:0]", ext_chain(&s.port_name_string(), s.proto));
        }
        let _ = writeln!(r, ":{svc} - [0:0]");
        for sep in seps {
            let _ = writeln!(r, ":{sep} - [0:0]");
        }
    }
    r.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for (s, (svc, _)) in svcs.iter().zip(&chains) {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {} --dport {} -j {svc}",
            s.port_name_string(),
            s.vip,
            s.port,
            p = s.proto
        );
    }
    r.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for (s, (svc, seps)) in svcs.iter().zip(&chains) {
        let pn = s.port_name_string();
        let p = s.proto;
        if let Some(np) = s.node_port {
            let ext = ext_chain(&pn, p);
            let _ = writeln!(
                r,
                "-A KUBE-NODEPORTS -m comment --comment {pn} -m {p} -p {p} --dport {np} -j {ext}\n\
                 -A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ\n\
                 -A {ext} -j {svc}"
            );
        }
        let _ = writeln!(
            r,
            "-A {svc} -m comment --comment \"{pn} cluster IP\" -m {p} -p {p} -d {} --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
            s.vip, s.port
        );
        let n = seps.len();
        for (i, (sep, (ip, port))) in seps.iter().zip(&s.endpoints).enumerate() {
            if i + 1 < n {
                let _ = writeln!(
                    r,
                    "-A {svc} -m comment --comment \"{pn} -> {ip}:{port}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / (n - i) as f64
                );
            } else {
                let _ = writeln!(
                    r,
                    "-A {svc} -m comment --comment \"{pn} -> {ip}:{port}\" -j {sep}"
                );
            }
        }
        for (sep, (ip, port)) in seps.iter().zip(&s.endpoints) {
            let _ = writeln!(
                r,
                "-A {sep} -m comment --comment {pn} -s {ip}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment {pn} -m {p} -p {p} -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    r.push_str("COMMIT\n");
    r
}

/// An `nft -f` script for `svcs` in kube-proxy's nftables-mode shape: table `ip kube-proxy`,
/// the `service-ips` verdict map looked up once per packet in `services`, a chain per Service
/// port choosing an endpoint with `numgen random mod N vmap`, a chain per endpoint with the
/// hairpin mark and the DNAT.
#[must_use]
pub fn nft_script(svcs: &[SvcSpec], cluster_cidr: &str) -> String {
    let mut r = String::with_capacity(svcs.len() * 1500 + 4096);
    r.push_str(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         add chain ip kube-proxy services\n\
         add chain ip kube-proxy forward\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n\
         add rule ip kube-proxy filter-forward ct state new jump forward\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    for s in svcs {
        let chain = nft_service_chain(s);
        let _ = writeln!(r, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            r,
            "add rule ip kube-proxy {chain} ip daddr {} {} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
            s.vip, s.proto, s.port
        );
        let eps: Vec<String> = s
            .endpoints
            .iter()
            .map(|&ep| nft_endpoint_chain(s, ep))
            .collect();
        for (ep_chain, (ip, port)) in eps.iter().zip(&s.endpoints) {
            let _ = writeln!(
                r,
                "add chain ip kube-proxy {ep_chain}\n\
                 add rule ip kube-proxy {ep_chain} ip saddr {ip} jump mark-for-masquerade\n\
                 add rule ip kube-proxy {ep_chain} meta l4proto {p} dnat to {ip}:{port}",
                p = s.proto
            );
        }
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        let _ = writeln!(
            r,
            "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            vmap.join(" , ")
        );
        let _ = writeln!(
            r,
            "add element ip kube-proxy service-ips {{ {} . {} . {} : goto {chain} }}",
            s.vip, s.proto, s.port
        );
    }
    r
}

/// `n` Services × 4 endpoints (`198.18.20.10-13:8080`), VIPs from 198.19.0.0/16 in order.
#[must_use]
pub fn bench_services(n: usize) -> Vec<SvcSpec> {
    (0..n)
        .map(|i| SvcSpec {
            namespace: "bench".into(),
            name: format!("s{i}"),
            port_name: "http".into(),
            proto: "tcp",
            vip: Ipv4Addr::new(198, 19, (i / 250) as u8, (1 + i % 250) as u8),
            port: 80,
            node_port: None,
            endpoints: (0..4)
                .map(|e| (Ipv4Addr::new(198, 18, 20, 10 + e), 8080))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names kube-proxy's own tests expect (pkg/proxy/iptables/proxier_test.go:
    /// ns1/svc1:p80 → KUBE-SVC-XPGD46QRK7WJZT7O, endpoint 10.180.0.1:80 → KUBE-SEP-SXIVWICOYRO3J4NJ).
    #[test]
    fn chain_names_match_kube_proxy() {
        assert_eq!(
            svc_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    fn spec() -> SvcSpec {
        SvcSpec {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            proto: "tcp",
            vip: Ipv4Addr::new(198, 19, 0, 1),
            port: 80,
            node_port: None,
            endpoints: (0..4)
                .map(|i| (Ipv4Addr::new(198, 18, 20, 10 + i), 8080))
                .collect(),
        }
    }

    #[test]
    fn iptables_rules_have_kube_proxy_shape() {
        let r = iptables_restore(&[spec()], "198.18.0.0/15");
        assert!(r.contains(
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 198.19.0.1 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"
        ));
        // The random cascade: 1/4, 1/3, 1/2, then the last unconditionally.
        for p in ["0.25000000000", "0.33333333333", "0.50000000000"] {
            assert!(r.contains(&format!("--probability {p}")), "{p}");
        }
        assert_eq!(r.matches("-j DNAT --to-destination").count(), 4);
        assert_eq!(r.matches("COMMIT").count(), 2);
        // The NodePorts jump stays last in KUBE-SERVICES.
        let nodeports = r.find("-j KUBE-NODEPORTS").unwrap();
        assert!(r.rfind("-A KUBE-SERVICES").unwrap() <= nodeports);
    }

    #[test]
    fn node_ports_go_through_kube_ext() {
        let s = SvcSpec {
            proto: "udp",
            port: 53,
            node_port: Some(30053),
            ..spec()
        };
        let r = iptables_restore(&[s], "198.18.0.0/15");
        let ext = ext_chain("ns1/svc1:p80", "udp");
        assert!(r.contains(&format!(
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m udp -p udp --dport 30053 -j {ext}"
        )));
        assert!(r.contains(&format!("-A {ext} -j {}", svc_chain("ns1/svc1:p80", "udp"))));
        assert_eq!(r.matches("-m udp -p udp -j DNAT").count(), 4);
    }

    #[test]
    fn nft_script_has_kube_proxy_shape() {
        let s = spec();
        let r = nft_script(std::slice::from_ref(&s), "198.18.0.0/15");
        let chain = nft_service_chain(&s);
        assert!(
            chain.starts_with("service-") && chain.ends_with("-ns1/svc1/tcp/p80"),
            "{chain}"
        );
        assert!(r.contains(&format!(
            "add element ip kube-proxy service-ips {{ 198.19.0.1 . tcp . 80 : goto {chain} }}"
        )));
        assert!(r.contains("numgen random mod 4 vmap { 0 : goto endpoint-"));
        assert_eq!(r.matches("dnat to 198.18.20.").count(), 4);
    }
}
