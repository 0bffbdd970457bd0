//! Where the cgroup hierarchies are mounted, read from `/proc/self/mountinfo`.
//!
//! Three layouts exist in the wild: pure cgroup2 (one `cgroup2` mount, usually `/sys/fs/cgroup`),
//! hybrid (v1 controller mounts under `/sys/fs/cgroup/<ctrl>` plus a `cgroup2` mount, usually
//! `/sys/fs/cgroup/unified`, with few or no controllers) and pure v1. The parser only records what
//! is mounted; which hierarchy handles which controller is decided by the caller.

use std::path::PathBuf;

/// v1 controllers we recognise in a `cgroup` mount's super options. Anything else there is a mount
/// option (`rw`, `noprefix`, `clone_children`, `xattr`, `release_agent=...`) or a named hierarchy
/// (`name=systemd`), which carries no controller.
pub const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// A mounted cgroup v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// Its controllers, in mount option order (e.g. `["cpu", "cpuacct"]`).
    pub controllers: Vec<String>,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

impl V1Hierarchy {
    /// Whether this hierarchy carries `controller`.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// The controllers joined by commas, as `/proc/PID/cgroup` names the hierarchy.
    pub fn label(&self) -> String {
        self.controllers.join(",")
    }
}

/// The cgroup hierarchies visible to this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup2 mount point, if any (the first one in mount order).
    pub unified: Option<PathBuf>,
    /// v1 hierarchies with at least one controller, one entry per hierarchy (first mount wins).
    pub v1: Vec<V1Hierarchy>,
}

impl Layout {
    /// Reads `/proc/self/mountinfo`.
    pub fn detect() -> std::io::Result<Layout> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(parse_mountinfo(&text))
    }

    /// The v1 hierarchy carrying `controller`, if one is mounted.
    pub fn v1_with(&self, controller: &str) -> Option<&V1Hierarchy> {
        self.v1.iter().find(|h| h.has(controller))
    }

    /// True when nothing cgroup-related is mounted.
    pub fn is_empty(&self) -> bool {
        self.unified.is_none() && self.v1.is_empty()
    }
}

/// Parses the text of a `mountinfo` file. Lines that do not parse are skipped: the file comes from
/// the kernel, and an odd line must not hide the cgroup mounts around it.
pub fn parse_mountinfo(text: &str) -> Layout {
    let mut layout = Layout::default();
    for line in text.lines() {
        let Some(m) = parse_line(line) else { continue };
        match m.fstype {
            "cgroup2" if layout.unified.is_none() => {
                layout.unified = Some(PathBuf::from(unescape(m.mount_point)));
            }
            "cgroup" => {
                let controllers: Vec<String> = m
                    .super_options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_owned)
                    .collect();
                if controllers.is_empty() {
                    continue;
                }
                let seen = layout.v1.iter().any(|h| h.controllers == controllers);
                if !seen {
                    layout.v1.push(V1Hierarchy {
                        controllers,
                        mount_point: PathBuf::from(unescape(m.mount_point)),
                    });
                }
            }
            _ => {}
        }
    }
    layout
}

struct MountLine<'a> {
    mount_point: &'a str,
    fstype: &'a str,
    super_options: &'a str,
}

/// `id parent major:minor root mount_point options [optional...] - fstype source super_options`
fn parse_line(line: &str) -> Option<MountLine<'_>> {
    let (before, after) = line.split_once(" - ")?;
    let mount_point = before.split(' ').nth(4)?;
    let mut rest = after.split(' ');
    let fstype = rest.next()?;
    let _source = rest.next()?;
    let super_options = rest.next()?;
    Some(MountLine {
        mount_point,
        fstype,
        super_options,
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const PURE_V2: &str = "\
24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 24 0:27 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
";

    // systemd's classic hybrid layout: joined cpu,cpuacct and net_cls,net_prio, bind mount repeated.
    const SYSTEMD_HYBRID: &str = "\
30 25 0:25 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
31 30 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 - cgroup cgroup rw,xattr,name=systemd
35 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
36 30 0:31 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,net_cls,net_prio
37 30 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
38 30 0:33 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,pids
39 30 0:34 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,freezer
90 22 0:32 / /mnt/again\\040here rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn hybrid_layout() {
        let l = parse_mountinfo(HYBRID);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let labels: Vec<String> = l.v1.iter().map(V1Hierarchy::label).collect();
        assert_eq!(
            labels,
            ["cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids"]
        );
        assert_eq!(
            l.v1_with("memory").map(|h| h.mount_point.clone()),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert!(l.v1_with("rdma").is_none());
    }

    #[test]
    fn pure_v2_layout() {
        let l = parse_mountinfo(PURE_V2);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(l.v1.is_empty());
        assert!(!l.is_empty());
    }

    #[test]
    fn joined_controllers_named_hierarchy_and_duplicates() {
        let l = parse_mountinfo(SYSTEMD_HYBRID);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let cpu = l.v1_with("cpuacct").unwrap();
        assert_eq!(cpu.label(), "cpu,cpuacct");
        assert_eq!(cpu.mount_point, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(l.v1.iter().filter(|h| h.has("memory")).count(), 1);
        assert!(l.v1.iter().all(|h| !h.label().contains("systemd")));
        assert_eq!(l.v1.len(), 5);
    }

    #[test]
    fn no_cgroups_and_garbage_lines() {
        let l = parse_mountinfo("garbage\n\n1 2 3\n24 1 259:2 / / rw - ext4 /dev/x rw\n");
        assert!(l.is_empty());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/a\\134b"), "/a\\b");
        assert_eq!(unescape("/tail\\04"), "/tail\\04");
        assert_eq!(unescape("/x\\999"), "/x\\999");
    }
}
