//! A source agent back from a restart that found a move of its own stopped before any Commit
//! (journal `Frozen` or `Restored`): the destination may hold a restored copy, and its operator
//! may have decided the move committed there while this agent was down (`--decide committed`).
//! So the destination is asked first whether it holds the container beyond this move (the
//! `Locate` question of protocol 1.7) and, when it holds no copy, whether it committed the move
//! all the same (a Resolve that changes nothing there), before this frozen copy is thawed.
//!
//! The first ask takes at most [`ASK_FIRST_LIMIT`], before the agent serves requests. A
//! destination that cannot be asked then (its agent restarting too after both hosts lost power,
//! a slow link) is not taken for gone: the copy stays frozen and busy and is asked about again
//! every [`ASK_AGAIN`], in the background, while the agent serves; it is thawed (the move
//! rolled back, the destination told) only when the destination answers that it does not hold
//! the container beyond this move, or when it could not be asked for [`ASK_PATIENCE`] (review
//! of session 26, F4: it was thawed after the first 2 s, and a destination decided `committed`
//! then ran a second copy). `mig move --resolve` asks at once ([`Agent::resolve_waiting`]).

use super::{end_committed_copy, not_applied, resolved_result, roll_back_source, settle, Held};
use crate::api::{ApiError, Decision, ErrorKind};
use crate::daemon::Agent;
use crate::migration::journal::{self, JournalEntry};
use crate::migration::MoveResult;
use mig_migrate::protocol::JournalState;
use mig_migrate::transport::Located;
use mig_migrate::wire::DestView;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sources' moves found at `Frozen` or `Restored` by [`super::recover`], for [`settle_sources`].
pub(super) static ASK_FIRST: Mutex<Vec<JournalEntry>> = Mutex::new(Vec::new());

/// How long a restarted source asks its destination before it starts serving (all its moves at
/// once).
const ASK_FIRST_LIMIT: Duration = Duration::from_secs(2);

/// How long a restarted source keeps its copy frozen while its destination cannot be asked
/// (counted from the first ask), before it takes the destination for gone and thaws the copy.
pub(crate) const ASK_PATIENCE: Duration = Duration::from_secs(60);

/// The pause between two asks while the destination cannot be asked.
const ASK_AGAIN: Duration = Duration::from_secs(3);

/// How long one later ask may take, the connection included.
const ASK_LIMIT: Duration = Duration::from_secs(3);

/// The moves whose copy waits for its destination's answer: migration id -> when it is thawed
/// if the destination still cannot be asked.
static WAITING: Mutex<BTreeMap<String, Instant>> = Mutex::new(BTreeMap::new());

fn waiting_map() -> std::sync::MutexGuard<'static, BTreeMap<String, Instant>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether migration `id`'s copy here waits for its destination's answer.
pub(crate) fn waiting(id: &str) -> bool {
    waiting_map().contains_key(id)
}

/// How many moves' copies wait for their destination's answer (not moves under way: a stopping
/// agent leaves them frozen, and asks again at its next start).
pub(crate) fn waiting_count() -> usize {
    waiting_map().len()
}

/// Settles the moves the journal's recovery found stopped before any Commit on this (source)
/// host: each destination is asked, all at once and for at most 2 s, whether it holds the
/// container beyond this move (decided committed there by its operator, moved on since, or
/// committed and ended since: [`ask`]); if so this copy is removed, if it answers otherwise
/// the copy is thawed and the destination told to remove its own, and if it cannot be asked
/// the copy stays frozen while it is asked again in the background, for at most a minute. Run
/// by migd after [`crate::migration::start`] and before it serves requests.
pub async fn settle_sources(agent: &Arc<Agent>) {
    let entries = std::mem::take(&mut *ASK_FIRST.lock().unwrap_or_else(|p| p.into_inner()));
    let asks = entries.into_iter().map(|e| {
        let agent = agent.clone();
        async move {
            match ask(&agent, &e, ASK_FIRST_LIMIT).await {
                Ok(answer) => {
                    settle_with(&agent, e, answer);
                }
                Err(Unanswered { why, .. }) => wait_for_destination(agent, e, why),
            }
        }
    });
    futures::future::join_all(asks).await;
}

/// How move `e` stands on its destination, for the copy frozen here.
#[derive(Debug)]
enum There {
    /// The destination holds the container beyond this move (decided committed there, moved
    /// on), or committed the move and its copy has ended since: the copy here goes.
    Beyond(String),
    /// It holds no copy and did not commit the move, or holds only this move's copy (arriving,
    /// in doubt: it is told to remove it): the copy here runs again.
    Not(String),
}

/// Why [`ask`] has no answer.
#[derive(Debug)]
struct Unanswered {
    why: String,
    /// The destination answered that it holds no copy (Locate); only whether it committed the
    /// move is not known: deciding `committed` here could remove the only copy.
    holds_no_copy: bool,
}

