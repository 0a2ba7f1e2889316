//! The registry server: configuration, startup contract and background sweeper.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use keel_runtime::http::BindError;
use keel_runtime::{Health, HttpServer, HttpServerConfig, Secret, Server, Shutdown};
use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

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
    /// In etcd (`[registry.etcd]`): replicas share it and survive each other's death.
    /// Needs a binary built with the `etcd` feature.
    Etcd,
}

/// `[registry.etcd]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of this registry's data; several registries can share one etcd.
    pub prefix: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TTL of a replica's membership lease: how long a dead replica's active checks wait
    /// before another replica takes them over.
    #[serde(with = "humantime_serde")]
    pub replica_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "/keel/registry".to_owned(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            replica_ttl: Duration::from_secs(3),
        }
    }
}

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("registry backend: {0}")]
    Backend(String),
}

/// `[registry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub listen: SocketAddr,
    pub backend: Backend,
    pub etcd: EtcdConfig,
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
            etcd: EtcdConfig::default(),
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
    #[cfg(feature = "etcd")]
    store: Option<std::sync::Arc<crate::etcd::EtcdStore>>,
}

impl RegistryServer {
    /// Builds the registry and binds its listener; `shutdown` also ends open watches.
    pub async fn build(config: RegistryConfig, shutdown: &Shutdown) -> Result<Self, StartError> {
        #[cfg(feature = "etcd")]
        let mut store = None;
        let registry = match config.backend {
            Backend::Memory => Registry::new(config.limits.clone()),
            #[cfg(feature = "etcd")]
            Backend::Etcd => {
                let connected = crate::etcd::EtcdStore::connect(&config.etcd)
                    .await
                    .map_err(StartError::Backend)?;
                store = Some(std::sync::Arc::clone(&connected));
                Registry::with_etcd(config.limits.clone(), connected)
            }
            #[cfg(not(feature = "etcd"))]
            Backend::Etcd => {
                return Err(StartError::Backend(
                    "this binary was built without the `etcd` feature (cargo build --features etcd)"
                        .to_owned(),
                ));
            }
        };
        let state = ApiState {
            registry: registry.clone(),
            acl_token: config.acl_token.clone(),
            shutdown: shutdown.clone(),
        };
        let router = api::router(state).layer(DefaultBodyLimit::max(config.max_body_bytes));
        let health = Health::new();
        #[cfg(feature = "etcd")]
        if let Some(store) = &store {
            let store = std::sync::Arc::clone(store);
            health.add_check("etcd", move || {
                let result = store.check();
                async move { result }
            });
        }
        let http = HttpServer::bind("registry", config.listen, router, health, config.http).await?;
        Ok(Self {
            http,
            registry,
            sweep_interval: config.sweep_interval,
            #[cfg(feature = "etcd")]
            store,
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

    fn url(&self) -> String {
        self.http.url()
    }

    /// Serves and sweeps until `shutdown` fires.
    async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        let registry = self.registry.clone();
        let sweeper_stop = shutdown.clone();
        let interval = self.sweep_interval;
        // Background tasks end with the run future, even when it is dropped (a crashed or
        // killed server must not leave its sweeper or etcd membership behind).
        let _sweeper = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => registry.sweep().await,
                    () = sweeper_stop.wait() => return,
                }
            }
        }));
        #[cfg(feature = "etcd")]
        let sync = match self.store {
            Some(store) => {
                let task = AbortOnDropHandle::new(tokio::spawn(
                    std::sync::Arc::clone(&store).run(self.registry.downgrade(), shutdown.clone()),
                ));
                // Connections wait in the listen backlog until the first load is in.
                if !store.wait_synced(Duration::from_secs(10)).await {
                    tracing::warn!(
                        "no initial load from etcd within 10s; serving while it retries"
                    );
                }
                Some(task)
            }
            None => None,
        };
        let result = self.http.run(shutdown).await;
        // Let the etcd task withdraw this replica's membership before returning.
        #[cfg(feature = "etcd")]
        if let Some(mut sync) = sync {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut sync).await;
        }
        result
    }
}
