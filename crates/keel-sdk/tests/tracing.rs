//! With traces exported, one trace runs from an HTTP call through the event bus: the
//! envelope carries the publisher's `traceparent`, the consumer's span continues it, and
//! the service client hands it on to the service it calls. Its own test binary, as
//! `telemetry::init` installs the process-wide subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::routing::{any, post};
use keel_runtime::Shutdown;
use keel_runtime::telemetry::{self, LogFormat, TelemetryConfig};
use keel_sdk::client::{Call, ClientOptions, Instances, ServiceClient};
use keel_sdk::events::{Bus, Event, Handler, HandlerError, Received};
use keel_sdk::{Database, Migrations, Tx};
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Pinged {
    id: String,
}

impl Event for Pinged {
    const TYPE: &'static str = "keel.test.pinged.v1";
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// Notes the trace id of the span it runs in.
struct Note(Arc<Mutex<Vec<String>>>);

impl Handler<Pinged> for Note {
    async fn handle(&self, _: &mut Tx, _: Received<Pinged>) -> Result<(), HandlerError> {
        let context = tracing::Span::current().context();
        let trace = context.span().span_context().trace_id().to_string();
        self.0.lock().unwrap().push(trace);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_through_the_outbox_the_consumer_and_outgoing_calls() {
    let collector = serve(Router::new().route("/v1/traces", post(|| async { "" }))).await;
    let guard = telemetry::init(
        &TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "warn".into(),
            otlp_endpoint: Some(collector),
            sample_ratio: 1.0,
        },
        "sdk-trace-test",
        "i-1",
    )
    .unwrap();

    let file = keel_testkit::TestSqlite::new("keel-sdk-trace");
    let db = Database::connect(&file.url(), &Migrations::none())
        .await
        .unwrap();
    let bus = Bus::in_process("pinger");
    let noted = Arc::new(Mutex::new(Vec::new()));
    let consumer = bus
        .consumer("pinged", &db)
        .on::<Pinged, _>(Note(noted.clone()))
        .start()
        .await
        .unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(consumer.run(shutdown.clone()));
    tokio::spawn(bus.relay(&db).run(shutdown.clone()));

    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = serve(Router::new().fallback(any({
        let seen = seen.clone();
        move |request: Request| async move {
            let traceparent = request.headers().get("traceparent").cloned();
            seen.lock()
                .unwrap()
                .push(traceparent.map(|v| v.to_str().unwrap().to_owned()));
            "ok"
        }
    })))
    .await;
    let client = ServiceClient::new(
        "pong",
        Instances::Static(vec![upstream]),
        ClientOptions::default(),
    )
    .unwrap();

    // A request's span, continuing a caller's trace: it stages an event and calls out.
    let span = tracing::info_span!("request");
    let parent = keel_runtime::trace_context::extract_fields(
        Some(&format!("00-{TRACE}-00f067aa0ba902b7-01")),
        None,
    );
    let _ = span.set_parent(parent);
    async {
        let mut tx = db.begin().await.unwrap();
        bus.stage(&mut tx, &Pinged { id: "p-1".into() })
            .await
            .unwrap();
        tx.commit().await.unwrap();
        client
            .call(Call::new(http::Method::GET, "/pong"))
            .await
            .unwrap();
    }
    .instrument(span)
    .await;

    for _ in 0..200 {
        if !noted.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        *noted.lock().unwrap(),
        [TRACE],
        "the consumer continues the trace"
    );
    let seen = seen.lock().unwrap().clone();
    let traceparent = seen[0].clone().expect("the call carries a traceparent");
    assert!(traceparent.contains(TRACE), "{traceparent}");
    shutdown.trigger();
    guard.shutdown();
}
