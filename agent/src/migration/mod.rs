//! Live migration in the agent: `mig move ID PEER` (the source side, [`source`]), the QUIC
//! endpoint that accepts incoming migrations (the destination side, [`dest`]), the journal both
//! sides keep on disk ([`journal`]), recovery at start, pinned peers and fault hooks for tests
//! ([`fault`]). The protocol itself (state machines, wire format, file streams) is in
//! `mig_migrate::{protocol, wire, transport}`; this module implements its `SourceHost` and
//! `DestHost` with the agent's containers, images, cgroups and shim. docs/migration.md describes
//! the phases and the guarantees.

pub(crate) mod dest;
pub mod fault;
pub mod fixedcost;
pub(crate) mod journal;
mod locate;
pub mod memsync;
pub mod modes;
pub(crate) mod pages;
mod peers;
pub(crate) mod postcopy;
pub mod precopy;
pub mod probe;
mod pstree;
mod recover;
pub use pages::stop_arriving_postcopies;
pub use recover::settle_sources;
pub(crate) use recover::waiting as waiting_for_destination;
pub(crate) use recover::{also_runs_on, also_runs_on_peer};
mod source;
pub(crate) use postcopy::memory_arriving;
pub(crate) use source::{ending, frozen_for_move, mark_frozen};

pub use journal::{JournalEntry, JOURNAL_DIR};

/// CRIU's `--ghost-limit` for every dump (`mig checkpoint`, a move, a pre-copy round): the
/// largest deleted file still open or mapped that a dump copies into the images. CRIU's default,
/// 1 MiB, failed the dump of a process running a binary or library deleted since it started (an
/// upgrade inside the container: "Can't dump ghost file /tmp/py of 6832128 size, increase
/// limit"). Such files travel with the images (and count against the destination's disk).
pub(crate) const GHOST_LIMIT: &str = "1G";

/// What a CRIU failure users meet means, when CRIU's own words do not make it plain (`text`:
/// the error with CRIU's error lines).
pub(crate) fn criu_failure_hint(text: &str) -> Option<&'static str> {
    if text.contains("fsnotify") && text.contains("Can't dump that handle") {
        return Some(
            "a process watches a path of the container's overlay root filesystem with inotify or \
             fanotify: CRIU cannot dump such a watch, the overlay gives no file handle it can \
             open; watch a path on a tmpfs such as /dev/shm, docs/migration.md \"Limitations\"",
        );
    }
    if text.contains("Can't lookup mount=") && text.contains("path=/secretmem") {
        return Some(
            "a process holds a memfd_secret area: its memory is hidden from the kernel itself, \
             so CRIU cannot dump it; such a container cannot be checkpointed or moved, \
             docs/migration.md \"Limitations\"",
        );
    }
    if text.contains("Can't lookup mount=") {
        return Some(
            "a process holds a file of a mount the container does not show, such as a POSIX \
             message queue (mq_open): CRIU cannot dump POSIX message queues, docs/migration.md \
             \"Limitations\"",
        );
    }
    if text.contains("session leader") && text.contains("outside of its pid namespace") {
        return Some(
            "a process in the container belongs to a session that began outside it: one that \
             `mig exec` left in the background before mig gave each exec a session of its own; \
             end that process (or restart the container) and try again",
        );
    }
    None
}

#[cfg(test)]
mod hint_tests {
    /// CRIU's words for two failures users meet get a sentence saying what they mean.
    #[test]
    fn criu_failures_users_meet_are_explained() {
        let mq = "Error (criu/files-reg.c:1790): Can't lookup mount=80 for fd=3 path=/qa";
        assert!(super::criu_failure_hint(mq).is_some_and(|h| h.contains("POSIX message queue")));
        let secret =
            "Error (criu/files-reg.c:1790): Can't lookup mount=111 for fd=3 path=/secretmem (deleted)";
        assert!(super::criu_failure_hint(secret).is_some_and(|h| h.contains("memfd_secret")));
        let session = "Error (criu/cr-dump.c:1613): A session leader of 21279(3) is outside of its pid namespace";
        assert!(super::criu_failure_hint(session).is_some_and(|h| h.contains("mig exec")));
        let watch = "Error (criu/fsnotify.c:284): fsnotify: \tCan't dump that handle";
        assert!(super::criu_failure_hint(watch).is_some_and(|h| h.contains("inotify")));
        assert_eq!(
            super::criu_failure_hint("Error (criu/cr-dump.c:1975): Dumping FAILED."),
            None
        );
    }
}

