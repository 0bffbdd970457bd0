//! The tmpfs mounts of a container across a checkpoint and restore (docs/criu.md, "Patches",
//! 0006): an empty tmpfs whose root has the mode and owner of its mount options (the masked
//! /proc/acpi and /sys/firmware, an unused /dev/shm) is dumped without tar and comes back empty,
//! with that mode and writable; one whose root was changed after the mount (`chmod 700
//! /dev/shm`), or that holds a file, still goes through tar (uncompressed, 0013) and keeps the
//! change and the file.
//! Also with a user namespace, whose tmpfs mounts belong to the container's mapped root.
//!
//! Needs root and CRIU with mig's patches (scripts/setup.sh).

use anyhow::{ensure, Context, Result};
use mig_tests::{wait_until, Agent};
use std::time::Duration;

const IDLE: &str = "while :; do sleep 1; done";

/// Runs `script` then [`IDLE`] in a detached container named `name`, waiting until `ready`
/// exists in it (the script's last step).
fn start(agent: &Agent, name: &str, extra: &[&str], script: &str) -> Result<()> {
    let cmd = format!("{script}; touch /tmp/ready; {IDLE}");
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["busybox", "--", "sh", "-c", &cmd]);
    agent.mig_ok(&args)?;
    ensure!(
        wait_until(Duration::from_secs(20), || agent
            .mig(&["exec", name, "--", "test", "-e", "/tmp/ready"])
            .code
            == 0),
        "{name} did not start"
    );
    Ok(())
}

/// `sh -c script` in `name`, its stdout trimmed.
fn sh(agent: &Agent, name: &str, script: &str) -> Result<String> {
    Ok(agent
        .mig_ok(&["exec", name, "--", "sh", "-c", script])?
        .trim()
        .to_owned())
}

/// Checkpoints `name`, returns the dump log's lines about empty tmpfs mounts, and restores it.
fn checkpoint_restore(agent: &Agent, name: &str) -> Result<Vec<String>> {
    let cp = agent.mig_json(&["checkpoint", name, "--json"])?;
    let dir = cp["images_dir"]
        .as_str()
        .context("checkpoint without images_dir")?;
    let log_path = std::path::Path::new(dir).join("dump.log");
    let log = std::fs::read_to_string(&log_path)
        .with_context(|| format!("reading {}", log_path.display()))?;
    let skipped = log
        .lines()
        .filter(|l| l.contains("criu-tmpfs-empty"))
        .map(str::to_owned)
        .collect();
    // A tmpfs that goes through tar goes uncompressed (0013: gzip ran at 30 MB/s while frozen).
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        if file.starts_with("tmpfs-") {
            let head = std::fs::read(&path)?;
            ensure!(
                !head.starts_with(&[0x1f, 0x8b]),
                "{name}: {file} is gzip-compressed"
            );
        }
    }
    if name == "full" {
        ensure!(
            log.lines()
                .any(|l| l.contains("criu-tmpfs-plain") && l.contains("./dev/shm")),
            "{name}: /dev/shm was not archived plain"
        );
    }
    agent.mig_ok(&["restore", name])?;
    Ok(skipped)
}

#[test]
fn empty_tmpfs_mounts_come_back_as_they_were() -> Result<()> {
    if !mig_tests::is_root("tmpfs tests") {
        return Ok(());
    }
    let agent = Agent::start("tmpfs")?;
    agent.import_busybox()?;
    start(&agent, "plain", &[], "true")?;
    start(&agent, "closed", &[], "chmod 700 /dev/shm")?;
    start(&agent, "full", &[], "echo kept > /dev/shm/f")?;
    start(&agent, "userns", &["--userns"], "true")?;

    for name in ["plain", "closed", "full", "userns"] {
        let skipped = checkpoint_restore(&agent, name)?;
        let shm_skipped = skipped.iter().any(|l| l.contains("./dev/shm"));
        let masks_skipped = skipped.iter().any(|l| l.contains("./proc/acpi"));
        match name {
            "plain" | "userns" => ensure!(
                shm_skipped && masks_skipped,
                "{name}: the empty tmpfs mounts still went through tar: {skipped:?}"
            ),
            _ => ensure!(
                !shm_skipped && masks_skipped,
                "{name}: /dev/shm was taken for empty as mounted: {skipped:?}"
            ),
        }
        let mode = sh(&agent, name, "stat -c %a /dev/shm")?;
        let want = if name == "closed" { "700" } else { "1777" };
        ensure!(
            mode == want,
            "{name}: /dev/shm is {mode} after the restore, not {want}"
        );
        let listing = sh(&agent, name, "ls -A /proc/acpi /sys/firmware | tr -d '\\n'")?;
        ensure!(
            listing == "/proc/acpi:/sys/firmware:",
            "{name}: the masks are not empty: {listing:?}"
        );
        let ro = agent.mig(&["exec", name, "--", "touch", "/proc/acpi/x"]);
        ensure!(ro.code != 0, "{name}: /proc/acpi became writable");
    }
    ensure!(
        sh(&agent, "full", "cat /dev/shm/f")? == "kept",
        "the file in /dev/shm was lost"
    );
    for name in ["plain", "userns"] {
        let out = sh(&agent, name, "echo w > /dev/shm/w && cat /dev/shm/w")?;
        ensure!(
            out == "w",
            "{name}: /dev/shm is not writable after the restore: {out:?}"
        );
    }
    for name in ["plain", "closed", "full", "userns"] {
        agent.mig_ok(&["rm", "-f", name])?;
    }
    Ok(())
}
