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
//! missing, older than this boot (`btime` in `/proc/stat`) or older than the CRIU binary, it
//! runs `criu check` in a thread with its own mount namespace that has a tmpfs on `/run` (so
//! CRIU keeps its cache there), and copies the file into the real `/run` under a temporary
//! name, renamed over `criu.kdat`. Where `/run` is a tmpfs nothing is done: CRIU manages its
//! cache itself. docs/criu.md ("Kerndat cache") says what this means for CRIU run by hand.

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
    /// The cache is from this boot and newer than the CRIU binary.
    Fresh,
    /// The cache was (re)written: `bytes` long, `criu check` took `check_ms`.
    Written { bytes: u64, check_ms: u64 },
}

/// Makes sure `criu` finds a kerndat cache of this boot in [`KDAT_DIR`] (see the module doc).
/// Blocking (about 100 ms when it runs `criu check`); meant for an agent's start, before
/// other threads run CRIU.
pub fn ensure(criu: &Criu) -> Result<KdatOutcome, KdatError> {
    ensure_in(criu, Path::new(KDAT_DIR), false)
}

/// [`ensure`] with the cache directory given, and `force` to rewrite a fresh file.
pub fn ensure_in(criu: &Criu, dir: &Path, force: bool) -> Result<KdatOutcome, KdatError> {
    if is_tmpfs(dir)? {
        return Ok(KdatOutcome::Tmpfs);
    }
    let file = dir.join(KDAT_NAME);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if !force && !needs_refresh(mtime(&file), boot_time()?, mtime(criu.path())) {
        return Ok(KdatOutcome::Fresh);
    }
    let start = Instant::now();
    let bytes = probe(criu)?;
    let check_ms = start.elapsed().as_millis() as u64;
    let len = bytes.len() as u64;
    install(dir, &bytes)?;
    Ok(KdatOutcome::Written {
        bytes: len,
        check_ms,
    })
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

/// Writes `bytes` as `dir/criu.kdat`: a temporary file (mode 0600, as CRIU makes it), synced,
/// renamed over the old one, so that a CRIU starting meanwhile reads the old file or the new
/// one, never a part.
fn install(dir: &Path, bytes: &[u8]) -> Result<(), KdatError> {
    let tmp = dir.join(format!("{KDAT_NAME}.mig-{}", std::process::id()));
    let file = dir.join(KDAT_NAME);
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
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KDAT_NAME]);
    }
}
