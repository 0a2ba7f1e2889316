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
