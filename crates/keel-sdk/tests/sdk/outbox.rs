//! The transactional outbox: nothing committed is lost to a crash, nothing rolled back is
//! published, one relay at a time keeps each aggregate's order.

use std::time::Duration;

use keel_runtime::Shutdown;
use keel_sdk::data::Database;
use keel_sdk::events::{Bus, RelayOptions};
use keel_sdk::sqlx;
use keel_testkit::{ChildTest, child_role};

use crate::helpers::{
    Apply, MIGRATIONS, TestDb, Transport, backends, brokers, bus, bus_in, declare, deposit,
    effects, eventually, handled_order, run, transports,
};

const WAIT: Duration = Duration::from_secs(20);

async fn outbox_rows(db: &Database) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM keel_outbox")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// The bus a child process uses: the parent's transport on its exchange or namespace (in
/// process, a bus of its own: the child never gets to publish on it).
async fn child_bus() -> Bus {
    let env = |name| std::env::var(name).unwrap();
    bus_in(
        Transport::from_name(&env("TEST_TRANSPORT")),
        "bank",
        &env("TEST_EXCHANGE"),
    )
    .await
}

const CRASH_AFTER_COMMIT: &str =
    "outbox::a_process_killed_between_commit_and_publish_loses_no_event";

#[tokio::test]
async fn a_process_killed_between_commit_and_publish_loses_no_event() {
    if child_role().as_deref() == Some("stager") {
        let db = Database::connect(&std::env::var("TEST_DB").unwrap(), &MIGRATIONS)
            .await
            .unwrap();
        let bus = child_bus().await;
        // No relay in the child: on this single-threaded runtime a relay's first round can
        // run while the commit is awaited, and publish before the abort (it did, once). The
        // crash therefore always comes between the commit and any publication.
        let mut tx = db.begin().await.unwrap();
        tx.after_commit(|| {
            println!("child: committed");
            std::process::abort();
        });
        sqlx::query("INSERT INTO accounts (account, balance) VALUES ('opened', 0)")
            .execute(&mut *tx)
            .await
            .unwrap();
        bus.stage(&mut tx, &deposit("a", 1, 5)).await.unwrap();
        tx.commit().await.unwrap();
        return;
    }
    for backend in backends() {
        for transport in transports() {
            let test = TestDb::of(backend).await;
            let bus = bus(transport, "bank").await;
            let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
            let env = [
                ("TEST_DB", test.url.as_str()),
                ("TEST_EXCHANGE", bus.exchange()),
                ("TEST_TRANSPORT", transport.name()),
            ];
            let mut child = ChildTest::spawn(CRASH_AFTER_COMMIT, "stager", &env);
            child.wait_for("child: committed", WAIT).await;
            assert!(!child.wait_exit(WAIT).await.success());
            let what = format!("{backend:?} {transport:?}");
            assert_eq!(
                outbox_rows(&test.db).await,
                1,
                "{what}: staged, not relayed"
            );

            let running = run(consumer);
            tokio::spawn(bus.relay(&test.db).run(running.shutdown.clone()));
            eventually(&format!("{what}: relayed and handled"), WAIT, || async {
                effects(&test.db).await == (1, 1)
            })
            .await;
            eventually(&format!("{what}: outbox emptied"), WAIT, || async {
                outbox_rows(&test.db).await == 0
            })
            .await;
        }
    }
}

/// A batch's rows are deleted with the relay's next look at the table; a relay that stops
/// deletes what it published first, or the next one would publish it again.
#[tokio::test]
async fn a_stopping_relay_leaves_nothing_it_published_behind() {
    for backend in backends() {
        for transport in transports() {
            let test = TestDb::of(backend).await;
            let bus = bus(transport, "bank").await;
            let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
            let _running = run(consumer);
            let what = format!("{backend:?} {transport:?}");
            // No poll within the test, and the one commit made once the relay waits for
            // it: only the stop can delete the published row.
            let relay = bus.relay(&test.db).options(RelayOptions {
                poll_interval: Duration::from_secs(600),
                ..RelayOptions::default()
            });
            let stop = Shutdown::new();
            let relaying = tokio::spawn(relay.run(stop.clone()));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut tx = test.db.begin().await.unwrap();
            bus.stage(&mut tx, &deposit("a", 1, 5)).await.unwrap();
            tx.commit().await.unwrap();
            eventually(&format!("{what}: relayed and handled"), WAIT, || async {
                effects(&test.db).await == (1, 1)
            })
            .await;
            stop.trigger();
            tokio::time::timeout(WAIT, relaying).await.unwrap().unwrap();
            assert_eq!(outbox_rows(&test.db).await, 0, "{what}");
        }
    }
}

