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

use super::files::{receive_file, send_files_as, OutgoingFile, ReceivedFile, SentFile};
use super::HostError;
use crate::protocol::{
    DestAction, DestInput, DestMachine, JournalRecord, JournalState, Outcome, Output, SourceAction,
    SourceInput, SourceMachine, SourceState, Timeouts,
};
use crate::wire::{
    read_frame, write_frame, DigestAt, FileHeader, Hello, Message, Phase, Prepare, RefuseReason,
    WireError, MAX_CONTROL_FRAME,
};
use mig_runtime::pidmap::PidEntry;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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

/// Runs the source side over `conn` (a connection to the destination). A fresh machine is
/// started; a machine recovered in doubt (or rolled back) runs the Resolve exchange.
pub async fn run_source<H: SourceHost>(
    conn: &quinn::Connection,
    machine: SourceMachine,
    host: &H,
    hello: &Hello,
) -> Result<SourceReport, DriverError> {
    let link = open_source(conn, hello).await?;
    run_source_on(conn, link, machine, host).await
}

/// The control stream of a source's connection after the hello exchange, before its first
/// message: what the destination speaks is known ([`SourceLink::peer`]) and the link may be
/// measured ([`super::probe::probe`], with a 1.2 destination) before the machine starts.
pub struct SourceLink {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The destination's hello.
    pub peer: Hello,
    opened: Instant,
}

/// Opens the control stream and exchanges hellos (the first part of [`run_source`]).
pub async fn open_source(
    conn: &quinn::Connection,
    hello: &Hello,
) -> Result<SourceLink, DriverError> {
    let opened = Instant::now();
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|source| DriverError::OpenControl { source })?;
    write_frame(&mut send, hello, MAX_CONTROL_FRAME)
        .await
        .map_err(|source| DriverError::SendHello { source })?;
    let peer = Hello::read(&mut recv)
        .await
        .map_err(|source| DriverError::Hello { source })?;
    Ok(SourceLink {
        send,
        recv,
        peer,
        opened,
    })
}

