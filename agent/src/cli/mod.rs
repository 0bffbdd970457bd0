//! The `mig` command line: argument definitions ([`Cli`]), their execution ([`main`]) and output
//! formatting. `mig` is a thin client of the agent API ([`crate::client`]).
//!
//! Exit codes: 0 on success, 125 for mig's own errors (one line `mig: <reason>` on stderr per
//! failure, usage errors included), and the container's code for `exec` and for an attached
//! `run` (127 or 126 when its command cannot be run).

mod commands;
mod completion;
mod drain;
mod events;
mod logs;
pub mod man;
mod moves;
pub(crate) mod output;
mod rebalance;

pub(crate) use commands::ignored_at_start;
pub use commands::main;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

/// The default agent socket.
pub const DEFAULT_SOCKET: &str = "/run/mig/migd.sock";
/// The lab file that maps host names to agent sockets (written by `mig lab up`).
/// The exit code of mig's own failures.
pub const EXIT_MIG_ERROR: u8 = 125;

/// Run and move Linux containers.
#[derive(Debug, Parser)]
#[command(name = "mig", version, propagate_version = true)]
pub struct Cli {
    /// The agent's API socket. The agent is chosen by --remote, else --socket, else --host,
    /// else /run/mig/migd.sock; an option on the command line wins over the variables of the
    /// others (MIG_SOCKET does not override --host).
    #[arg(long, env = "MIG_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Talk to the agent of this lab host (looked up in /run/mig/lab.json, or the lab file of the
    /// lab named by MIG_LAB).
    #[arg(long, env = "MIG_HOST", global = true, value_name = "NAME")]
    pub host: Option<String>,
    /// Talk to a remote agent over QUIC (its `--listen` address) instead of a local socket;
    /// needs --fingerprint, and this client pinned there with `mig clients add`.
    #[arg(long, env = "MIG_REMOTE", global = true, value_name = "ADDR:PORT")]
    pub remote: Option<std::net::SocketAddr>,
    /// The remote agent's certificate fingerprint (`mig info` there).
    #[arg(
        long,
        env = "MIG_REMOTE_FINGERPRINT",
        global = true,
        value_name = "FP",
        requires = "remote"
    )]
    pub fingerprint: Option<String>,
    /// This client's identity directory for --remote (default ~/.config/mig).
    #[arg(long, env = "MIG_IDENTITY", global = true, value_name = "DIR")]
    pub identity: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The global options that choose the agent `mig` talks to: global so that `mig --host host-b
/// ps` and `mig ps --host host-b` both work, but meaningless to [`NO_AGENT`].
const CLIENT_OPTIONS: [&str; 5] = ["socket", "host", "remote", "fingerprint", "identity"];

/// The subcommands that talk to no agent chosen by [`CLIENT_OPTIONS`], and why (for the error
/// when one is given): `lab` works on this machine's lab, `bench` makes a lab of its own,
/// `rebalance` talks to the hosts of `--hosts` or of a lab (QA of session 29: it ignored them).
const NO_AGENT: [(&str, &str); 3] = [
    (
        "lab",
        "it works on this machine's lab, named by MIG_LAB; a lab host's agent is reached with \
         mig --host host-a COMMAND",
    ),
    ("bench", "it makes a lab of its own (--lab)"),
    (
        "rebalance",
        "it balances the hosts named by --hosts (lab host names or agent sockets), else every \
         host of the lab named by --lab or MIG_LAB",
    ),
];

