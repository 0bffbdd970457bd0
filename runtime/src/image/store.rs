//! The store on disk: directories, work areas, the lock, image records, commit and garbage
//! collection of layers.

use super::{Image, ImageError, ImageStore};
use nix::fcntl::Flock;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest accepted image record.
const MAX_RECORD: u64 = 1 << 20;

/// Format of the image records (`images/<name>.json`): 1 (mig 0.1) had no `format` key; 2 adds
/// it. A record of a newer format is refused by name and left in place.
pub const RECORD_FORMAT: crate::fsutil::Format = crate::fsutil::Format {
    key: "format",
    current: 2,
};

/// The image records of the store: those that read, and those that do not.
#[derive(Debug, Default)]
pub struct Listing {
    /// Sorted by name.
    pub images: Vec<Image>,
    /// Sorted by name.
    pub unreadable: Vec<UnreadableImage>,
}

/// An image record that cannot be read: of a newer format (written by a newer mig), or damaged.
/// It is left as it is; the other images work without it.
#[derive(Debug)]
pub struct UnreadableImage {
    /// The image name its file carries (`images/<name>.json`).
    pub name: String,
    pub path: PathBuf,
    /// The record's format version, when it is newer than [`RECORD_FORMAT`]`.current`.
    pub newer_format: Option<u64>,
    pub error: io::Error,
}

impl UnreadableImage {
    /// Why, in one line (the error and its sources).
    pub fn message(&self) -> String {
        let mut msg = self.error.to_string();
        let mut src = std::error::Error::source(&self.error);
        while let Some(s) = src {
            let s_msg = s.to_string();
            if !msg.contains(&s_msg) {
                msg.push_str(": ");
                msg.push_str(&s_msg);
            }
            src = s.source();
        }
        msg
    }
}

/// The version found in a record refused as newer ([`crate::fsutil::FormatError::Newer`]).
fn newer_format(e: &io::Error) -> Option<u64> {
    match e.get_ref()?.downcast_ref::<crate::fsutil::FormatError>()? {
        crate::fsutil::FormatError::Newer { found, .. } => Some(*found),
        _ => None,
    }
}

static WORK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A private directory under `tmp/` for one operation, removed with everything in it on drop.
#[derive(Debug)]
pub(crate) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "removing image work dir");
            }
        }
    }
}

/// A verified layer waiting under `tmp/` to be moved into the store.
#[derive(Debug)]
pub(crate) struct StagedLayer {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The uncompressed tar, already synced.
    pub blob: PathBuf,
    /// The unpacked tree.
    pub dir: PathBuf,
}

fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

