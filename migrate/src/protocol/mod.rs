//! The migration as two state machines without I/O, in the style of quinn-proto: a
//! [`SourceMachine`] and a [`DestMachine`] take inputs (a message from the peer, the result of a
//! local action, a timeout, the loss of the link) through `handle` and queue outputs (messages to
//! send, actions for the host, journal records) that the caller drains with `poll_output`, in
//! order. A caller must stop draining when executing an output fails and feed that failure back
//! first (the machine drops the rest of its queue): that is how "journal `CommitSent`, then send
//! `Commit`" never sends Commit when the journal write failed.
//!
//! The invariant is exactly one live copy of the container:
//! - before Commit, any failure thaws the source and cleans the destination;
//! - the destination's copy is restored stopped and runs only after it receives Commit;
//! - if the link is lost between the source sending Commit and receiving Committed, or while the
//!   destination waits for Commit, both sides go `InDoubt`: neither runs nor discards its copy
//!   until a Resolve exchange on a new connection (or an operator) decides.
//!
//! See `docs/protocol.md` for the full transition tables.

mod dest;
mod source;
#[cfg(test)]
mod tests;

pub use dest::{DestAction, DestInput, DestMachine, DestState};
pub use source::{SourceAction, SourceInput, SourceMachine, SourceState};

use crate::wire::{AbortReason, Message, RefuseReason};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Which side of a migration a journal record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Source,
    Dest,
}

/// What each side writes durably before the step it names, so that a restarted agent resumes or
/// rolls back the same way (see [`SourceMachine::recover`] and [`DestMachine::recover`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum JournalState {
    /// Both: started, nothing irreversible (source running; destination may hold files).
    Preparing,
    /// Source: about to freeze (a restart thaws).
    Frozen,
    /// Destination: restored, stopped, waiting for Commit (a restart is in doubt).
    Restored,
    /// Source: about to send Commit (a restart is in doubt).
    CommitSent,
    /// Both: the link was lost in the commit window; a Resolve or an operator decides.
    InDoubt,
    /// Both: the container runs on the destination (source: its copy is being destroyed).
    Committed,
    /// Both: the container runs on the source; the destination has no copy.
    RolledBack,
    /// The rollback itself failed: an operator must look (the detail says what failed).
    RollbackFailed { detail: String },
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalRecord {
    pub migration_id: String,
    pub role: Role,
    pub state: JournalState,
}

/// How long each side waits for the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For short answers (prepare check, commit, resolve).
    pub control: Duration,
    /// For answers that wait on a transfer or a restore.
    pub transfer: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            control: Duration::from_secs(30),
            transfer: Duration::from_secs(600),
        }
    }
}

/// Why a migration ended rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The destination refused the Prepare.
    Refused(RefuseReason),
    /// This side aborted.
    Local(AbortReason),
    /// The peer aborted.
    Peer(AbortReason),
    /// The link was lost before Commit.
    LinkLost,
    /// A Resolve exchange decided.
    Resolution,
    /// An operator decided.
    Operator,
}

/// How a migration ended on one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The container runs on the destination. `cleanup_error` is set when the source could not
    /// destroy its frozen copy (it stays frozen; nothing runs twice).
    Committed { cleanup_error: Option<String> },
    /// The container runs on the source. `rollback_error` is set when thawing the source or
    /// cleaning the destination failed too (reported with the primary cause).
    RolledBack {
        cause: Cause,
        detail: String,
        rollback_error: Option<String>,
    },
}

/// What a machine asks its caller to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<A> {
    /// Send this message on the control stream.
    Send(Message),
    /// Perform this local action and feed its result back as an input.
    Do(A),
    /// Write this record durably before executing the next output.
    Journal(JournalRecord),
}
