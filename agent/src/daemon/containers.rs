//! Container lifecycle on the agent side: create and start (through the shim), track, stop, kill,
//! remove, and re-adopt after a restart.

use super::{Agent, DaemonError, Entry};
use crate::api::{
    ApiError, ContainerDetails, ContainerState, ContainerSummary, ErrorKind, ImageSummary,
    ProcessUser,
};
use crate::layout::{is_our_shim, now, ExitRecord, ShimRecord, StateRecord};
use mig_runtime::cgroup::Cgroup;
use mig_runtime::fsutil;
use mig_runtime::spec::ContainerSpec;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Child;

mod run;
mod shim;
mod stop;

pub(crate) use stop::is_stopping;

fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Internal, msg)
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, msg)
}

impl Agent {
    /// Reads every container directory; returns the ids of live containers.
    pub(super) fn load_all(self: &Arc<Self>) -> Result<Vec<String>, DaemonError> {
        let dir = self.dirs.containers();
        let rd = std::fs::read_dir(&dir).map_err(|source| DaemonError::ReadContainers {
            path: dir.clone(),
            source,
        })?;
        let mut live = Vec::new();
        for ent in rd.flatten() {
            let id = ent.file_name().to_string_lossy().into_owned();
            // An import (`restore --import`) the agent did not see to its end: no import runs
            // before the agent serves, so what it unpacked goes (QA of session 25: 76 MB left
            // for good by an agent killed during one).
            if id.starts_with(".import-") {
                match std::fs::remove_dir_all(ent.path()) {
                    Ok(()) => {
                        tracing::warn!(dir = %ent.path().display(), "removed what an interrupted import unpacked")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %ent.path().display(), error = %e, "cannot remove what an interrupted import unpacked")
                    }
                }
                continue;
            }
            if mig_runtime::spec::validate_id(&id).is_err() {
                continue;
            }
            let cd = self.dirs.container(&id);
            let spec: ContainerSpec = match crate::layout::read_record(&cd.spec()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "skipping a container without a readable spec");
                    continue;
                }
            };
            if spec.id != id || spec.validate().is_err() {
                tracing::warn!(%id, "skipping a container whose spec is invalid");
                continue;
            }
            let state: StateRecord = match crate::layout::read_record(&cd.state()) {
                Ok(s) => s,
                Err(e) if fsutil::is_newer_format(&e) => {
                    tracing::warn!(%id, error = %e, "skipping a container of a newer format (left as it is)");
                    continue;
                }
                Err(e) => match crate::layout::live_shim_of(&cd, &id) {
                    // Its shim still runs it: the record is rebuilt from the shim's (QA of
                    // session 25: a damaged state.json made a running container `failed`,
                    // which mig could then neither stop, move nor remove).
                    Some(shim) => {
                        tracing::warn!(%id, error = %e, "state.json unreadable, the container's shim runs: the record is rebuilt as running");
                        let st = StateRecord {
                            created: shim.started,
                            started: Some(shim.started),
                            ..StateRecord::new(ContainerState::Running, self.cgroup_name(&id))
                        };
                        self.persist(&id, &st);
                        st
                    }
                    None => {
                        tracing::warn!(%id, error = %e, "container without state.json: marking it failed");
                        StateRecord {
                            reason: Some("state.json was missing or unreadable".into()),
                            ..StateRecord::new(ContainerState::Failed, self.cgroup_name(&id))
                        }
                    }
                },
            };
            self.lock().insert(
                id.clone(),
                Entry {
                    spec,
                    state,
                    busy: false,
                },
            );
            self.refresh(&id);
            if super::checkpoint::settle_interrupted(&cd.dir, &id, &self.cgroup_name(&id)) {
                tracing::warn!(%id, "a checkpoint was interrupted after its image set was sealed: the container is checkpointed (mig restore)");
                self.update(&id, |e| {
                    e.state.state = ContainerState::Checkpointed;
                    e.state.exit_code = None;
                    e.state.signal = None;
                    e.state.reason = None;
                });
            }
            if self.is_live(&id) {
                tracing::info!(%id, "re-adopted a running container");
                live.push(id);
            }
        }
        Ok(live)
    }

    /// Container directories on disk that [`Agent::load_all`] did not load because a record of
    /// theirs cannot be read (a newer format, or damaged): `(id, why)`, sorted by id. They are
    /// left as they are; this agent neither lists nor manages them.
    pub(crate) fn unread_containers(&self) -> Vec<(String, String)> {
        let Ok(rd) = std::fs::read_dir(self.dirs.containers()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| mig_runtime::spec::validate_id(id).is_ok())
            .collect();
        ids.sort();
        let known: Vec<String> = {
            let map = self.lock();
            ids.iter()
                .filter(|id| map.contains_key(*id))
                .cloned()
                .collect()
        };
        ids.into_iter()
            .filter(|id| !known.contains(id))
            .filter_map(|id| {
                let cd = self.dirs.container(&id);
                let why = match crate::layout::read_record::<ContainerSpec>(&cd.spec()) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                    Err(e) => e.to_string(),
                    Ok(_) => match crate::layout::read_record::<StateRecord>(&cd.state()) {
                        Err(e) if fsutil::is_newer_format(&e) => e.to_string(),
                        // Being created or removed right now.
                        _ => return None,
                    },
                };
                Some((id, why))
            })
            .collect()
    }

    /// The error for a container key that names nothing loaded: says so plainly when the key is
    /// the id of a container whose records this agent cannot read.
    pub(crate) fn not_found(&self, key: &str) -> ApiError {
        if !key.is_empty() {
            let unread = self.unread_containers();
            let hits: Vec<&(String, String)> = unread
                .iter()
                .filter(|(id, _)| id.starts_with(key))
                .collect();
            if let [(id, why)] = hits.as_slice() {
                return ApiError::new(
                    ErrorKind::Unavailable,
                    format!("container {id} is not managed by this agent, its record cannot be read: {why}"),
                );
            }
        }
        if let Some(j) = super::info::moved_away(&self.journals(), key) {
            return ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "no such container: {key} (container {} moved from here to {} in migration {})",
                    j.container_name, j.peer, j.migration_id
                ),
            );
        }
        ApiError::new(ErrorKind::NotFound, format!("no such container: {key}"))
    }

    /// Whether container `id` (entry `e`) may not be dumped now: another operation has it
    /// (`busy`), or it runs while its memory still arrives ([`crate::migration::memory_arriving`]).
    /// [`Self::busy_error`] says which.
    pub(crate) fn not_dumpable(id: &str, e: &Entry) -> bool {
        e.busy || crate::migration::memory_arriving(id)
    }

    /// The refusal of an operation on a container that another operation is changing: names
    /// the move when it is one (journaled), so the user knows what to wait for.
    pub(crate) fn busy_error(&self, id: &str, e: &Entry) -> ApiError {
        if !e.busy && crate::migration::memory_arriving(id) {
            return ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "container {} runs but its memory is still arriving (the move that brought it here copies the rest in the background): try again once it has all arrived; a checkpoint or move now would lose what is missing",
                    e.spec.name
                ),
            );
        }
        let journals = self.journals();
        // In doubt, it waits for the other host, not for an operation that ends by itself
        // (QA of session 25: "try again once it ended" while the source was down for good).
        if let Some(d) = super::info::in_doubt(&journals).remove(id) {
            return ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "container {}'s move {} with {} is in doubt (this host is its {}): it stays frozen until that is settled; `mig move --resolve {}` settles it, with `--decide` when {} is gone for good",
                    e.spec.name, d.migration_id, d.peer, d.role, e.spec.name, d.peer
                ),
            );
        }
        let arriving = journals.iter().find(|j| {
            j.container_id == id
                && j.role == mig_migrate::protocol::Role::Dest
                && !crate::migration::journal::is_final(&j.state)
        });
        let message = match super::info::moving(&journals, e, id) {
            Some(m) => format!(
                "container {} is being moved to {} (migration {}): try again once the move ended",
                e.spec.name, m.peer, m.migration_id
            ),
            None if arriving.is_some() => {
                let j = arriving.map(|j| (j.peer.as_str(), j.migration_id.as_str()));
                let (peer, mig) = j.unwrap_or_default();
                format!(
                    "container {} is arriving from {peer} (migration {mig}): try again once the move ended",
                    e.spec.name
                )
            }
            None => format!(
                "container {} is busy with another operation (a move, a checkpoint or a restore): try again once it ended",
                e.spec.name
            ),
        };
        ApiError::new(ErrorKind::Conflict, message)
    }

    pub(crate) fn is_live(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|e| e.busy || e.state.state.is_live())
    }

    pub(super) fn persist(&self, id: &str, st: &StateRecord) {
        if let Err(e) = crate::layout::write_record(&self.dirs.container(id).state(), st) {
            tracing::error!(%id, error = %e, "cannot write state.json");
        }
    }

    /// Applies `f` to the container's record and writes it.
    pub(super) fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        let st = {
            let mut map = self.lock();
            let Some(e) = map.get_mut(id) else { return };
            f(e);
            e.state.clone()
        };
        self.persist(id, &st);
    }

    /// The shim's record, when its shim is alive.
    pub(crate) fn live_shim(&self, id: &str) -> Option<ShimRecord> {
        let shim: ShimRecord = crate::layout::read_record(&self.dirs.container(id).shim()).ok()?;
        is_our_shim(shim.shim_pid, id).then_some(shim)
    }

    /// Brings the record of a live container up to date with its shim: still running, or ended
    /// (with the shim's exit record, or without one when the shim died).
    pub(crate) fn refresh(&self, id: &str) {
        let Some(e) = self.lock().get(id).cloned() else {
            return;
        };
        if e.busy || !e.state.state.is_live() {
            return;
        }
        if self.live_shim(id).is_some() {
            if e.state.state != ContainerState::Running {
                self.update(id, |e| e.state.state = ContainerState::Running);
            }
            return;
        }
        let exit: Option<ExitRecord> =
            crate::layout::read_record(&self.dirs.container(id).exit()).ok();
        if exit.is_none() {
            // The shim died without cleaning up: do it here.
            self.cleanup_resources(id, &e.state.cgroup);
        }
        let mut reason = None;
        self.update(id, |e| {
            let st = &mut e.state;
            match &exit {
                Some(x) => {
                    st.exit_code = Some(x.code);
                    st.signal = x.signal;
                    st.oom_killed = x.oom_killed;
                    st.finished = Some(x.finished);
                    if x.oom_killed {
                        st.reason = Some(match e.spec.limits.memory {
                            Some(_) => "oom-killed: the container exceeded its memory limit".into(),
                            // QA: "its memory limit" read wrong for a container without one.
                            None => "oom-killed: the container has no memory limit of its own; a limit above it (agent's cgroup parent) or the host ran out of memory".into(),
                        });
                    }
                }
                None => {
                    st.finished = Some(now());
                    st.reason = Some("the shim exited without recording an exit status".into());
                }
            }
            st.state = if st.state == ContainerState::Restoring && exit.is_none() {
                // The agent died while a restore was starting: the image set is still there.
                st.reason = Some("the restore was interrupted".into());
                ContainerState::Checkpointed
            } else if st.stop_requested {
                ContainerState::Stopped
            } else {
                ContainerState::Exited
            };
            reason = st.reason.clone();
        });
        tracing::info!(%id, "container ended");
        if let Some(x) = &exit {
            if x.oom_killed {
                self.emit(super::events::EventKind::ContainerOom {
                    id: id.to_owned(),
                    name: e.spec.name.clone(),
                    oom_kills: 1,
                });
            }
        }
        self.emit(super::events::EventKind::ContainerStopped {
            id: id.to_owned(),
            name: e.spec.name.clone(),
            exit_code: exit.as_ref().map(|x| x.code),
            signal: exit.as_ref().and_then(|x| x.signal),
            moved_to: self.moved_to(id),
            reason,
        });
    }

    /// The peer container `id` was moved to, when its last migration here moved it away and has
    /// committed (or sent its commit): its copy here ending is then the end of a move, not a kill.
    fn moved_to(&self, id: &str) -> Option<String> {
        use mig_migrate::protocol::{JournalState, Role};
        let journals = self.journals();
        let last = crate::migration::journal::newest_of(&journals, id)?;
        (last.role == Role::Source
            && matches!(
                last.state,
                JournalState::CommitSent | JournalState::Committed
            ))
        .then(|| last.peer.clone())
    }

    /// Unmounts the rootfs and removes the cgroup, best effort (used when the shim could not).
    fn cleanup_resources(&self, id: &str, cgroup: &str) {
        let rootfs = self.dirs.container(id).rootfs();
        // Also when the rootfs is not mounted (no error then): it detaches the idmapped layers a
        // shim that died while mounting may have left staged next to it.
        if let Err(e) = mig_runtime::container::unmount_rootfs(&rootfs) {
            tracing::warn!(%id, error = %e, "unmount_rootfs failed, detaching");
            if super::is_mounted(&rootfs) {
                let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Ok(cg) = Cgroup::open(cgroup) {
            let _ = cg.kill();
            for _ in 0..50 {
                if cg.procs().map(|p| p.is_empty()).unwrap_or(true) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = cg.destroy() {
                tracing::warn!(%id, error = %e, "cannot remove the cgroup");
            }
        }
    }

    pub(crate) fn list(&self, all: bool) -> Vec<ContainerSummary> {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in &ids {
            self.refresh(id);
        }
        let map = self.lock();
        let mut out: Vec<ContainerSummary> = map
            .iter()
            .filter(|(_, e)| all || e.state.state == ContainerState::Running || e.busy)
            // A copy whose move away committed, killed and being removed: it runs on the
            // destination, and its `exited (137)` here for the removal's half second was counted
            // by rebalancers (QA of session 26).
            .filter(|(id, e)| e.busy || !crate::migration::ending(id))
            .map(|(id, e)| ContainerSummary {
                id: id.clone(),
                name: e.spec.name.clone(),
                state: e.state.state,
                image: e.spec.image.name.clone(),
                host: self.cfg.name.clone(),
                created: e.state.created,
                exit_code: e.state.exit_code,
                command: e.spec.process.args.clone(),
                limits: e.spec.limits.clone(),
                // Filled in by `list_with_usage` (daemon/info.rs), outside the lock.
                usage: None,
                in_doubt: None,
                moving: None,
                memory_arriving: false,
                arriving: None,
                reason: (!e.state.state.is_live())
                    .then(|| e.state.reason.clone())
                    .flatten(),
                also_running_on: None,
                tcp_established: None,
            })
            .collect();
        out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        out
    }

    pub(crate) fn inspect(&self, id: &str) -> Result<ContainerDetails, ApiError> {
        self.refresh(id);
        let e = self.entry(id)?;
        let shim = if e.state.state.is_live() {
            self.live_shim(id)
        } else {
            None
        };
        let (mut usage, mut pid_map) = (None, Vec::new());
        if let Some(s) = &shim {
            match Cgroup::open(&e.state.cgroup) {
                Ok(cg) => {
                    usage = cg.usage().ok();
                    let mut procs = cg.procs().unwrap_or_else(|_| vec![s.init_pid]);
                    // Not the host-side helper of a running `mig exec`, in the cgroup but
                    // outside the container's PID namespace (QA of session 24).
                    procs.retain(|&p| mig_runtime::pidmap::same_pid_ns(p, s.init_pid));
                    pid_map = mig_runtime::pidmap::pid_map(&procs);
                }
                Err(_) => pid_map = mig_runtime::pidmap::pid_map(&[s.init_pid]),
            }
        }
        let st = &e.state;
        // A copy whose move is in doubt, or whose cgroup is frozen (a move in its final phase), is
        // frozen, whatever its record says.
        let journals = self.journals();
        let in_doubt = super::info::in_doubt(&journals).remove(id);
        // In doubt, not moving: one of the two says why it is frozen (review of session 27, L2).
        let moving = match in_doubt {
            Some(_) => None,
            None => super::info::moving(&journals, &e, id),
        };
        let state =
            super::info::shown_state(id, st.state, in_doubt.is_some(), moving.as_ref(), || {
                self.cgroup_frozen(&st.cgroup)
            });
        Ok(ContainerDetails {
            id: id.to_owned(),
            name: e.spec.name.clone(),
            state,
            host: self.cfg.name.clone(),
            image: ImageSummary {
                name: e.spec.image.name.clone(),
                id: e.spec.image.id.clone(),
            },
            hostname: e.spec.hostname.clone(),
            command: e.spec.process.args.clone(),
            env: e.spec.process.env.clone(),
            userns: e.spec.userns.is_some(),
            id_map: e.spec.userns,
            user: Some(ProcessUser {
                uid: e.spec.process.uid,
                gid: e.spec.process.gid,
                cwd: e.spec.process.cwd.clone(),
            }),
            limits: e.spec.limits.clone(),
            created: st.created,
            started: st.started,
            finished: st.finished,
            exit_code: st.exit_code,
            signal: st.signal,
            oom_killed: st.oom_killed,
            reason: st.reason.clone(),
            init_pid: shim.as_ref().map(|s| s.init_pid),
            shim_pid: shim.as_ref().map(|s| s.shim_pid),
            usage,
            pid_map,
            cgroup: st.cgroup.clone(),
            arriving: super::info::arriving(&journals, id),
            in_doubt,
            moving,
            memory_arriving: state == ContainerState::Running
                && crate::migration::memory_arriving(id),
            also_running_on: (state == ContainerState::Running)
                .then(|| crate::migration::also_runs_on(id))
                .flatten(),
            net: e.spec.net.clone(),
        })
    }
}

/// Watches a live container until it ends: waits for (and reaps) the shim when it is our child,
/// then polls its records (adopted shims are not our children).
pub(crate) fn spawn_watch(agent: Arc<Agent>, id: String, child: Option<Child>) {
    tokio::spawn(async move {
        if let Some(mut child) = child {
            let _ = child.wait().await;
            agent.refresh(&id);
        }
        while agent.is_live(&id) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            agent.refresh(&id);
        }
    });
}

/// A new random container id (32 lowercase hex characters).
pub(super) fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}
