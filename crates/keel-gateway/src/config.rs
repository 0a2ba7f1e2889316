//! `[gateway]` configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use keel_runtime::{HttpServerConfig, Secret, TrustedProxies};
use serde::{Deserialize, Serialize};

use keel_jwt::VerifierConfig;

use crate::access_log::AccessLogConfig;
use crate::auth::RouteAuthConfig;
use crate::balance::BalanceConfig;
use crate::breaker::BreakerConfig;
use crate::cors::CorsConfig;
use crate::endpoint::OutlierConfig;
use crate::listener::ClientLimitsConfig;
use crate::ratelimit::{RateLimitBackendConfig, RateLimitConfig};
use crate::retry::RetryConfig;
use crate::route::{MatchConfig, RouteConfig};
use crate::tls::TlsConfig;

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub listen: SocketAddr,
    /// The admin API: routes, upstreams, reload and the gateway's own metrics.
    pub admin_listen: SocketAddr,
    /// Bearer token the admin API requires; without one only its health and metrics
    /// endpoints answer.
    pub admin_token: Option<Secret<String>>,
    /// The registry that routes with a `service` find their instances in.
    pub registry: String,
    /// How often the configuration file is checked for changes; 0 turns watching off.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    pub upstream: UpstreamClientConfig,
    /// Requests no route matches go to the registry service named by their first path
    /// segment, with that segment stripped (`/orders/42` → service `orders`, `/42`), as
    /// Spring Cloud Gateway's discovery locator. A service that a configured route reaches
    /// (`service = …`) gets no discovered route: it is reached only as configured, with
    /// that route's policy. Unset: on under `keel up`, off otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_routes: Option<bool>,
    /// How access tokens are verified (the authorization server's issuer and this
    /// gateway's audiences); required by routes with `auth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<VerifierConfig>,
    /// The Redis that shared rate limits count in.
    pub rate_limit: RateLimitBackendConfig,
    /// HTTPS termination; the plain `listen` keeps serving (or redirects) beside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// What one client may take: connections, header sizes, slow clients, request rate.
    pub limits: ClientLimitsConfig,
    /// Reverse proxies (load balancers) in front of the gateway, as addresses or networks
    /// (`["10.0.0.0/8"]`): from them, the client's address — for rate limits keyed by
    /// `client_ip` and hashing by `client_ip` — is the one their `X-Forwarded-For` names,
    /// read from the right past trusted hops (NGINX's `set_real_ip_from` with
    /// `real_ip_recursive`). Empty: the connection's peer is the client.
    pub trusted_proxies: TrustedProxies,
    pub access_log: AccessLogConfig,
    pub routes: Vec<GatewayRouteConfig>,
    pub http: HttpServerConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_token: None,
            registry: "http://127.0.0.1:8500".to_owned(),
            watch_interval: Duration::from_secs(2),
            upstream: UpstreamClientConfig::default(),
            discovery_routes: None,
            auth: None,
            rate_limit: RateLimitBackendConfig::default(),
            tls: None,
            limits: ClientLimitsConfig::default(),
            trusted_proxies: TrustedProxies::default(),
            access_log: AccessLogConfig::default(),
            routes: Vec::new(),
            http: HttpServerConfig::default(),
        }
    }
}

/// `[gateway.upstream]`: the connection pool every route shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamClientConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long an unused pooled connection is kept: below the upstreams' own idle
    /// timeout (Keel's services: 75 s), so that the gateway, not the upstream, closes it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

impl Default for UpstreamClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            // NGINX's upstream keepalive_timeout.
            idle_timeout: Duration::from_secs(60),
            max_idle_per_host: 256,
        }
    }
}

