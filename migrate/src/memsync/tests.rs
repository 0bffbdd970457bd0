use super::dedup::{encode, DedupStats};
use super::images::ImagesWriter;
use super::*;
use crate::criu::page_writer::{Limits, PageWriter, PageWriterError};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const OPEN2: u32 = 4;
const ADD_F: u32 = 6;
const FORCE_CLOSE: u32 = 0x1024;
const PRESENT: u32 = 1 << 2;

fn cmd(raw: u32, nr_pages: u64, vaddr: u64, dst: u64) -> Vec<u8> {
    let mut c = vec![0u8; 32];
    c[..4].copy_from_slice(&raw.to_le_bytes());
    c[8..16].copy_from_slice(&nr_pages.to_le_bytes());
    c[16..24].copy_from_slice(&vaddr.to_le_bytes());
    c[24..32].copy_from_slice(&dst.to_le_bytes());
    c
}

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A dump's page stream: one process (image id 7), one add per run (`pages` at an address),
/// then the close.
fn criu_stream_of(runs: &[(u64, &[Vec<u8>])]) -> Vec<u8> {
    let dst = dst_id(7);
    let mut s = cmd(OPEN2, 0, 0, dst);
    for (vaddr, pages) in runs {
        s.extend(cmd(
            ADD_F | (PRESENT << 16),
            pages.len() as u64,
            *vaddr,
            dst,
        ));
        for p in *pages {
            s.extend_from_slice(p);
        }
    }
    s.extend(cmd(FORCE_CLOSE, 0, 0, 0));
    s
}

/// [`criu_stream_of`] with one run.
fn criu_stream(vaddr: u64, pages: &[Vec<u8>]) -> Vec<u8> {
    criu_stream_of(&[(vaddr, pages)])
}

fn run_encode(stream: &[u8], index: &SentIndex) -> (Vec<u8>, DedupStats) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let stats = DedupStats::default();
    encode(stream, index, &tx, &stats).unwrap();
    drop(tx);
    let mut out = Vec::new();
    while let Ok(batch) = rx.try_recv() {
        for b in batch {
            out.extend_from_slice(&b);
        }
    }
    (out, stats)
}

fn write_all(mut w: PageWriter, stream: &[u8]) -> Result<(), PageWriterError> {
    let mut reply = Vec::new();
    // Odd chunking: segment words and pages split across chunks.
    for chunk in stream.chunks(1000) {
        w.feed(&[chunk], &mut reply)?;
    }
    w.finish().map(|_| ())
}

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The destination's presync files of `runs` (image id 7), written into `dir`.
fn presync(dir: &std::path::Path, runs: &[(u64, &[Vec<u8>])]) -> Arc<PresyncImages> {
    let mut w = ImagesWriter::new(dir, 1 << 30);
    for (vaddr, pages) in runs {
        w.add(dst_id(7), *vaddr, &pages.concat()).unwrap();
    }
    Arc::new(w.finish())
}

fn index_of(runs: &[(u64, &[Vec<u8>])]) -> SentIndex {
    let mut index = SentIndex::default();
    for (vaddr, pages) in runs {
        let digests = pages.iter().map(|p| index.hash(p)).collect();
        index.insert(dst_id(7), *vaddr, digests);
    }
    index
}

/// Writes `stream` plainly and `encoded` with `presync` into two directories; both must hold
/// the same files (the presync files gone).
fn same_images(
    stream: &[u8],
    encoded: &[u8],
    dedup: &std::path::Path,
    presync: Arc<PresyncImages>,
) {
    let plain = tempfile::tempdir().unwrap();
    write_all(PageWriter::new(plain.path(), Limits::default()), stream).unwrap();
    write_all(
        PageWriter::with_presync(dedup, Limits::default(), presync),
        encoded,
    )
    .unwrap();
    assert_eq!(files(plain.path()), files(dedup));
}

#[test]
fn unchanged_pages_stay_in_the_presync_file_and_the_images_are_those_of_the_plain_stream() {
    let vaddr = 0x7f00_0000_0000;
    let before: Vec<Vec<u8>> = (0..8).map(page).collect();
    let mut after = before.clone();
    after[2] = page(100);
    after[3] = page(101);
    after[7] = page(102);
    let dir = tempfile::tempdir().unwrap();
    let runs: [(u64, &[Vec<u8>]); 1] = [(vaddr, &before)];
    let images = presync(dir.path(), &runs);
    let stream = criu_stream(vaddr, &after);
    let (encoded, stats) = run_encode(&stream, &index_of(&runs));
    assert_eq!(stats.pages_reused.load(Ordering::Relaxed), 5);
    assert_eq!(stats.pages_sent.load(Ordering::Relaxed), 3);
    assert!(encoded.len() < stream.len() - 4 * PAGE);
    same_images(&stream, &encoded, dir.path(), images);
}

