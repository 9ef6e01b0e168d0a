//! `lb-agent run`: load and attach the datapath, adopt what the maps hold, then keep them equal
//! to the manifests — level-triggered: every change rereads everything, rebuilds the desired
//! state and diffs it against the shadow.
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
    source::ManifestDir,
    sync::{self, Shadow},
};

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub manifests: PathBuf,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub sizes: Sizes,
    pub model: model::Config,
    /// Full resync even without file events (missed inotify events, clock-driven safety net).
    pub resync_every: Duration,
    /// Quiet time after a file event before syncing, so an editor's write sequence is one sync.
    pub debounce: Duration,
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
    src: ManifestDir,
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
        let (objs, file_errors) = self.src.read();
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
        let now: BTreeSet<String> = file_errors
            .iter()
            .map(|e| chain(e))
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
    let mut state = State {
        src: ManifestDir::new(&opts.manifests),
        cfg: opts.model.clone(),
        maps,
        capacity,
        shadow,
        reported: BTreeSet::new(),
    };

    // inotify → a 1-slot channel: a burst of events leaves one pending wake-up.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.try_send(());
        }
    })?;
    watcher
        .watch(&opts.manifests, RecursiveMode::NonRecursive)
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", opts.manifests.display()))?;

    state.sync();
    info!(manifests = %opts.manifests.display(), "watching manifests");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(opts.resync_every);
    resync.reset();
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                tokio::time::sleep(opts.debounce).await;
                while rx.try_recv().is_ok() {}
                state.sync();
            }
            _ = resync.tick() => state.sync(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("exiting; the datapath stays attached (run `lb-agent cleanup` to remove it)");
    Ok(())
}
