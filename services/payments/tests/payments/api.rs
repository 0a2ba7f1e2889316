//! The payments HTTP API: idempotency keys, declines, provider failures, voids before
//! authorizations, and who may do what.

use keel_jwt::testing::{AUDIENCE, TestIssuer};
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::Bus;
use keel_sdk::service::{ServiceAuthConfig, ServiceConfig};
use keel_testkit::send;
use serde_json::{Value, json};

use crate::{databases, leave_claim, payments_on, provider};

/// The service on `url`, on a free port, trusting `issuer`'s tokens.
fn config(url: &str, issuer: &TestIssuer) -> ServiceConfig {
    ServiceConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database: Some(Secret::new(url.to_owned())),
        auth: Some(ServiceAuthConfig {
            issuer: issuer.issuer().to_owned(),
            audiences: vec![AUDIENCE.to_owned()],
        }),
        ..ServiceConfig::default()
    }
}

#[tokio::test]
async fn authorize_capture_and_void_with_idempotency_keys_and_every_refusal_a_problem() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    let customer = issuer.mint(json!({"sub": "ada", "roles": ["customer"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        let config = config(&database.url, &issuer);
        let bus = Bus::in_process("payments");
        let service = keel_payments::build(&config, &provider(), Some(&bus), &shutdown)
            .await
            .unwrap();
        let base = format!("http://{}", service.local_addr());
        tokio::spawn(service.run(shutdown.clone()));
        let http = keel_testkit::http();
        let authorize = |key: Option<&str>, body: Value| {
            let request = http.post(format!("{base}/payments")).json(&body);
            match key {
                Some(key) => request.header("idempotency-key", key),
                None => request,
            }
        };
        let post = |path: &str| http.post(format!("{base}{path}"));
        let get = |path: &str| http.get(format!("{base}{path}"));
        let ten = json!({"amount": {"minor": 1000, "currency": "EUR"}, "method": "tok_visa"});

        assert_eq!(send(authorize(Some("p-1"), ten.clone()), None).await.0, 401);
        assert_eq!(
            send(authorize(Some("p-1"), ten.clone()), Some(&customer))
                .await
                .0,
            403
        );
        assert_eq!(
            send(
                authorize(Some("p-1"), json!({"amount": 1})),
                Some(&customer)
            )
            .await
            .0,
            403
        );
        let (status, _, first) = send(authorize(Some("p-1"), ten.clone()), Some(&admin)).await;
        assert_eq!(status, 201, "{first} {}", database.url);
        assert_eq!(first["status"], "authorized");
        assert_eq!(first["amount"], json!({"minor": 1000, "currency": "EUR"}));
        // The same key: the same answer. The same key for something else: refused.
        assert_eq!(
            send(authorize(Some("p-1"), ten.clone()), Some(&admin))
                .await
                .2,
            first
        );
        // As a Structured Field string, as the draft writes it: the same key.
        assert_eq!(
            send(authorize(Some("\"p-1\""), ten.clone()), Some(&admin))
                .await
                .2,
            first
        );
        let eleven = json!({"amount": {"minor": 1100, "currency": "EUR"}, "method": "tok_visa"});
        let (status, content_type, _) = send(authorize(Some("p-1"), eleven), Some(&admin)).await;
        assert_eq!(
            (status, content_type.as_str()),
            (422, "application/problem+json")
        );

        for _ in 0..2 {
            let (status, _, captured) = send(post("/payments/p-1/capture"), Some(&admin)).await;
            assert_eq!(
                (status, captured["status"].as_str()),
                (200, Some("captured"))
            );
        }
        // Voided after the capture: refunded, and never captured again.
        let (_, _, refunded) = send(post("/payments/p-1/void"), Some(&admin)).await;
        assert_eq!(refunded["status"], "refunded");
        assert_eq!(
            send(post("/payments/p-1/capture"), Some(&admin)).await.0,
            409
        );
        // Its key again: the payment as it is now.
        let (status, _, now) = send(authorize(Some("p-1"), ten.clone()), Some(&admin)).await;
        assert_eq!((status, now["status"].as_str()), (201, Some("refunded")));

        // Declined, and declined again when asked again.
        let declined =
            json!({"amount": {"minor": 1000, "currency": "EUR"}, "method": "tok_chargeDeclined"});
        for _ in 0..2 {
            let (status, content_type, problem) =
                send(authorize(Some("p-2"), declined.clone()), Some(&admin)).await;
            assert_eq!(
                (status, content_type.as_str()),
                (402, "application/problem+json")
            );
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap()
                    .contains("card declined")
            );
        }
        assert_eq!(
            send(get("/payments/p-2"), Some(&admin)).await.2["status"],
            "declined"
        );

        // The provider fails: 503 with Retry-After, and nothing is kept.
        let broken =
            json!({"amount": {"minor": 5, "currency": "EUR"}, "method": "tok_processingError"});
        let response = authorize(Some("p-3"), broken)
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(send(get("/payments/p-3"), Some(&admin)).await.0, 404);

        // Voided before it was authorized: the late authorization is refused.
        let (status, _, tombstone) = send(post("/payments/p-4/void"), Some(&admin)).await;
        assert_eq!(
            (status, tombstone["status"].as_str()),
            (200, Some("voided"))
        );
        assert_eq!(
            send(authorize(Some("p-4"), ten.clone()), Some(&admin))
                .await
                .0,
            409
        );

        for (expected, (status, content_type, _)) in [
            (400, send(authorize(None, ten.clone()), Some(&admin)).await),
            (400, send(authorize(Some("a b"), ten.clone()), Some(&admin)).await),
            (400, send(authorize(Some("p-5"), json!({"amount": {"minor": 1, "currency": "EUR"}, "method": "4242424242424242"})), Some(&admin)).await),
            (400, send(authorize(Some("p-5"), json!({"amount": {"minor": -1, "currency": "EUR"}, "method": "tok_visa"})), Some(&admin)).await),
            (404, send(post("/payments/nope/capture"), Some(&admin)).await),
            (404, send(get("/payments/nope"), Some(&admin)).await),
            (403, send(get("/payments/p-1"), Some(&customer)).await),
        ] {
            assert_eq!(status, expected, "{}", database.url);
            assert_eq!(content_type, "application/problem+json");
        }
        shutdown.trigger();
    }
}

/// The answer's status, whether it said when to ask again (`Retry-After`), and its body.
async fn asked(request: reqwest::RequestBuilder, token: &str) -> (u16, bool, Value) {
    let response = request.bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    (
        status,
        retry_after,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The service on the database at `url` with `provider`, running until `shutdown`: its
/// `/payments` URL.
async fn running(
    url: &str,
    issuer: &TestIssuer,
    provider: &keel_payments::provider::ProviderConfig,
    shutdown: &Shutdown,
) -> String {
    let service = keel_payments::build(&config(url, issuer), provider, None, shutdown)
        .await
        .unwrap();
    let payments = format!("http://{}/payments", service.local_addr());
    tokio::spawn(service.run(shutdown.clone()));
    payments
}

/// A provider taking `seconds` to answer.
fn slow(seconds: u64) -> keel_payments::provider::ProviderConfig {
    keel_payments::provider::ProviderConfig {
        latency: std::time::Duration::from_secs(seconds),
        ..keel_payments::provider::ProviderConfig::default()
    }
}

#[tokio::test]
async fn one_key_sent_many_times_at_once_makes_one_payment_and_the_others_are_told_at_once() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        // A slow provider, so that the requests overlap while the first is answered.
        let url = running(&database.url, &issuer, &slow(2), &shutdown).await;
        let http = keel_testkit::http();
        let body = |minor: u64| json!({"amount": {"minor": minor, "currency": "EUR"}, "method": "tok_visa"});
        let tasks: Vec<_> = (0..8)
            .map(|n| {
                // Two different bodies under one key: exactly one request wins.
                let minor = 100 + (n % 2);
                let request = http
                    .post(&url)
                    .header("idempotency-key", "same")
                    .json(&body(minor));
                let admin = admin.clone();
                tokio::spawn(async move { (minor, asked(request, &admin).await) })
            })
            .collect();
        let mut created = Vec::new();
        let mut answers = Vec::new();
        for task in tasks {
            let (minor, (status, retry_after, answer)) = task.await.unwrap();
            if status == 201 {
                created.push((minor, answer));
            } else {
                answers.push((minor, status, retry_after));
            }
        }
        // One body won; a request with it that came after the first was answered (a slow
        // start) gets the same payment.
        let (won, payment) = &created[0];
        assert!(
            created
                .iter()
                .all(|(minor, answer)| (minor, answer) == (won, payment))
        );
        let mut in_progress = 0;
        for (minor, status, retry_after) in &answers {
            if minor == won {
                // The same request while the first is still answered: in progress.
                assert_eq!((*status, *retry_after), (409, true), "{}", database.url);
                in_progress += 1;
            } else {
                assert_eq!(*status, 422, "another body under the key");
            }
        }
        assert!(in_progress > 0, "{answers:?} on {}", database.url);
        // Asked again once answered: the same payment.
        let again = http
            .post(&url)
            .header("idempotency-key", "same")
            .json(&body(*won));
        let (status, _, repeated) = asked(again, &admin).await;
        assert_eq!((status, &repeated), (201, payment), "{}", database.url);
        shutdown.trigger();
    }
}

#[tokio::test]
async fn a_claim_left_by_a_request_that_died_is_taken_over_once_it_is_old() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        let url = running(&database.url, &issuer, &provider(), &shutdown).await;
        // Claims as a request leaves them when it dies between its claim and its answer:
        // one a minute old, one just made.
        let db = keel_sdk::Database::connect(&database.url, &keel_payments::MIGRATIONS)
            .await
            .unwrap();
        let now = keel_sdk::data::unix_seconds();
        leave_claim(&db, "old", now - 60).await;
        leave_claim(&db, "fresh", now).await;
        leave_claim(&db, "abandoned", now - 60).await;
        let http = keel_testkit::http();
        let post = |key: &str, minor: u64| {
            http.post(&url)
                .header("idempotency-key", key)
                .json(&json!({"amount": {"minor": minor, "currency": "EUR"}, "method": "tok_visa"}))
        };
        let (status, _, payment) = asked(post("old", 300), &admin).await;
        assert_eq!(
            (status, payment["status"].as_str()),
            (201, Some("authorized")),
            "{payment} on {}",
            database.url
        );
        let (status, retry_after, _) = asked(post("fresh", 300), &admin).await;
        assert_eq!((status, retry_after), (409, true));
        assert_eq!(asked(post("fresh", 301), &admin).await.0, 422);
        // Not made yet, so not found, and neither captured nor voided.
        let look = http.get(format!("{url}/fresh"));
        assert_eq!(asked(look, &admin).await.0, 404);
        for settle in ["capture", "void"] {
            let request = http.post(format!("{url}/fresh/{settle}"));
            let (status, retry_after, _) = asked(request, &admin).await;
            assert_eq!((status, retry_after), (409, true), "{settle}");
        }
        // An old claim met by a void: its authorization finished first, then voided.
        let void = http.post(format!("{url}/abandoned/void"));
        let (status, _, voided) = asked(void, &admin).await;
        assert_eq!(
            (
                status,
                voided["status"].as_str(),
                voided["amount"]["minor"].as_u64()
            ),
            (200, Some("voided"), Some(300)),
            "{voided} on {}",
            database.url
        );
        shutdown.trigger();
    }
}

