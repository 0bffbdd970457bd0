//! The container's cgroup: limits, usage, freeze/thaw and kill, on pure cgroup2 hosts and on hybrid
//! hosts (v1 controllers + a cgroup2 mount used for freeze/kill), found from /proc/self/mountinfo.
//!
//! OWNER: cgroup helper. The signatures below are the contract other modules code against.

use crate::spec::Limits;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup support is not implemented yet")]
    Unimplemented,
}

/// Live usage read from the cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_usec: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

/// A container's cgroup, in every hierarchy the host has.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// Relative name under each hierarchy root, e.g. `mig/<id>`.
    pub name: String,
    /// (controllers, absolute directory) of every hierarchy the cgroup lives in.
    pub dirs: Vec<(String, PathBuf)>,
}

impl Cgroup {
    /// Creates the cgroup `name` (e.g. `mig/<id>`) in every hierarchy and applies `limits`.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let _ = (name, limits);
        Err(CgroupError::Unimplemented)
    }
    /// Opens an existing cgroup.
    pub fn open(name: &str) -> Result<Cgroup, CgroupError> {
        let _ = name;
        Err(CgroupError::Unimplemented)
    }
    /// Moves `pid` into the cgroup in every hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        let _ = pid;
        Err(CgroupError::Unimplemented)
    }
    /// Every `cgroup.procs` file of the cgroup (a process joins by writing `0` to each).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Host PIDs of the processes in the cgroup.
    pub fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        Err(CgroupError::Unimplemented)
    }
    pub fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let _ = limits;
        Err(CgroupError::Unimplemented)
    }
    /// Freezes the cgroup and waits until the kernel reports it frozen.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        let _ = timeout;
        Err(CgroupError::Unimplemented)
    }
    pub fn thaw(&self) -> Result<(), CgroupError> {
        Err(CgroupError::Unimplemented)
    }
    /// The directory CRIU's `--freeze-cgroup` takes (cgroup2 dir, or the v1 freezer dir).
    pub fn freezer_dir(&self) -> Option<PathBuf> {
        None
    }
    /// Kills every process in the cgroup (SIGKILL).
    pub fn kill(&self) -> Result<(), CgroupError> {
        Err(CgroupError::Unimplemented)
    }
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        Err(CgroupError::Unimplemented)
    }
    /// Removes the cgroup from every hierarchy (it must be empty).
    pub fn destroy(&self) -> Result<(), CgroupError> {
        Err(CgroupError::Unimplemented)
    }
}
