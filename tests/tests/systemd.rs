//! The systemd unit (agent/dist/migd.service) under a real systemd: a throw-away system container
//! boots `/lib/systemd/systemd` as its PID 1 with `systemd-nspawn --boot` on a copy-on-write view
//! of this machine's root (an overlay of `/` with a tmpfs upper layer, so nothing on the host
//! changes), in its own network namespace. Inside it the Debian package built by
//! scripts/package.sh is installed with apt-get, `systemctl start migd` must report ready
//! (Type=notify), a busybox container started with `mig run -d` must survive `systemctl restart
//! migd`, a SIGKILL of migd (Restart=on-failure) and `systemctl stop migd` (KillMode=process) with
//! the same PID and a counter that keeps counting, and be re-adopted each time (`mig ps`, `mig
//! exec`); `mig rm -f` removes it. A `--userns` container runs under the unit-run migd too (its
//! root maps to an unprivileged host id, writes into the image's `/etc`, `mig exec` works in it)
//! and `mig rm -f` removes it. It runs twice: with the host's cgroup layout (hybrid on the
//! test machine: cgroup v1 controllers plus cgroup2) and with a pure cgroup2 container
//! (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`), the layout of most hosts today.
//!
//! Needs root and systemd-nspawn (package systemd-container, installed by scripts/setup.sh);
//! skipped, saying why, when those are missing or when the container does not boot. Everything
//! is removed afterwards, after a failure too: the container (halted, or killed through its
//! cgroup), the overlay and tmpfs mounts, the cgroups it ran in, the temporary directory.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mig_runtime::cgroup::mount::V1_CONTROLLERS;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the package from the test's binaries into `out`, uncompressed (xz on debug binaries
/// takes minutes); returns its path.
fn build_deb(out: &Path) -> Result<PathBuf> {
    mig_tests::build_deb(out, Some("none"))
}

/// The cgroup directories this process is in, one per mounted hierarchy (cgroup2, named and
/// controller v1 hierarchies), except cpuset (a new cpuset cgroup has no CPUs until set).
fn own_cgroup_dirs() -> Result<Vec<PathBuf>> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut dirs = Vec::new();
    for line in info.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mut a = after.split(' ');
        let (fstype, opts) = (a.next().unwrap_or(""), a.nth(1).unwrap_or(""));
        let Some(mount_point) = before.split(' ').nth(4) else {
            continue;
        };
        let label: Vec<&str> = match fstype {
            "cgroup2" => Vec::new(),
            "cgroup" => opts
                .split(',')
                .filter(|o| o.starts_with("name=") || V1_CONTROLLERS.contains(o))
                .collect(),
            _ => continue,
        };
        if fstype == "cgroup" && (label.is_empty() || label.contains(&"cpuset")) {
            continue;
        }
        let path = own.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            let mut have: Vec<&str> = ctrls.split(',').filter(|c| !c.is_empty()).collect();
            let mut want = label.clone();
            have.sort_unstable();
            want.sort_unstable();
            (have == want).then_some(path)
        });
        if let Some(path) = path {
            let dir = Path::new(mount_point).join(path.trim_start_matches('/'));
            if dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    ensure!(!dirs.is_empty(), "no cgroup hierarchy found");
    Ok(dirs)
}

/// A booted systemd container; torn down on drop.
struct Machine {
    name: String,
    tmp: PathBuf,
    nspawn: Option<Child>,
    leader: i32,
    /// The cgroups nspawn was started in (one per hierarchy), cgroup2's first if any.
    cgroups: Vec<PathBuf>,
    /// Host mounts made for the container, in the order made.
    mounts: Vec<PathBuf>,
}

