//! Keel's API gateway (Envoy / NGINX / Spring Cloud Gateway class).
//!
//! A request goes through [`listener`] (TLS, client limits) → [`server::Gateway`] (request
//! id, span, metrics, access log, the current configuration generation) → [`proxy`]
//! (route match, [`auth`], [`cors`], [`ratelimit`], the action) → forwarding with
//! [`balance`], [`breaker`], [`retry`] and outlier detection ([`endpoint`]).
//! ARCHITECTURE.md describes the phases.

pub mod access_log;
mod admin;
pub mod auth;
pub mod config;
pub mod cors;
mod forward;
mod h1;
mod h1_server;
pub mod listener;
mod path;
pub mod proxy;
pub mod ratelimit;
pub mod route;
mod send_timeout;
pub mod server;
mod stall;
mod timer;
pub mod tls;
mod upstream;

// Balancing, circuit breaking, retries and endpoint statistics are shared with the SDK's
// clients; they live in keel-runtime and keep their paths here.
pub use keel_runtime::resilience::{balance, breaker, endpoint, retry};

pub use config::GatewayConfig;
pub use server::GatewayServer;
