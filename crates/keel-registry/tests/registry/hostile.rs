//! Malformed, oversized and hostile requests: 4xx problem+json, never a panic, and nothing
//! already registered is lost.

use http::StatusCode;
use keel_registry::client::{InstancesQuery, RegistryClient};
use serde_json::json;

use crate::helpers::*;

async fn assert_problem(response: reqwest::Response, status: StatusCode) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    body
}

#[tokio::test]
async fn malformed_registrations_are_rejected_and_nothing_is_lost() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    client
        .register(&registration("orders", "orders-1", vec![]))
        .await
        .unwrap();
    let url =
        |service: &str, id: &str| format!("{}/v1/services/{service}/instances/{id}", registry.url);

    let cases = [
        (
            url("orders", "o-2"),
            json!({"address": "127.0.0.1", "port": 70000}),
            "port",
        ),
        (
            url("orders", "o-2"),
            json!({"address": "127.0.0.1", "port": 0}),
            "port",
        ),
        (
            url("orders", "o-2"),
            json!({"address": "127.0.0.1", "port": 1, "colour": "red"}),
            "colour",
        ),
        (
            url("orders", "o-2"),
            json!({"address": "a b", "port": 1}),
            "address",
        ),
        (url("orders", "o-2"), json!({"port": 1}), "address"),
        (url("or$ders", "o-2"), simple_spec(), "service name"),
        (url("orders", "o%202"), simple_spec(), "instance id"),
        (url(&"s".repeat(200), "o-2"), simple_spec(), "service name"),
        (
            url("orders", "o-2"),
            json!({"address": "127.0.0.1", "port": 1, "checks": [{"ttl": "10s", "http": "http://x/"}]}),
            "exactly one",
        ),
        (
            url("orders", "o-2"),
            json!({"address": "127.0.0.1", "port": 1, "checks": [{"ttl": "forever"}]}),
            "",
        ),
        (
            url("orders", "o-2"),
            json!({"address": "127.0.0.1", "port": 1,
                   "meta": (0..100).map(|i| (format!("k{i}"), "v")).collect::<std::collections::BTreeMap<_, _>>()}),
            "metadata",
        ),
    ];
    for (url, body, needle) in cases {
        let response = put_json(&url, body.clone()).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(needle),
            "{body}: {detail:?} should mention {needle:?}"
        );
    }

    // Not JSON at all.
    let response = http()
        .put(url("orders", "o-2"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST).await;

    // Oversized body.
    let huge = json!({"address": "127.0.0.1", "port": 1, "tags": ["x".repeat(100_000)]});
    let response = put_json(&url("orders", "o-2"), huge).await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;

    // Bad query parameters.
    for query in ["index=abc", "wait=soon&index=1", "colour=red"] {
        let response = http()
            .get(format!("{}/v1/services/orders?{query}", registry.url))
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST).await;
    }

    // The instance registered before all this is intact.
    let found = client
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();
    assert_eq!(found.instances.len(), 1);
    assert_eq!(found.instances[0].id, "orders-1");
}

#[tokio::test]
async fn consul_api_rejects_bad_input_with_problems() {
    let registry = spawn_registry().await;
    let url = format!("{}/v1/agent/service/register", registry.url);
    for body in [
        json!({"ID": "x"}),
        json!({"Name": "web", "Port": "eighty"}),
        json!({"Name": "web", "Port": 80, "Check": {"TTL": "whenever"}}),
        json!({"Name": "web", "Port": 80, "Check": {"TTL": "10s", "Status": "sleepy"}}),
        json!({"Name": "../../etc", "Port": 80}),
    ] {
        let response = put_json(&url, body.clone()).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn instances_beyond_the_service_limit_are_refused_clearly() {
    let registry = spawn_registry_with(|config| config.limits.max_instances_per_service = 2).await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    for n in 0..2 {
        client
            .register(&registration("web", &format!("web-{n}"), vec![]))
            .await
            .unwrap();
    }
    let response = put_json(
        &format!("{}/v1/services/web/instances/web-9", registry.url),
        simple_spec(),
    )
    .await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(problem["detail"].as_str().unwrap().contains("maximum of 2"));
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_hurt_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let registry = spawn_registry().await;
    for garbage in [
        &b"\x00\x01\x02\x03 not http at all\r\n\r\n"[..],
        b"GET /v1/services HTTP/1.1\r\nHost: x\r\nX-Long: ",
        b"PUT /v1/services/a/instances/b HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ] {
        let mut socket = tokio::net::TcpStream::connect(registry.addr).await.unwrap();
        socket.write_all(garbage).await.unwrap();
        let _ = socket.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            socket.read_to_end(&mut sink),
        )
        .await;
    }
    let (status, _, _) = get_json(&format!("{}/health/live", registry.url)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_path_segment_that_is_not_utf8_is_a_problem_on_every_api() {
    let registry = spawn_registry().await;
    let http = keel_testkit::http();
    for path in [
        "/v1/services/%FF",
        "/v1/agent/service/deregister/%FF",
        "/eureka/apps/%FF",
    ] {
        let request = if path.contains("deregister") {
            http.put(format!("{}{path}", registry.url))
        } else {
            http.get(format!("{}{path}", registry.url))
        };
        let response = request.send().await.unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST).await;
    }
}
