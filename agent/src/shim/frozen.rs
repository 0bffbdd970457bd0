//! Restoring an arriving container frozen: its tasks never run before the agent thaws them.
//!
//! A container directory that carries an incoming migration's marker ([`RESTORE_FROZEN_MARKER`],
//! written by the destination before the restore and removed at Commit) is restored frozen. CRIU
//! runs in the container's cgroups (so the tasks it forks are born there), so the cgroup cannot
//! be frozen before the restore. Instead a CRIU action script runs at `pre-resume`, when every
//! restored task is held by CRIU (ptrace-stopped at its final `rt_sigreturn`, no instruction of
//! the workload run yet): it moves every process of the freezer cgroup that is not in the
//! container's PID namespace (CRIU and the script) back to the shim's own cgroup, then freezes
//! the container's cgroup. When CRIU detaches, the tasks enter the freezer on their way back to
//! user space, and stay there until `cgroup.freeze` is cleared (the agent's resume at Commit).
//! No signal is sent to the workload (unlike `--leave-stopped`, whose SIGSTOP and later SIGCONT
//! a parent in the container could see through `waitpid`).
//!
//! The script is two lines of `sh`: it returns at once for CRIU's other actions and at
//! `pre-resume` execs the running shim's own binary (`/proc/<shim pid>/exe`, the very build
//! that wrote it, even if the file was replaced since) with the hidden subcommand
//! `restore-frozen-hook`, which does the work in [`hook`] without forking (a shell loop with a
//! `readlink` per process took about 20 ms of the downtime). A CRIU with mig's patch 0007 runs
//! it at `pre-resume` only (`ActionScript::actions`); any other CRIU runs it for the five other
//! actions of a restore too, a fork and an exec each inside the downtime.

use crate::layout::ContainerDir;
use mig_migrate::criu::ActionScript;
use mig_runtime::cgroup::Cgroup;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Marker in a container directory: an incoming migration's id until Commit. The restore of
/// such a container leaves it frozen.
pub const RESTORE_FROZEN_MARKER: &str = "migration-id";

/// The action script, written next to the container's records.
const SCRIPT: &str = "criu-restore-frozen.sh";

/// Whether the restore of this container must leave it frozen.
pub(super) fn wanted(cd: &ContainerDir) -> bool {
    cd.dir.join(RESTORE_FROZEN_MARKER).is_file()
}

/// Writes the action script for `cgroup`; it is needed at `pre-resume` only.
pub(super) fn prepare(cd: &ContainerDir, cgroup: &Cgroup) -> Result<ActionScript, String> {
    let (dir, freeze, value, label) = match cgroup.unified_dir() {
        Some(d) if d.join("cgroup.freeze").exists() => (d.to_owned(), "cgroup.freeze", "1", ""),
        _ => match cgroup.v1_dir("freezer") {
            Some(d) => (d.to_owned(), "freezer.state", "FROZEN", "freezer"),
            None => return Err(format!("cgroup {} has no freezer", cgroup.name)),
        },
    };
    let home = home_dir(&dir, &cgroup.name, label)?;
    let script = script_text(&dir, freeze, value, &home)?;
    let path = cd.dir.join(SCRIPT);
    std::fs::write(&path, script).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(ActionScript {
        path,
        actions: vec!["pre-resume"],
    })
}

/// Removes the script after the restore.
pub(super) fn finish(cd: &ContainerDir) {
    let _ = std::fs::remove_file(cd.dir.join(SCRIPT));
}

/// This process's cgroup directory in the hierarchy whose cgroup `name` is at `dir`
/// (`label`: the controller in `/proc/self/cgroup`, empty for cgroup2).
fn home_dir(dir: &Path, name: &str, label: &str) -> Result<PathBuf, String> {
    let mut root = dir.to_owned();
    for _ in name.split('/').filter(|c| !c.is_empty()) {
        root.pop();
    }
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let rel = own_cgroup(&text, label)
        .ok_or_else(|| format!("no {label:?} hierarchy in /proc/self/cgroup"))?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// The path in `/proc/self/cgroup` text of the hierarchy with `label` (`""`: cgroup2).
fn own_cgroup<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = if label.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == label)
        };
        hit.then_some(path)
    })
}

/// Single-quotes a path for sh (refusing one with a quote or a newline).
fn quoted(p: &Path) -> Result<String, String> {
    let s = p.to_string_lossy();
    if s.contains(['\'', '\n']) {
        return Err(format!("unusable path {s:?}"));
    }
    Ok(format!("'{s}'"))
}

/// The hidden `mig-shim` subcommand the script runs at `pre-resume`.
const HOOK_COMMAND: &str = "restore-frozen-hook";

