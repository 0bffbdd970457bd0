//! CPU affinity across a checkpoint. CRIU 4.2.1 neither dumps nor restores the tasks' CPU masks:
//! a process pinned inside the container (`taskset`) ran on every CPU after a restore or a move.
//! The masks of the frozen tasks that are narrower than the host's online CPUs are kept in the
//! image set ([`FILE`], so they travel and are verified with it) and set again on the restored
//! tasks, matched by their thread ids inside the container, which CRIU keeps.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// In an image set: the narrowed masks, a JSON list of [`TaskCpus`].
pub const FILE: &str = "mig-affinity.json";
/// Largest file read back (a task is a few dozen bytes).
const MAX_FILE: u64 = 4 << 20;

/// One task's mask: its thread id inside the container and the CPUs it may run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskCpus {
    pub ns_tid: i32,
    pub cpus: Vec<usize>,
}

/// What [`restore`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Tasks whose mask was set.
    pub set: usize,
    /// Saved masks left unset: no restored task of that id, none of its CPUs online here, or
    /// the kernel refused.
    pub skipped: usize,
}

/// The CPUs this host has online (`/sys/devices/system/cpu/online`, e.g. `0-3,6`).
pub fn online_cpus() -> Vec<usize> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| parse_cpu_list(&s))
        .unwrap_or_default()
}

/// A kernel CPU list (`0-3,6`) as CPU numbers; malformed parts are skipped.
fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) {
            if hi >= lo && hi < CpuSet::count() {
                out.extend(lo..=hi);
            }
        }
    }
    out
}

/// The threads of host process `pid` with their ids inside the innermost PID namespace.
fn tasks(pid: i32) -> Vec<(i32, i32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            Some((tid, crate::pidmap::innermost_ns_pid(&status)?))
        })
        .collect()
}

fn cpus_of(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Every task (thread) of the processes `host_pids` whose mask leaves out one of the host's
/// online CPUs, by thread id inside the container.
pub fn narrowed(host_pids: &[i32]) -> Vec<TaskCpus> {
    let online = online_cpus();
    let mut out: Vec<TaskCpus> = host_pids
        .iter()
        .flat_map(|&p| tasks(p))
        .filter_map(|(tid, ns_tid)| {
            let cpus = cpus_of(&sched_getaffinity(Pid::from_raw(tid)).ok()?);
            online
                .iter()
                .any(|c| !cpus.contains(c))
                .then_some(TaskCpus { ns_tid, cpus })
        })
        .collect();
    out.sort_by_key(|t| t.ns_tid);
    out
}

/// Writes [`FILE`] into `images_dir` with `tasks` (what [`narrowed`] read while the container was
/// frozen, before the dump: CRIU wants an empty directory); writes nothing when there are none.
pub fn save(images_dir: &Path, tasks: &[TaskCpus]) -> std::io::Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    crate::fsutil::write_json(&images_dir.join(FILE), &tasks)
}

/// Sets the masks of [`FILE`] in `images_dir` (if any) on the restored tasks of `host_pids`,
/// each limited to this host's online CPUs.
pub fn restore(images_dir: &Path, host_pids: &[i32]) -> std::io::Result<Restored> {
    let path = images_dir.join(FILE);
    if !path.exists() {
        return Ok(Restored::default());
    }
    let saved: Vec<TaskCpus> = crate::fsutil::read_json(&path, MAX_FILE)?;
    let online = online_cpus();
    let live: std::collections::HashMap<i32, i32> = host_pids
        .iter()
        .flat_map(|&p| tasks(p))
        .map(|(tid, ns_tid)| (ns_tid, tid))
        .collect();
    let mut r = Restored::default();
    for t in &saved {
        let mut set = CpuSet::new();
        for &c in t.cpus.iter().filter(|c| online.contains(c)) {
            let _ = set.set(c);
        }
        let done = live.get(&t.ns_tid).is_some_and(|&tid| {
            !cpus_of(&set).is_empty() && sched_setaffinity(Pid::from_raw(tid), &set).is_ok()
        });
        if done {
            r.set += 1;
        } else {
            r.skipped += 1;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,6\n"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("0"), vec![0]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("3-1,x,5"), vec![5]);
    }

    #[test]
    fn a_narrowed_thread_is_saved_and_set_again() {
        let online = online_cpus();
        if online.len() < 2 {
            return;
        }
        let me = std::process::id() as i32;
        // A thread of this test pinned to the first online CPU: the other threads of the test
        // binary keep every CPU.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let tid = nix::unistd::gettid();
            let mut one = CpuSet::new();
            one.set(online[0]).unwrap();
            sched_setaffinity(Pid::from_raw(0), &one).unwrap();
            tx.send(tid.as_raw()).unwrap();
            let _ = stop_rx.recv();
            cpus_of(&sched_getaffinity(Pid::from_raw(0)).unwrap())
        });
        let tid = rx.recv().unwrap();
        let saved = narrowed(&[me]);
        let mine = saved
            .iter()
            .find(|s| s.ns_tid == tid)
            .expect("the pinned thread");
        assert_eq!(mine.cpus, vec![online_cpus()[0]]);
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &saved).unwrap();
        // Widen it again, as a restore without the masks would leave it, then restore.
        let mut all = CpuSet::new();
        for c in online_cpus() {
            all.set(c).unwrap();
        }
        sched_setaffinity(Pid::from_raw(tid), &all).unwrap();
        let r = restore(dir.path(), &[me]).unwrap();
        assert!(r.set >= 1, "{r:?}");
        stop_tx.send(()).unwrap();
        assert_eq!(t.join().unwrap(), vec![online_cpus()[0]]);
    }
}
