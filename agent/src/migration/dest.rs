//! The destination side: accepts migrations on the QUIC endpoint and implements `DestHost`.
//! Incoming files are staged under `<state-dir>/migrations/<id>.in/` (`layers/`, `presync/`,
//! `images/`, `delta/`); the restore imports the layers, places the container directory (spec,
//! state, writable layer, checkpoint images), runs the agent's restore path (`mig-shim restore`)
//! and freezes the restored container at once; Commit thaws it.

use super::chain;
use super::fault::{self, Fault, Point};
use super::journal::{self, JournalEntry};
use super::source::{LOG_FILE, LOG_TAIL_FILE, STATE_FILE, UPPER_DELTA_TAR, UPPER_TAR};
use crate::api::{ContainerState, Response};
use crate::daemon::events::EventKind;
use crate::daemon::{Agent, Entry};
use crate::layout::{now, StateRecord};
use mig_migrate::criu::Criu;
use mig_migrate::protocol::Outcome;
use mig_migrate::protocol::{JournalRecord, JournalState, Role, Timeouts};
use mig_migrate::transport::{self, DestHost, HostError, Progress, Refusal};
use mig_migrate::wire::{FileHeader, FileKind, MigrationMode, Phase, Prepare, RefuseReason};
use mig_runtime::cgroup::Cgroup;
use mig_runtime::fsutil;
use mig_runtime::pidmap::PidEntry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long freezing the restored container may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Marker in a container directory made by an incoming migration (its id), until Commit. The
/// shim restores such a container frozen (agent/src/shim/frozen.rs).
pub(crate) const MARKER: &str = crate::shim::RESTORE_FROZEN_MARKER;

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
    #[error("restore failed: {message}")]
    Restore { message: String },
    #[error("cannot open the cgroup {name}")]
    Cgroup {
        name: String,
        #[source]
        source: mig_runtime::cgroup::CgroupError,
    },
    #[error("the migration sends more than this agent's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("cannot freeze the restored container")]
    Freeze(#[source] mig_runtime::cgroup::CgroupError),
    #[error("cannot thaw the restored container")]
    Thaw(#[source] mig_runtime::cgroup::CgroupError),
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
        let started = match self.staging(&id) {
            Ok(staging) => tokio::task::spawn_blocking(move || {
                super::pages::start_page_server(&id, &staging.join("images"), presync)
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
    fn emit_done(&self, r: &transport::DestReport) {
        let Some(inc) = self.known(&r.migration_id) else {
            return;
        };
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
        format!("{}/{}", self.agent.cfg.cgroup_parent, container_id)
    }

    fn check_blocking(&self, p: &Prepare) -> Result<Vec<String>, Refusal> {
        let refuse = |reason, detail: String| Refusal { reason, detail };
        if !journal::valid_id(&p.migration_id) {
            return Err(refuse(
                RefuseReason::InvalidSpec,
                "invalid migration id".into(),
            ));
        }
        p.spec
            .validate()
            .map_err(|e| refuse(RefuseReason::InvalidSpec, e.to_string()))?;
        if p.spec.image.id != p.image.id || p.spec.image.layers != p.image.layers {
            return Err(refuse(
                RefuseReason::InvalidSpec,
                "the image does not match the spec".into(),
            ));
        }
        let criu = Criu::locate().map_err(|e| refuse(RefuseReason::CriuVersion, chain(&e)))?;
        let v = criu
            .version()
            .map_err(|e| refuse(RefuseReason::CriuVersion, chain(&e)))?;
        if version_key(&v) < version_key(&p.criu_version) {
            return Err(refuse(
                RefuseReason::CriuVersion,
                format!(
                    "criu {v} here is older than the source's {}",
                    p.criu_version
                ),
            ));
        }
        super::criu_kdat(&criu);
        let kernel = mig_migrate::criu::kernel_release();
        if version_key(&kernel)[..2] < version_key(&p.kernel)[..2] {
            return Err(refuse(
                RefuseReason::Kernel,
                format!(
                    "kernel {kernel} here is older than the source's {}",
                    p.kernel
                ),
            ));
        }
        // From the check of this host's containers to the reservation of the arriving id and
        // name: a `mig run` or an import of the same name waits (they take it too).
        let _reserving = reserving();
        {
            let map = self.agent.lock();
            // CRIU restores the user namespace with the dumped maps: the range must be free here.
            if let Some(m) = &p.spec.userns {
                if let Some(e) = map.values().find(|e| {
                    e.spec
                        .userns
                        .as_ref()
                        .is_some_and(|u| mig_runtime::container::userns::overlaps(m, u))
                }) {
                    return Err(refuse(
                        RefuseReason::NameClash,
                        format!(
                            "user-namespace host ids {}-{} overlap those of container {} ({}) here",
                            m.host_id,
                            u64::from(m.host_id) + u64::from(m.size) - 1,
                            e.spec.name,
                            e.spec.id
                        ),
                    ));
                }
            }
            if let Some(e) = map
                .values()
                .find(|e| e.spec.id == p.spec.id || e.spec.name == p.spec.name)
            {
                return Err(refuse(
                    RefuseReason::NameClash,
                    format!("a container {} ({}) exists here", e.spec.name, e.spec.id),
                ));
            }
        }
        if self.agent.dirs.container(&p.spec.id).dir.exists() {
            return Err(refuse(
                RefuseReason::NameClash,
                format!("a directory for container {} exists here", p.spec.id),
            ));
        }
        let busy = self
            .migs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|i| i.container_id == p.spec.id);
        if busy {
            return Err(refuse(
                RefuseReason::Busy,
                "this container is already arriving".into(),
            ));
        }
        if let Some(max) = self.agent.cfg.max_incoming_moves {
            // Every incoming migration has a staging directory until it ends.
            let arriving = std::fs::read_dir(journal::dir(&self.agent.cfg.state_dir))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".in"))
                .count();
            if arriving >= max as usize {
                return Err(refuse(
                    RefuseReason::Busy,
                    format!(
                        "this agent already receives {arriving} migration(s), its limit (limits.max_incoming_moves)"
                    ),
                ));
            }
        }
        let limit = self.agent.cfg.max_incoming_bytes;
        if p.bytes_estimate > limit {
            return Err(refuse(
                RefuseReason::Policy,
                format!(
                    "the migration declares {} bytes, above this agent's limit of {limit} (migd --max-incoming-bytes)",
                    p.bytes_estimate
                ),
            ));
        }
        let free = nix::sys::statvfs::statvfs(&self.agent.cfg.state_dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX);
        let need = p.bytes_estimate.saturating_add(p.bytes_estimate / 10);
        if free < need {
            return Err(refuse(
                RefuseReason::DiskFull,
                format!("{free} bytes free, the migration needs about {need}"),
            ));
        }
        let missing = p
            .spec
            .image
            .layers
            .iter()
            .filter(|l| !self.agent.images.has_layer(l))
            .cloned()
            .collect();
        let staging = self
            .staging(&p.migration_id)
            .map_err(|e| refuse(RefuseReason::InvalidSpec, e.to_string()))?;
        // Another connection may be receiving a container of the same id or name (two sources
        // at once): checked and reserved in the staging directories every incoming migration
        // keeps until it ends, under the lock taken above.
        if let Some((id, name)) = arriving_elsewhere(&self.agent.cfg.state_dir, &staging, p) {
            return Err(if id == p.spec.id {
                refuse(
                    RefuseReason::Busy,
                    format!("container {id} is already arriving here from another host"),
                )
            } else {
                refuse(
                    RefuseReason::NameClash,
                    format!("a container named {name} ({id}) is arriving here from another host"),
                )
            });
        }
        let _ = std::fs::remove_dir_all(&staging);
        let reserve = |staging: &Path| -> std::io::Result<()> {
            std::fs::create_dir_all(staging)?;
            std::fs::write(
                staging.join(ARRIVING_FILE),
                format!("{}\n{}\n", p.spec.id, p.spec.name),
            )
        };
        reserve(&staging).map_err(|e| {
            refuse(
                RefuseReason::DiskFull,
                format!("{}: {e}", staging.display()),
            )
        })?;
        self.migs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            p.migration_id.clone(),
            Incoming {
                container_id: p.spec.id.clone(),
                container_name: p.spec.name.clone(),
                prepare: Some(Box::new(p.clone())),
                started: std::time::Instant::now(),
                bytes: 0,
            },
        );
        Ok(missing)
    }

    fn restore_files(&self, id: &str, inc: &Incoming) -> Result<(), DestError> {
        let prepare = inc
            .prepare
            .as_ref()
            .ok_or_else(|| DestError::Unknown { id: id.to_owned() })?;
        let staging = self.staging(id)?;
        // Done at the end of the presync already (while the container still ran on the
        // source); here only for a source that sent no presync phase.
        import_layers(&self.agent.images, &staging, &prepare.image)?;
        let cd = self.agent.dirs.container(&inc.container_id);
        if cd.dir.exists() {
            return Err(DestError::Exists { path: cd.dir });
        }
        // Private from the start: the moved images are renamed into it before the restore
        // gives it the container's own mode (crate::privacy).
        crate::privacy::create_dir(&cd.dir, crate::privacy::PRIVATE_DIR)
            .map_err(DestError::ContainerDir)?;
        let marker = cd.dir.join(MARKER);
        fsutil::atomic_write(&marker, id.as_bytes()).map_err(io(&marker))?;
        place_upper(&staging, &cd.upper())?;
        place_log(&staging, &cd.log())?;
        let checkpoint = cd.checkpoint();
        let from = staging.join("images");
        std::fs::rename(&from, &checkpoint).map_err(io(&from))?;
        // Pre-copy: the rounds go beside the checkpoint, and CRIU's `parent` links (not sent)
        // are written again so that the restore reads the pages of the rounds.
        let rounds = staging.join(super::precopy::ROUNDS_DIR);
        if rounds.exists() {
            let to = cd.dir.join(super::precopy::ROUNDS_DIR);
            std::fs::rename(&rounds, &to).map_err(io(&rounds))?;
            super::precopy::link_rounds(&cd.dir, &checkpoint).map_err(DestError::Rounds)?;
        }
        Ok(())
    }

    async fn restore_inner(&self, id: &str) -> Result<Vec<PidEntry>, DestError> {
        let injected = fault::before_restore(&self.agent.cfg.state_dir).await?;
        let inc = self.incoming(id)?;
        let spec = inc
            .prepare
            .as_ref()
            .map(|p| p.spec.clone())
            .ok_or_else(|| DestError::Unknown { id: id.to_owned() })?;
        let t_pages = std::time::Instant::now();
        if let Ok(staging) = self.staging(id) {
            // Stream mode: the pages are complete once the page server ended cleanly.
            let mid = id.to_owned();
            tokio::task::spawn_blocking(move || {
                super::pages::finish_page_server(&mid, &staging.join("images"))
            })
            .await
            .unwrap_or_else(|e| Err(super::pages::PagesError::Task(e.to_string())))
            .map_err(DestError::Pages)?;
        }
        let pages_ms = super::ms(t_pages.elapsed());
        let arrived = self
            .arrived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .unwrap_or_default();
        let t_place = std::time::Instant::now();
        {
            let inc = inc.clone();
            let me = DestSide::new(self.agent.clone(), self.source.clone());
            me.migs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned(), inc.clone());
            let id = id.to_owned();
            tokio::task::spawn_blocking(move || me.restore_files(&id, &inc))
                .await
                .unwrap_or_else(|e| Err(DestError::Task(e.to_string())))?;
        }
        let cd = self.agent.dirs.container(&spec.id);
        let place_ms = super::ms(t_place.elapsed());
        let checkpoint = cd.checkpoint();
        let noted = tokio::task::spawn_blocking(move || note_arrival(&checkpoint, &arrived))
            .await
            .unwrap_or(false);
        if Self::mode_of(&inc) == Some(MigrationMode::PostCopy) {
            let conn = self
                .conn
                .get()
                .cloned()
                .ok_or(DestError::Pages(super::pages::PagesError::NoConnection))?;
            let cgroup = format!("{}/{}", self.agent.cfg.cgroup_parent, spec.id);
            super::pages::start_lazy_daemon(conn, id, cd.checkpoint(), &cd.dir, cgroup)
                .await
                .map_err(DestError::Pages)?;
        }
        let mut local_lazy = false;
        if Self::mode_of(&inc) == Some(MigrationMode::Stream)
            && spec.userns.is_some()
            && !super::modes::userns_may_use_uffd()
        {
            // The restored tasks could not open their userfaultfd inside the user namespace.
            tracing::info!(migration = %id, "user-namespace container: restoring every page before the resume (vm.unprivileged_userfaultfd = 0)");
        } else if Self::mode_of(&inc) == Some(MigrationMode::Stream) {
            // Every page is here: restore without copying memory, served by a local daemon
            // (a plain restore when it cannot start).
            match super::pages::start_local_lazy_daemon(id, cd.checkpoint(), &cd.dir).await {
                Ok(()) => local_lazy = true,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(cd.dir.join(super::pages::LAZY_DIR));
                    tracing::warn!(migration = %id, error = %chain(&e), "no local lazy-pages daemon; restoring every page first");
                }
            }
        }
        if injected == Some(Fault::CriuFail) {
            fault::spoil_restore_log(&cd.checkpoint());
        }
        // The source's creation time (its state record came with the final files).
        let created = self
            .staging(id)
            .ok()
            .and_then(|st| {
                crate::layout::read_record::<StateRecord>(&st.join("delta").join(STATE_FILE)).ok()
            })
            .map(|s| s.created)
            .unwrap_or_else(now);
        let state = StateRecord {
            state: ContainerState::Checkpointed,
            created,
            started: None,
            finished: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
            reason: Some(format!("arriving from {}", self.source)),
            stop_requested: false,
            cgroup: self.cgroup_of(&spec.id),
        };
        crate::layout::write_record(&cd.spec(), &spec).map_err(io(&cd.spec()))?;
        crate::layout::write_record(&cd.state(), &state).map_err(io(&cd.state()))?;
        self.agent.lock().insert(
            spec.id.clone(),
            Entry {
                spec: spec.clone(),
                state: state.clone(),
                busy: false,
            },
        );
        let t_restore = std::time::Instant::now();
        let restored = self.agent.restore(&spec.id).await;
        // The restore read the rounds' pages (pre-copy); a failure removes everything anyway.
        super::precopy::remove_rounds(&cd.dir, &cd.checkpoint());
        // CRIU's own account of the restore (its stats-restore image).
        let criu_stats =
            mig_migrate::criu::stats::read_stats(&cd.checkpoint().join("stats-restore"))
                .ok()
                .and_then(|s| s.restore);
        tracing::info!(
            migration = %id,
            pages_ms,
            place_ms,
            shim_restore_ms = super::ms(t_restore.elapsed()),
            criu_restore_ms = criu_stats.as_ref().map(|s| s.restore_time_us / 1000),
            criu_forking_ms = criu_stats.as_ref().map(|s| s.forking_time_us / 1000),
            verified_on_arrival = noted,
            local_lazy,
            "restore phases"
        );
        let mut result = match restored {
            Ok(Response::Restored(r)) => r,
            Ok(_) => {
                return Err(DestError::Restore {
                    message: "unexpected answer".into(),
                })
            }
            Err(e) => return Err(DestError::Restore { message: e.message }),
        };
        // Stopped until Commit: the source is frozen, so nothing of the container runs twice.
        let cg = Cgroup::open(&state.cgroup).map_err(|source| DestError::Cgroup {
            name: state.cgroup.clone(),
            source,
        })?;
        self.agent.set_busy(&spec.id, true);
        let t_after = std::time::Instant::now();
        cg.freeze(FREEZE_TIMEOUT).map_err(DestError::Freeze)?;
        if local_lazy || Self::mode_of(&inc) == Some(MigrationMode::PostCopy) {
            let mut map = std::mem::take(&mut result.pid_map);
            result.pid_map = tokio::task::spawn_blocking(move || {
                super::pages::fill_lazy_cmds(&mut map);
                map
            })
            .await
            .map_err(|e| DestError::Task(e.to_string()))?;
        }
        tracing::debug!(migration = %id, after_ms = super::ms(t_after.elapsed()), "frozen after the restore, commands read");
        if injected == Some(Fault::Kill) {
            fault::die();
        }
        Ok(result.pid_map)
    }
}

