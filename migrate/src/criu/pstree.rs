//! The process tree CRIU dumped (`pstree.img`): the in-namespace PIDs of its processes.
//!
//! Layout (criu/pstree.c, images/pstree.proto): the head magic, `PSTREE_MAGIC`, then one entry
//! per process: a `u32` length and a protobuf `pstree_entry { uint32 pid = 1; ... }`.

use super::protobuf::{entries, Fields, Value};
use std::collections::BTreeSet;

/// `pstree.img`'s own magic.
const PSTREE_MAGIC: u32 = 0x5027_3030;
/// The image file name.
pub const PSTREE_IMG: &str = "pstree.img";
/// A pstree image of a container is small; anything bigger is not one.
pub const MAX_PSTREE_BYTES: u64 = 16 << 20;

/// In-namespace PIDs of the processes (thread-group leaders) of a `pstree.img`.
pub fn parse_pids(data: &[u8]) -> Result<BTreeSet<i32>, &'static str> {
    let mut pids = BTreeSet::new();
    for entry in entries(data, PSTREE_MAGIC)? {
        let mut pid = None;
        for field in Fields::new(entry, 0) {
            if let (1, Value::Varint(v)) = field? {
                pid = Some(v);
            }
        }
        let pid = pid.ok_or("entry without a pid")?;
        pids.insert(i32::try_from(pid).map_err(|_| "pid out of range")?);
    }
    if pids.is_empty() {
        return Err("no process");
    }
    Ok(pids)
}

/// (pid, parent pid) of each process of a `pstree.img` (`pstree_entry { pid = 1; ppid = 2 }`;
/// the root's parent is 0, outside the tree).
pub fn parse_parents(data: &[u8]) -> Result<Vec<(i32, i32)>, &'static str> {
    let mut out = Vec::new();
    for entry in entries(data, PSTREE_MAGIC)? {
        let (mut pid, mut ppid) = (None, 0u64);
        for field in Fields::new(entry, 0) {
            match field? {
                (1, Value::Varint(v)) => pid = Some(v),
                (2, Value::Varint(v)) => ppid = v,
                _ => {}
            }
        }
        let pid = pid.ok_or("entry without a pid")?;
        let pid = i32::try_from(pid).map_err(|_| "pid out of range")?;
        let ppid = i32::try_from(ppid).map_err(|_| "pid out of range")?;
        out.push((pid, ppid));
    }
    if out.is_empty() {
        return Err("no process");
    }
    Ok(out)
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
        let pids: Vec<i32> = parse_pids(REAL).unwrap().into_iter().collect();
        assert_eq!(pids, [23747, 23749, 23750]);
    }

    #[test]
    fn reads_the_parents_criu_wrote() {
        assert_eq!(
            parse_parents(REAL).unwrap(),
            [(23747, 0), (23749, 23747), (23750, 23747)]
        );
    }

    #[test]
    fn refuses_what_is_not_a_pstree() {
        assert!(parse_pids(&[]).is_err());
        assert!(parse_pids(&REAL[..8]).is_err());
        assert!(parse_pids(&REAL[..20]).is_err());
        let mut other = REAL.to_vec();
        other[4] = 0;
        assert!(parse_pids(&other).is_err());
    }
}
