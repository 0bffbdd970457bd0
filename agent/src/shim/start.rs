//! `mig-shim start`: build the container, report, then supervise it until its init exits.

use super::{chain, read_spec, Stage, StartReport};
use crate::layout::{now, proc_start_ticks, ContainerDir, ExitRecord, ShimRecord, StateDir};
use mig_migrate::criu::{Criu, RestoreOpts};
use mig_runtime::cgroup::Cgroup;
use mig_runtime::container::{self, LaunchConfig};
use mig_runtime::image::ImageStore;
use mig_runtime::spec::{ContainerSpec, Limits};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the log is drained after the init has exited (a process that escaped the PID
/// namespace's teardown could hold the pipe open forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// What exists once the init runs.
struct Running {
    cd: ContainerDir,
    cgroup: Cgroup,
    log_read: OwnedFd,
    log: File,
    init_pid: i32,
}

/// What has been created so far, undone when a later step fails.
#[derive(Default)]
struct Undo {
    cgroup: Option<Cgroup>,
    rootfs: Option<std::path::PathBuf>,
}

impl Undo {
    fn run(self) {
        if let Some(r) = &self.rootfs {
            if let Err(e) = container::unmount_rootfs(r) {
                note!("mig-shim: undo: unmounting {}: {}", r.display(), chain(&e));
            }
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.kill();
            if let Err(e) = destroy_cgroup(cg) {
                note!("mig-shim: undo: removing the cgroup: {}", chain(&e));
            }
        }
    }
}

/// What the shim builds the container from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new container: spawn its init.
    Start,
    /// A checkpointed container: verify its image set and restore it with CRIU.
    Restore,
}

/// Runs `mig-shim start` or `mig-shim restore`; returns the process exit code.
pub fn start(state_dir: &Path, id: &str, cgroup_parent: &str, mode: Mode) -> i32 {
    // Own session: the container outlives migd and its terminal.
    if let Err(e) = nix::unistd::setsid() {
        note!("mig-shim: setsid: {e}");
    }
    // Orphans of the container (re-parented past the init) are reaped here.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        note!("mig-shim: PR_SET_CHILD_SUBREAPER: {e}");
    }
    let mut undo = Undo::default();
    let running = match prepare(state_dir, id, cgroup_parent, mode, &mut undo) {
        Ok(r) => r,
        Err((stage, message)) => {
            undo.run();
            note!("mig-shim: {}: {message}", stage.as_str());
            report(&StartReport::Failed { stage, message });
            return 1;
        }
    };
    report(&StartReport::Started {
        init_pid: running.init_pid,
    });
    detach_stdio();
    supervise(running);
    0
}

