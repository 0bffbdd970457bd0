//! Traffic between the two lab hosts from the bench process itself: each socket is made by a
//! thread that has entered the host's network namespace (`setns` affects only the calling thread,
//! and a socket stays in the namespace it was made in). Raw TCP and QUIC throughput, and the copy
//! of a directory over TCP (the runc baseline's transfer).

use super::report::{mbs, LinkRow};
use super::{progress, BenchError, Ctx};
use mig_migrate::transport::tunnel::{self, Endpoint, Service, Tunnel, TunnelHeader};
use mig_migrate::transport::{
    client_config_ordered, endpoint_config, endpoint_with, server_config, transport_config,
    udp_socket, AllowedPeers, Identity, GSO_SEGMENTS,
};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// How long a bench TCP connection may make no progress before it fails (a stalled link must end
/// the bench with an error, not hang it).
const TCP_STALL: Duration = Duration::from_secs(60);

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
        s.set_read_timeout(Some(TCP_STALL))
            .map_err(link_err("tcp timeout"))?;
        serve(s)
    });
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(join(server).err().unwrap_or(BenchError::Thread));
    }
    let client = in_netns(&ctx.hosts[0].netns, move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .map_err(link_err("tcp connect"))?;
        s.set_write_timeout(Some(TCP_STALL))
            .map_err(link_err("tcp timeout"))?;
        send(s)
    });
    let sent = join(client);
    let received = join(server);
    Ok((sent?, received?))
}

/// When a transfer started, by the clock and by this process's CPU time. Both ends of a link
/// measurement run in the bench process, so its CPU time over a transfer is what the transfer
/// cost the machine: user and system time, the kernel's packet work included where it runs in
/// these threads (as it mostly does on a veth link: the receive side runs when the sender's
/// thread hands the packet over).
struct Span {
    start: Instant,
    cpu: Option<Duration>,
}

impl Span {
    fn start() -> Span {
        Span {
            start: Instant::now(),
            cpu: cpu_time(),
        }
    }

    /// The measurement of `bytes` moved from the start until `end`.
    fn row(self, proto: String, bytes: u64, end: Instant) -> LinkRow {
        let ms = end.duration_since(self.start).as_millis().max(1) as u64;
        let cpu_ms = self
            .cpu
            .zip(cpu_time())
            .map(|(before, now)| now.saturating_sub(before).as_millis() as u64);
        LinkRow {
            proto,
            bytes,
            ms,
            mbs: mbs(bytes, ms).unwrap_or(0.0),
            cpu_ms,
        }
    }
}

/// User and system CPU time of this process so far (every thread, ended ones included).
fn cpu_time() -> Option<Duration> {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let d = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Some(d(u.user_time()) + d(u.system_time()))
}

/// Raw TCP: `mib` MiB from host-a to host-b on one connection.
fn tcp(ctx: &Ctx, mib: u64) -> Result<LinkRow, BenchError> {
    let total = mib << 20;
    let span = Span::start();
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
    Ok(span.row("tcp".into(), bytes, end))
}

fn quic_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Quic(format!("{what}: {e}"))
}

/// A way of carrying bytes over QUIC from host-a to host-b, for comparisons in one run. Written
/// `[tunnel:|utunnel:]CxS[:tweak+tweak...]`: C connections (each between its own pair of UDP
/// sockets) of S unidirectional streams each, through the page tunnel (`tunnel:` with loopback
/// TCP on both ends, `utunnel:` with Unix socketpairs as stream mode has it) or raw, with mig's
/// transport settings changed by the tweaks ([`TWEAKS`]).
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub tunnel: bool,
    /// The tunnel's local ends are Unix socketpairs instead of loopback TCP.
    pub unix: bool,
    pub conns: usize,
    pub streams: usize,
    pub tweaks: Vec<String>,
}

/// Changes to mig's settings a [`Variant`] can make, for experiments.
pub const TWEAKS: &[&str] = &[
    "untuned (system socket buffers)",
    "mtu=N (path MTU discovery upper bound)",
    "nomtud (no path MTU discovery)",
    "initmtu=N",
    "nogso",
    "bbr",
    "newreno",
    "cubic=IW (initial window, bytes)",
    "ackfreq",
    "win4x (4x stream, connection and send windows)",
    "nofair (no send fairness between streams)",
    "ep1472 (quinn's default endpoint settings: peers announce 1472-byte datagrams at most)",
    "gso=N (datagrams per GSO send)",
    "aes256 (ring's cipher suite order, AES-256-GCM first, instead of mig's AES-128-GCM first)",
];

