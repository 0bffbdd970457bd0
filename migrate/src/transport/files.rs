//! Verified file transfer over QUIC unidirectional streams.
//!
//! One file per stream: a [`FileHeader`] frame (kind, relative path, size, SHA-256), then exactly
//! `size` raw bytes, then the end of the stream. With a 1.1 peer the digest may instead follow
//! the bytes ([`DigestAt::Trailer`]): the sender hashes each chunk on the blocking thread that
//! reads it, so a file is read once and never hashed before it is sent. The receiver writes to
//! the path the host chose while hashing on a blocking thread, checks size and digest at the
//! end, and deletes the file on any mismatch. Several files travel at once on parallel streams.

use super::HostError;
use crate::wire::{DigestAt, FileHeader, FileKind, WireError, TRAILER_LEN};
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Size of the chunks read from disk and handed to QUIC.
const CHUNK: usize = 1 << 20;

/// Application error code sent with STOP_SENDING when a receiver refuses a file.
pub const REFUSED: u32 = 1;

/// A file to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingFile {
    pub kind: FileKind,
    /// Where it is on this host.
    pub local: PathBuf,
    /// The relative path announced to the peer.
    pub remote: String,
    /// The digest when already known (content-addressed layers, sealed image sets); computed
    /// before sending otherwise.
    pub sha256: Option<[u8; 32]>,
}

/// Totals of a transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub files: u32,
    pub bytes: u64,
}

/// A file sent and acknowledged, with the digest the receiver checked it against (the one
/// given in [`OutgoingFile::sha256`], else the one computed while sending or before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    pub kind: FileKind,
    pub remote: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// A file received and verified. `header.sha256` is the digest it was verified against, also
/// when that digest came after the bytes (`digest_at` says where it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    pub header: FileHeader,
    pub digest_at: DigestAt,
    pub path: PathBuf,
}

/// Why a file could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed while being sent ({got} of {expected} bytes)")]
    Changed {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("cannot open a file stream")]
    Open {
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("cannot send {path}")]
    Send {
        path: String,
        #[source]
        source: quinn::WriteError,
    },
    #[error("cannot send header of {path}")]
    SendHeader {
        path: String,
        #[source]
        source: WireError,
    },
    #[error("peer refused {path} (code {code})")]
    Refused { path: String, code: u64 },
    #[error("stream of {path} failed before the peer acknowledged it")]
    Unacknowledged {
        path: String,
        #[source]
        source: quinn::StoppedError,
    },
    #[error("cannot accept a file stream")]
    Accept {
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("bad file header")]
    Header {
        #[source]
        source: WireError,
    },
    #[error("file stream ended before its header")]
    NoHeader,
    #[error("the host has no place for {path}")]
    Place {
        path: String,
        #[source]
        source: HostError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive {path}")]
    Receive {
        path: PathBuf,
        #[source]
        source: quinn::ReadError,
    },
    #[error("{path}: more than the announced {size} bytes")]
    TooLong { path: PathBuf, size: u64 },
    #[error("{path}: {got} bytes, announced {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error(
        "{path}: the stream ended inside the digest after the bytes ({got} of {TRAILER_LEN} bytes)"
    )]
    NoTrailer { path: PathBuf, got: usize },
    #[error("reading {path} for sending ended without its digest")]
    NoDigest { path: PathBuf },
    #[error("{path}: sha256 {actual}, announced {expected}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("file transfer task failed")]
    Task {
        #[source]
        source: tokio::task::JoinError,
    },
}

impl FileError {
    /// Whether the receiver stopped the stream (it refused the file): its reason, if any, comes
    /// on the control stream.
    pub fn stopped_by_peer(&self) -> bool {
        matches!(
            self,
            FileError::Send {
                source: quinn::WriteError::Stopped(_),
                ..
            } | FileError::Refused { .. }
        )
    }
}

/// Hashes a file on a blocking thread: its size and SHA-256.
pub async fn hash_file(path: &Path) -> Result<(u64, [u8; 32]), FileError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let read = |source| FileError::Read {
            path: p.clone(),
            source,
        };
        let mut f = std::fs::File::open(&p).map_err(read)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf).map_err(read)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        Ok((n, h.finalize().into()))
    })
    .await
    .map_err(|source| FileError::Task { source })?
}

/// What a reader thread hands to the stream sending its file.
enum Piece {
    Chunk(Bytes),
    /// The SHA-256 of every chunk before it (last piece, only when asked to hash).
    Digest([u8; 32]),
}

/// Reads `size` bytes of `path` in big chunks on a blocking thread and, with `hash`, hashes
/// each chunk there before handing it on, then sends the digest.
fn spawn_reader(path: PathBuf, size: u64, hash: bool) -> mpsc::Receiver<Result<Piece, FileError>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let read = |source| FileError::Read {
            path: path.clone(),
            source,
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(read(e)));
                return;
            }
        };
        let mut h = hash.then(Sha256::new);
        let mut left = size;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            let got = match f.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(FileError::Changed {
                        path: path.clone(),
                        expected: size,
                        got: size - left,
                    }));
                    return;
                }
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(read(e)));
                    return;
                }
            };
            buf.truncate(got);
            if let Some(h) = h.as_mut() {
                h.update(&buf);
            }
            left -= got as u64;
            if tx.blocking_send(Ok(Piece::Chunk(buf.freeze()))).is_err() {
                return;
            }
        }
        if let Some(h) = h {
            let _ = tx.blocking_send(Ok(Piece::Digest(h.finalize().into())));
        }
    });
    rx
}

