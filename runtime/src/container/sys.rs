//! Thin wrappers over the raw system calls the container code needs.
//!
//! Every function here is safe to call between `clone` and `execve` in a child of a multithreaded
//! process: none allocates, none takes a lock, and the credential calls go straight to the kernel
//! (glibc's `setuid` & co. broadcast to every thread it knows of, which after a raw `clone` are
//! threads of the parent). All of the container module's `unsafe` lives in this file.

use nix::errno::Errno;
use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr;

pub(crate) type SysResult<T> = Result<T, Errno>;

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn opt_ptr(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(ptr::null(), CStr::as_ptr)
}

/// Creates a child in new namespaces, like `fork` (the child continues on a copy of the caller's
/// stack and returns 0 here).
///
/// # Safety
/// In a multithreaded caller the child may only do async-signal-safe work (no allocation, no
/// locks) and must leave with `execve` or [`exit`]; it must not return into code that runs
/// destructors of state shared with other threads.
pub(crate) unsafe fn clone(flags: libc::c_int) -> SysResult<libc::pid_t> {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a null stack makes clone behave like fork (copy-on-write copy of this stack); the
    // remaining arguments (parent_tid, child_tid, tls) are unused without the matching flags.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    check_long(ret).map(|p| p as libc::pid_t)
}

/// `fork(2)` through glibc (which resets its own state in the child).
///
/// # Safety
/// Same rules as [`clone`] for the child.
pub(crate) unsafe fn fork() -> SysResult<libc::pid_t> {
    // SAFETY: the caller upholds the rules for the child.
    check(unsafe { libc::fork() })
}

/// Leaves the process immediately, without running destructors or atexit handlers.
pub(crate) fn exit(code: libc::c_int) -> ! {
    // SAFETY: _exit never returns and touches no user-space state.
    unsafe { libc::_exit(code) }
}

pub(crate) fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> SysResult<()> {
    let data = data.map_or(ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: every pointer is either null or a valid NUL-terminated string borrowed for the call.
    check(unsafe { libc::mount(opt_ptr(src), target.as_ptr(), opt_ptr(fstype), flags, data) })
        .map(drop)
}

pub(crate) fn umount2(target: &CStr, flags: libc::c_int) -> SysResult<()> {
    // SAFETY: target is a valid NUL-terminated string.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

pub(crate) fn pivot_root(new_root: &CStr, put_old: &CStr) -> SysResult<()> {
    // SAFETY: both arguments are valid NUL-terminated strings.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
        .map(drop)
}

pub(crate) fn chdir(path: &CStr) -> SysResult<()> {
    // SAFETY: path is a valid NUL-terminated string.
    check(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

/// `mkdir`, treating an existing entry as success.
pub(crate) fn mkdir_exist_ok(path: &CStr, mode: libc::mode_t) -> SysResult<()> {
    // SAFETY: path is a valid NUL-terminated string.
    match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Ok(_) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `mkdir`: `Ok(true)` when it made the directory, `Ok(false)` when the entry was there.
pub(crate) fn mkdir_new(path: &CStr, mode: libc::mode_t) -> SysResult<bool> {
    // SAFETY: path is a valid NUL-terminated string.
    match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Ok(_) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) fn lchown(path: &CStr, uid: u32, gid: u32) -> SysResult<()> {
    // SAFETY: path is a valid NUL-terminated string.
    check(unsafe { libc::lchown(path.as_ptr(), uid, gid) }).map(drop)
}

pub(crate) fn mknod(path: &CStr, mode: libc::mode_t, major: u32, minor: u32) -> SysResult<()> {
    let dev = libc::makedev(major, minor);
    // SAFETY: path is a valid NUL-terminated string.
    check(unsafe { libc::mknod(path.as_ptr(), mode, dev) }).map(drop)
}

pub(crate) fn symlink(target: &CStr, link: &CStr) -> SysResult<()> {
    // SAFETY: both are valid NUL-terminated strings.
    check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }).map(drop)
}

pub(crate) fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> SysResult<RawFd> {
    // SAFETY: path is a valid NUL-terminated string; mode is passed as the variadic argument.
    check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })
}

/// Opens `path` as an owned descriptor (parent side).
pub(crate) fn open_owned(path: &CStr, flags: libc::c_int) -> SysResult<OwnedFd> {
    let fd = open(path, flags, 0)?;
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this process owns; errors are irrelevant here.
    unsafe { libc::close(fd) };
}

/// Writes all of `buf` to `fd`.
pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) -> SysResult<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(e),
            }
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

