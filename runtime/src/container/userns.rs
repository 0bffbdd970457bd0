//! User-namespace containers on the host side: the host id range of each container, and the
//! idmapped image layers of its root filesystem.
//!
//! Each container gets its own range of 65536 host ids, recorded in its spec and kept across
//! checkpoint, restore and moves (CRIU restores the user namespace with the dumped maps, so a
//! destination must validate that the range is free there; it cannot pick another without
//! shifting the owners of every file in the writable layer).
//!
//! Ranges are slots `BASE + k * SIZE`. A container prefers the slot named by its id (random hex),
//! so two hosts that allocate independently rarely pick the same range for different containers;
//! when the preferred slot is taken here, the next free one is used.
//!
//! The image layers belong to the host (root, mostly), ids the container's namespace does not
//! map: seen through them, the container's root would be `nobody` in its own `/etc`. So its
//! overlay is built on idmapped clones of the layers ([`mount_rootfs`]): the layers' ids are read
//! through the container's maps (host root shows as the container's mapped root, and so is the
//! owner of what overlay copies up), without touching the shared layer files.

use super::rootfs::{self, Lower};
use super::{sys, ContainerError};
use crate::spec::IdMap;
use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The first host id of slot 0 (the conventional start of `/etc/subuid` ranges).
pub const BASE: u32 = 100_000;
/// Ids per container (uids and gids alike).
pub const SIZE: u32 = 65_536;
/// Number of slots: the last one ends below 2^31 (some tools treat ids as signed).
pub const SLOTS: u32 = 16_384;

/// The range of slot `k` (`k < SLOTS`).
pub fn slot(k: u32) -> IdMap {
    IdMap {
        host_id: BASE + (k % SLOTS) * SIZE,
        size: SIZE,
    }
}

/// Whether two ranges share a host id.
pub fn overlaps(a: &IdMap, b: &IdMap) -> bool {
    let end = |m: &IdMap| u64::from(m.host_id) + u64::from(m.size);
    u64::from(a.host_id) < end(b) && u64::from(b.host_id) < end(a)
}

/// A free range for container `id` given the ranges in use on this host: the slot named by the
/// id's first 8 hex digits when free, else the next free one; `None` when all are taken.
pub fn allocate<'a>(id: &str, used: impl IntoIterator<Item = &'a IdMap>) -> Option<IdMap> {
    let used: Vec<IdMap> = used.into_iter().copied().collect();
    let first = id
        .get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0)
        % SLOTS;
    (0..SLOTS)
        .map(|i| slot(first.wrapping_add(i) % SLOTS))
        .find(|m| !used.iter().any(|u| overlaps(m, u)))
}

/// The first range in `used` that overlaps `map`, if any.
pub fn clash<'a>(map: &IdMap, used: impl IntoIterator<Item = &'a IdMap>) -> Option<IdMap> {
    used.into_iter().copied().find(|u| overlaps(map, u))
}

/// How a user-namespace container's image layers were given to its overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerIds {
    /// Idmapped clones given to overlay as descriptors (kernels whose overlay accepts
    /// `lowerdir+` descriptors, 6.13 on): no mount but the overlay exists.
    Idmapped,
    /// Idmapped clones attached under the rootfs's staging directory while overlay was built,
    /// and detached right after (idmapped mounts, but an overlay that takes only paths).
    IdmappedStaged,
    /// The kernel refused idmapped mounts (the errno): the layers keep their host owners, which
    /// the container sees as `nobody` (read-only to it). The container works otherwise.
    Unmapped(Errno),
}

