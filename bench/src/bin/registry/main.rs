//! `registry`: load harness for Keel's service registry.
//!
//! Starts `keel registry` as its own process on a free loopback port, registers instances,
//! keeps them heartbeating while watchers hold blocking queries and a change generator makes
//! changes they must see, then reports throughput, change-to-watcher latency and the
//! registry process's CPU and peak memory. Results are recorded in `bench/README.md`.

mod load;
mod process;
mod report;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use keel_bench::procfs::{self, ProcessSample};
use keel_bench::{prometheus, stats::LatencySummary};
use keel_registry::client::RegistryClient;
use keel_runtime::Shutdown;

use crate::load::Plan;
use crate::process::{Launch, RegistryProcess};
use crate::report::{
    FinalState, HeartbeatReport, LoadInfo, ProcessReport, RegistrationReport, RegistryInfo, Report,
    WatchReport,
};

/// How long watchers keep listening after the last change, so it can still arrive.
const DELIVERY_GRACE: Duration = Duration::from_secs(2);

/// Load harness for the Keel service registry: registrations/s, sustained heartbeats/s,
/// change-to-watcher latency, and the registry process's CPU and peak memory.
///
/// The registry runs as a separate process on 127.0.0.1 and shares the machine's cores with
/// this harness.
#[derive(Debug, Parser)]
#[command(name = "registry", version)]
struct Cli {
    #[command(flatten)]
    launch: Launch,
    #[command(flatten)]
    plan: Plan,
    /// Print the report as JSON instead of text
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match measure(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the load and prints the report; a missed target is a finding, not a failure.
async fn measure(cli: &Cli) -> anyhow::Result<()> {
    cli.plan.validate()?;
    let report = run(&cli.launch, &cli.plan).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

async fn run(launch: &Launch, plan: &Plan) -> anyhow::Result<Report> {
    let hz = procfs::clock_ticks_per_second();
    let registry = RegistryProcess::start(launch).await?;
    eprintln!(
        "registry: {} backend, pid {}, {}",
        registry.backend,
        registry.pid(),
        registry.base_url()
    );
    // One client, one connection pool, for the whole load.
    let client = RegistryClient::new(&registry.base_url(), None)?;
    let stop = Shutdown::new();
    let sampler = registry.spawn_sampler(stop.clone());
    let start = registry.sample()?;

    eprintln!(
        "registering {} instances in {} services…",
        plan.instances, plan.services
    );
    let registered = load::register_all(&client, plan).await;
    let after_registration = registry.sample()?;
    load::register_probes(&client, plan).await?;

    eprintln!(
        "starting {} watchers on {} services…",
        plan.watchers, plan.watched_services
    );
    let mut watchers = load::start_watchers(&client, plan, &stop).await?;

    eprintln!(
        "sustaining {:.0} heartbeats/s and {} changes/s for {}…",
        plan.heartbeat_rate(),
        plan.change_rate,
        humantime::format_duration(plan.duration)
    );
    let harness_before = procfs::sample(std::process::id())?;
    let machine_before = procfs::machine_busy_ticks()?;
    let sustained_from = Instant::now();
    let registry_before = registry.sample()?;
    let stop_at = sustained_from + plan.duration;
    let (heartbeats, changes) = tokio::join!(
        load::heartbeats(&client, plan, stop_at),
        load::changes(&client, plan, stop_at),
    );
    let registry_after = registry.sample()?;
    let sustained = sustained_from.elapsed();
    let harness_after = procfs::sample(std::process::id())?;
    let machine_after = procfs::machine_busy_ticks()?;

    tokio::time::sleep(DELIVERY_GRACE).await;
    stop.trigger();
    let mut outcomes = Vec::new();
    while let Some(joined) = watchers.join_next().await {
        outcomes.push(joined.context("a watcher failed")?);
    }
    let samples = sampler.await.context("the sampler failed")?;
    let end = registry.sample()?;
    let services = client.services().await?;
    let metrics = prometheus::parse(&registry.metrics().await?);

    let deliveries = load::deliveries(&changes.changes, &outcomes);
    let watch = WatchReport {
        changes_made: changes.changes.len() as u64,
        changes_failed: changes.tally.errors,
        first_change_error: changes.tally.first_error,
        expected_deliveries: deliveries.expected,
        deliveries: deliveries.delivered,
        latency: LatencySummary::of(deliveries.latencies),
        change_write_latency: LatencySummary::of(changes.tally.latencies),
        other_answers: outcomes.iter().map(|o| o.other_answers).sum(),
        watcher_errors: outcomes.iter().map(|o| o.errors).sum(),
        first_watcher_error: outcomes.iter().find_map(|o| o.first_error.clone()),
        registry_side_mean_ms: report::histogram_mean_ms(
            &metrics,
            "keel_registry_watch_latency_seconds",
        ),
    };
    let registry_process = ProcessReport {
        pid: registry.pid(),
        cpu_cores: procfs::cores(
            registry_after
                .cpu_ticks
                .saturating_sub(registry_before.cpu_ticks),
            hz,
            sustained,
        ),
        cpu_cores_max_1s: busiest_second(&samples, sustained_from, stop_at, hz),
        rss_start_mb: mb(start.rss_bytes),
        rss_after_registration_mb: mb(after_registration.rss_bytes),
        rss_end_mb: mb(end.rss_bytes),
        peak_rss_mb: mb(end.peak_rss_bytes),
    };
    let registration_secs = registered.elapsed.as_secs_f64();
    let heartbeat_secs = heartbeats.elapsed.as_secs_f64();
    Ok(Report {
        registry: RegistryInfo {
            keel: registry.keel.display().to_string(),
            pid: registry.pid(),
            url: registry.base_url(),
            backend: registry.backend.clone(),
        },
        machine_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load: LoadInfo {
            instances: plan.instances,
            services: plan.services,
            probe_instances: plan.watched_services,
            watchers: plan.watchers,
            watched_services: plan.watched_services,
            heartbeat_interval_s: plan.heartbeat_interval.as_secs_f64(),
            ttl_s: plan.ttl().as_secs_f64(),
            duration_s: plan.duration.as_secs_f64(),
            change_rate: plan.change_rate,
            register_concurrency: plan.register_concurrency,
            concurrency: plan.concurrency,
        },
        registration: RegistrationReport {
            registered: registered.tally.ok,
            errors: registered.tally.errors,
            first_error: registered.tally.first_error,
            seconds: registration_secs,
            per_second: registered.tally.ok as f64 / registration_secs,
            latency: LatencySummary::of(registered.tally.latencies),
            registry_cores: procfs::cores(
                after_registration.cpu_ticks.saturating_sub(start.cpu_ticks),
                hz,
                registered.elapsed,
            ),
        },
        heartbeats: HeartbeatReport {
            target_per_second: plan.heartbeat_rate(),
            sent: heartbeats.sent,
            acknowledged: heartbeats.tally.ok,
            errors: heartbeats.tally.errors,
            first_error: heartbeats.tally.first_error,
            sent_per_second: heartbeats.sent as f64 / heartbeat_secs,
            acknowledged_per_second: heartbeats.tally.ok as f64 / heartbeat_secs,
            latency: LatencySummary::of(heartbeats.tally.latencies),
        },
        harness_cpu_cores: procfs::cores(
            harness_after
                .cpu_ticks
                .saturating_sub(harness_before.cpu_ticks),
            hz,
            sustained,
        ),
        machine_cpu_cores: procfs::cores(
            machine_after.saturating_sub(machine_before),
            hz,
            sustained,
        ),
        final_state: FinalState {
            instances: services.services.iter().map(|s| s.instances).sum(),
            passing: services.services.iter().map(|s| s.passing).sum(),
        },
        routes: report::routes(&metrics),
        targets: report::targets(&registry_process, &watch),
        watch,
        registry_process,
    })
}

/// MB of 10^6 bytes, as the targets are stated.
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The highest CPU use between consecutive samples inside `[from, to]`, in cores.
fn busiest_second(
    samples: &[(Instant, ProcessSample)],
    from: Instant,
    to: Instant,
    hz: u64,
) -> Option<f64> {
    samples
        .windows(2)
        .filter(|pair| pair[0].0 >= from && pair[1].0 <= to)
        .map(|pair| {
            let ticks = pair[1].1.cpu_ticks.saturating_sub(pair[0].1.cpu_ticks);
            procfs::cores(ticks, hz, pair[1].0.duration_since(pair[0].0))
        })
        .max_by(f64::total_cmp)
}
