//! Replays the UDP fuzz target's committed corpus through the same rig the
//! fuzzer runs, and shows that the corpus reaches past the message-type
//! check: handshakes complete, transport packets decrypt and reach the
//! sink, corrupted ones reach decryption and fail it, and cryptokey
//! routing refuses what it must. A corpus that only exercised the first
//! stage would fail here.

#[path = "../fuzz/harness/udp.rs"]
mod udp;

#[test]
fn the_udp_corpus_reaches_transport_decryption_after_a_handshake() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/udp_datagram");
    let mut total = udp::Reached::default();
    let mut files = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        total += udp::run(&data);
        files += 1;
    }
    assert!(files >= 8, "{files} corpus files");
    assert!(total.handshakes > 0, "{total:?}");
    assert!(total.delivered > 0, "{total:?}");
    assert!(total.decrypt_failed > 0, "{total:?}");
    assert!(total.routing_refused > 0, "{total:?}");
    println!("{files} inputs: {total:?}");
}
