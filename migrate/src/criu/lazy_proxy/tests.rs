//! The proxy between an in-process fake source (answers `PS_IOV_GET` from made-up memory,
//! short answers included, and fails as CRIU does on a request for pages it does not hold) and a
//! fake daemon (ordered requests, faults anywhere, re-requests after short answers, EOF and
//! malformed input).

use super::*;
use crate::criu::protobuf::{put_entry, put_varint_field, IMG_COMMON_MAGIC};
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::thread::JoinHandle;

const P: u64 = PAGE_SIZE;

/// The content of the page at `vaddr` of `dst_id`.
fn page(dst_id: u64, vaddr: u64) -> Vec<u8> {
    let mut b = vec![(vaddr / P) as u8 ^ dst_id as u8; P as usize];
    b[..8].copy_from_slice(&dst_id.to_le_bytes());
    b[8..16].copy_from_slice(&vaddr.to_le_bytes());
    b
}

fn iov(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; PS_IOV_SIZE] {
    Iov {
        cmd,
        nr_pages,
        vaddr,
        dst_id,
    }
    .bytes()
}

/// What the fake source saw.
#[derive(Debug, Default)]
struct Seen {
    /// (dst_id, vaddr, pages answered).
    answered: Vec<(u64, u64, u64)>,
    closed: bool,
    /// Why it stopped early, as CRIU would log.
    failed: Option<String>,
}

/// A source serving `runs` (dst_id -> [(start, end)]; an answer stops at the end of a run, as
/// CRIU's page pipe does) with at most `max_answer` pages per answer.
fn fake_source(mut s: UnixStream, runs: Vec<(u64, u64, u64)>, max_answer: u64) -> JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        loop {
            let head = match read_iov(&mut s) {
                Ok(Ok(Some(h))) => h,
                _ => {
                    seen.failed = Some("the stream ended".into());
                    return seen;
                }
            };
            match head.cmd {
                PS_IOV_GET => {
                    let run = runs
                        .iter()
                        .find(|(d, s, e)| *d == head.dst_id && *s <= head.vaddr && head.vaddr < *e);
                    let Some(&(_, _, end)) = run else {
                        seen.failed = Some(format!("no pages at {:#x}", head.vaddr));
                        return seen;
                    };
                    let n = head.nr_pages.min((end - head.vaddr) / P).min(max_answer);
                    let mut out = iov(ANSWER_CMD, n, head.vaddr, head.dst_id).to_vec();
                    for i in 0..n {
                        out.extend(page(head.dst_id, head.vaddr + i * P));
                    }
                    if s.write_all(&out).is_err() {
                        seen.failed = Some("cannot answer".into());
                        return seen;
                    }
                    seen.answered.push((head.dst_id, head.vaddr, n));
                }
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                    let _ = s.write_all(&0i32.to_le_bytes());
                    seen.closed = true;
                    return seen;
                }
                cmd => {
                    seen.failed = Some(format!("unknown command {cmd:#x}"));
                    return seen;
                }
            }
        }
    })
}

/// Reads one answer of the proxy and checks its pages; returns the pages answered.
fn read_answer(d: &mut UnixStream, dst_id: u64, vaddr: u64, nr_pages: u64) -> u64 {
    let head = read_iov(d).unwrap().unwrap().unwrap();
    assert_eq!(head.cmd, ANSWER_CMD);
    assert_eq!((head.dst_id, head.vaddr), (dst_id, vaddr));
    assert!(head.nr_pages >= 1 && head.nr_pages <= nr_pages, "{head:?}");
    let mut data = vec![0u8; (head.nr_pages * P) as usize];
    d.read_exact(&mut data).unwrap();
    for i in 0..head.nr_pages {
        let at = (i * P) as usize;
        assert!(
            data[at..at + P as usize] == page(dst_id, vaddr + i * P)[..],
            "wrong page {:#x} of {dst_id}",
            vaddr + i * P
        );
    }
    head.nr_pages
}

