//! A service's database: PostgreSQL in production, SQLite in the embedded profile, through
//! sqlx's `Any` driver so that every query is written once. The SQL sticks to what both
//! accept: `$N` parameters, `RETURNING`, `ON CONFLICT`; integers (Unix seconds or
//! milliseconds for times), text and bytes only. The schema differs only in type names,
//! so a service keeps one migration folder per backend, side by side and in step
//! ([`Migrations`]).
//!
//! [`Database::connect`] creates a missing database (PostgreSQL) or file (SQLite), then
//! brings the service's schema and the SDK's own tables (outbox, inbox) up to date under a
//! lock, so instances starting together do not race. [`Tx`] is a transaction that can run
//! work once it has committed, such as waking the outbox relay.

use std::fs::File;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, SqlSafeStr};
use sqlx_core::transaction::TransactionManager;
use tokio::sync::Notify;

use crate::events::outbox::{self, Staged};

/// A service's migrations, one folder per backend:
///
/// ```ignore
/// static MIGRATIONS: Migrations = Migrations {
///     postgres: sqlx::migrate!("migrations/postgres"),
///     sqlite: sqlx::migrate!("migrations/sqlite"),
/// };
/// ```
#[derive(Debug)]
pub struct Migrations {
    pub postgres: Migrator,
    pub sqlite: Migrator,
}

impl Migrations {
    /// No tables of the service's own (only the SDK's: outbox, inbox, sagas).
    pub fn none() -> Self {
        Self {
            postgres: Migrator::with_migrations(Vec::new()),
            sqlite: Migrator::with_migrations(Vec::new()),
        }
    }

    fn for_backend(&self, backend: Backend) -> &Migrator {
        match backend {
            Backend::Postgres => &self.postgres,
            Backend::Sqlite => &self.sqlite,
        }
    }
}

/// The SDK's own tables (outbox, inbox), versioned apart from the service's in their own
/// migrations table, so that neither set of version numbers constrains the other.
static SDK: Migrations = Migrations {
    postgres: sqlx::migrate!("migrations/postgres"),
    sqlite: sqlx::migrate!("migrations/sqlite"),
};
const SDK_MIGRATIONS_TABLE: &str = "_keel_sdk_migrations";

/// How long to wait for a pooled connection (or a new one) before giving up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection idle longer than this is pinged before it is handed out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the database URL must start with postgres:// or sqlite: (it starts with {0:?})")]
    Scheme(String),
    #[error("cannot create the directory of the SQLite database {path}: {error}")]
    Directory { path: String, error: std::io::Error },
    #[error("cannot lock {path} for migrations: {error}")]
    LockFile { path: String, error: std::io::Error },
    #[error("cannot create the database: {0}")]
    Create(#[source] sqlx::Error),
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

/// Locks the row of `table` whose `key` column is `value` for the rest of the transaction
/// on `connection`, before the transaction reads it and writes it: returns what the
/// reading `SELECT` must end with, `None` when there is no row to read. PostgreSQL:
/// `" FOR UPDATE"`, so that the read itself takes the lock (one round trip, no new row
/// version). SQLite has no row locks: a no-op update of the key takes the database's write
/// lock first (`""` then), and when it matched nothing the row is not to be read (one
/// committed since would be read unlocked). `table` and `key` are names, never input.
pub async fn lock_row(
    connection: &mut AnyConnection,
    table: &'static str,
    key: &'static str,
    value: &str,
) -> Result<Option<&'static str>, sqlx::Error> {
    lock_rows(connection, table, key, &[value]).await
}

/// [`lock_row`] for the rows whose `key` is one of `values`, read by one `SELECT … WHERE
/// key IN (…) ORDER BY key` ending with what this returns (`None`: none of them is there,
/// or no values).
/// The `ORDER BY` matters on PostgreSQL: rows are locked in the order they are read, so
/// transactions that lock overlapping sets this way never wait for each other in a cycle.
pub async fn lock_rows(
    connection: &mut AnyConnection,
    table: &'static str,
    key: &'static str,
    values: &[&str],
) -> Result<Option<&'static str>, sqlx::Error> {
    if values.is_empty() {
        return Ok(None);
    }
    if connection.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME {
        return Ok(Some(" FOR UPDATE"));
    }
    let touch = format!(
        "UPDATE {table} SET {key} = {key} WHERE {key} IN {}",
        value_rows(1, values.len(), 1)
    );
    // Prepared (and cached on the connection) for the few usual lengths only.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(touch)).persistent(values.len() <= 4);
    for value in values {
        query = query.bind(*value);
    }
    let locked = query.execute(connection).await?;
    Ok((locked.rows_affected() > 0).then_some(""))
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

