//! `clients.json`: the API clients an agent accepts over QUIC, pinned by certificate fingerprint.
//! The store is mig-migrate's [`PinnedStore`], the same as the peers' (`peers.json`).

use mig_migrate::transport::{PinError, Pinned, PinnedStore};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Mutex;

/// Serializes read-modify-write of the file within the agent (every request opens the file).
static LOCK: Mutex<()> = Mutex::new(());

/// Why the client store refused an operation.
pub type StoreError = PinError;

/// One pinned API client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInfo {
    pub name: String,
    /// Hex SHA-256 of the client's certificate.
    pub fingerprint: String,
}

impl Pinned for ClientInfo {
    const KIND: &'static str = "client";
    const FILE: &'static str = "clients.json";
    const LIST: &'static str = "clients";
    fn name(&self) -> &str {
        &self.name
    }
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The pinned clients of one agent, read from and saved to `<state-dir>/clients.json`.
pub type ClientStore = PinnedStore<ClientInfo>;

/// Pins a client (its fingerprint lowercased) in `<state_dir>/clients.json`, re-read under the
/// lock; names and fingerprints are unique.
pub fn add(state_dir: &Path, name: &str, fingerprint: &str) -> Result<ClientInfo, StoreError> {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut store = ClientStore::open(state_dir)?;
    let c = ClientInfo {
        name: name.into(),
        fingerprint: fingerprint.to_ascii_lowercase(),
    };
    store.add(c.clone())?;
    Ok(c)
}

/// Unpins a client by name and returns it.
pub fn remove(state_dir: &Path, name: &str) -> Result<ClientInfo, StoreError> {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ClientStore::open(state_dir)?.remove(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_list_remove_persist() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fp = "ab".repeat(32);
        add(d, "ci", &fp.to_uppercase()).unwrap();
        assert!(matches!(
            add(d, "ci2", &fp),
            Err(StoreError::FingerprintInUse { .. })
        ));
        assert!(matches!(
            add(d, "ci", &"cd".repeat(32)),
            Err(StoreError::Exists { .. })
        ));
        assert!(matches!(
            add(d, "x", "nothex"),
            Err(StoreError::BadFingerprint { .. })
        ));
        assert!(matches!(
            add(d, "a/b", &"cd".repeat(32)),
            Err(StoreError::BadName { .. })
        ));
        let again = ClientStore::open(d).unwrap();
        assert_eq!(again.by_fingerprint(&fp).unwrap().name, "ci");
        remove(d, "ci").unwrap();
        assert!(ClientStore::open(d).unwrap().list().is_empty());
        assert!(matches!(remove(d, "ci"), Err(StoreError::NotFound { .. })));
    }

    /// A `clients.json` as mig 0.1 wrote it is read, and written back in the same shape.
    #[test]
    fn the_file_of_the_previous_release_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clients.json");
        let fp = "0f".repeat(32);
        std::fs::write(
            &p,
            format!(
                "{{\n  \"version\": 1,\n  \"clients\": [\n    {{\n      \"name\": \"ci\",\n      \"fingerprint\": \"{fp}\"\n    }}\n  ]\n}}"
            ),
        )
        .unwrap();
        let before = std::fs::read_to_string(&p).unwrap();
        assert_eq!(ClientStore::open(dir.path()).unwrap().list()[0].name, "ci");
        add(dir.path(), "ops", &"1e".repeat(32)).unwrap();
        remove(dir.path(), "ops").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), before);
    }
}
