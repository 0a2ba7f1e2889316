//! The data layer: databases created when missing, migrations under a lock, transactions
//! whose after-commit work runs only when they commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_sdk::data::{Backend, Database};
use keel_sdk::sqlx;
use keel_testkit::{POSTGRES_ADMIN_URL, Service, TestDatabase, TestSqlite, require, unique_name};

use crate::helpers::{MIGRATIONS, TestDb, backends};

#[tokio::test]
async fn a_missing_sqlite_file_and_its_directory_are_created_and_migrated() {
    let file = TestSqlite::new("keel-sdk-new");
    let nested = file.path.with_extension("d").join("service.db");
    let url = format!("sqlite://{}", nested.display());
    let db = Database::connect(&url, &MIGRATIONS).await.unwrap();
    assert_eq!(db.backend(), Backend::Sqlite);
    assert!(nested.is_file());
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN \
         ('effects', 'keel_outbox', 'keel_inbox') ORDER BY name",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(tables, ["effects", "keel_inbox", "keel_outbox"]);
    db.pool().close().await;
    std::fs::remove_dir_all(nested.parent().unwrap()).unwrap();
}

#[tokio::test]
async fn a_missing_postgres_database_is_created() {
    if !require(Service::Postgres) {
        return;
    }
    let name = unique_name("keel_sdk_new").replace('-', "_");
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let db = Database::connect(&url, &MIGRATIONS).await.unwrap();
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_outbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(outbox, 0);
    db.pool().close().await;
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(POSTGRES_ADMIN_URL)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

#[tokio::test]
async fn instances_starting_together_migrate_once() {
    for backend in backends() {
        // The same fresh database, connected by four instances at once.
        let (_postgres, _sqlite, url) = match backend {
            Backend::Postgres => {
                let database = TestDatabase::create().await;
                let url = database.url.clone();
                (Some(database), None, url)
            }
            Backend::Sqlite => {
                let file = TestSqlite::new("keel-sdk-race");
                let url = file.url();
                (None, Some(file), url)
            }
        };
        let connects = (0..4).map(|_| Database::connect(&url, &MIGRATIONS));
        let databases = futures_util::future::join_all(connects).await;
        for database in &databases {
            assert!(
                database.is_ok(),
                "{backend:?}: {:?}",
                database.as_ref().err()
            );
        }
        let db = databases.into_iter().next().unwrap().unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(applied, 1, "{backend:?}: the service's one migration, once");
        let (sdk, distinct): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(DISTINCT version) FROM _keel_sdk_migrations")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert!(
            sdk > 0 && sdk == distinct,
            "{backend:?}: the SDK's migrations, once each"
        );
    }
}

#[tokio::test]
async fn after_commit_work_runs_on_commit_only() {
    for backend in backends() {
        let test = TestDb::of(backend).await;
        let ran = Arc::new(AtomicUsize::new(0));
        for (account, commit) in [("rolled-back", false), ("committed", true)] {
            let mut tx = test.db.begin().await.unwrap();
            sqlx::query("INSERT INTO accounts (account, balance) VALUES ($1, 1)")
                .bind(account)
                .execute(&mut *tx)
                .await
                .unwrap();
            let counter = ran.clone();
            tx.after_commit(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            });
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
            let expected = usize::from(commit);
            assert_eq!(
                ran.load(Ordering::SeqCst),
                expected,
                "{backend:?} {account}"
            );
        }
        let accounts: Vec<String> = sqlx::query_scalar("SELECT account FROM accounts")
            .fetch_all(test.db.pool())
            .await
            .unwrap();
        assert_eq!(accounts, ["committed"], "{backend:?}");
    }
}

#[tokio::test]
async fn a_bad_url_is_refused_without_echoing_it() {
    let error = Database::connect("mysql://root:hunter2@db/x", &MIGRATIONS)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("\"mysql\""), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}