impl Variant {
    /// mig's own settings: `conns` connections of `streams` streams.
    pub fn mig(conns: usize, streams: usize) -> Variant {
        Variant {
            name: format!("quic {conns}x{streams}"),
            tunnel: false,
            unix: false,
            conns,
            streams,
            tweaks: Vec::new(),
        }
    }

    fn tuned_sockets(&self) -> bool {
        !self.tweaks.iter().any(|t| t == "untuned")
    }

    fn endpoint(
        &self,
        socket: UdpSocket,
        server: Option<quinn::ServerConfig>,
    ) -> io::Result<quinn::Endpoint> {
        let mut config = endpoint_config();
        let mut segments = GSO_SEGMENTS;
        for tweak in &self.tweaks {
            match tweak.split_once('=').unwrap_or((tweak, "")) {
                ("ep1472", _) => config = quinn::EndpointConfig::default(),
                ("gso", n) => segments = n.parse().unwrap_or(GSO_SEGMENTS),
                _ => {}
            }
        }
        endpoint_with(socket, server, config, segments)
    }

    fn transport(&self) -> quinn::TransportConfig {
        let mut t = transport_config();
        for tweak in &self.tweaks {
            let (name, value) = tweak.split_once('=').unwrap_or((tweak, ""));
            let n: u64 = value.parse().unwrap_or(0);
            match name {
                "mtu" => {
                    let mut m = quinn::MtuDiscoveryConfig::default();
                    m.upper_bound(n as u16);
                    t.mtu_discovery_config(Some(m));
                }
                "nomtud" => {
                    t.mtu_discovery_config(None);
                }
                "initmtu" => {
                    t.initial_mtu(n as u16);
                }
                "nogso" => {
                    t.enable_segmentation_offload(false);
                }
                "bbr" => {
                    t.congestion_controller_factory(Arc::new(
                        quinn::congestion::BbrConfig::default(),
                    ));
                }
                "newreno" => {
                    t.congestion_controller_factory(Arc::new(
                        quinn::congestion::NewRenoConfig::default(),
                    ));
                }
                "cubic" => {
                    let mut c = quinn::congestion::CubicConfig::default();
                    c.initial_window(n);
                    t.congestion_controller_factory(Arc::new(c));
                }
                "ackfreq" => {
                    let mut a = quinn::AckFrequencyConfig::default();
                    a.ack_eliciting_threshold(quinn::VarInt::from_u32(16));
                    a.max_ack_delay(Some(Duration::from_millis(2)));
                    t.ack_frequency_config(Some(a));
                }
                "win4x" => {
                    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
                    t.receive_window(quinn::VarInt::from_u32(256 << 20));
                    t.send_window(256 << 20);
                }
                "nofair" => {
                    t.send_fairness(false);
                }
                _ => {}
            }
        }
        t
    }
}

/// A tweak's value: a number in its range for those that take one (`mtu=N`...), none for the
/// others (a value that did not parse used to run as 0 or the default under the given name).
fn check_tweak_value(name: &str, value: Option<&str>, takes: bool) -> Result<(), String> {
    let Some(value) = value else {
        return if takes {
            Err("needs a value".into())
        } else {
            Ok(())
        };
    };
    if !takes {
        return Err("takes no value".into());
    }
    let n: u64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    let range = match name {
        "mtu" | "initmtu" => 1200..=65527,
        "gso" => 1..=64,
        _ => 1..=u64::from(u32::MAX),
    };
    if !range.contains(&n) {
        return Err(format!(
            "{n} is out of range ({} to {})",
            range.start(),
            range.end()
        ));
    }
    Ok(())
}

