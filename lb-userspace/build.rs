//! Builds the eBPF object (crate lb-ebpf) with the pinned nightly toolchain and bpf-linker, and
//! puts it in `OUT_DIR/lb` where `loader` embeds it. `cargo xtask setup` installs what this needs.
//!
//! The nightly is pinned by date in one place, `lb-ebpf/NIGHTLY`; `cargo xtask setup` makes it
//! available to rustup as `lb-nightly-<date>`.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.parent().context("workspace root")?.join("lb-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!(
        "cargo:rerun-if-changed={}",
        manifest.parent().unwrap().join("lb-common").display()
    );
    let out = PathBuf::from(env::var("OUT_DIR")?).join("lb");
    let pin = manifest
        .parent()
        .context("workspace root")?
        .join("lb-ebpf/NIGHTLY");
    println!("cargo:rerun-if-changed={}", pin.display());
    let date = fs::read_to_string(&pin).with_context(|| format!("read {}", pin.display()))?;
    let toolchain = format!("lb-nightly-{}", date.trim());
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Host-only checks (clippy, docs) without nightly: embed an empty object. The agent
        // refuses to start with it ("eBPF object was not built").
        if !out.exists() {
            fs::write(&out, b"")?;
        }
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
