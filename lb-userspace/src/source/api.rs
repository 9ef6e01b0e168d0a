//! The API source: kube-rs watchers (with backoff) feeding the agent's own stores of slim
//! objects ([`lb_model::k8s`]) for Services, EndpointSlices and this Node.
//!
//! Every event only *wakes* the agent; the agent then takes a snapshot of all stores and diffs.
//! Delete events are never acted on by themselves: after a disconnect, a `410 Gone` or a relist,
//! the store swaps in the complete new list on `InitDone` and the next snapshot simply no
//! longer contains what was deleted meanwhile.
use std::{
    borrow::Cow,
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use lb_model::k8s::{
    core::{Node, Service},
    discovery::EndpointSlice,
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
}

/// What the agent watches: (API group, resource) with verbs list and watch (get comes with
/// them in RBAC practice). deploy/clusterrole.yaml grants exactly these; a test checks both.
pub const WATCHES: [(&str, &str); 3] = [
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "nodes"),
];

/// The three stores. Cloning is cheap (they are shared handles).
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

/// One watched object as the API sends it: the full `ObjectMeta` (kube-rs's watcher reads the
/// resourceVersion from it) beside the slim object's other fields. The store keeps only the slim
/// object ([`Wire::into_slim`]); the full metadata is dropped as soon as the event is applied.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Wire<T> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(flatten)]
    obj: T,
}

/// A slim kind the API source watches, named after its full `k8s-openapi` type.
pub trait Watched:
    lb_model::k8s::Object + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync + 'static
{
    type Api: k8s_openapi::Resource;
    fn set_metadata(&mut self, meta: lb_model::k8s::ObjectMeta);
    /// Drops what the agent never reads of this kind from the API server.
    fn trim(&mut self) {}
}

macro_rules! watched {
    ($slim:ty, $api:ty $(, $trim:expr)?) => {
        impl Watched for $slim {
            type Api = $api;
            fn set_metadata(&mut self, meta: lb_model::k8s::ObjectMeta) {
                self.metadata = meta;
            }
            $(fn trim(&mut self) {
                $trim(self);
            })?
        }
    };
}
watched!(Service, k8s_openapi::api::core::v1::Service);
watched!(
    EndpointSlice,
    k8s_openapi::api::discovery::v1::EndpointSlice,
    EndpointSlice::drop_target_refs
);
watched!(Node, k8s_openapi::api::core::v1::Node);

impl<T: Watched> Wire<T> {
    fn into_slim(self) -> T {
        let mut obj = self.obj;
        obj.set_metadata(self.metadata.into());
        obj.trim();
        obj
    }
}

impl<T: Watched> kube::Resource for Wire<T> {
    type DynamicType = ();
    type Scope = <T::Api as k8s_openapi::Resource>::Scope;

    fn kind((): &()) -> Cow<'_, str> {
        <T::Api as k8s_openapi::Resource>::KIND.into()
    }
    fn group((): &()) -> Cow<'_, str> {
        <T::Api as k8s_openapi::Resource>::GROUP.into()
    }
    fn version((): &()) -> Cow<'_, str> {
        <T::Api as k8s_openapi::Resource>::VERSION.into()
    }
    fn api_version((): &()) -> Cow<'_, str> {
        <T::Api as k8s_openapi::Resource>::API_VERSION.into()
    }
    fn plural((): &()) -> Cow<'_, str> {
        <T::Api as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Namespace (empty for cluster-scoped kinds) and name, borrowed from the object.
fn key_of(m: &lb_model::k8s::ObjectMeta) -> (&str, &str) {
    (
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default(),
    )
}

/// One kind's slim objects, sorted by namespace/name: an unchanged store snapshots to the
/// same `Arc`s in the same order, so a change is a small [`lb_model::Window`]; a snapshot is
/// one copy of a vector of pointers (a B-tree walk of 50,000 objects took 5 ms), and the key is
/// the object's own metadata, not a second copy of its name.
pub struct Store<T> {
    objs: RwLock<Vec<Arc<T>>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl<T: lb_model::k8s::Object> Store<T> {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            objs: RwLock::new(Vec::new()),
            ready: tokio::sync::watch::channel(false).0,
        })
    }

    fn state(&self) -> Vec<Arc<T>> {
        self.objs.read().expect("store lock").clone()
    }

    /// Waits until the first list is complete; `Err` if the writer is gone before.
    async fn wait_until_ready(&self) -> Result<(), ()> {
        let mut rx = self.ready.subscribe();
        rx.wait_for(|r| *r).await.map(|_| ()).map_err(|_| ())
    }
}

