//! The link probe (protocol 1.2): before its first message, a source measures the throughput of
//! the migration's own QUIC connection, so that the pre-flight predicts the downtime from the
//! link as it is now rather than from an earlier move or a guess.
//!
//! The source opens a bidirectional stream, sends a [`ProbeHeader`] frame, then filler bytes
//! for at most [`PROBE_TIME`] or [`PROBE_MAX_BYTES`], whichever comes first, and finishes the
//! stream. The destination reads and discards them, noting when each part arrived, and answers
//! on the same stream with a [`ProbeReport`]: the bytes it got, the time from the first to the
//! last, and the same for the second half of the bytes ("tail"). The source times the whole
//! exchange from its first byte to the report ([`ProbeResult`]).
//!
//! Slow start: QUIC (like TCP) opens its congestion window from about ten packets and doubles it
//! each round trip (and path MTU discovery starts from 1200-byte packets), so the first part of
//! any transfer measures the ramp, not the link. The probe is therefore sized by time, not bytes:
//! a fast link sends up to 64 MiB, a slow one a few MiB, within the same 200 ms. The throughput
//! the pre-flight uses ([`ProbeResult::throughput`]) is the end-to-end rate: every byte over the
//! time from the first byte written to the report, ramp and one round trip included. Measured
//! against a 256 MiB transfer on the same connection right after the probe (what a move does;
//! the ignored test `probe_rates_against_a_long_transfer`), it predicted that transfer's rate
//! best on this machine (median ratio 0.95 over 10 rounds), while the destination's rate over the
//! second half of the bytes ("tail", past the ramp) overestimated it (median 0.77: the receiver
//! reads in bursts, so arrival times compress). The tail is still reported; on a link with a
//! long round trip the ramp outlasts 200 ms and the end-to-end rate underestimates (it errs on
//! the side of refusing a `--max-downtime`, not of exceeding it).
//!
//! The source keeps at most [`PROBE_QUEUE`] bytes written but not yet on the wire (quinn
//! buffers up to the peer's stream window, 16 MiB), so a slow link does not make the probe
//! itself slow: it ends within [`PROBE_TIME`] plus the time to drain that queue.

use crate::wire::{read_frame, write_frame, WireError};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The first four bytes of a [`ProbeHeader`].
pub const PROBE_MAGIC: [u8; 4] = *b"MIGP";
/// The source sends filler for at most this long.
pub const PROBE_TIME: Duration = Duration::from_millis(200);
/// ... and at most this many bytes.
pub const PROBE_MAX_BYTES: u64 = 64 << 20;
/// Bytes the source lets wait in quinn's send buffer beyond what went on the wire.
pub const PROBE_QUEUE: u64 = 4 << 20;
/// The destination reads at most this many bytes of one probe (a longer one is refused).
pub const PROBE_ACCEPT_MAX_BYTES: u64 = 256 << 20;
/// The destination answers at most this many probes per connection.
pub const MAX_PROBES: u32 = 4;
/// How long either side waits for the other during a probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest probe frame (header or report).
const MAX_PROBE_FRAME: u32 = 1024;
/// Filler written per call.
const CHUNK: usize = 256 << 10;
/// A tail shorter than this (bytes or time) says little: the end-to-end rate is used instead.
const MIN_TAIL_BYTES: u64 = 1 << 20;
const MIN_TAIL_MICROS: u64 = 2_000;

/// The first frame of a probe stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHeader {
    pub magic: [u8; 4],
    /// The most filler bytes that follow.
    pub max_bytes: u64,
}

/// The destination's answer, after the source finished the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Filler bytes received.
    pub bytes: u64,
    /// From the first filler byte to the last, µs.
    pub micros: u64,
    /// The bytes received after half of them had arrived.
    pub tail_bytes: u64,
    /// From the moment half of the bytes had arrived to the last byte, µs.
    pub tail_micros: u64,
}

/// What a probe measured (source side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    /// Filler bytes sent (and received: the destination's count matched).
    pub bytes: u64,
    /// From the first byte written to the destination's report.
    pub elapsed: Duration,
    pub report: ProbeReport,
}

/// Rate of `bytes` in `micros`, bytes/s (0 when no time passed).
pub fn rate(bytes: u64, micros: u64) -> u64 {
    if micros == 0 {
        return 0;
    }
    let r = u128::from(bytes) * 1_000_000 / u128::from(micros);
    u64::try_from(r).unwrap_or(u64::MAX)
}

