//! The shop harness: the reference shop on the production profile (`keel up` as its own
//! process, every service on its own PostgreSQL database, events and commands on RabbitMQ),
//! driven through the gateway by customers who each place an order and wait for it to be
//! confirmed before placing the next. Reports completed orders per second and the time
//! from placing an order to seeing it final (p50, p99), with pgbench's TPC-B-like figure
//! on the same PostgreSQL beside it as the ceiling.
//!
//!   scripts/bench shop [--duration 20s] [--customers 32] [--provider-latency 2ms] [--wait 10s]
//!                      [--postgres 127.0.0.1:5432 | --postgres /var/run/postgresql:5432]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use keel_bench::postgres_url;
use keel_bench::stats::LatencySummary;
use serde_json::{Value, json};

/// Targets of the shop (issue: the reference system).
const TARGET_ORDERS_PER_SECOND: f64 = 500.0;
const TARGET_P99: Duration = Duration::from_millis(250);

/// Products on sale, each with stock that never runs out during a run.
const SKUS: usize = 20;

#[derive(Debug, Parser)]
#[command(about = "The shop end to end through the gateway on the production profile")]
struct Args {
    /// The keel binary [default: `keel` beside this harness, i.e. target/release/keel]
    #[arg(long, value_name = "PATH")]
    keel: Option<PathBuf>,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Customers ordering at once, each one order at a time.
    #[arg(long, default_value_t = 32)]
    customers: usize,
    /// The simulated payment provider's latency per call.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    provider_latency: Duration,
    /// How long a customer's look at its order may wait for it to be final
    /// (`GET /orders/{id}?wait=`: answered as the order settles, one request per order);
    /// 0 looks without waiting, every `--poll`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// With `--wait 0`: how often a customer looks whether its order is final (each look
    /// is a request through the gateway: the shorter, the more load besides the orders
    /// themselves). The time to a final state is read from the orders' own rows, not from
    /// these looks.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// PostgreSQL (user postgres, trust authentication) for the services and pgbench, as
    /// host:port; a host starting with `/` is the directory of the server's Unix socket
    /// (`/var/run/postgresql:5432`), as psql and pgbench take it.
    #[arg(long, default_value = "127.0.0.1:5432")]
    postgres: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// Leave pgbench out.
    #[arg(long)]
    no_pgbench: bool,
}

const COMPONENTS: [&str; 5] = ["auth", "catalog", "inventory", "payments", "orders"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let keel = match &args.keel {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("keel"),
    };
    let run = format!(
        "{:x}",
        std::process::id() as u64 * 1_000_003 + now_ms() % 1_000_003
    );
    let databases: Vec<String> = COMPONENTS
        .iter()
        .map(|name| format!("keel_bench_{name}_{run}"))
        .collect();
    let (host, port) = args
        .postgres
        .split_once(':')
        .context("--postgres is host:port")?;
    let result = measure(&args, &keel, &run, &databases).await;
    for database in &databases {
        drop_database(host, port, database);
    }
    let shop = result?;
    let pgbench = if args.no_pgbench {
        None
    } else {
        Some(pgbench(host, port, &run)?)
    };
    report(&args, &shop, pgbench);
    Ok(())
}

/// CPU time (clock ticks) of the processes the shop runs on, during the measured window.
#[derive(Debug, Default, Clone, Copy)]
struct CpuTicks {
    keel: u64,
    rabbitmq: u64,
    postgres: u64,
    machine: u64,
}

impl CpuTicks {
    /// Now, for keel at `keel_pid` and every `beam.smp` and `postgres` process.
    fn now(keel_pid: u32) -> Self {
        let ticks = |pid: u32| keel_bench::procfs::sample(pid).map_or(0, |s| s.cpu_ticks);
        let named = |name: &str| -> u64 {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return 0;
            };
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == name)
                })
                .map(ticks)
                .sum()
        };
        Self {
            keel: ticks(keel_pid),
            rabbitmq: named("beam.smp"),
            postgres: named("postgres"),
            machine: keel_bench::procfs::machine_busy_ticks().unwrap_or(0),
        }
    }

    fn since(self, start: Self) -> Self {
        Self {
            keel: self.keel.saturating_sub(start.keel),
            rabbitmq: self.rabbitmq.saturating_sub(start.rabbitmq),
            postgres: self.postgres.saturating_sub(start.postgres),
            machine: self.machine.saturating_sub(start.machine),
        }
    }
}

