//! Frames and messages: async codec over a byte pipe, bounds, hello versions, hostile bytes.

use mig_migrate::wire::{
    decode_frame, decode_message, encode_frame, read_frame, write_frame, AbortReason, DigestAt,
    FileHeader, FileKind, Hello, Message, MigrationMode, Phase, Prepare, Version, WireError,
    DIGEST_FOLLOWS, MAGIC, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use mig_runtime::image::{Image, ImageConfig};
use mig_runtime::pidmap::PidEntry;
use mig_runtime::spec::{ContainerSpec, IdMap, ImageRef, Limits, ProcessSpec};
use rand::{Rng, RngCore, SeedableRng};

fn prepare() -> Prepare {
    let image = Image {
        name: "busybox".into(),
        id: format!("sha256:{}", "a".repeat(64)),
        layers: vec![format!("sha256:{}", "b".repeat(64))],
        config: ImageConfig {
            env: vec!["PATH=/bin".into()],
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            workdir: "/".into(),
            user: "0:0".into(),
        },
        created: 1_700_000_000,
        size: 1 << 20,
    };
    Prepare {
        migration_id: "0123456789abcdef0123456789abcdef".into(),
        spec: ContainerSpec {
            id: "f".repeat(32),
            name: "web".into(),
            image: ImageRef {
                name: image.name.clone(),
                id: image.id.clone(),
                layers: image.layers.clone(),
            },
            process: ProcessSpec {
                args: vec!["httpd".into(), "-f".into()],
                env: vec!["A=b".into()],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
            },
            hostname: "web".into(),
            limits: Limits {
                memory: Some(256 << 20),
                cpu_millis: None,
                pids: Some(64),
            },
            userns: Some(IdMap {
                host_id: 100_000,
                size: 65536,
            }),
            net: None,
        },
        image,
        criu_version: "4.1.1".into(),
        kernel: "6.18.0".into(),
        bytes_estimate: 123_456_789,
        mode: MigrationMode::PreCopy,
    }
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Prepare(Box::new(prepare())),
        Message::PrepareOk {
            missing_layers: vec![format!("sha256:{}", "b".repeat(64))],
        },
        Message::Refused {
            reason: mig_migrate::wire::RefuseReason::DiskFull,
            detail: "need 1 GiB".into(),
        },
        Message::TransferDone {
            phase: Phase::Final,
            files: 12,
            bytes: 1 << 33,
        },
        Message::TransferOk {
            phase: Phase::Presync,
        },
        Message::Frozen,
        Message::DumpDone,
        Message::Restored {
            pid_map: vec![PidEntry {
                ns_pid: 1,
                host_pid: 4242,
                cmd: "httpd -f".into(),
            }],
        },
        Message::Commit,
        Message::Committed,
        Message::Abort {
            reason: AbortReason::RestoreFailed,
            detail: "criu restore exited 1".into(),
        },
        Message::Resolve {
            migration_id: "x".into(),
            source: mig_migrate::wire::SourceView::CommitSent,
        },
        Message::Resolved {
            migration_id: "x".into(),
            dest: mig_migrate::wire::DestView::Committed,
            outcome: mig_migrate::wire::Resolution::Committed,
        },
    ]
}

