//! Where Services, EndpointSlices and this Node come from. Both sources hand the agent complete
//! snapshots ([`Objects`]); the agent rebuilds the desired state from a snapshot on every change
//! (level-triggered), so a missed or reordered event can never leave a stale entry behind.
//!
//! * [`manifest`]: a directory of YAML/JSON files (`lb-agent run --manifests DIR`), parsed by
//!   `lb_model::manifest`.
//! * [`api`]: the Kubernetes API through kube-rs watchers, kept slim in the agent's own stores.
pub mod api;

pub use lb_model::{
    Objects, manifest,
    manifest::{ManifestDir, parse_str},
};
