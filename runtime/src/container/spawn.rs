//! The parent side of starting a container's init: prepare everything, clone into new namespaces,
//! write the user-namespace maps, let the child go and wait for its report.

use super::account::{self, Account};
use super::init::{self, Command, InitPlan};
use super::security::Confinement;
use super::{await_exec, channel, rootfs, sys, ContainerError, LaunchConfig};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

/// Starts the container's init in new namespaces inside `cgroup`; returns its host PID once it has
/// been set up and is about to exec (setup errors come back typed, not as a dead child).
///
/// The calling process becomes the init's parent and must reap it.
pub fn spawn(cfg: &LaunchConfig<'_>) -> Result<i32, ContainerError> {
    let spec = cfg.spec;
    spec.validate().map_err(ContainerError::Spec)?;
    let nul = |p: &std::path::Path| ContainerError::PathNul {
        path: p.to_path_buf(),
    };
    let p = &spec.process;
    let account = Account::lookup(cfg.rootfs, p.uid, p.gid, spec.userns.map(|m| m.size));
    let env = account::with_home(&p.env, &account.home);
    let plan = InitPlan {
        userns: spec.userns.is_some(),
        cgroup_procs: cfg
            .cgroup
            .procs_files()
            .iter()
            .map(|f| CString::new(f.as_os_str().as_bytes()).map_err(|_| nul(f)))
            .collect::<Result<_, _>>()?,
        rootfs: CString::new(cfg.rootfs.as_os_str().as_bytes()).map_err(|_| nul(cfg.rootfs))?,
        hostname: spec.hostname.as_bytes().to_vec(),
        cwd: CString::new(p.cwd.as_str()).map_err(|_| ContainerError::Command)?,
        cwd_dirs: init::cwd_dirs(&p.cwd).ok_or(ContainerError::Command)?,
        output: cfg.output,
        confinement: Confinement::new(p.uid, p.gid, account.groups)
            .map_err(ContainerError::CapLastCap)?,
        command: Command::new(&p.args, &env).ok_or(ContainerError::Command)?,
    };
    if let Some(map) = spec.userns {
        // As the host's root, before the init loses that power in its user namespace.
        rootfs::prepare_userns_root(cfg.rootfs, map.host_id)?;
    }
    if let Some(net) = &spec.net {
        crate::net::write_etc(cfg.rootfs, &spec.hostname, net).map_err(ContainerError::Net)?;
    }
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET;
    if plan.userns {
        flags |= libc::CLONE_NEWUSER;
    }
    let (parent_sock, child_sock) = sys::socketpair().map_err(ContainerError::Socketpair)?;
    // SAFETY: the child only runs `init::run`, which makes raw system calls on data prepared
    // above (no allocation, no locks) and ends with execve or _exit.
    let pid = unsafe { sys::clone(flags) }.map_err(ContainerError::Clone)?;
    if pid == 0 {
        init::run(&plan, child_sock.as_raw_fd());
    }
    drop(child_sock);
    let sock = parent_sock.as_raw_fd();
    let started = (|| {
        if let Some(map) = spec.userns {
            write_id_maps(pid, map.host_id, map.size)?;
        }
        if let Some(net) = &spec.net {
            // Before the init runs its command: the network is there when the program starts.
            crate::net::attach(pid, net).map_err(ContainerError::Net)?;
        }
        channel::send(sock, channel::Message::Go)
            .map_err(|errno| ContainerError::Channel { pid, errno })
    })();
    if let Err(e) = started {
        sys::kill(pid, libc::SIGKILL);
        let _ = sys::waitpid(pid);
        return Err(e);
    }
    await_exec(sock, pid)?;
    Ok(pid)
}

/// Maps container ids `0..size` to host ids `host_id..` for users and groups. We are root in the
/// parent namespace, so setgroups may stay allowed (the container's root can then drop groups).
fn write_id_maps(pid: i32, host_id: u32, size: u32) -> Result<(), ContainerError> {
    let line = format!("0 {host_id} {size}\n");
    for file in ["uid_map", "gid_map"] {
        let path = std::path::PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::write(&path, &line)
            .map_err(|source| ContainerError::WriteIdMap { path, source })?;
    }
    Ok(())
}
