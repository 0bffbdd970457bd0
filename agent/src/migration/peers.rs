//! Pinned peers and the agent's identity as the API exposes them (`mig peers`, `mig info`).
//! Adding or removing a peer updates `peers.json` and the endpoint's allowed fingerprints at once.

use super::{IdentityInfo, PeerInfo};
use crate::api::{ApiError, ErrorKind};
use crate::daemon::Agent;
use mig_migrate::transport::{Peer, PeerError};
use std::net::SocketAddr;

fn unavailable() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "the migration endpoint is not running",
    )
}

fn peer_error(e: PeerError) -> ApiError {
    let kind = match &e {
        PeerError::BadName { .. } | PeerError::BadFingerprint { .. } => ErrorKind::InvalidArgument,
        PeerError::Exists { .. } | PeerError::FingerprintInUse { .. } => ErrorKind::AlreadyExists,
        PeerError::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Internal,
    };
    ApiError::new(kind, super::chain(&e))
}

fn info(p: &Peer) -> PeerInfo {
    PeerInfo {
        name: p.name.clone(),
        address: p.address.to_string(),
        fingerprint: p.fingerprint.clone(),
    }
}

impl Agent {
    pub(crate) fn peer_list(&self) -> Result<Vec<PeerInfo>, ApiError> {
        let net = self.migration.net().ok_or_else(unavailable)?;
        let store = net.peers.lock().unwrap_or_else(|p| p.into_inner());
        Ok(store.list().iter().map(info).collect())
    }

    pub(crate) fn peer_add(
        &self,
        name: &str,
        address: &str,
        fingerprint: &str,
    ) -> Result<PeerInfo, ApiError> {
        let net = self.migration.net().ok_or_else(unavailable)?;
        let address: SocketAddr = address.parse().map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                format!("invalid address {address:?} (want IP:PORT)"),
            )
        })?;
        let peer = Peer {
            name: name.to_owned(),
            address,
            fingerprint: fingerprint.to_ascii_lowercase(),
        };
        // A move to it would wait for itself (QA of session 25: 30 s, then a timeout).
        if peer.fingerprint == net.identity.fingerprint() {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "fingerprint {} is this agent's own ({}): a peer is another agent (`mig --host HOST info` shows its fingerprint)",
                    peer.fingerprint, self.cfg.name
                ),
            ));
        }
        let mut store = net.peers.lock().unwrap_or_else(|p| p.into_inner());
        store.add(peer.clone()).map_err(peer_error)?;
        net.allowed.insert(&peer.fingerprint);
        tracing::info!(peer = %peer.name, address = %peer.address, "peer pinned");
        Ok(info(&peer))
    }

    pub(crate) fn peer_remove(&self, name: &str) -> Result<PeerInfo, ApiError> {
        let net = self.migration.net().ok_or_else(unavailable)?;
        let mut store = net.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peer = store.remove(name).map_err(peer_error)?;
        if store.by_fingerprint(&peer.fingerprint).is_none() {
            net.allowed.remove(&peer.fingerprint);
        }
        tracing::info!(peer = %peer.name, "peer removed");
        Ok(info(&peer))
    }

    pub(crate) fn identity_info(&self) -> Result<IdentityInfo, ApiError> {
        let net = self.migration.net().ok_or_else(unavailable)?;
        Ok(IdentityInfo {
            name: self.cfg.name.clone(),
            fingerprint: net.identity.fingerprint().to_owned(),
            listen: net.listen.map(|a| a.to_string()),
        })
    }
}
