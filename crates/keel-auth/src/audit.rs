//! The audit trail: security events written to the `audit_events` table, and logged, by
//! one call, so the two never disagree.

use serde::Serialize;

use sqlx::Row;

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
    /// Someone signed in.
    LoginSucceeded,
    /// Someone signed out.
    Logout,
    /// A sign-in failed (unknown user or wrong password).
    LoginFailed,
    /// An authorization code was presented again: its grant is revoked.
    CodeReplayed,
    /// A used refresh token was presented again after the grace window: its grant is
    /// revoked.
    RefreshReused,
    /// A user was created.
    UserCreated,
    /// Roles, groups or bindings changed.
    AdminChange,
    /// A user approved or denied a device (RFC 8628).
    DeviceAnswered,
    /// A client revoked a token (and, for a refresh token, its grant).
    TokenRevoked,
    /// A user turned on their second factor themselves (`/account/totp`).
    SecondFactorEnrolled,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientAuthFailed => "client_auth_failed",
            Self::TokenIssued => "token_issued",
            Self::ClientCreated => "client_created",
            Self::KeyGenerated => "key_generated",
            Self::LoginSucceeded => "login_succeeded",
            Self::Logout => "logout",
            Self::LoginFailed => "login_failed",
            Self::CodeReplayed => "code_replayed",
            Self::RefreshReused => "refresh_reused",
            Self::UserCreated => "user_created",
            Self::AdminChange => "admin_change",
            Self::TokenRevoked => "token_revoked",
            Self::DeviceAnswered => "device_answered",
            Self::SecondFactorEnrolled => "second_factor_enrolled",
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
    /// Who made an administrative change through the admin API (`user <id> via client
    /// <id>`); none for local changes and for what is not administration.
    pub actor: Option<&'a str>,
}

/// Longest subject or client id stored.
const MAX_FIELD: usize = 128;

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A stored event, as the audit query returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub kind: String,
    pub outcome: String,
    pub subject: Option<String>,
    pub client_id: Option<String>,
    pub ip: Option<String>,
    pub detail: Option<String>,
    pub actor: Option<String>,
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
        // What a request names (a username, a client id) is capped: a flood of long
        // names must not grow the table faster than the requests that carry them.
        let subject = event.subject.map(|s| truncate(s, MAX_FIELD));
        let client_id = event.client_id.map(|s| truncate(s, MAX_FIELD));
        tracing::info!(
            target: "keel_auth::audit",
            kind = kind.as_str(),
            outcome,
            subject,
            client_id,
            ip = event.ip.as_deref(),
            detail = event.detail.as_deref(),
            actor = event.actor,
            "audit event"
        );
        let stored = sqlx::query(
            "INSERT INTO audit_events (at, kind, outcome, subject, client_id, ip, detail, actor) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(at)
        .bind(kind.as_str())
        .bind(outcome)
        .bind(subject)
        .bind(client_id)
        .bind(event.ip)
        .bind(event.detail)
        .bind(event.actor)
        .execute(self.db.pool())
        .await;
        if let Err(error) = stored {
            tracing::warn!(%error, kind = kind.as_str(), "audit event not stored");
        }
    }

    /// The newest `limit` events, newest first.
    pub async fn recent(&self, limit: i64) -> Result<Vec<AuditRecord>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, at, kind, outcome, subject, client_id, ip, detail, actor FROM audit_events \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRecord {
                    id: row.try_get("id")?,
                    at: row.try_get("at")?,
                    kind: row.try_get("kind")?,
                    outcome: row.try_get("outcome")?,
                    subject: row.try_get("subject")?,
                    client_id: row.try_get("client_id")?,
                    ip: row.try_get("ip")?,
                    detail: row.try_get("detail")?,
                    actor: row.try_get("actor")?,
                })
            })
            .collect()
    }
}
