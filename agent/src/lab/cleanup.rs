//! `down`: removes everything a lab made, in an order where each step still finds what it needs
//! (agents; containers by their recorded PIDs and by cgroup, while the host namespaces still exist to
//! tell lab processes from others; mounts; namespaces; files). Every step runs even when an earlier
//! one failed; failures are collected in the report.

use super::process::{self, pid_alive};
use super::{net, LabError, LabFile};
use nix::sys::signal::Signal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long killed processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(3);
/// Depth below a cgroup hierarchy's root searched for a host's cgroups.
const CGROUP_SEARCH_DEPTH: usize = 3;

/// What [`super::down`] removed, and what it could not.
#[derive(Debug, Default)]
pub struct DownReport {
    /// PIDs of the agents stopped.
    pub agents_stopped: Vec<i32>,
    /// PIDs of container, shim and other lab processes killed.
    pub processes_killed: Vec<i32>,
    pub cgroups_removed: Vec<PathBuf>,
    pub unmounted: Vec<PathBuf>,
    pub namespaces_removed: Vec<String>,
    /// Lab file, run directory, state directories.
    pub paths_removed: Vec<PathBuf>,
    /// What could not be removed; empty when the lab is entirely gone.
    pub problems: Vec<LabError>,
}

impl DownReport {
    /// True when everything was removed.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One line for the CLI: what was removed, then the problems, one per line.
impl std::fmt::Display for DownReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped {} agent(s), killed {} process(es), removed {} cgroup(s), {} mount(s), \
             {} namespace(s), {} path(s)",
            self.agents_stopped.len(),
            self.processes_killed.len(),
            self.cgroups_removed.len(),
            self.unmounted.len(),
            self.namespaces_removed.len(),
            self.paths_removed.len()
        )?;
        for p in &self.problems {
            write!(f, "\nnot removed: {p}")?;
        }
        Ok(())
    }
}

/// Tells a lab host's processes from everything else on the machine: they are in a cgroup below the
/// host's cgroup parent (containers), live in the host's network namespace (agent, shims, CRIU), have
/// their root or command line under its state directory, or are children of such a process.
struct HostScope {
    cgroup_parent: String,
    netns: Option<(u64, u64)>,
    state_dir: PathBuf,
}

impl HostScope {
    fn contains(&self, pid: i32) -> bool {
        self.contains_self(pid)
            || mig_runtime::pidmap::parent_pid(pid)
                .is_some_and(|pp| pp > 1 && self.contains_self(pp))
    }

    fn contains_self(&self, pid: i32) -> bool {
        if let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            // Lines are `id:controllers:/path`.
            let inside = cgroups.lines().any(|l| {
                l.splitn(3, ':')
                    .nth(2)
                    .is_some_and(|path| path.split('/').any(|c| c == self.cgroup_parent))
            });
            if inside {
                return true;
            }
        }
        if let (Some(ns), Ok(m)) = (self.netns, std::fs::metadata(format!("/proc/{pid}/ns/net"))) {
            if (m.dev(), m.ino()) == ns {
                return true;
            }
        }
        if let Ok(root) = std::fs::read_link(format!("/proc/{pid}/root")) {
            if root.starts_with(&self.state_dir) {
                return true;
            }
        }
        let dir = self.state_dir.display().to_string();
        process::cmdline(pid)
            .iter()
            .any(|a| names_path_under(a, &dir))
    }
}

/// The network namespace of `pid` (device and inode), if it can be read.
fn netns_of(pid: i32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether `ns` is the machine's network namespace (PID 1's) or this process's.
fn machine_netns(ns: (u64, u64)) -> bool {
    [1, std::process::id() as i32]
        .iter()
        .any(|&pid| netns_of(pid) == Some(ns))
}

/// This process and its ancestors, up to PID 1.
fn ancestors() -> Vec<i32> {
    let mut chain = vec![std::process::id() as i32];
    while let Some(pp) = chain
        .last()
        .and_then(|&p| mig_runtime::pidmap::parent_pid(p))
        .filter(|&pp| pp > 1 && !chain.contains(&pp))
    {
        chain.push(pp);
    }
    chain
}

/// Whether the argument `arg` holds the path `dir` or a path below it (not `<dir>x`: host-a's
/// state directory is a prefix of host-ab's).
fn names_path_under(arg: &str, dir: &str) -> bool {
    arg.match_indices(dir)
        .any(|(at, _)| matches!(arg.as_bytes().get(at + dir.len()), None | Some(b'/')))
}

