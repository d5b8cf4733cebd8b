//! The agent's reader of the wg-quick file the API hands out.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cloudlink::agent::wg_quick::parse(text);
    }
});
