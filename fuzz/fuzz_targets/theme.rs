//! User theme files (TOML over a built-in theme).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = blackmamba::tui::theme::Theme::from_user_toml(text, "fuzz.toml");
    }
});
