//! How `mig move` moves memory ([`MoveMode`]), what the kernel must support for each mode, and
//! the pre-flight: a downtime prediction from the container's memory, the link's measured
//! throughput and the mode, checked against `--max-downtime` before anything is frozen.
//! docs/migration.md ("Modes", "Pre-flight") describes them for users.

use super::fixedcost::{FixedCost, FixedCosts};
use mig_migrate::criu::Criu;
use mig_migrate::wire::MigrationMode;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// How a move transfers the container's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MoveMode {
    /// Stop-and-copy through files: CRIU dumps into the source's disk, every image file is
    /// sent (hashed), then restored.
    Cold,
    /// Stop-and-copy with the pages streamed from the dump straight to the destination (no disk
    /// staging of memory on the source); with a 1.4 destination the memory is first copied
    /// while the container runs, and only the pages that changed since go while frozen.
    Stream,
    /// Post-copy: everything but memory moves while frozen, the container resumes on the
    /// destination and its pages are served on demand from the source until the last one.
    Lazy,
    /// Iterative pre-dumps while the container runs (needs soft-dirty memory tracking).
    Precopy,
    /// The fastest stop-and-copy mode, or `lazy` when its predicted downtime exceeds
    /// `--max-downtime`.
    Auto,
}

impl MoveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveMode::Cold => "cold",
            MoveMode::Stream => "stream",
            MoveMode::Lazy => "lazy",
            MoveMode::Precopy => "precopy",
            MoveMode::Auto => "auto",
        }
    }

    /// The mode announced in Prepare.
    pub(crate) fn wire(self) -> MigrationMode {
        match self {
            MoveMode::Stream => MigrationMode::Stream,
            MoveMode::Lazy => MigrationMode::PostCopy,
            _ => MigrationMode::PreCopy,
        }
    }
}

/// The mode a move uses when none is given: the fastest stop-and-copy (docs/performance.md).
/// Post-copy is never the default: it leaves the container depending on the source.
pub const DEFAULT_MODE: MoveMode = MoveMode::Stream;
/// The stop-and-copy mode `auto` picks when the prediction fits.
const AUTO_STOP_AND_COPY: MoveMode = MoveMode::Stream;

/// Why a mode cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("--mode precopy needs soft-dirty memory tracking, which this kernel lacks (criu check --feature mem_dirty_track: {detail}); use --mode stream or --mode lazy")]
    NoDirtyTracking { detail: String },
    #[error("--mode precopy refused: {peer} speaks protocol {version}, and pre-copy needs a 1.2 destination (it keeps the pre-dump rounds and links them for the restore); nothing was frozen; use --mode stream or --mode lazy")]
    PrecopyPeerTooOld { peer: String, version: String },
    #[error("--mode lazy needs userfaultfd for non-cooperative processes (criu check --feature uffd-noncoop: {detail})")]
    NoUffd { detail: String },
    #[error("--mode lazy cannot move a container with a user namespace on this host: its restored tasks open userfaultfd from inside that namespace, which the kernel refuses (vm.unprivileged_userfaultfd = 0); nothing was frozen; use --mode stream or --mode cold")]
    LazyUserns,
    #[error("cannot {op} {name}: it has both a user namespace (--userns) and a bridge network (--net bridge), and this CRIU cannot restore that combination (criu restore: couldn't restore veth interface eth0 via usernsd), so no host could restore it; nothing was frozen, it keeps running here (docs/networking.md)")]
    UsernsBridge { op: String, name: String },
    #[error("--mode lazy cannot run here")]
    PipeMaxSize(#[source] mig_migrate::criu::CriuError),
    #[error("criu is not usable: {0}")]
    NoCriu(String),
    #[error("predicted downtime {predicted_ms} ms exceeds the limit of {max_ms} ms (--max-downtime, max_downtime_ms) (mode {mode}, {memory_bytes} bytes of memory at about {throughput_mib_s} MiB/s, {basis}; {tasks}; {fixed}); the container was not touched")]
    TooSlow {
        predicted_ms: u64,
        max_ms: u64,
        mode: &'static str,
        memory_bytes: u64,
        /// "2 processes, 3 threads, 120 memory mappings", and the writable layer's part
        /// ([`Preflight::describe_layer`]).
        tasks: String,
        throughput_mib_s: u64,
        /// Where the throughput came from ([`Throughput::describe`]).
        basis: String,
        /// The fixed costs and where they came from ([`FixedCost::describe`]).
        fixed: String,
    },
}

