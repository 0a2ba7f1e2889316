//! The authorization server's database, through the SDK's data layer: PostgreSQL in
//! production, SQLite in the embedded profile, every query written once. The schema differs
//! only in type names, so each backend has its own migrations, kept side by side and in
//! step.

use keel_sdk::data::{LockKey, Migrations};

pub use keel_sdk::data::{Backend, Database as Db, DbError, sqlite_path};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("migrations/postgres"),
    sqlite: sqlx::migrate!("migrations/sqlite"),
};

/// Held while signing keys are generated or rotated, so servers sharing the database do
/// it one at a time.
pub const SIGNING_KEYS_LOCK: LockKey = LockKey(0x6b65_656c_0001);
