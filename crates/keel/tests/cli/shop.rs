//! The shop end to end, as `keel up` assembles it, on both profiles: the registry, the
//! gateway, the authorization server and the four services, with real tokens from the
//! authorization server and every request through the gateway. Built in process (rather
//! than by running `keel up`) so that one service, payments, can be stopped on its own.

use std::time::Duration;

use keel_auth::{AuthConfig, AuthServer, GrantType, NewClient, Subject};
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_registry::{RegistryConfig, RegistryServer};
use keel_runtime::{Secret, Server, Shutdown};
use keel_sdk::events::RabbitMqOptions;
use keel_sdk::service::{BusConfig, ServiceAuthConfig, ServiceConfig};
use keel_testkit::{Service, TestDatabase, TestSqlite, require, send, unique_name};
use serde_json::{Value, json};

/// Where the stack keeps its data.
enum Profile {
    /// SQLite files and the in-process bus.
    Embedded(Vec<TestSqlite>),
    /// PostgreSQL databases and a broker: RabbitMQ (on an exchange of its own) or Kafka (on
    /// a namespace of its own).
    Production(Vec<TestDatabase>, BusConfig),
}

impl Profile {
    async fn embedded() -> Self {
        Self::Embedded(
            ["auth", "catalog", "inventory", "payments", "orders"]
                .iter()
                .map(|name| TestSqlite::new(&format!("keel-e2e-{name}")))
                .collect(),
        )
    }

    async fn production(bus: BusConfig) -> Self {
        let mut databases = Vec::new();
        for _ in 0..5 {
            databases.push(TestDatabase::create().await);
        }
        Self::Production(databases, bus)
    }

    fn rabbitmq() -> BusConfig {
        BusConfig::Rabbitmq(RabbitMqOptions {
            exchange: unique_name("keel-e2e"),
            queue_expiry: Some(Duration::from_secs(120)),
            auto_delete_exchange: true,
            ..RabbitMqOptions::default()
        })
    }

    /// The database of component `index` (auth, catalog, inventory, payments, orders).
    fn database(&self, index: usize) -> String {
        match self {
            Self::Embedded(files) => files[index].url(),
            Self::Production(databases, _) => databases[index].url.clone(),
        }
    }

    fn bus(&self) -> BusConfig {
        match self {
            Self::Embedded(_) => BusConfig::InProcess,
            Self::Production(_, bus) => bus.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Embedded(_) => "embedded",
            Self::Production(_, BusConfig::Rabbitmq(_)) => "production",
            Self::Production(..) => "production with Kafka",
        }
    }
}

/// A running stack and tokens for its people.
struct Stack {
    http: reqwest::Client,
    gateway: String,
    admin: String,
    ada: String,
    bob: String,
    /// Stops the payments service alone.
    payments: Shutdown,
    shutdown: Shutdown,
    profile: Profile,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.trigger();
        self.payments.trigger();
    }
}

fn spawn<S: Server>(server: S, shutdown: &Shutdown) {
    let shutdown = shutdown.clone();
    tokio::spawn(async move { server.run(shutdown).await });
}