/// `criu check --feature NAME`: `Ok` when supported, else CRIU's reason.
pub fn check_feature(criu: &Criu, feature: &str) -> Result<(), String> {
    let out = std::process::Command::new(criu.path())
        .args(["check", "--feature", feature])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run criu: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let line = mig_migrate::criu::pick_error_lines(&text)
        .pop()
        .or_else(|| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("exit status {}", out.status));
    Err(line.trim().to_owned())
}

/// Refuses a mode the kernel (or the machine's settings) cannot run. Blocking (runs `criu`).
pub fn check_mode(criu: &Criu, mode: MoveMode) -> Result<(), ModeError> {
    match mode {
        MoveMode::Precopy => check_feature(criu, "mem_dirty_track")
            .map_err(|detail| ModeError::NoDirtyTracking { detail }),
        MoveMode::Lazy => {
            check_feature(criu, "uffd-noncoop").map_err(|detail| ModeError::NoUffd { detail })?;
            mig_migrate::criu::check_pipe_max_size().map_err(ModeError::PipeMaxSize)
        }
        _ => Ok(()),
    }
}

/// Whether a task inside a user namespace may open a userfaultfd (`vm.unprivileged_userfaultfd`
/// = 1). A restore with lazy pages needs it for a `--userns` container: CRIU's restored tasks
/// open their userfaultfd themselves, without CAP_SYS_PTRACE in the initial user namespace.
pub(crate) fn userns_may_use_uffd() -> bool {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").is_ok_and(|s| s.trim() == "1")
}

/// Refuses the mode the pre-flight picked when this container cannot use it here (lazy for a
/// `--userns` container where user namespaces may not use userfaultfd). Stream mode's restore
/// without copying memory needs the same, and falls back to copying on the destination.
pub fn check_container(mode: MoveMode, userns: bool) -> Result<(), ModeError> {
    if mode == MoveMode::Lazy && userns && !userns_may_use_uffd() {
        return Err(ModeError::LazyUserns);
    }
    Ok(())
}

/// Refuses to dump (`op`: checkpoint, move) container `name` when its checkpoint could not be
/// restored by any host: a `--userns` container with a `--net bridge` veth (CRIU creates the veth
/// through usernsd, which fails with EOPNOTSUPP: QA session 16, workloads #2). Checked before
/// anything is frozen, as lazy + userns is by [`check_container`].
pub fn check_restorable(op: &str, name: &str, userns: bool, bridge: bool) -> Result<(), ModeError> {
    if userns && bridge {
        return Err(ModeError::UsernsBridge {
            op: op.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Throughput assumed for a peer never measured (bytes/s): QUIC between two agents under load
/// on this class of machine.
const DEFAULT_THROUGHPUT: u64 = 150 << 20;
/// Transfers smaller than this say little about the link's throughput.
const MIN_SAMPLE: u64 = 4 << 20;

/// The last throughput measured to each peer (bytes/s), from presync and final transfers.
static THROUGHPUT: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Records a transfer of `bytes` in `ms` to `peer` (ignored when too small to mean anything).
pub fn record_throughput(peer: &str, bytes: u64, ms: u64) {
    if bytes < MIN_SAMPLE || ms == 0 {
        return;
    }
    let rate = bytes.saturating_mul(1000) / ms;
    let mut g = THROUGHPUT.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(peer.to_owned(), rate);
}

/// The throughput to expect to `peer` (bytes/s): the last measured, else a default.
pub fn throughput(peer: &str) -> u64 {
    known_throughput(peer).bytes_s
}

/// Where a prediction's throughput came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThroughputSource {
    /// The link probe of this move, on its own connection (protocol 1.2 destination).
    Probe,
    /// The last transfer of an earlier move to the same peer.
    Previous,
    /// Nothing measured to this peer yet (first move since the agent started, 1.1 or older
    /// destination): [`DEFAULT_THROUGHPUT`].
    Default,
}

impl ThroughputSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ThroughputSource::Probe => "probe",
            ThroughputSource::Previous => "previous",
            ThroughputSource::Default => "default",
        }
    }
}

/// A throughput and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throughput {
    /// Bytes/s.
    pub bytes_s: u64,
    pub source: ThroughputSource,
    /// The probe that measured it (source `Probe`).
    pub probe: Option<super::probe::ProbeInfo>,
}

impl Throughput {
    /// From this move's probe.
    pub fn probed(probe: super::probe::ProbeInfo) -> Throughput {
        Throughput {
            bytes_s: probe.bytes_s.max(1),
            source: ThroughputSource::Probe,
            probe: Some(probe),
        }
    }

