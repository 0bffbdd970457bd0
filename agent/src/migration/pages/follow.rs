//! Hashing the page images while the page server writes them.
//!
//! Stream mode's `criu page-server` appends to `pages-*.img` and `pagemap-*.img` while the dump
//! runs. A [`Follower`] thread reads each such file as it grows and feeds a SHA-256, so that
//! once the page server has exited only the tail written since the last read is left to hash.
//!
//! What makes that safe: CRIU's page server writes each page image front to back and never
//! goes back (pages are spliced at the file position, the pagemap goes through its buffered
//! writer); data below the size already read does not change. [`Follower::finish`] reads every
//! file to its final end after the writer exited, and the caller checks that each file on disk
//! is still the one followed (same device and inode) and has exactly the size hashed; anything
//! else is hashed again from the start. A file is never trusted unhashed.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const RUN: u8 = 0;
const FINISH: u8 = 1;
const ABORT: u8 = 2;
/// Pause when no followed file grew.
const IDLE: Duration = Duration::from_millis(2);
const BUF: usize = 1 << 20;

/// A file hashed by the follower: its digest over `size` bytes and which file it was.
#[derive(Debug, Clone)]
pub(crate) struct Followed {
    pub size: u64,
    pub sha256: String,
    dev: u64,
    ino: u64,
}

impl Followed {
    /// Whether `path` is still the file that was followed, with exactly the bytes hashed.
    pub fn matches(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| {
            m.is_file() && m.dev() == self.dev && m.ino() == self.ino && m.len() == self.size
        })
    }
}

struct Open {
    file: File,
    hash: Sha256,
    size: u64,
    dev: u64,
    ino: u64,
}

/// A thread following the files of one directory that `wanted` selects by name. Stops when
/// dropped without [`Follower::finish`].
pub(crate) struct Follower {
    state: Arc<AtomicU8>,
    thread: Option<JoinHandle<HashMap<String, Followed>>>,
}

impl Follower {
    pub fn start(dir: PathBuf, wanted: fn(&str) -> bool) -> std::io::Result<Follower> {
        let state = Arc::new(AtomicU8::new(RUN));
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("page-hash".into())
            .spawn(move || follow(&dir, wanted, &s))?;
        Ok(Follower {
            state,
            thread: Some(thread),
        })
    }

    /// Call once the writer has exited: reads what is left of every file and returns the
    /// digests by file name. A file the thread could not read is missing from the result.
    pub fn finish(mut self) -> HashMap<String, Followed> {
        self.state.store(FINISH, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.state.store(ABORT, Ordering::SeqCst);
        }
    }
}

fn follow(dir: &Path, wanted: fn(&str) -> bool, state: &AtomicU8) -> HashMap<String, Followed> {
    let mut files: HashMap<String, Option<Open>> = HashMap::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let st = state.load(Ordering::SeqCst);
        if st == ABORT {
            return HashMap::new();
        }
        // Read after the writer exited: this pass sees every file at its final size.
        let last = st == FINISH;
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if files.contains_key(&name) || !wanted(&name) {
                    continue;
                }
                let open = File::open(e.path()).ok().and_then(|file| {
                    let m = file.metadata().ok()?;
                    Some(Open {
                        file,
                        hash: Sha256::new(),
                        size: 0,
                        dev: m.dev(),
                        ino: m.ino(),
                    })
                });
                files.insert(name, open);
            }
        }
        let mut grew = false;
        for slot in files.values_mut() {
            let Some(f) = slot else { continue };
            loop {
                match f.file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        f.hash.update(&buf[..n]);
                        f.size += n as u64;
                        grew = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // Hashed again from the start by the caller.
                        *slot = None;
                        break;
                    }
                }
            }
        }
        if last {
            return files
                .into_iter()
                .filter_map(|(name, f)| {
                    let f = f?;
                    Some((
                        name,
                        Followed {
                            size: f.size,
                            sha256: hex::encode(f.hash.finalize()),
                            dev: f.dev,
                            ino: f.ino,
                        },
                    ))
                })
                .collect();
        }
        if !grew {
            std::thread::sleep(IDLE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wanted(name: &str) -> bool {
        name.starts_with("pages-")
    }

    #[test]
    fn digest_of_a_growing_file_equals_the_whole_file_hash() {
        let dir = std::env::temp_dir().join(format!("mig-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = Follower::start(dir.clone(), wanted).unwrap();
        let mut out = File::create(dir.join("pages-1.img")).unwrap();
        std::fs::write(dir.join("other.img"), b"not followed").unwrap();
        for i in 0..40u32 {
            let chunk: Vec<u8> = (0..100_003u32).map(|j| (i ^ j) as u8).collect();
            out.write_all(&chunk).unwrap();
            if i % 8 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        std::fs::write(dir.join("pages-2.img"), b"late file").unwrap();
        drop(out);
        let got = f.finish();
        assert_eq!(got.len(), 2);
        for name in ["pages-1.img", "pages-2.img"] {
            let path = dir.join(name);
            let (size, sha) = mig_migrate::imageset::hash_file(&path).unwrap();
            assert_eq!(got[name].size, size);
            assert_eq!(got[name].sha256, sha);
            assert!(got[name].matches(&path));
        }
        // Written to after the follower finished: no longer the bytes hashed.
        let mut late = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("pages-2.img"))
            .unwrap();
        late.write_all(b"!").unwrap();
        assert!(!got["pages-2.img"].matches(&dir.join("pages-2.img")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
