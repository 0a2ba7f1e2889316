use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::StatusCode;
use keel_registry::client::{InstancesQuery, RegistryClient};

use crate::helpers::*;

/// The change-to-watcher bound the registry promises.
const WATCH_LATENCY: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_blocking_query_answers_within_100ms_of_a_change() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    client
        .register(&registration("orders", "orders-1", vec![]))
        .await
        .unwrap();
    let first = client
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();

    let watcher = client.clone();
    let index = first.index;
    let blocked = tokio::spawn(async move {
        let answer = watcher
            .instances(
                "orders",
                &InstancesQuery {
                    index: Some(index),
                    wait: Some(Duration::from_secs(10)),
                    ..InstancesQuery::default()
                },
            )
            .await
            .unwrap();
        (answer, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "nothing changed yet");

    let changed_at = Instant::now();
    client
        .register(&registration("orders", "orders-2", vec![]))
        .await
        .unwrap();
    let (answer, answered_at) = blocked.await.unwrap();
    assert!(answer.index > index);
    assert_eq!(answer.instances.len(), 2);
    let latency = answered_at.duration_since(changed_at);
    assert!(
        latency < WATCH_LATENCY,
        "answered {latency:?} after the change"
    );
}

#[tokio::test]
async fn a_blocking_query_answers_at_the_wait_and_ignores_other_services() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    client
        .register(&registration("orders", "orders-1", vec![]))
        .await
        .unwrap();
    let index = client
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap()
        .index;

    let watcher = client.clone();
    let started = Instant::now();
    let blocked = tokio::spawn(async move {
        watcher
            .instances(
                "orders",
                &InstancesQuery {
                    index: Some(index),
                    wait: Some(Duration::from_millis(800)),
                    ..InstancesQuery::default()
                },
            )
            .await
            .unwrap()
    });
    // Changes to another service while the query waits.
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
            .register(&registration("payments", &format!("payments-{n}"), vec![]))
            .await
            .unwrap();
    }
    let answer = blocked.await.unwrap();
    let waited = started.elapsed();
    assert_eq!(answer.index, index, "orders did not change");
    assert!(
        waited >= Duration::from_millis(800),
        "answered after {waited:?}, before the wait ended: woken by another service"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
}

#[tokio::test]
async fn a_blocking_query_with_a_future_index_answers_at_once() {
    // A client that knew a previous incarnation of the registry holds a higher index.
    let registry = spawn_registry().await;
    let started = Instant::now();
    let (status, headers, _) = get_json(&format!(
        "{}/v1/services/orders?index=999999&wait=5s",
        registry.url
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("x-keel-index"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_service_list_blocks_until_anything_changes() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    let (_, headers, _) = get_json(&format!("{}/v1/services", registry.url)).await;
    let index: u64 = headers["x-keel-index"].to_str().unwrap().parse().unwrap();
    let url = format!("{}/v1/services?index={index}&wait=10s", registry.url);
    let blocked = tokio::spawn(async move { get_json(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished());
    client
        .register(&registration("fresh", "fresh-1", vec![]))
        .await
        .unwrap();
    let (_, _, body) = tokio::time::timeout(Duration::from_secs(2), blocked)
        .await
        .expect("woken by the change")
        .unwrap();
    assert_eq!(body["services"][0]["name"], "fresh");
}

#[tokio::test]
async fn the_event_stream_sends_a_snapshot_then_each_change() {
    let registry = spawn_registry().await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    client
        .register(&registration("orders", "orders-1", vec![]))
        .await
        .unwrap();
    let response = http()
        .get(format!("{}/v1/services/orders/watch", registry.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = sse_events(response);

    let first = next_event(&mut events).await;
    assert_eq!(first["instances"].as_array().unwrap().len(), 1);

    let changed_at = Instant::now();
    client
        .register(&registration("orders", "orders-2", vec![]))
        .await
        .unwrap();
    let second = next_event(&mut events).await;
    let latency = changed_at.elapsed();
    assert_eq!(second["instances"].as_array().unwrap().len(), 2);
    assert!(second["index"].as_u64() > first["index"].as_u64());
    assert!(
        latency < WATCH_LATENCY,
        "event {latency:?} after the change"
    );

    client.deregister("orders", "orders-1").await.unwrap();
    let third = next_event(&mut events).await;
    assert_eq!(third["instances"][0]["id"], "orders-2");
}

#[tokio::test]
async fn watches_beyond_the_limit_get_429() {
    let registry = spawn_registry_with(|config| config.limits.max_watches = 1).await;
    let url = format!("{}/v1/services/orders?index=1&wait=5s", registry.url);
    // index=1 with a fresh registry is the current index, so this one blocks.
    let holder = tokio::spawn({
        let url = url.clone();
        async move { http().get(url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, headers, body) = get_json(&url).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    assert!(body["detail"].as_str().unwrap().contains("at most 1"));
    // A first read (index 0) does not block, so it needs no slot.
    let (status, _, _) = get_json(&format!("{}/v1/services/orders?index=0", registry.url)).await;
    assert_eq!(status, StatusCode::OK);
    holder.abort();
}

#[tokio::test]
async fn shutdown_ends_open_watches_promptly() {
    let registry = spawn_registry().await;
    let url = format!("{}/v1/services/orders?index=1&wait=60s", registry.url);
    let blocked = tokio::spawn(async move { http().get(url).send().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    registry.stop().await;
    let answer = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the watch ends with the server")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    if let Ok(response) = answer {
        assert_eq!(response.status(), StatusCode::OK);
    }
}

type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = serde_json::Value> + Send>>;

/// Parses an SSE body into the JSON data of each event.
fn sse_events(response: reqwest::Response) -> Events {
    let bytes = response.bytes_stream();
    Box::pin(futures_util::stream::unfold(
        (bytes, String::new()),
        |(mut bytes, mut buffer)| async move {
            loop {
                if let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let data: String = block
                        .lines()
                        .filter_map(|line| line.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    if data.is_empty() {
                        continue; // a keep-alive comment
                    }
                    let value = serde_json::from_str(&data).unwrap();
                    return Some((value, (bytes, buffer)));
                }
                let chunk = bytes.next().await?.ok()?;
                buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        },
    ))
}

async fn next_event(events: &mut Events) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5s")
        .expect("the stream stays open")
}
