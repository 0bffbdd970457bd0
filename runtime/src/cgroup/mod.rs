//! The container's cgroup: limits, usage, freeze/thaw and kill, on pure cgroup2 hosts and on hybrid
//! hosts (v1 controllers + a cgroup2 mount used for freeze/kill), found from /proc/self/mountinfo.
//!
//! A [`Cgroup`] is one relative name (`mig-host-a/<id>`) created under the root of every hierarchy
//! that matters:
//!
//! - the cgroup2 hierarchy when one is mounted (freeze, kill, and whatever controllers it has);
//! - each v1 hierarchy carrying `memory`, `cpu`, `cpuacct` or `pids` when cgroup2 lacks that
//!   controller (on a hybrid host cgroup2 usually has none of them);
//! - the v1 `freezer` hierarchy when cgroup2 cannot freeze (no cgroup2, or a kernel before 5.2).
//!
//! Which hierarchy does what is decided from the files that exist, so a [`Cgroup`] carries nothing
//! but its name and directories and [`Cgroup::open`] finds the same directories again.
//!
//! Freezing is left as it is by [`Cgroup::open`] (an agent re-adopting a frozen container must see
//! it frozen), but [`Cgroup::create`] thaws a cgroup it reuses: a freezer left frozen by an earlier
//! checkpoint would otherwise stop the next container placed there.

mod freeze;
mod fsio;
mod limits;
pub mod mount;
mod usage;

pub use freeze::FreezeState;
pub use limits::CPU_MIN_MILLIS;
pub use mount::{Layout, V1Hierarchy};

use crate::spec::Limits;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The label of the cgroup2 entry in [`Cgroup::dirs`] (empty, as in `/proc/PID/cgroup`'s `0::`).
pub const UNIFIED: &str = "";

/// cgroup2 controllers a container's cgroup uses when the host's cgroup2 offers them.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// v1 controllers a container's cgroup uses when cgroup2 does not offer them.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {name:?}: expected a relative path with no empty, \".\" or \"..\" component")]
    InvalidName { name: String },
    #[error("reading the mount table {path}")]
    Mountinfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup hierarchy is mounted")]
    NoHierarchy,
    #[error("creating cgroup directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {name:?} does not exist: {path} is missing")]
    NotFound { name: String, path: PathBuf },
    #[error("enabling controllers {controllers:?} in {path}")]
    EnableControllers {
        path: PathBuf,
        controllers: String,
        #[source]
        source: io::Error,
    },
    #[error("no mounted hierarchy has the {controller} controller needed for the {limit} limit")]
    NoController {
        controller: &'static str,
        limit: &'static str,
    },
    #[error("invalid {limit} limit {value}")]
    InvalidLimit { limit: &'static str, value: u64 },
    #[error("setting {path} to {value:?}")]
    SetLimit {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("moving pid {pid} into {path}")]
    AddPid {
        pid: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listing the processes of {path}")]
    ReadProcs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup {name:?} has no freezer: neither cgroup2 cgroup.freeze nor a v1 freezer hierarchy"
    )]
    NoFreezer { name: String },
    #[error("freezing {path}")]
    Freeze {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} did not report frozen within {timeout:?}{}",
        thaw_note(thaw_error)
    )]
    FreezeTimeout {
        path: PathBuf,
        timeout: Duration,
        /// Set when thawing the half-frozen cgroup again failed too.
        thaw_error: Option<Box<CgroupError>>,
    },
    #[error("thawing {path}")]
    Thaw {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the freezer state {path}")]
    FreezerState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Kill {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sending SIGKILL to pid {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("processes {pids:?} are still in cgroup {name:?} {timeout:?} after being killed")]
    KillTimeout {
        name: String,
        pids: Vec<i32>,
        timeout: Duration,
    },
    #[error("reading {path}")]
    ReadUsage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unexpected content {value:?} in {path}")]
    Parse { path: PathBuf, value: String },
    #[error("removing cgroup directory {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn thaw_note(thaw_error: &Option<Box<CgroupError>>) -> String {
    match thaw_error {
        Some(e) => format!(", and thawing it again failed: {e}"),
        None => String::new(),
    }
}

/// Live usage read from the cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Everything charged to the cgroup, page cache included.
    pub memory_bytes: u64,
    /// Anonymous memory (a checkpoint's private pages). Absent from an older agent's answers.
    #[serde(default)]
    pub anon_bytes: u64,
    /// Shared memory: `MAP_SHARED` anonymous mappings, System V segments, files on tmpfs.
    /// Absent from an older agent's answers.
    #[serde(default)]
    pub shmem_bytes: u64,
    pub cpu_usec: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

/// A container's cgroup, in every hierarchy the host has.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// Relative name under each hierarchy root, e.g. `mig/<id>`.
    pub name: String,
    /// (controllers, absolute directory) of every hierarchy the cgroup lives in. The controllers
    /// are named as in `/proc/PID/cgroup`: [`UNIFIED`] (empty) for cgroup2, the comma-joined
    /// controller list (`memory`, `cpu,cpuacct`) for a v1 hierarchy.
    pub dirs: Vec<(String, PathBuf)>,
}

