//! A prefetching proxy between the destination's `criu lazy-pages` daemon and the source's
//! lazy page server (`criu dump --lazy-pages`), speaking CRIU's page server protocol on both
//! sides.
//!
//! Why: the daemon alone asks for its background pages one request at a time, and every page
//! fault resets its background size to 64 KiB (criu/uffd.c, `handle_requests`, `xfer_pages`,
//! `update_xfer_len`), so a workload that touches memory fetches 64 KiB per round trip through
//! QUIC: 135-196 MB/s measured. The proxy knows every lazy range before the restore (the
//! `pagemap-<pid>.img` images, entries flagged `PE_LAZY`), asks the source for all of them at
//! once in large requests with a bounded window in flight, and answers the daemon from what
//! arrived.
//!
//! The protocol (criu/page-xfer.c, CRIU 4.x): commands of 32 bytes, `struct page_server_iov {
//! u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id }` with C's padding after `cmd`, in the host's
//! byte order. The daemon sends `PS_IOV_GET` (7) with `dst_id` = the process's image id (the
//! in-namespace PID of `pagemap-<pid>.img`, not the `encode_pm` form of the dump's adds:
//! pagemap.c `maybe_read_page_remote` passes `pr->img_id`, the source looks it up with
//! `pstree_item_by_virt`). The source answers each, in order, with a command
//! `ADD_F | PE_PRESENT << 16` of the same `vaddr` and `dst_id` and `nr_pages` at most the asked
//! number (it stops at the end of one of its page pipe's runs), then the pages. A request of a
//! page the source does not hold as lazy makes it answer 0 pages and stop serving, so the proxy
//! asks only for ranges of the images (or, for a page outside them, exactly what the daemon
//! asked). At the end the daemon sends `PS_IOV_FORCE_CLOSE` (0x1024; `PS_IOV_CLOSE` 0x1023
//! from a daemon on a TCP connection) and waits for a 4-byte status; the source answers it and
//! ends.
//!
//! What the proxy does with the daemon's requests, strictly in their order: the first page is
//! in the cache: the cached run from there (at most what was asked; the daemon asks again for
//! the rest, as after a short answer of the source). The first page is on its way: wait for it.
//! Otherwise forward a request for the run of not yet requested pages from there (or, for
//! pages the daemon already took, as a forked child's daemon does, or outside the images'
//! lazy ranges: exactly the daemon's request, up to the next range the proxy knows) and answer
//! from the cache when it arrived. No range of the images is asked from the source twice.
//!
//! Bounds ([`Limits`]): requests in flight to the source, the cache (prefetching stops while it
//! is full; the daemon's own requests still go through), pages of one request, queued daemon
//! requests. Every command from either side is checked; anything unexpected ends the proxy
//! with a [`LazyProxyError`], and closing both sockets makes the daemon fail, which the agent
//! reports as a failed post-copy.
//!
//! The prefetch starts when the agent opens its [`PrefetchGate`], once the container runs, so
//! that it takes nothing from the downtime.
//!
//! [`run`] is blocking: it runs two reader threads and answers on the calling thread.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use map::{carve, holding, insert_merged};
pub use map::{forked_overlap_bytes, pagemap_bytes, read_lazy_map, LazyMap};

pub use super::page_writer::{PAGE_SIZE, PS_IOV_SIZE};
// CRIU's page server protocol and pagemap image constants, shared with the page writer.
use super::page_writer::{
    PAGEMAP_MAGIC, PE_LAZY, PE_PRESENT, PS_CMD_BITS, PS_IOV_ADD_F, PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE, PS_IOV_GET,
};

/// The command of every page answer: `encode_ps_cmd(PS_IOV_ADD_F, PE_PRESENT)`.
const ANSWER_CMD: u32 = PE_PRESENT << PS_CMD_BITS | PS_IOV_ADD_F;
/// A pagemap image of a container's process is small; anything bigger is not one.
pub const MAX_PAGEMAP_BYTES: u64 = 64 << 20;

