//! The shop's four services in one process on one bus, each on its own database (SQLite,
//! then PostgreSQL when it answers), with tokens from a test issuer: orders placed over
//! HTTP and carried out by the order saga.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod consistency;
mod placing;

use std::time::Duration;

use keel_jwt::testing::{AUDIENCE, TestIssuer};
use keel_orders::OrdersOptions;
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::Bus;
use keel_sdk::service::{ServiceAuthConfig, ServiceConfig};
use keel_testkit::{EachDatabase, send};
use serde_json::{Value, json};

/// The running shop: where its services answer, and tokens for its people.
pub struct Shop {
    pub http: reqwest::Client,
    pub orders: String,
    pub catalog: String,
    pub inventory: String,
    pub payments: Option<String>,
    pub admin: String,
    pub ada: String,
    pub bob: String,
    pub backend: String,
    shutdown: Shutdown,
    _databases: Vec<EachDatabase>,
    _issuer: TestIssuer,
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// One shop per backend: catalog, inventory, payments (unless `without_payments`) and
/// orders, with MUG (12.50 EUR, 5 in stock), TEA (4.00 EUR, 1 in stock) and OLD (not for
/// sale, 9 in stock).
pub async fn shops(without_payments: bool, step_timeout: Duration) -> Vec<Shop> {
    let options = OrdersOptions {
        step_timeout,
        ..OrdersOptions::default()
    };
    shops_with(without_payments, options).await
}

/// [`shops`] with orders' `options` (its catalog is the shop's).
pub async fn shops_with(without_payments: bool, options: OrdersOptions) -> Vec<Shop> {
    let mut per_backend: Vec<Vec<EachDatabase>> = Vec::new();
    for service in ["catalog", "inventory", "payments", "orders"] {
        let databases = keel_testkit::each_database(&format!("keel-shop-{service}")).await;
        for (backend, database) in databases.into_iter().enumerate() {
            if per_backend.len() <= backend {
                per_backend.push(Vec::new());
            }
            per_backend[backend].push(database);
        }
    }
    let mut shops = Vec::new();
    for databases in per_backend {
        shops.push(shop(databases, without_payments, options.clone()).await);
    }
    shops
}

async fn shop(
    databases: Vec<EachDatabase>,
    without_payments: bool,
    options: OrdersOptions,
) -> Shop {
    let issuer = TestIssuer::start().await;
    let shutdown = Shutdown::new();
    let bus = Bus::in_process("shop");
    let config = |database: &EachDatabase| ServiceConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database: Some(Secret::new(database.url.clone())),
        auth: Some(ServiceAuthConfig {
            issuer: issuer.issuer().to_owned(),
            audiences: vec![AUDIENCE.to_owned()],
        }),
        ..ServiceConfig::default()
    };
    let base =
        |service: &keel_sdk::service::RunningService| format!("http://{}", service.local_addr());
    let catalog = keel_catalog::build(&config(&databases[0]), Some(&bus), &shutdown)
        .await
        .unwrap();
    let catalog_url = base(&catalog);
    tokio::spawn(catalog.run(shutdown.clone()));
    let inventory = keel_inventory::build(&config(&databases[1]), Some(&bus), &shutdown)
        .await
        .unwrap();
    let inventory_url = base(&inventory);
    tokio::spawn(inventory.run(shutdown.clone()));
    let payments_url = if without_payments {
        None
    } else {
        let provider = keel_payments::provider::ProviderConfig {
            latency: Duration::from_millis(1),
            ..Default::default()
        };
        let payments =
            keel_payments::build(&config(&databases[2]), &provider, Some(&bus), &shutdown)
                .await
                .unwrap();
        let url = base(&payments);
        tokio::spawn(payments.run(shutdown.clone()));
        Some(url)
    };
    let options = OrdersOptions {
        catalog: Some(vec![catalog_url.clone()]),
        ..options
    };
    let orders = keel_orders::build(&config(&databases[3]), &options, Some(&bus), &shutdown)
        .await
        .unwrap();
    let orders_url = base(&orders);
    tokio::spawn(orders.run(shutdown.clone()));

    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    let http = keel_testkit::http();
    for (sku, minor, active, on_hand) in [
        ("MUG", 1250, true, 5),
        ("TEA", 400, true, 1),
        ("OLD", 100, false, 9),
    ] {
        let product =
            json!({"name": sku, "price": {"minor": minor, "currency": "EUR"}, "active": active});
        let put = http
            .put(format!("{catalog_url}/products/{sku}"))
            .json(&product);
        assert_eq!(send(put, Some(&admin)).await.0, 201);
        let count = http
            .put(format!("{inventory_url}/stock/{sku}"))
            .json(&json!({"on_hand": on_hand}));
        assert_eq!(send(count, Some(&admin)).await.0, 200);
    }
    Shop {
        http,
        orders: orders_url,
        catalog: catalog_url,
        inventory: inventory_url,
        payments: payments_url,
        ada: issuer.mint(json!({"sub": "ada", "roles": ["customer"]})),
        bob: issuer.mint(json!({"sub": "bob", "roles": ["customer"]})),
        admin,
        backend: databases[3]
            .url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned(),
        shutdown,
        _databases: databases,
        _issuer: issuer,
    }
}

impl Shop {
    /// Places an order as `token`; the response's status and body.
    pub async fn place(&self, token: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/orders", self.orders))
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let (status, _, body) = send(request, Some(token)).await;
        (status, body)
    }

    /// Order `id` as `token` sees it.
    pub async fn order(&self, token: &str, id: &str) -> (u16, Value) {
        let (status, _, body) = send(
            self.http.get(format!("{}/orders/{id}", self.orders)),
            Some(token),
        )
        .await;
        (status, body)
    }

    /// Waits for order `id` to leave pending; returns it.
    pub async fn settled(&self, id: &str) -> Value {
        self.until(id, |status| status != "pending").await
    }

    /// Waits for order `id` to reach a status `wanted` accepts; returns it.
    pub async fn until(&self, id: &str, wanted: impl Fn(&str) -> bool) -> Value {
        let mut order = Value::Null;
        for _ in 0..400 {
            order = self.order(&self.admin, id).await.1;
            if wanted(order["status"].as_str().unwrap_or_default()) {
                return order;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("order {id} stays {} on {}", order["status"], self.backend);
    }

    /// `step phase outcome` of each line of order `order`'s saga history.
    pub fn steps(order: &Value) -> Vec<String> {
        order["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{} {} {}", s["step"], s["phase"], s["outcome"]).replace('"', ""))
            .collect()
    }

    /// (on hand, reserved) of `sku`.
    pub async fn stock(&self, sku: &str) -> (i64, i64) {
        let (_, _, level) = send(
            self.http.get(format!("{}/stock/{sku}", self.inventory)),
            None,
        )
        .await;
        (
            level["on_hand"].as_i64().unwrap(),
            level["reserved"].as_i64().unwrap(),
        )
    }

    /// The status of payment `id` (the order's id), if it was ever made.
    pub async fn payment(&self, id: &str) -> Option<String> {
        let url = format!("{}/payments/{id}", self.payments.as_ref()?);
        let (status, _, payment) = send(self.http.get(url), Some(&self.admin)).await;
        (status == 200).then(|| payment["status"].as_str().unwrap().to_owned())
    }
}
