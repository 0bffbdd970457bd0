//! Everything that travels between two agents during a migration.

use super::frame::{decode_payload, read_payload};
use super::{Version, WireError, MAX_CONTROL_FRAME, MAX_PATH_LEN};
use mig_runtime::image::Image;
use mig_runtime::pidmap::PidEntry;
use mig_runtime::spec::ContainerSpec;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

/// The first four bytes of every [`Hello`].
pub const MAGIC: [u8; 4] = *b"MIGW";

/// The protocol version this build speaks.
///
/// - 1.0: mig 0.1.0.
/// - 1.1: container records and journals carry a format version (format 2); newer features
///   are only used with a peer that announces at least the minor that brought them. File
///   streams may carry their digest after the bytes ([`DigestAt::Trailer`]).
/// - 1.2: before its first message the source may measure the link with probe streams
///   (`crate::transport::probe`) that the destination reads, discards and answers.
///   A 1.2 destination keeps presync files named `rounds/<n>/<file>` as pre-copy rounds and
///   links them for the restore (`mig move --mode precopy` is only sent to a 1.2 destination).
/// - 1.3: a 1.3 destination restores image sets whose network namespace was left out
///   (`--external net[..]:mig-netns`, a loopback-only container) into a fresh namespace with
///   `lo` up; the source dumps that way only for a 1.3 destination. Nothing new on the wire.
/// - 1.4: stream mode's memory presync (`crate::memsync`): tunnel services `MemoryPresync`
///   (the container's memory sent while it runs, kept by the destination) and
///   `PageServerDedup` (the dump's pages with those unchanged since replaced by markers,
///   written by mig's page writer). A source uses them only with a 1.4 destination.
/// - 1.5: the container's log in two parts; 1.6: the writable layer's delta may append
///   (docs/protocol.md).
/// - 1.7: [`Message::Locate`] as the first message of a connection: an agent about to restore a
///   `--net bridge` checkpoint asks its peers whether one of them holds the container live.
pub const PROTOCOL_VERSION: Version = Version { major: 1, minor: 8 };

/// The first frame each way on a control stream. Its first three fields (magic, major, minor) are
/// frozen for all versions so that any two versions can tell each other apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub protocol_version: Version,
    /// The agent's software version (`CARGO_PKG_VERSION` of the agent), informational.
    pub agent_version: String,
    /// The agent's name (host name in a lab), informational.
    pub agent_name: String,
}

/// The frozen prefix of a [`Hello`], decodable whatever follows it.
#[derive(Deserialize)]
struct HelloPrefix {
    magic: [u8; 4],
    protocol_version: Version,
}

impl Hello {
    /// Our hello.
    pub fn new(agent_version: &str, agent_name: &str) -> Hello {
        Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            agent_version: agent_version.to_string(),
            agent_name: agent_name.to_string(),
        }
    }

    /// Decodes a peer's hello payload: the magic and the major version are checked before the
    /// rest is decoded, so a peer of another major version gets [`WireError::VersionMismatch`]
    /// naming both versions even if its hello has another layout.
    pub fn decode(payload: &[u8]) -> Result<Hello, WireError> {
        let (prefix, _): (HelloPrefix, _) =
            postcard::take_from_bytes(payload).map_err(|source| WireError::Decode {
                what: "hello",
                source,
            })?;
        if prefix.magic != MAGIC {
            return Err(WireError::BadMagic {
                found: prefix.magic,
            });
        }
        if prefix.protocol_version.major != PROTOCOL_VERSION.major {
            // Best effort: the name is informational.
            let peer = postcard::take_from_bytes::<Hello>(payload)
                .map(|(h, _)| h.agent_name)
                .unwrap_or_default();
            return Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: prefix.protocol_version,
                peer,
            });
        }
        // Same major: later minors may append fields, which we ignore.
        let (hello, _) =
            postcard::take_from_bytes(payload).map_err(|source| WireError::Decode {
                what: "hello",
                source,
            })?;
        Ok(hello)
    }

    /// Reads a hello frame and checks it with [`Hello::decode`]. A clean end of stream is
    /// reported as [`WireError::Truncated`].
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Hello, WireError> {
        match read_payload(reader, MAX_CONTROL_FRAME).await? {
            Some(p) => Hello::decode(&p),
            None => Err(WireError::Truncated { got: 0, want: 4 }),
        }
    }
}

/// How the container's memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Everything (memory included) is dumped while frozen, sent, then restored.
    PreCopy,
    /// Post-copy: memory is served on demand from the source after the restore.
    PostCopy,
    /// Like `PreCopy`, but the pages go straight from the dump to the destination's
    /// `criu page-server` through a tunnel on the migration connection (no disk staging on the
    /// source); only the other images travel as files.
    Stream,
}