/// Leaves the image set's arrival note (`mig_migrate::imageset::ArrivalNote`) when every file of
/// its manifest arrived with that very digest (checked on arrival): the shim's restore then
/// checks the listing and sizes without hashing the memory a second time (stream mode's page
/// images are checked by size in any case). Returns whether the note was written.
fn note_arrival(checkpoint: &Path, arrived: &HashMap<String, String>) -> bool {
    use mig_migrate::imageset;
    let Ok(manifest) = imageset::read_manifest(checkpoint) else {
        return false;
    };
    let all_known = manifest
        .files
        .iter()
        .all(|f| arrived.get(&f.path) == Some(&f.sha256));
    if !all_known || !arrived.contains_key(imageset::MANIFEST) {
        return false;
    }
    match imageset::write_arrival_note(checkpoint, std::process::id()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "cannot write the arrival note; the restore hashes the images again");
            false
        }
    }
}

/// Imports the layers received into `<staging>/layers` (each verified against its digest and
/// unpacked: seconds for a distribution image) and records the container's image, so that a
/// restore only finds them. Called when the presync's files are in, while the container still
/// runs on the source: done at the restore, a 170 MiB Debian image added 2 s to the downtime of
/// its first move to a host. Recording the image at once keeps its layers referenced (an
/// `image rm` meanwhile would otherwise collect them). An image this migration added is named
/// in `<staging>/IMAGE_ADDED`: a move that rolls back removes it again when no container uses
/// it ([`cleanup_incoming`]), so a failed move (a full disk, say) gives back the space it took.
/// Idempotent: each staged layer is removed once imported.
fn import_layers(
    images: &mig_runtime::image::ImageStore,
    staging: &Path,
    image: &mig_runtime::image::Image,
) -> Result<(), DestError> {
    let layers = staging.join("layers");
    if let Ok(rd) = std::fs::read_dir(&layers) {
        for ent in rd.flatten() {
            let digest = format!("sha256:{}", ent.file_name().to_string_lossy());
            let path = ent.path();
            let mut f = std::fs::File::open(&path).map_err(io(&path))?;
            images
                .import_layer(&digest, &mut f)
                .map_err(|source| DestError::Layer { digest, source })?;
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    if images.get(&image.id).is_err() {
        let added = staging.join(IMAGE_ADDED);
        std::fs::write(&added, &image.id).map_err(io(&added))?;
        images.add_image(image).map_err(DestError::Image)?;
    }
    Ok(())
}

/// Held while an incoming migration checks that no other one brings a container of the same id
/// or name, and reserves its own ([`ARRIVING_FILE`]).
static ARRIVING: Mutex<()> = Mutex::new(());

/// In an incoming migration's staging directory: the container's id and name, one per line.
const ARRIVING_FILE: &str = "ARRIVING";

/// Takes [`ARRIVING`]: held by whatever checks a new container's name against this host's
/// containers and the arriving ones until the container is recorded (`mig run`, an import),
/// taken before the containers' map.
pub(crate) fn reserving() -> std::sync::MutexGuard<'static, ()> {
    ARRIVING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The id of the container named `name` that an incoming migration brings, if one does.
pub(crate) fn arriving_named(state_dir: &Path, name: &str) -> Option<String> {
    arriving(state_dir).find_map(|(_, id, n)| (n == name).then_some(id))
}

/// The incoming migrations' staging directories with the id and name each reserved.
fn arriving(state_dir: &Path) -> impl Iterator<Item = (PathBuf, String, String)> {
    std::fs::read_dir(journal::dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".in"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join(ARRIVING_FILE)).ok()?;
            let mut lines = text.lines();
            let (id, name) = (lines.next()?.to_owned(), lines.next()?.to_owned());
            Some((e.path(), id, name))
        })
}