    /// Where the figure came from, for messages.
    pub fn describe(&self) -> String {
        match (self.source, &self.probe) {
            (ThroughputSource::Probe, Some(p)) => format!(
                "measured by this move's link probe: {} bytes in {} ms",
                p.bytes, p.ms
            ),
            (ThroughputSource::Probe, None) => "measured by this move's link probe".into(),
            (ThroughputSource::Previous, _) => {
                "measured by an earlier move to this peer (no probe)".into()
            }
            (ThroughputSource::Default, _) => {
                "the default: nothing measured to this peer yet (no probe)".into()
            }
        }
    }
}

/// What this agent knows of the throughput to `peer` without probing: the last measured,
/// else the default.
pub fn known_throughput(peer: &str) -> Throughput {
    let last = THROUGHPUT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(peer).copied());
    match last {
        Some(bytes_s) => Throughput {
            bytes_s,
            source: ThroughputSource::Previous,
            probe: None,
        },
        None => Throughput {
            bytes_s: DEFAULT_THROUGHPUT,
            source: ThroughputSource::Default,
            probe: None,
        },
    }
}

/// Records the throughput a probe measured to `peer` (any size: the probe is sized for it).
pub fn record_probe(peer: &str, bytes_s: u64) {
    if bytes_s == 0 {
        return;
    }
    let mut g = THROUGHPUT.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(peer.to_owned(), bytes_s);
}

/// The memory a checkpoint of a container with cgroup usage `u` holds, and the shared part of
/// it: anonymous plus shared memory (page cache is charged to the cgroup but not dumped: QA of
/// session 19 saw a container that had read a large file predicted at minutes). A host whose
/// cgroup gives no breakdown falls back to the whole usage.
pub fn checkpoint_memory(u: &mig_runtime::cgroup::Usage) -> (u64, u64) {
    match u.anon_bytes + u.shmem_bytes {
        0 => (u.memory_bytes, 0),
        m => (m, u.shmem_bytes),
    }
}

/// [`checkpoint_memory`] as a dump of the container's processes will hold it: their anonymous
/// pages each (a `fork`'s copy-on-write pages once per process, as CRIU dumps them: QA saw a
/// 203 MiB shell whose subshells made it send 1.3 GiB, predicted as 203 MiB), and the shared
/// memory mapped and resident plus the files of its tmpfs mounts, at most what the cgroup
/// counts as shared (a ZGC heap's memfd, committed but untouched, is charged but not dumped:
/// QA saw 2.3 s predicted for a 0.9 s move). The cgroup's figures when the processes' page
/// tables could not be read.
pub fn dumped_memory(
    u: &mig_runtime::cgroup::Usage,
    mapped: Option<mig_runtime::pidmap::MappedMemory>,
    tmpfs_bytes: u64,
) -> (u64, u64) {
    let Some(m) = mapped else {
        return checkpoint_memory(u);
    };
    let mut shared = m.shmem_bytes.saturating_add(tmpfs_bytes);
    if u.anon_bytes + u.shmem_bytes > 0 {
        shared = shared.min(u.shmem_bytes);
    }
    (m.anon_bytes.saturating_add(shared), shared)
}

/// Inputs of a downtime prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preflight {
    /// The container's memory a checkpoint holds: anonymous and shared (the cgroup's, page cache
    /// left out: CRIU does not dump it).
    pub memory_bytes: u64,
    /// Of `memory_bytes`, the shared memory (`MAP_SHARED` mappings, System V segments, tmpfs
    /// files): the memory presync copies private memory only, and post-copy serves private
    /// memory only, so this crosses while frozen in every mode.
    pub shared_bytes: u64,
    /// The writable layer: copied while the container runs, then only what changed since
    /// crosses while frozen.
    pub upper_bytes: u64,
    /// Of the writable layer, the bytes of the files changed within [`UPPER_RECENT_SECS`]
    /// before the move, when counted: the layer is assumed to change at that rate while its
    /// presync runs, and that much to cross again while frozen. Without a count, [`super::precopy::
    /// ASSUMED_DIRTY_RATE`] over the presync (QA of session 32, F2: a 450 MiB layer of
    /// unchanging files on an 11 MiB/s link was predicted at 39 s, all taken as changed; the
    /// move took 162 ms).
    pub upper_recent_bytes: Option<u64>,
    /// The container's processes: CRIU seizes, dumps and recreates each one while frozen.
    pub processes: u64,
    /// Their threads, all together (at least `processes`): CRIU seizes, dumps and recreates
    /// each thread too.
    pub threads: u64,
    /// Their memory mappings, all together (`/proc/PID/maps` lines): CRIU dumps and recreates
    /// each one while frozen.
    pub mappings: u64,
    /// Link throughput, bytes/s.
    pub throughput: u64,
    /// Stream mode sends the memory while the container runs first (a 1.4 destination,
    /// docs/migration.md "Memory presync").
    pub memory_presync: bool,
    /// A stream destination restores every page before the resume instead of through its local
    /// lazy-pages daemon: for processes that share memory copy-on-write (the per-process memory
    /// is above what the cgroup holds), which only a plain restore keeps shared, and for a
    /// user-namespace container that cannot use userfaultfd. The restore then reads every
    /// process's pages while frozen (QA of session 23: 31 forked processes sharing 274 MiB took
    /// 4.7 s to restore, predicted as a 3.5 s move in all).
    pub restored_plain: bool,
    /// The fixed part of each mode's downtime: learned from this agent's moves to the peer,
    /// else [`DEFAULT_FIXED_MS`] ([`super::fixedcost`]).
    pub fixed: FixedCosts,
    /// How much of the private memory the container rewrote over a short window before the
    /// move; without one, the memory presync's estimate assumes [`super::precopy::
    /// ASSUMED_DIRTY_RATE`].
    pub dirty: Option<DirtySample>,
}

