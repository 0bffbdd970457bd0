//! The local multi-host lab (`mig_agent::lab`) against the real kernel with the real `migd`:
//! namespaces, links, agents, the lab file, restart, and a `down` that leaves nothing behind — also
//! after a failed `up` and with containers' leftovers (processes, cgroups, mounts) in a host.
//!
//! Needs root. The binaries come from `mig_tests::bin` (built on first use); `MIG_LAB_TEST_MIGD`
//! names another migd.

use mig_agent::lab::{self, LabConfig, LabError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's migd (built by `mig_tests::bin`), or `MIG_LAB_TEST_MIGD`.
fn migd() -> PathBuf {
    match std::env::var_os("MIG_LAB_TEST_MIGD") {
        Some(p) => PathBuf::from(p),
        None => mig_tests::bin("migd"),
    }
}

/// A lab name unique to this test process and `tag`, and a subnet of its own.
fn config(tag: char, third: u8, hosts: usize) -> LabConfig {
    let name = format!("t{}{tag}", std::process::id());
    let mut cfg = LabConfig::new(&name, hosts, migd());
    cfg.subnet_base = [10, 213, third];
    cfg
}

/// Removes the lab whatever happens to the test.
struct LabGuard(String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        mig_tests::lab_down_quietly(&self.0);
    }
}

fn inode(path: impl AsRef<Path>) -> (u64, u64) {
    let m = std::fs::metadata(path.as_ref()).expect("stat");
    (m.dev(), m.ino())
}

fn netns_of_lab(name: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{name}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn mounts_under(prefix: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|mp| Path::new(mp).starts_with(prefix))
        .collect()
}

