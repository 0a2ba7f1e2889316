//! The payments commands sent by a saga over the bus, each answered with a reply: a
//! payment captured, one declined, one voided when a later step fails, and one the
//! provider never answers, voided after the step's timeout and refused when it comes.

use std::time::Duration;

use keel_payments::contract::{Authorize, Capture, Void};
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::{Bus, Event, Reply};
use keel_sdk::saga::{Orchestrator, Saga, SagaInstance, SagaStatus, Step};
use keel_sdk::service::ServiceConfig;
use keel_sdk::{Database, Handler, HandlerError, Migrations, Received, Tx};
use keel_testkit::{TestSqlite, unique_name};
use serde::{Deserialize, Serialize};

use crate::{databases, leave_claim, payments_on, provider};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    method: String,
    /// Whether the step after the authorization accepts.
    ships: bool,
}

/// The step between authorization and capture, refused when the order does not ship.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Ship {
    ships: bool,
}

impl Event for Ship {
    const TYPE: &'static str = "keel.test.ship.v1";
    fn key(&self) -> String {
        String::new()
    }
}

#[derive(Clone)]
struct Warehouse(Bus);

impl Handler<Ship> for Warehouse {
    async fn handle(&self, tx: &mut Tx, ship: Received<Ship>) -> Result<(), HandlerError> {
        let reply = if ship.event.ships {
            Reply::done(())
        } else {
            Reply::refused("nothing to ship")
        };
        self.0.reply(tx, &ship, &reply).await?;
        Ok(())
    }
}

