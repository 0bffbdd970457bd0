//! The receiving end of CRIU's page server protocol, written by mig itself: what
//! `criu page-server` does for a `criu dump --page-server`, without the process and the socket
//! hop in between (the destination's agent writes the images straight from the migration's QUIC
//! stream, `transport::tunnel::Endpoint::Pages`).
//!
//! The protocol (criu/page-xfer.c, CRIU 4.x): the dump sends commands of 32 bytes, the fields
//! in the host's byte order (little-endian here) with C's padding after the first:
//!
//! | offset | size | field                                                          |
//! |--------|------|----------------------------------------------------------------|
//! | 0      | 4    | `cmd`: command in the low 16 bits, pagemap flags in the high 16 |
//! | 8      | 8    | `nr_pages`                                                     |
//! | 16     | 8    | `vaddr`                                                        |
//! | 24     | 8    | `dst_id`: image id << 8, image type in the low 8 bits            |
//!
//! - `OPEN` (3) / `OPEN2` (4): start the pagemap image of `dst_id` (type 1: `pagemap-ID.img` of
//!   a process, type 2: `pagemap-shmem-ID.img` of shared memory; older CRIUs' type numbers are
//!   read as CRIU reads them) and a new `pages-N.img`, N counting from 0x10001 as in
//!   `criu page-server`. `OPEN2` is answered with one byte: 1 if a parent image exists (never
//!   here: no incremental dumps).
//! - `ADD_F` (6, flags in the high bits), `ADD` (1, "present") and `HOLE` (2, "in parent"): one
//!   pagemap entry; when the flags say present, `nr_pages` pages of data follow the command.
//! - `PARENT` (5): answered with a 4-byte 0 (no parent images).
//! - `CLOSE` (0x1023) / `FORCE_CLOSE` (0x1024, what a dump on `--ps-socket` sends): the end,
//!   answered with a 4-byte status 0 once everything is written.
//! - `GET` (7) asks a dump-side server for pages (post-copy): refused here.
//!
//! Images written, byte for byte what `criu page-server` writes: `pagemap-*.img` = the common
//! image magic, the pagemap magic, a `PagemapHead { pages_id }` entry, then one
//! `PagemapEntry { vaddr, compat_nr_pages: 0, flags, nr_pages }` per add; `pages-N.img` = the
//! raw pages in order. Files are created 0644 (CRIU's `CR_FD_PERM`), truncating (as CRIU's
//! `O_DUMP`).
//!
//! [`PageWriter`] has no I/O of its own but the image files: it takes the stream's bytes in
//! chunks ([`PageWriter::feed`]), writes page data from the chunks with vectored writes (no
//! copy into a buffer first) and returns the replies to send. Every count and size from the
//! stream is checked against [`Limits`] before it is used; a hostile or corrupted stream ends
//! in a [`PageWriterError`], never a panic or an unbounded allocation. [`serve`] runs it on a
//! blocking socket (tests, tools); the agent runs it on a QUIC stream.

use super::protobuf::{put_entry, put_varint_field, IMG_COMMON_MAGIC};
use crate::memsync::{PresyncImages, SEG_CACHED};
use placed::Placed;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Size of one command of the protocol.
pub const PS_IOV_SIZE: usize = 32;
/// Page size of the images (x86-64).
pub const PAGE_SIZE: u64 = 4096;

pub(crate) const PS_IOV_ADD: u32 = 1;
const PS_IOV_HOLE: u32 = 2;
const PS_IOV_OPEN: u32 = 3;
const PS_IOV_OPEN2: u32 = 4;
const PS_IOV_PARENT: u32 = 5;
pub(crate) const PS_IOV_ADD_F: u32 = 6;
pub(super) const PS_IOV_GET: u32 = 7;
pub(super) const PS_IOV_CLOSE: u32 = 0x1023;
pub(super) const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
pub(crate) const PS_CMD_BITS: u32 = 16;
const PS_TYPE_BITS: u32 = 8;