/// The id and name of a container another incoming migration (another staging directory than
/// `mine`) brings, when it has `p`'s id or name.
fn arriving_elsewhere(state_dir: &Path, mine: &Path, p: &Prepare) -> Option<(String, String)> {
    arriving(state_dir)
        .find(|(dir, id, name)| dir != mine && (*id == p.spec.id || *name == p.spec.name))
        .map(|(_, id, name)| (id, name))
}

/// In an incoming migration's staging directory: the id of the image the migration added.
const IMAGE_ADDED: &str = "IMAGE_ADDED";

/// Places the container's log at `log`: the one sent whole while frozen, else the presync copy
/// with what the log gained since appended (a 1.5 source), else none (a container without one).
fn place_log(staging: &Path, log: &Path) -> Result<(), DestError> {
    let whole = staging.join("delta").join(LOG_FILE);
    let head = staging.join("presync").join(LOG_FILE);
    let tail = staging.join("delta").join(LOG_TAIL_FILE);
    if whole.is_file() {
        return std::fs::rename(&whole, log).map_err(io(&whole));
    }
    if !tail.is_file() {
        return Ok(());
    }
    if !head.is_file() {
        return Err(DestError::NoLogHead);
    }
    let mut from = std::fs::File::open(&tail).map_err(io(&tail))?;
    let mut to = std::fs::OpenOptions::new()
        .append(true)
        .open(&head)
        .map_err(io(&head))?;
    std::io::copy(&mut from, &mut to).map_err(io(&head))?;
    std::fs::rename(&head, log).map_err(io(&head))
}

