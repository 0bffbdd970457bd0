//! Imports of every supported kind, lookup, removal and layer transfer. Needs root (ownership,
//! whiteout device nodes, trusted xattrs, overlay mounts).

mod image_common;

use image_common::*;
use mig_runtime::image::{ImageError, ImageStore};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("images")).unwrap();
    (dir, store)
}

fn check_busybox_layer(store: &ImageStore, digest: &str, hardlinks: bool) {
    let l = store.layer_dir(digest);
    let m = fs::metadata(l.join("bin/busybox")).unwrap();
    assert!(m.permissions().mode() & 0o111 != 0);
    assert_eq!(m.len(), fs::metadata("/bin/busybox").unwrap().len());
    assert_eq!(
        fs::read_link(l.join("bin/sh")).unwrap(),
        PathBuf::from("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(l.join("bin/ls")).unwrap(),
        PathBuf::from("busybox")
    );
    let a = fs::metadata(l.join("etc/hostname")).unwrap();
    let b = fs::metadata(l.join("etc/hostname.bak")).unwrap();
    if hardlinks {
        assert_eq!(a.ino(), b.ino(), "hardlink kept");
    }
    // The blob is the layer tar and hashes to the digest.
    let blob = store.layer_blob(digest).unwrap();
    assert_eq!(sha256(&fs::read(blob).unwrap()), digest);
    // The layer runs: busybox inside a chroot of it.
    let out = std::process::Command::new("chroot")
        .arg(&l)
        .args(["/bin/sh", "-c", "/bin/busybox cat /etc/hostname"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"box\n");
}

#[test]
fn image_rootfs_dir() {
    let (tmp, store) = store();
    let src = tmp.path().join("rootfs");
    busybox_rootfs(&src);
    fs::set_permissions(src.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::lchown(src.join("etc/hostname"), Some(1234), Some(4321)).unwrap();
    let img = store.import(&src, "busybox").unwrap();
    assert_eq!(img.name, "busybox");
    assert_eq!(img.layers.len(), 1);
    assert!(img.id.starts_with("sha256:"));
    assert!(img.size >= fs::metadata("/bin/busybox").unwrap().len());
    check_busybox_layer(&store, &img.layers[0], true);
    let l = store.layer_dir(&img.layers[0]);
    assert_eq!(fs::metadata(l.join("etc")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(fs::metadata(&l).unwrap().mode() & 0o7777, 0o755);
    let m = fs::metadata(l.join("etc/hostname")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 4321));

    // Deterministic: the same tree gives the same layer and id; a re-import replaces the record.
    let again = store.import(&src, "busybox").unwrap();
    assert_eq!(again.id, img.id);
    assert_eq!(again.layers, img.layers);
    assert_eq!(store.list().unwrap().len(), 1);

    // Lookup by name, full id, prefixes with and without "sha256:".
    let hex = img.id.trim_start_matches("sha256:");
    assert_eq!(store.get("busybox").unwrap(), again);
    assert_eq!(store.get(&img.id).unwrap().name, "busybox");
    assert_eq!(store.get(&hex[..4]).unwrap().name, "busybox");
    assert_eq!(
        store.get(&format!("sha256:{}", &hex[..8])).unwrap().name,
        "busybox"
    );
    assert!(matches!(store.get(&hex[..3]), Err(ImageError::NotFound(_))));
    assert!(matches!(store.get("nope"), Err(ImageError::NotFound(_))));

    // The same image under a second name: the id prefix is ambiguous, the layer is shared.
    store.import(&src, "busybox2").unwrap();
    assert!(matches!(
        store.get(&hex[..6]),
        Err(ImageError::Ambiguous { .. })
    ));
    assert!(!tree(&store.root().join("layers/sha256")).is_empty());
    let removed = store.remove("busybox").unwrap();
    assert_eq!(removed.name, "busybox");
    assert!(store.has_layer(&img.layers[0]), "still used by busybox2");
    store.remove("busybox2").unwrap();
    assert!(!store.has_layer(&img.layers[0]));
    assert_store_empty(&store);
    assert!(matches!(
        store.remove("busybox"),
        Err(ImageError::NotFound(_))
    ));
}

#[test]
fn image_rootfs_tar_plain_gzip_zstd() {
    let (tmp, store) = store();
    let src = tmp.path().join("rootfs");
    busybox_rootfs(&src);
    let plain = tar_dir(&src);
    let p1 = write_file(tmp.path(), "r.tar", &plain);
    let p2 = write_file(tmp.path(), "r.tar.gz", &gzip(&plain));
    let p3 = write_file(tmp.path(), "r.tar.zst", &zstd(&plain));
    let a = store.import(&p1, "plain").unwrap();
    assert_eq!(a.layers, vec![sha256(&plain)]);
    check_busybox_layer(&store, &a.layers[0], false);
    let b = store.import(&p2, "gz").unwrap();
    let c = store.import(&p3, "zst").unwrap();
    assert_eq!(a.layers, b.layers);
    assert_eq!(a.layers, c.layers);
    assert_eq!(a.id, c.id);
    assert_eq!(store.list().unwrap().len(), 3);
    assert_eq!(
        fs::read_dir(store.root().join("layers/sha256"))
            .unwrap()
            .count(),
        1
    );

    // Not a tar at all.
    let junk = write_file(tmp.path(), "junk", b"hello, this is not an archive");
    assert!(matches!(
        store.import(&junk, "junk"),
        Err(ImageError::UnknownFormat { .. })
    ));
    // Invalid names are refused before anything is read.
    assert!(matches!(
        store.import(&p1, "../x"),
        Err(ImageError::InvalidName(_))
    ));
    for n in ["plain", "gz", "zst"] {
        store.remove(n).unwrap();
    }
    assert_store_empty(&store);
}

#[test]
fn image_import_layer_and_add_image() {
    let (tmp, store) = store();
    let src = tmp.path().join("rootfs");
    busybox_rootfs(&src);
    let img = store.import(&src, "busybox").unwrap();
    let blob = fs::read(store.layer_blob(&img.layers[0]).unwrap()).unwrap();

    // A second store (another host) receives the layer, then the record.
    let (_t2, peer) = store_pair_peer();
    let bad = "sha256:".to_owned() + &"0".repeat(64);
    let err = peer.import_layer(&bad, &mut &blob[..]).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_store_empty(&peer);
    assert!(peer.add_image(&img).is_err(), "layers missing");
    assert_store_empty(&peer);

    peer.import_layer(&img.layers[0], &mut &blob[..]).unwrap();
    assert!(peer.has_layer(&img.layers[0]));
    // A second copy is not read again.
    peer.import_layer(&img.layers[0], &mut std::io::empty())
        .unwrap();
    // The peer has an image of its own under that name: it keeps it, and the received one is
    // recorded under `<name>-<12 hex>`.
    let own = tmp.path().join("own");
    fs::create_dir_all(own.join("etc")).unwrap();
    fs::write(own.join("etc/own"), "own").unwrap();
    let own = peer.import(&own, "busybox").unwrap();
    let got = peer.add_image(&img).unwrap();
    assert_eq!(got.name, format!("busybox-{}", &img.id[7..19]));
    assert_eq!(peer.get("busybox").unwrap(), own);
    assert_eq!(peer.get(&got.name).unwrap().id, img.id);
    peer.remove(&got.name).unwrap();
    peer.remove("busybox").unwrap();
    // A free name is taken as it is (the removal collected the layer: received again).
    peer.import_layer(&img.layers[0], &mut &blob[..]).unwrap();
    assert_eq!(peer.add_image(&img).unwrap(), img);
    assert_eq!(peer.get("busybox").unwrap(), img);
    check_busybox_layer(&peer, &img.layers[0], true);
    assert!(matches!(
        peer.import_layer("sha256:xyz", &mut std::io::empty()),
        Err(ImageError::InvalidDigest(_))
    ));
}

fn store_pair_peer() -> (tempfile::TempDir, ImageStore) {
    store()
}

// ---------------------------------------------------------------- OCI

struct Blob {
    digest: String,
    size: usize,
    media_type: &'static str,
}

fn put_blob(layout: &Path, data: &[u8], media_type: &'static str) -> Blob {
    let digest = sha256(data);
    let p = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    fs::write(p, data).unwrap();
    Blob {
        digest,
        size: data.len(),
        media_type,
    }
}

fn desc(b: &Blob) -> serde_json::Value {
    serde_json::json!({"mediaType": b.media_type, "digest": b.digest, "size": b.size})
}

/// Builds an OCI layout with two layers: the busybox rootfs plus etc/a, etc/b and data/x/keep;
/// then (gzip) a whiteout of etc/a, an opaque data/ holding data/new. Returns the layout, the
/// config digest, and the two uncompressed layer digests.
fn build_layout(dir: &Path) -> (PathBuf, String, Vec<String>) {
    let layout = dir.join("layout");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    let base = dir.join("base");
    busybox_rootfs(&base);
    fs::write(base.join("etc/a"), "a").unwrap();
    fs::write(base.join("etc/b"), "b").unwrap();
    fs::write(
        base.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1002::/data:/bin/sh\n",
    )
    .unwrap();
    fs::create_dir_all(base.join("data/x")).unwrap();
    fs::write(base.join("data/x/keep"), "k").unwrap();
    let l1 = tar_dir(&base);
    let l2 = RawTar::default()
        .file(b"etc/.wh.a", b"")
        .dir(b"data/")
        .file(b"data/.wh..wh..opq", b"")
        .file(b"data/new", b"new")
        .finish();
    let b1 = put_blob(&layout, &l1, "application/vnd.oci.image.layer.v1.tar");
    let b2 = put_blob(
        &layout,
        &gzip(&l2),
        "application/vnd.oci.image.layer.v1.tar+gzip",
    );
    let diff_ids = vec![sha256(&l1), sha256(&l2)];
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["/bin/sh"], "Entrypoint": ["/bin/busybox"],
                   "WorkingDir": "/data", "User": "app"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cb = put_blob(
        &layout,
        config.to_string().as_bytes(),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc(&cb),
        "layers": [desc(&b1), desc(&b2)],
    });
    let mb = put_blob(
        &layout,
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc(&mb)]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    (layout, cb.digest, diff_ids)
}

fn check_layout_image(store: &ImageStore, tmp: &Path, img: &mig_runtime::image::Image) {
    let l2 = store.layer_dir(&img.layers[1]);
    let wh = fs::symlink_metadata(l2.join("etc/a")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!l2.join("etc/.wh.a").exists());
    assert!(!l2.join("data/.wh..wh..opq").exists());
    let mut buf = [0u8; 8];
    let path = std::ffi::CString::new(l2.join("data").to_str().unwrap()).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, 1);
    assert_eq!(buf[0], b'y');

    // Through overlayfs: the whiteout hides etc/a, the opaque dir hides data/x.
    let target = tmp.join("merged");
    fs::create_dir_all(&target).unwrap();
    let lowers: Vec<_> = img.layers.iter().map(|d| store.layer_dir(d)).collect();
    let ov = Overlay::mount(&lowers, &target);
    assert!(!ov.target.join("etc/a").exists());
    assert_eq!(fs::read(ov.target.join("etc/b")).unwrap(), b"b");
    assert!(!ov.target.join("data/x").exists());
    assert_eq!(fs::read(ov.target.join("data/new")).unwrap(), b"new");
    assert!(ov.target.join("bin/busybox").is_file());
}

#[test]
fn image_oci_layout() {
    let (tmp, store) = store();
    let (layout, config_digest, diff_ids) = build_layout(tmp.path());
    let img = store.import(&layout, "oci").unwrap();
    assert_eq!(img.id, config_digest);
    assert_eq!(img.layers, diff_ids);
    assert_eq!(img.config.env, vec!["PATH=/bin", "A=1"]);
    assert_eq!(img.config.cmd, vec!["/bin/sh"]);
    assert_eq!(img.config.entrypoint, vec!["/bin/busybox"]);
    assert_eq!(img.config.workdir, "/data");
    assert_eq!(img.config.user, "1000:1002");
    check_layout_image(&store, tmp.path(), &img);
    store.remove("oci").unwrap();
    assert_store_empty(&store);
}

#[test]
fn image_oci_archive() {
    let (tmp, store) = store();
    let (layout, config_digest, _) = build_layout(tmp.path());
    let archive = write_file(tmp.path(), "oci.tar.gz", &gzip(&tar_dir(&layout)));
    let img = store.import(&archive, "ociarch").unwrap();
    assert_eq!(img.id, config_digest);
    check_layout_image(&store, tmp.path(), &img);
    let plain = write_file(tmp.path(), "oci.tar", &tar_dir(&layout));
    assert_eq!(store.import(&plain, "ociarch2").unwrap().id, config_digest);
    // A blob the archive lacks is named in the archive, not in the store's work directory,
    // which is gone by then (QA of session 30: "opening .../images/tmp/<pid>.<n>/layout/...").
    // This layout's own digest: its layer tars carry the time they were made.
    let (tmp2, store2) = crate::store();
    let (layout, config_digest, _) = build_layout(tmp2.path());
    let config = format!("blobs/sha256/{}", &config_digest["sha256:".len()..]);
    fs::remove_file(layout.join(&config)).unwrap();
    let archive = write_file(tmp2.path(), "lacking.tar", &tar_dir(&layout));
    let err = anyhow_like(&store2.import(&archive, "lacking").unwrap_err());
    assert!(
        err.contains(&format!("{config} in {}", archive.display())) && !err.contains("/layout/"),
        "{err}"
    );
}

/// The error and its sources, as `mig` prints them.
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s = format!("{s}: {e}");
        src = e.source();
    }
    s
}

