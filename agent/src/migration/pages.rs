//! Memory pages that do not travel as files: CRIU's page server protocol carried through a
//! tunnel on the migration connection (`mig_migrate::transport::tunnel`).
//!
//! - `stream`: the source's `criu dump --ps-socket` holds one end of a socketpair and its agent
//!   carries the other end over one QUIC stream (no loopback TCP). The destination starts
//!   `criu page-server --ps-socket` at Prepare on one end of a socketpair and the tunnel carries
//!   the stream to the other; with `MIG_PAGE_SINK=mig` in migd's environment its agent writes the
//!   stream into its staging images dir itself instead (`mig_migrate::criu::page_writer`, the
//!   same files, without that process and its socket hop; not faster on the test machine,
//!   docs/performance.md "Session 8"). After the dump the destination waits for the page server
//!   (or the writer) to end cleanly and adds the page images to the received manifest
//!   by size (`imageset::add_page_server_images`): they came inside the authenticated QUIC
//!   connection, and hashing them cost a fifth of both cores during the dump
//!   (docs/performance.md).
//! - `lazy` (post-copy): the source's `criu dump --lazy-pages --ps-socket` serves pages on one
//!   end of a socketpair, the destination's `criu lazy-pages --page-server --ps-socket` fetches
//!   them through one end of another, and the agents carry the other ends over one QUIC stream
//!   (no loopback TCP; a 0.1.0 peer's loopback TCP end still meets ours, as in stream mode).
//!   With `MIG_LAZY_PREFETCH=1` in migd's environment, a prefetching proxy
//!   (`mig_migrate::criu::lazy_proxy`) sits between the daemon and the tunnel on the
//!   destination: it asks the source for every lazy page in large requests once the container
//!   runs (after Commit) and answers the daemon from what came. Off by default (no gain measured
//!   in the full bench run).
//!   The source keeps serving until the daemon has every page; the destination keeps the
//!   connection until then and kills the container if the daemon fails (its missing memory
//!   would otherwise read as zeros).
//!
//! Each agent keeps the CRIU processes and tunnels of its migrations in a registry keyed by
//! migration id; [`resolve`] answers the tunnel's "where does this service listen".

use super::modes::MoveMode;
use super::postcopy::{PostcopyGuard, PostcopyMarker};
use crate::daemon::events::EventKind;
use crate::daemon::Agent;
use mig_migrate::criu::lazy_proxy::{self, LazyProxyError};
use mig_migrate::criu::page_writer::{self, PageSink, PageWait};
use mig_migrate::criu::{
    Background, Criu, DumpOpts, LazyDump, LazyPagesOpts, PageServerOpts, PageTarget,
};
use mig_migrate::imageset;
use mig_migrate::memsync::stream::PresyncSink;
use mig_migrate::memsync::PresyncImages;
use mig_migrate::transport::tunnel::{self, Endpoint, Service, Tunnel, TunnelHeader};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long CRIU helpers may take to become ready.
const READY: Duration = Duration::from_secs(20);
/// How long the destination waits for its page server to end after the dump.
const PAGE_SERVER_END: Duration = Duration::from_secs(60);
/// Work directory of the destination's lazy-pages daemon, in the container directory; the
/// shim's restore runs lazily when `lazy-pages.socket` exists there.
pub const LAZY_DIR: &str = "lazy-pages";
const LOCALHOST: &str = "127.0.0.1";

