//! `checkpoint` and `restore` on one host: CRIU dumps the running container into
//! `containers/<id>/checkpoint/` (a sealed image set, mig_migrate::imageset) and a new shim
//! (`mig-shim restore`) rebuilds the rootfs and cgroup and restores it from there.

use super::Agent;
use super::Entry;
use crate::api::{ApiError, CheckpointResult, ContainerState, ErrorKind, Response, RestoreResult};
use crate::layout::{now, StateRecord};
use mig_migrate::archive;
use mig_migrate::criu::smaps::SmapsCopy;
use mig_migrate::criu::{Criu, DumpOpts};
use mig_migrate::imageset::{self, SealInfo};
use mig_runtime::cgroup::Cgroup;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long freezing the cgroup may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the shim gets to tear down after CRIU killed the dumped tree.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(15);

fn chain(e: &dyn std::error::Error) -> String {
    crate::shim::chain(e)
}

/// Refuses to dump a container whose network namespace (that of `pid`) has established TCP
/// connections unless the caller asked for them (`--tcp-established`), naming the flag.
fn refuse_established(pid: i32, container: &str, op: &str) -> Result<(), ApiError> {
    match mig_runtime::net::established_tcp(pid) {
        Ok(0) => Ok(()),
        Ok(n) => Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "container {container} has {n} established TCP connection(s); use --tcp-established \
                 to keep them across the {op} (docs/networking.md)"
            ),
        )),
        // Its init gone meanwhile (a `mig rm -f` racing the move): that is what happened, not
        // a failure to read /proc (QA of session 25, F15).
        Err(_) if crate::layout::proc_ended(pid) => Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "container {container} ended (or was removed) as its {op} began: nothing was done"
            ),
        )),
        Err(e) => Err(ApiError::new(
            ErrorKind::Internal,
            format!("checking for established TCP connections: {}", chain(&e)),
        )),
    }
}

/// What can be known of `mig checkpoint --export FILE` before anything is frozen: FILE's
/// directory exists and takes a new file with data in it (not read-only, not full), and FILE is
/// not a directory. The dump may still outlive a failed export (a filesystem filling up while
/// it is written): the checkpoint is then kept (`Agent::checkpoint`).
fn check_export_target(file: &str) -> Result<(), ApiError> {
    use std::io::Write;
    let bad = |why: String| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!("cannot export to {file}: {why}; nothing was frozen"),
        )
    };
    let path = Path::new(file);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(bad("it names no file".into()));
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad(format!("{} is not a directory", dir.display()))),
        Err(e) => return Err(bad(format!("directory {}: {e}", dir.display()))),
    }
    // The archive is written beside FILE and renamed over it: anything but a regular file there
    // would be replaced, and `--export /dev/null` replaced the host's /dev/null with a file.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        let ft = m.file_type();
        if ft.is_dir() {
            return Err(bad("it is a directory".into()));
        }
        if !ft.is_file() {
            let kind = if ft.is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file (a device, FIFO or socket)"
            };
            return Err(bad(format!(
                "it is {kind}, and the export replaces FILE with the archive file"
            )));
        }
    }
    // Where the archive's temporary files go (archive::export writes siblings of FILE).
    let probe = dir.join(format!(
        ".{}.probe{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| {
            let wrote = f.write_all(&[0u8; 4096]).and_then(|_| f.sync_all());
            let _ = std::fs::remove_file(&probe);
            wrote
        });
    written.map_err(|e| bad(format!("cannot write a file in {}: {e}", dir.display())))
}

/// An export that failed after the dump, said of FILE (not of the image file being copied when
/// FILE's filesystem filled up).
fn export_error(file: &str, e: &archive::ArchiveError) -> String {
    match e {
        archive::ArchiveError::Write { source, .. } => format!("cannot write {file}: {source}"),
        e => format!("exporting to {file}: {}", chain(e)),
    }
}

