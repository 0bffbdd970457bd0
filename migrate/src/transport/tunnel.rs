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
//! Integrity: QUIC's TLS 1.3 protects every byte of the stream (authenticated encryption); CRIU's
//! page server protocol has its own framing and reports a connection closed in the middle.

use crate::wire::{read_frame, write_frame, WireError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

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

/// A loopback listener whose connections are carried to the peer. Stops (and drops every
/// connection it carries) when dropped.
#[derive(Debug)]
pub struct Tunnel {
    addr: SocketAddr,
    bytes: Counter,
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
        let task = tokio::spawn(forward(listener, conn, header, bytes.clone()));
        Ok(Tunnel { addr, bytes, task })
    }

    /// Where the local client (CRIU) connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Bytes carried so far (both directions).
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
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
                let (conn, header, bytes) = (conn.clone(), header.clone(), bytes.clone());
                tasks.spawn(async move {
                    if let Err(e) = carry_out(tcp, &conn, &header, &bytes).await {
                        tracing::warn!(error = %super::driver::chain(&e), service = ?header.service, "tunnel failed");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = conn.closed() => break,
        }
    }
}

async fn carry_out(
    tcp: TcpStream,
    conn: &quinn::Connection,
    header: &TunnelHeader,
    bytes: &Counter,
) -> Result<(), TunnelError> {
    let _ = tcp.set_nodelay(true);
    let (mut send, recv) = conn.open_bi().await.map_err(TunnelError::Open)?;
    write_frame(&mut send, header, MAX_TUNNEL_HEADER)
        .await
        .map_err(TunnelError::Header)?;
    splice(tcp, send, recv, bytes).await
}

/// Accepts tunnel streams on `conn` until it closes; `resolve` says where each header's
/// service listens (`None` refuses the stream). Returns the bytes carried.
pub async fn serve<F>(conn: quinn::Connection, resolve: F) -> Counter
where
    F: Fn(&TunnelHeader) -> Option<SocketAddr> + Send + Sync + 'static,
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
                        tracing::warn!(error = %super::driver::chain(&e), "incoming tunnel failed");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
    bytes
}

async fn carry_in<F>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    resolve: &F,
    bytes: &Counter,
) -> Result<(), TunnelError>
where
    F: Fn(&TunnelHeader) -> Option<SocketAddr>,
{
    let header = tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame::<TunnelHeader, _>(&mut recv, MAX_TUNNEL_HEADER),
    )
    .await
    .map_err(|_| TunnelError::HeaderTimeout(HEADER_TIMEOUT))?
    .map_err(TunnelError::Header)?
    .ok_or(TunnelError::NoHeader)?;
    let Some(addr) = resolve(&header) else {
        let _ = send.reset(1u32.into());
        let _ = recv.stop(1u32.into());
        return Err(TunnelError::Unknown {
            migration_id: header.migration_id,
            service: header.service,
        });
    };
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

/// Copies `io` to `send` and `recv` to `io` until both directions ended. EOF is passed on as a
/// half-close; an error resets the stream (or stops it) so the far side sees a failure.
pub async fn splice<S>(
    io: S,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    bytes: &Counter,
) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        match copy_out(&mut r, &mut send, bytes).await {
            Ok(()) => {
                let _ = send.finish();
                Ok(())
            }
            Err(e) => {
                let _ = send.reset(2u32.into());
                Err(e)
            }
        }
    };
    let down = async {
        // Reads gather several of quinn's packet-sized chunks into one large socket write.
        let mut recv_buf = BufReader::with_capacity(BUF, &mut recv);
        match copy_counted(&mut recv_buf, &mut w, bytes).await {
            Ok(()) => {
                let _ = w.shutdown().await;
                Ok(())
            }
            Err(e) => {
                let _ = recv.stop(2u32.into());
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

async fn copy_counted<R, W>(r: &mut R, w: &mut W, bytes: &Counter) -> std::io::Result<()>
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            w.flush().await?;
            return Ok(());
        }
        let n = buf.len();
        w.write_all(buf).await?;
        r.consume(n);
        bytes.add(n as u64);
    }
}

#[cfg(test)]
mod tests;
