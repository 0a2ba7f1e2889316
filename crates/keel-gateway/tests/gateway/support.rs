//! A scriptable upstream that a test can slow down, fail, or kill outright.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::routing::any;
use keel_gateway::config::{GatewayRouteConfig, UpstreamConfig};
use keel_gateway::route::MatchConfig;
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_runtime::Shutdown;
use keel_testkit::TestServer;

/// How an upstream answers, changeable while it runs.
#[derive(Clone, Copy)]
pub struct Behaviour {
    pub status: u16,
    pub delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            status: 200,
            delay: Duration::ZERO,
        }
    }
}

/// An upstream on its own runtime, so that killing it closes every socket at once, like a
/// crashed process.
pub struct Upstream {
    pub url: String,
    pub hits: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Upstream {
    /// Answers `"{name} {method} {uri} body={body}"` with an `x-upstream: {name}` header.
    pub fn start(name: &'static str) -> Self {
        Self::start_echoing(name, &[])
    }

    /// Like [`start`](Self::start), and echoes each of `headers` that the request carries
    /// before the body: `"{name} {method} {uri} {header}={values} body={body}"`, several
    /// values joined with `,`.
    pub fn start_echoing(name: &'static str, headers: &'static [&'static str]) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let app = {
            let (hits, behaviour) = (Arc::clone(&hits), Arc::clone(&behaviour));
            Router::new().fallback(any(move |request: Request| {
                let (hits, behaviour) = (Arc::clone(&hits), Arc::clone(&behaviour));
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let Behaviour { status, delay } = *behaviour.lock().unwrap();
                    tokio::time::sleep(delay).await;
                    let (parts, body) = request.into_parts();
                    let body: Bytes = axum::body::to_bytes(body, usize::MAX)
                        .await
                        .unwrap_or_default();
                    let mut echoed = String::new();
                    for header in headers {
                        let values: Vec<&str> = parts
                            .headers
                            .get_all(*header)
                            .iter()
                            .map(|v| v.to_str().unwrap())
                            .collect();
                        if !values.is_empty() {
                            echoed.push_str(&format!(" {header}={}", values.join(",")));
                        }
                    }
                    let text = format!(
                        "{name} {} {}{echoed} body={}",
                        parts.method,
                        parts.uri,
                        String::from_utf8_lossy(&body)
                    );
                    (
                        StatusCode::from_u16(status).unwrap(),
                        [("x-upstream", name)],
                        text,
                    )
                }
            }))
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await
        });
        Self {
            url,
            hits,
            behaviour,
            runtime: Some(runtime),
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection at once.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A route on `/` to static upstreams.
pub fn route_to(name: &str, upstreams: &[&Upstream]) -> GatewayRouteConfig {
    GatewayRouteConfig {
        name: name.into(),
        matches: MatchConfig {
            path_prefix: Some("/".into()),
            ..MatchConfig::default()
        },
        upstreams: upstreams
            .iter()
            .map(|u| UpstreamConfig::Url(u.url.clone()))
            .collect(),
        ..GatewayRouteConfig::default()
    }
}

/// A configuration with both listeners on free ports.
pub fn test_config(routes: Vec<GatewayRouteConfig>) -> GatewayConfig {
    GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        routes,
        ..GatewayConfig::default()
    }
}

/// A running gateway and its admin API's base URL.
pub struct Running {
    pub proxy: TestServer,
    pub admin: String,
}

impl Running {
    pub fn spawn(server: GatewayServer) -> Self {
        let admin = format!("http://{}", server.admin_addr());
        Self {
            proxy: keel_testkit::spawn(server),
            admin,
        }
    }

    pub async fn start(config: GatewayConfig) -> Self {
        Self::spawn(
            GatewayServer::build(config, &Shutdown::new())
                .await
                .unwrap(),
        )
    }
}

pub async fn start_gateway(routes: Vec<GatewayRouteConfig>) -> TestServer {
    keel_testkit::spawn(
        GatewayServer::build(test_config(routes), &Shutdown::new())
            .await
            .unwrap(),
    )
}

/// Which upstream served a response (its `x-upstream` header), or the status when the
/// gateway answered itself.
pub async fn served_by(response: reqwest::Response) -> String {
    match response.headers().get("x-upstream") {
        Some(name) => name.to_str().unwrap().to_owned(),
        None => format!("gateway:{}", response.status().as_u16()),
    }
}

/// Writes `bytes` on a new connection to `addr` and reads until the gateway closes it (or
/// 10 s pass): the answer, and how long it took.
pub async fn exchange(addr: &str, bytes: &[u8]) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

/// What a scripted upstream does with the connection after an answer.
pub enum After {
    KeepOpen,
    Close,
    /// Closes it this long after answering, without saying so.
    CloseIn(Duration),
}

/// A bare HTTP/1.1 upstream written byte by byte, for what a real server would not send.
pub struct ScriptedUpstream {
    pub url: String,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Connections the client (the gateway) closed.
    pub closed: Arc<AtomicUsize>,
}

/// Reads each request head (and its `content-length` body) and writes what `answer` makes
/// of the request line, lower-cased (`get /path http/1.1`).
pub async fn scripted_upstream(answer: fn(&str) -> (Vec<u8>, After)) -> ScriptedUpstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (counter, closings) = (Arc::clone(&accepted), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let closings = Arc::clone(&closings);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let complete =
                        buffer
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .and_then(|end| {
                                let head =
                                    String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                                let length: usize = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .map_or(0, |v| v.trim().parse().unwrap());
                                (buffer.len() >= end + 4 + length).then(|| {
                                    (
                                        head.lines().next().unwrap_or_default().to_owned(),
                                        end + 4 + length,
                                    )
                                })
                            });
                    let Some((line, used)) = complete else {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                closings.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    buffer.drain(..used);
                    let (reply, after) = answer(&line);
                    if stream.write_all(&reply).await.is_err() {
                        return;
                    }
                    match after {
                        After::KeepOpen => {}
                        After::Close => return,
                        After::CloseIn(pause) => {
                            tokio::time::sleep(pause).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    ScriptedUpstream {
        url,
        accepted,
        closed,
    }
}

/// An HTTP/2 (prior knowledge) connection to the gateway at `url`.
pub async fn h2_client<B>(url: &str) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}
