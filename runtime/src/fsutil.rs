//! Durable files: every state file is written atomically (write a temporary file, fsync it, rename
//! it over the old one, fsync the directory), so a crash leaves either the old or the new content.
//! A file written here is private (0600) unless its writer asks for another mode: state files
//! hold peers, clients and container records that only root should read.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of a file written by [`atomic_write`]: root's alone.
pub const PRIVATE_FILE: u32 = 0o600;
/// The mode for [`atomic_write_mode`] of a file that other users or tools read (the lab file).
pub const READABLE_FILE: u32 = 0o644;

/// An exclusive `flock` on `path` (created if need be, never truncated), held until dropped:
/// the lock of a read-modify-write of shared state (the image store, the address table, a lab
/// file).
pub fn lock_exclusive(path: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    nix::fcntl::Flock::lock(lock_file(path)?, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))
}

/// As [`lock_exclusive`] without waiting: `None` when another holder has the lock.
pub fn try_lock_exclusive(path: &Path) -> io::Result<Option<nix::fcntl::Flock<File>>> {
    match nix::fcntl::Flock::lock(
        lock_file(path)?,
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    ) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

/// The file a lock is taken on: created if need be, never truncated.
fn lock_file(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Writes `data` to `path` atomically and durably with mode [`PRIVATE_FILE`] (whatever the old
/// file's mode was): see [`atomic_write_mode`].
pub fn atomic_write(path: &Path, data: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, data, PRIVATE_FILE)
}

/// Writes `data` to `path` atomically and durably: a new temporary file next to it
/// (`.<name>.tmp<pid>-<n>`, unique per call so that concurrent writers of one path never share
/// it), written and fsynced, renamed over `path`, then the directory fsynced. A crash at any step
/// leaves `path` with its old or its new content, never a mix (at worst a stray temporary file).
/// The file gets exactly the permission bits `mode`: the temporary file is created with them
/// (never wider, so no other user can open it meanwhile) and set to them again past the umask,
/// and the rename keeps them.
pub fn atomic_write_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp_name.push(format!(".tmp{}-{seq}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode` (a 0644 file under umask 077).
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes all of `slices`, in order, at the writer's position with as few vectored writes as
/// the kernel takes (std passes at most `IOV_MAX` slices per call), retrying on `EINTR`.
pub fn write_all_vectored(
    w: &mut impl Write,
    mut slices: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Serializes `value` as pretty JSON and writes it with [`atomic_write`] (mode 0600).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    atomic_write(path, &data)
}

/// Reads a JSON file of at most `max` bytes.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, max: u64) -> io::Result<T> {
    let len = fs::metadata(path)?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {len} bytes exceeds the limit of {max}", path.display()),
        ));
    }
    let data = fs::read(path)?;
    serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// How a versioned state file records its format: the key that carries the version (`format`
/// in container records, journals and image records; `version` in `peers.json`) and the version
/// this release writes. A file without the key is of [`UNVERSIONED`], the format of mig 0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub key: &'static str,
    pub current: u32,
}

/// The format version of a state file written before state files carried one (mig 0.1).
pub const UNVERSIONED: u32 = 1;

/// Why a versioned state file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "{path} has format version {found}, newer than version {current} that this mig reads \
         (written by a newer release?): not read, left as it is"
    )]
    Newer {
        path: PathBuf,
        found: u64,
        current: u32,
    },
    #[error("{path}: `{key}` is not a format version number")]
    BadVersion { path: PathBuf, key: &'static str },
    #[error("{path} is not a JSON object")]
    NotObject { path: PathBuf },
}

/// Whether `e` (from [`read_versioned`]) says the file has a newer format than this release's.
pub fn is_newer_format(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FormatError>())
        .is_some_and(|f| matches!(f, FormatError::Newer { .. }))
}

/// Writes `value` (a struct or map) with [`write_json`], with `format.key` set to
/// `format.current`.
pub fn write_versioned<T: serde::Serialize>(
    path: &Path,
    value: &T,
    format: Format,
) -> io::Result<()> {
    let mut v = serde_json::to_value(value).map_err(io::Error::other)?;
    let obj = v.as_object_mut().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            FormatError::NotObject {
                path: path.to_owned(),
            },
        )
    })?;
    obj.insert(format.key.to_owned(), format.current.into());
    write_json(path, &v)
}

