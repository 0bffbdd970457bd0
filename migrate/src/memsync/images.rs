//! What the destination keeps of a memory presync: each process's pages in a file of the
//! images directory, `presync-<dst_id>.pages`, in address order, laid out as the dump's
//! `pages-N.img` of that process will be when the same pages are present at the freeze.
//!
//! Writing fresh page cache is the slow part of a page stream on a virtual machine (a page
//! written for the first time is about 3x slower than one written again), so the presync does
//! it while the container runs; the page writer then renames the file to the dump's pages image
//! and writes only the pages that changed, in place (`criu::page_writer`, [`Layout`]).

use super::{MemsyncError, PAGE};
use mig_runtime::fsutil::write_all_vectored;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A run of the presync file: `pages` pages from `vaddr`, the first at page `first` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    vaddr: u64,
    pages: u64,
    first: u64,
}

/// The presync file of one process and where each page is in it.
#[derive(Debug)]
pub struct Layout {
    pub path: PathBuf,
    runs: Vec<Run>,
    pages: u64,
}

impl Layout {
    /// The address of the page at `pos` (in pages) of the file.
    pub fn vaddr_at(&self, pos: u64) -> Option<u64> {
        let i = self
            .runs
            .partition_point(|r| r.first <= pos)
            .checked_sub(1)?;
        let r = self.runs[i];
        (pos < r.first + r.pages).then(|| r.vaddr + (pos - r.first) * PAGE as u64)
    }

    /// The position (in pages) of the page at `vaddr` in the file.
    pub fn position_of(&self, vaddr: u64) -> Option<u64> {
        let i = self
            .runs
            .partition_point(|r| r.vaddr <= vaddr)
            .checked_sub(1)?;
        let r = self.runs[i];
        let k = (vaddr - r.vaddr) / PAGE as u64;
        (vaddr.is_multiple_of(PAGE as u64) && k < r.pages).then_some(r.first + k)
    }

    /// Pages in the file.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

/// The presync files of a migration, until the page writer takes them. Files no one took are
/// removed when the value is dropped.
#[derive(Debug, Default)]
pub struct PresyncImages {
    layouts: Mutex<BTreeMap<u64, Layout>>,
    bytes: u64,
}

impl PresyncImages {
    /// Takes the file of `dst_id` (once).
    pub fn take(&self, dst_id: u64) -> Option<Layout> {
        self.layouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&dst_id)
    }

    /// Removes the files no one took. Idempotent.
    pub fn remove_rest(&self) {
        let rest = std::mem::take(&mut *self.layouts.lock().unwrap_or_else(|p| p.into_inner()));
        for l in rest.values() {
            let _ = std::fs::remove_file(&l.path);
        }
    }

    /// Bytes of pages held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Pages held.
    pub fn pages(&self) -> u64 {
        self.bytes / PAGE as u64
    }
}

impl Drop for PresyncImages {
    fn drop(&mut self) {
        self.remove_rest();
    }
}

/// Most processes one presync may name.
pub const MAX_IMAGES: usize = 16_384;

/// The file name of the presync file of `dst_id`.
pub fn file_name(dst_id: u64) -> String {
    format!("presync-{dst_id:x}.pages")
}

/// Writes presync runs into files of a directory (a blocking writer, fed in order: the runs of
/// one process together, in rising address order).
#[derive(Debug)]
pub struct ImagesWriter {
    dir: PathBuf,
    /// The process being written, and its file.
    current: Option<(u64, File)>,
    layouts: BTreeMap<u64, Layout>,
    bytes: u64,
    max_bytes: u64,
}

impl ImagesWriter {
    /// A writer into `dir` (which must exist) of at most `max_bytes` of pages.
    pub fn new(dir: &Path, max_bytes: u64) -> ImagesWriter {
        ImagesWriter {
            dir: dir.to_owned(),
            current: None,
            layouts: BTreeMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Appends a run of `data` (whole pages) at `vaddr` of `dst_id` (a process's pagemap id);
    /// the runs of one `dst_id` must come together, in rising address order without overlap.
    pub fn add(&mut self, dst_id: u64, vaddr: u64, data: &[u8]) -> Result<(), MemsyncError> {
        self.add_parts(dst_id, vaddr, &[data])
    }

    /// [`ImagesWriter::add`] of a run whose data is the concatenation of `parts` (the chunks
    /// it arrived in), written with vectored writes.
    pub fn add_parts(
        &mut self,
        dst_id: u64,
        vaddr: u64,
        parts: &[impl AsRef<[u8]>],
    ) -> Result<(), MemsyncError> {
        if dst_id & 0xff != super::PS_TYPE_PAGEMAP {
            return Err(MemsyncError::BadImage { dst_id });
        }
        let size: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        let nr_pages = u32::try_from(size / PAGE).unwrap_or(u32::MAX);
        let len = super::cache::check_run(vaddr, nr_pages)?;
        if len != size as u64 {
            return Err(MemsyncError::BadRun { vaddr, nr_pages });
        }
        if self.bytes + len > self.max_bytes {
            return Err(MemsyncError::TooMuch {
                max: self.max_bytes,
            });
        }
        if self.current.as_ref().map(|(d, _)| *d) != Some(dst_id) {
            // A process named before, or one too many.
            if self.layouts.contains_key(&dst_id) || self.layouts.len() >= MAX_IMAGES {
                return Err(MemsyncError::BadImage { dst_id });
            }
            let path = self.dir.join(file_name(dst_id));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|source| MemsyncError::File {
                    path: path.clone(),
                    source,
                })?;
            let layout = Layout {
                path,
                runs: Vec::new(),
                pages: 0,
            };
            self.layouts.insert(dst_id, layout);
            // The previous process's file is complete: closed.
            self.current = Some((dst_id, file));
        }
        let (Some((_, file)), Some(layout)) =
            (self.current.as_mut(), self.layouts.get_mut(&dst_id))
        else {
            return Err(MemsyncError::BadImage { dst_id });
        };
        if let Some(last) = layout.runs.last() {
            if vaddr < last.vaddr + last.pages * PAGE as u64 {
                return Err(MemsyncError::Overlap { dst_id, vaddr });
            }
        }
        // However many chunks a peer split the run into: as few writes as the kernel takes.
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p.as_ref())).collect();
        write_all_vectored(file, &mut slices).map_err(|source| MemsyncError::File {
            path: layout.path.clone(),
            source,
        })?;
        let pages = u64::from(nr_pages);
        layout.runs.push(Run {
            vaddr,
            pages,
            first: layout.pages,
        });
        layout.pages += pages;
        self.bytes += len;
        Ok(())
    }

    /// The files written, for the page writer.
    pub fn finish(self) -> PresyncImages {
        PresyncImages {
            layouts: Mutex::new(self.layouts),
            bytes: self.bytes,
        }
    }

    /// Removes every file written (a failed presync).
    pub fn discard(self) {
        for l in self.layouts.values() {
            let _ = std::fs::remove_file(&l.path);
        }
    }
}
