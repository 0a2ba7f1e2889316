//! HTTP/1.1 on the wire, both sides of the gateway: pipelining, handing a connection to
//! hyper mid-way, every framing an upstream may answer with, and upstreams that break the
//! protocol.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use keel_gateway::config::UpstreamConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use keel_gateway::GatewayServer;
use keel_runtime::Shutdown;

use crate::support::{
    After, Upstream, exchange, route_to, scripted_upstream, start_gateway, test_config,
};

async fn gateway_to(url: String) -> keel_testkit::TestServer {
    let mut route = route_to("r", &[]);
    route.upstreams = vec![UpstreamConfig::Url(url)];
    start_gateway(vec![route]).await
}

/// Reads one response (head and `content-length` body) off `stream`; `None` at EOF.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if pending.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&pending[end + 4..end + 4 + length]);
                let response = format!("{head}\r\n\r\n{body}");
                pending.drain(..end + 4 + length);
                return Some(response);
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

fn addr(gateway: &keel_testkit::TestServer) -> String {
    gateway.url.trim_start_matches("http://").to_owned()
}

/// One client connection to the gateway, and what it has read but not yet taken.
struct Connection {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Connection {
    async fn open(gateway: &keel_testkit::TestServer) -> Self {
        Self {
            stream: TcpStream::connect(addr(gateway)).await.unwrap(),
            pending: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Writes `bytes` and reads the next response.
    async fn ask(&mut self, bytes: &[u8]) -> String {
        self.send(bytes).await;
        self.next().await.unwrap()
    }

    async fn next(&mut self) -> Option<String> {
        read_response(&mut self.stream, &mut self.pending).await
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = Upstream::start("u");
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let mut client = Connection::open(&gateway).await;
    let first = client
        .ask(
            b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody\
              GET /third HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.ends_with("u GET /first body="), "{first}");
    for expected in ["u POST /second body=body", "u GET /third body="] {
        let response = client.next().await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with(expected), "{response}");
    }
}

#[tokio::test]
async fn no_header_of_one_exchange_reaches_the_next_on_a_connection() {
    // The connection reuses the last response's header map for the next request's
    // headers: emptied, so neither the response's fields (`x-upstream`, `content-type`)
    // nor the last request's (`x-custom`) reach the next request.
    let upstream = Upstream::start_echoing("u", &["x-custom", "x-upstream", "content-type"]);
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let mut client = Connection::open(&gateway).await;
    let first = client
        .ask(b"GET /1 HTTP/1.1\r\nHost: x\r\nX-Custom: one\r\n\r\n")
        .await;
    assert!(first.contains("x-upstream: u\r\n"), "{first}");
    assert!(first.ends_with("u GET /1 x-custom=one body="), "{first}");
    for path in ["/2", "/3"] {
        let next = client
            .ask(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        assert!(next.ends_with(&format!("u GET {path} body=")), "{next}");
    }
}

#[tokio::test]
async fn a_connection_goes_to_hyper_for_a_chunked_body_and_keeps_serving() {
    let upstream = Upstream::start("u");
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let mut client = Connection::open(&gateway).await;
    let before = client.ask(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(before.ends_with("u GET /before body="), "{before}");
    // Chunked: not ours to read; hyper takes the connection from this request on.
    let chunked = client
        .ask(
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
    assert!(
        chunked.ends_with("u POST /chunked body=hello world"),
        "{chunked}"
    );
    let after = client.ask(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(after.ends_with("u GET /after body="), "{after}");
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn http_1_0_and_expect_continue_are_served() {
    let upstream = Upstream::start("u");
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;

    let (answer, _) = exchange(&addr(&gateway), b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("u GET /old body="), "{answer}");

    let mut client = Connection::open(&gateway).await;
    let interim = client
        .ask(b"PUT /expecting HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    let answer = client.ask(b"ok").await;
    assert!(answer.ends_with("u PUT /expecting body=ok"), "{answer}");
}

#[tokio::test]
async fn a_client_asking_to_close_is_answered_then_closed() {
    let upstream = Upstream::start("u");
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let (answer, took) = exchange(
        &addr(&gateway),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = answer.to_ascii_lowercase();
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.ends_with("u get / body="), "{answer}");
    assert!(took < Duration::from_secs(2), "closed at once");
}

#[tokio::test]
async fn conflicting_lengths_from_a_client_are_refused() {
    let upstream = Upstream::start("u");
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let (answer, _) = exchange(
        &addr(&gateway),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert_eq!(upstream.hits(), 0);
}

fn framings(line: &str) -> (Vec<u8>, After) {
    let path = line.split(' ').nth(1).unwrap_or_default();
    match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            4\r\nchun\r\n3;ext=x\r\nked\r\n0\r\nx-trailer: t\r\n\r\n"
                .to_vec(),
            After::KeepOpen,
        ),
        "/until-close" => (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nread to the end".to_vec(),
            After::Close,
        ),
        "/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                .to_vec(),
            After::KeepOpen,
        ),
        "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), After::KeepOpen),
        "/both" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n"
                .to_vec(),
            After::KeepOpen,
        ),
        _ if line.starts_with("head ") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec(),
            After::KeepOpen,
        ),
        _ => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain".to_vec(),
            After::KeepOpen,
        ),
    }
}

#[tokio::test]
async fn every_upstream_framing_reaches_the_client_intact() {
    let upstream = scripted_upstream(framings).await;
    let accepted = upstream.accepted;
    let gateway = gateway_to(upstream.url).await;
    let client = keel_testkit::http();
    let get = |path: &str| client.get(format!("{}{path}", gateway.url)).send();

    let response = get("/chunked").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "chunked");
    let response = get("/plain").await.unwrap();
    assert_eq!(response.text().await.unwrap(), "plain");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "chunked, then reused");

    let response = get("/interim").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "final");

