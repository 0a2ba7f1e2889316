//! The gateway server: the proxy listener, the admin listener, and configuration
//! generations swapped atomically on reload.
//!
//! Each request takes the generation current when it arrives and keeps it to the end, so
//! a reload never disturbs a request in flight, and connections stay open across it (they
//! are not tied to a generation). A configuration that fails validation is rejected whole
//! and the running one keeps serving.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::routing::any;
use keel_runtime::http::BindError;
use keel_runtime::{Health, HttpServer, Server, Shutdown};
use serde::Serialize;

use keel_registry::client::{DiscoveryView, RegistryClient};

use crate::admin;
use crate::config::{GatewayConfig, GatewayRouteConfig};
use crate::proxy::{Proxy, Shared};
use crate::route::RouteError;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("gateway configuration: {0}")]
    Config(#[from] RouteError),
    #[error("gateway.registry: {0}")]
    Registry(#[from] keel_registry::client::ClientError),
    #[error("{0}")]
    Settings(String),
}

/// Where a reload reads the configuration from: the file (to watch for changes) and how
/// to load it with its other layers (environment overrides).
pub struct ConfigSource {
    pub path: PathBuf,
    pub load: Box<dyn Fn() -> Result<GatewayConfig, String> + Send + Sync>,
}

/// Routes come from the configuration file and from the admin API; the running
/// generation serves both.
struct RouteSets {
    file: Vec<GatewayRouteConfig>,
    api: Vec<GatewayRouteConfig>,
}

/// The live gateway: its current generation and how to make the next one.
pub struct Gateway {
    current: ArcSwap<Proxy>,
    shared: Arc<Shared>,
    /// Serialises changes, so two reloads never interleave.
    routes: tokio::sync::Mutex<RouteSets>,
    running: GatewayConfig,
    source: Option<ConfigSource>,
}

/// What a reload changed.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub routes: usize,
    /// Settings that changed in the file but need a restart to apply.
    pub needs_restart: Vec<&'static str>,
}

/// Why a change was refused; the running configuration is untouched.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error("there is no configuration file to reload")]
    NoSource,
    #[error("route {0:?} comes from the configuration file; change it there")]
    FromFile(String),
    #[error("no route {0:?} was added through the admin API")]
    NotFound(String),
}

impl Gateway {
    /// The generation serving new requests.
    pub fn current(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// Which routes came through the admin API.
    pub async fn api_route_names(&self) -> Vec<String> {
        let routes = self.routes.lock().await;
        routes.api.iter().map(|r| r.name.clone()).collect()
    }

    fn install(&self, sets: &RouteSets) -> Result<usize, ChangeError> {
        let names = sets.file.iter().map(|r| &r.name);
        if let Some(clash) = sets
            .api
            .iter()
            .find(|r| names.clone().any(|name| *name == r.name))
        {
            return Err(ChangeError::Invalid(format!(
                "route {:?} is defined in the configuration file too",
                clash.name
            )));
        }
        let all: Vec<GatewayRouteConfig> = sets.file.iter().chain(&sets.api).cloned().collect();
        let proxy = Proxy::build(&all, Arc::clone(&self.shared))
            .map_err(|error| ChangeError::Invalid(error.to_string()))?;
        self.current.store(Arc::new(proxy));
        Ok(all.len())
    }

    /// Reads the configuration file again and applies its routes.
    pub async fn reload(&self) -> Result<ReloadReport, ChangeError> {
        let source = self.source.as_ref().ok_or(ChangeError::NoSource)?;
        let config = (source.load)().map_err(ChangeError::Invalid)?;
        let mut sets = self.routes.lock().await;
        let next = RouteSets {
            file: config.routes.clone(),
            api: sets.api.clone(),
        };
        let routes = self.install(&next)?;
        sets.file = next.file;
        let running = &self.running;
        let needs_restart = [
            ("listen", running.listen != config.listen),
            ("admin_listen", running.admin_listen != config.admin_listen),
            ("admin_token", running.admin_token != config.admin_token),
            ("registry", running.registry != config.registry),
            ("upstream", running.upstream != config.upstream),
            ("auth", running.auth != config.auth),
            ("rate_limit", running.rate_limit != config.rate_limit),
            ("http", running.http != config.http),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        metrics::counter!("keel_gateway_config_reloads_total", "result" => "applied").increment(1);
        Ok(ReloadReport {
            routes,
            needs_restart,
        })
    }

    /// Adds or replaces a route managed through the admin API.
    pub async fn put_route(&self, route: GatewayRouteConfig) -> Result<usize, ChangeError> {
        let mut sets = self.routes.lock().await;
        if sets.file.iter().any(|r| r.name == route.name) {
            return Err(ChangeError::FromFile(route.name));
        }
        let mut api = sets.api.clone();
        match api.iter_mut().find(|r| r.name == route.name) {
            Some(existing) => *existing = route,
            None => api.push(route),
        }
        let next = RouteSets {
            file: sets.file.clone(),
            api,
        };
        let routes = self.install(&next)?;
        *sets = next;
        Ok(routes)
    }

    pub async fn delete_route(&self, name: &str) -> Result<usize, ChangeError> {
        let mut sets = self.routes.lock().await;
        if sets.file.iter().any(|r| r.name == name) {
            return Err(ChangeError::FromFile(name.to_owned()));
        }
        let api: Vec<_> = sets
            .api
            .iter()
            .filter(|r| r.name != name)
            .cloned()
            .collect();
        if api.len() == sets.api.len() {
            return Err(ChangeError::NotFound(name.to_owned()));
        }
        let next = RouteSets {
            file: sets.file.clone(),
            api,
        };
        let routes = self.install(&next)?;
        *sets = next;
        Ok(routes)
    }

    /// Polls the configuration file and reloads when its contents change. Polling (not
    /// inotify) also sees a file replaced by rename, as config managers and Kubernetes
    /// ConfigMaps do.
    async fn watch(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        let Some(source) = &self.source else { return };
        let read = || std::fs::read(&source.path).ok();
        let mut last = read();
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.wait() => return,
            }
            let now = read();
            if now == last {
                continue;
            }
            last = now;
            match self.reload().await {
                Ok(report) => tracing::info!(
                    path = %source.path.display(),
                    routes = report.routes,
                    needs_restart = ?report.needs_restart,
                    "configuration reloaded"
                ),
                Err(error) => {
                    metrics::counter!("keel_gateway_config_reloads_total", "result" => "rejected")
                        .increment(1);
                    tracing::error!(
                        path = %source.path.display(),
                        %error,
                        "configuration change rejected; the running configuration keeps serving"
                    );
                }
            }
        }
    }
}

