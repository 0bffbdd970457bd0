//! OCI image layouts: `oci-layout`, `index.json`, then a manifest, its config and its layers, every
//! blob checked against the size and sha256 of its descriptor, every uncompressed layer against
//! the config's `rootfs.diff_ids`. Docker's media types (as `docker save` into a layout writes
//! them) are accepted too.

use super::import::{copy_hashed, digest_of, now_secs, stage_blob, Compression};
use super::store::{StagedLayer, WorkDir};
use super::{Image, ImageConfig, ImageError, ImageStore};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("parsing {file}")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} is an OCI archive (it has oci-layout) without its index.json")]
    NoIndex(String),
    #[error("unsupported oci-layout version {0:?}")]
    LayoutVersion(String),
    #[error("no image manifest for linux/{0} in the index")]
    NoManifest(String),
    #[error("unsupported media type {0:?}")]
    MediaType(String),
    #[error("unsupported or malformed digest {digest:?} in {at} (a digest is sha256: and 64 hex digits)")]
    Digest { digest: String, at: String },
    #[error("the config lists {diff_ids} layer digests but the manifest has {layers} layers")]
    LayerCount { diff_ids: usize, layers: usize },
    #[error("image indexes nest deeper than {MAX_INDEX_DEPTH}")]
    TooDeep,
    #[error("the layout holds {count} images ({}): import a layout of one image", names.join(", "))]
    SeveralImages { count: usize, names: Vec<String> },
    #[error("{0} is a symlink or not a regular file")]
    NotAFile(String),
    #[error("{0}")]
    DockerArchive(String),
}

#[derive(Debug, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: Option<u64>,
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The annotation naming an image of a layout (its tag).
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ConfigFile {
    config: Option<ContainerConfig>,
    rootfs: Option<RootFs>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The OCI name of this machine's architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The compression of a layer, from its media type.
fn layer_compression(media_type: &str) -> Result<Compression, OciError> {
    let known_prefix = [
        "application/vnd.oci.image.layer.",
        "application/vnd.docker.image.rootfs.",
    ];
    if !known_prefix.iter().any(|p| media_type.starts_with(p)) {
        return Err(OciError::MediaType(media_type.to_owned()));
    }
    if media_type.ends_with(".tar") {
        Ok(Compression::None)
    } else if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") {
        Ok(Compression::Gzip)
    } else if media_type.ends_with("+zstd") {
        Ok(Compression::Zstd)
    } else {
        Err(OciError::MediaType(media_type.to_owned()))
    }
}

/// Opens a regular file of the layout without following a symlink.
pub(super) fn open_nofollow(path: &Path) -> Result<File, ImageError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => OciError::NotAFile(path.display().to_string()).into(),
            _ => ImageError::io("opening", path)(e),
        })?;
    let m = f.metadata().map_err(ImageError::io("inspecting", path))?;
    if !m.is_file() {
        return Err(OciError::NotAFile(path.display().to_string()).into());
    }
    Ok(f)
}

pub(super) struct Layout<'a> {
    pub dir: &'a Path,
    /// What errors name: the user's directory, or the archive it was unpacked from (not the
    /// store's temporary directory).
    pub shown: &'a Path,
    pub max_json: u64,
}

