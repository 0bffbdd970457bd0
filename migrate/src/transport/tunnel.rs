//! TCP over QUIC: a local TCP connection carried on a bidirectional stream of a migration
//! connection, so that CRIU's page server protocol (a TCP socket) runs between two agents
//! without a TCP port open between the hosts.
//!
//! One side listens on a loopback port ([`Tunnel::listen`]); each TCP connection accepted there
//! becomes a new bidirectional QUIC stream that starts with a [`TunnelHeader`] frame naming the
//! migration and the service. The other side accepts those streams ([`serve`]), asks its
//! resolver where the named service listens, connects there and copies both ways. A half-close
//! on one side is passed on (FIN on the stream, `shutdown(SHUT_WR)` on the socket); an error
//! resets the stream so the far side sees a failure, never a clean end.
//!
//! The local end can also be a Unix stream socket instead of loopback TCP: [`Tunnel::socketpair`]
//! gives the caller one end of a socketpair (for `criu dump --ps-socket FD`) and carries the
//! other, and a resolver may answer with [`Endpoint::Unix`], an already connected socket whose
//! other end a `criu page-server --ps-socket FD` holds. That removes both loopback TCP stacks.
//!
//! A resolver may also answer [`Endpoint::Pages`]: the stream's bytes are then CRIU's page server
//! protocol, written into an images directory by mig's own page writer
//! ([`crate::criu::page_writer`]) in this process, without a `criu page-server` and its socket.
//!
//! Integrity: QUIC's TLS 1.3 protects every byte of the stream (authenticated encryption); CRIU's
//! page server protocol has its own framing and reports a connection closed in the middle.

use crate::criu::page_writer::{PageSink, PageWriterError, Summary};
use crate::wire::{read_frame, write_frame, WireError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// Maximum size of a [`TunnelHeader`] frame.
pub const MAX_TUNNEL_HEADER: u32 = 4096;
/// How long the accepting side waits for the header of a new stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction.
const BUF: usize = 256 << 10;

/// What a tunnelled connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Service {
    /// The destination's `criu page-server` (pages of a streaming dump).
    PageServer,
    /// The source's post-copy dump serving pages to `criu lazy-pages`.
    LazyPages,
    /// A stream-mode source's memory presync to the destination's cache (protocol 1.4,
    /// `crate::memsync`).
    MemoryPresync,
    /// The pages of a streaming dump after a memory presync: CRIU's protocol with the pages the
    /// destination holds replaced by markers (protocol 1.4, `crate::memsync`), for mig's page
    /// writer.
    PageServerDedup,
}

/// The first frame of a tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TunnelHeader {
    pub migration_id: String,
    pub service: Service,
}

