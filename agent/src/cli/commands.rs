//! Executing `mig` commands against the agent.

use super::output;
use super::{Cli, Command, ImageCommand, RunArgs, DEFAULT_SOCKET, EXIT_MIG_ERROR};
use crate::api::{ExecOptions, RunRequest, MAX_EXEC_STDIN};
use crate::client::{Client, ClientError};
use clap::FromArgMatches;
use mig_runtime::spec::Limits;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A failure of `mig` itself (exit code 125).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("lab")]
    Lab(#[source] Box<crate::lab::LabError>),
    #[error("bench")]
    Bench(#[source] Box<crate::bench::BenchError>),
    #[error("no migd next to mig: install them together")]
    NoMigd,
    #[error(transparent)]
    MisplacedOption(#[from] super::MisplacedOption),
    #[error("background task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot resolve the path {path}")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid signal {0:?}")]
    Signal(String),
    #[error("writing output failed")]
    Output(#[source] std::io::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("restore needs a container or --import FILE")]
    NothingToRestore,
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("--remote needs --fingerprint (the agent's certificate fingerprint)")]
    NoFingerprint,
    #[error("{failed} of {total} operations failed")]
    Partial { failed: usize, total: usize },
    #[error("the agent is older than this mig and does not know {option}")]
    OlderAgent {
        option: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("interrupted: the move of {container} to {peer} goes on in the agent (Ctrl-C does not cancel a move); `mig ps -a`, `mig inspect {container}` or `mig events` show where it ends")]
    MoveInterrupted { container: String, peer: String },
    #[error("interrupted: container {name} keeps running (Ctrl-C detaches mig run, it does not stop the container{}); `mig logs -f {name}` follows it again, `mig stop {name}` ends it", if *rm { ", and --rm no longer applies" } else { "" })]
    RunDetached { name: String, rm: bool },
    #[error("--rm needs an attached run (without -d): mig removes the container when it ends, and with -d nothing waits for the end; remove it with mig rm")]
    RmDetached,
    #[error("{peer} is not a pinned peer of this host (pinned: {pinned})")]
    NotAPeer { peer: String, pinned: String },
    #[error("no pinned peer to drain to (mig peers add)")]
    NoPeerToDrainTo,
    #[error("mig exec has no terminal (-t): the command's output is returned when it ends; pipe input with -i instead, e.g. echo 'ls /' | mig exec -i CONTAINER sh")]
    NoTty,
    #[error("mig run has no terminal or input (-i, -t): a container's standard input is /dev/null and its output goes to its log, which an attached run prints and `mig logs -f NAME` follows; give a command input with mig exec -i, e.g. echo 'ls /' | mig exec -i NAME sh")]
    RunNoTty,
    #[error("cannot read the standard input for exec -i")]
    Stdin(#[source] std::io::Error),
    #[error("the standard input is larger than the {} MiB exec -i takes (it is sent whole, before the command starts)", MAX_EXEC_STDIN >> 20)]
    StdinTooLarge,
    /// `mig run` of a command the container could not execute: the agent's message, with the
    /// shell's exit code (127 not found, 126 not executable) as `mig exec` and podman give.
    #[error("{source}")]
    CommandNotRun {
        code: u8,
        #[source]
        source: ClientError,
    },
}

impl CliError {
    /// The exit code of this failure: [`EXIT_MIG_ERROR`] but for a command that could not run.
    fn exit_code(&self) -> u8 {
        match self {
            CliError::CommandNotRun { code, .. } => *code,
            _ => EXIT_MIG_ERROR,
        }
    }
}

/// `mig`'s entry point.
pub fn main() -> ExitCode {
    let cli = match super::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)))
    {
        Ok((mut cli, m)) => match super::misplaced_client_option(&m) {
            Some(e) => return fail(&e.into()),
            None => {
                super::prefer_command_line(&mut cli, &m);
                super::expand_env_options(&mut cli);
                cli
            }
        },
        Err(e) => return usage_error(e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&CliError::Runtime(e)),
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(&e),
    }
}

fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("mig: a subcommand is required (see mig --help)");
            ExitCode::from(EXIT_MIG_ERROR)
        }
        _ => {
            eprintln!("mig: {}", usage_line(&strip_ansi(&e.to_string())));
            ExitCode::from(EXIT_MIG_ERROR)
        }
    }
}

/// What `mig start` and `mig restart` (podman's) get instead of clap's tip, which named
/// `restore`.
const NO_RESTART: &str = "start and restart are not mig commands: a container that ended stays as it is (logs, inspect, rm); rm it and run a new one, or pause a running one with mig checkpoint and resume it with mig restore";

/// A clap error's first paragraph on one line: "the following required arguments were not
/// provided: <PEER>", "invalid value 'x' for '--mode <MODE>' [possible values: ...]" (its first
/// line alone left out what was missing or allowed), with clap's tips after it in parentheses
/// (`mig images`: "a similar subcommand exists: 'image'"). A command given to `mig run` without
/// `--` (podman's way) says where it goes.
fn usage_line(text: &str) -> String {
    let para: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = para.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    if line.is_empty() {
        return "invalid usage".into();
    }
    if ["start", "restart"]
        .iter()
        .any(|s| line == format!("unrecognized subcommand '{s}'"))
    {
        return NO_RESTART.into();
    }
    let mut tips: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tip: "))
        .map(str::to_owned)
        .collect();
    if let Some(arg) = line.strip_prefix("unexpected argument '") {
        let arg = arg.split('\'').next().unwrap_or_default();
        if tips.is_empty() && text.contains("[-- <CMD>...]") && !arg.starts_with('-') {
            tips.push(format!(
                "tip: the command goes after '--': mig run IMAGE -- {arg} ..."
            ));
        }
    }
    if tips.is_empty() {
        line.to_owned()
    } else {
        format!("{line} ({})", tips.join("; "))
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The exit code of a command whose reader went away (`mig man | head`, `mig ps | head -1`):
/// 128 + SIGPIPE, as a C tool killed by the signal, and nothing on stderr (it said "mig: writing
/// output failed: Broken pipe (os error 32)").
const EXIT_BROKEN_PIPE: u8 = 141;

/// The exit code of a command killed by SIGKILL (128 + 9), as a container's leaving ends it.
const KILLED: i32 = 137;

fn broken_pipe(e: &CliError) -> bool {
    matches!(e, CliError::Output(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn fail(e: &CliError) -> ExitCode {
    if broken_pipe(e) {
        return ExitCode::from(EXIT_BROKEN_PIPE);
    }
    let mut msg = chained(e);
    if matches!(e, CliError::Client(ClientError::Connect { .. })) {
        msg.push_str(" (is migd running?)");
    }
    eprintln!("mig: {msg}");
    ExitCode::from(e.exit_code())
}

/// `e`'s message and its sources', on one line.
fn chained(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    // `Client(Api)` is transparent: its message is the agent's already.
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.ends_with(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg.replace('\n', " ")
}

/// Which socket to talk to: `--socket`/`MIG_SOCKET`, else the lab host `--host`/`MIG_HOST`, else
/// the default socket (the variables of options not given on the command line were dropped by
/// [`super::prefer_command_line`]).
pub fn socket_path(socket: Option<&Path>, host: Option<&str>) -> Result<PathBuf, CliError> {
    if let Some(s) = socket {
        return Ok(s.to_owned());
    }
    let Some(name) = host else {
        return Ok(PathBuf::from(DEFAULT_SOCKET));
    };
    let lab = crate::lab::lab_name_from_env();
    crate::lab::find_host(&lab, name)
        .map(|h| h.socket)
        .map_err(|e| CliError::Lab(Box::new(e)))
}

pub(super) async fn connect(cli: &Cli) -> Result<Client, CliError> {
    if let Some(addr) = cli.remote {
        return super::events::connect_remote(cli, addr).await;
    }
    let path = socket_path(cli.socket.as_deref(), cli.host.as_deref())?;
    Ok(Client::connect(&path).await?)
}

pub(super) fn out(text: &str) -> Result<(), CliError> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes()).map_err(CliError::Output)?;
    o.flush().map_err(CliError::Output)
}

pub(super) fn json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into());
    s.push('\n');
    out(&s)
}

async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    match &cli.command {
        Command::Completions { shell } => {
            out(&String::from_utf8_lossy(&super::completion::script(*shell)))?;
            return Ok(0);
        }
        Command::Man => {
            let buf = super::man::render(
                super::command(),
                super::man::MIG_NAME_LINE,
                Some(super::man::MIG_DESCRIPTION),
                "1",
            )
            .map_err(CliError::Output)?;
            out(&String::from_utf8_lossy(&buf))?;
            return Ok(0);
        }
        _ => {}
    }
    if let Command::Bench(crate::bench::BenchCommand::Move(args)) = cli.command {
        crate::bench::run(args)
            .await
            .map_err(|e| CliError::Bench(Box::new(e)))?;
        return Ok(0);
    }
    if let Command::Drain(a) = &cli.command {
        return super::drain::drain(&cli, a).await;
    }
    if let Some(code) = super::moves::dispatch(&cli).await? {
        return Ok(code);
    }
    if let Some(code) = super::events::dispatch(&cli).await? {
        return Ok(code);
    }
    if let Command::Logs {
        follow: true,
        tail,
        container,
    } = &cli.command
    {
        return super::logs::follow(&cli, container, *tail).await;
    }
    if let Command::Exec { tty: true, .. } = &cli.command {
        return Err(CliError::NoTty);
    }
    if let Command::Run(r) = &cli.command {
        if r.interactive || r.tty {
            return Err(CliError::RunNoTty);
        }
    }
    // A command that the container's leaving kills (a move, a checkpoint, a stop) ends with a
    // line that says so: watched from before it starts.
    let exec_watch = match &cli.command {
        Command::Exec { container, .. } => super::logs::ExecWatch::start(&cli, container).await,
        _ => None,
    };
    let mut c = connect(&cli).await?;
    match cli.command {
        Command::Image(ic) => image(&mut c, ic).await.map(|_| 0),
        Command::Run(r) => run(&mut c, r).await,
        Command::Ps {
            all,
            quiet,
            json: j,
        } => {
            let list = c.list(all).await?;
            if j {
                json(&list)?;
            } else if quiet {
                out(&output::ps_ids(&list))?;
            } else {
                out(&output::ps_table(&list))?;
            }
            Ok(0)
        }
        Command::Inspect { container, json: j } => {
            let d = c.inspect(&container).await?;
            if j {
                json(&d)?;
            } else {
                out(&output::inspect_text(&d))?;
            }
            Ok(0)
        }
        // With --follow it went to logs::follow above.
        Command::Logs {
            tail: Some(n),
            container,
            ..
        } => {
            let log = super::logs::read_all(&mut c, &container).await?;
            out(&log[super::logs::tail_start(&log, n)..]).map(|_| 0)
        }
        Command::Logs {
            follow,
            tail: None,
            container,
        } => {
            let mut err = None;
            c.logs(&container, follow, |data| {
                if err.is_none() {
                    err = out(data).err();
                }
            })
            .await?;
            err.map_or(Ok(0), Err)
        }
        Command::Exec {
            env,
            user,
            workdir,
            interactive,
            tty: _,
            container,
            command,
        } => {
            let stdin = if interactive {
                Some(read_stdin()?)
            } else {
                None
            };
            let opts = ExecOptions {
                env,
                user,
                workdir,
                stdin,
            };
            // Byte for byte as it comes (API version 4; an older agent's output is one piece).
            let mut failed = None;
            let code = c
                .exec_stream(&container, command, opts, |stream, data| {
                    if stream == crate::api::ExecStream::Stderr {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(data);
                    } else if failed.is_none() {
                        let mut o = std::io::stdout().lock();
                        failed = o.write_all(data).and_then(|()| o.flush()).err();
                    }
                })
                .await
                .map_err(older_agent)?;
            if let Some(e) = failed {
                return Err(CliError::Output(e));
            }
            if code == KILLED {
                if let Some(why) = match exec_watch {
                    Some(w) => w.why_killed().await,
                    None => None,
                } {
                    eprintln!(
                        "mig: {container} {why} while the command ran; the command was killed with it"
                    );
                }
            }
            Ok(u8::try_from(code).unwrap_or(EXIT_MIG_ERROR))
        }
        Command::Stop { time, containers } => {
            let mut results = Vec::new();
            for n in containers {
                let r = c.stop(&n, time).await;
                results.push((n, r));
            }
            finish(results)
        }
        Command::Kill { signal, containers } => {
            let sig = parse_signal(&signal)?;
            let mut results = Vec::new();
            for n in containers {
                let r = c.kill(&n, sig).await;
                results.push((n, r));
            }
            finish(results)
        }
        Command::Rm { force, containers } => {
            let mut results = Vec::new();
            for n in containers {
                let r = c.remove(&n, force).await;
                results.push((n, r));
            }
            finish(results)
        }
        Command::Checkpoint {
            leave_running,
            export,
            tcp_established,
            json: j,
            container,
        } => {
            let export = export.map(|p| absolute(&p)).transpose()?;
            let r = c
                .checkpoint_with(
                    &container,
                    leave_running,
                    export.as_deref(),
                    tcp_established,
                )
                .await?;
            if j {
                json(&r)?;
            } else {
                out(&format!(
                    "{}: checkpointed in {} ms (freeze {} ms, dump {} ms), {} in {}{}\n",
                    container,
                    r.total_ms,
                    r.freeze_ms,
                    r.dump_ms,
                    output::human_size(r.image_bytes),
                    r.images_dir,
                    if r.leave_running {
                        ", still running"
                    } else {
                        ""
                    }
                ))?;
            }
            Ok(0)
        }
        Command::Restore {
            import,
            name,
            json: j,
            container,
        } => {
            let r = match (import, container) {
                (Some(file), _) => {
                    let file = std::fs::canonicalize(&file).map_err(|source| CliError::Path {
                        path: file.clone(),
                        source,
                    })?;
                    c.restore_import(&file.to_string_lossy(), name.as_deref())
                        .await?
                }
                (None, Some(ct)) => c.restore(&ct).await?,
                (None, None) => return Err(CliError::NothingToRestore),
            };
            let container = r.name.clone();
            if j {
                json(&r)?;
            } else {
                out(&format!(
                    "{}: restored in {} ms, init host pid {}\n",
                    container, r.total_ms, r.init_pid
                ))?;
            }
            Ok(0)
        }
        Command::Info { json: j } => {
            let i = c.info().await?;
            // The migration identity, when the agent runs its endpoint.
            let id = c.identity().await.ok();
            if j {
                let mut v = serde_json::to_value(&i).unwrap_or_default();
                if let (Some(id), Some(o)) = (&id, v.as_object_mut()) {
                    o.insert("fingerprint".into(), id.fingerprint.clone().into());
                    o.insert("listen".into(), id.listen.clone().into());
                }
                json(&v)?;
            } else {
                out(&output::info_text(&i))?;
                if let Some(id) = id {
                    out(&format!(
                        "fingerprint: {}\nlisten: {}\n",
                        id.fingerprint,
                        id.listen.as_deref().unwrap_or("-")
                    ))?;
                }
            }
            Ok(0)
        }
        Command::Completions { .. } | Command::Man => Ok(0),
        Command::Move(_) | Command::Peers(_) | Command::Lab(_) | Command::Bench(_) => Ok(0),
        Command::Events(_) | Command::Drain(_) => Ok(0),
        Command::Clients(_) | Command::Rebalance(_) => Ok(0),
    }
}

/// Resolves on Ctrl-C (SIGINT), for the commands that then say what goes on without them;
/// never when SIGINT was ignored as mig started (a background job of a shell script: the
/// shell's choice is kept, as before) or when no handler can be installed.
pub(super) async fn interrupted() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !ignores_sigint(&status) && tokio::signal::ctrl_c().await.is_ok() {
        return;
    }
    std::future::pending::<()>().await
}