/// Bounds of one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one prefetch request.
    pub chunk_bytes: u64,
    /// Bytes asked from the source and not yet arrived, prefetches only (a daemon request that
    /// misses the cache queues behind them: this is what a fault may wait for).
    pub window_bytes: u64,
    /// Bytes received and not yet taken by the daemon; prefetching stops at this.
    pub cache_bytes: u64,
    /// Pages of one daemon request (CRIU asks for at most 4 MiB).
    pub max_request_pages: u64,
    /// Daemon requests waiting for their answer.
    pub max_queued: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            chunk_bytes: 2 << 20,
            window_bytes: 8 << 20,
            cache_bytes: 64 << 20,
            max_request_pages: 16 << 10,
            max_queued: 4096,
        }
    }
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum LazyProxyError {
    #[error("cannot list the images directory {path}")]
    ListImages {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PAGEMAP_BYTES} bytes")]
    ImageTooLarge { path: PathBuf },
    #[error("{path} is not a valid pagemap image: {reason}")]
    BadImage { path: PathBuf, reason: &'static str },
    #[error("cannot read the lazy-pages daemon's request")]
    ReadDaemon(#[source] std::io::Error),
    #[error(
        "the lazy-pages daemon's stream ended inside a command ({have} of {PS_IOV_SIZE} bytes)"
    )]
    DaemonTruncated { have: usize },
    #[error("the lazy-pages daemon closed its end without the close command")]
    DaemonEof,
    #[error("the lazy-pages daemon sent command {cmd:#x}, not a page request or a close")]
    DaemonCommand { cmd: u32 },
    #[error("the lazy-pages daemon asked for {nr_pages} pages at {vaddr:#x} of process {dst_id} (at most {max}, page-aligned)")]
    DaemonRequest {
        dst_id: u64,
        vaddr: u64,
        nr_pages: u64,
        max: u64,
    },
    #[error("the lazy-pages daemon asked for pages of process {dst_id}, which has no lazy pagemap image")]
    UnknownProcess { dst_id: u64 },
    #[error("the lazy-pages daemon has more than {max} requests waiting")]
    TooManyRequests { max: usize },
    #[error("cannot answer the lazy-pages daemon")]
    WriteDaemon(#[source] std::io::Error),
    #[error("cannot send a request to the source's page server")]
    WriteSource(#[source] std::io::Error),
    #[error("cannot read from the source's page server")]
    ReadSource(#[source] std::io::Error),
    #[error("the source's page server closed the stream while {what} was expected")]
    SourceEof { what: &'static str },
    #[error("the source answered {got_cmd:#x} for {got_pages} pages at {got_vaddr:#x} of {got_dst:#x} a request for {nr_pages} pages at {vaddr:#x} of {dst_id}")]
    SourceAnswer {
        dst_id: u64,
        vaddr: u64,
        nr_pages: u64,
        got_cmd: u32,
        got_dst: u64,
        got_vaddr: u64,
        got_pages: u64,
    },
    #[error("cannot start the proxy's threads")]
    Thread(#[source] std::io::Error),
    #[error("a thread of the proxy panicked")]
    Panicked,
}

/// What the proxy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Lazy bytes in the images.
    pub lazy_bytes: u64,
    /// Page bytes received from the source.
    pub source_bytes: u64,
    /// Of those, asked for by the prefetch.
    pub prefetched_bytes: u64,
    /// Page bytes answered to the daemon.
    pub daemon_bytes: u64,
    /// Daemon requests answered.
    pub daemon_requests: u64,
    /// Daemon requests forwarded to the source (their first page was not yet requested).
    pub forwarded: u64,
}

/// One 32-byte command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Iov {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    fn parse(b: &[u8; PS_IOV_SIZE]) -> Iov {
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        Iov {
            cmd: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    fn bytes(&self) -> [u8; PS_IOV_SIZE] {
        let mut b = [0u8; PS_IOV_SIZE];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }
}

/// Reads one command; `Ok(None)` at a clean end of the stream.
fn read_iov(s: &mut impl Read) -> std::io::Result<Result<Option<Iov>, usize>> {
    let mut b = [0u8; PS_IOV_SIZE];
    let mut have = 0;
    while have < PS_IOV_SIZE {
        match s.read(&mut b[have..]) {
            Ok(0) if have == 0 => return Ok(Ok(None)),
            Ok(0) => return Ok(Err(have)),
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Ok(Some(Iov::parse(&b))))
}

/// Received pages not yet taken by the daemon: part of a buffer shared with the other parts
/// of the same answer.
#[derive(Debug, Clone)]
struct Piece {
    end: u64,
    buf: Arc<Vec<u8>>,
    /// Offset of the piece's first page in `buf`.
    off: usize,
}

/// A daemon command waiting for its answer.
#[derive(Debug, Clone, Copy)]
enum DaemonCmd {
    Get {
        dst_id: u64,
        vaddr: u64,
        nr_pages: u64,
    },
    Close(Iov),
}

/// A request sent to the source, waiting for its answer.
#[derive(Debug, Clone, Copy)]
enum SourceReq {
    Get {
        dst_id: u64,
        vaddr: u64,
        nr_pages: u64,
        /// Carved out of the not yet requested ranges (a short answer puts the rest back).
        from_map: bool,
        prefetch: bool,
    },
    Close,
}

/// One process's pages: not yet requested, on their way, received.
#[derive(Debug, Default)]
struct Space {
    pending: BTreeMap<u64, u64>,
    inflight: BTreeMap<u64, u64>,
    cache: BTreeMap<u64, Piece>,
}

impl Space {
    /// The first address above `addr` where a known range starts (pending, on its way or
    /// received): a request for pages outside them must stop there.
    fn next_known(&self, addr: u64) -> u64 {
        let first =
            |m: &BTreeMap<u64, u64>| m.range(addr + 1..).next().map_or(u64::MAX, |(s, _)| *s);
        let cached = self
            .cache
            .range(addr + 1..)
            .next()
            .map_or(u64::MAX, |(s, _)| *s);
        first(&self.pending).min(first(&self.inflight)).min(cached)
    }
}

#[derive(Debug)]
struct State {
    spaces: BTreeMap<u64, Space>,
    daemon: VecDeque<DaemonCmd>,
    /// The prefetch gate is open ([`PrefetchGate`]).
    started: bool,
    /// The daemon's close went to the source: nothing more is asked.
    closed: bool,
    sent: VecDeque<SourceReq>,
    /// Prefetch bytes on their way.
    prefetch_inflight: u64,
    /// Bytes of every request on their way.
    inflight: u64,
    /// Bytes in the cache.
    cached: u64,
    /// Where the prefetch goes on: (dst_id, address).
    cursor: (u64, u64),
    close_status: Option<[u8; 4]>,
    /// Set by the first failing thread, or when the proxy ends.
    stop: bool,
    error: Option<LazyProxyError>,
    summary: Summary,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    limits: Limits,
    /// Copies of both sockets, to unblock every thread when the proxy stops.
    daemon: UnixStream,
    source: UnixStream,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the first error and stops every thread.
    fn fail(&self, e: LazyProxyError) {
        let mut st = self.lock();
        if st.error.is_none() && !st.stop {
            st.error = Some(e);
        }
        st.stop = true;
        drop(st);
        self.cv.notify_all();
        self.shutdown();
    }

    fn shutdown(&self) {
        let _ = self.daemon.shutdown(Shutdown::Both);
        let _ = self.source.shutdown(Shutdown::Both);
    }
}

/// What the answering thread does next.
enum Action {
    /// Answer the daemon's first request with these pages.
    Answer {
        head: Iov,
        buf: Arc<Vec<u8>>,
        off: usize,
    },
    /// Send a request to the source.
    Request(Iov),
    /// Pass the daemon's close to the source.
    Close(Iov),
    /// Pass the source's close status to the daemon; the end.
    Finish([u8; 4]),
}

/// Runs the proxy between the daemon's socket and the source's until the session ends
/// (the daemon's close answered) or fails. Blocking.
pub fn run(
    daemon: UnixStream,
    source: UnixStream,
    map: LazyMap,
    limits: Limits,
) -> Result<Summary, LazyProxyError> {
    let (proxy, gate) = Proxy::new(daemon, source, map, limits)?;
    gate.open();
    proxy.run()
}

/// A proxy ready to run ([`Proxy::run`]); it prefetches once its [`PrefetchGate`] is open.
pub struct Proxy {
    shared: Arc<Shared>,
    daemon: UnixStream,
    source: UnixStream,
}

/// Starts the prefetch of a [`Proxy`]: the agent opens it once the restored container runs, so
/// that the transfer takes no CPU and no connection time from the downtime (the destination
/// reads the restored command lines through the daemon while the container is still stopped).
/// Until then the daemon's own requests are answered all the same.
pub struct PrefetchGate(Arc<Shared>);

impl PrefetchGate {
    pub fn open(&self) {
        self.0.lock().started = true;
        self.0.cv.notify_all();
    }
}

impl Proxy {
    /// A proxy between the daemon's end and the source's end of two sockets, for the lazy
    /// ranges of `map`.
    pub fn new(
        daemon: UnixStream,
        source: UnixStream,
        map: LazyMap,
        limits: Limits,
    ) -> Result<(Proxy, PrefetchGate), LazyProxyError> {
        let shared = Arc::new(Shared::new(&daemon, &source, map, limits)?);
        let gate = PrefetchGate(shared.clone());
        Ok((
            Proxy {
                shared,
                daemon,
                source,
            },
            gate,
        ))
    }

    /// Runs until the session ends (the daemon's close answered) or fails. Blocking.
    pub fn run(self) -> Result<Summary, LazyProxyError> {
        run_proxy(self.shared, self.daemon, self.source)
    }
}

impl Shared {
    fn new(
        daemon: &UnixStream,
        source: &UnixStream,
        map: LazyMap,
        limits: Limits,
    ) -> Result<Shared, LazyProxyError> {
        let clone = |s: &UnixStream| s.try_clone().map_err(LazyProxyError::Thread);
        let lazy_bytes = map.bytes();
        let spaces = map
            .0
            .into_iter()
            .map(|(id, pending)| {
                (
                    id,
                    Space {
                        pending,
                        ..Space::default()
                    },
                )
            })
            .collect();
        Ok(Shared {
            state: Mutex::new(State {
                spaces,
                daemon: VecDeque::new(),
                started: false,
                closed: false,
                sent: VecDeque::new(),
                prefetch_inflight: 0,
                inflight: 0,
                cached: 0,
                cursor: (0, 0),
                close_status: None,
                stop: false,
                error: None,
                summary: Summary {
                    lazy_bytes,
                    ..Summary::default()
                },
            }),
            cv: Condvar::new(),
            limits,
            daemon: clone(daemon)?,
            source: clone(source)?,
        })
    }
}

fn run_proxy(
    shared: Arc<Shared>,
    daemon: UnixStream,
    source: UnixStream,
) -> Result<Summary, LazyProxyError> {
    let clone = |s: &UnixStream| s.try_clone().map_err(LazyProxyError::Thread);
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(LazyProxyError::Thread)
    };
    let (d_in, s_in) = (clone(&daemon)?, clone(&source)?);
    let sh = shared.clone();
    let daemon_reader = spawn(
        "lazy-proxy-daemon",
        Box::new(move || {
            if let Err(e) = read_daemon(&sh, d_in) {
                sh.fail(e);
            }
        }),
    )?;
    let sh = shared.clone();
    let source_reader = match spawn(
        "lazy-proxy-source",
        Box::new(move || {
            if let Err(e) = read_source(&sh, s_in) {
                sh.fail(e);
            }
        }),
    ) {
        Ok(t) => t,
        Err(e) => {
            shared.fail(LazyProxyError::Panicked);
            let _ = daemon_reader.join();
            return Err(e);
        }
    };
    let r = answer(&shared, daemon, source);
    if let Err(e) = r {
        shared.fail(e);
    } else {
        let mut st = shared.lock();
        st.stop = true;
        drop(st);
        shared.cv.notify_all();
        shared.shutdown();
    }
    let panicked = daemon_reader.join().is_err() | source_reader.join().is_err();
    let mut st = shared.lock();
    match st.error.take() {
        Some(e) => Err(e),
        None if panicked => Err(LazyProxyError::Panicked),
        None => Ok(st.summary.clone()),
    }
}

/// The daemon's commands, checked, into the queue.
fn read_daemon(sh: &Shared, mut s: UnixStream) -> Result<(), LazyProxyError> {
    let max = sh.limits.max_request_pages;
    loop {
        let iov = match read_iov(&mut s) {
            Ok(Ok(Some(iov))) => iov,
            // Only a daemon that died ends its stream: after its close it waits for the status,
            // and this reader has stopped by then.
            Ok(Ok(None)) => return Err(LazyProxyError::DaemonEof),
            Ok(Err(have)) => return Err(LazyProxyError::DaemonTruncated { have }),
            Err(e) => {
                if sh.lock().stop {
                    return Ok(());
                }
                return Err(LazyProxyError::ReadDaemon(e));
            }
        };
        let cmd = match iov.cmd {
            PS_IOV_GET => {
                let bad = iov.nr_pages == 0
                    || iov.nr_pages > max
                    || !iov.vaddr.is_multiple_of(PAGE_SIZE)
                    || iov.vaddr.checked_add(iov.nr_pages * PAGE_SIZE).is_none();
                if bad {
                    return Err(LazyProxyError::DaemonRequest {
                        dst_id: iov.dst_id,
                        vaddr: iov.vaddr,
                        nr_pages: iov.nr_pages,
                        max,
                    });
                }
                DaemonCmd::Get {
                    dst_id: iov.dst_id,
                    vaddr: iov.vaddr,
                    nr_pages: iov.nr_pages,
                }
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => DaemonCmd::Close(iov),
            cmd => return Err(LazyProxyError::DaemonCommand { cmd }),
        };
        let mut st = sh.lock();
        if let DaemonCmd::Get { dst_id, .. } = cmd {
            if !st.spaces.contains_key(&dst_id) {
                return Err(LazyProxyError::UnknownProcess { dst_id });
            }
        }
        if st.daemon.len() >= sh.limits.max_queued {
            return Err(LazyProxyError::TooManyRequests {
                max: sh.limits.max_queued,
            });
        }
        st.daemon.push_back(cmd);
        drop(st);
        sh.cv.notify_all();
        // After the close the daemon waits for its status; nothing else may follow.
        if let DaemonCmd::Close(_) = cmd {
            return Ok(());
        }
    }
}

/// The source's answers, checked, into the cache.
fn read_source(sh: &Shared, mut s: UnixStream) -> Result<(), LazyProxyError> {
    loop {
        let req = {
            let mut st = sh.lock();
            loop {
                if st.stop {
                    return Ok(());
                }
                if let Some(r) = st.sent.front() {
                    break *r;
                }
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let read_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                LazyProxyError::SourceEof { what: "page data" }
            } else {
                LazyProxyError::ReadSource(e)
            }
        };
        let (dst_id, vaddr, nr_pages, from_map, prefetch) = match req {
            SourceReq::Close => {
                let mut status = [0u8; 4];
                s.read_exact(&mut status).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        LazyProxyError::SourceEof {
                            what: "the close status",
                        }
                    } else {
                        LazyProxyError::ReadSource(e)
                    }
                })?;
                let mut st = sh.lock();
                st.sent.pop_front();
                st.close_status = Some(status);
                drop(st);
                sh.cv.notify_all();
                return Ok(());
            }
            SourceReq::Get {
                dst_id,
                vaddr,
                nr_pages,
                from_map,
                prefetch,
            } => (dst_id, vaddr, nr_pages, from_map, prefetch),
        };
        let head = match read_iov(&mut s).map_err(LazyProxyError::ReadSource)? {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return Err(LazyProxyError::SourceEof { what: "an answer" }),
        };
        if head.cmd != ANSWER_CMD
            || head.dst_id != dst_id
            || head.vaddr != vaddr
            || head.nr_pages == 0
            || head.nr_pages > nr_pages
        {
            return Err(LazyProxyError::SourceAnswer {
                dst_id,
                vaddr,
                nr_pages,
                got_cmd: head.cmd,
                got_dst: head.dst_id,
                got_vaddr: head.vaddr,
                got_pages: head.nr_pages,
            });
        }
        // Bounded: at most what was asked, which the proxy chose within its limits.
        let len = head.nr_pages * PAGE_SIZE;
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).map_err(read_err)?;
        let mut st = sh.lock();
        st.sent.pop_front();
        let asked = nr_pages * PAGE_SIZE;
        st.inflight -= asked;
        if prefetch {
            st.prefetch_inflight -= asked;
            st.summary.prefetched_bytes += len;
        }
        st.summary.source_bytes += len;
        st.cached += len;
        let space = st.spaces.entry(dst_id).or_default();
        carve(&mut space.inflight, vaddr, vaddr + asked);
        if len < asked && from_map {
            // The source stops at the end of one of its runs: the rest is asked for again.
            insert_merged(&mut space.pending, vaddr + len, vaddr + asked);
        }
        space.cache.insert(
            vaddr,
            Piece {
                end: vaddr + len,
                buf: Arc::new(buf),
                off: 0,
            },
        );
        drop(st);
        sh.cv.notify_all();
    }
}

/// Answers the daemon and sends the source's requests, until the session's end.
fn answer(
    sh: &Shared,
    mut daemon: UnixStream,
    mut source: UnixStream,
) -> Result<(), LazyProxyError> {
    loop {
        let action = {
            let mut st = sh.lock();
            loop {
                if st.stop {
                    return Ok(());
                }
                if let Some(a) = next_action(&mut st, &sh.limits)? {
                    // A request may have joined `sent`: the source's reader waits for it.
                    sh.cv.notify_all();
                    break a;
                }
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        match action {
            Action::Answer { head, buf, off } => {
                let len = (head.nr_pages * PAGE_SIZE) as usize;
                daemon
                    .write_all(&head.bytes())
                    .and_then(|()| daemon.write_all(&buf[off..off + len]))
                    .map_err(LazyProxyError::WriteDaemon)?;
            }
            Action::Request(iov) | Action::Close(iov) => source
                .write_all(&iov.bytes())
                .map_err(LazyProxyError::WriteSource)?,
            Action::Finish(status) => {
                daemon
                    .write_all(&status)
                    .map_err(LazyProxyError::WriteDaemon)?;
                return Ok(());
            }
        }
    }
}

/// Chooses the next step under the lock; `None`: wait for news.
fn next_action(st: &mut State, limits: &Limits) -> Result<Option<Action>, LazyProxyError> {
    if let Some(status) = st.close_status.take() {
        return Ok(Some(Action::Finish(status)));
    }
    // The first daemon command: answer it if it can be.
    match st.daemon.front().copied() {
        Some(DaemonCmd::Close(iov)) if st.sent.is_empty() => {
            st.daemon.pop_front();
            st.sent.push_back(SourceReq::Close);
            st.closed = true;
            return Ok(Some(Action::Close(iov)));
        }
        Some(DaemonCmd::Get {
            dst_id,
            vaddr,
            nr_pages,
        }) => {
            if let Some(a) = take_cached(st, dst_id, vaddr, nr_pages) {
                st.daemon.pop_front();
                return Ok(Some(a));
            }
        }
        // A close waits for the requests on their way; nothing to answer yet.
        Some(DaemonCmd::Close(_)) | None => {}
    }
    // Any daemon request whose first page nobody asked for yet: ask for it now.
    for i in 0..st.daemon.len() {
        let DaemonCmd::Get {
            dst_id,
            vaddr,
            nr_pages,
        } = st.daemon[i]
        else {
            continue;
        };
        let space = st
            .spaces
            .get_mut(&dst_id)
            .ok_or(LazyProxyError::UnknownProcess { dst_id })?;
        let want = vaddr + nr_pages * PAGE_SIZE;
        let (end, from_map) = if let Some((_, e)) = holding(&space.pending, vaddr) {
            (e.min(want), true)
        } else if holding(&space.inflight, vaddr).is_some()
            || holding_piece(&space.cache, vaddr).is_some()
        {
            // On its way or here: answered in its turn.
            continue;
        } else {
            // Pages the daemon took already (a forked child's copy) or outside the lazy
            // ranges: exactly what it asked for, up to the next range known here.
            (want.min(space.next_known(vaddr)), false)
        };
        if from_map {
            carve(&mut space.pending, vaddr, end);
        }
        insert_merged(&mut space.inflight, vaddr, end);
        st.summary.forwarded += 1;
        if from_map && nr_pages > 1 {
            // The daemon's background walk (a fault asks for one page) went past the prefetch:
            // the prefetch goes on right after it, so that its next requests find their pages.
            st.cursor = (dst_id, end);
        }
        return Ok(Some(send(st, dst_id, vaddr, end, from_map, false)));
    }
    // Prefetch the next run while the window and the cache allow, unless the session ends.
    let closing = st.closed || matches!(st.daemon.back(), Some(DaemonCmd::Close(_)));
    if st.started
        && !closing
        && st.prefetch_inflight < limits.window_bytes
        && st.cached + st.inflight + limits.chunk_bytes <= limits.cache_bytes
    {
        if let Some((dst_id, start, end)) = next_prefetch(st, limits.chunk_bytes) {
            let space = st.spaces.entry(dst_id).or_default();
            carve(&mut space.pending, start, end);
            insert_merged(&mut space.inflight, start, end);
            st.cursor = (dst_id, end);
            return Ok(Some(send(st, dst_id, start, end, true, true)));
        }
    }
    Ok(None)
}

/// Records a request of `[start, end)` to the source and returns it to send.
fn send(
    st: &mut State,
    dst_id: u64,
    start: u64,
    end: u64,
    from_map: bool,
    prefetch: bool,
) -> Action {
    let nr_pages = (end - start) / PAGE_SIZE;
    st.inflight += end - start;
    if prefetch {
        st.prefetch_inflight += end - start;
    }
    st.sent.push_back(SourceReq::Get {
        dst_id,
        vaddr: start,
        nr_pages,
        from_map,
        prefetch,
    });
    Action::Request(Iov {
        cmd: PS_IOV_GET,
        nr_pages,
        vaddr: start,
        dst_id,
    })
}

/// The next not yet requested run from the prefetch cursor on (wrapping around once), at most
/// `chunk` bytes.
fn next_prefetch(st: &State, chunk: u64) -> Option<(u64, u64, u64)> {
    let (cid, caddr) = st.cursor;
    let after = st
        .spaces
        .range(cid..)
        .flat_map(|(&id, sp)| {
            let from = if id == cid { caddr } else { 0 };
            // A range holding the cursor counts from the cursor on.
            let first = holding(&sp.pending, from).map(|(_, e)| (id, from, e));
            first
                .into_iter()
                .chain(sp.pending.range(from..).map(move |(&s, &e)| (id, s, e)))
        })
        .next();
    let (id, s, e) = after.or_else(|| {
        st.spaces
            .iter()
            .find_map(|(&id, sp)| sp.pending.iter().next().map(|(&s, &e)| (id, s, e)))
    })?;
    let chunk = (chunk / PAGE_SIZE).max(1) * PAGE_SIZE;
    Some((id, s, e.min(s.saturating_add(chunk))))
}

/// The cached piece holding `addr`, by its start.
fn holding_piece(cache: &BTreeMap<u64, Piece>, addr: u64) -> Option<u64> {
    let (&s, p) = cache.range(..=addr).next_back()?;
    (addr < p.end).then_some(s)
}

/// Takes the cached run at `vaddr` (at most `nr_pages`) out of the cache as an answer.
fn take_cached(st: &mut State, dst_id: u64, vaddr: u64, nr_pages: u64) -> Option<Action> {
    let space = st.spaces.get_mut(&dst_id)?;
    let start = holding_piece(&space.cache, vaddr)?;
    let piece = space.cache.remove(&start)?;
    let end = piece.end.min(vaddr + nr_pages * PAGE_SIZE);
    let off = piece.off + (vaddr - start) as usize;
    // The parts before and after stay for later requests; a small part is copied out so that
    // it does not keep its whole buffer alive (memory stays within 4 times what is counted).
    let keep = |s: u64, e: u64| {
        let at = piece.off + (s - start) as usize;
        let len = (e - s) as usize;
        if len * 4 < piece.buf.len() {
            Piece {
                end: e,
                buf: Arc::new(piece.buf[at..at + len].to_vec()),
                off: 0,
            }
        } else {
            Piece {
                end: e,
                buf: piece.buf.clone(),
                off: at,
            }
        }
    };
    if start < vaddr {
        space.cache.insert(start, keep(start, vaddr));
    }
    if end < piece.end {
        space.cache.insert(end, keep(end, piece.end));
    }
    let taken = end - vaddr;
    st.cached -= taken;
    st.summary.daemon_bytes += taken;
    st.summary.daemon_requests += 1;
    Some(Action::Answer {
        head: Iov {
            cmd: ANSWER_CMD,
            nr_pages: taken / PAGE_SIZE,
            vaddr,
            dst_id,
        },
        buf: piece.buf,
        off,
    })
}

mod map;
#[cfg(test)]
mod tests;
