//! `mig logs -f`: follows a container's log, and follows it across a move.
//!
//! The source agent ends a followed log when the container leaves it. Before following, the CLI
//! subscribes to the agent's events; when the log ends and the container is no longer on that
//! agent, a committed move of it (`MigrationDone`, role `source`) names the peer. When the peer
//! is a host of the local lab (its socket is known), following goes on there, without the part
//! already printed (the log moves with the container); otherwise one line on stderr says where the
//! container went. A container that exits, or is removed, ends the follow as before.

use super::commands::{connect, out, socket_path, CliError};
use super::Cli;
use crate::api::ContainerState;
use crate::client::Client;
use crate::daemon::events::EventKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long, after its log ended, a container missing from the agent is waited for in the
/// events (the move's commit event may come just after the log's end).
const MOVE_EVENT_WAIT: Duration = Duration::from_secs(3);

/// Follows `container`'s log on the agent of `cli`, then on the hosts it moves to; with `tail`,
/// starting from the last `tail` lines of what it holds now.
pub(super) async fn follow(
    cli: &Cli,
    container: &str,
    tail: Option<usize>,
) -> Result<u8, CliError> {
    let agent = Agent {
        logs: connect(cli).await?,
        events: connect(cli).await?,
        check: connect(cli).await?,
    };
    follow_on(agent, container, tail).await.map(|_| 0)
}

/// Three connections to one agent: one streams the log, one the events, one asks questions.
pub(super) struct Agent {
    pub logs: Client,
    pub events: Client,
    pub check: Client,
}

/// Where a followed log ended.
pub(super) enum Followed {
    /// On the agent it started on (the container ended, or left without a committed move).
    Here,
    /// On a lab host it moved to (`check` is connected there).
    There { check: Client },
    /// It moved to `peer`, which this machine cannot reach (said on stderr).
    Away,
}

/// [`follow`] on connections made already; says where the log ended.
pub(super) async fn follow_on(
    agent: Agent,
    container: &str,
    tail: Option<usize>,
) -> Result<Followed, CliError> {
    let Agent {
        mut logs,
        mut events,
        mut check,
    } = agent;
    let mut moved = false;
    // The follow prints the log from its start: the part before the last lines is skipped.
    let mut skip: usize = match tail {
        Some(n) => {
            let now = read_all(&mut logs, container).await?;
            tail_start(&now, n)
        }
        None => 0,
    };
    loop {
        // Subscribed before the log starts: a move that ends the log cannot be missed.
        let id = match events.subscribe_events().await {
            // Not swallowed: a follow started while the container was being made found it by
            // the log but had no move watcher, and a move ended it as if the container had
            // (QA of session 30, F3).
            Ok(()) => Some(logs.inspect(container).await?.id),
            // An agent without events: follow the log only.
            Err(_) => None,
        };
        let moving = Arc::new(AtomicBool::new(false));
        let watcher = id
            .clone()
            .map(|id| tokio::spawn(moved_to(events, id, moving.clone())));
        let mut printed = 0usize;
        let mut err = None;
        logs.logs(container, true, |data| {
            let new = skip_prefix(data, &mut skip);
            printed += data.len();
            if err.is_none() && !new.is_empty() {
                err = out(new).err();
            }
        })
        .await?;
        if let Some(e) = err {
            return Err(e);
        }
        let here = |check: Client, moved: bool| {
            if moved {
                Followed::There { check }
            } else {
                Followed::Here
            }
        };
        let (Some(watcher), Some(id)) = (watcher, id) else {
            return Ok(here(check, moved));
        };
        let Some(peer) = moved_away(&mut check, &id, watcher, &moving).await else {
            // Ended without moving: a checkpoint is the one end that is not the container's own.
            if check
                .inspect(&id)
                .await
                .is_ok_and(|d| d.state == ContainerState::Checkpointed)
            {
                eprintln!(
                    "mig: {container} was checkpointed; its log goes on once it is restored (here with mig restore {container}, or where its exported checkpoint is imported: restore it in one place only)"
                );
            }
            return Ok(here(check, moved));
        };
        let next = match socket_path(None, Some(&peer)) {
            Ok(path) => Client::connect(&path).await.ok(),
            Err(_) => None,
        };
        let Some(next) = next else {
            eprintln!(
                "mig: {container} moved to {peer}; its log continues there (mig --host {peer} logs -f {container})"
            );
            return Ok(Followed::Away);
        };
        eprintln!("mig: {container} moved to {peer}; following it there");
        let path = socket_path(None, Some(&peer))?;
        logs = next;
        events = Client::connect(&path).await?;
        check = Client::connect(&path).await?;
        moved = true;
        // The log moved with the container: what was printed comes again first.
        skip += printed;
    }
}

/// Watches a container while a command runs in it (`mig exec`), to say why the command was killed
/// when the container left: subscribed to the agent's events before the command starts, so that
/// the move that ends it cannot be missed.
pub(super) struct ExecWatch {
    check: Client,
    id: String,
    watcher: tokio::task::JoinHandle<Option<String>>,
    moving: Arc<AtomicBool>,
}

impl ExecWatch {
    /// `None` when the agent has no events or no such container (the exec reports that itself).
    pub(super) async fn start(cli: &Cli, container: &str) -> Option<ExecWatch> {
        let mut events = connect(cli).await.ok()?;
        events.subscribe_events().await.ok()?;
        let mut check = connect(cli).await.ok()?;
        let id = check.inspect(container).await.ok()?.id;
        let moving = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(moved_to(events, id.clone(), moving.clone()));
        Some(ExecWatch {
            check,
            id,
            watcher,
            moving,
        })
    }

