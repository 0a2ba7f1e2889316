//! [`VerifierConfig`]: which issuer to trust, for which audiences, and how keys are cached.

use std::fmt;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

/// The largest clock skew [`VerifierConfig::leeway`] may allow. More than a few minutes stops
/// being skew and starts extending every token's life.
pub const MAX_LEEWAY: Duration = Duration::from_secs(5 * 60);

/// Signature algorithms a [`Verifier`](crate::Verifier) can accept.
///
/// Only asymmetric algorithms exist here: a resource server holds public keys, and accepting
/// `HS*` would let anyone who has the public key (everyone) forge tokens with it as the
/// HMAC secret. `none` is not representable either.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    /// The `alg` name (RFC 7518 §3.1, RFC 8037 §3.1).
    pub fn name(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
        }
    }

    /// Parses an `alg` name exactly (names are case-sensitive); `None` for `none`, every
    /// symmetric algorithm and anything unknown.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "EdDSA" => Self::EdDSA,
            _ => return None,
        })
    }

    pub(crate) fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as J;
        match self {
            Self::RS256 => J::RS256,
            Self::RS384 => J::RS384,
            Self::RS512 => J::RS512,
            Self::PS256 => J::PS256,
            Self::PS384 => J::PS384,
            Self::PS512 => J::PS512,
            Self::ES256 => J::ES256,
            Self::ES384 => J::ES384,
            Self::EdDSA => J::EdDSA,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to verify access tokens from one issuer (e.g. `[gateway.auth]`).
///
/// `issuer` and `audiences` have no sensible default and must be given; everything else
/// defaults to values suited to Keel's authorization server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierConfig {
    /// The authorization server's issuer identifier (`http://127.0.0.1:8400`). Tokens' `iss`
    /// and the discovered metadata's `issuer` must equal it exactly, character for character
    /// (RFC 8414 §3.3, RFC 9068 §4): a trailing slash matters.
    pub issuer: String,
    /// Identifiers of this resource server; a token's `aud` (a string or an array) must
    /// contain at least one of them. This is what stops a token minted for another service
    /// from being replayed here.
    pub audiences: Vec<String>,
    /// Where the signing keys are. When unset they are discovered from the issuer's metadata:
    /// `{issuer}/.well-known/openid-configuration`, or the RFC 8414 location
    /// (`/.well-known/oauth-authorization-server` + the issuer's path) when that answers 404.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`; at most [`MAX_LEEWAY`].
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// How long fetched keys are fresh. Older keys are still used while a refresh runs in
    /// the background, and kept when it fails.
    #[serde(default = "default_refresh_interval", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// The shortest time between two key fetches. A token with an unknown `kid` triggers a
    /// fetch (keys may have been rotated), so without this bound anyone could make every
    /// request hit the authorization server. Measured from the previous fetch of any kind.
    #[serde(default = "default_min_refresh_interval", with = "humantime_serde")]
    pub min_refresh_interval: Duration,
    /// Longest wait for one metadata or key-set response.
    #[serde(default = "default_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Algorithms accepted at all. The key decides which one a token must use; this list
    /// can only narrow that.
    #[serde(default = "default_allowed_algorithms")]
    pub allowed_algorithms: Vec<Algorithm>,
    /// Whether the header must say `typ: at+jwt` (or `application/at+jwt`), as RFC 9068 §4
    /// requires of resource servers; it keeps ID tokens and other JWTs from the same issuer
    /// from being accepted as access tokens. When false, a missing `typ` or `JWT` is also
    /// accepted (for issuers that do not follow RFC 9068), any other type still is not.
    #[serde(default = "default_true")]
    pub require_typ: bool,
    /// Tokens longer than this are rejected before any parsing.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Verified tokens remembered, so a client sending the same token again skips the
    /// signature check (Envoy's `jwt_cache_config`); each is still refused once expired.
    /// 0 turns the cache off. A key withdrawn from the JWKS stops new tokens at once but
    /// not cached ones before their expiry, as with Envoy.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_refresh_interval() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_min_refresh_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_fetch_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_allowed_algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ]
}
fn default_true() -> bool {
    true
}
fn default_cache_size() -> usize {
    4096
}
fn default_max_token_bytes() -> usize {
    8 * 1024
}

/// A configuration value that cannot work; names the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("`{key}` = {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("could not build the HTTP client for key fetches: {0}")]
    HttpClient(#[source] reqwest::Error),
}

