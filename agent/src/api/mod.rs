//! The agent API: one versioned request/response protocol over the agent's unix socket.
//!
//! Every message is a frame ([`frame`]): a `u32` big-endian length followed by that many bytes of
//! JSON. A connection starts with a [`Hello`] in each direction (client first); then the client sends
//! [`Request`]s and reads one [`Response`] per request, except for `logs` with `follow`, which is
//! answered by any number of [`Response::LogData`] frames and a final [`Response::LogEnd`].
//! Requests are parsed strictly (`deny_unknown_fields`): an agent refuses what it does not know
//! instead of guessing. docs/api.md describes the protocol for other implementations.

pub mod frame;

pub use crate::daemon::events::{Event, EventKind};
pub use crate::migration::fixedcost::{FixedCost, FixedSource};
pub use crate::migration::memsync::MemoryPresyncReport;
pub use crate::migration::modes::{MoveMode, MoveOptions};
pub use crate::migration::precopy::PrecopyReport;
pub use crate::migration::probe::ProbeInfo;
pub use crate::migration::{IdentityInfo, MoveResult, PeerInfo};
pub use crate::remote::ClientInfo;
// What the client's calls take and return from mig-migrate: a remote client's identity, a
// checkpoint's CRIU figures.
pub use mig_migrate::criu::DumpStats;
pub use mig_migrate::transport::Identity;
// The types the API's own types hold, so that a client names them without depending on
// mig-runtime itself.
pub use mig_runtime::cgroup::Usage;
pub use mig_runtime::net::{NetMode, NetSpec};
pub use mig_runtime::pidmap::PidEntry;
pub use mig_runtime::spec::{IdMap, Limits};
use serde::{Deserialize, Serialize};

/// The highest protocol version this build speaks. Version 2 added `move_start`, `move_status`,
/// the host view's capacity fields and the container view's usage and limits. Version 3 added
/// the container state `frozen` (a copy held frozen while its move is in doubt); older clients
/// are served `running` there, as before ([`Response::for_version`]). Version 4 streams `exec`'s
/// output byte for byte ([`Response::ExecData`], [`Response::ExecEnd`]); older clients get one
/// [`Response::Exec`] as before.
pub const API_VERSION: u32 = 4;

/// The first version whose `exec` is answered with [`Response::ExecData`] frames.
pub const API_VERSION_EXEC_STREAM: u32 = 4;

/// The first version with [`ContainerState::Frozen`].
pub const API_VERSION_FROZEN: u32 = 3;

/// The oldest protocol version this build still speaks. Version 1 clients are served as they were:
/// v2 only added requests they do not send and response fields they ignore.
pub const API_VERSION_MIN: u32 = 1;

/// The agent's side of version negotiation: a client's hello carries the highest version it
/// speaks, and the connection speaks the highest version both know. `Err` names both sides'
/// versions when there is none (docs/api.md, "Versions").
pub fn negotiate(client_max: u32) -> Result<u32, ApiError> {
    let v = client_max.min(API_VERSION);
    if v < API_VERSION_MIN {
        return Err(ApiError::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "this agent speaks API versions {API_VERSION_MIN} to {API_VERSION}, the client at most {client_max}"
            ),
        ));
    }
    Ok(v)
}

/// The first frame in each direction. Fields it may gain are ignored by older readers (it was
/// strict: a field added by a newer agent would have kept every older client from connecting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub api_version: u32,
    /// Free-form software name and version of the sender, e.g. `mig 0.1.0`.
    pub software: String,
}

