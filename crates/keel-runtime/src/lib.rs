//! Process plumbing shared by every Keel server.
//!
//! A Keel server is built from a typed configuration ([`config`]), reports through
//! [`telemetry`] (logs and traces) and [`metrics`], serves HTTP through [`http::HttpServer`]
//! (request ids, trace context, metrics, `/health/*`, `/metrics`), answers errors with
//! [`problem::Problem`], and stops on a [`shutdown::Shutdown`]. Whatever it calls over HTTP,
//! it calls with a client from [`http_client`] (HTTPS with the system's and the configured
//! roots).

pub mod config;
pub mod extract;
pub mod forwarded;
pub mod health;
pub mod http;
pub mod http_client;
pub mod metrics;
pub mod problem;
pub mod resilience;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
pub mod watch;

pub use config::{ConfigError, Secret};
pub use forwarded::TrustedProxies;
pub use health::Health;
pub use http::{HttpServer, HttpServerConfig};
pub use problem::Problem;
pub use server::Server;
pub use shutdown::Shutdown;