/// Asks for `[vaddr, vaddr + n pages)` until all of it arrived (short answers re-asked).
fn get_all(d: &mut UnixStream, dst_id: u64, mut vaddr: u64, mut n: u64) {
    while n > 0 {
        d.write_all(&iov(PS_IOV_GET, n, vaddr, dst_id)).unwrap();
        let got = read_answer(d, dst_id, vaddr, n);
        vaddr += got * P;
        n -= got;
    }
}

fn close(d: &mut UnixStream) {
    d.write_all(&iov(PS_IOV_FORCE_CLOSE, 0, 0, 0)).unwrap();
    let mut status = [0xffu8; 4];
    d.read_exact(&mut status).unwrap();
    assert_eq!(status, [0; 4]);
}

struct Rig {
    daemon: UnixStream,
    proxy: JoinHandle<Result<Summary, LazyProxyError>>,
    source: JoinHandle<Seen>,
}

fn rig(runs: &[(u64, u64, u64)], max_answer: u64, limits: Limits) -> Rig {
    let mut map = LazyMap::default();
    for &(d, s, e) in runs {
        map.add(d, s, (e - s) / P).unwrap();
    }
    let (daemon, proxy_d) = UnixStream::pair().unwrap();
    let (proxy_s, source_s) = UnixStream::pair().unwrap();
    let source = fake_source(source_s, runs.to_vec(), max_answer);
    let proxy = std::thread::spawn(move || run(proxy_d, proxy_s, map, limits));
    Rig {
        daemon,
        proxy,
        source,
    }
}

/// Two processes, runs of several sizes, adjacent runs included (the map merges them, the
/// source still stops at each).
fn runs() -> Vec<(u64, u64, u64)> {
    vec![
        (1, 0x40_0000, 0x40_0000 + 300 * P),
        (1, 0x40_0000 + 300 * P, 0x40_0000 + 700 * P),
        (1, 0x7f00_0000, 0x7f00_0000 + 5 * P),
        (7, 0x1000, 0x1000 + 1500 * P),
    ]
}

fn small_limits() -> Limits {
    Limits {
        chunk_bytes: 64 * P,
        window_bytes: 256 * P,
        cache_bytes: 1024 * P,
        ..Limits::default()
    }
}

/// Every page answered by the source, at most once (no range asked twice).
fn pages_once(seen: &Seen) -> BTreeSet<(u64, u64)> {
    let mut all = BTreeSet::new();
    for &(d, v, n) in &seen.answered {
        for i in 0..n {
            assert!(
                all.insert((d, v + i * P)),
                "page {:#x} of {d} asked twice",
                v + i * P
            );
        }
    }
    all
}

fn every_page(runs: &[(u64, u64, u64)]) -> BTreeSet<(u64, u64)> {
    runs.iter()
        .flat_map(|&(d, s, e)| (s..e).step_by(P as usize).map(move |v| (d, v)))
        .collect()
}

/// The daemon's background walk in 16-page steps with random faults in between; every page
/// arrives right, each once from the source, and the close reaches the source after the rest.
fn walk_with_faults(max_answer: u64, seed: u64) {
    let runs = runs();
    let Rig {
        mut daemon,
        proxy,
        source,
    } = rig(&runs, max_answer, small_limits());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut taken = BTreeSet::new();
    for &(d, s, e) in &runs {
        let mut v = s;
        while v < e {
            if rng.gen_bool(0.3) {
                // A fault anywhere not taken yet: one page, as the daemon asks on a fault.
                let &(fd, fs, fe) = &runs[rng.gen_range(0..runs.len())];
                let fv = fs + rng.gen_range(0..(fe - fs) / P) * P;
                if taken.insert((fd, fv)) {
                    get_all(&mut daemon, fd, fv, 1);
                }
            }
            // The background request stops before a page already taken, as the daemon's
            // lazy ranges do.
            let mut n = 0;
            while n < 16 && v + n * P < e && !taken.contains(&(d, v + n * P)) {
                n += 1;
            }
            if n > 0 {
                get_all(&mut daemon, d, v, n);
                for i in 0..n {
                    taken.insert((d, v + i * P));
                }
            }
            v += n.max(1) * P;
        }
    }
    assert_eq!(taken, every_page(&runs));
    close(&mut daemon);
    let summary = proxy.join().unwrap().unwrap();
    let seen = source.join().unwrap();
    assert!(seen.closed && seen.failed.is_none(), "{seen:?}");
    assert_eq!(pages_once(&seen), every_page(&runs));
    assert_eq!(summary.lazy_bytes, every_page(&runs).len() as u64 * P);
    assert_eq!(summary.daemon_bytes, summary.lazy_bytes);
    assert_eq!(summary.source_bytes, summary.lazy_bytes);
}

