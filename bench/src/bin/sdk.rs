//! The event-bus harness: the SDK's bus on each broker transport (RabbitMQ, and Kafka when
//! built with the `kafka` feature), measured the same way in one run, RabbitMQ being the
//! peer the others are compared with.
//!
//! For each transport, a consumer group (the SDK's consumer: a PostgreSQL transaction per
//! message with its inbox row, `--concurrency` messages at once) on a database of its own,
//! and two runs:
//! - throughput: `--publishers` tasks publish `--events` events as fast as each publish is
//!   confirmed (RabbitMQ publisher confirms, Kafka delivery reports); events/s is the count
//!   over the time from the first publish to the last event handled;
//! - latency: events published at a steady `--rate`, each stamped with its publish time;
//!   p50/p99 from the publish call to the handler running, on one clock.
//!
//!   scripts/bench sdk [--events 20000] [--rate 500] [--transports rabbitmq,kafka]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use keel_bench::postgres_url;
use keel_bench::stats::LatencySummary;
use keel_runtime::Shutdown;
use keel_sdk::events::{Bus, Event, Handler, HandlerError, RabbitMqOptions, Received};
use keel_sdk::sqlx::{self, Connection};
use keel_sdk::{Database, Migrations, Tx};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(about = "The SDK's event bus on RabbitMQ and Kafka: events/s and latency")]
struct Args {
    /// Events in the throughput run.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Publishing tasks in the throughput run, each waiting for its confirm.
    #[arg(long, default_value_t = 32)]
    publishers: usize,
    /// Events per second in the latency run.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Length of the latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// Messages each consumer handles at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Comma-separated: rabbitmq, kafka, in-process.
    #[arg(long, default_value = "rabbitmq,kafka", value_delimiter = ',')]
    transports: Vec<String>,
    /// PostgreSQL (user postgres, trust authentication) for the consumers' databases, as
    /// host:port; a host starting with `/` is the directory of its Unix socket.
    #[arg(long, default_value = "127.0.0.1:5432")]
    postgres: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka: String,
    /// Kafka consumers' fetch wait: tansu holds a fetch this long even with records waiting.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    kafka_fetch_wait: Duration,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Stamped {
    seq: u64,
    /// Microseconds since the Unix epoch when it was published.
    sent_us: u64,
}

impl Event for Stamped {
    const TYPE: &'static str = "keel.bench.stamped.v1";
    fn key(&self) -> String {
        format!("k{}", self.seq % 64)
    }
}

/// Counts what it handles and notes each event's age.
#[derive(Clone, Default)]
struct Note {
    ages: Arc<Mutex<Vec<Duration>>>,
}

