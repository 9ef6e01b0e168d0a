//! `cargo xtask …`: bootstrap the toolchain, run the tests, the demo, the benchmark.
//! Small on purpose: no logic the product needs lives here.
use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need, when missing: Debian tools (iproute2, bpftool,
    /// nsenter), the pinned nightly (`lb-ebpf/NIGHTLY`) with rust-src, bpf-linker built against
    /// that nightly's own libLLVM.
    Setup,
    /// rustfmt check and clippy (pedantic, warnings are errors) over every crate, the eBPF one
    /// included (with the pinned nightly, for the BPF target).
    Lint,
    /// Everything CI runs: host unit/property tests, then the privileged netns tests (root).
    Test {
        /// Extra arguments for the privileged test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Throw-away sandbox: agent on the example manifests, real traffic, a table of results.
    Demo,
    /// Socket-LB vs direct: connect+request+close rates, side by side, and programming time.
    Bench {
        /// Number of Services for the "loaded" lane.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Seconds per measurement round.
        #[arg(long, default_value_t = 2.0)]
        round_secs: f64,
        /// Interleaved rounds per lane (single rounds vary by ±10 % on a shared machine).
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Changes written to the API-server double for the change → datapath latency (0: skip).
        #[arg(long, default_value_t = 200)]
        api_changes: usize,
        /// Interleaved rounds of the NodePort lb-vs-iptables comparison (0: skip).
        #[arg(long, default_value_t = 6)]
        nodeport_rounds: usize,
        /// Other Services in both NodePort beds (kube-proxy's KUBE-SERVICES length).
        #[arg(long, default_value_t = 1000)]
        nodeport_services: usize,
        /// Run only the NodePort comparison.
        #[arg(long)]
        only_nodeport: bool,
        /// Pod readiness flips of the standalone-control-plane section (0: skip).
        #[arg(long, default_value_t = 100)]
        standalone_flips: usize,
        /// Services (each selecting 4 Pods) of the standalone cold start (0: skip).
        #[arg(long, default_value_t = 10_000)]
        standalone_services: usize,
        /// Run only the standalone-control-plane section.
        #[arg(long)]
        only_standalone: bool,
        /// Service counts of the DNS comparison (lb, knot, unbound, dnsmasq; empty: skip).
        #[arg(long, value_delimiter = ',', default_value = "100,10000")]
        dns_scales: Vec<usize>,
        /// Interleaved rounds of the DNS comparison.
        #[arg(long, default_value_t = 3)]
        dns_rounds: usize,
        /// Run only the DNS comparison.
        #[arg(long)]
        only_dns: bool,
        /// Service counts of the growth table (cold programming, RSS, connect hook, one-change
        /// p99 at each; empty: skip).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,100000")]
        growth_scales: Vec<usize>,
        /// Run only the growth table.
        #[arg(long)]
        only_growth: bool,
        /// Loaded Service counts of the per-hook cost table (every socket hook, both families,
        /// with ClusterIP ÷ direct and its 95 % confidence interval; empty: skip).
        #[arg(long, value_delimiter = ',', default_value = "0,10000,50000")]
        hook_scales: Vec<usize>,
        /// Run only the per-hook cost table.
        #[arg(long)]
        only_hooks: bool,
        /// At most ~5 minutes: the kube-proxy-shapes comparison only, at 100, 1,000 and 10,000
        /// Services, 2 rounds × 1 s.
        #[arg(long)]
        quick: bool,
        /// Service counts of the kube-proxy-shapes comparison.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000,50000")]
        scales: Vec<usize>,
        /// Rounds of the kube-proxy-shapes comparison.
        #[arg(long, default_value_t = 3)]
        kp_rounds: usize,
        /// Client threads of the kube-proxy-shapes comparison.
        #[arg(long, default_value_t = 2)]
        kp_threads: usize,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `1,2,3`: a list flag's value.
fn list(v: &[usize]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", format!("{cmd:?}").replace('"', ""));
    let st = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have(tool: &str) -> bool {
    ok(Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}")))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Debian packages providing the commands the tests, the demo and the bench use (iptables,
/// nftables: the bench's kube-proxy lanes; dig: the DNS tests' independent client; dnsperf,
/// knot, unbound, dnsmasq: the DNS bench's load and peers).
const APT: [(&str, &str); 10] = [
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("dig", "bind9-dnsutils"),
    ("dnsperf", "dnsperf"),
    ("knotd", "knot"),
    ("unbound", "unbound"),
    ("dnsmasq", "dnsmasq-base"),
];

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let toolchain = pinned_nightly()?;
    // bpf-linker must link against the same LLVM as the nightly rustc that emits the bitcode.
    // rustup puts the nightly's lib/ on the library path for `rustup run`, as it does when
    // rustc invokes the linker.
    if !ok(Command::new("rustup").args(["run", &toolchain, "bpf-linker", "--version"])) {
        install_bpf_linker(&toolchain)?;
    }
    Ok(())
}

/// The eBPF crate's nightly, pinned by date in `lb-ebpf/NIGHTLY` (the one place), as the rustup
/// toolchain `lb-nightly-<date>`.
fn pinned_name() -> String {
    format!(
        "lb-nightly-{}",
        include_str!("../../lb-ebpf/NIGHTLY").trim()
    )
}

/// Makes the pinned nightly available as [`pinned_name`], with rust-src: an installed nightly
/// whose commit date is the pinned one is linked under that name; failing that, rustup installs
/// `nightly-<date>` (where rustup's servers are reachable). Returns the name.
fn pinned_nightly() -> Result<String> {
    let date = include_str!("../../lb-ebpf/NIGHTLY").trim();
    let name = pinned_name();
    let linked = ok(Command::new("rustup").args(["run", &name, "rustc", "--version"]));
    // The link alone is not enough: `-Z build-std` needs the nightly's rust-src (which can be
    // removed from the nightly the link points at).
    if linked && has_rust_src(&name) {
        return Ok(name);
    }
    let commit_date = |tc: &str| -> Option<String> {
        let out = Command::new("rustup")
            .args(["run", tc, "rustc", "-vV"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("commit-date: ").map(str::to_owned))
    };
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup toolchain list")?;
    let installed: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| t.starts_with("nightly"))
        .map(str::to_owned)
        .collect();
    let found = installed
        .iter()
        .find(|t| commit_date(t).is_some_and(|d| d == date) || t.contains(date))
        .cloned();
    let source = if let Some(t) = found {
        t
    } else {
        let dated = format!("nightly-{date}");
        run(Command::new("rustup").args(["toolchain", "install", &dated, "--profile", "minimal"]))
            .with_context(|| {
                format!(
                    "no installed nightly is from {date} (installed: {installed:?}) and rustup cannot install {dated}; \
                     install it, or change lb-ebpf/NIGHTLY to an installed nightly's commit date"
                )
            })?;
        dated
    };
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", &source, "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &source]))?;
    }
    if !linked {
        let sysroot = sysroot(&source)?;
        run(Command::new("rustup")
            .args(["toolchain", "link", &name])
            .arg(&sysroot))?;
    }
    Ok(name)
}