/// Why a tunnel could not be set up or carried.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a stream for the tunnel")]
    Open(#[source] quinn::ConnectionError),
    #[error("cannot exchange the tunnel header")]
    Header(#[source] WireError),
    #[error("no tunnel header within {0:?}")]
    HeaderTimeout(Duration),
    #[error("the stream ended before its tunnel header")]
    NoHeader,
    #[error("nothing serves {service:?} for migration {migration_id}")]
    Unknown {
        migration_id: String,
        service: Service,
    },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tunnel copy failed")]
    Copy(#[source] std::io::Error),
    #[error("cannot make a socket pair for the tunnel")]
    SocketPair(#[source] std::io::Error),
    #[error("the page writer of migration {migration_id} failed (its waiter has the reason)")]
    Pages { migration_id: String },
    #[error("the memory presync failed")]
    Presync(#[source] crate::memsync::MemsyncError),
    #[error("the deduplicated page stream failed")]
    Dedup(#[source] crate::memsync::MemsyncError),
    #[error("cannot use the unix socket of {service:?} for migration {migration_id}")]
    Unix {
        migration_id: String,
        service: Service,
        #[source]
        source: std::io::Error,
    },
}

/// Where [`serve`] delivers the bytes of a tunnel stream on its side.
#[derive(Debug)]
pub enum Endpoint {
    /// Connect to a TCP listener (for example `criu page-server --port`).
    Tcp(SocketAddr),
    /// An already connected Unix stream socket whose other end a local process holds (for
    /// example `criu page-server --ps-socket FD`); used for one stream only.
    Unix(std::os::unix::net::UnixStream),
    /// [`Endpoint::Unix`], taking at most `max_bytes` from the peer: past it the stream is
    /// stopped and the socket closed (a destination's bound on what a peer may send it,
    /// `migd --max-incoming-bytes`).
    UnixBounded {
        socket: std::os::unix::net::UnixStream,
        max_bytes: u64,
    },
    /// mig's page writer: the stream is a dump's page server protocol, written into the sink's
    /// images directory here; used for one stream.
    Pages(PageSink),
    /// A memory presync's pages, kept in memory for the page writer of the same migration
    /// (`crate::memsync`); used for one stream.
    Presync(crate::memsync::stream::PresyncSink),
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Endpoint {
        Endpoint::Tcp(a)
    }
}

/// Socket buffer asked for each end of a tunnel's socketpair (the kernel's default, about
/// 208 KiB, makes many small reads and wake-ups for a stream of pages).
const UNIX_BUF: usize = 4 << 20;

/// A connected pair of Unix stream sockets (close-on-exec) with large buffers.
pub fn unix_pair() -> std::io::Result<(
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    use nix::sys::socket::{setsockopt, sockopt};
    for s in [&a, &b] {
        // Best effort: a smaller buffer only costs wake-ups.
        if setsockopt(s, sockopt::SndBufForce, &UNIX_BUF).is_err() {
            let _ = setsockopt(s, sockopt::SndBuf, &UNIX_BUF);
        }
        if setsockopt(s, sockopt::RcvBufForce, &UNIX_BUF).is_err() {
            let _ = setsockopt(s, sockopt::RcvBuf, &UNIX_BUF);
        }
    }
    Ok((a, b))
}

/// Bytes carried by a tunnel, both directions.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// Codes a receiving agent stops or resets a carried stream with, so that the sender can say
/// why its client's socket broke (CRIU only sees a broken pipe): the memory presync's stream
/// (docs/protocol.md) and the dump's page stream.
pub const STOP_FAILED: u32 = 2;
/// It could not write what arrived (a full disk?).
pub const STOP_WRITE: u32 = 3;
/// The stream broke the rules of its protocol.
pub const STOP_INVALID: u32 = 4;
/// The stream passed the most bytes this agent takes from a peer (`migd --max-incoming-bytes`).
pub const STOP_LIMIT: u32 = 5;

/// What a stop or reset code of a receiving agent means, in words.
pub fn stop_reason(code: u64) -> &'static str {
    match code {
        c if c == u64::from(STOP_WRITE) => {
            "it could not write the pages into its images directory (full disk?)"
        }
        c if c == u64::from(STOP_INVALID) => "it found the stream invalid",
        c if c == u64::from(STOP_LIMIT) => {
            "the pages passed the most it takes from a peer (its migd --max-incoming-bytes)"
        }
        _ => "it failed",
    }
}

/// The code the peer stopped (our sending) or reset (its sending) a stream with, when `e` is
/// that.
pub fn peer_code(e: &std::io::Error) -> Option<u64> {
    let inner = e.get_ref()?;
    if let Some(quinn::WriteError::Stopped(code)) = inner.downcast_ref::<quinn::WriteError>() {
        return Some(code.into_inner());
    }
    if let Some(quinn::ReadError::Reset(code)) = inner.downcast_ref::<quinn::ReadError>() {
        return Some(code.into_inner());
    }
    None
}

/// The first code the peer stopped or reset a carried stream with (shared by a tunnel and its
/// copying tasks).
#[derive(Debug, Clone, Default)]
pub struct PeerStop(Arc<std::sync::OnceLock<u64>>);

impl PeerStop {
    /// Keeps the peer's code when `e` carries one (the first one counts).
    pub fn note(&self, e: &std::io::Error) {
        if let Some(code) = peer_code(e) {
            let _ = self.0.set(code);
        }
    }

    /// Why the peer ended the stream, when it did so with a code.
    pub fn reason(&self) -> Option<&'static str> {
        self.0.get().map(|&c| stop_reason(c))
    }
}

/// Called once when the peer's side of a carried connection ended (its FIN, a reset or a lost
/// connection) while the local client had not yet closed its own side, before the local
/// socket learns of it ([`Tunnel::socketpair_guarded`]).
pub type PeerEndHook = Box<dyn FnOnce() + Send>;

/// A loopback listener whose connections are carried to the peer, or one Unix socket carried
/// to the peer ([`Tunnel::socketpair`]). Stops (and drops every connection it carries) when
/// dropped.
#[derive(Debug)]
pub struct Tunnel {
    addr: Option<SocketAddr>,
    /// [`Tunnel::socketpair`]: the end for the local client, until taken.
    client: Mutex<Option<OwnedFd>>,
    bytes: Counter,
    stop: PeerStop,
    task: tokio::task::JoinHandle<()>,
}

impl Tunnel {
    /// Listens on `127.0.0.1:0`; every accepted connection goes to the peer of `conn` as a new
    /// stream starting with `header`.
    pub async fn listen(
        conn: quinn::Connection,
        header: TunnelHeader,
    ) -> Result<Tunnel, TunnelError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TunnelError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| TunnelError::Listen { addr, source })?;
        let bytes = Counter::default();
        let stop = PeerStop::default();
        let task = tokio::spawn(forward(listener, conn, header, bytes.clone(), stop.clone()));
        Ok(Tunnel {
            addr: Some(addr),
            client: Mutex::new(None),
            bytes,
            stop,
            task,
        })
    }

    /// One connection without a listener: a socketpair whose one end is carried to the peer of
    /// `conn` as a new stream starting with `header`; the other end is for the local client
    /// ([`Tunnel::take_client`], for example `criu dump --page-server --ps-socket FD`). The
    /// stream ends when every copy of the client's end is closed.
    pub fn socketpair(
        conn: quinn::Connection,
        header: TunnelHeader,
    ) -> Result<Tunnel, TunnelError> {
        // No one holds the carried end but the tunnel: the client sees the stream's end.
        Tunnel::socketpair_with(conn, header, None).map(|(tunnel, _carried)| tunnel)
    }

    /// The tunnel, and a second descriptor of the end it carries.
    fn socketpair_with(
        conn: quinn::Connection,
        header: TunnelHeader,
        hook: Option<PeerEndHook>,
    ) -> Result<(Tunnel, OwnedFd), TunnelError> {
        let (client, mine) = unix_pair().map_err(TunnelError::SocketPair)?;
        let carried = OwnedFd::from(mine.try_clone().map_err(TunnelError::SocketPair)?);
        mine.set_nonblocking(true)
            .map_err(TunnelError::SocketPair)?;
        let mine = UnixStream::from_std(mine).map_err(TunnelError::SocketPair)?;
        let bytes = Counter::default();
        let counter = bytes.clone();
        let stop = PeerStop::default();
        let noted = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = carry_out(mine, &conn, &header, &counter, hook, &noted).await {
                tracing::warn!(error = %super::chain(&e), service = ?header.service, "tunnel failed");
            }
        });
        let tunnel = Tunnel {
            addr: None,
            client: Mutex::new(Some(OwnedFd::from(client))),
            bytes,
            stop,
            task,
        };
        Ok((tunnel, carried))
    }

    /// [`Tunnel::socketpair`] whose `hook` runs when the peer's side ends first: before the
    /// local client's socket sees an end of file or an error. A post-copy's destination uses
    /// it to stop the container before its lazy-pages daemon gives up (the kernel then maps
    /// zero pages where the missing memory was). Not called when the local client closed its
    /// side first, or within half a second after the peer's clean end (the normal end of a
    /// session the client ends: the peer answers its close, then ends), nor when the tunnel is
    /// dropped.
    ///
    /// Also returns a second descriptor of the end the tunnel carries. Given to the client's
    /// process (kept open, never used), it keeps the client's socket from seeing an end of file
    /// when the tunnel's end closes, for example because this process died: the client then
    /// waits instead of failing, and whoever ends the tunnel on purpose must end the client too.
    pub fn socketpair_guarded(
        conn: quinn::Connection,
        header: TunnelHeader,
        hook: PeerEndHook,
    ) -> Result<(Tunnel, OwnedFd), TunnelError> {
        Tunnel::socketpair_with(conn, header, Some(hook))
    }

    /// [`Tunnel::socketpair`] for a dump's pages after a memory presync: the carried end is
    /// encoded into the deduplicated page stream (`crate::memsync::dedup`), the pages of `index`
    /// that did not change since becoming markers; `stats` counts what went.
    pub fn socketpair_dedup(
        conn: quinn::Connection,
        header: TunnelHeader,
        index: Arc<crate::memsync::SentIndex>,
        stats: Arc<crate::memsync::dedup::DedupStats>,
    ) -> Result<Tunnel, TunnelError> {
        let (client, mine) = unix_pair().map_err(TunnelError::SocketPair)?;
        let stop = PeerStop::default();
        let noted = stop.clone();
        let task = tokio::spawn(async move {
            let r = async {
                let (mut send, recv) = conn.open_bi().await.map_err(TunnelError::Open)?;
                write_frame(&mut send, &header, MAX_TUNNEL_HEADER)
                    .await
                    .map_err(TunnelError::Header)?;
                crate::memsync::dedup::carry(mine, send, recv, index, stats, &noted)
                    .await
                    .map_err(TunnelError::Dedup)
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %super::chain(&e), "deduplicated page tunnel failed");
            }
        });
        Ok(Tunnel {
            addr: None,
            client: Mutex::new(Some(OwnedFd::from(client))),
            bytes: Counter::default(),
            stop,
            task,
        })
    }

    /// Where the local client (CRIU) connects; `None` for [`Tunnel::socketpair`].
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub fn port(&self) -> Option<u16> {
        self.addr.map(|a| a.port())
    }

    /// [`Tunnel::socketpair`]: the local client's end of the pair (once). The caller passes it
    /// to the client and closes its own copy once the client holds it.
    pub fn take_client(&self) -> Option<OwnedFd> {
        self.client.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits until the carried connection(s) ended (both directions). For a listening tunnel
    /// that is when the connection closes.
    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Bytes carried so far (both directions).
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Why the peer ended a carried stream, when it said (a code of [`stop_reason`]): the
    /// client's own error is only a broken pipe.
    pub fn peer_stopped(&self) -> Option<&'static str> {
        self.stop.reason()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    listener: TcpListener,
    conn: quinn::Connection,
    header: TunnelHeader,
    bytes: Counter,
    stop: PeerStop,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let tcp = match r {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (conn, header, bytes, stop) =
                    (conn.clone(), header.clone(), bytes.clone(), stop.clone());
                tasks.spawn(async move {
                    if let Err(e) = carry_out(tcp, &conn, &header, &bytes, None, &stop).await {
                        tracing::warn!(error = %super::chain(&e), service = ?header.service, "tunnel failed");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = conn.closed() => break,
        }
    }
}

async fn carry_out<S>(
    io: S,
    conn: &quinn::Connection,
    header: &TunnelHeader,
    bytes: &Counter,
    hook: Option<PeerEndHook>,
    stop: &PeerStop,
) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let opened = async {
        let (mut send, recv) = conn.open_bi().await.map_err(TunnelError::Open)?;
        write_frame(&mut send, header, MAX_TUNNEL_HEADER)
            .await
            .map_err(TunnelError::Header)?;
        Ok((send, recv))
    }
    .await;
    match opened {
        Ok((send, recv)) => splice_guarded(io, send, recv, bytes, hook, None, Some(stop)).await,
        Err(e) => {
            // The peer is gone before the first byte: the client sees it only after this.
            if let Some(h) = hook {
                h();
            }
            Err(e)
        }
    }
}

/// Accepts tunnel streams on `conn` until it closes; `resolve` says where each header's
/// service listens (`None` refuses the stream): a TCP address or a connected Unix socket
/// ([`Endpoint`]). Returns the bytes carried.
pub async fn serve<F, E>(conn: quinn::Connection, resolve: F) -> Counter
where
    F: Fn(&TunnelHeader) -> Option<E> + Send + Sync + 'static,
    E: Into<Endpoint>,
{
    let resolve = Arc::new(resolve);
    let bytes = Counter::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = conn.accept_bi() => {
                let Ok((send, recv)) = r else { break };
                let (resolve, bytes) = (resolve.clone(), bytes.clone());
                tasks.spawn(async move {
                    if let Err(e) = carry_in(send, recv, &*resolve, &bytes).await {
                        tracing::warn!(error = %super::chain(&e), "incoming tunnel failed");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
    bytes
}

async fn carry_in<F, E>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    resolve: &F,
    bytes: &Counter,
) -> Result<(), TunnelError>
where
    F: Fn(&TunnelHeader) -> Option<E>,
    E: Into<Endpoint>,
{
    let header = tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame::<TunnelHeader, _>(&mut recv, MAX_TUNNEL_HEADER),
    )
    .await
    .map_err(|_| TunnelError::HeaderTimeout(HEADER_TIMEOUT))?
    .map_err(TunnelError::Header)?
    .ok_or(TunnelError::NoHeader)?;
    let Some(endpoint) = resolve(&header).map(Into::into) else {
        let _ = send.reset(1u32.into());
        let _ = recv.stop(1u32.into());
        return Err(TunnelError::Unknown {
            migration_id: header.migration_id,
            service: header.service,
        });
    };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let tcp = match TcpStream::connect(addr).await {
                Ok(t) => t,
                Err(source) => {
                    let _ = send.reset(1u32.into());
                    let _ = recv.stop(1u32.into());
                    return Err(TunnelError::Connect { addr, source });
                }
            };
            let _ = tcp.set_nodelay(true);
            splice(tcp, send, recv, bytes).await
        }
        Endpoint::Unix(_) | Endpoint::UnixBounded { .. } => {
            let (s, max_in) = match endpoint {
                Endpoint::UnixBounded { socket, max_bytes } => (socket, Some(max_bytes)),
                Endpoint::Unix(socket) => (socket, None),
                _ => unreachable!("matched above"),
            };
            let unix = match s
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(s))
            {
                Ok(u) => u,
                Err(source) => {
                    let _ = send.reset(1u32.into());
                    let _ = recv.stop(1u32.into());
                    return Err(TunnelError::Unix {
                        migration_id: header.migration_id,
                        service: header.service,
                        source,
                    });
                }
            };
            splice_guarded(unix, send, recv, bytes, None, max_in, None).await
        }
        Endpoint::Presync(sink) => {
            let bytes_held = sink.serve(send, recv).await.map_err(TunnelError::Presync)?;
            bytes.add(bytes_held);
            Ok(())
        }
        Endpoint::Pages(sink) => {
            write_pages(send, recv, sink, bytes)
                .await
                .map_err(|()| TunnelError::Pages {
                    migration_id: header.migration_id,
                })
        }
    }
}

