//! Pre-copy (`mig move --mode precopy`): while the container runs, rounds of
//! `criu pre-dump --track-mem` (round 1 writes all memory, each later round only the pages
//! written since the round before, `--prev-images-dir`), each round's images sent to the
//! destination before the next starts; then the freeze and a final
//! `criu dump --track-mem --prev-images-dir <last round>` that writes only what changed since,
//! and the normal restore, which follows CRIU's `parent` links through the rounds.
//!
//! This module holds what does not need a kernel with soft-dirty tracking:
//!
//! - the stop rule ([`StopRule::decide`]): from each round's dirty bytes and its dump and send
//!   times, the dirty rate, the dirty set the final dump would write if the rounds stopped
//!   now, and the downtime that costs; stop when that fits the target, when a round no longer
//!   shrinks the dirty set by a real margin, or after [`MAX_ROUNDS`];
//! - the pre-flight's prediction ([`predict`]), the same rule run on an assumed dirty rate;
//! - the layout of the rounds, the same on both sides so that the `parent` links CRIU writes
//!   resolve on the destination too ([`round_dir`], [`link_rounds`], [`round_file`]);
//! - the report of the rounds in `mig move --json` ([`PrecopyReport`]).
//!
//! docs/migration.md ("Modes", "Modes: measured and not done") says what ran for real here.

use super::modes::Preflight;
use mig_migrate::criu::{Criu, DumpOpts};
use mig_migrate::transport::OutgoingFile;
use mig_migrate::wire::FileKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// CRIU counts pages of this size in its statistics (x86-64, arm64 with 4K pages).
pub const PAGE_SIZE: u64 = 4096;
/// Rounds before the final dump at most (round 1, the full copy, included).
pub const MAX_ROUNDS: u32 = 8;
/// Without `--max-downtime`: stop once the final dump's memory adds at most this much to the
/// downtime of a final dump with nothing left to copy (the fixed costs and the restore).
pub const DEFAULT_MEMORY_MS: u64 = 100;
/// A round that keeps more than this share (percent) of the previous round's dirty bytes does
/// not converge: the container writes memory about as fast as the rounds copy it.
pub const CONVERGE_PERCENT: u64 = 80;
/// Dirty rate the pre-flight assumes before a round measured one, bytes/s: a service that
/// rewrites a modest working set (documented as an assumption, not a measurement).
pub const ASSUMED_DIRTY_RATE: u64 = 32 << 20;
/// Where the rounds live, next to the final images (`images/`) on the source, in the staging
/// directory and then the container's directory on the destination.
pub const ROUNDS_DIR: &str = "rounds";
/// CRIU's link from an images directory to its parent iteration.
pub const PARENT_LINK: &str = "parent";

/// One pre-dump round, as measured on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Round {
    /// 1 for the first (full) round.
    pub round: u32,
    /// Pages CRIU wrote in this round (`pages_written` × [`PAGE_SIZE`]): its dirty set.
    pub bytes: u64,
    /// The `criu pre-dump` command.
    pub dump_ms: u64,
    /// Sending the round's images to the destination.
    pub send_ms: u64,
}

impl Round {
    /// From the start of this round's dump to the start of the next round's (or the freeze).
    fn interval_ms(&self) -> u64 {
        self.dump_ms.saturating_add(self.send_ms)
    }
}

/// Why the rounds stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The predicted downtime of stopping now fits the target.
    Fits,
    /// The last round kept more than [`CONVERGE_PERCENT`] % of the round before.
    NotConverging,
    /// [`MAX_ROUNDS`] (or the rule's maximum) were made.
    MaxRounds,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Fits => "the predicted downtime fits the target",
            StopReason::NotConverging => "the dirty set stopped shrinking",
            StopReason::MaxRounds => "the maximum number of rounds was reached",
        }
    }
}

/// What the rule says after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Make another round.
    Continue,
    /// Freeze and make the final dump.
    Stop {
        reason: StopReason,
        /// The dirty set the final dump is expected to write, bytes.
        final_bytes: u64,
        /// The downtime that predicts, ms.
        predicted_ms: u64,
    },
}

