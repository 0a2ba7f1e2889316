//! Resilient calls between services against real upstream servers: the circuit breaker's
//! three states, retries on another instance, typed timeouts, the bulkhead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use keel_runtime::resilience::breaker::{BreakerConfig, CircuitState};
use keel_runtime::resilience::retry::RetryConfig;
use keel_sdk::client::{CallError, ClientOptions, Instances, ServiceClient};

/// An upstream instance: `/work` answers 200 "ok" or, while `failing`, 503; `/slow` takes
/// two seconds; `/busy` answers `"ok"` (JSON) after 800 ms; `/echo` returns the request's `x-request-id`. Counts requests.
#[derive(Clone, Default)]
struct Upstream {
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(&self) -> String {
        let state = self.clone();
        let work = move || {
            let state = state.clone();
            async move {
                state.hits.fetch_add(1, Ordering::SeqCst);
                if state.failing.load(Ordering::SeqCst) {
                    (StatusCode::SERVICE_UNAVAILABLE, "broken")
                } else {
                    (StatusCode::OK, "ok")
                }
            }
        };
        let router = Router::new()
            .route("/work", get(work.clone()).post(work))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "late"
                }),
            )
            .route(
                "/busy",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    axum::Json("ok")
                }),
            )
            .route(
                "/big",
                get({
                    let hits = self.hits.clone();
                    move || {
                        hits.fetch_add(1, Ordering::SeqCst);
                        async { vec![b'x'; 2 * 1024 * 1024] }
                    }
                }),
            )
            .route(
                "/echo",
                post(|headers: axum::http::HeaderMap| async move {
                    headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn client(urls: Vec<String>, options: ClientOptions) -> ServiceClient {
    ServiceClient::new("inventory", Instances::Static(urls), options).unwrap()
}

fn no_retries() -> RetryConfig {
    RetryConfig {
        attempts: 0,
        ..RetryConfig::default()
    }
}

#[tokio::test]
async fn the_circuit_opens_on_failures_half_opens_after_a_while_and_closes_on_success() {
    let upstream = Upstream::default();
    let url = upstream.start().await;
    let breaker = BreakerConfig {
        min_requests: 4,
        failure_rate: 0.5,
        open_for: Duration::from_millis(300),
        half_open_probes: 2,
        ..BreakerConfig::default()
    };
    let client = client(
        vec![url],
        ClientOptions {
            retry: no_retries(),
            breaker,
            ..ClientOptions::default()
        },
    );
    assert_eq!(client.circuit(), CircuitState::Closed);

    upstream.failing.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        let error = client.get_json::<String>("/work").await.unwrap_err();
        assert!(
            matches!(&error, CallError::Upstream { answer, .. } if answer.status == 503),
            "{error}"
        );
    }
    assert_eq!(client.circuit(), CircuitState::Open);
    let hits = upstream.hits();
    let error = client.get_json::<String>("/work").await.unwrap_err();
    assert!(matches!(error, CallError::CircuitOpen { .. }), "{error}");
    assert_eq!(upstream.hits(), hits, "an open circuit sends nothing");

    // After `open_for`: probes go through; one failing probe opens it again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(client.circuit(), CircuitState::HalfOpen);
    let error = client.get_json::<String>("/work").await.unwrap_err();
    assert!(matches!(error, CallError::Upstream { .. }), "{error}");
    assert_eq!(client.circuit(), CircuitState::Open);

    // The service recovers: the probes succeed and the circuit closes.
    upstream.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(client.circuit(), CircuitState::HalfOpen);
    for _ in 0..2 {
        let answer = client.call(keel_sdk::client::Call::new(
            axum::http::Method::GET,
            "/work",
        ));
        assert_eq!(answer.await.unwrap().body, "ok");
    }
    assert_eq!(client.circuit(), CircuitState::Closed);
}

#[tokio::test]
async fn a_dead_instance_is_skipped_for_any_method_since_nothing_was_sent() {
    let upstream = Upstream::default();
    let live = upstream.start().await;
    // A port with nothing listening: connections are refused before anything is sent.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let client = client(vec![dead, live], ClientOptions::default());
    for _ in 0..20 {
        let answer = client
            .call(keel_sdk::client::Call::new(
                axum::http::Method::POST,
                "/work",
            ))
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
    }
    assert_eq!(
        upstream.hits(),
        20,
        "every call reached the live instance once"
    );
}

#[tokio::test]
async fn a_failing_instance_is_retried_elsewhere_for_idempotent_calls_only() {
    let (broken, healthy) = (Upstream::default(), Upstream::default());
    broken.failing.store(true, Ordering::SeqCst);
    let client = client(
        vec![broken.start().await, healthy.start().await],
        ClientOptions::default(),
    );
    for _ in 0..10 {
        let call = keel_sdk::client::Call::new(axum::http::Method::GET, "/work");
        assert_eq!(client.call(call).await.unwrap().body, "ok");
    }
    assert_eq!(
        healthy.hits(),
        10,
        "every GET ended on the healthy instance"
    );

    // Two broken instances: a GET is tried on both, a POST that got an answer is not
    // sent again.
    let (a, b) = (Upstream::default(), Upstream::default());
    a.failing.store(true, Ordering::SeqCst);
    b.failing.store(true, Ordering::SeqCst);
    let client = self::client(
        vec![a.start().await, b.start().await],
        ClientOptions::default(),
    );
    let hits = || a.hits() + b.hits();
    for (method, per_call) in [(axum::http::Method::GET, 2), (axum::http::Method::POST, 1)] {
        let before = hits();
        let call = keel_sdk::client::Call::new(method.clone(), "/work");
        let error = client.call(call).await.unwrap_err();
        assert!(
            matches!(&error, CallError::Upstream { answer, .. } if answer.status == 503),
            "{error}"
        );
        assert_eq!(hits() - before, per_call, "{method}");
    }
}

#[tokio::test]
async fn timeouts_are_typed_and_kept() {
    let upstream = Upstream::default();
    let client = client(
        vec![upstream.start().await],
        ClientOptions {
            timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        },
    );
    let started = Instant::now();
    let error = client.get_json::<String>("/slow").await.unwrap_err();
    assert!(matches!(error, CallError::Timeout { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// A client of one instance with one slot and a queue, whose circuit opens at half of at
/// least `min_requests` calls failing.
fn one_slot(url: String, min_requests: u32) -> ServiceClient {
    client(
        vec![url],
        ClientOptions {
            timeout: Duration::from_secs(1),
            retry: no_retries(),
            breaker: BreakerConfig {
                max_concurrent: 1,
                max_pending: 8,
                min_requests,
                failure_rate: 0.5,
                ..BreakerConfig::default()
            },
            ..ClientOptions::default()
        },
    )
}

#[tokio::test]
async fn a_timeout_after_queueing_at_an_instance_that_answers_does_not_count() {
    let upstream = Upstream::default();
    let client = one_slot(upstream.start().await, 2);
    // Overloaded, not broken: the first call holds the one slot 800 ms and is answered; a
    // second waits for the slot and times out in the little time left.
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.get_json::<String>("/busy").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = client.get_json::<String>("/busy").await.unwrap_err();
    assert!(matches!(second, CallError::Timeout { .. }), "{second}");
    assert_eq!(first.await.unwrap().unwrap(), "ok");
    // One call recorded, a success: the queued call's timeout was not the service's.
    assert_eq!(client.circuit(), CircuitState::Closed);
    // A call given its whole time that gets no answer is.
    let third = client.get_json::<String>("/slow").await.unwrap_err();
    assert!(matches!(third, CallError::Timeout { .. }), "{third}");
    assert_eq!(client.circuit(), CircuitState::Open);
}

#[tokio::test]
async fn a_hung_instance_behind_a_small_bulkhead_still_opens_the_circuit() {
    let upstream = Upstream::default();
    let client = one_slot(upstream.start().await, 3);
    // Every call but the first waits for the one slot, and all time out: once the instance
    // has failed and not answered since, a queued call's timeout is its too.
    let mut calls = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client.get_json::<String>("/slow").await
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for call in calls {
        assert!(call.await.unwrap().is_err());
    }
    assert_eq!(client.circuit(), CircuitState::Open);
}

#[tokio::test]
async fn the_bulkhead_refuses_calls_beyond_its_slots_and_queue() {
    let upstream = Upstream::default();
    let client = client(
        vec![upstream.start().await],
        ClientOptions {
            retry: no_retries(),
            breaker: BreakerConfig {
                max_concurrent: 1,
                max_pending: 0,
                ..BreakerConfig::default()
            },
            ..ClientOptions::default()
        },
    );
    let busy = {
        let client = client.clone();
        tokio::spawn(async move { client.get_json::<String>("/slow").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let error = client.get_json::<String>("/work").await.unwrap_err();
    assert!(matches!(error, CallError::Saturated { .. }), "{error}");
    busy.abort();
}

#[tokio::test]
async fn a_caller_set_request_id_reaches_the_service() {
    let upstream = Upstream::default();
    let client = client(vec![upstream.start().await], ClientOptions::default());
    let mut call = keel_sdk::client::Call::new(axum::http::Method::POST, "/echo");
    call.headers
        .insert("x-request-id", "req-42".parse().unwrap());
    assert_eq!(client.call(call).await.unwrap().body, "req-42");
}

#[tokio::test]
async fn instances_come_and_go_with_the_registry() {
    use keel_registry::client::{DiscoveryView, ttl_registration};

    let shutdown = keel_runtime::Shutdown::new();
    let (_registry, registry_client) = crate::helpers::registry(&shutdown, None).await;
    let view = DiscoveryView::new(registry_client.clone(), &shutdown);
    let client = ServiceClient::new(
        "inventory",
        Instances::Registry(view.clone()),
        ClientOptions::default(),
    )
    .unwrap();
    let error = client.get_json::<String>("/work").await.unwrap_err();
    assert!(matches!(error, CallError::Unavailable { .. }), "{error}");

    let (a, b) = (Upstream::default(), Upstream::default());
    for (id, upstream) in [("inventory-a", &a), ("inventory-b", &b)] {
        let url = upstream.start().await;
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let registration =
            ttl_registration("inventory", id, "127.0.0.1", port, Duration::from_secs(30));
        registry_client.register(&registration).await.unwrap();
    }
    crate::helpers::eventually("the view has both", Duration::from_secs(5), || async {
        view.instances("inventory").len() == 2
    })
    .await;
    let work = || {
        client.call(keel_sdk::client::Call::new(
            axum::http::Method::GET,
            "/work",
        ))
    };
    for _ in 0..40 {
        assert_eq!(work().await.unwrap().body, "ok");
    }
    assert!(a.hits() > 0 && b.hits() > 0, "both instances get calls");

    registry_client
        .deregister("inventory", "inventory-a")
        .await
        .unwrap();
    crate::helpers::eventually("the view drops it", Duration::from_secs(5), || async {
        view.instances("inventory").len() == 1
    })
    .await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(work().await.unwrap().body, "ok");
    }
    assert_eq!(a.hits(), before, "a deregistered instance gets nothing");
    shutdown.trigger();
}

#[tokio::test]
async fn hostile_paths_and_oversized_answers_are_refused_not_retried() {
    let upstream = Upstream::default();
    let client = client(
        vec![upstream.start().await, upstream.start().await],
        ClientOptions {
            max_body_bytes: 1024 * 1024,
            ..ClientOptions::default()
        },
    );
    for path in ["@evil.example/x", "//evil.example/x", "work"] {
        let error = client.get_json::<String>(path).await.unwrap_err();
        assert!(matches!(error, CallError::Request(_)), "{path}: {error}");
    }
    assert_eq!(upstream.hits(), 0, "nothing was sent");
    let error = client.get_json::<String>("/big").await.unwrap_err();
    assert!(matches!(error, CallError::TooLarge { .. }), "{error}");
    assert_eq!(
        upstream.hits(),
        1,
        "an oversized answer is not fetched twice"
    );
    assert_eq!(client.circuit(), CircuitState::Closed);
}
