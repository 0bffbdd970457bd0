//! Fault injection for tests and experiments, compiled into the real `migd` and inert unless
//! armed. `MIG_FAULT=<point>:<fault>` in `migd`'s environment, or the same text in the file
//! `<state-dir>/mig-fault` (read at every hook, so a test can arm one agent of a lab without
//! restarting it), makes the agent misbehave at one point of a migration. Several faults may be
//! armed at once, separated by commas or newlines. docs/reliability.md has the full story.
//!
//! | point             | where it fires                                                        |
//! |-------------------|-----------------------------------------------------------------------|
//! | `source-prepare`  | after `Preparing` is journaled, before Prepare is sent                |
//! | `source-presync`  | before the presync files (missing layers, writable layer) are built   |
//! | `source-before-freeze` | after the presync (files and memory), before the cgroup freezes  |
//! | `source-freeze`   | right after the cgroup froze, before the dump                         |
//! | `source-dump`     | before CRIU dumps (`corrupt`: after the image set is sealed)          |
//! | `source-transfer` | after the dump, as the final transfer starts                          |
//! | `source-restore`  | when the destination reported Restored, before the commit decision    |
//! | `source-commit`   | after `CommitSent` is journaled, before Commit is sent                |
//! | `dest-prepare`    | when the Prepare arrives, before the checks                           |
//! | `dest-presync`    | when the first presync file arrives                                   |
//! | `dest-memory-presync` | at Prepare (`fail`: the stream-mode memory presync is refused)    |
//! | `dest-transfer`   | when the first file of the final transfer arrives                     |
//! | `dest-restore`    | before the restore (`kill`: after it, the copy restored and frozen)   |
//! | `dest-commit`     | when Commit arrives (journaled `Committed`), before resuming          |
//! | `dest-image-remove` | a rolled-back move, before it removes the image it added (`delay`) |
//!
//! Faults: `kill` (the agent SIGKILLs itself: a crash), `fail` (the step returns an error),
//! `delay:MS` (the step sleeps MS milliseconds first), `cut` (the agent closes its migration
//! connections at once, as a link cut the peer notices, and the step fails), `corrupt` (`source-transfer` and
//! `source-dump`: one byte of the largest CRIU image file is flipped after its digest was
//! announced, so the destination's check fails in transit), `criu-fail` (`source-dump`: CRIU is
//! run against a PID that does not exist; `dest-restore`: CRIU cannot open its log file). A fault
//! a point does not support is ignored there. Each point fires at most once per migration.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The environment variable.
pub const ENV: &str = "MIG_FAULT";
/// The file in the state directory.
pub const FILE: &str = "mig-fault";
/// Longest accepted delay.
const MAX_DELAY: Duration = Duration::from_secs(600);
/// Largest fault file read.
const MAX_FILE: u64 = 4096;

/// Where a fault can be injected (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    SourcePrepare,
    SourcePresync,
    SourceBeforeFreeze,
    SourceFreeze,
    SourceDump,
    SourceTransfer,
    SourceRestore,
    SourceCommit,
    DestPrepare,
    DestPresync,
    DestMemoryPresync,
    DestTransfer,
    DestRestore,
    DestCommit,
    /// A rolled-back incoming move, before it removes the image it added (no other arriving
    /// move of that image found).
    DestImageRemove,
    /// A local `mig checkpoint`, after CRIU's dump and before the image set is sealed.
    CheckpointDump,
    /// A local `mig checkpoint --export`, after the seal (and the end of the container, without
    /// `--leave-running`), before the archive is written.
    CheckpointExport,
}

const POINTS: [(&str, Point); 17] = [
    ("source-prepare", Point::SourcePrepare),
    ("source-presync", Point::SourcePresync),
    ("source-before-freeze", Point::SourceBeforeFreeze),
    ("source-freeze", Point::SourceFreeze),
    ("source-dump", Point::SourceDump),
    ("source-transfer", Point::SourceTransfer),
    ("source-restore", Point::SourceRestore),
    ("source-commit", Point::SourceCommit),
    ("dest-prepare", Point::DestPrepare),
    ("dest-presync", Point::DestPresync),
    ("dest-memory-presync", Point::DestMemoryPresync),
    ("dest-transfer", Point::DestTransfer),
    ("dest-restore", Point::DestRestore),
    ("dest-commit", Point::DestCommit),
    ("dest-image-remove", Point::DestImageRemove),
    ("checkpoint-dump", Point::CheckpointDump),
    ("checkpoint-export", Point::CheckpointExport),
];

