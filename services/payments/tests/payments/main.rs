//! The payments service: its HTTP API with idempotency keys, and its commands answered
//! over the bus to a saga, on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod commands;

use std::time::Duration;

use keel_payments::provider::ProviderConfig;

/// SQLite always, PostgreSQL when it answers.
pub async fn databases() -> Vec<keel_testkit::EachDatabase> {
    keel_testkit::each_database("keel-payments").await
}

/// A quick provider that never fails or declines on its own: the test tokens decide.
pub fn provider() -> ProviderConfig {
    ProviderConfig {
        latency: Duration::from_millis(1),
        ..ProviderConfig::default()
    }
}

/// A claim on `id` for 3.00 EUR on `tok_visa` made at `since`, as an HTTP request commits
/// it before it asks the provider (and leaves it when it dies before its answer).
pub async fn leave_claim(db: &keel_sdk::Database, id: &str, since: i64) {
    keel_sdk::sqlx::query(
        "INSERT INTO payments (id, status, amount_minor, currency, method, created_at, updated_at) \
         VALUES ($1, 'pending', 300, 'EUR', 'tok_visa', $2, $2)",
    )
    .bind(id)
    .bind(since)
    .execute(db.pool())
    .await
    .unwrap();
}

/// The payments use cases on the database at `url`, with an in-process bus.
pub async fn payments_on(url: &str) -> (keel_sdk::Database, keel_payments::Payments) {
    let db = keel_sdk::Database::connect(url, &keel_payments::MIGRATIONS)
        .await
        .unwrap();
    let payments = keel_payments::Payments::new(
        db.clone(),
        keel_sdk::events::Bus::in_process("payments"),
        keel_payments::provider::Provider::new(provider()),
    );
    (db, payments)
}
