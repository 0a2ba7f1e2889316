//! `[auth]`: the authorization server's configuration.

use std::net::SocketAddr;
use std::time::Duration;

use keel_runtime::{HttpServerConfig, Secret, TrustedProxies};
use serde::{Deserialize, Serialize};

use crate::keys::SigningAlg;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub listen: SocketAddr,
    /// The issuer identifier, as tokens' `iss` and the metadata say it (no trailing
    /// slash). Unset: `http://` (`https://` with `[auth.http.tls]`) and the bound address,
    /// fit for development only.
    pub issuer: Option<String>,
    /// `postgres://…` (production) or `sqlite://path` (embedded; created when missing).
    /// A PostgreSQL URL's password is redacted wherever the configuration is printed.
    pub database: DatabaseUrl,
    /// 32 bytes in unpadded base64url (`keel auth key` prints a new one): private signing
    /// keys are sealed under it and client secrets hashed with it. Required with
    /// PostgreSQL. Unset with SQLite: generated on first start and kept in a file beside
    /// the database (`<database>.key`, readable by its owner only), which is convenient for
    /// development and no protection at rest.
    pub key_encryption_key: Option<Secret<String>>,
    /// Algorithm of tokens for clients that do not choose one.
    pub signing_alg: SigningAlg,
    /// Lifetime of access tokens for clients that do not set their own.
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// Lifetime of authorization codes (RFC 6749 §4.1.2 recommends at most 10 minutes).
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
    /// How long a browser stays signed in.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Lifetime of refresh tokens (each rotation starts a new one).
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// How long after a refresh token was exchanged it may be exchanged again, for a
    /// client whose concurrent requests refreshed at once: the repeat gets the same new
    /// refresh token, while that one is unused. Later (or once the new one is used), a
    /// used refresh token is taken as stolen and revokes its whole grant.
    #[serde(with = "humantime_serde")]
    pub refresh_reuse_grace: Duration,
    /// How long before a rotated-in signing key signs it is published; longer than
    /// verifiers cache the key set (keel-jwt: 10 minutes).
    #[serde(with = "humantime_serde")]
    pub key_publish_lead: Duration,
    /// How long a signing key signs before the next one is rotated in (published first,
    /// signing `key_publish_lead` later), by whichever server looks first, each minute;
    /// `0s` leaves rotation to the operator (`keel auth keys rotate`).
    #[serde(with = "humantime_serde")]
    pub key_rotation_interval: Duration,
    /// Brute-force protection of the sign-in page.
    pub lockout: LockoutConfig,
    /// Reverse proxies in front of the server (`["10.0.0.0/8"]`, `["127.0.0.1"]`): from
    /// them, the client's address is the one their `X-Forwarded-For` names, for the
    /// per-address sign-in limit and the audit trail. Empty (the default), the connection's
    /// peer is the client, and the header is ignored: behind a proxy left out of this list,
    /// every client shares the proxy's address and its sign-in limit.
    pub trusted_proxies: TrustedProxies,
    /// `aud` of access tokens for clients registered without audiences.
    pub default_audience: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    pub http: HttpServerConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8400)),
            issuer: None,
            database: DatabaseUrl::new("sqlite://.keel/auth.db"),
            key_encryption_key: None,
            signing_alg: SigningAlg::RS256,
            access_token_ttl: Duration::from_secs(10 * 60),
            code_ttl: Duration::from_secs(60),
            session_ttl: Duration::from_secs(8 * 3600),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_reuse_grace: Duration::from_secs(10),
            key_publish_lead: Duration::from_secs(15 * 60),
            key_rotation_interval: Duration::from_secs(90 * 86_400),
            lockout: LockoutConfig::default(),
            trusted_proxies: TrustedProxies::default(),
            default_audience: "keel-api".to_owned(),
            max_body_bytes: 64 * 1024,
            http: HttpServerConfig::default(),
        }
    }
}

/// `[auth.lockout]`: after `failures` failed sign-ins in a row an account is locked for
/// `lock`, doubling with each further failure up to `max_lock`; one network address may
/// fail `per_address` times per `address_window` before its sign-ins are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockoutConfig {
    pub failures: u32,
    #[serde(with = "humantime_serde")]
    pub lock: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lock: Duration,
    pub per_address: u32,
    #[serde(with = "humantime_serde")]
    pub address_window: Duration,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            lock: Duration::from_secs(60),
            max_lock: Duration::from_secs(3600),
            per_address: 50,
            address_window: Duration::from_secs(600),
        }
    }
}

impl LockoutConfig {
    pub(crate) fn policy(&self) -> crate::users::LockoutPolicy {
        crate::users::LockoutPolicy {
            threshold: i64::from(self.failures.max(1)),
            base: seconds(self.lock).max(1),
            max: seconds(self.max_lock).max(1),
        }
    }
}