/// Runs the source machine on a control stream opened by [`open_source`] (the rest of
/// [`run_source`]).
pub async fn run_source_on<H: SourceHost>(
    conn: &quinn::Connection,
    link: SourceLink,
    mut machine: SourceMachine,
    host: &H,
) -> Result<SourceReport, DriverError> {
    let SourceLink {
        mut send,
        recv,
        peer,
        opened: t0,
    } = link;
    host.peer_hello(&peer);
    // A 1.1 destination takes file digests after the bytes: computed while sending.
    let digests = if peer.protocol_version.minor >= 1 {
        DigestAt::Trailer
    } else {
        DigestAt::Header
    };
    let mut ctrl = spawn_control_reader(recv);
    if *machine.state() == SourceState::Idle {
        machine.start();
        host.progress(Progress {
            phase: "prepare",
            bytes: 0,
            total: None,
        });
    } else {
        machine.handle(SourceInput::Reconnected);
    }
    let mut link_up = true;
    let mut final_files = Vec::new();
    let mut t = Timings::default();
    let (mut files_sent, mut bytes_sent) = (0u32, 0u64);
    let mut freeze_start = None;
    let mut final_done_at = None;
    loop {
        while let Some(out) = machine.poll_output() {
            match out {
                Output::Send(m) => {
                    if !link_up {
                        continue;
                    }
                    if let Message::TransferDone {
                        phase: Phase::Final,
                        ..
                    } = m
                    {
                        final_done_at = Some(Instant::now());
                        host.progress(Progress {
                            phase: "restore",
                            bytes: bytes_sent,
                            total: Some(bytes_sent),
                        });
                    }
                    if let Message::Commit = m {
                        host.progress(Progress {
                            phase: "commit",
                            bytes: bytes_sent,
                            total: Some(bytes_sent),
                        });
                    }
                    if let Err(e) = write_frame(&mut send, &m, MAX_CONTROL_FRAME).await {
                        tracing::warn!(message = m.name(), error = %chain(&e), "send failed");
                        link_up = false;
                        machine.handle(SourceInput::LinkLost);
                    }
                }
                Output::Journal(r) => {
                    if let Err(e) = host.journal(&r).await {
                        machine.handle(SourceInput::JournalFailed {
                            detail: chain(e.as_ref()),
                        });
                    }
                }
                Output::Do(action) => {
                    let start = Instant::now();
                    let input = match action {
                        SourceAction::SendFiles {
                            phase,
                            missing_layers,
                        } => {
                            let files = match phase {
                                Phase::Presync => host.presync_files(&missing_layers).await,
                                Phase::Final => Ok(std::mem::take(&mut final_files)),
                            };
                            let sent = match files {
                                Ok(files) => {
                                    let name = match phase {
                                        Phase::Presync => "presync",
                                        Phase::Final => "transfer",
                                    };
                                    let sent = send_with_progress(
                                        conn, files, host, name, bytes_sent, digests,
                                    )
                                    .await
                                    .map_err(|e| chain(&e));
                                    match sent {
                                        Ok((s, sent)) => {
                                            match close_phase(conn, host, phase, s, &sent, digests)
                                                .await
                                            {
                                                Ok(s) if phase == Phase::Presync => {
                                                    presync_rounds(
                                                        conn, host, s, bytes_sent, digests,
                                                    )
                                                    .await
                                                }
                                                r => r,
                                            }
                                        }
                                        Err(e) => Err(e),
                                    }
                                }
                                Err(e) => Err(chain(e.as_ref())),
                            };
                            match phase {
                                Phase::Presync => t.presync = start.elapsed(),
                                Phase::Final => t.transfer = start.elapsed(),
                            }
                            match sent {
                                Ok(s) => {
                                    files_sent += s.files;
                                    bytes_sent += s.bytes;
                                    SourceInput::FilesSent {
                                        phase,
                                        files: s.files,
                                        bytes: s.bytes,
                                    }
                                }
                                Err(detail) => SourceInput::ActionFailed { detail },
                            }
                        }
                        SourceAction::Freeze => {
                            host.progress(Progress {
                                phase: "freeze",
                                bytes: bytes_sent,
                                total: None,
                            });
                            freeze_start = Some(start);
                            let r = host.freeze().await;
                            t.freeze = start.elapsed();
                            done(r, SourceInput::Frozen)
                        }
                        SourceAction::Dump => {
                            host.progress(Progress {
                                phase: "dump",
                                bytes: bytes_sent,
                                total: None,
                            });
                            let r = host.dump().await;
                            t.dump = start.elapsed();
                            match r {
                                Ok(files) => {
                                    final_files = files;
                                    SourceInput::Dumped
                                }
                                Err(e) => SourceInput::ActionFailed {
                                    detail: chain(e.as_ref()),
                                },
                            }
                        }
                        SourceAction::Thaw => {
                            host.progress(Progress {
                                phase: "rollback",
                                bytes: bytes_sent,
                                total: None,
                            });
                            done(host.thaw().await, SourceInput::Thawed)
                        }
                        SourceAction::DestroySource => {
                            done(host.destroy().await, SourceInput::Destroyed)
                        }
                    };
                    machine.handle(input);
                }
            }
        }
        if machine.is_finished() {
            break;
        }
        let wait = machine.timeout().unwrap_or(Duration::from_secs(3600));
        let input = tokio::select! {
            m = ctrl.recv(), if link_up => match m {
                Some(Some(m)) => SourceInput::Received(m),
                _ => {
                    link_up = false;
                    SourceInput::LinkLost
                }
            },
            _ = tokio::time::sleep(wait) => SourceInput::TimedOut,
        };
        if let SourceInput::Received(m) = &input {
            match m {
                Message::Restored { .. } => {
                    if let Some(at) = final_done_at {
                        t.restore = at.elapsed();
                    }
                }
                Message::Committed => {
                    if let Some(at) = freeze_start {
                        t.downtime = at.elapsed();
                    }
                }
                _ => {}
            }
        }
        machine.handle(input);
    }
    linger(&mut send, link_up).await;
    t.total = t0.elapsed();
    Ok(SourceReport {
        migration_id: machine.id().to_string(),
        outcome: machine.outcome().cloned(),
        in_doubt: *machine.state() == SourceState::InDoubt,
        dest_pid_map: machine.dest_pid_map().to_vec(),
        files_sent,
        bytes_sent,
        timings: t,
        peer,
    })
}

/// Sends the host's further presync batches ([`SourceHost::presync_round`]) one after the
/// other until it has none; returns the presync's totals with them.
async fn presync_rounds<H: SourceHost>(
    conn: &quinn::Connection,
    host: &H,
    mut stats: super::TransferStats,
    before: u64,
    at: DigestAt,
) -> Result<super::TransferStats, String> {
    let mut round = 1;
    while let Some(files) = host
        .presync_round(round)
        .await
        .map_err(|e| chain(e.as_ref()))?
    {
        let (more, _) = send_with_progress(conn, files, host, "presync", before + stats.bytes, at)
            .await
            .map_err(|e| chain(&e))?;
        stats.files += more.files;
        stats.bytes += more.bytes;
        round += 1;
    }
    Ok(stats)
}

