//! Integration tests of the registry: a real server on port 0, driven over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod client;
mod consul;
#[cfg(feature = "etcd")]
mod etcd;
mod eureka;
mod hostile;
mod native;
mod watch;