/// Whether `/proc/PID/status` text says SIGINT is ignored (bit 2 of the `SigIgn` mask).
fn ignores_sigint(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// An agent older than `run`/`exec`'s newer options refuses a request that uses one, naming
/// the field it does not know (serde's "unknown field" message): say which option that is.
fn older_agent(e: ClientError) -> CliError {
    if let ClientError::Api(a) = &e {
        if a.kind == crate::api::ErrorKind::InvalidArgument {
            for (field, option) in [
                ("user", "--user"),
                ("workdir", "--workdir"),
                ("entrypoint", "--entrypoint"),
                ("stdin", "exec -i"),
            ] {
                if a.message.contains(&format!("unknown field `{field}`")) {
                    return CliError::OlderAgent { option, source: e };
                }
            }
        }
    }
    CliError::Client(e)
}

/// The exit code a shell gives when `run`'s command could not be executed: 127 when it is not
/// in the image, 126 when it cannot be executed. The agent reports this as a failed start
/// (kind `internal` up to API 3) whose message ends with the shim's words (agent/src/shim/
/// start.rs `spawn_failure`): "starting container N failed: starting the init: the command
/// \"x\" is not in the image (searched PATH ...)" or "... the command \"x\" cannot be executed:
/// ...". Matched on those words, whatever the kind, until the API carries the failure as data.
fn command_not_run(e: &ClientError) -> Option<u8> {
    let ClientError::Api(a) = e else { return None };
    let (_, tail) = a
        .message
        .split_once(": starting the init: the command \"")?;
    // The command's name is a Rust debug string: skip it to its closing quote.
    let mut escaped = false;
    let end = tail.char_indices().find_map(|(i, ch)| {
        let close = ch == '"' && !escaped;
        escaped = ch == '\\' && !escaped;
        close.then_some(i)
    })?;
    let rest = &tail[end + 1..];
    if rest.starts_with(" is not in the image") {
        Some(127)
    } else if rest.starts_with(" cannot be executed") {
        Some(126)
    } else {
        None
    }
}

/// `exec -i`: this command's standard input, whole (at most [`MAX_EXEC_STDIN`] bytes).
fn read_stdin() -> Result<Vec<u8>, CliError> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("mig: reading the standard input to its end (Ctrl-D), then running the command");
    }
    let mut data = Vec::new();
    stdin
        .lock()
        .take(MAX_EXEC_STDIN as u64 + 1)
        .read_to_end(&mut data)
        .map_err(CliError::Stdin)?;
    if data.len() > MAX_EXEC_STDIN {
        return Err(CliError::StdinTooLarge);
    }
    Ok(data)
}

