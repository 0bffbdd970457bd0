use super::*;
use crate::imageset::{seal, tests::sample_info};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A sealed image set and an upper directory with a file, a directory, a symlink and, as root,
/// a whiteout and an opaque directory.
fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let set = t.path().join("set");
    std::fs::create_dir(&set).unwrap();
    let pages: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(set.join("pages-1.img"), pages).unwrap();
    std::fs::write(set.join("core-1.img"), b"core").unwrap();
    std::fs::write(set.join("dump.log"), b"not exported").unwrap();
    seal(&set, sample_info()).unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("etc/app")).unwrap();
    std::fs::write(upper.join("etc/app/conf"), b"x=1\n").unwrap();
    std::os::unix::fs::symlink("app/conf", upper.join("etc/link")).unwrap();
    std::fs::hard_link(upper.join("etc/app/conf"), upper.join("etc/hard")).unwrap();
    if is_root() {
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .unwrap();
        std::fs::create_dir(upper.join("opaque")).unwrap();
        sys::lsetxattr(&upper.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
    }
    (t, set, upper)
}

/// An export leaves none of its temporary siblings (`.NAME.*`) in `dir`.
fn no_temporary_files(dir: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn round_trip_plain_and_zstd() {
    for zstd in [false, true] {
        let (t, set, upper) = fixture();
        let out = t.path().join("c.tar");
        let exported = export(&set, Some(&upper), &out, zstd).unwrap();
        assert!(exported.files.iter().any(|f| f.path == UPPER_TAR));
        let head = std::fs::read(&out).unwrap();
        assert_eq!(head[..4] == ZSTD_MAGIC, zstd);
        no_temporary_files(t.path());

        let dest = t.path().join("imported");
        let imported = import(&out, &dest).unwrap();
        assert_eq!(imported, exported);
        assert_eq!(
            std::fs::read(dest.join("pages-1.img")).unwrap(),
            std::fs::read(set.join("pages-1.img")).unwrap()
        );
        assert!(!dest.join("dump.log").exists());

        let new_upper = t.path().join("upper2");
        assert!(unpack_upper(&dest, &new_upper).unwrap());
        assert_eq!(
            std::fs::read(new_upper.join("etc/app/conf")).unwrap(),
            b"x=1\n"
        );
        assert_eq!(
            std::fs::read_link(new_upper.join("etc/link")).unwrap(),
            Path::new("app/conf")
        );
        let a = std::fs::metadata(new_upper.join("etc/app/conf")).unwrap();
        let h = std::fs::metadata(new_upper.join("etc/hard")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (h.ino(), 2), "hard link kept");
        if is_root() {
            let m = std::fs::symlink_metadata(new_upper.join("etc/gone")).unwrap();
            assert!(m.file_type().is_char_device() && m.rdev() == 0);
            assert_eq!(
                sys::lgetxattr(&new_upper.join("opaque"), "trusted.overlay.opaque").as_deref(),
                Some(&b"y"[..])
            );
        }
    }
}

/// CRIU opens some images of a `--userns` container after entering its user namespace, as its
/// mapped root (an unprivileged host id): imported images must be readable by others, like
/// those CRIU writes itself, whatever mode the archive's entries claim and whatever the umask;
/// writable by root only.
#[test]
fn imported_images_are_world_readable_not_writable() {
    let (t, set, upper) = fixture();
    let out = t.path().join("c.tar");
    export(&set, Some(&upper), &out, false).unwrap();
    let dest = t.path().join("imported");
    let manifest = import(&out, &dest).unwrap();
    assert!(!manifest.files.is_empty());
    for f in &manifest.files {
        let m = std::fs::metadata(dest.join(&f.path)).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o644, "{}", f.path);
    }
    let m = std::fs::metadata(dest.join(MANIFEST)).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o644);
}

#[test]
fn export_without_upper_and_refuses_an_invalid_set() {
    let (t, set, _) = fixture();
    let out = t.path().join("c.tar");
    let m = export(&set, None, &out, false).unwrap();
    assert!(!m.files.iter().any(|f| f.path == UPPER_TAR));
    let dest = t.path().join("d");
    import(&out, &dest).unwrap();
    assert!(!unpack_upper(&dest, &t.path().join("u")).unwrap());
    std::fs::write(set.join("core-1.img"), b"CORE").unwrap();
    assert!(matches!(
        export(&set, None, &t.path().join("bad.tar"), false),
        Err(ArchiveError::ImageSet { .. })
    ));
    assert!(!t.path().join("bad.tar").exists());
}

