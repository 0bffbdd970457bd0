//! An OCI layout's index.json (the manifests and configs behind it are digest-checked, so the
//! index is what arrives unverified; runtime/tests/oci_fuzz.rs re-hashes mutated manifests and
//! configs to reach their parsers too).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let layout = tmp.path().join("layout");
    let _ = std::fs::create_dir_all(layout.join("blobs/sha256"));
    let _ = std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
    let _ = std::fs::write(layout.join("index.json"), data);
    if let Ok(store) = mig_runtime::image::ImageStore::open(&tmp.path().join("store")) {
        let _ = store.import(&layout, "fuzz");
    }
});