#[test]
fn pages_that_went_and_came_shift_the_layout() {
    let base = 0x10_0000u64;
    let at = |i: u64| base + i * PAGE as u64;
    let before: Vec<Vec<u8>> = (0..8).map(page).collect();
    // The presync had pages 0-7; at the freeze page 1 is gone, 4 changed and a page 20 came.
    let dir = tempfile::tempdir().unwrap();
    let runs: [(u64, &[Vec<u8>]); 1] = [(base, &before)];
    let images = presync(dir.path(), &runs);
    let mut middle = before[2..8].to_vec();
    middle[2] = page(200);
    let stream = criu_stream_of(&[
        (at(0), &before[..1]),
        (at(2), &middle),
        (at(20), &[page(201)]),
    ]);
    let (encoded, stats) = run_encode(&stream, &index_of(&runs));
    assert_eq!(stats.pages_reused.load(Ordering::Relaxed), 6);
    assert_eq!(stats.pages_sent.load(Ordering::Relaxed), 2);
    same_images(&stream, &encoded, dir.path(), images);
}

#[test]
fn a_page_that_appeared_first_shifts_the_others_until_one_went() {
    let base = 0x20_0000u64;
    let at = |i: u64| base + i * PAGE as u64;
    let before: Vec<Vec<u8>> = (0..10).map(page).collect();
    let dir = tempfile::tempdir().unwrap();
    let runs: [(u64, &[Vec<u8>]); 1] = [(base, &before)];
    let images = presync(dir.path(), &runs);
    // Two new pages below the others, page 3 changed, pages 5 and 6 gone: pages 7-9 are back in
    // their places.
    let mut first = before[..5].to_vec();
    first[3] = page(92);
    let stream = criu_stream_of(&[
        (base - 2 * PAGE as u64, &[page(90), page(91)]),
        (at(0), &first),
        (at(7), &before[7..]),
    ]);
    let (encoded, stats) = run_encode(&stream, &index_of(&runs));
    assert_eq!(stats.pages_reused.load(Ordering::Relaxed), 7);
    assert_eq!(stats.pages_sent.load(Ordering::Relaxed), 3);
    same_images(&stream, &encoded, dir.path(), images);
}

/// More pages appeared below the others than the writer keeps copies of: the image continues
/// in a new file, and is still the plain stream's.
#[test]
fn a_long_shift_continues_in_a_new_file() {
    let base = 0x50_0000u64;
    let at = |i: u64| base + i * PAGE as u64;
    let before: Vec<Vec<u8>> = (0..12).map(page).collect();
    let dir = tempfile::tempdir().unwrap();
    let runs: [(u64, &[Vec<u8>]); 1] = [(base, &before)];
    let images = presync(dir.path(), &runs);
    let new: Vec<Vec<u8>> = (0..5).map(|i| page(150 + i)).collect();
    let mut rest = before.clone();
    rest[8] = page(170);
    let stream = criu_stream_of(&[(base - 5 * PAGE as u64, &new), (at(0), &rest)]);
    let (encoded, stats) = run_encode(&stream, &index_of(&runs));
    assert_eq!(stats.pages_reused.load(Ordering::Relaxed), 11);
    let plain = tempfile::tempdir().unwrap();
    write_all(PageWriter::new(plain.path(), Limits::default()), &stream).unwrap();
    let small = Limits {
        max_saved_pages: 2,
        ..Limits::default()
    };
    write_all(
        PageWriter::with_presync(dir.path(), small, images),
        &encoded,
    )
    .unwrap();
    assert_eq!(files(plain.path()), files(dir.path()));
}

