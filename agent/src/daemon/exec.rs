//! `exec`: runs `mig-shim exec` (which joins the container) and returns the command's result.

use super::Agent;
use crate::api::frame::{write_frame, FrameError, MAX_FRAME};
use crate::api::{
    ApiError, ContainerState, ErrorKind, ExecOptions, ExecResult, ExecStream, Response,
    MAX_EXEC_STDIN,
};
use crate::layout::StateDir;
use crate::shim::EXEC_ERROR_MARKER;
use mig_runtime::image::ImageError;
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

/// How the runtime names the step that fails when `--workdir` does not exist
/// (`mig_runtime::container` channel steps).
const CHDIR_STEP: &str = "changing to the working directory";

/// At most this much of each output stream is returned to clients of API versions before 4.
const MAX_OUTPUT: usize = 4 << 20;

/// The largest piece of output sent in one [`Response::ExecData`] frame.
const CHUNK: usize = 64 << 10;

/// A started exec: the shim and what the answer needs.
pub(crate) struct Started {
    child: Child,
    feeder: Option<tokio::task::JoinHandle<()>>,
    workdir: Option<String>,
    name: String,
}

/// Where the output goes: frames to the client (API version 4), or kept for one `Exec` answer.
enum Sink<'a> {
    Frames(&'a mut UnixStream),
    Collect {
        out: Vec<u8>,
        err: Vec<u8>,
        /// Bytes read from each stream, kept or not.
        total: [u64; 2],
    },
}

impl Sink<'_> {
    async fn put(&mut self, stream: ExecStream, data: &[u8]) -> Result<(), FrameError> {
        if data.is_empty() {
            return Ok(());
        }
        match self {
            Sink::Frames(w) => {
                let r = Response::ExecData {
                    stream,
                    data: data.to_vec(),
                };
                write_frame(w, &r).await
            }
            Sink::Collect { out, err, total } => {
                let (buf, t) = match stream {
                    ExecStream::Stdout => (out, &mut total[0]),
                    ExecStream::Stderr => (err, &mut total[1]),
                };
                *t += data.len() as u64;
                let room = MAX_OUTPUT.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..data.len().min(room)]);
                Ok(())
            }
        }
    }
}

impl Agent {
    /// `exec` for API versions 1 to 3: one `Exec` answer with the output decoded as UTF-8, at
    /// most [`MAX_OUTPUT`] bytes per stream; a cut is said at the end of `stderr`.
    pub(crate) async fn exec(
        self: &Arc<Self>,
        container: &str,
        args: Vec<String>,
        opts: ExecOptions,
    ) -> Result<Response, ApiError> {
        let started = self.exec_start(container, args, opts).await?;
        let mut sink = Sink::Collect {
            out: Vec::new(),
            err: Vec::new(),
            total: [0; 2],
        };
        let code = match pump(started, &mut sink).await {
            Ok(r) => r?,
            Err(e) => return Err(ApiError::new(ErrorKind::Internal, e.to_string())),
        };
        let Sink::Collect { out, err, total } = sink else {
            unreachable!("collected")
        };
        Ok(Response::Exec(legacy_result(code, &out, &err, total)))
    }

