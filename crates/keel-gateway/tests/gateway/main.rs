//! The gateway over real sockets: routes to static upstreams, prefix stripping, errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod actions;
mod balancing;
mod edge;
mod http1;
mod pooling;
mod protocols;
mod reload;
mod resilience;
mod security;
mod support;

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::routing::any;
use http::StatusCode;
use keel_gateway::config::{GatewayRouteConfig, UpstreamConfig};
use keel_gateway::route::MatchConfig;
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_runtime::Shutdown;
use keel_testkit::TestServer;

/// An upstream that answers with its name, the path and query it received, and headers.
async fn upstream(name: &'static str) -> String {
    let app = Router::new().fallback(any(move |request: Request| async move {
        let headers = request.headers();
        let tenant = headers
            .get_all("x-tenant")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("+");
        let secret = headers.contains_key("x-internal");
        let forwarded = headers
            .get("x-forwarded-for")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let traceparent = headers
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if request.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let body = format!(
            "{name} {} {} xff={forwarded} traced={traceparent} tenant={tenant} internal={secret}",
            request.method(),
            request.uri()
        );
        ([("server", "upstream/1.0"), ("x-upstream", name)], body)
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn route(name: &str, prefix: &str, upstreams: Vec<String>) -> GatewayRouteConfig {
    GatewayRouteConfig {
        name: name.into(),
        matches: MatchConfig {
            path_prefix: Some(prefix.into()),
            ..MatchConfig::default()
        },
        upstreams: upstreams.into_iter().map(UpstreamConfig::Url).collect(),
        ..GatewayRouteConfig::default()
    }
}

async fn gateway(routes: Vec<GatewayRouteConfig>) -> TestServer {
    support::start_gateway(routes).await
}

async fn get(url: &str) -> (StatusCode, String, http::HeaderMap) {
    let response = keel_testkit::http().get(url).send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, response.text().await.unwrap(), headers)
}

#[tokio::test]
async fn routes_strip_prefixes_and_take_upstreams_in_turn() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let legacy = upstream("legacy").await;
    let mut orders = route("orders", "/api/orders", vec![a, b]);
    orders.strip_prefix = Some("/api".into());
    let gateway = gateway(vec![route("legacy", "/", vec![legacy]), orders]).await;

    let response = keel_testkit::http()
        .get(format!("{}/api/orders/42?full=1", gateway.url))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let first = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("x-request-id"));
    let (_, second, _) = get(&format!("{}/api/orders/42?full=1", gateway.url)).await;
    let mut served: Vec<&str> = [first.as_str(), second.as_str()]
        .iter()
        .map(|body| body.split(' ').next().unwrap())
        .collect();
    served.sort();
    assert_eq!(served, ["a", "b"], "round robin over the route's upstreams");
    assert!(first.contains("GET /orders/42?full=1"), "{first}");
    assert!(first.contains("xff=127.0.0.1"), "{first}");
    assert!(
        first.contains("traced=00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "the trace continues upstream: {first}"
    );

    let (_, body, _) = get(&format!("{}/elsewhere", gateway.url)).await;
    assert!(body.starts_with("legacy GET /elsewhere"), "{body}");
}

#[tokio::test]
async fn errors_are_problems_that_say_where_they_came_from() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let slow = upstream("slow").await;
    let mut timed = route("timed", "/slow", vec![slow]);
    timed.timeout = Duration::from_millis(300);
    let gateway = gateway(vec![route("dead", "/dead", vec![dead]), timed]).await;

    let (status, body, headers) = get(&format!("{}/dead/x", gateway.url)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(body.contains("\"source\":\"gateway\""), "{body}");
    assert!(body.contains("dead"), "{body}");

    let (status, body, _) = get(&format!("{}/slow", gateway.url)).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.contains("300ms"), "{body}");

    let (status, body, _) = get(&format!("{}/nowhere", gateway.url)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no route"), "{body}");
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_naming_the_route() {
    let config =
        crate::support::test_config(vec![route("broken", "/x", vec!["ftp://example".into()])]);
    let error = match GatewayServer::build(config, &Shutdown::new()).await {
        Ok(_) => panic!("accepted a bad upstream"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("broken") && error.contains("ftp://example"),
        "{error}"
    );
}

/// An in-memory registry on a free port, and a client for it.
async fn start_registry(
    shutdown: &Shutdown,
) -> (TestServer, keel_registry::client::RegistryClient) {
    let config = keel_registry::RegistryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..keel_registry::RegistryConfig::default()
    };
    let server = keel_registry::RegistryServer::build(config, shutdown)
        .await
        .unwrap();
    let registry = keel_testkit::spawn(server);
    let client = keel_registry::client::RegistryClient::new(&registry.url, None).unwrap();
    (registry, client)
}

#[tokio::test]
async fn a_service_route_follows_the_registry_live() {
    use keel_registry::client::ttl_registration;

    let shutdown = Shutdown::new();
    let (registry, client) = start_registry(&shutdown).await;

    let config = GatewayConfig {
        registry: registry.url.clone(),
        ..support::test_config(vec![GatewayRouteConfig {
            service: Some("orders".into()),
            ..route("orders", "/orders", Vec::new())
        }])
    };
    let gateway = keel_testkit::spawn(GatewayServer::build(config, &shutdown).await.unwrap());

    // No instance yet: 503 with Retry-After.
    let (status, body, headers) = get(&format!("{}/orders/1", gateway.url)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("no passing instance"), "{body}");

    let base = upstream("orders-a").await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    client
        .register(&ttl_registration(
            "orders",
            "orders-a",
            "127.0.0.1",
            port,
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
    let mut served = false;
    for _ in 0..40 {
        let (status, body, _) = get(&format!("{}/orders/1", gateway.url)).await;
        if status == StatusCode::OK {
            assert!(body.starts_with("orders-a GET /orders/1"), "{body}");
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "the gateway picks the instance up from its registry watch"
    );

    client.deregister("orders", "orders-a").await.unwrap();
    let mut gone = false;
    for _ in 0..40 {
        let (status, _, _) = get(&format!("{}/orders/1", gateway.url)).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "and drops it when it leaves");
    shutdown.trigger();
}

#[tokio::test]
async fn header_actions_change_requests_and_responses() {
    use keel_gateway::config::HeaderActionsConfig;

    let base = upstream("hdr").await;
    let mut routed = route("hdr", "/", vec![base]);
    routed.request_headers = HeaderActionsConfig {
        remove: vec!["x-internal".into()],
        set: [("x-tenant".into(), "shop".into())].into(),
        add: [("x-tenant".into(), "eu".into())].into(),
    };
    routed.response_headers = HeaderActionsConfig {
        remove: vec!["server".into()],
        set: [("x-frame-options".into(), "DENY".into())].into(),
        add: Default::default(),
    };
    let gateway = gateway(vec![routed]).await;
    let response = keel_testkit::http()
        .get(format!("{}/x", gateway.url))
        .header("x-internal", "leak")
        .header("x-tenant", "forged")
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("server"));
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    assert_eq!(response.headers()["x-upstream"], "hdr");
    let body = response.text().await.unwrap();
    assert!(
        body.contains("tenant=shop+eu"),
        "set replaces, add appends: {body}"
    );
    assert!(body.contains("internal=false"), "{body}");

    let bad = support::test_config(vec![GatewayRouteConfig {
        request_headers: HeaderActionsConfig {
            set: [("bad header".into(), "x".into())].into(),
            ..Default::default()
        },
        ..route("badhdr", "/", vec!["http://127.0.0.1:1".into()])
    }]);
    let error = match GatewayServer::build(bad, &Shutdown::new()).await {
        Ok(_) => panic!("accepted a bad header name"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("badhdr") && error.contains("request_headers"),
        "{error}"
    );
}

#[tokio::test]
async fn discovery_routes_reach_every_registered_service_by_name() {
    use keel_registry::client::ttl_registration;

    let shutdown = Shutdown::new();
    let (registry, client) = start_registry(&shutdown).await;
    let catalog = upstream("catalog-1").await;
    let orders = upstream("orders-1").await;
    let pinned = upstream("pinned").await;
    // A service with a configured route is reached only through it (its policy).
    let orders_api = GatewayRouteConfig {
        service: Some("orders".into()),
        strip_prefix: Some("/api/orders".into()),
        ..route("orders-api", "/api/orders", Vec::new())
    };
    let config = GatewayConfig {
        registry: registry.url.clone(),
        discovery_routes: Some(true),
        // A configured route wins over the discovered one.
        ..support::test_config(vec![
            route("pinned", "/catalog/pinned", vec![pinned]),
            orders_api,
        ])
    };
    let gateway = keel_testkit::spawn(GatewayServer::build(config, &shutdown).await.unwrap());

    let (status, _, _) = get(&format!("{}/catalog/items/1", gateway.url)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not registered yet");

    for (service, url) in [("catalog", &catalog), ("orders", &orders)] {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        client
            .register(&ttl_registration(
                service,
                &format!("{service}-1"),
                "127.0.0.1",
                port,
                Duration::from_secs(30),
            ))
            .await
            .unwrap();
    }
    let reached = |path: &'static str| {
        let url = format!("{}{path}", gateway.url);
        async move {
            for _ in 0..60 {
                let (status, body, _) = get(&url).await;
                if status == StatusCode::OK {
                    return body;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{path} never reached");
        }
    };
    let body = reached("/catalog/items/1?x=2").await;
    assert!(body.starts_with("catalog-1 GET /items/1?x=2"), "{body}");
    let body = reached("/api/orders/items/1").await;
    assert!(body.starts_with("orders-1 GET /items/1"), "{body}");
    let (status, _, _) = get(&format!("{}/orders/items/1", gateway.url)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "orders is not discovered");
    let (_, body, _) = get(&format!("{}/catalog/pinned/x", gateway.url)).await;
    assert!(body.starts_with("pinned "), "{body}");
    let (status, _, _) = get(&format!("{}/unknown-service/x", gateway.url)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    shutdown.trigger();
}

#[tokio::test]
async fn metrics_count_per_route_and_upstream() {
    let up = support::Upstream::start("m");
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut failing = route("failing", "/dead", vec![dead]);
    failing.retry.attempts = 0;
    let config = support::test_config(vec![support::route_to("metered", &[&up]), failing]);
    let support::Running {
        proxy: gateway,
        admin,
    } = support::Running::start(config).await;
    for _ in 0..3 {
        get(&format!("{}/x", gateway.url)).await;
    }
    get(&format!("{}/dead", gateway.url)).await;
    let metrics = keel_testkit::get_text(format!("{admin}/metrics")).await;
    let value = |prefix: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap())
    };
    assert_eq!(
        value("keel_gateway_requests_total{route=\"metered\",status_class=\"2xx\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        value("keel_gateway_requests_total{route=\"failing\",status_class=\"5xx\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("keel_gateway_upstream_attempts_total{upstream=\"route:metered\",outcome=\"2xx\"}"),
        Some(3.0)
    );
    assert_eq!(
        value("keel_gateway_upstream_attempts_total{upstream=\"route:failing\",outcome=\"error\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("keel_gateway_request_duration_seconds_count{route=\"metered\"}"),
        Some(3.0)
    );
    assert_eq!(
        value("keel_gateway_circuit_open{upstream=\"route:metered\"}"),
        Some(0.0)
    );
}

#[tokio::test]
async fn the_access_log_has_one_json_line_per_request() {
    let up = support::Upstream::start("logged");
    let path = std::env::temp_dir().join(format!("{}.log", keel_testkit::unique_name("access")));
    let mut config = support::test_config(vec![support::route_to("logged", &[&up])]);
    config.access_log = keel_gateway::access_log::AccessLogConfig {
        enabled: true,
        path: Some(path.clone()),
    };
    let gateway = keel_testkit::spawn(
        GatewayServer::build(config, &Shutdown::new())
            .await
            .unwrap(),
    );
    let client = keel_testkit::http();
    client
        .get(format!("{}/a/b?secret=1", gateway.url))
        .header("x-request-id", "req-42")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    client
        .get(format!("{}/c", gateway.url))
        .send()
        .await
        .unwrap();
    let mut lines = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        lines = text.lines().map(str::to_owned).collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["route"], "logged");
    assert_eq!(first["method"], "GET");
    assert_eq!(
        first["path"], "/a/b",
        "the query (which may hold secrets) is not logged"
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream"], up.url.as_str());
    assert_eq!(first["retries"], 0);
    assert_eq!(first["request_id"], "req-42");
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["client"], "127.0.0.1");
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    let stamp = first["timestamp"].as_str().unwrap();
    let logged_at = humantime::parse_rfc3339(stamp).expect("an RFC 3339 timestamp");
    let age = std::time::SystemTime::now()
        .duration_since(logged_at)
        .unwrap();
    assert!(age < Duration::from_secs(60), "{stamp}");
    assert!(
        stamp.ends_with('Z') && stamp.len() == "2026-11-26T12:00:00.000Z".len(),
        "{stamp}"
    );
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["path"], "/c");
    assert_eq!(
        second["request_id"].as_str().unwrap().len(),
        32,
        "generated"
    );
    std::fs::remove_file(&path).unwrap();
}
