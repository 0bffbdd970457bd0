//! End-to-end tests of how container processes start, as Docker and podman start them (QA
//! session 16, workloads report #3, #6, #9): a background process left by `mig exec` can be
//! checkpointed and restored; `-u USER` gets the user's supplementary groups from the image's
//! /etc/group; `HOME` comes from the image's /etc/passwd when nothing else set it. Run as root.

use anyhow::{ensure, Context, Result};
use mig_tests::{bin, busybox_rootfs, wait_until, Agent};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn inspect(agent: &Agent, name: &str) -> Result<serde_json::Value> {
    agent.mig_json(&["inspect", name, "--json"])
}

/// `(ns_pid, entry)` of the container's processes whose command line is `cmd`.
fn processes(agent: &Agent, name: &str, cmd: &str) -> Result<Vec<(i64, String)>> {
    let d = inspect(agent, name)?;
    let map = d["pid_map"].as_array().context("pid_map")?;
    Ok(map
        .iter()
        .filter(|p| p["cmd"] == cmd)
        .map(|p| (p["ns_pid"].as_i64().unwrap_or(-1), p.to_string()))
        .collect())
}

#[test]
fn a_background_process_left_by_exec_survives_checkpoint_and_restore() -> Result<()> {
    let agent = Agent::start("proc-bg")?;
    agent.import_busybox()?;
    agent.mig_ok(&[
        "run", "-d", "--name", "bg", "busybox", "--", "sleep", "100000",
    ])?;
    agent.mig_ok(&[
        "exec",
        "bg",
        "--",
        "sh",
        "-c",
        "sleep 1000 >/dev/null 2>&1 &",
    ])?;
    let before = processes(&agent, "bg", "sleep 1000")?;
    ensure!(
        before.len() == 1,
        "the background sleep: {before:?} in {}",
        inspect(&agent, "bg")?
    );
    // Without its own session the sleep's session leader is outside the pid namespace and the
    // dump fails ("A session leader of N is outside of its pid namespace").
    agent.mig_ok(&["checkpoint", "bg"])?;
    ensure!(inspect(&agent, "bg")?["state"] == "checkpointed");
    agent.mig_ok(&["restore", "bg"])?;
    let after = processes(&agent, "bg", "sleep 1000")?;
    ensure!(
        after.len() == 1 && after[0].0 == before[0].0,
        "the sleep after the restore: {after:?}, before: {before:?}"
    );
    // It leads no session of the host: its session id inside is a pid of the container.
    let sid = agent.mig_ok(&[
        "exec",
        "bg",
        "--",
        "sh",
        "-c",
        &format!("cut -d' ' -f6 /proc/{}/stat", after[0].0),
    ])?;
    let sid: i64 = sid.trim().parse().context(sid.clone())?;
    ensure!(sid > 1, "session {sid}");

    // Restored, the container runs in the time namespace CRIU made for it (its clocks go on
    // from the dump's): an exec joins it too, else a process it leaves makes the next restore
    // fail ("Can't restore sub-task in NS") and the container stays checkpointed (QA of
    // session 24, F5).
    let ns = agent.mig_ok(&[
        "exec",
        "bg",
        "--",
        "sh",
        "-c",
        "readlink /proc/1/ns/time; readlink /proc/self/ns/time",
    ])?;
    let ns: Vec<&str> = ns.lines().collect();
    ensure!(
        ns.len() == 2 && ns[0] == ns[1],
        "exec's time namespace is not the container's: {ns:?}"
    );
    agent.mig_ok(&[
        "exec",
        "bg",
        "--",
        "sh",
        "-c",
        "sleep 2000 >/dev/null 2>&1 &",
    ])?;
    agent.mig_ok(&["checkpoint", "bg"])?;
    agent.mig_ok(&["restore", "bg"])?;
    for cmd in ["sleep 1000", "sleep 2000"] {
        let p = processes(&agent, "bg", cmd)?;
        ensure!(p.len() == 1, "{cmd} after the second restore: {p:?}");
    }

    // `exec -i` (stdin piped) still reads its input.
    let mut child = Command::new(bin("mig"))
        .args([
            "exec",
            "-i",
            "bg",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$",
        ])
        .env("MIG_SOCKET", &agent.socket)
        .env_remove("MIG_HOST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"piped input\n")?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{out:?}");
    let mut lines = stdout.lines();
    ensure!(lines.next() == Some("PIPED INPUT"), "{stdout}");
    let ids = lines.next().unwrap_or_default();
    let (sid, pid) = ids
        .strip_prefix("sid=")
        .and_then(|s| s.split_once(" pid="))
        .context(ids.to_owned())?;
    ensure!(sid == pid, "exec -i leads its own session: {ids}");

    // While an exec runs, the PID map lists its command, not the host-side helper that waits
    // for it (in the cgroup, outside the container's PID namespace; QA of session 24).
    let mut running = Command::new(bin("mig"))
        .args(["exec", "bg", "--", "sleep", "7"])
        .env("MIG_SOCKET", &agent.socket)
        .env_remove("MIG_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let listed = wait_until(Duration::from_secs(20), || {
        processes(&agent, "bg", "sleep 7").is_ok_and(|p| p.len() == 1)
    });
    let map = inspect(&agent, "bg")?["pid_map"].clone();
    let _ = running.kill();
    let _ = running.wait();
    ensure!(listed, "the exec's command is not in the PID map: {map}");
    let outside: Vec<_> = map
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["ns_pid"] == p["host_pid"])
        .collect();
    ensure!(
        outside.is_empty(),
        "host processes in the PID map: {outside:?}"
    );
    agent.mig_ok(&["rm", "-f", "bg"])?;
    Ok(())
}