impl Hello {
    pub fn new(software: &str) -> Hello {
        Hello {
            api_version: API_VERSION,
            software: format!("{software} {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// An operator's outcome for an in-doubt move (`mig move --resolve --decide`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The container runs on the destination: the source's copy is removed, the destination's
    /// resumed.
    Committed,
    /// The container runs on the source: the destination's copy is removed, the source's
    /// thawed.
    RolledBack,
}

/// What a client asks the agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Moves a running container to a pinned peer agent (live migration, docs/migration.md).
    Move {
        container: String,
        peer: String,
        /// Keep established TCP connections (CRIU TCP repair, docs/networking.md). Without it a
        /// container with established connections is refused.
        #[serde(default)]
        tcp_established: bool,
        /// How memory moves (docs/migration.md, "Modes"); the agent's default when absent.
        #[serde(default)]
        mode: Option<crate::migration::MoveMode>,
        /// Refuse the move (or, with mode `auto`, go post-copy) when the predicted downtime
        /// exceeds this many milliseconds.
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Stream mode without the memory presync (docs/migration.md, "Memory presync"):
        /// every page goes while frozen (plain stop-and-copy). Absent means false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        no_memory_presync: bool,
    },
    /// Starts the same move as `Move` in the background and answers `MoveStarted` at once; its
    /// progress is in the event stream and in `MoveStatus` (API version 2).
    MoveStart {
        container: String,
        peer: String,
        #[serde(default)]
        tcp_established: bool,
        #[serde(default)]
        mode: Option<crate::migration::MoveMode>,
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        no_memory_presync: bool,
    },
    /// The state of a move started with `MoveStart` (API version 2).
    MoveStatus {
        id: String,
    },
    /// Subscribes to the agent's events: an `Ok`, then one `Event` frame per event until the
    /// client hangs up (docs/api.md).
    Events,
    /// Settles an in-doubt move of `container` with its destination (on the source agent).
    /// With `decide`, the operator's outcome is applied where the other host cannot answer
    /// (it is gone): on the source after trying the destination, on the destination at once.
    MoveResolve {
        container: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decide: Option<Decision>,
    },
    /// Pins a peer agent by its certificate fingerprint.
    PeerAdd {
        name: String,
        address: String,
        fingerprint: String,
    },
    PeerList,
    PeerRemove {
        name: String,
    },
    /// The agent's migration identity (fingerprint, QUIC address).
    Identity,
    /// Pins a remote API client by its certificate fingerprint (docs/api.md, "Remote API").
    ClientAdd {
        name: String,
        fingerprint: String,
    },
    ClientList,
    ClientRemove {
        name: String,
    },
    /// Imports the image at `path` (a path on the agent's host) under `name`.
    ImageImport {
        path: String,
        name: String,
    },
    ImageList,
    /// Removes an image by name, id or unique id prefix.
    ImageRemove {
        image: String,
    },
    /// Creates and starts a container.
    Run(RunRequest),
    /// Lists containers; only running ones unless `all`.
    List {
        all: bool,
    },
    Inspect {
        container: String,
    },
    /// The container's output; with `follow`, streamed until the container has exited.
    Logs {
        container: String,
        follow: bool,
    },
    /// Runs a command inside a running container and returns its exit code and output.
    Exec {
        container: String,
        args: Vec<String>,
        env: Vec<String>,
        /// `USER[:GROUP]` (names from the container's /etc/passwd and /etc/group, or numbers);
        /// the container's user when absent. Absent fields are not sent, so an older agent
        /// serves a request that does not use them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Absolute working directory inside the container; the container's when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workdir: Option<String>,
        /// The command's whole standard input, base64 on the wire (at most [`MAX_EXEC_STDIN`]
        /// bytes); `/dev/null` when absent.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "base64_bytes"
        )]
        stdin: Option<Vec<u8>>,
    },
    /// Sends SIGTERM to the container's init, then kills the container after `timeout_secs`.
    Stop {
        container: String,
        timeout_secs: u64,
    },
    /// Sends `signal` (a number) to the container's init.
    Kill {
        container: String,
        signal: i32,
    },
    /// Removes a container that is not running (or, with `force`, kills it first).
    Remove {
        container: String,
        force: bool,
    },
    /// Host information.
    Info,
    /// Dumps the running container with CRIU into its checkpoint directory; it ends unless
    /// `leave_running`.
    Checkpoint {
        container: String,
        leave_running: bool,
        /// Also write a portable archive (image set + writable layer) to this absolute path on
        /// the agent's host; zstd-compressed when it ends in `.zst`.
        export: Option<String>,
        /// Dump established TCP connections too (docs/networking.md); refused without it when the
        /// container has some.
        #[serde(default)]
        tcp_established: bool,
    },
    /// Restores a checkpointed container from its checkpoint directory, or (with `import`) a
    /// new container from an exported archive (absolute path on the agent's host), named `name`
    /// or as in the archive.
    Restore {
        container: Option<String>,
        import: Option<String>,
        name: Option<String>,
    },
}

