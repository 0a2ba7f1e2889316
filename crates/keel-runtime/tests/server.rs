//! The HTTP server stack over a real socket: drain on shutdown, trace context propagation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use keel_runtime::{Health, HttpServer, HttpServerConfig, Shutdown};
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;

async fn serve(
    router: Router,
    drain: Duration,
) -> (
    SocketAddr,
    Shutdown,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let server = HttpServer::bind(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        router,
        Health::new(),
        HttpServerConfig {
            drain_timeout: drain,
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    (addr, shutdown, handle)
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() {
    let router = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            "done"
        }),
    );
    let (addr, shutdown, handle) = serve(router, Duration::from_secs(5)).await;
    let in_flight = tokio::spawn(async move {
        reqwest::get(format!("http://{addr}/slow"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.trigger();
    assert_eq!(
        in_flight.await.unwrap(),
        "done",
        "the in-flight request completes"
    );
    handle.await.unwrap().unwrap();
    let refused = reqwest::Client::new()
        .get(format!("http://{addr}/slow"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(refused.is_err(), "no longer accepting");
}

#[tokio::test]
async fn the_drain_deadline_cuts_requests_that_never_finish() {
    let router = Router::new().route("/stuck", get(std::future::pending::<&'static str>));
    let (addr, shutdown, handle) = serve(router, Duration::from_millis(300)).await;
    tokio::spawn(async move { reqwest::get(format!("http://{addr}/stuck")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    shutdown.trigger();
    handle.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "waited for the deadline ({took:?})"
    );
    assert!(took < Duration::from_secs(3), "but not longer ({took:?})");
}

#[test]
fn incoming_traceparent_becomes_the_request_span_parent() {
    // A subscriber with the OpenTelemetry layer, as `telemetry::init` installs, but scoped
    // to this test's runtime thread.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The handler reports the trace context it runs in, as an outgoing call would carry it.
        let router = Router::new().route(
            "/echo",
            get(|| async {
                let mut headers = http::HeaderMap::new();
                keel_runtime::trace_context::inject_current(&mut headers);
                headers
                    .get("traceparent")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            }),
        );
        let (addr, shutdown, handle) = serve(router, Duration::from_secs(1)).await;
        let client = reqwest::Client::new();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let outgoing = client
            .get(format!("http://{addr}/echo"))
            .header("traceparent", traceparent)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let parts: Vec<&str> = outgoing.split('-').collect();
        assert_eq!(parts.len(), 4, "{outgoing:?}");
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(parts[2], "00f067aa0ba902b7", "a new span of our own");

        let fresh = client
            .get(format!("http://{addr}/echo"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            fresh.split('-').count(),
            4,
            "a trace is started when none comes in"
        );
        assert!(!fresh.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        shutdown.trigger();
        handle.await.unwrap().unwrap();
    });
}
