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

/// The bytes of the deleted files the given host PIDs still hold open or mapped, each file once:
/// CRIU copies each into the checkpoint (a "ghost file"), so they cross while frozen in every
/// mode. Those on a tmpfs (memfd, `/dev/shm`) are left out: their pages are the cgroup's shared
/// memory, counted there. Counted by blocks (a sparse file costs what it holds).
pub fn deleted_open_bytes(host_pids: &[i32]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for p in host_pids {
        for dir in ["fd", "map_files"] {
            let Ok(entries) = fs::read_dir(format!("/proc/{p}/{dir}")) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let deleted = fs::read_link(&path)
                    .is_ok_and(|t| t.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"));
                if !deleted {
                    continue;
                }
                // The magic link leads to the file itself, deleted or not.
                let Ok(m) = fs::metadata(&path) else {
                    continue;
                };
                let on_tmpfs = nix::sys::statfs::statfs(&path)
                    .is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
                if m.is_file() && !on_tmpfs && seen.insert((m.dev(), m.ino())) {
                    total = total.saturating_add(m.blocks().saturating_mul(512));
                }
            }
        }
    }
    total
}

/// The memory a dump of the given host PIDs holds, as their page tables show it (not the
/// cgroup's counters): CRIU dumps each process's anonymous pages on their own, so pages a
/// `fork` shares copy-on-write count once per process; shared memory counts once and only where
/// it is mapped and resident (a memfd's pages nobody touched, which the cgroup charges, are not
/// dumped: QA, ZGC's heap). `None` when no process could be read or the kernel has no
/// `Pss_Shmem` in `smaps_rollup` (before 5.9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappedMemory {
    /// Anonymous pages, resident or swapped, summed over the processes.
    pub anon_bytes: u64,
    /// Shared memory (shmem, memfd, System V) mapped and resident, counted once (its PSS).
    pub shmem_bytes: u64,
}

/// [`MappedMemory`] of the given host PIDs, from `/proc/PID/smaps_rollup` (the kernel walks each
/// process's page tables: a few ms per GiB). Processes that exit meanwhile are skipped.
pub fn mapped_memory(host_pids: &[i32]) -> Option<MappedMemory> {
    let mut total = MappedMemory::default();
    let mut read = 0;
    for p in host_pids {
        let Ok(text) = fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        let m = parse_rollup(&text)?;
        total.anon_bytes = total.anon_bytes.saturating_add(m.anon_bytes);
        total.shmem_bytes = total.shmem_bytes.saturating_add(m.shmem_bytes);
        read += 1;
    }
    (read > 0).then_some(total)
}

/// The memory mappings of the given host PIDs, all together (`/proc/PID/maps` lines): a dump
/// and a restore handle each one. Processes that exit meanwhile count 0.
pub fn mappings(host_pids: &[i32]) -> u64 {
    host_pids
        .iter()
        .filter_map(|p| fs::read(format!("/proc/{p}/maps")).ok())
        .map(|m| m.iter().filter(|b| **b == b'\n').count() as u64)
        .sum()
}

