//! Drivers: run a [`SourceMachine`] or a [`DestMachine`] over a QUIC connection, performing the
//! machine's actions through a host the agent implements ([`SourceHost`], [`DestHost`]).
//!
//! Connection layout: the source opens one bidirectional control stream and both sides send a
//! [`Hello`] first; then control [`Message`] frames. Files travel on unidirectional streams the
//! source opens ([`super::send_files_as`]: digests after the bytes with a 1.1 destination, in the
//! headers with a 1.0 one); the destination accepts them in a background task and
//! verifies each one ([`super::receive_file`]). Between the hellos and its first message a 1.2
//! source may measure the link on probe streams ([`super::probe`]; [`open_source`] then
//! [`run_source_on`]), which a 1.2 destination answers while it waits for that message.
//!
//! [`SourceMachine`]: crate::protocol::SourceMachine
//! [`DestMachine`]: crate::protocol::DestMachine

use super::files::{OutgoingFile, ReceivedFile, SentFile};
use super::HostError;
use crate::protocol::{DestInput, JournalRecord, JournalState, Outcome, SourceInput};
use crate::wire::{
    read_frame, FileHeader, Hello, Message, Phase, Prepare, RefuseReason, WireError,
    MAX_CONTROL_FRAME,
};
use mig_runtime::pidmap::PidEntry;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

mod dest;
mod source;

pub use dest::run_dest;
pub use source::{ask_resolution, locate, open_source, run_source, run_source_on, SourceLink};

/// Streams in flight when sending files.
pub const FILE_STREAMS: usize = 8;

/// How long to wait at the end for the last message to be acknowledged.
const LINGER: Duration = Duration::from_secs(5);

/// How often a host hears of the bytes moved during a file phase (at most 5 times a second).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Where a migration is, for progress displays: the phase that is now under way on this side
/// (`prepare`, `presync`, `freeze`, `dump`, `transfer`, `restore`, `commit`, `rollback`), the
/// bytes sent (source) or received (destination) since the start of the migration, and the
/// bytes expected by the end of this phase when known. Byte counts during a transfer come from
/// the connection's UDP counters (payload plus QUIC overhead, capped at the expected total).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: &'static str,
    pub bytes: u64,
    pub total: Option<u64>,
}

