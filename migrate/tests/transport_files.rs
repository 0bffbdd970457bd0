//! Verified file transfer over loopback QUIC: big random files arrive intact (digests in the
//! headers, 1.0, or after the bytes, 1.1), a flipped byte or a wrong digest is refused and the
//! partial file removed, a truncated stream is refused.

use mig_migrate::transport::{
    accept, connect, endpoint, hash_file, receive_file, send_files, send_files_as, AllowedPeers,
    FileError, Identity, OutgoingFile, Peer, ReceivedFile,
};
use mig_migrate::wire::{encode_frame, DigestAt, FileHeader, FileKind, MAX_CONTROL_FRAME};
use rand::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Link {
    client_conn: quinn::Connection,
    server_conn: quinn::Connection,
    _eps: (quinn::Endpoint, quinn::Endpoint),
}

async fn link() -> Link {
    let (a, b) = (
        Identity::generate("host-a").unwrap(),
        Identity::generate("host-b").unwrap(),
    );
    let any = "127.0.0.1:0".parse().unwrap();
    let server = endpoint(
        any,
        &b,
        AllowedPeers::new([a.fingerprint().to_string()].into()),
    )
    .unwrap();
    let client = endpoint(any, &a, AllowedPeers::default()).unwrap();
    let peer = Peer {
        name: "host-b".into(),
        address: server.local_addr().unwrap(),
        fingerprint: b.fingerprint().into(),
    };
    let (c, s) = tokio::join!(connect(&client, &a, &peer), accept(&server));
    Link {
        client_conn: c.unwrap(),
        server_conn: s.unwrap().unwrap(),
        _eps: (server, client),
    }
}

/// A random image file `name` of `len` bytes in `dir`, to be sent as `images/<name>` with its
/// digest computed on the way.
fn random_image(dir: &Path, name: &str, len: usize, seed: u64) -> OutgoingFile {
    let local = dir.join(name);
    random_file(&local, len, seed);
    OutgoingFile {
        kind: FileKind::Image,
        local,
        remote: format!("images/{name}"),
        sha256: None,
    }
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}

/// Receives `n` files into `dir`, keyed by their announced path.
fn spawn_receiver(
    conn: quinn::Connection,
    dir: PathBuf,
    n: usize,
) -> tokio::task::JoinHandle<Vec<Result<PathBuf, FileError>>> {
    tokio::spawn(async move {
        let got = spawn_receiver_full(conn, dir, n).await.unwrap();
        got.into_iter().map(|r| r.map(|f| f.path)).collect()
    })
}

/// Like [`spawn_receiver`], with everything `receive_file` returned.
fn spawn_receiver_full(
    conn: quinn::Connection,
    dir: PathBuf,
    n: usize,
) -> tokio::task::JoinHandle<Vec<Result<ReceivedFile, FileError>>> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let recv = conn.accept_uni().await.unwrap();
            let dir = dir.clone();
            tasks.spawn(
                async move { receive_file(recv, |h: &FileHeader| Ok(dir.join(&h.path))).await },
            );
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_random_files_arrive_verified() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    const SIZE: usize = 64 << 20;
    let mut files = Vec::new();
    for i in 0..2u64 {
        files.push(random_image(src.path(), &format!("pages-{i}.img"), SIZE, i));
    }
    // One with a precomputed digest, as for content-addressed layers.
    let small = src.path().join("layer");
    random_file(&small, 12345, 9);
    let (_, digest) = hash_file(&small).await.unwrap();
    files.push(OutgoingFile {
        kind: FileKind::Layer,
        local: small.clone(),
        remote: "layers/sha256-x".into(),
        sha256: Some(digest),
    });

    let l = link().await;
    let rx = spawn_receiver(l.server_conn.clone(), dst.path().to_path_buf(), files.len());
    let t = Instant::now();
    let stats = send_files(&l.client_conn, files.clone(), 8).await.unwrap();
    let results = rx.await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(stats.files, 3);
    assert_eq!(stats.bytes, 2 * SIZE as u64 + 12345);
    for r in results {
        r.unwrap();
    }
    for f in &files {
        let a = std::fs::read(&f.local).unwrap();
        let b = std::fs::read(dst.path().join(&f.remote)).unwrap();
        assert!(a == b, "{} differs", f.remote);
    }
    println!(
        "loopback transfer: {} MiB in {:.3} s = {:.0} MiB/s (2 x 64 MiB, sha256 both sides, debug={})",
        stats.bytes >> 20,
        secs,
        stats.bytes as f64 / (1 << 20) as f64 / secs,
        cfg!(debug_assertions)
    );
}