impl Point {
    /// The point's name (`source-dump`).
    pub fn name(self) -> &'static str {
        POINTS
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }
}

/// What happens there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Fail,
    Corrupt,
    Delay(Duration),
    CriuFail,
    Cut,
}

/// A `fail` fault: the step errors with this.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {point}")]
pub struct Injected {
    pub point: &'static str,
}

impl From<Injected> for super::source::SourceError {
    fn from(e: Injected) -> Self {
        super::source::SourceError::Injected(e.point)
    }
}

impl From<Injected> for super::dest::DestError {
    fn from(e: Injected) -> Self {
        super::dest::DestError::Injected(e.point)
    }
}

fn parse_one(s: &str) -> Option<(Point, Fault)> {
    let (p, f) = s.trim().split_once(':')?;
    let point = POINTS.iter().find(|(n, _)| *n == p)?.1;
    let fault = match f {
        "kill" => Fault::Kill,
        "fail" => Fault::Fail,
        "corrupt" => Fault::Corrupt,
        "criu-fail" => Fault::CriuFail,
        "cut" => Fault::Cut,
        _ => {
            let ms: u64 = f.strip_prefix("delay:")?.parse().ok()?;
            Fault::Delay(Duration::from_millis(ms).min(MAX_DELAY))
        }
    };
    Some((point, fault))
}

/// Every valid `point:fault` of a comma- or newline-separated list (unknown items are skipped).
fn parse(s: &str) -> Vec<(Point, Fault)> {
    s.split([',', '\n'])
        .filter(|i| !i.trim().is_empty())
        .filter_map(|i| {
            let parsed = parse_one(i);
            if parsed.is_none() {
                tracing::warn!(fault = %i.trim(), "ignoring an unknown fault");
            }
            parsed
        })
        .collect()
}

fn from_env() -> &'static [(Point, Fault)] {
    static CONF: OnceLock<Vec<(Point, Fault)>> = OnceLock::new();
    CONF.get_or_init(|| {
        let Ok(v) = std::env::var(ENV) else {
            return Vec::new();
        };
        let parsed = parse(&v);
        if !parsed.is_empty() {
            tracing::warn!(fault = %v, "fault injection armed");
        }
        parsed
    })
}

fn from_file(state_dir: &Path) -> Vec<(Point, Fault)> {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(state_dir.join(FILE)) else {
        return Vec::new();
    };
    let mut s = String::new();
    if f.take(MAX_FILE).read_to_string(&mut s).is_err() {
        return Vec::new();
    }
    parse(&s)
}

/// The fault armed at `point` for the agent with state directory `state_dir`, if any (the file
/// first, then the environment). Nothing is carried out.
pub fn armed(state_dir: &Path, point: Point) -> Option<Fault> {
    let f = from_file(state_dir)
        .into_iter()
        .chain(from_env().iter().copied())
        .find(|(p, _)| *p == point)
        .map(|(_, f)| f)?;
    tracing::warn!(point = point.name(), fault = ?f, "injecting a fault");
    Some(f)
}

/// Whether `point` already fired for migration `migration` (and marks it fired).
fn fired_before(point: Point, migration: &str) -> bool {
    static FIRED: Mutex<Option<HashSet<(Point, String)>>> = Mutex::new(None);
    let mut g = FIRED.lock().unwrap_or_else(|p| p.into_inner());
    let set = g.get_or_insert_with(HashSet::new);
    if set.len() > 10_000 {
        set.clear();
    }
    !set.insert((point, migration.to_owned()))
}

/// The connections `cut` closes: every migration connection of this agent still open.
fn connections() -> &'static Mutex<Vec<quinn::Connection>> {
    static CONNS: Mutex<Vec<quinn::Connection>> = Mutex::new(Vec::new());
    &CONNS
}

