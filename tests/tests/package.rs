//! The Debian package (scripts/package.sh): it builds from the test's binaries, holds the
//! binaries, unit, default configuration, man pages and completions, declares its dependencies,
//! and once unpacked into a temporary root its `mig --version` and `migd --check-config` run.
//! Skipped when dpkg-deb is missing.

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

#[test]
fn debian_package_builds_and_installs_into_a_root() -> Result<()> {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is missing");
        return Ok(());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    let out = tempfile::tempdir()?;
    let deb = run(Command::new("bash")
        .arg(workspace.join("scripts/package.sh"))
        .arg("--bin-dir")
        .arg(mig_tests::bin_dir())
        .arg("--out")
        .arg(out.path()))?;
    let deb = deb.trim();
    ensure!(deb.ends_with(".deb") && Path::new(deb).is_file(), "{deb}");

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
