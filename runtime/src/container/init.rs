//! The code that runs in the container's init between clone and exec.
//!
//! Everything it needs is prepared by the parent in an [`InitPlan`] before clone: the child only
//! makes system calls on borrowed C strings and fixed buffers, never allocates (the parent may be
//! multithreaded, and another thread may hold the allocator's lock at the moment of the clone),
//! and leaves with `execve` or `_exit`.
//!
//! Lessons from CRIU (the container must dump with a plain `criu dump -t PID --root ROOTFS`):
//! - every file the init keeps open must live inside the container: stdin is the container's own
//!   `/dev/null` (a tmpfs node), never the host's; stdout/stderr are the shim's pipe, which CRIU
//!   dumps as a pipe and the restore side reconnects with `--inherit-fd`;
//!   every other descriptor is closed at exec;
//! - the init must lead its own session (`setsid`): a session or process group inherited from the
//!   host is something CRIU cannot recreate without `--shell-job`;
//! - masked files are bind mounts of the container's `/dev/null`, so CRIU sees a bind of a
//!   mount inside the container, not an external file;
//! - mounts are private, so nothing propagates to or from the host that CRIU would have to
//!   describe as shared.

use super::channel::{self, At, Fail, Message, Step};
use super::security::Confinement;
use super::sys;
use nix::errno::Errno;
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

/// A command to exec: candidate paths from the container's `PATH`, argv and envp, ready for
/// `execve` without allocation.
#[derive(Debug)]
pub(crate) struct Command {
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

/// The `PATH` used when the environment has none (the OCI/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Command {
    /// Builds the command; `None` if a string contains a NUL byte or `args` is empty.
    pub(crate) fn new(args: &[String], env: &[String]) -> Option<Command> {
        let first = args.first().filter(|a| !a.is_empty())?;
        let path = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        // Like execvp: a name with a slash is used as is, otherwise every PATH entry is tried.
        let candidates: Vec<CString> = if first.contains('/') {
            vec![CString::new(first.as_str()).ok()?]
        } else {
            path.split(':')
                .map(|dir| if dir.is_empty() { "." } else { dir })
                .map(|dir| CString::new(format!("{}/{first}", dir.trim_end_matches('/'))))
                .collect::<Result<_, _>>()
                .ok()?
        };
        let argv: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .ok()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|e| CString::new(e.as_str()))
            .collect::<Result<_, _>>()
            .ok()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        Some(Command {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            candidates,
            _argv: argv,
            _envp: envp,
        })
    }

    /// Tries every candidate; returns the most relevant error (as execvp does).
    pub(crate) fn exec(&self) -> Errno {
        let mut result = Errno::ENOENT;
        for path in &self.candidates {
            match sys::execve(path, &self.argv_ptrs, &self.envp_ptrs) {
                Errno::EACCES => result = Errno::EACCES,
                Errno::ENOENT
                | Errno::ENOTDIR
                | Errno::ESTALE
                | Errno::ENODEV
                | Errno::ETIMEDOUT => {}
                e => return e,
            }
        }
        result
    }
}

/// Everything the init needs, prepared before clone.
#[derive(Debug)]
pub(crate) struct InitPlan {
    pub userns: bool,
    pub cgroup_procs: Vec<CString>,
    pub rootfs: CString,
    pub hostname: Vec<u8>,
    pub cwd: CString,
    /// The working directory and its parents below `/`, outermost first ([`cwd_dirs`]): those
    /// missing from the image are created for the command's user before the chdir.
    pub cwd_dirs: Vec<CString>,
    pub output: RawFd,
    pub confinement: Confinement,
    pub command: Command,
}

/// The directories of the absolute working directory `cwd`, outermost first, as a lexically
/// cleaned path (`.` and empty names skipped, `..` drops the name before it): `/srv/./app/` gives
/// `/srv`, `/srv/app`; `/` gives none. `None` when a name holds a NUL byte.
pub(crate) fn cwd_dirs(cwd: &str) -> Option<Vec<CString>> {
    let mut names = Vec::new();
    for name in cwd.split('/') {
        match name {
            "" | "." => {}
            ".." => {
                names.pop();
            }
            n => names.push(n),
        }
    }
    let mut path = String::new();
    names
        .iter()
        .map(|n| {
            path.push('/');
            path.push_str(n);
            CString::new(path.as_str()).ok()
        })
        .collect()
}

