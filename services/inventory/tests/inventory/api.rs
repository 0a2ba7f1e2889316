//! The inventory's HTTP API: who may count stock, what is refused and how.

use keel_jwt::testing::{AUDIENCE, TestIssuer};
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::Bus;
use keel_sdk::service::{ServiceAuthConfig, ServiceConfig};
use serde_json::{Value, json};

use crate::databases;
use keel_testkit::send;

#[tokio::test]
async fn admins_count_stock_anyone_reads_it_and_bad_counts_are_problems() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    let customer = issuer.mint(json!({"sub": "ada", "roles": ["customer"]}));
    for database in databases().await {
        let shutdown = Shutdown::new();
        let config = ServiceConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            database: Some(Secret::new(database.url.clone())),
            auth: Some(ServiceAuthConfig {
                issuer: issuer.issuer().to_owned(),
                audiences: vec![AUDIENCE.to_owned()],
            }),
            ..ServiceConfig::default()
        };
        let bus = Bus::in_process("inventory");
        let service = keel_inventory::build(&config, Some(&bus), &shutdown)
            .await
            .unwrap();
        let base = format!("http://{}", service.local_addr());
        tokio::spawn(service.run(shutdown.clone()));
        let http = keel_testkit::http();
        let put = |sku: &str, body: Value| http.put(format!("{base}/stock/{sku}")).json(&body);
        let get = |path: &str| http.get(format!("{base}{path}"));

        assert_eq!(send(put("MUG", json!({"on_hand": 4})), None).await.0, 401);
        assert_eq!(
            send(put("MUG", json!({"on_hand": 4})), Some(&customer))
                .await
                .0,
            403
        );
        let (status, _, level) = send(put("MUG", json!({"on_hand": 4})), Some(&admin)).await;
        assert_eq!(status, 200, "{level}");
        assert_eq!(
            level,
            json!({"sku": "MUG", "on_hand": 4, "reserved": 0, "available": 4})
        );
        let (status, _, read) = send(get("/stock/MUG"), None).await;
        assert_eq!((status, read), (200, level));

        for (expected, (status, content_type, _)) in [
            (404, send(get("/stock/NONE"), None).await),
            (400, send(get("/stock/mug"), None).await),
            // A path that does not decode to text.
            (400, send(get("/stock/%C3"), None).await),
            (
                400,
                send(put("MUG", json!({"on_hand": -1})), Some(&admin)).await,
            ),
            (
                400,
                send(put("MUG", json!({"on_hand": 2_000_000_000})), Some(&admin)).await,
            ),
            (
                400,
                send(
                    put("MUG", json!({"on_hand": 1, "reserved": 0})),
                    Some(&admin),
                )
                .await,
            ),
            (404, send(get("/reservations/nope"), Some(&admin)).await),
            (400, send(get("/reservations/a%20b"), Some(&admin)).await),
            (403, send(get("/reservations/nope"), Some(&customer)).await),
        ] {
            assert_eq!(status, expected, "{}", database.url);
            assert_eq!(content_type, "application/problem+json");
        }
        assert_eq!(
            send(get("/stock/MUG"), None).await.2["on_hand"],
            4,
            "unchanged"
        );

        // Three held for an order: the count cannot go below them.
        let inventory = keel_inventory::Inventory::new(
            keel_sdk::Database::connect(&database.url, &keel_inventory::MIGRATIONS)
                .await
                .unwrap(),
            bus.clone(),
        );
        let reserve: keel_inventory::contract::Reserve = serde_json::from_value(json!({
            "reservation": "order-1", "lines": [{"sku": "MUG", "quantity": 3}]
        }))
        .unwrap();
        let db = keel_sdk::Database::connect(&database.url, &keel_inventory::MIGRATIONS)
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        inventory.reserve(&mut tx, &reserve).await.unwrap().unwrap();
        tx.commit().await.unwrap();
        let (status, content_type, problem) =
            send(put("MUG", json!({"on_hand": 2})), Some(&admin)).await;
        assert_eq!(
            (status, content_type.as_str()),
            (409, "application/problem+json"),
            "{problem}"
        );
        let (status, _, level) = send(put("MUG", json!({"on_hand": 3})), Some(&admin)).await;
        assert_eq!((status, level["available"].as_i64()), (200, Some(0)));

        let (_, _, openapi) = send(get("/openapi.json"), None).await;
        assert!(openapi["components"]["schemas"]["StockLevel"].is_object());
        let (_, _, asyncapi) = send(get("/asyncapi.json"), None).await;
        assert!(asyncapi["channels"]["keel.inventory.reserve.v1"].is_object());
        assert!(asyncapi["channels"]["keel.inventory.stock-changed.v1"].is_object());
        shutdown.trigger();
    }
}