/// Sends one file on a new stream, its digest in the header (the 1.0 form: hashed first when
/// not known), and waits until the peer acknowledged all of it. Returns its size.
pub async fn send_file(conn: &quinn::Connection, file: &OutgoingFile) -> Result<u64, FileError> {
    send_file_as(conn, file, DigestAt::Header)
        .await
        .map(|s| s.size)
}

/// Sends one file on a new stream with its digest `at` the header or after the bytes, and
/// waits until the peer acknowledged all of it. [`DigestAt::Trailer`] (only to a 1.1 peer):
/// a digest not given in `file` is computed while the file is read for sending; a given one
/// is sent as the trailer as it is.
pub async fn send_file_as(
    conn: &quinn::Connection,
    file: &OutgoingFile,
    at: DigestAt,
) -> Result<SentFile, FileError> {
    let len = || async {
        tokio::fs::metadata(&file.local)
            .await
            .map(|m| m.len())
            .map_err(|source| FileError::Read {
                path: file.local.clone(),
                source,
            })
    };
    let (size, known) = match (file.sha256, at) {
        (Some(d), _) => (len().await?, Some(d)),
        (None, DigestAt::Header) => {
            let (n, d) = hash_file(&file.local).await?;
            (n, Some(d))
        }
        (None, DigestAt::Trailer) => (len().await?, None),
    };
    let header = FileHeader {
        kind: file.kind,
        path: file.remote.clone(),
        size,
        sha256: known.unwrap_or([0; 32]),
    };
    let head_err = |source| FileError::SendHeader {
        path: file.remote.clone(),
        source,
    };
    header.validate().map_err(head_err)?;
    let frame = header.encode_frame(at).map_err(head_err)?;
    let send_err = |source| FileError::Send {
        path: file.remote.clone(),
        source,
    };
    let mut send = conn
        .open_uni()
        .await
        .map_err(|source| FileError::Open { source })?;
    send.write_all(&frame).await.map_err(send_err)?;
    let mut pieces = spawn_reader(file.local.clone(), size, known.is_none());
    let mut digest = known;
    while let Some(piece) = pieces.recv().await {
        match piece? {
            Piece::Chunk(chunk) => send.write_chunk(chunk).await.map_err(send_err)?,
            Piece::Digest(d) => digest = Some(d),
        }
    }
    let digest = digest.ok_or_else(|| FileError::NoDigest {
        path: file.local.clone(),
    })?;
    if at == DigestAt::Trailer {
        send.write_all(&digest).await.map_err(send_err)?;
    }
    // The stream can only be closed already if the peer stopped it; stopped() says why.
    let _ = send.finish();
    match send.stopped().await {
        Ok(None) => Ok(SentFile {
            kind: file.kind,
            remote: file.remote.clone(),
            size,
            sha256: digest,
        }),
        Ok(Some(code)) => Err(FileError::Refused {
            path: file.remote.clone(),
            code: code.into_inner(),
        }),
        Err(source) => Err(FileError::Unacknowledged {
            path: file.remote.clone(),
            source,
        }),
    }
}

/// Sends `files` with up to `concurrency` streams in flight, digests in the headers (1.0);
/// stops at the first error.
pub async fn send_files(
    conn: &quinn::Connection,
    files: Vec<OutgoingFile>,
    concurrency: usize,
) -> Result<TransferStats, FileError> {
    send_files_as(conn, files, concurrency, DigestAt::Header)
        .await
        .map(|(stats, _)| stats)
}

/// Sends `files` with up to `concurrency` streams in flight, each with its digest `at` (see
/// [`send_file_as`]); stops at the first error. Returns the totals and every file sent, in
/// the order of `files`.
pub async fn send_files_as(
    conn: &quinn::Connection,
    files: Vec<OutgoingFile>,
    concurrency: usize,
    at: DigestAt,
) -> Result<(TransferStats, Vec<SentFile>), FileError> {
    let mut stats = TransferStats::default();
    let mut sent: Vec<(usize, SentFile)> = Vec::with_capacity(files.len());
    let mut set = tokio::task::JoinSet::new();
    let mut queue = files.into_iter().enumerate();
    loop {
        while set.len() < concurrency.max(1) {
            let Some((i, f)) = queue.next() else { break };
            let conn = conn.clone();
            set.spawn(async move { send_file_as(&conn, &f, at).await.map(|s| (i, s)) });
        }
        let Some(done) = set.join_next().await else {
            sent.sort_by_key(|(i, _)| *i);
            return Ok((stats, sent.into_iter().map(|(_, s)| s).collect()));
        };
        let (i, file) = done.map_err(|source| FileError::Task { source })??;
        stats.files += 1;
        stats.bytes += file.size;
        sent.push((i, file));
    }
}

