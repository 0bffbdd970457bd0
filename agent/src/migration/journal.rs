//! The migration journal: one JSON file per migration, `<state-dir>/migrations/<id>.json`,
//! rewritten atomically at every state the protocol machines ask to record, with the context a
//! restarted agent needs to roll back or resume (which container, which peer, which cgroup).

use mig_migrate::protocol::{JournalRecord, JournalState, Role};
use mig_runtime::fsutil;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Directory of the journal under the state directory.
pub const JOURNAL_DIR: &str = "migrations";
const MAX_JOURNAL: u64 = 1 << 20;
/// Format of the journal files: 1 is mig 0.1's (no `format` key), 2 adds the key, 3 adds
/// `updated_ns`. A journal of a newer format is refused by name (and skipped by [`list`], left on
/// disk).
pub const JOURNAL_FORMAT: fsutil::Format = fsutil::Format {
    key: "format",
    current: 3,
};

/// One migration's journal file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalEntry {
    pub migration_id: String,
    pub role: Role,
    pub state: JournalState,
    pub container_id: String,
    pub container_name: String,
    /// Source: the destination's peer name; destination: the source agent's name.
    pub peer: String,
    /// The container's cgroup on this host.
    pub cgroup: String,
    /// Seconds since the epoch.
    pub updated: u64,
    /// Nanoseconds within that second (0 in journals of format 2 and older): a container can
    /// have two journals of the same second (a move away, and the move back), and which one is
    /// newer decides whether the container is busy and what a restarted agent recovers.
    #[serde(default)]
    pub updated_ns: u32,
}

/// The time now, as a journal's `updated` and `updated_ns`.
pub fn now() -> (u64, u32) {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs(), d.subsec_nanos()))
        .unwrap_or((0, 0))
}

impl JournalEntry {
    /// When it was last written; orders the journals of one host.
    pub fn stamp(&self) -> (u64, u32) {
        (self.updated, self.updated_ns)
    }

    /// Whether `key` names this entry's container as a user may have named it after it left or
    /// was removed: its name, or a prefix of its id of at least 4 characters.
    pub fn is_named(&self, key: &str) -> bool {
        self.container_name == key || (key.len() >= 4 && self.container_id.starts_with(key))
    }

    /// Sets the last-written time to now.
    pub fn touch(&mut self) {
        (self.updated, self.updated_ns) = now();
    }

    pub fn record(&self) -> JournalRecord {
        JournalRecord {
            migration_id: self.migration_id.clone(),
            role: self.role,
            state: self.state.clone(),
        }
    }
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("invalid migration id {id:?}")]
    BadId { id: String },
    #[error("cannot write the journal {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the journal directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A migration id is 32 lowercase hex characters (it names files).
pub fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new random migration id.
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(JOURNAL_DIR)
}

/// `<state-dir>/migrations/<id>.json`.
pub fn path(state_dir: &Path, id: &str) -> Result<PathBuf, JournalError> {
    if !valid_id(id) {
        return Err(JournalError::BadId { id: id.to_owned() });
    }
    Ok(dir(state_dir).join(format!("{id}.json")))
}

/// Staging directory of an incoming migration: `<state-dir>/migrations/<id>.in`.
pub fn staging(state_dir: &Path, id: &str) -> Result<PathBuf, JournalError> {
    if !valid_id(id) {
        return Err(JournalError::BadId { id: id.to_owned() });
    }
    Ok(dir(state_dir).join(format!("{id}.in")))
}

/// Writes the entry atomically (and durably: fsutil writes a temp file, syncs and renames).
pub fn write(state_dir: &Path, entry: &JournalEntry) -> Result<(), JournalError> {
    let p = path(state_dir, &entry.migration_id)?;
    let d = dir(state_dir);
    std::fs::create_dir_all(&d).map_err(|source| JournalError::Write {
        path: d.clone(),
        source,
    })?;
    fsutil::write_versioned(&p, entry, JOURNAL_FORMAT)
        .map_err(|source| JournalError::Write { path: p, source })
}

pub fn read(state_dir: &Path, id: &str) -> Option<JournalEntry> {
    read_checked(state_dir, id).ok()
}

/// Reads one journal, of this format or an older one; the error names the file (and both
/// versions when it is of a newer format).
pub fn read_checked(state_dir: &Path, id: &str) -> Result<JournalEntry, JournalError> {
    let p = path(state_dir, id)?;
    fsutil::read_versioned(&p, MAX_JOURNAL, JOURNAL_FORMAT)
        .map_err(|source| JournalError::Read { path: p, source })
}

