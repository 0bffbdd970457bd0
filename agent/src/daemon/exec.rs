//! `exec`: runs `mig-shim exec` (which joins the container) and returns the command's result.

use super::Agent;
use crate::api::{
    ApiError, ContainerState, ErrorKind, ExecOptions, ExecResult, Response, MAX_EXEC_STDIN,
};
use crate::layout::StateDir;
use crate::shim::EXEC_ERROR_MARKER;
use mig_runtime::image::ImageError;
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How the runtime names the step that fails when `--workdir` does not exist
/// (`mig_runtime::container` channel steps).
const CHDIR_STEP: &str = "changing to the working directory";

/// At most this much of each output stream is returned.
const MAX_OUTPUT: usize = 4 << 20;

impl Agent {
    pub(crate) async fn exec(
        self: &Arc<Self>,
        container: &str,
        args: Vec<String>,
        opts: ExecOptions,
    ) -> Result<Response, ApiError> {
        let ExecOptions {
            env,
            user,
            workdir,
            stdin,
        } = opts;
        let id = self.resolve(container)?;
        self.refresh(&id);
        let e = self.entry(&id)?;
        if e.state.state != ContainerState::Running || e.busy {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!("container {} is not running", e.spec.name),
            ));
        }
        if args.is_empty() || args[0].is_empty() {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "the command is empty",
            ));
        }
        if args.iter().chain(&env).any(|a| a.contains('\0')) {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "an argument contains a NUL byte",
            ));
        }
        if let Some(bad) = env
            .iter()
            .find(|kv| !matches!(kv.split_once('='), Some((k, _)) if !k.is_empty()))
        {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("invalid environment entry {bad:?}: expected KEY=VALUE"),
            ));
        }
        if let Some(w) = &workdir {
            check_workdir(w)?;
        }
        if let Some(data) = &stdin {
            if data.len() > MAX_EXEC_STDIN {
                return Err(ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "the standard input is {} bytes, more than the {MAX_EXEC_STDIN} exec takes",
                        data.len()
                    ),
                ));
            }
        }
        let ids = match &user {
            None => None,
            Some(u) => Some(
                self.exec_user(&id, &e.spec.name, &e.spec.image.layers, u)
                    .await?,
            ),
        };
        let mut cmd = Command::new(&self.cfg.shim);
        cmd.arg("exec")
            .arg("--state-dir")
            .arg(&self.cfg.state_dir)
            .arg("--id")
            .arg(&id)
            .arg("--cgroup-parent")
            .arg(&self.cfg.cgroup_parent);
        for kv in &env {
            cmd.arg("--env").arg(kv);
        }
        if let Some((uid, gid)) = ids {
            cmd.arg("--user").arg(format!("{uid}:{gid}"));
        }
        if let Some(w) = &workdir {
            cmd.arg("--workdir").arg(w);
        }
        cmd.arg("--").args(&args);
        let mut child = cmd
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("starting the shim for exec: {e}"),
                )
            })?;
        // Fed while the output is read (a command may write before it has read everything);
        // closed at the end so the command sees end of file. A command that exits without
        // reading all of it just closes the pipe (EPIPE, ignored).
        let feeder = match (child.stdin.take(), stdin) {
            (Some(mut pipe), Some(data)) => Some(tokio::spawn(async move {
                let _ = pipe.write_all(&data).await;
                let _ = pipe.shutdown().await;
            })),
            _ => None,
        };
        let out = child.wait_with_output().await.map_err(|e| {
            ApiError::new(
                ErrorKind::Internal,
                format!("waiting for the shim of exec: {e}"),
            )
        })?;
        if let Some(f) = feeder {
            f.abort();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if let Some(msg) = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(EXEC_ERROR_MARKER))
        {
            if let Some(w) = workdir.as_deref().filter(|_| msg.contains(CHDIR_STEP)) {
                let why = msg.rsplit(": ").next().unwrap_or_default();
                return Err(ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "cannot use {w} as the working directory in container {}: {why}",
                        e.spec.name
                    ),
                ));
            }
            let kind = if msg.contains("not implemented") {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Internal
            };
            return Err(ApiError::new(kind, format!("exec failed: {msg}")));
        }
        let code = match out.status.code() {
            Some(c) => c,
            None => {
                use std::os::unix::process::ExitStatusExt;
                128 + out.status.signal().unwrap_or(0)
            }
        };
        Ok(Response::Exec(ExecResult {
            code,
            stdout: truncate(&out.stdout),
            stderr: truncate(&out.stderr),
        }))
    }
}

impl Agent {
    /// Resolves `user` for an exec in container `id`: names from its /etc/passwd and
    /// /etc/group as the container sees them (its image's layers under its writable layer).
    async fn exec_user(
        &self,
        id: &str,
        name: &str,
        layers: &[String],
        user: &str,
    ) -> Result<(u32, u32), ApiError> {
        check_user(user)?;
        let images = self.images.clone();
        let layers = layers.to_vec();
        let upper = StateDir::new(&self.cfg.state_dir).container(id).upper();
        let u = user.to_owned();
        let r = tokio::task::spawn_blocking(move || images.resolve_user(&layers, &u, Some(&upper)))
            .await
            .map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("user lookup task failed: {e}"))
            })?;
        r.map_err(|e| match e {
            ImageError::UnknownUser(_) => ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "unknown user {user:?} in container {name}: not in its /etc/passwd or /etc/group"
                ),
            ),
            other => ApiError::new(
                ErrorKind::Internal,
                format!(
                    "cannot look up user {user:?} in container {name}: {}",
                    crate::shim::chain(&other)
                ),
            ),
        })
    }
}

/// A `--user` value: `USER[:GROUP]`, neither part empty.
pub(crate) fn check_user(user: &str) -> Result<(), ApiError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if u.is_empty() || g.is_some_and(str::is_empty) || user.contains(['\0', '\n']) {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!("invalid user {user:?}: expected USER[:GROUP] (names or numbers)"),
        ));
    }
    Ok(())
}

/// A `--workdir` value: an absolute path without NUL bytes.
pub(crate) fn check_workdir(dir: &str) -> Result<(), ApiError> {
    if !dir.starts_with('/') || dir.contains('\0') {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!("invalid working directory {dir:?}: it must be an absolute path"),
        ));
    }
    Ok(())
}

fn truncate(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_OUTPUT)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_workdirs() {
        for ok in ["nobody", "1000", "app:staff", "0:0"] {
            check_user(ok).unwrap();
        }
        for bad in ["", ":", "app:", ":staff", "a\0b"] {
            assert!(check_user(bad).is_err(), "{bad:?}");
        }
        check_workdir("/tmp").unwrap();
        assert!(check_workdir("tmp").is_err());
        assert!(check_workdir("").is_err());
    }
}