#[test]
fn a_process_that_grew_and_one_that_exited() {
    let base = 0x40_0000u64;
    let before: Vec<Vec<u8>> = (0..4).map(page).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut w = ImagesWriter::new(dir.path(), 1 << 30);
    w.add(dst_id(7), base, &before.concat()).unwrap();
    // Process 9 exited before the freeze: its file goes at the end.
    w.add(dst_id(9), base, &before.concat()).unwrap();
    let images = Arc::new(w.finish());
    let mut after = before.clone();
    after.push(page(50));
    let stream = criu_stream(base, &after);
    let runs: [(u64, &[Vec<u8>]); 1] = [(base, &before)];
    let (encoded, stats) = run_encode(&stream, &index_of(&runs));
    assert_eq!(stats.pages_reused.load(Ordering::Relaxed), 4);
    same_images(&stream, &encoded, dir.path(), images);
}

#[test]
fn without_a_presync_every_page_travels() {
    let stream = criu_stream(0x1000, &[page(1), page(2)]);
    let (encoded, stats) = run_encode(&stream, &SentIndex::default());
    assert_eq!(stats.pages_reused.load(Ordering::Relaxed), 0);
    assert_eq!(stats.pages_sent.load(Ordering::Relaxed), 2);
    let dir = tempfile::tempdir().unwrap();
    same_images(&stream, &encoded, dir.path(), Arc::default());
}

#[test]
fn a_marker_for_a_page_the_destination_lacks_fails() {
    let vaddr = 0x10_0000;
    let p = vec![page(9)];
    let runs: [(u64, &[Vec<u8>]); 1] = [(vaddr, &p)];
    let (encoded, _) = run_encode(&criu_stream(vaddr, &p), &index_of(&runs));
    let dir = tempfile::tempdir().unwrap();
    let e = write_all(
        PageWriter::with_presync(dir.path(), Limits::default(), Arc::default()),
        &encoded,
    )
    .unwrap_err();
    assert!(
        matches!(e, PageWriterError::NotCached { vaddr: v, .. } if v == vaddr),
        "{e}"
    );
}

#[test]
fn segments_that_do_not_cover_the_add_fail() {
    let dst = dst_id(7);
    let dir = tempfile::tempdir().unwrap();
    let mut s = cmd(OPEN2, 0, 0, dst);
    s.extend(cmd(ADD_F | (PRESENT << 16), 2, 0x1000, dst));
    // 3 pages of data announced for an add of 2.
    s.extend_from_slice(&3u32.to_le_bytes());
    let e = write_all(
        PageWriter::with_presync(dir.path(), Limits::default(), Arc::default()),
        &s,
    )
    .unwrap_err();
    assert!(
        matches!(e, PageWriterError::Segment { word: 3, left: 2 }),
        "{e}"
    );
    // A stream cut inside the segments is incomplete.
    let mut s = cmd(OPEN2, 0, 0, dst);
    s.extend(cmd(ADD_F | (PRESENT << 16), 2, 0x1000, dst));
    s.extend_from_slice(&1u32.to_le_bytes());
    s.extend_from_slice(&page(1));
    let e = write_all(
        PageWriter::with_presync(dir.path(), Limits::default(), Arc::default()),
        &s,
    )
    .unwrap_err();
    assert!(matches!(e, PageWriterError::TruncatedPages { .. }), "{e}");
}

#[test]
fn a_dump_stream_cut_inside_its_pages_is_an_error() {
    let mut stream = criu_stream(0x1000, &[page(1), page(2)]);
    stream.truncate(64 + PAGE + 10);
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    let e = encode(
        &stream[..],
        &SentIndex::default(),
        &tx,
        &DedupStats::default(),
    )
    .unwrap_err();
    assert!(matches!(e, MemsyncError::DumpTruncated), "{e}");
}

