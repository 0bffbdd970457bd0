//! A lab for end-to-end tests: simulated hosts made by `mig_agent::lab`, each with a real `migd`,
//! the busybox image, and the checks every migration test makes (memory intact, counter
//! continues, PIDs kept, nothing left behind).
//!
//! Every test's lab has its own subnet, 10.214.`third`.0/24. Ranges by test file, so tests of
//! different files can run at once: moves 1-19, faults 20-49, bench 60-69, api and rebalance
//! 70-79, networking 80-89, operations 90-99, security 100-109.

use anyhow::{bail, ensure, Context, Result};
use mig_agent::lab::{self, LabConfig, LabHost};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A lab for one test, removed on drop.
pub struct Lab {
    pub name: String,
    pub hosts: Vec<LabHost>,
    _tmp: tempfile::TempDir,
    pub image_tar: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        crate::lab_down_quietly(&self.name);
    }
}

impl Lab {
    /// A two-host lab (host-a, host-b) named from `tag` and the process id, on the subnet
    /// 10.214.`third`.0/24 (unique per test: see the table in this module's doc), with the
    /// busybox image imported on host-a.
    pub fn up(tag: &str, third: u8) -> Result<Lab> {
        Lab::up_n(tag, third, 2)
    }

    /// Like [`Lab::up`] with `hosts` hosts.
    pub fn up_n(tag: &str, third: u8, hosts: usize) -> Result<Lab> {
        Lab::up_from(tag, third, hosts, &crate::bin("migd"), &crate::bin("mig"))
    }

    /// A lab whose agents run `migd`; the busybox image is imported on host-a with `mig`.
    fn up_from(tag: &str, third: u8, hosts: usize, migd: &Path, mig: &Path) -> Result<Lab> {
        Lab::up_at(tag, [10, 214, third], hosts, migd, mig)
    }

    /// [`Lab::up_from`] on the subnet `base`.0/24.
    fn up_at(tag: &str, base: [u8; 3], hosts: usize, migd: &Path, mig: &Path) -> Result<Lab> {
        let name = format!("mv{}{tag}", std::process::id() % 100_000);
        let mut cfg = LabConfig::new(&name, hosts, migd.to_owned());
        cfg.subnet_base = base;
        cfg.extra_agent_args = vec!["--listen".into(), "{addr}:{port}".into()];
        let tmp = tempfile::tempdir()?;
        let rootfs = crate::busybox_rootfs(tmp.path())?;
        let image_tar = crate::tar_of(&rootfs, tmp.path(), "busybox.tar")?;
        let hosts = lab::up(&cfg).with_context(|| format!("lab up {name}"))?;
        let lab = Lab {
            name,
            hosts,
            _tmp: tmp,
            image_tar,
        };
        let tar = lab.image_tar.display().to_string();
        lab.mig_ok_with(mig, 0, &["image", "import", &tar, "--name", "busybox"])?;
        Ok(lab)
    }

    pub fn mig(&self, host: usize, args: &[&str]) -> crate::MigOutput {
        self.mig_with(&crate::bin("mig"), host, args)
    }

