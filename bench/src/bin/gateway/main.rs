//! `gateway`: benchmark of Keel's gateway against NGINX and HAProxy.
//!
//! Starts a tiny upstream (`upstream`, beside this binary) and then, one at a time, each
//! target: the upstream directly, NGINX, NGINX bare, HAProxy, Keel's gateway plain and with
//! everything on. NGINX and HAProxy do Keel's per-request work (`x-forwarded-for`, `-host`,
//! `-proto` and a generated `x-request-id` to the upstream, `x-request-id` back to the
//! client); NGINX bare adds none of it and is there for what those headers cost. Each proxy
//! is pinned to one core with one worker; wrk and the upstream share the other. The same wrk
//! load runs against each (a warm-up, then the measured run), and the report gives req/s and
//! p50/p99 latency with the ratios to NGINX, and the targets checked against NGINX and, for
//! reference, NGINX bare. Results are recorded in `bench/README.md`; `scripts/bench gateway`
//! installs wrk, nginx and haproxy first.

mod process;
mod report;
mod targets;
mod wrk;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use keel_bench::procfs;
use tokio::signal::unix::{SignalKind, signal};

use crate::process::{Running, pinned};
use crate::report::{
    AccessLogSize, CoreUse, IssuerRequests, LoadInfo, Machine, Measurement, Outcome, Report,
    RoundFigure, Row,
};
use crate::targets::{Setup, Started, Target, Tools};
use crate::wrk::Load;

/// The settings a recorded run is reproduced with, named in the report's command line.
const SETTINGS_ENV: [&str; 4] = [
    "BENCH_DURATION",
    "BENCH_WARMUP",
    "BENCH_CONNECTIONS",
    "BENCH_ROUNDS",
];

/// Benchmark of Keel's gateway against NGINX and HAProxy: req/s and p50/p99 latency of the
/// same wrk load through each, one proxy core each, with the ratios to NGINX (which, like
/// HAProxy, adds the forwarding headers and a request id, as Keel does; NGINX bare, without
/// them, is measured for reference).
#[derive(Debug, Parser)]
#[command(name = "gateway", version)]
struct Cli {
    /// The keel binary to start [default: `keel` beside this harness, i.e. target/release/keel]
    #[arg(long, value_name = "PATH")]
    keel: Option<PathBuf>,
    /// Length of each measured run (whole seconds)
    #[arg(long, env = "BENCH_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Length of the warm-up run before each measured run; 0s for none
    #[arg(long, env = "BENCH_WARMUP", default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Times to measure every target, in turn (NGINX, keel, NGINX, keel, …); the report
    /// gives each target's median round and the median of the rounds' ratios to NGINX
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 1)]
    rounds: usize,
    /// Connections wrk keeps open (one wrk thread)
    #[arg(long, env = "BENCH_CONNECTIONS", default_value_t = 64)]
    connections: usize,
    /// The core every proxy is pinned to
    #[arg(long, default_value_t = 0)]
    proxy_cpu: usize,
    /// The core of wrk and the upstream
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// Which targets to run, comma-separated [default: all, in this order]
    #[arg(long, value_enum, value_delimiter = ',')]
    targets: Vec<Target>,
    /// Keep the run's directory (configurations and every process's log) and print it
    #[arg(long)]
    keep_dir: bool,
    /// Print the report as JSON instead of text
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Dropping the run on a signal stops every process it started (their guards).
    let result = tokio::select! {
        result = measure(&cli) => result,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}; every process started was stopped")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every target and prints the report; `Ok(false)` when a target failed (a missed
/// target is a finding, not a failure).
async fn measure(cli: &Cli) -> anyhow::Result<bool> {
    if cli.duration < Duration::from_secs(1) {
        bail!("--duration must be at least 1s (wrk counts whole seconds)");
    }
    if cli.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if cli.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if cli.proxy_cpu == cli.load_cpu {
        bail!("--proxy-cpu and --load-cpu must be different cores");
    }
    for cpu in [cli.proxy_cpu, cli.load_cpu] {
        procfs::core_busy_ticks(cpu)
            .with_context(|| format!("CPU {cpu} is not on this machine (it needs 2 cores)"))?;
    }
    let tools = Tools::find(cli.keel.clone())?;
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let dir = RunDir::create(cli.keep_dir)?;
    let report = run(cli, &tools, &dir.path, date).await?;
    let all_ran = !report
        .rows
        .iter()
        .any(|row| matches!(row.outcome, Outcome::Failed { .. }));
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if cli.keep_dir {
        eprintln!("configurations and logs kept in {}", dir.path.display());
    }
    Ok(all_ran)
}

