//! The shop under randomized load with faults, on PostgreSQL and RabbitMQ (and Kafka, with
//! the `kafka` feature): inventory,
//! payments and a second orders instance run as child processes killed (SIGKILL) and
//! restarted mid-saga (on Kafka the second orders instance is not killed: see
//! [`Broker::kills_orders`]), and every broker connection is cut once. When the dust settles,
//! every order is confirmed or rejected, stock is conserved (initial = on hand + sold),
//! nothing stays reserved, no rejected order's money was taken and every confirmed
//! order's was.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_jwt::testing::{AUDIENCE, TestIssuer};
use keel_orders::OrdersOptions;
use keel_payments::provider::ProviderConfig;
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::RabbitMqOptions;
use keel_sdk::service::{BusConfig, ServiceAuthConfig, ServiceConfig};
use keel_testkit::{
    ChildTest, FaultProxy, Service, TestDatabase, child_role, require, send, unique_name,
};
use serde_json::{Value, json};

const RABBITMQ_TEST: &str =
    "consistency::every_order_ends_and_stock_and_money_add_up_under_crashes_and_a_cut_broker";
#[cfg(feature = "kafka")]
const KAFKA_TEST: &str =
    "consistency::every_order_ends_and_stock_and_money_add_up_under_crashes_and_a_cut_kafka";

/// Each step may wait this long for its reply: about as long as a killed child takes to
/// come back, so that some steps time out and are compensated. On Kafka a restarted
/// instance gets its partitions only once the killed one's session has expired (6 s) and
/// its group has formed again, so steps wait about that long there: 4 s timed out more
/// than half the orders, 10 s none.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
#[cfg(feature = "kafka")]
const KAFKA_STEP_TIMEOUT: Duration = Duration::from_secs(6);

const ORDERS: usize = 40;

/// (SKU, price in cents, initial stock).
const STOCK: [(&str, i64, u32); 3] = [("MUG", 1250, 40), ("TEA", 400, 30), ("POT", 3900, 12)];

/// Where the services' bus is: the transport (`rabbitmq` or `kafka`), the broker's address
/// (through the fault proxy) and the exchange or namespace of this run.
#[derive(Clone)]
struct Broker {
    transport: String,
    url: String,
    exchange: String,
    step_timeout: Duration,
}

impl Broker {
    /// Whether the second orders instance is killed too. Not on Kafka: the test's broker,
    /// tansu 0.6.0, never tells a group's surviving leader to rejoin when another member's
    /// session expires (its heartbeat answers "no error" at the same generation while the
    /// group forms again), so the partitions a killed member of a group of several held
    /// stay without an owner, and the saga replies keyed to them are never read. A group of
    /// one (inventory's, payments') is formed afresh by the restarted instance.
    fn kills_orders(&self) -> bool {
        self.transport != "kafka"
    }

    fn bus(&self) -> BusConfig {
        let timeout = Duration::from_secs(3);
        match self.transport.as_str() {
            #[cfg(feature = "kafka")]
            "kafka" => BusConfig::Kafka(keel_sdk::events::KafkaOptions {
                brokers: self.url.clone(),
                namespace: self.exchange.clone(),
                timeout,
                fetch_wait: keel_testkit::KAFKA_FETCH_WAIT,
                ..keel_sdk::events::KafkaOptions::default()
            }),
            _ => BusConfig::Rabbitmq(RabbitMqOptions {
                url: Secret::new(self.url.clone()),
                exchange: self.exchange.clone(),
                queue_expiry: Some(Duration::from_secs(300)),
                auto_delete_exchange: true,
                timeout,
                ..RabbitMqOptions::default()
            }),
        }
    }
}

fn service_config(database: &str, broker: &Broker) -> ServiceConfig {
    ServiceConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database: Some(Secret::new(database.to_owned())),
        bus: broker.bus(),
        ..ServiceConfig::default()
    }
}

/// A payment provider that fails a fifth of the calls for `tok_chance` (retried by the bus).
fn provider() -> ProviderConfig {
    ProviderConfig {
        latency: Duration::from_millis(5),
        decline_rate: 0.2,
        failure_rate: 0.2,
        seed: 42,
    }
}

/// A child: one service instance on the parent's database and broker, until killed.
async fn child(role: &str) {
    let env = |name: &str| std::env::var(name).unwrap();
    let broker = Broker {
        transport: env("TEST_TRANSPORT"),
        url: env("TEST_BROKER"),
        exchange: env("TEST_EXCHANGE"),
        step_timeout: Duration::from_millis(env("TEST_STEP_TIMEOUT_MS").parse().unwrap()),
    };
    let config = service_config(&env("TEST_DB"), &broker);
    let shutdown = Shutdown::new();
    let service = match role {
        "inventory" => keel_inventory::build(&config, None, &shutdown).await,
        "payments" => keel_payments::build(&config, &provider(), None, &shutdown).await,
        _ => {
            let options = OrdersOptions {
                catalog: Some(vec![env("TEST_CATALOG")]),
                step_timeout: broker.step_timeout,
                ..OrdersOptions::default()
            };
            keel_orders::build(&config, &options, None, &shutdown).await
        }
    }
    .unwrap();
    println!("child: ready");
    service.run(shutdown).await.unwrap();
}

