//! The source side of `mig move`: claims the container, connects to the pinned peer, and runs
//! the protocol's source machine with [`SourceSide`] performing its actions: presync files
//! (missing layers, a first copy of the writable layer), freeze, CRIU dump leaving the container
//! frozen, the final files (the sealed image set and the writable layer), thaw on rollback,
//! destroy after Commit.

use super::journal::{self, JournalEntry};
use super::{chain, memsync, ms};
use crate::daemon::events::EventKind;
use crate::daemon::Agent;
use mig_migrate::archive::LayerScan;
use mig_migrate::criu::smaps::SmapsCopy;
use mig_migrate::criu::DumpOpts;
use mig_migrate::protocol::{JournalState, Role};
use mig_migrate::transport::{Progress, SourceReport};
use mig_runtime::cgroup::Cgroup;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod destroy;
mod dump;
mod files;
mod host;
mod orchestrate;
mod rollback;

pub(crate) use destroy::{
    destroy_copy, ending, frozen_for_move, hold_ending, mark_frozen, moving_away,
};
pub(crate) use host::Src;

/// How long freezing the cgroup may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Name of the writable-layer tar on the wire (kinds Presync and Delta).
pub(crate) const UPPER_TAR: &str = "upper.tar";
/// Name of the writable-layer delta since the presync on the wire (kind Delta).
pub(crate) const UPPER_DELTA_TAR: &str = "upper-delta.tar";
/// The container's log: what it holds at the presync (kind Presync, to a 1.5 destination), or
/// all of it while frozen (kind Delta, to an older one).
pub(crate) const LOG_FILE: &str = "container.log";
/// What the container's log gained since its presync copy, sent while frozen (kind Delta): the
/// destination appends it to the presync copy.
pub(crate) const LOG_TAIL_FILE: &str = "container.log.tail";
/// The protocol minor from which a destination takes the log in two parts ([`LOG_FILE`] as a
/// presync file, [`LOG_TAIL_FILE`] while frozen).
pub const LOG_PRESYNC_MINOR: u16 = 5;
/// The protocol minor from which a destination takes writable-layer delta entries that append
/// to its presync copy of a file (a file that only grew sends its new bytes).
pub const UPPER_APPEND_MINOR: u16 = 6;

/// The minor protocol version from which a destination answers a `Resolve` about a post-copy
/// whose copy it killed for its missing memory with `RolledBack` (docs/protocol.md, 1.8).
pub const POSTCOPY_CUT_MINOR: u16 = 8;
/// The container's state record on the source (kind Delta): the destination keeps `created`.
pub(crate) const STATE_FILE: &str = "source-state.json";
/// The image set's manifest without its files, in the work directory, between the dump and
/// the end of the image files' transfer to a 1.1 destination (see `SourceSide::seal_sent`).
const MANIFEST_DRAFT: &str = "manifest.draft.json";

