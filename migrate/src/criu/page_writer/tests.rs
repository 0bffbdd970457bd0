//! The page writer on made-up streams: the images it writes, every chunking, and each way a
//! stream can be wrong.

use super::*;
use crate::criu::protobuf::{entries, Fields, Value};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("mig-pw-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cmd(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(PS_IOV_SIZE);
    b.extend_from_slice(&cmd.to_le_bytes());
    b.extend_from_slice(&[0xAA; 4]);
    b.extend_from_slice(&nr_pages.to_le_bytes());
    b.extend_from_slice(&vaddr.to_le_bytes());
    b.extend_from_slice(&dst_id.to_le_bytes());
    b
}

fn pid(id: u64) -> u64 {
    id << 8 | 1
}

fn add_f(flags: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
    cmd(flags << 16 | PS_IOV_ADD_F, nr_pages, vaddr, dst_id)
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE as usize]
}

/// Open pid 42 (present 2 pages, a hole), shmem 7 (one page by the old ADD), force close.
fn sample() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend(cmd(PS_IOV_OPEN2, 0, 0, pid(42)));
    s.extend(add_f(PE_PRESENT, 2, 0x40_0000, pid(42)));
    s.extend(page(1));
    s.extend(page(2));
    s.extend(add_f(PE_PARENT, 5, 0x50_0000, pid(42)));
    s.extend(cmd(PS_IOV_PARENT, 0, 0, pid(42)));
    s.extend(cmd(PS_IOV_OPEN, 0, 0, 7 << 8 | 2));
    s.extend(cmd(PS_IOV_ADD, 1, 0x1000, 7 << 8 | 2));
    s.extend(page(3));
    s.extend(cmd(PS_IOV_FORCE_CLOSE, 0, 0, 0));
    s
}

/// (pages_id, [(vaddr, compat, flags, nr_pages)]) of a pagemap image.
fn read_pagemap(path: &Path) -> (u64, Vec<[u64; 4]>) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(&data[..4], &IMG_COMMON_MAGIC.to_le_bytes());
    let e = entries(&data, PAGEMAP_MAGIC).unwrap();
    let varints = |m: &[u8]| -> Vec<(u64, u64)> {
        Fields::new(m, 0)
            .map(|f| match f.unwrap() {
                (n, Value::Varint(v)) => (n, v),
                (n, Value::Bytes(_)) => panic!("field {n} is bytes"),
            })
            .collect()
    };
    let head = varints(e[0]);
    assert_eq!(head.len(), 1);
    let list = e[1..]
        .iter()
        .map(|m| {
            let f = varints(m);
            let nums: Vec<u64> = f.iter().map(|(n, _)| *n).collect();
            assert_eq!(nums, [1, 2, 4, 5]);
            [f[0].1, f[1].1, f[2].1, f[3].1]
        })
        .collect();
    (head[0].1, list)
}

fn check_sample(dir: &Path) {
    let (id, list) = read_pagemap(&dir.join("pagemap-42.img"));
    assert_eq!(id, u64::from(FIRST_PAGES_ID));
    assert_eq!(
        list,
        vec![
            [0x40_0000, 0, u64::from(PE_PRESENT), 2],
            [0x50_0000, 0, u64::from(PE_PARENT), 5]
        ]
    );
    let pages = std::fs::read(dir.join(format!("pages-{FIRST_PAGES_ID}.img"))).unwrap();
    assert_eq!(pages, [page(1), page(2)].concat());
    let (id, list) = read_pagemap(&dir.join("pagemap-shmem-7.img"));
    assert_eq!(id, u64::from(FIRST_PAGES_ID) + 1);
    assert_eq!(list, vec![[0x1000, 0, u64::from(PE_PRESENT), 1]]);
    let pages = std::fs::read(dir.join(format!("pages-{}.img", FIRST_PAGES_ID + 1))).unwrap();
    assert_eq!(pages, page(3));
}

fn run(
    dir: &Path,
    chunks: &[&[u8]],
    limits: Limits,
) -> (Result<Summary, PageWriterError>, Vec<u8>) {
    let mut w = PageWriter::new(dir, limits);
    let mut reply = Vec::new();
    for c in chunks {
        if let Err(e) = w.feed(&[c], &mut reply) {
            return (Err(e), reply);
        }
    }
    (w.finish(), reply)
}

#[test]
fn writes_what_the_stream_says_in_any_chunking() {
    let s = sample();
    for size in [1, 7, 31, 32, 33, 4096, 5000, s.len()] {
        let d = Dir::new(&format!("chunks{size}"));
        let chunks: Vec<&[u8]> = s.chunks(size).collect();
        let (r, reply) = run(&d.0, &chunks, Limits::default());
        let summary = r.unwrap();
        assert_eq!(
            summary,
            Summary {
                images: 2,
                entries: 3,
                page_bytes: 3 * PAGE_SIZE
            }
        );
        // OPEN2's parent byte, PARENT's int, the close's status.
        assert_eq!(reply, [0, 0, 0, 0, 0, 0, 0, 0, 0]);
        check_sample(&d.0);
    }
}

#[test]
fn many_chunks_in_one_feed() {
    let d = Dir::new("onefeed");
    let s = sample();
    let chunks: Vec<&[u8]> = s.chunks(100).collect();
    let mut w = PageWriter::new(&d.0, Limits::default());
    let mut reply = Vec::new();
    assert!(w.feed(&chunks, &mut reply).unwrap());
    w.finish().unwrap();
    check_sample(&d.0);
}

