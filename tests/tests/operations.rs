//! Operating mig on real hosts (issue 10), end to end through the real binaries: systemd
//! readiness and `systemctl restart` (SIGTERM) with running containers, OCI bundles, a state
//! record of the previous format, an older or newer wire protocol peer, and `mig drain`.
//! Run as root. Labs use the subnets 10.214.90-99.0/24.

use anyhow::{bail, ensure, Context, Result};
use mig_tests::lab::{continues, log_state, running_on, Lab};
use mig_tests::{busybox_rootfs, is_root, pid_alive, wait_until, Agent};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn recv(sock: &UnixDatagram) -> Result<String> {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).context("no sd_notify message")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// migd tells a Type=notify unit it is ready once its socket and QUIC endpoint are up, and that
/// it stops on SIGTERM (what `systemctl stop/restart` sends with KillMode=process); the container
/// outlives it and the next migd re-adopts it.
#[test]
fn sd_notify_and_sigterm_restart_keep_containers() -> Result<()> {
    if !is_root("sd_notify_and_sigterm_restart_keep_containers") {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let notify = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let notify_s = notify.to_string_lossy().into_owned();
    let mut agent = Agent::start_with_env("sdnotify", &[("NOTIFY_SOCKET", &notify_s)])?;
    let ready = recv(&sock)?;
    ensure!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // READY comes after the API socket is bound: it answers now.
    agent.mig_ok(&["ps"])?;
    agent.import_busybox()?;
    let id = agent
        .mig_ok(&[
            "run",
            "-d",
            "--name",
            "svc",
            "busybox",
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
        ])?
        .trim()
        .to_owned();
    let d = agent.mig_json(&["inspect", &id, "--json"])?;
    let host_pid = d["pid_map"][0]["host_pid"].as_i64().context("host_pid")? as i32;
    let pid = agent.pid().context("migd pid")?;
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    let stopping = recv(&sock)?;
    ensure!(stopping.contains("STOPPING=1"), "{stopping:?}");
    ensure!(
        wait_until(Duration::from_secs(10), || !agent.socket.exists()),
        "migd did not remove its socket on SIGTERM"
    );
    agent.kill9(); // reaps the exited migd
    std::thread::sleep(Duration::from_millis(300));
    ensure!(pid_alive(host_pid), "the container died with migd");
    agent.spawn()?;
    let ready = recv(&sock)?;
    ensure!(ready.contains("READY=1"), "{ready:?}");
    let d = agent.mig_json(&["inspect", "svc", "--json"])?;
    ensure!(d["state"] == "running", "{d}");
    ensure!(d["pid_map"][0]["host_pid"] == host_pid, "{d}");
    agent.mig_ok(&["rm", "-f", "svc"])?;
    Ok(())
}

/// `migd --check-config` validates the file, prints the effective settings with flags applied,
/// and names an unknown key with its line.
#[test]
fn check_config_prints_effective_settings_and_names_bad_keys() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "name = \"opshost\"\nlog_format = \"json\"\n[limits]\nmax_outgoing_moves = 3\n",
    )?;
    let o = Command::new(mig_tests::bin("migd"))
        .arg("--config")
        .arg(&good)
        .args(["--check-config", "--listen", "127.0.0.1:7999"])
        .output()?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    ensure!(o.status.success(), "{o:?}");
    for want in [
        "name = \"opshost\"",
        "listen = \"127.0.0.1:7999\"",
        "cgroup_parent = \"mig-opshost\"",
        "max_outgoing_moves = 3",
        "log_format = \"json\"",
    ] {
        ensure!(stdout.contains(want), "{want} missing from {stdout}");
    }
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n\n[limits]\nmax_moves = 1\n")?;
    let o = Command::new(mig_tests::bin("migd"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success(), "{o:?}");
    ensure!(
        stderr.contains("line 4") && stderr.contains("`max_moves`") && stderr.lines().count() == 1,
        "{stderr}"
    );
    Ok(())
}

fn write_bundle(dir: &Path, config: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    if !dir.join("rootfs").exists() {
        busybox_rootfs(dir)?;
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config)?)?;
    Ok(())
}

