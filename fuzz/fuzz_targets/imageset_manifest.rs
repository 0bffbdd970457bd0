//! The image-set manifest (sent by a peer, inside exported checkpoints).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mig_migrate::imageset::parse_manifest(data);
});
