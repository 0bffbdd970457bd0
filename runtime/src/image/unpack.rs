//! The safe tar unpacker: our own loop over `tar::Archive::entries()`, never `unpack()`.
//!
//! Guarantees, for any input bytes:
//!
//! - nothing is created, changed or removed outside the destination directory: every entry name is
//!   normalized and refused when absolute or holding `..` ([`super::paths`]); before anything is
//!   created in a directory, each component of that directory's path is checked with `lstat` to be
//!   a real directory (not a symlink) — the destination is private to this process, so nothing can
//!   change between the check and the use; files are created with `O_CREAT|O_EXCL|O_NOFOLLOW`;
//!   ownership, mode and times are set on the open file or with the no-follow variants;
//! - hardlinks only point at files this archive already created (and that are still there);
//! - device nodes are skipped (counted in [`UnpackStats::skipped_devices`]), except overlay
//!   whiteouts (char 0/0) in layers, and so are hardlinks to them: a rootfs tar of any
//!   distribution (`debootstrap`, `tar -C rootfs -c .`) holds `/dev/null`, `/dev/console`...,
//!   which a container never sees (it gets its own /dev), and a node elsewhere would reach a host
//!   device; fifos are fine;
//! - sizes are bounded by [`Limits`]: per entry, in total, entry count, and the tar extension
//!   headers (GNU long names, PAX) that the tar crate reads into memory, checked by a raw header
//!   scan ([`scan_headers`]) before the tar crate sees the stream.
//!
//! Ownership, mode (setuid included), mtime, symlinks, hardlinks and fifos are preserved; of the
//! extended attributes only file capabilities and `user.*` are (see `file_xattrs`).
//!
//! In a layer (`whiteouts = true`), `.wh.NAME` becomes an overlayfs whiteout (a char device 0/0
//! named NAME) and `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`); other
//! `.wh..wh.*` names (AUFS bookkeeping) are skipped.

use super::paths::{self, PathError, RelPath};
use super::{HostileReason, ImageError, Limits};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// What an unpack produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    /// Sum of regular file sizes.
    pub size: u64,
    /// Device nodes (and hardlinks to them) left out.
    pub skipped_devices: u64,
}

struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

struct Unpacker<'a> {
    root: &'a Path,
    limits: &'a Limits,
    whiteouts: bool,
    dirs_ok: HashSet<RelPath>,
    files: HashSet<RelPath>,
    /// Device nodes left out, so that a hardlink to one is left out too.
    devices: HashSet<RelPath>,
    dir_meta: Vec<(RelPath, Meta)>,
    stats: UnpackStats,
}

fn hostile(entry: &RelPath, reason: HostileReason) -> ImageError {
    ImageError::Hostile {
        entry: entry.to_string(),
        reason,
    }
}

fn hostile_raw(raw: &[u8], reason: HostileReason) -> ImageError {
    let shown = &raw[..raw.len().min(256)];
    ImageError::Hostile {
        entry: String::from_utf8_lossy(shown).into_owned(),
        reason,
    }
}

fn tar_err(src: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Tar {
        path: src.to_owned(),
        source,
    }
}