struct Measured {
    /// CPU spent in the measured window, per process group.
    cpu: CpuTicks,
    confirmed: usize,
    rejected: usize,
    failed: usize,
    seconds: f64,
    /// From the order's row being written to its being settled, as the orders database
    /// recorded them (no polling in it).
    to_final: Option<LatencySummary>,
    /// From the POST to the customer seeing the order final (polling included).
    seen_final: Option<LatencySummary>,
    placing: Option<LatencySummary>,
}

async fn measure(
    args: &Args,
    keel: &PathBuf,
    run: &str,
    databases: &[String],
) -> anyhow::Result<Measured> {
    let postgres = |database: &str| postgres_url(&args.postgres, database);
    let key = output(Command::new(keel).args(["auth", "key"]))?;
    let bus = format!(
        r#"bus = {{ rabbitmq = {{ url = "{}", exchange = "keel-bench-{run}", auto_delete_exchange = true, queue_expiry = "5m" }} }}"#,
        args.amqp
    );
    let mut config = format!(
        "[telemetry]\nlog_level = \"warn\"\n[registry]\nlisten = \"127.0.0.1:0\"\n\
         [gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [auth]\nlisten = \"127.0.0.1:0\"\ndatabase = \"{}\"\nkey_encryption_key = \"{}\"\n\
         [payment_provider]\nlatency = \"{}ms\"\n\
         [orders_settings]\nmax_pending_per_customer = {}\n",
        postgres(&databases[0]),
        key.trim(),
        args.provider_latency.as_millis(),
        // Every customer orders under the one client's token, so as one customer for the
        // orders service's cap on orders being placed: as many as there are customers.
        args.customers,
    );
    for (service, database) in COMPONENTS[1..].iter().zip(&databases[1..]) {
        config.push_str(&format!(
            "[{service}]\nlisten = \"127.0.0.1:0\"\ndatabase = \"{}\"\n{bus}\n",
            postgres(database)
        ));
    }
    let file = std::env::temp_dir().join(format!("keel-bench-shop-{run}.toml"));
    std::fs::write(&file, config)?;
    let file_arg = file.to_str().context("temp path")?.to_owned();
    let keel_cli = |args: &[&str]| {
        output(
            Command::new(keel)
                .args(["--config", &file_arg, "auth"])
                .args(args),
        )
    };
    keel_cli(&["role", "add", "admin"])?;
    keel_cli(&["role", "add", "customer"])?;
    let added = keel_cli(&["client", "add", "bench", "--grant", "client_credentials"])?;
    let secret = added
        .lines()
        .find_map(|line| line.strip_prefix("secret "))
        .context("no secret printed")?
        .to_owned();
    keel_cli(&["role", "grant", "admin", "--client", "bench"])?;
    keel_cli(&["role", "grant", "customer", "--client", "bench"])?;

    let mut up = Up::start(keel, &file_arg)?;
    let measured = drive(args, &up, &secret)
        .await
        .and_then(|(mut measured, window)| {
            measured.to_final = settle_times(&args.postgres, &databases[4], window)?;
            Ok(measured)
        });
    up.stop();
    let _ = std::fs::remove_file(&file);
    measured
}

/// Unix ms of the measured window's start and end.
type Window = (u64, u64);

