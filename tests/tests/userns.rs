//! `--userns` containers behave like the others inside: their root owns the image's files
//! (idmapped image layers, runtime/src/container/userns.rs), across a move in the default mode, a
//! cold move back, and a checkpoint exported and imported again. Lab `un`, subnet 10.79.62.0/24.
//!
//! Needs root and real CRIU. The lab guard removes every agent, process, mount, cgroup and netns
//! whatever happens; each test also checks that nothing grew on any host.

use anyhow::{bail, ensure, Context, Result};
use mig_tests::lab::{self, Lab, Usage};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

const SUBNET: [u8; 3] = [10, 79, 62];

/// Writes into directories of the image (the busybox image's `/etc` and `/root`, owned by the
/// host's root in its layer) as the container's root, then counts: "tick N OK" lines on the
/// log, the count in `/tmp/counter` and in `/etc/mig-counter` (three processes: the init, the
/// counting loop and the reading loop).
const SCRIPT: &str = r#"if echo made > /etc/mig-test && mkdir -p /root/x/y && echo app:x:1000:1000::/:/bin/sh >> /etc/passwd; then echo "writes 0 OK"; else echo "writes BAD"; fi
i=0
while :; do i=$((i+1)); echo $i; sleep 0.3; done | while read n; do
  echo $n > /tmp/counter
  if echo $n > /etc/mig-counter; then echo "tick $n OK"; else echo "tick $n BAD"; fi
done"#;

/// The directory of container `id` on `host`.
fn container_dir(lab: &Lab, host: usize, id: &str) -> PathBuf {
    lab.state_dir(host).join("containers").join(id)
}

/// The owner (uid, gid) of `path` in the container's writable layer on `host`.
fn upper_owner(lab: &Lab, host: usize, id: &str, path: &str) -> Result<(u32, u32)> {
    let p = container_dir(lab, host, id)
        .join("upper")
        .join(path.trim_start_matches('/'));
    let m = std::fs::symlink_metadata(&p).with_context(|| format!("{}", p.display()))?;
    Ok((m.uid(), m.gid()))
}

/// The host id the container's root maps to, from its init's `uid_map` (`0 HOST 65536`), after
/// checking the gid map is the same.
fn mapped_root(lab: &Lab, host: usize, name: &str) -> Result<u32> {
    let v = lab::running_on(lab, host, name)?;
    let pid = v["pid_map"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["ns_pid"] == 1)
        .and_then(|e| e["host_pid"].as_i64())
        .with_context(|| format!("no init in the pid map: {v}"))?;
    let read = |f: &str| -> Result<Vec<String>> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/{f}"))?;
        Ok(s.split_whitespace().map(str::to_owned).collect())
    };
    let (uid, gid) = (read("uid_map")?, read("gid_map")?);
    ensure!(uid == gid, "uid and gid maps differ: {uid:?} {gid:?}");
    ensure!(uid.len() == 3 && uid[0] == "0", "unexpected map {uid:?}");
    let root: u32 = uid[1].parse()?;
    ensure!(root != 0, "container root is host root");
    // `mig inspect` gives the same map.
    let shown = &v["id_map"];
    let size: u64 = uid[2].parse()?;
    ensure!(
        shown["host_id"] == root && shown["size"] == size,
        "inspect shows the map {shown}, the kernel {uid:?}"
    );
    Ok(root)
}

/// `mig exec NAME -- sh -c SCRIPT` on `host`; its stdout.
fn sh(lab: &Lab, host: usize, name: &str, script: &str) -> Result<String> {
    lab.mig_ok(host, &["exec", name, "--", "sh", "-c", script])
}

/// The container can write into the image's directories on `host` now (as its root, which owns
/// them), and what it writes belongs to its mapped root on the host.
fn writes_into_image_dirs(lab: &Lab, host: usize, id: &str, name: &str, tag: &str) -> Result<()> {
    let root = mapped_root(lab, host, name)?;
    // Inside, the image's directories and files belong to root, as without a user namespace.
    let owners = sh(lab, host, name, "stat -c %u:%g /etc /root /bin/busybox")?;
    ensure!(
        owners.split_whitespace().all(|o| o == "0:0"),
        "owners inside on host {host}: {owners:?}"
    );
    let made = format!("/etc/mig-{tag}");
    let dir = format!("/root/x/{tag}");
    sh(
        lab,
        host,
        name,
        &format!("echo {tag} > {made} && mkdir {dir} && echo ok > {dir}/f"),
    )?;
    ensure!(sh(lab, host, name, &format!("cat {made}"))?.trim() == tag);
    for p in [
        made.as_str(),
        &dir,
        &format!("{dir}/f"),
        "/etc",
        "/etc/mig-test",
    ] {
        ensure!(
            upper_owner(lab, host, id, p)? == (root, root),
            "{p} in the writable layer on host {host} is not owned by {root}"
        );
    }
    Ok(())
}

