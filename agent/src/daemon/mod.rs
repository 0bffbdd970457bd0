//! `migd`: the per-host agent. It owns the host's containers and images and serves the API on a
//! unix socket (mini-redis' skeleton: [`run`] takes a listener and a shutdown future, a broadcast
//! tells connections to finish, a semaphore bounds concurrent connections).
//!
//! The agent never forks a container itself: it starts one `mig-shim` per container with
//! fork+exec ([`tokio::process::Command`]), and reads back the shim's records from disk, which is
//! also how it re-adopts containers after a restart ([`Agent::open`]).

mod bundle;
pub(crate) mod checkpoint;
mod connection;
mod containers;
pub(crate) use containers::is_stopping;
pub mod events;
mod exec;
pub mod heap;
pub(crate) mod info;
pub(crate) use info::mem_total_bytes;
mod logs;
pub(crate) mod marks;
mod mounts;

/// Serves an API session on an already authenticated stream (the remote API bridges to it).
pub(crate) use connection::serve_authenticated as serve_bridged;
pub use mounts::is_mounted;

use crate::api::{ApiError, ContainerState, ErrorKind};
use crate::layout::{StateDir, StateRecord};
use mig_runtime::image::ImageStore;
use mig_runtime::spec::ContainerSpec;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, Semaphore};

/// How many connections are served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 128;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute path of the state directory.
    pub state_dir: PathBuf,
    /// The agent's (host's) name.
    pub name: String,
    /// Parent of every container cgroup (`<cgroup_parent>/<id>`).
    pub cgroup_parent: String,
    /// The `mig-shim` binary.
    pub shim: PathBuf,
    /// The most bytes an incoming migration may declare or send (`migd --max-incoming-bytes`);
    /// a larger one is refused at Prepare, before anything is written.
    pub max_incoming_bytes: u64,
    /// Incoming migrations accepted at once (`limits.max_incoming_moves`); more are refused as
    /// busy at Prepare. `None`: no limit.
    pub max_incoming_moves: Option<u32>,
    /// Moves started from this agent at once (`limits.max_outgoing_moves`); more are refused
    /// before anything is frozen. `None`: no limit.
    pub max_outgoing_moves: Option<u32>,
}

/// The default of [`Config::max_incoming_bytes`]: 64 GiB.
pub const DEFAULT_MAX_INCOMING_BYTES: u64 = 64 << 30;

/// Failures while starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Creating it, or giving it and what is in it their modes (privacy.rs).
    #[error("cannot make the state directory private")]
    StateDir(#[source] crate::privacy::PrivacyError),
    #[error("cannot open the image store")]
    Images(#[source] mig_runtime::image::ImageError),
    #[error("cannot read the container directory {path}")]
    ReadContainers {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One container as the agent tracks it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub spec: ContainerSpec,
    pub state: StateRecord,
    /// An operation (run, checkpoint, restore) is changing the container: refresh leaves it alone.
    pub busy: bool,
}

/// The agent's shared state.
#[derive(Debug)]
pub struct Agent {
    pub(crate) cfg: Config,
    pub(crate) dirs: StateDir,
    pub(crate) images: ImageStore,
    pub(crate) containers: Mutex<HashMap<String, Entry>>,
    /// Live migration: the QUIC endpoint, identity and peers (set by [`crate::migration::start`]).
    pub(crate) migration: crate::migration::Migrations,
    /// Container and migration events for subscribers ([`events`]).
    pub(crate) events: events::Events,
}

impl Agent {
    /// The cgroup (relative name) of container `id` on this host.
    pub(crate) fn cgroup_name(&self, id: &str) -> String {
        format!("{}/{}", self.cfg.cgroup_parent, id)
    }

    /// Opens the state directory, loads every container and re-adopts the running ones (their
    /// shim is alive). Returns the agent and the ids of live containers to watch.
    pub fn open(cfg: Config) -> Result<(Arc<Agent>, Vec<String>), DaemonError> {
        let dirs = StateDir::new(&cfg.state_dir);
        // Before anything is read or written there: an older migd's 0755 directory is closed.
        let changed = crate::privacy::secure_state_dir(&dirs).map_err(DaemonError::StateDir)?;
        if !changed.is_empty() {
            tracing::info!(paths = ?changed, "made private (docs/security.md, \"The state directory\")");
        }
        let images = ImageStore::open(&dirs.images())
            .map_err(DaemonError::Images)?
            .keep_used(image_in_use(dirs.containers()));
        let agent = Arc::new(Agent {
            cfg,
            dirs,
            images,
            containers: Mutex::new(HashMap::new()),
            migration: Default::default(),
            events: Default::default(),
        });
        let live = agent.load_all()?;
        Ok((agent, live))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves consistent data (every update is one assignment).
        self.containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Finds a container by id, unique id prefix or name.
    pub(crate) fn resolve(&self, key: &str) -> Result<String, ApiError> {
        let map = self.lock();
        if map.contains_key(key) {
            return Ok(key.to_owned());
        }
        if let Some((id, _)) = map.iter().find(|(_, e)| e.spec.name == key) {
            return Ok(id.clone());
        }
        let matches: Vec<&String> = if key.is_empty() {
            Vec::new()
        } else {
            map.keys().filter(|id| id.starts_with(key)).collect()
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                drop(map);
                Err(self.not_found(key))
            }
            _ => Err(ApiError::new(
                ErrorKind::Ambiguous,
                format!(
                    "{key} matches {} containers: use more of the id",
                    matches.len()
                ),
            )),
        }
    }

    pub(crate) fn entry(&self, id: &str) -> Result<Entry, ApiError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no such container: {id}")))
    }

    pub(crate) fn running_count(&self) -> (u32, u32) {
        let map = self.lock();
        let running = map
            .values()
            .filter(|e| e.state.state == ContainerState::Running)
            .count();
        (running as u32, map.len() as u32)
    }
}

/// Serves the API on `listener` until `shutdown` completes. Containers keep running afterwards.
pub async fn run(listener: UnixListener, agent: Arc<Agent>, shutdown: impl Future) {
    let (notify_shutdown, _) = broadcast::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let server = async {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let agent = agent.clone();
            let rx = notify_shutdown.subscribe();
            tokio::spawn(async move {
                connection::serve(agent, stream, rx).await;
                drop(permit);
            });
        }
    };
    tokio::select! {
        _ = server => {}
        _ = shutdown => tracing::info!("shutting down"),
    }
    drop(notify_shutdown);
}

/// Starts a watcher for every container in `ids` (re-adopted at start).
pub fn watch_adopted(agent: &Arc<Agent>, ids: Vec<String>) {
    for id in ids {
        containers::spawn_watch(agent.clone(), id, None);
    }
}

/// Whether a container record under `containers` names the image (its spec read as text, so a
/// record of any format counts): an image import or a received image that takes the name of an
/// image in use keeps that image under another name instead of collecting its layers.
fn image_in_use(containers: std::path::PathBuf) -> mig_runtime::image::InUse {
    Arc::new(move |img: &mig_runtime::image::Image| {
        let Ok(rd) = std::fs::read_dir(&containers) else {
            return true;
        };
        rd.flatten().any(|e| {
            std::fs::read_to_string(e.path().join("spec.json"))
                .is_ok_and(|text| text.contains(&img.id))
        })
    })
}