/// Device nodes of the container's `/dev`: path, major, minor.
pub(crate) const DEVICES: [(&CStr, u32, u32); 6] = [
    (c"/dev/null", 1, 3),
    (c"/dev/zero", 1, 5),
    (c"/dev/full", 1, 7),
    (c"/dev/random", 1, 8),
    (c"/dev/urandom", 1, 9),
    (c"/dev/tty", 5, 0),
];

const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"pts/ptmx", c"/dev/ptmx"),
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];

/// runc's default masked paths: files get the container's /dev/null, directories an empty
/// read-only tmpfs (decided at run time by what the path is; these lists say what to expect).
pub(crate) const MASKED_FILES: [&CStr; 6] = [
    c"/proc/kcore",
    c"/proc/keys",
    c"/proc/latency_stats",
    c"/proc/timer_list",
    c"/proc/timer_stats",
    c"/proc/sched_debug",
];
const MASKED_DIRS: [&CStr; 5] = [
    c"/proc/acpi",
    c"/proc/asound",
    c"/proc/scsi",
    c"/sys/firmware",
    c"/sys/devices/virtual/powercap",
];

/// runc's default read-only paths.
const READONLY: [&CStr; 5] = [
    c"/proc/bus",
    c"/proc/fs",
    c"/proc/irq",
    c"/proc/sys",
    c"/proc/sysrq-trigger",
];

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Mounts prepared before pivot_root when the container has its own user namespace, as detached
/// mount descriptors attached after it:
/// - the kernel lets a user namespace mount proc and sysfs only while a fully visible instance
///   exists in its mount namespace (the host's, until the old root is detached), so fresh
///   instances are created (fsopen/fsmount) before pivot_root;
/// - a user namespace may not mknod, so device nodes are clones of the host's;
/// - if sysfs is refused anyway, a read-only clone of the host's /sys stands in.
struct HostMounts {
    devices: [RawFd; DEVICES.len()],
    proc: RawFd,
    sys: RawFd,
}

const ATTR_NOSUID_NODEV_NOEXEC: u64 =
    libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;

/// The child's entry point: runs every step, then execs; reports the first failure and exits.
pub(crate) fn run(plan: &InitPlan, sock: RawFd) -> ! {
    let fail = match setup_and_exec(plan, sock) {
        Ok(never) => match never {},
        Err(fail) => fail,
    };
    let _ = channel::send(sock, Message::Failed(fail));
    sys::exit(1)
}