/// Only the rootfs of each running container is mounted under the agent's state directory:
/// no idmapped layer and no staging directory stayed behind.
fn only_rootfs_mounts(lab: &Lab, host: usize, ids: &[&str]) -> Result<()> {
    let state = lab.state_dir(host).display().to_string();
    let mut found: Vec<String> = lab::mount_points(lab.hosts[host].agent_pid)
        .into_iter()
        .filter(|m| m.starts_with(&state))
        .collect();
    found.sort();
    let mut want: Vec<String> = ids
        .iter()
        .map(|id| {
            container_dir(lab, host, id)
                .join("rootfs")
                .display()
                .to_string()
        })
        .collect();
    want.sort();
    ensure!(
        found == want,
        "mounts on host {host}: {found:?}, want {want:?}"
    );
    for id in ids {
        let staging = container_dir(lab, host, id).join("rootfs.layers");
        ensure!(!staging.exists(), "{} is left", staging.display());
    }
    Ok(())
}

/// The in-namespace PIDs of the container's long-lived processes (not the loop's `sleep`).
fn stable_pids(v: &Value) -> BTreeSet<i64> {
    v["pid_map"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| !e["cmd"].as_str().unwrap_or_default().starts_with("sleep"))
        .filter_map(|e| e["ns_pid"].as_i64())
        .collect()
}

/// The lasting in-namespace PIDs of container `name` on `host`: two reads 400 ms apart that
/// agree. The loop forks a child every 0.3 s; between its fork and its exec of `sleep` it is a
/// `sh` that no read should count (CI once saw one, PID 21, right after a restore).
fn settled_pids(lab: &Lab, host: usize, name: &str) -> Result<BTreeSet<i64>> {
    let mut last = stable_pids(&lab::running_on(lab, host, name)?);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(400));
        let now = stable_pids(&lab::running_on(lab, host, name)?);
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    bail!("the PIDs of {name} never settled: last {last:?}")
}

fn usages(lab: &Lab) -> Vec<Usage> {
    (0..lab.hosts.len()).map(|h| lab::usage(lab, h)).collect()
}

/// Starts the test container `name` on host-a; its id once it wrote into the image and ticked.
fn start(lab: &Lab, name: &str) -> Result<String> {
    let id = lab
        .mig_ok(
            0,
            &[
                "run", "-d", "--userns", "--name", name, "busybox", "--", "sh", "-c", SCRIPT,
            ],
        )?
        .trim()
        .to_string();
    let ok = mig_tests::wait_until(Duration::from_secs(30), || {
        let log = lab.mig(0, &["logs", name]).stdout;
        log.contains("BAD") || lab::log_state(&log).0 > 2
    });
    let log = lab.mig(0, &["logs", name]).stdout;
    ensure!(ok && !log.contains("BAD"), "the container's writes: {log}");
    Ok(id)
}

#[test]
fn userns_writes_into_image_dirs_across_moves() -> Result<()> {
    if !mig_tests::is_root("userns tests") {
        return Ok(());
    }
    let mut guard = Lab::up_on("un", SUBNET, 2)?;
    let lab = &guard;
    let before = usages(lab);
    let id = start(lab, "u")?;
    let root = mapped_root(lab, 0, "u")?;
    for p in [
        "/etc/mig-test",
        "/etc/passwd",
        "/root/x/y",
        "/etc/mig-counter",
    ] {
        ensure!(
            upper_owner(lab, 0, &id, p)? == (root, root),
            "{p} in the writable layer is not owned by the mapped root {root}"
        );
    }
    writes_into_image_dirs(lab, 0, &id, "u", "a0")?;
    only_rootfs_mounts(lab, 0, &[&id])?;

    // The default mode (stream): PIDs kept, still counting, the source left clean.
    lab::move_and_check(lab, 0, 1, "u", &id)?;
    ensure!(mapped_root(lab, 1, "u")? == root, "the map changed");
    writes_into_image_dirs(lab, 1, &id, "u", "b1")?;
    only_rootfs_mounts(lab, 1, &[&id])?;

    // Back in cold mode.
    let (count, _) = lab::log_state(&lab.mig(1, &["logs", "u"]).stdout);
    let peer = lab.hosts[0].name.clone();
    let r: Value = lab.mig_json(1, &["move", "u", &peer, "--mode", "cold", "--json"])?;
    ensure!(r["mode"] == "cold", "{r}");
    let dumped = lab::ns_pids(&r["pid_map_before"]);
    ensure!(
        dumped.contains(&1) && dumped.len() >= 3 && dumped == lab::ns_pids(&r["pid_map"]),
        "in-namespace PIDs changed: {r}"
    );
    lab::continues(lab, 0, "u", count)?;
    lab::nothing_left(lab, 1, &id)?;
    writes_into_image_dirs(lab, 0, &id, "u", "a2")?;
    ensure!(sh(lab, 0, "u", "cat /etc/mig-b1 /root/x/b1/f")? == "b1\nok\n");
    only_rootfs_mounts(lab, 0, &[&id])?;

    // The agent crashes and comes back: the container lives on (its shim holds the rootfs), and
    // the checkpoint and restores below mount its rootfs again.
    guard.kill_agent(0)?;
    guard.restart(0)?;
    let lab = &guard;
    writes_into_image_dirs(lab, 0, &id, "u", "a3")?;
    only_rootfs_mounts(lab, 0, &[&id])?;

    checkpoint_and_import(lab, &id, root)?;
    lab::no_leaks(lab, &before)
}

