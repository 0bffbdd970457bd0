//! The local API's request payloads (one JSON document per frame).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mig_agent::api::Request;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Request>(data);
});
