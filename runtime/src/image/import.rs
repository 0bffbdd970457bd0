//! Import: detect what a path holds, turn it into verified layer blobs, unpack them under `tmp/`
//! and commit them with the image record.

use super::store::{StagedLayer, WorkDir};
use super::unpack::{scan_headers, unpack};
use super::{Image, ImageConfig, ImageError, ImageStore};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How a tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Detects the compression from the first bytes of a stream.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn decoder<'a>(self, r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}

/// Writes to a file while hashing, refusing to go past a size limit.
struct HashWriter {
    file: io::BufWriter<File>,
    hasher: Sha256,
    len: u64,
    cap: u64,
    exceeded: bool,
    failed: bool,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len.saturating_add(buf.len() as u64) > self.cap {
            self.exceeded = true;
            return Err(io::Error::other("size limit exceeded"));
        }
        let n = self.file.write(buf).inspect_err(|_| self.failed = true)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush().inspect_err(|_| self.failed = true)
    }
}

/// The sha256 of bytes, as `sha256:<hex>`.
pub(crate) fn digest_of(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Copies `reader` (named `src` in errors) into the new file `dest`, hashing it, at most
/// `cap` bytes; syncs the file. Returns the digest and the length.
pub(crate) fn copy_hashed(
    reader: &mut dyn Read,
    src: &Path,
    dest: &Path,
    cap: u64,
) -> Result<(String, u64), ImageError> {
    write_hashed(src, dest, cap, |w| io::copy(reader, w).map(drop))
}

/// Creates `dest` and lets `produce` write into it through a hashing, size-capped writer; syncs
/// the file. Errors name `src` unless writing `dest` failed. Returns the digest and the length.
pub(crate) fn write_hashed(
    src: &Path,
    dest: &Path,
    cap: u64,
    produce: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(String, u64), ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(ImageError::io("creating", dest))?;
    let mut w = HashWriter {
        file: io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        len: 0,
        cap,
        exceeded: false,
        failed: false,
    };
    let res = produce(&mut w).and_then(|()| w.flush());
    if let Err(e) = res {
        return Err(if w.exceeded {
            ImageError::TooLarge {
                what: format!("tar stream of {}", src.display()),
                limit: cap,
            }
        } else if w.failed {
            ImageError::io("writing", dest)(e)
        } else {
            ImageError::io("reading", src)(e)
        });
    }
    let file = w
        .file
        .into_inner()
        .map_err(|e| ImageError::io("writing", dest)(e.into_error()))?;
    file.sync_all().map_err(ImageError::io("syncing", dest))?;
    Ok((digest_of(w.hasher), w.len))
}

/// Sum of the regular file sizes under `dir` (not following symlinks), each hardlinked file
/// once.
pub(crate) fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut linked = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            let Ok(m) = ent.metadata() else { continue };
            if m.is_dir() {
                stack.push(ent.path());
            } else if m.is_file() && (m.nlink() < 2 || linked.insert(m.ino())) {
                total += m.len();
            }
        }
    }
    total
}

/// Turns a verified blob in `work` into a staged layer (scan, unpack), unless the store has the
/// layer already. Returns the staged layer, if any, and the layer's unpacked size. `src` names
/// the blob in errors: what the user imported, not the blob's place in the work area.
pub(crate) fn stage_blob(
    store: &ImageStore,
    work: &WorkDir,
    blob: PathBuf,
    digest: &str,
    src: &Path,
) -> Result<(Option<StagedLayer>, u64), ImageError> {
    if store.has_layer(digest) {
        return Ok((None, dir_size(&store.layer_dir(digest))));
    }
    let hex = digest.trim_start_matches("sha256:");
    let dir = work.path().join(format!("layer-{hex}"));
    fs::create_dir(&dir).map_err(ImageError::io("creating", &dir))?;
    // Not left to the umask: a layer root is 0755 unless the archive says otherwise.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("changing mode of", &dir))?;
    let mut f = File::open(&blob).map_err(ImageError::io("opening", &blob))?;
    scan_headers(&mut f, src, &store.limits)?;
    let stats = unpack(BufReader::new(f), src, &dir, &store.limits, true)?;
    if stats.skipped_devices > 0 {
        tracing::info!(layer = %digest, nodes = stats.skipped_devices, "left out the device nodes of a layer (containers get their own /dev)");
    }
    // Measured as a layer already in the store is, so that an image has one size however
    // it came (the archive's sum counted a hardlinked file once, `dir_size` once per link).
    let size = dir_size(&dir);
    let staged = StagedLayer {
        digest: digest.to_owned(),
        blob,
        dir,
    };
    Ok((Some(staged), size))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The id of an image without an OCI config: the sha256 of `{"layers":[...]}` (compact JSON).
pub(crate) fn rootfs_id(layers: &[String]) -> String {
    #[derive(serde::Serialize)]
    struct Canonical<'a> {
        layers: &'a [String],
    }
    let json = serde_json::to_vec(&Canonical { layers }).unwrap_or_default();
    digest_of(Sha256::new_with_prefix(&json))
}

