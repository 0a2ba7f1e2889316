//! The client-facing listeners: accept, (TLS,) HTTP/1.1 or HTTP/2 per connection, and the
//! limits that keep hostile clients from exhausting the gateway — connection count, header
//! size and count, slow headers (slowloris), clients that stop reading, HTTP/2 streams,
//! and a request rate per connection. Served with hyper directly (no router), since every
//! request is the proxy's.

use std::convert::Infallible;
use std::io;
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use keel_runtime::HttpServerConfig;
use keel_runtime::http::{ConnectionLimits, accept_connections, accepting_until};
use keel_runtime::{Problem, Shutdown};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::endpoint::nanos_at;
use crate::h1_server::{self, Ended};
use crate::proxy::{Arrival, ClientInfo, SOURCE};
use crate::ratelimit::gcra;
use crate::send_timeout::SendTimeout;
use crate::server::Gateway;
use crate::stall::StallWatch;
use crate::tls::Tls;

/// `[gateway.limits]`: what one client may take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientLimitsConfig {
    /// Open client connections; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// Request line and headers together (HTTP/1.1) or the header list (HTTP/2); 431
    /// beyond it.
    pub max_header_bytes: usize,
    /// Header fields per request (HTTP/1.1); 431 beyond it.
    pub max_headers: usize,
    /// Time to receive a request's headers (and, on HTTP/1.1, a body of up to 64 KiB that
    /// is read whole) — also how long a kept-alive connection may sit idle between
    /// requests. Slow clients (slowloris) are cut off after it.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// How long a write to a client may wait for the client to read (NGINX's
    /// `send_timeout`): a client that stops reading a response is cut off after it, and
    /// the upstream connection the response came from is freed. On HTTP/2, also how long
    /// a response may wait for the client to grant it flow-control window; past it, the
    /// stream is reset and its upstream freed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Requests per second one connection may send (bursts of the same size); 429 and the
    /// connection closed beyond it. 0 turns it off.
    pub max_requests_per_second_per_connection: u32,
}

impl Default for ClientLimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: 32 * 1024,
            max_headers: HYPER_MAX_HEADERS,
            header_read_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_concurrent_streams: 256,
            max_requests_per_second_per_connection: 10_000,
        }
    }
}

/// hyper's HTTP/1.1 header count limit when none is set.
const HYPER_MAX_HEADERS: usize = 100;

impl ClientLimitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        // hyper's smallest HTTP/1.1 read buffer.
        if self.max_header_bytes < 8192 {
            return Err("gateway.limits.max_header_bytes must be at least 8192".into());
        }
        if self.max_connections == 0 || self.max_headers == 0 {
            return Err("gateway.limits: max_connections and max_headers must be above 0".into());
        }
        if self.header_read_timeout.is_zero()
            || self.tls_handshake_timeout.is_zero()
            || self.send_timeout.is_zero()
        {
            return Err("gateway.limits: timeouts must be above zero".into());
        }
        Ok(())
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        let mut http1 = builder.http1();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.max_header_bytes);
        // hyper's own limit is 100 headers; setting it explicitly, even to 100, makes hyper
        // fill a header array on every request (2 % of a request's instructions).
        if self.max_headers != HYPER_MAX_HEADERS {
            http1.max_headers(self.max_headers);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(self.header_read_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }
}

/// What a listener does with requests.
#[derive(Clone)]
pub enum Mode {
    Proxy {
        tls: Option<Arc<Tls>>,
    },
    /// Answers with a redirect to HTTPS on this port.
    RedirectToHttps {
        port: u16,
    },
}

/// Per-connection request rate: the rate limiter's GCRA over one timestamp.
pub(crate) struct ConnectionRate {
    interval: u64,
    tolerance: u64,
    tat: Mutex<u64>,
}

impl ConnectionRate {
    fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| {
            // In microseconds; at least one, so that a rate above a million a second
            // (no limit, in effect) divides nothing by zero.
            let interval = (1_000_000 / u64::from(per_second)).max(1);
            Self {
                interval,
                tolerance: interval * u64::from(per_second),
                tat: Mutex::new(0),
            }
        })
    }

    /// Whether a request received at `at` is within the connection's rate.
    pub(crate) fn admit(&self, at: Instant) -> bool {
        let now = nanos_at(at) / 1_000;
        let mut tat = self.tat.lock().unwrap_or_else(PoisonError::into_inner);
        let (decision, next) = gcra(*tat, now, self.interval, self.tolerance, 0);
        if let Some(next) = next {
            *tat = next;
        }
        decision.allowed
    }
}

/// What every request of one client connection shares, whoever serves it.
pub(crate) struct ConnState {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) mode: Mode,
    pub(crate) rate: Option<ConnectionRate>,
    /// Formatted once for every request of the connection.
    pub(crate) client: ClientInfo,
    pub(crate) limits: Arc<ClientLimitsConfig>,
    pub(crate) shutdown: Shutdown,
}

