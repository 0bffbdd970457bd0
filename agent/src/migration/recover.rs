//! Recovery at start and `mig move --resolve`.
//!
//! At start every unfinished journal entry is settled the way the protocol machines' `recover`
//! would: a source that never froze thaws its container (it keeps running here), one that froze
//! but never sent Commit does too once its destination says it does not hold the container
//! beyond this move ([`back`]); a source that recorded Committed destroys its frozen copy
//! again; a destination that never recorded Restored removes what it received; a destination
//! that recorded Committed makes sure its container runs. The in-doubt states (source `CommitSent`
//! or `InDoubt`, destination `Restored` or `InDoubt`) keep their frozen copy and wait: the source
//! agent's `mig move --resolve` asks the destination over a new connection and applies its
//! answer (the destination answers from its own journal).

use super::dest;
use super::journal::{self, JournalEntry};
use super::source::{destroy_copy, SourceSide, Src};
use super::{chain, MoveResult};
use crate::api::{ApiError, ContainerState, Decision, ErrorKind};
use crate::daemon::Agent;
use mig_migrate::protocol::{JournalState, Outcome, Role, SourceMachine, Timeouts};
use mig_migrate::transport;
use mig_migrate::wire::Resolution;
use mig_runtime::cgroup::Cgroup;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

mod back;
pub use back::settle_sources;
pub(crate) use back::{waiting, waiting_count};

/// The per-migration locks of this agent (see [`hold`]).
type Locks = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

fn locks() -> &'static Locks {
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    LOCKS.get_or_init(Default::default)
}

/// Holds migration `id` on this agent: one protocol machine (a move, a Resolve on another
/// connection, a recovery at start) acts on a migration's copy and journal at a time. Without
/// it a Resolve could answer from a journal entry that a rollback still in progress is about to
/// change (answering `Committed` while that rollback removes the copy), or two resolutions
/// could destroy the same copy at once. Released when the guard is dropped.
pub(crate) async fn hold(id: &str) -> OwnedMutexGuard<()> {
    let lock = {
        let mut map = locks().lock().unwrap_or_else(|p| p.into_inner());
        // Forget the locks nobody holds or waits for.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(id.to_owned()).or_default().clone()
    };
    lock.lock_owned().await
}

/// [`hold`], giving up after `limit` (`None`: another machine still acts on the migration).
pub(crate) async fn hold_within(id: &str, limit: Duration) -> Option<OwnedMutexGuard<()>> {
    tokio::time::timeout(limit, hold(id)).await.ok()
}

/// How long a resolution waits for another resolution of the same migration on this agent.
pub(crate) const HOLD_LIMIT: Duration = Duration::from_secs(20);

/// How long the destination lets a Resolve wait for the machine still acting on the migration
/// (a rollback, or a machine waiting for Commit until the link is found lost): longer than the
/// source waits for the answer (`Timeouts::control`), so the source sees a timeout and asks
/// again (its notifier stops at the first answer, even "undecided").
pub(crate) const DEST_HOLD_LIMIT: Duration = Duration::from_secs(45);

/// Journals `e` as `state` now; whether that was written (a failure is logged).
pub(crate) fn settle(agent: &Agent, e: &JournalEntry, state: JournalState) -> bool {
    let mut e = e.clone();
    e.state = state;
    e.touch();
    match journal::write(&agent.cfg.state_dir, &e) {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(migration = %e.migration_id, error = %chain(&err), "cannot update the journal");
            false
        }
    }
}

/// Resumes this (destination) host's copy of the committed move `e`, which the link or the agent
/// left before it ran. A copy that is gone (its supervisor or init died while it waited, frozen)
/// never ran, so the move did not commit here after all: it is rolled back here instead (what is
/// left of the copy removed, the journal `RolledBack`), and its source runs its own copy rather
/// than removing it too (review of session 29, M-A: the journal kept `Committed`, and once the
/// dead copy was removed a returning source was told committed and removed the only copy left).
/// The state the entry ends in.
pub(crate) async fn resume_committed(
    agent: &Arc<Agent>,
    e: &JournalEntry,
) -> Result<JournalState, dest::DestError> {
    // A post-copy's copy that never ran has lost its missing memory with the agent's restart
    // (its lazy-pages daemon, the connection its pages came through; `recover_postcopy` killed
    // it, and its supervisor may not have noticed yet): it counts as gone. Resumed, it died, and
    // the source, told `Committed`, removed the only copy (session 30: `dest-commit:kill` on a
    // lazy move).
    let resumed = if super::postcopy::fetches_from_source(agent, &e.container_id, &e.migration_id) {
        Err(dest::DestError::CopyGone)
    } else {
        dest::resume_incoming(agent, &e.migration_id, &e.container_id)
    };
    match resumed {
        Ok(()) => Ok(JournalState::Committed),
        Err(dest::DestError::CopyGone) => {
            tracing::error!(migration = %e.migration_id, container = %e.container_id, peer = %e.peer, "the committed copy here is gone and never ran: the move is rolled back here, and its source runs its own copy");
            let state = match dest::cleanup_incoming(agent, &e.migration_id, &e.container_id).await
            {
                Ok(()) => JournalState::RolledBack,
                Err(err) => JournalState::RollbackFailed {
                    detail: chain(&err),
                },
            };
            settle(agent, e, state.clone());
            Ok(state)
        }
        Err(err) => Err(err),
    }
}

