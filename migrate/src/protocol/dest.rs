//! The destination side: check, receive, restore stopped, run only after Commit.

use super::{Cause, JournalRecord, JournalState, Outcome, Output, Role, Timeouts};
use crate::wire::{
    AbortReason, DestView, Message, Phase, Prepare, RefuseReason, Resolution, SourceView,
};
use mig_runtime::pidmap::PidEntry;
use std::collections::VecDeque;
use std::time::Duration;

/// Local actions the destination's host performs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAction {
    /// Check versions, disk space and name clashes, and list the missing layers. Answer
    /// [`DestInput::PrepareChecked`].
    CheckPrepare(Box<Prepare>),
    /// Wait until `files` files of `phase` (`bytes` in total) have arrived and verified. Answer
    /// [`DestInput::FilesReceived`] or [`DestInput::ActionFailed`].
    AwaitFiles {
        phase: Phase,
        files: u32,
        bytes: u64,
    },
    /// Restore the container stopped (frozen), not running. Answer [`DestInput::Restored`].
    Restore,
    /// Let the restored container run. Answer [`DestInput::Resumed`].
    Resume,
    /// Kill any restored copy and remove everything this migration created. Answer
    /// [`DestInput::CleanedUp`].
    Cleanup,
}

/// Inputs of the [`DestMachine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestInput {
    /// A control message from the source.
    Received(Message),
    /// Result of [`DestAction::CheckPrepare`]: the missing layers, or a refusal.
    PrepareChecked(Result<Vec<String>, (RefuseReason, String)>),
    FilesReceived {
        phase: Phase,
    },
    /// A file failed verification or could not be written (at any time before the restore).
    FileFailed {
        detail: String,
    },
    Restored {
        pid_map: Vec<PidEntry>,
    },
    Resumed,
    CleanedUp,
    /// The last [`DestAction`] failed.
    ActionFailed {
        detail: String,
    },
    /// The last journal write failed (the machine drops its queued outputs).
    JournalFailed {
        detail: String,
    },
    LinkLost,
    TimedOut,
    /// In doubt: an operator decided.
    Operator(Resolution),
}

/// States of the [`DestMachine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestState {
    Idle,
    Checking,
    AwaitPresync,
    ReceivingPresync,
    AwaitFinal,
    ReceivingFinal,
    Restoring,
    /// Restored (stopped), Restored sent, waiting for Commit.
    AwaitCommit,
    Resuming,
    /// The link was lost while waiting for Commit: the stopped copy is kept.
    InDoubt,
    CleaningUp,
    Done(Outcome),
}

impl DestState {
    /// What the destination is doing in this state, in words for messages.
    pub fn doing(&self) -> &'static str {
        match self {
            DestState::Idle => "starting",
            DestState::Checking => "checking the move request",
            DestState::AwaitPresync => "waiting for the writable layer",
            DestState::ReceivingPresync => "receiving the writable layer",
            DestState::AwaitFinal => "waiting for the checkpoint",
            DestState::ReceivingFinal => "receiving the checkpoint",
            DestState::Restoring => "restoring",
            DestState::AwaitCommit => "waiting for the source's commit",
            DestState::Resuming => "resuming the container",
            DestState::InDoubt => "in doubt about the commit",
            DestState::CleaningUp => "cleaning up",
            DestState::Done(_) => "done",
        }
    }
}

/// What to tell the source once a cleanup finished.
#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    Nothing,
    /// Resume failed after Commit: tell the source to thaw only once our copy is gone.
    Abort(AbortReason, String),
    Resolved(DestView, Resolution),
}

/// The destination's state machine: [`DestMachine::new`] for an incoming Prepare, or
/// [`DestMachine::recover`] from the journal for a restart or an incoming Resolve.
#[derive(Debug)]
pub struct DestMachine {
    id: String,
    state: DestState,
    view: DestView,
    timeouts: Timeouts,
    out: VecDeque<Output<DestAction>>,
    pending: Option<(Cause, String, After)>,
    /// Set while resuming for a Resolve (the reply to send once resumed).
    resolving: bool,
}

impl DestMachine {
    /// A machine waiting for a Prepare.
    pub fn new(timeouts: Timeouts) -> DestMachine {
        DestMachine {
            id: String::new(),
            state: DestState::Idle,
            view: DestView::Unknown,
            timeouts,
            out: VecDeque::new(),
            pending: None,
            resolving: false,
        }
    }

