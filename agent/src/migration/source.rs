//! The source side of `mig move`: claims the container, connects to the pinned peer, and runs
//! the protocol's source machine with [`SourceSide`] performing its actions: presync files
//! (missing layers, a first copy of the writable layer), freeze, CRIU dump leaving the container
//! frozen, the final files (the sealed image set and the writable layer), thaw on rollback,
//! destroy after Commit.

use super::fault::{self, Fault, Point};
use super::journal::{self, JournalEntry};
use super::{chain, memsync, ms, MoveResult};
use crate::api::{ApiError, ContainerState, ErrorKind};
use crate::daemon::events::EventKind;
use crate::daemon::Agent;
use crate::layout::{is_our_shim, now, proc_start_ticks, ShimRecord};
use mig_migrate::archive::LayerScan;
use mig_migrate::criu::smaps::SmapsCopy;
use mig_migrate::criu::{Criu, DumpOpts};
use mig_migrate::imageset::{self, SealInfo, MANIFEST};
use mig_migrate::protocol::{JournalRecord, JournalState, Outcome, Role, SourceMachine, Timeouts};
use mig_migrate::transport::{
    self, HostError, OutgoingFile, Progress, SentFile, SourceHost, SourceReport,
};
use mig_migrate::wire::{FileKind, Phase, Prepare};
use mig_runtime::cgroup::Cgroup;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