/// A sample of the container's private pages read twice, `window_ms` apart, before the move
/// (`mig_migrate::memsync::reader::sample_rewrites`): `changed` of `sampled` differed. This
/// kernel has no dirty-page tracking; the sample tells a container idle on its memory from one
/// rewriting it (QA of session 24: an idle 256 MiB container on a 23 MiB/s link was predicted
/// at 16.5 s, all its memory taken as rewritten during the presync's 11 s; it took 0.4 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtySample {
    pub changed: u32,
    pub sampled: u32,
    pub window_ms: u64,
}

/// The writable layer's files changed within this many seconds before a move are taken as
/// changing: the pre-flight counts them as crossing again while frozen ([`Preflight::
/// upper_recent_bytes`]).
pub const UPPER_RECENT_SECS: u64 = 60;

/// How long the pre-flight's sample of the memory waits between its two reads (it runs while
/// the link is probed).
pub const DIRTY_WINDOW_MS: u64 = 150;
/// Pages the pre-flight samples.
pub const DIRTY_SAMPLE_PAGES: usize = 2048;

impl DirtySample {
    /// Of `private` bytes, those a presync of `ms` leaves changed: each window rewrites the
    /// sampled share of the pages, at random (with none seen, half a sampled page's share, the
    /// sample's resolution), over half the presync on average (a page copied early is exposed
    /// to the end, one copied late hardly at all; QA of session 24: counting the whole presync
    /// predicted a busy container on a slow link at 2.2 to 2.9 times its downtime).
    fn changed_over(&self, private: u64, ms: u64) -> u64 {
        let share = (f64::from(self.changed).max(0.5) / f64::from(self.sampled.max(1))).min(1.0);
        let windows = ms as f64 / 2.0 / self.window_ms.max(1) as f64;
        let kept = (1.0 - share).powf(windows);
        ((private as f64) * (1.0 - kept)).min(private as f64) as u64
    }
}