/// A child instance, spawned and then killed and spawned again on demand.
struct Instance {
    /// The test whose child role this is.
    test: &'static str,
    role: &'static str,
    env: Vec<(String, String)>,
    child: Option<ChildTest>,
}

impl Instance {
    async fn start(test: &'static str, role: &'static str, env: Vec<(String, String)>) -> Self {
        let mut instance = Self {
            test,
            role,
            env,
            child: None,
        };
        instance.restart().await;
        instance
    }

    async fn restart(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut child = ChildTest::spawn(self.test, self.role, &env);
        child
            .wait_for("child: ready", Duration::from_secs(30))
            .await;
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_ends_and_stock_and_money_add_up_under_crashes_and_a_cut_broker() {
    if let Some(role) = child_role() {
        return child(&role).await;
    }
    if !require(Service::Postgres) || !require(Service::RabbitMq) {
        return;
    }
    let proxy = FaultProxy::start(Service::RabbitMq.addr()).await;
    let broker = Broker {
        transport: "rabbitmq".to_owned(),
        url: format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        exchange: unique_name("keel-consistency"),
        step_timeout: STEP_TIMEOUT,
    };
    every_order_ends(RABBITMQ_TEST, &broker, &proxy).await;
}

/// The same on Kafka: a broker of the test's own, every connection to it through the
/// proxy (it advertises the proxy's address), so the cut drops them all.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_ends_and_stock_and_money_add_up_under_crashes_and_a_cut_kafka() {
    if let Some(role) = child_role() {
        return child(&role).await;
    }
    if !require(Service::Postgres) || !require(Service::Kafka) {
        return;
    }
    let kafka = keel_testkit::ProxiedKafka::start().await;
    let broker = Broker {
        transport: "kafka".to_owned(),
        url: kafka.brokers(),
        exchange: unique_name("keel-consistency"),
        step_timeout: KAFKA_STEP_TIMEOUT,
    };
    every_order_ends(KAFKA_TEST, &broker, &kafka.proxy).await;
}

async fn every_order_ends(test: &'static str, broker: &Broker, proxy: &FaultProxy) {
    keel_testkit::test_log("test");
    let databases = [
        TestDatabase::create().await,
        TestDatabase::create().await,
        TestDatabase::create().await,
        TestDatabase::create().await,
    ];
    let issuer = TestIssuer::start().await;
    let shutdown = Shutdown::new();
    let with_auth = |database: &TestDatabase| ServiceConfig {
        auth: Some(ServiceAuthConfig {
            issuer: issuer.issuer().to_owned(),
            audiences: vec![AUDIENCE.to_owned()],
        }),
        ..service_config(&database.url, broker)
    };

    // In this process, never killed: the catalog, and the orders instance customers reach.
    let catalog = keel_catalog::build(&with_auth(&databases[0]), None, &shutdown)
        .await
        .unwrap();
    let catalog_url = format!("http://{}", catalog.local_addr());
    tokio::spawn(catalog.run(shutdown.clone()));
    let options = OrdersOptions {
        catalog: Some(vec![catalog_url.clone()]),
        step_timeout: broker.step_timeout,
        ..OrdersOptions::default()
    };
    let front = keel_orders::build(&with_auth(&databases[3]), &options, None, &shutdown)
        .await
        .unwrap();
    let orders_url = format!("http://{}", front.local_addr());
    tokio::spawn(front.run(shutdown.clone()));

    // In children, killed and restarted: inventory, payments, a second orders instance.
    let env = |database: &TestDatabase| {
        vec![
            ("TEST_DB".to_owned(), database.url.clone()),
            ("TEST_TRANSPORT".to_owned(), broker.transport.clone()),
            ("TEST_BROKER".to_owned(), broker.url.clone()),
            ("TEST_EXCHANGE".to_owned(), broker.exchange.clone()),
            (
                "TEST_STEP_TIMEOUT_MS".to_owned(),
                broker.step_timeout.as_millis().to_string(),
            ),
            ("TEST_CATALOG".to_owned(), catalog_url.clone()),
        ]
    };
    let mut inventory = Instance::start(test, "inventory", env(&databases[1])).await;
    let mut payments = Instance::start(test, "payments", env(&databases[2])).await;
    let mut orders = Instance::start(test, "orders", env(&databases[3])).await;

    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    let http = keel_testkit::http();
    let stock_db = keel_inventory::Inventory::new(
        keel_sdk::Database::connect(&databases[1].url, &keel_inventory::MIGRATIONS)
            .await
            .unwrap(),
        keel_sdk::Bus::in_process("reader"),
    );
    for (sku, minor, on_hand) in STOCK {
        let product = json!({"name": sku, "price": {"minor": minor, "currency": "EUR"}});
        let put = http
            .put(format!("{catalog_url}/products/{sku}"))
            .json(&product);
        assert_eq!(send(put, Some(&admin)).await.0, 201);
        stock_db
            .set_on_hand(&sku.parse().unwrap(), on_hand)
            .await
            .unwrap()
            .unwrap();
    }

    // The load: four customers placing orders at random, while the faults happen.
    let customers: Vec<String> = (0..4)
        .map(|n| issuer.mint(json!({"sub": format!("customer-{n}"), "roles": ["customer"]})))
        .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut plans = Vec::new();
    for n in 0..ORDERS {
        let mut skus: Vec<&str> = STOCK.iter().map(|(sku, _, _)| *sku).collect();
        rng.shuffle(&mut skus);
        let lines: Vec<Value> = skus[..rng.usize(1..=2)]
            .iter()
            .map(|sku| json!({"sku": sku, "quantity": rng.u32(1..=3)}))
            .collect();
        let method = match rng.u8(0..10) {
            0..=5 => "tok_visa",
            6 => "tok_chargeDeclined",
            _ => "tok_chance",
        };
        plans.push((
            n % customers.len(),
            json!({"lines": lines, "payment_method": method}),
        ));
    }
    let placing = {
        let (http, orders_url, customers) = (http.clone(), orders_url.clone(), customers.clone());
        tokio::spawn(async move {
            let mut placed = Vec::new();
            for (n, (customer, body)) in plans.into_iter().enumerate() {
                let request = http
                    .post(format!("{orders_url}/orders"))
                    .header("idempotency-key", format!("order-{n}"))
                    .json(&body);
                let (status, _, order) = send(request, Some(&customers[customer])).await;
                assert_eq!(status, 202, "{order}");
                placed.push(order["id"].as_str().unwrap().to_owned());
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            placed
        })
    };
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    pause(800).await;
    inventory.kill();
    pause(700).await;
    inventory.restart().await;
    pause(400).await;
    payments.kill();
    pause(900).await;
    payments.restart().await;
    pause(300).await;
    proxy.cut();
    pause(1000).await;
    proxy.restore();
    pause(300).await;
    if broker.kills_orders() {
        orders.kill();
        pause(600).await;
        orders.restart().await;
    }
    let placed = placing.await.unwrap();

    // Every order ends. An order caught by the faults may need its step's timeout, a
    // compensation's, and that compensation sent again after twice as long (participants
    // away for a crash, or a rebalance on Kafka): the wait scales with the step timeout.
    let patience = (broker.step_timeout * 18).max(Duration::from_secs(60));
    let looks = patience.as_millis() / 100;
    let mut ended = BTreeMap::new();
    for id in &placed {
        let mut order = Value::Null;
        for _ in 0..looks {
            let request = http.get(format!("{orders_url}/orders/{id}"));
            order = send(request, Some(&admin)).await.2;
            if order["status"] != "pending" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = order["status"].as_str().unwrap_or("?").to_owned();
        assert!(status == "confirmed" || status == "rejected", "{order}");
        ended.insert(id.clone(), order);
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for order in ended.values() {
        let reason = order["reason"].as_str().unwrap_or("confirmed");
        // "out of stock (MUG: …)" → "out of stock"
        let kind = reason.split(" (").next().unwrap_or(reason).to_owned();
        *reasons.entry(kind).or_default() += 1;
    }
    println!("outcomes of {ORDERS} orders: {reasons:?}");

    // Once the last compensations are through: stock conserved, nothing held, money right.
    let payments_db = keel_payments::Payments::new(
        keel_sdk::Database::connect(&databases[2].url, &keel_payments::MIGRATIONS)
            .await
            .unwrap(),
        keel_sdk::Bus::in_process("reader"),
        keel_payments::provider::Provider::new(provider()),
    );
    let mut problems = Vec::new();
    for _ in 0..300 {
        problems.clear();
        for (sku, _, initial) in STOCK {
            let sold: u64 = ended
                .values()
                .filter(|o| o["status"] == "confirmed")
                .flat_map(|o| o["lines"].as_array().unwrap().clone())
                .filter(|line| line["sku"] == sku)
                .map(|line| line["quantity"].as_u64().unwrap())
                .sum();
            let stock = stock_db
                .stock(&sku.parse().unwrap())
                .await
                .unwrap()
                .unwrap();
            if stock.reserved() != 0 || u64::from(stock.on_hand()) + sold != u64::from(initial) {
                problems.push(format!(
                    "{sku}: {} on hand + {sold} sold != {initial}; {} reserved",
                    stock.on_hand(),
                    stock.reserved()
                ));
            }
        }
        for (id, order) in &ended {
            let payment = payments_db.payment(&id.parse().unwrap()).await.unwrap();
            let status = payment.map(|p| p.status.as_str());
            let fine = match order["status"].as_str() {
                Some("confirmed") => status == Some("captured"),
                _ => matches!(status, None | Some("declined" | "voided" | "refunded")),
            };
            if !fine {
                problems.push(format!(
                    "order {id} {}: payment {status:?}",
                    order["status"]
                ));
            }
        }
        if problems.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(problems.is_empty(), "{problems:#?}");
    inventory.kill();
    payments.kill();
    orders.kill();
    shutdown.trigger();
}
