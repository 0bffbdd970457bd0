//! The source side: freeze, dump, send, commit or thaw.

use super::{Cause, JournalRecord, JournalState, Outcome, Output, Role, Timeouts};
use crate::wire::{AbortReason, Message, Phase, Prepare, Resolution, SourceView};
use mig_runtime::pidmap::PidEntry;
use std::collections::VecDeque;
use std::time::Duration;

/// Local actions the source's host performs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Send the files of `phase` on file streams: for [`Phase::Presync`] the `missing_layers`
    /// and a first copy of the writable layer; for [`Phase::Final`] the dump's image set and the
    /// writable-layer delta. Answer [`SourceInput::FilesSent`].
    SendFiles {
        phase: Phase,
        missing_layers: Vec<String>,
    },
    /// Freeze the container's cgroup. Answer [`SourceInput::Frozen`].
    Freeze,
    /// Dump the frozen container with CRIU, leaving it frozen. Answer [`SourceInput::Dumped`].
    Dump,
    /// Thaw the container (no-op when not frozen). Answer [`SourceInput::Thawed`].
    Thaw,
    /// Destroy the frozen source copy and its state. Answer [`SourceInput::Destroyed`].
    DestroySource,
}

/// Inputs of the [`SourceMachine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceInput {
    /// A control message from the destination.
    Received(Message),
    FilesSent {
        phase: Phase,
        files: u32,
        bytes: u64,
    },
    Frozen,
    Dumped,
    Thawed,
    Destroyed,
    /// The last [`SourceAction`] failed.
    ActionFailed {
        detail: String,
    },
    /// The last journal write failed (the machine drops its queued outputs).
    JournalFailed {
        detail: String,
    },
    /// The connection is gone (or a send failed).
    LinkLost,
    /// [`SourceMachine::timeout`] expired without an input.
    TimedOut,
    /// In doubt: a new connection to the destination is up (hellos done).
    Reconnected,
    /// In doubt: an operator decided.
    Operator(Resolution),
    /// An operator cancels the move (honoured before Commit only).
    Cancel,
}

/// States of the [`SourceMachine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceState {
    Idle,
    AwaitPrepareOk,
    Presyncing,
    AwaitPresyncOk,
    Freezing,
    Dumping,
    Transferring,
    AwaitRestored,
    /// Commit sent, waiting for Committed.
    AwaitCommitted,
    /// The link was lost in the commit window: the frozen copy is kept.
    InDoubt,
    /// Resolve sent on a new connection.
    Resolving,
    /// Thawing after an abort.
    RollingBack,
    /// Destroying the frozen copy after Commit.
    Destroying,
    Done(Outcome),
}

impl SourceState {
    /// What the source is doing in this state, in words for messages.
    pub fn doing(&self) -> &'static str {
        match self {
            SourceState::Idle => "starting",
            SourceState::AwaitPrepareOk => "waiting for the destination to accept the move",
            SourceState::Presyncing => "sending the writable layer",
            SourceState::AwaitPresyncOk => {
                "waiting for the destination to store the writable layer"
            }
            SourceState::Freezing => "freezing the container",
            SourceState::Dumping => "dumping the container",
            SourceState::Transferring => "sending the checkpoint",
            SourceState::AwaitRestored => "waiting for the destination to restore",
            SourceState::AwaitCommitted => "waiting for the destination to confirm the commit",
            SourceState::InDoubt => "in doubt about the commit",
            SourceState::Resolving => "asking the destination how the move ended",
            SourceState::RollingBack => "rolling back",
            SourceState::Destroying => "removing the source's copy",
            SourceState::Done(_) => "done",
        }
    }
}

/// The source's state machine. Create it with [`SourceMachine::new`] and call
/// [`SourceMachine::start`], or rebuild it from a journal with [`SourceMachine::recover`].
#[derive(Debug)]
pub struct SourceMachine {
    id: String,
    prepare: Option<Box<Prepare>>,
    state: SourceState,
    timeouts: Timeouts,
    out: VecDeque<Output<SourceAction>>,
    /// Why a rollback is running (kept while thawing).
    pending: Option<(Cause, String)>,
    dest_pid_map: Vec<PidEntry>,
    /// Rolled back: a Resolve was sent to release a destination that may be in doubt.
    notifying: bool,
    /// The destination's answer to that Resolve, once it came.
    notice_answer: Option<Resolution>,
}

impl SourceMachine {
    /// A machine for a new migration described by `prepare`.
    pub fn new(prepare: Prepare, timeouts: Timeouts) -> SourceMachine {
        SourceMachine {
            id: prepare.migration_id.clone(),
            prepare: Some(Box::new(prepare)),
            state: SourceState::Idle,
            timeouts,
            out: VecDeque::new(),
            pending: None,
            dest_pid_map: Vec::new(),
            notifying: false,
            notice_answer: None,
        }
    }

