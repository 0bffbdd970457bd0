//! Presync files turned into pages images when pages appeared, went or changed since the
//! presync: the image is always the pages the stream names, in order, whatever the shift, the
//! segment sizes and the room for saved pages.

use super::super::{Limits, PageWriter, PageWriterError, FIRST_PAGES_ID, PAGE_SIZE};
use crate::memsync::images::ImagesWriter;
use crate::memsync::{dst_id, SEG_CACHED};
use std::path::Path;
use std::sync::Arc;

const OPEN2: u32 = 4;
const ADD_F: u32 = 6;
const FORCE_CLOSE: u32 = 0x1024;
const PRESENT: u32 = 1 << 2;
const PAGE: u64 = PAGE_SIZE;

fn cmd(raw: u32, nr_pages: u64, vaddr: u64) -> Vec<u8> {
    let mut c = vec![0u8; 32];
    c[..4].copy_from_slice(&raw.to_le_bytes());
    c[8..16].copy_from_slice(&nr_pages.to_le_bytes());
    c[16..24].copy_from_slice(&vaddr.to_le_bytes());
    c[24..32].copy_from_slice(&dst_id(7).to_le_bytes());
    c
}

/// The bytes of the page at `vaddr`, the presync's (`version` 0) or a changed one.
fn content(vaddr: u64, version: u8) -> Vec<u8> {
    let mut p = vec![version ^ (vaddr >> 12) as u8; PAGE as usize];
    p[..8].copy_from_slice(&vaddr.to_le_bytes());
    p[8] = version;
    p
}

/// A page of the dump: the presync's (`held`) or one sent with its bytes.
#[derive(Clone, Copy)]
struct Page {
    vaddr: u64,
    held: bool,
}

/// The presync of `vaddrs` (rising) in runs of at most 256 pages, as the presync writes them.
fn presync(dir: &Path, vaddrs: &[u64]) -> Arc<crate::memsync::PresyncImages> {
    let mut w = ImagesWriter::new(dir, 1 << 40);
    let mut i = 0;
    while i < vaddrs.len() {
        let mut n = 1;
        while i + n < vaddrs.len() && n < 256 && vaddrs[i + n] == vaddrs[i] + n as u64 * PAGE {
            n += 1;
        }
        let data: Vec<u8> = (0..n).flat_map(|k| content(vaddrs[i + k], 0)).collect();
        w.add(dst_id(7), vaddrs[i], &data).unwrap();
        i += n;
    }
    Arc::new(w.finish())
}

/// The deduplicated stream of `pages` (rising): one add per `add_max` contiguous pages, each
/// add's pages in segments of at most `seg_max` pages of one kind.
fn stream(pages: &[Page], add_max: usize, seg_max: usize) -> Vec<u8> {
    let mut s = cmd(OPEN2, 0, 0);
    let mut i = 0;
    while i < pages.len() {
        let mut n = 1;
        while i + n < pages.len()
            && n < add_max
            && pages[i + n].vaddr == pages[i].vaddr + n as u64 * PAGE
        {
            n += 1;
        }
        s.extend(cmd(ADD_F | (PRESENT << 16), n as u64, pages[i].vaddr));
        let add = &pages[i..i + n];
        let mut j = 0;
        while j < add.len() {
            let held = add[j].held;
            let k = add[j..]
                .iter()
                .take(seg_max)
                .take_while(|p| p.held == held)
                .count();
            let word = k as u32 | if held { SEG_CACHED } else { 0 };
            s.extend_from_slice(&word.to_le_bytes());
            if !held {
                for p in &add[j..j + k] {
                    s.extend(content(p.vaddr, 1));
                }
            }
            j += k;
        }
        i += n;
    }
    s.extend(cmd(FORCE_CLOSE, 0, 0));
    s
}

/// The pages image the dump's stream of `pages` makes: their bytes in order.
fn expected(pages: &[Page]) -> Vec<u8> {
    pages
        .iter()
        .flat_map(|p| content(p.vaddr, if p.held { 0 } else { 1 }))
        .collect()
}

/// Writes the stream of `pages` over the presync of `before`; returns the pages image and the
/// names of the files left in the directory.
fn write(
    before: &[u64],
    pages: &[Page],
    limits: Limits,
    seg_max: usize,
) -> Result<(Vec<u8>, Vec<String>), PageWriterError> {
    let dir = tempfile::tempdir().unwrap();
    let images = presync(dir.path(), before);
    let mut w = PageWriter::with_presync(dir.path(), limits, images);
    let mut reply = Vec::new();
    // Odd chunking: segment words and pages split across chunks.
    for chunk in stream(pages, 512, seg_max).chunks(40_000) {
        w.feed(&[chunk], &mut reply)?;
    }
    w.finish()?;
    let image = std::fs::read(dir.path().join(format!("pages-{FIRST_PAGES_ID}.img"))).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok((image, names))
}