/// Refused, not guessed (QA of session 29): an OCI archive without its `index.json` (it was
/// imported as a root filesystem holding `blobs/`), and a layout naming two images (the first was
/// taken); one image under two names imports.
#[test]
fn image_oci_layouts_that_say_no_one_image() {
    let (tmp, store) = store();
    let (layout, config_digest, _) = build_layout(tmp.path());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let named = |digest: &serde_json::Value, name: &str| {
        let mut d = index["manifests"][0].clone();
        d["digest"] = digest.clone();
        d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
        d
    };
    let same = index["manifests"][0]["digest"].clone();
    let write_index = |manifests: Vec<serde_json::Value>| {
        let i = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        fs::write(layout.join("index.json"), i.to_string()).unwrap();
    };
    write_index(vec![named(&same, "one"), named(&same, "latest")]);
    assert_eq!(store.import(&layout, "twonames").unwrap().id, config_digest);
    // A second manifest: the first one's bytes with a space more, another digest.
    let blobs = layout.join("blobs/sha256");
    let mut other =
        fs::read(blobs.join(same.as_str().unwrap().trim_start_matches("sha256:"))).unwrap();
    other.push(b' ');
    let other_digest = sha256(&other);
    fs::write(
        blobs.join(other_digest.trim_start_matches("sha256:")),
        &other,
    )
    .unwrap();
    let mut second = named(&serde_json::json!(other_digest), "two");
    second["size"] = serde_json::json!(other.len());
    // One name over two manifests (variants of one platform): the first that fits is taken.
    let mut variant = second.clone();
    variant["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "one"});
    write_index(vec![named(&same, "one"), variant]);
    assert_eq!(store.import(&layout, "variants").unwrap().id, config_digest);
    write_index(vec![named(&same, "one"), second]);
    let err = store.import(&layout, "two").unwrap_err();
    assert!(
        err.to_string().contains("holds 2 images (one, two)"),
        "{err}"
    );
    fs::remove_file(layout.join("index.json")).unwrap();
    let archive = write_file(tmp.path(), "noindex.tar", &tar_dir(&layout));
    let err = store.import(&archive, "noindex").unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("{} is an OCI archive", archive.display())),
        "{err}"
    );
    assert!(store.get("noindex").is_err());
}

