//! Upstream connections: kept alive and reused, and a pooled connection the upstream has
//! closed meanwhile never costs a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{After, route_to, scripted_upstream, start_gateway};
use http::StatusCode;
use keel_gateway::config::UpstreamConfig;

/// A bare HTTP/1.1 server answering `ok` to each request; with `close_idle` it closes each
/// connection 100 ms after answering, without saying so.
async fn raw_upstream(close_idle: bool) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    fn ok(_: &str) -> (Vec<u8>, After) {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            After::KeepOpen,
        )
    }
    fn ok_then_close(line: &str) -> (Vec<u8>, After) {
        (ok(line).0, After::CloseIn(Duration::from_millis(100)))
    }
    let upstream = scripted_upstream(if close_idle { ok_then_close } else { ok }).await;
    (upstream.url, upstream.accepted, upstream.closed)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (url, accepted, _) = raw_upstream(false).await;
    let mut route = route_to("r", &[]);
    route.upstreams = vec![UpstreamConfig::Url(url)];
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for n in 0..20 {
        let response = client
            .post(&gateway.url)
            .body(format!("n={n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
}

#[tokio::test]
async fn a_connection_closed_while_pooled_costs_no_request() {
    let (url, accepted, _) = raw_upstream(true).await;
    let mut route = route_to("r", &[]);
    route.upstreams = vec![UpstreamConfig::Url(url)];
    route.retry.attempts = 0;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for n in 0..4 {
        // Not idempotent and no retries: only the pool can save it.
        let response = client
            .post(&gateway.url)
            .body(format!("n={n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "a new connection each time"
    );
}

#[tokio::test]
async fn idle_connections_of_a_host_no_longer_used_are_closed() {
    let (left, _, left_closed) = raw_upstream(false).await;
    let (staying, _, _) = raw_upstream(false).await;
    let mut gone = route_to("gone", &[]);
    gone.matches.path_prefix = Some("/gone".into());
    gone.upstreams = vec![UpstreamConfig::Url(left)];
    let mut kept = route_to("kept", &[]);
    kept.upstreams = vec![UpstreamConfig::Url(staying)];
    let mut config = crate::support::test_config(vec![gone, kept]);
    config.upstream.idle_timeout = Duration::from_millis(200);
    let gateway = keel_testkit::spawn(
        keel_gateway::GatewayServer::build(config, &keel_runtime::Shutdown::new())
            .await
            .unwrap(),
    );
    let client = keel_testkit::http();
    client
        .get(format!("{}/gone", gateway.url))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(left_closed.load(Ordering::SeqCst), 0, "nobody looked yet");
    // Traffic to another host sweeps what expired everywhere.
    client
        .get(format!("{}/other", gateway.url))
        .send()
        .await
        .unwrap();
    for _ in 0..50 {
        if left_closed.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the idle connection to the host no longer used was never closed");
}
