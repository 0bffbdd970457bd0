//! Root integration tests of the CRIU driver against the real CRIU and kernel: a process tree in
//! its own PID, UTS and IPC namespaces (sharing the host's mounts), writing a counter to a pipe,
//! is dumped, restored with the pipe handed over through `--inherit-fd`, and continues counting
//! with the same in-namespace PID. Skipped (with a note) when not root or CRIU is missing.
//!
//! Every process started here is killed and reaped by a guard, even when an assertion fails.

use mig_migrate::criu::{
    Criu, CriuError, DumpOpts, LazyPagesOpts, PageServerOpts, PageTarget, RestoreOpts,
    RestoreOutcome,
};
use mig_migrate::imageset::{self, SealInfo};
use mig_runtime::pidmap::pid_map;
use mig_runtime::spec::{ContainerSpec, ImageRef, Limits, ProcessSpec};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod support;

use support::{children_of, criu_or_skip, dump_retrying, first_child, in_pid_namespace, Reaper};

const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";

/// Restores with `opts` (its images dir and any extra option) as on a destination host: a new
/// pipe stands in for the tree's old stdout (`stdout_pipe`), with CRIU's log and pidfile in the
/// images dir. The restored init goes to `reaper`; returns the outcome and the pipe's read end.
fn restore_piped(
    criu: &Criu,
    stdout_pipe: &str,
    reaper: &mut Reaper,
    opts: RestoreOpts,
) -> (RestoreOutcome, BufReader<std::fs::File>) {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let outcome = criu
        .restore(&RestoreOpts {
            inherit_fds: vec![(w.as_raw_fd(), stdout_pipe.to_owned())],
            log_file: "restore.log".into(),
            pidfile: "restore.pid".into(),
            ..opts
        })
        .unwrap();
    reaper.0.push(outcome.pid);
    drop(w);
    (outcome, BufReader::new(std::fs::File::from(r)))
}

/// Seals the images of a dumped counter tree as `mig` does (spec, CRIU version, PID map, stdout
/// pipe, statistics).
fn seal_tree(
    criu: &Criu,
    images: &Path,
    tree: &Tree,
    pid_map: &[mig_runtime::pidmap::PidEntry],
    stats: mig_migrate::criu::DumpStats,
) -> imageset::Manifest {
    imageset::seal(
        images,
        SealInfo {
            spec: spec(),
            criu_version: criu.version().unwrap(),
            pid_map: pid_map.to_vec(),
            stdio_pipe: Some(tree.stdout_pipe.clone()),
            stats: Some(stats),
        },
    )
    .unwrap()
}

/// A counter tree: `unshare` (our child) and its child, the namespace's init (`sh`, PID 1 in
/// its PID namespace, leader of its own session), with stdout on the write end of a pipe.
struct Tree {
    unshare: i32,
    init: i32,
    lines: BufReader<std::fs::File>,
    stdout_pipe: String,
    /// The last number read from the pipe.
    last: u64,
}

impl Tree {
    /// Reads the pipe to its end (the tree is gone) and returns the last number printed.
    fn last_printed(&mut self) -> u64 {
        let mut last = self.last;
        let mut l = String::new();
        while self.lines.read_line(&mut l).unwrap() > 0 {
            last = l.trim().parse().unwrap();
            l.clear();
        }
        last
    }

    fn next(&mut self) -> u64 {
        self.last = read_number(&mut self.lines);
        self.last
    }
}

