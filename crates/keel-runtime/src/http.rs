//! The HTTP server every Keel component runs: one stack of cross-cutting layers, the
//! standard endpoints, port 0 for tests, graceful drain on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header::HeaderName};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use opentelemetry::trace::TraceContextExt;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::health::{self, Health};
use crate::metrics::{self, UNMATCHED_ROUTE};
use crate::problem::Problem;
use crate::shutdown::Shutdown;
use crate::tls::{CertificateConfig, Tls};

/// The request id header, generated when absent or unusable and echoed on the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id kept from a client; longer ones are replaced by a generated id.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Settings every HTTP server shares (`[<component>.http]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpServerConfig {
    /// How long in-flight requests may take to finish once shutdown starts.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long the server goes on accepting and serving after the stop signal, while
    /// `/health/ready` answers 503 `draining` (and the instance is deregistered), before it
    /// stops accepting and drains: the time load balancers and Kubernetes, which drops a
    /// pod from its endpoints only after signalling it, take to stop sending (a preStop
    /// sleep's job). None by default (a development stop is immediate); 5-10 s behind a
    /// load balancer.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// Time to receive a request's headers, which is also how long a kept-alive HTTP/1.1
    /// connection may sit idle between requests (hyper has one clock for both): a client
    /// that sends its headers a byte at a time (slowloris) or opens connections and sends
    /// nothing is cut off after it. Keep it above the idle timeout of the pools that call
    /// this server (the gateway's and the SDK client's, 60 s), or a pooled connection can
    /// be reused just as it is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Open connections; beyond it new ones are closed at once, so that clients cannot
    /// take every file descriptor of the process (`keel up` runs every component in one).
    pub max_connections: usize,
    /// `[<component>.http.tls]`: HTTPS instead of plain HTTP on the listen address
    /// (HTTP/2 or HTTP/1.1 by ALPN), the files reloaded when they change. The gateway's
    /// `[gateway.http]` is its admin port's; what it proxies is served by `[gateway.tls]`.
    pub tls: Option<ServerTlsConfig>,
}

/// A server's certificate and key (`[<component>.http.tls]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Mutual TLS: a PEM file of certificate authorities; only clients presenting a
    /// certificate one of them signed are served (a handshake without one fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// How often a server's certificate files are looked at for a change.
const TLS_FILES_CHECKED: Duration = Duration::from_secs(2);

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            // NGINX's keepalive_timeout.
            header_read_timeout: Duration::from_secs(75),
            max_connections: 1024,
            tls: None,
        }
    }
}

impl HttpServerConfig {
    /// hyper's connection settings for HTTP/2 (`true`) or HTTP/1.1: HTTP/1.1 with the
    /// header timeout, HTTP/2 with pings on the same period (an idle connection whose
    /// peer is gone is closed). One protocol each: which one is told by [`speaks_http2`],
    /// since hyper's own detection waits for the first bytes for ever.
    fn builder(&self, http2: bool) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(self.header_read_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        if http2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        }
    }
}

