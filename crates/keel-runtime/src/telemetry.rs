//! Logs and traces, initialised once per process.
//!
//! Logs are JSON lines (production) or readable text (a terminal); each line carries the
//! service, the instance id and, inside a span, the W3C trace and span ids. Spans become
//! OpenTelemetry spans, exported over OTLP/HTTP when an endpoint is configured; without one
//! they still get ids, so logs and propagated `traceparent` headers agree.

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log and trace settings (`[telemetry]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `auto` (text on a terminal, JSON otherwise), `json` or `text`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,keel_registry=debug`.
    pub log_level: String,
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`); no export when unset.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0 to 1.0; a sampled parent is always followed.
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Auto,
            log_level: "info".to_owned(),
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid telemetry.log_level {0:?}: {1}")]
    Filter(String, String),
    #[error("cannot build the OTLP exporter for {0}: {1}")]
    Exporter(String, String),
    #[error("a global subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes pending spans.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes and stops trace export; call once, after servers have drained.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry flush failed: {error}");
        }
    }
}

/// How often a failing trace export is reported at most.
const EXPORT_FAILURE_REPORTS: std::time::Duration = std::time::Duration::from_secs(60);

/// The exporter's HTTP client, reporting failed exports: the OTLP exporter says nothing
/// itself (opentelemetry's internal logs are off), so a collector that is down, refuses
/// the path or wants credentials would go unnoticed while every span is dropped. One
/// warning per [`EXPORT_FAILURE_REPORTS`] at most, counting those not reported.
#[derive(Debug)]
struct ReportingClient {
    inner: reqwest::blocking::Client,
    url: String,
    /// When the last warning went out, and the failures since.
    failures: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl ReportingClient {
    fn new(inner: reqwest::blocking::Client, url: String) -> Self {
        Self {
            inner,
            url,
            failures: std::sync::Mutex::default(),
        }
    }

    fn report(&self, failure: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, unreported) = &mut *failures;
        *unreported += 1;
        if last.is_some_and(|at| at.elapsed() < EXPORT_FAILURE_REPORTS) {
            return;
        }
        tracing::warn!(
            url = %self.url,
            error = failure,
            failed_exports = *unreported,
            "trace export failed: spans are being dropped"
        );
        *last = Some(std::time::Instant::now());
        *unreported = 0;
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ReportingClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let result = self.inner.send_bytes(request).await;
        match &result {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => self.report(&format!("HTTP {}", response.status())),
            Err(error) => self.report(&crate::http_client::error_chain(&**error)),
        }
        result
    }
}

/// How long one export may take (the OTLP exporter's default, `OTEL_EXPORTER_OTLP_TIMEOUT`).
const OTLP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

static EXPORTING_TRACES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans leave the process (an OTLP endpoint is configured). Hot paths that only
/// open a span for the trace (the gateway's per-request span) skip it when nothing would
/// receive it, and let `traceparent` pass through untouched instead.
pub fn exporting_traces() -> bool {
    EXPORTING_TRACES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber, tracer provider and W3C propagator.
pub fn init(
    config: &TelemetryConfig,
    service: &str,
    instance: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.log_level)
        .map_err(|error| TelemetryError::Filter(config.log_level.clone(), error.to_string()))?;

    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance.to_owned(),
        ))
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        config.sample_ratio.clamp(0.0, 1.0),
    )));
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler);
    if let Some(endpoint) = &config.otlp_endpoint {
        EXPORTING_TRACES.store(true, std::sync::atomic::Ordering::Relaxed);
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        // The exporter's own client would be reqwest's default one, which has no crypto
        // provider and none of the configured roots. Built on a thread of its own, as
        // reqwest's blocking client cannot be made on an async runtime's thread.
        let client = std::thread::spawn(|| {
            crate::http_client::blocking_builder()
                .timeout(OTLP_TIMEOUT)
                .build()
        })
        .join()
        .map_err(|_| TelemetryError::Exporter(url.clone(), "its HTTP client panicked".into()))?
        .map_err(|error| TelemetryError::Exporter(url.clone(), error.to_string()))?;
        let client = ReportingClient::new(client, url.clone());
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url.clone())
            .build()
            .map_err(|error| TelemetryError::Exporter(url, error.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer("keel");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());

    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    subscriber(tracer, filter, json, service, instance, std::io::stderr)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// The process's subscriber: OpenTelemetry spans at info and above, log lines (JSON or
/// text, to `writer`) as `filter` says, and the handle the formatters find the dispatcher
/// through.
///
/// The handle rides inside the log lines' filter: on its own, unfiltered, a layer counts as
/// wanting every level (the level hint becomes "trace", and every `debug!` and `trace!` of
/// every crate asks the filters at each hit instead of being skipped by the macro's level
/// check); with a filter of its own that refuses everything, its "never" turns the others'
/// "always" into "sometimes" (every enabled callsite asks the filters at each hit).
fn subscriber<W>(
    tracer: SdkTracer,
    filter: EnvFilter,
    json: bool,
    service: &str,
    instance: &str,
    writer: W,
) -> impl Subscriber + Send + Sync + for<'a> LookupSpan<'a>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let dispatch = DispatchHandle::default();
    let identity = Identity {
        service: service.to_owned(),
        instance: instance.to_owned(),
        dispatch: dispatch.clone(),
    };
    let fmt_layer = if json {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines(identity))
            .and_then(dispatch)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .event_format(TextLines {
                inner: tracing_subscriber::fmt::format().compact(),
                dispatch: dispatch.clone(),
            })
            .and_then(dispatch)
            .boxed()
    };
    // The log level filters log lines only: traces keep every span at info and above, so a
    // quiet `log_level = "warn"` does not empty the traces (nor the ids in log lines).
    tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(LevelFilter::INFO),
        )
        .with(fmt_layer.with_filter(filter))
}

/// A handle on the dispatcher the formatters run in.
///
/// A formatter runs inside the dispatcher, where `Span::current()` cannot reach it (tracing
/// guards against re-entry and answers with no dispatcher), so the OpenTelemetry context of
/// the event's span is looked up through this handle instead, captured at registration.
#[derive(Clone, Default)]
struct DispatchHandle(Arc<OnceLock<WeakDispatch>>);

impl<S: Subscriber> Layer<S> for DispatchHandle {
    fn on_register_dispatch(&self, dispatch: &Dispatch) {
        let _ = self.0.set(dispatch.downgrade());
    }
}

impl DispatchHandle {
    /// The W3C trace and span ids of the event's innermost span, when it has a valid context.
    fn trace_ids<S, N>(&self, ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        let span = ctx.event_scope()?.next()?;
        let dispatch = self.0.get()?.upgrade()?;
        let context = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
        let otel_span = context.span();
        let span_context = otel_span.span_context();
        span_context.is_valid().then(|| {
            (
                span_context.trace_id().to_string(),
                span_context.span_id().to_string(),
            )
        })
    }
}

struct Identity {
    service: String,
    instance: String,
    dispatch: DispatchHandle,
}

// === impl JsonLines ===

/// One JSON object per line: timestamp, level, target, message, the event's fields, the
/// fields of the spans in scope, service, instance, trace_id and span_id.
struct JsonLines(Identity);

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        let mut fields = FieldMap(Map::new());
        event.record(&mut fields);
        if let Some(message) = fields.0.remove("message") {
            line.insert("message".into(), message);
        }
        if let Some(scope) = ctx.event_scope() {
            let mut span_fields = Map::new();
            let mut leaf = None;
            for span in scope.from_root() {
                leaf = Some(span.name());
                if let Some(formatted) = span.extensions().get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(formatted)
                {
                    span_fields.extend(map);
                }
            }
            if let Some(name) = leaf {
                span_fields.insert("name".into(), Value::String(name.to_owned()));
                line.insert("span".into(), Value::Object(span_fields));
            }
        }
        line.extend(fields.0);
        line.insert("service".into(), Value::String(self.0.service.clone()));
        line.insert("instance".into(), Value::String(self.0.instance.clone()));
        if let Some((trace_id, span_id)) = self.0.dispatch.trace_ids(ctx) {
            line.insert("trace_id".into(), Value::String(trace_id));
            line.insert("span_id".into(), Value::String(span_id));
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct FieldMap(Map<String, Value>);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
}

// === impl TextLines ===

/// tracing's compact text format, prefixed with a short trace id inside a span so that
/// lines of one request can be picked out in a terminal.
struct TextLines<F> {
    inner: F,
    dispatch: DispatchHandle,
}

impl<S, N, F> FormatEvent<S, N> for TextLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some((trace_id, _)) = self.dispatch.trace_ids(ctx) {
            write!(writer, "[{}] ", &trace_id[..8])?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        /// What was written, and its lines parsed as JSON.
        fn lines(&self) -> (String, Vec<Value>) {
            let output = String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf8");
            let lines = output
                .lines()
                .map(|line| serde_json::from_str(line).expect("each line is JSON"))
                .collect();
            (output, lines)
        }
    }

    /// The process's subscriber at `info`, its JSON lines written to the buffer.
    fn json_to_buffer() -> (Buffer, impl Subscriber + Send + Sync) {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = subscriber(
            provider.tracer("test"),
            EnvFilter::new("info"),
            true,
            "registry",
            "i-1",
            move || writer.clone(),
        );
        (buffer, subscriber)
    }

    #[test]
    fn json_lines_carry_identity_fields_and_trace_ids() {
        let (buffer, subscriber) = json_to_buffer();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(answer = 42, "outside");
            let span = tracing::info_span!("request", route = "/v1/services");
            let _entered = span.enter();
            tracing::info!("inside");
        });
        let (_, lines) = buffer.lines();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["message"], "outside");
        assert_eq!(lines[0]["answer"], 42);
        assert_eq!(lines[0]["service"], "registry");
        assert_eq!(lines[0]["instance"], "i-1");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["span"]["route"], "/v1/services");
        let trace_id = lines[1]["trace_id"]
            .as_str()
            .expect("trace id inside a span");
        assert_eq!(trace_id.len(), 32);
        assert_eq!(lines[1]["span_id"].as_str().map(str::len), Some(16));
    }

    /// A failed export is logged (the collector's address and why), once a minute at most.
    #[test]
    fn failed_exports_are_reported_once_a_minute_with_their_count() {
        use opentelemetry_http::HttpClient as _;
        let (buffer, subscriber) = json_to_buffer();
        // A port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/v1/traces", closed.local_addr().expect("addr"));
        drop(closed);
        let client = ReportingClient::new(
            crate::http_client::blocking_builder()
                .build()
                .expect("client"),
            url.clone(),
        );
        let export = || {
            let request = http::Request::post(&url)
                .body(bytes::Bytes::from_static(b"spans"))
                .expect("request");
            // The blocking client answers within the first poll.
            let mut sending = std::pin::pin!(client.send_bytes(request));
            let polled = sending
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            assert!(matches!(polled, std::task::Poll::Ready(Err(_))));
        };
        tracing::subscriber::with_default(subscriber, || {
            export();
            export();
            export();
        });
        let (output, lines) = buffer.lines();
        assert_eq!(lines.len(), 1, "{output}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["url"], url.as_str());
        assert_eq!(lines[0]["failed_exports"], 1);
        let error = lines[0]["error"].as_str().expect("error");
        assert!(error.to_lowercase().contains("connect"), "{error}");
        let pending = client.failures.lock().expect("lock").1;
        assert_eq!(
            pending, 2,
            "the two failures since are counted for the next report"
        );
    }

    /// The process's subscriber with log lines from `level`, written nowhere.
    fn silent(level: &str) -> impl Subscriber + Send + Sync {
        let provider = SdkTracerProvider::builder().build();
        let filter = EnvFilter::new(level);
        let tracer = provider.tracer("test");
        subscriber(tracer, filter, true, "s", "i", std::io::sink)
    }

    #[test]
    fn levels_below_every_filter_are_skipped_at_the_macro() {
        // Spans at info for the traces, though log lines only from warn.
        let hint = |level: &str| silent(level).max_level_hint();
        assert_eq!(hint("warn"), Some(LevelFilter::INFO));
        assert_eq!(hint("info,keel_registry=debug"), Some(LevelFilter::DEBUG));
    }

    #[test]
    fn enabled_callsites_do_not_ask_the_filters_at_each_hit() {
        let dispatch = Dispatch::new(silent("info"));
        let info = tracing::dispatcher::with_default(&dispatch, || {
            tracing::info_span!("probe").metadata()
        })
        .expect("an enabled span has its metadata");
        // "Sometimes" would make every hit ask every filter again.
        assert!(dispatch.register_callsite(info).is_always());
    }
}
