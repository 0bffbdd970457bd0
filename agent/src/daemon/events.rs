//! The agent's event stream: container lifecycle and migration phases, fanned out to every
//! subscriber (`mig events`, `mig move`'s progress, metrics). Events are not stored: a subscriber
//! sees what happens after it subscribed. A subscriber that falls more than [`CAPACITY`] events
//! behind gets one [`EventKind::Lagged`] saying how many it missed.

use super::Agent;
use crate::api::frame::{write_frame, FrameError};
use crate::api::{ApiError, ErrorKind, MoveState, MoveStatus, Response};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;
use tokio::net::UnixStream;
use tokio::sync::broadcast;

/// Events kept for a slow subscriber before it lags.
pub const CAPACITY: usize = 1024;

/// One event, numbered in the order the agent emitted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event of this agent run.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// The agent's (host's) name.
    pub host: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    ContainerStarted {
        id: String,
        name: String,
    },
    /// The container's init exited (or it was killed).
    ContainerStopped {
        id: String,
        name: String,
        /// As `mig inspect` and `mig ps` give it: the exit code, or 128+signal when the init was
        /// killed by a signal; null when unknown (the shim recorded nothing).
        exit_code: Option<i32>,
        /// The signal that killed the init; null when it exited (or unknown). Absent from agents
        /// before it was added.
        #[serde(default)]
        signal: Option<i32>,
        /// The peer the container was moved to, when this is the source's copy ending after a
        /// committed move (it runs on there); null otherwise.
        #[serde(default)]
        moved_to: Option<String>,
        /// Why it ended, as `mig inspect` and `mig ps --json` give it (`oom-killed: ...`,
        /// `post-copy failed ...`); null for a plain exit or stop. Absent from agents before it
        /// was added.
        #[serde(default)]
        reason: Option<String>,
    },
    ContainerOom {
        id: String,
        name: String,
        oom_kills: u64,
    },
    ContainerCheckpointed {
        id: String,
        name: String,
        leave_running: bool,
    },
    ContainerRestored {
        id: String,
        name: String,
    },
    ContainerRemoved {
        id: String,
        name: String,
        /// As in `ContainerStopped`: set when the source's copy is removed after a committed move.
        #[serde(default)]
        moved_to: Option<String>,
    },
    /// A migration entered `phase` (prepare, presync, freeze, dump, transfer, restore, commit,
    /// rollback) on this agent; `elapsed_ms` counts from the start of the migration.
    MigrationPhase {
        migration_id: String,
        container_id: String,
        container_name: String,
        /// `source` or `destination`.
        role: String,
        peer: String,
        phase: String,
        elapsed_ms: u64,
        /// Bytes sent (source) or received (destination) so far.
        bytes: u64,
        /// Bytes expected in this phase, when known.
        total_bytes: Option<u64>,
    },
    /// A migration ended on this agent.
    MigrationDone {
        migration_id: String,
        container_id: String,
        container_name: String,
        role: String,
        peer: String,
        /// `committed`, `rolled_back` or `in_doubt`.
        outcome: String,
        total_ms: u64,
        downtime_ms: Option<u64>,
        bytes: u64,
        error: Option<String>,
    },
    /// A move this host rolled back (an operator's decision here, or this source's own after
    /// its destination could not be asked for a minute) was committed on `peer` by an
    /// operator's decision there: the container runs on both hosts. One of the copies must be
    /// removed (`mig rm -f`); `mig ps` here shows it `running (also on PEER)` until then.
    MigrationConflict {
        migration_id: String,
        container_id: String,
        container_name: String,
        peer: String,
    },
    /// This subscriber fell behind and missed `missed` events.
    Lagged {
        missed: u64,
    },
    /// An event of a type this client does not know (a newer agent's): skip it.
    #[serde(other)]
    Unknown,
}

/// Moves started with `MoveStart` kept for `MoveStatus` after they ended.
const KEEP_ENDED_MOVES: usize = 256;

/// The agent's event fan-out, and the moves started with `MoveStart` that events describe.
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
    moves: Mutex<HashMap<String, MoveStatus>>,
}

impl Default for Events {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Events {
            tx,
            seq: AtomicU64::new(0),
            moves: Mutex::new(HashMap::new()),
        }
    }
}

impl Events {
    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

impl Agent {
    /// A receiver of every event emitted from now on (metrics, in-process subscribers).
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The agent's (host's) name.
    pub fn name(&self) -> String {
        self.cfg.name.clone()
    }

    /// Every container with its live usage (the `list` request with `all`).
    pub fn containers_view(&self) -> Vec<crate::api::ContainerSummary> {
        self.list_with_usage(true)
    }

    /// Emits `kind` to every subscriber (nobody listening is fine).
    pub(crate) fn emit(&self, kind: EventKind) {
        let seq = self.events.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let time_ms = unix_ms();
        let _ = self.events.tx.send(Event {
            seq,
            time_ms,
            host: self.cfg.name.clone(),
            kind,
        });
    }
}

/// Streams events as `Event` frames until the client hangs up or the agent shuts down.
pub(super) async fn stream(
    agent: &Arc<Agent>,
    out: &mut UnixStream,
    shutdown: &mut broadcast::Receiver<()>,
) -> Result<(), FrameError> {
    let mut rx = agent.events.subscribe();
    // Tells the client the subscription is in place, so it can start what it wants to watch.
    write_frame(out, &Response::Ok).await?;
    let mut probe = [0u8; 1];
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = shutdown.recv() => return Ok(()),
            // The client only reads; a readable socket means it hung up (or misbehaves).
            _ = out.readable() => {
                match out.try_read(&mut probe) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return Ok(()),
                }
            }
        };
        let event = match event {
            Ok(e) => e,
            // The newest seq emitted, and now: a lag notice keeps `seq` from going back.
            Err(broadcast::error::RecvError::Lagged(missed)) => Event {
                seq: agent.events.seq.load(Ordering::Relaxed),
                time_ms: unix_ms(),
                host: agent.cfg.name.clone(),
                kind: EventKind::Lagged { missed },
            },
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        write_frame(out, &Response::Event(Box::new(event))).await?;
    }
}