/// An advisory lock that instances sharing a database take to do some work one at a time;
/// each user picks a number unlikely to clash with others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockKey(pub i64);

/// The outcome of [`Database::file_lock`].
pub(crate) enum FileLock {
    /// Locked by this process until the file is dropped.
    Held(File),
    /// Another process (or another pool in this one) holds it; the file can wait for it.
    Busy(File),
    /// PostgreSQL or in-memory SQLite: nothing to lock this way.
    Unneeded,
}

/// A migrated connection pool.
#[derive(Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    /// The SQLite file, for file locks; `None` for PostgreSQL and in-memory SQLite.
    file: Option<String>,
    /// Woken when a transaction that staged events in this database's outbox commits, so
    /// its relay needs no poll (one per database: a bus may serve several).
    outbox_ready: Arc<Notify>,
    /// Connections whose transaction just ended, for the next one ([`Warm`]).
    warm: Arc<Warm>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Connects to `url`, creating the database (or the SQLite file and its directory)
    /// when missing, and brings the SDK's tables and `migrations` up to date.
    pub async fn connect(url: &str, migrations: &Migrations) -> Result<Self, DbError> {
        let backend: Backend = url.parse()?;
        install_default_drivers();
        let (url, file) = match backend {
            Backend::Sqlite => (sqlite_create_url(url)?, sqlite_path(url).map(str::to_owned)),
            Backend::Postgres => {
                create_postgres_database(url).await?;
                (url.to_owned(), None)
            }
        };
        let pool = AnyPoolOptions::new()
            // Fail fast when the database is away (sqlx's default waits 30 s): callers
            // answer 503, consumers hold their message and back off.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // sqlx pings every connection it hands out (a round trip, on every
            // transaction) besides the ping it does when the connection comes back. A
            // connection back within the last second was just found alive by that ping;
            // only one idle longer (the server may have gone away since) is tried first.
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_BEFORE_PING {
                        connection.ping().await?;
                    }
                    Ok(true)
                })
            })
            .max_connections(match backend {
                // Room for concurrent consumers (up to 8 takers a group), sweeps, the
                // relay and requests beside them.
                Backend::Postgres => 20,
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
        let warm = Warm::new(
            match backend {
                Backend::Postgres => WARM_CONNECTIONS,
                // No network to save, and a pool of four to leave alone.
                Backend::Sqlite => 0,
            },
            &pool,
        );
        let database = Self {
            pool,
            backend,
            file,
            outbox_ready: Arc::default(),
            warm,
        };
        database.migrate(migrations).await?;
        Ok(database)
    }

    /// Runs the SDK's migrations, then the service's. PostgreSQL: sqlx holds an advisory
    /// lock per database meanwhile. SQLite: sqlx takes none, so a lock file beside the
    /// database keeps two processes from applying the same migration.
    async fn migrate(&self, migrations: &Migrations) -> Result<(), DbError> {
        let _guard = match self.file_lock("migrate")? {
            FileLock::Held(file) => Some(file),
            FileLock::Busy(file) => {
                // Blocks until the other holder is done: off the async threads.
                let locked = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|locked| locked);
                Some(locked.map_err(|error| self.lock_error("migrate", error))?)
            }
            FileLock::Unneeded => None,
        };
        let mut sdk =
            Migrator::with_migrations(SDK.for_backend(self.backend).iter().cloned().collect());
        sdk.dangerous_set_table_name(SDK_MIGRATIONS_TABLE);
        sdk.run(&self.pool).await.map_err(DbError::Migrate)?;
        migrations
            .for_backend(self.backend)
            .run(&self.pool)
            .await
            .map_err(DbError::Migrate)
    }

    /// Tries to lock `<file>.<purpose>.lock` beside a SQLite database; the lock holds
    /// until the file is dropped, and also ends when the process dies.
    pub(crate) fn file_lock(&self, purpose: &str) -> Result<FileLock, DbError> {
        let Some(path) = self.lock_path(purpose) else {
            return Ok(FileLock::Unneeded);
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| self.lock_error(purpose, error))?;
        match file.try_lock() {
            Ok(()) => Ok(FileLock::Held(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(FileLock::Busy(file)),
            Err(std::fs::TryLockError::Error(error)) => Err(self.lock_error(purpose, error)),
        }
    }

    fn lock_path(&self, purpose: &str) -> Option<String> {
        self.file
            .as_ref()
            .map(|file| format!("{file}.{purpose}.lock"))
    }

    fn lock_error(&self, purpose: &str, error: std::io::Error) -> DbError {
        DbError::LockFile {
            path: self.lock_path(purpose).unwrap_or_default(),
            error,
        }
    }

    /// Takes `key`'s lock for the rest of `tx`, so that instances sharing the database do
    /// the guarded work one at a time; call it before the transaction reads what it
    /// guards. PostgreSQL: a transaction-scoped advisory lock. SQLite: a write, which takes
    /// the database's one write lock now (waiting for it up to the busy timeout), where a
    /// transaction that read first could only fail with SQLITE_BUSY when it came to write.
    pub async fn lock(&self, tx: &mut AnyConnection, key: LockKey) -> Result<(), sqlx::Error> {
        let statement = match self.backend {
            Backend::Postgres => "SELECT pg_advisory_xact_lock($1)",
            Backend::Sqlite => {
                "INSERT INTO keel_locks (id) VALUES ($1) ON CONFLICT (id) DO NOTHING"
            }
        };
        sqlx::query(statement).bind(key.0).execute(tx).await?;
        Ok(())
    }

    /// Starts a transaction, on a connection whose last transaction just ended if there
    /// is one ([`Warm`]), else on one from the pool.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        let held = self.begun(None).await.map_err(|(error, _)| error)?;
        Ok(self.tx(held))
    }

    /// A connection in a transaction begun with `BEGIN` (or `statement`): a warm one if
    /// there is one, else one from the pool. A warm connection is handed out unchecked:
    /// one the server dropped meanwhile (a restart) fails here, and the transaction starts
    /// again on the pool's. On failure, the connection the statement failed on comes back
    /// with the error, still in doubt.
    async fn begun(&self, statement: Option<&str>) -> Result<Held, (sqlx::Error, Option<Held>)> {
        let (mut held, warm) = self.checkout().await.map_err(|error| (error, None))?;
        if let Err(error) = Self::start(&mut held, statement).await {
            if !(warm && broken(&error)) {
                return Err((error, Some(held)));
            }
            drop(held);
            held = Held::new(self.pool.acquire().await.map_err(|error| (error, None))?);
            if let Err(error) = Self::start(&mut held, statement).await {
                return Err((error, Some(held)));
            }
        }
        held.in_transaction = true;
        Ok(held)
    }

    /// Sends `BEGIN` (or `statement`) on `held`, in doubt until its answer is read.
    async fn start(held: &mut Held, statement: Option<&str>) -> Result<(), sqlx::Error> {
        held.in_doubt = true;
        let statement =
            statement.map(|statement| sqlx::AssertSqlSafe(statement.to_owned()).into_sql_str());
        Manager::begin(&mut held.connection, statement).await?;
        held.in_doubt = false;
        Ok(())
    }

    /// Starts a transaction that first records, in the inbox, each of `event_ids` as
    /// handled by consumer `group`; `None` (and no transaction) when any of them already
    /// was: a consumer's way in, so that a redelivered message is recognized before its
    /// handler runs (with several, the caller takes them one at a time to see which).
    ///
    /// On PostgreSQL the insert travels with `BEGIN`, one round trip for both (sqlx sends
    /// a custom `BEGIN` in the simple protocol, which takes no parameters: the strings go
    /// as hexadecimal digits, decoded by the server, so no input reaches the SQL text). A
    /// duplicate is then the unique key's violation, rolled back here.
    pub(crate) async fn begin_claiming(
        &self,
        group: &str,
        event_ids: &[&str],
    ) -> Result<Option<Tx>, sqlx::Error> {
        if self.backend == Backend::Sqlite || event_ids.is_empty() {
            let mut tx = self.begin().await?;
            for event_id in event_ids {
                if !inbox_insert(&mut tx, group, event_id).await? {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
            return Ok(Some(tx));
        }
        let (group, received_at) = (hex_text(group), unix_seconds());
        let rows = event_ids
            .iter()
            .map(|event_id| format!("({group}, {}, {received_at})", hex_text(event_id)))
            .collect::<Vec<_>>()
            .join(", ");
        let begin = format!(
            "BEGIN; INSERT INTO keel_inbox (consumer_group, event_id, received_at) VALUES {rows}"
        );
        match self.begun(Some(&begin)).await {
            Ok(held) => Ok(Some(self.tx(held))),
            // The server holds an aborted transaction that sqlx does not count: ended here.
            Err((sqlx::Error::Database(error), Some(mut held)))
                if error.code().as_deref() == Some("23505") =>
            {
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut *held.connection)
                    .await?;
                held.in_doubt = false;
                self.warm.put(held);
                Ok(None)
            }
            // Perhaps inside an aborted transaction too: left in doubt, the connection is
            // closed rather than handed on (the server rolls back as it goes).
            Err((error, _)) => Err(error),
        }
    }

    /// A connection for reads outside a transaction: a warm one if there is one, else one
    /// from the pool. [`Checkout::release`] hands it back warm once the reads are done
    /// (a request reading a few rows then costs no round trip of the pool's own).
    pub async fn connection(&self) -> Result<Checkout, sqlx::Error> {
        let (held, _) = self.checkout().await?;
        Ok(self.checkout_of(held))
    }

    fn checkout_of(&self, held: Held) -> Checkout {
        Checkout {
            held,
            warm: self.warm.clone(),
        }
    }

    /// A connection: a warm one (and true), else one from the pool.
    async fn checkout(&self) -> Result<(Held, bool), sqlx::Error> {
        Ok(match self.warm.take() {
            Some(held) => (held, true),
            None => (Held::new(self.pool.acquire().await?), false),
        })
    }

    fn tx(&self, held: Held) -> Tx {
        Tx {
            connection: self.checkout_of(held),
            staged: Vec::new(),
            after_commit: Vec::new(),
            outbox_ready: self.outbox_ready.clone(),
        }
    }

    /// Forgets inbox entries (events consumers handled) older than `older_than`; returns
    /// how many.
    pub async fn prune_inbox(&self, older_than: Duration) -> Result<u64, sqlx::Error> {
        let older_than = i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX);
        let cutoff = unix_seconds().saturating_sub(older_than);
        let pruned = sqlx::query("DELETE FROM keel_inbox WHERE received_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(pruned.rows_affected())
    }

    /// Notified when a transaction that staged outbox rows commits.
    pub(crate) fn outbox_ready(&self) -> &Notify {
        &self.outbox_ready
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Adds this database to `health`'s readiness checks, as `database`: a `SELECT 1`.
    pub fn add_ready_check(&self, health: &keel_runtime::Health) {
        let pool = self.pool.clone();
        health.add_check("database", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(|error| error.to_string())
            }
        });
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// A transaction that can run work once it has committed (never when it rolls back):
/// waking the outbox relay, say, or dropping a cache entry only once the change is
/// visible. It dereferences to the connection, for queries. Dropped unfinished, it rolls
/// back (as sqlx's transactions do: the rollback goes out before the connection's next
/// use).
pub struct Tx {
    /// The connection, handed back warm once the transaction ended cleanly.
    connection: Checkout,
    /// Envelopes for the outbox, written at commit.
    staged: Vec<Staged>,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
    outbox_ready: Arc<Notify>,
}

impl Tx {
    /// Runs `work` after a successful [`Tx::commit`].
    pub fn after_commit(&mut self, work: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(work));
    }

    /// Stages an envelope for the outbox: written with the others just before the
    /// commit, in one statement, and the relay woken once the commit succeeded.
    pub(crate) fn stage(&mut self, staged: Staged) {
        self.staged.push(staged);
    }

    /// How many envelopes are staged: a mark to go back to with [`Tx::unstage_to`].
    pub(crate) fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Drops what was staged after `mark` (work given up on within the transaction).
    pub(crate) fn unstage_to(&mut self, mark: usize) {
        self.staged.truncate(mark);
    }

    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let held = &mut self.connection.held;
        if !self.staged.is_empty() {
            outbox::write(&mut held.connection, &self.staged).await?;
        }
        Manager::commit(&mut held.connection).await?;
        held.in_transaction = false;
        self.connection.release();
        if !self.staged.is_empty() {
            self.outbox_ready.notify_one();
        }
        for work in self.after_commit {
            work();
        }
        Ok(())
    }

    /// Rolls back (dropping a `Tx` does too, a moment later).
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        Manager::rollback(&mut self.connection.held.connection).await?;
        self.connection.held.in_transaction = false;
        self.connection.release();
        Ok(())
    }
}

