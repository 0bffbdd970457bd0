//! Image sets: a directory of CRIU images plus `manifest.json`, which says what the images are
//! (the container's spec, CRIU and kernel versions, the PID map, the init's stdout pipe, the dump
//! statistics) and lists every file with its size and sha256.
//!
//! [`seal`] writes the manifest after a dump, hashing every file; [`seal_hashed`] writes the same
//! manifest from digests the caller computed (`mig move` hashes the images while sending them to
//! a 1.1 destination and sends the manifest last); [`verify`] checks a directory against its manifest
//! before anything trusts it (after a transfer, an import, or before a restore): a missing, extra,
//! truncated or altered file, or an unknown format version, is refused with an error naming it.
//! The manifest is bounded (size checked before reading, file count, path shape). CRIU logs
//! (`*.log`) are not part of the set. The format is documented in docs/criu.md.
//!
//! One exception to "every file hashed": the page images that a destination's `criu
//! page-server` wrote in stream mode ([`Manifest::page_server`], added by the destination with
//! [`add_page_server_images`]). They came inside the migration's QUIC connection, where every
//! packet is authenticated (AES-GCM), and the page server's clean exit says the dump's page
//! stream ended as CRIU meant; they are checked by listing and size. A manifest that arrives
//! from a peer may not name any ([`add_page_server_images`] and [`refuse_page_server_entries`]
//! refuse it), so a file that travelled through mig's own file transfer is always hashed.

use crate::criu::DumpStats;
use mig_runtime::pidmap::PidEntry;
use mig_runtime::spec::{ContainerSpec, SpecError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// File name of the manifest inside an image set.
pub const MANIFEST: &str = "manifest.json";
/// The `format` field of every manifest.
pub const FORMAT: &str = "mig-imageset";
/// The manifest version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;
/// Most files an image set may hold.
pub const MAX_FILES: usize = 65_536;
/// Longest relative path accepted in a manifest.
pub const MAX_PATH_LEN: usize = 1024;

/// Why an image set could not be sealed or verified.
#[derive(Debug, thiserror::Error)]
pub enum ImageSetError {
    #[error("cannot list {path}")]
    Walk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file or directory")]
    NotRegular { path: PathBuf },
    #[error("image set holds more than {MAX_FILES} files")]
    TooManyFiles,
    #[error("cannot hash {path}")]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write manifest {path}")]
    WriteManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read manifest {path}")]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest is {size} bytes, more than the limit of {MAX_MANIFEST_BYTES}")]
    ManifestTooBig { size: u64 },
    #[error("manifest is not valid")]
    ManifestJson(#[source] serde_json::Error),
    #[error("not a mig image set (format {found:?})")]
    Format { found: String },
    #[error("unsupported image set version {found} (this mig reads version {VERSION})")]
    Version { found: String },
    #[error("invalid container spec in manifest")]
    Spec(#[source] SpecError),
    #[error("invalid manifest entry {path:?}: {reason}")]
    BadEntry { path: String, reason: &'static str },
    #[error("file {path} listed in the manifest is missing")]
    Missing { path: String },
    #[error("file {path} of the image set has no digest")]
    NoDigest { path: String },
    #[error("file {path} is not listed in the manifest")]
    Extra { path: String },
    #[error("file {path} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("file {path} has sha256 {actual}, the manifest says {expected}")]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
}

/// One file of the image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path with `/` separators.
    pub path: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// The content of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`] for manifests this code accepts.
    pub version: u32,
    pub spec: ContainerSpec,
    pub criu_version: String,
    /// `uname -r` of the host that dumped.
    pub kernel: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub pid_map: Vec<PidEntry>,
    /// `pipe:[INO]` of the init's stdout at dump time (what restore's `--inherit-fd` names).
    pub stdio_pipe: Option<String>,
    pub stats: Option<DumpStats>,
    /// Every file of the set except the manifest, logs and [`Manifest::page_server`], sorted by
    /// path.
    pub files: Vec<FileEntry>,
    /// Page images written on this host by the page server of a stream-mode move, sorted by
    /// path: checked by size, not hashed (see the module documentation). Empty everywhere else,
    /// and then not written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub page_server: Vec<PageImage>,
}

/// A page image that a stream-mode move's page server wrote ([`Manifest::page_server`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageImage {
    /// Relative path with `/` separators.
    pub path: String,
    pub size: u64,
}

