//! `mig move` on the agent: the checks before a move, claiming the container, the pre-flight
//! over the connection, running the source machine, and the result or the error.

use super::rollback::{cause_words, kept_log_named, rolled_back_kind};
use super::{SourceSide, Src};
use crate::api::{ApiError, ContainerState, ErrorKind};
use crate::daemon::Agent;
use crate::migration::fault;
use crate::migration::journal;
use crate::migration::{chain, memsync, ms, MoveResult};
use mig_migrate::criu::Criu;
use mig_migrate::protocol::{JournalState, Outcome, SourceMachine, Timeouts};
use mig_migrate::transport;
use mig_migrate::wire::Prepare;
use mig_runtime::cgroup::Cgroup;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether container `id` (entry `e`) runs, is not busy and is not being stopped: a move may
/// claim it.
fn idle_running(id: &str, e: &crate::daemon::Entry) -> bool {
    !Agent::not_dumpable(id, e)
        && e.state.state == ContainerState::Running
        && !crate::daemon::is_stopping(id)
}

/// Size in bytes of the files under `dir`, and of those changed within `recent` (best effort).
fn du(dir: &Path, recent: Duration) -> (u64, u64) {
    let now = std::time::SystemTime::now();
    let since = now.checked_sub(recent).unwrap_or(std::time::UNIX_EPOCH);
    let ahead = now + Duration::from_secs(5);
    let (mut total, mut changed) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                // What the file takes on disk: a sparse file's holes are not sent or stored
                // (QA: a 100 GiB sparse file made the move "too big" for any destination).
                let bytes = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
                total += bytes;
                // The inode's change time, which the container cannot set back (`tar x` and
                // `cp -p` keep old mtimes); one ahead of the clock by more than a little is
                // not taken as recent (review of session 32, L2).
                let ctime = std::time::UNIX_EPOCH
                    + Duration::from_secs(std::os::unix::fs::MetadataExt::ctime(&m).max(0) as u64);
                if ctime >= since && ctime <= ahead {
                    changed += bytes;
                }
            }
        }
    }
    (total, changed)
}

fn api(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg)
}

