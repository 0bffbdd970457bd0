//! Lab agents as processes: started in a host's network namespace (and nothing else), in their own
//! session, found again by PID and command line, stopped by PID.

use super::net;
use super::{LabError, LabHost};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long an agent gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// Lines of the agent log quoted in start errors.
const LOG_TAIL_LINES: usize = 20;

/// The agent's log file: `<root_dir>/<host>.log`.
pub(crate) fn log_path(root_dir: &Path, host: &str) -> PathBuf {
    root_dir.join(format!("{host}.log"))
}

/// The agent's arguments, with `{addr}`, `{port}` and `{host}` substituted in the extra ones. Its
/// containers' cgroups go under `mig-<lab>-<host>`, so that labs with hosts of the same name (every
/// lab has a `host-a`) never share cgroups.
pub(crate) fn agent_args(lab: &str, host: &LabHost, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--state-dir".to_string(),
        host.state_dir.display().to_string(),
        "--socket".to_string(),
        host.socket.display().to_string(),
        "--name".to_string(),
        host.name.clone(),
        "--cgroup-parent".to_string(),
        cgroup_parent(lab, &host.name),
    ];
    args.extend(extra.iter().map(|a| {
        a.replace("{addr}", &host.address.to_string())
            .replace("{port}", &host.quic_port.to_string())
            .replace("{host}", &host.name)
    }));
    args
}

/// The cgroup parent of `host`'s containers.
pub(crate) fn cgroup_parent(lab: &str, host: &str) -> String {
    format!("mig-{lab}-{host}")
}

/// Starts `migd` for `host` in the host's network namespace, in a new session, with stdout and
/// stderr appended to its log; returns its PID without waiting for it to be ready.
pub(crate) fn start_agent(
    lab: &str,
    host: &LabHost,
    migd: &Path,
    extra: &[String],
    root_dir: &Path,
) -> Result<i32, LabError> {
    let ns_path = net::netns_path(&host.netns);
    // Opened here, before the fork, so the child only makes syscalls. O_CLOEXEC (std's default)
    // closes it in the agent at exec.
    let netns = File::open(&ns_path).map_err(|source| LabError::OpenNetns {
        path: ns_path.clone(),
        source,
    })?;
    let log = log_path(root_dir, &host.name);
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| LabError::OpenLog {
                path: log.clone(),
                source,
            })
    };
    let (out, err) = (open_log()?, open_log()?);
    let mut cmd = Command::new(migd);
    cmd.args(agent_args(lab, host, extra))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the forked child before exec and only makes syscalls (see
    // `enter_host`); it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || enter_host(&netns));
    }
    let child = cmd.spawn().map_err(|source| LabError::SpawnAgent {
        host: host.name.clone(),
        migd: migd.to_path_buf(),
        source,
    })?;
    // The Child handle is dropped without waiting: the agent outlives this process. If it is our
    // child when it exits, `reap` collects it.
    Ok(child.id() as i32)
}

/// In the agent's child, between fork and exec: joins the host's network namespace (and no other),
/// starts a session, and marks every descriptor above stdio close-on-exec (one the caller inherited
/// without O_CLOEXEC, a test harness's pipe say, must not live on in a daemon).
fn enter_host(netns: &File) -> std::io::Result<()> {
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    nix::unistd::setsid()?;
    // SAFETY: close_range only sets a flag on this process's descriptors. Failure (a kernel before
    // 5.11) is harmless: it is ignored.
    let _ = unsafe {
        libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    };
    Ok(())
}

