//! Keel's service registry (Consul / Eureka class).
//!
//! - [`model`]: the wire types (registrations, instances, checks) and their validation;
//! - [`catalog`]: the pure state machine (indexes, TTLs, evictions);
//! - [`registry`]: the catalog behind a lock with per-service watchers and active probes;
//! - [`api`]: the native HTTP API and the Consul- and Eureka-compatible subsets (Spring
//!   Cloud Netflix's Eureka clients register and discover unmodified);
//! - [`server`]: configuration and the startup contract;
//! - [`client`]: registration, heartbeats and a live view of watched services.

pub mod api;
pub mod catalog;
mod checks;
pub mod client;
#[cfg(feature = "etcd")]
mod etcd;
pub mod model;
pub mod registry;
pub mod server;

pub use registry::Registry;
pub use server::{RegistryConfig, RegistryServer};