    pub fn mig_ok(&self, host: usize, args: &[&str]) -> Result<String> {
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

    pub fn mig_json(&self, host: usize, args: &[&str]) -> Result<Value> {
        Ok(serde_json::from_str(&self.mig_ok(host, args)?)?)
    }

    /// Runs `mig` on the lab as a whole (`MIG_LAB` set, no agent chosen): `rebalance`, `lab`.
    pub fn mig_lab(&self, args: &[&str]) -> crate::MigOutput {
        Command::new(crate::bin("mig"))
            .args(args)
            .env("MIG_LAB", &self.name)
            .env_remove("MIG_HOST")
            .env_remove("MIG_SOCKET")
            .output()
            .expect("running mig")
            .into()
    }

    /// [`Lab::mig_lab`] with `--json`, failing unless it exits 0: its output parsed.
    pub fn mig_lab_json(&self, args: &[&str]) -> Result<Value> {
        let o = self.mig_lab(args);
        ensure!(
            o.code == 0,
            "mig {args:?} failed ({}): {}",
            o.code,
            o.stderr
        );
        Ok(serde_json::from_str(&o.stdout)?)
    }

    pub fn state_dir(&self, host: usize) -> &Path {
        &self.hosts[host].state_dir
    }

    /// Whether one of `host`'s migration journals records `state` (`CommitSent`, `Committed`...).
    pub fn journaled(&self, host: usize, state: &str) -> bool {
        let quoted = format!("\"{state}\"");
        std::fs::read_dir(self.state_dir(host).join("migrations"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|j| j.contains(&quoted)))
    }

    /// Arms (or with `None` disarms) a fault hook in one agent (docs/migration.md).
    pub fn fault(&self, host: usize, fault: Option<&str>) -> Result<()> {
        let f = self.state_dir(host).join("mig-fault");
        match fault {
            Some(text) => std::fs::write(&f, text)?,
            None => {
                let _ = std::fs::remove_file(&f);
            }
        }
        Ok(())
    }

    pub fn restart(&mut self, host: usize) -> Result<()> {
        let h = lab::restart_agent(&self.name, &self.hosts[host].name.clone())?;
        self.hosts[host] = h;
        Ok(())
    }

    pub fn cgroup_parent(&self, host: usize) -> String {
        format!("mig-{}-{}", self.name, self.hosts[host].name)
    }

    /// Runs the test container on host `host`: `mb` MiB of random data in each of two processes.
    pub fn run_container(&self, host: usize, name: &str, mb: u32) -> Result<String> {
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
        let ok = crate::wait_until(Duration::from_secs(60), || {
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
pub fn log_state(log: &str) -> (u64, bool) {
    let max = log
        .lines()
        .filter(|l| l.ends_with(" OK"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .max()
        .unwrap_or(0);
    (max, log.contains("BAD"))
}

/// The in-namespace PIDs of a PID map.
pub fn ns_pids(v: &Value) -> BTreeSet<i64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["ns_pid"].as_i64())
        .collect()
}

/// Waits until the container on `host` logs OK lines beyond `after` and none BAD; returns the new
/// highest counter.
pub fn continues(lab: &Lab, host: usize, name: &str, after: u64) -> Result<u64> {
    let mut last = String::new();
    let ok = crate::wait_until(Duration::from_secs(60), || {
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
pub fn nothing_left(lab: &Lab, host: usize, id: &str) -> Result<()> {
    let ok = crate::wait_until(Duration::from_secs(20), || {
        let listed = lab
            .mig_json(host, &["ps", "-a", "--json"])
            .map(|v| v.to_string().contains(id))
            .unwrap_or(true);
        let dir = lab.state_dir(host).join("containers").join(id).exists();
        let cg =
            !crate::Agent::cgroup_dirs(&format!("{}/{id}", lab.cgroup_parent(host))).is_empty();
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
            crate::Agent::cgroup_dirs(&format!("{}/{id}", lab.cgroup_parent(host)))
        );
    }
    Ok(())
}

/// Mount points seen by the agent (its mount namespace), or by us.
pub fn mount_points(agent: Option<i32>) -> Vec<String> {
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

/// A counter in the log of `name` on `host`, one number per line: the highest value seen.
pub fn last_tick(lab: &Lab, host: usize, name: &str) -> u64 {
    lab.mig(host, &["logs", name])
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the counter `name` on `host` counted a few ticks past `after`; returns the last.
pub fn ticks_past(lab: &Lab, host: usize, name: &str, after: u64) -> Result<u64> {
    let mut last = 0;
    if !crate::wait_until(Duration::from_secs(30), || {
        last = last_tick(lab, host, name);
        last > after + 2
    }) {
        bail!(
            "{name} on host {host} stopped counting after {after}: {}",
            lab.mig(host, &["logs", name]).stdout
        );
    }
    Ok(last)
}

pub fn running_on(lab: &Lab, host: usize, name: &str) -> Result<Value> {
    let v = lab.mig_json(host, &["inspect", name, "--json"])?;
    if v["state"] != "running" {
        bail!("{name} on host {host} is {}", v["state"]);
    }
    Ok(v)
}

/// Moves from `from` to `to` and checks PIDs, memory, counter and the source left clean.
pub fn move_and_check(lab: &Lab, from: usize, to: usize, name: &str, id: &str) -> Result<Value> {
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
    assert_eq!(r["mode"], "stream", "the default mode: {r}");
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
    // The shell rewrites the file every half second (`>` truncates first): a read can find it
    // empty.
    let mut counter = None;
    for _ in 0..10 {
        let text = lab.mig_ok(to, &["exec", name, "--", "cat", "/tmp/counter"])?;
        if let Ok(n) = text.trim().parse::<u64>() {
            counter = Some(n);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let counter = counter.ok_or_else(|| anyhow::anyhow!("/tmp/counter never held a number"))?;
    assert!(
        counter >= count_before,
        "the counter went back: {counter} < {count_before}"
    );
    nothing_left(lab, from, id)?;
    pages_spent(lab, to, id)?;
    Ok(r)
}

/// The page images of container `id`'s restored image set on `host` are gone once its memory
/// has all arrived (they held it once per process for the container's lifetime).
pub fn pages_spent(lab: &Lab, host: usize, id: &str) -> Result<()> {
    let dir = lab
        .state_dir(host)
        .join("containers")
        .join(id)
        .join("checkpoint");
    let pages = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("pages-") && n.ends_with(".img"))
            .collect()
    };
    if !crate::wait_until(Duration::from_secs(60), || pages().is_empty()) {
        bail!("{} still holds page images: {:?}", dir.display(), pages());
    }
    Ok(())
}

// ---- Faults and hygiene (tests/tests/faults.rs) ----

impl Lab {
    /// Takes host `host`'s link to the lab switch down (`up == false`) or up again: the veth end
    /// named after the host in the switch namespace (`<lab>-sw`), as `mig_agent::lab` makes it.
    pub fn link(&self, host: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        self.in_switch(&["ip", "link", "set", &self.hosts[host].name, state])
    }

    /// Limits what the lab's switch sends to host `host` to `rate` (tc's words, e.g. `200mbit`):
    /// a transfer to it then lasts long enough for a test to act during it. The switch's
    /// namespace, and the limit with it, goes with the lab.
    pub fn throttle_to(&self, host: usize, rate: &str) -> Result<()> {
        let dev = &self.hosts[host].name;
        self.in_switch(&[
            "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mbit",
            "latency", "200ms",
        ])
    }

    /// Runs `cmd` in the lab's switch namespace.
    fn in_switch(&self, cmd: &[&str]) -> Result<()> {
        let sw = format!("{}-sw", self.name);
        let o = Command::new("ip")
            .args(["netns", "exec", &sw])
            .args(cmd)
            .output()?;
        if !o.status.success() {
            bail!(
                "{}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    }

    /// SIGKILLs host `host`'s agent (the PID the lab started) and waits until it is gone; its
    /// containers' shims live on. [`Lab::restart`] starts it again.
    pub fn kill_agent(&self, host: usize) -> Result<()> {
        let Some(pid) = self.hosts[host].agent_pid else {
            bail!("host {host} has no agent");
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        if !crate::wait_until(Duration::from_secs(10), || !agent_alive(pid)) {
            bail!("agent {pid} survived SIGKILL");
        }
        Ok(())
    }

    /// Waits until host `host`'s agent is gone (say, after a `kill` fault) and starts it again.
    pub fn restart_after_crash(&mut self, host: usize) -> Result<()> {
        if let Some(pid) = self.hosts[host].agent_pid {
            if !crate::wait_until(Duration::from_secs(30), || !agent_alive(pid)) {
                bail!("agent {pid} of host {host} did not die");
            }
        }
        self.restart(host)
    }
}

/// PIDs of `criu lazy-pages` processes working under `dir` (a lab host's state directory).
pub fn lazy_daemons_under(dir: &std::path::Path) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.contains(&&b"lazy-pages"[..]) && args.iter().any(|a| a.starts_with(dir))
        })
        .collect()
}

/// Whether `pid` is a live (not zombie) process.
fn agent_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// What one agent holds: compared before and after a move to find leaks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    /// The agent's PID (fds are only comparable for the same process).
    pub agent_pid: Option<i32>,
    /// Open descriptors of the agent (`/proc/PID/fd`), pidfds aside.
    pub fds: usize,
    /// Mounts under the agent's state directory.
    pub mounts: usize,
    /// Cgroup directories under the agent's cgroup parent, in every hierarchy.
    pub cgroups: usize,
    /// Distinct network namespaces of the processes in the agent's cgroups and tree, besides the
    /// host's own.
    pub netns: usize,
    /// Processes in the agent's tree (children, shims, CRIU) and its cgroups.
    pub procs: usize,
    /// Temporary files and work directories under the state directory (`*.tmp*`, staging `*.in`,
    /// `containers/*/migration`).
    pub temp_files: usize,
    /// For messages: the processes (`pid comm`) and the descriptors' targets.
    pub detail: Vec<String>,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fds {} mounts {} cgroups {} netns {} procs {} temp {}",
            self.fds, self.mounts, self.cgroups, self.netns, self.procs, self.temp_files
        )
    }
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn netns_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.display().to_string())
}

fn count_dirs(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += 1;
                stack.push(e.path());
            }
        }
    }
    n
}

fn pids_in_cgroups(dirs: &[PathBuf]) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(d) = stack.pop() {
        if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

fn temp_files(state_dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![state_dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            let in_containers = d.parent() == Some(&state_dir.join("containers"));
            if name.contains(".tmp")
                || (is_dir && name.ends_with(".in"))
                || (in_containers && name == "migration")
            {
                n += 1;
            }
            // Not into container root filesystems (mounted) or image layers (big, never temp).
            if is_dir && !matches!(name.as_str(), "rootfs" | "layers" | "upper" | "work") {
                stack.push(e.path());
            }
        }
    }
    n
}

/// What host `host`'s agent holds now (see [`Usage`]).
pub fn usage(lab: &Lab, host: usize) -> Usage {
    let agent = lab.hosts[host].agent_pid;
    let state = lab.state_dir(host).display().to_string();
    // pidfds track the agent's own children (shims it started and reaps), counted as processes.
    let fds = agent
        .and_then(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.display().to_string() != "anon_inode:[pidfd]")
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0);
    let mounts = mount_points(None)
        .iter()
        .filter(|m| m.starts_with(&state))
        .count();
    let cg_dirs = crate::Agent::cgroup_dirs(&lab.cgroup_parent(host));
    let cgroups = cg_dirs.iter().map(|d| count_dirs(d)).sum();
    let mut procs = pids_in_cgroups(&cg_dirs);
    if let Some(a) = agent {
        let pids = all_pids();
        let parents: Vec<(i32, Option<i32>)> = pids.iter().map(|&p| (p, ppid(p))).collect();
        let mut tree: BTreeSet<i32> = BTreeSet::from([a]);
        loop {
            let before = tree.len();
            for (p, pp) in &parents {
                if pp.is_some_and(|pp| tree.contains(&pp)) {
                    tree.insert(*p);
                }
            }
            if tree.len() == before {
                break;
            }
        }
        tree.remove(&a);
        procs.extend(tree);
    }
    let host_ns = agent.and_then(netns_of);
    let netns = procs
        .iter()
        .filter_map(|&p| netns_of(p))
        .filter(|n| Some(n) != host_ns.as_ref())
        .collect::<BTreeSet<_>>()
        .len();
    let mut detail: Vec<String> = procs
        .iter()
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            format!("{p} {}", comm.trim())
        })
        .collect();
    if let Some(p) = agent {
        detail.extend(
            std::fs::read_dir(format!("/proc/{p}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| format!("fd {}", t.display())),
        );
    }
    Usage {
        detail,
        agent_pid: agent,
        fds,
        mounts,
        cgroups,
        netns,
        procs: procs.len(),
        temp_files: temp_files(lab.state_dir(host)),
    }
}

/// What grew from `before` to `after` (descriptors only when the agent is the same process).
pub fn leaks(before: &Usage, after: &Usage) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |what: &str, b: usize, a: usize| {
        if a > b {
            out.push(format!("{what} {b} -> {a}"));
        }
    };
    if before.agent_pid == after.agent_pid {
        cmp("fds", before.fds, after.fds);
    }
    cmp("mounts", before.mounts, after.mounts);
    cmp("cgroups", before.cgroups, after.cgroups);
    cmp("netns", before.netns, after.netns);
    cmp("procs", before.procs, after.procs);
    cmp("temp files", before.temp_files, after.temp_files);
    out
}

/// Waits (up to 20 s: the agents finish in the background) until no host holds more than in
/// `before`; fails with what leaked.
pub fn no_leaks(lab: &Lab, before: &[Usage]) -> Result<()> {
    let mut found = Vec::new();
    let ok = crate::wait_until(Duration::from_secs(20), || {
        found = before
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                leaks(b, &usage(lab, i))
                    .into_iter()
                    .map(move |l| format!("{}: {l}", i))
            })
            .collect();
        found.is_empty()
    });
    if !ok {
        let now: Vec<Vec<String>> = (0..before.len()).map(|i| usage(lab, i).detail).collect();
        let then: Vec<&Vec<String>> = before.iter().map(|b| &b.detail).collect();
        bail!("leaked: {found:?}; before {then:?}; now {now:?}");
    }
    Ok(())
}