/// The stop rule of one move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopRule {
    /// Memory, writable layer and link throughput (bytes/s) of the move.
    pub preflight: Preflight,
    /// `--max-downtime`, when given.
    pub max_downtime_ms: Option<u64>,
    /// Rounds at most, at least 1.
    pub max_rounds: u32,
}

impl StopRule {
    pub fn new(preflight: Preflight, max_downtime_ms: Option<u64>) -> StopRule {
        StopRule {
            preflight,
            max_downtime_ms,
            max_rounds: MAX_ROUNDS,
        }
    }

    /// The downtime the rule aims at: `--max-downtime`, else the downtime of a final dump
    /// with nothing to copy plus [`DEFAULT_MEMORY_MS`].
    pub fn target_ms(&self) -> u64 {
        self.max_downtime_ms
            .unwrap_or_else(|| self.preflight.precopy_final_ms(0) + DEFAULT_MEMORY_MS)
    }

    /// The dirty rate the last rounds show, bytes/s: the last round's dirty bytes were written
    /// during the round before it (from its dump's start to the last round's dump's start).
    /// `None` before two rounds.
    pub fn dirty_rate(rounds: &[Round]) -> Option<u64> {
        let [.., prev, last] = rounds else {
            return None;
        };
        Some(last.bytes.saturating_mul(1000) / prev.interval_ms().max(1))
    }

    /// The dirty set a final dump would write if the rounds stopped after `rounds`: the dirty
    /// rate over the last round's interval, at most the memory. After one round, with no rate
    /// yet, the worst case: all of it again.
    pub fn final_bytes(&self, rounds: &[Round]) -> u64 {
        let Some(last) = rounds.last() else {
            return self.preflight.memory_bytes;
        };
        let bytes = match Self::dirty_rate(rounds) {
            Some(rate) => rate.saturating_mul(last.interval_ms()) / 1000,
            None => last.bytes,
        };
        bytes.min(self.preflight.memory_bytes.max(last.bytes))
    }

    /// Stop or go on after `rounds` (in order, round 1 first).
    pub fn decide(&self, rounds: &[Round]) -> Decision {
        let Some(last) = rounds.last() else {
            return Decision::Continue;
        };
        let final_bytes = self.final_bytes(rounds);
        let predicted_ms = self.preflight.precopy_final_ms(final_bytes);
        let stop = |reason| Decision::Stop {
            reason,
            final_bytes,
            predicted_ms,
        };
        if predicted_ms <= self.target_ms() {
            return stop(StopReason::Fits);
        }
        if let [.., prev, _] = rounds {
            if last.bytes.saturating_mul(100) > prev.bytes.saturating_mul(CONVERGE_PERCENT) {
                return stop(StopReason::NotConverging);
            }
        }
        if rounds.len() as u64 >= u64::from(self.max_rounds.max(1)) {
            return stop(StopReason::MaxRounds);
        }
        Decision::Continue
    }
}

/// What a pre-copy move did before its freeze, in `mig move --json` (`precopy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecopyReport {
    pub rounds: Vec<Round>,
    pub stopped: StopReason,
    /// The downtime the rule aimed at, ms.
    pub target_ms: u64,
    /// The dirty set the rule expected the final dump to write, bytes.
    pub predicted_final_bytes: u64,
    /// What the final dump wrote, bytes (set after the dump).
    #[serde(default)]
    pub final_bytes: Option<u64>,
}

impl PrecopyReport {
    /// One line per round and the reason, for the terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rounds
            .iter()
            .map(|r| {
                format!(
                    "  round {}: {} KiB dirty, pre-dump {} ms, sent in {} ms",
                    r.round,
                    r.bytes >> 10,
                    r.dump_ms,
                    r.send_ms
                )
            })
            .collect();
        let fin = match self.final_bytes {
            Some(b) => format!("{} KiB", b >> 10),
            None => "not made".into(),
        };
        out.push(format!(
            "  stopped after {} rounds: {} (target {} ms); final dump {} (predicted {} KiB)",
            self.rounds.len(),
            self.stopped.as_str(),
            self.target_ms,
            fin,
            self.predicted_final_bytes >> 10
        ));
        out
    }
}