#[test]
fn corrupted_archives_are_refused_and_leave_nothing() {
    let (t, set, upper) = fixture();
    let out = t.path().join("c.tar");
    export(&set, Some(&upper), &out, false).unwrap();
    let good = std::fs::read(&out).unwrap();
    let dest = t.path().join("dest");
    // A flipped byte inside a file's data: the hash check names the file.
    let pos = good
        .windows(4)
        .position(|w| w == [7, 14, 21, 28])
        .expect("pages data in the tar");
    let mut bad = good.clone();
    bad[pos + 1000] ^= 0xff;
    std::fs::write(&out, &bad).unwrap();
    match import(&out, &dest) {
        Err(ArchiveError::Verify(ImageSetError::HashMismatch { path, .. })) => {
            assert_eq!(path, "pages-1.img")
        }
        other => panic!("{other:?}"),
    }
    assert!(!dest.exists());
    // Flipped header bytes and truncations at many points.
    for i in (0..good.len()).step_by(good.len() / 97 + 1) {
        let mut bad = good.clone();
        bad[i] ^= 0x55;
        std::fs::write(&out, &bad).unwrap();
        if import(&out, &dest).is_ok() {
            // A flip in padding or an unused header byte changes nothing that matters.
            std::fs::remove_dir_all(&dest).unwrap();
        }
        assert!(!dest.exists());
        std::fs::write(&out, &good[..i]).unwrap();
        assert!(import(&out, &dest).is_err(), "truncated at {i} accepted");
        assert!(!dest.exists());
    }
}

#[test]
fn truncated_zstd_archive_is_refused() {
    let (t, set, upper) = fixture();
    let out = t.path().join("c.tar.zst");
    export(&set, Some(&upper), &out, true).unwrap();
    let good = std::fs::read(&out).unwrap();
    let dest = t.path().join("dest");
    for cut in [4, good.len() / 3, good.len() / 2, good.len() - 1] {
        std::fs::write(&out, &good[..cut]).unwrap();
        assert!(import(&out, &dest).is_err(), "cut at {cut} accepted");
        assert!(!dest.exists());
    }
}

/// A tar whose single entry has raw name `name`, type `kind` and content `data`.
fn raw_tar(name: &[u8], kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    if kind == tar::EntryType::Symlink || kind == tar::EntryType::Link {
        h.set_link_name("/etc/passwd").unwrap();
    }
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, data).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn hostile_entries_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("evil.tar");
    let dest = t.path().join("dest");
    let cases: &[(&[u8], tar::EntryType)] = &[
        (b"../evil", tar::EntryType::Regular),
        (b"/etc/evil", tar::EntryType::Regular),
        (b"a/../../evil", tar::EntryType::Regular),
        (b"link", tar::EntryType::Symlink),
        (b"hard", tar::EntryType::Link),
        (b"fifo", tar::EntryType::Fifo),
        (b"dev", tar::EntryType::Char),
        (b"x.log", tar::EntryType::Regular),
    ];
    for (name, kind) in cases {
        std::fs::write(&out, raw_tar(name, *kind, b"boom")).unwrap();
        assert!(
            matches!(import(&out, &dest), Err(ArchiveError::Entry { .. })),
            "{:?} accepted",
            String::from_utf8_lossy(name)
        );
        assert!(!dest.exists());
    }
    assert!(!t.path().parent().unwrap().join("evil").exists());
    // An archive without a manifest is not a checkpoint.
    std::fs::write(&out, raw_tar(b"core-1.img", tar::EntryType::Regular, b"x")).unwrap();
    assert!(matches!(
        import(&out, &dest),
        Err(ArchiveError::NotCheckpoint { .. })
    ));
    assert!(!dest.exists());
    // Nor is a file of random bytes, and the error says so in words (it quoted binary).
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&out, noise).unwrap();
    let e = import(&out, &dest).unwrap_err();
    assert!(matches!(e, ArchiveError::NotCheckpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("not a tar archive"), "{e}");
    assert!(!dest.exists());
    // The same bytes compressed with zstd: said to be zstd, but no tar inside.
    let noise = std::fs::read(&out).unwrap();
    std::fs::write(&out, zstd::encode_all(&noise[..], 1).unwrap()).unwrap();
    let e = import(&out, &dest).unwrap_err();
    assert!(
        e.to_string()
            .contains("zstd-compressed, but not a tar archive"),
        "{e}"
    );
    assert!(!dest.exists());
}

