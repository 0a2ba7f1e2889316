//! The registry server: configuration, startup contract and background sweeper.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use keel_runtime::http::BindError;
use keel_runtime::{Health, HttpServer, HttpServerConfig, Secret, Server, Shutdown};
use serde::{Deserialize, Serialize};

use crate::api::{self, ApiState};
use crate::registry::{Registry, RegistryLimits};

/// Where the registry keeps its state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process's memory (the embedded profile); lost on restart, and clients
    /// re-register.
    #[default]
    Memory,
}

/// `[registry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub listen: SocketAddr,
    pub backend: Backend,
    /// When set, writes must present this token (`X-Keel-Token`, `X-Consul-Token` or
    /// `Authorization: Bearer`).
    pub acl_token: Option<Secret<String>>,
    /// How often TTLs and deregister-after deadlines are checked.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    pub limits: RegistryLimits,
    pub http: HttpServerConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8500)),
            backend: Backend::Memory,
            acl_token: None,
            sweep_interval: Duration::from_millis(100),
            max_body_bytes: 64 * 1024,
            limits: RegistryLimits::default(),
            http: HttpServerConfig::default(),
        }
    }
}

/// A bound registry server.
pub struct RegistryServer {
    http: HttpServer,
    registry: Registry,
    sweep_interval: Duration,
}

impl RegistryServer {
    /// Builds the registry and binds its listener; `shutdown` also ends open watches.
    pub async fn build(config: RegistryConfig, shutdown: &Shutdown) -> Result<Self, BindError> {
        let registry = Registry::new(config.limits.clone());
        let state = ApiState {
            registry: registry.clone(),
            acl_token: config.acl_token.clone(),
            shutdown: shutdown.clone(),
        };
        let router = api::router(state).layer(DefaultBodyLimit::max(config.max_body_bytes));
        let http = HttpServer::bind(
            "registry",
            config.listen,
            router,
            Health::new(),
            config.http,
        )
        .await?;
        Ok(Self {
            http,
            registry,
            sweep_interval: config.sweep_interval,
        })
    }

    /// The registry itself, for embedding (tests, `keel up`).
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }
}

impl Server for RegistryServer {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn local_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// Serves and sweeps until `shutdown` fires.
    async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        let registry = self.registry.clone();
        let sweeper_stop = shutdown.clone();
        let interval = self.sweep_interval;
        let sweeper = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => registry.sweep(),
                    () = sweeper_stop.wait() => return,
                }
            }
        });
        let result = self.http.run(shutdown).await;
        sweeper.abort();
        result
    }
}