/// Serves `listener` until `shutdown` and `http.shutdown_delay` after it, then drains
/// open connections for up to `http.drain_timeout`. From the signal on, HTTP/1.1
/// connections close after their current request, as Envoy's drain does, so that clients
/// reconnect (elsewhere, once the instance has left the balancers); new ones are still
/// served during the delay.
pub async fn serve(
    listener: TcpListener,
    mode: Mode,
    gateway: Arc<Gateway>,
    limits: ClientLimitsConfig,
    http: &HttpServerConfig,
    shutdown: Shutdown,
) -> io::Result<()> {
    let builder = Arc::new(limits.builder());
    let connections = ConnectionLimits {
        max_connections: limits.max_connections,
        refused_metric: "keel_gateway_connections_refused_total",
        drain: http.drain_timeout,
    };
    let accepting = accepting_until("gateway", &shutdown, http.shutdown_delay);
    let limits = Arc::new(limits);
    let proxies = Arc::new(gateway.trusted_proxies().clone());
    // Every connection task holds a watcher until it ends, whoever serves it: hyper's
    // connections finish their requests and close, ours close after their current
    // request (or at once when idle), and the drain waits for all of them.
    accept_connections(
        "gateway",
        listener,
        &connections,
        &accepting,
        |stream, peer, watcher| {
            // Under TLS, so that it watches the bytes on the wire.
            let stream = SendTimeout::new(stream, limits.send_timeout);
            let tls = match &mode {
                Mode::Proxy { tls: Some(tls) } => Some(Arc::clone(tls)),
                _ => None,
            };
            let state = Arc::new(ConnState {
                gateway: Arc::clone(&gateway),
                mode: mode.clone(),
                rate: ConnectionRate::new(limits.max_requests_per_second_per_connection),
                client: ClientInfo::new(peer, tls.is_some(), &proxies),
                limits: Arc::clone(&limits),
                shutdown: shutdown.clone(),
            });
            let builder = Arc::clone(&builder);
            async move {
                let result = match tls {
                    Some(tls) => {
                        let handshake = state.limits.tls_handshake_timeout;
                        let accepted =
                            tokio::time::timeout(handshake, tls.acceptor.accept(stream)).await;
                        let Ok(Ok(stream)) = accepted else {
                            return;
                        };
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                            serve_with_hyper(stream, &builder, watcher, state).await
                        } else {
                            serve_connection(stream, &builder, watcher, state).await
                        }
                    }
                    None => serve_connection(stream, &builder, watcher, state).await,
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
            }
        },
    )
    .await;
    Ok(())
}

type ConnResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// HTTP/1.1 served by the gateway itself ([`h1_server`]) until something needs hyper.
async fn serve_connection<I>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    state: Arc<ConnState>,
) -> ConnResult
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stop = pin!(state.shutdown.signalled());
    match h1_server::serve(io, &state, stop).await {
        Ended::Closed => Ok(()),
        Ended::Handoff(io) => serve_with_hyper(io, builder, watcher, state).await,
    }
}

/// The connection served by hyper: HTTP/2, upgrades, and what [`h1_server`] hands over.
async fn serve_with_hyper<I>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    state: Arc<ConnState>,
) -> ConnResult
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Made at the connection's first HTTP/2 request: HTTP/1.1 has the send timeout.
    let stalls = Arc::new(OnceLock::new());
    let service = service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        let stalls = Arc::clone(&stalls);
        async move {
            let arrival = Arrival {
                client: &state.client,
                received: Instant::now(),
            };
            if let Some(rate) = &state.rate
                && !rate.admit(arrival.received)
            {
                return Ok::<_, Infallible>(too_fast());
            }
            let request = request.map(Body::new);
            Ok(match state.mode {
                Mode::RedirectToHttps { port } => redirect_to_https(&request, port),
                Mode::Proxy { .. } => {
                    let http2 = request.version() == http::Version::HTTP_2;
                    let (mut response, stamp) = state.gateway.handle(request, arrival).await;
                    stamp.insert_into(response.headers_mut());
                    if http2 {
                        let stalls =
                            stalls.get_or_init(|| StallWatch::start(state.limits.send_timeout));
                        response = response.map(|body| stalls.watch(body));
                    }
                    response
                }
            })
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    watcher.watch(connection.into_owned()).await
}

pub(crate) fn too_fast() -> Response {
    let mut response = Problem::too_many_requests("this connection sends requests too fast")
        .with_retry_after(Duration::from_secs(1))
        .with_source(SOURCE)
        .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

pub(crate) fn redirect_to_https(request: &Request<Body>, port: u16) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().host());
    let Some(host) = host else {
        return Problem::bad_request("a Host header is needed to redirect to HTTPS")
            .with_source(SOURCE)
            .into_response();
    };
    // Host may carry the plain port (and be an IPv6 literal in brackets).
    let name = match host.rfind(':') {
        Some(colon) if !host[colon..].contains(']') => &host[..colon],
        _ => host,
    };
    let authority = if port == 443 {
        name.to_owned()
    } else {
        format!("{name}:{port}")
    };
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    match HeaderValue::from_str(&format!("https://{authority}{target}")) {
        Ok(location) => (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response(),
        Err(_) => Problem::bad_request("the request cannot be redirected to HTTPS")
            .with_source(SOURCE)
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_rate_admits_its_burst_and_no_more_whatever_its_size() {
        let at = Instant::now();
        let rate = ConnectionRate::new(10).expect("a rate");
        assert_eq!((0..20).filter(|_| rate.admit(at)).count(), 10);
        // Above a million a second the interval would round to zero.
        let rate = ConnectionRate::new(u32::MAX).expect("a rate");
        assert!((0..1_000).all(|_| rate.admit(at)));
        assert!(ConnectionRate::new(0).is_none());
    }
}