/// Checks that the stream of `pages` over the presync of `before` writes the pages image of
/// `pages`, with every segment size and room for saved pages in `saved_max`.
fn check(name: &str, before: &[u64], pages: &[Page], saved_max: &[usize]) {
    let want = expected(pages);
    for &seg_max in &[256, 37, 1] {
        for &max in saved_max {
            let limits = Limits {
                max_saved_pages: max,
                ..Limits::default()
            };
            let (image, names) = write(before, pages, limits, seg_max)
                .unwrap_or_else(|e| panic!("{name} (segments {seg_max}, saved {max}): {e}"));
            let first_bad = image
                .chunks(PAGE as usize)
                .zip(want.chunks(PAGE as usize))
                .position(|(a, b)| a != b);
            assert!(
                image.len() == want.len() && first_bad.is_none(),
                "{name} (segments {seg_max}, saved {max}): {} pages, {} wanted, first wrong \
                 page {first_bad:?}",
                image.len() as u64 / PAGE,
                want.len() as u64 / PAGE
            );
            assert_eq!(
                names,
                [
                    "pagemap-7.img".to_string(),
                    format!("pages-{FIRST_PAGES_ID}.img")
                ],
                "{name}"
            );
        }
    }
}

const BASE: u64 = 0x7f00_0000_0000;

fn at(i: u64) -> u64 {
    BASE + i * PAGE
}

/// `n` presync pages from `BASE`, without those at `holes`.
fn presync_pages(n: u64, holes: &[u64]) -> Vec<u64> {
    (0..n).filter(|i| !holes.contains(i)).map(at).collect()
}

/// The dump's pages: `before`'s less `gone`, plus `new` (sent), with `changed` sent.
fn dump(before: &[u64], gone: &[u64], new: &[u64], changed: &[u64]) -> Vec<Page> {
    let mut pages: Vec<Page> = before
        .iter()
        .filter(|v| !gone.contains(v))
        .map(|&vaddr| Page {
            vaddr,
            held: !changed.contains(&vaddr),
        })
        .chain(new.iter().map(|&vaddr| Page { vaddr, held: false }))
        .collect();
    pages.sort_by_key(|p| p.vaddr);
    pages
}

/// Several sizes of room for saved pages: none, a little, about the shift, plenty.
const SAVED: &[usize] = &[0, 1, 2, 3, 4, 5, 8, 300, 16_384];

#[test]
fn a_page_below_shifts_every_page_up_by_one() {
    let before = presync_pages(1000, &[]);
    // Changed pages split the shifted runs, and one at a run's end.
    let changed = [
        at(100),
        at(255),
        at(256),
        at(400),
        at(401),
        at(402),
        at(999),
    ];
    let pages = dump(&before, &[], &[BASE - 16 * PAGE], &changed);
    check("+1", &before, &pages, SAVED);
}

#[test]
fn a_page_gone_first_shifts_every_page_down_by_one() {
    let before = presync_pages(1000, &[]);
    let changed = [at(1), at(300), at(511), at(512), at(998)];
    let pages = dump(&before, &[at(0)], &[], &changed);
    check("-1", &before, &pages, SAVED);
}

#[test]
fn shifts_that_end_leave_the_pages_after_them_in_place() {
    // A page new below, one gone at 300, one new in the presync's hole at 700: pages 0-299
    // shifted up by one, 301-699 in place, the pages after 700 shifted again (by one place
    // down in the presync file). Then one gone at 200 and one new in a hole at 800: pages
    // 201-799 shifted, the rest in place.
    let before = presync_pages(1200, &[700]);
    let changed = [at(5), at(350), at(600), at(1100)];
    let up = dump(&before, &[at(300)], &[BASE - PAGE, at(700)], &changed);
    check("+1 then in place", &before, &up, SAVED);
    let before = presync_pages(1200, &[800]);
    let down = dump(&before, &[at(200)], &[at(800)], &changed);
    check("-1 then in place", &before, &down, SAVED);
}

