//! The database: PostgreSQL in production, SQLite in the embedded profile, through sqlx's
//! `Any` driver so that every query is written once. The SQL sticks to what both accept:
//! `$N` parameters, `RETURNING`, `ON CONFLICT`; integers (Unix seconds for times), text
//! and bytes only. The schema differs only in type names, so each backend has its own
//! migrations, kept side by side and in step.

use std::path::Path;
use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, Executor};

static POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("auth.database must start with postgres:// or sqlite: (it starts with {0:?})")]
    Scheme(String),
    #[error("cannot create the directory of the SQLite database {path}: {error}")]
    Directory { path: String, error: std::io::Error },
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl FromStr for Backend {
    type Err = DbError;

    fn from_str(url: &str) -> Result<Self, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            // Only the scheme: the rest may hold a password.
            let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
            Err(DbError::Scheme(scheme.chars().take(20).collect()))
        }
    }
}

/// The advisory locks the server takes (numbers unlikely to clash with other users of
/// the database).
#[derive(Debug, Clone, Copy)]
pub enum LockKey {
    SigningKeys,
}

impl LockKey {
    fn id(self) -> i64 {
        match self {
            Self::SigningKeys => 0x6b65_656c_0001,
        }
    }
}

/// A migrated connection pool.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connects to `url` and brings its schema up to date. A SQLite file (and its
    /// directory) is created when missing.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        let backend: Backend = url.parse()?;
        install_default_drivers();
        let mut url = url.to_owned();
        if backend == Backend::Sqlite {
            url = sqlite_create_url(&url)?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Postgres => 10,
                // One writer at a time anyway; a few readers beside it (WAL).
                Backend::Sqlite => 4,
            })
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    // Readers never wait for the writer (sqlx leaves SQLite's journal
                    // mode as it finds it); the busy timeout (sqlx's 5 s) covers writers.
                    if backend == Backend::Sqlite {
                        connection.execute("PRAGMA journal_mode=WAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(DbError::Connect)?;
        let migrator = match backend {
            Backend::Postgres => &POSTGRES,
            Backend::Sqlite => &SQLITE,
        };
        migrator.run(&pool).await.map_err(DbError::Migrate)?;
        Ok(Self { pool, backend })
    }

    /// Takes `key`'s lock for the rest of `tx`, so that servers sharing the database do
    /// the guarded work one at a time. PostgreSQL: a transaction-scoped advisory lock.
    /// SQLite: nothing more is needed, since it lets one writer in at a time and the
    /// embedded profile runs one server per file.
    pub async fn lock(&self, tx: &mut AnyConnection, key: LockKey) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key.id())
                .execute(tx)
                .await?;
        }
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// The file of a SQLite URL; `None` for an in-memory database.
pub fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// Creates `dir` (and its parents) readable by its owner only, as it holds keys.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// `url` with `mode=rwc` (create when missing), after creating the file's directory.
fn sqlite_create_url(url: &str) -> Result<String, DbError> {
    let dir = sqlite_path(url).and_then(|path| Some((path, Path::new(path).parent()?)));
    if let Some((path, dir)) = dir.filter(|(_, dir)| !dir.as_os_str().is_empty()) {
        private_dir(dir).map_err(|error| DbError::Directory {
            path: path.to_owned(),
            error,
        })?;
    }
    let query = url.split_once('?').map_or("", |(_, query)| query);
    if query.split('&').any(|pair| pair.starts_with("mode=")) {
        return Ok(url.to_owned());
    }
    let separator = if query.is_empty() { '?' } else { '&' };
    Ok(format!("{url}{separator}mode=rwc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_comes_from_the_url() {
        assert_eq!(
            "postgres://u@h/db".parse::<Backend>().unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            "postgresql://h/db".parse::<Backend>().unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            "sqlite://.keel/auth.db".parse::<Backend>().unwrap(),
            Backend::Sqlite
        );
        let error = "mysql://u:pw@h/db"
            .parse::<Backend>()
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"mysql\""), "{error}");
        assert!(!error.contains("pw"), "no password in errors: {error}");
    }

    #[test]
    fn sqlite_files_are_created_when_missing() {
        let dir = std::env::temp_dir().join(format!("keel-auth-db-{}", std::process::id()));
        let file = dir.join("nested/auth.db");
        let url = format!("sqlite://{}", file.display());
        assert_eq!(sqlite_create_url(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(file.parent().unwrap().is_dir());
        assert_eq!(
            sqlite_create_url(&format!("{url}?mode=ro")).unwrap(),
            format!("{url}?mode=ro")
        );
        assert_eq!(
            sqlite_create_url("sqlite::memory:?cache=shared").unwrap(),
            "sqlite::memory:?cache=shared&mode=rwc"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