/// Parses a [`Variant`] (`[tunnel:|utunnel:]CxS[:tweak+tweak...]`).
pub fn parse_variant(s: &str) -> Result<Variant, String> {
    let bad = || format!("invalid link variant {s:?} ([tunnel:|utunnel:]CxS[:tweak+...])");
    let (tunnel, unix, rest) = match (s.strip_prefix("tunnel:"), s.strip_prefix("utunnel:")) {
        (Some(r), _) => (true, false, r),
        (_, Some(r)) => (true, true, r),
        _ => (false, false, s),
    };
    let (shape, tweaks) = rest.split_once(':').unwrap_or((rest, ""));
    let (c, st) = shape.split_once('x').ok_or_else(bad)?;
    let conns: usize = c.parse().map_err(|_| bad())?;
    let streams: usize = st.parse().map_err(|_| bad())?;
    if !(1..=8).contains(&conns) || !(1..=16).contains(&streams) {
        return Err(bad());
    }
    let tweaks: Vec<String> = tweaks
        .split('+')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    for t in &tweaks {
        let (name, value) = t
            .split_once('=')
            .map_or((t.as_str(), None), |(n, v)| (n, Some(v)));
        let Some(known) = TWEAKS
            .iter()
            .find(|k| k.split([' ', '=']).next() == Some(name))
        else {
            return Err(format!(
                "unknown link tweak {t:?} (one of: {})",
                TWEAKS.join(", ")
            ));
        };
        check_tweak_value(name, value, known.contains('='))
            .map_err(|why| format!("link tweak {t:?}: {why}"))?;
    }
    Ok(Variant {
        name: format!(
            "{}quic {rest}",
            match (tunnel, unix) {
                (true, true) => "unix tunnel ",
                (true, false) => "tunnel ",
                _ => "",
            }
        ),
        tunnel,
        unix,
        conns,
        streams,
        tweaks,
    })
}

/// QUIC endpoints and configurations for `v` between host-a (clients) and host-b (servers).
struct QuicSetup {
    server_socks: Vec<UdpSocket>,
    client_socks: Vec<UdpSocket>,
    server_addrs: Vec<SocketAddr>,
    server_cfg: quinn::ServerConfig,
    client_cfg: quinn::ClientConfig,
}

fn quic_setup(ctx: &Ctx, v: &Variant) -> Result<QuicSetup, BenchError> {
    let mut server_socks = Vec::new();
    let mut client_socks = Vec::new();
    let mut server_addrs = Vec::new();
    for i in 0..v.conns {
        let server_addr = addr(ctx, 1, QUIC_PORT + 10 + i as u16);
        let client_addr = addr(ctx, 0, 0);
        let tuned = v.tuned_sockets();
        let bind = move |a: SocketAddr| {
            let s = if tuned {
                udp_socket(a)
            } else {
                UdpSocket::bind(a)
            };
            s.map_err(link_err("udp bind"))
        };
        server_socks.push(join(in_netns(&ctx.hosts[1].netns, move || {
            bind(server_addr)
        }))?);
        client_socks.push(join(in_netns(&ctx.hosts[0].netns, move || {
            bind(client_addr)
        }))?);
        server_addrs.push(server_addr);
    }
    let id_a = Identity::generate("bench-a").map_err(|e| quic_err("identity", e))?;
    let id_b = Identity::generate("bench-b").map_err(|e| quic_err("identity", e))?;
    let allowed = AllowedPeers::new(HashSet::from([id_a.fingerprint().to_string()]));
    let mut server_cfg = server_config(&id_b, allowed).map_err(|e| quic_err("server config", e))?;
    let aes128_first = !v.tweaks.iter().any(|t| t == "aes256");
    let mut client_cfg = client_config_ordered(&id_a, id_b.fingerprint(), aes128_first)
        .map_err(|e| quic_err("client config", e))?;
    let t = Arc::new(v.transport());
    server_cfg.transport_config(t.clone());
    client_cfg.transport_config(t);
    Ok(QuicSetup {
        server_socks,
        client_socks,
        server_addrs,
        server_cfg,
        client_cfg,
    })
}

/// A progress line with the sending side's path figures (loss, congestion, MTU, datagrams per
/// system call).
fn log_stats(c: &quinn::Connection) {
    let st = c.stats();
    let p = st.path;
    progress(&format!(
        "  quic path: rtt {:?} cwnd {} mtu {} sent {} lost {} congestion events {} black holes {} udp tx {} datagrams in {} calls",
        p.rtt, p.cwnd, p.current_mtu, p.sent_packets, p.lost_packets, p.congestion_events,
        p.black_holes_detected, st.udp_tx.datagrams, st.udp_tx.ios
    ));
}

fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(link_err("tokio runtime"))
}

