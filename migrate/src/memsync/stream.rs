//! The presync stream (module docs of [`super`]): the source reads and sends
//! ([`send`]), the destination writes the pages into files ([`PresyncSink`]).

use super::cache::check_run;
use super::images::{ImagesWriter, PresyncImages};
use super::reader::{anon_runs, ProcMemory};
use super::{dst_id, MemsyncError, SentIndex, PAGE, RUN_HEADER};
use crate::transport::tunnel::{
    stop_reason, TunnelHeader, MAX_TUNNEL_HEADER, STOP_FAILED, STOP_INVALID, STOP_WRITE,
};
use crate::wire::write_frame;
use bytes::Bytes;
use std::sync::{Arc, Mutex};

/// Runs queued between the reading thread and the stream (16 MiB at most).
const QUEUE: usize = 16;
/// The longest a presync reads: the destination waits at most 600 s for the source's next
/// message (`protocol::Timeouts`), and the presync runs before it. Past this it stops, as at
/// the destination's bound (`capped`).
const MAX_TIME: std::time::Duration = std::time::Duration::from_secs(240);

/// A process of the container: its host PID and its image id (the PID in its namespace, which
/// names its `pagemap-ID.img`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub host_pid: i32,
    pub image_id: u32,
}

/// What a presync sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Processes whose memory was read.
    pub processes: u32,
    /// Pages sent (and held by the destination).
    pub pages: u64,
    /// Whether the destination's bound or the time limit stopped the presync before the end.
    pub capped: bool,
    /// Pages read with one copy, the process mapping them alone (the rest through
    /// `/proc/PID/mem`: `reader::ProcMemory::read_run`).
    pub pages_pinned: u64,
}

/// The code a destination resets a failed presync stream with, so that the source can say why
/// rather than only that the stream was reset.
fn reset_code(e: &MemsyncError) -> u32 {
    match e {
        MemsyncError::File { .. } => STOP_WRITE,
        MemsyncError::BadRun { .. }
        | MemsyncError::BadImage { .. }
        | MemsyncError::Overlap { .. }
        | MemsyncError::TooMuch { .. } => STOP_INVALID,
        _ => STOP_FAILED,
    }
}

/// The source's error for a stream the destination reset with `code`.
fn peer_failed(code: quinn::VarInt) -> MemsyncError {
    MemsyncError::PeerFailed(stop_reason(code.into_inner()))
}

fn read_err(e: quinn::ReadExactError) -> MemsyncError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => MemsyncError::Ended,
        quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)) => peer_failed(code),
        quinn::ReadExactError::ReadError(e) => MemsyncError::Stream(e.into()),
    }
}

/// Source: sends the anonymous memory of `procs` on a new stream of `conn` (after `header`),
/// within the bound the destination announces; returns the digests of what the destination
/// now holds. `sent` counts the page bytes handed to the stream as it goes (for progress: the
/// same figure as [`SendStats::pages`] in bytes once every run went).
pub async fn send(
    conn: &quinn::Connection,
    header: &TunnelHeader,
    procs: Vec<Proc>,
    sent_bytes: &std::sync::atomic::AtomicU64,
) -> Result<(SentIndex, SendStats), MemsyncError> {
    let (mut tx_stream, mut rx_stream) = conn.open_bi().await.map_err(MemsyncError::Open)?;
    write_frame(&mut tx_stream, header, MAX_TUNNEL_HEADER)
        .await
        .map_err(MemsyncError::Header)?;
    let mut word = [0u8; 8];
    rx_stream.read_exact(&mut word).await.map_err(read_err)?;
    let max = u64::from_le_bytes(word);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<[Bytes; 2]>(QUEUE);
    let reader = tokio::task::spawn_blocking(move || read_all(&procs, max, &tx));
    let mut sent = Ok(());
    while let Some(mut run) = rx.recv().await {
        let data = run[1].len() as u64;
        if let Err(e) = tx_stream.write_all_chunks(&mut run).await {
            sent = Err(match e {
                quinn::WriteError::Stopped(code) => peer_failed(code),
                e => MemsyncError::Stream(e.into()),
            });
            break;
        }
        sent_bytes.fetch_add(data, std::sync::atomic::Ordering::Relaxed);
    }
    // Ends the reader if the stream failed.
    drop(rx);
    let (index, stats) = reader.await.map_err(|_| MemsyncError::Thread)?;
    sent?;
    tx_stream
        .finish()
        .map_err(|e| MemsyncError::Stream(std::io::Error::other(e)))?;
    let mut ack = [0u8; 16];
    rx_stream.read_exact(&mut ack).await.map_err(read_err)?;
    let held = u64::from_le_bytes(ack[..8].try_into().unwrap_or_default());
    let status = u64::from_le_bytes(ack[8..].try_into().unwrap_or_default());
    if status != 0 {
        return Err(MemsyncError::Status(status));
    }
    if held != index.pages() {
        return Err(MemsyncError::Held {
            held,
            sent: index.pages(),
        });
    }
    Ok((index, stats))
}

