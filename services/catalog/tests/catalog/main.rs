//! The catalog service over HTTP, on SQLite and PostgreSQL, with tokens from a test issuer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod grpc;