/// A tmpfs mounted over a directory; unmounted (lazily) and removed on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on `path` (made if missing).
    pub fn mount(path: &Path, bytes: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={bytes},mode=0700").as_str()),
        )
        .with_context(|| format!("mounting a tmpfs on {}", path.display()))?;
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A lab one of whose hosts keeps its state on a small tmpfs (a small disk). Field order makes
/// the lab go down before the tmpfs is unmounted.
pub struct DiskLab {
    pub lab: Lab,
    pub disk: Tmpfs,
}

impl DiskLab {
    /// [`Lab::up`], then host `host`'s agent is stopped, its state directory moved onto a tmpfs of
    /// `bytes`, and the agent started again.
    pub fn up(tag: &str, third: u8, host: usize, bytes: u64) -> Result<DiskLab> {
        let lab = Lab::up(tag, third)?;
        lab.kill_agent(host)?;
        let state = lab.state_dir(host).to_owned();
        let keep = state.with_extension("orig");
        std::fs::rename(&state, &keep)?;
        let disk = Tmpfs::mount(&state, bytes)?;
        let st = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", keep.display()))
            .arg(&state)
            .status()?;
        if !st.success() {
            bail!("copying the state directory onto the tmpfs failed");
        }
        std::fs::remove_dir_all(&keep)?;
        let mut dl = DiskLab { lab, disk };
        dl.lab.restart(host)?;
        Ok(dl)
    }
}

