//! A scriptable upstream that a test can slow down, fail, or kill outright.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
