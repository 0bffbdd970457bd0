//! Fault hooks for tests and experiments: `MIG_FAULT=<point>:<fault>` in `migd`'s environment,
//! or the same text in the file `<state-dir>/mig-fault` (read at every hook, so a test can arm
//! one agent of a lab without restarting it), makes the agent misbehave at one point of a
//! migration. Compiled in and inert unless set; documented in docs/migration.md ("Fault hooks").
//!
//! | point            | side        | where                                           |
//! |------------------|-------------|-------------------------------------------------|
//! | `dest-transfer`  | destination | when the first file of the final transfer arrives |
//! | `dest-restore`   | destination | after the container is restored (still frozen)  |
//! | `dest-commit`    | destination | when Commit arrives, before resuming            |
//! | `source-dump`    | source      | after the dump, before the final transfer       |
//!
//! Faults: `kill` (the agent SIGKILLs itself: an agent crash), `fail` (the step returns an
//! error), `corrupt` (`source-dump` only: one byte of a CRIU image file is flipped after the
//! image set was sealed, so its digest no longer matches in transit).

use std::path::Path;
use std::sync::OnceLock;

/// The environment variable.
pub const ENV: &str = "MIG_FAULT";
/// The file in the state directory.
pub const FILE: &str = "mig-fault";

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    DestTransfer,
    DestRestore,
    DestCommit,
    SourceDump,
}

/// What happens there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Fail,
    Corrupt,
}

fn parse(s: &str) -> Option<(Point, Fault)> {
    let (p, f) = s.trim().split_once(':')?;
    let point = match p {
        "dest-transfer" => Point::DestTransfer,
        "dest-restore" => Point::DestRestore,
        "dest-commit" => Point::DestCommit,
        "source-dump" => Point::SourceDump,
        _ => return None,
    };
    let fault = match f {
        "kill" => Fault::Kill,
        "fail" => Fault::Fail,
        "corrupt" => Fault::Corrupt,
        _ => return None,
    };
    Some((point, fault))
}

fn from_env() -> Option<(Point, Fault)> {
    static CONF: OnceLock<Option<(Point, Fault)>> = OnceLock::new();
    *CONF.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        let parsed = parse(&v);
        match parsed {
            Some(_) => tracing::warn!(fault = %v, "fault injection armed"),
            None => tracing::warn!(fault = %v, "ignoring an unknown MIG_FAULT"),
        }
        parsed
    })
}

/// The fault armed at `point` for the agent with state directory `state_dir`, if any.
pub fn armed(state_dir: &Path, point: Point) -> Option<Fault> {
    let from_file = std::fs::read_to_string(state_dir.join(FILE))
        .ok()
        .and_then(|s| parse(&s));
    let (p, f) = from_file.or_else(from_env)?;
    if p != point {
        return None;
    }
    tracing::warn!(?point, fault = ?f, "injecting a fault");
    Some(f)
}

/// Like [`armed`], but a `kill` fault is carried out here: the agent SIGKILLs itself.
pub fn at(state_dir: &Path, point: Point) -> Option<Fault> {
    let f = armed(state_dir, point)?;
    if f == Fault::Kill {
        die();
    }
    Some(f)
}

/// An agent crash: SIGKILL to ourselves.
pub fn die() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    // SIGKILL to ourselves does not return; park in case its delivery is delayed.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse("dest-restore:fail"),
            Some((Point::DestRestore, Fault::Fail))
        );
        assert_eq!(
            parse("source-dump:corrupt"),
            Some((Point::SourceDump, Fault::Corrupt))
        );
        assert_eq!(parse("dest-restore"), None);
        assert_eq!(parse("x:kill"), None);
    }
}
