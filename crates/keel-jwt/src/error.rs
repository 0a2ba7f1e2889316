//! [`VerifyError`]: why a token was refused, and how to tell the client (RFC 6750 §3).

/// Why a token was refused.
///
/// Nothing in here carries text from the token itself (not even the `kid`), so an error can
/// be logged and shown without leaking the credential or reflecting attacker input.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Longer than [`VerifierConfig::max_token_bytes`](crate::VerifierConfig::max_token_bytes);
    /// refused before any parsing.
    #[error("token is longer than {limit} bytes")]
    TooLarge { limit: usize },
    /// Not a compact JWS with a JSON header and claims, a required claim is missing or has
    /// the wrong type, or the header lists `crit` extensions (none are understood).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg` is `none`, symmetric (`HS*`), unknown, or not in `allowed_algorithms`.
    #[error("token algorithm is not accepted")]
    UnsupportedAlgorithm,
    /// `alg` is accepted but is not the algorithm of the key the token names: the key, not
    /// the token, decides the algorithm.
    #[error("token algorithm differs from its key's")]
    AlgorithmMismatch,
    /// The `kid` is not in the issuer's key set, even after a refresh; or the token has no
    /// `kid` and the key set holds more than one key.
    #[error("token names no known signing key")]
    UnknownKey,
    /// The signature does not verify: forged or altered.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf`, or `iat`, is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token has the wrong issuer")]
    WrongIssuer,
    /// `aud` holds none of the configured audiences.
    #[error("token is for another audience")]
    WrongAudience,
    /// `typ` is not `at+jwt`: an ID token or another kind of JWT.
    #[error("token is not an access token (typ)")]
    WrongType,
    /// The issuer's metadata or keys could not be fetched and none are cached; the token
    /// could not be judged. Answer 503 rather than 401.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl VerifyError {
    /// Text for `error_description` (RFC 6750 §3): says what is wrong in terms a client
    /// developer can act on, never echoes the token, and contains no `"` or `\`, so it can
    /// go into a quoted-string as is.
    pub fn description(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "The access token is too large",
            Self::Malformed(_) => "The access token is malformed",
            Self::UnsupportedAlgorithm => "The access token signing algorithm is not accepted",
            Self::AlgorithmMismatch => "The access token signing algorithm does not match its key",
            Self::UnknownKey => "The access token was signed with an unknown key",
            Self::BadSignature => "The access token signature is invalid",
            Self::Expired => "The access token expired",
            Self::NotYetValid => "The access token is not valid yet",
            Self::WrongIssuer => "The access token was issued by an untrusted issuer",
            Self::WrongAudience => "The access token is not intended for this audience",
            Self::WrongType => "The token is not an access token",
            Self::KeysUnavailable(_) => "The token signing keys are unavailable, try again later",
        }
    }

    /// The `WWW-Authenticate` value of a 401 for this error:
    /// `Bearer error="invalid_token", error_description="…"`.
    ///
    /// For [`VerifyError::KeysUnavailable`] (see [`is_unavailable`](Self::is_unavailable))
    /// the token was not judged; answer 503 instead.
    pub fn www_authenticate(&self) -> String {
        format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            self.description()
        )
    }

    /// True when the verifier, not the token, is at fault (the keys could not be fetched):
    /// the answer is 503 with a retry, not 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::KeysUnavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_fit_in_a_quoted_string() {
        let all = [
            VerifyError::TooLarge { limit: 1 },
            VerifyError::Malformed("x"),
            VerifyError::UnsupportedAlgorithm,
            VerifyError::AlgorithmMismatch,
            VerifyError::UnknownKey,
            VerifyError::BadSignature,
            VerifyError::Expired,
            VerifyError::NotYetValid,
            VerifyError::WrongIssuer,
            VerifyError::WrongAudience,
            VerifyError::WrongType,
            VerifyError::KeysUnavailable("connection refused".into()),
        ];
        for error in all {
            let text = error.description();
            // RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E.
            assert!(
                text.bytes()
                    .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E)),
                "{text}"
            );
            assert_eq!(
                error.www_authenticate(),
                format!("Bearer error=\"invalid_token\", error_description=\"{text}\"")
            );
        }
        assert!(VerifyError::KeysUnavailable(String::new()).is_unavailable());
        assert!(!VerifyError::Expired.is_unavailable());
    }
}