/// Why a container could not be used: the machine cannot boot one (a skip), or a test failure.
enum BootError {
    CannotBoot(String),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for BootError {
    fn from(e: anyhow::Error) -> Self {
        BootError::Failed(e)
    }
}

impl From<std::io::Error> for BootError {
    fn from(e: std::io::Error) -> Self {
        BootError::Failed(e.into())
    }
}

impl Machine {
    /// Boots `/lib/systemd/systemd` (to basic.target) in a container over an overlay of `/`, with
    /// `state` bound on /var/lib/mig (the state directory must not be on overlayfs: the
    /// containers' root filesystems are overlays themselves). `cgroup2`: a pure cgroup2 container
    /// instead of the host's layout.
    fn boot(name: &str, tmp: &Path, state: &Path, cgroup2: bool) -> Result<Machine, BootError> {
        let mut m = Machine {
            name: name.to_owned(),
            tmp: tmp.to_owned(),
            nspawn: None,
            leader: 0,
            cgroups: Vec::new(),
            mounts: Vec::new(),
        };
        let upper = tmp.join("upper");
        let root = tmp.join("root");
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&root)?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"])
            .arg(&upper))?;
        m.mounts.push(upper.clone());
        std::fs::create_dir_all(upper.join("u"))?;
        std::fs::create_dir_all(upper.join("w"))?;
        let opts = format!(
            "lowerdir=/,upperdir={},workdir={}",
            upper.join("u").display(),
            upper.join("w").display()
        );
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&root))?;
        m.mounts.push(root.clone());
        // man-db's trigger would rebuild the whole manual index on install: not needed here.
        let _ = std::fs::remove_file(root.join("var/lib/man-db/auto-update"));

        // nspawn makes its `payload` and `supervisor` cgroups next to its own: give it cgroups of
        // its own, so that concurrent runs do not meet and everything is removed at the end.
        for dir in own_cgroup_dirs()? {
            let mine = dir.join(format!("mig-systemd-{name}"));
            std::fs::create_dir(&mine)
                .with_context(|| format!("creating the cgroup {}", mine.display()))?;
            if mine.join("cgroup.kill").exists() {
                m.cgroups.insert(0, mine);
            } else {
                m.cgroups.push(mine);
            }
        }
        let uuid =
            std::fs::read_to_string("/proc/sys/kernel/random/uuid")?.replace(['-', '\n'], "");
        let log = std::fs::File::create(tmp.join("nspawn.log"))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 1; shift; n=$((n-1)); done; exec "$@""#)
            .arg("sh")
            .arg(m.cgroups.len().to_string())
            .args(m.cgroups.iter().map(|c| c.join("cgroup.procs")))
            .arg("systemd-nspawn")
            .args(["--quiet", "--boot", "--register=no", "--keep-unit", "--link-journal=no"])
            .args(["--private-network", "--tmpfs=/tmp", "--console=pipe"])
            .arg(format!("--machine={name}"))
            .arg(format!("--uuid={uuid}"))
            .arg(format!("--directory={}", root.display()))
            .arg(format!("--bind={}:/var/lib/mig", state.display()))
            .args(["--", "systemd.unit=basic.target"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if cgroup2 {
            cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        } else {
            cmd.env_remove("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY");
        }
        m.nspawn = Some(cmd.spawn().context("starting systemd-nspawn")?);
        let nspawn_pid = m.nspawn.as_ref().map_or(0, Child::id);

        // Its PID 1 (a child of nspawn), then systemd's "running" (or "degraded").
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut state_now = String::new();
        loop {
            if let Some(st) = m.nspawn.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(BootError::CannotBoot(format!(
                    "systemd-nspawn exited ({st}): {}",
                    m.log_tail()
                )));
            }
            if m.leader == 0 {
                let children = format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children");
                let pid = std::fs::read_to_string(children).unwrap_or_default();
                if let Some(pid) = pid.split_whitespace().find_map(|p| p.parse::<i32>().ok()) {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                    if comm.is_ok_and(|c| c.trim() == "systemd") {
                        m.leader = pid;
                    }
                }
            } else {
                let o = m.cmd(&["systemctl", "is-system-running"]).output()?;
                state_now = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                if state_now == "running" || state_now == "degraded" {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(BootError::CannotBoot(format!(
                    "systemd in the container did not finish booting in 90 s (state {state_now:?}): {}",
                    m.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if state_now == "degraded" {
            let failed = m
                .sh("systemctl --failed --no-legend --no-pager")
                .unwrap_or_default();
            eprintln!("{name}: the container booted degraded (failed units: {failed})");
        }
        Ok(m)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.tmp.join("nspawn.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// A command run inside the container (all its namespaces, its root).
    fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("env")
            .arg("-i")
            .arg(format!("PATH={PATH}"))
            .arg("LANG=C.UTF-8")
            .args(argv);
        c
    }

    fn run(&self, argv: &[&str]) -> Result<String> {
        run(&mut self.cmd(argv))
    }

    fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// A path inside the container, as the host reaches it.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }

    /// `systemctl show -p PROP --value migd`.
    fn unit_prop(&self, prop: &str) -> Result<String> {
        Ok(self
            .run(&["systemctl", "show", "-p", prop, "--value", "migd"])?
            .trim()
            .to_owned())
    }

    /// Halts the container (SIGTERM to nspawn: an orderly poweroff), kills what is left through
    /// its cgroup, then removes the mounts and cgroups. Reports what could not be removed.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut child) = self.nspawn.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let halted = mig_tests::wait_until(Duration::from_secs(30), || {
                child.try_wait().ok().flatten().is_some()
            });
            if !halted {
                problems.push("the container did not halt in 30 s: killed".to_owned());
                self.kill_all();
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        // Anything still in the cgroups (nothing, after a clean halt) is killed.
        self.kill_all();
        for m in self.mounts.drain(..).rev() {
            let ok = Command::new("umount")
                .arg(&m)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                problems.push(format!("{} busy: lazily unmounted", m.display()));
                let _ = Command::new("umount").arg("-l").arg(&m).output();
            }
        }
        for cg in std::mem::take(&mut self.cgroups) {
            let gone = mig_tests::wait_until(Duration::from_secs(10), || remove_tree(&cg));
            if !gone {
                problems.push(format!("cgroup {} not removed", cg.display()));
            }
        }
        let propagate = Path::new("/run/systemd/nspawn/propagate").join(&self.name);
        let _ = std::fs::remove_dir(propagate);
        problems
    }

    /// Kills every process in the container's cgroup2 subtree (cgroup.kill) and waits for it to
    /// empty.
    fn kill_all(&self) {
        let Some(cg) = self.cgroups.first() else {
            return;
        };
        if !cg.join("cgroup.kill").exists() {
            return;
        }
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        mig_tests::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(cg.join("cgroup.events"))
                .is_ok_and(|e| e.contains("populated 0"))
        });
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("{}: cleanup: {p}", self.name);
        }
    }
}

