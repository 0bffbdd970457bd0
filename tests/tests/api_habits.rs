//! API and CLI habits from the session-16 QA report: `kill` then `rm` (item 6), the
//! `container_stopped` event of a kill (item 8), a client facing an agent of a newer version
//! (item 9). Run as root.

use anyhow::{ensure, Context, Result};
use mig_tests::{is_root, Agent};
use std::time::{Duration, Instant};

/// `mig kill X && mig rm X` works: kill with the default KILL returns once the container ended.
#[test]
fn kill_then_rm_works_and_other_signals_return_at_once() -> Result<()> {
    if !is_root("kill_then_rm_works_and_other_signals_return_at_once") {
        return Ok(());
    }
    let agent = Agent::start("kill_then_rm")?;
    agent.import_busybox()?;
    for i in 0..5 {
        let name = format!("kr{i}");
        agent.mig_ok(&[
            "run", "-d", "--name", &name, "busybox", "--", "sleep", "100",
        ])?;
        agent.mig_ok(&["kill", &name])?;
        let o = agent.mig(&["rm", &name]);
        ensure!(o.code == 0, "rm right after kill ({i}): {o:?}");
    }
    // A signal the container ignores: kill returns at once and the container runs on.
    agent.mig_ok(&[
        "run",
        "-d",
        "--name",
        "term",
        "busybox",
        "--",
        "sh",
        "-c",
        "trap '' TERM; while true; do sleep 1; done",
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    agent.mig_ok(&["kill", "-s", "TERM", "term"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "kill -s TERM took {:?}",
        t.elapsed()
    );
    let i = agent.mig_json(&["inspect", "--json", "term"])?;
    ensure!(i["state"] == "running", "{i}");
    agent.mig_ok(&["kill", "-s", "KILL", "term"])?;
    agent
        .mig_ok(&["rm", "term"])
        .context("rm after kill -s KILL")?;
    Ok(())
}
