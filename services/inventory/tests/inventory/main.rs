//! The inventory service: its use cases on SQLite and PostgreSQL, its commands answered
//! over the bus to a saga, and its HTTP API with tokens from a test issuer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod commands;
mod reservations;

/// SQLite always, PostgreSQL when it answers.
pub async fn databases() -> Vec<keel_testkit::EachDatabase> {
    keel_testkit::each_database("keel-inventory").await
}