/// Unpacks the presync copy of the writable layer into `<staging>/upper` (while the container
/// still runs on the source) and drops its tar.
fn unpack_presync(staging: &Path) -> Result<(), DestError> {
    let tar = staging.join("presync").join(UPPER_TAR);
    if !tar.is_file() {
        return Ok(());
    }
    let dir = staging.join("upper");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let f = std::fs::File::open(&tar).map_err(io(&tar))?;
    mig_migrate::archive::unpack_layer_tar(&mut std::io::BufReader::new(f), &dir)
        .map_err(DestError::Upper)?;
    std::fs::remove_file(&tar).map_err(io(&tar))
}

/// Places the writable layer at `upper`: the presync copy (already unpacked) moved in place with
/// the delta applied on top, or the whole layer when the source sent it whole while frozen.
fn place_upper(staging: &Path, upper: &Path) -> Result<(), DestError> {
    let full = staging.join("delta").join(UPPER_TAR);
    if full.is_file() {
        std::fs::create_dir_all(upper).map_err(io(upper))?;
        let f = std::fs::File::open(&full).map_err(io(&full))?;
        return mig_migrate::archive::unpack_layer_tar(&mut std::io::BufReader::new(f), upper)
            .map_err(DestError::Upper);
    }
    let presync = staging.join("upper");
    let delta = staging.join("delta").join(UPPER_DELTA_TAR);
    if !presync.is_dir() || !delta.is_file() {
        return Err(DestError::NoUpper);
    }
    if let Some(parent) = upper.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::rename(&presync, upper).map_err(io(&presync))?;
    let f = std::fs::File::open(&delta).map_err(io(&delta))?;
    let stats = mig_migrate::archive::apply_layer_delta(&mut std::io::BufReader::new(f), upper)
        .map_err(DestError::Upper)?;
    tracing::debug!(
        changed = stats.changed,
        deleted = stats.deleted,
        "writable-layer delta applied"
    );
    Ok(())
}