/// Sends the files the host makes from what was sent in `phase`
/// ([`SourceHost::closing_files`]), after all of it; returns the phase's totals.
async fn close_phase<H: SourceHost>(
    conn: &quinn::Connection,
    host: &H,
    phase: Phase,
    mut stats: super::TransferStats,
    sent: &[SentFile],
    at: DigestAt,
) -> Result<super::TransferStats, String> {
    let files = host
        .closing_files(phase, sent)
        .await
        .map_err(|e| chain(e.as_ref()))?;
    if files.is_empty() {
        return Ok(stats);
    }
    let (more, _) = send_files_as(conn, files, FILE_STREAMS, at)
        .await
        .map_err(|e| chain(&e))?;
    stats.files += more.files;
    stats.bytes += more.bytes;
    Ok(stats)
}

/// Sends `files` (see [`send_files_as`]) and tells the host how far it got every
/// [`PROGRESS_EVERY`]; `before` is what the migration sent before this phase.
async fn send_with_progress<H: SourceHost>(
    conn: &quinn::Connection,
    files: Vec<OutgoingFile>,
    host: &H,
    phase: &'static str,
    before: u64,
    at: DigestAt,
) -> Result<(super::TransferStats, Vec<SentFile>), super::FileError> {
    let size: u64 = files
        .iter()
        .map(|f| std::fs::metadata(&f.local).map(|m| m.len()).unwrap_or(0))
        .sum();
    let total = Some(before + size);
    host.progress(Progress {
        phase,
        bytes: before,
        total,
    });
    let base = conn.stats().udp_tx.bytes;
    let send = send_files_as(conn, files, FILE_STREAMS, at);
    tokio::pin!(send);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut send => return r,
            _ = tick.tick() => {
                let moved = conn.stats().udp_tx.bytes.saturating_sub(base).min(size);
                host.progress(Progress { phase, bytes: before + moved, total });
            }
        }
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

enum FileEvent {
    Ok { phase: Phase, bytes: u64 },
    Failed { detail: String },
}

/// Why a file task did not place a file.
#[derive(Debug, thiserror::Error)]
enum PlaceError {
    #[error("migration {id} was cancelled: no more files are placed")]
    Cancelled { id: String },
}

/// The task accepting a migration's file streams and running one task per file.
struct Acceptor {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Set once the migration is cancelled: file tasks refuse to place a file from then on.
    cancelled: Arc<AtomicBool>,
}

impl Acceptor {
    /// Stops accepting files and waits until every file task has ended: placing a file is
    /// refused from now on, the tasks under way are aborted and joined. A cleanup that follows
    /// cannot race a task that re-creates what it removes.
    async fn stop(self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            if e.is_panic() {
                tracing::warn!(error = %e, "the file acceptor panicked");
            }
        }
    }
}