/// An OCI runtime bundle runs with its args, env, cwd, user, hostname and limits; a bundle
/// asking for something mig does not do is refused with the field's name.
#[test]
fn oci_bundle_runs_and_unsupported_fields_are_refused() -> Result<()> {
    if !is_root("oci_bundle_runs_and_unsupported_fields_are_refused") {
        return Ok(());
    }
    let agent = Agent::start("bundle")?;
    let bundle = agent.dir.path().join("web-bundle");
    let mut config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": false},
        "process": {
            "terminal": false,
            "user": {"uid": 1000, "gid": 1000},
            "args": ["sh", "-c", "echo cwd=$(pwd) uid=$(id -u) gid=$(id -g) host=$(hostname) greet=$GREETING; exec sleep 1000"],
            "env": ["PATH=/bin", "GREETING=hello-bundle"],
            "cwd": "/tmp",
            "noNewPrivileges": true
        },
        "hostname": "bundled",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "resources": {
                "memory": {"limit": 67108864},
                "pids": {"limit": 32},
                "devices": [{"allow": false, "access": "rwm"}]
            }
        }
    });
    write_bundle(&bundle, &config)?;
    let bundle_s = bundle.to_string_lossy().into_owned();
    let id = agent
        .mig_ok(&["run", "-d", "--bundle", &bundle_s, "--name", "web"])?
        .trim()
        .to_owned();
    let want = "cwd=/tmp uid=1000 gid=1000 host=bundled greet=hello-bundle";
    let mut logs = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        logs = agent.mig(&["logs", "web"]).stdout;
        logs.contains(want)
    });
    ensure!(ok, "bundle output {logs:?}, want {want:?}");
    let d = agent.mig_json(&["inspect", &id, "--json"])?;
    ensure!(d["state"] == "running", "{d}");
    ensure!(
        d.to_string().contains("67108864"),
        "memory limit not applied: {d}"
    );
    let images = agent.mig_ok(&["image", "ls"])?;
    ensure!(images.contains("bundle-web"), "{images}");
    agent.mig_ok(&["rm", "-f", "web"])?;
    // Refusals name the field and leave nothing behind.
    config["linux"]["seccomp"] = serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO"});
    write_bundle(&bundle, &config)?;
    let o = agent.mig(&["run", "-d", "--bundle", &bundle_s, "--name", "web2"]);
    ensure!(o.code == 125, "{o:?}");
    ensure!(
        o.stderr
            .contains("linux.seccomp is not supported: mig applies its own filter"),
        "{}",
        o.stderr
    );
    config["linux"].as_object_mut().unwrap().remove("seccomp");
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind"]}));
    write_bundle(&bundle, &config)?;
    let o = agent.mig(&["run", "-d", "--bundle", &bundle_s]);
    ensure!(
        o.code == 125 && o.stderr.contains("mounts[2] is not supported"),
        "{o:?}"
    );
    let ps = agent.mig_json(&["ps", "-a", "--json"])?;
    ensure!(ps.as_array().is_some_and(|a| a.is_empty()), "{ps}");
    Ok(())
}