    /// Rebuilds the machine of migration `id` after a restart from its last journal state:
    /// `Preparing` ends rolled back, `Frozen` thaws, `CommitSent`/`InDoubt` are in doubt,
    /// `Committed` destroys the source copy again (idempotent).
    pub fn recover(id: &str, last: &JournalState, timeouts: Timeouts) -> SourceMachine {
        let mut m = SourceMachine {
            id: id.to_string(),
            prepare: None,
            state: SourceState::Idle,
            timeouts,
            out: VecDeque::new(),
            pending: None,
            dest_pid_map: Vec::new(),
            notifying: false,
            notice_answer: None,
        };
        let restart = "agent restarted during the migration".to_string();
        match last {
            JournalState::Preparing => m.rollback(Cause::LinkLost, restart, false),
            JournalState::Frozen | JournalState::Restored => {
                m.rollback(Cause::LinkLost, restart, true)
            }
            JournalState::CommitSent | JournalState::InDoubt => m.state = SourceState::InDoubt,
            JournalState::Committed => m.destroy(),
            JournalState::RolledBack => {
                m.state = SourceState::Done(Outcome::RolledBack {
                    cause: Cause::LinkLost,
                    detail: restart,
                    rollback_error: None,
                })
            }
            JournalState::RollbackFailed { detail } => {
                m.state = SourceState::Done(Outcome::RolledBack {
                    cause: Cause::LinkLost,
                    detail: restart,
                    rollback_error: Some(detail.clone()),
                })
            }
        }
        m
    }

