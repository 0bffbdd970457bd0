//! `mig-shim`: the small synchronous supervisor of one container (no tokio).
//!
//! `mig-shim start` builds the container (cgroup, overlay rootfs, log pipe), starts its init through
//! [`mig_runtime::container::spawn`], reports one JSON line ([`StartReport`]) on stdout to `migd`,
//! then copies the init's output to `container.log`, reaps children, and when the init exits
//! records `exit.json` and tears the container down ([`start`]).
//!
//! `mig-shim exec` runs a command inside a running container ([`exec`]).
//!
//! `mig-shim restore-frozen-hook` (hidden) is CRIU's `pre-resume` action when an arriving
//! container is restored frozen ([`restore_frozen_hook`]).

/// `eprintln!` that never panics. The supervising shim's stderr is `shim.log`, on the state
/// directory's file system: when that is full, `eprintln!` panics, and the container went with
/// its shim (QA of session 25).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod frozen;
mod start;

pub use frozen::{hook as restore_frozen_hook, HookError, RESTORE_FROZEN_MARKER};

pub use start::{start, Mode};

use crate::layout::{proc_start_ticks, ShimRecord, StateDir, StateRecord};
use mig_runtime::cgroup::Cgroup;
use mig_runtime::spec::ContainerSpec;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `mig-shim exec` prints this before a one-line reason on stderr when it could not run the command
/// (and exits 125), so that `migd` can tell its failures from the command's own output.
pub const EXEC_ERROR_MARKER: &str = "mig-shim-error: ";

/// The shim's one-line report to `migd` after `start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum StartReport {
    Started { init_pid: i32 },
    Failed { stage: Stage, message: String },
}

/// Which step of starting a container failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Spec,
    Cgroup,
    Log,
    Rootfs,
    Spawn,
    Record,
    Checkpoint,
    Restore,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Spec => "reading the spec",
            Stage::Cgroup => "creating the cgroup",
            Stage::Log => "opening the log",
            Stage::Rootfs => "mounting the root filesystem",
            Stage::Spawn => "starting the init",
            Stage::Record => "writing shim.json",
            Stage::Checkpoint => "verifying the checkpoint",
            Stage::Restore => "restoring with criu",
        }
    }

    /// Whether the failure means a runtime feature is missing from this build.
    pub fn is_unavailable(self, message: &str) -> bool {
        message.contains("not implemented")
    }
}

/// Failures of the shim's subcommands.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spec is invalid")]
    Spec(#[source] mig_runtime::spec::SpecError),
    #[error("the spec is for container {found}, not {expected}")]
    SpecId { expected: String, found: String },
    #[error("the container is not running")]
    NotRunning,
    #[error("cannot open the cgroup {name}")]
    Cgroup {
        name: String,
        #[source]
        source: mig_runtime::cgroup::CgroupError,
    },
    #[error("exec in the container failed")]
    Exec(#[source] mig_runtime::container::ContainerError),
    #[error("the container is at its process limit (--pids {limit}): no process can be started in it until one ends")]
    PidsLimit { limit: u64 },
}

/// The error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Reads and checks `spec.json` of container `id`.
pub(crate) fn read_spec(state_dir: &Path, id: &str) -> Result<ContainerSpec, ShimError> {
    mig_runtime::spec::validate_id(id).map_err(ShimError::Spec)?;
    let path = StateDir::new(state_dir).container(id).spec();
    let spec: ContainerSpec =
        crate::layout::read_record(&path).map_err(|source| ShimError::Read { path, source })?;
    spec.validate().map_err(ShimError::Spec)?;
    if spec.id != id {
        return Err(ShimError::SpecId {
            expected: id.to_owned(),
            found: spec.id,
        });
    }
    Ok(spec)
}

/// What `mig-shim exec` changes from the container's process (`--user`, `--workdir`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecAs {
    /// Numeric uid and gid (`migd` resolves names); the container's when `None`.
    pub user: Option<(u32, u32)>,
    /// Absolute working directory; the container's when `None`.
    pub workdir: Option<String>,
}

/// Parses `UID:GID` (numbers), as `migd` passes `--user` to `mig-shim exec`.
pub fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    s.split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .ok_or_else(|| format!("invalid user {s:?}: expected UID:GID"))
}

/// `mig-shim exec`: runs `args` inside the running container `id` with its environment plus
/// `env`, as `how` says; returns the command's exit code: 127 when it is not found, 126 when it
/// cannot be executed (the reason then goes to stderr). Its stdio is the shim's.
pub fn exec(
    state_dir: &Path,
    id: &str,
    how: &ExecAs,
    env: &[String],
    args: &[String],
) -> Result<i32, ShimError> {
    let mut spec = read_spec(state_dir, id)?;
    if let Some((uid, gid)) = how.user {
        spec.process.uid = uid;
        spec.process.gid = gid;
    }
    if let Some(w) = &how.workdir {
        spec.process.cwd = w.clone();
    }
    let cd = StateDir::new(state_dir).container(id);
    let shim: ShimRecord =
        crate::layout::read_record(&cd.shim()).map_err(|source| ShimError::Read {
            path: cd.shim(),
            source,
        })?;
    if proc_start_ticks(shim.init_pid) != Some(shim.init_start_ticks) {
        return Err(ShimError::NotRunning);
    }
    let state: StateRecord =
        crate::layout::read_record(&cd.state()).map_err(|source| ShimError::Read {
            path: cd.state(),
            source,
        })?;
    let cg = Cgroup::open(&state.cgroup).map_err(|source| ShimError::Cgroup {
        name: state.cgroup.clone(),
        source,
    })?;
    let mut full_env = spec.process.env.clone();
    for kv in env {
        let key = kv.split('=').next().unwrap_or_default();
        full_env.retain(|e| e.split('=').next() != Some(key));
        full_env.push(kv.clone());
    }
    match mig_runtime::container::exec(shim.init_pid, &spec, &cg, args, &full_env) {
        Ok(code) => Ok(code),
        // The command itself could not run: that is the command's result (127 or 126, as a shell
        // reports it), with the reason on stderr, not a failure of the shim.
        Err(e) => match e.exec_failure() {
            Some(f) => {
                let cmd = args.first().map(String::as_str).unwrap_or_default();
                let path = full_env
                    .iter()
                    .find_map(|kv| kv.strip_prefix("PATH="))
                    .unwrap_or(mig_runtime::container::DEFAULT_PATH);
                let root = std::path::PathBuf::from(format!("/proc/{}/root", shim.init_pid));
                let missing = (f == mig_runtime::container::ExecFailure::NotFound)
                    .then(|| {
                        mig_runtime::container::missing_interpreter(
                            &root,
                            cmd,
                            &spec.process.cwd,
                            path,
                        )
                    })
                    .flatten();
                match missing {
                    Some(m) => {
                        eprintln!(
                            "mig: exec {cmd:?}: cannot be executed: {}",
                            start::interpreter_words(&m).replace("the image", "the container")
                        );
                        Ok(mig_runtime::container::ExecFailure::NotExecutable.exit_code())
                    }
                    None => {
                        eprintln!("mig: exec {cmd:?}: {}", f.reason());
                        Ok(f.exit_code())
                    }
                }
            }
            None => match spec.limits.pids {
                Some(limit) if e.at_pids_limit() => Err(ShimError::PidsLimit { limit }),
                _ => Err(ShimError::Exec(e)),
            },
        },
    }
}