/// Connects every client endpoint to its server endpoint: (client side, server side) pairs and
/// the endpoints, which must live until the end.
/// Logs each connection's path figures, closes the connections, waits for the endpoints to
/// go idle and makes the measurement's row.
async fn close_and_row(
    row: LinkRow,
    conns: &[(quinn::Connection, quinn::Connection)],
    endpoints: &[quinn::Endpoint],
) -> LinkRow {
    for (c, _) in conns {
        log_stats(c);
        c.close(0u32.into(), b"done");
    }
    for e in endpoints {
        e.wait_idle().await;
    }
    row
}

async fn quic_connect(
    setup: QuicSetup,
    v: &Variant,
) -> Result<
    (
        Vec<(quinn::Connection, quinn::Connection)>,
        Vec<quinn::Endpoint>,
    ),
    BenchError,
> {
    let mut conns = Vec::new();
    let mut endpoints = Vec::new();
    let socks = setup.server_socks.into_iter().zip(setup.client_socks);
    for ((server_sock, client_sock), to) in socks.zip(setup.server_addrs) {
        let server = v
            .endpoint(server_sock, Some(setup.server_cfg.clone()))
            .map_err(link_err("quic server endpoint"))?;
        let client = v
            .endpoint(client_sock, None)
            .map_err(link_err("quic client endpoint"))?;
        let srv = server.clone();
        let accepted = tokio::spawn(async move {
            let incoming = srv
                .accept()
                .await
                .ok_or_else(|| quic_err("accept", "closed"))?;
            incoming.await.map_err(|e| quic_err("accept", e))
        });
        let c = client
            .connect_with(setup.client_cfg.clone(), to, "mig-peer")
            .map_err(|e| quic_err("connect", e))?
            .await
            .map_err(|e| quic_err("handshake", e))?;
        let s = accepted.await.map_err(|e| quic_err("accept task", e))??;
        conns.push((c, s));
        endpoints.extend([server, client]);
    }
    Ok((conns, endpoints))
}

/// Raw QUIC with mig's TLS and transport settings changed by `v`: `mib` MiB from host-a to
/// host-b, spread over `v`'s connections and streams.
fn quic(ctx: &Ctx, mib: u64, v: &Variant) -> Result<LinkRow, BenchError> {
    let setup = quic_setup(ctx, v)?;
    let per_stream = (mib << 20) / (v.conns * v.streams) as u64;
    let streams = v.streams;
    let name = v.name.clone();
    runtime()?.block_on(async move {
        let (conns, endpoints) = quic_connect(setup, v).await?;
        let span = Span::start();
        let chunk = bytes::Bytes::from(vec![0x5au8; CHUNK]);
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for (c, s) in &conns {
            for _ in 0..streams {
                let mut send = c.open_uni().await.map_err(|e| quic_err("open stream", e))?;
                let chunk = chunk.clone();
                senders.push(tokio::spawn(async move {
                    // Whole chunks, then the rest: a stream's share is rarely a whole number
                    // of chunks (with whole chunks only, 4 MiB over 16 streams sent nothing).
                    let rest = (per_stream % CHUNK as u64) as usize;
                    let last = (rest > 0).then(|| chunk.slice(..rest));
                    let whole = std::iter::repeat_n(chunk, (per_stream / CHUNK as u64) as usize);
                    for c in whole.chain(last) {
                        send.write_chunk(c)
                            .await
                            .map_err(|e| quic_err("write", e))?;
                    }
                    send.finish().map_err(|e| quic_err("finish", e))?;
                    Ok::<(), BenchError>(())
                }));
            }
            let s = s.clone();
            receivers.push(tokio::spawn(async move {
                let mut n = 0u64;
                for _ in 0..streams {
                    let mut recv = s
                        .accept_uni()
                        .await
                        .map_err(|e| quic_err("accept stream", e))?;
                    let task = tokio::spawn(async move {
                        let mut n = 0u64;
                        while let Some(c) = recv
                            .read_chunk(CHUNK, false)
                            .await
                            .map_err(|e| quic_err("read", e))?
                        {
                            n += c.bytes.len() as u64;
                        }
                        Ok::<u64, BenchError>(n)
                    });
                    n += task.await.map_err(|e| quic_err("stream task", e))??;
                }
                Ok::<u64, BenchError>(n)
            }));
        }
        for t in senders {
            t.await.map_err(|e| quic_err("send task", e))??;
        }
        let mut bytes = 0;
        for t in receivers {
            bytes += t.await.map_err(|e| quic_err("receive task", e))??;
        }
        let row = span.row(name, bytes, Instant::now());
        Ok(close_and_row(row, &conns, &endpoints).await)
    })
}