/// Gives `criu` its kerndat cache where `/run` is not a tmpfs, or makes it again when another
/// CRIU build deleted it or it was made for another binary (`mig_migrate::criu::kdat`);
/// without it every CRIU run of a move probes the kernel again while the container is down.
/// Blocking: a few microseconds when the cache is in place, about 100 ms to make it. Called
/// at the agent's start and before each freeze and restore; failures are logged, never fatal.
pub fn criu_kdat(criu: &mig_migrate::criu::Criu) {
    use mig_migrate::criu::kdat::{self, KdatOutcome};
    match kdat::ensure(criu) {
        Ok(KdatOutcome::Written { bytes, check_ms }) => tracing::info!(
            bytes,
            check_ms,
            file = %std::path::Path::new(kdat::KDAT_DIR).join(kdat::KDAT_NAME).display(),
            "criu's kerndat cache written (/run is not a tmpfs)"
        ),
        Ok(outcome) => tracing::debug!(?outcome, "criu's kerndat cache"),
        Err(e) => tracing::warn!(
            error = %chain(&e),
            "cannot prepare criu's kerndat cache; every criu run probes the kernel again"
        ),
    }
}

/// The CRIU arguments every dump of mig adds to its options ([`GHOST_LIMIT`]).
pub(crate) fn dump_extra_args() -> Vec<String> {
    vec!["--ghost-limit".into(), GHOST_LIMIT.into()]
}
pub use modes::MoveMode;

use crate::daemon::Agent;
use mig_migrate::transport::{AllowedPeers, Identity, PeerStore};
use mig_migrate::wire::Hello;
use mig_runtime::pidmap::PidEntry;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

/// The default QUIC port (the lab's too).
pub const DEFAULT_PORT: u16 = crate::lab::DEFAULT_QUIC_PORT;

/// What `mig move` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveResult {
    pub id: String,
    pub name: String,
    pub migration_id: String,
    /// The peer the container moved to.
    pub peer: String,
    /// `cold`: everything is dumped while frozen, sent as files, then restored; `stream`: the
    /// same with the pages streamed from the dump to the destination's page server; `lazy`:
    /// post-copy, memory served on demand by the source after the restore (see `postcopy_ms`).
    pub mode: String,
    /// From the freeze to the destination's Committed.
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub presync_ms: u64,
    pub freeze_ms: u64,
    pub dump_ms: u64,
    pub transfer_ms: u64,
    /// From the end of the transfer to Restored (verifying, placing, CRIU restore).
    pub restore_ms: u64,
    pub bytes_sent: u64,
    pub files_sent: u32,
    /// The container's processes on the source, read while frozen (what was dumped).
    pub pid_map_before: Vec<PidEntry>,
    /// The restored processes on the destination.
    pub pid_map: Vec<PidEntry>,
    /// Set when the source could not destroy its frozen copy (it stays frozen).
    pub cleanup_error: Option<String>,
    /// Size of the writable layer's tar sent while the container ran (presync).
    #[serde(default)]
    pub presync_upper_bytes: u64,
    /// Size of what changed in the writable layer since the presync, sent while frozen.
    #[serde(default)]
    pub delta_bytes: u64,
    /// Size of the container's log sent while the container ran (a destination speaking
    /// protocol 1.5), else 0.
    #[serde(default)]
    pub presync_log_bytes: u64,
    /// Size of the container's log sent while frozen: what it gained since the presync copy,
    /// or all of it (a destination before 1.5).
    #[serde(default)]
    pub delta_log_bytes: u64,
    /// The pre-flight's prediction of `downtime_ms` for the mode used.
    #[serde(default)]
    pub predicted_downtime_ms: Option<u64>,
    /// Link throughput the prediction used, bytes/s.
    #[serde(default)]
    pub throughput_bytes_s: Option<u64>,
    /// Where `throughput_bytes_s` came from: `probe` (this move's link probe, see `probe`),
    /// `previous` (an earlier move to the same peer) or `default` (nothing measured yet).
    #[serde(default)]
    pub throughput_source: Option<String>,
    /// This move's link probe (a destination speaking protocol 1.2), else null.
    #[serde(default)]
    pub probe: Option<probe::ProbeInfo>,
    /// The fixed part of `predicted_downtime_ms` (freeze, CRIU's start, the non-memory images,
    /// the restore without memory) and where it came from: `measured` (the median of this
    /// agent's last moves of the mode to the peer, `moves` of them) or `default` (none yet).
    #[serde(default)]
    pub fixed_cost: Option<fixedcost::FixedCost>,
    /// Bytes of memory pages that went through the page-server tunnel (`stream`, `lazy`);
    /// included in `bytes_sent`.
    #[serde(default)]
    pub page_bytes: u64,
    /// `lazy`: from Commit until the destination had the last page. Until then the container
    /// on the destination depended on this source.
    #[serde(default)]
    pub postcopy_ms: Option<u64>,
    /// `lazy`: why serving pages ended before the last one (the destination kills the
    /// container then, and reports it).
    #[serde(default)]
    pub postcopy_error: Option<String>,
    /// `lazy`: the bytes of memory left to send after the resume. `page_bytes` below it with
    /// no `postcopy_error`: the copy there stopped asking for pages before the last one (it
    /// ended, was removed, or freed that memory), not every page arrived.
    #[serde(default)]
    pub lazy_bytes: Option<u64>,
    /// Inside `dump_ms`: the `criu dump` command alone.
    #[serde(default)]
    pub criu_dump_ms: Option<u64>,
    /// Inside `dump_ms`: hashing the image set and writing its manifest.
    #[serde(default)]
    pub seal_ms: Option<u64>,
    /// `precopy`: the rounds made while the container ran and why they stopped.
    #[serde(default)]
    pub precopy: Option<precopy::PrecopyReport>,
    /// `stream` to a destination speaking protocol 1.4: the memory sent while the container
    /// ran, and how much of it the dump found unchanged (those pages did not travel while
    /// frozen).
    #[serde(default)]
    pub memory_presync: Option<memsync::MemoryPresyncReport>,
}