pub(crate) fn dup2(old: RawFd, new: RawFd) -> SysResult<()> {
    // SAFETY: plain descriptor operation.
    check(unsafe { libc::dup2(old, new) })?;
    // dup2(fd, fd) leaves the close-on-exec flag as it was: clear it explicitly.
    // SAFETY: plain descriptor operation.
    check(unsafe { libc::fcntl(new, libc::F_SETFD, 0) }).map(drop)
}

pub(crate) fn setsid() -> SysResult<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

pub(crate) fn umask(mask: libc::mode_t) {
    // SAFETY: no pointers.
    unsafe { libc::umask(mask) };
}

pub(crate) fn sethostname(name: &[u8]) -> SysResult<()> {
    // SAFETY: name is a valid slice of name.len() bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// True when `path` is a directory (following symlinks).
pub(crate) fn is_dir(path: &CStr) -> SysResult<bool> {
    // SAFETY: stat is plain old data; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: path is a valid string and st a valid out pointer.
    check(unsafe { libc::stat(path.as_ptr(), &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// Brings the loopback interface of the current network namespace up.
pub(crate) fn loopback_up() -> SysResult<()> {
    // SAFETY: plain socket creation.
    let sock =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: ifreq is plain old data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS; the flags union member is the
    // one these requests read and write.
    let res = unsafe {
        check(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req)).and_then(|_| {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            check(libc::ioctl(sock, libc::SIOCSIFFLAGS, &req))
        })
    };
    close(sock);
    res.map(drop)
}

pub(crate) fn setresuid(uid: u32) -> SysResult<()> {
    // SAFETY: raw syscall with integer arguments (bypasses glibc's all-threads broadcast).
    check_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

pub(crate) fn setresgid(gid: u32) -> SysResult<()> {
    // SAFETY: raw syscall with integer arguments.
    check_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

/// Sets the supplementary groups to exactly `gids` (an empty slice drops them all).
pub(crate) fn set_groups(gids: &[libc::gid_t]) -> SysResult<()> {
    // SAFETY: the pointer and length describe a live slice the kernel only reads.
    check_long(unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) }).map(drop)
}

/// Opens `path` (relative) below the directory `root` as if `root` were `/`: `..` and absolute
/// symlinks cannot leave it, magic links (`/proc/self/...`) are refused (openat2 with
/// `RESOLVE_IN_ROOT`). The descriptor is close-on-exec.
pub(crate) fn open_in_root(root: RawFd, path: &CStr, flags: libc::c_int) -> SysResult<OwnedFd> {
    // SAFETY: open_how is plain integers; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid C string and a live open_how of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    // SAFETY: on success the kernel returned a new descriptor that nothing else owns.
    check_long(ret).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub(crate) fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> SysResult<()> {
    // SAFETY: the options used here take integer arguments only.
    check(unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
    .map(drop)
}

/// Sets the effective, permitted and inheritable capability sets (64-bit masks).
pub(crate) fn capset(effective: u64, permitted: u64, inheritable: u64) -> SysResult<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let split = |m: u64, i: usize| (m >> (32 * i)) as u32;
    let data = [0, 1].map(|i| Data {
        effective: split(effective, i),
        permitted: split(permitted, i),
        inheritable: split(inheritable, i),
    });
    // SAFETY: hdr and data match the kernel's v3 capability structures (two data elements).
    check_long(unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) }).map(drop)
}

/// Installs a seccomp BPF filter (the caller has set no_new_privs).
pub(crate) fn seccomp_install(prog: &[libc::sock_filter]) -> SysResult<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at prog, which outlives the call; the kernel copies the program.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const _ as libc::c_ulong,
        )
    })
    .map(drop)
}

