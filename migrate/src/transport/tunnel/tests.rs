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

/// A destination that takes one memory presync into `dir` (nothing else) on `server`; the slot
/// gets the presync's images once the stream is done.
fn serve_presync_only(
    server: quinn::Connection,
    dir: std::path::PathBuf,
) -> Arc<Mutex<Option<Arc<crate::memsync::PresyncImages>>>> {
    let slot = Arc::new(Mutex::new(None));
    let presync = Mutex::new(Some(crate::memsync::stream::PresyncSink {
        dir,
        max_bytes: 1 << 32,
        slot: slot.clone(),
    }));
    tokio::spawn(serve(server, move |h| match h.service {
        Service::MemoryPresync => presync.lock().unwrap().take().map(Endpoint::Presync),
        _ => None,
    }));
    slot
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

/// [`Endpoint::UnixBounded`]: the far socket gets at most the bound from the peer; past it
/// the stream fails and the far socket is closed, and the client's end sees its stream end.
#[tokio::test]
async fn a_bounded_unix_end_takes_no_more_than_its_bound() {
    let (client, server, _eps) = pair().await;
    let (far, sink) = unix_pair().unwrap();
    let far = Mutex::new(Some(far));
    const MAX: u64 = 1 << 20;
    tokio::spawn(serve(server, move |h| {
        (h.service == Service::PageServer)
            .then(|| {
                far.lock()
                    .unwrap()
                    .take()
                    .map(|socket| Endpoint::UnixBounded {
                        socket,
                        max_bytes: MAX,
                    })
            })
            .flatten()
    }));
    let got = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        // Ends when the tunnel closes the far socket.
        let _ = std::io::Read::read_to_end(&mut &sink, &mut got);
        got.len() as u64
    });
    let t = Tunnel::socketpair(client, header(Service::PageServer)).unwrap();
    let mine = std::os::unix::net::UnixStream::from(t.take_client().unwrap());
    let writer = tokio::task::spawn_blocking(move || {
        let block = vec![7u8; 64 << 10];
        let mut sent = 0u64;
        // Fails once the tunnel gives up on the stream (or after 8 MiB).
        while sent < 8 << 20 {
            if std::io::Write::write_all(&mut &mine, &block).is_err() {
                break;
            }
            sent += block.len() as u64;
        }
        let _ = mine.shutdown(std::net::Shutdown::Write);
        sent
    });
    let got = tokio::time::timeout(Duration::from_secs(20), got)
        .await
        .expect("the far socket was closed")
        .unwrap();
    assert!(got <= MAX, "the far end got {got} bytes, above {MAX}");
    assert!(got > 0, "nothing arrived");
    let sent = writer.await.unwrap();
    assert!(sent > MAX, "only {sent} bytes were sent");
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

/// A destination whose page writer fails on the dump's first command (its images directory
/// does not exist): the dump's end of the socketpair sees the socket end instead of waiting for
/// an answer that never comes.
#[tokio::test]
async fn a_failing_dedup_stream_ends_the_dumps_socket() {
    let (client, server, _eps) = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let (sink, _wait) = PageSink::new(&dir.path().join("missing"), Default::default());
    let sink = Mutex::new(Some(sink.deduplicated(Arc::default())));
    tokio::spawn(serve(server, move |_| {
        sink.lock().unwrap().take().map(Endpoint::Pages)
    }));
    let t = Tunnel::socketpair_dedup(
        client,
        header(Service::PageServerDedup),
        Arc::default(),
        Arc::default(),
    )
    .unwrap();
    let dump = std::os::unix::net::UnixStream::from(t.take_client().unwrap());
    let r = tokio::task::spawn_blocking(move || {
        dump.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // OPEN2 of process 5: the dump waits for its one-byte answer.
        std::io::Write::write_all(&mut &dump, &ps_cmd(4, 0, 0, 5 << 8 | 1)).unwrap();
        let mut b = [0u8; 1];
        std::io::Read::read(&mut &dump, &mut b)
    })
    .await
    .unwrap();
    assert!(
        matches!(&r, Ok(0))
            || r.as_ref().is_err_and(|e| !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )),
        "{r:?}"
    );
}

