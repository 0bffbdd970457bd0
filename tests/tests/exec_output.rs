//! `mig exec` output, byte for byte: binary data, NUL-heavy output and output over the 4 MiB that
//! API versions before 4 return (QA report of session 16, item 2), and the one-answer form those
//! older clients still get. Run as root.

use anyhow::{ensure, Context, Result};
use mig_tests::{bin, is_root, Agent};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `mig ARGS` against `agent` with `stdin` fed to it; stdout and stderr as bytes.
fn mig_bytes(agent: &Agent, args: &[&str], stdin: &[u8]) -> Result<Output> {
    let mut child = Command::new(bin("mig"))
        .args(args)
        .env("MIG_SOCKET", &agent.socket)
        .env_remove("MIG_HOST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mig")?;
    let mut pipe = child.stdin.take().context("stdin")?;
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    Ok(out)
}

#[test]
fn exec_output_is_byte_exact_and_not_capped() -> Result<()> {
    if !is_root("exec_output_is_byte_exact_and_not_capped") {
        return Ok(());
    }
    let agent = Agent::start("exec_bytes")?;
    agent.import_busybox()?;
    agent.mig_ok(&[
        "run", "-d", "--name", "ex", "busybox", "--", "sleep", "1000",
    ])?;

    // Random bytes out of the container, back in through `exec -i` (binary safe), compared there.
    agent.mig_ok(&[
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "head -c 100000 /dev/urandom > /tmp/r",
    ])?;
    let o = mig_bytes(&agent, &["exec", "ex", "--", "cat", "/tmp/r"], b"")?;
    ensure!(o.status.success(), "{o:?}");
    ensure!(
        o.stdout.len() == 100_000,
        "cat gave {} bytes",
        o.stdout.len()
    );
    let o = mig_bytes(
        &agent,
        &[
            "exec",
            "-i",
            "ex",
            "--",
            "sh",
            "-c",
            "cat > /tmp/r2 && cmp /tmp/r /tmp/r2 && echo same",
        ],
        &o.stdout,
    )?;
    ensure!(
        o.status.success() && o.stdout == b"same\n",
        "the bytes changed on the way out: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // NULs: JSON wrote each as six bytes and 3 MB of them overflowed the frame.
    let o = mig_bytes(
        &agent,
        &["exec", "ex", "--", "head", "-c", "3000000", "/dev/zero"],
        b"",
    )?;
    ensure!(
        o.status.success() && o.stdout.len() == 3_000_000 && o.stdout.iter().all(|&b| b == 0),
        "3 MB of NULs: rc {:?}, {} bytes, stderr {}",
        o.status.code(),
        o.stdout.len(),
        String::from_utf8_lossy(&o.stderr)
    );

    // Past the 4 MiB that was cut without a word.
    let o = mig_bytes(
        &agent,
        &["exec", "ex", "--", "sh", "-c", "yes | head -c 5000000"],
        b"",
    )?;
    ensure!(
        o.status.success() && o.stdout.len() == 5_000_000 && o.stderr.is_empty(),
        "5 MB: rc {:?}, {} bytes, stderr {}",
        o.status.code(),
        o.stdout.len(),
        String::from_utf8_lossy(&o.stderr)
    );

    // The streams stay apart, bytes and exit code as the command left them.
    let o = mig_bytes(
        &agent,
        &[
            "exec",
            "ex",
            "--",
            "sh",
            "-c",
            r"printf 'o\377\000' ; printf '\000e\376' >&2; exit 7",
        ],
        b"",
    )?;
    ensure!(
        o.status.code() == Some(7) && o.stdout == b"o\xff\0" && o.stderr == b"\0e\xfe",
        "{o:?}"
    );
    // The shim's own errors are still errors, not output.
    let o = agent.mig(&["exec", "-w", "/nonexistent", "ex", "--", "true"]);
    ensure!(
        o.code == 125
            && o.stderr
                .contains("cannot use /nonexistent as the working directory")
            && !o.stderr.contains("mig-shim-error"),
        "{o:?}"
    );
    agent.mig_ok(&["rm", "-f", "ex"])?;
    Ok(())
}

fn put(s: &mut UnixStream, body: &[u8]) -> Result<()> {
    s.write_all(&(body.len() as u32).to_be_bytes())?;
    s.write_all(body)?;
    Ok(())
}

fn get(s: &mut UnixStream) -> Result<serde_json::Value> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).context("reading a frame")?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(serde_json::from_slice(&buf)?)
}

