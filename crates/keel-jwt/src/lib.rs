//! Verifies the JWT access tokens (RFC 9068) that Keel's authorization server issues, for
//! the gateway and for every service.
//!
//! ```no_run
//! # async fn example(authorization: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! use keel_jwt::{Verifier, VerifierConfig};
//!
//! let verifier = Verifier::new(VerifierConfig::new("http://127.0.0.1:8400", ["keel-api"]))?;
//! // The `Authorization` header's value as it arrived.
//! match verifier.verify_authorization(authorization).await {
//!     Ok(Some(principal)) if principal.has_scope("orders:write") => { /* serve */ }
//!     Ok(Some(_)) => { /* 403, error="insufficient_scope" */ }
//!     Ok(None) => { /* 401, WWW-Authenticate: Bearer (no bearer token) */ }
//!     Err(error) if error.is_unavailable() => { /* 503 */ }
//!     Err(error) => { /* 401, WWW-Authenticate: error.www_authenticate() */ }
//! }
//! # Ok(()) }
//! ```
//!
//! What is checked, in order: size; three base64url parts; header `alg` (asymmetric and
//! allowed: `none` and `HS*` cannot even be named), no `crit`, `typ` = `at+jwt`; the key by
//! `kid`, whose own algorithm must be the header's (the key, not the token, picks the
//! algorithm, which defeats algorithm-confusion attacks); the signature; then the claims:
//! `iss` exactly, `aud` (string or array) against the configured audiences, `exp`, `nbf`
//! and `iat` with a bounded leeway. `iss`, `sub`, `aud`, `exp` and `iat` are required.
//!
//! Decisions worth knowing:
//! - A token without `kid` is accepted only while the key set holds exactly one key; with
//!   several it is [`VerifyError::UnknownKey`]. Keel's server always sends `kid`.
//! - Keys come only from the configured issuer (`jwks_uri` or its metadata); `jku`, `jwk`,
//!   `x5u` and `x5c` header parameters are ignored.
//! - An RSA key published without `alg` verifies RS256 only.
//! - The fetch rate limit counts from the last fetch of any kind, so an issuer should
//!   publish a new key before signing with it (as rotation should be done anyway).
//! - Keys are fetched with reqwest as the workspace configures it, which has no TLS support
//!   yet: `https` issuers need a TLS feature enabled on reqwest first.
//! - Tokens are never logged, and errors never contain token content.
//!
//! With the `testing` feature, [`testing::TestIssuer`] is a small issuer for tests: it
//! serves metadata and keys on port 0 and mints tokens.

pub mod config;
mod error;
mod fetch;
mod keys;
mod principal;
#[cfg(feature = "testing")]
pub mod testing;
mod token;
mod verifier;

pub use config::{Algorithm, ConfigError, VerifierConfig};
pub use error::VerifyError;
pub use principal::Principal;
pub use verifier::Verifier;

/// The token in an `Authorization: Bearer <token>` header value (RFC 6750 §2.1; the scheme
/// name is case-insensitive). `None` for other schemes or an empty token.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let token = bearer_bytes(authorization.as_bytes())?;
    // A fold, not `contains`: with no early exit the compiler checks 16 bytes at a time
    // (a token is ~800 bytes).
    let spaced = token.iter().fold(false, |spaced, &b| spaced | (b == b' '));
    // The token is the value's tail after ASCII, so it starts on a character boundary.
    let token = authorization.get(authorization.len() - token.len()..)?;
    (!token.is_empty() && !spaced).then_some(token)
}

/// The token part of an `Authorization: Bearer <token>` value, unchecked: only the scheme
/// is. Finds a token verified before by its bytes; [`bearer_token`] adds what makes one
/// usable.
fn bearer_bytes(authorization: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = authorization.split_at_checked(6)?;
    let token = token.strip_prefix(b" ")?;
    let spaces = token.iter().take_while(|&&b| b == b' ').count();
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then_some(&token[spaces..])
}

#[cfg(test)]
mod tests {
    use super::{bearer_bytes, bearer_token};

    #[test]
    fn bearer_token_from_authorization() {
        assert_eq!(bearer_token("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer_token("bearer  abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        for bad in [
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Bearerabc",
            "Bearer a b",
            // A space past the first 16-byte stride.
            "Bearer 0123456789abcdef0123456789abcdef 0123",
            "",
        ] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }

    /// Whatever `bearer_token` accepts, `bearer_bytes` finds the same token in (so a
    /// remembered token is found); it may find more, which only `bearer_token` refuses.
    #[test]
    fn bearer_bytes_finds_what_bearer_token_accepts() {
        for value in [
            "Bearer abc.def.ghi",
            "bearer  abc",
            "BEARER abc",
            "Bearer a b",
            "Bearer ",
            "Bearer \tabc",
            "Basic abc",
            "Bearerabc",
            "Bearer",
            "",
        ] {
            if let Some(token) = bearer_token(value) {
                assert_eq!(bearer_bytes(value.as_bytes()), Some(token.as_bytes()));
            }
        }
        assert_eq!(bearer_bytes(b"Basic abc"), None);
        assert_eq!(bearer_bytes(b"Bearerabc"), None);
        assert_eq!(bearer_bytes(b"Bearer \tabc"), Some(&b"\tabc"[..]));
    }
}
