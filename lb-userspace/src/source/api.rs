//! The API source: kube-rs watchers (with backoff) feeding reflector stores for Services,
//! EndpointSlices and this Node.
//!
//! Every event only *wakes* the agent; the agent then takes a snapshot of all stores and diffs.
//! Delete events are never acted on by themselves: after a disconnect, a `410 Gone` or a relist,
//! the reflector swaps in the complete new list on `InitDone` and the next snapshot simply no
//! longer contains what was deleted meanwhile.
use std::{
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

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
use crate::metrics::Health;

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
    services: Shared<Service>,
    slices: Shared<EndpointSlice>,
    node: Shared<Node>,
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

/// A reflector store that a restarted watch task replaces (see [`spawn_reflector`]).
type Shared<K> = Arc<RwLock<Store<K>>>;

/// Runs one watcher into a reflector store; every change wakes the agent through `wake`.
///
/// The watch task is supervised: kube-rs's backoff retries failed requests, but should the task
/// itself end or panic, its store would freeze while everything looked healthy. The supervisor
/// then reports a fault in `/healthz` (logged once), starts a new watcher with a new store after
/// a pause, and swaps the new store in only once its first list is complete — until then the
/// agent keeps syncing from the last complete list, never from an empty one.
fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    wake: mpsc::Sender<()>,
    health: Arc<Mutex<Health>>,
) -> Shared<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let w = wake.clone();
    supervise(kind, wake, health, RESTART_PAUSE, move |writer| {
        watch(api.clone(), cfg.clone(), writer, kind, w.clone())
    })
}

/// The supervisor of [`spawn_reflector`]: runs `watch_into(writer)` as a task, and whenever
/// that task ends or panics, reports the fault and starts it again into a new store, which
/// replaces the shared one once complete.
fn supervise<K, F, Fut>(
    kind: &'static str,
    wake: mpsc::Sender<()>,
    health: Arc<Mutex<Health>>,
    pause: std::time::Duration,
    watch_into: F,
) -> Shared<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    F: Fn(reflector::store::Writer<K>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let shared = Arc::new(RwLock::new(reader));
    let slot = shared.clone();
    let what = FAULTS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("watch", |(_, w)| *w);
    tokio::spawn(async move {
        let mut writer = Some(writer);
        loop {
            let w = writer.take().unwrap_or_else(|| {
                // A replacement: its store goes live once complete.
                let (reader, w) = reflector::store::<K>();
                let live = slot.clone();
                let (health, wake) = (health.clone(), wake.clone());
                tokio::spawn(async move {
                    if reader.wait_until_ready().await.is_ok() {
                        *live.write().expect("store lock") = reader;
                        health.lock().expect("health lock").fault(what, None);
                        let _ = wake.try_send(());
                    }
                });
                w
            });
            let task = tokio::spawn(watch_into(w));
            let why = match task.await {
                Ok(()) => "the watch stream ended".to_owned(),
                Err(e) if e.is_panic() => "the watch task panicked".to_owned(),
                Err(e) => format!("the watch task stopped: {e}"),
            };
            health
                .lock()
                .expect("health lock")
                .fault(what, Some(format!("{kind}: {why}; restarting the watch")));
            tokio::time::sleep(pause).await;
        }
    });
    shared
}

/// Pause before a dead watch task is replaced.
const RESTART_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The `/healthz` fault name of each watched kind.
const FAULTS: [(&str, &str); 3] = [
    ("Service", "Service watch"),
    ("EndpointSlice", "EndpointSlice watch"),
    ("Node", "Node watch"),
];

/// One watch stream into `writer`, until the stream ends.
async fn watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<K>,
    kind: &'static str,
    wake: mpsc::Sender<()>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            // The store is only swapped on InitDone: waking on Init/InitApply would show the
            // old list again, harmless but useless.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                debug!(kind, "list complete");
                failing = false;
                let _ = wake.try_send(());
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                failing = false;
                let _ = wake.try_send(());
            }
            // The backoff retries; the stores keep their last complete state meanwhile. One
            // warning per outage, not one per retry.
            Err(e) => {
                if !failing {
                    warn!(kind, error = %crate::error::chain(&e), "watch failed; retrying with backoff");
                }
                failing = true;
            }
        }
    }
}

