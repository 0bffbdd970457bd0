//! The local multi-host lab: N simulated hosts on one machine, each a network namespace with its own
//! address and its own `migd`, joined by a Linux bridge in a switch namespace.
//!
//! ```text
//!   netns <lab>-host-a          netns <lab>-sw                  netns <lab>-host-b
//!   eth0 10.78.0.10/24 ==veth== host-a ─┐                ┌─ host-b ==veth== eth0 10.78.0.11/24
//!   migd --name host-a                  ├── br0 .1/24 ───┤                  migd --name host-b
//!   migbr0 ─ migup0 ========veth== c-host-a        c-host-b ==veth== migup0 ─ migbr0
//!     └─ mv<id> ==veth== eth0 of a `--net bridge` container (10.78.0.100-250/24)
//! ```
//!
//! Container networking: each host has a bridge `migbr0` joined to the switch by its own veth, so
//! every host's containers share one L2 segment with the hosts; container addresses come from the
//! lab's /24 (`.100`-`.250`, one address table for the lab, see [`CONTAINER_POOL`]) and their
//! default route is the switch bridge's `.1`. Each agent finds this in `<state-dir>/net.json`
//! (docs/networking.md).
//!
//! Agents join only the host's *network* namespace: their mounts stay visible on the machine, so
//! containers and CRIU behave as on a real host. Everything is recorded in the lab file (see
//! [`lab_file_path`]) as it is created, so [`down`] can remove a lab that was only half built.
//!
//! This module is synchronous (std::process::Command and `ip` from iproute2); the CLI calls it
//! directly.

mod cleanup;
mod net;
mod peers;
mod process;

use mig_runtime::fsutil;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cleanup::DownReport;

/// Directory of lab files and default lab run directories.
pub const RUN_DIR: &str = "/run/mig";
/// Name of the default lab, whose lab file is `/run/mig/lab.json`.
pub const DEFAULT_NAME: &str = "mig";
/// Default QUIC port of every lab agent (each host has its own network namespace, so one port fits all).
pub const DEFAULT_QUIC_PORT: u16 = 7878;
/// Environment variable naming the lab `mig --host` and `mig lab` use (default [`DEFAULT_NAME`]).
pub const LAB_ENV: &str = "MIG_LAB";
/// Most hosts a lab can have (`host-a` .. `host-z`).
pub const MAX_HOSTS: usize = 26;
/// How long [`up`] and [`restart_agent`] wait for an agent's socket to appear.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Last octets of the container address pool in the lab's /24, and of the containers' gateway.
pub const CONTAINER_POOL: (u8, u8) = (100, 250);
pub const CONTAINER_GATEWAY: u8 = 1;
/// Largest lab file read back.
const LAB_FILE_MAX: u64 = 1 << 20;

/// What [`up`] builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// Lab name: prefix of its namespaces, names its run and state directories (default "mig").
    pub name: String,
    /// Number of hosts, 1 to [`MAX_HOSTS`].
    pub hosts: usize,
    /// First three octets of the lab's /24; host i gets `<base>.(10+i)` (default 10.78.0).
    pub subnet_base: [u8; 3],
    /// Path of the migd binary.
    pub migd: PathBuf,
    /// Appended to every agent's arguments; `{addr}` becomes the host's address, `{port}` its QUIC
    /// port and `{host}` its name. Default: `--listen {addr}:{port}` (the agent's QUIC endpoint on the
    /// host's address).
    pub extra_agent_args: Vec<String>,
    /// Sockets, logs (default `/run/mig/lab/<name>`).
    pub root_dir: PathBuf,
    /// Parent of the hosts' state directories (default `/var/lib/mig-lab/<name>`).
    pub state_root: PathBuf,
    /// QUIC port recorded for every host (and substituted for `{port}`).
    pub quic_port: u16,
}

impl LabConfig {
    /// A configuration with the default subnet, directories and port.
    pub fn new(name: &str, hosts: usize, migd: PathBuf) -> LabConfig {
        LabConfig {
            name: name.to_string(),
            hosts,
            subnet_base: [10, 78, 0],
            migd,
            extra_agent_args: vec!["--listen".to_string(), "{addr}:{port}".to_string()],
            root_dir: Path::new(RUN_DIR).join("lab").join(name),
            state_root: Path::new("/var/lib/mig-lab").join(name),
            quic_port: DEFAULT_QUIC_PORT,
        }
    }
}