/// The migration's opening message: everything the destination needs to decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// Unique id of this migration (32 lowercase hex), the key of both journals.
    pub migration_id: String,
    pub spec: ContainerSpec,
    pub image: Image,
    /// The source's `criu --version` (the destination refuses an older CRIU).
    pub criu_version: String,
    /// The source's kernel release (`uname -r`).
    pub kernel: String,
    /// Expected bytes to transfer (layers, writable layer, image set), for the disk check.
    pub bytes_estimate: u64,
    pub mode: MigrationMode,
}

/// Why the destination refused a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The container id or name already exists on the destination.
    NameClash,
    /// Not enough disk space for `bytes_estimate`.
    DiskFull,
    /// CRIU on the destination is missing or older than the source's.
    CriuVersion,
    /// The kernel lacks something the container needs.
    Kernel,
    /// The spec or image failed validation.
    InvalidSpec,
    /// Another migration of the same container is in progress.
    Busy,
    /// The destination's policy refuses it (capacity, operator).
    Policy,
}

/// Why a migration was abandoned (before Commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// Freezing the container failed on the source.
    FreezeFailed,
    /// CRIU dump failed on the source.
    DumpFailed,
    /// Sending files failed on the source.
    SendFailed,
    /// A file arrived with a wrong size or digest, or could not be written.
    BadFile,
    /// Files were missing when the sender said it was done.
    TransferIncomplete,
    /// CRIU restore failed on the destination.
    RestoreFailed,
    /// Resuming the restored container failed on the destination (it was destroyed there).
    ResumeFailed,
    /// A phase took longer than its timeout.
    Timeout,
    /// The peer sent a message that is not valid in the current state.
    ProtocolViolation,
    /// Journaling the state failed.
    JournalFailed,
    /// An operator cancelled the migration.
    Cancelled,
}

/// Which transfer a [`Message::TransferDone`] closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// While the container runs: missing image layers and a first copy of the writable layer.
    Presync,
    /// While the container is frozen: the CRIU image set and the writable-layer delta.
    Final,
}

/// What a transferred file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    /// An image layer blob; `path` is its digest (`sha256:<hex>`).
    Layer,
    /// Part of the first copy of the writable layer.
    Presync,
    /// A file of the CRIU image set.
    Image,
    /// The writable-layer delta since the presync.
    Delta,
}

impl FileKind {
    /// The transfer phase this kind belongs to.
    pub fn phase(self) -> Phase {
        match self {
            FileKind::Layer | FileKind::Presync => Phase::Presync,
            FileKind::Image | FileKind::Delta => Phase::Final,
        }
    }
}

/// Sent at the start of every file stream, before exactly `size` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    pub kind: FileKind,
    /// Relative path (no `..`, not absolute); the destination decides where it goes.
    pub path: String,
    pub size: u64,
    /// SHA-256 of the bytes that follow ([`DigestAt::Header`]); all zero in a header whose
    /// digest follows the bytes ([`DigestAt::Trailer`]).
    pub sha256: [u8; 32],
}

/// Where a file stream carries its SHA-256.
///
/// - `Header` (1.0): in the [`FileHeader`]; the header frame's payload is exactly the header.
/// - `Trailer` (1.1): the header's `sha256` is all zero and its frame's payload ends with one
///   more byte, [`DIGEST_FOLLOWS`]; the digest is the 32 raw bytes right after the file's
///   `size` bytes, then the stream ends. The sender computes it while reading the file for
///   sending. Only sent to a peer that announced protocol 1.1 or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAt {
    Header,
    Trailer,
}

/// The byte after a [`FileHeader`] in its frame that says [`DigestAt::Trailer`].
pub const DIGEST_FOLLOWS: u8 = 1;

/// Length of the digest trailer of a [`DigestAt::Trailer`] file stream.
pub const TRAILER_LEN: usize = 32;

impl FileHeader {
    /// Encodes the header frame (length prefix included) of a file stream whose digest is
    /// at `at`. With [`DigestAt::Trailer`] the header's `sha256` is sent as zeros.
    pub fn encode_frame(&self, at: DigestAt) -> Result<Vec<u8>, WireError> {
        match at {
            DigestAt::Header => super::encode_frame(self, MAX_CONTROL_FRAME),
            DigestAt::Trailer => {
                let head = FileHeader {
                    sha256: [0; 32],
                    ..self.clone()
                };
                super::encode_frame(&(head, DIGEST_FOLLOWS), MAX_CONTROL_FRAME)
            }
        }
    }

    /// Decodes a header frame's payload of either form (see [`DigestAt`]): the header and
    /// where its digest is. A trailer-form header must carry a zero `sha256`.
    pub fn decode_payload(payload: &[u8]) -> Result<(FileHeader, DigestAt), WireError> {
        let what = std::any::type_name::<FileHeader>();
        let (header, rest): (FileHeader, &[u8]) = postcard::take_from_bytes(payload)
            .map_err(|source| WireError::Decode { what, source })?;
        match rest {
            [] => Ok((header, DigestAt::Header)),
            [DIGEST_FOLLOWS] if header.sha256 == [0; 32] => Ok((header, DigestAt::Trailer)),
            [DIGEST_FOLLOWS] => Err(WireError::BadTrailerHeader),
            _ => Err(WireError::TrailingBytes {
                what,
                extra: rest.len(),
            }),
        }
    }