/// Marks every descriptor from `first` up close-on-exec.
pub(crate) fn cloexec_from(first: u32) -> SysResult<()> {
    // SAFETY: integer arguments only.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    })
    .map(drop)
}

/// Closes every descriptor from `first` up.
pub(crate) fn close_from(first: u32) -> SysResult<()> {
    // SAFETY: integer arguments only; the caller owns every descriptor it closes.
    check_long(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) }).map(drop)
}

/// `execve`; returns only on failure.
pub(crate) fn execve(
    path: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> Errno {
    debug_assert!(argv.last().is_some_and(|p| p.is_null()));
    debug_assert!(envp.last().is_some_and(|p| p.is_null()));
    // SAFETY: argv and envp are null-terminated arrays of pointers to NUL-terminated strings that
    // the caller keeps alive.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

pub(crate) fn setns(fd: RawFd, nstype: libc::c_int) -> SysResult<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::setns(fd, nstype) }).map(drop)
}

/// Waits for `pid` to terminate; returns the raw wait status.
pub(crate) fn waitpid(pid: libc::pid_t) -> SysResult<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        match check(unsafe { libc::waitpid(pid, &mut status, libc::__WALL) }) {
            Ok(_) => return Ok(status),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Turns a wait status into a shell-style exit code (128+signal when killed).
pub(crate) fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: integer arguments only.
    unsafe { libc::kill(pid, sig) };
}

/// A connected pair of close-on-exec SOCK_SEQPACKET sockets.
pub(crate) fn socketpair() -> SysResult<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: fds is a valid out array of two ints.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn send(fd: RawFd, buf: &[u8]) -> SysResult<()> {
    loop {
        // SAFETY: buf is a valid slice; MSG_NOSIGNAL avoids SIGPIPE when the peer is gone.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        match n {
            n if n >= 0 => return Ok(()),
            _ if Errno::last() == Errno::EINTR => continue,
            _ => return Err(Errno::last()),
        }
    }
}

/// Receives one datagram; 0 means the peer closed its end.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        // SAFETY: buf is a valid writable slice.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        match n {
            n if n >= 0 => return Ok(n as usize),
            _ if Errno::last() == Errno::EINTR => continue,
            _ => return Err(Errno::last()),
        }
    }
}

// ---- the new mount API ----

pub(crate) fn fsopen(fstype: &CStr) -> SysResult<OwnedFd> {
    // SAFETY: fstype is a valid string.
    let fd = check_long(unsafe {
        libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC)
    })?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub(crate) fn fsconfig_string(fd: RawFd, key: &CStr, value: &CStr) -> SysResult<()> {
    // SAFETY: key and value are valid strings; aux is 0 for FSCONFIG_SET_STRING.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd,
            libc::FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub(crate) fn fsconfig_create(fd: RawFd) -> SysResult<()> {
    // SAFETY: FSCONFIG_CMD_CREATE takes no key/value.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd,
            libc::FSCONFIG_CMD_CREATE,
            ptr::null::<u8>(),
            ptr::null::<u8>(),
            0,
        )
    })
    .map(drop)
}

pub(crate) fn fsmount(fd: RawFd) -> SysResult<OwnedFd> {
    // SAFETY: integer arguments only.
    let m =
        check_long(unsafe { libc::syscall(libc::SYS_fsmount, fd, libc::FSMOUNT_CLOEXEC, 0u32) })?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(m as RawFd) })
}

/// Attaches the detached mount `fd` on `target`.
pub(crate) fn move_mount(fd: RawFd, target: &CStr) -> SysResult<()> {
    // SAFETY: "" and target are valid strings.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// A detached recursive copy of the mount tree at `path`; the raw descriptor is close-on-exec.
pub(crate) fn open_tree_clone(path: &CStr) -> SysResult<RawFd> {
    let flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: path is a valid string.
    check_long(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })
        .map(|fd| fd as RawFd)
}