/// Batches of received chunks queued for the page writer's thread (each up to [`CHUNKS`]
/// chunks of about one packet: about 5 MB in all, as much as the socket buffers of a
/// `criu page-server` hold).
const WRITER_QUEUE: usize = 64;

/// Runs mig's page writer on a tunnel stream ([`Endpoint::Pages`]): this task reads quinn's
/// received chunks and hands them (without copying their bytes) to a blocking thread that
/// writes the page data into the sink's directory, so that receiving and writing overlap as they
/// did with a `criu page-server` process; the writer's replies go back on the stream. The
/// outcome goes to the sink's waiter as soon as the close command is written and answered (the
/// dump may keep its end open a little longer); a failure also resets the stream, so the dump
/// fails too.
async fn write_pages(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    sink: PageSink,
    bytes: &Counter,
) -> Result<(), ()> {
    let (batch_tx, mut batch_rx) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(WRITER_QUEUE);
    let (reply_tx, mut reply_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut w = sink.writer();
    let writer = tokio::task::spawn_blocking(move || {
        let mut reply = Vec::new();
        while let Some(batch) = batch_rx.blocking_recv() {
            let closed = w.feed(&batch, &mut reply)?;
            if !reply.is_empty() {
                let _ = reply_tx.send(std::mem::take(&mut reply));
            }
            if closed {
                break;
            }
        }
        w.finish()
    });
    tokio::pin!(writer);
    let mut batch_tx = Some(batch_tx);
    let mut chunks: Vec<bytes::Bytes> = vec![bytes::Bytes::new(); CHUNKS];
    let r: Result<Summary, PageWriterError> = loop {
        tokio::select! {
            r = &mut writer => break r.unwrap_or(Err(PageWriterError::Thread)),
            Some(reply) = reply_rx.recv() => {
                if let Err(e) = send.write_all(&reply).await {
                    break Err(PageWriterError::Reply(e.into()));
                }
                bytes.add(reply.len() as u64);
            }
            r = recv.read_chunks(&mut chunks), if batch_tx.is_some() => match r {
                Ok(Some(n)) => {
                    bytes.add(chunks[..n].iter().map(|c| c.len() as u64).sum());
                    let queued = match &batch_tx {
                        Some(tx) => tx.send(chunks[..n].to_vec()).await.is_ok(),
                        None => false,
                    };
                    if !queued {
                        // The writer ended (its outcome is in `writer`).
                        batch_tx = None;
                    }
                }
                // End of stream: the writer finishes what it has, then says whether it was whole.
                Ok(None) => batch_tx = None,
                Err(e) => break Err(PageWriterError::Read(e.into())),
            },
        }
    };
    // Stops the writer's thread (if it still runs) once it took what is queued.
    drop(batch_tx);
    let r = match r {
        Ok(summary) => {
            // The close's answer is queued before the writer ends.
            let mut sent = Ok(summary);
            while let Ok(reply) = reply_rx.try_recv() {
                if let Err(e) = send.write_all(&reply).await {
                    sent = Err(PageWriterError::Reply(e.into()));
                    break;
                }
                bytes.add(reply.len() as u64);
            }
            sent
        }
        Err(e) => Err(e),
    };
    match r {
        Ok(summary) => {
            sink.report(Ok(summary));
            let _ = send.finish();
            // The dump closes its end after the close's answer: wait for that end of stream.
            let mut extra = 0u64;
            while let Ok(Some(n)) = recv.read_chunks(&mut chunks).await {
                extra += chunks[..n].iter().map(|c| c.len() as u64).sum::<u64>();
            }
            if extra > 0 {
                tracing::warn!(bytes = extra, "page stream: bytes after the close ignored");
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %super::chain(&e), "page writer failed");
            let code = writer_code(&e);
            let _ = send.reset(code.into());
            let _ = recv.stop(code.into());
            sink.report(Err(e));
            Err(())
        }
    }
}

/// The code a failed page writer ends its stream with ([`stop_reason`]).
fn writer_code(e: &PageWriterError) -> u32 {
    use PageWriterError as E;
    match e {
        E::Create { .. } | E::Write { .. } => STOP_WRITE,
        E::TooManyBytes { .. } => STOP_LIMIT,
        E::Read(_) | E::Reply(_) | E::Thread | E::Timeout(_) | E::NeverRan => STOP_FAILED,
        _ => STOP_INVALID,
    }
}

/// Ends `send` after `r`: finished when it is `Ok`, reset (so the far side sees a failure, never
/// a clean end) when not.
pub(crate) fn finish_or_reset<T, E>(send: &mut quinn::SendStream, r: Result<T, E>) -> Result<T, E> {
    match &r {
        Ok(_) => {
            let _ = send.finish();
        }
        Err(_) => {
            let _ = send.reset(2u32.into());
        }
    }
    r
}

/// Copies `io` to `send` and `recv` to `io` until both directions ended. EOF is passed on as a
/// half-close; an error resets the stream (or stops it) so the far side sees a failure.
pub async fn splice<S>(
    io: S,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    bytes: &Counter,
) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    splice_guarded(io, send, recv, bytes, None, None, None).await
}