/// Removes what an incoming migration made: kills and removes its container (only one this
/// migration created, by the marker), removes the staging directory. Idempotent.
pub(crate) async fn cleanup_incoming(
    agent: &Arc<Agent>,
    migration_id: &str,
    container_id: &str,
) -> Result<(), DestError> {
    let cd = agent.dirs.container(container_id);
    let ours = std::fs::read_to_string(cd.dir.join(MARKER))
        .map(|m| m.trim() == migration_id)
        .unwrap_or(false);
    if ours {
        let cgroup = format!("{}/{}", agent.cfg.cgroup_parent, container_id);
        if let Ok(cg) = Cgroup::open(&cgroup) {
            let _ = cg.kill();
            let _ = cg.thaw();
        }
        if agent.entry(container_id).is_ok() {
            agent.set_busy(container_id, false);
            agent
                .remove(container_id, true)
                .await
                .map_err(|e| DestError::Remove { message: e.message })?;
        } else if cd.dir.exists() {
            // Not mounted is no error; it also detaches idmapped layers left staged by a crash.
            let _ = mig_runtime::container::unmount_rootfs(&cd.rootfs());
            if let Ok(cg) = Cgroup::open(&cgroup) {
                let _ = cg.destroy();
            }
            std::fs::remove_dir_all(&cd.dir).map_err(io(&cd.dir))?;
        }
    }
    if let Ok(staging) = journal::staging(&agent.cfg.state_dir, migration_id) {
        if let Ok(image) = std::fs::read_to_string(staging.join(IMAGE_ADDED)) {
            // Refused while a container uses it (the same checks as `mig image rm`).
            match agent.image_remove(image.trim().to_owned()).await {
                Ok(_) => {
                    tracing::info!(migration = %migration_id, image = %image.trim(), "removed the image this move added")
                }
                Err(e) => {
                    tracing::info!(migration = %migration_id, image = %image.trim(), reason = %e.message, "kept the image this move added")
                }
            }
        }
        let _ = std::fs::remove_dir_all(staging);
    }
    Ok(())
}

