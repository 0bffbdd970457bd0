//! Shared helpers of the end-to-end tests: locating (and building) the binaries, busybox images,
//! and [`Agent`], a `migd` started per test in a temporary state directory that cleans up every
//! container, mount, cgroup and process it made when dropped, even after a failed assertion.

pub mod lab;
use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Builds the Debian package from the test's binaries into `out` with `scripts/package.sh`
/// (`compress`: its `--compress` choice, the script's default when `None`); returns its path.
pub fn build_deb(out: &Path, compress: Option<&str>) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    let mut cmd = Command::new("bash");
    cmd.arg(workspace.join("scripts/package.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out);
    if let Some(c) = compress {
        cmd.args(["--compress", c]);
    }
    let o = cmd.output().context("running scripts/package.sh")?;
    if !o.status.success() {
        bail!(
            "scripts/package.sh failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let deb = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    if !(deb.extension().is_some_and(|e| e == "deb") && deb.is_file()) {
        bail!("scripts/package.sh printed {}", deb.display());
    }
    Ok(deb)
}

/// The directory holding `mig`, `migd` and `mig-shim` (built once per test binary).
///
/// `MIG_BIN_DIR` overrides it; otherwise it is the target profile directory of the running test
/// (`target/<profile>/deps/<test>` -> `target/<profile>`), where `cargo build -p mig-agent --bins`
/// is run first so the binaries are current.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("MIG_BIN_DIR") {
            return PathBuf::from(d);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_owned();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args(["build", "-q", "-p", "mig-agent", "--bins"]);
        without_test_env(&mut cmd);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the mig binaries");
        assert!(status.success(), "cargo build -p mig-agent --bins failed");
        profile_dir
    })
}

/// Removes from `cmd` the variables cargo sets for a test process (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`...). A nested `cargo build` that inherits them sees another environment than
/// the `cargo test` that built this test: ring's build script tracks `CARGO_MANIFEST_DIR`, so
/// ring and everything above it were rebuilt by each, in turn, on every test run.
fn without_test_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_tests = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if set_for_tests {
            cmd.env_remove(key);
        }
    }
}

