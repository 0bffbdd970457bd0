//! The container's root filesystem on the host: an overlay of the image layers with a writable
//! upper directory.
//!
//! The overlay is built with the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`),
//! passing one `lowerdir+` per layer, so there is no limit on the number of layers or the length
//! of their paths and no escaping of `:` or `,`. When the kernel lacks that API (ENOSYS, or EINVAL
//! for `lowerdir+` before 6.8) the classic `mount(2)` option string is used if it fits in a page.
//! A user-namespace container's layers may instead be idmapped mounts given as descriptors, or
//! attached for a moment under a staging directory next to the rootfs (see [`super::userns`]).
//!
//! `index=off`: the same upper directory is mounted again at another place after a checkpoint
//! (CRIU restores onto a different mount point), and with the index on, overlay records the
//! lower layers' identities and may refuse such remounts.

use super::{sys, ContainerError};
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub(crate) fn cstring(p: &Path) -> Result<CString, ContainerError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ContainerError::PathNul {
        path: p.to_path_buf(),
    })
}

/// An image layer as overlay is told about it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lower<'a> {
    Path(&'a Path),
    /// A detached mount (an idmapped clone of a layer), given as a descriptor: no path names
    /// it, and the overlay keeps its own reference, so nothing is left to unmount but the overlay.
    Fd(BorrowedFd<'a>),
}

/// Mounts an overlay of `lower` (bottom layer first) with `upper`/`work` on `target`, creating
/// `upper`, `work` and `target` when missing.
pub fn mount_rootfs(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    prepare_mount(lower, upper, work, target)?;
    mount_paths(lower, upper, work, target)
}

/// Checks there are layers and creates `upper`, `work` and `target` when missing.
pub(crate) fn prepare_mount(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    if lower.is_empty() {
        return Err(ContainerError::NoLayers {
            target: target.to_path_buf(),
        });
    }
    for dir in [upper, work, target] {
        std::fs::create_dir_all(dir).map_err(|source| ContainerError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// The overlay of the layers at the paths `lower` (the directories exist).
pub(crate) fn mount_paths(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    let layers: Vec<Lower<'_>> = lower.iter().map(|l| Lower::Path(l)).collect();
    match mount_new_api(&layers, upper, work, target) {
        Err(ContainerError::MountRootfs {
            errno: Errno::ENOSYS | Errno::EINVAL,
            ..
        }) => mount_classic(lower, upper, work, target),
        other => other,
    }
}

/// The overlay through the new mount API (no fallback: EINVAL for a layer given as a
/// descriptor means this kernel's overlay takes only paths).
pub(crate) fn mount_new_api(
    lower: &[Lower<'_>],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    let fail = |errno| ContainerError::MountRootfs {
        target: target.to_path_buf(),
        errno,
    };
    let fs = sys::fsopen(c"overlay").map_err(fail)?;
    let fd = fs.as_raw_fd();
    sys::fsconfig_string(fd, c"source", c"overlay").map_err(fail)?;
    // Overlay wants the topmost layer first; the contract passes the bottom layer first.
    for layer in lower.iter().rev() {
        match layer {
            Lower::Path(p) => sys::fsconfig_string(fd, c"lowerdir+", &cstring(p)?),
            Lower::Fd(l) => sys::fsconfig_fd(fd, c"lowerdir+", l.as_raw_fd()),
        }
        .map_err(fail)?;
    }
    sys::fsconfig_string(fd, c"upperdir", &cstring(upper)?).map_err(fail)?;
    sys::fsconfig_string(fd, c"workdir", &cstring(work)?).map_err(fail)?;
    sys::fsconfig_string(fd, c"index", c"off").map_err(fail)?;
    sys::fsconfig_create(fd).map_err(fail)?;
    let mnt = sys::fsmount(fd).map_err(fail)?;
    sys::move_mount(mnt.as_raw_fd(), &cstring(target)?).map_err(fail)
}

fn mount_classic(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), ContainerError> {
    let mut opts = b"lowerdir=".to_vec();
    for (i, layer) in lower.iter().rev().enumerate() {
        if i > 0 {
            opts.push(b':');
        }
        opts.extend_from_slice(option_path(layer)?);
    }
    for (key, dir) in [(&b",upperdir="[..], upper), (b",workdir=", work)] {
        opts.extend_from_slice(key);
        opts.extend_from_slice(option_path(dir)?);
    }
    opts.extend_from_slice(b",index=off");
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as usize;
    if opts.len() >= page {
        return Err(ContainerError::OverlayOptionsTooLong {
            target: target.to_path_buf(),
            len: opts.len(),
        });
    }
    let data = CString::new(opts).map_err(|_| ContainerError::PathNul {
        path: target.to_path_buf(),
    })?;
    sys::mount(
        Some(c"overlay"),
        &cstring(target)?,
        Some(c"overlay"),
        0,
        Some(&data),
    )
    .map_err(|errno| ContainerError::MountRootfs {
        target: target.to_path_buf(),
        errno,
    })
}

/// A path as it may appear in the classic option string (no separators to escape).
fn option_path(p: &Path) -> Result<&[u8], ContainerError> {
    let b = p.as_os_str().as_bytes();
    if b.iter().any(|c| matches!(c, b',' | b':' | b'\\' | b'\0')) {
        return Err(ContainerError::OverlayPathUnsupported {
            path: p.to_path_buf(),
        });
    }
    Ok(b)
}

/// Unmounts the container's root filesystem (lazily if busy), and whatever a crash left under
/// its staging directory. Not an error when not mounted.
pub fn unmount_rootfs(target: &Path) -> Result<(), ContainerError> {
    let unmounted = match sys::umount2(&cstring(target)?, libc::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(errno) => Err(ContainerError::UnmountRootfs {
            target: target.to_path_buf(),
            errno,
        }),
    };
    let cleared = clear_staging(target);
    unmounted.and(cleared)
}

/// Where the idmapped layers of the rootfs at `target` are attached while its overlay is built,
/// on kernels whose overlay takes no descriptors: `TARGET.layers/<n>`, next to the rootfs (so in
/// the container's directory), outside the rootfs and not copied into the container.
pub(crate) fn staging_dir(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".layers");
    PathBuf::from(s)
}

/// Detaches every mount under the staging directory of `target` (normally none: they are
/// detached as soon as the overlay holds them; a crash in between leaves them) and removes it.
pub(crate) fn clear_staging(target: &Path) -> Result<(), ContainerError> {
    let dir = staging_dir(target);
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ContainerError::IdmapStaging { path, source }
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail(&dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(fail(&dir))?.path();
        let c = cstring(&path)?;
        // Stacked mounts (a crash, then another): detach until none is left.
        loop {
            match sys::umount2(&c, libc::MNT_DETACH) {
                Ok(()) => continue,
                Err(Errno::EINVAL | Errno::ENOENT) => break,
                Err(errno) => {
                    return Err(ContainerError::UnmountRootfs {
                        target: path.clone(),
                        errno,
                    })
                }
            }
        }
        remove_dir_if_any(&path).map_err(fail(&path))?;
    }
    remove_dir_if_any(&dir).map_err(fail(&dir))
}

fn remove_dir_if_any(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Directories the init mounts on, with their modes: it creates them itself when missing, but in
/// a user namespace it may not be allowed to (the image's directories belong to the host's root).
const MOUNT_POINTS: [(&str, u32); 3] = [("proc", 0o555), ("dev", 0o755), ("sys", 0o555)];

/// Prepares the merged rootfs at `rootfs` for a container whose root is host id `host_id` (uid
/// and gid), from the host side and before the init enters its user namespace:
/// - creates the missing mount points (`/proc`, `/dev`, `/sys`) in the writable layer, owned by
///   the container's root;
/// - makes the root directory (the writable layer's root) belong to the container's root, so
///   that it can create files and directories in `/` as it would without a user namespace.
///
/// The image layers' files are shown with the container's ids when its overlay has idmapped
/// layers ([`super::userns::mount_rootfs`]); the writable layer's root is not one of them.
pub(crate) fn prepare_userns_root(rootfs: &Path, host_id: u32) -> Result<(), ContainerError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ContainerError::PrepareUserns { path, source }
    };
    for (name, mode) in MOUNT_POINTS {
        let dir = rootfs.join(name);
        match std::fs::symlink_metadata(&dir) {
            // Whatever the image has there is what the init will mount on (or fail on, typed).
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&dir)(e)),
        }
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&dir)
            .map_err(fail(&dir))?;
        // The mode without our umask.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(fail(&dir))?;
        std::os::unix::fs::lchown(&dir, Some(host_id), Some(host_id)).map_err(fail(&dir))?;
    }
    std::os::unix::fs::chown(rootfs, Some(host_id), Some(host_id)).map_err(fail(rootfs))
}