/// Why moving pages failed.
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("cannot make the page server's socket pair")]
    SocketPair(#[source] std::io::Error),
    #[error("cannot start criu {what}")]
    Start {
        what: &'static str,
        #[source]
        source: mig_migrate::criu::CriuError,
    },
    #[error("the page server failed")]
    PageServer(#[source] mig_migrate::criu::CriuError),
    #[error("cannot create the images directory {path}")]
    ImagesDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the page writer failed")]
    PageWriter(#[source] page_writer::PageWriterError),
    #[error("cannot open the tunnel")]
    Tunnel(#[source] mig_migrate::transport::tunnel::TunnelError),
    #[error("the migration connection is not available for the tunnel")]
    NoConnection,
    #[error("cannot add the page images to the manifest")]
    Manifest(#[source] imageset::ImageSetError),
    #[error("cannot set up the prefetching proxy")]
    LazyMap(#[source] LazyProxyError),
    #[error("cannot start the prefetching proxy")]
    LazyProxy(#[source] std::io::Error),
    #[error("background task failed: {0}")]
    Task(String),
}

/// What one migration runs for its pages on this agent.
#[derive(Default)]
struct Job {
    /// Destination, stream: `criu page-server` (`MIG_PAGE_SINK=criu`).
    page_server: Option<Background>,
    /// Destination, stream: the outcome of mig's page writer.
    page_writer: Option<PageWait>,
    /// Where a tunnelled service of this migration listens (a Unix socket is used once).
    serves: HashMap<Service, Endpoint>,
    /// Destination, lazy: the daemon and the tunnel to the source.
    lazy_daemon: Option<Background>,
    /// Destination: the daemon serves the pages of this host's images (stream mode), not the
    /// source's.
    lazy_local: bool,
    /// Destination, lazy: the prefetching proxy between the daemon and the tunnel, and what
    /// starts its prefetch once the container runs.
    lazy_proxy: Option<ProxyThread>,
    prefetch_gate: Option<lazy_proxy::PrefetchGate>,
    /// Destination, lazy: stops the container when the source's pages end first.
    guard: Option<Arc<PostcopyGuard>>,
    tunnel: Option<Tunnel>,
    /// Destination, stream: where the dump's images go, and the memory presync's pages once
    /// they all arrived (for a deduplicated page stream, `Service::PageServerDedup`).
    images_dir: Option<PathBuf>,
    presync: Option<Arc<Mutex<Option<Arc<PresyncImages>>>>>,
    /// Destination, stream: the most page bytes the source may send on each of the dump's
    /// page stream and the memory presync (`migd --max-incoming-bytes`).
    max_bytes: Option<u64>,
}

/// The thread running a prefetching proxy, and its outcome.
type ProxyThread = std::thread::JoinHandle<Result<lazy_proxy::Summary, LazyProxyError>>;

static JOBS: Mutex<Option<HashMap<String, Job>>> = Mutex::new(None);

/// Migrations whose post-copy failed here: the watcher emitted their `migration_done`
/// (`postcopy_failed`), so the connection's end must not emit another (`committed`).
static POSTCOPY_FAILED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether the post-copy of `migration_id` failed (and its `migration_done` is out); asks once.
pub(crate) fn take_postcopy_failed(migration_id: &str) -> bool {
    let mut failed = POSTCOPY_FAILED.lock().unwrap_or_else(|p| p.into_inner());
    let before = failed.len();
    failed.retain(|id| id != migration_id);
    failed.len() != before
}

fn with_jobs<T>(f: impl FnOnce(&mut HashMap<String, Job>) -> T) -> T {
    let mut g = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// Where the service a tunnel stream names listens on this agent.
pub(crate) fn resolve(h: &TunnelHeader) -> Option<Endpoint> {
    with_jobs(|j| {
        let job = j.get_mut(&h.migration_id)?;
        if h.service == Service::PageServerDedup {
            return dedup_writer(&h.migration_id, job);
        }
        let serves = &mut job.serves;
        match serves.get(&h.service)? {
            Endpoint::Tcp(a) => Some(Endpoint::Tcp(*a)),
            Endpoint::Unix(_)
            | Endpoint::UnixBounded { .. }
            | Endpoint::Pages(_)
            | Endpoint::Presync(_) => serves.remove(&h.service),
        }
    })
}

/// Destination, stream, after a memory presync: mig's page writer, taking the pages the
/// source marks from the presync's cache, replaces whatever Prepare readied for the plain page
/// stream (a `criu page-server` is stopped). Refused (`None`) without a whole presync.
fn dedup_writer(migration_id: &str, job: &mut Job) -> Option<Endpoint> {
    let presync = job
        .presync
        .as_ref()?
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let Some(presync) = presync else {
        tracing::warn!(migration = %migration_id, "a deduplicated page stream without a whole memory presync: refused");
        return None;
    };
    // Made at Prepare (`start_page_server`).
    let dir = job.images_dir.clone()?;
    job.serves.remove(&Service::PageServer);
    if let Some(ps) = job.page_server.take() {
        // Killing and reaping it blocks: not under the jobs' lock, not on the runtime.
        std::thread::spawn(move || drop(ps));
    }
    let (sink, wait) = PageSink::new(&dir, bounded_limits(job.max_bytes));
    job.page_writer = Some(wait);
    tracing::info!(migration = %migration_id, presync_bytes = presync.bytes(), "deduplicated page stream");
    Some(Endpoint::Pages(sink.deduplicated(presync)))
}

/// Stops and forgets everything of a migration (kills its CRIU helpers). Idempotent.
pub(crate) fn forget(migration_id: &str) {
    let job = with_jobs(|j| j.remove(migration_id));
    drop(job);
}

/// Whether migration `migration_id` restored its container with a lazy-pages daemon that has
/// not been watched yet (the container's memory arrives after its resume).
pub(crate) fn has_lazy_daemon(migration_id: &str) -> bool {
    with_jobs(|j| {
        j.get(migration_id)
            .is_some_and(|job| job.lazy_daemon.is_some())
    })
}

/// Whether the memory a post-copy's copy still lacks can reach it: its lazy-pages daemon runs
/// and the source's pages have not ended (its guard has not fired), or the daemon has ended
/// with every page. `false` without a daemon.
pub(crate) fn lazy_pages_can_arrive(migration_id: &str) -> bool {
    with_jobs(|j| {
        let Some(job) = j.get_mut(migration_id) else {
            return false;
        };
        let fired = job.guard.as_ref().is_some_and(|g| g.fired());
        match job.lazy_daemon.as_mut().map(Background::try_exited) {
            None => false,
            Some(Some(every_page)) => every_page,
            Some(None) => !fired,
        }
    })
}

/// The source of post-copy `migration_id` asks about it on another connection than the move's:
/// it serves no more pages through the move's (its move ended in doubt or cut short, or its
/// agent started again). The copy is stopped now, as when the source's page stream ends, not
/// at the move's connection's idle timeout, which also keeps an operator's decision on the
/// source from running a second copy meanwhile (review of session 31, M3). Blocking (the freeze,
/// up to 2 s).
pub(crate) fn source_left(migration_id: &str) {
    let guard = with_jobs(|j| j.get(migration_id).and_then(|job| job.guard.clone()));
    if let Some(g) = guard {
        tracing::warn!(migration = %migration_id, "the post-copy's source asks on another connection: its pages cannot come any more, the copy is stopped");
        g.source_ended();
    }
}

/// Every post-copy still fetching its copy's memory here: stopped as when its source's pages
/// end (this agent is about to stop, and its copies cannot get their memory without it).
/// Blocking.
pub fn stop_arriving_postcopies() {
    let guards: Vec<(String, Arc<PostcopyGuard>)> = with_jobs(|j| {
        j.iter()
            .filter_map(|(id, job)| Some((id.clone(), job.guard.clone()?)))
            .collect()
    });
    for (id, g) in guards {
        tracing::warn!(migration = %id, "stopping with a post-copy still under way: its copy is stopped; the next start settles it");
        g.source_ended();
    }
}

fn is_known(migration_id: &str) -> bool {
    with_jobs(|j| j.contains_key(migration_id))
}

fn criu() -> Result<Criu, PagesError> {
    Criu::locate().map_err(|source| PagesError::Start {
        what: "locate",
        source,
    })
}

// ---- destination ----

/// Whether `name` (in the images directory) is a page image the page server writes.
fn is_page_image(name: &str) -> bool {
    (name.starts_with("pages-") || name.starts_with("pagemap-"))
        && name.ends_with(".img")
        && !name.contains('/')
}

/// The environment variable of migd that chooses what writes a stream-mode dump's pages on the
/// destination: `mig` for mig's page writer, `criu` for `criu page-server`; unset (or anything
/// else): [`DEFAULT_PAGE_SINK`].
pub const PAGE_SINK_ENV: &str = "MIG_PAGE_SINK";

/// What writes a stream-mode dump's pages on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSinkKind {
    /// `criu page-server --ps-socket` on a socketpair the tunnel stream is carried to.
    Criu,
    /// mig's page writer on the tunnel stream itself (`criu::page_writer`).
    Mig,
}

/// The page sink without [`PAGE_SINK_ENV`]: `criu page-server`. The page writer was not faster
/// in the session-8 A/B runs on the 2-core test machine (docs/performance.md "Session 8").
pub const DEFAULT_PAGE_SINK: PageSinkKind = PageSinkKind::Criu;

/// This agent's page sink ([`PAGE_SINK_ENV`], read once).
fn page_sink() -> PageSinkKind {
    static SINK: OnceLock<PageSinkKind> = OnceLock::new();
    *SINK.get_or_init(|| {
        let sink = match std::env::var(PAGE_SINK_ENV).as_deref() {
            Ok("mig") => PageSinkKind::Mig,
            Ok("criu") => PageSinkKind::Criu,
            _ => DEFAULT_PAGE_SINK,
        };
        tracing::info!(
            ?sink,
            "stream-mode pages are written by this sink ({PAGE_SINK_ENV})"
        );
        sink
    })
}

/// The page writer's limits with at most `max_bytes` of page data.
fn bounded_limits(max_bytes: Option<u64>) -> page_writer::Limits {
    let limits = page_writer::Limits::default();
    page_writer::Limits {
        max_bytes: max_bytes.map_or(limits.max_bytes, |m| m.min(limits.max_bytes)),
        ..limits
    }
}

/// Stream mode, at Prepare: readies what writes the pages into `images_dir`; the tunnel
/// stream of the source's dump is carried there ([`resolve`]): `criu page-server` on a
/// socketpair, or mig's page writer ([`page_sink`]). The memory presync and the dump's page
/// stream each take at most `max_bytes` from the source (`migd --max-incoming-bytes`: whatever
/// a Prepare declared, a peer sends no more; past it the stream fails and the move rolls
/// back). Blocking.
pub(crate) fn start_page_server(
    migration_id: &str,
    images_dir: &Path,
    accept_presync: bool,
    max_bytes: u64,
) -> Result<(), PagesError> {
    // A 1.4 source may first send the container's memory, then a deduplicated page stream.
    std::fs::create_dir_all(images_dir).map_err(|source| PagesError::ImagesDir {
        path: images_dir.to_owned(),
        source,
    })?;
    let slot = Arc::new(Mutex::new(None));
    with_jobs(|j| {
        if !accept_presync {
            return;
        }
        let job = j.entry(migration_id.to_owned()).or_default();
        job.images_dir = Some(images_dir.to_owned());
        job.presync = Some(slot.clone());
        job.max_bytes = Some(max_bytes);
        job.serves.insert(
            Service::MemoryPresync,
            Endpoint::Presync(PresyncSink {
                dir: images_dir.to_owned(),
                max_bytes: super::memsync::presync_bound(images_dir).min(max_bytes),
                slot,
            }),
        );
    });
    if page_sink() == PageSinkKind::Mig {
        std::fs::create_dir_all(images_dir).map_err(|source| PagesError::ImagesDir {
            path: images_dir.to_owned(),
            source,
        })?;
        let (sink, wait) = PageSink::new(images_dir, bounded_limits(Some(max_bytes)));
        with_jobs(|j| {
            let job = j.entry(migration_id.to_owned()).or_default();
            job.page_writer = Some(wait);
            job.serves
                .insert(Service::PageServer, Endpoint::Pages(sink));
        });
        return Ok(());
    }
    let (criu_end, mine) = tunnel::unix_pair().map_err(PagesError::SocketPair)?;
    let ps = criu()?
        .page_server(&PageServerOpts {
            images_dir: images_dir.to_owned(),
            listen: PageTarget::Socket(criu_end.as_raw_fd()),
            log_file: "page-server.log".into(),
            ready_timeout: READY,
        })
        .map_err(|source| PagesError::Start {
            what: "page-server",
            source,
        })?;
    // The page server holds its end now; ours would keep the pair open after it exits.
    drop(criu_end);
    with_jobs(|j| {
        let job = j.entry(migration_id.to_owned()).or_default();
        job.page_server = Some(ps);
        job.serves.insert(
            Service::PageServer,
            Endpoint::UnixBounded {
                socket: mine,
                max_bytes,
            },
        );
    });
    Ok(())
}

/// Before the restore: in stream mode, waits for the page writer (or page server) to end (the
/// dump is complete once it ended cleanly), then lists the page images it wrote in the received
/// manifest, by size. Without either, checks that the received manifest names no page-server
/// images. Returns what it added. Blocking.
pub(crate) fn finish_page_server(
    migration_id: &str,
    images_dir: &Path,
) -> Result<Vec<imageset::PageImage>, PagesError> {
    let (ps, writer) = with_jobs(|j| {
        j.get_mut(migration_id).map_or((None, None), |job| {
            (job.page_server.take(), job.page_writer.take())
        })
    });
    let t_wait = Instant::now();
    match (ps, writer) {
        (_, Some(writer)) => {
            let summary = writer
                .wait_timeout(PAGE_SERVER_END)
                .map_err(PagesError::PageWriter)?;
            tracing::debug!(migration = %migration_id, ?summary, "page writer done");
        }
        (Some(ps), None) => ps
            .wait_timeout(PAGE_SERVER_END)
            .map_err(PagesError::PageServer)?,
        (None, None) => {
            let manifest = imageset::read_manifest(images_dir).map_err(PagesError::Manifest)?;
            imageset::refuse_page_server_entries(&manifest).map_err(PagesError::Manifest)?;
            return Ok(Vec::new());
        }
    }
    let wait_ms = super::ms(t_wait.elapsed());
    forget(migration_id);
    let added = imageset::add_page_server_images(images_dir, is_page_image)
        .map_err(PagesError::Manifest)?;
    tracing::info!(migration = %migration_id, page_server_wait_ms = wait_ms, files = added.len(), bytes = added.iter().map(|p| p.size).sum::<u64>(), "page images listed");
    Ok(added)
}

/// The environment variable of migd that turns the prefetching proxy of post-copy on: `1`
/// puts the proxy between the lazy-pages daemon and the tunnel; unset or anything else leaves
/// the daemon on the tunnel directly. Off by default: in the full bench run of 2026-12-03
/// 06:33 UTC and an A/B right after it (1 GiB, 3 runs each), the proxy gave no gain (post-copy
/// 165 against 209 MB/s, downtime 386 against 342 ms), against the gains of the helper's noisier
/// A/B runs (docs/migration.md, "The prefetching proxy").
pub const LAZY_PREFETCH_ENV: &str = "MIG_LAZY_PREFETCH";

/// Whether this agent runs the prefetching proxy ([`LAZY_PREFETCH_ENV`], read once).
fn lazy_prefetch() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(LAZY_PREFETCH_ENV).as_deref() == Ok("1");
        tracing::info!(on, "post-copy prefetching proxy ({LAZY_PREFETCH_ENV})");
        on
    })
}

/// Writes the marker of lazy-pages daemon `pid` (of migration `migration_id`; `local`: serving
/// this host's images) into its work directory `work`, for a restarted agent
/// ([`super::postcopy::recover_postcopy`]).
fn mark_daemon(work: &Path, migration_id: &str, pid: u32, local: bool) -> Result<(), PagesError> {
    PostcopyMarker {
        migration_id: migration_id.to_owned(),
        daemon_pid: pid,
        local,
    }
    .write(work)
    .map_err(|source| PagesError::ImagesDir {
        path: work.to_owned(),
        source,
    })
}

/// Lazy mode, before the restore: the `criu lazy-pages` daemon on the placed image set, with
/// its socket in `<container>/lazy-pages/` (where the shim's restore looks for it), reaching
/// the source's page server through one end of a socketpair (`--page-server --ps-socket`)
/// whose other end is a tunnel stream on the migration connection ([`Tunnel::socketpair`]).
/// With the prefetching proxy ([`lazy_prefetch`]): daemon <-> socketpair <-> proxy <-> tunnel;
/// the proxy knows the lazy ranges from the placed pagemap images.
/// `cgroup` is the container's: [`PostcopyGuard`] stops it if the source's pages end first.
pub(crate) async fn start_lazy_daemon(
    conn: quinn::Connection,
    migration_id: &str,
    checkpoint: PathBuf,
    container_dir: &Path,
    cgroup: String,
) -> Result<(), PagesError> {
    let guard = Arc::new(PostcopyGuard::new(cgroup));
    let hook_guard = guard.clone();
    let (tunnel, carried) = Tunnel::socketpair_guarded(
        conn,
        TunnelHeader {
            migration_id: migration_id.to_owned(),
            service: Service::LazyPages,
        },
        Box::new(move || hook_guard.source_ended()),
    )
    .map_err(PagesError::Tunnel)?;
    let client = tunnel.take_client().ok_or(PagesError::NoConnection)?;
    let work = container_dir.join(LAZY_DIR);
    let id = migration_id.to_owned();
    let daemon_guard = guard.clone();
    let (daemon, proxy, gate) = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&work);
        // With the proxy the daemon gets one end of a local pair, the proxy the other end and
        // the tunnel's; without it the daemon gets the tunnel's end.
        let proxied = if lazy_prefetch() {
            let map = lazy_proxy::read_lazy_map(&checkpoint).map_err(PagesError::LazyMap)?;
            let (daemon_end, proxy_end) = tunnel::unix_pair().map_err(PagesError::SocketPair)?;
            Some((map, daemon_end, proxy_end))
        } else {
            None
        };
        // The daemon also holds the other end of its socket (never used): when this agent
        // dies, the daemon waits for pages instead of giving up and leaving zero pages to the
        // container; a restarted agent kills the container, then the daemon
        // ([`recover_postcopy`]).
        let (daemon_fd, other_end) = match &proxied {
            Some((_, daemon_end, proxy_end)) => (
                daemon_end.as_raw_fd(),
                OwnedFd::from(proxy_end.try_clone().map_err(PagesError::SocketPair)?),
            ),
            None => (client.as_raw_fd(), carried),
        };
        let daemon = criu()?
            .lazy_pages_in(
                &LazyPagesOpts {
                    images_dir: checkpoint,
                    source: PageTarget::Socket(daemon_fd),
                    log_file: work.join("lazy-pages.log"),
                    ready_timeout: READY,
                    hold: Some(other_end.as_raw_fd()),
                },
                Some(&work),
            )
            .map_err(|source| PagesError::Start {
                what: "lazy-pages",
                source,
            })?;
        drop(other_end);
        if let Some(pid) = daemon.pid() {
            daemon_guard.daemon_started(pid);
            // Without it a restarted agent could not tell the daemon waits for pages that
            // cannot come: no post-copy then (the daemon is killed with `daemon`).
            mark_daemon(&work, &id, pid, false)?;
        }
        // The daemon holds its end now; ours would keep the stream open after it exits.
        let Some((map, daemon_end, proxy_end)) = proxied else {
            drop(client);
            return Ok((daemon, None, None));
        };
        drop(daemon_end);
        tracing::info!(migration = %id, lazy_bytes = map.bytes(), processes = map.processes(), "post-copy prefetching proxy starts");
        let source = std::os::unix::net::UnixStream::from(client);
        let (proxy, gate) =
            lazy_proxy::Proxy::new(proxy_end, source, map, lazy_proxy::Limits::default())
                .map_err(PagesError::LazyMap)?;
        // The daemon holds the proxy's end too: when the proxy fails, the daemon does not see
        // it, so the guard stops the container and ends the daemon as when the source's pages
        // end.
        let proxy_guard = daemon_guard.clone();
        let proxy = std::thread::Builder::new()
            .name("lazy-proxy".into())
            .spawn(move || {
                let r = proxy.run();
                if r.is_err() {
                    proxy_guard.source_ended();
                }
                r
            })
            .map_err(PagesError::LazyProxy)?;
        Ok::<_, PagesError>((daemon, Some(proxy), Some(gate)))
    })
    .await
    .map_err(|e| PagesError::Task(e.to_string()))??;
    with_jobs(|j| {
        let job = j.entry(migration_id.to_owned()).or_default();
        job.lazy_daemon = Some(daemon);
        job.lazy_proxy = proxy;
        job.prefetch_gate = gate;
        job.guard = Some(guard);
        job.tunnel = Some(tunnel);
    });
    Ok(())
}