/// `mig`'s command line: [`Cli`]'s, with [`CLIENT_OPTIONS`] hidden from the help of
/// [`NO_AGENT`] and their subcommands (and from the completion scripts, which are made from a
/// copy without hidden arguments, cli/completion.rs). clap copies a global option into every
/// subcommand when the command is built and cannot leave one out, so the copies are hidden on
/// the built command; `mut_subcommands` and `mut_args` replace in place, keeping each argument
/// at the index the built command's lookup table holds (`mut_arg` would move it).
pub fn command() -> clap::Command {
    fn hide(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            let client = CLIENT_OPTIONS.contains(&a.get_id().as_str());
            a.hide(client)
        })
        .mut_subcommands(hide)
    }
    let mut cmd = Cli::command();
    cmd.build();
    cmd.mut_subcommands(|sub| {
        if NO_AGENT.iter().any(|(name, _)| sub.get_name() == *name) {
            hide(sub)
        } else {
            sub
        }
    })
}

/// A client option given on the command line to a subcommand that talks to no chosen agent:
/// refused rather than ignored (`mig --host host-a lab up` made the default lab, not one on
/// host-a). The same options from the environment (`MIG_HOST` exported for other commands) are
/// ignored there.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("--{option} does not apply to mig {command}: {why}")]
pub struct MisplacedOption {
    pub option: &'static str,
    pub command: &'static str,
    pub why: &'static str,
}

/// The first of [`CLIENT_OPTIONS`] given on the command line, when the subcommand is one of
/// [`NO_AGENT`]. `matches` are [`command`]'s.
pub fn misplaced_client_option(matches: &ArgMatches) -> Option<MisplacedOption> {
    let sub = matches.subcommand_name()?;
    let (command, why) = NO_AGENT.iter().find(|(name, _)| *name == sub)?;
    let option = CLIENT_OPTIONS
        .into_iter()
        .find(|id| matches.value_source(id) == Some(ValueSource::CommandLine))?;
    Some(MisplacedOption {
        option,
        command,
        why,
    })
}

/// The options that choose the agent, in the order they win among themselves when given the
/// same way (all on the command line, or all from the environment).
const AGENT_CHOICE: [&str; 3] = ["remote", "socket", "host"];

/// Command line over environment: when one of [`AGENT_CHOICE`] is on the command line, those
/// that came only from their variables are dropped, so `MIG_SOCKET=a.sock mig --host host-b ps`
/// talks to host-b (the exported MIG_SOCKET silently won) and `MIG_HOST=host-a mig --socket
/// b.sock drain` drains b.sock's host. `matches` are [`command`]'s, `cli` was made from them.
pub fn prefer_command_line(cli: &mut Cli, matches: &ArgMatches) {
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    if !AGENT_CHOICE.into_iter().any(given) {
        return;
    }
    if !given("remote") {
        cli.remote = None;
    }
    if !given("socket") {
        cli.socket = None;
    }
    if !given("host") {
        cli.host = None;
    }
}

/// `-e KEY` without a value, as podman takes it: `KEY=<KEY's value in mig's environment>`, or
/// nothing when mig's environment has no KEY (podman leaves it out too). `get` reads mig's
/// environment. An entry with `=` is kept as it is; a value that is not UTF-8 is kept as the
/// bare KEY, which the agent refuses by name.
pub fn expand_env(entries: &mut Vec<String>, get: impl Fn(&str) -> Option<std::ffi::OsString>) {
    entries.retain_mut(|e| {
        if e.contains('=') || e.is_empty() {
            return true;
        }
        match get(e.as_str()).map(|v| v.into_string()) {
            Some(Ok(v)) => {
                e.push('=');
                e.push_str(&v);
                true
            }
            Some(Err(_)) => true,
            None => false,
        }
    });
}

