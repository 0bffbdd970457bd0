//! Memory presync: a stream-mode move copies the container's memory to the destination while
//! the container still runs, and then, frozen, sends only the pages that changed since.
//!
//! It needs no dirty-page tracking from the kernel (this machine has no soft-dirty bits, so
//! CRIU's pre-dumps are refused here): what changed is decided by content. The source reads
//! each process's anonymous pages (`/proc/PID/pagemap`: present and not file-backed) through
//! `process_vm_readv` when the process maps them alone, else `/proc/PID/mem` ([`reader`]:
//! `process_vm_readv`'s pins unshare copy-on-write pages), sends them ([`stream::send`]) and
//! keeps a 128-bit XXH3
//! digest of every page it sent ([`SentIndex`]); the destination writes the pages into one file
//! per process in its images directory ([`images`], at most the bound it announced), laid out
//! as that process's pages image will be. While frozen, `criu dump` streams every page as
//! before, but the source's agent reads CRIU's page-server protocol ([`dedup::encode`]) and
//! replaces each page whose digest is the one it sent with a marker; the destination's page
//! writer turns each presync file into the pages image and writes only the pages that came
//! with data (`criu::page_writer::PageWriter::with_presync`). A page is reused only when its bytes at the
//! freeze hash to the digest of the very bytes the destination holds, so a page the process
//! changed (or a process that came, went or remapped) only costs its data on the wire.
//!
//! # The presync stream (tunnel service `MemoryPresync`, protocol 1.4)
//!
//! A bidirectional QUIC stream of the migration connection, after its `TunnelHeader` frame.
//! Numbers are little-endian.
//!
//! 1. destination → source: `u64` the most page bytes it will hold (0: none).
//! 2. source → destination, repeated: a run header of [`RUN_HEADER`] bytes, `dst_id: u64` (as
//!    in CRIU's page server protocol: image id << 8 | 1 for `pagemap-ID.img`), `vaddr: u64`
//!    (page aligned), `nr_pages: u32` (1 to [`MAX_RUN_PAGES`]), `reserved: u32` (0), then
//!    `nr_pages` × 4096 bytes of page data. The source ends with the stream's FIN.
//!    The runs of one `dst_id` come together, in rising address order, without overlap; at
//!    most 16384 `dst_id`s, each of type 1 (a process's pagemap).
//! 3. destination → source: `u64` pages held, `u64` status (0). The source uses its digests
//!    only when the count is the one it sent; anything else leaves the dump as it was.
//!
//! A destination that fails resets the stream (and stops reading it) with a code saying why:
//! 3 it could not write the pages (a full disk), 4 the stream broke a rule above, 2 anything
//! else.
//!
//! # The deduplicated page stream (tunnel service `PageServerDedup`, protocol 1.4)
//!
//! CRIU's page server protocol (`criu::page_writer`) unchanged, except the page data after an
//! add whose flags say present: it is a sequence of segments, each a `u32` word, bit 31 set:
//! `n` (the low 31 bits, at least 1) pages the destination holds from the presync, at the next
//! `n` page addresses of the add (no data follows); bit 31 clear: `n` pages of data follow. The
//! segments of an add cover exactly its `nr_pages`.
//!
//! Every count and address is checked before use; a stream that breaks a rule ends in an error
//! (the move rolls back, the container runs on at the source).

pub mod cache;
pub mod dedup;
pub mod images;
pub mod reader;
pub mod stream;
mod sys;

pub use cache::SentIndex;
pub use images::PresyncImages;

use std::path::PathBuf;

/// Page size (x86-64).
pub const PAGE: usize = 4096;
/// Size of a run header of the presync stream.
pub const RUN_HEADER: usize = 24;
/// Most pages of one presync run (1 MiB).
pub const MAX_RUN_PAGES: u32 = 256;
/// Segment word: the pages are in the destination's cache.
pub const SEG_CACHED: u32 = 1 << 31;
/// CRIU's page server image type of a process's `pagemap-ID.img` (`PS_TYPE_PAGEMAP`).
pub const PS_TYPE_PAGEMAP: u64 = 1;

/// The page server `dst_id` of the process whose image id (in-namespace PID) is `id`.
pub fn dst_id(id: u32) -> u64 {
    (u64::from(id) << 8) | PS_TYPE_PAGEMAP
}

/// The digest of one page's bytes under a move's `seed` (random per move, so a container
/// cannot prepare pages that collide).
pub fn digest(seed: u64, page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(page, seed)
}

/// Why a memory presync (or the deduplicated page stream) failed.
#[derive(Debug, thiserror::Error)]
pub enum MemsyncError {
    #[error("cannot read {path}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the presync stream")]
    Open(#[source] quinn::ConnectionError),
    #[error("cannot send the presync stream's header")]
    Header(#[source] crate::wire::WireError),
    #[error("the presync stream failed")]
    Stream(#[source] std::io::Error),
    #[error("the peer ended the presync stream early")]
    Ended,
    #[error("the destination held {held} of the {sent} presync pages sent")]
    Held { held: u64, sent: u64 },
    #[error("the destination ended the presync: {0}; its log says more")]
    PeerFailed(&'static str),
    #[error("the destination reports presync status {0}")]
    Status(u64),
    #[error("presync run of {nr_pages} pages at {vaddr:#x} is invalid")]
    BadRun { vaddr: u64, nr_pages: u32 },
    #[error("presync runs name {dst_id:#x}, which is not a process's pagemap, comes again, or is one process too many")]
    BadImage { dst_id: u64 },
    #[error("presync run at {vaddr:#x} of {dst_id:#x} overlaps an earlier one")]
    Overlap { dst_id: u64, vaddr: u64 },
    #[error("the presync passes the {max} bytes the destination holds")]
    TooMuch { max: u64 },
    #[error("the presync reader failed")]
    Thread,
    #[error("cannot read the page stream from the dump")]
    DumpRead(#[source] std::io::Error),
    #[error("cannot answer the dump on its page stream")]
    DumpReply(#[source] std::io::Error),
    #[error("the dump's page stream ended inside a command or its pages")]
    DumpTruncated,
    #[error("the stream to the destination ended before the dump's pages")]
    StreamEnded,
}

#[cfg(test)]
mod tests;
