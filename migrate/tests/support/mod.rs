//! What the root tests of the CRIU driver share: skipping without root or CRIU, a guard that
//! kills and reaps what a test started, and dumps tried again on CRIU's seize race.
#![allow(dead_code)] // each test file uses a part

use mig_migrate::criu::{Criu, CriuError, DumpOpts, DumpStats};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::process::Command;
use std::time::{Duration, Instant};

/// The CRIU to test with, or `None` (with a note) when not root or CRIU is missing.
pub fn criu_or_skip() -> Option<Criu> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: skipping");
        return None;
    }
    match Criu::locate() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("{e}: skipping");
            None
        }
    }
}

/// Kills (SIGKILL) and reaps every PID it holds when dropped.
#[derive(Default)]
pub struct Reaper(pub Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        for &p in &self.0 {
            // Only our children (or re-parented to us as subreaper) can be reaped; others are
            // gone with their parent.
            let _ = waitpid(Pid::from_raw(p), None);
        }
    }
}

/// Whether a dump failed in CRIU's seize race: "Unseizable non-zombie ... err -1/10" and "Can't
/// get /proc fd" from the parasite, seen on the test machine on 2026-12-02 while a task of the
/// tree forked or exited during the seize; a failed seize leaves the tree running, untouched,
/// and the dump may be tried again. (In criu_tree's pre-frozen test the same message came from a
/// child outside the frozen cgroup, which no retry cures: see `TestCgroup::holds_children_of`.)
pub fn seize_race(e: &CriuError) -> bool {
    matches!(e, CriuError::Failed { errors, .. } if errors.iter().any(|e| {
        e.contains("Unseizable non-zombie") || e.contains("Can't get /proc fd")
    }))
}

/// `criu.dump(opts)`, tried again (at most 3 times, the images directory emptied between) on
/// the seize race. What these tests check starts after the dump.
pub fn dump_retrying(criu: &Criu, opts: &DumpOpts) -> DumpStats {
    for attempt in 1.. {
        match criu.dump(opts) {
            Ok(stats) => return stats,
            Err(e) if attempt < 3 && seize_race(&e) => {
                eprintln!("criu could not seize the tree (attempt {attempt}), again: {e:?}");
                std::fs::remove_dir_all(&opts.images_dir).unwrap();
            }
            Err(e) => panic!("dump: {e:?}"),
        }
    }
    unreachable!()
}

/// `unshare` ready to run a program (the arguments that follow) as the init of new PID, UTS and
/// IPC namespaces, leader of its own session: the shape of a container's process tree.
pub fn in_pid_namespace() -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--pid",
        "--fork",
        "--uts",
        "--ipc",
        "/bin/busybox",
        "setsid",
    ]);
    c
}

/// Spawns `cmd` (made by [`in_pid_namespace`]), gives `reaper` the `unshare` and the init it
/// forks, and returns the init's host PID.
#[allow(clippy::zombie_processes)] // the reaper waits for both by PID
pub fn spawn_init(cmd: &mut Command, reaper: &mut Reaper) -> i32 {
    let child = cmd.spawn().unwrap();
    let unshare = child.id() as i32;
    reaper.0.push(unshare);
    let init = first_child(unshare);
    reaper.0.push(init);
    init
}

/// The children of `pid` (its main thread's), as the kernel lists them.
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The first child of `pid`, waited for up to 5 s (the init `unshare` forks).
pub fn first_child(pid: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(&c) = children_of(pid).first() {
            return c;
        }
        assert!(Instant::now() < deadline, "{pid} has no child after 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}
