//! Identities and peering of lab hosts: every host gets its TLS identity in its state directory
//! before its agent starts (the agent loads it), and every other host in its peer store
//! (`peers.json`: name, `address:quic_port`, fingerprint), so the agents trust exactly each other.

use super::{LabError, LabHost};
use mig_migrate::transport::{Identity, Peer, PeerStore};
use std::net::SocketAddr;
use std::path::Path;

/// Hex sha256 of `<state_dir>/identity/cert.der`, if the identity exists.
pub(crate) fn fingerprint(state_dir: &Path) -> Option<String> {
    let der = std::fs::read(state_dir.join("identity").join("cert.der")).ok()?;
    Some(mig_migrate::transport::fingerprint(&der))
}

/// Creates (or loads) each host's identity, records its fingerprint in `hosts`, and writes every
/// other host into each host's peer store. A peer already there under the same name is replaced.
pub(crate) fn prepare(hosts: &mut [LabHost]) -> Result<(), LabError> {
    for host in hosts.iter_mut() {
        let id = Identity::load_or_create(&host.state_dir, &host.name).map_err(|source| {
            LabError::Identity {
                host: host.name.clone(),
                source,
            }
        })?;
        host.fingerprint = Some(id.fingerprint().to_string());
    }
    for host in hosts.iter() {
        let store_err = |source| LabError::PeerStore {
            host: host.name.clone(),
            source,
        };
        let mut store = PeerStore::open(&host.state_dir).map_err(store_err)?;
        for other in hosts.iter().filter(|o| o.name != host.name) {
            let Some(fingerprint) = other.fingerprint.clone() else {
                continue;
            };
            if store.get(&other.name).is_some() {
                store.remove(&other.name).map_err(store_err)?;
            }
            let peer = Peer {
                name: other.name.clone(),
                address: SocketAddr::new(other.address.into(), other.quic_port),
                fingerprint,
            };
            store.add(peer).map_err(store_err)?;
        }
    }
    Ok(())
}
