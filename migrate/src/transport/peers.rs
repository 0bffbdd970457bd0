//! Pinned stores: a JSON file in the state directory listing the remote ends an agent trusts,
//! each pinned by its certificate fingerprint ([`PinnedStore`]). The agent keeps two: its peers
//! (`peers.json`, [`PeerStore`]) and its API clients (`clients.json`, in mig-agent).
//!
//! Both files have the same shape, `{"version": 1, "<list>": [...]}`, with unknown keys refused.

use super::identity::is_fingerprint;
use mig_runtime::fsutil;
use serde::de::DeserializeOwned;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Format version of the pinned store files (`peers.json`, `clients.json`).
pub const PINNED_VERSION: u32 = 1;
/// Largest store file accepted.
const MAX_PINNED_FILE: u64 = 4 << 20;

/// What a [`PinnedStore`] holds: a named entry pinned by a certificate fingerprint.
pub trait Pinned: Clone + Serialize + DeserializeOwned {
    /// What an entry is called in messages: `peer`, `client`.
    const KIND: &'static str;
    /// The file in the state directory: `peers.json`.
    const FILE: &'static str;
    /// The key of the list in the file: `peers`.
    const LIST: &'static str;
    fn name(&self) -> &str;
    /// Hex SHA-256 of the certificate.
    fn fingerprint(&self) -> &str;
}

/// Why a pinned store refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
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
    #[error("{path} has format version {found}, this agent reads {PINNED_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("invalid {kind} name {name:?}")]
    BadName { kind: &'static str, name: String },
    #[error("invalid fingerprint {fingerprint:?} (want 64 lowercase hex characters)")]
    BadFingerprint { fingerprint: String },
    #[error("{kind} {name} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("fingerprint {fingerprint} is already pinned for {kind} {name}")]
    FingerprintInUse {
        kind: &'static str,
        fingerprint: String,
        name: String,
    },
    #[error("no {kind} named {name}")]
    NotFound { kind: &'static str, name: String },
}

/// Why the peer store refused an operation.
pub type PeerError = PinError;

/// A trusted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub address: SocketAddr,
    /// Hex SHA-256 of the peer's certificate.
    pub fingerprint: String,
}

impl Pinned for Peer {
    const KIND: &'static str = "peer";
    const FILE: &'static str = "peers.json";
    const LIST: &'static str = "peers";
    fn name(&self) -> &str {
        &self.name
    }
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The peers of one agent (`peers.json`).
pub type PeerStore = PinnedStore<Peer>;

/// The file as written: `version` first, then the list under [`Pinned::LIST`].
struct FileOut<'a, T: Pinned>(&'a [T]);

impl<T: Pinned> Serialize for FileOut<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("PinnedFile", 2)?;
        st.serialize_field("version", &PINNED_VERSION)?;
        st.serialize_field(T::LIST, self.0)?;
        st.end()
    }
}

/// Reads the file's version and list; any other key is refused.
fn parse<T: Pinned>(
    path: &Path,
    mut obj: serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<T>, PinError> {
    let invalid = |msg: String| PinError::Read {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, msg),
    };
    if let Some(k) = obj.keys().find(|k| *k != "version" && *k != T::LIST) {
        return Err(invalid(format!(
            "unknown field `{k}`, expected `version` or `{}`",
            T::LIST
        )));
    }
    let version = obj
        .remove("version")
        .ok_or_else(|| invalid("missing field `version`".into()))?;
    let found = u32::deserialize(version).map_err(|e| invalid(format!("version: {e}")))?;
    if found != PINNED_VERSION {
        return Err(PinError::Version {
            path: path.to_owned(),
            found,
        });
    }
    let list = obj
        .remove(T::LIST)
        .ok_or_else(|| invalid(format!("missing field `{}`", T::LIST)))?;
    Vec::<T>::deserialize(list).map_err(|e| invalid(format!("{}: {e}", T::LIST)))
}

/// The pinned entries of one agent, read from `<state-dir>/<T::FILE>` and written back atomically
/// on every change. Names and fingerprints are unique.
#[derive(Debug)]
pub struct PinnedStore<T> {
    path: PathBuf,
    items: Vec<T>,
}

