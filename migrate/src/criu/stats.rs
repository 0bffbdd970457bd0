//! CRIU's statistics images, `stats-dump` and `stats-restore`, written into the images directory
//! at the end of a dump or restore.
//!
//! Layout (criu/image.c, criu/include/magic.h, images/stats.proto): a little-endian `u32` head
//! magic (`IMG_SERVICE_MAGIC`, or `IMG_COMMON_MAGIC` for older writers), the `u32`
//! `STATS_MAGIC`, then one entry: a `u32` length and that many bytes of a protobuf `stats_entry
//! { dump_stats_entry dump = 1; restore_stats_entry restore = 2; }`, decoded with the minimal
//! reader of the (private) `criu::protobuf` module.

use super::protobuf::{Fields, Value, IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC};
use serde::{Deserialize, Serialize};
use std::path::Path;

const STATS_MAGIC: u32 = 0x5709_3306;
/// A stats image is a few dozen bytes; anything bigger is not one.
pub const MAX_STATS_BYTES: u64 = 64 << 10;

/// Why a stats image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read stats image {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stats image is {0} bytes, more than the limit of {MAX_STATS_BYTES}")]
    TooBig(u64),
    #[error("stats image is truncated")]
    Truncated,
    #[error("bad stats image magic {0:#010x}")]
    Magic(u32),
    #[error("malformed protobuf in stats image: {0}")]
    Protobuf(&'static str),
}

/// CRIU's own timings and counters of a dump, plus mig's wall time around the `criu dump` command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpStats {
    /// Time to freeze (seize) the tree.
    pub freezing_time_us: u64,
    /// Time the tree stayed frozen during the dump.
    pub frozen_time_us: u64,
    /// Time to collect memory (drain pages into pipes).
    pub memdump_time_us: u64,
    /// Time to write pages into the images.
    pub memwrite_time_us: u64,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
    pub shpages_scanned: u64,
    pub shpages_written: u64,
    /// Wall time of the whole `criu dump` command as mig measured it.
    pub wall_time_us: u64,
}

/// CRIU's own timings and counters of a restore, plus mig's wall time around `criu restore`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreStats {
    /// Time to fork the task tree.
    pub forking_time_us: u64,
    /// Time of the whole restore inside CRIU.
    pub restore_time_us: u64,
    pub pages_compared: u64,
    pub pages_skipped_cow: u64,
    pub pages_restored: u64,
    /// Wall time of the whole `criu restore` command as mig measured it.
    pub wall_time_us: u64,
}

/// The decoded `stats_entry`: a dump image has `dump`, a restore image has `restore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsEntry {
    pub dump: Option<DumpStats>,
    pub restore: Option<RestoreStats>,
}

