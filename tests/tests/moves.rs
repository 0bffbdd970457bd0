//! Live migration end to end: a real two-host lab (`mig_agent::lab`), real `migd` agents talking
//! QUIC with pinned certificates, real CRIU. A multi-process busybox container (a shell parent and
//! a child connected by a pipe, each holding random data and checking its md5 every few seconds,
//! the child writing a counter file) moves to host-b and back; then the faults: the destination
//! agent killed during the transfer and during the restore, a corrupted file in transit, a
//! failing restore, an unpinned source. After each: the container runs on exactly one host with
//! its memory intact, and nothing of it is left on the other.
//!
//! Needs root. Each test has its own lab (name from the test and the process id, own subnet),
//! removed by a guard with `lab::down` whatever happens.

use anyhow::{bail, Result};
use mig_tests::lab::{continues, log_state, move_and_check, nothing_left, running_on, Lab};

#[test]
fn move_there_and_back() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("h", 1)?;
    // Two processes with 30 MB of random bytes each, held as base64 by busybox sh (with its
    // copies the dump holds about 170 MB).
    let id = lab.run_container(0, "mover", 30)?;
    move_and_check(&lab, 0, 1, "mover", &id)?;
    move_and_check(&lab, 1, 0, "mover", &id)?;
    Ok(())
}

/// After a failed move: the container runs on host-a, intact and counting, and host-b has
/// nothing of it.
fn rolled_back(lab: &Lab, name: &str, id: &str, count_before: u64) -> Result<()> {
    running_on(lab, 0, name)?;
    continues(lab, 0, name, count_before)?;
    nothing_left(lab, 1, id)
}

fn failed_move(lab: &Lab, name: &str) -> Result<(u64, String)> {
    let (count, _) = log_state(&lab.mig(0, &["logs", name]).stdout);
    let o = lab.mig(0, &["move", name, "host-b", "--json"]);
    if o.code == 0 {
        bail!("the move succeeded despite the fault: {}", o.stdout);
    }
    eprintln!("move failed as expected: {}", o.stderr.trim());
    Ok((count, o.stderr))
}

#[test]
fn dest_killed_during_transfer() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let mut lab = Lab::up("t", 2)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(1, Some("dest-transfer:kill"))?;
    let (count, _) = failed_move(&lab, "victim")?;
    lab.fault(1, None)?;
    lab.restart(1)?;
    rolled_back(&lab, "victim", &id, count)?;
    // The restarted destination takes it now.
    move_and_check(&lab, 0, 1, "victim", &id)?;
    Ok(())
}

#[test]
fn dest_killed_during_restore() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let mut lab = Lab::up("r", 3)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(1, Some("dest-restore:kill"))?;
    let (count, _) = failed_move(&lab, "victim")?;
    lab.fault(1, None)?;
    lab.restart(1)?;
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

#[test]
fn corrupted_file_in_transit() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("c", 4)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(0, Some("source-dump:corrupt"))?;
    let (count, err) = failed_move(&lab, "victim")?;
    lab.fault(0, None)?;
    assert!(err.contains("rolled back"), "{err}");
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

#[test]
fn restore_fails_on_destination() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("f", 5)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(1, Some("dest-restore:fail"))?;
    let (count, err) = failed_move(&lab, "victim")?;
    lab.fault(1, None)?;
    assert!(err.contains("rolled back"), "{err}");
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

#[test]
fn unpinned_peer_is_refused() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("u", 6)?;
    let id = lab.run_container(0, "victim", 8)?;
    // host-b no longer trusts host-a: the handshake fails before anything is sent.
    lab.mig_ok(1, &["peers", "rm", "host-a"])?;
    let (count, err) = failed_move(&lab, "victim")?;
    assert!(err.contains("host-b"), "{err}");
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}