#[tokio::test]
async fn every_message_roundtrips_over_a_stream() {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let msgs = all_messages();
    let sent = msgs.clone();
    let writer = tokio::spawn(async move {
        for m in &sent {
            write_frame(&mut a, m, MAX_CONTROL_FRAME).await.unwrap();
        }
    });
    for m in &msgs {
        let got: Message = read_frame(&mut b, MAX_CONTROL_FRAME)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, m);
    }
    writer.await.unwrap();
    // Clean end of stream between frames.
    assert!(read_frame::<Message, _>(&mut b, MAX_CONTROL_FRAME)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn oversized_length_refused_before_reading_payload() {
    let (mut a, mut b) = tokio::io::duplex(64);
    use tokio::io::AsyncWriteExt;
    a.write_all(&(MAX_CONTROL_FRAME + 1).to_le_bytes())
        .await
        .unwrap();
    let err = read_frame::<Message, _>(&mut b, MAX_CONTROL_FRAME)
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
}

#[tokio::test]
async fn truncated_frame_is_an_error() {
    let (mut a, mut b) = tokio::io::duplex(64);
    use tokio::io::AsyncWriteExt;
    let f = encode_frame(&Message::Commit, MAX_CONTROL_FRAME).unwrap();
    a.write_all(&f[..f.len() - 1]).await.unwrap();
    let mut f2 = 10u32.to_le_bytes().to_vec();
    f2.truncate(3);
    drop(a);
    let err = read_frame::<FileHeader, _>(&mut b, MAX_CONTROL_FRAME)
        .await
        .unwrap_err();
    assert!(
        matches!(err, WireError::Truncated { .. } | WireError::Decode { .. }),
        "{err}"
    );
}

#[test]
fn hello_versions() {
    let ours = Hello::new("0.1.0", "host-a");
    let bytes = postcard::to_stdvec(&ours).unwrap();
    assert_eq!(Hello::decode(&bytes).unwrap(), ours);

    // A minor bump with extra trailing fields is accepted.
    let newer = (
        MAGIC,
        Version {
            major: PROTOCOL_VERSION.major,
            minor: PROTOCOL_VERSION.minor + 3,
        },
        "0.9.0",
        "host-b",
        42u64,
    );
    let h = Hello::decode(&postcard::to_stdvec(&newer).unwrap()).unwrap();
    assert_eq!(h.agent_name, "host-b");

    // Another major, even with another layout, is refused naming both versions.
    let other = (MAGIC, Version { major: 2, minor: 0 }, 7u8);
    let err = Hello::decode(&postcard::to_stdvec(&other).unwrap()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WireError::VersionMismatch { .. }));
    assert!(
        text.contains(&PROTOCOL_VERSION.to_string()) && text.contains("2.0"),
        "{text}"
    );

    let bad = (*b"HTTP", PROTOCOL_VERSION, "x", "y");
    assert!(matches!(
        Hello::decode(&postcard::to_stdvec(&bad).unwrap()),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn file_header_paths() {
    let h = |p: &str| FileHeader {
        kind: FileKind::Image,
        path: p.into(),
        size: 1,
        sha256: [0; 32],
    };
    assert!(h("images/pages-1.img").validate().is_ok());
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "a/../../b",
        "a//b",
        "./a",
        "a\0b",
    ] {
        assert!(h(bad).validate().is_err(), "{bad:?} accepted");
    }
    assert!(h(&"a".repeat(5000)).validate().is_err());
}

#[test]
fn hostile_bytes_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let valid: Vec<Vec<u8>> = all_messages()
        .iter()
        .map(|m| encode_frame(m, MAX_CONTROL_FRAME).unwrap())
        .collect();
    for i in 0..20_000 {
        let mut buf = if i % 2 == 0 {
            let mut b = vec![0u8; rng.gen_range(0..256)];
            rng.fill_bytes(&mut b);
            b
        } else {
            // Mutations of valid frames.
            let mut b = valid[i % valid.len()].clone();
            for _ in 0..rng.gen_range(1..4) {
                let j = rng.gen_range(0..b.len());
                b[j] ^= 1 << rng.gen_range(0..8);
            }
            b
        };
        let _ = decode_frame::<Message>(&buf, MAX_CONTROL_FRAME);
        let _ = decode_message(&buf);
        let _ = Hello::decode(&buf);
        let _ = FileHeader::decode_payload(&buf);
        buf.truncate(buf.len() / 2);
        let _ = decode_frame::<FileHeader>(&buf, MAX_CONTROL_FRAME);
    }
}

#[tokio::test]
async fn file_header_digest_forms() {
    let h = FileHeader {
        kind: FileKind::Image,
        path: "pages-1.img".into(),
        size: 1 << 30,
        sha256: [7; 32],
    };
    // The 1.0 form is the header alone, byte for byte what mig 0.1.0 writes and reads.
    let old = h.encode_frame(DigestAt::Header).unwrap();
    assert_eq!(old, encode_frame(&h, MAX_CONTROL_FRAME).unwrap());
    assert_eq!(
        FileHeader::read(&mut &old[..]).await.unwrap(),
        Some((h.clone(), DigestAt::Header))
    );
    // The 1.1 form: a zero digest and one byte more, which a 1.0 reader refuses (it is only
    // sent to a 1.1 peer).
    let new = h.encode_frame(DigestAt::Trailer).unwrap();
    assert_eq!(new[new.len() - 1], DIGEST_FOLLOWS);
    let zero = FileHeader {
        sha256: [0; 32],
        ..h.clone()
    };
    assert_eq!(
        FileHeader::read(&mut &new[..]).await.unwrap(),
        Some((zero, DigestAt::Trailer))
    );
    assert!(matches!(
        read_frame::<FileHeader, _>(&mut &new[..], MAX_CONTROL_FRAME).await,
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
    // A digest in the header and the flag, another flag, or more bytes: refused.
    let both = postcard::to_stdvec(&(&h, DIGEST_FOLLOWS)).unwrap();
    assert!(matches!(
        FileHeader::decode_payload(&both),
        Err(WireError::BadTrailerHeader)
    ));
    let mut other = new[4..].to_vec();
    *other.last_mut().unwrap() = 2;
    assert!(matches!(
        FileHeader::decode_payload(&other),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
    let mut more = new[4..].to_vec();
    more.push(0);
    assert!(matches!(
        FileHeader::decode_payload(&more),
        Err(WireError::TrailingBytes { extra: 2, .. })
    ));
    assert_eq!(FileHeader::read(&mut &[][..]).await.unwrap(), None);
}