#[test]
fn a_walk_with_faults_gets_every_page_once() {
    for seed in 0..4 {
        walk_with_faults(u64::MAX, seed);
    }
}

#[test]
fn short_answers_of_the_source_are_asked_again() {
    for seed in 0..3 {
        walk_with_faults(3, seed);
    }
}

#[test]
fn faults_before_the_prefetch_get_there_are_forwarded() {
    let runs = runs();
    let Rig {
        mut daemon,
        proxy,
        source,
    } = rig(&runs, u64::MAX, small_limits());
    // The last pages first, far ahead of the prefetch, then everything back to front.
    let mut all: Vec<(u64, u64)> = every_page(&runs).into_iter().collect();
    all.reverse();
    for (d, v) in all {
        get_all(&mut daemon, d, v, 1);
    }
    close(&mut daemon);
    let summary = proxy.join().unwrap().unwrap();
    let seen = source.join().unwrap();
    assert!(seen.closed && seen.failed.is_none(), "{seen:?}");
    assert_eq!(pages_once(&seen), every_page(&runs));
    assert!(summary.forwarded >= 1, "{summary:?}");
}

#[test]
fn pipelined_requests_are_answered_in_their_order() {
    let runs = runs();
    let Rig {
        mut daemon,
        proxy,
        source,
    } = rig(&runs, u64::MAX, small_limits());
    // Many requests at once, overlapping what is on its way, each 1 to 40 pages.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut asked = Vec::new();
    let (d, s, e) = runs[3];
    let mut v = e;
    while v > s {
        let n = rng.gen_range(1..=40u64).min((v - s) / P);
        v -= n * P;
        asked.push((v, n));
    }
    let mut w = daemon.try_clone().unwrap();
    let reqs = asked.clone();
    let writer = std::thread::spawn(move || {
        for (v, n) in reqs {
            w.write_all(&iov(PS_IOV_GET, n, v, d)).unwrap();
        }
    });
    let mut rest = Vec::new();
    for (v, n) in asked {
        let got = read_answer(&mut daemon, d, v, n);
        if got < n {
            rest.push((v + got * P, n - got));
        }
    }
    writer.join().unwrap();
    for (v, n) in rest {
        get_all(&mut daemon, d, v, n);
    }
    for &(d, s, e) in &runs[..3] {
        get_all(&mut daemon, d, s, (e - s) / P);
    }
    close(&mut daemon);
    proxy.join().unwrap().unwrap();
    let seen = source.join().unwrap();
    assert_eq!(pages_once(&seen), every_page(&runs));
}

#[test]
fn pages_asked_again_go_to_the_source_again() {
    // A forked child's daemon asks for pages its parent took already.
    let runs = vec![(3, 0x10_0000, 0x10_0000 + 8 * P)];
    let Rig {
        mut daemon,
        proxy,
        source,
    } = rig(&runs, u64::MAX, small_limits());
    get_all(&mut daemon, 3, 0x10_0000, 8);
    get_all(&mut daemon, 3, 0x10_0000 + 2 * P, 3);
    close(&mut daemon);
    proxy.join().unwrap().unwrap();
    let seen = source.join().unwrap();
    assert!(seen.closed && seen.failed.is_none(), "{seen:?}");
    assert_eq!(seen.answered.last(), Some(&(3, 0x10_0000 + 2 * P, 3)));
}