/// Waits for the proxy's thread (it ends once the daemon closed its session, or failed) and
/// logs what it did. Its error, if any, to add to the daemon's. Blocking.
fn finish_proxy(migration_id: &str, proxy: Option<ProxyThread>) -> Option<String> {
    let r = proxy?.join();
    match r {
        Ok(Ok(s)) => {
            tracing::info!(migration = %migration_id, lazy_bytes = s.lazy_bytes, source_bytes = s.source_bytes, prefetched_bytes = s.prefetched_bytes, daemon_bytes = s.daemon_bytes, daemon_requests = s.daemon_requests, forwarded = s.forwarded, "post-copy prefetching proxy done");
            None
        }
        Ok(Err(e)) => Some(format!("prefetching proxy: {}", super::chain(&e))),
        Err(_) => Some("prefetching proxy: its thread panicked".into()),
    }
}

/// Stream mode, before the restore: every page is on this host already, in the placed image
/// set. A `criu lazy-pages` daemon serving those local images lets the restore skip copying
/// memory (the tree resumes as soon as it is rebuilt); the daemon then copies the pages in the
/// background and on demand. The container depends on that daemon, on this host, until it has
/// copied the last page ([`watch_lazy_daemon`] kills and reports the container if it fails).
pub(crate) async fn start_local_lazy_daemon(
    migration_id: &str,
    checkpoint: PathBuf,
    container_dir: &Path,
) -> Result<(), PagesError> {
    let work = container_dir.join(LAZY_DIR);
    let id = migration_id.to_owned();
    let daemon = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&work);
        let daemon = criu()?
            .lazy_pages_local(
                &LazyPagesOpts {
                    images_dir: checkpoint,
                    // Not used: the pages are read from the images directory.
                    source: PageTarget::Tcp {
                        address: LOCALHOST.into(),
                        port: 0,
                    },
                    log_file: work.join("lazy-pages.log"),
                    ready_timeout: READY,
                    hold: None,
                },
                &work,
            )
            .map_err(|source| PagesError::Start {
                what: "lazy-pages",
                source,
            })?;
        // A restarted agent keeps the container from being dumped while this daemon runs.
        if let Some(pid) = daemon.pid() {
            mark_daemon(&work, &id, pid, true)?;
        }
        Ok::<_, PagesError>(daemon)
    })
    .await
    .map_err(|e| PagesError::Task(e.to_string()))??;
    with_jobs(|j| {
        let job = j.entry(migration_id.to_owned()).or_default();
        job.lazy_daemon = Some(daemon);
        job.lazy_local = true;
    });
    Ok(())
}