/// Prints each name that succeeded on stdout and one `mig:` line per failure on stderr (as
/// podman does), nothing more: exit 125 when any failed.
fn finish(results: Vec<(String, Result<(), ClientError>)>) -> Result<u8, CliError> {
    let mut failed = Vec::new();
    for (name, r) in results {
        match r {
            Ok(()) => out(&format!("{name}\n"))?,
            Err(e) => failed.push(failure_line(&name, &e)),
        }
    }
    for line in &failed {
        eprintln!("{line}");
    }
    Ok(if failed.is_empty() { 0 } else { EXIT_MIG_ERROR })
}

/// One target's failure: the agent's message, which names the container ("no such container:
/// x", "container x is running: ..."), prefixed with the name only when it does not (it said
/// "mig: x: no such container: x", and a summary line "mig: 1 of 2 operations failed" after).
fn failure_line(name: &str, e: &ClientError) -> String {
    let msg = chained(e);
    if msg.contains(name) {
        format!("mig: {msg}")
    } else {
        format!("mig: {name}: {msg}")
    }
}

fn parse_signal(s: &str) -> Result<i32, CliError> {
    if let Ok(n) = s.parse::<i32>() {
        return Ok(n);
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| CliError::Signal(s.to_owned()))
}

async fn image(c: &mut Client, cmd: ImageCommand) -> Result<(), CliError> {
    match cmd {
        ImageCommand::Import {
            path,
            name,
            json: j,
        } => {
            let abs = std::fs::canonicalize(&path).map_err(|source| CliError::Path {
                path: path.clone(),
                source,
            })?;
            let name = name.unwrap_or_else(|| default_image_name(&abs));
            let img = c.image_import(&abs.to_string_lossy(), &name).await?;
            if j {
                json(&img)
            } else {
                out(&format!("{}\n", img.id))
            }
        }
        ImageCommand::Ls { quiet, json: j } => {
            let list = c.image_list().await?;
            if j {
                json(&list)
            } else if quiet {
                out(&output::image_ids(&list))
            } else {
                out(&output::images_table(&list))
            }
        }
        ImageCommand::Rm { images } => {
            for i in images {
                let img = c.image_remove(&i).await?;
                out(&format!("{}\n", img.id))?;
            }
            Ok(())
        }
    }
}

