//! Verified file transfer over QUIC unidirectional streams.
//!
//! One file per stream: a [`FileHeader`] frame (kind, relative path, size, SHA-256), then exactly
//! `size` raw bytes, then the end of the stream. The receiver writes to the path the host chose
//! while hashing on a blocking thread, checks size and digest at the end, and deletes the file on
//! any mismatch. Several files travel at once on parallel streams.

use super::HostError;
use crate::wire::{read_frame, FileHeader, FileKind, WireError, MAX_CONTROL_FRAME};
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

/// A file received and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    pub header: FileHeader,
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

/// Reads `size` bytes of `path` in big chunks on a blocking thread.
fn spawn_reader(path: PathBuf, size: u64) -> mpsc::Receiver<Result<Bytes, FileError>> {
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
            left -= got as u64;
            if tx.blocking_send(Ok(buf.freeze())).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends one file on a new stream and waits until the peer acknowledged all of it.
pub async fn send_file(conn: &quinn::Connection, file: &OutgoingFile) -> Result<u64, FileError> {
    let (size, sha256) = match file.sha256 {
        Some(d) => {
            let len = tokio::fs::metadata(&file.local)
                .await
                .map_err(|source| FileError::Read {
                    path: file.local.clone(),
                    source,
                })?
                .len();
            (len, d)
        }
        None => hash_file(&file.local).await?,
    };
    let header = FileHeader {
        kind: file.kind,
        path: file.remote.clone(),
        size,
        sha256,
    };
    header.validate().map_err(|source| FileError::SendHeader {
        path: file.remote.clone(),
        source,
    })?;
    let mut send = conn
        .open_uni()
        .await
        .map_err(|source| FileError::Open { source })?;
    crate::wire::write_frame(&mut send, &header, MAX_CONTROL_FRAME)
        .await
        .map_err(|source| FileError::SendHeader {
            path: file.remote.clone(),
            source,
        })?;
    let mut chunks = spawn_reader(file.local.clone(), size);
    while let Some(chunk) = chunks.recv().await {
        send.write_chunk(chunk?)
            .await
            .map_err(|source| FileError::Send {
                path: file.remote.clone(),
                source,
            })?;
    }
    // The stream can only be closed already if the peer stopped it; stopped() says why.
    let _ = send.finish();
    match send.stopped().await {
        Ok(None) => Ok(size),
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

/// Sends `files` with up to `concurrency` streams in flight; stops at the first error.
pub async fn send_files(
    conn: &quinn::Connection,
    files: Vec<OutgoingFile>,
    concurrency: usize,
) -> Result<TransferStats, FileError> {
    let mut stats = TransferStats::default();
    let mut set = tokio::task::JoinSet::new();
    let mut queue = files.into_iter();
    loop {
        while set.len() < concurrency.max(1) {
            let Some(f) = queue.next() else { break };
            let conn = conn.clone();
            set.spawn(async move { send_file(&conn, &f).await });
        }
        let Some(done) = set.join_next().await else {
            return Ok(stats);
        };
        let bytes = done.map_err(|source| FileError::Task { source })??;
        stats.files += 1;
        stats.bytes += bytes;
    }
}

/// Receives one file from `recv`: reads its header, asks `place` where to write it (parent
/// directories are created), writes and hashes it off the async threads, and verifies size and
/// digest. On any failure the partial file is removed and the stream stopped.
pub async fn receive_file<F>(
    mut recv: quinn::RecvStream,
    place: F,
) -> Result<ReceivedFile, FileError>
where
    F: FnOnce(&FileHeader) -> Result<PathBuf, HostError>,
{
    let header: FileHeader = match read_frame(&mut recv, MAX_CONTROL_FRAME).await {
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
    let result = receive_body(&mut recv, &header, &path).await;
    if result.is_err() {
        let _ = recv.stop(quinn::VarInt::from_u32(REFUSED));
        let _ = std::fs::remove_file(&path);
    }
    result.map(|()| ReceivedFile { header, path })
}

async fn receive_body(
    recv: &mut quinn::RecvStream,
    header: &FileHeader,
    path: &Path,
) -> Result<(), FileError> {
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
    let mut got = 0u64;
    let mut failed = None;
    // QUIC hands out packet-sized chunks: coalesce them so the writer does big writes.
    let mut pending = BytesMut::new();
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                got += chunk.bytes.len() as u64;
                if got > header.size {
                    failed = Some(FileError::TooLong {
                        path: path.to_path_buf(),
                        size: header.size,
                    });
                    break;
                }
                if pending.is_empty() && chunk.bytes.len() >= CHUNK / 2 {
                    if tx.send(chunk.bytes).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                    continue;
                }
                if pending.capacity() == 0 {
                    pending.reserve(CHUNK);
                }
                pending.extend_from_slice(&chunk.bytes);
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
    if digest != header.sha256 {
        return Err(FileError::DigestMismatch {
            path: path.to_path_buf(),
            expected: hex::encode(header.sha256),
            actual: hex::encode(digest),
        });
    }
    Ok(())
}