async fn run(cli: &Cli, tools: &Tools, dir: &Path, date: String) -> anyhow::Result<Report> {
    // Read before the run: the binaries measured were built from the tree as it is now,
    // and the tree may change while a long run goes on.
    let keel_commit = keel_commit();
    let upstream_addr = targets::free_loopback_port()?;
    let mut command = pinned(cli.load_cpu, &tools.upstream);
    command.arg("--listen").arg(upstream_addr.to_string());
    let upstream = Running::spawn("upstream", command, &dir.join("upstream.log"))?;
    let setup = Setup {
        tools,
        dir,
        upstream: upstream_addr,
        proxy_cpu: cli.proxy_cpu,
        connections: cli.connections,
    };
    let chosen = if cli.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        Target::ALL
            .into_iter()
            .filter(|t| cli.targets.contains(t))
            .collect()
    };
    let mut measured: Vec<Vec<Row>> = Vec::new();
    for round in 1..=cli.rounds {
        let mut rows = Vec::new();
        for &target in &chosen {
            if cli.rounds > 1 {
                eprintln!("round {round}/{}: {}…", cli.rounds, target.label());
            } else {
                eprintln!("{}…", target.label());
            }
            let mut outcome = outcome_of(cli, &setup, &upstream, target).await;
            // Ports are picked free and released before the target binds them, so now and
            // then another socket takes one meanwhile: that is the harness's race, not the
            // target's failure, and the target is measured again on fresh ports.
            if matches!(&outcome, Outcome::Failed { error } if error.contains("Address already in use"))
            {
                eprintln!("  a port it was given was taken meanwhile; again on fresh ports");
                outcome = outcome_of(cli, &setup, &upstream, target).await;
            }
            match &outcome {
                Outcome::Measured(m) => eprintln!(
                    "  {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
                    m.wrk.requests_per_second, m.wrk.p50_ms, m.wrk.p99_ms
                ),
                Outcome::Failed { error } => eprintln!("  failed: {error}"),
            }
            rows.push(Row {
                target,
                label: target.label(),
                outcome,
            });
        }
        measured.push(rows);
    }
    drop(upstream);
    let rounds = if cli.rounds > 1 {
        measured.iter().map(|rows| round_figures(rows)).collect()
    } else {
        Vec::new()
    };

    let mut report = Report {
        date,
        command: command_line(),
        machine: machine(),
        versions: tools.versions(),
        keel_commit,
        load: LoadInfo {
            connections: cli.connections,
            duration_s: cli.duration.as_secs(),
            warmup_s: cli.warmup.as_secs(),
            proxy_cpu: cli.proxy_cpu,
            load_cpu: cli.load_cpu,
        },
        rounds,
        rows: median_rows(measured, chosen.len()),
        targets: Vec::new(),
    };
    report.check_targets();
    Ok(report)
}

/// Each target's median round by req/s (a failed round counts as the lowest); with one
/// round, that round.
fn median_rows(measured: Vec<Vec<Row>>, targets: usize) -> Vec<Row> {
    let mut per_target: Vec<Vec<Row>> = (0..targets).map(|_| Vec::new()).collect();
    for rows in measured {
        for (runs, row) in per_target.iter_mut().zip(rows) {
            runs.push(row);
        }
    }
    per_target
        .into_iter()
        .map(|mut runs| {
            runs.sort_by(|a, b| rps_of(a).total_cmp(&rps_of(b)));
            runs.swap_remove(runs.len() / 2)
        })
        .collect()
}

fn rps_of(row: &Row) -> f64 {
    match &row.outcome {
        Outcome::Measured(m) => m.wrk.requests_per_second,
        Outcome::Failed { .. } => f64::NEG_INFINITY,
    }
}

fn round_figures(rows: &[Row]) -> Vec<RoundFigure> {
    rows.iter()
        .filter_map(|row| match &row.outcome {
            Outcome::Measured(m) => Some(RoundFigure {
                target: row.target,
                requests_per_second: m.wrk.requests_per_second,
                p99_ms: m.wrk.p99_ms,
                errors: m.wrk.errors().is_some(),
            }),
            Outcome::Failed { .. } => None,
        })
        .collect()
}

/// [`measure_target`], its error as the outcome.
async fn outcome_of(cli: &Cli, setup: &Setup<'_>, upstream: &Running, target: Target) -> Outcome {
    match measure_target(cli, setup, upstream, target).await {
        Ok(outcome) => outcome,
        Err(error) => Outcome::Failed {
            error: format!("{error:#}"),
        },
    }
}