/// The times from placed to settled of the confirmed orders placed in `window`, from the
/// orders database.
fn settle_times(
    postgres: &str,
    database: &str,
    window: Window,
) -> anyhow::Result<Option<LatencySummary>> {
    let (host, port) = postgres
        .split_once(':')
        .context("--postgres is host:port")?;
    let printed = output(
        Command::new("psql")
            .args([
                "-h", host, "-p", port, "-U", "postgres", "-At", "-d", database, "-c",
            ])
            .arg(format!(
                "SELECT updated_at - created_at FROM orders WHERE status = 'confirmed' \
                 AND created_at >= {} AND created_at < {}",
                window.0, window.1
            )),
    )?;
    let samples = printed
        .lines()
        .filter_map(|line| line.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .collect();
    Ok(LatencySummary::of(samples))
}

async fn drive(args: &Args, up: &Up, secret: &str) -> anyhow::Result<(Measured, Window)> {
    let http = keel_runtime::http_client::builder()
        .pool_max_idle_per_host(args.customers)
        .build()?;
    let token: Value = http
        .post(format!("{}/token", up.auth))
        .basic_auth("bench", Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await?
        .json()
        .await?;
    let token = token["access_token"]
        .as_str()
        .context("no access token")?
        .to_owned();
    let shop = Arc::new(Shop {
        http,
        gateway: up.gateway.clone(),
        token,
    });
    // Ready once the gateway routes to every service.
    let started = Instant::now();
    for path in ["/catalog/products", "/orders/orders"] {
        while shop.get(path).await.map(|(status, _)| status).unwrap_or(0) != 200 {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the gateway does not route {path}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for n in 0..SKUS {
        let sku = format!("BENCH-{n:02}");
        let product = json!({"name": sku, "price": {"minor": 100 + n, "currency": "EUR"}});
        shop.put(&format!("/catalog/products/{sku}"), product)
            .await?;
        shop.put(
            &format!("/inventory/stock/{sku}"),
            json!({"on_hand": 100_000_000}),
        )
        .await?;
    }

    eprintln!(
        "{} customers ordering for {:?} (after {:?} of warm-up)…",
        args.customers, args.duration, args.warmup
    );
    let begin = Instant::now();
    let measure_from = begin + args.warmup;
    let end = measure_from + args.duration;
    let window_ms =
        |at: Instant| now_ms() + at.saturating_duration_since(Instant::now()).as_millis() as u64;
    let window = (window_ms(measure_from), window_ms(end));
    let mut customers = Vec::new();
    for customer in 0..args.customers {
        let shop = shop.clone();
        let look = Look {
            wait: args.wait,
            poll: args.poll,
        };
        customers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(customer as u64);
            let mut samples = Vec::new();
            let mut n = 0;
            while Instant::now() < end {
                n += 1;
                let placed_at = Instant::now();
                let outcome = shop
                    .order(&mut rng, &format!("c{customer}-{n}"), look)
                    .await;
                samples.push((placed_at, outcome));
            }
            samples
        }));
    }
    let cpu = {
        let keel_pid = up.child.id();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let start = CpuTicks::now(keel_pid);
            tokio::time::sleep_until(end.into()).await;
            CpuTicks::now(keel_pid).since(start)
        })
    };
    let mut measured = Measured {
        cpu: CpuTicks::default(),
        confirmed: 0,
        rejected: 0,
        failed: 0,
        seconds: args.duration.as_secs_f64(),
        to_final: None,
        seen_final: None,
        placing: None,
    };
    let (mut to_final, mut placing) = (Vec::new(), Vec::new());
    for customer in customers {
        for (placed_at, outcome) in customer.await? {
            // Orders placed in the measured window, whenever they ended.
            if placed_at < measure_from || placed_at >= end {
                continue;
            }
            match outcome {
                Ok(Outcome {
                    confirmed: true,
                    placed,
                    done,
                }) => {
                    measured.confirmed += 1;
                    placing.push(placed);
                    to_final.push(done);
                }
                Ok(_) => measured.rejected += 1,
                Err(error) => {
                    measured.failed += 1;
                    if measured.failed <= 3 {
                        eprintln!("an order failed: {error:#}");
                    }
                }
            }
        }
    }
    measured.cpu = cpu.await?;
    measured.seen_final = LatencySummary::of(to_final);
    measured.placing = LatencySummary::of(placing);
    Ok((measured, window))
}