/// What the caller knows about a dump; [`seal`] adds the versions, time and file list.
#[derive(Debug, Clone)]
pub struct SealInfo {
    pub spec: ContainerSpec,
    pub criu_version: String,
    pub pid_map: Vec<PidEntry>,
    pub stdio_pipe: Option<String>,
    pub stats: Option<DumpStats>,
}

/// Hashes every file under `dir` and writes `dir/manifest.json` atomically.
pub fn seal(dir: &Path, info: SealInfo) -> Result<Manifest, ImageSetError> {
    let manifest = Manifest {
        files: hash_all(dir, &list_files(dir)?)?,
        ..draft(info)
    };
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// The manifest of a dump as `info` says, on this host, now, without its files: what
/// [`seal_hashed`] completes once the files are hashed.
pub fn draft(info: SealInfo) -> Manifest {
    Manifest {
        format: FORMAT.to_owned(),
        version: VERSION,
        spec: info.spec,
        criu_version: info.criu_version,
        kernel: crate::criu::kernel_release(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pid_map: info.pid_map,
        stdio_pipe: info.stdio_pipe,
        stats: info.stats,
        files: Vec::new(),
        page_server: Vec::new(),
    }
}

/// [`seal`] with the digests already known: completes `draft` ([`draft`]) with every file
/// under `dir` ([`list_files`]) and its size and SHA-256 from `digests` (computed while the
/// caller read the files), and writes `dir/manifest.json` atomically: the manifest [`seal`]
/// would have written. A file without a digest, or whose size on disk is not the one hashed,
/// is refused; entries for other paths are ignored.
pub fn seal_hashed(
    dir: &Path,
    draft: Manifest,
    digests: &BTreeMap<String, (u64, [u8; 32])>,
) -> Result<Manifest, ImageSetError> {
    let mut files = Vec::new();
    for rel in list_files(dir)? {
        let Some(&(size, sha)) = digests.get(&rel) else {
            return Err(ImageSetError::NoDigest { path: rel });
        };
        let path = dir.join(&rel);
        let actual = std::fs::symlink_metadata(&path)
            .map_err(|source| ImageSetError::Hash { path, source })?
            .len();
        if actual != size {
            return Err(ImageSetError::SizeMismatch {
                path: rel,
                expected: size,
                actual,
            });
        }
        files.push(FileEntry {
            path: rel,
            size,
            sha256: hex::encode(sha),
        });
    }
    let manifest = Manifest { files, ..draft };
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// Writes `manifest` as `dir/manifest.json` atomically.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), ImageSetError> {
    let path = dir.join(MANIFEST);
    mig_runtime::fsutil::write_json(&path, manifest)
        .map_err(|source| ImageSetError::WriteManifest { path, source })
}

/// Reads and checks `dir/manifest.json` (size, format, version, entries, spec) without hashing.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ImageSetError> {
    let path = dir.join(MANIFEST);
    let read_err = |source| ImageSetError::ReadManifest {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_MANIFEST_BYTES {
        return Err(ImageSetError::ManifestTooBig { size });
    }
    let mut data = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ImageSetError::ManifestTooBig {
            size: data.len() as u64,
        });
    }
    parse_manifest(&data)
}

