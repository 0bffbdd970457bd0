//! The pre-flight's fixed costs, learned from the moves this agent made. The downtime model
//! ([`super::modes::Preflight::predict`]) is a fixed part (freeze, CRIU's start and parasite,
//! the non-memory images, the restore without memory, commit) plus a part that grows with the
//! memory. The fixed part defaults to constants measured once on the test machine; after a
//! committed move this agent knows what the fixed part really was for that peer and mode: the
//! measured downtime minus the model's own size-dependent part of that move. The last
//! [`HISTORY`] of those per (peer, mode) are kept, and their median replaces the constants.
//! docs/migration.md ("Pre-flight") describes it for users.
//!
//! Kept in memory only, like the throughput to each peer: an agent that restarts (an upgrade,
//! another CRIU) starts again from the constants, which err towards a longer downtime.

use super::modes::{MoveMode, DEFAULT_FIXED_MS};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Moves remembered per peer and mode.
pub const HISTORY: usize = 5;
/// No learned fixed cost is below this, whatever the samples say: a freeze, a dump and a
/// restore never took less here (lazy mode's whole downtime was 110 ms at its fastest).
const MIN_FIXED_MS: u64 = 20;
/// Nor is a fixed part above this (four times the default) kept as it is: such a move spent its
/// time on something the model does not count (a deleted file still open, a full tmpfs: QA of
/// session 19 saw one move teach 1877 ms and the next pre-flight refuse a 235 ms move). The
/// capped figure still says the peer is slow, without one move deciding every later one.
const MAX_FIXED_MS: u64 = 4 * super::modes::DEFAULT_FIXED_MS;

/// Where a prediction's fixed cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FixedSource {
    /// The median of earlier moves of this mode to this peer.
    Measured,
    /// Nothing measured for this peer and mode yet: [`DEFAULT_FIXED_MS`].
    Default,
}

impl FixedSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FixedSource::Measured => "measured",
            FixedSource::Default => "default",
        }
    }
}

/// The fixed part of a prediction and where it came from, as `mig move --json` reports it
/// (`fixed_cost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedCost {
    pub ms: u64,
    pub source: FixedSource,
    /// How many earlier moves the median is of (0 for the default).
    pub moves: u32,
}

impl FixedCost {
    /// The constants: nothing measured yet.
    pub const DEFAULT: FixedCost = FixedCost {
        ms: DEFAULT_FIXED_MS,
        source: FixedSource::Default,
        moves: 0,
    };

    /// Where the figure came from, for messages.
    pub fn describe(&self, mode: MoveMode) -> String {
        match self.source {
            FixedSource::Measured => format!(
                "fixed costs {} ms: the median of the last {} {} move{} to this peer",
                self.ms,
                self.moves,
                mode.as_str(),
                if self.moves == 1 { "" } else { "s" }
            ),
            FixedSource::Default => format!(
                "fixed costs {} ms: the default, no {} move to this peer measured yet",
                self.ms,
                mode.as_str()
            ),
        }
    }
}

/// The modes whose fixed cost is learned. Pre-copy's final dump is predicted from simulated
/// rounds at an assumed dirty rate, so its downtime says little about its fixed part; it keeps
/// the constants.
const LEARNED: [MoveMode; 3] = [MoveMode::Cold, MoveMode::Stream, MoveMode::Lazy];

/// The fixed costs a pre-flight to one peer uses, per mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedCosts {
    /// Per mode of [`LEARNED`]: the median and the number of moves, `None`: the default.
    learned: [Option<(u64, u32)>; LEARNED.len()],
}

impl FixedCosts {
    /// The fixed cost of `mode`: learned, else the default.
    pub fn get(&self, mode: MoveMode) -> FixedCost {
        let learned = LEARNED
            .iter()
            .position(|m| *m == mode)
            .and_then(|i| self.learned[i]);
        match learned {
            Some((ms, moves)) => FixedCost {
                ms,
                source: FixedSource::Measured,
                moves,
            },
            None => FixedCost::DEFAULT,
        }
    }
}