/// After the resume: waits (in the background) for the migration's lazy-pages daemon, if it has
/// one (post-copy from the source, or stream mode's local daemon), to have every page; nothing
/// to do otherwise. The job knows which daemon it is, so a resume for a Resolve (on another
/// connection than the move's, which does not know the mode) watches and reaps it as well. If
/// it fails, the container cannot get its memory: it is killed and the failure is reported
/// (event `migration_done` with outcome `postcopy_failed`, and the container's reason).
pub(crate) fn watch_lazy_daemon(
    agent: Arc<Agent>,
    migration_id: String,
    container_id: String,
    container_name: String,
    source: String,
) {
    let Some((daemon, proxy, local, guard)) = with_jobs(|j| {
        let job = j.get_mut(&migration_id)?;
        // The container runs now: the proxy may take the link and the CPU for its prefetch.
        if let Some(gate) = job.prefetch_gate.take() {
            gate.open();
        }
        Some((
            job.lazy_daemon.take()?,
            job.lazy_proxy.take(),
            job.lazy_local,
            job.guard.clone(),
        ))
    }) else {
        // Restored with every page: the copy is charged for its memory already.
        super::dest::release_memory(&migration_id);
        return;
    };
    let started = Instant::now();
    tokio::spawn(async move {
        let id = migration_id.clone();
        // On a thread of its own, not the runtime's blocking pool: the daemon may wait for
        // pages that came through this agent, and a stopping agent waits for that pool (QA of
        // session 31, M1: migd hung for good; the next start settles the daemon).
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let r = daemon.wait();
            let guarded = guard.is_some_and(|g| g.daemon_ended());
            // The daemon ended (closing its end of the pair): so does the proxy.
            let _ = tx.send((r, finish_proxy(&id, proxy), guarded));
        });
        let (r, proxy_err, guarded) = rx.await.unwrap_or_else(|_| {
            (
                Err(mig_migrate::criu::CriuError::Spawn {
                    path: "criu".into(),
                    source: std::io::Error::other("the daemon's watch ended"),
                }),
                None,
                false,
            )
        });
        let cd = agent.dirs.container(&container_id);
        if r.is_ok() && !local {
            // First: a restart from here on must not take the copy, still frozen by its guard
            // until the thaw below, for one cut short (review 2 of session 31, M3).
            let _ = std::fs::write(cd.dir.join(LAZY_DIR).join(super::postcopy::COMPLETE), b"");
        }
        if r.is_err() {
            // First: a source asking from now on is told the move rolled back, and runs its
            // whole frozen copy again (QA of session 30, F1 and F2). Before the cleanup below,
            // in which a Resolve would find neither the daemon nor the record, and answer
            // `Committed` (review of session 31, M2).
            if !local {
                super::postcopy::record_failed(&agent, &migration_id);
            }
            // Before `forget`, which lets the connection end and say how the move ended.
            POSTCOPY_FAILED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(migration_id.clone());
        }
        forget(&migration_id);
        // The last page arrived (the copy is charged for them), or the copy is killed.
        super::dest::release_memory(&migration_id);
        if r.is_ok() && guarded {
            // The source's stream ended just after the daemon's last page: thawed before the
            // container stops being marked as filling, so that nothing sees it frozen with no
            // reason (a move then refuses it: see orchestrate's unexplained freeze).
            let cgroup = agent.cgroup_name(&container_id);
            if let Ok(cg) = mig_runtime::cgroup::Cgroup::open(&cgroup) {
                let _ = cg.thaw();
            }
        }
        let _ = std::fs::remove_dir_all(cd.dir.join(LAZY_DIR));
        // Every page is there, or the container is killed: either way nothing is arriving.
        super::postcopy::mark_filling(&container_id, false);
        match r {
            Ok(()) => {
                if let Some(p) = &proxy_err {
                    tracing::warn!(id = %container_id, migration = %migration_id, error = %p, "the daemon got every page, its proxy failed after that");
                }
                // The daemon also ends when the processes it served are gone (the container
                // exited, was killed or removed): the rest of its memory was never needed (QA
                // of session 32, F3: "every page arrived" with 13 of 300 MiB here).
                let cgroup = agent.cgroup_name(&container_id);
                let procs = mig_runtime::cgroup::Cgroup::open(&cgroup).and_then(|cg| cg.procs());
                let postcopy_ms = super::ms(started.elapsed());
                match procs {
                    Ok(p) if !p.is_empty() => {
                        tracing::info!(id = %container_id, migration = %migration_id, postcopy_ms, "every page arrived")
                    }
                    Ok(_) | Err(mig_runtime::cgroup::CgroupError::NotFound { .. }) => {
                        tracing::info!(id = %container_id, migration = %migration_id, postcopy_ms, "the container had no process left when its post-copy ended: the pages it had not asked for were not needed")
                    }
                    Err(e) => {
                        tracing::info!(id = %container_id, migration = %migration_id, postcopy_ms, error = %e, "post-copy ended (whether the container still runs is not known)")
                    }
                }
                let images = cd.checkpoint();
                let _ = tokio::task::spawn_blocking(move || {
                    crate::daemon::checkpoint::spend_pages(&images, &container_id)
                })
                .await;
            }
            Err(e) => {
                // The proxy's error says why the daemon lost its pages, when it was the proxy.
                let detail = match &proxy_err {
                    Some(p) => format!("{}; {p}", super::chain(&e)),
                    None => super::chain(&e),
                };
                tracing::error!(id = %container_id, migration = %migration_id, error = %detail, "post-copy failed: the container lost its source of memory and is killed");
                // The reason and the event say the cause first, without the lines of CRIU's
                // log (QA of session 28, F6: hundreds of characters of uffd lines buried it).
                let brief = match &proxy_err {
                    Some(p) => format!("{p}; {}", e.brief()),
                    None => e.brief(),
                };
                let cgroup = agent.cgroup_name(&container_id);
                if let Ok(cg) = mig_runtime::cgroup::Cgroup::open(&cgroup) {
                    let _ = cg.kill();
                    let _ = cg.thaw();
                }
                if let Some(e) = agent.lock().get_mut(&container_id) {
                    e.state.reason = Some(if local {
                        format!("restore failed after resume (the local lazy-pages daemon stopped before the last page): {brief}")
                    } else {
                        format!(
                            "post-copy failed (pages from {source} stopped before the last one): {brief}; {source}, if it still has its frozen copy, runs it again once it asks here (started here before that, this copy would have it remove its own)"
                        )
                    });
                }
                agent.emit(EventKind::MigrationDone {
                    migration_id: migration_id.clone(),
                    container_id: container_id.clone(),
                    container_name,
                    role: "destination".into(),
                    peer: source,
                    outcome: "postcopy_failed".into(),
                    total_ms: super::ms(started.elapsed()),
                    downtime_ms: None,
                    bytes: 0,
                    error: Some(brief),
                });
            }
        }
    });
}