impl<'a> Layout<'a> {
    /// The archive or layout unpacked in `dir` (`shown` in errors), its JSON files bounded by
    /// the store's limit.
    pub(super) fn new(store: &ImageStore, dir: &'a Path, shown: &'a Path) -> Layout<'a> {
        Layout {
            dir,
            shown,
            max_json: store.limits.max_json_size,
        }
    }

    /// Reads and parses the JSON file `name` at the top of the directory.
    pub(super) fn top_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<T, ImageError> {
        Self::parse(name, &self.read_small(&self.dir.join(name))?)
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        if crate::spec::validate_digest(digest).is_err() {
            return Err(OciError::Digest {
                digest: digest.to_owned(),
                at: format!("a descriptor of {}", self.shown.display()),
            }
            .into());
        }
        for sub in ["blobs", "blobs/sha256"] {
            let p = self.dir.join(sub);
            let m = fs::symlink_metadata(&p).map_err(ImageError::io("inspecting", &p))?;
            if !m.is_dir() {
                return Err(OciError::NotAFile(p.display().to_string()).into());
            }
        }
        Ok(self.dir.join("blobs").join(digest.replace(':', "/")))
    }

    /// Reads a small JSON file (at most `max_json` bytes).
    pub(super) fn read_small(&self, path: &Path) -> Result<Vec<u8>, ImageError> {
        let f = open_nofollow(path)?;
        let mut data = Vec::new();
        f.take(self.max_json + 1)
            .read_to_end(&mut data)
            .map_err(ImageError::io("reading", path))?;
        if data.len() as u64 > self.max_json {
            return Err(ImageError::TooLarge {
                what: path.display().to_string(),
                limit: self.max_json,
            });
        }
        Ok(data)
    }

    pub(super) fn parse<T: serde::de::DeserializeOwned>(
        file: &str,
        data: &[u8],
    ) -> Result<T, ImageError> {
        serde_json::from_slice(data).map_err(|source| {
            OciError::Json {
                file: file.to_owned(),
                source,
            }
            .into()
        })
    }

    /// Reads a JSON blob and checks its size and digest.
    fn json_blob<T: serde::de::DeserializeOwned>(&self, d: &Descriptor) -> Result<T, ImageError> {
        let p = self.blob_path(&d.digest)?;
        let data = self.read_small(&p)?;
        if let Some(size) = d.size {
            if size != data.len() as u64 {
                return Err(ImageError::SizeMismatch {
                    what: d.digest.clone(),
                    expected: size,
                    actual: data.len() as u64,
                });
            }
        }
        let actual = digest_of(Sha256::new_with_prefix(&data));
        if actual != d.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {}", d.media_type),
                expected: d.digest.clone(),
                actual,
            });
        }
        Self::parse(&d.digest, &data)
    }

    /// Picks the image manifest for this host from an index, following nested indexes.
    fn pick_manifest(&self, index: &Index, depth: u32) -> Result<Manifest, ImageError> {
        if depth > MAX_INDEX_DEPTH {
            return Err(OciError::TooDeep.into());
        }
        let fits = |d: &&Descriptor| match &d.platform {
            None => true,
            Some(p) => p.os == "linux" && p.architecture == host_arch(),
        };
        if depth == 0 {
            // Several images each under its own name (`skopeo copy` of two tags into one
            // layout): no way to choose, so none is taken (QA of session 29: the first was,
            // without a word). One image under several names, one name over variants of one
            // platform, and descriptors that are no image (signatures) are fine.
            let images: Vec<(&str, &str)> = index
                .manifests
                .iter()
                .filter(fits)
                .filter(|d| {
                    MANIFEST_TYPES.contains(&d.media_type.as_str())
                        || INDEX_TYPES.contains(&d.media_type.as_str())
                })
                .filter_map(|d| Some((d.digest.as_str(), d.annotations.get(REF_NAME)?.as_str())))
                .collect();
            let digests: BTreeSet<&str> = images.iter().map(|(d, _)| *d).collect();
            let names: BTreeSet<&str> = images.iter().map(|(_, n)| *n).collect();
            if digests.len() > 1 && names.len() > 1 {
                return Err(OciError::SeveralImages {
                    count: digests.len(),
                    names: names.into_iter().map(str::to_owned).collect(),
                }
                .into());
            }
        }
        for d in index.manifests.iter().filter(fits) {
            if MANIFEST_TYPES.contains(&d.media_type.as_str()) {
                return self.json_blob(d);
            }
            if INDEX_TYPES.contains(&d.media_type.as_str()) {
                let nested: Index = self.json_blob(d)?;
                return self.pick_manifest(&nested, depth + 1);
            }
        }
        Err(OciError::NoManifest(host_arch().to_owned()).into())
    }
}

/// Checks a layer blob's size and compressed digest, then decompresses it into `dest` (hashing
/// the result). Returns the uncompressed digest.
fn fetch_layer(
    store: &ImageStore,
    layout: &Layout<'_>,
    d: &Descriptor,
    dest: &Path,
) -> Result<String, ImageError> {
    let compression = layer_compression(&d.media_type)?;
    let p = layout.blob_path(&d.digest)?;
    let mut f = open_nofollow(&p)?;
    let len = f
        .metadata()
        .map_err(ImageError::io("inspecting", &p))?
        .len();
    if let Some(size) = d.size {
        if size != len {
            return Err(ImageError::SizeMismatch {
                what: d.digest.clone(),
                expected: size,
                actual: len,
            });
        }
    }
    let mut hasher = Sha256::new();
    io::copy(&mut BufReader::new(&mut f), &mut hasher).map_err(ImageError::io("reading", &p))?;
    let actual = digest_of(hasher);
    if actual != d.digest {
        return Err(ImageError::DigestMismatch {
            what: format!("layer blob {}", d.media_type),
            expected: d.digest.clone(),
            actual,
        });
    }
    let f = open_nofollow(&p)?;
    let mut r = compression
        .decoder(BufReader::new(f))
        .map_err(ImageError::io("reading", &p))?;
    let (digest, _) = copy_hashed(&mut r, &p, dest, store.limits.max_tar_size)?;
    Ok(digest)
}

