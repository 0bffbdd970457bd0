//! The source's side of the deduplicated page stream (module docs of [`super`]): between the
//! dump's `--ps-socket` and the QUIC stream, pages the destination holds from the presync become
//! segment markers; everything else passes unchanged.

use super::{MemsyncError, SentIndex, PAGE, SEG_CACHED};
use crate::criu::page_writer::{PE_PRESENT, PS_CMD_BITS, PS_IOV_ADD, PS_IOV_ADD_F, PS_IOV_SIZE};
use bytes::Bytes;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Pages read from the dump at a time (1 MiB).
const READ_PAGES: u64 = 256;
/// Batches queued between the encoding thread and the stream.
const QUEUE: usize = 16;

/// What the encoder did, readable while it runs.
#[derive(Debug, Default)]
pub struct DedupStats {
    /// Pages the destination took from its presync cache.
    pub pages_reused: AtomicU64,
    /// Pages sent with their data.
    pub pages_sent: AtomicU64,
    /// Bytes put on the stream (commands, segments, data).
    pub wire_bytes: AtomicU64,
}

/// Reads exactly `buf`, or nothing at the end of the stream (`Ok(false)`).
fn read_or_end(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, MemsyncError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(MemsyncError::DumpTruncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MemsyncError::DumpRead(e)),
        }
    }
    Ok(true)
}

/// Encodes the dump's page stream read from `r` until it ends: commands as they are, the data of
/// present adds as segments (pages whose digest is the one `index` recorded for their address
/// become a cached segment). Batches of the output go to `out`. Blocking.
pub fn encode(
    mut r: impl Read,
    index: &SentIndex,
    out: &tokio::sync::mpsc::Sender<Vec<Bytes>>,
    stats: &DedupStats,
) -> Result<(), MemsyncError> {
    let mut buf = vec![0u8; (READ_PAGES as usize) * PAGE];
    let mut same = Vec::with_capacity(READ_PAGES as usize);
    let send = |batch: Vec<Bytes>| {
        let n: usize = batch.iter().map(Bytes::len).sum();
        stats.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        // The stream side ended: its own error says why.
        out.blocking_send(batch)
            .map_err(|_| MemsyncError::StreamEnded)
    };
    loop {
        let mut cmd = [0u8; PS_IOV_SIZE];
        if !read_or_end(&mut r, &mut cmd)? {
            return Ok(());
        }
        let word = |at: usize| u64::from_le_bytes(cmd[at..at + 8].try_into().unwrap_or_default());
        let raw = u32::from_le_bytes(cmd[..4].try_into().unwrap_or_default());
        let (nr_pages, vaddr, dst_id) = (word(8), word(16), word(24));
        let present = match raw & ((1 << PS_CMD_BITS) - 1) {
            PS_IOV_ADD_F => (raw >> PS_CMD_BITS) & PE_PRESENT != 0,
            PS_IOV_ADD => true,
            _ => false,
        };
        let mut batch = vec![Bytes::copy_from_slice(&cmd)];
        let mut left = if present { nr_pages } else { 0 };
        let mut at = vaddr;
        while left > 0 {
            let n = left.min(READ_PAGES);
            let data = &mut buf[..n as usize * PAGE];
            if !read_or_end(&mut r, data)? {
                return Err(MemsyncError::DumpTruncated);
            }
            same.clear();
            for (k, page) in data.chunks_exact(PAGE).enumerate() {
                let a = at.wrapping_add((k * PAGE) as u64);
                same.push(index.digest(dst_id, a) == Some(index.hash(page)));
            }
            let mut i = 0;
            while i < same.len() {
                let c = same[i];
                let j = same[i..]
                    .iter()
                    .position(|&s| s != c)
                    .map_or(same.len(), |p| i + p);
                let k = (j - i) as u32;
                batch.push(Bytes::copy_from_slice(
                    &(k | if c { SEG_CACHED } else { 0 }).to_le_bytes(),
                ));
                if c {
                    stats
                        .pages_reused
                        .fetch_add(u64::from(k), Ordering::Relaxed);
                } else {
                    batch.push(Bytes::copy_from_slice(&data[i * PAGE..j * PAGE]));
                    stats.pages_sent.fetch_add(u64::from(k), Ordering::Relaxed);
                }
                i = j;
            }
            send(std::mem::take(&mut batch))?;
            left -= n;
            at = at.wrapping_add(n * PAGE as u64);
        }
        if !batch.is_empty() {
            send(batch)?;
        }
    }
}

/// Carries the dump's end of a socketpair (`sock`, blocking) to the destination's page writer:
/// the dump's stream encoded ([`encode`], on a blocking thread) onto `send`, the writer's
/// replies from `recv` back to the dump. Returns once both directions ended. The first failure
/// resets the stream and shuts the socket down, so the dump (which may be waiting for an
/// answer, or writing into a full socket) and the encoding thread (reading from it) both end.
pub async fn carry(
    sock: std::os::unix::net::UnixStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    index: Arc<SentIndex>,
    stats: Arc<DedupStats>,
    stop: &crate::transport::tunnel::PeerStop,
) -> Result<(), MemsyncError> {
    let reader = sock.try_clone().map_err(MemsyncError::DumpRead)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(QUEUE);
    let enc = tokio::task::spawn_blocking(move || encode(reader, &index, &tx, &stats));
    let up = async {
        let mut sent = Ok(());
        while let Some(mut batch) = rx.recv().await {
            if let Err(e) = send.write_all_chunks(&mut batch).await {
                let e = std::io::Error::from(e);
                // Before the dump's socket closes: its error is only a broken pipe.
                stop.note(&e);
                sent = Err(MemsyncError::Stream(e));
                // Else the encoder waits for the dump, which waits for an answer.
                let _ = sock.shutdown(std::net::Shutdown::Both);
                break;
            }
        }
        drop(rx);
        let r = match enc.await {
            Ok(r) => sent.and(r),
            Err(_) => Err(MemsyncError::Thread),
        };
        crate::transport::tunnel::finish_or_reset(&mut send, r)
    };
    let down = async {
        let mut buf = vec![0u8; 4096];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    let reply = buf[..n].to_vec();
                    let mut w = sock.try_clone().map_err(MemsyncError::DumpReply)?;
                    tokio::task::spawn_blocking(move || w.write_all(&reply))
                        .await
                        .map_err(|_| MemsyncError::Thread)?
                        .map_err(MemsyncError::DumpReply)?;
                }
                Ok(None) => {
                    let _ = sock.shutdown(std::net::Shutdown::Write);
                    return Ok(());
                }
                Err(e) => {
                    let e = std::io::Error::from(e);
                    stop.note(&e);
                    let _ = recv.stop(crate::transport::tunnel::STOP_FAILED.into());
                    return Err(MemsyncError::Stream(e));
                }
            }
        }
    };
    let r = tokio::try_join!(up, down).map(|_| ());
    if r.is_err() {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
    r
}
