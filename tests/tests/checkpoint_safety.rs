//! A checkpoint never loses a container (QA session 16: workloads #1, #2, #5, faults H3).
//!
//! - `mig checkpoint --export FILE` to a directory that does not exist is refused before anything
//!   is frozen, naming FILE; when FILE's filesystem fills up during the export, the container is
//!   checkpointed (restorable with `mig restore`) and the error says so, or with
//!   `--leave-running` it keeps running;
//! - `mig restore --import FILE --name COPY` of a `--net bridge` container whose original runs
//!   on this host is refused before the original's network is touched;
//! - a `--userns --net bridge` container, which this CRIU cannot restore, is refused by
//!   `mig checkpoint` (with and without `--leave-running`) and `mig move`, and keeps running.
//!
//! Run as root. Labs on 10.214.170-172.0/24.

use anyhow::{ensure, Context, Result};
use mig_tests::lab::{running_on, Lab, Tmpfs};
use mig_tests::{wait_until, Agent};
use std::os::unix::fs::FileTypeExt;
use std::process::Command;
use std::time::Duration;

/// About 10 MB of base64 in a shell variable (a checkpoint of some 12 MB), and a counter.
const HOLDER: &str = r#"d=$(head -c 7500000 /dev/urandom | base64); i=0
while :; do i=$((i+1)); echo "tick $i ${#d}"; sleep 0.2; done"#;