/// Keeps the caller (the connection's task) waiting while a post-copy of `migration_id` still
/// needs the connection.
pub(crate) async fn until_done(migration_id: &str) {
    while is_known(migration_id) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- source ----

/// The source's page state for one move.
#[derive(Default)]
pub(crate) struct SourcePages {
    pub mode: OnceLock<MoveMode>,
    pub conn: OnceLock<quinn::Connection>,
    /// Bytes carried by the tunnel (pages and the page server protocol).
    pub tunnel_bytes: AtomicU64,
    lazy: Mutex<Option<LazyDump>>,
    /// Post-copy: time from Commit to the last page, and the failure if any.
    pub postcopy: Mutex<Option<(Duration, Option<String>)>>,
    /// Post-copy: the bytes of the pages the dump left to serve after the resume (its lazy
    /// pages), to tell a copy that got them all from one that stopped asking (it ended).
    pub lazy_bytes: OnceLock<u64>,
    /// Inside the dump phase: the `criu dump` command alone, in ms.
    pub criu_dump_ms: AtomicU64,
    /// Inside the dump phase: hashing the image set and writing its manifest, in ms.
    pub seal_ms: AtomicU64,
    /// Stream mode: the memory presync (a 1.4 destination).
    pub presync: super::memsync::SourcePresync,
}

impl SourcePages {
    pub fn mode(&self) -> MoveMode {
        self.mode
            .get()
            .copied()
            .unwrap_or(super::modes::DEFAULT_MODE)
    }

    /// Opens what the dump needs before it runs: stream mode's tunnel to the page server, a
    /// socketpair whose one end the dump gets (`--ps-socket`).
    pub async fn before_dump(&self, migration_id: &str) -> Result<Option<Tunnel>, PagesError> {
        if self.mode() != MoveMode::Stream {
            return Ok(None);
        }
        let conn = self.conn.get().cloned().ok_or(PagesError::NoConnection)?;
        let header = |service| TunnelHeader {
            migration_id: migration_id.to_owned(),
            service,
        };
        match self.presync.index() {
            // After a memory presync, pages the destination holds travel as markers.
            Some(index) => Tunnel::socketpair_dedup(
                conn,
                header(Service::PageServerDedup),
                index,
                self.presync.stats.clone(),
            ),
            None => Tunnel::socketpair(conn, header(Service::PageServer)),
        }
        .map(Some)
        .map_err(PagesError::Tunnel)
    }

    /// Runs the dump of `opts` for this mode; blocking. Stream: pages go to `tunnel`; lazy:
    /// returns once every image but memory is written, serving pages on a socketpair whose
    /// other end the tunnel reaches (registered for [`resolve`]).
    pub fn dump(
        &self,
        criu: &Criu,
        migration_id: &str,
        mut opts: DumpOpts,
        tunnel: Option<&Tunnel>,
    ) -> Result<mig_migrate::criu::DumpStats, mig_migrate::criu::CriuError> {
        match self.mode() {
            MoveMode::Stream => {
                let client = tunnel.and_then(Tunnel::take_client);
                if let Some(fd) = &client {
                    opts.page_server = Some(PageTarget::Socket(fd.as_raw_fd()));
                }
                let r = criu.dump(&opts);
                // The tunnel's stream ends once the dump's copy and this one are closed.
                drop(client);
                if let Some(t) = tunnel {
                    let dedup = self.presync.stats.wire_bytes.load(Ordering::Relaxed);
                    self.tunnel_bytes
                        .store(t.bytes() + dedup, Ordering::Relaxed);
                }
                r
            }
            MoveMode::Lazy => {
                // The dump's page server holds one end of a socketpair (`--ps-socket`); the
                // tunnel stream of the destination's lazy-pages daemon is carried to the other
                // ([`resolve`]), whichever way that daemon reaches its own agent.
                let (criu_end, mine) =
                    tunnel::unix_pair().map_err(|source| mig_migrate::criu::CriuError::Spawn {
                        path: "criu".into(),
                        source,
                    })?;
                let serve = PageTarget::Socket(criu_end.as_raw_fd());
                let start = Instant::now();
                let lazy = criu.dump_lazy(&opts, &serve, READY)?;
                match lazy_proxy::read_lazy_map(&opts.images_dir) {
                    Ok(map) => {
                        let _ = self.lazy_bytes.set(map.bytes());
                    }
                    Err(e) => {
                        tracing::warn!(migration = %migration_id, error = %super::chain(&e), "cannot count the pages left to serve after the resume")
                    }
                }
                // The dump holds its end now; ours would keep the pair open after it exits.
                drop(criu_end);
                with_jobs(|j| {
                    j.entry(migration_id.to_owned())
                        .or_default()
                        .serves
                        .insert(Service::LazyPages, Endpoint::Unix(mine));
                });
                *self.lazy.lock().unwrap_or_else(|p| p.into_inner()) = Some(lazy);
                Ok(mig_migrate::criu::DumpStats {
                    wall_time_us: start.elapsed().as_micros() as u64,
                    ..Default::default()
                })
            }
            _ => criu.dump(&opts),
        }
    }

    /// Post-copy, after Commit: waits until the destination has every page (the dump ends),
    /// then records how long that took. Blocking. Whether the destination got every page
    /// (`true` when this move served none after its resume).
    pub fn finish_postcopy(&self, migration_id: &str) -> bool {
        let Some(lazy) = self.lazy.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return true;
        };
        let start = Instant::now();
        let r = lazy.wait();
        forget(migration_id);
        let err = r.err().map(|e| {
            tracing::error!(migration = %migration_id, error = %super::chain(&e), "post-copy ended before the destination had every page");
            // The cause first when it was the link (QA of session 26: "criu dump failed" alone
            // when the destination's link was down or its agent stopped), and CRIU's log lines
            // only in the agent's log (QA of session 28, F6).
            let lost = self.conn.get().and_then(quinn::Connection::close_reason);
            match lost {
                Some(why) => format!(
                    "the connection to the destination was lost ({why}) while it still needed pages: {}",
                    e.brief()
                ),
                None => e.brief(),
            }
        });
        let served = err.is_none();
        *self.postcopy.lock().unwrap_or_else(|p| p.into_inner()) = Some((start.elapsed(), err));
        served
    }

    /// Whether this move's post-copy ended before the destination had every page
    /// ([`finish_postcopy`](Self::finish_postcopy)), and why.
    pub fn postcopy_failure(&self) -> Option<String> {
        self.postcopy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|(_, err)| err.clone())
    }

    /// A rolled-back move: stops serving pages.
    pub fn abandon(&self, migration_id: &str) {
        drop(self.lazy.lock().unwrap_or_else(|p| p.into_inner()).take());
        forget(migration_id);
    }
}

