//! Keel's service framework: what a domain service is written with.
//!
//! - [`service`]: the bootstrap (connections, the HTTP stack, registration, workers);
//! - [`data`]: the service's database (PostgreSQL or SQLite, one code path), migrations
//!   run at start under a lock, transactions that carry the outbox;
//! - [`auth`]: the verified caller as an extractor, scope and role requirements, and the
//!   service's own client-credentials token for outgoing calls;
//! - [`cache`]: cache-aside in two levels (in process, then Redis) with single-flight
//!   loads, negative caching and invalidation broadcast to every instance;
//! - [`client`]: resilient HTTP calls to another service by name (registry, balancing,
//!   deadlines, retries with a budget, outlier ejection, circuit breaker, bulkhead);
//! - [`events`]: events and commands in CloudEvents envelopes over RabbitMQ or an
//!   in-process bus, with a transactional outbox, an idempotent inbox, retries and dead
//!   letters;
//! - [`saga`]: orchestrated sagas whose state and commands commit together, with
//!   compensation in reverse order, step timeouts and resumption after a crash.

pub mod auth;
pub mod cache;
pub mod client;
pub mod data;
pub mod events;
pub mod saga;
pub mod service;

pub use data::{Database, Migrations, Tx};
pub use events::{Bus, Event, Handler, HandlerError, Received};
pub use service::{Service, ServiceConfig};
/// The SQL toolkit services write their queries with, at the SDK's version.
pub use sqlx;