/// Thaws, trying again a few times: a checkpoint that leaves the container running must not
/// leave it frozen.
fn thaw_hard(cg: &Cgroup) -> Result<(), mig_runtime::cgroup::CgroupError> {
    let mut last = cg.thaw();
    for _ in 0..5 {
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        last = cg.thaw();
    }
    last
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Agent {
    /// Refuses a dump (`op`: checkpoint, move) no host could restore ([`Self::refuse_unrestorable`]),
    /// then one of a container with established TCP connections when the caller did not ask to
    /// keep them; the message names `--tcp-established`. (A move calls this only without
    /// `--tcp-established`: migration/source.rs should call `refuse_unrestorable` itself.)
    pub(crate) fn refuse_established(
        &self,
        pid: i32,
        container: &str,
        op: &str,
    ) -> Result<(), ApiError> {
        if let Ok(id) = self.resolve(container) {
            self.refuse_unrestorable(&id, op)?;
        }
        refuse_established(pid, container, op)
    }

    /// Refuses a dump (`op`: checkpoint, move) whose images no host could restore
    /// (migration::modes::check_restorable), before anything is frozen.
    pub(crate) fn refuse_unrestorable(&self, id: &str, op: &str) -> Result<(), ApiError> {
        let e = self.entry(id)?;
        crate::migration::modes::check_restorable(
            op,
            &e.spec.name,
            e.spec.userns.is_some(),
            e.spec.net.is_some(),
        )
        .map_err(|e| ApiError::new(ErrorKind::Unavailable, e.to_string()))
    }

    /// Marks the container busy if it is in state `want` and idle.
    fn claim(&self, id: &str, want: ContainerState) -> Result<(), ApiError> {
        let mut map = self.lock();
        let e = map.get_mut(id).ok_or_else(|| {
            ApiError::new(ErrorKind::NotFound, format!("no such container: {id}"))
        })?;
        if Agent::not_dumpable(id, e) {
            let e = e.clone();
            drop(map);
            return Err(self.busy_error(id, &e));
        }
        if e.state.state != want {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "container {} is {}, not {}",
                    e.spec.name,
                    e.state.state.as_str(),
                    want.as_str()
                ),
            ));
        }
        e.busy = true;
        Ok(())
    }

    pub(crate) async fn checkpoint(
        self: &Arc<Self>,
        container: &str,
        leave_running: bool,
        export: Option<String>,
        tcp_established: bool,
    ) -> Result<Response, ApiError> {
        if export.as_deref().is_some_and(|p| !p.starts_with('/')) {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "the export path must be absolute",
            ));
        }
        let id = self.resolve(container)?;
        self.refresh(&id);
        self.refuse_unrestorable(&id, "checkpoint")?;
        if !tcp_established {
            if let Some(pid) = self.init_pid_of(&id) {
                let name = self.entry(&id).map(|e| e.spec.name)?;
                refuse_established(pid, &name, "checkpoint")?;
            }
        }
        if let Some(file) = export.as_deref() {
            let file = file.to_owned();
            tokio::task::spawn_blocking(move || check_export_target(&file))
                .await
                .unwrap_or_else(|e| {
                    Err(ApiError::new(
                        ErrorKind::Internal,
                        format!("export check failed: {e}"),
                    ))
                })?;
        }
        self.claim(&id, ContainerState::Running)?;
        let agent = self.clone();
        let id2 = id.clone();
        let res = tokio::task::spawn_blocking(move || {
            agent.dump_blocking(&id2, leave_running, export.as_deref(), tcp_established)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::new(
                ErrorKind::Internal,
                format!("dump task failed: {e}"),
            ))
        });
        let (result, export_failed) = match res {
            Ok(r) => r,
            Err(e) => {
                self.update(&id, |e| e.busy = false);
                return Err(e);
            }
        };
        if !leave_running {
            // CRIU killed the tree: wait for the shim to tear the container down.
            let start = Instant::now();
            while self.live_shim(&id).is_some() && start.elapsed() < SHIM_EXIT_TIMEOUT {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.update(&id, |e| {
                e.busy = false;
                e.state.state = ContainerState::Checkpointed;
                e.state.finished = Some(now());
                e.state.exit_code = None;
                e.state.signal = None;
                e.state.reason = None;
            });
        } else {
            self.update(&id, |e| e.busy = false);
        }
        tracing::info!(%id, dump_ms = result.dump_ms, total_ms = result.total_ms, "checkpointed");
        let name = self.entry(&id).map(|e| e.spec.name).unwrap_or_default();
        self.emit(super::events::EventKind::ContainerCheckpointed {
            id: id.clone(),
            name: name.clone(),
            leave_running,
        });
        if let Some(why) = export_failed {
            // The dump is done and sealed: the container is checkpointed here (or still
            // running), whatever became of the archive.
            tracing::warn!(%id, error = %why, "the export of a checkpoint failed");
            let kept = if leave_running {
                format!(
                    "the container keeps running, and its checkpoint is kept in {}",
                    result.images_dir
                )
            } else {
                format!("the checkpoint is kept here: mig restore {name}")
            };
            return Err(ApiError::new(ErrorKind::Internal, format!("{why}; {kept}")));
        }
        Ok(Response::Checkpointed(Box::new(result)))
    }

    /// Freezes, dumps, thaws (or kills), seals and exports; on any failure up to the dump the
    /// container is thawed and keeps running. A failed export comes back as the second value,
    /// with the checkpoint made: the caller records it.
    fn dump_blocking(
        &self,
        id: &str,
        leave_running: bool,
        export: Option<&str>,
        tcp_established: bool,
    ) -> Result<(CheckpointResult, Option<String>), ApiError> {
        let t0 = Instant::now();
        let internal = |m: String| ApiError::new(ErrorKind::Internal, m);
        let e = self.entry(id)?;
        let init_pid = self
            .init_pid_of(id)
            .ok_or_else(|| ApiError::new(ErrorKind::Conflict, "the container's init is gone"))?;
        let criu = Criu::locate().map_err(|e| ApiError::new(ErrorKind::Unavailable, chain(&e)))?;
        let criu_version = criu.version().map_err(|e| internal(chain(&e)))?;
        crate::migration::criu_kdat(&criu);
        let cg = Cgroup::open(&e.state.cgroup).map_err(|e| internal(chain(&e)))?;
        // Before anything is frozen or the old checkpoint removed.
        let procs = cg.procs().unwrap_or_else(|_| vec![init_pid]);
        if let Some(why) =
            mig_runtime::container::rlimit_blocker(&procs, e.spec.userns.is_some(), criu.path())
                .or_else(|| mig_runtime::container::lock_blocker(&procs, criu.path()))
        {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                format!("cannot checkpoint {}: {why}", e.spec.name),
            ));
        }
        let cd = self.dirs.container(id);
        let images = cd.checkpoint();
        if images.exists() {
            std::fs::remove_dir_all(&images)
                .map_err(|e| internal(format!("removing the old checkpoint: {e}")))?;
        }
        std::fs::create_dir_all(&images)
            .map_err(|e| internal(format!("creating {}: {e}", images.display())))?;
        let shim_pid = self.live_shim(id).map(|s| s.shim_pid);
        let stdio_pipe = mig_migrate::criu::log_pipe(init_pid, shim_pid, &procs);
        // Until this returns: an agent that dies in between finds it at its start and thaws the
        // container (settle_interrupted).
        let _marker = Interrupted::mark(&cd.dir);
        let tf = Instant::now();
        let vforks = cg.freeze_for_dump(FREEZE_TIMEOUT).map_err(|e| {
            let _ = cg.thaw();
            internal(format!("freezing the container: {}", chain(&e)))
        })?;
        let freeze_ms = ms(tf.elapsed());
        if vforks > 0 {
            tracing::info!(%id, vforks, freeze_ms, "frozen again: a process was between vfork and exec");
        }
        // Taken while frozen, so it lists exactly the processes CRIU dumps.
        let pid_map = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_else(|_| vec![init_pid]));
        let td = Instant::now();
        // Read on a thread while the dump starts (mig_migrate::criu::smaps).
        let smaps_dir = images.with_file_name("checkpoint-smaps");
        let pids: Vec<i32> = pid_map.iter().map(|e| e.host_pid).collect();
        let smaps = SmapsCopy::start(&smaps_dir, &pids).ok();
        // CRIU keeps no CPU masks: the narrowed ones go into the image set after the dump.
        let masks = mig_runtime::affinity::narrowed(&pids);
        // Without --leave-running the dumped tree still ends, but after the seal (below).
        let kill_after_seal = !leave_running && !tcp_established;
        let dumped = criu.dump(&DumpOpts {
            pid: init_pid,
            images_dir: images.clone(),
            root: Some(cd.rootfs()),
            freeze_cgroup: cg.freezer_dir(),
            // CRIU leaves the dumped tree frozen, and it is killed once the image set is sealed:
            // an agent that dies before that leaves a frozen container, which its restart thaws,
            // not a killed container without a checkpoint (QA of session 21). Not with
            // established connections: CRIU kills them behind its network lock, so their peers
            // see no reset, and they are restored with the container.
            leave_running: leave_running || kill_after_seal,
            tcp_established,
            log_file: "dump.log".into(),
            // A user-namespace container's host binds (devices, masked files).
            external: mig_runtime::container::dump_externals(&e.spec),
            extra: crate::migration::dump_extra_args(),
            smaps_dir: smaps.as_ref().map(|c| c.dir().to_owned()),
            ..Default::default()
        });
        let dump_ms = ms(td.elapsed());
        let stats = match dumped {
            Ok(s) => {
                if let Err(e) = mig_runtime::affinity::save(&images, &masks) {
                    tracing::warn!(id = %id, error = %e, "cannot save the tasks' CPU masks: they are not restored");
                }
                s
            }
            Err(err) => {
                let thawed = thaw_hard(&cg);
                let detail = chain(&err);
                // The hint first: CRIU's log lines after it are long.
                let mut msg = match crate::migration::criu_failure_hint(&detail) {
                    Some(hint) => {
                        format!("checkpoint failed, the container keeps running: {hint}; {detail}")
                    }
                    None => format!("checkpoint failed, the container keeps running: {detail}"),
                };
                if let Err(t) = thawed {
                    msg.push_str(&format!("; and thawing it failed too: {}", chain(&t)));
                }
                return Err(internal(msg));
            }
        };
        crate::migration::fault::hit(
            &self.cfg.state_dir,
            crate::migration::fault::Point::CheckpointDump,
        )
        .map_err(|e| {
            let _ = thaw_hard(&cg);
            internal(format!(
                "checkpoint failed, the container keeps running: {e}"
            ))
        })?;
        // An export of a container left running takes its writable layer while it is still
        // frozen, as the memory was dumped (QA of session 25: archived after the thaw, it held
        // lines the restored process wrote again).
        let frozen_upper = cd.dir.join(".export-upper.tar");
        let _ = std::fs::remove_file(&frozen_upper);
        if leave_running && export.is_some() {
            // Not synced: a temporary file, read back into the archive, which is.
            let written = std::fs::File::create(&frozen_upper).and_then(|f| {
                let mut w = std::io::BufWriter::new(f);
                archive::write_layer_tar(&cd.upper(), &mut w).map_err(std::io::Error::other)?;
                w.into_inner().map(drop).map_err(|e| e.into_error())
            });
            if let Err(err) = written {
                let _ = std::fs::remove_file(&frozen_upper);
                let thawed = thaw_hard(&cg);
                return Err(internal(format!(
                    "archiving the writable layer for the export: {err}{}",
                    if thawed.is_ok() {
                        "; the container keeps running"
                    } else {
                        "; and thawing it failed"
                    }
                )));
            }
        }
        if leave_running {
            thaw_hard(&cg)
                .map_err(|e| internal(format!("thawing after the dump: {}", chain(&e))))?;
        } else if !kill_after_seal {
            // CRIU killed the dumped tasks; make sure nothing is left frozen in the cgroup.
            let _ = cg.kill();
            let _ = cg.thaw();
        }
        // After the thaw: a failed dump above returns with it thawed first, too.
        drop(smaps);
        let manifest = imageset::seal(
            &images,
            SealInfo {
                spec: e.spec.clone(),
                criu_version,
                pid_map: pid_map.clone(),
                stdio_pipe,
                stats: Some(stats.clone()),
            },
        )
        .map_err(|e| {
            let mut msg = format!("sealing the image set: {}", chain(&e));
            if kill_after_seal {
                msg.push_str(match thaw_hard(&cg) {
                    Ok(()) => "; the container keeps running",
                    Err(_) => "; and thawing the container failed",
                });
            }
            internal(msg)
        })?;
        if kill_after_seal {
            // The checkpoint is whole: now the dumped tree ends, as `mig checkpoint` without
            // --leave-running promises.
            let _ = cg.kill();
            let _ = cg.thaw();
        }
        let mut export_failed = None;
        let (exported, archive_bytes) = match export {
            None => (None, None),
            Some(file) => {
                crate::migration::fault::hit(
                    &self.cfg.state_dir,
                    crate::migration::fault::Point::CheckpointExport,
                )
                .map_err(|e| internal(format!("checkpoint export failed: {e}")))?;
                let zstd = file.ends_with(".zst") || file.ends_with(".zstd");
                // The container's output and creation time go too: an import continues them,
                // as a move does (QA: `restore --import` started an empty log and a new
                // `created`).
                let record = cd.dir.join(".export-state.json");
                let state = serde_json::to_vec(&ExportedState {
                    created: e.state.created,
                })
                .unwrap_or_default();
                let mut extras = Vec::new();
                if std::fs::write(&record, state).is_ok() {
                    extras.push((archive::CONTAINER_STATE, record.as_path()));
                }
                let log = cd.log();
                if log.is_file() {
                    extras.push((archive::CONTAINER_LOG, log.as_path()));
                }
                let upper = if frozen_upper.is_file() {
                    frozen_upper.clone()
                } else {
                    cd.upper()
                };
                let written =
                    archive::export_with(&images, Some(&upper), &extras, Path::new(file), zstd);
                let _ = std::fs::remove_file(&record);
                let _ = std::fs::remove_file(&frozen_upper);
                match written {
                    Ok(_) => {
                        let size = std::fs::metadata(file).map(|m| m.len()).ok();
                        (Some(file.to_owned()), size)
                    }
                    Err(e) => {
                        export_failed = Some(export_error(file, &e));
                        (None, None)
                    }
                }
            }
        };
        let result = CheckpointResult {
            exported,
            archive_bytes,
            id: id.to_owned(),
            leave_running,
            freeze_ms,
            dump_ms,
            total_ms: ms(t0.elapsed()),
            image_bytes: manifest.files.iter().map(|f| f.size).sum(),
            images_dir: images.display().to_string(),
            pid_map,
            criu: stats,
        };
        Ok((result, export_failed))
    }

    /// `mig restore ID` (the API's): [`Agent::restore`], unless the container's address answers
    /// on the segment ([`Agent::refuse_answered_address`]).
    pub(crate) async fn restore_checkpointed(
        self: &Arc<Self>,
        container: &str,
    ) -> Result<Response, ApiError> {
        let id = self.resolve(container)?;
        let e = self.entry(&id)?;
        if e.state.state == ContainerState::Checkpointed {
            if let Some(net) = e.spec.net.clone() {
                // This copy's own host end, left while the kernel tears down the namespace of
                // the copy just checkpointed: removed first (as the restore would), so that the
                // dying copy does not answer the probe.
                let _ = tokio::task::spawn_blocking(move || mig_runtime::net::before_restore(&net))
                    .await;
            }
            self.refuse_answered_address(&e.spec).await?;
        }
        self.restore_spending(&id).await
    }

    /// Refuses to restore a `--net bridge` checkpoint whose address something on the segment
    /// answers for: a copy still running on another host (after `checkpoint --leave-running` or
    /// `--export`, and a `restore --import` there), which the address table cannot tell from the
    /// container itself (both have the id that owns the address). A copy frozen in a move
    /// answers nothing, so the pinned peers are asked too ([`Agent::ask_peers_about`]). Not used
    /// by moves: their source has taken the container off the segment before the destination
    /// restores.
    async fn refuse_answered_address(
        self: &Arc<Self>,
        spec: &mig_runtime::spec::ContainerSpec,
    ) -> Result<(), ApiError> {
        let Some(net) = spec.net.clone() else {
            return Ok(());
        };
        let state_dir = self.cfg.state_dir.clone();
        let address = net.address;
        let answer = tokio::task::spawn_blocking(move || {
            mig_runtime::net::HostNet::load(&state_dir).and_then(|n| n.answering(address))
        })
        .await;
        match answer {
            Ok(Ok(Some(mac))) => Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    concat!(
                        "address {} of {} answers on the segment (from MAC {}): a copy of ",
                        "the container is still running on another host (a checkpoint taken with ",
                        "--leave-running or exported, and restored there?); stop that copy first; ",
                        "nothing was restored"
                    ),
                    address,
                    spec.name,
                    mac.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            )),
            Ok(Ok(None)) | Ok(Err(mig_runtime::net::NetError::NoHostNet { .. })) => Ok(()),
            Ok(Err(e)) => {
                // The restore itself says what is wrong with the network, if anything.
                tracing::warn!(name = %spec.name, error = %chain(&e), "cannot probe the container's address before the restore");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(name = %spec.name, error = %e, "the address probe failed");
                Ok(())
            }
        }?;
        let answers = self.ask_peers_about(&spec.id).await;
        let too_old = answers
            .too_old
            .iter()
            .map(|p| (p, "its protocol is older than 1.7"));
        for (peer, why) in answers
            .unasked
            .iter()
            .map(|(p, w)| (p, w.as_str()))
            .chain(too_old)
        {
            tracing::warn!(name = %spec.name, %peer, %why, "cannot ask a peer whether it holds the container before the restore");
        }
        match answers.held.first() {
            Some((peer, state)) => Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} holds {} ({}): restoring this checkpoint here would make a second copy with address {}; stop that copy first, or wait for its move to end; nothing was restored",
                    peer, spec.name, state, address
                ),
            )),
            None => Ok(()),
        }
    }

    /// [`Agent::restore`] of a local checkpoint (`mig restore`, `restore --import`): once the
    /// container runs, its page images are removed ([`spend_pages`]).
    async fn restore_spending(self: &Arc<Self>, id: &str) -> Result<Response, ApiError> {
        let r = self.restore(id).await?;
        let images = self.dirs.container(id).checkpoint();
        let id = id.to_owned();
        let _ = tokio::task::spawn_blocking(move || spend_pages(&images, &id)).await;
        Ok(r)
    }

    pub(crate) async fn restore(self: &Arc<Self>, container: &str) -> Result<Response, ApiError> {
        let t0 = Instant::now();
        let id = self.resolve(container)?;
        self.refresh(&id);
        self.claim(&id, ContainerState::Checkpointed)?;
        self.update(&id, |e| e.state.state = ContainerState::Restoring);
        let e = self.entry(&id)?;
        match self.start_shim(&e.spec, &e.state, "restore").await {
            Ok((child, init_pid)) => {
                self.update(&id, |e| {
                    let st = &mut e.state;
                    e.busy = false;
                    st.state = ContainerState::Running;
                    st.started = Some(now());
                    st.finished = None;
                    st.exit_code = None;
                    st.signal = None;
                    st.oom_killed = false;
                    st.reason = None;
                    st.stop_requested = false;
                });
                super::containers::spawn_watch(self.clone(), id.clone(), Some(child));
                let cg = Cgroup::open(&e.state.cgroup).ok();
                let procs = cg
                    .and_then(|c| c.procs().ok())
                    .unwrap_or_else(|| vec![init_pid]);
                let result = RestoreResult {
                    id: id.clone(),
                    name: e.spec.name.clone(),
                    total_ms: ms(t0.elapsed()),
                    init_pid,
                    pid_map: mig_runtime::pidmap::pid_map(&procs),
                };
                tracing::info!(%id, total_ms = result.total_ms, "restored");
                self.emit(super::events::EventKind::ContainerRestored {
                    id: id.clone(),
                    name: e.spec.name.clone(),
                });
                Ok(Response::Restored(Box::new(result)))
            }
            Err(err) => {
                self.update(&id, |e| {
                    e.busy = false;
                    e.state.state = ContainerState::Checkpointed;
                    e.state.reason = Some(format!("restore failed: {}", err.message));
                });
                Err(ApiError::new(
                    err.kind,
                    format!("restore failed: {}", err.message),
                ))
            }
        }
    }
}