/// Removes a cgroup directory and its children, deepest first; true when it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    !dir.exists()
}

const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done";

/// `mig inspect counter --json` inside the container.
fn inspect(m: &Machine) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &m.run(&["mig", "inspect", "counter", "--json"])?,
    )?)
}

/// The last number the counter printed (`mig logs`).
fn last_count(m: &Machine) -> Option<u64> {
    let logs = m.run(&["mig", "logs", "counter"]).ok()?;
    logs.lines().rev().find_map(|l| l.trim().parse().ok())
}

/// The cgroup2 path (the `0::` line of /proc/PID/cgroup) of a process in the container.
fn cgroup2_of(m: &Machine, pid: i64) -> Result<String> {
    let text = m.run(&["cat", &format!("/proc/{pid}/cgroup")])?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .with_context(|| format!("no cgroup2 line for {pid}: {text}"))
}

/// The (init, shim) PIDs of the counter container, which must be running.
fn running_pids(m: &Machine) -> Result<(i64, i64)> {
    let c = inspect(m)?;
    ensure!(c["state"] == "running", "not running: {c}");
    let init = c["init_pid"].as_i64().context("init_pid")?;
    let shim = c["shim_pid"].as_i64().context("shim_pid")?;
    Ok((init, shim))
}

/// After migd came back (`what`): the counter is the same process (`pids`), re-adopted (`mig ps`
/// lists it running, `mig exec` works) and still counting past `before`.
fn readopted(m: &Machine, what: &str, pids: (i64, i64), before: u64) -> Result<()> {
    let now = running_pids(m).with_context(|| format!("after {what}"))?;
    ensure!(
        now == pids,
        "after {what}: (init, shim) {now:?}, was {pids:?}"
    );
    let ps: serde_json::Value = serde_json::from_str(&m.run(&["mig", "ps", "--json"])?)?;
    let listed = ps.as_array().is_some_and(|a| {
        a.iter()
            .any(|c| c["name"] == "counter" && c["state"] == "running")
    });
    ensure!(
        listed,
        "after {what}: mig ps does not list counter running: {ps}"
    );
    let out = m.run(&["mig", "exec", "counter", "--", "echo", "adopted"])?;
    ensure!(
        out.trim() == "adopted",
        "after {what}: mig exec printed {out:?}"
    );
    let counting = mig_tests::wait_until(Duration::from_secs(10), || {
        last_count(m).is_some_and(|n| n > before + 2)
    });
    ensure!(
        counting,
        "after {what}: the counter stopped at {:?} (was {before})",
        last_count(m)
    );
    Ok(())
}

