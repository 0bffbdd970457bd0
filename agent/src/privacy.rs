//! Who may read the state directory: root only, except the one path a `--userns` container's
//! mapped root must walk (docs/security.md, "The state directory").
//!
//! ```text
//! <state-dir>/                 0711 root      others may traverse, not list
//!   containers/                0711 root      likewise
//!     <id>/                    0700 root      a container without a user namespace
//!     <id>/                    0710 root:G    a --userns container: G is the host gid its root
//!                                             maps to, so only that container's root (and root)
//!                                             may traverse to its rootfs and checkpoint
//!   images/ migrations/ ...    0700 root      every other directory
//!   peers.json net.json ...    0600 root      every other file
//! ```
//!
//! A `--userns` container's init binds and enters `containers/<id>/rootfs` by path as its
//! mapped root (host uid and gid `H`), and CRIU's restore, as that root with no supplementary
//! group, opens images through its descriptor of `containers/<id>/checkpoint` (seen with
//! `strace -f`): nothing else of the state directory is walked by an id other than host root.
//! What is inside a container's directory keeps its modes (CRIU's images are 0644, its
//! `checkpoint/` 0755): the directory is the gate.
//!
//! State files are written 0600 from the start ([`mig_runtime::fsutil::atomic_write`]). migd
//! applies these modes at start (fixing state directories of older versions, whose files were
//! made with the umask, 0644 mostly), and again to a container's directory each time it starts
//! or restores the container (a directory made by an incoming move or an import gets its group
//! then).

use mig_runtime::spec::IdMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::layout::StateDir;

/// The state directory and `containers/`: traversable by every id, listable by root only.
pub const TRAVERSE_ONLY: u32 = 0o711;
/// Every other directory, and a container's directory without a user namespace.
pub const PRIVATE_DIR: u32 = 0o700;
/// Every file directly in the state directory: the mode every state file is written with
/// ([`mig_runtime::fsutil::atomic_write`]).
pub const PRIVATE_FILE: u32 = mig_runtime::fsutil::PRIVATE_FILE;
/// A `--userns` container's directory, group-owned by the host gid its root maps to.
pub const USERNS_CONTAINER_DIR: u32 = 0o710;

#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the mode of {} to {mode:o}", path.display())]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {} to root and group {gid}", path.display())]
    Chown {
        path: PathBuf,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Creates `dir` (and missing parents) with `mode` when missing; an existing `dir` is left as
/// it is. A directory made here never exists with a wider mode, whatever the umask.
pub fn create_dir(dir: &Path, mode: u32) -> Result<(), PrivacyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| PrivacyError::Create {
            path: dir.to_owned(),
            source,
        })
}

/// Sets the permission bits of `path` to `mode` unless they are already; true when changed.
fn set_mode(path: &Path, meta: &std::fs::Metadata, mode: u32) -> Result<bool, PrivacyError> {
    if meta.permissions().mode() & 0o7777 == mode {
        return Ok(false);
    }
    chmod(path, mode)?;
    Ok(true)
}

fn chmod(path: &Path, mode: u32) -> Result<(), PrivacyError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        PrivacyError::Chmod {
            path: path.to_owned(),
            mode,
            source,
        }
    })
}

/// The paths of the entries of directory `dir`.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, PrivacyError> {
    let read_err = |source| PrivacyError::Read {
        path: dir.to_owned(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.path()).map_err(read_err))
        .collect()
}

