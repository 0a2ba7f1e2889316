//! [`Principal`]: who a verified token speaks for and what it may do.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde_json::{Map, Value};

/// The verified content of an access token (RFC 9068 §2.2).
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// `sub`: the resource owner, or the client itself for client-credentials tokens.
    pub subject: String,
    /// `client_id` (RFC 9068), or `azp` (OpenID Connect) from issuers that only send that.
    pub client_id: Option<String>,
    /// `scope`, split on spaces.
    pub scopes: BTreeSet<String>,
    /// `roles` (RFC 9068 §2.2.3.1, RFC 7643 §4.1.2).
    pub roles: BTreeSet<String>,
    /// `iss`, equal to the configured issuer.
    pub issuer: String,
    /// `aud`, always as a list (it may be a single string in the token).
    pub audience: Vec<String>,
    /// `exp`.
    pub expires_at: SystemTime,
    /// `jti`, for replay detection and audit logs.
    pub token_id: Option<String>,
    /// Every claim, for what the fields above do not cover.
    pub claims: Map<String, Value>,
}

impl Principal {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// True when every one of `scopes` was granted (and so for an empty list).
    pub fn has_all_scopes(&self, scopes: &[&str]) -> bool {
        scopes.iter().all(|scope| self.scopes.contains(*scope))
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(role)
    }

    /// True when at least one of `roles` was granted.
    pub fn has_any_role(&self, roles: &[&str]) -> bool {
        roles.iter().any(|role| self.roles.contains(*role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_and_role_helpers() {
        let principal = Principal {
            subject: "alice".into(),
            client_id: None,
            scopes: ["orders:read", "orders:write"].map(String::from).into(),
            roles: ["admin"].map(String::from).into(),
            issuer: "http://issuer".into(),
            audience: vec!["api".into()],
            expires_at: SystemTime::UNIX_EPOCH,
            token_id: None,
            claims: Map::new(),
        };
        assert!(principal.has_scope("orders:read"));
        assert!(!principal.has_scope("orders"));
        assert!(principal.has_all_scopes(&["orders:read", "orders:write"]));
        assert!(!principal.has_all_scopes(&["orders:read", "payments:read"]));
        assert!(principal.has_all_scopes(&[]));
        assert!(principal.has_role("admin"));
        assert!(!principal.has_role("Admin"));
        assert!(principal.has_any_role(&["user", "admin"]));
        assert!(!principal.has_any_role(&[]));
    }
}
