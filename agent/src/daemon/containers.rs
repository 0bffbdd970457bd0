//! Container lifecycle on the agent side: create and start (through the shim), track, stop, kill,
//! remove, and re-adopt after a restart.

use super::{Agent, DaemonError, Entry};
use crate::api::{
    ApiError, ContainerDetails, ContainerState, ContainerSummary, ErrorKind, ImageSummary,
    Response, RunRequest,
};
use crate::layout::{is_our_shim, now, proc_start_ticks, ExitRecord, ShimRecord, StateRecord};
use crate::shim::StartReport;
use mig_runtime::cgroup::Cgroup;
use mig_runtime::fsutil;
use mig_runtime::spec::{ContainerSpec, IdMap, ImageRef, ProcessSpec};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// How long the shim may take to report that the init runs.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a killed container's shim to clean up and exit.
const KILL_GRACE: Duration = Duration::from_secs(15);
/// How long `kill` with SIGKILL waits for the container to end.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The host id range a `--userns` spec is validated with; the container's own range is allocated
/// when it is recorded (`mig_runtime::container::userns`).
const USERNS_MAP: IdMap = IdMap {
    host_id: mig_runtime::container::userns::BASE,
    size: mig_runtime::container::userns::SIZE,
};
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
                Err(e) => {
                    tracing::warn!(%id, error = %e, "container without state.json: marking it failed");
                    StateRecord {
                        state: ContainerState::Failed,
                        created: now(),
                        started: None,
                        finished: None,
                        exit_code: None,
                        signal: None,
                        oom_killed: false,
                        reason: Some("state.json was missing or unreadable".into()),
                        stop_requested: false,
                        cgroup: format!("{}/{}", self.cfg.cgroup_parent, id),
                    }
                }
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

    /// The refusal of an operation on a container that another operation is changing: names
    /// the move when it is one (journaled), so the user knows what to wait for.
    pub(crate) fn busy_error(&self, id: &str, e: &Entry) -> ApiError {
        let message = match super::info::moving(&self.journals(), e, id) {
            Some(m) => format!(
                "container {} is being moved to {} (migration {}): try again once the move ended",
                e.spec.name, m.peer, m.migration_id
            ),
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
    pub(super) fn live_shim(&self, id: &str) -> Option<ShimRecord> {
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
        self.update(id, |e| {
            let st = &mut e.state;
            match &exit {
                Some(x) => {
                    st.exit_code = Some(x.code);
                    st.signal = x.signal;
                    st.oom_killed = x.oom_killed;
                    st.finished = Some(x.finished);
                    if x.oom_killed {
                        st.reason =
                            Some("oom-killed: the container exceeded its memory limit".into());
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
        });
    }

    /// The peer container `id` was moved to, when its last migration here moved it away and has
    /// committed (or sent its commit): its copy here ending is then the end of a move, not a kill.
    fn moved_to(&self, id: &str) -> Option<String> {
        use mig_migrate::protocol::{JournalState, Role};
        let journals = self.journals();
        let last = journals
            .iter()
            .filter(|j| j.container_id == id)
            .max_by_key(|j| j.updated)?;
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

    /// The network of a new container: an address from this host's container subnet (or the
    /// requested one) with `--net bridge`, `None` (loopback only) without.
    fn allocate_net(
        &self,
        id: &str,
        req: &RunRequest,
    ) -> Result<Option<mig_runtime::net::NetSpec>, ApiError> {
        use mig_runtime::net::{HostNet, NetError, NetMode};
        match (req.net, req.ip) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(invalid("--ip needs --net bridge")),
            (Some(NetMode::Bridge), want) => HostNet::load(&self.cfg.state_dir)
                .and_then(|n| n.allocate(id, want))
                .map(Some)
                .map_err(|e| {
                    let kind = match e {
                        NetError::NoHostNet { .. } => ErrorKind::Unavailable,
                        NetError::AddressTaken { .. } | NetError::Reserved { .. } => {
                            ErrorKind::AlreadyExists
                        }
                        NetError::OutOfSubnet { .. } => ErrorKind::InvalidArgument,
                        _ => ErrorKind::Internal,
                    };
                    ApiError::new(kind, e.to_string())
                }),
        }
    }

    /// Gives back the address of a container that was never created.
    fn release_net(&self, spec: &ContainerSpec) {
        if spec.net.is_some() {
            if let Err(e) = mig_runtime::net::ipam::release(&self.cfg.state_dir, &spec.id) {
                tracing::warn!(id = %spec.id, error = %e, "cannot release the container's address");
            }
        }
    }

    /// `run`: creates the container's directory and spec, starts its shim, waits for the init.
    pub(crate) async fn run_container(
        self: &Arc<Self>,
        mut req: RunRequest,
    ) -> Result<Response, ApiError> {
        let bundle = match req.bundle.take() {
            Some(dir) => Some(self.bundle_request(&dir, &mut req).await?),
            None => None,
        };
        let images = self.images.clone();
        let image_key = req.image.clone();
        let image = tokio::task::spawn_blocking(move || images.get(&image_key))
            .await
            .map_err(|e| internal(format!("image lookup task failed: {e}")))?
            .map_err(|e| ApiError::new(ErrorKind::NotFound, e.to_string()))?;
        let id = new_id();
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("c-{}", &id[..8]));
        let hostname = match &req.hostname {
            Some(h) => h.clone(),
            None if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => name.clone(),
            None => id[..12].to_owned(),
        };
        let cfg = &image.config;
        let args = command_of(
            &cfg.entrypoint,
            &cfg.cmd,
            req.entrypoint.as_deref(),
            &req.args,
        );
        if args.is_empty() {
            return Err(invalid(if req.entrypoint.is_some() {
                "no command given and the entrypoint is empty"
            } else {
                "no command given and the image defines none"
            }));
        }
        if let Some(w) = &req.workdir {
            super::exec::check_workdir(w)?;
        }
        let user_ids = match &req.user {
            None => None,
            Some(u) => Some(self.image_user(&image, u).await?),
        };
        let mut env = cfg.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.into());
        }
        for kv in &req.env {
            let key = kv.split('=').next().unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        let (uid, gid) = match (user_ids, &bundle) {
            (Some(ids), _) => ids,
            (None, Some(b)) => (b.uid, b.gid),
            (None, None) => parse_user(&cfg.user),
        };
        let net = self.allocate_net(&id, &req)?;
        let mut spec = ContainerSpec {
            id: id.clone(),
            name: name.clone(),
            image: ImageRef {
                name: image.name.clone(),
                id: image.id.clone(),
                layers: image.layers.clone(),
            },
            process: ProcessSpec {
                args,
                env,
                cwd: if let Some(w) = &req.workdir {
                    w.clone()
                } else if let Some(b) = &bundle {
                    b.cwd.clone()
                } else if cfg.workdir.is_empty() {
                    "/".into()
                } else {
                    cfg.workdir.clone()
                },
                uid,
                gid,
            },
            hostname,
            limits: req.limits.clone(),
            userns: req.userns.then_some(USERNS_MAP),
            net,
        };
        if let Err(e) = spec.validate() {
            self.release_net(&spec);
            return Err(invalid(e.to_string()));
        }
        let state = StateRecord {
            state: ContainerState::Created,
            created: now(),
            started: None,
            finished: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
            reason: None,
            stop_requested: false,
            cgroup: format!("{}/{}", self.cfg.cgroup_parent, id),
        };
        {
            let _reserving = crate::migration::dest::reserving();
            let mut map = self.lock();
            if map.values().any(|e| e.spec.name == name) {
                drop(map);
                self.release_net(&spec);
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!("the name {name} is already in use"),
                ));
            }
            if let Some(other) = crate::migration::dest::arriving_named(&self.cfg.state_dir, &name)
            {
                drop(map);
                self.release_net(&spec);
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!("the name {name} is already in use: container {other} is arriving here from another host"),
                ));
            }
            if spec.userns.is_some() {
                // A host id range of its own, free among this host's containers (recorded in
                // the spec, kept across moves).
                let used = map.values().filter_map(|e| e.spec.userns.as_ref());
                match mig_runtime::container::userns::allocate(&id, used) {
                    Some(m) => spec.userns = Some(m),
                    None => {
                        drop(map);
                        self.release_net(&spec);
                        return Err(ApiError::new(
                            ErrorKind::Unavailable,
                            "no free user-namespace id range",
                        ));
                    }
                }
            }
            map.insert(
                id.clone(),
                Entry {
                    spec: spec.clone(),
                    state: state.clone(),
                    busy: true,
                },
            );
        }
        match self.start_shim(&spec, &state, "start").await {
            Ok((child, init_pid)) => {
                tracing::info!(%id, init_pid, "container started");
                self.update(&id, |e| {
                    e.busy = false;
                    e.state.state = ContainerState::Running;
                    e.state.started = Some(now());
                });
                spawn_watch(self.clone(), id.clone(), Some(child));
                self.emit(super::events::EventKind::ContainerStarted {
                    id: id.clone(),
                    name: name.clone(),
                });
                Ok(Response::Created { id, name })
            }
            Err(err) => {
                tracing::warn!(%id, error = %err.message, "container failed to start");
                self.update(&id, |e| {
                    e.busy = false;
                    e.state.state = ContainerState::Failed;
                    e.state.finished = Some(now());
                    e.state.reason = Some(err.message.clone());
                });
                Err(ApiError::new(
                    err.kind,
                    format!("starting container {name} failed: {}", err.message),
                ))
            }
        }
    }

    /// Writes the container's files, starts `mig-shim <mode>` (`start` or `restore`) and reads
    /// its one-line report.
    pub(super) async fn start_shim(
        &self,
        spec: &ContainerSpec,
        state: &StateRecord,
        mode: &str,
    ) -> Result<(Child, i32), ApiError> {
        let cd = self.dirs.container(&spec.id);
        let t_records = Instant::now();
        let io = |what: &str, e: std::io::Error| internal(format!("{what}: {e}"));
        // The container's directory is the gate to its rootfs and images (privacy.rs): made
        // root's alone, then opened to its mapped root's group for a --userns container (a
        // directory made by an incoming move or an import gets its mode here too).
        let private = |e: crate::privacy::PrivacyError| internal(crate::shim::chain(&e));
        crate::privacy::create_dir(&cd.dir, crate::privacy::PRIVATE_DIR).map_err(private)?;
        crate::privacy::secure_container_dir(&cd.dir, spec.userns.as_ref()).map_err(private)?;
        for d in [cd.upper(), cd.work(), cd.rootfs()] {
            std::fs::create_dir_all(&d).map_err(|e| io(&format!("creating {}", d.display()), e))?;
        }
        write_record_once(&cd.spec(), spec).map_err(|e| io("writing spec.json", e))?;
        write_record_once(&cd.state(), state).map_err(|e| io("writing state.json", e))?;
        // Records of a previous run must not be mistaken for this one's.
        for old in [cd.shim(), cd.exit()] {
            match std::fs::remove_file(&old) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&format!("removing {}", old.display()), e))
                }
                _ => {}
            }
        }
        let shim_log =
            crate::layout::open_log(&cd.shim_log()).map_err(|e| io("opening shim.log", e))?;
        let t_spawn = Instant::now();
        let mut cmd = Command::new(&self.cfg.shim);
        // The CRIU this agent checked: the shim's restore need not ask its version again.
        if let Some(token) = mig_migrate::criu::Criu::locate()
            .ok()
            .and_then(|c| c.known_token())
        {
            cmd.env(mig_migrate::criu::KNOWN_ENV, token);
        }
        let mut child = cmd
            .arg(mode)
            .arg("--state-dir")
            .arg(&self.cfg.state_dir)
            .arg("--id")
            .arg(&spec.id)
            .arg("--cgroup-parent")
            .arg(&self.cfg.cgroup_parent)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(shim_log))
            .spawn()
            .map_err(|e| io(&format!("starting {}", self.cfg.shim.display()), e))?;
        let t_report = Instant::now();
        let Some(stdout) = child.stdout.take() else {
            return Err(internal("the shim has no stdout pipe"));
        };
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        tracing::debug!(
            id = %spec.id,
            mode,
            records_ms = crate::migration::ms(t_spawn - t_records),
            spawn_ms = crate::migration::ms(t_report - t_spawn),
            report_ms = crate::migration::ms(t_report.elapsed()),
            "shim phases"
        );
        let line = match line {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => {
                let _ = child.wait().await;
                return Err(internal(format!(
                    "the shim exited without a report (see {})",
                    cd.shim_log().display()
                )));
            }
            Ok(Err(e)) => return Err(io("reading the shim's report", e)),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(internal("the shim did not report within 60 s"));
            }
        };
        match serde_json::from_str::<StartReport>(&line) {
            Ok(StartReport::Started { init_pid }) => Ok((child, init_pid)),
            Ok(StartReport::Failed { stage, message }) => {
                let _ = child.wait().await;
                let kind = if stage.is_unavailable(&message) {
                    ErrorKind::Unavailable
                } else if stage == crate::shim::Stage::Spawn && command_not_runnable(&message) {
                    // The caller's mistake, not the agent's.
                    ErrorKind::InvalidArgument
                } else {
                    ErrorKind::Internal
                };
                Err(ApiError::new(
                    kind,
                    format!("{}: {message}", stage.as_str()),
                ))
            }
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(internal(format!("unreadable report from the shim: {e}")))
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
                    let procs = cg.procs().unwrap_or_else(|_| vec![s.init_pid]);
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
        let moving = super::info::moving(&journals, &e, id);
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
            in_doubt,
            moving,
            net: e.spec.net.clone(),
        })
    }

    /// The init's PID when the container runs and the PID still belongs to it.
    pub(super) fn init_pid(&self, id: &str) -> Option<i32> {
        let s = self.live_shim(id)?;
        (proc_start_ticks(s.init_pid) == Some(s.init_start_ticks)).then_some(s.init_pid)
    }

    /// Waits until the container is no longer live; false on timeout.
    async fn wait_ended(&self, id: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            self.refresh(id);
            if !self.is_live(id) {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to the init, SIGKILL to the whole container after `timeout`.
    pub(crate) async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ApiError> {
        self.refresh(id);
        let e = self.entry(id)?;
        if e.busy {
            return Err(self.busy_error(id, &e));
        }
        if !e.state.state.is_live() {
            return Ok(());
        }
        // A move or checkpoint must not start while the container is being stopped.
        let _stopping = STOPPING.hold(id);
        self.update(id, |e| e.state.stop_requested = true);
        if let Some(pid) = self.init_pid(id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if !timeout.is_zero() && self.wait_ended(id, timeout).await {
            return Ok(());
        }
        if let Some(pid) = self.init_pid(id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Ok(cg) = Cgroup::open(&e.state.cgroup) {
            let _ = cg.kill();
        }
        if self.wait_ended(id, KILL_GRACE).await {
            Ok(())
        } else {
            Err(internal(format!(
                "container {} did not end within {} s of SIGKILL",
                e.spec.name,
                KILL_GRACE.as_secs()
            )))
        }
    }

    pub(crate) fn kill(&self, id: &str, signal: i32) -> Result<(), ApiError> {
        let sig =
            Signal::try_from(signal).map_err(|_| invalid(format!("invalid signal {signal}")))?;
        self.refresh(id);
        let e = self.entry(id)?;
        // A copy frozen by a move (or a checkpoint) is not the container's to signal: a move in
        // doubt may still resume it here.
        if e.busy {
            return Err(self.busy_error(id, &e));
        }
        let pid = match (e.state.state, self.init_pid(id)) {
            (ContainerState::Running, Some(p)) => p,
            _ => {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!("container {} is not running", e.spec.name),
                ))
            }
        };
        self.update(id, |e| e.state.stop_requested = true);
        kill(Pid::from_raw(pid), sig).map_err(|e| internal(format!("kill {pid}: {e}")))
    }

    /// `kill` with SIGKILL: returns once the container has ended (so a `remove` right after it
    /// works, as after podman's kill), at most [`KILL_WAIT`]; other signals return at once.
    pub(crate) async fn kill_and_wait(&self, id: &str, signal: i32) -> Result<(), ApiError> {
        self.kill(id, signal)?;
        if signal != Signal::SIGKILL as i32 || self.wait_ended(id, KILL_WAIT).await {
            return Ok(());
        }
        let name = self.entry(id).map(|e| e.spec.name).unwrap_or_default();
        Err(internal(format!(
            "container {name} was sent SIGKILL but has not ended within {} s",
            KILL_WAIT.as_secs()
        )))
    }

    pub(crate) async fn remove(&self, id: &str, force: bool) -> Result<(), ApiError> {
        self.refresh(id);
        let e = self.entry(id)?;
        if e.busy || e.state.state.is_live() {
            if !force {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "container {} is running: stop it first or use -f",
                        e.spec.name
                    ),
                ));
            }
            self.stop(id, Duration::ZERO).await?;
        }
        // The shim writes its exit record (and removes the rootfs mount and the cgroup) just
        // before it exits: it must be gone before its directory is removed.
        if !self.wait_shim_gone(id, KILL_GRACE).await {
            return Err(internal(format!(
                "the shim of container {} did not exit within {} s",
                e.spec.name,
                KILL_GRACE.as_secs()
            )));
        }
        self.cleanup_resources(id, &e.state.cgroup);
        let cd = self.dirs.container(id);
        if super::is_mounted(&cd.rootfs()) {
            return Err(internal(format!(
                "{} is still mounted",
                cd.rootfs().display()
            )));
        }
        remove_tree(&cd.dir)
            .await
            .map_err(|err| internal(format!("removing {}: {err}", cd.dir.display())))?;
        // A move's mark dies with the container (an id that comes back later starts clean).
        crate::migration::mark_frozen(id, false);
        if self.lock().remove(id).is_none() {
            // Another removal of the same container finished first.
            return Ok(());
        }
        tracing::info!(%id, "container removed");
        self.emit(super::events::EventKind::ContainerRemoved {
            id: id.to_owned(),
            name: e.spec.name.clone(),
            moved_to: self.moved_to(id),
        });
        Ok(())
    }
}