impl ProbeResult {
    /// Bytes over the whole exchange (slow start and one round trip included), bytes/s.
    pub fn end_to_end(&self) -> u64 {
        let micros = u64::try_from(self.elapsed.as_micros()).unwrap_or(u64::MAX);
        rate(self.bytes, micros)
    }

    /// The link's throughput for a long transfer, bytes/s: the end-to-end rate (see the module
    /// doc for why not the tail).
    pub fn throughput(&self) -> u64 {
        self.end_to_end()
    }

    /// The destination's rate over the second half of the bytes, bytes/s; 0 when that half is
    /// too small to mean anything (informational: it overestimates a long transfer here).
    pub fn tail(&self) -> u64 {
        let r = &self.report;
        if r.tail_bytes >= MIN_TAIL_BYTES && r.tail_micros >= MIN_TAIL_MICROS {
            rate(r.tail_bytes, r.tail_micros)
        } else {
            0
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open the probe stream")]
    Open(#[source] quinn::ConnectionError),
    #[error("cannot send the probe header")]
    Header(#[source] WireError),
    #[error("cannot send probe bytes")]
    Write(#[source] quinn::WriteError),
    #[error("cannot finish the probe stream")]
    Finish(#[source] quinn::ClosedStream),
    #[error("cannot read the probe report")]
    Report(#[source] WireError),
    #[error("the peer closed the probe stream without a report")]
    NoReport,
    #[error("timed out after {0:?} waiting for the other side of the probe")]
    Timeout(Duration),
    #[error("the probe stream does not start with a probe header")]
    BadHeader,
    #[error("cannot read the probe bytes")]
    Read(#[source] quinn::ReadError),
    #[error("the probe sent more than the {max} bytes it announced")]
    TooLong { max: u64 },
    #[error("the destination received {got} probe bytes, {sent} were sent")]
    Mismatch { sent: u64, got: u64 },
    #[error("cannot send the probe report")]
    SendReport(#[source] WireError),
}

/// Source side: measures the link on `conn` (see the module doc). Only with a destination that
/// announced protocol 1.2 or later, before the first control message.
pub async fn probe(conn: &quinn::Connection) -> Result<ProbeResult, ProbeError> {
    probe_with(conn, PROBE_TIME, PROBE_MAX_BYTES).await
}

/// [`probe`] with another time and byte cap.
pub async fn probe_with(
    conn: &quinn::Connection,
    time: Duration,
    max_bytes: u64,
) -> Result<ProbeResult, ProbeError> {
    tokio::time::timeout(PROBE_TIMEOUT + time, probe_inner(conn, time, max_bytes))
        .await
        .map_err(|_| ProbeError::Timeout(PROBE_TIMEOUT + time))?
}

async fn probe_inner(
    conn: &quinn::Connection,
    time: Duration,
    max_bytes: u64,
) -> Result<ProbeResult, ProbeError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(ProbeError::Open)?;
    let header = ProbeHeader {
        magic: PROBE_MAGIC,
        max_bytes,
    };
    write_frame(&mut send, &header, MAX_PROBE_FRAME)
        .await
        .map_err(ProbeError::Header)?;
    let filler = vec![0u8; CHUNK];
    let base = conn.stats().udp_tx.bytes;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < max_bytes && start.elapsed() < time {
        // Keep the queue short: what quinn buffered is sent after the time cap.
        while sent.saturating_sub(conn.stats().udp_tx.bytes.saturating_sub(base)) > PROBE_QUEUE {
            if start.elapsed() >= time {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if start.elapsed() >= time {
            break;
        }
        let n = usize::try_from(max_bytes - sent)
            .unwrap_or(CHUNK)
            .min(CHUNK);
        send.write_all(&filler[..n])
            .await
            .map_err(ProbeError::Write)?;
        sent += n as u64;
    }
    send.finish().map_err(ProbeError::Finish)?;
    let report: ProbeReport = read_frame(&mut recv, MAX_PROBE_FRAME)
        .await
        .map_err(ProbeError::Report)?
        .ok_or(ProbeError::NoReport)?;
    let elapsed = start.elapsed();
    if report.bytes != sent {
        return Err(ProbeError::Mismatch {
            sent,
            got: report.bytes,
        });
    }
    Ok(ProbeResult {
        bytes: sent,
        elapsed,
        report,
    })
}

/// Arrival times of a probe's bytes, for [`ProbeReport`].
#[derive(Debug, Default)]
pub struct Arrivals {
    first: Option<Instant>,
    last: Option<Instant>,
    /// (bytes received so far, when), one entry per chunk read.
    marks: Vec<(u64, Instant)>,
    bytes: u64,
}

impl Arrivals {
    /// `n` more bytes arrived at `at`.
    pub fn add(&mut self, n: u64, at: Instant) {
        if n == 0 {
            return;
        }
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.bytes += n;
        self.marks.push((self.bytes, at));
    }

    /// The report: the whole and the part after half of the bytes had arrived (the tail counts
    /// only the bytes read after the chunk that crossed the half, over the time since then).
    pub fn report(&self) -> ProbeReport {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return ProbeReport::default();
        };
        let micros = |from: Instant| u64::try_from((last - from).as_micros()).unwrap_or(u64::MAX);
        let half = self.bytes / 2;
        let (tail_bytes, tail_micros) = match self.marks.iter().find(|(b, _)| *b >= half) {
            Some(&(b, at)) => (self.bytes - b, micros(at)),
            None => (0, 0),
        };
        ProbeReport {
            bytes: self.bytes,
            micros: micros(first),
            tail_bytes,
            tail_micros,
        }
    }
}

/// Destination side: answers a probe on a stream the source opened before its first message.
/// Reads (and drops) the bytes until the source finishes the stream, then sends the report.
pub async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<ProbeReport, ProbeError> {
    tokio::time::timeout(PROBE_TIMEOUT, async move {
        let header: ProbeHeader = read_frame(&mut recv, MAX_PROBE_FRAME)
            .await
            .map_err(ProbeError::Report)?
            .ok_or(ProbeError::BadHeader)?;
        if header.magic != PROBE_MAGIC {
            return Err(ProbeError::BadHeader);
        }
        let max = header.max_bytes.min(PROBE_ACCEPT_MAX_BYTES);
        let mut arrivals = Arrivals::default();
        while let Some(chunk) = recv
            .read_chunk(usize::MAX, true)
            .await
            .map_err(ProbeError::Read)?
        {
            arrivals.add(chunk.bytes.len() as u64, Instant::now());
            if arrivals.bytes > max {
                let _ = recv.stop(0u32.into());
                return Err(ProbeError::TooLong { max });
            }
        }
        let report = arrivals.report();
        write_frame(&mut send, &report, MAX_PROBE_FRAME)
            .await
            .map_err(ProbeError::SendReport)?;
        let _ = send.finish();
        Ok(report)
    })
    .await
    .map_err(|_| ProbeError::Timeout(PROBE_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_bytes_per_second() {
        assert_eq!(rate(1 << 20, 1_000_000), 1 << 20);
        assert_eq!(rate(100 << 20, 500_000), 200 << 20);
        assert_eq!(rate(5, 0), 0);
        assert_eq!(rate(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn arrivals_report_the_whole_and_the_second_half() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut a = Arrivals::default();
        assert_eq!(a.report(), ProbeReport::default());
        // A slow first half (the ramp), then 1 MiB per ms.
        a.add(1 << 20, ms(0));
        a.add(1 << 20, ms(10));
        a.add(0, ms(11));
        for i in 1..=6 {
            a.add(1 << 20, ms(10 + i));
        }
        let r = a.report();
        assert_eq!(r.bytes, 8 << 20);
        assert_eq!(r.micros, 16_000);
        // Half (4 MiB) had arrived at 12 ms; 4 MiB more in the next 4 ms.
        assert_eq!(r.tail_bytes, 4 << 20);
        assert_eq!(r.tail_micros, 4_000);
        assert_eq!(rate(r.tail_bytes, r.tail_micros), 1000 << 20);
    }

    fn result(bytes: u64, elapsed_ms: u64, tail_bytes: u64, tail_micros: u64) -> ProbeResult {
        ProbeResult {
            bytes,
            elapsed: Duration::from_millis(elapsed_ms),
            report: ProbeReport {
                bytes,
                micros: elapsed_ms * 1000,
                tail_bytes,
                tail_micros,
            },
        }
    }

    #[test]
    fn throughput_is_end_to_end_and_the_tail_is_reported() {
        // 64 MiB in 200 ms end to end, the second half in 50 ms at the destination.
        let r = result(64 << 20, 200, 32 << 20, 50_000);
        assert_eq!(r.end_to_end(), 320 << 20);
        assert_eq!(r.throughput(), 320 << 20);
        assert_eq!(r.tail(), 640 << 20);
        // A tail too small to mean anything is not reported.
        assert_eq!(result(1 << 20, 100, 512 << 10, 40_000).tail(), 0);
        assert_eq!(result(8 << 20, 100, 4 << 20, 1_000).tail(), 0);
        assert_eq!(
            result(1 << 20, 100, 512 << 10, 40_000).throughput(),
            10 << 20
        );
    }
}