/// Registers a migration connection (both sides) so that a `cut` fault can close it.
pub fn track(conn: &quinn::Connection) {
    let mut v = connections().lock().unwrap_or_else(|p| p.into_inner());
    v.retain(|c| c.close_reason().is_none());
    v.push(conn.clone());
}

/// Closes every tracked connection at once: the peer sees the link go.
fn cut() {
    let conns = std::mem::take(&mut *connections().lock().unwrap_or_else(|p| p.into_inner()));
    tracing::warn!(
        connections = conns.len(),
        "cutting the migration connections"
    );
    for c in conns {
        c.close(quinn::VarInt::from_u32(0x0f), b"injected fault: cut");
    }
}

/// Carries out what can be done here: `kill` does not return, `cut` closes the connections and
/// fails the step, `fail` becomes an error. Returns the fault for the caller to act on (`corrupt`, `criu-fail`,
/// `delay`), `None` when nothing is armed.
fn common(point: Point, f: Fault) -> Result<Option<Fault>, Injected> {
    match f {
        Fault::Kill => die(),
        Fault::Cut => {
            cut();
            Err(Injected {
                point: point.name(),
            })
        }
        Fault::Fail => Err(Injected {
            point: point.name(),
        }),
        other => Ok(Some(other)),
    }
}

/// The hook for synchronous code (a blocking task, or a quick step on a runtime thread): kills,
/// cuts, sleeps or fails as armed; returns `corrupt` and `criu-fail` for the caller.
pub fn hit(state_dir: &Path, point: Point) -> Result<Option<Fault>, Injected> {
    let Some(f) = armed(state_dir, point) else {
        return Ok(None);
    };
    match common(point, f)? {
        Some(Fault::Delay(d)) => {
            sleep_blocking(d);
            Ok(None)
        }
        other => Ok(other),
    }
}

/// Like [`hit`], firing at most once per migration (for hooks called once per file).
pub fn hit_once(
    state_dir: &Path,
    point: Point,
    migration: &str,
) -> Result<Option<Fault>, Injected> {
    if armed_quiet(state_dir, point) && !fired_before(point, migration) {
        return hit(state_dir, point);
    }
    Ok(None)
}

/// The hook for async code: like [`hit`], sleeping without blocking the runtime.
pub async fn hit_async(state_dir: &Path, point: Point) -> Result<Option<Fault>, Injected> {
    let Some(f) = armed(state_dir, point) else {
        return Ok(None);
    };
    match common(point, f)? {
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(None)
        }
        other => Ok(other),
    }
}

fn armed_quiet(state_dir: &Path, point: Point) -> bool {
    from_file(state_dir)
        .iter()
        .chain(from_env())
        .any(|(p, _)| *p == point)
}

/// The hook around a journal write: before the source journals `CommitSent` is the point
/// `source-restore` (the destination restored, nothing decided yet); after it, `source-commit`;
/// after `Preparing`, `source-prepare`.
pub async fn journal(
    state_dir: &Path,
    role: mig_migrate::protocol::Role,
    state: &mig_migrate::protocol::JournalState,
    written: bool,
) -> Result<(), Injected> {
    use mig_migrate::protocol::{JournalState as J, Role};
    let point = match (role, state, written) {
        (Role::Source, J::Preparing, true) => Point::SourcePrepare,
        (Role::Source, J::CommitSent, false) => Point::SourceRestore,
        (Role::Source, J::CommitSent, true) => Point::SourceCommit,
        _ => return Ok(()),
    };
    hit_async(state_dir, point).await.map(|_| ())
}

/// `criu-fail` at `dest-restore`: a directory where CRIU's restore log goes, so CRIU cannot open
/// its log and fails (the image set still verifies: `*.log` is not part of it).
pub fn spoil_restore_log(images_dir: &Path) {
    if let Err(e) = std::fs::create_dir_all(images_dir.join("restore.log")) {
        tracing::warn!(error = %e, "cannot arm criu-fail");
    }
}

/// `criu-fail` at `source-dump`: a PID no process has (above the kernel's `pid_max` limit).
pub const MISSING_PID: i32 = 4_194_304 + 1;

/// The PID CRIU dumps: [`MISSING_PID`] under `criu-fail`, else `pid`.
pub fn criu_pid(injected: Option<Fault>, pid: i32) -> i32 {
    if injected == Some(Fault::CriuFail) {
        MISSING_PID
    } else {
        pid
    }
}