#[test]
fn image_oci_digest_mismatch() {
    let (tmp, store) = store();
    let (layout, _, _) = build_layout(tmp.path());
    // Corrupt the second layer blob in place (same size, other bytes).
    let blobs = layout.join("blobs/sha256");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(blobs.join(mdigest.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let l2 = manifest["layers"][1]["digest"].as_str().unwrap().to_owned();
    let p = blobs.join(l2.trim_start_matches("sha256:"));
    let mut data = fs::read(&p).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&p, &data).unwrap();
    let err = store.import(&layout, "bad").unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_store_empty(&store);

    // A truncated blob: size mismatch.
    fs::write(&p, &data[..10]).unwrap();
    let err = store.import(&layout, "bad").unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    assert_store_empty(&store);
}

#[test]
fn image_concurrent_imports_share_one_layer() {
    let (tmp, store) = store();
    let src = tmp.path().join("rootfs");
    busybox_rootfs(&src);
    let p = write_file(tmp.path(), "r.tar", &tar_dir(&src));
    let images: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let (store, p) = (store.clone(), p.clone());
                s.spawn(move || store.import(&p, &format!("c{i}")).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(images.windows(2).all(|w| w[0].layers == w[1].layers));
    assert_eq!(
        fs::read_dir(store.root().join("layers/sha256"))
            .unwrap()
            .count(),
        1
    );
    assert_eq!(
        fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        1
    );
    assert!(tree(&store.root().join("tmp")).is_empty());
    for i in 0..4 {
        store.remove(&format!("c{i}")).unwrap();
    }
    assert_store_empty(&store);
}

#[test]
fn image_open_removes_stale_work_dirs() {
    let (_tmp, store) = store();
    // A work dir of a process that cannot exist (above pid_max) and one of this process.
    let stale = store.root().join("tmp/2147483646.0");
    fs::create_dir_all(stale.join("layer-x/bin")).unwrap();
    let mine = store
        .root()
        .join(format!("tmp/{}.999999", std::process::id()));
    fs::create_dir_all(&mine).unwrap();
    let again = ImageStore::open(store.root()).unwrap();
    assert!(!stale.exists());
    assert!(mine.exists(), "a live process's work dir stays");
    fs::remove_dir(&mine).unwrap();
    assert_store_empty(&again);
}

/// Archives the tree `src` into `out` with the system's GNU tar and `args`; whether it did.
fn system_tar(src: &Path, out: &Path, args: &[&str]) -> bool {
    std::process::Command::new("tar")
        .args(args)
        .args(["--numeric-owner", "-C"])
        .arg(src)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .unwrap()
        .success()
}

#[test]
fn image_system_tar_formats() {
    // Archives written by GNU tar in each of its formats, with a name longer than 100 bytes,
    // a long symlink target and a hardlink.
    let (tmp, store) = store();
    let src = tmp.path().join("rootfs");
    busybox_rootfs(&src);
    let deep = src.join("d".repeat(60)).join("e".repeat(60));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("f".repeat(90)), "deep").unwrap();
    std::os::unix::fs::symlink(format!("/{}", "t".repeat(150)), src.join("longlink")).unwrap();
    for format in ["gnu", "ustar", "pax", "posix"] {
        let out = tmp.path().join(format!("{format}.tar"));
        if !system_tar(&src, &out, &[&format!("--format={format}")]) {
            // ustar cannot hold the long symlink target: that format is checked without it.
            assert_eq!(format, "ustar");
            continue;
        }
        let img = store.import(&out, format).unwrap();
        let l = store.layer_dir(&img.layers[0]);
        check_busybox_layer(&store, &img.layers[0], true);
        let rel = Path::new(&"d".repeat(60))
            .join("e".repeat(60))
            .join("f".repeat(90));
        assert_eq!(fs::read(l.join(rel)).unwrap(), b"deep");
        assert_eq!(
            fs::read_link(l.join("longlink")).unwrap(),
            PathBuf::from(format!("/{}", "t".repeat(150)))
        );
    }
}

/// Sparse files as GNU tar writes them with `-S`, in the old GNU format and in each PAX sparse
/// format: the file comes back whole, under its own name, its holes still holes (QA of
/// session 24: a PAX one imported as `GNUSparseFile.PID/NAME` holding the raw map, an old GNU one
/// took its whole size on disk).
#[test]
fn image_system_tar_sparse_files() {
    let (tmp, store) = store();
    let src = tmp.path().join("rootfs");
    busybox_rootfs(&src);
    // 64 MiB with data at 1 MiB, 40 MiB and the last 5 bytes.
    let size = 64u64 << 20;
    let mut want = vec![0u8; size as usize];
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(src.join("sparse")).unwrap();
        for (off, data) in [
            (1u64 << 20, &b"first chunk"[..]),
            (40 << 20, &[7u8; 9000][..]),
            (size - 5, &b"tail!"[..]),
        ] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(data).unwrap();
            want[off as usize..off as usize + data.len()].copy_from_slice(data);
        }
    }
    for (name, args) in [
        ("gnu", vec!["--format=gnu"]),
        ("pax-1.0", vec!["--format=pax", "--sparse-version=1.0"]),
        ("pax-0.1", vec!["--format=pax", "--sparse-version=0.1"]),
        ("pax-0.0", vec!["--format=pax", "--sparse-version=0.0"]),
    ] {
        let out = tmp.path().join(format!("{name}.tar"));
        let mut args = args.clone();
        args.push("-S");
        assert!(system_tar(&src, &out, &args), "tar {args:?}");
        let img = store.import(&out, name).unwrap();
        let l = store.layer_dir(&img.layers[0]);
        let got = fs::read(l.join("sparse")).unwrap();
        assert!(got == want, "{name}: the sparse file differs");
        let blocks = fs::metadata(l.join("sparse")).unwrap().blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "{name}: {blocks} blocks for a sparse file"
        );
        let stray: Vec<_> = fs::read_dir(&l)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("GNUSparseFile"))
            .collect();
        assert!(stray.is_empty(), "{name}: {stray:?}");
    }
}