// ---- destination, after a lazy restore ----

/// Lazy mode: a restored process's command line lives in memory that may not have arrived yet.
/// Reading `/proc/PID/cmdline` does not wait for userfaultfd (the kernel's remote access gives
/// up on a missing page and the read comes back empty), so the PID map read right after the
/// restore can list a process with an empty command. `process_vm_readv` does wait: the fault
/// is served by the lazy-pages daemon. Fills in the empty commands that way. Blocking.
pub(crate) fn fill_lazy_cmds(pid_map: &mut [mig_runtime::pidmap::PidEntry]) {
    for e in pid_map.iter_mut().filter(|e| e.cmd.is_empty()) {
        if let Some(cmd) = read_cmdline_remote(e.host_pid) {
            e.cmd = cmd;
        }
    }
}

/// Most bytes of a command line read by [`fill_lazy_cmds`].
const MAX_CMDLINE: usize = 64 << 10;

fn read_cmdline_remote(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses): field 3 onwards;
    // arg_start and arg_end are fields 48 and 49.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let start: usize = fields.get(45)?.parse().ok()?;
    let end: usize = fields.get(46)?.parse().ok()?;
    let len = end.checked_sub(start)?.min(MAX_CMDLINE);
    if len == 0 {
        return None;
    }
    let mut buf = vec![0u8; len];
    let got = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &[nix::sys::uio::RemoteIoVec { base: start, len }],
    )
    .ok()?;
    buf.truncate(got);
    let cmd = mig_runtime::pidmap::command_line(&buf);
    (!cmd.is_empty()).then_some(cmd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_command_line_is_read_through_process_vm_readv() {
        let me = std::process::id() as i32;
        let expected = mig_runtime::pidmap::pid_map(&[me]);
        let mut map = expected.clone();
        map[0].cmd.clear();
        super::fill_lazy_cmds(&mut map);
        assert_eq!(map, expected);
    }
}
