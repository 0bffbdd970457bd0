//! QUIC endpoints with mutual TLS 1.3 and pinned certificates.
//!
//! There is no certificate authority: each agent has a self-signed certificate
//! ([`super::Identity`]) and trusts exactly the fingerprints in its peer store. The server side
//! accepts a client only if the client certificate's fingerprint is in the [`AllowedPeers`] set;
//! the client side accepts the server only if its fingerprint is the one expected for that peer.
//! Both refuse at the handshake, and both verify the handshake signatures with the ring
//! provider's algorithms (proof that the peer holds the pinned certificate's key).

use super::identity::{fingerprint, Identity};
use super::peers::Peer;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The ALPN protocol of agent-to-agent connections.
pub const ALPN: &[u8] = b"mig/1";

/// The ALPN protocol of remote API clients (the agent API's frames on a bidi stream); the agent's
/// endpoint accepts both and dispatches on the negotiated one.
pub const API_ALPN: &[u8] = b"mig-api/1";

/// The TLS server name used when connecting (pinning ignores names; SNI must be a DNS name).
const SERVER_NAME: &str = "mig-peer";

/// Why an endpoint or a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot build tls configuration")]
    Config {
        #[source]
        source: rustls::Error,
    },
    #[error("tls configuration unusable for quic")]
    Quic {
        #[source]
        source: quinn::crypto::rustls::NoInitialCipherSuite,
    },
    #[error("cannot bind quic endpoint on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start connecting to {peer} at {addr}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to {peer} at {addr} failed")]
    Handshake {
        peer: String,
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("incoming connection failed")]
    Accept {
        #[source]
        source: quinn::ConnectionError,
    },
}

/// The set of client fingerprints a server accepts; shared with the verifier, so updates apply
/// to the next handshake.
#[derive(Debug, Clone, Default)]
pub struct AllowedPeers(Arc<RwLock<HashSet<String>>>);

impl AllowedPeers {
    pub fn new(fingerprints: HashSet<String>) -> AllowedPeers {
        AllowedPeers(Arc::new(RwLock::new(fingerprints)))
    }

    /// Replaces the whole set (for example from [`super::PeerStore::fingerprints`]).
    pub fn replace(&self, fingerprints: HashSet<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = fingerprints;
    }

    pub fn insert(&self, fingerprint: &str) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fingerprint.to_string());
    }

    pub fn remove(&self, fingerprint: &str) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(fingerprint);
    }

    pub fn contains(&self, fingerprint: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fingerprint)
    }
}

/// ring's TLS 1.3 cipher suites with AES-128-GCM offered first (ring's own order starts with
/// AES-256-GCM): fewer AES rounds per packet for the same AEAD; the others stay as fallbacks.
/// A server follows the client's order, so a peer offering AES-256-GCM first still gets it.
fn provider() -> Arc<CryptoProvider> {
    provider_ordered(true)
}

fn provider_ordered(aes128_first: bool) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    if aes128_first {
        // Stable: the other suites keep ring's order.
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    Arc::new(p)
}

