//! Role-based access control: roles (optionally for one audience), the scopes each role
//! unlocks, groups of users, and bindings of roles to users, groups and clients.
//!
//! What it decides for a token: its `roles` claim (the subject's roles, directly or
//! through groups, with no audience, or for the token's one audience), and which of the asked
//! scopes are granted (a scope some role maps is granted only to holders of such a role that
//! counts in the token: one with no audience, or for the token's one audience).

use std::collections::BTreeSet;

use serde::Serialize;
use sqlx::Row;

use crate::db::{Db, DbError};
use crate::scope::Scopes;

/// Who a role is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Group(String),
    Client(String),
}

impl Subject {
    fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::Group(_) => "group",
            Self::Client(_) => "client",
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::User(id) | Self::Group(id) | Self::Client(id) => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Role {
    pub name: String,
    pub audience: Option<String>,
    pub description: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} exists already")]
    Exists(String),
    #[error("{0} does not exist")]
    Missing(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for RbacError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(DbError::Query(error))
    }
}

/// What a subject holds, as a token needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// (role, audience) pairs.
    roles: Vec<(String, Option<String>)>,
    /// (scope, audience of the role unlocking it) pairs.
    unlocked: BTreeSet<(String, Option<String>)>,
}

/// Whether a role for `audience` counts in a token for `audiences`: a role with no
/// audience always, one for an audience only when that is the token's only one.
fn counts_in(audience: Option<&str>, audiences: &[&str]) -> bool {
    audience.is_none_or(|audience| audiences == [audience])
}

impl Holdings {
    /// Every role held, whatever its audience.
    pub fn all_roles(&self) -> Vec<String> {
        self.roles.iter().map(|(name, _)| name.clone()).collect()
    }

    /// The role names for a token whose audiences are `audiences`: the roles without an
    /// audience, and those for an audience when it is the token's only one. The claim is
    /// flat, so in a token for several audiences a role for one of them would read as a
    /// role at all of them (`admin` for orders passing for `admin` at payments).
    pub fn roles_for(&self, audiences: &[&str]) -> Vec<String> {
        let names: BTreeSet<&str> = self
            .roles
            .iter()
            .filter(|(_, audience)| counts_in(audience.as_deref(), audiences))
            .map(|(name, _)| name.as_str())
            .collect();
        names.into_iter().map(str::to_owned).collect()
    }

    /// Whether a role counting in a token for `audiences` (as for `roles_for`) unlocks
    /// `scope`: a role held for another audience unlocks nothing here, or a token for
    /// catalog could carry a scope only orders' administrators hold.
    fn unlocks(&self, scope: &str, audiences: &[&str]) -> bool {
        self.unlocked.iter().any(|(unlocked, audience)| {
            unlocked == scope && counts_in(audience.as_deref(), audiences)
        })
    }
}

#[derive(Clone)]
pub struct Rbac {
    db: Db,
}