impl std::ops::Deref for DiskLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

// ---- Modes (tests/tests/modes.rs) ----

/// Like [`move_and_check`] with `mig move` options (`--mode stream`, `--max-downtime 500`...):
/// checks PIDs, memory, counter and the source left clean, and that the move used `mode`.
pub fn move_and_check_with(
    lab: &Lab,
    from: usize,
    to: usize,
    name: &str,
    id: &str,
    options: &[&str],
    mode: &str,
) -> Result<Value> {
    running_on(lab, from, name)?;
    let (count_before, _) = log_state(&lab.mig(from, &["logs", name]).stdout);
    let peer = lab.hosts[to].name.clone();
    let mut args = vec!["move", name, &peer, "--json"];
    args.extend_from_slice(options);
    let r = lab.mig_json(from, &args)?;
    if r["mode"] != mode {
        bail!("the move used mode {} instead of {mode}: {r}", r["mode"]);
    }
    if !r["predicted_downtime_ms"].is_u64() || !r["downtime_ms"].is_u64() {
        bail!("move output lacks the prediction or the downtime: {r}");
    }
    eprintln!(
        "moved ({mode}) {} -> {}: downtime {} ms (predicted {}), total {} ms, dump {} transfer {} restore {} ms, {} bytes ({} of pages through the tunnel), post-copy {} ms",
        lab.hosts[from].name, peer, r["downtime_ms"], r["predicted_downtime_ms"], r["total_ms"],
        r["dump_ms"], r["transfer_ms"], r["restore_ms"], r["bytes_sent"], r["page_bytes"], r["postcopy_ms"]
    );
    let after = running_on(lab, to, name)?;
    assert_eq!(after["host"], peer.as_str());
    let dumped = ns_pids(&r["pid_map_before"]);
    assert_eq!(
        dumped,
        ns_pids(&r["pid_map"]),
        "in-namespace PIDs changed: {r}"
    );
    assert!(dumped.contains(&1));
    assert!(dumped.len() >= 3, "too few processes: {r}");
    continues(lab, to, name, count_before)?;
    nothing_left(lab, from, id)?;
    Ok(r)
}