/// Decodes and checks manifest bytes: format and version first (so a newer manifest is reported
/// as such, not as unknown fields), then the whole structure.
pub fn parse_manifest(data: &[u8]) -> Result<Manifest, ImageSetError> {
    let value: serde_json::Value =
        serde_json::from_slice(data).map_err(ImageSetError::ManifestJson)?;
    let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != FORMAT {
        return Err(ImageSetError::Format {
            found: format.chars().take(64).collect(),
        });
    }
    let version = value.get("version");
    if version.and_then(|v| v.as_u64()) != Some(u64::from(VERSION)) {
        return Err(ImageSetError::Version {
            found: version
                .map(|v| v.to_string().chars().take(32).collect())
                .unwrap_or_else(|| "none".into()),
        });
    }
    let m: Manifest = serde_json::from_value(value).map_err(ImageSetError::ManifestJson)?;
    m.spec.validate().map_err(ImageSetError::Spec)?;
    if m.files.len() > MAX_FILES {
        return Err(ImageSetError::TooManyFiles);
    }
    let mut prev: Option<&str> = None;
    for f in &m.files {
        check_entry_path(&f.path)?;
        if f.sha256.len() != 64
            || !f
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad(&f.path, "sha256 is not 64 lowercase hex characters"));
        }
        if prev.is_some_and(|p| p >= f.path.as_str()) {
            return Err(bad(&f.path, "files are not sorted or a path repeats"));
        }
        prev = Some(&f.path);
    }
    if m.files.len() + m.page_server.len() > MAX_FILES {
        return Err(ImageSetError::TooManyFiles);
    }
    let mut prev: Option<&str> = None;
    for p in &m.page_server {
        check_entry_path(&p.path)?;
        if prev.is_some_and(|q| q >= p.path.as_str()) {
            return Err(bad(&p.path, "page images are not sorted or a path repeats"));
        }
        if m.files
            .binary_search_by(|f| f.path.as_str().cmp(&p.path))
            .is_ok()
        {
            return Err(bad(&p.path, "listed both as a file and as a page image"));
        }
        prev = Some(&p.path);
    }
    Ok(m)
}

/// Refuses a manifest that names page-server images: only a destination adds those, to its own
/// copy, so a manifest received from a peer must not ([`Manifest::page_server`]).
pub fn refuse_page_server_entries(m: &Manifest) -> Result<(), ImageSetError> {
    match m.page_server.first() {
        Some(p) => Err(bad(&p.path, "a received manifest names page-server images")),
        None => Ok(()),
    }
}

/// Stream mode, on the destination once its page server exited cleanly: adds every file of
/// `dir` that `is_page_image` selects and the received manifest does not list to
/// [`Manifest::page_server`], with its size, and rewrites the manifest. Refuses a received
/// manifest that already names page-server images. Returns what it added.
pub fn add_page_server_images(
    dir: &Path,
    is_page_image: fn(&str) -> bool,
) -> Result<Vec<PageImage>, ImageSetError> {
    let mut manifest = read_manifest(dir)?;
    refuse_page_server_entries(&manifest)?;
    let mut added = Vec::new();
    for rel in list_files(dir)? {
        if !is_page_image(&rel)
            || manifest
                .files
                .binary_search_by(|f| f.path.as_str().cmp(&rel))
                .is_ok()
        {
            continue;
        }
        let path = dir.join(&rel);
        let size = std::fs::symlink_metadata(&path)
            .map_err(|source| ImageSetError::Hash { path, source })?
            .len();
        added.push(PageImage { path: rel, size });
    }
    manifest.page_server = added.clone();
    write_manifest(dir, &manifest)?;
    Ok(added)
}

fn bad(path: &str, reason: &'static str) -> ImageSetError {
    ImageSetError::BadEntry {
        path: path.chars().take(MAX_PATH_LEN).collect(),
        reason,
    }
}

/// Checks that a manifest path is a plain relative path inside the set.
pub fn check_entry_path(p: &str) -> Result<(), ImageSetError> {
    if p.is_empty() || p.len() > MAX_PATH_LEN {
        return Err(bad(p, "empty or too long"));
    }
    if p.starts_with('/') || p.contains('\0') || p.contains('\\') {
        return Err(bad(p, "not a plain relative path"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(bad(p, "empty, . or .. component"));
    }
    if p == MANIFEST || is_log(p) {
        return Err(bad(p, "the manifest and logs are not part of the set"));
    }
    Ok(())
}

fn is_log(rel: &str) -> bool {
    rel.ends_with(".log")
}

/// Re-hashes every file of `dir` and checks it against `dir/manifest.json` (page-server images:
/// listing and size).
pub fn verify(dir: &Path) -> Result<Manifest, ImageSetError> {
    let (manifest, on_disk) = verify_listing(dir)?;
    check_hashes(dir, &manifest, &on_disk)?;
    Ok(manifest)
}

/// A note left next to an image set by the process that checked every file of it as it
/// arrived (`mig move`'s destination agent): the SHA-256 of the manifest it checked against,
/// and its PID. [`verify_or_trust`] skips re-hashing the files only when the note's author is
/// the caller's parent (the agent that started the restore, not a restarted one) and the
/// manifest is still the one it checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrivalNote {
    pub manifest_sha256: String,
    pub pid: u32,
}

/// Where the [`ArrivalNote`] of the image set in `dir` is: beside it, `<dir>.arrival.json`
/// (never inside the set).
pub fn arrival_note_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".arrival.json");
    dir.with_file_name(name)
}