/// Role and group names: short, and safe in a header (the gateway forwards roles).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl Rbac {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create_role(
        &self,
        name: &str,
        audience: Option<&str>,
        description: &str,
        scopes: &Scopes,
        now: i64,
    ) -> Result<Role, RbacError> {
        if !valid_name(name) {
            return Err(RbacError::Invalid(format!(
                "role name {name:?} must be 1 to 64 letters, digits, '-', '_', '.' or ':'"
            )));
        }
        let mut tx = self.db.pool().begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO roles (name, audience, description, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(audience)
        .bind(description)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(RbacError::Exists(format!("role {name}")));
        }
        for scope in scopes.iter() {
            sqlx::query("INSERT INTO role_scopes (role, scope) VALUES ($1, $2)")
                .bind(name)
                .bind(scope)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Role {
            name: name.to_owned(),
            audience: audience.map(str::to_owned),
            description: description.to_owned(),
            scopes: scopes.iter().map(str::to_owned).collect(),
        })
    }

    pub async fn create_group(&self, name: &str, now: i64) -> Result<(), RbacError> {
        if !valid_name(name) {
            return Err(RbacError::Invalid(format!(
                "group name {name:?} is not valid"
            )));
        }
        let inserted = sqlx::query(
            "INSERT INTO user_groups (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now)
        .execute(self.db.pool())
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(RbacError::Exists(format!("group {name}")));
        }
        Ok(())
    }

    pub async fn add_member(&self, group: &str, user_id: &str) -> Result<(), RbacError> {
        self.require("user_groups", "name", group, "group").await?;
        self.require("users", "user_id", user_id, "user").await?;
        sqlx::query(
            "INSERT INTO user_group_members (group_name, user_id) VALUES ($1, $2) \
             ON CONFLICT (group_name, user_id) DO NOTHING",
        )
        .bind(group)
        .bind(user_id)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Binds `role` to `subject` (idempotent).
    pub async fn grant(&self, role: &str, subject: &Subject, now: i64) -> Result<(), RbacError> {
        self.require("roles", "name", role, "role").await?;
        match subject {
            Subject::User(id) => self.require("users", "user_id", id, "user").await?,
            Subject::Group(name) => self.require("user_groups", "name", name, "group").await?,
            Subject::Client(id) => self.require("clients", "client_id", id, "client").await?,
        }
        sqlx::query(
            "INSERT INTO role_bindings (role, subject_kind, subject_id, granted_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (role, subject_kind, subject_id) DO NOTHING",
        )
        .bind(role)
        .bind(subject.kind())
        .bind(subject.id())
        .bind(now)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Unbinds `role` from `subject`; true when it was bound.
    pub async fn revoke(&self, role: &str, subject: &Subject) -> Result<bool, RbacError> {
        let removed = sqlx::query(
            "DELETE FROM role_bindings WHERE role = $1 AND subject_kind = $2 AND subject_id = $3",
        )
        .bind(role)
        .bind(subject.kind())
        .bind(subject.id())
        .execute(self.db.pool())
        .await?;
        Ok(removed.rows_affected() > 0)
    }

    /// `table.column = value` exists, or a `Missing` error naming `what`.
    async fn require(
        &self,
        table: &'static str,
        column: &'static str,
        value: &str,
        what: &str,
    ) -> Result<(), RbacError> {
        // Table and column come from the callers above, never from input.
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE {column} = $1");
        let found: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(value)
            .fetch_one(self.db.pool())
            .await?;
        if found == 0 {
            return Err(RbacError::Missing(format!("{what} {value:?}")));
        }
        Ok(())
    }

    /// The roles `subject` holds (a user also through their groups) and the scopes they
    /// unlock.
    pub async fn holdings(&self, subject: &Subject) -> Result<Holdings, RbacError> {
        let rows = sqlx::query(
            "SELECT DISTINCT r.name, r.audience FROM roles r \
             JOIN role_bindings b ON b.role = r.name \
             WHERE (b.subject_kind = $1 AND b.subject_id = $2) \
             OR (b.subject_kind = 'group' AND $3 = 'user' AND b.subject_id IN \
                 (SELECT group_name FROM user_group_members WHERE user_id = $4))",
        )
        .bind(subject.kind())
        .bind(subject.id())
        .bind(subject.kind())
        .bind(subject.id())
        .fetch_all(self.db.pool())
        .await?;
        let mut holdings = Holdings::default();
        for row in rows {
            holdings
                .roles
                .push((row.try_get("name")?, row.try_get("audience")?));
        }
        for (role, audience) in &holdings.roles {
            let scopes: Vec<String> =
                sqlx::query_scalar("SELECT scope FROM role_scopes WHERE role = $1")
                    .bind(role)
                    .fetch_all(self.db.pool())
                    .await?;
            holdings
                .unlocked
                .extend(scopes.into_iter().map(|scope| (scope, audience.clone())));
        }
        Ok(holdings)
    }

    /// The scopes of `asked` that `holdings` may be granted in a token for `audiences`:
    /// those no role maps, and those its roles counting in such a token unlock.
    pub async fn permitted(
        &self,
        asked: &Scopes,
        holdings: &Holdings,
        audiences: &[&str],
    ) -> Result<Scopes, RbacError> {
        let restricted: Vec<String> = sqlx::query_scalar("SELECT DISTINCT scope FROM role_scopes")
            .fetch_all(self.db.pool())
            .await?;
        Ok(asked
            .iter()
            .filter(|scope| {
                !restricted.iter().any(|r| r == scope) || holdings.unlocks(scope, audiences)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_scoped_to_the_tokens_audience() {
        let holdings = Holdings {
            roles: vec![
                ("admin".into(), Some("orders".into())),
                ("customer".into(), None),
                ("auditor".into(), Some("payments".into())),
            ],
            unlocked: BTreeSet::new(),
        };
        assert_eq!(holdings.roles_for(&["orders"]), ["admin", "customer"]);
        assert_eq!(holdings.roles_for(&["keel-api"]), ["customer"]);
        // For several audiences, only the roles for none: orders' admin is not payments'.
        assert_eq!(holdings.roles_for(&["orders", "payments"]), ["customer"]);
    }

    #[test]
    fn scopes_are_unlocked_by_the_roles_that_count_in_the_token() {
        let holdings = Holdings {
            roles: vec![
                ("admin".into(), Some("orders".into())),
                ("customer".into(), None),
            ],
            unlocked: BTreeSet::from([
                ("orders:write".into(), Some("orders".into())),
                ("orders:read".into(), None),
            ]),
        };
        assert!(holdings.unlocks("orders:write", &["orders"]));
        assert!(!holdings.unlocks("orders:write", &["catalog"]));
        assert!(!holdings.unlocks("orders:write", &["orders", "payments"]));
        assert!(holdings.unlocks("orders:read", &["orders", "payments"]));
        assert!(!holdings.unlocks("payments:write", &["orders"]));
    }

    #[test]
    fn names_are_header_safe() {
        assert!(valid_name("keel-admin"));
        assert!(valid_name("orders:writer"));
        for bad in ["", "has space", "a,b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