/// One simulated host, as recorded in the lab file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabHost {
    /// `host-a`, `host-b`, ...; also the agent's `--name`.
    pub name: String,
    /// Address of the host's eth0.
    pub address: Ipv4Addr,
    /// Network namespace (`<lab>-host-a`), at `/run/netns/<netns>`.
    pub netns: String,
    /// The agent's local API socket.
    pub socket: PathBuf,
    /// The agent's `--state-dir`.
    pub state_dir: PathBuf,
    /// PID of the agent as started (in [`status`]: None when it is no longer running).
    pub agent_pid: Option<i32>,
    /// Hex sha256 of the host's TLS certificate (`<state_dir>/identity/cert.der`), once it exists.
    pub fingerprint: Option<String>,
    /// UDP port of the agent's QUIC endpoint on `address`.
    pub quic_port: u16,
}

/// How far [`up`] got; recorded so that a half-built lab is recognisable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabPhase {
    /// [`up`] is building it (or failed and its rollback did not finish).
    Building,
    /// Every host is up.
    Up,
}

/// The lab file: `{"name", "hosts": [...]}` plus what [`down`] and [`restart_agent`] need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    pub name: String,
    pub phase: LabPhase,
    pub subnet: String,
    pub switch_netns: String,
    pub bridge: String,
    pub root_dir: PathBuf,
    pub state_root: PathBuf,
    pub migd: PathBuf,
    pub extra_agent_args: Vec<String>,
    pub hosts: Vec<LabHost>,
}

/// Errors of the lab, one variant per failing operation.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab name {name:?}: use 1 to 16 characters of a-z, 0-9 and '-'")]
    InvalidName { name: String },
    #[error("a lab has 1 to {max} hosts, not {hosts}")]
    InvalidHostCount { hosts: usize, max: usize },
    #[error("migd binary {} is not there", path.display())]
    MigdMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lab {name:?} is already up ({reason}); run `mig lab down` first")]
    AlreadyUp { name: String, reason: String },
    #[error("lab {name:?} is not up (no lab file {})", path.display())]
    NotUp { name: String, path: PathBuf },
    #[error("lab {lab:?} has no host {host:?}")]
    NoSuchHost { lab: String, host: String },
    #[error("cannot read lab file {}", path.display())]
    ReadLabFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write lab file {}", path.display())]
    WriteLabFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run `{command}`")]
    SpawnCommand {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot open network namespace {}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open agent log {}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start agent {host} ({})", migd.display())]
    SpawnAgent {
        host: String,
        migd: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("agent {host} exited ({status}) before it served on {}; last lines of {}:\n{log_tail}", socket.display(), log.display())]
    AgentExited {
        host: String,
        status: String,
        socket: PathBuf,
        log: PathBuf,
        log_tail: String,
    },
    #[error("agent {host} did not create {} within {timeout:?}; last lines of {}:\n{log_tail}", socket.display(), log.display())]
    AgentTimeout {
        host: String,
        socket: PathBuf,
        timeout: Duration,
        log: PathBuf,
        log_tail: String,
    },
    #[error("agent {host} (pid {pid}) did not stop")]
    AgentStop { host: String, pid: i32 },
    #[error("cannot signal pid {pid}")]
    Kill {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup {}", path.display())]
    RemoveCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("processes {pids:?} survived SIGKILL")]
    Survivors { pids: Vec<i32> },
    #[error("cannot create the identity of {host}")]
    Identity {
        host: String,
        #[source]
        source: mig_migrate::transport::IdentityError,
    },
    #[error("cannot write the peer store of {host}")]
    PeerStore {
        host: String,
        #[source]
        source: mig_migrate::transport::PeerError,
    },
    #[error("invalid lab subnet {subnet:?}")]
    InvalidSubnet { subnet: String },
    #[error("cannot write the container network of {host}")]
    WriteHostNet {
        host: String,
        #[source]
        source: mig_runtime::net::NetError,
    },
    #[error("lab up failed and was rolled back{}", rollback_summary(rollback))]
    UpRolledBack {
        #[source]
        source: Box<LabError>,
        /// What the rollback could not remove (empty when it removed everything).
        rollback: Vec<LabError>,
    },
}

fn rollback_summary(problems: &[LabError]) -> String {
    if problems.is_empty() {
        return String::new();
    }
    let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    format!(
        " (leaving {} problem(s): {})",
        problems.len(),
        list.join("; ")
    )
}

