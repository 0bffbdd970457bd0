//! CRIU's kerndat cache on hosts whose `/run` is not a tmpfs.
//!
//! Every `criu` run starts by probing the kernel ("kerndat": about 30 ms here) unless it finds
//! the result of an earlier probe in `/run/criu.kdat`. CRIU writes that cache only onto a tmpfs,
//! so that it cannot outlive the boot (and kernel) it describes; when `/run` is an ordinary
//! directory it recomputes the probe in every dump, restore, page server and lazy-pages daemon.
//! Loading the cache, CRIU only checks the file's size and two magic numbers (the second one
//! is its build time), so a file of another CRIU build is dropped and recomputed, but a file of
//! an earlier boot would be believed.
//!
//! [`ensure`] fills the cache on such a host: when `/run` is not a tmpfs and the file is
//! missing, older than this boot (`btime` in `/proc/stat`), older than the CRIU binary or made
//! for another binary (the identity next to it, [`KDAT_SOURCE`], differs), it
//! runs `criu check` in a thread with its own mount namespace that has a tmpfs on `/run` (so
//! CRIU keeps its cache there), and copies the file into the real `/run` under a temporary
//! name, renamed over `criu.kdat`. Where `/run` is a tmpfs nothing is done: CRIU manages its
//! cache itself. docs/criu.md ("Kerndat cache") says what this means for CRIU run by hand.
//!
//! A CRIU of another build that finds the file (Debian's `criu` run by podman or by hand, or
//! `MIG_CRIU` pointing elsewhere) deletes it (criu/kerndat.c, a magic number differs), and every
//! later run of mig's CRIU probes again, three times per move while the container is down. So
//! the agent calls [`ensure`] at its start and again before each freeze and each restore, where
//! it costs two `stat`s and a small read when the cache is in place.

