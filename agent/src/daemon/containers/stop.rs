//! Ending containers: `stop` (SIGTERM, then SIGKILL), `kill`, `remove`, the waits for a
//! container or its shim to be gone, and the marks of the containers being stopped.

use super::{internal, invalid};
use crate::api::{ApiError, ContainerState, ErrorKind};
use crate::daemon::Agent;
use mig_runtime::cgroup::Cgroup;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How long to wait for a killed container's shim to clean up and exit.
const KILL_GRACE: Duration = Duration::from_secs(15);
/// How long `kill` with SIGKILL waits for the container to end.
const KILL_WAIT: Duration = Duration::from_secs(10);

impl Agent {
    /// Waits until the container is no longer live; false on timeout.
    async fn wait_ended(&self, id: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            self.refresh(id);
            if !self.is_live(id) {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to the init, SIGKILL to the whole container after `timeout`.
    pub(crate) async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ApiError> {
        self.refresh(id);
        let e = self.entry(id)?;
        if e.busy {
            return Err(self.busy_error(id, &e));
        }
        if !e.state.state.is_live() {
            return Ok(());
        }
        // A move or checkpoint must not start while the container is being stopped.
        let _stopping = STOPPING.hold(id);
        self.update(id, |e| e.state.stop_requested = true);
        if let Some(pid) = self.init_pid_of(id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if !timeout.is_zero() && self.wait_ended(id, timeout).await {
            return Ok(());
        }
        if let Some(pid) = self.init_pid_of(id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Ok(cg) = Cgroup::open(&e.state.cgroup) {
            let _ = cg.kill();
        }
        if self.wait_ended(id, KILL_GRACE).await {
            Ok(())
        } else {
            Err(internal(format!(
                "container {} did not end within {} s of SIGKILL",
                e.spec.name,
                KILL_GRACE.as_secs()
            )))
        }
    }

    pub(crate) fn kill(&self, id: &str, signal: i32) -> Result<(), ApiError> {
        let sig =
            Signal::try_from(signal).map_err(|_| invalid(format!("invalid signal {signal}")))?;
        self.refresh(id);
        let e = self.entry(id)?;
        // A copy frozen by a move (or a checkpoint) is not the container's to signal: a move in
        // doubt may still resume it here.
        if e.busy {
            return Err(self.busy_error(id, &e));
        }
        let pid = match (e.state.state, self.init_pid_of(id)) {
            (ContainerState::Running, Some(p)) => p,
            _ => {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!("container {} is not running", e.spec.name),
                ))
            }
        };
        // A signal meant to end it (as `mig stop` sends) makes its end a stop; another (SIGHUP
        // to reload, SIGUSR1, ...) does not: if it exits later on its own, it exited.
        if matches!(
            sig,
            Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT
        ) {
            self.update(id, |e| e.state.stop_requested = true);
        }
        kill(Pid::from_raw(pid), sig).map_err(|e| internal(format!("kill {pid}: {e}")))
    }

    /// `kill` with SIGKILL: returns once the container has ended (so a `remove` right after it
    /// works, as after podman's kill), at most [`KILL_WAIT`]; other signals return at once.
    pub(crate) async fn kill_and_wait(&self, id: &str, signal: i32) -> Result<(), ApiError> {
        self.kill(id, signal)?;
        if signal != Signal::SIGKILL as i32 || self.wait_ended(id, KILL_WAIT).await {
            return Ok(());
        }
        let name = self.entry(id).map(|e| e.spec.name).unwrap_or_default();
        Err(internal(format!(
            "container {name} was sent SIGKILL but has not ended within {} s",
            KILL_WAIT.as_secs()
        )))
    }

    pub(crate) async fn remove(&self, id: &str, force: bool) -> Result<(), ApiError> {
        self.refresh(id);
        let e = self.entry(id)?;
        if e.busy || e.state.state.is_live() {
            // Busy (moving, in doubt, checkpointed): why, as `stop` says it, not "running" (QA
            // of session 31, L5: `rm` said "stop it first", and `stop` refused).
            if !force && e.busy {
                return Err(self.busy_error(id, &e));
            }
            if !force {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "container {} is running: stop it first or use -f",
                        e.spec.name
                    ),
                ));
            }
            self.stop(id, Duration::ZERO).await?;
        }
        // The shim writes its exit record (and removes the rootfs mount and the cgroup) just
        // before it exits: it must be gone before its directory is removed.
        if !self.wait_shim_gone(id, KILL_GRACE).await {
            return Err(internal(format!(
                "the shim of container {} did not exit within {} s",
                e.spec.name,
                KILL_GRACE.as_secs()
            )));
        }
        self.cleanup_resources(id, &e.state.cgroup);
        let cd = self.dirs.container(id);
        if crate::daemon::is_mounted(&cd.rootfs()) {
            return Err(internal(format!(
                "{} is still mounted",
                cd.rootfs().display()
            )));
        }
        remove_tree(&cd.dir)
            .await
            .map_err(|err| internal(format!("removing {}: {err}", cd.dir.display())))?;
        // A move's mark dies with the container (an id that comes back later starts clean).
        crate::migration::mark_frozen(id, false);
        crate::migration::also_runs_on_peer(id, None);
        if self.lock().remove(id).is_none() {
            // Another removal of the same container finished first.
            return Ok(());
        }
        tracing::info!(%id, "container removed");
        self.emit(crate::daemon::events::EventKind::ContainerRemoved {
            id: id.to_owned(),
            name: e.spec.name.clone(),
            moved_to: self.moved_to(id),
        });
        Ok(())
    }
}

impl Agent {
    /// Waits until the container's shim (if any) has exited; false on timeout.
    pub(crate) async fn wait_shim_gone(&self, id: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.live_shim(id).is_some() {
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Removes a container directory; gone already is fine. Retried a few times when an entry
/// appears or vanishes under it meanwhile (a record written at the last moment, a concurrent
/// removal), which `remove_dir_all` reports as "Directory not empty" or "No such file".
async fn remove_tree(dir: &std::path::Path) -> std::io::Result<()> {
    let mut attempt = 0;
    loop {
        // Off the runtime's threads: a writable layer of 50,000 files took seconds, and with
        // them blocked this agent answered nothing, a move back to it included ("cannot reach
        // host-a: timed out", QA of session 32, F1).
        let d = dir.to_owned();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match removed {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => return Ok(()),
            Err(e)
                if attempt < 5
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::NotFound
                    ) =>
            {
                attempt += 1;
                tracing::debug!(dir = %dir.display(), error = %e, "retrying the removal");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Containers whose `stop` is under way (ids), so that a move or a checkpoint of one is refused.
static STOPPING: crate::daemon::marks::Marks = crate::daemon::marks::Marks::new();

/// Whether `mig stop` of container `id` is under way.
pub(crate) fn is_stopping(id: &str) -> bool {
    STOPPING.contains(id)
}