// The `unshare` child is reaped by the Reaper guard with waitpid, not through `Child`.
#[allow(clippy::zombie_processes)]
fn start_tree(reaper: &mut Reaper) -> Tree {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let child = in_pid_namespace()
        .args(["/bin/busybox", "sh", "-c", COUNTER])
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let unshare = child.id() as i32;
    reaper.0.push(unshare);
    let init = first_child(unshare);
    reaper.0.push(init);
    let mut lines = BufReader::new(std::fs::File::from(r));
    // Wait until the init has exec'd the shell and counts.
    let last = read_number(&mut lines);
    assert!(last >= 1);
    let stdout_pipe = std::fs::read_link(format!("/proc/{init}/fd/1"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(stdout_pipe.starts_with("pipe:["), "{stdout_pipe}");
    Tree {
        unshare,
        init,
        lines,
        stdout_pipe,
        last,
    }
}

fn read_number(lines: &mut impl BufRead) -> u64 {
    let mut l = String::new();
    assert!(
        lines.read_line(&mut l).unwrap() > 0,
        "the counter's pipe closed"
    );
    l.trim().parse().unwrap()
}

fn ns_pid(host_pid: i32) -> i32 {
    pid_map(&[host_pid])[0].ns_pid
}

fn spec() -> ContainerSpec {
    ContainerSpec {
        id: format!("{:032x}", std::process::id()),
        name: "criu-tree".into(),
        image: ImageRef {
            name: "busybox".into(),
            id: format!("sha256:{}", "a".repeat(64)),
            layers: vec![],
        },
        process: ProcessSpec {
            args: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        },
        hostname: "criu-tree".into(),
        limits: Limits::default(),
        userns: None,
        net: None,
    }
}

#[test]
fn dump_kill_restore_continues_counting_with_the_same_pids() {
    let Some(criu) = criu_or_skip() else { return };
    // Restored trees are re-parented to the nearest subreaper when `criu restore -d` exits:
    // make that this test process (as the shim does) so they can be reaped.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut reaper = Reaper::default();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut tree = start_tree(&mut reaper);
    assert_eq!(ns_pid(tree.init), 1);
    let map_before = pid_map(&[tree.init]);

    let stats = criu
        .dump(&DumpOpts {
            pid: tree.init,
            images_dir: images.clone(),
            log_file: "dump.log".into(),
            ..Default::default()
        })
        .unwrap();
    eprintln!("dump stats: {stats:?}");
    assert!(stats.pages_written > 0 && stats.frozen_time_us > 0);
    assert!(stats.wall_time_us >= stats.frozen_time_us);
    assert!(images.join("dump.log").exists());
    // The tree is gone: `unshare` exits with its child, the pipe reaches end of file.
    let _ = waitpid(Pid::from_raw(tree.unshare), None);
    let last = tree.last_printed();
    assert!(last > 0);

    let manifest = seal_tree(&criu, &images, &tree, &map_before, stats);
    assert!(manifest.files.iter().any(|f| f.path == "pstree.img"));
    assert_eq!(imageset::verify(&images).unwrap(), manifest);

    // A new pipe stands in for the old one, as on a destination host.
    let (outcome, mut lines) = restore_piped(
        &criu,
        &tree.stdout_pipe,
        &mut reaper,
        RestoreOpts {
            images_dir: images.clone(),
            ..Default::default()
        },
    );
    eprintln!("restore: {outcome:?}");
    assert!(outcome.stats.restore_time_us > 0);
    assert_eq!(ns_pid(outcome.pid), 1, "the restored init is PID 1 again");
    assert_eq!(read_number(&mut lines), last + 1, "the counter continues");
    assert_eq!(read_number(&mut lines), last + 2);
    let map_after = pid_map(&[outcome.pid]);
    assert_eq!(map_after[0].ns_pid, map_before[0].ns_pid);
    assert_eq!(map_after[0].cmd, map_before[0].cmd);
    // Restoring also leaves its log and the set still verifies (logs are not part of it).
    assert!(images.join("restore.log").exists());
    drop(reaper);
}

/// Pre-copy's destination layout with what this kernel allows (no soft-dirty tracking, so no
/// real pre-dump and no dump chained to a parent, see docs/criu.md): a full dump that leaves the
/// tree running stands in for round 1 in `rounds/1/`, the final dump goes to `images/`, and
/// `images/parent -> ../rounds/1` is written as the destination writes it. The image set seals
/// and verifies without the link (it is not a file of the set), and CRIU restores through the
/// layout: the counter continues. It does not show pages read through the link (every page is
/// in the final images here).
#[test]
fn a_final_dump_beside_its_rounds_restores_through_the_parent_link() {
    let Some(criu) = criu_or_skip() else { return };
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut reaper = Reaper::default();
    let dir = tempfile::tempdir().unwrap();
    let round = dir.path().join("rounds/1");
    let images = dir.path().join("images");
    let mut tree = start_tree(&mut reaper);
    let map_before = pid_map(&[tree.init]);
    dump_retrying(
        &criu,
        &DumpOpts {
            pid: tree.init,
            images_dir: round.clone(),
            leave_running: true,
            log_file: "dump.log".into(),
            ..Default::default()
        },
    );
    tree.next();
    let stats = dump_retrying(
        &criu,
        &DumpOpts {
            pid: tree.init,
            images_dir: images.clone(),
            log_file: "dump.log".into(),
            ..Default::default()
        },
    );
    let _ = waitpid(Pid::from_raw(tree.unshare), None);
    let last = tree.last_printed();
    std::os::unix::fs::symlink("../rounds/1", images.join("parent")).unwrap();
    let manifest = seal_tree(&criu, &images, &tree, &map_before, stats);
    assert!(manifest.files.iter().all(|f| f.path != "parent"));
    imageset::verify(&images).unwrap();
    let (outcome, mut lines) = restore_piped(
        &criu,
        &tree.stdout_pipe,
        &mut reaper,
        RestoreOpts {
            images_dir: images.clone(),
            ..Default::default()
        },
    );
    assert_eq!(read_number(&mut lines), last + 1, "the counter continues");
    assert_eq!(ns_pid(outcome.pid), 1);
    let log = std::fs::read_to_string(images.join("restore.log")).unwrap_or_default();
    for l in log.lines().filter(|l| l.contains("parent")).take(5) {
        eprintln!("restore.log: {l}");
    }
    drop(reaper);
}

#[test]
fn checkpoint_leave_running_keeps_the_tree_alive() {
    let Some(criu) = criu_or_skip() else { return };
    let mut reaper = Reaper::default();
    let dir = tempfile::tempdir().unwrap();
    let mut tree = start_tree(&mut reaper);
    let before = tree.next();
    criu.dump(&DumpOpts {
        pid: tree.init,
        images_dir: dir.path().join("images"),
        leave_running: true,
        log_file: "dump.log".into(),
        ..Default::default()
    })
    .unwrap();
    let after = tree.next();
    assert!(after > before);
    // A second dump into the same directory is refused: old images would mix with new ones.
    let again = criu.dump(&DumpOpts {
        pid: tree.init,
        images_dir: dir.path().join("images"),
        leave_running: true,
        log_file: "dump.log".into(),
        ..Default::default()
    });
    assert!(
        matches!(again, Err(CriuError::ImagesDirNotEmpty { .. })),
        "{again:?}"
    );
    assert!(
        waitpid(Pid::from_raw(tree.unshare), Some(WaitPidFlag::WNOHANG))
            .is_ok_and(|s| s == nix::sys::wait::WaitStatus::StillAlive)
    );
}

#[test]
fn failures_carry_the_log_reason() {
    let Some(criu) = criu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let err = criu
        .restore(&RestoreOpts {
            images_dir: dir.path().join("empty"),
            log_file: "restore.log".into(),
            pidfile: "restore.pid".into(),
            ..Default::default()
        })
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    match err {
        CriuError::Failed {
            op, errors, log, ..
        } => {
            assert_eq!(op, "restore");
            assert_eq!(log, dir.path().join("empty/restore.log"));
            assert!(!errors.is_empty());
            assert!(!errors.iter().any(|e| e.contains("RLIMIT_NOFILE")));
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = criu
        .restore(&RestoreOpts {
            images_dir: dir.path().join("empty"),
            inherit_fds: vec![(1, "pipe:[1]".into())],
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, CriuError::InheritFd { fd: 1 }));
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or("")))
    })
}

