//! QUIC transport with mutual TLS and pinned peers (work in progress).