/// The source agent's side of a migration. One value per migration; every method is called from
/// the driver's task, one at a time, in the order the machine asks.
pub trait SourceHost: Send + Sync {
    /// Files for the presync phase: the blobs of `missing_layers` (kind `Layer`, remote path =
    /// digest) and a first copy of the writable layer (kind `Presync`).
    fn presync_files(
        &self,
        missing_layers: &[String],
    ) -> impl Future<Output = Result<Vec<OutgoingFile>, HostError>> + Send;
    /// Another batch of presync files, sent after everything before it in the presync
    /// (`round` counts the batches from 1), made while the container still runs: pre-copy's
    /// rounds of pre-dumped memory, each made once the one before is sent. `None` ends the
    /// presync. Default: none.
    fn presync_round(
        &self,
        _round: u32,
    ) -> impl Future<Output = Result<Option<Vec<OutgoingFile>>, HostError>> + Send {
        async { Ok(None) }
    }
    /// Right before [`SourceHost::freeze`], while the container still runs: last checks (a
    /// failure fails the freeze); not counted in the downtime.
    fn before_freeze(&self) -> impl Future<Output = Result<(), HostError>> + Send {
        async { Ok(()) }
    }
    /// Freezes the container (downtime starts).
    fn freeze(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Dumps the frozen container, leaving it frozen; returns the files of the final phase (the
    /// image set, kind `Image`, and the writable-layer delta, kind `Delta`).
    fn dump(&self) -> impl Future<Output = Result<Vec<OutgoingFile>, HostError>> + Send;
    /// Files that close `phase`, made from what was sent in it (`sent`: every file with the
    /// digest the destination checked it against) and sent after all of it, in the same phase:
    /// with a 1.1 destination, the image set's manifest built from the digests computed while
    /// sending. Default: none.
    fn closing_files(
        &self,
        _phase: Phase,
        _sent: &[SentFile],
    ) -> impl Future<Output = Result<Vec<OutgoingFile>, HostError>> + Send {
        async { Ok(Vec::new()) }
    }
    /// Thaws the container (must succeed as a no-op when it is not frozen).
    fn thaw(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Destroys the frozen source copy after Commit (idempotent).
    fn destroy(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Writes the journal record durably.
    fn journal(&self, record: &JournalRecord)
        -> impl Future<Output = Result<(), HostError>> + Send;
    /// The migration entered a phase or moved bytes (see [`Progress`]); must not block.
    fn progress(&self, _progress: Progress) {}
    /// The destination's hello, read before anything else is sent: what the peer's protocol
    /// version allows (a file layout, a record format) is decided from it.
    fn peer_hello(&self, _hello: &Hello) {}
}

/// Why the destination refuses a Prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefuseReason,
    pub detail: String,
}

/// The destination agent's side. Shared with the file-receiving tasks, hence `&self` and `Sync`.
pub trait DestHost: Send + Sync + 'static {
    /// Checks that this host can take the container; returns the layer digests it lacks.
    fn check(&self, prepare: &Prepare)
        -> impl Future<Output = Result<Vec<String>, Refusal>> + Send;
    /// Where to write an incoming file (its header is validated: relative, no `..`). Called
    /// from file tasks, possibly concurrently.
    fn place_file(&self, migration_id: &str, header: &FileHeader) -> Result<PathBuf, HostError>;
    /// Restores the container stopped (not running); returns its PID map.
    fn restore(
        &self,
        migration_id: &str,
    ) -> impl Future<Output = Result<Vec<PidEntry>, HostError>> + Send;
    /// Lets the restored container run (after Commit).
    fn resume(&self, migration_id: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Kills any restored copy and removes everything of this migration (idempotent).
    fn cleanup(&self, migration_id: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Writes the journal record durably.
    fn journal(&self, record: &JournalRecord)
        -> impl Future<Output = Result<(), HostError>> + Send;
    /// The last journal state of a migration (for a Resolve on a new connection).
    fn load_journal(&self, migration_id: &str)
        -> impl Future<Output = Option<JournalState>> + Send;
    /// Every file of `phase` arrived and was verified; the migration goes on when this returns
    /// (an error aborts it). The presync's writable layer is unpacked here, while the container
    /// still runs on the source.
    fn files_received(
        &self,
        _migration_id: &str,
        _phase: Phase,
    ) -> impl Future<Output = Result<(), HostError>> + Send {
        async { Ok(()) }
    }
    /// Migration `migration_id` entered a phase or received bytes (see [`Progress`]); must not
    /// block.
    fn progress(&self, _migration_id: &str, _progress: Progress) {}
    /// A file arrived and matched its digest, `file.header.sha256` (also when the digest came
    /// after the bytes); called from its file task before the driver counts it. Must not block.
    fn file_arrived(&self, _migration_id: &str, _file: &ReceivedFile) {}
    /// The source's hello on a new connection, read before its first message.
    fn peer_hello(&self, _hello: &Hello) {}
    /// The answer to a peer's [`Message::Locate`](crate::wire::Message::Locate): container
    /// `container_id`'s state here in words when this host holds it live, else `None`.
    fn locate(&self, _container_id: &str) -> Option<String> {
        None
    }
}

/// Why a driver could not run a migration at all (failures inside the migration end up in the
/// report's outcome instead).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot open the control stream")]
    OpenControl {
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("cannot accept the control stream")]
    AcceptControl {
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("cannot send hello")]
    SendHello {
        #[source]
        source: WireError,
    },
    #[error("peer hello refused")]
    Hello {
        #[source]
        source: WireError,
    },
    #[error("cannot read the first message")]
    FirstMessage {
        #[source]
        source: WireError,
    },
    #[error("the peer closed the control stream before its first message")]
    NoMessage,
    #[error("timed out waiting for the first message")]
    FirstMessageTimeout,
    #[error("cannot send the question")]
    SendMessage {
        #[source]
        source: WireError,
    },
    #[error("no answer to the question")]
    NoAnswer {
        #[source]
        source: WireError,
    },
    #[error("the peer answered {got} to the question")]
    WrongAnswer { got: &'static str },
    #[error("no answer within {0:?}")]
    AnswerTimeout(Duration),
}

/// What a peer said to [`locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// It holds the container live; its state there in words.
    Held(String),
    /// It holds no live copy.
    NotHeld,
    /// Its protocol is older than 1.7: it cannot be asked.
    CannotTell,
}

/// Phase timings measured by the source driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub presync: Duration,
    pub freeze: Duration,
    pub dump: Duration,
    /// Sending the final files.
    pub transfer: Duration,
    /// From the final TransferDone to Restored (receiving the tail, verifying, restoring).
    pub restore: Duration,
    /// From the start of the freeze to Committed.
    pub downtime: Duration,
    pub total: Duration,
}

/// What the source driver reports.
#[derive(Debug, Clone)]
pub struct SourceReport {
    pub migration_id: String,
    /// `None` when the migration is in doubt (see [`SourceReport::in_doubt`]).
    pub outcome: Option<Outcome>,
    pub in_doubt: bool,
    pub dest_pid_map: Vec<PidEntry>,
    pub files_sent: u32,
    pub bytes_sent: u64,
    pub timings: Timings,
    /// The destination agent's hello.
    pub peer: Hello,
    /// A rolled-back migration's Resolve: the destination's answer, `None` when none came
    /// ([`SourceMachine::notice_answer`](crate::protocol::SourceMachine::notice_answer)).
    pub notice_answer: Option<crate::wire::Resolution>,
}

/// What the destination driver reports.
#[derive(Debug, Clone)]
pub struct DestReport {
    pub migration_id: String,
    pub outcome: Option<Outcome>,
    pub in_doubt: bool,
    pub peer: Hello,
}

/// A host error and its sources as one line.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads control messages into a channel (cancel-safe for `select!`); `None` = link lost.
fn spawn_control_reader(mut recv: quinn::RecvStream) -> mpsc::Receiver<Option<Message>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match read_frame::<Message, _>(&mut recv, MAX_CONTROL_FRAME).await {
                Ok(Some(m)) => {
                    if tx.send(Some(m)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) if closed_on_purpose(&e) => {
                    // This side's own close at the end, or the peer's ("done"): the machine
                    // has its outcome (QA: a warning after almost every move).
                    tracing::debug!(error = %chain(&e), "control stream closed");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "control stream failed");
                    break;
                }
            }
        }
        let _ = tx.send(None).await;
    });
    rx
}