#[test]
fn image_prune_unreferenced_layers() {
    let (tmp, store) = store();
    let a = RawTar::default().file(b"a", b"a").finish();
    let b = RawTar::default().file(b"b", b"b").finish();
    let c = RawTar::default().file(b"c", b"c").finish();
    // Received for migrations that never recorded an image.
    store.import_layer(&sha256(&a), &mut &a[..]).unwrap();
    store.import_layer(&sha256(&b), &mut &b[..]).unwrap();
    // Referenced by an image.
    let img = store
        .import(&write_file(tmp.path(), "c.tar", &c), "c")
        .unwrap();
    let removed = store.prune(&[sha256(&b)]).unwrap();
    assert_eq!(removed, vec![sha256(&a)]);
    assert!(!store.has_layer(&sha256(&a)));
    assert!(store.layer_blob(&sha256(&a)).is_err());
    assert!(store.has_layer(&sha256(&b)), "kept on request");
    assert!(store.has_layer(&img.layers[0]), "referenced");
    assert_eq!(store.prune(&[]).unwrap(), vec![sha256(&b)]);
    store.remove("c").unwrap();
    assert_store_empty(&store);
}

/// The layout of `build_layout` rewritten as a `docker save` directory (format before Docker 25):
/// `manifest.json`, the config as `<hex>.json`, each layer blob as `<hex>/layer.tar` (the second
/// one gzip-compressed, as `podman save` may write it). Returns the directory and its config
/// digest.
fn docker_dir(tmp: &Path, tags: &[&str]) -> (PathBuf, String) {
    let (layout, config_digest, _) = build_layout(tmp);
    let blobs = layout.join("blobs/sha256");
    let blob = |d: &str| fs::read(blobs.join(d.trim_start_matches("sha256:"))).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let dir = tmp.join("docker");
    fs::create_dir_all(&dir).unwrap();
    let hex = config_digest.trim_start_matches("sha256:");
    fs::write(dir.join(format!("{hex}.json")), blob(&config_digest)).unwrap();
    let mut layers = Vec::new();
    for (i, l) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let d = format!("layer{i}");
        fs::create_dir_all(dir.join(&d)).unwrap();
        fs::write(
            dir.join(&d).join("layer.tar"),
            blob(l["digest"].as_str().unwrap()),
        )
        .unwrap();
        layers.push(format!("{d}/layer.tar"));
    }
    let entries: Vec<_> = tags
        .iter()
        .map(|t| serde_json::json!({"Config": format!("{hex}.json"), "RepoTags": [t], "Layers": layers}))
        .collect();
    fs::write(
        dir.join("manifest.json"),
        serde_json::Value::from(entries).to_string(),
    )
    .unwrap();
    (dir, config_digest)
}