use super::Criu;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The directory CRIU keeps its cache in (its build's `RUNDIR`, `/run` by default).
pub const KDAT_DIR: &str = "/run";
/// The cache's file name in [`KDAT_DIR`].
pub const KDAT_NAME: &str = "criu.kdat";
/// Next to the cache: which CRIU binary it was made for (device, inode, size, modification
/// time), written by [`ensure`].
pub const KDAT_SOURCE: &str = "criu.kdat.mig-source";
/// The largest cache file accepted from CRIU (4.2's is 912 bytes).
const MAX_KDAT_BYTES: u64 = 1 << 20;

/// Why the cache could not be prepared. None of this stops CRIU: it then probes every time.
#[derive(Debug, thiserror::Error)]
pub enum KdatError {
    #[error("cannot tell the filesystem of {path}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot read the boot time from /proc/stat")]
    BootTime(#[source] std::io::Error),
    #[error("cannot start the thread that runs criu check")]
    Thread(#[source] std::io::Error),
    #[error("the thread that runs criu check panicked")]
    ThreadPanicked,
    #[error("cannot enter a private mount namespace")]
    Unshare(#[source] nix::errno::Errno),
    #[error("cannot make the mounts of the private namespace private")]
    MakePrivate(#[source] nix::errno::Errno),
    #[error("cannot mount a tmpfs on {path} in the private namespace")]
    MountTmpfs {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot run {path} check")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu check wrote no kerndat cache ({status})")]
    NoCache { status: std::process::ExitStatus },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu's kerndat cache is {bytes} bytes, more than {MAX_KDAT_BYTES}")]
    TooLarge { bytes: u64 },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KdatOutcome {
    /// `/run` is a tmpfs: CRIU keeps its cache itself.
    Tmpfs,
    /// The cache is from this boot, newer than the CRIU binary and made for it.
    Fresh,
    /// The cache was (re)written: `bytes` long, `criu check` took `check_ms`.
    Written { bytes: u64, check_ms: u64 },
}

/// Makes sure `criu` finds a kerndat cache of this boot, made for this binary, in
/// [`KDAT_DIR`] (see the module doc). Blocking: a few microseconds when the cache is in place,
/// about 100 ms when it runs `criu check`, so call it before a container is frozen, not while.
/// Calls are serialized within the process.
pub fn ensure(criu: &Criu) -> Result<KdatOutcome, KdatError> {
    ensure_in(criu, Path::new(KDAT_DIR), false)
}

/// [`ensure`] with the cache directory given, and `force` to rewrite a fresh file.
pub fn ensure_in(criu: &Criu, dir: &Path, force: bool) -> Result<KdatOutcome, KdatError> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if is_tmpfs(dir)? {
        return Ok(KdatOutcome::Tmpfs);
    }
    let file = dir.join(KDAT_NAME);
    let source = dir.join(KDAT_SOURCE);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let identity = binary_identity(criu.path());
    let made_for = std::fs::read_to_string(&source).ok();
    if !force
        && !needs_refresh(mtime(&file), boot_time()?, mtime(criu.path()))
        && identity.is_some()
        && made_for == identity
    {
        return Ok(KdatOutcome::Fresh);
    }
    let start = Instant::now();
    let bytes = probe(criu)?;
    let check_ms = start.elapsed().as_millis() as u64;
    let len = bytes.len() as u64;
    // The identity goes first: a cache without one is made again, one with a stale one too.
    let _ = std::fs::remove_file(&source);
    install(dir, KDAT_NAME, &bytes)?;
    if let Some(id) = &identity {
        install(dir, KDAT_SOURCE, id.as_bytes())?;
    }
    Ok(KdatOutcome::Written {
        bytes: len,
        check_ms,
    })
}

/// What tells one CRIU binary from another without reading it: device, inode, size and
/// modification time of the file `path` resolves to.
fn binary_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{} dev {} ino {} size {} mtime {}.{:09}\n",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// Whether `dir` is on a tmpfs.
pub fn is_tmpfs(dir: &Path) -> Result<bool, KdatError> {
    let st = nix::sys::statfs::statfs(dir).map_err(|source| KdatError::Statfs {
        path: dir.to_owned(),
        source,
    })?;
    Ok(st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Whether a cache file modified at `file` (None: missing) must be rewritten, on a host booted
/// at `boot`, with the CRIU binary modified at `criu`: a file of an earlier boot may describe
/// another kernel, and one older than the binary was probably written by another CRIU build.
pub fn needs_refresh(file: Option<SystemTime>, boot: SystemTime, criu: Option<SystemTime>) -> bool {
    match file {
        None => true,
        Some(f) => f < boot || criu.is_some_and(|c| f < c),
    }
}

/// The boot time (`btime` in `/proc/stat`).
pub fn boot_time() -> Result<SystemTime, KdatError> {
    let text = std::fs::read_to_string("/proc/stat").map_err(KdatError::BootTime)?;
    let secs = parse_btime(&text).ok_or_else(|| {
        KdatError::BootTime(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no btime line",
        ))
    })?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The `btime` value of `/proc/stat` text.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `criu check` with a tmpfs on [`KDAT_DIR`], in a thread that leaves the agent's mount
/// namespace (the namespace and its tmpfs go away when the thread ends); returns the cache it
/// wrote.
fn probe(criu: &Criu) -> Result<Vec<u8>, KdatError> {
    let criu_path = criu.path().to_owned();
    std::thread::Builder::new()
        .name("criu-kdat".into())
        .spawn(move || probe_in_private_run(&criu_path, Path::new(KDAT_DIR)))
        .map_err(KdatError::Thread)?
        .join()
        .map_err(|_| KdatError::ThreadPanicked)?
}

fn probe_in_private_run(criu: &Path, dir: &Path) -> Result<Vec<u8>, KdatError> {
    // CLONE_FS too: a thread shares its root and cwd with the process until it unshares them,
    // and the kernel refuses a new mount namespace to a task that shares them.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS).map_err(KdatError::Unshare)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(KdatError::MakePrivate)?;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=4m"),
    )
    .map_err(|source| KdatError::MountTmpfs {
        path: dir.to_owned(),
        source,
    })?;
    // The child inherits this thread's namespace. Its verdict does not matter: the cache is
    // written when the probe ends, before the feature checks.
    let status = Command::new(criu)
        .arg("check")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| KdatError::Spawn {
            path: criu.to_owned(),
            source,
        })?;
    let file = dir.join(KDAT_NAME);
    let len = match std::fs::metadata(&file) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KdatError::NoCache { status })
        }
        Err(source) => return Err(KdatError::Read { path: file, source }),
    };
    if len > MAX_KDAT_BYTES {
        return Err(KdatError::TooLarge { bytes: len });
    }
    std::fs::read(&file).map_err(|source| KdatError::Read { path: file, source })
}

/// Writes `bytes` as `dir/name`: a temporary file (mode 0600, as CRIU makes its cache), synced,
/// renamed over the old one, so that a CRIU starting meanwhile reads the old file or the new
/// one, never a part.
fn install(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KdatError> {
    let tmp = dir.join(format!("{name}.mig-{}", std::process::id()));
    let file = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        KdatError::Write { path: file, source }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btime_line() {
        let text = "cpu  1 2 3\nintr 5\nctxt 9\nbtime 1796158793\nprocesses 12\n";
        assert_eq!(parse_btime(text), Some(1796158793));
        assert_eq!(parse_btime("cpu 1\n"), None);
        assert_eq!(parse_btime("btime x\n"), None);
    }

    #[test]
    fn refresh_when_missing_older_than_boot_or_criu() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let boot = t(1000);
        assert!(needs_refresh(None, boot, Some(t(10))));
        assert!(needs_refresh(Some(t(999)), boot, Some(t(10))));
        assert!(needs_refresh(Some(t(1500)), boot, Some(t(1600))));
        assert!(!needs_refresh(Some(t(1500)), boot, Some(t(1400))));
        assert!(!needs_refresh(Some(t(1500)), boot, None));
    }

    #[test]
    fn boot_time_is_in_the_past() {
        assert!(boot_time().unwrap() < SystemTime::now());
    }

    /// The probe against the real CRIU, into a temporary directory (not a tmpfs), so that the
    /// host's own cache is not touched.
    #[test]
    fn probe_writes_a_cache_into_a_plain_directory() {
        let Ok(criu) = Criu::locate() else { return };
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        if is_tmpfs(dir.path()).unwrap() {
            return;
        }
        let out = ensure_in(&criu, dir.path(), false).unwrap();
        let KdatOutcome::Written { bytes, .. } = out else {
            panic!("{out:?}")
        };
        let meta = std::fs::metadata(dir.path().join(KDAT_NAME)).unwrap();
        assert_eq!(meta.len(), bytes);
        assert!(bytes > 0);
        assert_eq!(
            ensure_in(&criu, dir.path(), false).unwrap(),
            KdatOutcome::Fresh
        );
        // Nothing else was left in the directory (no temporary file).
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [KDAT_NAME, KDAT_SOURCE]);
        // Made for another binary (another CRIU build, MIG_CRIU elsewhere): made again.
        std::fs::write(dir.path().join(KDAT_SOURCE), "/usr/sbin/criu dev 1 ino 2\n").unwrap();
        assert!(matches!(
            ensure_in(&criu, dir.path(), false).unwrap(),
            KdatOutcome::Written { .. }
        ));
        // Deleted, as another CRIU build does when it finds it: made again.
        std::fs::remove_file(dir.path().join(KDAT_NAME)).unwrap();
        assert!(matches!(
            ensure_in(&criu, dir.path(), false).unwrap(),
            KdatOutcome::Written { .. }
        ));
        assert_eq!(
            ensure_in(&criu, dir.path(), false).unwrap(),
            KdatOutcome::Fresh
        );
    }
}
