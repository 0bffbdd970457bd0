//! Stream mode's memory presync on this agent (`mig_migrate::memsync`, docs/migration.md
//! "Memory presync"): the source sends the container's memory while it runs and then, frozen,
//! only the pages that changed; the destination keeps the presync's pages for its page writer.

use mig_migrate::memsync::dedup::DedupStats;
use mig_migrate::memsync::stream::{self, Proc};
use mig_migrate::memsync::{SentIndex, PAGE};
use mig_migrate::transport::tunnel::{Service, TunnelHeader};
use mig_runtime::pidmap::PidEntry;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// The environment variable of migd that turns the memory presync off (`0`) on the source; on
/// by default with a destination speaking protocol 1.4.
pub const MEMORY_PRESYNC_ENV: &str = "MIG_MEMORY_PRESYNC";

/// The protocol minor that brought the presync.
pub const MEMORY_PRESYNC_MINOR: u16 = 4;

/// Whether this agent, as a source, presyncs memory ([`MEMORY_PRESYNC_ENV`], read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(MEMORY_PRESYNC_ENV).as_deref() != Ok("0");
        tracing::info!(on, "stream-mode memory presync ({MEMORY_PRESYNC_ENV})");
        on
    })
}

/// What a move's memory presync did (`mig move --json`: `memory_presync`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPresyncReport {
    /// Time of the presync, while the container ran (inside `presync_ms`).
    pub ms: u64,
    /// Processes whose memory was read.
    pub processes: u32,
    /// Bytes of pages sent while the container ran.
    pub bytes: u64,
    /// Whether it stopped before the end: the destination's bound (half its free disk) or the
    /// presync's time limit (240 s); the rest of the memory went while frozen.
    pub capped: bool,
    /// Pages of the dump the destination took from the presync (unchanged since).
    pub pages_reused: u64,
    /// Pages of the dump sent with their data while frozen (changed, or not presynced).
    pub pages_sent_frozen: u64,
    /// Why the presync failed, if it did (the move then sent every page while frozen).
    pub error: Option<String>,
}

/// The source's presync state for one move.
#[derive(Debug, Default)]
pub(crate) struct SourcePresync {
    /// The move asked for none (`mig move --no-memory-presync`).
    pub off: std::sync::atomic::AtomicBool,
    index: Mutex<Option<Arc<SentIndex>>>,
    report: Mutex<Option<MemoryPresyncReport>>,
    /// Page bytes handed to the presync stream so far (its progress).
    pub sent: std::sync::atomic::AtomicU64,
    pub stats: Arc<DedupStats>,
}

impl SourcePresync {
    /// Sends the memory of `procs` to the destination on `conn`. A failure is logged and
    /// reported; the move then goes on without it (every page is sent while frozen).
    pub async fn run(&self, conn: &quinn::Connection, migration_id: &str, procs: &[PidEntry]) {
        let procs: Vec<Proc> = procs
            .iter()
            .filter_map(|p| {
                Some(Proc {
                    host_pid: p.host_pid,
                    image_id: u32::try_from(p.ns_pid).ok()?,
                })
            })
            .collect();
        let header = TunnelHeader {
            migration_id: migration_id.to_owned(),
            service: Service::MemoryPresync,
        };
        let t = Instant::now();
        let r = stream::send(conn, &header, procs, &self.sent).await;
        let ms = super::ms(t.elapsed());
        let report = match r {
            Ok((index, stats)) => {
                let bytes = stats.pages * PAGE as u64;
                tracing::info!(migration = %migration_id, ms, bytes, processes = stats.processes, capped = stats.capped, pages_pinned = stats.pages_pinned, "memory presync sent");
                *self.index.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(index));
                MemoryPresyncReport {
                    ms,
                    processes: stats.processes,
                    bytes,
                    capped: stats.capped,
                    ..Default::default()
                }
            }
            Err(e) => {
                let error = super::chain(&e);
                tracing::warn!(migration = %migration_id, %error, "memory presync failed: every page goes while frozen");
                MemoryPresyncReport {
                    ms,
                    // What went before it failed (its progress said so).
                    bytes: self.sent.load(std::sync::atomic::Ordering::Relaxed),
                    error: Some(error),
                    ..Default::default()
                }
            }
        };
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    /// The digests of what the destination holds, when the presync succeeded.
    pub fn index(&self) -> Option<Arc<SentIndex>> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|i| !i.is_empty())
    }

    /// The report, with what the dump's encoder did.
    pub fn report(&self) -> Option<MemoryPresyncReport> {
        let mut r = self
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        r.pages_reused = self.stats.pages_reused.load(Ordering::Relaxed);
        r.pages_sent_frozen = self.stats.pages_sent.load(Ordering::Relaxed);
        Some(r)
    }
}

/// The most presync bytes a destination takes into `dir`: half of the space free there (the
/// files become the dump's pages images, which Prepare's space check counted already).
pub(crate) fn presync_bound(dir: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |s| {
        s.blocks_available().saturating_mul(s.fragment_size()) / 2
    })
}
