//! The memory modes of `mig move` end to end (docs/migration.md, "Modes"): `stream` (pages
//! streamed from the dump into the destination's page server through the QUIC connection) and
//! `lazy` (post-copy, pages served on demand by the source) each move the multi-process busybox
//! container there and back with its memory verified and its PIDs kept; `precopy` is refused on
//! a kernel without dirty-memory tracking, and `--max-downtime` refuses a move whose predicted
//! downtime is too long, leaving the container untouched.
//!
//! Needs root. Labs on subnets 10.214.10-19.0/24.

use anyhow::{bail, Result};
use mig_tests::lab::{continues, log_state, move_and_check_with, nothing_left, running_on, Lab};

#[test]
fn stream_there_and_back() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("st", 10)?;
    let id = lab.run_container(0, "streamer", 8)?;
    let r = move_and_check_with(&lab, 0, 1, "streamer", &id, &["--mode", "stream"], "stream")?;
    let pages = r["page_bytes"].as_u64().unwrap_or(0);
    assert!(
        pages > 8_000_000,
        "the pages did not go through the tunnel: {r}"
    );
    move_and_check_with(&lab, 1, 0, "streamer", &id, &["--mode", "stream"], "stream")?;
    Ok(())
}

#[test]
fn lazy_there_and_back() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("lz", 11)?;
    let id = lab.run_container(0, "sleeper", 8)?;
    let r = move_and_check_with(&lab, 0, 1, "sleeper", &id, &["--mode", "lazy"], "lazy")?;
    if !r["postcopy_ms"].is_u64() || !r["postcopy_error"].is_null() {
        bail!("post-copy not reported as complete: {r}");
    }
    // `auto` with a downtime budget only post-copy meets (its fixed costs) goes lazy.
    move_and_check_with(
        &lab,
        1,
        0,
        "sleeper",
        &id,
        &["--mode", "auto", "--max-downtime", "500"],
        "lazy",
    )?;
    Ok(())
}

/// A refused move: non-zero exit, `reason` in the message, the container running on host-a as
/// before, nothing of it on host-b.
fn refused(lab: &Lab, name: &str, id: &str, args: &[&str], reason: &str) -> Result<()> {
    let (count, _) = log_state(&lab.mig(0, &["logs", name]).stdout);
    let mut a = vec!["move", name, "host-b"];
    a.extend_from_slice(args);
    let o = lab.mig(0, &a);
    if o.code == 0 {
        bail!("the move was not refused: {}", o.stdout);
    }
    if !o.stderr.contains(reason) {
        bail!("the refusal does not say {reason:?}: {}", o.stderr);
    }
    eprintln!("refused as expected: {}", o.stderr.trim());
    running_on(lab, 0, name)?;
    continues(lab, 0, name, count)?;
    nothing_left(lab, 1, id)
}

#[test]
fn precopy_and_max_downtime_refused() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("rf", 12)?;
    let id = lab.run_container(0, "stayer", 4)?;
    let dirty_tracking = std::process::Command::new(mig_migrate::criu::DEFAULT_CRIU)
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !dirty_tracking {
        refused(
            &lab,
            "stayer",
            &id,
            &["--mode", "precopy"],
            "mem_dirty_track",
        )?;
    }
    for mode in ["cold", "stream", "lazy", "auto"] {
        refused(
            &lab,
            "stayer",
            &id,
            &["--mode", mode, "--max-downtime", "1"],
            "exceeds --max-downtime 1 ms",
        )?;
    }
    Ok(())
}
