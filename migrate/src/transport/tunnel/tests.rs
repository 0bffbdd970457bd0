//! A tunnel between two loopback QUIC endpoints with mutual TLS: bytes both ways, half-close,
//! several connections at once, and a refused service.

use super::*;
use crate::transport::{accept, connect, endpoint, AllowedPeers, Identity, Peer};
use tokio::io::AsyncReadExt;

async fn pair() -> (quinn::Connection, quinn::Connection, Vec<quinn::Endpoint>) {
    let (a, b) = (
        Identity::generate("host-a").unwrap(),
        Identity::generate("host-b").unwrap(),
    );
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let allow = |i: &Identity| AllowedPeers::new([i.fingerprint().to_string()].into());
    let server = endpoint(any, &b, allow(&a)).unwrap();
    let client = endpoint(any, &a, allow(&b)).unwrap();
    let peer = Peer {
        name: "host-b".into(),
        address: server.local_addr().unwrap(),
        fingerprint: b.fingerprint().into(),
    };
    let srv = server.clone();
    let accepted = tokio::spawn(async move { accept(&srv).await.unwrap().unwrap() });
    let c = connect(&client, &a, &peer).await.unwrap();
    let s = accepted.await.unwrap();
    (c, s, vec![server, client])
}

/// A TCP server that answers every connection with the bytes it read, reversed order of
/// chunks not needed: it echoes everything, then closes after the client's half-close.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn header(service: Service) -> TunnelHeader {
    TunnelHeader {
        migration_id: "m1".into(),
        service,
    }
}

#[tokio::test]
async fn carries_bytes_both_ways_with_half_close() {
    let (client, server, _eps) = pair().await;
    let echo = echo_server().await;
    tokio::spawn(serve(server, move |h| {
        (h.service == Service::PageServer && h.migration_id == "m1").then_some(echo)
    }));
    let t = Tunnel::listen(client, header(Service::PageServer))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..3u8 {
        let addr = t.addr().unwrap();
        tasks.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..(3 << 20) + i as usize)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
                .collect();
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let to_send = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&to_send).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            assert_eq!(back.len(), data.len());
            assert!(back == data, "connection {i}: echoed bytes differ");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(t.bytes() >= 2 * 3 * (3 << 20));
}

#[tokio::test]
async fn unknown_service_is_refused() {
    let (client, server, _eps) = pair().await;
    tokio::spawn(serve(server, |_| None::<Endpoint>));
    let t = Tunnel::listen(client, header(Service::LazyPages))
        .await
        .unwrap();
    let mut s = TcpStream::connect(t.addr().unwrap()).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = Vec::new();
    // The far side resets the stream; the local connection ends without any data.
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(r.is_err() || buf.is_empty());
}

