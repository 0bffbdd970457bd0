//! `mig events`: the agent's event stream, as human lines or one JSON object per line.

use super::commands::{connect, json, out, CliError};
use super::{Cli, Command};
use crate::api::{Event, EventKind};
use crate::client::Client;
use clap::Args;
use clap::Subcommand;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Arguments of `mig events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Only events about this container (id, id prefix or name).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// Stop after this many events (after filtering).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// `mig clients`: the remote API clients an agent accepts.
#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Pin a client by its certificate fingerprint (`mig clients identity` on the client).
    Add {
        /// A name for the client (shown by `mig clients ls`).
        name: String,
        /// The client's certificate fingerprint (`mig clients identity` on the client).
        #[arg(long, value_name = "FP")]
        fingerprint: String,
    },
    /// List the pinned clients.
    Ls {
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Unpin a client.
    Rm {
        /// The client's name.
        name: String,
    },
    /// Print this client's certificate fingerprint (creating its identity under --identity or
    /// ~/.config/mig on first use).
    Identity {
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The identity directory of this client.
fn identity_dir(cli: &Cli) -> Result<PathBuf, CliError> {
    match &cli.identity {
        Some(d) => Ok(d.clone()),
        None => Ok(crate::remote::default_identity_dir()?),
    }
}

/// Connects to `--remote ADDR` with this client's identity.
pub(super) async fn connect_remote(cli: &Cli, addr: SocketAddr) -> Result<Client, CliError> {
    let fp = cli.fingerprint.as_deref().ok_or(CliError::NoFingerprint)?;
    let dir = identity_dir(cli)?;
    let id = crate::remote::client_identity(&dir)?;
    Ok(crate::remote::connect(addr, fp, &id).await?)
}

async fn clients(cli: &Cli, cmd: &ClientsCommand) -> Result<u8, CliError> {
    if let ClientsCommand::Identity { json: j } = cmd {
        let dir = identity_dir(cli)?;
        let id = crate::remote::client_identity(&dir)?;
        if *j {
            json(&serde_json::json!({
                "fingerprint": id.fingerprint(),
                "dir": dir.display().to_string(),
            }))?;
        } else {
            out(&format!("{}\n", id.fingerprint()))?;
        }
        return Ok(0);
    }
    let mut c = connect(cli).await?;
    match cmd {
        ClientsCommand::Add { name, fingerprint } => {
            let p = c.client_add(name, fingerprint).await?;
            out(&format!("{} {}\n", p.name, p.fingerprint))?;
        }
        ClientsCommand::Ls { json: j } => {
            let list = c.client_list().await?;
            if *j {
                json(&list)?;
            } else {
                let mut s = String::new();
                for p in &list {
                    s.push_str(&format!("{} {}\n", p.name, p.fingerprint));
                }
                out(&s)?;
            }
        }
        ClientsCommand::Rm { name } => {
            c.client_remove(name).await?;
        }
        ClientsCommand::Identity { .. } => {}
    }
    Ok(0)
}

/// Runs the commands of this module and of [`super::rebalance`] and the client pins; `None` for
/// other commands.
pub(super) async fn dispatch(cli: &Cli) -> Result<Option<u8>, CliError> {
    match &cli.command {
        Command::Events(a) => run(cli, a).await.map(Some),
        Command::Clients(c) => clients(cli, c).await.map(Some),
        Command::Rebalance(a) => super::rebalance::run(cli, a).await.map(Some),
        _ => Ok(None),
    }
}

/// Streams events until the agent goes away, the pipe closes or `--count` events were printed.
pub(super) async fn run(cli: &Cli, args: &EventsArgs) -> Result<u8, CliError> {
    let mut c = connect(cli).await?;
    // A filter naming no container of this host waits for one that may come (a move here, a
    // run): said, rather than silence (QA of session 24).
    if let Some(want) = &args.container {
        if c.inspect(want).await.is_err() {
            eprintln!(
                "mig: no container {want} on this host now; waiting for events of one that comes"
            );
        }
    }
    c.subscribe_events().await?;
    let mut printed = 0u64;
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            return Ok(0);
        }
        let e = match c.next_event().await {
            Ok(e) => e,
            // The agent shut down: the stream simply ends.
            Err(crate::client::ClientError::Frame(crate::api::frame::FrameError::Closed)) => {
                return Ok(0)
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(want) = &args.container {
            if !matches_container(&e.kind, want) {
                continue;
            }
        }
        let line = if args.json {
            serde_json::to_string(&e).unwrap_or_default()
        } else {
            event_line(&e)
        };
        match out(&format!("{line}\n")) {
            Ok(()) => {}
            // A closed pipe (`mig events | head`) ends the command quietly.
            Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(e),
        }
        printed += 1;
    }
}

/// The container an event is about: (id, name).
pub fn event_container(k: &EventKind) -> Option<(&str, &str)> {
    match k {
        EventKind::ContainerStarted { id, name }
        | EventKind::ContainerStopped { id, name, .. }
        | EventKind::ContainerOom { id, name, .. }
        | EventKind::ContainerCheckpointed { id, name, .. }
        | EventKind::ContainerRestored { id, name }
        | EventKind::ContainerRemoved { id, name, .. } => Some((id, name)),
        EventKind::MigrationPhase {
            container_id,
            container_name,
            ..
        }
        | EventKind::MigrationDone {
            container_id,
            container_name,
            ..
        }
        | EventKind::MigrationConflict {
            container_id,
            container_name,
            ..
        } => Some((container_id, container_name)),
        EventKind::Lagged { .. } | EventKind::Unknown => None,
    }
}

fn matches_container(k: &EventKind, want: &str) -> bool {
    match event_container(k) {
        Some((id, name)) => name == want || (!want.is_empty() && id.starts_with(want)),
        // A lag notice concerns every filter.
        None => true,
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// One human line: `time host type details`.
pub fn event_line(e: &Event) -> String {
    let secs = e.time_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let time = format!("{h:02}:{m:02}:{s:02}.{:03}", e.time_ms % 1000);
    let what = match &e.kind {
        EventKind::ContainerStarted { id, name } => format!("started {name} ({})", short(id)),
        EventKind::ContainerStopped {
            id,
            name,
            exit_code,
            moved_to,
            reason,
            ..
        } => {
            // As `mig ps` says it: `exit code 137: oom-killed`.
            let why = reason
                .as_deref()
                .map(|r| format!(": {}", super::output::short_reason(r)))
                .unwrap_or_default();
            match (moved_to, exit_code) {
                (Some(p), _) => format!("stopped {name} ({}): moved to {p}", short(id)),
                (None, Some(c)) => format!("stopped {name} ({}) exit code {c}{why}", short(id)),
                (None, None) => format!("stopped {name} ({}){why}", short(id)),
            }
        }
        EventKind::ContainerOom {
            id,
            name,
            oom_kills,
        } => format!("oom {name} ({}) oom kills {oom_kills}", short(id)),
        EventKind::ContainerCheckpointed {
            id,
            name,
            leave_running,
        } => format!(
            "checkpointed {name} ({}){}",
            short(id),
            if *leave_running {
                ", left running"
            } else {
                ""
            }
        ),
        EventKind::ContainerRestored { id, name } => format!("restored {name} ({})", short(id)),
        EventKind::ContainerRemoved {
            id,
            name,
            moved_to: Some(peer),
        } => format!("removed {name} ({}): moved to {peer}", short(id)),
        EventKind::ContainerRemoved { id, name, .. } => format!("removed {name} ({})", short(id)),
        EventKind::MigrationPhase {
            migration_id,
            container_name,
            role,
            peer,
            phase,
            elapsed_ms,
            bytes,
            ..
        } => format!(
            "migration {} {container_name} {role} peer {peer}: {phase} at {elapsed_ms} ms, {bytes} bytes",
            short(migration_id)
        ),
        EventKind::MigrationDone {
            migration_id,
            container_name,
            role,
            peer,
            outcome,
            total_ms,
            downtime_ms,
            bytes,
            error,
            ..
        } => {
            let mut s = format!(
                "migration {} {container_name} {role} peer {peer}: {outcome} in {total_ms} ms",
                short(migration_id)
            );
            if let Some(d) = downtime_ms {
                s.push_str(&format!(", downtime {d} ms"));
            }
            s.push_str(&format!(", {bytes} bytes"));
            if let Some(e) = error {
                s.push_str(&format!(": {e}"));
            }
            s
        }
        EventKind::MigrationConflict {
            migration_id,
            container_name,
            peer,
            ..
        } => format!(
            "migration {} {container_name}: rolled back here but committed on {peer}; it runs on both hosts, remove one copy (`mig rm -f {container_name}` on one of them)",
            short(migration_id)
        ),
        EventKind::Lagged { missed } => format!("lagged: {missed} events missed"),
        EventKind::Unknown => "an event of a type this mig does not know (a newer agent's)".into(),
    };
    format!("{time} {} {what}", e.host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_filters() {
        let e = Event {
            seq: 1,
            time_ms: 3_723_004,
            host: "host-a".into(),
            kind: EventKind::ContainerStopped {
                id: "0123456789abcdef".into(),
                name: "web".into(),
                exit_code: Some(0),
                signal: None,
                moved_to: None,
                reason: None,
            },
        };
        assert_eq!(
            event_line(&e),
            "01:02:03.004 host-a stopped web (0123456789ab) exit code 0"
        );
        // QA of session 28, F6: the event said only `exit code 137` where ps said `oom-killed`.
        let oom = Event {
            kind: EventKind::ContainerStopped {
                id: "0123456789abcdef".into(),
                name: "web".into(),
                exit_code: Some(137),
                signal: Some(9),
                moved_to: None,
                reason: Some("oom-killed: the container exceeded its memory limit".into()),
            },
            ..e.clone()
        };
        assert_eq!(
            event_line(&oom),
            "01:02:03.004 host-a stopped web (0123456789ab) exit code 137: oom-killed"
        );
        assert!(matches_container(&e.kind, "web"));
        assert!(matches_container(&e.kind, "0123"));
        assert!(!matches_container(&e.kind, "db"));
        assert!(matches_container(&EventKind::Lagged { missed: 3 }, "db"));
        let moved = Event {
            kind: EventKind::ContainerRemoved {
                id: "0123456789abcdef".into(),
                name: "web".into(),
                moved_to: Some("host-b".into()),
            },
            ..e
        };
        assert_eq!(
            event_line(&moved),
            "01:02:03.004 host-a removed web (0123456789ab): moved to host-b"
        );
    }
}