/// HTTP/2's connection preface (RFC 9113 §3.4), which a client speaking it with prior
/// knowledge (h2c, gRPC) sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client on `stream` speaks HTTP/2, from its first bytes (left unread for
/// hyper); `None` when it closes, or sends too little to tell within `within`.
async fn speaks_http2(stream: &TcpStream, within: Duration) -> Option<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    let tell = async {
        loop {
            let read = stream.peek(&mut first).await.ok()?;
            if read == 0 {
                return None;
            }
            if first[..read] != H2_PREFACE[..read] {
                return Some(false);
            }
            if read == H2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface: the rest is still to come (peeking again at once would
            // only see the same bytes).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(within, tell).await.ok().flatten()
}

/// Why a server could not start listening.
#[derive(Debug, thiserror::Error)]
#[error("{component} cannot listen on {addr}: {error}{hint}")]
pub struct BindError {
    pub component: String,
    pub addr: SocketAddr,
    pub error: io::Error,
    hint: &'static str,
}

impl BindError {
    /// `component` could not listen on `addr`; a taken port gets a hint naming the way out.
    pub fn new(component: &str, addr: SocketAddr, error: io::Error) -> Self {
        Self {
            component: component.to_owned(),
            addr,
            hint: if error.kind() == io::ErrorKind::AddrInUse {
                " (another process holds the port: stop it or choose another port in the configuration)"
            } else {
                ""
            },
            error,
        }
    }
}

/// Binds `addr` for `component`.
pub async fn bind_listener(component: &str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| BindError::new(component, addr, error))
}

/// A bound, not yet running HTTP server.
pub struct HttpServer {
    component: String,
    listener: TcpListener,
    router: Router,
    health: Health,
    tls: Option<Arc<Tls>>,
    config: HttpServerConfig,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port) and wraps `router` in the standard stack,
    /// adding `/health/live`, `/health/ready` and `/metrics`.
    pub async fn bind(
        component: &str,
        addr: SocketAddr,
        router: Router,
        health: Health,
        config: HttpServerConfig,
    ) -> Result<Self, BindError> {
        let listener = bind_listener(component, addr).await?;
        Self::from_listener(component, listener, router, health, config)
    }

    /// As [`HttpServer::bind`], on a listener bound already (for servers whose routes
    /// need their own address, such as an issuer URL). Unusable certificate files are an
    /// error here, before anything is served.
    pub fn from_listener(
        component: &str,
        listener: TcpListener,
        router: Router,
        health: Health,
        config: HttpServerConfig,
    ) -> Result<Self, BindError> {
        let tls = config
            .tls
            .as_ref()
            .map(|tls| {
                let certificate = CertificateConfig {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                    hosts: Vec::new(),
                };
                let context = format!("{component}: http.tls");
                Tls::new(&[certificate], tls.client_ca.as_deref(), &context).map(Arc::new)
            })
            .transpose()
            .map_err(|error| {
                let addr = listener
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                BindError::new(
                    component,
                    addr,
                    io::Error::new(io::ErrorKind::InvalidInput, error),
                )
            })?;
        Ok(Self {
            component: component.to_owned(),
            listener,
            router: stack(component, router, health.clone()),
            health,
            tls,
            config,
        })
    }

    /// `http://<address>`, or `https://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` fires and the shutdown delay has passed (readiness
    /// answering `draining` meanwhile), then stops accepting and drains in-flight requests
    /// for up to the drain timeout.
    pub async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        let addr = self.local_addr();
        tracing::info!(component = %self.component, %addr, tls = self.tls.is_some(), "listening");
        self.health.follow(&shutdown);
        if let Some(tls) = &self.tls {
            tokio::spawn(Arc::clone(tls).watch(TLS_FILES_CHECKED, shutdown.clone()));
        }
        let tls = self.tls;
        let shutdown = accepting_until(&self.component, &shutdown, self.config.shutdown_delay);
        // hyper directly rather than `axum::serve`, which sets no timer: without one a
        // connection that never finishes its headers, or sits idle, is held for ever.
        let builders = Arc::new([self.config.builder(false), self.config.builder(true)]);
        let within = self.config.header_read_timeout;
        let router = self.router;
        let limits = ConnectionLimits {
            max_connections: self.config.max_connections,
            refused_metric: "keel_http_connections_refused_total",
            drain: self.config.drain_timeout,
        };
        accept_connections(
            &self.component,
            self.listener,
            &limits,
            &shutdown,
            |stream, peer, watcher| {
                let router = router.clone();
                let service = service_fn(move |mut request: http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().oneshot(request)
                });
                let builders = Arc::clone(&builders);
                let stop = shutdown.signalled();
                let tls = tls.clone();
                async move {
                    let result = if let Some(tls) = tls {
                        // The handshake under the header clock: a client that opens a
                        // connection and never finishes it is cut off as a slow one is.
                        let accepted = tokio::select! {
                            accepted = tokio::time::timeout(within, tls.acceptor.accept(stream)) => accepted,
                            () = stop => return,
                        };
                        let Ok(Ok(stream)) = accepted else {
                            return;
                        };
                        let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        let connection = builders[usize::from(http2)]
                            .serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    } else {
                        let http2 = tokio::select! {
                            http2 = speaks_http2(&stream, within) => http2,
                            () = stop => None,
                        };
                        let Some(http2) = http2 else {
                            return;
                        };
                        let connection = builders[usize::from(http2)]
                            .serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    };
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
            },
        )
        .await;
        Ok(())
    }
}