/// Settles every unfinished migration found in the journal (see the module documentation).
pub(crate) fn recover(agent: &Arc<Agent>) {
    // Before this run's rollbacks below add notices of their own.
    renew_notices(agent);
    dest::remove_left_over_staging(&agent.cfg.state_dir);
    let entries = match journal::list(&agent.cfg.state_dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot read the migration journal");
            return;
        }
    };
    let unfinished: Vec<JournalEntry> = entries
        .iter()
        .filter(|e| !journal::is_final(&e.state) || commit_unfinished(agent, e, &entries))
        .cloned()
        .collect();
    for e in unfinished {
        let (id, mig) = (e.container_id.clone(), e.migration_id.clone());
        tracing::warn!(migration = %mig, container = %id, role = ?e.role, state = ?e.state, "recovering an unfinished migration");
        if e.role == Role::Source && super::postcopy::serves_postcopy(agent, &id, &mig) {
            // Its lazy dump died with this agent, and CRIU had thawed the cgroup while it held
            // the tasks: frozen again until settled (review of session 31, M1).
            super::postcopy::keep_source_frozen(&e.cgroup, &id);
        }
        match (e.role, &e.state) {
            (Role::Source, JournalState::Frozen | JournalState::Restored)
                if agent.migration.net().is_some() =>
            {
                // The destination may have restored a copy, and its operator may have decided
                // the move committed there while this agent was down (`--decide committed`):
                // asked first ([`settle_sources`], before the agent serves, and again while it
                // cannot be asked), so that this copy is not thawed beside that one (QA of
                // session 26: two running copies once the source came back). Still frozen
                // until then.
                back::ASK_FIRST
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(e);
            }
            (
                Role::Source,
                JournalState::Preparing | JournalState::Frozen | JournalState::Restored,
            ) => roll_back_source(agent, &e),
            // A post-copy this agent was still serving when it stopped: the destination's copy
            // lost the rest of its memory with this agent and is stopped there, unless it had
            // every page. Asked like a move in doubt: this whole copy runs here again once the
            // destination says its copy is gone (QA of session 30, F2: it was removed at once,
            // and the container was lost).
            (Role::Source, JournalState::Committed)
                if super::postcopy::serves_postcopy(agent, &id, &mig) =>
            {
                agent.set_busy(&id, true);
                settle(agent, &e, JournalState::InDoubt);
                tracing::warn!(migration = %mig, container = %id, "this agent stopped while it served a post-copy: the frozen copy here is kept until its destination says whether its copy has every page");
                spawn_resolver(agent.clone(), id.clone());
            }
            (Role::Source, JournalState::Committed) => end_committed_copy(agent, e),
            (Role::Dest, JournalState::Committed) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let _held = hold(&e.migration_id).await;
                    if let Err(err) = resume_committed(&agent, &e).await {
                        tracing::error!(error = %chain(&err), "cannot resume the arrived container");
                    }
                });
            }
            (Role::Dest, JournalState::Restored | JournalState::InDoubt)
            | (Role::Source, JournalState::CommitSent | JournalState::InDoubt) => {
                // In doubt: keep the frozen copy, refuse other operations until resolved.
                agent.set_busy(&id, true);
                settle(agent, &e, JournalState::InDoubt);
                tracing::warn!(migration = %mig, container = %id, "migration in doubt: the container stays frozen until resolved");
                if e.role == Role::Source {
                    spawn_resolver(agent.clone(), id.clone());
                }
            }
            (Role::Dest, _) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let _held = hold(&e.migration_id).await;
                    match dest::cleanup_incoming(&agent, &e.migration_id, &e.container_id).await {
                        Ok(()) => settle(&agent, &e, JournalState::RolledBack),
                        Err(err) => settle(
                            &agent,
                            &e,
                            JournalState::RollbackFailed {
                                detail: chain(&err),
                            },
                        ),
                    }
                });
            }
            (Role::Source, _) => {}
        }
    }
}

/// Whether a `Committed` entry's last step may not have happened (the agent died between
/// journaling `Committed` and finishing): a destination whose container still carries this
/// migration's marker was not resumed yet; a source that still has the move's work directory, with
/// no later migration of the container journaled, did not destroy its copy yet.
fn commit_unfinished(agent: &Agent, e: &JournalEntry, all: &[JournalEntry]) -> bool {
    if e.state != JournalState::Committed {
        return false;
    }
    let cd = agent.dirs.container(&e.container_id);
    match e.role {
        Role::Dest => dest::marked_by(agent, &e.container_id, &e.migration_id),
        Role::Source => {
            cd.dir.join("migration").is_dir()
                && !all
                    .iter()
                    .any(|o| o.container_id == e.container_id && o.stamp() > e.stamp())
        }
    }
}

/// How often an in-doubt move is retried with its destination.
const RESOLVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest pause between two tries of a rolled-back source to tell its destination.
const NOTIFY_MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// A source host that does nothing: a rolled-back machine only sends Resolve and reads the answer.
struct Notifier;

impl transport::SourceHost for Notifier {
    async fn presync_files(
        &self,
        _: &[String],
    ) -> Result<Vec<transport::OutgoingFile>, transport::HostError> {
        Ok(Vec::new())
    }
    async fn freeze(&self) -> Result<(), transport::HostError> {
        Ok(())
    }
    async fn dump(&self) -> Result<Vec<transport::OutgoingFile>, transport::HostError> {
        Ok(Vec::new())
    }
    async fn thaw(&self) -> Result<(), transport::HostError> {
        Ok(())
    }
    async fn destroy(&self) -> Result<(), transport::HostError> {
        Ok(())
    }
    async fn journal(
        &self,
        _: &mig_migrate::protocol::JournalRecord,
    ) -> Result<(), transport::HostError> {
        Ok(())
    }
}

/// Ends this (source) host's copy of a move that committed: busy and marked until removed, so
/// that it is listed `frozen` (stage `committed`), never `running`, while the destination runs
/// it; removed in the background, the migration held meanwhile.
fn end_committed_copy(agent: &Arc<Agent>, e: JournalEntry) {
    let agent = agent.clone();
    agent.set_busy(&e.container_id, true);
    super::source::mark_frozen(&e.container_id, true);
    let ending = super::source::hold_ending(&e.container_id);
    tokio::spawn(async move {
        let _ending = ending;
        let _held = hold(&e.migration_id).await;
        match destroy_copy(&agent, &e.container_id, &e.cgroup).await {
            Ok(()) => tracing::info!(migration = %e.migration_id, "source copy removed"),
            Err(err) => tracing::error!(error = %chain(&err), "cannot remove the source copy"),
        }
    });
}

/// A source's move that ended before Commit while this agent was down: its copy runs here again
/// (thawed) and the destination is told to remove any copy it restored.
fn roll_back_source(agent: &Arc<Agent>, e: &JournalEntry) {
    let id = e.container_id.clone();
    let thawed = Cgroup::open(&e.cgroup).and_then(|cg| cg.thaw());
    let _ = std::fs::remove_dir_all(agent.dirs.container(&id).dir.join("migration"));
    agent.set_busy(&id, false);
    if e.state != JournalState::Preparing {
        // The destination may hold a restored copy, in doubt: release it.
        spawn_notifier(agent.clone(), e.clone());
    }
    let state = match thawed {
        Ok(()) => JournalState::RolledBack,
        Err(err) if agent.entry(&id).is_err() => {
            tracing::warn!(error = %chain(&err), "the container is gone");
            JournalState::RolledBack
        }
        Err(err) => JournalState::RollbackFailed {
            detail: chain(&err),
        },
    };
    settle(agent, e, state);
}