/// One pinned peer, as `mig peers ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub address: String,
    pub fingerprint: String,
}

/// The agent's migration identity, as `mig info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub name: String,
    pub fingerprint: String,
    /// The QUIC endpoint's local address.
    pub listen: Option<String>,
}

/// Why the migration service could not start.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot load or create the identity under {dir}")]
    Identity {
        dir: std::path::PathBuf,
        #[source]
        source: mig_migrate::transport::IdentityError,
    },
    #[error("cannot open the peer store")]
    Peers(#[source] mig_migrate::transport::PeerError),
    #[error("cannot open the QUIC endpoint on {addr}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: Box<mig_migrate::transport::TlsError>,
    },
    #[error("the migration service is already started")]
    AlreadyStarted,
}

/// The agent's QUIC side, set once by [`start`].
pub(crate) struct Net {
    pub endpoint: quinn::Endpoint,
    pub identity: Identity,
    pub allowed: AllowedPeers,
    pub peers: Mutex<PeerStore>,
    pub listen: Option<SocketAddr>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("fingerprint", &self.identity.fingerprint())
            .field("listen", &self.listen)
            .finish()
    }
}

/// Migration state held by the [`Agent`].
#[derive(Debug, Default)]
pub struct Migrations {
    pub(crate) net: OnceLock<Net>,
    /// Moves from this agent in progress (bounded by `limits.max_outgoing_moves`).
    pub(crate) outgoing: std::sync::atomic::AtomicU32,
}

/// One outgoing move counted in [`Migrations::outgoing`] until dropped.
pub(crate) struct OutgoingSlot<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for OutgoingSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Migrations {
    pub(crate) fn net(&self) -> Option<&Net> {
        self.net.get()
    }

    /// Outgoing moves under way, from their checks (before anything is journaled or frozen) to
    /// their answer.
    pub(crate) fn outgoing(&self) -> usize {
        self.outgoing.load(std::sync::atomic::Ordering::SeqCst) as usize
    }

    /// Counts one more outgoing move, or says how many run when `limit` is reached.
    pub(crate) fn outgoing_slot(&self, limit: Option<u32>) -> Result<OutgoingSlot<'_>, u32> {
        use std::sync::atomic::Ordering;
        let now = self.outgoing.fetch_add(1, Ordering::SeqCst);
        let slot = OutgoingSlot(&self.outgoing);
        match limit {
            Some(max) if now >= max => Err(now),
            _ => Ok(slot),
        }
    }
}

/// Our hello on migration connections.
///
/// `MIG_WIRE_VERSION=MAJOR.MINOR` in migd's environment makes it announce another protocol
/// version: the upgrade tests use it to play an older or newer peer (docs/operations.md).
pub(crate) fn hello(agent: &Agent) -> Hello {
    let mut h = Hello::new(env!("CARGO_PKG_VERSION"), &agent.cfg.name);
    if let Some(v) = wire_version_override() {
        h.protocol_version = v;
    }
    h
}