/// Pagemap entry flags (criu/include/pagemap.h).
const PE_PARENT: u32 = 1 << 0;
pub(super) const PE_LAZY: u32 = 1 << 1;
pub(crate) const PE_PRESENT: u32 = 1 << 2;

/// Own magic of pagemap images (criu/include/magic.h).
pub(super) const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// First `pages-N.img` id of a page server (CRIU's `up_page_ids_base`: 1 + 0x10000).
pub const FIRST_PAGES_ID: u32 = 0x10001;
/// Most slices handed to one vectored write (the kernel's `IOV_MAX`).
const MAX_IOV: usize = 1024;

/// Bounds on what one stream may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Page data, in bytes, over the whole stream.
    pub max_bytes: u64,
    /// Pages of one add command (present or not).
    pub max_pages_per_add: u64,
    /// Pagemap entries over the whole stream.
    pub max_entries: u64,
    /// Pagemap images opened (each also opens a pages image).
    pub max_opens: u32,
    /// A deduplicated stream: presync pages kept in memory while an image's pages shift
    /// (`placed`); past it the image continues in a new file.
    pub max_saved_pages: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 1 << 40,
            max_pages_per_add: 1 << 28,
            max_entries: 1 << 24,
            // Two files each, within the image set's 65,536 files.
            max_opens: 16_384,
            // 64 MiB.
            max_saved_pages: 16_384,
        }
    }
}

/// What a finished stream wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Pagemap images opened.
    pub images: u32,
    /// Pagemap entries written.
    pub entries: u64,
    /// Page data written, in bytes.
    pub page_bytes: u64,
}