/// Writes the [`ArrivalNote`] of the image set in `dir` on behalf of process `pid`. The caller
/// must have checked every file listed in the manifest against its digest.
pub fn write_arrival_note(dir: &Path, pid: u32) -> Result<(), ImageSetError> {
    let (_, manifest_sha256) = hash_file(&dir.join(MANIFEST))?;
    let note = arrival_note_path(dir);
    mig_runtime::fsutil::write_json(
        &note,
        &ArrivalNote {
            manifest_sha256,
            pid,
        },
    )
    .map_err(|source| ImageSetError::WriteManifest { path: note, source })
}

/// Whether the image set was verified in this restore: `Trusted` when [`verify_or_trust`]
/// relied on an arrival note (sizes and listing checked, contents not re-hashed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Hashed,
    Trusted,
}

/// [`verify`], unless the set's [`ArrivalNote`] (consumed: removed in any case) was written by
/// this process's parent for exactly this manifest; then only the listing and sizes are
/// checked, since the parent hashed every file as it arrived.
pub fn verify_or_trust(dir: &Path) -> Result<(Manifest, Checked), ImageSetError> {
    let note = arrival_note_path(dir);
    let arrival: Option<ArrivalNote> = mig_runtime::fsutil::read_json(&note, 4096).ok();
    let _ = std::fs::remove_file(&note);
    let parent = std::os::unix::process::parent_id();
    let (manifest, on_disk) = verify_listing(dir)?;
    let trusted = match arrival {
        Some(a) if a.pid == parent && parent > 1 => {
            hash_file(&dir.join(MANIFEST)).is_ok_and(|(_, h)| h == a.manifest_sha256)
        }
        _ => false,
    };
    if trusted {
        return Ok((manifest, Checked::Trusted));
    }
    check_hashes(dir, &manifest, &on_disk)?;
    Ok((manifest, Checked::Hashed))
}

/// Reads the manifest and checks the listing (no file missing or extra) and every size;
/// returns the manifest and the files left to hash (sorted: every file but the page-server
/// images).
fn verify_listing(dir: &Path) -> Result<(Manifest, Vec<String>), ImageSetError> {
    let manifest = read_manifest(dir)?;
    let on_disk = list_files(dir)?;
    let listed: BTreeMap<&str, &FileEntry> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let paged: BTreeMap<&str, u64> = manifest
        .page_server
        .iter()
        .map(|p| (p.path.as_str(), p.size))
        .collect();
    for rel in &on_disk {
        if !listed.contains_key(rel.as_str()) && !paged.contains_key(rel.as_str()) {
            return Err(ImageSetError::Extra { path: rel.clone() });
        }
    }
    let sizes = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.size))
        .chain(paged.iter().map(|(p, s)| (*p, *s)));
    for (path, size) in sizes {
        if on_disk.binary_search_by(|d| d.as_str().cmp(path)).is_err() {
            return Err(ImageSetError::Missing {
                path: path.to_owned(),
            });
        }
        let actual = std::fs::symlink_metadata(dir.join(path))
            .map(|m| m.len())
            .map_err(|source| ImageSetError::Hash {
                path: dir.join(path),
                source,
            })?;
        if actual != size {
            return Err(ImageSetError::SizeMismatch {
                path: path.to_owned(),
                expected: size,
                actual,
            });
        }
    }
    // What is left to hash: the files, not the page-server images.
    let hashed = on_disk
        .into_iter()
        .filter(|rel| listed.contains_key(rel.as_str()))
        .collect();
    Ok((manifest, hashed))
}

