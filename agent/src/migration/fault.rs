//! Fault hooks for tests and experiments: `MIG_FAULT=<point>:<fault>` in `migd`'s environment
//! makes the agent misbehave at one point of a migration. Compiled in and inert unless set;
//! documented in docs/migration.md ("Fault hooks").
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

use std::sync::OnceLock;

/// The environment variable.
pub const ENV: &str = "MIG_FAULT";

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

fn configured() -> Option<(Point, Fault)> {
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

/// The fault armed at `point`, if any. A `kill` fault never returns: the agent dies here.
pub fn at(point: Point) -> Option<Fault> {
    let (p, f) = configured()?;
    if p != point {
        return None;
    }
    tracing::warn!(?point, ?f, "injecting a fault");
    if f == Fault::Kill {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL to ourselves does not return; park in case it is delayed.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    Some(f)
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