/// Copies the bytes of the log `from` after its first `skip` into `to` (created anew); returns
/// the length of `from` it copied up to. Reads one open file, so bytes the shim appends meanwhile
/// either go or wait for the next part, never half.
fn copy_log_range(from: &Path, to: &Path, skip: u64) -> Result<u64, SourceError> {
    use std::io::{Read, Seek};
    let mut src = std::fs::File::open(from).map_err(io(from))?;
    let end = src.metadata().map_err(io(from))?.len();
    src.seek(std::io::SeekFrom::Start(skip)).map_err(io(from))?;
    let mut dst = std::fs::File::create(to).map_err(io(to))?;
    std::io::copy(&mut src.take(end.saturating_sub(skip)), &mut dst).map_err(io(to))?;
    Ok(end)
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

    fn entry(&self, state: JournalState) -> JournalEntry {
        JournalEntry {
            migration_id: self.migration_id.clone(),
            role: Role::Source,
            state,
            container_id: self.id.clone(),
            container_name: self.name.clone(),
            peer: self.peer.clone(),
            cgroup: self.cgroup.clone(),
            updated: now(),
        }
    }

    /// Emits [`EventKind::MigrationDone`] (`outcome`: committed, rolled_back or in_doubt).
    fn done(&self, outcome: &str, report: Option<&SourceReport>, error: Option<String>) {
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

    /// Archives the writable layer while the container runs and keeps the scan of it.
    fn presync_upper(&self, tar: &Path) -> Result<(), SourceError> {
        let scan = write_file(tar, true, |w| {
            mig_migrate::archive::write_layer_tar_scanned(&self.upper(), w)
        })?;
        let size = std::fs::metadata(tar).map(|m| m.len()).unwrap_or(0);
        self.upper_sync.presync_bytes.store(size, Ordering::Relaxed);
        *self
            .upper_sync
            .scan
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(scan);
        Ok(())
    }

    /// The writable layer while frozen: the delta since the presync scan (remote name
    /// [`UPPER_DELTA_TAR`]), or the whole layer ([`UPPER_TAR`]) when there was no presync.
    fn final_upper(&self) -> Result<(PathBuf, &'static str), SourceError> {
        let scan = self
            .upper_sync
            .scan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (tar, remote) = match scan {
            Some(scan) => {
                let tar = self.work.join("final-upper-delta.tar");
                // Not synced: the file only feeds the transfer of this move (digests taken
                // from what is read, checked by the destination); a crash rolls the move back.
                let stats = write_file(&tar, false, |w| {
                    mig_migrate::archive::write_layer_delta(&self.upper(), &scan, w)
                })?;
                tracing::debug!(
                    changed = stats.changed,
                    deleted = stats.deleted,
                    "writable-layer delta"
                );
                (tar, UPPER_DELTA_TAR)
            }
            None => {
                let tar = self.work.join("final-upper.tar");
                write_tar(&self.upper(), &tar)?;
                (tar, UPPER_TAR)
            }
        };
        let size = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
        self.upper_sync.delta_bytes.store(size, Ordering::Relaxed);
        Ok((tar, remote))
    }

    /// The container's log as it is before the freeze (kind Presync, remote [`LOG_FILE`]), for a
    /// destination that takes it in two parts: the bulk of a long log travels while the
    /// container runs, and only what it gains after this goes while frozen ([`Self::record_files`]).
    fn presync_log(&self) -> Result<Option<OutgoingFile>, SourceError> {
        let from = self.agent.dirs.container(&self.id).log();
        if !self.peer_speaks(LOG_PRESYNC_MINOR) || !from.is_file() {
            return Ok(None);
        }
        let copy = self.work.join("presync-container.log");
        let len = copy_log_range(&from, &copy, 0)?;
        let _ = self.log_sync.head.set(len);
        Ok(Some(OutgoingFile {
            kind: FileKind::Presync,
            local: copy,
            remote: LOG_FILE.to_owned(),
            sha256: None,
        }))
    }

    /// The container's log and state record as they are while frozen, so that the destination
    /// keeps the old output (`mig logs`) and the creation time.
    fn record_files(&self) -> Result<Vec<OutgoingFile>, SourceError> {
        let cd = self.agent.dirs.container(&self.id);
        let mut files: Vec<OutgoingFile> = self.frozen_log(&cd.log())?.into_iter().collect();
        let from = cd.state();
        if from.is_file() {
            let copy = self.work.join(STATE_FILE);
            if self.peer_speaks(1) {
                std::fs::copy(&from, &copy).map_err(io(&from))?;
            } else {
                // A protocol 1.0 destination (mig 0.1.0) reads the record strictly and knows no
                // `format` key: send it in mig 0.1's format (no key), or it loses `created`.
                let st: crate::layout::StateRecord =
                    crate::layout::read_record(&from).map_err(io(&from))?;
                mig_runtime::fsutil::write_json(&copy, &st).map_err(io(&copy))?;
            }
            files.push(OutgoingFile {
                kind: FileKind::Delta,
                local: copy,
                remote: STATE_FILE.to_owned(),
                sha256: None,
            });
        }
        Ok(files)
    }

    /// The container's log while frozen: what it gained since [`Self::presync_log`]
    /// ([`LOG_TAIL_FILE`]), else all of it ([`LOG_FILE`]); `None` without a log.
    fn frozen_log(&self, from: &Path) -> Result<Option<OutgoingFile>, SourceError> {
        let Ok(meta) = std::fs::metadata(from) else {
            return Ok(None);
        };
        // The shim only appends, so the log still starts with the presync copy; were it shorter
        // (replaced by hand), it goes whole and the destination drops the copy.
        let head = self
            .log_sync
            .head
            .get()
            .copied()
            .filter(|&h| meta.len() >= h);
        let remote = if head.is_some() {
            LOG_TAIL_FILE
        } else {
            LOG_FILE
        };
        let copy = self.work.join(remote);
        let skip = head.unwrap_or(0);
        let end = copy_log_range(from, &copy, skip)?;
        self.log_sync
            .delta_bytes
            .store(end.saturating_sub(skip), Ordering::Relaxed);
        Ok(Some(OutgoingFile {
            kind: FileKind::Delta,
            local: copy,
            remote: remote.to_owned(),
            sha256: None,
        }))
    }

    /// Freezes, dumps (leaving the container frozen), seals; returns the final files.
    fn dump_blocking(
        &self,
        tunnel: Option<&mig_migrate::transport::tunnel::Tunnel>,
    ) -> Result<Vec<OutgoingFile>, SourceError> {
        let t_prep = Instant::now();
        let init_pid = self
            .agent
            .init_pid_of(&self.id)
            .ok_or(SourceError::NoInit)?;
        let criu = Criu::locate().map_err(SourceError::Criu)?;
        let criu_version = criu.version().map_err(SourceError::Criu)?;
        let cg = self.cg()?;
        let images = self.work.join("images");
        if images.exists() {
            std::fs::remove_dir_all(&images).map_err(io(&images))?;
        }
        std::fs::create_dir_all(&images).map_err(io(&images))?;
        let pid_map = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_else(|_| vec![init_pid]));
        // CRIU keeps no CPU masks: the narrowed ones go with the image set (after the dump).
        let pids: Vec<i32> = pid_map.iter().map(|e| e.host_pid).collect();
        let masks = mig_runtime::affinity::narrowed(&pids);
        let stdio_pipe = mig_migrate::criu::stdout_pipe(init_pid);
        let injected = fault::hit(&self.agent.cfg.state_dir, Point::SourceDump)?;
        let (track_mem, prev_images_dir) = self.precopy.final_dump();
        let smaps = self.smaps.lock().unwrap_or_else(|p| p.into_inner()).take();
        let t_criu = Instant::now();
        let prep_ms = ms(t_criu - t_prep);
        let stats = self.pages.dump(
            &criu,
            &self.migration_id,
            DumpOpts {
                leave_running: true,
                tcp_established: self.tcp_established,
                log_file: "dump.log".into(),
                // Pre-copy: only what changed since the last round.
                track_mem,
                prev_images_dir,
                smaps_dir: smaps.as_ref().map(|c| c.dir().to_owned()),
                ..self.dump_opts(fault::criu_pid(injected, init_pid), &cg, &images)
            },
            tunnel,
        );
        drop(smaps);
        let stats = stats.map_err(SourceError::Dump)?;
        if let Err(e) = mig_runtime::affinity::save(&images, &masks) {
            tracing::warn!(id = %self.id, error = %e, "cannot save the tasks' CPU masks: they are not restored");
        }
        self.precopy
            .set_final(stats.pages_written * super::precopy::PAGE_SIZE);
        // The "before" PID map is what CRIU dumped (the cgroup is frozen again): a read of
        // `cgroup.procs` at the freeze can miss a short-lived process CRIU found.
        match super::pstree::dumped_pids(&images) {
            Ok(dumped) => {
                let live = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_default());
                let map = super::pstree::dumped_map(live, &dumped);
                *self.frozen_pids.lock().unwrap_or_else(|p| p.into_inner()) = map;
            }
            Err(e) => {
                tracing::warn!(id = %self.id, error = %chain(&e), "cannot read the dumped process tree: the PID map read at the freeze stands")
            }
        }
        let t_seal = Instant::now();
        self.pages
            .criu_dump_ms
            .store(ms(t_seal - t_criu), Ordering::Relaxed);
        let criu_wall_ms = stats.wall_time_us / 1000;
        let spec = self
            .agent
            .entry(&self.id)
            .map(|e| e.spec)
            .map_err(|e| SourceError::Destroy { message: e.message })?;
        let info = SealInfo {
            spec,
            criu_version,
            pid_map,
            stdio_pipe,
            stats: Some(stats),
        };
        let mut files = if self.peer_speaks(1) {
            // The images are hashed while they are sent (digests after the bytes) and the
            // manifest is sealed from those digests once all arrived (`closing_files`).
            let draft = self.work.join(MANIFEST_DRAFT);
            let json = serde_json::to_vec(&imageset::draft(info)).map_err(std::io::Error::other);
            json.and_then(|j| std::fs::write(&draft, j))
                .map_err(io(&draft))?;
            let listed = imageset::list_files(&images).map_err(SourceError::Seal)?;
            let mut files = Vec::with_capacity(listed.len() + 3);
            for rel in listed {
                files.push(OutgoingFile {
                    kind: FileKind::Image,
                    local: images.join(&rel),
                    remote: rel,
                    sha256: None,
                });
            }
            files
        } else {
            // A 1.0 destination wants every digest up front: seal (hash) first.
            let manifest = imageset::seal(&images, info).map_err(SourceError::Seal)?;
            self.pages
                .seal_ms
                .store(ms(t_seal.elapsed()), Ordering::Relaxed);
            let mut files = Vec::with_capacity(manifest.files.len() + 3);
            for f in &manifest.files {
                let mut sha = [0u8; 32];
                let known = hex::decode_to_slice(&f.sha256, &mut sha).is_ok();
                files.push(OutgoingFile {
                    kind: FileKind::Image,
                    local: images.join(&f.path),
                    remote: f.path.clone(),
                    sha256: known.then_some(sha),
                });
            }
            files.push(OutgoingFile {
                kind: FileKind::Image,
                local: images.join(MANIFEST),
                remote: MANIFEST.to_owned(),
                sha256: None,
            });
            files
        };
        let t_upper = Instant::now();
        // What changed in the writable layer since the presync (or all of it without one).
        let (tar, upper_remote) = self.final_upper()?;
        files.push(OutgoingFile {
            kind: FileKind::Delta,
            local: tar,
            remote: upper_remote.to_owned(),
            sha256: None,
        });
        let t_records = Instant::now();
        files.extend(self.record_files()?);
        tracing::info!(
            migration = %self.migration_id,
            prep_ms,
            criu_ms = ms(t_seal - t_criu),
            criu_wall_ms,
            manifest_ms = ms(t_upper - t_seal),
            upper_ms = ms(t_records - t_upper),
            records_ms = ms(t_records.elapsed()),
            "dump phases"
        );
        if injected == Some(Fault::Corrupt)
            || fault::hit(&self.agent.cfg.state_dir, Point::SourceTransfer)? == Some(Fault::Corrupt)
        {
            corrupt_one(&mut files)?;
        }
        Ok(files)
    }

    /// With a 1.1 destination: seals the image set from the digests its files were sent with
    /// (`sent`) and returns the manifest, sent last. `seal_ms` is this step (no hashing).
    fn seal_sent(&self, sent: &[SentFile]) -> Result<Vec<OutgoingFile>, SourceError> {
        let t_seal = Instant::now();
        let images = self.work.join("images");
        let draft_path = self.work.join(MANIFEST_DRAFT);
        let draft: imageset::Manifest =
            mig_runtime::fsutil::read_json(&draft_path, imageset::MAX_MANIFEST_BYTES)
                .map_err(io(&draft_path))?;
        let digests = sent
            .iter()
            .filter(|f| f.kind == FileKind::Image)
            .map(|f| (f.remote.clone(), (f.size, f.sha256)))
            .collect();
        imageset::seal_hashed(&images, draft, &digests).map_err(SourceError::Seal)?;
        self.pages
            .seal_ms
            .store(ms(t_seal.elapsed()), Ordering::Relaxed);
        Ok(vec![OutgoingFile {
            kind: FileKind::Image,
            local: images.join(MANIFEST),
            remote: MANIFEST.to_owned(),
            sha256: None,
        }])
    }
}

