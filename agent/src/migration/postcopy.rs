//! Post-copy's safety on the destination: the container must never run on memory that is
//! missing. [`PostcopyGuard`] stops it when the source's pages end first; the lazy-pages daemon
//! holds its own socket's other end, so this agent's death leaves the container waiting, not
//! reading zero pages; [`recover_postcopy`] settles, at startup, a post-copy the agent was
//! carrying when it stopped.

use crate::daemon::events::EventKind;
use crate::daemon::Agent;
use mig_runtime::pidfd::PidFd;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the guard waits for a container's cgroup to be frozen before it kills it instead.
const GUARD_FREEZE: Duration = Duration::from_secs(2);

/// Destination, post-copy: when the source's page stream ends (the source's agent or its
/// dump died, the link went) before the lazy-pages daemon closed its session, the daemon
/// cannot fetch the missing pages; if it exited, closing the restored tasks' userfaultfds, the
/// kernel would map zero pages where their memory was missing and the container would run on
/// with wrong memory. The guard freezes the container's cgroup, from the tunnel
/// ([`Tunnel::socketpair_guarded`](mig_migrate::transport::tunnel::Tunnel::socketpair_guarded)),
/// then ends the daemon (which holds its socket's other end and would otherwise wait);
/// [`watch_lazy_daemon`](super::pages::watch_lazy_daemon) then kills the container (the daemon
/// failed) or thaws it (the daemon had every page: the stream ended in the moment after it
/// closed its session).
#[derive(Debug)]
pub(crate) struct PostcopyGuard {
    cgroup: String,
    state: Mutex<GuardState>,
}

#[derive(Debug, Default)]
struct GuardState {
    daemon_ended: bool,
    frozen: bool,
    /// The daemon, once started: it holds the other end of its page socket itself (see
    /// [`LazyPagesOpts::hold`]), so it waits rather than fails when the stream ends; the
    /// guard ends it once the container is stopped.
    daemon: Option<PidFd>,
}

/// How long the guard leaves the daemon, after stopping the container, to end by itself (it
/// may have had every page in the moment the stream ended) before it kills it.
const DAEMON_GRACE: Duration = Duration::from_millis(500);

/// `SIGKILL` through the daemon's pidfd; a process already gone is not an error.
fn kill_daemon(pidfd: &PidFd) {
    if let Err(e) = pidfd.kill() {
        tracing::warn!(error = %e, "cannot kill the lazy-pages daemon");
    }
}

impl PostcopyGuard {
    pub(crate) fn new(cgroup: String) -> PostcopyGuard {
        PostcopyGuard {
            cgroup,
            state: Mutex::new(GuardState::default()),
        }
    }

    /// The daemon runs: the guard ends it after stopping the container. A daemon that starts
    /// after the source's side ended is ended at once (the container is not restored yet).
    pub(crate) fn daemon_started(&self, pid: u32) {
        // Our child, not reaped yet: the number is its own.
        let pidfd = match PidFd::open(pid as i32) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(pid, error = %e, "no pidfd for the lazy-pages daemon");
                return;
            }
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.frozen {
            kill_daemon(&pidfd);
        }
        st.daemon = Some(pidfd);
    }

    /// The source's side ended first: stop the container (blocking, at most [`GUARD_FREEZE`]),
    /// then end the daemon (it would wait for pages forever) unless it ends by itself within
    /// [`DAEMON_GRACE`].
    pub(crate) fn source_ended(self: &Arc<Self>) {
        self.stop_container();
        let guard = self.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            loop {
                let st = guard.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.daemon_ended {
                    return;
                }
                if start.elapsed() >= DAEMON_GRACE {
                    if let Some(pidfd) = &st.daemon {
                        tracing::warn!(cgroup = %guard.cgroup, "post-copy: the lazy-pages daemon cannot get the missing pages; it is ended");
                        kill_daemon(pidfd);
                    }
                    return;
                }
                drop(st);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }

    fn stop_container(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.daemon_ended || st.frozen {
            return;
        }
        let Ok(cg) = mig_runtime::cgroup::Cgroup::open(&self.cgroup) else {
            // No container yet (restore not started): nothing runs on missing memory.
            st.frozen = true;
            return;
        };
        st.frozen = true;
        match cg.freeze(GUARD_FREEZE) {
            Ok(()) => {
                tracing::warn!(cgroup = %self.cgroup, "post-copy: the source's pages ended before the lazy-pages daemon closed its session; the container is frozen until the daemon says whether it has every page")
            }
            Err(e) => {
                // It must not run on zero pages: kill it rather than wait.
                tracing::error!(cgroup = %self.cgroup, error = %super::chain(&e), "post-copy: the source's pages ended and the container could not be frozen; it is killed");
                let _ = cg.kill();
                let _ = cg.thaw();
            }
        }
    }

    /// Whether the source's pages ended before the daemon did (the guard stopped the container
    /// and ends the daemon, if it has not ended by itself).
    pub(crate) fn fired(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).frozen
    }

    /// The daemon ended: whether the guard froze the container.
    pub(crate) fn daemon_ended(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.daemon_ended = true;
        st.frozen
    }
}