/// Lets the restored container run; idempotent.
pub(crate) fn resume_incoming(
    agent: &Agent,
    migration_id: &str,
    container_id: &str,
) -> Result<(), DestError> {
    let cgroup = format!("{}/{}", agent.cfg.cgroup_parent, container_id);
    let cg = Cgroup::open(&cgroup).map_err(|source| DestError::Cgroup {
        name: cgroup.clone(),
        source,
    })?;
    cg.thaw().map_err(DestError::Thaw)?;
    agent.set_busy(container_id, false);
    let cd = agent.dirs.container(container_id);
    let _ = std::fs::remove_file(cd.dir.join(MARKER));
    if let Ok(staging) = journal::staging(&agent.cfg.state_dir, migration_id) {
        let _ = std::fs::remove_dir_all(staging);
    }
    Ok(())
}

/// `4.1.1` or `6.18.0-1-amd64` as numbers for comparison (missing parts are 0).
fn version_key(v: &str) -> [u64; 3] {
    let v = v.trim().trim_start_matches("Version:").trim();
    let mut out = [0; 3];
    for (i, part) in v.split(['.', '-']).take(3).enumerate() {
        out[i] = part
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0);
    }
    out
}

impl DestHost for DestSide {
    async fn check(&self, prepare: &Prepare) -> Result<Vec<String>, Refusal> {
        fault::hit_async(&self.agent.cfg.state_dir, Point::DestPrepare)
            .await
            .map_err(|e| Refusal {
                reason: RefuseReason::Policy,
                detail: e.to_string(),
            })?;
        if journal::valid_id(&prepare.migration_id) && !self.hold(&prepare.migration_id).await {
            return Err(Refusal {
                reason: RefuseReason::Busy,
                detail: "this migration is being handled on another connection".into(),
            });
        }
        // Quick checks (a statvfs, a few stats): fine on the runtime thread.
        let missing = self.check_blocking(prepare)?;
        if prepare.mode == MigrationMode::Stream {
            self.start_stream(prepare).await?;
        }
        Ok(missing)
    }

