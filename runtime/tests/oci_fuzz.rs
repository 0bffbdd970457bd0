//! Property-style test of the OCI parsers (index, manifest, image config): thousands of mutated
//! documents, each re-hashed so that the mutation reaches the parser behind the digest check,
//! imported from an OCI layout. Every import must return an image or an error, never panic, and a
//! refused one leaves the store empty. Deterministic (fixed seed); `MIG_FUZZ_ITERS` runs longer.
//! Needs root (the store unpacks layers with their owners).

mod image_common;

use image_common::*;
use mig_runtime::image::ImageStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;

const LAYER_MT: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MT: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MT: &str = "application/vnd.oci.image.manifest.v1+json";

fn put_blob(layout: &Path, data: &[u8], media_type: &str) -> Value {
    let digest = sha256(data);
    fs::write(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        data,
    )
    .expect("writing a blob");
    json!({"mediaType": media_type, "digest": digest, "size": data.len()})
}

/// The valid documents of a one-layer image.
struct Docs {
    layer: Vec<u8>,
    config: Value,
    manifest: Value,
    index: Value,
}

fn docs() -> Docs {
    let layer = RawTar::default()
        .dir(b"bin/")
        .file(b"bin/tool", b"#!/bin/sh\necho hi\n")
        .finish();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/tool"], "Entrypoint": [],
                   "WorkingDir": "/", "User": "0:0"},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
    });
    Docs {
        layer,
        config,
        manifest: json!({"schemaVersion": 2, "mediaType": MANIFEST_MT, "config": {}, "layers": []}),
        index: json!({"schemaVersion": 2, "manifests": []}),
    }
}

/// A random JSON value, sometimes large or deep.
fn random_value(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..9) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(u64::MAX),
        4 => json!(-1.5e300),
        5 => json!("x".repeat(rng.gen_range(0..70_000))),
        6 => json!(["a", 1, null]),
        7 => {
            // Deeper than serde_json's recursion limit, sometimes.
            let depth = rng.gen_range(1..300);
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }
        _ => json!(format!("sha256:{}", "f".repeat(rng.gen_range(0..70)))),
    }
}

/// Replaces, removes or adds one field somewhere in `v`.
fn mutate_value(rng: &mut StdRng, v: &mut Value) {
    match v {
        Value::Object(map) if !map.is_empty() && rng.gen_bool(0.7) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = &keys[rng.gen_range(0..keys.len())];
            match rng.gen_range(0..4) {
                0 => {
                    map.remove(k);
                }
                1 => {
                    map.insert(k.clone(), random_value(rng));
                }
                _ => {
                    if let Some(child) = map.get_mut(k) {
                        mutate_value(rng, child);
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() && rng.gen_bool(0.7) => {
            let i = rng.gen_range(0..items.len());
            match rng.gen_range(0..4) {
                0 => {
                    items.remove(i);
                }
                1 => items.push(items[i].clone()),
                _ => mutate_value(rng, &mut items[i]),
            }
        }
        Value::Object(map) => {
            map.insert("unknown".into(), random_value(rng));
        }
        other => *other = random_value(rng),
    }
}

/// Serializes `v`, then sometimes damages the bytes (flips, truncation, junk).
fn to_bytes(rng: &mut StdRng, v: &Value) -> Vec<u8> {
    let mut b = v.to_string().into_bytes();
    match rng.gen_range(0..5) {
        0 if !b.is_empty() => {
            for _ in 0..rng.gen_range(1..6) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
        }
        1 if !b.is_empty() => b.truncate(rng.gen_range(0..b.len())),
        2 => b.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
        _ => {}
    }
    b
}

/// Writes a layout whose one document `target` (0 index, 1 manifest, 2 config) is mutated; the
/// digests above it are recomputed so the parser sees the mutation.
fn write_layout(rng: &mut StdRng, dir: &Path, d: &Docs, target: u32) {
    fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let layer = put_blob(dir, &d.layer, LAYER_MT);
    let mut config = d.config.clone();
    let config_bytes = if target == 2 {
        mutate_value(rng, &mut config);
        to_bytes(rng, &config)
    } else {
        config.to_string().into_bytes()
    };
    let cdesc = put_blob(dir, &config_bytes, CONFIG_MT);
    let mut manifest = d.manifest.clone();
    manifest["config"] = cdesc;
    manifest["layers"] = json!([layer]);
    let manifest_bytes = if target == 1 {
        mutate_value(rng, &mut manifest);
        to_bytes(rng, &manifest)
    } else {
        manifest.to_string().into_bytes()
    };
    let mdesc = put_blob(dir, &manifest_bytes, MANIFEST_MT);
    let mut index = d.index.clone();
    index["manifests"] = json!([mdesc]);
    let index_bytes = if target == 0 {
        mutate_value(rng, &mut index);
        to_bytes(rng, &index)
    } else {
        index.to_string().into_bytes()
    };
    fs::write(dir.join("index.json"), index_bytes).expect("index.json");
}

#[test]
fn mutated_oci_documents_never_panic() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let iters: u32 = std::env::var("MIG_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let d = docs();
    let tmp = tempfile::tempdir().expect("tempdir");
    // The unmutated layout imports: the mutations start from something the parser accepts.
    {
        let store = ImageStore::open(&tmp.path().join("store0")).expect("store");
        let mut rng = StdRng::seed_from_u64(1);
        let dir = tmp.path().join("valid");
        write_layout(&mut rng, &dir, &d, 3);
        store
            .import(&dir, "valid")
            .expect("the valid layout imports");
    }
    let mut rng = StdRng::seed_from_u64(0x6f63_6921);
    let (mut ok, mut refused) = (0u32, 0u32);
    for i in 0..iters {
        let dir = tmp.path().join(format!("l{i}"));
        let target = i % 3;
        write_layout(&mut rng, &dir, &d, target);
        let store_dir = tmp.path().join(format!("s{i}"));
        let store = ImageStore::open(&store_dir).expect("store");
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.import(&dir, "fuzz")));
        match r {
            Err(_) => panic!(
                "case {i} (document {target}) panicked; index {:?}",
                String::from_utf8_lossy(&fs::read(dir.join("index.json")).unwrap_or_default())
            ),
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => {
                refused += 1;
                assert_store_empty(&store);
            }
        }
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&store_dir);
    }
    eprintln!("{iters} mutated OCI layouts: {ok} imported, {refused} refused");
    assert!(
        refused > iters / 4,
        "too few mutations were refused: {refused}"
    );
}
