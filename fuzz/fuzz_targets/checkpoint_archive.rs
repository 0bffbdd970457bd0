//! Exported checkpoint archives (`mig restore --import FILE`), plain or zstd.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let file = tmp.path().join("in.tar");
    if std::fs::write(&file, data).is_ok() {
        let _ = mig_migrate::archive::import(&file, &tmp.path().join("out"));
    }
});