/// The signal to stop accepting: `shutdown`'s, `delay` after it (itself when there is no
/// delay). What is already open is not told to close before then either.
pub fn accepting_until(component: &str, shutdown: &Shutdown, delay: Duration) -> Shutdown {
    if delay.is_zero() {
        return shutdown.clone();
    }
    let closing = Shutdown::new();
    let (component, shutdown, signal) = (component.to_owned(), shutdown.clone(), closing.clone());
    tokio::spawn(async move {
        shutdown.wait().await;
        tracing::info!(%component, ?delay, "draining: serving on, readiness 503, until the delay is over");
        tokio::time::sleep(delay).await;
        signal.trigger();
    });
    closing
}

/// How many connections a listener keeps open and how long it drains them.
pub struct ConnectionLimits {
    /// Open connections; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// The counter of connections closed for the limit.
    pub refused_metric: &'static str,
    /// How long open connections may take to finish once shutdown starts.
    pub drain: Duration,
}

/// Accepts on `listener` until `shutdown`, each connection (`TCP_NODELAY` set) handed to
/// `serve` with a watcher of the drain, at most `limits.max_connections` at once; then
/// stops listening and waits up to `limits.drain` for every watcher to be dropped. The
/// accept loop of every Keel listener (the gateway's and each server's).
pub async fn accept_connections<Serve, Served>(
    component: &str,
    listener: TcpListener,
    limits: &ConnectionLimits,
    shutdown: &Shutdown,
    mut serve: Serve,
) where
    Serve: FnMut(TcpStream, SocketAddr, Watcher) -> Served,
    Served: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: pause rather than spin.
                Err(error) => {
                    tracing::warn!(component, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            ::metrics::counter!(limits.refused_metric).increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let served = serve(stream, peer, graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            served.await;
        });
    }
    drop(listener);
    let drain = limits.drain;
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => {
            tracing::warn!(component, ?drain, "drain deadline passed with connections still open");
        }
    }
}

/// Builds the server stack. Layers listed last run first (outermost):
/// request id → trace span → metrics → handler. The request id is outermost so every
/// response, whatever inner layer produced it, echoes it and the span can record it; the
/// span wraps metrics so anything logged while recording carries the trace ids.
fn stack(component: &str, router: Router, health: Health) -> Router {
    metrics::install();
    let standard = Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready).with_state(health))
        .route("/metrics", get(|| async { metrics::render() }));
    router
        .merge(standard)
        // After the merge: it reaches only the routes there are by then.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::<str>::from(component),
            metrics::http_metrics,
        ))
        .layer(middleware::from_fn(trace_span))
        .layer(middleware::from_fn(request_id))
}

