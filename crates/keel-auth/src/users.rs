//! Users and their passwords. Passwords are hashed with argon2id (OWASP's parameters:
//! 19 MiB, two passes, one lane) on blocking threads, a few at a time, so that logins
//! neither stall the async threads nor let a flood of them exhaust memory.

use std::sync::Arc;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use sqlx::Row;
use sqlx::any::AnyRow;
use tokio::sync::Semaphore;

use crate::crypto::Secrets;
use crate::db::{Db, DbError};

/// Hashes computed at once; each takes 19 MiB while it runs.
const CONCURRENT_HASHES: usize = 4;
/// Longest password accepted: argon2 takes any length, but hashing megabytes on request
/// is a denial of service.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Shortest password accepted when a user is created (NIST SP 800-63B §3.1.1.2).
pub const MIN_PASSWORD_CHARS: usize = 8;

/// A user as stored, without the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user_id: String,
    pub username: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub disabled: bool,
    /// Until when sign-ins are refused after too many failures (Unix seconds).
    pub locked_until: Option<i64>,
    /// Whether signing in also takes a TOTP code.
    pub totp: bool,
}

impl User {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            email: row.try_get("email")?,
            name: row.try_get("name")?,
            disabled: row.try_get::<Option<i64>, _>("disabled_at")?.is_some(),
            locked_until: row.try_get("locked_until")?,
            totp: row.try_get::<Option<Vec<u8>>, _>("totp_secret")?.is_some(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{0}")]
    Invalid(String),
    #[error("a user named {0:?} exists already")]
    Exists(String),
    #[error("password hashing failed")]
    Hashing,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for UserError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(DbError::Query(error))
    }
}

/// When failed sign-ins lock an account, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    pub threshold: i64,
    pub base: i64,
    pub max: i64,
}

/// Runs argon2id off the async threads.
#[derive(Clone)]
pub struct PasswordHashing {
    permits: Arc<Semaphore>,
    /// A hash of a random password, checked when a user does not exist so that the answer
    /// takes as long as for one who does.
    dummy: Arc<str>,
}

impl PasswordHashing {
    pub async fn new(secrets: &Secrets) -> Result<Self, UserError> {
        let permits = Arc::new(Semaphore::new(CONCURRENT_HASHES));
        let mut salt = [0u8; 16];
        secrets.fill_random(&mut salt);
        let random = secrets.generate_secret();
        let dummy = hash_blocking(random, salt).await?;
        Ok(Self {
            permits,
            dummy: dummy.into(),
        })
    }

    pub async fn hash(&self, secrets: &Secrets, password: String) -> Result<String, UserError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| UserError::Hashing)?;
        let mut salt = [0u8; 16];
        secrets.fill_random(&mut salt);
        hash_blocking(password, salt).await
    }

    /// Whether `password` matches `stored` (a PHC string), or, without one, the same work
    /// for nothing.
    pub async fn verify(&self, password: &str, stored: Option<&str>) -> bool {
        if password.len() > MAX_PASSWORD_BYTES {
            return false;
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let exists = stored.is_some();
        let hash = stored.map_or_else(|| Arc::clone(&self.dummy), Arc::from);
        let password = password.to_owned();
        let matched = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.as_bytes(), &*hash)
                .is_ok()
        })
        .await
        .unwrap_or(false);
        exists && matched
    }
}

async fn hash_blocking(password: String, salt: [u8; 16]) -> Result<String, UserError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|_| UserError::Hashing)
    })
    .await
    .map_err(|_| UserError::Hashing)?
}

/// The user directory, in the database.
#[derive(Clone)]
pub struct Users {
    db: Db,
}

