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

/// A bare HTTP/1.1 server answering `ok` to each request; it counts connections, and with
/// `close_idle` closes each connection 100 ms after answering, without saying so.
async fn raw_upstream(close_idle: bool) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
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
    (url, accepted)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (url, accepted) = raw_upstream(false).await;
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
    let (url, accepted) = raw_upstream(true).await;
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