/// The container to create, as `mig run` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Image name, id or unique id prefix.
    pub image: String,
    /// Container name; generated when absent.
    pub name: Option<String>,
    /// Hostname inside the container; the name (or short id) when absent.
    pub hostname: Option<String>,
    /// The command; the image's entrypoint and cmd when empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs added to the image's environment.
    pub env: Vec<String>,
    pub limits: Limits,
    /// Run in a user namespace (container root maps to an unprivileged host range).
    pub userns: bool,
    /// Run the OCI runtime bundle in this directory (absolute, on the agent's host): its rootfs
    /// becomes the image `bundle-<name>`, its config.json gives the process, hostname and limits
    /// (fields set here override it). Unsupported bundle fields are refused by name.
    #[serde(default)]
    pub bundle: Option<String>,
    /// `bridge`: a veth into the host's bridge with an address of the host's container subnet
    /// (docs/networking.md); absent: loopback only.
    #[serde(default)]
    pub net: Option<mig_runtime::net::NetMode>,
    /// The address to take (with `net`); the first free one of the pool when absent.
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// `USER[:GROUP]`: names are looked up in the image's /etc/passwd and /etc/group, numbers
    /// are taken as they are (a uid without a passwd entry gets gid 0); the image's user when
    /// absent. Absent fields are not sent, so an older agent serves a request without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Absolute working directory of the command; the image's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Replaces the image's entrypoint; the image's cmd is then dropped unless `args` are given
    /// (podman's `--entrypoint`). Empty clears the entrypoint and keeps the image's cmd when
    /// `args` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
}

/// The largest standard input `exec` takes (the client reads it whole before sending it).
pub const MAX_EXEC_STDIN: usize = 8 << 20;

/// What `exec` takes besides the container and the command (see [`Request::Exec`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// `KEY=VALUE` pairs added to the container's environment.
    pub env: Vec<String>,
    /// `USER[:GROUP]`; the container's user when `None`.
    pub user: Option<String>,
    /// Absolute working directory; the container's when `None`.
    pub workdir: Option<String>,
    /// The command's whole standard input; `/dev/null` when `None`.
    pub stdin: Option<Vec<u8>>,
}

/// Which output stream of an `exec` a [`Response::ExecData`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStream {
    Stdout,
    Stderr,
}

/// The whole output of an `exec`, byte for byte (what [`crate::client::Client::exec_bytes`]
/// returns).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's exit code (128+signal when killed).
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// `Vec<u8>` as a standard base64 string (the output of `exec`, API version 4).
mod base64_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::base64_bytes::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::base64_bytes::decode(&s)
            .ok_or_else(|| serde::de::Error::custom("data is not valid base64"))
    }
}

