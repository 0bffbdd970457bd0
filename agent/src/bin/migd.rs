//! `migd`: the per-host mig agent.

use anyhow::{bail, Context, Result};
use clap::Parser;
use mig_agent::config::{self, ConfigFile, LogFormat, Overrides};
use mig_agent::daemon::{self, Agent, Config};
use std::path::{Path, PathBuf};

/// The mig agent: owns this host's containers and images and serves the API on a unix socket.
///
/// Settings come from the configuration file (/etc/mig/config.toml when it exists, or --config);
/// each flag given overrides the file.
#[derive(Debug, Parser)]
#[command(name = "migd", version)]
struct Args {
    /// The configuration file (default: /etc/mig/config.toml when it exists).
    #[arg(long, env = "MIG_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration, print the effective settings (TOML) and exit.
    #[arg(long)]
    check_config: bool,
    /// State directory (images, containers) [default: /var/lib/mig].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The API socket (created mode 0600) [default: /run/mig/migd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
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
    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9478 (config key
    /// `metrics`).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// The largest migration accepted from a peer (declared size and bytes sent), e.g. 64G
    /// [default: 64G] (config key `limits.max_incoming_bytes`).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    max_incoming_bytes: Option<u64>,
    /// Print the man page (roff) and exit (used to build the package).
    #[arg(long, hide = true)]
    man: bool,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    mig_runtime::spec::parse_size(s)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("invalid size {s:?} (use e.g. 512M or 64G)"))
}

/// migd's man page NAME line, after `migd - `.
const MIGD_NAME_LINE: &str =
    "the mig agent: runs this host's containers, checkpoints them and moves them to peer agents";

