//! Shared fixtures: databases on both backends, buses on both transports, a test event and
//! handlers that leave a trace in the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_runtime::Shutdown;
use keel_sdk::data::{Backend, Database, Migrations};
use keel_sdk::events::{
    Bus, Consumer, ConsumerStats, Event, Handler, HandlerError, RabbitMqOptions, Received,
    RetryPolicy,
};
use keel_sdk::{Tx, sqlx};
#[cfg(feature = "kafka")]
use keel_testkit::KAFKA_FETCH_WAIT;
use keel_testkit::{Service, TestDatabase, TestSqlite, require, unique_name};
use serde::{Deserialize, Serialize};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("tests/sdk/migrations/postgres"),
    sqlite: sqlx::migrate!("tests/sdk/migrations/sqlite"),
};

/// A database for one test; keeps its PostgreSQL database or SQLite file alive.
pub struct TestDb {
    pub db: Database,
    pub url: String,
    _postgres: Option<TestDatabase>,
    _sqlite: Option<TestSqlite>,
}

impl TestDb {
    pub async fn sqlite() -> Self {
        let file = TestSqlite::new("keel-sdk");
        let url = file.url();
        Self {
            db: Database::connect(&url, &MIGRATIONS).await.unwrap(),
            url,
            _postgres: None,
            _sqlite: Some(file),
        }
    }

    pub async fn postgres() -> Self {
        let database = TestDatabase::create().await;
        let url = database.url.clone();
        Self {
            db: Database::connect(&url, &MIGRATIONS).await.unwrap(),
            url,
            _postgres: Some(database),
            _sqlite: None,
        }
    }

    pub async fn of(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => Self::postgres().await,
            Backend::Sqlite => Self::sqlite().await,
        }
    }
}

/// SQLite always; PostgreSQL when it answers (or is required).
pub fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite];
    if require(Service::Postgres) {
        backends.push(Backend::Postgres);
    }
    backends
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    InProcess,
    RabbitMq,
    #[cfg(feature = "kafka")]
    Kafka,
}

/// The in-process bus always; RabbitMQ and (with the `kafka` feature) Kafka when they
/// answer (or are required).
pub fn transports() -> Vec<Transport> {
    let mut transports = vec![Transport::InProcess];
    transports.extend(brokers());
    transports
}

/// The transports with a broker (messages outlive a process): RabbitMQ and, with the
/// `kafka` feature, Kafka, each when it answers (or is required).
pub fn brokers() -> Vec<Transport> {
    let mut brokers = Vec::new();
    if require(Service::RabbitMq) {
        brokers.push(Transport::RabbitMq);
    }
    #[cfg(feature = "kafka")]
    if require(Service::Kafka) {
        brokers.push(Transport::Kafka);
    }
    brokers
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::InProcess => "in-process",
            Self::RabbitMq => "rabbitmq",
            #[cfg(feature = "kafka")]
            Self::Kafka => "kafka",
        }
    }

    pub fn from_name(name: &str) -> Self {
        match name {
            "rabbitmq" => Self::RabbitMq,
            #[cfg(feature = "kafka")]
            "kafka" => Self::Kafka,
            _ => Self::InProcess,
        }
    }
}

/// RabbitMQ options private to one test: its own exchange, queues that expire.
pub fn rabbitmq_options(exchange: &str) -> RabbitMqOptions {
    RabbitMqOptions {
        exchange: exchange.to_owned(),
        queue_expiry: Some(Duration::from_secs(120)),
        auto_delete_exchange: true,
        ..RabbitMqOptions::default()
    }
}

/// Kafka options private to one test: its own namespace (topics and groups).
#[cfg(feature = "kafka")]
pub fn kafka_options(namespace: &str) -> keel_sdk::events::KafkaOptions {
    keel_sdk::events::KafkaOptions {
        namespace: namespace.to_owned(),
        partitions: 4,
        fetch_wait: KAFKA_FETCH_WAIT,
        ..keel_sdk::events::KafkaOptions::default()
    }
}

/// A bus of `transport` on a namespace (exchange, topics) of its own.
pub async fn bus(transport: Transport, service: &str) -> Bus {
    bus_in(transport, service, &unique_name("keel-test")).await
}