#[test]
fn shifts_by_several_pages_both_ways() {
    let before = presync_pages(900, &[]);
    let changed = [at(10), at(260), at(261), at(700)];
    let new: Vec<u64> = (1..=3).map(|i| BASE - i * PAGE).collect();
    let up = dump(&before, &[], &new, &changed);
    check("+3", &before, &up, SAVED);
    let down = dump(&before, &[at(0), at(1), at(2)], &[], &changed);
    check("-3", &before, &down, SAVED);
    // 300 new pages below: the data's own saving goes by chunks too.
    let new: Vec<u64> = (1..=300).map(|i| BASE - i * PAGE).collect();
    let far = dump(&before, &[], &new, &changed);
    check("+300", &before, &far, &[299, 300, 301, 16_384]);
}

/// More pages appeared than the writer keeps copies of: the image continues in a new file and
/// the presync file goes (`check` sees only the two images).
#[test]
fn a_shift_past_the_saved_pages_continues_in_a_new_file() {
    let before = presync_pages(700, &[]);
    let new: Vec<u64> = (1..=100).map(|i| BASE - i * PAGE).collect();
    let pages = dump(&before, &[], &new, &[at(3), at(400)]);
    check("+100", &before, &pages, &[0, 1, 50, 99, 100]);
    // Pages gone first, then many new ones in a hole: in place, then shifted up far.
    let before = presync_pages(700, &[300, 301, 302, 303, 304, 305, 306, 307]);
    let gone: Vec<u64> = (0..5).map(at).collect();
    let new: Vec<u64> = (300..308).map(at).collect();
    let pages = dump(&before, &gone, &new, &[at(100)]);
    check("-5, +3", &before, &pages, &[0, 2, 3, 4, 300]);
}

#[test]
fn a_held_page_the_presync_lacks_fails_at_its_address() {
    let before = presync_pages(600, &[]);
    let mut pages = dump(&before, &[], &[BASE - PAGE], &[]);
    // A held page past the presync's last, after a long shifted run.
    pages.push(Page {
        vaddr: at(600),
        held: true,
    });
    for max in [0, 3, 16_384] {
        let limits = Limits {
            max_saved_pages: max,
            ..Limits::default()
        };
        for seg_max in [256, 1] {
            let e = write(&before, &pages, limits, seg_max).unwrap_err();
            assert!(
                matches!(e, PageWriterError::NotCached { vaddr, .. } if vaddr == at(600)),
                "{e}"
            );
        }
    }
}

/// A stream that goes back to pages it passed (a dump never does): their places are
/// overwritten and their copies dropped, so it fails at the first of them.
#[test]
fn a_stream_that_goes_back_fails_at_the_first_page_it_lost() {
    let before = presync_pages(600, &[]);
    let mut pages = dump(&before, &[], &[BASE - PAGE], &[]);
    pages.extend((10..20).map(|i| Page {
        vaddr: at(i),
        held: true,
    }));
    let dir = tempfile::tempdir().unwrap();
    let images = presync(dir.path(), &before);
    let mut w = PageWriter::with_presync(dir.path(), Limits::default(), images);
    // One add per page: the rising check of a single add does not apply.
    let s = stream(&pages, 1, 256);
    let e = w.feed(&[&s], &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, PageWriterError::NotCached { vaddr, .. } if vaddr == at(10)),
        "{e}"
    );
}

/// How long the writer takes to turn a presync file of `MIG_PW_BENCH_MIB` MiB (default 1024)
/// under `MIG_PW_BENCH_DIR` (default /var/tmp) into the pages image when one page appeared below
/// the others (every page shifts up by one), and when the first went (down by one). Prints,
/// asserts nothing about time. Run in release:
/// `cargo test --release -p mig-migrate --lib shifted_image_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn shifted_image_timing() {
    let mib: u64 = std::env::var("MIG_PW_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let base = std::env::var("MIG_PW_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let before: Vec<u64> = (0..mib * 256).map(at).collect();
    for (name, gone, new) in [
        ("up", vec![], vec![BASE - 16 * PAGE]),
        ("down", vec![at(0)], vec![]),
    ] {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let images = presync(dir.path(), &before);
        let pages = dump(&before, &gone, &new, &[]);
        let s = stream(&pages, 512, 256);
        let mut w = PageWriter::with_presync(dir.path(), Limits::default(), images);
        let mut reply = Vec::new();
        let t = std::time::Instant::now();
        for chunk in s.chunks(1 << 20) {
            w.feed(&[chunk], &mut reply).unwrap();
        }
        w.finish().unwrap();
        let took = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "shifted {name} by one page: {mib} MiB in {took:.1} ms ({:.1} ms per GiB)",
            took * 1024.0 / mib as f64
        );
        let image = std::fs::read(dir.path().join(format!("pages-{FIRST_PAGES_ID}.img"))).unwrap();
        assert!(image == expected(&pages), "wrong image");
    }
}
