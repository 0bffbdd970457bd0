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
//! the pages after the change, in page cache that exists already.

use super::{create, PageWriterError, PAGE_SIZE};
use crate::memsync::images::Layout;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The placement state of one open pages image.
#[derive(Debug)]
pub(super) struct Placed {
    /// The presync file's layout (`None`: a new file, every page comes with its data).
    layout: Option<Layout>,
    /// Pages of the image so far; the file's position is `pos` pages.
    pos: u64,
    /// Presync pages overwritten while their address was still to come, by address.
    saved: HashMap<u64, Box<[u8]>>,
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
                saved: HashMap::new(),
            },
        ))
    }

    /// The state of an image written without a presync file.
    pub(super) fn plain() -> Placed {
        Placed {
            layout: None,
            pos: 0,
            saved: HashMap::new(),
        }
    }

    /// Before page `at` of the image is written with the page of `vaddr`: keeps the presync
    /// page there when the stream still has to reach its address.
    fn protect(
        &mut self,
        file: &File,
        path: &Path,
        at: u64,
        vaddr: u64,
    ) -> Result<(), PageWriterError> {
        let Some(there) = self.layout.as_ref().and_then(|l| l.vaddr_at(at)) else {
            return Ok(());
        };
        if there > vaddr && !self.saved.contains_key(&there) {
            let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
            file.read_exact_at(&mut page, at * PAGE_SIZE)
                .map_err(io_err(path))?;
            self.saved.insert(there, page);
        }
        Ok(())
    }

    /// `n` pages of data from `vaddr` are written next, at the file's position.
    pub(super) fn data(
        &mut self,
        file: &File,
        path: &Path,
        vaddr: u64,
        n: u64,
    ) -> Result<(), PageWriterError> {
        for k in 0..n {
            self.protect(file, path, self.pos + k, vaddr + k * PAGE_SIZE)?;
        }
        self.pos += n;
        Ok(())
    }

    /// `n` pages from `vaddr` are the presync's: left where they are when the layout has them
    /// here, else written from the saved copy or their place in the file. Fails for pages the
    /// presync did not send.
    pub(super) fn held(
        &mut self,
        file: &mut File,
        path: &Path,
        dst_id: u64,
        vaddr: u64,
        n: u64,
    ) -> Result<(), PageWriterError> {
        let missing = |vaddr| PageWriterError::NotCached { dst_id, vaddr };
        let Some(layout) = &self.layout else {
            return Err(missing(vaddr));
        };
        // Pages already in place: one seek over them.
        let in_place = (0..n)
            .take_while(|&k| layout.position_of(vaddr + k * PAGE_SIZE) == Some(self.pos + k))
            .count() as u64;
        if in_place > 0 {
            file.seek(SeekFrom::Current((in_place * PAGE_SIZE) as i64))
                .map_err(io_err(path))?;
            self.pos += in_place;
        }
        for k in in_place..n {
            let v = vaddr + k * PAGE_SIZE;
            let at = self.pos;
            let here = self.layout.as_ref().and_then(|l| l.position_of(v));
            if here == Some(at) {
                file.seek(SeekFrom::Current(PAGE_SIZE as i64))
                    .map_err(io_err(path))?;
                self.pos += 1;
                continue;
            }
            self.protect(file, path, at, v)?;
            let page = match self.saved.remove(&v) {
                Some(p) => p,
                // Places past `at` are not overwritten yet; one before it was kept if needed.
                None => {
                    let from = here.filter(|&p| p > at).ok_or_else(|| missing(v))?;
                    let mut p = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
                    file.read_exact_at(&mut p, from * PAGE_SIZE)
                        .map_err(io_err(path))?;
                    p
                }
            };
            file.write_all(&page).map_err(io_err(path))?;
            self.pos += 1;
        }
        Ok(())
    }

    /// The image is complete: it loses the presync's pages past the dump's.
    pub(super) fn close(self, file: &File, path: &Path) -> Result<(), PageWriterError> {
        if self.layout.is_some() {
            file.set_len(self.pos * PAGE_SIZE).map_err(io_err(path))?;
        }
        Ok(())
    }
}
