//! The `mig` command line against real agents: which agent a command reaches (options, their
//! variables, the lab file), exit codes and output as podman users expect them. Each test is a
//! mismatch session 16's QA found (docs/notes: s16/qa-ux/REPORT.md).
//!
//! Needs root (the agents run containers). No network namespaces: two standalone agents are
//! made lab hosts by a lab file of their own (`/run/mig/lab-<name>.json`) naming their sockets,
//! which is all `--host` and `MIG_HOST` read.

use anyhow::{ensure, Context, Result};
use mig_tests::{bin, Agent, MigOutput};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A lab file naming standalone agents as hosts `host-a`, `host-b`...; removed when dropped.
struct FakeLab {
    name: String,
    path: PathBuf,
}

impl FakeLab {
    fn new(tag: &str, agents: &[&Agent]) -> Result<FakeLab> {
        let name = format!("{tag}{}", std::process::id() % 100_000);
        let path = mig_agent::lab::lab_file_path(&name);
        let hosts: Vec<serde_json::Value> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                serde_json::json!({
                    "name": format!("host-{}", (b'a' + i as u8) as char),
                    "address": format!("10.79.74.{}", 10 + i),
                    "netns": format!("{name}-none"),
                    "socket": a.socket,
                    "state_dir": a.state_dir,
                    "agent_pid": a.pid(),
                    "fingerprint": null,
                    "quic_port": 7878,
                })
            })
            .collect();
        let file = serde_json::json!({
            "name": name,
            "phase": "up",
            "subnet": "10.79.74.0/24",
            "switch_netns": format!("{name}-none"),
            "bridge": "none",
            "root_dir": "/nonexistent",
            "state_root": "/nonexistent",
            "migd": bin("migd"),
            "extra_agent_args": [],
            "hosts": hosts,
        });
        std::fs::create_dir_all(path.parent().context("lab file path")?)?;
        std::fs::write(&path, serde_json::to_vec_pretty(&file)?)?;
        Ok(FakeLab { name, path })
    }

    /// Runs `mig args` with exactly the variables `env` of the ones that choose an agent (and
    /// MIG_LAB naming this lab).
    fn mig(&self, env: &[(&str, &Path)], args: &[&str]) -> MigOutput {
        let mut cmd = Command::new(bin("mig"));
        cmd.args(args)
            .env("MIG_LAB", &self.name)
            .stdin(Stdio::null());
        for var in [
            "MIG_SOCKET",
            "MIG_HOST",
            "MIG_REMOTE",
            "MIG_REMOTE_FINGERPRINT",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("running mig").into()
    }
}