/// A cgroup2 directory of this test, killed and removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(mount: &Path, name: &str) -> TestCgroup {
        let dir = mount.join(format!("mig-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        TestCgroup(dir)
    }
    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.0.join(file), value).unwrap();
    }
    /// Waits until every child of `pid` is in this cgroup too: a child forked before `pid` moved
    /// in (the counter's `sleep 0.05`) stays where it was, unfrozen, and CRIU cannot seize it
    /// from the frozen cgroup ("Unseizable non-zombie ... state S, err -1/10").
    fn holds_children_of(&self, pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap();
            if children_of(pid)
                .iter()
                .all(|c| procs.lines().any(|p| p == c.to_string()))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "children of {pid} outside the cgroup"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn frozen(&self) -> bool {
        std::fs::read_to_string(self.0.join("cgroup.events"))
            .unwrap()
            .lines()
            .any(|l| l == "frozen 1")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads every line available now from a non-blocking pipe; returns the last number, if any.
fn drain(lines: &mut BufReader<std::fs::File>) -> Option<u64> {
    let mut last = None;
    let mut l = String::new();
    loop {
        match lines.read_line(&mut l) {
            Ok(0) => return last,
            Ok(_) => {
                if let Ok(n) = l.trim().parse() {
                    last = Some(n);
                }
                l.clear();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return last,
            Err(e) => panic!("{e}"),
        }
    }
}

/// The migration path: freeze the cgroup first, dump leaving the tree running (so it stays
/// frozen, as CRIU restores the freezer state it found), kill the frozen source, restore with
/// the restored tasks placed into another cgroup by the criu child.
#[test]
fn prefrozen_dump_stays_frozen_and_restore_lands_in_the_cgroup() {
    let Some(criu) = criu_or_skip() else { return };
    let Some(mount) = cgroup2_mount() else {
        eprintln!("no cgroup2 mount: skipping");
        return;
    };
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut reaper = Reaper::default();
    let src = TestCgroup::new(&mount, "criu-src");
    let dst = TestCgroup::new(&mount, "criu-dst");
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut tree = start_tree(&mut reaper);
    src.write("cgroup.procs", &tree.init.to_string());
    src.holds_children_of(tree.init);
    src.write("cgroup.freeze", "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !src.frozen() {
        assert!(Instant::now() < deadline, "cgroup did not freeze");
        std::thread::sleep(Duration::from_millis(2));
    }
    let fd = tree.lines.get_ref().as_fd();
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    let mut last = drain(&mut tree.lines).unwrap_or(tree.last);

    let stats = dump_retrying(
        &criu,
        &DumpOpts {
            pid: tree.init,
            images_dir: images.clone(),
            freeze_cgroup: Some(src.0.clone()),
            leave_running: true,
            log_file: "dump.log".into(),
            ..Default::default()
        },
    );
    eprintln!("pre-frozen dump: {stats:?}");
    assert!(src.frozen(), "the source stays frozen after the dump");
    std::thread::sleep(Duration::from_millis(200));
    last = drain(&mut tree.lines).unwrap_or(last);
    assert!(drain(&mut tree.lines).is_none(), "a frozen tree printed");

    // Commit: the frozen source is destroyed.
    src.write("cgroup.kill", "1");
    let _ = waitpid(Pid::from_raw(tree.unshare), None);

    let (outcome, mut lines) = restore_piped(
        &criu,
        &tree.stdout_pipe,
        &mut reaper,
        RestoreOpts {
            images_dir: images.clone(),
            cgroup_procs: vec![dst.0.join("cgroup.procs")],
            ..Default::default()
        },
    );
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", outcome.pid)).unwrap();
    let want = format!("0::/{}", dst.0.file_name().unwrap().to_string_lossy());
    assert!(cg.lines().any(|l| l == want), "{cg}");
    assert_eq!(read_number(&mut lines), last + 1, "the counter continues");
    drop(reaper);
    drop(src);
    drop(dst);
}

/// Pages go to a page server (over a socketpair, as the agent bridges it to QUIC, and over TCP
/// on loopback) instead of the source's images directory; the restore reads them from the
/// destination's directory.
#[test]
fn dump_through_a_page_server_then_restore() {
    let Some(criu) = criu_or_skip() else { return };
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    for socketpair in [true, false] {
        let mut reaper = Reaper::default();
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let mut tree = start_tree(&mut reaper);
        let (dump_side, server_side);
        let (dump_target, listen) = if socketpair {
            let (a, b) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .unwrap();
            (dump_side, server_side) = (Some(a), Some(b));
            (
                PageTarget::Socket(dump_side.as_ref().unwrap().as_raw_fd()),
                PageTarget::Socket(server_side.as_ref().unwrap().as_raw_fd()),
            )
        } else {
            (dump_side, server_side) = (None, None);
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let t = PageTarget::Tcp {
                address: "127.0.0.1".into(),
                port,
            };
            (t.clone(), t)
        };
        let server = criu
            .page_server(&PageServerOpts {
                images_dir: dst.clone(),
                listen,
                log_file: "page-server.log".into(),
                ready_timeout: Duration::from_secs(10),
            })
            .unwrap();
        drop(server_side);
        let stats = criu
            .dump(&DumpOpts {
                pid: tree.init,
                images_dir: src.clone(),
                page_server: Some(dump_target),
                log_file: "dump.log".into(),
                ..Default::default()
            })
            .unwrap();
        drop(dump_side);
        server.wait().unwrap();
        eprintln!("socketpair={socketpair}: {stats:?}");
        let _ = waitpid(Pid::from_raw(tree.unshare), None);
        let last = tree.last_printed();
        let names = |d: &Path| -> Vec<String> {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert!(!names(&src).iter().any(|n| n.starts_with("pages-")));
        assert!(names(&dst).iter().any(|n| n.starts_with("pages-")));
        for n in names(&src) {
            if !n.ends_with(".log") {
                std::fs::copy(src.join(&n), dst.join(&n)).unwrap();
            }
        }
        let (_, mut lines) = restore_piped(
            &criu,
            &tree.stdout_pipe,
            &mut reaper,
            RestoreOpts {
                images_dir: dst.clone(),
                ..Default::default()
            },
        );
        assert_eq!(read_number(&mut lines), last + 1, "the counter continues");
    }
}

/// Post-copy: the source dumps everything but memory and serves pages over a socketpair; the
/// destination restores with a lazy-pages daemon fetching them, and the tree runs before the last
/// page arrived. Needs fs.pipe-max-size raised (scripts/setup.sh does it).
#[test]
fn post_copy_over_a_socketpair() {
    let Some(criu) = criu_or_skip() else { return };
    if let Err(e) = mig_migrate::criu::check_pipe_max_size() {
        eprintln!("{e}: skipping");
        return;
    }
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut reaper = Reaper::default();
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let tree = start_tree(&mut reaper);
    let (a, b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let t0 = Instant::now();
    let dump = criu
        .dump_lazy(
            &DumpOpts {
                pid: tree.init,
                images_dir: src.clone(),
                log_file: "dump.log".into(),
                ..Default::default()
            },
            &PageTarget::Socket(a.as_raw_fd()),
            Duration::from_secs(10),
        )
        .unwrap();
    let images_ready = t0.elapsed();
    drop(a);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let n = e.unwrap().file_name();
        if !n.to_string_lossy().ends_with(".log") {
            std::fs::copy(src.join(&n), dst.join(&n)).unwrap();
        }
    }
    let daemon = criu
        .lazy_pages(&LazyPagesOpts {
            images_dir: dst.clone(),
            source: PageTarget::Socket(b.as_raw_fd()),
            log_file: "lazy-pages.log".into(),
            ready_timeout: Duration::from_secs(10),
            hold: None,
        })
        .unwrap();
    drop(b);
    // The container's memory depends on the daemon: the OOM killer must leave it alone.
    let pid = daemon.pid().unwrap();
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    // Lowering it needs CAP_SYS_RESOURCE, which root lacks on some hosts (this test VM).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_RESOURCE: u32 = 24;
    if eff & (1 << CAP_SYS_RESOURCE) != 0 {
        assert_eq!(adj.trim(), "-1000");
    } else {
        eprintln!(
            "no CAP_SYS_RESOURCE: the daemon's oom_score_adj stays {}",
            adj.trim()
        );
    }
    let (_, mut lines) = restore_piped(
        &criu,
        &tree.stdout_pipe,
        &mut reaper,
        RestoreOpts {
            images_dir: dst.clone(),
            lazy_pages: true,
            ..Default::default()
        },
    );
    let resumed = t0.elapsed();
    let next = read_number(&mut lines);
    assert!(next > tree.last, "{next} after {}", tree.last);
    daemon.wait().unwrap();
    let stats = dump.wait().unwrap();
    eprintln!(
        "post-copy: images ready {} ms, resumed {} ms, all pages {} ms; {stats:?}",
        images_ready.as_millis(),
        resumed.as_millis(),
        t0.elapsed().as_millis()
    );
    // CRIU 4.1.1 writes no counters into a post-copy dump's stats-dump; only the wall time is
    // meaningful.
    assert!(stats.wall_time_us > 0);
    let _ = waitpid(Pid::from_raw(tree.unshare), None);
    assert_eq!(read_number(&mut lines), next + 1);
}
