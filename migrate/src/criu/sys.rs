//! The only unsafe code of the CRIU driver: what the `criu restore` child does between fork and
//! exec. It runs in a forked copy of a possibly multi-threaded process, so it only makes
//! async-signal-safe system calls on data prepared before the fork (no allocation, no locks).

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Arranges for the child of `cmd` to join every cgroup whose `cgroup.procs` path is in `procs`
/// (by writing `0`, "this process") and to keep `fds` open across exec.
pub fn prepare_child(cmd: &mut Command, procs: Vec<CString>, fds: Vec<RawFd>) {
    let hook = move || -> io::Result<()> {
        for path in &procs {
            // SAFETY: `path` is a valid NUL-terminated string owned by the closure; open(2) is
            // async-signal-safe and the returned fd is checked before use.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is the descriptor just opened; the buffer is a 1-byte static string.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = io::Error::last_os_error();
            // SAFETY: `fd` is owned here and closed exactly once.
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        for &fd in &fds {
            // SAFETY: F_SETFD with 0 only clears FD_CLOEXEC on a descriptor number; an invalid
            // number fails with EBADF, which is reported.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls open, write, close and fcntl on data it owns, all
    // async-signal-safe, and allocates nothing (io::Error::last_os_error does not allocate).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Whether `fd` is an open descriptor of this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the flags of a descriptor number; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}