/// Asks `e`'s destination how the move stands there, both questions at once, each within
/// `limit`: whether it holds the container live (`Locate`, protocol 1.7), and whether it
/// committed the move (a Resolve with the source's view `Unknown`, which every 1.x destination
/// answers from its journal and which does not settle anything there; a rollback notice would
/// remove a copy in doubt there even after this source gave up waiting for the answer: review
/// of session 29, H1). A destination that holds no copy, or is too old to say, but committed the
/// move (its operator decided so, and its copy has ended or been removed since) has this copy
/// removed (review of session 27, L1: it ran again; review of session 29, M-B: a 1.6
/// destination's commit went unasked).
async fn ask(agent: &Arc<Agent>, e: &JournalEntry, limit: Duration) -> Result<There, Unanswered> {
    let (located, resolution) = tokio::join!(
        within(
            limit,
            "Locate",
            agent.ask_peer_about(&e.peer, &e.container_id)
        ),
        within(
            limit,
            "the Resolve",
            agent.ask_peer_resolution(&e.peer, &e.migration_id)
        ),
    );
    let unanswered = |why: String, holds_no_copy| Unanswered { why, holds_no_copy };
    let committed = |resolution: Result<(DestView, _), String>, holds_no_copy| match resolution {
        Ok((DestView::Committed, _)) => Ok(There::Beyond(
            "it committed the move, and its copy has ended since".into(),
        )),
        Ok((view, _)) => Ok(There::Not(format!("no copy there (its view: {view:?})"))),
        Err(why) => Err(unanswered(why, holds_no_copy)),
    };
    match located.map_err(|why| unanswered(why, false))? {
        // Live there beyond this move (it names this migration while it arrives or is in
        // doubt): run (decided committed), moved on, ...
        Located::Held(state) if !state.contains(&e.migration_id) => Ok(There::Beyond(state)),
        // In doubt there when Locate was answered, committed by the time the Resolve was (its
        // operator decided in between): the copy there runs (review 3 of session 29, L4).
        Located::Held(_) if matches!(resolution, Ok((DestView::Committed, _))) => Ok(
            There::Beyond("it committed the move while it was asked".into()),
        ),
        Located::Held(state) => Ok(There::Not(state)),
        Located::NotHeld => committed(resolution, true),
        Located::CannotTell => committed(resolution, false),
    }
}

/// A pinned peer other than `e`'s destination that holds `e`'s container live, and its state
/// there: asked of every pinned peer at once ([`Agent::ask_peers_about`]).
async fn held_elsewhere(agent: &Arc<Agent>, e: &JournalEntry) -> Option<(String, String)> {
    // Only a copy that runs: one frozen in a move of its own (in doubt, arriving, leaving) may
    // yet roll back to a host that is down, and removing this copy then left none (review 3 of
    // session 29, M2).
    agent
        .ask_peers_about(&e.container_id)
        .await
        .held
        .into_iter()
        .find(|(peer, state)| *peer != e.peer && state == "running")
}

/// `question`'s answer, or that none came within `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    question: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, question)
        .await
        .unwrap_or_else(|_| Err(format!("no answer to {what} within {limit:?}")))
}

/// Settles move `e` with how it stands on its destination: the copy here is removed when the
/// destination holds the container beyond this move (true), else thawed (false).
fn settle_with(agent: &Arc<Agent>, e: JournalEntry, there: There) -> bool {
    match there {
        There::Beyond(why) => {
            tracing::warn!(migration = %e.migration_id, peer = %e.peer, %why, "the destination holds the container beyond this move (decided committed there?): removing this copy instead of thawing it");
            settle(agent, &e, JournalState::Committed);
            end_committed_copy(agent, e);
            true
        }
        There::Not(why) => {
            tracing::info!(migration = %e.migration_id, peer = %e.peer, %why, "the destination does not hold the container beyond this move: rolling back");
            roll_back_source(agent, &e);
            false
        }
    }
}

