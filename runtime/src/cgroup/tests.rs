//! Unit tests of the pure parts: name validation and which hierarchies a cgroup lives in.

use super::*;
use crate::cgroup::mount::parse_mountinfo;
use crate::spec::Limits;

const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

const PURE_V2: &str = "\
29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

const PURE_V1: &str = "\
35 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
37 30 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 30 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 30 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
";

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn labels_and_dirs(layout: &str, v2: &[&str], v2_freeze: bool) -> Vec<(String, String)> {
    let roots = plan(&parse_mountinfo(layout), &owned(v2), v2_freeze);
    in_roots(roots, "mig-host-a/0123")
        .into_iter()
        .map(|(l, d)| (l, d.display().to_string()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[test]
fn hybrid_uses_v1_controllers_and_v2_freezer() {
    let got = labels_and_dirs(HYBRID, &["hugetlb"], true);
    assert_eq!(
        got,
        pairs(&[
            ("", "/sys/fs/cgroup/unified/mig-host-a/0123"),
            ("memory", "/sys/fs/cgroup/memory/mig-host-a/0123"),
            ("cpu", "/sys/fs/cgroup/cpu/mig-host-a/0123"),
            ("cpuacct", "/sys/fs/cgroup/cpuacct/mig-host-a/0123"),
            ("pids", "/sys/fs/cgroup/pids/mig-host-a/0123"),
        ])
    );
}

#[test]
fn hybrid_on_an_old_kernel_adds_the_v1_freezer() {
    let got = labels_and_dirs(HYBRID, &[], false);
    assert_eq!(got.len(), 6);
    assert_eq!(
        got.last().unwrap(),
        &pairs(&[("freezer", "/sys/fs/cgroup/freezer/mig-host-a/0123")])[0]
    );
}

#[test]
fn pure_v2_is_one_directory() {
    let got = labels_and_dirs(PURE_V2, &["cpuset", "cpu", "io", "memory", "pids"], true);
    assert_eq!(got, pairs(&[("", "/sys/fs/cgroup/mig-host-a/0123")]));
}

#[test]
fn pure_v1_joined_cpu_cpuacct_once() {
    let got = labels_and_dirs(PURE_V1, &[], false);
    assert_eq!(
        got,
        pairs(&[
            ("memory", "/sys/fs/cgroup/memory/mig-host-a/0123"),
            ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct/mig-host-a/0123"),
            ("pids", "/sys/fs/cgroup/pids/mig-host-a/0123"),
            ("freezer", "/sys/fs/cgroup/freezer/mig-host-a/0123"),
        ])
    );
}

#[test]
fn dir_lookup_by_controller() {
    let cg = Cgroup {
        name: "x".into(),
        dirs: vec![
            ("".into(), "/u/x".into()),
            ("cpu,cpuacct".into(), "/c/x".into()),
        ],
    };
    assert_eq!(cg.unified_dir(), Some(Path::new("/u/x")));
    assert_eq!(cg.v1_dir("cpuacct"), Some(Path::new("/c/x")));
    assert_eq!(cg.v1_dir("memory"), None);
    assert_eq!(
        cg.procs_files(),
        vec![
            PathBuf::from("/u/x/cgroup.procs"),
            PathBuf::from("/c/x/cgroup.procs")
        ]
    );
}

#[test]
fn names() {
    for good in ["mig", "mig-host-a/0123abcd", "a/b/c", "x.y", "..a"] {
        assert!(validate_name(good).is_ok(), "{good}");
    }
    for bad in [
        "", "/abs", "a/../b", "..", ".", "a//b", "a/", "a\nb", "a/./b",
    ] {
        assert!(
            matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}

/// A directory tree standing in for a pure cgroup2 mount: the control files the kernel would
/// show, created empty or with their initial content, so the writes can be read back.
fn fake_v2_tree(root: &Path, name: &str) {
    let write = |p: PathBuf, s: &str| std::fs::write(p, s).unwrap();
    write(
        root.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    );
    write(root.join("cgroup.subtree_control"), "");
    let parent = root.join(name.rsplit_once('/').unwrap().0);
    std::fs::create_dir_all(&parent).unwrap();
    write(parent.join("cgroup.controllers"), "cpu memory pids\n");
    write(parent.join("cgroup.subtree_control"), "memory\n");
    let leaf = root.join(name);
    std::fs::create_dir_all(&leaf).unwrap();
    for f in ["memory.max", "memory.swap.max", "cpu.max", "pids.max"] {
        write(leaf.join(f), "");
    }
    write(leaf.join("cgroup.freeze"), "1\n");
    write(leaf.join("cgroup.events"), "populated 0\nfrozen 1\n");
}

#[test]
fn pure_v2_create_enables_controllers_thaws_and_writes_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let name = "mig-host-a/0123";
    fake_v2_tree(root, name);
    let layout = Layout {
        unified: Some(root.to_path_buf()),
        v1: Vec::new(),
    };
    let limits = Limits {
        memory: Some(256 << 20),
        cpu_millis: Some(1500),
        pids: Some(64),
    };
    let mut created = Vec::new();
    // The fake cgroup.events keeps saying frozen (no kernel behind it): what matters is that
    // create wrote 0 to cgroup.freeze, checked below.
    let cg = create_in(&layout, name, &limits, &mut created).unwrap();
    assert!(created.is_empty(), "both directories already existed");
    assert_eq!(cg.dirs, vec![(UNIFIED.to_owned(), root.join(name))]);
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
    // The parent already had memory; the rest is added (written over the fake file's start).
    assert!(read("mig-host-a/cgroup.subtree_control").starts_with("+cpu +pids"));
    let leaf = |f: &str| read(&format!("{name}/{f}"));
    assert!(leaf("cgroup.freeze").starts_with('0'), "create thaws");
    assert_eq!(leaf("memory.max"), (256u64 << 20).to_string());
    assert_eq!(leaf("memory.swap.max"), "0");
    assert_eq!(leaf("cpu.max"), "150000 100000");
    assert_eq!(leaf("pids.max"), "64");
    assert_eq!(cg.freezer_dir(), Some(root.join(name)));
    assert_eq!(cg.v1_dir("memory"), None);
}

#[test]
fn pure_v2_create_records_new_dirs_and_missing_controller_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::write(root.join("cgroup.controllers"), "").unwrap();
    let layout = Layout {
        unified: Some(root.to_path_buf()),
        v1: Vec::new(),
    };
    let mut created = Vec::new();
    let limits = Limits {
        memory: Some(1 << 20),
        ..Limits::default()
    };
    let err = create_in(&layout, "a/b", &limits, &mut created).unwrap_err();
    assert!(matches!(
        err,
        CgroupError::NoController {
            controller: "memory",
            ..
        }
    ));
    assert_eq!(created, vec![root.join("a"), root.join("a/b")]);
}

#[test]
fn memory_room_is_the_limit_less_what_cannot_be_reclaimed() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(tmp.path().join(name), text).unwrap();
    // cgroup2: 1 GiB limit, 700 MiB charged of which 200 MiB page cache.
    write("memory.max", "1073741824\n");
    write("memory.current", &format!("{}\n", 700 << 20));
    write(
        "memory.stat",
        &format!(
            "anon {}\nfile {}\ninactive_file {}\nactive_file {}\n",
            500 << 20,
            200 << 20,
            150 << 20,
            50 << 20
        ),
    );
    assert_eq!(usage::room_in(tmp.path()).unwrap(), Some(524 << 20));
    write("memory.max", "max\n");
    assert_eq!(usage::room_in(tmp.path()).unwrap(), None);
    // cgroup v1: `total_*` counts the children too; the larger figure is the subtree's.
    std::fs::remove_file(tmp.path().join("memory.max")).unwrap();
    write("memory.limit_in_bytes", &format!("{}\n", 32 << 20));
    write("memory.usage_in_bytes", &format!("{}\n", 40 << 20));
    write(
        "memory.stat",
        &format!(
            "inactive_file 0\nactive_file 0\ntotal_inactive_file {}\ntotal_active_file 0\n",
            4 << 20
        ),
    );
    // Over the limit by more than the page cache: no room at all.
    assert_eq!(usage::room_in(tmp.path()).unwrap(), Some(0));
    write("memory.usage_in_bytes", &format!("{}\n", 11 << 20));
    assert_eq!(usage::room_in(tmp.path()).unwrap(), Some(25 << 20));
    // v1's "no limit" is PAGE_COUNTER_MAX pages.
    write("memory.limit_in_bytes", "9223372036854771712\n");
    assert_eq!(usage::room_in(tmp.path()).unwrap(), None);
}