/// Writes into the image's `/etc` (owned by root in the image's layer) as the container's root,
/// then counts.
const USERNS_SCRIPT: &str = r#"if echo made > /etc/mig-test; then echo "writes OK"; else echo "writes BAD"; fi
i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done"#;

/// A `--userns` container under the unit-run migd (its idmapped image layers, its mapped root
/// walking the private state directory): it runs with its root mapped to an unprivileged host
/// id, writes into the image's `/etc`, answers `mig exec` as root, and `mig rm -f` removes its
/// processes and cgroups. Whatever fails, the machine's teardown kills it with the rest.
fn userns_container_runs(m: &Machine) -> Result<()> {
    m.run(&[
        "mig",
        "run",
        "-d",
        "--userns",
        "--name",
        "uns",
        "busybox",
        "--",
        "sh",
        "-c",
        USERNS_SCRIPT,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&m.run(&["mig", "inspect", "uns", "--json"])?)?;
    ensure!(
        v["state"] == "running",
        "the userns container is not running: {v}"
    );
    let id = v["id"].as_str().context("id")?.to_owned();
    let init = v["init_pid"].as_i64().context("init_pid")?.to_string();
    // `0 HOST SIZE`: root inside is HOST outside, not host root.
    let map = m.run(&["cat", &format!("/proc/{init}/uid_map")])?;
    let map: Vec<&str> = map.split_whitespace().collect();
    ensure!(
        map.len() == 3 && map[0] == "0" && map[1] != "0",
        "uid_map of the userns container's init: {map:?}"
    );
    let logs = || m.run(&["mig", "logs", "uns"]).unwrap_or_default();
    let counting = mig_tests::wait_until(Duration::from_secs(10), || {
        let log = logs();
        log.contains("BAD") || log.lines().filter(|l| l.parse::<u64>().is_ok()).count() > 2
    });
    let log = logs();
    ensure!(
        counting && log.contains("writes OK") && !log.contains("BAD"),
        "the userns container's log: {log}"
    );
    let out = m.run(&[
        "mig",
        "exec",
        "uns",
        "--",
        "sh",
        "-c",
        "id -u; cat /etc/mig-test",
    ])?;
    ensure!(
        out == "0\nmade\n",
        "mig exec in the userns container printed {out:?}"
    );
    m.run(&["mig", "rm", "-f", "uns"])?;
    ensure!(
        m.run(&["kill", "-0", &init]).is_err(),
        "the userns container's init {init} still runs after mig rm -f"
    );
    let cgs = m.run(&["find", "/sys/fs/cgroup", "-name", &id])?;
    ensure!(
        cgs.trim().is_empty(),
        "cgroups left by mig rm -f uns: {cgs}"
    );
    Ok(())
}

fn active(m: &Machine) -> String {
    m.cmd(&["systemctl", "is-active", "migd"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Boots a container (`cgroup2`: pure cgroup2, else the host's layout), installs the package and
/// runs the unit through start, restart, SIGKILL, stop and start with a counting container.
fn unit_keeps_containers(tag: &str, deb: &Path, tar: &Path, cgroup2: bool) -> Result<()> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    std::fs::create_dir(&state)?;
    let name = format!("sd{tag}{}", std::process::id());
    let mut m = match Machine::boot(&name, tmp.path(), &state, cgroup2) {
        Ok(m) => m,
        Err(BootError::CannotBoot(why)) => {
            eprintln!(
                "skipped ({name}): systemd cannot boot in a container on this machine: {why}"
            );
            return Ok(());
        }
        Err(BootError::Failed(e)) => return Err(e.context("booting the container")),
    };
    let booted = t0.elapsed();
    let layout = m.run(&["findmnt", "-rn", "-o", "FSTYPE", "/sys/fs/cgroup"])?;
    ensure!(
        !cgroup2 || layout.trim() == "cgroup2",
        "not a cgroup2 container: /sys/fs/cgroup is {layout}"
    );
    if layout.trim() != "cgroup2" {
        // nspawn mounts the v1 controller hierarchies read-only (it delegates cgroup2 only); a
        // host booted by systemd has them writable, and migd needs memory, pids and cpu there.
        m.sh(r#"for d in $(findmnt -rn -t cgroup -o TARGET); do mount -o remount,bind,rw "$d"; done"#)?;
    }

    std::fs::copy(deb, m.path("/tmp/mig.deb"))?;
    std::fs::copy(tar, m.path("/tmp/busybox.tar"))?;
    let t = Instant::now();
    let apt = m.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /tmp/mig.deb 2>&1")?;
    let have_criu = Path::new("/usr/local/sbin/criu").exists() || have("criu");
    ensure!(
        !have_criu || !apt.contains("CRIU (>= 4) is not installed"),
        "the postinst does not see CRIU: {apt}"
    );
    let installed = t.elapsed();
    std::fs::write(
        m.path("/etc/mig/config.toml"),
        format!("name = \"{name}\"\n"),
    )?;

    // The installed unit is clean for systemd (its man pages exist now) and can be enabled.
    let verify = m
        .cmd(&[
            "systemd-analyze",
            "verify",
            "/lib/systemd/system/migd.service",
        ])
        .output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && !complaints.contains("migd"),
        "systemd-analyze verify: {complaints}"
    );
    m.run(&["systemctl", "enable", "migd"])?;
    let enabled = m.run(&["systemctl", "is-enabled", "migd"])?;
    ensure!(enabled.trim() == "enabled", "is-enabled: {enabled}");

    // Type=notify: `systemctl start` returns once migd sent READY=1.
    let t = Instant::now();
    m.run(&["systemctl", "start", "migd"])?;
    let started = t.elapsed();
    ensure!(active(&m) == "active", "migd is {}", active(&m));
    for (prop, want) in [
        ("Type", "notify"),
        ("StatusText", "serving"),
        ("NRestarts", "0"),
        ("KillMode", "process"),
        ("Delegate", "yes"),
        ("ControlGroup", "/system.slice/migd.service"),
    ] {
        let got = m.unit_prop(prop)?;
        ensure!(got == want, "migd.service {prop}={got}, want {want}");
    }
    for dir in ["/var/lib/mig", "/run/mig", "/etc/mig"] {
        m.run(&["test", "-d", dir])
            .with_context(|| format!("{dir} missing"))?;
    }
    m.run(&["test", "-S", "/run/mig/migd.sock"])?;
    let main1 = m.unit_prop("MainPID")?;

    m.run(&[
        "mig",
        "image",
        "import",
        "/tmp/busybox.tar",
        "--name",
        "busybox",
    ])?;
    m.run(&[
        "mig", "run", "-d", "--name", "counter", "busybox", "--", "sh", "-c", COUNTER,
    ])?;
    let pids = running_pids(&m)?;
    let id = inspect(&m)?["id"].as_str().context("id")?.to_owned();
    // The shim stays in the unit's cgroup (KillMode=process is what spares it); the container
    // runs in its own cgroup, `mig-<name>/<id>` at the root of the (delegated) hierarchy.
    let shim_cg = cgroup2_of(&m, pids.1)?;
    ensure!(shim_cg == "/system.slice/migd.service", "shim in {shim_cg}");
    let init_cg = cgroup2_of(&m, pids.0)?;
    ensure!(
        init_cg == format!("/mig-{name}/{id}"),
        "container in {init_cg}"
    );
    let before = mig_tests::wait_until(Duration::from_secs(10), || {
        last_count(&m).is_some_and(|n| n >= 3)
    });
    ensure!(before, "the counter does not count");

    // systemctl restart: a new migd, the same container.
    let before = last_count(&m).unwrap_or(0);
    let t = Instant::now();
    m.run(&["systemctl", "restart", "migd"])?;
    let restarted = t.elapsed();
    ensure!(
        active(&m) == "active",
        "after restart migd is {}",
        active(&m)
    );
    let main2 = m.unit_prop("MainPID")?;
    ensure!(main2 != main1, "restart kept MainPID {main1}");
    readopted(&m, "systemctl restart migd", pids, before)?;
    let journal = m.run(&["journalctl", "-u", "migd", "-o", "cat", "--no-pager"])?;
    ensure!(
        journal.contains("re-adopted a running container"),
        "no re-adoption in the journal: {journal}"
    );

    // migd killed: Restart=on-failure brings it back, the container keeps running.
    let before = last_count(&m).unwrap_or(0);
    m.run(&["kill", "-KILL", &main2])?;
    let back = mig_tests::wait_until(Duration::from_secs(20), || {
        m.unit_prop("NRestarts").is_ok_and(|n| n == "1")
            && active(&m) == "active"
            && m.unit_prop("MainPID").is_ok_and(|p| p != main2 && p != "0")
    });
    ensure!(
        back,
        "migd not restarted after SIGKILL: {} NRestarts={:?}",
        active(&m),
        m.unit_prop("NRestarts")
    );
    readopted(&m, "SIGKILL of migd", pids, before)?;

    // systemctl stop: migd ends, the container does not.
    m.run(&["systemctl", "stop", "migd"])?;
    ensure!(
        active(&m) == "inactive",
        "after stop migd is {}",
        active(&m)
    );
    let before = last_count_of_stopped(&m, &id)?;
    std::thread::sleep(Duration::from_millis(600));
    let after = last_count_of_stopped(&m, &id)?;
    ensure!(
        after > before,
        "the counter stopped with migd: {before} then {after}"
    );
    for pid in [pids.0, pids.1] {
        m.run(&["kill", "-0", &pid.to_string()])
            .with_context(|| format!("{pid} died with systemctl stop migd"))?;
    }
    m.run(&["systemctl", "start", "migd"])?;
    readopted(&m, "systemctl stop + start migd", pids, before)?;
    userns_container_runs(&m).context("a --userns container under the unit")?;

    m.run(&["mig", "rm", "-f", "counter"])?;
    let left = m.run(&["mig", "ps", "-a", "--json"])?;
    ensure!(left.trim() == "[]", "left after rm -f: {left}");
    for pid in [pids.0, pids.1] {
        ensure!(
            m.run(&["kill", "-0", &pid.to_string()]).is_err(),
            "{pid} still running after mig rm -f"
        );
    }
    let cgs = m.run(&["find", "/sys/fs/cgroup", "-name", &id])?;
    ensure!(cgs.trim().is_empty(), "cgroups left by mig rm -f: {cgs}");
    m.run(&["systemctl", "stop", "migd"])?;

    let problems = m.teardown();
    ensure!(problems.is_empty(), "cleanup: {problems:?}");
    let mounts = mig_tests::mounts_under(tmp.path());
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    eprintln!(
        "{name} ({}): booted in {booted:.1?}, installed in {installed:.1?}, systemctl start {started:.1?}, \
         restart {restarted:.1?}, all in {:.1?}",
        if cgroup2 { "cgroup2" } else { "host cgroup layout" },
        t0.elapsed()
    );
    Ok(())
}

/// The counter's last value read from its log file while migd is stopped (the agent serves
/// `mig logs`): the file the shim writes, under /var/lib/mig.
fn last_count_of_stopped(m: &Machine, id: &str) -> Result<u64> {
    let text = m.run(&[
        "cat",
        &format!("/var/lib/mig/containers/{id}/container.log"),
    ])?;
    Ok(text
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or(0))
}

/// The unit under a real systemd, in a container with the host's cgroup layout and in a pure
/// cgroup2 one.
#[test]
fn migd_unit_under_systemd_keeps_containers_across_restarts() -> Result<()> {
    if !mig_tests::is_root("the systemd unit test (systemd-nspawn)") {
        return Ok(());
    }
    for tool in [
        "systemd-nspawn",
        "nsenter",
        "dpkg-deb",
        "apt-get",
        "findmnt",
    ] {
        if !have(tool) {
            eprintln!(
                "skipped: {tool} is missing (systemd-nspawn is in the package systemd-container, \
                 which scripts/setup.sh installs)"
            );
            return Ok(());
        }
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        eprintln!("skipped: /lib/systemd/systemd is missing (package systemd)");
        return Ok(());
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let deb = build_deb(tmp.path())?;
    let rootfs = mig_tests::busybox_rootfs(tmp.path())?;
    let tar = mig_tests::tar_of(&rootfs, tmp.path(), "busybox.tar")?;
    eprintln!("package built in {:.1?}", t0.elapsed());
    unit_keeps_containers("h", &deb, &tar, false)?;
    unit_keeps_containers("u", &deb, &tar, true)?;
    Ok(())
}