#[tokio::test]
async fn an_authorization_whose_client_went_away_is_decided_before_shutdown_ends() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        let url = running(&database.url, &issuer, &slow(1), &shutdown).await;
        // The client gives up while the provider is asked: its request is dropped.
        let impatient = keel_runtime::http_client::builder()
            .timeout(std::time::Duration::from_millis(300))
            .build()
            .unwrap();
        let sent = impatient
            .post(&url)
            .header("idempotency-key", "gone")
            .json(&json!({"amount": {"minor": 700, "currency": "EUR"}, "method": "tok_visa"}))
            .bearer_auth(&admin)
            .send()
            .await;
        assert!(sent.is_err_and(|error| error.is_timeout()));
        shutdown.trigger();
        shutdown.run_hooks(std::time::Duration::from_secs(5)).await;
        // Once the hooks are done the decision is kept, not a claim to be taken over later.
        let (_db, payments) = payments_on(&database.url).await;
        let payment = payments.payment(&"gone".parse().unwrap()).await.unwrap();
        assert_eq!(
            payment.map(|payment| payment.status.as_str().to_owned()),
            Some("authorized".to_owned()),
            "{}",
            database.url
        );
    }
}

#[tokio::test]
async fn a_provider_failure_on_authorize_keeps_nothing_not_even_the_claim() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        let url = running(&database.url, &issuer, &provider(), &shutdown).await;
        let http = keel_testkit::http();
        let post = |method: &str| {
            http.post(&url)
                .header("idempotency-key", "p-9")
                .json(&json!({"amount": {"minor": 900, "currency": "EUR"}, "method": method}))
        };
        for _ in 0..2 {
            // Failing again, not "in progress": the first failure gave its claim up.
            let (status, retry_after, _) = asked(post("tok_processingError"), &admin).await;
            assert_eq!((status, retry_after), (503, true));
        }
        assert_eq!(asked(http.get(format!("{url}/p-9")), &admin).await.0, 404);
        // The key is free for another method.
        let (status, _, payment) = asked(post("tok_visa"), &admin).await;
        assert_eq!(
            (status, payment["status"].as_str()),
            (201, Some("authorized"))
        );
        shutdown.trigger();
    }
}

