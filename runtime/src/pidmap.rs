//! The PID map: for every process of a container, its PID inside the container's PID namespace,
//! its PID on the host, and its command line.

use serde::{Deserialize, Serialize};
use std::fs;

/// One process of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidEntry {
    pub ns_pid: i32,
    pub host_pid: i32,
    pub cmd: String,
}

/// Builds the PID map of the given host PIDs (for example a cgroup's `cgroup.procs`), sorted by
/// in-namespace PID. Processes that exit meanwhile are skipped. The in-namespace PID is the last
/// field of `NSpid:` in `/proc/PID/status`.
pub fn pid_map(host_pids: &[i32]) -> Vec<PidEntry> {
    let mut out: Vec<PidEntry> = host_pids.iter().filter_map(|&p| entry(p)).collect();
    out.sort_by_key(|e| e.ns_pid);
    out
}

/// The threads of the given host PIDs, all together (`/proc/PID/task`); a process that exits
/// meanwhile counts as none, one whose threads cannot be listed as one.
pub fn threads(host_pids: &[i32]) -> u64 {
    host_pids
        .iter()
        .map(|p| match fs::read_dir(format!("/proc/{p}/task")) {
            Ok(d) => d.count() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(_) => 1,
        })
        .sum()
}

fn entry(host_pid: i32) -> Option<PidEntry> {
    let status = fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    let ns_pid = innermost_ns_pid(&status)?;
    let raw = fs::read(format!("/proc/{host_pid}/cmdline")).unwrap_or_default();
    let cmd = command_line(&raw);
    Some(PidEntry {
        ns_pid,
        host_pid,
        cmd,
    })
}

/// The id in the innermost PID namespace from a `/proc/PID/status` (or `/proc/PID/task/TID/status`)
/// text: the last field of its `NSpid:` line.
pub fn innermost_ns_pid(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// A command line as `/proc/PID/cmdline` holds it (arguments ended by NUL bytes), joined by
/// spaces; empty arguments are dropped.
pub fn command_line(raw: &[u8]) -> String {
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_of_processes_and_of_a_gone_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert_eq!(threads(&[pid]), 1);
        assert_eq!(threads(&[pid, i32::MAX]), 1);
        // This test process: the test harness's threads, and one more of its own.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        assert!(threads(&[std::process::id() as i32, pid]) >= 3);
        drop(tx);
        let _ = t.join();
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn own_process_maps_to_itself_outside_a_pid_namespace() {
        let me = std::process::id() as i32;
        let map = pid_map(&[me, i32::MAX]);
        assert_eq!(map.len(), 1);
        assert_eq!(map[0].host_pid, me);
        assert!(!map[0].cmd.is_empty());
    }
}