/// Keeps move `e`'s copy frozen (and busy) while its destination, which could not be asked
/// (`why`), is asked again every [`ASK_AGAIN`] for up to [`ASK_PATIENCE`]; then settles it with
/// the answer, or rolls it back when there was none. Stops when the move was settled meanwhile
/// (`mig move --resolve`).
fn wait_for_destination(agent: Arc<Agent>, e: JournalEntry, why: String) {
    let until = Instant::now() + ASK_PATIENCE;
    tracing::warn!(migration = %e.migration_id, peer = %e.peer, %why, "cannot ask the destination whether it runs the container: the copy here stays frozen while it is asked again, for at most {ASK_PATIENCE:?}");
    agent.set_busy(&e.container_id, true);
    waiting_map().insert(e.migration_id.clone(), until);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(ASK_AGAIN).await;
            // One machine acts on the migration at a time: an operator's `--resolve` may have
            // settled it while this waited.
            let _held = super::hold(&e.migration_id).await;
            let open = journal::read(&agent.cfg.state_dir, &e.migration_id).is_some_and(|now| {
                matches!(now.state, JournalState::Frozen | JournalState::Restored)
            });
            if !open || !waiting(&e.migration_id) {
                waiting_map().remove(&e.migration_id);
                return;
            }
            match ask(&agent, &e, ASK_LIMIT).await {
                Ok(answer) => {
                    waiting_map().remove(&e.migration_id);
                    settle_with(&agent, e, answer);
                    return;
                }
                Err(Unanswered { why, .. }) if Instant::now() >= until => {
                    waiting_map().remove(&e.migration_id);
                    // The destination may have run it and moved it on: a pinned peer that holds
                    // it live keeps this copy from running beside it (QA of session 29: after
                    // host-b moved it to host-c and went down, host-a thawed a second copy).
                    if let Some((peer, state)) = held_elsewhere(&agent, &e).await {
                        tracing::warn!(migration = %e.migration_id, %peer, %state, "the destination could not be asked for {ASK_PATIENCE:?}, and another peer holds the container: removing this copy instead of thawing it");
                        super::found_running_on(&e.migration_id, &peer);
                        settle(&agent, &e, JournalState::Committed);
                        end_committed_copy(&agent, e);
                        return;
                    }
                    tracing::warn!(migration = %e.migration_id, peer = %e.peer, %why, "the destination could not be asked for {ASK_PATIENCE:?}: rolling back, the container runs here again");
                    roll_back_source(&agent, &e);
                    return;
                }
                Err(Unanswered { why, .. }) => {
                    tracing::debug!(migration = %e.migration_id, peer = %e.peer, %why, "cannot ask the destination yet")
                }
            }
        }
    });
}

impl Agent {
    /// `mig move --resolve` of a copy that waits for its destination's answer
    /// ([`wait_for_destination`]): asks at once, and settles the move with the answer; when the
    /// destination cannot be asked, applies the operator's `decide`, or without it says that
    /// the copy stays frozen and until when.
    pub(super) async fn resolve_waiting(
        self: &Arc<Self>,
        e: JournalEntry,
        decide: Option<Decision>,
    ) -> Result<MoveResult, ApiError> {
        let (held, e) = match self.hold_unsettled(e).await? {
            Held::Open(guard, e) => (guard, e),
            Held::Settled(r) => {
                return match decide {
                    Some(d) => not_applied(*r, d),
                    None => *r,
                }
            }
        };
        let settled = match ask(self, &e, ASK_LIMIT).await {
            Ok(answer) => {
                waiting_map().remove(&e.migration_id);
                if settle_with(self, e.clone(), answer) {
                    Ok(resolved_result(&e))
                } else {
                    Err(ApiError::new(
                        ErrorKind::Conflict,
                        format!(
                            "resolved: {} does not hold the container beyond this move, so the move was rolled back and the container runs here",
                            e.peer
                        ),
                    ))
                }
            }
            // It holds no copy; whether it committed the move did not come: committing here
            // could remove the only copy (review of session 29, M-C), as `resolve_move` says.
            Err(Unanswered {
                holds_no_copy: true,
                why,
            }) if decide == Some(Decision::Committed) => {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} answered that it has no copy of {} it could run ({why} about the rest): committing would remove the only one; `--decide rolled-back` runs it here",
                        e.peer, e.container_name
                    ),
                ))
            }
            Err(Unanswered { why, .. }) => match decide {
                Some(d) => {
                    // Still waiting until the decision is in the journal: if it fails, the
                    // copy is asked about again and thawed after the patience, as before (the
                    // background ask stops once the journal is settled).
                    drop(held);
                    let why = format!("cannot ask {}: {why}", e.peer);
                    let (state_dir, id) = (self.cfg.state_dir.clone(), e.migration_id.clone());
                    let decided = self.decide_here(e, d, &why).await;
                    // Settled: no longer listed as waiting (QA of session 29: `frozen
                    // (migration in doubt)` until the background ask's next wake, 3 s).
                    if journal::read(&state_dir, &id).is_some_and(|j| journal::is_final(&j.state)) {
                        waiting_map().remove(&id);
                    }
                    return decided;
                }
                None => {
                    let left = waiting_map()
                        .get(&e.migration_id)
                        .map_or(0, |t| t.saturating_duration_since(Instant::now()).as_secs());
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "migration {} stopped before its Commit while this agent was down, and {} cannot be asked whether it runs {} ({why}): the copy here stays frozen while it is asked again, and is thawed if it still cannot be asked in {left} s; if {} is gone for good, `mig move --resolve {} --decide rolled-back` runs it here now, `--decide committed` removes it here",
                            e.migration_id, e.peer, e.container_name, e.peer, e.container_name
                        ),
                    ));
                }
            },
        };
        self.settle_started_move(&e.migration_id, &settled);
        settled
    }
}