    fn place_file(&self, migration_id: &str, header: &FileHeader) -> Result<PathBuf, HostError> {
        let staging = self.staging(migration_id).map_err(boxed)?;
        {
            // Whatever the Prepare declared, a peer never writes more than the limit here.
            let mut placed = self.placed.lock().unwrap_or_else(|p| p.into_inner());
            let total = placed.entry(migration_id.to_owned()).or_insert(0);
            *total = total.saturating_add(header.size);
            if *total > self.agent.cfg.max_incoming_bytes {
                return Err(boxed(DestError::TooLarge {
                    limit: self.agent.cfg.max_incoming_bytes,
                }));
            }
        }
        fault::hit_once(
            &self.agent.cfg.state_dir,
            fault::file_point(header.kind),
            migration_id,
        )?;
        let path = match header.kind {
            FileKind::Layer => {
                let hex = header
                    .path
                    .strip_prefix("sha256:")
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| {
                        boxed(DestError::BadName {
                            path: header.path.clone(),
                        })
                    })?;
                staging.join("layers").join(hex)
            }
            // Pre-copy's rounds (`rounds/<n>/<file>`, from a 1.2 source) beside the images.
            FileKind::Presync => super::precopy::round_file(&staging, &header.path)
                .unwrap_or_else(|| staging.join("presync").join(&header.path)),
            FileKind::Image => staging.join("images").join(&header.path),
            FileKind::Delta => staging.join("delta").join(&header.path),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| boxed(io(parent)(e)))?;
        }
        Ok(path)
    }

    async fn restore(&self, migration_id: &str) -> Result<Vec<PidEntry>, HostError> {
        self.restore_inner(migration_id).await.map_err(boxed)
    }

    async fn resume(&self, migration_id: &str) -> Result<(), HostError> {
        fault::hit_async(&self.agent.cfg.state_dir, Point::DestCommit).await?;
        let inc = self.incoming(migration_id).map_err(boxed)?;
        resume_incoming(&self.agent, migration_id, &inc.container_id).map_err(boxed)?;
        // The container needs its lazy-pages daemon, if any, until the last page.
        super::pages::watch_lazy_daemon(
            self.agent.clone(),
            migration_id.to_owned(),
            inc.container_id.clone(),
            inc.container_name.clone(),
            self.source.clone(),
        );
        tracing::info!(id = %inc.container_id, migration = %migration_id, "container arrived and runs");
        Ok(())
    }

    async fn cleanup(&self, migration_id: &str) -> Result<(), HostError> {
        super::pages::forget(migration_id);
        let Ok(inc) = self.incoming(migration_id) else {
            if let Ok(staging) = self.staging(migration_id) {
                let _ = std::fs::remove_dir_all(staging);
            }
            return Ok(());
        };
        cleanup_incoming(&self.agent, migration_id, &inc.container_id)
            .await
            .map_err(boxed)
    }

    async fn journal(&self, record: &JournalRecord) -> Result<(), HostError> {
        let inc = self.incoming(&record.migration_id).map_err(boxed)?;
        let entry = JournalEntry {
            migration_id: record.migration_id.clone(),
            role: Role::Dest,
            state: record.state.clone(),
            cgroup: self.cgroup_of(&inc.container_id),
            container_id: inc.container_id,
            container_name: inc.container_name,
            peer: self.source.clone(),
            updated: now(),
        };
        journal::write(&self.agent.cfg.state_dir, &entry).map_err(|e| boxed(DestError::Journal(e)))
    }

    async fn files_received(&self, migration_id: &str, phase: Phase) -> Result<(), HostError> {
        if phase != Phase::Presync {
            return Ok(());
        }
        let staging = self.staging(migration_id).map_err(boxed)?;
        let image = self
            .incoming(migration_id)
            .map_err(boxed)?
            .prepare
            .map(|p| p.image);
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(image) = image {
                import_layers(&agent.images, &staging, &image)?;
            }
            unpack_presync(&staging)
        })
        .await
        .unwrap_or_else(|e| Err(DestError::Task(e.to_string())))
        .map_err(boxed)
    }

    fn progress(&self, migration_id: &str, p: Progress) {
        self.emit_phase(migration_id, p);
    }

    fn file_arrived(&self, migration_id: &str, file: &mig_migrate::transport::ReceivedFile) {
        if file.header.kind == FileKind::Image {
            self.arrived
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(migration_id.to_owned())
                .or_default()
                .insert(file.header.path.clone(), hex::encode(file.header.sha256));
        }
    }

    async fn load_journal(&self, migration_id: &str) -> Option<JournalState> {
        // A machine of this migration may still be at work (a rollback after a failed resume,
        // a recovery): answer from its final journal entry, not from the one it is replacing.
        // Still busy after the limit: no answer ("undecided"), the source asks again later.
        if !journal::valid_id(migration_id) || !self.hold(migration_id).await {
            tracing::warn!(migration = %migration_id, "a Resolve found the migration busy: answering undecided");
            return None;
        }
        let e = journal::read(&self.agent.cfg.state_dir, migration_id)
            .filter(|e| e.role == Role::Dest)?;
        if e.state == JournalState::Committed {
            // Committed here but the link went before the copy was resumed (in doubt at
            // Commit): the Resolve answers Committed, so the copy must run now (idempotent).
            if let Err(err) = resume_incoming(&self.agent, migration_id, &e.container_id) {
                tracing::error!(migration = %migration_id, error = %chain(&err), "cannot resume the arrived container");
            }
            super::pages::watch_lazy_daemon(
                self.agent.clone(),
                migration_id.to_owned(),
                e.container_id.clone(),
                e.container_name.clone(),
                self.source.clone(),
            );
        }
        Some(e.state)
    }
}

