//! config.json: any text gives a config or a one-line error; a config's derived sizes never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = blackmamba::model::config::Config::from_json_str(text) {
            let _ = cfg.param_counts();
            let _ = blackmamba::model::weights::expected_tensors(&cfg).len();
        }
    }
});
