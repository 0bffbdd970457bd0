//! The destination side: accepts migrations on the QUIC endpoint and implements `DestHost`.
//! Incoming files are staged under `<state-dir>/migrations/<id>.in/` (`layers/`, `presync/`,
//! `images/`, `delta/`); the restore imports the layers, places the container directory (spec,
//! state, writable layer, checkpoint images), runs the agent's restore path (`mig-shim restore`)
//! and freezes the restored container at once; Commit thaws it.

use super::chain;
use super::journal;
use crate::daemon::events::EventKind;
use crate::daemon::Agent;
use mig_migrate::protocol::{Outcome, Role};
use mig_migrate::transport::{self, HostError, Progress, Refusal};
use mig_migrate::wire::{MigrationMode, Prepare, RefuseReason};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod check;
pub(crate) use check::{release_memory, unrestorable_here};
mod finish;
mod host;
mod restore;
mod staging;

pub(crate) use check::{arriving_id, arriving_named, remove_left_over_staging, reserving};
pub(crate) use finish::{cleanup_incoming, resume_incoming};
pub(crate) use host::spawn_acceptor;

/// How long freezing the restored container may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Marker in a container directory made by an incoming migration (its id), until Commit. The
/// shim restores such a container frozen (agent/src/shim/frozen.rs).
pub(crate) const MARKER: &str = crate::shim::RESTORE_FROZEN_MARKER;

/// Whether container `container_id` here still carries migration `migration_id`'s [`MARKER`]:
/// that migration made it and has not resumed it yet.
pub(crate) fn marked_by(agent: &Agent, container_id: &str, migration_id: &str) -> bool {
    std::fs::read_to_string(agent.dirs.container(container_id).dir.join(MARKER))
        .is_ok_and(|m| m.trim() == migration_id)
}

