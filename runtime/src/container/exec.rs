//! Running a command inside a running container.
//!
//! The caller may be multithreaded, and `setns` into a mount or user namespace refuses a process
//! that shares its filesystem context with other threads, so the work happens in a forked
//! "middle" process: it joins the cgroup (host paths, so before entering the mount namespace),
//! enters the namespaces, and forks again so that the command is inside the pid namespace. The
//! middle waits for the command and exits with its code; the caller waits for the middle.
//!
//! The command leads its own session and gets the supplementary groups and `HOME` of its user
//! (see `account`), as the init does.

use super::account::{self, Account};
use super::channel::{self, At, Fail, Message, Step};
use super::init::{self, Command};
use super::security::Confinement;
use super::{await_exec, sys, ContainerError};
use crate::cgroup::Cgroup;
use crate::spec::ContainerSpec;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

struct ExecPlan {
    cgroup_procs: Vec<CString>,
    /// Namespace descriptors in the order they are entered, with their type.
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    cwd: CString,
    confinement: Confinement,
    command: Command,
}

/// Runs `args` inside the running container whose init has host PID `init_pid`: joins its
/// namespaces and cgroup, applies the same confinement, inherits the caller's stdio, waits and
/// returns the exit code (128+signal when killed).
///
/// `env` is added to the spec's environment (an entry of `env` replaces one with the same key).
pub fn exec(
    init_pid: i32,
    spec: &ContainerSpec,
    cgroup: &Cgroup,
    args: &[String],
    env: &[String],
) -> Result<i32, ContainerError> {
    let p = &spec.process;
    let key = |e: &String| e.split_once('=').map(|(k, _)| k.to_owned());
    let mut full_env: Vec<String> = p
        .env
        .iter()
        .filter(|e| !env.iter().any(|n| key(n).is_some() && key(n) == key(e)))
        .cloned()
        .collect();
    full_env.extend(env.iter().cloned());
    // The container's files as it sees them now (its writable layer included).
    let root = PathBuf::from(format!("/proc/{init_pid}/root"));
    let account = Account::lookup(&root, p.uid, p.gid, spec.userns.map(|m| m.size));
    let full_env = account::with_home(&full_env, &account.home);
    let mut kinds = Vec::new();
    // A restored container runs in the time namespace CRIU made for it (its clocks go on from
    // the dump's). Joined first, while the middle process is still root of the host: a process
    // left in the host's would make every later restore fail ("Can't restore sub-task in NS").
    if other_time_ns(init_pid) {
        kinds.push(("time", libc::CLONE_NEWTIME));
    }
    if spec.userns.is_some() {
        kinds.push(("user", libc::CLONE_NEWUSER));
    }
    kinds.extend([
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("mnt", libc::CLONE_NEWNS),
    ]);
    let mut namespaces = Vec::new();
    for (name, kind) in kinds {
        let path = PathBuf::from(format!("/proc/{init_pid}/ns/{name}"));
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| ContainerError::Command)?;
        let fd = sys::open_owned(&c, libc::O_RDONLY)
            .map_err(|errno| ContainerError::OpenNamespace { path, errno })?;
        namespaces.push((fd, kind));
    }
    let plan = ExecPlan {
        cgroup_procs: cgroup
            .procs_files()
            .iter()
            .map(|f| {
                CString::new(f.as_os_str().as_bytes())
                    .map_err(|_| ContainerError::PathNul { path: f.clone() })
            })
            .collect::<Result<_, _>>()?,
        namespaces,
        cwd: CString::new(p.cwd.as_str()).map_err(|_| ContainerError::Command)?,
        confinement: Confinement::new(p.uid, p.gid, account.groups)
            .map_err(ContainerError::CapLastCap)?,
        command: Command::new(args, &full_env).ok_or(ContainerError::Command)?,
    };
    let (parent_sock, child_sock) = sys::socketpair().map_err(ContainerError::Socketpair)?;
    // SAFETY: the child only runs `middle`, which makes raw system calls on `plan` (no allocation,
    // no locks) and ends with execve or _exit.
    let pid = unsafe { sys::fork() }.map_err(ContainerError::Fork)?;
    if pid == 0 {
        middle(&plan, child_sock.as_raw_fd());
    }
    drop(child_sock);
    await_exec(parent_sock.as_raw_fd(), pid)?;
    let status = sys::waitpid(pid).map_err(|errno| ContainerError::Wait { pid, errno })?;
    Ok(sys::exit_code(status))
}

/// Whether the process `pid` is in another time namespace than this one (false when the kernel
/// has none).
fn other_time_ns(pid: i32) -> bool {
    let ns = |p: String| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    match (
        ns(format!("/proc/{pid}/ns/time")),
        ns("/proc/self/ns/time".to_owned()),
    ) {
        (Some(theirs), Some(ours)) => theirs != ours,
        _ => false,
    }
}

/// The middle process: cgroup, namespaces, fork, wait. Never returns.
fn middle(plan: &ExecPlan, sock: RawFd) -> ! {
    let code = match enter_and_fork(plan, sock) {
        Ok(code) => code,
        Err(fail) => {
            let _ = channel::send(sock, Message::Failed(fail));
            1
        }
    };
    sys::exit(code)
}

fn enter_and_fork(plan: &ExecPlan, sock: RawFd) -> Result<i32, Fail> {
    init::join_cgroup(&plan.cgroup_procs)?;
    for (fd, kind) in &plan.namespaces {
        sys::setns(fd.as_raw_fd(), *kind).at(Step::Setns)?;
    }
    // SAFETY: the grandchild runs `command_child` (raw system calls only) and ends with exec/_exit.
    let pid = unsafe { sys::fork() }.at(Step::Fork)?;
    if pid == 0 {
        let fail = command_child(plan, sock);
        let _ = channel::send(sock, Message::Failed(fail));
        sys::exit(127);
    }
    // Hold nothing of the caller's while waiting: the caller sees end-of-file on the socket once
    // the command has exec'd, and descriptors leaked from its other threads must not linger.
    let _ = sys::close_from(3);
    let status = sys::waitpid(pid).at(Step::Wait)?;
    Ok(sys::exit_code(status))
}

/// The command's process, inside the pid namespace: session, working directory, confinement,
/// exec.
fn command_child(plan: &ExecPlan, sock: RawFd) -> Fail {
    let run = || -> Result<std::convert::Infallible, Fail> {
        sys::reset_signals().at(Step::Signals)?;
        // Lead a new session inside the container, as the init does: the caller's session (the
        // shim's, or migd's) is outside the pid namespace, and CRIU refuses to dump a process
        // whose session leader it cannot see ("A session leader of N is outside of its pid
        // namespace"), so a background process left by the command would block every
        // checkpoint and move. There is no terminal to lose: stdio are the caller's pipes.
        sys::setsid().at(Step::Setsid)?;
        // setns(mnt) put us at the container's root; the cwd is relative to it.
        sys::chdir(c"/").at(Step::Chdir)?;
        sys::chdir(&plan.cwd).at(Step::Chdir)?;
        plan.confinement.apply()?;
        sys::cloexec_from(3).at(Step::CloseFds)?;
        channel::send(sock, Message::AboutToExec).at(Step::Exec)?;
        Err(Fail {
            step: Step::Exec,
            errno: plan.command.exec(),
        })
    };
    match run() {
        Ok(never) => match never {},
        Err(fail) => fail,
    }
}