fn last_tick(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            l.strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

fn state(agent: &Agent, name: &str) -> Result<(String, i64)> {
    let d = agent.mig_json(&["inspect", name, "--json"])?;
    let st = d["state"].as_str().unwrap_or_default().to_owned();
    Ok((st, d["init_pid"].as_i64().unwrap_or(0)))
}

/// Waits until `name`'s counter passed `after` (it runs).
fn ticks(agent: &Agent, name: &str, after: u64) -> Result<u64> {
    let log = || agent.mig(&["logs", name]).stdout;
    ensure!(
        wait_until(Duration::from_secs(20), || last_tick(&log()) > after + 2),
        "{name}'s counter did not pass {after}: {}",
        log()
    );
    Ok(last_tick(&log()))
}

#[test]
fn a_failed_export_never_loses_the_container() -> Result<()> {
    if !mig_tests::is_root("checkpoint_safety") {
        return Ok(());
    }
    let agent = Agent::start("cpsafe-export")?;
    agent.import_busybox()?;
    agent.mig_ok(&[
        "run", "-d", "--name", "xf", "busybox", "--", "sh", "-c", HOLDER,
    ])?;
    let t = ticks(&agent, "xf", 0)?;
    let (_, pid) = state(&agent, "xf")?;

    // A missing directory: refused before the freeze, naming the file; nothing happened.
    let missing = agent.dir.path().join("nonexistent/dir/x.tar");
    let missing = missing.to_str().context("path")?;
    for extra in [&[][..], &["--leave-running"][..]] {
        let mut args = vec!["checkpoint", "xf", "--export", missing];
        args.extend_from_slice(extra);
        let o = agent.mig(&args);
        ensure!(o.code != 0, "export to a missing directory succeeded");
        ensure!(
            o.stderr.contains(&format!("cannot export to {missing}"))
                && o.stderr.contains("nothing was frozen"),
            "{}",
            o.stderr
        );
        ensure!(
            state(&agent, "xf")? == ("running".into(), pid),
            "{:?}",
            state(&agent, "xf")?
        );
    }
    // A directory as FILE: the same.
    let o = agent.mig(&[
        "checkpoint",
        "xf",
        "--export",
        agent.dir.path().to_str().unwrap(),
    ]);
    ensure!(
        o.code != 0 && o.stderr.contains("is a directory"),
        "{}",
        o.stderr
    );
    // A device, FIFO or symlink as FILE: refused, and left as it was (the archive is renamed
    // over FILE: `--export /dev/null` replaced the host's /dev/null with a file).
    let fifo = agent.dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let link = agent.dir.path().join("link");
    std::os::unix::fs::symlink("/dev/null", &link)?;
    for target in [&fifo, &link] {
        let target_s = target.to_str().context("path")?;
        let o = agent.mig(&["checkpoint", "xf", "--leave-running", "--export", target_s]);
        ensure!(
            o.code != 0
                && (o.stderr.contains("not a regular file")
                    || o.stderr.contains("a symbolic link")),
            "{}",
            o.stderr
        );
    }
    ensure!(
        std::fs::symlink_metadata(&fifo)?.file_type().is_fifo(),
        "the FIFO was replaced"
    );
    ensure!(
        std::fs::symlink_metadata(&link)?.file_type().is_symlink(),
        "the link was replaced"
    );
    let t = ticks(&agent, "xf", t)?;

    // A filesystem too small for the archive (the probe before the freeze fits).
    let small = Tmpfs::mount(&agent.dir.path().join("small"), 2 << 20)?;
    let file = small.path.join("xf.tar");
    let file = file.to_str().context("path")?;
    // --leave-running: it keeps running whatever happens.
    let o = agent.mig(&["checkpoint", "xf", "--leave-running", "--export", file]);
    ensure!(o.code != 0, "export to a full filesystem succeeded");
    ensure!(
        o.stderr.contains(&format!("cannot write {file}"))
            && o.stderr.contains("No space left on device")
            && o.stderr.contains("the container keeps running"),
        "{}",
        o.stderr
    );
    ensure!(
        !o.stderr.contains(".img"),
        "the error names an image file: {}",
        o.stderr
    );
    ensure!(
        state(&agent, "xf")? == ("running".into(), pid),
        "{:?}",
        state(&agent, "xf")?
    );
    let t = ticks(&agent, "xf", t)?;

    // Without: the dump ended the processes, the checkpoint is kept and restores.
    let o = agent.mig(&["checkpoint", "xf", "--export", file]);
    ensure!(o.code != 0, "export to a full filesystem succeeded");
    ensure!(
        o.stderr.contains(&format!("cannot write {file}"))
            && o.stderr
                .contains("the checkpoint is kept here: mig restore xf"),
        "{}",
        o.stderr
    );
    ensure!(
        state(&agent, "xf")?.0 == "checkpointed",
        "{:?}",
        state(&agent, "xf")?
    );
    let leftovers: Vec<_> = std::fs::read_dir(&small.path)?.flatten().collect();
    ensure!(
        leftovers.is_empty(),
        "left in the small filesystem: {leftovers:?}"
    );
    agent.mig_ok(&["restore", "xf"])?;
    let after = ticks(&agent, "xf", t)?;
    ensure!(after > t, "the counter restarted: {after} after {t}");
    // Restored, not started again: the counter never began anew.
    let log = agent.mig(&["logs", "xf"]).stdout;
    ensure!(
        log.lines().filter(|l| l.starts_with("tick 1 ")).count() == 1,
        "the counter started again: {log}"
    );
    agent.mig_ok(&["rm", "-f", "xf"])?;
    Ok(())
}

/// The interfaces in `name`'s network namespace (from inside).
fn links(lab: &Lab, host: usize, name: &str) -> String {
    lab.mig(host, &["exec", name, "--", "cat", "/proc/net/dev"])
        .stdout
}

/// Whether host `host`'s namespace has the interface `ifname`.
fn host_has_link(lab: &Lab, host: usize, ifname: &str) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.hosts[host].netns,
            "ip",
            "link",
            "show",
            ifname,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn an_imported_copy_never_takes_the_originals_network() -> Result<()> {
    if !mig_tests::is_root("checkpoint_safety") {
        return Ok(());
    }
    let lab = Lab::up("cpimp", 170)?;
    let tick = "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done";
    let id = lab
        .mig_ok(
            0,
            &[
                "run", "-d", "--name", "bw", "--net", "bridge", "busybox", "--", "sh", "-c", tick,
            ],
        )?
        .trim()
        .to_owned();
    let d = running_on(&lab, 0, "bw")?;
    let addr = d["net"]["address"].as_str().map(str::to_owned);
    let ifname = format!("mv{}", &id[..12]);
    ensure!(host_has_link(&lab, 0, &ifname), "no host veth {ifname}");
    ensure!(
        links(&lab, 0, "bw").contains("eth0:"),
        "{}",
        links(&lab, 0, "bw")
    );
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("bw.tar");
    let tar = tar.to_str().context("path")?;
    lab.mig_ok(0, &["checkpoint", "bw", "--leave-running", "--export", tar])?;

    let o = lab.mig(0, &["restore", "--import", tar, "--name", "bw3"]);
    ensure!(o.code != 0, "the copy was restored: {}", o.stdout);
    ensure!(
        o.stderr.contains("belongs to container bw here")
            && o.stderr.contains("nothing was restored"),
        "{}",
        o.stderr
    );
    if let Some(a) = addr {
        ensure!(
            o.stderr.contains(&a),
            "the error does not name the address {a}: {}",
            o.stderr
        );
    }
    // The original keeps its interface at both ends, and no copy is left.
    ensure!(
        host_has_link(&lab, 0, &ifname),
        "the original's host veth {ifname} is gone"
    );
    ensure!(
        links(&lab, 0, "bw").contains("eth0:"),
        "bw lost eth0: {}",
        links(&lab, 0, "bw")
    );
    ensure!(
        lab.mig(0, &["inspect", "bw3", "--json"]).code != 0,
        "bw3 exists: {}",
        lab.mig(0, &["ps", "-a"]).stdout
    );
    let imports: Vec<_> = std::fs::read_dir(lab.state_dir(0).join("containers"))?
        .flatten()
        .filter(|e| e.file_name() != id.as_str())
        .map(|e| e.file_name())
        .collect();
    ensure!(imports.is_empty(), "left in containers/: {imports:?}");
    running_on(&lab, 0, "bw")?;

    // On another host of the segment the address table cannot tell the copy from the original
    // (one id owns the address there too): the address answers ARP, so the import is refused
    // (QA session 17: it was restored with the running original's address).
    let image = lab.image_tar.display().to_string();
    lab.mig_ok(1, &["image", "import", &image, "--name", "busybox"])?;
    let o = lab.mig(1, &["restore", "--import", tar]);
    ensure!(
        o.code == 125
            && o.stderr.contains("answers on the segment")
            && o.stderr.contains("nothing was restored"),
        "{o:?}"
    );
    let left: Vec<_> = std::fs::read_dir(lab.state_dir(1).join("containers"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(left.is_empty(), "left on host-b: {left:?}");
    running_on(&lab, 0, "bw")?;

    // Once the original is gone, the archive restores here under its own id and network.
    lab.mig_ok(0, &["rm", "-f", "bw"])?;
    ensure!(
        wait_until(Duration::from_secs(10), || !host_has_link(&lab, 0, &ifname)),
        "the removed container's veth stayed"
    );
    lab.mig_ok(0, &["restore", "--import", tar, "--name", "bw3"])?;
    running_on(&lab, 0, "bw3")?;
    ensure!(
        host_has_link(&lab, 0, &ifname),
        "the restored copy has no host veth"
    );
    ensure!(
        links(&lab, 0, "bw3").contains("eth0:"),
        "{}",
        links(&lab, 0, "bw3")
    );

    // Checkpointed here and exported, restored on host-b: restoring the checkpoint here too
    // would make two copies with one address. Refused, and the checkpoint stays.
    let tar2 = dir.path().join("bw3.tar");
    let tar2 = tar2.to_str().context("path")?;
    lab.mig_ok(0, &["checkpoint", "bw3", "--export", tar2])?;
    lab.mig_ok(1, &["restore", "--import", tar2])?;
    running_on(&lab, 1, "bw3")?;
    let o = lab.mig(0, &["restore", "bw3"]);
    ensure!(
        o.code == 125 && o.stderr.contains("answers on the segment"),
        "{o:?}"
    );
    let d = lab.mig_json(0, &["inspect", "bw3", "--json"])?;
    ensure!(d["state"] == "checkpointed", "{d}");
    lab.mig_ok(1, &["rm", "-f", "bw3"])?;
    lab.mig_ok(0, &["rm", "-f", "bw3"])?;
    Ok(())
}

/// A copy frozen in a move answers no ARP probe: a `--net bridge` checkpoint restored on a third
/// host while the original is frozen in its move to host-b is refused because the peers are asked
/// (protocol 1.7), and the move then leaves exactly one copy (QA of session 25, F17: the import
/// was restored and the move committed, two copies with one address).
#[test]
fn a_bridge_copy_frozen_in_a_move_is_not_restored_twice() -> Result<()> {
    if !mig_tests::is_root("checkpoint_safety") {
        return Ok(());
    }
    let lab = Lab::up_n("cpfrz", 173, 3)?;
    let tick = "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "fz", "--net", "bridge", "busybox", "--", "sh", "-c", tick,
        ],
    )?;
    running_on(&lab, 0, "fz")?;
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("fz.tar");
    let tar = tar.to_str().context("path")?;
    lab.mig_ok(0, &["checkpoint", "fz", "--leave-running", "--export", tar])?;
    let image = lab.image_tar.display().to_string();
    for host in [1, 2] {
        lab.mig_ok(host, &["image", "import", &image, "--name", "busybox"])?;
    }
    lab.fault(0, Some("source-dump:delay:6000"))?;
    let (refused, moved) = std::thread::scope(|s| {
        let mover = s.spawn(|| lab.mig(0, &["move", "fz", "host-b"]));
        let frozen = wait_until(Duration::from_secs(30), || {
            lab.mig_json(0, &["inspect", "fz", "--json"])
                .is_ok_and(|d| d["state"] == "frozen")
        });
        let o = lab.mig(2, &["restore", "--import", tar]);
        (
            (frozen, o),
            mover
                .join()
                .map_err(|_| anyhow::anyhow!("the move thread panicked")),
        )
    });
    lab.fault(0, None)?;
    let ((frozen, o), moved) = (refused, moved?);
    ensure!(frozen, "fz was never seen frozen in its move");
    ensure!(
        o.code == 125
            && o.stderr.contains("host-a holds fz (being moved to host-b")
            && o.stderr.contains("nothing was restored"),
        "{o:?}"
    );
    ensure!(moved.code == 0, "the move failed: {moved:?}");
    running_on(&lab, 1, "fz")?;
    for host in [0, 2] {
        let all = lab.mig_json(host, &["ps", "-a", "--json"])?;
        let copies = all.as_array().map_or(0, |a| {
            a.iter()
                .filter(|c| c["name"] == "fz" && c["state"] != "exited")
                .count()
        });
        ensure!(copies == 0, "host {host} holds a copy too: {all}");
    }
    Ok(())
}

#[test]
fn a_userns_bridge_container_is_never_dumped() -> Result<()> {
    if !mig_tests::is_root("checkpoint_safety") {
        return Ok(());
    }
    let lab = Lab::up("cpub", 171)?;
    let tick = "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "ub", "--userns", "--net", "bridge", "busybox", "--", "sh",
            "-c", tick,
        ],
    )?;
    let pid = |lab: &Lab| running_on(lab, 0, "ub").map(|d| d["init_pid"].as_i64());
    let before = pid(&lab)?;
    let refused = |args: &[&str], op: &str| -> Result<()> {
        let o = lab.mig(0, args);
        ensure!(o.code != 0, "{args:?} succeeded");
        ensure!(
            o.stderr.contains(&format!("cannot {op} ub"))
                && o.stderr.contains("--userns")
                && o.stderr.contains("--net bridge")
                && o.stderr.contains("nothing was frozen"),
            "{args:?}: {}",
            o.stderr
        );
        ensure!(
            pid(&lab)? == before,
            "{args:?}: the container changed: {:?}",
            pid(&lab)?
        );
        Ok(())
    };
    refused(&["checkpoint", "ub"], "checkpoint")?;
    refused(&["checkpoint", "ub", "--leave-running"], "checkpoint")?;
    refused(&["move", "ub", "host-b"], "move")?;
    refused(&["move", "ub", "host-b", "--mode", "cold"], "move")?;
    let n = last_tick(&lab.mig(0, &["logs", "ub"]).stdout);
    ensure!(
        wait_until(Duration::from_secs(10), || last_tick(
            &lab.mig(0, &["logs", "ub"]).stdout
        ) > n + 2),
        "ub stopped counting"
    );
    ensure!(
        lab.mig(1, &["inspect", "ub", "--json"]).code != 0,
        "ub exists on host-b"
    );
    lab.mig_ok(0, &["rm", "-f", "ub"])?;
    Ok(())
}

