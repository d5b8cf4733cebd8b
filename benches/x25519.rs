//! X25519 implementations available as crates here, in one criterion run
//! (issue "Ahead of every peer", item 2): what a Diffie-Hellman costs with
//! the one boringtun uses (x25519-dalek 2 on curve25519-dalek 4: a serial
//! Montgomery ladder on 64-bit limbs, whatever the backend, since its SIMD
//! backends speed up Edwards arithmetic only) and with `ring` (already in
//! the tree through async-nats; fiat-crypto field arithmetic, assembly on
//! x86_64). `aws-lc-rs` is not measured: it builds AWS-LC from C sources
//! with cmake, which these machines do not have.
//!
//! - variable base: a shared secret from a peer's public key (four of
//!   these in a first-contact responder handshake, three in a rekey);
//! - fixed base: a public key from a secret (the ephemeral key, once per
//!   handshake).
//!
//! ring offers X25519 only through ephemeral keys: its figures include
//! generating one (a fixed-base multiplication and 32 random bytes), so
//! "ring agree" is keygen + variable-base, and the variable-base cost alone
//! is that minus "ring keygen".
//!
//! Run: `cargo bench --bench x25519`.

use criterion::{criterion_group, criterion_main, Criterion};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;
use std::hint::black_box;
use x25519_dalek::{PublicKey, StaticSecret};

fn x25519(c: &mut Criterion) {
    let mut g = c.benchmark_group("x25519");
    let a = StaticSecret::random_from_rng(rand_core::OsRng);
    let b = PublicKey::from(&StaticSecret::random_from_rng(rand_core::OsRng));
    g.bench_function("dalek variable base (diffie_hellman)", |i| {
        i.iter(|| black_box(a.diffie_hellman(black_box(&b))))
    });
    g.bench_function("dalek fixed base (PublicKey::from)", |i| {
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