impl Handler<Stamped> for Note {
    async fn handle(&self, _: &mut Tx, event: Received<Stamped>) -> Result<(), HandlerError> {
        let age = now_us().saturating_sub(event.event.sent_us);
        self.ages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Duration::from_micros(age));
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Measured {
    transport: String,
    events_per_second: f64,
    latency: Option<LatencySummary>,
    latency_rate: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    for transport in &args.transports {
        eprintln!("== {transport}");
        results.push(measure(&args, transport).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    let peer = results
        .iter()
        .find(|result| result.transport == "rabbitmq")
        .map(|result| result.events_per_second);
    println!(
        "events: {} by {} publishers; latency at {}/s for {:?}; consumer concurrency {}; PostgreSQL inbox",
        args.events, args.publishers, args.rate, args.latency_duration, args.concurrency
    );
    println!();
    println!("| transport | events/s | vs RabbitMQ | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for result in &results {
        let ratio = peer.map_or("-".to_owned(), |peer| {
            format!("{:.2}x", result.events_per_second / peer)
        });
        let (p50, p99, max) = result
            .latency
            .map_or(("-".into(), "-".into(), "-".into()), |l| {
                (
                    format!("{:.1} ms", l.p50_ms),
                    format!("{:.1} ms", l.p99_ms),
                    format!("{:.1} ms", l.max_ms),
                )
            });
        println!(
            "| {} | {:.0} | {ratio} | {p50} | {p99} | {max} |",
            result.transport, result.events_per_second
        );
    }
    Ok(())
}

async fn measure(args: &Args, transport: &str) -> anyhow::Result<Measured> {
    let run = format!("{:x}", now_us() % 0xffff_ffff);
    let name = format!("keel_bench_sdk_{}_{run}", transport.replace('-', "_"));
    let url = postgres_url(&args.postgres, &name);
    let db = Database::connect(&url, &Migrations::none())
        .await
        .with_context(|| format!("the database {name}"))?;
    let bus = bus(args, transport, &format!("keel-bench-{run}")).await?;
    let note = Note::default();
    let consumer = bus
        .consumer("bench", &db)
        .on::<Stamped, _>(note.clone())
        .start()
        .await?
        .concurrency(args.concurrency);
    let shutdown = Shutdown::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    // Let the consumer join its group (Kafka assigns partitions after a join).
    warm_up(&bus, &note).await?;

    let events_per_second = throughput(args, &bus, &note).await?;
    eprintln!("   {events_per_second:.0} events/s");
    note.ages.lock().map(|mut ages| ages.clear()).ok();
    let latency = latency(args, &bus, &note).await?;
    eprintln!("   latency {latency:?}");

    shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(15), running).await;
    drop(db);
    drop_database(&args.postgres, &name).await;
    Ok(Measured {
        transport: transport.to_owned(),
        events_per_second,
        latency,
        latency_rate: args.rate,
    })
}

async fn bus(args: &Args, transport: &str, namespace: &str) -> anyhow::Result<Bus> {
    Ok(match transport {
        "rabbitmq" => {
            let options = RabbitMqOptions {
                url: keel_runtime::Secret::new(args.amqp.clone()),
                exchange: namespace.to_owned(),
                queue_expiry: Some(Duration::from_secs(300)),
                auto_delete_exchange: true,
                ..RabbitMqOptions::default()
            };
            Bus::rabbitmq("bench", options).await?
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            let options = keel_sdk::events::KafkaOptions {
                brokers: args.kafka.clone(),
                namespace: namespace.to_owned(),
                partitions: i32::try_from(args.concurrency.max(1)).unwrap_or(8),
                fetch_wait: args.kafka_fetch_wait,
                ..keel_sdk::events::KafkaOptions::default()
            };
            Bus::kafka("bench", options).await?
        }
        "in-process" => Bus::in_process("bench"),
        other => anyhow::bail!(
            "unknown transport {other:?} (rabbitmq, in-process{})",
            if cfg!(feature = "kafka") {
                ", kafka"
            } else {
                "; kafka needs the kafka feature"
            }
        ),
    })
}

/// Publishes until one event comes through, so that the runs start with the consumer in
/// place.
async fn warm_up(bus: &Bus, note: &Note) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        bus.publish(&Stamped {
            seq: 0,
            sent_us: now_us(),
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if handled(note) > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no event handled within 60 s");
    }
    // What is still in flight from the warm-up lands before the runs begin.
    tokio::time::sleep(Duration::from_secs(1)).await;
    note.ages.lock().map(|mut ages| ages.clear()).ok();
    Ok(())
}

fn handled(note: &Note) -> usize {
    note.ages.lock().map_or(0, |ages| ages.len())
}

async fn throughput(args: &Args, bus: &Bus, note: &Note) -> anyhow::Result<f64> {
    let started = Instant::now();
    let per_publisher = args.events.div_ceil(args.publishers.max(1));
    let total = per_publisher * args.publishers.max(1);
    let mut publishers = Vec::new();
    for publisher in 0..args.publishers.max(1) {
        let bus = bus.clone();
        publishers.push(tokio::spawn(async move {
            for n in 0..per_publisher {
                let seq = (publisher * per_publisher + n) as u64;
                bus.publish(&Stamped {
                    seq,
                    sent_us: now_us(),
                })
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while handled(note) < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {total} events handled",
            handled(note)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn latency(args: &Args, bus: &Bus, note: &Note) -> anyhow::Result<Option<LatencySummary>> {
    let rate = args.rate.max(1);
    let total = (args.latency_duration.as_secs_f64() * f64::from(rate)) as usize;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut sent = Vec::with_capacity(total);
    for seq in 0..total {
        ticks.tick().await;
        let bus = bus.clone();
        // Each publish on its own task: a slow confirm must not hold up the next send.
        sent.push(tokio::spawn(async move {
            bus.publish(&Stamped {
                seq: seq as u64,
                sent_us: now_us(),
            })
            .await
        }));
    }
    for publish in sent {
        publish.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while handled(note) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ages = note
        .ages
        .lock()
        .map(|ages| ages.clone())
        .unwrap_or_default();
    Ok(LatencySummary::of(ages))
}

async fn drop_database(postgres: &str, name: &str) {
    let url = postgres_url(postgres, "postgres");
    if let Ok(mut connection) = sqlx::PgConnection::connect(&url).await {
        let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        // The name is ours, made of hex digits and underscores.
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&mut connection)
            .await;
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}
