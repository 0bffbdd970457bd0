//! Reading a running process's anonymous memory: the pages CRIU's dump sends for it.
//!
//! `/proc/PID/maps` gives the private readable mappings; `/proc/PID/pagemap` says which of their
//! pages are present and not file-backed (bit 63 set, bit 61 clear): the anonymous and
//! copy-on-written pages, the ones `criu dump` streams, without the kernel's zero page (which CRIU
//! skips too, `super::sys::zero_page_pfn`). Shared mappings go through CRIU's
//! shared-memory images and are left out, as are the kernel's `[vvar]`-like areas. What the
//! process does meanwhile only makes pages differ at the freeze, where they are then sent.
//!
//! The dump also sends pages the pagemap does not show as anonymous before it ([`dump_adds`]):
//! the whole `[vdso]`, and the first page of the first executable mapping, which CRIU's parasite
//! bootstrap writes into. The presync sends them too, so that its file has the layout of the
//! dump's pages image: a page the dump has and the presync lacks shifts every page after it, and
//! the destination then moves all of them (a dynamically linked program's text lies below its
//! heap and its large mappings; that shift cost 0.9 s of frozen time for 1 GiB).

use super::sys::{zero_page_pfn, PM_PFN};
use super::{MemsyncError, MAX_RUN_PAGES, PAGE};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Pagemap entries read at a time (32 MiB of address space).
const PAGEMAP_BATCH: usize = 8192;
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
/// "Page exclusively mapped" (mapped by one page table only).
const PM_EXCLUSIVE: u64 = 1 << 56;

/// Mappings the kernel provides, never dumped as pages.
const SPECIAL: [&str; 4] = ["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"];

/// A run of consecutive anonymous pages: its first address and its number of pages (at most
/// [`MAX_RUN_PAGES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub vaddr: u64,
    pub pages: u32,
}

/// One line of `/proc/PID/maps`: its range, permissions (`rwxp`) and path (empty if none).
struct Mapping<'a> {
    start: u64,
    end: u64,
    perms: &'a [u8],
    path: &'a str,
}

impl Mapping<'_> {
    /// Private, readable, and not one the kernel provides: memory the presync reads.
    fn private_readable(&self) -> bool {
        self.perms[0] == b'r' && self.perms[3] == b'p' && !SPECIAL.contains(&self.path)
    }
}

/// The well-formed, non-empty mappings of `/proc/PID/maps` text, in its order.
fn mappings(maps: &str) -> impl Iterator<Item = Mapping<'_>> {
    maps.lines().filter_map(|line| {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next()?, f.next()?.as_bytes());
        let path = f.nth(3).unwrap_or("");
        let (a, b) = range.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        (start < end && perms.len() >= 4).then_some(Mapping {
            start,
            end,
            perms,
            path,
        })
    })
}

/// The private readable mappings of `/proc/PID/maps` text, as (start, end).
pub fn private_mappings(maps: &str) -> Vec<(u64, u64)> {
    mappings(maps)
        .filter(Mapping::private_readable)
        .map(|m| (m.start, m.end))
        .collect()
}

/// Address ranges the dump sends in full although the pagemap does not show them as anonymous
/// before it, from `/proc/PID/maps` text, in address order:
///
/// - `[vdso]`: CRIU dumps every page of it (`should_dump_entire_vma`);
/// - the first page of the first executable mapping below the kernel's half (CRIU's
///   `get_exec_start`, "Parasite syscall_ip" in the dump log), when it is private and readable:
///   the parasite bootstrap pokes a syscall instruction and a memfd name there with ptrace and
///   puts the bytes back (compel's `compel_execute_syscall`, `parasite_memfd_exchange`), which
///   copies the page on write, so the dump finds an anonymous page there with the file's bytes.
pub fn dump_adds(maps: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut exec_seen = false;
    for m in mappings(maps) {
        // The first executable one wins even when it is not one the presync can read.
        let first_exec = !exec_seen && m.perms[2] == b'x' && m.start < KERNEL_HALF;
        exec_seen |= first_exec;
        if m.path == "[vdso]" {
            out.push((m.start, m.end));
        } else if first_exec && m.private_readable() {
            out.push((m.start, m.start + PAGE as u64));
        }
    }
    out
}

/// Addresses from here on are the kernel's (`[vsyscall]`), which CRIU's `get_exec_start` skips.
const KERNEL_HALF: u64 = 1 << 63;