impl ImageStore {
    pub(crate) fn init(&self) -> Result<(), ImageError> {
        for sub in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
            let p = self.root.join(sub);
            fs::create_dir_all(&p).map_err(ImageError::io("creating", &p))?;
        }
        let tmp = self.root.join("tmp");
        let me = std::process::id();
        for ent in fs::read_dir(&tmp).map_err(ImageError::io("reading", &tmp))? {
            let ent = ent.map_err(ImageError::io("reading", &tmp))?;
            let name = ent.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('.').next())
                .and_then(|p| p.parse::<i32>().ok());
            let stale = match pid {
                Some(p) => u32::try_from(p).ok() != Some(me) && p > 0 && !pid_alive(p),
                None => false,
            };
            if stale {
                let p = ent.path();
                tracing::info!(path = %p.display(), "removing stale image work dir");
                fs::remove_dir_all(&p).map_err(ImageError::io("removing", &p))?;
            }
        }
        Ok(())
    }

    pub(crate) fn work_dir(&self) -> Result<WorkDir, ImageError> {
        let n = WORK_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.{n}", std::process::id()));
        fs::create_dir(&path).map_err(ImageError::io("creating", &path))?;
        Ok(WorkDir { path })
    }

    pub(crate) fn lock(&self) -> Result<Flock<File>, ImageError> {
        let p = self.root.join(".lock");
        crate::fsutil::lock_exclusive(&p).map_err(ImageError::io("locking", &p))
    }

    pub(crate) fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(digest.replace(':', "/"))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("images").join(format!("{name}.json"))
    }

    /// Every record that reads, sorted by name; a record that does not (of a newer format, or
    /// damaged) is skipped with a warning naming the file (and both versions), and left as it is.
    pub(crate) fn read_records(&self) -> Result<Vec<Image>, ImageError> {
        let listing = self.read_listing()?;
        for u in &listing.unreadable {
            tracing::warn!(path = %u.path.display(), error = %u.message(), "skipping an image record that cannot be read");
        }
        Ok(listing.images)
    }

    /// Every record, those that read sorted by name and those that do not beside them.
    pub(crate) fn read_listing(&self) -> Result<Listing, ImageError> {
        let dir = self.root.join("images");
        let mut out = Listing::default();
        for ent in fs::read_dir(&dir).map_err(ImageError::io("reading", &dir))? {
            let ent = ent.map_err(ImageError::io("reading", &dir))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let p = ent.path();
            match crate::fsutil::read_versioned::<Image>(&p, MAX_RECORD, RECORD_FORMAT) {
                Ok(img) => out.images.push(img),
                // Removed by someone else since the directory was read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => out.unreadable.push(UnreadableImage {
                    name: name.trim_end_matches(".json").to_owned(),
                    newer_format: newer_format(&error),
                    path: p,
                    error,
                }),
            }
        }
        out.images.sort_by(|a, b| a.name.cmp(&b.name));
        out.unreadable.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The layers the image records use, or `None` when a record cannot be read (it may use any
    /// layer, so nothing may be collected).
    fn used_layers(&self) -> Result<Option<HashSet<String>>, ImageError> {
        let listing = self.read_listing()?;
        if let Some(u) = listing.unreadable.first() {
            tracing::warn!(
                path = %u.path.display(),
                error = %u.message(),
                "keeping every layer: an image record cannot be read, it may use any of them"
            );
            return Ok(None);
        }
        Ok(Some(
            listing.images.into_iter().flat_map(|i| i.layers).collect(),
        ))
    }

    fn read_record(&self, name: &str) -> Result<Option<Image>, ImageError> {
        if crate::spec::validate_name(name).is_err() {
            return Ok(None);
        }
        let p = self.record_path(name);
        match crate::fsutil::read_versioned::<Image>(&p, MAX_RECORD, RECORD_FORMAT) {
            Ok(img) => Ok(Some(img)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => match newer_format(&e) {
                Some(found) => Err(ImageError::NewerRecord {
                    path: p,
                    found,
                    current: RECORD_FORMAT.current,
                }),
                None => Err(ImageError::Record { path: p, source: e }),
            },
        }
    }

    pub(crate) fn find(&self, query: &str) -> Result<Image, ImageError> {
        if let Some(img) = self.read_record(query)? {
            return Ok(img);
        }
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        let is_hex =
            hex.len() >= 4 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex {
            return Err(ImageError::NotFound(query.to_owned()));
        }
        let hex = hex.to_ascii_lowercase();
        let mut found: Vec<Image> = self
            .read_records()?
            .into_iter()
            .filter(|i| {
                i.id.strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(&hex))
            })
            .collect();
        // The same image imported under several names (an OCI layout and its archive): its
        // full id names one image, whichever record answers (the containers made from any of
        // them record the id, and moved or checkpointed they look it up by it).
        let one_image = found.windows(2).all(|w| w[0].id == w[1].id);
        match found.len() {
            0 => Err(ImageError::NotFound(query.to_owned())),
            1 => Ok(found.remove(0)),
            _ if one_image && hex.len() == 64 => Ok(found.remove(0)),
            _ => Err(ImageError::Ambiguous {
                query: query.to_owned(),
                matches: found
                    .into_iter()
                    .map(|i| format!("{} ({})", i.name, i.id))
                    .collect(),
            }),
        }
    }

    pub(crate) fn remove_image(&self, query: &str) -> Result<Image, ImageError> {
        let _lock = self.lock()?;
        let img = self.find(query)?;
        // An id shared by several names removes none of them: the name says which.
        if img.name != query {
            let names: Vec<String> = self
                .read_records()?
                .into_iter()
                .filter(|i| i.id == img.id)
                .map(|i| format!("{} ({})", i.name, i.id))
                .collect();
            if names.len() > 1 {
                return Err(ImageError::Ambiguous {
                    query: query.to_owned(),
                    matches: names,
                });
            }
        }
        let p = self.record_path(&img.name);
        fs::remove_file(&p).map_err(ImageError::io("removing", &p))?;
        sync_dir(&self.root.join("images"))?;
        self.gc(&img.layers)?;
        Ok(img)
    }

    /// Under the lock: moves the staged layers into place (those not there yet), checks that
    /// every layer of `image` is present, writes its record (replacing one of the same name) and
    /// collects the layers that nothing references any more.
    pub(crate) fn commit_image(
        &self,
        staged: &[StagedLayer],
        image: &Image,
    ) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let committed = self.commit_layers(staged)?;
        let result = (|| {
            self.check_layers(image)?;
            let mut old = self.read_record(&image.name)?;
            if let Some(o) = old.take_if(|o| o.id != image.id && self.used(o)) {
                self.keep_renamed(o)?;
            }
            let p = self.record_path(&image.name);
            crate::fsutil::write_versioned(&p, image, RECORD_FORMAT)
                .map_err(ImageError::io("writing", &p))?;
            Ok(old)
        })();
        match result {
            Ok(old) => {
                if let Some(old) = old {
                    self.gc(&old.layers)?;
                }
                Ok(())
            }
            Err(e) => {
                if let Err(gc) = self.gc(&committed) {
                    tracing::warn!(error = %gc, "removing layers of a failed import");
                }
                Err(e)
            }
        }
    }

    /// Every layer of `image` is stored.
    fn check_layers(&self, image: &Image) -> Result<(), ImageError> {
        match image.layers.iter().find(|l| !self.has_layer(l)) {
            Some(missing) => Err(ImageError::MissingLayer(missing.clone())),
            None => Ok(()),
        }
    }

    /// True when containers use `img` (as the agent tells, see [`ImageStore::keep_used`]).
    fn used(&self, img: &Image) -> bool {
        self.in_use.as_ref().is_some_and(|f| f(img))
    }

    /// Under the lock: writes `img`'s record under `<name>-<12 hex of its id>` (its name cut to
    /// fit), the name the record of an image still in use keeps when another one takes its name.
    fn keep_renamed(&self, img: Image) -> Result<(), ImageError> {
        let img = renamed(img);
        tracing::info!(name = %img.name, id = %img.id, "an image containers use keeps its layers under another name");
        let p = self.record_path(&img.name);
        crate::fsutil::write_versioned(&p, &img, RECORD_FORMAT)
            .map_err(ImageError::io("writing", &p))
    }

    /// Records an image whose layers are all here (received from a peer), under its own name when
    /// that is free or names the same image, else under `<name>-<12 hex of its id>`: what arrives
    /// with a container never replaces an image of this host. Returns the record written.
    pub(crate) fn commit_received(&self, image: &Image) -> Result<Image, ImageError> {
        let _lock = self.lock()?;
        self.check_layers(image)?;
        let image = match self.read_record(&image.name)? {
            Some(here) if here.id != image.id => {
                let r = renamed(image.clone());
                tracing::info!(name = %r.name, id = %r.id, "a received image's name is taken here: recorded under another name");
                r
            }
            _ => image.clone(),
        };
        let p = self.record_path(&image.name);
        crate::fsutil::write_versioned(&p, &image, RECORD_FORMAT)
            .map_err(ImageError::io("writing", &p))?;
        Ok(image)
    }

    /// Under the lock: moves staged layers into place; returns the digests it moved.
    pub(crate) fn commit_layers(&self, staged: &[StagedLayer]) -> Result<Vec<String>, ImageError> {
        let mut moved = Vec::new();
        let todo: Vec<_> = staged
            .iter()
            .filter(|s| !self.has_layer(&s.digest))
            .collect();
        if todo.is_empty() {
            return Ok(moved);
        }
        // One syncfs makes every staged tree durable before it becomes visible.
        let tmp = self.root.join("tmp");
        let f = File::open(&tmp).map_err(ImageError::io("opening", &tmp))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f))
            .map_err(|e| ImageError::io("syncing", &tmp)(e.into()))?;
        let result = (|| {
            for s in todo {
                let blob = self.blob_path(&s.digest);
                if !blob.is_file() {
                    fs::rename(&s.blob, &blob).map_err(ImageError::io("storing", &blob))?;
                }
                let dir = self.layer_dir(&s.digest);
                fs::rename(&s.dir, &dir).map_err(ImageError::io("storing", &dir))?;
                moved.push(s.digest.clone());
            }
            sync_dir(&self.root.join("blobs/sha256"))?;
            sync_dir(&self.root.join("layers/sha256"))
        })();
        match result {
            Ok(()) => Ok(moved),
            Err(e) => {
                if let Err(gc) = self.gc(&moved) {
                    tracing::warn!(error = %gc, "removing layers of a failed commit");
                }
                Err(e)
            }
        }
    }

    /// Removes every stored layer (and stray blob) that no image record references and that is
    /// not in `keep`; returns their digests. For the agent: layers received for a migration that
    /// never committed, or left by a crash between storing a blob and its layer.
    pub fn prune(&self, keep: &[String]) -> Result<Vec<String>, ImageError> {
        let _lock = self.lock()?;
        let mut all: Vec<String> = Vec::new();
        for sub in ["layers/sha256", "blobs/sha256"] {
            let dir = self.root.join(sub);
            for ent in fs::read_dir(&dir).map_err(ImageError::io("reading", &dir))? {
                let ent = ent.map_err(ImageError::io("reading", &dir))?;
                let Some(hex) = ent.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let d = format!("sha256:{hex}");
                if crate::spec::validate_digest(&d).is_ok() && !all.contains(&d) {
                    all.push(d);
                }
            }
        }
        let Some(used) = self.used_layers()? else {
            return Ok(Vec::new());
        };
        let candidates: Vec<String> = all
            .into_iter()
            .filter(|d| !used.contains(d) && !keep.contains(d))
            .collect();
        self.gc(&candidates)?;
        Ok(candidates)
    }

    /// Under the lock: removes the layers among `candidates` that no image record references.
    /// The layer directory goes first (moved to `tmp/`, then deleted), the blob second.
    pub(crate) fn gc(&self, candidates: &[String]) -> Result<(), ImageError> {
        if candidates.is_empty() {
            return Ok(());
        }
        let Some(used) = self.used_layers()? else {
            return Ok(());
        };
        let work = self.work_dir()?;
        for (n, d) in candidates.iter().enumerate() {
            if used.contains(d) || crate::spec::validate_digest(d).is_err() {
                continue;
            }
            let dir = self.layer_dir(d);
            let trash = work.path().join(n.to_string());
            match fs::rename(&dir, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("removing", &dir)(e)),
            }
            let blob = self.blob_path(d);
            match fs::remove_file(&blob) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("removing", &blob)(e)),
            }
        }
        drop(work);
        Ok(())
    }
}

