//! The network namespace of a loopback-only container (no `--net`, no `--userns`) is left out of
//! a move's dump and recreated with `lo` up on the destination (docs/criu.md, "Network
//! namespace"): such a container moves in every mode with its PIDs, `lo` is up after the move,
//! and a TCP connection over `lo` inside it survives a `--tcp-established` move. The images
//! say so: the destination's `netns-ID.img` holds only the external key. A `--net bridge`
//! container and a `--userns` container still dump theirs in full.
//!
//! Needs root and CRIU 4.2 (TCP sockets on this kernel). Lab subnet 10.79.71.0/24.
//!
//! `cargo test -p mig-tests --test netns`

use anyhow::{bail, ensure, Context, Result};
use mig_migrate::criu::images_external_netns;
use mig_tests::lab::{move_and_check_with, nothing_left, ns_pids, pages_spent, running_on, Lab};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const SUBNET: [u8; 3] = [10, 79, 71];

/// A server and a client talking over `lo` inside the container: the client sends a numbered
/// line every 100 ms and writes the server's answers to /tmp/acks. If the connection breaks, the
/// client exits, the pipeline ends and so does the container.
const TALK: &str = r#"printf '#!/bin/sh\nwhile read l; do echo "ack $l"; done\n' > /srv.sh
chmod +x /srv.sh
nc -ll -p 5000 -e /srv.sh &
sleep 0.5
i=0; while :; do i=$((i+1)); echo "msg $i"; sleep 0.1; done | nc 127.0.0.1 5000 > /tmp/acks"#;

/// The image set a host restored container `id` from.
fn checkpoint(lab: &Lab, host: usize, id: &str) -> PathBuf {
    lab.state_dir(host)
        .join("containers")
        .join(id)
        .join("checkpoint")
}

/// The names of the images in `dir` that start with `prefix`.
fn images(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The container on `host` was restored without a dump of its network namespace, into one
/// with `lo` up.
fn netns_recreated(lab: &Lab, host: usize, name: &str, id: &str) -> Result<()> {
    let dir = checkpoint(lab, host, id);
    ensure!(
        images_external_netns(&dir)?,
        "{} has no external netns image: {:?}",
        dir.display(),
        images(&dir, "netns-")
    );
    for full in ["ifaddr-", "route-", "iptables-", "netdev-"] {
        let found = images(&dir, full);
        ensure!(
            found.is_empty(),
            "the netns was dumped after all: {found:?}"
        );
    }
    let lo = lab.mig_ok(
        host,
        &["exec", name, "--", "ip", "-o", "link", "show", "lo"],
    )?;
    ensure!(lo.contains(",UP"), "lo is not up after the move: {lo}");
    let addr = lab.mig_ok(
        host,
        &["exec", name, "--", "ip", "-o", "addr", "show", "lo"],
    )?;
    ensure!(addr.contains("127.0.0.1/8"), "lo has no 127.0.0.1: {addr}");
    Ok(())
}

/// The container on `host` was restored from a full dump of its network namespace.
fn netns_dumped(lab: &Lab, host: usize, id: &str) -> Result<()> {
    let dir = checkpoint(lab, host, id);
    ensure!(
        !images(&dir, "netns-").is_empty(),
        "no netns image in {}",
        dir.display()
    );
    ensure!(
        !images_external_netns(&dir)?,
        "{} has an external netns",
        dir.display()
    );
    ensure!(
        !images(&dir, "ifaddr-").is_empty(),
        "no address images in {}",
        dir.display()
    );
    Ok(())
}

#[test]
fn loopback_only_container_moves_stream_and_lazy_without_its_netns() -> Result<()> {
    if !mig_tests::is_root("loopback_only_container_moves_stream_and_lazy_without_its_netns") {
        return Ok(());
    }
    let lab = Lab::up_on("nsmodes", SUBNET, 2)?;
    let id = lab.run_container(0, "lo1", 1)?;
    for (from, to, mode) in [(0, 1, "stream"), (1, 0, "lazy"), (0, 1, "cold")] {
        move_and_check_with(&lab, from, to, "lo1", &id, &["--mode", mode], mode)?;
        pages_spent(&lab, to, &id).with_context(|| format!("after the {mode} move"))?;
        netns_recreated(&lab, to, "lo1", &id).with_context(|| format!("after the {mode} move"))?;
    }
    lab.mig_ok(1, &["rm", "-f", "lo1"])?;
    nothing_left(&lab, 1, &id)?;
    Ok(())
}

/// The number of answers in /tmp/acks, checking that they are `ack msg 1..n` in order.
fn acks(lab: &Lab, host: usize) -> Result<usize> {
    let text = lab.mig_ok(host, &["exec", "talk", "--", "cat", "/tmp/acks"])?;
    for (i, line) in text.lines().enumerate() {
        if line != format!("ack msg {}", i + 1) {
            bail!("answer {} is {line:?}: lost or out of order", i + 1);
        }
    }
    Ok(text.lines().count())
}

/// Waits until /tmp/acks on `host` has more than `after` + 5 answers, all in order.
fn talking(lab: &Lab, host: usize, after: usize) -> Result<usize> {
    let mut last = Err(anyhow::anyhow!("not read yet"));
    let ok = mig_tests::wait_until(Duration::from_secs(20), || {
        // Until the client's first answer, /tmp/acks may not exist yet.
        last = acks(lab, host);
        matches!(&last, Ok(n) if *n > after + 5)
    });
    let n = last?;
    ensure!(
        ok,
        "the conversation stopped at {n} answers (before: {after})"
    );
    Ok(n)
}

#[test]
fn tcp_connection_over_lo_survives_tcp_established_moves() -> Result<()> {
    if !mig_tests::is_root("tcp_connection_over_lo_survives_tcp_established_moves") {
        return Ok(());
    }
    let lab = Lab::up_on("nstcp", SUBNET, 2)?;
    let id = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "talk", "busybox", "--", "sh", "-c", TALK,
        ],
    )?;
    let id = id.trim().to_string();
    let mut n = talking(&lab, 0, 0)?;
    for (from, to) in [(0, 1), (1, 0)] {
        let peer = lab.hosts[to].name.clone();
        let r = lab.mig_json(
            from,
            &["move", "talk", &peer, "--tcp-established", "--json"],
        )?;
        eprintln!(
            "talk {} -> {peer}: downtime {} ms, dump {} ms, restore {} ms",
            lab.hosts[from].name, r["downtime_ms"], r["dump_ms"], r["restore_ms"]
        );
        // The server, its connection's shell and the client, with their PIDs.
        let dumped = ns_pids(&r["pid_map_before"]);
        ensure!(dumped == ns_pids(&r["pid_map"]), "PIDs changed: {r}");
        ensure!(dumped.len() >= 5, "too few processes: {r}");
        running_on(&lab, to, "talk")?;
        let dir = checkpoint(&lab, to, &id);
        ensure!(
            !images(&dir, "tcp-stream-").is_empty(),
            "no connection was dumped"
        );
        netns_recreated(&lab, to, "talk", &id)?;
        n = talking(&lab, to, n)?;
        nothing_left(&lab, from, &id)?;
    }
    lab.mig_ok(0, &["rm", "-f", "talk"])?;
    nothing_left(&lab, 0, &id)?;
    Ok(())
}