/// A toolchain's sysroot.
fn sysroot(toolchain: &str) -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Whether a toolchain has rust-src (what `-Z build-std` reads).
fn has_rust_src(toolchain: &str) -> bool {
    sysroot(toolchain).is_ok_and(|s| s.join("lib/rustlib/src/rust/library/Cargo.lock").is_file())
}

fn install_bpf_linker(toolchain: &str) -> Result<()> {
    let sysroot = sysroot(toolchain)?;
    let lib = fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let prefix = home.join(".cache/lb/llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    eprintln!(
        "building bpf-linker against {} (takes a few minutes, once)",
        lib.display()
    );
    run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// `cargo fmt --check` and clippy with warnings as errors: the host crates with stable, then
/// lb-ebpf with the pinned nightly for the BPF target (as aya-build compiles it).
fn lint() -> Result<()> {
    setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let target = root().join("target/lint-ebpf");
    run(Command::new("rustup")
        .args([
            "run",
            &pinned_name(),
            "cargo",
            "clippy",
            "-p",
            "lb-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &target)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH),
        ))
}

/// The packages whose binaries the tests, the demo and the bench run (lb-agent, lbt, lb-demo,
/// lb-bench).
const BINS: [&str; 7] = [
    "-p",
    "lb-userspace",
    "-p",
    "lb-tests",
    "-p",
    "lb-bench",
    "--bins",
];

fn test(extra: &[String]) -> Result<()> {
    setup()?;
    // Binaries the privileged tests drive (lb-agent, lbt), built first so they are never stale.
    run(cargo().arg("build").args(BINS))?;
    // Host-level: pure logic, layouts, model, sync property tests.
    run(cargo().args([
        "test",
        "-p",
        "lb-common",
        "-p",
        "lb-model",
        "-p",
        "lb-userspace",
        "-p",
        "lb-bench",
        "-p",
        "xtask",
    ]))?;
    // Kernel-level: netns + child cgroup + real sockets. Fails (never skips) without root.
    // `--tests` (no doctests): the last summary line CI reads is this suite's own.
    // The packet-path scenarios again with the XDP fast path in front of tc (generic mode:
    // the veth test beds), so every NodePort behaviour holds with XDP on.
    run(cargo()
        .args([
            "test",
            "-p",
            "lb-tests",
            "--test",
            "nodeport",
            "--",
            "--test-threads=2",
        ])
        .env("LB_TEST_XDP", "generic"))?;
    run(cargo()
        .args([
            "test",
            "-p",
            "lb-tests",
            "--tests",
            "--",
            "--test-threads=2",
        ])
        .args(extra))
}

/// Setup, then the release binaries the demo and the bench run (agent, lbt, lb-demo, lb-bench).
fn release_bins() -> Result<()> {
    setup()?;
    run(cargo().args(["build", "--release"]).args(BINS))
}

/// `bench --quick`: the kube-proxy-shapes comparison only, at 100, 1,000 and 10,000 Services.
fn bench_quick(out: &Path, md: &Path, kp_threads: usize) -> Result<()> {
    run(Command::new(root().join("target/release/lb-bench"))
        .args([
            "--only-kube-proxy",
            "true",
            "--kp-scales",
            "100,1000,10000",
            "--kp-rounds",
            "2",
            "--round-secs",
            "1",
            "--kp-threads",
            &kp_threads.to_string(),
            "--out-dir",
        ])
        .arg(out)
        .arg("--benchmarks-md")
        .arg(md))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Lint => lint(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => {
            release_bins()?;
            run(Command::new(root().join("target/release/lb-demo"))
                .arg(root().join("examples/demo")))
        }
        Cmd::Bench {
            services,
            round_secs,
            rounds,
            api_changes,
            nodeport_rounds,
            nodeport_services,
            only_nodeport,
            standalone_flips,
            standalone_services,
            only_standalone,
            dns_scales,
            dns_rounds,
            only_dns,
            growth_scales,
            only_growth,
            hook_scales,
            only_hooks,
            quick,
            scales,
            kp_rounds,
            kp_threads,
        } => {
            release_bins()?;
            // Results are committed beside BENCHMARKS.md: JSON samples and the SVG charts.
            let out = root().join("docs/benchmarks");
            let md = root().join("BENCHMARKS.md");
            if quick {
                return bench_quick(&out, &md, kp_threads);
            }
            let scales: Vec<String> = scales.iter().map(ToString::to_string).collect();
            run(Command::new(root().join("target/release/lb-bench"))
                .args([
                    "--kp-scales",
                    &scales.join(","),
                    "--kp-rounds",
                    &kp_rounds.to_string(),
                    "--kp-threads",
                    &kp_threads.to_string(),
                    "--out-dir",
                ])
                .arg(&out)
                .arg("--benchmarks-md")
                .arg(&md)
                .args([
                    "--services",
                    &services.to_string(),
                    "--round-secs",
                    &round_secs.to_string(),
                    "--rounds",
                    &rounds.to_string(),
                    "--api-changes",
                    &api_changes.to_string(),
                    "--nodeport-rounds",
                    &nodeport_rounds.to_string(),
                    "--nodeport-services",
                    &nodeport_services.to_string(),
                    "--only-nodeport",
                    &only_nodeport.to_string(),
                    "--standalone-flips",
                    &standalone_flips.to_string(),
                    "--standalone-services",
                    &standalone_services.to_string(),
                    "--only-standalone",
                    &only_standalone.to_string(),
                    "--dns-scales",
                    &list(&dns_scales),
                    "--dns-rounds",
                    &dns_rounds.to_string(),
                    "--only-dns",
                    &only_dns.to_string(),
                    "--growth-scales",
                    &list(&growth_scales),
                    "--only-growth",
                    &only_growth.to_string(),
                    "--hook-scales",
                    &list(&hook_scales),
                    "--only-hooks",
                    &only_hooks.to_string(),
                ]))
        }
    }
}
