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
    fn own_process_maps_to_itself_outside_a_pid_namespace() {
        let me = std::process::id() as i32;
        let map = pid_map(&[me, i32::MAX]);
        assert_eq!(map.len(), 1);
        assert_eq!(map[0].host_pid, me);
        assert!(!map[0].cmd.is_empty());
    }
}
