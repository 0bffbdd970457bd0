//! Where a deduplicated stream's pages go (`crate::memsync`): the presync file of the process
//! becomes its pages image. A page the destination holds that is where the presync's layout has
//! it is not written at all; a changed page is written in place.
//!
//! Pages that appeared or went since the presync shift the pages after them. Page `F` of the
//! image (the `F`th page the dump sends) is then written over the presync's page `F`, which the
//! stream may still need: the writer keeps a copy of it first when its address is still to come
//! (the stream names addresses in rising order). A held page is taken from that copy, or read
//! from its place in the file, which is not overwritten yet. Once the pages line up again,
//! nothing is written for held pages again. So a process that grew or shrank costs a rewrite of
//! the pages after the change, in page cache that exists already. Copies are dropped once the
//! stream passed their address; when more than `Limits::max_saved_pages` would be kept (many pages
//! appeared, say a new mapping below the others), the image continues in a new file instead:
//! what is placed so far is copied there, and held pages are read from the presync file, which
//! is no longer written.
//!
//! Shifted pages move by runs: up to `RUN_PAGES` held pages whose presync places follow each
//! other. One vectored read keeps the copies the run's places hold, one read takes the run's
//! pages that are still in the file, and one vectored write puts the run in place: a few
//! syscalls per MiB instead of a read and a write per page (a 1 GiB process shifted by one page
//! cost 262,000 of each, about 0.9 s of the freeze). A run keeps at most as many copies as
//! `saved` has room for, and with no room the pages go one by one, so the image continues in a
//! new file at the same page as it would page by page, and the image is the same.

use super::{create, PageWriterError, PAGE_SIZE};
use crate::memsync::images::Layout;
use mig_runtime::fsutil::write_all_vectored;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Most pages moved with one read and one write (1 MiB).
const RUN_PAGES: u64 = 256;

/// The placement state of one open pages image.
#[derive(Debug)]
pub(super) struct Placed {
    /// The presync file's layout (`None`: a new file, every page comes with its data).
    layout: Option<Layout>,
    /// Pages of the image so far; the file's position is `pos` pages.
    pos: u64,
    /// Presync pages overwritten while their address was still to come, by address.
    saved: BTreeMap<u64, Box<[u8]>>,
    /// Most pages `saved` holds.
    saved_max: usize,
    /// Past `saved_max`: the presync file, no longer written, and where it is intact from.
    copy: Option<Copy>,
    /// The pages of a run read from the file (kept to spare an allocation per run).
    scratch: Vec<u8>,
}

/// The presync file of an image that continues in a new file.
#[derive(Debug)]
struct Copy {
    old: File,
    old_path: PathBuf,
    /// Places of the presync file from here on were never overwritten.
    from: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PageWriterError + '_ {
    move |source| PageWriterError::Write {
        path: path.to_owned(),
        source,
    }
}

