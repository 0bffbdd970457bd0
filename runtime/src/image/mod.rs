//! Images and the layer store: import a rootfs directory, a rootfs tar (plain, gzip, zstd), an OCI
//! image layout directory or an OCI archive; layers stored content-addressed by sha256 and unpacked
//! once; OCI whiteouts turned into overlayfs whiteouts; hostile archives refused leaving nothing.
//!
//! OWNER: image helper. The signatures below are the contract other modules code against.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image support is not implemented yet")]
    Unimplemented,
    #[error("no such image: {0}")]
    NotFound(String),
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

/// The image and layer store under `<state-dir>/images`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        Ok(ImageStore {
            root: root.to_owned(),
        })
    }
    /// Imports the image at `path` (any supported kind, detected) under `name`.
    pub fn import(&self, path: &Path, name: &str) -> Result<Image, ImageError> {
        let _ = (path, name);
        Err(ImageError::Unimplemented)
    }
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        Err(ImageError::Unimplemented)
    }
    /// Finds an image by name, full id or unambiguous id prefix.
    pub fn get(&self, name_or_id: &str) -> Result<Image, ImageError> {
        Err(ImageError::NotFound(name_or_id.to_owned()))
    }
    /// Removes the image record and every layer no other image uses.
    pub fn remove(&self, name_or_id: &str) -> Result<Image, ImageError> {
        Err(ImageError::NotFound(name_or_id.to_owned()))
    }
    /// The unpacked directory of a layer (an overlay lower dir).
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(digest.replace(':', "/"))
    }
    pub fn has_layer(&self, digest: &str) -> bool {
        let _ = digest;
        false
    }
    /// The stored uncompressed tar of a layer (what a peer is sent).
    pub fn layer_blob(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Err(ImageError::NotFound(digest.to_owned()))
    }
    /// Stores a layer received from elsewhere: verifies that the bytes hash to `digest`, unpacks it.
    pub fn import_layer(&self, digest: &str, tar: &mut dyn Read) -> Result<(), ImageError> {
        let _ = (digest, tar);
        Err(ImageError::Unimplemented)
    }
    /// Records an image whose layers are all present (after receiving them from a peer).
    pub fn add_image(&self, image: &Image) -> Result<(), ImageError> {
        let _ = image;
        Err(ImageError::Unimplemented)
    }
}