/// An import whose container id has a directory here that no listed container owns (a
/// container arriving from another host has one before it is listed) takes another id, and
/// leaves that directory alone (QA, session 19: an import raced an arriving move, took its id,
/// and its failure removed the arriving container's directory).
#[test]
fn an_import_never_takes_the_directory_of_an_arriving_container() -> Result<()> {
    if !mig_tests::is_root("checkpoint tests") {
        return Ok(());
    }
    let lab = Lab::up("cpdir", 172)?;
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "orig", "busybox", "--", "sh", "-c", HOLDER,
        ],
    )?;
    let id = lab.mig_json(0, &["inspect", "orig", "--json"])?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("orig.tar");
    let archive_s = archive.to_str().context("path")?;
    lab.mig_ok(
        0,
        &[
            "checkpoint",
            "orig",
            "--leave-running",
            "--export",
            archive_s,
        ],
    )?;
    lab.mig_ok(0, &["rm", "-f", "orig"])?;
    // The id's directory exists and no listed container owns it, as an arriving container's.
    let arriving = lab.state_dir(0).join("containers").join(&id);
    std::fs::create_dir_all(&arriving)?;
    std::fs::write(arriving.join("marker"), b"arriving")?;
    let out = lab.mig(0, &["restore", "--import", archive_s, "--name", "copy"]);
    let marker = std::fs::read(arriving.join("marker")).ok();
    let copy = lab.mig_json(0, &["inspect", "copy", "--json"]);
    let _ = lab.mig(0, &["rm", "-f", "copy"]);
    let _ = std::fs::remove_dir_all(&arriving);
    // Earlier still: a move's Prepare reserved the id in its staging directory (`ARRIVING`:
    // id, name), and the container has no directory yet.
    let staging = lab.state_dir(0).join("migrations").join("0123abcd.in");
    std::fs::create_dir_all(&staging)?;
    std::fs::write(staging.join("ARRIVING"), format!("{id}\nelsewhere\n"))?;
    let reserved = lab.mig(0, &["restore", "--import", archive_s, "--name", "copy2"]);
    let copy2 = lab.mig_json(0, &["inspect", "copy2", "--json"]);
    let _ = lab.mig(0, &["rm", "-f", "copy2"]);
    let _ = std::fs::remove_dir_all(&staging);
    ensure!(reserved.code == 0, "the import failed: {reserved:?}");
    let copy2 = copy2?;
    ensure!(
        copy2["id"] != id.as_str(),
        "the import took a reserved id: {copy2}"
    );
    ensure!(out.code == 0, "the import failed: {out:?}");
    ensure!(
        marker.as_deref() == Some(&b"arriving"[..]),
        "the directory was touched"
    );
    let copy = copy?;
    ensure!(
        copy["id"] != id.as_str() && copy["state"] == "running",
        "{copy}"
    );
    Ok(())
}

