//! System calls a container must not make, each tried in a forked child with arguments that are
//! harmless even if the call is let through (bad pointers, missing paths, invalid magic), plus
//! controls that must work. The child's exit status is the errno (0: the call succeeded).

use crate::json::Json;
use std::ptr::null;

/// The errno of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A symbolic name for the errnos the probe expects, else `E<number>`.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => return format!("E{e}"),
    };
    name.to_owned()
}

const NOPATH: &std::ffi::CStr = c"/nonexistent-mig-probe";

/// Raw `syscall(2)` returning 0 or the errno.
macro_rules! sc {
    ($nr:expr $(, $a:expr)*) => {{
        // SAFETY: every argument is an integer, a null pointer (the kernel checks it and
        // fails with EFAULT) or a pointer to a static NUL-terminated string.
        let r = unsafe { libc::syscall($nr $(, $a)*) };
        if r < 0 { errno() } else { 0 }
    }};
}

/// Name and attempt of every probed call.
/// One probed call: its name in the report and the attempt, returning 0 or the errno.
type Attempt = (&'static str, fn() -> i32);

fn attempts() -> Vec<Attempt> {
    vec![
        // Controls: allowed in a container.
        ("getpid", || sc!(libc::SYS_getpid)),
        ("chroot", || sc!(libc::SYS_chroot, c"/".as_ptr())),
        // Denied.
        ("mount", || {
            sc!(
                libc::SYS_mount,
                c"none".as_ptr(),
                NOPATH.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                null::<u8>()
            )
        }),
        ("umount2", || sc!(libc::SYS_umount2, NOPATH.as_ptr(), 0)),
        ("unshare_user", || {
            sc!(libc::SYS_unshare, libc::CLONE_NEWUSER)
        }),
        ("unshare_ns", || sc!(libc::SYS_unshare, libc::CLONE_NEWNS)),
        ("unshare_net", || sc!(libc::SYS_unshare, libc::CLONE_NEWNET)),
        // If this clone were let through, the new process (a copy of the child) would end
        // here too and both would report success.
        ("clone_newuser", || {
            sc!(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0,
                0,
                0,
                0
            )
        }),
        ("clone3", || sc!(libc::SYS_clone3, null::<u8>(), 0)),
        ("setns", || sc!(libc::SYS_setns, -1, 0)),
        ("pivot_root", || {
            sc!(libc::SYS_pivot_root, NOPATH.as_ptr(), NOPATH.as_ptr())
        }),
        ("kexec_load", || {
            sc!(libc::SYS_kexec_load, 0, 0, null::<u8>(), 0)
        }),
        ("init_module", || {
            sc!(libc::SYS_init_module, null::<u8>(), 0, c"".as_ptr())
        }),
        ("finit_module", || {
            sc!(libc::SYS_finit_module, -1, c"".as_ptr(), 0)
        }),
        ("delete_module", || {
            sc!(libc::SYS_delete_module, c"mig_probe_none".as_ptr(), 0)
        }),
        ("bpf", || sc!(libc::SYS_bpf, 0, null::<u8>(), 0)),
        ("keyctl", || sc!(libc::SYS_keyctl, 0, -3, 0)),
        ("add_key", || {
            sc!(
                libc::SYS_add_key,
                c"user".as_ptr(),
                c"mig-probe".as_ptr(),
                null::<u8>(),
                0,
                -3
            )
        }),
        ("ptrace_attach_1", || {
            sc!(libc::SYS_ptrace, libc::PTRACE_ATTACH, 1, 0, 0)
        }),
        ("swapon", || sc!(libc::SYS_swapon, NOPATH.as_ptr(), 0)),
        ("reboot", || {
            // magic2 = 0 is invalid: even a permitted call fails with EINVAL.
            sc!(
                libc::SYS_reboot,
                0xfee1_deadu32 as libc::c_long,
                0,
                0,
                null::<u8>()
            )
        }),
        ("perf_event_open", || {
            sc!(libc::SYS_perf_event_open, null::<u8>(), 0, -1, -1, 0)
        }),
        ("userfaultfd", || sc!(libc::SYS_userfaultfd, 0)),
        ("io_uring_setup", || {
            sc!(libc::SYS_io_uring_setup, 0, null::<u8>())
        }),
        ("open_by_handle_at", || {
            sc!(libc::SYS_open_by_handle_at, -1, null::<u8>(), 0)
        }),
        ("clock_settime", || {
            sc!(libc::SYS_clock_settime, libc::CLOCK_REALTIME, null::<u8>())
        }),
        ("settimeofday", || {
            sc!(libc::SYS_settimeofday, null::<u8>(), null::<u8>())
        }),
        ("acct", || sc!(libc::SYS_acct, NOPATH.as_ptr())),
        ("syslog", || sc!(libc::SYS_syslog, 10, null::<u8>(), 0)),
        ("process_vm_readv", || {
            sc!(
                libc::SYS_process_vm_readv,
                1,
                null::<u8>(),
                0,
                null::<u8>(),
                0,
                0
            )
        }),
        ("kcmp", || sc!(libc::SYS_kcmp, 1, 1, 0, 0, 0)),
        ("personality_no_aslr", || {
            sc!(libc::SYS_personality, 0x0040000)
        }),
    ]
}

/// Runs `f` in a forked child: "ok", the errno name, or "signal N" if the child was killed.
fn in_child(f: fn() -> i32) -> String {
    // SAFETY: fork in this single-threaded program; the child only makes raw system calls and
    // leaves with _exit, so no state shared with the parent is touched.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("fork: {}", errno_name(errno()));
    }
    if pid == 0 {
        let e = f();
        // SAFETY: _exit ends the child without running the parent's destructors or atexit.
        unsafe { libc::_exit(e & 0xff) };
    }
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer; pid is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            return format!("waitpid: {}", errno_name(errno()));
        }
    }
    if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        errno_name(libc::WEXITSTATUS(status))
    }
}

/// `{"mount": "EPERM", ...}` for every probed call.
pub fn probe_all() -> Json {
    Json::Obj(
        attempts()
            .into_iter()
            .map(|(name, f)| (name.to_owned(), Json::Str(in_child(f))))
            .collect(),
    )
}