/// Waits until `host`'s socket exists, failing early (quoting the log) if the agent exits.
pub(crate) fn wait_for_socket(
    host: &LabHost,
    pid: i32,
    root_dir: &Path,
    timeout: Duration,
) -> Result<(), LabError> {
    let log = log_path(root_dir, &host.name);
    let start = Instant::now();
    // The socket is bound before the agent has started (its migration endpoint, its peers):
    // up means it answers a hello (QA of session 25: an agent that exited on a damaged
    // peers.json right after binding was reported started).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok();
    let answers = || {
        rt.as_ref().is_none_or(|rt| {
            rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    crate::client::Client::connect(&host.socket),
                )
                .await
                .is_ok_and(|c| c.is_ok())
            })
        })
    };
    loop {
        if host.socket.exists() && answers() {
            return Ok(());
        }
        if let Some(status) = reap(pid) {
            return Err(LabError::AgentExited {
                host: host.name.clone(),
                status,
                socket: host.socket.clone(),
                log_tail: log_tail(&log),
                log,
            });
        }
        if !pid_alive(pid) {
            return Err(LabError::AgentExited {
                host: host.name.clone(),
                status: "gone".to_string(),
                socket: host.socket.clone(),
                log_tail: log_tail(&log),
                log,
            });
        }
        if start.elapsed() > timeout {
            return Err(LabError::AgentTimeout {
                host: host.name.clone(),
                socket: host.socket.clone(),
                timeout,
                log_tail: log_tail(&log),
                log,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The last lines of a log file (empty if unreadable).
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Collects `pid` if it is our exited child; returns its status then. None otherwise (not our
/// child, or still running).
pub(crate) fn reap(pid: i32) -> Option<String> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("exit code {code}")),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
        _ => None,
    }
}

/// True while `pid` exists and is not a zombie.
pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ") ".
    match stat.rfind(") ") {
        Some(i) => !matches!(stat.as_bytes().get(i + 2), Some(b'Z') | Some(b'X')),
        None => false,
    }
}

/// The command line of `pid`, split at NULs.
pub(crate) fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// True when `args` is an agent command line with `--socket socket`.
fn is_agent_cmdline(args: &[String], socket: &Path) -> bool {
    let socket = socket.display().to_string();
    args.windows(2)
        .any(|w| w[0] == "--socket" && w[1] == socket)
        || args.iter().any(|a| a == &format!("--socket={socket}"))
}

/// True when `pid` runs and is the lab agent listening on `socket` (guards against PID reuse).
pub(crate) fn agent_alive(pid: i32, socket: &Path) -> bool {
    pid_alive(pid) && is_agent_cmdline(&cmdline(pid), socket)
}

/// PIDs of running agents whose `--socket` is `socket` (finds agents whose PID was not recorded).
pub(crate) fn find_agents(socket: &Path) -> Vec<i32> {
    all_pids().filter(|&pid| agent_alive(pid, socket)).collect()
}

/// Every process of the machine (as this process's PID namespace sees them).
pub(crate) fn all_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
}

/// How long `mig lab restart` lets an agent finish its moves after SIGTERM: migd waits up to 5
/// minutes for them (a post-copy's last page included), and a SIGKILL before that cut them (QA of
/// session 26: a lazy move's container lost on its destination).
pub(crate) const RESTART_GRACE: Duration = Duration::from_secs(310);

/// Stops agent `pid` of `host`: SIGTERM, a grace period, then SIGKILL. Not an error when it is not
/// running (or the PID now belongs to something else).
pub(crate) fn stop_agent(host: &str, pid: i32, socket: &Path) -> Result<bool, LabError> {
    stop_agent_within(host, pid, socket, STOP_GRACE)
}

/// [`stop_agent`] with `grace` before the SIGKILL; past [`STOP_GRACE`] it says once what it
/// waits for.
pub(crate) fn stop_agent_within(
    host: &str,
    pid: i32,
    socket: &Path,
    grace: Duration,
) -> Result<bool, LabError> {
    if !agent_alive(pid, socket) {
        reap(pid);
        return Ok(false);
    }
    signal(pid, Signal::SIGTERM)?;
    if wait_gone(pid, STOP_GRACE.min(grace)) {
        return Ok(true);
    }
    if grace > STOP_GRACE {
        eprintln!(
            "waiting for {host}'s agent (pid {pid}) to end: it finishes the moves under way first (up to {} s; its log says which)",
            grace.as_secs()
        );
        if wait_gone(pid, grace - STOP_GRACE) {
            return Ok(true);
        }
    }
    signal(pid, Signal::SIGKILL)?;
    if wait_gone(pid, STOP_GRACE) {
        return Ok(true);
    }
    Err(LabError::AgentStop {
        host: host.to_string(),
        pid,
    })
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal(pid: i32, sig: Signal) -> Result<(), LabError> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(LabError::Kill { pid, source }),
    }
}

/// Waits up to `timeout` for `pid` to be gone (reaping it if it is our child).
pub(crate) fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        reap(pid);
        if !pid_alive(pid) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn host() -> LabHost {
        LabHost {
            name: "host-b".into(),
            address: Ipv4Addr::new(10, 1, 2, 11),
            netns: "x-host-b".into(),
            socket: "/run/x/host-b.sock".into(),
            state_dir: "/var/x/host-b".into(),
            agent_pid: None,
            fingerprint: None,
            quic_port: 7000,
        }
    }

    #[test]
    fn args_substitute_placeholders() {
        let args = agent_args(
            "lab1",
            &host(),
            &["--listen".into(), "{addr}:{port}".into(), "{host}".into()],
        );
        assert_eq!(
            args,
            [
                "--state-dir",
                "/var/x/host-b",
                "--socket",
                "/run/x/host-b.sock",
                "--name",
                "host-b",
                "--cgroup-parent",
                "mig-lab1-host-b",
                "--listen",
                "10.1.2.11:7000",
                "host-b"
            ]
        );
    }

    #[test]
    fn agent_cmdline_matches_its_socket_only() {
        let args = agent_args("lab1", &host(), &[]);
        let mut argv = vec!["migd".to_string()];
        argv.extend(args);
        assert!(is_agent_cmdline(&argv, Path::new("/run/x/host-b.sock")));
        assert!(!is_agent_cmdline(&argv, Path::new("/run/x/host-a.sock")));
    }

    #[test]
    fn liveness_of_self_and_nonsense() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-5));
    }
}
