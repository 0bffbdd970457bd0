//! Traffic between the two lab hosts from the bench process itself: each socket is made by a
//! thread that has entered the host's network namespace (`setns` affects only the calling thread,
//! and a socket stays in the namespace it was made in). Raw TCP and QUIC throughput, and the copy
//! of a directory over TCP (the runc baseline's transfer).

use super::report::{mbs, LinkRow};
use super::{progress, BenchError, Ctx};
use mig_migrate::transport::{client_config, server_config, AllowedPeers, Identity};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Ports of the bench's own traffic (each lab host has its own namespace, nothing else uses them).
const TCP_PORT: u16 = 7901;
const QUIC_PORT: u16 = 7902;
const COPY_PORT: u16 = 7903;
const CHUNK: usize = 1 << 20;

fn link_err(what: &str) -> impl FnOnce(io::Error) -> BenchError + '_ {
    move |source| BenchError::Link {
        what: what.to_string(),
        source,
    }
}

/// Runs `f` on a new thread inside network namespace `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> JoinHandle<Result<T, BenchError>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let path = Path::new("/run/netns").join(&netns);
        let enter = File::open(&path).and_then(|f| {
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
        enter.map_err(|source| BenchError::Netns { netns, source })?;
        f()
    })
}

fn join<T>(h: JoinHandle<Result<T, BenchError>>) -> Result<T, BenchError> {
    h.join().map_err(|_| BenchError::Thread)?
}

fn addr(ctx: &Ctx, host: usize, port: u16) -> SocketAddr {
    SocketAddr::new(ctx.hosts[host].address.into(), port)
}

/// Accepts one connection on host-b's `port` (in its own thread), hands it to `serve`, and runs
/// `send` on a connection from host-a. Returns both results.
fn tcp_pair<S: Send + 'static, R: Send + 'static>(
    ctx: &Ctx,
    port: u16,
    serve: impl FnOnce(TcpStream) -> Result<R, BenchError> + Send + 'static,
    send: impl FnOnce(TcpStream) -> Result<S, BenchError> + Send + 'static,
) -> Result<(S, R), BenchError> {
    let to = addr(ctx, 1, port);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = in_netns(&ctx.hosts[1].netns, move || {
        let l = TcpListener::bind(to).map_err(link_err("tcp bind"))?;
        let _ = ready_tx.send(());
        let (s, _) = l.accept().map_err(link_err("tcp accept"))?;
        serve(s)
    });
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(join(server).err().unwrap_or(BenchError::Thread));
    }
    let client = in_netns(&ctx.hosts[0].netns, move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .map_err(link_err("tcp connect"))?;
        send(s)
    });
    let sent = join(client);
    let received = join(server);
    Ok((sent?, received?))
}

/// Raw TCP: `mib` MiB from host-a to host-b on one connection.
fn tcp(ctx: &Ctx, mib: u64) -> Result<LinkRow, BenchError> {
    let total = mib << 20;
    let start = Instant::now();
    let (_, (bytes, end)) = tcp_pair(
        ctx,
        TCP_PORT,
        |mut s| {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf).map_err(link_err("tcp read"))? {
                    0 => return Ok((n, Instant::now())),
                    k => n += k as u64,
                }
            }
        },
        move |mut s| {
            let buf = vec![0x5au8; CHUNK];
            for _ in 0..(total / CHUNK as u64) {
                s.write_all(&buf).map_err(link_err("tcp write"))?;
            }
            s.shutdown(std::net::Shutdown::Write)
                .map_err(link_err("tcp shutdown"))
        },
    )?;
    let ms = end.duration_since(start).as_millis().max(1) as u64;
    Ok(LinkRow {
        proto: "tcp".into(),
        bytes,
        ms,
        mbs: mbs(bytes, ms).unwrap_or(0.0),
    })
}

fn quic_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Quic(format!("{what}: {e}"))
}