fn pid_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn ping(from_ns: &str, addr: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", from_ns, "busybox", "ping", "-c1", "-W2", addr,
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn assert_gone(cfg: &LabConfig, agent_pids: &[i32]) {
    assert!(
        netns_of_lab(&cfg.name).is_empty(),
        "namespaces left: {:?}",
        netns_of_lab(&cfg.name)
    );
    for &pid in agent_pids {
        assert!(!pid_running(pid), "agent {pid} still runs");
    }
    assert!(mounts_under(&cfg.state_root).is_empty());
    assert!(mounts_under(&cfg.root_dir).is_empty());
    assert!(!lab::lab_file_path(&cfg.name).exists(), "lab file left");
    assert!(!cfg.root_dir.exists(), "run dir left");
    assert!(!cfg.state_root.exists(), "state dir left");
    // No veth end of the lab in the machine's own namespace.
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for ns in ["host-a", "host-b"].map(|h| format!("{}-{h}", cfg.name)) {
        assert!(!links.contains(&ns), "link of {ns} in the root namespace");
    }
}

#[test]
fn lab_up_status_restart_down() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('a', 1, 2);
    let _guard = LabGuard(cfg.name.clone());
    let hosts = lab::up(&cfg).expect("lab up");

    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0].name, "host-a");
    assert_eq!(hosts[1].name, "host-b");
    assert_eq!(hosts[0].address.to_string(), "10.213.1.10");
    assert_eq!(hosts[1].address.to_string(), "10.213.1.11");
    let mut ns = netns_of_lab(&cfg.name);
    ns.sort();
    assert_eq!(
        ns,
        ["host-a", "host-b", "sw"].map(|s| format!("{}-{s}", cfg.name))
    );

    // The hosts reach each other over the bridge, in both directions.
    assert!(
        ping(&hosts[0].netns, &hosts[1].address.to_string()),
        "host-a cannot reach host-b"
    );
    assert!(
        ping(&hosts[1].netns, &hosts[0].address.to_string()),
        "host-b cannot reach host-a"
    );

    // Agents: alive, in their host's network namespace, in the machine's mount namespace.
    let status = lab::status(&cfg.name).expect("status");
    let mut pids = Vec::new();
    for h in &status {
        let pid = h
            .agent_pid
            .unwrap_or_else(|| panic!("agent of {} not alive", h.name));
        pids.push(pid);
        assert!(h.socket.exists());
        assert_eq!(
            inode(format!("/proc/{pid}/ns/net")),
            inode(format!("/run/netns/{}", h.netns))
        );
        assert_eq!(
            inode(format!("/proc/{pid}/ns/mnt")),
            inode("/proc/self/ns/mnt")
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(String::from_utf8_lossy(&cmdline).contains(&h.name));
    }

    // Each agent's QUIC endpoint listens on its host's address (UDP sockets of the agent's network
    // namespace, /proc/PID/net/udp: little-endian hex address, hex port).
    for (h, pid) in status.iter().zip(&pids) {
        let [a, b, c, d] = h.address.octets();
        let local = format!("{d:02X}{c:02X}{b:02X}{a:02X}:{:04X}", h.quic_port);
        let udp = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).unwrap();
        assert!(
            udp.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(local.as_str())),
            "{} does not listen on {}:{}:\n{udp}",
            h.name,
            h.address,
            h.quic_port
        );
    }

    // The lab file.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab::lab_file_path(&cfg.name)).unwrap()).unwrap();
    assert_eq!(json["name"], cfg.name.as_str());
    assert_eq!(json["hosts"].as_array().unwrap().len(), 2);
    for (i, h) in status.iter().enumerate() {
        let j = &json["hosts"][i];
        assert_eq!(j["name"], h.name.as_str());
        assert_eq!(j["address"], h.address.to_string());
        assert_eq!(j["netns"], h.netns.as_str());
        assert_eq!(j["socket"], h.socket.display().to_string());
        assert_eq!(j["state_dir"], h.state_dir.display().to_string());
        assert_eq!(j["agent_pid"], pids[i]);
        assert_eq!(j["quic_port"], lab::DEFAULT_QUIC_PORT);
    }
    // Peering: each host has an identity, and the other host pinned in its peer store.
    for (i, h) in status.iter().enumerate() {
        let fp = h.fingerprint.clone().expect("fingerprint");
        assert_eq!(json["hosts"][i]["fingerprint"], fp.as_str());
        assert!(h.state_dir.join("identity/key.der").exists());
        let peers: serde_json::Value =
            serde_json::from_slice(&std::fs::read(h.state_dir.join("peers.json")).unwrap())
                .unwrap();
        let other = &status[1 - i];
        assert_eq!(peers["peers"].as_array().unwrap().len(), 1, "{peers}");
        let p = &peers["peers"][0];
        assert_eq!(p["name"], other.name.as_str());
        assert_eq!(
            p["address"],
            format!("{}:{}", other.address, other.quic_port)
        );
        assert_eq!(
            p["fingerprint"],
            other.fingerprint.clone().unwrap().as_str()
        );
    }
    assert_ne!(status[0].fingerprint, status[1].fingerprint);
    assert_eq!(
        lab::find_host(&cfg.name, "host-b").unwrap().socket,
        status[1].socket
    );

    // A second up is refused and leaves the lab alone.
    assert!(matches!(lab::up(&cfg), Err(LabError::AlreadyUp { .. })));
    assert!(pid_running(pids[0]));

    // Restarting one agent, whose identity is replaced meanwhile (removed: it makes a new one
    // at start). The status shows the fingerprint the agent now has, not the lab file's old one
    // (QA of session 21: `mig lab status` kept showing the old one).
    let old_fingerprint = status[1].fingerprint.clone();
    std::fs::remove_dir_all(status[1].state_dir.join("identity")).expect("remove identity");
    let restarted = lab::restart_agent(&cfg.name, "host-b").expect("restart");
    let info: serde_json::Value =
        serde_json::from_str(&mig(&status[1].socket, &["info", "--json"])).expect("info json");
    let now = lab::status(&cfg.name).unwrap()[1].fingerprint.clone();
    assert_ne!(now, old_fingerprint, "the identity was replaced");
    assert_eq!(now.as_deref(), info["fingerprint"].as_str(), "{info}");
    let new_pid = restarted.agent_pid.expect("new pid");
    assert_ne!(new_pid, pids[1]);
    assert!(!pid_running(pids[1]), "old agent still runs");
    assert_eq!(lab::status(&cfg.name).unwrap()[1].agent_pid, Some(new_pid));
    pids.push(new_pid);

    // A second agent on a state directory in use refuses to start, before it touches anything:
    // the running agent keeps its containers and its socket (QA of session 27: a second migd
    // adopted the first one's containers and took its socket).
    let other_socket = status[0].socket.with_file_name("second.sock");
    let mut second = Command::new(migd())
        .arg("--state-dir")
        .arg(&status[0].state_dir)
        .arg("--socket")
        .arg(&other_socket)
        .args(["--name", "host-a"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run a second migd");
    let ended = mig_tests::wait_until(std::time::Duration::from_secs(10), || {
        second.try_wait().ok().flatten().is_some()
    });
    if !ended {
        let _ = second.kill();
    }
    let second = second.wait_with_output().expect("second migd");
    // A second agent that did start left its socket, which the lab's teardown does not know.
    let started = other_socket.exists();
    let _ = std::fs::remove_file(&other_socket);
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        ended && !second.status.success() && said.contains("another migd (PID "),
        "a second agent ran on host-a's state directory: {:?}: {said}",
        second.status
    );
    assert!(!started, "a second agent bound {}", other_socket.display());
    mig(&status[0].socket, &["info"]);

    // Restarts of both hosts at once, and two of one host at once: the lab file keeps each
    // host's new agent (QA of session 27: one host's new PID was lost, and the next restart of
    // that host started a second agent beside the live one).
    for _ in 0..2 {
        let name = cfg.name.as_str();
        std::thread::scope(|s| {
            let restarts: Vec<_> = ["host-a", "host-b", "host-b"]
                .map(|h| s.spawn(move || lab::restart_agent(name, h).expect("restart")))
                .into_iter()
                .collect();
            for r in restarts {
                pids.extend(r.join().expect("restart thread").agent_pid);
            }
        });
        for h in lab::status(&cfg.name).unwrap() {
            let pid = h.agent_pid.expect("the lab file names a live agent");
            let info: serde_json::Value =
                serde_json::from_str(&mig(&h.socket, &["info", "--json"])).expect("info json");
            assert_eq!(info["name"], h.name.as_str(), "{info}");
            let lock = std::fs::read_to_string(h.state_dir.join("migd.lock")).unwrap();
            assert_eq!(
                lock.trim(),
                pid.to_string(),
                "the lab file's agent holds the state"
            );
        }
    }

    let report = lab::down(&cfg.name).expect("down");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.namespaces_removed.len(), 3);
    assert_eq!(report.agents_stopped.len(), 2);
    assert_gone(&cfg, &pids);

    // Idempotent.
    let again = lab::down(&cfg.name).expect("second down");
    assert!(again.is_clean());
    assert!(again.namespaces_removed.is_empty() && again.agents_stopped.is_empty());
    assert!(matches!(
        lab::status(&cfg.name),
        Err(LabError::NotUp { .. })
    ));
}

