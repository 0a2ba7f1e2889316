//! Test helpers shared by every crate's integration tests.
//!
//! - [`spawn`]: start any [`Server`] (bound to port 0) and get its URL;
//! - [`require`]: the SKIP / require logic for backing services;
//! - [`TestDatabase`]: a fresh PostgreSQL database per test, migrated, dropped afterwards;
//! - [`each_database`]: SQLite, and PostgreSQL when it answers, for tests of both backends;
//! - [`unique_name`]: per-test Redis key prefixes, RabbitMQ names and etcd key prefixes;
//! - [`FaultProxy`]: a TCP proxy to cut, between code under test and a shared service;
//! - [`ChildTest`]: the test re-run as a child process, to crash it at a chosen moment;
//! - [`http`]: an HTTP client made as Keel's are ([`get_text`], [`get_status`]: a GET's
//!   body or status); [`send`]: a request's status, content type and JSON body in one call;
//! - [`tls`]: a private CA and a TLS front, to reach any test server over HTTPS.

#![allow(clippy::expect_used)] // test support: a broken fixture should stop the test loudly

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use keel_runtime::{Server, Shutdown};

mod child;
mod fault;
mod kafka;
pub mod tls;
pub use child::{CHILD_ROLE, ChildTest, TEST_LOG, child_role, test_log};
pub use fault::FaultProxy;
pub use kafka::{KAFKA_FETCH_WAIT, ProxiedKafka};
use sqlx::Connection;
use tokio::task::JoinHandle;

// === servers ===

/// A server running in the test's runtime; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    shutdown: Shutdown,
    handle: Option<JoinHandle<io::Result<()>>>,
}

/// Runs `server` until the returned handle is stopped or dropped.
pub fn spawn<S: Server>(server: S) -> TestServer {
    let addr = server.local_addr();
    let url = server.url();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    TestServer {
        addr,
        url,
        shutdown,
        handle: Some(handle),
    }
}

impl TestServer {
    /// The shutdown signal the server runs under.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Graceful stop: signal, then wait for the drain to finish.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Abrupt stop, as a crash: the task is aborted without draining.
    pub async fn kill(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
        self.shutdown.trigger();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

// === backing services ===

/// A backing service a test may need, with where it listens on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    RabbitMq,
    Etcd,
    /// A Kafka-protocol broker (tansu, started by `scripts/test`).
    Kafka,
}

impl Service {
    pub fn addr(self) -> SocketAddr {
        let port = match self {
            Service::Postgres => 5432,
            Service::Redis => 6379,
            Service::RabbitMq => 5672,
            Service::Etcd => 2379,
            Service::Kafka => 9092,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Postgres => "PostgreSQL",
            Service::Redis => "Redis",
            Service::RabbitMq => "RabbitMQ",
            Service::Etcd => "etcd",
            Service::Kafka => "Kafka",
        }
    }
}

/// The environment variable that turns a missing service from a SKIP into a failure.
pub const REQUIRE_SERVICES: &str = "KEEL_REQUIRE_SERVICES";

/// Whether `service` answers. When it does not: with `KEEL_REQUIRE_SERVICES=1` this panics
/// (the test fails); otherwise it prints a SKIP line and returns false, and the test returns.
///
/// ```ignore
/// if !keel_testkit::require(Service::Postgres) { return; }
/// ```
pub fn require(service: Service) -> bool {
    let addr = service.addr();
    if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: {} is not reachable at {addr} and {REQUIRE_SERVICES}=1 (run scripts/test, which starts it)",
        service.name()
    );
    eprintln!("SKIP {test}: {} is not reachable at {addr}", service.name());
    false
}

/// A name unique to this test run: `<prefix>-<12 hex digits>`, usable as a Redis key prefix,
/// a RabbitMQ exchange or queue name, an etcd key prefix or a database name.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

// === SQLite ===

/// A SQLite database file for one test, in the temporary directory; removed when dropped,
/// with its journal files and the key file the authorization server keeps beside it.
pub struct TestSqlite {
    pub path: std::path::PathBuf,
}

impl TestSqlite {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        Self {
            path: std::env::temp_dir().join(format!("{name}.db")),
        }
    }

    /// `sqlite://<path>`.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

impl Drop for TestSqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal", ".key"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

// === PostgreSQL ===