/// A raw connection offering API `version`; returns it with the agent's hello.
fn raw(agent: &Agent, version: u32) -> Result<(UnixStream, serde_json::Value)> {
    let mut s = UnixStream::connect(&agent.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let hello = serde_json::json!({"api_version": version, "software": "raw-client 0.0.1"});
    put(&mut s, hello.to_string().as_bytes())?;
    let h = get(&mut s)?;
    Ok((s, h))
}

fn exec_req(args: &[&str]) -> Vec<u8> {
    serde_json::json!({"op": "exec", "container": "ex", "args": args, "env": []})
        .to_string()
        .into_bytes()
}

#[test]
fn older_api_versions_get_one_exec_answer_and_a_cut_is_said() -> Result<()> {
    if !is_root("older_api_versions_get_one_exec_answer_and_a_cut_is_said") {
        return Ok(());
    }
    let agent = Agent::start("exec_versions")?;
    agent.import_busybox()?;
    agent.mig_ok(&[
        "run", "-d", "--name", "ex", "busybox", "--", "sleep", "1000",
    ])?;

    // Version 3: one `exec` answer, as before.
    let (mut s, h) = raw(&agent, 3)?;
    ensure!(h["api_version"] == 3, "{h}");
    put(
        &mut s,
        &exec_req(&["sh", "-c", "echo hi; echo err >&2; exit 3"]),
    )?;
    let r = get(&mut s)?;
    ensure!(
        r["kind"] == "exec"
            && r["body"]["code"] == 3
            && r["body"]["stdout"] == "hi\n"
            && r["body"]["stderr"] == "err\n"
            && r["body"].get("truncated").is_none(),
        "{r}"
    );
    // Over the cap, and NULs that JSON writes as six bytes each: the answer still arrives (it
    // overflowed the frame and the connection closed), and says it was cut.
    put(
        &mut s,
        &exec_req(&["sh", "-c", "head -c 5000000 /dev/zero; exit 4"]),
    )?;
    let r = get(&mut s)?;
    let stderr = r["body"]["stderr"].as_str().unwrap_or_default();
    ensure!(
        r["kind"] == "exec"
            && r["body"]["code"] == 4
            && r["body"]["truncated"] == true
            && stderr.contains("exec output cut")
            && stderr.contains("of 5000000 bytes of stdout"),
        "kind {} code {} truncated {} stderr {stderr}",
        r["kind"],
        r["body"]["code"],
        r["body"]["truncated"]
    );
    // The connection lives on.
    put(&mut s, br#"{"op":"list","all":true}"#)?;
    ensure!(get(&mut s)?["kind"] == "containers");

    // Version 4: `exec_data` frames (base64), then `exec_end`.
    let (mut s, h) = raw(&agent, 4)?;
    ensure!(h["api_version"] == 4, "{h}");
    put(
        &mut s,
        &exec_req(&["sh", "-c", r"printf 'a\000'; printf b >&2; exit 5"]),
    )?;
    let mut kinds = Vec::new();
    let mut out = String::new();
    loop {
        let r = get(&mut s)?;
        let kind = r["kind"].as_str().unwrap_or_default().to_owned();
        if kind == "exec_data" && r["body"]["stream"] == "stdout" {
            out.push_str(r["body"]["data"].as_str().unwrap_or_default());
        }
        kinds.push(kind.clone());
        if kind != "exec_data" {
            ensure!(kind == "exec_end" && r["body"]["code"] == 5, "{r}");
            break;
        }
    }
    // "a\0" in base64 (one piece here: printf writes it at once).
    ensure!(out == "YQA=", "stdout {out:?}, frames {kinds:?}");
    agent.mig_ok(&["rm", "-f", "ex"])?;
    Ok(())
}