// ---- Upgrades: agents of another build (tests/tests/upgrade.rs) ----

impl Lab {
    /// Like [`Lab::up_n`], with every host's agent started from `migd` (another build's, say
    /// mig 0.1.0's); the busybox image is imported on host-a with the `mig` next to `migd`.
    pub fn up_with(tag: &str, third: u8, hosts: usize, migd: &Path) -> Result<Lab> {
        Lab::up_from(tag, third, hosts, migd, &migd.with_file_name("mig"))
    }

    /// Runs the `mig` binary `mig` (another build's) against host `host`'s agent.
    pub fn mig_with(&self, mig: &Path, host: usize, args: &[&str]) -> crate::MigOutput {
        Command::new(mig)
            .arg("--socket")
            .arg(&self.hosts[host].socket)
            .args(args)
            .env_remove("MIG_HOST")
            .env_remove("MIG_SOCKET")
            .output()
            .expect("running mig")
            .into()
    }

    /// [`Lab::mig_with`], failing unless it exits 0; returns its stdout.
    pub fn mig_ok_with(&self, mig: &Path, host: usize, args: &[&str]) -> Result<String> {
        let o = self.mig_with(mig, host, args);
        if o.code != 0 {
            bail!(
                "{} {args:?} on host {host} failed ({}): {}",
                mig.display(),
                o.code,
                o.stderr
            );
        }
        Ok(o.stdout)
    }

