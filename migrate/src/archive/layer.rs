//! The container's writable layer (an overlayfs upper directory) as a tar, with overlay whiteouts
//! turned into OCI whiteout entries and back:
//!
//! - a whiteout (character device 0:0) `dir/name` is stored as an empty file `dir/.wh.name`;
//! - an opaque directory (xattr `trusted.overlay.opaque=y`) gets an empty `dir/.wh..wh..opq`.
//!
//! Minimal stand-ins until mig_runtime::image exposes its own layer writer and unpacker. Hard
//! links inside the layer stay hard links (a tar link entry to the first name); FIFOs and device
//! nodes stay FIFOs and device nodes; sockets are skipped (they cannot be archived).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";
/// An extended attribute a `SCHILY.xattr.` record cannot carry: `HEXNAME=HEXVALUE`.
const XATTR_HEX_KEY: &str = "MIG.xattr.hex";
/// The PAX record of a delta entry that appends to the file the presync left (protocol 1.6):
/// its value is the offset (decimal) the entry's data goes at; see `super::delta`.
pub(super) const APPEND_KEY: &str = "MIG.append";
/// The PAX record of an entry's modification time, seconds with a fraction (POSIX).
const PAX_MTIME: &str = "mtime";

/// Extended attributes of one entry: (name, value).
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Why a layer could not be written or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read {path} for the layer tar")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A path legal in the container (relative to its root) that the host cannot open: the
    /// state directory's prefix takes it past the kernel's 4096 bytes (QA of session 26).
    #[error("the writable layer holds a path too long to archive: {} bytes on the host, where the state directory's path comes before the container's own (the kernel's limit is 4096), under {}...: shorten that path in the container to checkpoint or move it", path.as_os_str().len(), path.to_string_lossy().chars().take(120).collect::<String>())]
    PathTooLong { path: PathBuf },
    #[error("cannot write the layer tar")]
    Write(#[source] io::Error),
    #[error("cannot read the layer tar")]
    Tar(#[source] io::Error),
    #[error("layer entry {path:?} has an unsafe path")]
    UnsafePath { path: String },
    #[error("cannot unpack layer entry {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes the upper directory `dir` as a tar stream into `w` (whiteouts as `.wh.` entries).
pub fn write_layer_tar(dir: &Path, w: &mut dyn Write) -> Result<(), LayerError> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut links = Links::new();
    walk(dir, Path::new(""), &mut |path, rel, meta| {
        add_entry(&mut b, path, rel, meta, &mut links)
    })?;
    b.into_inner().map_err(LayerError::Write)?;
    Ok(())
}

/// First archived name of every multiply-linked file, by (device, inode).
pub(super) type Links = HashMap<(u64, u64), PathBuf>;

/// Appends one entry of the layer (`path` on disk, `name` in the tar; not its children).
pub(super) fn add_entry(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
    links: &mut Links,
) -> Result<(), LayerError> {
    let ft = meta.file_type();
    let whiteout = ft.is_char_device() && meta.rdev() == 0;
    // The first name of a hard link set carries the inode's attributes; a link entry has none.
    let link_entry =
        ft.is_file() && meta.nlink() > 1 && links.contains_key(&(meta.dev(), meta.ino()));
    let xattrs = if whiteout || ft.is_socket() || link_entry {
        Vec::new()
    } else {
        with_mtime(xattr_records(path)?, meta)
    };
    // Written right before the entry they describe: a PAX header whose entry is then skipped
    // would describe the next one.
    let put = |b: &mut tar::Builder<&mut dyn Write>| put_xattrs(b, &xattrs);
    if whiteout {
        let mut wh = std::ffi::OsString::from(WHITEOUT_PREFIX);
        wh.push(name.file_name().unwrap_or_default());
        empty_file(b, &name.with_file_name(wh), meta)?;
    } else if ft.is_dir() {
        put(b)?;
        b.append_dir(name, path).map_err(LayerError::Write)?;
        if super::sys::lgetxattr(path, OPAQUE_XATTR).as_deref() == Some(b"y") {
            empty_file(b, &name.join(OPAQUE), meta)?;
        }
    } else if ft.is_socket() {
        // Sockets cannot be archived.
    } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
        put(b)?;
        special_entry(b, name, meta)?;
    } else if ft.is_file() && meta.nlink() > 1 {
        match links.entry((meta.dev(), meta.ino())) {
            std::collections::hash_map::Entry::Occupied(first) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                h.set_mode(meta.mode() & 0o7777);
                b.append_link(&mut h, name, first.get())
                    .map_err(LayerError::Write)?;
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(name.to_owned());
                regular_file(b, path, name, meta, &xattrs)?;
            }
        }
    } else if ft.is_file() {
        regular_file(b, path, name, meta, &xattrs)?;
    } else {
        put(b)?;
        b.append_path_with_name(path, name)
            .map_err(LayerError::Write)?;
    }
    Ok(())
}