/// Failures of the destination's host actions.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("unknown migration {id}")]
    Unknown { id: String },
    #[error("invalid file name {path:?}")]
    BadName { path: String },
    #[error("cannot link the pre-copy rounds")]
    Rounds(#[source] super::precopy::RoundsError),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot import layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: mig_runtime::image::ImageError,
    },
    #[error("cannot record the image")]
    Image(#[source] mig_runtime::image::ImageError),
    #[error("cannot unpack the writable layer")]
    Upper(#[source] mig_migrate::archive::LayerError),
    #[error("the writable layer was not received")]
    NoUpper,
    #[error("the end of the container's log arrived without its start")]
    NoLogHead,
    #[error("container directory {path} already exists")]
    Exists { path: PathBuf },
    #[error("cannot make the container's directory")]
    ContainerDir(#[source] crate::privacy::PrivacyError),
    /// (The message leaves "restore failed" out: the source says "the restore failed" first.)
    #[error("{message}")]
    Restore { message: String },
    #[error(
        "this host cannot hold the container's memory: its image set holds {} MiB, and {} MiB are left within {within} (the restored copy would be killed for lack of memory after the commit)",
        need >> 20,
        room >> 20
    )]
    NoMemory {
        need: u64,
        room: u64,
        within: String,
    },
    #[error("cannot open the cgroup {name}")]
    Cgroup {
        name: String,
        #[source]
        source: mig_runtime::cgroup::CgroupError,
    },
    #[error("the migration sends more than this agent's limit of {limit} bytes (migd --max-incoming-bytes)")]
    TooLarge { limit: u64 },
    #[error("cannot freeze the restored container")]
    Freeze(#[source] mig_runtime::cgroup::CgroupError),
    #[error("cannot thaw the restored container")]
    Thaw(#[source] mig_runtime::cgroup::CgroupError),
    #[error("the restored container's supervisor (mig-shim) or its init is gone")]
    CopyGone,
    /// A post-copy's copy asked to resume on another connection than the one that carried
    /// the move: its lazy-pages daemon fetched the missing memory through that one.
    #[error("this copy came by post-copy and most of its memory is still on {peer}, whose page stream has ended: it cannot run")]
    PostcopyCut { peer: String },
    #[error("cannot remove the restored copy: {message}")]
    Remove { message: String },
    #[error("cannot write the journal")]
    Journal(#[source] journal::JournalError),
    #[error("background task failed: {0}")]
    Task(String),
    #[error("injected fault at {0}")]
    Injected(&'static str),
    #[error("cannot move the memory pages")]
    Pages(#[source] super::pages::PagesError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DestError + '_ {
    move |source| DestError::Io {
        path: path.to_owned(),
        source,
    }
}

fn boxed(e: DestError) -> HostError {
    Box::new(e)
}

/// What the destination remembers of a migration (from the Prepare, or from its journal).
#[derive(Debug, Clone)]
struct Incoming {
    container_id: String,
    container_name: String,
    prepare: Option<Box<Prepare>>,
    /// When this agent heard of the migration (phase events count from it).
    started: std::time::Instant,
    /// The most bytes a phase event of it counted (its `migration_done` says them).
    bytes: u64,
}

/// The destination's host for one connection.
pub(crate) struct DestSide {
    agent: Arc<Agent>,
    /// The source agent's name (its pinned peer name, else its hello name).
    source: String,
    migs: Mutex<HashMap<String, Incoming>>,
    /// Bytes announced in file headers so far, per migration (bounded by the agent's limit).
    placed: Mutex<HashMap<String, u64>>,
    /// Image files arrived, per migration: path -> the SHA-256 (hex) it matched on arrival (in
    /// its header, or after its bytes from a 1.1 source; `receive_file` deletes a file that
    /// does not match).
    arrived: Mutex<HashMap<String, HashMap<String, String>>>,
    /// The connection, for page tunnels (modes `stream` and `lazy`, see [`super::pages`]).
    conn: std::sync::OnceLock<quinn::Connection>,
    /// Whether tunnel streams from the source are accepted yet (after the control stream).
    serving: std::sync::atomic::AtomicBool,
    /// The migrations this connection's machine acts on ([`super::recover::hold`]), released
    /// when the machine is done ([`DestSide::release`]).
    held: Mutex<Vec<tokio::sync::OwnedMutexGuard<()>>>,
}

impl DestSide {
    pub(crate) fn new(agent: Arc<Agent>, source: String) -> DestSide {
        DestSide {
            agent,
            source,
            migs: Mutex::new(HashMap::new()),
            placed: Mutex::new(HashMap::new()),
            arrived: Mutex::new(HashMap::new()),
            conn: Default::default(),
            serving: Default::default(),
            held: Default::default(),
        }
    }

    /// Holds migration `id` for this connection's machine; false when another machine still
    /// acts on it after [`super::recover::DEST_HOLD_LIMIT`].
    async fn hold(&self, id: &str) -> bool {
        match super::recover::hold_within(id, super::recover::DEST_HOLD_LIMIT).await {
            Some(g) => {
                self.held.lock().unwrap_or_else(|p| p.into_inner()).push(g);
                true
            }
            None => false,
        }
    }

    /// Lets other machines act on this connection's migrations (its machine is done).
    pub(crate) fn release(&self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn mode_of(inc: &Incoming) -> Option<MigrationMode> {
        inc.prepare.as_ref().map(|p| p.mode)
    }

    /// Stream mode, at Prepare: accepts the source's tunnel streams and starts the page server.
    async fn start_stream(&self, p: &Prepare) -> Result<(), Refusal> {
        if !self.serving.swap(true, std::sync::atomic::Ordering::SeqCst) {
            if let Some(conn) = self.conn.get().cloned() {
                tokio::spawn(transport::tunnel::serve(conn, super::pages::resolve));
            }
        }
        let id = p.migration_id.clone();
        // A test's `dest-memory-presync:fail`: the source's memory presync is refused (it then
        // sends every page while frozen).
        let presync = super::fault::armed(
            &self.agent.cfg.state_dir,
            super::fault::Point::DestMemoryPresync,
        ) != Some(super::fault::Fault::Fail);
        let max_bytes = self.agent.cfg.max_incoming_bytes;
        let started = match self.staging(&id) {
            Ok(staging) => tokio::task::spawn_blocking(move || {
                super::pages::start_page_server(&id, &staging.join("images"), presync, max_bytes)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| chain(&e))),
            Err(e) => Err(e.to_string()),
        };
        if let Err(detail) = started {
            // What the page side registered (the presync's service) goes too.
            super::pages::forget(&p.migration_id);
            self.migs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&p.migration_id);
            if let Ok(staging) = self.staging(&p.migration_id) {
                let _ = std::fs::remove_dir_all(staging);
            }
            return Err(Refusal {
                reason: RefuseReason::Policy,
                detail: format!("cannot start the page server: {detail}"),
            });
        }
        Ok(())
    }

    fn incoming(&self, id: &str) -> Result<Incoming, DestError> {
        if let Some(i) = self.migs.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(i.clone());
        }
        let e = journal::read(&self.agent.cfg.state_dir, id)
            .filter(|e| e.role == Role::Dest)
            .ok_or_else(|| DestError::Unknown { id: id.to_owned() })?;
        Ok(Incoming {
            container_id: e.container_id,
            container_name: e.container_name,
            prepare: None,
            started: std::time::Instant::now(),
            bytes: 0,
        })
    }

    /// Emits [`EventKind::MigrationPhase`] for a migration this side knows.
    fn emit_phase(&self, migration_id: &str, p: Progress) {
        let inc = {
            let mut migs = self.migs.lock().unwrap_or_else(|p| p.into_inner());
            let Some(inc) = migs.get_mut(migration_id) else {
                return;
            };
            inc.bytes = inc.bytes.max(p.bytes);
            inc.clone()
        };
        self.agent.emit(EventKind::MigrationPhase {
            migration_id: migration_id.to_owned(),
            container_id: inc.container_id,
            container_name: inc.container_name,
            role: "destination".into(),
            peer: self.source.clone(),
            phase: p.phase.into(),
            elapsed_ms: super::ms(inc.started.elapsed()),
            bytes: p.bytes,
            total_bytes: p.total,
        });
    }

    /// Emits [`EventKind::MigrationDone`] at the end of an incoming migration.
    /// Not after a failed post-copy, whose `migration_done` (`postcopy_failed`) is already out.
    fn emit_done(&self, r: &transport::DestReport) {
        // Only the move's own connection: a Resolve's took the watcher's note, and the move's
        // then said `committed` after `postcopy_failed` (QA of session 31, L1).
        let Some(inc) = self.known(&r.migration_id) else {
            return;
        };
        if super::pages::take_postcopy_failed(&r.migration_id) {
            return;
        }
        let (outcome, error) = match (&r.outcome, r.in_doubt) {
            (_, true) => ("in_doubt", None),
            (Some(Outcome::Committed { cleanup_error }), _) => ("committed", cleanup_error.clone()),
            (Some(Outcome::RolledBack { detail, .. }), _) => ("rolled_back", Some(detail.clone())),
            (None, _) => ("rolled_back", None),
        };
        self.agent.emit(EventKind::MigrationDone {
            migration_id: r.migration_id.clone(),
            container_id: inc.container_id,
            container_name: inc.container_name,
            role: "destination".into(),
            peer: self.source.clone(),
            outcome: outcome.into(),
            total_ms: super::ms(inc.started.elapsed()),
            downtime_ms: None,
            bytes: inc.bytes,
            error,
        });
    }

    /// The migration as this connection knows it (no journal lookup).
    fn known(&self, id: &str) -> Option<Incoming> {
        self.migs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn staging(&self, id: &str) -> Result<PathBuf, DestError> {
        journal::staging(&self.agent.cfg.state_dir, id)
            .map_err(|_| DestError::Unknown { id: id.to_owned() })
    }

    fn cgroup_of(&self, container_id: &str) -> String {
        self.agent.cgroup_name(container_id)
    }
}
