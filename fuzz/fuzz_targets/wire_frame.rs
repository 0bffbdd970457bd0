//! Migration wire: frames, messages and the hello, as a peer sends them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mig_migrate::wire::{decode_frame, decode_message, Hello, Message, MAX_CONTROL_FRAME};

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<Message>(data, MAX_CONTROL_FRAME);
    let _ = decode_frame::<Hello>(data, MAX_CONTROL_FRAME);
    let _ = decode_message(data);
    let _ = Hello::decode(data);
});