/// Containers that run while a lazy-pages daemon still fills in their memory: after a post-copy
/// or a stream move's lazy restore, from the resume until the daemon has every page.
static FILLING: crate::daemon::marks::Marks = crate::daemon::marks::Marks::new();

/// Marks container `id` as running before all its memory arrived, or clears the mark.
pub(crate) fn mark_filling(id: &str, on: bool) {
    FILLING.set(id, on);
}

/// How many containers here run while their memory still arrives: a stopping agent waits for
/// them as for moves under way (QA of session 31, M1: it stopped in the middle of a post-copy,
/// whose copy then could not get the rest of its memory).
pub(crate) fn filling_count() -> usize {
    FILLING.distinct().len()
}

/// Whether container `id` runs while its memory still arrives. A checkpoint or a move then
/// would dump the pages not there yet as missing, and its copy would run on zeros (QA, session
/// 19: a move right after a move, and a `checkpoint --export`, lost a third of a 300 MiB
/// workload's memory and said nothing): both are refused until the daemon is done.
pub(crate) fn memory_arriving(id: &str) -> bool {
    FILLING.contains(id)
}

/// `<container>/lazy-pages/postcopy.json`: a lazy-pages daemon fills in a container's memory on
/// this host, and its PID. `local`: a stream move's daemon, serving pages already on this host;
/// else a post-copy's, fetching them from the source. Removed with its directory when the
/// daemon ends ([`watch_lazy_daemon`](super::pages::watch_lazy_daemon)); found at startup, it
/// means this agent stopped while the daemon ran ([`recover_postcopy`]).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PostcopyMarker {
    pub migration_id: String,
    pub daemon_pid: u32,
    #[serde(default)]
    pub local: bool,
}

const POSTCOPY_MARKER: &str = "postcopy.json";

/// In a daemon's directory once it ended with every page: the copy is whole, whatever its
/// guard left frozen ([`recover_postcopy`] thaws it).
pub(crate) const COMPLETE: &str = "complete";

/// Whether container `id`'s copy here is migration `migration_id`'s post-copy, whose memory
/// comes from its source: the marker of a daemon that fetches it there, in the daemon's
/// directory (not ended with every page) or set aside by a restart of this agent that found
/// the daemon gone (review 3 of session 29, H1). Without the source such a copy cannot run.
pub(crate) fn fetches_from_source(agent: &Agent, id: &str, migration_id: &str) -> bool {
    let dir = agent.dirs.container(id).dir;
    [super::pages::LAZY_DIR, LAZY_DIR_FAILED].iter().any(|d| {
        crate::layout::read_record::<PostcopyMarker>(&dir.join(d).join(POSTCOPY_MARKER))
            .is_ok_and(|m| !m.local && m.migration_id == migration_id)
    })
}

/// In a source's container directory while its post-copy move is under way or in doubt: the
/// migration's id. The copy on the destination cannot run without this host's memory, so an
/// operator's `--decide committed` here would leave no copy that can run (QA of session 30,
/// F3: it was accepted, exited 0, and removed the only copy that could).
const SOURCE_MARK: &str = "postcopy-source";