/// Whether a read failed because the connection was closed by this side, or by the peer with
/// code 0 (an agent closes its connections so when a migration ends), not lost.
fn closed_on_purpose(e: &WireError) -> bool {
    let WireError::Read { source } = e else {
        return false;
    };
    let Some(quinn::ReadError::ConnectionLost(lost)) = source
        .get_ref()
        .and_then(|r| r.downcast_ref::<quinn::ReadError>())
    else {
        return false;
    };
    match lost {
        quinn::ConnectionError::LocallyClosed => true,
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code == quinn::VarInt::from_u32(0),
        _ => false,
    }
}

fn done<I>(r: Result<(), HostError>, ok: I) -> I
where
    I: From<FailedAction>,
{
    match r {
        Ok(()) => ok,
        Err(e) => I::from(FailedAction(chain(e.as_ref()))),
    }
}

/// A failed host action, converted into the machine's input.
struct FailedAction(String);

impl From<FailedAction> for SourceInput {
    fn from(f: FailedAction) -> SourceInput {
        SourceInput::ActionFailed { detail: f.0 }
    }
}

impl From<FailedAction> for DestInput {
    fn from(f: FailedAction) -> DestInput {
        DestInput::ActionFailed { detail: f.0 }
    }
}

/// Finishes our side of the control stream and waits (bounded) until the peer acknowledged it,
/// so the last message is not lost when the connection closes.
async fn linger(send: &mut quinn::SendStream, link_up: bool) {
    if !link_up {
        return;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, send.stopped()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_error(lost: quinn::ConnectionError) -> WireError {
        WireError::Read {
            source: std::io::Error::from(quinn::ReadError::ConnectionLost(lost)),
        }
    }

    #[test]
    fn a_close_at_the_end_is_not_a_failure() {
        assert!(closed_on_purpose(&read_error(
            quinn::ConnectionError::LocallyClosed
        )));
        assert!(!closed_on_purpose(&read_error(
            quinn::ConnectionError::TimedOut
        )));
        assert!(!closed_on_purpose(&WireError::Read {
            source: std::io::Error::other("boom")
        }));
    }
}
