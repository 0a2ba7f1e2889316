//! Reading and writing products over HTTP: who may write, what is refused, what is
//! published, on SQLite and on PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_catalog::events::ProductChanged;
use keel_jwt::testing::{AUDIENCE, TestIssuer};
use keel_runtime::{Secret, Shutdown};
use keel_sdk::events::Bus;
use keel_sdk::service::{ServiceAuthConfig, ServiceConfig};
use keel_sdk::{Handler, HandlerError, Received, Tx};
use keel_testkit::{TestSqlite, send};
use serde_json::{Value, json};

/// Counts the `ProductChanged` events it hears.
#[derive(Clone, Default)]
struct Heard(Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<(String, i64)>>>);

impl Handler<ProductChanged> for Heard {
    async fn handle(
        &self,
        _: &mut Tx,
        heard: Received<ProductChanged>,
    ) -> Result<(), HandlerError> {
        let change = heard.event;
        self.1
            .lock()
            .unwrap()
            .push((change.sku.to_string(), change.version));
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn admins_write_products_everyone_reads_what_is_for_sale_and_changes_are_published() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    let customer = issuer.mint(json!({"sub": "ada", "roles": ["customer"]}));
    for database in keel_testkit::each_database("keel-catalog").await {
        let url = database.url.clone();
        let shutdown = Shutdown::new();
        let bus = Bus::in_process("test");
        let heard = Heard::default();
        // Kept for the whole test: dropping it deletes the file under the pool.
        let listener_file = TestSqlite::new("keel-catalog-listener");
        let listener_db =
            keel_sdk::Database::connect(&listener_file.url(), &keel_sdk::Migrations::none())
                .await
                .unwrap();
        let consumer = bus
            .consumer("listener", &listener_db)
            .on::<ProductChanged, _>(heard.clone())
            .start()
            .await
            .unwrap();
        tokio::spawn(consumer.run(shutdown.clone()));
        let base = crate::start(&url, &issuer, Some(&bus), &shutdown).await;
        let http = keel_testkit::http();
        let put = |sku: &str, body: Value| http.put(format!("{base}/products/{sku}")).json(&body);
        let mug = json!({"name": "Blue mug", "price": {"minor": 1250, "currency": "EUR"}});

        assert_eq!(send(put("MUG-01", mug.clone()), None).await.0, 401, "{url}");
        // Who may not write is told so before anything about the body.
        assert_eq!(send(put("MUG-01", json!({"name": ""})), None).await.0, 401);
        assert_eq!(
            send(put("MUG-01", json!({"name": ""})), Some(&customer))
                .await
                .0,
            403
        );
        assert_eq!(
            send(put("MUG-01", mug.clone()), Some(&customer)).await.0,
            403
        );
        let (status, _, created) = send(put("MUG-01", mug.clone()), Some(&admin)).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["price"], json!({"minor": 1250, "currency": "EUR"}));

        // Read (and so cached), then changed: the next read sees the change.
        let get = |sku: &str| http.get(format!("{base}/products/{sku}"));
        let (status, _, read) = send(get("MUG-01"), None).await;
        assert_eq!(read["price"]["minor"], 1250, "{status} {read}");
        let cheaper = json!({"name": "Blue mug", "price": {"minor": 990, "currency": "EUR"}});
        assert_eq!(send(put("MUG-01", cheaper), Some(&admin)).await.0, 200);
        let mut seen = 0;
        for _ in 0..100 {
            seen = send(get("MUG-01"), None).await.2["price"]["minor"]
                .as_i64()
                .unwrap();
            if seen == 990 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, 990, "the cached copy went with the commit");

        // Withdrawn from sale: still readable by SKU, gone from the list.
        let withdrawn =
            json!({"name": "Old mug", "price": {"minor": 100, "currency": "EUR"}, "active": false});
        assert_eq!(send(put("MUG-00", withdrawn), Some(&admin)).await.0, 201);
        let (_, _, listed) = send(http.get(format!("{base}/products")), None).await;
        let skus: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["sku"].as_str().unwrap())
            .collect();
        assert_eq!(skus, ["MUG-01"]);
        assert_eq!(send(get("MUG-00"), None).await.2["active"], false);

        // Refused, as problems, each with its own status.
        for (expected, (status, content_type, _)) in [
            (400, send(get("mug-01"), None).await),
            // A path that does not decode to text.
            (400, send(get("%FF"), None).await),
            (404, send(get("NOPE"), None).await),
            (
                400,
                send(put("MUG-02", json!({"name": "", "price": {"minor": 1, "currency": "EUR"}})), Some(&admin)).await,
            ),
            (
                400,
                send(put("MUG-02", json!({"name": "Mug", "price": {"minor": -1, "currency": "EUR"}})), Some(&admin)).await,
            ),
            (
                400,
                send(put("MUG-02", json!({"name": "Mug", "price": {"minor": 1, "currency": "EUR"}, "stock": 3})), Some(&admin)).await,
            ),
        ] {
            assert_eq!(status, expected);
            assert_eq!(content_type, "application/problem+json");
        }