#[test]
fn layer_unpack_refuses_escapes() {
    let t = tempfile::tempdir().unwrap();
    for name in [&b"../x"[..], b"/abs", b"a/.wh..."] {
        let tar = raw_tar(name, tar::EntryType::Regular, b"");
        let dest = t.path().join("u");
        std::fs::create_dir_all(&dest).unwrap();
        assert!(
            unpack_layer_tar(&mut &tar[..], &dest).is_err(),
            "{:?}",
            String::from_utf8_lossy(name)
        );
    }
    assert!(!t.path().join("x").exists());
    // A hard link to a host file (here /etc/passwd) must not be created.
    let tar = raw_tar(b"hard", tar::EntryType::Link, b"");
    let dest = t.path().join("u2");
    std::fs::create_dir_all(&dest).unwrap();
    assert!(unpack_layer_tar(&mut &tar[..], &dest).is_err());
    assert!(!dest.join("hard").exists());
}

/// A FIFO (and, as root, a device node) in the writable layer: archived under its name in the
/// layer and unpacked as the same kind of node. tar's own `append_path_with_name` named them by
/// their absolute path on disk and failed ("paths in archives must be relative"), so a container
/// with a FIFO in its writable layer could not be moved or exported.
#[test]
fn fifo_and_device_nodes_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("data")).unwrap();
    nix::unistd::mkfifo(
        &upper.join("data/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    std::fs::set_permissions(
        upper.join("data/fifo"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    if is_root() {
        nix::sys::stat::mknod(
            &upper.join("data/null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    let mut tar = Vec::new();
    write_layer_tar(&upper, &mut tar).unwrap();
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    unpack_layer_tar(&mut &tar[..], &dest).unwrap();
    let m = std::fs::symlink_metadata(dest.join("data/fifo")).unwrap();
    assert!(m.file_type().is_fifo(), "{:?}", m.file_type());
    assert_eq!(m.mode() & 0o7777, 0o640);
    if is_root() {
        let m = std::fs::symlink_metadata(dest.join("data/null")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
    }
}

#[test]
fn fifo_entry_behind_a_symlink_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "esc", &outside).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_size(0);
    h.set_mode(0o644);
    b.append_data(&mut h, "esc/fifo", std::io::empty()).unwrap();
    let tar = b.into_inner().unwrap();
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    assert!(unpack_layer_tar(&mut &tar[..], &dest).is_err());
    assert!(!outside.join("fifo").exists());
}

/// A file that grows while the layer is archived (the presync runs while the container runs):
/// its entry holds the size the walk saw, and the archive stays readable. tar's own
/// `append_path_with_name` copied it to its end under the old size, and the next header was
/// read from file data ("numeric field was not a number").
#[test]
fn a_file_growing_while_archived_keeps_the_archive_readable() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    let log = upper.join("data.log");
    std::fs::write(&log, "1 aaaa\n").unwrap();
    std::fs::write(upper.join("next"), "after\n").unwrap();
    let seen = std::fs::symlink_metadata(&log).unwrap();
    // Written after the walk's stat, before the entry is archived.
    std::fs::write(&log, "1 aaaa\n".repeat(1000)).unwrap();
    let mut out = Vec::new();
    {
        let w: &mut dyn std::io::Write = &mut out;
        let mut b = tar::Builder::new(w);
        let mut links = layer::Links::new();
        layer::add_entry(&mut b, &log, Path::new("data.log"), &seen, &mut links).unwrap();
        let next = upper.join("next");
        let next_meta = std::fs::symlink_metadata(&next).unwrap();
        layer::add_entry(&mut b, &next, Path::new("next"), &next_meta, &mut links).unwrap();
        b.into_inner().unwrap();
    }
    let mut a = tar::Archive::new(&out[..]);
    let mut got = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut e, &mut body).unwrap();
        got.push((e.path().unwrap().display().to_string(), body));
    }
    assert_eq!(
        got,
        vec![
            ("data.log".to_owned(), "1 aaaa\n".to_owned()),
            ("next".to_owned(), "after\n".to_owned()),
        ]
    );
}

/// A sparse file keeps tar's sparse entry: its holes are not written out into the layer tar.
#[test]
fn a_sparse_file_stays_sparse_in_the_layer_tar() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    let f = std::fs::File::create(upper.join("disk.img")).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let mut out = Vec::new();
    write_layer_tar(&upper, &mut out).unwrap();
    assert!(out.len() < 1 << 20, "{} bytes", out.len());
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_names_the_archive_and_leaves_nothing() {
    if !is_root() {
        return;
    }
    let (t, set, upper) = fixture();
    let small = t.path().join("small");
    std::fs::create_dir(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=128k"),
    )
    .unwrap();
    let _m = Mounted(small.clone());
    let out = small.join("c.tar");
    match export(&set, Some(&upper), &out, false) {
        Err(e @ ArchiveError::Write { .. }) => {
            let ArchiveError::Write { path, source } = &e else {
                unreachable!()
            };
            assert_eq!(path, &out, "{e}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
        }
        other => panic!("{other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn an_empty_file_or_a_tar_of_something_else_is_not_a_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("dest");
    let empty = t.path().join("empty.tar");
    std::fs::write(&empty, b"").unwrap();
    let other = t.path().join("other.tar");
    std::fs::write(
        &other,
        raw_tar(b"etc/hostname", tar::EntryType::Regular, b"box\n"),
    )
    .unwrap();
    for (file, why) in [(&empty, "empty"), (&other, "without the manifest.json")] {
        let e = import(file, &dest).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, ArchiveError::NotCheckpoint { path, .. } if path == file)
                && msg.contains(why),
            "{msg}"
        );
        assert!(!dest.exists());
    }
}

#[test]
fn extended_attributes_travel_with_the_layer_and_its_delta() {
    use super::delta::{apply_layer_delta, write_layer_delta, write_layer_tar_scanned};
    use super::sys::{lgetxattr_value, lsetxattr};
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    std::fs::write(src.join("later"), b"x").unwrap();
    if let Err(e) = lsetxattr(&src.join("f"), "user.color", b"blue") {
        eprintln!("skipped: no user xattrs here ({e})");
        return;
    }
    lsetxattr(&src.join("d"), "user.dir", b"yes").unwrap();
    // A value longer than 256 bytes, and overlay's own, which is not the container's.
    lsetxattr(&src.join("f"), "user.long", &[b'v'; 3000]).unwrap();
    // What a PAX record of the `tar` crate cannot hold as it is (QA, session 19): a value with
    // a newline byte (as `setcap cap_dac_override,cap_fowner+ep` stores), a name with `=`.
    lsetxattr(&src.join("f"), "user.nl", b"a\nb\n\0c").unwrap();
    lsetxattr(&src.join("d"), "user.a=b", b"v").unwrap();
    if is_root() {
        lsetxattr(&src.join("d"), "trusted.overlay.origin", b"x").unwrap();
    }
    let mut presync = Vec::new();
    let scan = write_layer_tar_scanned(&src, &mut presync).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    unpack_layer_tar(&mut &presync[..], &dst).unwrap();
    assert_eq!(
        lgetxattr_value(&dst.join("f"), b"user.color").unwrap(),
        b"blue"
    );
    assert_eq!(
        lgetxattr_value(&dst.join("f"), b"user.long").unwrap(),
        vec![b'v'; 3000]
    );
    assert_eq!(
        lgetxattr_value(&dst.join("d"), b"user.dir").unwrap(),
        b"yes"
    );
    assert_eq!(
        lgetxattr_value(&dst.join("f"), b"user.nl").unwrap(),
        b"a\nb\n\0c"
    );
    assert_eq!(lgetxattr_value(&dst.join("d"), b"user.a=b").unwrap(), b"v");
    assert!(lgetxattr_value(&dst.join("d"), b"user.a").is_err());
    assert!(lgetxattr_value(&dst.join("d"), b"trusted.overlay.origin").is_err());

    // Set while "running": the delta carries it (the change of ctime puts the file in it).
    lsetxattr(&src.join("later"), "user.tag", b"late").unwrap();
    // Removed while "running" from a directory: gone on the destination too (it stayed).
    super::sys::lremovexattr(&src.join("d"), b"user.dir").unwrap();
    let mut delta = Vec::new();
    write_layer_delta(&src, &scan, &mut delta, true).unwrap();
    apply_layer_delta(&mut &delta[..], &dst).unwrap();
    assert_eq!(
        lgetxattr_value(&dst.join("later"), b"user.tag").unwrap(),
        b"late"
    );
    assert_eq!(
        lgetxattr_value(&dst.join("f"), b"user.color").unwrap(),
        b"blue"
    );
    assert!(lgetxattr_value(&dst.join("d"), b"user.dir").is_err());
    assert_eq!(lgetxattr_value(&dst.join("d"), b"user.a=b").unwrap(), b"v");
}

/// Files beside the image set (the container's log and record) travel listed and hashed, as
/// they were when the export started, and come out of an import as they went in.
#[test]
fn extras_travel_with_the_set() {
    let (t, set, upper) = fixture();
    let log = t.path().join("container.log");
    std::fs::write(&log, b"line 1\nline 2\n").unwrap();
    let out = t.path().join("c.tar.zst");
    let exported = export_with(&set, Some(&upper), &[(CONTAINER_LOG, &log)], &out, true).unwrap();
    assert!(exported.files.iter().any(|f| f.path == CONTAINER_LOG));
    let dest = t.path().join("imported");
    import(&out, &dest).unwrap();
    assert_eq!(
        std::fs::read(dest.join(CONTAINER_LOG)).unwrap(),
        b"line 1\nline 2\n"
    );
    no_temporary_files(t.path());
    // A name the set already has is refused.
    let clash = export_with(&set, None, &[("core-1.img", &log)], &out, false);
    assert!(
        matches!(clash, Err(ArchiveError::ExtraClash { .. })),
        "{clash:?}"
    );
}

/// A directory the container replaces while the presync walks (removed and made a file between
/// the listing and its own listing) is skipped, not a failure of the whole move; the top
/// directory missing still is one.
#[test]
fn a_directory_replaced_during_the_walk_is_skipped() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("etc/deep")).unwrap();
    std::fs::write(upper.join("etc/deep/f"), b"x").unwrap();
    std::fs::write(upper.join("z"), b"z").unwrap();
    let mut seen = Vec::new();
    layer::walk(&upper, Path::new(""), &mut |path, name, meta| {
        if name == Path::new("etc") && meta.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
            std::fs::write(path, b"now a file").unwrap();
        }
        seen.push(name.to_owned());
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [PathBuf::from("etc"), PathBuf::from("z")]);
    let gone = layer::walk(&t.path().join("nothing"), Path::new(""), &mut |_, _, _| {
        Ok(())
    });
    assert!(gone.is_err());
}

/// A path the container made (step by step, each relative) that is longer than the host can
/// open under the state directory: the walk says so in words, not "File name too long".
#[test]
fn a_path_too_long_for_the_host_is_named() {
    use std::os::fd::{AsRawFd, FromRawFd};
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    let part = "d".repeat(200);
    let mut dir = std::fs::File::open(&upper).unwrap();
    for _ in 0..25 {
        let at = Some(dir.as_raw_fd());
        nix::sys::stat::mkdirat(at, part.as_str(), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let fd = nix::fcntl::openat(
            at,
            part.as_str(),
            nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        // SAFETY: openat returned a new descriptor nothing else owns.
        dir = unsafe { std::fs::File::from_raw_fd(fd) };
    }
    let e = layer::walk(&upper, Path::new(""), &mut |_, _, _| Ok(())).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("too long to archive") && text.contains("shorten that path"),
        "{text}"
    );
    // Removed from the inside out: the temporary directory's own removal cannot open it.
    let _ = std::process::Command::new("rm")
        .arg("-rf")
        .arg(&upper)
        .status();
}
