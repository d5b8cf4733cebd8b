//! Token checks shared by the API, the CONNECT proxy and the agent's
//! supervisor: below all of them, so none imports another for it.

use base64::Engine as _;

/// Compares a presented token with the expected one in constant time.
pub fn token_matches(presented: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.len() == token.len() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

/// The token of an `Authorization`-style value: `Bearer <token>`, or the
/// password of `Basic base64(user:password)` (what clients built for
/// balena's proxy send). Scheme names are case-insensitive.
pub fn credential(value: &str) -> Option<String> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        return text.split_once(':').map(|(_, p)| p.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials() {
        assert_eq!(credential("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(credential("bearer  abc ").as_deref(), Some("abc"));
        let b = base64::engine::general_purpose::STANDARD.encode("u:pw");
        assert_eq!(credential(&format!("Basic {b}")).as_deref(), Some("pw"));
        assert_eq!(credential("Basic !!!"), None);
        assert_eq!(credential("Digest x"), None);
        assert_eq!(credential("Bearer"), None);
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }
}
