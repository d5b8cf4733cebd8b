//! UDP datagrams into the sans-IO packet path with registered devices; the
//! input is a small program (see `harness/udp.rs`) so that handshakes
//! complete and transport packets, intact or corrupted, reach decryption.
#![no_main]

#[path = "../harness/udp.rs"]
mod udp;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    udp::run(data);
});