/// The page tunnel: a local client on host-a writes `mib` MiB into a [`Tunnel`] on `v`'s
/// connections, the far side's [`tunnel::serve`] carries them to a local server that reads them
/// (host-b). `tunnel:` uses loopback TCP on both ends (as stream mode did until session 5),
/// `utunnel:` Unix socketpairs on both ends (as stream mode has it: `criu --ps-socket`).
/// `v.streams` is not used.
fn tunnel(ctx: &Ctx, mib: u64, v: &Variant) -> Result<LinkRow, BenchError> {
    let setup = quic_setup(ctx, v)?;
    let total = mib << 20;
    let name = v.name.clone();
    let unix = v.unix;
    runtime()?.block_on(async move {
        let (conns, endpoints) = quic_connect(setup, v).await?;
        let header = TunnelHeader {
            migration_id: "bench".into(),
            service: Service::PageServer,
        };
        let (c, _) = &conns[0];
        let (t, reader, span, mut s): (
            Tunnel,
            _,
            Span,
            Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
        ) = if unix {
            let (far, sink) = tunnel::unix_pair().map_err(link_err("sink pair"))?;
            let far = std::sync::Mutex::new(Some(far));
            for (_, s) in &conns {
                let far = far.lock().unwrap_or_else(|p| p.into_inner()).take();
                tokio::spawn(tunnel::serve(s.clone(), {
                    let far = std::sync::Mutex::new(far);
                    move |_| {
                        far.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .take()
                            .map(Endpoint::Unix)
                    }
                }));
            }
            sink.set_nonblocking(true).map_err(link_err("sink pair"))?;
            let mut sink = tokio::net::UnixStream::from_std(sink).map_err(link_err("sink pair"))?;
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                loop {
                    match sink.read(&mut buf).await.map_err(link_err("sink read"))? {
                        0 => return Ok::<u64, BenchError>(n),
                        k => n += k as u64,
                    }
                }
            });
            let t = Tunnel::socketpair(c.clone(), header).map_err(|e| quic_err("tunnel", e))?;
            let span = Span::start();
            let client = std::os::unix::net::UnixStream::from(
                t.take_client()
                    .ok_or_else(|| quic_err("tunnel", "no client end"))?,
            );
            client
                .set_nonblocking(true)
                .map_err(link_err("tunnel client"))?;
            let client =
                tokio::net::UnixStream::from_std(client).map_err(link_err("tunnel client"))?;
            (t, reader, span, Box::new(client))
        } else {
            let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(link_err("sink bind"))?;
            let sink_addr = sink.local_addr().map_err(link_err("sink bind"))?;
            let reader = tokio::spawn(async move {
                let (mut s, _) = sink.accept().await.map_err(link_err("sink accept"))?;
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await.map_err(link_err("sink read"))? {
                        0 => return Ok::<u64, BenchError>(n),
                        k => n += k as u64,
                    }
                }
            });
            for (_, s) in &conns {
                tokio::spawn(tunnel::serve(s.clone(), move |_| Some(sink_addr)));
            }
            let t = Tunnel::listen(c.clone(), header)
                .await
                .map_err(|e| quic_err("tunnel", e))?;
            let addr = t
                .addr()
                .ok_or_else(|| quic_err("tunnel", "no listening address"))?;
            let span = Span::start();
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(link_err("tunnel connect"))?;
            (t, reader, span, Box::new(s))
        };
        let buf = vec![0x5au8; CHUNK];
        for _ in 0..(total / CHUNK as u64) {
            s.write_all(&buf).await.map_err(link_err("tunnel write"))?;
        }
        s.shutdown().await.map_err(link_err("tunnel shutdown"))?;
        let bytes = reader.await.map_err(|e| quic_err("sink task", e))??;
        let row = span.row(name, bytes, Instant::now());
        drop(s);
        drop(t);
        Ok(close_and_row(row, &conns, &endpoints).await)
    })
}

/// How many times each raw measurement is repeated; the summary takes the median (a busy machine
/// makes single measurements noisy), the JSON keeps each.
const LINK_REPEATS: usize = 3;

