//! Integration tests of the authorization server: a real server on port 0, on SQLite and
//! on PostgreSQL, driven over HTTP; tokens checked with the shared verifier (keel-jwt).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod admin_api;
mod authorization_code;
mod browser;
mod client_credentials;
mod device;
mod discovery;
mod gateway;
mod independent;
mod introspect;
mod keys;
mod login;
mod logout;
mod private_key_jwt;
mod rbac;
mod second_factor;
