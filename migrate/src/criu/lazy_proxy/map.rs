//! The lazy ranges the proxy prefetches: read from the placed `pagemap-<pid>.img` images, kept
//! as sets of disjoint address ranges per process.

use super::{LazyProxyError, MAX_PAGEMAP_BYTES, PAGEMAP_MAGIC, PAGE_SIZE, PE_LAZY};
use crate::criu::protobuf::{entries, Fields, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The lazy ranges of every process, by image id (`dst_id`): start address -> end address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyMap(pub(super) BTreeMap<u64, BTreeMap<u64, u64>>);

impl LazyMap {
    /// Adds `nr_pages` lazy pages at `vaddr` of `dst_id` (merging with adjacent ranges).
    /// `None` if the range is not page-aligned or runs past the address space.
    pub fn add(&mut self, dst_id: u64, vaddr: u64, nr_pages: u64) -> Option<()> {
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        if nr_pages == 0 {
            return Some(());
        }
        let end = nr_pages.checked_mul(PAGE_SIZE)?.checked_add(vaddr)?;
        insert_merged(self.0.entry(dst_id).or_default(), vaddr, end);
        Some(())
    }

    /// Lazy bytes over every process.
    pub fn bytes(&self) -> u64 {
        self.0
            .values()
            .flat_map(|m| m.iter().map(|(s, e)| e - s))
            .sum()
    }

    /// Processes with lazy pages.
    pub fn processes(&self) -> usize {
        self.0.len()
    }
}

/// Inserts `[start, end)` into a set of disjoint ranges, merging with the ranges it touches.
pub(super) fn insert_merged(m: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = m.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            m.remove(&s);
        }
    }
    while let Some((&s, &e)) = m.range(start..=end).next() {
        end = end.max(e);
        m.remove(&s);
    }
    m.insert(start, end);
}

/// The range of `m` holding `addr`.
pub(super) fn holding(m: &BTreeMap<u64, u64>, addr: u64) -> Option<(u64, u64)> {
    let (&s, &e) = m.range(..=addr).next_back()?;
    (addr < e).then_some((s, e))
}

/// Removes `[start, end)`, which lies inside one range of `m`.
pub(super) fn carve(m: &mut BTreeMap<u64, u64>, start: u64, end: u64) {
    if let Some((s, e)) = holding(m, start) {
        m.remove(&s);
        if s < start {
            m.insert(s, start);
        }
        if end < e {
            m.insert(end, e);
        }
    }
}

/// Reads the lazy ranges of every `pagemap-<id>.img` in `dir` (shared memory's
/// `pagemap-shmem-*` images are not served lazily by CRIU and are skipped).
pub fn read_lazy_map(dir: &Path) -> Result<LazyMap, LazyProxyError> {
    let mut map = LazyMap::default();
    each_pagemap(dir, false, |id, path, data| {
        add_entries(&mut map, id, data, true).map_err(|reason| LazyProxyError::BadImage {
            path: path.to_owned(),
            reason,
        })
    })?;
    Ok(map)
}

/// The bytes of memory an image set's processes hold once restored: every page its pagemap
/// images list, shared memory's included, whether the pages are in the set, in a parent's, or
/// still on the source (post-copy). Pages that forked processes share copy-on-write are listed
/// once per process, so this is an upper bound: CRIU restores them shared.
pub fn pagemap_bytes(dir: &Path) -> Result<u64, LazyProxyError> {
    let mut pages = 0u64;
    each_pagemap(dir, true, |_, path, data| {
        let bad = |reason| LazyProxyError::BadImage {
            path: path.to_owned(),
            reason,
        };
        let list = entries(data, PAGEMAP_MAGIC).map_err(bad)?;
        for entry in list.iter().skip(1) {
            let (mut compat, mut nr_pages) = (0, None);
            for field in Fields::new(entry, 0) {
                match field.map_err(bad)? {
                    (2, Value::Varint(v)) => compat = v,
                    (5, Value::Varint(v)) => nr_pages = Some(v),
                    _ => {}
                }
            }
            pages = pages.saturating_add(nr_pages.unwrap_or(compat));
        }
        Ok(())
    })?;
    Ok(pages.saturating_mul(PAGE_SIZE))
}