/// The files the given host PIDs map shared and writable (`/proc/PID/maps`: `w` and `s` in the
/// permissions), by their path in the processes' mount namespace. Stores through such a mapping
/// change the file without updating its mtime or ctime (the kernel stamps the file only when a
/// clean page is first written), so a copy of the file chosen by its times can miss them.
/// Deleted files and anonymous or special mappings are left out.
pub fn shared_writable_files(host_pids: &[i32]) -> std::collections::BTreeSet<std::path::PathBuf> {
    host_pids
        .iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/maps")).ok())
        .flat_map(|maps| {
            maps.lines()
                .filter_map(MapsLine::parse)
                .filter(MapsLine::is_shared_writable_file)
                .map(|m| std::path::PathBuf::from(m.path))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One line of `/proc/PID/maps`: `address perms offset dev inode [path]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapsLine<'a> {
    /// `rw-s`, `r-xp`...
    pub perms: &'a str,
    /// The file's device (major, minor); (0, 0) for anonymous memory.
    pub dev: (u32, u32),
    /// The file's inode; 0 for anonymous memory.
    pub inode: u64,
    /// The rest of the line: a path (which may hold spaces and end in ` (deleted)`), a
    /// `[name]` or nothing.
    pub path: &'a str,
}

impl<'a> MapsLine<'a> {
    pub fn parse(line: &'a str) -> Option<Self> {
        let mut rest = line;
        let mut fields = [""; 5];
        for field in &mut fields {
            let (f, tail) = rest.trim_start().split_once(' ')?;
            *field = f;
            rest = tail;
        }
        let (major, minor) = fields[3].split_once(':')?;
        Some(MapsLine {
            perms: fields[1],
            dev: (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            ),
            inode: fields[4].parse().ok()?,
            path: rest.trim_start(),
        })
    }

    /// Whether the line maps a file (by a path, not deleted) shared and writable.
    pub fn is_shared_writable_file(&self) -> bool {
        let p = self.perms.as_bytes();
        p.len() == 4
            && p[1] == b'w'
            && p[3] == b's'
            && self.path.starts_with('/')
            && !self.path.ends_with(" (deleted)")
    }

    /// The mapped file's (major, minor, inode) and path, for a mapping of a file.
    pub fn file(&self) -> Option<((u32, u32, u64), &'a str)> {
        (self.inode != 0 && self.path.starts_with('/'))
            .then_some(((self.dev.0, self.dev.1, self.inode), self.path))
    }
}

/// A `smaps_rollup` text's `Anonymous` and `Swap`, and its `Pss_Shmem` (`None` without it).
fn parse_rollup(text: &str) -> Option<MappedMemory> {
    let kib = |field: &str| -> Option<u64> {
        let v = text.lines().find_map(|l| l.strip_prefix(field))?;
        v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
    };
    Some(MappedMemory {
        anon_bytes: (kib("Anonymous:").unwrap_or(0) + kib("Swap:").unwrap_or(0)) << 10,
        shmem_bytes: kib("Pss_Shmem:")? << 10,
    })
}

/// The bytes held in the tmpfs mounts of the mount namespace process `pid` is in (`/dev`,
/// `/dev/shm` and any other), each file system once: CRIU copies their files into the
/// checkpoint. 0 when the process is gone.
pub fn tmpfs_bytes(pid: i32) -> u64 {
    let Ok(info) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return 0;
    };
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for line in info.lines() {
        // `id parent major:minor root mount-point options ... - fstype source super-options`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        if right.split(' ').next() != Some("tmpfs") || fields.len() < 5 {
            continue;
        }
        if !seen.insert(fields[2]) {
            continue;
        }
        // Octal escapes (`\040` for a space) are left: such a mount point is simply not found.
        let at = format!("/proc/{pid}/root{}", fields[4]);
        if let Ok(st) = nix::sys::statvfs::statvfs(at.as_str()) {
            let used = st.blocks().saturating_sub(st.blocks_free());
            total = total.saturating_add(used.saturating_mul(st.fragment_size()));
        }
    }
    total
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

/// Whether host PID `pid` is in the PID namespace of host PID `of` (true when either cannot be
/// read: the caller keeps what it cannot tell apart).
pub fn same_pid_ns(pid: i32, of: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: i32| {
        fs::metadata(format!("/proc/{p}/ns/pid"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    match (ns(pid), ns(of)) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// The parent process id of host PID `pid`, from `/proc/PID/stat` (the field after the state,
/// which follows the command's closing parenthesis; a command may hold `) `).
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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
    /// A deleted file this process holds open counts once, by its blocks; a live one does not.
    #[test]
    fn deleted_open_files_are_counted_once() {
        use std::io::Write;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("ghost");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let _again = std::fs::File::open(&path).unwrap();
        let me = [std::process::id() as i32];
        let before = super::deleted_open_bytes(&me);
        std::fs::remove_file(&path).unwrap();
        let after = super::deleted_open_bytes(&me);
        assert!(
            after >= before + (1 << 20) && after < before + (2 << 20),
            "{before} -> {after}"
        );
    }

    use super::*;

    #[test]
    fn shared_writable_maps_lines() {
        let line = |perms: &str, path: &str| {
            format!("7fa78f90f000-7fa78fa0f000 {perms} 00000000 00:4e 1376615                    {path}")
        };
        let shared_writable_path = |l: &str| {
            MapsLine::parse(l)
                .filter(MapsLine::is_shared_writable_file)
                .map(|m| m.path.to_owned())
        };
        assert_eq!(
            shared_writable_path(&line("rw-s", "/data.mm")).as_deref(),
            Some("/data.mm")
        );
        assert_eq!(
            shared_writable_path(&line("rw-s", "/a dir/with spaces")).as_deref(),
            Some("/a dir/with spaces")
        );
        for (perms, path) in [
            ("r--s", "/ro.mm"),
            ("rw-p", "/private.mm"),
            ("rw-s", "/gone.mm (deleted)"),
            ("rw-s", "/dev/zero"),
            ("rw-s", ""),
            ("rw-s", "[heap]"),
        ] {
            let want = (path == "/dev/zero").then_some(path);
            assert_eq!(
                shared_writable_path(&line(perms, path)).as_deref(),
                want,
                "{perms} {path}"
            );
        }
        assert_eq!(shared_writable_path("7fa-7fb rw-s"), None);
        let me = std::process::id() as i32;
        assert!(shared_writable_files(&[me, i32::MAX])
            .iter()
            .all(|p| p.is_absolute()));
        // This process maps its binary, libraries, stack...: a few at least.
        assert!(mappings(&[me, i32::MAX]) > 5);
    }

    #[test]
    fn rollup_fields_and_this_process() {
        let text = "55e5-7ffc ---p 00000000 00:00 0 [rollup]\nRss: 1760 kB\nPss_Shmem:     8 kB\nAnonymous:   116 kB\nSwap:  4 kB\n";
        assert_eq!(
            parse_rollup(text),
            Some(MappedMemory {
                anon_bytes: 120 << 10,
                shmem_bytes: 8 << 10
            })
        );
        assert_eq!(parse_rollup("Anonymous: 4 kB\n"), None);
        // This process touches a 16 MiB anonymous buffer: counted.
        let buf = vec![1u8; 16 << 20];
        let me = mapped_memory(&[std::process::id() as i32, i32::MAX]).unwrap();
        assert!(me.anon_bytes >= 16 << 20, "{me:?}");
        assert_eq!(buf.iter().map(|&b| b as usize).sum::<usize>(), 16 << 20);
        assert_eq!(mapped_memory(&[i32::MAX]), None);
    }

    #[test]
    fn parent_of_self() {
        assert_eq!(
            parent_pid(std::process::id() as i32),
            Some(nix::unistd::getppid().as_raw())
        );
    }

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