#[test]
fn serves_a_socket() {
    let d = Dir::new("serve");
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let s = sample();
    let peer = std::thread::spawn(move || {
        a.write_all(&s).unwrap();
        let mut got = [0u8; 9];
        a.read_exact(&mut got).unwrap();
        got
    });
    let summary = serve(&mut b, &d.0, Limits::default()).unwrap();
    assert_eq!(summary.entries, 3);
    assert_eq!(peer.join().unwrap(), [0; 9]);
    check_sample(&d.0);
}

fn fails(name: &str, stream: &[u8], limits: Limits) -> PageWriterError {
    let d = Dir::new(name);
    match run(&d.0, &[stream], limits).0 {
        Ok(s) => panic!("{name}: accepted: {s:?}"),
        Err(e) => e,
    }
}

#[test]
fn truncated_streams_are_refused() {
    let s = sample();
    let e = fails("trunc-cmd", &s[..PS_IOV_SIZE + 10], Limits::default());
    assert!(
        matches!(e, PageWriterError::TruncatedCommand { have: 10 }),
        "{e}"
    );
    let e = fails(
        "trunc-pages",
        &s[..2 * PS_IOV_SIZE + 100],
        Limits::default(),
    );
    assert!(
        matches!(e, PageWriterError::TruncatedPages { missing } if missing == 2 * PAGE_SIZE - 100),
        "{e}"
    );
    let close_at = s.len() - PS_IOV_SIZE;
    let e = fails("no-close", &s[..close_at], Limits::default());
    assert!(matches!(e, PageWriterError::NotFlushed), "{e}");
    let e = fails("empty", &[], Limits::default());
    assert!(matches!(e, PageWriterError::NotFlushed), "{e}");
    let mut after = s.clone();
    after.extend_from_slice(b"more");
    let e = fails("after-close", &after, Limits::default());
    assert!(matches!(e, PageWriterError::AfterClose { bytes: 4 }), "{e}");
}

#[test]
fn oversized_counts_are_refused() {
    let open = cmd(PS_IOV_OPEN2, 0, 0, pid(1));
    let big = [open.clone(), add_f(PE_PRESENT, u64::MAX, 0, pid(1))].concat();
    let e = fails("nr-max", &big, Limits::default());
    assert!(matches!(e, PageWriterError::TooManyPages { .. }), "{e}");
    let wrap = [open.clone(), add_f(PE_PARENT, 16, u64::MAX - 4096, pid(1))].concat();
    let e = fails("wrap", &wrap, Limits::default());
    assert!(matches!(e, PageWriterError::AddressOverflow { .. }), "{e}");
    let small = Limits {
        max_bytes: 2 * PAGE_SIZE,
        max_pages_per_add: 4,
        max_entries: 2,
        max_opens: 2,
        max_saved_pages: 1,
    };
    let bytes = [open.clone(), add_f(PE_PRESENT, 3, 0, pid(1))].concat();
    let e = fails("bytes", &bytes, small);
    assert!(matches!(e, PageWriterError::TooManyBytes { .. }), "{e}");
    let hole = add_f(PE_PARENT, 1, 0, pid(1));
    let entries = [open.clone(), hole.clone(), hole.clone(), hole].concat();
    let e = fails("entries", &entries, small);
    assert!(
        matches!(e, PageWriterError::TooManyEntries { max: 2 }),
        "{e}"
    );
    let opens = [open.clone(), open.clone(), open].concat();
    let e = fails("opens", &opens, small);
    assert!(matches!(e, PageWriterError::TooManyOpens { max: 2 }), "{e}");
}

#[test]
fn unknown_commands_types_and_flags_are_refused() {
    let e = fails("unknown", &cmd(0x99, 0, 0, pid(1)), Limits::default());
    assert!(
        matches!(e, PageWriterError::UnknownCommand { cmd: 0x99 }),
        "{e}"
    );
    let e = fails("get", &cmd(PS_IOV_GET, 1, 0, pid(1)), Limits::default());
    assert!(matches!(e, PageWriterError::Get), "{e}");
    let e = fails(
        "type",
        &cmd(PS_IOV_OPEN2, 0, 0, 5 << 8 | 9),
        Limits::default(),
    );
    assert!(matches!(e, PageWriterError::UnknownImageType { .. }), "{e}");
    let e = fails("flags", &add_f(0x80, 1, 0, pid(1)), Limits::default());
    assert!(matches!(e, PageWriterError::Flags { flags: 0x80 }), "{e}");
}

#[test]
fn garbage_ends_in_an_error_not_a_panic() {
    // A fixed pseudo-random sequence (xorshift), in several lengths.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut garbage = Vec::with_capacity(1 << 16);
    for _ in 0..(1 << 13) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        garbage.extend_from_slice(&x.to_le_bytes());
    }
    for len in [5, 32, 100, 4096, garbage.len()] {
        let d = Dir::new(&format!("garbage{len}"));
        assert!(run(&d.0, &[&garbage[..len]], Limits::default()).0.is_err());
    }
}

#[test]
fn a_sink_nobody_used_says_so() {
    let d = Dir::new("sink");
    let (sink, wait) = PageSink::new(&d.0, Limits::default());
    drop(sink);
    assert!(matches!(
        wait.wait_timeout(Duration::from_secs(1)),
        Err(PageWriterError::NeverRan)
    ));
    let (sink, wait) = PageSink::new(&d.0, Limits::default());
    sink.report(Ok(Summary::default()));
    assert_eq!(
        wait.wait_timeout(Duration::from_secs(1)).unwrap(),
        Summary::default()
    );
}
