//! Freeze, thaw and kill: cgroup2's `cgroup.freeze`/`cgroup.kill` when the kernel has them, the
//! v1 freezer and repeated SIGKILL otherwise.

use super::{fsio, Cgroup, CgroupError};
use nix::errno::Errno;
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a cgroup's freezer state stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FreezeState {
    /// Running.
    Thawed,
    /// Asked to freeze; some task has not stopped yet.
    Freezing,
    /// Every task is stopped.
    Frozen,
}

/// The freezer a cgroup uses.
#[derive(Debug)]
pub(super) enum Freezer<'a> {
    /// cgroup2 directory with `cgroup.freeze` and `cgroup.events`.
    V2(&'a Path),
    /// v1 freezer hierarchy directory with `freezer.state`.
    V1(&'a Path),
}

impl Freezer<'_> {
    pub(super) fn dir(&self) -> &Path {
        match self {
            Freezer::V2(d) | Freezer::V1(d) => d,
        }
    }
}

/// First sleep between polls of the freezer state, doubled up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(10);

/// How long [`kill`] waits for the killed processes to leave the cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn freezer(cg: &Cgroup) -> Option<Freezer<'_>> {
    if let Some(d) = cg.unified_dir() {
        if d.join("cgroup.freeze").exists() {
            return Some(Freezer::V2(d));
        }
    }
    cg.v1_dir("freezer").map(Freezer::V1)
}

fn no_freezer(cg: &Cgroup) -> CgroupError {
    CgroupError::NoFreezer {
        name: cg.name.clone(),
    }
}

pub(super) fn state(cg: &Cgroup) -> Result<FreezeState, CgroupError> {
    match freezer(cg).ok_or_else(|| no_freezer(cg))? {
        Freezer::V2(d) => v2_state(d),
        Freezer::V1(d) => v1_state(d),
    }
}

fn read_state_file(path: PathBuf) -> Result<String, CgroupError> {
    std::fs::read_to_string(&path).map_err(|source| CgroupError::FreezerState { path, source })
}

fn v2_state(dir: &Path) -> Result<FreezeState, CgroupError> {
    let wanted = read_state_file(dir.join("cgroup.freeze"))?;
    let events_path = dir.join("cgroup.events");
    let events = read_state_file(events_path.clone())?;
    let frozen = match fsio::keyed(&events, "frozen") {
        Some("1") => true,
        Some("0") => false,
        _ => {
            return Err(CgroupError::Parse {
                path: events_path,
                value: events,
            })
        }
    };
    Ok(match (wanted.trim() == "1", frozen) {
        (_, true) => FreezeState::Frozen,
        (true, false) => FreezeState::Freezing,
        (false, false) => FreezeState::Thawed,
    })
}

fn v1_state(dir: &Path) -> Result<FreezeState, CgroupError> {
    let path = dir.join("freezer.state");
    let text = read_state_file(path.clone())?;
    match text.trim() {
        "THAWED" => Ok(FreezeState::Thawed),
        "FREEZING" => Ok(FreezeState::Freezing),
        "FROZEN" => Ok(FreezeState::Frozen),
        _ => Err(CgroupError::Parse { path, value: text }),
    }
}