/// Reads a JSON object of at most `max` bytes written by [`write_versioned`] or by an older
/// release: its `format.key` (absent: [`UNVERSIONED`]) is taken out and `T` is read from the
/// rest. A version newer than `format.current` is refused with [`FormatError::Newer`] (as an
/// `InvalidData` error, see [`is_newer_format`]) and the file is not touched. `T` reads every
/// older format (fields added since have serde defaults).
pub fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    max: u64,
    format: Format,
) -> io::Result<T> {
    let invalid = |e: FormatError| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut v: serde_json::Value = read_json(path, max)?;
    let obj = v.as_object_mut().ok_or_else(|| {
        invalid(FormatError::NotObject {
            path: path.to_owned(),
        })
    })?;
    let found = match obj.remove(format.key) {
        None => u64::from(UNVERSIONED),
        Some(n) => n.as_u64().ok_or_else(|| {
            invalid(FormatError::BadVersion {
                path: path.to_owned(),
                key: format.key,
            })
        })?,
    };
    if found > u64::from(format.current) {
        return Err(invalid(FormatError::Newer {
            path: path.to_owned(),
            found,
            current: format.current,
        }));
    }
    serde_json::from_value(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_writes_are_private_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one").unwrap();
        assert_eq!(mode(&p), 0o600);
        write_json(&p, &1u32).unwrap();
        assert_eq!(mode(&p), 0o600);
        // A file an older release left readable (0644, the umask's) is private once rewritten.
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // A file asked readable gets exactly that mode, whatever it had.
        atomic_write_mode(&p, b"three", READABLE_FILE).unwrap();
        assert_eq!(mode(&p), 0o644);
        atomic_write_mode(&p, b"four", 0o640).unwrap();
        assert_eq!(mode(&p), 0o640);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn concurrent_writers_of_one_path_never_mix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..50 {
                        atomic_write(p, &vec![b'a' + t; 64 << 10]).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len(), 64 << 10);
        assert!(got.iter().all(|b| *b == got[0]));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The child half of [`a_killed_writer_leaves_old_or_new`]: rewrites the file forever.
    #[test]
    #[ignore]
    fn atomic_writer_child() {
        let Some(p) = std::env::var_os("FSUTIL_CRASH_PATH") else {
            return;
        };
        let p = std::path::PathBuf::from(p);
        for i in 0u64.. {
            let b = if i % 2 == 0 { b'a' } else { b'b' };
            atomic_write(&p, &vec![b; 1 << 20]).unwrap();
        }
    }

    /// A writer SIGKILLed at random points (a crash between any two steps) leaves the file whole:
    /// all of the old content or all of the new, never a mix or a truncation.
    #[test]
    fn a_killed_writer_leaves_old_or_new() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, &vec![b'a'; 1 << 20]).unwrap();
        let exe = std::env::current_exe().unwrap();
        for round in 0..20u64 {
            let mut child = std::process::Command::new(&exe)
                .args(["--exact", "fsutil::tests::atomic_writer_child", "--ignored"])
                .env("FSUTIL_CRASH_PATH", &p)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20 + (round * 7) % 60));
            child.kill().unwrap();
            child.wait().unwrap();
            let got = fs::read(&p).unwrap();
            assert_eq!(got.len(), 1 << 20, "round {round}: torn file");
            assert!(
                got.iter().all(|b| *b == got[0]),
                "round {round}: mixed file"
            );
        }
    }

    #[test]
    fn read_json_refuses_oversized() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_json(&p, &vec![1u32; 100]).unwrap();
        assert!(read_json::<Vec<u32>>(&p, 10).is_err());
        assert_eq!(read_json::<Vec<u32>>(&p, 1 << 20).unwrap().len(), 100);
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rec {
        a: u32,
    }

    const REC: Format = Format {
        key: "format",
        current: 2,
    };

    #[test]
    fn versioned_files_read_old_write_current_refuse_newer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        write_versioned(&p, &Rec { a: 1 }, REC).unwrap();
        let v: serde_json::Value = read_json(&p, 1 << 10).unwrap();
        assert_eq!(v, serde_json::json!({"a": 1, "format": 2}));
        assert_eq!(
            read_versioned::<Rec>(&p, 1 << 10, REC).unwrap(),
            Rec { a: 1 }
        );
        // The unversioned format of mig 0.1.
        fs::write(&p, br#"{"a":7}"#).unwrap();
        assert_eq!(
            read_versioned::<Rec>(&p, 1 << 10, REC).unwrap(),
            Rec { a: 7 }
        );
        let newer = br#"{"a":7,"format":3,"b":1}"#;
        fs::write(&p, newer).unwrap();
        let e = read_versioned::<Rec>(&p, 1 << 10, REC).unwrap_err();
        assert!(is_newer_format(&e), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("rec.json has format version 3, newer than version 2"),
            "{msg}"
        );
        assert_eq!(fs::read(&p).unwrap(), newer);
        fs::write(&p, br#"{"a":7,"format":"x"}"#).unwrap();
        let e = read_versioned::<Rec>(&p, 1 << 10, REC).unwrap_err();
        assert!(
            !is_newer_format(&e) && e.to_string().contains("`format`"),
            "{e}"
        );
        assert!(write_versioned(&p, &1u32, REC).is_err());
    }
}
