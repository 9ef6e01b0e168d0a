//! `lb-agent`. See `lb_userspace` for the architecture.
use std::{process::ExitCode, time::Duration};

use clap::Parser as _;
use lb_userspace::{agent, cli, inspect, loader, model};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_owned())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Run(a) => {
            let opts = run_options(*a)?;
            if matches!(opts.source, agent::SourceOpt::Api { .. }) {
                agent::single_arena();
            }
            // Two workers: probes, health checks, watchers and signals stay answered while the
            // sync (its own blocking thread) programs the maps.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("lb-agent")
                .enable_all()
                .build()?
                .block_on(agent::run(opts))
                .map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))
        }
        cli::Command::Inspect(a) if matches!(a.what, cli::What::Conntrack) => {
            let flows = lb_userspace::conntrack::list(&a.bpffs)
                .map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))?;
            match a.output {
                cli::Output::Json => println!("{}", serde_json::to_string_pretty(&flows)?),
                cli::Output::Table => print!("{}", inspect::conntrack_table(&flows)),
            }
            Ok(())
        }
        cli::Command::Inspect(a) => {
            let r = inspect::report(&a.bpffs)
                .map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))?;
            match (a.output, a.what) {
                (cli::Output::Json, cli::What::Services) => {
                    println!("{}", serde_json::to_string_pretty(&r.services)?);
                }
                (cli::Output::Json, cli::What::Backends) => {
                    println!("{}", serde_json::to_string_pretty(&r.backends)?);
                }
                (cli::Output::Json, cli::What::Stats) => {
                    println!("{}", serde_json::to_string_pretty(&r.stats)?);
                }
                (cli::Output::Table, cli::What::Services) => {
                    print!("{}", inspect::services_table(&r));
                }
                (cli::Output::Table, cli::What::Backends) => {
                    print!("{}", inspect::backends_table(&r));
                }
                (cli::Output::Table, cli::What::Stats) => print!("{}", inspect::stats_table(&r)),
                (_, cli::What::Conntrack) => unreachable!("handled above"),
            }
            Ok(())
        }
        cli::Command::Get(a) => {
            let served = match &a.manifests {
                Some(dir) => lb_userspace::get::compute(
                    dir,
                    &a.standalone.state_file,
                    standalone_ranges(&a.standalone)?,
                    &a.node_name,
                ),
                None => lb_userspace::get::fetch(a.metrics_addr),
            }
            .map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))?;
            let ns = (!a.all_namespaces).then_some(a.namespace.as_str());
            print!(
                "{}",
                lb_userspace::get::render(
                    &served,
                    a.what,
                    ns,
                    a.output,
                    std::time::SystemTime::now()
                )?
            );
            Ok(())
        }
        cli::Command::Cleanup(a) => {
            let removed = loader::cleanup(&a.bpffs)
                .map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))?;
            let detached = match &a.cgroup {
                Some(cg) => loader::detach_leftovers(cg)
                    .map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))?,
                None => 0,
            };
            println!(
                "removed {} pins under {}; detached {detached} unpinned hooks",
                removed.len(),
                a.bpffs.display()
            );
            Ok(())
        }
    }
}

/// `--service-cidr`, `--service-node-port-range`, `--lb-ip-pool` → the control plane's ranges.
fn standalone_ranges(a: &cli::StandaloneArgs) -> anyhow::Result<lb_model::control::Ranges> {
    let mut r = lb_model::control::Ranges {
        node_ports: a.service_node_port_range,
        lb_pools: a.lb_ip_pool.clone(),
        ..lb_model::control::Ranges::default()
    };
    if !a.service_cidr.is_empty() {
        let v6s: Vec<bool> = a.service_cidr.iter().map(|c| c.addr.is_ipv6()).collect();
        if v6s.len() > 2 || (v6s.len() == 2 && v6s[0] == v6s[1]) {
            anyhow::bail!("--service-cidr: at most one CIDR per family");
        }
        r.service_cidrs.clone_from(&a.service_cidr);
        r.check_cluster_ips = true;
    }
    Ok(r)
}

/// `run`'s flags → the agent's options.
fn run_options(a: cli::RunArgs) -> anyhow::Result<agent::Options> {
    let ranges = standalone_ranges(&a.standalone)?;
    let cgroup = match a.cgroup {
        Some(c) => c,
        None => {
            loader::cgroup2_mount().map_err(|e| anyhow::anyhow!(lb_userspace::error::chain(&e)))?
        }
    };
    let node_name = a.node_name.clone().unwrap_or_else(hostname);
    let opts = agent::Options {
        source: match a.manifests {
            Some(dir) => agent::SourceOpt::Manifests(dir),
            None => agent::SourceOpt::Api {
                kubeconfig: a.kubeconfig,
            },
        },
        node_name: node_name.clone(),
        cgroup,
        bpffs: a.bpffs,
        sizes: loader::Sizes {
            services: a.max_service_entries,
            backends: a.max_backend_entries,
            revnat: a.max_revnat_entries,
            revnat_ring: a.revnat_ring_entries,
            conntrack: a.max_conntrack_entries,
            maglev_m: a.maglev_table_size,
            maglev_frontends: a.max_maglev_frontends,
        },
        nodeport_interfaces: a.nodeport_interfaces.clone(),
        xdp: a.xdp,
        conntrack_gc_interval: a.conntrack_gc_interval,
        conntrack_timeouts: lb_common::CtTimeouts {
            tcp_established_s: a.conntrack_tcp_timeout_established,
            tcp_syn_s: a.conntrack_tcp_timeout_syn,
            tcp_closing_s: a.conntrack_tcp_timeout_close,
            other_s: a.conntrack_udp_timeout,
        },
        model: model::Config {
            ipv4: true,
            ipv6: std::path::Path::new("/proc/net/if_inet6").exists(),
            proxy_name: a.proxy_name,
            node_name: node_name.clone(),
            zone: None, // from the Node object, per sync
            node_addresses: a.node_addresses.clone(),
            maglev: a.maglev_table_size,
            node_dns: a.dns_service.clone().or_else(|| {
                (!a.cluster_dns.is_empty()).then(|| model::NsName {
                    namespace: agent::CLUSTER_DNS_SERVICE.0.into(),
                    name: agent::CLUSTER_DNS_SERVICE.1.into(),
                })
            }),
        },
        resync_every: Duration::from_secs(a.resync_seconds.max(1)),
        debounce: Duration::from_millis(5),
        min_sync_interval: a.min_sync_interval,
        host_netns: a.host_netns.clone(),
        metrics_addr: a.metrics_addr,
        healthz_addr: a.healthz_addr,
        healthcheck_bind: a.healthcheck_bind_address,
        health_timeout: a.health_timeout,
        nodeport_addresses: a.nodeport_addresses.clone(),
        dns: (!a.dns.is_empty()).then(|| agent::DnsOptions {
            addrs: a.dns.clone(),
            config: lb_model::dns::Config {
                zone: a.cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
                ttl: a.dns_ttl,
            },
            upstreams: if a.dns_upstream.is_empty() {
                lb_userspace::dns::resolv_conf_nameservers(
                    &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                )
            } else {
                a.dns_upstream.clone()
            },
        }),
        standalone: agent::Standalone {
            ranges,
            state_file: a.standalone.state_file.clone(),
            cluster_dns: a.cluster_dns.clone(),
        },
    };
    Ok(opts)
}