    /// Checks an exec request and starts its shim.
    async fn exec_start(
        self: &Arc<Self>,
        container: &str,
        args: Vec<String>,
        opts: ExecOptions,
    ) -> Result<Started, ApiError> {
        let ExecOptions {
            env,
            user,
            workdir,
            stdin,
        } = opts;
        let id = self.resolve(container)?;
        self.refresh(&id);
        let e = self.entry(&id)?;
        // A move (or checkpoint) in progress: say which, as `stop` does (QA of session 23: "is
        // not running" while `inspect` showed "running (moving to host-a)").
        if e.busy {
            return Err(self.busy_error(&id, &e));
        }
        if e.state.state != ContainerState::Running {
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
        Ok(Started {
            child,
            feeder,
            workdir,
            name: e.spec.name.clone(),
        })
    }
}

/// `exec` for API version 4: the output as `ExecData` frames while the command runs, without a
/// cap, then `ExecEnd` (or one `Error`). `Err` only when writing to the client failed (the
/// command is then killed).
pub(super) async fn stream(
    agent: &Arc<Agent>,
    out: &mut UnixStream,
    container: &str,
    args: Vec<String>,
    opts: ExecOptions,
) -> Result<(), FrameError> {
    let started = match agent.exec_start(container, args, opts).await {
        Ok(s) => s,
        Err(e) => return write_frame(out, &Response::Error(e)).await,
    };
    let mut sink = Sink::Frames(out);
    let r = pump(started, &mut sink).await?;
    let Sink::Frames(out) = sink else {
        unreachable!("frames")
    };
    match r {
        Ok(code) => write_frame(out, &Response::ExecEnd { code }).await,
        Err(e) => write_frame(out, &Response::Error(e)).await,
    }
}

/// Copies the command's output to `sink` as it comes and waits for the command. The outer `Err`
/// is a failure to write to the client; the inner one is the shim's own error.
async fn pump(mut s: Started, sink: &mut Sink<'_>) -> Result<Result<i32, ApiError>, FrameError> {
    let internal = |what: &str, e: std::io::Error| {
        ApiError::new(ErrorKind::Internal, format!("{what} of exec: {e}"))
    };
    let (Some(mut so), Some(mut se)) = (s.child.stdout.take(), s.child.stderr.take()) else {
        return Ok(Err(ApiError::new(
            ErrorKind::Internal,
            "the shim of exec has no output pipes",
        )));
    };
    let mut bo = vec![0u8; CHUNK];
    let mut be = vec![0u8; CHUNK];
    let (mut o_open, mut e_open) = (true, true);
    let mut shim = ShimErrors::default();
    while o_open || e_open {
        tokio::select! {
            r = so.read(&mut bo), if o_open => match r {
                Ok(0) => o_open = false,
                Ok(n) => sink.put(ExecStream::Stdout, &bo[..n]).await?,
                Err(e) => return Ok(Err(internal("reading the output", e))),
            },
            r = se.read(&mut be), if e_open => match r {
                Ok(0) => {
                    e_open = false;
                    let rest = shim.finish();
                    sink.put(ExecStream::Stderr, &rest).await?;
                }
                Ok(n) => {
                    let pass = shim.push(&be[..n]);
                    sink.put(ExecStream::Stderr, &pass).await?;
                }
                Err(e) => return Ok(Err(internal("reading the errors", e))),
            },
        }
    }
    let status = match s.child.wait().await {
        Ok(st) => st,
        Err(e) => return Ok(Err(internal("waiting for the shim", e))),
    };
    if let Some(f) = s.feeder {
        f.abort();
    }
    if let Some(msg) = shim.error {
        return Ok(Err(shim_error(&msg, s.workdir.as_deref(), &s.name)));
    }
    Ok(Ok(match status.code() {
        Some(c) => c,
        None => {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }
    }))
}

/// The API error for the shim's own failure (a line `mig-shim-error: ...` on its stderr).
fn shim_error(msg: &str, workdir: Option<&str>, name: &str) -> ApiError {
    if let Some(w) = workdir.filter(|_| msg.contains(CHDIR_STEP)) {
        let why = msg.rsplit(": ").next().unwrap_or_default();
        return ApiError::new(
            ErrorKind::InvalidArgument,
            format!("cannot use {w} as the working directory in container {name}: {why}"),
        );
    }
    let kind = if msg.contains("not implemented") {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    };
    ApiError::new(kind, format!("exec failed: {msg}"))
}

/// Takes the shim's error lines (`mig-shim-error: ...`) out of the stderr it shares with the
/// command and passes everything else through unchanged. A line that may still become one is held
/// until its first bytes tell.
#[derive(Default)]
struct ShimErrors {
    /// The start of the current line, held while it is a prefix of the marker or a marker line.
    held: Vec<u8>,
    /// The current line is not a marker line: pass it through up to its end.
    passing: bool,
    /// The last error line's message.
    error: Option<String>,
}

impl ShimErrors {
    fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let marker = EXEC_ERROR_MARKER.as_bytes();
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if self.passing {
                out.push(b);
                self.passing = b != b'\n';
                continue;
            }
            self.held.push(b);
            if b == b'\n' {
                self.end_line(&mut out);
            } else if self.held.len() <= marker.len() && !marker.starts_with(&self.held) {
                out.append(&mut self.held);
                self.passing = true;
            }
        }
        out
    }

    /// At the end of the stream: what is still held, unless it is an error line.
    fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.end_line(&mut out);
        self.passing = false;
        out
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        let line = std::mem::take(&mut self.held);
        match line.strip_prefix(EXEC_ERROR_MARKER.as_bytes()) {
            Some(msg) => {
                let msg = String::from_utf8_lossy(msg);
                self.error = Some(msg.trim_end_matches('\n').to_owned());
            }
            None => out.extend_from_slice(&line),
        }
    }
}

