//! Trace export: with `telemetry.otlp_endpoint` set, spans reach an OTLP/HTTP collector.
//! Its own test binary, as `telemetry::init` installs the process-wide subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use http::HeaderMap;
use keel_runtime::telemetry::{self, LogFormat, TelemetryConfig};
use keel_testkit::tls::{TestCa, TlsFront};

type Received = Arc<Mutex<Vec<(String, usize)>>>;

/// A collector endpoint that records what it is sent: (content type, body size) per POST.
async fn collector() -> (std::net::SocketAddr, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(received): State<Received>, headers: HeaderMap, body: Bytes| async move {
                    let kind = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    received.lock().unwrap().push((kind, body.len()));
                    ""
                },
            ),
        )
        .with_state(Arc::clone(&received));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

/// Starts telemetry exporting to `endpoint`, records a span and flushes it.
async fn export_one_span(endpoint: String) {
    let config = TelemetryConfig {
        log_format: LogFormat::Json,
        log_level: "warn".into(),
        otlp_endpoint: Some(endpoint),
        sample_ratio: 1.0,
    };
    let guard = telemetry::init(&config, "otlp-test", "i-1").unwrap();
    {
        let span = tracing::info_span!("exported work", answer = 42);
        let _entered = span.enter();
        tracing::debug!("inside");
    }
    // Shutdown flushes the batch; the exporter's blocking client runs on its own thread.
    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_to_the_configured_collector() {
    let (addr, received) = collector().await;
    export_one_span(format!("http://{addr}")).await;
    let received = received.lock().unwrap().clone();
    assert!(!received.is_empty(), "the collector received the spans");
    let (kind, size) = &received[0];
    assert_eq!(kind, "application/x-protobuf");
    assert!(*size > 0);
}

/// A collector behind HTTPS, with a certificate from a CA the process was told to trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_whose_ca_is_trusted() {
    let (addr, received) = collector().await;
    let ca = TestCa::new();
    let front = TlsFront::to(&ca, addr).await;
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();
    export_one_span(front.url()).await;
    let received = received.lock().unwrap().clone();
    assert!(
        !received.is_empty(),
        "the collector received the spans over HTTPS"
    );
    assert_eq!(received[0].0, "application/x-protobuf");
}
