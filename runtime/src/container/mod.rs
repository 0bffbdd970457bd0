//! Building and entering a container: the overlay root filesystem, the namespaces, the code that
//! runs between clone and exec (mounts, pivot_root, /proc, /dev, /sys, masked paths, hostname,
//! capabilities, no_new_privs, seccomp, closing fds), and joining a running container for `exec`.
//!
//! - `rootfs`: the overlay on the host ([`mount_rootfs`], [`unmount_rootfs`]);
//! - [`spawn`]: clone of the init in new namespaces; the child side is in `init`;
//! - [`exec`]: a command inside a running container;
//! - [`external_mounts`]: what a CRIU driver must declare for a user-namespace container;
//! - [`userns`]: the host id range of each user-namespace container;
//! - [`LoopbackNetns`]: the network namespace a loopback-only container's restore joins;
//! - `account`: the user's supplementary groups and `HOME` from the container's own files;
//! - `security`: ids, capabilities, no_new_privs, the seccomp filter;
//! - `channel`: typed parent/child messages; `sys`: the raw system calls (all `unsafe` is there).
//!
//! The container is built so that CRIU can dump it with a plain `criu dump -t PID --root ROOTFS`
//! and restore it onto another overlay mount; see the notes at the top of `init`.

mod account;
mod channel;
mod criu;
mod exec;
mod init;
mod interp;
mod netns;
mod rootfs;
mod security;
mod spawn;
mod sys;
pub mod userns;

pub use channel::Step;
pub use criu::{
    dump_externals, external_mounts, lock_blocker, restore_externals, rlimit_blocker, ExternalMount,
};
pub use exec::exec;
pub use init::DEFAULT_PATH;
pub use interp::{missing_interpreter, MissingInterpreter};
pub use netns::{external_netns_arg, netns_recreatable, LoopbackNetns, NetnsError, NETNS_KEY};
pub use rootfs::{mount_rootfs, unmount_rootfs};
pub use security::{default_caps_mask, DEFAULT_CAPS};
pub use spawn::spawn;