impl std::ops::Deref for Tx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.connection
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.connection
    }
}

/// A pooled connection for reads ([`Database::connection`]), and under every [`Tx`]; it
/// dereferences to the connection.
pub struct Checkout {
    held: Held,
    warm: Arc<Warm>,
}

impl Checkout {
    /// Hands the connection back for the next transaction or read, warm: call it once the
    /// reads are done. Dropped instead (an error, a cancelled request), it goes back
    /// through the pool, which checks it.
    pub fn release(self) {
        self.warm.put(self.held);
    }
}

impl std::ops::Deref for Checkout {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.held.connection
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.held.connection
    }
}

/// sqlx's transaction manager for `Any`: what its own transactions use, called directly so
/// that a [`Tx`] keeps its connection once it ends.
type Manager = <Any as sqlx::Database>::TransactionManager;

/// A pooled connection a [`Checkout`] (and so a [`Tx`]) holds.
struct Held {
    connection: PoolConnection<Any>,
    /// Begun and not yet committed or rolled back.
    in_transaction: bool,
    /// A BEGIN (or the ROLLBACK of a refused claim) was sent and its answer not yet read:
    /// dropped now (a cancelled future), the server may hold a transaction sqlx does not
    /// count, which no queued rollback would end and the pool's check would not notice.
    in_doubt: bool,
    /// When it left the pool: back through the pool after [`WARM_LIFETIME`], so that the
    /// pool's own lifetime rules still reach a connection a busy service keeps warm.
    since: Instant,
}

