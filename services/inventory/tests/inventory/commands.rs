//! The inventory's commands sent by a saga over the bus (in process and RabbitMQ), each
//! answered with a reply: a reservation committed, one refused for want of stock, and one
//! released when a later step fails.

use std::time::Duration;

use keel_inventory::contract::{Commit, Release, Reserve};
use keel_inventory::domain::{Line, Lines, Quantity};
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::{Bus, Event, RabbitMqOptions, Reply};
use keel_sdk::saga::{Orchestrator, Saga, SagaStatus, Step};
use keel_sdk::service::ServiceConfig;
use keel_sdk::{Database, Handler, HandlerError, Migrations, Received, Tx};
use keel_testkit::{Service, TestSqlite, require, unique_name};
use serde::{Deserialize, Serialize};

use crate::databases;

/// What the test saga is for: an order of `quantity` mugs that `pay` accepts or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    quantity: i64,
    pays: bool,
}

/// A stand-in for the payment step, refused when the order does not pay.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Pay {
    pays: bool,
}

impl Event for Pay {
    const TYPE: &'static str = "keel.test.pay.v1";
    fn key(&self) -> String {
        String::new()
    }
}

#[derive(Clone)]
struct Cashier(Bus);

impl Handler<Pay> for Cashier {
    async fn handle(&self, tx: &mut Tx, pay: Received<Pay>) -> Result<(), HandlerError> {
        let reply = if pay.event.pays {
            Reply::done(())
        } else {
            Reply::refused("declined")
        };
        self.0.reply(tx, &pay, &reply).await?;
        Ok(())
    }
}

fn saga() -> Saga<Order> {
    let reservation = |order: &Order| order.id.parse().unwrap();
    Saga::new("checkout")
        .step(
            Step::new("reserve", move |order: &Order, _| Reserve {
                reservation: reservation(order),
                lines: Lines::new(vec![Line {
                    sku: "MUG".parse().unwrap(),
                    quantity: Quantity::new(order.quantity).unwrap(),
                }])
                .unwrap(),
                hold_seconds: None,
            })
            .compensate(move |order: &Order, _| Release {
                reservation: reservation(order),
            }),
        )
        .step(Step::new("pay", |order: &Order, _| Pay {
            pays: order.pays,
        }))
        .step(Step::new("commit", move |order: &Order, _| Commit {
            reservation: reservation(order),
        }))
}

async fn buses() -> Vec<Bus> {
    let mut buses = vec![Bus::in_process("inventory")];
    if require(Service::RabbitMq) {
        let options = RabbitMqOptions {
            exchange: unique_name("keel-inventory-test"),
            queue_expiry: Some(Duration::from_secs(120)),
            auto_delete_exchange: true,
            ..RabbitMqOptions::default()
        };
        buses.push(Bus::rabbitmq("inventory", options).await.unwrap());
    }
    buses
}

#[tokio::test]
async fn a_saga_reserves_and_commits_is_refused_when_short_and_releases_when_a_later_step_fails() {
    for database in databases().await {
        for bus in buses().await {
            let shutdown = Shutdown::new();
            let config = ServiceConfig {
                listen: Some("127.0.0.1:0".parse().unwrap()),
                database: Some(Secret::new(database.url.clone())),
                ..ServiceConfig::default()
            };
            let service = keel_inventory::build(&config, Some(&bus), &shutdown)
                .await
                .unwrap();
            tokio::spawn(service.run(shutdown.clone()));
            let inventory = keel_inventory::Inventory::new(
                Database::connect(&database.url, &keel_inventory::MIGRATIONS)
                    .await
                    .unwrap(),
                bus.clone(),
            );
            inventory
                .set_on_hand(&"MUG".parse().unwrap(), 5)
                .await
                .unwrap()
                .unwrap();

            let shop_file = TestSqlite::new("keel-inventory-shop");
            let shop_db = Database::connect(&shop_file.url(), &Migrations::none())
                .await
                .unwrap();
            let shop_bus = bus.for_service("shop");
            let orchestrator = Orchestrator::new(&shop_bus, &shop_db, saga()).unwrap();
            let replies = orchestrator.consumer("shop").await.unwrap();
            tokio::spawn(replies.run(shutdown.clone()));
            let cashier = shop_bus
                .consumer("cashier", &shop_db)
                .on::<Pay, _>(Cashier(shop_bus.clone()))
                .start()
                .await
                .unwrap();
            tokio::spawn(cashier.run(shutdown.clone()));
            tokio::spawn(shop_bus.relay(&shop_db).run(shutdown.clone()));

            let mut sagas = Vec::new();
            for order in [
                Order {
                    id: unique_name("sold"),
                    quantity: 2,
                    pays: true,
                },
                Order {
                    id: unique_name("short"),
                    quantity: 9,
                    pays: true,
                },
                Order {
                    id: unique_name("declined"),
                    quantity: 3,
                    pays: false,
                },
            ] {
                let mut tx = shop_db.begin().await.unwrap();
                sagas.push(orchestrator.start(&mut tx, &order).await.unwrap());
                tx.commit().await.unwrap();
            }
            let mut finals = Vec::new();
            for id in &sagas {
                let mut instance = orchestrator.instance(id).await.unwrap().unwrap();
                for _ in 0..400 {
                    if instance.status.is_final() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    instance = orchestrator.instance(id).await.unwrap().unwrap();
                }
                finals.push(instance);
            }
            let statuses: Vec<SagaStatus> = finals.iter().map(|i| i.status).collect();
            assert_eq!(
                statuses,
                [
                    SagaStatus::Completed,
                    SagaStatus::Compensated,
                    SagaStatus::Compensated
                ],
                "{:?}",
                finals
            );
            let short = finals[1].error.clone().unwrap_or_default();
            assert!(
                short.contains("MUG") && short.contains("available"),
                "{short}"
            );
            assert!(
                finals[2]
                    .error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("declined")
            );
            // Two sold; the declined order's three were held, then released.
            let mug = inventory
                .stock(&"MUG".parse().unwrap())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((mug.on_hand(), mug.reserved()), (3, 0), "{}", database.url);
            shutdown.trigger();
        }
    }
}
