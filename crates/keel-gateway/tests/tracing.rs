//! With traces exported, the gateway opens a span per request, continues the caller's
//! trace and hands its own span to the upstream in `traceparent`. Its own test binary, as
//! `telemetry::init` installs the process-wide subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use axum::routing::{any, post};
use keel_gateway::config::{GatewayRouteConfig, UpstreamConfig};
use keel_gateway::route::MatchConfig;
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_runtime::Shutdown;
use keel_runtime::telemetry::{self, LogFormat, TelemetryConfig};

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_a_span_that_continues_the_trace_upstream() {
    let exports = Arc::new(AtomicUsize::new(0));
    let collector = serve(Router::new().route(
        "/v1/traces",
        post({
            let exports = Arc::clone(&exports);
            move || async move {
                exports.fetch_add(1, Ordering::SeqCst);
                ""
            }
        }),
    ))
    .await;
    let guard = telemetry::init(
        &TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "warn".into(),
            otlp_endpoint: Some(collector),
            sample_ratio: 1.0,
        },
        "gateway-trace-test",
        "i-1",
    )
    .unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = serve(Router::new().fallback(any({
        let seen = Arc::clone(&seen);
        move |request: Request| async move {
            let traceparent = request
                .headers()
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(traceparent);
            "ok"
        }
    })))
    .await;
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        routes: vec![GatewayRouteConfig {
            name: "traced".into(),
            matches: MatchConfig {
                path_prefix: Some("/".into()),
                ..MatchConfig::default()
            },
            upstreams: vec![UpstreamConfig::Url(upstream)],
            ..GatewayRouteConfig::default()
        }],
        ..GatewayConfig::default()
    };
    let gateway = keel_testkit::spawn(
        GatewayServer::build(config, &Shutdown::new())
            .await
            .unwrap(),
    );

    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let client = keel_testkit::http();
    client
        .get(format!("{}/x", gateway.url))
        .header("traceparent", caller)
        .send()
        .await
        .unwrap();
    client
        .get(format!("{}/y", gateway.url))
        .send()
        .await
        .unwrap();

    let seen = seen.lock().unwrap().clone();
    let continued = seen[0].clone().expect("traceparent sent upstream");
    assert!(
        continued.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {continued}"
    );
    assert!(
        !continued.contains("00f067aa0ba902b7"),
        "the gateway's own span is the parent: {continued}"
    );
    let started = seen[1].clone().expect("a new trace is started");
    assert!(
        !started.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{started}"
    );

    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
    assert!(
        exports.load(Ordering::SeqCst) > 0,
        "the spans were exported"
    );
}