impl Agent {
    /// `restore --import FILE`: unpacks and verifies the archive into a new container directory
    /// (the archive's id when free here, else a new one), unpacks its writable layer, records the
    /// container as checkpointed and restores it.
    pub(crate) async fn restore_import(
        self: &Arc<Self>,
        file: String,
        name: Option<String>,
    ) -> Result<Response, ApiError> {
        if !file.starts_with('/') {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "the archive path must be absolute",
            ));
        }
        if let Some(n) = &name {
            mig_runtime::spec::validate_name(n)
                .map_err(|e| ApiError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        }
        // Unpacked under a temporary id, renamed once the final id is known.
        let tmp_id = super::containers::new_id();
        let tmp = self.dirs.containers().join(format!(".import-{tmp_id}"));
        let agent = self.clone();
        let tmp2 = tmp.clone();
        let unpacked = tokio::task::spawn_blocking(move || agent.unpack_import(&file, &tmp2))
            .await
            .unwrap_or_else(|e| {
                Err(ApiError::new(
                    ErrorKind::Internal,
                    format!("import task failed: {e}"),
                ))
            });
        let mut spec = match unpacked {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        // A container here with the address is refused below, by name; elsewhere only the
        // segment can tell.
        let here = spec.net.as_ref().is_some_and(|net| {
            self.lock()
                .values()
                .any(|e| e.spec.net.as_ref().map(|n| n.address) == Some(net.address))
        });
        if !here {
            if let Err(e) = self.refuse_answered_address(&spec).await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        let id = {
            let _reserving = crate::migration::dest::reserving();
            let mut map = self.lock();
            // An id an incoming move reserved (at its Prepare) or whose directory exists is taken
            // too: a container arriving from another host is not listed before its restore
            // (QA: an import took the id of a container arriving at that moment, and its
            // failure removed that directory).
            if map.contains_key(&spec.id)
                || self.dirs.container(&spec.id).dir.exists()
                || crate::migration::dest::arriving_id(&self.cfg.state_dir, &spec.id)
            {
                spec.id = tmp_id.clone();
            }
            if let Some(n) = name {
                spec.name = n;
            }
            let arriving = crate::migration::dest::arriving_named(&self.cfg.state_dir, &spec.name);
            if map.values().any(|e| e.spec.name == spec.name) || arriving.is_some() {
                drop(map);
                let _ = std::fs::remove_dir_all(&tmp);
                let by = arriving.map_or(String::new(), |id| {
                    format!(" by container {id}, arriving here from another host")
                });
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!("the name {} is already in use{by} (use --name)", spec.name),
                ));
            }
            // The checkpoint restores with its dumped user-namespace maps: the range must be free.
            let used = map.values().filter_map(|e| e.spec.userns.as_ref());
            if let Some(m) = spec.userns {
                if let Some(u) = mig_runtime::container::userns::clash(&m, used) {
                    drop(map);
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(ApiError::new(
                        ErrorKind::Conflict,
                        format!(
                            "the checkpoint's user-namespace host ids {}-{} overlap a container's here ({}-{})",
                            m.host_id,
                            u64::from(m.host_id) + u64::from(m.size) - 1,
                            u.host_id,
                            u64::from(u.host_id) + u64::from(u.size) - 1
                        ),
                    ));
                }
            }
            // The checkpoint's address, MAC and host interface are in its images: refused when
            // they belong to another container, before anything is touched (QA session 16:
            // `--name` gave a copy the running original's address, and the restore deleted the
            // original's host veth).
            let mut claimed = false;
            if let Some(net) = &spec.net {
                if let Err(e) = self.check_import_net(&map, &spec.id, net) {
                    drop(map);
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(e);
                }
                match mig_runtime::net::HostNet::load(&self.cfg.state_dir)
                    .and_then(|n| n.claim(&spec.id, net.address))
                {
                    Ok(()) => claimed = true,
                    // No container network here: the restore says so.
                    Err(mig_runtime::net::NetError::NoHostNet { .. }) => {}
                    Err(e) => {
                        let owner = match &e {
                            mig_runtime::net::NetError::AddressTaken { owner, .. } => {
                                Some(owner.clone())
                            }
                            _ => None,
                        };
                        drop(map);
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(match owner {
                            Some(owner) => ApiError::new(
                                ErrorKind::AlreadyExists,
                                format!(
                                    "the checkpoint's address {} belongs to container {owner} \
                                     (the segment's address table gives it to that container, \
                                     here or on another host); nothing was restored",
                                    net.address
                                ),
                            ),
                            None if matches!(e, mig_runtime::net::NetError::Reserved { .. }) => {
                                ApiError::new(
                                    ErrorKind::AlreadyExists,
                                    format!("the checkpoint's {e}; nothing was restored"),
                                )
                            }
                            None => ApiError::new(
                                ErrorKind::Internal,
                                format!("recording the checkpoint's address: {}", chain(&e)),
                            ),
                        });
                    }
                }
            }
            let state = StateRecord {
                // The container's own, from an archive that has it.
                created: exported_state(&tmp).map_or_else(now, |s| s.created),
                ..StateRecord::new(ContainerState::Checkpointed, self.cgroup_name(&spec.id))
            };
            let cd = self.dirs.container(&spec.id);
            // The directory is the import's only once the rename made it: a failure before
            // must not remove what another operation put there.
            let mut renamed = false;
            let written = std::fs::rename(&tmp, &cd.dir)
                .inspect(|_| renamed = true)
                .and_then(|_| crate::layout::write_record(&cd.spec(), &spec))
                .and_then(|_| crate::layout::write_record(&cd.state(), &state));
            if let Err(e) = written {
                drop(map);
                if claimed {
                    let _ = mig_runtime::net::ipam::release(&self.cfg.state_dir, &spec.id);
                }
                let _ = std::fs::remove_dir_all(&tmp);
                if renamed {
                    let _ = std::fs::remove_dir_all(&cd.dir);
                }
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    format!("recording the import: {e}"),
                ));
            }
            map.insert(
                spec.id.clone(),
                Entry {
                    spec: spec.clone(),
                    state,
                    busy: false,
                },
            );
            spec.id.clone()
        };
        tracing::info!(%id, name = %spec.name, "imported a checkpoint");
        self.restore_spending(&id).await
    }

    /// Refuses an imported checkpoint (to become container `id`) whose network is another
    /// container's here: the same address, MAC or host interface name as a container of another
    /// id, or a host interface of the recorded name that is not a leftover of container `id`
    /// (named after another id). Nothing is touched.
    fn check_import_net(
        &self,
        map: &std::collections::HashMap<String, Entry>,
        id: &str,
        net: &mig_runtime::net::NetSpec,
    ) -> Result<(), ApiError> {
        let taken = |what: String, owner: &str| {
            ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "the checkpoint's {what} belongs to container {owner} here (the archive was \
                     made of it or of a copy of it, and a restored copy keeps its network): \
                     restore it on another host of the segment, or remove {owner} first; \
                     nothing was restored"
                ),
            )
        };
        for e in map.values().filter(|e| e.spec.id != id) {
            let Some(n) = &e.spec.net else { continue };
            if n.address == net.address {
                return Err(taken(format!("address {}", net.address), &e.spec.name));
            }
            if n.host_ifname == net.host_ifname {
                return Err(taken(
                    format!("host interface {}", net.host_ifname),
                    &e.spec.name,
                ));
            }
            if n.mac == net.mac {
                return Err(taken(format!("MAC address {}", net.mac), &e.spec.name));
            }
        }
        if net.host_ifname != mig_runtime::net::host_ifname_for_id(id)
            && mig_runtime::net::host_link_exists(&net.host_ifname)
        {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "the checkpoint's host interface {} exists here and is not a leftover of \
                     this container (its id is {id}): it is another container's; nothing was \
                     restored",
                    net.host_ifname
                ),
            ));
        }
        Ok(())
    }

    /// Unpacks and verifies the archive into `dir/checkpoint`, checks the image layers are here,
    /// unpacks the writable layer into `dir/upper`. Returns the archived spec.
    fn unpack_import(
        &self,
        file: &str,
        dir: &Path,
    ) -> Result<mig_runtime::spec::ContainerSpec, ApiError> {
        let bad = |m: String| ApiError::new(ErrorKind::InvalidArgument, m);
        // Root's alone until the restore gives it its mode (privacy.rs).
        crate::privacy::create_dir(dir, crate::privacy::PRIVATE_DIR)
            .map_err(|e| ApiError::new(ErrorKind::Internal, chain(&e)))?;
        let images = dir.join("checkpoint");
        let manifest = archive::import(Path::new(file), &images)
            .map_err(|e| bad(format!("importing {file}: {}", chain(&e))))?;
        if let Some(why) =
            crate::migration::dest::unrestorable_here(&manifest.criu_version, &manifest.kernel)
        {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "the checkpoint in {file} cannot be restored here: {why}; nothing was restored"
                ),
            ));
        }
        let spec = manifest.spec;
        spec.validate()
            .map_err(|e| bad(format!("the archived spec is invalid: {e}")))?;
        if let Some(missing) = spec.image.layers.iter().find(|l| !self.images.has_layer(l)) {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "image layer {missing} of image {} is missing on this host: import the image first",
                    spec.image.name
                ),
            ));
        }
        archive::unpack_upper(&images, &dir.join("upper"))
            .map_err(|e| bad(format!("unpacking the writable layer: {}", chain(&e))))?;
        // The container's output so far, from an archive that has it (verified with the set).
        let log = images.join(archive::CONTAINER_LOG);
        if log.is_file() {
            std::fs::copy(&log, dir.join("container.log"))
                .map_err(|e| ApiError::new(ErrorKind::Internal, format!("placing the log: {e}")))?;
        }
        for d in ["work", "rootfs"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| ApiError::new(ErrorKind::Internal, format!("creating {d}: {e}")))?;
        }
        Ok(spec)
    }
}

