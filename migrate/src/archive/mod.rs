//! Export archives: one file holding a sealed image set and the container's writable layer, for
//! `mig checkpoint --export FILE` and `mig restore --import FILE`.
//!
//! The archive is a tar (optionally zstd-compressed; detected on import by its magic) of
//! `manifest.json`, every file the manifest lists, and `upper.tar` (the writable layer, see
//! [`write_layer_tar`]), which is added to the manifest's files before writing so that
//! [`import`] verifies it like the images. [`import`] accepts only regular files and directories
//! with plain relative paths, bounded in count and size, then runs [`imageset::verify`]; on any
//! failure the destination directory is removed.

mod delta;
mod layer;
mod sys;

pub use delta::{
    apply_layer_delta, delta_file_bytes, write_layer_delta, write_layer_tar_scanned, DeltaStats,
    EntryMeta, LayerScan, DELETED,
};
pub use layer::{unpack_layer_tar, write_layer_tar, LayerError};

use crate::imageset::{self, FileEntry, ImageSetError, Manifest, MANIFEST};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

/// Name of the writable layer inside an exported image set.
pub const UPPER_TAR: &str = "upper.tar";
/// Largest single file accepted on import.
pub const MAX_FILE_BYTES: u64 = 64 << 30;
/// Largest total of file sizes accepted on import.
pub const MAX_TOTAL_BYTES: u64 = 256 << 30;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("image set {dir} is not valid")]
    ImageSet {
        dir: PathBuf,
        #[source]
        source: ImageSetError,
    },
    #[error("the image set already has a file named {UPPER_TAR}")]
    UpperClash,
    #[error("the image set already has a file named {name}")]
    ExtraClash { name: String },
    #[error("cannot archive the writable layer {dir}")]
    Layer {
        dir: PathBuf,
        #[source]
        source: LayerError,
    },
    #[error("cannot write archive {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}, a file of the image set being exported")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read archive {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    Dest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archive entry {path:?} is refused: {reason}")]
    Entry { path: String, reason: &'static str },
    #[error("archive holds more than {MAX_TOTAL_BYTES} bytes or too many files")]
    TooBig,
    /// (The message leaves `path` out: callers say which file they imported.)
    #[error("not a checkpoint archive ({why}); `mig checkpoint --export FILE` makes them")]
    NotCheckpoint { path: PathBuf, why: &'static str },
    #[error("archive contents do not match its manifest")]
    Verify(#[source] ImageSetError),
    #[error("cannot unpack the writable layer into {dir}")]
    Unpack {
        dir: PathBuf,
        #[source]
        source: LayerError,
    },
}

/// Writes the sealed image set in `imageset_dir` and the writable layer `upper_dir` (when given)
/// into `out_file` (replaced atomically), zstd-compressed when `zstd`. Returns the manifest as
/// stored in the archive (with `upper.tar` listed).
pub fn export(
    imageset_dir: &Path,
    upper_dir: Option<&Path>,
    out_file: &Path,
    zstd: bool,
) -> Result<Manifest, ArchiveError> {
    export_with(imageset_dir, upper_dir, &[], out_file, zstd)
}

/// The container's output so far, in an archive of mig's agent ([`export_with`]): a restore of
/// the archive starts its log with it, as a move's destination does.
pub const CONTAINER_LOG: &str = "container-log.out";

/// The container's own record in an archive of mig's agent (JSON, its creation time).
pub const CONTAINER_STATE: &str = "container-state.json";

/// [`export`], with `extras`: (name in the archive, file) pairs stored beside the image set,
/// `upper_dir` the writable layer's directory or a layer tar of it ([`write_layer_tar`]),
/// listed and hashed in the manifest like `upper.tar` (say [`CONTAINER_LOG`]). Each file is
/// copied first, so one that grows meanwhile (a log) is stored as it was then.
pub fn export_with(
    imageset_dir: &Path,
    upper_dir: Option<&Path>,
    extras: &[(&str, &Path)],
    out_file: &Path,
    zstd: bool,
) -> Result<Manifest, ArchiveError> {
    let mut manifest = imageset::verify(imageset_dir).map_err(|source| ArchiveError::ImageSet {
        dir: imageset_dir.to_owned(),
        source,
    })?;
    // An archive lists every file with its digest: page images a page server wrote here are
    // hashed now.
    for p in std::mem::take(&mut manifest.page_server) {
        let (size, sha256) =
            imageset::hash_file(&imageset_dir.join(&p.path)).map_err(|source| {
                ArchiveError::ImageSet {
                    dir: imageset_dir.to_owned(),
                    source,
                }
            })?;
        manifest.files.push(FileEntry {
            path: p.path,
            size,
            sha256,
        });
    }
    manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
    // Errors name the file the user asked for, also while its temporary siblings are written.
    let write_err = |source| ArchiveError::Write {
        path: out_file.to_owned(),
        source,
    };
    let tmp_upper = sibling(out_file, "upper");
    let tmp_out = sibling(out_file, "tmp");
    let tmp_extras: Vec<(String, PathBuf)> = extras
        .iter()
        .enumerate()
        .map(|(i, (name, _))| ((*name).to_owned(), sibling(out_file, &format!("extra{i}."))))
        .collect();
    let mut cleanup = vec![tmp_upper.clone(), tmp_out.clone()];
    cleanup.extend(tmp_extras.iter().map(|(_, p)| p.clone()));
    let _cleanup = RemoveOnDrop(cleanup);
    for ((name, from), (_, to)) in extras.iter().zip(&tmp_extras) {
        if *name == UPPER_TAR || manifest.files.iter().any(|f| f.path == *name) {
            return Err(ArchiveError::ExtraClash {
                name: (*name).to_owned(),
            });
        }
        std::fs::copy(from, to).map_err(|source| ArchiveError::Source {
            path: from.to_path_buf(),
            source,
        })?;
        let (size, sha256) = imageset::hash_file(to).map_err(|source| ArchiveError::ImageSet {
            dir: imageset_dir.to_owned(),
            source,
        })?;
        manifest.files.push(FileEntry {
            path: (*name).to_owned(),
            size,
            sha256,
        });
    }
    manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
    // The writable layer: a directory archived now, or a layer tar written earlier (while the
    // container was frozen, for a checkpoint that leaves it running) taken as it is.
    let upper_tar = match upper_dir {
        Some(upper) if upper.is_file() => upper.to_owned(),
        _ => tmp_upper.clone(),
    };
    if let Some(upper) = upper_dir {
        if manifest.files.iter().any(|f| f.path == UPPER_TAR) {
            return Err(ArchiveError::UpperClash);
        }
        if !upper.is_file() {
            let mut w = BufWriter::new(File::create(&tmp_upper).map_err(write_err)?);
            write_layer_tar(upper, &mut w).map_err(|source| ArchiveError::Layer {
                dir: upper.to_owned(),
                source,
            })?;
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(write_err)?;
        }
        let (size, sha256) =
            imageset::hash_file(&upper_tar).map_err(|source| ArchiveError::ImageSet {
                dir: imageset_dir.to_owned(),
                source,
            })?;
        manifest.files.push(FileEntry {
            path: UPPER_TAR.to_owned(),
            size,
            sha256,
        });
        manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
    }
    let manifest_bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| write_err(io::Error::other(e)))?;

    let file = BufWriter::new(File::create(&tmp_out).map_err(write_err)?);
    let sink = if zstd {
        Sink::Zstd(zstd::Encoder::new(file, 3).map_err(write_err)?)
    } else {
        Sink::Plain(file)
    };
    let mut b = tar::Builder::new(sink);
    append(
        &mut b,
        MANIFEST,
        manifest_bytes.len() as u64,
        &manifest_bytes[..],
    )
    .map_err(write_err)?;
    for f in &manifest.files {
        let src = if f.path == UPPER_TAR && upper_dir.is_some() {
            upper_tar.clone()
        } else if let Some((_, tmp)) = tmp_extras.iter().find(|(name, _)| *name == f.path) {
            tmp.clone()
        } else {
            imageset_dir.join(&f.path)
        };
        let read_err = |source| ArchiveError::Source {
            path: src.clone(),
            source,
        };
        let r = File::open(&src).map_err(read_err)?;
        let read_failed = std::cell::Cell::new(false);
        let r = ReadSide {
            inner: r.take(f.size),
            failed: &read_failed,
        };
        append(&mut b, &f.path, f.size, r).map_err(|e| {
            if read_failed.get() {
                read_err(e)
            } else {
                write_err(e)
            }
        })?;
    }
    b.into_inner()
        .and_then(Sink::finish)
        .and_then(|f| f.sync_all())
        .map_err(write_err)?;
    // Renaming over anything but a regular file would replace it (a device: /dev/null).
    if std::fs::symlink_metadata(out_file).is_ok_and(|m| !m.file_type().is_file()) {
        return Err(write_err(std::io::Error::other(
            "it exists and is not a regular file; not replaced",
        )));
    }
    std::fs::rename(&tmp_out, out_file).map_err(write_err)?;
    Ok(manifest)
}

/// The archive file, compressed or not.
enum Sink {
    Plain(BufWriter<File>),
    Zstd(zstd::Encoder<'static, BufWriter<File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

impl Sink {
    /// Ends the compressed frame (if any) and flushes everything into the file.
    fn finish(self) -> io::Result<File> {
        let w = match self {
            Sink::Plain(w) => w,
            Sink::Zstd(z) => z.finish()?,
        };
        w.into_inner().map_err(|e| e.into_error())
    }
}

fn append(b: &mut tar::Builder<Sink>, path: &str, size: u64, data: impl Read) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o600);
    h.set_mtime(0);
    b.append_data(&mut h, path, data)
}

/// A reader that notes its own failures, to tell them from the archive's write errors.
struct ReadSide<'a, R> {
    inner: R,
    failed: &'a std::cell::Cell<bool>,
}

