//! End-to-end tests of the agent API as a rebalancer uses it: the event stream, the host and
//! container views, the remote API over QUIC with pinned client certificates, asynchronous moves,
//! metrics, version negotiation and `mig rebalance`. Run as root. Labs use subnets 70-79.

use anyhow::{ensure, Context, Result};
use mig_tests::{bin, is_root, Agent};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mig events --json` against `agent`, reading lines on a thread.
fn events(agent: &Agent, extra: &[&str]) -> Result<(Proc, std::sync::mpsc::Receiver<String>)> {
    let mut child = Command::new(bin("mig"))
        .arg("events")
        .arg("--json")
        .args(extra)
        .env("MIG_SOCKET", &agent.socket)
        .env_remove("MIG_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mig events")?;
    let stdout = child.stdout.take().context("events stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The subscription is in place once the client read its Ok; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    Ok((Proc(child), rx))
}

fn next_event(rx: &std::sync::mpsc::Receiver<String>) -> Result<serde_json::Value> {
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .context("no event within 30 s")?;
    serde_json::from_str(&line).with_context(|| format!("event is not JSON: {line}"))
}

/// Reads events until one of type `ty` arrives; returns it and the types skipped on the way.
fn wait_for(
    rx: &std::sync::mpsc::Receiver<String>,
    ty: &str,
) -> Result<(serde_json::Value, Vec<String>)> {
    let mut skipped = Vec::new();
    loop {
        let e = next_event(rx).with_context(|| format!("waiting for {ty} after {skipped:?}"))?;
        if e["type"] == ty {
            return Ok((e, skipped));
        }
        skipped.push(e["type"].as_str().unwrap_or_default().to_owned());
    }
}

#[test]
fn events_see_started_stopped_checkpointed_restored() -> Result<()> {
    if !is_root("events_see_started_stopped_checkpointed_restored") {
        return Ok(());
    }
    let agent = Agent::start("api_events")?;
    agent.import_busybox()?;
    let (_p, rx) = events(&agent, &["--container", "ev"])?;
    // Another container's events are filtered out.
    agent.mig_ok(&["run", "--name", "other", "busybox", "--", "true"])?;
    agent.mig_ok(&[
        "run", "-d", "--name", "ev", "busybox", "--", "sleep", "1000",
    ])?;
    let e = next_event(&rx)?;
    ensure!(e["type"] == "container_started" && e["name"] == "ev", "{e}");
    ensure!(
        e["host"] == agent.name.as_str() && e["seq"].as_u64() > Some(0),
        "{e}"
    );
    agent.mig_ok(&["checkpoint", "ev"])?;
    let (e, _) = wait_for(&rx, "container_checkpointed")?;
    ensure!(e["leave_running"] == false, "{e}");
    agent.mig_ok(&["restore", "ev"])?;
    wait_for(&rx, "container_restored")?;
    agent.mig_ok(&["stop", "-t", "1", "ev"])?;
    let (e, _) = wait_for(&rx, "container_stopped")?;
    ensure!(e["name"] == "ev", "{e}");
    agent.mig_ok(&["rm", "ev"])?;
    let (_, skipped) = wait_for(&rx, "container_removed")?;
    ensure!(skipped.is_empty(), "unexpected events {skipped:?}");
    agent.mig_ok(&["rm", "other"])?;
    Ok(())
}
