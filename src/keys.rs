//! WireGuard key encoding, exactly as `wg genkey` / `wg pubkey` write it (the
//! gateway's key file is kept by `data_dir`).
//!
//! `wg genkey` prints 44 base64 characters (32 bytes, standard alphabet, with
//! padding) and a newline; `wg pubkey` reads such a line and prints the public
//! key the same way. A private key is a random 32-byte string clamped as
//! Curve25519 requires, so our keys are byte-for-byte interchangeable.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

/// A 32-byte WireGuard key (public or private) in its raw form.
pub type KeyBytes = [u8; 32];

/// Decodes a 44-character base64 WireGuard key. Surrounding whitespace is
/// ignored, anything else that is not exactly 32 bytes is an error.
pub fn decode_key(text: &str) -> Result<KeyBytes, KeyError> {
    let text = text.trim();
    if text.len() != 44 {
        return Err(KeyError::Length(text.len()));
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyError::Base64)?;
    bytes.try_into().map_err(|_| KeyError::Base64)
}

/// Encodes a key as `wg` prints it (without the newline).
pub fn encode_key(key: &KeyBytes) -> String {
    STANDARD.encode(key)
}

/// Why a key string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a WireGuard key is 44 base64 characters, got {0}")]
    Length(usize),
    #[error("a WireGuard key is 32 bytes of standard base64 (as `wg genkey` prints)")]
    Base64,
}

/// A new private key, clamped like `wg genkey` does.
pub fn generate_private_key() -> KeyBytes {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    key
}

/// The public key of a private key.
pub fn public_key(private: &KeyBytes) -> KeyBytes {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_clamping() {
        let k = generate_private_key();
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 128, 0);
        assert_eq!(k[31] & 64, 64);
        let text = encode_key(&k);
        assert_eq!(text.len(), 44);
        assert_eq!(decode_key(&format!("{text}\n")).unwrap(), k);
    }

    #[test]
    fn known_vector_matches_wg_pubkey() {
        // RFC 7748 section 6.1, Alice's key pair (wg pubkey gives the same).
        let private = decode_key("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(
            encode_key(&public_key(&private)),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(decode_key("abc"), Err(KeyError::Length(3)));
        assert_eq!(
            decode_key("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!="),
            Err(KeyError::Base64)
        );
    }
}