/// The memory presync and the deduplicated page stream over a real connection: this process's
/// own memory is presynced, one page changes, and the dump's pages (16 of them, among the MiBs
/// the presync sent) arrive with that one page's data only; the pages image is the dump's pages.
#[tokio::test]
async fn presync_then_dedup_stream_write_the_dumps_pages() {
    use crate::memsync::dedup::DedupStats;
    use crate::memsync::stream::{send, PresyncSink, Proc};
    use std::sync::atomic::Ordering;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (client, server, _eps) = pair().await;
    let slot = Arc::new(Mutex::new(None));
    let presync = Mutex::new(Some(PresyncSink {
        dir: dir.path().to_owned(),
        max_bytes: 1 << 32,
        slot: slot.clone(),
    }));
    let (sink, wait) = PageSink::new(dir.path(), Default::default());
    let sink = Mutex::new(Some(sink));
    let held = slot.clone();
    tokio::spawn(serve(server, move |h| match h.service {
        Service::MemoryPresync => presync.lock().unwrap().take().map(Endpoint::Presync),
        Service::PageServerDedup => {
            let images = held.lock().unwrap().take()?;
            let sink = sink.lock().unwrap().take()?;
            Some(Endpoint::Pages(sink.deduplicated(images)))
        }
        _ => None,
    }));
    // 16 pages of this process, touched so that they are present.
    let mut mem = vec![0u8; 17 * 4096];
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i % 251) as u8 ^ 0x3c;
    }
    let start = (mem.as_ptr() as usize).next_multiple_of(4096);
    let off = start - mem.as_ptr() as usize;
    let me = Proc {
        host_pid: std::process::id() as i32,
        image_id: 5,
    };
    let sent = std::sync::atomic::AtomicU64::new(0);
    let (index, stats) = send(&client, &header(Service::MemoryPresync), vec![me], &sent)
        .await
        .unwrap();
    assert!(stats.pages >= 16, "{stats:?}");
    // The progress counter ends at what the stats say went.
    assert_eq!(sent.into_inner(), stats.pages * 4096);
    assert!(slot.lock().unwrap().is_some());
    mem[off + 3 * 4096 + 9] ^= 0xff;
    let pages = mem[off..off + 16 * 4096].to_vec();
    let dedup = Arc::new(DedupStats::default());
    let t = Tunnel::socketpair_dedup(
        client,
        header(Service::PageServerDedup),
        Arc::new(index),
        dedup.clone(),
    )
    .unwrap();
    let dump = std::os::unix::net::UnixStream::from(t.take_client().unwrap());
    let stream = [
        ps_cmd(4, 0, 0, 5 << 8 | 1),
        ps_cmd(4 << 16 | 6, 16, start as u64, 5 << 8 | 1),
        pages.clone(),
        ps_cmd(0x1024, 0, 0, 0),
    ]
    .concat();
    let answers = tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut &dump, &stream).unwrap();
        let mut a = [0u8; 5];
        std::io::Read::read_exact(&mut &dump, &mut a).unwrap();
        a
    })
    .await
    .unwrap();
    assert_eq!(answers, [0, 0, 0, 0, 0]);
    let summary = tokio::task::spawn_blocking(move || wait.wait_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.page_bytes, 16 * 4096);
    assert_eq!(dedup.pages_reused.load(Ordering::Relaxed), 15);
    assert_eq!(dedup.pages_sent.load(Ordering::Relaxed), 1);
    assert_eq!(
        std::fs::read(dir.path().join("pages-65537.img")).unwrap(),
        pages
    );
    // The presync's file became the pages image; nothing else of it is left.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("presync-") || n.ends_with(".presync"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A destination that cannot write the presync's pages (its images directory is a file here)
/// ends the stream with a code that says so, and the source's error names the reason.
#[tokio::test]
async fn a_destination_that_cannot_write_the_presync_says_why() {
    use crate::memsync::stream::{send, Proc};
    use crate::memsync::MemsyncError;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let (client, server, _eps) = pair().await;
    serve_presync_only(server, not_a_dir);
    // Present pages of this process, so that there is something to send.
    let mem = vec![7u8; 64 * 4096];
    let me = Proc {
        host_pid: std::process::id() as i32,
        image_id: 5,
    };
    let e = send(
        &client,
        &header(Service::MemoryPresync),
        vec![me],
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, MemsyncError::PeerFailed(_)), "{e:?}");
    assert!(e.to_string().contains("could not write the pages"), "{e}");
    drop(mem);
}

/// Every page of a presync lands in its file at the place the layout says, byte for byte: 8 MiB
/// of distinct pages of this process cross a real connection (in quinn's chunks of one packet
/// each, which the destination writes without gathering them first) and are read back from the
/// presync file.
#[tokio::test]
async fn presync_files_hold_the_pages_sent() {
    use crate::memsync::stream::{send, Proc};
    use crate::memsync::{dst_id, PAGE};
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (client, server, _eps) = pair().await;
    let slot = serve_presync_only(server, dir.path().to_owned());
    const PAGES: usize = 2048;
    let mut mem = vec![0u8; (PAGES + 1) * PAGE];
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i / PAGE * 7 + i % 251) as u8 | 1;
    }
    let start = (mem.as_ptr() as usize).next_multiple_of(PAGE);
    let off = start - mem.as_ptr() as usize;
    let me = Proc {
        host_pid: std::process::id() as i32,
        image_id: 5,
    };
    let (_, stats) = send(
        &client,
        &header(Service::MemoryPresync),
        vec![me],
        &Default::default(),
    )
    .await
    .unwrap();
    assert!(stats.pages >= PAGES as u64, "{stats:?}");
    let images = slot.lock().unwrap().take().unwrap();
    let layout = images.take(dst_id(5)).unwrap();
    let file = std::fs::read(&layout.path).unwrap();
    assert_eq!(file.len() as u64, layout.pages() * PAGE as u64);
    for p in 0..PAGES {
        let vaddr = (start + p * PAGE) as u64;
        let at = layout.position_of(vaddr).unwrap() as usize * PAGE;
        assert!(
            file[at..at + PAGE] == mem[off + p * PAGE..off + (p + 1) * PAGE],
            "page {p} at {vaddr:#x}"
        );
    }
}
