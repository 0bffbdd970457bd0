//! Reading a running process's anonymous memory: the pages CRIU's dump sends for it.
//!
//! `/proc/PID/maps` gives the private readable mappings; `/proc/PID/pagemap` says which of their
//! pages are present and not file-backed (bit 63 set, bit 61 clear): the anonymous and
//! copy-on-written pages, the ones `criu dump` streams, without the kernel's zero page (which CRIU
//! skips too, `super::sys::zero_page_pfn`). Shared mappings go through CRIU's
//! shared-memory images and are left out, as are the kernel's `[vdso]`-like areas. What the
//! process does meanwhile only makes pages differ at the freeze, where they are then sent.

use super::sys::{zero_page_pfn, PM_PFN};
use super::{MemsyncError, MAX_RUN_PAGES, PAGE};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Pagemap entries read at a time (32 MiB of address space).
const PAGEMAP_BATCH: usize = 8192;
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// Mappings the kernel provides, never dumped as pages.
const SPECIAL: [&str; 4] = ["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"];

/// A run of consecutive anonymous pages: its first address and its number of pages (at most
/// [`MAX_RUN_PAGES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub vaddr: u64,
    pub pages: u32,
}

/// The private readable mappings of `/proc/PID/maps` text, as (start, end).
pub fn private_mappings(maps: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("");
        let p = perms.as_bytes();
        if p.len() < 4 || p[0] != b'r' || p[3] != b'p' || SPECIAL.contains(&path) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            if a < b {
                out.push((a, b));
            }
        }
    }
    out
}

/// Appends to `runs` the anonymous present pages among pagemap `entries` of the pages from
/// `start` on (not the zero page, frame `zero_pfn`), merging with the last run when consecutive.
pub fn collect_runs(entries: &[u64], start: u64, zero_pfn: Option<u64>, runs: &mut Vec<PageRun>) {
    for (i, &e) in entries.iter().enumerate() {
        if e & PM_PRESENT == 0 || e & PM_FILE != 0 || Some(e & PM_PFN) == zero_pfn {
            continue;
        }
        let vaddr = start + (i * PAGE) as u64;
        match runs.last_mut() {
            Some(r)
                if r.pages < MAX_RUN_PAGES
                    && r.vaddr + u64::from(r.pages) * PAGE as u64 == vaddr =>
            {
                r.pages += 1
            }
            _ => runs.push(PageRun { vaddr, pages: 1 }),
        }
    }
}

/// The runs of anonymous pages of process `pid`, in address order.
pub fn anon_runs(pid: i32) -> Result<Vec<PageRun>, MemsyncError> {
    let proc_path = |name: &str| PathBuf::from(format!("/proc/{pid}/{name}"));
    let maps_path = proc_path("maps");
    let maps = std::fs::read_to_string(&maps_path).map_err(|source| MemsyncError::Proc {
        path: maps_path.clone(),
        source,
    })?;
    let pm_path = proc_path("pagemap");
    let pagemap = std::fs::File::open(&pm_path).map_err(|source| MemsyncError::Proc {
        path: pm_path.clone(),
        source,
    })?;
    static ZERO_PFN: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let zero_pfn = *ZERO_PFN.get_or_init(zero_page_pfn);
    let mut runs = Vec::new();
    let mut raw = vec![0u8; PAGEMAP_BATCH * 8];
    let mut entries = vec![0u64; PAGEMAP_BATCH];
    for (start, end) in private_mappings(&maps) {
        let mut at = start;
        while at < end {
            let n = (((end - at) / PAGE as u64) as usize).min(PAGEMAP_BATCH);
            let buf = &mut raw[..n * 8];
            let got = pagemap
                .read_at(buf, at / PAGE as u64 * 8)
                .map_err(|source| MemsyncError::Proc {
                    path: pm_path.clone(),
                    source,
                })?;
            let k = got / 8;
            if k == 0 {
                break;
            }
            for (e, b) in entries.iter_mut().zip(buf[..k * 8].chunks_exact(8)) {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                *e = u64::from_le_bytes(w);
            }
            collect_runs(&entries[..k], at, zero_pfn, &mut runs);
            at += (k * PAGE) as u64;
        }
    }
    Ok(runs)
}

