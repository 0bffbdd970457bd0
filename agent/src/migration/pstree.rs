//! The process tree CRIU dumped (`pstree.img`), read without CRIU's tools. A move reports as its
//! "before" PID map the processes CRIU really dumped: a read of `cgroup.procs` around the freeze
//! can miss a short-lived process that CRIU still found (and the destination restores).

use mig_runtime::pidmap::PidEntry;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The magic every CRIU image but the inventory starts with.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `pstree.img`'s own magic.
const PSTREE_MAGIC: u32 = 0x5027_3030;
/// The image file name.
pub(crate) const PSTREE_IMG: &str = "pstree.img";
/// A pstree image of a container is small; anything bigger is not one.
const MAX_IMAGE: u64 = 16 << 20;

/// Why the dumped process tree could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PstreeError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a pstree image ({detail})")]
    Format { path: PathBuf, detail: String },
}

/// In-namespace PIDs of the processes (thread-group leaders) in `<images>/pstree.img`.
pub(crate) fn dumped_pids(images: &Path) -> Result<BTreeSet<i32>, PstreeError> {
    use std::io::Read;
    let path = images.join(PSTREE_IMG);
    let read = |source| PstreeError::Read {
        path: path.clone(),
        source,
    };
    let mut data = Vec::new();
    std::fs::File::open(&path)
        .map_err(read)?
        .take(MAX_IMAGE)
        .read_to_end(&mut data)
        .map_err(read)?;
    parse(&data).map_err(|detail| PstreeError::Format {
        path: path.clone(),
        detail: detail.into(),
    })
}

/// The PID map of what was dumped: the entries of `live` (the container's processes read after
/// the dump, while it is still frozen) whose in-namespace PID is in the dumped tree. A dumped
/// zombie has no entry (it is not in `cgroup.procs`, here or after the restore).
pub(crate) fn dumped_map(live: Vec<PidEntry>, dumped: &BTreeSet<i32>) -> Vec<PidEntry> {
    live.into_iter()
        .filter(|e| dumped.contains(&e.ns_pid))
        .collect()
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The image: the two magics, then entries of a little-endian u32 size and a protobuf
/// `PstreeEntry` (field 1: pid).
fn parse(data: &[u8]) -> Result<BTreeSet<i32>, &'static str> {
    let mut at = match (u32_at(data, 0), u32_at(data, 4)) {
        (Some(IMG_COMMON_MAGIC), Some(PSTREE_MAGIC)) => 8,
        (Some(PSTREE_MAGIC), _) => 4,
        _ => return Err("bad magic"),
    };
    let mut pids = BTreeSet::new();
    while at < data.len() {
        let size = u32_at(data, at).ok_or("truncated entry size")? as usize;
        at += 4;
        let entry = data.get(at..at + size).ok_or("truncated entry")?;
        at += size;
        let pid = entry_pid(entry)?;
        pids.insert(i32::try_from(pid).map_err(|_| "pid out of range")?);
    }
    if pids.is_empty() {
        return Err("no process");
    }
    Ok(pids)
}

/// Field 1 (varint) of one protobuf message; other fields are skipped by wire type.
fn entry_pid(mut m: &[u8]) -> Result<u64, &'static str> {
    let mut pid = None;
    while !m.is_empty() {
        let key = varint(&mut m)?;
        match (key >> 3, key & 7) {
            (1, 0) => pid = Some(varint(&mut m)?),
            (_, 0) => {
                varint(&mut m)?;
            }
            (_, 1) => m = m.get(8..).ok_or("truncated fixed64")?,
            (_, 2) => {
                let n = usize::try_from(varint(&mut m)?).map_err(|_| "bad length")?;
                m = m.get(n..).ok_or("truncated field")?;
            }
            (_, 5) => m = m.get(4..).ok_or("truncated fixed32")?,
            _ => return Err("bad wire type"),
        }
    }
    pid.ok_or("entry without a pid")
}

fn varint(m: &mut &[u8]) -> Result<u64, &'static str> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = m.split_first().ok_or("truncated varint")?;
        *m = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `pstree.img` that CRIU 4.2.1 wrote here for `sh -c 'sleep & sleep & wait'` (PIDs 23747,
    /// 23749, 23750; field 5, the threads, not packed).
    const REAL: &[u8] = &[
        0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50, 0x12, 0x00, 0x00, 0x00, 0x08, 0xc3, 0xb9,
        0x01, 0x10, 0x00, 0x18, 0xc3, 0xb9, 0x01, 0x20, 0xc3, 0xb9, 0x01, 0x28, 0xc3, 0xb9, 0x01,
        0x14, 0x00, 0x00, 0x00, 0x08, 0xc5, 0xb9, 0x01, 0x10, 0xc3, 0xb9, 0x01, 0x18, 0xc3, 0xb9,
        0x01, 0x20, 0xc3, 0xb9, 0x01, 0x28, 0xc5, 0xb9, 0x01, 0x14, 0x00, 0x00, 0x00, 0x08, 0xc6,
        0xb9, 0x01, 0x10, 0xc3, 0xb9, 0x01, 0x18, 0xc3, 0xb9, 0x01, 0x20, 0xc3, 0xb9, 0x01, 0x28,
        0xc6, 0xb9, 0x01,
    ];

    #[test]
    fn reads_the_pids_criu_wrote() {
        let pids: Vec<i32> = parse(REAL).unwrap().into_iter().collect();
        assert_eq!(pids, [23747, 23749, 23750]);
    }

    #[test]
    fn refuses_what_is_not_a_pstree() {
        assert!(parse(&[]).is_err());
        assert!(parse(&REAL[..8]).is_err());
        assert!(parse(&REAL[..20]).is_err());
        let mut other = REAL.to_vec();
        other[4] = 0;
        assert!(parse(&other).is_err());
    }

    #[test]
    fn keeps_only_dumped_processes() {
        let e = |ns_pid| PidEntry {
            ns_pid,
            host_pid: ns_pid + 1000,
            cmd: String::new(),
        };
        let dumped = BTreeSet::from([1, 31]);
        let map = dumped_map(vec![e(1), e(7), e(31)], &dumped);
        assert_eq!(map, [e(1), e(31)]);
    }
}