impl Agent {
    /// `pinned peers: host-b, host-c`, or how to pin one when there is none: the end of the
    /// errors of a move to a peer that is not (or cannot be) one.
    fn pinned_hint(&self) -> String {
        let peers: Vec<String> = self
            .migration
            .net()
            .map(|n| {
                n.peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .list()
                    .iter()
                    .map(|p| p.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        if peers.is_empty() {
            "no peer is pinned here (mig peers add)".to_owned()
        } else {
            format!("pinned peers: {}", peers.join(", "))
        }
    }

    /// `mig move`: moves a running container to `peer`. Returns when the container runs on the
    /// peer (Ok) or again here (an error saying why).
    pub(crate) async fn move_container(
        self: &Arc<Self>,
        container: &str,
        peer: &str,
        tcp_established: bool,
        opts: crate::migration::modes::MoveOptions,
    ) -> Result<MoveResult, ApiError> {
        let t0 = Instant::now();
        let _running = crate::daemon::heap::Running::start();
        opts.check()?;
        let (id, peer) = self.check_move(container, peer, tcp_established)?;
        let _slot = self
            .migration
            .outgoing_slot(self.cfg.max_outgoing_moves)
            .map_err(|running| {
                api(
                    ErrorKind::Conflict,
                    format!(
                        "this agent already runs {running} outgoing move(s), its limit (limits.max_outgoing_moves): try again later"
                    ),
                )
            })?;
        self.claim_running(&id)?;
        let migration_id = journal::new_id();
        let result = self
            .move_claimed(t0, &id, &migration_id, &peer, tcp_established, opts)
            .await;
        if result.is_err() && !self.commit_may_have_happened(&migration_id) {
            // Still ours (rolled back or never started): runs here, not busy.
            self.set_busy(&id, false);
        }
        result
    }

    /// Whether move `migration_id` sent its commit (journaled before it is sent): then a failed
    /// move is in doubt or committed, and the container stays busy and frozen until the
    /// resolver or the removal of this copy settles it. By the move's own journal: the
    /// container's newest one could be an earlier move away of the same second (journals count
    /// seconds), which left a container that came back since busy for good after a refused
    /// move (CI of session 23: `rm` said "busy" after a refused lazy move).
    fn commit_may_have_happened(&self, migration_id: &str) -> bool {
        use mig_migrate::protocol::JournalState;
        journal::read_checked(&self.cfg.state_dir, migration_id).is_ok_and(|j| {
            matches!(
                j.state,
                JournalState::CommitSent | JournalState::InDoubt | JournalState::Committed
            )
        })
    }

    /// What a move of `container` to `peer` can be refused for before anything starts (also
    /// by `move_start`, which answers at once): this host named as the peer, a peer not
    /// pinned, an unknown container or one that cannot be restored elsewhere, established TCP
    /// connections without `tcp_established`, a container not running or busy (already
    /// moving, being stopped...). Returns its id and the peer.
    pub(crate) fn check_move(
        &self,
        container: &str,
        peer: &str,
        tcp_established: bool,
    ) -> Result<(String, mig_migrate::transport::Peer), ApiError> {
        if peer == self.cfg.name {
            // Not a pinned peer, and the user means this host: say so, and where it can go.
            let id = self.resolve(container)?;
            let name = self.entry(&id).map(|e| e.spec.name).unwrap_or(id);
            let hint = self.pinned_hint();
            return Err(api(
                ErrorKind::InvalidArgument,
                format!("container {name} is already on {peer} (this host); {hint}"),
            ));
        }
        let net = self.migration.net().ok_or_else(|| {
            api(
                ErrorKind::Unavailable,
                "the migration endpoint is not running",
            )
        })?;
        // The peers' lock is released at the end of this statement (`pinned_hint` takes it).
        let found = net
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned();
        let peer = found.ok_or_else(|| {
            // A typo or a host not added yet: say which peers there are.
            let hint = self.pinned_hint();
            api(
                ErrorKind::NotFound,
                format!("no pinned peer named {peer} ({hint})"),
            )
        })?;
        let id = self.resolve(container)?;
        self.refresh(&id);
        self.refuse_unrestorable(&id, "move")?;
        let e = self.entry(&id)?;
        if !tcp_established {
            if let Some(pid) = self.init_pid_of(&id) {
                // By its name, whatever the caller used (`mig drain` passes ids).
                self.refuse_established(pid, &e.spec.name, "move")?;
            }
        }
        if !idle_running(&id, &e) {
            return Err(self.not_idle_running(&id, &e));
        }
        // Frozen with nothing here to say why: the copy of a move left in doubt whose journal
        // entry could not be read (QA of session 25, F6: moved on, while the other host kept
        // its copy frozen with advice that then made two copies).
        if self.cgroup_frozen(&e.state.cgroup) && !crate::migration::frozen_for_move(&id) {
            return Err(api(
                ErrorKind::Conflict,
                format!(
                    "container {} is frozen and no operation of this agent froze it: it may be the copy of a move left in doubt whose journal entry could not be read (the agent's log at its start says so); moving it could leave two copies. Look for it on the other hosts (mig ps on each) and settle that copy there; once it must run here, `mig move --resolve {} --decide rolled-back` thaws it; nothing was moved",
                    e.spec.name, e.spec.name
                ),
            ));
        }
        Ok((id, peer))
    }

    async fn move_claimed(
        self: &Arc<Self>,
        t0: Instant,
        id: &str,
        migration_id: &str,
        peer: &mig_migrate::transport::Peer,
        tcp_established: bool,
        opts: crate::migration::modes::MoveOptions,
    ) -> Result<MoveResult, ApiError> {
        let net = self.migration.net().ok_or_else(|| {
            api(
                ErrorKind::Unavailable,
                "the migration endpoint is not running",
            )
        })?;
        let e = self.entry(id)?;
        let images = self.images.clone();
        let (image_id, image_name) = (e.spec.image.id.clone(), e.spec.image.name.clone());
        // The record of the name the container was made from, when it still names this image:
        // the destination records the image under the name it is sent with (QA of session 32,
        // F4: an image of two names went as the other one, and `mig run <the name inspect
        // shows>` there said "no such image").
        let image = tokio::task::spawn_blocking(move || match images.get(&image_name) {
            Ok(named) if named.id == image_id => Ok(named),
            _ => images.get(&image_id),
        })
        .await
        .map_err(|e| {
            api(
                ErrorKind::Internal,
                format!("image lookup task failed: {e}"),
            )
        })?
        .map_err(|e| api(ErrorKind::NotFound, format!("the container's image: {e}")))?;
        let criu = Criu::locate().map_err(|e| api(ErrorKind::Unavailable, chain(&e)))?;
        let criu_version = criu
            .version()
            .map_err(|e| api(ErrorKind::Unavailable, chain(&e)))?;
        {
            let criu = criu.clone();
            let _ = tokio::task::spawn_blocking(move || crate::migration::criu_kdat(&criu)).await;
        }
        let cg = Cgroup::open(&e.state.cgroup).map_err(|err| {
            // Its init exited as the move began: the shim removed the cgroup (QA of session
            // 24: an internal "cgroup ... does not exist" instead of this).
            let ended = match self.init_pid_of(id) {
                None => true,
                Some(pid) => crate::layout::proc_ended(pid),
            };
            if ended {
                api(
                    ErrorKind::Conflict,
                    format!(
                        "{} ended as its move to {} began (its init is gone), so nothing was moved and it runs nowhere; `mig ps -a` shows how it ended",
                        e.spec.name, peer.name
                    ),
                )
            } else {
                api(ErrorKind::Internal, chain(&err))
            }
        })?;
        let usage = cg.usage().unwrap_or_default();
        let procs = cg.procs().unwrap_or_default();
        let tasks = (
            procs.len().max(1) as u64,
            mig_runtime::pidmap::threads(&procs).max(1),
            mig_runtime::pidmap::mappings(&procs),
        );
        let pid_map_before = mig_runtime::pidmap::pid_map(&procs);
        let cd = self.dirs.container(id);
        let upper = cd.upper();
        let pids = procs.clone();
        let init = self.init_pid_of(id);
        let (upper_bytes, ghost_bytes, mapped, tmpfs) = tokio::task::spawn_blocking(move || {
            (
                du(
                    &upper,
                    Duration::from_secs(crate::migration::modes::UPPER_RECENT_SECS),
                ),
                mig_runtime::pidmap::deleted_open_bytes(&pids),
                mig_runtime::pidmap::mapped_memory(&pids),
                init.map_or(0, mig_runtime::pidmap::tmpfs_bytes),
            )
        })
        .await
        .unwrap_or(((0, 0), 0, None, 0));
        let (upper_bytes, upper_recent) = upper_bytes;
        // A mode asked by name that this kernel cannot run is refused before connecting.
        crate::migration::modes::check_asked(opts)
            .await
            .map_err(|e| api(ErrorKind::Unavailable, chain(&e)))?;
        let userns = e.spec.userns.is_some();
        if let Some(why) = mig_runtime::container::rlimit_blocker(&procs, userns, criu.path())
            .or_else(|| mig_runtime::container::lock_blocker(&procs, criu.path()))
        {
            return Err(api(
                ErrorKind::Unavailable,
                format!("cannot move {}: {why}; nothing was frozen", e.spec.name),
            ));
        }
        let migration_id = migration_id.to_owned();
        let side = Src(Arc::new(SourceSide {
            agent: self.clone(),
            id: id.to_owned(),
            name: e.spec.name.clone(),
            cgroup: e.state.cgroup.clone(),
            migration_id: migration_id.clone(),
            peer: peer.name.clone(),
            work: cd.dir.join("migration"),
            frozen_pids: Default::default(),
            tcp_established,
            net: e.spec.net.clone(),
            started: t0,
            upper_sync: Default::default(),
            peer_version: Default::default(),
            pages: Default::default(),
            precopy: Default::default(),
            progress_bytes: AtomicU64::new(0),
            smaps: Default::default(),
            log_sync: Default::default(),
            downtime_bound: Default::default(),
            stdio_pipe: Default::default(),
        }));
        let conn = transport::connect(&net.endpoint, &net.identity, peer)
            .await
            .map_err(|e| {
                let msg = format!("cannot reach {}: {}", peer.name, chain(&e));
                side.done("rolled_back", None, Some(msg.clone()));
                api(ErrorKind::Unavailable, msg)
            })?;
        fault::track(&conn);
        // Hellos, then (a 1.2 destination) the link probe, then the pre-flight: the mode in
        // Prepare comes from a prediction that used this connection's measured throughput.
        let hello = crate::migration::hello(self);
        let link = transport::open_source(&conn, &hello).await.map_err(|e| {
            let msg = format!("migration to {} failed to start: {}", peer.name, chain(&e));
            side.done("rolled_back", None, Some(msg.clone()));
            conn.close(0u32.into(), b"done");
            api(ErrorKind::Unavailable, msg)
        })?;
        let _ = side.peer_version.set(link.peer.protocol_version);
        // Both must speak 1.2 (`MIG_WIRE_VERSION` may make this agent announce less).
        let minor = (hello.protocol_version.minor).min(link.peer.protocol_version.minor);
        // A 1.4 destination takes stream mode's memory presync (unless this agent or the move
        // turned it off).
        let presync = minor >= memsync::MEMORY_PRESYNC_MINOR && memsync::enabled();
        // While the link is probed: how much of its memory the container rewrites, for the
        // presync's estimate (a move that may go in stream mode).
        let may_stream = matches!(
            opts.mode,
            None | Some(
                crate::migration::modes::MoveMode::Stream | crate::migration::modes::MoveMode::Auto
            )
        );
        let sampling = (presync && may_stream && !opts.no_memory_presync).then(|| {
            let pids = procs.clone();
            tokio::task::spawn_blocking(move || {
                mig_migrate::memsync::reader::sample_rewrites(
                    &pids,
                    crate::migration::modes::DIRTY_SAMPLE_PAGES,
                    Duration::from_millis(crate::migration::modes::DIRTY_WINDOW_MS),
                )
            })
        });
        let basis = crate::migration::probe::link_throughput(&conn, &peer.name, minor).await;
        let dirty = match sampling {
            Some(s) => s.await.ok().flatten().map(|(changed, sampled)| {
                crate::migration::modes::DirtySample {
                    changed,
                    sampled,
                    window_ms: crate::migration::modes::DIRTY_WINDOW_MS,
                }
            }),
            None => None,
        };
        tracing::debug!(id = %id, ?dirty, "the memory's rewrites sampled");
        // The fixed costs this agent measured on its earlier moves to the peer, else defaults.
        let fixed = crate::migration::fixedcost::known(&peer.name);
        let memory = crate::migration::modes::dumped_memory(&usage, mapped, tmpfs);
        // Deleted files still open or mapped are copied into the checkpoint and cross while
        // frozen in every mode, as shared memory does (QA of session 19: 300 MiB of them made a
        // lazy move take 2658 ms, predicted 1031).
        let memory = (memory.0 + ghost_bytes, memory.1 + ghost_bytes);
        // Whether a stream destination will restore every page before the resume: processes
        // that share memory copy-on-write (each one's memory summed is above what the cgroup
        // holds; the destination decides on the pagemaps, from 4 MiB of overlap), or a
        // user-namespace container that cannot use userfaultfd (this host's setting).
        let restored_plain = mapped.is_some_and(|m| m.anon_bytes > usage.anon_bytes + (4 << 20))
            || (userns && !crate::migration::modes::userns_may_use_uffd());
        let plan = match crate::migration::modes::plan(
            opts,
            memory,
            (upper_bytes, Some(upper_recent)),
            tasks,
            basis,
            (presync, restored_plain, dirty),
            fixed,
        )
        .await
        {
            Ok(plan) => plan,
            Err(e) => {
                // Nothing was frozen or announced: the destination sees the connection end
                // before any message.
                conn.close(0u32.into(), b"pre-flight refused the move");
                return Err(api(ErrorKind::Unavailable, chain(&e)));
            }
        };
        if let Err(e) = crate::migration::modes::check_container(plan.mode, userns) {
            conn.close(0u32.into(), b"pre-flight refused the move");
            return Err(api(ErrorKind::Unavailable, chain(&e)));
        }
        if let (Some(max_ms), Some(m)) = (opts.max_downtime_ms, mapped) {
            let _ = side
                .downtime_bound
                .set(crate::migration::source::DowntimeBound {
                    max_ms,
                    plan,
                    anon_bytes: m.anon_bytes,
                });
        }
        tracing::info!(
            %id,
            mode = plan.mode.as_str(),
            predicted_downtime_ms = plan.predicted_ms,
            throughput_mib_s = plan.throughput >> 20,
            throughput_source = plan.basis.source.as_str(),
            fixed_ms = plan.fixed.ms,
            fixed_source = plan.fixed.source.as_str(),
            memory_mib = memory.0 >> 20,
            always_frozen_mib = memory.1 >> 20,
            ghost_mib = ghost_bytes >> 20,
            "pre-flight"
        );
        if plan.mode == crate::migration::modes::MoveMode::Precopy {
            // A 1.2 destination keeps the rounds and links them for the restore; an older one
            // would not: refused before anything is frozen or announced.
            if minor < 2 {
                conn.close(0u32.into(), b"pre-flight refused the move");
                let e = crate::migration::modes::ModeError::PrecopyPeerTooOld {
                    peer: peer.name.clone(),
                    version: format!(
                        "{}.{}",
                        link.peer.protocol_version.major, link.peer.protocol_version.minor
                    ),
                };
                return Err(api(ErrorKind::Unavailable, chain(&e)));
            }
            side.precopy.start(crate::migration::precopy::StopRule::new(
                crate::migration::modes::Preflight {
                    memory_bytes: memory.0,
                    shared_bytes: memory.1,
                    upper_bytes,
                    upper_recent_bytes: Some(upper_recent),
                    processes: tasks.0,
                    threads: tasks.1,
                    mappings: tasks.2,
                    throughput: plan.throughput,
                    memory_presync: false,
                    restored_plain: false,
                    fixed: Default::default(),
                    dirty: None,
                },
                opts.max_downtime_ms,
            ));
        }
        let prepare = Prepare {
            migration_id: migration_id.clone(),
            spec: e.spec.clone(),
            image: image.clone(),
            criu_version,
            kernel: mig_migrate::criu::kernel_release(),
            // Pre-copy sends the memory once in round 1 and again what later rounds find dirty:
            // room for twice the memory.
            // Post-copy's private memory never lands on the destination's disk.
            bytes_estimate: match plan.mode {
                crate::migration::modes::MoveMode::Lazy => memory.1,
                _ if side.precopy.active() => 2 * memory.0,
                _ => memory.0,
            } + 2 * upper_bytes
                + image.size,
            mode: plan.mode.wire(),
        };
        let _ = side.pages.mode.set(plan.mode);
        side.pages
            .presync
            .off
            .store(opts.no_memory_presync, Ordering::Relaxed);
        tracing::info!(%id, migration = %migration_id, peer = %peer.name, "moving");
        let _ = side.pages.conn.set(conn.clone());
        // The destination's lazy-pages daemon reaches our post-copy dump through here.
        let lazy_tunnel = (plan.mode == crate::migration::modes::MoveMode::Lazy).then(|| {
            tokio::spawn(transport::tunnel::serve(
                conn.clone(),
                crate::migration::pages::resolve,
            ))
        });
        if lazy_tunnel.is_some() {
            crate::migration::postcopy::mark_source(self, id, Some(&migration_id));
        }
        let machine = SourceMachine::new(prepare, Timeouts::default());
        // A `mig move --resolve` of this move waits until the move's own machine is done.
        let held = crate::migration::recover::hold(&migration_id).await;
        let report = transport::run_source_on(&conn, link, machine, &side).await;
        if lazy_tunnel.is_some() && report.as_ref().is_ok_and(|r| r.in_doubt) {
            // Frozen again before the lazy dump is ended with this move's side: it would let
            // the copy run while the move is in doubt (review of session 31, M1).
            let (cgroup, cid) = (side.cgroup.clone(), id.to_owned());
            let _ = tokio::task::spawn_blocking(move || {
                crate::migration::postcopy::keep_source_frozen(&cgroup, &cid)
            })
            .await;
        }
        drop(held);
        // Before this side's own close: whether the destination went away during the move.
        let lost = conn.close_reason();
        conn.close(0u32.into(), b"done");
        // Whether the lazy tunnel's bytes were counted: without them the move's result does
        // not compare them with the lazy pages (review of session 32, M2).
        let mut tunnel_counted = false;
        if let Some(task) = lazy_tunnel {
            // The pages served after the resume (the dump served them all before destroy).
            if let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_secs(5), task).await {
                side.pages
                    .tunnel_bytes
                    .store(bytes.get(), Ordering::Relaxed);
                tunnel_counted = true;
            }
        }
        let report = report.map_err(|e| {
            let msg = format!("migration to {} failed to start: {}", peer.name, chain(&e));
            side.done("rolled_back", None, Some(msg.clone()));
            api(ErrorKind::Unavailable, msg)
        })?;
        // Committed, but the post-copy ended before the destination had every page: the copy
        // here is kept frozen, in doubt ([`Src::destroy`](super::host::Src)), until the
        // destination says whether its copy is gone.
        let cut = match (&report.outcome, report.in_doubt) {
            (Some(Outcome::Committed { .. }), false) => side.pages.postcopy_failure(),
            _ => None,
        };
        if let Some(why) = cut {
            side.done("in_doubt", Some(&report), Some(why.clone()));
            // CRIU's log says why the dump ended (review of session 31, L3).
            super::rollback::keep_dump_log(&side.work);
            let _ = std::fs::remove_dir_all(&side.work);
            // An older destination answers `Committed` for the copy it killed: not asked
            // automatically, so that the operator sees first (docs/protocol.md, 1.8).
            let asks = if side.peer_speaks(super::POSTCOPY_CUT_MINOR) {
                crate::migration::recover::spawn_resolver(self.clone(), id.to_owned());
                format!(
                    "this agent asks every 5 s; `mig move --resolve {}` asks now",
                    e.spec.name
                )
            } else {
                format!("it is not asked by itself: {} speaks a protocol older than 1.8, which answers committed for a copy it killed, and this copy would then be removed; upgrade {0} before `mig move --resolve {}` settles the move", peer.name, e.spec.name)
            };
            return Err(api(
                ErrorKind::Conflict,
                format!(
                    "the post-copy of {name} to {peer} ended before the last page ({why}): the copy there cannot run unless it got every page after all, and {peer}'s answer says which; the frozen copy here is whole and kept, in doubt, and runs here again once {peer} says its copy is gone ({asks}); {name} then goes on from the moment it was frozen, and what it did on {peer} meanwhile is lost",
                    name = e.spec.name,
                    peer = peer.name
                ),
            ));
        }
        match (&report.outcome, report.in_doubt) {
            (_, true) => side.done("in_doubt", Some(&report), None),
            (Some(Outcome::Committed { cleanup_error }), _) => {
                side.done("committed", Some(&report), cleanup_error.clone())
            }
            (Some(Outcome::RolledBack { detail, .. }), _) => {
                side.done("rolled_back", Some(&report), Some(detail.clone()))
            }
            (None, _) => side.done("rolled_back", Some(&report), None),
        }
        let _ = std::fs::remove_dir_all(&side.work);
        if !report.in_doubt {
            crate::migration::postcopy::mark_source(self, id, None);
        }
        if report.in_doubt {
            crate::migration::recover::spawn_resolver(self.clone(), id.to_owned());
            return Err(api(
                ErrorKind::Conflict,
                format!(
                    "migration {migration_id} is in doubt: {} did not confirm the commit (the link was lost, or its agent stopped); the container stays frozen here until it is settled (this agent asks {0} every 5 s; `mig move --resolve {1}` asks now; if {0} is gone for good, `mig move --resolve {1} --decide rolled-back` runs it here)",
                    peer.name, e.spec.name
                ),
            ));
        }
        match report.outcome {
            Some(Outcome::Committed { cleanup_error }) => {
                let t = report.timings;
                tracing::info!(%id, downtime_ms = ms(t.downtime), total_ms = ms(t0.elapsed()), "moved");
                let page_bytes = side
                    .pages
                    .tunnel_bytes
                    .load(std::sync::atomic::Ordering::Relaxed);
                let postcopy = side
                    .pages
                    .postcopy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                match plan.mode {
                    crate::migration::modes::MoveMode::Stream => {
                        crate::migration::modes::record_throughput(
                            &peer.name,
                            page_bytes,
                            ms(t.dump),
                        )
                    }
                    _ => crate::migration::modes::record_throughput(
                        &peer.name,
                        report.bytes_sent,
                        ms(t.transfer),
                    ),
                }
                // What this move's fixed costs were, for the next pre-flight to this peer.
                // The writable layer's delta grows with what changed (a long log read again):
                // not a fixed cost (QA of session 24).
                let delta_ms = side.upper_sync.delta_ms.load(Ordering::Relaxed);
                let learned = crate::migration::fixedcost::record(
                    &peer.name,
                    plan.mode,
                    ms(t.downtime).saturating_sub(delta_ms),
                    plan.variable_ms,
                );
                tracing::info!(
                    %id,
                    downtime_ms = ms(t.downtime),
                    model_ms = plan.variable_ms,
                    ?learned,
                    "fixed costs measured"
                );
                Ok(MoveResult {
                    id: id.to_owned(),
                    name: e.spec.name.clone(),
                    migration_id,
                    peer: peer.name.clone(),
                    mode: plan.mode.as_str().into(),
                    downtime_ms: ms(t.downtime),
                    total_ms: ms(t0.elapsed()),
                    presync_ms: ms(t.presync),
                    freeze_ms: ms(t.freeze),
                    dump_ms: ms(t.dump),
                    transfer_ms: ms(t.transfer),
                    restore_ms: ms(t.restore),
                    bytes_sent: side.bytes_moved(report.bytes_sent),
                    files_sent: report.files_sent,
                    pid_map_before: {
                        let frozen = side.frozen_pids.lock().unwrap_or_else(|p| p.into_inner());
                        if frozen.is_empty() {
                            pid_map_before
                        } else {
                            frozen.clone()
                        }
                    },
                    pid_map: report.dest_pid_map,
                    cleanup_error,
                    predicted_downtime_ms: Some(plan.predicted_ms),
                    throughput_bytes_s: Some(plan.throughput),
                    throughput_source: Some(plan.basis.source.as_str().into()),
                    probe: plan.basis.probe,
                    fixed_cost: Some(plan.fixed),
                    page_bytes,
                    presync_upper_bytes: side.upper_sync.presync_bytes.load(Ordering::Relaxed),
                    presync_log_bytes: side.log_sync.head.get().copied().unwrap_or(0),
                    delta_log_bytes: side.log_sync.delta_bytes.load(Ordering::Relaxed),
                    delta_bytes: side.upper_sync.delta_bytes.load(Ordering::Relaxed),
                    postcopy_ms: postcopy.as_ref().map(|p| ms(p.0)),
                    postcopy_error: postcopy.and_then(|p| p.1),
                    lazy_bytes: side
                        .pages
                        .lazy_bytes
                        .get()
                        .copied()
                        .filter(|_| tunnel_counted),
                    criu_dump_ms: Some(side.pages.criu_dump_ms.load(Ordering::Relaxed)),
                    seal_ms: Some(side.pages.seal_ms.load(Ordering::Relaxed)),
                    precopy: side.precopy.report(),
                    memory_presync: side.pages.presync.report(),
                })
            }
            Some(Outcome::RolledBack {
                cause,
                detail,
                rollback_error,
            }) => {
                crate::migration::recover::spawn_notifier(
                    self.clone(),
                    side.entry(JournalState::RolledBack),
                );
                let detail = kept_log_named(&side.work, detail);
                // Gone, or killed and not reaped yet (QA: an init the OOM killer ended during
                // the presync was still a zombie here).
                let ended = match self.init_pid_of(id) {
                    None => true,
                    Some(pid) => crate::layout::proc_ended(pid),
                };
                if ended {
                    // It exited or was killed while it moved: it does not run anywhere, and
                    // the rollback's thaw may have failed only because its cgroup was gone.
                    return Err(api(
                        ErrorKind::Conflict,
                        format!(
                            "{} ended during its move to {} (its init is gone), so nothing was moved and it runs nowhere; `mig ps -a` shows how it ended (the move stopped at: {}: {detail})",
                            e.spec.name,
                            peer.name,
                            cause_words(&cause)
                        ),
                    ));
                }
                // `rollback_error` is set only when thawing the copy here failed.
                let here = match rollback_error {
                    None => "the container keeps running here".to_owned(),
                    Some(r) => format!(
                        "the container stays here but the rollback failed ({r}): it may still be frozen"
                    ),
                };
                // A dump or send that failed because the destination went away (its agent
                // restarted, the link went down) says so first: CRIU's page-server errors name
                // only their own side (QA: "the checkpoint (criu dump) failed").
                let lost = match (&cause, &lost) {
                    (
                        mig_migrate::protocol::Cause::Local(
                            mig_migrate::wire::AbortReason::DumpFailed
                            | mig_migrate::wire::AbortReason::SendFailed,
                        ),
                        Some(why),
                    ) => format!(
                        "the connection to {} was lost during it ({why}), and ",
                        peer.name
                    ),
                    _ => String::new(),
                };
                let msg = format!(
                    "migration to {} rolled back ({lost}{}): {detail}; {here}",
                    peer.name,
                    cause_words(&cause)
                );
                Err(api(rolled_back_kind(&cause), msg))
            }
            None => Err(api(
                ErrorKind::Internal,
                format!("migration {migration_id} ended without an outcome"),
            )),
        }
    }

    /// Marks a running, idle container busy (moving).
    fn claim_running(&self, id: &str) -> Result<(), ApiError> {
        let mut map = self.lock();
        let e = map
            .get_mut(id)
            .ok_or_else(|| api(ErrorKind::NotFound, format!("no such container: {id}")))?;
        if !idle_running(id, e) {
            let e = e.clone();
            drop(map);
            return Err(self.not_idle_running(id, &e));
        }
        e.busy = true;
        Ok(())
    }

    /// Why container `id` (entry `e`) cannot be moved now: busy, not running, or being stopped.
    fn not_idle_running(&self, id: &str, e: &crate::daemon::Entry) -> ApiError {
        if Agent::not_dumpable(id, e) {
            return self.busy_error(id, e);
        }
        if e.state.state != ContainerState::Running {
            return api(
                ErrorKind::Conflict,
                format!(
                    "container {} is {}, not running",
                    e.spec.name,
                    e.state.state.as_str()
                ),
            );
        }
        api(
            ErrorKind::Conflict,
            format!("container {} is being stopped (mig stop)", e.spec.name),
        )
    }

    /// The init's PID when the container runs and the PID still belongs to it.
    pub(crate) fn init_pid_of(&self, id: &str) -> Option<i32> {
        crate::layout::live_shim_of(&self.dirs.container(id), id).map(|s| s.init_pid)
    }

    pub(crate) fn set_busy(&self, id: &str, busy: bool) {
        if let Some(e) = self.lock().get_mut(id) {
            e.busy = busy;
        }
    }
}
