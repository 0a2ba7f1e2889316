//! Keel's API gateway (Envoy / NGINX / Spring Cloud Gateway class).
//!
//! Built so far: [`route`], the route table that picks the route of a request, and a first
//! [`proxy`] to static upstreams (round robin, path prefix stripping, 502/504 problems).
//! Registry-driven load balancing, resilience and security arrive with the rest of the
//! gateway issue.

mod admin;
pub mod auth;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod cors;
pub mod endpoint;
mod forward;
pub mod proxy;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod server;

pub use config::GatewayConfig;
pub use server::GatewayServer;