/// Every readable journal entry.
pub fn list(state_dir: &Path) -> Result<Vec<JournalEntry>, JournalError> {
    let d = dir(state_dir);
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(JournalError::ReadDir { path: d, source }),
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        match read_checked(state_dir, id) {
            Ok(e) if e.migration_id == id => out.push(e),
            Ok(_) => tracing::warn!(file = %name, "skipping a migration journal of another id"),
            Err(e) => tracing::warn!(
                file = %name,
                error = %super::chain(&e),
                "skipping an unreadable migration journal (left in place)"
            ),
        }
    }
    Ok(out)
}

/// Container `container_id`'s newest migration on this host, whatever its role.
pub(crate) fn newest_of<'a>(
    entries: &'a [JournalEntry],
    container_id: &str,
) -> Option<&'a JournalEntry> {
    entries
        .iter()
        .filter(|j| j.container_id == container_id)
        .max_by_key(|j| j.stamp())
}

/// Whether a state ends the migration on this side (nothing left to do).
pub fn is_final(state: &JournalState) -> bool {
    matches!(
        state,
        JournalState::Committed | JournalState::RolledBack | JournalState::RollbackFailed { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_round_trip() {
        let id = new_id();
        assert!(valid_id(&id));
        assert!(!valid_id("../x"));
        assert!(!valid_id(&id.to_uppercase()));
        let dir = tempfile::tempdir().unwrap();
        let e = JournalEntry {
            migration_id: id.clone(),
            role: Role::Source,
            state: JournalState::Frozen,
            container_id: "c".into(),
            container_name: "n".into(),
            peer: "host-b".into(),
            cgroup: "mig/c".into(),
            updated: 1,
            updated_ns: 0,
        };
        write(dir.path(), &e).unwrap();
        assert_eq!(read(dir.path(), &id), Some(e.clone()));
        assert_eq!(list(dir.path()).unwrap(), vec![e]);
        assert!(path(dir.path(), "nope").is_err());
        let on_disk = std::fs::read_to_string(path(dir.path(), &id).unwrap()).unwrap();
        assert!(on_disk.contains("\"format\": 3"), "{on_disk}");
    }

    /// A journal of mig 0.1 (no `format`) is read; one of a newer format is skipped and kept.
    #[test]
    fn old_journals_are_read_newer_ones_kept_unread() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(super::dir(dir.path())).unwrap();
        let old = "0123456789abcdef0123456789abcdef";
        std::fs::write(
            path(dir.path(), old).unwrap(),
            format!(
                r#"{{"migration_id":"{old}","role":"Dest","state":"Restored","container_id":"c","container_name":"n","peer":"host-a","cgroup":"mig/c","updated":1700000000}}"#
            ),
        )
        .unwrap();
        let e = read_checked(dir.path(), old).unwrap();
        assert_eq!((e.role, &e.state), (Role::Dest, &JournalState::Restored));
        let newer = "fedcba9876543210fedcba9876543210";
        let text = format!(r#"{{"format":4,"migration_id":"{newer}","future":true}}"#);
        std::fs::write(path(dir.path(), newer).unwrap(), &text).unwrap();
        let err = super::super::chain(&read_checked(dir.path(), newer).unwrap_err());
        assert!(
            err.contains(&format!(
                "{newer}.json has format version 4, newer than version 3"
            )),
            "{err}"
        );
        assert_eq!(list(dir.path()).unwrap(), vec![e]);
        let kept = std::fs::read_to_string(path(dir.path(), newer).unwrap()).unwrap();
        assert_eq!(kept, text);
    }

    /// A container's move away and its move back in one second: the newer is the one written
    /// later within it (CI of session 23 found the move away taken for the newer one).
    #[test]
    fn journals_of_one_second_are_ordered_by_their_nanoseconds() {
        let entry = |mid: &str, role, updated_ns| JournalEntry {
            migration_id: mid.into(),
            role,
            state: JournalState::Committed,
            container_id: "c".into(),
            container_name: "n".into(),
            peer: "host-b".into(),
            cgroup: "mig/c".into(),
            updated: 1_700_000_000,
            updated_ns,
        };
        let away = entry(
            "0123456789abcdef0123456789abcdef",
            Role::Source,
            900_000_000,
        );
        let back = entry("fedcba9876543210fedcba9876543210", Role::Dest, 100_000);
        for js in [
            vec![away.clone(), back.clone()],
            vec![back.clone(), away.clone()],
        ] {
            assert_eq!(newest_of(&js, "c"), Some(&away));
        }
        let dir = tempfile::tempdir().unwrap();
        let mut later = back.clone();
        later.touch();
        assert!(later.stamp() > away.stamp());
        write(dir.path(), &later).unwrap();
        assert_eq!(read(dir.path(), &later.migration_id), Some(later));
    }
}