fn saga() -> Saga<Order> {
    let payment = |order: &Order| order.id.parse().unwrap();
    Saga::new("checkout")
        .step(
            Step::new("authorize", move |order: &Order, _| Authorize {
                payment: payment(order),
                amount: serde_json::from_str(r#"{"minor": 1999, "currency": "EUR"}"#).unwrap(),
                method: order.method.parse().unwrap(),
            })
            .compensate(move |order: &Order, _| Void {
                payment: payment(order),
                amount: None,
            })
            .timeout(Duration::from_secs(2)),
        )
        .step(Step::new("ship", |order: &Order, _| Ship {
            ships: order.ships,
        }))
        .step(Step::new("capture", move |order: &Order, _| Capture {
            payment: payment(order),
            // Another amount than the authorization's would be refused: this one is its.
            amount: serde_json::from_str(r#"{"minor": 1999, "currency": "EUR"}"#).unwrap(),
        }))
}

async fn settled(orchestrator: &Orchestrator<Order>, id: &str) -> SagaInstance {
    let mut instance = orchestrator.instance(id).await.unwrap().unwrap();
    for _ in 0..600 {
        if instance.status.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        instance = orchestrator.instance(id).await.unwrap().unwrap();
    }
    instance
}

#[tokio::test]
async fn a_saga_captures_is_declined_voids_when_a_later_step_fails_and_outlives_a_silent_provider()
{
    for database in databases().await {
        let shutdown = Shutdown::new();
        let bus = Bus::in_process("payments");
        let config = ServiceConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            database: Some(Secret::new(database.url.clone())),
            ..ServiceConfig::default()
        };
        let service = keel_payments::build(&config, &provider(), Some(&bus), &shutdown)
            .await
            .unwrap();
        tokio::spawn(service.run(shutdown.clone()));

        let shop_file = TestSqlite::new("keel-payments-shop");
        let shop_db = Database::connect(&shop_file.url(), &Migrations::none())
            .await
            .unwrap();
        let shop_bus = bus.for_service("shop");
        let orchestrator = Orchestrator::new(&shop_bus, &shop_db, saga()).unwrap();
        tokio::spawn(
            orchestrator
                .consumer("shop")
                .await
                .unwrap()
                .run(shutdown.clone()),
        );
        tokio::spawn(
            orchestrator
                .clone()
                .sweep_timeouts(Duration::from_millis(200), shutdown.clone()),
        );
        let warehouse = shop_bus
            .consumer("warehouse", &shop_db)
            .on::<Ship, _>(Warehouse(shop_bus.clone()))
            .start()
            .await
            .unwrap();
        tokio::spawn(warehouse.run(shutdown.clone()));
        tokio::spawn(shop_bus.relay(&shop_db).run(shutdown.clone()));

        let orders = [
            ("tok_visa", true),
            ("tok_chargeDeclined", true),
            ("tok_mastercard", false),
            ("tok_processingError", true),
        ]
        .map(|(method, ships)| Order {
            id: unique_name("pay"),
            method: method.to_owned(),
            ships,
        });
        let mut sagas = Vec::new();
        for order in &orders {
            let mut tx = shop_db.begin().await.unwrap();
            sagas.push(orchestrator.start(&mut tx, order).await.unwrap());
            tx.commit().await.unwrap();
        }
        let mut finals = Vec::new();
        for id in &sagas {
            finals.push(settled(&orchestrator, id).await);
        }
        let statuses: Vec<SagaStatus> = finals.iter().map(|i| i.status).collect();
        assert_eq!(
            statuses,
            [
                SagaStatus::Completed,
                SagaStatus::Compensated,
                SagaStatus::Compensated,
                SagaStatus::Compensated
            ],
            "{finals:?}"
        );
        assert!(
            finals[1]
                .error
                .as_deref()
                .unwrap()
                .contains("card declined")
        );
        assert!(finals[3].error.as_deref().unwrap().contains("timed_out"));

        let payments = keel_payments::Payments::new(
            Database::connect(&database.url, &keel_payments::MIGRATIONS)
                .await
                .unwrap(),
            bus.clone(),
            keel_payments::provider::Provider::new(provider()),
        );
        // The void of a timed-out step is sent, not awaited: it may still be on its way.
        let mut stored = Vec::new();
        for _ in 0..200 {
            stored.clear();
            for order in &orders {
                let payment = payments.payment(&order.id.parse().unwrap()).await.unwrap();
                stored.push(payment.map(|p| p.status.as_str()));
            }
            if stored[3].is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The silent provider's payment was voided before it was ever authorized: a
        // tombstone, which the authorization, retried by the bus, finds and is refused by.
        assert_eq!(
            stored,
            [
                Some("captured"),
                Some("declined"),
                Some("voided"),
                Some("voided")
            ],
            "{}",
            database.url
        );
        shutdown.trigger();
    }
}

#[tokio::test]
async fn a_command_naming_a_payment_made_for_another_amount_is_refused() {
    use keel_payments::domain::{Command, Refusal};
    for database in databases().await {
        let (db, payments) = payments_on(&database.url).await;
        let eur = |minor: i64| {
            serde_json::from_value(serde_json::json!({"minor": minor, "currency": "EUR"})).unwrap()
        };
        let id = "p-amount".parse().unwrap();
        let mut tx = db.begin().await.unwrap();
        payments
            .authorize(&mut tx, &id, eur(700), &"tok_visa".parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        tx.commit().await.unwrap();
        for (command, amount, refused) in [
            (Command::Capture, 800, true),
            (Command::Void, 699, true),
            (Command::Capture, 700, false),
        ] {
            let mut tx = db.begin().await.unwrap();
            let outcome = payments
                .apply(&mut tx, &id, command, Some(eur(amount)))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            assert_eq!(
                outcome.as_ref().err(),
                refused.then_some(&Refusal::OtherAmount),
                "{command:?} {amount} on {}",
                database.url
            );
        }
        let stored = payments.payment(&id).await.unwrap().unwrap();
        assert_eq!(stored.status.as_str(), "captured");
    }
}

#[tokio::test]
async fn a_command_meeting_a_requests_claim_waits_for_it_or_takes_it_over_once_old() {
    use keel_payments::domain::Refusal;
    for database in databases().await {
        let (db, payments) = payments_on(&database.url).await;
        // Claims an HTTP request commits before it asks the provider: one just made, one
        // left a minute ago by a request that died.
        let now = keel_sdk::data::unix_seconds();
        leave_claim(&db, "p-fresh", now).await;
        leave_claim(&db, "p-old", now - 60).await;
        let eur = |minor: i64| {
            serde_json::from_value(serde_json::json!({"minor": minor, "currency": "EUR"})).unwrap()
        };
        let visa = "tok_visa".parse().unwrap();
        for (id, minor, expected) in [
            ("p-fresh", 300, Err(Refusal::InProgress)),
            ("p-old", 301, Err(Refusal::KeyReused)),
            ("p-old", 300, Ok("authorized")),
        ] {
            let mut tx = db.begin().await.unwrap();
            let outcome = payments
                .authorize(&mut tx, &id.parse().unwrap(), eur(minor), &visa)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let outcome = outcome.map(|payment| payment.status.as_str());
            assert_eq!(outcome, expected, "{id} {minor} on {}", database.url);
        }
    }
}