fn script_text(dir: &Path, freeze: &str, value: &str, home: &Path) -> Result<String, String> {
    let exe = format!("/proc/{}/exe", std::process::id());
    let procs = quoted(&dir.join("cgroup.procs"))?;
    let home_procs = quoted(&home.join("cgroup.procs"))?;
    let freeze = quoted(&dir.join(freeze))?;
    if !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("unusable freezer value {value:?}"));
    }
    Ok(format!(
        "#!/bin/sh\n\
         # Written by mig-shim for one restore (agent/src/shim/frozen.rs): at pre-resume, CRIU and\n\
         # this script leave the container's freezer cgroup, which is then frozen, so that the\n\
         # restored tasks freeze as soon as CRIU lets them go.\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = pre-resume ] || exit 0\n\
         exec {exe} {HOOK_COMMAND} --procs {procs} --home-procs {home_procs} --freeze {freeze} --value {value}\n"
    ))
}

/// Why the `pre-resume` hook failed (CRIU then fails the restore).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Freeze {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

/// `mig-shim restore-frozen-hook`, run by the action script at `pre-resume` (any other
/// `$CRTOOLS_SCRIPT_ACTION`: nothing): moves every process listed in `procs` (the container's
/// freezer cgroup) that shares this process's PID namespace (CRIU, this hook: not the
/// container's tasks) to `home_procs`, then writes `value` to `freeze`. A process that exits
/// meanwhile is skipped.
pub fn hook(procs: &Path, home_procs: &Path, freeze: &Path, value: &str) -> Result<(), HookError> {
    if std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some_and(|a| a != "pre-resume") {
        return Ok(());
    }
    fn read(path: &Path) -> impl FnOnce(std::io::Error) -> HookError + '_ {
        move |source| HookError::Read {
            path: path.to_owned(),
            source,
        }
    }
    let own = Path::new("/proc/self/ns/pid");
    let own = std::fs::read_link(own).map_err(read(own))?;
    let list = std::fs::read_to_string(procs).map_err(read(procs))?;
    let mut home = std::fs::OpenOptions::new()
        .write(true)
        .open(home_procs)
        .map_err(|source| HookError::Open {
            path: home_procs.to_owned(),
            source,
        })?;
    for pid in list.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"));
        if ns.is_ok_and(|ns| ns == own) {
            // One pid per write(2), as cgroup.procs wants; a process gone meanwhile is fine.
            let _ = std::io::Write::write_all(&mut home, format!("{pid}\n").as_bytes());
        }
    }
    std::fs::write(freeze, value).map_err(|source| HookError::Freeze {
        path: freeze.to_owned(),
        value: value.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_lines() {
        let text = "12:freezer:/mig-a\n4:memory:/x\n0::/system.slice/migd.service\n";
        assert_eq!(own_cgroup(text, ""), Some("/system.slice/migd.service"));
        assert_eq!(own_cgroup(text, "freezer"), Some("/mig-a"));
        assert_eq!(own_cgroup(text, "pids"), None);
    }

    #[test]
    fn script_execs_the_shims_hook_at_pre_resume_only() {
        let s = script_text(
            Path::new("/sys/fs/cgroup/unified/mig/c"),
            "cgroup.freeze",
            "1",
            Path::new("/sys/fs/cgroup/unified/system.slice"),
        )
        .unwrap();
        assert!(
            s.contains("[ \"$CRTOOLS_SCRIPT_ACTION\" = pre-resume ] || exit 0\n"),
            "{s}"
        );
        let exec = format!(
            "exec /proc/{}/exe restore-frozen-hook \
             --procs '/sys/fs/cgroup/unified/mig/c/cgroup.procs' \
             --home-procs '/sys/fs/cgroup/unified/system.slice/cgroup.procs' \
             --freeze '/sys/fs/cgroup/unified/mig/c/cgroup.freeze' --value 1\n",
            std::process::id()
        );
        assert!(s.ends_with(&exec), "{s}");
        assert!(quoted(Path::new("/a'b")).is_err());
        assert!(script_text(Path::new("/a"), "f", "1; rm", Path::new("/b")).is_err());
    }

    /// The hook on plain files: this process (in the host's PID namespace, like CRIU) moves,
    /// a pid that does not exist is skipped, and the freezer value is written last.
    #[test]
    fn hook_moves_own_namespace_then_freezes() {
        let dir = tempfile::tempdir().unwrap();
        let procs = dir.path().join("procs");
        let home = dir.path().join("home");
        let freeze = dir.path().join("freeze");
        let me = std::process::id();
        std::fs::write(&procs, format!("{me}\n999999999\n")).unwrap();
        std::fs::write(&home, "").unwrap();
        hook(&procs, &home, &freeze, "FROZEN").unwrap();
        assert_eq!(std::fs::read_to_string(&home).unwrap(), format!("{me}\n"));
        assert_eq!(std::fs::read_to_string(&freeze).unwrap(), "FROZEN");
        let missing = dir.path().join("missing");
        assert!(matches!(
            hook(&missing, &home, &freeze, "1"),
            Err(HookError::Read { .. })
        ));
    }
}