/// The container `u` (id `id`, mapped root `root`) on host-a checkpointed and restored in place,
/// then exported, removed and imported again under the name `u2`; removed at the end.
fn checkpoint_and_import(lab: &Lab, id: &str, root: u32) -> Result<()> {
    // In place: checkpoint (the container stops) and restore.
    let (count, _) = lab::log_state(&lab.mig(0, &["logs", "u"]).stdout);
    let pids = settled_pids(lab, 0, "u")?;
    ensure!(pids.contains(&1) && pids.len() >= 3, "{pids:?}");
    lab.mig_ok(0, &["checkpoint", "u"])?;
    // A shim that died between staging idmapped layers and detaching them (kernels whose
    // overlay takes only paths) leaves mounts in `rootfs.layers`: the next mount detaches them.
    let _left = Leftover::make(lab, container_dir(lab, 0, id))?;
    lab.mig_ok(0, &["restore", "u"])?;
    let after = settled_pids(lab, 0, "u")?;
    ensure!(after == pids, "PIDs changed: {pids:?} -> {after:?}");
    let count = lab::continues(lab, 0, "u", count)?;
    writes_into_image_dirs(lab, 0, id, "u", "a1")?;
    only_rootfs_mounts(lab, 0, &[id])?;

    // Exported, removed (its id range is free again) and imported under another name: CRIU,
    // as the container's mapped root, reads the imported images.
    let tmp = tempfile::tempdir()?;
    let archive = tmp.path().join("u.tar.zst");
    let archive_s = archive.to_str().context("path")?;
    lab.mig_ok(0, &["checkpoint", "u", "--export", archive_s])?;
    lab.mig_ok(0, &["rm", "-f", "u"])?;
    lab::nothing_left(lab, 0, id)?;
    let id2 = lab
        .mig_ok(0, &["restore", "--import", archive_s, "--name", "u2"])?
        .trim()
        .to_string();
    let v = lab::running_on(lab, 0, "u2")?;
    let id2 = v["id"].as_str().map(str::to_owned).unwrap_or(id2);
    let after = settled_pids(lab, 0, "u2")?;
    ensure!(after == pids, "PIDs changed: {pids:?} -> {after:?}");
    ensure!(mapped_root(lab, 0, "u2")? == root, "the map changed");
    lab::continues(lab, 0, "u2", count)?;
    ensure!(sh(lab, 0, "u2", "cat /etc/mig-a1 /root/x/a1/f")? == "a1\nok\n");
    writes_into_image_dirs(lab, 0, &id2, "u2", "i2")?;
    only_rootfs_mounts(lab, 0, &[&id2])?;

    // Removing a stopped container (its rootfs not mounted) detaches such leftovers too.
    lab.mig_ok(0, &["checkpoint", "u2"])?;
    let _left = Leftover::make(lab, container_dir(lab, 0, &id2))?;
    lab.mig_ok(0, &["rm", "-f", "u2"])?;
    lab::nothing_left(lab, 0, &id2)
}

/// Two stacked tmpfs mounts at `CONTAINER_DIR/rootfs.layers/0` in the agent's mount namespace,
/// as a crash would leave idmapped layers; detached on drop if the agent did not.
struct Leftover {
    agent: i32,
    path: PathBuf,
}

impl Leftover {
    fn make(lab: &Lab, container_dir: PathBuf) -> Result<Leftover> {
        let path = container_dir.join("rootfs.layers/0");
        std::fs::create_dir_all(&path)?;
        let agent = lab.hosts[0].agent_pid.context("no agent")?;
        let left = Leftover { agent, path };
        for _ in 0..2 {
            left.nsenter(&["mount", "-t", "tmpfs", "leftover"])?;
        }
        Ok(left)
    }

    fn nsenter(&self, cmd: &[&str]) -> Result<()> {
        let o = std::process::Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.agent))
            .args(cmd)
            .arg(&self.path)
            .output()?;
        ensure!(o.status.success(), "{cmd:?}: {o:?}");
        Ok(())
    }
}

impl Drop for Leftover {
    fn drop(&mut self) {
        while self.path.exists() && self.nsenter(&["umount", "-l"]).is_ok() {}
    }
}
