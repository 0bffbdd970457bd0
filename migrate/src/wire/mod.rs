//! The migration wire format: versioned, bounded frames carrying postcard-encoded messages.
//!
//! A frame is a `u32` little-endian payload length followed by that many bytes of
//! [postcard](https://docs.rs/postcard) (a documented, stable serde format; bincode is unmaintained,
//! RUSTSEC-2025-0141). The length is checked against a maximum before anything is allocated, and
//! a payload must be consumed exactly (no trailing bytes). The first frame each way on a control
//! stream is a [`Hello`]; a peer with another major [`PROTOCOL_VERSION`] is refused by
//! [`Hello::decode`]. See `docs/protocol.md`.

mod frame;
mod message;

pub use frame::{decode_frame, encode_frame, read_frame, write_frame};
pub use message::{
    decode_message, AbortReason, DestView, DigestAt, FileHeader, FileKind, Hello, Message,
    MigrationMode, Phase, Prepare, RefuseReason, Resolution, SourceView, DIGEST_FOLLOWS, MAGIC,
    PROTOCOL_VERSION, TRAILER_LEN,
};

/// Maximum size of a control frame payload (messages on the control stream, file headers).
pub const MAX_CONTROL_FRAME: u32 = 1 << 20;

/// Maximum length of a relative file path in a [`FileHeader`].
pub const MAX_PATH_LEN: usize = 4096;

/// A protocol version: peers with different `major` refuse each other; `minor` only adds message
/// variants at the end of enums or new optional behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why a frame or a hello could not be read, written or accepted.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The announced payload length is above the limit (nothing was allocated).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: u32 },
    /// The payload is not a valid encoding of the expected type.
    #[error("cannot decode {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// The payload decoded but bytes were left over.
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    /// A value could not be encoded.
    #[error("cannot encode {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// Reading from the stream failed.
    #[error("cannot read frame")]
    Read {
        #[source]
        source: std::io::Error,
    },
    /// Writing to the stream failed.
    #[error("cannot write frame")]
    Write {
        #[source]
        source: std::io::Error,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// The peer's hello does not start with the mig magic.
    #[error("peer is not a mig agent (bad magic {found:02x?})")]
    BadMagic { found: [u8; 4] },
    /// The peer speaks another major protocol version.
    #[error("protocol version mismatch: we speak {ours}, peer {peer:?} speaks {theirs}")]
    VersionMismatch {
        ours: Version,
        theirs: Version,
        peer: String,
    },
    /// A file header whose digest follows the bytes (1.1) also carries one in the header.
    #[error("file header announces a trailing digest but carries one too")]
    BadTrailerHeader,
    /// A file header carries an unsafe or oversized path.
    #[error("invalid file path {path:?} in header: {why}")]
    BadPath { path: String, why: &'static str },
}
