//! mig-migrate: checkpoint and restore with CRIU ([`criu`]), image sets with a verified manifest
//! ([`imageset`]), the migration wire protocol ([`wire`], [`protocol`]) and the QUIC transport
//! ([`transport`]).

pub mod archive;
pub mod criu;
pub mod imageset;
pub mod memsync;
pub mod protocol;
pub mod transport;
pub mod wire;