/// The bytes of memory that forked processes of an image set may share copy-on-write: for each
/// process, the addresses where both it and its parent have pages in their pagemaps (a `fork`
/// copies the address space; CRIU dumps the shared pages once per process). A plain restore
/// gives such pages back shared when their contents are equal; pages that arrive through a
/// lazy-pages daemon come one copy per process, multiplying the container's memory (QA of
/// session 22). 0 for a set without a `pstree.img` or with one process.
pub fn forked_overlap_bytes(dir: &Path) -> Result<u64, LazyProxyError> {
    let pstree = dir.join(crate::criu::pstree::PSTREE_IMG);
    let data = match std::fs::read(&pstree) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(LazyProxyError::ReadImage {
                path: pstree,
                source,
            })
        }
    };
    let parents =
        crate::criu::pstree::parse_parents(&data).map_err(|reason| LazyProxyError::BadImage {
            path: pstree.clone(),
            reason,
        })?;
    if parents.len() < 2 {
        return Ok(0);
    }
    let mut map = LazyMap::default();
    each_pagemap(dir, false, |id, path, data| {
        add_entries(&mut map, id, data, false).map_err(|reason| LazyProxyError::BadImage {
            path: path.to_owned(),
            reason,
        })
    })?;
    let ranges = |pid: i32| u64::try_from(pid).ok().and_then(|id| map.0.get(&id));
    let mut shared = 0u64;
    for (pid, ppid) in parents {
        if let (Some(child), Some(parent)) = (ranges(pid), ranges(ppid)) {
            shared = shared.saturating_add(overlap(child, parent));
        }
    }
    Ok(shared)
}

/// The bytes two sets of disjoint ranges have in common.
fn overlap(a: &BTreeMap<u64, u64>, b: &BTreeMap<u64, u64>) -> u64 {
    let (mut ia, mut ib) = (a.iter().peekable(), b.iter().peekable());
    let mut total = 0;
    while let (Some(&(&sa, &ea)), Some(&(&sb, &eb))) = (ia.peek(), ib.peek()) {
        let (s, e) = (sa.max(sb), ea.min(eb));
        if s < e {
            total += e - s;
        }
        if ea <= eb {
            ia.next();
        } else {
            ib.next();
        }
    }
    total
}

/// Calls `f` with the image id and the contents of each `pagemap-<id>.img` in `dir`, and with
/// `shmem` also of each `pagemap-shmem-<id>.img`.
fn each_pagemap(
    dir: &Path,
    shmem: bool,
    mut f: impl FnMut(u64, &Path, &[u8]) -> Result<(), LazyProxyError>,
) -> Result<(), LazyProxyError> {
    let list = std::fs::read_dir(dir).map_err(|source| LazyProxyError::ListImages {
        path: dir.to_owned(),
        source,
    })?;
    for entry in list {
        let entry = entry.map_err(|source| LazyProxyError::ListImages {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pagemap-")?.strip_suffix(".img"))
            .map(|id| match id.strip_prefix("shmem-") {
                Some(shm) if shmem => shm,
                _ => id,
            })
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let read = |source| LazyProxyError::ReadImage {
            path: path.clone(),
            source,
        };
        let len = entry.metadata().map_err(read)?.len();
        if len > MAX_PAGEMAP_BYTES {
            return Err(LazyProxyError::ImageTooLarge { path });
        }
        let data = std::fs::read(&path).map_err(read)?;
        f(id, &path, &data)?;
    }
    Ok(())
}

/// Adds the entries of one pagemap image (`PagemapHead`, then `PagemapEntry { vaddr = 1,
/// compat_nr_pages = 2, in_parent = 3, flags = 4, nr_pages = 5 }`, images/pagemap.proto) to
/// `map` under `dst_id`: the `PE_LAZY` ones only when `only_lazy`.
fn add_entries(
    map: &mut LazyMap,
    dst_id: u64,
    data: &[u8],
    only_lazy: bool,
) -> Result<(), &'static str> {
    let list = entries(data, PAGEMAP_MAGIC)?;
    if list.is_empty() {
        return Err("no pagemap head");
    }
    for entry in &list[1..] {
        let (mut vaddr, mut compat, mut flags, mut nr_pages) = (None, 0, 0, None);
        for field in Fields::new(entry, 0) {
            match field? {
                (1, Value::Varint(v)) => vaddr = Some(v),
                (2, Value::Varint(v)) => compat = v,
                (4, Value::Varint(v)) => flags = v,
                (5, Value::Varint(v)) => nr_pages = Some(v),
                _ => {}
            }
        }
        let vaddr = vaddr.ok_or("entry without an address")?;
        if !only_lazy || flags & u64::from(PE_LAZY) != 0 {
            map.add(dst_id, vaddr, nr_pages.unwrap_or(compat))
                .ok_or("entry not page-aligned or past the address space")?;
        }
    }
    Ok(())
}