/// Flips one byte of the largest image file after its digest is computed: the digest goes out
/// (in the header, or after the bytes with a 1.1 destination) for the bytes before the flip.
fn corrupt_one(files: &mut [OutgoingFile]) -> Result<(), SourceError> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let Some(f) = files
        .iter_mut()
        .filter(|f| f.kind == FileKind::Image && f.remote != MANIFEST)
        .max_by_key(|f| std::fs::metadata(&f.local).map(|m| m.len()).unwrap_or(0))
    else {
        return Ok(());
    };
    if f.sha256.is_none() {
        let (_, hex_sha) = imageset::hash_file(&f.local).map_err(SourceError::Seal)?;
        let mut sha = [0u8; 32];
        if hex::decode_to_slice(hex_sha, &mut sha).is_ok() {
            f.sha256 = Some(sha);
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.local)
        .map_err(io(&f.local))?;
    let mut b = [0u8; 1];
    file.read_exact(&mut b).map_err(io(&f.local))?;
    file.seek(SeekFrom::Start(0)).map_err(io(&f.local))?;
    file.write_all(&[b[0] ^ 0xff]).map_err(io(&f.local))?;
    tracing::warn!(file = %f.local.display(), "corrupted a file for the fault test");
    Ok(())
}

/// The whole writable layer while frozen, not synced (see [`SourceSide::final_upper`]).
fn write_tar(dir: &Path, tar: &Path) -> Result<(), SourceError> {
    write_file(tar, false, |w| {
        mig_migrate::archive::write_layer_tar(dir, w)
    })
}

/// Writes `path` with `f` through a buffer, then syncs it when `sync`.
fn write_file<T>(
    path: &Path,
    sync: bool,
    f: impl FnOnce(&mut dyn std::io::Write) -> Result<T, mig_migrate::archive::LayerError>,
) -> Result<T, SourceError> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    let mut w = std::io::BufWriter::new(file);
    let out = f(&mut w).map_err(SourceError::Layer)?;
    let file = w.into_inner().map_err(|e| SourceError::Io {
        path: path.to_owned(),
        source: e.into_error(),
    })?;
    if sync {
        file.sync_all().map_err(io(path))?;
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(SourceError::Task(e.to_string())))
}

fn boxed(e: SourceError) -> HostError {
    Box::new(e)
}

/// The [`SourceHost`] handle of a [`SourceSide`] (cloned into blocking tasks).
#[derive(Clone)]
pub(crate) struct Src(pub Arc<SourceSide>);

impl std::ops::Deref for Src {
    type Target = SourceSide;
    fn deref(&self) -> &SourceSide {
        &self.0
    }
}

impl Src {
    /// [`SourceSide::memory_presync`] with progress events while it runs (phase `presync`,
    /// bytes counted on the connection from what the move had sent before).
    async fn memory_presync_with_progress(&self) {
        let conn = self.pages.conn.get().cloned();
        let before = self.progress_bytes.load(Ordering::Relaxed);
        let base = conn.as_ref().map_or(0, |c| c.stats().udp_tx.bytes);
        let presync = self.memory_presync();
        tokio::pin!(presync);
        let mut tick = tokio::time::interval(transport::PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = &mut presync => return,
                _ = tick.tick() => {
                    let Some(c) = &conn else { continue };
                    let moved = c.stats().udp_tx.bytes.saturating_sub(base);
                    self.emit_progress(Progress { phase: "presync", bytes: before + moved, total: None });
                }
            }
        }
    }
}

impl SourceHost for Src {
    async fn presync_files(
        &self,
        missing_layers: &[String],
    ) -> Result<Vec<OutgoingFile>, HostError> {
        fault::hit_async(&self.agent.cfg.state_dir, Point::SourcePresync).await?;
        let me = self.clone();
        let missing = missing_layers.to_vec();
        blocking(move || {
            let mut files = Vec::new();
            for d in &missing {
                let blob =
                    me.agent
                        .images
                        .layer_blob(d)
                        .map_err(|source| SourceError::LayerBlob {
                            digest: d.clone(),
                            source,
                        })?;
                let mut sha = [0u8; 32];
                let known = d
                    .strip_prefix("sha256:")
                    .is_some_and(|h| hex::decode_to_slice(h, &mut sha).is_ok());
                files.push(OutgoingFile {
                    kind: FileKind::Layer,
                    local: blob,
                    remote: d.clone(),
                    sha256: known.then_some(sha),
                });
            }
            std::fs::create_dir_all(&me.work).map_err(io(&me.work))?;
            files.extend(me.presync_log()?);
            let tar = me.work.join("presync-upper.tar");
            me.presync_upper(&tar)?;
            files.push(OutgoingFile {
                kind: FileKind::Presync,
                local: tar,
                remote: UPPER_TAR.to_owned(),
                sha256: None,
            });
            Ok(files)
        })
        .await
        .map_err(boxed)
    }