/// `Option<Vec<u8>>` as a standard base64 string (RFC 4648, with padding).
mod base64_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let s = s.as_bytes();
        if !s.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(s.len() / 4 * 3);
        for (i, quad) in s.chunks(4).enumerate() {
            let last = i + 1 == s.len() / 4;
            let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &quad[..4 - pad] {
                let v = ALPHABET.iter().position(|&a| a == c)? as u32;
                n = n << 6 | v;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => decode(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("stdin is not valid base64")),
        }
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Response {
    Image(ImageInfo),
    Images(Vec<ImageInfo>),
    Created {
        id: String,
        name: String,
    },
    Containers(Vec<ContainerSummary>),
    Container(Box<ContainerDetails>),
    /// A piece of the container's log (bytes decoded as UTF-8, invalid sequences replaced).
    LogData {
        data: String,
    },
    LogEnd,
    /// The whole result of `exec` (API versions 1 to 3): output decoded as UTF-8, at most
    /// 4 MiB per stream.
    Exec(ExecResult),
    /// A piece of `exec`'s output, byte for byte (API version 4): any number of these, in the
    /// order the agent read them, then one [`Response::ExecEnd`] (or an `Error`).
    ExecData {
        stream: ExecStream,
        /// Standard base64 on the wire; at most 64 KiB decoded.
        #[serde(with = "base64_vec")]
        data: Vec<u8>,
    },
    /// The end of `exec`'s output: the command's exit code (128+signal when killed).
    ExecEnd {
        code: i32,
    },
    Ok,
    Info(HostInfo),
    Checkpointed(Box<CheckpointResult>),
    Restored(Box<RestoreResult>),
    Moved(Box<crate::migration::MoveResult>),
    Peers(Vec<crate::migration::PeerInfo>),
    Peer(crate::migration::PeerInfo),
    Identity(crate::migration::IdentityInfo),
    Event(Box<Event>),
    Clients(Vec<crate::remote::ClientInfo>),
    Client(crate::remote::ClientInfo),
    /// The id of a move started with `MoveStart`.
    MoveStarted {
        id: String,
    },
    MoveStatus(Box<MoveStatus>),
    Error(ApiError),
}

impl Response {
    /// The response as a client of API `version` reads it: before [`API_VERSION_FROZEN`], a
    /// `frozen` container is reported `running` (what those versions said; `in_doubt`, a field
    /// they ignore, tells the truth).
    pub fn for_version(mut self, version: u32) -> Response {
        if version < API_VERSION_FROZEN {
            let old = |s: &mut ContainerState| {
                if *s == ContainerState::Frozen {
                    *s = ContainerState::Running;
                }
            };
            match &mut self {
                Response::Containers(list) => list.iter_mut().for_each(|c| old(&mut c.state)),
                Response::Container(d) => old(&mut d.state),
                // Counted as its containers are listed (QA of session 30, L4).
                Response::Info(info) => {
                    if let Some(n) = info.containers_by_state.remove("frozen") {
                        *info
                            .containers_by_state
                            .entry("running".into())
                            .or_insert(0) += n;
                    }
                }
                _ => {}
            }
        }
        self
    }
}

/// Where a move started with `MoveStart` is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveStatus {
    /// The id `MoveStart` returned.
    pub id: String,
    /// The migration's own id (journal, events), once the move has started.
    pub migration_id: Option<String>,
    pub container: String,
    pub peer: String,
    pub state: MoveState,
    /// The last phase the source entered (from the `migration_phase` events).
    pub phase: Option<String>,
    /// When `MoveStart` was answered, in milliseconds since the epoch.
    pub started_ms: u64,
    /// Milliseconds since `MoveStart`, or the whole move once it ended.
    pub elapsed_ms: u64,
    /// The move's report, once committed.
    pub result: Option<Box<crate::migration::MoveResult>>,
    /// Why it failed.
    pub error: Option<ApiError>,
}

/// The state of a [`MoveStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    Running,
    /// The container runs on the peer.
    Committed,
    /// The move failed; see `error` (the container runs where it was unless the error says the
    /// move is in doubt).
    Failed,
}

/// What a checkpoint did and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointResult {
    pub id: String,
    pub leave_running: bool,
    /// Freezing the cgroup (mig's own measure).
    pub freeze_ms: u64,
    /// `criu dump` wall time.
    pub dump_ms: u64,
    /// The whole checkpoint, including sealing the image set.
    pub total_ms: u64,
    /// Bytes in the image set (without logs).
    pub image_bytes: u64,
    /// The checkpoint directory on the agent's host.
    pub images_dir: String,
    /// PIDs at the dump.
    pub pid_map: Vec<PidEntry>,
    /// CRIU's own figures.
    pub criu: mig_migrate::criu::DumpStats,
    /// The archive written by `export`, and its size.
    pub exported: Option<String>,
    pub archive_bytes: Option<u64>,
}

