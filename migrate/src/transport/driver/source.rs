//! The source driver: the control stream opened and hellos exchanged ([`open_source`]), then the
//! source machine run ([`run_source_on`]), with the files of each phase sent and progress told.

use super::{
    chain, done, linger, spawn_control_reader, DriverError, Located, Progress, SourceHost,
    SourceReport, Timings, FILE_STREAMS, PROGRESS_EVERY,
};
use crate::protocol::{Output, SourceAction, SourceInput, SourceMachine, SourceState};
use crate::transport::files::{send_files_as, OutgoingFile, SentFile};
use crate::wire::{
    read_frame, write_frame, DestView, DigestAt, Hello, Message, Phase, Resolution, SourceView,
    MAX_CONTROL_FRAME,
};
use std::time::{Duration, Instant};

/// How long a source whose file the destination stopped waits for the destination's Abort,
/// which says why.
const PEER_REASON_WAIT: Duration = Duration::from_secs(2);

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
/// measured ([`crate::transport::probe::probe`], with a 1.2 destination) before the machine starts.
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

/// Asks the peer at the other end of `conn` whether it holds container `container_id` live
/// (protocol 1.7, [`Message::Locate`](crate::wire::Message::Locate)), within `limit`.
pub async fn locate(
    conn: &quinn::Connection,
    hello: &Hello,
    container_id: &str,
    limit: Duration,
) -> Result<Located, DriverError> {
    let q = Message::Locate {
        container_id: container_id.to_owned(),
    };
    match ask_once(conn, hello, q, 7, limit).await? {
        None => Ok(Located::CannotTell),
        Some(Message::Located {
            container_id: id,
            held,
        }) if id == container_id => Ok(held.map_or(Located::NotHeld, Located::Held)),
        Some(other) => Err(DriverError::WrongAnswer { got: other.name() }),
    }
}

/// Asks the destination at the other end of `conn` how migration `migration_id` stands there,
/// within `limit`: a Resolve whose source view is [`SourceView::Unknown`], a question that
/// changes nothing there (every 1.x destination answers it from its journal, `Undecided` for a
/// move in doubt or one it has no record of).
pub async fn ask_resolution(
    conn: &quinn::Connection,
    hello: &Hello,
    migration_id: &str,
    limit: Duration,
) -> Result<(DestView, Resolution), DriverError> {
    let q = Message::Resolve {
        migration_id: migration_id.to_owned(),
        source: SourceView::Unknown,
    };
    match ask_once(conn, hello, q, 0, limit).await? {
        Some(Message::Resolved {
            migration_id: id,
            dest,
            outcome,
        }) if id == migration_id => Ok((dest, outcome)),
        Some(other) => Err(DriverError::WrongAnswer { got: other.name() }),
        None => Err(DriverError::WrongAnswer { got: "nothing" }),
    }
}

/// Sends question `q` as the first message of a new control stream on `conn` and reads the one
/// answer, within `limit`; `None` when the peer's protocol is older than 1.`min_minor`.
async fn ask_once(
    conn: &quinn::Connection,
    hello: &Hello,
    q: Message,
    min_minor: u16,
    limit: Duration,
) -> Result<Option<Message>, DriverError> {
    let ask = async {
        let SourceLink {
            mut send,
            mut recv,
            peer,
            ..
        } = open_source(conn, hello).await?;
        if peer.protocol_version.minor < min_minor {
            linger(&mut send, true).await;
            return Ok(None);
        }
        write_frame(&mut send, &q, MAX_CONTROL_FRAME)
            .await
            .map_err(|source| DriverError::SendMessage { source })?;
        let answer: Option<Message> = read_frame(&mut recv, MAX_CONTROL_FRAME)
            .await
            .map_err(|source| DriverError::NoAnswer { source })?;
        let _ = send.finish();
        answer
            .map(Some)
            .ok_or(DriverError::WrongAnswer { got: "nothing" })
    };
    tokio::time::timeout(limit, ask)
        .await
        .map_err(|_| DriverError::AnswerTimeout(limit))?
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
                            // The destination stopped a file's stream (it refused the file).
                            let mut stopped = false;
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
                                    .map_err(|e| {
                                        stopped = e.stopped_by_peer();
                                        chain(&e)
                                    });
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
                                // The destination stopped a file: its Abort, sent right
                                // after, says why (a limit, a full disk) where the stop says
                                // only "stopped by peer" (QA of session 24).
                                Err(detail) if stopped && link_up => {
                                    match tokio::time::timeout(PEER_REASON_WAIT, ctrl.recv()).await
                                    {
                                        Ok(Some(Some(m @ Message::Abort { .. }))) => {
                                            SourceInput::Received(m)
                                        }
                                        Ok(Some(Some(m))) => {
                                            machine.handle(SourceInput::ActionFailed { detail });
                                            SourceInput::Received(m)
                                        }
                                        Ok(Some(None) | None) => {
                                            link_up = false;
                                            machine.handle(SourceInput::ActionFailed { detail });
                                            SourceInput::LinkLost
                                        }
                                        Err(_) => SourceInput::ActionFailed { detail },
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
                            // The checks before the freeze run while the container runs.
                            let r = match host.before_freeze().await {
                                Ok(()) => {
                                    let start = Instant::now();
                                    freeze_start = Some(start);
                                    let r = host.freeze().await;
                                    t.freeze = start.elapsed();
                                    r
                                }
                                Err(e) => Err(e),
                            };
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
        notice_answer: machine.notice_answer(),
    })
}

/// Sends the host's further presync batches ([`SourceHost::presync_round`]) one after the
/// other until it has none; returns the presync's totals with them.
async fn presync_rounds<H: SourceHost>(
    conn: &quinn::Connection,
    host: &H,
    mut stats: crate::transport::TransferStats,
    before: u64,
    at: DigestAt,
) -> Result<crate::transport::TransferStats, String> {
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
    mut stats: crate::transport::TransferStats,
    sent: &[SentFile],
    at: DigestAt,
) -> Result<crate::transport::TransferStats, String> {
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
) -> Result<(crate::transport::TransferStats, Vec<SentFile>), crate::transport::FileError> {
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