/// Runs `one` [`LINK_REPEATS`] times, each measurement named `proto`, into `into` as each ends
/// (a stop keeps those done before it).
fn repeat(
    ctx: &Ctx,
    proto: Option<&str>,
    into: &mut Vec<LinkRow>,
    mut one: impl FnMut() -> Result<LinkRow, BenchError>,
) -> Result<(), BenchError> {
    for _ in 0..LINK_REPEATS {
        ctx.check_stop()?;
        let mut r = one()?;
        if let Some(proto) = proto {
            r.proto = proto.into();
        }
        progress(&format!("{}: {:.0} MB/s", r.what(), r.mbs));
        into.push(r);
    }
    Ok(())
}

fn median_of(
    ctx: &Ctx,
    one: impl FnMut() -> Result<LinkRow, BenchError>,
) -> Result<LinkRow, BenchError> {
    let mut rows = Vec::new();
    repeat(ctx, None, &mut rows, one)?;
    rows.sort_by(|a, b| a.mbs.total_cmp(&b.mbs));
    Ok(rows.swap_remove(LINK_REPEATS / 2))
}

/// Raw TCP, then raw QUIC throughput between host-a and host-b, [`LINK_REPEATS`] times each,
/// into `into` as each measurement ends: an interrupted bench keeps those done (QA of session 26
/// found the finished samples dropped).
pub fn measure(ctx: &Ctx, mib: u64, into: &mut Vec<LinkRow>) -> Result<(), BenchError> {
    repeat(ctx, Some("tcp"), into, || tcp(ctx, mib))?;
    repeat(ctx, Some("quic"), into, || {
        quic(ctx, mib, &Variant::mig(1, 4))
    })
}

/// `--link-only`: raw TCP, QUIC with mig's settings and variants of them, and the page tunnel,
/// each the median of [`LINK_REPEATS`], printed as a table.
pub fn measure_all(ctx: &Ctx, mib: u64, variants: &[Variant]) -> Result<Vec<LinkRow>, BenchError> {
    let defaults;
    let variants = match variants.is_empty() {
        true => {
            defaults = default_variants();
            &defaults
        }
        false => variants,
    };
    let mut rows = Vec::new();
    // A stop or a failed variant still prints the rows measured before it.
    let measured = (|| {
        rows.push(median_of(ctx, || tcp(ctx, mib))?);
        for v in variants {
            rows.push(match v.tunnel {
                true => median_of(ctx, || tunnel(ctx, mib, v))?,
                false => median_of(ctx, || quic(ctx, mib, v))?,
            });
        }
        Ok(())
    })();
    if !rows.is_empty() {
        super::to_stdout(&link_table(&rows));
    }
    measured.map(|()| rows)
}

/// The `--link-only` table: one line per measured link, with the CPU it cost (both ends run in
/// the bench process): cores busy on average, and CPU seconds per 10^9 bytes.
fn link_table(rows: &[LinkRow]) -> String {
    let mut table = format!(
        "{:<40} {:>8} {:>8} {:>10} {:>6} {:>9}\n",
        "link", "MiB", "ms", "MB/s", "CORES", "CPU-S/GB"
    );
    for r in rows {
        let cores = r.cpu_ms.map(|c| format!("{:.2}", c as f64 / r.ms as f64));
        let per_gb = r.cpu_s_per_gb().map(|c| format!("{c:.2}"));
        table.push_str(&format!(
            "{:<40} {:>8} {:>8} {:>10.0} {:>6} {:>9}\n",
            r.proto,
            r.bytes >> 20,
            r.ms,
            r.mbs,
            cores.as_deref().unwrap_or("-"),
            per_gb.as_deref().unwrap_or("-"),
        ));
    }
    table
}

/// What `--link-only` measures when no `--link-variants` are given.
fn default_variants() -> Vec<Variant> {
    ["1x1", "1x4", "2x2", "tunnel:1x1", "utunnel:1x1"]
        .iter()
        .filter_map(|v| parse_variant(v).ok())
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tweak value that does not parse, or is out of range, is refused (it used to run as 0
    /// or the default under the name given).
    #[test]
    fn tweak_values_are_checked() {
        assert!(parse_variant("1x1:mtu=9000+gso=7+cubic=100000").is_ok());
        for bad in [
            "1x1:mtu=abc",
            "1x1:mtu=100",
            "1x1:gso=abc",
            "1x1:gso=0",
            "1x1:mtu",
            "1x1:nogso=3",
            "1x1:initmtu=70000",
        ] {
            let e = parse_variant(bad).err();
            assert!(
                e.as_deref().is_some_and(|e| e.contains("link tweak")),
                "{bad}: {e:?}"
            );
        }
    }
}