#[test]
fn failed_up_rolls_back() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let mut cfg = config('b', 2, 2);
    let _guard = LabGuard(cfg.name.clone());
    // An "agent" that writes a line and exits at once.
    cfg.migd = PathBuf::from("/bin/sh");
    cfg.extra_agent_args = Vec::new();
    let err = lab::up(&cfg).expect_err("up with a failing agent");
    let LabError::UpRolledBack { source, rollback } = err else {
        panic!("unexpected error {err}");
    };
    assert!(rollback.is_empty(), "{rollback:?}");
    match *source {
        LabError::AgentExited {
            ref host,
            ref log_tail,
            ..
        } => {
            assert_eq!(host, "host-a");
            // /bin/sh refuses the agent's options; its complaint is quoted from the log.
            assert!(!log_tail.is_empty(), "no log quoted");
        }
        ref other => panic!("unexpected cause {other}"),
    }
    assert_gone(&cfg, &[]);

    // State left behind by an earlier lab (a reboot clears /run, not /var/lib) is refused, not reused.
    let stale = cfg.state_root.join("host-b");
    std::fs::create_dir_all(&stale).unwrap();
    assert!(matches!(lab::up(&cfg), Err(LabError::AlreadyUp { .. })));
    assert!(netns_of_lab(&cfg.name).is_empty());
    let report = lab::down(&cfg.name).unwrap();
    assert!(
        report.is_clean() && report.paths_removed.contains(&stale),
        "{report:?}"
    );
    assert!(!cfg.state_root.exists());
}

/// Hierarchies to plant a host cgroup in: the cgroup2 mount and the v1 pids controller if present.
fn cgroup_roots() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut roots = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mp = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let opts = r.nth(1).unwrap_or("");
        if fstype == "cgroup2" || (fstype == "cgroup" && opts.split(',').any(|o| o == "pids")) {
            roots.push(PathBuf::from(mp));
        }
    }
    roots
}