fn meta(path: &Path) -> Result<std::fs::Metadata, PrivacyError> {
    std::fs::symlink_metadata(path).map_err(|source| PrivacyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates the state directory, `containers/`, `images/` and `migrations/` when missing and gives everything
/// in it the modes of this module's table: a state directory of an older migd (made with the
/// umask, 0755 mostly) is fixed here. Returns the paths whose mode or group changed.
pub fn secure_state_dir(dirs: &StateDir) -> Result<Vec<PathBuf>, PrivacyError> {
    let mut changed = Vec::new();
    let root = dirs.root();
    create_dir(root, TRAVERSE_ONLY)?;
    create_dir(&dirs.containers(), TRAVERSE_ONLY)?;
    // Made here rather than on first use (with the umask): an incoming move's images are
    // received under `migrations/<id>.in/` before the container has a directory.
    create_dir(&dirs.images(), PRIVATE_DIR)?;
    create_dir(&crate::migration::journal::dir(root), PRIVATE_DIR)?;
    for p in [root.to_owned(), dirs.containers()] {
        if set_mode(&p, &meta(&p)?, TRAVERSE_ONLY)? {
            changed.push(p);
        }
    }
    for path in entries(root)? {
        if path == dirs.containers() {
            continue;
        }
        let m = meta(&path)?;
        // Symbolic links and sockets are not followed or changed (migd makes none here).
        let mode = if m.is_dir() {
            PRIVATE_DIR
        } else if m.is_file() {
            PRIVATE_FILE
        } else {
            continue;
        };
        if set_mode(&path, &m, mode)? {
            changed.push(path);
        }
    }
    changed.extend(secure_containers(dirs)?);
    Ok(changed)
}

/// Every container directory (and what else is in `containers/`: an interrupted import's
/// temporary directory, for one) gets its mode and group.
fn secure_containers(dirs: &StateDir) -> Result<Vec<PathBuf>, PrivacyError> {
    let mut changed = Vec::new();
    for path in entries(&dirs.containers())? {
        let m = meta(&path)?;
        if !m.is_dir() {
            if m.is_file() && set_mode(&path, &m, PRIVATE_FILE)? {
                changed.push(path);
            }
            continue;
        }
        // A spec that cannot be read leaves the directory root's alone (such a container is
        // not loaded either); its group comes back with the next start of a readable one.
        let userns = crate::layout::read_record::<UsernsOf>(&path.join("spec.json"))
            .ok()
            .and_then(|s| s.userns);
        if secure_container_dir(&path, userns.as_ref())? {
            changed.push(path);
        }
    }
    Ok(changed)
}

/// The one field of a container's `spec.json` ([`mig_runtime::spec::ContainerSpec`]) that
/// decides its directory's mode.
#[derive(serde::Deserialize)]
struct UsernsOf {
    userns: Option<IdMap>,
}

/// Gives a container's directory its mode: root's alone (0700), or with a user namespace
/// traversable by the group its root maps to (0710, group `host_id`), so that its init and
/// CRIU's restore, running as that root, reach its rootfs and checkpoint and nothing else of
/// the state directory. Returns whether anything changed.
pub fn secure_container_dir(dir: &Path, userns: Option<&IdMap>) -> Result<bool, PrivacyError> {
    use std::os::unix::fs::MetadataExt;
    let m = meta(dir)?;
    let (gid, mode) = match userns {
        Some(map) => (map.host_id, USERNS_CONTAINER_DIR),
        None => (0, PRIVATE_DIR),
    };
    if m.uid() == 0 && m.gid() == gid && m.permissions().mode() & 0o7777 == mode {
        return Ok(false);
    }
    // Closed first, so that no other group can traverse it between the two steps.
    set_mode(dir, &m, PRIVATE_DIR)?;
    std::os::unix::fs::lchown(dir, Some(0), Some(gid)).map_err(|source| PrivacyError::Chown {
        path: dir.to_owned(),
        gid,
        source,
    })?;
    chmod(dir, mode)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_old_state_dir_is_made_private() {
        if !nix::unistd::Uid::effective().is_root() {
            return; // giving a directory to another group needs root
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let dirs = StateDir::new(&root);
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        // As migd 0.x left it with umask 022.
        for d in [
            "containers/a",
            "containers/b",
            "images/x",
            "migrations/m.in",
            "identity",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("peers.json"), b"{}").unwrap();
        std::fs::write(root.join("migrations/m.json"), b"{}").unwrap();
        // Only `userns` is read (the rest of a spec does not matter here).
        let spec = |userns: Option<IdMap>| serde_json::json!({ "userns": userns });
        let map = IdMap {
            host_id: 4_200_000,
            size: 65_536,
        };
        crate::layout::write_record(&root.join("containers/a/spec.json"), &spec(None)).unwrap();
        crate::layout::write_record(&root.join("containers/b/spec.json"), &spec(Some(map)))
            .unwrap();
        for p in [&root, &dirs.containers(), &root.join("containers/a")] {
            set(p, 0o755);
        }
        std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        set(&root.join("sock"), 0o666);

        let changed = secure_state_dir(&dirs).unwrap();
        assert!(changed.contains(&root), "{changed:?}");
        assert_eq!(mode(&root), TRAVERSE_ONLY);
        assert_eq!(mode(&dirs.containers()), TRAVERSE_ONLY);
        for d in ["images", "migrations", "identity", "containers/a"] {
            assert_eq!(mode(&root.join(d)), PRIVATE_DIR, "{d}");
        }
        assert_eq!(mode(&root.join("peers.json")), PRIVATE_FILE);
        let b = std::fs::metadata(root.join("containers/b")).unwrap();
        assert_eq!((b.mode() & 0o7777, b.uid(), b.gid()), (0o710, 0, 4_200_000));
        // Only the top level and the container directories: what is inside them keeps its mode.
        assert_eq!(mode(&root.join("images/x")), 0o755);
        assert_eq!(mode(&root.join("migrations/m.json")), 0o644);
        assert_eq!(mode(&root.join("sock")), 0o666, "sockets are left alone");
        // A second start changes nothing.
        assert_eq!(secure_state_dir(&dirs).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_missing_state_dir_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/state");
        let dirs = StateDir::new(&root);
        secure_state_dir(&dirs).unwrap();
        assert_eq!(mode(&root), TRAVERSE_ONLY);
        assert_eq!(mode(&dirs.containers()), TRAVERSE_ONLY);
        assert_eq!(mode(&dirs.images()), PRIVATE_DIR);
        assert_eq!(mode(&root.join("migrations")), PRIVATE_DIR);
    }
}
