//! The process-wide Prometheus recorder and the HTTP server metrics layer.
//!
//! Names and labels follow the OpenTelemetry semantic conventions as Prometheus renders
//! them: `http_server_request_duration_seconds{http_request_method, http_route,
//! http_response_status_code}` and `http_server_active_requests{http_request_method}`.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The histogram buckets (seconds) of every `*_seconds` metric: OpenTelemetry's default
/// HTTP duration buckets, extended down to 1 ms for fast in-memory endpoints.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    30.0, 60.0,
];

struct Exporter {
    handle: Option<PrometheusHandle>,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

fn exporter() -> &'static Exporter {
    EXPORTER.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
            .and_then(PrometheusBuilder::install_recorder);
        let handle = match handle {
            Ok(handle) => {
                spawn_upkeep(handle.clone());
                Some(handle)
            }
            Err(error) => {
                // Another recorder was installed first (an embedding application's own);
                // its exposition is then theirs to serve.
                tracing::warn!(%error, "Prometheus recorder not installed");
                None
            }
        };
        let process = metrics_process::Collector::default();
        process.describe();
        Exporter { handle, process }
    })
}

/// Histogram samples wait in a queue until upkeep folds them into buckets: without it they
/// pile up between scrapes (two samples per proxied request: 800 KB/s at 50k req/s, and
/// without end if nothing scrapes). A thread of its own, so request threads never stall
/// on a fold of seconds' worth of samples.
fn spawn_upkeep(handle: PrometheusHandle) {
    const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
    let spawned = std::thread::Builder::new()
        .name("keel-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "metrics upkeep thread not started; samples fold at scrapes only");
    }
}

/// Installs the process-wide recorder; every server calls this before recording anything.
pub fn install() {
    exporter();
}

/// The Prometheus text exposition of every metric recorded in this process.
pub fn render() -> String {
    let exporter = exporter();
    exporter.process.collect();
    match &exporter.handle {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// Route label for requests that matched no route: a fixed value, never the raw path, so
/// hostile paths cannot grow the label set.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Records request duration and in-flight requests by method, route template and status.
pub async fn http_metrics(request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| path.as_str().to_owned(),
    );
    let in_flight = InFlight::start(metrics::gauge!(
        "http_server_active_requests",
        "http_request_method" => method.clone()
    ));
    let started = Instant::now();
    let response = next.run(request).await;
    drop(in_flight);
    metrics::histogram!(
        "http_server_request_duration_seconds",
        "http_request_method" => method,
        "http_route" => route,
        "http_response_status_code" => response.status().as_str().to_owned(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Counts a request in flight until dropped, so a request whose client went away (its
/// future dropped mid-way) is still counted out.
struct InFlight(metrics::Gauge);

impl InFlight {
    fn start(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