/// The measured fixed parts of the last moves, per peer and mode (oldest first).
#[derive(Debug, Default)]
pub struct History {
    samples: HashMap<(String, MoveMode), VecDeque<u64>>,
}

impl History {
    /// Records a committed move of `mode` to `peer` that froze the container for `downtime_ms`
    /// and whose size-dependent part the model put at `variable_ms`. Returns the fixed part
    /// kept, or `None` when the move says too little about it: a mode not learned, or a model
    /// part more than half the downtime (a large move: there the fixed part is a small
    /// difference of two large figures, and the rates' errors would be taken for it).
    pub fn record(
        &mut self,
        peer: &str,
        mode: MoveMode,
        downtime_ms: u64,
        variable_ms: u64,
    ) -> Option<u64> {
        if !LEARNED.contains(&mode) || variable_ms.saturating_mul(2) > downtime_ms {
            return None;
        }
        let fixed = (downtime_ms - variable_ms).clamp(MIN_FIXED_MS, MAX_FIXED_MS);
        let moves = self.samples.entry((peer.to_owned(), mode)).or_default();
        if moves.len() == HISTORY {
            moves.pop_front();
        }
        moves.push_back(fixed);
        Some(fixed)
    }

    /// What this agent learned for `peer`: per mode, the median of the last moves (the higher
    /// of the two middle ones for an even count: with two moves, the slower one).
    pub fn costs(&self, peer: &str) -> FixedCosts {
        let mut costs = FixedCosts::default();
        for (slot, mode) in costs.learned.iter_mut().zip(LEARNED) {
            let Some(moves) = self.samples.get(&(peer.to_owned(), mode)) else {
                continue;
            };
            let mut sorted: Vec<u64> = moves.iter().copied().collect();
            sorted.sort_unstable();
            if let Some(median) = sorted.get(sorted.len() / 2) {
                *slot = Some((*median, sorted.len() as u32));
            }
        }
        costs
    }
}

/// This agent's history, since it started.
static LEARNT: Mutex<Option<History>> = Mutex::new(None);

/// Records a committed move for the pre-flights that follow ([`History::record`]).
pub fn record(peer: &str, mode: MoveMode, downtime_ms: u64, variable_ms: u64) -> Option<u64> {
    let mut g = LEARNT.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(History::default)
        .record(peer, mode, downtime_ms, variable_ms)
}