/// The lab file of lab `name`: `/run/mig/lab.json` for the default lab, `/run/mig/lab-<name>.json`
/// for the others (so a test lab never replaces a user's lab file).
pub fn lab_file_path(name: &str) -> PathBuf {
    if name == DEFAULT_NAME {
        Path::new(RUN_DIR).join("lab.json")
    } else {
        Path::new(RUN_DIR).join(format!("lab-{name}.json"))
    }
}

/// The lab named by `MIG_LAB`, else the default lab.
pub fn lab_name_from_env() -> String {
    std::env::var(LAB_ENV)
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAME.to_string())
}

/// Name of the `i`-th host (0-based): `host-a`, `host-b`, ...
pub fn host_name(i: usize) -> String {
    let letter = char::from(b'a' + (i % MAX_HOSTS) as u8);
    format!("host-{letter}")
}

/// Checks a lab name: 1 to 16 characters of a-z, 0-9 and '-', not starting with '-' (it names
/// namespaces, cgroups and directories).
pub fn validate_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 16
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// The lab file `up` starts from: every host planned, nothing started.
fn plan(cfg: &LabConfig) -> LabFile {
    let [a, b, c] = cfg.subnet_base;
    let hosts = (0..cfg.hosts)
        .map(|i| {
            let name = host_name(i);
            LabHost {
                address: Ipv4Addr::new(a, b, c, 10 + i as u8),
                netns: format!("{}-{name}", cfg.name),
                socket: cfg.root_dir.join(format!("{name}.sock")),
                state_dir: cfg.state_root.join(&name),
                agent_pid: None,
                fingerprint: None,
                quic_port: cfg.quic_port,
                name,
            }
        })
        .collect();
    LabFile {
        name: cfg.name.clone(),
        phase: LabPhase::Building,
        subnet: format!("{a}.{b}.{c}.0/24"),
        switch_netns: format!("{}-sw", cfg.name),
        bridge: "br0".to_string(),
        root_dir: cfg.root_dir.clone(),
        state_root: cfg.state_root.clone(),
        migd: cfg.migd.clone(),
        extra_agent_args: cfg.extra_agent_args.clone(),
        hosts,
    }
}

/// The `migd` installed next to the running executable (`mig` and `migd` are built and installed
/// together), if there is one.
pub fn migd_next_to_current_exe() -> Option<PathBuf> {
    let migd = std::env::current_exe().ok()?.with_file_name("migd");
    migd.is_file().then_some(migd)
}

/// Reads the lab file of lab `name`.
pub fn read_lab_file(name: &str) -> Result<LabFile, LabError> {
    let path = lab_file_path(name);
    match fsutil::read_json(&path, LAB_FILE_MAX) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(LabError::NotUp {
            name: name.to_string(),
            path,
        }),
        Err(source) => Err(LabError::ReadLabFile { path, source }),
    }
}

/// Writes the lab file readable by every user (0644, as before writes became private): it
/// holds names, addresses and paths, no secret, and `mig --host`, `mig lab status` and scripts
/// read it (docs/lab.md).
fn write_lab_file(file: &LabFile) -> Result<(), LabError> {
    let path = lab_file_path(&file.name);
    create_dir(Path::new(RUN_DIR))?;
    serde_json::to_vec_pretty(file)
        .map_err(io::Error::other)
        .and_then(|data| fsutil::atomic_write_mode(&path, &data, fsutil::READABLE_FILE))
        .map_err(|source| LabError::WriteLabFile { path, source })
}

