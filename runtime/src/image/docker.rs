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

/// Whether an input with a `manifest.json` at its top is a docker-archive, to import as one (and
/// refuse if that manifest does not parse) rather than as a root filesystem. `data` is the
/// manifest, `None` if too large to read; `marked` says whether the top also holds `repositories`
/// or a name of the kind docker gives its files (see [`is_member_name`]).
///
/// A root filesystem has no `manifest.json` at its top in practice. One that is not JSON, or is
/// JSON with docker's keys in the wrong shape, is a damaged docker-archive: taken for a root
/// filesystem, it imported with success as an image holding the archive's files, from which
/// nothing runs (QA of session 32, F7). Only JSON of another kind (a web app's manifest, say)
/// leaves the input a root filesystem.
pub(crate) fn is_archive(data: Option<&[u8]>, marked: bool) -> bool {
    if marked {
        return true;
    }
    let Some(data) = data else {
        return false;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return true;
    };
    let docker_keys = |v: &serde_json::Value| {
        v.as_object().is_some_and(|o| {
            ["Config", "Layers", "RepoTags"]
                .iter()
                .any(|k| o.contains_key(*k))
        })
    };
    match &value {
        serde_json::Value::Array(entries) => entries.iter().any(docker_keys),
        v => docker_keys(v),
    }
}

/// Whether `name`, at the top of an input, is named as docker-archives name their files: the
/// config as `<64 hex>.json`, a layer as `<64 hex>/layer.tar` (`docker save` before Docker 25) or
/// `<64 hex>.tar` (`podman save`). A root filesystem has no such name at its top.
pub(crate) fn is_member_name(name: &[u8]) -> bool {
    let stem = name
        .strip_suffix(b".json")
        .or_else(|| name.strip_suffix(b".tar"))
        .unwrap_or(name);
    stem.len() == 64 && stem.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9c558d7b2e4e2a8bbd0c0d4b9e7cfb0c3a4a33bf4c6a17fcd5a2e1b0c6d5e4f3";

    #[test]
    fn a_manifest_json_makes_a_docker_archive_unless_it_is_json_of_another_kind() {
        let good = br#"[{"Config":"c.json","RepoTags":["a:b"],"Layers":["l/layer.tar"]}]"#;
        assert!(is_archive(Some(good), false));
        // Damaged (QA of session 32, F7): cut short, not JSON, docker's keys in the wrong shape.
        assert!(is_archive(Some(&good[..good.len() - 5]), false));
        assert!(is_archive(Some(b"\x00\x01garbage"), false));
        assert!(is_archive(Some(b""), false));
        assert!(is_archive(Some(br#"{"Config":"x"}"#), false));
        assert!(is_archive(Some(br#"[{"Layers":7}]"#), false));
        // JSON of another kind, in a root filesystem.
        assert!(!is_archive(
            Some(br#"{"name":"app","start_url":"/"}"#),
            false
        ));
        assert!(!is_archive(Some(br#"[{"name":"app"}]"#), false));
        assert!(!is_archive(Some(b"[]"), false));
        // Too large to read: only the names beside it tell.
        assert!(!is_archive(None, false));
        // Named beside docker's files (or `repositories`), whatever the manifest holds.
        assert!(is_archive(Some(br#"{"name":"app"}"#), true));
        assert!(is_archive(None, true));
    }

    #[test]
    fn docker_names_its_files_by_64_hex_digits() {
        for ok in [HEX.to_owned(), format!("{HEX}.json"), format!("{HEX}.tar")] {
            assert!(is_member_name(ok.as_bytes()), "{ok}");
        }
        for not in [
            "bin".to_owned(),
            "etc".to_owned(),
            "manifest.json".to_owned(),
            "repositories".to_owned(),
            HEX[1..].to_owned(),
            format!("{HEX}0"),
            HEX.to_uppercase(),
            format!("{HEX}.gz"),
            format!("{}.json", &HEX[..12]),
        ] {
            assert!(!is_member_name(not.as_bytes()), "{not}");
        }
    }
}