/// The `dest-restore` hook before the restore: like [`hit_async`], except that `kill` is
/// returned, for the caller to carry out once the copy is restored and frozen.
pub async fn before_restore(state_dir: &Path) -> Result<Option<Fault>, Injected> {
    match armed(state_dir, Point::DestRestore) {
        Some(Fault::Kill) => Ok(Some(Fault::Kill)),
        Some(_) => hit_async(state_dir, Point::DestRestore).await,
        None => Ok(None),
    }
}

/// The destination's point for an arriving file: `dest-presync` for layers and the presync copy,
/// `dest-transfer` for the final files.
pub fn file_point(kind: mig_migrate::wire::FileKind) -> Point {
    use mig_migrate::wire::FileKind;
    match kind {
        FileKind::Layer | FileKind::Presync => Point::DestPresync,
        FileKind::Image | FileKind::Delta => Point::DestTransfer,
    }
}

/// Sleeps without stalling a tokio worker: on a multi-thread runtime's worker the thread is
/// handed over first.
fn sleep_blocking(d: Duration) {
    let multi = tokio::runtime::Handle::try_current()
        .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .unwrap_or(false);
    if multi {
        tokio::task::block_in_place(|| std::thread::sleep(d));
    } else {
        std::thread::sleep(d);
    }
}

/// Like [`armed`], but a `kill` fault is carried out here: the agent SIGKILLs itself. Kept for
/// hooks that act on the fault themselves.
pub fn at(state_dir: &Path, point: Point) -> Option<Fault> {
    let f = armed(state_dir, point)?;
    if f == Fault::Kill {
        die();
    }
    Some(f)
}

/// An agent crash: SIGKILL to ourselves.
pub fn die() -> ! {
    tracing::warn!("injected fault: the agent kills itself");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    // SIGKILL to ourselves does not return; park in case its delivery is delayed.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse("dest-restore:fail"),
            vec![(Point::DestRestore, Fault::Fail)]
        );
        assert_eq!(
            parse("source-dump:corrupt"),
            vec![(Point::SourceDump, Fault::Corrupt)]
        );
        assert_eq!(
            parse("source-freeze:delay:250, dest-commit:cut\nsource-dump:criu-fail\n"),
            vec![
                (
                    Point::SourceFreeze,
                    Fault::Delay(Duration::from_millis(250))
                ),
                (Point::DestCommit, Fault::Cut),
                (Point::SourceDump, Fault::CriuFail),
            ]
        );
        assert!(parse("dest-restore").is_empty());
        assert!(parse("x:kill").is_empty());
        assert!(parse("dest-commit:delay:x").is_empty());
        assert_eq!(
            parse("dest-commit:delay:99999999"),
            vec![(Point::DestCommit, Fault::Delay(MAX_DELAY))]
        );
    }

    #[test]
    fn names_round_trip() {
        for (n, p) in POINTS {
            assert_eq!(p.name(), n);
            assert_eq!(parse_one(&format!("{n}:kill")), Some((p, Fault::Kill)));
        }
    }

    #[test]
    fn file_arms_and_fires_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(hit(dir.path(), Point::DestPresync).unwrap(), None);
        std::fs::write(dir.path().join(FILE), "dest-presync:fail").unwrap();
        assert!(hit(dir.path(), Point::DestPresync).is_err());
        assert_eq!(hit(dir.path(), Point::DestPrepare).unwrap(), None);
        assert!(hit_once(dir.path(), Point::DestPresync, "m1").is_err());
        assert_eq!(
            hit_once(dir.path(), Point::DestPresync, "m1").unwrap(),
            None
        );
        std::fs::write(dir.path().join(FILE), "dest-presync:delay:10").unwrap();
        let t = std::time::Instant::now();
        assert_eq!(hit(dir.path(), Point::DestPresync).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(10));
        std::fs::write(dir.path().join(FILE), "dest-presync:criu-fail").unwrap();
        assert_eq!(
            hit(dir.path(), Point::DestPresync).unwrap(),
            Some(Fault::CriuFail)
        );
    }
}