impl AuthConfig {
    /// The scheme of the default issuer: `https` when the server has TLS.
    pub(crate) fn scheme(&self) -> &'static str {
        if self.http.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Refuses lifetimes that make no sense (a token dead at birth, a code alive for
    /// hours); the message names the key.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let bounded = [
            ("auth.access_token_ttl", self.access_token_ttl, 1, 86_400),
            ("auth.code_ttl", self.code_ttl, 1, 600),
            ("auth.session_ttl", self.session_ttl, 60, 30 * 86_400),
            (
                "auth.refresh_token_ttl",
                self.refresh_token_ttl,
                60,
                365 * 86_400,
            ),
            ("auth.refresh_reuse_grace", self.refresh_reuse_grace, 0, 60),
            // Longer than the key set is cached anywhere: servers reload every minute,
            // verifiers (keel-jwt) refresh every ten.
            (
                "auth.key_publish_lead",
                self.key_publish_lead,
                11 * 60,
                7 * 86_400,
            ),
        ];
        for (key, value, min, max) in bounded {
            let secs = value.as_secs();
            if secs < min || secs > max {
                return Err(format!("{key} must be between {min} s and {max} s"));
            }
        }
        // A day at least: a rotation's lead and the retired key's last tokens fit in it.
        let rotation = self.key_rotation_interval.as_secs();
        if rotation != 0 && !(86_400..=10 * 365 * 86_400).contains(&rotation) {
            return Err(
                "auth.key_rotation_interval must be 0 (off) or between 1 day and 10 years"
                    .to_owned(),
            );
        }
        Ok(())
    }

    pub(crate) fn access_token_ttl_seconds(&self) -> i64 {
        seconds(self.access_token_ttl)
    }

    pub(crate) fn code_ttl_seconds(&self) -> i64 {
        seconds(self.code_ttl)
    }

    pub(crate) fn session_ttl_seconds(&self) -> i64 {
        seconds(self.session_ttl)
    }

    pub(crate) fn refresh_token_ttl_seconds(&self) -> i64 {
        seconds(self.refresh_token_ttl)
    }

    pub(crate) fn refresh_reuse_grace_seconds(&self) -> i64 {
        seconds(self.refresh_reuse_grace)
    }

    pub(crate) fn key_publish_lead_seconds(&self) -> i64 {
        seconds(self.key_publish_lead)
    }

    pub(crate) fn key_rotation_interval_seconds(&self) -> i64 {
        seconds(self.key_rotation_interval)
    }
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// A database URL whose password never shows when it is printed (`keel config`, logs,
/// `Debug`): `postgres://keel:<redacted>@db/auth`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return self.0.clone();
        };
        // A password may also come as a query parameter (`?password=…`).
        if let Some((before, query)) = self.0.split_once('?') {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=<redacted>")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            let before = Self(before.to_owned()).redacted();
            return format!("{before}?{}", query.join("&"));
        }
        let authority_end = rest.find('/').unwrap_or(rest.len());
        match rest[..authority_end].rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let password = if userinfo.contains(':') {
                    ":<redacted>"
                } else {
                    ""
                };
                format!(
                    "{scheme}://{user}{password}@{host}{}",
                    &rest[authority_end..]
                )
            }
            None => self.0.clone(),
        }
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_passwords_never_print() {
        let url = DatabaseUrl::new("postgres://keel:s3cret@db:5432/auth?sslmode=require");
        assert_eq!(
            url.redacted(),
            "postgres://keel:<redacted>@db:5432/auth?sslmode=require"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(
            url.expose(),
            "postgres://keel:s3cret@db:5432/auth?sslmode=require"
        );
        for plain in [
            "sqlite://.keel/auth.db",
            "postgres://keel@db/auth",
            "postgres://db/a@b",
        ] {
            assert_eq!(DatabaseUrl::new(plain).redacted(), plain);
        }
    }

    #[test]
    fn lifetimes_are_bounded() {
        assert!(AuthConfig::default().validate().is_ok());
        let zero = AuthConfig {
            access_token_ttl: Duration::ZERO,
            ..AuthConfig::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .contains("auth.access_token_ttl")
        );
        let long_code = AuthConfig {
            code_ttl: Duration::from_secs(3600),
            ..AuthConfig::default()
        };
        assert!(long_code.validate().unwrap_err().contains("auth.code_ttl"));
        let rotation = |secs| AuthConfig {
            key_rotation_interval: Duration::from_secs(secs),
            ..AuthConfig::default()
        };
        assert!(rotation(0).validate().is_ok(), "off");
        assert!(rotation(86_400).validate().is_ok());
        let hourly = rotation(3600).validate().unwrap_err();
        assert!(hourly.contains("auth.key_rotation_interval"), "{hourly}");
    }
}
