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

use anyhow::{bail, Context, Result};
use mig_agent::lab::{self, LabConfig, LabHost};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A lab for one test, removed on drop.
struct Lab {
    name: String,
    hosts: Vec<LabHost>,
    _tmp: tempfile::TempDir,
    image_tar: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        mig_tests::lab_down_quietly(&self.name);
    }
}

impl Lab {
    fn up(tag: &str, third: u8) -> Result<Lab> {
        let name = format!("mv{}{tag}", std::process::id() % 100_000);
        let mut cfg = LabConfig::new(&name, 2, mig_tests::bin("migd"));
        cfg.subnet_base = [10, 214, third];
        cfg.extra_agent_args = vec!["--listen".into(), "{addr}:{port}".into()];
        let tmp = tempfile::tempdir()?;
        let rootfs = mig_tests::busybox_rootfs(tmp.path())?;
        let image_tar = mig_tests::tar_of(&rootfs, tmp.path(), "busybox.tar")?;
        let hosts = lab::up(&cfg).with_context(|| format!("lab up {name}"))?;
        let lab = Lab {
            name,
            hosts,
            _tmp: tmp,
            image_tar,
        };
        lab.mig_ok(
            0,
            &[
                "image",
                "import",
                &lab.image_tar.display().to_string(),
                "--name",
                "busybox",
            ],
        )?;
        Ok(lab)
    }

    fn mig(&self, host: usize, args: &[&str]) -> mig_tests::MigOutput {
        Command::new(mig_tests::bin("mig"))
            .arg("--socket")
            .arg(&self.hosts[host].socket)
            .args(args)
            .env_remove("MIG_HOST")
            .env_remove("MIG_SOCKET")
            .output()
            .expect("running mig")
            .into()
    }

    fn mig_ok(&self, host: usize, args: &[&str]) -> Result<String> {
        let o = self.mig(host, args);
        if o.code != 0 {
            bail!(
                "mig {args:?} on host {host} failed ({}): {}",
                o.code,
                o.stderr
            );
        }
        Ok(o.stdout)
    }

    fn mig_json(&self, host: usize, args: &[&str]) -> Result<Value> {
        Ok(serde_json::from_str(&self.mig_ok(host, args)?)?)
    }

    fn state_dir(&self, host: usize) -> &Path {
        &self.hosts[host].state_dir
    }

    /// Arms (or with `None` disarms) a fault hook in one agent (docs/migration.md).
    fn fault(&self, host: usize, fault: Option<&str>) -> Result<()> {
        let f = self.state_dir(host).join("mig-fault");
        match fault {
            Some(text) => std::fs::write(&f, text)?,
            None => {
                let _ = std::fs::remove_file(&f);
            }
        }
        Ok(())
    }

    fn restart(&mut self, host: usize) -> Result<()> {
        let h = lab::restart_agent(&self.name, &self.hosts[host].name.clone())?;
        self.hosts[host] = h;
        Ok(())
    }

    fn cgroup_parent(&self, host: usize) -> String {
        format!("mig-{}-{}", self.name, self.hosts[host].name)
    }

    /// Runs the test container on host `host`: `mb` MiB of random data in each of two processes.
    fn run_container(&self, host: usize, name: &str, mb: u32) -> Result<String> {
        let bytes = mb as u64 * 1_000_000;
        let script = format!(
            r#"d=$(head -c {bytes} /dev/urandom | base64 -w0); s=$(echo "$d" | md5sum)
i=0
while :; do
  i=$((i+1))
  if [ $((i % 4)) = 0 ]; then
    if [ "$(echo "$d" | md5sum)" = "$s" ]; then echo "parent $i OK" >&2; else echo "parent $i BAD" >&2; fi
  fi
  echo $i
  sleep 0.5
done | {{
  e=$(head -c {bytes} /dev/urandom | base64 -w0); t=$(echo "$e" | md5sum)
  while read n; do
    echo "$n" > /tmp/counter
    if [ $((n % 4)) = 2 ]; then
      if [ "$(echo "$e" | md5sum)" = "$t" ]; then echo "child $n OK"; else echo "child $n BAD"; fi
    fi
  done
}}"#
        );
        let id = self.mig_ok(
            host,
            &[
                "run", "-d", "--name", name, "busybox", "--", "sh", "-c", &script,
            ],
        )?;
        let id = id.trim().to_string();
        // Both processes hold their data once the first checks passed.
        let ok = mig_tests::wait_until(Duration::from_secs(60), || {
            let log = self.mig(host, &["logs", name]).stdout;
            log.contains(" OK")
                && log
                    .lines()
                    .any(|l| l.starts_with("parent") && l.ends_with("OK"))
        });
        if !ok {
            bail!(
                "the container never reported OK: {}",
                self.mig(host, &["logs", name]).stdout
            );
        }
        Ok(id)
    }
}

/// The highest counter in the OK lines of the log and whether any line says BAD.
fn log_state(log: &str) -> (u64, bool) {
    let max = log
        .lines()
        .filter(|l| l.ends_with(" OK"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .max()
        .unwrap_or(0);
    (max, log.contains("BAD"))
}

/// The in-namespace PIDs of a PID map.
fn ns_pids(v: &Value) -> BTreeSet<i64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["ns_pid"].as_i64())
        .collect()
}

