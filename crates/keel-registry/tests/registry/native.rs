use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use http::StatusCode;
use keel_registry::client::{InstancesQuery, RegistryClient};
use keel_registry::model::{CheckSpec, Status};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn register_read_heartbeat_deregister() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();

    let instance = client
        .register(&registration(
            "orders",
            "orders-1",
            vec![ttl_check(10_000, None)],
        ))
        .await
        .unwrap();
    assert_eq!(instance.status, Status::Passing);
    assert_eq!(instance.checks[0].id, "service:orders-1");
    client
        .register(&registration("orders", "orders-2", vec![]))
        .await
        .unwrap();

    let services = client.services().await.unwrap();
    assert_eq!(services.services.len(), 1);
    assert_eq!(services.services[0].name, "orders");
    assert_eq!(services.services[0].instances, 2);
    assert_eq!(services.services[0].tags, vec!["blue".to_string()]);

    let found = client
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();
    let ids: Vec<_> = found.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["orders-1", "orders-2"]);
    assert_eq!(found.instances[0].zone.as_deref(), Some("zone-a"));

    let (status, _, body) = get_json(&format!(
        "{}/v1/services/orders/instances/orders-1",
        registry.url
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["port"], 9000);

    let beat = client
        .heartbeat(
            "orders",
            "orders-1",
            &keel_registry::model::Heartbeat {
                status: Some(Status::Warning),
                output: Some("disk 91% full".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(beat.status, Status::Warning);
    assert_eq!(beat.checks[0].output, "disk 91% full");

    client.deregister("orders", "orders-1").await.unwrap();
    let found = client
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();
    assert_eq!(found.instances.len(), 1);
    let gone = client.deregister("orders", "orders-1").await;
    assert!(matches!(
        gone,
        Err(keel_registry::client::ClientError::NotFound(_))
    ));
}

#[tokio::test]
async fn heartbeat_for_an_unknown_instance_is_404_so_the_client_reregisters() {
    let registry = spawn_registry().await;
    let response = http()
        .put(format!(
            "{}/v1/services/orders/instances/ghost/heartbeat",
            registry.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn ttl_expiry_turns_critical_then_removes_the_instance() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    client
        .register(&registration(
            "billing",
            "billing-1",
            vec![ttl_check(1_000, Some(1_000))],
        ))
        .await
        .unwrap();
    let status = |client: RegistryClient| async move {
        client
            .instances("billing", &InstancesQuery::default())
            .await
            .unwrap()
            .instances
            .first()
            .map(|i| (i.status, i.checks[0].output.clone()))
    };
    assert_eq!(
        status(client.clone()).await.map(|s| s.0),
        Some(Status::Passing)
    );
    assert!(
        eventually(Duration::from_secs(3), || {
            let client = client.clone();
            async move {
                status(client).await == Some((Status::Critical, "TTL expired".to_string()))
            }
        })
        .await,
        "the instance turns critical once its TTL passes"
    );
    let passing = client
        .instances(
            "billing",
            &InstancesQuery {
                passing: true,
                ..InstancesQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(passing.instances.is_empty(), "critical is filtered out");
    assert!(
        eventually(Duration::from_secs(3), || {
            let client = client.clone();
            async move { status(client).await.is_none() }
        })
        .await,
        "the instance is removed after its deregister-after deadline"
    );
    let metrics = http()
        .get(format!("{}/metrics", registry.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("keel_registry_evictions_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_http_check_turns_critical_and_back() {
    // The "service" whose health endpoint the registry probes; its answer is switchable.
    let code = Arc::new(AtomicU16::new(200));
    let app = Router::new()
        .route(
            "/health",
            get(|State(code): State<Arc<AtomicU16>>| async move {
                StatusCode::from_u16(code.load(Ordering::SeqCst)).unwrap()
            }),
        )
        .with_state(Arc::clone(&code));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    let check = CheckSpec {
        http: Some(format!("http://127.0.0.1:{port}/health")),
        interval: Some(Duration::from_millis(100)),
        timeout: Some(Duration::from_millis(100)),
        ..CheckSpec::default()
    };
    let instance = client
        .register(&registration("search", "search-1", vec![check]))
        .await
        .unwrap();
    assert_eq!(
        instance.status,
        Status::Critical,
        "active checks start critical"
    );

    let status_is = |want: Status| {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move {
                client
                    .instances("search", &InstancesQuery::default())
                    .await
                    .unwrap()
                    .instances
                    .first()
                    .map(|i| i.status)
                    == Some(want)
            }
        }
    };
    assert!(eventually(Duration::from_secs(2), status_is(Status::Passing)).await);
    code.store(500, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(2), status_is(Status::Critical)).await);
    code.store(429, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(2), status_is(Status::Warning)).await);
    code.store(200, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(2), status_is(Status::Passing)).await);
    let found = client
        .instances("search", &InstancesQuery::default())
        .await
        .unwrap();
    assert!(found.instances[0].checks[0].output.contains("200"));
}

/// HTTPS checks: passing when the instance's certificate is signed by a CA the registry
/// trusts, critical (saying why) when not, passing again with `tls_skip_verify`.
#[tokio::test]
async fn https_checks_verify_the_certificate_unless_told_not_to() {
    let app = Router::new().route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let trusted_ca = keel_testkit::tls::TestCa::new();
    let trusted = keel_testkit::tls::TlsFront::to(&trusted_ca, backend).await;
    let stranger =
        keel_testkit::tls::TlsFront::to(&keel_testkit::tls::TestCa::new(), backend).await;
    keel_runtime::http_client::trust_pem(trusted_ca.pem().as_bytes()).unwrap();

    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    let check = |front: &keel_testkit::tls::TlsFront, skip: bool| CheckSpec {
        http: Some(format!("{}/health", front.url())),
        interval: Some(Duration::from_millis(200)),
        timeout: Some(Duration::from_millis(200)),
        tls_skip_verify: skip,
        ..CheckSpec::default()
    };
    for (id, check) in [
        ("trusted", check(&trusted, false)),
        ("stranger", check(&stranger, false)),
        ("skipped", check(&stranger, true)),
    ] {
        client
            .register(&registration("secure", id, vec![check]))
            .await
            .unwrap();
    }
    let statuses = || {
        let client = client.clone();
        async move {
            let found = client
                .instances("secure", &InstancesQuery::default())
                .await
                .unwrap();
            let mut statuses: Vec<(String, Status, String)> = found
                .instances
                .into_iter()
                .map(|i| (i.id, i.status, i.checks[0].output.clone()))
                .collect();
            statuses.sort();
            statuses
        }
    };
    let settled = eventually(Duration::from_secs(3), || async {
        let now = statuses().await;
        now.iter()
            .filter(|(_, status, _)| *status == Status::Passing)
            .count()
            == 2
            && now.iter().any(|(_, status, _)| *status == Status::Critical)
    })
    .await;
    let now = statuses().await;
    assert!(settled, "{now:?}");
    let status_of = |id: &str| now.iter().find(|(i, ..)| i == id).unwrap().clone();
    assert_eq!(status_of("trusted").1, Status::Passing);
    assert_eq!(status_of("skipped").1, Status::Passing);
    let (_, status, output) = status_of("stranger");
    assert_eq!(status, Status::Critical);
    assert!(output.to_lowercase().contains("certificate"), "{output}");
}

#[tokio::test]
async fn a_tcp_check_follows_the_listener() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    let check = CheckSpec {
        tcp: Some(address),
        interval: Some(Duration::from_millis(100)),
        ..CheckSpec::default()
    };
    client
        .register(&registration("cache", "cache-1", vec![check]))
        .await
        .unwrap();
    let status = || {
        let client = client.clone();
        async move {
            client
                .instances("cache", &InstancesQuery::default())
                .await
                .unwrap()
                .instances[0]
                .status
        }
    };
    assert!(
        eventually(Duration::from_secs(2), || async {
            status().await == Status::Passing
        })
        .await
    );
    drop(listener);
    assert!(
        eventually(Duration::from_secs(2), || async {
            status().await == Status::Critical
        })
        .await
    );
}

#[tokio::test]
async fn acl_token_guards_writes_but_not_reads() {
    let registry = spawn_registry_with(|config| {
        config.acl_token = Some(keel_runtime::Secret::new("let-me-in".to_string()));
    })
    .await;
    let url = format!("{}/v1/services/web/instances/web-1", registry.url);
    let missing = put_json(&url, simple_spec()).await;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let wrong = http()
        .put(&url)
        .header("x-keel-token", "let-me-out")
        .json(&simple_spec())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let client = RegistryClient::new(
        &registry.url,
        Some(keel_runtime::Secret::new("let-me-in".to_string())),
    )
    .unwrap();
    client
        .register(&registration("web", "web-1", vec![]))
        .await
        .unwrap();
    let consul = http()
        .put(format!(
            "{}/v1/agent/service/deregister/web-1",
            registry.url
        ))
        .header("x-consul-token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(consul.status(), StatusCode::FORBIDDEN);
    let (status, _, body) = get_json(&format!("{}/v1/services/web", registry.url)).await;
    assert_eq!(status, StatusCode::OK, "reads need no token");
    assert_eq!(body["instances"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_id_registered_under_another_service_conflicts() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    client
        .register(&registration("web", "shared-1", vec![]))
        .await
        .unwrap();
    let response = put_json(
        &format!("{}/v1/services/api/instances/shared-1", registry.url),
        json!({"address": "127.0.0.1", "port": 1}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn health_and_request_ids_are_served() {
    let registry = spawn_registry().await;
    let (status, _, body) = get_json(&format!("{}/health/live", registry.url)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "up");
    let (status, _, _) = get_json(&format!("{}/health/ready", registry.url)).await;
    assert_eq!(status, StatusCode::OK);
    let response = http()
        .get(format!("{}/v1/services", registry.url))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
}