/// Unpacks the tar in `reader` (read from `src`, named in errors) into the existing empty
/// directory `dest`. On error `dest` holds a partial tree: the caller removes it.
pub fn unpack(
    reader: impl Read,
    src: &Path,
    dest: &Path,
    limits: &Limits,
    whiteouts: bool,
) -> Result<UnpackStats, ImageError> {
    let mut u = Unpacker {
        root: dest,
        limits,
        whiteouts,
        dirs_ok: HashSet::new(),
        files: HashSet::new(),
        devices: HashSet::new(),
        dir_meta: Vec::new(),
        stats: UnpackStats::default(),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(tar_err(src))? {
        let mut entry = entry.map_err(tar_err(src))?;
        u.stats.entries += 1;
        if u.stats.entries > limits.max_entries {
            let raw = entry.path_bytes().into_owned();
            return Err(hostile_raw(
                &raw,
                HostileReason::TooManyEntries {
                    limit: limits.max_entries,
                },
            ));
        }
        u.entry(&mut entry, src)?;
    }
    u.finish_dirs()?;
    Ok(u.stats)
}

impl Unpacker<'_> {
    fn abs(&self, rel: &RelPath) -> PathBuf {
        self.root.join(rel.to_path())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        src: &Path,
    ) -> Result<(), ImageError> {
        // A sparse file of GNU tar's PAX formats (`tar -S --format=pax`) is stored under a made-up
        // name (`GNUSparseFile.PID/NAME`), its real name and size in the PAX header.
        let sparse = pax_sparse(entry).map_err(tar_err(src))?;
        let raw = match &sparse {
            Some(s) => s.name.clone(),
            None => entry.path_bytes().into_owned(),
        };
        let rel = paths::entry_path(&raw).map_err(|e| hostile_raw(&raw, e.into()))?;
        let header = entry.header();
        let kind = header.entry_type();
        let meta = Meta {
            uid: u32::try_from(header.uid().map_err(tar_err(src))?).unwrap_or(u32::MAX),
            gid: u32::try_from(header.gid().map_err(tar_err(src))?).unwrap_or(u32::MAX),
            mode: header.mode().map_err(tar_err(src))? & 0o7777,
            mtime: i64::try_from(header.mtime().map_err(tar_err(src))?).unwrap_or(i64::MAX),
        };
        if self.whiteouts {
            if let Some(name) = rel.file_name().and_then(|n| n.strip_prefix(b".wh.")) {
                return self.whiteout(&rel, name);
            }
        }
        use tar::EntryType as T;
        match kind {
            T::Directory => self.directory(&rel, meta),
            T::Regular | T::Continuous => {
                let data = sparse.map_or(Data::Plain, Data::PaxSparse);
                self.regular(entry, &rel, meta, src, data)
            }
            // The old GNU sparse format: the tar crate reads its holes as zeros, which are
            // left as holes again (a 1 GiB sparse file took 1 GiB; QA of session 24).
            T::GNUSparse => self.regular(entry, &rel, meta, src, Data::ZerosAsHoles),
            T::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.symlink(&rel, &target, meta)
            }
            T::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.hardlink(&rel, &target)
            }
            T::Fifo => self.fifo(&rel, meta),
            T::Char
                if self.whiteouts
                    && header.device_major().ok().flatten() == Some(0)
                    && header.device_minor().ok().flatten() == Some(0) =>
            {
                self.make_whiteout(&rel)
            }
            T::Char | T::Block => {
                self.stats.skipped_devices += 1;
                self.devices.insert(rel);
                Ok(())
            }
            T::XGlobalHeader => Ok(()),
            other => Err(hostile(
                &rel,
                HostileReason::UnsupportedType(other.as_byte()),
            )),
        }
    }

    /// Checks (or creates) every directory above `rel`, refusing to go through anything that is
    /// not a real directory.
    fn ensure_parent(&mut self, rel: &RelPath) -> Result<(), ImageError> {
        let parent = rel.parent();
        let comps = parent.components();
        let mut cur = RelPath::default();
        for c in comps {
            cur = cur.join(c);
            if self.dirs_ok.contains(&cur) {
                continue;
            }
            let p = self.abs(&cur);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(hostile(rel, HostileReason::ThroughSymlink))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(hostile(rel, HostileReason::ThroughNonDirectory)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&p).map_err(ImageError::io("creating directory", &p))?;
                }
                Err(e) => return Err(ImageError::io("inspecting", &p)(e)),
            }
            self.dirs_ok.insert(cur.clone());
        }
        Ok(())
    }

    /// Makes room for a new entry at `rel`: removes what is there unless both are directories.
    /// Returns true when a directory is already there and `keep_dir` was asked.
    fn prepare_slot(&mut self, rel: &RelPath, keep_dir: bool) -> Result<bool, ImageError> {
        if rel.is_root() {
            return if keep_dir {
                Ok(true)
            } else {
                Err(hostile(rel, HostileReason::ReplacesRoot))
            };
        }
        self.ensure_parent(rel)?;
        let p = self.abs(rel);
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(ImageError::io("inspecting", &p)(e)),
        };
        if m.is_dir() {
            if keep_dir {
                return Ok(true);
            }
            fs::remove_dir_all(&p).map_err(ImageError::io("removing", &p))?;
        } else {
            fs::remove_file(&p).map_err(ImageError::io("removing", &p))?;
        }
        self.files.retain(|f| !f.starts_with(rel));
        self.dirs_ok.retain(|d| !d.starts_with(rel));
        self.dir_meta.retain(|(d, _)| !d.starts_with(rel));
        Ok(false)
    }

    fn directory(&mut self, rel: &RelPath, meta: Meta) -> Result<(), ImageError> {
        if !self.prepare_slot(rel, true)? {
            let p = self.abs(rel);
            fs::create_dir(&p).map_err(ImageError::io("creating directory", &p))?;
        }
        self.dirs_ok.insert(rel.clone());
        self.dir_meta.retain(|(d, _)| d != rel);
        self.dir_meta.push((rel.clone(), meta));
        Ok(())
    }

    /// A regular file, its data laid out as `data` says.
    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &RelPath,
        meta: Meta,
        src: &Path,
        data: Data,
    ) -> Result<(), ImageError> {
        let limits = self.limits;
        let xattrs = file_xattrs(entry).map_err(tar_err(src))?;
        let size = match &data {
            Data::PaxSparse(s) => s.real_size,
            Data::Plain | Data::ZerosAsHoles => entry.size(),
        };
        if size > limits.max_entry_size {
            let reason = HostileReason::EntryTooLarge {
                size,
                limit: limits.max_entry_size,
            };
            return Err(hostile(rel, reason));
        }
        let total = self.stats.size.saturating_add(size);
        if total > limits.max_total_size {
            let reason = HostileReason::TotalTooLarge {
                limit: limits.max_total_size,
            };
            return Err(hostile(rel, reason));
        }
        self.prepare_slot(rel, false)?;
        let p = self.abs(rel);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(ImageError::io("creating", &p))?;
        let copied = match data {
            Data::Plain => io::copy(&mut entry.take(limits.max_entry_size + 1), &mut f)
                .map_err(tar_err(src))?,
            Data::PaxSparse(s) => write_sparse(entry, &mut f, s)
                .map_err(tar_err(src))?
                .map_err(|why| hostile(rel, HostileReason::BadSparse(why)))?,
            Data::ZerosAsHoles => {
                copy_with_holes(entry, &mut f, limits.max_entry_size).map_err(tar_err(src))?
            }
        };
        if copied > limits.max_entry_size {
            let reason = HostileReason::EntryTooLarge {
                size: copied,
                limit: limits.max_entry_size,
            };
            return Err(hostile(rel, reason));
        }
        self.stats.size = self.stats.size.saturating_add(copied);
        // chown first: it clears setuid/setgid bits, which the chmod then sets.
        std::os::unix::fs::fchown(&f, Some(meta.uid), Some(meta.gid))
            .map_err(ImageError::io("changing owner of", &p))?;
        // File capabilities after the chown (which clears them), before the chmod (which keeps
        // them).
        for (name, value) in &xattrs {
            super::sys::lsetxattr(&p, name, value)
                .map_err(ImageError::io("setting extended attribute of", &p))?;
        }
        f.set_permissions(fs::Permissions::from_mode(meta.mode))
            .map_err(ImageError::io("changing mode of", &p))?;
        f.set_modified(system_time(meta.mtime))
            .map_err(ImageError::io("setting mtime of", &p))?;
        self.files.insert(rel.clone());
        Ok(())
    }

    fn symlink(&mut self, rel: &RelPath, target: &[u8], meta: Meta) -> Result<(), ImageError> {
        paths::symlink_target(rel, target).map_err(|e| match e {
            // The target in the message (QA of session 29: only that it escaped).
            PathError::EscapingTarget => hostile(
                rel,
                HostileReason::EscapingLink(String::from_utf8_lossy(target).into_owned()),
            ),
            e => hostile(rel, e.into()),
        })?;
        self.prepare_slot(rel, false)?;
        let p = self.abs(rel);
        use std::os::unix::ffi::OsStrExt;
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
            .map_err(ImageError::io("creating symlink", &p))?;
        std::os::unix::fs::lchown(&p, Some(meta.uid), Some(meta.gid))
            .map_err(ImageError::io("changing owner of", &p))?;
        set_mtime_nofollow(&p, meta.mtime)?;
        self.files.insert(rel.clone());
        Ok(())
    }

    fn hardlink(&mut self, rel: &RelPath, target: &[u8]) -> Result<(), ImageError> {
        let to = paths::entry_path(target).map_err(|why| {
            hostile(
                rel,
                HostileReason::HardlinkTarget {
                    target: String::from_utf8_lossy(target).into_owned(),
                    why,
                },
            )
        })?;
        if self.devices.contains(&to) {
            self.stats.skipped_devices += 1;
            self.devices.insert(rel.clone());
            return Ok(());
        }
        if !self.files.contains(&to) {
            return Err(hostile(rel, HostileReason::HardlinkMissing));
        }
        if &to == rel {
            return Ok(());
        }
        // The target's parents were checked when it was created and nothing replaced them since
        // (replacing a directory forgets every file under it); check again all the same.
        self.ensure_parent(&to)?;
        self.prepare_slot(rel, false)?;
        let (from, p) = (self.abs(&to), self.abs(rel));
        // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        fs::hard_link(&from, &p).map_err(ImageError::io("creating hardlink", &p))?;
        self.files.insert(rel.clone());
        Ok(())
    }

    fn fifo(&mut self, rel: &RelPath, meta: Meta) -> Result<(), ImageError> {
        self.prepare_slot(rel, false)?;
        let p = self.abs(rel);
        nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600))
            .map_err(|e| ImageError::io("creating fifo", &p)(e.into()))?;
        std::os::unix::fs::lchown(&p, Some(meta.uid), Some(meta.gid))
            .map_err(ImageError::io("changing owner of", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(meta.mode))
            .map_err(ImageError::io("changing mode of", &p))?;
        set_mtime_nofollow(&p, meta.mtime)?;
        self.files.insert(rel.clone());
        Ok(())
    }

    fn whiteout(&mut self, rel: &RelPath, name: &[u8]) -> Result<(), ImageError> {
        let dir = rel.parent();
        if name == b".wh..opq" {
            if !dir.is_root() {
                self.ensure_parent(&dir)?;
                if !self.prepare_slot(&dir, true)? {
                    let p = self.abs(&dir);
                    fs::create_dir(&p).map_err(ImageError::io("creating directory", &p))?;
                }
                self.dirs_ok.insert(dir.clone());
            }
            let p = self.abs(&dir);
            return super::sys::lsetxattr(&p, "trusted.overlay.opaque", b"y")
                .map_err(ImageError::io("marking opaque", &p));
        }
        if name.starts_with(b".wh.") {
            return Ok(());
        }
        if name.is_empty() || name == b"." || name == b".." {
            return Err(hostile(rel, HostileReason::BadWhiteout));
        }
        self.make_whiteout(&dir.join(name))
    }

    fn make_whiteout(&mut self, rel: &RelPath) -> Result<(), ImageError> {
        self.prepare_slot(rel, false)?;
        let p = self.abs(rel);
        nix::sys::stat::mknod(&p, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| ImageError::io("creating whiteout", &p)(e.into()))?;
        Ok(())
    }

    /// Applies directory ownership, modes and times last (deepest first), so a read-only
    /// directory does not stop its own entries from being created.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        self.dir_meta.sort_by(|a, b| b.0.cmp(&a.0));
        for (rel, meta) in &self.dir_meta {
            let p = self.abs(rel);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            std::os::unix::fs::lchown(&p, Some(meta.uid), Some(meta.gid))
                .map_err(ImageError::io("changing owner of", &p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(meta.mode))
                .map_err(ImageError::io("changing mode of", &p))?;
            set_mtime_nofollow(&p, meta.mtime)?;
        }
        Ok(())
    }
}