/// Tells the destination of the rolled-back move `e` (the source side) that it was rolled back,
/// so that it removes a restored copy it keeps frozen in doubt. Until it has answered, the notice
/// is kept on disk (`<journal dir>/<migration>.notify`) and a restarted agent tries again
/// ([`renew_notices`]): before session 21 it was in memory and ended after 2 minutes, and a
/// longer partition or a restart of the source left the destination's copy frozen for good (QA).
/// Retried every 5 s, then less often, up to once a minute, until the destination answers or is
/// no longer a pinned peer.
pub(crate) fn spawn_notifier(agent: Arc<Agent>, e: JournalEntry) {
    let notice = notice_path(&agent.cfg.state_dir, &e.migration_id);
    if let Err(err) = std::fs::write(&notice, b"") {
        tracing::warn!(path = %notice.display(), error = %err, "cannot keep the rollback notice on disk: it is sent from memory only");
    }
    tokio::spawn(async move {
        let mut pause = RESOLVE_INTERVAL;
        loop {
            match notify_rolled_back(&agent, &e).await {
                Ok(()) => {
                    tracing::info!(migration = %e.migration_id, peer = %e.peer, "told the destination the move was rolled back");
                    break;
                }
                Err(Notify::Unpinned) => {
                    tracing::warn!(migration = %e.migration_id, peer = %e.peer, "the destination of a rolled-back move is no longer a pinned peer: not telling it");
                    break;
                }
                Err(Notify::Failed(err)) => {
                    tracing::debug!(migration = %e.migration_id, error = %err, "cannot tell the destination yet")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(NOTIFY_MAX_INTERVAL);
        }
        let _ = std::fs::remove_file(&notice);
    });
}

/// At the agent's start: the rollback notices a stopped agent had not delivered.
fn renew_notices(agent: &Arc<Agent>) {
    let dir = journal::dir(&agent.cfg.state_dir);
    for ent in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(NOTICE_SUFFIX) else {
            continue;
        };
        match journal::read(&agent.cfg.state_dir, id) {
            Some(e) if e.role == Role::Source => {
                tracing::info!(migration = %id, peer = %e.peer, "telling the destination again that the move was rolled back");
                // After a pause: what the answer may reveal (a `migration_conflict` event) was
                // sent before any client could subscribe to the agent just started (QA of
                // session 28, F1).
                let agent = agent.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RESOLVE_INTERVAL).await;
                    spawn_notifier(agent, e);
                });
            }
            _ => {
                let _ = std::fs::remove_file(ent.path());
            }
        }
    }
}

const NOTICE_SUFFIX: &str = ".notify";

fn notice_path(state_dir: &std::path::Path, migration_id: &str) -> std::path::PathBuf {
    journal::dir(state_dir).join(format!("{migration_id}{NOTICE_SUFFIX}"))
}

/// Why a rollback notice did not reach the destination.
enum Notify {
    /// The peer is no longer pinned: it will never be reached.
    Unpinned,
    Failed(String),
}

async fn notify_rolled_back(agent: &Arc<Agent>, e: &JournalEntry) -> Result<(), Notify> {
    let answer = send_notice(agent, e).await?;
    // The machine logged it; made visible where operators and rebalancers look, while the copy
    // here still runs (review of session 28, L2: a mark for a copy gone since would stick to
    // the container's next arrival).
    if answer == Resolution::Committed && agent.entry(&e.container_id).is_ok() {
        // Only an operator's decision here (`--decide rolled-back` while the destination was
        // away, having committed) gets this far: said loudly.
        tracing::error!(migration = %e.migration_id, peer = %e.peer, "the destination committed this migration, which was rolled back here: the container runs on both hosts; remove one of the copies");
        also_runs_on_peer(&e.container_id, Some(&e.peer));
        agent.emit(crate::daemon::events::EventKind::MigrationConflict {
            migration_id: e.migration_id.clone(),
            container_id: e.container_id.clone(),
            container_name: e.container_name.clone(),
            peer: e.peer.clone(),
        });
        watch_conflict(agent.clone(), e.container_id.clone(), e.peer.clone());
    }
    Ok(())
}

/// Tells the destination of move `e` that the move was rolled back here (a Resolve with the
/// source's view `RolledBack`): a destination in doubt removes its copy; one that settled the
/// move says how. Its answer, or why there was none.
async fn send_notice(agent: &Arc<Agent>, e: &JournalEntry) -> Result<Resolution, Notify> {
    let net = agent
        .migration
        .net()
        .ok_or_else(|| Notify::Failed("the migration endpoint is not running".into()))?;
    let peer = net
        .peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&e.peer)
        .cloned()
        .ok_or(Notify::Unpinned)?;
    let conn = transport::connect(&net.endpoint, &net.identity, &peer)
        .await
        .map_err(|err| Notify::Failed(chain(&err)))?;
    let machine = SourceMachine::recover(
        &e.migration_id,
        &JournalState::RolledBack,
        Timeouts::default(),
    );
    let report = transport::run_source(&conn, machine, &Notifier, &super::hello(agent)).await;
    conn.close(0u32.into(), b"done");
    let report = report.map_err(|err| Notify::Failed(chain(&err)))?;
    report
        .notice_answer
        .ok_or_else(|| Notify::Failed("the destination did not answer".into()))
}

/// How often a container marked as also running on a peer is asked about there.
const CONFLICT_RECHECK: Duration = Duration::from_secs(5);
/// The longest wait between two rounds while a pinned peer cannot be asked (down for good, or
/// not unpinned): the waits double up to it.
const CONFLICT_RECHECK_MAX: Duration = Duration::from_secs(300);