/// Accepts migrations until the endpoint closes; one task per connection.
pub(crate) fn spawn_acceptor(agent: Arc<Agent>, endpoint: quinn::Endpoint) {
    tokio::spawn(async move {
        while let Some(conn) = transport::accept(&endpoint).await {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "refused an incoming connection");
                    continue;
                }
            };
            fault::track(&conn);
            // Remote API clients are served by crate::remote; only pinned peers migrate.
            let Some(conn) = crate::remote::route(&agent, conn) else {
                continue;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _running = crate::daemon::heap::Running::start();
                let fp = transport::peer_fingerprint(&conn).unwrap_or_default();
                let source = agent
                    .migration
                    .net()
                    .and_then(|n| {
                        n.peers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .by_fingerprint(&fp)
                            .map(|p| p.name.clone())
                    })
                    .unwrap_or_else(|| conn.remote_address().to_string());
                let side = Arc::new(DestSide::new(agent.clone(), source.clone()));
                let _ = side.conn.set(conn.clone());
                let hello = super::hello(&agent);
                let ran =
                    transport::run_dest(conn.clone(), side.clone(), &hello, Timeouts::default())
                        .await;
                side.release();
                match ran {
                    Ok(r) => {
                        // Post-copy: the lazy-pages daemon needs the connection until the last page.
                        super::pages::until_done(&r.migration_id).await;
                        side.emit_done(&r);
                        tracing::info!(
                            migration = %r.migration_id,
                            %source,
                            outcome = ?r.outcome,
                            in_doubt = r.in_doubt,
                            "incoming migration ended"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(%source, error = %chain(&e), "incoming migration failed")
                    }
                }
                // Give the peer a moment to read our last frames before closing.
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.close(0u32.into(), b"done");
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::version_key;

    #[test]
    fn versions() {
        assert_eq!(version_key("4.1.1"), [4, 1, 1]);
        assert_eq!(version_key("Version: 4.2"), [4, 2, 0]);
        assert_eq!(version_key("6.18.0-1-amd64"), [6, 18, 0]);
        assert!(version_key("4.1.1") < version_key("4.2.1"));
    }
}