/// How a regular file's entry holds its data.
enum Data {
    /// As it is.
    Plain,
    /// One of GNU tar's PAX sparse files: its chunks go at their offsets.
    PaxSparse(PaxSparse),
    /// The old GNU sparse format, whose holes the tar crate reads as zeros: zero blocks are left
    /// as holes.
    ZerosAsHoles,
}

/// A sparse file of GNU tar's PAX formats: its real name and size, and where its data chunks
/// go (`None`: the map is at the start of the data, format 1.0).
#[derive(Debug, Default)]
struct PaxSparse {
    name: Vec<u8>,
    real_size: u64,
    map: Option<Vec<(u64, u64)>>,
}

/// Copies `r` into `f` leaving each 4 KiB block of zeros a hole; returns the bytes copied (at
/// most `max` + 1, so that the caller can refuse more than `max`).
fn copy_with_holes(r: &mut impl Read, f: &mut File, max: u64) -> io::Result<u64> {
    const BLOCK: usize = 4096;
    let mut buf = vec![0u8; 64 * BLOCK];
    let mut r = r.take(max + 1);
    let mut at = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        for block in buf[..n].chunks(BLOCK) {
            if block.iter().any(|&b| b != 0) {
                f.seek(SeekFrom::Start(at))?;
                io::Write::write_all(f, block)?;
            }
            at += block.len() as u64;
        }
    }
    f.set_len(at)?;
    Ok(at)
}

