//! The only unsafe code of the memory presync: finding the kernel's zero page, and reading
//! another process's memory into a buffer that was not zeroed first.

use std::os::unix::fs::FileExt;

/// Page frame bits of a pagemap entry.
pub(super) const PM_PFN: u64 = (1 << 55) - 1;

/// The page frame number of the kernel's shared zero page (what a read of never-written
/// anonymous memory maps), as `/proc/self/pagemap` shows it; `None` without the privilege to
/// see frame numbers. CRIU skips such pages (`kdat.zero_page_pfn`), so the presync does too.
pub fn zero_page_pfn() -> Option<u64> {
    const LEN: usize = 4096;
    // SAFETY: a new private anonymous read-only mapping of one page; only this function uses it
    // and it is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `p` is a readable mapping of LEN bytes (above); the read maps the zero page.
    let _ = unsafe { std::ptr::read_volatile(p.cast::<u8>()) };
    let entry = std::fs::File::open("/proc/self/pagemap")
        .ok()
        .and_then(|f| {
            let mut w = [0u8; 8];
            f.read_exact_at(&mut w, (p as u64 / LEN as u64) * 8).ok()?;
            Some(u64::from_le_bytes(w))
        });
    // SAFETY: unmaps the mapping made above, which nothing refers to any more.
    unsafe { libc::munmap(p, LEN) };
    entry.map(|e| e & PM_PFN).filter(|&pfn| pfn != 0)
}

/// Reads up to `len` bytes at `addr` through `mem` (the process's open `/proc/PID/mem`) into a
/// new buffer that is not zeroed first: the presync reads every byte of its memory once, and
/// zeroing a 1 MiB buffer before the kernel overwrites it costs as much again as a copy. Returns
/// the bytes read (fewer, or none, when the process unmapped the range or exited meanwhile).
///
/// `/proc/PID/mem` reads without pinning, and so never unshares a page (see [`read_pinned`]); it
/// copies each page twice (through a kernel page) and takes the process's mmap lock per page.
pub(super) fn read_mem(mem: &std::fs::File, addr: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::<u8>::with_capacity(len);
    let mut got = 0usize;
    while got < len {
        // SAFETY: the spare capacity of `data` from `got` on (`len - got` bytes, all owned by
        // `data` and referred to by nothing else); the kernel only writes into it.
        let n = unsafe {
            libc::pread(
                std::os::fd::AsRawFd::as_raw_fd(mem),
                data.as_mut_ptr().add(got).cast(),
                len - got,
                (addr + got as u64) as libc::off_t,
            )
        };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        got = (got + n).min(len);
    }
    // SAFETY: the kernel wrote the first `got` bytes of the capacity (the reads' return values,
    // one after the other), so they are initialized; `got <= len <= capacity`.
    unsafe { data.set_len(got) };
    data
}

/// Reads up to `len` bytes at `addr` of process `pid` with `process_vm_readv` (one copy, pages
/// pinned in batches), like [`read_mem`] otherwise. Only for pages the process maps alone: since
/// Linux 5.19 a read-only pin of an anonymous page that a `fork` shares copy-on-write gives the
/// process its own copy first (QA: a parent and three forked workers sharing 32 MiB went from 33
/// to 129 MiB during a presync, and a container with a memory limit was OOM-killed). A page
/// mapped once is taken over in place instead (`wp_can_reuse_anon_folio`).
pub(super) fn read_pinned(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::<u8>::with_capacity(len);
    let local = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` is the `len` bytes of capacity `data` owns, which nothing else refers to;
    // the kernel only writes into it (at most `len` bytes). `remote` names memory of the other
    // process, which the kernel checks and reads on its side.
    let got = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    let got = usize::try_from(got).unwrap_or(0).min(len);
    // SAFETY: the kernel wrote the first `got` bytes of the capacity (its return value), so
    // they are initialized; `got <= len <= capacity`.
    unsafe { data.set_len(got) };
    data
}