// Costs measured on the 2-core test machine (docs/migration.md, docs/performance.md), rounded
// towards a longer downtime: the bench of 2026-12-02 21:26 UTC (quiet machine) had lazy mode's
// whole downtime at 126 to 238 ms and cold mode's dump and restore at about 1.9 GiB/s each.
// The two fixed costs are the defaults only: once this agent has moved a container to a peer
// in a mode, the pre-flight uses what those moves measured instead (`super::fixedcost`).
/// Freeze, CRIU start, parasite, non-memory images: the part of a dump that does not grow.
const DUMP_FIXED_MS: u64 = 100;
/// CRIU writing pages to a local disk, bytes/s.
const DUMP_RATE: u64 = 1 << 30;
/// SHA-256 while sealing and again when the destination verifies, bytes/s per pass.
const HASH_RATE: u64 = 1400 << 20;
/// Restore without memory: rootfs, cgroup, CRIU fork and namespaces, freeze, commit.
const RESTORE_FIXED_MS: u64 = 150;
/// The fixed part of a downtime before any move was measured: dump and restore.
pub const DEFAULT_FIXED_MS: u64 = DUMP_FIXED_MS + RESTORE_FIXED_MS;
/// Pages read and mapped back by `criu restore`, bytes/s.
const RESTORE_RATE: u64 = 1 << 30;
/// Stream mode's pages cross at this share of the probed QUIC throughput (numerator,
/// denominator): the probe is QUIC alone, while the pages also pass CRIU's page protocol, a
/// socketpair on each side and the destination's page cache on the same cores. 0.66 to 0.68 in
/// the bench of 2026-12-02 21:26 UTC (1 GiB: 637 to 693 MiB/s of pages over the dump phase,
/// against probes of 954 to 1018 MiB/s).
const TUNNEL_SHARE: (u64, u64) = (2, 3);
/// Stream mode after a memory presync: the dump still streams every page to this agent, which
/// digests each one to find the few that changed, bytes/s. About 3.3 GiB/s in the runs of
/// 2026-12-03 08:11 UTC (256 MiB: 79 ms, 1 GiB: 299 ms past the fixed part of the dump), 3.7
/// GiB/s in session 15's bench (21:37 UTC: dumps of 58 to 60 ms at 64 MiB, 298 to 324 ms at
/// 1 GiB). 2 GiB/s made the prediction of a 1 GiB move 1.8x the downtime measured.
const PRESYNC_SCAN_RATE: u64 = 3 << 30;
/// Each process past the first, dumped and restored while frozen. 14.5 ms in the runs of
/// 2026-12-04 06:55 UTC (stream mode, busybox sleeps: 100 ms of downtime with 1 process, 745
/// with 50, 2.2 s with 150, 4.4 to 4.6 s with 300; the dump 8.7 ms and the restore 2 ms of it
/// per process); QA of session 16 saw 5 to 16 s for 301 processes on a loaded machine.
const PER_PROCESS_MS: u64 = 15;
/// Each thread past a process's first, in ms: 1.5 + (those threads) / 400, so that the whole
/// term grows as the square: a dump and a restore spend more per thread the more threads there
/// are. Measured 2026-12-04 10:35 UTC (release build, stream mode, `mig-memload --mib 16
/// --threads N`, medians of 3): 130 ms of downtime with no thread, 376 with 150, 798 with 300,
/// 1750 with 600; the term gives 281, 675, 1800 over the 130 (QA of session 18: 600 threads
/// took 1.4 to 1.9 s, predicted 234 ms without it).
/// The square is of all the container's extra threads together, not per process: measured on
/// one process only, it errs long for many processes with a few threads each, as the model's
/// constants do.
const PER_THREAD_US: u64 = 1500;
/// Each memory mapping, in µs. Measured 2026-12-05 07:38 UTC (release build, a static program
/// holding N small private mappings, load about 0.8): stream mode 263 ms of downtime with 1,013
/// mappings, 1,100 with 20,013 and 2,079 with 40,013 (44 to 46 µs each past the first
/// thousand); lazy mode 1,439 ms with 40,013 (32 µs each). QA of session 25 saw a lazy move of a
/// process with 40,000 mappings predicted at 251 ms take 3,878 on a loaded machine.
const PER_MAPPING_US: u64 = 40;
const THREAD_SQUARE_DIV: u64 = 400;

/// A pre-flight of `mem` bytes of private memory and nothing else, over a 150 MiB/s link, with
/// the default fixed costs: what the model's tests vary one input of.
#[cfg(test)]
pub(crate) fn test_preflight(mem: u64) -> Preflight {
    Preflight {
        memory_bytes: mem,
        shared_bytes: 0,
        upper_bytes: 0,
        upper_recent_bytes: None,
        processes: 1,
        threads: 1,
        mappings: 0,
        throughput: 150 << 20,
        memory_presync: false,
        restored_plain: false,
        fixed: FixedCosts::default(),
        dirty: None,
    }
}

fn ms_for(bytes: u64, rate: u64) -> u64 {
    bytes.saturating_mul(1000) / rate.max(1)
}

impl Preflight {
    /// Predicted downtime (freeze to resumed) of `mode`, in ms. A model, not a promise: fixed
    /// costs ([`Preflight::fixed`]) plus memory over the slowest rate each phase moves it at.
    pub fn predict(&self, mode: MoveMode) -> u64 {
        match mode {
            MoveMode::Precopy => super::precopy::predict(self, None).0,
            _ => self.fixed.get(mode).ms + self.variable_ms(mode),
        }
    }