impl ApiSource {
    /// Starts the three watchers. `wake` gets a message (coalesced) on every change.
    pub fn start(
        client: &Client,
        node_name: &str,
        wake: &mpsc::Sender<()>,
        health: &Arc<Mutex<Health>>,
    ) -> Self {
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "Service",
            wake.clone(),
            health.clone(),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            "EndpointSlice",
            wake.clone(),
            health.clone(),
        );
        let node = spawn_reflector(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            "Node",
            wake.clone(),
            health.clone(),
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
        let services = self.services.read().expect("store lock").clone();
        services
            .wait_until_ready()
            .await
            .map_err(|_| Error::NotReady { kind: "Service" })?;
        let slices = self.slices.read().expect("store lock").clone();
        slices
            .wait_until_ready()
            .await
            .map_err(|_| Error::NotReady {
                kind: "EndpointSlice",
            })?;
        let node = self.node.read().expect("store lock").clone();
        node.wait_until_ready()
            .await
            .map_err(|_| Error::NotReady { kind: "Node" })?;
        Ok(())
    }

    /// A consistent-per-kind snapshot of the stores.
    #[must_use]
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: self.services.read().expect("store lock").state(),
            slices: self.slices.read().expect("store lock").state(),
            node: self
                .node
                .read()
                .expect("store lock")
                .state()
                .into_iter()
                .next(),
            ..Objects::default()
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

    /// A watch task that panics: its store keeps the last complete list (never an empty one),
    /// `/healthz` reports the fault, and the restarted watch's store replaces it once complete,
    /// clearing the fault.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_watch_task_is_restarted_and_its_store_swapped_in_once_complete() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

        let svc = |name: &str| Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let (wake, _rx) = mpsc::channel(1);
        let health = Arc::new(Mutex::new(Health::new(std::time::Duration::from_mins(1))));
        let (first, second) = (svc("first"), svc("second"));
        let r = runs.clone();
        let store = supervise::<Service, _, _>(
            "Service",
            wake,
            health.clone(),
            std::time::Duration::from_millis(10),
            move |mut w| {
                let n = r.fetch_add(1, Ordering::SeqCst);
                let (first, second) = (first.clone(), second.clone());
                async move {
                    let obj = if n == 0 { first } else { second };
                    w.apply_watcher_event(&watcher::Event::Init);
                    w.apply_watcher_event(&watcher::Event::InitApply(obj));
                    w.apply_watcher_event(&watcher::Event::InitDone);
                    assert!(n != 0, "watch task dies after its first list");
                    // A healthy watch runs on.
                    std::future::pending::<()>().await;
                }
            },
        );
        let names = |s: &Shared<Service>| -> Vec<String> {
            s.read()
                .expect("store lock")
                .state()
                .iter()
                .filter_map(|o| o.metadata.name.clone())
                .collect()
        };
        let (mut saw_fault, mut listed) = (false, false);
        for _ in 0..400 {
            saw_fault |= health
                .lock()
                .expect("health lock")
                .faults
                .contains_key("Service watch");
            if names(&store) == ["second"] {
                break;
            }
            let now = names(&store);
            assert!(
                !(listed && now.is_empty()),
                "the store was emptied between lists"
            );
            listed |= !now.is_empty();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            names(&store),
            ["second"],
            "the restarted watch's store is live"
        );
        assert!(saw_fault, "the dead task was reported in /healthz");
        assert!(runs.load(Ordering::SeqCst) >= 2);
        let h = health.lock().expect("health lock");
        assert!(
            h.faults.is_empty(),
            "the fault clears once the new store is live: {:?}",
            h.faults
        );
    }
}