/// What `MoveStart` asks for.
#[derive(Debug, Clone)]
pub(crate) struct MoveStartArgs {
    pub container: String,
    pub peer: String,
    pub tcp_established: bool,
    pub opts: crate::migration::modes::MoveOptions,
}

/// Containers a `move_start` of this agent is moving (from its answer to the end of the move):
/// a second `move_start` of one is refused at once.
static STARTING: super::marks::Marks = super::marks::Marks::new();

impl Agent {
    fn moves(&self) -> std::sync::MutexGuard<'_, HashMap<String, MoveStatus>> {
        self.events.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Migration `migration_id`, in doubt until now, was settled by a resolution (`mig move
    /// --resolve`, or the automatic one after a restart): the status of the `move_start` that
    /// began it says how (it said `failed`, in doubt, and never changed).
    pub(crate) fn settle_started_move(
        &self,
        migration_id: &str,
        result: &Result<crate::migration::MoveResult, ApiError>,
    ) {
        let mut moves = self.moves();
        for m in moves
            .values_mut()
            .filter(|m| m.migration_id.as_deref() == Some(migration_id))
        {
            match result {
                Ok(r) => {
                    m.state = MoveState::Committed;
                    m.phase = Some("commit".into());
                    m.result = Some(Box::new(r.clone()));
                    m.error = None;
                }
                Err(err) => m.error = Some(err.clone()),
            }
        }
    }

    /// Starts a move in the background and returns its id at once. The move runs exactly like
    /// `Move`; its phases update the status from the event stream.
    pub(crate) fn move_start(self: &Arc<Self>, args: MoveStartArgs) -> Result<String, ApiError> {
        // Refuse what can be checked now (an unknown container or peer, a container already
        // moving...) instead of failing later: the same checks as a blocking `move`.
        args.opts.check()?;
        let (cid, _) = self.check_move(&args.container, &args.peer, args.tcp_established)?;
        // A move started here a moment ago may not have claimed the container yet: one
        // `move_start` at a time per container, checked and recorded under one lock.
        let starting = STARTING.try_hold(&cid).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Conflict,
                format!("container {} is already being moved", args.container),
            )
        })?;
        let id = hex::encode(rand::random::<[u8; 16]>());
        let status = MoveStatus {
            id: id.clone(),
            migration_id: None,
            container: args.container.clone(),
            peer: args.peer.clone(),
            state: MoveState::Running,
            phase: None,
            started_ms: unix_ms(),
            elapsed_ms: 0,
            result: None,
            error: None,
        };
        {
            let mut moves = self.moves();
            if moves.len() >= KEEP_ENDED_MOVES {
                // Forget the oldest ended moves.
                let mut ended: Vec<(u64, String)> = moves
                    .values()
                    .filter(|m| m.state != MoveState::Running)
                    .map(|m| (m.started_ms, m.id.clone()))
                    .collect();
                ended.sort();
                for (_, old) in ended.iter().take(moves.len() + 1 - KEEP_ENDED_MOVES) {
                    moves.remove(old);
                }
            }
            moves.insert(id.clone(), status);
        }
        // Subscribed before the move starts, so no phase is missed.
        let mut rx = self.events.subscribe();
        let agent = self.clone();
        let move_id = id.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let a2 = agent.clone();
            let task = tokio::spawn(async move {
                a2.move_container(&args.container, &args.peer, args.tcp_established, args.opts)
                    .await
            });
            tokio::pin!(task);
            let _starting = starting;
            let outcome = loop {
                tokio::select! {
                    r = &mut task => break r,
                    e = rx.recv() => {
                        if let Ok(Event { kind: EventKind::MigrationPhase { migration_id, container_id, role, phase, .. }, .. }) = e {
                            if container_id == cid && role == "source" {
                                if let Some(m) = agent.moves().get_mut(&move_id) {
                                    m.migration_id = Some(migration_id);
                                    m.phase = Some(phase);
                                    m.elapsed_ms = t0.elapsed().as_millis() as u64;
                                }
                            }
                        }
                    }
                }
            };
            let mut moves = agent.moves();
            let Some(m) = moves.get_mut(&move_id) else {
                return;
            };
            m.elapsed_ms = t0.elapsed().as_millis() as u64;
            match outcome {
                Ok(Ok(r)) => {
                    m.state = MoveState::Committed;
                    m.migration_id = Some(r.migration_id.clone());
                    m.phase = Some("commit".into());
                    m.result = Some(Box::new(r));
                }
                Ok(Err(e)) => {
                    m.state = MoveState::Failed;
                    m.error = Some(e);
                }
                Err(e) => {
                    m.state = MoveState::Failed;
                    m.error = Some(ApiError::new(
                        ErrorKind::Internal,
                        format!("the move task failed: {e}"),
                    ));
                }
            }
        });
        Ok(id)
    }

    /// The status of a move started with [`Agent::move_start`].
    pub(crate) fn move_status(&self, id: &str) -> Result<MoveStatus, ApiError> {
        self.moves()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no such move: {id}")))
    }
}

/// Now, in milliseconds since the epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
