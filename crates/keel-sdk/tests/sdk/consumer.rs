//! What happens to a message that fails, or whose consumer dies: retries, dead letters and
//! replay; redelivery after a crash, absorbed by the inbox.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_runtime::Shutdown;
use keel_sdk::Tx;
use keel_sdk::data::{Backend, Database};
use keel_sdk::events::{Handler, HandlerError, Received};
use keel_testkit::{ChildTest, Service, child_role, require, unique_name};

use crate::helpers::{
    Apply, Deposited, MIGRATIONS, TestDb, Transport, backends, brokers, bus, bus_in, declare,
    deposit, effects, eventually, handled_order, record, run, transports,
};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_poison_message_is_dead_lettered_after_its_attempts_and_replays_once_fixed() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        let test = TestDb::sqlite().await;
        let apply = Apply::default();
        let (group, consumer) = declare(&bus, &test.db, apply.clone()).await;
        let running = run(consumer);

        bus.publish(&deposit("a", 1, 10)).await.unwrap();
        bus.publish(&deposit("a", 2, -5)).await.unwrap();
        bus.publish(&deposit("a", 3, 10)).await.unwrap();
        eventually(&format!("{transport:?}: dead-lettered"), WAIT, || async {
            running.stats.dead_lettered.load(Ordering::Relaxed) == 1
        })
        .await;
        // Three attempts: two retries, then the dead letter; the others went through.
        assert_eq!(
            running.stats.retried.load(Ordering::Relaxed),
            2,
            "{transport:?}"
        );
        // On Kafka the next message waits for the dead letter (retries are in place).
        eventually(
            &format!("{transport:?}: the others handled"),
            WAIT,
            || async { handled_order(&test.db, "a").await == [1, 3] },
        )
        .await;
        let dead = bus.dead_letters(&group, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{transport:?}: {dead:?}");
        assert_eq!(dead[0].attempts, 3, "{transport:?}");
        assert_eq!(dead[0].event_type, "keel.test.deposited.v1");
        assert!(
            dead[0].error.contains("negative amount -5"),
            "{:?}",
            dead[0]
        );
        assert!(dead[0].payload.contains("\"amount\":-5"), "{:?}", dead[0]);
        // Listing takes nothing away.
        assert_eq!(bus.dead_letters(&group, 10).await.unwrap().len(), 1);

        // Replaying an unknown id moves nothing; after the fix, the real one is handled.
        assert_eq!(
            bus.replay_dead_letters(&group, Some("no-such-id"))
                .await
                .unwrap(),
            0
        );
        apply.healed.store(true, Ordering::SeqCst);
        assert_eq!(
            bus.replay_dead_letters(&group, Some(&dead[0].id))
                .await
                .unwrap(),
            1,
            "{transport:?}"
        );
        eventually(&format!("{transport:?}: replayed"), WAIT, || async {
            handled_order(&test.db, "a").await == [1, 3, 2]
        })
        .await;
        assert!(bus.dead_letters(&group, 10).await.unwrap().is_empty());
        assert_eq!(effects(&test.db).await, (3, 3));
    }
}

/// A handler that refuses outright: dead-lettered at the first attempt.
struct Refuse;

impl Handler<Deposited> for Refuse {
    async fn handle(&self, _: &mut Tx, _: Received<Deposited>) -> Result<(), HandlerError> {
        Err(HandlerError::reject("accounts are closed"))
    }
}

