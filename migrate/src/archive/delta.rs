//! The writable layer in two steps, for a live move: a full tar taken while the container runs
//! (the presync) together with a [`LayerScan`] of what it held, then, while the container is
//! frozen, a delta tar of only what changed since that scan.
//!
//! An entry is "changed" when it is new or its inode, size, mtime, ctime or mode differ from the
//! scan (the metadata is read before the content, so a file written while it was being archived
//! has a newer ctime and is sent again). The delta tar starts with [`DELETED`], a list of the
//! scanned paths that are gone (NUL-separated), followed by the changed entries in the format of
//! [`super::write_layer_tar`] (whiteouts as `.wh.` files, opaque directories marked). A changed
//! multiply-linked file travels as a full copy (its other names keep their old content unless
//! they changed too).
//!
//! [`apply_layer_delta`] removes the deleted paths, then each changed path (unless both old and
//! new are directories), then unpacks the entries.

use super::layer::{add_entry, unpack_entries, walk, LayerError, Links};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The first entry of a delta tar: the deleted paths.
pub const DELETED: &str = ".mig-deleted";
/// Largest deletion list accepted (bytes).
pub const MAX_DELETED_BYTES: u64 = 64 << 20;

/// What the scan records of one entry of the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub mode: u32,
}

impl EntryMeta {
    fn of(m: &std::fs::Metadata) -> EntryMeta {
        EntryMeta {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            mode: m.mode(),
        }
    }
}

/// The entries of a layer by relative path, as they were when archived.
pub type LayerScan = BTreeMap<PathBuf, EntryMeta>;

/// What a delta holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub changed: u64,
    pub deleted: u64,
}

/// Writes the upper directory `dir` as a full layer tar (like [`super::write_layer_tar`]) and
/// returns the scan of what it archived.
pub fn write_layer_tar_scanned(dir: &Path, w: &mut dyn Write) -> Result<LayerScan, LayerError> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut scan = LayerScan::new();
    let mut links = Links::new();
    walk(dir, Path::new(""), &mut |path, rel, meta| {
        scan.insert(rel.to_owned(), EntryMeta::of(meta));
        add_entry(&mut b, path, rel, meta, &mut links)
    })?;
    b.into_inner().map_err(LayerError::Write)?;
    Ok(scan)
}

/// The bytes of the regular files a delta of `dir` since `base` would carry now (new or
/// changed files, whole): what crosses while frozen, for a check before the freeze.
pub fn delta_file_bytes(dir: &Path, base: &LayerScan) -> Result<u64, LayerError> {
    let mut bytes = 0u64;
    walk(dir, Path::new(""), &mut |_, rel, meta| {
        if meta.is_file() && base.get(rel) != Some(&EntryMeta::of(meta)) {
            bytes = bytes.saturating_add(meta.size());
        }
        Ok(())
    })?;
    Ok(bytes)
}

/// Writes the delta of `dir` since `base` into `w` (see the module documentation).
pub fn write_layer_delta(
    dir: &Path,
    base: &LayerScan,
    w: &mut dyn Write,
) -> Result<DeltaStats, LayerError> {
    let mut now = LayerScan::new();
    walk(dir, Path::new(""), &mut |_, rel, meta| {
        now.insert(rel.to_owned(), EntryMeta::of(meta));
        Ok(())
    })?;
    let mut deleted = Vec::new();
    let mut stats = DeltaStats::default();
    for p in base.keys().filter(|p| !now.contains_key(*p)) {
        // A deleted directory takes its contents with it.
        if p.ancestors()
            .skip(1)
            .any(|a| !a.as_os_str().is_empty() && base.contains_key(a) && !now.contains_key(a))
        {
            continue;
        }
        deleted.extend_from_slice(p.as_os_str().as_bytes());
        deleted.push(0);
        stats.deleted += 1;
    }
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(deleted.len() as u64);
    h.set_mode(0o600);
    b.append_data(&mut h, DELETED, deleted.as_slice())
        .map_err(LayerError::Write)?;
    let mut links = Links::new();
    walk(dir, Path::new(""), &mut |path, rel, meta| {
        if base.get(rel) == Some(&EntryMeta::of(meta)) {
            return Ok(());
        }
        stats.changed += 1;
        // Hard links only among the entries of this delta (the first name of a link set that
        // did not change is not in it, so a changed second name travels as a full copy).
        add_entry(&mut b, path, rel, meta, &mut links)
    })?;
    b.into_inner().map_err(LayerError::Write)?;
    Ok(stats)
}

/// Applies a delta tar to the upper directory `dest` holding the presync copy.
pub fn apply_layer_delta(r: &mut dyn Read, dest: &Path) -> Result<DeltaStats, LayerError> {
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_unpack_xattrs(false);
    let mut entries = a.entries().map_err(LayerError::Tar)?;
    let mut stats = DeltaStats::default();
    let mut first = entries
        .next()
        .ok_or_else(|| LayerError::Tar(io::Error::other("empty delta")))?
        .map_err(LayerError::Tar)?;
    let name = first.path().map_err(LayerError::Tar)?.into_owned();
    if name != Path::new(DELETED) || first.size() > MAX_DELETED_BYTES {
        return Err(LayerError::Tar(io::Error::other(
            "the delta does not start with its deletion list",
        )));
    }
    let mut list = Vec::new();
    first.read_to_end(&mut list).map_err(LayerError::Tar)?;
    for raw in list.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let rel = Path::new(std::ffi::OsStr::from_bytes(raw));
        let path = safe_join(dest, rel)?;
        remove_any(&path)?;
        stats.deleted += 1;
    }
    let removed = unpack_entries(entries, dest, &mut |rel, is_dir| {
        stats.changed += 1;
        let path = safe_join(dest, rel)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && is_dir => Ok(()),
            Ok(_) => remove_any(&path),
            Err(_) => Ok(()),
        }
    });
    removed.map(|()| stats)
}

fn safe_join(dest: &Path, rel: &Path) -> Result<PathBuf, LayerError> {
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(LayerError::UnsafePath {
            path: rel.to_string_lossy().chars().take(256).collect(),
        });
    }
    Ok(dest.join(rel))
}

/// Removes a file, link, device or whole directory; absent is fine.
fn remove_any(path: &Path) -> Result<(), LayerError> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(LayerError::Unpack {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
