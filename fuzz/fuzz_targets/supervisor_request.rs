//! The agent supervisor's request (tunnel port 48484, reachable by any
//! token holder through the proxy), with the supervisor's own caps.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cloudlink::agent::supervisor::parse(data);
});