impl Agent {
    /// Waits until the container's shim (if any) has exited; false on timeout.
    pub(crate) async fn wait_shim_gone(&self, id: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.live_shim(id).is_some() {
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Removes a container directory; gone already is fine. Retried a few times when an entry
/// appears or vanishes under it meanwhile (a record written at the last moment, a concurrent
/// removal), which `remove_dir_all` reports as "Directory not empty" or "No such file".
async fn remove_tree(dir: &std::path::Path) -> std::io::Result<()> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => return Ok(()),
            Err(e)
                if attempt < 5
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::NotFound
                    ) =>
            {
                attempt += 1;
                tracing::debug!(dir = %dir.display(), error = %e, "retrying the removal");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
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

/// Writes a container record, or only syncs the file when it already holds exactly this record
/// (the same value in the current format). The restore of an arriving container otherwise wrote
/// again the spec and state the agent had just written and synced (two atomic writes, 10-25 ms
/// of the downtime here under load); syncing a file that is already on disk costs microseconds,
/// and makes the record durable whoever wrote it.
fn write_record_once<T: serde::Serialize>(
    path: &std::path::Path,
    value: &T,
) -> std::io::Result<()> {
    use crate::layout::{MAX_RECORD, RECORD_FORMAT};
    let mut want = serde_json::to_value(value).map_err(std::io::Error::other)?;
    if let Some(obj) = want.as_object_mut() {
        obj.insert(RECORD_FORMAT.key.to_owned(), RECORD_FORMAT.current.into());
    }
    let have = fsutil::read_json::<serde_json::Value>(path, MAX_RECORD).ok();
    if have.as_ref() != Some(&want) {
        return crate::layout::write_record(path, value);
    }
    std::fs::File::open(path)?.sync_all()?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Agent {
    /// `run --user`: numeric ids of `user` from the image's /etc/passwd and /etc/group.
    async fn image_user(
        &self,
        image: &mig_runtime::image::Image,
        user: &str,
    ) -> Result<(u32, u32), ApiError> {
        super::exec::check_user(user)?;
        let images = self.images.clone();
        let layers = image.layers.clone();
        let u = user.to_owned();
        tokio::task::spawn_blocking(move || images.resolve_user(&layers, &u, None))
            .await
            .map_err(|e| internal(format!("user lookup task failed: {e}")))?
            .map_err(|e| match e {
                mig_runtime::image::ImageError::UnknownUser(_) => invalid(format!(
                    "unknown user {user:?} for image {}: not in the image's /etc/passwd or /etc/group",
                    image.name
                )),
                other => internal(format!(
                    "cannot look up user {user:?} in image {}: {}",
                    image.name,
                    crate::shim::chain(&other)
                )),
            })
    }
}

/// The container's argv: podman's rules. `entrypoint` (`--entrypoint`) replaces the image's;
/// the image's cmd is used only when no `args` are given and the entrypoint was not replaced
/// by a non-empty one (`--entrypoint ''` clears the entrypoint and keeps the cmd).
fn command_of(
    image_entrypoint: &[String],
    image_cmd: &[String],
    entrypoint: Option<&[String]>,
    args: &[String],
) -> Vec<String> {
    let ep = entrypoint.unwrap_or(image_entrypoint);
    let cmd = if !args.is_empty() {
        args
    } else if entrypoint.is_none_or(<[String]>::is_empty) {
        image_cmd
    } else {
        &[]
    };
    ep.iter().chain(cmd).cloned().collect()
}

/// A new random container id (32 lowercase hex characters).
pub(super) fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// `uid[:gid]` (numeric) from the image config; root otherwise.
fn parse_user(user: &str) -> (u32, u32) {
    let mut it = user.split(':');
    let uid = it.next().and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid = it.next().and_then(|g| g.parse().ok()).unwrap_or(uid);
    (uid, gid)
}

/// Whether a failed start's message is the shim's "the command \"x\" is not in the image ..." or
/// "the command \"x\" cannot be executed: ..." (agent/src/shim/start.rs `spawn_failure`). The
/// CLI matches these words to exit 127 or 126: keep them.
fn command_not_runnable(message: &str) -> bool {
    let Some(tail) = message.strip_prefix("the command \"") else {
        return false;
    };
    // The command's name is a Rust debug string: skip it to its closing quote.
    let mut escaped = false;
    let end = tail.char_indices().find_map(|(i, ch)| {
        let close = ch == '"' && !escaped;
        escaped = ch == '\\' && !escaped;
        close.then_some(i)
    });
    end.is_some_and(|end| {
        let rest = &tail[end + 1..];
        rest.starts_with(" is not in the image") || rest.starts_with(" cannot be executed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_users() {
        let id = new_id();
        mig_runtime::spec::validate_id(&id).unwrap();
        assert_eq!(parse_user(""), (0, 0));
        assert_eq!(parse_user("1000"), (1000, 1000));
        assert_eq!(parse_user("1000:50"), (1000, 50));
    }

    #[test]
    fn entrypoint_and_cmd() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (ep, cmd) = (v(&["/entry"]), v(&["serve", "-v"]));
        // Image only; args replace the cmd.
        assert_eq!(
            command_of(&ep, &cmd, None, &[]),
            v(&["/entry", "serve", "-v"])
        );
        assert_eq!(command_of(&ep, &cmd, None, &v(&["x"])), v(&["/entry", "x"]));
        // --entrypoint drops the image's cmd unless args are given.
        assert_eq!(command_of(&ep, &cmd, Some(&v(&["id"])), &[]), v(&["id"]));
        assert_eq!(
            command_of(&ep, &cmd, Some(&v(&["sh", "-c"])), &v(&["echo 1"])),
            v(&["sh", "-c", "echo 1"])
        );
        // --entrypoint '' clears it; the cmd (or args) is the command.
        assert_eq!(command_of(&ep, &cmd, Some(&[]), &[]), v(&["serve", "-v"]));
        assert_eq!(command_of(&ep, &cmd, Some(&[]), &v(&["ls"])), v(&["ls"]));
        assert!(command_of(&ep, &[], Some(&[]), &[]).is_empty());
    }
}

#[cfg(test)]
mod record_tests {
    use super::write_record_once;
    use std::os::unix::fs::MetadataExt;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Rec {
        a: u32,
    }

    /// Written when missing or different, left in place (same inode) when identical.
    #[test]
    fn a_record_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_record_once(&p, &Rec { a: 1 }).unwrap();
        let first = std::fs::metadata(&p).unwrap().ino();
        write_record_once(&p, &Rec { a: 1 }).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), first);
        write_record_once(&p, &Rec { a: 2 }).unwrap();
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), first);
        let back: Rec = crate::layout::read_record(&p).unwrap();
        assert_eq!(back, Rec { a: 2 });
        // A record in another format is rewritten in the current one.
        std::fs::write(&p, br#"{"a":2}"#).unwrap();
        let old = std::fs::metadata(&p).unwrap().ino();
        write_record_once(&p, &Rec { a: 2 }).unwrap();
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), old);
    }
}

/// Containers whose `stop` is under way (ids), so that a move or a checkpoint of one is refused.
static STOPPING: super::marks::Marks = super::marks::Marks::new();

/// Whether `mig stop` of container `id` is under way.
pub(crate) fn is_stopping(id: &str) -> bool {
    STOPPING.contains(id)
}