impl<T: Pinned> PinnedStore<T> {
    /// Opens `<state_dir>/<T::FILE>` (an absent file is an empty store).
    pub fn open(state_dir: &Path) -> Result<PinnedStore<T>, PinError> {
        let path = state_dir.join(T::FILE);
        let items = match fsutil::read_json::<serde_json::Map<String, serde_json::Value>>(
            &path,
            MAX_PINNED_FILE,
        ) {
            Ok(obj) => parse(&path, obj)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(PinError::Read { path, source }),
        };
        Ok(PinnedStore { path, items })
    }

    pub fn list(&self) -> &[T] {
        &self.items
    }

    pub fn get(&self, name: &str) -> Option<&T> {
        self.items.iter().find(|p| p.name() == name)
    }

    pub fn by_fingerprint(&self, fingerprint: &str) -> Option<&T> {
        self.items.iter().find(|p| p.fingerprint() == fingerprint)
    }

    /// Every pinned fingerprint (for [`super::AllowedPeers`]).
    pub fn fingerprints(&self) -> HashSet<String> {
        self.items
            .iter()
            .map(|p| p.fingerprint().to_owned())
            .collect()
    }

    /// Adds an entry; names and fingerprints are unique. Saved before it returns.
    pub fn add(&mut self, item: T) -> Result<(), PinError> {
        if mig_runtime::spec::validate_name(item.name()).is_err() {
            return Err(PinError::BadName {
                kind: T::KIND,
                name: item.name().to_owned(),
            });
        }
        if !is_fingerprint(item.fingerprint()) {
            return Err(PinError::BadFingerprint {
                fingerprint: item.fingerprint().to_owned(),
            });
        }
        if self.get(item.name()).is_some() {
            return Err(PinError::Exists {
                kind: T::KIND,
                name: item.name().to_owned(),
            });
        }
        if let Some(other) = self.by_fingerprint(item.fingerprint()) {
            return Err(PinError::FingerprintInUse {
                kind: T::KIND,
                fingerprint: item.fingerprint().to_owned(),
                name: other.name().to_owned(),
            });
        }
        self.items.push(item);
        self.save().inspect_err(|_| {
            self.items.pop();
        })
    }

    /// Removes an entry by name and returns it. Saved before it returns.
    pub fn remove(&mut self, name: &str) -> Result<T, PinError> {
        let i = self
            .items
            .iter()
            .position(|p| p.name() == name)
            .ok_or_else(|| PinError::NotFound {
                kind: T::KIND,
                name: name.into(),
            })?;
        let item = self.items.remove(i);
        if let Err(e) = self.save() {
            self.items.insert(i, item);
            return Err(e);
        }
        Ok(item)
    }

    fn save(&self) -> Result<(), PinError> {
        fsutil::write_json(&self.path, &FileOut(&self.items)).map_err(|source| PinError::Write {
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

    /// The file keeps its shape: `version` first, then the list; unknown keys and other versions
    /// are refused.
    #[test]
    fn file_format_is_kept_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("peers.json");
        let fp = "a".repeat(64);
        // As written by mig 0.1.
        std::fs::write(
            &p,
            format!(
                r#"{{"version":1,"peers":[{{"name":"host-b","address":"10.0.0.2:7443","fingerprint":"{fp}"}}]}}"#
            ),
        )
        .unwrap();
        let mut s = PeerStore::open(dir.path()).unwrap();
        assert_eq!(s.get("host-b").unwrap().fingerprint, fp);
        s.add(peer("host-c", 'c')).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["peers"].as_array().unwrap().len(), 2);
        assert!(
            text.find("\"version\"").unwrap() < text.find("\"peers\"").unwrap(),
            "{text}"
        );
        std::fs::write(&p, r#"{"version":2,"peers":[]}"#).unwrap();
        assert!(matches!(
            PeerStore::open(dir.path()),
            Err(PinError::Version { found: 2, .. })
        ));
        std::fs::write(&p, r#"{"version":1,"peers":[],"clients":[]}"#).unwrap();
        let e = PeerStore::open(dir.path()).unwrap_err();
        assert!(
            format!("{:?}", e).contains("unknown field `clients`"),
            "{e:?}"
        );
        std::fs::write(&p, r#"{"version":1}"#).unwrap();
        assert!(matches!(
            PeerStore::open(dir.path()),
            Err(PinError::Read { .. })
        ));
    }
}
