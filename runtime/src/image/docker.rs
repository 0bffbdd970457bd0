//! `docker save` archives in the format before Docker 25, which `podman save` still writes by
//! default (docker-archive): `manifest.json` lists, per image, its config file and its layer
//! tars by path inside the archive. Every uncompressed layer is checked against the config's
//! `rootfs.diff_ids`; the image id is the sha256 of the config file, as Docker's.

use super::import::{copy_hashed, digest_of, Compression};
use super::oci::{commit_with_layers, open_nofollow, ConfigFile, ImageSource, Layout, OciError};
use super::store::WorkDir;
use super::{Image, ImageError, ImageStore};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// One image of `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Whether `data` (a `manifest.json` at the top of an archive) is a docker-archive manifest.
pub(crate) fn is_manifest(data: &[u8]) -> bool {
    serde_json::from_slice::<Vec<Entry>>(data).is_ok_and(|e| !e.is_empty())
}

/// Imports the unpacked docker-archive in `dir` (`shown` in errors) under `name`, staging in
/// `work`.
pub(crate) fn import_dir(
    store: &ImageStore,
    work: &WorkDir,
    dir: &Path,
    shown: &Path,
    name: &str,
) -> Result<Image, ImageError> {
    let layout = Layout::new(store, dir, shown);
    let entries: Vec<Entry> = layout.top_json("manifest.json")?;
    let entry = match entries.as_slice() {
        [e] => e,
        [] => {
            return Err(OciError::DockerArchive("manifest.json lists no image".into()).into());
        }
        many => {
            let tags: Vec<String> = many
                .iter()
                .map(|e| match e.repo_tags.as_deref() {
                    Some([t, ..]) => t.clone(),
                    _ => e.config.clone(),
                })
                .collect();
            return Err(OciError::DockerArchive(format!(
                "the archive holds {} images ({}): save one image per archive",
                many.len(),
                tags.join(", ")
            ))
            .into());
        }
    };
    let config_path = member(dir, &entry.config)?;
    let data = layout.read_small(&config_path)?;
    let id = digest_of(Sha256::new_with_prefix(&data));
    let config: ConfigFile = Layout::parse(&entry.config, &data)?;
    let paths = entry
        .layers
        .iter()
        .map(|l| member(dir, l))
        .collect::<Result<Vec<_>, _>>()?;
    let src = ImageSource {
        name,
        id,
        config,
        layers: paths.len(),
    };
    commit_with_layers(store, work, src, |i, dest| {
        let p = &paths[i];
        let mut head = Vec::with_capacity(4);
        open_nofollow(p)?
            .take(4)
            .read_to_end(&mut head)
            .map_err(ImageError::io("reading", p))?;
        let compression = Compression::sniff(&head);
        let f = open_nofollow(p)?;
        let mut r = compression
            .decoder(BufReader::new(f))
            .map_err(ImageError::io("reading", p))?;
        let (digest, _) = copy_hashed(&mut r, p, dest, store.limits.max_tar_size)?;
        Ok(digest)
    })
}

/// A file the manifest names, inside `dir`: a relative path without `..` whose directories are
/// real directories (no symlink leads out of the archive); the file itself is opened without
/// following a symlink.
fn member(dir: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let bad = || {
        ImageError::from(OciError::DockerArchive(format!(
            "manifest.json names {rel:?}: not a file in the archive"
        )))
    };
    let path = super::paths::entry_path(rel.as_bytes()).map_err(|_| bad())?;
    if path.components().is_empty() {
        return Err(bad());
    }
    let rel = path.to_path();
    let mut p = dir.to_path_buf();
    for c in rel.parent().into_iter().flat_map(Path::components) {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(bad()),
        }
    }
    Ok(dir.join(rel))
}
