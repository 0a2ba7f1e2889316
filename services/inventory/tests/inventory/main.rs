//! The inventory service: its use cases on SQLite and PostgreSQL, its commands answered
//! over the bus to a saga, and its HTTP API with tokens from a test issuer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod commands;
mod reservations;

use keel_testkit::{Service, TestDatabase, TestSqlite, require};

/// A database to run on, kept alive (dropped: deleted) for as long as the test holds it.
pub struct TestDb {
    pub url: String,
    _postgres: Option<TestDatabase>,
    _sqlite: Option<TestSqlite>,
}

/// SQLite always, PostgreSQL when it answers.
pub async fn databases() -> Vec<TestDb> {
    let file = TestSqlite::new("keel-inventory");
    let mut databases = vec![TestDb {
        url: file.url(),
        _postgres: None,
        _sqlite: Some(file),
    }];
    if require(Service::Postgres) {
        let database = TestDatabase::create().await;
        databases.push(TestDb {
            url: database.url.clone(),
            _postgres: Some(database),
            _sqlite: None,
        });
    }
    databases
}