#[test]
fn image_docker_archive() {
    let (tmp, store) = store();
    let (dir, config_digest) = docker_dir(tmp.path(), &["app:1"]);
    // As a tar (no `repositories`, as `docker save IMAGE_ID` and podman write it), gzip too.
    let archive = write_file(tmp.path(), "docker.tar", &tar_dir(&dir));
    let img = store.import(&archive, "dock").unwrap();
    assert_eq!(img.id, config_digest);
    assert_eq!(img.config.entrypoint, vec!["/bin/busybox"]);
    assert_eq!(img.config.workdir, "/data");
    assert_eq!(img.config.user, "1000:1002");
    check_layout_image(&store, tmp.path(), &img);
    let gz = write_file(tmp.path(), "docker.tar.gz", &gzip(&tar_dir(&dir)));
    assert_eq!(store.import(&gz, "dock2").unwrap().layers, img.layers);
    // As the unpacked directory.
    assert_eq!(store.import(&dir, "dock3").unwrap().id, config_digest);
    for n in ["dock", "dock2", "dock3"] {
        store.remove(n).unwrap();
    }
    assert_store_empty(&store);
}

#[test]
fn image_docker_archive_refusals() {
    let (tmp, store) = store();
    let (dir, _) = docker_dir(tmp.path(), &["a:1", "b:2"]);
    let err = store.import(&dir, "two").unwrap_err();
    assert!(
        err.to_string().contains("holds 2 images (a:1, b:2)"),
        "{err}"
    );

    // A layer path through a symlink out of the archive.
    let (dir, _) = docker_dir(&tmp.path().join("x"), &["a:1"]);
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::rename(dir.join("layer1"), outside.join("layer1")).unwrap();
    std::os::unix::fs::symlink(outside.join("layer1"), dir.join("layer1")).unwrap();
    let err = store.import(&dir, "escape").unwrap_err();
    assert!(
        err.to_string().contains("not a file in the archive"),
        "{err}"
    );

    // A layer that is not the one the config names.
    fs::remove_file(dir.join("layer1")).unwrap();
    fs::create_dir_all(dir.join("layer1")).unwrap();
    fs::copy(dir.join("layer0/layer.tar"), dir.join("layer1/layer.tar")).unwrap();
    let err = store.import(&dir, "swapped").unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_store_empty(&store);
}

