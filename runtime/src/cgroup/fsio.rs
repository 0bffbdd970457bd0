//! Small helpers for cgroupfs control files: one `write(2)` per command, absent files told apart
//! from failing ones, and an rmdir that waits out the kernel's brief "busy" window.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Writes `value` to an existing control file. cgroupfs treats each write as one command, so the
/// value goes out in a single `write` (values here are a few bytes).
pub(super) fn write(path: &Path, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    let n = f.write(value.as_bytes())?;
    if n != value.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to a cgroup file",
        ));
    }
    Ok(())
}

/// Reads a control file; `Ok(None)` when it does not exist.
pub(super) fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The value of `key` in a flat-keyed file (`key value` per line), e.g. `frozen` in cgroup.events.
pub(super) fn keyed<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim())
    })
}

/// Child cgroup directories of `dir` (every subdirectory of a cgroup directory is a child cgroup).
/// A missing `dir` has none.
pub(super) fn child_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// How long `rmdir` is retried while the kernel still reports the cgroup busy (processes that were
/// just killed leave it asynchronously).
const RMDIR_RETRY: Duration = Duration::from_secs(2);

/// Removes `dir` and its child cgroups, deepest first. Already gone is fine.
pub(super) fn remove_tree(dir: &Path) -> Result<(), (PathBuf, io::Error)> {
    for child in child_dirs(dir).map_err(|e| (dir.to_path_buf(), e))? {
        remove_tree(&child)?;
    }
    let deadline = Instant::now() + RMDIR_RETRY;
    let mut pause = Duration::from_millis(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err((dir.to_path_buf(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values() {
        let events = "populated 1\nfrozen 0\n";
        assert_eq!(keyed(events, "frozen"), Some("0"));
        assert_eq!(keyed(events, "populated"), Some("1"));
        assert_eq!(keyed(events, "froze"), None);
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(keyed(stat, "usage_usec"), Some("1234"));
    }
}
