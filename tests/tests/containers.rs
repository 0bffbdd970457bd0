//! End-to-end tests of single-host containers through the real `migd`, `mig` and `mig-shim`
//! binaries, real namespaces, overlay mounts and cgroups. Run as root.

use anyhow::{ensure, Context, Result};
use mig_tests::{busybox_rootfs, mounts_under, pid_alive, tar_of, wait_until, Agent};
use std::time::Duration;

fn run_detached(agent: &Agent, args: &[&str]) -> Result<String> {
    let mut full = vec!["run", "-d"];
    full.extend_from_slice(args);
    Ok(agent.mig_ok(&full)?.trim().to_owned())
}

fn inspect(agent: &Agent, id: &str) -> Result<serde_json::Value> {
    agent.mig_json(&["inspect", id, "--json"])
}

/// Runs `sh -c script` (which prints `ready` when set) detached in busybox with `extra` run
/// options, and waits until its log says `ready`; returns the id.
fn run_until_ready(agent: &Agent, extra: &[&str], script: &str) -> Result<String> {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend_from_slice(&["busybox", "--", "sh", "-c", script]);
    let id = run_detached(agent, &args)?;
    ensure!(
        wait_until(Duration::from_secs(5), || agent
            .mig_ok(&["logs", &id])
            .is_ok_and(|l| l.contains("ready"))),
        "not ready"
    );
    Ok(id)
}

#[test]
fn image_import_from_rootfs_dir_and_tar() -> Result<()> {
    let agent = Agent::start("image_import")?;
    agent.import_busybox()?;
    let rootfs = agent.dir.path().join("rootfs");
    let tar = tar_of(&rootfs, agent.dir.path(), "bb.tar")?;
    let tgz = tar_of(&rootfs, agent.dir.path(), "bb.tar.gz")?;
    agent.mig_ok(&["image", "import", tar.to_str().unwrap(), "--name", "bbtar"])?;
    agent.mig_ok(&["image", "import", tgz.to_str().unwrap(), "--name", "bbtgz"])?;
    let images = agent.mig_json(&["image", "ls", "--json"])?;
    let names: Vec<&str> = images
        .as_array()
        .context("image list")?
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    for n in ["busybox", "bbtar", "bbtgz"] {
        ensure!(names.contains(&n), "{n} missing from {names:?}");
    }
    // A container from the tar image runs attached and returns its output and exit code.
    let o = agent.mig(&[
        "run",
        "--name",
        "fromtar",
        "bbtar",
        "--",
        "sh",
        "-c",
        "echo hi-from-tar; exit 4",
    ]);
    ensure!(o.code == 4, "attached run exited {}: {}", o.code, o.stderr);
    ensure!(o.stdout.contains("hi-from-tar"), "stdout: {}", o.stdout);
    agent.mig_ok(&["rm", "fromtar"])?;
    agent.mig_ok(&["image", "rm", "bbtgz"])?;
    let missing = agent.mig(&["image", "import", "/nonexistent/x.tar", "--name", "x"]);
    ensure!(
        missing.code == 125 && missing.stderr.lines().count() == 1,
        "{missing:?}"
    );
    // A tree holding the state directory (`/` too) is refused at once: the import would copy it
    // into itself without end (QA of session 25: a bundle's root.path of `/`).
    let holder = agent.state_dir.parent().context("state dir parent")?;
    let own = agent.mig(&[
        "image",
        "import",
        holder.to_str().unwrap(),
        "--name",
        "itself",
    ]);
    ensure!(
        own.code == 125 && own.stderr.contains("holds this agent's state directory"),
        "{own:?}"
    );
    Ok(())
}

#[test]
fn run_ps_inspect_logs_exec() -> Result<()> {
    let agent = Agent::start("run_ps_inspect")?;
    agent.import_busybox()?;
    let id = run_detached(
        &agent,
        &[
            "--name",
            "web",
            "--memory",
            "64M",
            "--pids",
            "50",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo hello-log; exec sleep 1000",
        ],
    )?;
    ensure!(id.len() == 32, "run printed {id:?}");
    let ps = agent.mig_json(&["ps", "--json"])?;
    let row = ps
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id.as_str()))
        .context("container missing from ps")?;
    ensure!(row["state"] == "running" && row["name"] == "web", "{row}");
    // Named by name, by unique id prefix and by full id.
    let d = inspect(&agent, &id[..6])?;
    ensure!(d["state"] == "running", "{d}");
    ensure!(d["host"] == agent.name.as_str(), "{d}");
    ensure!(d["image"]["name"] == "busybox", "{d}");
    ensure!(d["limits"]["memory"] == 64u64 << 20, "{d}");
    let map = d["pid_map"].as_array().context("pid_map")?;
    let init = map
        .iter()
        .find(|p| p["ns_pid"] == 1)
        .context("no ns_pid 1 in pid_map")?;
    let host_pid = init["host_pid"].as_i64().context("host_pid")? as i32;
    ensure!(host_pid > 1 && pid_alive(host_pid), "{init}");
    ensure!(
        init["cmd"].as_str().unwrap_or_default().contains("sleep"),
        "{init}"
    );
    ensure!(d["usage"]["pids"].as_u64().unwrap_or(0) >= 1, "{d}");
    ensure!(
        wait_until(Duration::from_secs(5), || agent
            .mig_ok(&["logs", "web"])
            .is_ok_and(|l| l.contains("hello-log"))),
        "log never showed the output"
    );
    // The container's output and the shim's diagnostics are root's alone.
    let dir = agent.state_dir.join("containers").join(&id);
    for log in ["container.log", "shim.log"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(log))?.permissions(),
        );
        ensure!(mode & 0o7777 == 0o600, "{log} has mode {mode:o}");
    }
    // exec: output, exit codes, the container's hostname, extra env.
    let o = agent.mig(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    ensure!(
        o.code == 3 && o.stdout == "out\n" && o.stderr == "err\n",
        "{o:?}"
    );
    ensure!(agent.mig_ok(&["exec", "web", "--", "hostname"])? == "web\n");
    let o = agent.mig(&[
        "exec",
        "-e",
        "GREETING=hey",
        "web",
        "--",
        "sh",
        "-c",
        "echo $GREETING",
    ]);
    ensure!(o.code == 0 && o.stdout == "hey\n", "{o:?}");
    ensure!(agent.mig(&["exec", "web", "--", "false"]).code == 1);
    // A command that cannot run exits like a shell says: 127 not found, 126 not executable.
    let o = agent.mig(&["exec", "web", "--", "nonexistent"]);
    ensure!(
        o.code == 127 && o.stderr.contains("nonexistent") && o.stderr.contains("not found"),
        "{o:?}"
    );
    let o = agent.mig(&["exec", "web", "--", "/etc/passwd"]);
    ensure!(
        o.code == 126 && o.stderr.contains("permission denied"),
        "{o:?}"
    );
    // Removing a running container needs -f; names stay unique.
    let o = agent.mig(&["rm", "web"]);
    ensure!(o.code == 125 && o.stderr.starts_with("mig: "), "{o:?}");
    let o = agent.mig(&["run", "-d", "--name", "web", "busybox", "--", "true"]);
    ensure!(o.code == 125, "{o:?}");
    agent.mig_ok(&["rm", "-f", "web"])?;
    ensure!(
        wait_until(Duration::from_secs(5), || !pid_alive(host_pid)),
        "init survived rm -f"
    );
    Ok(())
}

