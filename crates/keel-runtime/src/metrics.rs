//! The process-wide Prometheus recorder and the HTTP server metrics layer.
//!
//! Names and labels follow the OpenTelemetry semantic conventions as Prometheus renders
//! them: `http_server_request_duration_seconds{http_request_method, http_route,
//! http_response_status_code}` and `http_server_active_requests{http_request_method}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::Method;
use metrics::SharedString;
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
    let mut text = match &exporter.handle {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    };
    render_bucketed(&mut text);
    text
}

// === bucketed histograms ===

/// A `*_seconds` histogram counted straight into its buckets, for per-request hot paths:
/// the recorder's histograms queue every sample until upkeep folds them (two samples per
/// proxied request cost ~400 instructions each, and the folds stalled the event loop's
/// core). Same name, labels and buckets as a recorder histogram would have.
struct Bucketed {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    /// Per bucket of [`DURATION_BUCKETS`], then +Inf; not cumulative.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl metrics::HistogramFn for Bucketed {
    fn record(&self, seconds: f64) {
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // Saturating float-to-int cast: negative or NaN counts as 0.
        self.sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }
}

type BucketedKey = (&'static str, Vec<(&'static str, String)>);

static BUCKETED: OnceLock<Mutex<BTreeMap<BucketedKey, Arc<Bucketed>>>> = OnceLock::new();

/// A duration histogram (`name` ends in `_seconds`) recorded into bucket counters; one per
/// name and labels, however often it is asked for (configuration generations ask again).
pub fn duration_histogram(
    name: &'static str,
    labels: Vec<(&'static str, String)>,
) -> metrics::Histogram {
    let registry = BUCKETED.get_or_init(Mutex::default);
    let mut registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let key = (name, labels);
    let histogram = match registry.get(&key) {
        Some(histogram) => Arc::clone(histogram),
        None => {
            let histogram = Arc::new(Bucketed {
                name,
                labels: key.1.clone(),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_nanos: AtomicU64::new(0),
            });
            registry.insert(key, Arc::clone(&histogram));
            histogram
        }
    };
    metrics::Histogram::from_arc(histogram)
}

fn render_bucketed(text: &mut String) {
    use std::fmt::Write as _;
    let Some(registry) = BUCKETED.get() else {
        return;
    };
    let registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let mut typed = None;
    for histogram in registry.values() {
        if typed != Some(histogram.name) {
            typed = Some(histogram.name);
            let _ = writeln!(text, "# TYPE {} histogram", histogram.name);
        }
        let mut labels = String::new();
        for (name, value) in &histogram.labels {
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(labels, "{name}=\"{value}\",");
        }
        let mut count = 0;
        let bounds = DURATION_BUCKETS.iter().map(|b| b.to_string());
        for (bucket, le) in histogram.buckets.iter().zip(bounds.chain(["+Inf".into()])) {
            count += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                text,
                "{}_bucket{{{labels}le=\"{le}\"}} {count}",
                histogram.name
            );
        }
        let labels = labels.trim_end_matches(',');
        let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(text, "{}_sum{{{labels}}} {sum}", histogram.name);
        let _ = writeln!(text, "{}_count{{{labels}}} {count}", histogram.name);
    }
}

/// Route label for requests that matched no route: a fixed value, never the raw path, so
/// hostile paths cannot grow the label set.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The method as a label: the standard ones by name, any other `_OTHER` (OpenTelemetry's
/// HTTP conventions), so that invented methods cannot grow the label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// Records request duration and in-flight requests by component (which server: `keel up`
/// runs several in one process, one recorder), method, route template and status.
pub async fn http_metrics(
    State(component): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    let method = method_label(request.method());
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| path.as_str().to_owned(),
    );
    let in_flight = InFlight::start(metrics::gauge!(
        "http_server_active_requests",
        "component" => SharedString::from(Arc::clone(&component)),
        "http_request_method" => method
    ));
    let started = Instant::now();
    let response = next.run(request).await;
    drop(in_flight);
    metrics::histogram!(
        "http_server_request_duration_seconds",
        "component" => SharedString::from(component),
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

#[cfg(test)]
mod bucketed_tests {
    use super::*;

    #[test]
    fn bucketed_histograms_render_cumulative_buckets_once_per_label_set() {
        let name = "keel_test_bucketed_seconds";
        let fast = duration_histogram(name, vec![("route", "a\"b".to_owned())]);
        fast.record(0.0005);
        fast.record(0.02);
        fast.record(100.0);
        // Asked for again (a new configuration generation): the same counters.
        duration_histogram(name, vec![("route", "a\"b".to_owned())]).record(0.02);
        duration_histogram(name, vec![("route", "other".to_owned())]).record(1.0);
        let mut text = String::new();
        render_bucketed(&mut text);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} in {text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let labels = r#"route="a\"b""#;
        assert_eq!(
            line(&format!("{name}_bucket{{{labels},le=\"0.001\"}}")),
            "1"
        );
        assert_eq!(
            line(&format!("{name}_bucket{{{labels},le=\"0.025\"}}")),
            "3"
        );
        assert_eq!(line(&format!("{name}_bucket{{{labels},le=\"60\"}}")), "3");
        assert_eq!(line(&format!("{name}_bucket{{{labels},le=\"+Inf\"}}")), "4");
        assert_eq!(line(&format!("{name}_count{{{labels}}}")), "4");
        let sum: f64 = line(&format!("{name}_sum{{{labels}}}")).parse().unwrap();
        assert!((sum - 100.0405).abs() < 1e-6, "{sum}");
        assert_eq!(line(&format!("{name}_count{{route=\"other\"}}")), "1");
        assert_eq!(text.matches(&format!("# TYPE {name} histogram")).count(), 1);
    }
}
