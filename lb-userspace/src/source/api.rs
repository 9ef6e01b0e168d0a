//! The API source: kube-rs watchers (with backoff) feeding reflector stores for Services,
//! EndpointSlices and this Node.
//!
//! Every event only *wakes* the agent; the agent then takes a snapshot of all stores and diffs.
//! Delete events are never acted on by themselves: after a disconnect, a `410 Gone` or a relist,
//! the reflector swaps in the complete new list on `InitDone` and the next snapshot simply no
//! longer contains what was deleted meanwhile.
use std::path::Path;

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Objects;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "not running in a pod (no in-cluster service account); pass --kubeconfig or --manifests"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the {kind} watcher stopped before its first list completed")]
    NotReady { kind: &'static str },
}

/// What the agent watches: (API group, resource) with verbs list and watch (get comes with
/// them in RBAC practice). deploy/clusterrole.yaml grants exactly these; a test checks both.
pub const WATCHES: [(&str, &str); 3] = [
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "nodes"),
];

/// The three reflector stores. Cloning is cheap (they are shared handles).
#[derive(Clone)]
pub struct ApiSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
}

/// Builds the client: `--kubeconfig` when given, else the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => Config::incluster().map_err(Error::InCluster)?,
    };
    Client::try_from(config).map_err(Error::Client)
}

/// Runs one watcher into a reflector store; every change wakes the agent through `wake`.
fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    wake: mpsc::Sender<()>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                // The store is only swapped on InitDone: waking on Init/InitApply would show the
                // old list again, harmless but useless.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    debug!(kind, "list complete");
                    let _ = wake.try_send(());
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    let _ = wake.try_send(());
                }
                // The backoff retries; the stores keep their last complete state meanwhile.
                Err(e) => {
                    warn!(kind, error = %crate::agent::chain(&e), "watch failed; retrying with backoff");
                }
            }
        }
    });
    reader
}

impl ApiSource {
    /// Starts the three watchers. `wake` gets a message (coalesced) on every change.
    pub fn start(client: &Client, node_name: &str, wake: &mpsc::Sender<()>) -> Self {
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "Service",
            wake.clone(),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            "EndpointSlice",
            wake.clone(),
        );
        let node = spawn_reflector(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            "Node",
            wake.clone(),
        );
        Self {
            services,
            slices,
            node,
        }
    }

    /// Waits until every store holds a complete first list. Syncing before that would withdraw
    /// every Service the maps hold.
    pub async fn ready(&self) -> Result<(), Error> {
        self.services
            .wait_until_ready()
            .await
            .map_err(|_| Error::NotReady { kind: "Service" })?;
        self.slices
            .wait_until_ready()
            .await
            .map_err(|_| Error::NotReady {
                kind: "EndpointSlice",
            })?;
        self.node
            .wait_until_ready()
            .await
            .map_err(|_| Error::NotReady { kind: "Node" })?;
        Ok(())
    }

    /// A consistent-per-kind snapshot of the stores.
    #[must_use]
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: self.services.state(),
            slices: self.slices.state(),
            node: self.node.state().into_iter().next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;

    use super::*;

    #[test]
    fn watches_match_the_watched_types() {
        let typed = [
            (
                Service::group(&()).into_owned(),
                Service::plural(&()).into_owned(),
            ),
            (
                EndpointSlice::group(&()).into_owned(),
                EndpointSlice::plural(&()).into_owned(),
            ),
            (
                Node::group(&()).into_owned(),
                Node::plural(&()).into_owned(),
            ),
        ];
        let declared: Vec<(String, String)> = WATCHES
            .iter()
            .map(|(g, r)| ((*g).to_owned(), (*r).to_owned()))
            .collect();
        assert_eq!(declared, typed);
    }
}
