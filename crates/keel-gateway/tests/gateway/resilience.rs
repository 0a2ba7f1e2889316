//! Retries, outlier ejection and the circuit breaker, against upstreams that fail, stall
//! and die.

use std::time::{Duration, Instant};

use http::StatusCode;
use keel_gateway::config::{GatewayRouteConfig, UpstreamConfig};

use crate::support::{Behaviour, Upstream, route_to, served_by, start_gateway};

fn failing(status: u16) -> Behaviour {
    Behaviour {
        status,
        ..Behaviour::default()
    }
}

/// Outlier detection off, so a test sees retries alone.
fn without_ejection(mut route: GatewayRouteConfig) -> GatewayRouteConfig {
    route.outlier.consecutive_failures = 0;
    route
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_another_instance() {
    let (bad, good) = (Upstream::start("bad"), Upstream::start("good"));
    bad.set(failing(503));
    let gateway = start_gateway(vec![without_ejection(route_to("r", &[&bad, &good]))]).await;
    let client = keel_testkit::http();
    for _ in 0..10 {
        let response = client.get(&gateway.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(served_by(response).await, "good");
    }
    assert!(bad.hits() >= 4, "round robin still tried the bad one");
    // A POST that reached an instance is never sent twice.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = client.post(&gateway.url).body("x").send().await.unwrap();
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.contains(&503), "{statuses:?}");
}

#[tokio::test]
async fn a_connection_failure_is_retried_whatever_the_method() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let live = Upstream::start("live");
    let mut route = without_ejection(route_to("r", &[&live]));
    route.upstreams.insert(0, UpstreamConfig::Url(dead));
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for n in 0..6 {
        let response = client
            .post(&gateway.url)
            .body(format!("order-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.text().await.unwrap();
        assert!(body.ends_with(&format!("body=order-{n}")), "{body}");
    }
    assert_eq!(live.hits(), 6, "each POST reached the live instance once");
}

#[tokio::test]
async fn an_instance_killed_under_load_costs_no_idempotent_request() {
    let mut victim = Upstream::start("victim");
    let others = [Upstream::start("a"), Upstream::start("b")];
    let gateway = start_gateway(vec![route_to("r", &[&victim, &others[0], &others[1]])]).await;
    let client = keel_testkit::http();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), gateway.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..60 {
                let response = client.get(&url).send().await.unwrap();
                if response.status() != StatusCode::OK {
                    failures.push(response.text().await.unwrap());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    victim.set(Behaviour {
        delay: Duration::from_millis(20),
        ..Behaviour::default()
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Requests are in flight on the victim when it dies.
    victim.kill();
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    assert!(failures.is_empty(), "clients saw: {failures:?}");
    assert!(victim.hits() > 0);
}

#[tokio::test]
async fn failing_instances_are_ejected_and_readmitted() {
    let (flaky, steady) = (Upstream::start("flaky"), Upstream::start("steady"));
    flaky.set(failing(500));
    let mut route = route_to("r", &[&flaky, &steady]);
    route.retry.attempts = 0;
    route.outlier.consecutive_failures = 3;
    route.outlier.base_ejection = Duration::from_millis(400);
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for _ in 0..30 {
        client.get(&gateway.url).send().await.unwrap();
    }
    assert_eq!(flaky.hits(), 3, "ejected after three failures in a row");

    flaky.set(Behaviour::default());
    tokio::time::sleep(Duration::from_millis(450)).await;
    for _ in 0..10 {
        client.get(&gateway.url).send().await.unwrap();
    }
    assert!(flaky.hits() >= 7, "readmitted: {}", flaky.hits());
}

#[tokio::test]
async fn no_more_than_the_allowed_share_is_ejected() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    a.set(failing(500));
    b.set(failing(500));
    let mut route = route_to("r", &[&a, &b]);
    route.retry.attempts = 0;
    route.outlier.consecutive_failures = 2;
    route.outlier.max_ejected_percent = 50;
    route.circuit_breaker.min_requests = 1_000;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for _ in 0..20 {
        let response = client.get(&gateway.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            response.headers().contains_key("x-upstream"),
            "an instance answered"
        );
    }
    assert!(
        a.hits() + b.hits() == 20 && a.hits().min(b.hits()) == 2,
        "{} {}",
        a.hits(),
        b.hits()
    );
}

#[tokio::test]
async fn the_circuit_opens_on_failures_and_closes_after_probes() {
    let upstream = Upstream::start("u");
    upstream.set(failing(500));
    let mut route = without_ejection(route_to("r", &[&upstream]));
    route.retry.attempts = 0;
    route.circuit_breaker.min_requests = 5;
    route.circuit_breaker.open_for = Duration::from_millis(300);
    route.circuit_breaker.half_open_probes = 1;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for _ in 0..5 {
        let response = client.get(&gateway.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    for _ in 0..5 {
        let response = client.get(&gateway.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        let body = response.text().await.unwrap();
        assert!(
            body.contains("circuit-open") && body.contains("\"source\":\"gateway\""),
            "{body}"
        );
    }
    assert_eq!(upstream.hits(), 5, "an open circuit sends nothing upstream");

    upstream.set(Behaviour::default());
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..5 {
        let response = client.get(&gateway.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn concurrency_beyond_the_limit_and_queue_is_refused() {
    let upstream = Upstream::start("u");
    upstream.set(Behaviour {
        delay: Duration::from_millis(300),
        ..Behaviour::default()
    });
    let mut route = route_to("r", &[&upstream]);
    route.circuit_breaker.max_concurrent = 1;
    route.circuit_breaker.max_pending = 0;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    let first = tokio::spawn({
        let (client, url) = (client.clone(), gateway.url.clone());
        async move { client.get(&url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = client.get(&gateway.url).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.text().await.unwrap().contains("upstream-saturated"));
    assert_eq!(first.await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn the_retry_budget_caps_retries_when_everything_fails() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    a.set(failing(503));
    b.set(failing(503));
    let mut route = without_ejection(route_to("r", &[&a, &b]));
    route.circuit_breaker.min_requests = 1_000;
    route.retry.budget_ratio = 0.0;
    route.retry.budget_min_per_second = 1;
    route.retry.backoff_base = Duration::from_millis(1);
    route.retry.backoff_max = Duration::from_millis(1);
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for _ in 0..30 {
        client.get(&gateway.url).send().await.unwrap();
    }
    let sent = a.hits() + b.hits();
    // 30 requests plus at most the floor: one a second over the ten-second window.
    assert!((31..=40).contains(&sent), "{sent}");
}

#[tokio::test]
async fn a_stalled_attempt_times_out_and_moves_on() {
    let (stalled, quick) = (Upstream::start("stalled"), Upstream::start("quick"));
    stalled.set(Behaviour {
        delay: Duration::from_secs(5),
        ..Behaviour::default()
    });
    let mut route = without_ejection(route_to("r", &[&stalled, &quick]));
    route.retry.per_try_timeout = Some(Duration::from_millis(200));
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for _ in 0..4 {
        let started = Instant::now();
        let response = client.get(&gateway.url).send().await.unwrap();
        assert_eq!(served_by(response).await, "quick");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