/// A binary of the workspace (`mig`, `migd`, `mig-shim`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Makes a busybox root filesystem under `dir/rootfs` with every applet linked in /bin.
/// A static (crt-static) release build of the workspace package `package`'s binary `bin`, built
/// once per test process into `<target>/probe` so the main build cache keeps its flags; the
/// environment variable `override_var` names a prebuilt one instead. Used for the programs tests
/// copy into busybox containers (the isolation probe, the bench's memory workload).
pub fn static_binary(package: &str, bin: &str, override_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(override_var) {
        return Ok(PathBuf::from(p));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("probe");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-q", "-p", package, "--release", "--target-dir"])
        .arg(&target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    without_test_env(&mut cmd);
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build for {package}"))?;
    if !status.success() {
        bail!("cargo build -p {package} failed");
    }
    Ok(target.join("release").join(bin))
}

pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox")?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    Ok(root)
}

/// Packs `rootfs` into `dir/<name>` with tar (plain, or gzip when the name ends in .gz).
pub fn tar_of(rootfs: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let out = dir.join(name);
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(rootfs);
    if name.ends_with(".gz") {
        cmd.arg("-czf");
    } else {
        cmd.arg("-cf");
    }
    let status = cmd.arg(&out).arg(".").status()?;
    if !status.success() {
        bail!("tar failed: {status}");
    }
    Ok(out)
}

/// The result of one `mig` invocation.
#[derive(Debug)]
pub struct MigOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for MigOutput {
    fn from(o: Output) -> MigOutput {
        MigOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A `migd` for one test: its own state directory, socket, name and cgroup parent.
pub struct Agent {
    pub name: String,
    pub cgroup_parent: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent named after the test (unique with the process id).
    pub fn start(test: &str) -> Result<Agent> {
        Agent::start_with_env(test, &[])
    }

    /// Like [`Agent::start`], with extra environment variables for migd (e.g. `MIG_CRIU`).
    pub fn start_with_env(test: &str, env: &[(&str, &str)]) -> Result<Agent> {
        let mut agent = Agent::new(test, env)?;
        agent.spawn()?;
        Ok(agent)
    }

    /// Like [`Agent::start`], with the state directory on a tmpfs of `mib` MiB (unmounted with
    /// the rest at the end): a file system the test can fill.
    pub fn start_on_tmpfs(test: &str, mib: u64) -> Result<Agent> {
        let mut agent = Agent::new(test, &[])?;
        std::fs::create_dir_all(&agent.state_dir)?;
        nix::mount::mount(
            Some("tmpfs"),
            &agent.state_dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={mib}m,mode=0700").as_str()),
        )
        .context("mounting the state directory's tmpfs")?;
        agent.spawn()?;
        Ok(agent)
    }

    fn new(test: &str, env: &[(&str, &str)]) -> Result<Agent> {
        let tag: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(30)
            .collect();
        let name = format!("t-{tag}-{}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("mig-{tag}-"))
            .tempdir()?;
        let socket = dir.path().join("migd.sock");
        let state_dir = dir.path().join("state");
        Ok(Agent {
            cgroup_parent: format!("mig-{name}"),
            name,
            dir,
            socket,
            state_dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// Starts (or restarts) the migd process and waits for its socket.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("migd.log"))?;
        let child = Command::new(bin("migd"))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--name")
            .arg(&self.name)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting migd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("migd exited with {st}: {}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("migd did not open its socket: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("migd.log")).unwrap_or_default()
    }

    /// The agent's PID.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Kills migd with SIGKILL (containers keep running) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `mig` against this agent.
    pub fn mig(&self, args: &[&str]) -> MigOutput {
        Command::new(bin("mig"))
            .args(args)
            .env("MIG_SOCKET", &self.socket)
            .env_remove("MIG_HOST")
            .stdin(Stdio::null())
            .output()
            .expect("running mig")
            .into()
    }

    /// Runs `mig` and returns its stdout; fails on a non-zero exit.
    pub fn mig_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.mig(args);
        if o.code != 0 {
            bail!("mig {args:?} exited {}: {}{}", o.code, o.stderr, o.stdout);
        }
        Ok(o.stdout)
    }

    /// `mig ... --json` parsed.
    pub fn mig_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.mig_ok(args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("mig {args:?} printed invalid JSON: {out}"))
    }

    /// Imports a fresh busybox rootfs directory as `busybox`.
    pub fn import_busybox(&self) -> Result<()> {
        let rootfs = busybox_rootfs(self.dir.path())?;
        self.mig_ok(&[
            "image",
            "import",
            rootfs.to_str().unwrap_or_default(),
            "--name",
            "busybox",
        ])?;
        Ok(())
    }

    /// The directory of every hierarchy's copy of `cgroup` (relative name) that exists.
    pub fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(cgroup))
            .filter(|p| p.exists())
            .collect()
    }

    /// Best-effort removal of everything this agent made.
    fn cleanup(&mut self) {
        if self.child.is_some() {
            if let Ok(list) = self.mig_json(&["ps", "-a", "--json"]) {
                for c in list.as_array().into_iter().flatten() {
                    if let Some(id) = c["id"].as_str() {
                        let _ = self.mig(&["rm", "-f", id]);
                    }
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims and containers left behind (the agent could not remove them): by recorded PID.
        let containers = self.state_dir.join("containers");
        for ent in std::fs::read_dir(&containers)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(text) = std::fs::read_to_string(ent.path().join("shim.json")) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    for key in ["init_pid", "shim_pid"] {
                        if let Some(pid) = v[key].as_i64().filter(|p| *p > 1) {
                            let cmd =
                                std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                            let ours = key == "init_pid"
                                || String::from_utf8_lossy(&cmd).contains("mig-shim");
                            if ours {
                                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                            }
                        }
                    }
                }
            }
        }
        for dir in Agent::cgroup_dirs(&self.cgroup_parent) {
            kill_and_remove_cgroup(&dir);
        }
        for mp in mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let mp = pre.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mp))
        })
        .collect()
}

/// Kills every process in a cgroup directory tree and removes it, children first.
fn kill_and_remove_cgroup(dir: &Path) {
    for ent in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if ent.path().is_dir() {
            kill_and_remove_cgroup(&ent.path());
        }
    }
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Whether a process exists (zombies included).
pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `cmd` starts with SIGINT at its default: a test run as a background job of a script
/// inherits SIGINT ignored, and mig rightly keeps an ignored SIGINT ignored, so the Ctrl-C
/// a test sends would not arrive.
pub fn default_sigint(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure calls only signal(2), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        })
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when running as root; otherwise says which tests are skipped and why (`what` needs root).
pub fn is_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: {what} need root");
    false
}

/// Whether this kernel tracks dirty memory (`criu check --feature mem_dirty_track`), which
/// pre-copy needs.
pub fn dirty_tracking() -> bool {
    std::process::Command::new(mig_migrate::criu::DEFAULT_CRIU)
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Removes lab `name` (for a test's Drop guard): reports what could not be removed, never panics.
pub fn lab_down_quietly(name: &str) {
    match mig_agent::lab::down(name) {
        Ok(r) if !r.is_clean() => eprintln!("lab {name} cleanup problems: {r}"),
        Ok(_) => {}
        Err(e) => eprintln!("lab {name} cleanup failed: {e}"),
    }
}
