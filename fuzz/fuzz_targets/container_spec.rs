//! The container spec (in a Prepare, in an imported checkpoint): decoded, then validated.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mig_runtime::spec::ContainerSpec;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<ContainerSpec>(data) {
        let _ = spec.validate();
    }
});