/// Raw QUIC with mig's TLS and transport settings: `mib` MiB from host-a to host-b on one
/// connection, over 4 unidirectional streams.
fn quic(ctx: &Ctx, mib: u64) -> Result<LinkRow, BenchError> {
    const STREAMS: u64 = 4;
    let server_addr = addr(ctx, 1, QUIC_PORT);
    let client_addr = addr(ctx, 0, 0);
    let server_sock = join(in_netns(&ctx.hosts[1].netns, move || {
        UdpSocket::bind(server_addr).map_err(link_err("udp bind"))
    }))?;
    let client_sock = join(in_netns(&ctx.hosts[0].netns, move || {
        UdpSocket::bind(client_addr).map_err(link_err("udp bind"))
    }))?;
    let id_a = Identity::generate("bench-a").map_err(|e| quic_err("identity", e))?;
    let id_b = Identity::generate("bench-b").map_err(|e| quic_err("identity", e))?;
    let allowed = AllowedPeers::new(HashSet::from([id_a.fingerprint().to_string()]));
    let server_cfg = server_config(&id_b, allowed).map_err(|e| quic_err("server config", e))?;
    let client_cfg =
        client_config(&id_a, id_b.fingerprint()).map_err(|e| quic_err("client config", e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(link_err("tokio runtime"))?;
    let per_stream = (mib << 20) / STREAMS;
    rt.block_on(async move {
        let runtime = Arc::new(quinn::TokioRuntime);
        let server = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_cfg),
            server_sock,
            runtime.clone(),
        )
        .map_err(link_err("quic server endpoint"))?;
        let client =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, client_sock, runtime)
                .map_err(link_err("quic client endpoint"))?;
        let receiver = tokio::spawn(async move {
            let incoming = server
                .accept()
                .await
                .ok_or_else(|| quic_err("accept", "closed"))?;
            let conn = incoming.await.map_err(|e| quic_err("accept", e))?;
            let mut tasks = Vec::new();
            for _ in 0..STREAMS {
                let mut recv = conn
                    .accept_uni()
                    .await
                    .map_err(|e| quic_err("accept stream", e))?;
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while let Some(c) = recv
                        .read_chunk(CHUNK, false)
                        .await
                        .map_err(|e| quic_err("read", e))?
                    {
                        n += c.bytes.len() as u64;
                    }
                    Ok::<u64, BenchError>(n)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.map_err(|e| quic_err("stream task", e))??;
            }
            let end = Instant::now();
            conn.close(0u32.into(), b"done");
            Ok::<(u64, Instant), BenchError>((total, end))
        });
        let conn = client
            .connect_with(client_cfg, server_addr, "mig-peer")
            .map_err(|e| quic_err("connect", e))?
            .await
            .map_err(|e| quic_err("handshake", e))?;
        let start = Instant::now();
        let chunk = bytes::Bytes::from(vec![0x5au8; CHUNK]);
        let mut senders = Vec::new();
        for _ in 0..STREAMS {
            let mut send = conn
                .open_uni()
                .await
                .map_err(|e| quic_err("open stream", e))?;
            let chunk = chunk.clone();
            senders.push(tokio::spawn(async move {
                for _ in 0..(per_stream / CHUNK as u64) {
                    send.write_chunk(chunk.clone())
                        .await
                        .map_err(|e| quic_err("write", e))?;
                }
                send.finish().map_err(|e| quic_err("finish", e))?;
                Ok::<(), BenchError>(())
            }));
        }
        for s in senders {
            s.await.map_err(|e| quic_err("send task", e))??;
        }
        let (bytes, end) = receiver.await.map_err(|e| quic_err("receive task", e))??;
        client.wait_idle().await;
        let ms = end.duration_since(start).as_millis().max(1) as u64;
        Ok(LinkRow {
            proto: "quic".into(),
            bytes,
            ms,
            mbs: mbs(bytes, ms).unwrap_or(0.0),
        })
    })
}

/// How many times each raw measurement is repeated; the median is kept (a busy machine makes
/// single measurements noisy).
const LINK_REPEATS: usize = 3;

fn median_of(
    ctx: &Ctx,
    mut one: impl FnMut() -> Result<LinkRow, BenchError>,
) -> Result<LinkRow, BenchError> {
    let mut rows = Vec::new();
    for _ in 0..LINK_REPEATS {
        ctx.check_stop()?;
        let r = one()?;
        progress(&format!(
            "raw {} host-a -> host-b: {:.0} MB/s",
            r.proto, r.mbs
        ));
        rows.push(r);
    }
    rows.sort_by(|a, b| a.mbs.total_cmp(&b.mbs));
    Ok(rows.swap_remove(LINK_REPEATS / 2))
}

/// Raw TCP and QUIC throughput between host-a and host-b (medians of [`LINK_REPEATS`]).
pub fn measure(ctx: &Ctx, mib: u64) -> Result<Vec<LinkRow>, BenchError> {
    Ok(vec![
        median_of(ctx, || tcp(ctx, mib))?,
        median_of(ctx, || quic(ctx, mib))?,
    ])
}

/// Copies the regular files of directory `from` (host-a) into `to` (host-b, created) over one TCP
/// connection between the hosts: per file a 2-byte name length, the name, an 8-byte size and the
/// bytes; a zero name length ends. Returns the bytes of file content sent.
pub fn copy_dir(ctx: &Ctx, from: &Path, to: &Path) -> Result<u64, BenchError> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    let (sent, _) = tcp_pair(
        ctx,
        COPY_PORT,
        move |s| receive_dir(s, &to).map_err(link_err("copy receive")),
        move |s| send_dir(s, &from).map_err(link_err("copy send")),
    )?;
    Ok(sent)
}

fn send_dir(s: TcpStream, dir: &Path) -> io::Result<u64> {
    let mut w = BufWriter::with_capacity(CHUNK, s);
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        let mut f = File::open(entry.path())?;
        let size = f.metadata()?.len();
        w.write_all(&(name.len() as u16).to_be_bytes())?;
        w.write_all(name)?;
        w.write_all(&size.to_be_bytes())?;
        let copied = io::copy(&mut (&mut f).take(size), &mut w)?;
        if copied != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        total += size;
    }
    w.write_all(&0u16.to_be_bytes())?;
    w.flush()?;
    Ok(total)
}

fn receive_dir(s: TcpStream, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut r = BufReader::with_capacity(CHUNK, s);
    loop {
        let mut len = [0u8; 2];
        r.read_exact(&mut len)?;
        let len = u16::from_be_bytes(len) as usize;
        if len == 0 {
            return Ok(());
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)?;
        let name = String::from_utf8(name)
            .ok()
            .filter(|n| !n.contains('/') && n != "." && n != "..")
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad file name"))?;
        let mut size = [0u8; 8];
        r.read_exact(&mut size)?;
        let size = u64::from_be_bytes(size);
        let path: PathBuf = dir.join(name);
        let mut f = File::create(&path)?;
        let copied = io::copy(&mut (&mut r).take(size), &mut f)?;
        if copied != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short file"));
        }
    }
}
