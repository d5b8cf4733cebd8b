//! x25519-dalek 2's public API (`PublicKey`, `StaticSecret`,
//! `ReusableSecret`, `EphemeralSecret`, `SharedSecret`, `x25519`), with the
//! arithmetic done by AWS-LC's `X25519` and `X25519_public_from_private`.
//!
//! Why it exists: boringtun's Noise responder calls x25519-dalek for every
//! Diffie-Hellman of a handshake (five variable-base and two fixed-base for
//! a first contact) and offers no way to plug in another implementation.
//! curve25519-dalek's Montgomery ladder is serial 64-bit arithmetic in every
//! backend; AWS-LC's is s2n-bignum's constant-time assembly (with MULX/ADX
//! where the CPU has them), about 2.1 times faster on the gateway's
//! machines (`benches/x25519.rs`). The gateway patches crates.io's
//! x25519-dalek with this crate, so boringtun, the agent, the load
//! generator and the gateway all use it.
//!
//! Semantics are RFC 7748's X25519, the same as x25519-dalek's: scalars are
//! clamped at each multiplication (the stored secret is the caller's 32
//! bytes, unclamped), the u-coordinate's top bit is ignored and non-canonical
//! values are reduced, and a peer key of small order gives the all-zero
//! shared secret, which `was_contributory` reports. The tests check every
//! one of these against curve25519-dalek itself.
//!
//! One difference: `PublicKey`'s equality compares the 32 bytes, where
//! x25519-dalek compares the field elements they encode (two encodings of
//! one u-coordinate are equal there, unequal here). Byte equality agrees
//! with `Hash`, which x25519-dalek's does not; a key's identity in the
//! gateway is its bytes.

#![deny(missing_docs)]

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

/// The X25519 base point (u = 9), for the byte-oriented [`x25519`].
pub const X25519_BASEPOINT_BYTES: [u8; 32] = {
    let mut b = [0u8; 32];
    b[0] = 9;
    b
};

/// `k` (clamped) times the point with u-coordinate `u`.
fn mul(k: &[u8; 32], u: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // SAFETY: AWS-LC's X25519 reads exactly 32 bytes from each of its input
    // pointers and writes exactly 32 to its output; all three are [u8; 32]
    // borrowed for the call, and the output does not alias the inputs.
    let ok = unsafe { aws_lc_sys::X25519(out.as_mut_ptr(), k.as_ptr(), u.as_ptr()) };
    if ok != 1 {
        // AWS-LC returns 0 exactly when the result is all zero (a peer key
        // of small order). x25519-dalek returns that value and lets
        // `was_contributory` tell; make sure it is what we return.
        out.zeroize();
    }
    out
}

/// `k` (clamped) times the base point.
fn mul_base(k: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // SAFETY: reads 32 bytes from `k`, writes 32 to `out`, both [u8; 32].
    unsafe { aws_lc_sys::X25519_public_from_private(out.as_mut_ptr(), k.as_ptr()) };
    out
}

fn random_bytes<T: RngCore + CryptoRng>(mut csprng: T) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    csprng.fill_bytes(&mut bytes);
    bytes
}

/// The byte-oriented X25519 function of RFC 7748: `k` (clamped) times the
/// point with u-coordinate `u`.
pub fn x25519(k: [u8; 32], u: [u8; 32]) -> [u8; 32] {
    mul(&k, &u)
}

/// `to_bytes`, `as_bytes` and `AsRef<[u8]>` for a type holding 32 bytes.
macro_rules! byte_views {
    ($name:ident, $what:literal) => {
        impl $name {
            #[doc = concat!("The ", $what, ".")]
            #[inline]
            pub fn to_bytes(&self) -> [u8; 32] {
                self.0
            }

            #[doc = concat!("A view of the ", $what, ".")]
            #[inline]
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
    };
}

/// A public key: the u-coordinate of a point, as 32 little-endian bytes.
#[derive(PartialEq, Eq, Hash, Copy, Clone, Debug)]
pub struct PublicKey([u8; 32]);

byte_views!(PublicKey, "key's 32 bytes");

impl From<[u8; 32]> for PublicKey {
    fn from(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }
}

impl Zeroize for PublicKey {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

/// Defines a secret type: its constructors, its public key, zeroize on drop.
macro_rules! secret {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name([u8; 32]);

        impl $name {
            /// A new secret from 32 bytes of `csprng`.
            #[deprecated(note = "Renamed to `random_from_rng`.")]
            pub fn new<T: RngCore + CryptoRng>(csprng: T) -> Self {
                Self::random_from_rng(csprng)
            }

            /// A new secret from 32 bytes of `csprng`.
            pub fn random_from_rng<T: RngCore + CryptoRng>(csprng: T) -> Self {
                $name(random_bytes(csprng))
            }

            /// A new secret from the operating system's random source.
            #[cfg(feature = "getrandom")]
            pub fn random() -> Self {
                Self::random_from_rng(rand_core::OsRng)
            }
        }

        impl<'a> From<&'a $name> for PublicKey {
            fn from(secret: &'a $name) -> PublicKey {
                PublicKey(mul_base(&secret.0))
            }
        }

        impl Zeroize for $name {
            fn zeroize(&mut self) {
                self.0.zeroize();
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }
    };
}

secret!(
    /// A secret for one Diffie-Hellman: `diffie_hellman` consumes it.
    EphemeralSecret
);

impl EphemeralSecret {
    /// The shared secret with `their_public`; the secret is wiped after.
    pub fn diffie_hellman(self, their_public: &PublicKey) -> SharedSecret {
        SharedSecret(mul(&self.0, &their_public.0))
    }
}

secret!(
    /// A secret that may serve several Diffie-Hellman but cannot be
    /// serialized (a handshake's ephemeral key).
    ReusableSecret
);

impl Clone for ReusableSecret {
    fn clone(&self) -> Self {
        ReusableSecret(self.0)
    }
}

impl ReusableSecret {
    /// The shared secret with `their_public`.
    pub fn diffie_hellman(&self, their_public: &PublicKey) -> SharedSecret {
        SharedSecret(mul(&self.0, &their_public.0))
    }
}

secret!(
    /// A long-lived secret (a gateway's or a device's private key).
    StaticSecret
);

impl Clone for StaticSecret {
    fn clone(&self) -> Self {
        StaticSecret(self.0)
    }
}

impl StaticSecret {
    /// The shared secret with `their_public`.
    pub fn diffie_hellman(&self, their_public: &PublicKey) -> SharedSecret {
        SharedSecret(mul(&self.0, &their_public.0))
    }
}

byte_views!(StaticSecret, "secret's 32 bytes, as given (unclamped)");

impl From<[u8; 32]> for StaticSecret {
    fn from(bytes: [u8; 32]) -> StaticSecret {
        StaticSecret(bytes)
    }
}

/// The result of a Diffie-Hellman: a u-coordinate, wiped on drop.
pub struct SharedSecret([u8; 32]);

byte_views!(SharedSecret, "shared secret's 32 bytes");

impl SharedSecret {
    /// False when the peer's key had small order, so that the shared
    /// secret is the all-zero value whatever our secret (RFC 7748 §6.1).
    /// Folds all 32 bytes, with no branch on their values.
    #[must_use]
    pub fn was_contributory(&self) -> bool {
        self.0.iter().fold(0u8, |acc, b| acc | b) != 0
    }
}

impl Zeroize for SharedSecret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for SharedSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}