fn setup_and_exec(plan: &InitPlan, sock: RawFd) -> Result<std::convert::Infallible, Fail> {
    // Wait until the parent has written the user-namespace maps (or simply said go).
    match channel::recv(sock) {
        Ok(Some(Message::Go)) => {}
        Ok(_) => {
            return Err(Fail {
                step: Step::WaitParent,
                errno: Errno::EPROTO,
            })
        }
        Err(e) => {
            return Err(Fail {
                step: Step::WaitParent,
                errno: e,
            })
        }
    }
    // Signals: default actions, nothing blocked (the caller's state would survive exec).
    sys::reset_signals().at(Step::Signals)?;
    // Join the cgroup first, while our credentials are still the host's root.
    join_cgroup(&plan.cgroup_procs)?;
    if plan.userns {
        // Become the namespace's root so that files we create are owned by a mapped id.
        sys::setresgid(0).at(Step::BecomeRoot)?;
        sys::setresuid(0).at(Step::BecomeRoot)?;
    }
    // Lead a new session: CRIU refuses a session inherited from outside the dumped tree.
    sys::setsid().at(Step::Setsid)?;
    sys::umask(0);
    // Nothing we mount may propagate back to the host (and pivot_root requires it).
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).at(Step::MountsPrivate)?;
    let host = if plan.userns {
        Some(clone_host_mounts()?)
    } else {
        None
    };
    // pivot_root needs the new root to be a mount point: bind it onto itself (as runc does).
    sys::mount(
        Some(&plan.rootfs),
        &plan.rootfs,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .at(Step::BindRootfs)?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves the
    // new root alone, without needing a directory for the old root inside the image.
    sys::chdir(&plan.rootfs).at(Step::PivotRoot)?;
    sys::pivot_root(c".", c".").at(Step::PivotRoot)?;
    sys::umount2(c".", libc::MNT_DETACH).at(Step::DetachOldRoot)?;
    sys::chdir(c"/").at(Step::DetachOldRoot)?;
    // From here on every path resolves inside the container.
    sys::mkdir_exist_ok(c"/proc", 0o555).at(Step::MountProc)?;
    match &host {
        None => sys::mount(
            Some(c"proc"),
            c"/proc",
            Some(c"proc"),
            NOSUID_NODEV_NOEXEC,
            None,
        ),
        Some(h) => sys::move_mount(h.proc, c"/proc"),
    }
    .at(Step::MountProc)?;
    mount_dev(host.as_ref())?;
    mount_sys(host.as_ref())?;
    if let Some(h) = &host {
        h.devices
            .iter()
            .chain([&h.proc, &h.sys])
            .for_each(|fd| sys::close(*fd));
    }
    mask_paths()?;
    readonly_paths()?;
    sys::sethostname(&plan.hostname).at(Step::Hostname)?;
    sys::loopback_up().at(Step::Loopback)?;
    // stdout and stderr go to the shim; stdin is the container's own /dev/null.
    sys::dup2(plan.output, 1).at(Step::Stdio)?;
    sys::dup2(plan.output, 2).at(Step::Stdio)?;
    let null = sys::open(c"/dev/null", libc::O_RDWR, 0).at(Step::Stdio)?;
    if null != 0 {
        sys::dup2(null, 0).at(Step::Stdio)?;
        sys::close(null);
    }
    make_cwd(plan)?;
    sys::chdir(&plan.cwd).at(Step::Chdir)?;
    sys::umask(0o022);
    // Ids, capabilities, no_new_privs, and seccomp last.
    plan.confinement.apply()?;
    // Nothing from the host may survive exec (CRIU would have to dump it). Our socket is already
    // close-on-exec; it stays open to report an exec failure.
    sys::cloexec_from(3).at(Step::CloseFds)?;
    channel::send(sock, Message::AboutToExec).at(Step::Exec)?;
    Err(Fail {
        step: Step::Exec,
        errno: plan.command.exec(),
    })
}

/// Creates the working directories the image lacks, mode 0755, owned by the command's user and
/// group, as podman and runc do (`-w /srv/app` on an image without it); directories that exist
/// stay as they are. Paths resolve inside the container (after pivot_root), so an image's
/// symlink cannot lead outside it. A failure (a name that is a file) is reported as the chdir's.
fn make_cwd(plan: &InitPlan) -> Result<(), Fail> {
    for dir in &plan.cwd_dirs {
        if sys::mkdir_new(dir, 0o755).at(Step::Chdir)? {
            sys::lchown(dir, plan.confinement.uid, plan.confinement.gid).at(Step::Chdir)?;
        }
    }
    Ok(())
}

/// Writes "0" to every `cgroup.procs` file.
pub(crate) fn join_cgroup(procs: &[CString]) -> Result<(), Fail> {
    for p in procs {
        let fd = sys::open(p, libc::O_WRONLY, 0).at(Step::JoinCgroup)?;
        let res = sys::write_all(fd, b"0");
        sys::close(fd);
        res.at(Step::JoinCgroup)?;
    }
    Ok(())
}

fn clone_host_mounts() -> Result<HostMounts, Fail> {
    let mut devices = [-1; DEVICES.len()];
    for (fd, (path, _, _)) in devices.iter_mut().zip(DEVICES) {
        *fd = sys::open_tree_clone(path).at(Step::CloneHostMounts)?;
    }
    let proc = sys::new_detached_mount(c"proc", ATTR_NOSUID_NODEV_NOEXEC).at(Step::MountProc)?;
    let sysfs_attrs = ATTR_NOSUID_NODEV_NOEXEC | libc::MOUNT_ATTR_RDONLY;
    let sys_fd = match sys::new_detached_mount(c"sysfs", sysfs_attrs) {
        Ok(fd) => fd,
        Err(_) => {
            let fd = sys::open_tree_clone(c"/sys").at(Step::CloneHostMounts)?;
            sys::set_tree_readonly(fd).at(Step::CloneHostMounts)?;
            fd
        }
    };
    Ok(HostMounts {
        devices,
        proc,
        sys: sys_fd,
    })
}