/// Pre-flight prediction of pre-copy's downtime: the stop rule run on rounds simulated with
/// [`ASSUMED_DIRTY_RATE`] (round 1 copies all memory; each later round copies what the assumed
/// rate dirtied during the round before; a round takes its dump at the local write rate plus
/// its send at the link's throughput). Returns the predicted downtime and the rounds it
/// expects.
pub fn predict(pf: &Preflight, max_downtime_ms: Option<u64>) -> (u64, u32) {
    simulate(&StopRule::new(*pf, max_downtime_ms), ASSUMED_DIRTY_RATE)
}

/// The rule on simulated rounds of a container dirtying `dirty_rate` bytes/s.
pub fn simulate(rule: &StopRule, dirty_rate: u64) -> (u64, u32) {
    let pf = &rule.preflight;
    let mut rounds: Vec<Round> = Vec::new();
    let mut bytes = pf.memory_bytes;
    loop {
        let (dump_ms, send_ms) = pf.round_ms(bytes);
        rounds.push(Round {
            round: rounds.len() as u32 + 1,
            bytes,
            dump_ms,
            send_ms,
        });
        if let Decision::Stop { predicted_ms, .. } = rule.decide(&rounds) {
            return (predicted_ms, rounds.len() as u32);
        }
        let interval = dump_ms.saturating_add(send_ms);
        bytes = (dirty_rate.saturating_mul(interval) / 1000).min(pf.memory_bytes);
    }
}

/// Round `n`'s images directory under `base` (the migration's work directory on the source,
/// its staging directory or the container directory on the destination).
pub fn round_dir(base: &Path, n: u32) -> PathBuf {
    base.join(ROUNDS_DIR).join(n.to_string())
}

/// What round `n`'s pre-dump passes as `--prev-images-dir`, relative to its own images
/// directory: round 1 has none, round `n` names round `n - 1`. The same relative targets are
/// valid on both sides because both keep `images/` and `rounds/` side by side.
pub fn round_parent(n: u32) -> Option<PathBuf> {
    (n > 1).then(|| Path::new("..").join((n - 1).to_string()))
}

/// What the final dump in `images/` passes as `--prev-images-dir` after `last_round` rounds:
/// the last round, none without rounds.
pub fn final_parent(last_round: u32) -> Option<PathBuf> {
    (last_round > 0).then(|| {
        Path::new("..")
            .join(ROUNDS_DIR)
            .join(last_round.to_string())
    })
}

/// The remote name of a round's file on the wire (kind `Presync`): `rounds/<n>/<file>`.
pub fn remote_name(n: u32, file: &str) -> String {
    format!("{ROUNDS_DIR}/{n}/{file}")
}

/// Where the destination puts a presync file named `remote` when it is a round's file
/// (`rounds/<n>/<file>`, `n` in 1..=[`MAX_ROUNDS`], `file` one plain name): under `base`,
/// mirroring the source. `None` for any other name (not a round's file, or hostile).
pub fn round_file(base: &Path, remote: &str) -> Option<PathBuf> {
    let rest = remote.strip_prefix(ROUNDS_DIR)?.strip_prefix('/')?;
    let (n, file) = rest.split_once('/')?;
    let n: u32 = n.parse().ok().filter(|n| (1..=MAX_ROUNDS).contains(n))?;
    if n.to_string() != rest[..rest.len() - file.len() - 1] {
        return None; // "01", "+1": one spelling per round
    }
    let plain = !file.is_empty()
        && file != "."
        && file != ".."
        && file != PARENT_LINK
        && !file.contains('/')
        && !file.contains('\0');
    plain.then(|| round_dir(base, n).join(file))
}

/// The rounds under `base`: 1..=n, every one present (0 when there are none).
pub fn rounds_present(base: &Path) -> Result<u32, RoundsError> {
    let dir = base.join(ROUNDS_DIR);
    if !dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    while round_dir(base, n + 1).is_dir() {
        n += 1;
    }
    let entries = std::fs::read_dir(&dir)
        .map_err(|source| RoundsError::Io {
            path: dir.clone(),
            source,
        })?
        .count();
    if entries as u32 != n || n > MAX_ROUNDS {
        return Err(RoundsError::Gap { dir, found: n });
    }
    Ok(n)
}

