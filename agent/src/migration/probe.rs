//! The pre-flight's link probe on the agent's side: with a destination that speaks protocol 1.2,
//! the source measures the migration connection's throughput before Prepare
//! (`mig_migrate::transport::probe`), and the pre-flight predicts from it. With an older
//! destination nothing is probed and the pre-flight uses what it knows
//! ([`super::modes::known_throughput`]). docs/migration.md ("Pre-flight") describes it.

use super::modes::{self, Throughput};
use mig_migrate::transport::probe::{self, ProbeResult};
use serde::{Deserialize, Serialize};

/// The protocol minor that brought the probe.
pub const PROBE_MINOR: u16 = 2;

/// A probe's figures, as `mig move --json` reports them (`probe`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// Bytes the probe sent (and the destination received).
    pub bytes: u64,
    /// From the first byte sent to the destination's report, ms.
    pub ms: u64,
    /// The throughput the pre-flight took from it, bytes/s: `bytes` over `ms` (QUIC's slow
    /// start and one round trip included; `mig_migrate::transport::probe` says why).
    pub bytes_s: u64,
    /// The same in MiB/s (rounded down).
    pub mib_s: u64,
    /// The destination's rate over the second half of the bytes, bytes/s (0: too few bytes);
    /// informational, it overestimates a long transfer on this machine.
    pub tail_bytes_s: u64,
}

impl From<&ProbeResult> for ProbeInfo {
    fn from(r: &ProbeResult) -> ProbeInfo {
        let bytes_s = r.throughput();
        ProbeInfo {
            bytes: r.bytes,
            ms: u64::try_from(r.elapsed.as_millis()).unwrap_or(u64::MAX),
            bytes_s,
            mib_s: bytes_s >> 20,
            tail_bytes_s: r.tail(),
        }
    }
}

/// The throughput for the pre-flight of a move to `peer`: this move's probe on `conn` when both
/// agents announced protocol 1.2 or later (`minor`: the lower of the two hellos' minors, same
/// major; the figure is also remembered for `peer`), else the last one measured or the default. A probe that fails is logged and the
/// pre-flight goes on without it (the move itself then finds out whether the link works).
pub async fn link_throughput(conn: &quinn::Connection, peer: &str, minor: u16) -> Throughput {
    if minor < PROBE_MINOR {
        return modes::known_throughput(peer);
    }
    let earlier = modes::known_throughput(peer);
    match probe::probe(conn).await {
        Ok(r) => {
            let mut info = ProbeInfo::from(&r);
            tracing::info!(
                %peer,
                bytes = info.bytes,
                ms = info.ms,
                mib_s = info.mib_s,
                tail_mib_s = info.tail_bytes_s >> 20,
                "link probe"
            );
            if suspicious(info.bytes_s, &earlier) {
                // 200 ms on a busy machine can measure the scheduler rather than the link (QA:
                // 11 MiB/s on a link earlier moves measured at 300 to 950 MiB/s, and a 0.9 s
                // move predicted at 50 s): once more, and the better of the two.
                if let Ok(again) = probe::probe(conn).await {
                    let again = ProbeInfo::from(&again);
                    tracing::info!(%peer, first_mib_s = info.mib_s, mib_s = again.mib_s, earlier_mib_s = earlier.bytes_s >> 20, "link probed again: the first probe was far below earlier moves");
                    if again.bytes_s > info.bytes_s {
                        info = again;
                    }
                }
            }
            modes::record_probe(peer, info.bytes_s);
            Throughput::probed(info)
        }
        Err(e) => {
            tracing::warn!(%peer, error = %super::chain(&e), "link probe failed: predicting without it");
            modes::known_throughput(peer)
        }
    }
}

/// Whether a probe's `bytes_s` is far (4x) below what earlier moves to the peer measured.
fn suspicious(bytes_s: u64, earlier: &Throughput) -> bool {
    earlier.source == modes::ThroughputSource::Previous && bytes_s < earlier.bytes_s / 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use mig_migrate::transport::probe::ProbeReport;
    use std::time::Duration;

    #[test]
    fn info_from_a_probe() {
        let r = ProbeResult {
            bytes: 64 << 20,
            elapsed: Duration::from_millis(200),
            report: ProbeReport {
                bytes: 64 << 20,
                micros: 190_000,
                tail_bytes: 32 << 20,
                tail_micros: 80_000,
            },
        };
        let i = ProbeInfo::from(&r);
        assert_eq!(i.bytes, 64 << 20);
        assert_eq!(i.ms, 200);
        assert_eq!(i.bytes_s, 320 << 20);
        assert_eq!(i.mib_s, 320);
        assert_eq!(i.tail_bytes_s, 400 << 20);
        let t = Throughput::probed(i);
        assert_eq!(t.bytes_s, 320 << 20);
        assert_eq!(t.source, modes::ThroughputSource::Probe);
        assert!(
            t.describe().contains("67108864 bytes in 200 ms"),
            "{}",
            t.describe()
        );
    }

    #[test]
    fn a_probe_far_below_earlier_moves_is_suspicious() {
        let earlier = |bytes_s, source| Throughput {
            bytes_s,
            source,
            probe: None,
        };
        let prev = modes::ThroughputSource::Previous;
        assert!(suspicious(11 << 20, &earlier(500 << 20, prev)));
        assert!(!suspicious(200 << 20, &earlier(500 << 20, prev)));
        // Nothing measured before: the default says nothing about the link.
        assert!(!suspicious(
            11 << 20,
            &earlier(150 << 20, modes::ThroughputSource::Default)
        ));
    }
}