/// Starts `target`, warms it up, measures it and stops it.
async fn measure_target(
    cli: &Cli,
    setup: &Setup<'_>,
    upstream: &Running,
    target: Target,
) -> anyhow::Result<Outcome> {
    let mut started = setup.start(target).await?;
    let load = Load {
        cpu: cli.load_cpu,
        connections: cli.connections,
        headers: started.headers.clone(),
    };
    let log = setup.dir.join("wrk.log");
    let mut requests = 0;
    if !cli.warmup.is_zero() {
        let warmup = load
            .run(&setup.tools.wrk, &started.url, cli.warmup, &log)
            .await
            .context("warm-up")?;
        requests += warmup.requests;
    }
    let issuer_before = issuer_requests(&started);
    let before = CpuReading::take(cli, &started, upstream)?;
    let from = Instant::now();
    let wrk = load
        .run(&setup.tools.wrk, &started.url, cli.duration, &log)
        .await?;
    let elapsed = from.elapsed();
    let after = CpuReading::take(cli, &started, upstream)?;
    let issuer = started.issuer.as_ref().map(|issuer| IssuerRequests {
        metadata: issuer.metadata_fetch_count(),
        key_sets: issuer.fetch_count(),
        during_measured_run: issuer_requests(&started).saturating_sub(issuer_before),
    });
    started.check_alive()?;
    requests += wrk.requests;
    let access_log = match &started.access_log {
        Some(path) => Some(access_log_size(path, requests).await?),
        None => None,
    };
    let (proxy_core, load_core) = after.since(&before, elapsed);
    Ok(Outcome::Measured(Measurement {
        wrk,
        proxy_core,
        load_core,
        placement: started.placement(),
        issuer,
        access_log,
    }))
}

/// Everything the target's token issuer has answered so far (0 without one).
fn issuer_requests(started: &Started) -> usize {
    started.issuer.as_ref().map_or(0, |issuer| {
        issuer.metadata_fetch_count() + issuer.fetch_count()
    })
}

/// The access log's size and lines, once its writer has caught up (it flushes whenever its
/// queue runs empty, which it does as soon as the load stops).
async fn access_log_size(path: &Path, requests: u64) -> anyhow::Result<AccessLogSize> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let file = path.to_owned();
    let (bytes, lines) = tokio::task::spawn_blocking(move || count_lines(&file))
        .await?
        .with_context(|| format!("cannot read the access log {}", path.display()))?;
    Ok(AccessLogSize {
        path: path.display().to_string(),
        bytes,
        lines,
        requests,
    })
}

/// A file's bytes and lines, read a chunk at a time (the log can be hundreds of MB).
fn count_lines(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut chunk = vec![0; 1 << 20];
    let (mut bytes, mut lines) = (0, 0);
    loop {
        let read = file.read(&mut chunk)?;
        if read == 0 {
            return Ok((bytes, lines));
        }
        bytes += read as u64;
        lines += chunk[..read].iter().filter(|&&byte| byte == b'\n').count() as u64;
    }
}

/// CPU counters around a measured run: both cores, and the processes pinned to each.
struct CpuReading {
    proxy_core: u64,
    load_core: u64,
    /// The proxy and its children.
    proxy: u64,
    /// The upstream, and wrk (a child this harness waits for).
    load: u64,
}

impl CpuReading {
    fn take(cli: &Cli, started: &Started, upstream: &Running) -> anyhow::Result<Self> {
        Ok(Self {
            proxy_core: procfs::core_busy_ticks(cli.proxy_cpu)?,
            load_core: procfs::core_busy_ticks(cli.load_cpu)?,
            proxy: started.process.as_ref().map_or(0, Running::cpu_ticks),
            load: upstream.cpu_ticks() + procfs::waited_children_ticks(std::process::id())?,
        })
    }

    /// Each core's use from `earlier` to this reading, in cores.
    fn since(&self, earlier: &CpuReading, elapsed: Duration) -> (CoreUse, CoreUse) {
        let hz = procfs::clock_ticks_per_second();
        let cores = |ticks: u64| procfs::cores(ticks, hz, elapsed);
        let core = |now: u64, then: u64, ours: u64| CoreUse {
            busy: cores(now.saturating_sub(then)),
            ours: cores(ours),
        };
        (
            core(
                self.proxy_core,
                earlier.proxy_core,
                self.proxy.saturating_sub(earlier.proxy),
            ),
            core(
                self.load_core,
                earlier.load_core,
                self.load.saturating_sub(earlier.load),
            ),
        )
    }
}

/// The first of SIGINT, SIGTERM and SIGHUP.
async fn interrupted() -> &'static str {
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without handlers the default actions stay in place; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// The run's configurations and logs; removed at the end unless kept.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    fn create(keep: bool) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("keel-bench-gateway-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// How the run was started: `scripts/bench` passes its own command line in BENCH_COMMAND;
/// the BENCH_* settings in force are put in front.
fn command_line() -> String {
    let command = std::env::var("BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let settings: Vec<String> = SETTINGS_ENV
        .iter()
        .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
        .collect();
    if settings.is_empty() {
        command
    } else {
        format!("{} {command}", settings.join(" "))
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned()),
    }
}

/// The working tree's commit, and whether it has uncommitted changes; `None` outside git.
fn keel_commit() -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|status| !status.is_empty());
    Some(if dirty {
        format!("{commit} + uncommitted changes")
    } else {
        commit
    })
}
