//! Publish and consume on both transports: groups, competing consumers, commands,
//! deduplication, trace context.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_sdk::events::{Bus, BusError, Envelope};

use crate::helpers::{
    Apply, Deposited, TestDb, Transport, backends, bus, declare, deposit, effects, eventually,
    handled_order, run, transports,
};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn every_group_gets_each_event_once_and_competing_consumers_share_it() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        // Two instances of the ledger service share its database, as in production.
        let ledger = TestDb::sqlite().await;
        let audit = TestDb::sqlite().await;
        let (group, first) = declare(&bus, &ledger.db, Apply::default()).await;
        let second = bus
            .consumer(&group, &ledger.db)
            .on::<Deposited, _>(Apply::default())
            .start()
            .await
            .unwrap();
        let ledgers = [run(first), run(second)];
        let (_, consumer) = declare(&bus, &audit.db, Apply::default()).await;
        let _audit = run(consumer);

        for seq in 0..40 {
            bus.publish(&deposit(&format!("acct-{}", seq % 4), seq, 10))
                .await
                .unwrap();
        }
        for db in [&ledger.db, &audit.db] {
            eventually(&format!("{transport:?}: 40 effects"), WAIT, || async {
                effects(db).await == (40, 40)
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            effects(&ledger.db).await,
            (40, 40),
            "{transport:?}: no extra"
        );
        let shares: Vec<u64> = ledgers
            .iter()
            .map(|running| running.stats.handled.load(Ordering::Relaxed))
            .collect();
        assert_eq!(shares.iter().sum::<u64>(), 40, "{transport:?}: {shares:?}");
    }
}

/// How many competing consumers of one group still see each key's events in order: Kafka
/// keeps a key in one partition, which one consumer of a group holds at a time; RabbitMQ
/// and the in-process bus hand a queue's messages round, so only one consumer keeps order.
fn order_keeping_consumers(transport: Transport) -> usize {
    match transport {
        #[cfg(feature = "kafka")]
        Transport::Kafka => 2,
        _ => 1,
    }
}

#[tokio::test]
async fn each_keys_events_are_handled_in_the_order_they_were_published() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        let test = TestDb::sqlite().await;
        let (group, first) = declare(&bus, &test.db, Apply::default()).await;
        let mut running = vec![run(first)];
        for _ in 1..order_keeping_consumers(transport) {
            let another = bus
                .consumer(&group, &test.db)
                .on::<Deposited, _>(Apply::default())
                .start()
                .await
                .unwrap();
            running.push(run(another));
        }
        // Interleaved keys, each with its own rising sequence.
        for seq in 0..60 {
            bus.publish(&deposit(&format!("acct-{}", seq % 3), seq, 1))
                .await
                .unwrap();
        }
        eventually(&format!("{transport:?}: 60 effects"), WAIT, || async {
            effects(&test.db).await == (60, 60)
        })
        .await;
        for key in 0..3 {
            let order = handled_order(&test.db, &format!("acct-{key}")).await;
            let published: Vec<i64> = (0..60).filter(|seq| seq % 3 == key).collect();
            assert_eq!(order, published, "{transport:?}: acct-{key}");
        }
    }
}

#[tokio::test]
async fn an_event_too_large_for_a_consumer_is_refused_when_published_or_staged() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        let test = TestDb::sqlite().await;
        let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let _running = run(consumer);
        let huge = deposit(&"x".repeat(keel_sdk::events::MAX_ENVELOPE_BYTES), 1, 1);
        let error = bus.publish(&huge).await.unwrap_err();
        assert!(
            matches!(error, BusError::TooLarge(_)),
            "{transport:?}: {error}"
        );
        let mut tx = test.db.begin().await.unwrap();
        let error = bus.stage(&mut tx, &huge).await.unwrap_err();
        assert!(
            matches!(error, BusError::TooLarge(_)),
            "{transport:?}: {error}"
        );
        tx.commit().await.unwrap();
        let staged: i64 = keel_sdk::sqlx::query_scalar("SELECT count(*) FROM keel_outbox")
            .fetch_one(test.db.pool())
            .await
            .unwrap();
        assert_eq!(staged, 0, "{transport:?}: nothing staged");
        // The bus goes on with events of a fitting size.
        bus.publish(&deposit("a", 2, 1)).await.unwrap();
        eventually(&format!("{transport:?}: handled"), WAIT, || async {
            effects(&test.db).await == (1, 1)
        })
        .await;
    }
}