/// What a restore did and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreResult {
    pub id: String,
    pub name: String,
    /// From the request to the restored init running (rootfs, cgroup, CRIU, shim).
    pub total_ms: u64,
    pub init_pid: i32,
    /// PIDs after the restore (the in-namespace PIDs are the dumped ones).
    pub pid_map: Vec<PidEntry>,
}

/// Why a request failed: a kind a program can act on and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The class of an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or a value is invalid.
    InvalidArgument,
    /// No such container or image.
    NotFound,
    /// A prefix or name matches more than one container.
    Ambiguous,
    /// The name is already used.
    AlreadyExists,
    /// The object is in the wrong state (e.g. removing a running container without force).
    Conflict,
    /// The peer speaks another API version.
    UnsupportedVersion,
    /// The feature is not available in this build or on this host.
    Unavailable,
    /// Anything else that went wrong on the agent.
    Internal,
    /// A kind this client does not know (a newer agent's): act on it as on `internal`; the
    /// message says what happened.
    #[serde(other)]
    Unknown,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// An image as the agent lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub layers: Vec<String>,
    pub created: u64,
    pub size: u64,
    /// Set when the image's record cannot be read (written by a newer mig, or damaged): the image
    /// is listed under the name of its file with its other fields empty, and cannot be used until
    /// a mig that reads it does. Absent otherwise (and from agents before it was added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<UnreadableRecord>,
}

/// Why a record is not read (see [`ImageInfo::unreadable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableRecord {
    /// The file, on the agent's host.
    pub path: String,
    /// The record's format version when it is newer than the agent reads; `None` when the record
    /// is damaged.
    pub format: Option<u64>,
    /// The newest format version the agent reads.
    pub supported_format: u32,
    /// The error, for people.
    pub message: String,
}

/// The lifecycle state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    /// Its directory exists; the shim has not reported yet.
    Created,
    Running,
    /// Ended after `mig stop` or `mig kill`.
    Stopped,
    /// Its init exited on its own.
    Exited,
    /// Dumped by CRIU and not running here.
    Checkpointed,
    /// Being restored from a checkpoint.
    Restoring,
    /// Could not be started (see `reason`).
    Failed,
    /// Its processes exist here but are frozen: its cgroup is frozen (a move away in its final
    /// phase, `moving` says where to; a checkpoint being dumped), or its migration is in doubt
    /// (`in_doubt` says which; settled by `mig move --resolve` or the source's resolver). Reported
    /// only (never recorded on disk), from API version 3; older clients see `running`.
    Frozen,
}

impl ContainerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Stopped => "stopped",
            ContainerState::Exited => "exited",
            ContainerState::Checkpointed => "checkpointed",
            ContainerState::Restoring => "restoring",
            ContainerState::Failed => "failed",
            ContainerState::Frozen => "frozen",
        }
    }

    /// Whether processes of the container may exist on this host.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            ContainerState::Created
                | ContainerState::Running
                | ContainerState::Restoring
                | ContainerState::Frozen
        )
    }
}