pub(super) fn freeze(cg: &Cgroup, timeout: Duration) -> Result<(), CgroupError> {
    let f = freezer(cg).ok_or_else(|| no_freezer(cg))?;
    let (path, value) = match f {
        Freezer::V2(d) => (d.join("cgroup.freeze"), "1"),
        Freezer::V1(d) => (d.join("freezer.state"), "FROZEN"),
    };
    let start = Instant::now();
    let mut pause = POLL_MIN;
    fsio::write(&path, value).map_err(|source| CgroupError::Freeze {
        path: path.clone(),
        source,
    })?;
    loop {
        let now = match f {
            Freezer::V2(d) => v2_state(d)?,
            Freezer::V1(d) => v1_state(d)?,
        };
        if now == FreezeState::Frozen {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let thaw_error = thaw(cg).err().map(Box::new);
            return Err(CgroupError::FreezeTimeout {
                path,
                timeout,
                thaw_error,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_MAX);
        if let Freezer::V1(_) = f {
            // The v1 freezer stops trying when a task resists; asking again retries the stragglers.
            fsio::write(&path, value).map_err(|source| CgroupError::Freeze {
                path: path.clone(),
                source,
            })?;
        }
    }
}

pub(super) fn thaw(cg: &Cgroup) -> Result<(), CgroupError> {
    let (path, value) = match freezer(cg).ok_or_else(|| no_freezer(cg))? {
        Freezer::V2(d) => (d.join("cgroup.freeze"), "0"),
        Freezer::V1(d) => (d.join("freezer.state"), "THAWED"),
    };
    fsio::write(&path, value).map_err(|source| CgroupError::Thaw { path, source })
}

pub(super) fn kill(cg: &Cgroup) -> Result<(), CgroupError> {
    let kill_file = cg
        .unified_dir()
        .map(|d| d.join("cgroup.kill"))
        .filter(|p| p.exists());
    let v1_freezer = cg.v1_dir("freezer").map(Path::to_path_buf);
    let start = Instant::now();
    let mut pause = POLL_MIN;
    let mut round = 0u32;
    loop {
        let pids = cg.procs()?;
        if pids.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= KILL_TIMEOUT {
            return Err(CgroupError::KillTimeout {
                name: cg.name.clone(),
                pids,
                timeout: KILL_TIMEOUT,
            });
        }
        // cgroup.kill kills the whole cgroup2 subtree at once, new forks included, frozen or not.
        if let Some(path) = &kill_file {
            match fsio::write(path, "1") {
                Ok(()) => {}
                // The cgroup2 directory vanished meanwhile; the signals below still apply.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Kill {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        // Without cgroup.kill, and for anything cgroup.kill left (a process that joined only v1
        // hierarchies), signal each PID. The PIDs were read from the cgroup an instant ago; a PID
        // reused in between is the accepted race of every pre-5.14 runtime.
        if kill_file.is_none() || round > 0 {
            for pid in &pids {
                match send_signal(Pid::from_raw(*pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(source) => return Err(CgroupError::Signal { pid: *pid, source }),
                }
            }
        }
        round += 1;
        // A task frozen by the v1 freezer does not act on SIGKILL until thawed.
        if let Some(dir) = &v1_freezer {
            let path = dir.join("freezer.state");
            match fsio::write(&path, "THAWED") {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Thaw { path, source }),
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// How often [`freeze_for_dump`] thaws again for a process in the middle of a `vfork`.
const VFORK_RETRIES: u32 = 100;
/// How long the cgroup runs between two such tries: a `vfork` child reaches its `exec` in
/// microseconds.
const VFORK_PAUSE: Duration = Duration::from_millis(1);

/// Freezes the cgroup for CRIU, which cannot seize a process that waits for a `vfork` child
/// (Debian's `/bin/sh` starts every command so, and glibc's `posix_spawn`): the parent sleeps
/// uninterruptibly until the child calls `exec` or exits, which a frozen child never does, and
/// the dump failed after CRIU's 10 s timeout (QA of session 21: 7 of 65 checkpoints of a dash
/// loop). When the freeze caught one, the cgroup runs again for a moment and is frozen anew.
/// After [`VFORK_RETRIES`] it stays frozen as it is, and the dump says why it failed.
pub(super) fn freeze_for_dump(cg: &Cgroup, timeout: Duration) -> Result<u32, CgroupError> {
    let mut retries = 0;
    loop {
        freeze(cg, timeout)?;
        if retries == VFORK_RETRIES || vfork_children(cg).is_empty() {
            return Ok(retries);
        }
        thaw(cg)?;
        std::thread::sleep(VFORK_PAUSE);
        retries += 1;
    }
}

/// Processes of the cgroup that share their parent's memory: children of a `vfork` (or of
/// `clone(CLONE_VM)` without `CLONE_THREAD`) that have not called `exec` yet.
pub(super) fn vfork_children(cg: &Cgroup) -> Vec<i32> {
    let Ok(pids) = cg.procs() else {
        return Vec::new();
    };
    pids.iter()
        .copied()
        .filter(|&pid| {
            crate::pidmap::parent_pid(pid)
                .filter(|ppid| pids.binary_search(ppid).is_ok())
                .is_some_and(|ppid| same_memory(ppid, pid))
        })
        .collect()
}

/// Whether two processes use one address space (`kcmp(2)` with `KCMP_VM`).
fn same_memory(a: i32, b: i32) -> bool {
    const KCMP_VM: libc::c_long = 1;
    // SAFETY: kcmp takes two PIDs, a type and two integers; it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(a),
            libc::c_long::from(b),
            KCMP_VM,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    r == 0
}
