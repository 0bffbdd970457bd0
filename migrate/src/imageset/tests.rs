use super::*;
use mig_runtime::spec::{ImageRef, Limits, ProcessSpec};
use rand::{Rng, SeedableRng};

pub(crate) fn sample_spec() -> ContainerSpec {
    ContainerSpec {
        id: "0123456789abcdef0123456789abcdef".into(),
        name: "web".into(),
        image: ImageRef {
            name: "busybox".into(),
            id: format!("sha256:{}", "a".repeat(64)),
            layers: vec![format!("sha256:{}", "b".repeat(64))],
        },
        process: ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        },
        hostname: "web".into(),
        limits: Limits::default(),
        userns: None,
        net: None,
    }
}

pub(crate) fn sample_info() -> SealInfo {
    SealInfo {
        spec: sample_spec(),
        criu_version: "4.1.1".into(),
        pid_map: vec![PidEntry {
            ns_pid: 1,
            host_pid: 1234,
            cmd: "sh".into(),
        }],
        stdio_pipe: Some("pipe:[42]".into()),
        stats: Some(DumpStats {
            pages_written: 3,
            ..Default::default()
        }),
    }
}

/// A sealed set with a few files (one in a subdirectory) and a log.
fn sealed() -> (tempfile::TempDir, Manifest) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("pages-1.img"), vec![7u8; 100_000]).unwrap();
    std::fs::write(d.path().join("core-1.img"), b"core").unwrap();
    std::fs::write(d.path().join("empty.img"), b"").unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::fs::write(d.path().join("sub/x.img"), b"x").unwrap();
    std::fs::write(d.path().join("dump.log"), b"log").unwrap();
    let m = seal(d.path(), sample_info()).unwrap();
    (d, m)
}

#[test]
fn seal_then_verify() {
    let (d, m) = sealed();
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["core-1.img", "empty.img", "pages-1.img", "sub/x.img"]
    );
    assert_eq!(m.files[2].size, 100_000);
    assert_eq!(verify(d.path()).unwrap(), m);
    // Logs may change (a restore appends its own) without breaking the set.
    std::fs::write(d.path().join("restore.log"), b"more").unwrap();
    verify(d.path()).unwrap();
}

#[test]
fn flipped_byte_is_refused() {
    let (d, _) = sealed();
    let p = d.path().join("pages-1.img");
    let mut b = std::fs::read(&p).unwrap();
    b[5000] ^= 1;
    std::fs::write(&p, b).unwrap();
    match verify(d.path()) {
        Err(ImageSetError::HashMismatch { path, .. }) => assert_eq!(path, "pages-1.img"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_file_is_refused() {
    let (d, _) = sealed();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("pages-1.img"))
        .unwrap();
    f.set_len(4096).unwrap();
    match verify(d.path()) {
        Err(ImageSetError::SizeMismatch {
            path,
            expected,
            actual,
        }) => assert_eq!(
            (path.as_str(), expected, actual),
            ("pages-1.img", 100_000, 4096)
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn extra_and_missing_files_are_refused() {
    let (d, _) = sealed();
    std::fs::write(d.path().join("sub/evil.img"), b"!").unwrap();
    match verify(d.path()) {
        Err(ImageSetError::Extra { path }) => assert_eq!(path, "sub/evil.img"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(d.path().join("sub/evil.img")).unwrap();
    std::fs::remove_file(d.path().join("core-1.img")).unwrap();
    match verify(d.path()) {
        Err(ImageSetError::Missing { path }) => assert_eq!(path, "core-1.img"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn symlinks_are_refused() {
    let (d, _) = sealed();
    std::os::unix::fs::symlink("/etc/passwd", d.path().join("link.img")).unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::NotRegular { .. })
    ));
}

#[test]
fn only_a_precopy_parent_link_is_left_out() {
    let (d, _) = sealed();
    let link = d.path().join("parent");
    for bad in [
        "/etc",
        "../rounds/x",
        "../rounds/01",
        "../rounds/1/..",
        "rounds/1",
        "../other/1",
    ] {
        std::os::unix::fs::symlink(bad, &link).unwrap();
        assert!(
            matches!(verify(d.path()), Err(ImageSetError::NotRegular { .. })),
            "{bad}"
        );
        std::fs::remove_file(&link).unwrap();
    }
    std::os::unix::fs::symlink("../rounds/3", &link).unwrap();
    verify(d.path()).unwrap();
    // Only at the top: a `parent` link deeper in is refused.
    std::fs::remove_file(&link).unwrap();
    std::fs::create_dir(d.path().join("deep")).unwrap();
    std::os::unix::fs::symlink("../rounds/3", d.path().join("deep/parent")).unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::NotRegular { .. })
    ));
}

fn rewrite(d: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn unknown_version_and_format_are_refused() {
    let (d, _) = sealed();
    rewrite(d.path(), |v| v["version"] = 2.into());
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::Version { .. })
    ));
    rewrite(d.path(), |v| {
        v["version"] = 1.into();
        v["format"] = "tarball".into();
    });
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::Format { .. })
    ));
}

#[test]
fn hostile_entries_are_refused() {
    for bad_path in [
        "../etc/passwd",
        "/abs",
        "a//b",
        "manifest.json",
        "x.log",
        "",
    ] {
        let (d, _) = sealed();
        rewrite(d.path(), |v| v["files"][0]["path"] = bad_path.into());
        assert!(
            matches!(verify(d.path()), Err(ImageSetError::BadEntry { .. })),
            "{bad_path:?} accepted"
        );
    }
    let (d, _) = sealed();
    rewrite(d.path(), |v| v["files"][0]["sha256"] = "zz".into());
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::BadEntry { .. })
    ));
    let (d, _) = sealed();
    rewrite(d.path(), |v| v["spec"]["id"] = "../../x".into());
    assert!(matches!(verify(d.path()), Err(ImageSetError::Spec(_))));
    let (d, _) = sealed();
    rewrite(d.path(), |v| v["surprise"] = 1.into());
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::ManifestJson(_))
    ));
}