/// How long [`splice_guarded`] waits, after the peer ended cleanly, for the client to close
/// its own side before it calls the hook.
const PEER_END_GRACE: Duration = Duration::from_millis(500);

fn hook_armed(hook: &Mutex<Option<PeerEndHook>>) -> bool {
    hook.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// [`splice`] calling `hook` (once) when the peer's side ends or fails, or sending to it
/// fails, while the local side has not ended: before `io` hears of it. With `max_in`, more
/// bytes from the peer than that fail it ([`copy_in`]), and the peer's stream is stopped with
/// [`STOP_LIMIT`]. A code the peer stops or resets the stream with goes to `stop` before `io`
/// closes.
async fn splice_guarded<S>(
    io: S,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    bytes: &Counter,
    hook: Option<PeerEndHook>,
    max_in: Option<u64>,
    stop: Option<&PeerStop>,
) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (mut r, mut w) = tokio::io::split(io);
    let hook = Mutex::new(hook);
    let local_ended = std::sync::atomic::AtomicBool::new(false);
    let peer_ended = || {
        if !local_ended.load(Ordering::Acquire) {
            if let Some(h) = hook.lock().unwrap_or_else(|p| p.into_inner()).take() {
                h();
            }
        }
    };
    let note = |e: &std::io::Error| {
        if let Some(s) = stop {
            s.note(e);
        }
    };
    let up = async {
        let r = copy_out(&mut r, &mut send, bytes).await;
        match &r {
            Ok(()) => local_ended.store(true, Ordering::Release),
            // The client's socket failed, or the stream to the peer did: only the latter is
            // the peer's end, but either way the client must not go on unguarded.
            Err(e) => {
                note(e);
                peer_ended()
            }
        }
        finish_or_reset(&mut send, r)
    };
    let down = async {
        let r = copy_in(&mut recv, &mut w, bytes, max_in).await;
        if let Err(e) = &r {
            note(e);
        }
        // A peer that ends cleanly right after answering the client's last request (the close
        // of a session the client ends) is no failure: the client closes its side a moment
        // later. Give it that moment before taking the end as the peer's. Meanwhile the client
        // still sees its socket open.
        if r.is_ok() && hook_armed(&hook) {
            let until = tokio::time::Instant::now() + PEER_END_GRACE;
            while !local_ended.load(Ordering::Acquire) && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        peer_ended();
        match r {
            Ok(()) => {
                let _ = w.shutdown().await;
                Ok(())
            }
            Err(e) => {
                let code = if e.get_ref().is_some_and(|x| x.is::<LimitPassed>()) {
                    STOP_LIMIT
                } else {
                    STOP_FAILED
                };
                let _ = recv.stop(code.into());
                Err(e)
            }
        }
    };
    // The first failure ends both directions (dropping the socket closes it).
    tokio::try_join!(up, down)
        .map(|_| ())
        .map_err(TunnelError::Copy)
}

/// Socket to stream: each read lands in its own buffer, handed to quinn without a copy.
async fn copy_out<R>(
    r: &mut R,
    send: &mut quinn::SendStream,
    bytes: &Counter,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = bytes::BytesMut::new();
    loop {
        if buf.capacity() < BUF / 4 {
            buf.reserve(BUF);
        }
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        bytes.add(n as u64);
        send.write_chunk(buf.split().freeze()).await?;
    }
}

/// [`copy_in`]'s error when the peer sent more than the stream takes.
#[derive(Debug, thiserror::Error)]
#[error("the peer sent more than the {max} bytes this stream takes")]
struct LimitPassed {
    max: u64,
}

/// Chunks quinn holds for one vectored socket write (each about one packet).
const CHUNKS: usize = 64;

/// Stream to socket: quinn's received chunks (about one packet each) are gathered into one
/// vectored socket write, without copying them into a buffer first.
async fn copy_in<W>(
    recv: &mut quinn::RecvStream,
    w: &mut W,
    bytes: &Counter,
    max: Option<u64>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut chunks: Vec<bytes::Bytes> = vec![bytes::Bytes::new(); CHUNKS];
    let mut carried = 0u64;
    loop {
        let Some(n) = recv
            .read_chunks(&mut chunks)
            .await
            .map_err(std::io::Error::from)?
        else {
            w.flush().await?;
            return Ok(());
        };
        let total: usize = chunks[..n].iter().map(bytes::Bytes::len).sum();
        carried = carried.saturating_add(total as u64);
        if let Some(max) = max.filter(|&m| carried > m) {
            return Err(std::io::Error::other(LimitPassed { max }));
        }
        let mut slices: Vec<std::io::IoSlice<'_>> = chunks[..n]
            .iter()
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let k = w.write_vectored(rest).await?;
            if k == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut rest, k);
        }
        bytes.add(total as u64);
    }
}

#[cfg(test)]
mod tests;