impl Cgroup {
    /// Creates the cgroup `name` (e.g. `mig/<id>`) in every hierarchy and applies `limits`.
    ///
    /// An existing cgroup of that name is reused: it is thawed and gets the new limits. If a step
    /// fails, the directories this call created are removed again.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        let layout = detect()?;
        let mut created = Vec::new();
        let result = create_in(&layout, name, limits, &mut created);
        if result.is_err() {
            for dir in created.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        result
    }

    /// Opens an existing cgroup, leaving its freezer state alone.
    pub fn open(name: &str) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        let layout = detect()?;
        let v2_freeze = layout
            .unified
            .as_ref()
            .is_some_and(|u| u.join(name).join("cgroup.freeze").exists());
        let roots = plan(&layout, &v2_root_controllers(&layout), v2_freeze);
        let dirs = in_roots(roots, name);
        for (_, dir) in &dirs {
            if !dir.is_dir() {
                return Err(CgroupError::NotFound {
                    name: name.to_owned(),
                    path: dir.clone(),
                });
            }
        }
        Ok(Cgroup {
            name: name.to_owned(),
            dirs,
        })
    }

    /// Moves `pid` into the cgroup in every hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for path in self.procs_files() {
            fsio::write(&path, &pid.to_string()).map_err(|source| CgroupError::AddPid {
                pid,
                path,
                source,
            })?;
        }
        Ok(())
    }

    /// Every `cgroup.procs` file of the cgroup (a process joins by writing `0` to each).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Host PIDs of the processes in the cgroup and its child cgroups, in every hierarchy, sorted
    /// and without duplicates. A hierarchy directory that no longer exists contributes none.
    pub fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for (_, dir) in &self.dirs {
            collect_procs(dir, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Applies `limits`; a `None` limit is set to unlimited.
    pub fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        limits::apply(self, limits)
    }

    /// Freezes the cgroup and waits until the kernel reports it frozen. On timeout it is thawed
    /// again and [`CgroupError::FreezeTimeout`] returned.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        freeze::freeze(self, timeout)
    }

    /// Freezes the cgroup for a CRIU dump: like [`Cgroup::freeze`], but never with a process
    /// caught between `vfork` and `exec`, which CRIU cannot seize (the cgroup runs a moment
    /// longer and is frozen again). Returns how many times it had to.
    pub fn freeze_for_dump(&self, timeout: Duration) -> Result<u32, CgroupError> {
        freeze::freeze_for_dump(self, timeout)
    }

    /// Lets the cgroup's processes run again. Thawing a cgroup that is not frozen is fine.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        freeze::thaw(self)
    }

    /// Whether the cgroup is thawed, on its way to frozen, or frozen.
    pub fn freeze_state(&self) -> Result<FreezeState, CgroupError> {
        freeze::state(self)
    }

    /// The directory CRIU's `--freeze-cgroup` takes (cgroup2 dir, or the v1 freezer dir).
    pub fn freezer_dir(&self) -> Option<PathBuf> {
        freeze::freezer(self).map(|f| f.dir().to_path_buf())
    }

    /// Kills every process in the cgroup (SIGKILL) and waits until none is left.
    pub fn kill(&self) -> Result<(), CgroupError> {
        freeze::kill(self)
    }

    /// Memory, CPU time, process count and OOM kills; a counter the host does not provide reads 0.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        usage::read(self)
    }

    /// Removes the cgroup (and any child cgroups) from every hierarchy; its processes must be gone.
    /// A cgroup that is already gone is fine. Parent directories are left in place.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            fsio::remove_tree(dir)
                .map_err(|(path, source)| CgroupError::Remove { path, source })?;
        }
        Ok(())
    }

    /// The cgroup2 directory, if the host has cgroup2.
    pub fn unified_dir(&self) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(label, _)| label == UNIFIED)
            .map(|(_, d)| d.as_path())
    }

    /// The directory in the v1 hierarchy carrying `controller`, if the cgroup uses one.
    pub fn v1_dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(label, _)| label != UNIFIED && label.split(',').any(|c| c == controller))
            .map(|(_, d)| d.as_path())
    }
}

