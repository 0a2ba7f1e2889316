//! `keel events`: the event bus's dead letters, listed and replayed from the command line
//! (RabbitMQ, or Kafka in a build with the `kafka` feature; an in-process bus's dead letters
//! live in its service, under `/admin/dead-letters/<group>`).

use clap::{Args, Subcommand};
use keel_runtime::Secret;
use keel_sdk::events::{Bus, RabbitMqOptions};

#[derive(Args)]
pub struct EventsArgs {
    #[command(subcommand)]
    command: EventsCommand,
    /// The broker, `amqp://user:password@host:5672/%2f` (from the environment, so the
    /// password stays out of the process list).
    #[arg(
        long,
        global = true,
        env = "KEEL_RABBITMQ_URL",
        hide_env_values = true,
        hide_default_value = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    /// The services' exchange (it must exist; the group's queues are named after it), or
    /// on Kafka their namespace.
    #[arg(
        long,
        global = true,
        env = "KEEL_RABBITMQ_EXCHANGE",
        default_value = "keel.events"
    )]
    exchange: String,
    /// Kafka's brokers, `host:port[,…]`: given, the bus is Kafka rather than RabbitMQ.
    #[cfg(feature = "kafka")]
    #[arg(long, global = true, env = "KEEL_KAFKA_BROKERS")]
    kafka: Option<String>,
}

/// Never the URL: it holds the broker's password.
impl std::fmt::Debug for EventsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsArgs")
            .field("command", &self.command)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// List a consumer group's dead letters, oldest first, one JSON object per line.
    DeadLetters {
        /// The consumer group (usually the consuming service's name).
        #[arg(long)]
        group: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put a consumer group's dead letters back on its queue as first attempts.
    Replay {
        #[arg(long)]
        group: String,
        /// Only the dead letter with this envelope id (default: all of them).
        #[arg(long)]
        id: Option<String>,
    },
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let bus = bus(&args).await?;
    match args.command {
        EventsCommand::DeadLetters { group, limit } => {
            for letter in bus.dead_letters(&group, limit).await? {
                println!("{}", serde_json::to_string(&letter)?);
            }
        }
        EventsCommand::Replay { group, id } => {
            let replayed = bus.replay_dead_letters(&group, id.as_deref()).await?;
            println!("replayed {replayed}");
        }
    }
    Ok(())
}

async fn bus(args: &EventsArgs) -> anyhow::Result<Bus> {
    #[cfg(feature = "kafka")]
    if let Some(brokers) = &args.kafka {
        let options = keel_sdk::events::KafkaOptions {
            brokers: brokers.clone(),
            namespace: args.exchange.clone(),
            ..keel_sdk::events::KafkaOptions::default()
        };
        return Ok(Bus::kafka("keel-cli", options).await?);
    }
    let options = RabbitMqOptions {
        url: Secret::new(args.url.clone()),
        exchange: args.exchange.clone(),
        passive_exchange: true,
        ..RabbitMqOptions::default()
    };
    Ok(Bus::rabbitmq("keel-cli", options).await?)
}