    let response = get("/empty").await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.text().await.unwrap(), "");

    let response = client.head(&gateway.url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], "1000");
    let response = get("/plain").await.unwrap();
    assert_eq!(
        response.text().await.unwrap(),
        "plain",
        "after HEAD, in step"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "all on one connection");

    let response = get("/until-close").await.unwrap();
    assert_eq!(response.text().await.unwrap(), "read to the end");
    let response = get("/both").await.unwrap();
    assert_eq!(
        response.text().await.unwrap(),
        "ok",
        "chunked wins over a length"
    );
    let response = get("/plain").await.unwrap();
    assert_eq!(response.text().await.unwrap(), "plain");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "neither a read-to-close answer nor a doubly framed one leaves its connection pooled"
    );
}

fn broken(line: &str) -> (Vec<u8>, After) {
    let path = line.split(' ').nth(1).unwrap_or_default();
    match path {
        "/garbage" => (b"\x00\x01 not http at all\r\n\r\n".to_vec(), After::Close),
        "/bad-length" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nabc".to_vec(),
            After::Close,
        ),
        "/two-lengths" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            After::Close,
        ),
        "/short" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
            After::Close,
        ),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            After::Close,
        ),
        "/silent" => (b"".to_vec(), After::Close),
        _ => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            After::KeepOpen,
        ),
    }
}

#[tokio::test]
async fn upstreams_breaking_the_protocol_get_502_or_a_cut_body() {
    let mut route = route_to("r", &[]);
    route.upstreams = vec![UpstreamConfig::Url(scripted_upstream(broken).await.url)];
    route.retry.attempts = 0;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    for path in ["/garbage", "/bad-length", "/two-lengths", "/silent"] {
        let response = client
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{path}");
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(problem["source"], "gateway", "{path}");
    }
    // The head was fine and went out; the body breaks off, and the client sees it.
    for path in ["/short", "/bad-chunk"] {
        let response = client
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.bytes().await.is_err(), "{path}");
    }
    let response = client
        .get(format!("{}/fine", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_closes_idle_connections() {
    let upstream = Upstream::start("u");
    upstream.set(crate::support::Behaviour {
        status: 200,
        delay: Duration::from_millis(400),
    });
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    // One kept-alive connection idle, one with a request in flight.
    let mut idle = Connection::open(&gateway).await;
    let mut busy = Connection::open(&gateway).await;
    busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = tokio::spawn(gateway.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stopped.is_finished(),
        "the drain waits for the request in flight"
    );

    let answer = busy.next().await.unwrap();
    assert!(answer.ends_with("u GET /slow body="), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    // Within 2 s `None` can only be the end of the connection (a silent one takes 5 s).
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.next()).await;
    assert!(matches!(closed, Ok(None)), "the idle connection is closed");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the gateway stops once both are done")
        .unwrap();
}

/// With `[gateway.http] shutdown_delay`, a stopping gateway goes on accepting and proxying
/// new connections until the delay is over, each answer with `connection: close` (the
/// client reconnects, elsewhere once the instance has left the balancers); then it stops.
#[tokio::test]
async fn a_shutdown_delay_serves_new_connections_then_stops() {
    let upstream = Upstream::start("u");
    let mut config = test_config(vec![route_to("r", &[&upstream])]);
    // Long enough that a loaded machine still answers within it.
    let delay = Duration::from_millis(1500);
    config.http.shutdown_delay = delay;
    let gateway = keel_testkit::spawn(
        GatewayServer::build(config, &Shutdown::new())
            .await
            .unwrap(),
    );
    let address = addr(&gateway);
    let started = std::time::Instant::now();
    let stopped = tokio::spawn(gateway.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut fresh = TcpStream::connect(&address).await.unwrap();
    fresh
        .write_all(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut fresh, &mut Vec::new()).await.unwrap();
    assert!(answer.ends_with("u GET /late body="), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    assert!(started.elapsed() < delay);

    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the gateway stops after the delay")
        .unwrap();
    assert!(
        started.elapsed() >= delay,
        "accepting until the delay was over"
    );
    assert!(TcpStream::connect(&address).await.is_err());
}