    /// Stops host `host`'s agent (its containers live on) and starts `migd` (another build's) on
    /// the same state directory, socket and address: an in-place upgrade or downgrade. The lab
    /// keeps starting its own `migd` for the other hosts and later restarts.
    pub fn restart_with(&mut self, host: usize, migd: &Path) -> Result<()> {
        let mut file = lab::read_lab_file(&self.name)?;
        let own = std::mem::replace(&mut file.migd, migd.to_owned());
        write_lab_file(&file)?;
        let restarted = lab::restart_agent(&self.name, &self.hosts[host].name.clone());
        // Re-read: the restart recorded the new agent's PID.
        let mut file = lab::read_lab_file(&self.name)?;
        file.migd = own;
        write_lab_file(&file)?;
        self.hosts[host] = restarted?;
        Ok(())
    }
}

/// Writes the lab file of `file.name` (as `mig_agent::lab` does: a temporary file renamed over it).
fn write_lab_file(file: &lab::LabFile) -> Result<()> {
    let path = lab::lab_file_path(&file.name);
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(file)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

// ---- Labs on a subnet outside 10.214 (tests/tests/netns.rs) ----

impl Lab {
    /// Like [`Lab::up_n`] on the subnet `base`.0/24 (for example `[10, 79, 71]`) instead of
    /// 10.214.`third`.0/24.
    pub fn up_on(tag: &str, base: [u8; 3], hosts: usize) -> Result<Lab> {
        Lab::up_at(tag, base, hosts, &crate::bin("migd"), &crate::bin("mig"))
    }
}

/// `mig events --json` on a lab host, into a file, until dropped.
pub struct Events {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl Events {
    /// Subscribes to `host`'s events.
    pub fn follow(lab: &Lab, host: usize) -> Result<Events> {
        let out = tempfile::NamedTempFile::new()?;
        let child = Command::new(crate::bin("mig"))
            .arg("--socket")
            .arg(&lab.hosts[host].socket)
            .args(["events", "--json"])
            .env_remove("MIG_HOST")
            .env_remove("MIG_SOCKET")
            .stdin(std::process::Stdio::null())
            .stdout(out.reopen()?)
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting mig events")?;
        // The subscription is in place once the client read its answer.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Events { child, out })
    }

    /// The events of type `ty` (`migration_done`, ...) so far.
    pub fn of_type(&self, ty: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.out.path()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["type"] == ty)
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
