//! Where Services, EndpointSlices and this Node come from. Both sources hand the agent complete
//! snapshots ([`Objects`]); the agent rebuilds the desired state from a snapshot on every change
//! (level-triggered), so a missed or reordered event can never leave a stale entry behind.
//!
//! * [`manifest`]: a directory of YAML/JSON files (`lb-agent run --manifests DIR`).
//! * [`api`]: the Kubernetes API through kube-rs watchers and reflector stores.
use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

pub mod api;
pub mod manifest;

pub use manifest::{ManifestDir, parse_str};

/// A complete snapshot of the objects the model needs. Objects are shared (`Arc`) with the
/// source's own cache, so a snapshot of 10,000 Services copies pointers, not Services.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// This node, when the source knows it (API source).
    pub node: Option<Arc<Node>>,
}

impl Objects {
    pub(crate) fn extend(&mut self, other: &Self) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
    }
}