async fn stack(profile: Profile) -> Stack {
    let shutdown = Shutdown::new();
    let any_port = "127.0.0.1:0".parse().unwrap();
    let registry = RegistryServer::build(
        RegistryConfig {
            listen: any_port,
            ..RegistryConfig::default()
        },
        &shutdown,
    )
    .await
    .unwrap();
    let registry_url = format!("http://{}", registry.local_addr());
    spawn(registry, &shutdown);
    let gateway = GatewayServer::build(
        GatewayConfig {
            listen: any_port,
            admin_listen: any_port,
            registry: registry_url.clone(),
            discovery_routes: Some(true),
            ..GatewayConfig::default()
        },
        &shutdown,
    )
    .await
    .unwrap();
    let gateway_url = format!("http://{}", gateway.local_addr());
    spawn(gateway, &shutdown);
    let key = matches!(profile, Profile::Production(..))
        .then(|| Secret::new("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned()));
    let auth = AuthServer::build(
        AuthConfig {
            listen: any_port,
            database: keel_auth::config::DatabaseUrl::new(profile.database(0)),
            key_encryption_key: key,
            ..AuthConfig::default()
        },
        &shutdown,
    )
    .await
    .unwrap();
    let issuer = auth.issuer().to_owned();
    let admin_api = auth.admin();
    spawn(auth, &shutdown);

    // The operator's part: the shop's roles, and a client per person.
    for role in ["admin", "customer"] {
        admin_api.create_role(role, None, role, "").await.unwrap();
    }
    let http = keel_testkit::http();
    let mut tokens = Vec::new();
    for (name, role) in [
        ("shop-admin", "admin"),
        ("ada", "customer"),
        ("bob", "customer"),
    ] {
        let (client, secret) = admin_api
            .create_client(NewClient {
                client_id: Some(name.to_owned()),
                name: name.to_owned(),
                auth_method: keel_auth::AuthMethod::ClientSecretBasic,
                redirect_uris: vec![],
                post_logout_redirect_uris: Vec::new(),
                grant_types: vec![GrantType::ClientCredentials],
                scopes: String::new(),
                audiences: vec![],
                signing_alg: None,
                access_token_ttl: None,
                jwks: None,
            })
            .await
            .unwrap();
        admin_api
            .grant_role(role, &Subject::Client(client.client_id.clone()))
            .await
            .unwrap();
        let answer: Value = http
            .post(format!("{issuer}/token"))
            .basic_auth(name, secret)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens.push(answer["access_token"].as_str().unwrap().to_owned());
    }

    let config = |index: usize| ServiceConfig {
        listen: Some(any_port),
        database: Some(Secret::new(profile.database(index))),
        registry: Some(registry_url.clone()),
        heartbeat: Duration::from_secs(1),
        bus: profile.bus(),
        auth: Some(ServiceAuthConfig {
            issuer: issuer.clone(),
            audiences: vec!["keel-api".to_owned()],
        }),
        ..ServiceConfig::default()
    };
    let bus = keel_sdk::Bus::in_process("keel");
    let payments_shutdown = Shutdown::new();
    let provider = keel_payments::provider::ProviderConfig::default();
    let options = keel_orders::OrdersOptions {
        catalog: None,
        step_timeout: Duration::from_secs(2),
        ..keel_orders::OrdersOptions::default()
    };
    spawn(
        keel_catalog::build(&config(1), Some(&bus), &shutdown)
            .await
            .unwrap(),
        &shutdown,
    );
    spawn(
        keel_inventory::build(&config(2), Some(&bus), &shutdown)
            .await
            .unwrap(),
        &shutdown,
    );
    spawn(
        keel_payments::build(&config(3), &provider, Some(&bus), &payments_shutdown)
            .await
            .unwrap(),
        &payments_shutdown,
    );
    spawn(
        keel_orders::build(&config(4), &options, Some(&bus), &shutdown)
            .await
            .unwrap(),
        &shutdown,
    );
    let [admin, ada, bob] = <[String; 3]>::try_from(tokens).unwrap();
    let stack = Stack {
        http,
        gateway: gateway_url,
        admin,
        ada,
        bob,
        payments: payments_shutdown,
        shutdown,
        profile,
    };
    // The services register in the background: ready once the gateway routes to each.
    for service in ["catalog", "inventory", "payments", "orders"] {
        let path = format!("/{service}/health/ready");
        let mut status = 0;
        for _ in 0..100 {
            status = stack.get(&path, &stack.ada).await.0;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "{path}");
    }
    stack
}

impl Stack {
    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let (status, _, body) = send(
            self.http.get(format!("{}{path}", self.gateway)),
            Some(token),
        )
        .await;
        (status, body)
    }

    async fn put(&self, path: &str, body: Value) -> u16 {
        let request = self.http.put(format!("{}{path}", self.gateway)).json(&body);
        send(request, Some(&self.admin)).await.0
    }

    async fn place(&self, token: &str, key: Option<&str>, sku: &str, method: &str) -> (u16, Value) {
        let body = json!({"lines": [{"sku": sku, "quantity": 1}], "payment_method": method});
        let mut request = self
            .http
            .post(format!("{}/orders/orders", self.gateway))
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let (status, _, body) = send(request, Some(token)).await;
        (status, body)
    }

    /// Order `id` once it is no longer pending.
    async fn settled(&self, token: &str, id: &str) -> Value {
        for _ in 0..300 {
            let (_, order) = self.get(&format!("/orders/orders/{id}"), token).await;
            if order["status"] != "pending" {
                return order;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("order {id} still pending ({})", self.profile.name());
    }

    async fn on_hand(&self, sku: &str) -> (i64, i64) {
        let (_, level) = self
            .get(&format!("/inventory/stock/{sku}"), &self.admin)
            .await;
        (
            level["on_hand"].as_i64().unwrap(),
            level["reserved"].as_i64().unwrap(),
        )
    }

    async fn stock(&self, sku: &str, on_hand: u32) {
        let product = json!({"name": sku, "price": {"minor": 500, "currency": "EUR"}});
        assert!(matches!(
            self.put(&format!("/catalog/products/{sku}"), product).await,
            200 | 201
        ));
        assert_eq!(
            self.put(
                &format!("/inventory/stock/{sku}"),
                json!({"on_hand": on_hand})
            )
            .await,
            200
        );
    }
}

async fn every_case_through_the_gateway(profile: Profile) {
    let stack = stack(profile).await;
    let name = stack.profile.name();
    stack.stock("MUG", 5).await;
    stack.stock("LAST", 1).await;

    // Confirmed.
    let (status, placed) = stack.place(&stack.ada, None, "MUG", "tok_visa").await;
    assert_eq!(status, 202, "{name}: {placed}");
    let order = stack
        .settled(&stack.ada, placed["id"].as_str().unwrap())
        .await;
    assert_eq!(order["status"], "confirmed", "{name}: {order}");
    assert_eq!(stack.on_hand("MUG").await, (4, 0));

    // Declined: rejected, the stock released.
    let (_, placed) = stack
        .place(&stack.ada, None, "MUG", "tok_chargeDeclined")
        .await;
    let order = stack
        .settled(&stack.ada, placed["id"].as_str().unwrap())
        .await;
    assert_eq!(order["status"], "rejected", "{name}: {order}");
    assert!(order["reason"].as_str().unwrap().contains("declined"));
    assert_eq!(stack.on_hand("MUG").await, (4, 0), "{name}: released");

    // Out of stock.
    let (status, problem) = stack.place(&stack.ada, None, "NONE", "tok_visa").await;
    assert_eq!(
        status, 422,
        "{name}: not for sale is refused at once: {problem}"
    );
    stack.stock("GONE", 0).await;
    let (_, placed) = stack.place(&stack.ada, None, "GONE", "tok_visa").await;
    let order = stack
        .settled(&stack.ada, placed["id"].as_str().unwrap())
        .await;
    assert!(
        order["reason"]
            .as_str()
            .unwrap()
            .starts_with("out of stock"),
        "{name}: {order}"
    );

    // The same POST twice with one Idempotency-Key: one order.
    let (first_status, first) = stack
        .place(&stack.ada, Some("same-key"), "MUG", "tok_visa")
        .await;
    let (again_status, again) = stack
        .place(&stack.ada, Some("same-key"), "MUG", "tok_visa")
        .await;
    assert_eq!((first_status, again_status), (202, 200), "{name}");
    assert_eq!(first["id"], again["id"]);
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(stack.settled(&stack.ada, &id).await["status"], "confirmed");
    assert_eq!(
        stack.on_hand("MUG").await,
        (3, 0),
        "{name}: one order, one mug"
    );

    // Another customer reading it: 404.
    assert_eq!(
        stack
            .get(&format!("/orders/orders/{id}"), &stack.bob)
            .await
            .0,
        404,
        "{name}"
    );
    assert_eq!(
        stack
            .get(&format!("/orders/orders/{id}"), &stack.admin)
            .await
            .0,
        200
    );

    // Concurrent orders for the last unit: exactly one confirmed.
    let (a, b) = tokio::join!(
        stack.place(&stack.ada, None, "LAST", "tok_visa"),
        stack.place(&stack.bob, None, "LAST", "tok_visa")
    );
    let mut confirmed = 0;
    for ((_, placed), token) in [(a, &stack.ada), (b, &stack.bob)] {
        let order = stack.settled(token, placed["id"].as_str().unwrap()).await;
        confirmed += usize::from(order["status"] == "confirmed");
    }
    assert_eq!(confirmed, 1, "{name}");
    assert_eq!(stack.on_hand("LAST").await, (0, 0));

    // Payments down: the saga times out, compensates, and the order is rejected.
    stack.payments.trigger();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, placed) = stack.place(&stack.ada, None, "MUG", "tok_visa").await;
    let order = stack
        .settled(&stack.ada, placed["id"].as_str().unwrap())
        .await;
    assert_eq!(order["status"], "rejected", "{name}: {order}");
    assert_eq!(
        order["reason"], "the payment could not be made in time",
        "{name}"
    );
    assert_eq!(stack.on_hand("MUG").await, (3, 0), "{name}: released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_through_the_gateway_on_the_embedded_profile() {
    every_case_through_the_gateway(Profile::embedded().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_through_the_gateway_on_the_production_profile() {
    if !require(Service::Postgres) || !require(Service::RabbitMq) {
        return;
    }
    every_case_through_the_gateway(Profile::production(Profile::rabbitmq()).await).await;
}

/// The same stack with Kafka as its bus: only the configuration differs.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_through_the_gateway_on_the_production_profile_with_kafka() {
    if !require(Service::Postgres) || !require(Service::Kafka) {
        return;
    }
    let bus = BusConfig::Kafka(keel_sdk::events::KafkaOptions {
        namespace: unique_name("keel-e2e"),
        fetch_wait: keel_testkit::KAFKA_FETCH_WAIT,
        ..keel_sdk::events::KafkaOptions::default()
    });
    every_case_through_the_gateway(Profile::production(bus).await).await;
}