impl Held {
    fn new(connection: PoolConnection<Any>) -> Self {
        Self {
            connection,
            in_transaction: false,
            in_doubt: false,
            since: Instant::now(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.in_doubt {
            // Closed: the server rolls back whatever it holds as the connection goes.
            self.connection.close_on_drop();
        } else if self.in_transaction {
            // Queued, sent before anything else on the connection: the pool's check of a
            // returned connection flushes it.
            Manager::start_rollback(&mut self.connection);
        }
    }
}

/// How many connections at most wait in [`Warm`].
const WARM_CONNECTIONS: usize = 8;
/// How long a connection waits in [`Warm`] before it goes back to the pool.
const WARM_FOR: Duration = Duration::from_millis(250);
/// How long a connection may go from transaction to transaction without the pool.
const WARM_LIFETIME: Duration = Duration::from_secs(60);

/// Connections whose transaction just committed (or rolled back) cleanly, kept out of the
/// pool for a moment for the next transaction, newest first. sqlx's pool checks every
/// connection it takes back with a round trip to the server (`ping`); between two of a
/// busy service's transactions that check is all the connection does, and it was a
/// quarter of the shop's round trips to PostgreSQL. A connection that ended its
/// transaction without an error needs no check; one unused for `WARM_FOR` goes back to
/// the pool (checked as ever), so that readers using the pool directly are never short of
/// connections for long.
struct Warm {
    connections: Mutex<Vec<(Held, Instant)>>,
    capacity: usize,
    /// Not parked while the pool has no connection to spare, nor once it is closed.
    pool: AnyPool,
}

impl Warm {
    /// With a task that hands unused connections back to the pool, until the database
    /// is dropped.
    fn new(capacity: usize, pool: &AnyPool) -> Arc<Self> {
        let warm = Arc::new(Self {
            connections: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
            pool: pool.clone(),
        });
        if capacity > 0 {
            let weak = Arc::downgrade(&warm);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(WARM_FOR);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(warm) = weak.upgrade() else { return };
                    warm.trim();
                }
            });
        }
        warm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Held, Instant)>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection that ended its transaction last, if that was within `WARM_FOR`.
    fn take(&self) -> Option<Held> {
        let mut connections = self.lock();
        match connections.pop() {
            Some((held, since)) if since.elapsed() <= WARM_FOR => Some(held),
            // The newest is stale, and so is every other: back to the pool, unlocked
            // (dropping a pooled connection hands it to a task of the pool's).
            Some(stale) => {
                let rest = std::mem::take(&mut *connections);
                drop(connections);
                drop((stale, rest));
                None
            }
            None => None,
        }
    }

    fn put(&self, held: Held) {
        let pool = &self.pool;
        let starved = pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections()
            || pool.is_closed();
        if starved || held.since.elapsed() > WARM_LIFETIME {
            // Back to the pool.
            drop(held);
            return;
        }
        let overflow = {
            let mut connections = self.lock();
            if connections.len() < self.capacity {
                connections.push((held, Instant::now()));
                None
            } else {
                Some(held)
            }
        };
        // Back to the pool, unlocked.
        drop(overflow);
    }

    /// Hands the connections unused for `WARM_FOR` back to the pool.
    fn trim(&self) {
        let mut connections = self.lock();
        let fresh = connections.partition_point(|(_, since)| since.elapsed() > WARM_FOR);
        let stale: Vec<_> = connections.drain(..fresh).collect();
        drop(connections);
        drop(stale);
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // A pooled connection dropped goes back through a task of the pool's, which needs
        // a runtime; without one (a tool's runtime ended first) dropping would panic, so
        // the connections are forgotten instead: their sockets close with the process.
        if tokio::runtime::Handle::try_current().is_err() {
            for held in self.lock().drain(..) {
                std::mem::forget(held);
            }
        }
    }
}