fn mount_dev(host: Option<&HostMounts>) -> Result<(), Fail> {
    sys::mkdir_exist_ok(c"/dev", 0o755).at(Step::MountDev)?;
    sys::mount(
        Some(c"tmpfs"),
        c"/dev",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some(c"mode=755,size=65536k"),
    )
    .at(Step::MountDev)?;
    for (i, (path, major, minor)) in DEVICES.iter().enumerate() {
        match host {
            None => {
                sys::mknod(path, libc::S_IFCHR | 0o666, *major, *minor).at(Step::MakeDevNodes)?
            }
            Some(h) => {
                // A user namespace may not mknod: bind the host's node onto an empty file.
                let fd = sys::open(path, libc::O_CREAT | libc::O_WRONLY, 0o666)
                    .at(Step::MakeDevNodes)?;
                sys::close(fd);
                sys::move_mount(h.devices[i], path).at(Step::MakeDevNodes)?;
            }
        }
    }
    sys::mkdir_exist_ok(c"/dev/pts", 0o755).at(Step::MountDevPts)?;
    sys::mount(
        Some(c"devpts"),
        c"/dev/pts",
        Some(c"devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .at(Step::MountDevPts)?;
    sys::mkdir_exist_ok(c"/dev/shm", 0o1777).at(Step::MountDevShm)?;
    sys::mount(
        Some(c"shm"),
        c"/dev/shm",
        Some(c"tmpfs"),
        NOSUID_NODEV_NOEXEC,
        Some(c"mode=1777,size=65536k"),
    )
    .at(Step::MountDevShm)?;
    sys::mkdir_exist_ok(c"/dev/mqueue", 0o755).at(Step::MountDevMqueue)?;
    sys::mount(
        Some(c"mqueue"),
        c"/dev/mqueue",
        Some(c"mqueue"),
        NOSUID_NODEV_NOEXEC,
        None,
    )
    .at(Step::MountDevMqueue)?;
    for (target, link) in DEV_LINKS {
        sys::symlink(target, link).at(Step::DevLinks)?;
    }
    Ok(())
}

fn mount_sys(host: Option<&HostMounts>) -> Result<(), Fail> {
    sys::mkdir_exist_ok(c"/sys", 0o555).at(Step::MountSys)?;
    let flags = NOSUID_NODEV_NOEXEC | libc::MS_RDONLY;
    match host {
        None => sys::mount(Some(c"sysfs"), c"/sys", Some(c"sysfs"), flags, None),
        Some(h) => sys::move_mount(h.sys, c"/sys"),
    }
    .at(Step::MountSys)
}

fn mask_paths() -> Result<(), Fail> {
    for path in MASKED_FILES.into_iter().chain(MASKED_DIRS) {
        match sys::is_dir(path) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
            Err(e) => {
                return Err(Fail {
                    step: Step::MaskPaths,
                    errno: e,
                })
            }
            Ok(true) => sys::mount(
                Some(c"tmpfs"),
                path,
                Some(c"tmpfs"),
                libc::MS_RDONLY,
                Some(c"size=0"),
            )
            .at(Step::MaskPaths)?,
            Ok(false) => sys::mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None)
                .at(Step::MaskPaths)?,
        }
    }
    Ok(())
}

fn readonly_paths() -> Result<(), Fail> {
    for path in READONLY {
        match sys::mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None) {
            Err(Errno::ENOENT) => continue,
            r => r.at(Step::ReadonlyPaths)?,
        }
        // Keep the flags /proc was mounted with: a remount may not clear locked flags.
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | NOSUID_NODEV_NOEXEC;
        sys::mount(Some(path), path, None, flags, None).at(Step::ReadonlyPaths)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cwd_dirs;

    #[test]
    fn the_working_directory_and_its_parents() {
        let dirs = |cwd: &str| -> Vec<String> {
            cwd_dirs(cwd)
                .unwrap()
                .into_iter()
                .map(|c| c.into_string().unwrap())
                .collect()
        };
        assert_eq!(dirs("/srv/app"), ["/srv", "/srv/app"]);
        assert!(dirs("/").is_empty());
        assert_eq!(dirs("//srv/./app/"), ["/srv", "/srv/app"]);
        assert_eq!(dirs("/a/../b"), ["/b"]);
        assert_eq!(dirs("/../.."), Vec::<String>::new());
        assert!(cwd_dirs("/a\0b").is_none());
    }
}
