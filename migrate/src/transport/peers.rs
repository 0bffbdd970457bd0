//! The peer store: `peers.json` in the state directory, the agents this one trusts, each pinned
//! by its certificate fingerprint.

use super::identity::is_fingerprint;
use mig_runtime::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Format version of `peers.json`.
const PEERS_VERSION: u32 = 1;
/// Largest `peers.json` accepted.
const MAX_PEERS_FILE: u64 = 4 << 20;

/// Why the peer store refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
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
    #[error("{path} has format version {found}, this agent reads {PEERS_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("invalid peer name {name:?}")]
    BadName { name: String },
    #[error("invalid fingerprint {fingerprint:?} (want 64 lowercase hex characters)")]
    BadFingerprint { fingerprint: String },
    #[error("peer {name} already exists")]
    Exists { name: String },
    #[error("fingerprint {fingerprint} is already pinned for peer {name}")]
    FingerprintInUse { fingerprint: String, name: String },
    #[error("no peer named {name}")]
    NotFound { name: String },
}

/// A trusted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub address: SocketAddr,
    /// Hex SHA-256 of the peer's certificate.
    pub fingerprint: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    version: u32,
    peers: Vec<Peer>,
}

/// The peers of one agent, persisted atomically on every change.
#[derive(Debug)]
pub struct PeerStore {
    path: PathBuf,
    peers: Vec<Peer>,
}

impl PeerStore {
    /// Opens `<state_dir>/peers.json` (an absent file is an empty store).
    pub fn open(state_dir: &Path) -> Result<PeerStore, PeerError> {
        let path = state_dir.join("peers.json");
        let peers = match fsutil::read_json::<PeersFile>(&path, MAX_PEERS_FILE) {
            Ok(f) if f.version == PEERS_VERSION => f.peers,
            Ok(f) => {
                return Err(PeerError::Version {
                    path,
                    found: f.version,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(PeerError::Read { path, source }),
        };
        Ok(PeerStore { path, peers })
    }

    pub fn list(&self) -> &[Peer] {
        &self.peers
    }

    pub fn get(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }

    pub fn by_fingerprint(&self, fingerprint: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.fingerprint == fingerprint)
    }

    /// Every pinned fingerprint (for [`super::AllowedPeers`]).
    pub fn fingerprints(&self) -> HashSet<String> {
        self.peers.iter().map(|p| p.fingerprint.clone()).collect()
    }

    /// Adds a peer; names and fingerprints are unique.
    pub fn add(&mut self, peer: Peer) -> Result<(), PeerError> {
        if mig_runtime::spec::validate_name(&peer.name).is_err() {
            return Err(PeerError::BadName { name: peer.name });
        }
        if !is_fingerprint(&peer.fingerprint) {
            return Err(PeerError::BadFingerprint {
                fingerprint: peer.fingerprint,
            });
        }
        if self.get(&peer.name).is_some() {
            return Err(PeerError::Exists { name: peer.name });
        }
        if let Some(other) = self.by_fingerprint(&peer.fingerprint) {
            return Err(PeerError::FingerprintInUse {
                fingerprint: peer.fingerprint,
                name: other.name.clone(),
            });
        }
        self.peers.push(peer);
        self.save().inspect_err(|_| {
            self.peers.pop();
        })
    }

    /// Removes a peer by name and returns it.
    pub fn remove(&mut self, name: &str) -> Result<Peer, PeerError> {
        let i = self
            .peers
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| PeerError::NotFound { name: name.into() })?;
        let peer = self.peers.remove(i);
        if let Err(e) = self.save() {
            self.peers.insert(i, peer);
            return Err(e);
        }
        Ok(peer)
    }

    fn save(&self) -> Result<(), PeerError> {
        let file = PeersFile {
            version: PEERS_VERSION,
            peers: self.peers.clone(),
        };
        fsutil::write_json(&self.path, &file).map_err(|source| PeerError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, fp: char) -> Peer {
        Peer {
            name: name.into(),
            address: "127.0.0.1:7443".parse().unwrap(),
            fingerprint: fp.to_string().repeat(64),
        }
    }

    #[test]
    fn add_remove_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PeerStore::open(dir.path()).unwrap();
        assert!(s.list().is_empty());
        s.add(peer("host-b", 'b')).unwrap();
        s.add(peer("host-c", 'c')).unwrap();
        assert!(matches!(
            s.add(peer("host-b", 'd')),
            Err(PeerError::Exists { .. })
        ));
        assert!(matches!(
            s.add(peer("host-d", 'c')),
            Err(PeerError::FingerprintInUse { .. })
        ));
        assert!(matches!(
            s.add(peer("host-e", 'X')),
            Err(PeerError::BadFingerprint { .. })
        ));
        let s2 = PeerStore::open(dir.path()).unwrap();
        assert_eq!(s2.list().len(), 2);
        assert_eq!(s2.get("host-c").unwrap().fingerprint, "c".repeat(64));
        s.remove("host-b").unwrap();
        assert!(matches!(
            s.remove("host-b"),
            Err(PeerError::NotFound { .. })
        ));
        let s3 = PeerStore::open(dir.path()).unwrap();
        assert_eq!(s3.list(), &[peer("host-c", 'c')]);
        assert!(s3.fingerprints().contains(&"c".repeat(64)));
    }
}