/// The fixed costs for a pre-flight to `peer`: learned from this agent's moves, else the
/// defaults.
pub fn known(peer: &str) -> FixedCosts {
    LEARNT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|h| h.costs(peer))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_measured_is_the_default() {
        let h = History::default();
        for mode in [
            MoveMode::Cold,
            MoveMode::Stream,
            MoveMode::Lazy,
            MoveMode::Precopy,
        ] {
            assert_eq!(h.costs("b").get(mode), FixedCost::DEFAULT);
        }
        assert_eq!(FixedCost::DEFAULT.ms, 250);
        assert!(FixedCost::DEFAULT
            .describe(MoveMode::Lazy)
            .contains("the default, no lazy move to this peer measured yet"));
    }

    #[test]
    fn the_median_of_the_last_five_moves() {
        let mut h = History::default();
        // Lazy: the model's part is the writable layer only.
        assert_eq!(h.record("b", MoveMode::Lazy, 140, 2), Some(138));
        let c = h.costs("b").get(MoveMode::Lazy);
        assert_eq!(
            c,
            FixedCost {
                ms: 138,
                source: FixedSource::Measured,
                moves: 1
            }
        );
        assert!(c
            .describe(MoveMode::Lazy)
            .contains("fixed costs 138 ms: the median of the last 1 lazy move to this peer"));
        // Two moves: the higher one.
        h.record("b", MoveMode::Lazy, 112, 2);
        assert_eq!(h.costs("b").get(MoveMode::Lazy).ms, 138);
        // An outlier moves the median by one place, not by its size, and is kept capped.
        assert_eq!(h.record("b", MoveMode::Lazy, 2000, 2), Some(MAX_FIXED_MS));
        assert_eq!(h.costs("b").get(MoveMode::Lazy).ms, 138);
        for d in [122, 132, 152] {
            h.record("b", MoveMode::Lazy, d, 2);
        }
        // The last five: 110, 1000, 120, 130, 150 (the first move's 138 is gone).
        let c = h.costs("b").get(MoveMode::Lazy);
        assert_eq!((c.ms, c.moves), (130, 5));
        h.record("b", MoveMode::Lazy, 50, 0);
        h.record("b", MoveMode::Lazy, 50, 0);
        h.record("b", MoveMode::Lazy, 50, 0);
        assert_eq!(h.costs("b").get(MoveMode::Lazy).ms, 50);
        // Nor below the floor, whatever a sample says.
        for _ in 0..HISTORY {
            assert_eq!(h.record("b", MoveMode::Lazy, 3, 0), Some(MIN_FIXED_MS));
        }
        assert_eq!(h.costs("b").get(MoveMode::Lazy).ms, MIN_FIXED_MS);
    }

    #[test]
    fn one_slow_move_alone_teaches_at_most_four_times_the_default() {
        let mut h = History::default();
        assert_eq!(h.record("b", MoveMode::Lazy, 1879, 2), Some(1000));
        assert_eq!(h.costs("b").get(MoveMode::Lazy).ms, 1000);
        assert_eq!(MAX_FIXED_MS, 4 * FixedCost::DEFAULT.ms);
    }

    #[test]
    fn per_peer_and_per_mode() {
        let mut h = History::default();
        h.record("b", MoveMode::Lazy, 130, 0);
        h.record("b", MoveMode::Stream, 300, 100);
        assert_eq!(h.costs("b").get(MoveMode::Lazy).ms, 130);
        assert_eq!(h.costs("b").get(MoveMode::Stream).ms, 200);
        assert_eq!(h.costs("b").get(MoveMode::Cold), FixedCost::DEFAULT);
        assert_eq!(h.costs("c").get(MoveMode::Lazy), FixedCost::DEFAULT);
        // Pre-copy keeps the constants.
        assert_eq!(h.record("b", MoveMode::Precopy, 300, 10), None);
        assert_eq!(h.costs("b").get(MoveMode::Precopy), FixedCost::DEFAULT);
    }

    #[test]
    fn a_move_mostly_made_of_memory_teaches_nothing() {
        let mut h = History::default();
        // 1 GiB in stream mode: the model's part (800 ms) exceeds half of the 419 ms measured.
        assert_eq!(h.record("b", MoveMode::Stream, 419, 800), None);
        assert_eq!(h.record("b", MoveMode::Stream, 400, 201), None);
        assert_eq!(h.costs("b").get(MoveMode::Stream), FixedCost::DEFAULT);
        assert_eq!(h.record("b", MoveMode::Stream, 400, 200), Some(200));
    }

    #[test]
    fn the_agent_remembers_what_it_recorded() {
        assert_eq!(known("learnt-peer").get(MoveMode::Lazy), FixedCost::DEFAULT);
        record("learnt-peer", MoveMode::Lazy, 120, 0);
        assert_eq!(known("learnt-peer").get(MoveMode::Lazy).ms, 120);
        assert_eq!(
            known("learnt-peer").get(MoveMode::Stream),
            FixedCost::DEFAULT
        );
    }

    #[test]
    fn the_json_names_the_source() {
        let c = FixedCost {
            ms: 131,
            source: FixedSource::Measured,
            moves: 3,
        };
        assert_eq!(
            serde_json::to_value(c).unwrap(),
            serde_json::json!({"ms": 131, "source": "measured", "moves": 3})
        );
        assert_eq!(
            serde_json::to_value(FixedCost::DEFAULT).unwrap()["source"],
            "default"
        );
    }
}