#[test]
fn bridge_and_userns_containers_still_dump_their_netns() -> Result<()> {
    if !mig_tests::is_root("bridge_and_userns_containers_still_dump_their_netns") {
        return Ok(());
    }
    let lab = Lab::up_on("nskeep", SUBNET, 2)?;
    let peer = lab.hosts[1].name.clone();
    let forever = "while :; do sleep 1; done";
    for (name, flag) in [("br1", "--net"), ("us1", "--userns")] {
        let mut args = vec!["run", "-d", "--name", name];
        if flag == "--net" {
            args.extend(["--net", "bridge"]);
        } else {
            args.push(flag);
        }
        args.extend(["busybox", "--", "sh", "-c", forever]);
        let id = lab.mig_ok(0, &args)?.trim().to_string();
        let r = lab.mig_json(0, &["move", name, &peer, "--json"])?;
        ensure!(
            ns_pids(&r["pid_map_before"]) == ns_pids(&r["pid_map"]),
            "PIDs changed: {r}"
        );
        running_on(&lab, 1, name)?;
        netns_dumped(&lab, 1, &id).with_context(|| format!("{name} ({flag})"))?;
        lab.mig_ok(1, &["rm", "-f", name])?;
        nothing_left(&lab, 1, &id)?;
    }
    Ok(())
}

/// A container with established TCP connections shows how many (`tcp_established` in `ps
/// --json`), and `mig rebalance` leaves it out of its plan, saying so, unless given
/// `--tcp-established` (QA of session 29: the plan chose such a container, whose move was
/// refused every time).
#[test]
fn a_rebalance_leaves_out_a_container_with_connections() -> Result<()> {
    if !mig_tests::is_root("a_rebalance_leaves_out_a_container_with_connections") {
        return Ok(());
    }
    let lab = Lab::up_on("nsreb", [10, 79, 99], 2)?;
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "talk", "busybox", "--", "sh", "-c", TALK,
        ],
    )?;
    talking(&lab, 0, 0)?;
    let ps = lab.mig_json(0, &["ps", "--json"])?;
    let talk = ps
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "talk")
        .context("talk not listed")?;
    ensure!(
        talk["tcp_established"].as_u64().is_some_and(|n| n >= 1),
        "{talk}"
    );
    let plan = |extra: &[&str]| -> Result<Value> {
        let mut args = vec!["rebalance", "--dry-run", "--json"];
        args.extend_from_slice(extra);
        lab.mig_lab_json(&args)
    };
    let left = plan(&[])?;
    ensure!(
        left["left_out"]
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["container"] == "talk"
                && c["host"] == "host-a"
                && c["tcp_established"].as_u64().is_some_and(|n| n >= 1))),
        "{left}"
    );
    ensure!(!left["plan"].to_string().contains("talk"), "{left}");
    let told = plan(&["--tcp-established"])?;
    ensure!(
        told["left_out"].as_array().is_some_and(|l| l.is_empty()),
        "{told}"
    );
    Ok(())
}