/// Asks `peer` every [`CONFLICT_RECHECK`] whether it still holds container `id` live, and
/// clears the mark once it does not (its copy was removed there: review of session 28, M1) or
/// once the copy here is gone. A copy moved on from there is followed to the pinned peer where
/// it runs. While a peer cannot be asked (down, or older than protocol 1.7 for `peer`) the mark
/// stays and the waits double up to [`CONFLICT_RECHECK_MAX`]; another peer older than 1.7,
/// which cannot say, does not hold the mark (review 3 of session 29, L1).
fn watch_conflict(agent: Arc<Agent>, id: String, peer: String) {
    tokio::spawn(async move {
        let mut wait = CONFLICT_RECHECK;
        let longer = |w: Duration| (w * 2).min(CONFLICT_RECHECK_MAX);
        loop {
            tokio::time::sleep(wait).await;
            if also_runs_on(&id).as_deref() != Some(peer.as_str()) {
                return;
            }
            // Within a few seconds, the connection included (`locate::ASK_LIMIT`).
            let there = agent.ask_peer_about(&peer, &id).await;
            if !matches!(there, Ok(transport::Located::NotHeld)) {
                wait = match there {
                    Ok(transport::Located::Held(_)) => CONFLICT_RECHECK,
                    _ => longer(wait),
                };
                continue;
            }
            // It may have moved it on: the mark follows it to the pinned peer that runs it
            // now (QA of session 29: "it runs here only" while it ran on a third host).
            let answers = agent.ask_peers_about(&id).await;
            if let Some((other, _)) = answers.held.iter().find(|(_, s)| s == "running") {
                tracing::warn!(container = %id, %peer, %other, "the peer no longer runs the container, but another one does: it runs there and here");
                also_runs_on_peer(&id, Some(other));
                watch_conflict(agent, id, other.clone());
                return;
            }
            // A peer that holds it live but not running (frozen in a move, restoring) may yet
            // run it: the mark stays (review of session 30, L1).
            if !answers.unasked.is_empty() || !answers.held.is_empty() {
                wait = longer(wait);
                continue;
            }
            tracing::info!(container = %id, %peer, too_old = ?answers.too_old, "no pinned peer runs the container any more: it runs here only");
            also_runs_on_peer(&id, None);
            return;
        }
    });
}

/// Moves a source settled as committed because a pinned peer other than their destination ran
/// the container (`back::held_elsewhere`): migration id -> that peer, so that what is said of
/// them names where the container ran, not the destination (review 3 of session 29, L2). Kept in
/// memory: after a restart only the log line says it.
static FOUND_ON: std::sync::Mutex<BTreeMap<String, String>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Records that migration `migration_id`'s container was found running on `peer`.
pub(crate) fn found_running_on(migration_id: &str, peer: &str) {
    FOUND_ON
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(migration_id.to_owned(), peer.to_owned());
}

/// Where [`found_running_on`] found migration `migration_id`'s container.
fn found_on(migration_id: &str) -> Option<String> {
    FOUND_ON
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(migration_id)
        .cloned()
}

/// Containers running here that also run on a peer (container id -> peer): a move rolled back
/// here and committed there (by an operator's decision on either side, or this source's own
/// rollback after its destination could not be asked: `back::ASK_PATIENCE`); QA of session 27,
/// F5: only the source's log said so. Kept in memory: after a restart only the log line says it.
static BOTH_RUN: std::sync::Mutex<BTreeMap<String, String>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Records (`Some(peer)`) or forgets (`None`: the copy here ended or left, or the peer's did)
/// that container `id` also runs on a peer.
pub(crate) fn also_runs_on_peer(id: &str, peer: Option<&str>) {
    let mut map = BOTH_RUN.lock().unwrap_or_else(|p| p.into_inner());
    match peer {
        Some(p) => map.insert(id.to_owned(), p.to_owned()),
        None => map.remove(id),
    };
}

/// The peer container `id` also runs on, as [`also_runs_on_peer`] recorded it.
pub(crate) fn also_runs_on(id: &str) -> Option<String> {
    BOTH_RUN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .cloned()
}

/// Whether journal entry `e` is of container `container` (its id, a prefix of it, or its name).
fn names(e: &JournalEntry, container: &str) -> bool {
    e.container_id == container
        || e.container_name == container
        || (!container.is_empty() && e.container_id.starts_with(container))
}

/// The newest settled move of `container` here (of container `here`'s id when there is one).
fn newest_settled<'a>(
    entries: &'a [JournalEntry],
    container: &str,
    here: Option<(&str, bool)>,
) -> Option<&'a JournalEntry> {
    entries
        .iter()
        .filter(|e| journal::is_final(&e.state))
        .filter(|e| match here {
            Some((id, _)) => e.container_id == id,
            None => e.is_named(container),
        })
        .max_by_key(|e| e.stamp())
}

/// How the newest settled move of `container` here ended and where the container runs since,
/// for a `--resolve` that finds nothing left to settle (QA of session 27, F2: it said only that
/// there was no unfinished migration, which left the operator to guess the outcome). `here`:
/// the id of the container of that name or id on this host, when there is one (only its own
/// moves count then: review of session 28, M3); `now`: seconds since the epoch.
fn last_settled(
    entries: &[JournalEntry],
    container: &str,
    here: Option<(&str, bool)>,
    now: u64,
) -> Option<String> {
    let e = newest_settled(entries, container, here)?;
    let (way, ran) = match e.role {
        Role::Source => ("to", "away"),
        Role::Dest => ("from", "here"),
    };
    // Where it is now, as far as this host knows (QA of session 28, F3: a copy killed here
    // since, its post-copy failed, was said to run).
    let runs_here = match here {
        Some((_, true)) => "it runs here",
        Some((_, false)) => "it stayed here and has ended since (`mig ps -a`)",
        None => "it stayed here and is no longer here",
    };
    let outcome = match (&e.state, e.role) {
        (JournalState::Committed, Role::Source) => match found_on(&e.migration_id) {
            Some(other) => format!(
                "committed: it went to {}, which could not be asked, and ran on {other} when asked",
                e.peer
            ),
            None => format!("committed: it went to {}", e.peer),
        },
        (JournalState::Committed, Role::Dest) => format!("committed: {runs_here}"),
        (JournalState::RolledBack, Role::Source) => format!("rolled back: {runs_here}"),
        (JournalState::RolledBack, Role::Dest) => {
            format!("rolled back: it stayed on {}", e.peer)
        }
        (JournalState::RollbackFailed { detail }, _) => {
            format!("with a failed rollback ({detail}); `mig ps -a` and the agent's log say more")
        }
        _ => return None,
    };
    let ago = match now.saturating_sub(e.updated) {
        s @ 0..120 => format!("{s} s"),
        s @ 120..7200 => format!("{} min", s / 60),
        s @ 7200..172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    };
    Some(format!(
        "its last move {ran} ({}, {way} {}) was settled {ago} ago, {outcome}",
        e.migration_id, e.peer
    ))
}