use crate::cgroup::Cgroup;
use crate::spec::ContainerSpec;
use nix::errno::Errno;
use std::os::fd::RawFd;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("no image layers given for the rootfs at {target}")]
    NoLayers { target: PathBuf },
    #[error("creating directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path {path} contains a NUL byte")]
    PathNul { path: PathBuf },
    #[error("overlay path {path} contains ',', ':' or '\\' and this kernel lacks lowerdir+")]
    OverlayPathUnsupported { path: PathBuf },
    #[error("overlay options for {target} are {len} bytes, more than a page")]
    OverlayOptionsTooLong { target: PathBuf, len: usize },
    #[error("mounting the overlay rootfs on {target}")]
    MountRootfs {
        target: PathBuf,
        #[source]
        errno: Errno,
    },
    #[error("unmounting the rootfs at {target}")]
    UnmountRootfs {
        target: PathBuf,
        #[source]
        errno: Errno,
    },
    #[error("invalid container spec")]
    Spec(#[source] crate::spec::SpecError),
    #[error("setting up the container's network")]
    Net(#[source] crate::net::NetError),
    #[error("invalid command: empty, or a string contains a NUL byte")]
    Command,
    #[error("reading the kernel's capability list")]
    CapLastCap(#[source] std::io::Error),
    #[error("creating the parent/child socketpair")]
    Socketpair(#[source] Errno),
    #[error("cloning the container init")]
    Clone(#[source] Errno),
    #[error("forking into the container")]
    Fork(#[source] Errno),
    #[error("preparing {path} for the container's user namespace")]
    PrepareUserns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the user namespace of the idmapped image layers")]
    IdmapUserns(#[source] Errno),
    #[error("making an idmapped mount of the image layer {path}")]
    IdmapLayer {
        path: PathBuf,
        #[source]
        errno: Errno,
    },
    #[error("staging idmapped image layers at {path}")]
    IdmapStaging {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    WriteIdMap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening namespace {path}")]
    OpenNamespace {
        path: PathBuf,
        #[source]
        errno: Errno,
    },
    #[error("talking to the container child (pid {pid})")]
    Channel {
        pid: i32,
        #[source]
        errno: Errno,
    },
    #[error("container setup failed at step {step} (pid {pid})")]
    Step {
        step: Step,
        pid: i32,
        #[source]
        errno: Errno,
    },
    #[error("container child {pid} ended before exec without a report (exit code {code})")]
    ChildDied { pid: i32, code: i32 },
    #[error("waiting for child {pid}")]
    Wait {
        pid: i32,
        #[source]
        errno: Errno,
    },
}

/// Why the command itself could not be executed (as opposed to the container's setup failing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecFailure {
    /// No such file on any `PATH` candidate (`ENOENT`, `ENOTDIR`): exit code 127, like a shell.
    NotFound,
    /// Found but not executable (`EACCES`, `ENOEXEC`, `EPERM`): exit code 126, like a shell.
    NotExecutable,
}

impl ExecFailure {
    /// The exit code shells (and Docker) use for this failure.
    pub fn exit_code(self) -> i32 {
        match self {
            ExecFailure::NotFound => 127,
            ExecFailure::NotExecutable => 126,
        }
    }

    /// A short reason, e.g. for `sh: CMD: command not found`-like messages.
    pub fn reason(self) -> &'static str {
        match self {
            ExecFailure::NotFound => "command not found",
            ExecFailure::NotExecutable => "permission denied",
        }
    }
}

impl ContainerError {
    /// When the failure is the final `execve` of the command (not found or not executable),
    /// which kind it is; `None` for every other failure.
    /// Whether the failure is a fork the container's cgroup refused (`EAGAIN`: its pids limit
    /// is reached).
    pub fn at_pids_limit(&self) -> bool {
        matches!(
            self,
            ContainerError::Step {
                step: Step::Fork,
                errno: Errno::EAGAIN,
                ..
            }
        )
    }

    pub fn exec_failure(&self) -> Option<ExecFailure> {
        match self {
            ContainerError::Step {
                step: Step::Exec,
                errno,
                ..
            } => match errno {
                Errno::ENOENT | Errno::ENOTDIR => Some(ExecFailure::NotFound),
                Errno::EACCES | Errno::ENOEXEC | Errno::EPERM => Some(ExecFailure::NotExecutable),
                _ => None,
            },
            _ => None,
        }
    }
}

/// What [`spawn`] needs to start a container's init.
#[derive(Debug)]
pub struct LaunchConfig<'a> {
    pub spec: &'a ContainerSpec,
    /// The merged overlay mount made by [`mount_rootfs`] (on the host's mount namespace).
    pub rootfs: &'a std::path::Path,
    pub cgroup: &'a Cgroup,
    /// Becomes the init's stdout and stderr (the write end of the shim's log pipe).
    pub output: RawFd,
}

/// Waits for a child's report on `sock`: `Ok` once it said "about to exec" and its end closed (the
/// exec happened), the typed failure otherwise. On failure the child is reaped.
fn await_exec(sock: RawFd, pid: i32) -> Result<(), ContainerError> {
    let mut about_to_exec = false;
    loop {
        match channel::recv(sock) {
            Ok(Some(channel::Message::AboutToExec)) => about_to_exec = true,
            Ok(None) if about_to_exec => return Ok(()),
            Ok(Some(channel::Message::Failed(f))) => {
                let _ = sys::waitpid(pid);
                return Err(ContainerError::Step {
                    step: f.step,
                    pid,
                    errno: f.errno,
                });
            }
            Ok(None | Some(channel::Message::Go)) => {
                let status =
                    sys::waitpid(pid).map_err(|errno| ContainerError::Wait { pid, errno })?;
                return Err(ContainerError::ChildDied {
                    pid,
                    code: sys::exit_code(status),
                });
            }
            Err(errno) => {
                sys::kill(pid, libc::SIGKILL);
                let _ = sys::waitpid(pid);
                return Err(ContainerError::Channel { pid, errno });
            }
        }
    }
}
