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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_userns_containers_have_external_mounts() {
        let mut spec: ContainerSpec = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "x",
            "image": {"name": "b", "id": format!("sha256:{}", "a".repeat(64)), "layers": []},
            "process": {"args": ["sh"], "env": [], "cwd": "/", "uid": 0, "gid": 0},
            "hostname": "x", "limits": {"memory": null, "cpu_millis": null, "pids": null},
            "userns": null
        }))
        .unwrap();
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