/// Most chunks a sparse file's map may list.
const MAX_SPARSE_CHUNKS: usize = 1 << 20;

/// The entry's PAX sparse description, if it has one (`GNU.sparse.*` keys: formats 0.0, 0.1
/// and 1.0 of GNU tar).
fn pax_sparse<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Option<PaxSparse>> {
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(None);
    };
    let (mut major, mut name, mut real_size, mut map_text) = (None, None, None, None);
    let mut offsets: Vec<u64> = Vec::new();
    let mut lengths: Vec<u64> = Vec::new();
    let mut any = false;
    let num = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    for ext in exts {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        let Some(k) = key.strip_prefix("GNU.sparse.") else {
            if key == "path" && name.is_none() {
                name = Some(ext.value_bytes().to_vec());
            }
            continue;
        };
        any = true;
        let v = ext.value_bytes();
        match k {
            "major" => major = num(v),
            "name" => name = Some(v.to_vec()),
            "realsize" | "size" => real_size = num(v),
            "map" => map_text = Some(v.to_vec()),
            "offset" => offsets.push(num(v).ok_or_else(|| bad("bad GNU.sparse.offset"))?),
            "numbytes" => lengths.push(num(v).ok_or_else(|| bad("bad GNU.sparse.numbytes"))?),
            _ => {}
        }
        if offsets.len() > MAX_SPARSE_CHUNKS {
            return Err(bad("too many GNU.sparse.offset keys"));
        }
    }
    if !any {
        return Ok(None);
    }
    let real_size = real_size.ok_or_else(|| bad("a PAX sparse file without its real size"))?;
    let name = match name {
        Some(n) => n,
        None => entry.path_bytes().into_owned(),
    };
    let map = if major == Some(1) {
        None
    } else if let Some(text) = map_text {
        let nums: Vec<u64> = text
            .split(|&b| b == b',')
            .map(|n| num(n).ok_or_else(|| bad("bad GNU.sparse.map")))
            .collect::<io::Result<_>>()?;
        if nums.len() & 1 != 0 || nums.len() / 2 > MAX_SPARSE_CHUNKS {
            return Err(bad("bad GNU.sparse.map"));
        }
        Some(nums.chunks(2).map(|c| (c[0], c[1])).collect())
    } else {
        if offsets.len() != lengths.len() {
            return Err(bad("GNU.sparse.offset and numbytes do not pair"));
        }
        Some(offsets.into_iter().zip(lengths).collect())
    };
    Ok(Some(PaxSparse {
        name,
        real_size,
        map,
    }))
}

