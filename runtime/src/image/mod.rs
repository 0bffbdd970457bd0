//! Images and the layer store: import a rootfs directory, a rootfs tar (plain, gzip, zstd), an OCI
//! image layout directory or an OCI archive; layers stored content-addressed by sha256 and unpacked
//! once; OCI whiteouts turned into overlayfs whiteouts; hostile archives refused leaving nothing.
//!
//! Layout under the store root:
//!
//! ```text
//! blobs/sha256/<hex>     the uncompressed layer tar; <hex> is its sha256, the layer digest
//! layers/sha256/<hex>/   the unpacked layer, an overlay lower dir
//! images/<name>.json     an [`Image`] record
//! tmp/<pid>.<n>/         work area of one operation, removed when it ends (or at the next open
//!                        after a crash)
//! .lock                  flock held while layers are committed, records written or removed
//! ```
//!
//! Every import stages its blobs and unpacked layers under `tmp/` and only renames them into place
//! once all of them are verified, blob first, layer directory second; removal goes the other way.
//! So a layer directory that exists is complete and its blob exists too, and a refused or failed
//! import leaves nothing behind. What the unpacker refuses is described in [`paths`] and
//! [`unpack`].

mod docker;
mod import;
mod oci;
pub mod paths;
mod store;
mod sys;
pub mod unpack;
mod user;

use serde::{Deserialize, Serialize};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use oci::OciError;
pub use paths::PathError;
pub use store::{Listing, UnreadableImage, RECORD_FORMAT};

/// Why an archive was refused as hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostileReason {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error(
        "symlink target {0:?} climbs above the layer root (a relative link may not leave the \
         image; an absolute target, resolved inside the container, is accepted)"
    )]
    EscapingLink(String),
    #[error("a parent directory is a symlink")]
    ThroughSymlink,
    #[error("a parent is not a directory")]
    ThroughNonDirectory,
    #[error("hardlink target is not an earlier file of the archive")]
    HardlinkMissing,
    /// The link's target, not the entry's own path, is refused (QA of session 30, L3: it was
    /// reported as the entry's "absolute path").
    #[error("hardlink target {target:?} is refused: {why}")]
    HardlinkTarget { target: String, why: PathError },
    #[error("unsupported entry type {0:#04x}")]
    UnsupportedType(u8),
    #[error("invalid whiteout name")]
    BadWhiteout,
    #[error("entry of {size} bytes exceeds the limit of {limit}")]
    EntryTooLarge { size: u64, limit: u64 },
    #[error("entries exceed the total size limit of {limit} bytes")]
    TotalTooLarge { limit: u64 },
    #[error("more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("tar extension header of {size} bytes exceeds the limit of {limit}")]
    ExtensionTooLarge { size: u64, limit: u64 },
    #[error("the archive replaces the layer root with a non-directory")]
    ReplacesRoot,
    #[error("invalid sparse file (GNU tar's PAX sparse format): {0}")]
    BadSparse(&'static str),
}

/// What an early end of an archive most likely means, said next to the tar crate's own words
/// (`unexpected EOF during skip`).
fn truncated(e: &io::Error) -> &'static str {
    // The tar crate reports its early ends as `Other` errors with this text.
    if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF") {
        " (the archive ends in the middle of an entry: truncated or damaged?)"
    } else {
        ""
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image support is not implemented yet")]
    Unimplemented,
    #[error("no such image: {0}")]
    NotFound(String),
    #[error("{query:?} matches several images: {}", matches.join(", "))]
    Ambiguous { query: String, matches: Vec<String> },
    #[error("invalid image name")]
    InvalidName(#[source] crate::spec::SpecError),
    #[error("invalid layer digest")]
    InvalidDigest(#[source] crate::spec::SpecError),
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading tar {}{}", path.display(), truncated(source))]
    Tar {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("refusing hostile image entry {entry:?}: {reason}")]
    Hostile {
        entry: String,
        reason: HostileReason,
    },
    #[error("unknown image format at {}: expected a rootfs directory, an OCI layout, or a tar (plain, gzip, zstd)", path.display())]
    UnknownFormat { path: PathBuf },
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(
        "image record {} has format version {found}, newer than version {current} that this mig \
         reads (written by a newer release?): not read, left as it is",
        path.display()
    )]
    NewerRecord {
        path: PathBuf,
        found: u64,
        current: u32,
    },
    #[error("corrupt image record {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {0} of the image is not in the store")]
    MissingLayer(String),
    #[error("user {0:?} of the image config is not in the image's /etc/passwd or /etc/group")]
    UnknownUser(String),
}

impl ImageError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> ImageError + 'a {
        move |source| ImageError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Bounds applied to every archive, so a hostile one cannot fill the disk or the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest file in a layer.
    pub max_entry_size: u64,
    /// Largest sum of file sizes in one layer.
    pub max_total_size: u64,
    /// Most entries in one layer.
    pub max_entries: u64,
    /// Largest tar stream (uncompressed) of one layer or OCI archive.
    pub max_tar_size: u64,
    /// Largest tar extension header (GNU long name, PAX), held in memory while reading.
    pub max_extension_size: u64,
    /// Largest OCI JSON document (index, manifest, config).
    pub max_json_size: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entry_size: 8 << 30,
            max_total_size: 64 << 30,
            max_entries: 1_000_000,
            max_tar_size: 72 << 30,
            max_extension_size: 1 << 20,
            max_json_size: 4 << 20,
        }
    }
}