/// A full file system under the state directory: the container's output is dropped (and
/// counted) while it cannot be written, the container runs on, and its output comes back once
/// there is room (QA of session 25: the shim's `eprintln!` panicked on its full `shim.log`, and
/// the container ended with the shim).
#[test]
fn a_full_state_directory_drops_output_but_keeps_the_container() -> Result<()> {
    let agent = Agent::start_on_tmpfs("proc-full", 64)?;
    agent.import_busybox()?;
    let script = "x=$(head -c 3000 /dev/zero | tr '\\0' x); i=0; \
                  while :; do i=$((i+1)); echo \"line $i $x\"; sleep 0.01; done";
    let id = agent.mig_ok(&[
        "run", "-d", "--name", "chatty", "busybox", "--", "sh", "-c", script,
    ])?;
    let shim_log = agent
        .state_dir
        .join("containers")
        .join(id.trim())
        .join("shim.log");
    let fill = agent.state_dir.join("fill");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", fill.display()))
        .stderr(Stdio::null())
        .status()?;
    // A container created meanwhile fails, and nothing of it stays (its record could not be
    // written: before session 25 it stayed listed `failed`, and after a restart of the agent its
    // directory could be neither loaded nor removed).
    let late = agent.mig(&["run", "-d", "--name", "late", "busybox", "--", "true"]);
    ensure!(
        late.code != 0,
        "a container started on a full disk: {late:?}"
    );
    ensure!(
        agent.mig(&["inspect", "late"]).code != 0,
        "the failed container stayed: {}",
        agent.mig(&["ps", "-a"]).stdout
    );
    // About 300 kB of output a second goes nowhere meanwhile.
    std::thread::sleep(Duration::from_secs(5));
    let state = inspect(&agent, "chatty")?;
    ensure!(
        state["state"] == "running",
        "the container did not outlive the full disk: {state}; shim.log: {:?}",
        std::fs::read_to_string(&shim_log)
    );
    std::fs::remove_file(&fill)?;
    let lines = || {
        agent
            .mig(&["logs", "chatty"])
            .stdout
            .lines()
            .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let before = lines();
    ensure!(
        wait_until(Duration::from_secs(20), || lines() > before + 10),
        "no output after the disk had room again"
    );
    // (Its first word, that output is dropped, found shim.log full too.)
    let said = std::fs::read_to_string(&shim_log).unwrap_or_default();
    ensure!(
        said.contains("bytes of output were lost"),
        "shim.log: {said}"
    );
    agent.mig_ok(&["rm", "-f", "chatty"])?;
    Ok(())
}

/// A running container whose `state.json` is damaged: the restarted agent rebuilds its record
/// from the live shim, and the container can be stopped and removed (QA of session 25: it was
/// listed `failed`, `stop` said it stopped it while it ran on, and `rm` timed out). An
/// interrupted import's directory is removed at the start (it stayed for good).
#[test]
fn a_damaged_state_record_of_a_running_container_is_rebuilt() -> Result<()> {
    let mut agent = Agent::start("proc-state")?;
    agent.import_busybox()?;
    let id = agent.mig_ok(&[
        "run", "-d", "--name", "st", "busybox", "--", "sleep", "100000",
    ])?;
    let record = agent
        .state_dir
        .join("containers")
        .join(id.trim())
        .join("state.json");
    agent.kill9();
    std::fs::write(&record, b"{\"state\": \"runn")?;
    // What an import the agent did not see to its end unpacked goes at its start.
    let import = agent.state_dir.join("containers/.import-0123abcd");
    std::fs::create_dir_all(import.join("checkpoint"))?;
    std::fs::write(import.join("checkpoint/pages-1.img"), vec![0u8; 4096])?;
    agent.spawn()?;
    let v = inspect(&agent, "st")?;
    ensure!(v["state"] == "running", "{v}");
    ensure!(!import.exists(), "an interrupted import's directory stayed");
    agent.mig_ok(&["stop", "-t", "1", "st"])?;
    let v = inspect(&agent, "st")?;
    ensure!(v["state"] != "running" && v["init_pid"].is_null(), "{v}");
    agent.mig_ok(&["rm", "st"])?;
    Ok(())
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    app:x:1000:1000:App,,,:/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\n\
    ssl-cert:x:101:app\n\
    app:x:1000:\n\
    audio:x:29:other,app\n";

#[test]
fn users_get_their_groups_and_home_from_the_image() -> Result<()> {
    let agent = Agent::start("proc-user")?;
    let dir = agent.dir.path().join("img");
    let rootfs = busybox_rootfs(&dir)?;
    std::fs::write(rootfs.join("etc/passwd"), PASSWD)?;
    std::fs::write(rootfs.join("etc/group"), GROUP)?;
    agent.mig_ok(&[
        "image",
        "import",
        rootfs.to_str().context("path")?,
        "--name",
        "users",
    ])?;
    let groups = |out: &str| -> Vec<u32> {
        let mut g: Vec<u32> = out
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect();
        g.sort_unstable();
        g
    };
    let probe = "echo $(id -G)";
    // run -u: the primary group plus every group listing the user.
    let out = agent.mig_ok(&["run", "--rm", "-u", "app", "users", "--", "sh", "-c", probe])?;
    ensure!(groups(&out) == [29, 101, 1000], "run -u app: id -G = {out}");
    let out = agent.mig_ok(&[
        "run",
        "--rm",
        "-u",
        "app",
        "users",
        "--",
        "sh",
        "-c",
        "echo [$HOME]",
    ])?;
    ensure!(out.trim() == "[/home/app]", "run -u app: {out}");
    let out = agent.mig_ok(&["run", "--rm", "users", "--", "sh", "-c", "echo [$HOME]"])?;
    ensure!(out.trim() == "[/root]", "run as root: {out}");
    let out = agent.mig_ok(&[
        "run",
        "--rm",
        "-u",
        "4242",
        "users",
        "--",
        "sh",
        "-c",
        "echo [$HOME]",
    ])?;
    ensure!(out.trim() == "[/]", "run -u 4242: {out}");
    let out = agent.mig_ok(&[
        "run",
        "--rm",
        "-e",
        "HOME=/srv",
        "-u",
        "app",
        "users",
        "--",
        "sh",
        "-c",
        "echo [$HOME]",
    ])?;
    ensure!(out.trim() == "[/srv]", "run -e HOME: {out}");

    // exec -u, in a container running as root.
    agent.mig_ok(&["run", "-d", "--name", "u", "users", "--", "sleep", "100000"])?;
    ensure!(wait_until(Duration::from_secs(10), || inspect(&agent, "u")
        .is_ok_and(|d| d["state"] == "running")));
    let out = agent.mig_ok(&["exec", "-u", "app", "u", "--", "sh", "-c", probe])?;
    ensure!(
        groups(&out) == [29, 101, 1000],
        "exec -u app: id -G = {out}"
    );
    let out = agent.mig_ok(&["exec", "-u", "app", "u", "--", "sh", "-c", "echo [$HOME]"])?;
    ensure!(out.trim() == "[/home/app]", "exec -u app: {out}");
    let out = agent.mig_ok(&["exec", "u", "--", "sh", "-c", "echo [$HOME]"])?;
    ensure!(out.trim() == "[/root]", "exec as root: {out}");
    let out = agent.mig_ok(&["exec", "u", "--", "id", "-G"])?;
    ensure!(groups(&out) == [0], "exec as root: id -G = {out}");
    agent.mig_ok(&["rm", "-f", "u"])?;
    Ok(())
}
