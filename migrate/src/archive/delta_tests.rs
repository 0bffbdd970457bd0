//! The writable-layer delta: what changed since the presync scan, applied on top of the presync
//! copy, gives the same tree as the layer now.

use super::delta::*;
use super::unpack_layer_tar;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Every entry under `dir`: (relative path, type and mode, content or link target).
fn tree(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let data = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                if m.is_dir() {
                    stack.push(p.clone());
                }
                Vec::new()
            };
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            out.push((rel, m.mode(), data));
        }
    }
    out.sort();
    out
}

#[test]
fn delta_on_top_of_presync_gives_the_layer() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("keep/sub")).unwrap();
    std::fs::create_dir_all(src.join("gone/deep")).unwrap();
    std::fs::write(src.join("big"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(src.join("small"), b"one").unwrap();
    std::fs::write(src.join("gone/deep/f"), b"x").unwrap();
    std::fs::write(src.join("keep/sub/f"), b"y").unwrap();
    std::fs::write(src.join("becomes-dir"), b"z").unwrap();
    std::os::unix::fs::symlink("small", src.join("link")).unwrap();

    let mut presync = Vec::new();
    let scan = write_layer_tar_scanned(&src, &mut presync).unwrap();
    assert!(scan.contains(Path::new("keep/sub/f")));
    std::fs::create_dir_all(&dst).unwrap();
    unpack_layer_tar(&mut &presync[..], &dst).unwrap();

    // Changes while "running".
    std::fs::write(src.join("small"), b"two").unwrap();
    std::fs::remove_dir_all(src.join("gone")).unwrap();
    std::fs::write(src.join("new"), b"new").unwrap();
    std::fs::remove_file(src.join("becomes-dir")).unwrap();
    std::fs::create_dir(src.join("becomes-dir")).unwrap();
    std::fs::write(src.join("becomes-dir/in"), b"in").unwrap();
    std::fs::remove_file(src.join("link")).unwrap();
    std::os::unix::fs::symlink("new", src.join("link")).unwrap();
    std::fs::set_permissions(
        src.join("keep/sub/f"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let mut delta = Vec::new();
    let stats = write_layer_delta(&src, &scan, &mut delta, true).unwrap();
    assert_eq!(stats.deleted, 1, "only the top of a deleted tree is listed");
    assert!(
        delta.len() < presync.len() / 10,
        "the big file was sent again"
    );
    let applied = apply_layer_delta(&mut &delta[..], &dst).unwrap();
    assert_eq!(applied.deleted, 1);
    assert_eq!(tree(&src), tree(&dst));
}

#[test]
fn delta_refuses_escapes() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(t.path().join("victim"), b"v").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let list = b"../victim\0";
    let mut h = tar::Header::new_gnu();
    h.set_size(list.len() as u64);
    h.set_mode(0o600);
    b.append_data(&mut h, DELETED, &list[..]).unwrap();
    let tar = b.into_inner().unwrap();
    assert!(apply_layer_delta(&mut &tar[..], &dst).is_err());
    assert!(t.path().join("victim").exists());
    // A tar without the deletion list first is not a delta.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o600);
    b.append_data(&mut h, "x", &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    assert!(apply_layer_delta(&mut &tar[..], &dst).is_err());
}

/// A file that only grew since the presync goes as its new bytes (protocol 1.6); one written
/// before its old end, truncated and grown again, or with several links goes whole; the
/// destination appends only to a copy of the size the entry names.
#[test]
fn grown_files_go_by_their_new_bytes() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("var/log")).unwrap();
    let block: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for f in [
        "var/log/app.log",
        "rewritten",
        "regrown",
        "linked",
        "empty",
        "holey",
    ] {
        let data = if f == "empty" { &[][..] } else { &block[..] };
        std::fs::write(src.join(f), data).unwrap();
    }
    std::fs::hard_link(src.join("linked"), src.join("linked2")).unwrap();
    let mut presync = Vec::new();
    let scan = write_layer_tar_scanned(&src, &mut presync).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    unpack_layer_tar(&mut &presync[..], &dst).unwrap();

    let append = |f: &str, data: &[u8]| {
        let mut h = std::fs::OpenOptions::new()
            .append(true)
            .open(src.join(f))
            .unwrap();
        h.write_all(data).unwrap();
    };
    append("var/log/app.log", b"a new line\n");
    append("empty", b"first line\n");
    // Written before its old end, then grown.
    {
        use std::os::unix::fs::FileExt;
        let h = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("rewritten"))
            .unwrap();
        h.write_all_at(b"XX", 10).unwrap();
    }
    append("rewritten", b"more");
    // Truncated and grown past its old size: same inode, other bytes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("regrown"))
        .unwrap()
        .set_len(5)
        .unwrap();
    append("regrown", &vec![9u8; 300_000]);
    append("linked", b"tail");
    // Grown by a hole and a few bytes: it goes whole, as a sparse entry, its hole kept (QA of
    // session 24: appended, the hole crossed as 3 GiB of zeros).
    {
        let h = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("holey"))
            .unwrap();
        h.set_len(200_000 + (64 << 20)).unwrap();
    }
    append("holey", b"end");
    std::fs::set_permissions(
        src.join("var/log/app.log"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();

    // A 1.5 destination: every changed file whole.
    let mut whole = Vec::new();
    let stats = write_layer_delta(&src, &scan, &mut whole, false).unwrap();
    assert_eq!(stats.appended, 0);
    let mut delta = Vec::new();
    let stats = write_layer_delta(&src, &scan, &mut delta, true).unwrap();
    assert_eq!(stats.appended, 2, "{stats:?}");
    assert!(
        whole.len() - delta.len() >= 190_000,
        "the log went whole: {} against {}",
        delta.len(),
        whole.len()
    );
    // The destination's copy of the log is not the presync's: refused, nothing appended.
    let other = t.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    unpack_layer_tar(&mut &presync[..], &other).unwrap();
    std::fs::write(other.join("var/log/app.log"), b"short").unwrap();
    let err = apply_layer_delta(&mut &delta[..], &other).unwrap_err();
    assert!(
        crate::transport::chain(&err).contains("the presync's copy differs"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(other.join("var/log/app.log")).unwrap(),
        b"short"
    );
    // An append entry is refused outside a delta (an export, a presync).
    let lone = t.path().join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    assert!(unpack_layer_tar(&mut &delta[..], &lone).is_err());

    apply_layer_delta(&mut &delta[..], &dst).unwrap();
    assert_eq!(tree(&src), tree(&dst));
    let holey = std::fs::metadata(dst.join("holey")).unwrap();
    assert!(holey.blocks() * 512 < 4 << 20, "{} blocks", holey.blocks());
    let a = std::fs::metadata(src.join("var/log/app.log")).unwrap();
    let b = std::fs::metadata(dst.join("var/log/app.log")).unwrap();
    assert_eq!(
        (a.mode(), a.uid(), a.mtime()),
        (b.mode(), b.uid(), b.mtime())
    );
}

/// A store through a shared mapping to a page already dirty leaves the file's times as they
/// were (QA of session 25: a moved database file lost its last writes). A file the source
/// forgets goes whole, or is deleted when it is gone.
#[test]
fn forgotten_files_go_whole() {
    use std::os::fd::AsRawFd;
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("mapped"), vec![1u8; 8192]).unwrap();
    std::fs::write(src.join("dropped"), b"old").unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(src.join("mapped"))
        .unwrap();
    // SAFETY: a fresh shared mapping of a file of this test, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let page = map.cast::<u8>();
    // SAFETY: within the 8192 bytes mapped.
    unsafe { page.write_volatile(2) };
    let mut presync = Vec::new();
    let mut scan = write_layer_tar_scanned(&src, &mut presync).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    unpack_layer_tar(&mut &presync[..], &dst).unwrap();
    // SAFETY: as above.
    unsafe { page.add(1).write_volatile(3) };
    std::fs::remove_file(src.join("dropped")).unwrap();
    scan.forget(std::path::Path::new("mapped"));
    scan.forget(std::path::Path::new("dropped"));
    scan.forget(std::path::Path::new("never-seen"));
    let mut delta = Vec::new();
    let stats = write_layer_delta(&src, &scan, &mut delta, true).unwrap();
    // SAFETY: mapped above, not used after.
    assert_eq!(unsafe { libc::munmap(map, 8192) }, 0);
    assert_eq!(
        (stats.changed, stats.appended, stats.deleted),
        (1, 0, 1),
        "{stats:?}"
    );
    assert_eq!(delta_file_bytes(&src, &scan, true).unwrap(), (8192, 0));
    apply_layer_delta(&mut &delta[..], &dst).unwrap();
    assert_eq!(tree(&src), tree(&dst));
    assert_eq!(&std::fs::read(dst.join("mapped")).unwrap()[..3], &[2, 3, 1]);
}

/// Modification times cross to the nanosecond, directories' too (set after their contents), in
/// the presync's tar and in a delta (QA of session 25: cut to whole seconds, and directories got
/// the time of the move).
#[test]
fn times_travel_to_the_nanosecond() {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"data").unwrap();
    std::os::unix::fs::symlink("d/f", src.join("l")).unwrap();
    let stamp = |p: &Path, s: i64, ns: i64| {
        let at = TimeSpec::new(s, ns);
        utimensat(None, p, &at, &at, UtimensatFlags::NoFollowSymlink).unwrap();
    };
    stamp(&src.join("d/f"), 1_700_000_000, 123_456_789);
    stamp(&src.join("l"), 1_650_000_000, 7);
    stamp(&src.join("d"), 1_600_000_000, 999_999_999);
    let times = |root: &Path| -> Vec<(String, i64, i64)> {
        ["d", "d/f", "l"]
            .iter()
            .map(|p| {
                let m = std::fs::symlink_metadata(root.join(p)).unwrap();
                (p.to_string(), m.mtime(), m.mtime_nsec())
            })
            .collect()
    };
    let mut presync = Vec::new();
    let scan = write_layer_tar_scanned(&src, &mut presync).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    unpack_layer_tar(&mut &presync[..], &dst).unwrap();
    assert_eq!(times(&dst), times(&src));
    // Changed since: the delta carries the new times, the directory's set last.
    std::fs::write(src.join("d/g"), b"new").unwrap();
    stamp(&src.join("d/f"), 1_700_000_001, 1);
    stamp(&src.join("d"), 1_600_000_001, 2);
    let mut delta = Vec::new();
    write_layer_delta(&src, &scan, &mut delta, true).unwrap();
    apply_layer_delta(&mut &delta[..], &dst).unwrap();
    assert_eq!(times(&dst), times(&src));
}