/// Both local ends as Unix sockets: the client's end of [`Tunnel::socketpair`] and a resolver
/// answering with [`Endpoint::Unix`]; an echo on the far socket, half-close passed on.
#[tokio::test]
async fn socketpair_both_ends_carry_bytes_with_half_close() {
    let (client, server, _eps) = pair().await;
    let (far, echo) = unix_pair().unwrap();
    let far = Mutex::new(Some(far));
    tokio::spawn(serve(server, move |h| {
        (h.service == Service::PageServer)
            .then(|| far.lock().unwrap().take().map(Endpoint::Unix))
            .flatten()
    }));
    let echo_task = tokio::task::spawn_blocking(move || {
        let mut r = &echo;
        let mut w = &echo;
        std::io::copy(&mut r, &mut w).unwrap();
        echo.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let t = Tunnel::socketpair(client, header(Service::PageServer)).unwrap();
    assert!(t.addr().is_none());
    let mine = std::os::unix::net::UnixStream::from(t.take_client().unwrap());
    assert!(t.take_client().is_none());
    let data: Vec<u8> = (0..(5 << 20) + 7usize)
        .map(|j| (j as u8).wrapping_mul(13))
        .collect();
    let to_send = data.clone();
    let w = mine.try_clone().unwrap();
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = w;
        std::io::Write::write_all(&mut w, &to_send).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let back = tokio::task::spawn_blocking(move || {
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut &mine, &mut back).unwrap();
        back
    })
    .await
    .unwrap();
    writer.await.unwrap();
    echo_task.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    assert!(t.bytes() >= 2 * data.len() as u64);
}

/// One command of CRIU's page server protocol (see `criu::page_writer`).
fn ps_cmd(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
    [
        &cmd.to_le_bytes()[..],
        &[0; 4],
        &nr_pages.to_le_bytes(),
        &vaddr.to_le_bytes(),
        &dst_id.to_le_bytes(),
    ]
    .concat()
}

/// A resolver answering one [`Endpoint::Pages`] writing into `dir`, and the wait for it.
fn pages_endpoint(
    dir: &std::path::Path,
) -> (
    impl Fn(&TunnelHeader) -> Option<Endpoint> + Send + Sync + 'static,
    crate::criu::page_writer::PageWait,
) {
    let (sink, wait) = PageSink::new(dir, Default::default());
    let sink = Mutex::new(Some(sink));
    let resolve = move |h: &TunnelHeader| {
        (h.service == Service::PageServer)
            .then(|| sink.lock().unwrap().take().map(Endpoint::Pages))
            .flatten()
    };
    (resolve, wait)
}

/// A dump's page stream through the tunnel into mig's page writer: the answers come back, the
/// images are written, the waiter learns the outcome; garbage fails both ends.
#[tokio::test]
async fn page_streams_go_into_the_page_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (client, server, _eps) = pair().await;
    let (resolve, wait) = pages_endpoint(dir.path());
    tokio::spawn(serve(server, resolve));
    let t = Tunnel::socketpair(client, header(Service::PageServer)).unwrap();
    let mine = std::os::unix::net::UnixStream::from(t.take_client().unwrap());
    let pages: Vec<u8> = (0..3 * 4096usize)
        .map(|j| (j as u8).wrapping_mul(7))
        .collect();
    let stream = [
        ps_cmd(4, 0, 0, 5 << 8 | 1),
        ps_cmd(4 << 16 | 6, 3, 0x7000, 5 << 8 | 1),
        pages.clone(),
        ps_cmd(0x1024, 0, 0, 0),
    ]
    .concat();
    let answers = tokio::task::spawn_blocking(move || {
        let mut w = &mine;
        std::io::Write::write_all(&mut w, &stream).unwrap();
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut &mine, &mut got).unwrap();
        got
    })
    .await
    .unwrap();
    assert_eq!(answers, [0; 5]);
    let summary = tokio::task::spawn_blocking(move || wait.wait_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.page_bytes, pages.len() as u64);
    assert_eq!(
        std::fs::read(dir.path().join("pages-65537.img")).unwrap(),
        pages
    );
    assert!(dir.path().join("pagemap-5.img").exists());

    let (client, server, _eps) = pair().await;
    let (resolve, wait) = pages_endpoint(dir.path());
    tokio::spawn(serve(server, resolve));
    let t = Tunnel::socketpair(client, header(Service::PageServer)).unwrap();
    let mine = std::os::unix::net::UnixStream::from(t.take_client().unwrap());
    let read = tokio::task::spawn_blocking(move || {
        let mut w = &mine;
        std::io::Write::write_all(&mut w, &ps_cmd(0x77, 0, 0, 0)).unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut &mine, &mut back).map(|_| back)
    })
    .await
    .unwrap();
    assert!(read.map(|b| b.is_empty()).unwrap_or(true), "no answer");
    let r = tokio::task::spawn_blocking(move || wait.wait_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        matches!(r, Err(PageWriterError::UnknownCommand { cmd: 0x77 })),
        "{r:?}"
    );
}