#[tokio::test]
async fn a_rolled_back_transaction_publishes_nothing() {
    for transport in transports() {
        let test = TestDb::sqlite().await;
        let bus = bus(transport, "bank").await;
        let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let running = run(consumer);
        tokio::spawn(bus.relay(&test.db).run(running.shutdown.clone()));

        let mut tx = test.db.begin().await.unwrap();
        bus.stage(&mut tx, &deposit("a", 1, 5)).await.unwrap();
        tx.rollback().await.unwrap();
        let mut tx = test.db.begin().await.unwrap();
        bus.stage(&mut tx, &deposit("a", 2, 5)).await.unwrap();
        tx.commit().await.unwrap();
        eventually(
            &format!("{transport:?}: the committed one"),
            WAIT,
            || async { effects(&test.db).await == (1, 1) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(handled_order(&test.db, "a").await, [2], "{transport:?}");
    }
}

const EVENTS: i64 = 600;
const ACCOUNTS: i64 = 3;

async fn stage_many(bus: &Bus, db: &Database) {
    for seq in 0..EVENTS {
        let mut tx = db.begin().await.unwrap();
        bus.stage(
            &mut tx,
            &deposit(&format!("acct-{}", seq % ACCOUNTS), seq, 1),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
}

async fn assert_all_once_in_order(db: &Database, what: &str) {
    eventually(&format!("{what}: every event handled"), WAIT, || async {
        effects(db).await.1 == EVENTS
    })
    .await;
    assert_eq!(effects(db).await, (EVENTS, EVENTS), "{what}: each once");
    for account in 0..ACCOUNTS {
        let order = handled_order(db, &format!("acct-{account}")).await;
        let expected: Vec<i64> = (0..EVENTS)
            .filter(|seq| seq % ACCOUNTS == account)
            .collect();
        assert_eq!(order, expected, "{what}: acct-{account} in commit order");
    }
}

const RELAY_KILLED: &str = "outbox::a_relay_killed_mid_stream_loses_nothing_and_keeps_order";

#[tokio::test]
async fn a_relay_killed_mid_stream_loses_nothing_and_keeps_order() {
    if child_role().as_deref() == Some("relay") {
        let db = Database::connect(&std::env::var("TEST_DB").unwrap(), &MIGRATIONS)
            .await
            .unwrap();
        let relay = child_bus().await.relay(&db).options(RelayOptions {
            batch_size: 1,
            ..RelayOptions::default()
        });
        println!("child: relaying");
        relay.run(Shutdown::new()).await;
        return;
    }
    for (backend, transport) in backends().into_iter().flat_map(|backend| {
        brokers()
            .into_iter()
            .map(move |transport| (backend, transport))
    }) {
        let what = format!("{backend:?} {transport:?}");
        let test = TestDb::of(backend).await;
        let bus = bus(transport, "bank").await;
        let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let running = run(consumer);
        // Everything is committed before any relay runs; the child relays one event per
        // round trip and dies partway.
        stage_many(&bus, &test.db).await;
        let exchange = bus.exchange().to_owned();
        let mut child = ChildTest::spawn(
            RELAY_KILLED,
            "relay",
            &[
                ("TEST_DB", &test.url),
                ("TEST_EXCHANGE", &exchange),
                ("TEST_TRANSPORT", transport.name()),
            ],
        );
        child.wait_for("child: relaying", WAIT).await;
        eventually(&format!("{what}: a third relayed"), WAIT, || async {
            outbox_rows(&test.db).await <= EVENTS * 2 / 3
        })
        .await;
        child.kill();
        let left = outbox_rows(&test.db).await;
        assert!(left > 0, "{what}: killed mid-stream ({left} left)");

        tokio::spawn(bus.relay(&test.db).run(running.shutdown.clone()));
        assert_all_once_in_order(&test.db, &what).await;
    }
}

#[tokio::test]
async fn two_relays_on_one_database_take_turns() {
    for backend in backends() {
        for transport in transports() {
            let what = format!("{backend:?} {transport:?}");
            let test = TestDb::of(backend).await;
            let bus = bus(transport, "bank").await;
            let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
            let running = run(consumer);
            // Two instances' relays, each with a pool of its own, small batches so that
            // they would interleave if both published.
            let second = Database::connect(&test.url, &MIGRATIONS).await.unwrap();
            let small = RelayOptions {
                batch_size: 3,
                poll_interval: Duration::from_millis(20),
            };
            tokio::spawn(
                bus.relay(&test.db)
                    .options(small.clone())
                    .run(running.shutdown.clone()),
            );
            tokio::spawn(
                bus.relay(&second)
                    .options(small)
                    .run(running.shutdown.clone()),
            );
            stage_many(&bus, &test.db).await;
            assert_all_once_in_order(&test.db, &what).await;
            // Had both published, the consumer would have seen events twice.
            let duplicates = running
                .stats
                .duplicates
                .load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(duplicates, 0, "{what}: one relay at a time");
        }
    }
}

#[tokio::test]
async fn staged_events_are_written_at_commit_in_staging_order_and_not_at_all_on_rollback() {
    let bus = bus(Transport::InProcess, "bank").await;
    for backend in backends() {
        let test = TestDb::of(backend).await;
        // More than one statement's worth of rows (32), staged in one transaction.
        let mut tx = test.db.begin().await.unwrap();
        for seq in 1..=40 {
            bus.stage(&mut tx, &deposit("a", seq, 1)).await.unwrap();
        }
        let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_outbox")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            inside, 0,
            "{backend:?}: written when the transaction commits"
        );
        tx.commit().await.unwrap();
        let envelopes: Vec<String> =
            sqlx::query_scalar("SELECT envelope FROM keel_outbox ORDER BY id")
                .fetch_all(test.db.pool())
                .await
                .unwrap();
        let seqs: Vec<i64> = envelopes
            .iter()
            .map(|envelope| {
                let envelope: serde_json::Value = serde_json::from_str(envelope).unwrap();
                envelope["data"]["seq"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "{backend:?}");
        let mut rolled_back = test.db.begin().await.unwrap();
        bus.stage(&mut rolled_back, &deposit("b", 1, 1))
            .await
            .unwrap();
        rolled_back.rollback().await.unwrap();
        let mut dropped = test.db.begin().await.unwrap();
        bus.stage(&mut dropped, &deposit("c", 1, 1)).await.unwrap();
        drop(dropped);
        assert_eq!(outbox_rows(&test.db).await, 40, "{backend:?}");
    }
}