/// Where an object with key `k` is (`Ok`) or belongs (`Err`) in a sorted vector.
fn find<T: lb_model::k8s::Object>(v: &[Arc<T>], k: (&str, &str)) -> Result<usize, usize> {
    v.binary_search_by(|o| key_of(o.metadata()).cmp(&k))
}

/// Applies watcher events to a [`Store`] as kube-rs's reflector does: a relist (`Init` …
/// `InitDone`) is gathered aside and replaces the whole content at once, so a reader never sees
/// a half list.
pub struct Writer<T> {
    store: Arc<Store<T>>,
    relist: Option<Vec<Arc<T>>>,
}

impl<T: Watched> Writer<T> {
    pub fn apply_watcher_event(&mut self, ev: watcher::Event<Wire<T>>) {
        fn put<T: Watched>(v: &mut Vec<Arc<T>>, o: T) {
            match find(v, key_of(o.metadata())) {
                Ok(i) => v[i] = Arc::new(o),
                Err(i) => v.insert(i, Arc::new(o)),
            }
        }
        match ev {
            watcher::Event::Init => self.relist = Some(Vec::new()),
            // Gathered in arrival order and sorted once at the end: an insert in order per
            // object moved half the vector each time (quadratic: seconds at 50,000 objects
            // listed in an order other than the store's).
            watcher::Event::InitApply(w) => {
                self.relist
                    .get_or_insert_default()
                    .push(Arc::new(w.into_slim()));
            }
            watcher::Event::InitDone => {
                let mut all = self.relist.take().unwrap_or_default();
                // Stable, and of one key listed twice the later object stays (as it would have
                // replaced the earlier).
                all.sort_by(|a, b| key_of(a.metadata()).cmp(&key_of(b.metadata())));
                all.dedup_by(|later, kept| {
                    let same = key_of(later.metadata()) == key_of(kept.metadata());
                    if same {
                        std::mem::swap(later, kept);
                    }
                    same
                });
                *self.store.objs.write().expect("store lock") = all;
                self.store.ready.send_replace(true);
            }
            watcher::Event::Apply(w) => {
                put(
                    &mut self.store.objs.write().expect("store lock"),
                    w.into_slim(),
                );
            }
            watcher::Event::Delete(w) => {
                let m = &w.metadata;
                let k = (
                    m.namespace.as_deref().unwrap_or_default(),
                    m.name.as_deref().unwrap_or_default(),
                );
                let mut v = self.store.objs.write().expect("store lock");
                if let Ok(i) = find(&v, k) {
                    v.remove(i);
                }
            }
        }
    }
}

fn store<T: lb_model::k8s::Object>() -> (Arc<Store<T>>, Writer<T>) {
    let s = Store::new();
    (
        s.clone(),
        Writer {
            store: s,
            relist: None,
        },
    )
}

/// A store that a restarted watch task replaces (see [`spawn_watch`]).
type Shared<T> = Arc<RwLock<Arc<Store<T>>>>;

/// Runs one watcher into a store; every change wakes the agent through `wake`.
///
/// The watch task is supervised: kube-rs's backoff retries failed requests, but should the task
/// itself end or panic, its store would freeze while everything looked healthy. The supervisor
/// then reports a fault in `/healthz` (logged once), starts a new watcher with a new store after
/// a pause, and swaps the new store in only once its first list is complete — until then the
/// agent keeps syncing from the last complete list, never from an empty one.
fn spawn_watch<T: Watched>(
    api: Api<Wire<T>>,
    cfg: watcher::Config,
    kind: &'static str,
    wake: mpsc::Sender<()>,
    health: Arc<Mutex<Health>>,
) -> Shared<T> {
    let w = wake.clone();
    supervise(kind, wake, health, RESTART_PAUSE, move |writer| {
        watch(api.clone(), cfg.clone(), writer, kind, w.clone())
    })
}

