//! Image tars (`mig image import FILE`): rootfs tars and OCI archives. Needs root (owners,
//! device nodes of whiteouts).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let file = tmp.path().join("image.tar");
    let Ok(store) = mig_runtime::image::ImageStore::open(&tmp.path().join("store")) else {
        return;
    };
    if std::fs::write(&file, data).is_ok() {
        let _ = store.import(&file, "fuzz");
    }
});