/// A container record written by the previous release (the 0.1 format of spec.json,
/// state.json and exit.json, frozen here as text) is read by this agent, and so is a migration
/// journal of that format (recovered at start: the interrupted incoming move is rolled back and
/// its journal rewritten in the current format). Records of a newer format (a downgrade) are
/// refused with the file and both versions named and left as they are.
#[test]
fn state_records_of_the_previous_format_are_read() -> Result<()> {
    if !is_root("state_records_of_the_previous_format_are_read") {
        return Ok(());
    }
    let mut agent = Agent::start("oldstate")?;
    agent.kill9();
    let id = "0123456789abcdef0123456789abcdef";
    let dir = agent.state_dir.join("containers").join(id);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("spec.json"),
        r#"{"id":"0123456789abcdef0123456789abcdef","name":"old-one","image":{"name":"busybox","id":"sha256:1111111111111111111111111111111111111111111111111111111111111111","layers":["sha256:2222222222222222222222222222222222222222222222222222222222222222"]},"process":{"args":["sh","-c","exit 3"],"env":["PATH=/bin"],"cwd":"/","uid":0,"gid":0},"hostname":"old-one","limits":{"memory":null,"cpu_millis":null,"pids":null},"userns":null}"#,
    )?;
    std::fs::write(
        dir.join("state.json"),
        format!(
            r#"{{"state":"exited","created":1700000000,"started":1700000001,"finished":1700000002,"exit_code":3,"signal":null,"oom_killed":false,"reason":null,"stop_requested":false,"cgroup":"{}/{id}"}}"#,
            agent.cgroup_parent
        ),
    )?;
    std::fs::write(
        dir.join("exit.json"),
        r#"{"code":3,"signal":null,"oom_killed":false,"finished":1700000002}"#,
    )?;
    // A journal of 0.1: an incoming move interrupted before its restore, with its staging dir.
    let journals = agent.state_dir.join("migrations");
    let mid = "00112233445566778899aabbccddeeff";
    std::fs::create_dir_all(journals.join(format!("{mid}.in")))?;
    std::fs::write(journals.join(format!("{mid}.in/pages-1.img")), b"x")?;
    let journal = journals.join(format!("{mid}.json"));
    std::fs::write(
        &journal,
        format!(
            r#"{{"migration_id":"{mid}","role":"Dest","state":"Preparing","container_id":"fedcba9876543210fedcba9876543210","container_name":"in-flight","peer":"host-x","cgroup":"{}/fedcba9876543210fedcba9876543210","updated":1700000000}}"#,
            agent.cgroup_parent
        ),
    )?;
    // Records of a future format: a container and a journal.
    let future_id = "99999999999999999999999999999999";
    let future_dir = agent.state_dir.join("containers").join(future_id);
    std::fs::create_dir_all(&future_dir)?;
    let future_spec = std::fs::read_to_string(dir.join("spec.json"))?
        .replace(id, future_id)
        .replace("old-one", "future-one")
        .replacen('{', r#"{"format":3,"isolation":"vm","#, 1);
    std::fs::write(future_dir.join("spec.json"), &future_spec)?;
    let future_mid = "ffffffffffffffffffffffffffffffff";
    let future_journal = journals.join(format!("{future_mid}.json"));
    let future_text = format!(r#"{{"format":4,"migration_id":"{future_mid}","phase":"next"}}"#);
    std::fs::write(&future_journal, &future_text)?;

    agent.spawn()?;
    let ps = agent.mig_json(&["ps", "-a", "--json"])?;
    let c = ps
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .with_context(|| format!("old record not listed: {ps}\n{}", agent.log()))?;
    ensure!(c["name"] == "old-one" && c["state"] == "exited", "{c}");
    ensure!(c["exit_code"] == 3, "{c}");
    ensure!(
        ps.as_array().is_some_and(|a| a.len() == 1),
        "the future record is listed: {ps}"
    );
    let mut j = serde_json::Value::Null;
    let settled = wait_until(Duration::from_secs(20), || {
        j = std::fs::read(&journal)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        j["state"] == "RolledBack"
    });
    ensure!(settled, "old journal not recovered: {j}\n{}", agent.log());
    ensure!(
        j["format"] == 3 && j["container_name"] == "in-flight",
        "{j}"
    );
    ensure!(
        !journals.join(format!("{mid}.in")).exists(),
        "the staging dir of the old journal is left"
    );
    // The future records: named in the log with both versions, not read, not changed.
    let log = agent.log();
    for (file, versions) in [
        (future_dir.join("spec.json"), "3, newer than version 2"),
        (future_journal.clone(), "4, newer than version 3"),
    ] {
        let want = format!("{} has format version {versions}", file.display());
        ensure!(log.contains(&want), "{want:?} not in the log:\n{log}");
    }
    ensure!(std::fs::read_to_string(future_dir.join("spec.json"))? == future_spec);
    ensure!(std::fs::read_to_string(&future_journal)? == future_text);
    ensure!(!future_dir.join("state.json").exists());
    // The old record, rewritten by this agent, is of the current format.
    agent.mig_ok(&["rm", "old-one"])?;
    ensure!(!dir.exists(), "old-one not removed");
    std::fs::remove_dir_all(&future_dir)?;
    Ok(())
}

/// A migd started by hand in a lab host's network namespace (to give it an environment of its
/// own); killed and reaped on drop.
struct HandAgent(Child);

impl Drop for HandAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Replaces host `i`'s agent by one announcing wire protocol `version`.
fn agent_speaking(lab: &Lab, i: usize, version: &str) -> Result<HandAgent> {
    hand_agent(
        lab,
        i,
        &format!("wire-{version}"),
        &[],
        &[("MIG_WIRE_VERSION", version)],
    )
}

/// Replaces host `i`'s agent by one started with `args` and `env` added (log in the state dir).
fn hand_agent(
    lab: &Lab,
    i: usize,
    tag: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<HandAgent> {
    lab.kill_agent(i)?;
    let h = &lab.hosts[i];
    let _ = std::fs::remove_file(&h.socket);
    let log = std::fs::File::create(h.state_dir.join(format!("{tag}.log")))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.netns))
        .arg("--")
        .arg(mig_tests::bin("migd"))
        .arg("--state-dir")
        .arg(&h.state_dir)
        .arg("--socket")
        .arg(&h.socket)
        .args(["--name", &h.name, "--cgroup-parent", &lab.cgroup_parent(i)])
        .arg("--listen")
        .arg(format!("{}:{}", h.address, h.quic_port))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let agent = HandAgent(child);
    if !wait_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&h.socket).is_ok()
    }) {
        bail!("migd {tag} did not start");
    }
    Ok(agent)
}

