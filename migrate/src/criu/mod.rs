//! The CRIU driver: runs the `criu` command for dump and restore, with its logs in files.
//!
//! mig drives the `criu` binary rather than its RPC (`criu swrk`, rust-criu): the command has every
//! option mig needs (feature checks, page server, lazy pages, pidfile), its log is a file the user
//! can read, and a failure is explained by the log's last error lines, which [`CriuError`] carries.
//! docs/criu.md lists the options and why each is used.

pub mod kdat;
pub mod lazy_proxy;
mod log;
mod netns;
mod opts;
mod page_server;
pub mod page_writer;
mod protobuf;
pub mod pstree;
pub mod smaps;
pub mod stats;
mod sys;
pub mod timerfd;

pub use log::{error_lines, pick_error_lines, MAX_ERROR_LINES};
pub use netns::{images_external_netns, NetnsImageError, MAX_NETNS_IMAGE_BYTES};
pub use opts::{resolve, ActionScript, DumpOpts, PageTarget, RestoreOpts, ACTION_SCRIPT_ONLY};
pub use page_server::{
    check_pipe_max_size, Background, LazyDump, LazyPagesOpts, PageServerOpts, LAZY_PIPE_MAX_SIZE,
};
pub use stats::{DumpStats, RestoreStats, StatsError};

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

/// Where [`Criu::locate`] looks after `$MIG_CRIU`, before `PATH`.
pub const DEFAULT_CRIU: &str = "/usr/local/sbin/criu";
/// The oldest CRIU major version mig works with.
pub const MIN_MAJOR: u32 = 4;
/// File name of the dump statistics CRIU writes into the images directory.
pub const STATS_DUMP: &str = "stats-dump";
/// File name of the restore statistics CRIU writes into the images directory.
pub const STATS_RESTORE: &str = "stats-restore";

/// Why a CRIU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("criu not found (looked at {tried:?}); run scripts/setup.sh or set MIG_CRIU")]
    NotFound { tried: Vec<PathBuf> },
    #[error("cannot run {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the version of {path} from {output:?}")]
    VersionParse { path: PathBuf, output: String },
    #[error("{path} is criu {version}; mig needs criu {MIN_MAJOR} or newer")]
    TooOld { path: PathBuf, version: String },
    #[error("criu check failed ({status}): {}", lines.join("; "))]
    Check {
        status: ExitStatus,
        lines: Vec<String>,
    },
    #[error("cannot create images directory {path}")]
    ImagesDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("images directory {path} is not empty")]
    ImagesDirNotEmpty { path: PathBuf },
    #[error("descriptor {fd} to inherit is not open, or is 0-2 (criu's own stdio)")]
    InheritFd { fd: i32 },
    #[error("path contains a NUL byte: {path}")]
    Nul { path: PathBuf },
    #[error("criu {op} failed ({status}), log {log}: {}", errors.join(" | "))]
    Failed {
        op: &'static str,
        status: ExitStatus,
        log: PathBuf,
        /// The last error lines of the log (at most [`MAX_ERROR_LINES`]).
        errors: Vec<String>,
    },
    #[error("cannot read the restored pid from {path}: {content:?}")]
    Pidfile { path: PathBuf, content: String },
    #[error("cannot read criu statistics")]
    Stats(#[source] StatsError),
    #[error("cannot create the page server's status pipe")]
    StatusPipe(#[source] nix::errno::Errno),
    #[error("criu {op} did not become ready ({waited_ms} ms), log {log}: {}", errors.join(" | "))]
    NotReady {
        op: &'static str,
        waited_ms: u64,
        log: PathBuf,
        errors: Vec<String>,
    },
    #[error("criu {op} did not finish within {waited_ms} ms (killed), log {log}: {}", errors.join(" | "))]
    Timeout {
        op: &'static str,
        waited_ms: u64,
        log: PathBuf,
        errors: Vec<String>,
    },
    #[error("/proc/sys/fs/pipe-max-size is {current}; post-copy needs at least {needed} (run scripts/setup.sh)")]
    PipeMaxSize { current: u64, needed: u64 },
}

impl CriuError {
    /// The error without the lines of CRIU's log it carries (`criu lazy-pages failed (signal: 9
    /// (SIGKILL)), log PATH`): one short line for a container's `reason`, where the whole error
    /// (in the agent's log) would bury the cause.
    pub fn brief(&self) -> String {
        match self {
            CriuError::Failed {
                op, status, log, ..
            } => format!("criu {op} failed ({status}), log {}", log.display()),
            CriuError::NotReady {
                op, waited_ms, log, ..
            } => format!(
                "criu {op} did not become ready ({waited_ms} ms), log {}",
                log.display()
            ),
            CriuError::Timeout {
                op, waited_ms, log, ..
            } => format!(
                "criu {op} did not finish within {waited_ms} ms (killed), log {}",
                log.display()
            ),
            e => e.to_string(),
        }
    }
}

/// What a restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Host PID of the restored root task (the container's init).
    pub pid: i32,
    pub stats: RestoreStats,
}

