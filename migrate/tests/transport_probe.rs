//! The link probe (protocol 1.2) over loopback QUIC with mutual TLS: the source's figures come
//! from bytes the destination really received; the caps bound it; the destination refuses a
//! probe longer than it announced. No timing is asserted (only that time passed).

use mig_migrate::transport::probe::{self, ProbeError, ProbeHeader, PROBE_MAGIC};
use mig_migrate::transport::{accept, connect, endpoint, AllowedPeers, Identity, Peer};
use mig_migrate::wire::write_frame;
use std::time::Duration;

/// A connected pair: (client connection, server connection), endpoints kept alive.
async fn pair() -> (quinn::Connection, quinn::Connection, [quinn::Endpoint; 2]) {
    let (a, b) = (
        Identity::generate("host-a").unwrap(),
        Identity::generate("host-b").unwrap(),
    );
    let allow = |i: &Identity| AllowedPeers::new([i.fingerprint().to_string()].into());
    let any = "127.0.0.1:0".parse().unwrap();
    let server = endpoint(any, &b, allow(&a)).unwrap();
    let client = endpoint(any, &a, allow(&b)).unwrap();
    let srv = tokio::spawn({
        let server = server.clone();
        async move { accept(&server).await.unwrap().unwrap() }
    });
    let peer = Peer {
        name: "host-b".into(),
        address: server.local_addr().unwrap(),
        fingerprint: b.fingerprint().into(),
    };
    let conn = connect(&client, &a, &peer).await.unwrap();
    (conn, srv.await.unwrap(), [server, client])
}

/// The destination's side: answers one probe. The connection lives on in the task's result
/// (dropping the last handle would close it before the report arrives).
async fn answer_one_with(
    conn: quinn::Connection,
) -> (Result<probe::ProbeReport, ProbeError>, quinn::Connection) {
    let (send, recv) = conn.accept_bi().await.unwrap();
    (probe::answer(send, recv).await, conn)
}

fn answer_one(
    conn: quinn::Connection,
) -> tokio::task::JoinHandle<(Result<probe::ProbeReport, ProbeError>, quinn::Connection)> {
    tokio::spawn(answer_one_with(conn))
}

#[tokio::test]
async fn a_probe_reports_what_the_destination_received() {
    let (conn, server, _eps) = pair().await;
    let dest = tokio::spawn(async move {
        let (send, recv) = server.accept_bi().await.unwrap();
        let report = probe::answer(send, recv).await;
        // The connection still carries streams afterwards (the move runs on it).
        let (mut s, mut r) = server.accept_bi().await.unwrap();
        let got = r.read_to_end(100).await.unwrap();
        s.write_all(&got).await.unwrap();
        s.finish().unwrap();
        let _ = s.stopped().await;
        report
    });
    let r = probe::probe(&conn).await.unwrap();
    let (mut s, mut rx) = conn.open_bi().await.unwrap();
    s.write_all(b"after").await.unwrap();
    s.finish().unwrap();
    assert_eq!(rx.read_to_end(100).await.unwrap(), b"after");
    let report = dest.await.unwrap().unwrap();
    eprintln!(
        "probe: {} bytes in {:?}, end to end {} MiB/s, tail {} MiB/s ({report:?})",
        r.bytes,
        r.elapsed,
        r.end_to_end() >> 20,
        r.tail() >> 20
    );
    assert!(r.bytes > 0 && r.bytes <= probe::PROBE_MAX_BYTES, "{r:?}");
    assert_eq!(report.bytes, r.bytes);
    assert_eq!(r.report, report);
    assert!(
        report.tail_bytes <= report.bytes / 2 + (256 << 10),
        "{report:?}"
    );
    assert!(r.elapsed > Duration::ZERO);
    assert!(
        r.throughput() > 0 && r.throughput() == r.end_to_end(),
        "{r:?}"
    );
}