#[tokio::test]
async fn a_lock_makes_read_then_write_transactions_take_turns() {
    use keel_sdk::data::LockKey;
    for backend in backends() {
        let test = TestDb::of(backend).await;
        // Each transaction reads the highest balance, then writes one more: without the
        // lock, two at once read the same value (PostgreSQL) or one fails to write
        // (SQLite: SQLITE_BUSY on upgrading a read transaction).
        let turns = (0..4).map(|turn| {
            let db = test.db.clone();
            async move {
                let mut tx = db.begin().await?;
                db.lock(&mut tx, LockKey(7)).await?;
                let highest: Option<i64> = sqlx::query_scalar("SELECT max(balance) FROM accounts")
                    .fetch_one(&mut *tx)
                    .await?;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                sqlx::query("INSERT INTO accounts (account, balance) VALUES ($1, $2)")
                    .bind(format!("turn-{turn}"))
                    .bind(highest.unwrap_or(0) + 1)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }
        });
        for result in futures_util::future::join_all(turns).await {
            result.unwrap_or_else(|error| panic!("{backend:?}: {error}"));
        }
        let balances: Vec<i64> =
            sqlx::query_scalar("SELECT balance FROM accounts ORDER BY balance")
                .fetch_all(test.db.pool())
                .await
                .unwrap();
        assert_eq!(balances, [1, 2, 3, 4], "{backend:?}");
    }
}

/// The server process behind the connection `tx` holds.
async fn backend_pid(tx: &mut keel_sdk::Tx) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **tx)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_committed_transactions_connection_serves_the_next_and_goes_back_to_the_pool_unused() {
    if !require(Service::Postgres) {
        return;
    }
    let test = TestDb::postgres().await;
    let mut first = test.db.begin().await.unwrap();
    let pid = backend_pid(&mut first).await;
    first.commit().await.unwrap();
    // Reads outside a transaction take it too, and hand it back warm.
    let mut reads = test.db.connection().await.unwrap();
    let read_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *reads)
        .await
        .unwrap();
    assert_eq!(read_pid, pid, "the warm connection, for reads");
    reads.release();
    let mut second = test.db.begin().await.unwrap();
    assert_eq!(
        backend_pid(&mut second).await,
        pid,
        "the warm connection again"
    );
    second.rollback().await.unwrap();
    // Rolled back cleanly: warm too, out of the pool. Unused, it goes back to the pool
    // within half a second.
    let pool = test.db.pool();
    assert!(pool.num_idle() < pool.size() as usize, "held warm");
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        pool.num_idle(),
        pool.size() as usize,
        "handed back to the pool"
    );
}

#[tokio::test]
async fn a_transaction_dropped_unfinished_or_failed_leaves_nothing_behind() {
    for backend in backends() {
        let test = TestDb::of(backend).await;
        let insert = |account: &'static str| {
            sqlx::query("INSERT INTO accounts (account, balance) VALUES ($1, 1)").bind(account)
        };
        // Dropped with a write in it.
        let mut dropped = test.db.begin().await.unwrap();
        insert("dropped").execute(&mut *dropped).await.unwrap();
        drop(dropped);
        // A statement failed (the transaction is aborted on PostgreSQL), then dropped.
        let mut failed = test.db.begin().await.unwrap();
        insert("failed").execute(&mut *failed).await.unwrap();
        let error = sqlx::query("INSERT INTO no_such_table VALUES (1)")
            .execute(&mut *failed)
            .await;
        assert!(error.is_err(), "{backend:?}");
        drop(failed);
        // The connections handed out next (those two, back through the pool) work, none
        // inside an old transaction.
        for account in ["a", "b", "c"] {
            let mut tx = test.db.begin().await.unwrap();
            insert(account).execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        }
        let accounts: Vec<String> =
            sqlx::query_scalar("SELECT account FROM accounts ORDER BY account")
                .fetch_all(test.db.pool())
                .await
                .unwrap();
        assert_eq!(accounts, ["a", "b", "c"], "{backend:?}");
    }
}