/// A bound gateway: the proxy listener and the admin listener.
pub struct GatewayServer {
    http: HttpServer,
    admin: HttpServer,
    gateway: Arc<Gateway>,
    watch_interval: Duration,
}

impl GatewayServer {
    /// Validates the routes and binds both listeners. The gateway's own `/health/*` and
    /// `/metrics` answer on both ports; every other path of the proxy port is routed.
    ///
    /// Routes with a `service` watch it in the registry until `shutdown`.
    pub async fn build(config: GatewayConfig, shutdown: &Shutdown) -> Result<Self, StartError> {
        Self::build_with_source(config, None, shutdown).await
    }

    /// As [`Self::build`], reloading from `source` on demand and when its file changes.
    pub async fn build_with_source(
        config: GatewayConfig,
        source: Option<ConfigSource>,
        shutdown: &Shutdown,
    ) -> Result<Self, StartError> {
        let registry = RegistryClient::new(&config.registry, None)?;
        let discovery = DiscoveryView::new(registry, shutdown);
        let shared = Arc::new(Shared::new(&config, discovery).map_err(StartError::Settings)?);
        let proxy = Proxy::build(&config.routes, Arc::clone(&shared))?;
        let gateway = Arc::new(Gateway {
            current: ArcSwap::from_pointee(proxy),
            shared,
            routes: tokio::sync::Mutex::new(RouteSets {
                file: config.routes.clone(),
                api: Vec::new(),
            }),
            running: config.clone(),
            source,
        });
        // Every path but the server's own endpoints goes to the proxy; a catch-all route
        // (rather than a fallback) keeps the shared stack's 404 fallback in place.
        let handler = {
            let gateway = Arc::clone(&gateway);
            move |request| gateway.current().handle(request)
        };
        let router = Router::new()
            .route("/", any(handler.clone()))
            .route("/{*path}", any(handler));
        let http = HttpServer::bind(
            "gateway",
            config.listen,
            router,
            Health::new(),
            config.http.clone(),
        )
        .await?;
        let admin = HttpServer::bind(
            "gateway-admin",
            config.admin_listen,
            admin::router(Arc::clone(&gateway), config.admin_token.clone()),
            Health::new(),
            config.http,
        )
        .await?;
        Ok(Self {
            http,
            admin,
            gateway,
            watch_interval: config.watch_interval,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }
}

impl Server for GatewayServer {
    fn name(&self) -> &'static str {
        "gateway"
    }

    fn local_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        if !self.watch_interval.is_zero() {
            tokio::spawn(Arc::clone(&self.gateway).watch(self.watch_interval, shutdown.clone()));
        }
        let (proxy, admin) =
            tokio::join!(self.http.run(shutdown.clone()), self.admin.run(shutdown));
        proxy.and(admin)
    }
}