/// [`add_entry`] that also returns the digest (XXH3-128 under `seed`) of the data archived for a
/// regular file with one link and no holes (what a later delta may append to).
pub(super) fn add_entry_hashed(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
    links: &mut Links,
    seed: u64,
) -> Result<Option<u128>, LayerError> {
    if !(meta.is_file() && meta.nlink() == 1) || is_sparse(meta) {
        return add_entry(b, path, name, meta, links).map(|()| None);
    }
    let xattrs = with_mtime(xattr_records(path)?, meta);
    regular_file_with(b, path, name, meta, &xattrs, Some(seed))
}

/// Appends a delta entry holding the bytes of regular file `path` from `offset` to its end, with
/// its attributes, for the destination to append to its copy ([`APPEND_KEY`]).
pub(super) fn append_entry(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
    offset: u64,
) -> Result<(), LayerError> {
    use std::io::Seek;
    let read_err = |source| LayerError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    file.seek(io::SeekFrom::Start(offset)).map_err(read_err)?;
    let mut records = with_mtime(xattr_records(path)?, meta);
    records.push((APPEND_KEY.to_owned(), offset.to_string().into_bytes()));
    put_xattrs(b, &records)?;
    let size = meta.len().saturating_sub(offset);
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    h.set_size(size);
    let data = file.take(size).chain(io::repeat(0)).take(size);
    b.append_data(&mut h, name, data).map_err(LayerError::Write)
}

/// A file with fewer blocks than its size (holes), which tar keeps sparse.
pub(super) fn is_sparse(meta: &std::fs::Metadata) -> bool {
    meta.blocks().saturating_mul(512) < meta.len()
}