/// Imports the OCI image layout in `dir` (`shown` in errors) under `name`, staging in `work`.
pub(crate) fn import_layout(
    store: &ImageStore,
    work: &WorkDir,
    dir: &Path,
    shown: &Path,
    name: &str,
) -> Result<Image, ImageError> {
    let layout = Layout::new(store, dir, shown);
    let lf: LayoutFile = layout.top_json("oci-layout")?;
    if !lf.version.starts_with("1.") {
        return Err(OciError::LayoutVersion(lf.version).into());
    }
    let index: Index = layout.top_json("index.json")?;
    let manifest = layout.pick_manifest(&index, 0)?;
    let config: ConfigFile = layout.json_blob(&manifest.config)?;
    let layers = manifest.layers.len();
    commit_with_layers(
        store,
        work,
        ImageSource {
            name,
            id: manifest.config.digest.clone(),
            config,
            layers,
        },
        |i, dest| fetch_layer(store, &layout, &manifest.layers[i], dest),
    )
}

/// An image whose config is read and whose layers are still to be fetched.
pub(super) struct ImageSource<'a> {
    pub name: &'a str,
    /// The image id: the digest of its config.
    pub id: String,
    pub config: ConfigFile,
    /// How many layers the manifest lists.
    pub layers: usize,
}

/// Fetches every layer not yet in the store with `fetch(i, dest)` (which writes layer `i`
/// uncompressed to `dest` and returns its digest), checks each against the config's
/// `rootfs.diff_ids`, resolves the config's user in the layers and commits the image.
pub(super) fn commit_with_layers(
    store: &ImageStore,
    work: &WorkDir,
    src: ImageSource<'_>,
    mut fetch: impl FnMut(usize, &Path) -> Result<String, ImageError>,
) -> Result<Image, ImageError> {
    let diff_ids = src.config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != src.layers {
        return Err(OciError::LayerCount {
            diff_ids: diff_ids.len(),
            layers: src.layers,
        }
        .into());
    }
    let mut staged: Vec<StagedLayer> = Vec::new();
    let mut seen = HashSet::new();
    let mut size = 0u64;
    for (i, diff_id) in diff_ids.iter().enumerate() {
        crate::spec::validate_digest(diff_id).map_err(|_| OciError::Digest {
            digest: diff_id.clone(),
            at: "the image config's rootfs.diff_ids".into(),
        })?;
        if !seen.insert(diff_id.clone()) {
            continue;
        }
        if store.has_layer(diff_id) {
            size += super::import::dir_size(&store.layer_dir(diff_id));
            continue;
        }
        let blob = work.path().join(format!("{i}.tar"));
        let actual = fetch(i, &blob)?;
        if &actual != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("uncompressed layer {i} (rootfs.diff_ids)"),
                expected: diff_id.clone(),
                actual,
            });
        }
        let what = PathBuf::from(format!("layer {i} ({diff_id})"));
        let (s, layer_size) = stage_blob(store, work, blob, diff_id, &what)?;
        size += layer_size;
        staged.extend(s);
    }
    let c = src.config.config.unwrap_or_default();
    let dirs: Vec<PathBuf> = diff_ids
        .iter()
        .map(|d| match staged.iter().find(|s| &s.digest == d) {
            Some(s) => s.dir.clone(),
            None => store.layer_dir(d),
        })
        .collect();
    let user = super::user::resolve(c.user.as_deref().unwrap_or(""), &dirs)?;
    let image = Image {
        name: src.name.to_owned(),
        id: src.id,
        layers: diff_ids,
        config: ImageConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            workdir: c.working_dir.unwrap_or_default(),
            user,
        },
        created: now_secs(),
        size,
    };
    store.commit_image(&staged, &image)?;
    Ok(image)
}
