//! Hostile input: random and mutated bytes fed to the decoders of untrusted input that no other
//! test fuzzes, with fixed seeds and bounded iteration counts (the file runs in seconds). Each
//! decoder must return an error or a valid value, never panic, and never allocate what a length
//! field claims before checking it against its limit.
//!
//! Covered here: migration wire frames, hellos and control messages (`mig_migrate::wire`), API
//! frames and requests (`mig_agent::api`), `ContainerSpec` JSON (serde, then `validate`), and
//! exported checkpoint archives (`mig_migrate::archive::import`). Fuzzed elsewhere, not repeated:
//! image-set manifests (migrate/src/imageset/tests.rs), the CRIU stats parser
//! (migrate/src/criu/stats.rs), image tars (runtime/tests/image_fuzz.rs).

use mig_agent::api::{self, frame, Request};
use mig_migrate::wire::{self, FileHeader, FileKind, Hello, Message, MigrationMode, Prepare};
use mig_runtime::image::{Image, ImageConfig};
use mig_runtime::spec::ContainerSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Applies 1 to 4 random edits: flip, set to a boundary value, insert, delete, truncate, repeat.
fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = v.len();
        match rng.gen_range(0..6) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = [0x00, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][rng.gen_range(0..7)];
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..8);
                for _ in 0..n {
                    v.insert(i, rng.gen());
                }
            }
            3 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(16));
                v.drain(i..i + n);
            }
            4 if len > 0 => v.truncate(rng.gen_range(0..len)),
            5 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(32));
                let chunk: Vec<u8> = v[i..i + n].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, chunk);
            }
            _ => {}
        }
    }
    v
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..max);
    (0..n).map(|_| rng.gen()).collect()
}

#[test]
fn wire_frames_and_messages() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let mut bases: Vec<Vec<u8>> = vec![
        wire::encode_frame(&Message::Commit, wire::MAX_CONTROL_FRAME).unwrap(),
        wire::encode_frame(&Message::Frozen, wire::MAX_CONTROL_FRAME).unwrap(),
        wire::encode_frame(
            &Message::PrepareOk {
                missing_layers: vec![format!("sha256:{}", "b".repeat(64))],
            },
            wire::MAX_CONTROL_FRAME,
        )
        .unwrap(),
        wire::encode_frame(&Hello::new("0.1.0", "host-a"), wire::MAX_CONTROL_FRAME).unwrap(),
        wire::encode_frame(
            &Message::Prepare(Box::new(prepare())),
            wire::MAX_CONTROL_FRAME,
        )
        .unwrap(),
        wire::encode_frame(&file_header(), wire::MAX_CONTROL_FRAME).unwrap(),
    ];
    // A frame announcing 4 GiB: refused on its length alone.
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 16]);
    assert!(wire::decode_frame::<Message>(&huge, wire::MAX_CONTROL_FRAME).is_err());
    bases.push(huge);
    let (mut ok, mut err) = (0u32, 0u32);
    for i in 0..20_000 {
        let bytes = if i % 4 == 0 {
            random_bytes(&mut rng, 256)
        } else {
            mutate(&mut rng, &bases[i % bases.len()])
        };
        match wire::decode_frame::<Message>(&bytes, wire::MAX_CONTROL_FRAME) {
            Ok(Some((m, used))) => {
                assert!(used <= bytes.len());
                // What a destination does first with a decoded Prepare: validate its spec.
                if let Message::Prepare(p) = &m {
                    let _ = p.spec.validate();
                }
                ok += 1;
            }
            Ok(None) => {}
            Err(_) => err += 1,
        }
        let payload = bytes.get(4..).unwrap_or_default();
        let _ = wire::decode_message(payload).map(|m| m.name());
        let _ = wire::decode_message(&bytes);
        let _ = Hello::decode(payload);
        let _ = Hello::decode(&bytes);
        if let Ok(Some((h, _))) = wire::decode_frame::<FileHeader>(&bytes, wire::MAX_CONTROL_FRAME)
        {
            if h.validate().is_ok() {
                assert!(!h.path.starts_with('/') && !h.path.split('/').any(|c| c == ".."));
            }
        }
    }
    eprintln!("wire frames: {ok} decoded, {err} refused");
    assert!(err > 0);
}

/// A migration's opening message, as a source sends it.
fn prepare() -> Prepare {
    Prepare {
        migration_id: "0123456789abcdef0123456789abcdef".into(),
        spec: spec(),
        image: Image {
            name: "busybox".into(),
            id: format!("sha256:{}", "a".repeat(64)),
            layers: vec![format!("sha256:{}", "b".repeat(64))],
            config: ImageConfig::default(),
            created: 1,
            size: 1 << 20,
        },
        criu_version: "4.1.1".into(),
        kernel: "6.18.0".into(),
        bytes_estimate: 1 << 30,
        mode: MigrationMode::PreCopy,
    }
}

fn file_header() -> FileHeader {
    FileHeader {
        kind: FileKind::Image,
        path: "images/pages-1.img".into(),
        size: 4096,
        sha256: [7; 32],
    }
}

/// A valid spec, as `containers/<id>/spec.json` holds it.
const SPEC_JSON: &str = r#"{"id":"0123456789abcdef0123456789abcdef","name":"web",
"image":{"name":"busybox","id":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
"layers":["sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"]},
"process":{"args":["sh","-c","echo hi"],"env":["PATH=/bin"],"cwd":"/","uid":0,"gid":0},
"hostname":"web","limits":{"memory":67108864,"cpu_millis":null,"pids":50},
"userns":{"host_id":100000,"size":65536}}"#;