impl Users {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create(
        &self,
        secrets: &Secrets,
        hashing: &PasswordHashing,
        new: NewUser,
        now: i64,
    ) -> Result<User, UserError> {
        validate(&new)?;
        let hash = hashing.hash(secrets, new.password).await?;
        let user_id = secrets.generate_id();
        let inserted = sqlx::query(
            "INSERT INTO users (user_id, username, password_hash, email, name, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (username) DO NOTHING",
        )
        .bind(&user_id)
        .bind(&new.username)
        .bind(hash)
        .bind(&new.email)
        .bind(&new.name)
        .bind(now)
        .execute(self.db.pool())
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(UserError::Exists(new.username));
        }
        Ok(User {
            user_id,
            username: new.username,
            email: new.email,
            name: new.name,
            disabled: false,
            locked_until: None,
            totp: false,
        })
    }

    /// The user named `username` and their password hash.
    pub async fn find_for_login(
        &self,
        username: &str,
    ) -> Result<Option<(User, String)>, UserError> {
        let row = sqlx::query("SELECT * FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(self.db.pool())
            .await?;
        row.map(|row| Ok((User::from_row(&row)?, row.try_get("password_hash")?)))
            .transpose()
    }

    /// Counts a failed sign-in; from `policy.threshold` failures in a row on, locks the
    /// account for `policy.base`, doubling with each further failure up to `policy.max`.
    /// Returns the lock's end when there is one.
    pub async fn record_failure(
        &self,
        user_id: &str,
        now: i64,
        policy: &LockoutPolicy,
    ) -> Result<Option<i64>, UserError> {
        let failures: i64 = sqlx::query_scalar(
            "UPDATE users SET failed_logins = failed_logins + 1 WHERE user_id = $1 \
             RETURNING failed_logins",
        )
        .bind(user_id)
        .fetch_one(self.db.pool())
        .await?;
        let Some(beyond) = failures.checked_sub(policy.threshold).filter(|b| *b >= 0) else {
            return Ok(None);
        };
        let lock = policy
            .base
            .saturating_mul(1_i64 << beyond.min(20))
            .min(policy.max);
        let until = now.saturating_add(lock);
        sqlx::query("UPDATE users SET locked_until = $1 WHERE user_id = $2")
            .bind(until)
            .bind(user_id)
            .execute(self.db.pool())
            .await?;
        Ok(Some(until))
    }

    /// Sets a new password (checked as at creation) and clears failed sign-ins; true when
    /// the user exists.
    pub async fn set_password(
        &self,
        secrets: &Secrets,
        hashing: &PasswordHashing,
        user_id: &str,
        password: String,
    ) -> Result<bool, UserError> {
        if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
            return Err(UserError::Invalid(
                "password must be 8 characters to 1024 bytes".to_owned(),
            ));
        }
        let hash = hashing.hash(secrets, password).await?;
        let updated = sqlx::query(
            "UPDATE users SET password_hash = $1, failed_logins = 0, locked_until = NULL \
             WHERE user_id = $2",
        )
        .bind(hash)
        .bind(user_id)
        .execute(self.db.pool())
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Disables (`Some(now)`) or enables (`None`) a user; a disabled user's sessions end.
    /// True when the user exists.
    pub async fn set_disabled(&self, user_id: &str, at: Option<i64>) -> Result<bool, UserError> {
        let mut tx = self.db.pool().begin().await?;
        let updated = sqlx::query("UPDATE users SET disabled_at = $1 WHERE user_id = $2")
            .bind(at)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if at.is_some() {
            sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(updated.rows_affected() == 1)
    }

    /// The sealed TOTP secret of `user_id`.
    pub async fn totp_secret(&self, user_id: &str) -> Result<Option<Vec<u8>>, UserError> {
        Ok(
            sqlx::query_scalar("SELECT totp_secret FROM users WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(self.db.pool())
                .await?
                .flatten(),
        )
    }

    /// Stores a sealed TOTP secret; sign-ins from now on need a code. The user's sessions
    /// and grants end, so that every session and token after this passed the second
    /// factor (what `amr` then says).
    pub async fn set_totp(&self, user_id: &str, sealed: &[u8], now: i64) -> Result<(), UserError> {
        let mut tx = self.db.pool().begin().await?;
        sqlx::query("UPDATE users SET totp_secret = $1, totp_last_step = NULL WHERE user_id = $2")
            .bind(sealed)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        end_sessions_and_grants(&mut tx, user_id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user's own enrolment: as [`Self::set_totp`], with the step of the code that
    /// proved the secret spent, and only while the user has no second factor and is not
    /// disabled (two enrolments at once: the first wins). False when it was not done.
    pub async fn enrol_totp(
        &self,
        user_id: &str,
        sealed: &[u8],
        step: i64,
        now: i64,
    ) -> Result<bool, UserError> {
        let mut tx = self.db.pool().begin().await?;
        let enrolled = sqlx::query(
            "UPDATE users SET totp_secret = $1, totp_last_step = $2 \
             WHERE user_id = $3 AND totp_secret IS NULL AND disabled_at IS NULL",
        )
        .bind(sealed)
        .bind(step)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        if enrolled.rows_affected() != 1 {
            return Ok(false);
        }
        end_sessions_and_grants(&mut tx, user_id, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Marks TOTP step `step` used; false when it (or a later one) was used already, so
    /// that a code works once.
    pub async fn use_totp_step(&self, user_id: &str, step: i64) -> Result<bool, UserError> {
        let marked = sqlx::query(
            "UPDATE users SET totp_last_step = $1 WHERE user_id = $2 \
             AND (totp_last_step IS NULL OR totp_last_step < $3)",
        )
        .bind(step)
        .bind(user_id)
        .bind(step)
        .execute(self.db.pool())
        .await?;
        Ok(marked.rows_affected() == 1)
    }

    /// A successful sign-in clears the failures.
    pub async fn record_success(&self, user_id: &str) -> Result<(), UserError> {
        sqlx::query("UPDATE users SET failed_logins = 0, locked_until = NULL WHERE user_id = $1")
            .bind(user_id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    pub async fn find(&self, user_id: &str) -> Result<Option<User>, UserError> {
        let row = sqlx::query("SELECT * FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.as_ref().map(User::from_row).transpose()?)
    }
}

fn validate(new: &NewUser) -> Result<(), UserError> {
    let invalid = |message: &str| Err(UserError::Invalid(message.to_owned()));
    let name_ok = !new.username.is_empty()
        && new.username.len() <= 128
        && new
            .username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._@+".contains(&b));
    if !name_ok {
        return invalid("username must be 1 to 128 letters, digits, '-', '.', '_', '@' or '+'");
    }
    if new.password.chars().count() < MIN_PASSWORD_CHARS {
        return invalid("password must be at least 8 characters");
    }
    if new.password.len() > MAX_PASSWORD_BYTES {
        return invalid("password must be at most 1024 bytes");
    }
    Ok(())
}

/// Ends `user_id`'s sessions and grants in `tx`, as turning on a second factor does: every
/// session and token after it passed the factor.
async fn end_sessions_and_grants(
    tx: &mut sqlx::AnyConnection,
    user_id: &str,
    now: i64,
) -> Result<(), UserError> {
    sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE token_families SET revoked_at = $1, revoked_reason = 'second factor enabled' \
         WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(username: &str, password: &str) -> NewUser {
        NewUser {
            username: username.into(),
            password: password.into(),
            email: None,
            name: None,
        }
    }

    #[test]
    fn usernames_and_passwords_are_checked() {
        validate(&new("alice@example.com", "correct horse")).unwrap();
        for (username, password) in [
            ("", "long enough"),
            ("has space", "long enough"),
            ("<script>", "long enough"),
            ("alice", "short"),
        ] {
            assert!(
                validate(&new(username, password)).is_err(),
                "{username} {password}"
            );
        }
        assert!(validate(&new("alice", &"x".repeat(MAX_PASSWORD_BYTES + 1))).is_err());
    }

    #[tokio::test]
    async fn hashes_verify_only_their_password_and_unknown_users_never_do() {
        let secrets = Secrets::from_bytes(&[1; 32]);
        let hashing = PasswordHashing::new(&secrets).await.unwrap();
        let hash = hashing
            .hash(&secrets, "correct horse".into())
            .await
            .unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(hashing.verify("correct horse", Some(&hash)).await);
        assert!(!hashing.verify("correct hors", Some(&hash)).await);
        assert!(!hashing.verify("correct horse", None).await);
        assert!(!hashing.verify("x", Some("not a phc string")).await);
        let long = "y".repeat(MAX_PASSWORD_BYTES + 1);
        assert!(!hashing.verify(&long, Some(&hash)).await);
        // A fresh salt every time.
        assert_ne!(
            hashing
                .hash(&secrets, "correct horse".into())
                .await
                .unwrap(),
            hash
        );
    }
}
