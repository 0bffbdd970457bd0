//! Identities and peering of lab hosts: every host gets a TLS identity in its state directory before
//! its agent starts, and every other host in its peer store (`peers.json`), pinned by fingerprint.

use super::{LabError, LabHost};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Hex sha256 of `<state_dir>/identity/cert.der`, if the identity exists.
pub(crate) fn fingerprint(state_dir: &Path) -> Option<String> {
    let der = std::fs::read(state_dir.join("identity").join("cert.der")).ok()?;
    Some(hex::encode(Sha256::digest(der)))
}

/// Creates each host's identity and writes every other host into its peer store; records the
/// fingerprints in `hosts`.
pub(crate) fn prepare(hosts: &mut [LabHost]) -> Result<(), LabError> {
    // TODO(lab peering): once mig_migrate::transport offers identity creation and the peer store,
    // create `<state_dir>/identity` here and write every other host (name, address:quic_port,
    // fingerprint) into `<state_dir>/peers.json`. Until then the agents make their own identity (if
    // they do) and the fingerprint is read back after they start.
    for host in hosts.iter_mut() {
        host.fingerprint = fingerprint(&host.state_dir);
    }
    Ok(())
}