/// Receives one file from `recv`: reads its header (either form of [`DigestAt`]), asks
/// `place` where to write it (parent directories are created), writes and hashes it off the
/// async threads, and verifies size and digest (the header's, or the trailer after the bytes).
/// On any failure the partial file is removed and the stream stopped.
pub async fn receive_file<F>(
    mut recv: quinn::RecvStream,
    place: F,
) -> Result<ReceivedFile, FileError>
where
    F: FnOnce(&FileHeader) -> Result<PathBuf, HostError>,
{
    let (mut header, digest_at) = match FileHeader::read(&mut recv).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(FileError::NoHeader),
        Err(source) => {
            let _ = recv.stop(quinn::VarInt::from_u32(REFUSED));
            return Err(FileError::Header { source });
        }
    };
    if let Err(source) = header.validate() {
        let _ = recv.stop(quinn::VarInt::from_u32(REFUSED));
        return Err(FileError::Header { source });
    }
    let path = match place(&header) {
        Ok(p) => p,
        Err(source) => {
            let _ = recv.stop(quinn::VarInt::from_u32(REFUSED));
            return Err(FileError::Place {
                path: header.path.clone(),
                source,
            });
        }
    };
    match receive_body(&mut recv, &header, digest_at, &path).await {
        Ok(digest) => {
            header.sha256 = digest;
            Ok(ReceivedFile {
                header,
                digest_at,
                path,
            })
        }
        Err(e) => {
            let _ = recv.stop(quinn::VarInt::from_u32(REFUSED));
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Receives the bytes (and the trailer) of a file into `path`; returns the verified digest.
async fn receive_body(
    recv: &mut quinn::RecvStream,
    header: &FileHeader,
    digest_at: DigestAt,
    path: &Path,
) -> Result<[u8; 32], FileError> {
    let werr = |source| FileError::Write {
        path: path.to_path_buf(),
        source,
    };
    // The directory and the file are made here, not on a blocking thread: a receiving task that
    // is aborted (a cancelled migration) must leave nothing to be created after it was joined,
    // when the cleanup has removed the staging directory (two quick syscalls).
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    let mut f = std::fs::File::create(path).map_err(werr)?;
    // Writing and hashing happen on one blocking thread fed through a small channel.
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let wpath = path.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, [u8; 32]), FileError> {
        let werr = |source| FileError::Write {
            path: wpath.clone(),
            source,
        };
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            f.write_all(&chunk).map_err(werr)?;
            h.update(&chunk);
            n += chunk.len() as u64;
        }
        f.flush().map_err(werr)?;
        Ok((n, h.finalize().into()))
    });
    let trailer_len = match digest_at {
        DigestAt::Header => 0,
        DigestAt::Trailer => TRAILER_LEN,
    };
    let mut got = 0u64;
    let mut trailer: Vec<u8> = Vec::with_capacity(trailer_len);
    let mut failed = None;
    // QUIC hands out packet-sized chunks: coalesce them so the writer does big writes.
    let mut pending = BytesMut::new();
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                let mut bytes = chunk.bytes;
                let body_left = header.size - got;
                if bytes.len() as u64 > body_left {
                    // body_left < bytes.len() <= usize::MAX, so the cast is exact.
                    let tail = bytes.split_off(body_left as usize);
                    if trailer.len() + tail.len() > trailer_len {
                        failed = Some(FileError::TooLong {
                            path: path.to_path_buf(),
                            size: header.size,
                        });
                        break;
                    }
                    trailer.extend_from_slice(&tail);
                }
                got += bytes.len() as u64;
                if bytes.is_empty() {
                    continue;
                }
                if pending.is_empty() && bytes.len() >= CHUNK / 2 {
                    if tx.send(bytes).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                    continue;
                }
                if pending.capacity() == 0 {
                    pending.reserve(CHUNK);
                }
                pending.extend_from_slice(&bytes);
                if pending.len() >= CHUNK / 2 && tx.send(pending.split().freeze()).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                if !pending.is_empty() {
                    let _ = tx.send(pending.split().freeze()).await;
                }
                break;
            }
            Err(source) => {
                failed = Some(FileError::Receive {
                    path: path.to_path_buf(),
                    source,
                });
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|source| FileError::Task { source })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let (n, digest) = written?;
    if n != header.size {
        return Err(FileError::SizeMismatch {
            path: path.to_path_buf(),
            expected: header.size,
            got: n,
        });
    }
    let expected = match digest_at {
        DigestAt::Header => header.sha256,
        DigestAt::Trailer => {
            <[u8; 32]>::try_from(trailer.as_slice()).map_err(|_| FileError::NoTrailer {
                path: path.to_path_buf(),
                got: trailer.len(),
            })?
        }
    };
    if digest != expected {
        return Err(FileError::DigestMismatch {
            path: path.to_path_buf(),
            expected: hex::encode(expected),
            actual: hex::encode(digest),
        });
    }
    Ok(digest)
}