/// `rows` tuples of `columns` numbered placeholders, the first numbered `first`:
/// `($3, $4), ($5, $6)` for (2, 2, 3). For multi-row `VALUES` (or, one row, an `IN` list),
/// whose values are bound.
pub fn value_rows(rows: usize, columns: usize, first: usize) -> String {
    (0..rows)
        .map(|row| {
            let start = first + row * columns;
            let placeholders: Vec<String> =
                (start..start + columns).map(|n| format!("${n}")).collect();
            format!("({})", placeholders.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `error` says the connection itself is gone (rather than the statement failed).
fn broken(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
}

/// Records `event_id` as handled by `group` within `tx`; false when it already was.
async fn inbox_insert(tx: &mut Tx, group: &str, event_id: &str) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO keel_inbox (consumer_group, event_id, received_at) VALUES ($1, $2, $3) \
         ON CONFLICT (consumer_group, event_id) DO NOTHING",
    )
    .bind(group)
    .bind(event_id)
    .bind(unix_seconds())
    .execute(&mut **tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// `text` as a PostgreSQL expression built of hexadecimal digits only: nothing in it can
/// end the literal.
fn hex_text(text: &str) -> String {
    use std::fmt::Write;
    let mut sql = String::with_capacity(text.len() * 2 + 40);
    sql.push_str("convert_from(decode('");
    for byte in text.bytes() {
        let _ = write!(sql, "{byte:02x}");
    }
    sql.push_str("', 'hex'), 'UTF8')");
    sql
}

/// Creates the PostgreSQL database `url` names when it does not exist (SQLSTATE 3D000 on
/// connecting), as a fresh development machine has none. Another instance creating it at
/// the same moment (42P04, or a unique violation in the catalog) is fine.
async fn create_postgres_database(url: &str) -> Result<(), DbError> {
    use sqlx::migrate::MigrateDatabase;
    use sqlx::{ConnectOptions, any::AnyConnectOptions};

    let options = AnyConnectOptions::from_str(url).map_err(DbError::Connect)?;
    match options.connect().await {
        Ok(connection) => {
            let _ = sqlx::Connection::close(connection).await;
            Ok(())
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("3D000") => {
            match Any::create_database(url).await {
                Ok(()) => Ok(()),
                Err(sqlx::Error::Database(error))
                    if matches!(error.code().as_deref(), Some("42P04" | "23505")) =>
                {
                    Ok(())
                }
                Err(error) => Err(DbError::Create(error)),
            }
        }
        Err(error) => Err(DbError::Connect(error)),
    }
}

/// Now, in Unix milliseconds: how services store times in rows (an integer both
/// backends compare and index the same way).
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// Now, in Unix seconds.
pub fn unix_seconds() -> i64 {
    unix_millis() / 1000
}

/// The file of a SQLite URL; `None` for an in-memory database.
pub fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// Creates `dir` (and its parents) readable by its owner only: a service's data (and the
/// authorization server's keys) live there.
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
    fn value_rows_number_their_placeholders_on_from_the_first() {
        assert_eq!(value_rows(2, 2, 3), "($3, $4), ($5, $6)");
        assert_eq!(value_rows(1, 3, 1), "($1, $2, $3)");
        assert_eq!(value_rows(0, 5, 1), "");
    }

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
        let dir = std::env::temp_dir().join(format!("keel-sdk-db-{}", std::process::id()));
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
