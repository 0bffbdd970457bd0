//! `clients.json`: the API clients an agent accepts over QUIC, pinned by certificate fingerprint.

use mig_migrate::transport::is_fingerprint;
use mig_runtime::fsutil;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Format version of `clients.json`.
const CLIENTS_VERSION: u32 = 1;
/// Largest `clients.json` accepted.
const MAX_CLIENTS_FILE: u64 = 4 << 20;

/// Serializes read-modify-write of the file within the agent.
static LOCK: Mutex<()> = Mutex::new(());

/// Why the client store refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has format version {found}, this agent reads {CLIENTS_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("invalid client name {name:?}")]
    BadName { name: String },
    #[error("invalid fingerprint {fingerprint:?} (want 64 hex characters)")]
    BadFingerprint { fingerprint: String },
    #[error("client {name} or its fingerprint is already pinned")]
    Exists { name: String },
    #[error("no client named {name}")]
    NotFound { name: String },
}

/// One pinned API client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInfo {
    pub name: String,
    /// Hex SHA-256 of the client's certificate.
    pub fingerprint: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    version: u32,
    clients: Vec<ClientInfo>,
}

/// The pinned clients of one agent, read from and saved to `<state-dir>/clients.json`.
#[derive(Debug)]
pub struct ClientStore {
    path: PathBuf,
    clients: Vec<ClientInfo>,
}

impl ClientStore {
    /// Opens `<state_dir>/clients.json` (an absent file is an empty store).
    pub fn open(state_dir: &Path) -> Result<ClientStore, StoreError> {
        let path = state_dir.join("clients.json");
        let clients = match fsutil::read_json::<ClientsFile>(&path, MAX_CLIENTS_FILE) {
            Ok(f) if f.version == CLIENTS_VERSION => f.clients,
            Ok(f) => {
                return Err(StoreError::Version {
                    path,
                    found: f.version,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(ClientStore { path, clients })
    }

    pub fn list(&self) -> &[ClientInfo] {
        &self.clients
    }

    pub fn by_fingerprint(&self, fingerprint: &str) -> Option<ClientInfo> {
        self.clients
            .iter()
            .find(|c| c.fingerprint == fingerprint)
            .cloned()
    }

    /// Pins a client; names and fingerprints are unique.
    pub fn add(&mut self, name: &str, fingerprint: &str) -> Result<ClientInfo, StoreError> {
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        *self = ClientStore::open(self.path.parent().unwrap_or(Path::new("/")))?;
        let fingerprint = fingerprint.to_ascii_lowercase();
        if mig_runtime::spec::validate_name(name).is_err() {
            return Err(StoreError::BadName { name: name.into() });
        }
        if !is_fingerprint(&fingerprint) {
            return Err(StoreError::BadFingerprint { fingerprint });
        }
        if self
            .clients
            .iter()
            .any(|c| c.name == name || c.fingerprint == fingerprint)
        {
            return Err(StoreError::Exists { name: name.into() });
        }
        let c = ClientInfo {
            name: name.into(),
            fingerprint,
        };
        self.clients.push(c.clone());
        self.save()?;
        Ok(c)
    }

    /// Unpins a client by name and returns it.
    pub fn remove(&mut self, name: &str) -> Result<ClientInfo, StoreError> {
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        *self = ClientStore::open(self.path.parent().unwrap_or(Path::new("/")))?;
        let i = self
            .clients
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| StoreError::NotFound { name: name.into() })?;
        let c = self.clients.remove(i);
        self.save()?;
        Ok(c)
    }

    fn save(&self) -> Result<(), StoreError> {
        let file = ClientsFile {
            version: CLIENTS_VERSION,
            clients: self.clients.clone(),
        };
        fsutil::write_json(&self.path, &file).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_list_remove_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ClientStore::open(dir.path()).unwrap();
        let fp = "ab".repeat(32);
        s.add("ci", &fp.to_uppercase()).unwrap();
        assert!(matches!(s.add("ci2", &fp), Err(StoreError::Exists { .. })));
        assert!(matches!(
            s.add("x", "nothex"),
            Err(StoreError::BadFingerprint { .. })
        ));
        assert!(matches!(
            s.add("a/b", &"cd".repeat(32)),
            Err(StoreError::BadName { .. })
        ));
        let again = ClientStore::open(dir.path()).unwrap();
        assert_eq!(again.by_fingerprint(&fp).unwrap().name, "ci");
        s.remove("ci").unwrap();
        assert!(ClientStore::open(dir.path()).unwrap().list().is_empty());
        assert!(matches!(s.remove("ci"), Err(StoreError::NotFound { .. })));
    }
}