/// The reading thread of [`send`]: reads, digests and queues every run, up to `max` bytes.
fn read_all(
    procs: &[Proc],
    max: u64,
    tx: &tokio::sync::mpsc::Sender<[Bytes; 2]>,
) -> (SentIndex, SendStats) {
    let mut index = SentIndex::default();
    let mut stats = SendStats::default();
    let mut bytes = 0u64;
    let start = std::time::Instant::now();
    'procs: for p in procs {
        let runs = match anon_runs(p.host_pid).and_then(|r| Ok((r, ProcMemory::open(p.host_pid)?)))
        {
            Ok(r) => r,
            Err(e) => {
                // It exited, or its memory cannot be read: its pages travel while frozen.
                tracing::debug!(pid = p.host_pid, error = %e, "presync skips a process");
                continue;
            }
        };
        let (runs, memory) = runs;
        stats.processes += 1;
        let id = dst_id(p.image_id);
        for run in runs {
            let len = u64::from(run.pages) * PAGE as u64;
            if bytes + len > max || start.elapsed() > MAX_TIME {
                stats.capped = true;
                break 'procs;
            }
            let (data, pages, pinned) = memory.read_run(run);
            if pages == 0 {
                continue;
            }
            let digests = data.chunks_exact(PAGE).map(|p| index.hash(p)).collect();
            let mut head = Vec::with_capacity(RUN_HEADER);
            head.extend_from_slice(&id.to_le_bytes());
            head.extend_from_slice(&run.vaddr.to_le_bytes());
            head.extend_from_slice(&pages.to_le_bytes());
            head.extend_from_slice(&0u32.to_le_bytes());
            if tx
                .blocking_send([Bytes::from(head), Bytes::from(data)])
                .is_err()
            {
                break 'procs;
            }
            index.insert(id, run.vaddr, digests);
            bytes += u64::from(pages) * PAGE as u64;
            stats.pages += u64::from(pages);
            if pinned {
                stats.pages_pinned += u64::from(pages);
            }
        }
    }
    (index, stats)
}

/// The destination's reader of the presync stream: takes quinn's received chunks (many per
/// call, `read_chunks`) and hands a run's data on as those chunks, split at the run's end,
/// without copying them into a buffer of its own (a copy and a zeroed allocation per byte
/// less on the side that also writes every page into new page cache).
struct ChunkReader<'a> {
    recv: &'a mut quinn::RecvStream,
    /// Received and not yet consumed, in stream order.
    pending: std::collections::VecDeque<Bytes>,
    ended: bool,
}

/// Chunks taken from quinn per call.
const CHUNKS_PER_READ: usize = 64;