#[test]
fn the_prefetch_stays_within_the_cache() {
    let runs = vec![(1, 0, 4096 * P)];
    let limits = small_limits();
    let Rig {
        mut daemon,
        proxy,
        source,
    } = rig(&runs, u64::MAX, limits);
    // The daemon takes one page, then nothing for a while: the prefetch fills the cache and
    // stops.
    get_all(&mut daemon, 1, 0, 1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    close(&mut daemon);
    proxy.join().unwrap().unwrap();
    let seen = source.join().unwrap();
    let served: u64 = seen.answered.iter().map(|a| a.2 * P).sum();
    // What the cache holds, and the one page the daemon took.
    assert!(
        served <= limits.cache_bytes + P,
        "{served} bytes prefetched"
    );
    assert!(
        served >= limits.cache_bytes / 2,
        "{served} bytes prefetched"
    );
    assert!(seen.closed, "{seen:?}");
}

/// Runs the proxy with the daemon's side written by `daemon_side`; returns the proxy's error.
fn failing(daemon_side: impl FnOnce(&mut UnixStream), max_answer: u64) -> LazyProxyError {
    let runs = vec![(1, 0x1000, 0x1000 + 64 * P)];
    let Rig {
        mut daemon,
        proxy,
        source,
    } = rig(&runs, max_answer, small_limits());
    daemon_side(&mut daemon);
    let err = proxy.join().unwrap().unwrap_err();
    // The daemon sees its page server gone, which makes it fail.
    let mut rest = Vec::new();
    let _ = daemon.read_to_end(&mut rest);
    let _ = source.join().unwrap();
    err
}

#[test]
fn a_malformed_daemon_command_ends_the_proxy() {
    let e = failing(
        |d| d.write_all(&iov(PS_IOV_ADD_F, 1, 0x1000, 1)).unwrap(),
        64,
    );
    assert!(matches!(e, LazyProxyError::DaemonCommand { cmd: 6 }), "{e}");
    let e = failing(|d| d.write_all(&iov(PS_IOV_GET, 1, 0x1001, 1)).unwrap(), 64);
    assert!(matches!(e, LazyProxyError::DaemonRequest { .. }), "{e}");
    let e = failing(|d| d.write_all(&iov(PS_IOV_GET, 0, 0x1000, 1)).unwrap(), 64);
    assert!(matches!(e, LazyProxyError::DaemonRequest { .. }), "{e}");
    let e = failing(|d| d.write_all(&iov(PS_IOV_GET, 1, 0x1000, 2)).unwrap(), 64);
    assert!(
        matches!(e, LazyProxyError::UnknownProcess { dst_id: 2 }),
        "{e}"
    );
    let e = failing(
        |d| {
            d.write_all(&iov(PS_IOV_GET, 1, 0x1000, 1)[..20]).unwrap();
            d.shutdown(Shutdown::Write).unwrap();
        },
        64,
    );
    assert!(
        matches!(e, LazyProxyError::DaemonTruncated { have: 20 }),
        "{e}"
    );
}

#[test]
fn the_daemon_gone_without_close_ends_the_proxy() {
    let e = failing(
        |d| {
            get_all(d, 1, 0x1000, 4);
            d.shutdown(Shutdown::Write).unwrap();
        },
        64,
    );
    assert!(matches!(e, LazyProxyError::DaemonEof), "{e}");
}

/// A proxy over one lazy range of 4 pages at 0x1000 of process 1, whose daemon asked for all of
/// them and whose source was asked for them (checked); the test plays the source's answer.
fn one_get_forwarded() -> (
    UnixStream,
    UnixStream,
    JoinHandle<Result<Summary, LazyProxyError>>,
) {
    let mut map = LazyMap::default();
    map.add(1, 0x1000, 4).unwrap();
    let (mut daemon, proxy_d) = UnixStream::pair().unwrap();
    let (proxy_s, mut source_s) = UnixStream::pair().unwrap();
    let proxy = std::thread::spawn(move || run(proxy_d, proxy_s, map, small_limits()));
    daemon.write_all(&iov(PS_IOV_GET, 4, 0x1000, 1)).unwrap();
    let head = read_iov(&mut source_s).unwrap().unwrap().unwrap();
    assert_eq!(
        (head.cmd, head.vaddr, head.nr_pages),
        (PS_IOV_GET, 0x1000, 4)
    );
    (daemon, source_s, proxy)
}

#[test]
fn a_source_that_fails_ends_the_proxy() {
    // A source that asks back with a wrong header.
    let (mut daemon, mut source_s, proxy) = one_get_forwarded();
    source_s.write_all(&iov(ANSWER_CMD, 5, 0x1000, 1)).unwrap();
    let e = proxy.join().unwrap().unwrap_err();
    assert!(
        matches!(e, LazyProxyError::SourceAnswer { got_pages: 5, .. }),
        "{e}"
    );
    let mut rest = Vec::new();
    assert_eq!(daemon.read_to_end(&mut rest).unwrap(), 0);

    // A source that ends in the middle of its pages.
    let (_daemon, mut source_s, proxy) = one_get_forwarded();
    source_s.write_all(&iov(ANSWER_CMD, 4, 0x1000, 1)).unwrap();
    source_s.write_all(&page(1, 0x1000)).unwrap();
    drop(source_s);
    let e = proxy.join().unwrap().unwrap_err();
    assert!(
        matches!(e, LazyProxyError::SourceEof { what: "page data" }),
        "{e}"
    );

    // A page the source does not hold (0 pages): CRIU's source stops serving. The proxy meets
    // that on its next read, or on its next request when that write comes first (EPIPE).
    let e = failing(
        |d| d.write_all(&iov(PS_IOV_GET, 1, 0x20_0000, 1)).unwrap(),
        64,
    );
    assert!(
        matches!(
            e,
            LazyProxyError::SourceEof { .. }
                | LazyProxyError::ReadSource(_)
                | LazyProxyError::WriteSource(_)
        ),
        "{e}"
    );
}

/// A pagemap image as CRIU writes it: head, then entries (vaddr, nr_pages, flags).
fn pagemap_image(list: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut img = Vec::new();
    img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    img.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let mut head = Vec::new();
    put_varint_field(&mut head, 1, 0x10001);
    put_entry(&mut img, &head).unwrap();
    for &(vaddr, nr, flags) in list {
        let mut m = Vec::new();
        put_varint_field(&mut m, 1, vaddr);
        put_varint_field(&mut m, 2, 0);
        put_varint_field(&mut m, 4, u64::from(flags));
        put_varint_field(&mut m, 5, nr);
        put_entry(&mut img, &m).unwrap();
    }
    img
}

#[test]
fn lazy_ranges_are_read_from_the_pagemap_images() {
    let dir = tempfile::tempdir().unwrap();
    let lazy = PE_LAZY | PE_PRESENT;
    std::fs::write(
        dir.path().join("pagemap-1.img"),
        pagemap_image(&[
            (0x40_0000, 4, PE_PRESENT),
            (0x50_0000, 2, lazy),
            (0x50_2000, 3, lazy),
            (0x7f00_0000, 1, PE_LAZY),
        ]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pagemap-12.img"),
        pagemap_image(&[(0x1000, 9, lazy)]),
    )
    .unwrap();
    // Not process pagemaps: skipped.
    std::fs::write(dir.path().join("pagemap-shmem-5.img"), b"x").unwrap();
    std::fs::write(dir.path().join("pages-1.img"), b"x").unwrap();
    let map = read_lazy_map(dir.path()).unwrap();
    let mut want = LazyMap::default();
    want.add(1, 0x50_0000, 5).unwrap();
    want.add(1, 0x7f00_0000, 1).unwrap();
    want.add(12, 0x1000, 9).unwrap();
    assert_eq!(map, want);
    assert_eq!(map.processes(), 2);
    assert_eq!(map.bytes(), 15 * P);

    std::fs::write(
        dir.path().join("pagemap-2.img"),
        pagemap_image(&[(0x1001, 1, lazy)]),
    )
    .unwrap();
    assert!(matches!(
        read_lazy_map(dir.path()),
        Err(LazyProxyError::BadImage { .. })
    ));
    std::fs::write(dir.path().join("pagemap-2.img"), b"\x19\x43\x56\x54junk").unwrap();
    assert!(matches!(
        read_lazy_map(dir.path()),
        Err(LazyProxyError::BadImage { .. })
    ));
}

#[test]
fn an_image_sets_memory_is_every_page_its_pagemaps_list() {
    let dir = tempfile::tempdir().unwrap();
    let lazy = PE_LAZY | PE_PRESENT;
    std::fs::write(
        dir.path().join("pagemap-1.img"),
        pagemap_image(&[(0x40_0000, 4, PE_PRESENT), (0x50_0000, 2, lazy)]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pagemap-12.img"),
        pagemap_image(&[(0x1000, 9, lazy)]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pagemap-shmem-77.img"),
        pagemap_image(&[(0, 16, PE_PRESENT)]),
    )
    .unwrap();
    // Not pagemaps: left alone.
    std::fs::write(dir.path().join("pages-1.img"), b"x").unwrap();
    std::fs::write(dir.path().join("pagemap-x.img"), b"x").unwrap();
    assert_eq!(pagemap_bytes(dir.path()).unwrap(), (4 + 2 + 9 + 16) * P);
    std::fs::write(
        dir.path().join("pagemap-shmem-78.img"),
        b"\x19\x43\x56\x54junk",
    )
    .unwrap();
    assert!(matches!(
        pagemap_bytes(dir.path()),
        Err(LazyProxyError::BadImage { .. })
    ));
}

/// A pstree image: (pid, ppid) entries.
fn pstree_image(list: &[(u64, u64)]) -> Vec<u8> {
    let mut img = Vec::new();
    img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    img.extend_from_slice(&0x5027_3030u32.to_le_bytes());
    for &(pid, ppid) in list {
        let mut m = Vec::new();
        put_varint_field(&mut m, 1, pid);
        put_varint_field(&mut m, 2, ppid);
        put_entry(&mut img, &m).unwrap();
    }
    img
}

#[test]
fn memory_forked_processes_may_share_is_where_child_and_parent_both_have_pages() {
    let dir = tempfile::tempdir().unwrap();
    // No pstree (not a dump): nothing shared.
    assert_eq!(forked_overlap_bytes(dir.path()).unwrap(), 0);
    std::fs::write(
        dir.path().join("pstree.img"),
        pstree_image(&[(1, 0), (7, 1), (9, 1), (12, 7)]),
    )
    .unwrap();
    let lazy = PE_LAZY | PE_PRESENT;
    // The parent: 16 pages of heap, 2 of stack.
    std::fs::write(
        dir.path().join("pagemap-1.img"),
        pagemap_image(&[(0x40_0000, 16, PE_PRESENT), (0x7f00_0000, 2, PE_PRESENT)]),
    )
    .unwrap();
    // A forked child with 10 of the heap's pages (lazy or not) and its own stack page.
    std::fs::write(
        dir.path().join("pagemap-7.img"),
        pagemap_image(&[(0x40_6000, 10, lazy), (0x7f00_1000, 1, PE_PRESENT)]),
    )
    .unwrap();
    // A child that exec'd: other addresses.
    std::fs::write(
        dir.path().join("pagemap-9.img"),
        pagemap_image(&[(0x1000, 30, PE_PRESENT)]),
    )
    .unwrap();
    // A grandchild sharing 3 pages with 7.
    std::fs::write(
        dir.path().join("pagemap-12.img"),
        pagemap_image(&[(0x40_0000, 9, PE_PRESENT)]),
    )
    .unwrap();
    assert_eq!(forked_overlap_bytes(dir.path()).unwrap(), (10 + 1 + 3) * P);
}