/// Defaults for containers made from the image (from the OCI config when there is one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub workdir: String,
    /// uid:gid (numeric) or empty.
    pub user: String,
}

/// An imported image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// `sha256:<hex>`.
    pub id: String,
    /// Layer digests (`sha256:<hex>` of the uncompressed layer tar), bottom first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
    /// Seconds since the epoch.
    pub created: u64,
    /// Unpacked size in bytes.
    pub size: u64,
}

/// Tells whether containers still use an image (see [`ImageStore::keep_used`]).
pub type InUse = std::sync::Arc<dyn Fn(&Image) -> bool + Send + Sync>;

/// The image and layer store under `<state-dir>/images`.
#[derive(Clone)]
pub struct ImageStore {
    root: PathBuf,
    limits: Limits,
    in_use: Option<InUse>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .field("in_use", &self.in_use.is_some())
            .finish()
    }
}

/// How many times an import runs when a layer it found here is removed meanwhile by another
/// import of the same name ([`ImageStore::import`]).
const IMPORT_TRIES: u32 = 5;

impl ImageStore {
    /// Opens (creating as needed) the store at `root`, and removes work areas left by processes
    /// that no longer exist.
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        let store = ImageStore {
            root: root.to_owned(),
            limits: Limits::default(),
            in_use: None,
        };
        store.init()?;
        Ok(store)
    }
    /// The same store with other archive limits.
    pub fn with_limits(mut self, limits: Limits) -> ImageStore {
        self.limits = limits;
        self
    }
    /// The same store, keeping an image that `in_use` says containers still use when an import
    /// (or a received image) takes its name: its record is renamed `<name>-<12 hex of its id>`
    /// instead of being replaced, so its layers stay (they are the lower dirs of those
    /// containers' root filesystems). Without it the old image is replaced and its layers
    /// collected.
    pub fn keep_used(mut self, in_use: InUse) -> ImageStore {
        self.in_use = Some(in_use);
        self
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Imports the image at `path` (any supported kind, detected) under `name`. Importing under
    /// an existing name replaces that record (or renames it, see [`ImageStore::keep_used`]).
    pub fn import(&self, path: &Path, name: &str) -> Result<Image, ImageError> {
        crate::spec::validate_name(name).map_err(ImageError::InvalidName)?;
        let mut tries = 1;
        loop {
            match import::import(self, path, name) {
                // A layer that was here when this import began (so it was not unpacked again)
                // was removed meanwhile as unused, by another import replacing an image of
                // this name: import again, which unpacks it (QA of session 32, F10).
                Err(ImageError::MissingLayer(layer)) if tries < IMPORT_TRIES => {
                    tracing::info!(%name, %layer, "a layer of the image was removed by another import meanwhile; importing again");
                    tries += 1;
                }
                r => return r,
            }
        }
    }
    /// Every image that can be read, sorted by name; a record that cannot (a newer format, a
    /// damaged file) is skipped with a warning and left as it is.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        self.read_records()
    }
    /// Every image record: the images, and the records that cannot be read (with why), so a
    /// listing can show them.
    pub fn list_all(&self) -> Result<Listing, ImageError> {
        self.read_listing()
    }
    /// Finds an image by name, full id or unambiguous id prefix (at least 4 hex characters, with
    /// or without `sha256:`).
    pub fn get(&self, name_or_id: &str) -> Result<Image, ImageError> {
        self.find(name_or_id)
    }
    /// Removes the image record and every layer no other image uses. The caller checks that no
    /// container uses the image.
    pub fn remove(&self, name_or_id: &str) -> Result<Image, ImageError> {
        self.remove_image(name_or_id)
    }
    /// The unpacked directory of a layer (an overlay lower dir).
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(digest.replace(':', "/"))
    }
    /// True when the layer is stored and unpacked.
    pub fn has_layer(&self, digest: &str) -> bool {
        crate::spec::validate_digest(digest).is_ok() && self.layer_dir(digest).is_dir()
    }
    /// The stored uncompressed tar of a layer (what a peer is sent).
    pub fn layer_blob(&self, digest: &str) -> Result<PathBuf, ImageError> {
        crate::spec::validate_digest(digest).map_err(ImageError::InvalidDigest)?;
        let p = self.blob_path(digest);
        if p.is_file() {
            Ok(p)
        } else {
            Err(ImageError::NotFound(digest.to_owned()))
        }
    }
    /// Stores a layer received from elsewhere: verifies that the bytes hash to `digest`, unpacks
    /// it. Does nothing (and reads nothing) when the layer is already stored.
    pub fn import_layer(&self, digest: &str, tar: &mut dyn Read) -> Result<(), ImageError> {
        crate::spec::validate_digest(digest).map_err(ImageError::InvalidDigest)?;
        if self.has_layer(digest) {
            return Ok(());
        }
        import::import_layer(self, digest, tar)
    }
    /// Records an image whose layers are all present (after receiving them from a peer). When
    /// its name is taken here by another image, it is recorded as `<name>-<12 hex of its id>`
    /// instead: a move never replaces or renames an image of this host. Returns the record.
    pub fn add_image(&self, image: &Image) -> Result<Image, ImageError> {
        crate::spec::validate_name(&image.name).map_err(ImageError::InvalidName)?;
        crate::spec::validate_digest(&image.id).map_err(ImageError::InvalidDigest)?;
        for l in &image.layers {
            crate::spec::validate_digest(l).map_err(ImageError::InvalidDigest)?;
        }
        self.commit_received(image)
    }
}