/// Checks that `name` is a relative path that stays below the hierarchy root.
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 4096
        && !name.starts_with('/')
        && !name.chars().any(char::is_control)
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName {
            name: name.to_owned(),
        })
    }
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

fn detect() -> Result<Layout, CgroupError> {
    let layout = Layout::detect().map_err(|source| CgroupError::Mountinfo {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    if layout.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(layout)
}

/// Controllers the cgroup2 root offers (`cgroup.controllers`); none when it cannot be read.
fn v2_root_controllers(layout: &Layout) -> Vec<String> {
    let Some(root) = &layout.unified else {
        return Vec::new();
    };
    std::fs::read_to_string(root.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// `(label, root/name)` for every `(label, root)`.
fn in_roots(roots: Vec<(String, PathBuf)>, name: &str) -> Vec<(String, PathBuf)> {
    roots
        .into_iter()
        .map(|(label, root)| (label, root.join(name)))
        .collect()
}

/// The hierarchy roots a container's cgroup lives under, labelled: cgroup2 (if mounted), the v1
/// hierarchies for the controllers cgroup2 lacks, and the v1 freezer when cgroup2 cannot freeze
/// (`v2_freeze` false).
fn plan(layout: &Layout, v2_controllers: &[String], v2_freeze: bool) -> Vec<(String, PathBuf)> {
    let in_v2 = |c: &str| {
        // cgroup2's cpu controller also accounts CPU time, the job of v1's cpuacct.
        let c = if c == "cpuacct" { "cpu" } else { c };
        v2_controllers.iter().any(|have| have == c)
    };
    let mut dirs = Vec::new();
    if let Some(root) = &layout.unified {
        dirs.push((UNIFIED.to_owned(), root.clone()));
    }
    let mut wanted: Vec<&str> = V1_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !in_v2(c))
        .collect();
    if !v2_freeze {
        wanted.push("freezer");
    }
    for controller in wanted {
        if let Some(h) = layout.v1_with(controller) {
            let label = h.label();
            if !dirs.iter().any(|(l, _)| *l == label) {
                dirs.push((label, h.mount_point.clone()));
            }
        }
    }
    dirs
}

fn create_in(
    layout: &Layout,
    name: &str,
    limits: &Limits,
    created: &mut Vec<PathBuf>,
) -> Result<Cgroup, CgroupError> {
    let v2_controllers = v2_root_controllers(layout);
    let mut v2_freeze = false;
    if let Some(root) = &layout.unified {
        mkdir_p(root, name, created)?;
        let wanted: Vec<&str> = V2_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| v2_controllers.iter().any(|h| h == c))
            .collect();
        enable_controllers(root, name, &wanted)?;
        v2_freeze = root.join(name).join("cgroup.freeze").exists();
    }
    let roots = plan(layout, &v2_controllers, v2_freeze);
    for (label, root) in &roots {
        if label != UNIFIED {
            mkdir_p(root, name, created)?;
        }
    }
    let cg = Cgroup {
        name: name.to_owned(),
        dirs: in_roots(roots, name),
    };
    if freeze::freezer(&cg).is_some() && cg.freeze_state()? != FreezeState::Thawed {
        cg.thaw()?;
    }
    cg.set_limits(limits)?;
    Ok(cg)
}

/// Creates `root/name` one component at a time, recording the directories it made.
fn mkdir_p(root: &Path, name: &str, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
    let mut dir = root.to_path_buf();
    for component in name.split('/') {
        dir.push(component);
        match std::fs::create_dir(&dir) {
            Ok(()) => created.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::CreateDir { path: dir, source }),
        }
    }
    Ok(())
}

/// Enables `wanted` cgroup2 controllers in `cgroup.subtree_control` of the root and of every
/// ancestor of `root/name`, so the leaf gets their files. Only missing ones are written.
fn enable_controllers(root: &Path, name: &str, wanted: &[&str]) -> Result<(), CgroupError> {
    if wanted.is_empty() {
        return Ok(());
    }
    let mut dir = root.to_path_buf();
    let mut components = name.split('/').peekable();
    loop {
        let available = fsio::read_optional(&dir.join("cgroup.controllers"))
            .ok()
            .flatten()
            .unwrap_or_default();
        let enabled = fsio::read_optional(&dir.join("cgroup.subtree_control"))
            .ok()
            .flatten()
            .unwrap_or_default();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() {
            let path = dir.join("cgroup.subtree_control");
            let controllers = missing.join(" ");
            fsio::write(&path, &controllers).map_err(|source| CgroupError::EnableControllers {
                path,
                controllers,
                source,
            })?;
        }
        match components.next() {
            Some(c) if components.peek().is_some() => dir.push(c),
            _ => return Ok(()),
        }
    }
}

fn collect_procs(dir: &Path, pids: &mut Vec<i32>) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = match fsio::read_optional(&path) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(()),
        Err(source) => return Err(CgroupError::ReadProcs { path, source }),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let pid = line.trim().parse().map_err(|_| CgroupError::Parse {
            path: path.clone(),
            value: line.to_owned(),
        })?;
        pids.push(pid);
    }
    let children = fsio::child_dirs(dir).map_err(|source| CgroupError::ReadProcs {
        path: dir.to_path_buf(),
        source,
    })?;
    for child in children {
        collect_procs(&child, pids)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// How much more memory cgroups below `parent` (a name such as `mig`; it need not exist yet) can
/// be charged before a memory limit of `parent` or of one of its ancestors is reached, and the
/// directory of that limit: the smallest room of any of them (page cache counted as room, since
/// the kernel reclaims it first). `None` when no limit applies, or the host has no memory
/// controller.
pub fn memory_room(parent: &str) -> Result<Option<(u64, PathBuf)>, CgroupError> {
    validate_name(parent)?;
    let layout = detect()?;
    let root = match layout.v1_with("memory") {
        Some(h) => h.mount_point.clone(),
        None => match &layout.unified {
            Some(u) if v2_root_controllers(&layout).iter().any(|c| c == "memory") => u.clone(),
            _ => return Ok(None),
        },
    };
    let mut best: Option<(u64, PathBuf)> = None;
    let mut dir = root.join(parent);
    loop {
        if dir.is_dir() {
            if let Some(room) = usage::room_in(&dir)? {
                match &best {
                    Some((b, _)) if *b <= room => {}
                    _ => best = Some((room, dir.clone())),
                }
            }
        }
        if dir == root || !dir.pop() {
            break;
        }
    }
    Ok(best)
}