struct Shop {
    http: reqwest::Client,
    gateway: String,
    token: String,
}

/// How a customer looks at its order until it is final.
#[derive(Clone, Copy)]
struct Look {
    /// Each look waits this long for the order to settle (`?wait=`); zero: no waiting.
    wait: Duration,
    /// Between looks that do not wait.
    poll: Duration,
}

/// How one order went: its final status, the POST's latency, and the time to final.
struct Outcome {
    confirmed: bool,
    placed: Duration,
    done: Duration,
}

impl Shop {
    async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.gateway))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn put(&self, path: &str, body: Value) -> anyhow::Result<()> {
        let response = self
            .http
            .put(format!("{}{path}", self.gateway))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("PUT {path}: {}", response.status());
        }
        Ok(())
    }

    /// Places an order of one or two products and waits for it to be final.
    async fn order(
        &self,
        rng: &mut fastrand::Rng,
        key: &str,
        look: Look,
    ) -> anyhow::Result<Outcome> {
        let first = rng.usize(0..SKUS);
        let mut lines =
            vec![json!({"sku": format!("BENCH-{first:02}"), "quantity": rng.u32(1..=3)})];
        if rng.bool() {
            let second = (first + 1 + rng.usize(0..SKUS - 1)) % SKUS;
            lines.push(json!({"sku": format!("BENCH-{second:02}"), "quantity": 1}));
        }
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/orders/orders", self.gateway))
            .bearer_auth(&self.token)
            .header("idempotency-key", key)
            .json(&json!({"lines": lines, "payment_method": "tok_visa"}))
            .send()
            .await?;
        let status = response.status();
        let placed: Value = response.json().await.unwrap_or(Value::Null);
        if status.as_u16() != 202 {
            bail!("POST /orders/orders: {status}: {placed}");
        }
        let placed_in = started.elapsed();
        let id = placed["id"].as_str().context("no order id")?.to_owned();
        let path = if look.wait.is_zero() {
            format!("/orders/orders/{id}")
        } else {
            format!("/orders/orders/{id}?wait={}ms", look.wait.as_millis())
        };
        loop {
            if look.wait.is_zero() {
                tokio::time::sleep(look.poll).await;
            }
            let (status, order) = self.get(&path).await?;
            if status != 200 {
                bail!("GET /orders/orders/{id}: {status}");
            }
            match order["status"].as_str() {
                Some("pending") if started.elapsed() < Duration::from_secs(60) => continue,
                Some("pending") => bail!("order {id} still pending after a minute"),
                Some(final_status) => {
                    return Ok(Outcome {
                        confirmed: final_status == "confirmed",
                        placed: placed_in,
                        done: started.elapsed(),
                    });
                }
                None => bail!("order {id}: {order}"),
            }
        }
    }
}

/// `keel up` running as its own process.
struct Up {
    child: Child,
    gateway: String,
    auth: String,
}

