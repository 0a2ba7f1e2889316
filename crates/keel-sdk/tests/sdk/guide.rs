//! The guide's example service (`examples/greetings`), built and exercised as a test so
//! that neither the example nor the guide can rot.

use std::time::Duration;

use keel_runtime::{Secret, Shutdown};
use keel_sdk::service::ServiceConfig;
use keel_testkit::TestSqlite;

use crate::helpers::eventually;

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../../examples/greetings/main.rs"]
mod greetings;

async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn greet(http: &reqwest::Client, base: &str, name: &str) -> reqwest::Response {
    http.post(format!("{base}/greetings"))
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_guides_example_service_works_as_the_guide_says() {
    let file = TestSqlite::new("keel-sdk-guide");
    let config = ServiceConfig {
        database: Some(Secret::new(file.url())),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let service = greetings::build(&config, &shutdown).await.unwrap();
    let base = format!("http://{}", service.local_addr());
    let running = tokio::spawn(service.run(shutdown.clone()));
    let http = keel_testkit::http();

    for times in 1..=2 {
        let greeting: serde_json::Value = greet(&http, &base, "Ada").await.json().await.unwrap();
        assert_eq!(greeting["times"], times);
        // Read through the cache, which the write invalidated after its commit.
        eventually(
            "the cache shows the write",
            Duration::from_secs(5),
            || async {
                let read: serde_json::Value =
                    get_json(&http, &format!("{base}/greetings/Ada")).await;
                read["times"] == times
            },
        )
        .await;
    }
    let missing = http
        .get(format!("{base}/greetings/Bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let refused = greet(&http, &base, "").await;
    assert_eq!(refused.status(), 400);

    // Both events went out through the outbox and were heard once each.
    let db = keel_sdk::Database::connect(&file.url(), &greetings::MIGRATIONS)
        .await
        .unwrap();
    eventually(
        "the consumer heard both",
        Duration::from_secs(5),
        || async {
            let heard: i64 = keel_sdk::sqlx::query_scalar(
                "SELECT count(*) FROM keel_inbox WHERE consumer_group = 'greetings'",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            heard == 2
        },
    )
    .await;

    let asyncapi: serde_json::Value = get_json(&http, &format!("{base}/asyncapi.json")).await;
    assert_eq!(
        asyncapi["channels"]["keel.greetings.greeted.v1"]["address"],
        "keel.greetings.greeted.v1"
    );
    let openapi = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(openapi.status(), 200);

    shutdown.trigger();
    running.await.unwrap().unwrap();
}