/// Marks container `id` as the source of post-copy `migration_id` (`None`: clears the mark).
pub(crate) fn mark_source(agent: &Agent, id: &str, migration_id: Option<&str>) {
    let path = agent.dirs.container(id).dir.join(SOURCE_MARK);
    let _ = match migration_id {
        Some(m) => std::fs::write(path, m),
        None => std::fs::remove_file(path),
    };
}

/// Freezes the cgroup of a post-copy's source copy that must stay as it was frozen (the move is
/// in doubt, or its post-copy was cut short). CRIU thaws the cgroup once it holds the tasks
/// itself, and freezes it again only when its dump ends cleanly: a lazy dump that is killed, or
/// dies, lets them run (review of session 31, M1). Blocking (up to 5 s).
pub(crate) fn keep_source_frozen(cgroup: &str, id: &str) {
    let frozen = mig_runtime::cgroup::Cgroup::open(cgroup)
        .and_then(|cg| cg.freeze(std::time::Duration::from_secs(5)));
    if let Err(e) = frozen {
        tracing::error!(id = %id, cgroup = %cgroup, error = %e, "cannot freeze the post-copy's source copy again: it may run while its move is in doubt");
    }
}

/// Whether container `id` here is the source of post-copy `migration_id` ([`mark_source`]).
pub(crate) fn serves_postcopy(agent: &Agent, id: &str, migration_id: &str) -> bool {
    std::fs::read_to_string(agent.dirs.container(id).dir.join(SOURCE_MARK))
        .is_ok_and(|m| m.trim() == migration_id)
}

/// `<journal dir>/<migration>.postcopy-failed`, on a destination: the post-copy's copy here was
/// killed because its memory stopped arriving (the source's agent, its dump or the link went).
/// Its source, which never removes its frozen copy before the last page was served, keeps that
/// copy whole and frozen and asks; it is told `RolledBack` and runs it again
/// ([`settle_failed`]). Kept beside the journal, not in the container's directory: an operator's
/// `mig rm` of the dead copy must not turn the answer into `Committed` (QA of session 30, F1
/// and F2: the source was told committed and removed the only copy left).
fn failed_path(agent: &Agent, migration_id: &str) -> std::path::PathBuf {
    super::journal::dir(&agent.cfg.state_dir).join(format!("{migration_id}.postcopy-failed"))
}

/// Records that post-copy `migration_id`'s copy here is killed for its missing memory.
pub(crate) fn record_failed(agent: &Agent, migration_id: &str) {
    if !super::journal::valid_id(migration_id) {
        return;
    }
    let path = failed_path(agent, migration_id);
    // When: a copy an operator started again after it is not removed ([`settle_failed`]).
    let now = super::journal::now().0.to_string();
    if let Err(e) = mig_runtime::fsutil::atomic_write(&path, now.as_bytes()) {
        tracing::error!(migration = %migration_id, path = %path.display(), error = %e, "cannot record the failed post-copy: a source asking about it is told committed");
    }
}

/// Whether post-copy `migration_id`'s copy here was killed for its missing memory
/// ([`record_failed`]).
pub(crate) fn failed(agent: &Agent, migration_id: &str) -> bool {
    super::journal::valid_id(migration_id) && failed_path(agent, migration_id).exists()
}