#[tokio::test]
async fn a_redelivered_event_changes_nothing() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        let test = TestDb::sqlite().await;
        let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let running = run(consumer);

        // The same envelope three times over, as a relay that crashed before deleting
        // its batch would publish it again.
        let envelope = Envelope::new("bank", &deposit("a", 1, 5)).unwrap();
        for _ in 0..3 {
            bus.publish_envelope(&envelope).await.unwrap();
        }
        eventually(
            &format!("{transport:?}: two duplicates seen"),
            WAIT,
            || async { running.stats.duplicates.load(Ordering::Relaxed) == 2 },
        )
        .await;
        assert_eq!(effects(&test.db).await, (1, 1), "{transport:?}");
        assert_eq!(
            running.stats.handled.load(Ordering::Relaxed),
            1,
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn a_command_needs_a_group_that_handles_it() {
    for transport in transports() {
        let bus = bus(transport, "bank").await;
        let error = bus.send(&deposit("a", 1, 5)).await.unwrap_err();
        assert!(
            matches!(error, BusError::Unroutable(ref t) if t == "keel.test.deposited.v1"),
            "{transport:?}: {error}"
        );
        // An event may go unheard.
        bus.publish(&deposit("a", 2, 5)).await.unwrap();

        let test = TestDb::sqlite().await;
        let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let _running = run(consumer);
        bus.send(&deposit("a", 3, 5)).await.unwrap();
        eventually(
            &format!("{transport:?}: the command handled"),
            WAIT,
            || async { handled_order(&test.db, "a").await == [3] },
        )
        .await;
    }
}

#[tokio::test]
async fn a_consumer_without_handlers_or_with_a_bad_group_is_refused() {
    let bus = Bus::in_process("bank");
    let test = TestDb::sqlite().await;
    let error = bus
        .consumer("ledger", &test.db)
        .start()
        .await
        .err()
        .unwrap();
    assert!(matches!(error, BusError::NoHandlers(_)), "{error}");
    let error = bus
        .consumer("Ledger Group", &test.db)
        .on::<Deposited, _>(Apply::default())
        .start()
        .await
        .err()
        .unwrap();
    assert!(matches!(error, BusError::GroupName(_)), "{error}");
}

#[tokio::test]
async fn the_envelope_carries_the_publishers_trace() {
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut envelope = Envelope::new("bank", &deposit("a", 1, 1)).unwrap();
    envelope.traceparent = Some(parent.to_owned());
    let back = Envelope::from_slice(&envelope.to_vec()).unwrap();
    use opentelemetry::trace::TraceContextExt;
    assert_eq!(
        back.trace_context()
            .span()
            .span_context()
            .trace_id()
            .to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[tokio::test]
async fn a_silent_broker_times_publishing_out_and_the_bus_recovers() {
    if !keel_testkit::require(keel_testkit::Service::RabbitMq) {
        return;
    }
    let proxy = keel_testkit::FaultProxy::start(keel_testkit::Service::RabbitMq.addr()).await;
    let options = keel_sdk::events::RabbitMqOptions {
        url: keel_runtime::Secret::new(format!("amqp://guest:guest@{}/%2f", proxy.addr())),
        timeout: Duration::from_millis(500),
        ..crate::helpers::rabbitmq_options(&keel_testkit::unique_name("keel-test"))
    };
    let bus = Bus::rabbitmq("bank", options).await.unwrap();
    bus.publish(&deposit("a", 1, 1)).await.unwrap();

    proxy.blackhole();
    let started = std::time::Instant::now();
    let error = bus.publish(&deposit("a", 2, 1)).await.unwrap_err();
    assert!(matches!(error, BusError::Timeout(_)), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    proxy.restore();
    eventually("publishing again", WAIT, || async {
        bus.publish(&deposit("a", 3, 1)).await.is_ok()
    })
    .await;
}

/// The buses of a process share their connections to a broker, but each tokio runtime has
/// its own: lapin's work for a connection runs on the runtime that made it, so a bus kept
/// from a runtime that has stopped must not lend its dead connection to a bus on another.
#[test]
fn a_bus_kept_from_a_stopped_runtime_does_not_stall_a_bus_on_another() {
    if !keel_testkit::require(keel_testkit::Service::RabbitMq) {
        return;
    }
    let options = keel_sdk::events::RabbitMqOptions {
        timeout: Duration::from_secs(2),
        ..crate::helpers::rabbitmq_options(&keel_testkit::unique_name("keel-test"))
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let kept = first.block_on(async {
        let bus = Bus::rabbitmq("bank", options.clone()).await.unwrap();
        bus.publish(&deposit("a", 1, 1)).await.unwrap();
        bus
    });
    drop(first);
    runtime().block_on(async {
        let bus = Bus::rabbitmq("bank", options.clone()).await.unwrap();
        bus.publish(&deposit("a", 2, 1)).await.unwrap();
    });
    drop(kept);
}

#[tokio::test]
async fn a_redelivered_event_is_recognized_whatever_its_id_holds() {
    // On PostgreSQL the inbox row travels with BEGIN in the simple protocol: ids (printable
    // ASCII, as envelopes allow) that would end a literal, escape it, or differ only after
    // the quote must stay data.
    let ids = [
        "it's');DROP/**/TABLE/**/keel_inbox;--",
        "it's');DROP/**/TABLE/**/keel_inbox;--another",
        r"back\slash\'E'\x27'$$dollar$$",
        "plain-id",
    ];
    for backend in backends() {
        let bus = bus(Transport::InProcess, "bank").await;
        let test = TestDb::of(backend).await;
        let (_, consumer) = declare(&bus, &test.db, Apply::default()).await;
        let running = run(consumer);
        for (seq, id) in ids.iter().enumerate() {
            let seq = i64::try_from(seq).unwrap() + 1;
            let mut envelope = Envelope::new("bank", &deposit("a", seq, 1)).unwrap();
            envelope.id = (*id).to_owned();
            for _ in 0..2 {
                bus.publish_envelope(&envelope).await.unwrap();
            }
        }
        eventually(
            &format!("{backend:?}: every duplicate seen"),
            WAIT,
            || async { running.stats.duplicates.load(Ordering::Relaxed) == ids.len() as u64 },
        )
        .await;
        assert_eq!(effects(&test.db).await, (4, 4), "{backend:?}");
        let mut recorded: Vec<String> =
            keel_sdk::sqlx::query_scalar("SELECT event_id FROM keel_inbox ORDER BY event_id")
                .fetch_all(test.db.pool())
                .await
                .unwrap();
        let mut expected = ids.map(str::to_owned).to_vec();
        expected.sort();
        recorded.sort();
        assert_eq!(recorded, expected, "{backend:?}: stored as sent");
    }
}