#[tokio::test]
async fn a_rejected_event_is_dead_lettered_at_once_and_a_replay_that_fails_again_ends() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        let test = TestDb::sqlite().await;
        let (group, consumer) = declare(&bus, &test.db, Refuse).await;
        let running = run(consumer);
        bus.publish(&deposit("a", 1, 10)).await.unwrap();
        let dead_letters = |count| {
            let running = &running;
            move || async move { running.stats.dead_lettered.load(Ordering::Relaxed) == count }
        };
        eventually(&format!("{transport:?}: rejected"), WAIT, dead_letters(1)).await;
        assert_eq!(running.stats.retried.load(Ordering::Relaxed), 0);
        let dead = bus.dead_letters(&group, 10).await.unwrap();
        assert_eq!(dead[0].attempts, 1);
        assert_eq!(dead[0].error, "accounts are closed");

        // Rejected again at once while the replay may still be reading the queue: it is
        // replayed once, not round and round.
        let replayed = bus.replay_dead_letters(&group, None).await.unwrap();
        assert_eq!(replayed, 1, "{transport:?}");
        eventually(&format!("{transport:?}: dead again"), WAIT, dead_letters(2)).await;
        assert_eq!(bus.dead_letters(&group, 10).await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn hostile_bytes_from_the_broker_are_dead_lettered_unread() {
    for transport in brokers() {
        let bus = bus(transport, "bank").await;
        let test = TestDb::sqlite().await;
        let (group, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let running = run(consumer);

        // Straight onto the broker, past the SDK: not JSON; JSON but no envelope; an
        // envelope whose data does not fit the type.
        let mut wrong_data = keel_sdk::events::Envelope::new("bank", &deposit("a", 1, 1)).unwrap();
        wrong_data.data = serde_json::json!({"account": 7});
        let bodies = [
            b"\xff\xfe not json".to_vec(),
            br#"{"specversion":"1.0"}"#.to_vec(),
            wrong_data.to_vec(),
        ];
        match transport {
            #[cfg(feature = "kafka")]
            Transport::Kafka => {
                raw_produce(bus.exchange(), "keel.test.deposited.v1", &bodies).await
            }
            _ => raw_publish(bus.exchange(), "keel.test.deposited.v1", &bodies).await,
        }
        eventually(
            &format!("{transport:?}: three dead letters"),
            WAIT,
            || async { running.stats.dead_lettered.load(Ordering::Relaxed) == 3 },
        )
        .await;
        let dead = bus.dead_letters(&group, 10).await.unwrap();
        let errors: Vec<&str> = dead.iter().map(|letter| letter.error.as_str()).collect();
        assert_eq!(errors.len(), 3, "{transport:?}: {errors:?}");
        assert!(
            errors[0].starts_with("not a CloudEvents JSON envelope"),
            "{transport:?}: {errors:?}"
        );
        assert!(
            errors[1].starts_with("not a CloudEvents JSON envelope"),
            "{transport:?}: {errors:?}"
        );
        assert!(errors[2].contains("does not match its type"), "{errors:?}");
        assert_eq!(dead[2].id, wrong_data.id, "{transport:?}");
        assert_eq!(dead[0].attempts, 1, "{transport:?}: {:?}", dead[0]);
        // The consumer is still there for good messages.
        bus.publish(&deposit("a", 2, 1)).await.unwrap();
        eventually(
            &format!("{transport:?}: a good message after the bad"),
            WAIT,
            || async { effects(&test.db).await == (1, 1) },
        )
        .await;
    }
}

/// Produces `bodies` straight onto the type's topic of `namespace`, each with an attempt
/// header that is no number and a key that is no UTF-8.
#[cfg(feature = "kafka")]
async fn raw_produce(namespace: &str, event_type: &str, bodies: &[Vec<u8>]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", Service::Kafka.addr().to_string())
        .create()
        .unwrap();
    let topic = format!("{namespace}.{event_type}");
    for body in bodies {
        let headers = OwnedHeaders::new().insert(Header {
            key: "x-keel-attempt",
            value: Some(&b"\xff-1e99"[..]),
        });
        let record = FutureRecord::to(&topic)
            .payload(body)
            .key(&b"\xfe\xff"[..])
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }
}

async fn raw_publish(exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) {
    use lapin::options::BasicPublishOptions;
    let connection = lapin::Connection::connect(
        keel_sdk::events::RabbitMqOptions::default().url.expose(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // With confirms, each publish below is waited for until the broker has it: without,
    // it is only queued in lapin, and closing the connection at once could lose the last.
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    for body in bodies {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Records the deposit, then dies the moment the transaction has committed: before the
/// consumer can acknowledge the message.
struct ApplyThenDie;

impl Handler<Deposited> for ApplyThenDie {
    async fn handle(&self, tx: &mut Tx, deposit: Received<Deposited>) -> Result<(), HandlerError> {
        record(tx, &deposit.id, &deposit.event).await?;
        tx.after_commit(|| {
            println!("child: committed");
            std::process::abort();
        });
        Ok(())
    }
}

const KILLED_BEFORE_ACK: &str =
    "consumer::a_consumer_killed_between_commit_and_ack_gets_the_message_again_and_ignores_it";

#[tokio::test]
async fn a_consumer_killed_between_commit_and_ack_gets_the_message_again_and_ignores_it() {
    if child_role().as_deref() == Some("consumer") {
        let env = |name| std::env::var(name).unwrap();
        let db = Database::connect(&env("TEST_DB"), &MIGRATIONS)
            .await
            .unwrap();
        let transport = Transport::from_name(&env("TEST_TRANSPORT"));
        let bus = bus_in(transport, "bank", &env("TEST_EXCHANGE")).await;
        let consumer = bus
            .consumer(&env("TEST_GROUP"), &db)
            .on::<Deposited, _>(ApplyThenDie)
            .start()
            .await
            .unwrap();
        consumer.run(Shutdown::new()).await;
        return;
    }
    for (backend, transport) in backends().into_iter().flat_map(|backend| {
        brokers()
            .into_iter()
            .map(move |transport| (backend, transport))
    }) {
        let what = format!("{backend:?} {transport:?}");
        let test = TestDb::of(backend).await;
        let exchange = unique_name("keel-test");
        let bus = bus_in(transport, "bank", &exchange).await;
        let (group, consumer) = declare(&bus, &test.db, Apply::default()).await;
        bus.publish(&deposit("a", 1, 5)).await.unwrap();

        let mut child = ChildTest::spawn(
            KILLED_BEFORE_ACK,
            "consumer",
            &[
                ("TEST_DB", &test.url),
                ("TEST_EXCHANGE", &exchange),
                ("TEST_GROUP", &group),
                ("TEST_TRANSPORT", transport.name()),
            ],
        );
        child.wait_for("child: committed", WAIT).await;
        let status = child.wait_exit(WAIT).await;
        assert!(!status.success(), "{what}: the child crashed");
        assert_eq!(effects(&test.db).await, (1, 1), "{what}: committed");

        // The message was never acknowledged (RabbitMQ) or its offset committed (Kafka):
        // the broker gives it to the next consumer of the group, whose inbox knows it.
        let running = run(consumer);
        eventually(&format!("{what}: redelivered"), WAIT, || async {
            running.stats.duplicates.load(Ordering::Relaxed) == 1
        })
        .await;
        assert_eq!(running.stats.handled.load(Ordering::Relaxed), 0, "{what}");
        assert_eq!(effects(&test.db).await, (1, 1), "{what}: once");
    }
}

#[tokio::test]
async fn a_message_waits_out_a_database_outage_without_using_up_its_attempts() {
    if !require(Service::Postgres) {
        return;
    }
    let database = keel_testkit::TestDatabase::create().await;
    let proxy = keel_testkit::FaultProxy::start(Service::Postgres.addr()).await;
    let url = format!("postgres://postgres@{}/{}", proxy.addr(), database.name);
    let db = Database::connect(&url, &MIGRATIONS).await.unwrap();
    let transports = transports();
    for &transport in &transports {
        let bus = bus(transport, "bank").await;
        let (_, consumer) = declare(&bus, &db, Apply::default()).await;
        let running = run(consumer);
        proxy.cut();
        bus.publish(&deposit(&format!("{transport:?}"), 1, 5))
            .await
            .unwrap();
        // Longer than the three quick attempts would take, had the outage counted.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stats = &running.stats;
        assert_eq!(stats.retried.load(Ordering::Relaxed), 0, "{transport:?}");
        assert_eq!(
            stats.dead_lettered.load(Ordering::Relaxed),
            0,
            "{transport:?}"
        );
        proxy.restore();
        eventually(
            &format!("{transport:?}: handled after the outage"),
            WAIT,
            || async { stats.handled.load(Ordering::Relaxed) == 1 },
        )
        .await;
    }
    let events = transports.len() as i64;
    assert_eq!(effects(&db).await, (events, events));
}

/// [`Apply`], and on PostgreSQL (`.1`) the transaction each deposit was recorded in.
struct ApplyMarkingTx(Apply, bool);

impl Handler<Deposited> for ApplyMarkingTx {
    async fn handle(&self, tx: &mut Tx, deposit: Received<Deposited>) -> Result<(), HandlerError> {
        let id = deposit.id.clone();
        self.0.handle(tx, deposit).await?;
        if self.1 {
            keel_sdk::sqlx::query(
                "INSERT INTO tx_marks (event_id, txid) VALUES ($1, txid_current())",
            )
            .bind(id)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn waiting_messages_are_handled_in_batches_and_those_that_cannot_be_are_handled_alone() {
    if !require(Service::RabbitMq) {
        return;
    }
    for backend in backends() {
        let test = TestDb::of(backend).await;
        let postgres = backend == Backend::Postgres;
        if postgres {
            keel_sdk::sqlx::raw_sql(
                "CREATE TABLE tx_marks (event_id TEXT PRIMARY KEY, txid BIGINT NOT NULL)",
            )
            .execute(test.db.pool())
            .await
            .unwrap();
        }
        let bus = bus(Transport::RabbitMq, "bank").await;
        let handler = ApplyMarkingTx(Apply::default(), postgres);
        let (group, consumer) = declare(&bus, &test.db, handler).await;
        let envelope = |seq, amount| {
            keel_sdk::events::Envelope::new("bank", &deposit("a", seq, amount)).unwrap()
        };
        let counts = consumer.stats();
        let pool = test.db.pool().clone();
        let settled = |handled: u64, dead: u64| {
            let stats = counts.clone();
            let pool = pool.clone();
            let what = format!("{backend:?}: {handled} handled, {dead} dead-lettered");
            async move {
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    let now = (
                        stats.handled.load(Ordering::Relaxed),
                        stats.dead_lettered.load(Ordering::Relaxed),
                        stats.duplicates.load(Ordering::Relaxed),
                        stats.retried.load(Ordering::Relaxed),
                    );
                    if (now.0, now.1) == (handled, dead) {
                        return now;
                    }
                    // What the consumer did so far, when it did not get there, and what
                    // the database's sessions are doing.
                    if tokio::time::Instant::now() >= deadline {
                        let sessions: Vec<(Option<String>, Option<String>, Option<String>)> =
                            if postgres {
                                keel_sdk::sqlx::query_as(
                                    "SELECT state, wait_event, query FROM pg_stat_activity \
                                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                                )
                                .fetch_all(&pool)
                                .await
                                .unwrap_or_default()
                            } else {
                                Vec::new()
                            };
                        panic!(
                            "{what}: not within {WAIT:?}; (handled, dead, duplicates, retried) = {now:?}; database waits {}; sessions {sessions:?}",
                            stats.database_waits.load(Ordering::Relaxed)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };

        // Forty deposits waiting before the consumer starts: handled in far fewer
        // transactions than deposits.
        let good: Vec<Vec<u8>> = (1..=40).map(|seq| envelope(seq, 1).to_vec()).collect();
        raw_publish(bus.exchange(), "keel.test.deposited.v1", &good).await;
        let running = run(consumer.batch(8));
        let stats = settled(40, 0).await;
        assert_eq!(stats, (40, 0, 0, 0), "{backend:?}");
        assert_eq!(effects(&test.db).await, (40, 40), "{backend:?}");
        if postgres {
            let (marks, transactions): (i64, i64) =
                keel_sdk::sqlx::query_as("SELECT count(*), count(DISTINCT txid) FROM tx_marks")
                    .fetch_one(test.db.pool())
                    .await
                    .unwrap();
            assert_eq!(marks, 40);
            assert!(
                transactions <= 20,
                "{transactions} transactions for 40 deposits"
            );
        }

        // Then twenty more with, among them, a poison one (retried, then dead-lettered),
        // bytes that are no envelope (dead-lettered at once) and a second copy of one
        // deposit (the inbox knows it): each of the others is still handled once.
        let mut bodies: Vec<Vec<u8>> = (41..=60).map(|seq| envelope(seq, 1).to_vec()).collect();
        bodies.insert(5, envelope(99, -5).to_vec());
        bodies.insert(10, b"not an envelope".to_vec());
        let copied = bodies[15].clone();
        bodies.insert(16, copied);
        raw_publish(bus.exchange(), "keel.test.deposited.v1", &bodies).await;
        let stats = settled(60, 2).await;
        assert_eq!(
            stats,
            (60, 2, 1, 2),
            "{backend:?}: (handled, dead, duplicates, retried)"
        );
        assert_eq!(effects(&test.db).await, (60, 60), "{backend:?}: each once");
        let balance: i64 =
            keel_sdk::sqlx::query_scalar("SELECT balance FROM accounts WHERE account = 'a'")
                .fetch_one(test.db.pool())
                .await
                .unwrap();
        assert_eq!(balance, 60, "{backend:?}");
        let dead = bus.dead_letters(&group, 10).await.unwrap();
        assert_eq!(dead.len(), 2, "{backend:?}: {dead:?}");
        assert!(
            dead.iter()
                .any(|letter| letter.error.contains("negative amount")),
            "{dead:?}"
        );
        drop(running);
    }
}