impl Up {
    fn start(keel: &PathBuf, config: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(keel)
            .args(["--config", config, "up"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", keel.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (mut gateway, mut auth) = (None, None);
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line?;
            let mut words = line.split_whitespace();
            // `gateway admin` has a row of its own: only the URL right after the name.
            match (words.next(), words.next()) {
                (Some("gateway"), Some(url)) if url.starts_with("http") => {
                    gateway = Some(url.to_owned());
                }
                (Some("auth"), Some(url)) => auth = Some(url.to_owned()),
                _ => {}
            }
            if line.trim_start().starts_with("orders ") {
                break;
            }
        }
        // The rest is read and dropped: a closed pipe would fail keel's next print.
        std::thread::spawn(move || lines.for_each(drop));
        match (gateway, auth) {
            (Some(gateway), Some(auth)) => Ok(Self {
                child,
                gateway,
                auth,
            }),
            _ => {
                let _ = child.kill();
                bail!("keel up did not print where it runs")
            }
        }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// pgbench's TPC-B-like transactions per second on a scratch database (scale 10, 16
/// clients, 2 threads, 15 s): the most this PostgreSQL does for small write transactions.
fn pgbench(host: &str, port: &str, run: &str) -> anyhow::Result<f64> {
    let database = format!("keel_bench_pgbench_{run}");
    eprintln!("pgbench on {database}…");
    let connection = ["-h", host, "-p", port, "-U", "postgres"];
    output(Command::new("createdb").args(connection).arg(&database))?;
    let result = (|| {
        output(
            Command::new("pgbench")
                .args(connection)
                .args(["-i", "-q", "-s", "10", &database]),
        )?;
        let printed = output(
            Command::new("pgbench")
                .args(connection)
                .args(["-n", "-c", "16", "-j", "2", "-T", "15", &database]),
        )?;
        printed
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix("tps = ")?;
                rest.split_whitespace().next()?.parse::<f64>().ok()
            })
            .context("pgbench printed no tps")
    })();
    drop_database(host, port, &database);
    result
}

fn drop_database(host: &str, port: &str, database: &str) {
    let _ = Command::new("psql")
        .args(["-h", host, "-p", port, "-U", "postgres", "-q", "-c"])
        .arg(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs `command`; its standard output, or an error with its standard error.
fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().context("cannot run a command")?;
    if !output.status.success() {
        bail!(
            "{:?} failed: {}",
            command,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn report(args: &Args, measured: &Measured, pgbench: Option<f64>) {
    let per_second = measured.confirmed as f64 / measured.seconds;
    println!(
        "shop, production profile (PostgreSQL, RabbitMQ): {} customers, {:?} measured after {:?}, provider latency {:?}",
        args.customers, args.duration, args.warmup, args.provider_latency
    );
    println!("  completed (confirmed) orders/s   {per_second:.1}");
    println!(
        "  orders confirmed / rejected / failed   {} / {} / {}",
        measured.confirmed, measured.rejected, measured.failed
    );
    if let Some(to_final) = measured.to_final {
        println!(
            "  time to final state   p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms (placed to settled, as the orders database recorded them)",
            to_final.p50_ms, to_final.p99_ms, to_final.max_ms
        );
    }
    if let Some(seen) = measured.seen_final {
        println!(
            "  seen final by the customer   p50 {:.1} ms   p99 {:.1} ms ({})",
            seen.p50_ms,
            seen.p99_ms,
            if args.wait.is_zero() {
                format!("looking every {:?}", args.poll)
            } else {
                format!("waiting on the order up to {:?} a look", args.wait)
            }
        );
    }
    if let Some(placing) = measured.placing {
        println!(
            "  POST /orders answered   p50 {:.1} ms   p99 {:.1} ms",
            placing.p50_ms, placing.p99_ms
        );
    }
    if measured.confirmed > 0 {
        let per_order = |ticks: u64| {
            ticks as f64 * 1000.0
                / keel_bench::procfs::clock_ticks_per_second() as f64
                / measured.confirmed as f64
        };
        let cpu = measured.cpu;
        println!(
            "  CPU per confirmed order   keel {:.2} ms   RabbitMQ {:.2} ms   PostgreSQL {:.2} ms   machine {:.2} ms",
            per_order(cpu.keel),
            per_order(cpu.rabbitmq),
            per_order(cpu.postgres),
            per_order(cpu.machine)
        );
    }
    if let Some(tps) = pgbench {
        println!(
            "  pgbench (TPC-B-like, 16 clients) {tps:.0} tps: the ceiling; orders/s are {:.2}x of it",
            per_second / tps
        );
    }
    let p99 = measured.to_final.map_or(f64::INFINITY, |l| l.p99_ms);
    let verdict = |met: bool| if met { "met" } else { "missed" };
    println!(
        "  targets: >= {TARGET_ORDERS_PER_SECOND} orders/s {}; p99 < {} ms {}",
        verdict(per_second >= TARGET_ORDERS_PER_SECOND),
        TARGET_P99.as_millis(),
        verdict(p99 < TARGET_P99.as_secs_f64() * 1000.0)
    );
}