/// Why a page stream could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PageWriterError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown page server command {cmd:#x}")]
    UnknownCommand { cmd: u32 },
    #[error("unknown pagemap type in destination id {dst_id:#x}")]
    UnknownImageType { dst_id: u64 },
    #[error("the stream asks for pages (PS_IOV_GET): a receiving page writer serves none")]
    Get,
    #[error("unknown pagemap flags {flags:#x}")]
    Flags { flags: u32 },
    #[error("an add of {nr_pages} pages is more than {max}")]
    TooManyPages { nr_pages: u64, max: u64 },
    #[error("{nr_pages} pages at {vaddr:#x} run past the end of the address space")]
    AddressOverflow { vaddr: u64, nr_pages: u64 },
    #[error("the stream's pages pass {max} bytes")]
    TooManyBytes { max: u64 },
    #[error("the stream's pagemap entries pass {max}")]
    TooManyEntries { max: u64 },
    #[error("the stream opens more than {max} pagemap images")]
    TooManyOpens { max: u32 },
    #[error("the stream ended inside a command ({have} of {PS_IOV_SIZE} bytes)")]
    TruncatedCommand { have: usize },
    #[error("the stream ended {missing} bytes before the end of its pages")]
    TruncatedPages { missing: u64 },
    #[error("the stream ended without its close command (the data were not flushed)")]
    NotFlushed,
    #[error("{bytes} bytes arrived after the close command")]
    AfterClose { bytes: usize },
    #[error("cannot read the page stream")]
    Read(#[source] std::io::Error),
    #[error("cannot answer on the page stream")]
    Reply(#[source] std::io::Error),
    #[error("the page writer did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the page writer never ran (no page stream arrived)")]
    NeverRan,
    #[error("the page writer's thread failed")]
    Thread,
    #[error("invalid page segment {word:#x} ({left} pages of the add left)")]
    Segment { word: u32, left: u64 },
    #[error("the page at {vaddr:#x} of {dst_id:#x} is not one the presync sent")]
    NotCached { dst_id: u64, vaddr: u64 },
}

/// The images of the pagemap being written.
struct Open {
    dst_id: u64,
    pagemap: std::io::BufWriter<File>,
    pagemap_path: PathBuf,
    pages: File,
    pages_path: PathBuf,
    /// A deduplicated stream: how the pages image relates to the presync's file.
    placed: Placed,
}

/// A receiver of one dump's page stream, writing `pagemap-*.img` and `pages-*.img` into a
/// directory.
pub struct PageWriter {
    dir: PathBuf,
    limits: Limits,
    next_pages_id: u32,
    open: Option<Open>,
    /// The command being assembled.
    head: [u8; PS_IOV_SIZE],
    head_len: usize,
    /// Bytes of page data still to come for the last add.
    data_left: u64,
    /// A deduplicated stream (`crate::memsync`): the presync's files, and the state of the
    /// present add being read: its pages not yet covered by a segment, the address of the next
    /// one, the segment word being assembled.
    presync: Option<Arc<PresyncImages>>,
    pages_left: u64,
    at: u64,
    seg: [u8; 4],
    seg_len: usize,
    closed: bool,
    summary: Summary,
}

impl PageWriter {
    /// A writer into `dir` (which must exist).
    pub fn new(dir: &Path, limits: Limits) -> PageWriter {
        PageWriter {
            dir: dir.to_owned(),
            limits,
            next_pages_id: FIRST_PAGES_ID,
            open: None,
            head: [0; PS_IOV_SIZE],
            head_len: 0,
            data_left: 0,
            presync: None,
            pages_left: 0,
            at: 0,
            seg: [0; 4],
            seg_len: 0,
            closed: false,
            summary: Summary::default(),
        }
    }

    /// A writer of a deduplicated stream (`crate::memsync`): the data of present adds comes as
    /// segments; the pages a segment says the destination holds are those of `presync`, whose
    /// files become the pages images.
    pub fn with_presync(dir: &Path, limits: Limits, presync: Arc<PresyncImages>) -> PageWriter {
        PageWriter {
            presync: Some(presync),
            ..PageWriter::new(dir, limits)
        }
    }

    /// Whether the close command arrived (everything is written and answered).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Takes the next bytes of the stream, in order, in any chunking. Page data is written to
    /// its image from the chunks themselves; replies for the peer are appended to `reply` (send
    /// them before feeding more: the dump waits for them). Returns whether the stream closed.
    pub fn feed<B: AsRef<[u8]>>(
        &mut self,
        chunks: &[B],
        reply: &mut Vec<u8>,
    ) -> Result<bool, PageWriterError> {
        let mut pending: Vec<IoSlice<'_>> = Vec::new();
        for chunk in chunks {
            let mut b = chunk.as_ref();
            while !b.is_empty() {
                if self.closed {
                    return Err(PageWriterError::AfterClose { bytes: b.len() });
                }
                if self.data_left > 0 {
                    let n = usize::try_from(self.data_left)
                        .unwrap_or(usize::MAX)
                        .min(b.len());
                    pending.push(IoSlice::new(&b[..n]));
                    b = &b[n..];
                    self.data_left -= n as u64;
                    if pending.len() == MAX_IOV {
                        self.write_pages(&mut pending)?;
                    }
                    continue;
                }
                if self.pages_left > 0 {
                    let n = (4 - self.seg_len).min(b.len());
                    self.seg[self.seg_len..self.seg_len + n].copy_from_slice(&b[..n]);
                    self.seg_len += n;
                    b = &b[n..];
                    if self.seg_len == 4 {
                        self.seg_len = 0;
                        // Data before the segment lands first.
                        self.write_pages(&mut pending)?;
                        self.segment()?;
                    }
                    continue;
                }
                let n = (PS_IOV_SIZE - self.head_len).min(b.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&b[..n]);
                self.head_len += n;
                b = &b[n..];
                if self.head_len == PS_IOV_SIZE {
                    self.head_len = 0;
                    self.write_pages(&mut pending)?;
                    self.command(reply)?;
                }
            }
        }
        self.write_pages(&mut pending)?;
        Ok(self.closed)
    }

    /// The stream ended: what was written, or why the stream was incomplete.
    pub fn finish(self) -> Result<Summary, PageWriterError> {
        if let Some(p) = &self.presync {
            // Files of processes the dump did not name (they exited since).
            p.remove_rest();
        }
        if self.closed {
            return Ok(self.summary);
        }
        if self.head_len > 0 {
            return Err(PageWriterError::TruncatedCommand {
                have: self.head_len,
            });
        }
        if self.data_left > 0 || self.pages_left > 0 {
            return Err(PageWriterError::TruncatedPages {
                missing: self.data_left + self.pages_left * PAGE_SIZE,
            });
        }
        Err(PageWriterError::NotFlushed)
    }

    /// Acts on the segment word in `self.seg` (a deduplicated stream): held pages are placed
    /// now, data pages are read next.
    fn segment(&mut self) -> Result<(), PageWriterError> {
        let word = u32::from_le_bytes(self.seg);
        let n = u64::from(word & !SEG_CACHED);
        if n == 0 || n > self.pages_left {
            return Err(PageWriterError::Segment {
                word,
                left: self.pages_left,
            });
        }
        // A present add always opened an image first.
        let Some(open) = self.open.as_mut() else {
            return Err(PageWriterError::Segment {
                word,
                left: self.pages_left,
            });
        };
        if word & SEG_CACHED == 0 {
            open.placed
                .data(&mut open.pages, &open.pages_path, self.at, n)?;
            self.data_left = n * PAGE_SIZE;
        } else {
            open.placed
                .held(&mut open.pages, &open.pages_path, open.dst_id, self.at, n)?;
        }
        self.pages_left -= n;
        self.at += n * PAGE_SIZE;
        Ok(())
    }

    /// Writes the gathered page data to the open pages image.
    fn write_pages(&mut self, pending: &mut Vec<IoSlice<'_>>) -> Result<(), PageWriterError> {
        if pending.is_empty() {
            return Ok(());
        }
        // An add with data always opened an image first.
        let Some(open) = self.open.as_mut() else {
            pending.clear();
            return Ok(());
        };
        let mut rest = &mut pending[..];
        while !rest.is_empty() {
            match open.pages.write_vectored(rest) {
                Ok(0) => {
                    return Err(PageWriterError::Write {
                        path: open.pages_path.clone(),
                        source: std::io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(k) => IoSlice::advance_slices(&mut rest, k),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(PageWriterError::Write {
                        path: open.pages_path.clone(),
                        source,
                    })
                }
            }
        }
        pending.clear();
        Ok(())
    }

    /// Acts on the command in `self.head`.
    fn command(&mut self, reply: &mut Vec<u8>) -> Result<(), PageWriterError> {
        let h = &self.head;
        let word = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let raw = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let (nr_pages, vaddr, dst_id) = (word(8), word(16), word(24));
        let cmd = raw & ((1 << PS_CMD_BITS) - 1);
        match cmd {
            PS_IOV_OPEN => self.open(dst_id),
            PS_IOV_OPEN2 => {
                self.open(dst_id)?;
                // No parent images: the pages are all in this dump.
                reply.push(0);
                Ok(())
            }
            PS_IOV_PARENT => {
                image_name(dst_id)?;
                reply.extend_from_slice(&0i32.to_le_bytes());
                Ok(())
            }
            PS_IOV_ADD_F | PS_IOV_ADD | PS_IOV_HOLE => {
                let flags = match cmd {
                    PS_IOV_ADD_F => raw >> PS_CMD_BITS,
                    PS_IOV_ADD => PE_PRESENT,
                    _ => PE_PARENT,
                };
                self.add(dst_id, vaddr, nr_pages, flags)
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                self.close_images()?;
                self.closed = true;
                reply.extend_from_slice(&0i32.to_le_bytes());
                Ok(())
            }
            PS_IOV_GET => Err(PageWriterError::Get),
            _ => Err(PageWriterError::UnknownCommand { cmd: raw }),
        }
    }

    /// Starts the images of `dst_id` (closing the previous ones).
    fn open(&mut self, dst_id: u64) -> Result<(), PageWriterError> {
        let name = image_name(dst_id)?;
        self.close_images()?;
        if self.summary.images >= self.limits.max_opens {
            return Err(PageWriterError::TooManyOpens {
                max: self.limits.max_opens,
            });
        }
        let pages_id = self.next_pages_id;
        self.next_pages_id = pages_id
            .checked_add(1)
            .ok_or(PageWriterError::TooManyOpens {
                max: self.limits.max_opens,
            })?;
        let pagemap_path = self.dir.join(name);
        let pagemap = create(&pagemap_path)?;
        let mut head = Vec::with_capacity(16);
        head.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        head.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        let mut msg = Vec::with_capacity(8);
        put_varint_field(&mut msg, 1, u64::from(pages_id));
        // A few bytes: always fits.
        let _ = put_entry(&mut head, &msg);
        let mut pagemap = std::io::BufWriter::with_capacity(64 << 10, pagemap);
        pagemap
            .write_all(&head)
            .map_err(|source| PageWriterError::Write {
                path: pagemap_path.clone(),
                source,
            })?;
        let pages_path = self.dir.join(format!("pages-{pages_id}.img"));
        let (pages, placed) = match &self.presync {
            Some(p) => Placed::open(p.take(dst_id), &pages_path, self.limits.max_saved_pages)?,
            None => (create(&pages_path)?, Placed::plain()),
        };
        self.summary.images += 1;
        self.open = Some(Open {
            dst_id,
            pagemap,
            pagemap_path,
            pages,
            pages_path,
            placed,
        });
        Ok(())
    }

    /// One pagemap entry; page data follows when `flags` say present.
    fn add(
        &mut self,
        dst_id: u64,
        vaddr: u64,
        nr_pages: u64,
        flags: u32,
    ) -> Result<(), PageWriterError> {
        if flags & !(PE_PARENT | PE_LAZY | PE_PRESENT) != 0 {
            return Err(PageWriterError::Flags { flags });
        }
        if nr_pages > self.limits.max_pages_per_add {
            return Err(PageWriterError::TooManyPages {
                nr_pages,
                max: self.limits.max_pages_per_add,
            });
        }
        let len = nr_pages * PAGE_SIZE;
        if vaddr.checked_add(len).is_none() {
            return Err(PageWriterError::AddressOverflow { vaddr, nr_pages });
        }
        if self.summary.entries >= self.limits.max_entries {
            return Err(PageWriterError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        let data = if flags & PE_PRESENT != 0 { len } else { 0 };
        let total = self.summary.page_bytes.saturating_add(data);
        if total > self.limits.max_bytes {
            return Err(PageWriterError::TooManyBytes {
                max: self.limits.max_bytes,
            });
        }
        // CRIU's page server opens the images of an add that names others ("IO w/o open").
        if self.open.as_ref().map(|o| o.dst_id) != Some(dst_id) {
            self.open(dst_id)?;
        }
        let Some(open) = self.open.as_mut() else {
            return Err(PageWriterError::UnknownImageType { dst_id });
        };
        let mut msg = Vec::with_capacity(32);
        put_varint_field(&mut msg, 1, vaddr);
        put_varint_field(&mut msg, 2, 0);
        put_varint_field(&mut msg, 4, u64::from(flags));
        put_varint_field(&mut msg, 5, nr_pages);
        let mut entry = Vec::with_capacity(36);
        let _ = put_entry(&mut entry, &msg);
        open.pagemap
            .write_all(&entry)
            .map_err(|source| PageWriterError::Write {
                path: open.pagemap_path.clone(),
                source,
            })?;
        self.summary.entries += 1;
        self.summary.page_bytes = total;
        if self.presync.is_some() {
            // The data comes as segments (`segment`).
            self.pages_left = data / PAGE_SIZE;
            self.at = vaddr;
        } else {
            self.data_left = data;
        }
        Ok(())
    }

    /// Flushes and closes the open images, if any.
    fn close_images(&mut self) -> Result<(), PageWriterError> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        open.pagemap
            .flush()
            .map_err(|source| PageWriterError::Write {
                path: open.pagemap_path.clone(),
                source,
            })?;
        open.placed.close(&open.pages, &open.pages_path)
    }
}

/// The pagemap image's file name for `dst_id`, as CRIU's `decode_pm` reads it.
fn image_name(dst_id: u64) -> Result<String, PageWriterError> {
    let id = dst_id >> PS_TYPE_BITS;
    match dst_id & ((1 << PS_TYPE_BITS) - 1) {
        // 1: CRIU 3.3 and later; the rest: older CRIUs' numbers.
        1 | 10 | 11 | 16 | 17 => Ok(format!("pagemap-{id}.img")),
        2 | 27 | 28 | 29 | 32 | 33 | 34 => Ok(format!("pagemap-shmem-{id}.img")),
        _ => Err(PageWriterError::UnknownImageType { dst_id }),
    }
}

/// Creates an image file with CRIU's own mode for images (0644, `CR_FD_PERM`): the tasks of a
/// container restored in a user namespace open their page map themselves, as an unprivileged
/// uid of the host (with 0600 the restore failed: "Unable to open pagemap-1.img").
fn create(path: &Path) -> Result<File, PageWriterError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| PageWriterError::Create {
            path: path.to_owned(),
            source,
        })
}

/// Size of the read buffer of [`serve`].
const SERVE_BUF: usize = 1 << 20;

/// Runs a [`PageWriter`] into `dir` on a blocking connection (for example one end of the
/// socketpair whose other end a `criu dump --page-server --ps-socket` holds) until the close
/// command; returns without waiting for the peer to close, as `criu page-server --ps-socket`
/// does.
pub fn serve<S: Read + Write>(
    conn: &mut S,
    dir: &Path,
    limits: Limits,
) -> Result<Summary, PageWriterError> {
    let mut w = PageWriter::new(dir, limits);
    let mut buf = vec![0u8; SERVE_BUF];
    let mut reply = Vec::new();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return w.finish(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PageWriterError::Read(e)),
        };
        let closed = w.feed(&[&buf[..n]], &mut reply)?;
        if !reply.is_empty() {
            conn.write_all(&reply).map_err(PageWriterError::Reply)?;
            reply.clear();
        }
        if closed {
            return w.finish();
        }
    }
}

