//! The safetensors reader: header, offsets and every tensor read onto the CPU.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = blackmamba::model::weights::parse_safetensors(data);
});