/// Accepts file streams until stopped (see [`Acceptor::stop`]; dropping the acceptor stops it
/// too, without waiting).
fn spawn_file_acceptor<H: DestHost>(
    conn: quinn::Connection,
    host: Arc<H>,
    id: String,
    events: mpsc::Sender<FileEvent>,
) -> Acceptor {
    let cancelled = Arc::new(AtomicBool::new(false));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let flag = cancelled.clone();
    let task = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        let mut accepting = true;
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                r = conn.accept_uni(), if accepting => {
                    let Ok(recv) = r else {
                        // The connection is gone: the tasks under way end on their own.
                        accepting = false;
                        continue;
                    };
                    let (host, id, events, flag) =
                        (host.clone(), id.clone(), events.clone(), flag.clone());
                    tasks.spawn(async move {
                        let place = |h: &FileHeader| {
                            if flag.load(Ordering::SeqCst) {
                                return Err(Box::new(PlaceError::Cancelled { id: id.clone() })
                                    as HostError);
                            }
                            host.place_file(&id, h)
                        };
                        let ev = match receive_file(recv, place).await {
                            Ok(f) => {
                                host.file_arrived(&id, &f);
                                FileEvent::Ok { phase: f.header.kind.phase(), bytes: f.header.size }
                            }
                            Err(e) => FileEvent::Failed { detail: chain(&e) },
                        };
                        let _ = events.send(ev).await;
                    });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        // Aborted tasks stop at their next await point; join them all so none is still running
        // (placing a file) when this task ends.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    });
    Acceptor {
        task,
        stop,
        cancelled,
    }
}

/// Runs the destination side on an accepted connection: a Prepare starts a new migration, a
/// Resolve is answered from the journal.
pub async fn run_dest<H: DestHost>(
    conn: quinn::Connection,
    host: Arc<H>,
    hello: &Hello,
    timeouts: Timeouts,
) -> Result<DestReport, DriverError> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|source| DriverError::AcceptControl { source })?;
    let peer = Hello::read(&mut recv).await;
    // Answer even a refused hello so the peer can report both versions.
    write_frame(&mut send, hello, MAX_CONTROL_FRAME)
        .await
        .map_err(|source| DriverError::SendHello { source })?;
    let peer = match peer {
        Ok(p) => p,
        Err(source) => {
            linger(&mut send, true).await;
            return Err(DriverError::Hello { source });
        }
    };
    host.peer_hello(&peer);
    // Protocol 1.2: the source may probe the link before its first message (both must speak it).
    let probes = if peer.protocol_version.minor >= 2 && hello.protocol_version.minor >= 2 {
        super::probe::MAX_PROBES
    } else {
        0
    };
    let first = first_message(&conn, &mut recv, timeouts.control, probes)
        .await?
        .ok_or(DriverError::NoMessage)?;
    let mut machine = match &first {
        Message::Resolve { migration_id, .. } => {
            let last = host.load_journal(migration_id).await;
            DestMachine::recover(migration_id, last.as_ref(), timeouts)
        }
        _ => DestMachine::new(timeouts),
    };
    let mut ctrl = spawn_control_reader(recv);
    machine.handle(DestInput::Received(first));
    let (file_tx, mut file_rx) = mpsc::channel(64);
    let mut acceptor: Option<Acceptor> = None;
    let mut counts: HashMap<Phase, (u32, u64)> = HashMap::new();
    let mut awaiting: Option<(Phase, u32, u64)> = None;
    let mut link_up = true;
    // Progress: the received bytes count from the Prepare; `ticking` is the file phase under way.
    let rx_base = conn.stats().udp_rx.bytes;
    let received = || conn.stats().udp_rx.bytes.saturating_sub(rx_base);
    let mut ticking: Option<&'static str> = None;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while let Some(out) = machine.poll_output() {
            let id = machine.id().to_string();
            match out {
                Output::Send(m) => {
                    if !link_up {
                        continue;
                    }
                    if let Err(e) = write_frame(&mut send, &m, MAX_CONTROL_FRAME).await {
                        tracing::warn!(message = m.name(), error = %chain(&e), "send failed");
                        link_up = false;
                        machine.handle(DestInput::LinkLost);
                    }
                }
                Output::Journal(r) => {
                    if let Err(e) = host.journal(&r).await {
                        machine.handle(DestInput::JournalFailed {
                            detail: chain(e.as_ref()),
                        });
                    }
                }
                Output::Do(DestAction::CheckPrepare(p)) => {
                    let r = host.check(&p).await;
                    if r.is_ok() {
                        // Accepted (the host knows the migration from now on).
                        for phase in ["prepare", "presync"] {
                            let p = Progress {
                                phase,
                                bytes: 0,
                                total: None,
                            };
                            host.progress(&id, p);
                        }
                        ticking = Some("presync");
                    }
                    if r.is_ok() && acceptor.is_none() {
                        acceptor = Some(spawn_file_acceptor(
                            conn.clone(),
                            host.clone(),
                            id,
                            file_tx.clone(),
                        ));
                    }
                    machine.handle(DestInput::PrepareChecked(
                        r.map_err(|r| (r.reason, r.detail)),
                    ));
                }
                Output::Do(DestAction::AwaitFiles {
                    phase,
                    files,
                    bytes,
                }) => {
                    awaiting = Some((phase, files, bytes));
                    if let Some(i) = files_ready(&mut awaiting, &counts) {
                        let i = after_files(host.as_ref(), &id, i).await;
                        machine.handle(i);
                    }
                }
                Output::Do(DestAction::Restore) => {
                    ticking = None;
                    host.progress(
                        &id,
                        Progress {
                            phase: "restore",
                            bytes: received(),
                            total: None,
                        },
                    );
                    let input = match host.restore(&id).await {
                        Ok(pid_map) => DestInput::Restored { pid_map },
                        Err(e) => DestInput::ActionFailed {
                            detail: chain(e.as_ref()),
                        },
                    };
                    machine.handle(input);
                }
                Output::Do(DestAction::Resume) => {
                    machine.handle(done(host.resume(&id).await, DestInput::Resumed))
                }
                Output::Do(DestAction::Cleanup) => {
                    ticking = None;
                    host.progress(
                        &id,
                        Progress {
                            phase: "rollback",
                            bytes: received(),
                            total: None,
                        },
                    );
                    // Every file task has ended before the cleanup removes what they placed.
                    if let Some(a) = acceptor.take() {
                        a.stop().await;
                    }
                    machine.handle(done(host.cleanup(&id).await, DestInput::CleanedUp))
                }
            }
        }
        if machine.is_finished() {
            break;
        }
        let wait = machine.timeout().unwrap_or(Duration::from_secs(3600));
        let input = tokio::select! {
            m = ctrl.recv(), if link_up => match m {
                Some(Some(m)) => DestInput::Received(m),
                _ => {
                    link_up = false;
                    DestInput::LinkLost
                }
            },
            ev = file_rx.recv() => match ev {
                Some(FileEvent::Ok { phase, bytes }) => {
                    let c = counts.entry(phase).or_default();
                    c.0 += 1;
                    c.1 += bytes;
                    match files_ready(&mut awaiting, &counts) {
                        Some(i) => after_files(host.as_ref(), machine.id(), i).await,
                        None => continue,
                    }
                }
                Some(FileEvent::Failed { detail }) => DestInput::FileFailed { detail },
                None => continue,
            },
            _ = tick.tick(), if ticking.is_some() => {
                if let Some(phase) = ticking {
                    let p = Progress { phase, bytes: received(), total: None };
                    host.progress(machine.id(), p);
                }
                continue;
            }
            _ = tokio::time::sleep(wait) => DestInput::TimedOut,
        };
        if let DestInput::Received(m) = &input {
            let phase = match m {
                // The source is frozen and dumping.
                Message::Frozen => Some("dump"),
                Message::DumpDone => Some("transfer"),
                Message::Commit => Some("commit"),
                _ => None,
            };
            if let Some(phase) = phase {
                ticking = (phase == "transfer").then_some(phase);
                let p = Progress {
                    phase,
                    bytes: received(),
                    total: None,
                };
                host.progress(machine.id(), p);
            }
        }
        machine.handle(input);
    }
    if let Some(a) = acceptor.take() {
        a.stop().await;
    }
    linger(&mut send, link_up).await;
    Ok(DestReport {
        migration_id: machine.id().to_string(),
        outcome: machine.outcome().cloned(),
        in_doubt: *machine.state() == crate::protocol::DestState::InDoubt,
        peer,
    })
}

