//! What a run measured, as a readable summary or as JSON, with the targets checked.

use std::collections::BTreeMap;
use std::fmt;

use keel_bench::prometheus::Sample;
use keel_bench::stats::LatencySummary;
use serde::Serialize;

/// Targets for the memory backend on the 2-core machine (issue: registry load harness).
const TARGET_CORES: f64 = 1.0;
const TARGET_PEAK_MB: f64 = 200.0;
const TARGET_WATCH_P99_MS: f64 = 50.0;
/// CPU going to other work (other processes, the kernel) above which a run's figures are
/// flagged as disturbed; an idle machine with loopback traffic stays well below it.
const DISTURBED_CORES: f64 = 0.25;

#[derive(Debug, Serialize)]
pub struct Report {
    pub registry: RegistryInfo,
    /// Cores of the machine, shared by the harness and the registry.
    pub machine_cores: usize,
    pub load: LoadInfo,
    pub registration: RegistrationReport,
    pub heartbeats: HeartbeatReport,
    pub watch: WatchReport,
    pub registry_process: ProcessReport,
    /// CPU of this harness over the sustained phase, in cores.
    pub harness_cpu_cores: f64,
    /// CPU of the whole machine over the sustained phase (registry, harness and anything
    /// else running), in cores.
    pub machine_cpu_cores: f64,
    pub final_state: FinalState,
    /// Time the registry spent per route, from its own `/metrics`.
    pub routes: Vec<RouteLoad>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
pub struct RegistryInfo {
    pub keel: String,
    pub pid: u32,
    pub url: String,
    pub backend: String,
}

#[derive(Debug, Serialize)]
pub struct LoadInfo {
    pub instances: usize,
    pub services: usize,
    /// One per watched service, written by the change generator.
    pub probe_instances: usize,
    pub watchers: usize,
    pub watched_services: usize,
    pub heartbeat_interval_s: f64,
    pub ttl_s: f64,
    pub duration_s: f64,
    pub change_rate: f64,
    pub register_concurrency: usize,
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct RegistrationReport {
    pub registered: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Option<LatencySummary>,
    /// Registry CPU during the registrations, in cores.
    pub registry_cores: f64,
}

#[derive(Debug, Serialize)]
pub struct HeartbeatReport {
    pub target_per_second: f64,
    pub sent: u64,
    pub acknowledged: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub sent_per_second: f64,
    pub acknowledged_per_second: f64,
    pub latency: Option<LatencySummary>,
}

#[derive(Debug, Serialize)]
pub struct WatchReport {
    pub changes_made: u64,
    pub changes_failed: u64,
    pub first_change_error: Option<String>,
    /// Acknowledged changes times the watchers of the changed service.
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// From just before the change request was sent to the watcher holding the parsed
    /// answer that carries the change.
    pub latency: Option<LatencySummary>,
    /// Round trip of the change requests themselves.
    pub change_write_latency: Option<LatencySummary>,
    /// Answers without a new change (waits that ran out, unplanned changes).
    pub other_answers: u64,
    pub watcher_errors: u64,
    pub first_watcher_error: Option<String>,
    /// The registry's own `keel_registry_watch_latency_seconds` mean (change to wake-up).
    pub registry_side_mean_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// Average over the sustained phase.
    pub cpu_cores: f64,
    /// Busiest one-second sample of the sustained phase.
    pub cpu_cores_max_1s: Option<f64>,
    pub rss_start_mb: f64,
    pub rss_after_registration_mb: f64,
    pub rss_end_mb: f64,
    /// `VmHWM` at the end: the highest resident set size over the whole run.
    pub peak_rss_mb: f64,
}

#[derive(Debug, Serialize)]
pub struct FinalState {
    pub instances: usize,
    pub passing: usize,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct RouteLoad {
    pub method: String,
    pub route: String,
    pub requests: u64,
    /// Answers with a 4xx or 5xx status.
    pub failed: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub what: &'static str,
    pub limit: f64,
    pub unit: &'static str,
    pub measured: Option<f64>,
    pub met: bool,
}

impl Target {
    fn below(what: &'static str, limit: f64, unit: &'static str, measured: Option<f64>) -> Self {
        Self {
            what,
            limit,
            unit,
            measured,
            met: measured.is_some_and(|m| m < limit),
        }
    }
}

/// The targets of the issue, checked against what was measured.
pub fn targets(process: &ProcessReport, watch: &WatchReport) -> Vec<Target> {
    vec![
        Target::below(
            "registry CPU, sustained average",
            TARGET_CORES,
            "cores",
            Some(process.cpu_cores),
        ),
        Target::below(
            "registry peak memory (VmHWM)",
            TARGET_PEAK_MB,
            "MB",
            Some(process.peak_rss_mb),
        ),
        Target::below(
            "watch latency p99",
            TARGET_WATCH_P99_MS,
            "ms",
            watch.latency.map(|l| l.p99_ms),
        ),
    ]
}

/// Requests and handler time per route from `http_server_request_duration_seconds`, most
/// requested first (time alone would put the blocking reads first, as it includes waits).
pub fn routes(samples: &[Sample]) -> Vec<RouteLoad> {
    const METRIC: &str = "http_server_request_duration_seconds";
    let mut by_route: BTreeMap<(String, String), RouteLoad> = BTreeMap::new();
    for sample in samples {
        let Some(suffix) = sample.name.strip_prefix(METRIC) else {
            continue;
        };
        let (Some(method), Some(route)) = (
            sample.label("http_request_method"),
            sample.label("http_route"),
        ) else {
            continue;
        };
        let failed = sample
            .label("http_response_status_code")
            .is_some_and(|code| code.starts_with('4') || code.starts_with('5'));
        let entry = by_route
            .entry((method.to_owned(), route.to_owned()))
            .or_insert_with(|| RouteLoad {
                method: method.to_owned(),
                route: route.to_owned(),
                requests: 0,
                failed: 0,
                seconds: 0.0,
            });
        match suffix {
            "_count" => {
                entry.requests += sample.value as u64;
                if failed {
                    entry.failed += sample.value as u64;
                }
            }
            "_sum" => entry.seconds += sample.value,
            _ => {}
        }
    }
    let mut routes: Vec<RouteLoad> = by_route.into_values().collect();
    routes.sort_by_key(|route| std::cmp::Reverse(route.requests));
    routes
}

/// Mean of a histogram from its `_sum` and `_count`.
pub fn histogram_mean_ms(samples: &[Sample], metric: &str) -> Option<f64> {
    let total = |suffix: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name.strip_prefix(metric) == Some(suffix))
            .map(|s| s.value)
            .sum()
    };
    let count = total("_count");
    (count > 0.0).then(|| total("_sum") / count * 1000.0)
}

// === text ===

/// `12345` as `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn latency(summary: &Option<LatencySummary>) -> String {
    match summary {
        Some(l) => format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            thousands(l.count as u64)
        ),
        None => "no samples".to_owned(),
    }
}