pub(crate) fn import(store: &ImageStore, path: &Path, name: &str) -> Result<Image, ImageError> {
    let meta = fs::metadata(path).map_err(ImageError::io("inspecting", path))?;
    if meta.is_dir() {
        if path.join("oci-layout").exists() {
            let work = store.work_dir()?;
            return super::oci::import_layout(store, &work, path, path, name);
        }
        if is_docker_dir(path) {
            let work = store.work_dir()?;
            return super::docker::import_dir(store, &work, path, path, name);
        }
        return import_rootfs_dir(store, path, name);
    }
    if meta.is_file() {
        return import_tar_file(store, path, name);
    }
    Err(ImageError::UnknownFormat {
        path: path.to_owned(),
    })
}

/// A `manifest.json` this large or larger at the top of a tar is not read to tell a
/// docker-archive from a root filesystem.
const MAX_MANIFEST_PEEK: u64 = 1 << 20;

/// An unpacked docker-archive: a `manifest.json` at the top of the directory that
/// [`super::docker::is_archive`] takes for one, by itself or by the names beside it.
fn is_docker_dir(dir: &Path) -> bool {
    let p = dir.join("manifest.json");
    let data = match fs::symlink_metadata(&p) {
        Ok(m) if m.is_file() => (m.len() <= MAX_MANIFEST_PEEK)
            .then(|| fs::read(&p).ok())
            .flatten(),
        _ => return false,
    };
    // Unreadable, the directory is refused by its import as a root filesystem, with the reason.
    let marked = fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            name == "repositories" || super::docker::is_member_name(name.as_bytes())
        })
    });
    super::docker::is_archive(data.as_deref(), marked)
}

fn single_layer_image(
    store: &ImageStore,
    work: &WorkDir,
    blob: PathBuf,
    digest: String,
    name: &str,
    src: &Path,
) -> Result<Image, ImageError> {
    let (staged, size) = stage_blob(store, work, blob, &digest, src)?;
    let layers = vec![digest];
    let image = Image {
        name: name.to_owned(),
        id: rootfs_id(&layers),
        layers,
        config: ImageConfig::default(),
        created: now_secs(),
        size,
    };
    store.commit_image(staged.as_slice(), &image)?;
    Ok(image)
}

fn import_rootfs_dir(store: &ImageStore, dir: &Path, name: &str) -> Result<Image, ImageError> {
    let work = store.work_dir()?;
    let blob = work.path().join("layer.tar");
    let max_entry = store.limits.max_entry_size;
    let (digest, _) = write_hashed(dir, &blob, store.limits.max_tar_size, |w| {
        write_rootfs_tar(dir, w, max_entry)
    })?;
    single_layer_image(store, &work, blob, digest, name, dir)
}

/// True when the first block of a stream is a tar header with a valid checksum (or the zero
/// block of an empty archive).
fn looks_like_tar(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if block[..512].iter().all(|&b| b == 0) {
        return true;
    }
    let stored: Vec<u8> = block[148..156]
        .iter()
        .copied()
        .filter(|b| *b != 0 && *b != b' ')
        .collect();
    let Some(stored) = std::str::from_utf8(&stored)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 8).ok())
    else {
        return false;
    };
    let sum: u32 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    sum == stored
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(ImageError::io("opening", path))?;
    let mut head = Vec::with_capacity(n);
    f.take(n as u64)
        .read_to_end(&mut head)
        .map_err(ImageError::io("reading", path))?;
    Ok(head)
}

/// What a tar holds, from the names at its top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TarKind {
    /// `oci-layout` (with `index.json`, or without it: an OCI archive missing it is refused as
    /// the same layout in a directory is, not imported as a root filesystem: QA of session 29).
    Oci,
    /// A `manifest.json` that [`super::docker::is_archive`] takes for a docker-archive's, without
    /// `oci-layout`: `docker save` before Docker 25, `podman save`'s default format.
    DockerLegacy,
    /// Anything else: a root filesystem.
    Rootfs,
}

