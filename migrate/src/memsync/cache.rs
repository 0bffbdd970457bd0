//! What the source keeps of a memory presync: a digest of each page it sent ([`SentIndex`]),
//! keyed by the page server's `dst_id` and the page's address, in runs of consecutive pages.
//! (The destination keeps the pages themselves in files, `super::images`.)

use super::{MemsyncError, MAX_RUN_PAGES, PAGE};
use std::collections::BTreeMap;

/// Where the run of `len` bytes at `(dst_id, vaddr)` must not overlap its neighbours in `map`.
fn check_free<V>(
    map: &BTreeMap<(u64, u64), V>,
    dst_id: u64,
    vaddr: u64,
    len: u64,
    size_of: impl Fn(&V) -> u64,
) -> Result<(), MemsyncError> {
    let overlap = MemsyncError::Overlap { dst_id, vaddr };
    if let Some((&(d, start), v)) = map.range(..=(dst_id, vaddr)).next_back() {
        if d == dst_id && start + size_of(v) > vaddr {
            return Err(overlap);
        }
    }
    if let Some((&(d, start), _)) = map.range((dst_id, vaddr)..).next() {
        if d == dst_id && start < vaddr + len {
            return Err(overlap);
        }
    }
    Ok(())
}

/// Checks a run's address and size: page aligned, 1 to [`MAX_RUN_PAGES`] pages, within the
/// address space.
pub(super) fn check_run(vaddr: u64, nr_pages: u32) -> Result<u64, MemsyncError> {
    let len = u64::from(nr_pages) * PAGE as u64;
    let bad = MemsyncError::BadRun { vaddr, nr_pages };
    if nr_pages == 0 || nr_pages > MAX_RUN_PAGES || !vaddr.is_multiple_of(PAGE as u64) {
        return Err(bad);
    }
    vaddr.checked_add(len).ok_or(bad)?;
    Ok(len)
}

/// The digests of the pages a source sent in its presync, under its own random seed.
#[derive(Debug)]
pub struct SentIndex {
    runs: BTreeMap<(u64, u64), Vec<u128>>,
    pages: u64,
    seed: u64,
}

impl Default for SentIndex {
    fn default() -> SentIndex {
        use std::hash::BuildHasher;
        SentIndex {
            runs: BTreeMap::new(),
            pages: 0,
            // Random per process and per call (std's hasher keys).
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
        }
    }
}

impl SentIndex {
    /// The digest of `page` under this index's seed.
    pub fn hash(&self, page: &[u8]) -> u128 {
        super::digest(self.seed, page)
    }

    /// Records a sent run: one digest per page, from `vaddr` on.
    pub fn insert(&mut self, dst_id: u64, vaddr: u64, digests: Vec<u128>) {
        let n = digests.len() as u64;
        if n == 0 || vaddr.checked_add(n * PAGE as u64).is_none() {
            return;
        }
        // The reader never sends a page twice; a run that would overlap is not recorded (its
        // pages then travel with their data).
        if check_free(&self.runs, dst_id, vaddr, n * PAGE as u64, |d| {
            d.len() as u64 * PAGE as u64
        })
        .is_ok()
        {
            self.runs.insert((dst_id, vaddr), digests);
            self.pages += n;
        }
    }

    /// The digest sent for the page at `vaddr` of `dst_id`, if any.
    pub fn digest(&self, dst_id: u64, vaddr: u64) -> Option<u128> {
        let (&(d, start), digests) = self.runs.range(..=(dst_id, vaddr)).next_back()?;
        if d != dst_id || !vaddr.is_multiple_of(PAGE as u64) {
            return None;
        }
        digests
            .get(usize::try_from((vaddr - start) / PAGE as u64).ok()?)
            .copied()
    }

    /// Pages recorded.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}