/// Reads `run` of process `pid` into a new buffer; returns the pages read from its start
/// (fewer when the process unmapped or exited meanwhile).
pub fn read_run(pid: i32, run: PageRun) -> (Vec<u8>, u32) {
    let len = run.pages as usize * PAGE;
    let mut data = vec![0u8; len];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: run.vaddr as usize,
        len,
    }];
    let got = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut [std::io::IoSliceMut::new(&mut data)],
        &remote,
    )
    .unwrap_or(0);
    let pages = (got / PAGE) as u32;
    data.truncate(pages as usize * PAGE);
    (data, pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_readable_mappings_of_user_memory() {
        let maps = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00e03000-00e24000 rw-p 00000000 00:00 0           [heap]
7f2c3000-7f2c4000 rw-s 00000000 00:05 1234        /dev/zero (deleted)
7f2c5000-7f2c6000 ---p 00000000 00:00 0
7f2c7000-7f2c9000 rw-p 00000000 00:00 0
7ffd1000-7ffd3000 r--p 00000000 00:00 0           [vvar]
7ffd3000-7ffd5000 r-xp 00000000 00:00 0           [vdso]
7ffe1000-7ffe2000 rw-p 00000000 00:00 0           /tmp/a name with spaces
garbage line
";
        assert_eq!(
            private_mappings(maps),
            vec![
                (0x400000, 0x452000),
                (0xe03000, 0xe24000),
                (0x7f2c7000, 0x7f2c9000),
                (0x7ffe1000, 0x7ffe2000),
            ]
        );
    }

    #[test]
    fn runs_hold_present_anonymous_pages_and_split_at_the_maximum() {
        let anon = PM_PRESENT;
        let file = PM_PRESENT | PM_FILE;
        let zero = PM_PRESENT | 77;
        let mut entries = vec![anon, anon, 0, file, anon];
        entries.extend(std::iter::repeat_n(anon, MAX_RUN_PAGES as usize + 1));
        entries.push(zero);
        let mut runs = Vec::new();
        collect_runs(&entries, 0x1000, Some(77), &mut runs);
        let at = |i: u64| 0x1000 + i * PAGE as u64;
        assert_eq!(
            runs,
            vec![
                PageRun {
                    vaddr: at(0),
                    pages: 2
                },
                PageRun {
                    vaddr: at(4),
                    pages: MAX_RUN_PAGES
                },
                PageRun {
                    vaddr: at(4 + u64::from(MAX_RUN_PAGES)),
                    pages: 2
                },
            ]
        );
    }

    #[test]
    fn own_memory_is_found_and_read_back() {
        let mut v = vec![0u8; 64 * PAGE];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i / PAGE) as u8 ^ 0x5a;
        }
        let start = v.as_ptr() as u64;
        let pid = std::process::id() as i32;
        let runs = anon_runs(pid).unwrap();
        // Every page of `v` (touched above) is in some run.
        for p in 0..64u64 {
            let a = (start & !(PAGE as u64 - 1)) + (p + 1) * PAGE as u64;
            if a + PAGE as u64 > start + v.len() as u64 {
                break;
            }
            assert!(
                runs.iter()
                    .any(|r| r.vaddr <= a && a < r.vaddr + u64::from(r.pages) * PAGE as u64),
                "page {a:#x} of the buffer is in no run"
            );
        }
        let run = PageRun {
            vaddr: (start + PAGE as u64 - 1) & !(PAGE as u64 - 1),
            pages: 8,
        };
        let (data, pages) = read_run(pid, run);
        assert_eq!(pages, 8);
        // Root sees frame numbers.
        if nix::unistd::geteuid().is_root() {
            assert!(zero_page_pfn().is_some());
        }
        let off = (run.vaddr - start) as usize;
        assert_eq!(&data[..], &v[off..off + 8 * PAGE]);
    }
}
