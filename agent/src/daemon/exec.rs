//! `exec`: runs `mig-shim exec` (which joins the container) and returns the command's result.

use super::Agent;
use crate::api::{ApiError, ContainerState, ErrorKind, ExecResult, Response};
use crate::shim::EXEC_ERROR_MARKER;
use std::process::Stdio;
use std::sync::Arc;
use tokio::process::Command;

/// At most this much of each output stream is returned.
const MAX_OUTPUT: usize = 4 << 20;

impl Agent {
    pub(crate) async fn exec(
        self: &Arc<Self>,
        container: &str,
        args: Vec<String>,
        env: Vec<String>,
    ) -> Result<Response, ApiError> {
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
        cmd.arg("--").args(&args);
        let out = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("starting the shim for exec: {e}"),
                )
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if let Some(msg) = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(EXEC_ERROR_MARKER))
        {
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

fn truncate(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_OUTPUT)]).into_owned()
}