    async fn presync_round(&self, round: u32) -> Result<Option<Vec<OutgoingFile>>, HostError> {
        if !self.precopy.active() {
            if round == 1 {
                self.memory_presync_with_progress().await;
            }
            return Ok(None);
        }
        let me = self.clone();
        blocking(move || me.precopy_round(round))
            .await
            .map_err(boxed)
    }

    async fn freeze(&self) -> Result<(), HostError> {
        let me = self.clone();
        blocking(move || {
            fault::hit(&me.agent.cfg.state_dir, Point::SourceBeforeFreeze)?;
            let cg = me.cg()?;
            cg.freeze(FREEZE_TIMEOUT).map_err(|e| {
                let _ = cg.thaw();
                SourceError::Freeze(e)
            })?;
            fault::hit(&me.agent.cfg.state_dir, Point::SourceFreeze)?;
            let map = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_default());
            // Read on a thread while the dump starts; the dump reads what is not ready itself.
            let pids: Vec<i32> = map.iter().map(|e| e.host_pid).collect();
            match SmapsCopy::start(&me.work.join("smaps"), &pids) {
                Ok(c) => *me.smaps.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
                Err(e) => tracing::debug!(id = %me.id, error = %e, "no copies of smaps: the dump reads them"),
            }
            *me.frozen_pids.lock().unwrap_or_else(|p| p.into_inner()) = map;
            if let Some(net) = &me.net {
                // From here the copy on the destination owns the address: nothing may reach
                // the frozen sockets here (no ACK, no RST) until the move rolls back.
                mig_runtime::net::set_host_link(net, false).map_err(|e| {
                    let _ = mig_runtime::net::set_host_link(net, true);
                    let _ = cg.thaw();
                    SourceError::Net(e)
                })?;
            }
            mark_frozen(&me.id, true);
            Ok(())
        })
        .await
        .map_err(boxed)
    }

    async fn dump(&self) -> Result<Vec<OutgoingFile>, HostError> {
        let tunnel = self
            .pages
            .before_dump(&self.migration_id)
            .await
            .map_err(|e| boxed(SourceError::Pages(e)))?;
        let me = self.clone();
        blocking(move || me.dump_blocking(tunnel.as_ref()))
            .await
            .map_err(boxed)
    }

    async fn closing_files(
        &self,
        phase: Phase,
        sent: &[SentFile],
    ) -> Result<Vec<OutgoingFile>, HostError> {
        if phase != Phase::Final || !self.peer_speaks(1) {
            return Ok(Vec::new());
        }
        let me = self.clone();
        let sent = sent.to_vec();
        blocking(move || me.seal_sent(&sent)).await.map_err(boxed)
    }

    async fn thaw(&self) -> Result<(), HostError> {
        self.pages.abandon(&self.migration_id);
        let me = self.clone();
        blocking(move || {
            // Thawed first: the copies of smaps need not be finished to roll back.
            let smaps = me.smaps.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(net) = &me.net {
                if let Err(e) = mig_runtime::net::set_host_link(net, true) {
                    tracing::warn!(id = %me.id, error = %chain(&e), "cannot bring the container's link up again");
                }
            }
            let thawed = me.cg()?.thaw().map_err(SourceError::Thaw);
            drop(smaps);
            thawed?;
            mark_frozen(&me.id, false);
            keep_dump_log(&me.work);
            let _ = std::fs::remove_dir_all(&me.work);
            Ok(())
        })
        .await
        .map_err(boxed)?;
        self.agent.set_busy(&self.id, false);
        Ok(())
    }

    async fn destroy(&self) -> Result<(), HostError> {
        // Post-copy: the destination needs this copy's pages until it has the last one.
        let me = self.clone();
        blocking(move || {
            me.pages.finish_postcopy(&me.migration_id);
            Ok(())
        })
        .await
        .map_err(boxed)?;
        destroy_copy(&self.agent, &self.id, &self.cgroup)
            .await
            .map_err(boxed)
    }

    fn peer_hello(&self, hello: &mig_migrate::wire::Hello) {
        let _ = self.peer_version.set(hello.protocol_version);
    }

    /// The files' progress (the driver's: bytes of files, capped at their total), counted from
    /// the start of the move: the memory presync's and the page tunnel's bytes are added, so
    /// that `bytes` never goes back between phases.
    fn progress(&self, p: Progress) {
        let other = self.bytes_besides_files();
        self.emit_progress(Progress {
            bytes: p.bytes + other,
            total: p.total.map(|t| t + other),
            ..p
        });
    }

    async fn journal(&self, record: &JournalRecord) -> Result<(), HostError> {
        let dir = &self.agent.cfg.state_dir;
        fault::journal(dir, Role::Source, &record.state, false).await?;
        journal::write(dir, &self.entry(record.state.clone()))
            .map_err(|e| boxed(SourceError::Journal(e)))?;
        Ok(fault::journal(dir, Role::Source, &record.state, true).await?)
    }
}

/// Kills the frozen source copy and removes it (cgroup, mount, directory, record). Idempotent.
pub(crate) async fn destroy_copy(
    agent: &Arc<Agent>,
    id: &str,
    cgroup: &str,
) -> Result<(), SourceError> {
    if let Ok(cg) = Cgroup::open(cgroup) {
        // cgroup.kill reaches frozen tasks; thaw so that nothing waits on the freezer.
        let _ = cg.kill();
        let _ = cg.thaw();
    }
    if agent.entry(id).is_err() {
        mark_frozen(id, false);
        return Ok(());
    }
    // Still busy (listed `frozen`, stage `committed`) until its shim has gone: once not busy, a
    // killed copy whose shim still runs would be listed `running` on this host while it runs on
    // the destination (QA session 18: 80 to 300 ms). The removal below waits again if needed.
    agent.wait_shim_gone(id, DESTROY_GRACE).await;
    agent.set_busy(id, false);
    let removed = match agent.remove(id, true).await {
        Ok(()) => Ok(()),
        // Removed meanwhile by another caller: what was asked is done.
        Err(_) if agent.entry(id).is_err() => Ok(()),
        Err(e) => Err(SourceError::Destroy { message: e.message }),
    };
    if removed.is_ok() {
        mark_frozen(id, false);
    }
    removed
}