/// A docker-archive without `repositories` whose `manifest.json` is cut short or of the wrong
/// shape is refused, as a tar and as a directory, and nothing of it stays in the store: it was
/// imported as a root filesystem holding the archive's files (QA of session 32, F7). Once with
/// the config named `<hex>.json` as docker names it, once as `config.json`, so that the manifest
/// alone must tell. A root filesystem with a `manifest.json` of another kind still imports.
#[test]
fn image_docker_archive_with_a_damaged_manifest() {
    let (tmp, store) = store();
    let (dir, config_digest) = docker_dir(tmp.path(), &["a:1"]);
    let good = fs::read(dir.join("manifest.json")).unwrap();
    let hex_config = dir.join(format!(
        "{}.json",
        config_digest.trim_start_matches("sha256:")
    ));
    for config_named_by_hex in [true, false] {
        if !config_named_by_hex {
            fs::rename(&hex_config, dir.join("config.json")).unwrap();
        }
        let cases: [(&str, &[u8], &str); 2] = [
            ("cut short", &good[..good.len() / 2], "EOF while parsing"),
            (
                "of the wrong shape",
                br#"{"Config":"x.json"}"#,
                "invalid type: map, expected a sequence",
            ),
        ];
        for (what, manifest, says) in cases {
            fs::write(dir.join("manifest.json"), manifest).unwrap();
            let archive = write_file(tmp.path(), "bad.tar", &tar_dir(&dir));
            for input in [&dir, &archive] {
                let err = anyhow_like(&store.import(input, "bad").unwrap_err());
                assert!(
                    err.starts_with("parsing manifest.json: ") && err.contains(says),
                    "manifest {what}, config named by hex {config_named_by_hex}, {}: {err}",
                    input.display()
                );
                assert!(store.get("bad").is_err(), "{}", input.display());
                assert_store_empty(&store);
            }
        }
    }

    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs);
    let app = br#"{"name":"app","start_url":"/","icons":[]}"#;
    fs::write(rootfs.join("manifest.json"), app).unwrap();
    let tar = write_file(tmp.path(), "rootfs.tar", &tar_dir(&rootfs));
    for (input, name) in [(&rootfs, "dir"), (&tar, "tar")] {
        let img = store.import(input, name).unwrap();
        assert_eq!(img.layers.len(), 1, "{name}");
        let layer = store.layer_dir(&img.layers[0]);
        assert_eq!(
            fs::read(layer.join("manifest.json")).unwrap(),
            app,
            "{name}"
        );
        check_busybox_layer(&store, &img.layers[0], name == "dir");
    }
}

