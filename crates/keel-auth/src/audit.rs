//! The audit trail: security events written to the `audit_events` table, and logged, by
//! one call, so the two never disagree.

use serde::Serialize;

use crate::db::Db;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A client failed to authenticate at the token endpoint.
    ClientAuthFailed,
    /// A token was issued.
    TokenIssued,
    /// A client was registered.
    ClientCreated,
    /// A signing key was generated.
    KeyGenerated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientAuthFailed => "client_auth_failed",
            Self::TokenIssued => "token_issued",
            Self::ClientCreated => "client_created",
            Self::KeyGenerated => "key_generated",
        }
    }
}

/// One event. `detail` is for people and never holds a secret, code or token.
#[derive(Debug, Clone, Default)]
pub struct Event<'a> {
    pub subject: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub ip: Option<String>,
    pub detail: Option<String>,
}

#[derive(Clone)]
pub struct Audit {
    db: Db,
}

impl Audit {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Logs the event and stores it. A failed insert is logged, not returned: the
    /// request it belongs to has happened either way.
    pub async fn record(&self, at: i64, kind: EventKind, success: bool, event: Event<'_>) {
        let outcome = if success { "success" } else { "failure" };
        tracing::info!(
            target: "keel_auth::audit",
            kind = kind.as_str(),
            outcome,
            subject = event.subject,
            client_id = event.client_id,
            ip = event.ip.as_deref(),
            detail = event.detail.as_deref(),
            "audit event"
        );
        let stored = sqlx::query(
            "INSERT INTO audit_events (at, kind, outcome, subject, client_id, ip, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(at)
        .bind(kind.as_str())
        .bind(outcome)
        .bind(event.subject)
        .bind(event.client_id)
        .bind(event.ip)
        .bind(event.detail)
        .execute(self.db.pool())
        .await;
        if let Err(error) = stored {
            tracing::warn!(%error, kind = kind.as_str(), "audit event not stored");
        }
    }
}