    /// The part of `mode`'s predicted downtime that grows with the memory, the writable layer
    /// and the number of processes and threads (pre-copy: its whole prediction less the default
    /// fixed costs).
    pub fn variable_ms(&self, mode: MoveMode) -> u64 {
        let m = self.memory_bytes;
        let shared = self.shared_bytes.min(m);
        let upper = ms_for(self.upper_changed(), self.throughput) + self.tasks_ms();
        // Dumped into the images and sent as files, as cold mode does.
        let shared_as_files = ms_for(shared, DUMP_RATE) + ms_for(shared, self.throughput);
        match mode {
            MoveMode::Lazy => shared_as_files + upper,
            MoveMode::Precopy => self.predict(mode).saturating_sub(DEFAULT_FIXED_MS),
            // The pages cross while CRIU dumps them; nothing hashes them, and the restore maps
            // them from a local lazy-pages daemon without copying them first.
            MoveMode::Stream if self.memory_presync => {
                // What changed while the presync ran (at the assumed dirty rate) crosses while
                // frozen; the rest is digested and left where the presync put it.
                let pages = self.throughput / TUNNEL_SHARE.1 * TUNNEL_SHARE.0;
                let private = m - shared;
                let presync_ms = ms_for(private, pages);
                let changed = match self.dirty {
                    Some(d) => d.changed_over(private, presync_ms),
                    None => (super::precopy::ASSUMED_DIRTY_RATE.saturating_mul(presync_ms) / 1000)
                        .min(private),
                };
                ms_for(private, PRESYNC_SCAN_RATE)
                    + ms_for(changed, pages)
                    + ms_for(shared, pages)
                    + upper
                    + self.plain_restore_ms()
            }
            MoveMode::Stream => {
                let pages = self.throughput / TUNNEL_SHARE.1 * TUNNEL_SHARE.0;
                ms_for(m, pages) + upper + self.plain_restore_ms()
            }
            _ => {
                ms_for(m, DUMP_RATE)
                    + 2 * ms_for(m, HASH_RATE)
                    + ms_for(m, self.throughput)
                    + ms_for(m, RESTORE_RATE)
                    + upper
            }
        }
    }

    /// What the pre-flight assumes of the writable layer changes while its presync runs (its size
    /// over the link, at the assumed dirty rate): that much goes again while frozen.
    fn upper_changed(&self) -> u64 {
        let presync_ms = ms_for(self.upper_bytes, self.throughput);
        match self.upper_recent_bytes {
            // The rate at which the layer's files changed lately, over the copy: a file
            // written once a moment ago is not taken as changing again (a container that
            // rewrites a file after the pre-flight is caught right before the freeze).
            Some(recent) => ((recent / UPPER_RECENT_SECS).saturating_mul(presync_ms) / 1000)
                .min(self.upper_bytes),
            None => (super::precopy::ASSUMED_DIRTY_RATE.saturating_mul(presync_ms) / 1000)
                .min(self.upper_bytes),
        }
    }

    /// "; writable layer 450.0 MiB, 12.0 KiB of it assumed to cross again while frozen", for
    /// messages; empty without a layer.
    pub fn describe_layer(&self) -> String {
        if self.upper_bytes == 0 {
            return String::new();
        }
        let size = crate::cli::output::human_size;
        format!(
            "; writable layer {}, {} of it assumed to cross again while frozen ({})",
            size(self.upper_bytes),
            size(self.upper_changed()),
            match self.upper_recent_bytes {
                Some(r) => format!(
                    "{} in files changed in the last {UPPER_RECENT_SECS} s",
                    size(r)
                ),
                None => format!(
                    "changes assumed at {} MiB/s",
                    super::precopy::ASSUMED_DIRTY_RATE >> 20
                ),
            }
        )
    }

    /// What `changed` bytes of the writable layer's files, changed or new since its presync,
    /// add to the downtime beyond what the pre-flight assumed: they are read, hashed, sent and
    /// unpacked while frozen (QA of session 24: a 400 MiB log appended to, sent again whole,
    /// made a move predicted at 91 ms take 2501 ms under `--max-downtime 300`).
    /// A file that only grew goes as its new bytes after its old ones are digested again
    /// (`hashed`, at the presync's digest rate).
    pub fn upper_growth_ms(&self, changed: u64, hashed: u64) -> u64 {
        let cost =
            |b: u64| ms_for(b, self.throughput) + ms_for(b, HASH_RATE) + ms_for(b, RESTORE_RATE);
        cost(changed).saturating_sub(cost(self.upper_changed())) + ms_for(hashed, PRESYNC_SCAN_RATE)
    }

    /// A stream restore that reads every process's pages while frozen ([`Self::restored_plain`]).
    fn plain_restore_ms(&self) -> u64 {
        if self.restored_plain {
            ms_for(self.memory_bytes, RESTORE_RATE)
        } else {
            0
        }
    }

