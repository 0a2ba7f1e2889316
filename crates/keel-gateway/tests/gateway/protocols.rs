//! Protocols through the gateway: gRPC over HTTP/2 with trailers, streaming both ways,
//! gRPC status codes for the gateway's own errors, and connection upgrades (WebSocket).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_gateway::config::{UpstreamConfig, UpstreamProtocol};
use keel_testkit::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::{Upstream, exchange, h2_client, route_to, start_gateway};

type Frames = BoxBody<Bytes, Infallible>;

/// A body fed frame by frame from a channel.
fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Frames) {
    let (sender, receiver) = mpsc::channel(16);
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), receiver))
    });
    (sender, StreamBody::new(stream).boxed())
}

/// One gRPC message: compression flag, length, payload.
fn grpc_message(payload: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    Bytes::from(framed)
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            )
        })
        .collect()
}

/// An h2c gRPC-shaped server: `/echo.Echo/Unary` answers one message, `/Stream` three
/// messages 200 ms apart, `/Bidi` echoes each request frame as it arrives; all end with
/// trailers.
async fn grpc_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(|request: Request<Incoming>| async move {
                let te = request
                    .headers()
                    .get("te")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let (sender, body) = channel_body();
                let path = request.uri().path().to_owned();
                tokio::spawn(async move {
                    match path.as_str() {
                        "/echo.Echo/Unary" => {
                            let _ = sender.send(Frame::data(grpc_message(b"pong"))).await;
                        }
                        "/echo.Echo/Stream" => {
                            for n in 0..3u8 {
                                let _ = sender.send(Frame::data(grpc_message(&[b'0' + n]))).await;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                        _ => {
                            let mut incoming = request.into_body();
                            while let Some(Ok(frame)) = incoming.frame().await {
                                if let Ok(data) = frame.into_data() {
                                    let _ = sender.send(Frame::data(data)).await;
                                }
                            }
                        }
                    }
                    let mut end = trailers(&[("grpc-status", "0"), ("x-checksum", "abc")]);
                    end.insert("x-te-seen", te.parse().unwrap());
                    let _ = sender.send(Frame::trailers(end)).await;
                });
                let response = Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap();
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{addr}")
}

fn grpc_request(gateway: &str, method: &str, body: Frames) -> Request<Frames> {
    Request::post(format!("{gateway}/echo.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

async fn grpc_gateway() -> TestServer {
    let upstream = grpc_upstream().await;
    let mut route = route_to("grpc", &[]);
    route.upstreams = vec![UpstreamConfig::Url(upstream)];
    route.upstream_protocol = UpstreamProtocol::Http2;
    start_gateway(vec![route]).await
}

#[tokio::test]
async fn grpc_unary_keeps_its_trailers() {
    unary_keeps_its_trailers(&grpc_gateway().await).await;
}

/// An `https://` HTTP/2 upstream: h2 over TLS (the front agrees to h2 alone, as an
/// HTTP/2-only server), gRPC's trailers intact through it.
#[tokio::test]
async fn grpc_reaches_an_https_upstream_over_h2() {
    let backend = grpc_upstream().await;
    let ca = keel_testkit::tls::TestCa::new();
    let front = keel_testkit::tls::TlsFront::h2_to(
        &ca,
        backend.trim_start_matches("http://").parse().unwrap(),
    )
    .await;
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();
    let mut route = route_to("grpc", &[]);
    route.upstreams = vec![UpstreamConfig::Url(front.url())];
    route.upstream_protocol = UpstreamProtocol::Http2;
    unary_keeps_its_trailers(&start_gateway(vec![route]).await).await;
}

async fn unary_keeps_its_trailers(gateway: &TestServer) {
    let mut client = h2_client::<Frames>(&gateway.url).await;
    let body = http_body_util::Full::new(grpc_message(b"ping"))
        .map_err(|never| match never {})
        .boxed();
    let response = client
        .send_request(grpc_request(&gateway.url, "Unary", body))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(
        trailers["x-te-seen"], "trailers",
        "te: trailers reached the server"
    );
    assert_eq!(collected.to_bytes(), grpc_message(b"pong"));
}

#[tokio::test]
async fn server_streams_arrive_message_by_message() {
    let gateway = grpc_gateway().await;
    let mut client = h2_client::<Frames>(&gateway.url).await;
    let started = Instant::now();
    let response = client
        .send_request(grpc_request(&gateway.url, "Stream", Empty::new().boxed()))
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if frame.is_data() {
            arrivals.push(started.elapsed());
        } else {
            assert_eq!(frame.into_trailers().unwrap()["grpc-status"], "0");
        }
    }
    assert_eq!(arrivals.len(), 3);
    assert!(
        arrivals[0] < Duration::from_millis(150) && arrivals[2] >= Duration::from_millis(380),
        "not buffered: {arrivals:?}"
    );
}

#[tokio::test]
async fn bidirectional_streams_flow_both_ways_without_buffering() {
    let gateway = grpc_gateway().await;
    let mut client = h2_client::<Frames>(&gateway.url).await;
    let (sender, body) = channel_body();
    let response = client
        .send_request(grpc_request(&gateway.url, "Bidi", body))
        .await
        .unwrap();
    let mut incoming = response.into_body();
    for word in [&b"one"[..], b"two", b"three"] {
        sender.send(Frame::data(grpc_message(word))).await.unwrap();
        // The echo comes back while the request stream is still open.
        let echoed = tokio::time::timeout(Duration::from_secs(2), incoming.frame())
            .await
            .expect("echo before the request ends")
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_data().unwrap(), grpc_message(word));
    }
    drop(sender);
    let rest = incoming.collect().await.unwrap();
    assert_eq!(rest.trailers().unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn gateway_errors_reach_grpc_clients_as_grpc_statuses() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut route = route_to("grpc", &[]);
    route.matches.path_prefix = Some("/echo.Echo".into());
    route.upstreams = vec![UpstreamConfig::Url(dead)];
    route.upstream_protocol = UpstreamProtocol::Http2;
    let gateway = start_gateway(vec![route]).await;
    let mut client = h2_client::<Frames>(&gateway.url).await;
    for (path, code) in [("/echo.Echo/Unary", "14"), ("/other.Svc/Call", "12")] {
        let request = Request::post(format!("{}{path}", gateway.url))
            .header("content-type", "application/grpc")
            .body(Empty::new().boxed())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["grpc-status"], code, "{path}");
        assert!(response.headers().contains_key("grpc-message"));
    }
}

/// An HTTP/1.1 server that accepts upgrades to `websocket` and then echoes bytes.
async fn upgrade_echo_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(|mut request: Request<Incoming>| async move {
                let upgrade = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut io = TokioIo::new(upgraded);
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buffer).await {
                        if n == 0 || io.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let response = Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn websocket_upgrades_pass_through_and_echo() {
    let mut route = route_to("ws", &[]);
    route.upstreams = vec![UpstreamConfig::Url(upgrade_echo_upstream().await)];
    let gateway = start_gateway(vec![route]).await;
    let mut tcp = TcpStream::connect(gateway.url.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"hello"[..], b"over the gateway"] {
        tcp.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut echoed))
            .await
            .expect("echo arrives")
            .unwrap();
        assert_eq!(echoed, message);
    }
}

#[tokio::test]
async fn a_plain_request_is_never_upgraded_by_accident() {
    let upstream = Upstream::start_echoing("u", &["upgrade", "connection"]);
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let response = keel_testkit::http()
        .get(&gateway.url)
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Without `connection: upgrade` it is a plain request: the hop-by-hop `upgrade`
    // header stops at the gateway and nothing asks the upstream to switch.
    let body = response.text().await.unwrap();
    assert!(!body.contains("upgrade="), "{body}");
}

#[tokio::test]
async fn only_websocket_upgrades_are_asked_of_the_upstream() {
    let upstream = Upstream::start_echoing("u", &["upgrade", "connection", "http2-settings"]);
    let gateway = start_gateway(vec![route_to("r", &[&upstream])]).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    // h2c (or anything but WebSocket) would be spliced as raw bytes once the upstream
    // agreed, carrying requests for any path past the routes: asked as a plain request.
    for protocol in ["h2c", "tls/1.2", "websocket, h2c"] {
        let request = format!(
            "GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
             Upgrade: {protocol}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let (answer, _) = exchange(&addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{protocol}: {answer}");
        assert!(answer.contains("u GET /x "), "{answer}");
        for passed in ["upgrade=", "connection=", "http2-settings="] {
            assert!(!answer.contains(passed), "{protocol}: {answer}");
        }
    }
}

/// The headers the gateway puts on every answer (the request id, a limited route's
/// `RateLimit-*`) are there once each, over HTTP/1.1 and HTTP/2 alike, in place of an
/// upstream's copies.
#[tokio::test]
async fn the_gateways_own_answer_headers_replace_the_upstreams() {
    let app = axum::Router::new().fallback(|| async {
        (
            [
                ("x-request-id", "upstream-id"),
                ("ratelimit-limit", "77"),
                ("RateLimit-Remaining", "76"),
                ("ratelimit-reset", "9"),
                ("x-kept", "yes"),
            ],
            "hello",
        )
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut limited = route_to("limited", &[]);
    limited.upstreams = vec![UpstreamConfig::Url(upstream.clone())];
    limited.matches.path_prefix = Some("/limited".into());
    limited.rate_limit = Some(keel_gateway::ratelimit::RateLimitConfig {
        key: keel_gateway::ratelimit::RateKey::ClientIp,
        per_second: 1.0,
        burst: 5,
        shared: false,
    });
    let mut open = route_to("open", &[]);
    open.upstreams = vec![UpstreamConfig::Url(upstream)];
    let gateway = start_gateway(vec![limited, open]).await;

    let check = |headers: &HeaderMap, limited: bool| {
        let all = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-kept"), ["yes"]);
        let id = all("x-request-id");
        assert_eq!(id.len(), 1, "{headers:?}");
        assert_eq!(id[0].len(), 32, "the gateway's id: {headers:?}");
        if limited {
            assert_eq!(all("ratelimit-limit"), ["5"], "{headers:?}");
            let remaining: u64 = all("ratelimit-remaining")[0].parse().unwrap();
            assert!(remaining < 5, "{headers:?}");
            assert_eq!(all("ratelimit-remaining").len(), 1, "{headers:?}");
            assert_eq!(all("ratelimit-reset").len(), 1, "{headers:?}");
            assert_ne!(all("ratelimit-reset"), ["9"], "{headers:?}");
        } else {
            // Not limited here: the upstream's own state passes.
            assert_eq!(all("ratelimit-limit"), ["77"], "{headers:?}");
        }
    };
    for (path, limited) in [("/limited/x", true), ("/x", false)] {
        let response = keel_testkit::http()
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        check(response.headers(), limited);

        let mut client = h2_client::<Frames>(&gateway.url).await;
        let request = Request::get(format!("{}{path}", gateway.url))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        check(response.headers(), limited);
    }
}