/// The answer of API versions before 4. Each stream is cut at [`MAX_OUTPUT`] bytes, and cut
/// further so that the frame stays under [`MAX_FRAME`] (JSON writes a control byte as six); a cut
/// is said on a last line of `stderr` and in `truncated`.
fn legacy_result(code: i32, out: &[u8], err: &[u8], total: [u64; 2]) -> ExecResult {
    // Half the frame each, less room for the rest of the answer and the notice.
    let budget = (MAX_FRAME as usize - (64 << 10)) / 2;
    let (stdout, o_cut) = fit_json(out, budget);
    let (mut stderr, e_cut) = fit_json(err, budget);
    let truncated = o_cut || e_cut || total[0] > out.len() as u64 || total[1] > err.len() as u64;
    if truncated {
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&format!(
            "mig: exec output cut: {} of {} bytes of stdout and {} of {} bytes of stderr returned \
             (this client's API version returns at most 4 MiB per stream; version 4 streams all of it)\n",
            stdout.len(),
            total[0],
            stderr.len(),
            total[1],
        ));
    }
    ExecResult {
        code,
        stdout,
        stderr,
        truncated,
    }
}

/// `data` decoded as UTF-8 (invalid sequences replaced), cut where its JSON string would pass
/// `budget` bytes; and whether it was cut.
fn fit_json(data: &[u8], budget: usize) -> (String, bool) {
    let text = String::from_utf8_lossy(data);
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used > budget {
            return (text[..i].to_owned(), true);
        }
    }
    (text.into_owned(), false)
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

    /// The shim's error lines are taken out of stderr, whatever the pieces; the rest passes as is.
    #[test]
    fn shim_error_lines_are_taken_out_of_stderr() {
        let mut input = b"a\0\xff\nmig-shim\n".to_vec();
        input.extend_from_slice(format!("{EXEC_ERROR_MARKER}boom\nmig-x\ntail").as_bytes());
        let input = &input[..];
        for piece in [1, 3, 7, input.len()] {
            let mut f = ShimErrors::default();
            let mut out = Vec::new();
            for c in input.chunks(piece) {
                out.extend(f.push(c));
            }
            out.extend(f.finish());
            assert_eq!(out, b"a\0\xff\nmig-shim\nmig-x\ntail", "pieces of {piece}");
            assert_eq!(f.error.as_deref(), Some("boom"));
        }
    }

    #[test]
    fn legacy_answers_fit_in_a_frame_and_say_a_cut() {
        let zeros = vec![0u8; MAX_OUTPUT];
        let r = legacy_result(0, &zeros, b"err", [5_000_000, 3]);
        assert!(r.truncated);
        assert!(
            r.stderr.starts_with("err\nmig: exec output cut: "),
            "{}",
            r.stderr
        );
        let len = serde_json::to_vec(&Response::Exec(r)).unwrap().len();
        assert!(len < MAX_FRAME as usize, "{len}");
        let r = legacy_result(3, b"hi\n", b"", [3, 0]);
        assert!(!r.truncated && r.stdout == "hi\n" && r.stderr.is_empty());
    }
}
