//! Hostile archives: each is refused with a clear error and leaves the store empty, and nothing
//! is written outside the store.

mod image_common;

use image_common::*;
use mig_runtime::image::{HostileReason, ImageError, ImageStore, Limits, PathError};
use std::fs;
use std::path::Path;

fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("images")).unwrap();
    (dir, store)
}

/// Imports `tar` as a plain rootfs tar, as gzip, and as a received layer; expects every one to be
/// refused as hostile for `want` and the store to stay empty.
fn refused(store: &ImageStore, dir: &Path, tar: &[u8], want: fn(&HostileReason) -> bool) {
    let plain = write_file(dir, "hostile.tar", tar);
    let gz = write_file(dir, "hostile.tar.gz", &gzip(tar));
    for p in [&plain, &gz] {
        match store.import(p, "hostile") {
            Err(ImageError::Hostile { reason, entry }) => {
                assert!(want(&reason), "unexpected reason {reason} for {entry}");
                // The message names the entry and the reason.
                let msg = ImageError::Hostile {
                    entry: entry.clone(),
                    reason,
                }
                .to_string();
                assert!(msg.contains("hostile"), "{msg}");
            }
            other => panic!("expected a hostile refusal, got {other:?}"),
        }
        assert_store_empty(store);
    }
    let err = store.import_layer(&sha256(tar), &mut &tar[..]).unwrap_err();
    assert!(
        matches!(&err, ImageError::Hostile { reason, .. } if want(reason)),
        "{err}"
    );
    assert_store_empty(store);
}

#[test]
fn image_hostile_paths() {
    let (tmp, store) = store();
    let d = tmp.path();
    let t = RawTar::default()
        .file(b"ok", b"x")
        .file(b"/etc/evil", b"x")
        .finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::Path(PathError::Absolute)
    });
    let t = RawTar::default().file(b"../evil", b"x").finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::Path(PathError::DotDot)
    });
    let t = RawTar::default()
        .dir(b"a/")
        .file(b"a/../../evil", b"x")
        .finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::Path(PathError::DotDot)
    });
    let long = vec![b'a'; 5000];
    let t = RawTar::default().file(&long, b"x").finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::Path(PathError::TooLong)
    });
    assert!(!d.join("evil").exists() && !tmp.path().join("images/evil").exists());
}

#[test]
fn image_hostile_symlinks() {
    let (tmp, store) = store();
    let d = tmp.path();
    let outside = d.join("outside");
    fs::create_dir(&outside).unwrap();
    // A relative target climbing out of the layer.
    let t = RawTar::default()
        .dir(b"etc/")
        .symlink(b"etc/x", b"../../outside")
        .finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::EscapingLink("../../outside".into())
    });
    // An absolute symlink is fine by itself, but writing through it is refused.
    let abs = outside.display().to_string();
    let t = RawTar::default()
        .symlink(b"link", abs.as_bytes())
        .file(b"link/evil", b"pwned")
        .finish();
    refused(&store, d, &t, |r| *r == HostileReason::ThroughSymlink);
    // The same through a symlinked directory further up, and a hardlink placed through it.
    let t = RawTar::default()
        .dir(b"a/")
        .symlink(b"a/b", abs.as_bytes())
        .dir(b"a/b/c/")
        .finish();
    refused(&store, d, &t, |r| *r == HostileReason::ThroughSymlink);
    let t = RawTar::default()
        .file(b"f", b"x")
        .symlink(b"l", abs.as_bytes())
        .hardlink(b"l/evil", b"f")
        .finish();
    refused(&store, d, &t, |r| *r == HostileReason::ThroughSymlink);
    // A directory replaced by a symlink forgets what was under it.
    let t = RawTar::default()
        .dir(b"d/")
        .file(b"d/f", b"x")
        .symlink(b"d", abs.as_bytes())
        .hardlink(b"h", b"d/f")
        .finish();
    refused(&store, d, &t, |r| *r == HostileReason::HardlinkMissing);
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote outside"
    );
}

#[test]
fn image_hostile_hardlinks() {
    let (tmp, store) = store();
    let d = tmp.path();
    let t = RawTar::default().hardlink(b"h", b"/etc/passwd").finish();
    // The target is named as what is refused, not the entry's own path (QA of session 30).
    refused(&store, d, &t, |r| {
        *r == HostileReason::HardlinkTarget {
            target: "/etc/passwd".into(),
            why: PathError::Absolute,
        }
    });
    let t = RawTar::default()
        .dir(b"a/")
        .hardlink(b"a/h", b"../../etc/passwd")
        .finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::HardlinkTarget {
            target: "../../etc/passwd".into(),
            why: PathError::DotDot,
        }
    });
    let t = RawTar::default().hardlink(b"h", b"missing").finish();
    refused(&store, d, &t, |r| *r == HostileReason::HardlinkMissing);
    // A link to a directory of the archive is not a link to a file.
    let t = RawTar::default()
        .dir(b"dir/")
        .hardlink(b"h", b"dir")
        .finish();
    refused(&store, d, &t, |r| *r == HostileReason::HardlinkMissing);
}