#[tokio::test]
async fn the_byte_cap_bounds_a_probe() {
    let (conn, server, _eps) = pair().await;
    let dest = answer_one(server);
    let r = probe::probe_with(&conn, Duration::from_secs(5), 1 << 20)
        .await
        .unwrap();
    assert_eq!(r.bytes, 1 << 20);
    assert_eq!(dest.await.unwrap().0.unwrap().bytes, 1 << 20);
}

#[tokio::test]
async fn the_time_cap_ends_a_probe() {
    let (conn, server, _eps) = pair().await;
    let dest = answer_one(server);
    // No time at all: the stream ends with no filler, and both sides agree on zero bytes.
    let r = probe::probe_with(&conn, Duration::ZERO, 1 << 30)
        .await
        .unwrap();
    assert_eq!(r.bytes, 0);
    assert_eq!(r.throughput(), 0);
    assert_eq!(dest.await.unwrap().0.unwrap().bytes, 0);
}

#[tokio::test]
async fn a_probe_longer_than_announced_is_refused() {
    let (conn, server, _eps) = pair().await;
    let dest = answer_one(server);
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let header = ProbeHeader {
        magic: PROBE_MAGIC,
        max_bytes: 1000,
    };
    write_frame(&mut send, &header, 1024).await.unwrap();
    let _ = send.write_all(&[0u8; 5000]).await;
    let _ = send.finish();
    let err = dest.await.unwrap().0.unwrap_err();
    assert!(matches!(err, ProbeError::TooLong { max: 1000 }), "{err}");
}

#[tokio::test]
async fn a_stream_that_is_not_a_probe_is_refused() {
    let (conn, server, _eps) = pair().await;
    let dest = answer_one(server);
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let header = ProbeHeader {
        magic: *b"MIGW",
        max_bytes: 1000,
    };
    write_frame(&mut send, &header, 1024).await.unwrap();
    let _ = send.finish();
    let err = dest.await.unwrap().0.unwrap_err();
    assert!(matches!(err, ProbeError::BadHeader), "{err}");
}

/// Measurement, not a check (`cargo test -p mig-migrate --test transport_probe -- --ignored
/// --nocapture`): which of the probe's rates predicts a long transfer on the same connection
/// right after it (what a move does)? Prints, per round, the probe's end-to-end and tail rates
/// and the rate of 256 MiB sent on one stream afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn probe_rates_against_a_long_transfer() {
    const LONG: u64 = 256 << 20;
    for round in 1..=10 {
        let (conn, server, _eps) = pair().await;
        let dest = tokio::spawn(async move {
            let (send, recv) = server.accept_bi().await.unwrap();
            probe::answer(send, recv).await.unwrap();
            let mut recv = server.accept_uni().await.unwrap();
            let mut got = 0u64;
            while let Some(c) = recv.read_chunk(usize::MAX, true).await.unwrap() {
                got += c.bytes.len() as u64;
            }
            (got, server)
        });
        let r = probe::probe(&conn).await.unwrap();
        let t0 = std::time::Instant::now();
        let mut s = conn.open_uni().await.unwrap();
        let buf = vec![0u8; 256 << 10];
        let mut sent = 0;
        while sent < LONG {
            s.write_all(&buf).await.unwrap();
            sent += buf.len() as u64;
        }
        s.finish().unwrap();
        let (got, _server) = dest.await.unwrap();
        let long = probe::rate(got, t0.elapsed().as_micros() as u64);
        eprintln!(
            "round {round}: probe {} MiB in {} ms: end to end {} MiB/s, dest whole {} MiB/s, tail {} MiB/s; then {} MiB at {} MiB/s",
            r.bytes >> 20,
            r.elapsed.as_millis(),
            r.end_to_end() >> 20,
            probe::rate(r.report.bytes, r.report.micros) >> 20,
            probe::rate(r.report.tail_bytes, r.report.tail_micros) >> 20,
            got >> 20,
            long >> 20
        );
    }
}
