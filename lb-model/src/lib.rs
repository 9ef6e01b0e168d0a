//! The pure core of `lb`: where a Service becomes map entries.
//!
//! Follow a Service through the modules in this order: [`manifest`] (files → objects; the API
//! source hands the agent the same [`Objects`]) → [`model`] (Services + EndpointSlices →
//! [`model::Desired`]: frontends with their backends) → [`sync`] (a pure diff of the desired state
//! against a [`sync::Shadow`] of the maps, and the write order that keeps the datapath consistent)
//! ; [`maglev`] builds the lookup tables of north-south frontends.
//!
//! Nothing here touches the kernel, a socket or a runtime: the agent (`lb-userspace`) supplies the
//! objects and a [`sync::MapWriter`] for the pinned BPF maps.
use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

#[cfg(any(test, feature = "proptest"))]
pub mod arbitrary;
pub mod control;
pub mod dns;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod sync;

/// A complete snapshot of the objects the model needs. Objects are shared (`Arc`) with the
/// source's own cache, so a snapshot of 10,000 Services copies pointers, not Services.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// This node, when the source knows it (the API source's watch, or the manifest Node named
    /// `--node-name`).
    pub node: Option<Arc<Node>>,
    /// Manifest source only (the standalone control plane, [`control`]): Pods that selectors
    /// turn into EndpointSlices, legacy `v1 Endpoints` to mirror, and every Node object (zones).
    /// The API source leaves them empty: on a cluster, its controllers already made the slices.
    pub pods: Vec<Arc<Pod>>,
    pub endpoints: Vec<Arc<Endpoints>>,
    pub nodes: Vec<Arc<Node>>,
}

impl Objects {
    pub(crate) fn extend(&mut self, other: &Self) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
        self.endpoints.extend(other.endpoints.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
    }

    /// Nothing at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.slices.is_empty()
            && self.pods.is_empty()
            && self.endpoints.is_empty()
            && self.nodes.is_empty()
    }
}