/// Writes the `parent` links the rounds' images need under `base` (on the destination, which
/// receives the files but not CRIU's links): round `n` > 1 links to `../<n - 1>`, `images/`
/// to the last round. Returns the number of rounds (0: nothing linked, a plain image set).
pub fn link_rounds(base: &Path, images: &Path) -> Result<u32, RoundsError> {
    let n = rounds_present(base)?;
    let link = |dir: &Path, target: PathBuf| {
        let at = dir.join(PARENT_LINK);
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(&target, &at).map_err(|source| RoundsError::Io {
            path: at.clone(),
            source,
        })
    };
    for k in 2..=n {
        if let Some(prev) = round_parent(k) {
            link(&round_dir(base, k), prev)?;
        }
    }
    if let Some(prev) = final_parent(n) {
        link(images, prev)?;
    }
    Ok(n)
}

/// Removes the rounds under `base` and the `parent` link of `images` once the restore read
/// them (best effort: the container directory keeps only its checkpoint).
pub fn remove_rounds(base: &Path, images: &Path) {
    let link = images.join(PARENT_LINK);
    if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(&link);
    }
    let _ = std::fs::remove_dir_all(base.join(ROUNDS_DIR));
}

/// The files of round `n` in `dir` to send: regular files but CRIU's logs (and not its `parent`
/// link, which the destination writes itself), with their remote names.
pub fn round_files(dir: &Path, n: u32) -> Result<Vec<(PathBuf, String)>, RoundsError> {
    let err = |source| RoundsError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !entry.file_type().map_err(err)?.is_file() || name.ends_with(".log") {
            continue;
        }
        out.push((entry.path(), remote_name(n, &name)));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// The source's pre-copy state of one move: the rule, the rounds made, the report.
#[derive(Debug, Default)]
pub(crate) struct SourceRounds {
    inner: std::sync::Mutex<RoundsState>,
}

#[derive(Debug, Default)]
struct RoundsState {
    rule: Option<StopRule>,
    rounds: Vec<Round>,
    /// When the last round's files were handed over for sending.
    sent_from: Option<std::time::Instant>,
    report: Option<PrecopyReport>,
}

impl SourceRounds {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoundsState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes this move a pre-copy one, stopping by `rule`.
    pub fn start(&self, rule: StopRule) {
        self.lock().rule = Some(rule);
    }

    pub fn active(&self) -> bool {
        self.lock().rule.is_some()
    }

    /// The rounds made so far (0 for a move that is not pre-copy).
    pub fn made(&self) -> u32 {
        self.lock().rounds.len() as u32
    }

    /// `--track-mem` and `--prev-images-dir` of the final dump: tracking and the last round
    /// when there were rounds.
    pub fn final_dump(&self) -> (bool, Option<PathBuf>) {
        let n = self.made();
        (n > 0, final_parent(n))
    }

    /// What the final dump wrote, bytes.
    pub fn set_final(&self, bytes: u64) {
        if let Some(r) = self.lock().report.as_mut() {
            r.final_bytes = Some(bytes);
        }
    }

    pub fn report(&self) -> Option<PrecopyReport> {
        self.lock().report.clone()
    }

    /// Before round `n` (from 1): closes round `n - 1` (its send ended now) and asks the rule.
    /// `true`: make round `n`; `false`: the rounds are over (the report is set).
    pub fn before_round(&self, n: u32) -> bool {
        let mut st = self.lock();
        let Some(rule) = st.rule else {
            return false;
        };
        if let (Some(from), Some(last)) = (st.sent_from.take(), st.rounds.last_mut()) {
            last.send_ms = super::ms(from.elapsed());
        }
        if n > 1 && st.rounds.len() as u32 != n - 1 {
            return false; // a round failed to be recorded: stop here, the final dump is full
        }
        match rule.decide(&st.rounds) {
            Decision::Continue => true,
            Decision::Stop {
                reason,
                final_bytes,
                ..
            } => {
                st.report = Some(PrecopyReport {
                    rounds: st.rounds.clone(),
                    stopped: reason,
                    target_ms: rule.target_ms(),
                    predicted_final_bytes: final_bytes,
                    final_bytes: None,
                });
                false
            }
        }
    }

    /// Round `round` was pre-dumped; its files are about to be sent.
    pub fn record(&self, round: Round) {
        let mut st = self.lock();
        st.rounds.push(round);
        st.sent_from = Some(std::time::Instant::now());
    }
}

impl super::source::SourceSide {
    /// Pre-copy round `n` while the container runs (see [`SourceRounds::before_round`]): the
    /// pre-dump into `<work>/rounds/<n>` and its files (kind `Presync`, remote names
    /// `rounds/<n>/<file>`); `None` once the rule stops the rounds. Blocking (runs `criu`).
    /// Nothing is frozen by mig here; CRIU freezes the cgroup for a moment and leaves it as
    /// it found it, and after a failed pre-dump the cgroup is thawed in case CRIU could not.
    pub(crate) fn precopy_round(
        &self,
        n: u32,
    ) -> Result<Option<Vec<OutgoingFile>>, super::source::SourceError> {
        use super::source::SourceError;
        if !self.precopy.before_round(n) {
            return Ok(None);
        }
        let init_pid = self
            .agent
            .init_pid_of(&self.id)
            .ok_or(SourceError::NoInit)?;
        let criu = Criu::locate().map_err(SourceError::Criu)?;
        let cg = self.cg()?;
        let dir = round_dir(&self.work, n);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| {
                SourceError::Rounds(RoundsError::Io {
                    path: dir.clone(),
                    source,
                })
            })?;
        }
        let opts = DumpOpts {
            log_file: "pre-dump.log".into(),
            prev_images_dir: round_parent(n),
            ..self.dump_opts(init_pid, &cg, &dir)
        };
        let t = std::time::Instant::now();
        let stats = criu.pre_dump(&opts).map_err(|e| {
            let _ = cg.thaw();
            SourceError::PreDump(e)
        })?;
        let round = Round {
            round: n,
            bytes: stats.pages_written.saturating_mul(PAGE_SIZE),
            dump_ms: super::ms(t.elapsed()),
            send_ms: 0,
        };
        tracing::info!(id = %self.id, round = n, dirty_bytes = round.bytes, dump_ms = round.dump_ms, "pre-copy round");
        let files = round_files(&dir, n)
            .map_err(SourceError::Rounds)?
            .into_iter()
            .map(|(local, remote)| OutgoingFile {
                kind: FileKind::Presync,
                local,
                remote,
                sha256: None,
            })
            .collect();
        self.precopy.record(round);
        Ok(Some(files))
    }
}