pub(crate) fn teardown(file: &LabFile, lab_file: &Path) -> DownReport {
    let mut r = DownReport::default();

    // 1. Agents, by recorded PID and by command line (an agent whose PID was never recorded).
    for h in &file.hosts {
        let mut pids: Vec<i32> = h.agent_pid.into_iter().collect();
        for pid in process::find_agents(&h.socket) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        for pid in pids {
            match process::stop_agent(&h.name, pid, &h.socket) {
                Ok(true) => r.agents_stopped.push(pid),
                Ok(false) => {}
                Err(e) => r.problems.push(e),
            }
        }
    }

    // 2. Containers and their cgroups, while the namespaces still identify lab processes.
    let hierarchies = cgroup_hierarchies();
    for h in &file.hosts {
        let scope = HostScope {
            cgroup_parent: process::cgroup_parent(&file.name, &h.name),
            netns: net::netns_inode(&h.netns),
            state_dir: h.state_dir.clone(),
        };
        let names = [scope.cgroup_parent.clone(), format!("mig-{}", h.name)];
        let mut cgroups = Vec::new();
        for root in &hierarchies {
            find_dirs(root, &names, CGROUP_SEARCH_DEPTH, &mut cgroups);
        }
        // Every cgroup below the host's, children first.
        let mut all = Vec::new();
        for cg in &cgroups {
            post_order(cg, &mut all);
        }
        for cg in &all {
            thaw(cg);
        }
        let mut victims = shim_pids(&h.state_dir);
        for cg in &all {
            victims.extend(cgroup_procs(cg));
        }
        // And what the agents left outside the containers' cgroups: a post-copy's `criu
        // lazy-pages` daemon outlives its agent, in the host's network namespace (QA of session
        // 32, F9: reparented to PID 1 after `down`, holding the removed state directory's
        // files). By that namespace only, never the machine's own (a lab file naming it), and
        // never this process or its ancestors (a shell in the host's namespace running `down`).
        if let Some(ns) = scope.netns.filter(|ns| !machine_netns(*ns)) {
            let spared = ancestors();
            victims.extend(
                process::all_pids()
                    .filter(|pid| !spared.contains(pid) && netns_of(*pid) == Some(ns)),
            );
        }
        victims.sort_unstable();
        victims.dedup();
        victims.retain(|&pid| pid_alive(pid) && scope.contains(pid));
        for &pid in &victims {
            match process::signal(pid, Signal::SIGKILL) {
                Ok(()) => r.processes_killed.push(pid),
                Err(e) => r.problems.push(e),
            }
        }
        let survivors = wait_all_gone(&victims, KILL_WAIT);
        if !survivors.is_empty() {
            r.problems.push(LabError::Survivors { pids: survivors });
        }
        for cg in &all {
            let procs = cgroup_procs(cg);
            if !procs.is_empty() && procs.iter().any(|&p| !scope.contains(p)) {
                // Shared by something outside this lab (another lab's host of the same name): leave it.
                continue;
            }
            match remove_cgroup(cg) {
                Ok(true) => r.cgroups_removed.push(cg.clone()),
                Ok(false) => {}
                Err(e) => r.problems.push(e),
            }
        }
    }

    // 3. Mounts under the state and run directories, deepest first, lazily.
    let prefixes = [file.state_root.clone(), file.root_dir.clone()];
    for mp in mounts_under(&prefixes) {
        match nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => r.unmounted.push(mp),
            // Already gone with a parent that was detached first.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(source) => r.problems.push(LabError::Unmount { path: mp, source }),
        }
    }

    // 4. Namespaces: hosts, switch, and any other leftover of this lab's.
    let mut namespaces: Vec<String> = file.hosts.iter().map(|h| h.netns.clone()).collect();
    namespaces.push(file.switch_netns.clone());
    match net::lab_namespaces(&file.name) {
        Ok(found) => namespaces.extend(found),
        Err(e) => r.problems.push(e),
    }
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        match net::delete_netns(&ns) {
            Ok(true) => r.namespaces_removed.push(ns),
            Ok(false) => {}
            Err(e) => r.problems.push(e),
        }
    }

    // 5. Files. Only what the lab made is removed recursively (the hosts' state directories, never
    // one with a mount left below it, and the agents' sockets and logs); the run and state roots
    // themselves only when that leaves them empty, so a mistaken root never loses anything else.
    let mut host_names: Vec<String> = file.hosts.iter().map(|h| h.name.clone()).collect();
    host_names.extend(host_entries(&file.state_root));
    host_names.sort();
    host_names.dedup();
    let mounts_left = mounts_under(&prefixes);
    for host in &host_names {
        let dir = file.state_root.join(host);
        if mounts_left.iter().any(|m| m.starts_with(&dir)) {
            continue;
        }
        remove(&dir, true, &mut r);
        for ext in ["sock", "log", "restart.lock"] {
            remove(&file.root_dir.join(format!("{host}.{ext}")), false, &mut r);
        }
    }
    // The lab's container address table (see `container_net`), and the lab file's lock.
    for f in ["addresses.json", "addresses.lock", "lab.lock"] {
        remove(&file.root_dir.join(f), false, &mut r);
    }
    for dir in [&file.root_dir, &file.state_root] {
        match std::fs::remove_dir(dir) {
            Ok(()) => r.paths_removed.push(dir.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => r.problems.push(LabError::Remove {
                path: dir.clone(),
                source,
            }),
        }
    }
    match std::fs::remove_file(lab_file) {
        Ok(()) => r.paths_removed.push(lab_file.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => r.problems.push(LabError::Remove {
            path: lab_file.to_path_buf(),
            source,
        }),
    }
    // The shared parents, when this was their last lab (failure just means another lab is there).
    for dir in [file.root_dir.parent(), file.state_root.parent()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_dir(dir);
    }
    r
}

/// Removes a file, or a directory tree when `tree`; absence is not an error.
fn remove(path: &Path, tree: bool, r: &mut DownReport) {
    let result = if tree {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => r.paths_removed.push(path.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => r.problems.push(LabError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Names of the host directories (`host-a` ... `host-z`) in `state_root`.
pub(crate) fn host_entries(state_root: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state_root) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 6 && n.starts_with("host-") && n.as_bytes()[5].is_ascii_lowercase())
        .collect()
}

/// PIDs recorded in `<state_dir>/containers/*/shim.json`: every integer field whose name ends in
/// `pid` (shim pid, init pid), at the top level or one level down.
fn shim_pids(state_dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir(state_dir.join("containers")) else {
        return pids;
    };
    for entry in rd.flatten() {
        let path = entry.path().join("shim.json");
        let Ok(value) = mig_runtime::fsutil::read_json::<serde_json::Value>(&path, 1 << 20) else {
            continue;
        };
        collect_pids(&value, 2, &mut pids);
    }
    pids
}

fn collect_pids(value: &serde_json::Value, depth: usize, out: &mut Vec<i32>) {
    let Some(map) = value.as_object() else {
        return;
    };
    for (key, v) in map {
        if key.ends_with("pid") {
            if let Some(pid) = v.as_i64().and_then(|p| i32::try_from(p).ok()) {
                if pid > 1 {
                    out.push(pid);
                }
            }
        } else if depth > 1 {
            collect_pids(v, depth - 1, out);
        }
    }
}

/// Mount points of every cgroup and cgroup2 hierarchy, from /proc/self/mountinfo.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = mountinfo()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(mp, _)| mp)
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// Directories below `dir` (to `depth` levels) whose name is one of `names`.
fn find_dirs(dir: &Path, names: &[String], depth: usize, out: &mut Vec<PathBuf>) {
    if depth == 0 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let path = e.path();
        if names.iter().any(|n| e.file_name() == n.as_str()) {
            out.push(path);
        } else {
            find_dirs(&path, names, depth - 1, out);
        }
    }
}

/// `dir` and every directory below it, children before parents.
fn post_order(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                post_order(&e.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Thaws a cgroup (v2 `cgroup.freeze`, v1 `freezer.state`) so that SIGKILL takes effect.
fn thaw(cg: &Path) {
    let _ = std::fs::write(cg.join("cgroup.freeze"), "0");
    let _ = std::fs::write(cg.join("freezer.state"), "THAWED");
}

fn cgroup_procs(cg: &Path) -> Vec<i32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes an (empty) cgroup directory, retrying briefly while the kernel releases it.
fn remove_cgroup(cg: &Path) -> Result<bool, LabError> {
    let start = Instant::now();
    loop {
        match std::fs::remove_dir(cg) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                if start.elapsed() > Duration::from_secs(1) {
                    return Err(LabError::RemoveCgroup {
                        path: cg.to_path_buf(),
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// PIDs of `pids` still alive after `timeout`.
fn wait_all_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let left: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&p| {
                process::reap(p);
                pid_alive(p)
            })
            .collect();
        if left.is_empty() || start.elapsed() > timeout {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points at or below any of `prefixes`, deepest first.
fn mounts_under(prefixes: &[PathBuf]) -> Vec<PathBuf> {
    let mut mps: Vec<PathBuf> = mountinfo()
        .into_iter()
        .map(|(mp, _)| mp)
        .filter(|mp| prefixes.iter().any(|p| mp.starts_with(p)))
        .collect();
    mps.sort_by_key(|mp| std::cmp::Reverse(mp.components().count()));
    mps.dedup();
    mps
}

/// (mount point, filesystem type) of every line of /proc/self/mountinfo.
fn mountinfo() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().filter_map(parse_mountinfo_line).collect())
        .unwrap_or_default()
}

fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let fstype = right.split(' ').next()?;
    Some((PathBuf::from(unescape(mount_point)), fstype.to_string()))
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let line = "36 35 98:0 /mnt1 /var/lib/mig-lab/t1/host-a/containers/x/root\\040fs rw,noatime master:1 - overlay overlay rw";
        let (mp, fs) = parse_mountinfo_line(line).unwrap();
        assert_eq!(
            mp,
            Path::new("/var/lib/mig-lab/t1/host-a/containers/x/root fs")
        );
        assert_eq!(fs, "overlay");
        let cg = "30 24 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(parse_mountinfo_line(cg).unwrap().1, "cgroup2");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn unescape_edges() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\134"), "\\");
    }

    #[test]
    fn pids_from_shim_json() {
        let v = serde_json::json!({"shim_pid": 100, "init_pid": 101, "start_time": 5, "pid": 1,
            "inner": {"criu_pid": 102}, "name": "x"});
        let mut pids = Vec::new();
        collect_pids(&v, 2, &mut pids);
        pids.sort();
        assert_eq!(pids, [100, 101, 102]);
    }

    #[test]
    fn a_command_line_names_the_state_directory_or_below_it() {
        let dir = "/var/lib/mig-lab/l/host-a";
        assert!(names_path_under("/var/lib/mig-lab/l/host-a", dir));
        assert!(names_path_under(
            "--images-dir=/var/lib/mig-lab/l/host-a/containers/x/checkpoint",
            dir
        ));
        assert!(!names_path_under(
            "/var/lib/mig-lab/l/host-ab/containers",
            dir
        ));
        assert!(names_path_under(
            "/var/lib/mig-lab/l/host-ab:/var/lib/mig-lab/l/host-a/x",
            dir
        ));
        assert!(!names_path_under("/var/lib/mig-lab/l", dir));
    }

    #[test]
    fn this_process_and_its_parent_are_spared() {
        let spared = ancestors();
        assert_eq!(spared[0], std::process::id() as i32);
        let parent = mig_runtime::pidmap::parent_pid(spared[0]).unwrap();
        assert!(parent == 1 || spared.contains(&parent), "{spared:?}");
        // This process's namespace is never a lab host's to empty.
        assert!(machine_netns(netns_of(spared[0]).unwrap()));
    }

    #[test]
    fn this_process_is_not_in_a_lab_scope() {
        let scope = HostScope {
            cgroup_parent: "mig-nonexistent-scope-host-a".into(),
            netns: None,
            state_dir: PathBuf::from("/var/lib/mig-lab/nonexistent-scope/host-a"),
        };
        assert!(!scope.contains(std::process::id() as i32));
    }

    #[test]
    fn report_display() {
        let mut r = DownReport::default();
        r.agents_stopped.push(10);
        r.namespaces_removed.push("x-sw".into());
        assert_eq!(
            r.to_string(),
            "stopped 1 agent(s), killed 0 process(es), removed 0 cgroup(s), 0 mount(s), \
             1 namespace(s), 0 path(s)"
        );
        r.problems.push(LabError::Survivors { pids: vec![7] });
        assert!(r
            .to_string()
            .ends_with("\nnot removed: processes [7] survived SIGKILL"));
    }

    #[test]
    fn host_entries_are_host_dirs_only() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["host-a", "host-b", "host-ab", "hostx", "other", "host-Z"] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        let mut found = host_entries(dir.path());
        found.sort();
        assert_eq!(found, ["host-a", "host-b"]);
        assert!(host_entries(&dir.path().join("missing")).is_empty());
    }
}