        // Three changes, three events, through the outbox.
        for _ in 0..100 {
            if heard.0.load(Ordering::SeqCst) == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(heard.0.load(Ordering::SeqCst), 3, "{url}");
        let mut versions = heard.1.lock().unwrap().clone();
        versions.sort();
        assert_eq!(
            versions,
            [
                ("MUG-00".to_owned(), 1),
                ("MUG-01".to_owned(), 1),
                ("MUG-01".to_owned(), 2)
            ],
            "each write one version more"
        );

        let (status, _, openapi) = send(http.get(format!("{base}/openapi.json")), None).await;
        assert_eq!(status, 200);
        assert!(openapi["components"]["schemas"]["Product"].is_object());
        let (_, _, asyncapi) = send(http.get(format!("{base}/asyncapi.json")), None).await;
        assert!(asyncapi["channels"]["keel.catalog.product-changed.v1"].is_object());
        shutdown.trigger();
    }
}

/// Two catalog instances sharing Redis as the second cache level: a change written through
/// one drops the copy the other had cached, at once (not when its own copy would expire).
#[tokio::test]
async fn instances_sharing_redis_see_each_others_changes_at_once() {
    use keel_testkit::{Service, require, unique_name};
    if !require(Service::Redis) {
        return;
    }
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    let file = TestSqlite::new("keel-catalog-shared");
    let config = ServiceConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database: Some(Secret::new(file.url())),
        auth: Some(ServiceAuthConfig {
            issuer: issuer.issuer().to_owned(),
            audiences: vec![AUDIENCE.to_owned()],
        }),
        cache: Some(keel_sdk::service::CacheConfig {
            redis: Secret::new(format!("redis://{}", Service::Redis.addr())),
            prefix: Some(unique_name("keel-catalog")),
            timeout: Duration::from_millis(500),
        }),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let mut bases = Vec::new();
    for _ in 0..2 {
        let service = keel_catalog::build(&config, None, &shutdown).await.unwrap();
        bases.push(format!("http://{}", service.local_addr()));
        tokio::spawn(service.run(shutdown.clone()));
    }
    let http = keel_testkit::http();
    let put = |base: &str, minor: i64| {
        http.put(format!("{base}/products/MUG"))
            .json(&json!({"name": "Mug", "price": {"minor": minor, "currency": "EUR"}}))
    };
    let price = |base: String| {
        let http = http.clone();
        async move {
            send(http.get(format!("{base}/products/MUG")), None).await.2["price"]["minor"].as_i64()
        }
    };
    assert_eq!(send(put(&bases[0], 100), Some(&admin)).await.0, 201);
    assert_eq!(
        price(bases[0].clone()).await,
        Some(100),
        "cached by the first"
    );
    assert_eq!(send(put(&bases[1], 200), Some(&admin)).await.0, 200);
    let mut seen = None;
    for _ in 0..50 {
        seen = price(bases[0].clone()).await;
        if seen == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen,
        Some(200),
        "the first instance's copy went with the second's write"
    );
    shutdown.trigger();
}

/// The list comes a page at a time, by SKU, with a `Link` to the next page while there is
/// one; following the links gives every product for sale once, in order, on both backends.
#[tokio::test]
async fn the_list_is_paged_by_sku_with_links_to_the_next_page() {
    let issuer = TestIssuer::start().await;
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));
    for database in keel_testkit::each_database("keel-catalog-pages").await {
        let shutdown = Shutdown::new();
        let base = crate::start(&database.url, &issuer, None, &shutdown).await;
        let http = keel_testkit::http();
        // Dashes where a locale's collation would sort them apart from byte order.
        let skus = ["A-1", "A1", "AB", "A-B", "B", "Z-9", "OLD"];
        for sku in skus {
            let product = json!({
                "name": format!("Product {sku}"),
                "price": {"minor": 100, "currency": "EUR"},
                "active": sku != "OLD",
            });
            let put = http.put(format!("{base}/products/{sku}")).json(&product);
            assert_eq!(send(put, Some(&admin)).await.0, 201);
        }
        let mut expected: Vec<&str> = skus.into_iter().filter(|sku| *sku != "OLD").collect();
        expected.sort_unstable();

        let mut listed = Vec::new();
        let mut next = Some(format!("{base}/products?limit=2"));
        let mut pages = 0;
        while let Some(url) = next.take() {
            let response = http.get(&url).send().await.unwrap();
            assert_eq!(response.status(), 200, "{url}");
            next = response
                .headers()
                .get("link")
                .map(|link| link.to_str().unwrap().to_owned())
                .map(|link| {
                    let query = link
                        .strip_prefix("<?")
                        .and_then(|rest| rest.strip_suffix(">; rel=\"next\""))
                        .unwrap_or_else(|| panic!("{link}"));
                    format!("{base}/products?{query}")
                });
            let page: Vec<Value> = response.json().await.unwrap();
            assert!(page.len() <= 2);
            listed.extend(page.iter().map(|p| p["sku"].as_str().unwrap().to_owned()));
            pages += 1;
        }
        assert_eq!(listed, expected, "{}", database.url);
        assert_eq!(pages, 3);
        // The default page holds them all, and says there is no more.
        let response = http.get(format!("{base}/products")).send().await.unwrap();
        assert!(response.headers().get("link").is_none());
        assert_eq!(response.json::<Vec<Value>>().await.unwrap().len(), 6);

        for query in [
            "limit=0",
            "limit=1001",
            "limit=two",
            "after=bad%20sku",
            "page=2",
        ] {
            let (status, content_type, _) =
                send(http.get(format!("{base}/products?{query}")), None).await;
            assert_eq!(status, 400, "{query}");
            assert_eq!(content_type, "application/problem+json");
        }
        shutdown.trigger();
    }
}