/// Server side: accepts client certificates whose fingerprint is allowed.
#[derive(Debug)]
struct PinnedClientVerifier {
    allowed: AllowedPeers,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if self.allowed.contains(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %fp, "refused client with an unpinned certificate");
            // The reason reaches the client in the connection's close: what it sees is all its
            // user learns (QA: a source whose identity was made again read a bare
            // "ApplicationVerificationFailure").
            Err(rustls::Error::General(format!(
                "this host does not trust the certificate {fp}: an agent's is pinned here with \
                 `mig peers add NAME ADDR --fingerprint FP` (after `mig peers rm NAME` when it \
                 changed), a remote client's with `mig clients add`"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side: accepts exactly one server fingerprint.
#[derive(Debug)]
struct PinnedServerVerifier {
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if fp == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %fp, expected = %self.expected, "refused server with an unexpected certificate");
            // Said in the error too: the client's message is all a user sees (QA: a peer whose
            // identity was made again gave a bare "ApplicationVerificationFailure").
            Err(rustls::Error::General(format!(
                "the peer presented certificate {fp}, but {} is pinned for it: if its identity \
                 was made again, check the new fingerprint with `mig info` on that host and pin \
                 it (`mig peers rm NAME`, then `mig peers add NAME ADDR --fingerprint FP`; for \
                 `mig --remote`, give that fingerprint to `--fingerprint`); otherwise something \
                 else answers at its address",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The largest UDP payload path MTU discovery tries: a 9000-byte IPv4 frame less its IP and UDP
/// headers. On a 1500-byte path discovery settles lower by itself.
pub const MAX_UDP_PAYLOAD: u16 = 9000 - 20 - 8;

/// Transport parameters for bulk transfer: large stream and connection windows so a single
/// stream is not flow-control bound on a fast link, up to 16 concurrent file streams, keep-alive
/// well under the idle timeout. UDP GSO is on by default in quinn.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(8));
    // Path MTU discovery up to a jumbo frame (the lab's links are 9000 bytes): packets of 1452
    // bytes at most would cost six times the per-packet work on a link that carries 8952.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    // A peer that dies (its agent killed, the link cut) is noticed after the idle timeout: the
    // source thaws its container then, so keep it short; keep-alives hold a quiet link open.
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        10_000,
    ))));
    // The end of a file's stream is confirmed by the peer's ACK (`SendStream::stopped`), which a
    // receiver holding a single unacknowledged packet delays by up to its max_ack_delay (25 ms):
    // the small image files sent while the container is frozen took 10 ms or 35 ms. Ask the
    // peer to acknowledge within 1 ms (ACK frequency extension; quinn always accepts it, so
    // older agents do too). Bulk transfers are unchanged: an ACK every other packet.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    t
}

/// A server configuration requiring a client certificate pinned in `allowed`.
pub fn server_config(
    identity: &Identity,
    allowed: AllowedPeers,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedClientVerifier {
        allowed,
        algs: provider.signature_verification_algorithms,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![identity.cert().clone()], identity.key())
        .map_err(|source| TlsError::Config { source })?;
    tls.alpn_protocols = vec![ALPN.to_vec(), API_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|source| TlsError::Quic { source })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A client configuration presenting `identity` and accepting only `expected_fingerprint`.
pub fn client_config(
    identity: &Identity,
    expected_fingerprint: &str,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(identity, expected_fingerprint, ALPN)
}

/// Like [`client_config`], for a remote API client ([`API_ALPN`]).
pub fn api_client_config(
    identity: &Identity,
    expected_fingerprint: &str,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(identity, expected_fingerprint, API_ALPN)
}

/// [`client_config`] with ring's own cipher suite order (AES-256-GCM first) when
/// `aes128_first` is false: for comparisons (`mig bench move --link-variants ...:aes256`).
pub fn client_config_ordered(
    identity: &Identity,
    expected_fingerprint: &str,
    aes128_first: bool,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with(
        identity,
        expected_fingerprint,
        ALPN,
        provider_ordered(aes128_first),
    )
}

fn client_config_for(
    identity: &Identity,
    expected_fingerprint: &str,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with(identity, expected_fingerprint, alpn, provider())
}

fn client_config_with(
    identity: &Identity,
    expected_fingerprint: &str,
    alpn: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = PinnedServerVerifier {
        expected: expected_fingerprint.to_string(),
        algs: provider.signature_verification_algorithms,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.cert().clone()], identity.key())
        .map_err(|source| TlsError::Config { source })?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|source| TlsError::Quic { source })?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Kernel buffer of each endpoint's UDP socket, both directions. The default (about 200 KiB)
/// holds only 23 jumbo datagrams: a receiver that falls behind for a moment drops packets, and
/// QUIC's congestion control then halves the sending rate.
pub const UDP_BUFFER: usize = 8 << 20;

/// Binds a UDP socket for a QUIC endpoint on `addr` with [`UDP_BUFFER`] bytes of kernel buffer
/// each way (beyond `net.core.rmem_max` when the process may, i.e. as root; else as much as the
/// limits allow).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = bind_when_free(addr)?;
    if setsockopt(&socket, sockopt::RcvBufForce, &UDP_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::RcvBuf, &UDP_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &UDP_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::SndBuf, &UDP_BUFFER);
    }
    Ok(socket)
}

