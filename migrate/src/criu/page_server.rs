//! `criu page-server`: the destination side of a dump that sends its memory pages over a socket
//! (`DumpOpts::page_server`) instead of writing them into the source's images directory. The page
//! server writes `pagemap-*.img` and `pages-*.img` into its own images directory; the other images
//! follow by other means (the image set transfer).

use super::opts::{push, resolve};
use super::{error_lines, sys, Criu, CriuError, PageTarget};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to run a page server.
#[derive(Debug, Clone)]
pub struct PageServerOpts {
    /// Where received pages are written (created if missing).
    pub images_dir: PathBuf,
    /// `Tcp`: listen on `address:port`; `Socket`: serve one already connected stream socket.
    pub listen: PageTarget,
    /// Relative paths are relative to `images_dir`.
    pub log_file: PathBuf,
    /// How long [`Criu::page_server`] waits for the server to be ready.
    pub ready_timeout: Duration,
}

impl PageServerOpts {
    /// The argument list of `criu` (without the program name), reporting readiness on
    /// `status_fd`.
    pub fn args(&self, status_fd: i32) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["page-server".into()];
        push(&mut a, "--images-dir", &self.images_dir);
        push(
            &mut a,
            "--log-file",
            resolve(&self.images_dir, &self.log_file),
        );
        a.push("-v4".into());
        push(&mut a, "--status-fd", status_fd.to_string());
        match &self.listen {
            PageTarget::Tcp { address, port } => {
                push(&mut a, "--address", address);
                push(&mut a, "--port", port.to_string());
            }
            PageTarget::Socket(fd) => push(&mut a, "--ps-socket", fd.to_string()),
        }
        a
    }
}

/// A running `criu page-server`; it exits by itself when the dump disconnects. Killed and reaped
/// on drop unless [`PageServer::wait`] was called.
#[derive(Debug)]
pub struct PageServer {
    child: Option<Child>,
    log: PathBuf,
}

impl PageServer {
    /// PID of the `criu page-server` process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the page server exits (after the dump finished sending) and reports how.
    pub fn wait(mut self) -> Result<(), CriuError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child.wait().map_err(|source| CriuError::Spawn {
            path: PathBuf::from("criu page-server"),
            source,
        })?;
        if status.success() {
            return Ok(());
        }
        Err(CriuError::Failed {
            op: "page-server",
            status,
            log: self.log.clone(),
            errors: error_lines(&self.log),
        })
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Criu {
    /// Starts `criu page-server` and returns once it listens (or holds its socket).
    pub fn page_server(&self, opts: &PageServerOpts) -> Result<PageServer, CriuError> {
        std::fs::create_dir_all(&opts.images_dir).map_err(|source| CriuError::ImagesDir {
            path: opts.images_dir.clone(),
            source,
        })?;
        let log = resolve(&opts.images_dir, &opts.log_file);
        let (status_r, status_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(CriuError::StatusPipe)?;
        let status_fd = std::os::fd::AsRawFd::as_raw_fd(&status_w);
        let mut fds = vec![status_fd];
        if let PageTarget::Socket(fd) = opts.listen {
            super::check_fd(fd)?;
            fds.push(fd);
        }
        let mut cmd = Command::new(self.path());
        cmd.args(opts.args(status_fd))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        sys::prepare_child(&mut cmd, Vec::new(), fds);
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            path: self.path().to_owned(),
            source,
        })?;
        drop(status_w);
        let mut server = PageServer {
            child: Some(child),
            log: log.clone(),
        };
        // CRIU writes one byte to the status fd once it listens; EOF means it died first.
        let start = Instant::now();
        let ready = wait_readable(&status_r, opts.ready_timeout)
            && nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&status_r), &mut [0u8; 1])
                .is_ok_and(|n| n == 1);
        if !ready {
            drop(server.child.take().map(|mut c| {
                let _ = c.kill();
                c.wait()
            }));
            return Err(CriuError::PageServerStart {
                waited_ms: start.elapsed().as_millis() as u64,
                log: log.clone(),
                errors: error_lines(&log),
            });
        }
        Ok(std::mem::replace(
            &mut server,
            PageServer { child: None, log },
        ))
    }
}

fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}