/// Reads a decimal number ended by a newline from a 1.0 sparse map; counts the bytes read.
fn map_number(r: &mut impl Read, read: &mut u64) -> io::Result<Result<u64, &'static str>> {
    let mut n: u64 = 0;
    let mut digits = 0;
    loop {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        *read += 1;
        match b[0] {
            b'\n' if digits > 0 => return Ok(Ok(n)),
            d @ b'0'..=b'9' if digits < 20 => {
                digits += 1;
                match n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d - b'0')))
                {
                    Some(v) => n = v,
                    None => return Ok(Err("a number of the map overflows")),
                }
            }
            _ => return Ok(Err("the map at the start of the data is malformed")),
        }
    }
}

/// Writes a PAX sparse file's data chunks from `r` at their offsets in `f` and gives it its real
/// size; returns the data bytes written. The map must list chunks in order, without overlap,
/// within the real size.
fn write_sparse(
    r: &mut impl Read,
    f: &mut File,
    s: PaxSparse,
) -> io::Result<Result<u64, &'static str>> {
    let map = match s.map {
        Some(m) => m,
        None => {
            // Format 1.0: the count, then offset and size pairs, each on its own line, padded
            // to a 512-byte block.
            let mut read = 0u64;
            let count = match map_number(r, &mut read)? {
                Ok(c) if c as usize <= MAX_SPARSE_CHUNKS => c,
                Ok(_) => return Ok(Err("the map lists too many chunks")),
                Err(e) => return Ok(Err(e)),
            };
            let mut m = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let off = match map_number(r, &mut read)? {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                let len = match map_number(r, &mut read)? {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                m.push((off, len));
            }
            let pad = (512 - read % 512) % 512;
            io::copy(&mut r.take(pad), &mut io::sink())?;
            m
        }
    };
    let mut end = 0u64;
    let mut written = 0u64;
    for (off, len) in map {
        let Some(chunk_end) = off.checked_add(len) else {
            return Ok(Err("a chunk runs past the largest size"));
        };
        if off < end || chunk_end > s.real_size {
            return Ok(Err(
                "the map's chunks overlap, are out of order or pass the real size",
            ));
        }
        end = chunk_end;
        if len == 0 {
            continue;
        }
        f.seek(SeekFrom::Start(off))?;
        let n = io::copy(&mut r.take(len), f)?;
        if n != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the sparse file's data ends before its map says",
            ));
        }
        written += n;
    }
    f.set_len(s.real_size)?;
    Ok(Ok(written))
}