    /// After the command was killed: what the container did meanwhile (`moved to PEER`,
    /// `was checkpointed`, `stopped`), or `None` when it still runs here (the command itself was
    /// killed).
    pub(super) async fn why_killed(mut self) -> Option<String> {
        let moving = self.moving.load(Ordering::SeqCst);
        match self.check.inspect(&self.id).await {
            Ok(d) if d.state == ContainerState::Running && d.moving.is_none() && !moving => {
                self.watcher.abort();
                return None;
            }
            Ok(d) if d.state == ContainerState::Checkpointed => {
                self.watcher.abort();
                return Some("was checkpointed".into());
            }
            _ => {}
        }
        if let Some(peer) = moved_away(&mut self.check, &self.id, self.watcher, &self.moving).await
        {
            return Some(format!("moved to {peer}"));
        }
        match self.check.inspect(&self.id).await {
            Ok(d) if d.state == ContainerState::Checkpointed => Some("was checkpointed".into()),
            Ok(d) if ended(d.state) => Some("stopped".into()),
            Ok(_) => None,
            Err(_) => Some("was removed".into()),
        }
    }
}

/// After the log ended: the peer the container moved to, or `None` when it ended here (exited,
/// stopped, checkpointed) or left without a committed move. While the container is still being
/// moved (frozen, `moving`) this waits for the move's end, however long it takes; otherwise (gone)
/// at most [`MOVE_EVENT_WAIT`] for the event.
async fn moved_away(
    check: &mut Client,
    id: &str,
    watcher: tokio::task::JoinHandle<Option<String>>,
    moving: &AtomicBool,
) -> Option<String> {
    let mut gone_since: Option<std::time::Instant> = None;
    loop {
        if watcher.is_finished() {
            return watcher.await.ok().flatten();
        }
        match check.inspect(id).await {
            // A move under way: its frozen copy here may show as ended before it is removed.
            _ if moving.load(Ordering::SeqCst) => gone_since = None,
            Ok(d) if d.moving.is_some() || d.state == ContainerState::Frozen => gone_since = None,
            Ok(d) if ended(d.state) => {
                watcher.abort();
                return None;
            }
            // Gone (or not yet recorded as ended): the move's event comes soon if it moved.
            _ => {
                let since = *gone_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= MOVE_EVENT_WAIT {
                    watcher.abort();
                    return None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// States of a container that ended here.
fn ended(s: ContainerState) -> bool {
    matches!(
        s,
        ContainerState::Stopped
            | ContainerState::Exited
            | ContainerState::Checkpointed
            | ContainerState::Failed
    )
}

/// Waits for the event of a committed move of container `id` away from the agent of `events`;
/// returns the peer, or `None` when the event stream ends. `moving` is set while a move of it is
/// under way (from its first phase to its end).
async fn moved_to(mut events: Client, id: String, moving: Arc<AtomicBool>) -> Option<String> {
    loop {
        let e = events.next_event().await.ok()?;
        match e.kind {
            EventKind::MigrationPhase {
                container_id, role, ..
            } if container_id == id && role == "source" => moving.store(true, Ordering::SeqCst),
            EventKind::MigrationDone {
                container_id,
                role,
                peer,
                outcome,
                ..
            } if container_id == id && role == "source" => {
                if outcome == "committed" {
                    return Some(peer);
                }
                moving.store(false, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// `data` without its first `*skip` bytes (cut at a character boundary), counting them off.
/// The whole log the agent holds now.
pub(super) async fn read_all(c: &mut Client, container: &str) -> Result<String, CliError> {
    let mut log = String::new();
    c.logs(container, false, |data| log.push_str(data)).await?;
    Ok(log)
}

/// Where the last `n` lines of `log` start (a last line without its newline counts as one).
pub(super) fn tail_start(log: &str, n: usize) -> usize {
    if n == 0 {
        return log.len();
    }
    let body = log.strip_suffix('\n').unwrap_or(log);
    body.rmatch_indices('\n')
        .nth(n - 1)
        .map_or(0, |(at, _)| at + 1)
}

fn skip_prefix<'a>(data: &'a str, skip: &mut usize) -> &'a str {
    if *skip == 0 {
        return data;
    }
    if *skip >= data.len() {
        *skip -= data.len();
        return "";
    }
    let mut at = *skip;
    while !data.is_char_boundary(at) {
        at += 1;
    }
    *skip = 0;
    &data[at..]
}

#[cfg(test)]
mod tests {
    use super::{skip_prefix, tail_start};

    #[test]
    fn tail_start_finds_the_last_lines() {
        let log = "a\nb\nc\n";
        assert_eq!(&log[tail_start(log, 2)..], "b\nc\n");
        assert_eq!(&log[tail_start(log, 3)..], log);
        assert_eq!(&log[tail_start(log, 9)..], log);
        assert_eq!(&log[tail_start(log, 0)..], "");
        // A last line still being written counts as a line.
        assert_eq!(&"a\nb\nc"[tail_start("a\nb\nc", 1)..], "c");
        assert_eq!(tail_start("", 1), 0);
    }

    #[test]
    fn skip_prefix_counts_off_across_pieces() {
        let mut skip = 7;
        assert_eq!(skip_prefix("abc", &mut skip), "");
        assert_eq!(skip, 4);
        assert_eq!(skip_prefix("defghij", &mut skip), "hij");
        assert_eq!(skip, 0);
        assert_eq!(skip_prefix("k", &mut skip), "k");
        // Never inside a character.
        let mut skip = 1;
        assert_eq!(skip_prefix("éx", &mut skip), "x");
    }
}
