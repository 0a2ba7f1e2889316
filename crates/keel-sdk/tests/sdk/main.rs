//! Integration tests of the service SDK against real PostgreSQL, SQLite and RabbitMQ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod auth;
mod cache;
mod client;
mod consumer;
mod data;
mod events;
mod grpc;
mod guide;
mod outbox;
mod saga;
mod service;