impl Drop for FakeLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The name of the agent a `mig info --json` reached.
fn reached(o: &MigOutput) -> Result<String> {
    ensure!(o.code == 0, "mig info: {o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout)?;
    Ok(v["name"].as_str().unwrap_or_default().to_owned())
}

/// REPORT #1 and #12: `MIG_HOST=host-a mig drain --socket B` drained host-a (the positional
/// HOST shared the global --host's clap id, so MIG_HOST filled it), `mig drain --host X` was
/// refused, and an exported MIG_SOCKET silently beat `--host` on the command line. Now an
/// option on the command line wins over the variables of the others, drain takes --socket and
/// --host as every command does, and its positional HOST wins over both.
#[test]
fn command_line_options_beat_the_environment_and_drain_follows_them() -> Result<()> {
    if !mig_tests::is_root("cli tests") {
        return Ok(());
    }
    let a = Agent::start("cli-choice-a")?;
    let b = Agent::start("cli-choice-b")?;
    let lab = FakeLab::new("clih", &[&a, &b])?;
    let (sock_a, sock_b) = (a.socket.as_path(), b.socket.as_path());
    let host_a = Path::new("host-a");
    let host_b = Path::new("host-b");

    // Which agent each combination reaches.
    for (env, args, want) in [
        (&[("MIG_SOCKET", sock_a)][..], &["--host", "host-b"][..], &b),
        (
            &[("MIG_HOST", host_a)],
            &["--socket", sock_b.to_str().unwrap()],
            &b,
        ),
        (&[("MIG_SOCKET", sock_a), ("MIG_HOST", host_b)], &[], &a),
        (&[("MIG_HOST", host_b)], &[], &b),
        // Among command-line options the documented order stays: --socket before --host.
        (
            &[],
            &["--host", "host-a", "--socket", sock_b.to_str().unwrap()],
            &b,
        ),
    ] {
        let mut line = vec!["info", "--json"];
        line.extend_from_slice(args);
        let got = reached(&lab.mig(env, &line))?;
        ensure!(got == want.name, "{env:?} mig {line:?} reached {got}");
    }

    // Drain: host-a runs a container and has no peer, so draining it fails saying so; host-b
    // is empty, so draining it succeeds. That tells which host a drain reached.
    a.import_busybox()?;
    a.mig_ok(&[
        "run", "-d", "--name", "busy", "busybox", "--", "sleep", "1000",
    ])?;
    let drained_a = |o: &MigOutput| o.code == 125 && o.stderr.contains("no pinned peer");
    let drained_b = |o: &MigOutput| o.code == 0 && o.stdout.contains("host empty");

    let o = lab.mig(
        &[("MIG_HOST", host_b)],
        &["drain", "--socket", sock_a.to_str().unwrap()],
    );
    ensure!(drained_a(&o), "MIG_HOST=host-b drain --socket A: {o:?}");
    let o = lab.mig(&[], &["drain", "--host", "host-a"]);
    ensure!(drained_a(&o), "drain --host host-a: {o:?}");
    let o = lab.mig(&[], &["--host", "host-b", "drain"]);
    ensure!(drained_b(&o), "--host host-b drain: {o:?}");
    let o = lab.mig(&[("MIG_SOCKET", sock_b)], &["drain", "--host", "host-a"]);
    ensure!(drained_a(&o), "MIG_SOCKET=B drain --host host-a: {o:?}");
    // The positional HOST wins over the options and the variables.
    let o = lab.mig(&[("MIG_HOST", host_a)], &["drain", "host-b"]);
    ensure!(drained_b(&o), "MIG_HOST=host-a drain host-b: {o:?}");
    let o = lab.mig(
        &[],
        &["drain", "--socket", sock_b.to_str().unwrap(), "host-a"],
    );
    ensure!(drained_a(&o), "drain --socket B host-a: {o:?}");
    Ok(())
}

/// REPORT #4: `mig run IMAGE -- nosuchcmd` exited 125 while `mig exec` and podman give 127 for
/// a command that is not there and 126 for one that cannot be executed. Attached or with -d, the
/// agent's one-line reason stays on stderr.
#[test]
fn run_of_a_command_that_cannot_run_exits_127_or_126() -> Result<()> {
    if !mig_tests::is_root("cli tests") {
        return Ok(());
    }
    let a = Agent::start("cli-run-127")?;
    a.import_busybox()?;
    for (detach, cmd, code, words) in [
        (false, "nosuchcmd", 127, "is not in the image"),
        (true, "nosuchcmd", 127, "is not in the image"),
        (false, "/no/such/file", 127, "is not in the image"),
        (false, "/etc/passwd", 126, "cannot be executed"),
        (true, "/etc/passwd", 126, "cannot be executed"),
    ] {
        let mut args = vec!["run"];
        if detach {
            args.push("-d");
        }
        args.extend(["busybox", "--", cmd]);
        let o = a.mig(&args);
        ensure!(o.code == code, "mig {args:?}: {o:?}");
        ensure!(o.stdout.is_empty(), "mig {args:?}: {o:?}");
        let lines: Vec<&str> = o.stderr.lines().collect();
        ensure!(
            lines.len() == 1 && lines[0].starts_with("mig: ") && lines[0].contains(words),
            "mig {args:?}: {o:?}"
        );
    }
    // A command that runs and fails keeps its own code.
    let o = a.mig(&["run", "busybox", "--", "sh", "-c", "exit 7"]);
    ensure!(o.code == 7, "{o:?}");

    // A file that is there but whose interpreter is not: the kernel says ENOENT, and "not in
    // the image" sent the user looking for a file that exists (QA of session 26).
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("bin/s");
    std::fs::create_dir_all(script.parent().context("parent")?)?;
    std::fs::write(&script, "#!/usr/bin/python3\nprint(1)\n")?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    a.mig_ok(&[
        "image",
        "import",
        &dir.path().display().to_string(),
        "--name",
        "scr",
    ])?;
    for cmd in ["/bin/s", "s"] {
        let o = a.mig(&["run", "scr", "--", cmd]);
        ensure!(
            o.code == 126
                && o.stderr.contains("cannot be executed")
                && o.stderr.contains("it is /bin/s in the image")
                && o.stderr.contains("/usr/bin/python3"),
            "{cmd}: {o:?}"
        );
    }
    a.mig_ok(&[
        "run", "-d", "--name", "ex", "busybox", "--", "sleep", "1000",
    ])?;
    a.mig_ok(&[
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "printf '#!/no/perl\\n' > /bin/pl && chmod 755 /bin/pl",
    ])?;
    let o = a.mig(&["exec", "ex", "--", "pl"]);
    ensure!(
        o.code == 126
            && o.stderr.contains("it is /bin/pl in the container")
            && o.stderr.contains("/no/perl"),
        "{o:?}"
    );
    let o = a.mig(&["exec", "ex", "--", "nosuchcmd"]);
    ensure!(o.code == 127, "{o:?}");
    Ok(())
}

/// REPORT #15, podman habits: `ps -q` and `image ls -q` print ids only, `-e KEY` takes KEY's
/// value from mig's environment (left out when unset), `run --rm` removes the container when it
/// ends (attached only: `-d --rm` is refused saying so, not with a tip naming --remote).
#[test]
fn podman_habits_quiet_lists_bare_env_and_run_rm() -> Result<()> {
    if !mig_tests::is_root("cli tests") {
        return Ok(());
    }
    let a = Agent::start("cli-habits")?;
    a.import_busybox()?;
    let id = a.mig_ok(&[
        "run", "-d", "--name", "q1", "busybox", "--", "sleep", "1000",
    ])?;
    let id = id.trim();
    a.mig_ok(&["run", "--name", "q2", "busybox", "--", "true"])?;
    ensure!(a.mig_ok(&["ps", "-q"])? == format!("{}\n", &id[..12]));
    let all = a.mig_ok(&["ps", "-aq"])?;
    ensure!(all.lines().count() == 2, "{all}");
    ensure!(
        all.lines()
            .all(|l| l.len() == 12 && l.bytes().all(|b| b.is_ascii_hexdigit())),
        "{all}"
    );
    let images = a.mig_ok(&["image", "ls", "-q"])?;
    let v = a.mig_json(&["image", "ls", "--json"])?;
    let full = v[0]["id"].as_str().unwrap_or_default();
    let full = full.strip_prefix("sha256:").unwrap_or(full);
    ensure!(images == format!("{}\n", &full[..12]), "{images} vs {v}");

    // -e KEY: from mig's environment; unset, left out.
    let o: MigOutput = Command::new(bin("mig"))
        .args(["exec", "-e", "HABIT_SET", "-e", "HABIT_UNSET", "q1", "env"])
        .env("MIG_SOCKET", &a.socket)
        .env("HABIT_SET", "from mig")
        .env_remove("HABIT_UNSET")
        .output()?
        .into();
    ensure!(
        o.code == 0 && o.stdout.contains("HABIT_SET=from mig\n"),
        "{o:?}"
    );
    ensure!(!o.stdout.contains("HABIT_UNSET"), "{o:?}");
    let o: MigOutput = Command::new(bin("mig"))
        .args(["run", "--rm", "-e", "HABIT_SET", "busybox", "--", "env"])
        .env("MIG_SOCKET", &a.socket)
        .env("HABIT_SET", "run too")
        .output()?
        .into();
    ensure!(
        o.code == 0 && o.stdout.contains("HABIT_SET=run too\n"),
        "{o:?}"
    );

    // --rm: the container is gone when mig returns, with the container's exit code.
    let o = a.mig(&[
        "run", "--rm", "--name", "gone", "busybox", "--", "sh", "-c", "exit 3",
    ]);
    ensure!(o.code == 3, "{o:?}");
    let o = a.mig(&[
        "run",
        "--rm",
        "--name",
        "nocmd",
        "busybox",
        "--",
        "nosuchcmd",
    ]);
    ensure!(o.code == 127, "{o:?}");
    let names = a.mig_ok(&["ps", "-a"])?;
    ensure!(
        !names.contains("gone") && !names.contains("nocmd"),
        "{names}"
    );
    ensure!(a.mig_ok(&["ps", "-aq"])?.lines().count() == 2);
    let o = a.mig(&["run", "-d", "--rm", "busybox", "--", "true"]);
    ensure!(
        o.code == 125
            && o.stderr.starts_with("mig: --rm needs an attached run")
            && !o.stderr.contains("--remote"),
        "{o:?}"
    );
    ensure!(a.mig_ok(&["ps", "-aq"])?.lines().count() == 2);
    Ok(())
}

/// REPORT #5: `mig rm a1 nosuch` printed "mig: nosuch: no such container: nosuch" and a
/// summary "mig: 1 of 2 operations failed". Now: one line per failed target, naming it once,
/// the others done, exit 125.
#[test]
fn several_targets_one_line_per_failure() -> Result<()> {
    if !mig_tests::is_root("cli tests") {
        return Ok(());
    }
    let a = Agent::start("cli-targets")?;
    a.import_busybox()?;
    a.mig_ok(&["run", "--name", "done1", "busybox", "--", "true"])?;
    let o = a.mig(&["rm", "done1", "nosuch"]);
    ensure!(o.code == 125 && o.stdout == "done1\n", "{o:?}");
    ensure!(o.stderr == "mig: no such container: nosuch\n", "{o:?}");
    let o = a.mig(&["stop", "nosuch1", "nosuch2"]);
    ensure!(o.code == 125 && o.stdout.is_empty(), "{o:?}");
    ensure!(
        o.stderr == "mig: no such container: nosuch1\nmig: no such container: nosuch2\n",
        "{o:?}"
    );
    let o = a.mig(&["kill", "nosuch"]);
    ensure!(
        o.code == 125 && o.stderr == "mig: no such container: nosuch\n",
        "{o:?}"
    );
    // inspect takes several too (QA of session 30, F4): a JSON array of those found.
    a.mig_ok(&["run", "--name", "done2", "busybox", "--", "true"])?;
    let o = a.mig(&["inspect", "--json", "done2", "nosuch", "done2"]);
    let found: serde_json::Value = serde_json::from_str(&o.stdout)?;
    ensure!(
        o.code == 125
            && found.as_array().map(Vec::len) == Some(2)
            && found[0]["name"] == "done2"
            && o.stderr == "mig: no such container: nosuch\n",
        "{o:?}"
    );
    Ok(())
}

/// `--decide` without `--resolve` is a usage error, not a move (QA of session 22: `mig move C
/// PEER --decide committed` moved the container), and a move's options are refused with
/// `--resolve`, whose resolution would ignore them.
#[test]
fn a_resolution_refuses_a_moves_options() -> Result<()> {
    if !mig_tests::is_root("cli tests") {
        return Ok(());
    }
    let a = Agent::start("cli-decide")?;
    a.import_busybox()?;
    a.mig_ok(&[
        "run", "-d", "--name", "d1", "busybox", "--", "sleep", "1000",
    ])?;
    let o = a.mig(&["move", "d1", "host-b", "--decide", "committed"]);
    ensure!(
        o.code == 125 && o.stderr.contains("needs --resolve") && o.stdout.is_empty(),
        "{o:?}"
    );
    for extra in [
        &["--mode", "lazy"][..],
        &["--max-downtime", "5"],
        &["--tcp-established"],
        &["--no-memory-presync"],
    ] {
        let mut args = vec!["move", "--resolve", "d1"];
        args.extend_from_slice(extra);
        let o = a.mig(&args);
        ensure!(
            o.code == 125 && o.stderr.contains("cannot be used"),
            "{args:?}: {o:?}"
        );
    }
    ensure!(
        a.mig_json(&["inspect", "d1", "--json"])?["state"] == "running",
        "d1 was touched"
    );
    Ok(())
}