fn tar_kind(blob: &Path, src: &Path) -> Result<TarKind, ImageError> {
    let f = File::open(blob).map_err(ImageError::io("opening", blob))?;
    let mut archive = tar::Archive::new(BufReader::new(f));
    let tar_err = |source| ImageError::Tar {
        path: src.to_owned(),
        source,
    };
    let (mut layout, mut index) = (false, false);
    // Whether the top holds `manifest.json`, its bytes if small enough to read, and whether it
    // holds `repositories` or a name as docker gives its files.
    let (mut manifest, mut manifest_data, mut marked) = (false, None, false);
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let Ok(p) = super::paths::entry_path(&entry.path_bytes()) else {
            continue;
        };
        if let Some(top) = p.components().first() {
            marked |= super::docker::is_member_name(top);
        }
        match p.components() {
            [c] if c == b"oci-layout" => layout = true,
            [c] if c == b"index.json" => index = true,
            [c] if c == b"repositories" => marked = true,
            [c] if c == b"manifest.json" => {
                manifest = true;
                manifest_data = None;
                if entry.size() <= MAX_MANIFEST_PEEK {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).map_err(tar_err)?;
                    manifest_data = Some(data);
                }
            }
            _ => {}
        }
    }
    if layout && !index {
        // Named by the user's file, not the directory it was unpacked into (QA of session 29).
        return Err(super::oci::OciError::NoIndex(src.display().to_string()).into());
    }
    Ok(if layout {
        TarKind::Oci
    } else if manifest && super::docker::is_archive(manifest_data.as_deref(), marked) {
        TarKind::DockerLegacy
    } else {
        TarKind::Rootfs
    })
}

fn import_tar_file(store: &ImageStore, path: &Path, name: &str) -> Result<Image, ImageError> {
    let compression = Compression::sniff(&read_head(path, 4)?);
    let work = store.work_dir()?;
    let blob = work.path().join("layer.tar");
    let (digest, _) = {
        let f = File::open(path).map_err(ImageError::io("opening", path))?;
        let mut r = compression
            .decoder(BufReader::new(f))
            .map_err(ImageError::io("reading", path))?;
        copy_hashed(&mut r, path, &blob, store.limits.max_tar_size)?
    };
    if !looks_like_tar(&read_head(&blob, 512)?) {
        return Err(ImageError::UnknownFormat {
            path: path.to_owned(),
        });
    }
    {
        let mut f = File::open(&blob).map_err(ImageError::io("opening", &blob))?;
        scan_headers(&mut f, path, &store.limits)?;
    }
    let kind = tar_kind(&blob, path)?;
    if kind != TarKind::Rootfs {
        let layout = work.path().join("layout");
        fs::create_dir(&layout).map_err(ImageError::io("creating", &layout))?;
        let f = File::open(&blob).map_err(ImageError::io("opening", &blob))?;
        let stats = unpack(BufReader::new(f), path, &layout, &store.limits, false)?;
        if stats.skipped_devices > 0 {
            tracing::info!(path = %path.display(), nodes = stats.skipped_devices, "left out the device nodes of an image archive");
        }
        fs::remove_file(&blob).map_err(ImageError::io("removing", &blob))?;
        let imported = if kind == TarKind::Oci {
            super::oci::import_layout(store, &work, &layout, path, name)
        } else {
            super::docker::import_dir(store, &work, &layout, path, name)
        };
        return imported.map_err(|e| in_archive(e, &layout, path));
    }
    single_layer_image(store, &work, blob, digest, name, path)
}

/// An error that names a file of an archive's unpacked copy (under `layout`, in the store's
/// `tmp/`, gone once the import ends) names it in `archive` instead (QA of session 30: "opening
/// .../images/tmp/22900.33/layout/blobs/sha256/7527...").
fn in_archive(e: ImageError, layout: &Path, archive: &Path) -> ImageError {
    let inside = |p: &Path| {
        p.strip_prefix(layout)
            .ok()
            .map(|rel| format!("{} in {}", rel.display(), archive.display()))
    };
    match e {
        ImageError::Io { op, path, source } => ImageError::Io {
            op,
            path: inside(&path).map_or(path, PathBuf::from),
            source,
        },
        ImageError::Oci(super::oci::OciError::NotAFile(p)) => ImageError::Oci(
            super::oci::OciError::NotAFile(inside(Path::new(&p)).unwrap_or(p)),
        ),
        other => other,
    }
}

