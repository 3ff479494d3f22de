//! The torch pickle reader: any bytes give a state dict or an error, within the limits.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = blackmamba::model::pth::parse_pickle(data, Some("model"));
    let _ = blackmamba::model::pth::parse_pickle(data, None);
});