/// [`expand_env`] on `run -e` and `exec -e` with mig's environment.
pub fn expand_env_options(cli: &mut Cli) {
    let env = match &mut cli.command {
        Command::Run(r) => &mut r.env,
        Command::Exec { env, .. } => env,
        _ => return,
    };
    expand_env(env, |k| std::env::var_os(k));
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Move a running container to a pinned peer agent (live migration).
    Move(moves::MoveArgs),
    /// Move every running container of a host to its pinned peers (round-robin) and report
    /// each result: the host is empty afterwards unless a move failed.
    Drain(drain::DrainArgs),
    /// Manage the pinned peer agents.
    #[command(subcommand)]
    Peers(moves::PeersCommand),
    /// A local multi-host lab: network namespaces with one agent each.
    #[command(subcommand)]
    Lab(moves::LabCommand),
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create and start a container.
    Run(RunArgs),
    /// List containers.
    Ps {
        /// Show all containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Print only the containers' short ids, one a line (`mig rm $(mig ps -aq)`).
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a container's details, usage and PID map (several: one after the other; with
    /// --json, an array).
    Inspect {
        /// Container ids, id prefixes or names.
        #[arg(required = true)]
        containers: Vec<String>,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a container's output.
    Logs {
        /// Keep printing until the container ends.
        #[arg(short, long)]
        follow: bool,
        /// Print only the last N lines of the log (with --follow: then go on with what comes).
        #[arg(long, short = 'n', value_name = "N")]
        tail: Option<usize>,
        /// Container id, id prefix or name.
        container: String,
    },
    /// Run a command in a running container; exits with the command's code. Its output is
    /// printed as it comes.
    Exec {
        /// Extra environment (KEY=VALUE), repeatable; a KEY alone takes the value KEY has in
        /// mig's environment (and is left out when mig's environment has no KEY).
        #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
        env: Vec<String>,
        /// Run as USER or USER:GROUP (names from the container's /etc/passwd and /etc/group, or
        /// numbers); default: the container's user.
        #[arg(short, long, value_name = "USER[:GROUP]")]
        user: Option<String>,
        /// Working directory inside the container (absolute); default: the container's.
        #[arg(short, long, value_name = "DIR")]
        workdir: Option<String>,
        /// Give the command this command's standard input, read to its end (at most 8 MiB)
        /// before the command starts; without it the command's is /dev/null.
        #[arg(short, long)]
        interactive: bool,
        /// Refused: mig exec has no terminal (the command's output comes through pipes); pipe
        /// input with -i instead.
        #[arg(short, long)]
        tty: bool,
        /// Container id, id prefix or name.
        container: String,
        /// The command and its arguments, after `--` or (as podman takes it) right after the
        /// container: `mig exec web ls -l`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Stop containers: SIGTERM to the init, SIGKILL after the timeout.
    Stop {
        /// Seconds to wait before killing.
        #[arg(short, long, default_value_t = 10, value_name = "SECS")]
        time: u64,
        /// Container ids, id prefixes or names.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Send a signal to a container's init.
    Kill {
        /// Signal name or number.
        #[arg(short, long, default_value = "KILL", value_name = "SIG")]
        signal: String,
        /// Container ids, id prefixes or names.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        /// Kill running containers first.
        #[arg(short, long)]
        force: bool,
        /// Container ids, id prefixes or names.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Checkpoint a running container with CRIU; it stops unless --leave-running.
    Checkpoint {
        /// Keep the container running after the dump.
        #[arg(long)]
        leave_running: bool,
        /// Also write a portable archive (tar; zstd when FILE ends in .zst).
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// Dump established TCP connections too (the restore finds them in the image set).
        #[arg(long)]
        tcp_established: bool,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
        /// Container id, id prefix or name.
        container: String,
    },
    /// Restore a checkpointed container (same PIDs inside, same log), or a new one from an
    /// exported archive with --import.
    Restore {
        /// Create the container from this archive (the image must be on the host).
        #[arg(long, value_name = "FILE", conflicts_with = "container")]
        import: Option<PathBuf>,
        /// Name of the imported container (default: the archived name).
        #[arg(long, requires = "import")]
        name: Option<String>,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
        /// Container id, id prefix or name.
        #[arg(required_unless_present = "import")]
        container: Option<String>,
    },
    /// Show the agent's host.
    Info {
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Manage the remote API clients an agent accepts, and this client's identity.
    #[command(subcommand)]
    Clients(events::ClientsCommand),
    /// Even out memory use across hosts by moving containers (a reference rebalancer).
    Rebalance(rebalance::RebalanceArgs),
    /// Follow the agent's events (container lifecycle, checkpoints, migration phases).
    Events(events::EventsArgs),
    /// Experiments: `mig bench move` measures moves against a baseline in its own lab.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell to write the script for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a rootfs directory or tar (plain, gzip, zstd), an OCI layout directory or OCI archive,
    /// or a docker-archive (`docker save` before Docker 25, `podman save`).
    Import {
        /// The image to import (on the agent's host).
        path: PathBuf,
        /// The image name (default: the file name without extensions).
        #[arg(long)]
        name: Option<String>,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List images.
    Ls {
        /// Print only the images' short ids, one a line (an id held by several names once).
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
        /// Print JSON (the API's types, docs/api.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove images.
    Rm {
        /// Image names, ids or id prefixes.
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run in the background and print the container id.
    #[arg(short, long)]
    pub detach: bool,
    /// Container name (unique on the host).
    #[arg(long)]
    pub name: Option<String>,
    /// Hostname inside the container.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Memory limit, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_memory, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// CPU limit in CPUs, e.g. 1.5 (at most the CPUs of the agent's host).
    #[arg(long, value_parser = parse_cpus, value_name = "CPUS", allow_hyphen_values = true)]
    pub cpus: Option<u64>,
    /// Maximum number of processes.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Environment variable (KEY=VALUE), repeatable; a KEY alone takes the value KEY has in
    /// mig's environment (and is left out when mig's environment has no KEY).
    #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Remove the container when it ends (an attached run only: with -d nothing waits for the
    /// end). A container that fails to start is removed too.
    #[arg(long)]
    pub rm: bool,
    /// Run in a user namespace (root inside maps to an unprivileged host uid).
    #[arg(long)]
    pub userns: bool,
    /// Network: `bridge` gives the container a veth into the host's bridge and an address of
    /// the host's container subnet (docs/networking.md); default: loopback only.
    #[arg(long, value_enum, value_name = "MODE")]
    pub net: Option<NetArg>,
    /// The container's address with --net bridge (default: the first free one).
    #[arg(long, value_name = "ADDR", requires = "net")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Run as USER or USER:GROUP: names are looked up in the image's /etc/passwd and /etc/group,
    /// numbers are taken as they are (a uid without a passwd entry gets gid 0); default: the
    /// image's user.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Working directory of the command inside the container (absolute), created owned by the
    /// user when the image lacks it; default: the image's.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Replace the image's entrypoint: a command name, or a JSON array ('["sh","-c"]'); the
    /// image's command is then dropped unless one is given after --. '' clears the entrypoint.
    #[arg(long, value_name = "CMD", value_parser = parse_entrypoint)]
    pub entrypoint: Option<Entrypoint>,
    /// With -d: print the id and name as JSON (`{"id", "name"}`); attached, the command's own
    /// output is printed as it is, so --json needs -d.
    #[arg(long, requires = "detach")]
    pub json: bool,
    /// Refused: a container's standard input is /dev/null (give one command input with
    /// `mig exec -i`).
    #[arg(short, long)]
    pub interactive: bool,
    /// Refused: a container has no terminal; its output goes to its log (`mig logs`).
    #[arg(short, long)]
    pub tty: bool,
    /// Run an OCI runtime bundle (a directory with config.json and the rootfs it names, as runc
    /// takes it) instead of an image; unsupported config.json fields are refused by name.
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub bundle: Option<PathBuf>,
    /// Image name or id.
    #[arg(required_unless_present = "bundle")]
    pub image: Option<String>,
    /// The command (default: the image's).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `mig run --net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetArg {
    /// A veth into the host's bridge.
    Bridge,
}

impl From<NetArg> for mig_runtime::net::NetMode {
    fn from(n: NetArg) -> Self {
        match n {
            NetArg::Bridge => mig_runtime::net::NetMode::Bridge,
        }
    }
}

/// `mig run --entrypoint`: the words that replace the image's entrypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entrypoint(pub Vec<String>);

/// As podman: a JSON array of strings is the whole entrypoint, anything else one word (not
/// split on spaces); '' is an empty entrypoint.
fn parse_entrypoint(s: &str) -> Result<Entrypoint, String> {
    if s.is_empty() {
        return Ok(Entrypoint(Vec::new()));
    }
    if s.trim_start().starts_with('[') {
        return serde_json::from_str::<Vec<String>>(s)
            .map(Entrypoint)
            .map_err(|e| format!("invalid entrypoint {s:?}: not a JSON array of strings ({e})"));
    }
    Ok(Entrypoint(vec![s.to_owned()]))
}

fn parse_memory(s: &str) -> Result<u64, String> {
    mig_runtime::spec::parse_size(s)
        .ok_or_else(|| format!("invalid size {s:?} (use e.g. 256M, 1G)"))
}

fn parse_cpus(s: &str) -> Result<u64, String> {
    match s.parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 && c <= 1000.0 => {
            Ok((c * 1000.0).round().max(1.0) as u64)
        }
        _ => Err(format!("invalid CPU count {s:?} (use e.g. 0.5, 2)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    #[test]
    fn cli_is_consistent_and_parses_run() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "mig", "run", "-d", "--name", "web", "--memory", "256M", "--cpus", "1.5", "--env",
            "A=B", "busybox", "--", "sleep", "100",
        ])
        .unwrap();
        match c.command {
            Command::Run(r) => {
                assert!(r.detach);
                assert_eq!(r.memory, Some(256 << 20));
                assert_eq!(r.cpus, Some(1500));
                assert_eq!(r.command, ["sleep", "100"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["mig", "run", "--memory", "lots", "busybox"]).is_err());
    }

    /// The help `args` (asking for it) print, from [`command`] as `mig` parses.
    fn help(args: &[&str]) -> String {
        let e = command().try_get_matches_from(args).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{args:?}");
        e.to_string()
    }

    #[test]
    fn client_options_are_hidden_and_refused_where_they_mean_nothing() {
        let shown = [
            "--socket <PATH>",
            "--host <NAME>",
            "--remote <ADDR:PORT>",
            "--fingerprint <FP>",
            "--identity <DIR>",
        ];
        for args in [
            &["mig", "lab", "--help"][..],
            &["mig", "lab", "up", "--help"],
            &["mig", "lab", "restart", "--help"],
            &["mig", "bench", "--help"],
            &["mig", "bench", "move", "--help"],
            &["mig", "help", "lab", "up"],
        ] {
            let h = help(args);
            for o in shown {
                assert!(!h.contains(o), "{args:?} shows {o}:\n{h}");
            }
        }
        for args in [
            &["mig", "--help"][..],
            &["mig", "run", "--help"],
            &["mig", "peers", "ls", "--help"],
        ] {
            let h = help(args);
            for o in shown {
                assert!(h.contains(o), "{args:?} lacks {o}:\n{h}");
            }
        }

        let parse = |args: &[&str]| {
            let m = command().try_get_matches_from(args).unwrap();
            (
                Cli::from_arg_matches(&m).unwrap(),
                misplaced_client_option(&m),
            )
        };
        // Still global, before or after the subcommand.
        for args in [
            &["mig", "--host", "host-a", "ps"][..],
            &["mig", "ps", "--host", "host-a"],
            &["mig", "run", "--host", "host-a", "-d", "busybox"],
        ] {
            let (cli, bad) = parse(args);
            assert_eq!(cli.host.as_deref(), Some("host-a"), "{args:?}");
            assert_eq!(bad, None, "{args:?}");
        }
        // `lab restart HOST` names a host without being --host.
        let (cli, bad) = parse(&["mig", "lab", "restart", "host-b"]);
        assert_eq!(bad, None);
        assert!(
            matches!(&cli.command, Command::Lab(moves::LabCommand::Restart { host }) if host == "host-b"),
            "{cli:?}"
        );
        // Given to lab or bench, anywhere on the line: refused, naming the option.
        for (args, option, command) in [
            (&["mig", "--host", "host-a", "lab", "up"][..], "host", "lab"),
            (
                &["mig", "lab", "down", "--socket", "/x.sock"],
                "socket",
                "lab",
            ),
            (
                &[
                    "mig",
                    "--remote",
                    "10.0.0.1:7000",
                    "--fingerprint",
                    "ab",
                    "lab",
                    "status",
                ],
                "remote",
                "lab",
            ),
            (
                &["mig", "bench", "move", "--identity", "/x"],
                "identity",
                "bench",
            ),
            (
                &["mig", "rebalance", "--host", "host-a", "--dry-run"],
                "host",
                "rebalance",
            ),
        ] {
            let bad = parse(args).1.unwrap_or_else(|| panic!("{args:?} accepted"));
            assert_eq!((bad.option, bad.command), (option, command), "{args:?}");
        }
        let msg = parse(&["mig", "--host", "host-a", "lab", "up"])
            .1
            .unwrap()
            .to_string();
        assert!(
            msg.starts_with("--host does not apply to mig lab: it works on this machine's lab"),
            "{msg}"
        );
    }

    #[test]
    fn run_user_workdir_entrypoint() {
        let run = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Run(r) => r,
            other => panic!("{other:?}"),
        };
        let r = run(&[
            "mig",
            "run",
            "-u",
            "nobody:nogroup",
            "-w",
            "/tmp",
            "--entrypoint",
            "id",
            "busybox",
        ]);
        assert_eq!(r.user.as_deref(), Some("nobody:nogroup"));
        assert_eq!(r.workdir.as_deref(), Some("/tmp"));
        assert_eq!(r.entrypoint, Some(Entrypoint(vec!["id".into()])));
        let r = run(&["mig", "run", "--user", "1000", "--workdir", "/", "busybox"]);
        assert_eq!(r.user.as_deref(), Some("1000"));
        assert_eq!(r.entrypoint, None);
        let r = run(&["mig", "run", "--entrypoint", "", "busybox"]);
        assert_eq!(r.entrypoint, Some(Entrypoint(vec![])));
        let r = run(&[
            "mig",
            "run",
            "--entrypoint",
            r#"["sh", "-c"]"#,
            "busybox",
            "--",
            "id",
        ]);
        assert_eq!(
            r.entrypoint,
            Some(Entrypoint(vec!["sh".into(), "-c".into()]))
        );
        assert_eq!(r.command, ["id"]);
        // Not split on spaces (podman neither).
        let r = run(&["mig", "run", "--entrypoint", "sleep 1", "busybox"]);
        assert_eq!(r.entrypoint, Some(Entrypoint(vec!["sleep 1".into()])));
        assert!(Cli::try_parse_from(["mig", "run", "--entrypoint", "[1]", "busybox"]).is_err());
    }

    /// REPORT #15 of session 16: `-e QAVAR` was refused ("expected KEY=VALUE"); podman takes
    /// the value from its own environment and leaves the variable out when it has none.
    #[test]
    fn a_bare_env_key_takes_mig_s_value() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let get = |k: &str| match k {
            "HOME" => Some(OsString::from("/root")),
            "EMPTY" => Some(OsString::new()),
            "BAD" => Some(OsString::from_vec(vec![0xff])),
            _ => None,
        };
        let mut env: Vec<String> = ["A=B", "HOME", "UNSET", "EMPTY", "BAD", "C=", ""]
            .map(String::from)
            .to_vec();
        expand_env(&mut env, get);
        assert_eq!(env, ["A=B", "HOME=/root", "EMPTY=", "BAD", "C=", ""]);

        for args in [
            &[
                "mig",
                "run",
                "-e",
                "MIG_TEST_SURELY_UNSET_1",
                "-e",
                "K=V",
                "busybox",
            ][..],
            &[
                "mig",
                "exec",
                "-e",
                "MIG_TEST_SURELY_UNSET_1",
                "-e",
                "K=V",
                "web",
                "env",
            ],
        ] {
            let mut cli = Cli::try_parse_from(args).unwrap();
            expand_env_options(&mut cli);
            let env = match &cli.command {
                Command::Run(r) => &r.env,
                Command::Exec { env, .. } => env,
                other => panic!("{other:?}"),
            };
            assert_eq!(env, &["K=V"], "{args:?}");
        }
    }

    #[test]
    fn quiet_lists_and_run_rm_parse() {
        let c = Cli::try_parse_from(["mig", "ps", "-aq"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Ps {
                all: true,
                quiet: true,
                json: false
            }
        ));
        let c = Cli::try_parse_from(["mig", "image", "ls", "-q"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Image(ImageCommand::Ls {
                quiet: true,
                json: false
            })
        ));
        assert!(Cli::try_parse_from(["mig", "ps", "-q", "--json"]).is_err());
        let c = Cli::try_parse_from(["mig", "run", "--rm", "busybox", "--", "true"]).unwrap();
        assert!(matches!(c.command, Command::Run(RunArgs { rm: true, .. })));
    }

    #[test]
    fn exec_options() {
        let c = Cli::try_parse_from([
            "mig",
            "exec",
            "-i",
            "-u",
            "app:staff",
            "-w",
            "/srv",
            "-e",
            "A=B",
            "web",
            "--",
            "cat",
        ])
        .unwrap();
        match c.command {
            Command::Exec {
                user,
                workdir,
                interactive,
                tty,
                env,
                container,
                command,
            } => {
                assert_eq!(user.as_deref(), Some("app:staff"));
                assert_eq!(workdir.as_deref(), Some("/srv"));
                assert!(interactive && !tty);
                assert_eq!(env, ["A=B"]);
                assert_eq!(container, "web");
                assert_eq!(command, ["cat"]);
            }
            other => panic!("{other:?}"),
        }
        // The command without `--`, as podman takes it (and as docs/cli.md's `echo hi | mig exec
        // -i web cat` is written: it failed with "unexpected argument 'cat' found").
        for (args, want) in [
            (&["mig", "exec", "-i", "web", "cat"][..], &["cat"][..]),
            (
                &["mig", "exec", "web", "ls", "-l", "/"][..],
                &["ls", "-l", "/"][..],
            ),
            (
                &["mig", "exec", "web", "--", "sh", "-c", "x"][..],
                &["sh", "-c", "x"][..],
            ),
            (
                &["mig", "exec", "-e", "A=B", "web", "env"][..],
                &["env"][..],
            ),
        ] {
            match Cli::try_parse_from(args).unwrap().command {
                Command::Exec {
                    command, container, ..
                } => {
                    assert_eq!(container, "web", "{args:?}");
                    assert_eq!(command, want, "{args:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(Cli::try_parse_from(["mig", "exec", "web"]).is_err());
        // -t parses (and is refused with a reason when run); -it too.
        let c = Cli::try_parse_from(["mig", "exec", "-it", "web", "--", "sh"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Exec {
                tty: true,
                interactive: true,
                ..
            }
        ));
    }

    #[test]
    fn move_resolve_takes_no_peer() {
        assert!(Cli::try_parse_from(["mig", "move", "--resolve", "web"]).is_ok());
        // The journal names the peer: one given with --resolve was ignored silently (QA
        // session 18).
        let e = Cli::try_parse_from(["mig", "move", "--resolve", "web", "host-b"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        assert!(Cli::try_parse_from(["mig", "move", "web"]).is_err());
    }
}
