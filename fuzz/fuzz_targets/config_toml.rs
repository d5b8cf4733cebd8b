//! The gateway's TOML configuration file, parsed, merged over the
//! defaults and validated.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(file) = cloudlink::config::ServeArgs::from_toml(text) {
            let _ = cloudlink::config::ServeArgs::default().resolve_over(file);
        }
    }
});
