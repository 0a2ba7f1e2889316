//! `[gateway]` configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use keel_runtime::HttpServerConfig;
use serde::{Deserialize, Serialize};

use crate::route::{MatchConfig, RouteConfig};

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// The registry that routes with a `service` find their instances in.
    pub registry: String,
    pub routes: Vec<GatewayRouteConfig>,
    pub http: HttpServerConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            registry: "http://127.0.0.1:8500".to_owned(),
            routes: Vec::new(),
            http: HttpServerConfig::default(),
        }
    }
}

/// `[[gateway.routes]]`: what to match and where to send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRouteConfig {
    pub name: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
    /// A service in the registry: its passing instances, live, used in turn.
    #[serde(default)]
    pub service: Option<String>,
    /// Or static upstream base URLs (`http://127.0.0.1:9000`), used in turn.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Removed from the start of the path before forwarding (`/api`: `/api/x` → `/x`).
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Header changes on the way to the upstream.
    #[serde(default)]
    pub request_headers: HeaderActionsConfig,
    /// Header changes on the way back to the client.
    #[serde(default)]
    pub response_headers: HeaderActionsConfig,
    /// Longest wait for the upstream's response head; 504 after it.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
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

impl GatewayRouteConfig {
    pub fn route(&self) -> RouteConfig {
        RouteConfig {
            name: self.name.clone(),
            priority: self.priority,
            matches: self.matches.clone(),
        }
    }
}