fn create_dir(path: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(path).map_err(|source| LabError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Builds the lab: namespaces, links, identities and peers, one agent per host. Refuses when a lab of
/// that name (its lab file or any of its namespaces) exists. On failure it removes what it made
/// (as [`down`] does) and returns the first error with whatever the rollback could not remove.
pub fn up(cfg: &LabConfig) -> Result<Vec<LabHost>, LabError> {
    validate_name(&cfg.name)?;
    if cfg.hosts == 0 || cfg.hosts > MAX_HOSTS {
        return Err(LabError::InvalidHostCount {
            hosts: cfg.hosts,
            max: MAX_HOSTS,
        });
    }
    std::fs::metadata(&cfg.migd).map_err(|source| LabError::MigdMissing {
        path: cfg.migd.clone(),
        source,
    })?;
    let lab_file = lab_file_path(&cfg.name);
    if lab_file.exists() {
        return Err(LabError::AlreadyUp {
            name: cfg.name.clone(),
            reason: format!("{} exists", lab_file.display()),
        });
    }
    let stale = net::lab_namespaces(&cfg.name)?;
    if !stale.is_empty() {
        return Err(LabError::AlreadyUp {
            name: cfg.name.clone(),
            reason: format!("network namespaces {stale:?} exist"),
        });
    }

    let mut file = plan(cfg);
    // A lab starts fresh: state left by an earlier lab (say, before a reboot, which clears /run but
    // not the state directories) is removed by `down`, not silently reused.
    if let Some(h) = file.hosts.iter().find(|h| h.state_dir.exists()) {
        return Err(LabError::AlreadyUp {
            name: cfg.name.clone(),
            reason: format!("state directory {} exists", h.state_dir.display()),
        });
    }
    // Recorded before anything is made: from here on `down` knows what to remove.
    write_lab_file(&file)?;
    match build(&mut file) {
        Ok(()) => Ok(file.hosts),
        Err(e) => {
            let report = down(&cfg.name);
            let rollback = match report {
                Ok(r) => r.problems,
                Err(e) => vec![e],
            };
            Err(LabError::UpRolledBack {
                source: Box::new(e),
                rollback,
            })
        }
    }
}

fn build(file: &mut LabFile) -> Result<(), LabError> {
    create_dir(&file.root_dir)?;
    create_dir(&file.state_root)?;
    net::create_switch(&file.switch_netns, &file.bridge)?;
    let host_net = container_net(file)?;
    net::set_gateway(
        &file.switch_netns,
        &file.bridge,
        &format!(
            "{}/{}",
            host_net.gateway.unwrap_or(host_net.subnet),
            host_net.prefix_len
        ),
    )?;
    for host in &file.hosts {
        net::create_host(host, &file.switch_netns, &file.bridge)?;
        net::create_container_bridge(host, &file.switch_netns, &file.bridge)?;
    }
    for host in &file.hosts {
        create_dir(&host.state_dir)?;
        host_net
            .store(&host.state_dir)
            .map_err(|e| LabError::WriteHostNet {
                host: host.name.clone(),
                source: e,
            })?;
    }
    peers::prepare(&mut file.hosts)?;
    for i in 0..file.hosts.len() {
        let pid = process::start_agent(
            &file.name,
            &file.hosts[i],
            &file.migd,
            &file.extra_agent_args,
            &file.root_dir,
        )?;
        file.hosts[i].agent_pid = Some(pid);
        write_lab_file(file)?;
        process::wait_for_socket(&file.hosts[i], pid, &file.root_dir, AGENT_START_TIMEOUT)?;
        if file.hosts[i].fingerprint.is_none() {
            file.hosts[i].fingerprint = peers::fingerprint(&file.hosts[i].state_dir);
        }
    }
    // The agents started meanwhile; a container started right after `lab up` must already
    // reach the other hosts' containers.
    if !net::wait_container_segment(&file.hosts, &file.switch_netns, SEGMENT_TIMEOUT) {
        eprintln!(
            "mig lab: the containers' segment did not forward within {} s; frames between \
             hosts' containers may be lost for a moment",
            SEGMENT_TIMEOUT.as_secs()
        );
    }
    file.phase = LabPhase::Up;
    write_lab_file(file)
}

/// How long `lab up` waits for the containers' segment to forward.
const SEGMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The container network of the lab's hosts: the lab's /24, the pool [`CONTAINER_POOL`], the
/// gateway on the switch bridge, one address table in the lab's run directory.
fn container_net(file: &LabFile) -> Result<mig_runtime::net::HostNet, LabError> {
    let base: Ipv4Addr = file
        .subnet
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| LabError::InvalidSubnet {
            subnet: file.subnet.clone(),
        })?;
    let [a, b, c, _] = base.octets();
    Ok(mig_runtime::net::HostNet {
        bridge: mig_runtime::net::DEFAULT_BRIDGE.to_string(),
        subnet: base,
        prefix_len: 24,
        gateway: Some(Ipv4Addr::new(a, b, c, CONTAINER_GATEWAY)),
        first: Ipv4Addr::new(a, b, c, CONTAINER_POOL.0),
        last: Ipv4Addr::new(a, b, c, CONTAINER_POOL.1),
        table: file.root_dir.join("addresses.json"),
        dns: Vec::new(),
        // The hosts' own addresses are in the same /24: no container may take one.
        reserved: file.hosts.iter().map(|h| h.address).collect(),
    })
}

/// The hosts of lab `name` from its lab file, with `agent_pid` cleared for agents no longer running
/// and fingerprints refreshed from the state directories.
pub fn status(name: &str) -> Result<Vec<LabHost>, LabError> {
    let file = read_lab_file(name)?;
    Ok(file
        .hosts
        .into_iter()
        .map(|mut h| {
            h.agent_pid = h
                .agent_pid
                .filter(|&pid| process::agent_alive(pid, &h.socket));
            // The certificate there now (QA: a host whose identity was made again kept its
            // old fingerprint here).
            h.fingerprint = peers::fingerprint(&h.state_dir).or(h.fingerprint);
            h
        })
        .collect())
}

/// Finds host `host` of lab `name` (for `mig --host`).
pub fn find_host(name: &str, host: &str) -> Result<LabHost, LabError> {
    read_lab_file(name)?
        .hosts
        .into_iter()
        .find(|h| h.name == host)
        .ok_or_else(|| LabError::NoSuchHost {
            lab: name.to_string(),
            host: host.to_string(),
        })
}

/// Removes everything lab `name` made: agents, their containers, cgroups and mounts, namespaces,
/// state and run directories, the lab file. Works on a half-built lab and on no lab at all; what it
/// could not remove is listed in [`DownReport::problems`].
pub fn down(name: &str) -> Result<DownReport, LabError> {
    validate_name(name)?;
    // An unreadable lab file (damaged, or from another version) must not keep a lab up: fall back
    // to what the names tell, and say so in the report.
    let mut unreadable = None;
    let file = match read_lab_file(name) {
        Ok(file) => Some(file),
        Err(LabError::NotUp { .. }) => None,
        Err(e) => {
            unreadable = Some(e);
            None
        }
    };
    let file = match file {
        Some(f) => f,
        None => {
            // No lab file: reconstruct from the namespaces and the default directories.
            let mut cfg = LabConfig::new(name, 0, PathBuf::new());
            let mut f = plan(&cfg);
            let namespaces = net::lab_namespaces(name)?;
            let mut hosts: Vec<String> = namespaces
                .iter()
                .filter_map(|ns| ns.strip_prefix(&format!("{name}-")))
                .filter(|h| h.starts_with("host-"))
                .map(str::to_string)
                .collect();
            hosts.extend(cleanup::host_entries(&cfg.state_root));
            hosts.sort();
            hosts.dedup();
            cfg.hosts = hosts.len();
            f.hosts = hosts
                .into_iter()
                .map(|h| LabHost {
                    address: Ipv4Addr::UNSPECIFIED,
                    netns: format!("{name}-{h}"),
                    socket: cfg.root_dir.join(format!("{h}.sock")),
                    state_dir: cfg.state_root.join(&h),
                    agent_pid: None,
                    fingerprint: None,
                    quic_port: 0,
                    name: h,
                })
                .collect();
            f
        }
    };
    // A restart of a host under way finishes first, and one that comes after finds no lab: a
    // restart that outlived the teardown would start an agent nobody stops (review of session
    // 27, L7). Best effort: a half-built lab may have no run directory to lock in.
    // A restart may wait minutes for its agent's moves (a post-copy's last page): say why down
    // waits (review of session 28, L6).
    let run_dir = file.root_dir.is_dir();
    let _restarts: Vec<_> = file
        .hosts
        .iter()
        .filter(|_| run_dir)
        .filter_map(|h| {
            let path = file.root_dir.join(format!("{}.restart.lock", h.name));
            match fsutil::try_lock_exclusive(&path) {
                Ok(Some(held)) => Some(held),
                Ok(None) => {
                    eprintln!(
                        "mig lab: waiting for the restart of {} under way (its agent first lets its moves end)",
                        h.name
                    );
                    lock(&path).ok()
                }
                Err(_) => None,
            }
        })
        .collect();
    let mut report = cleanup::teardown(&file, &lab_file_path(name));
    report.problems.extend(unreadable);
    Ok(report)
}

/// Stops the agent of `host` (if it runs; it first ends the moves under way, as migd does on
/// SIGTERM) and starts it again with the same arguments; returns the host with its new PID.
pub fn restart_agent(name: &str, host: &str) -> Result<LabHost, LabError> {
    let file = read_lab_file(name)?;
    let i = file
        .hosts
        .iter()
        .position(|h| h.name == host)
        .ok_or_else(|| LabError::NoSuchHost {
            lab: name.to_string(),
            host: host.to_string(),
        })?;
    // One restart of a host at a time: a second one would take the first one's new agent for
    // the old one and remove its socket (QA of session 27).
    let _restarting = lock(&file.root_dir.join(format!("{host}.restart.lock")))?;
    let file = read_lab_file(name)?;
    let h = file.hosts[i].clone();
    if let Some(pid) = h.agent_pid {
        process::stop_agent_within(&h.name, pid, &h.socket, process::RESTART_GRACE)?;
    }
    update_host(&file, i, |h| h.agent_pid = None)?;
    let _ = std::fs::remove_file(&h.socket);
    let pid = process::start_agent(
        &file.name,
        &h,
        &file.migd,
        &file.extra_agent_args,
        &file.root_dir,
    )?;
    update_host(&file, i, |h| h.agent_pid = Some(pid))?;
    process::wait_for_socket(&h, pid, &file.root_dir, AGENT_START_TIMEOUT)?;
    let now = peers::fingerprint(&h.state_dir);
    let file = update_host(&file, i, |h| {
        if now.is_some() {
            h.fingerprint = now;
        }
    })?;
    Ok(file.hosts[i].clone())
}

/// Changes host `i` of lab `lab`'s file as it is now (read again under the lab file's lock, so
/// that restarts of other hosts at the same time keep their own changes: QA of session 27 saw
/// one host's new agent PID lost), and writes it.
fn update_host(
    lab: &LabFile,
    i: usize,
    change: impl FnOnce(&mut LabHost),
) -> Result<LabFile, LabError> {
    let _locked = lock(&lab.root_dir.join("lab.lock"))?;
    let mut file = read_lab_file(&lab.name)?;
    let host = file.hosts.get_mut(i).ok_or_else(|| LabError::NoSuchHost {
        lab: lab.name.clone(),
        host: lab.hosts[i].name.clone(),
    })?;
    change(host);
    write_lab_file(&file)?;
    Ok(file)
}

/// An exclusive `flock` on `path` (created if need be), held until dropped.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, LabError> {
    fsutil::lock_exclusive(path).map_err(|source| LabError::WriteLabFile {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_names_and_addresses() {
        let cfg = LabConfig::new("t1", 3, PathBuf::from("/bin/true"));
        let f = plan(&cfg);
        assert_eq!(f.switch_netns, "t1-sw");
        assert_eq!(f.subnet, "10.78.0.0/24");
        let names: Vec<_> = f.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["host-a", "host-b", "host-c"]);
        assert_eq!(f.hosts[1].address, Ipv4Addr::new(10, 78, 0, 11));
        let n = container_net(&f).unwrap();
        assert_eq!(n.gateway, Some(Ipv4Addr::new(10, 78, 0, 1)));
        assert_eq!(n.first, Ipv4Addr::new(10, 78, 0, 100));
        assert_eq!(n.table, Path::new("/run/mig/lab/t1/addresses.json"));
        assert_eq!(
            n.reserved,
            [10, 11, 12].map(|h| Ipv4Addr::new(10, 78, 0, h)).to_vec()
        );
        assert_eq!(f.hosts[2].netns, "t1-host-c");
        assert_eq!(f.hosts[0].socket, Path::new("/run/mig/lab/t1/host-a.sock"));
        assert_eq!(
            f.hosts[0].state_dir,
            Path::new("/var/lib/mig-lab/t1/host-a")
        );
    }

    #[test]
    fn lab_file_paths() {
        assert_eq!(lab_file_path("mig"), Path::new("/run/mig/lab.json"));
        assert_eq!(lab_file_path("t9"), Path::new("/run/mig/lab-t9.json"));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("mig").is_ok());
        assert!(validate_name("t-123").is_ok());
        for bad in ["", "-x", "A", "a/b", "a b", "averyveryverylongname"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lab_file_round_trips() {
        let f = plan(&LabConfig::new("t2", 2, PathBuf::from("/usr/bin/migd")));
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["hosts"][1]["address"], "10.78.0.11");
        assert_eq!(json["hosts"][0]["agent_pid"], serde_json::Value::Null);
        let back: LabFile = serde_json::from_value(json).unwrap();
        assert_eq!(back, f);
    }
}