/// A Resolve from the source of post-copy `e` (a destination's `Committed` entry) whose copy
/// here was killed when its memory stopped arriving ([`failed`]): the move is rolled back here
/// (what is left of the dead copy removed, the journal `RolledBack`) and the source, which still
/// holds its whole frozen copy, runs it again. The container goes on from the moment it was
/// frozen there: what it did here before it was stopped is lost, which is less than all of it.
/// A copy an operator started again here since is left running, and the answer is `Committed`.
pub(crate) async fn settle_failed(
    agent: &Arc<Agent>,
    e: &super::journal::JournalEntry,
) -> mig_migrate::protocol::JournalState {
    use mig_migrate::protocol::JournalState;
    let id = &e.container_id;
    // Started again since the failure: its init lives, and began after it. Not the container's
    // listed state, which lags a kill by up to the shim's poll (review of session 31, H1: a
    // copy being killed was taken for one started again, and the source removed its own).
    let failed_at = std::fs::read_to_string(failed_path(agent, &e.migration_id))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let started = agent.entry(id).ok().and_then(|c| c.state.started);
    let again = matches!((started, failed_at), (Some(s), Some(f)) if s > f);
    if again && agent.init_pid_of(id).is_some() {
        tracing::warn!(migration = %e.migration_id, container = %id, "the post-copy's copy here failed but an operator started it again since: answering committed");
        return JournalState::Committed;
    }
    // Killed and removed as a source removes its copy after a commit.
    let state = match super::source::destroy_copy(agent, id, &agent.cgroup_name(id)).await {
        Ok(()) => JournalState::RolledBack,
        Err(err) => JournalState::RollbackFailed {
            detail: super::chain(&err),
        },
    };
    tracing::warn!(migration = %e.migration_id, container = %id, peer = %e.peer, ?state, "the post-copy's copy here died for its missing memory: the move is rolled back, and its source runs its own copy again");
    if super::recover::settle(agent, e, state.clone()) {
        // The journal answers from now on.
        let _ = std::fs::remove_file(failed_path(agent, &e.migration_id));
    }
    state
}

/// Where a daemon's directory goes when the daemon was lost: its log stays for whoever
/// investigates, and nothing takes the directory for a live daemon's any more.
const LAZY_DIR_FAILED: &str = "lazy-pages.failed";

impl PostcopyMarker {
    /// Writes the marker into the daemon's work directory `work`.
    pub(crate) fn write(&self, work: &Path) -> std::io::Result<()> {
        crate::layout::write_record(&work.join(POSTCOPY_MARKER), self)
    }
}

/// A pidfd of the lazy-pages daemon working in `work`, if process `pid` still is that daemon
/// (a PID found in a file may have been reused by another process). Checked after the pidfd is
/// open, so the pidfd is the daemon's.
fn daemon_of(pid: u32, work: &Path) -> Option<PidFd> {
    let pidfd = PidFd::open(i32::try_from(pid).ok()?).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    (args.contains(&&b"lazy-pages"[..]) && args.contains(&work.as_os_str().as_encoded_bytes()))
        .then_some(pidfd)
}

