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

use super::{create, PageWriterError, PAGE_SIZE};
use crate::memsync::images::Layout;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
            let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
            file.read_exact_at(&mut page, at * PAGE_SIZE)
                .map_err(io_err(path))?;
            self.saved.insert(there, page);
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
        for k in 0..n {
            self.protect(file, path, self.pos + k, vaddr + k * PAGE_SIZE)?;
        }
        self.pos += n;
        Ok(())
    }

    /// `n` pages from `vaddr` are the presync's: left where they are when the layout has them
    /// here, else written from the saved copy or their place in the presync file. Fails for
    /// pages the presync did not send.
    pub(super) fn held(
        &mut self,
        file: &mut File,
        path: &Path,
        dst_id: u64,
        vaddr: u64,
        n: u64,
    ) -> Result<(), PageWriterError> {
        let missing = |vaddr| PageWriterError::NotCached { dst_id, vaddr };
        if self.layout.is_none() {
            return Err(missing(vaddr));
        }
        self.passed(vaddr);
        let mut k = 0;
        while k < n {
            let v = vaddr + k * PAGE_SIZE;
            let at = self.pos;
            let here = self.layout.as_ref().and_then(|l| l.position_of(v));
            if self.copy.is_none() {
                if here == Some(at) {
                    // These and the following pages in place: one seek over them.
                    let run = self.layout.as_ref().map_or(1, |l| {
                        (k..n)
                            .take_while(|&j| {
                                l.position_of(vaddr + j * PAGE_SIZE) == Some(at + (j - k))
                            })
                            .count() as u64
                    });
                    file.seek(SeekFrom::Current((run * PAGE_SIZE) as i64))
                        .map_err(io_err(path))?;
                    self.pos += run;
                    k += run;
                    continue;
                }
                self.protect(file, path, at, v)?;
            }
            let page = match self.saved.remove(&v) {
                Some(p) => p,
                None => {
                    // Places past `at` are not overwritten yet (in a copy: from `from` on); one
                    // before it was kept if it was needed.
                    let (src, first) = match &self.copy {
                        Some(c) => (&c.old, c.from),
                        None => (&*file, at + 1),
                    };
                    let from = here.filter(|&p| p >= first).ok_or_else(|| missing(v))?;
                    let mut p = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
                    src.read_exact_at(&mut p, from * PAGE_SIZE)
                        .map_err(io_err(path))?;
                    p
                }
            };
            file.write_all(&page).map_err(io_err(path))?;
            self.pos += 1;
            k += 1;
        }
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
