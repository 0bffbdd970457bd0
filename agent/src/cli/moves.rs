//! `mig move`, `mig peers` and `mig lab`: live migration, pinned peers, and the local lab (run
//! by the CLI itself, not through an agent).

use super::commands::{connect, json, out, CliError};
use super::{Cli, Command};
use crate::daemon::events::EventKind;
use crate::lab::{self, LabConfig};
use crate::migration::MoveResult;
use clap::{Args, Subcommand};
use std::io::IsTerminal;

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// Settle an in-doubt move of CONTAINER with its destination (run on the source agent;
    /// no PEER: the move's journal names it).
    #[arg(long)]
    pub resolve: bool,
    /// With --resolve, when the other host cannot answer because it is gone for good: settle
    /// the move as committed (the container runs on the destination) or rolled-back (it runs on
    /// the source). On the source the destination is asked first and its answer wins; on the
    /// destination it applies at once. A destination that comes back after rolled-back on the
    /// source removes its copy by itself; one that comes back after committed on the source
    /// waits for the same decision there. Deciding differently on the two gives two copies or
    /// none. A rolled-back decision exits 125, as a rolled-back move does.
    #[arg(long, value_enum, value_name = "OUTCOME")]
    pub decide: Option<crate::api::Decision>,
    /// Keep established TCP connections (CRIU TCP repair; docs/networking.md). Without it a
    /// container with established connections is refused.
    #[arg(long, conflicts_with = "resolve")]
    pub tcp_established: bool,
    /// How memory moves: stream (the default: the memory copied while the container runs, then
    /// only the pages that changed, straight to the destination; the fastest stop-and-copy), cold
    /// (every image through files on both disks, each file hashed), lazy
    /// (post-copy: resumes first, pages on demand from this host), precopy (needs dirty-memory
    /// tracking), auto (stream, or lazy when over --max-downtime). docs/migration.md
    #[arg(long, value_enum, conflicts_with = "resolve")]
    pub mode: Option<crate::migration::MoveMode>,
    /// Refuse the move when its predicted downtime exceeds MS milliseconds (with --mode auto:
    /// go post-copy instead). The container is not touched.
    #[arg(long, value_name = "MS", conflicts_with = "resolve")]
    pub max_downtime: Option<u64>,
    /// Stream mode: do not copy the memory while the container runs; every page then goes
    /// while it is frozen (plain stop-and-copy; docs/migration.md "Memory presync").
    #[arg(long, conflicts_with = "resolve")]
    pub no_memory_presync: bool,
    /// Print JSON (the API's types, docs/api.md) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Container id, id prefix or name.
    pub container: String,
    /// The pinned peer to move to (see `mig peers ls`).
    #[arg(required_unless_present = "resolve", conflicts_with = "resolve")]
    pub peer: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// Pin a peer agent by its certificate fingerprint (see `mig info` on the peer).
    Add {
        /// The peer's name (its agent's name, as `mig info` there shows it).
        name: String,
        /// The peer's QUIC address, IP:PORT.
        address: String,
        /// The peer's certificate fingerprint (hex sha256; `mig info` on the peer).
        #[arg(long)]
        fingerprint: String,
    },
    /// List pinned peers.
    Ls {
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Unpin a peer.
    Rm {
        /// The peer's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create N simulated hosts with one agent each, peered with each other.
    Up {
        /// Number of simulated hosts (host-a, host-b, ...; up to 26).
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// The lab's /24 by its first three octets (default 10.78.0); host i gets A.B.C.(10+i).
        /// The lab's name comes from MIG_LAB (default "mig").
        #[arg(long, value_name = "A.B.C", value_parser = parse_subnet)]
        subnet: Option<[u8; 3]>,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the lab's hosts.
    Status {
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove every namespace, link, agent, container and mount of the lab.
    Down,
    /// Restart one host's agent (its containers keep running; the moves under way end first, as
    /// when migd gets SIGTERM: up to 5 minutes).
    Restart {
        /// The lab host (host-a, host-b, ...).
        // Not the id `host`: that is the global --host's, which this positional would take
        // over (its value then stood for --host too).
        #[arg(id = "lab_host", value_name = "HOST")]
        host: String,
    },
}

/// `A.B.C`: the first three octets of a lab's /24.
fn parse_subnet(s: &str) -> Result<[u8; 3], String> {
    let octets: Vec<u8> = s
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not A.B.C (three numbers 0-255)"))?;
    <[u8; 3]>::try_from(octets).map_err(|_| format!("{s:?} is not A.B.C (three octets)"))
}

fn lab_error(e: lab::LabError) -> CliError {
    CliError::Lab(Box::new(e))
}

fn hosts_text(hosts: &[lab::LabHost]) -> String {
    let mut s = format!(
        "{:<8} {:<12} {:<8} {}\n",
        "HOST", "ADDRESS", "AGENT", "FINGERPRINT"
    );
    for h in hosts {
        s.push_str(&format!(
            "{:<8} {:<12} {:<8} {}\n",
            h.name,
            h.address,
            h.agent_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            h.fingerprint
                .as_deref()
                .map(|f| &f[..16.min(f.len())])
                .unwrap_or("-"),
        ));
    }
    s
}

/// Runs `lab` commands (blocking work, off the runtime thread).
async fn lab_command(cmd: &LabCommand) -> Result<u8, CliError> {
    let name = lab::lab_name_from_env();
    match cmd {
        LabCommand::Up {
            hosts,
            subnet,
            json: j,
        } => {
            let migd = lab::migd_next_to_current_exe().ok_or(CliError::NoMigd)?;
            let mut cfg = LabConfig::new(&name, *hosts, migd);
            if let Some(base) = subnet {
                cfg.subnet_base = *base;
            }
            cfg.extra_agent_args = vec!["--listen".into(), "{addr}:{port}".into()];
            let hosts = tokio::task::spawn_blocking(move || lab::up(&cfg))
                .await
                .map_err(|e| CliError::Task(e.to_string()))?
                .map_err(lab_error)?;
            if *j {
                json(&serde_json::json!({ "name": name, "hosts": hosts }))?;
            } else {
                out(&hosts_text(&hosts))?;
            }
        }
        LabCommand::Status { json: j } => {
            let n = name.clone();
            let hosts = tokio::task::spawn_blocking(move || lab::status(&n))
                .await
                .map_err(|e| CliError::Task(e.to_string()))?
                .map_err(lab_error)?;
            if *j {
                json(&serde_json::json!({ "name": name, "hosts": hosts }))?;
            } else {
                out(&hosts_text(&hosts))?;
            }
        }
        LabCommand::Down => {
            let lab_name = name.clone();
            let report = tokio::task::spawn_blocking(move || lab::down(&name))
                .await
                .map_err(|e| CliError::Task(e.to_string()))?
                .map_err(lab_error)?;
            out(&format!("{report}\n"))?;
            // What a `mig bench move` of this lab killed before its cleanup left: its runc
            // baseline container and work directory.
            if let Some(work) = crate::bench::remove_runc_leftovers(&lab_name) {
                match std::fs::remove_dir_all(&work) {
                    Ok(()) => out(&format!(
                        "removed a killed bench's runc containers and {}\n",
                        work.display()
                    ))?,
                    Err(e) => eprintln!("mig: cannot remove {}: {e}", work.display()),
                }
            }
            if !report.is_clean() {
                return Ok(super::EXIT_MIG_ERROR);
            }
        }
        LabCommand::Restart { host } => {
            let host = host.clone();
            let h = tokio::task::spawn_blocking(move || lab::restart_agent(&name, &host))
                .await
                .map_err(|e| CliError::Task(e.to_string()))?
                .map_err(lab_error)?;
            out(&hosts_text(&[h]))?;
        }
    }
    Ok(0)
}

fn move_text(r: &MoveResult) -> String {
    // A failed post-copy lost the container: it did not move (QA of session 30, F6: the first
    // line said it had).
    let moved = match r.postcopy_error {
        Some(_) => "was lost moving",
        None => "moved",
    };
    let mut s = format!(
        "{} {moved} to {} in {} ms: downtime {} ms (freeze {} ms, dump {} ms, transfer {} ms, restore {} ms), {} sent in {} files\n",
        r.name,
        r.peer,
        r.total_ms,
        r.downtime_ms,
        r.freeze_ms,
        r.dump_ms,
        r.transfer_ms,
        r.restore_ms,
        super::output::human_size(r.bytes_sent),
        r.files_sent
    );
    if let Some(p) = r.predicted_downtime_ms {
        s.push_str(&format!(
            "  mode {}: predicted downtime {p} ms, measured {} ms{}{}\n",
            r.mode,
            r.downtime_ms,
            link_basis(r),
            fixed_basis(r)
        ));
    }
    if let Some(m) = &r.memory_presync {
        s.push_str(&presync_line(m));
    }
    if let Some(pc) = &r.precopy {
        s.push_str("  pre-copy rounds while the container ran:\n");
        for line in pc.lines() {
            s.push_str(&line);
            s.push('\n');
        }
    }
    if let (Some(p), None) = (r.postcopy_ms, &r.postcopy_error) {
        match r.lazy_bytes {
            // The copy there stopped asking before the last page: it ended (exited, killed,
            // removed) or freed that memory (QA of session 32, F3: "until the last page
            // arrived" with 13 of 300 MiB sent, the copy removed by its operator).
            Some(lazy) if r.page_bytes < lazy => s.push_str(&format!(
                "  post-copy: the copy on {peer} stopped asking for memory {p} ms after the resume, before it had the {lazy} left to serve then ({sent} crossed the page tunnel; it ended, was removed, or freed the rest); it no longer depends on this host\n",
                peer = r.peer,
                sent = super::output::human_size(r.page_bytes),
                lazy = super::output::human_size(lazy)
            )),
            _ => s.push_str(&format!(
                "  post-copy: the container depended on this host for its memory for {p} ms more, until the last page arrived\n"
            )),
        }
    }
    if let Some(e) = &r.postcopy_error {
        s.push_str(&format!(
            "error: post-copy ended before the last page ({e}); the destination stops the container rather than run it with missing memory, and kills it (at once, or when its agent runs again if the agent itself was lost): it is lost\n"
        ));
    }
    for after in &r.pid_map {
        let before = r
            .pid_map_before
            .iter()
            .find(|b| b.ns_pid == after.ns_pid)
            .map(|b| b.host_pid.to_string())
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "  pid {:>5} (host {:>7} -> {:>7}) {}\n",
            after.ns_pid,
            before,
            after.host_pid,
            super::output::one_line(&after.cmd, 60)
        ));
    }
    if let Some(e) = &r.cleanup_error {
        s.push_str(&format!(
            "warning: the frozen source copy was not removed: {e}\n"
        ));
    }
    s
}

/// Stream mode's memory presync, for the result's text: what went while the container ran and
/// what was left for the freeze.
fn presync_line(m: &crate::migration::memsync::MemoryPresyncReport) -> String {
    if let Some(e) = &m.error {
        return format!("  memory presync failed ({e}): every page went while frozen\n");
    }
    let pages = m.pages_reused + m.pages_sent_frozen;
    format!(
        "  memory presync: {} copied in {} ms while the container ran{}; {} of {pages} pages went while frozen\n",
        super::output::human_size(m.bytes),
        m.ms,
        if m.capped {
            " (capped: the destination's disk or the time limit)"
        } else {
            ""
        },
        m.pages_sent_frozen,
    )
}

/// Where the prediction's throughput came from, for the pre-flight line.
fn link_basis(r: &MoveResult) -> String {
    let mib_s = r.throughput_bytes_s.map(|b| b >> 20).unwrap_or(0);
    match (r.throughput_source.as_deref(), &r.probe) {
        (Some("probe"), Some(p)) => format!(
            " (link {mib_s} MiB/s, probed: {} in {} ms)",
            super::output::human_size(p.bytes),
            p.ms
        ),
        (Some("previous"), _) => format!(" (link {mib_s} MiB/s from an earlier move, no probe)"),
        (Some("default"), _) => format!(" (link {mib_s} MiB/s assumed, no probe)"),
        _ => String::new(),
    }
}

/// Where the prediction's fixed costs came from, for the pre-flight line.
fn fixed_basis(r: &MoveResult) -> String {
    use crate::migration::fixedcost::FixedSource;
    match &r.fixed_cost {
        Some(f) if f.source == FixedSource::Measured => format!(
            ", fixed costs {} ms from the last {} {} move{} to {}",
            f.ms,
            f.moves,
            r.mode,
            if f.moves == 1 { "" } else { "s" },
            r.peer
        ),
        Some(f) => format!(
            ", fixed costs {} ms assumed (no {} move to {} measured yet)",
            f.ms, r.mode, r.peer
        ),
        None => String::new(),
    }
}

/// How often the progress line is redrawn without news (for the elapsed time).
const REDRAW: std::time::Duration = std::time::Duration::from_millis(250);

/// Draws `mig move`'s one-line progress on stderr from the agent's events (a second connection
/// subscribed before the move starts): phase, MiB sent / expected, elapsed. `None` when the
/// subscription fails (the move goes on without progress).
async fn progress_line(
    cli: &Cli,
    container: &str,
    peer: &str,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut events = connect(cli).await.ok()?;
    events.subscribe_events().await.ok()?;
    let (container, peer) = (container.to_owned(), peer.to_owned());
    Some(tokio::spawn(async move {
        let t0 = std::time::Instant::now();
        let mut line = Progress::default();
        let mut tick = tokio::time::interval(REDRAW);
        loop {
            tokio::select! {
                e = events.next_event() => {
                    let Ok(e) = e else { return };
                    if let EventKind::MigrationPhase { container_id, container_name, role, phase, bytes, total_bytes, .. } = e.kind {
                        let ours = role == "source"
                            && (container_name == container || container_id.starts_with(&container));
                        if ours {
                            line = Progress { phase, bytes, total: total_bytes };
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K{}",
                line.text(&container, &peer, t0.elapsed())
            );
            let _ = err.flush();
        }
    }))
}

/// The last phase event seen by [`progress_line`].
#[derive(Debug, Default)]
struct Progress {
    phase: String,
    bytes: u64,
    total: Option<u64>,
}

impl Progress {
    fn text(&self, container: &str, peer: &str, elapsed: std::time::Duration) -> String {
        const MIB: f64 = 1024.0 * 1024.0;
        let phase = if self.phase.is_empty() {
            "connecting"
        } else {
            &self.phase
        };
        let sent = match self.total {
            Some(t) => format!("{:.1}/{:.1} MiB", self.bytes as f64 / MIB, t as f64 / MIB),
            None => format!("{:.1} MiB", self.bytes as f64 / MIB),
        };
        format!(
            "moving {container} to {peer}: {phase:<9} {sent}  {:.1} s",
            elapsed.as_secs_f64()
        )
    }
}

/// Handles the commands of this module; `None` for the others.
pub(super) async fn dispatch(cli: &Cli) -> Result<Option<u8>, CliError> {
    match &cli.command {
        Command::Lab(cmd) => lab_command(cmd).await.map(Some),
        Command::Move(m) => {
            // Checked here: clap takes a flag's default for its presence (`requires` never
            // fails on a bool), and `move C PEER --decide ...` made a real move (QA).
            if m.decide.is_some() && !m.resolve {
                return Err(CliError::DecideWithoutResolve);
            }
            let mut c = connect(cli).await?;
            let tty = std::io::stderr().is_terminal() && !m.json;
            let r = if m.resolve {
                if tty {
                    // The other host is asked first; when it is gone that takes a connection
                    // timeout, which looked like a hang (QA, session 22).
                    eprintln!(
                        "settling the in-doubt move of {}: asking its other host first (up to about 30 s when that host does not answer)",
                        m.container
                    );
                }
                c.move_resolve_deciding(&m.container, m.decide)
                    .await
                    .map_err(super::commands::run::older_agent)?
            } else {
                let peer = m.peer.as_deref().unwrap_or_default();
                let progress = if tty {
                    progress_line(cli, &m.container, peer).await
                } else {
                    None
                };
                let call = c.move_container_opts(
                    &m.container,
                    peer,
                    m.tcp_established,
                    crate::migration::modes::MoveOptions {
                        mode: m.mode,
                        max_downtime_ms: m.max_downtime,
                        no_memory_presync: m.no_memory_presync,
                    },
                );
                // Ctrl-C ends this command, not the move: the agent carries it to its end (a
                // commit or a rollback) whether or not anyone waits for the answer. Say so.
                let r = tokio::select! {
                    r = call => Some(r),
                    () = super::commands::interrupted() => None,
                };
                if let Some(p) = progress {
                    p.abort();
                    let _ = p.await;
                    // The progress line gives way to the summary (or the error).
                    eprint!("\r\x1b[2K");
                }
                r.ok_or_else(|| CliError::MoveInterrupted {
                    container: m.container.clone(),
                    peer: peer.to_owned(),
                })??
            };
            if m.json {
                json(&r)?;
            } else if m.resolve {
                // No move ran now: its figures were the move's, and are not known here.
                out(&format!(
                    "{}: migration {} is settled as committed: the container runs on {}\n",
                    r.name, r.migration_id, r.peer
                ))?;
            } else {
                out(&move_text(&r))?;
            }
            // Committed, but the post-copy failed: the container was lost, not moved.
            if let Some(e) = &r.postcopy_error {
                eprintln!("mig: the post-copy of {} to {} failed: {e}", r.name, r.peer);
                return Ok(Some(super::EXIT_MIG_ERROR));
            }
            Ok(Some(0))
        }
        Command::Peers(p) => {
            let mut c = connect(cli).await?;
            match p {
                PeersCommand::Add {
                    name,
                    address,
                    fingerprint,
                } => {
                    let p = c.peer_add(name, address, fingerprint).await?;
                    out(&format!("{} {} pinned\n", p.name, p.address))?;
                }
                PeersCommand::Ls { json: j } => {
                    let list = c.peer_list().await?;
                    if *j {
                        json(&list)?;
                    } else {
                        let mut s = format!("{:<12} {:<22} {}\n", "NAME", "ADDRESS", "FINGERPRINT");
                        for p in &list {
                            s.push_str(&format!(
                                "{:<12} {:<22} {}\n",
                                p.name, p.address, p.fingerprint
                            ));
                        }
                        out(&s)?;
                    }
                }
                PeersCommand::Rm { name } => {
                    c.peer_remove(name).await?;
                    out(&format!("{name}\n"))?;
                }
            }
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::probe::ProbeInfo;

    #[test]
    fn the_preflight_line_names_the_throughput_source() {
        let mut r = MoveResult {
            name: "web".into(),
            peer: "host-b".into(),
            mode: "stream".into(),
            downtime_ms: 900,
            predicted_downtime_ms: Some(612),
            throughput_bytes_s: Some(382 << 20),
            throughput_source: Some("probe".into()),
            probe: Some(ProbeInfo {
                bytes: 64 << 20,
                ms: 213,
                bytes_s: 382 << 20,
                mib_s: 382,
                tail_bytes_s: 0,
            }),
            ..Default::default()
        };
        let text = move_text(&r);
        assert!(
            text.contains(
                "mode stream: predicted downtime 612 ms, measured 900 ms (link 382 MiB/s, probed: 64.0 MiB in 213 ms)"
            ),
            "{text}"
        );
        r.probe = None;
        r.throughput_source = Some("previous".into());
        assert!(move_text(&r).contains("(link 382 MiB/s from an earlier move, no probe)"));
        r.throughput_source = Some("default".into());
        r.throughput_bytes_s = Some(150 << 20);
        assert!(move_text(&r).contains("(link 150 MiB/s assumed, no probe)"));
        // An older agent's result has no source: the line stays as it was.
        r.throughput_source = None;
        assert!(move_text(&r).contains("measured 900 ms\n"));
        // The fixed costs' source follows.
        r.fixed_cost = Some(crate::migration::fixedcost::FixedCost::DEFAULT);
        assert!(
            move_text(&r).contains(
                "measured 900 ms, fixed costs 250 ms assumed (no stream move to host-b measured yet)\n"
            ),
            "{}",
            move_text(&r)
        );
        r.fixed_cost = Some(crate::migration::fixedcost::FixedCost {
            ms: 131,
            source: crate::migration::fixedcost::FixedSource::Measured,
            moves: 3,
        });
        assert!(move_text(&r).contains(
            "measured 900 ms, fixed costs 131 ms from the last 3 stream moves to host-b\n"
        ));
        r.fixed_cost = None;
        r.memory_presync = Some(crate::migration::memsync::MemoryPresyncReport {
            ms: 45,
            bytes: 10 << 20,
            pages_reused: 2648,
            pages_sent_frozen: 8,
            ..Default::default()
        });
        assert!(
            move_text(&r).contains(
                "  memory presync: 10.0 MiB copied in 45 ms while the container ran; 8 of 2656 pages went while frozen\n"
            ),
            "{}",
            move_text(&r)
        );
        r.memory_presync.as_mut().unwrap().error = Some("the destination ended the presync".into());
        assert!(move_text(&r).contains(
            "memory presync failed (the destination ended the presync): every page went while frozen"
        ));
    }

    #[test]
    fn a_post_copy_whose_copy_stopped_asking_is_not_said_to_have_every_page() {
        let mut r = MoveResult {
            name: "web".into(),
            peer: "host-b".into(),
            mode: "lazy".into(),
            postcopy_ms: Some(1164),
            page_bytes: 300 << 20,
            lazy_bytes: Some(300 << 20),
            ..Default::default()
        };
        let whole = "for its memory for 1164 ms more, until the last page arrived";
        assert!(move_text(&r).contains(whole), "{}", move_text(&r));
        // An older agent's result has no lazy bytes: the line stays as it was.
        r.lazy_bytes = None;
        assert!(move_text(&r).contains(whole));
        r.lazy_bytes = Some(300 << 20);
        r.page_bytes = 13 << 20;
        let text = move_text(&r);
        assert!(!text.contains("until the last page"), "{text}");
        assert!(
            text.contains("the copy on host-b stopped asking for memory 1164 ms after the resume, before it had the 300.0 MiB left to serve then (13.0 MiB crossed the page tunnel;"),
            "{text}"
        );
    }
}