/// A CRIU binary mig has checked the version of.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
    version: String,
}

impl Criu {
    /// Finds CRIU: `$MIG_CRIU` when set (then only there), else [`DEFAULT_CRIU`], else `criu` in
    /// `PATH`. Refuses versions older than [`MIN_MAJOR`].
    pub fn locate() -> Result<Criu, CriuError> {
        let mut tried = Vec::new();
        let candidates: Vec<PathBuf> = match std::env::var_os("MIG_CRIU") {
            Some(p) if !p.is_empty() => vec![PathBuf::from(p)],
            _ => {
                let mut c = vec![PathBuf::from(DEFAULT_CRIU)];
                if let Some(path) = std::env::var_os("PATH") {
                    c.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
                }
                c
            }
        };
        for c in candidates {
            if is_executable(&c) {
                return Criu::at(&c);
            }
            tried.push(c);
        }
        Err(CriuError::NotFound { tried })
    }

    /// Uses the CRIU binary at `path`, checking its version. The version is asked once per
    /// process and binary (`criu --version` costs a few milliseconds, in every dump otherwise):
    /// it is asked again when the file at `path` changes (device, inode, size or modification
    /// time). A process started by an agent also trusts the agent's answer for the very same
    /// file, handed down in [`KNOWN_ENV`] (see [`Criu::known_token`]).
    pub fn at(path: &Path) -> Result<Criu, CriuError> {
        static KNOWN: std::sync::Mutex<Vec<(PathBuf, FileId, Criu)>> =
            std::sync::Mutex::new(Vec::new());
        let id = file_id(path);
        if let Some(id) = id {
            let known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, _, c)) = known.iter().find(|(p, i, _)| p == path && *i == id) {
                return Ok(c.clone());
            }
        }
        let handed = std::env::var(KNOWN_ENV)
            .ok()
            .and_then(|t| parse_known(&t))
            .filter(|(_, i, p)| p == path && Some(*i) == id);
        let criu = match handed {
            Some((version, _, _)) => Criu::with_version(path, version)?,
            None => Criu::ask_version(path)?,
        };
        if let Some(id) = id {
            let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
            known.retain(|(p, _, _)| p != path);
            known.push((path.to_owned(), id, criu.clone()));
        }
        Ok(criu)
    }

    /// The value of [`KNOWN_ENV`] that hands this checked binary to a child process: its
    /// version, the file's identity and its path (`None` when the file cannot be read).
    pub fn known_token(&self) -> Option<String> {
        let (dev, ino, len, mtime, nsec) = file_id(&self.path)?;
        let path = self.path.to_str()?;
        Some(format!(
            "{} {dev} {ino} {len} {mtime} {nsec} {path}",
            self.version
        ))
    }

    /// Runs `criu --version` and checks the version.
    fn ask_version(path: &Path) -> Result<Criu, CriuError> {
        let spawn = |source| CriuError::Spawn {
            path: path.to_owned(),
            source,
        };
        let out = Command::new(path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(spawn)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version = parse_version(&text).ok_or_else(|| CriuError::VersionParse {
            path: path.to_owned(),
            output: text.chars().take(200).collect(),
        })?;
        Criu::with_version(path, version)
    }

    /// The binary at `path` of `version`, refused when older than [`MIN_MAJOR`].
    fn with_version(path: &Path, version: String) -> Result<Criu, CriuError> {
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < MIN_MAJOR {
            return Err(CriuError::TooOld {
                path: path.to_owned(),
                version,
            });
        }
        Ok(Criu {
            path: path.to_owned(),
            version,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version, e.g. `4.1.1`.
    pub fn version(&self) -> Result<String, CriuError> {
        Ok(self.version.clone())
    }

    /// Runs `criu check` (kernel support for everything a dump and restore need).
    pub fn check(&self) -> Result<(), CriuError> {
        let out = Command::new(&self.path)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CriuError::Spawn {
                path: self.path.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        Err(CriuError::Check {
            status: out.status,
            lines: pick_error_lines(&text),
        })
    }

    /// Dumps the tree rooted at `opts.pid` into `opts.images_dir`. Unless `leave_running`, the tree
    /// is gone afterwards.
    pub fn dump(&self, opts: &DumpOpts) -> Result<DumpStats, CriuError> {
        fresh_images_dir(&opts.images_dir)?;
        let mut cmd = Command::new(&self.path);
        cmd.args(opts.args());
        if let Some(dir) = &opts.smaps_dir {
            cmd.env(smaps::SMAPS_DIR, dir);
        }
        if let Some(PageTarget::Socket(fd)) = opts.page_server {
            check_fd(fd)?;
            sys::prepare_child(&mut cmd, Vec::new(), vec![fd]);
        }
        let stats = self.run_dump(&mut cmd, "dump", opts)?;
        timerfd::rearm_after_dump(&opts.images_dir);
        Ok(stats)
    }

    /// One pre-copy iteration, `criu pre-dump` (see [`DumpOpts::pre_dump_args`]): the tree keeps
    /// running; `opts.images_dir` gets the pages changed since `opts.prev_images_dir` (all of
    /// them in a first round) and a `parent` link to it. The statistics say how many pages were
    /// written (`pages_written`): the dirty set of this round. Fails on a kernel without
    /// soft-dirty tracking: CRIU 4.2.1 refuses the explicit `--track-mem` ("Tracking memory is
    /// not available"; without the flag it would stop later at `BUG at criu/mem.c:46`).
    pub fn pre_dump(&self, opts: &DumpOpts) -> Result<DumpStats, CriuError> {
        fresh_images_dir(&opts.images_dir)?;
        let mut cmd = Command::new(&self.path);
        cmd.args(opts.pre_dump_args());
        self.run_dump(&mut cmd, "pre-dump", opts)
    }

    /// Runs a dump or pre-dump command and reads its statistics, with the wall time around it.
    fn run_dump(
        &self,
        cmd: &mut Command,
        what: &'static str,
        opts: &DumpOpts,
    ) -> Result<DumpStats, CriuError> {
        let log = resolve(&opts.images_dir, &opts.log_file);
        let start = Instant::now();
        self.run(cmd, what, &log)?;
        let wall = start.elapsed();
        let entry =
            stats::read_stats(&opts.images_dir.join(STATS_DUMP)).map_err(CriuError::Stats)?;
        let mut s = entry.dump.unwrap_or_default();
        s.wall_time_us = wall.as_micros() as u64;
        Ok(s)
    }

    /// Restores the image set in `opts.images_dir` detached: when this returns, the restored tree
    /// runs and its root has been re-parented to the caller's nearest subreaper (the shim, when
    /// it set `PR_SET_CHILD_SUBREAPER`).
    pub fn restore(&self, opts: &RestoreOpts) -> Result<RestoreOutcome, CriuError> {
        let log = resolve(&opts.images_dir, &opts.log_file);
        let pidfile = resolve(&opts.images_dir, &opts.pidfile);
        let mut fds = Vec::new();
        for (fd, _) in &opts.inherit_fds {
            check_fd(*fd)?;
            fds.push(*fd);
        }
        let mut procs = Vec::new();
        for p in &opts.cgroup_procs {
            procs.push(
                CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| CriuError::Nul { path: p.clone() })?,
            );
        }
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new(&self.path);
        cmd.args(opts.args());
        if let Some(s) = &opts.action_script {
            cmd.env(ACTION_SCRIPT_ONLY, s.actions.join(","));
        }
        sys::prepare_child(&mut cmd, procs, fds);
        let start = Instant::now();
        self.run(&mut cmd, "restore", &log)?;
        let wall = start.elapsed();
        let content = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let pid = content
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| CriuError::Pidfile {
                path: pidfile.clone(),
                content: content.chars().take(64).collect(),
            })?;
        // A restore is done by now; missing statistics are not worth failing it for.
        let mut stats = stats::read_stats(&opts.images_dir.join(STATS_RESTORE))
            .ok()
            .and_then(|e| e.restore)
            .unwrap_or_default();
        stats.wall_time_us = wall.as_micros() as u64;
        Ok(RestoreOutcome { pid, stats })
    }

    fn run(&self, cmd: &mut Command, op: &'static str, log: &Path) -> Result<(), CriuError> {
        let out = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| CriuError::Spawn {
                path: self.path.clone(),
                source,
            })?;
        tracing::debug!(op, status = %out.status, log = %log.display(), "criu finished");
        if out.status.success() {
            return Ok(());
        }
        let mut errors = error_lines(log);
        if errors.is_empty() {
            errors = pick_error_lines(&String::from_utf8_lossy(&out.stderr));
        }
        Err(CriuError::Failed {
            op,
            status: out.status,
            log: log.to_owned(),
            errors,
        })
    }
}

/// The environment variable through which an agent hands the CRIU binary it checked to the
/// processes it starts (the shim's restore), so that they need not run `criu --version` again:
/// [`Criu::known_token`]'s value, trusted only for a file of the same path and identity.
pub const KNOWN_ENV: &str = "MIG_CRIU_KNOWN";

/// A file's identity: device, inode, size, modification time (seconds, nanoseconds).
type FileId = (u64, u64, u64, i64, i64);

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Reads a [`KNOWN_ENV`] value: version, file identity, path.
fn parse_known(token: &str) -> Option<(String, FileId, PathBuf)> {
    let mut it = token.splitn(7, ' ');
    let version = it.next()?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let mut num = || it.next()?.parse::<u64>().ok();
    let (dev, ino, len) = (num()?, num()?, num()?);
    let mtime = it.next()?.parse::<i64>().ok()?;
    let nsec = it.next()?.parse::<i64>().ok()?;
    let path = PathBuf::from(it.next().filter(|p| p.starts_with('/'))?);
    Some((version.to_owned(), (dev, ino, len, mtime, nsec), path))
}

/// Creates the images directory of a dump, refusing one with files in it: images left by an
/// earlier dump would be mixed into the new set.
fn fresh_images_dir(dir: &Path) -> Result<(), CriuError> {
    let err = |source| CriuError::ImagesDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    if std::fs::read_dir(dir).map_err(err)?.next().is_some() {
        return Err(CriuError::ImagesDirNotEmpty {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// A descriptor handed to the `criu` child must be open and not one of its stdio.
fn check_fd(fd: i32) -> Result<(), CriuError> {
    if fd < 3 || !sys::fd_is_open(fd) {
        return Err(CriuError::InheritFd { fd });
    }
    Ok(())
}

fn parse_version(text: &str) -> Option<String> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let ok = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    ok.then(|| v.to_owned())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `pipe:[INO]` when descriptor 1 of `pid` is a pipe: what the image set records as
/// `stdio_pipe` and what [`RestoreOpts::inherit_fds`] names on restore.
pub fn stdout_pipe(pid: i32) -> Option<String> {
    pipe_name(&std::fs::read_link(format!("/proc/{pid}/fd/1")).ok()?)
}

/// `pipe:[INODE]` when `target` (a `/proc/PID/fd/N` link) names a pipe.
fn pipe_name(target: &Path) -> Option<String> {
    let target = target.to_str()?;
    (target.starts_with("pipe:[") && target.ends_with(']')).then(|| target.to_owned())
}

/// The pipes `pid` holds: (descriptor, `pipe:[INODE]`), by descriptor.
fn pipes_of(pid: i32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut pipes: Vec<(u32, String)> = dir
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, pipe_name(&std::fs::read_link(e.path()).ok()?)?))
        })
        .collect();
    pipes.sort_unstable();
    pipes
}

/// The container's log pipe as CRIU names it, for `--inherit-fd` at the restore: the pipe whose
/// read end the shim `shim_pid` holds (past its own stdio) and whose write end a process of the
/// container holds: the init's stdout, its stderr, its other descriptors, then those of `procs`.
/// The init's stdout is not always the pipe: a shell running `cmd >/dev/null` points its fd 1
/// there and keeps the pipe in fd 10 until `cmd` ends (QA of session 25: dumped then, the
/// restored container wrote into a pipe nobody read and its children died of SIGPIPE). `None`
/// when no process of the container holds the pipe any more. Without a shim, the init's stdout
/// when it is a pipe.
pub fn log_pipe(init_pid: i32, shim_pid: Option<i32>, procs: &[i32]) -> Option<String> {
    let Some(shim) = shim_pid else {
        return stdout_pipe(init_pid);
    };
    let shims: std::collections::HashSet<String> = pipes_of(shim)
        .into_iter()
        .filter(|(fd, _)| *fd > 2)
        .map(|(_, p)| p)
        .collect();
    if shims.is_empty() {
        return stdout_pipe(init_pid);
    }
    let mut init = pipes_of(init_pid);
    // Descriptors 1 and 2 first, the rest in order.
    init.sort_by_key(|(fd, _)| (!matches!(fd, 1 | 2), *fd));
    init.into_iter()
        .chain(
            procs
                .iter()
                .filter(|p| **p != init_pid)
                .flat_map(|p| pipes_of(*p)),
        )
        .map(|(_, p)| p)
        .find(|p| shims.contains(p))
}

/// The kernel release (`uname -r`), recorded in image sets.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
        assert_eq!(
            parse_version("Version: 3.17\nGitID: v3.17\n").as_deref(),
            Some("3.17")
        );
        assert_eq!(parse_version("nonsense"), None);
        assert_eq!(parse_version("Version: 4; rm -rf"), None);
    }

    #[test]
    fn known_tokens() {
        let t = "4.2.1 2049 1234 5000 1796158793 12 /usr/local/sbin/criu";
        let (v, id, p) = parse_known(t).unwrap();
        assert_eq!(v, "4.2.1");
        assert_eq!(id, (2049, 1234, 5000, 1796158793, 12));
        assert_eq!(p, Path::new("/usr/local/sbin/criu"));
        let spaced = parse_known("4.2 1 2 3 4 5 /opt/my criu").unwrap();
        assert_eq!(spaced.2, Path::new("/opt/my criu"));
        assert!(parse_known("4.2; x 1 2 3 4 5 /c").is_none());
        assert!(parse_known("4.2 1 2 3 4 5 relative").is_none());
        assert!(parse_known("4.2 1 2 3").is_none());
        if let Ok(criu) = Criu::locate() {
            let token = criu.known_token().unwrap();
            let (v, id, p) = parse_known(&token).unwrap();
            assert_eq!(
                (v, Some(id), p.as_path()),
                (criu.version.clone(), file_id(criu.path()), criu.path())
            );
        }
    }

    #[test]
    fn stdout_pipe_names_a_pipe_only() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "read x"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let name = stdout_pipe(child.id() as i32).unwrap();
        assert!(name.starts_with("pipe:[") && name.ends_with(']'), "{name}");
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(stdout_pipe(i32::MAX), None);
    }

    #[test]
    fn log_pipe_is_the_one_the_shim_reads() {
        // This test process stands in for the shim: it holds the read end. The child's stdout
        // is not the pipe, which sits in another descriptor (9: dash takes one digit), as a shell
        // leaves it while a command runs with `>/dev/null`.
        let (log_read, log_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let log = format!(
            "pipe:[{}]",
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&log_read))
                .unwrap()
                .st_ino
        );
        let mut child = Command::new("/bin/sh")
            .args(["-c", "exec 9>&2 2>&-; sleep 60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_write))
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // (It may hold other pipes, as this process does: cargo's jobserver.)
        let moved = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            pipes_of(pid).iter().any(|(fd, p)| *fd == 9 && *p == log)
        });
        let found = log_pipe(pid, Some(std::process::id() as i32), &[pid]);
        let alone = log_pipe(pid, None, &[pid]);
        let held = pipes_of(pid);
        let _ = child.kill();
        child.wait().unwrap();
        assert!(moved, "the pipe {log} never moved to fd 9: {held:?}");
        assert_eq!(found, Some(log));
        // Without the shim: the stdout, which is no pipe here.
        assert_eq!(alone, None);
    }

    #[test]
    fn locate_finds_a_recent_criu_and_check_passes() {
        let Ok(criu) = Criu::locate() else {
            eprintln!("criu not installed; skipping");
            return;
        };
        assert!(criu.version().unwrap().starts_with('4'));
        if nix::unistd::geteuid().is_root() {
            criu.check().unwrap();
        }
    }

    #[test]
    fn failed_run_carries_log_lines() {
        let Ok(criu) = Criu::locate() else { return };
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let e = criu
            .dump(&DumpOpts {
                pid: i32::MAX - 1,
                images_dir: dir.path().join("img"),
                log_file: "dump.log".into(),
                ..Default::default()
            })
            .unwrap_err();
        match &e {
            CriuError::Failed {
                op, log, errors, ..
            } => {
                assert_eq!(*op, "dump");
                assert_eq!(log, &dir.path().join("img/dump.log"));
                assert!(
                    !errors.is_empty() && errors.len() <= MAX_ERROR_LINES,
                    "{errors:?}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        eprintln!("{e}");
    }

    /// Whether `criu check --feature mem_dirty_track` passes.
    fn dirty_tracking(criu: &Criu) -> bool {
        Command::new(criu.path())
            .args(["check", "--feature", "mem_dirty_track"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A `sleep` in its own session with stdio on /dev/null, killed and reaped when dropped.
    struct Sleeper(std::process::Child);

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The process state letter of `pid` (`S` sleeping, `R` running, `T`/`t` stopped or traced).
    fn state(pid: i32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?')
    }

    /// Pre-copy's iterations against the real CRIU: with soft-dirty tracking, two pre-dumps
    /// and a final dump chained by `parent` links; without it (this machine), the pre-dump
    /// fails, and so does a dump chained to a parent taken without tracking, and the process
    /// keeps running untouched either way.
    #[test]
    fn pre_dump_rounds_or_a_clear_failure_without_tracking() {
        let Ok(criu) = Criu::locate() else { return };
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("/bin/busybox");
        cmd.args(["sleep", "100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // CRIU dumps a tree whose root leads its session. `busybox setsid` forks instead when
        // its caller leads a process group, which depends on how the tests were started.
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = Sleeper(cmd.spawn().unwrap());
        let pid = child.0.id() as i32;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let round = |n: u32, prev: Option<&str>| DumpOpts {
            pid,
            images_dir: dir.path().join(format!("rounds/{n}")),
            log_file: "pre-dump.log".into(),
            prev_images_dir: prev.map(PathBuf::from),
            ..Default::default()
        };
        let first = criu.pre_dump(&round(1, None));
        if dirty_tracking(&criu) {
            let s1 = first.unwrap();
            assert!(s1.pages_written > 0, "{s1:?}");
            let s2 = criu.pre_dump(&round(2, Some("../1"))).unwrap();
            assert!(s2.pages_written <= s1.pages_written, "{s1:?} {s2:?}");
            let parent = dir.path().join("rounds/2/parent");
            assert_eq!(std::fs::read_link(&parent).unwrap(), Path::new("../1"));
            let fin = criu
                .dump(&DumpOpts {
                    pid,
                    images_dir: dir.path().join("images"),
                    log_file: "dump.log".into(),
                    leave_running: true,
                    track_mem: true,
                    prev_images_dir: Some("../rounds/2".into()),
                    ..Default::default()
                })
                .unwrap();
            assert!(fin.pages_skipped_parent > 0, "{fin:?}");
        } else {
            match &first {
                Err(CriuError::Failed { op, errors, .. }) => {
                    assert_eq!(*op, "pre-dump");
                    eprintln!("pre-dump without soft-dirty tracking: {errors:?}");
                }
                other => panic!("pre-dump without tracking: {other:?}"),
            }
            // A full dump leaving the process running, then one chained to it without
            // --track-mem: CRIU wants the parent's dump time (written only when tracking)
            // for its PID-reuse check, so the chain cannot be built here either.
            criu.dump(&DumpOpts {
                pid,
                images_dir: dir.path().join("full"),
                log_file: "dump.log".into(),
                leave_running: true,
                ..Default::default()
            })
            .unwrap();
            let chained = criu.dump(&DumpOpts {
                pid,
                images_dir: dir.path().join("chained"),
                log_file: "dump.log".into(),
                leave_running: true,
                prev_images_dir: Some("../full".into()),
                ..Default::default()
            });
            match &chained {
                Err(CriuError::Failed { errors, .. }) => {
                    eprintln!("dump chained without tracking: {errors:?}")
                }
                other => panic!("a dump chained without tracking worked here: {other:?}"),
            }
        }
        // Nothing was left frozen or traced: the process still runs (or sleeps).
        let st = state(pid);
        assert!(matches!(st, 'S' | 'R'), "state {st}");
        drop(child);
    }
}