/// Upgrades: a peer speaking another major protocol version is refused with both versions named
/// and the container keeps running at home; a peer of an older minor version gets what it knows;
/// a peer of a newer minor version is served.
#[test]
fn older_major_wire_version_is_refused_newer_minor_served() -> Result<()> {
    if !is_root("older_major_wire_version_is_refused_newer_minor_served") {
        return Ok(());
    }
    let lab = Lab::up("wire", 90)?;
    let _id = lab.run_container(0, "wv", 1)?;
    {
        let _old = agent_speaking(&lab, 1, "0.9")?;
        let o = lab.mig(0, &["move", "wv", "host-b"]);
        ensure!(o.code != 0, "a move to a 0.9 peer succeeded: {o:?}");
        ensure!(
            o.stderr.contains("version") && o.stderr.contains("0.9"),
            "the refusal does not name the versions: {}",
            o.stderr
        );
        running_on(&lab, 0, "wv")?;
    }
    {
        // A 1.4 peer gets the container's log whole while frozen, and sends it so (protocol
        // 1.5 sends it in two parts); the output goes on in the same log both ways.
        let _v14 = agent_speaking(&lab, 1, "1.4")?;
        let (count, _) = log_state(&lab.mig(0, &["logs", "wv"]).stdout);
        let r = lab.mig_json(0, &["move", "wv", "host-b", "--json"])?;
        ensure!(
            r["presync_log_bytes"] == 0 && r["delta_log_bytes"].as_u64().unwrap_or(0) > 0,
            "{r}"
        );
        running_on(&lab, 1, "wv")?;
        continues(&lab, 1, "wv", count)?;
        let (count, _) = log_state(&lab.mig(1, &["logs", "wv"]).stdout);
        lab.mig_ok(1, &["move", "wv", "host-a"])?;
        running_on(&lab, 0, "wv")?;
        continues(&lab, 0, "wv", count)?;
    }
    let _newer = agent_speaking(&lab, 1, "1.9")?;
    let (count, _) = log_state(&lab.mig(0, &["logs", "wv"]).stdout);
    lab.mig_ok(0, &["move", "wv", "host-b"])?;
    running_on(&lab, 1, "wv")?;
    continues(&lab, 1, "wv", count)?;
    lab.mig_ok(1, &["rm", "-f", "wv"])?;
    Ok(())
}