#[test]
fn image_hostile_devices_and_types() {
    let (tmp, store) = store();
    let d = tmp.path();
    // Root replaced by a file.
    let t = RawTar::default().file(b"./", b"x").finish();
    refused(&store, d, &t, |r| *r == HostileReason::ReplacesRoot);
    // Whiteout naming the parent.
    let t = RawTar::default().file(b"a/.wh...", b"").finish();
    refused(&store, d, &t, |r| *r == HostileReason::BadWhiteout);

    // Fifos and char 0/0 whiteouts are fine.
    let t = RawTar::default()
        .fifo(b"run/fifo")
        .chardev(b"gone", 0, 0)
        .finish();
    let p = write_file(d, "ok.tar", &t);
    let img = store.import(&p, "ok").unwrap();
    let l = store.layer_dir(&img.layers[0]);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(l.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(l.join("gone"))
        .unwrap()
        .file_type()
        .is_char_device());

    // Device nodes (a distribution's rootfs tar has /dev/null, /dev/console...) are left out,
    // and so are hardlinks to them: the import works, and no node reaches the layer. Before,
    // every debootstrap tar was refused ("device nodes are not allowed in images").
    let t = RawTar::default()
        .dir(b"dev/")
        .chardev(b"dev/mem", 1, 1)
        .hardlink(b"dev/mem2", b"dev/mem")
        .blockdev(b"sda", 8, 0)
        .file(b"etc/hostname", b"x")
        .finish();
    let p = write_file(d, "devices.tar", &t);
    for img in [
        store.import(&p, "devices").unwrap(),
        store
            .import(&write_file(d, "devices.tar.gz", &gzip(&t)), "devices-gz")
            .unwrap(),
    ] {
        let l = store.layer_dir(&img.layers[0]);
        assert!(l.join("etc/hostname").is_file());
        assert!(l.join("dev").is_dir());
        for gone in ["dev/mem", "dev/mem2", "sda"] {
            assert!(
                fs::symlink_metadata(l.join(gone)).is_err(),
                "{gone} was created"
            );
        }
    }
    store.import_layer(&sha256(&t), &mut &t[..]).unwrap();
}

#[test]
fn image_hostile_sizes() {
    let (tmp, store) = store();
    let d = tmp.path();
    // A header claiming 9 GiB is refused before any data is read.
    let t = RawTar::default().file_header_only(b"big", 9 << 30).finish();
    let p = write_file(d, "big.tar", &t);
    let err = store.import(&p, "big").unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Hostile {
                reason: HostileReason::EntryTooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_store_empty(&store);
    // A GNU long name of 2 MiB (held in memory by tar readers).
    let t = RawTar::default().longname_header(2 << 20).finish();
    refused(&store, d, &t, |r| {
        matches!(r, HostileReason::ExtensionTooLarge { .. })
    });

    // A PAX header giving the next file 9 GiB.
    let t = RawTar::default()
        .raw(b"pax", b'x', b"19 size=9663676416\n")
        .file(b"f", b"")
        .finish();
    refused(&store, d, &t, |r| {
        matches!(r, HostileReason::EntryTooLarge { .. })
    });
    // A PAX size that makes a file's data hide a 2 MiB long name from a scanner reading only
    // the header's own size (its data starts with a zero block, an end marker to such a scanner).
    let mut t = RawTar::default()
        .raw(b"pax", b'x', b"13 size=1536\n")
        .file(b"f", b"")
        .finish();
    t.truncate(t.len() - 1024);
    t.resize(t.len() + 1536, 0);
    let t = RawTar { out: t }.longname_header(2 << 20).finish();
    refused(&store, d, &t, |r| {
        matches!(r, HostileReason::ExtensionTooLarge { .. })
    });

    // Small limits: per entry, total, entry count.
    let small = store.clone().with_limits(Limits {
        max_entry_size: 1024,
        max_total_size: 3000,
        max_entries: 10,
        ..Limits::default()
    });
    let t = RawTar::default().file(b"f", &[7u8; 2000]).finish();
    refused(&small, d, &t, |r| {
        matches!(r, HostileReason::EntryTooLarge { .. })
    });
    let t = RawTar::default()
        .file(b"a", &[1u8; 1000])
        .file(b"b", &[1u8; 1000])
        .file(b"c", &[1u8; 1000])
        .file(b"d", &[1u8; 1000])
        .finish();
    refused(&small, d, &t, |r| {
        matches!(r, HostileReason::TotalTooLarge { .. })
    });
    let mut many = RawTar::default();
    for i in 0..11 {
        many = many.file(format!("f{i}").as_bytes(), b"");
    }
    refused(&small, d, &many.finish(), |r| {
        matches!(r, HostileReason::TooManyEntries { .. })
    });
    // The decompressed stream is bounded too.
    let tiny = store.clone().with_limits(Limits {
        max_tar_size: 4096,
        ..Limits::default()
    });
    let t = RawTar::default().file(b"f", &[0u8; 8192]).finish();
    let p = write_file(d, "bomb.tar.gz", &gzip(&t));
    let err = tiny.import(&p, "bomb").unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
    assert_store_empty(&store);
}

#[test]
fn image_hostile_oci_archive() {
    // An OCI archive whose layout itself is hostile: nothing of it lands anywhere.
    let (tmp, store) = store();
    let d = tmp.path();
    let t = RawTar::default()
        .file(b"oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file(b"index.json", br#"{"manifests":[]}"#)
        .file(b"../../escape", b"x")
        .finish();
    refused(&store, d, &t, |r| {
        *r == HostileReason::Path(PathError::DotDot)
    });
    // A blob that is a symlink to a host file is not read.
    let t = RawTar::default()
        .file(b"oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .dir(b"blobs/")
        .dir(b"blobs/sha256/")
        .symlink(
            b"blobs/sha256/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            b"/etc/passwd",
        )
        .file(
            b"index.json",
            br#"{"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":10}]}"#,
        )
        .finish();
    let p = write_file(d, "o.tar", &t);
    let err = store.import(&p, "o").unwrap_err();
    assert!(matches!(err, ImageError::Oci(_)), "{err}");
    assert_store_empty(&store);
    // A malformed digest: the error says where it was found and what a digest is (QA of
    // session 23: it named neither).
    let layout = d.join("layout");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        br#"{"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:deadbeef","size":10}]}"#,
    )
    .unwrap();
    let err = store.import(&layout, "bad").unwrap_err();
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err).map_or(String::new(), |s| s.to_string())
    );
    assert!(
        text.contains("sha256:deadbeef") && text.contains(&layout.display().to_string()),
        "{text}"
    );
    assert_store_empty(&store);
    // The same layout as an archive: the error names the archive, not the store's temporary
    // directory it was unpacked in (QA of session 23, R5).
    let archive = write_file(d, "bad-oci.tar", &tar_dir(&layout));
    let err = store.import(&archive, "bad").unwrap_err();
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err).map_or(String::new(), |s| s.to_string())
    );
    assert!(
        text.contains("sha256:deadbeef")
            && text.contains(&format!("a descriptor of {}", archive.display())),
        "{text}"
    );
    assert_store_empty(&store);
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
    let mut len = body.len() + 1;
    if (len.to_string().len() + body.len()) != len {
        len = len.to_string().len() + body.len();
    }
    let rec = [len.to_string().as_bytes(), &body].concat();
    assert_eq!(rec.len(), len);
    rec
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

