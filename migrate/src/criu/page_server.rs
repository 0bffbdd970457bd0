//! CRIU processes that run alongside a migration instead of to completion:
//!
//! - `criu page-server`: the destination side of a dump that sends its memory pages over a
//!   socket (`DumpOpts::page_server`) instead of writing them into the source's images directory;
//!   it writes `pagemap-*.img` and `pages-*.img` into its own images directory;
//! - a post-copy dump (`criu dump --lazy-pages`): writes every image but memory, then serves the
//!   pages on demand until the destination has them all ([`Criu::dump_lazy`]);
//! - `criu lazy-pages`: the destination's daemon that fetches those pages for a restore started
//!   with `RestoreOpts::lazy_pages` ([`Criu::lazy_pages`]).
//!
//! Each is started with `--status-fd` and returned once CRIU reports it ready.

use super::opts::{push, resolve};
use super::{error_lines, stats, sys, Criu, CriuError, DumpOpts, DumpStats, PageTarget};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// CRIU's lazy page server sizes its pipes to a few MiB; with a smaller
/// `/proc/sys/fs/pipe-max-size` it fails (`page-pipe: splice: -1: Bad file descriptor`).
pub const LAZY_PIPE_MAX_SIZE: u64 = 16 << 20;
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// How to run a page server.
#[derive(Debug, Clone)]
pub struct PageServerOpts {
    /// Where received pages are written (created if missing).
    pub images_dir: PathBuf,
    /// `Tcp`: listen on `address:port`; `Socket`: serve one already connected stream socket.
    pub listen: PageTarget,
    /// Relative paths are relative to `images_dir`.
    pub log_file: PathBuf,
    /// How long to wait for the server to be ready.
    pub ready_timeout: Duration,
}

/// How to run the destination's lazy-pages daemon.
#[derive(Debug, Clone)]
pub struct LazyPagesOpts {
    /// The images directory the lazy restore uses (its socket is created there).
    pub images_dir: PathBuf,
    /// Where the source's post-copy dump serves pages.
    pub source: PageTarget,
    pub log_file: PathBuf,
    pub ready_timeout: Duration,
    /// A descriptor the daemon inherits and never uses: a second descriptor of the other end of
    /// its page socket (`Tunnel::socketpair_guarded`), so that the daemon does not see that
    /// socket end when the process carrying it dies. Without it, the daemon would give up and
    /// the kernel would map zero pages where the restored tasks' memory is still missing; with
    /// it, their faults wait until someone kills the container (then the daemon).
    pub hold: Option<RawFd>,
}

fn target_args(a: &mut Vec<OsString>, t: &PageTarget) {
    match t {
        PageTarget::Tcp { address, port } => {
            push(a, "--address", address);
            push(a, "--port", port.to_string());
        }
        PageTarget::Socket(fd) => push(a, "--ps-socket", fd.to_string()),
    }
}

fn target_fd(t: &PageTarget) -> Option<RawFd> {
    match t {
        PageTarget::Socket(fd) => Some(*fd),
        PageTarget::Tcp { .. } => None,
    }
}

impl PageServerOpts {
    /// The argument list of `criu` (without the program name).
    pub fn args(&self, status_fd: RawFd) -> Vec<OsString> {
        let mut a = daemon_args("page-server", &self.images_dir, &self.log_file, status_fd);
        target_args(&mut a, &self.listen);
        a
    }
}

impl LazyPagesOpts {
    /// The argument list of `criu` (without the program name).
    pub fn args(&self, status_fd: RawFd) -> Vec<OsString> {
        let mut a = daemon_args("lazy-pages", &self.images_dir, &self.log_file, status_fd);
        a.push("--page-server".into());
        target_args(&mut a, &self.source);
        a
    }

    /// The argument list of a daemon that serves the pages of its own images directory
    /// (no page server: `source` is not used).
    pub fn local_args(&self, status_fd: RawFd) -> Vec<OsString> {
        daemon_args("lazy-pages", &self.images_dir, &self.log_file, status_fd)
    }
}

/// The arguments every background CRIU command starts with: the command, its images directory,
/// its log (relative names resolve in the images directory), verbosity and status descriptor.
fn daemon_args(
    command: &str,
    images_dir: &Path,
    log_file: &Path,
    status_fd: RawFd,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![command.into()];
    push(&mut a, "--images-dir", images_dir);
    push(&mut a, "--log-file", resolve(images_dir, log_file));
    a.push("-v4".into());
    push(&mut a, "--status-fd", status_fd.to_string());
    a
}

/// A CRIU process running in the background (page server, lazy-pages daemon, post-copy dump).
/// Killed and reaped on drop unless [`Background::wait`] was called.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    op: &'static str,
    log: PathBuf,
}