/// `runs` (in address order) with every page of `adds` (address ranges in order) added once,
/// split again at [`MAX_RUN_PAGES`].
pub fn with_adds(runs: Vec<PageRun>, adds: &[(u64, u64)]) -> Vec<PageRun> {
    if adds.is_empty() {
        return runs;
    }
    let mut spans: Vec<(u64, u64)> = runs
        .iter()
        .map(|r| (r.vaddr, r.vaddr + u64::from(r.pages) * PAGE as u64))
        .chain(adds.iter().copied())
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let max = u64::from(MAX_RUN_PAGES) * PAGE as u64;
    let mut out = Vec::with_capacity(merged.len());
    for (mut a, b) in merged {
        while a < b {
            let end = b.min(a + max);
            out.push(PageRun {
                vaddr: a,
                pages: ((end - a) / PAGE as u64) as u32,
            });
            a = end;
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

/// The runs of pages of process `pid` that its dump will send, in address order: the anonymous
/// present ones and [`dump_adds`].
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
    Ok(with_adds(runs, &dump_adds(&maps)))
}

/// How many of a sample of the private pages of `pids` (about `pages`, evenly spread over all
/// of them) changed over `window`: each is read and digested, then read again after `window`
/// (a page gone since counts as changed). Returns (changed, sampled); `None` when there is no
/// page to sample. Blocking: sleeps `window`. Without the kernel's dirty-page tracking
/// (soft-dirty), this is what tells a container idle on its memory from one rewriting it.
pub fn sample_rewrites(
    pids: &[i32],
    pages: usize,
    window: std::time::Duration,
) -> Option<(u32, u32)> {
    let mut procs = Vec::new();
    for &pid in pids {
        let (Ok(runs), Ok(mem)) = (anon_runs(pid), ProcMemory::open(pid)) else {
            continue;
        };
        procs.push((mem, runs));
    }
    let total: u64 = procs
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(|r| u64::from(r.pages)))
        .sum();
    if total == 0 {
        return None;
    }
    let step = (total / pages.max(1) as u64).max(1);
    let mut picks: Vec<(usize, u64)> = Vec::new();
    let (mut n, mut next) = (0u64, 0u64);
    for (i, (_, runs)) in procs.iter().enumerate() {
        for r in runs {
            for p in 0..u64::from(r.pages) {
                if n == next {
                    picks.push((i, r.vaddr + p * PAGE as u64));
                    next += step;
                }
                n += 1;
            }
        }
    }
    let read = |&(i, vaddr): &(usize, u64)| {
        let (data, got, _) = procs[i].0.read_run(PageRun { vaddr, pages: 1 });
        (got == 1).then(|| super::digest(0, &data))
    };
    let before: Vec<Option<u128>> = picks.iter().map(read).collect();
    std::thread::sleep(window);
    let (mut changed, mut sampled) = (0u32, 0u32);
    for (pick, was) in picks.iter().zip(&before) {
        let Some(was) = was else { continue };
        sampled += 1;
        if read(pick) != Some(*was) {
            changed += 1;
        }
    }
    (sampled > 0).then_some((changed, sampled))
}

/// A process's memory, open for the presync's reads.
pub struct ProcMemory {
    pid: i32,
    mem: std::fs::File,
    pagemap: std::fs::File,
}

impl ProcMemory {
    /// Opens `/proc/PID/mem` and `/proc/PID/pagemap` of process `pid`.
    pub fn open(pid: i32) -> Result<ProcMemory, MemsyncError> {
        let open = |name: &str| {
            let path = PathBuf::from(format!("/proc/{pid}/{name}"));
            std::fs::File::open(&path).map_err(|source| MemsyncError::Proc { path, source })
        };
        Ok(ProcMemory {
            pid,
            mem: open("mem")?,
            pagemap: open("pagemap")?,
        })
    }

    /// Reads `run` into a new buffer; returns the pages read from its start (fewer when the
    /// process unmapped or exited meanwhile). A run whose pages the process maps alone, as its
    /// pagemap says right before the read, is read with one copy ([`sys::read_pinned`]); any
    /// other (pages a `fork` shares, file pages, pages gone since the scan) through
    /// `/proc/PID/mem`, which never unshares a page ([`sys::read_mem`]). Also returns whether
    /// the run was read pinned.
    ///
    /// [`sys::read_pinned`]: super::sys::read_pinned
    /// [`sys::read_mem`]: super::sys::read_mem
    pub fn read_run(&self, run: PageRun) -> (Vec<u8>, u32, bool) {
        let len = run.pages as usize * PAGE;
        let pinned = self.mapped_alone(run);
        let mut data = if pinned {
            super::sys::read_pinned(self.pid, run.vaddr, len)
        } else {
            super::sys::read_mem(&self.mem, run.vaddr, len)
        };
        let pages = (data.len() / PAGE) as u32;
        data.truncate(pages as usize * PAGE);
        (data, pages, pinned)
    }

    /// Whether every page of `run` is present, anonymous and mapped by this process only.
    fn mapped_alone(&self, run: PageRun) -> bool {
        let n = run.pages as usize;
        let mut raw = [0u8; MAX_RUN_PAGES as usize * 8];
        let Some(buf) = raw.get_mut(..n * 8) else {
            return false;
        };
        match self.pagemap.read_at(buf, run.vaddr / PAGE as u64 * 8) {
            Ok(got) if got == n * 8 => buf.chunks_exact(8).all(|b| {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                alone(u64::from_le_bytes(w))
            }),
            _ => false,
        }
    }
}

/// Whether a pagemap entry is a present anonymous page that no other process maps.
fn alone(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_EXCLUSIVE | PM_FILE) == PM_PRESENT | PM_EXCLUSIVE
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

    /// `/proc/PID/maps` of a dynamically linked PIE (mig-memload, 2026-12-03), shortened.
    const DYNAMIC: &str = "\
55f14689f000-55f1468b4000 r--p 00000000 fe:00 6194926   /bin/mig-memload
55f1468b4000-55f1468f5000 r-xp 00014000 fe:00 6194926   /bin/mig-memload
55f1468f9000-55f1468fa000 rw-p 00057000 fe:00 6194926   /bin/mig-memload
55f14fa59000-55f14fa7a000 rw-p 00000000 00:00 0         [heap]
7f19a479a000-7f19e479e000 rw-p 00000000 00:00 0
7f19e479e000-7f19e47c4000 r--p 00000000 fe:00 326279    /usr/lib/x86_64-linux-gnu/libc.so.6
7f19e47c4000-7f19e491a000 r-xp 00026000 fe:00 326279    /usr/lib/x86_64-linux-gnu/libc.so.6
7f19e49ab000-7f19e49af000 r--p 00000000 00:00 0         [vvar]
7f19e49af000-7f19e49b1000 r--p 00000000 00:00 0         [vvar_vclock]
7f19e49b1000-7f19e49b3000 r-xp 00000000 00:00 0         [vdso]
7ffd7f74f000-7ffd7f770000 rw-p 00000000 00:00 0         [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
";

    #[test]
    fn the_dump_also_sends_the_first_executable_page_and_the_vdso() {
        // CRIU's parasite writes into the binary's first text page, below the heap and the big
        // mapping; the whole vDSO is always dumped.
        assert_eq!(
            dump_adds(DYNAMIC),
            vec![
                (0x55f1468b4000, 0x55f1468b5000),
                (0x7f19e49b1000, 0x7f19e49b3000)
            ]
        );
        // A static PIE: the vDSO is the first executable mapping; nothing else is added.
        let static_pie = "\
5555736b1000-5555736d3000 rw-p 00000000 00:00 0         [heap]
7ff6379fe000-7ff6779ff000 rw-p 00000000 00:00 0
7ff677a08000-7ff677a0a000 r-xp 00000000 00:00 0         [vdso]
7ff677a53000-7ff677b31000 r-xp 00048000 fe:00 5758983   /bin/mig-memload
";
        assert_eq!(
            dump_adds(static_pie),
            vec![(0x7ff677a08000, 0x7ff677a0a000)]
        );
        // An execute-only first mapping is still the one CRIU writes into (the presync cannot
        // read it: nothing added for it), and no later one replaces it; nor does [vsyscall].
        let xonly = "\
00400000-00452000 --xp 00000000 08:02 1   /bin/a
00600000-00652000 r-xp 00000000 08:02 2   /bin/b
ffffffffff600000-ffffffffff601000 r-xp 00000000 00:00 0 [vsyscall]
";
        assert_eq!(dump_adds(xonly), vec![]);
        assert_eq!(
            dump_adds("ffffffffff600000-ffffffffff601000 r-xp 00000000 00:00 0 [vsyscall]\n"),
            vec![]
        );
        // A shared executable mapping goes through CRIU's shared-memory images.
        assert_eq!(
            dump_adds("00400000-00452000 r-xs 00000000 08:02 1   /bin/a\n"),
            vec![]
        );
    }

    #[test]
    fn added_pages_merge_into_the_runs_once_in_address_order() {
        let run = |vaddr: u64, pages: u32| PageRun { vaddr, pages };
        let p = PAGE as u64;
        let max = u64::from(MAX_RUN_PAGES);
        let runs = vec![run(10 * p, 2), run(20 * p, 3), run(100 * p, MAX_RUN_PAGES)];
        let adds = [
            (5 * p, 6 * p),                         // alone, first
            (12 * p, 13 * p),                       // right after a run: joins it
            (21 * p, 22 * p),                       // inside a run: nothing new
            (100 * p + max * p, 101 * p + max * p), // after a full run: a new one
        ];
        assert_eq!(
            with_adds(runs.clone(), &adds),
            vec![
                run(5 * p, 1),
                run(10 * p, 3),
                run(20 * p, 3),
                run(100 * p, MAX_RUN_PAGES),
                run(100 * p + max * p, 1),
            ]
        );
        assert_eq!(with_adds(runs.clone(), &[]), runs);
        // Long additions are split at the most pages of a run.
        assert_eq!(
            with_adds(Vec::new(), &[(0, (max + 1) * p)]),
            vec![run(0, MAX_RUN_PAGES), run(max * p, 1)]
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
        let (data, pages, pinned) = ProcMemory::open(pid).unwrap().read_run(run);
        assert_eq!(pages, 8);
        // Root sees frame numbers and the exclusive bit: the pages are this process's alone.
        if nix::unistd::geteuid().is_root() {
            assert!(zero_page_pfn().is_some());
            assert!(pinned);
        }
        let off = (run.vaddr - start) as usize;
        assert_eq!(&data[..], &v[off..off + 8 * PAGE]);
    }

    #[test]
    fn only_present_anonymous_pages_mapped_alone_are_read_pinned() {
        let ok = PM_PRESENT | PM_EXCLUSIVE | 1234;
        assert!(alone(ok));
        assert!(!alone(PM_PRESENT | 1234), "shared with a forked process");
        assert!(!alone(PM_EXCLUSIVE), "not present");
        assert!(!alone(ok | PM_FILE), "a file page");
    }

    /// Pages a `fork` shares are read through `/proc/PID/mem` and stay shared: a pinned read
    /// would have given this process its own copy of them.
    #[test]
    fn pages_shared_with_a_forked_child_are_read_without_unsharing_them() {
        if !nix::unistd::geteuid().is_root() {
            return; // the exclusive bit needs CAP_SYS_ADMIN
        }
        let mut v = vec![0u8; 16 * PAGE];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i / 7) as u8;
        }
        let run = PageRun {
            vaddr: (v.as_ptr() as u64 + PAGE as u64 - 1) & !(PAGE as u64 - 1),
            pages: 8,
        };
        // SAFETY: the child only calls async-signal-safe functions (pause, _exit) until killed.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => loop {
                // SAFETY: async-signal-safe.
                unsafe { libc::pause() };
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let me = ProcMemory::open(std::process::id() as i32).unwrap();
        let (data, pages, pinned) = me.read_run(run);
        let still_shared = !me.mapped_alone(run);
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        assert_eq!(pages, 8);
        assert!(!pinned, "shared pages were read pinned");
        assert!(still_shared, "the read unshared the pages");
        let off = (run.vaddr - v.as_ptr() as u64) as usize;
        assert_eq!(&data[..], &v[off..off + 8 * PAGE]);
    }

    /// The sample tells a process rewriting its memory from one leaving it alone.
    #[test]
    fn rewritten_memory_shows_in_the_sample() {
        if !nix::unistd::geteuid().is_root() {
            return; // reading another process's memory
        }
        let len = 64 << 20;
        let mut v = vec![1u8; len];
        let base = v.as_mut_ptr();
        let spawn = |rewrite: bool| {
            // SAFETY: the child only writes its own copy of `v` and calls async-signal-safe
            // functions until killed.
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    let mut pass = 0u64;
                    loop {
                        if rewrite {
                            // A count never seen before in each page, each pass.
                            pass += 1;
                            for i in (0..len).step_by(PAGE) {
                                // SAFETY: within the child's copy of `v`, 8-byte aligned
                                // (a page's start in the allocation plus a page multiple).
                                unsafe { base.add(i).cast::<u64>().write_volatile(pass) };
                            }
                        } else {
                            // SAFETY: async-signal-safe.
                            unsafe { libc::pause() };
                        }
                    }
                }
                nix::unistd::ForkResult::Parent { child } => child,
            }
        };
        let (busy, idle) = (spawn(true), spawn(false));
        let window = std::time::Duration::from_millis(150);
        // The busy child may not run in one window on a loaded machine (CI beside other
        // builds): a few windows, the first in which it rewrote its pages counts.
        let b = (0..5)
            .map(|_| sample_rewrites(&[busy.as_raw()], 2048, window))
            .find(|r| r.is_some_and(|(changed, sampled)| changed * 10 > sampled * 3))
            .unwrap_or_else(|| sample_rewrites(&[busy.as_raw()], 2048, window));
        let i = sample_rewrites(&[idle.as_raw()], 2048, window);
        for c in [busy, idle] {
            let _ = nix::sys::signal::kill(c, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(c, None);
        }
        drop(v);
        let (changed, sampled) = b.unwrap();
        assert!(sampled > 1000, "{sampled} sampled");
        assert!(
            changed * 10 > sampled * 3,
            "busy: {changed} of {sampled} changed"
        );
        let (changed, sampled) = i.unwrap();
        assert_eq!(changed, 0, "idle: {changed} of {sampled} changed");
        assert_eq!(sample_rewrites(&[], 10, window), None);
    }
}