/// The pipe size CRIU's lazy page server needs (DESIGN.md, "Platform facts").
const PIPE_MAX_SIZE: u64 = 16 << 20;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    mig_agent::daemon::heap::tune();
    let args = Args::parse();
    if args.man {
        use clap::CommandFactory;
        let out = mig_agent::cli::man::render(Args::command(), MIGD_NAME_LINE, None, "8")
            .context("rendering the man page")?;
        std::io::Write::write_all(&mut std::io::stdout(), &out).context("writing the man page")?;
        return Ok(());
    }
    let (file, path) = ConfigFile::discover(args.config.as_deref())?;
    let eff = file.resolve(Overrides {
        name: args.name,
        listen: args.listen,
        state_dir: args.state_dir,
        socket: args.socket,
        cgroup_parent: args.cgroup_parent,
        log_format: args.log_format,
        metrics: args.metrics,
        max_incoming_bytes: args.max_incoming_bytes,
    })?;
    if args.check_config {
        match &path {
            Some(p) => println!("# {} is valid; effective settings:", p.display()),
            None => println!("# no configuration file; effective settings:"),
        }
        print!("{}", eff.to_toml());
        return Ok(());
    }
    init_logging(eff.log_format);
    let shim = match args.shim {
        Some(s) => s,
        None => std::env::current_exe()
            .context("locating migd")?
            .with_file_name("mig-shim"),
    };
    if !shim.is_file() {
        bail!("the shim {} does not exist", shim.display());
    }
    // Traverse-only from the start (mig_agent::privacy); Agent::open fixes an existing one.
    mig_agent::privacy::create_dir(&eff.state_dir, mig_agent::privacy::TRAVERSE_ONLY)?;
    let state_dir = std::fs::canonicalize(&eff.state_dir)
        .with_context(|| format!("resolving {}", eff.state_dir.display()))?;
    let eff = config::Effective { state_dir, ..eff };
    // Before anything in it is read or changed: a second agent would adopt the first one's
    // containers and take its socket (QA of session 27: two `mig lab restart` of a host at once).
    let _one_agent = lock_state_dir(&eff.state_dir)?;
    eff.pin_peers()?;
    raise_pipe_max_size();
    prepare_criu_cache();
    let cfg = Config {
        state_dir: eff.state_dir.clone(),
        name: eff.name.clone(),
        cgroup_parent: eff.cgroup_parent.clone(),
        shim,
        max_incoming_bytes: eff
            .limits
            .max_incoming_bytes
            .as_ref()
            .map_or(daemon::DEFAULT_MAX_INCOMING_BYTES, |b| b.0),
        max_incoming_moves: eff.limits.max_incoming_moves,
        max_outgoing_moves: eff.limits.max_outgoing_moves,
    };
    let socket = eff.socket.clone();
    tracing::info!(name = %cfg.name, state_dir = %cfg.state_dir.display(), socket = %socket.display(), config = ?path, "starting");
    let (agent, live) = Agent::open(cfg).context("opening the state directory")?;
    tracing::info!(adopted = live.len(), "containers loaded");
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async {
        let listener = bind(&socket).await?;
        daemon::watch_adopted(&agent, live);
        daemon::heap::release_when_idle();
        mig_agent::migration::start(&agent, eff.listen)
            .context("starting the migration endpoint")?;
        mig_agent::migration::settle_sources(&agent).await;
        let clients = eff
            .clients
            .iter()
            .map(|c| mig_agent::remote::ClientInfo {
                name: c.name.clone(),
                fingerprint: c.fingerprint.clone(),
            })
            .collect();
        mig_agent::remote::start(&agent, clients).context("pinning the remote API clients")?;
        if let Some(addr) = eff.metrics {
            mig_agent::metrics::start(&agent, addr)
                .await
                .context("starting the metrics endpoint")?;
        }
        sd_notify("READY=1\nSTATUS=serving");
        daemon::run(listener, agent.clone(), shutdown_signal()).await;
        sd_notify("STOPPING=1");
        // Moves under way end first (a second signal does not wait): a source stopped mid-move
        // left its container frozen until it was started again.
        tokio::select! {
            _ = mig_agent::migration::wait_for_moves(&agent, STOP_WAIT, |n| {
                tracing::info!(moves = n, "waiting for the moves under way to end before stopping");
                sd_notify(&format!("STATUS=waiting for {n} move(s) to end"));
            }) => {}
            _ = shutdown_signal() => tracing::warn!("stopping now, with moves under way"),
        }
        // A post-copy still arriving here when the wait gave up (its 5 minutes, a second
        // signal): its copy is stopped, since nothing here will stop it on missing memory once
        // this agent is gone; the next start settles it (review 2 of session 31, M1).
        let _ = tokio::task::spawn_blocking(mig_agent::migration::stop_arriving_postcopies).await;
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// Tells systemd (Type=notify) about our state: one datagram to `$NOTIFY_SOCKET` (a path, or an
/// abstract socket when it starts with `@`). Nothing happens outside systemd.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(Path::new(&target)),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?target, "cannot notify systemd");
    }
}

/// How long a starting agent waits for the state directory's lock before it refuses to start.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes `<state_dir>/migd.lock` (an exclusive `flock`, held for the agent's life, with the
/// agent's PID in it), or refuses to start when another agent holds it. The descriptor is
/// close-on-exec, so the shims and CRIU do not keep it after the agent ends.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("migd.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // An agent just killed may hold it a moment longer: its main thread is reaped before its
    // other threads have ended and closed it.
    let tried = std::time::Instant::now();
    let locked = loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if tried.elapsed() < LOCK_PATIENCE => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => break r,
        }
    };
    match locked {
        Ok(lock) => {
            lock.set_len(0)
                .and_then(|()| (&*lock).write_all(format!("{}\n", std::process::id()).as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(lock)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = match pid.trim() {
                "" => String::new(),
                p => format!(" (PID {p})"),
            };
            bail!(
                "another migd{pid} runs on the state directory {}: one agent per state directory",
                dir.display()
            )
        }
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
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

/// Gives CRIU a kerndat cache of this boot where `/run` is not a tmpfs (CRIU keeps none there
/// and probes the kernel in every run, about 30 ms): see `mig_migrate::criu::kdat`. Runs before
/// any other thread of the agent starts CRIU.
fn prepare_criu_cache() {
    let criu = match mig_migrate::criu::Criu::locate() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %mig_agent::shim::chain(&e), "no criu: no kerndat cache to prepare");
            return;
        }
    };
    mig_agent::migration::criu_kdat(&criu);
}

/// How long a stopping agent waits for its moves under way (systemd's unit allows it).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

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
