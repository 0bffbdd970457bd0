//! The Debian package (scripts/package.sh): it builds from the test's binaries, holds the
//! binaries, unit, default configuration, man pages and completions, declares its dependencies,
//! and once unpacked into a temporary root its `mig --version` and `migd --check-config` run.
//! Installed for real (root, and only when no mig package is installed already), a two-host lab
//! moves a container with the installed binaries, and `dpkg --purge mig` leaves nothing behind.
//! Skipped when dpkg-deb is missing. The lab uses the subnet 10.214.99.0/24 (operations range).
//! The unit under a real systemd (in a booted nspawn container) is tests/tests/systemd.rs.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Builds the package from the test's binaries into `out`; returns its path.
fn build_deb(out: &Path) -> Result<String> {
    Ok(mig_tests::build_deb(out, None)?.display().to_string())
}

#[test]
fn debian_package_builds_and_installs_into_a_root() -> Result<()> {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is missing");
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let deb = build_deb(out.path())?;
    let deb = deb.as_str();

    let info = run(Command::new("dpkg-deb").args(["-I", deb]))?;
    for want in [
        "Package: mig",
        "Depends: libc6 (>= 2.34), iproute2",
        "Recommends: criu (>= 4)",
        "postinst",
    ] {
        ensure!(
            info.contains(want),
            "{want:?} missing from dpkg-deb -I: {info}"
        );
    }
    let conffiles = run(Command::new("dpkg-deb").args(["-f", deb, "Version"]))?;
    ensure!(conffiles.trim() == env!("CARGO_PKG_VERSION"), "{conffiles}");
    let list = run(Command::new("dpkg-deb").args(["-c", deb]))?;
    for want in [
        "./usr/bin/mig",
        "./usr/bin/migd",
        "./usr/bin/mig-shim",
        "./lib/systemd/system/migd.service",
        "./etc/mig/config.toml",
        "./usr/share/man/man1/mig.1.gz",
        "./usr/share/man/man8/migd.8.gz",
        "./usr/share/bash-completion/completions/mig",
        "./usr/share/zsh/vendor-completions/_mig",
        "./usr/share/fish/vendor_completions.d/mig.fish",
        "./usr/share/doc/mig/copyright",
    ] {
        ensure!(
            list.lines().any(|l| l.ends_with(want)),
            "{want} missing from the package: {list}"
        );
    }
    ensure!(
        list.lines()
            .filter(|l| l.contains("./usr/bin/mig"))
            .all(|l| l.starts_with("-rwxr-xr-x root/root")),
        "binaries not root-owned 0755: {list}"
    );

    // Unpacked into a temporary root: the installed binaries run from there.
    let root = tempfile::tempdir()?;
    run(Command::new("dpkg-deb").args(["-x", deb]).arg(root.path()))?;
    let control = root.path().join("DEBIAN");
    run(Command::new("dpkg-deb").args(["-e", deb]).arg(&control))?;
    let conffiles = std::fs::read_to_string(control.join("conffiles"))?;
    ensure!(conffiles.trim() == "/etc/mig/config.toml", "{conffiles}");
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    // The only systemctl it runs is daemon-reload: it enables and starts nothing.
    ensure!(
        postinst
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("systemctl"))
            .all(|l| l.starts_with("systemctl daemon-reload")),
        "postinst starts something: {postinst}"
    );
    let v = run(Command::new(root.path().join("usr/bin/mig")).arg("--version"))?;
    ensure!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    let cfg = root.path().join("etc/mig/config.toml");
    let eff = run(Command::new(root.path().join("usr/bin/migd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&cfg)
        .args(["--name", "pkgtest"]))?;
    ensure!(
        eff.contains("state_dir = \"/var/lib/mig\"") && eff.contains("name = \"pkgtest\""),
        "{eff}"
    );
    let unit = std::fs::read_to_string(root.path().join("lib/systemd/system/migd.service"))?;
    for want in [
        "Type=notify",
        "KillMode=process",
        "Delegate=yes",
        "StateDirectory=mig",
        "RuntimeDirectory=mig",
        "ConfigurationDirectory=mig",
        "ExecStart=/usr/bin/migd",
    ] {
        ensure!(unit.contains(want), "{want} missing from the unit");
    }
    if have("systemd-analyze") {
        // Checks the unit's syntax (warnings about the absent binary path are expected).
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(root.path().join("lib/systemd/system/migd.service"))
            .output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(
            !err.contains("Unknown key") && !err.contains("Unknown section"),
            "{err}"
        );
    }
    let man = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {}",
        root.path().join("usr/share/man/man8/migd.8.gz").display()
    )))?;
    ensure!(man.contains(".TH migd 8"), "{}", &man[..man.len().min(200)]);
    Ok(())
}