/// Reads and decodes a stats image file (`stats-dump` or `stats-restore`).
pub fn read_stats(path: &Path) -> Result<StatsEntry, StatsError> {
    use std::io::Read;
    let read_err = |source| StatsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut data = Vec::new();
    file.take(MAX_STATS_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() as u64 > MAX_STATS_BYTES {
        return Err(StatsError::TooBig(data.len() as u64));
    }
    parse_stats(&data)
}

/// Decodes the bytes of a stats image.
pub fn parse_stats(data: &[u8]) -> Result<StatsEntry, StatsError> {
    if data.len() as u64 > MAX_STATS_BYTES {
        return Err(StatsError::TooBig(data.len() as u64));
    }
    let mut pos = 0;
    let mut magic = read_u32(data, &mut pos)?;
    if magic == IMG_SERVICE_MAGIC || magic == IMG_COMMON_MAGIC {
        magic = read_u32(data, &mut pos)?;
    }
    if magic != STATS_MAGIC {
        return Err(StatsError::Magic(magic));
    }
    let len = read_u32(data, &mut pos)? as usize;
    let body = data
        .get(pos..)
        .and_then(|rest| rest.get(..len))
        .ok_or(StatsError::Truncated)?;
    let mut entry = StatsEntry::default();
    for field in Fields::new(body, 0) {
        match field.map_err(StatsError::Protobuf)? {
            (1, Value::Bytes(b)) => entry.dump = Some(dump_entry(b)?),
            (2, Value::Bytes(b)) => entry.restore = Some(restore_entry(b)?),
            _ => {}
        }
    }
    Ok(entry)
}

fn dump_entry(b: &[u8]) -> Result<DumpStats, StatsError> {
    let mut s = DumpStats::default();
    for field in Fields::new(b, 1) {
        let (num, v) = match field.map_err(StatsError::Protobuf)? {
            (n, Value::Varint(v)) => (n, v),
            _ => continue,
        };
        match num {
            1 => s.freezing_time_us = v,
            2 => s.frozen_time_us = v,
            3 => s.memdump_time_us = v,
            4 => s.memwrite_time_us = v,
            5 => s.pages_scanned = v,
            6 => s.pages_skipped_parent = v,
            7 => s.pages_written = v,
            9 => s.pages_lazy = v,
            12 => s.shpages_scanned = v,
            14 => s.shpages_written = v,
            _ => {}
        }
    }
    Ok(s)
}

fn restore_entry(b: &[u8]) -> Result<RestoreStats, StatsError> {
    let mut s = RestoreStats::default();
    for field in Fields::new(b, 1) {
        let (num, v) = match field.map_err(StatsError::Protobuf)? {
            (n, Value::Varint(v)) => (n, v),
            _ => continue,
        };
        match num {
            1 => s.pages_compared = v,
            2 => s.pages_skipped_cow = v,
            3 => s.forking_time_us = v,
            4 => s.restore_time_us = v,
            5 => s.pages_restored = v,
            _ => {}
        }
    }
    Ok(s)
}

fn read_u32(data: &[u8], pos: &mut usize) -> Result<u32, StatsError> {
    let bytes = data
        .get(*pos..pos.saturating_add(4))
        .ok_or(StatsError::Truncated)?;
    *pos += 4;
    let mut a = [0u8; 4];
    a.copy_from_slice(bytes);
    Ok(u32::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `stats-dump` written by CRIU 4.1.1 on this machine (a small busybox tree).
    const REAL_DUMP: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x21, 0x00, 0x00, 0x00, 0x0a, 0x1f, 0x08,
        0x9d, 0x01, 0x10, 0xc3, 0x3f, 0x18, 0xec, 0x03, 0x20, 0x68, 0x28, 0x30, 0x30, 0x00, 0x38,
        0x22, 0x40, 0x00, 0x48, 0x00, 0x50, 0x08, 0x58, 0x08, 0x60, 0x00, 0x68, 0x00, 0x70, 0x00,
    ];
    /// `stats-restore` of the same tree.
    const REAL_RESTORE: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x0e, 0x00, 0x00, 0x00, 0x12, 0x0c, 0x08,
        0x09, 0x10, 0x02, 0x18, 0xa1, 0x02, 0x20, 0xcb, 0x29, 0x28, 0x20,
    ];

    #[test]
    fn real_dump_stats_parse() {
        let e = parse_stats(REAL_DUMP).unwrap();
        let d = e.dump.unwrap();
        assert!(e.restore.is_none());
        assert_eq!(d.freezing_time_us, 157);
        assert_eq!(d.frozen_time_us, 8131);
        assert_eq!(d.memdump_time_us, 492);
        assert_eq!(d.memwrite_time_us, 104);
        assert_eq!(d.pages_scanned, 48);
        assert_eq!(d.pages_written, 34);
    }

    #[test]
    fn real_restore_stats_parse() {
        let r = parse_stats(REAL_RESTORE).unwrap().restore.unwrap();
        assert_eq!(r.pages_compared, 9);
        assert_eq!(r.pages_skipped_cow, 2);
        assert_eq!(r.forking_time_us, 289);
        assert_eq!(r.restore_time_us, 5323);
        assert_eq!(r.pages_restored, 32);
    }

    #[test]
    fn refuses_bad_magic_and_truncation() {
        let mut bad = REAL_DUMP.to_vec();
        bad[4] ^= 1;
        assert!(matches!(parse_stats(&bad), Err(StatsError::Magic(_))));
        for n in 0..REAL_DUMP.len() {
            assert!(parse_stats(&REAL_DUMP[..n]).is_err(), "prefix {n} accepted");
        }
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let mut b: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = parse_stats(&b);
            b = REAL_DUMP.to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let _ = parse_stats(&b);
        }
    }
}