    /// Rebuilds the machine of migration `id` from its last journal state (`None`: no record).
    /// `Preparing` cleans up; `Restored`/`InDoubt` are in doubt; `Committed` and `RolledBack` are
    /// done (and answer a Resolve accordingly); no record answers `Undecided`.
    pub fn recover(id: &str, last: Option<&JournalState>, timeouts: Timeouts) -> DestMachine {
        let mut m = DestMachine::new(timeouts);
        m.id = id.to_string();
        let restart = "agent restarted during the migration".to_string();
        match last {
            None => {}
            Some(JournalState::Preparing | JournalState::Frozen | JournalState::CommitSent) => {
                m.view = DestView::RolledBack;
                m.cleanup(Cause::LinkLost, restart, After::Nothing);
            }
            Some(JournalState::Restored | JournalState::InDoubt) => {
                m.view = DestView::AwaitingCommit;
                m.state = DestState::InDoubt;
            }
            Some(JournalState::Committed) => {
                m.view = DestView::Committed;
                m.state = DestState::Done(Outcome::Committed {
                    cleanup_error: None,
                });
            }
            Some(JournalState::RolledBack | JournalState::RollbackFailed { .. }) => {
                m.view = DestView::RolledBack;
                m.state = DestState::Done(Outcome::RolledBack {
                    cause: Cause::LinkLost,
                    detail: "rolled back before this resolve".into(),
                    rollback_error: None,
                });
            }
        }
        m
    }