/// One line of `mig ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub state: ContainerState,
    pub image: String,
    pub host: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub exit_code: Option<i32>,
    pub command: Vec<String>,
    /// The limits the container was created with.
    #[serde(default)]
    pub limits: Limits,
    /// Live usage from the cgroup (memory, CPU time, processes); running containers only.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Set while a migration of the container is in doubt on this host (the link was lost at
    /// Commit): this copy is frozen (`state` is `frozen`; `running` for clients of API version 1
    /// and 2) until the move is settled (`mig move --resolve`, or the source's resolver). `null`
    /// otherwise.
    #[serde(default)]
    pub in_doubt: Option<InDoubt>,
    /// Set while this host moves the container away (source side, from Prepare until the move
    /// ends); `state` is `frozen` while its cgroup is frozen (from Freeze to Commit). `null`
    /// otherwise.
    #[serde(default)]
    pub moving: Option<Moving>,
    /// Set while the container runs on this host but its memory is still arriving: a lazy-pages
    /// daemon copies the rest in after a post-copy move (from the source), or after a stream
    /// move's restore (from this host's disk). Until it has all arrived the container cannot be
    /// moved or checkpointed (`mig drain` waits for it). False from older agents.
    #[serde(default)]
    pub memory_arriving: bool,
    /// Set while a move brings the container to this host (destination side, from its restore
    /// until the move ends): it is `restoring`, then `frozen` until the Commit. `null` otherwise
    /// and from older agents.
    #[serde(default)]
    pub arriving: Option<Arriving>,
    /// Why the container ended, when known and it is not live (as `mig inspect` gives it: an
    /// OOM kill, a post-copy that lost its source, a failed restore); `null` otherwise and from
    /// older agents.
    #[serde(default)]
    pub reason: Option<String>,
    /// The peer this container also runs on: a move rolled back here was committed there (an
    /// operator decided each side its own way, or this source rolled back by itself after its
    /// destination could not be asked); one copy must be removed. Cleared once the peer no
    /// longer holds it or the copy here is removed. `null` otherwise and from older agents.
    #[serde(default)]
    pub also_running_on: Option<String>,
    /// Established TCP connections in the running container's network namespace: a move or
    /// checkpoint refuses the container without `--tcp-established` when there is one (`mig
    /// rebalance` leaves such containers out unless given it). `null` when not running, when
    /// it cannot be read, and from older agents.
    #[serde(default)]
    pub tcp_established: Option<u32>,
}

/// A move of the container to this host, in progress (see [`ContainerSummary::arriving`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arriving {
    pub migration_id: String,
    /// The source's peer name.
    pub peer: String,
}

/// A move of the container away from this host, in progress (see [`ContainerSummary::moving`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moving {
    pub migration_id: String,
    /// The destination's peer name.
    pub peer: String,
    /// Where the move is, from its journal: `preparing` (running, before the freeze), `frozen`
    /// (frozen, dumped and sent), `commit_sent`, or `committed` (the destination runs it; this
    /// copy is being ended). From the freeze on the container's state is `frozen`.
    pub stage: String,
}

/// A migration in doubt on this host (see [`ContainerSummary::in_doubt`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InDoubt {
    pub migration_id: String,
    /// This host's side of the move: `source` or `destination`.
    pub role: String,
    /// The other host (source: the destination's peer name; destination: the source's name).
    pub peer: String,
}

/// Everything `mig inspect` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerDetails {
    pub id: String,
    pub name: String,
    pub state: ContainerState,
    /// The agent's name.
    pub host: String,
    pub image: ImageSummary,
    pub hostname: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub userns: bool,
    /// The user namespace's map (container ids `0..size` are host ids `host_id..`), with
    /// `userns`; absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_map: Option<mig_runtime::spec::IdMap>,
    /// The command's user and group ids and working directory inside the container; absent
    /// from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<ProcessUser>,
    pub limits: Limits,
    /// Seconds since the epoch.
    pub created: u64,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub exit_code: Option<i32>,
    /// The signal that ended the init, when it was killed.
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// Why the container failed or ended, when known.
    pub reason: Option<String>,
    pub init_pid: Option<i32>,
    pub shim_pid: Option<i32>,
    /// Live usage from the cgroup (running containers only).
    pub usage: Option<Usage>,
    /// Every process of the container: PID inside, PID on the host, command line.
    pub pid_map: Vec<PidEntry>,
    /// The cgroup name under each hierarchy root.
    pub cgroup: String,
    /// Set while a migration of the container is in doubt on this host, as in
    /// [`ContainerSummary::in_doubt`] (`state` is then `frozen`).
    #[serde(default)]
    pub in_doubt: Option<InDoubt>,
    /// Set while this host moves the container away, as in [`ContainerSummary::moving`].
    #[serde(default)]
    pub moving: Option<Moving>,
    /// Set while a move brings the container here, as in [`ContainerSummary::arriving`].
    #[serde(default)]
    pub arriving: Option<Arriving>,
    /// As in [`ContainerSummary::memory_arriving`].
    #[serde(default)]
    pub memory_arriving: bool,
    /// As in [`ContainerSummary::also_running_on`].
    #[serde(default)]
    pub also_running_on: Option<String>,
    /// The container's network (`mig run --net bridge`): address, prefix, gateway, MAC, bridge;
    /// null for a loopback-only container. (A `--net bridge` user had to read `/etc/hosts`
    /// inside the container to learn its address.)
    #[serde(default)]
    pub net: Option<mig_runtime::net::NetSpec>,
}