/// An export of a container left running is one moment: its writable layer as it was while the
/// memory was dumped (QA of session 25: archived after the thaw, the file held lines that the
/// restored shell, its counter from the dump, then wrote again).
#[test]
fn an_export_left_running_is_one_moment() -> Result<()> {
    let agent = Agent::start("ckpt-moment")?;
    agent.import_busybox()?;
    agent.mig_ok(&[
        "run",
        "-d",
        "--name",
        "ap",
        "busybox",
        "--",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i >> /count; done",
    ])?;
    std::thread::sleep(Duration::from_secs(1));
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("ap.tar");
    let tar = tar.to_str().context("path")?;
    agent.mig_ok(&["checkpoint", "ap", "--leave-running", "--export", tar])?;
    agent.mig_ok(&["rm", "-f", "ap"])?;
    agent.mig_ok(&["restore", "--import", tar])?;
    std::thread::sleep(Duration::from_secs(1));
    let dups = agent.mig_ok(&[
        "exec",
        "ap",
        "--",
        "sh",
        "-c",
        "sort -n /count | uniq -d | head -n 3; wc -l < /count",
    ])?;
    let lines: Vec<&str> = dups.lines().collect();
    ensure!(
        lines.len() == 1,
        "lines written twice after the restore: {lines:?}"
    );
    agent.mig_ok(&["rm", "-f", "ap"])?;
    Ok(())
}