/// The source's first control message, read within `timeout`; meanwhile up to `probes` link
/// probes the source opens are answered ([`super::probe::answer`]), one at a time. The read is
/// never cancelled half-way (it stays pinned while a probe is answered).
async fn first_message(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    timeout: Duration,
    mut probes: u32,
) -> Result<Option<Message>, DriverError> {
    let read = read_frame::<Message, _>(recv, MAX_CONTROL_FRAME);
    tokio::pin!(read);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = &mut read => return r.map_err(|source| DriverError::FirstMessage { source }),
            s = conn.accept_bi(), if probes > 0 => {
                probes -= 1;
                let Ok((send, recv)) = s else { continue };
                match super::probe::answer(send, recv).await {
                    Ok(r) => tracing::debug!(bytes = r.bytes, micros = r.micros, "answered a link probe"),
                    Err(e) => tracing::warn!(error = %chain(&e), "link probe failed"),
                }
            }
            _ = &mut deadline => return Err(DriverError::FirstMessageTimeout),
        }
    }
}

/// Lets the host act on a complete phase ([`DestHost::files_received`]) before the machine
/// hears of it.
async fn after_files<H: DestHost>(host: &H, id: &str, input: DestInput) -> DestInput {
    let DestInput::FilesReceived { phase } = input else {
        return input;
    };
    match host.files_received(id, phase).await {
        Ok(()) => input,
        Err(e) => DestInput::ActionFailed {
            detail: chain(e.as_ref()),
        },
    }
}

/// The input that ends an [`DestAction::AwaitFiles`] once enough files of its phase arrived.
fn files_ready(
    awaiting: &mut Option<(Phase, u32, u64)>,
    counts: &HashMap<Phase, (u32, u64)>,
) -> Option<DestInput> {
    let (phase, files, bytes) = (*awaiting)?;
    let (got_files, got_bytes) = counts.get(&phase).copied().unwrap_or_default();
    if got_files < files {
        return None;
    }
    *awaiting = None;
    if got_files != files || got_bytes != bytes {
        return Some(DestInput::ActionFailed {
            detail: format!(
                "received {got_files} files, {got_bytes} bytes; sender announced {files} files, {bytes} bytes"
            ),
        });
    }
    Some(DestInput::FilesReceived { phase })
}
