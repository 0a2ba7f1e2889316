//! Keel's API gateway (Envoy / NGINX / Spring Cloud Gateway class).
//!
//! Built so far: [`route`], the route table that picks the route of a request. The proxy,
//! load balancing, resilience and security layers arrive with the rest of the gateway issue.

pub mod route;