/// Containers this agent froze for a move away and has not thawed or removed yet: listed
/// `frozen` whatever their cgroup says (CRIU thaws the cgroup while it holds the tasks itself).
static MOVE_FROZEN: crate::daemon::marks::Marks = crate::daemon::marks::Marks::new();

/// Marks container `id` frozen for a move away, or clears the mark.
pub(crate) fn mark_frozen(id: &str, frozen: bool) {
    MOVE_FROZEN.set(id, frozen);
}

/// Whether a move away froze container `id` (and has not thawed or removed it since).
pub(crate) fn frozen_for_move(id: &str) -> bool {
    MOVE_FROZEN.contains(id)
}

/// Whether container `id` (entry `e`) runs, is not busy and is not being stopped: a move may
/// claim it.
fn idle_running(id: &str, e: &crate::daemon::Entry) -> bool {
    !e.busy && e.state.state == ContainerState::Running && !crate::daemon::is_stopping(id)
}

/// How long [`destroy_copy`] waits for the killed copy's shim before it removes the copy.
const DESTROY_GRACE: Duration = Duration::from_secs(5);

/// Size in bytes of the files under `dir` (best effort).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn api(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg)
}

impl Agent {
    /// `pinned peers: host-b, host-c`, or how to pin one when there is none: the end of the
    /// errors of a move to a peer that is not (or cannot be) one.
    fn pinned_hint(&self) -> String {
        let peers: Vec<String> = self
            .migration
            .net()
            .map(|n| {
                n.peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .list()
                    .iter()
                    .map(|p| p.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        if peers.is_empty() {
            "no peer is pinned here (mig peers add)".to_owned()
        } else {
            format!("pinned peers: {}", peers.join(", "))
        }
    }

    /// `mig move`: moves a running container to `peer`. Returns when the container runs on the
    /// peer (Ok) or again here (an error saying why).
    pub(crate) async fn move_container(
        self: &Arc<Self>,
        container: &str,
        peer: &str,
        tcp_established: bool,
        opts: super::modes::MoveOptions,
    ) -> Result<MoveResult, ApiError> {
        let t0 = Instant::now();
        let _running = crate::daemon::heap::Running::start();
        let (id, peer) = self.check_move(container, peer, tcp_established)?;
        let _slot = self
            .migration
            .outgoing_slot(self.cfg.max_outgoing_moves)
            .map_err(|running| {
                api(
                    ErrorKind::Conflict,
                    format!(
                        "this agent already runs {running} outgoing move(s), its limit (limits.max_outgoing_moves): try again later"
                    ),
                )
            })?;
        self.claim_running(&id)?;
        let result = self
            .move_claimed(t0, &id, &peer, tcp_established, opts)
            .await;
        if let Err(e) = &result {
            // Still ours (rolled back or never started): runs here, not busy. In doubt, the
            // container stays busy and frozen until resolved.
            if !e.message.contains("in doubt") {
                self.set_busy(&id, false);
            }
        }
        result
    }

    /// What a move of `container` to `peer` can be refused for before anything starts (also
    /// by `move_start`, which answers at once): this host named as the peer, a peer not
    /// pinned, an unknown container or one that cannot be restored elsewhere, established TCP
    /// connections without `tcp_established`, a container not running or busy (already
    /// moving, being stopped...). Returns its id and the peer.
    pub(crate) fn check_move(
        &self,
        container: &str,
        peer: &str,
        tcp_established: bool,
    ) -> Result<(String, mig_migrate::transport::Peer), ApiError> {
        if peer == self.cfg.name {
            // Not a pinned peer, and the user means this host: say so, and where it can go.
            let id = self.resolve(container)?;
            let name = self.entry(&id).map(|e| e.spec.name).unwrap_or(id);
            let hint = self.pinned_hint();
            return Err(api(
                ErrorKind::InvalidArgument,
                format!("container {name} is already on {peer} (this host); {hint}"),
            ));
        }
        let net = self.migration.net().ok_or_else(|| {
            api(
                ErrorKind::Unavailable,
                "the migration endpoint is not running",
            )
        })?;
        // The peers' lock is released at the end of this statement (`pinned_hint` takes it).
        let found = net
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned();
        let peer = found.ok_or_else(|| {
            // A typo or a host not added yet: say which peers there are.
            let hint = self.pinned_hint();
            api(
                ErrorKind::NotFound,
                format!("no pinned peer named {peer} ({hint})"),
            )
        })?;
        let id = self.resolve(container)?;
        self.refresh(&id);
        self.refuse_unrestorable(&id, "move")?;
        if !tcp_established {
            if let Some(pid) = self.init_pid_of(&id) {
                self.refuse_established(pid, container, "move")?;
            }
        }
        let e = self.entry(&id)?;
        if !idle_running(&id, &e) {
            return Err(self.not_idle_running(&id, &e));
        }
        Ok((id, peer))
    }

    async fn move_claimed(
        self: &Arc<Self>,
        t0: Instant,
        id: &str,
        peer: &mig_migrate::transport::Peer,
        tcp_established: bool,
        opts: super::modes::MoveOptions,
    ) -> Result<MoveResult, ApiError> {
        let net = self.migration.net().ok_or_else(|| {
            api(
                ErrorKind::Unavailable,
                "the migration endpoint is not running",
            )
        })?;
        let e = self.entry(id)?;
        let images = self.images.clone();
        let image_id = e.spec.image.id.clone();
        let image = tokio::task::spawn_blocking(move || images.get(&image_id))
            .await
            .map_err(|e| {
                api(
                    ErrorKind::Internal,
                    format!("image lookup task failed: {e}"),
                )
            })?
            .map_err(|e| api(ErrorKind::NotFound, format!("the container's image: {e}")))?;
        let criu = Criu::locate().map_err(|e| api(ErrorKind::Unavailable, chain(&e)))?;
        let criu_version = criu
            .version()
            .map_err(|e| api(ErrorKind::Unavailable, chain(&e)))?;
        {
            let criu = criu.clone();
            let _ = tokio::task::spawn_blocking(move || super::criu_kdat(&criu)).await;
        }
        let cg = Cgroup::open(&e.state.cgroup).map_err(|e| api(ErrorKind::Internal, chain(&e)))?;
        let usage = cg.usage().unwrap_or_default();
        let procs = cg.procs().unwrap_or_default();
        let tasks = (
            procs.len().max(1) as u64,
            mig_runtime::pidmap::threads(&procs).max(1),
        );
        let pid_map_before = mig_runtime::pidmap::pid_map(&procs);
        let cd = self.dirs.container(id);
        let upper = cd.upper();
        let upper_bytes = tokio::task::spawn_blocking(move || du(&upper))
            .await
            .unwrap_or(0);
        // A mode asked by name that this kernel cannot run is refused before connecting.
        super::modes::check_asked(opts)
            .await
            .map_err(|e| api(ErrorKind::Unavailable, chain(&e)))?;
        let userns = e.spec.userns.is_some();
        if let Some(why) = mig_runtime::container::rlimit_blocker(&procs, userns, criu.path()) {
            return Err(api(
                ErrorKind::Unavailable,
                format!("cannot move {}: {why}; nothing was frozen", e.spec.name),
            ));
        }
        let migration_id = journal::new_id();
        let side = Src(Arc::new(SourceSide {
            agent: self.clone(),
            id: id.to_owned(),
            name: e.spec.name.clone(),
            cgroup: e.state.cgroup.clone(),
            migration_id: migration_id.clone(),
            peer: peer.name.clone(),
            work: cd.dir.join("migration"),
            frozen_pids: Default::default(),
            tcp_established,
            net: e.spec.net.clone(),
            started: t0,
            upper_sync: Default::default(),
            peer_version: Default::default(),
            pages: Default::default(),
            precopy: Default::default(),
            progress_bytes: AtomicU64::new(0),
            smaps: Default::default(),
            log_sync: Default::default(),
        }));
        let conn = transport::connect(&net.endpoint, &net.identity, peer)
            .await
            .map_err(|e| {
                let msg = format!("cannot reach {}: {}", peer.name, chain(&e));
                side.done("rolled_back", None, Some(msg.clone()));
                api(ErrorKind::Unavailable, msg)
            })?;
        fault::track(&conn);
        // Hellos, then (a 1.2 destination) the link probe, then the pre-flight: the mode in
        // Prepare comes from a prediction that used this connection's measured throughput.
        let hello = super::hello(self);
        let link = transport::open_source(&conn, &hello).await.map_err(|e| {
            let msg = format!("migration to {} failed to start: {}", peer.name, chain(&e));
            side.done("rolled_back", None, Some(msg.clone()));
            conn.close(0u32.into(), b"done");
            api(ErrorKind::Unavailable, msg)
        })?;
        let _ = side.peer_version.set(link.peer.protocol_version);
        // Both must speak 1.2 (`MIG_WIRE_VERSION` may make this agent announce less).
        let minor = (hello.protocol_version.minor).min(link.peer.protocol_version.minor);
        let basis = super::probe::link_throughput(&conn, &peer.name, minor).await;
        // A 1.4 destination takes stream mode's memory presync (unless this agent or the move
        // turned it off).
        let presync = minor >= memsync::MEMORY_PRESYNC_MINOR && memsync::enabled();
        // The fixed costs this agent measured on its earlier moves to the peer, else defaults.
        let fixed = super::fixedcost::known(&peer.name);
        let plan = match super::modes::plan(
            opts,
            usage.memory_bytes,
            upper_bytes,
            tasks,
            basis,
            presync,
            fixed,
        )
        .await
        {
            Ok(plan) => plan,
            Err(e) => {
                // Nothing was frozen or announced: the destination sees the connection end
                // before any message.
                conn.close(0u32.into(), b"pre-flight refused the move");
                return Err(api(ErrorKind::Unavailable, chain(&e)));
            }
        };
        if let Err(e) = super::modes::check_container(plan.mode, userns) {
            conn.close(0u32.into(), b"pre-flight refused the move");
            return Err(api(ErrorKind::Unavailable, chain(&e)));
        }
        tracing::info!(
            %id,
            mode = plan.mode.as_str(),
            predicted_downtime_ms = plan.predicted_ms,
            throughput_mib_s = plan.throughput >> 20,
            throughput_source = plan.basis.source.as_str(),
            fixed_ms = plan.fixed.ms,
            fixed_source = plan.fixed.source.as_str(),
            "pre-flight"
        );
        if plan.mode == super::modes::MoveMode::Precopy {
            // A 1.2 destination keeps the rounds and links them for the restore; an older one
            // would not: refused before anything is frozen or announced.
            if minor < 2 {
                conn.close(0u32.into(), b"pre-flight refused the move");
                let e = super::modes::ModeError::PrecopyPeerTooOld {
                    peer: peer.name.clone(),
                    version: format!(
                        "{}.{}",
                        link.peer.protocol_version.major, link.peer.protocol_version.minor
                    ),
                };
                return Err(api(ErrorKind::Unavailable, chain(&e)));
            }
            side.precopy.start(super::precopy::StopRule::new(
                super::modes::Preflight {
                    memory_bytes: usage.memory_bytes,
                    upper_bytes,
                    processes: tasks.0,
                    threads: tasks.1,
                    throughput: plan.throughput,
                    memory_presync: false,
                    fixed: Default::default(),
                },
                opts.max_downtime_ms,
            ));
        }
        let prepare = Prepare {
            migration_id: migration_id.clone(),
            spec: e.spec.clone(),
            image: image.clone(),
            criu_version,
            kernel: mig_migrate::criu::kernel_release(),
            // Pre-copy sends the memory once in round 1 and again what later rounds find dirty:
            // room for twice the memory.
            bytes_estimate: usage.memory_bytes * if side.precopy.active() { 2 } else { 1 }
                + 2 * upper_bytes
                + image.size,
            mode: plan.mode.wire(),
        };
        let _ = side.pages.mode.set(plan.mode);
        side.pages
            .presync
            .off
            .store(opts.no_memory_presync, Ordering::Relaxed);
        tracing::info!(%id, migration = %migration_id, peer = %peer.name, "moving");
        let _ = side.pages.conn.set(conn.clone());
        // The destination's lazy-pages daemon reaches our post-copy dump through here.
        let lazy_tunnel = (plan.mode == super::modes::MoveMode::Lazy).then(|| {
            tokio::spawn(transport::tunnel::serve(
                conn.clone(),
                super::pages::resolve,
            ))
        });
        let machine = SourceMachine::new(prepare, Timeouts::default());
        // A `mig move --resolve` of this move waits until the move's own machine is done.
        let held = super::recover::hold(&migration_id).await;
        let report = transport::run_source_on(&conn, link, machine, &side).await;
        drop(held);
        conn.close(0u32.into(), b"done");
        if let Some(task) = lazy_tunnel {
            // The pages served after the resume (the dump served them all before destroy).
            if let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_secs(5), task).await {
                side.pages
                    .tunnel_bytes
                    .store(bytes.get(), Ordering::Relaxed);
            }
        }
        let report = report.map_err(|e| {
            let msg = format!("migration to {} failed to start: {}", peer.name, chain(&e));
            side.done("rolled_back", None, Some(msg.clone()));
            api(ErrorKind::Unavailable, msg)
        })?;
        match (&report.outcome, report.in_doubt) {
            (_, true) => side.done("in_doubt", Some(&report), None),
            (Some(Outcome::Committed { cleanup_error }), _) => {
                side.done("committed", Some(&report), cleanup_error.clone())
            }
            (Some(Outcome::RolledBack { detail, .. }), _) => {
                side.done("rolled_back", Some(&report), Some(detail.clone()))
            }
            (None, _) => side.done("rolled_back", Some(&report), None),
        }
        let _ = std::fs::remove_dir_all(&side.work);
        if report.in_doubt {
            super::recover::spawn_resolver(self.clone(), id.to_owned());
            return Err(api(
                ErrorKind::Conflict,
                format!(
                    "migration {migration_id} is in doubt: the link to {} was lost at commit; the container stays frozen here until `mig move --resolve {}`",
                    peer.name, e.spec.name
                ),
            ));
        }
        match report.outcome {
            Some(Outcome::Committed { cleanup_error }) => {
                let t = report.timings;
                tracing::info!(%id, downtime_ms = ms(t.downtime), total_ms = ms(t0.elapsed()), "moved");
                let page_bytes = side
                    .pages
                    .tunnel_bytes
                    .load(std::sync::atomic::Ordering::Relaxed);
                let postcopy = side
                    .pages
                    .postcopy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                match plan.mode {
                    super::modes::MoveMode::Stream => {
                        super::modes::record_throughput(&peer.name, page_bytes, ms(t.dump))
                    }
                    _ => super::modes::record_throughput(
                        &peer.name,
                        report.bytes_sent,
                        ms(t.transfer),
                    ),
                }
                // What this move's fixed costs were, for the next pre-flight to this peer.
                let learned = super::fixedcost::record(
                    &peer.name,
                    plan.mode,
                    ms(t.downtime),
                    plan.variable_ms,
                );
                tracing::info!(
                    %id,
                    downtime_ms = ms(t.downtime),
                    model_ms = plan.variable_ms,
                    ?learned,
                    "fixed costs measured"
                );
                Ok(MoveResult {
                    id: id.to_owned(),
                    name: e.spec.name.clone(),
                    migration_id,
                    peer: peer.name.clone(),
                    mode: plan.mode.as_str().into(),
                    downtime_ms: ms(t.downtime),
                    total_ms: ms(t0.elapsed()),
                    presync_ms: ms(t.presync),
                    freeze_ms: ms(t.freeze),
                    dump_ms: ms(t.dump),
                    transfer_ms: ms(t.transfer),
                    restore_ms: ms(t.restore),
                    bytes_sent: side.bytes_moved(report.bytes_sent),
                    files_sent: report.files_sent,
                    pid_map_before: {
                        let frozen = side.frozen_pids.lock().unwrap_or_else(|p| p.into_inner());
                        if frozen.is_empty() {
                            pid_map_before
                        } else {
                            frozen.clone()
                        }
                    },
                    pid_map: report.dest_pid_map,
                    cleanup_error,
                    predicted_downtime_ms: Some(plan.predicted_ms),
                    throughput_bytes_s: Some(plan.throughput),
                    throughput_source: Some(plan.basis.source.as_str().into()),
                    probe: plan.basis.probe,
                    fixed_cost: Some(plan.fixed),
                    page_bytes,
                    presync_upper_bytes: side.upper_sync.presync_bytes.load(Ordering::Relaxed),
                    presync_log_bytes: side.log_sync.head.get().copied().unwrap_or(0),
                    delta_log_bytes: side.log_sync.delta_bytes.load(Ordering::Relaxed),
                    delta_bytes: side.upper_sync.delta_bytes.load(Ordering::Relaxed),
                    postcopy_ms: postcopy.as_ref().map(|p| ms(p.0)),
                    postcopy_error: postcopy.and_then(|p| p.1),
                    criu_dump_ms: Some(side.pages.criu_dump_ms.load(Ordering::Relaxed)),
                    seal_ms: Some(side.pages.seal_ms.load(Ordering::Relaxed)),
                    precopy: side.precopy.report(),
                    memory_presync: side.pages.presync.report(),
                })
            }
            Some(Outcome::RolledBack {
                cause,
                detail,
                rollback_error,
            }) => {
                super::recover::spawn_notifier(self.clone(), side.entry(JournalState::RolledBack));
                // `rollback_error` is set only when thawing the copy here failed.
                let here = match rollback_error {
                    None => "the container keeps running here".to_owned(),
                    Some(r) => format!(
                        "the container stays here but the rollback failed ({r}): it may still be frozen"
                    ),
                };
                let detail = kept_log_named(&side.work, detail);
                let msg = format!(
                    "migration to {} rolled back ({}): {detail}; {here}",
                    peer.name,
                    cause_words(&cause)
                );
                Err(api(ErrorKind::Internal, msg))
            }
            None => Err(api(
                ErrorKind::Internal,
                format!("migration {migration_id} ended without an outcome"),
            )),
        }
    }

    /// Marks a running, idle container busy (moving).
    fn claim_running(&self, id: &str) -> Result<(), ApiError> {
        let mut map = self.lock();
        let e = map
            .get_mut(id)
            .ok_or_else(|| api(ErrorKind::NotFound, format!("no such container: {id}")))?;
        if !idle_running(id, e) {
            let e = e.clone();
            drop(map);
            return Err(self.not_idle_running(id, &e));
        }
        e.busy = true;
        Ok(())
    }

    /// Why container `id` (entry `e`) cannot be moved now: busy, not running, or being stopped.
    fn not_idle_running(&self, id: &str, e: &crate::daemon::Entry) -> ApiError {
        if e.busy {
            return self.busy_error(id, e);
        }
        if e.state.state != ContainerState::Running {
            return api(
                ErrorKind::Conflict,
                format!(
                    "container {} is {}, not running",
                    e.spec.name,
                    e.state.state.as_str()
                ),
            );
        }
        api(
            ErrorKind::Conflict,
            format!("container {} is being stopped (mig stop)", e.spec.name),
        )
    }

    /// The init's PID when the container runs and the PID still belongs to it.
    pub(crate) fn init_pid_of(&self, id: &str) -> Option<i32> {
        let s: ShimRecord = crate::layout::read_record(&self.dirs.container(id).shim()).ok()?;
        (is_our_shim(s.shim_pid, id) && proc_start_ticks(s.init_pid) == Some(s.init_start_ticks))
            .then_some(s.init_pid)
    }

    pub(crate) fn set_busy(&self, id: &str, busy: bool) {
        if let Some(e) = self.lock().get_mut(id) {
            e.busy = busy;
        }
    }
}

/// Why a move rolled back, in words (the error message used to show the Rust names,
/// `Refused(NameClash)`).
fn cause_words(cause: &mig_migrate::protocol::Cause) -> String {
    use mig_migrate::protocol::Cause;
    use mig_migrate::wire::{AbortReason as A, RefuseReason as R};
    let abort = |a: &A| match a {
        A::FreezeFailed => "freezing the container failed",
        A::DumpFailed => "the checkpoint (criu dump) failed",
        A::SendFailed => "sending the files failed",
        A::BadFile => "a file arrived damaged or could not be written",
        A::TransferIncomplete => "files were missing at the end of the transfer",
        A::RestoreFailed => "the restore (criu restore) failed",
        A::ResumeFailed => "resuming the restored container failed",
        A::Timeout => "a phase timed out",
        A::ProtocolViolation => "a peer sent an unexpected message",
        A::JournalFailed => "writing the migration journal failed",
        A::Cancelled => "it was cancelled",
    };
    match cause {
        Cause::Refused(r) => format!(
            "the destination refused it: {}",
            match r {
                R::NameClash => "a container with that id or name is already there",
                R::DiskFull => "not enough disk space",
                R::CriuVersion => "its CRIU is missing or older than this host's",
                R::Kernel => "its kernel lacks something the container needs",
                R::InvalidSpec => "the container's spec or image is invalid there",
                R::Busy => "another migration of the container is in progress",
                R::Policy => "its policy refuses it",
            }
        ),
        Cause::Local(a) => format!("on this host: {}", abort(a)),
        Cause::Peer(a) => format!("on the destination: {}", abort(a)),
        Cause::LinkLost => "the link to the destination was lost".into(),
        Cause::Resolution => "settled with the destination after the link was lost".into(),
        Cause::Operator => "an operator decided".into(),
    }
}

/// Where a rolled-back move keeps CRIU's dump log: beside the container's records, as the
/// move's work directory (`<container>/migration`) goes.
fn kept_dump_log(work: &Path) -> Option<PathBuf> {
    work.parent().map(|dir| dir.join("move-dump.log"))
}

/// Keeps the dump log of a move that is being rolled back (the error names it).
fn keep_dump_log(work: &Path) {
    let from = work.join("images").join("dump.log");
    if let Some(to) = kept_dump_log(work).filter(|_| from.is_file()) {
        if let Err(e) = std::fs::rename(&from, &to) {
            tracing::warn!(from = %from.display(), error = %e, "cannot keep the dump log");
        }
    }
}

/// `detail` naming the dump log where it was kept instead of the removed work directory, and
/// the cause of a CRIU failure users meet that its own words do not make plain.
fn kept_log_named(work: &Path, detail: String) -> String {
    let from = work.join("images").join("dump.log");
    let detail = match kept_dump_log(work) {
        Some(to) if to.is_file() => {
            detail.replace(&from.display().to_string(), &to.display().to_string())
        }
        _ => detail,
    };
    match super::criu_failure_hint(&detail) {
        Some(hint) => format!("{detail} ({hint})"),
        None => detail,
    }
}

#[cfg(test)]
mod kept_log_tests {
    use super::{keep_dump_log, kept_log_named};

    /// A rolled-back move's error names a log that exists: the dump log moves beside the
    /// container's records before the work directory goes (it named a removed file before).
    #[test]
    fn the_dump_log_of_a_rolled_back_move_is_kept_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("migration");
        std::fs::create_dir_all(work.join("images")).unwrap();
        std::fs::write(
            work.join("images/dump.log"),
            "Error (criu/fsnotify.c:284)\n",
        )
        .unwrap();
        let detail = format!(
            "criu dump failed (exit status: 1), log {}: Error",
            work.join("images/dump.log").display()
        );
        keep_dump_log(&work);
        std::fs::remove_dir_all(&work).unwrap();
        let kept = dir.path().join("move-dump.log");
        assert_eq!(
            kept_log_named(&work, detail),
            format!(
                "criu dump failed (exit status: 1), log {}: Error",
                kept.display()
            )
        );
        assert!(std::fs::read_to_string(&kept).unwrap().contains("fsnotify"));
        let overlay_watch = kept_log_named(
            &work,
            "Error (criu/fsnotify.c:284): fsnotify: \tCan't dump that handle".into(),
        );
        assert!(
            overlay_watch.contains("inotify or fanotify"),
            "{overlay_watch}"
        );
    }
}

#[cfg(test)]
mod cause_tests {
    use super::cause_words;
    use mig_migrate::protocol::Cause;
    use mig_migrate::wire::{AbortReason, RefuseReason};

    #[test]
    fn causes_are_words() {
        for c in [
            Cause::Refused(RefuseReason::NameClash),
            Cause::Local(AbortReason::DumpFailed),
            Cause::Peer(AbortReason::RestoreFailed),
            Cause::LinkLost,
        ] {
            let w = cause_words(&c);
            assert!(!w.contains("NameClash") && !w.contains("Failed"), "{w}");
        }
        assert_eq!(
            cause_words(&Cause::Refused(RefuseReason::NameClash)),
            "the destination refused it: a container with that id or name is already there"
        );
    }
}
