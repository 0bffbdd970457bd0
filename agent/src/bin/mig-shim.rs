//! `mig-shim`: the per-container supervisor started by `migd` (synchronous, no tokio).

use clap::{Parser, Subcommand};
use mig_agent::shim::{self, EXEC_ERROR_MARKER};
use std::path::PathBuf;
use std::process::ExitCode;

/// Per-container supervisor (started by migd; not meant to be run by hand).
#[derive(Debug, Parser)]
#[command(name = "mig-shim", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build and start container ID, report on stdout, supervise it until it exits.
    Start {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        cgroup_parent: String,
    },
    /// Restore checkpointed container ID, report on stdout, supervise it until it exits.
    Restore {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        cgroup_parent: String,
    },
    /// Run a command inside running container ID; exits with its code.
    Exec {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        id: String,
        /// Accepted for symmetry with start; the cgroup comes from state.json.
        #[arg(long)]
        cgroup_parent: Option<String>,
        #[arg(long = "env")]
        env: Vec<String>,
        /// UID:GID to run as (numbers; the container's user by default).
        #[arg(long, value_parser = shim::parse_ids)]
        user: Option<(u32, u32)>,
        /// Absolute working directory (the container's by default).
        #[arg(long)]
        workdir: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// CRIU's pre-resume action when restoring frozen (written into the action script).
    #[command(hide = true, name = "restore-frozen-hook")]
    RestoreFrozenHook {
        #[arg(long)]
        procs: PathBuf,
        #[arg(long)]
        home_procs: PathBuf,
        #[arg(long)]
        freeze: PathBuf,
        #[arg(long)]
        value: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.cmd {
        Cmd::Start {
            state_dir,
            id,
            cgroup_parent,
        } => ExitCode::from(
            shim::start(&state_dir, &id, &cgroup_parent, shim::Mode::Start).clamp(0, 255) as u8,
        ),
        Cmd::Restore {
            state_dir,
            id,
            cgroup_parent,
        } => ExitCode::from(
            shim::start(&state_dir, &id, &cgroup_parent, shim::Mode::Restore).clamp(0, 255) as u8,
        ),
        Cmd::RestoreFrozenHook {
            procs,
            home_procs,
            freeze,
            value,
        } => match shim::restore_frozen_hook(&procs, &home_procs, &freeze, &value) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mig-shim: {}", shim::chain(&e));
                ExitCode::FAILURE
            }
        },
        Cmd::Exec {
            state_dir,
            id,
            env,
            command,
            user,
            workdir,
            ..
        } => match shim::exec(
            &state_dir,
            &id,
            &shim::ExecAs { user, workdir },
            &env,
            &command,
        ) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("{EXEC_ERROR_MARKER}{}", shim::chain(&e));
                ExitCode::from(125)
            }
        },
    }
}