/// A tar cut short (a copy that did not finish) is named by the user's file, and the message says
/// what an early end means. It named the agent's work file (`.../images/tmp/<pid>.<n>/layer.tar:
/// unexpected EOF during skip`).
#[test]
fn image_truncated_tar_names_the_users_file() {
    let (tmp, store) = store();
    let d = tmp.path();
    let big = vec![7u8; 100_000];
    let t = RawTar::default().file(b"a", &big).file(b"b", &big).finish();
    let p = write_file(d, "cut.tar", &t[..60_000]);
    let err = store.import(&p, "cut").unwrap_err();
    let mut msg = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(!msg.contains("layer.tar"), "{msg}");
    assert_store_empty(&store);
}

/// One image has one size however it came: the same tar with a hardlinked file, imported under
/// two names (the second finds its layer in the store), had 2 sizes (the archive's sum counts
/// the linked file once, the stored layer's walk counted it once per link: a Debian image showed
/// 173.4 MiB as an OCI layout and 177.1 MiB as its archive, with one id).
#[test]
fn image_size_is_the_same_for_every_import_of_one_image() {
    let (tmp, store) = store();
    let d = tmp.path();
    let data = vec![1u8; 50_000];
    let t = RawTar::default()
        .dir(b"bin/")
        .file(b"bin/python3.11", &data)
        .hardlink(b"bin/python3", b"bin/python3.11")
        .finish();
    let first = store.import(&write_file(d, "one.tar", &t), "one").unwrap();
    let second = store.import(&write_file(d, "two.tar", &t), "two").unwrap();
    assert_eq!(first.id, second.id);
    assert_eq!(first.size, 50_000);
    assert_eq!(second.size, first.size);
}