/// The protocol version from `MIG_WIRE_VERSION`, when set and well-formed.
fn wire_version_override() -> Option<mig_migrate::wire::Version> {
    let raw = std::env::var("MIG_WIRE_VERSION").ok()?;
    let parsed = raw.split_once('.').and_then(|(a, b)| {
        Some(mig_migrate::wire::Version {
            major: a.trim().parse().ok()?,
            minor: b.trim().parse().ok()?,
        })
    });
    if parsed.is_none() {
        tracing::warn!(value = %raw, "ignoring MIG_WIRE_VERSION: want MAJOR.MINOR");
    }
    parsed
}

/// Starts the migration service: loads (or creates) the identity under `<state-dir>/identity`,
/// the pinned peers from `<state-dir>/peers.json`, opens the QUIC endpoint on `listen` (an
/// ephemeral port for outgoing moves only when `None`), accepts incoming migrations, and
/// recovers journaled migrations (see [`recover`]). Must run inside the tokio runtime.
pub fn start(agent: &Arc<Agent>, listen: Option<SocketAddr>) -> Result<(), MigrationError> {
    let dir = agent.cfg.state_dir.clone();
    let identity = Identity::load_or_create(&dir, &agent.cfg.name).map_err(|source| {
        MigrationError::Identity {
            dir: dir.clone(),
            source,
        }
    })?;
    let store = PeerStore::open(&dir).map_err(MigrationError::Peers)?;
    let allowed = AllowedPeers::new(store.fingerprints());
    let addr = listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let endpoint =
        mig_migrate::transport::endpoint(addr, &identity, allowed.clone()).map_err(|source| {
            MigrationError::Endpoint {
                addr,
                source: Box::new(source),
            }
        })?;
    let bound = endpoint.local_addr().ok();
    let net = Net {
        endpoint: endpoint.clone(),
        identity,
        allowed,
        peers: Mutex::new(store),
        listen: listen.and(bound),
    };
    tracing::info!(fingerprint = %net.identity.fingerprint(), listen = ?net.listen, "migration endpoint ready");
    agent
        .migration
        .net
        .set(net)
        .map_err(|_| MigrationError::AlreadyStarted)?;
    // Before the journal's recovery, which may remove an incoming container's directory, and
    // before any peer is heard: a Resolve answered before a post-copy's dead copy here is
    // recorded as such would be told `Committed` (review of session 31, M2).
    postcopy::recover_postcopy(agent);
    dest::spawn_acceptor(agent.clone(), endpoint);
    recover::recover(agent);
    Ok(())
}

/// Waits, at most `limit`, until no move of this agent is under way: none between its start and
/// its end on either side (its journal not final and not in doubt, which waits for a peer for
/// however long), none frozen for a move away, no post-copy still serving its pages. A stopped
/// agent used to leave such a container frozen until it was started again, or lose a post-copy's
/// container (QA of session 21). `status` hears how many there are, once a second.
pub async fn wait_for_moves(
    agent: &Arc<Agent>,
    limit: std::time::Duration,
    status: impl Fn(usize),
) {
    let t0 = std::time::Instant::now();
    let mut told = None;
    loop {
        let journals = journal::list(&agent.cfg.state_dir).unwrap_or_default();
        let unfinished = |role| {
            journals
                .iter()
                .filter(|e| {
                    e.role == role
                        && !journal::is_final(&e.state)
                        && !matches!(e.state, mig_migrate::protocol::JournalState::InDoubt)
                })
                .count()
        };
        use mig_migrate::protocol::Role;
        // Each outgoing move shows in one or more of: its journal entry, its frozen or ending
        // mark, its slot (a move still in its pre-flight has only the slot: CI saw a SIGTERM end
        // the agent, and the move's answer with it, then).
        // A restarted source's copy that waits for its destination's answer is no move under
        // way: left frozen, it is asked about again at the next start.
        // A source's copy frozen in doubt is no move under way either (docs/migration.md, "In
        // doubt"; QA of session 30, F4: a stopping agent waited 5 minutes for a post-copy in
        // doubt while its link was down, its API closed).
        let in_doubt: Vec<&str> = journals
            .iter()
            .filter(|e| {
                e.role == Role::Source
                    && matches!(e.state, mig_migrate::protocol::JournalState::InDoubt)
            })
            .map(|e| e.container_id.as_str())
            .collect();
        let under_way = unfinished(Role::Dest)
            + postcopy::filling_count()
            + unfinished(Role::Source)
                .saturating_sub(recover::waiting_count())
                .max(source::moving_away(&in_doubt))
                .max(agent.migration.outgoing());
        if under_way == 0 {
            return;
        }
        if t0.elapsed() >= limit {
            tracing::warn!(under_way, "stopping with moves still under way");
            return;
        }
        let second = t0.elapsed().as_secs();
        if told != Some(second) {
            told = Some(second);
            status(under_way);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}