fn error(first: &Option<String>) -> String {
    first
        .as_ref()
        .map(|e| format!("\n                    first error: {e}"))
        .unwrap_or_default()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, l) = (&self.registry, &self.load);
        writeln!(f, "Keel registry load harness")?;
        writeln!(
            f,
            "  registry        {} backend, pid {} at {} ({})",
            r.backend, r.pid, r.url, r.keel
        )?;
        writeln!(
            f,
            "  machine         {} cores, shared by this harness and the registry; loopback only",
            self.machine_cores
        )?;
        writeln!(
            f,
            "  load            {} instances in {} services, TTL {}s, a heartbeat every {}s each",
            thousands(l.instances as u64),
            l.services,
            l.ttl_s,
            l.heartbeat_interval_s
        )?;
        writeln!(
            f,
            "                  {} watchers (blocking queries) on {} services, each with a probe instance",
            l.watchers, l.watched_services
        )?;
        writeln!(
            f,
            "                  sustained phase {}s with {} changes/s; at most {} heartbeats and {} registrations in flight",
            l.duration_s, l.change_rate, l.concurrency, l.register_concurrency
        )?;

        let g = &self.registration;
        writeln!(f, "\nregistration")?;
        writeln!(
            f,
            "  rate            {} /s ({} in {:.2} s, {} errors); registry CPU {:.2} cores{}",
            thousands(g.per_second.round() as u64),
            thousands(g.registered),
            g.seconds,
            g.errors,
            g.registry_cores,
            error(&g.first_error)
        )?;
        writeln!(f, "  latency         {}", latency(&g.latency))?;

        let h = &self.heartbeats;
        writeln!(f, "\nheartbeats (sustained phase)")?;
        writeln!(
            f,
            "  rate            {:.1} /s sent, {:.1} /s acknowledged (target {} /s; {} sent, {} ok, {} errors){}",
            h.sent_per_second,
            h.acknowledged_per_second,
            thousands(h.target_per_second.round() as u64),
            thousands(h.sent),
            thousands(h.acknowledged),
            h.errors,
            error(&h.first_error)
        )?;
        writeln!(f, "  latency         {}", latency(&h.latency))?;
        writeln!(
            f,
            "  at the end      {} of {} instances passing",
            thousands(self.final_state.passing as u64),
            thousands(self.final_state.instances as u64)
        )?;

        let w = &self.watch;
        writeln!(
            f,
            "\nwatch latency (change request sent -> watcher holds the parsed answer)"
        )?;
        writeln!(f, "  latency         {}", latency(&w.latency))?;
        writeln!(
            f,
            "  deliveries      {} of {} expected ({} changes made, {} failed){}",
            thousands(w.deliveries),
            thousands(w.expected_deliveries),
            thousands(w.changes_made),
            w.changes_failed,
            error(&w.first_change_error)
        )?;
        writeln!(f, "  change writes   {}", latency(&w.change_write_latency))?;
        if let Some(mean) = w.registry_side_mean_ms {
            writeln!(
                f,
                "  registry side   mean {mean:.2} ms from the change to waking the watcher"
            )?;
        }
        writeln!(
            f,
            "  other answers   {} (waits that ran out or unplanned changes); {} watcher errors{}",
            w.other_answers,
            w.watcher_errors,
            error(&w.first_watcher_error)
        )?;

        let p = &self.registry_process;
        writeln!(f, "\nregistry process (pid {})", p.pid)?;
        let max = p
            .cpu_cores_max_1s
            .map(|m| format!(", busiest second {m:.2}"))
            .unwrap_or_default();
        writeln!(
            f,
            "  CPU             {:.2} cores average over the sustained phase{max}",
            p.cpu_cores
        )?;
        writeln!(
            f,
            "  memory          peak {:.1} MB (VmHWM); RSS {:.1} MB at start, {:.1} MB after registration, {:.1} MB at the end",
            p.peak_rss_mb, p.rss_start_mb, p.rss_after_registration_mb, p.rss_end_mb
        )?;
        let others = (self.machine_cpu_cores - p.cpu_cores - self.harness_cpu_cores).max(0.0);
        writeln!(
            f,
            "  machine CPU     {:.2} cores busy over the sustained phase: registry {:.2}, harness {:.2}, the rest {:.2} (kernel, other processes)",
            self.machine_cpu_cores, p.cpu_cores, self.harness_cpu_cores, others
        )?;
        if others > DISTURBED_CORES {
            writeln!(
                f,
                "  WARNING         {others:.2} cores went to other work during the run; its figures may be disturbed"
            )?;
        }

        writeln!(f, "\ntargets")?;
        for t in &self.targets {
            let measured = t.measured.map_or_else(
                || "not measured".to_owned(),
                |m| format!("{m:.2} {}", t.unit),
            );
            let verdict = match t.measured {
                Some(_) if t.met => "met".to_owned(),
                Some(m) => format!(
                    "MISSED by {:.2} {} ({:.0}%)",
                    m - t.limit,
                    t.unit,
                    (m - t.limit) / t.limit * 100.0
                ),
                None => "MISSED (nothing measured)".to_owned(),
            };
            writeln!(
                f,
                "  {:<34} < {:<10} {:<14} {verdict}",
                t.what,
                format!("{} {}", t.limit, t.unit),
                measured
            )?;
        }

        writeln!(
            f,
            "\nregistry time by route (its /metrics; blocking reads include their wait)"
        )?;
        for route in &self.routes {
            let mean_ms = if route.requests > 0 {
                route.seconds / route.requests as f64 * 1000.0
            } else {
                0.0
            };
            writeln!(
                f,
                "  {:<6} {:<48} {:>9} requests {:>6} failed {:>10.2} s {:>9.3} ms mean",
                route.method,
                route.route,
                thousands(route.requests),
                route.failed,
                route.seconds,
                mean_ms
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_bench::prometheus::parse;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(60_012), "60,012");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn route_time_is_summed_over_status_codes() {
        let samples = parse(
            "http_server_request_duration_seconds_count{http_request_method=\"PUT\",http_route=\"/a/{id}\",http_response_status_code=\"200\"} 90\n\
             http_server_request_duration_seconds_count{http_request_method=\"PUT\",http_route=\"/a/{id}\",http_response_status_code=\"404\"} 10\n\
             http_server_request_duration_seconds_sum{http_request_method=\"PUT\",http_route=\"/a/{id}\",http_response_status_code=\"200\"} 0.5\n\
             http_server_request_duration_seconds_sum{http_request_method=\"PUT\",http_route=\"/a/{id}\",http_response_status_code=\"404\"} 0.25\n\
             http_server_request_duration_seconds_bucket{http_request_method=\"GET\",http_route=\"/b\",http_response_status_code=\"200\",le=\"0.1\"} 3\n\
             http_server_request_duration_seconds_count{http_request_method=\"GET\",http_route=\"/b\",http_response_status_code=\"200\"} 3\n\
             http_server_request_duration_seconds_sum{http_request_method=\"GET\",http_route=\"/b\",http_response_status_code=\"200\"} 2\n",
        );
        let routes = routes(&samples);
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].route, "/a/{id}");
        assert_eq!(routes[0].requests, 100);
        assert_eq!(routes[0].failed, 10);
        assert_eq!(routes[0].seconds, 0.75);
        assert_eq!(routes[1].route, "/b");
        assert_eq!(routes[1].requests, 3);
    }

    #[test]
    fn histogram_means_come_from_sum_and_count() {
        let samples =
            parse("w_seconds_sum 0.3\nw_seconds_count 100\nw_seconds_bucket{le=\"1\"} 100\n");
        let mean = histogram_mean_ms(&samples, "w_seconds").unwrap();
        assert!((mean - 3.0).abs() < 1e-9);
        assert_eq!(histogram_mean_ms(&samples, "other_seconds"), None);
    }
}
