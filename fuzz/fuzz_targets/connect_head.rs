//! The CONNECT proxy's request head, as any client on the proxy port sends it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cloudlink::relay::proxy::parse_connect(data);
});
