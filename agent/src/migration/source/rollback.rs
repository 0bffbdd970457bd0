//! What a rolled-back move reports: its cause in words, and CRIU's dump log, kept beside the
//! container's records and named in the error.

use std::path::{Path, PathBuf};

/// Why a move rolled back, in words (the error message used to show the Rust names,
/// `Refused(NameClash)`).
pub(super) fn cause_words(cause: &mig_migrate::protocol::Cause) -> String {
    use mig_migrate::protocol::Cause;
    use mig_migrate::wire::{AbortReason as A, RefuseReason as R};
    let abort = |a: &A| {
        match a {
        A::FreezeFailed => "the freeze failed or was refused",
        A::DumpFailed => "the checkpoint (criu dump) failed",
        A::SendFailed => "sending the files failed",
        A::BadFile => "a file arrived damaged, or it could not be written or was refused",
        A::TransferIncomplete => "the destination could not place what it received, or files were missing at the end of the transfer",
        A::RestoreFailed => "the restore failed",
        A::ResumeFailed => "resuming the restored container failed",
        A::Timeout => "a phase timed out",
        A::ProtocolViolation => "a peer sent an unexpected message",
        A::JournalFailed => "writing the migration journal failed",
        A::Cancelled => "it was cancelled",
    }
    };
    match cause {
        Cause::Refused(r) => format!(
            "the destination refused it: {}",
            match r {
                R::NameClash => "a container with that id or name is already there",
                R::DiskFull => "not enough disk space",
                R::CriuVersion => "its CRIU is missing or older than this host's",
                R::Kernel => "its kernel lacks something the container needs",
                R::InvalidSpec => "the container's spec or image is invalid there",
                R::Busy => "another migration of the container is in progress",
                R::Policy => "its policy refuses it",
            }
        ),
        Cause::Local(a) => format!("on this host: {}", abort(a)),
        Cause::Peer(a) => format!("on the destination: {}", abort(a)),
        Cause::LinkLost => "the link to the destination was lost".into(),
        Cause::Resolution => "settled with the destination after the link was lost".into(),
        Cause::Operator => "an operator decided".into(),
    }
}

/// The API error kind of a move rolled back for `cause`, so that a program can act on it
/// without reading the message (every rollback was `internal`: QA of session 20's rebalancer
/// could not tell "a container of that name is there" from a failed dump).
pub(super) fn rolled_back_kind(cause: &mig_migrate::protocol::Cause) -> crate::api::ErrorKind {
    use crate::api::ErrorKind as K;
    use mig_migrate::protocol::Cause;
    use mig_migrate::wire::{AbortReason as A, RefuseReason as R};
    match cause {
        Cause::Refused(R::NameClash) => K::AlreadyExists,
        Cause::Refused(R::Busy) => K::Conflict,
        Cause::Refused(R::InvalidSpec) => K::InvalidArgument,
        Cause::Refused(R::DiskFull | R::CriuVersion | R::Kernel | R::Policy) => K::Unavailable,
        Cause::LinkLost | Cause::Local(A::Timeout) | Cause::Peer(A::Timeout) => K::Unavailable,
        Cause::Local(A::Cancelled) | Cause::Peer(A::Cancelled) | Cause::Operator => K::Conflict,
        Cause::Resolution => K::Conflict,
        Cause::Local(_) | Cause::Peer(_) => K::Internal,
    }
}

/// Where a rolled-back move keeps CRIU's dump log: beside the container's records, as the
/// move's work directory (`<container>/migration`) goes.
fn kept_dump_log(work: &Path) -> Option<PathBuf> {
    work.parent().map(|dir| dir.join("move-dump.log"))
}

/// Keeps the dump log of a move that is being rolled back (the error names it).
pub(super) fn keep_dump_log(work: &Path) {
    let from = work.join("images").join("dump.log");
    if let Some(to) = kept_dump_log(work).filter(|_| from.is_file()) {
        if let Err(e) = std::fs::rename(&from, &to) {
            tracing::warn!(from = %from.display(), error = %e, "cannot keep the dump log");
        }
    }
}

/// `detail` naming the dump log where it was kept instead of the removed work directory, and
/// the cause of a CRIU failure users meet that its own words do not make plain.
pub(super) fn kept_log_named(work: &Path, detail: String) -> String {
    let from = work.join("images").join("dump.log");
    let detail = match kept_dump_log(work) {
        Some(to) if to.is_file() => {
            detail.replace(&from.display().to_string(), &to.display().to_string())
        }
        _ => detail,
    };
    // First: CRIU's log lines after it are long (QA of session 24 read past it).
    match crate::migration::criu_failure_hint(&detail) {
        Some(hint) => format!("{hint}; {detail}"),
        None => detail,
    }
}

#[cfg(test)]
mod kept_log_tests {
    use super::{keep_dump_log, kept_log_named};

    /// A rolled-back move's error names a log that exists: the dump log moves beside the
    /// container's records before the work directory goes (it named a removed file before).
    #[test]
    fn the_dump_log_of_a_rolled_back_move_is_kept_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("migration");
        std::fs::create_dir_all(work.join("images")).unwrap();
        std::fs::write(
            work.join("images/dump.log"),
            "Error (criu/fsnotify.c:284)\n",
        )
        .unwrap();
        let detail = format!(
            "criu dump failed (exit status: 1), log {}: Error",
            work.join("images/dump.log").display()
        );
        keep_dump_log(&work);
        std::fs::remove_dir_all(&work).unwrap();
        let kept = dir.path().join("move-dump.log");
        assert_eq!(
            kept_log_named(&work, detail),
            format!(
                "criu dump failed (exit status: 1), log {}: Error",
                kept.display()
            )
        );
        assert!(std::fs::read_to_string(&kept).unwrap().contains("fsnotify"));
        let overlay_watch = kept_log_named(
            &work,
            "Error (criu/fsnotify.c:284): fsnotify: \tCan't dump that handle".into(),
        );
        assert!(
            overlay_watch.contains("inotify or fanotify"),
            "{overlay_watch}"
        );
    }
}

#[cfg(test)]
mod cause_tests {
    use super::{cause_words, rolled_back_kind};
    use mig_migrate::protocol::Cause;
    use mig_migrate::wire::{AbortReason, RefuseReason};

    #[test]
    fn causes_are_words() {
        for c in [
            Cause::Refused(RefuseReason::NameClash),
            Cause::Local(AbortReason::DumpFailed),
            Cause::Peer(AbortReason::RestoreFailed),
            Cause::LinkLost,
        ] {
            let w = cause_words(&c);
            assert!(!w.contains("NameClash") && !w.contains("Failed"), "{w}");
        }
        assert_eq!(
            cause_words(&Cause::Refused(RefuseReason::NameClash)),
            "the destination refused it: a container with that id or name is already there"
        );
    }

    /// A rebalancer tells a name clash, a busy peer and a lost link apart by kind.
    #[test]
    fn rollbacks_have_kinds_a_program_can_act_on() {
        use crate::api::ErrorKind;
        assert_eq!(
            rolled_back_kind(&Cause::Refused(RefuseReason::NameClash)),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            rolled_back_kind(&Cause::Refused(RefuseReason::DiskFull)),
            ErrorKind::Unavailable
        );
        assert_eq!(rolled_back_kind(&Cause::LinkLost), ErrorKind::Unavailable);
        assert_eq!(
            rolled_back_kind(&Cause::Peer(AbortReason::RestoreFailed)),
            ErrorKind::Internal
        );
    }
}