/// Resolves an in-doubt move of `container` in the background: retries while the destination is
/// unreachable or still undecided, stops once it is settled (or an operator settled it).
pub(crate) fn spawn_resolver(agent: Arc<Agent>, container: String) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RESOLVE_INTERVAL).await;
            match agent.resolve_move(&container, None).await {
                Ok(r) => {
                    tracing::info!(container = %container, peer = %r.peer, "in-doubt move resolved: committed");
                    return;
                }
                Err(e)
                    if e.kind == ErrorKind::Unavailable || e.message.contains("still in doubt") =>
                {
                    tracing::debug!(container = %container, error = %e.message, "in-doubt move not resolved yet");
                }
                Err(e) => {
                    tracing::info!(container = %container, outcome = %e.message, "in-doubt move settled");
                    return;
                }
            }
        }
    });
}

impl Agent {
    /// `mig move --resolve ID --decide rolled-back` of a container frozen here with no journal
    /// entry to say why (one that could not be read: the copy of a move left in doubt): the
    /// operator decides it runs here, and it is thawed (QA of session 25, F6). Without that, no
    /// unfinished migration is the answer.
    fn thaw_unexplained(
        &self,
        container: &str,
        decide: Option<Decision>,
    ) -> Result<MoveResult, ApiError> {
        let none = || {
            ApiError::new(
                ErrorKind::NotFound,
                format!("no unfinished migration of {container} here"),
            )
        };
        let Ok(id) = self.resolve(container) else {
            return Err(none());
        };
        let e = self.entry(&id)?;
        let unexplained = e.state.state == ContainerState::Running
            && !e.busy
            && self.cgroup_frozen(&e.state.cgroup)
            && !super::source::frozen_for_move(&id);
        if !unexplained {
            return Err(none());
        }
        if decide != Some(Decision::RolledBack) {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "no unfinished migration of {container} here, but it is frozen and nothing here says why (a move's journal entry that could not be read?): once its copy on the other host is settled or gone, `mig move --resolve {container} --decide rolled-back` lets it run here"
                ),
            ));
        }
        Cgroup::open(&e.state.cgroup)
            .and_then(|cg| cg.thaw())
            .map_err(|err| ApiError::new(ErrorKind::Internal, chain(&err)))?;
        tracing::warn!(container = %id, "a frozen container with no journal entry thawed by the operator");
        Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "decided by the operator: {container} had no readable migration journal here and runs here again (thawed)"
            ),
        ))
    }

    /// `mig move --resolve ID`: settles an in-doubt move of container `ID` (id, prefix or name)
    /// with its destination. With `decide` (`--decide`), the operator's outcome is applied when
    /// the destination cannot answer, and on a destination at once ([`Agent::decide_here`]).
    pub(crate) async fn resolve_move(
        self: &Arc<Self>,
        container: &str,
        decide: Option<Decision>,
    ) -> Result<MoveResult, ApiError> {
        let entries = journal::list(&self.cfg.state_dir)
            .map_err(|e| ApiError::new(ErrorKind::Internal, chain(&e)))?;
        let found = entries
            .iter()
            .filter(|e| !journal::is_final(&e.state))
            .find(|e| names(e, container))
            .cloned();
        let Some(e) = found else {
            return self.thaw_unexplained(container, decide).map_err(|mut err| {
                if err.kind == ErrorKind::NotFound {
                    let id = self.resolve(container).ok();
                    let live = id
                        .as_deref()
                        .and_then(|id| self.entry(id).ok())
                        .is_some_and(|e| e.state.state.is_live());
                    let here = id.as_deref().map(|id| (id, live));
                    let now = journal::now().0;
                    // A post-copy cut short here: its copy died, and its source may run its own
                    // again (QA of session 31, L3: "committed" made the container look lost).
                    let cut = newest_settled(&entries, container, here).filter(|e| {
                            e.role == Role::Dest
                                && e.state == JournalState::Committed
                                && super::postcopy::failed(self, &e.migration_id)
                        });
                    let mut last = match cut {
                        Some(e) => Some(format!(
                            "its last move here ({}, from {}) was a post-copy cut short: the copy here was killed for its missing memory, and {1}, if it still holds its frozen copy, runs it again once it asks here",
                            e.migration_id, e.peer
                        )),
                        None => last_settled(&entries, container, here, now),
                    };
                    // A post-copy still under way is not over yet (QA of session 31, L3).
                    if let (Some(l), Some(id)) = (last.as_mut(), id.as_deref()) {
                        if super::postcopy::memory_arriving(id) {
                            l.push_str("; its memory is still arriving (post-copy)");
                        } else if super::source::ending(id) {
                            l.push_str("; the copy there still fetches its memory from here (post-copy)");
                        }
                    }
                    err.message = match (last, here) {
                        (Some(last), _) => format!("{}: {last}", err.message),
                        // QA of session 28, F4: the same words for a name nothing here knows.
                        (None, None) => format!(
                            "no container {container} here, and no migration of it on this host"
                        ),
                        (None, Some(_)) => {
                            format!("{}: it has not moved to or from this host", err.message)
                        }
                    };
                }
                err
            });
        };
        if e.role == Role::Dest {
            let Some(d) = decide else {
                if super::postcopy::fetches_from_source(self, &e.container_id, &e.migration_id) {
                    return Err(only_its_source(&e));
                }
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "migration {} arrived here from {}: resolve it on the source agent; if {} is gone for good, decide here: `mig move --resolve {} --decide rolled-back` removes this copy, `--decide committed` runs it (only if {} is gone for good: its agent, back from a restart, runs its own copy again when it cannot reach this host for {} s, and both copies would run)",
                        e.migration_id, e.peer, e.peer, e.container_name, e.peer, back::ASK_PATIENCE.as_secs()
                    ),
                ));
            };
            return self.decide_here(e, d, "").await;
        }
        // Stopped before its Commit while this agent was down, its destination not asked yet.
        if back::waiting(&e.migration_id) {
            return self.resolve_waiting(e, decide).await;
        }
        // One resolution at a time (an operator's `--resolve` and the automatic one): the
        // second reads what the first decided instead of destroying or thawing again.
        let (_held, e) = match self.hold_unsettled(e).await? {
            Held::Open(guard, e) => (guard, e),
            Held::Settled(r) => {
                return match decide {
                    Some(d) => not_applied(*r, d),
                    None => *r,
                }
            }
        };
        let net = self.migration.net().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unavailable,
                "the migration endpoint is not running",
            )
        })?;
        let pinned = net
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&e.peer)
            .cloned();
        let peer = match (pinned, decide) {
            (Some(p), _) => p,
            // Unpinned since (a host gone for good): nobody to ask.
            (None, Some(d)) => {
                drop(_held);
                let why = format!("{} is no longer a pinned peer", e.peer);
                return self.decide_here(e, d, &why).await;
            }
            // Still in doubt: the automatic resolver asks again (Unavailable) and settles it
            // once the peer is pinned again (QA of session 25: it stopped asking, logged the
            // move "settled", and the copy stayed frozen until an operator's `--resolve`).
            (None, None) => {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "migration {} is still in doubt: {} is no longer a pinned peer to ask; pin it again (`mig peers add`) and it is settled, or if it is gone for good decide here: `mig move --resolve {} --decide rolled-back` or `--decide committed`",
                        e.migration_id, e.peer, e.container_name
                    ),
                ))
            }
        };
        let conn = match transport::connect(&net.endpoint, &net.identity, &peer).await {
            Ok(c) => c,
            Err(err) => {
                let why = format!("cannot reach {}: {}", peer.name, chain(&err));
                return match decide {
                    Some(d) => {
                        drop(_held);
                        self.decide_here(e, d, &why).await
                    }
                    // What to do about it, too (QA of session 30, F5).
                    None => Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "{why}; the container stays frozen here, in doubt, and this agent keeps asking; if {} is gone for good, `mig move --resolve {} --decide rolled-back` runs it here",
                            peer.name, e.container_name
                        ),
                    )),
                };
            }
        };
        // A rollback brings the container's link up again before thawing it.
        let side = self.decided_side(&e);
        let machine = SourceMachine::recover(&e.migration_id, &e.state, Timeouts::default());
        let report = transport::run_source(&conn, machine, &side, &super::hello(self)).await;
        conn.close(0u32.into(), b"done");
        let report = match (report, decide) {
            // It answered, undecided: it has no copy it could run (no record of the move), so
            // committing would remove the only one.
            (Ok(r), Some(Decision::Committed)) if r.outcome.is_none() => {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} answered and has no copy of {} it could run: committing would remove the only one; `--decide rolled-back` runs it here",
                        e.peer, e.container_name
                    ),
                ))
            }
            (Ok(r), Some(d)) if r.outcome.is_none() => {
                drop(_held);
                let why = format!("{} could not decide", e.peer);
                return self.decide_here(e, d, &why).await;
            }
            (Ok(r), _) => r,
            (Err(err), Some(d)) => {
                drop(_held);
                let why = format!("resolve failed: {}", chain(&err));
                return self.decide_here(e, d, &why).await;
            }
            (Err(err), None) => {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("resolve failed: {}", chain(&err)),
                ))
            }
        };
        let settled = match &report.outcome {
            Some(Outcome::Committed { cleanup_error }) => {
                side.0
                    .done("committed", Some(&report), cleanup_error.clone());
                Ok(MoveResult {
                    total_ms: super::ms(report.timings.total),
                    cleanup_error: cleanup_error.clone(),
                    ..resolved_result(&e)
                })
            }
            // Rolled back, but the copy here had died meanwhile (its processes killed while
            // frozen in doubt): nothing runs anywhere, and that is said (QA of session 31, M2:
            // "the container runs here" while it had ended).
            Some(Outcome::RolledBack {
                rollback_error: Some(err),
                ..
            }) if self.init_pid_of(&e.container_id).is_none() => {
                let why = format!(
                    "lost: the move to {} was rolled back ({} has no copy that can run), but the frozen copy here had died while the move was in doubt ({err})",
                    e.peer, e.peer
                );
                self.release_lost(&e, &why);
                side.0.done("rolled_back", Some(&report), Some(why.clone()));
                Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!("resolved: {} is {why}", e.container_name),
                ))
            }
            Some(Outcome::RolledBack { detail, .. }) => {
                side.0
                    .done("rolled_back", Some(&report), Some(detail.clone()));
                Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "resolved: the move was rolled back, the container runs here ({detail})"
                    ),
                ))
            }
            None => {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                    "migration {} is still in doubt: {} could not decide yet; the copy here stays frozen, and this agent asks again every 5 s",
                    e.migration_id, e.peer
                ),
                ))
            }
        };
        self.settle_started_move(&e.migration_id, &settled);
        settled
    }
}

