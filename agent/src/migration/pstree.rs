//! The process tree CRIU dumped (`pstree.img`), read without CRIU's tools. A move reports as its
//! "before" PID map the processes CRIU really dumped: a read of `cgroup.procs` around the freeze
//! can miss a short-lived process that CRIU still found (and the destination restores).

use mig_migrate::criu::pstree::{parse_pids, MAX_PSTREE_BYTES, PSTREE_IMG};
use mig_runtime::pidmap::PidEntry;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
        .take(MAX_PSTREE_BYTES)
        .read_to_end(&mut data)
        .map_err(read)?;
    parse_pids(&data).map_err(|detail| PstreeError::Format {
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

#[cfg(test)]
mod tests {
    use super::*;

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