fn report(r: &StartReport) {
    let mut line = serde_json::to_string(r).unwrap_or_else(|_| {
        r#"{"status":"failed","stage":"record","message":"cannot encode the report"}"#.into()
    });
    line.push('\n');
    let mut out = std::io::stdout().lock();
    // migd may be gone; the container runs on regardless.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Points stdin and stdout at /dev/null (closing the report pipe); stderr stays on shim.log.
fn detach_stdio() {
    match File::options().read(true).write(true).open("/dev/null") {
        Ok(null) => {
            for fd in [0, 1] {
                if let Err(e) = nix::unistd::dup2(null.as_raw_fd(), fd) {
                    note!("mig-shim: dup2 /dev/null onto {fd}: {e}");
                }
            }
        }
        Err(e) => note!("mig-shim: opening /dev/null: {e}"),
    }
}

fn prepare(
    state_dir: &Path,
    id: &str,
    cgroup_parent: &str,
    mode: Mode,
    undo: &mut Undo,
) -> Result<Running, (Stage, String)> {
    let spec: ContainerSpec = read_spec(state_dir, id).map_err(|e| (Stage::Spec, chain(&e)))?;
    let dirs = StateDir::new(state_dir);
    let cd = dirs.container(id);
    // A checkpoint is verified (every file against the manifest) before anything is built.
    let manifest = match mode {
        Mode::Start => None,
        Mode::Restore => {
            // Not hashed again when migd left a note that it hashed every file on arrival.
            let (m, _) = mig_migrate::imageset::verify_or_trust(&cd.checkpoint())
                .map_err(|e| (Stage::Checkpoint, chain(&e)))?;
            // An imported checkpoint may run under a new id and name; its image must match.
            if m.spec.image.layers != spec.image.layers {
                return Err((
                    Stage::Checkpoint,
                    format!(
                        "the checkpoint was made from other image layers than container {}",
                        spec.id
                    ),
                ));
            }
            Some(m)
        }
    };
    // CRIU and its helper tasks run in the container's cgroup before the restored tasks do: a
    // container near its pids limit could not be restored under it ("Can't fork for N:
    // Resource temporarily unavailable"). The limit is set once CRIU is done (below).
    let initial = match mode {
        Mode::Start => spec.limits.clone(),
        Mode::Restore => Limits {
            pids: None,
            ..spec.limits.clone()
        },
    };
    let cgroup = Cgroup::create(&format!("{cgroup_parent}/{id}"), &initial)
        .map_err(|e| (Stage::Cgroup, chain(&e)))?;
    undo.cgroup = Some(cgroup.clone());
    let log = crate::layout::open_log(&cd.log())
        .map_err(|e| (Stage::Log, format!("{}: {e}", cd.log().display())))?;
    let images = ImageStore::open(&dirs.images()).map_err(|e| (Stage::Rootfs, chain(&e)))?;
    let mut lower = Vec::new();
    for l in &spec.image.layers {
        let d = images.layer_dir(l);
        if !d.is_dir() {
            return Err((
                Stage::Rootfs,
                format!("layer {l} is missing at {}", d.display()),
            ));
        }
        lower.push(d);
    }
    let rootfs = cd.rootfs();
    match &spec.userns {
        None => container::mount_rootfs(&lower, &cd.upper(), &cd.work(), &rootfs),
        // Idmapped layers: the container's root owns the image's files as root does elsewhere.
        Some(map) => container::userns::mount_rootfs(
            &lower,
            &cd.upper(),
            &cd.work(),
            &rootfs,
            map,
        )
        .map(|ids| {
            if let container::userns::LayerIds::Unmapped(errno) = ids {
                note!(
                    "mig-shim: the kernel refused idmapped image layers ({errno}): the image's files keep their host owners, read-only to the container"
                );
            }
        }),
    }
    .map_err(|e| (Stage::Rootfs, chain(&e)))?;
    undo.rootfs = Some(rootfs.clone());
    // The read end stays here (close-on-exec); the write end becomes the init's stdout and stderr.
    let (log_read, log_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| (Stage::Log, format!("pipe2: {e}")))?;
    let init_pid = match &manifest {
        None => container::spawn(&LaunchConfig {
            spec: &spec,
            rootfs: &rootfs,
            cgroup: &cgroup,
            output: log_write.as_raw_fd(),
        })
        .map_err(|e| (Stage::Spawn, spawn_failure(&spec, Some(&rootfs), &e)))?,
        Some(m) => restore(
            &cd,
            &rootfs,
            &cgroup,
            log_write.as_raw_fd(),
            m.stdio_pipe.as_deref(),
            spec.net.as_ref(),
            &m.spec,
        )?,
    };
    drop(log_write);
    if manifest.is_some() {
        // The restored tasks are no more than were dumped under the limit: it holds again.
        if let Err(e) = cgroup.set_limits(&spec.limits) {
            let _ = nix::sys::signal::kill(Pid::from_raw(init_pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(init_pid), None);
            return Err((
                Stage::Restore,
                format!("setting the limits after the restore: {}", chain(&e)),
            ));
        }
    }
    let record = ShimRecord {
        shim_pid: std::process::id() as i32,
        init_pid,
        started: now(),
        init_start_ticks: proc_start_ticks(init_pid).unwrap_or(0),
    };
    if let Err(e) = crate::layout::write_record(&cd.shim(), &record) {
        let _ = nix::sys::signal::kill(Pid::from_raw(init_pid), Signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(init_pid), None);
        return Err((Stage::Record, e.to_string()));
    }
    Ok(Running {
        cd,
        cgroup,
        log_read,
        log,
        init_pid,
    })
}

/// The work directory of a waiting `criu lazy-pages` daemon for this container, if any.
fn lazy_socket(cd: &ContainerDir) -> Option<std::path::PathBuf> {
    let dir = cd.dir.join(crate::migration::pages::LAZY_DIR);
    dir.join("lazy-pages.socket").exists().then_some(dir)
}

/// Restores the checkpoint with `criu restore -d`: the restored tasks are born in the cgroup, the
/// init's output pipe is replaced by our log pipe (inherit-fd), and the restored init is
/// re-parented to this shim (a child subreaper) when CRIU exits.
fn restore(
    cd: &ContainerDir,
    rootfs: &Path,
    cgroup: &Cgroup,
    log_write: std::os::fd::RawFd,
    stdio_pipe: Option<&str>,
    net: Option<&mig_runtime::net::NetSpec>,
    dumped: &ContainerSpec,
) -> Result<i32, (Stage, String)> {
    let criu = Criu::locate().map_err(|e| (Stage::Restore, chain(&e)))?;
    if let Some(n) = net {
        mig_runtime::net::before_restore(n).map_err(|e| (Stage::Restore, chain(&e)))?;
    }
    // A loopback-only container's network namespace was left out of the dump (1.3 source):
    // CRIU joins a fresh one with `lo` up. Closed (dropped) when this returns, on every path.
    let netns = match mig_migrate::criu::images_external_netns(&cd.checkpoint()) {
        Ok(true) => {
            Some(container::LoopbackNetns::create().map_err(|e| (Stage::Restore, chain(&e)))?)
        }
        Ok(false) => None,
        Err(e) => return Err((Stage::Checkpoint, chain(&e))),
    };
    let pidfile = cd.dir.join("restore.pid");
    let _ = std::fs::remove_file(&pidfile);
    // An arriving container stays frozen until Commit: it is frozen before its tasks resume.
    let frozen = super::frozen::wanted(cd);
    let action_script = if frozen {
        Some(super::frozen::prepare(cd, cgroup).map_err(|e| (Stage::Restore, e))?)
    } else {
        None
    };
    let opts = RestoreOpts {
        images_dir: cd.checkpoint(),
        root: Some(rootfs.to_owned()),
        inherit_fds: stdio_pipe
            .map(|p| (log_write, p.to_owned()))
            .into_iter()
            .chain(netns.as_ref().map(container::LoopbackNetns::inherit_fd))
            .collect(),
        cgroup_procs: cgroup.procs_files(),
        log_file: "restore.log".into(),
        // Outside the image set, which must verify again for the next restore.
        pidfile,
        // CRIU recreates the veth: eth0 inside, the recorded host end in the bridge.
        // A user-namespace container's host binds (devices, masked files), as dumped.
        external: net
            .map(|n| vec![mig_runtime::net::criu_restore_external(n)])
            .into_iter()
            .flatten()
            .chain(container::restore_externals(dumped))
            .collect(),
        // Connections dumped with --tcp-established need it again (docs/networking.md).
        tcp_established: mig_runtime::net::images_have_tcp(&cd.checkpoint()),
        // Post-copy (`mig move --mode lazy`): the agent started `criu lazy-pages` with its
        // socket there; memory then comes from it (agent/src/migration/pages.rs).
        lazy_pages: lazy_socket(cd).is_some(),
        work_dir: lazy_socket(cd),
        action_script,
        ..Default::default()
    };
    let oom_before = cgroup.usage().map_or(0, |u| u.oom_kills);
    let outcome = criu.restore(&opts).map_err(|e| {
        // CRIU's restore runs in the container's cgroup: a memory limit the restored memory
        // does not fit kills it, which CRIU's error only shows as a signal (QA of session 23).
        let oom = cgroup
            .usage()
            .map_or(0, |u| u.oom_kills.saturating_sub(oom_before));
        let mut msg = chain(&e);
        if oom > 0 {
            msg.push_str(&format!(
                "; the OOM killer ended {oom} process(es) of the restore inside the container's memory limit{}: the restored memory does not fit it",
                dumped
                    .limits
                    .memory
                    .map_or_else(String::new, |l| format!(" ({} MiB)", l >> 20))
            ));
        }
        (Stage::Restore, msg)
    });
    // The restored tasks hold the namespace now (or the restore failed): ours goes.
    drop(netns);
    if frozen {
        super::frozen::finish(cd);
    }
    let outcome = outcome?;
    if frozen {
        keep_frozen(cgroup, outcome.pid)?;
    }
    // CRIU restores no CPU masks: those the checkpoint narrowed are set again.
    let pids = cgroup.procs().unwrap_or_else(|_| vec![outcome.pid]);
    match mig_runtime::affinity::restore(&cd.checkpoint(), &pids) {
        Ok(r) if r.skipped > 0 => note!(
            "mig-shim: {} of {} saved CPU masks not set (no such thread, or none of its CPUs online here)",
            r.skipped,
            r.set + r.skipped
        ),
        Ok(_) => {}
        Err(e) => note!("mig-shim: cannot set the saved CPU masks: {e}"),
    }
    if let Some(n) = net {
        // The host end up in the bridge, and a gratuitous ARP so the segment learns the move.
        if let Err(e) = mig_runtime::net::after_restore(outcome.pid, n) {
            let _ = nix::sys::signal::kill(Pid::from_raw(outcome.pid), Signal::SIGKILL);
            return Err((Stage::Restore, chain(&e)));
        }
    }
    Ok(outcome.pid)
}

/// Checks that the restore left the cgroup frozen (CRIU only logs a failed action script: then
/// the tasks ran for a moment, and are frozen here, late); kills the tree when it cannot be.
fn keep_frozen(cgroup: &Cgroup, pid: i32) -> Result<(), (Stage, String)> {
    use mig_runtime::cgroup::FreezeState;
    if !matches!(
        cgroup.freeze_state(),
        Ok(FreezeState::Frozen | FreezeState::Freezing)
    ) {
        note!("mig-shim: the restored tasks were not frozen before they resumed; freezing now");
    }
    cgroup.freeze(Duration::from_secs(5)).map_err(|e| {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        (
            Stage::Restore,
            format!("keeping the restored container frozen: {}", chain(&e)),
        )
    })
}

/// Copies the log and reaps children until the init has exited, then tears down and records.
fn supervise(mut r: Running) {
    let mut buf = vec![0u8; 64 << 10];
    let mut log_open = true;
    // Output that could not be written (a full disk): dropped, counted, and said once each way.
    let mut lost: u64 = 0;
    let mut status: Option<(i32, Option<i32>)> = None;
    let mut ended_at: Option<Instant> = None;
    loop {
        if log_open {
            let mut fds = [PollFd::new(r.log_read.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(n) if n > 0 => match nix::unistd::read(r.log_read.as_raw_fd(), &mut buf) {
                    Ok(0) => log_open = false,
                    Ok(n) => match r.log.write_all(&buf[..n]) {
                        Ok(()) if lost > 0 => {
                            note!("mig-shim: container.log is written again; {lost} bytes of output were lost");
                            lost = 0;
                        }
                        Ok(()) => {}
                        Err(e) => {
                            if lost == 0 {
                                note!("mig-shim: writing container.log: {e}; the output is dropped until it can be written");
                            }
                            lost = lost.saturating_add(n as u64);
                        }
                    },
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Err(e) => {
                        note!("mig-shim: reading the log pipe: {e}");
                        log_open = false;
                    }
                },
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    note!("mig-shim: poll: {e}");
                    log_open = false;
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        reap(r.init_pid, &mut status);
        if status.is_some() && ended_at.is_none() {
            ended_at = Some(Instant::now());
            // The PID namespace ends with its init; make sure nothing else of the container stays.
            let _ = r.cgroup.kill();
        }
        if let Some(t) = ended_at {
            if !log_open || t.elapsed() > DRAIN_LIMIT {
                break;
            }
        }
    }
    let (code, signal) = status.unwrap_or((255, None));
    let oom_killed = r.cgroup.usage().map(|u| u.oom_kills > 0).unwrap_or(false);
    teardown(&r);
    let exit = ExitRecord {
        code,
        signal,
        oom_killed,
        finished: now(),
    };
    if let Err(e) = crate::layout::write_record(&r.cd.exit(), &exit) {
        note!("mig-shim: writing exit.json: {e}");
    }
}

/// Reaps every exited child; records the init's status.
fn reap(init_pid: i32, status: &mut Option<(i32, Option<i32>)>) {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == init_pid => {
                *status = Some((code, None))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == init_pid => {
                *status = Some((128 + sig as i32, Some(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                note!("mig-shim: waitpid: {e}");
                return;
            }
        }
    }
}

/// Kills what is left, unmounts the rootfs and removes the cgroup.
fn teardown(r: &Running) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let _ = r.cgroup.kill();
    while Instant::now() < deadline {
        let mut none = None;
        reap(-1, &mut none);
        if r.cgroup.procs().map(|p| p.is_empty()).unwrap_or(true) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = container::unmount_rootfs(&r.cd.rootfs()) {
        note!("mig-shim: unmounting the rootfs: {}", chain(&e));
    }
    if let Err(e) = destroy_cgroup(&r.cgroup) {
        note!("mig-shim: removing the cgroup: {}", chain(&e));
    }
}

/// Removes the cgroup, retrying briefly while the kernel finishes releasing its last tasks.
fn destroy_cgroup(cg: &Cgroup) -> Result<(), mig_runtime::cgroup::CgroupError> {
    let mut last = Ok(());
    for _ in 0..50 {
        last = cg.destroy();
        if last.is_ok() {
            return last;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last
}

/// The reason a start failed, in words a user acts on when the command itself is the problem:
/// `run debian -- nosuchcmd` said only `container setup failed at step executing the command
/// (pid N): ENOENT: No such file or directory`.
/// With the container's root (`root`), a command whose file is there but whose interpreter is
/// not is named as such.
fn spawn_failure(
    spec: &ContainerSpec,
    root: Option<&std::path::Path>,
    e: &container::ContainerError,
) -> String {
    let cmd = spec.process.args.first().map(String::as_str).unwrap_or("");
    let path = spec
        .process
        .env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(container::DEFAULT_PATH);
    let missing = root
        .filter(|_| e.exec_failure() == Some(container::ExecFailure::NotFound))
        .and_then(|r| container::missing_interpreter(r, cmd, &spec.process.cwd, path));
    if let Some(m) = missing {
        return format!(
            "the command {cmd:?} cannot be executed: {}",
            interpreter_words(&m)
        );
    }
    match e.exec_failure() {
        Some(container::ExecFailure::NotFound) if cmd.contains('/') => {
            format!("the command {cmd:?} is not in the image")
        }
        Some(container::ExecFailure::NotFound) => {
            format!("the command {cmd:?} is not in the image (searched PATH {path})")
        }
        Some(container::ExecFailure::NotExecutable) => {
            format!("the command {cmd:?} cannot be executed: {}", chain(e))
        }
        None => chain(e),
    }
}

/// "it is FILE in the image, but its interpreter ... is not" for a user who would look for the
/// wrong file.
pub(crate) fn interpreter_words(m: &container::MissingInterpreter) -> String {
    if m.script {
        format!(
            "it is {} in the image, but the interpreter its #! line names, {}, is not",
            m.file, m.interpreter
        )
    } else {
        format!(
            "it is {} in the image, but its ELF interpreter (dynamic loader) {} is not: a dynamically linked program needs its loader and libraries in the image",
            m.file, m.interpreter
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mig_runtime::container::{ContainerError, Step};

    fn spec_with(args: &[&str], env: &[&str]) -> ContainerSpec {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        ContainerSpec {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "c".into(),
            image: mig_runtime::spec::ImageRef {
                name: "i".into(),
                id: format!("sha256:{}", "a".repeat(64)),
                layers: Vec::new(),
            },
            process: mig_runtime::spec::ProcessSpec {
                args: strings(args),
                env: strings(env),
                cwd: "/".into(),
                uid: 0,
                gid: 0,
            },
            hostname: "c".into(),
            limits: Limits::default(),
            userns: None,
            net: None,
        }
    }

    /// `mig run IMAGE -- nosuchcmd` said `container setup failed at step executing the command
    /// (pid N): ENOENT: No such file or directory`.
    #[test]
    fn a_missing_command_is_named_with_the_path_searched() {
        let exec = |errno| ContainerError::Step {
            step: Step::Exec,
            pid: 7,
            errno,
        };
        let spec = spec_with(&["nosuchcmd"], &["PATH=/x:/y"]);
        assert_eq!(
            spawn_failure(&spec, None, &exec(Errno::ENOENT)),
            "the command \"nosuchcmd\" is not in the image (searched PATH /x:/y)"
        );
        let spec = spec_with(&["nosuchcmd"], &[]);
        assert!(spawn_failure(&spec, None, &exec(Errno::ENOENT)).contains(container::DEFAULT_PATH));
        let spec = spec_with(&["/opt/app"], &[]);
        assert_eq!(
            spawn_failure(&spec, None, &exec(Errno::ENOENT)),
            "the command \"/opt/app\" is not in the image"
        );
        let m = spawn_failure(&spec, None, &exec(Errno::EACCES));
        assert!(
            m.starts_with("the command \"/opt/app\" cannot be executed: "),
            "{m}"
        );
        // Other failures keep their own words.
        let other = ContainerError::Step {
            step: Step::PivotRoot,
            pid: 7,
            errno: Errno::EINVAL,
        };
        assert_eq!(spawn_failure(&spec, None, &other), chain(&other));
    }
}