/// At startup, before the journal's recovery, for every daemon this agent started that was
/// still filling in a container's memory when the agent stopped:
/// - a post-copy's cannot go on (its pages came over this agent's connection, which died with
///   it); its daemon, still waiting for them, shows it: the container is killed first (its
///   missing memory must not be read as zero pages), then the daemon, and the container's
///   `reason` and a `migration_done` event (outcome `postcopy_failed`) say why;
/// - a stream move's local daemon needs nothing of this agent and goes on: the container stays
///   marked as receiving its memory ([`memory_arriving`]: no move or checkpoint) until it ends.
///
/// A marker whose daemon is gone is a daemon that ended while the agent was stopped, with
/// every page or not (nothing tells): the container is left as it is, the daemon's log kept.
pub(crate) fn recover_postcopy(agent: &Arc<Agent>) {
    let Ok(dirs) = std::fs::read_dir(agent.dirs.containers()) else {
        return;
    };
    for d in dirs.flatten() {
        let id = d.file_name().to_string_lossy().into_owned();
        let work = d.path().join(super::pages::LAZY_DIR);
        let Ok(marker) = crate::layout::read_record::<PostcopyMarker>(&work.join(POSTCOPY_MARKER))
        else {
            continue;
        };
        let Some(daemon) = daemon_of(marker.daemon_pid, &work) else {
            if work.join(COMPLETE).exists() {
                // Every page arrived; the agent stopped before the watch's last steps.
                if let Ok(cg) = mig_runtime::cgroup::Cgroup::open(&agent.cgroup_name(&id)) {
                    let _ = cg.thaw();
                }
                let _ = std::fs::remove_dir_all(&work);
                continue;
            }
            set_aside(&d.path());
            // A post-copy's copy that never ran (it still carries its migration's marker)
            // and whose daemon is gone (the guard ended it when the source's pages stopped)
            // has lost the way to its missing memory: resumed, it would run on zero pages
            // (review 3 of session 29, H1). It is killed like one whose daemon still runs,
            // and the move's recovery rolls the move back (its copy is gone).
            // The same for a copy that ran and is now dead (its host rebooted, or its shim
            // died) or stopped (the guard froze it before this agent died): its memory cannot
            // arrive either, and its source, asking, must hear that it rolled back (review of
            // session 31, H2: it was told `Committed`, and removed the whole copy).
            let stopped =
                agent.init_pid_of(&id).is_none() || agent.cgroup_frozen(&agent.cgroup_name(&id));
            if !marker.local
                && (stopped || super::dest::marked_by(agent, &id, &marker.migration_id))
            {
                record_failed(agent, &marker.migration_id);
                kill_copy(agent, &id);
                report_lost(agent, &id, &marker.migration_id);
            } else {
                tracing::warn!(id = %id, migration = %marker.migration_id, "a lazy-pages daemon ended while this agent was stopped; the container is left as it is (its log: {LAZY_DIR_FAILED}/)");
            }
            continue;
        };
        if marker.local {
            tracing::info!(id = %id, migration = %marker.migration_id, "a stream move's lazy-pages daemon still fills in the container's memory: no move or checkpoint until it ends");
            mark_filling(&id, true);
            let images = d.path().join("checkpoint");
            std::thread::spawn(move || {
                let _ = daemon.wait_exit(None);
                let _ = std::fs::remove_dir_all(&work);
                mark_filling(&id, false);
                crate::daemon::checkpoint::spend_pages(&images, &id);
            });
            continue;
        }
        record_failed(agent, &marker.migration_id);
        kill_copy(agent, &id);
        kill_daemon(&daemon);
        set_aside(&d.path());
        report_lost(agent, &id, &marker.migration_id);
    }
}

/// Kills container `id`'s processes (its cgroup, thawed so that they die).
fn kill_copy(agent: &Agent, id: &str) {
    if let Ok(cg) = mig_runtime::cgroup::Cgroup::open(&agent.cgroup_name(id)) {
        let _ = cg.kill();
        let _ = cg.thaw();
    }
}

/// Moves a lost daemon's directory aside ([`LAZY_DIR_FAILED`], replacing an older one).
fn set_aside(container_dir: &Path) {
    let failed = container_dir.join(LAZY_DIR_FAILED);
    let _ = std::fs::remove_dir_all(&failed);
    let _ = std::fs::rename(container_dir.join(super::pages::LAZY_DIR), &failed);
}

/// Records why container `id` was killed after its post-copy `migration_id` was cut by this
/// agent's stop: its `reason` and a `migration_done` event.
fn report_lost(agent: &Agent, id: &str, migration_id: &str) {
    let peer = super::journal::list(&agent.cfg.state_dir)
        .ok()
        .and_then(|all| all.into_iter().find(|e| e.migration_id == migration_id))
        .map(|e| e.peer)
        .unwrap_or_default();
    let detail = format!(
        "post-copy failed (this host's agent stopped while pages were still coming from {peer}; the rest of the container's memory cannot arrive)"
    );
    tracing::error!(id = %id, migration = %migration_id, "{detail}: the container is killed");
    let name = match agent.lock().get_mut(id) {
        Some(e) => {
            e.state.reason = Some(detail.clone());
            e.spec.name.clone()
        }
        None => return,
    };
    agent.emit(EventKind::MigrationDone {
        migration_id: migration_id.to_owned(),
        container_id: id.to_owned(),
        container_name: name,
        role: "destination".into(),
        peer,
        outcome: "postcopy_failed".into(),
        total_ms: 0,
        downtime_ms: None,
        bytes: 0,
        error: Some(detail),
    });
}
