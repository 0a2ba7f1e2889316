//! With traces exported, one trace runs from an HTTP call through the event bus (on every
//! transport: in process, RabbitMQ, Kafka): the envelope carries the publisher's
//! `traceparent`, the consumer's span continues it, and the service client hands it on to
//! the service it calls. Its own test binary, as `telemetry::init` installs the
//! process-wide subscriber.

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

/// A request's span, continuing a caller's trace.
fn request_span() -> tracing::Span {
    let span = tracing::info_span!("request");
    let parent = keel_runtime::trace_context::extract_fields(
        Some(&format!("00-{TRACE}-00f067aa0ba902b7-01")),
        None,
    );
    let _ = span.set_parent(parent);
    span
}

/// A bus on every transport there is, each on an exchange or namespace of its own.
async fn buses() -> Vec<Bus> {
    use keel_testkit::{Service, require, unique_name};
    let mut buses = vec![Bus::in_process("pinger")];
    if require(Service::RabbitMq) {
        let options = keel_sdk::events::RabbitMqOptions {
            exchange: unique_name("keel-test"),
            queue_expiry: Some(Duration::from_secs(120)),
            auto_delete_exchange: true,
            ..keel_sdk::events::RabbitMqOptions::default()
        };
        buses.push(Bus::rabbitmq("pinger", options).await.unwrap());
    }
    #[cfg(feature = "kafka")]
    if require(Service::Kafka) {
        let options = keel_sdk::events::KafkaOptions {
            namespace: unique_name("keel-test"),
            fetch_wait: keel_testkit::KAFKA_FETCH_WAIT,
            ..keel_sdk::events::KafkaOptions::default()
        };
        buses.push(Bus::kafka("pinger", options).await.unwrap());
    }
    buses
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
    for bus in buses().await {
        let what = format!("the bus on {:?}", bus.exchange());
        let noted = Arc::new(Mutex::new(Vec::new()));
        let consumer = bus
            .consumer("pinged", &db)
            .on::<Pinged, _>(Note(noted.clone()))
            .start()
            .await
            .unwrap();
        let stop = Shutdown::new();
        tokio::spawn(consumer.run(stop.clone()));
        tokio::spawn(bus.relay(&db).run(stop.clone()));
        async {
            let mut tx = db.begin().await.unwrap();
            bus.stage(&mut tx, &Pinged { id: "p-1".into() })
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(request_span())
        .await;
        for _ in 0..400 {
            if !noted.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(
            *noted.lock().unwrap(),
            [TRACE],
            "{what}: the consumer continues the trace"
        );
        stop.trigger();
    }

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

    client
        .call(Call::new(http::Method::GET, "/pong"))
        .instrument(request_span())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let traceparent = seen[0].clone().expect("the call carries a traceparent");
    assert!(traceparent.contains(TRACE), "{traceparent}");
    guard.shutdown();
}