/// Failures of the source's host actions (reported to the peer and in the outcome).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open the cgroup {name}")]
    Cgroup {
        name: String,
        #[source]
        source: mig_runtime::cgroup::CgroupError,
    },
    #[error("cannot freeze the container")]
    Freeze(#[source] mig_runtime::cgroup::CgroupError),
    #[error("cannot thaw the container")]
    Thaw(#[source] mig_runtime::cgroup::CgroupError),
    #[error("the container's init is gone")]
    NoInit,
    #[error("criu is not usable")]
    Criu(#[source] mig_migrate::criu::CriuError),
    #[error("cannot dump the container")]
    Dump(#[source] mig_migrate::criu::CriuError),
    /// The destination ended the dump's page stream, and said why.
    #[error("the destination stopped the dump's page stream: {why}; the dump then failed")]
    DumpStopped {
        why: &'static str,
        #[source]
        source: mig_migrate::criu::CriuError,
    },
    #[error("criu pre-dump failed (the container kept running)")]
    PreDump(#[source] mig_migrate::criu::CriuError),
    #[error("cannot prepare the pre-copy rounds")]
    Rounds(#[source] super::precopy::RoundsError),
    #[error("cannot seal the image set")]
    Seal(#[source] mig_migrate::imageset::ImageSetError),
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot archive the writable layer")]
    Layer(#[source] mig_migrate::archive::LayerError),
    #[error("layer {digest} is not in the image store")]
    LayerBlob {
        digest: String,
        #[source]
        source: mig_runtime::image::ImageError,
    },
    #[error("cannot remove the source copy: {message}")]
    Destroy { message: String },
    #[error("cannot write the journal")]
    Journal(#[source] journal::JournalError),
    #[error("background task failed: {0}")]
    Task(String),
    #[error("injected fault at {0}")]
    Injected(&'static str),
    #[error("cannot move the memory pages")]
    Pages(#[source] super::pages::PagesError),
    #[error("cannot cut the frozen container's network link")]
    Net(#[source] mig_runtime::net::NetError),
    /// What grew is in words: the pages to send, the writable layer's changed files.
    #[error("{grew}: the predicted downtime is now {predicted_ms} ms, above the limit of {max_ms} ms (--max-downtime); the move stopped before freezing the container")]
    DowntimeGrew {
        grew: String,
        predicted_ms: u64,
        max_ms: u64,
    },
}

/// `mig move --max-downtime`, checked again right before the freeze: the pre-flight's plan and
/// the container's private memory it saw ([`SourceSide::check_downtime_bound`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DowntimeBound {
    pub max_ms: u64,
    pub plan: super::modes::Plan,
    pub anon_bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The source's host: one per migration.
pub(crate) struct SourceSide {
    pub agent: Arc<Agent>,
    pub id: String,
    pub name: String,
    pub cgroup: String,
    pub migration_id: String,
    pub peer: String,
    /// `<container>/migration`: the presync tar, the image set, the final tar.
    pub work: PathBuf,
    /// The container's processes, read while frozen (what the dump holds).
    pub frozen_pids: std::sync::Mutex<Vec<mig_runtime::pidmap::PidEntry>>,
    /// Memory pages that do not travel as files (modes `stream` and `lazy`).
    pub pages: super::pages::SourcePages,
    /// Dump established TCP connections (`mig move --tcp-established`).
    pub tcp_established: bool,
    /// The container's network: its host link is down while the frozen copy waits.
    pub net: Option<mig_runtime::net::NetSpec>,
    /// When the move started (phase events count from it).
    pub started: Instant,
    /// The writable layer's presync scan and sizes.
    pub upper_sync: UpperSync,
    /// The destination's protocol version, from its hello.
    pub peer_version: std::sync::OnceLock<mig_migrate::wire::Version>,
    /// Pre-copy's rounds (mode `precopy`; inactive otherwise).
    pub precopy: super::precopy::SourceRounds,
    /// The bytes of the last progress event (what the move sent so far).
    pub progress_bytes: AtomicU64,
    /// Copies of the frozen processes' `smaps`, made while CRIU starts (`work/smaps`).
    pub smaps: std::sync::Mutex<Option<SmapsCopy>>,
    /// The container's log in two parts ([`LOG_PRESYNC_MINOR`]).
    pub log_sync: LogSync,
    /// `--max-downtime`, when given.
    pub downtime_bound: std::sync::OnceLock<DowntimeBound>,
    /// The shim's log pipe as the container's processes hold it, found before the freeze (no
    /// process can take the pipe up later: only the shim and the container hold it).
    pub stdio_pipe: std::sync::Mutex<Option<Option<String>>>,
}

impl SourceSide {
    /// The log pipe the dump names to CRIU ([`mig_migrate::criu::log_pipe`]).
    fn find_stdio_pipe(&self, init_pid: i32, pids: &[i32]) -> Option<String> {
        mig_migrate::criu::log_pipe(
            init_pid,
            self.agent.live_shim(&self.id).map(|s| s.shim_pid),
            pids,
        )
    }

    /// Finds the log pipe while the container runs, so the freeze window does not read every
    /// process's descriptors.
    pub(super) fn find_stdio_pipe_early(&self) {
        let Some(init_pid) = self.agent.init_pid_of(&self.id) else {
            return;
        };
        let Ok(cg) = self.cg() else {
            return;
        };
        let pids = cg.procs().unwrap_or_else(|_| vec![init_pid]);
        let pipe = self.find_stdio_pipe(init_pid, &pids);
        *self.stdio_pipe.lock().unwrap_or_else(|p| p.into_inner()) = Some(pipe);
    }

    /// The pipe found before the freeze, or (without one) found now.
    pub(super) fn stdio_pipe(&self, init_pid: i32, pids: &[i32]) -> Option<String> {
        let early = self
            .stdio_pipe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        early.unwrap_or_else(|| self.find_stdio_pipe(init_pid, pids))
    }
}

/// The container's log in two parts: its length at the presync, then the size of what went
/// while frozen (the tail, or the whole log to an older destination).
#[derive(Debug, Default)]
pub(crate) struct LogSync {
    head: std::sync::OnceLock<u64>,
    pub delta_bytes: AtomicU64,
}

/// The writable layer in two steps: the presync tar's scan, then the delta while frozen
/// (`mig_migrate::archive::write_layer_delta`).
#[derive(Debug, Default)]
pub(crate) struct UpperSync {
    scan: std::sync::Mutex<Option<LayerScan>>,
    pub presync_bytes: AtomicU64,
    pub delta_bytes: AtomicU64,
    /// Writing the delta while frozen (reading the changed files, digesting grown ones), in ms:
    /// left out of the fixed costs learned from the move, as it grows with the layer.
    pub delta_ms: AtomicU64,
}

impl SourceSide {
    /// Whether the destination announced protocol minor `minor` (of our major) or later; false
    /// before its hello arrived.
    pub fn peer_speaks(&self, minor: u16) -> bool {
        self.peer_version.get().is_some_and(|v| v.minor >= minor)
    }

    /// What every dump of this container passes CRIU, the final one and pre-copy's rounds:
    /// the tree, where the images go, the root, the cgroup to freeze and as externals, for a
    /// user-namespace container its host binds (devices, masked files), for a loopback-only
    /// container going to a 1.3 destination its network namespace (recreated there with `lo`
    /// up instead of dumped and restored: `mig_runtime::container::LoopbackNetns`).
    pub(super) fn dump_opts(&self, pid: i32, cg: &Cgroup, images_dir: &Path) -> DumpOpts {
        let mut external = Vec::new();
        if let Ok(e) = self.agent.entry(&self.id) {
            external = mig_runtime::container::dump_externals(&e.spec);
            if self.peer_speaks(3) && mig_runtime::container::netns_recreatable(&e.spec) {
                // Without the inode the namespace is dumped in full, as for an older peer.
                match mig_runtime::container::external_netns_arg(pid) {
                    Ok(arg) => external.push(arg),
                    Err(err) => {
                        tracing::warn!(id = %self.id, error = %chain(&err), "dumping the network namespace in full")
                    }
                }
            }
        }
        DumpOpts {
            pid,
            images_dir: images_dir.to_owned(),
            root: Some(self.agent.dirs.container(&self.id).rootfs()),
            freeze_cgroup: cg.freezer_dir(),
            external,
            extra: super::dump_extra_args(),
            ..Default::default()
        }
    }

    pub(super) fn cg(&self) -> Result<Cgroup, SourceError> {
        Cgroup::open(&self.cgroup).map_err(|source| SourceError::Cgroup {
            name: self.cgroup.clone(),
            source,
        })
    }

    fn upper(&self) -> PathBuf {
        self.agent.dirs.container(&self.id).upper()
    }

    /// The files the container's processes map shared and writable now, by their path in the
    /// container ([`mig_runtime::pidmap::shared_writable_files`]).
    fn mapped_files(&self) -> std::collections::BTreeSet<PathBuf> {
        let pids = self
            .cg()
            .ok()
            .and_then(|c| c.procs().ok())
            .unwrap_or_default();
        mig_runtime::pidmap::shared_writable_files(&pids)
    }

    /// Takes the writable layer's files in `mapped` as changed since the presync: stores through
    /// a shared mapping change a file without touching its times, so the delta would keep the
    /// presync's copy (QA of session 25: a database file lost its last writes in every mode).
    /// A path of another mount (a tmpfs) that the layer also holds only costs its bytes.
    fn forget_mapped(&self, scan: &mut LayerScan, mapped: &std::collections::BTreeSet<PathBuf>) {
        for rel in mapped.iter().filter_map(|p| p.strip_prefix("/").ok()) {
            scan.forget(rel);
        }
        if !mapped.is_empty() {
            tracing::debug!(id = %self.id, files = mapped.len(), "files mapped shared and writable go with the delta");
        }
    }

    fn entry(&self, state: JournalState) -> JournalEntry {
        let (updated, updated_ns) = super::journal::now();
        JournalEntry {
            migration_id: self.migration_id.clone(),
            role: Role::Source,
            state,
            container_id: self.id.clone(),
            container_name: self.name.clone(),
            peer: self.peer.clone(),
            cgroup: self.cgroup.clone(),
            updated,
            updated_ns,
        }
    }

    /// Emits [`EventKind::MigrationDone`] (`outcome`: committed, rolled_back or in_doubt).
    pub(super) fn done(&self, outcome: &str, report: Option<&SourceReport>, error: Option<String>) {
        self.agent.emit(EventKind::MigrationDone {
            migration_id: self.migration_id.clone(),
            container_id: self.id.clone(),
            container_name: self.name.clone(),
            role: "source".into(),
            peer: self.peer.clone(),
            outcome: outcome.into(),
            total_ms: ms(self.started.elapsed()),
            downtime_ms: report
                .filter(|_| outcome == "committed")
                .map(|r| ms(r.timings.downtime)),
            bytes: self.bytes_moved(report.map_or(0, |r| r.bytes_sent)),
            error,
        });
    }

    /// Emits [`EventKind::MigrationPhase`] with `p`'s bytes since the move started, never fewer
    /// than an earlier event said (the memory presync counts the connection's UDP bytes, the
    /// later phases payload).
    fn emit_progress(&self, p: Progress) {
        let bytes = self
            .progress_bytes
            .fetch_max(p.bytes, Ordering::Relaxed)
            .max(p.bytes);
        let p = Progress {
            bytes,
            total: p.total.map(|t| t.max(bytes)),
            ..p
        };
        self.agent.emit(EventKind::MigrationPhase {
            migration_id: self.migration_id.clone(),
            container_id: self.id.clone(),
            container_name: self.name.clone(),
            role: "source".into(),
            peer: self.peer.clone(),
            phase: p.phase.into(),
            elapsed_ms: ms(self.started.elapsed()),
            bytes: p.bytes,
            total_bytes: p.total,
        });
    }

    /// Everything this move sent: `files` bytes of files, the memory presync's pages and the
    /// page tunnel's (what `MoveResult.bytes_sent` says).
    fn bytes_moved(&self, files: u64) -> u64 {
        files + self.bytes_besides_files()
    }

    /// Bytes sent outside the files: the memory presync (once done) and the page tunnel.
    fn bytes_besides_files(&self) -> u64 {
        self.pages.presync.report().map_or(0, |r| r.bytes)
            + self.pages.tunnel_bytes.load(Ordering::Relaxed)
    }

    /// Before the freeze: refuses the move when the container's private memory grew since the
    /// pre-flight so much that the predicted downtime passes `--max-downtime` (QA of session 23:
    /// a process forking workers of 256 MiB had its move take 32.6 s of downtime under
    /// `--max-downtime 3000`, 1.7 s predicted: the workers started after the presync listed
    /// the processes, so all their memory crossed while frozen).
    pub(crate) fn check_downtime_bound(&self) -> Result<(), SourceError> {
        let Some(b) = self.downtime_bound.get() else {
            return Ok(());
        };
        let pids = self.cg()?.procs().unwrap_or_default();
        let Some(now) = mig_runtime::pidmap::mapped_memory(&pids) else {
            return Ok(());
        };
        let growth = now.anon_bytes.saturating_sub(b.anon_bytes);
        let pages_ms = b.plan.preflight.growth_ms(b.plan.mode, growth);
        // The writable layer's files changed since its presync go while frozen (whole, or a
        // grown one its new bytes after its old ones are digested again).
        let mapped = self.mapped_files();
        let mut scan = self
            .upper_sync
            .scan
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (changed, hashed) = match scan.as_mut() {
            Some(scan) => {
                self.forget_mapped(scan, &mapped);
                mig_migrate::archive::delta_file_bytes(
                    &self.upper(),
                    scan,
                    self.peer_speaks(UPPER_APPEND_MINOR),
                )
                .inspect_err(|e| tracing::warn!(id = %self.id, error = %chain(e), "cannot measure the writable layer's changes"))
                .unwrap_or((0, 0))
            }
            None => (0, 0),
        };
        drop(scan);
        let files_ms = b.plan.preflight.upper_growth_ms(changed, hashed);
        let predicted_ms = b.plan.predicted_ms + pages_ms + files_ms;
        tracing::debug!(id = %self.id, growth, changed, predicted_ms, max_ms = b.max_ms, "downtime bound checked before the freeze");
        if predicted_ms > b.max_ms {
            let mut grew = Vec::new();
            if pages_ms > 0 || files_ms == 0 {
                grew.push(format!("the pages to send grew by {} MiB since the pre-flight (counted per process, as the dump sends them: processes started or memory allocated after it, which the memory presync did not copy)", growth >> 20));
            }
            if files_ms > 0 {
                grew.push(format!("the writable layer's files changed since their copy while the container ran: {} MiB of them go while frozen, and {} MiB of files that grew are read again while frozen to check that they only grew (such a file goes by its new bytes; one changed elsewhere goes whole)", changed >> 20, hashed >> 20));
            }
            return Err(SourceError::DowntimeGrew {
                grew: grew.join("; "),
                predicted_ms,
                max_ms: b.max_ms,
            });
        }
        Ok(())
    }

    /// Stream mode to a 1.4 destination: sends the container's memory while it runs (after
    /// the files of the presync, right before the freeze), unless [`memsync::enabled`] or the
    /// move (`--no-memory-presync`) says no.
    async fn memory_presync(&self) {
        if self.pages.mode() != super::modes::MoveMode::Stream
            || !self.peer_speaks(memsync::MEMORY_PRESYNC_MINOR)
            || !memsync::enabled()
            || self.pages.presync.off.load(Ordering::Relaxed)
        {
            return;
        }
        let Some(conn) = self.pages.conn.get() else {
            return;
        };
        let procs = match self.cg().and_then(|cg| {
            cg.procs().map_err(|source| SourceError::Cgroup {
                name: self.cgroup.clone(),
                source,
            })
        }) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %chain(&e), "no memory presync: cannot list the container's processes");
                return;
            }
        };
        let procs = mig_runtime::pidmap::pid_map(&procs);
        self.pages
            .presync
            .run(conn, &self.migration_id, &procs)
            .await;
    }
}