async fn not_found(request: Request) -> Response {
    Problem::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

/// A path served, with another method (axum adds `Allow`).
async fn method_not_allowed(request: Request) -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
    .with_detail(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

tokio::task_local! {
    static CURRENT_REQUEST_ID: HeaderValue;
}

/// The `x-request-id` of the request the current task is serving through this stack (not
/// in tasks it spawned), for calls made on its behalf to carry it on.
pub fn current_request_id() -> Option<HeaderValue> {
    CURRENT_REQUEST_ID.try_with(Clone::clone).ok()
}

/// Keeps a usable client `x-request-id` or generates one, and echoes it on the response.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = set_request_id(request.headers_mut());
    let mut response = CURRENT_REQUEST_ID
        .scope(id.clone(), next.run(request))
        .await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// Leaves the request one `x-request-id` and returns it: the client's (its first) when it
/// is short printable ASCII (so log lines never carry hostile bytes), or a new one.
/// Found and set with one lookup. Every server and the gateway's proxy path use this.
pub fn set_request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    let usable = |id: &HeaderValue| {
        let bytes = id.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes.iter().all(|b| b.is_ascii_graphic())
    };
    match headers.entry(&REQUEST_ID) {
        http::header::Entry::Occupied(mut entry) => {
            let id = if usable(entry.get()) {
                entry.get().clone()
            } else {
                new_request_id()
            };
            // Only when it changes anything: a second value, or an unusable one.
            if entry.iter().nth(1).is_some() || entry.get() != id {
                entry.insert(id.clone());
            }
            id
        }
        http::header::Entry::Vacant(entry) => entry.insert(new_request_id()).clone(),
    }
}

/// A new request id: 128 random bits in hex.
fn new_request_id() -> HeaderValue {
    // Hex by hand, a byte at a time: this runs for every request the gateway proxies.
    const HEX_PAIRS: [[u8; 2]; 256] = {
        let digits = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut byte = 0;
        while byte < 256 {
            pairs[byte] = [digits[byte >> 4], digits[byte & 0xf]];
            byte += 1;
        }
        pairs
    };
    let mut text = [0u8; 32];
    for (pair, byte) in text
        .chunks_exact_mut(2)
        .zip(fastrand::u128(..).to_be_bytes())
    {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    // Cut from a shared per-thread block: one allocation per ~128 ids instead of two per
    // id (a value copied into its own buffer, then made shareable on its first clone).
    thread_local! {
        static IDS: std::cell::RefCell<bytes::BytesMut> =
            std::cell::RefCell::new(bytes::BytesMut::new());
    }
    let id = IDS.with_borrow_mut(|block| {
        if block.capacity() - block.len() < text.len() {
            *block = bytes::BytesMut::with_capacity(text.len() * 128);
        }
        block.extend_from_slice(&text);
        block.split().freeze()
    });
    HeaderValue::from_maybe_shared(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Opens the request's span, named from the route template, child of the caller's
/// `traceparent` when there is one.
async fn trace_span(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str)
        .to_owned();
    let method = request.method().clone();
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let span = tracing::info_span!(
        "http request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id,
    );
    let parent = crate::trace_context::extract(request.headers());
    // Without a valid incoming context (none, or garbage) the span starts a new trace.
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let started = Instant::now();
    async move {
        let response = next.run(request).await;
        let status = response.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            tracing::warn!(
                status = status.as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request failed"
            );
        } else {
            tracing::debug!(
                status = status.as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request served"
            );
        }
        response
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        app_of("test")
    }

    fn app_of(component: &str) -> Router {
        stack(
            component,
            Router::new().route("/items/{id}", get(|| async { "item" })),
            Health::new(),
        )
    }

    #[tokio::test]
    async fn request_id_is_kept_when_usable_and_generated_otherwise() {
        let response = app()
            .oneshot(
                Request::get("/items/1")
                    .header("x-request-id", "abc-123")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.headers()["x-request-id"], "abc-123");

        let hostile = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        let response = app()
            .oneshot(
                Request::get("/items/1")
                    .header("x-request-id", hostile.as_str())
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let echoed = response.headers()["x-request-id"].to_str().expect("ascii");
        assert_ne!(echoed, hostile);
        assert!(uuid::Uuid::parse_str(echoed).is_ok());
    }

    #[test]
    fn one_request_id_is_left_the_clients_first_when_usable() {
        let mut headers = http::HeaderMap::new();
        headers.append(REQUEST_ID, HeaderValue::from_static("first"));
        headers.append(REQUEST_ID, HeaderValue::from_static("second"));
        assert_eq!(set_request_id(&mut headers), "first");
        assert_eq!(headers.get_all(REQUEST_ID).iter().count(), 1);
        assert_eq!(headers[REQUEST_ID], "first");

        let mut headers = http::HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        let id = set_request_id(&mut headers);
        assert_eq!(id.len(), 32);
        assert_eq!(headers[REQUEST_ID], id);
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn generated_request_ids_are_128_random_bits_in_hex() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| {
                let id = set_request_id(&mut http::HeaderMap::new());
                id.to_str().expect("ascii").to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 1000, "no id repeats");
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        // Every digit value shows up in every position over a thousand ids.
        for position in 0..32 {
            let digits: std::collections::HashSet<u8> =
                ids.iter().map(|id| id.as_bytes()[position]).collect();
            assert_eq!(digits.len(), 16, "position {position}");
        }
    }

    #[tokio::test]
    async fn unknown_route_is_problem_json_404() {
        let response = app()
            .oneshot(Request::get("/nope").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.headers()["content-type"],
            crate::problem::CONTENT_TYPE
        );
        assert!(response.headers().contains_key("x-request-id"));
    }

    #[tokio::test]
    async fn a_known_path_with_another_method_is_problem_json_405() {
        for path in ["/items/1", "/health/live"] {
            let response = app()
                .oneshot(Request::post(path).body(Body::empty()).expect("request"))
                .await
                .expect("response");
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert_eq!(
                response.headers()["content-type"],
                crate::problem::CONTENT_TYPE
            );
            assert!(
                response.headers()["allow"]
                    .to_str()
                    .expect("ascii")
                    .contains("GET")
            );
        }
    }

    #[tokio::test]
    async fn metrics_are_labelled_by_route_template() {
        let _ = app()
            .oneshot(
                Request::get("/items/77")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let text = metrics::render();
        assert!(
            text.lines().any(
                |line| line.starts_with("http_server_request_duration_seconds_count")
                    && line.contains("http_route=\"/items/{id}\"")
                    && line.contains("http_response_status_code=\"200\"")
            ),
            "{text}"
        );
        assert!(!text.contains("/items/77"));
    }

    /// `keel up` runs several servers on one recorder: each one's series carry its name.
    #[tokio::test]
    async fn servers_in_one_process_keep_their_metrics_apart() {
        for (component, requests) in [("alpha", 2), ("beta", 1)] {
            for _ in 0..requests {
                let request = Request::get("/items/5")
                    .body(Body::empty())
                    .expect("request");
                let _ = app_of(component).oneshot(request).await.expect("response");
            }
        }
        let text = metrics::render();
        let count = |component: &str| {
            text.lines()
                .find(|line| {
                    line.starts_with("http_server_request_duration_seconds_count")
                        && line.contains(&format!("component=\"{component}\""))
                        && line.contains("http_route=\"/items/{id}\"")
                })
                .and_then(|line| line.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count("alpha").as_deref(), Some("2"), "{text}");
        assert_eq!(count("beta").as_deref(), Some("1"), "{text}");
    }

    #[tokio::test]
    async fn invented_methods_share_one_metrics_label() {
        for method in ["BREW", "WHEN", "GET"] {
            let request = Request::builder()
                .method(method)
                .uri("/items/78")
                .body(Body::empty())
                .expect("request");
            let _ = app().oneshot(request).await.expect("response");
        }
        let text = metrics::render();
        let methods = |name: &str| {
            text.lines()
                .any(|line| line.contains(&format!("http_request_method=\"{name}\"")))
        };
        assert!(methods("_OTHER") && methods("GET"), "{text}");
        assert!(!methods("BREW") && !methods("WHEN"), "{text}");
    }
}