/// A reader that hashes what it reads (when it has a hasher): XXH3-128 under a seed drawn at
/// random for each presync, so that a container cannot write other bytes of the same digest
/// (as the memory presync's page digests); it runs at memory speed, which matters while frozen.
struct Hashing<R> {
    inner: R,
    hash: Option<Box<xxhash_rust::xxh3::Xxh3>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The digest under `seed` of the first `len` bytes of `path` (`None` when it holds fewer).
pub(super) fn prefix_digest(path: &Path, len: u64, seed: u64) -> Result<Option<u128>, LayerError> {
    let read_err = |source| LayerError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut r = Hashing {
        inner: file.take(len),
        hash: Some(Box::new(xxhash_rust::xxh3::Xxh3::with_seed(seed))),
    };
    let n = io::copy(&mut r, &mut io::sink()).map_err(read_err)?;
    Ok(r.hash.filter(|_| n == len).map(|h| h.digest128()))
}

/// The extended attributes of `path` (user attributes, file capabilities, ACLs, ...) as the PAX
/// records of its entry ([`put_xattrs`]), as GNU tar writes them (`SCHILY.xattr.NAME`), except
/// those such a record cannot carry for the `tar` crate's reader, which splits a PAX header at
/// every newline before it reads the records' lengths: a value holding a newline byte (a file
/// capability often does), a name holding `=` or a newline, or one that is not UTF-8 go as
/// [`XATTR_HEX_KEY`] records instead (QA, session 19: `setcap cap_dac_override,cap_fowner+ep`
/// made every move fail with "malformed pax extension" and an export no host could import).
/// Overlay's own (`trusted.overlay.*`) are not the container's: opaque directories travel as
/// [`OPAQUE`] entries.
fn xattr_records(path: &Path) -> Result<Vec<(String, Vec<u8>)>, LayerError> {
    let names = match super::sys::llistxattr(path) {
        Ok(n) => n,
        // Removed since the walk, or a filesystem without xattrs.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTSUP)) => {
            return Ok(Vec::new())
        }
        Err(source) => {
            return Err(LayerError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for name in names {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        let value = match super::sys::lgetxattr_value(path, &name) {
            Ok(v) => v,
            // Removed since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(source) => {
                return Err(LayerError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        records.push(xattr_record(&name, value));
    }
    Ok(records)
}

/// `records` and the PAX `mtime` record of `meta` (seconds and nanoseconds): a tar header keeps
/// whole seconds only (QA of session 25: every move and export cut the writable layer's times
/// to the second).
fn with_mtime(
    mut records: Vec<(String, Vec<u8>)>,
    meta: &std::fs::Metadata,
) -> Vec<(String, Vec<u8>)> {
    records.push((
        PAX_MTIME.to_owned(),
        format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()).into_bytes(),
    ));
    records
}

/// The PAX `mtime` record of an entry ([`with_mtime`]): seconds and nanoseconds.
fn entry_mtime<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<(i64, i64)>, LayerError> {
    let Some(exts) = entry.pax_extensions().map_err(LayerError::Tar)? else {
        return Ok(None);
    };
    for ext in exts {
        let ext = ext.map_err(LayerError::Tar)?;
        if ext.key_bytes() != PAX_MTIME.as_bytes() {
            continue;
        }
        // A record this reader cannot take (an image's tar from another tool, a time before
        // 1970) leaves the header's whole seconds.
        let text = std::str::from_utf8(ext.value_bytes()).unwrap_or("");
        let (secs, frac) = text.split_once('.').unwrap_or((text, "0"));
        let Some(secs) = secs.parse::<i64>().ok().filter(|s| *s >= 0) else {
            return Ok(None);
        };
        // Nanoseconds from up to 9 digits of the fraction.
        let digits: String = frac.chars().take(9).filter(char::is_ascii_digit).collect();
        let nanos = format!("{digits:0<9}").parse().unwrap_or(0);
        return Ok(Some((secs, nanos)));
    }
    Ok(None)
}

/// Sets `path`'s modification time (not following a symlink), its access time left as it is.
fn set_mtime(path: &Path, (secs, nanos): (i64, i64)) -> Result<(), LayerError> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let mtime = TimeSpec::new(secs, nanos);
    utimensat(
        None,
        path,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| LayerError::Unpack {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// Appends the PAX header of `records` (nothing when there are none).
fn put_xattrs(
    b: &mut tar::Builder<&mut dyn Write>,
    records: &[(String, Vec<u8>)],
) -> Result<(), LayerError> {
    b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        .map_err(LayerError::Write)
}

/// The PAX record of one extended attribute (see [`xattr_records`]).
fn xattr_record(name: &[u8], value: Vec<u8>) -> (String, Vec<u8>) {
    match std::str::from_utf8(name) {
        Ok(key) if !key.contains(['=', '\n']) && !value.contains(&b'\n') => {
            (format!("{XATTR_PAX_PREFIX}{key}"), value)
        }
        _ => (
            XATTR_HEX_KEY.to_owned(),
            format!("{}={}", hex(name), hex(&value)).into_bytes(),
        ),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// Sets the extended attributes an entry's PAX header carries on `path`, after the entry was
/// unpacked (its owner set: a later `chown` would drop file capabilities).
fn apply_xattrs(xattrs: &Xattrs, path: &Path) -> Result<(), LayerError> {
    for (name, value) in xattrs {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        match super::sys::lsetxattr_bytes(path, name, value) {
            Ok(()) => continue,
            // A namespace this filesystem or kernel does not keep (`security.selinux` without
            // SELinux): the source's other attributes still matter more than this one.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::warn!(path = %path.display(), name = %String::from_utf8_lossy(name), "an extended attribute this host cannot keep is left out");
                continue;
            }
            Err(source) => {
                return Err(LayerError::Unpack {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Removes the extended attributes of the existing directory `path` that its entry does not
/// carry (overlay's own aside): removed from the source's directory between the presync and the
/// freeze, they stayed on the destination's (other entries replace what they unpack onto).
fn drop_other_xattrs(xattrs: &Xattrs, path: &Path) -> Result<(), LayerError> {
    let names = match super::sys::llistxattr(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(source) => {
            return Err(LayerError::Unpack {
                path: path.to_owned(),
                source,
            })
        }
    };
    for name in names {
        if name.starts_with(OVERLAY_XATTR_PREFIX) || xattrs.iter().any(|(n, _)| *n == name) {
            continue;
        }
        match super::sys::lremovexattr(path, &name) {
            Err(e) if e.raw_os_error() != Some(libc::ENODATA) => {
                return Err(LayerError::Unpack {
                    path: path.to_owned(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// The extended attributes in `entry`'s PAX header (`SCHILY.xattr.NAME` and
/// [`XATTR_HEX_KEY`] records).
fn entry_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Xattrs, LayerError> {
    let Some(exts) = entry.pax_extensions().map_err(LayerError::Tar)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for ext in exts {
        let ext = ext.map_err(LayerError::Tar)?;
        let key = ext.key_bytes();
        if let Some(name) = key.strip_prefix(XATTR_PAX_PREFIX.as_bytes()) {
            out.push((name.to_vec(), ext.value_bytes().to_vec()));
        } else if key == XATTR_HEX_KEY.as_bytes() {
            let pair = ext
                .value_bytes()
                .split(|b| *b == b'=')
                .map(unhex)
                .collect::<Option<Vec<_>>>()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| {
                    LayerError::Tar(io::Error::other(format!(
                        "a malformed {XATTR_HEX_KEY} record"
                    )))
                })?;
            let [name, value]: [Vec<u8>; 2] = pair.try_into().unwrap_or_default();
            out.push((name, value));
        }
    }
    Ok(out)
}

/// A regular file of `meta.len()` bytes, its size as the walk saw it: tar's own
/// `append_path_with_name` copied the file to its end after writing the size in the header, so
/// a file the container was appending to (the presync runs while it runs) put more bytes in the
/// stream than its header said, and the destination failed to read the rest ("numeric field was
/// not a number"). Bytes written since are the delta's (the scan recorded this size); a file
/// that shrank is padded with zeros, and its new size travels in the delta too.
fn regular_file(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
    xattrs: &[(String, Vec<u8>)],
) -> Result<(), LayerError> {
    regular_file_with(b, path, name, meta, xattrs, None).map(drop)
}

/// [`regular_file`]; with a seed, returns the digest of the bytes archived ([`Hashing`]; not
/// for a sparse file, nor one removed since the walk).
fn regular_file_with(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
    xattrs: &[(String, Vec<u8>)],
    seed: Option<u64>,
) -> Result<Option<u128>, LayerError> {
    // A sparse file (fewer blocks than its size) keeps tar's sparse entry, its holes not
    // written out; tar reads its data regions as they are then.
    if is_sparse(meta) {
        put_xattrs(b, xattrs)?;
        return b
            .append_path_with_name(path, name)
            .map(|()| None)
            .map_err(LayerError::Write);
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        // Removed or replaced since the walk: the next scan sees what it became.
        Err(e) if vanished(&e) => return Ok(None),
        Err(source) => {
            return Err(LayerError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    put_xattrs(b, xattrs)?;
    let size = meta.len();
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    h.set_size(size);
    let mut data = Hashing {
        inner: file.take(size).chain(io::repeat(0)).take(size),
        hash: seed.map(|s| Box::new(xxhash_rust::xxh3::Xxh3::with_seed(s))),
    };
    b.append_data(&mut h, name, &mut data)
        .map_err(LayerError::Write)?;
    Ok(data.hash.map(|h| h.digest128()))
}

/// Whether a read failed because the entry was removed or replaced by another kind (a
/// directory by a file or an overlay whiteout, whose device `open` refuses with ENXIO) since it
/// was seen.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ENXIO))
}

/// Calls `f(path, relative path, metadata)` for every entry under `dir`, parents first, names
/// sorted; does not follow symlinks. A directory below `dir` that vanished since it was listed
/// is skipped ([`vanished`]).
pub(super) fn walk(
    dir: &Path,
    rel: &Path,
    f: &mut dyn FnMut(&Path, &Path, &std::fs::Metadata) -> Result<(), LayerError>,
) -> Result<(), LayerError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| match source.raw_os_error() {
            Some(libc::ENAMETOOLONG) => LayerError::PathTooLong { path },
            _ => LayerError::Read { path, source },
        }
    };
    let listed = std::fs::read_dir(dir).and_then(|rd| rd.collect::<Result<Vec<_>, _>>());
    let mut entries = match listed {
        Ok(e) => e,
        // A directory below the top removed or replaced (by a whiteout, a file) since it was
        // seen: the container runs while the presync walks (QA of session 26: `rm -rf /etc;
        // mkdir /etc` in a loop failed 1 move in 12); the next scan sees what it became.
        Err(e) if !rel.as_os_str().is_empty() && vanished(&e) => return Ok(()),
        Err(e) => return Err(read_err(dir)(e)),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = rel.join(e.file_name());
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed since the listing: the next scan sees it gone.
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(read_err(&path)(e)),
        };
        f(&path, &name, &meta)?;
        if meta.is_dir() {
            walk(&path, &name, f)?;
        }
    }
    Ok(())
}

/// A FIFO or device node, written by hand: tar's own `append_path_with_name` names such an entry
/// by its path on disk instead of `name` and fails on the absolute path.
fn special_entry(
    b: &mut tar::Builder<&mut dyn Write>,
    name: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), LayerError> {
    let ft = meta.file_type();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(if ft.is_fifo() {
        tar::EntryType::Fifo
    } else if ft.is_char_device() {
        tar::EntryType::Char
    } else {
        tar::EntryType::Block
    });
    h.set_size(0);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(meta.mtime().max(0) as u64);
    let rdev = meta.rdev();
    h.set_device_major(nix::sys::stat::major(rdev) as u32)
        .map_err(LayerError::Write)?;
    h.set_device_minor(nix::sys::stat::minor(rdev) as u32)
        .map_err(LayerError::Write)?;
    b.append_data(&mut h, name, io::empty())
        .map_err(LayerError::Write)
}

/// Creates the FIFO or device node of a tar entry at `dest/raw` (its parent inside `dest`), with
/// the entry's mode and owner: tar's own unpacking would write a regular file instead.
fn unpack_special(header: &tar::Header, dest: &Path, raw: &Path) -> Result<(), LayerError> {
    let path = dest.join(raw);
    let unpack_err = |source: io::Error| LayerError::Unpack {
        path: path.clone(),
        source,
    };
    let parent = path.parent().unwrap_or(dest);
    std::fs::create_dir_all(parent).map_err(unpack_err)?;
    // A symlink in the layer must not lead the node outside `dest`.
    let real_parent = parent.canonicalize().map_err(unpack_err)?;
    let real_dest = dest.canonicalize().map_err(unpack_err)?;
    if !real_parent.starts_with(&real_dest) {
        return Err(LayerError::UnsafePath {
            path: raw.to_string_lossy().chars().take(256).collect(),
        });
    }
    let kind = match header.entry_type() {
        tar::EntryType::Fifo => nix::sys::stat::SFlag::S_IFIFO,
        tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
        _ => nix::sys::stat::SFlag::S_IFBLK,
    };
    let field = |v: io::Result<u64>| v.map_err(LayerError::Tar);
    let dev = match kind {
        nix::sys::stat::SFlag::S_IFIFO => 0,
        _ => nix::sys::stat::makedev(
            field(header.device_major().map(|m| u64::from(m.unwrap_or(0))))?,
            field(header.device_minor().map(|m| u64::from(m.unwrap_or(0))))?,
        ),
    };
    let mode = field(header.mode().map(u64::from))? as u32 & 0o7777;
    let node = real_parent.join(path.file_name().unwrap_or_default());
    nix::sys::stat::mknod(
        &node,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        dev,
    )
    .map_err(|e| unpack_err(e.into()))?;
    // mknod applies the umask: set the mode exactly, then the owner.
    nix::sys::stat::fchmodat(
        None,
        &node,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| unpack_err(e.into()))?;
    let uid = field(header.uid())?;
    let gid = field(header.gid())?;
    nix::unistd::fchownat(
        None,
        &node,
        Some(nix::unistd::Uid::from_raw(uid as u32)),
        Some(nix::unistd::Gid::from_raw(gid as u32)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| unpack_err(e.into()))
}

fn empty_file(
    b: &mut tar::Builder<&mut dyn Write>,
    name: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), LayerError> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(meta.mtime().max(0) as u64);
    b.append_data(&mut h, name, io::empty())
        .map_err(LayerError::Write)
}

/// The offset of an append entry ([`APPEND_KEY`]), if it is one.
fn entry_append<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<u64>, LayerError> {
    let Some(exts) = entry.pax_extensions().map_err(LayerError::Tar)? else {
        return Ok(None);
    };
    for ext in exts {
        let ext = ext.map_err(LayerError::Tar)?;
        if ext.key_bytes() == APPEND_KEY.as_bytes() {
            let offset = std::str::from_utf8(ext.value_bytes())
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    LayerError::Tar(io::Error::other(format!("a malformed {APPEND_KEY} record")))
                })?;
            return Ok(Some(offset));
        }
    }
    Ok(None)
}

/// Appends an append entry's data to regular file `rel` of `dest` at `offset`, which must be
/// its size (the presync's copy), then sets the entry's owner, mode and times. The parents
/// must be real directories (never followed symlinks), the file a regular file.
fn append_to<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    rel: &Path,
    offset: u64,
) -> Result<(), LayerError> {
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dest.join(rel);
    let fail = |why: String| LayerError::Unpack {
        path: path.clone(),
        source: io::Error::other(why),
    };
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(fail("an append entry that is not a regular file".into()));
    }
    let mut dir = dest.to_owned();
    for c in rel.parent().unwrap_or(Path::new("")).components() {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(fail(format!("{} is not a directory", dir.display()))),
        }
    }
    let unpack = |source| LayerError::Unpack {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(unpack)?;
    let m = f.metadata().map_err(unpack)?;
    if !m.is_file() || m.len() != offset {
        return Err(fail(format!(
            "appending at byte {offset} to a file of {} bytes here: the presync's copy differs",
            m.len()
        )));
    }
    f.seek(io::SeekFrom::Start(offset)).map_err(unpack)?;
    let size = entry.size();
    let copied = io::copy(&mut entry.take(size), &mut f).map_err(unpack)?;
    if copied != size {
        return Err(fail(format!(
            "the append entry ends after {copied} of {size} bytes"
        )));
    }
    let h = entry.header();
    let (uid, gid, mode, mtime) = (
        h.uid().map_err(LayerError::Tar)?,
        h.gid().map_err(LayerError::Tar)?,
        h.mode().map_err(LayerError::Tar)?,
        h.mtime().map_err(LayerError::Tar)?,
    );
    // The owner first: a chown clears setuid bits and file capabilities the mode and the
    // attributes then set again.
    let id = |v: u64| u32::try_from(v).map_err(|_| fail(format!("owner {v} out of range")));
    std::os::unix::fs::fchown(&f, Some(id(uid)?), Some(id(gid)?)).map_err(unpack)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
        .map_err(unpack)?;
    let secs = i64::try_from(mtime).unwrap_or(i64::MAX);
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
        .map_err(unpack)?;
    Ok(())
}

/// Unpacks a layer tar into the (new, empty) upper directory `dest`: `.wh.` entries become
/// overlay whiteouts, everything else keeps its mode and owner; entries that would land outside
/// `dest` are refused.
pub fn unpack_layer_tar(r: &mut dyn Read, dest: &Path) -> Result<(), LayerError> {
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_unpack_xattrs(false);
    let entries = a.entries().map_err(LayerError::Tar)?;
    unpack_entries(entries, dest, false, &mut |_, _| Ok(()))
}

/// Unpacks tar entries into `dest` (see [`unpack_layer_tar`]); `before(target, is_dir)` runs
/// before each entry that creates `target` (relative to `dest`; a whiteout's target is the
/// whited-out name). With `appends` (a delta), an entry with an [`APPEND_KEY`] record appends
/// its data to the file there instead (not replaced, `before` not called); without, such an
/// entry is refused.
pub(super) fn unpack_entries<R: Read>(
    entries: tar::Entries<'_, R>,
    dest: &Path,
    appends: bool,
    before: &mut dyn FnMut(&Path, bool) -> Result<(), LayerError>,
) -> Result<(), LayerError> {
    // Directories get their times after everything inside them was unpacked, deepest first.
    let mut dir_times: Vec<(PathBuf, (i64, i64))> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(LayerError::Tar)?;
        let xattrs = entry_xattrs(&mut entry)?;
        let append = entry_append(&mut entry)?;
        let mtime = entry_mtime(&mut entry)?;
        let raw = entry.path().map_err(LayerError::Tar)?.into_owned();
        let unsafe_path = || LayerError::UnsafePath {
            path: raw.to_string_lossy().chars().take(256).collect(),
        };
        if raw
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(unsafe_path());
        }
        if let Some(offset) = append {
            if !appends {
                return Err(LayerError::Tar(io::Error::other(format!(
                    "an append entry ({APPEND_KEY}) outside a delta: {}",
                    raw.display()
                ))));
            }
            append_to(&mut entry, dest, &raw, offset)?;
            drop_other_xattrs(&xattrs, &dest.join(&raw))?;
            apply_xattrs(&xattrs, &dest.join(&raw))?;
            if let Some(t) = mtime {
                set_mtime(&dest.join(&raw), t)?;
            }
            continue;
        }
        let name = raw.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let rel_parent = raw.parent().unwrap_or(Path::new(""));
        let parent = dest.join(rel_parent);
        let unpack_err = |path: PathBuf| move |source| LayerError::Unpack { path, source };
        if name == OPAQUE {
            std::fs::create_dir_all(&parent).map_err(unpack_err(parent.clone()))?;
            super::sys::lsetxattr(&parent, OPAQUE_XATTR, b"y").map_err(unpack_err(parent))?;
        } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            if target.is_empty() || target == "." || target == ".." {
                return Err(unsafe_path());
            }
            before(&rel_parent.join(target), false)?;
            std::fs::create_dir_all(&parent).map_err(unpack_err(parent.clone()))?;
            let path = parent.join(target);
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                nix::sys::stat::makedev(0, 0),
            )
            .map_err(|e| LayerError::Unpack {
                path,
                source: e.into(),
            })?;
        } else if matches!(
            entry.header().entry_type(),
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block
        ) {
            before(&raw, false)?;
            unpack_special(entry.header(), dest, &raw)?;
            apply_xattrs(&xattrs, &dest.join(&raw))?;
            if let Some(t) = mtime {
                set_mtime(&dest.join(&raw), t)?;
            }
        } else {
            let is_dir = entry.header().entry_type().is_dir();
            before(&raw, is_dir)?;
            let done = entry.unpack_in(dest).map_err(unpack_err(dest.join(&raw)))?;
            if !done {
                return Err(unsafe_path());
            }
            // unpack_in checked the path stays inside `dest` (no symlinked parent).
            if is_dir {
                // A delta's directory is the one its presync made, not a new one.
                drop_other_xattrs(&xattrs, &dest.join(&raw))?;
            }
            apply_xattrs(&xattrs, &dest.join(&raw))?;
            match mtime {
                Some(t) if is_dir => dir_times.push((dest.join(&raw), t)),
                Some(t) => set_mtime(&dest.join(&raw), t)?,
                None => {}
            }
        }
    }
    dir_times.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (path, t) in dir_times {
        // Gone since (a later entry of a delta replaced it): nothing to date.
        match set_mtime(&path, t) {
            Err(LayerError::Unpack { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}