/// Mounts the rootfs of a container whose ids map to `map` like
/// [`mount_rootfs`](super::mount_rootfs), but on idmapped clones of the layers; falls back to
/// the plain layers (and says so) when the kernel refuses idmapped mounts. The result is one
/// overlay on `target`: [`unmount_rootfs`](super::unmount_rootfs) undoes it, and also detaches
/// staged layers a crash may have left.
pub fn mount_rootfs(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    map: &IdMap,
) -> Result<LayerIds, ContainerError> {
    rootfs::prepare_mount(lower, upper, work, target)?;
    // What a crash between staging and detaching (below) left attached.
    rootfs::clear_staging(target)?;
    let unmapped =
        |errno| rootfs::mount_paths(lower, upper, work, target).map(|()| LayerIds::Unmapped(errno));
    let layers = match idmap_userns(map).and_then(|ns| {
        lower
            .iter()
            .map(|l| idmapped_clone(l, &ns))
            .collect::<Result<Vec<_>, _>>()
    }) {
        Ok(l) => l,
        Err(e) => return refused(&e).map_or(Err(e), unmapped),
    };
    let fds: Vec<Lower<'_>> = layers.iter().map(|l| Lower::Fd(l.as_fd())).collect();
    match rootfs::mount_new_api(&fds, upper, work, target) {
        Ok(()) => return Ok(LayerIds::Idmapped),
        // This overlay takes no descriptors (or no lowerdir+ at all): stage them.
        Err(ContainerError::MountRootfs {
            errno: Errno::EINVAL | Errno::ENOSYS,
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    match mount_staged(&layers, lower, upper, work, target) {
        Ok(()) => Ok(LayerIds::IdmappedStaged),
        Err(e) => refused(&e).map_or(Err(e), unmapped),
    }
}

/// The errno of a failure that means "this kernel (or this layer's filesystem) does not do
/// idmapped layers", as opposed to a failure of the host.
fn refused(e: &ContainerError) -> Option<Errno> {
    let errno = match e {
        ContainerError::IdmapUserns(errno)
        | ContainerError::IdmapLayer { errno, .. }
        | ContainerError::MountRootfs { errno, .. } => *errno,
        ContainerError::WriteIdMap { source, .. } => Errno::from_raw(source.raw_os_error()?),
        _ => return None,
    };
    matches!(
        errno,
        Errno::EINVAL | Errno::ENOSYS | Errno::EPERM | Errno::EOPNOTSUPP
    )
    .then_some(errno)
}

/// Attaches the idmapped `layers` under the staging directory, builds the overlay on their
/// paths and detaches them again (the overlay holds its own private clones of them).
fn mount_staged(
    layers: &[OwnedFd],
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    let dir = rootfs::staging_dir(target);
    let staged = (|| {
        let mut paths = Vec::with_capacity(layers.len());
        for (i, (fd, layer)) in layers.iter().zip(lower).enumerate() {
            let p = dir.join(i.to_string());
            std::fs::create_dir_all(&p).map_err(|source| ContainerError::IdmapStaging {
                path: p.clone(),
                source,
            })?;
            sys::move_mount(fd.as_raw_fd(), &rootfs::cstring(&p)?).map_err(|errno| {
                ContainerError::IdmapLayer {
                    path: layer.clone(),
                    errno,
                }
            })?;
            paths.push(p);
        }
        rootfs::mount_paths(&paths, upper, work, target)
    })();
    match (staged, rootfs::clear_staging(target)) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(e)) => {
            // Not left half done: the caller knows nothing is mounted when it gets an error.
            let _ = rootfs::unmount_rootfs(target);
            Err(e)
        }
    }
}

/// A descriptor of a new user namespace with `map` as its uid and gid maps (`0 HOST SIZE`),
/// which outlives the short-lived child that was cloned into it to create it.
fn idmap_userns(map: &IdMap) -> Result<OwnedFd, ContainerError> {
    // The child waits for the end of this pipe: it leaves when we are done, or if we die.
    let (wait, done) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ContainerError::IdmapUserns)?;
    // SAFETY: the child only closes a descriptor, blocks in read and exits: raw system calls
    // that neither allocate nor lock, and it never returns into this function.
    let pid = unsafe { sys::clone(libc::CLONE_NEWUSER) }.map_err(ContainerError::IdmapUserns)?;
    if pid == 0 {
        sys::close(done.as_raw_fd());
        sys::wait_eof(wait.as_raw_fd());
        sys::exit(0);
    }
    drop(wait);
    let ns = (|| {
        let line = id_map_line(map);
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            std::fs::write(&path, &line)
                .map_err(|source| ContainerError::WriteIdMap { path, source })?;
        }
        let path = PathBuf::from(format!("/proc/{pid}/ns/user"));
        sys::open_owned(&rootfs::cstring(&path)?, libc::O_RDONLY)
            .map_err(|errno| ContainerError::OpenNamespace { path, errno })
    })();
    drop(done);
    let _ = sys::waitpid(pid);
    ns
}

/// The line of `uid_map` and `gid_map` for `map`: container ids from 0 to host ids from
/// `map.host_id` (the same maps as the container's own namespace).
fn id_map_line(map: &IdMap) -> String {
    format!("0 {} {}\n", map.host_id, map.size)
}