/// Whom a container's command runs as, inside the container ([`ContainerDetails::user`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// The working directory (absolute).
    pub cwd: String,
}

/// The image of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub name: String,
    pub id: String,
}

/// The result of `exec` as API versions 1 to 3 get it (and as [`crate::client::Client::exec`]
/// returns it): each stream decoded as UTF-8 with invalid sequences replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The command's exit code (128+signal when killed).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// Set when the agent cut the output (API versions before 4: at most 4 MiB per stream, and
    /// the frame's 16 MiB); `stderr` then ends with a line saying so. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The host an agent runs on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The agent's name (`--name`, the hostname by default).
    pub name: String,
    /// The agent's version.
    pub version: String,
    pub api_version: u32,
    /// `criu --version`, or `None` when CRIU is missing.
    pub criu_version: Option<String>,
    pub kernel: String,
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    pub state_dir: String,
    pub cgroup_parent: String,
    /// Live containers: running, and frozen (in a move, in doubt), as `containers_by_state`
    /// counts them apart.
    pub containers_running: u32,
    pub containers_total: u32,
    /// The oldest API version this agent still serves (see [`API_VERSION_MIN`]).
    #[serde(default)]
    pub api_version_min: u32,
    /// The migration protocol version this agent speaks with its peers (docs/protocol.md),
    /// e.g. `1.4`; empty from an agent that does not say.
    #[serde(default)]
    pub protocol_version: String,
    /// CRIU features checked with `criu check --feature` (those that pass), e.g. `uffd-noncoop`
    /// (post-copy) and `mem_dirty_track` (iterative pre-dump).
    #[serde(default)]
    pub criu_features: Vec<String>,
    /// The same as `memory_bytes`, named for rebalancers.
    #[serde(default)]
    pub memory_total_bytes: u64,
    /// MemTotal minus MemAvailable from /proc/meminfo.
    #[serde(default)]
    pub memory_used_bytes: u64,
    /// MemAvailable from /proc/meminfo.
    #[serde(default)]
    pub memory_free_bytes: u64,
    /// The sum of the running containers' cgroup memory usage.
    #[serde(default)]
    pub containers_memory_bytes: u64,
    /// The sum of the running containers' CPU time, in microseconds.
    #[serde(default)]
    pub containers_cpu_usec: u64,
    /// Containers by state (`running`, `exited`, ...).
    #[serde(default)]
    pub containers_by_state: std::collections::BTreeMap<String, u32>,
    /// 1-minute load average.
    #[serde(default)]
    pub load_avg_1m: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_refuse_unknown_fields() {
        let r = Request::Stop {
            container: "web".into(),
            timeout_secs: 3,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"op":"stop","container":"web","timeout_secs":3}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"stop","container":"web","timeout_secs":3,"x":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
        let run = Request::Run(RunRequest {
            image: "busybox".into(),
            args: vec!["sh".into()],
            ..RunRequest::default()
        });
        let j = serde_json::to_string(&run).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), run);
        let info = serde_json::to_string(&Request::Info).unwrap();
        assert_eq!(info, r#"{"op":"info"}"#);
    }

    /// What a newer agent may add is read, not refused: fields of the hello and of an error,
    /// an error kind and an event type this client does not know (QA: each failed to decode,
    /// the hello's would have kept every older client from connecting).
    #[test]
    fn what_a_newer_agent_adds_is_read() {
        let h: Hello =
            serde_json::from_str(r#"{"api_version":5,"software":"mig 9.0","features":["x"]}"#)
                .unwrap();
        assert_eq!(h.api_version, 5);
        let r: Response = serde_json::from_str(
            r#"{"kind":"error","body":{"kind":"quota_exceeded","message":"too many","retry_after":3}}"#,
        )
        .unwrap();
        let Response::Error(e) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Unknown, "too many")
        );
        let ev: crate::daemon::events::Event = serde_json::from_str(
            r#"{"seq":1,"time_ms":2,"host":"h","type":"container_paused","id":"x","why":"y"}"#,
        )
        .unwrap();
        assert_eq!(ev.kind, crate::daemon::events::EventKind::Unknown);
    }

    /// `frozen` is what a client of version 3 reads; older ones read `running`, as before.
    #[test]
    fn frozen_is_running_for_older_clients() {
        let c = ContainerSummary {
            id: "0".repeat(32),
            name: "web".into(),
            state: ContainerState::Frozen,
            image: "busybox".into(),
            host: "host-a".into(),
            created: 1,
            exit_code: None,
            command: vec!["sh".into()],
            limits: Limits::default(),
            usage: None,
            memory_arriving: false,
            in_doubt: Some(InDoubt {
                migration_id: "m".into(),
                role: "source".into(),
                peer: "host-b".into(),
            }),
            moving: None,
            arriving: None,
            reason: None,
            also_running_on: None,
            tcp_established: None,
        };
        let r = Response::Containers(vec![c]);
        let state = |r: Response| match r {
            Response::Containers(l) => l[0].state,
            _ => unreachable!(),
        };
        assert_eq!(state(r.clone().for_version(3)), ContainerState::Frozen);
        assert_eq!(state(r.clone().for_version(2)), ContainerState::Running);
        let j = serde_json::to_value(r.for_version(API_VERSION)).unwrap();
        assert_eq!(j["body"][0]["state"], "frozen");
        assert_eq!(j["body"][0]["in_doubt"]["peer"], "host-b");
        // `info`'s counts by state likewise.
        let info = Response::Info(HostInfo {
            containers_by_state: [("frozen".to_owned(), 1), ("running".to_owned(), 2)].into(),
            ..HostInfo::default()
        });
        let by_state = |r: Response| match r {
            Response::Info(i) => i.containers_by_state,
            _ => unreachable!(),
        };
        assert_eq!(
            by_state(info.clone().for_version(2)),
            [("running".to_owned(), 3)].into()
        );
        assert_eq!(by_state(info.for_version(3)).len(), 2);
    }

    /// The fields `run` and `exec` gained are optional: absent ones are not sent (an older
    /// agent refuses fields it does not know) and a request without them parses.
    #[test]
    fn new_run_and_exec_fields_are_optional() {
        let j = serde_json::to_value(Request::Run(RunRequest::default())).unwrap();
        for k in ["user", "workdir", "entrypoint"] {
            assert!(j.get(k).is_none(), "{j}");
        }
        let old = r#"{"op":"exec","container":"c","args":["id"],"env":[]}"#;
        let r: Request = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
        let r = Request::Exec {
            container: "c".into(),
            args: vec!["cat".into()],
            env: vec![],
            user: Some("nobody".into()),
            workdir: Some("/tmp".into()),
            stdin: Some(b"hi\n".to_vec()),
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["stdin"], "aGkK");
        assert_eq!(serde_json::from_value::<Request>(j).unwrap(), r);
        let bad = r#"{"op":"exec","container":"c","args":["id"],"env":[],"stdin":"a"}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err());
    }

    #[test]
    fn base64_round_trips() {
        use base64_bytes::{decode, encode};
        for (plain, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain), enc);
            assert_eq!(decode(enc).unwrap(), plain);
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)).unwrap(), all);
        for bad in ["Zg=", "Z===", "Zg==Zm9v", "Zm9*", "===="] {
            assert!(decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let e = Response::Error(ApiError::new(ErrorKind::NotFound, "no such container: x"));
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&j).unwrap(), e);
        let ok = serde_json::to_string(&Response::Ok).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&ok).unwrap(), Response::Ok);
    }
}