impl Agent {
    /// `mig move --resolve ID --decide OUTCOME` where the other host cannot answer (`why`; empty
    /// on a destination, which never asks): applies the operator's outcome to this host's copy
    /// and journal, as the protocol's operator input would. A rolled-back source also keeps
    /// telling its destination ([`spawn_notifier`]); nothing tells a destination that comes back
    /// after a committed decision, so the operator decides there too.
    async fn decide_here(
        self: &Arc<Self>,
        e: JournalEntry,
        decide: Decision,
        why: &str,
    ) -> Result<MoveResult, ApiError> {
        let (_held, e) = match self.hold_unsettled(e).await? {
            Held::Open(guard, e) => (guard, e),
            Held::Settled(r) => return not_applied(*r, decide),
        };
        let because = if why.is_empty() {
            String::new()
        } else {
            format!(" ({why})")
        };
        let internal = |what: &str, err: String| {
            ApiError::new(
                ErrorKind::Internal,
                format!("the operator's decision could not be applied: {what}: {err}; the move stays in doubt"),
            )
        };
        tracing::warn!(migration = %e.migration_id, container = %e.container_id, role = ?e.role, ?decide, why, "in-doubt move settled by the operator");
        let settled = match (e.role, decide) {
            (Role::Source, Decision::RolledBack) => {
                let side = self.decided_side(&e);
                match transport::SourceHost::thaw(&side).await {
                    Ok(()) => {}
                    // The copy here died while in doubt: nothing to run, and it is said
                    // (review 2 of session 31, M2: the decision failed for good).
                    Err(err) if self.init_pid_of(&e.container_id).is_none() => {
                        let why = format!(
                            "lost: the move to {} was rolled back by the operator{because}, but the frozen copy here had died while the move was in doubt ({})",
                            e.peer,
                            chain(err.as_ref())
                        );
                        settle(
                            self,
                            &e,
                            JournalState::RollbackFailed {
                                detail: why.clone(),
                            },
                        );
                        self.release_lost(&e, &why);
                        side.0.done("rolled_back", None, Some(why.clone()));
                        spawn_notifier(self.clone(), e.clone());
                        let settled = Err(ApiError::new(
                            ErrorKind::Conflict,
                            format!("decided by the operator: {} is {why}", e.container_name),
                        ));
                        self.settle_started_move(&e.migration_id, &settled);
                        return settled;
                    }
                    Err(err) => return Err(internal("thawing the container", chain(err.as_ref()))),
                }
                settle(self, &e, JournalState::RolledBack);
                // The move's second `migration_done`, as an automatic resolution's (QA of
                // session 31, L2).
                side.0.done(
                    "rolled_back",
                    None,
                    Some(format!("decided by the operator{because}")),
                );
                // The destination removes its copy once it hears of this.
                spawn_notifier(self.clone(), e.clone());
                Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "decided by the operator{because}: the move was rolled back, the container runs here; {} is told to remove its copy once it answers",
                        e.peer
                    ),
                ))
            }
            (Role::Source, Decision::Committed)
                if super::postcopy::serves_postcopy(self, &e.container_id, &e.migration_id) =>
            {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} went to {} by post-copy (migration {}): the copy there cannot run without this host's memory, so `--decide committed` would leave no copy that can run; nothing was done; `--decide rolled-back` runs it here, or wait for {1} to answer",
                        e.container_name, e.peer, e.migration_id
                    ),
                ));
            }
            (Role::Source, Decision::Committed) => {
                let side = self.decided_side(&e);
                transport::SourceHost::destroy(&side)
                    .await
                    .map_err(|err| internal("removing this host's copy", chain(err.as_ref())))?;
                settle(self, &e, JournalState::Committed);
                side.0.done(
                    "committed",
                    None,
                    Some(format!("decided by the operator{because}")),
                );
                Ok(resolved_result(&e))
            }
            // A post-copy's copy has most of its memory on the source: it cannot run without it
            // (QA of session 29, HIGH 1: it was resumed, killed at once for its missing pages,
            // and the source, back, took the move for committed and removed the only copy).
            (Role::Dest, Decision::Committed)
                if super::postcopy::fetches_from_source(self, &e.container_id, &e.migration_id) =>
            {
                Err(only_its_source(&e))
            }
            (Role::Dest, Decision::Committed) => {
                settle(self, &e, JournalState::Committed);
                let now = resume_committed(self, &e)
                    .await
                    .map_err(|err| internal("resuming this host's copy", chain(&err)))?;
                if now != JournalState::Committed {
                    let settled = Err(ApiError::new(
                        ErrorKind::Conflict,
                        format!(
                            "this host's copy of {} is gone (it died while in doubt, and never ran here): the move was rolled back here instead; {} runs its own copy once it is back",
                            e.container_name, e.peer
                        ),
                    ));
                    self.settle_started_move(&e.migration_id, &settled);
                    return settled;
                }
                // Its memory still arriving through a local lazy-pages daemon, if it has one:
                // watched to the last page as after a Commit (QA: the copy stayed "memory
                // arriving" and its daemon a zombie).
                super::pages::watch_lazy_daemon(
                    self.clone(),
                    e.migration_id.clone(),
                    e.container_id.clone(),
                    e.container_name.clone(),
                    e.peer.clone(),
                );
                Ok(MoveResult {
                    peer: self.cfg.name.clone(),
                    ..resolved_result(&e)
                })
            }
            (Role::Dest, Decision::RolledBack) => {
                dest::cleanup_incoming(self, &e.migration_id, &e.container_id)
                    .await
                    .map_err(|err| internal("removing this host's copy", chain(&err)))?;
                settle(self, &e, JournalState::RolledBack);
                Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "decided by the operator: the move was rolled back, this host's copy is removed (the container runs on {} if it is still there)",
                        e.peer
                    ),
                ))
            }
        };
        self.settle_started_move(&e.migration_id, &settled);
        settled
    }

    /// A source copy of move `e` that died while the move was in doubt: listed as it is (ended,
    /// with `why` as its reason), no longer busy or marked frozen, so that `rm` takes it (QA of
    /// session 31, M3: it stayed `frozen` and busy until the agent restarted).
    fn release_lost(&self, e: &JournalEntry, why: &str) {
        tracing::error!(migration = %e.migration_id, container = %e.container_id, "{why}");
        self.set_busy(&e.container_id, false);
        super::source::mark_frozen(&e.container_id, false);
        self.refresh(&e.container_id);
        if let Some(c) = self.lock().get_mut(&e.container_id) {
            c.state.reason = Some(why.to_owned());
        }
    }

    /// Holds migration `e` ([`hold_within`]) and reads its journal entry again: another
    /// resolution may have settled it meanwhile, and then says how.
    async fn hold_unsettled(&self, e: JournalEntry) -> Result<Held, ApiError> {
        let guard = hold_within(&e.migration_id, HOLD_LIMIT)
            .await
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Unavailable,
                    format!("migration {} is being resolved already", e.migration_id),
                )
            })?;
        Ok(match journal::read(&self.cfg.state_dir, &e.migration_id) {
            Some(now) if journal::is_final(&now.state) => {
                Held::Settled(Box::new(decided(&now, &self.cfg.name)))
            }
            Some(now) => Held::Open(guard, now),
            None => Held::Open(guard, e),
        })
    }

    /// The source's side of an in-doubt move, to settle it (with its destination's answer or the
    /// operator's decision).
    fn decided_side(self: &Arc<Self>, e: &JournalEntry) -> Src {
        Src(Arc::new(SourceSide {
            agent: self.clone(),
            id: e.container_id.clone(),
            name: e.container_name.clone(),
            cgroup: e.cgroup.clone(),
            migration_id: e.migration_id.clone(),
            peer: e.peer.clone(),
            work: self.dirs.container(&e.container_id).dir.join("migration"),
            frozen_pids: Default::default(),
            tcp_established: false,
            net: self
                .entry(&e.container_id)
                .ok()
                .and_then(|entry| entry.spec.net),
            started: std::time::Instant::now(),
            upper_sync: Default::default(),
            peer_version: Default::default(),
            pages: Default::default(),
            precopy: Default::default(),
            progress_bytes: Default::default(),
            smaps: Default::default(),
            log_sync: Default::default(),
            downtime_bound: Default::default(),
            stdio_pipe: Default::default(),
        }))
    }
}