/// Whether the package `mig` is installed (dpkg status "install ok installed").
fn mig_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "mig"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed")
        })
}

/// Purges the package on drop (after a failure too); [`Purge::now`] purges and reports.
struct Purge {
    done: bool,
}

impl Purge {
    fn now(&mut self) -> Result<()> {
        self.done = true;
        run(Command::new("dpkg").args(["--purge", "mig"]))?;
        Ok(())
    }
}

impl Drop for Purge {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.now() {
                eprintln!("purging the mig package: {e:#}");
            }
        }
    }
}

/// The installed `mig` talking to lab `lab`.
fn installed_mig(lab: &str, args: &[&str]) -> Command {
    let mut c = Command::new("/usr/bin/mig");
    c.args(args)
        .env("MIG_LAB", lab)
        .env_remove("MIG_HOST")
        .env_remove("MIG_SOCKET");
    c
}

/// Takes lab `name` down on drop: with the installed `mig` when it is still there, else (or when
/// that fails) with the test's library.
struct LabDown {
    name: String,
    done: bool,
}

impl Drop for LabDown {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let ok = Path::new("/usr/bin/mig").exists()
            && installed_mig(&self.name, &["lab", "down"])
                .output()
                .is_ok_and(|o| o.status.success());
        if !ok {
            mig_tests::lab_down_quietly(&self.name);
        }
    }
}

/// Starts the installed unit with a temporary configuration and stops it, when systemd runs.
fn unit_starts_and_stops(tmp: &Path) -> Result<()> {
    if !Path::new("/run/systemd/system").is_dir() {
        eprintln!("systemd is not running (PID 1 is not systemd): the unit is not started");
        return Ok(());
    }
    let state = tmp.join("unit-state");
    let socket = tmp.join("unit.sock");
    let config = tmp.join("unit.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"pkgunit\"\nstate_dir = \"{}\"\nsocket = \"{}\"\ncgroup_parent = \"mig-pkgunit{}\"\n",
            state.display(),
            socket.display(),
            std::process::id()
        ),
    )?;
    let dropin = Path::new("/run/systemd/system/migd.service.d");
    std::fs::create_dir_all(dropin)?;
    std::fs::write(
        dropin.join("pkgtest.conf"),
        format!("[Service]\nEnvironment=MIG_CONFIG={}\n", config.display()),
    )?;
    let result = (|| {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        run(Command::new("systemctl").args(["start", "migd"]))?;
        let active = run(Command::new("systemctl").args(["is-active", "migd"]))?;
        ensure!(active.trim() == "active", "{active}");
        run(Command::new("/usr/bin/mig")
            .arg("--socket")
            .arg(&socket)
            .arg("info"))?;
        Ok(())
    })();
    let _ = Command::new("systemctl").args(["stop", "migd"]).output();
    let _ = std::fs::remove_dir_all(dropin);
    let _ = Command::new("systemctl").arg("daemon-reload").output();
    result
}