#[test]
fn image_xattrs_kept_or_dropped() {
    let (tmp, store) = store();
    // vfs_cap_data v2, effective, permitted = CAP_NET_RAW (13).
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let pax = [
        pax_record("SCHILY.xattr.security.capability", &cap),
        pax_record("SCHILY.xattr.user.note", b"hello"),
        pax_record("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        pax_record(
            "SCHILY.xattr.security.selinux",
            b"system_u:object_r:shadow_t:s0",
        ),
    ]
    .concat();
    let t = RawTar::default()
        .raw(b"pax", b'x', &pax)
        .file(b"ping", b"\x7fELF")
        .finish();
    let p = write_file(tmp.path(), "x.tar", &t);
    let img = store.import(&p, "x").unwrap();
    let f = store.layer_dir(&img.layers[0]).join("ping");
    assert_eq!(get_xattr(&f, "security.capability"), Some(cap.clone()));
    assert_eq!(get_xattr(&f, "user.note"), Some(b"hello".to_vec()));
    assert_eq!(get_xattr(&f, "trusted.overlay.redirect"), None);
    assert_eq!(get_xattr(&f, "security.selinux"), None);

    // A rootfs directory keeps its file capabilities through the layer tar.
    let src = tmp.path().join("rootfs");
    fs::create_dir(&src).unwrap();
    let long = "p".repeat(150);
    fs::copy(&f, src.join(&long)).unwrap();
    let path = std::ffi::CString::new(src.join(&long).to_str().unwrap()).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            c"security.capability".as_ptr(),
            cap.as_ptr().cast(),
            cap.len(),
            0,
        )
    };
    assert_eq!(rc, 0);
    let img = store.import(&src, "dir").unwrap();
    let f = store.layer_dir(&img.layers[0]).join(&long);
    assert_eq!(get_xattr(&f, "security.capability"), Some(cap));
}

#[test]
fn image_empty_docker_archive_refused() {
    let (tmp, store) = store();
    let t = RawTar::default()
        .file(b"manifest.json", b"[]")
        .file(b"repositories", b"{}")
        .file(b"abc/layer.tar", b"")
        .finish();
    let p = write_file(tmp.path(), "docker.tar", &t);
    let err = store.import(&p, "d").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Oci(mig_runtime::image::OciError::DockerArchive(_))
        ),
        "{err}"
    );
    assert_store_empty(&store);
}