/// A detached clone of the mount tree at `layer`, idmapped through `userns`.
fn idmapped_clone(layer: &Path, userns: &OwnedFd) -> Result<OwnedFd, ContainerError> {
    let fail = |errno| ContainerError::IdmapLayer {
        path: layer.to_path_buf(),
        errno,
    };
    let tree = sys::clone_tree(&rootfs::cstring(layer)?).map_err(fail)?;
    sys::set_tree_idmap(tree.as_raw_fd(), userns.as_raw_fd()).map_err(fail)?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_slot_then_next_free() {
        let id = "00000003aaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(allocate(id, []), Some(slot(3)));
        let taken = [slot(3), slot(4)];
        assert_eq!(allocate(id, &taken), Some(slot(5)));
        // The old fixed range (slot 0) and a foreign range overlapping slot 3 both block it.
        let foreign = IdMap {
            host_id: BASE + 3 * SIZE + 10,
            size: 5,
        };
        assert_eq!(allocate(id, &[foreign]), Some(slot(4)));
        // Wraps around the end.
        let last = format!("{:08x}{}", SLOTS - 1, "a".repeat(24));
        assert_eq!(allocate(&last, &[slot(SLOTS - 1)]), Some(slot(0)));
    }

    #[test]
    fn every_slot_is_valid_and_disjoint() {
        let last = slot(SLOTS - 1);
        assert!(u64::from(last.host_id) + u64::from(last.size) <= 1 << 31);
        assert!(!overlaps(&slot(1), &slot(2)));
        assert!(overlaps(&slot(1), &slot(1)));
        let all: Vec<IdMap> = (0..SLOTS).map(slot).collect();
        assert_eq!(allocate("ffffffff", &all), None);
        assert_eq!(clash(&slot(7), &all), Some(slot(7)));
        assert_eq!(clash(&slot(7), &all[..7]), None);
    }

    #[test]
    fn id_map_line_is_the_containers_map() {
        assert_eq!(id_map_line(&slot(2)), "0 231072 65536\n");
    }

    #[test]
    fn only_kernel_refusals_fall_back() {
        let layer = |errno| ContainerError::IdmapLayer {
            path: "/l".into(),
            errno,
        };
        assert_eq!(refused(&layer(Errno::EINVAL)), Some(Errno::EINVAL));
        assert_eq!(
            refused(&ContainerError::IdmapUserns(Errno::EPERM)),
            Some(Errno::EPERM)
        );
        let io = std::io::Error::from_raw_os_error(libc::EPERM);
        let write = ContainerError::WriteIdMap {
            path: "/proc/1/uid_map".into(),
            source: io,
        };
        assert_eq!(refused(&write), Some(Errno::EPERM));
        // A host failure is an error, not a reason to run with the wrong owners.
        assert_eq!(refused(&layer(Errno::EMFILE)), None);
        assert_eq!(refused(&layer(Errno::ENOENT)), None);
        let dir = ContainerError::IdmapStaging {
            path: "/s".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(refused(&dir), None);
    }

    /// The path for kernels whose overlay takes no descriptors (5.19 to 6.12), run here: the
    /// same view as descriptors give, and the staged mounts are gone once the overlay is up.
    #[test]
    fn staged_layers_give_the_mapped_view_and_leave_no_mount() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        std::fs::write(layer.join("etc/conf"), "c").unwrap();
        let target = dir.path().join("rootfs");
        let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
        let lower = [layer];
        rootfs::prepare_mount(&lower, &upper, &work, &target).unwrap();
        let map = slot(9);
        let ns = idmap_userns(&map).unwrap();
        let clones = vec![idmapped_clone(&lower[0], &ns).unwrap()];
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = rootfs::unmount_rootfs(&self.0);
            }
        }
        let _guard = Unmount(target.clone());
        mount_staged(&clones, &lower, &upper, &work, &target).unwrap();
        let m = std::fs::metadata(target.join("etc/conf")).unwrap();
        assert_eq!((m.uid(), m.gid()), (map.host_id, map.host_id));
        std::fs::write(target.join("etc/conf"), "d").unwrap();
        let m = std::fs::metadata(upper.join("etc/conf")).unwrap();
        assert_eq!((m.uid(), m.gid()), (map.host_id, map.host_id));
        assert!(!rootfs::staging_dir(&target).exists());
        let prefix = dir.path().to_str().unwrap().to_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        assert_eq!(mounts, [target.to_str().unwrap()]);
    }
}
