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

type Received = Arc<Mutex<Vec<(String, usize)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_to_the_configured_collector() {
    // A collector endpoint that records what it is sent.
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

    let config = TelemetryConfig {
        log_format: LogFormat::Json,
        log_level: "warn".into(),
        otlp_endpoint: Some(format!("http://{addr}")),
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
    let received = received.lock().unwrap().clone();
    assert!(!received.is_empty(), "the collector received the spans");
    let (kind, size) = &received[0];
    assert_eq!(kind, "application/x-protobuf");
    assert!(*size > 0);
}