/// The extended attributes of an entry (PAX `SCHILY.xattr.*`) that an image may set on its
/// files: file capabilities and `user.*`. Others are dropped: `trusted.overlay.*` would steer
/// overlayfs (redirects, metacopy) and `security.*` labels belong to the host's policy.
fn file_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
            continue;
        };
        if name == "security.capability" || name.starts_with("user.") {
            out.push((name.to_owned(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

fn system_time(secs: i64) -> std::time::SystemTime {
    let secs = u64::try_from(secs).unwrap_or(0);
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

fn set_mtime_nofollow(p: &Path, mtime: i64) -> Result<(), ImageError> {
    let t = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        None,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| ImageError::io("setting mtime of", p)(e.into()))
}

/// Walks the raw 512-byte headers of the tar in `file` and refuses extension headers (GNU long
/// names and link names, PAX) larger than the limit, before the tar crate reads them into memory,
/// and entries larger than the per-entry limit, before anything else looks at the archive.
/// Leaves `file` at its start.
pub fn scan_headers(file: &mut File, src: &Path, limits: &Limits) -> Result<(), ImageError> {
    let res = scan_inner(file, limits);
    file.seek(SeekFrom::Start(0)).map_err(tar_err(src))?;
    match res {
        Ok(()) => Ok(()),
        Err(ScanError::Io(e)) => Err(tar_err(src)(e)),
        Err(ScanError::Hostile(name, reason)) => Err(hostile_raw(&name, reason)),
    }
}

enum ScanError {
    Io(io::Error),
    Hostile(Vec<u8>, HostileReason),
}

impl From<io::Error> for ScanError {
    fn from(e: io::Error) -> ScanError {
        ScanError::Io(e)
    }
}

/// Reads a full block, or returns false at a clean end of file.
fn read_block(r: &mut impl Read, buf: &mut [u8; 512]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Parses a tar numeric field exactly as the tar crate does (so both walk the same headers):
/// GNU base-256 when the high bit is set (the last 8 bytes of a longer field), else octal text
/// up to the first NUL, surrounding whitespace trimmed.
fn parse_num(field: &[u8]) -> io::Result<u64> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid numeric field in tar header",
        )
    };
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = 0;
        let skip = if field.len() == 8 {
            v = u64::from(field[0] ^ 0x80);
            1
        } else {
            field.len().saturating_sub(8)
        };
        for &b in &field[skip..] {
            v = (v << 8) | u64::from(b);
        }
        return Ok(v);
    }
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let s = std::str::from_utf8(&field[..end]).map_err(|_| bad())?;
    u64::from_str_radix(s.trim(), 8).map_err(|_| bad())
}

/// The `size` record of a PAX extended header, read as the tar crate reads it.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

fn scan_inner(file: &mut File, limits: &Limits) -> Result<(), ScanError> {
    let mut block = [0u8; 512];
    let mut next_size: Option<u64> = None;
    loop {
        if !read_block(file, &mut block)? {
            return Ok(());
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let kind = block[156];
        let mut size = parse_num(&block[124..136])?;
        // The tar crate's view: PAX records apply to the next header that is not itself an
        // extension header; GNU long names and PAX headers of ustar or GNU headers are read
        // into memory.
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g');
        let recognized = &block[257..265] == b"ustar\x0000" || &block[257..265] == b"ustar  \0";
        let in_memory = recognized && matches!(kind, b'L' | b'K' | b'x');
        if !extension {
            if let Some(s) = next_size.take() {
                size = s;
            }
        }
        let name = || {
            let n = block[..100].iter().position(|&b| b == 0).unwrap_or(100);
            block[..n].to_vec()
        };
        if in_memory && size > limits.max_extension_size {
            let reason = HostileReason::ExtensionTooLarge {
                size,
                limit: limits.max_extension_size,
            };
            return Err(ScanError::Hostile(
                b"(tar extension header)".to_vec(),
                reason,
            ));
        }
        if !in_memory && size > limits.max_entry_size {
            let reason = HostileReason::EntryTooLarge {
                size,
                limit: limits.max_entry_size,
            };
            return Err(ScanError::Hostile(name(), reason));
        }
        if kind == b'S' && block[482] != 0 {
            // Old GNU sparse: more sparse-map blocks follow the header.
            loop {
                if !read_block(file, &mut block)? {
                    return Ok(());
                }
                if block[504] == 0 {
                    break;
                }
            }
        }
        let padded = size.div_ceil(512).saturating_mul(512);
        if in_memory && kind == b'x' {
            let mut data = vec![0u8; usize::try_from(padded).unwrap_or(usize::MAX)];
            file.read_exact(&mut data)?;
            next_size = pax_size(&data[..size as usize]);
        } else {
            let skip = i64::try_from(padded).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "tar entry size out of range")
            })?;
            file.seek(SeekFrom::Current(skip))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1.0 sparse map that is malformed, overlaps or passes the real size is refused; a good
    /// one places its chunks.
    #[test]
    fn sparse_maps_are_checked() {
        let run = |data: &[u8], real_size: u64| {
            let dir = tempfile::tempdir().unwrap();
            let mut f = File::create(dir.path().join("f")).unwrap();
            let s = PaxSparse {
                name: b"f".to_vec(),
                real_size,
                ..PaxSparse::default()
            };
            let r = write_sparse(&mut &data[..], &mut f, s).unwrap();
            (r, fs::read(dir.path().join("f")).unwrap())
        };
        let block = |map: &str, data: &[u8]| {
            let mut v = map.as_bytes().to_vec();
            v.resize(512, 0);
            v.extend_from_slice(data);
            v
        };
        let (r, content) = run(&block("2\n2\n3\n8\n1\n", b"abcz"), 10);
        assert_eq!(r, Ok(4));
        assert_eq!(content, b"\0\0abc\0\0\0z\0");
        assert!(
            run(&block("2\n4\n3\n5\n1\n", b"abcz"), 10).0.is_err(),
            "overlap"
        );
        assert!(
            run(&block("1\n8\n3\n", b"abc"), 10).0.is_err(),
            "past the size"
        );
        assert!(
            run(&block("1\nx\n3\n", b"abc"), 10).0.is_err(),
            "not a number"
        );
        assert!(
            run(&block("1\n\n3\n", b"abc"), 10).0.is_err(),
            "empty number"
        );
        assert!(
            run(&block("1\n99999999999999999999\n1\n", b"a"), 10)
                .0
                .is_err(),
            "overflow"
        );
    }

    #[test]
    fn parses_numeric_fields() {
        assert_eq!(parse_num(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_num(b"   17 \0").unwrap(), 0o17);
        assert!(
            parse_num(b"\0\0\0").is_err(),
            "the tar crate refuses an empty field too"
        );
        assert_eq!(
            parse_num(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]).unwrap(),
            2 << 32
        );
        assert!(parse_num(b"0009").is_err());
        assert_eq!(
            parse_num(&[0x81, 0, 0, 0, 0, 0, 0, 1]).unwrap(),
            (1 << 56) + 1
        );
        assert_eq!(parse_num(&[0xff; 12]).unwrap(), u64::MAX);
        assert!(parse_num(b"1 2\0").is_err());
    }

    #[test]
    fn finds_pax_size() {
        assert_eq!(pax_size(b"16 size=1234567\n"), Some(1_234_567));
        assert_eq!(pax_size(b"12 path=abc\n16 size=1234567\n"), Some(1_234_567));
        assert_eq!(pax_size(b"12 path=abc\n"), None);
        assert_eq!(pax_size(b"11 size=x\n"), None);
        assert_eq!(pax_size(b"99 size=1\n"), None);
        assert_eq!(pax_size(b"0 x"), None);
        assert_eq!(pax_size(b"garbage"), None);
        // Agrees with the tar crate on what it applies.
        let data = b"12 path=abc\n16 size=1234567\n";
        let exts: Vec<_> = tar::PaxExtensions::new(data).collect();
        assert_eq!(exts.len(), 2);
    }
}
