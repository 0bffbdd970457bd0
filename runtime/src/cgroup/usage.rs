//! Reading [`Usage`] counters. Each comes from cgroup2 when the controller is enabled there, else
//! from its v1 hierarchy; a counter the host does not provide reads 0.

use super::{fsio, Cgroup, CgroupError, Usage};
use std::path::{Path, PathBuf};

pub(super) fn read(cg: &Cgroup) -> Result<Usage, CgroupError> {
    let v2 = cg.unified_dir();
    let v2_file = |f: &str| v2.map(|d| d.join(f)).filter(|p| p.exists());
    let v1_file = |ctrl: &str, f: &str| cg.v1_dir(ctrl).map(|d| d.join(f));

    let memory_bytes = match v2_file("memory.current") {
        Some(p) => single(&p)?,
        None => opt(v1_file("memory", "memory.usage_in_bytes"), single)?,
    };
    // memory.stat: cgroup2 says `anon` and `shmem`; v1 says `rss` and `shmem` for the cgroup
    // alone and `total_*` with its descendants.
    let (anon_bytes, shmem_bytes) = match v2_file("memory.stat") {
        Some(p) => (keyed(&p, "anon")?, keyed(&p, "shmem")?),
        None => match v1_file("memory", "memory.stat") {
            Some(p) => (
                keyed(&p, "total_rss")?.max(keyed(&p, "rss")?),
                keyed(&p, "total_shmem")?.max(keyed(&p, "shmem")?),
            ),
            None => (0, 0),
        },
    };
    // v1 cpuacct counts nanoseconds; cgroup2's cpu.stat (present even without the cpu controller)
    // counts microseconds.
    let cpu_usec = match v1_file("cpuacct", "cpuacct.usage") {
        Some(p) if p.exists() => single(&p)? / 1000,
        _ => opt(v2.map(|d| d.join("cpu.stat")), |p| keyed(p, "usage_usec"))?,
    };
    let pids = match v2_file("pids.current") {
        Some(p) => single(&p)?,
        None => opt(v1_file("pids", "pids.current"), single)?,
    };
    let oom_kills = match v2_file("memory.events") {
        Some(p) => keyed(&p, "oom_kill")?,
        None => opt(v1_file("memory", "memory.oom_control"), |p| {
            keyed(p, "oom_kill")
        })?,
    };
    Ok(Usage {
        memory_bytes,
        anon_bytes,
        shmem_bytes,
        cpu_usec,
        pids,
        oom_kills,
    })
}

/// Applies `f` to `path` when there is one; otherwise 0.
fn opt(
    path: Option<PathBuf>,
    f: impl Fn(&Path) -> Result<u64, CgroupError>,
) -> Result<u64, CgroupError> {
    path.map_or(Ok(0), |p| f(&p))
}

fn read_text(path: &Path) -> Result<Option<String>, CgroupError> {
    fsio::read_optional(path).map_err(|source| CgroupError::ReadUsage {
        path: path.to_path_buf(),
        source,
    })
}

fn parse(path: &Path, value: &str) -> Result<u64, CgroupError> {
    value.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        value: value.to_owned(),
    })
}

/// A file holding one number; missing reads 0.
fn single(path: &Path) -> Result<u64, CgroupError> {
    match read_text(path)? {
        Some(text) => parse(path, &text),
        None => Ok(0),
    }
}

/// The number under `key` in a flat-keyed file; a missing file or key reads 0.
fn keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    match read_text(path)? {
        Some(text) => fsio::keyed(&text, key).map_or(Ok(0), |v| parse(path, v)),
        None => Ok(0),
    }
}

/// Limits at or above this are "no limit" (cgroup v1 writes `PAGE_COUNTER_MAX` pages as bytes).
const NO_LIMIT: u64 = 1 << 62;

/// The room under one memory cgroup directory: its limit less what is charged there and cannot
/// be reclaimed (the file LRU lists, page cache, count as room). `None` without a limit.
pub(super) fn room_in(dir: &Path) -> Result<Option<u64>, CgroupError> {
    let (limit, usage, stat) = match dir.join("memory.max") {
        v2 if v2.exists() => {
            let text = read_text(&v2)?.unwrap_or_default();
            if text.trim() == "max" {
                return Ok(None);
            }
            (
                parse(&v2, &text)?,
                single(&dir.join("memory.current"))?,
                dir.join("memory.stat"),
            )
        }
        _ => (
            single(&dir.join("memory.limit_in_bytes"))?,
            single(&dir.join("memory.usage_in_bytes"))?,
            dir.join("memory.stat"),
        ),
    };
    if limit == 0 || limit >= NO_LIMIT {
        return Ok(None);
    }
    // cgroup2 names the lists without a prefix; v1 has `total_*` with the descendants.
    let file = |key: &str| -> Result<u64, CgroupError> {
        Ok(keyed(&stat, &format!("total_{key}"))?.max(keyed(&stat, key)?))
    };
    let reclaimable = file("inactive_file")? + file("active_file")?;
    Ok(Some(
        limit.saturating_sub(usage.saturating_sub(reclaimable)),
    ))
}