/// Where the agent's tunnel delivers a page stream: a writer into `dir`, whose outcome goes to
/// the [`PageWait`] made with it. Used for one stream.
#[derive(Debug)]
pub struct PageSink {
    pub dir: PathBuf,
    pub limits: Limits,
    /// A deduplicated stream's presync files (`crate::memsync`); `None` for CRIU's protocol.
    pub presync: Option<Arc<PresyncImages>>,
    done: std::sync::mpsc::SyncSender<Result<Summary, PageWriterError>>,
}

/// The outcome of a [`PageSink`]'s stream.
#[derive(Debug)]
pub struct PageWait(std::sync::mpsc::Receiver<Result<Summary, PageWriterError>>);

impl PageSink {
    /// A sink writing into `dir`, and the wait for its outcome.
    pub fn new(dir: &Path, limits: Limits) -> (PageSink, PageWait) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        (
            PageSink {
                dir: dir.to_owned(),
                limits,
                presync: None,
                done: tx,
            },
            PageWait(rx),
        )
    }

    /// The same sink for a deduplicated stream whose held pages are in `presync`'s files.
    pub fn deduplicated(self, presync: Arc<PresyncImages>) -> PageSink {
        PageSink {
            presync: Some(presync),
            ..self
        }
    }

    /// A writer for this sink's stream.
    pub fn writer(&self) -> PageWriter {
        match &self.presync {
            Some(p) => PageWriter::with_presync(&self.dir, self.limits, p.clone()),
            None => PageWriter::new(&self.dir, self.limits),
        }
    }

    /// Reports the stream's outcome (once the close is written and answered, or on failure).
    pub fn report(self, r: Result<Summary, PageWriterError>) {
        let _ = self.done.send(r);
    }
}

impl PageWait {
    /// Waits for the stream's outcome. Blocking.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Summary, PageWriterError> {
        match self.0.recv_timeout(timeout) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(PageWriterError::Timeout(timeout))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(PageWriterError::NeverRan),
        }
    }
}

mod placed;
#[cfg(test)]
mod tests;
