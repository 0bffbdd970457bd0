//! The remote agent API: the same [`crate::api`] frames as the unix socket, on bidirectional
//! streams of a QUIC connection to the agent's endpoint, with mutual TLS.
//!
//! The agent's endpoint serves two protocols, told apart by ALPN: `mig/1` (migrations between
//! pinned peers, [`crate::migration`]) and `mig-api/1` (API clients). Clients are pinned by their
//! certificate fingerprint in `<state-dir>/clients.json` (`mig clients add NAME --fingerprint FP`),
//! separately from peers: a peer may send migrations but not use the API unless it is also pinned
//! as a client, and a client may use the API but not send migrations. Each bidi stream a client
//! opens is one API session (hellos, then requests), so a client can follow events on one stream
//! and send requests on another.

mod connect;
mod store;

pub use connect::{client_identity, connect, default_identity_dir, RemoteError};
pub use store::{ClientInfo, ClientStore, StoreError};

use crate::api::{ApiError, ErrorKind};
use crate::daemon::Agent;
use mig_migrate::transport::{negotiated_alpn, peer_fingerprint, API_ALPN};
use std::sync::Arc;
use tokio::sync::broadcast;

/// QUIC application close code for a refused client or peer.
pub const CLOSE_REFUSED: u32 = 403;

/// Routes an accepted connection of the agent's endpoint: API clients are served here (or
/// refused when not pinned as clients), migrations from pinned peers are handed back, anything
/// else is closed. The migration acceptor calls this first.
pub fn route(agent: &Arc<Agent>, conn: quinn::Connection) -> Option<quinn::Connection> {
    let fp = peer_fingerprint(&conn).unwrap_or_default();
    if negotiated_alpn(&conn).as_deref() == Some(API_ALPN) {
        let agent = agent.clone();
        tokio::spawn(async move { serve(agent, conn, fp).await });
        return None;
    }
    if !is_peer(agent, &fp) {
        tracing::warn!(fingerprint = %fp, remote = %conn.remote_address(), "refused a migration from a client that is not a pinned peer");
        conn.close(CLOSE_REFUSED.into(), b"not a pinned peer");
        return None;
    }
    Some(conn)
}

fn is_peer(agent: &Agent, fp: &str) -> bool {
    agent.migration.net().is_some_and(|n| {
        n.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_fingerprint(fp)
            .is_some()
    })
}

/// The API client connections open now, with their certificates' fingerprints: removing a
/// client closes its connections (only new ones were refused: one already connected went on
/// making requests and receiving events).
static CONNECTED: std::sync::Mutex<Vec<(String, quinn::Connection)>> =
    std::sync::Mutex::new(Vec::new());

fn connected() -> std::sync::MutexGuard<'static, Vec<(String, quinn::Connection)>> {
    CONNECTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes connection `conn` (of fingerprint `fp`) off [`CONNECTED`] when dropped.
struct Connected(quinn::Connection);