/// How long [`udp_socket`] waits for its address to be free.
const BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr`, waiting up to [`BIND_WAIT`] while it is in use: an agent started right after
/// the previous one was killed finds the port still held by the dying process for a moment
/// (QA: `mig lab restart` after a `SIGKILL` left an agent that had died of "Address already in
/// use"). Blocks; meant for an agent's start.
fn bind_when_free(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let start = std::time::Instant::now();
    loop {
        match std::net::UdpSocket::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < BIND_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// The endpoint settings: datagrams up to [`MAX_UDP_PAYLOAD`] accepted. quinn's default (1472)
/// is also announced to the peer as `max_udp_payload_size`, which caps its path MTU discovery:
/// without this, [`transport_config`]'s jumbo upper bound has no effect.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    // MAX_UDP_PAYLOAD is within the valid range (1200..=65527).
    let _ = c.max_udp_payload_size(MAX_UDP_PAYLOAD);
    c
}

/// Datagrams per UDP segmentation offload (GSO) send: as many full-size datagrams as fit in one
/// 64 KiB UDP send. quinn batches up to 10, and Linux refuses a batch over 65507 bytes with
/// EMSGSIZE, which quinn takes for a failed MTU probe and drops silently: with 8952-byte
/// datagrams, every batch of 8 or more would be lost.
pub const GSO_SEGMENTS: usize = 65507 / MAX_UDP_PAYLOAD as usize;

/// A QUIC endpoint on `socket` (see [`udp_socket`]), with `server` if it accepts connections,
/// mig's [`endpoint_config`] and at most [`GSO_SEGMENTS`] datagrams per send. Must be called
/// inside a tokio runtime.
pub fn endpoint_on(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_with(socket, server, endpoint_config(), GSO_SEGMENTS)
}

/// Like [`endpoint_on`] with other endpoint settings and GSO batch size (for measurements).
pub fn endpoint_with(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    config: quinn::EndpointConfig,
    max_segments: usize,
) -> std::io::Result<quinn::Endpoint> {
    use quinn::Runtime;
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(CappedSegments {
        inner,
        max: max_segments.max(1),
    });
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// quinn's UDP socket with fewer datagrams per GSO send (see [`GSO_SEGMENTS`]).
#[derive(Debug)]
struct CappedSegments {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    max: usize,
}

impl quinn::AsyncUdpSocket for CappedSegments {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Binds a QUIC endpoint on `addr` that accepts pinned clients and can connect to peers.
/// Must be called inside a tokio runtime.
pub fn endpoint(
    addr: SocketAddr,
    identity: &Identity,
    allowed: AllowedPeers,
) -> Result<quinn::Endpoint, TlsError> {
    let config = server_config(identity, allowed)?;
    udp_socket(addr)
        .and_then(|s| endpoint_on(s, Some(config)))
        .map_err(|source| TlsError::Bind { addr, source })
}

/// Connects to `peer`, accepting only its pinned fingerprint.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    peer: &Peer,
) -> Result<quinn::Connection, TlsError> {
    let config = client_config(identity, &peer.fingerprint)?;
    let connecting = endpoint
        .connect_with(config, peer.address, SERVER_NAME)
        .map_err(|source| TlsError::Connect {
            peer: peer.name.clone(),
            addr: peer.address,
            source,
        })?;
    connecting.await.map_err(|source| TlsError::Handshake {
        peer: peer.name.clone(),
        addr: peer.address,
        source,
    })
}

/// Waits for the next incoming connection's handshake (`None` when the endpoint is closed).
pub async fn accept(endpoint: &quinn::Endpoint) -> Option<Result<quinn::Connection, TlsError>> {
    let incoming = endpoint.accept().await?;
    Some(incoming.await.map_err(|source| TlsError::Accept { source }))
}

/// The fingerprint of the certificate the peer presented on `conn`.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| fingerprint(c))
}

/// The ALPN protocol negotiated on `conn` ([`ALPN`] or [`API_ALPN`]).
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_listening_address_held_for_a_moment_is_waited_for() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let socket = super::udp_socket(addr).expect("bound once the address was free");
        assert_eq!(socket.local_addr().unwrap(), addr);
        release.join().unwrap();
    }
    use rustls::CipherSuite;

    #[test]
    fn aes128_gcm_is_offered_first_and_ring_order_stays_available() {
        let ours: Vec<CipherSuite> = super::provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let ring = super::provider_ordered(false);
        assert_eq!(
            ring.cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        assert_eq!(ours.len(), ring.cipher_suites.len());
    }
}
