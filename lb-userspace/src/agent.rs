//! `lb-agent run`: load and attach the datapath, adopt what the maps hold, then keep them equal
//! to the source (manifest files or the Kubernetes API) — level-triggered: every change takes a
//! complete snapshot of the source, rebuilds the desired state and diffs it against the shadow.
use std::{
    collections::BTreeSet,
    error::Error as StdError,
    path::PathBuf,
    time::{Duration, Instant},
};

use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    loader::{self, Sizes},
    maps::BpfMaps,
    model,
    source::{ManifestDir, Objects, api::ApiSource},
    sync::{self, Shadow},
};

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone)]
pub enum SourceOpt {
    /// A directory of manifest files, watched with inotify.
    Manifests(PathBuf),
    /// The Kubernetes API: `--kubeconfig`, else the in-cluster service account.
    Api { kubeconfig: Option<PathBuf> },
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub source: SourceOpt,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub sizes: Sizes,
    pub model: model::Config,
    /// Full resync even without file events (missed inotify events, clock-driven safety net).
    pub resync_every: Duration,
    /// Quiet time after an event before syncing, so a burst (an editor's write sequence, a
    /// rollout's EndpointSlice updates) is one sync.
    pub debounce: Duration,
    /// Least time between the starts of two syncs (kube-proxy's minSyncPeriod).
    pub min_sync_interval: Duration,
}

/// The running source.
enum Source {
    Manifests(ManifestDir),
    Api(ApiSource),
}

impl Source {
    /// A complete snapshot and the problems met taking it.
    fn snapshot(&mut self) -> (Objects, Vec<String>) {
        match self {
            Self::Manifests(m) => {
                let (o, errors) = m.read();
                (o, errors.iter().map(|e| chain(e)).collect())
            }
            Self::Api(a) => (a.snapshot(), Vec::new()),
        }
    }
}

/// Formats an error with its whole `source()` chain.
pub fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct State {
    src: Source,
    cfg: model::Config,
    maps: BpfMaps,
    capacity: sync::Capacity,
    shadow: Shadow,
    /// Problems already reported, so a resync does not repeat them.
    reported: BTreeSet<String>,
}

impl State {
    fn sync(&mut self) {
        let started = Instant::now();
        let (objs, source_errors) = self.src.snapshot();
        // The zone can change with the Node's labels: take it from this snapshot.
        self.cfg.zone = objs
            .node
            .as_ref()
            .and_then(|n| n.metadata.labels.as_ref()?.get(model::LABEL_ZONE).cloned());
        let (mut desired, model_errors) = model::build(&objs.services, &objs.slices, &self.cfg);
        let owners: Vec<(model::Frontend, model::NsName)> = desired
            .frontends
            .iter()
            .map(|(f, s)| (*f, s.service.clone()))
            .collect();
        let refused = sync::fit(&mut desired, &self.shadow, &self.capacity);
        let capacity_errors = refused.iter().map(|fe| {
            let owner = owners.iter().find(|(f, _)| f == fe).map_or_else(String::new, |(_, s)| s.to_string());
            format!(
                "Service {owner}: {fe}: not programmed, the maps are full (max entries: services v4 {} v6 {}, backends v4 {} v6 {}); \
                 it keeps what it had, raise --max-service-entries/--max-backend-entries",
                self.capacity.svc4, self.capacity.svc6, self.capacity.be4, self.capacity.be6
            )
        });
        let now: BTreeSet<String> = source_errors
            .into_iter()
            .chain(model_errors.iter().map(ToString::to_string))
            .chain(capacity_errors)
            .collect();
        for e in now.difference(&self.reported) {
            warn!(error = %e, "invalid input skipped");
        }
        self.reported = now;

        let ops = sync::diff(&desired, &self.shadow);
        if ops.is_empty() {
            debug!(
                frontends = desired.frontends.len(),
                "datapath already up to date"
            );
            return;
        }
        match sync::apply(&ops, &mut self.maps, &mut self.shadow) {
            Ok(n) => {
                trim_heap();
                info!(
                    ops = n,
                    frontends = desired.frontends.len(),
                    services = objs.services.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "programmed datapath"
                );
            }
            Err((applied, e)) => error!(
                error = %chain(&e),
                applied,
                pending = ops.len() - applied,
                "map update failed; what was written is consistent, retrying on the next sync"
            ),
        }
    }
}

/// Returns freed parser memory to the kernel: a 10,000-Service resync allocates (and frees) a
/// few hundred MiB of YAML trees, which glibc would otherwise keep as RSS.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the agent until SIGTERM/SIGINT. The datapath stays attached after exit (pinned), so
/// traffic keeps flowing across restarts; `lb-agent cleanup` removes it.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let maps = loader::load_and_attach(&opts.bpffs, &opts.cgroup, opts.sizes)
        .map_err(|e| anyhow::anyhow!("cannot load or attach the datapath: {}", chain(&e)))?;
    let shadow = maps
        .read_shadow()
        .map_err(|e| anyhow::anyhow!("cannot read pinned maps: {}", chain(&e)))?;
    info!(
        node = %opts.node_name,
        cgroup = %opts.cgroup.display(),
        bpffs = %opts.bpffs.display(),
        adopted_entries = shadow.svc.len(),
        adopted_backends = shadow.backends.len(),
        "datapath attached"
    );
    let capacity = maps.capacity();

    // Every source wakes the loop through a 1-slot channel: a burst leaves one pending wake-up.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut _inotify = None;
    let src = match &opts.source {
        SourceOpt::Manifests(dir) => {
            let tx = tx.clone();
            let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.is_ok() {
                    let _ = tx.try_send(());
                }
            })?;
            w.watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
            _inotify = Some(w);
            Source::Manifests(ManifestDir::new(dir))
        }
        SourceOpt::Api { kubeconfig } => {
            let client = crate::source::api::client(kubeconfig.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!(chain(&e)))?;
            let api = ApiSource::start(&client, &opts.node_name, &tx);
            info!("waiting for the first list of Services, EndpointSlices and this Node");
            // Until every store is complete the adopted maps stay exactly as they are.
            tokio::select! {
                r = api.ready() => r.map_err(|e| anyhow::anyhow!(chain(&e)))?,
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
            Source::Api(api)
        }
    };
    let mut state = State {
        src,
        cfg: opts.model.clone(),
        maps,
        capacity,
        shadow,
        reported: BTreeSet::new(),
    };
    state.sync();
    let mut last_sync = Instant::now();
    info!(source = ?opts.source, "agent ready");

    let mut resync = tokio::time::interval(opts.resync_every);
    resync.reset();
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                let at = (Instant::now() + opts.debounce).max(last_sync + opts.min_sync_interval);
                tokio::time::sleep_until(at.into()).await;
                while rx.try_recv().is_ok() {}
                last_sync = Instant::now();
                state.sync();
            }
            _ = resync.tick() => {
                last_sync = Instant::now();
                state.sync();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("exiting; the datapath stays attached (run `lb-agent cleanup` to remove it)");
    Ok(())
}
