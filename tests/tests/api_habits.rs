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

/// Reads events from `c` until one of type `ty` for container `name` arrives.
async fn event_of(
    c: &mut mig_agent::client::Client,
    ty: &str,
    name: &str,
) -> Result<serde_json::Value> {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), c.next_event())
            .await
            .with_context(|| format!("no {ty} event within 60 s"))??;
        let v = serde_json::to_value(&e)?;
        if v["type"] == ty && v["name"] == name {
            return Ok(v);
        }
    }
}

/// `container_stopped` of a kill: `exit_code` 128+signal (as `mig inspect` and `ps` say) and
/// `signal`; of an exit: the code and no signal. A move away is told from a kill by `moved_to`.
#[test]
fn stopped_events_carry_the_signal_and_a_move_says_where_to() -> Result<()> {
    if !is_root("stopped_events_carry_the_signal_and_a_move_says_where_to") {
        return Ok(());
    }
    let lab = mig_tests::lab::Lab::up("s16e", 75)?;
    let socket = lab.hosts[0].socket.clone();
    let peer = lab.hosts[1].name.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut ev = rt.block_on(async {
        let mut ev = mig_agent::client::Client::connect(&socket).await?;
        ev.subscribe_events().await?;
        anyhow::Ok(ev)
    })?;

    lab.mig_ok(
        0,
        &["run", "-d", "--name", "k", "busybox", "--", "sleep", "100"],
    )?;
    lab.mig_ok(0, &["kill", "k"])?;
    let e = rt.block_on(event_of(&mut ev, "container_stopped", "k"))?;
    ensure!(
        e["exit_code"] == 137 && e["signal"] == 9 && e["moved_to"].is_null(),
        "{e}"
    );
    let i = lab.mig_json(0, &["inspect", "--json", "k"])?;
    ensure!(i["exit_code"] == 137 && i["signal"] == 9, "{i}");
    let e = {
        lab.mig_ok(
            0,
            &["run", "--name", "x", "busybox", "--", "sh", "-c", "exit 3"],
        )
        .ok();
        rt.block_on(event_of(&mut ev, "container_stopped", "x"))?
    };
    ensure!(
        e["exit_code"] == 3 && e["signal"].is_null() && e["moved_to"].is_null(),
        "{e}"
    );

    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "mv", "busybox", "--", "sleep", "1000",
        ],
    )?;
    lab.mig_ok(0, &["move", "mv", &peer])?;
    let stopped = rt.block_on(event_of(&mut ev, "container_stopped", "mv"))?;
    let removed = rt.block_on(event_of(&mut ev, "container_removed", "mv"))?;
    ensure!(stopped["moved_to"] == peer.as_str(), "{stopped}");
    ensure!(removed["moved_to"] == peer.as_str(), "{removed}");
    Ok(())
}

/// A hello whose version is not a number gets the agent's hello and an error frame, not a
/// silent close.
#[test]
fn a_hello_with_a_version_that_is_not_a_number_gets_an_error() -> Result<()> {
    use std::io::{Read, Write};
    if !is_root("a_hello_with_a_version_that_is_not_a_number_gets_an_error") {
        return Ok(());
    }
    let agent = Agent::start("bad_hello")?;
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let hello = br#"{"api_version":"three","software":"raw 0"}"#;
    s.write_all(&(hello.len() as u32).to_be_bytes())?;
    s.write_all(hello)?;
    let mut get = || -> Result<serde_json::Value> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .context("the agent closed without a word")?;
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf)?;
        Ok(serde_json::from_slice(&buf)?)
    };
    let h = get()?;
    ensure!(h["api_version"].is_u64(), "{h}");
    let r = get()?;
    let msg = r["body"]["message"].as_str().unwrap_or_default();
    ensure!(
        r["kind"] == "error"
            && r["body"]["kind"] == "invalid_argument"
            && msg.contains("hello is not valid"),
        "{r}"
    );
    Ok(())
}

/// A command that is not in the image, or cannot be executed, is the caller's mistake:
/// `invalid_argument`, with the words the CLI turns into exit 127 and 126.
#[test]
fn a_command_that_cannot_run_is_an_invalid_argument() -> Result<()> {
    if !is_root("a_command_that_cannot_run_is_an_invalid_argument") {
        return Ok(());
    }
    let agent = Agent::start("cmd_not_run")?;
    agent.import_busybox()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = agent.socket.clone();
    rt.block_on(async move {
        use mig_agent::api::{ErrorKind, RunRequest};
        let mut c = mig_agent::client::Client::connect(&socket).await?;
        for (cmd, words) in [
            ("nosuchcmd", "is not in the image"),
            ("/etc/passwd", "cannot be executed"),
        ] {
            let req = RunRequest {
                image: "busybox".into(),
                args: vec![cmd.into()],
                ..RunRequest::default()
            };
            let e = c.run(req).await.expect_err(cmd);
            anyhow::ensure!(
                e.api_kind() == Some(ErrorKind::InvalidArgument) && e.to_string().contains(words),
                "{cmd}: {:?} {e}",
                e.api_kind()
            );
        }
        anyhow::Ok(())
    })?;
    // The CLI's exit codes (matched on the words) still hold.
    ensure!(agent.mig(&["run", "busybox", "--", "nosuchcmd"]).code == 127);
    ensure!(agent.mig(&["run", "busybox", "--", "/etc/passwd"]).code == 126);
    Ok(())
}