impl Connected {
    fn add(fp: &str, conn: &quinn::Connection) -> Connected {
        connected().push((fp.to_owned(), conn.clone()));
        Connected(conn.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        let id = self.0.stable_id();
        connected().retain(|(_, c)| c.stable_id() != id);
    }
}

/// Serves one API client connection: every bidi stream is bridged to an API session.
async fn serve(agent: Arc<Agent>, conn: quinn::Connection, fp: String) {
    let client = match ClientStore::open(&agent.cfg.state_dir)
        .map(|s| s.by_fingerprint(&fp).cloned())
    {
        Ok(Some(c)) => c.name,
        Ok(None) => {
            tracing::warn!(fingerprint = %fp, remote = %conn.remote_address(), "refused an API client that is not pinned");
            conn.close(
                CLOSE_REFUSED.into(),
                b"this certificate is not a pinned API client of the agent",
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %crate::migration::chain(&e), "cannot read the client store");
            conn.close(
                CLOSE_REFUSED.into(),
                b"the agent cannot read its client store",
            );
            return;
        }
    };
    let _connected = Connected::add(&fp, &conn);
    // Removed between the check above and the registration: no later removal would close it.
    if !ClientStore::open(&agent.cfg.state_dir).is_ok_and(|s| s.by_fingerprint(&fp).is_some()) {
        conn.close(CLOSE_REFUSED.into(), b"this API client was removed");
        return;
    }
    tracing::info!(%client, remote = %conn.remote_address(), "API client connected");
    // Sessions end with their stream or the connection; the agent's shutdown closes the endpoint.
    let (_never, _) = broadcast::channel::<()>(1);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%client, error = %e, "API client gone");
                return;
            }
        };
        let (ours, theirs) = match tokio::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a socket pair for an API session");
                return;
            }
        };
        let agent = agent.clone();
        let rx = _never.subscribe();
        tokio::spawn(crate::daemon::serve_bridged(agent, theirs, rx));
        tokio::spawn(async move {
            let mut quic = tokio::io::join(recv, send);
            let mut ours = ours;
            let _ = tokio::io::copy_bidirectional(&mut quic, &mut ours).await;
        });
    }
}

/// Adds, lists and removes pinned API clients (the `client_*` requests). Adding or removing
/// updates the endpoint's accepted fingerprints at once.
impl Agent {
    pub(crate) fn client_add(&self, name: &str, fingerprint: &str) -> Result<ClientInfo, ApiError> {
        let net = self.migration.net().ok_or_else(unavailable)?;
        let c = store::add(&self.cfg.state_dir, name, fingerprint).map_err(store_error)?;
        net.allowed.insert(&c.fingerprint);
        tracing::info!(client = %c.name, "API client pinned");
        Ok(c)
    }

    pub(crate) fn client_list(&self) -> Result<Vec<ClientInfo>, ApiError> {
        let store = ClientStore::open(&self.cfg.state_dir).map_err(store_error)?;
        Ok(store.list().to_vec())
    }

    pub(crate) fn client_remove(&self, name: &str) -> Result<ClientInfo, ApiError> {
        let net = self.migration.net().ok_or_else(unavailable)?;
        let c = store::remove(&self.cfg.state_dir, name).map_err(store_error)?;
        if !is_peer(self, &c.fingerprint) {
            net.allowed.remove(&c.fingerprint);
        }
        let mut closed = 0;
        for (_, conn) in connected().iter().filter(|(fp, _)| *fp == c.fingerprint) {
            conn.close(CLOSE_REFUSED.into(), b"this API client was removed");
            closed += 1;
        }
        tracing::info!(client = %c.name, closed, "API client removed");
        Ok(c)
    }
}

/// Pins the clients of the configuration file (when not pinned yet) and lets the endpoint accept
/// every pinned client's certificate. Runs at start, after the migration endpoint is up.
pub fn start(agent: &Arc<Agent>, configured: Vec<ClientInfo>) -> Result<usize, StoreError> {
    let dir = &agent.cfg.state_dir;
    for c in configured {
        let known = ClientStore::open(dir)?
            .list()
            .iter()
            .any(|k| k.name == c.name || k.fingerprint == c.fingerprint.to_ascii_lowercase());
        if !known {
            store::add(dir, &c.name, &c.fingerprint)?;
        }
    }
    let store = ClientStore::open(dir)?;
    if let Some(net) = agent.migration.net() {
        for c in store.list() {
            net.allowed.insert(&c.fingerprint);
        }
    }
    Ok(store.list().len())
}

fn unavailable() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "the QUIC endpoint is not running (migd --listen)",
    )
}

fn store_error(e: StoreError) -> ApiError {
    let kind = match &e {
        StoreError::BadName { .. } | StoreError::BadFingerprint { .. } => {
            ErrorKind::InvalidArgument
        }
        StoreError::Exists { .. } | StoreError::FingerprintInUse { .. } => ErrorKind::AlreadyExists,
        StoreError::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Internal,
    };
    ApiError::new(kind, crate::migration::chain(&e))
}
