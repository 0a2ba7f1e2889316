//! The catalog service over HTTP, on SQLite and PostgreSQL, with tokens from a test issuer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod grpc;

/// Starts a catalog on `database`, trusting `issuer`'s tokens, on `bus` (its own in-process
/// one when none); returns its base URL.
async fn start(
    database: &str,
    issuer: &keel_jwt::testing::TestIssuer,
    bus: Option<&keel_sdk::events::Bus>,
    shutdown: &keel_runtime::Shutdown,
) -> String {
    let config = keel_sdk::service::ServiceConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database: Some(keel_runtime::Secret::new(database.to_owned())),
        auth: Some(keel_sdk::service::ServiceAuthConfig {
            issuer: issuer.issuer().to_owned(),
            audiences: vec![keel_jwt::testing::AUDIENCE.to_owned()],
        }),
        ..keel_sdk::service::ServiceConfig::default()
    };
    let service = keel_catalog::build(&config, bus, shutdown).await.unwrap();
    let base = format!("http://{}", service.local_addr());
    tokio::spawn(service.run(shutdown.clone()));
    base
}