#[test]
fn down_removes_container_leftovers() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('c', 3, 1);
    let _guard = LabGuard(cfg.name.clone());
    let hosts = lab::up(&cfg).expect("lab up");
    let host = &hosts[0];

    // What a container leaves when its agent and shim vanish: a process in the host's namespace
    // recorded in shim.json and placed in the host's cgroups, and mounts in its state directory.
    let mut child = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &host.netns, "busybox", "sleep", "600"])
            .spawn()
            .expect("start a stand-in container"),
        true,
    );
    let pid = child.0.id() as i32;
    // Wait until `ip netns exec` has exec'd busybox (in the host's namespace).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while inode(format!("/proc/{pid}/ns/net")) != inode(format!("/run/netns/{}", host.netns)) {
        assert!(
            std::time::Instant::now() < deadline,
            "stand-in never entered the namespace"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut cgroups = Vec::new();
    for root in cgroup_roots() {
        let dir = root
            .join(format!("mig-{}-{}", cfg.name, host.name))
            .join("c1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        cgroups.push(dir);
    }
    assert!(!cgroups.is_empty());
    let cdir = host.state_dir.join("containers").join("c1");
    let rootfs = cdir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    std::fs::write(
        cdir.join("shim.json"),
        serde_json::json!({"shim_pid": pid, "init_pid": pid}).to_string(),
    )
    .unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &rootfs,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &rootfs.join("proc"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    assert_eq!(mounts_under(&cfg.state_root).len(), 2);

    let report = lab::down(&cfg.name).expect("down");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.processes_killed.contains(&pid), "{report:?}");
    assert_eq!(report.unmounted.len(), 2, "{report:?}");
    // `down` reaps it too (it is our child here): it is simply gone.
    match child.0.try_wait() {
        Ok(Some(status)) => assert!(!status.success()),
        Ok(None) => panic!("stand-in container {pid} survived down"),
        Err(_) => assert!(!pid_running(pid)),
    }
    child.1 = false;
    for cg in &cgroups {
        assert!(!cg.exists(), "{} left", cg.display());
        assert!(
            !cg.parent().unwrap().exists(),
            "{} left",
            cg.parent().unwrap().display()
        );
    }
    assert_gone(&cfg, &[host.agent_pid.unwrap()]);
}

/// Kills and reaps a process this test started while armed (disarmed once it is known to be gone,
/// so that a reused PID is never signalled).
struct ChildGuard(std::process::Child, bool);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.1 {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn lab_timings() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('d', 4, 4);
    let _guard = LabGuard(cfg.name.clone());
    let start = std::time::Instant::now();
    let hosts = lab::up(&cfg).expect("lab up");
    let up = start.elapsed();
    assert_eq!(hosts.len(), 4);
    assert!(
        ping(&hosts[3].netns, &hosts[0].address.to_string()),
        "host-d cannot reach host-a"
    );
    let start = std::time::Instant::now();
    let report = lab::down(&cfg.name).expect("down");
    let down = start.elapsed();
    assert!(report.is_clean(), "{:?}", report.problems);
    println!("lab of 4 hosts: up {up:?}, down {down:?}");
}

/// Runs the `mig` CLI next to migd against `socket`; returns its stdout.
fn mig(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(mig_tests::bin("mig"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run mig");
    assert!(
        out.status.success(),
        "mig {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every cgroup directory named `name` at the top of any hierarchy.
fn cgroups_named(name: &str) -> Vec<PathBuf> {
    cgroup_roots_all()
        .into_iter()
        .map(|r| r.join(name))
        .filter(|p| p.exists())
        .collect()
}

fn cgroup_roots_all() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mp = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mp))
        })
        .collect()
}

#[test]
fn down_removes_a_real_container() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('e', 5, 1);
    let _guard = LabGuard(cfg.name.clone());
    let hosts = lab::up(&cfg).expect("lab up");
    let host = &hosts[0];

    let image = tempfile::tempdir().unwrap();
    let rootfs = mig_tests::busybox_rootfs(image.path()).unwrap();
    mig(
        &host.socket,
        &[
            "image",
            "import",
            rootfs.to_str().unwrap(),
            "--name",
            "busybox",
        ],
    );
    let id = mig(
        &host.socket,
        &["run", "-d", "--name", "c1", "busybox", "--", "sleep", "600"],
    );
    let shim: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            host.state_dir
                .join("containers")
                .join(&id)
                .join("shim.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let shim_pid = shim["shim_pid"].as_i64().unwrap() as i32;
    let init_pid = shim["init_pid"].as_i64().unwrap() as i32;
    assert!(pid_running(shim_pid) && pid_running(init_pid));
    let cgroup_parent = format!("mig-{}-{}", cfg.name, host.name);
    assert!(
        !cgroups_named(&cgroup_parent).is_empty(),
        "no cgroup {cgroup_parent}"
    );
    assert!(!mounts_under(&cfg.state_root).is_empty(), "no rootfs mount");

    // Restarting the host's agent leaves the container running, and the new agent adopts it.
    let restarted = lab::restart_agent(&cfg.name, &host.name).expect("restart");
    assert_ne!(restarted.agent_pid, host.agent_pid);
    assert!(
        pid_running(shim_pid) && pid_running(init_pid),
        "container died with its agent"
    );
    let ps = mig(&host.socket, &["ps", "--json"]);
    assert!(ps.contains(&id) && ps.contains("running"), "{ps}");

    let report = lab::down(&cfg.name).expect("down");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.processes_killed.contains(&init_pid), "{report:?}");
    assert!(!pid_running(shim_pid), "shim {shim_pid} survived");
    assert!(!pid_running(init_pid), "container init {init_pid} survived");
    assert!(
        cgroups_named(&cgroup_parent).is_empty(),
        "{:?} left",
        cgroups_named(&cgroup_parent)
    );
    assert_gone(
        &cfg,
        &[host.agent_pid.unwrap(), restarted.agent_pid.unwrap()],
    );
}

