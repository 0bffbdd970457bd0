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
//! they changed too). With appends (protocol 1.6), a file that only grew travels as its new
//! bytes ([`LayerScan::append_offset`]): the scan keeps the SHA-256 of what the presync archived
//! of each regular file with one link, and the delta hashes that many bytes again.
//!
//! [`apply_layer_delta`] removes the deleted paths, then each changed path (unless both old and
//! new are directories), then unpacks the entries; an append entry is appended to the file there,
//! which must hold exactly the bytes before the entry's offset.

use super::layer::{
    add_entry, add_entry_hashed, append_entry, is_sparse, prefix_digest, unpack_entries, walk,
    LayerError, Links,
};
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

/// The entries of a layer by relative path, as they were when archived, and the digest
/// (XXH3-128 under the scan's random `seed`) of what was archived of each regular file with one
/// link and no holes (what a delta may append to).
#[derive(Debug, Clone, Default)]
pub struct LayerScan {
    entries: BTreeMap<PathBuf, EntryMeta>,
    digests: BTreeMap<PathBuf, u128>,
    seed: u64,
}

impl LayerScan {
    /// Whether the scan saw `rel`.
    pub fn contains(&self, rel: &Path) -> bool {
        self.entries.contains_key(rel)
    }

    /// Takes `rel` as changed whatever its metadata says: a delta sends it whole (or deletes it
    /// when it is gone). For a file whose times do not tell that it changed: one a process maps
    /// shared and writable.
    pub fn forget(&mut self, rel: &Path) {
        if let Some(e) = self.entries.get_mut(rel) {
            // No file has this time: the entry never matches again.
            e.mtime_ns = i128::MIN;
        }
        self.digests.remove(rel);
    }

    /// The offset from which a delta may send only the new bytes of regular file `path` (`rel`
    /// in the layer, metadata `meta` now): the same inode, one link, grown, and its first bytes
    /// still those the presync archived (hashed again here: a write anywhere before the old end
    /// sends the whole file, as before). A log appended to crosses by its new lines only.
    fn append_offset(
        &self,
        path: &Path,
        rel: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<Option<u64>, LayerError> {
        let (Some(old), Some(digest)) = (self.entries.get(rel), self.digests.get(rel)) else {
            return Ok(None);
        };
        // A file with holes now goes whole, as a sparse entry: appended, its new holes would be
        // written out as zeros (QA of session 24: `truncate -s +3G` then 3 bytes sent 3 GiB).
        if !meta.is_file()
            || meta.nlink() != 1
            || old.ino != meta.ino()
            || meta.size() <= old.size
            || is_sparse(meta)
        {
            return Ok(None);
        }
        Ok((prefix_digest(path, old.size, self.seed)? == Some(*digest)).then_some(old.size))
    }
}

/// What a delta holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub changed: u64,
    pub deleted: u64,
    /// Of `changed`, the files that travel by their new bytes only.
    pub appended: u64,
}

/// Writes the upper directory `dir` as a full layer tar (like [`super::write_layer_tar`]) and
/// returns the scan of what it archived.
pub fn write_layer_tar_scanned(dir: &Path, w: &mut dyn Write) -> Result<LayerScan, LayerError> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut scan = LayerScan {
        // Random per process and per state (std draws its keys from the OS).
        seed: std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            0u64,
        ),
        ..LayerScan::default()
    };
    let mut links = Links::new();
    walk(dir, Path::new(""), &mut |path, rel, meta| {
        scan.entries.insert(rel.to_owned(), EntryMeta::of(meta));
        if let Some(d) = add_entry_hashed(&mut b, path, rel, meta, &mut links, scan.seed)? {
            scan.digests.insert(rel.to_owned(), d);
        }
        Ok(())
    })?;
    b.into_inner().map_err(LayerError::Write)?;
    Ok(scan)
}

/// The bytes of the regular files a delta of `dir` since `base` would carry now (new or
/// changed files, whole, or their new bytes with `appends`), and the bytes it would read again
/// to check that a grown file only grew: what the delta costs while frozen, for a check before
/// the freeze.
pub fn delta_file_bytes(
    dir: &Path,
    base: &LayerScan,
    appends: bool,
) -> Result<(u64, u64), LayerError> {
    let (mut sent, mut hashed) = (0u64, 0u64);
    walk(dir, Path::new(""), &mut |path, rel, meta| {
        if meta.is_file() && base.entries.get(rel) != Some(&EntryMeta::of(meta)) {
            let from = match appends {
                true => base.append_offset(path, rel, meta)?.unwrap_or(0),
                false => 0,
            };
            sent = sent.saturating_add(meta.size() - from);
            hashed = hashed.saturating_add(from);
        }
        Ok(())
    })?;
    Ok((sent, hashed))
}

/// Writes the delta of `dir` since `base` into `w` (see the module documentation). With
/// `appends` (a destination of protocol 1.6), a file that only grew since the presync goes as
/// its new bytes ([`LayerScan::append_offset`]).
pub fn write_layer_delta(
    dir: &Path,
    base: &LayerScan,
    w: &mut dyn Write,
    appends: bool,
) -> Result<DeltaStats, LayerError> {
    let mut now = BTreeMap::new();
    walk(dir, Path::new(""), &mut |_, rel, meta| {
        now.insert(rel.to_owned(), EntryMeta::of(meta));
        Ok(())
    })?;
    let base_entries = &base.entries;
    let mut deleted = Vec::new();
    let mut stats = DeltaStats::default();
    for p in base_entries.keys().filter(|p| !now.contains_key(*p)) {
        // A deleted directory takes its contents with it.
        if p.ancestors().skip(1).any(|a| {
            !a.as_os_str().is_empty() && base_entries.contains_key(a) && !now.contains_key(a)
        }) {
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
        if base_entries.get(rel) == Some(&EntryMeta::of(meta)) {
            return Ok(());
        }
        stats.changed += 1;
        if appends {
            if let Some(offset) = base.append_offset(path, rel, meta)? {
                stats.appended += 1;
                return append_entry(&mut b, path, rel, meta, offset);
            }
        }
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
    let removed = unpack_entries(entries, dest, true, &mut |rel, is_dir| {
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
