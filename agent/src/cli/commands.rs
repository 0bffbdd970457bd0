//! Executing `mig` commands against the agent.

use super::{Cli, DEFAULT_SOCKET, EXIT_MIG_ERROR};
use crate::api::MAX_EXEC_STDIN;
use crate::client::{Client, ClientError};
use clap::FromArgMatches;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod dispatch;
pub(crate) mod run;

use dispatch::dispatch;

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
    #[error("--decide settles an in-doubt move and needs --resolve: mig move --resolve CONTAINER --decide OUTCOME (nothing was moved)")]
    DecideWithoutResolve,
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("--remote needs --fingerprint (the agent's certificate fingerprint)")]
    NoFingerprint,
    #[error("{failed} of {total} operations failed")]
    Partial { failed: usize, total: usize },
    #[error("the host is not empty: {}{arriving} still arriving here (drain again once they have arrived)", match failed { 0 => String::new(), _ => format!("{failed} of {total} moves failed, ") })]
    NotDrained {
        failed: usize,
        total: usize,
        arriving: usize,
    },
    #[error("the agent is older than this mig and does not know {option}")]
    OlderAgent {
        option: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("interrupted: the move of {container} to {peer} goes on in the agent (Ctrl-C does not cancel a move); `mig ps -a`, `mig inspect {container}` or `mig events` show where it ends")]
    MoveInterrupted { container: String, peer: String },
    #[error("interrupted: {}{}", match peer { Some(p) => format!("the move of {container} to {p} goes on in the agent (Ctrl-C does not cancel a move; `mig inspect {container}` or `mig events` show where it ends)"), None => format!("{container} was not moved (drain waited for its memory to arrive)") }, if untried.is_empty() { String::new() } else { format!("; not tried: {}", untried.join(", ")) })]
    DrainInterrupted {
        container: String,
        /// The peer of the move under way, if one was.
        peer: Option<String>,
        untried: Vec<String>,
    },
    #[error("interrupted: container {name} keeps running (Ctrl-C detaches mig run, it does not stop the container{}); `mig logs -f {name}` follows it again, `mig stop {name}` ends it", if *rm { ", and --rm no longer applies" } else { "" })]
    RunDetached { name: String, rm: bool },
    #[error("--rm needs an attached run (without -d): mig removes the container when it ends, and with -d nothing waits for the end; remove it with mig rm")]
    RmDetached,
    #[error("{peer} is not a pinned peer of this host (pinned: {pinned})")]
    NotAPeer { peer: String, pinned: String },
    #[error("no pinned peer to drain to (mig peers add)")]
    NoPeerToDrainTo,
    #[error("{what} is under way: the memory use to balance is not settled (a container being moved counts on neither host); nothing was moved: run mig rebalance again once it ended (--dry-run plans anyway)")]
    MovesUnderWay { what: String },
    #[error("mig exec has no terminal (-t): the command's output comes through pipes, as it is written; pipe input with -i instead, e.g. echo 'ls /' | mig exec -i CONTAINER sh")]
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

/// `e`'s message and its sources', on one line ([`crate::client::report`]).
fn chained(e: &(dyn std::error::Error + 'static)) -> String {
    crate::client::report(e).replace('\n', " ")
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

/// Resolves on Ctrl-C (SIGINT), for the commands that then say what goes on without them;
/// never when SIGINT was ignored as mig started (a background job of a shell script: the
/// shell's choice is kept, as before) or when no handler can be installed.
pub(super) async fn interrupted() {
    if !ignored_at_start(libc::SIGINT) && tokio::signal::ctrl_c().await.is_ok() {
        return;
    }
    std::future::pending::<()>().await
}

/// Whether signal `sig` is ignored by this process, as its parent left it (`nohup` ignores
/// SIGHUP, a shell's background job SIGINT): read before any handler of ours replaces that,
/// so that a command keeps the choice rather than overriding it.
pub(crate) fn ignored_at_start(sig: i32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    ignores(&status, sig)
}

/// Whether `/proc/PID/status` text says signal `sig` is ignored (its bit in the `SigIgn` mask).
fn ignores(status: &str, sig: i32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;
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
        assert!(ignores(
            "Name:\tmig\nSigIgn:\t0000000000000006\n",
            libc::SIGINT
        ));
        assert!(!ignores("SigIgn:\t0000000000001004\n", libc::SIGINT));
        assert!(!ignores("", libc::SIGINT));
        assert!(ignores("SigIgn:\t0000000000000001\n", libc::SIGHUP));
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
}