pub(crate) fn import_layer(
    store: &ImageStore,
    digest: &str,
    tar: &mut dyn Read,
) -> Result<(), ImageError> {
    let work = store.work_dir()?;
    let blob = work.path().join("layer.tar");
    let src = Path::new("(received layer)");
    let (actual, _) = copy_hashed(tar, src, &blob, store.limits.max_tar_size)?;
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: "received layer".to_owned(),
            expected: digest.to_owned(),
            actual,
        });
    }
    let (staged, _) = stage_blob(store, &work, blob, digest, src)?;
    let _lock = store.lock()?;
    store.commit_layers(staged.as_slice())?;
    Ok(())
}

/// One PAX record: `<len> <key>=<value>\n`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body_len + 1;
    while len != body_len + len.to_string().len() {
        len = body_len + len.to_string().len();
    }
    let mut rec = format!("{len} {key}=").into_bytes();
    rec.extend_from_slice(value);
    rec.push(b'\n');
    rec
}

/// Writes a deterministic tar of a rootfs directory into `out`: entries sorted by name,
/// ownership, mode and mtime kept, no user or group names, hardlinks within the tree kept. Device
/// nodes and sockets are skipped (the container gets its own /dev); directories on other
/// filesystems are kept but not entered.
fn write_rootfs_tar(root: &Path, out: &mut dyn Write, max_entry: u64) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let root_meta = fs::symlink_metadata(root)?;
    let dev = root_meta.dev();
    let mut b = tar::Builder::new(out);
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let header = |m: &fs::Metadata, kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(m.mode() & 0o7777);
        h.set_uid(u64::from(m.uid()));
        h.set_gid(u64::from(m.gid()));
        h.set_mtime(u64::try_from(m.mtime()).unwrap_or(0));
        h.set_size(0);
        h
    };
    // Depth-first, each directory's entries sorted by name.
    let mut stack: Vec<PathBuf> = Vec::new();
    let push_children = |stack: &mut Vec<PathBuf>, rel: &Path| -> io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        stack.extend(names.iter().rev().map(|n| rel.join(n)));
        Ok(())
    };
    push_children(&mut stack, Path::new(""))?;
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let m = fs::symlink_metadata(&abs)?;
        let ft = m.file_type();
        if ft.is_dir() {
            b.append_data(
                &mut header(&m, tar::EntryType::Directory),
                &rel,
                io::empty(),
            )?;
            // Another filesystem mounted here: keep the directory, do not enter it.
            if m.dev() == dev {
                push_children(&mut stack, &rel)?;
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&abs)?;
            b.append_link(&mut header(&m, tar::EntryType::Symlink), &rel, target)?;
        } else if ft.is_file() {
            if m.nlink() > 1 {
                if let Some(first) = inodes.get(&(m.dev(), m.ino())) {
                    b.append_link(&mut header(&m, tar::EntryType::Link), &rel, first)?;
                    continue;
                }
                inodes.insert((m.dev(), m.ino()), rel.clone());
            }
            if m.len() > max_entry {
                return Err(io::Error::other(format!(
                    "{} is larger than {max_entry} bytes",
                    abs.display()
                )));
            }
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&abs)?;
            if let Some(cap) = super::sys::lgetxattr(&abs, "security.capability")? {
                // File capabilities travel as a PAX record, as GNU tar --xattrs writes them.
                let records = pax_record("SCHILY.xattr.security.capability", &cap);
                let mut h = header(&m, tar::EntryType::XHeader);
                h.set_size(records.len() as u64);
                // A short fixed name: a long one would need a GNU long-name header of its own,
                // which readers would take for the file's.
                b.append_data(&mut h, "@PaxHeader", &records[..])?;
            }
            let mut h = header(&m, tar::EntryType::Regular);
            h.set_size(m.len());
            b.append_data(&mut h, &rel, f.take(m.len()))?;
        } else if ft.is_fifo() {
            b.append_data(&mut header(&m, tar::EntryType::Fifo), &rel, io::empty())?;
        } else {
            tracing::warn!(path = %abs.display(), "skipping device node or socket in rootfs");
        }
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        for n in [0, 1, 5, 80, 89, 90, 95, 96, 100, 990, 995, 1000] {
            let rec = pax_record("k", &vec![b'v'; n]);
            let text = String::from_utf8(rec.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(
                len.parse::<usize>().unwrap(),
                rec.len(),
                "value of {n} bytes"
            );
            let exts: Vec<_> = tar::PaxExtensions::new(&rec).collect();
            assert_eq!(exts.len(), 1);
            assert_eq!(exts[0].as_ref().unwrap().value_bytes().len(), n);
        }
    }
}
