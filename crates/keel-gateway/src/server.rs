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
use axum::body::Body;
use axum::response::Response;
use http::HeaderValue;
use keel_runtime::http::{BindError, bind_listener};
use keel_runtime::watch::FileWatch;
use keel_runtime::{Health, HttpServer, Server, Shutdown, TrustedProxies};
use opentelemetry::trace::TraceContextExt;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use keel_registry::client::{DiscoveryView, RegistryClient};

use crate::access_log::{self, AccessLog, AccessRecord};
use crate::admin;
use crate::config::{GatewayConfig, GatewayRouteConfig};
use crate::listener::{self, Mode};
use crate::proxy::{Arrival, Handled, Proxy, Shared, Stamp};
use crate::route::RouteError;
use crate::tls::Tls;

/// The W3C trace context header, whose trace id the access log records.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

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
    access_log: Option<AccessLog>,
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
    /// The reverse proxies whose `X-Forwarded-For` names the client.
    pub(crate) fn trusted_proxies(&self) -> &TrustedProxies {
        &self.running.trusted_proxies
    }

    /// Serves one client request: request id, span, the current generation, metrics,
    /// access log. The headers the gateway puts on every answer come beside it: a server
    /// writes them or inserts them ([`Stamp`]).
    pub(crate) async fn handle(
        &self,
        mut request: http::Request<Body>,
        arrival: Arrival<'_>,
    ) -> (Response, Stamp) {
        let started = arrival.received;
        let request_id = keel_runtime::http::set_request_id(request.headers_mut());
        let method = request.method().clone();
        // gRPC runs on HTTP/2 only: HTTP/1.1 requests skip the header lookup.
        let grpc = request.version() == http::Version::HTTP_2 && is_grpc(request.headers());
        // Shared, not copied: the path's bytes and the client's formatted address.
        let logged = self.access_log.as_ref().map(|_| {
            (
                request.uri().path_and_query().cloned(),
                arrival.client.address_value(request.headers()),
            )
        });
        // A span per request only when spans leave the process; otherwise the client's
        // `traceparent` passes through untouched and the access log takes its trace id.
        let incoming_trace = self.access_log.as_ref().and_then(|_| {
            request
                .headers()
                .get(TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(keel_runtime::trace_context::trace_id)
                .map(str::to_owned)
        });
        let span = if keel_runtime::telemetry::exporting_traces() {
            let span = tracing::info_span!(
                "gateway request",
                otel.name = tracing::field::Empty,
                otel.kind = "server",
                http.request.method = %method,
                http.route = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            );
            let parent = keel_runtime::trace_context::extract(request.headers());
            // Without a valid incoming context the span starts a new trace.
            if parent.span().span_context().is_valid() {
                let _ = span.set_parent(parent);
            }
            span
        } else {
            tracing::Span::none()
        };
        let generation = self.current();
        let handled = if span.is_none() {
            generation.handle(request, arrival).await
        } else {
            generation
                .handle(request, arrival)
                .instrument(span.clone())
                .await
        };
        let Handled {
            mut response,
            served,
            attempts,
            rate,
        } = handled;
        let elapsed = started.elapsed();
        let status = response.status();
        served.metrics.record(status, elapsed);
        if !span.is_none() {
            span.record("otel.name", format!("{method} {}", served.route));
            span.record("http.route", &*served.route);
        }
        span.record("http.response.status_code", status.as_u16());
        if let (Some(log), Some((path, client_ip))) = (&self.access_log, logged) {
            let timestamp = access_log::timestamp(std::time::SystemTime::now());
            log.log(&AccessRecord {
                timestamp: std::str::from_utf8(&timestamp).unwrap_or_default(),
                route: &served.route,
                method: method.as_str(),
                path: path.as_ref().map_or("", |p| p.path()),
                status: status.as_u16(),
                bytes: response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                duration: elapsed,
                upstream: attempts.as_ref().map(|a| &*a.endpoint),
                retries: attempts.as_ref().map_or(0, |a| a.retries),
                client: client_ip.to_str().unwrap_or_default(),
                request_id: request_id.to_str().unwrap_or_default(),
                trace_id: trace_id(&span).or(incoming_trace),
            });
        }
        if grpc {
            // The stamp's headers stay on a rewritten error, as on any other answer.
            response = grpc_status(response);
        }
        (response, Stamp { request_id, rate })
    }

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
            (
                "discovery_routes",
                config.discovery_routes.is_some()
                    && running.discovery_routes != config.discovery_routes,
            ),
            ("auth", running.auth != config.auth),
            ("rate_limit", running.rate_limit != config.rate_limit),
            ("tls", running.tls != config.tls),
            ("limits", running.limits != config.limits),
            (
                "trusted_proxies",
                running.trusted_proxies != config.trusted_proxies,
            ),
            ("access_log", running.access_log != config.access_log),
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

    /// Reloads whenever the configuration file's contents change.
    async fn watch(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        let Some(source) = &self.source else { return };
        let mut file = FileWatch::new(vec![source.path.clone()]);
        while file.changed(interval, &shutdown).await {
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

/// A bound gateway: the proxy listener (plain, and TLS when configured) and the admin
/// listener.
pub struct GatewayServer {
    plain: TcpListener,
    secure: Option<(TcpListener, Arc<Tls>)>,
    admin: HttpServer,
    gateway: Arc<Gateway>,
    config: GatewayConfig,
}

impl GatewayServer {
    /// Validates the configuration and binds every listener. The gateway's own
    /// `/health/*` and `/metrics` answer on the admin port; every path of the proxy ports
    /// is routed.
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
        keel_runtime::metrics::install();
        config.limits.validate().map_err(StartError::Settings)?;
        let registry = RegistryClient::new(&config.registry, None)?;
        let discovery = DiscoveryView::new(registry, shutdown);
        let shared = Arc::new(Shared::new(&config, discovery).map_err(StartError::Settings)?);
        let proxy = Proxy::build(&config.routes, Arc::clone(&shared))?;
        let tls = config
            .tls
            .as_ref()
            .map(|tls| {
                if tls.client_ca.is_some() && !tls.redirect_http {
                    return Err(
                        "gateway.tls.client_ca needs redirect_http = true: the plain \
                         listener would otherwise serve the routes without a client certificate"
                            .to_owned(),
                    );
                }
                Tls::new(&tls.certificates, tls.client_ca.as_deref(), "gateway.tls")
            })
            .transpose()
            .map_err(StartError::Settings)?;
        let access_log = AccessLog::start(&config.access_log).map_err(StartError::Settings)?;
        let gateway = Arc::new(Gateway {
            current: ArcSwap::from_pointee(proxy),
            shared,
            routes: tokio::sync::Mutex::new(RouteSets {
                file: config.routes.clone(),
                api: Vec::new(),
            }),
            running: config.clone(),
            source,
            access_log,
        });
        let plain = bind_listener("gateway", config.listen).await?;
        let secure = match (tls, &config.tls) {
            (Some(tls), Some(tls_config)) => Some((
                bind_listener("gateway-tls", tls_config.listen).await?,
                Arc::new(tls),
            )),
            _ => None,
        };
        let admin = HttpServer::bind(
            "gateway-admin",
            config.admin_listen,
            admin::router(Arc::clone(&gateway), config.admin_token.clone()),
            Health::new(),
            config.http.clone(),
        )
        .await?;
        Ok(Self {
            plain,
            secure,
            admin,
            gateway,
            config,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// The admin API's base URL (`https://` with `[gateway.http.tls]`).
    pub fn admin_url(&self) -> String {
        self.admin.url()
    }

    /// The HTTPS listener's address, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.secure.as_ref().and_then(|(l, _)| l.local_addr().ok())
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
        self.plain
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        let config = self.config;
        if !config.watch_interval.is_zero() {
            tokio::spawn(Arc::clone(&self.gateway).watch(config.watch_interval, shutdown.clone()));
        }
        let limits = config.limits.clone();
        let plain_mode = match (&self.secure, &config.tls) {
            (Some((listener, _)), Some(tls)) if tls.redirect_http => Mode::RedirectToHttps {
                port: listener
                    .local_addr()
                    .map_or(tls.listen.port(), |a| a.port()),
            },
            _ => Mode::Proxy { tls: None },
        };
        tracing::info!(addr = %self.plain.local_addr()?, "gateway listening");
        let plain = listener::serve(
            self.plain,
            plain_mode,
            Arc::clone(&self.gateway),
            limits.clone(),
            &config.http,
            shutdown.clone(),
        );
        let secure = async {
            let Some((listener, tls)) = self.secure else {
                return Ok(());
            };
            if !config.watch_interval.is_zero() {
                tokio::spawn(Arc::clone(&tls).watch(config.watch_interval, shutdown.clone()));
            }
            tracing::info!(addr = %listener.local_addr()?, "gateway listening (TLS)");
            listener::serve(
                listener,
                Mode::Proxy { tls: Some(tls) },
                Arc::clone(&self.gateway),
                limits,
                &config.http,
                shutdown.clone(),
            )
            .await
        };
        let (plain, secure, admin) = tokio::join!(plain, secure, self.admin.run(shutdown.clone()));
        plain.and(secure).and(admin)
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC client reads errors from `grpc-status`, not from HTTP statuses or JSON: the
/// gateway's own errors become trailers-only gRPC responses with the matching code
/// (the upstream's own answers pass unchanged).
fn grpc_status(response: Response) -> Response {
    let from_gateway = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if !from_gateway {
        return response;
    }
    let status = response.status();
    // https://grpc.github.io/grpc/core/md_doc_statuscodes.html
    let code: u16 = match status.as_u16() {
        400 | 413 | 431 => 3, // INVALID_ARGUMENT
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        404 => 12,            // UNIMPLEMENTED: no route for the method
        429 => 8,             // RESOURCE_EXHAUSTED
        502 | 503 => 14,      // UNAVAILABLE
        504 => 4,             // DEADLINE_EXCEEDED
        _ => 13,              // INTERNAL
    };
    let message = format!("gateway: {}", status.canonical_reason().unwrap_or("error"));
    let mut grpc = Response::new(Body::empty());
    let headers = grpc.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    if let Some(after) = response.headers().get(http::header::RETRY_AFTER) {
        headers.insert(http::header::RETRY_AFTER, after.clone());
    }
    *grpc.extensions_mut() = response.into_parts().0.extensions;
    grpc
}

/// The span's trace id, when it is part of a trace.
fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
