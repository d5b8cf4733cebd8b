//! The dashboard's session cookie as a browser (or anyone) sends it, checked
//! the cluster-mode way: parsed, its MAC recomputed and compared; and the
//! same bytes as a bearer token checked against the token table.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cloudlink::api::sign_in::parse_signed(text);
        let signed = cloudlink::api::sign_in::SignIns::signed([7; 32]);
        let _ = signed.check(text, std::time::Instant::now());
        let _ = cloudlink::tokens::split(text);
        let tokens = cloudlink::tokens::Tokens::new("bootstrap-token-0123456789".into(), Vec::new());
        let _ = tokens.check(text, 0);
    }
});
