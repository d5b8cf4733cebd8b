//! The patch must compute what x25519-dalek computes, bit for bit: RFC
//! 7748's test vectors, then random and adversarial inputs against
//! curve25519-dalek's own Montgomery ladder (the arithmetic x25519-dalek 2
//! calls).

use curve25519_dalek::montgomery::MontgomeryPoint;
use rand_core::{OsRng, RngCore};
use x25519_dalek::{x25519, EphemeralSecret, PublicKey, ReusableSecret, StaticSecret};

fn hex(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

fn dalek(k: [u8; 32], u: [u8; 32]) -> [u8; 32] {
    MontgomeryPoint(u).mul_clamped(k).to_bytes()
}

fn dalek_base(k: [u8; 32]) -> [u8; 32] {
    MontgomeryPoint::mul_base_clamped(k).to_bytes()
}

#[test]
fn rfc7748_section_5_2_vectors() {
    let k = hex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
    let u = hex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
    let want = hex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552");
    assert_eq!(x25519(k, u), want);
    // The second vector's u has its top bit set: it must be ignored.
    let k = hex("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d");
    let u = hex("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493");
    let want = hex("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957");
    assert_eq!(x25519(k, u), want);
}

#[test]
fn rfc7748_section_6_1_diffie_hellman() {
    let alice = StaticSecret::from(hex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let bob = StaticSecret::from(hex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    let alice_pub = PublicKey::from(&alice);
    let bob_pub = PublicKey::from(&bob);
    assert_eq!(
        alice_pub.to_bytes(),
        hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    assert_eq!(
        bob_pub.to_bytes(),
        hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    );
    let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    assert_eq!(alice.diffie_hellman(&bob_pub).to_bytes(), shared);
    assert_eq!(bob.diffie_hellman(&alice_pub).to_bytes(), shared);
    assert!(alice.diffie_hellman(&bob_pub).was_contributory());
}

#[test]
fn random_keys_agree_with_curve25519_dalek() {
    for _ in 0..2000 {
        let mut k = [0u8; 32];
        let mut u = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        OsRng.fill_bytes(&mut u);
        assert_eq!(x25519(k, u), dalek(k, u), "k={k:02x?} u={u:02x?}");
        let s = StaticSecret::from(k);
        assert_eq!(PublicKey::from(&s).to_bytes(), dalek_base(k));
        assert_eq!(
            s.diffie_hellman(&PublicKey::from(u)).to_bytes(),
            dalek(k, u)
        );
        // Secrets keep the caller's bytes, unclamped, as x25519-dalek's do.
        assert_eq!(s.to_bytes(), k);
    }
}

/// u-coordinates that a careless implementation gets wrong: zero, one,
/// points of small order (all-zero result), p and values above it (must
/// be reduced), and each of those with the top bit set (must be ignored).
#[test]
fn adversarial_peer_keys_agree_with_curve25519_dalek() {
    let p = hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
    let mut us = vec![
        [0u8; 32],
        X25519_ONE,
        hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        p,
        hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        [0xff; 32],
    ];
    for u in us.clone() {
        let mut top = u;
        top[31] |= 0x80;
        us.push(top);
    }
    for u in us {
        for _ in 0..50 {
            let mut k = [0u8; 32];
            OsRng.fill_bytes(&mut k);
            let ours = StaticSecret::from(k).diffie_hellman(&PublicKey::from(u));
            let theirs = dalek(k, u);
            assert_eq!(ours.to_bytes(), theirs, "u={u:02x?}");
            assert_eq!(ours.was_contributory(), theirs != [0u8; 32], "u={u:02x?}");
        }
    }
}

const X25519_ONE: [u8; 32] = {
    let mut b = [0u8; 32];
    b[0] = 1;
    b
};

#[test]
fn every_secret_type_agrees() {
    let a = StaticSecret::random_from_rng(OsRng);
    let b = ReusableSecret::random_from_rng(OsRng);
    let c = EphemeralSecret::random_from_rng(OsRng);
    let (pa, pb, pc) = (
        PublicKey::from(&a),
        PublicKey::from(&b),
        PublicKey::from(&c),
    );
    assert_eq!(
        a.diffie_hellman(&pb).to_bytes(),
        b.diffie_hellman(&pa).to_bytes()
    );
    let ca = a.diffie_hellman(&pc).to_bytes();
    assert_eq!(c.diffie_hellman(&pa).to_bytes(), ca);
}