#[test]
fn presync_files_refuse_bad_unordered_and_overlapping_runs_and_their_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ImagesWriter::new(dir.path(), 4 * PAGE as u64);
    let d = dst_id(1);
    assert!(w.add(d, 0x1001, &[0; PAGE]).is_err());
    assert!(w.add(d, 0x1000, &[0; 100]).is_err());
    assert!(w.add(d, !0xfff, &[0; PAGE]).is_err());
    w.add(d, 0x2000, &[1; 2 * PAGE]).unwrap();
    assert!(matches!(
        w.add(d, 0x3000, &[0; PAGE]),
        Err(MemsyncError::Overlap { .. })
    ));
    assert!(matches!(
        w.add(d, 0x1000, &[0; PAGE]),
        Err(MemsyncError::Overlap { .. })
    ));
    w.add(d, 0x9000, &[3; PAGE]).unwrap();
    // Another process may use the same addresses; the first one cannot come back.
    w.add(dst_id(2), 0x2000, &[2; PAGE]).unwrap();
    assert!(matches!(
        w.add(dst_id(3), 0x9000, &[0; 2 * PAGE]),
        Err(MemsyncError::TooMuch { .. })
    ));
    assert!(matches!(
        w.add(d, 0xa000, &[0; 1]),
        Err(MemsyncError::BadRun { .. })
    ));
    assert!(matches!(
        w.add(d, 0xa000, &[0; PAGE]),
        Err(MemsyncError::TooMuch { .. })
    ));
    let mut w2 = ImagesWriter::new(dir.path(), 1 << 20);
    assert!(matches!(
        w2.add(2 << 8 | 2, 0x1000, &[0; PAGE]),
        Err(MemsyncError::BadImage { .. })
    ));
    w2.add(dst_id(5), 0x1000, &[0; PAGE]).unwrap();
    w2.add(dst_id(6), 0x1000, &[0; PAGE]).unwrap();
    assert!(matches!(
        w2.add(dst_id(5), 0x2000, &[0; PAGE]),
        Err(MemsyncError::BadImage { .. })
    ));
    w2.discard();
    let images = w.finish();
    assert_eq!(images.pages(), 4);
    let l = images.take(d).unwrap();
    assert_eq!(l.pages(), 3);
    assert_eq!(
        (l.vaddr_at(0), l.vaddr_at(1), l.vaddr_at(2), l.vaddr_at(3)),
        (Some(0x2000), Some(0x3000), Some(0x9000), None)
    );
    assert_eq!(
        (
            l.position_of(0x3000),
            l.position_of(0x9000),
            l.position_of(0x4000)
        ),
        (Some(1), Some(2), None)
    );
    assert_eq!(
        std::fs::read(&l.path).unwrap(),
        [vec![1u8; 2 * PAGE], vec![3u8; PAGE]].concat()
    );
    assert!(images.take(d).is_none());
    images.remove_rest();
    assert!(!dir
        .path()
        .join(super::images::file_name(dst_id(2)))
        .exists());
}

/// Mangled streams (bytes flipped, cut short, garbage) end in an error or a whole write, never
/// a panic, on both sides.
#[test]
fn mangled_streams_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let base = 0x30_0000u64;
    let before: Vec<Vec<u8>> = (0..6).map(page).collect();
    let runs: [(u64, &[Vec<u8>]); 1] = [(base, &before)];
    let mut after = before.clone();
    after[1] = page(60);
    let stream = criu_stream(base, &after);
    let (encoded, _) = run_encode(&stream, &index_of(&runs));
    for i in 0..300 {
        let mut s = if i % 2 == 0 {
            encoded.clone()
        } else {
            stream.clone()
        };
        match i % 3 {
            0 => {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..s.len());
                    s[at] = rng.gen();
                }
            }
            1 => s.truncate(rng.gen_range(0..s.len())),
            _ => s = (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect(),
        }
        let dir = tempfile::tempdir().unwrap();
        let images = presync(dir.path(), &runs);
        let _ = write_all(
            PageWriter::with_presync(dir.path(), Limits::default(), images),
            &s,
        );
        let (tx, _rx) = tokio::sync::mpsc::channel(4096);
        let _ = encode(&s[..], &index_of(&runs), &tx, &DedupStats::default());
    }
}

/// A presync file holds exactly its pages, in order, whatever chunks they arrived in.
#[test]
fn presync_files_are_exactly_their_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ImagesWriter::new(dir.path(), 7 * PAGE as u64);
    let (a, b, c) = (page(1), page(2), page(3));
    w.add_parts(dst_id(7), 0x1000, &[&a[..100], &a[100..], &b[..]])
        .unwrap();
    w.add(dst_id(7), 0x8000, &c).unwrap();
    w.add_parts(dst_id(9), 0x1000, &[&b[..], &a[..]]).unwrap();
    w.add(dst_id(11), 0x4000, &[c.clone(), b.clone()].concat())
        .unwrap();
    let images = w.finish();
    for (id, pages) in [
        (7, [&a[..], &b, &c].concat()),
        (9, [&b[..], &a].concat()),
        (11, [&c[..], &b].concat()),
    ] {
        let l = images.take(dst_id(id)).unwrap();
        let file = std::fs::read(&l.path).unwrap();
        assert_eq!(file, pages, "process {id}");
        assert_eq!(l.pages() as usize * PAGE, file.len());
    }
}
