//! Writing [`Limits`] to whichever hierarchy carries each controller: cgroup2 when its files are
//! there, the v1 hierarchy otherwise.

use super::{fsio, Cgroup, CgroupError};
use crate::spec::Limits;
use std::path::Path;

/// CFS period used for CPU limits, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The kernel refuses a CFS quota below 1 ms.
const CPU_MIN_QUOTA_US: u64 = 1_000;

/// The smallest CPU limit, in thousandths of a CPU, that the kernel's smallest quota (1 ms)
/// allows in mig's CFS period (100 ms): 10, 0.01 CPUs. A smaller one is refused before a
/// container is made (QA of session 32, F8: 0.001 passed the checks and the cgroup step refused
/// it).
pub const CPU_MIN_MILLIS: u64 = CPU_MIN_QUOTA_US * 1000 / CPU_PERIOD_US;

pub(super) fn apply(cg: &Cgroup, limits: &Limits) -> Result<(), CgroupError> {
    memory(cg, limits.memory)?;
    cpu(cg, limits.cpu_millis)?;
    pids(cg, limits.pids)
}

fn set(path: &Path, value: &str) -> Result<(), CgroupError> {
    fsio::write(path, value).map_err(|source| CgroupError::SetLimit {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// The v2 directory when it has `file` (the controller is enabled there).
fn v2_with<'a>(cg: &'a Cgroup, file: &str) -> Option<&'a Path> {
    cg.unified_dir().filter(|d| d.join(file).exists())
}

fn missing(controller: &'static str, limit: &'static str, wanted: bool) -> Result<(), CgroupError> {
    if wanted {
        Err(CgroupError::NoController { controller, limit })
    } else {
        Ok(())
    }
}

fn memory(cg: &Cgroup, bytes: Option<u64>) -> Result<(), CgroupError> {
    if bytes == Some(0) {
        return Err(CgroupError::InvalidLimit {
            limit: "memory",
            value: 0,
        });
    }
    if let Some(dir) = v2_with(cg, "memory.max") {
        let value = bytes.map_or_else(|| "max".to_owned(), |b| b.to_string());
        set(&dir.join("memory.max"), &value)?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            // A memory limit means no swap either, as memory+swap = limit does on v1.
            set(&swap, if bytes.is_some() { "0" } else { "max" })?;
        }
        return Ok(());
    }
    let Some(dir) = cg.v1_dir("memory") else {
        return missing("memory", "memory", bytes.is_some());
    };
    let value = bytes.map_or_else(|| "-1".to_owned(), |b| b.to_string());
    let limit = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    if !memsw.exists() {
        return set(&limit, &value);
    }
    // The kernel keeps memsw >= limit at every step: lowering goes limit first, raising memsw
    // first. Trying limit first and falling back covers both without reading the old values.
    match set(&limit, &value) {
        Ok(()) => set(&memsw, &value),
        Err(first) => {
            if set(&memsw, &value).is_err() {
                // Not the ordering then (e.g. usage above the new limit): report the first cause.
                return Err(first);
            }
            set(&limit, &value)
        }
    }
}

fn cpu(cg: &Cgroup, millis: Option<u64>) -> Result<(), CgroupError> {
    let quota = match millis {
        None => None,
        Some(m) => match m.checked_mul(CPU_PERIOD_US / 1000) {
            Some(q) if q >= CPU_MIN_QUOTA_US => Some(q),
            _ => {
                return Err(CgroupError::InvalidLimit {
                    limit: "cpu_millis",
                    value: m,
                })
            }
        },
    };
    if let Some(dir) = v2_with(cg, "cpu.max") {
        let value = match quota {
            Some(q) => format!("{q} {CPU_PERIOD_US}"),
            None => format!("max {CPU_PERIOD_US}"),
        };
        return set(&dir.join("cpu.max"), &value);
    }
    let Some(dir) = cg.v1_dir("cpu") else {
        return missing("cpu", "cpu_millis", quota.is_some());
    };
    // Lift the quota first so that the period change can never conflict with the old quota.
    let quota_path = dir.join("cpu.cfs_quota_us");
    set(&quota_path, "-1")?;
    set(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
    if let Some(q) = quota {
        set(&quota_path, &q.to_string())?;
    }
    Ok(())
}

fn pids(cg: &Cgroup, max: Option<u64>) -> Result<(), CgroupError> {
    let dir = match v2_with(cg, "pids.max") {
        Some(d) => d,
        None => match cg.v1_dir("pids") {
            Some(d) => d,
            None => return missing("pids", "pids", max.is_some()),
        },
    };
    let value = max.map_or_else(|| "max".to_owned(), |m| m.to_string());
    set(&dir.join("pids.max"), &value)
}
