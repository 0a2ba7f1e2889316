//! Upstream connections: kept alive and reused, and a pooled connection the upstream has
//! closed meanwhile never costs a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use keel_gateway::config::UpstreamConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{route_to, start_gateway};

/// A bare HTTP/1.1 server answering `ok` to each request; it counts connections opened and
/// closed by the client, and with `close_idle` closes each connection 100 ms after
/// answering, without saying so.
async fn raw_upstream(close_idle: bool) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (counter, closings) = (Arc::clone(&accepted), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let closings = Arc::clone(&closings);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        closings.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buffer.len() < end + 4 + length {
                        continue;
                    }
                    buffer.drain(..end + 4 + length);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    if close_idle {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return;
                    }
                }
            });
        }
    });
    (url, accepted, closed)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (url, accepted, _) = raw_upstream(false).await;
    let mut route = route_to("r", &[]);
    route.upstreams = vec![UpstreamConfig::Url(url)];
    let gateway = start_gateway(vec![route]).await;
    let client = reqwest::Client::new();
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
    let client = reqwest::Client::new();
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
    let client = reqwest::Client::new();
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
