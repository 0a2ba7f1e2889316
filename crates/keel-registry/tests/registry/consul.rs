//! Consul-API round trips with the request and response shapes Consul's clients use.

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn register_pass_health_block_and_deregister() {
    let registry = spawn_registry().await;
    let base = &registry.url;

    // As Spring Cloud Consul registers: TTL check, DeregisterCriticalServiceAfter, Meta.
    let response = put_json(
        &format!("{base}/v1/agent/service/register"),
        json!({
            "ID": "web-8080",
            "Name": "web",
            "Tags": ["secure=false", "v2"],
            "Address": "10.1.2.3",
            "Port": 8080,
            "Meta": {"version": "2.1.0", "zone": "eu-1a", "team": "shop"},
            "Check": {
                "TTL": "30s",
                "DeregisterCriticalServiceAfter": "90m"
            }
        }),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);

    // Consul's TTL checks start critical.
    let (status, headers, body) = get_json(&format!("{base}/v1/health/service/web?passing")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 0);
    assert!(headers.contains_key("x-consul-index"));

    let response = http()
        .put(format!(
            "{base}/v1/agent/check/pass/service:web-8080?note=ok"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let (_, headers, body) = get_json(&format!("{base}/v1/health/service/web?passing=true")).await;
    let entries = body.as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry["Node"]["Node"], "keel");
    assert_eq!(entry["Service"]["ID"], "web-8080");
    assert_eq!(entry["Service"]["Service"], "web");
    assert_eq!(entry["Service"]["Address"], "10.1.2.3");
    assert_eq!(entry["Service"]["Port"], 8080);
    assert_eq!(entry["Service"]["Tags"], json!(["secure=false", "v2"]));
    assert_eq!(entry["Service"]["Meta"]["version"], "2.1.0");
    assert_eq!(entry["Service"]["Meta"]["zone"], "eu-1a");
    assert_eq!(entry["Service"]["Meta"]["team"], "shop");
    assert_eq!(entry["Checks"][0]["CheckID"], "service:web-8080");
    assert_eq!(entry["Checks"][0]["Status"], "passing");
    assert_eq!(entry["Checks"][0]["Output"], "ok");
    assert_eq!(entry["Checks"][0]["Type"], "ttl");
    let index: u64 = headers["x-consul-index"].to_str().unwrap().parse().unwrap();

    // Blocking query: answers when the check fails.
    let url = format!("{base}/v1/health/service/web?index={index}&wait=10s");
    let blocked = tokio::spawn(async move { get_json(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished());
    let changed_at = Instant::now();
    let response = http()
        .put(format!("{base}/v1/agent/check/update/service:web-8080"))
        .json(&json!({"Status": "critical", "Output": "db down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, headers, body) = blocked.await.unwrap();
    assert!(changed_at.elapsed() < Duration::from_millis(100));
    let new_index: u64 = headers["x-consul-index"].to_str().unwrap().parse().unwrap();
    assert!(new_index > index);
    assert_eq!(body[0]["Checks"][0]["Status"], "critical");
    assert_eq!(body[0]["Checks"][0]["Output"], "db down");

    // Catalog reads.
    let (_, _, services) = get_json(&format!("{base}/v1/catalog/services")).await;
    assert_eq!(services, json!({"web": ["secure=false", "v2"]}));
    let (_, _, catalog) = get_json(&format!("{base}/v1/catalog/service/web?tag=v2")).await;
    assert_eq!(catalog[0]["ServiceID"], "web-8080");
    assert_eq!(catalog[0]["ServiceName"], "web");
    assert_eq!(catalog[0]["ServiceAddress"], "10.1.2.3");
    assert_eq!(catalog[0]["ServicePort"], 8080);
    let (_, _, none) = get_json(&format!("{base}/v1/catalog/service/web?tag=v9")).await;
    assert_eq!(none, json!([]));

    let response = http()
        .put(format!("{base}/v1/agent/service/deregister/web-8080"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, _, body) = get_json(&format!("{base}/v1/health/service/web")).await;
    assert_eq!(body, json!([]));
}

#[tokio::test]
async fn warn_and_fail_set_the_status_and_unknown_checks_are_404() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    put_json(
        &format!("{base}/v1/agent/service/register"),
        json!({"Name": "api", "ID": "api-1", "Port": 80, "Address": "127.0.0.1",
               "Checks": [{"CheckID": "api-ttl", "TTL": "10s", "Status": "passing"}]}),
    )
    .await;
    for (verb, want) in [
        ("warn", "warning"),
        ("fail", "critical"),
        ("pass", "passing"),
    ] {
        let response = http()
            .put(format!("{base}/v1/agent/check/{verb}/api-ttl"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (_, _, body) = get_json(&format!("{base}/v1/health/service/api")).await;
        assert_eq!(body[0]["Checks"][0]["Status"], want);
    }
    let response = http()
        .put(format!("{base}/v1/agent/check/pass/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = http()
        .put(format!("{base}/v1/agent/check/dance/api-ttl"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (_, _, body) = get_json(&format!("{base}/v1/health/service/api")).await;
    assert_eq!(
        body[0]["Checks"][0]["Status"], "passing",
        "an unknown verb changes nothing"
    );
}

#[tokio::test]
async fn an_http_check_cannot_be_set_by_hand() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let response = put_json(
        &format!("{base}/v1/agent/service/register"),
        json!({"Name": "api", "ID": "api-1", "Port": 80, "Address": "127.0.0.1",
               "Check": {"HTTP": "http://127.0.0.1:1/health", "Interval": "10s"}}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = http()
        .put(format!("{base}/v1/agent/check/pass/service:api-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn maintenance_mode_adds_a_critical_check_until_disabled() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    put_json(
        &format!("{base}/v1/agent/service/register"),
        json!({"Name": "web", "ID": "web-1", "Port": 80, "Address": "127.0.0.1",
               "Check": {"TTL": "30s", "Status": "passing"}}),
    )
    .await;
    let maintenance =
        |query: &str| http().put(format!("{base}/v1/agent/service/maintenance/web-1?{query}"));
    let (_, headers, _) = get_json(&format!("{base}/v1/health/service/web")).await;
    let index: u64 = headers["x-consul-index"].to_str().unwrap().parse().unwrap();

    let response = maintenance("enable=true&reason=kernel+upgrade")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, headers, body) = get_json(&format!("{base}/v1/health/service/web")).await;
    let new_index: u64 = headers["x-consul-index"].to_str().unwrap().parse().unwrap();
    assert!(new_index > index);
    let check = &body[0]["Checks"][1];
    assert_eq!(check["CheckID"], "_service_maintenance:web-1");
    assert_eq!(check["Name"], "Service Maintenance Mode");
    assert_eq!(check["Status"], "critical");
    assert_eq!(check["Notes"], "kernel upgrade");
    assert_eq!(check["Type"], "maintenance");
    let (_, _, passing) = get_json(&format!("{base}/v1/health/service/web?passing")).await;
    assert_eq!(passing, json!([]));
    // Eureka clients see it out of service.
    let response = http()
        .get(format!("{base}/eureka/instances/web-1"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    let eureka: serde_json::Value = response.json().await.unwrap();
    assert_eq!(eureka["instance"]["status"], "OUT_OF_SERVICE");
    // A TTL update cannot clear it; it is no TTL check.
    let response = http()
        .put(format!(
            "{base}/v1/agent/check/pass/_service_maintenance:web-1"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // Without a reason Consul's default text; disabling removes the check.
    maintenance("enable=true").send().await.unwrap();
    let (_, _, body) = get_json(&format!("{base}/v1/health/service/web")).await;
    assert!(
        body[0]["Checks"][1]["Notes"]
            .as_str()
            .unwrap()
            .starts_with("Maintenance mode is enabled")
    );
    let response = maintenance("enable=false").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, _, passing) = get_json(&format!("{base}/v1/health/service/web?passing")).await;
    assert_eq!(passing[0]["Checks"].as_array().unwrap().len(), 1);

    for (query, status) in [
        ("", StatusCode::BAD_REQUEST),
        ("enable=maybe", StatusCode::BAD_REQUEST),
    ] {
        let response = maintenance(query).send().await.unwrap();
        assert_eq!(response.status(), status, "{query:?}");
    }
    let response = http()
        .put(format!(
            "{base}/v1/agent/service/maintenance/ghost?enable=true"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}
