//! Removal of what has expired: codes, sessions, device codes, assertion ids, refresh and
//! access token records. Run by every server now and then (deletes are idempotent, so
//! several servers sweeping one database only repeat each other's work).

use crate::db::Db;

/// Kept this long past expiry, so that a late replay of a code or refresh token is still
/// recognized as a replay (and revokes its grant) rather than as unknown.
const REPLAY_MEMORY: i64 = 24 * 3600;

/// Deletes expired rows; returns how many. A grant goes once every refresh token it could
/// have (they expire `refresh_token_ttl` after it began) is past the replay memory.
pub async fn sweep(db: &Db, now: i64, refresh_token_ttl: i64) -> Result<u64, sqlx::Error> {
    let remembered = now - REPLAY_MEMORY;
    let statements: [(&str, i64); 7] = [
        (
            "DELETE FROM authorization_codes WHERE expires_at < $1",
            remembered,
        ),
        (
            "DELETE FROM refresh_tokens WHERE expires_at < $1",
            remembered,
        ),
        ("DELETE FROM login_sessions WHERE expires_at < $1", now),
        ("DELETE FROM device_codes WHERE expires_at < $1", remembered),
        ("DELETE FROM assertion_jtis WHERE expires_at < $1", now),
        ("DELETE FROM access_tokens WHERE expires_at < $1", now),
        (
            "DELETE FROM token_families WHERE created_at < $1",
            remembered.saturating_sub(refresh_token_ttl),
        ),
    ];
    let mut removed = 0;
    for (sql, before) in statements {
        removed += sqlx::query(sql)
            .bind(before)
            .execute(db.pool())
            .await?
            .rows_affected();
    }
    Ok(removed)
}
