//! X25519 implementations available as crates here, in one criterion run
//! (issue "Ahead of every peer", item 2):
//!
//! - curve25519-dalek 4, the arithmetic of crates.io's x25519-dalek 2 (what
//!   boringtun calls): a serial Montgomery ladder on 64-bit limbs whatever
//!   the backend (its SIMD backends speed up Edwards arithmetic only);
//! - AWS-LC (aws-lc-sys, s2n-bignum's assembly), through `x25519_dalek`,
//!   which the gateway patches to x25519-aws-lc/: what boringtun and the
//!   gateway compute with;
//! - `ring` (in the tree through async-nats; fiat-crypto field arithmetic,
//!   assembly on x86_64), which offers X25519 through ephemeral keys only:
//!   its figures include generating one (a fixed-base multiplication and 32
//!   random bytes), so "ring agree" is keygen + variable-base, and the
//!   variable-base cost alone is that minus "ring keygen".
//!
//! Each is measured as
//! - variable base: a shared secret from a peer's public key (five of
//!   these in a first contact through boringtun, three in a rekey);
//! - fixed base: a public key from a secret (the ephemeral key, once per
//!   handshake; boringtun's `Tunn::new` does one more).
//!
//! Run: `cargo bench --bench x25519`.

use criterion::{criterion_group, criterion_main, Criterion};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;
use std::hint::black_box;
use x25519_dalek::{PublicKey, StaticSecret};

fn x25519(c: &mut Criterion) {
    let mut g = c.benchmark_group("x25519");
    let a = StaticSecret::random_from_rng(rand_core::OsRng);
    let b = PublicKey::from(&StaticSecret::random_from_rng(rand_core::OsRng));
    // x25519-dalek 2's diffie_hellman and PublicKey::from, one call each.
    let (a_bytes, b_point) = (a.to_bytes(), MontgomeryPoint(b.to_bytes()));
    g.bench_function("curve25519-dalek variable base (mul_clamped)", |i| {
        i.iter(|| black_box(black_box(b_point).mul_clamped(black_box(a_bytes))))
    });
    g.bench_function("curve25519-dalek fixed base (mul_base_clamped)", |i| {
        i.iter(|| black_box(MontgomeryPoint::mul_base_clamped(black_box(a_bytes))))
    });
    g.bench_function("aws-lc variable base (diffie_hellman)", |i| {
        i.iter(|| black_box(a.diffie_hellman(black_box(&b))))
    });
    g.bench_function("aws-lc fixed base (PublicKey::from)", |i| {
        i.iter(|| black_box(PublicKey::from(black_box(&a))))
    });
    let rng = SystemRandom::new();
    let peer = UnparsedPublicKey::new(&X25519, *b.as_bytes());
    g.bench_function("ring keygen (fixed base + 32 random bytes)", |i| {
        i.iter(|| {
            let k = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
            black_box(k.compute_public_key().unwrap())
        })
    });
    g.bench_function("ring keygen + agree (fixed + variable base)", |i| {
        i.iter(|| {
            let k = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
            agree_ephemeral(k, black_box(&peer), |s| black_box(s[0])).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, x25519);
criterion_main!(benches);