/// A migration held for a resolution: still open (its entry as it is now), or settled already.
enum Held {
    Open(OwnedMutexGuard<()>, JournalEntry),
    Settled(Box<Result<MoveResult, ApiError>>),
}

/// What `mig move --resolve` reports for a committed move.
fn resolved_result(e: &JournalEntry) -> MoveResult {
    MoveResult {
        id: e.container_id.clone(),
        name: e.container_name.clone(),
        migration_id: e.migration_id.clone(),
        peer: found_on(&e.migration_id).unwrap_or_else(|| e.peer.clone()),
        // Not known here (the journal does not keep it); the figures are the resolution's.
        mode: String::new(),
        ..Default::default()
    }
}

/// Why only the source of post-copy `e` (a destination's entry) can settle it: the copy here
/// has most of its memory there.
fn only_its_source(e: &JournalEntry) -> ApiError {
    ApiError::new(
        ErrorKind::Conflict,
        format!(
            "{} came here from {} by post-copy (migration {}): most of its memory is still on {}, and this copy cannot run without it; once {} is back its agent settles the move (the container runs there); `mig move --resolve {} --decide rolled-back` removes this copy",
            e.container_name, e.peer, e.migration_id, e.peer, e.peer, e.container_name
        ),
    )
}

/// The answer of a resolution that found the move already settled (by another resolution, or
/// by the move itself), on host `here`: where the container runs is this host for a
/// destination's committed move and for a source's rolled-back one (QA of session 29: a
/// destination's said it ran on the source).
fn decided(e: &JournalEntry, here: &str) -> Result<MoveResult, ApiError> {
    match (&e.state, e.role) {
        (JournalState::Committed, Role::Source) => Ok(resolved_result(e)),
        (JournalState::Committed, Role::Dest) => Ok(MoveResult {
            peer: here.to_owned(),
            ..resolved_result(e)
        }),
        (JournalState::RollbackFailed { detail }, _) => Err(ApiError::new(
            ErrorKind::Internal,
            format!("resolved: the move was rolled back, but the rollback failed: {detail}"),
        )),
        (_, Role::Source) => Err(ApiError::new(
            ErrorKind::Conflict,
            "resolved: the move was rolled back, the container runs here",
        )),
        (_, Role::Dest) => Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "resolved: the move was rolled back, the container runs on {} (this host's copy is removed)",
                e.peer
            ),
        )),
    }
}