/// `[[gateway.routes]]`: what to match and what to do with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRouteConfig {
    pub name: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
    /// A service in the registry: its passing instances, live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Or static upstreams: base URLs (`http://127.0.0.1:9000`) or `{ url, weight }`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Or no upstream at all: answer with a redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectConfig>,
    /// `"http1"`, or `"http2"` (gRPC services): see [`UpstreamProtocol`].
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// Removed from the start of the path before forwarding (`/api`: `/api/x` → `/x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<String>,
    /// Or the whole path replaced, with `{param}`s of the `path_template` filled in:
    /// `/v2/items/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// Header changes on the way to the upstream.
    #[serde(default)]
    pub request_headers: HeaderActionsConfig,
    /// Header changes on the way back to the client.
    #[serde(default)]
    pub response_headers: HeaderActionsConfig,
    /// Longest wait for the upstream's response head, retries included; 504 after it.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest request body; 413 beyond it.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default)]
    pub balance: BalanceConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Passive outlier detection of the instances; shared by routes to one service.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// The upstream service's circuit breaker; shared by routes to one service.
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    /// Who may call the route.
    #[serde(default)]
    pub auth: RouteAuthConfig,
    /// Browser cross-origin access; preflights are answered at the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

impl Default for GatewayRouteConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            priority: 0,
            matches: MatchConfig::default(),
            service: None,
            upstreams: Vec::new(),
            redirect: None,
            upstream_protocol: UpstreamProtocol::default(),
            strip_prefix: None,
            rewrite: None,
            request_headers: HeaderActionsConfig::default(),
            response_headers: HeaderActionsConfig::default(),
            timeout: default_timeout(),
            max_body_bytes: default_max_body_bytes(),
            balance: BalanceConfig::default(),
            retry: RetryConfig::default(),
            outlier: OutlierConfig::default(),
            circuit_breaker: BreakerConfig::default(),
            auth: RouteAuthConfig::default(),
            cors: None,
            rate_limit: None,
        }
    }
}

/// A static upstream: a base URL, optionally weighted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UpstreamConfig {
    Url(String),
    Weighted { url: String, weight: u32 },
}

impl UpstreamConfig {
    pub fn url(&self) -> &str {
        match self {
            Self::Url(url) | Self::Weighted { url, .. } => url,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Self::Url(_) => 1,
            Self::Weighted { weight, .. } => *weight,
        }
    }
}

impl From<&str> for UpstreamConfig {
    fn from(url: &str) -> Self {
        Self::Url(url.to_owned())
    }
}

/// What the gateway speaks to a route's upstreams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, plain or over TLS.
    #[default]
    Http1,
    /// HTTP/2 (what gRPC services speak): with prior knowledge to `http://` upstreams
    /// (h2c), agreed by ALPN over TLS to `https://` ones. `"h2c"`, its name before HTTP/2
    /// over TLS was spoken, still reads as it.
    #[serde(alias = "h2c")]
    Http2,
}

/// `redirect = { location = "https://example.com/{rest}", status = 308 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Where to: a path or an absolute URL, with `{param}`s of the `path_template`.
    pub location: String,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Append the request's query string to the location.
    #[serde(default = "default_true")]
    pub keep_query: bool,
}

/// Header changes, applied in this order: remove, set (replace), add (append).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderActionsConfig {
    pub remove: Vec<String>,
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}

fn default_redirect_status() -> u16 {
    302
}

fn default_true() -> bool {
    true
}

impl GatewayRouteConfig {
    pub fn route(&self) -> RouteConfig {
        RouteConfig {
            name: self.name.clone(),
            priority: self.priority,
            matches: self.matches.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_upstreams_are_named_http2_or_as_before_h2c() {
        #[derive(Deserialize)]
        struct Route {
            upstream_protocol: UpstreamProtocol,
        }
        for name in ["http2", "h2c"] {
            let route: Route =
                keel_runtime::config::from_toml(&format!("upstream_protocol = {name:?}"))
                    .expect("parses");
            assert_eq!(route.upstream_protocol, UpstreamProtocol::Http2, "{name}");
        }
        let unknown = keel_runtime::config::from_toml::<Route>("upstream_protocol = \"h3\"").err();
        assert!(unknown.is_some());
        assert_eq!(
            serde_json::to_value(UpstreamProtocol::Http2).expect("serializes"),
            "http2"
        );
    }
}