#[test]
fn oversized_manifest_is_refused_before_reading() {
    let (d, _) = sealed();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join(MANIFEST))
        .unwrap();
    f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::ManifestTooBig { .. })
    ));
}

#[test]
fn mutated_manifest_bytes_never_panic() {
    let (d, _) = sealed();
    let good = std::fs::read(d.path().join(MANIFEST)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..rng.gen_range(1..8) {
            let i = rng.gen_range(0..b.len());
            b[i] = rng.gen();
        }
        if rng.gen_bool(0.2) {
            b.truncate(rng.gen_range(0..b.len()));
        }
        let _ = parse_manifest(&b);
    }
}

/// Flips one byte of `pages-1.img` (same size, other content).
fn alter_pages(d: &Path) {
    let p = d.join("pages-1.img");
    let mut data = std::fs::read(&p).unwrap();
    data[10] ^= 0xff;
    std::fs::write(&p, data).unwrap();
}

#[test]
fn arrival_note_of_the_parent_skips_hashing_once() {
    let (d, _) = sealed();
    let note = arrival_note_path(d.path());
    write_arrival_note(d.path(), std::os::unix::process::parent_id()).unwrap();
    // Contents are not re-hashed for the parent's note (the parent hashed them as they arrived)…
    alter_pages(d.path());
    let (_, how) = verify_or_trust(d.path()).unwrap();
    assert_eq!(how, Checked::Trusted);
    // …and the note is used once: the next check hashes and finds the change.
    assert!(!note.exists());
    let err = verify_or_trust(d.path()).unwrap_err();
    assert!(matches!(err, ImageSetError::HashMismatch { .. }), "{err}");
}

#[test]
fn arrival_note_of_another_process_or_manifest_is_not_trusted() {
    let (d, _) = sealed();
    let note = arrival_note_path(d.path());
    alter_pages(d.path());
    // A restarted agent (another PID) cannot know what arrived: everything is hashed.
    write_arrival_note(d.path(), std::process::id()).unwrap();
    let err = verify_or_trust(d.path()).unwrap_err();
    assert!(matches!(err, ImageSetError::HashMismatch { .. }), "{err}");
    assert!(!note.exists());
    // A manifest changed since the note: hashed too.
    write_arrival_note(d.path(), std::os::unix::process::parent_id()).unwrap();
    let mut m = read_manifest(d.path()).unwrap();
    m.created += 1;
    write_manifest(d.path(), &m).unwrap();
    let err = verify_or_trust(d.path()).unwrap_err();
    assert!(matches!(err, ImageSetError::HashMismatch { .. }), "{err}");
    // Sizes and listing are always checked.
    let (d, _) = sealed();
    let note = arrival_note_path(d.path());
    write_arrival_note(d.path(), std::os::unix::process::parent_id()).unwrap();
    assert!(note.exists());
    std::fs::write(d.path().join("core-1.img"), b"core!").unwrap();
    let err = verify_or_trust(d.path()).unwrap_err();
    assert!(matches!(err, ImageSetError::SizeMismatch { .. }), "{err}");
}

/// Size and digest of every file of `d`, as a sender hashing them while sending has them.
fn digests_of(d: &Path) -> BTreeMap<String, (u64, [u8; 32])> {
    list_files(d)
        .unwrap()
        .into_iter()
        .map(|rel| {
            let (size, hex_sha) = hash_file(&d.join(&rel)).unwrap();
            let mut sha = [0u8; 32];
            hex::decode_to_slice(hex_sha, &mut sha).unwrap();
            (rel, (size, sha))
        })
        .collect()
}

#[test]
fn seal_hashed_writes_what_seal_writes() {
    let (d, sealed) = sealed();
    let hashed = seal_hashed(d.path(), draft(sample_info()), &digests_of(d.path())).unwrap();
    assert_eq!(hashed.files, sealed.files);
    assert_eq!(
        Manifest {
            created: sealed.created,
            ..hashed.clone()
        },
        sealed
    );
    assert_eq!(verify(d.path()).unwrap(), hashed);
}

#[test]
fn seal_hashed_refuses_a_missing_digest_or_another_size() {
    let (d, _) = sealed();
    let mut digests = digests_of(d.path());
    digests.remove("sub/x.img");
    assert!(matches!(
        seal_hashed(d.path(), draft(sample_info()), &digests),
        Err(ImageSetError::NoDigest { path }) if path == "sub/x.img"
    ));
    let mut digests = digests_of(d.path());
    if let Some(e) = digests.get_mut("core-1.img") {
        e.0 += 1;
    }
    assert!(matches!(
        seal_hashed(d.path(), draft(sample_info()), &digests),
        Err(ImageSetError::SizeMismatch { path, .. }) if path == "core-1.img"
    ));
    // A wrong digest is not caught here (nothing is hashed): verify finds it.
    let mut digests = digests_of(d.path());
    if let Some(e) = digests.get_mut("pages-1.img") {
        e.1[0] ^= 1;
    }
    seal_hashed(d.path(), draft(sample_info()), &digests).unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::HashMismatch { path, .. }) if path == "pages-1.img"
    ));
}
