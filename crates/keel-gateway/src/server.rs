//! The gateway server: the startup contract around [`Proxy`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::any;
use keel_runtime::http::BindError;
use keel_runtime::{Health, HttpServer, Server, Shutdown};

use keel_registry::client::{DiscoveryView, RegistryClient};

use crate::config::GatewayConfig;
use crate::proxy::Proxy;
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
}

/// A bound gateway.
pub struct GatewayServer {
    http: HttpServer,
}

impl GatewayServer {
    /// Validates the routes and binds the listener. The gateway's own `/health/*` and
    /// `/metrics` answer on the same port; every other path is routed.
    ///
    /// Routes with a `service` watch it in the registry until `shutdown`.
    pub async fn build(config: GatewayConfig, shutdown: &Shutdown) -> Result<Self, StartError> {
        let registry = RegistryClient::new(&config.registry, None)?;
        let discovery = DiscoveryView::new(registry, shutdown);
        let proxy = Arc::new(Proxy::build(&config.routes, discovery)?);
        // Every path but the server's own endpoints goes to the proxy; a catch-all route
        // (rather than a fallback) keeps the shared stack's 404 fallback in place.
        let handler = move |request| Arc::clone(&proxy).handle(request);
        let router = Router::new()
            .route("/", any(handler.clone()))
            .route("/{*path}", any(handler));
        let http =
            HttpServer::bind("gateway", config.listen, router, Health::new(), config.http).await?;
        Ok(Self { http })
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
        self.http.run(shutdown).await
    }
}