/// Hashes every file of `on_disk` (the manifest's files, sorted) against `manifest`.
fn check_hashes(dir: &Path, manifest: &Manifest, on_disk: &[String]) -> Result<(), ImageSetError> {
    let hashed = hash_all(dir, on_disk)?;
    for (want, got) in manifest.files.iter().zip(&hashed) {
        if want.size != got.size {
            return Err(ImageSetError::SizeMismatch {
                path: want.path.clone(),
                expected: want.size,
                actual: got.size,
            });
        }
        if want.sha256 != got.sha256 {
            return Err(ImageSetError::HashMismatch {
                path: want.path.clone(),
                expected: want.sha256.clone(),
                actual: got.sha256.clone(),
            });
        }
    }
    Ok(())
}

/// Removes the page images (`pages-*.img`) of an image set that was restored and whose pages are
/// all in the restored processes: nothing reads them again (the next checkpoint replaces the
/// set), and they hold the container's memory once per process. Returns the bytes freed.
pub fn remove_pages(dir: &Path) -> std::io::Result<u64> {
    let mut freed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("pages-") && name.ends_with(".img")) {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() {
            std::fs::remove_file(entry.path())?;
            freed += meta.len();
        }
    }
    Ok(freed)
}

/// Relative paths (sorted) of every regular file under `dir`, except the manifest, logs and
/// the manifest's temporary files. Anything that is not a regular file or directory is refused.
pub fn list_files(dir: &Path) -> Result<Vec<String>, ImageSetError> {
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), ImageSetError> {
    let walk_err = |source| ImageSetError::Walk {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(walk_err)? {
        let entry = entry.map_err(walk_err)?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| ImageSetError::NotRegular { path: entry.path() })?;
        let rel = format!("{prefix}{name}");
        if prefix.is_empty() && (name == MANIFEST || name.starts_with(".manifest.json.tmp")) {
            continue;
        }
        let ft = entry.file_type().map_err(walk_err)?;
        if prefix.is_empty() && name == "parent" && ft.is_symlink() && is_round_link(&entry.path())
        {
            // CRIU's link to the last pre-copy round (`../rounds/<n>`, beside the set): not a
            // file of the set; the rounds were checked as they arrived.
            continue;
        }
        if ft.is_dir() {
            walk(&entry.path(), &format!("{rel}/"), out)?;
        } else if ft.is_file() {
            if !is_log(&rel) {
                if out.len() >= MAX_FILES {
                    return Err(ImageSetError::TooManyFiles);
                }
                out.push(rel);
            }
        } else {
            return Err(ImageSetError::NotRegular { path: entry.path() });
        }
    }
    Ok(())
}

/// Whether the symlink at `link` is a pre-copy round's `parent` link: exactly `../rounds/<n>`.
fn is_round_link(link: &Path) -> bool {
    let Ok(target) = std::fs::read_link(link) else {
        return false;
    };
    let Some(n) = target.to_str().and_then(|t| t.strip_prefix("../rounds/")) else {
        return false;
    };
    !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0')
}

/// Size and lowercase-hex sha256 of a file.
pub fn hash_file(path: &Path) -> Result<(u64, String), ImageSetError> {
    let hash_err = |source| ImageSetError::Hash {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(hash_err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(hash_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(h.finalize())))
}

/// Hashes `files` (relative to `dir`) on up to one thread per core; results in the same order.
fn hash_all(dir: &Path, files: &[String]) -> Result<Vec<FileEntry>, ImageSetError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(files.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<FileEntry, ImageSetError>>> =
        (0..files.len()).map(|_| None).collect();
    let slots: Vec<std::sync::Mutex<Option<Result<FileEntry, ImageSetError>>>> = (0..files.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(rel) = files.get(i) else { break };
                let r = hash_file(&dir.join(rel)).map(|(size, sha256)| FileEntry {
                    path: rel.clone(),
                    size,
                    sha256,
                });
                if let Ok(mut slot) = slots[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    for (i, slot) in slots.into_iter().enumerate() {
        results[i] = slot.into_inner().ok().flatten();
    }
    results
        .into_iter()
        .zip(files)
        .map(|(r, rel)| {
            r.unwrap_or_else(|| {
                Err(ImageSetError::Hash {
                    path: dir.join(rel),
                    source: std::io::Error::other("hashing thread failed"),
                })
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_pages;