/// The package installed on this machine: its dependencies are satisfied, `/usr/bin/mig` runs,
/// the unit starts (when systemd runs), a lab made by the installed `mig lab up` runs its agents
/// from `/usr/bin/migd` and moves a busybox container from host-a to host-b, and
/// `dpkg --purge mig` removes every file and directory the package made. Skipped when a mig
/// package is installed already (the user's install is not replaced).
#[test]
fn debian_package_installs_and_a_lab_moves_with_it() -> Result<()> {
    if !have("dpkg-deb") || !have("dpkg") {
        eprintln!("skipped: dpkg is missing");
        return Ok(());
    }
    if !mig_tests::is_root("debian_package_installs_and_a_lab_moves_with_it") {
        return Ok(());
    }
    if mig_installed() {
        eprintln!("skipped: a mig package is already installed (dpkg -s mig): not replacing it");
        return Ok(());
    }
    let package_paths = [
        "/usr/bin/mig",
        "/usr/bin/migd",
        "/usr/bin/mig-shim",
        "/etc/mig",
        "/var/lib/mig",
        "/lib/systemd/system/migd.service",
        "/usr/share/doc/mig",
        "/usr/share/man/man1/mig.1.gz",
        "/usr/share/bash-completion/completions/mig",
    ];
    let existed: Vec<bool> = package_paths
        .iter()
        .map(|p| Path::new(p).exists())
        .collect();
    let tmp = tempfile::tempdir()?;
    let deb = build_deb(tmp.path())?;
    let mut purge = Purge { done: false };
    if have("apt-get") {
        // The declared dependencies are satisfied by what is installed: apt would install mig
        // alone (checked with a simulation first, so that nothing is ever downloaded).
        let sim = run(Command::new("apt-get")
            .args(["install", "-s", "--no-install-recommends"])
            .arg(&deb))?;
        let inst: Vec<&str> = sim.lines().filter(|l| l.starts_with("Inst ")).collect();
        ensure!(
            inst.len() == 1 && inst[0].starts_with("Inst mig "),
            "installing the package needs more packages: {sim}"
        );
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .arg(&deb)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    } else {
        run(Command::new("dpkg").arg("-i").arg(&deb))?;
    }
    ensure!(mig_installed(), "dpkg does not list mig as installed");
    let v = run(Command::new("/usr/bin/mig").arg("--version"))?;
    ensure!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    let eff = run(Command::new("/usr/bin/migd").arg("--check-config"))?;
    ensure!(eff.contains("state_dir = \"/var/lib/mig\""), "{eff}");
    unit_starts_and_stops(tmp.path())?;

    let name = format!("pk{}", std::process::id() % 100_000);
    let mut lab = LabDown {
        name: name.clone(),
        done: false,
    };
    let mig = |args: &[&str]| run(&mut installed_mig(&name, args));
    let up: serde_json::Value = serde_json::from_str(&mig(&[
        "lab",
        "up",
        "--hosts",
        "2",
        "--subnet",
        "10.214.99",
        "--json",
    ])?)?;
    let hosts = up["hosts"].as_array().context("lab up --json: hosts")?;
    ensure!(hosts.len() == 2, "{up}");
    for h in hosts {
        let pid = h["agent_pid"].as_i64().context("agent_pid")?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        ensure!(
            exe == Path::new("/usr/bin/migd"),
            "lab agent runs {}",
            exe.display()
        );
    }
    let rootfs = mig_tests::busybox_rootfs(tmp.path())?;
    let tar = mig_tests::tar_of(&rootfs, tmp.path(), "busybox.tar")?;
    let tar = tar.to_string_lossy();
    mig(&[
        "--host", "host-a", "image", "import", &tar, "--name", "busybox",
    ])?;
    mig(&[
        "--host",
        "host-a",
        "run",
        "-d",
        "--name",
        "pkgmove",
        "busybox",
        "--",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done",
    ])?;
    let moved: serde_json::Value = serde_json::from_str(&mig(&[
        "--host", "host-a", "move", "pkgmove", "host-b", "--json",
    ])?)?;
    ensure!(moved["downtime_ms"].is_u64(), "{moved}");
    let d: serde_json::Value =
        serde_json::from_str(&mig(&["--host", "host-b", "inspect", "pkgmove", "--json"])?)?;
    ensure!(d["state"] == "running", "{d}");
    let left: serde_json::Value =
        serde_json::from_str(&mig(&["--host", "host-a", "ps", "-a", "--json"])?)?;
    ensure!(
        left.as_array().is_some_and(|a| a.is_empty()),
        "left on host-a: {left}"
    );
    let last = |s: &str| s.lines().rev().find_map(|l| l.trim().parse::<u64>().ok());
    let before = last(&mig(&["--host", "host-b", "logs", "pkgmove"])?).context("no count")?;
    let counting = mig_tests::wait_until(std::time::Duration::from_secs(10), || {
        mig(&["--host", "host-b", "logs", "pkgmove"])
            .ok()
            .and_then(|s| last(&s))
            .is_some_and(|n| n > before)
    });
    ensure!(counting, "the moved container does not count on host-b");
    mig(&["--host", "host-b", "rm", "-f", "pkgmove"])?;
    mig(&["lab", "down"])?;
    lab.done = true;
    for gone in [
        format!("/var/lib/mig-lab/{name}"),
        format!("/run/mig/lab/{name}"),
    ] {
        ensure!(!Path::new(&gone).exists(), "{gone} left by mig lab down");
    }

    purge.now()?;
    ensure!(!mig_installed(), "mig still installed after dpkg --purge");
    for (p, before) in package_paths.iter().zip(existed) {
        ensure!(
            before || !Path::new(p).exists(),
            "{p} left after dpkg --purge mig"
        );
    }
    Ok(())
}