impl Placed {
    /// Opens the pages image at `path`: the presync file `layout` renamed there, or a new file.
    pub(super) fn open(
        layout: Option<Layout>,
        path: &Path,
        saved_max: usize,
    ) -> Result<(File, Placed), PageWriterError> {
        let Some(layout) = layout else {
            return Ok((create(path)?, Placed::plain()));
        };
        std::fs::rename(&layout.path, path).map_err(io_err(path))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| PageWriterError::Create {
                path: path.to_owned(),
                source,
            })?;
        Ok((
            file,
            Placed {
                layout: Some(layout),
                pos: 0,
                saved: BTreeMap::new(),
                saved_max,
                copy: None,
                scratch: Vec::new(),
            },
        ))
    }

    /// The state of an image written without a presync file.
    pub(super) fn plain() -> Placed {
        Placed {
            layout: None,
            pos: 0,
            saved: BTreeMap::new(),
            saved_max: 0,
            copy: None,
            scratch: Vec::new(),
        }
    }

    /// Before page `at` of the image is written with the page of `vaddr`: keeps the presync
    /// page there when the stream still has to reach its address (or, past `saved_max`,
    /// continues the image in a new file).
    fn protect(
        &mut self,
        file: &mut File,
        path: &Path,
        at: u64,
        vaddr: u64,
    ) -> Result<(), PageWriterError> {
        if self.copy.is_some() {
            return Ok(());
        }
        let Some(there) = self.layout.as_ref().and_then(|l| l.vaddr_at(at)) else {
            return Ok(());
        };
        if there > vaddr && !self.saved.contains_key(&there) {
            if self.saved.len() >= self.saved_max {
                return self.continue_in_new_file(file, path);
            }
            let mut page = new_page();
            file.read_exact_at(&mut page, at * PAGE_SIZE)
                .map_err(io_err(path))?;
            self.saved.insert(there, page);
        }
        Ok(())
    }

    /// Pages one run may keep copies of: the room left in `saved`, at most [`RUN_PAGES`].
    fn room(&self) -> u64 {
        (self.saved_max.saturating_sub(self.saved.len()) as u64).min(RUN_PAGES)
    }

    /// [`Placed::protect`] of the `r` places from `at`, written with the pages from `vaddr`,
    /// with one read per stretch of places to keep. `r` is within [`Placed::room`]: the copies
    /// always fit.
    fn protect_run(
        &mut self,
        file: &File,
        path: &Path,
        at: u64,
        vaddr: u64,
        r: u64,
    ) -> Result<(), PageWriterError> {
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        // (place, the address of its presync page) of the pages to keep.
        let keep: Vec<(u64, u64)> = (0..r)
            .filter_map(|j| {
                let there = layout.vaddr_at(at + j)?;
                (there > vaddr + j * PAGE_SIZE && !self.saved.contains_key(&there))
                    .then_some((at + j, there))
            })
            .collect();
        for stretch in keep.chunk_by(|a, b| b.0 == a.0 + 1) {
            let mut pages: Vec<Box<[u8]>> = stretch.iter().map(|_| new_page()).collect();
            read_pages_at(file, &mut pages, stretch[0].0).map_err(io_err(path))?;
            for (&(_, there), page) in stretch.iter().zip(pages) {
                self.saved.insert(there, page);
            }
        }
        Ok(())
    }

    /// Drops the copies of pages below `vaddr`: the stream passed them.
    fn passed(&mut self, vaddr: u64) {
        if self
            .saved
            .first_key_value()
            .is_some_and(|(&v, _)| v < vaddr)
        {
            self.saved = self.saved.split_off(&vaddr);
        }
    }

    /// Continues the image in a new file at `path` holding what is placed so far; the presync
    /// file is only read from now on.
    fn continue_in_new_file(
        &mut self,
        file: &mut File,
        path: &Path,
    ) -> Result<(), PageWriterError> {
        let old_path = path.with_extension("img.presync");
        std::fs::rename(path, &old_path).map_err(io_err(path))?;
        let mut new = create(path)?;
        let len = self.pos * PAGE_SIZE;
        copy_range(file, &new, len).map_err(io_err(path))?;
        new.seek(SeekFrom::Start(len)).map_err(io_err(path))?;
        let old = std::mem::replace(file, new);
        self.copy = Some(Copy {
            old,
            old_path,
            from: self.pos,
        });
        Ok(())
    }

    /// `n` pages of data from `vaddr` are written next, at the file's position.
    pub(super) fn data(
        &mut self,
        file: &mut File,
        path: &Path,
        vaddr: u64,
        n: u64,
    ) -> Result<(), PageWriterError> {
        self.passed(vaddr);
        let mut k = 0;
        // In a new file (or without a presync file) nothing is overwritten.
        while k < n && self.copy.is_none() && self.layout.is_some() {
            let (at, v) = (self.pos + k, vaddr + k * PAGE_SIZE);
            let r = (n - k).min(self.room());
            if r == 0 {
                // No room: page by page, which continues in a new file if a copy is needed.
                self.protect(file, path, at, v)?;
                k += 1;
            } else {
                self.protect_run(file, path, at, v, r)?;
                k += r;
            }
        }
        self.pos += n;
        Ok(())
    }

    /// `n` pages from `vaddr` are the presync's: left where they are when the layout has them
    /// here, else written from the saved copy or their place in the presync file, a run of
    /// pages at a time. Fails for pages the presync did not send.
    pub(super) fn held(
        &mut self,
        file: &mut File,
        path: &Path,
        dst_id: u64,
        vaddr: u64,
        n: u64,
    ) -> Result<(), PageWriterError> {
        if self.layout.is_none() {
            return Err(PageWriterError::NotCached { dst_id, vaddr });
        }
        self.passed(vaddr);
        let mut k = 0;
        while k < n {
            let v = vaddr + k * PAGE_SIZE;
            let here = self.layout.as_ref().and_then(|l| l.position_of(v));
            let room = match (&self.copy, here) {
                (None, Some(h)) if h == self.pos => {
                    // These and the following pages in place: one seek over them.
                    let r = self.run(v, h, n - k);
                    file.seek(SeekFrom::Current((r * PAGE_SIZE) as i64))
                        .map_err(io_err(path))?;
                    self.pos += r;
                    k += r;
                    continue;
                }
                (None, _) => self.room(),
                (Some(_), _) => RUN_PAGES,
            };
            match here {
                Some(h) if room > 0 => {
                    let r = self.run(v, h, (n - k).min(room));
                    self.move_run(file, path, dst_id, v, h, r)?;
                    k += r;
                }
                // No room for the run's copies (or a page the presync lacks): one page.
                _ => {
                    self.move_page(file, path, dst_id, v, here)?;
                    k += 1;
                }
            }
        }
        Ok(())
    }

    /// How many of the (at most `limit`) pages from `vaddr` have the presync places that
    /// follow `here`, the place of the first.
    fn run(&self, vaddr: u64, here: u64, limit: u64) -> u64 {
        let Some(layout) = &self.layout else {
            return 0;
        };
        (0..limit)
            .take_while(|&j| layout.position_of(vaddr + j * PAGE_SIZE) == Some(here + j))
            .count() as u64
    }

    /// Writes the `r` held pages from `vaddr`, whose presync places are those from `here`, at
    /// the image's places from `self.pos`, none of them in place: one read keeps the copies the
    /// run overwrites, one reads the pages still in the file, one write puts them all.
    fn move_run(
        &mut self,
        file: &mut File,
        path: &Path,
        dst_id: u64,
        vaddr: u64,
        here: u64,
        r: u64,
    ) -> Result<(), PageWriterError> {
        let at = self.pos;
        if self.copy.is_none() {
            self.protect_run(file, path, at, vaddr, r)?;
        }
        // Each page from its copy, or else from its place in the file (`None` here), which
        // must be intact: past the page's place in the image, or in a copy from `from` on.
        let mut pages: Vec<Option<Box<[u8]>>> = Vec::with_capacity(r as usize);
        let mut in_file: Option<(u64, u64)> = None;
        for j in 0..r {
            let v = vaddr + j * PAGE_SIZE;
            if let Some(p) = self.saved.remove(&v) {
                pages.push(Some(p));
                continue;
            }
            let first = self.copy.as_ref().map_or(at + j + 1, |c| c.from);
            if here + j < first {
                return Err(PageWriterError::NotCached { dst_id, vaddr: v });
            }
            in_file = Some((in_file.map_or(j, |(lo, _)| lo), j));
            pages.push(None);
        }
        // Pages between the first and the last read from the file are intact too (the rule
        // above holds for all pages after one it holds for).
        let lo = in_file.map_or(0, |(lo, _)| lo);
        if let Some((lo, hi)) = in_file {
            let src = self.copy.as_ref().map_or(&*file, |c| &c.old);
            self.scratch.resize(((hi - lo + 1) * PAGE_SIZE) as usize, 0);
            src.read_exact_at(&mut self.scratch, (here + lo) * PAGE_SIZE)
                .map_err(io_err(path))?;
        }
        let page = PAGE_SIZE as usize;
        let mut slices: Vec<IoSlice<'_>> = pages
            .iter()
            .enumerate()
            .map(|(j, p)| match p {
                Some(p) => IoSlice::new(p),
                None => {
                    let off = (j - lo as usize) * page;
                    IoSlice::new(&self.scratch[off..off + page])
                }
            })
            .collect();
        write_all_vectored(file, &mut slices).map_err(io_err(path))?;
        self.pos += r;
        Ok(())
    }

    /// Writes the held page of `vaddr`, at presync place `here`, at the image's place
    /// `self.pos`, not its own: page by page, keeping the page there first.
    fn move_page(
        &mut self,
        file: &mut File,
        path: &Path,
        dst_id: u64,
        vaddr: u64,
        here: Option<u64>,
    ) -> Result<(), PageWriterError> {
        let at = self.pos;
        if self.copy.is_none() {
            self.protect(file, path, at, vaddr)?;
        }
        let page = match self.saved.remove(&vaddr) {
            Some(p) => p,
            None => {
                // Places past `at` are not overwritten yet (in a copy: from `from` on); one
                // before it was kept if it was needed.
                let (src, first) = match &self.copy {
                    Some(c) => (&c.old, c.from),
                    None => (&*file, at + 1),
                };
                let from = here
                    .filter(|&p| p >= first)
                    .ok_or(PageWriterError::NotCached { dst_id, vaddr })?;
                let mut p = new_page();
                src.read_exact_at(&mut p, from * PAGE_SIZE)
                    .map_err(io_err(path))?;
                p
            }
        };
        file.write_all(&page).map_err(io_err(path))?;
        self.pos += 1;
        Ok(())
    }

    /// The image is complete: it loses the presync's pages past the dump's (or, continued in
    /// a new file, the presync file).
    pub(super) fn close(self, file: &File, path: &Path) -> Result<(), PageWriterError> {
        if let Some(c) = self.copy {
            let _ = std::fs::remove_file(c.old_path);
        } else if self.layout.is_some() {
            file.set_len(self.pos * PAGE_SIZE).map_err(io_err(path))?;
        }
        Ok(())
    }
}

/// A page of zeros, to read into.
fn new_page() -> Box<[u8]> {
    vec![0u8; PAGE_SIZE as usize].into_boxed_slice()
}

/// Fills `pages` from the pages of `file` from place `pos` on, with one read (or more if the
/// kernel returns less).
fn read_pages_at(file: &File, pages: &mut [Box<[u8]>], pos: u64) -> std::io::Result<()> {
    let mut bufs: Vec<IoSliceMut<'_>> = pages.iter_mut().map(|p| IoSliceMut::new(p)).collect();
    let mut rest = &mut bufs[..];
    let mut offset = pos * PAGE_SIZE;
    while !rest.is_empty() {
        let off = i64::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        match nix::sys::uio::preadv(file, rest, off) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                IoSliceMut::advance_slices(&mut rest, n);
                offset += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Copies the first `len` bytes of `from` to the start of `to` in the kernel.
fn copy_range(from: &File, to: &File, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let (mut off_in, mut off_out) = (done as i64, done as i64);
        let n = nix::fcntl::copy_file_range(
            from,
            Some(&mut off_in),
            to,
            Some(&mut off_out),
            (len - done) as usize,
        )?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