#[tokio::test]
async fn flipped_byte_refused_and_file_removed() {
    let dst = tempfile::tempdir().unwrap();
    let l = link().await;
    let rx = spawn_receiver(l.server_conn.clone(), dst.path().to_path_buf(), 2);

    let mut data = vec![0u8; 3 << 20];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(&data).into();

    // 1: the right header, one byte flipped in the stream.
    let header = FileHeader {
        kind: FileKind::Image,
        path: "images/flipped.img".into(),
        size: data.len() as u64,
        sha256: digest,
    };
    let mut body = data.clone();
    body[1 << 20] ^= 0x40;
    let mut s = l.client_conn.open_uni().await.unwrap();
    s.write_all(&encode_frame(&header, MAX_CONTROL_FRAME).unwrap())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
    s.finish().unwrap();

    // 2: the right bytes, a wrong digest in the header.
    let mut wrong = header.clone();
    wrong.path = "images/wrong-digest.img".into();
    wrong.sha256[0] ^= 1;
    let mut s2 = l.client_conn.open_uni().await.unwrap();
    s2.write_all(&encode_frame(&wrong, MAX_CONTROL_FRAME).unwrap())
        .await
        .unwrap();
    s2.write_all(&data).await.unwrap();
    s2.finish().unwrap();

    for r in rx.await.unwrap() {
        let e = r.unwrap_err();
        assert!(matches!(e, FileError::DigestMismatch { .. }), "{e}");
    }
    assert!(!dst.path().join("images/flipped.img").exists());
    assert!(!dst.path().join("images/wrong-digest.img").exists());
}

#[tokio::test]
async fn size_lies_and_hostile_paths_refused() {
    let dst = tempfile::tempdir().unwrap();
    let l = link().await;
    let rx = spawn_receiver(l.server_conn.clone(), dst.path().to_path_buf(), 3);
    let send = |header: FileHeader, body: Vec<u8>| {
        let conn = l.client_conn.clone();
        async move {
            let mut s = conn.open_uni().await.unwrap();
            let _ = s
                .write_all(&encode_frame(&header, MAX_CONTROL_FRAME).unwrap())
                .await;
            let _ = s.write_all(&body).await;
            let _ = s.finish();
        }
    };
    let h = |path: &str, size| FileHeader {
        kind: FileKind::Delta,
        path: path.into(),
        size,
        sha256: [0; 32],
    };
    send(h("long", 10), vec![1; 100]).await;
    send(h("short", 100), vec![1; 10]).await;
    send(h("../escape", 1), vec![1]).await;
    let mut kinds: Vec<String> = rx
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            format!("{:?}", r.unwrap_err())
                .split([' ', '{', '('])
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["Header", "SizeMismatch", "TooLong"]);
    assert!(!dst.path().join("long").exists() && !dst.path().join("short").exists());
    assert!(!dst.path().parent().unwrap().join("escape").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_after_the_bytes_arrive_verified() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, size) in [(0u64, 5 << 20), (1, 0), (2, 1), (3, (1 << 20) + 31)] {
        files.push(random_image(src.path(), &format!("f{i}"), size, i));
    }
    // A known digest travels after the bytes as it is.
    let (_, known) = hash_file(&files[0].local).await.unwrap();
    files[0].sha256 = Some(known);
    let l = link().await;
    let rx = spawn_receiver_full(l.server_conn.clone(), dst.path().to_path_buf(), files.len());
    let (stats, sent) = send_files_as(&l.client_conn, files.clone(), 3, DigestAt::Trailer)
        .await
        .unwrap();
    assert_eq!(stats.files, 4);
    let mut received = rx.await.unwrap();
    received.sort_by(|a, b| a.as_ref().unwrap().path.cmp(&b.as_ref().unwrap().path));
    for ((f, s), r) in files.iter().zip(&sent).zip(received) {
        let r = r.unwrap();
        let (size, digest) = hash_file(&f.local).await.unwrap();
        assert_eq!(
            (s.remote.as_str(), s.size, s.sha256),
            (f.remote.as_str(), size, digest)
        );
        assert_eq!(r.digest_at, DigestAt::Trailer);
        assert_eq!((r.header.size, r.header.sha256), (size, digest));
        assert_eq!(
            std::fs::read(&f.local).unwrap(),
            std::fs::read(&r.path).unwrap()
        );
    }
}

