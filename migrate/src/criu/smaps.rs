//! Copies of a frozen tree's `/proc/PID/smaps`, read while `criu dump` starts.
//!
//! Reading `smaps` walks every page table entry of every mapping to count pages: about 20 ms per
//! GiB of resident memory on an idle 2-core VM and twice that under load. CRIU reads it for
//! every task it dumps, after it has started, loaded its caches and seized the tree, all of that
//! while the container is frozen. It needs only the mapping lines and `VmFlags`, which do not
//! change while the tree is frozen. A [`SmapsCopy`] started right after the freeze reads them on
//! another thread, in parallel with CRIU's start, and a CRIU with mig's patch 0009 (docs/criu.md,
//! "Patches") takes a copy when [`SMAPS_DIR`] names its directory and its mapping lines still
//! match `/proc/PID/maps`. Any other CRIU, or a copy that is missing or out of date, reads
//! `/proc/PID/smaps` itself as before.
//!
//! The directory holds `PID.tmp` while a copy is written and `PID` once it is whole; CRIU waits
//! for a `PID.tmp` to become `PID` rather than walk the same page tables a second time.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// The environment variable of mig's patch 0009: the directory of the copies.
pub const SMAPS_DIR: &str = "CRIU_SMAPS_DIR";

/// Copies of `/proc/PID/smaps` being made on a thread; [`SmapsCopy::dir`] is what [`SMAPS_DIR`]
/// names. Dropping it waits for the thread and removes the directory.
#[derive(Debug)]
pub struct SmapsCopy {
    dir: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl SmapsCopy {
    /// Starts copying the `smaps` of `pids` (host PIDs of frozen processes) into `dir`, which is
    /// made empty first. Every `PID.tmp` exists before the thread starts, so CRIU waits for
    /// a copy instead of reading `smaps` at the same time.
    pub fn start(dir: &Path, pids: &[i32]) -> std::io::Result<SmapsCopy> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let mut pending = Vec::with_capacity(pids.len());
        for &pid in pids {
            let tmp = dir.join(format!("{pid}.tmp"));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            pending.push((pid, tmp, file));
        }
        let dir_owned = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("smaps-copy".into())
            .spawn(move || {
                for (pid, tmp, file) in pending {
                    if let Err(e) = copy_one(pid, &tmp, file, &dir_owned.join(pid.to_string())) {
                        tracing::debug!(pid, error = %e, "no copy of smaps: criu reads it");
                        let _ = std::fs::remove_file(&tmp);
                    }
                }
            })?;
        Ok(SmapsCopy {
            dir: dir.to_owned(),
            thread: Some(thread),
        })
    }

    /// The directory of the copies.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SmapsCopy {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn copy_one(pid: i32, tmp: &Path, mut file: std::fs::File, done: &Path) -> std::io::Result<()> {
    let mut smaps = Vec::with_capacity(64 << 10);
    std::fs::File::open(format!("/proc/{pid}/smaps"))?.read_to_end(&mut smaps)?;
    file.write_all(&smaps)?;
    drop(file);
    std::fs::rename(tmp, done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_own_smaps_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("mig-smaps-test-{}", std::process::id()));
        let me = std::process::id() as i32;
        // A PID above the kernel's limit (PID_MAX_LIMIT, 2^22): its copy fails and its tmp goes.
        let gone = 1 << 23;
        let copy = SmapsCopy::start(&dir, &[me, gone]).unwrap();
        let done = dir.join(me.to_string());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while dir.join(format!("{gone}.tmp")).exists() || !done.exists() {
            assert!(std::time::Instant::now() < deadline, "copies not done");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&done).unwrap();
        assert!(text.contains("VmFlags:"), "not an smaps copy: {text:.200}");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![me.to_string()]);
        drop(copy);
        assert!(!dir.exists());
    }
}
