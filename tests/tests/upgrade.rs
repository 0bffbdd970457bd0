//! Upgrades tested with two real builds: mig 0.1.0 (commit 595f0be, tagged `v0.1.0` where the
//! tag exists; wire protocol 1.0, unversioned state files) built from this repository's history,
//! against this build (0.2.0: protocol 1.1, state format 2). docs/operations.md, "Upgrade".
//!
//! The old build is made once per target directory with `git worktree add` of the commit into
//! `<target>/compat/0.1.0/src` and `cargo build` into `<target>/compat/0.1.0/target` (a lock file
//! serializes concurrent test processes; a stamp file marks it complete), or taken from
//! `MIG_COMPAT_0_1_0_BIN_DIR`. A clone without that commit (shallow) skips these tests and says
//! what is missing.
//!
//! Lab subnets 85-88 (of the 80-89 range of this file and networking.rs).
//!
//! `cargo test -p mig-tests --test upgrade`

use anyhow::{anyhow, bail, ensure, Context, Result};
use mig_tests::is_root;
use mig_tests::lab::{
    continues, log_state, move_and_check, move_and_check_with, nothing_left, running_on, Lab,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// mig 0.1.0: the last commit before state files carried format versions.
const OLD_COMMIT: &str = "595f0beb95839c8401de5d2509933c18b76fb689";
const OLD_VERSION: &str = "0.1.0";
/// The wire protocol 0.1.0 speaks.
const OLD_PROTOCOL: &str = "1.0";
/// Names a directory with 0.1.0's `migd`, `mig` and `mig-shim` already built (no build then).
const OLD_BIN_DIR_VAR: &str = "MIG_COMPAT_0_1_0_BIN_DIR";

/// The directory holding 0.1.0's `migd`, `mig` and `mig-shim`, built on first use; `None` (with
/// the reason printed) when this clone lacks the commit.
fn old_bins() -> Result<Option<PathBuf>> {
    static BUILT: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_old().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building mig {OLD_VERSION}: {e}"))
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .with_context(|| format!("running git {args:?}"))
}

fn build_old() -> Result<Option<PathBuf>> {
    if let Some(dir) = std::env::var_os(OLD_BIN_DIR_VAR) {
        return Ok(Some(PathBuf::from(dir)));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let root = std::path::absolute(target.join("compat").join(OLD_VERSION))?;
    let src = root.join("src");
    let bins = root.join("target").join("debug");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock = std::fs::File::create(root.join("lock"))?;
    // Held until the build is complete: another test process waits here, then reuses it.
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", root.join("lock").display()))?;
    let stamp = root.join("built");
    let complete = || {
        std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == OLD_COMMIT)
            && ["migd", "mig", "mig-shim"]
                .iter()
                .all(|b| bins.join(b).is_file())
    };
    if complete() {
        return Ok(Some(bins));
    }
    let has_commit = git(
        workspace,
        &["cat-file", "-e", &format!("{OLD_COMMIT}^{{commit}}")],
    )
    .is_ok_and(|o| o.status.success());
    if !has_commit {
        eprintln!(
            "skipping: mig {OLD_VERSION} (commit {OLD_COMMIT}) is not in this clone's history \
             (a shallow clone? `git fetch --unshallow` brings it), or git is missing"
        );
        return Ok(None);
    }
    let head = git(&src, &["rev-parse", "HEAD"])
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if head.as_deref() != Some(OLD_COMMIT) {
        if src.exists() {
            std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
        }
        // A worktree whose directory was removed with the target dir.
        let _ = git(workspace, &["worktree", "prune"]);
        let src_arg = src.display().to_string();
        let o = git(
            workspace,
            &["worktree", "add", "--detach", &src_arg, OLD_COMMIT],
        )?;
        ensure!(
            o.status.success(),
            "git worktree add {src_arg} {OLD_COMMIT}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    eprintln!(
        "building mig {OLD_VERSION} (commit {OLD_COMMIT}) in {} for the upgrade tests: the first \
         run takes minutes, later runs reuse it",
        root.display()
    );
    let started = Instant::now();
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let build = |offline: bool| {
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&src)
            .args(["build", "-p", "mig-agent", "--bins", "--target-dir"])
            .arg(root.join("target"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            // Built once to be run, never debugged: no debug info, no incremental state.
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env("CARGO_INCREMENTAL", "0");
        if offline {
            cmd.arg("--offline");
        }
        // Cargo's progress goes to our stderr.
        cmd.status()
    };
    let ok = build(true)?.success() || {
        eprintln!("the offline build of mig {OLD_VERSION} failed: trying with the registry");
        build(false)?.success()
    };
    ensure!(
        ok,
        "cargo build of mig {OLD_VERSION} in {} failed",
        src.display()
    );
    std::fs::write(&stamp, OLD_COMMIT)?;
    eprintln!(
        "built mig {OLD_VERSION} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Some(bins))
}

/// Both builds, or `None` when the test is skipped (not root, or no 0.1.0 in this clone).
fn builds(test: &str) -> Result<Option<(PathBuf, PathBuf)>> {
    if !is_root(test) {
        return Ok(None);
    }
    let Some(old) = old_bins()? else {
        return Ok(None);
    };
    Ok(Some((old.join("migd"), old.join("mig"))))
}

/// `mig info --json` of host `host`: the agent's version and protocol versions.
fn info(lab: &Lab, host: usize) -> Result<Value> {
    lab.mig_json(host, &["info", "--json"])
}

/// The agent of host `host` is of version `version`.
fn expect_version(lab: &Lab, host: usize, version: &str) -> Result<()> {
    let i = info(lab, host)?;
    ensure!(
        i["version"].as_str().is_some_and(|v| v.contains(version)),
        "host {host} runs {}, not {version}: {i}",
        i["version"]
    );
    Ok(())
}

/// Where `name` runs (the hosts listing it running) with its `created`: exactly one host.
fn exactly_once(lab: &Lab, name: &str) -> Result<(usize, u64)> {
    let mut found = Vec::new();
    for h in 0..lab.hosts.len() {
        let ps = lab.mig_json(h, &["ps", "-a", "--json"])?;
        for c in ps.as_array().into_iter().flatten() {
            if c["name"] == name {
                found.push((h, c["state"].clone(), c["created"].as_u64().unwrap_or(0)));
            }
        }
    }
    match found.as_slice() {
        [(h, state, created)] if state == "running" => Ok((*h, *created)),
        _ => bail!("{name} is not running exactly once: {found:?}"),
    }
}

/// In-place upgrade: 0.1.0's migd runs a container on host-a; that migd stops (the container
/// lives on), this build's migd starts on the same state directory and re-adopts it (`ps`,
/// `logs`, `exec`, same shim and init), then moves it to host-b (this build).
#[test]
fn in_place_upgrade_readopts_and_moves() -> Result<()> {
    let Some((old_migd, _)) = builds("in_place_upgrade_readopts_and_moves")? else {
        return Ok(());
    };
    let mut lab = Lab::up_with("upin", 85, 2, &old_migd)?;
    let new_migd = mig_tests::bin("migd");
    lab.restart_with(1, &new_migd)?;
    expect_version(&lab, 0, OLD_VERSION)?;
    expect_version(&lab, 1, env!("CARGO_PKG_VERSION"))?;
    let id = lab.run_container(0, "up1", 1)?;
    let before = running_on(&lab, 0, "up1")?;
    let (count, _) = log_state(&lab.mig(0, &["logs", "up1"]).stdout);

    lab.restart_with(0, &new_migd)?;
    expect_version(&lab, 0, env!("CARGO_PKG_VERSION"))?;
    let after = running_on(&lab, 0, "up1")?;
    for k in ["id", "created", "shim_pid", "init_pid"] {
        ensure!(
            before[k] == after[k],
            "{k} changed across the upgrade: {} -> {}",
            before[k],
            after[k]
        );
    }
    let ps = lab.mig_ok(0, &["ps"])?;
    ensure!(ps.contains("up1") && ps.contains("running"), "{ps}");
    let count = continues(&lab, 0, "up1", count)?;
    let counter: u64 = lab
        .mig_ok(0, &["exec", "up1", "--", "cat", "/tmp/counter"])?
        .trim()
        .parse()?;
    ensure!(
        counter >= count,
        "exec read {counter}, the log says {count}"
    );

    move_and_check(&lab, 0, 1, "up1", &id)?;
    let (host, created) = exactly_once(&lab, "up1")?;
    ensure!(
        host == 1 && created == before["created"].as_u64().unwrap_or(0),
        "after the move: on host {host}, created {created}, before {}",
        before["created"]
    );
    lab.mig_ok(1, &["rm", "-f", "up1"])?;
    nothing_left(&lab, 1, &id)?;
    Ok(())
}

/// Moves between the two builds, both ways: host-a runs 0.1.0, host-b this build. The
/// container goes a -> b (0.1.0 source, this build's destination) and back b -> a (this build's
/// source, 0.1.0 destination), each time still running exactly once with its PIDs, memory,
/// counter and creation time. The moves are asked with this build's `mig` (of 0.1.0's agent on
/// the way out), and 0.1.0's `mig` lists this build's agent.
#[test]
fn moves_both_ways_between_0_1_0_and_this_build() -> Result<()> {
    let Some((old_migd, old_mig)) = builds("moves_both_ways_between_0_1_0_and_this_build")? else {
        return Ok(());
    };
    let mut lab = Lab::up_with("upmv", 86, 2, &old_migd)?;
    lab.restart_with(1, &mig_tests::bin("migd"))?;
    expect_version(&lab, 0, OLD_VERSION)?;
    let new_info = info(&lab, 1)?;
    eprintln!(
        "host-a: mig {OLD_VERSION} (protocol {OLD_PROTOCOL}); host-b: {}",
        new_info["version"]
    );
    let id = lab.run_container(0, "mv1", 1)?;
    // This build's CLI against 0.1.0's agent.
    let ps = lab.mig_ok(0, &["ps"])?;
    ensure!(ps.contains("mv1") && ps.contains("running"), "{ps}");
    let (_, created) = exactly_once(&lab, "mv1")?;

    // 0.1.0's agent moves in its default (and only) mode, cold.
    move_and_check_with(&lab, 0, 1, "mv1", &id, &[], "cold")?;
    ensure!(exactly_once(&lab, "mv1")? == (1, created), "after a -> b");
    // 0.1.0's CLI against this build's agent.
    let ps = lab.mig_ok_with(&old_mig, 1, &["ps"])?;
    ensure!(ps.contains("mv1") && ps.contains("running"), "{ps}");

    // Cold from this build too (its default, stream, is in the test below).
    move_and_check_with(&lab, 1, 0, "mv1", &id, &["--mode", "cold"], "cold")?;
    ensure!(
        exactly_once(&lab, "mv1")? == (0, created),
        "after b -> a: the 0.1.0 destination lost the creation time or a copy is left"
    );
    lab.mig_ok(0, &["rm", "-f", "mv1"])?;
    nothing_left(&lab, 0, &id)?;
    Ok(())
}

/// The other move modes between the builds: `stream` (pages through the tunnel) and `lazy`
/// (post-copy) each way, 0.1.0 on host-a and this build on host-b.
#[test]
fn stream_and_lazy_moves_both_ways_between_builds() -> Result<()> {
    let Some((old_migd, _)) = builds("stream_and_lazy_moves_both_ways_between_builds")? else {
        return Ok(());
    };
    let mut lab = Lab::up_with("upmd", 87, 2, &old_migd)?;
    lab.restart_with(1, &mig_tests::bin("migd"))?;
    let id = lab.run_container(0, "md1", 4)?;
    let (_, created) = exactly_once(&lab, "md1")?;
    for mode in ["stream", "lazy"] {
        for (from, to) in [(0, 1), (1, 0)] {
            let r = move_and_check_with(&lab, from, to, "md1", &id, &["--mode", mode], mode)
                .with_context(|| format!("{mode} move from host {from} to host {to}"))?;
            if mode == "lazy" {
                ensure!(
                    r["postcopy_error"].is_null(),
                    "post-copy failed from host {from} to host {to}: {r}"
                );
            }
            ensure!(
                exactly_once(&lab, "md1")? == (to, created),
                "after the {mode} move from host {from} to host {to}"
            );
        }
    }
    lab.mig_ok(0, &["rm", "-f", "md1"])?;
    nothing_left(&lab, 0, &id)?;
    Ok(())
}