#[test]
fn down_without_a_readable_lab_file() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('f', 6, 2);
    let _guard = LabGuard(cfg.name.clone());
    let hosts = lab::up(&cfg).expect("lab up");
    let pids: Vec<i32> = hosts.iter().map(|h| h.agent_pid.unwrap()).collect();
    // A damaged lab file: down falls back to the names (namespaces, default directories, agents
    // found by their --socket) and reports the file.
    std::fs::write(lab::lab_file_path(&cfg.name), b"{ not json").unwrap();
    let report = lab::down(&cfg.name).expect("down");
    assert!(
        matches!(report.problems.as_slice(), [LabError::ReadLabFile { .. }]),
        "{:?}",
        report.problems
    );
    let mut stopped = report.agents_stopped.clone();
    stopped.sort();
    let mut want = pids.clone();
    want.sort();
    assert_eq!(stopped, want);
    assert_gone(&cfg, &pids);
    assert!(lab::down(&cfg.name).unwrap().is_clean());
}

#[test]
fn move_between_lab_hosts() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('g', 7, 2);
    let _guard = LabGuard(cfg.name.clone());
    let hosts = lab::up(&cfg).expect("lab up");
    let (a, b) = (&hosts[0], &hosts[1]);

    let image = tempfile::tempdir().unwrap();
    let rootfs = mig_tests::busybox_rootfs(image.path()).unwrap();
    mig(
        &a.socket,
        &[
            "image",
            "import",
            rootfs.to_str().unwrap(),
            "--name",
            "busybox",
        ],
    );
    let id = mig(
        &a.socket,
        &[
            "run",
            "-d",
            "--name",
            "mover",
            "busybox",
            "--",
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The peers written by `up` are what the move uses: no `mig peers add`.
    let moved: serde_json::Value =
        serde_json::from_str(&mig(&a.socket, &["move", "mover", "host-b", "--json"])).unwrap();
    println!("move in the lab: {moved}");
    for key in ["downtime_ms", "total_ms", "bytes_sent"] {
        assert!(moved[key].is_u64(), "{key} missing in {moved}");
    }
    let on_b = mig(&b.socket, &["inspect", "mover", "--json"]);
    let on_b: serde_json::Value = serde_json::from_str(&on_b).unwrap();
    assert_eq!(on_b["state"], "running", "{on_b}");
    assert_eq!(on_b["host"], "host-b", "{on_b}");
    let ps_a = mig(&a.socket, &["ps", "-a", "--json"]);
    assert!(!ps_a.contains(&id) || !ps_a.contains("running"), "{ps_a}");

    let report = lab::down(&cfg.name).expect("down");
    assert!(report.is_clean(), "{:?}", report.problems);
    let pids: Vec<i32> = hosts.iter().filter_map(|h| h.agent_pid).collect();
    assert_gone(&cfg, &pids);
    for h in &hosts {
        let cg = format!("mig-{}-{}", cfg.name, h.name);
        assert!(cgroups_named(&cg).is_empty(), "{cg} left");
    }
}

/// `mig lab down` during a restart of a host (which may wait minutes for its agent's moves) waits
/// for it, and says so instead of hanging without a word (review of session 28, L6).
#[test]
fn down_during_a_restart_waits_and_says_why() {
    if !mig_tests::is_root("lab tests") {
        return;
    }
    let cfg = config('h', 8, 1);
    let _guard = LabGuard(cfg.name.clone());
    let hosts = lab::up(&cfg).expect("lab up");
    let agent = hosts[0].agent_pid.expect("agent pid");
    // The restart lock, held here as a restart under way holds it.
    let restart = mig_runtime::fsutil::lock_exclusive(&cfg.root_dir.join("host-a.restart.lock"))
        .expect("restart lock");
    let mut down = Command::new(mig_tests::bin("mig"))
        .args(["lab", "down"])
        .env("MIG_LAB", &cfg.name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mig lab down");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let waited = down.try_wait().expect("wait").is_none();
    drop(restart);
    let out = down.wait_with_output().expect("mig lab down");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(waited, "down did not wait for the restart: {stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for the restart of host-a under way"),
        "{stderr}"
    );
    assert_gone(&cfg, &[agent]);
}
