//! The destination driver: the control stream accepted, the first message awaited (answering link
//! probes), file streams accepted in a background task, and the destination machine run.

use super::{
    chain, done, linger, spawn_control_reader, DestHost, DestReport, DriverError, Progress,
    PROGRESS_EVERY,
};
use crate::protocol::{DestAction, DestInput, DestMachine, Output, Timeouts};
use crate::transport::files::receive_file;
use crate::transport::HostError;
use crate::wire::{read_frame, write_frame, FileHeader, Hello, Message, Phase, MAX_CONTROL_FRAME};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

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
        crate::transport::probe::MAX_PROBES
    } else {
        0
    };
    let first = first_message(&conn, &mut recv, timeouts.control, probes)
        .await?
        .ok_or(DriverError::NoMessage)?;
    if let Message::Locate { container_id } = first {
        // Protocol 1.7: a question, not a migration (an empty migration id in the report).
        let held = host.locate(&container_id);
        let answer = Message::Located { container_id, held };
        let sent = write_frame(&mut send, &answer, MAX_CONTROL_FRAME).await;
        linger(&mut send, sent.is_ok()).await;
        sent.map_err(|source| DriverError::SendMessage { source })?;
        return Ok(DestReport {
            migration_id: String::new(),
            outcome: None,
            in_doubt: false,
            peer,
        });
    }
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
    // The bytes the last phase event said.
    let mut said_bytes = 0u64;
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
                // Only when bytes arrived since the last event of the phase: the first tick
                // came at once and repeated it (QA of session 30, L5).
                let bytes = received();
                if let (Some(phase), true) = (ticking, bytes != said_bytes) {
                    said_bytes = bytes;
                    host.progress(machine.id(), Progress { phase, bytes, total: None });
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
                said_bytes = received();
                let p = Progress {
                    phase,
                    bytes: said_bytes,
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
/// probes the source opens are answered ([`crate::transport::probe::answer`]), one at a time. The read is
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
                match crate::transport::probe::answer(send, recv).await {
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