fn sync_dir(p: &Path) -> Result<(), ImageError> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(ImageError::io("syncing", p))
}

/// `img` named `<name>-<12 hex of its id>`, its name cut to fit the 63 characters of a name.
fn renamed(mut img: Image) -> Image {
    let hex = img.id.strip_prefix("sha256:").unwrap_or(&img.id);
    let short = &hex[..hex.len().min(12)];
    let base: String = img.name.chars().take(63 - 1 - short.len()).collect();
    img.name = format!("{base}-{short}");
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One image recorded under two names (the same OCI layout imported twice): its full id
    /// finds it, as a container made from either name looks it up when it moves; a prefix and
    /// `remove` by id stay ambiguous, removal by name works.
    #[test]
    fn an_image_under_two_names_is_found_by_its_full_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let records = dir.path().join("images");
        let id = format!("sha256:{}", "2".repeat(64));
        for name in ["one", "two"] {
            let text = format!(
                r#"{{"name":"{name}","id":"{id}","layers":[],"config":{{"env":[],"entrypoint":[],"cmd":["sh"],"workdir":"","user":""}},"created":1700000000,"size":5}}"#
            );
            fs::write(records.join(format!("{name}.json")), text).unwrap();
        }
        assert_eq!(store.get(&id).unwrap().id, id);
        assert_eq!(store.get(&id[7..]).unwrap().id, id);
        assert!(matches!(
            store.get(&id[..19]),
            Err(ImageError::Ambiguous { .. })
        ));
        assert!(matches!(
            store.remove(&id),
            Err(ImageError::Ambiguous { .. })
        ));
        assert_eq!(store.remove("one").unwrap().name, "one");
        assert_eq!(store.get(&id).unwrap().name, "two");
    }

    /// An image record of mig 0.1 (no `format`) is read; one of a newer format is skipped by the
    /// listing (shown as unreadable), refused by name, keeps every layer from collection and is
    /// left as it is.
    #[test]
    fn records_of_the_old_format_are_read_newer_skipped_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let records = dir.path().join("images");
        let old = format!(
            r#"{{"name":"old","id":"sha256:{}","layers":[],"config":{{"env":[],"entrypoint":[],"cmd":["sh"],"workdir":"","user":""}},"created":1700000000,"size":5}}"#,
            "1".repeat(64)
        );
        fs::write(records.join("old.json"), &old).unwrap();
        let img = store.get("old").unwrap();
        assert_eq!((img.name.as_str(), img.size), ("old", 5));
        let newer = old.replace(r#""name":"old""#, r#""format":9,"name":"new""#);
        fs::write(records.join("new.json"), &newer).unwrap();
        // The other images still work; the newer one is skipped by the listing...
        assert_eq!(store.list().unwrap(), vec![img.clone()]);
        assert_eq!(store.get("old").unwrap(), img);
        assert_eq!(store.get(&img.id[..12]).unwrap(), img);
        let all = store.list_all().unwrap();
        assert_eq!(all.images, vec![img.clone()]);
        let [u] = all.unreadable.as_slice() else {
            panic!("{all:?}")
        };
        assert_eq!((u.name.as_str(), u.newer_format), ("new", Some(9)));
        let want = format!(
            "{} has format version 9, newer than version 2",
            records.join("new.json").display()
        );
        assert!(u.message().contains(&want), "{}", u.message());
        // ... and commands on it fail, naming the file and both versions.
        for e in [
            store.get("new").unwrap_err(),
            store.remove("new").unwrap_err(),
        ] {
            assert!(
                matches!(
                    e,
                    ImageError::NewerRecord {
                        found: 9,
                        current: 2,
                        ..
                    }
                ),
                "{e:?}"
            );
            let want = format!(
                "image record {} has format version 9, newer than version 2",
                records.join("new.json").display()
            );
            assert!(e.to_string().contains(&want), "{e}");
        }
        // No layer is collected while a record cannot be read: it may use any of them.
        let stray = format!("sha256:{}", "2".repeat(64));
        fs::create_dir_all(store.layer_dir(&stray)).unwrap();
        fs::write(store.blob_path(&stray), b"tar").unwrap();
        assert!(store.prune(&[]).unwrap().is_empty());
        assert!(store.has_layer(&stray) && store.blob_path(&stray).is_file());
        store.add_image(&img).unwrap();
        assert!(store.has_layer(&stray));
        assert_eq!(fs::read_to_string(records.join("new.json")).unwrap(), newer);
        fs::remove_file(records.join("new.json")).unwrap();
        assert_eq!(store.prune(&[]).unwrap(), vec![stray.clone()]);
        // A damaged record is skipped and shown the same way, without a version.
        fs::write(records.join("torn.json"), b"{\"name\":").unwrap();
        assert_eq!(store.list().unwrap(), vec![img.clone()]);
        let all = store.list_all().unwrap();
        let [u] = all.unreadable.as_slice() else {
            panic!("{all:?}")
        };
        assert_eq!((u.name.as_str(), u.newer_format), ("torn", None));
        assert!(matches!(store.get("torn"), Err(ImageError::Record { .. })));
        fs::remove_file(records.join("torn.json")).unwrap();
        assert!(!store.has_layer(&stray) && !store.blob_path(&stray).exists());
        // Rewritten records carry the current format.
        store.add_image(&img).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(records.join("old.json")).unwrap()).unwrap();
        assert_eq!(v["format"], 2);
        assert_eq!(store.get("old").unwrap(), img);
    }

    /// Importing under the name of an image containers use (here: the first one) keeps that
    /// image, renamed `<name>-<12 hex>`, with its layers; an unused one is replaced and its
    /// layers collected. Before, the used image's layers were collected too: the running
    /// container's root filesystem emptied under it and it could no longer be moved.
    #[test]
    fn an_import_keeps_the_image_it_renames_while_containers_use_it() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = |n: &str, data: &str| {
            let r = dir.path().join(n);
            fs::create_dir_all(r.join("etc")).unwrap();
            fs::write(r.join("etc/version"), data).unwrap();
            r
        };
        let (v1, v2, v3) = (rootfs("v1", "1"), rootfs("v2", "2"), rootfs("v3", "3"));
        let first = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let f = first.clone();
        let store = ImageStore::open(&dir.path().join("images"))
            .unwrap()
            .keep_used(std::sync::Arc::new(move |img: &Image| {
                *f.lock().unwrap() == img.id
            }));
        let a = store.import(&v1, "app").unwrap();
        *first.lock().unwrap() = a.id.clone();
        let b = store.import(&v2, "app").unwrap();
        assert_eq!(store.get("app").unwrap().id, b.id);
        let kept = format!("app-{}", &a.id[7..19]);
        let k = store.get(&kept).unwrap();
        assert_eq!(
            (k.id.as_str(), k.layers.clone()),
            (a.id.as_str(), a.layers.clone())
        );
        assert_eq!(store.get(&a.id).unwrap().name, kept);
        assert!(a.layers.iter().all(|l| store.has_layer(l)));
        // The same image again, and an unused one replaced: nothing kept, its layers collected.
        let b2 = store.import(&v2, "app").unwrap();
        assert_eq!(b2.id, b.id);
        store.import(&v3, "app").unwrap();
        assert!(b.layers.iter().all(|l| !store.has_layer(l)));
        assert_eq!(store.list().unwrap().len(), 2);
    }
}
