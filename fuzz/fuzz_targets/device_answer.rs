//! A device's answer to an action, complete or cut short by its close.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cloudlink::actions::parse_answer(data, false);
    let _ = cloudlink::actions::parse_answer(data, true);
});
