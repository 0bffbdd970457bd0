//! Agent-to-agent transport: the TLS identity ([`Identity`]), the pinned peer store
//! ([`PeerStore`]), QUIC endpoints with mutual TLS that accept only pinned certificates
//! ([`endpoint`], [`connect`]), verified file transfer over QUIC streams ([`send_files`],
//! [`receive_file`]) and the drivers that run the [`crate::protocol`] machines over a connection
//! ([`run_source`], [`run_dest`]); TCP connections carried over a migration connection
//! ([`tunnel`]: CRIU's page server between two agents).

mod identity;
mod peers;
mod tls;

pub use identity::{fingerprint, is_fingerprint, Identity, IdentityError};
pub use peers::{Peer, PeerError, PeerStore, PinError, Pinned, PinnedStore, PINNED_VERSION};
pub use tls::{
    accept, api_client_config, client_config, client_config_ordered, connect, endpoint,
    endpoint_config, endpoint_on, endpoint_with, negotiated_alpn, peer_fingerprint, server_config,
    transport_config, udp_socket, AllowedPeers, TlsError, ALPN, API_ALPN, GSO_SEGMENTS,
    MAX_UDP_PAYLOAD, UDP_BUFFER,
};

mod driver;
mod files;
pub(crate) use driver::chain;
pub mod probe;
pub mod tunnel;

pub use driver::{
    ask_resolution, locate, open_source, run_dest, run_source, run_source_on, DestHost, DestReport,
    DriverError, Located, Progress, Refusal, SourceHost, SourceLink, SourceReport, Timings,
    FILE_STREAMS, PROGRESS_EVERY,
};
pub use files::{
    hash_file, receive_file, send_file, send_file_as, send_files, send_files_as, FileError,
    OutgoingFile, ReceivedFile, SentFile, TransferStats, REFUSED,
};

/// Errors of host actions (the agent's freeze, dump, restore...): any error, reported to the
/// peer and in the outcome as its message chain.
pub type HostError = Box<dyn std::error::Error + Send + Sync>;