#[tokio::test]
async fn a_provider_failure_on_capture_changes_nothing_and_says_try_again() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        // Two instances on one database: one whose provider always answers, one whose
        // provider always fails (for tokens that are not test tokens).
        let mut bases = Vec::new();
        for failure_rate in [0.0, 1.0] {
            let provider = keel_payments::provider::ProviderConfig {
                failure_rate,
                ..provider()
            };
            let service =
                keel_payments::build(&config(&database.url, &issuer), &provider, None, &shutdown)
                    .await
                    .unwrap();
            bases.push(format!("http://{}", service.local_addr()));
            tokio::spawn(service.run(shutdown.clone()));
        }
        let http = keel_testkit::http();
        let chance = json!({"amount": {"minor": 700, "currency": "EUR"}, "method": "tok_chance"});
        let authorize = http
            .post(format!("{}/payments", bases[0]))
            .header("idempotency-key", "p-7")
            .json(&chance);
        let (status, _, payment) = send(authorize, Some(&admin)).await;
        assert_eq!(
            (status, payment["status"].as_str()),
            (201, Some("authorized")),
            "{payment}"
        );
        let capture = http
            .post(format!("{}/payments/p-7/capture", bases[1]))
            .bearer_auth(&admin);
        let response = capture.send().await.unwrap();
        assert_eq!(response.status(), 503, "{}", database.url);
        assert!(response.headers().contains_key("retry-after"));
        let (_, _, after) =
            send(http.get(format!("{}/payments/p-7", bases[0])), Some(&admin)).await;
        assert_eq!(after["status"], "authorized", "nothing changed");
        let capture = http.post(format!("{}/payments/p-7/capture", bases[0]));
        assert_eq!(send(capture, Some(&admin)).await.2["status"], "captured");
        shutdown.trigger();
    }
}