/// An absolute form of `p` (relative to the current directory; the file need not exist).
fn absolute(p: &Path) -> Result<String, CliError> {
    let abs = if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|source| CliError::Path {
                path: p.to_owned(),
                source,
            })?
            .join(p)
    };
    Ok(abs.to_string_lossy().into_owned())
}

/// `busybox-rootfs.tar.gz` -> `busybox-rootfs`.
fn default_image_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name = file.as_str();
    for ext in [".gz", ".zst", ".zstd", ".tgz", ".tar", ".oci"] {
        name = name.strip_suffix(ext).unwrap_or(name);
    }
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "image".into()
    } else {
        cleaned
    }
}

async fn run(c: &mut Client, r: RunArgs) -> Result<u8, CliError> {
    if r.rm && r.detach {
        return Err(CliError::RmDetached);
    }
    let bundle = match &r.bundle {
        Some(dir) => Some(
            std::fs::canonicalize(dir)
                .map_err(|source| CliError::Path {
                    path: dir.clone(),
                    source,
                })?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let req = RunRequest {
        image: r.image.unwrap_or_default(),
        bundle,
        name: r.name,
        hostname: r.hostname,
        args: r.command,
        env: r.env,
        limits: Limits {
            memory: r.memory,
            cpu_millis: r.cpus,
            pids: r.pids,
        },
        userns: r.userns,
        net: r.net.map(Into::into),
        ip: r.ip,
        user: r.user,
        workdir: r.workdir,
        entrypoint: r.entrypoint.map(|e| e.0),
    };
    let rm = r.rm;
    let started = c.run(req).await;
    if let (true, Err(e)) = (rm, &started) {
        // The agent keeps a container that failed to start (for inspect); --rm removes it.
        if let Some(failed) = failed_start(e) {
            let _ = c.remove(failed, true).await;
        }
    }
    let (id, name) = started.map_err(|e| match command_not_run(&e) {
        Some(code) => CliError::CommandNotRun { code, source: e },
        None => older_agent(e),
    })?;
    if r.detach {
        if r.json {
            json(&serde_json::json!({ "id": id, "name": name }))?;
        } else {
            out(&format!("{id}\n"))?;
        }
        return Ok(0);
    }
    let mut err = None;
    let follow = c.logs(&id, true, |data| {
        if err.is_none() {
            err = out(data).err();
        }
    });
    // Ctrl-C detaches this command; the container runs on (podman would pass the signal to
    // it): say so rather than die of the signal with nothing said.
    tokio::select! {
        r = follow => r?,
        () = interrupted() => return Err(CliError::RunDetached { name, rm }),
    }
    if let Some(e) = err {
        return Err(e);
    }
    let d = c.inspect(&id).await?;
    if rm {
        if let Err(e) = c.remove(&id, false).await {
            eprintln!("mig: removing container {name} (--rm) failed: {e}");
        }
    }
    Ok(d.exit_code
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(EXIT_MIG_ERROR))
}

/// The name of the container a failed `run` left behind: the agent's "starting container NAME
/// failed: ..." is said only once the container exists (a taken name or a missing image fail
/// before, with other words).
fn failed_start(e: &ClientError) -> Option<&str> {
    let ClientError::Api(a) = e else { return None };
    let rest = a.message.strip_prefix("starting container ")?;
    rest.split_once(" failed: ").map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// Every option and argument of every command has a help line (`--json` had none anywhere,
    /// `<CONTAINER>` none in `logs`, `stop`, `rm`...).
    #[test]
    fn every_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.get_help().is_some() || a.get_long_help().is_some() {
                    continue;
                }
                if let Some(long) = a.get_long() {
                    missing.push(format!("{path} --{long}"));
                } else if a.is_positional() {
                    // `mig logs --help` listed `<CONTAINER>` with nothing after it.
                    missing.push(format!("{path} <{}>", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "mig", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    #[test]
    fn usage_errors_keep_what_is_missing() {
        for (args, want) in [
            (&["mig", "move", "c"][..], "<PEER>"),
            (
                &["mig", "move", "c", "p", "--mode", "x"][..],
                "possible values: cold",
            ),
            // podman's habits: the command without `--`, `images` for `image ls`, restart.
            (
                &["mig", "run", "busybox", "echo", "hi"][..],
                "unexpected argument 'echo' found (tip: the command goes after '--': mig run IMAGE -- echo ...)",
            ),
            (
                &["mig", "images"][..],
                "unrecognized subcommand 'images' (tip: a similar subcommand exists: 'image')",
            ),
            (&["mig", "restart", "web"][..], "start and restart are not mig commands"),
            (&["mig", "start", "web"][..], "rm it and run a new one"),
        ] {
            let Err(e) = Cli::try_parse_from(args) else {
                panic!("{args:?} parsed")
            };
            let line = usage_line(&strip_ansi(&e.to_string()));
            assert!(line.contains(want) && !line.contains('\n'), "{line}");
            assert!(!line.starts_with("error:"), "{line}");
        }
    }

    #[test]
    fn an_older_agent_refusing_a_new_field_names_the_option() {
        use crate::api::{ApiError, ErrorKind};
        let refused = |m: &str| ClientError::Api(ApiError::new(ErrorKind::InvalidArgument, m));
        let e = older_agent(refused(
            "cannot decode the frame: unknown field `stdin`, expected one of `container`, `args`, `env`",
        ));
        assert!(
            matches!(
                e,
                CliError::OlderAgent {
                    option: "exec -i",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("older"), "{e}");
        let e = older_agent(refused("unknown field `workdir`, expected ..."));
        assert!(matches!(
            e,
            CliError::OlderAgent {
                option: "--workdir",
                ..
            }
        ));
        assert!(matches!(
            older_agent(refused("invalid user \"\"")),
            CliError::Client(_)
        ));
    }

    #[test]
    fn bench_outputs_must_be_writable_before_it_runs() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Bench(crate::bench::BenchCommand::Move(a)) => a,
            other => panic!("{other:?}"),
        };
        let a = parse(&["mig", "bench", "move", "--csv", "/nonexistent-mig/b.csv"]);
        assert!(
            matches!(
                crate::bench::check_outputs(&a),
                Err(crate::bench::BenchError::OutputDir { .. })
            ),
            "csv"
        );
        let a = parse(&[
            "mig",
            "bench",
            "move",
            "--plot",
            "/tmp/b.svg",
            "--json",
            "b.json",
        ]);
        assert!(crate::bench::check_outputs(&a).is_ok());
    }

    #[test]
    fn bench_refuses_a_lab_name_that_is_a_path_or_taken() {
        use crate::bench::{check_lab, BenchError};
        for bad in ["..", "/", "../../etc", "a/b", "", "Mig"] {
            assert!(matches!(check_lab(bad), Err(BenchError::Lab(_))), "{bad:?}");
        }
        let free = format!("t{}", std::process::id());
        assert!(check_lab(&free).is_ok());
        // A lab whose file exists is someone's: refused by name.
        let file = crate::lab::lab_file_path(&free);
        if std::fs::create_dir_all(file.parent().unwrap()).is_ok()
            && std::fs::write(&file, "{}").is_ok()
        {
            let r = check_lab(&free);
            let _ = std::fs::remove_file(&file);
            assert!(
                matches!(&r, Err(BenchError::LabExists { lab }) if *lab == free),
                "{r:?}"
            );
        }
    }

    /// REPORT #4 of session 16: `mig run IMAGE -- nosuchcmd` exited 125 where `mig exec` and
    /// podman give 127 (126 for a file that cannot be executed). The messages are the agent's
    /// as a client receives them.
    #[test]
    fn a_run_command_that_cannot_run_exits_as_a_shell_would() {
        use crate::api::{ApiError, ErrorKind};
        let api = |kind, m: &str| ClientError::Api(ApiError::new(kind, m));
        for (kind, message, want) in [
            (
                ErrorKind::Internal,
                "starting container a3 failed: starting the init: the command \"nosuchcmd\" is not in the image (searched PATH /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)",
                Some(127),
            ),
            (
                ErrorKind::Internal,
                "starting container a4 failed: starting the init: the command \"/opt/app\" is not in the image",
                Some(127),
            ),
            (
                ErrorKind::InvalidArgument,
                "starting container a5 failed: starting the init: the command \"/etc/passwd\" cannot be executed: container setup failed at step executing the command (pid 7): EACCES: Permission denied",
                Some(126),
            ),
            // A quote in the name does not end it early.
            (
                ErrorKind::Internal,
                r#"starting container q failed: starting the init: the command "a\" is not in the image b" cannot be executed: EACCES"#,
                Some(126),
            ),
            (
                ErrorKind::Internal,
                "starting container a6 failed: mounting the root filesystem: the command \"x\" is not in the image",
                None,
            ),
            (ErrorKind::NotFound, "no such image: busybx", None),
        ] {
            assert_eq!(command_not_run(&api(kind, message)), want, "{message}");
        }
        let e = CliError::CommandNotRun {
            code: 127,
            source: api(ErrorKind::Internal, "starting container a3 failed: x"),
        };
        assert_eq!(e.exit_code(), 127);
        assert_eq!(e.to_string(), "starting container a3 failed: x");
        assert_eq!(CliError::NoMigd.exit_code(), EXIT_MIG_ERROR);
        // The container a failed start left, for run --rm.
        let started = api(
            ErrorKind::Internal,
            "starting container c-1f2e failed: starting the init: x",
        );
        assert_eq!(failed_start(&started), Some("c-1f2e"));
        let taken = api(ErrorKind::AlreadyExists, "the name web is already in use");
        assert_eq!(failed_start(&taken), None);
    }

    /// REPORT #5 of session 16: `mig rm a1 nosuch` printed "mig: nosuch: no such container:
    /// nosuch" and then "mig: 1 of 2 operations failed".
    #[test]
    fn each_failed_target_is_one_line_naming_it_once() {
        use crate::api::{ApiError, ErrorKind};
        let api = |kind, m: &str| ClientError::Api(ApiError::new(kind, m));
        assert_eq!(
            failure_line(
                "nosuch",
                &api(ErrorKind::NotFound, "no such container: nosuch")
            ),
            "mig: no such container: nosuch"
        );
        assert_eq!(
            failure_line(
                "s1",
                &api(
                    ErrorKind::Conflict,
                    "container s1 is running: stop it first or use -f"
                )
            ),
            "mig: container s1 is running: stop it first or use -f"
        );
        assert_eq!(
            failure_line("web", &api(ErrorKind::Internal, "the agent failed\nbadly")),
            "mig: web: the agent failed badly"
        );
    }

    #[test]
    fn a_closed_reader_is_not_an_error_to_report() {
        let pipe = CliError::Output(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(broken_pipe(&pipe));
        let full = CliError::Output(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(!broken_pipe(&full));
        assert!(!broken_pipe(&CliError::NoMigd));
    }

    #[test]
    fn an_ignored_sigint_stays_ignored() {
        assert!(ignores_sigint("Name:\tmig\nSigIgn:\t0000000000000006\n"));
        assert!(!ignores_sigint("SigIgn:\t0000000000001004\n"));
        assert!(!ignores_sigint(""));
    }

    #[test]
    fn lab_lookup() {
        assert_eq!(
            socket_path(Some(Path::new("/x")), Some("h")).unwrap(),
            PathBuf::from("/x")
        );
        assert_eq!(
            socket_path(None, None).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
    }

    #[test]
    fn names_and_signals() {
        assert_eq!(
            default_image_name(Path::new("/tmp/busybox-rootfs.tar.gz")),
            "busybox-rootfs"
        );
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("10").unwrap(), 10);
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(strip_ansi("\x1b[1merror:\x1b[0m x"), "error: x");
    }
}