impl VerifierConfig {
    /// A configuration with the defaults, for code that builds one directly.
    pub fn new(
        issuer: impl Into<String>,
        audiences: impl IntoIterator<Item: Into<String>>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            jwks_uri: None,
            leeway: default_leeway(),
            refresh_interval: default_refresh_interval(),
            min_refresh_interval: default_min_refresh_interval(),
            fetch_timeout: default_fetch_timeout(),
            allowed_algorithms: default_allowed_algorithms(),
            require_typ: true,
            max_token_bytes: default_max_token_bytes(),
            cache_size: default_cache_size(),
        }
    }

    /// Checks every value; [`Verifier::new`](crate::Verifier::new) calls this, and a config
    /// loader can call it at start to fail before serving.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let issuer = check_url("issuer", &self.issuer)?;
        if issuer.query().is_some() || issuer.fragment().is_some() {
            return Err(invalid(
                "issuer",
                &self.issuer,
                "an issuer has no query or fragment (RFC 8414 §2)",
            ));
        }
        if let Some(uri) = &self.jwks_uri {
            check_url("jwks_uri", uri)?;
        }
        if self.audiences.is_empty() {
            return Err(invalid(
                "audiences",
                "[]",
                "at least one audience is required",
            ));
        }
        if let Some(empty) = self.audiences.iter().find(|a| a.trim().is_empty()) {
            return Err(invalid("audiences", empty, "an audience cannot be empty"));
        }
        if self.leeway > MAX_LEEWAY {
            return Err(invalid_duration("leeway", self.leeway, "at most 5m"));
        }
        if self.refresh_interval.is_zero() {
            return Err(invalid_duration(
                "refresh_interval",
                self.refresh_interval,
                "must be positive",
            ));
        }
        if self.min_refresh_interval > self.refresh_interval {
            return Err(invalid_duration(
                "min_refresh_interval",
                self.min_refresh_interval,
                "cannot exceed refresh_interval",
            ));
        }
        if self.fetch_timeout.is_zero() {
            return Err(invalid_duration(
                "fetch_timeout",
                self.fetch_timeout,
                "must be positive",
            ));
        }
        if self.allowed_algorithms.is_empty() {
            return Err(invalid(
                "allowed_algorithms",
                "[]",
                "at least one algorithm is required",
            ));
        }
        if self.max_token_bytes < 64 {
            return Err(invalid(
                "max_token_bytes",
                &self.max_token_bytes.to_string(),
                "at least 64",
            ));
        }
        Ok(())
    }
}

fn check_url(key: &'static str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|_| invalid(key, value, "not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(
            key,
            value,
            "must be an http:// or https:// URL with a host",
        ));
    }
    Ok(url)
}

fn invalid(key: &'static str, value: &str, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: format!("{value:?}"),
        reason,
    }
}

fn invalid_duration(key: &'static str, value: Duration, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: humantime::format_duration(value).to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> VerifierConfig {
        VerifierConfig::new("http://127.0.0.1:8400", ["keel-api"])
    }

    #[test]
    fn defaults_from_a_minimal_document() {
        let config: VerifierConfig = serde_json::from_str(
            r#"{"issuer": "http://127.0.0.1:8400", "audiences": ["keel-api"]}"#,
        )
        .unwrap();
        assert_eq!(config, valid());
        assert_eq!(config.leeway, Duration::from_secs(30));
        assert_eq!(config.refresh_interval, Duration::from_secs(600));
        assert_eq!(config.min_refresh_interval, Duration::from_secs(30));
        assert!(config.require_typ);
        assert_eq!(config.max_token_bytes, 8192);
        config.validate().unwrap();
    }

    #[test]
    fn durations_are_humantime_and_unknown_keys_are_rejected() {
        let config: VerifierConfig = serde_json::from_str(
            r#"{"issuer": "http://a", "audiences": ["x"], "leeway": "1m 30s", "allowed_algorithms": ["ES256"]}"#,
        )
        .unwrap();
        assert_eq!(config.leeway, Duration::from_secs(90));
        assert_eq!(config.allowed_algorithms, vec![Algorithm::ES256]);

        let error = serde_json::from_str::<VerifierConfig>(
            r#"{"issuer": "http://a", "audiences": ["x"], "leway": "1s"}"#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("unknown field `leway`"),
            "{error}"
        );
        // Symmetric algorithms cannot even be configured.
        assert!(
            serde_json::from_str::<VerifierConfig>(
                r#"{"issuer": "http://a", "audiences": ["x"], "allowed_algorithms": ["HS256"]}"#,
            )
            .is_err()
        );
    }

    #[test]
    fn round_trips_through_serialize() {
        let config = valid();
        let text = serde_json::to_string(&config).unwrap();
        assert!(text.contains(r#""leeway":"30s""#), "{text}");
        assert_eq!(
            serde_json::from_str::<VerifierConfig>(&text).unwrap(),
            config
        );
    }

    #[test]
    fn validation_names_the_key() {
        type Change = Box<dyn Fn(&mut VerifierConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("issuer", Box::new(|c| c.issuer = "not a url".into())),
            ("issuer", Box::new(|c| c.issuer = "ftp://x".into())),
            ("issuer", Box::new(|c| c.issuer = "http://x/?q=1".into())),
            ("jwks_uri", Box::new(|c| c.jwks_uri = Some("/jwks".into()))),
            ("audiences", Box::new(|c| c.audiences.clear())),
            ("audiences", Box::new(|c| c.audiences = vec![" ".into()])),
            ("leeway", Box::new(|c| c.leeway = Duration::from_secs(301))),
            (
                "refresh_interval",
                Box::new(|c| c.refresh_interval = Duration::ZERO),
            ),
            (
                "min_refresh_interval",
                Box::new(|c| c.min_refresh_interval = Duration::from_secs(3600)),
            ),
            (
                "fetch_timeout",
                Box::new(|c| c.fetch_timeout = Duration::ZERO),
            ),
            (
                "allowed_algorithms",
                Box::new(|c| c.allowed_algorithms.clear()),
            ),
            ("max_token_bytes", Box::new(|c| c.max_token_bytes = 10)),
        ];
        for (key, change) in cases {
            let mut config = valid();
            change(&mut config);
            let error = config.validate().unwrap_err();
            assert!(
                error.to_string().starts_with(&format!("`{key}`")),
                "{key}: {error}"
            );
        }
        let mut at_limit = valid();
        at_limit.leeway = MAX_LEEWAY;
        at_limit.validate().unwrap();
    }

    #[test]
    fn algorithm_names_are_exact() {
        for alg in default_allowed_algorithms() {
            assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
        }
        for name in ["none", "None", "HS256", "rs256", "", "ES512"] {
            assert_eq!(Algorithm::from_name(name), None, "{name}");
        }
    }
}