    /// The migration id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn state(&self) -> &SourceState {
        &self.state
    }

    /// Whether the destination answered this rolled-back migration's Resolve with a commit (an
    /// operator decided each side its own way): the container runs on both hosts.
    pub fn both_run(&self) -> bool {
        self.notice_answer == Some(Resolution::Committed)
            && matches!(self.state, SourceState::Done(Outcome::RolledBack { .. }))
    }

    /// The destination's answer to this rolled-back migration's Resolve (`None`: none came):
    /// how the move ended there.
    pub fn notice_answer(&self) -> Option<Resolution> {
        self.notice_answer
    }

    /// The PID map the destination reported with Restored (empty before).
    pub fn dest_pid_map(&self) -> &[PidEntry] {
        &self.dest_pid_map
    }

    /// True when nothing more will happen on this connection: done, or in doubt (waiting for a
    /// reconnection or an operator).
    pub fn is_finished(&self) -> bool {
        self.out.is_empty()
            && !self.notifying
            && matches!(self.state, SourceState::Done(_) | SourceState::InDoubt)
    }

    /// The outcome once done.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            SourceState::Done(o) => Some(o),
            _ => None,
        }
    }

    /// How long to wait for the next input before feeding [`SourceInput::TimedOut`]; `None` while
    /// a local action runs or when finished.
    pub fn timeout(&self) -> Option<Duration> {
        match self.state {
            SourceState::AwaitPrepareOk | SourceState::AwaitCommitted | SourceState::Resolving => {
                Some(self.timeouts.control)
            }
            SourceState::Done(_) if self.notifying => Some(self.timeouts.control),
            SourceState::AwaitPresyncOk | SourceState::AwaitRestored => {
                Some(self.timeouts.transfer)
            }
            _ => None,
        }
    }

    /// The next output, in order.
    pub fn poll_output(&mut self) -> Option<Output<SourceAction>> {
        self.out.pop_front()
    }

    /// Starts a new migration: journals `Preparing` and sends Prepare.
    pub fn start(&mut self) {
        if self.state != SourceState::Idle {
            return;
        }
        let Some(prepare) = self.prepare.take() else {
            return;
        };
        self.journal(JournalState::Preparing);
        self.send(Message::Prepare(prepare));
        self.state = SourceState::AwaitPrepareOk;
    }

    /// Feeds one input.
    pub fn handle(&mut self, input: SourceInput) {
        use SourceInput as I;
        use SourceState as S;
        if let I::JournalFailed { detail } = &input {
            self.out.clear();
            let detail = format!("journal: {detail}");
            match self.state {
                // The commit decision was not recorded, so Commit was not sent: roll back.
                S::AwaitCommitted => self.abort_local(AbortReason::JournalFailed, detail, true),
                // Destroying is idempotent and a restart resolves to it again: go on.
                S::Destroying => self.act(SourceAction::DestroySource),
                S::InDoubt | S::Resolving | S::RollingBack | S::Done(_) => {
                    tracing::warn!(migration = %self.id, %detail, "journal write failed")
                }
                _ => self.abort_local(AbortReason::JournalFailed, detail, self.maybe_frozen()),
            }
            return;
        }
        match (self.state.clone(), input) {
            (S::AwaitPrepareOk, I::Received(Message::PrepareOk { missing_layers })) => {
                self.act(SourceAction::SendFiles {
                    phase: Phase::Presync,
                    missing_layers,
                });
                self.state = S::Presyncing;
            }
            (S::AwaitPrepareOk, I::Received(Message::Refused { reason, detail })) => {
                self.rollback(Cause::Refused(reason), detail, false)
            }
            (
                S::Presyncing,
                I::FilesSent {
                    phase: Phase::Presync,
                    files,
                    bytes,
                },
            ) => {
                self.send(Message::TransferDone {
                    phase: Phase::Presync,
                    files,
                    bytes,
                });
                self.state = S::AwaitPresyncOk;
            }
            (
                S::AwaitPresyncOk,
                I::Received(Message::TransferOk {
                    phase: Phase::Presync,
                }),
            ) => {
                self.journal(JournalState::Frozen);
                self.act(SourceAction::Freeze);
                self.state = S::Freezing;
            }
            (S::Freezing, I::Frozen) => {
                self.send(Message::Frozen);
                self.act(SourceAction::Dump);
                self.state = S::Dumping;
            }
            (S::Dumping, I::Dumped) => {
                self.send(Message::DumpDone);
                self.act(SourceAction::SendFiles {
                    phase: Phase::Final,
                    missing_layers: Vec::new(),
                });
                self.state = S::Transferring;
            }
            (
                S::Transferring,
                I::FilesSent {
                    phase: Phase::Final,
                    files,
                    bytes,
                },
            ) => {
                self.send(Message::TransferDone {
                    phase: Phase::Final,
                    files,
                    bytes,
                });
                self.state = S::AwaitRestored;
            }
            (S::AwaitRestored, I::Received(Message::Restored { pid_map })) => {
                self.dest_pid_map = pid_map;
                self.journal(JournalState::CommitSent);
                self.send(Message::Commit);
                self.state = S::AwaitCommitted;
            }
            (S::AwaitCommitted, I::Received(Message::Committed)) => self.destroy(),
            // The destination could not resume and destroyed its copy: ours is the only one.
            (S::AwaitCommitted, I::Received(Message::Abort { reason, detail })) => {
                self.rollback(Cause::Peer(reason), detail, true)
            }
            (S::AwaitCommitted, I::LinkLost | I::TimedOut | I::Received(_)) => self.in_doubt(),
            (S::InDoubt, I::Reconnected) => {
                self.send(Message::Resolve {
                    migration_id: self.id.clone(),
                    source: SourceView::CommitSent,
                });
                self.state = S::Resolving;
            }
            (
                S::Resolving,
                I::Received(Message::Resolved {
                    migration_id,
                    outcome,
                    ..
                }),
            ) if migration_id == self.id => self.apply_resolution(outcome, Cause::Resolution),
            // Rolled back after losing the link: the destination may be in doubt holding a
            // stopped copy; tell it to clean up.
            (S::Done(Outcome::RolledBack { .. }), I::Reconnected) => {
                self.send(Message::Resolve {
                    migration_id: self.id.clone(),
                    source: SourceView::RolledBack,
                });
                self.notifying = true;
            }
            (
                S::Done(_),
                answer @ (I::Received(Message::Resolved { .. }) | I::LinkLost | I::TimedOut),
            ) if self.notifying => {
                if let I::Received(Message::Resolved { outcome, .. }) = answer {
                    self.notice_answer = Some(outcome);
                }
                self.notifying = false
            }
            (S::Done(_), I::Reconnected) => {}
            (S::Resolving, I::LinkLost | I::TimedOut | I::Received(_)) => self.state = S::InDoubt,
            (S::InDoubt | S::Resolving, I::Operator(decision)) => {
                self.apply_resolution(decision, Cause::Operator)
            }
            (S::RollingBack, I::Thawed) => self.finish_rollback(None),
            (S::RollingBack, I::ActionFailed { detail }) => self.finish_rollback(Some(detail)),
            (S::Destroying, I::Destroyed) => {
                self.state = S::Done(Outcome::Committed {
                    cleanup_error: None,
                })
            }
            (S::Destroying, I::ActionFailed { detail }) => {
                self.state = S::Done(Outcome::Committed {
                    cleanup_error: Some(detail),
                })
            }
            // Late messages while finishing, or after the end, change nothing.
            (S::RollingBack | S::Destroying | S::Done(_), I::Received(_) | I::LinkLost) => {}
            (s, I::Received(Message::Abort { reason, detail })) if s.before_commit() => {
                self.rollback(Cause::Peer(reason), detail, s.maybe_frozen())
            }
            (s, I::Received(m)) if s.before_commit() => self.abort_local(
                AbortReason::ProtocolViolation,
                format!("unexpected {} while {}", m.name(), s.doing()),
                s.maybe_frozen(),
            ),
            (s, I::LinkLost) if s.before_commit() => self.rollback(
                Cause::LinkLost,
                "link lost before commit".into(),
                s.maybe_frozen(),
            ),
            (s, I::TimedOut) if s.before_commit() => self.abort_local(
                AbortReason::Timeout,
                format!("timed out while {}", s.doing()),
                s.maybe_frozen(),
            ),
            (s, I::Cancel) if s.before_commit() => self.abort_local(
                AbortReason::Cancelled,
                "cancelled by an operator".into(),
                s.maybe_frozen(),
            ),
            (s @ (S::Presyncing | S::Transferring), I::ActionFailed { detail }) => {
                self.abort_local(AbortReason::SendFailed, detail, s.maybe_frozen())
            }
            (S::Freezing, I::ActionFailed { detail }) => {
                self.abort_local(AbortReason::FreezeFailed, detail, true)
            }
            (S::Dumping, I::ActionFailed { detail }) => {
                self.abort_local(AbortReason::DumpFailed, detail, true)
            }
            (s, input) => {
                tracing::warn!(migration = %self.id, state = ?s, ?input, "input ignored in this state")
            }
        }
    }

    fn maybe_frozen(&self) -> bool {
        self.state.maybe_frozen()
    }

    fn apply_resolution(&mut self, r: Resolution, cause: Cause) {
        match r {
            Resolution::Committed => self.destroy(),
            Resolution::RolledBack => {
                self.rollback(cause, "resolved: the destination has no copy".into(), true)
            }
            Resolution::Undecided => self.state = SourceState::InDoubt,
        }
    }

    fn in_doubt(&mut self) {
        self.journal(JournalState::InDoubt);
        self.state = SourceState::InDoubt;
    }

    fn destroy(&mut self) {
        self.journal(JournalState::Committed);
        self.act(SourceAction::DestroySource);
        self.state = SourceState::Destroying;
    }

    /// Aborts on our own initiative: tells the peer, then rolls back.
    fn abort_local(&mut self, reason: AbortReason, detail: String, frozen: bool) {
        self.send(Message::Abort {
            reason,
            detail: detail.clone(),
        });
        self.rollback(Cause::Local(reason), detail, frozen);
    }

    fn rollback(&mut self, cause: Cause, detail: String, frozen: bool) {
        // Actions queued before the rollback are moot (say a dump or the final file phase queued
        // behind a message whose send then failed): they must not run, and a failure of theirs
        // must not be taken for the thaw's. Messages (an Abort) and journal records stay.
        self.out.retain(|o| !matches!(o, Output::Do(_)));
        if frozen {
            self.pending = Some((cause, detail));
            self.act(SourceAction::Thaw);
            self.state = SourceState::RollingBack;
        } else {
            self.journal(JournalState::RolledBack);
            self.state = SourceState::Done(Outcome::RolledBack {
                cause,
                detail,
                rollback_error: None,
            });
        }
    }

    fn finish_rollback(&mut self, error: Option<String>) {
        let (cause, detail) = self
            .pending
            .take()
            .unwrap_or((Cause::LinkLost, String::new()));
        self.journal(match &error {
            None => JournalState::RolledBack,
            Some(e) => JournalState::RollbackFailed {
                detail: format!("thaw: {e}"),
            },
        });
        self.state = SourceState::Done(Outcome::RolledBack {
            cause,
            detail,
            rollback_error: error.map(|e| format!("thaw: {e}")),
        });
    }

    fn send(&mut self, m: Message) {
        self.out.push_back(Output::Send(m));
    }

    fn act(&mut self, a: SourceAction) {
        self.out.push_back(Output::Do(a));
    }

    fn journal(&mut self, state: JournalState) {
        self.out.push_back(Output::Journal(JournalRecord {
            migration_id: self.id.clone(),
            role: Role::Source,
            state,
        }));
    }
}

impl SourceState {
    fn before_commit(&self) -> bool {
        use SourceState as S;
        matches!(
            self,
            S::Idle
                | S::AwaitPrepareOk
                | S::Presyncing
                | S::AwaitPresyncOk
                | S::Freezing
                | S::Dumping
                | S::Transferring
                | S::AwaitRestored
        )
    }

    /// Whether a rollback from here must thaw (freezing may have half-happened).
    fn maybe_frozen(&self) -> bool {
        use SourceState as S;
        matches!(
            self,
            S::Freezing | S::Dumping | S::Transferring | S::AwaitRestored | S::AwaitCommitted
        )
    }
}
