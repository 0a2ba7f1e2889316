//! Orchestrated sagas end to end: an orders-like orchestrator, inventory and payments
//! participants, on both transports; compensation, timeouts, and an orchestrator killed
//! mid-saga.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_runtime::Shutdown;
use keel_sdk::data::{Backend, Database};
use keel_sdk::events::{Bus, Envelope, Event, Handler, HandlerError, Received, Reply};
use keel_sdk::saga::{Ended, OnEnd, Orchestrator, Saga, SagaInstance, SagaStatus, Step};
use keel_sdk::{Tx, sqlx};
use keel_testkit::{ChildTest, Service, child_role, require, unique_name};
use serde::{Deserialize, Serialize};

use crate::helpers::{
    MIGRATIONS, TestDb, Transport, backends, bus, eventually, quick_retries, rabbitmq_options,
    transports,
};

const WAIT: Duration = Duration::from_secs(20);

/// What the saga is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    amount: i64,
}

macro_rules! command {
    ($name:ident, $type:literal) => {
        #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
        struct $name {
            order: String,
            amount: i64,
        }

        impl Event for $name {
            const TYPE: &'static str = $type;
            fn key(&self) -> String {
                self.order.clone()
            }
        }
    };
}

command!(Reserve, "keel.test.inventory.reserve.v1");
command!(Release, "keel.test.inventory.release.v1");
command!(Authorize, "keel.test.payments.authorize.v1");
command!(Void, "keel.test.payments.void.v1");
command!(Capture, "keel.test.payments.capture.v1");

/// The order saga; every step waits `WAIT` for its reply except `hasty`, which gives up
/// after 300 ms.
fn order_saga(hasty: Option<&str>) -> Saga<Order> {
    let command = |order: &Order| (order.id.clone(), order.amount);
    let timeout = |step: &str| {
        if hasty == Some(step) {
            Duration::from_millis(300)
        } else {
            WAIT
        }
    };
    Saga::new("order")
        .step(
            Step::new("reserve", move |order: &Order, _| {
                let (order, amount) = command(order);
                Reserve { order, amount }
            })
            .compensate(move |order: &Order, _| {
                let (order, amount) = command(order);
                Release { order, amount }
            })
            .timeout(timeout("reserve")),
        )
        .step(
            Step::new("authorize", move |order: &Order, _| {
                let (order, amount) = command(order);
                Authorize { order, amount }
            })
            .compensate(move |order: &Order, results| Void {
                // The authorization's own id, from the step's reply.
                // (Absent when the authorization timed out.)
                order: results
                    .get("authorize")
                    .and_then(|reply| reply["authorization"].as_str())
                    .unwrap_or(&order.id)
                    .to_owned(),
                amount: order.amount,
            })
            .timeout(timeout("authorize")),
        )
        .step(
            Step::new("capture", move |order: &Order, _| {
                let (order, amount) = command(order);
                Capture { order, amount }
            })
            .timeout(timeout("capture")),
        )
}

/// The participants' behaviour and what they did, in order.
#[derive(Clone, Default)]
struct World {
    log: Arc<Mutex<Vec<String>>>,
    /// Captures are refused.
    capture_fails: Arc<AtomicBool>,
    /// Captures are taken but never answered.
    capture_silent: Arc<AtomicBool>,
    /// Authorizations wait until this is set.
    authorize_gate: Arc<AtomicBool>,
}