/// Why the rounds on disk cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RoundsError {
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pre-copy rounds in {dir} are not 1..={found} without gaps")]
    Gap { dir: PathBuf, found: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn rule(mem: u64, max: Option<u64>) -> StopRule {
        StopRule::new(super::super::modes::test_preflight(mem), max)
    }

    fn r(round: u32, bytes: u64, dump_ms: u64, send_ms: u64) -> Round {
        Round {
            round,
            bytes,
            dump_ms,
            send_ms,
        }
    }

    #[test]
    fn the_first_round_always_runs_and_a_big_one_goes_on() {
        let rule = rule(1024 * MIB, None);
        assert_eq!(rule.decide(&[]), Decision::Continue);
        // 1 GiB sent: without a rate the worst case is all of it again, far off the target.
        assert_eq!(
            rule.decide(&[r(1, 1024 * MIB, 900, 6800)]),
            Decision::Continue
        );
    }

    #[test]
    fn a_small_container_stops_after_one_round() {
        let rule = rule(8 * MIB, None);
        match rule.decide(&[r(1, 8 * MIB, 20, 50)]) {
            Decision::Stop {
                reason: StopReason::Fits,
                final_bytes,
                ..
            } => assert_eq!(final_bytes, 8 * MIB),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn dirty_rate_is_the_last_round_over_the_interval_before_it() {
        let rounds = [r(1, 1024 * MIB, 1000, 7000), r(2, 256 * MIB, 250, 1750)];
        // 256 MiB dirtied during round 1's 8 s.
        assert_eq!(StopRule::dirty_rate(&rounds), Some(32 * MIB));
        assert_eq!(StopRule::dirty_rate(&rounds[..1]), None);
        // During round 2's 2 s the same rate dirties 64 MiB: the final dump's estimate.
        assert_eq!(rule(1024 * MIB, None).final_bytes(&rounds), 64 * MIB);
    }

    #[test]
    fn converging_rounds_stop_when_the_downtime_fits() {
        let rule = rule(1024 * MIB, None);
        // A container dirtying about 32 MiB/s.
        let rounds = [
            r(1, 1024 * MIB, 1000, 7000),
            r(2, 256 * MIB, 250, 1750),
            r(3, 64 * MIB, 60, 430),
            r(4, 16 * MIB, 20, 110),
        ];
        assert_eq!(rule.decide(&rounds[..2]), Decision::Continue);
        assert_eq!(rule.decide(&rounds[..3]), Decision::Continue);
        match rule.decide(&rounds) {
            Decision::Stop {
                reason: StopReason::Fits,
                final_bytes,
                predicted_ms,
            } => {
                assert!(final_bytes < 5 * MIB, "{final_bytes}");
                assert!(predicted_ms <= rule.target_ms());
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_round_that_barely_shrinks_stops_as_not_converging() {
        let rule = rule(1024 * MIB, None);
        let rounds = [r(1, 1024 * MIB, 1000, 7000), r(2, 900 * MIB, 900, 6000)];
        assert!(matches!(
            rule.decide(&rounds),
            Decision::Stop {
                reason: StopReason::NotConverging,
                ..
            }
        ));
        // 79 % of the round before is still progress.
        let ok = [r(1, 1000 * MIB, 1000, 7000), r(2, 790 * MIB, 900, 6000)];
        assert_eq!(rule.decide(&ok), Decision::Continue);
    }

    #[test]
    fn max_rounds_end_a_slow_convergence() {
        let mut rule = rule(1024 * MIB, Some(1));
        rule.max_rounds = 3;
        let rounds = [
            r(1, 1024 * MIB, 1000, 7000),
            r(2, 512 * MIB, 500, 3500),
            r(3, 256 * MIB, 250, 1750),
        ];
        assert_eq!(rule.decide(&rounds[..2]), Decision::Continue);
        assert!(matches!(
            rule.decide(&rounds),
            Decision::Stop {
                reason: StopReason::MaxRounds,
                ..
            }
        ));
    }

    #[test]
    fn max_downtime_is_the_target() {
        assert_eq!(rule(MIB, Some(777)).target_ms(), 777);
        let none = rule(MIB, None);
        assert_eq!(
            none.target_ms(),
            none.preflight.precopy_final_ms(0) + DEFAULT_MEMORY_MS
        );
    }

    #[test]
    fn prediction_runs_the_rule_on_simulated_rounds() {
        let pf = rule(1024 * MIB, None).preflight;
        let (ms, rounds) = predict(&pf, None);
        assert!(rounds >= 2, "{rounds}");
        assert!(ms < pf.predict(super::super::MoveMode::Cold), "{ms}");
        // A container dirtying faster than the link: the rounds do not converge.
        let (_, n) = simulate(&rule(1024 * MIB, None), 1024 * MIB);
        assert_eq!(n, 2);
        // A tiny one: one round.
        assert_eq!(predict(&rule(4 * MIB, None).preflight, None).1, 1);
    }

    #[test]
    fn the_source_records_rounds_and_reports_why_it_stopped() {
        let rounds = SourceRounds::default();
        // Not a pre-copy move: no rounds, a plain final dump.
        assert!(!rounds.before_round(1));
        assert_eq!(rounds.final_dump(), (false, None));
        assert_eq!(rounds.report(), None);
        let mut rule = rule(1024 * MIB, None);
        rule.max_rounds = 2;
        rounds.start(rule);
        assert!(rounds.before_round(1));
        rounds.record(r(1, 1024 * MIB, 1000, 0));
        assert!(rounds.before_round(2));
        rounds.record(r(2, 512 * MIB, 500, 0));
        assert!(!rounds.before_round(3));
        assert_eq!(
            rounds.final_dump(),
            (true, Some(PathBuf::from("../rounds/2")))
        );
        rounds.set_final(3 * MIB);
        let report = rounds.report().unwrap();
        assert_eq!(report.stopped, StopReason::MaxRounds);
        assert_eq!(report.rounds.len(), 2);
        assert_eq!(report.final_bytes, Some(3 * MIB));
        // The send time of each round is measured up to the next decision.
        assert!(report.rounds.iter().all(|r| r.send_ms < 5_000));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["stopped"], "max_rounds");
        assert_eq!(json["rounds"][1]["bytes"], 512 * MIB);
        assert_eq!(report.lines().len(), 3);
    }

    #[test]
    fn a_round_lost_on_the_way_ends_the_rounds() {
        let rounds = SourceRounds::default();
        rounds.start(rule(1024 * MIB, None));
        assert!(rounds.before_round(1));
        // Round 1 failed before it was recorded: asked for round 2, the source stops.
        assert!(!rounds.before_round(2));
    }

    #[test]
    fn round_files_leave_out_logs_and_the_parent_link() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "pages-1.img",
            "pagemap-1.img",
            "pre-dump.log",
            "inventory.img",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink("../1", d.join(PARENT_LINK)).unwrap();
        let names: Vec<String> = round_files(d, 2)
            .unwrap()
            .into_iter()
            .map(|f| f.1)
            .collect();
        assert_eq!(
            names,
            [
                "rounds/2/inventory.img",
                "rounds/2/pagemap-1.img",
                "rounds/2/pages-1.img"
            ]
        );
        // Each name comes back to the same place on the destination.
        for n in &names {
            assert!(round_file(Path::new("/s"), n).is_some(), "{n}");
        }
    }

    #[test]
    fn rounds_chain_to_each_other_and_the_final_dump_to_the_last() {
        assert_eq!(round_parent(1), None);
        assert_eq!(round_parent(2), Some("../1".into()));
        assert_eq!(final_parent(3), Some("../rounds/3".into()));
        assert_eq!(final_parent(0), None);
        assert_eq!(round_dir(Path::new("/w"), 2), Path::new("/w/rounds/2"));
    }

    #[test]
    fn round_files_are_placed_only_under_their_round() {
        let b = Path::new("/s");
        assert_eq!(
            round_file(b, "rounds/2/pages-1.img"),
            Some("/s/rounds/2/pages-1.img".into())
        );
        assert_eq!(remote_name(2, "pages-1.img"), "rounds/2/pages-1.img");
        for bad in [
            "upper.tar",
            "rounds/0/x",
            "rounds/9/x",
            "rounds/01/x",
            "rounds/+1/x",
            "rounds/1/",
            "rounds/1/..",
            "rounds/1/parent",
            "rounds/1/a/b",
            "rounds/x/y",
            "roundsx/1/y",
            "rounds/1",
        ] {
            assert_eq!(round_file(b, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_destination_links_the_rounds_it_received() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let images = base.join("images");
        std::fs::create_dir_all(&images).unwrap();
        assert_eq!(link_rounds(base, &images).unwrap(), 0);
        assert!(std::fs::symlink_metadata(images.join(PARENT_LINK)).is_err());
        for n in 1..=3 {
            std::fs::create_dir_all(round_dir(base, n)).unwrap();
            std::fs::write(round_dir(base, n).join("pages-1.img"), [n as u8]).unwrap();
        }
        assert_eq!(link_rounds(base, &images).unwrap(), 3);
        // Linked twice (a retried restore): same links.
        assert_eq!(link_rounds(base, &images).unwrap(), 3);
        let page = |p: &Path| std::fs::read(p.join("pages-1.img")).unwrap();
        assert_eq!(page(&images.join("parent")), [3]);
        assert_eq!(page(&images.join("parent/parent")), [2]);
        assert_eq!(page(&images.join("parent/parent/parent")), [1]);
        assert!(std::fs::symlink_metadata(round_dir(base, 1).join(PARENT_LINK)).is_err());
        // Moved together (staging to the container directory), the links still resolve.
        let moved = dir.path().join("moved");
        std::fs::create_dir_all(&moved).unwrap();
        std::fs::rename(&images, moved.join("images")).unwrap();
        std::fs::rename(base.join(ROUNDS_DIR), moved.join(ROUNDS_DIR)).unwrap();
        assert_eq!(page(&moved.join("images/parent/parent")), [2]);
        // A gap is refused.
        std::fs::remove_dir_all(round_dir(&moved, 2)).unwrap();
        assert!(matches!(
            rounds_present(&moved),
            Err(RoundsError::Gap { found: 1, .. })
        ));
    }
}
