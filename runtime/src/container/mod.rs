//! Building and entering a container: the overlay root filesystem, the namespaces, the code that
//! runs between clone and exec (mounts, pivot_root, /proc, /dev, /sys, masked paths, hostname,
//! capabilities, no_new_privs, seccomp, closing fds), and joining a running container for `exec`.
//!
//! OWNER: container helper. The signatures below are the contract other modules code against.

use crate::cgroup::Cgroup;
use crate::spec::ContainerSpec;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container support is not implemented yet")]
    Unimplemented,
}

/// What [`spawn`] needs to start a container's init.
#[derive(Debug)]
pub struct LaunchConfig<'a> {
    pub spec: &'a ContainerSpec,
    /// The merged overlay mount made by [`mount_rootfs`] (on the host's mount namespace).
    pub rootfs: &'a Path,
    pub cgroup: &'a Cgroup,
    /// Becomes the init's stdout and stderr (the write end of the shim's log pipe).
    pub output: RawFd,
}

/// Mounts an overlay of `lower` (bottom layer first) with `upper`/`work` on `target`.
pub fn mount_rootfs(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    let _ = (lower, upper, work, target);
    Err(ContainerError::Unimplemented)
}

/// Unmounts the container's root filesystem (lazily if busy). Not an error when not mounted.
pub fn unmount_rootfs(target: &Path) -> Result<(), ContainerError> {
    let _ = target;
    Err(ContainerError::Unimplemented)
}

/// Starts the container's init in new namespaces inside `cgroup`; returns its host PID once it has
/// been set up and is about to exec (setup errors come back typed, not as a dead child).
pub fn spawn(cfg: &LaunchConfig<'_>) -> Result<i32, ContainerError> {
    let _ = cfg;
    Err(ContainerError::Unimplemented)
}

/// Runs `args` inside the running container whose init has host PID `init_pid`: joins its
/// namespaces and cgroup, applies the same confinement, inherits the caller's stdio, waits and
/// returns the exit code (128+signal when killed).
pub fn exec(
    init_pid: i32,
    spec: &ContainerSpec,
    cgroup: &Cgroup,
    args: &[String],
    env: &[String],
) -> Result<i32, ContainerError> {
    let _ = (init_pid, spec, cgroup, args, env);
    Err(ContainerError::Unimplemented)
}