impl World {
    fn open() -> Self {
        let world = Self::default();
        world.authorize_gate.store(true, Ordering::SeqCst);
        world
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// A participant: does `E` (logs it) and replies as the world says.
struct Participant {
    bus: Bus,
    world: World,
}

macro_rules! participate {
    ($command:ident) => {
        impl Handler<$command> for Participant {
            async fn handle(
                &self,
                tx: &mut Tx,
                received: Received<$command>,
            ) -> Result<(), HandlerError> {
                if let Some(reply) = self.act(stringify!($command), &received.event.order).await {
                    self.bus.reply(tx, &received, &reply).await?;
                }
                Ok(())
            }
        }
    };
}

participate!(Reserve);
participate!(Release);
participate!(Authorize);
participate!(Void);
participate!(Capture);

impl Participant {
    /// Does `command` and says what to reply (nothing, for a silent capture).
    async fn act(&self, command: &str, order: &str) -> Option<Reply> {
        let world = &self.world;
        if command == "Authorize" {
            while !world.authorize_gate.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if command == "Capture" && world.capture_silent.load(Ordering::SeqCst) {
            return None;
        }
        world.log.lock().unwrap().push(format!("{command} {order}"));
        if command == "Capture" && world.capture_fails.load(Ordering::SeqCst) {
            return Some(Reply::refused("the card was declined at capture"));
        }
        let authorization = format!("auth-{order}");
        Some(Reply::done(
            serde_json::json!({ "authorization": authorization }),
        ))
    }
}

/// Inventory and payments, each a consumer group with its own database.
async fn participants(bus: &Bus, world: &World, shutdown: &Shutdown) -> Vec<TestDb> {
    let inventory = TestDb::sqlite().await;
    let payments = TestDb::sqlite().await;
    let participant = || Participant {
        bus: bus.clone(),
        world: world.clone(),
    };
    let consumers = [
        bus.consumer(&unique_name("inventory"), &inventory.db)
            .on::<Reserve, _>(participant())
            .on::<Release, _>(participant()),
        bus.consumer(&unique_name("payments"), &payments.db)
            .on::<Authorize, _>(participant())
            .on::<Void, _>(participant())
            .on::<Capture, _>(participant()),
    ];
    for (consumer, db) in consumers.into_iter().zip([&inventory.db, &payments.db]) {
        let consumer = consumer.retry(quick_retries()).start().await.unwrap();
        tokio::spawn(consumer.run(shutdown.clone()));
        tokio::spawn(bus.relay(db).run(shutdown.clone()));
    }
    vec![inventory, payments]
}

/// Runs an orchestrator's consumer, relay and timeout sweep until `shutdown`.
async fn orchestrate(
    orchestrator: &Orchestrator<Order>,
    bus: &Bus,
    db: &Database,
    group: &str,
    shutdown: &Shutdown,
) {
    let consumer = orchestrator.consumer(group).await.unwrap();
    tokio::spawn(consumer.run(shutdown.clone()));
    tokio::spawn(bus.relay(db).run(shutdown.clone()));
    tokio::spawn(
        orchestrator
            .clone()
            .sweep_timeouts(Duration::from_millis(50), shutdown.clone()),
    );
}

/// An orchestrating "orders" service on SQLite with both participants, all running on
/// `transport` until dropped.
struct Scene {
    orchestrator: Orchestrator<Order>,
    orders: TestDb,
    shutdown: Shutdown,
    _participants: Vec<TestDb>,
}

impl Scene {
    async fn new(transport: Transport, world: &World, hasty: Option<&str>) -> Self {
        Self::on(Backend::Sqlite, transport, world, hasty).await
    }

    /// The orchestrator's database on `backend`.
    async fn on(
        backend: Backend,
        transport: Transport,
        world: &World,
        hasty: Option<&str>,
    ) -> Self {
        Self::running(backend, transport, world, order_saga(hasty)).await
    }

    /// `saga` run in process on SQLite, with both participants.
    async fn with(world: &World, saga: Saga<Order>) -> Self {
        Self::running(Backend::Sqlite, Transport::InProcess, world, saga).await
    }

    async fn running(
        backend: Backend,
        transport: Transport,
        world: &World,
        saga: Saga<Order>,
    ) -> Self {
        let bus = bus(transport, "orders").await;
        let shutdown = Shutdown::new();
        let participants = participants(&bus, world, &shutdown).await;
        let orders = TestDb::of(backend).await;
        let orchestrator = Orchestrator::new(&bus, &orders.db, saga).unwrap();
        let group = unique_name("orders");
        orchestrate(&orchestrator, &bus, &orders.db, &group, &shutdown).await;
        Self {
            orchestrator,
            orders,
            shutdown,
            _participants: participants,
        }
    }

    /// Starts a saga for order `id` and waits for it to finish.
    async fn run(&self, id: &str) -> SagaInstance {
        let order = Order {
            id: id.to_owned(),
            amount: 990,
        };
        let saga = start(&self.orchestrator, &self.orders.db, &order).await;
        finished(&self.orchestrator, &saga).await
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn start(orchestrator: &Orchestrator<Order>, db: &Database, order: &Order) -> String {
    let mut tx = db.begin().await.unwrap();
    let id = orchestrator.start(&mut tx, order).await.unwrap();
    tx.commit().await.unwrap();
    id
}

async fn finished(orchestrator: &Orchestrator<Order>, id: &str) -> SagaInstance {
    eventually("the saga finishes", WAIT, || async {
        let instance = orchestrator.instance(id).await.unwrap().unwrap();
        instance.status.is_final()
    })
    .await;
    orchestrator.instance(id).await.unwrap().unwrap()
}

/// Every orchestrator backend with every transport.
fn combinations() -> Vec<(Backend, Transport)> {
    let transports = transports();
    backends()
        .into_iter()
        .flat_map(|backend| {
            transports
                .iter()
                .map(move |&transport| (backend, transport))
        })
        .collect()
}

/// The history as "step phase outcome" lines.
fn history(instance: &SagaInstance) -> Vec<String> {
    instance
        .history
        .iter()
        .map(|record| format!("{} {} {}", record.step, record.phase, record.outcome))
        .collect()
}

#[tokio::test]
async fn a_saga_runs_its_steps_in_order_and_completes() {
    for (backend, transport) in combinations() {
        let world = World::open();
        let scene = Scene::on(backend, transport, &world, None).await;
        let instance = scene.run("o-1").await;
        assert_eq!(
            instance.status,
            SagaStatus::Completed,
            "{backend:?} {transport:?}"
        );
        assert_eq!(
            history(&instance),
            [
                "reserve action sent",
                "reserve action done",
                "authorize action sent",
                "authorize action done",
                "capture action sent",
                "capture action done",
            ],
            "{backend:?} {transport:?}"
        );
        assert_eq!(instance.results["authorize"]["authorization"], "auth-o-1");
        assert_eq!(world.log(), ["Reserve o-1", "Authorize o-1", "Capture o-1"]);
        assert_eq!(
            scene
                .orchestrator
                .list(SagaStatus::Completed, 10)
                .await
                .unwrap(),
            std::slice::from_ref(&instance.id)
        );
    }
}

#[tokio::test]
async fn a_failing_step_compensates_the_earlier_ones_in_reverse_order() {
    for (backend, transport) in combinations() {
        let world = World::open();
        world.capture_fails.store(true, Ordering::SeqCst);
        let scene = Scene::on(backend, transport, &world, None).await;
        let instance = scene.run("o-2").await;
        assert_eq!(
            instance.status,
            SagaStatus::Compensated,
            "{backend:?} {transport:?}"
        );
        let error = instance.error.clone().unwrap();
        assert!(
            error.contains("capture failed: the card was declined"),
            "{error}"
        );
        assert_eq!(
            world.log(),
            [
                "Reserve o-2",
                "Authorize o-2",
                "Capture o-2",
                // The compensation uses what the authorize step replied.
                "Void auth-o-2",
                "Release o-2",
            ],
            "{backend:?} {transport:?}"
        );
        let history = history(&instance);
        assert_eq!(
            history[history.len() - 4..],
            [
                "authorize compensation sent",
                "authorize compensation done",
                "reserve compensation sent",
                "reserve compensation done",
            ]
        );
    }
}

#[tokio::test]
async fn a_step_without_a_reply_times_out_and_is_compensated() {
    let world = World::open();
    world.capture_silent.store(true, Ordering::SeqCst);
    let scene = Scene::new(Transport::InProcess, &world, Some("capture")).await;
    let instance = scene.run("o-3").await;
    assert_eq!(instance.status, SagaStatus::Compensated);
    let lines = history(&instance);
    assert!(
        lines.contains(&"capture action timed_out".to_owned()),
        "{lines:?}"
    );
    assert!(instance.error.unwrap().contains("capture timed_out"));
    assert_eq!(
        world.log(),
        [
            "Reserve o-3",
            "Authorize o-3",
            "Void auth-o-3",
            "Release o-3"
        ]
    );
}

#[tokio::test]
async fn a_step_that_times_out_is_compensated_too_without_holding_up_the_earlier_steps() {
    let world = World::open();
    world.authorize_gate.store(false, Ordering::SeqCst);
    let scene = Scene::new(Transport::InProcess, &world, Some("authorize")).await;
    let order = Order {
        id: "o-5".into(),
        amount: 5,
    };
    let saga = start(&scene.orchestrator, &scene.orders.db, &order).await;
    // The payments side is stuck: the saga compensates anyway. The void is sent for the
    // authorization that may yet happen, and the reservation is released meanwhile.
    let instance = finished(&scene.orchestrator, &saga).await;
    assert_eq!(instance.status, SagaStatus::Compensated);
    let lines = history(&instance);
    for line in [
        "authorize action timed_out",
        "authorize compensation sent",
        "reserve compensation done",
    ] {
        assert!(lines.contains(&line.to_owned()), "{line}: {lines:?}");
    }
    assert!(world.log().contains(&"Release o-5".to_owned()));
    assert!(!world.log().contains(&"Authorize o-5".to_owned()));
    // Unanswered, the void is sent again by the sweep, with growing waits.
    eventually("the void is sent again", WAIT, || async {
        let instance = scene.orchestrator.instance(&saga).await.unwrap().unwrap();
        let sends = history(&instance)
            .iter()
            .filter(|line| *line == "authorize compensation sent")
            .count();
        sends >= 2
    })
    .await;
    // The authorization happens after all, late; its reply changes nothing, and the voids
    // sent for it reach the participant: the first answered ends the follow-up.
    world.authorize_gate.store(true, Ordering::SeqCst);
    eventually("the late authorization is voided", WAIT, || async {
        let log = world.log();
        log.contains(&"Authorize o-5".to_owned()) && log.contains(&"Void o-5".to_owned())
    })
    .await;
    eventually("the follow-up ends", WAIT, || async {
        let instance = scene.orchestrator.instance(&saga).await.unwrap().unwrap();
        history(&instance).contains(&"authorize compensation done".to_owned())
    })
    .await;
    let after = scene.orchestrator.instance(&saga).await.unwrap().unwrap();
    assert_eq!(after.status, SagaStatus::Compensated);
    let done = history(&after)
        .iter()
        .filter(|line| *line == "authorize compensation done")
        .count();
    assert_eq!(done, 1, "{:?}", history(&after));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_saga_followups")
        .fetch_one(scene.orders.db.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    // Sends that were still on their way are answered too, and change nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = scene.orchestrator.instance(&saga).await.unwrap().unwrap();
    assert_eq!(
        history(&last)
            .iter()
            .filter(|l| *l == "authorize compensation done")
            .count(),
        1
    );
}

/// An order's id, how its saga ended, and why.
type Outcome = (String, SagaStatus, Option<String>);

/// Records how sagas ended, refusing the first time it is told (as a database that was
/// away would).
#[derive(Clone, Default)]
struct Outcomes {
    ended: Arc<Mutex<Vec<Outcome>>>,
    refused_once: Arc<AtomicBool>,
}

impl OnEnd<Order> for Outcomes {
    async fn ended(&self, tx: &mut Tx, ended: Ended<'_, Order>) -> Result<(), HandlerError> {
        // Inside the transition's transaction: it sees the saga's row.
        let status: String = sqlx::query_scalar("SELECT status FROM keel_sagas WHERE id = $1")
            .bind(ended.id)
            .fetch_one(&mut **tx)
            .await?;
        assert!(!status.is_empty());
        if !self.refused_once.swap(true, Ordering::SeqCst) {
            return Err(HandlerError::Retry("not now".into()));
        }
        self.ended.lock().unwrap().push((
            ended.data.id,
            ended.status,
            ended.error.map(str::to_owned),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn the_end_of_a_saga_is_told_once_in_its_last_transition() {
    let world = World::open();
    let outcomes = Outcomes::default();
    let scene = Scene::with(&world, order_saga(None).on_end(outcomes.clone())).await;
    let (orchestrator, orders) = (&scene.orchestrator, &scene.orders);

    let completed = Order {
        id: "o-7".into(),
        amount: 5,
    };
    let id = start(orchestrator, &orders.db, &completed).await;
    assert_eq!(
        finished(orchestrator, &id).await.status,
        SagaStatus::Completed
    );
    world.capture_fails.store(true, Ordering::SeqCst);
    let declined = Order {
        id: "o-8".into(),
        amount: 5,
    };
    let id = start(orchestrator, &orders.db, &declined).await;
    assert_eq!(
        finished(orchestrator, &id).await.status,
        SagaStatus::Compensated
    );
    let ended = outcomes.ended.lock().unwrap().clone();
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!(ended[0], ("o-7".to_owned(), SagaStatus::Completed, None));
    assert_eq!(
        (ended[1].0.as_str(), ended[1].1),
        ("o-8", SagaStatus::Compensated)
    );
    assert!(
        ended[1]
            .2
            .as_deref()
            .unwrap()
            .contains("declined at capture")
    );
}

/// A reply to saga `id`'s command (step `step`, `phase`, send `send`), as a participant
/// would send it.
async fn answer(bus: &Bus, id: &str, step: usize, phase: &str, send: i64, reply: &Reply) {
    let mut envelope = Envelope::new("test", reply).unwrap();
    envelope.event_type = "keel.saga.order.reply.v1".into();
    let correlation = format!("{id}/{step}/{phase}/{send}");
    envelope.subject = Some(correlation.clone());
    envelope.correlationid = Some(correlation);
    bus.publish_envelope(&envelope).await.unwrap();
}

/// Waits until saga `id`'s history ends with `line`.
async fn reached(orchestrator: &Orchestrator<Order>, id: &str, line: &str) {
    eventually(line, WAIT, || async {
        let instance = orchestrator.instance(id).await.unwrap().unwrap();
        history(&instance).last().map(String::as_str) == Some(line)
    })
    .await;
}

#[tokio::test]
async fn a_reply_finds_the_saga_moved_on_by_another_instance_since_this_one_moved_it() {
    for backend in backends() {
        let bus = bus(Transport::InProcess, "orders").await;
        let orders = TestDb::of(backend).await;
        let shutdown = Shutdown::new();
        // Instance A handles the replies (and caches the state of the sagas it moves);
        // instance B only sweeps, when told to.
        let a = Orchestrator::new(&bus, &orders.db, order_saga(Some("reserve"))).unwrap();
        let b = Orchestrator::new(&bus, &orders.db, order_saga(Some("reserve"))).unwrap();
        let consumer = a.consumer(&unique_name("orders")).await.unwrap();
        tokio::spawn(consumer.run(shutdown.clone()));
        let order = Order {
            id: "o-9".into(),
            amount: 5,
        };
        let id = start(&a, &orders.db, &order).await;
        answer(&bus, &id, 0, "action", 1, &Reply::done(())).await;
        reached(&a, &id, "authorize action sent").await;
        answer(&bus, &id, 1, "action", 1, &Reply::refused("declined")).await;
        reached(&a, &id, "reserve compensation sent").await;

        // The release goes unanswered past its timeout: B sends it again, so the saga's row
        // is a version past the one A holds.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(b.sweep_once().await.unwrap(), 1, "{backend:?}");
        let lines = history(&a.instance(&id).await.unwrap().unwrap());
        assert!(
            lines.ends_with(&[
                "reserve compensation timed_out".to_owned(),
                "reserve compensation sent".to_owned()
            ]),
            "{backend:?}: {lines:?}"
        );

        // The first release is answered, to A: done is done, and the saga ends.
        answer(&bus, &id, 0, "compensation", 1, &Reply::done(())).await;
        let instance = finished(&a, &id).await;
        assert_eq!(instance.status, SagaStatus::Compensated, "{backend:?}");
        assert_eq!(
            history(&instance).last().map(String::as_str),
            Some("reserve compensation done"),
            "{backend:?}"
        );
        shutdown.trigger();
    }
}

const KILLED_MID_SAGA: &str = "saga::an_orchestrator_killed_mid_saga_resumes_and_finishes";

#[tokio::test]
async fn an_orchestrator_killed_mid_saga_resumes_and_finishes() {
    if child_role().as_deref() == Some("orchestrator") {
        let env = |name| std::env::var(name).unwrap();
        let db = Database::connect(&env("TEST_DB"), &MIGRATIONS)
            .await
            .unwrap();
        let bus = Bus::rabbitmq("orders", rabbitmq_options(&env("TEST_EXCHANGE")))
            .await
            .unwrap();
        let orchestrator = Orchestrator::new(&bus, &db, order_saga(None)).unwrap();
        let shutdown = Shutdown::new();
        orchestrate(&orchestrator, &bus, &db, &env("TEST_GROUP"), &shutdown).await;
        println!("child: orchestrating");
        std::future::pending::<()>().await;
    }
    if !require(Service::RabbitMq) {
        return;
    }
    for backend in backends() {
        let bus = bus(Transport::RabbitMq, "orders").await;
        let shutdown = Shutdown::new();
        let world = World::open();
        world.authorize_gate.store(false, Ordering::SeqCst);
        let _participants = participants(&bus, &world, &shutdown).await;
        let orders = TestDb::of(backend).await;
        let group = unique_name("orders");
        let orchestrator = Orchestrator::new(&bus, &orders.db, order_saga(None)).unwrap();
        // The reply queue exists before any reply is sent.
        let consumer = orchestrator.consumer(&group).await.unwrap();

        let order = Order {
            id: "o-4".into(),
            amount: 5,
        };
        let id = start(&orchestrator, &orders.db, &order).await;
        let mut child = ChildTest::spawn(
            KILLED_MID_SAGA,
            "orchestrator",
            &[
                ("TEST_DB", &orders.url),
                ("TEST_EXCHANGE", bus.exchange()),
                ("TEST_GROUP", &group),
            ],
        );
        child.wait_for("child: orchestrating", WAIT).await;
        // The child has the saga at its second step, waiting for the authorization.
        eventually(&format!("{backend:?}: authorize sent"), WAIT, || async {
            let instance = orchestrator.instance(&id).await.unwrap().unwrap();
            history(&instance).contains(&"authorize action sent".to_owned())
        })
        .await;
        child.kill();

        world.authorize_gate.store(true, Ordering::SeqCst);
        tokio::spawn(consumer.run(shutdown.clone()));
        tokio::spawn(bus.relay(&orders.db).run(shutdown.clone()));
        let instance = finished(&orchestrator, &id).await;
        assert_eq!(instance.status, SagaStatus::Completed, "{backend:?}");
        assert_eq!(
            world.log(),
            ["Reserve o-4", "Authorize o-4", "Capture o-4"],
            "{backend:?}: each step done once"
        );
        let sent = history(&instance)
            .iter()
            .filter(|line| line.ends_with("sent"))
            .count();
        assert_eq!(sent, 3, "{backend:?}: {:?}", history(&instance));
        // The last batch's rows go with the relay's next look (a poll interval at most).
        eventually(
            &format!("{backend:?}: nothing left to relay"),
            WAIT,
            || async {
                let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_outbox")
                    .fetch_one(orders.db.pool())
                    .await
                    .unwrap();
                rows == 0
            },
        )
        .await;
        shutdown.trigger();
    }
}

#[tokio::test]
async fn a_saga_that_no_longer_fits_its_definition_is_marked_failed_not_a_panic() {
    let bus = bus(Transport::InProcess, "orders").await;
    let orders = TestDb::sqlite().await;
    let outcomes = Outcomes {
        refused_once: Arc::new(AtomicBool::new(true)),
        ..Outcomes::default()
    };
    let saga = order_saga(Some("reserve")).on_end(outcomes.clone());
    let orchestrator = Orchestrator::new(&bus, &orders.db, saga).unwrap();
    let order = Order {
        id: "o-6".into(),
        amount: 5,
    };
    let (past_the_end, damaged, unreadable) = (
        start(&orchestrator, &orders.db, &order).await,
        start(&orchestrator, &orders.db, &order).await,
        start(&orchestrator, &orders.db, &order).await,
    );
    // As after a deploy that dropped steps, and after someone edited a row by hand.
    for (id, change) in [
        (
            &past_the_end,
            "UPDATE keel_sagas SET step = 7 WHERE id = $1",
        ),
        (
            &damaged,
            "UPDATE keel_sagas SET status = 'sideways' WHERE id = $1",
        ),
        (
            &unreadable,
            "UPDATE keel_sagas SET data = '\"not an order\"' WHERE id = $1",
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(change))
            .bind(id)
            .execute(orders.db.pool())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    orchestrator.sweep_once().await.unwrap();
    for id in [&past_the_end, &damaged, &unreadable] {
        let instance = orchestrator.instance(id).await;
        let status: String = sqlx::query_scalar("SELECT status FROM keel_sagas WHERE id = $1")
            .bind(id)
            .fetch_one(orders.db.pool())
            .await
            .unwrap();
        assert_eq!(status, "failed", "{instance:?}");
    }
    // Their owner is told, so that what they were for does not wait for ever (unless
    // there is no reading what it was for: then the mark stands alone).
    let ended = outcomes.ended.lock().unwrap().clone();
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(
        ended
            .iter()
            .all(|(_, status, _)| *status == SagaStatus::Failed)
    );
    assert!(
        Orchestrator::new(&bus, &orders.db, Saga::<Order>::new("Order Saga")).is_err(),
        "a name that cannot be an event type"
    );
}

#[tokio::test]
async fn a_step_that_resends_on_timeout_waits_for_its_participant_instead_of_failing() {
    let world = World::open();
    world.authorize_gate.store(false, Ordering::SeqCst);
    let saga = Saga::new("refund").step(
        Step::new("authorize", |order: &Order, _| Authorize {
            order: order.id.clone(),
            amount: order.amount,
        })
        .timeout(Duration::from_millis(200))
        .resend_on_timeout(),
    );
    let scene = Scene::with(&world, saga).await;
    let orchestrator = &scene.orchestrator;
    let order = Order {
        id: "o-9".into(),
        amount: 5,
    };
    let id = start(orchestrator, &scene.orders.db, &order).await;
    eventually("the command is sent again", WAIT, || async {
        let instance = orchestrator.instance(&id).await.unwrap().unwrap();
        let sent = history(&instance)
            .iter()
            .filter(|line| *line == "authorize action sent")
            .count();
        sent >= 2 && instance.status == SagaStatus::Running
    })
    .await;
    // The participant comes back: an answer to any of the sends completes the step.
    world.authorize_gate.store(true, Ordering::SeqCst);
    assert_eq!(
        finished(orchestrator, &id).await.status,
        SagaStatus::Completed
    );

    // Refused for a while (a passing problem): sent again at its deadline, not failed.
    world.capture_fails.store(true, Ordering::SeqCst);
    let saga = Saga::new("settle").step(
        Step::new("capture", |order: &Order, _| Capture {
            order: order.id.clone(),
            amount: order.amount,
        })
        .timeout(Duration::from_millis(200))
        .resend_on_timeout(),
    );
    let scene = Scene::with(&world, saga).await;
    let settling = &scene.orchestrator;
    let id = start(settling, &scene.orders.db, &order).await;
    eventually("the refused command is sent again", WAIT, || async {
        let instance = settling.instance(&id).await.unwrap().unwrap();
        let refused = history(&instance)
            .iter()
            .filter(|line| *line == "capture action failed")
            .count();
        refused >= 2 && instance.status == SagaStatus::Running
    })
    .await;
    world.capture_fails.store(false, Ordering::SeqCst);
    eventually("the capture is done", WAIT, || async {
        settling.instance(&id).await.unwrap().unwrap().status == SagaStatus::Completed
    })
    .await;
}

/// What a participant expects: an amount that cannot be negative.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Strict {
    order: String,
    amount: u32,
}

impl Event for Strict {
    const TYPE: &'static str = "keel.test.strict.v1";
    fn key(&self) -> String {
        self.order.clone()
    }
}

/// What a sender with an older contract sends under the same type.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Loose {
    order: String,
    amount: i64,
}

impl Event for Loose {
    const TYPE: &'static str = "keel.test.strict.v1";
    fn key(&self) -> String {
        self.order.clone()
    }
}

struct Never;

impl Handler<Strict> for Never {
    async fn handle(&self, _: &mut Tx, _: Received<Strict>) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_command_its_participant_cannot_read_is_answered_at_once_and_undone_too() {
    let bus = bus(Transport::InProcess, "orders").await;
    let shutdown = Shutdown::new();
    let participant = TestDb::sqlite().await;
    let world = World::open();
    let consumer = bus
        .consumer(&unique_name("strict"), &participant.db)
        .on::<Strict, _>(Never)
        .on::<Void, _>(Participant {
            bus: bus.clone(),
            world: world.clone(),
        })
        .start()
        .await
        .unwrap();
    tokio::spawn(consumer.run(shutdown.clone()));
    tokio::spawn(bus.relay(&participant.db).run(shutdown.clone()));
    let orders = TestDb::sqlite().await;
    let saga = Saga::new("loose").step(
        Step::new("pay", |order: &Order, _| Loose {
            order: order.id.clone(),
            amount: -order.amount,
        })
        .compensate(|order: &Order, _| Void {
            order: order.id.clone(),
            amount: order.amount,
        })
        .timeout(Duration::from_secs(60)),
    );
    let orchestrator = Orchestrator::new(&bus, &orders.db, saga).unwrap();
    orchestrate(
        &orchestrator,
        &bus,
        &orders.db,
        &unique_name("orders"),
        &shutdown,
    )
    .await;
    let order = Order {
        id: "o-10".into(),
        amount: 5,
    };
    let id = start(&orchestrator, &orders.db, &order).await;
    let instance = finished(&orchestrator, &id).await;
    assert_eq!(instance.status, SagaStatus::Compensated);
    assert!(
        instance.error.as_deref().unwrap().contains("not handled"),
        "{:?}",
        instance.error
    );
    let lines = history(&instance);
    assert!(
        lines.contains(&"pay action failed".to_owned()),
        "answered: {lines:?}"
    );
    assert!(!lines.contains(&"pay action timed_out".to_owned()));
    // Dead-lettered, not refused: a replay could still do it, so it is undone too.
    assert!(
        lines.contains(&"pay compensation sent".to_owned()),
        "{lines:?}"
    );
    eventually("the payment is voided", WAIT, || async {
        world.log().contains(&"Void o-10".to_owned())
    })
    .await;
    shutdown.trigger();
}

/// Fails, for good, the end of every saga whose order id starts with "bad".
struct BrokenForSome;

impl OnEnd<Order> for BrokenForSome {
    async fn ended(&self, _: &mut Tx, ended: Ended<'_, Order>) -> Result<(), HandlerError> {
        if ended.data.id.starts_with("bad") {
            return Err(HandlerError::Retry("the order's row is broken".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn sagas_failing_for_good_do_not_hold_up_the_timeouts_of_the_others() {
    let bus = bus(Transport::InProcess, "orders").await;
    let orders = TestDb::sqlite().await;
    // One step that no one answers, overdue at once.
    let saga = Saga::new("starved")
        .step(
            Step::new("pay", |order: &Order, _| Authorize {
                order: order.id.clone(),
                amount: order.amount,
            })
            .timeout(Duration::from_millis(1)),
        )
        .on_end(BrokenForSome);
    let orchestrator = Orchestrator::new(&bus, &orders.db, saga).unwrap();
    // As many sagas as one sweep takes, overdue before the good one, and failing for good.
    for n in 0..100 {
        let order = Order {
            id: format!("bad-{n}"),
            amount: 1,
        };
        start(&orchestrator, &orders.db, &order).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let order = Order {
        id: "good".into(),
        amount: 1,
    };
    let good = start(&orchestrator, &orders.db, &order).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..2 {
        orchestrator.sweep_once().await.unwrap();
    }
    let instance = orchestrator.instance(&good).await.unwrap().unwrap();
    assert_eq!(instance.status, SagaStatus::Compensated);
}