/// The supervisor of [`spawn_watch`]: runs `watch_into(writer)` as a task, and whenever
/// that task ends or panics, reports the fault and starts it again into a new store, which
/// replaces the shared one once complete.
fn supervise<T, F, Fut>(
    kind: &'static str,
    wake: mpsc::Sender<()>,
    health: Arc<Mutex<Health>>,
    pause: std::time::Duration,
    watch_into: F,
) -> Shared<T>
where
    T: Watched,
    F: Fn(Writer<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (reader, writer) = store::<T>();
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
                let (reader, w) = store::<T>();
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

/// How often [`ApiSource::ready`] looks again for a replaced store.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Pause before a dead watch task is replaced.
const RESTART_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The `/healthz` fault name of each watched kind.
const FAULTS: [(&str, &str); 3] = [
    ("Service", "Service watch"),
    ("EndpointSlice", "EndpointSlice watch"),
    ("Node", "Node watch"),
];

/// One watch stream into `writer`, until the stream ends.
async fn watch<T: Watched>(
    api: Api<Wire<T>>,
    cfg: watcher::Config,
    mut writer: Writer<T>,
    kind: &'static str,
    wake: mpsc::Sender<()>,
) {
    let stream = watcher(api, cfg).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                // The store is only swapped on InitDone: waking on Init/InitApply would show
                // the old list again, harmless but useless.
                let wakes = match &ev {
                    watcher::Event::Init | watcher::Event::InitApply(_) => false,
                    watcher::Event::InitDone => {
                        debug!(kind, "list complete");
                        true
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => true,
                };
                failing = false;
                writer.apply_watcher_event(ev);
                if wakes {
                    let _ = wake.try_send(());
                }
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
        let services = spawn_watch(
            Api::<Wire<Service>>::all(client.clone()),
            watcher::Config::default(),
            "Service",
            wake.clone(),
            health.clone(),
        );
        let slices = spawn_watch(
            Api::<Wire<EndpointSlice>>::all(client.clone()),
            watcher::Config::default(),
            "EndpointSlice",
            wake.clone(),
            health.clone(),
        );
        let node = spawn_watch(
            Api::<Wire<Node>>::all(client.clone()),
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
    /// every Service the maps hold. A watch task that dies first is restarted into a new store
    /// ([`supervise`]), which is waited for in its turn.
    pub async fn ready(&self) {
        async fn complete<T: lb_model::k8s::Object>(s: &Shared<T>) {
            loop {
                let store = s.read().expect("store lock").clone();
                let wait = store.wait_until_ready();
                if let Ok(Ok(())) = tokio::time::timeout(READY_POLL, wait).await {
                    return;
                }
            }
        }
        complete(&self.services).await;
        complete(&self.slices).await;
        complete(&self.node).await;
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
                Wire::<Service>::group(&()).into_owned(),
                Wire::<Service>::plural(&()).into_owned(),
            ),
            (
                Wire::<EndpointSlice>::group(&()).into_owned(),
                Wire::<EndpointSlice>::plural(&()).into_owned(),
            ),
            (
                Wire::<Node>::group(&()).into_owned(),
                Wire::<Node>::plural(&()).into_owned(),
            ),
        ];
        let declared: Vec<(String, String)> = WATCHES
            .iter()
            .map(|(g, r)| ((*g).to_owned(), (*r).to_owned()))
            .collect();
        assert_eq!(declared, typed);
    }

    /// A slice from the API server is kept without its endpoints' target references (nothing
    /// reads them), and with everything the model and DNS read.
    #[test]
    fn a_watched_slice_is_kept_without_target_references() {
        let w: Wire<EndpointSlice> = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x1", "namespace": "t", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["198.18.0.5"], "hostname": "web-0", "nodeName": "node-a",
                "zone": "zone-a", "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": "t", "name": "web-0",
                              "uid": "0b8f3a52-6c1e-4f0e-9d6a-2f1c3b4a5d6e"}
            }]
        }))
        .expect("a watch event's EndpointSlice");
        let s = w.into_slim();
        let e = &s.endpoints[0];
        assert_eq!(e.target_ref, None);
        assert_eq!(
            e.addresses.first().map(lb_model::k8s::Str::as_str),
            Some("198.18.0.5")
        );
        assert_eq!(
            (
                e.hostname.as_deref(),
                e.node_name.as_deref(),
                e.zone.as_deref()
            ),
            (Some("web-0"), Some("node-a"), Some("zone-a"))
        );
        assert_eq!(e.conditions.and_then(|c| c.ready), Some(true));
        assert_eq!(s.metadata.name.as_deref(), Some("web-x1"));
        assert_eq!(s.ports.as_ref().map(|p| p.len()), Some(1));
    }

    /// A watch event's object (as the API sends it, with fields `lb` does not read) lands in
    /// the store slim: identity, labels and creation time kept, `managedFields` and the
    /// resourceVersion dropped; a relist replaces the content at once, a delete removes by
    /// namespace/name.
    #[tokio::test]
    async fn the_store_keeps_slim_objects_by_namespace_and_name() {
        let wire = |name: &str, port: i32| -> Wire<Service> {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {
                    "name": name, "namespace": "t", "resourceVersion": "41", "uid": "u-1",
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "labels": {"app": name},
                    "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
                },
                "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": port}]}
            }))
            .expect("a watch event's Service")
        };
        let (store, mut w) = store::<Service>();
        w.apply_watcher_event(watcher::Event::Init);
        w.apply_watcher_event(watcher::Event::InitApply(wire("b", 80)));
        assert!(
            store.state().is_empty(),
            "a relist shows only once complete"
        );
        w.apply_watcher_event(watcher::Event::InitApply(wire("a", 80)));
        w.apply_watcher_event(watcher::Event::InitDone);
        store.wait_until_ready().await.expect("ready");
        let names = |s: &Store<Service>| -> Vec<String> {
            s.state()
                .iter()
                .filter_map(|o| Some(o.metadata.name.as_deref()?.to_owned()))
                .collect()
        };
        assert_eq!(names(&store), ["a", "b"]);
        let a = store.state()[0].clone();
        assert_eq!(a.metadata.uid, Some("u-1".into()));
        assert_eq!(a.metadata.namespace.as_deref(), Some("t"));
        assert!(a.metadata.creation_timestamp.is_some());
        assert_eq!(
            a.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .map(lb_model::k8s::Str::as_str),
            Some("a")
        );
        let before = store.state();
        w.apply_watcher_event(watcher::Event::Apply(wire("a", 81)));
        let after = store.state();
        assert!(Arc::ptr_eq(&before[1], &after[1]), "b is the same object");
        assert_eq!(
            after[0]
                .spec
                .as_ref()
                .expect("spec")
                .ports
                .as_ref()
                .expect("ports")[0]
                .port,
            81
        );
        w.apply_watcher_event(watcher::Event::Delete(wire("b", 0)));
        assert_eq!(names(&store), ["a"]);

        // A relist in any order, one key listed twice: sorted, the later one kept.
        w.apply_watcher_event(watcher::Event::Init);
        for (name, port) in [("c", 80), ("a", 80), ("b", 80), ("a", 82)] {
            w.apply_watcher_event(watcher::Event::InitApply(wire(name, port)));
        }
        w.apply_watcher_event(watcher::Event::InitDone);
        assert_eq!(names(&store), ["a", "b", "c"]);
        let a = &store.state()[0];
        assert_eq!(
            a.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .expect("ports")[0]
                .port,
            82
        );
    }

    /// A watch task that panics: its store keeps the last complete list (never an empty one),
    /// `/healthz` reports the fault, and the restarted watch's store replaces it once complete,
    /// clearing the fault.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_watch_task_is_restarted_and_its_store_swapped_in_once_complete() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        let svc = |name: &str| Wire {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            obj: Service::default(),
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
                    w.apply_watcher_event(watcher::Event::Init);
                    w.apply_watcher_event(watcher::Event::InitApply(obj));
                    w.apply_watcher_event(watcher::Event::InitDone);
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
                .filter_map(|o| Some(o.metadata.name.as_deref()?.to_owned()))
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