#[test]
fn stop_and_rm_leave_no_mount_cgroup_or_process() -> Result<()> {
    let agent = Agent::start("stop_rm")?;
    agent.import_busybox()?;
    let id = run_detached(&agent, &["--name", "s", "busybox", "--", "sleep", "1000"])?;
    let d = inspect(&agent, &id)?;
    let host_pid = d["pid_map"][0]["host_pid"].as_i64().context("host_pid")? as i32;
    let shim_pid = d["shim_pid"].as_i64().context("shim_pid")? as i32;
    let cgroup = d["cgroup"].as_str().context("cgroup")?.to_owned();
    ensure!(
        !Agent::cgroup_dirs(&cgroup).is_empty(),
        "no cgroup dir for {cgroup}"
    );
    let rootfs = agent.state_dir.join("containers").join(&id).join("rootfs");
    ensure!(!mounts_under(&rootfs).is_empty(), "rootfs not mounted");
    // sleep as PID 1 ignores SIGTERM: stop kills it after the timeout.
    let t = std::time::Instant::now();
    agent.mig_ok(&["stop", "-t", "1", "s"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t.elapsed()
    );
    let d = inspect(&agent, &id)?;
    ensure!(d["state"] == "stopped", "{d}");
    ensure!(d["exit_code"] == 137, "{d}");
    ensure!(!pid_alive(host_pid), "init {host_pid} still exists");
    ensure!(
        wait_until(Duration::from_secs(5), || !pid_alive(shim_pid)),
        "shim still exists"
    );
    ensure!(mounts_under(&rootfs).is_empty(), "rootfs still mounted");
    ensure!(
        Agent::cgroup_dirs(&cgroup).is_empty(),
        "cgroup left: {:?}",
        Agent::cgroup_dirs(&cgroup)
    );
    agent.mig_ok(&["rm", "s"])?;
    ensure!(
        !agent.state_dir.join("containers").join(&id).exists(),
        "container dir left"
    );
    let ps = agent.mig_json(&["ps", "-a", "--json"])?;
    ensure!(ps.as_array().is_some_and(|a| a.is_empty()), "{ps}");
    Ok(())
}

#[test]
fn kill_and_logs_follow_end_with_the_container() -> Result<()> {
    let agent = Agent::start("kill_follow")?;
    agent.import_busybox()?;
    let id = run_until_ready(&agent, &[], "trap 'echo got-term; exit 5' TERM; echo one; echo two; echo ready; while true; do sleep 0.1; done")?;
    let follower = std::thread::spawn({
        let socket = agent.socket.clone();
        let id = id.clone();
        move || {
            std::process::Command::new(mig_tests::bin("mig"))
                .args(["logs", "-f", "--tail", "1", &id])
                .env("MIG_SOCKET", socket)
                .output()
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.mig_ok(&["kill", "-s", "TERM", &id])?;
    let out = follower
        .join()
        .map_err(|_| anyhow::anyhow!("follower panicked"))??;
    let text = String::from_utf8_lossy(&out.stdout);
    // Followed from the last line it held: "one" and "two" were left out.
    ensure!(
        out.status.success() && text == "ready\ngot-term\n",
        "{out:?}"
    );
    ensure!(agent.mig_ok(&["logs", "-n", "2", &id])? == "ready\ngot-term\n");
    let d = inspect(&agent, &id)?;
    ensure!(d["exit_code"] == 5 && d["state"] == "stopped", "{d}");
    let o = agent.mig(&["kill", &id]);
    ensure!(o.code == 125, "killing a stopped container: {o:?}");
    Ok(())
}

/// `mig kill -s HUP` (a reload) does not make the container's later end a stop: it exited.
#[test]
fn a_signal_that_does_not_mean_stop_leaves_an_exit_an_exit() -> Result<()> {
    let agent = Agent::start("kill_hup")?;
    agent.import_busybox()?;
    let id = run_until_ready(
        &agent,
        &[],
        "trap 'echo got-hup; exit 3' HUP; echo ready; while true; do sleep 0.1; done",
    )?;
    agent.mig_ok(&["kill", "-s", "HUP", &id])?;
    let mut d = serde_json::Value::Null;
    let ended = wait_until(Duration::from_secs(10), || {
        d = inspect(&agent, &id).unwrap_or_default();
        d["state"] != "running"
    });
    ensure!(
        ended && d["state"] == "exited" && d["exit_code"] == 3,
        "{d}"
    );
    agent.mig_ok(&["rm", &id])?;
    Ok(())
}

/// `mig logs -f` of a container that gets checkpointed ends and says why (it ended silently).
#[test]
fn following_logs_says_when_the_container_was_checkpointed() -> Result<()> {
    let agent = Agent::start("logs_cp")?;
    agent.import_busybox()?;
    let id = run_until_ready(
        &agent,
        &["--name", "cp"],
        "echo ready; while true; do sleep 0.1; done",
    )?;
    let follower = std::thread::spawn({
        let socket = agent.socket.clone();
        move || {
            std::process::Command::new(mig_tests::bin("mig"))
                .args(["logs", "-f", "cp"])
                .env("MIG_SOCKET", socket)
                .output()
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.mig_ok(&["checkpoint", "cp"])?;
    let out = follower
        .join()
        .map_err(|_| anyhow::anyhow!("follower panicked"))??;
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = agent.mig(&["rm", "-f", &id]);
    ensure!(
        out.status.success() && err.contains("cp was checkpointed"),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn migd_restart_keeps_containers_running_and_readopts_them() -> Result<()> {
    let mut agent = Agent::start("restart")?;
    agent.import_busybox()?;
    let id = run_detached(
        &agent,
        &[
            "--name",
            "ticker",
            "busybox",
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
        ],
    )?;
    let d = inspect(&agent, &id)?;
    let host_pid = d["pid_map"][0]["host_pid"].as_i64().context("host_pid")? as i32;
    agent.kill9();
    let before = std::fs::read_to_string(
        agent
            .state_dir
            .join("containers")
            .join(&id)
            .join("container.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(pid_alive(host_pid), "the container died with migd");
    agent.spawn()?;
    let ps = agent.mig_json(&["ps", "--json"])?;
    ensure!(
        ps[0]["id"] == id.as_str() && ps[0]["state"] == "running",
        "{ps}"
    );
    let d = inspect(&agent, "ticker")?;
    ensure!(d["pid_map"][0]["host_pid"] == host_pid, "{d}");
    // The log kept growing while migd was away and keeps growing after.
    let logs = agent.mig_ok(&["logs", "ticker"])?;
    ensure!(logs.len() > before.len(), "log did not grow");
    ensure!(
        wait_until(Duration::from_secs(5), || agent
            .mig_ok(&["logs", "ticker"])
            .is_ok_and(|l| l.len() > logs.len())),
        "log stopped growing after re-adoption"
    );
    // A re-adopted container can be exec'd into and stopped.
    ensure!(agent.mig_ok(&["exec", "ticker", "--", "echo", "in"])? == "in\n");
    agent.mig_ok(&["stop", "-t", "0", "ticker"])?;
    ensure!(inspect(&agent, "ticker")?["state"] == "stopped");
    ensure!(!pid_alive(host_pid));
    Ok(())
}

#[test]
fn oom_kill_is_reported() -> Result<()> {
    let agent = Agent::start("oom")?;
    agent.import_busybox()?;
    // tail buffers an endless line of zeros until the memory limit stops it.
    let o = agent.mig(&[
        "run",
        "--name",
        "hog",
        "--memory",
        "16M",
        "busybox",
        "--",
        "tail",
        "/dev/zero",
    ]);
    ensure!(o.code == 137, "{o:?}");
    // Said on stderr, not only in the exit status.
    ensure!(
        o.stderr
            .contains("container hog was killed by the kernel's OOM killer")
            && o.stderr.contains("memory limit"),
        "{o:?}"
    );
    let d = inspect(&agent, "hog")?;
    ensure!(d["oom_killed"] == true && d["state"] == "exited", "{d}");
    ensure!(d["signal"] == 9, "{d}");
    Ok(())
}

#[test]
fn usage_and_agent_errors_exit_125_with_one_line() -> Result<()> {
    let agent = Agent::start("usage")?;
    let cases: &[&[&str]] = &[
        &["bogus"],
        &["run"],
        &["run", "--memory", "lots", "busybox"],
        &["run", "--cpus", "0", "busybox"],
        &["run", "--cpus", "-1", "busybox"],
        &["inspect", "nope"],
        &["logs", "nope"],
        &["kill", "-s", "NOSUCH", "x"],
        &["run", "-d", "no-such-image"],
        &[],
    ];
    for args in cases {
        let o = agent.mig(args);
        ensure!(o.code == 125, "mig {args:?} exited {}", o.code);
        ensure!(
            o.stderr.lines().count() == 1 && o.stderr.starts_with("mig: "),
            "mig {args:?}: {:?}",
            o.stderr
        );
    }
    let o = mig_tests::MigOutput::from(
        std::process::Command::new(mig_tests::bin("mig"))
            .args(["--socket", "/nonexistent/migd.sock", "ps"])
            .output()?,
    );
    ensure!(o.code == 125 && o.stderr.lines().count() == 1, "{o:?}");
    // More CPUs than the host has (QA of session 30, F4), and a negative count, are said so.
    let o = agent.mig(&["run", "--cpus", "999", "busybox"]);
    ensure!(o.stderr.contains("CPUs this agent may use"), "{o:?}");
    let o = agent.mig(&["run", "--cpus", "-1", "busybox"]);
    ensure!(o.stderr.contains("invalid CPU count"), "{o:?}");
    ensure!(agent.mig(&["--help"]).code == 0);
    ensure!(agent.mig(&["completions", "bash"]).stdout.contains("mig"));
    ensure!(agent.mig(&["man"]).stdout.contains(".TH"));
    let info = agent.mig_json(&["info", "--json"])?;
    ensure!(
        info["name"] == agent.name.as_str() && info["cpus"].as_u64() > Some(0),
        "{info}"
    );
    Ok(())
}

/// The `got N` counter values in a log, in order.
fn counter(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("got ")?.trim().parse().ok())
        .collect()
}

fn ns_pids(v: &serde_json::Value) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| !p["cmd"].as_str().unwrap_or_default().starts_with("sleep"))
        .map(|p| {
            (
                p["ns_pid"].as_i64().unwrap_or(-1),
                p["cmd"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A producer with 200 kB of random data in a shell variable (checked on every line) and 32 MiB in
/// /dev/shm, piping a counter to a consumer that logs it.
const WORKLOAD: &str = r#"head -c 33554432 /dev/urandom > /dev/shm/blob; md5sum /dev/shm/blob > /tmp/blob.md5
d=$(head -c 200000 /dev/urandom | od -An -tx1 | tr -d ' \n'); s=$(echo "$d" | md5sum)
i=0; while true; do [ "$(echo "$d" | md5sum)" = "$s" ] || echo CORRUPT; echo $i; i=$((i+1)); sleep 0.1; done | while read n; do echo "got $n"; done"#;

#[test]
fn checkpoint_and_restore_keep_pids_memory_and_log() -> Result<()> {
    let agent = Agent::start("checkpoint")?;
    agent.import_busybox()?;
    let id = run_detached(
        &agent,
        &[
            "--name", "cr", "--memory", "256M", "busybox", "--", "sh", "-c", WORKLOAD,
        ],
    )?;
    let logs = |a: &Agent| a.mig_ok(&["logs", "cr"]).unwrap_or_default();
    ensure!(
        wait_until(Duration::from_secs(20), || counter(&logs(&agent)).len()
            >= 3),
        "no output: {}",
        logs(&agent)
    );
    // The workload forks short-lived subshells: compare only the processes seen in two samples.
    let first = ns_pids(&inspect(&agent, "cr")?["pid_map"]);
    std::thread::sleep(Duration::from_millis(300));
    let before: Vec<(i64, String)> = ns_pids(&inspect(&agent, "cr")?["pid_map"])
        .into_iter()
        .filter(|p| first.contains(p))
        .collect();
    ensure!(before.len() >= 3 && before[0].0 == 1, "{before:?}");
    let kept = |after: &[(i64, String)]| before.iter().all(|p| after.contains(p));
    let rootfs = agent.state_dir.join("containers").join(&id).join("rootfs");
    for cycle in 0..2 {
        let cp = agent.mig_json(&["checkpoint", "cr", "--json"])?;
        ensure!(
            cp["dump_ms"].as_u64().is_some() && cp["image_bytes"].as_u64() > Some(32 << 20),
            "{cp}"
        );
        let d = inspect(&agent, "cr")?;
        ensure!(
            d["state"] == "checkpointed" && d["pid_map"].as_array().is_some_and(|a| a.is_empty()),
            "{d}"
        );
        ensure!(
            mounts_under(&rootfs).is_empty(),
            "rootfs mounted while checkpointed"
        );
        let last = *counter(&logs(&agent)).last().context("counter")?;
        let r = agent.mig_json(&["restore", "cr", "--json"])?;
        ensure!(r["init_pid"].as_i64() > Some(1), "{r}");
        // The restored processes hold the memory: the set's page images are removed.
        let images = agent
            .state_dir
            .join("containers")
            .join(r["id"].as_str().unwrap_or_default())
            .join("checkpoint");
        let pages: Vec<String> = std::fs::read_dir(&images)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("pages-"))
            .collect();
        ensure!(
            pages.is_empty(),
            "page images kept after the restore: {pages:?}"
        );
        let after = ns_pids(&inspect(&agent, "cr")?["pid_map"]);
        ensure!(
            kept(&after),
            "cycle {cycle}: PIDs differ: {before:?} vs {after:?}"
        );
        ensure!(
            wait_until(Duration::from_secs(10), || counter(&logs(&agent)).last()
                >= Some(&(last + 3))),
            "cycle {cycle}: the counter did not continue"
        );
    }
    let log = logs(&agent);
    let c = counter(&log);
    ensure!(
        c.iter().enumerate().all(|(i, n)| *n == i as u64),
        "counter not consecutive: {c:?}"
    );
    ensure!(!log.contains("CORRUPT"), "memory changed across restore");
    let o = agent.mig(&["exec", "cr", "--", "md5sum", "-c", "/tmp/blob.md5"]);
    ensure!(o.code == 0, "/dev/shm data changed: {o:?}");
    // --leave-running: the container keeps running, and the checkpoint replaces the old one.
    agent.mig_ok(&["checkpoint", "--leave-running", "cr"])?;
    ensure!(inspect(&agent, "cr")?["state"] == "running");
    let n = counter(&logs(&agent)).len();
    ensure!(
        wait_until(Duration::from_secs(5), || counter(&logs(&agent)).len()
            > n + 2),
        "not running after --leave-running"
    );
    // A corrupted image set is refused before CRIU runs, and stays restorable once repaired.
    agent.mig_ok(&["checkpoint", "cr"])?;
    let images = agent
        .state_dir
        .join("containers")
        .join(&id)
        .join("checkpoint");
    let biggest = std::fs::read_dir(&images)?
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .context("empty checkpoint")?
        .path();
    let original = std::fs::read(&biggest)?;
    let mut bad = original.clone();
    bad[original.len() / 2] ^= 0xff;
    std::fs::write(&biggest, &bad)?;
    let o = agent.mig(&["restore", "cr"]);
    ensure!(o.code == 125 && o.stderr.lines().count() == 1, "{o:?}");
    let d = inspect(&agent, "cr")?;
    ensure!(
        d["state"] == "checkpointed"
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("restore failed")),
        "{d}"
    );
    ensure!(
        mounts_under(&rootfs).is_empty(),
        "a refused restore left the rootfs mounted"
    );
    std::fs::write(&biggest, &original)?;
    agent.mig_ok(&["restore", "cr"])?;
    ensure!(kept(&ns_pids(&inspect(&agent, "cr")?["pid_map"])));
    agent.mig_ok(&["rm", "-f", "cr"])?;
    Ok(())
}

#[test]
fn failed_dump_leaves_the_container_running() -> Result<()> {
    // A criu that answers --version but fails every dump.
    let dir = tempfile::tempdir()?;
    let fake = dir.path().join("criu");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = dump ]; then echo 'Error (fake): dump refused' >&2; exit 1; fi\nexec /usr/local/sbin/criu \"$@\"\n",
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let agent = Agent::start_with_env(
        "failed_dump",
        &[("MIG_CRIU", fake.to_str().unwrap_or_default())],
    )?;
    agent.import_busybox()?;
    run_detached(
        &agent,
        &[
            "--name",
            "keep",
            "busybox",
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo \"got $i\"; i=$((i+1)); sleep 0.1; done",
        ],
    )?;
    let o = agent.mig(&["checkpoint", "keep"]);
    ensure!(o.code == 125 && o.stderr.contains("keeps running"), "{o:?}");
    ensure!(inspect(&agent, "keep")?["state"] == "running");
    let n = counter(&agent.mig_ok(&["logs", "keep"])?).len();
    ensure!(
        wait_until(Duration::from_secs(5), || counter(
            &agent.mig_ok(&["logs", "keep"]).unwrap_or_default()
        )
        .len()
            > n + 2),
        "the container stayed frozen after a failed dump"
    );
    Ok(())
}

#[test]
fn export_then_import_under_a_new_name() -> Result<()> {
    let agent = Agent::start("export_import")?;
    agent.import_busybox()?;
    run_detached(&agent, &["--name", "orig", "busybox", "--", "sh", "-c", "echo kept > /tmp/file; i=0; while true; do echo \"got $i\"; i=$((i+1)); sleep 0.1; done"])?;
    ensure!(wait_until(Duration::from_secs(10), || counter(
        &agent.mig_ok(&["logs", "orig"]).unwrap_or_default()
    )
    .len()
        > 3));
    let before = ns_pids(&inspect(&agent, "orig")?["pid_map"]);
    let archive = agent.dir.path().join("orig.tar.zst");
    let cp = agent.mig_json(&[
        "checkpoint",
        "orig",
        "--export",
        archive.to_str().unwrap_or_default(),
        "--json",
    ])?;
    ensure!(
        cp["archive_bytes"].as_u64() > Some(0) && archive.exists(),
        "{cp}"
    );
    let last = *counter(&agent.mig_ok(&["logs", "orig"])?)
        .last()
        .context("counter")?;
    // A corrupted archive is refused and leaves nothing behind.
    let bytes = std::fs::read(&archive)?;
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    let bad_path = agent.dir.path().join("bad.tar.zst");
    std::fs::write(&bad_path, &bad)?;
    let o = agent.mig(&[
        "restore",
        "--import",
        bad_path.to_str().unwrap_or_default(),
        "--name",
        "bad",
    ]);
    ensure!(o.code == 125 && o.stderr.lines().count() == 1, "{o:?}");
    let leftovers: Vec<_> = std::fs::read_dir(agent.state_dir.join("containers"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(leftovers.len() == 1, "refused import left {leftovers:?}");
    // An empty file says so, not which manifest in the agent's work directory it lacked (QA
    // session 18).
    let empty = agent.dir.path().join("empty.tar");
    std::fs::write(&empty, b"")?;
    let o = agent.mig(&["restore", "--import", empty.to_str().unwrap_or_default()]);
    ensure!(
        o.code == 125
            && o.stderr.contains("not a checkpoint archive (it is empty)")
            && !o.stderr.contains(".import-"),
        "{o:?}"
    );
    // The original's name is taken while it exists (checkpointed): the copy gets a new name.
    let r = agent.mig_json(&[
        "restore",
        "--import",
        archive.to_str().unwrap_or_default(),
        "--name",
        "copy",
        "--json",
    ])?;
    ensure!(r["name"] == "copy", "{r}");
    let d = inspect(&agent, "copy")?;
    ensure!(
        d["state"] == "running" && ns_pids(&d["pid_map"]) == before,
        "{d}"
    );
    ensure!(agent.mig_ok(&["exec", "copy", "--", "cat", "/tmp/file"])? == "kept\n");
    // It counts on past the original's last line (waited for: a loaded machine may print the
    // copy's first line late).
    ensure!(
        wait_until(Duration::from_secs(20), || counter(
            &agent.mig_ok(&["logs", "copy"]).unwrap_or_default()
        )
        .len() as u64
            > last + 1),
        "the copy does not count"
    );
    // The copy's log holds the original's output before the export and goes on from it (QA of
    // session 21: an import started an empty log), and it keeps the original's creation time.
    let c = counter(&agent.mig_ok(&["logs", "copy"])?);
    ensure!(
        c.len() as u64 > last + 1 && c.iter().enumerate().all(|(i, n)| *n == i as u64),
        "the copy's log does not continue the original's (to {last}): {c:?}"
    );
    ensure!(
        d["created"] == inspect(&agent, "orig")?["created"],
        "the copy got a new creation time: {d}"
    );
    // Both can run side by side: the original restores too.
    agent.mig_ok(&["restore", "orig"])?;
    ensure!(inspect(&agent, "orig")?["state"] == "running");
    Ok(())
}

#[test]
fn userns_maps_root_to_an_unprivileged_range() -> Result<()> {
    let agent = Agent::start("userns")?;
    agent.import_busybox()?;
    let o = agent.mig(&[
        "run",
        "--userns",
        "--name",
        "u",
        "busybox",
        "--",
        "cat",
        "/proc/self/uid_map",
    ]);
    ensure!(o.code == 0, "{o:?}");
    // Root maps to the start of one of the per-container slots (100000 + k * 65536).
    let fields: Vec<u64> = o
        .stdout
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(u64::MAX))
        .collect();
    ensure!(
        matches!(fields.as_slice(), [0, host, 65536] if *host >= 100_000 && (host - 100_000) % 65_536 == 0),
        "uid_map: {:?}",
        o.stdout
    );
    ensure!(inspect(&agent, "u")?["userns"] == true);
    Ok(())
}

#[test]
fn userns_runs_an_image_without_mount_points() -> Result<()> {
    let agent = Agent::start("userns_bare")?;
    // An image with no /proc, /dev or /sys, and the usual world-writable /tmp.
    let rootfs = busybox_rootfs(agent.dir.path())?;
    for d in ["proc", "dev", "sys"] {
        std::fs::remove_dir(rootfs.join(d))?;
    }
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    agent.mig_ok(&[
        "image",
        "import",
        rootfs.to_str().context("rootfs path")?,
        "--name",
        "bare",
    ])?;
    let o = agent.mig(&[
        "run",
        "--userns",
        "--name",
        "ub",
        "bare",
        "--",
        "sh",
        "-c",
        "echo a > /a && echo b > /tmp/b && cat /a /tmp/b && ls /proc/1/ns >/dev/null && echo ok",
    ]);
    ensure!(o.code == 0 && o.stdout == "a\nb\nok\n", "{o:?}");
    Ok(())
}

/// A `--userns` container exported and imported again (after the original is removed, so its id
/// range is free) runs under the same uid map: CRIU, running as the container's mapped root,
/// can read the imported images.
#[test]
fn userns_checkpoint_exports_and_imports() -> Result<()> {
    let agent = Agent::start("userns_import")?;
    agent.import_busybox()?;
    run_detached(
        &agent,
        &[
            "--userns",
            "--name",
            "ux",
            "busybox",
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo \"got $i\"; i=$((i+1)); sleep 0.1; done",
        ],
    )?;
    ensure!(wait_until(Duration::from_secs(10), || counter(
        &agent.mig_ok(&["logs", "ux"]).unwrap_or_default()
    )
    .len()
        > 3));
    let map = agent.mig_ok(&["exec", "ux", "--", "cat", "/proc/self/uid_map"])?;
    let archive = agent.dir.path().join("ux.tar.zst");
    agent.mig_ok(&[
        "checkpoint",
        "ux",
        "--export",
        archive.to_str().unwrap_or_default(),
    ])?;
    agent.mig_ok(&["rm", "-f", "ux"])?;
    agent.mig_ok(&[
        "restore",
        "--import",
        archive.to_str().unwrap_or_default(),
        "--name",
        "ux2",
    ])?;
    ensure!(inspect(&agent, "ux2")?["state"] == "running");
    ensure!(agent.mig_ok(&["exec", "ux2", "--", "cat", "/proc/self/uid_map"])? == map);
    Ok(())
}

/// Records of a newer format (written by a newer mig, then downgraded) do not block the agent:
/// an image record and a container record of a newer format are skipped with a warning naming
/// the file and both versions, left as they are; migd starts, the other containers and images
/// work; commands on those two fail saying why; the unreadable image is listed as such; and the
/// layers the skipped container may use are not removed.
#[test]
fn records_of_a_newer_format_are_skipped_others_work() -> Result<()> {
    let mut agent = Agent::start("newer_records")?;
    agent.import_busybox()?;
    let id = run_detached(
        &agent,
        &["--name", "keeper", "busybox", "--", "sleep", "1000"],
    )?;
    agent.kill9();
    // A container record and an image record of a newer format, made from the real ones.
    let containers = agent.state_dir.join("containers");
    let future_id = format!("{:032x}", u128::from(std::process::id()) << 64 | 0xf0);
    let future_dir = containers.join(&future_id);
    std::fs::create_dir_all(&future_dir)?;
    let spec = std::fs::read_to_string(containers.join(&id).join("spec.json"))?
        .replace(&id, &future_id)
        .replace("keeper", "future-one")
        .replace(r#""format": 2"#, r#""format": 3"#);
    ensure!(spec.contains(r#""format": 3"#), "{spec}");
    std::fs::write(future_dir.join("spec.json"), &spec)?;
    let records = agent.state_dir.join("images").join("images");
    let image = std::fs::read_to_string(records.join("busybox.json"))?
        .replace(r#""format": 2"#, r#""format": 9"#)
        .replace(r#""name": "busybox""#, r#""name": "newer""#);
    ensure!(image.contains(r#""format": 9"#), "{image}");
    std::fs::write(records.join("newer.json"), &image)?;
    agent.spawn()?;

    // The other container is re-adopted and listed; the newer one is not.
    let ps = agent.mig_json(&["ps", "-a", "--json"])?;
    ensure!(
        ps.as_array().map(Vec::len) == Some(1) && ps[0]["id"] == id.as_str(),
        "{ps}"
    );
    ensure!(ps[0]["state"] == "running", "{ps}");
    let spec_file = future_dir.join("spec.json");
    let want = format!(
        "{} has format version 3, newer than version 2",
        spec_file.display()
    );
    ensure!(agent.log().contains(&want), "{want:?} not in the log");
    // Commands on it say why, by id or prefix.
    for args in [
        vec!["inspect", future_id.as_str()],
        vec!["rm", "-f", &future_id[..20]],
    ] {
        let o = agent.mig(&args);
        ensure!(
            o.code != 0 && o.stderr.contains("record cannot be read") && o.stderr.contains(&want),
            "{args:?}: {o:?}"
        );
    }
    // Images: the newer record is listed as unreadable; the others work.
    let images = agent.mig_json(&["image", "ls", "--json"])?;
    let list = images.as_array().context("image list")?;
    let newer = list
        .iter()
        .find(|i| i["name"] == "newer")
        .with_context(|| format!("newer not listed: {images}"))?;
    ensure!(
        newer["unreadable"]["format"] == 9 && newer["unreadable"]["supported_format"] == 2,
        "{newer}"
    );
    let image_file = records.join("newer.json");
    ensure!(
        newer["unreadable"]["path"] == image_file.to_string_lossy().as_ref(),
        "{newer}"
    );
    let busybox = list
        .iter()
        .find(|i| i["name"] == "busybox")
        .with_context(|| format!("busybox not listed: {images}"))?;
    ensure!(busybox.get("unreadable").is_none(), "{busybox}");
    let table = agent.mig_ok(&["image", "ls"])?;
    ensure!(
        table.contains("unreadable") && table.contains("format 9, this mig reads up to 2"),
        "{table}"
    );
    let o = agent.mig(&["run", "newer", "--", "true"]);
    let want_image = format!(
        "{} has format version 9, newer than version 2",
        image_file.display()
    );
    ensure!(
        o.code != 0 && o.stderr.contains(&want_image),
        "run of the newer image: {o:?}"
    );
    let o = agent.mig(&["run", "--name", "other", "busybox", "--", "true"]);
    ensure!(o.code == 0, "run of another image: {o:?}");
    // The skipped container's image stays: its layers may be under it.
    agent.mig_ok(&["rm", "-f", "keeper"])?;
    agent.mig_ok(&["rm", "-f", "other"])?;
    let o = agent.mig(&["image", "rm", "busybox"]);
    ensure!(
        o.code != 0 && o.stderr.contains(&future_id),
        "image rm with a skipped container: {o:?}"
    );
    // Both files are left as they were.
    ensure!(std::fs::read_to_string(&spec_file)? == spec);
    ensure!(!future_dir.join("state.json").exists());
    ensure!(std::fs::read_to_string(&image_file)? == image);
    std::fs::remove_dir_all(&future_dir)?;
    std::fs::remove_file(&image_file)?;
    agent.mig_ok(&["image", "rm", "busybox"])?;
    Ok(())
}

/// While a container is moved away, the source shows the truth: in its final phase (held here
/// by a delay at the dump) its copy is `frozen`, with `moving` naming the destination and the
/// migration, in `mig ps` and `mig inspect` (text and JSON). The move then completes.
#[test]
fn a_container_being_moved_shows_frozen_moving_to_the_peer() -> Result<()> {
    if !mig_tests::is_root("a_container_being_moved_shows_frozen_moving_to_the_peer") {
        return Ok(());
    }
    let lab = mig_tests::lab::Lab::up("movingps", 95)?;
    let name = "mover";
    lab.run_container(0, name, 1)?;
    lab.fault(0, Some("source-dump:delay:4000"))?;
    let (seen, moved) = std::thread::scope(|s| {
        let mover = s.spawn(|| lab.mig(0, &["move", name, "host-b", "--json"]));
        let mut last = serde_json::Value::Null;
        let seen = wait_until(Duration::from_secs(30), || {
            last = lab
                .mig_json(0, &["ps", "--json"])
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                .unwrap_or_default();
            last["state"] == "frozen"
        });
        let checks = (|| -> Result<()> {
            ensure!(seen, "never shown frozen while moving: {last}");
            let m = &last["moving"];
            ensure!(
                m["peer"] == "host-b" && m["migration_id"].as_str().map(str::len) == Some(32),
                "{last}"
            );
            let table = lab.mig_ok(0, &["ps"])?;
            ensure!(table.contains("frozen (moving to host-b)"), "{table}");
            let d = lab.mig_json(0, &["inspect", name, "--json"])?;
            ensure!(d["state"] == "frozen" && d["moving"] == *m, "{d}");
            let text = lab.mig_ok(0, &["inspect", name])?;
            ensure!(
                text.contains("state:     frozen (moving to host-b)")
                    && text.contains(&format!(
                        "moving:    to host-b, migration {}",
                        m["migration_id"].as_str().unwrap_or_default()
                    )),
                "{text}"
            );
            Ok(())
        })();
        (checks, mover.join())
    });
    lab.fault(0, None)?;
    let moved = moved.map_err(|_| anyhow::anyhow!("the move thread panicked"))?;
    seen?;
    ensure!(moved.code == 0, "the move failed: {moved:?}");
    mig_tests::lab::running_on(&lab, 1, name)?;

    // The destination's copy, restored and waiting for the Commit (held by a delay at the
    // source after the Restored), is `frozen (arriving from host-b)` with `arriving` saying
    // why (QA of session 26: plain `frozen`, a copy a rebalancer could not explain).
    lab.fault(1, Some("source-restore:delay:4000"))?;
    let (seen, moved) = std::thread::scope(|s| {
        let mover = s.spawn(|| lab.mig(1, &["move", name, "host-a"]));
        let mut last = serde_json::Value::Null;
        let seen = wait_until(Duration::from_secs(30), || {
            last = lab
                .mig_json(0, &["ps", "-a", "--json"])
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                .unwrap_or_default();
            last["state"] == "frozen"
        });
        let checks = (|| -> Result<()> {
            ensure!(seen, "never shown frozen while arriving: {last}");
            ensure!(
                last["arriving"]["peer"] == "host-b" && last["moving"].is_null(),
                "{last}"
            );
            let table = lab.mig_ok(0, &["ps", "-a"])?;
            ensure!(table.contains("frozen (arriving from host-b)"), "{table}");
            Ok(())
        })();
        (checks, mover.join())
    });
    lab.fault(1, None)?;
    let moved = moved.map_err(|_| anyhow::anyhow!("the move thread panicked"))?;
    seen?;
    ensure!(moved.code == 0, "the move back failed: {moved:?}");
    let d = mig_tests::lab::running_on(&lab, 0, name)?;
    ensure!(d["arriving"].is_null(), "{d}");
    Ok(())
}

/// Imports a busybox image named `users` whose /etc/passwd and /etc/group have users and groups
/// besides root (what `--user NAME` resolves against).
fn import_users_image(agent: &Agent) -> Result<()> {
    let dir = agent.dir.path().join("users-image");
    let rootfs = busybox_rootfs(&dir)?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n\
         app:x:1000:1001:app:/:/bin/sh\n",
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nstaff:x:50:\napp:x:1001:\nnogroup:x:65534:\n",
    )?;
    agent.mig_ok(&[
        "image",
        "import",
        rootfs.to_str().unwrap_or_default(),
        "--name",
        "users",
    ])?;
    Ok(())
}

/// `mig` against `agent` with `input` on its standard input.
fn mig_with_stdin(agent: &Agent, args: &[&str], input: &[u8]) -> Result<mig_tests::MigOutput> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(mig_tests::bin("mig"))
        .args(args)
        .env("MIG_SOCKET", &agent.socket)
        .env_remove("MIG_HOST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin pipe")?;
    let data = input.to_vec();
    // mig may refuse before reading all of it: a write error is its answer, not ours.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out.into())
}

/// `mig run --user/-u`, `--workdir/-w`, `--entrypoint` (podman's meanings): names resolved
/// from the image's /etc/passwd and /etc/group, a numeric uid without an entry gets gid 0, an
/// unknown name is refused naming the image and the name.
#[test]
fn run_with_user_workdir_and_entrypoint() -> Result<()> {
    if !mig_tests::is_root("run_with_user_workdir_and_entrypoint") {
        return Ok(());
    }
    let agent = Agent::start("run_user_workdir")?;
    import_users_image(&agent)?;
    let id_of = |args: &[&str]| -> Result<String> {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        Ok(agent.mig_ok(&full)?.trim().to_owned())
    };
    let o = id_of(&["-u", "nobody", "users", "--", "id"])?;
    ensure!(o.starts_with("uid=65534(nobody) gid=65534(nogroup)"), "{o}");
    let o = id_of(&["--user", "app:staff", "users", "--", "id"])?;
    ensure!(o.starts_with("uid=1000(app) gid=50(staff)"), "{o}");
    let o = id_of(&["-u", "app", "users", "--", "id"])?;
    ensure!(o.starts_with("uid=1000(app) gid=1001(app)"), "{o}");
    let o = id_of(&["-u", "4242", "users", "--", "id"])?;
    ensure!(o.starts_with("uid=4242 gid=0(root)"), "{o}");
    let o = id_of(&["-u", "7:8", "users", "--", "id"])?;
    ensure!(o.starts_with("uid=7 gid=8"), "{o}");
    let o = agent.mig(&["run", "-u", "ghost", "users", "--", "id"]);
    ensure!(
        o.code == 125
            && o.stderr.contains("\"ghost\"")
            && o.stderr.contains("image users")
            && o.stderr.lines().count() == 1,
        "{o:?}"
    );
    let o = agent.mig(&["run", "-u", "app:nogrp", "users", "--", "id"]);
    ensure!(o.code == 125 && o.stderr.contains("app:nogrp"), "{o:?}");
    // --workdir.
    ensure!(id_of(&["-w", "/tmp", "users", "--", "pwd"])? == "/tmp");
    ensure!(id_of(&["--workdir", "/etc", "-u", "nobody", "users", "--", "pwd"])? == "/etc");
    let o = agent.mig(&["run", "-w", "tmp", "users", "--", "pwd"]);
    ensure!(o.code == 125 && o.stderr.contains("absolute"), "{o:?}");
    // --entrypoint replaces the image's: one word, or a JSON array; args follow it.
    ensure!(id_of(&["--entrypoint", "echo", "users", "--", "a", "b"])? == "a b");
    ensure!(
        id_of(&[
            "--entrypoint",
            r#"["sh","-c"]"#,
            "users",
            "--",
            "echo $((6*7))"
        ])? == "42"
    );
    ensure!(id_of(&["--entrypoint", "hostname", "--name", "ep", "users"])? == "ep");
    let o = agent.mig(&["run", "--entrypoint", "", "users"]);
    ensure!(
        o.code == 125 && o.stderr.contains("entrypoint is empty"),
        "{o:?}"
    );
    ensure!(id_of(&["--entrypoint", "", "users", "--", "echo", "x"])? == "x");
    // inspect shows the command that ran.
    let d = inspect(&agent, "ep")?;
    ensure!(d["command"] == serde_json::json!(["hostname"]), "{d}");
    Ok(())
}

/// `mig exec -u/-w/-i`: the user resolved from the container's own /etc/passwd (its writable
/// layer included), the working directory, the standard input read whole by the client (binary
/// safe, size-capped); `-t` refused with what works instead.
#[test]
fn exec_with_user_workdir_and_stdin() -> Result<()> {
    if !mig_tests::is_root("exec_with_user_workdir_and_stdin") {
        return Ok(());
    }
    let agent = Agent::start("exec_user_stdin")?;
    import_users_image(&agent)?;
    run_detached(&agent, &["--name", "ex", "users", "--", "sleep", "1000"])?;
    let o = agent.mig_ok(&["exec", "-u", "nobody", "ex", "--", "id"])?;
    ensure!(o.starts_with("uid=65534(nobody) gid=65534(nogroup)"), "{o}");
    let o = agent.mig_ok(&["exec", "ex", "--", "id", "-u"])?;
    ensure!(o == "0\n", "the container's user stays the default: {o}");
    let o = agent.mig_ok(&["exec", "--user", "1000:50", "ex", "--", "id"])?;
    ensure!(o.starts_with("uid=1000(app) gid=50(staff)"), "{o}");
    let o = agent.mig(&["exec", "-u", "ghost", "ex", "--", "id"]);
    ensure!(
        o.code == 125 && o.stderr.contains("\"ghost\"") && o.stderr.contains("container ex"),
        "{o:?}"
    );
    // A user added inside the container is found (its writable layer is looked at).
    agent.mig_ok(&[
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "echo late:x:777:50::/:/bin/sh >> /etc/passwd",
    ])?;
    ensure!(agent.mig_ok(&["exec", "-u", "late", "ex", "--", "id", "-u"])? == "777\n");
    // -w.
    ensure!(agent.mig_ok(&["exec", "-w", "/tmp", "ex", "--", "pwd"])? == "/tmp\n");
    let o = agent.mig(&["exec", "-w", "/nonexistent", "ex", "--", "pwd"]);
    ensure!(
        o.code == 125
            && o.stderr
                .contains("cannot use /nonexistent as the working directory in container ex")
            && o.stderr.lines().count() == 1,
        "{o:?}"
    );
    // -i: the whole input, binary safe; without -i the command reads /dev/null.
    let o = mig_with_stdin(&agent, &["exec", "-i", "ex", "--", "cat"], b"hi\n")?;
    ensure!(o.code == 0 && o.stdout == "hi\n", "{o:?}");
    let o = mig_with_stdin(&agent, &["exec", "ex", "--", "cat"], b"hi\n")?;
    ensure!(o.code == 0 && o.stdout.is_empty(), "{o:?}");
    let blob: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + i / 256) as u8).collect();
    let o = mig_with_stdin(&agent, &["exec", "-i", "ex", "--", "wc", "-c"], &blob)?;
    ensure!(o.code == 0 && o.stdout.trim() == "1048576", "{o:?}");
    let o = mig_with_stdin(
        &agent,
        &[
            "exec",
            "-i",
            "-u",
            "nobody",
            "-w",
            "/tmp",
            "ex",
            "--",
            "sh",
            "-c",
            "wc -c; pwd; id -u",
        ],
        &blob,
    )?;
    ensure!(o.code == 0 && o.stdout == "1048576\n/tmp\n65534\n", "{o:?}");
    let o = mig_with_stdin(
        &agent,
        &["exec", "-i", "ex", "--", "sh", "-c", "cat > /tmp/in"],
        &blob,
    )?;
    ensure!(o.code == 0, "{o:?}");
    let o = agent.mig(&["exec", "ex", "--", "md5sum", "/tmp/in"]);
    let want = {
        let p = agent.dir.path().join("blob");
        std::fs::write(&p, &blob)?;
        let m = std::process::Command::new("md5sum").arg(&p).output()?;
        String::from_utf8_lossy(&m.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    ensure!(
        o.code == 0 && o.stdout.starts_with(&want),
        "{o:?} want {want}"
    );
    // A command that does not read its input still ends normally.
    let o = mig_with_stdin(&agent, &["exec", "-i", "ex", "--", "true"], &blob)?;
    ensure!(o.code == 0, "{o:?}");
    // Too large: refused by the client before anything runs.
    let big = vec![b'x'; (8 << 20) + 1];
    let o = mig_with_stdin(&agent, &["exec", "-i", "ex", "--", "wc", "-c"], &big)?;
    ensure!(
        o.code == 125 && o.stderr.contains("8 MiB") && o.stdout.is_empty(),
        "{o:?}"
    );
    // -t: refused, saying what works; `mig run -i/-t` too (QA session 18: `mig run -t` was
    // clap's "unexpected argument", and `echo .. | mig run` dropped the input silently).
    for t in [
        &["exec", "-t", "ex", "--", "sh"][..],
        &["exec", "-it", "ex", "--", "sh"],
        &["run", "-it", "users", "--", "sh"],
        &["run", "-i", "--rm", "users", "--", "sh"],
    ] {
        let o = agent.mig(t);
        ensure!(
            o.code == 125
                && o.stderr.contains("no terminal")
                && o.stderr.contains("-i")
                && o.stderr.lines().count() == 1,
            "{o:?}"
        );
    }
    agent.mig_ok(&["rm", "-f", "ex"])?;
    Ok(())
}

/// `mig move C HOST` naming the host the container is on says so (it said "no pinned peer").
#[test]
fn move_to_its_own_host_says_it_is_already_there() -> Result<()> {
    if !mig_tests::is_root("move_to_its_own_host_says_it_is_already_there") {
        return Ok(());
    }
    let agent = Agent::start("move_to_self")?;
    agent.import_busybox()?;
    run_detached(
        &agent,
        &["--name", "stay", "busybox", "--", "sleep", "1000"],
    )?;
    let o = agent.mig(&["move", "stay", &agent.name]);
    ensure!(
        o.code == 125
            && o.stderr
                .contains(&format!("container stay is already on {}", agent.name))
            && !o.stderr.contains("pinned peer named")
            && o.stderr.lines().count() == 1,
        "{o:?}"
    );
    let d = inspect(&agent, "stay")?;
    ensure!(d["state"] == "running", "{d}");
    // An unknown container is still "no such container", not "already here".
    let o = agent.mig(&["move", "nope", &agent.name]);
    ensure!(o.code == 125 && !o.stderr.contains("already"), "{o:?}");
    agent.mig_ok(&["rm", "-f", "stay"])?;
    Ok(())
}

/// In a lab: `mig move C host-a` on host-a says the container is already there and names the
/// peers; a move the destination refuses (a container of the same name there) says why in
/// words, not as `Refused(NameClash)`, and the container keeps running.
#[test]
fn move_errors_are_words_in_a_lab() -> Result<()> {
    if !mig_tests::is_root("move_errors_are_words_in_a_lab") {
        return Ok(());
    }
    let lab = mig_tests::lab::Lab::up_on("cliwords", [10, 79, 87], 2)?;
    let tar = lab.image_tar.display().to_string();
    lab.mig_ok(1, &["image", "import", &tar, "--name", "busybox"])?;
    for host in [0, 1] {
        lab.mig_ok(
            host,
            &[
                "run", "-d", "--name", "twin", "busybox", "--", "sleep", "1000",
            ],
        )?;
    }
    let o = lab.mig(0, &["move", "twin", "host-a"]);
    ensure!(
        o.code == 125
            && o.stderr.contains("container twin is already on host-a")
            && o.stderr.contains("pinned peers: host-b"),
        "{o:?}"
    );
    let o = lab.mig(0, &["move", "twin", "host-b"]);
    ensure!(
        o.code == 125
            && o.stderr.contains("the destination refused it")
            && o.stderr.contains("already there")
            && o.stderr.contains("keeps running here")
            && !o.stderr.contains("NameClash")
            && !o.stderr.contains("Refused("),
        "{o:?}"
    );
    let d = lab.mig_json(0, &["inspect", "twin", "--json"])?;
    ensure!(d["state"] == "running", "{d}");
    Ok(())
}
