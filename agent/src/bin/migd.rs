//! `migd`: the per-host mig agent.

use anyhow::{bail, Context, Result};
use clap::Parser;
use mig_agent::daemon::{self, Agent, Config};
use std::path::{Path, PathBuf};

/// The mig agent: owns this host's containers and images and serves the API on a unix socket.
#[derive(Debug, Parser)]
#[command(name = "migd", version, about)]
struct Args {
    /// State directory (images, containers).
    #[arg(long, default_value = "/var/lib/mig", value_name = "DIR")]
    state_dir: PathBuf,
    /// The API socket (created mode 0600).
    #[arg(long, default_value = mig_agent::cli::DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// The agent's name (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Parent cgroup of the containers (default: mig-<name>).
    #[arg(long, value_name = "NAME")]
    cgroup_parent: Option<String>,
    /// The mig-shim binary (default: next to migd).
    #[arg(long, env = "MIG_SHIM", value_name = "PATH")]
    shim: Option<PathBuf>,
    /// The QUIC endpoint for peer agents (migrations), e.g. 10.78.0.10:7878. Without it the
    /// agent only makes outgoing moves (from an ephemeral port).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
}

/// The pipe size CRIU's lazy page server needs (DESIGN.md, "Platform facts").
const PIPE_MAX_SIZE: u64 = 16 << 20;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("reading the hostname")?
            .to_string_lossy()
            .into_owned(),
    };
    mig_runtime::spec::validate_name(&name).context("invalid agent name")?;
    let cgroup_parent = args.cgroup_parent.unwrap_or_else(|| format!("mig-{name}"));
    let cg_ok = !cgroup_parent.is_empty()
        && cgroup_parent.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        });
    if !cg_ok {
        bail!("invalid cgroup parent {cgroup_parent:?}");
    }
    let shim = match args.shim {
        Some(s) => s,
        None => std::env::current_exe()
            .context("locating migd")?
            .with_file_name("mig-shim"),
    };
    if !shim.is_file() {
        bail!("the shim {} does not exist", shim.display());
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&args.state_dir)
        .with_context(|| format!("resolving {}", args.state_dir.display()))?;
    raise_pipe_max_size();
    let cfg = Config {
        state_dir,
        name,
        cgroup_parent,
        shim,
    };
    tracing::info!(name = %cfg.name, state_dir = %cfg.state_dir.display(), socket = %args.socket.display(), "starting");
    let (agent, live) = Agent::open(cfg).context("opening the state directory")?;
    tracing::info!(adopted = live.len(), "containers loaded");
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async {
        let listener = bind(&args.socket).await?;
        daemon::watch_adopted(&agent, live);
        mig_agent::migration::start(&agent, args.listen)
            .context("starting the migration endpoint")?;
        daemon::run(listener, agent, shutdown_signal()).await;
        let _ = std::fs::remove_file(&args.socket);
        Ok(())
    })
}

/// Binds the API socket, root-only; replaces a stale socket but not a live agent's.
async fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another agent is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // Created with mode 0600 from the start: no window where others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    listener.with_context(|| format!("binding {}", path.display()))
}

/// Makes sure pipes can be as large as CRIU's lazy page server needs.
fn raise_pipe_max_size() {
    let p = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if cur < PIPE_MAX_SIZE {
        if let Err(e) = std::fs::write(p, PIPE_MAX_SIZE.to_string()) {
            tracing::warn!(error = %e, "cannot raise fs.pipe-max-size; lazy migration may fail");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop migd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
