//! What a CRIU driver must tell CRIU about a container built by [`spawn`](super::spawn).
//!
//! A container without a user namespace needs nothing: every mount in it is its own (overlay
//! root, proc, tmpfs /dev with real nodes, devpts, mqueue, sysfs, binds of its own /dev/null), so
//! a plain `criu dump -t PID --root ROOTFS` works. A container with a user namespace cannot
//! mknod, so its device nodes are bind mounts of the host's, and so are the masked files (they
//! bind the container's /dev/null, which is the host's node): CRIU refuses to dump those ("doesn't
//! have a proper root mount") unless each is declared external, as runc does for its binds and
//! masked paths. The output pipe is handled separately with `--inherit-fd` on restore.

use super::init::{DEVICES, MASKED_FILES};
use crate::spec::ContainerSpec;

/// One bind mount CRIU must treat as external.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalMount {
    /// The mount point inside the container.
    pub mountpoint: String,
    /// The key that names it in the image set.
    pub key: String,
    /// What to bind there on restore (a host path).
    pub host_source: String,
}

impl ExternalMount {
    /// The value of `criu dump --external` (RPC `external`): `mnt[MOUNTPOINT]:KEY`.
    pub fn dump_arg(&self) -> String {
        format!("mnt[{}]:{}", self.mountpoint, self.key)
    }

    /// The value of `criu restore --external` (RPC `external`): `mnt[KEY]:HOST_SOURCE`.
    pub fn restore_arg(&self) -> String {
        format!("mnt[{}]:{}", self.key, self.host_source)
    }
}

/// The external mounts of a container made from `spec` (empty without a user namespace). Paths
/// that do not exist in a given container (e.g. `/proc/sched_debug` on newer kernels) are listed
/// anyway; CRIU ignores declarations that match no mount.
pub fn external_mounts(spec: &ContainerSpec) -> Vec<ExternalMount> {
    if spec.userns.is_none() {
        return Vec::new();
    }
    let key = |p: &str| format!("mig{}", p.replace('/', "-"));
    let devices = DEVICES.iter().map(|(p, _, _)| {
        let p = p.to_string_lossy();
        ExternalMount {
            mountpoint: p.to_string(),
            key: key(&p),
            host_source: p.to_string(),
        }
    });
    let masked = MASKED_FILES.iter().map(|p| {
        let p = p.to_string_lossy();
        ExternalMount {
            mountpoint: p.to_string(),
            key: key(&p),
            host_source: "/dev/null".into(),
        }
    });
    devices.chain(masked).collect()
}

/// The `--external` values of `criu dump` for a container made from `spec` (none without a user
/// namespace).
pub fn dump_externals(spec: &ContainerSpec) -> Vec<String> {
    external_mounts(spec)
        .iter()
        .map(ExternalMount::dump_arg)
        .collect()
}

/// The `--external` values of `criu restore` for a checkpoint dumped from `spec`.
pub fn restore_externals(spec: &ContainerSpec) -> Vec<String> {
    external_mounts(spec)
        .iter()
        .map(ExternalMount::restore_arg)
        .collect()
}

/// `CAP_SYS_RESOURCE`, bit 24 of the capability sets in `/proc/PID/status`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Why `criu dump` would fail on these host PIDs of a container, if it would. CRIU reads each
/// process's resource limits with `prlimit`, which the kernel allows only when the process's
/// real, effective and saved uid and gid are all the caller's (root's), or the caller has
/// `CAP_SYS_RESOURCE` in the process's user namespace. Some machines run root without
/// `CAP_SYS_RESOURCE` in its bounding set (what a `criu` child gets): there, a container
/// process running as another user fails the dump with "Can't get rlimit 0: Operation not
/// permitted". Root owns a `--userns` container's user namespace, and so has every capability
/// in it: such containers are never refused. `None` when the dump can read every limit.
pub fn rlimit_blocker(pids: &[i32], userns: bool) -> Option<String> {
    if userns {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/status").ok()?;
    let bounding = status_hex(&own, "CapBnd:")?;
    if bounding & (1 << CAP_SYS_RESOURCE) != 0 {
        return None;
    }
    pids.iter().find_map(|&pid| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uids = status_ids(&text, "Uid:")?;
        let gids = status_ids(&text, "Gid:")?;
        (uids.iter().chain(&gids).any(|&id| id != 0)).then(|| {
            format!(
                "process {pid} runs as uid {} gid {}, and CRIU can read the resource limits of a process that does not run as root only with CAP_SYS_RESOURCE, which root on this host lacks (capability bounding set {bounding:x}); run the container with --userns, or its processes as root",
                uids[1], gids[1]
            )
        })
    })
}

/// The hexadecimal value of a `/proc/PID/status` line such as `CapBnd:\t000001fffeffffff`.
fn status_hex(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    u64::from_str_radix(line[key.len()..].trim(), 16).ok()
}

/// Real, effective and saved ids of a `Uid:`/`Gid:` line of `/proc/PID/status`.
fn status_ids(status: &str, key: &str) -> Option<[u32; 3]> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut it = line[key.len()..].split_whitespace().map(str::parse::<u32>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        let text = "Name:\tsleep\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\nCapBnd:\t000001fffeffffff\n";
        assert_eq!(status_ids(text, "Uid:"), Some([1000, 1000, 1000]));
        assert_eq!(status_ids(text, "Gid:"), Some([0, 0, 0]));
        let bnd = status_hex(text, "CapBnd:").unwrap();
        assert_eq!(bnd & (1 << CAP_SYS_RESOURCE), 0);
        assert_eq!(
            status_hex("CapBnd:\t000001ffffffffff\n", "CapBnd:"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(status_ids("Uid:\t1\n", "Uid:"), None);
    }

    #[test]
    fn own_processes_are_not_refused() {
        // This test runs as root (uid and gid 0) or is not refused for its own user namespace.
        let me = std::process::id() as i32;
        if nix::unistd::getuid().is_root() && nix::unistd::getgid().as_raw() == 0 {
            assert_eq!(rlimit_blocker(&[me], false), None);
        }
        assert_eq!(rlimit_blocker(&[me], true), None);
    }

    #[test]
    fn only_userns_containers_have_external_mounts() {
        let mut spec = crate::spec::tests::sample();
        assert!(external_mounts(&spec).is_empty());
        spec.userns = Some(crate::spec::IdMap {
            host_id: 100_000,
            size: 65536,
        });
        let ext = external_mounts(&spec);
        let null = ext.iter().find(|m| m.mountpoint == "/dev/null").unwrap();
        assert_eq!(null.dump_arg(), "mnt[/dev/null]:mig-dev-null");
        assert_eq!(null.restore_arg(), "mnt[mig-dev-null]:/dev/null");
        let kcore = ext.iter().find(|m| m.mountpoint == "/proc/kcore").unwrap();
        assert_eq!(kcore.restore_arg(), "mnt[mig-proc-kcore]:/dev/null");
    }
}
