//! Process file descriptors (`pidfd_open(2)`): a handle on one process that a later process
//! with the same PID number cannot be mistaken for. nix 0.29 has no wrapper for them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd of one process.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd of process `pid`. Only as good as the number: open it while the process is known
    /// to be the one meant (a child not yet reaped, or one just checked by its command line).
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: the system call takes a number and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: `fd` is a descriptor the kernel just gave us, owned by nothing else.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `SIGKILL`; a process that has exited already is not an error.
    pub fn kill(&self) -> io::Result<()> {
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until the process has exited, at most `limit` (`None`: for as long as it takes);
    /// whether it has.
    pub fn wait_exit(&self, limit: Option<Duration>) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let timeout = match limit {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        loop {
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(n) => return Ok(n > 0),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_and_sees_the_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id() as i32).unwrap();
        assert!(!fd.wait_exit(Some(Duration::from_millis(50))).unwrap());
        fd.kill().unwrap();
        assert!(fd.wait_exit(Some(Duration::from_secs(5))).unwrap());
        let _ = child.wait();
        // Reaped: killing it again is no error.
        fd.kill().unwrap();
    }
}
