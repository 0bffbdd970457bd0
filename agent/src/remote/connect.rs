//! The client side of the remote API: a client identity (key and self-signed certificate, like an
//! agent's) and [`connect`], which opens a QUIC connection with mutual TLS to an agent pinned by
//! its fingerprint and returns an ordinary [`Client`].

use crate::client::{Client, ClientError};
use mig_migrate::transport::{api_client_config, Identity, IdentityError, TlsError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The TLS server name sent (pinning ignores names).
const SERVER_NAME: &str = "mig-peer";

/// Why a remote connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot load or create the client identity under {dir}")]
    Identity {
        dir: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("no home directory for the default identity (use --identity DIR)")]
    NoHome,
    #[error("invalid agent fingerprint {0:?} (want 64 hex characters)")]
    BadFingerprint(String),
    #[error("cannot set up tls")]
    Tls(#[source] Box<TlsError>),
    #[error("cannot open a local quic endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("cannot connect to the agent at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("the agent at {addr} refused the connection or is unreachable")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("the agent at {addr} refused an API stream (is this client's fingerprint pinned there with `mig clients add`?)")]
    Stream {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("the agent at {addr} refused this client (is its fingerprint pinned with `mig clients add`?)")]
    Refused {
        addr: SocketAddr,
        #[source]
        source: ClientError,
    },
}

impl RemoteError {
    /// This error and its causes on one line ([`crate::client::report`]).
    pub fn report(&self) -> String {
        crate::client::report(self)
    }
}

/// `~/.config/mig` (from `$HOME`).
pub fn default_identity_dir() -> Result<PathBuf, RemoteError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".config").join("mig"))
        .ok_or(RemoteError::NoHome)
}

/// Loads the client identity from `<dir>/identity/`, creating it on first use.
pub fn client_identity(dir: &Path) -> Result<Identity, RemoteError> {
    Identity::load_or_create(dir, "mig-client").map_err(|source| RemoteError::Identity {
        dir: dir.to_owned(),
        source,
    })
}

/// Connects to the agent at `addr` whose certificate has `fingerprint`, presenting `identity`,
/// and opens one API session.
pub async fn connect(
    addr: SocketAddr,
    fingerprint: &str,
    identity: &Identity,
) -> Result<Client, RemoteError> {
    let fingerprint = fingerprint.to_ascii_lowercase();
    if !mig_migrate::transport::is_fingerprint(&fingerprint) {
        return Err(RemoteError::BadFingerprint(fingerprint));
    }
    let config =
        api_client_config(identity, &fingerprint).map_err(|e| RemoteError::Tls(Box::new(e)))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(RemoteError::Endpoint)?;
    let conn = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|source| RemoteError::Connect { addr, source })?
        .await
        .map_err(|source| RemoteError::Handshake { addr, source })?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|source| RemoteError::Stream { addr, source })?;
    let stream = Box::new(tokio::io::join(recv, send));
    Client::handshake_on(stream, Some(Box::new((endpoint, conn))))
        .await
        .map_err(|source| RemoteError::Refused { addr, source })
}
