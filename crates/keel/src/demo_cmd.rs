//! `keel demo`: a newcomer's tour of the shop against a running stack. It gets a token,
//! stocks the shop through the gateway, places three orders (one confirmed, one declined by
//! the payment provider, one out of stock) and prints how each ended, step by step.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::config::KeelConfig;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The client whose token the tour uses (it needs the roles admin and customer; the
    /// seeded demo client has them).
    #[arg(long, default_value = "keel-demo")]
    client: String,
    /// The client's secret.
    #[arg(long, env = "KEEL_CLIENT_SECRET", hide_env_values = true)]
    secret: String,
    /// The gateway; defaults to the configured listen address.
    #[arg(long, env = "KEEL_GATEWAY_URL")]
    gateway: Option<String>,
    /// The authorization server; defaults to the configured issuer or listen address.
    #[arg(long, env = "KEEL_AUTH_URL")]
    auth: Option<String>,
}

/// An order of the tour, and how it should end.
struct Tour {
    what: &'static str,
    sku: &'static str,
    method: &'static str,
    expected: &'static str,
}

const TOUR: [Tour; 3] = [
    Tour {
        what: "a mug, paid with a card that works",
        sku: "DEMO-MUG",
        method: "tok_visa",
        expected: "confirmed",
    },
    Tour {
        what: "a mug, paid with a card the provider declines",
        sku: "DEMO-MUG",
        method: "tok_chargeDeclined",
        expected: "rejected",
    },
    Tour {
        what: "a teapot, out of stock",
        sku: "DEMO-TEAPOT",
        method: "tok_visa",
        expected: "rejected",
    },
];

/// How long an order may stay pending before the tour gives up on it.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);
/// How long the shop's services may take to be routed and ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

pub async fn run(args: DemoArgs, config: KeelConfig) -> anyhow::Result<()> {
    let gateway = args
        .gateway
        .unwrap_or_else(|| format!("http://{}", config.gateway.listen));
    let gateway = gateway.trim_end_matches('/');
    let auth = args
        .auth
        .or(config.auth.issuer)
        .unwrap_or_else(|| format!("http://{}", config.auth.listen));
    let token = crate::auth_cmd::client_token(&auth, &args.client, &args.secret, None).await?;
    let shop = Shop {
        http: keel_runtime::http_client::builder().build()?,
        gateway: gateway.to_owned(),
        token,
    };

    // A stack just started registers its services in the background.
    for service in ["catalog", "inventory", "payments", "orders"] {
        shop.ready(service).await?;
    }

    println!("Stocking the shop (as {}, role admin):", args.client);
    for (sku, name, minor, on_hand) in [
        ("DEMO-MUG", "Demo mug", 1250, 10),
        ("DEMO-TEAPOT", "Demo teapot", 3900, 0),
    ] {
        let product = json!({"name": name, "price": {"minor": minor, "currency": "EUR"}});
        shop.send(
            reqwest::Method::PUT,
            &format!("/catalog/products/{sku}"),
            Some(product),
            None,
        )
        .await?;
        shop.send(
            reqwest::Method::PUT,
            &format!("/inventory/stock/{sku}"),
            Some(json!({"on_hand": on_hand})),
            None,
        )
        .await?;
        let price = total(&json!({"total": {"minor": minor, "currency": "EUR"}}));
        println!("  {sku:<12} {name}, {price}, {on_hand} in stock");
    }

    println!(
        "\nPlacing three orders (as {}, role customer):",
        args.client
    );
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut surprises = 0;
    for (n, tour) in TOUR.iter().enumerate() {
        let order = json!({
            "lines": [{"sku": tour.sku, "quantity": 1}],
            "payment_method": tour.method,
        });
        let placed = shop
            .send(
                reqwest::Method::POST,
                "/orders/orders",
                Some(order),
                Some(&format!("demo-{run}-{n}")),
            )
            .await?;
        let id = placed["id"].as_str().context("the order has no id")?;
        let settled = shop.settled(id).await?;
        let status = settled["status"].as_str().unwrap_or("?");
        println!("\n  {} ({}): {status}", tour.what, tour.method);
        println!("    order {id}, total {}", total(&settled));
        if let Some(reason) = settled["reason"].as_str() {
            println!("    reason: {reason}");
        }
        for step in settled["steps"].as_array().into_iter().flatten() {
            let detail = step["detail"]
                .as_str()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            println!(
                "    {:<10} {:<13} {}{detail}",
                step["step"].as_str().unwrap_or("?"),
                step["phase"].as_str().unwrap_or("?"),
                step["outcome"].as_str().unwrap_or("?"),
            );
        }
        if status != tour.expected {
            surprises += 1;
            println!("    (expected {})", tour.expected);
        }
    }
    println!();
    if surprises > 0 {
        bail!("{surprises} order(s) did not end as the tour expects");
    }
    println!(
        "Each order ended as it should. Read one again: GET {gateway}/orders/orders/<id> (?wait=5s waits for a pending one to settle)"
    );
    Ok(())
}

fn total(order: &Value) -> String {
    let minor = order["total"]["minor"].as_i64().unwrap_or(0);
    let currency = order["total"]["currency"].as_str().unwrap_or("");
    format!("{}.{:02} {currency}", minor / 100, minor % 100)
}

struct Shop {
    http: reqwest::Client,
    gateway: String,
    token: String,
}

impl Shop {
    /// Sends a request through the gateway with the tour's token; the JSON answer, or an
    /// error with the problem's detail.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.gateway))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10));
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.gateway))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{method} {path}: {status}: {}",
                answer["detail"]
                    .as_str()
                    .or(answer["title"].as_str())
                    .unwrap_or("")
            );
        }
        Ok(answer)
    }

    /// Waits until the gateway routes to `service` and it is ready.
    async fn ready(&self, service: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        let url = format!("{}/{service}/health/ready", self.gateway);
        loop {
            let answer = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status().is_success()) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the gateway at {} does not reach a ready {service} (is `keel up` running?)",
                    self.gateway
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Order `id` once it is no longer pending: each read waits for it to settle (`?wait=`,
    /// answered as soon as it does).
    async fn settled(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
        loop {
            let order = self
                .send(
                    reqwest::Method::GET,
                    &format!("/orders/orders/{id}?wait=5s"),
                    None,
                    None,
                )
                .await?;
            if order["status"] != "pending" {
                return Ok(order);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("order {id} is still pending after {SETTLE_WITHIN:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