    /// The migration id (empty until the Prepare or Resolve arrived).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn state(&self) -> &DestState {
        &self.state
    }

    /// True when nothing more will happen on this connection.
    pub fn is_finished(&self) -> bool {
        self.out.is_empty() && matches!(self.state, DestState::Done(_) | DestState::InDoubt)
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            DestState::Done(o) => Some(o),
            _ => None,
        }
    }

    /// How long to wait for the next input (for [`DestAction::AwaitFiles`] too) before feeding
    /// [`DestInput::TimedOut`].
    pub fn timeout(&self) -> Option<Duration> {
        use DestState as S;
        match self.state {
            S::Idle | S::AwaitCommit => Some(self.timeouts.control),
            S::AwaitPresync | S::ReceivingPresync | S::AwaitFinal | S::ReceivingFinal => {
                Some(self.timeouts.transfer)
            }
            _ => None,
        }
    }

    pub fn poll_output(&mut self) -> Option<Output<DestAction>> {
        self.out.pop_front()
    }

    /// Feeds one input.
    pub fn handle(&mut self, input: DestInput) {
        use DestInput as I;
        use DestState as S;
        if let I::JournalFailed { detail } = &input {
            self.out.clear();
            let detail = format!("journal: {detail}");
            match self.state {
                // Restored not recorded (and not sent): give up before Commit.
                S::AwaitCommit => self.abort_local(AbortReason::JournalFailed, detail),
                // Committed not recorded: the copy never ran, so it is removed and the source
                // told to thaw its own, as after a failed resume (a restart would roll it back
                // too: the journal still says Restored). Both copies used to stay frozen for as
                // long as the disk stayed full (QA).
                S::Resuming => {
                    tracing::error!(migration = %self.id, %detail, "cannot record the commit (a full disk?): the restored copy is removed and the source keeps the container");
                    let after = if self.resolving {
                        After::Resolved(DestView::AwaitingCommit, Resolution::RolledBack)
                    } else {
                        After::Abort(AbortReason::JournalFailed, detail.clone())
                    };
                    self.cleanup(Cause::Local(AbortReason::JournalFailed), detail, after);
                }
                S::Done(_) | S::InDoubt | S::CleaningUp => {
                    tracing::warn!(migration = %self.id, %detail, "journal write failed")
                }
                _ => self.abort_local(AbortReason::JournalFailed, detail),
            }
            return;
        }
        match (self.state.clone(), input) {
            (S::Idle, I::Received(Message::Prepare(p))) => {
                self.id = p.migration_id.clone();
                self.act(DestAction::CheckPrepare(p));
                self.state = S::Checking;
            }
            (S::Idle, I::Received(Message::Abort { reason, detail })) => {
                self.done_rolled_back(Cause::Peer(reason), detail, None)
            }
            (S::Checking, I::PrepareChecked(Ok(missing_layers))) => {
                self.journal(JournalState::Preparing);
                self.send(Message::PrepareOk { missing_layers });
                self.state = S::AwaitPresync;
            }
            (S::Checking, I::PrepareChecked(Err((reason, detail)))) => {
                self.send(Message::Refused {
                    reason,
                    detail: detail.clone(),
                });
                self.state = S::Done(Outcome::RolledBack {
                    cause: Cause::Refused(reason),
                    detail,
                    rollback_error: None,
                });
            }
            (
                S::AwaitPresync,
                I::Received(Message::TransferDone {
                    phase: Phase::Presync,
                    files,
                    bytes,
                }),
            ) => {
                self.act(DestAction::AwaitFiles {
                    phase: Phase::Presync,
                    files,
                    bytes,
                });
                self.state = S::ReceivingPresync;
            }
            (
                S::ReceivingPresync,
                I::FilesReceived {
                    phase: Phase::Presync,
                },
            ) => {
                self.send(Message::TransferOk {
                    phase: Phase::Presync,
                });
                self.state = S::AwaitFinal;
            }
            (S::AwaitFinal, I::Received(Message::Frozen | Message::DumpDone)) => {}
            (
                S::AwaitFinal,
                I::Received(Message::TransferDone {
                    phase: Phase::Final,
                    files,
                    bytes,
                }),
            ) => {
                self.act(DestAction::AwaitFiles {
                    phase: Phase::Final,
                    files,
                    bytes,
                });
                self.state = S::ReceivingFinal;
            }
            (
                S::ReceivingFinal,
                I::FilesReceived {
                    phase: Phase::Final,
                },
            ) => {
                self.act(DestAction::Restore);
                self.state = S::Restoring;
            }
            (S::Restoring, I::Restored { pid_map }) => {
                self.journal(JournalState::Restored);
                self.send(Message::Restored { pid_map });
                self.view = DestView::AwaitingCommit;
                self.state = S::AwaitCommit;
            }
            (S::AwaitCommit, I::Received(Message::Commit)) => self.resume(false),
            (S::AwaitCommit, I::LinkLost | I::TimedOut) => {
                self.journal(JournalState::InDoubt);
                self.state = S::InDoubt;
            }
            (S::Resuming, I::Resumed) => {
                if self.resolving {
                    self.send(Message::Resolved {
                        migration_id: self.id.clone(),
                        dest: DestView::AwaitingCommit,
                        outcome: Resolution::Committed,
                    });
                } else {
                    self.send(Message::Committed);
                }
                self.view = DestView::Committed;
                self.state = S::Done(Outcome::Committed {
                    cleanup_error: None,
                });
            }
            (S::Resuming, I::ActionFailed { detail }) => {
                let after = if self.resolving {
                    After::Resolved(DestView::AwaitingCommit, Resolution::RolledBack)
                } else {
                    After::Abort(AbortReason::ResumeFailed, detail.clone())
                };
                self.cleanup(Cause::Local(AbortReason::ResumeFailed), detail, after);
            }
            (S::Resuming, I::LinkLost) => {}
            (
                S::InDoubt,
                I::Received(Message::Resolve {
                    migration_id,
                    source,
                }),
            ) => {
                if self.id.is_empty() {
                    self.id = migration_id;
                }
                match source {
                    SourceView::CommitSent => self.resume(true),
                    SourceView::RolledBack => self.cleanup(
                        Cause::Resolution,
                        "resolved: the source rolled back".into(),
                        After::Resolved(DestView::AwaitingCommit, Resolution::RolledBack),
                    ),
                    SourceView::Unknown => self.send(Message::Resolved {
                        migration_id: self.id.clone(),
                        dest: DestView::AwaitingCommit,
                        outcome: Resolution::Undecided,
                    }),
                }
            }
            (S::InDoubt, I::Operator(Resolution::Committed)) => self.resume(false),
            (S::InDoubt, I::Operator(Resolution::RolledBack)) => self.cleanup(
                Cause::Operator,
                "resolved by an operator".into(),
                After::Nothing,
            ),
            (S::Idle | S::Done(_), I::Received(Message::Resolve { migration_id, .. })) => {
                let outcome = match self.view {
                    DestView::Committed => Resolution::Committed,
                    DestView::RolledBack => Resolution::RolledBack,
                    DestView::AwaitingCommit | DestView::Unknown => Resolution::Undecided,
                };
                self.send(Message::Resolved {
                    migration_id,
                    dest: self.view,
                    outcome,
                });
                if self.state == S::Idle {
                    self.state = S::Done(Outcome::RolledBack {
                        cause: Cause::Resolution,
                        detail: "no record of this migration".into(),
                        rollback_error: None,
                    });
                }
            }
            (S::CleaningUp, I::CleanedUp) => self.finish_cleanup(None),
            (S::CleaningUp, I::ActionFailed { detail }) => self.finish_cleanup(Some(detail)),
            (
                S::CleaningUp | S::Done(_) | S::InDoubt,
                I::Received(_) | I::LinkLost | I::FileFailed { .. },
            ) => {}
            (s, I::Received(Message::Abort { reason, detail }))
                if s.before_restored() || s == S::AwaitCommit =>
            {
                self.cleanup(Cause::Peer(reason), detail, After::Nothing)
            }
            (s, I::FileFailed { detail }) if s.before_restored() => {
                self.abort_local(AbortReason::BadFile, detail)
            }
            (s @ (S::ReceivingPresync | S::ReceivingFinal), I::ActionFailed { detail }) => {
                let _ = s;
                self.abort_local(AbortReason::TransferIncomplete, detail)
            }
            (S::Restoring, I::ActionFailed { detail }) => {
                self.abort_local(AbortReason::RestoreFailed, detail)
            }
            (s, I::Received(m)) if s.before_restored() || s == S::AwaitCommit => self.abort_local(
                AbortReason::ProtocolViolation,
                format!("unexpected {} while {}", m.name(), s.doing()),
            ),
            (s, I::LinkLost) if s.before_restored() => self.cleanup(
                Cause::LinkLost,
                "link lost before commit".into(),
                After::Nothing,
            ),
            (s, I::TimedOut) if s.before_restored() => self.abort_local(
                AbortReason::Timeout,
                format!("timed out while {}", s.doing()),
            ),
            (s, input) => {
                tracing::warn!(migration = %self.id, state = ?s, ?input, "input ignored in this state")
            }
        }
    }

    fn resume(&mut self, resolving: bool) {
        self.resolving = resolving;
        self.journal(JournalState::Committed);
        self.act(DestAction::Resume);
        self.state = DestState::Resuming;
    }

    /// Aborts on our own initiative before Commit: our copy (if any) is stopped, so the source
    /// may thaw at once; then clean up.
    fn abort_local(&mut self, reason: AbortReason, detail: String) {
        if self.state == DestState::Idle {
            self.send(Message::Abort {
                reason,
                detail: detail.clone(),
            });
            self.done_rolled_back(Cause::Local(reason), detail, None);
            return;
        }
        self.send(Message::Abort {
            reason,
            detail: detail.clone(),
        });
        self.cleanup(Cause::Local(reason), detail, After::Nothing);
    }

    fn cleanup(&mut self, cause: Cause, detail: String, after: After) {
        self.pending = Some((cause, detail, after));
        self.act(DestAction::Cleanup);
        self.state = DestState::CleaningUp;
    }

    fn finish_cleanup(&mut self, error: Option<String>) {
        let (cause, detail, after) =
            self.pending
                .take()
                .unwrap_or((Cause::LinkLost, String::new(), After::Nothing));
        let error = error.map(|e| format!("cleanup: {e}"));
        match (after, &error) {
            // Our copy may still exist after a failed resume: never tell the source to thaw.
            (After::Abort(..) | After::Resolved(..), Some(e)) => {
                self.journal(JournalState::RollbackFailed { detail: e.clone() });
                self.view = DestView::AwaitingCommit;
                self.state = DestState::InDoubt;
                return;
            }
            (After::Abort(reason, d), None) => self.send(Message::Abort { reason, detail: d }),
            (After::Resolved(view, outcome), None) => self.send(Message::Resolved {
                migration_id: self.id.clone(),
                dest: view,
                outcome,
            }),
            (After::Nothing, _) => {}
        }
        self.done_rolled_back(cause, detail, error);
    }

    fn done_rolled_back(&mut self, cause: Cause, detail: String, error: Option<String>) {
        self.journal(match &error {
            None => JournalState::RolledBack,
            Some(e) => JournalState::RollbackFailed { detail: e.clone() },
        });
        self.view = DestView::RolledBack;
        self.state = DestState::Done(Outcome::RolledBack {
            cause,
            detail,
            rollback_error: error,
        });
    }

    fn send(&mut self, m: Message) {
        self.out.push_back(Output::Send(m));
    }

    fn act(&mut self, a: DestAction) {
        self.out.push_back(Output::Do(a));
    }

    fn journal(&mut self, state: JournalState) {
        if self.id.is_empty() {
            return;
        }
        self.out.push_back(Output::Journal(JournalRecord {
            migration_id: self.id.clone(),
            role: Role::Dest,
            state,
        }));
    }
}

impl DestState {
    fn before_restored(&self) -> bool {
        use DestState as S;
        matches!(
            self,
            S::Idle
                | S::Checking
                | S::AwaitPresync
                | S::ReceivingPresync
                | S::AwaitFinal
                | S::ReceivingFinal
                | S::Restoring
        )
    }
}