/// A detached recursive copy of the mount tree at `path`, as an owned close-on-exec descriptor.
pub(crate) fn clone_tree(path: &CStr) -> SysResult<OwnedFd> {
    let fd = open_tree_clone(path)?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the whole (detached) tree `fd` an idmapped mount: ids on disk are read as ids of the
/// user namespace `userns` and shown (and written) as the host ids they map to.
pub(crate) fn set_tree_idmap(fd: RawFd, userns: RawFd) -> SysResult<()> {
    set_tree_attr(fd, libc::MOUNT_ATTR_IDMAP, userns as u64)
}

/// `mount_setattr` on the whole (detached) tree `fd`: sets `attr` (`MOUNT_ATTR_*`), with the
/// user namespace descriptor `userns_fd` for `MOUNT_ATTR_IDMAP`.
fn set_tree_attr(fd: RawFd, attr: u64, userns_fd: u64) -> SysResult<()> {
    let attr = libc::mount_attr {
        attr_set: attr,
        attr_clr: 0,
        propagation: 0,
        userns_fd,
    };
    // SAFETY: attr is a valid mount_attr of the size passed.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
    .map(drop)
}

/// `fsconfig(FSCONFIG_SET_FD)`: gives the filesystem context `key` as the descriptor `value`.
pub(crate) fn fsconfig_fd(fd: RawFd, key: &CStr, value: RawFd) -> SysResult<()> {
    // SAFETY: key is a valid string; the value pointer must be null for FSCONFIG_SET_FD and the
    // descriptor travels in aux.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd,
            libc::FSCONFIG_SET_FD,
            key.as_ptr(),
            ptr::null::<u8>(),
            value,
        )
    })
    .map(drop)
}

/// Blocks until `fd` reaches end of file (or fails). Allocation-free, for a cloned child.
pub(crate) fn wait_eof(fd: RawFd) {
    let mut b = 0u8;
    loop {
        // SAFETY: b is a valid one-byte buffer.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n == 0 || (n < 0 && Errno::last() != Errno::EINTR) {
            return;
        }
    }
}

/// Makes the whole (detached) tree `fd` read-only.
pub(crate) fn set_tree_readonly(fd: RawFd) -> SysResult<()> {
    set_tree_attr(fd, libc::MOUNT_ATTR_RDONLY, 0)
}

/// A new detached mount of a fresh `fstype` filesystem with mount attributes `attrs`
/// (`MOUNT_ATTR_*`); the raw descriptor is close-on-exec. Allocation-free.
pub(crate) fn new_detached_mount(fstype: &CStr, attrs: u64) -> SysResult<RawFd> {
    // SAFETY: fstype is a valid string.
    let fs = check_long(unsafe {
        libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC)
    })? as RawFd;
    let res = fsconfig_create(fs).and_then(|()| {
        // SAFETY: integer arguments only.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs,
                libc::FSMOUNT_CLOEXEC,
                attrs as libc::c_uint,
            )
        })
    });
    close(fs);
    res.map(|fd| fd as RawFd)
}

/// Restores every signal to its default action and unblocks all of them: ignored signals and the
/// signal mask survive `execve`, and the caller's (Rust ignores SIGPIPE; a runtime may block
/// some) must not leak into the container.
pub(crate) fn reset_signals() -> SysResult<()> {
    /// The kernel's `struct sigaction` (x86_64 and aarch64 both have `sa_restorer`).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: dfl is a valid kernel sigaction of the size passed (8-byte mask). The raw call
        // also resets signals glibc reserves for itself (32, 33), which `signal()` refuses.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl,
                ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    let empty: u64 = 0;
    // SAFETY: an 8-byte empty mask, as the kernel expects for rt_sigprocmask.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty,
            ptr::null_mut::<u64>(),
            8usize,
        )
    })
    .map(drop)
}