/// Opens a stream and writes `head`, then `body`, then finishes it.
async fn raw_stream(conn: &quinn::Connection, head: Vec<u8>, body: Vec<u8>) {
    let mut s = conn.open_uni().await.unwrap();
    let _ = s.write_all(&head).await;
    let _ = s.write_all(&body).await;
    let _ = s.finish();
}

#[tokio::test]
async fn wrong_or_truncated_trailers_refused_and_file_removed() {
    let dst = tempfile::tempdir().unwrap();
    let l = link().await;
    let mut data = vec![0u8; 2 << 20];
    rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut data);
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
    let h = |path: &str| FileHeader {
        kind: FileKind::Image,
        path: path.into(),
        size: data.len() as u64,
        sha256: digest,
    };
    let head = |path: &str| h(path).encode_frame(DigestAt::Trailer).unwrap();
    let with = |body: &[u8], tail: &[u8]| [body, tail].concat();
    let mut wrong = digest;
    wrong[31] ^= 1;
    let mut flipped = data.clone();
    flipped[12345] ^= 1;
    let cases = [
        ("wrong", with(&data, &wrong), "DigestMismatch"),
        ("flipped", with(&flipped, &digest), "DigestMismatch"),
        ("short-trailer", with(&data, &digest[..10]), "NoTrailer"),
        ("no-trailer", data.clone(), "NoTrailer"),
        ("short-body", data[..1000].to_vec(), "SizeMismatch"),
        ("long", with(&with(&data, &digest), b"x"), "TooLong"),
    ];
    let rx = spawn_receiver(
        l.server_conn.clone(),
        dst.path().to_path_buf(),
        cases.len() + 1,
    );
    for (path, body, _) in &cases {
        raw_stream(&l.client_conn, head(path), body.clone()).await;
    }
    // The same bytes with the right trailer arrive.
    raw_stream(&l.client_conn, head("good"), with(&data, &digest)).await;
    let mut kinds: Vec<String> = rx
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| {
            format!("{e:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    kinds.sort();
    let mut want: Vec<&str> = cases.iter().map(|c| c.2).collect();
    want.sort();
    assert_eq!(kinds, want);
    for (path, _, _) in &cases {
        assert!(!dst.path().join(path).exists(), "{path} left behind");
    }
    assert_eq!(std::fs::read(dst.path().join("good")).unwrap(), data);
}

#[tokio::test]
async fn header_digests_of_1_0_still_accepted() {
    let dst = tempfile::tempdir().unwrap();
    let l = link().await;
    let data = b"a file from mig 0.1.0".to_vec();
    use sha2::Digest;
    let header = FileHeader {
        kind: FileKind::Delta,
        path: "old".into(),
        size: data.len() as u64,
        sha256: sha2::Sha256::digest(&data).into(),
    };
    // Exactly what a 1.0 sender writes: the header as the whole frame.
    let head = encode_frame(&header, MAX_CONTROL_FRAME).unwrap();
    assert_eq!(head, header.encode_frame(DigestAt::Header).unwrap());
    let rx = spawn_receiver_full(l.server_conn.clone(), dst.path().to_path_buf(), 1);
    raw_stream(&l.client_conn, head, data.clone()).await;
    let got = rx.await.unwrap().pop().unwrap().unwrap();
    assert_eq!(got.digest_at, DigestAt::Header);
    assert_eq!(got.header, header);
    assert_eq!(std::fs::read(dst.path().join("old")).unwrap(), data);
}