    /// Reads a header frame of either form from a file stream. `Ok(None)` when the stream
    /// ended before its first byte.
    pub async fn read<R: AsyncRead + Unpin>(
        reader: &mut R,
    ) -> Result<Option<(FileHeader, DigestAt)>, WireError> {
        match read_payload(reader, MAX_CONTROL_FRAME).await? {
            Some(payload) => FileHeader::decode_payload(&payload).map(Some),
            None => Ok(None),
        }
    }

    /// Refuses paths that could escape the destination directory.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |why| {
            Err(WireError::BadPath {
                path: self.path.chars().take(200).collect(),
                why,
            })
        };
        if self.path.is_empty() {
            return bad("empty");
        }
        if self.path.len() > MAX_PATH_LEN {
            return bad("too long");
        }
        if self.path.starts_with('/') {
            return bad("absolute");
        }
        if self.path.contains('\0') {
            return bad("contains nul");
        }
        if self
            .path
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return bad("has an empty, . or .. component");
        }
        Ok(())
    }
}

/// The source's view of a migration when it asks for resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceView {
    /// Commit was sent (or about to be) and no answer came: the source holds a frozen copy.
    CommitSent,
    /// The source rolled back (its copy runs again).
    RolledBack,
    /// The source has no record of this migration.
    Unknown,
}

/// The destination's view of a migration when resolving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestView {
    /// Restored and stopped, Commit never received.
    AwaitingCommit,
    /// Commit received: the container runs on the destination.
    Committed,
    /// The destination cleaned up (or never restored).
    RolledBack,
    /// No record of this migration.
    Unknown,
}

/// The outcome the destination decided in a resolve exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    /// The container runs on the destination; the source must destroy its copy.
    Committed,
    /// The destination has no copy; the source must thaw its copy.
    RolledBack,
    /// The views contradict each other; both keep their copies for an operator.
    Undecided,
}

/// Control-stream messages after the hellos. New variants are only ever appended (minor bump).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Source to destination: start a migration.
    Prepare(Box<Prepare>),
    /// Destination: accepted; these layers (digests) must be sent.
    PrepareOk { missing_layers: Vec<String> },
    /// Destination: refused, nothing was changed.
    Refused {
        reason: RefuseReason,
        detail: String,
    },
    /// Source: all files of `phase` are on their streams.
    TransferDone {
        phase: Phase,
        files: u32,
        bytes: u64,
    },
    /// Destination: every file of `phase` arrived and verified.
    TransferOk { phase: Phase },
    /// Source: the container is frozen (downtime started). Informational.
    Frozen,
    /// Source: CRIU dump finished. Informational.
    DumpDone,
    /// Destination: restored (stopped, not yet running); the PID map of the restored processes.
    Restored { pid_map: Vec<PidEntry> },
    /// Source: the decision to move; the destination runs the container from now on.
    Commit,
    /// Destination: the container runs here.
    Committed,
    /// Either side: the migration is abandoned before Commit; both roll back.
    Abort { reason: AbortReason, detail: String },
    /// Source, on a new connection: resolve an in-doubt migration.
    Resolve {
        migration_id: String,
        source: SourceView,
    },
    /// Destination: its view and the outcome it applied.
    Resolved {
        migration_id: String,
        dest: DestView,
        outcome: Resolution,
    },
    /// Any agent, as the first message of a connection (1.7): does the peer hold this
    /// container live (running, frozen, moving, arriving, in doubt)?
    Locate { container_id: String },
    /// The answer to [`Message::Locate`]: the container's state there in words, or `None` when
    /// the peer holds no live copy. The connection ends after it.
    Located {
        container_id: String,
        held: Option<String>,
    },
}

impl Message {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Prepare(_) => "prepare",
            Message::PrepareOk { .. } => "prepare-ok",
            Message::Refused { .. } => "refused",
            Message::TransferDone { .. } => "transfer-done",
            Message::TransferOk { .. } => "transfer-ok",
            Message::Frozen => "frozen",
            Message::DumpDone => "dump-done",
            Message::Restored { .. } => "restored",
            Message::Commit => "commit",
            Message::Committed => "committed",
            Message::Abort { .. } => "abort",
            Message::Resolve { .. } => "resolve",
            Message::Resolved { .. } => "resolved",
            Message::Locate { .. } => "locate",
            Message::Located { .. } => "located",
        }
    }
}

/// Decodes a control message payload (used by tests and fuzzing).
pub fn decode_message(payload: &[u8]) -> Result<Message, WireError> {
    decode_payload(payload)
}