/// `mig drain` moves every running container of a host to its peers, spread round-robin, each
/// still running exactly once, and leaves the host empty.
#[test]
fn drain_empties_a_host() -> Result<()> {
    if !is_root("drain_empties_a_host") {
        return Ok(());
    }
    let lab = Lab::up_n("drain", 91, 3)?;
    let names = ["d1", "d2", "d3", "d4"];
    let mut counts = Vec::new();
    for n in names {
        lab.run_container(0, n, 1)?;
        counts.push(log_state(&lab.mig(0, &["logs", n]).stdout).0);
    }
    let r = lab.mig_json(0, &["drain", "--json"])?;
    ensure!(r["moved"] == 4 && r["failed"] == 0, "{r}");
    ensure!(r["left"].as_array().is_some_and(|l| l.is_empty()), "{r}");
    let ps = lab.mig_json(0, &["ps", "--json"])?;
    ensure!(ps.as_array().is_some_and(|a| a.is_empty()), "{ps}");
    let mut per_host = [0usize; 3];
    for (n, count) in names.iter().zip(counts) {
        let mut found = Vec::new();
        for h in 0..3 {
            let ps = lab.mig_json(h, &["ps", "--json"])?;
            let here = ps
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["name"] == *n && c["state"] == "running")
                .count();
            for _ in 0..here {
                found.push(h);
            }
        }
        ensure!(
            found.len() == 1 && found[0] != 0,
            "{n} runs on hosts {found:?}"
        );
        per_host[found[0]] += 1;
        continues(&lab, found[0], n, count)?;
    }
    ensure!(
        per_host == [0, 2, 2],
        "not spread round-robin: {per_host:?}"
    );
    // Draining an empty host is a no-op that succeeds.
    let r = lab.mig_json(0, &["drain", "--json"])?;
    ensure!(r["moved"] == 0, "{r}");
    Ok(())
}

/// Starts `mig move NAME host-b` on host-a in the background and waits until it is in its
/// presync (host-b has its staging directory), where a delay fault holds it.
fn held_move(lab: &Lab, name: &str) -> Result<Child> {
    let child = Command::new(mig_tests::bin("mig"))
        .arg("--socket")
        .arg(&lab.hosts[0].socket)
        .args(["move", name, "host-b"])
        .env_remove("MIG_HOST")
        .env_remove("MIG_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let staging = lab.state_dir(1).join("migrations");
    wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(&staging)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".in"))
    });
    Ok(child)
}

/// A config file with one `[limits]` line, next to the lab's state directories.
/// A config file with `line` under `[limits]`, in `dir` (the test's own temporary directory: the
/// lab's state root is removed by `mig lab down` only when nothing but the hosts is left there).
fn limits_file(dir: &std::path::Path, tag: &str, line: &str) -> Result<String> {
    let f = dir.join(format!("{tag}.toml"));
    std::fs::write(&f, format!("[limits]\n{line}\n"))?;
    Ok(f.display().to_string())
}

/// `limits.max_incoming_moves` and `limits.max_outgoing_moves`: while one move is held in its
/// presync (a delay fault on the source), a second one is refused with a message naming the
/// limit, before anything is frozen; the held move then completes and every container runs
/// exactly once.
#[test]
fn concurrent_move_limits_are_enforced() -> Result<()> {
    if !is_root("concurrent_move_limits_are_enforced") {
        return Ok(());
    }
    let mut lab = Lab::up("lim", 92)?;
    let configs = tempfile::tempdir()?;
    for name in ["l1", "l2", "l3"] {
        lab.run_container(0, name, 1)?;
    }
    lab.fault(0, Some("source-presync:delay:4000"))?;

    // The destination takes one migration at a time.
    let cfg = limits_file(configs.path(), "incoming", "max_incoming_moves = 1")?;
    {
        let _b = hand_agent(&lab, 1, "incoming", &["--config", &cfg], &[])?;
        let mut first = held_move(&lab, "l1")?;
        let o = lab.mig(0, &["move", "l2", "host-b"]);
        ensure!(o.code != 0, "a second incoming move was accepted: {o:?}");
        ensure!(o.stderr.contains("max_incoming_moves"), "{}", o.stderr);
        ensure!(first.wait()?.success(), "the held move failed");
        running_on(&lab, 1, "l1")?;
        running_on(&lab, 0, "l2")?;
    }
    lab.restart(1)?;

    // The source starts one move at a time.
    let cfg = limits_file(configs.path(), "outgoing", "max_outgoing_moves = 1")?;
    let _a = hand_agent(&lab, 0, "outgoing", &["--config", &cfg], &[])?;
    let mut first = held_move(&lab, "l2")?;
    let o = lab.mig(0, &["move", "l3", "host-b"]);
    ensure!(o.code != 0, "a second outgoing move was started: {o:?}");
    ensure!(o.stderr.contains("max_outgoing_moves"), "{}", o.stderr);
    ensure!(first.wait()?.success(), "the held move failed");
    lab.fault(0, None)?;
    running_on(&lab, 1, "l2")?;
    running_on(&lab, 0, "l3")?;
    Ok(())
}