impl<'a> ChunkReader<'a> {
    fn new(recv: &'a mut quinn::RecvStream) -> ChunkReader<'a> {
        ChunkReader {
            recv,
            pending: std::collections::VecDeque::new(),
            ended: false,
        }
    }

    /// Receives more chunks; `Ok(false)` at the end of the stream.
    async fn fill(&mut self) -> Result<bool, MemsyncError> {
        if self.ended {
            return Ok(false);
        }
        let mut bufs: [Bytes; CHUNKS_PER_READ] = std::array::from_fn(|_| Bytes::new());
        match self.recv.read_chunks(&mut bufs).await {
            Ok(Some(n)) => {
                self.pending
                    .extend(bufs.into_iter().take(n).filter(|b| !b.is_empty()));
                Ok(true)
            }
            Ok(None) => {
                self.ended = true;
                Ok(false)
            }
            Err(e) => Err(MemsyncError::Stream(e.into())),
        }
    }

    /// Bytes received and not consumed.
    fn buffered(&self) -> usize {
        self.pending.iter().map(Bytes::len).sum()
    }

    /// Reads exactly `buf`, or nothing at the end of the stream (`Ok(false)`).
    async fn read_or_end(&mut self, buf: &mut [u8]) -> Result<bool, MemsyncError> {
        while self.buffered() < buf.len() {
            if !self.fill().await? {
                return match self.buffered() {
                    0 => Ok(false),
                    _ => Err(MemsyncError::Ended),
                };
            }
        }
        let mut got = 0;
        while got < buf.len() {
            let Some(front) = self.pending.front_mut() else {
                return Err(MemsyncError::Ended);
            };
            let n = front.len().min(buf.len() - got);
            buf[got..got + n].copy_from_slice(&front.split_to(n));
            got += n;
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
        Ok(true)
    }

    /// The next `len` bytes as chunks (the last one split off at `len`).
    async fn take(&mut self, mut len: usize) -> Result<Vec<Bytes>, MemsyncError> {
        let mut out = Vec::new();
        while len > 0 {
            let Some(mut front) = self.pending.pop_front() else {
                if !self.fill().await? {
                    return Err(MemsyncError::Ended);
                }
                continue;
            };
            if front.len() > len {
                self.pending.push_front(front.split_off(len));
            }
            len -= front.len();
            out.push(front);
        }
        Ok(out)
    }
}

/// Runs queued between the stream and the destination's file writer.
const WRITE_QUEUE: usize = 8;

/// Destination: announces `max_bytes` and reads every run the source sends (checked) into the
/// presync files of `dir` (written on a blocking thread), until the end of the stream.
async fn receive(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    dir: &std::path::Path,
    max_bytes: u64,
) -> Result<PresyncImages, MemsyncError> {
    send.write_all(&max_bytes.to_le_bytes())
        .await
        .map_err(|e| MemsyncError::Stream(e.into()))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, u64, Vec<Bytes>)>(WRITE_QUEUE);
    let mut writer = ImagesWriter::new(dir, max_bytes);
    let files = tokio::task::spawn_blocking(move || {
        while let Some((dst, vaddr, data)) = rx.blocking_recv() {
            if let Err(e) = writer.add_parts(dst, vaddr, &data) {
                writer.discard();
                return Err(e);
            }
        }
        Ok(writer)
    });
    let read = async {
        let mut stream = ChunkReader::new(recv);
        let mut head = [0u8; RUN_HEADER];
        let mut total = 0u64;
        while stream.read_or_end(&mut head).await? {
            let word =
                |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or_default());
            let (dst, vaddr) = (word(0), word(8));
            let nr_pages = u32::from_le_bytes(head[16..20].try_into().unwrap_or_default());
            let len = check_run(vaddr, nr_pages)?;
            if head[20..24] != [0; 4] {
                return Err(MemsyncError::BadRun { vaddr, nr_pages });
            }
            total += len;
            if total > max_bytes {
                return Err(MemsyncError::TooMuch { max: max_bytes });
            }
            // At most MAX_RUN_PAGES pages (check_run).
            let data = stream.take(len as usize).await?;
            if tx.send((dst, vaddr, data)).await.is_err() {
                // The writer failed: its error says why.
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let writer = files.await.map_err(|_| MemsyncError::Thread)?;
    match (read, writer) {
        (Ok(()), Ok(w)) => Ok(w.finish()),
        (Err(e), Ok(w)) => {
            w.discard();
            Err(e)
        }
        (_, Err(e)) => Err(e),
    }
}

/// Where a destination's tunnel puts a presync stream: files in `dir`, announced once whole in
/// `slot` for the page writer of the same migration.
#[derive(Debug, Clone)]
pub struct PresyncSink {
    pub dir: std::path::PathBuf,
    pub max_bytes: u64,
    pub slot: Arc<Mutex<Option<Arc<PresyncImages>>>>,
}

impl PresyncSink {
    /// Receives a presync stream, fills the slot, then answers with the pages held (so the
    /// files are in place before the source can freeze). On a broken stream the stream is reset
    /// and the files removed: the source then moves without the presync. Returns the bytes
    /// held.
    pub async fn serve(
        self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<u64, MemsyncError> {
        let r = async {
            let images = receive(&mut send, &mut recv, &self.dir, self.max_bytes).await?;
            let (pages, bytes) = (images.pages(), images.bytes());
            let images = Arc::new(images);
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(images.clone());
            let mut ack = Vec::with_capacity(16);
            ack.extend_from_slice(&pages.to_le_bytes());
            ack.extend_from_slice(&0u64.to_le_bytes());
            if let Err(e) = send.write_all(&ack).await {
                images.remove_rest();
                return Err(MemsyncError::Stream(e.into()));
            }
            let _ = send.finish();
            Ok(bytes)
        }
        .await;
        if let Err(e) = &r {
            let code = reset_code(e);
            let _ = send.reset(code.into());
            let _ = recv.stop(code.into());
        }
        r
    }
}
