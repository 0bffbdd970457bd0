//! The agent's state directory and the records kept in it (docs/architecture.md, "On-disk layout").
//!
//! ```text
//! <state-dir>/images/                     ImageStore (mig-runtime)
//! <state-dir>/containers/<id>/spec.json   ContainerSpec
//!                            state.json   StateRecord (written by migd)
//!                            shim.json    ShimRecord  (written by the shim once the init runs)
//!                            exit.json    ExitRecord  (written by the shim when the init has exited)
//!                            container.log   the init's stdout and stderr, appended by the shim
//!                            shim.log     the shim's own diagnostics
//!                            (both 0600: open_log)
//!                            upper/ work/ the overlay's writable layer and work dir
//!                            rootfs/      the overlay mount point
//!                            checkpoint/  CRIU images (issue 3)
//! ```
//!
//! Every JSON file is written atomically with [`mig_runtime::fsutil`], and carries its format
//! version ([`RECORD_FORMAT`]): read and write them with [`read_record`] and [`write_record`].

use crate::api::ContainerState;
use mig_runtime::fsutil::{self, Format};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The largest state file read back (they are a few hundred bytes).
pub const MAX_RECORD: u64 = 1 << 20;

/// Format of the container records (`spec.json`, `state.json`, `shim.json`, `exit.json`): 1 is
/// mig 0.1's (no `format` key), 2 adds the key. Older formats are read; a newer one is refused
/// with the file and both versions named, and the file is left as it is.
pub const RECORD_FORMAT: Format = Format {
    key: "format",
    current: 2,
};

/// Reads a container record of this format or an older one ([`fsutil::read_versioned`]).
pub fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    fsutil::read_versioned(path, MAX_RECORD, RECORD_FORMAT)
}

/// Writes a container record atomically, stamped with [`RECORD_FORMAT`].
pub fn write_record<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    fsutil::write_versioned(path, value, RECORD_FORMAT)
}

/// Paths inside the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_owned(),
        }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
    /// The directory of one container; `id` must have been validated.
    pub fn container(&self, id: &str) -> ContainerDir {
        ContainerDir {
            dir: self.containers().join(id),
        }
    }
}

/// Paths of one container.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub dir: PathBuf,
}

/// Opens a container's log (`container.log`, `shim.log`) for appending, creating it mode 0600
/// ([`fsutil::PRIVATE_FILE`]): it holds the container's output, root's alone like the state files.
/// A log that exists with another mode gets 0600 too: one made by an older agent (the umask's
/// 0644), or a `container.log` moved in from the source host (received with the umask's mode).
pub fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(fsutil::PRIVATE_FILE)
        .open(path)?;
    if f.metadata()?.permissions().mode() & 0o7777 != fsutil::PRIVATE_FILE {
        f.set_permissions(std::fs::Permissions::from_mode(fsutil::PRIVATE_FILE))?;
    }
    Ok(f)
}

impl ContainerDir {
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn shim(&self) -> PathBuf {
        self.dir.join("shim.json")
    }
    pub fn exit(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("container.log")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
}

/// `state.json`: the agent's record of a container's lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRecord {
    pub state: ContainerState,
    /// Seconds since the epoch.
    pub created: u64,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub reason: Option<String>,
    /// Set by `stop`/`kill`/`rm -f`: the end is reported as `stopped`, not `exited`.
    pub stop_requested: bool,
    /// The cgroup name (`<cgroup-parent>/<id>`).
    pub cgroup: String,
}

impl StateRecord {
    /// A container that has not run here yet: in `state`, created now, in `cgroup`.
    pub fn new(state: ContainerState, cgroup: String) -> StateRecord {
        StateRecord {
            state,
            created: now(),
            started: None,
            finished: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
            reason: None,
            stop_requested: false,
            cgroup,
        }
    }
}

/// `shim.json`: written by the shim once the container's init runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimRecord {
    pub shim_pid: i32,
    pub init_pid: i32,
    /// Seconds since the epoch.
    pub started: u64,
    /// Field 22 of `/proc/<init_pid>/stat` (start time in clock ticks), to tell PID reuse apart.
    pub init_start_ticks: u64,
}

/// `exit.json`: written by the shim after the init has exited and the container is cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    /// The exit code, or 128+signal when killed by a signal.
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// Seconds since the epoch.
    pub finished: u64,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Field 22 (starttime) of `/proc/<pid>/stat`, or `None` when the process is gone.
pub fn proc_start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` has ended but is not reaped yet (a zombie), or is gone.
pub fn proc_ended(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x"))
}

/// Whether `pid` is a live (not zombie) `mig-shim` for container `id`.
pub fn is_our_shim(pid: i32, id: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let Some(argv0) = args.first() else {
        return false;
    };
    let is_shim = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n == "mig-shim");
    let has_id = args
        .windows(2)
        .any(|w| w[0] == b"--id" && w[1] == id.as_bytes());
    let mode = args
        .get(1)
        .is_some_and(|m| *m == b"start" || *m == b"restore");
    is_shim && has_id && mode
}

/// The shim record of container `id` in `cd` when its shim and its init both still run (the
/// init's PID not reused: its start time is the recorded one).
pub fn live_shim_of(cd: &ContainerDir, id: &str) -> Option<ShimRecord> {
    let s: ShimRecord = read_record(&cd.shim()).ok()?;
    (is_our_shim(s.shim_pid, id) && proc_start_ticks(s.init_pid) == Some(s.init_start_ticks))
        .then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_of_self() {
        let me = std::process::id() as i32;
        assert!(proc_start_ticks(me).is_some());
        assert!(proc_start_ticks(i32::MAX).is_none());
        assert!(!is_our_shim(me, "x"));
    }

    #[test]
    fn a_zombie_has_ended() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(
            wait_for(|| proc_ended(pid)),
            "an exited child is a zombie until reaped"
        );
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_ok());
        child.wait().unwrap();
        assert!(proc_ended(pid));
        assert!(!proc_ended(std::process::id() as i32));
    }

    fn wait_for(f: impl Fn() -> bool) -> bool {
        (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            f()
        })
    }

    #[test]
    fn logs_are_private_new_or_old() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // New: 0600 whatever the umask would give.
        let new = dir.path().join("container.log");
        open_log(&new).unwrap().write_all(b"one\n").unwrap();
        assert_eq!(mode(&new), 0o600);
        // Old (0644, as agents before made it): 0600, its content kept and appended to.
        let old = dir.path().join("shim.log");
        std::fs::write(&old, "old\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_log(&old).unwrap().write_all(b"new\n").unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "old\nnew\n");
    }

    #[test]
    fn records_refuse_unknown_fields() {
        let e = ExitRecord {
            code: 137,
            signal: Some(9),
            oom_killed: true,
            finished: 1,
        };
        let mut v = serde_json::to_value(&e).unwrap();
        assert_eq!(serde_json::from_value::<ExitRecord>(v.clone()).unwrap(), e);
        v["x"] = 1.into();
        assert!(serde_json::from_value::<ExitRecord>(v).is_err());
    }

    #[test]
    fn records_carry_their_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exit.json");
        let e = ExitRecord {
            code: 3,
            signal: None,
            oom_killed: false,
            finished: 1,
        };
        write_record(&p, &e).unwrap();
        let v: serde_json::Value = fsutil::read_json(&p, MAX_RECORD).unwrap();
        assert_eq!(v["format"], 2);
        assert_eq!(read_record::<ExitRecord>(&p).unwrap(), e);
    }
}