impl<R: Read> Read for ReadSide<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed.set(true))
    }
}

/// `dir/.NAME.WHAT.PID` next to `path`.
fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}{}", std::process::id()))
}

struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes a directory tree on drop unless disarmed.
struct DestGuard(Option<PathBuf>);

impl Drop for DestGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Unpacks the archive `file` into `dest_dir` (which must not exist yet; its parent must) and
/// verifies it. On any failure `dest_dir` is removed.
pub fn import(file: &Path, dest_dir: &Path) -> Result<Manifest, ArchiveError> {
    let read_err = |source| ArchiveError::Read {
        path: file.to_owned(),
        source,
    };
    let mut f = BufReader::new(File::open(file).map_err(read_err)?);
    let mut magic = [0u8; 4];
    let head = {
        use io::BufRead;
        let buf = f.fill_buf().map_err(read_err)?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    if head == 0 {
        return Err(ArchiveError::NotCheckpoint {
            path: file.to_owned(),
            why: "it is empty",
        });
    }
    let zstd = head == 4 && magic == ZSTD_MAGIC;
    let source: Box<dyn Read> = if zstd {
        Box::new(zstd::Decoder::with_buffer(f).map_err(read_err)?)
    } else {
        Box::new(f)
    };
    std::fs::create_dir(dest_dir).map_err(|source| ArchiveError::Dest {
        path: dest_dir.to_owned(),
        source,
    })?;
    let mut guard = DestGuard(Some(dest_dir.to_owned()));
    unpack(source, file, dest_dir, zstd)?;
    if !dest_dir.join(MANIFEST).exists() {
        return Err(ArchiveError::NotCheckpoint {
            path: file.to_owned(),
            why: "a tar without the manifest.json of a checkpoint",
        });
    }
    let manifest = imageset::verify(dest_dir).map_err(ArchiveError::Verify)?;
    imageset::refuse_page_server_entries(&manifest).map_err(ArchiveError::Verify)?;
    guard.0 = None;
    Ok(manifest)
}

/// `e` with its text printable: the tar reader quotes the header bytes it could not parse,
/// which in a file that is no archive are binary (QA of session 23).
fn printable(e: io::Error) -> io::Error {
    let text: String = e
        .to_string()
        .chars()
        .map(|c| {
            if c.is_control() || c == char::REPLACEMENT_CHARACTER {
                '?'
            } else {
                c
            }
        })
        .take(300)
        .collect();
    io::Error::new(e.kind(), text)
}

fn unpack(source: Box<dyn Read>, file: &Path, dest: &Path, zstd: bool) -> Result<(), ArchiveError> {
    let read_err = |source| ArchiveError::Read {
        path: file.to_owned(),
        source: printable(source),
    };
    let mut a = tar::Archive::new(source);
    let mut total: u64 = 0;
    let mut count: usize = 0;
    for entry in a.entries().map_err(read_err)? {
        // A first header that does not parse: the file is no tar at all.
        if count == 0 && entry.is_err() {
            return Err(ArchiveError::NotCheckpoint {
                path: file.to_owned(),
                why: if zstd {
                    "zstd-compressed, but not a tar archive"
                } else {
                    "not a tar archive, nor a zstd-compressed one"
                },
            });
        }
        let mut entry = entry.map_err(read_err)?;
        count += 1;
        if count > imageset::MAX_FILES + 2 {
            return Err(ArchiveError::TooBig);
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw)
            .chars()
            .take(256)
            .collect::<String>();
        let refuse = |reason| ArchiveError::Entry {
            path: shown.clone(),
            reason,
        };
        let path = std::str::from_utf8(&raw).map_err(|_| refuse("path is not UTF-8"))?;
        let rel = path.trim_end_matches('/');
        let plain = !rel.is_empty()
            && !rel.starts_with('/')
            && Path::new(rel)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            && !rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if !plain {
            return Err(refuse("not a plain relative path"));
        }
        let target = dest.join(rel);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(|source| ArchiveError::Dest {
                path: target.clone(),
                source,
            })?;
            continue;
        }
        if !kind.is_file() {
            return Err(refuse("only regular files and directories are accepted"));
        }
        if rel != MANIFEST {
            imageset::check_entry_path(rel).map_err(|_| refuse("not an image set file"))?;
        }
        let size = entry.size();
        let limit = if rel == MANIFEST {
            imageset::MAX_MANIFEST_BYTES
        } else {
            MAX_FILE_BYTES
        };
        if size > limit {
            return Err(refuse("file is too big"));
        }
        total = total.checked_add(size).ok_or(ArchiveError::TooBig)?;
        if total > MAX_TOTAL_BYTES {
            return Err(ArchiveError::TooBig);
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ArchiveError::Dest {
                path: parent.to_owned(),
                source,
            })?;
        }
        let dest_err = |source| ArchiveError::Dest {
            path: target.clone(),
            source,
        };
        let mut out = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                // CRIU reads some images as the container's root, which under --userns is an
                // unprivileged host id: the images must be world-readable, like CRIU's own.
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map_err(dest_err)?
        };
        // The mode above went through the umask (an agent started with 077 would make 0600).
        {
            use std::os::unix::fs::PermissionsExt;
            out.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(dest_err)?;
        }
        let copied = io::copy(&mut (&mut entry).take(size), &mut out).map_err(read_err)?;
        if copied != size {
            return Err(read_err(io::Error::from(io::ErrorKind::UnexpectedEof)));
        }
    }
    Ok(())
}

/// Unpacks the writable layer of an imported image set (`dir/upper.tar`) into `upper_dir`
/// (created if missing). Does nothing when the set has no layer.
pub fn unpack_upper(dir: &Path, upper_dir: &Path) -> Result<bool, ArchiveError> {
    let path = dir.join(UPPER_TAR);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(ArchiveError::Read { path, source }),
    };
    std::fs::create_dir_all(upper_dir).map_err(|source| ArchiveError::Dest {
        path: upper_dir.to_owned(),
        source,
    })?;
    unpack_layer_tar(&mut BufReader::new(f), upper_dir).map_err(|source| ArchiveError::Unpack {
        dir: upper_dir.to_owned(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod delta_tests;
#[cfg(test)]
mod tests;