/// The server tests create their databases on (trust auth on loopback).
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database created for one test and dropped when this value is dropped.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database; call [`require`] first.
    pub async fn create() -> Self {
        let name = unique_name("keel_test").replace('-', "_");
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("connect to PostgreSQL as postgres");
        // The name is generated here from hex digits, never from input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self { name, url }
    }

    /// Creates a fresh database and runs `migrator` on it.
    pub async fn migrated(migrator: &sqlx::migrate::Migrator) -> Self {
        let database = Self::create().await;
        let mut connection = sqlx::PgConnection::connect(&database.url)
            .await
            .expect("connect to the test database");
        migrator
            .run(&mut connection)
            .await
            .expect("migrate the test database");
        let _ = connection.close().await;
        database
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside async; a short-lived runtime on its own thread does the cleanup
        // so it works from any runtime flavour.
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

// === both backends ===

/// A database for a test that runs on each backend; kept (dropped: deleted) for as long
/// as the test holds it.
pub struct EachDatabase {
    pub url: String,
    _postgres: Option<TestDatabase>,
    _sqlite: Option<TestSqlite>,
}

/// A fresh SQLite database always, and a fresh PostgreSQL database when PostgreSQL
/// answers: what a service's tests run on, one after the other.
pub async fn each_database(prefix: &str) -> Vec<EachDatabase> {
    let file = TestSqlite::new(prefix);
    let mut databases = vec![EachDatabase {
        url: file.url(),
        _postgres: None,
        _sqlite: Some(file),
    }];
    if require(Service::Postgres) {
        let database = TestDatabase::create().await;
        databases.push(EachDatabase {
            url: database.url.clone(),
            _postgres: Some(database),
            _sqlite: None,
        });
    }
    databases
}

// === HTTP ===

/// An HTTP client with reqwest's defaults, built as every Keel client is
/// (`keel_runtime::http_client`: the TLS crypto provider, the trusted roots).
pub fn http() -> reqwest::Client {
    keel_runtime::http_client::builder()
        .build()
        .expect("a client with default settings builds")
}

/// The body of a plain GET of `url`, as text.
pub async fn get_text(url: impl reqwest::IntoUrl) -> String {
    let response = http().get(url).send().await.expect("the request is sent");
    response.text().await.expect("a text body")
}

/// The status of a plain GET of `url`.
pub async fn get_status(url: impl reqwest::IntoUrl) -> reqwest::StatusCode {
    http()
        .get(url)
        .send()
        .await
        .expect("the request is sent")
        .status()
}

/// Sends `request` (with `token` as its bearer token, if any) and returns the response's
/// status, content type and JSON body (`Null` when it has none).
pub async fn send(
    request: reqwest::RequestBuilder,
    token: Option<&str>,
) -> (u16, String, serde_json::Value) {
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request.send().await.expect("the request is sent");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, content_type, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_keep_their_prefix() {
        let a = unique_name("orders");
        let b = unique_name("orders");
        assert_ne!(a, b);
        assert!(a.starts_with("orders-"));
        assert_eq!(a.len(), "orders-".len() + 12);
    }

    #[tokio::test]
    async fn a_migrated_database_has_the_migrations_applied() {
        if !require(Service::Postgres) {
            return;
        }
        let dir = std::env::temp_dir().join(unique_name("keel-migrations"));
        std::fs::create_dir_all(&dir).expect("migrations dir");
        std::fs::write(
            dir.join("0001_orders.sql"),
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, total BIGINT NOT NULL);",
        )
        .expect("write migration");
        let migrator = sqlx::migrate::Migrator::new(dir.as_path())
            .await
            .expect("read migrations");
        let database = TestDatabase::migrated(&migrator).await;
        let mut connection = sqlx::PgConnection::connect(&database.url)
            .await
            .expect("connect");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&mut connection)
            .await
            .expect("the migrated table exists");
        assert_eq!(rows, 0);
        connection.close().await.expect("close");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn a_test_database_is_created_usable_and_dropped() {
        if !require(Service::Postgres) {
            return;
        }
        let database = TestDatabase::create().await;
        let name = database.name.clone();
        let mut connection = sqlx::PgConnection::connect(&database.url)
            .await
            .expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut connection)
            .await
            .expect("query");
        assert_eq!(one, 1);
        connection.close().await.expect("close");
        drop(database);
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("admin");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .expect("count");
        assert_eq!(left, 0, "the database is dropped");
    }
}
