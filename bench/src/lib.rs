//! The benchmark behind `cargo xtask bench` (binary `lb-bench`): lanes measured side by side in
//! one run, on the test beds of `lb-tests`.
//!
//! * [`kpbench`]: lb against kube-proxy's own rule shapes at 100–50,000 Services;
//! * [`kubeproxy`]: those rule shapes (iptables and nftables modes), generated as kube-proxy
//!   writes them.
pub mod kpbench;
pub mod kubeproxy;
