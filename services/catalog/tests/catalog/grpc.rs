//! The catalog's gRPC price lookup, through the SDK's resilient client and the generated
//! tonic client, on the same port as its JSON API.

use keel_catalog::grpc::proto::PricesRequest;
use keel_catalog::grpc::proto::catalog_client::CatalogClient;
use keel_jwt::testing::TestIssuer;
use keel_runtime::Shutdown;
use keel_sdk::client::{ClientOptions, Instances, ServiceClient};
use keel_testkit::TestSqlite;
use serde_json::json;

#[tokio::test]
async fn prices_come_over_grpc_for_known_skus_and_bad_asks_are_refused() {
    let issuer = TestIssuer::start().await;
    let file = TestSqlite::new("keel-catalog-grpc");
    let shutdown = Shutdown::new();
    let base = crate::start(&file.url(), &issuer, None, &shutdown).await;
    let admin = issuer.mint(json!({"roles": ["admin"]}));
    for (sku, minor, active) in [("MUG-01", 1250, true), ("MUG-00", 100, false)] {
        let status = keel_testkit::http()
            .put(format!("{base}/products/{sku}"))
            .bearer_auth(&admin)
            .json(&json!({"name": "Mug", "price": {"minor": minor, "currency": "EUR"}, "active": active}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }

    let client = ServiceClient::new(
        "catalog",
        Instances::Static(vec![base]),
        ClientOptions::default(),
    )
    .unwrap();
    let mut catalog = CatalogClient::new(client.grpc());
    let ask = |skus: &[&str]| PricesRequest {
        skus: skus.iter().map(|s| (*s).to_owned()).collect(),
    };
    let reply = catalog
        .prices(ask(&["MUG-01", "MUG-00", "NOPE"]))
        .await
        .unwrap()
        .into_inner();
    let prices: Vec<(String, i64, String, bool)> = reply
        .prices
        .into_iter()
        .map(|p| (p.sku, p.minor, p.currency, p.for_sale))
        .collect();
    assert_eq!(
        prices,
        [
            ("MUG-01".into(), 1250, "EUR".into(), true),
            ("MUG-00".into(), 100, "EUR".into(), false),
        ]
    );

    let status = catalog.prices(ask(&["mug-01"])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let many: Vec<String> = (0..=keel_catalog::grpc::MAX_SKUS)
        .map(|i| format!("S{i}"))
        .collect();
    let status = catalog
        .prices(PricesRequest { skus: many })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    shutdown.trigger();
}