/// A decision that came after the move had settled the other way: not applied, and said so
/// (QA of session 29: `--decide rolled-back` on a move that had just committed exited 0).
pub(super) fn not_applied(
    settled: Result<MoveResult, ApiError>,
    decide: Decision,
) -> Result<MoveResult, ApiError> {
    match (settled, decide) {
        (Ok(r), Decision::RolledBack) => Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "migration {} had settled as committed before this decision: the container runs on {}; rolled-back was not applied",
                r.migration_id, r.peer
            ),
        )),
        (settled, _) => settled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_migration() {
        let id = journal::new_id();
        let first = hold(&id).await;
        let short = Duration::from_millis(50);
        assert!(hold_within(&id, short).await.is_none());
        // Another migration is independent.
        assert!(hold_within(&journal::new_id(), short).await.is_some());
        drop(first);
        assert!(hold_within(&id, short).await.is_some());
    }

    /// `--resolve` with nothing left to settle says how the container's last move here ended
    /// and where it runs (QA of session 27, F2).
    #[test]
    fn the_last_settled_move_is_told() {
        let now = 1_000_000;
        let entry = |id: &str, role, state, ago: u64| JournalEntry {
            migration_id: id.into(),
            role,
            state,
            container_id: "0123456789abcdef".into(),
            container_name: "web".into(),
            peer: "host-b".into(),
            cgroup: "mig/0123456789abcdef".into(),
            updated: now - ago,
            updated_ns: 0,
        };
        let old = entry("m1", Role::Source, JournalState::RolledBack, 9000);
        let new = entry("m2", Role::Source, JournalState::Committed, 30);
        let said = last_settled(&[old.clone(), new], "web", None, now).unwrap();
        assert_eq!(
            said,
            "its last move away (m2, to host-b) was settled 30 s ago, committed: it went to host-b"
        );
        let said = last_settled(std::slice::from_ref(&old), "0123", None, now).unwrap();
        assert!(
            said.contains("2 h ago, rolled back: it stayed here and is no longer here"),
            "{said}"
        );
        let here = Some(("0123456789abcdef", true));
        let said = last_settled(std::slice::from_ref(&old), "web", here, now).unwrap();
        assert!(said.ends_with("rolled back: it runs here"), "{said}");
        let ended = Some(("0123456789abcdef", false));
        let said = last_settled(std::slice::from_ref(&old), "web", ended, now).unwrap();
        assert!(
            said.ends_with("it stayed here and has ended since (`mig ps -a`)"),
            "{said}"
        );
        let dest = entry("m3", Role::Dest, JournalState::Committed, 0);
        assert_eq!(
            last_settled(&[dest], "web", here, now).unwrap(),
            "its last move here (m3, from host-b) was settled 0 s ago, committed: it runs here"
        );
        // Unsettled moves, other containers, and another container of the same name here
        // (the one moved away is not it) say nothing.
        let open = entry("m4", Role::Source, JournalState::InDoubt, 0);
        assert_eq!(last_settled(&[open], "web", None, now), None);
        assert_eq!(
            last_settled(std::slice::from_ref(&old), "db", None, now),
            None
        );
        assert_eq!(
            last_settled(&[old], "web", Some(("fedcba9876543210", true)), now),
            None
        );
    }
}