/// Waits until the container on `host` logs OK lines beyond `after` and none BAD; returns the new
/// highest counter.
fn continues(lab: &Lab, host: usize, name: &str, after: u64) -> Result<u64> {
    let mut last = String::new();
    let ok = mig_tests::wait_until(Duration::from_secs(60), || {
        last = lab.mig(host, &["logs", name]).stdout;
        let (max, bad) = log_state(&last);
        bad || max > after + 2
    });
    let (max, bad) = log_state(&last);
    if !ok || bad {
        bail!("the container on host {host} did not continue intact after {after}: {last}");
    }
    Ok(max)
}

/// Nothing of container `id` on `host`: not listed, no directory, no mount, no cgroup, no
/// staging directory.
fn nothing_left(lab: &Lab, host: usize, id: &str) -> Result<()> {
    let ok = mig_tests::wait_until(Duration::from_secs(20), || {
        let listed = lab
            .mig_json(host, &["ps", "-a", "--json"])
            .map(|v| v.to_string().contains(id))
            .unwrap_or(true);
        let dir = lab.state_dir(host).join("containers").join(id).exists();
        let cg =
            !mig_tests::Agent::cgroup_dirs(&format!("{}/{id}", lab.cgroup_parent(host))).is_empty();
        let staging = std::fs::read_dir(lab.state_dir(host).join("migrations"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".in"));
        let mounts = mount_points(lab.hosts[host].agent_pid)
            .iter()
            .any(|m| m.starts_with(&lab.state_dir(host).display().to_string()) && m.contains(id));
        !(listed || dir || cg || staging || mounts)
    });
    if !ok {
        let staging: Vec<String> = std::fs::read_dir(lab.state_dir(host).join("migrations"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mounts: Vec<String> = mount_points(lab.hosts[host].agent_pid)
            .into_iter()
            .filter(|m| m.starts_with(&lab.state_dir(host).display().to_string()) && m.contains(id))
            .collect();
        bail!(
            "container {id} left something on host {host}: ps {:?}, dir {}, cgroups {:?}, migrations {staging:?}, mounts {mounts:?}",
            lab.mig(host, &["ps", "-a"]).stdout,
            lab.state_dir(host).join("containers").join(id).exists(),
            mig_tests::Agent::cgroup_dirs(&format!("{}/{id}", lab.cgroup_parent(host)))
        );
    }
    Ok(())
}

/// Mount points seen by the agent (its mount namespace), or by us.
fn mount_points(agent: Option<i32>) -> Vec<String> {
    let path = agent
        .map(|p| format!("/proc/{p}/mountinfo"))
        .unwrap_or_else(|| "/proc/self/mountinfo".into());
    std::fs::read_to_string(path)
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn running_on(lab: &Lab, host: usize, name: &str) -> Result<Value> {
    let v = lab.mig_json(host, &["inspect", name, "--json"])?;
    if v["state"] != "running" {
        bail!("{name} on host {host} is {}", v["state"]);
    }
    Ok(v)
}

/// Moves from `from` to `to` and checks PIDs, memory, counter and the source left clean.
fn move_and_check(lab: &Lab, from: usize, to: usize, name: &str, id: &str) -> Result<Value> {
    running_on(lab, from, name)?;
    let (count_before, _) = log_state(&lab.mig(from, &["logs", name]).stdout);
    let peer = lab.hosts[to].name.clone();
    let r = lab.mig_json(from, &["move", name, &peer, "--json"])?;
    for k in [
        "downtime_ms",
        "total_ms",
        "freeze_ms",
        "dump_ms",
        "transfer_ms",
        "restore_ms",
        "bytes_sent",
    ] {
        if !r[k].is_u64() {
            bail!("move output lacks {k}: {r}");
        }
    }
    assert_eq!(r["mode"], "cold");
    eprintln!(
        "moved {} -> {}: downtime {} ms, total {} ms, freeze {} dump {} transfer {} restore {} ms, {} bytes",
        lab.hosts[from].name, peer, r["downtime_ms"], r["total_ms"], r["freeze_ms"], r["dump_ms"],
        r["transfer_ms"], r["restore_ms"], r["bytes_sent"]
    );
    let after = running_on(lab, to, name)?;
    assert_eq!(after["host"], peer.as_str());
    // Every process dumped (read while frozen) came back with its in-namespace PID.
    let dumped = ns_pids(&r["pid_map_before"]);
    assert_eq!(
        dumped,
        ns_pids(&r["pid_map"]),
        "in-namespace PIDs changed: {r}"
    );
    assert!(dumped.contains(&1));
    // The shell init and the two sides of the pipe at least.
    assert!(dumped.len() >= 3, "too few processes: {r}");
    assert!(ns_pids(&after["pid_map"]).contains(&1), "{after}");
    continues(lab, to, name, count_before)?;
    let counter: u64 = lab
        .mig_ok(to, &["exec", name, "--", "cat", "/tmp/counter"])?
        .trim()
        .parse()?;
    assert!(
        counter >= count_before,
        "the counter went back: {counter} < {count_before}"
    );
    nothing_left(lab, from, id)?;
    Ok(r)
}

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