    /// What `growth` bytes of private memory more than the pre-flight saw (processes started or
    /// memory allocated since, which the memory presync did not copy) add to `mode`'s downtime:
    /// in stream mode they cross while frozen; post-copy serves them after the resume.
    pub fn growth_ms(&self, mode: MoveMode, growth: u64) -> u64 {
        match mode {
            MoveMode::Lazy | MoveMode::Precopy => 0,
            MoveMode::Stream => ms_for(growth, self.throughput / TUNNEL_SHARE.1 * TUNNEL_SHARE.0),
            _ => {
                let grown = Preflight {
                    memory_bytes: self.memory_bytes.saturating_add(growth),
                    ..*self
                };
                grown
                    .variable_ms(mode)
                    .saturating_sub(self.variable_ms(mode))
            }
        }
    }

    /// Pre-copy's downtime when the final dump writes `final_bytes` of pages: those are dumped,
    /// hashed and sent while frozen like cold mode's, but the restore maps all the memory
    /// (most of it from the rounds, through CRIU's `parent` links). Its fixed costs are always
    /// the defaults (`super::fixedcost` says why).
    pub fn precopy_final_ms(&self, final_bytes: u64) -> u64 {
        self.tasks_ms()
            + DUMP_FIXED_MS
            + ms_for(final_bytes, DUMP_RATE)
            + 2 * ms_for(final_bytes, HASH_RATE)
            + ms_for(final_bytes, self.throughput)
            + RESTORE_FIXED_MS
            + ms_for(self.memory_bytes, RESTORE_RATE)
            + ms_for(self.upper_changed(), self.throughput)
    }

    /// The dump and send times (ms) of a pre-copy round writing `bytes` while the container
    /// runs (the send hashes as it goes).
    pub fn round_ms(&self, bytes: u64) -> (u64, u64) {
        (
            DUMP_FIXED_MS + ms_for(bytes, DUMP_RATE),
            ms_for(bytes, self.throughput.min(HASH_RATE)),
        )
    }

    /// The mode to use for `asked` and the prediction for it; refuses when the prediction
    /// exceeds `max_ms` (`auto` falls back to lazy first).
    pub fn choose(
        &self,
        asked: MoveMode,
        max_ms: Option<u64>,
    ) -> Result<(MoveMode, u64), ModeError> {
        let mode = if asked == MoveMode::Auto {
            AUTO_STOP_AND_COPY
        } else {
            asked
        };
        let predicted = self.predict(mode);
        let Some(max) = max_ms else {
            return Ok((mode, predicted));
        };
        if predicted <= max {
            return Ok((mode, predicted));
        }
        if asked == MoveMode::Auto {
            let lazy = self.predict(MoveMode::Lazy);
            if lazy <= max {
                return Ok((MoveMode::Lazy, lazy));
            }
            return Err(self.too_slow(MoveMode::Lazy, lazy, max));
        }
        Err(self.too_slow(mode, predicted, max))
    }

    /// What the processes past the first, and the threads past each process's first, add to
    /// any mode's downtime.
    fn tasks_ms(&self) -> u64 {
        let extra = self.threads.saturating_sub(self.processes);
        let threads_ms = extra
            .saturating_mul(PER_THREAD_US)
            .saturating_add(extra.saturating_mul(extra).saturating_mul(1000) / THREAD_SQUARE_DIV)
            / 1000;
        PER_PROCESS_MS
            .saturating_mul(self.processes.saturating_sub(1))
            .saturating_add(threads_ms)
            .saturating_add(self.mappings.saturating_mul(PER_MAPPING_US) / 1000)
    }

    /// "2 processes, 3 threads, 120 memory mappings", for messages.
    pub fn describe_tasks(&self) -> String {
        let n = |count: u64, one: &str, many: &str| {
            format!("{count} {}", if count == 1 { one } else { many })
        };
        format!(
            "{}, {}, {}",
            n(self.processes, "process", "processes"),
            n(self.threads, "thread", "threads"),
            n(self.mappings, "memory mapping", "memory mappings")
        )
    }

    fn too_slow(&self, mode: MoveMode, predicted_ms: u64, max_ms: u64) -> ModeError {
        ModeError::TooSlow {
            predicted_ms,
            max_ms,
            mode: mode.as_str(),
            memory_bytes: self.memory_bytes,
            tasks: format!("{}{}", self.describe_tasks(), self.describe_layer()),
            throughput_mib_s: self.throughput >> 20,
            basis: "as given".into(),
            fixed: self.fixed.get(mode).describe(mode),
        }
    }
}