/// Imports under one name at once, each replacing what the other recorded: one that found a
/// layer here when it began, which the other's replacement then removed as unused, imports
/// again rather than fail (QA of session 32, F10: "layer ... of the image is not in the store"
/// in 4 of 19 rounds of three concurrent imports).
#[test]
fn concurrent_imports_under_one_name_all_succeed() {
    let (tmp, store) = store();
    let (layout, _, _) = build_layout(tmp.path());
    let other = tmp.path().join("other");
    busybox_rootfs(&other);
    fs::write(other.join("etc/other"), "other").unwrap();
    let tar = write_file(tmp.path(), "other.tar", &tar_dir(&other));
    // The layout's bottom layer alone, as a root filesystem: the layer both images use.
    let base = write_file(tmp.path(), "base.tar", &tar_dir(&tmp.path().join("base")));
    for round in 0..30 {
        std::thread::scope(|s| {
            let a = s.spawn(|| store.import(&layout, "race"));
            let b = s.spawn(|| store.import(&tar, "race"));
            let c = s.spawn(|| store.import(&base, "race"));
            for r in [a.join().unwrap(), b.join().unwrap(), c.join().unwrap()] {
                if let Err(e) = r {
                    panic!("round {round}: {}", anyhow_like(&e));
                }
            }
        });
        let img = store.get("race").unwrap();
        for l in &img.layers {
            assert!(
                store.has_layer(l),
                "round {round}: {l} of the recorded image is gone"
            );
        }
    }
}