/// `<container>/checkpointing`: a local checkpoint froze the container and has not ended.
const CHECKPOINTING: &str = "checkpointing";

/// The mark of a checkpoint under way, removed when it ends, whichever way.
struct Interrupted(std::path::PathBuf);

impl Interrupted {
    fn mark(container_dir: &Path) -> Interrupted {
        let path = container_dir.join(CHECKPOINTING);
        if let Err(e) = std::fs::write(&path, b"") {
            tracing::warn!(path = %path.display(), error = %e, "cannot mark the checkpoint under way");
        }
        Interrupted(path)
    }
}

impl Drop for Interrupted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// At the agent's start: a checkpoint of container `id` that the agent did not see to its end
/// (it was killed, or the host's power went) left the container frozen, and nothing else would
/// ever thaw it (QA of session 21). Its processes run on; the unsealed image set is not a
/// checkpoint and the next one replaces it. True when the container's processes are gone and its
/// image set is sealed: a checkpoint without `--leave-running` had ended them after the seal, and
/// the agent stopped before it recorded the container as checkpointed (during the export, QA of
/// session 25): the checkpoint is whole, and the caller records it so.
pub(super) fn settle_interrupted(container_dir: &Path, id: &str, cgroup: &str) -> bool {
    let mark = container_dir.join(CHECKPOINTING);
    if !mark.exists() {
        return false;
    }
    let mut alive = false;
    if let Ok(cg) = Cgroup::open(cgroup) {
        if cg.procs().is_ok_and(|p| !p.is_empty()) {
            alive = true;
            match thaw_hard(&cg) {
                Ok(()) => {
                    tracing::warn!(%id, "a checkpoint was interrupted (the agent stopped during it): the container was thawed and runs on")
                }
                Err(e) => {
                    tracing::warn!(%id, error = %chain(&e), "a checkpoint was interrupted, and thawing the container failed")
                }
            }
        }
    }
    let sealed = !alive && imageset::verify(&container_dir.join("checkpoint")).is_ok();
    let _ = std::fs::remove_file(&mark);
    sealed
}

/// Removes the page images of container `id`'s restored image set at `images`: its processes
/// hold every page now, and the set held them once per process (QA: a 34 MiB container kept
/// 131 MiB on disk for its lifetime). Not while a lazy-pages daemon still serves them.
pub(crate) fn spend_pages(images: &std::path::Path, id: &str) {
    match mig_migrate::imageset::remove_pages(images) {
        Ok(0) => {}
        Ok(freed) => tracing::debug!(%id, freed, "the restored image set's pages removed"),
        Err(e) => {
            tracing::warn!(%id, error = %e, dir = %images.display(), "cannot remove the restored image set's pages")
        }
    }
}

/// The container's record in an exported archive (`archive::CONTAINER_STATE`).
#[derive(serde::Serialize, serde::Deserialize)]
struct ExportedState {
    /// Seconds since the epoch.
    created: u64,
}

/// The record an imported archive (unpacked in `container_dir`) brought, if it has one.
fn exported_state(container_dir: &Path) -> Option<ExportedState> {
    let data = std::fs::read(
        container_dir
            .join("checkpoint")
            .join(archive::CONTAINER_STATE),
    )
    .ok()?;
    serde_json::from_slice(&data).ok()
}