impl Background {
    /// PID of the `criu` process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited, and if so whether it succeeded; `None` while it runs.
    /// (The status is kept: [`Background::wait`] still reports it.)
    pub fn try_exited(&mut self) -> Option<bool> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.success())
    }

    /// Waits until the process exits and reports how.
    pub fn wait(mut self) -> Result<(), CriuError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child.wait().map_err(|source| CriuError::Spawn {
            path: PathBuf::from("criu"),
            source,
        })?;
        if status.success() {
            return Ok(());
        }
        Err(CriuError::Failed {
            op: self.op,
            status,
            log: self.log.clone(),
            errors: error_lines(&self.log),
        })
    }
}

impl Background {
    /// [`Background::wait`] for at most `timeout`; a process still running then is killed and
    /// reported as [`CriuError::Timeout`].
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<(), CriuError> {
        let start = Instant::now();
        loop {
            let Some(child) = self.child.as_mut() else {
                return Ok(());
            };
            match child.try_wait() {
                Ok(Some(_)) => return self.wait(),
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    if let Some(mut c) = self.child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(CriuError::Timeout {
                        op: self.op,
                        waited_ms: start.elapsed().as_millis() as u64,
                        log: self.log.clone(),
                        errors: error_lines(&self.log),
                    });
                }
                Err(source) => {
                    return Err(CriuError::Spawn {
                        path: PathBuf::from("criu"),
                        source,
                    })
                }
            }
        }
    }

    /// Whether the process has exited (without reaping it for [`Background::wait`]).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A post-copy dump serving memory pages; see [`Criu::dump_lazy`].
#[derive(Debug)]
pub struct LazyDump {
    process: Background,
    images_dir: PathBuf,
    started: Instant,
}

impl LazyDump {
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Waits until the destination has fetched every page and the dump ended. CRIU 4.1.1 leaves
    /// the counters and timings of a post-copy dump's `stats-dump` empty or meaningless; only
    /// `wall_time_us` (from the start of the dump to the last page) is reliable.
    pub fn wait(self) -> Result<DumpStats, CriuError> {
        self.process.wait()?;
        let wall = self.started.elapsed();
        // Every page was served; statistics missing or unreadable are not worth failing for.
        let mut s = stats::read_stats(&self.images_dir.join(super::STATS_DUMP))
            .ok()
            .and_then(|e| e.dump)
            .unwrap_or_default();
        s.wall_time_us = wall.as_micros() as u64;
        Ok(s)
    }
}

impl Criu {
    /// Starts `criu page-server` and returns once it listens (or holds its socket).
    pub fn page_server(&self, opts: &PageServerOpts) -> Result<Background, CriuError> {
        create_dir(&opts.images_dir)?;
        let log = resolve(&opts.images_dir, &opts.log_file);
        self.spawn_ready(
            "page-server",
            |fd| opts.args(fd),
            &Vec::from_iter(target_fd(&opts.listen)),
            None,
            &log,
            opts.ready_timeout,
        )
    }

    /// Starts the destination's `criu lazy-pages` daemon; returns once its socket for the lazy
    /// restore exists.
    pub fn lazy_pages(&self, opts: &LazyPagesOpts) -> Result<Background, CriuError> {
        self.lazy_pages_in(opts, None)
    }

    /// [`Criu::lazy_pages`] with CRIU's work directory at `work_dir` (`--work-dir`): the daemon
    /// creates `lazy-pages.socket` there instead of in the images directory, which then holds
    /// nothing but the image set; the lazy restore must run with the same work directory
    /// ([`RestoreOpts::work_dir`](super::RestoreOpts::work_dir)).
    pub fn lazy_pages_in(
        &self,
        opts: &LazyPagesOpts,
        work_dir: Option<&Path>,
    ) -> Result<Background, CriuError> {
        check_pipe_max_size()?;
        if let Some(w) = work_dir {
            create_dir(w)?;
        }
        let log = resolve(&opts.images_dir, &opts.log_file);
        self.spawn_ready(
            "lazy-pages",
            |fd| {
                let mut a = opts.args(fd);
                if let Some(w) = work_dir {
                    push(&mut a, "--work-dir", w);
                }
                a
            },
            &Vec::from_iter(target_fd(&opts.source).into_iter().chain(opts.hold)),
            None,
            &log,
            opts.ready_timeout,
        )
    }