/// A bus of `transport` on the exchange (RabbitMQ) or namespace (Kafka) `name`: how a child
/// process joins its parent's.
pub async fn bus_in(transport: Transport, service: &str, name: &str) -> Bus {
    match transport {
        Transport::InProcess => Bus::in_process(service),
        Transport::RabbitMq => Bus::rabbitmq(service, rabbitmq_options(name))
            .await
            .unwrap(),
        #[cfg(feature = "kafka")]
        Transport::Kafka => Bus::kafka(service, kafka_options(name)).await.unwrap(),
    }
}

/// A short retry policy for tests: three attempts, 50 then 100 ms apart.
pub fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        first_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(100),
        handler_timeout: Duration::from_secs(10),
    }
}

/// A consumer of deposits in a fresh group, declared (so that what is published from now
/// on reaches it) but not yet running.
pub async fn declare<H: Handler<Deposited>>(
    bus: &Bus,
    db: &Database,
    handler: H,
) -> (String, Consumer) {
    let group = unique_name("ledger");
    let consumer = bus
        .consumer(&group, db)
        .on::<Deposited, _>(handler)
        .retry(quick_retries())
        .start()
        .await
        .unwrap();
    (group, consumer)
}

/// A running consumer (and whatever else was started under its shutdown); stops when
/// dropped.
pub struct Running {
    pub stats: Arc<ConsumerStats>,
    pub shutdown: Shutdown,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

pub fn run(consumer: Consumer) -> Running {
    let stats = consumer.stats();
    let shutdown = Shutdown::new();
    tokio::spawn(consumer.run(shutdown.clone()));
    Running { stats, shutdown }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Deposited {
    pub account: String,
    pub seq: i64,
    pub amount: i64,
}

impl Event for Deposited {
    const TYPE: &'static str = "keel.test.deposited.v1";
    fn key(&self) -> String {
        self.account.clone()
    }
}

pub fn deposit(account: &str, seq: i64, amount: i64) -> Deposited {
    Deposited {
        account: account.to_owned(),
        seq,
        amount,
    }
}

/// Records each deposit as an effect row and adds it to the account's balance. A
/// negative amount fails (retriably) until `healed` is set: a poison message that a fix
/// later cures.
#[derive(Clone, Default)]
pub struct Apply {
    pub healed: Arc<AtomicBool>,
}

impl Handler<Deposited> for Apply {
    async fn handle(&self, tx: &mut Tx, deposit: Received<Deposited>) -> Result<(), HandlerError> {
        let event = deposit.event;
        if event.amount < 0 && !self.healed.load(Ordering::SeqCst) {
            return Err(HandlerError::Retry(format!(
                "negative amount {}",
                event.amount
            )));
        }
        record(tx, &deposit.id, &event).await?;
        Ok(())
    }
}

pub async fn record(tx: &mut Tx, event_id: &str, event: &Deposited) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO effects (event_id, account, seq) VALUES ($1, $2, $3)")
        .bind(event_id)
        .bind(&event.account)
        .bind(event.seq)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO accounts (account, balance) VALUES ($1, $2) \
         ON CONFLICT (account) DO UPDATE SET balance = accounts.balance + excluded.balance",
    )
    .bind(&event.account)
    .bind(event.amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// (effect rows, distinct events among them).
pub async fn effects(db: &Database) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM effects")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// The sequence numbers of `account`'s effects in the order they were handled.
pub async fn handled_order(db: &Database, account: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM effects WHERE account = $1 ORDER BY id")
        .bind(account)
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registry server on port 0 and a client of it.
pub async fn registry(
    shutdown: &Shutdown,
    acl_token: Option<&str>,
) -> (
    keel_testkit::TestServer,
    keel_registry::client::RegistryClient,
) {
    let acl_token = acl_token.map(|token| keel_runtime::Secret::new(token.to_owned()));
    let config = keel_registry::RegistryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        acl_token: acl_token.clone(),
        ..keel_registry::RegistryConfig::default()
    };
    let server = keel_registry::RegistryServer::build(config, shutdown)
        .await
        .unwrap();
    let registry = keel_testkit::spawn(server);
    let client = keel_registry::client::RegistryClient::new(&registry.url, acl_token).unwrap();
    (registry, client)
}