/// What `mig move` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveOptions {
    /// `None`: [`DEFAULT_MODE`].
    pub mode: Option<MoveMode>,
    pub max_downtime_ms: Option<u64>,
    /// Stream mode without the memory presync (every page while frozen).
    pub no_memory_presync: bool,
}

impl MoveOptions {
    /// Refuses options that mean nothing together, rather than ignoring them (QA of session 30,
    /// F2): only stream mode (and auto's stream) copies memory while the container runs.
    pub(crate) fn check(&self) -> Result<(), crate::api::ApiError> {
        match self.mode {
            Some(mode @ (MoveMode::Cold | MoveMode::Lazy | MoveMode::Precopy))
                if self.no_memory_presync =>
            {
                Err(crate::api::ApiError::new(
                    crate::api::ErrorKind::InvalidArgument,
                    format!(
                        "--no-memory-presync (no_memory_presync) is for stream mode: --mode {} has no memory presync; nothing was done",
                        mode.as_str()
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The pre-flight's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub mode: MoveMode,
    pub predicted_ms: u64,
    /// The throughput the prediction used, bytes/s.
    pub throughput: u64,
    /// Where it came from, and the probe's figures.
    pub basis: Throughput,
    /// The fixed part of `predicted_ms` and where it came from.
    pub fixed: FixedCost,
    /// The rest of `predicted_ms`: what the model puts on the memory and the writable layer.
    /// After the move, its measured downtime less this is what the move teaches
    /// ([`super::fixedcost::record`]).
    pub variable_ms: u64,
    /// What the prediction was made from.
    pub preflight: Preflight,
}

/// Before connecting: refuses a mode asked by name that this kernel cannot run (`precopy`
/// before any prediction: the kernel decides, not the numbers; `lazy`).
pub async fn check_asked(opts: MoveOptions) -> Result<(), ModeError> {
    check_blocking(opts.mode.unwrap_or(DEFAULT_MODE)).await
}

/// Pre-flight of a move: picks the mode, predicts its downtime from `link` (this move's probe,
/// else [`known_throughput`]) and `fixed` (what earlier moves to the peer measured, else the
/// defaults: [`super::fixedcost::known`]), refuses what exceeds `max_downtime_ms` or what this
/// kernel cannot run. Nothing is frozen or sent yet. A mode asked by name was checked by
/// [`check_asked`]; one `auto` picks is checked here.
pub async fn plan(
    opts: MoveOptions,
    (memory_bytes, shared_bytes): (u64, u64),
    (upper_bytes, upper_recent_bytes): (u64, Option<u64>),
    (processes, threads, mappings): (u64, u64, u64),
    link: Throughput,
    (memory_presync, restored_plain, dirty): (bool, bool, Option<DirtySample>),
    fixed: FixedCosts,
) -> Result<Plan, ModeError> {
    let pf = Preflight {
        memory_bytes,
        shared_bytes,
        upper_bytes,
        upper_recent_bytes,
        processes,
        threads: threads.max(processes),
        mappings,
        throughput: link.bytes_s,
        memory_presync: memory_presync && !opts.no_memory_presync,
        restored_plain,
        fixed,
        dirty,
    };
    let asked = opts.mode.unwrap_or(DEFAULT_MODE);
    let (mode, predicted_ms) = pf
        .choose(asked, opts.max_downtime_ms)
        .map_err(|e| match e {
            ModeError::TooSlow {
                predicted_ms,
                max_ms,
                mode,
                memory_bytes,
                tasks,
                throughput_mib_s,
                fixed,
                ..
            } => ModeError::TooSlow {
                predicted_ms,
                max_ms,
                mode,
                memory_bytes,
                tasks,
                throughput_mib_s,
                basis: link.describe(),
                fixed,
            },
            e => e,
        })?;
    if mode != asked {
        check_blocking(mode).await?;
    }
    Ok(Plan {
        mode,
        predicted_ms,
        throughput: pf.throughput,
        basis: link,
        fixed: pf.fixed.get(mode),
        variable_ms: predicted_ms.saturating_sub(pf.fixed.get(mode).ms),
        preflight: pf,
    })
}

async fn check_blocking(mode: MoveMode) -> Result<(), ModeError> {
    if !matches!(mode, MoveMode::Lazy | MoveMode::Precopy) {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        let criu = Criu::locate().map_err(|e| ModeError::NoCriu(e.to_string()))?;
        check_mode(&criu, mode)
    })
    .await
    .unwrap_or_else(|e| Err(ModeError::NoCriu(e.to_string())))
}

#[cfg(test)]
mod tests;