    /// Starts a `criu lazy-pages` daemon that serves the pages already in `opts.images_dir`
    /// (`opts.source` is ignored): a restore with `--lazy-pages` and the same `work_dir` then
    /// resumes the tree before its memory is copied, and the daemon copies it in the
    /// background and on demand. Returns once its socket exists.
    pub fn lazy_pages_local(
        &self,
        opts: &LazyPagesOpts,
        work_dir: &Path,
    ) -> Result<Background, CriuError> {
        check_pipe_max_size()?;
        create_dir(work_dir)?;
        let log = resolve(&opts.images_dir, &opts.log_file);
        self.spawn_ready(
            "lazy-pages",
            |fd| {
                let mut a = opts.local_args(fd);
                push(&mut a, "--work-dir", work_dir);
                a
            },
            &[],
            None,
            &log,
            opts.ready_timeout,
        )
    }

    /// Starts a post-copy dump of `opts` that serves memory pages at `serve` (`--lazy-pages`);
    /// returns once every other image is written to `opts.images_dir` and CRIU serves pages.
    /// The tree stays frozen until [`LazyDump::wait`] reports that every page was fetched (then
    /// it is killed, or left running with `leave_running`).
    pub fn dump_lazy(
        &self,
        opts: &DumpOpts,
        serve: &PageTarget,
        ready_timeout: Duration,
    ) -> Result<LazyDump, CriuError> {
        check_pipe_max_size()?;
        super::fresh_images_dir(&opts.images_dir)?;
        let log = resolve(&opts.images_dir, &opts.log_file);
        let started = Instant::now();
        let process = self.spawn_ready(
            "dump",
            |fd| {
                let mut a = opts.args();
                push(&mut a, "--status-fd", fd.to_string());
                a.push("--lazy-pages".into());
                target_args(&mut a, serve);
                a
            },
            &Vec::from_iter(target_fd(serve)),
            opts.smaps_dir.as_deref(),
            &log,
            ready_timeout,
        )?;
        super::timerfd::rearm_after_dump(&opts.images_dir);
        Ok(LazyDump {
            process,
            images_dir: opts.images_dir.clone(),
            started,
        })
    }

    /// Spawns `criu` with a status pipe and waits for its ready byte.
    fn spawn_ready(
        &self,
        op: &'static str,
        args: impl FnOnce(RawFd) -> Vec<OsString>,
        extra_fds: &[RawFd],
        smaps_dir: Option<&Path>,
        log: &Path,
        timeout: Duration,
    ) -> Result<Background, CriuError> {
        let (status_r, status_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(CriuError::StatusPipe)?;
        let status_fd = status_w.as_raw_fd();
        let mut fds = vec![status_fd];
        for &fd in extra_fds {
            super::check_fd(fd)?;
            fds.push(fd);
        }
        let mut cmd = Command::new(self.path());
        cmd.args(args(status_fd))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(dir) = smaps_dir {
            cmd.env(super::smaps::SMAPS_DIR, dir);
        }
        sys::prepare_child(&mut cmd, Vec::new(), fds);
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            path: self.path().to_owned(),
            source,
        })?;
        drop(status_w);
        // A container's memory depends on these while they run (a post-copy, a lazy restore's
        // daemon): the kernel's OOM killer must take something else first.
        if let Err(e) = std::fs::write(format!("/proc/{}/oom_score_adj", child.id()), "-1000") {
            // Lowering it needs CAP_SYS_RESOURCE, which root lacks on some hosts.
            tracing::info!(op, error = %e, "cannot protect the CRIU helper from the OOM killer");
        }
        let process = Background {
            child: Some(child),
            op,
            log: log.to_owned(),
        };
        // CRIU writes one byte to the status fd once ready; EOF means it failed first.
        let start = Instant::now();
        let ready = wait_readable(&status_r, timeout)
            && nix::unistd::read(status_r.as_raw_fd(), &mut [0u8; 1]).is_ok_and(|n| n == 1);
        if !ready {
            drop(process);
            return Err(CriuError::NotReady {
                op,
                waited_ms: start.elapsed().as_millis() as u64,
                log: log.to_owned(),
                errors: error_lines(log),
            });
        }
        Ok(process)
    }
}

fn create_dir(dir: &Path) -> Result<(), CriuError> {
    std::fs::create_dir_all(dir).map_err(|source| CriuError::ImagesDir {
        path: dir.to_owned(),
        source,
    })
}

/// Refuses post-copy when `/proc/sys/fs/pipe-max-size` is below [`LAZY_PIPE_MAX_SIZE`].
pub fn check_pipe_max_size() -> Result<(), CriuError> {
    let current = std::fs::read_to_string(PIPE_MAX_SIZE)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if current < LAZY_PIPE_MAX_SIZE {
        return Err(CriuError::PipeMaxSize {
            current,
            needed: LAZY_PIPE_MAX_SIZE,
        });
    }
    Ok(())
}

fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}