fn spec() -> ContainerSpec {
    let s: ContainerSpec = serde_json::from_str(SPEC_JSON).unwrap();
    s.validate().unwrap();
    s
}

#[test]
fn container_spec_json() {
    let _ = spec();
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let (mut parsed, mut valid) = (0u32, 0u32);
    for i in 0..20_000 {
        let bytes = if i % 10 == 0 {
            random_bytes(&mut rng, 200)
        } else {
            mutate(&mut rng, SPEC_JSON.as_bytes())
        };
        if let Ok(s) = serde_json::from_slice::<ContainerSpec>(&bytes) {
            parsed += 1;
            if s.validate().is_ok() {
                valid += 1;
                // A valid spec survives a round trip unchanged.
                let again: ContainerSpec =
                    serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
                assert_eq!(again, s);
            }
        }
    }
    eprintln!("specs: {parsed} parsed, {valid} valid");
    // Hand-made hostile values: each is refused by validate.
    let hostile = [
        ("id", serde_json::json!("../../etc")),
        ("name", serde_json::json!("../x")),
        ("hostname", serde_json::json!("a\u{0}b")),
        ("hostname", serde_json::json!("x".repeat(300))),
    ];
    for (field, value) in hostile {
        let mut v: serde_json::Value = serde_json::from_str(SPEC_JSON).unwrap();
        v[field] = value;
        let s: ContainerSpec = serde_json::from_value(v).unwrap();
        assert!(s.validate().is_err(), "{field} accepted");
    }
    let mut v: serde_json::Value = serde_json::from_str(SPEC_JSON).unwrap();
    v["process"]["cwd"] = serde_json::json!("relative");
    let s: ContainerSpec = serde_json::from_value(v).unwrap();
    assert!(s.validate().is_err(), "relative cwd accepted");
    let mut v: serde_json::Value = serde_json::from_str(SPEC_JSON).unwrap();
    v["image"]["layers"] = serde_json::json!(["sha256:../../x"]);
    let s: ContainerSpec = serde_json::from_value(v).unwrap();
    assert!(s.validate().is_err(), "bad layer digest accepted");
}

#[test]
fn api_frames_and_requests() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let frame_of = |json: &[u8]| {
        let mut v = (json.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(json);
        v
    };
    let requests = [
        Request::PeerList,
        Request::Move {
            container: "web".into(),
            peer: "host-b".into(),
            tcp_established: false,
            mode: None,
            max_downtime_ms: None,
            no_memory_presync: false,
        },
        Request::PeerAdd {
            name: "host-b".into(),
            address: "10.0.0.2:7443".into(),
            fingerprint: "ab".repeat(32),
        },
    ];
    let mut bases: Vec<Vec<u8>> = requests
        .iter()
        .map(|r| frame_of(&serde_json::to_vec(r).unwrap()))
        .collect();
    bases.push(frame_of(
        &serde_json::to_vec(&api::Hello::new("mig")).unwrap(),
    ));
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let (mut ok, mut err) = (0u32, 0u32);
    rt.block_on(async {
        // A length above MAX_FRAME is refused before anything is allocated.
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff, b'{'];
        assert!(matches!(
            frame::read_frame::<Request, _>(&mut huge).await,
            Err(frame::FrameError::TooLarge { .. })
        ));
        for i in 0..20_000 {
            let bytes = if i % 5 == 0 {
                random_bytes(&mut rng, 128)
            } else {
                mutate(&mut rng, &bases[i % bases.len()])
            };
            let mut r: &[u8] = &bytes;
            match frame::read_frame::<Request, _>(&mut r).await {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
            let mut r: &[u8] = &bytes;
            let _ = frame::read_frame::<api::Hello, _>(&mut r).await;
            let _ = serde_json::from_slice::<Request>(bytes.get(4..).unwrap_or_default());
        }
    });
    eprintln!("api frames: {ok} decoded, {err} refused");
    assert!(err > 0);
}

#[test]
fn mutated_archives_are_refused_or_imported() {
    use mig_migrate::archive;
    use mig_migrate::imageset::{self, SealInfo};
    let t = tempfile::tempdir().unwrap();
    let set = t.path().join("set");
    std::fs::create_dir(&set).unwrap();
    std::fs::write(set.join("pages-1.img"), vec![0x5a; 20_000]).unwrap();
    std::fs::write(set.join("core-1.img"), b"core").unwrap();
    imageset::seal(
        &set,
        SealInfo {
            spec: spec(),
            criu_version: "4.1.1".into(),
            pid_map: vec![],
            stdio_pipe: None,
            stats: None,
        },
    )
    .unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/conf"), b"x=1\n").unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let (mut ok, mut err) = (0u32, 0u32);
    for zstd in [false, true] {
        let out = t.path().join(format!("c-{zstd}.tar"));
        archive::export(&set, Some(&upper), &out, zstd).unwrap();
        let base = std::fs::read(&out).unwrap();
        for i in 0..150 {
            let bytes = mutate(&mut rng, &base);
            let file = t.path().join("mutated.tar");
            std::fs::write(&file, &bytes).unwrap();
            let dest = t.path().join(format!("dest-{zstd}-{i}"));
            match archive::import(&file, &dest) {
                Ok(m) => {
                    // Whatever was accepted verifies against its own manifest.
                    ok += 1;
                    let v = imageset::verify(&dest).unwrap();
                    assert_eq!(v.files.len(), m.files.len());
                }
                Err(_) => err += 1,
            }
            let _ = std::fs::remove_dir_all(&dest);
        }
    }
    eprintln!("archives: {ok} imported, {err} refused");
    assert!(err > 0);
}
