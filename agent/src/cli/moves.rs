//! `mig move`, `mig peers` and `mig lab`: live migration, pinned peers, and the local lab (run
//! by the CLI itself, not through an agent).

use super::commands::{connect, json, out, CliError};
use super::{Cli, Command};
use crate::lab::{self, LabConfig};
use crate::migration::MoveResult;
use clap::{Args, Subcommand};
use std::io::IsTerminal;

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// Settle an in-doubt move of CONTAINER with its destination (run on the source agent).
    #[arg(long)]
    pub resolve: bool,
    #[arg(long)]
    pub json: bool,
    /// Container id, id prefix or name.
    pub container: String,
    /// The pinned peer to move to (see `mig peers ls`).
    #[arg(required_unless_present = "resolve")]
    pub peer: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// Pin a peer agent by its certificate fingerprint (see `mig info` on the peer).
    Add {
        name: String,
        /// The peer's QUIC address, IP:PORT.
        address: String,
        #[arg(long)]
        fingerprint: String,
    },
    /// List pinned peers.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Unpin a peer.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create N simulated hosts with one agent each, peered with each other.
    Up {
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        #[arg(long)]
        json: bool,
    },
    /// List the lab's hosts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove every namespace, link, agent, container and mount of the lab.
    Down,
    /// Restart one host's agent (its containers keep running).
    Restart { host: String },
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
        LabCommand::Up { hosts, json: j } => {
            let migd = lab::migd_next_to_current_exe().ok_or(CliError::NoMigd)?;
            let mut cfg = LabConfig::new(&name, *hosts, migd);
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
            let report = tokio::task::spawn_blocking(move || lab::down(&name))
                .await
                .map_err(|e| CliError::Task(e.to_string()))?
                .map_err(lab_error)?;
            out(&format!("{report}\n"))?;
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
    let mut s = format!(
        "{} moved to {} in {} ms: downtime {} ms (freeze {} ms, dump {} ms, transfer {} ms, restore {} ms), {} sent in {} files\n",
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
    for (before, after) in r.pid_map_before.iter().zip(&r.pid_map) {
        s.push_str(&format!(
            "  pid {:>5} (host {:>7} -> {:>7}) {}\n",
            after.ns_pid, before.host_pid, after.host_pid, after.cmd
        ));
    }
    if let Some(e) = &r.cleanup_error {
        s.push_str(&format!(
            "warning: the frozen source copy was not removed: {e}\n"
        ));
    }
    s
}

/// Handles the commands of this module; `None` for the others.
pub(super) async fn dispatch(cli: &Cli) -> Result<Option<u8>, CliError> {
    match &cli.command {
        Command::Lab(cmd) => lab_command(cmd).await.map(Some),
        Command::Move(m) => {
            let mut c = connect(cli).await?;
            let tty = std::io::stderr().is_terminal() && !m.json;
            let r = if m.resolve {
                c.move_resolve(&m.container).await?
            } else {
                let peer = m.peer.as_deref().unwrap_or_default();
                if tty {
                    eprintln!(
                        "moving {} to {peer}: prepare, presync, freeze, dump, transfer, restore, commit...",
                        m.container
                    );
                }
                c.move_container(&m.container, peer).await?
            };
            if m.json {
                json(&r)?;
            } else {
                out(&move_text(&r))?;
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
