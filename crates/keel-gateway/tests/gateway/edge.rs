//! The client-facing edge: TLS with SNI and reload, HTTPS redirects, HTTP/2, and the
//! limits that stand between hostile clients and the gateway.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_gateway::GatewayServer;
use keel_gateway::config::UpstreamConfig;
use keel_gateway::listener::ClientLimitsConfig;
use keel_gateway::tls::{CertificateConfig, TlsConfig};
use keel_runtime::Shutdown;
use keel_testkit::TestServer;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use keel_testkit::get_status;

use crate::support::{Upstream, exchange, h2_client, route_to, test_config};

/// A self-signed certificate for `hosts`, written to files.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn cert_files(hosts: &[&str]) -> CertFiles {
    let generated =
        rcgen::generate_simple_self_signed(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
            .unwrap();
    let base = std::env::temp_dir().join(keel_testkit::unique_name("cert"));
    let (cert, key) = (base.with_extension("crt"), base.with_extension("key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    CertFiles {
        cert,
        key,
        der: generated.cert.der().clone(),
    }
}

impl CertFiles {
    fn config(&self, hosts: &[&str]) -> CertificateConfig {
        CertificateConfig {
            cert: self.cert.clone(),
            key: self.key.clone(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    /// Replaces the files' contents with a new certificate for the same hosts.
    fn renew(&mut self, hosts: &[&str]) {
        let next = cert_files(hosts);
        std::fs::rename(&next.cert, &self.cert).unwrap();
        std::fs::rename(&next.key, &self.key).unwrap();
        self.der = next.der;
    }
}

/// Trusts any certificate and remembers the one presented: the tests check which
/// certificate the gateway chose, not the chain.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<CertificateDer<'static>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects over TLS with `server_name`; returns the stream, the certificate presented
/// and the negotiated ALPN protocol.
async fn tls_connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
    Option<Vec<u8>>,
) {
    let recorder = Arc::new(Recorder::default());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(recorder.clone())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from(server_name.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let presented = recorder.0.lock().unwrap().clone().unwrap();
    (stream, presented, alpn)
}

async fn start(config: keel_gateway::GatewayConfig) -> (TestServer, Option<std::net::SocketAddr>) {
    let server = GatewayServer::build(config, &Shutdown::new())
        .await
        .unwrap();
    let tls = server.tls_addr();
    (keel_testkit::spawn(server), tls)
}

/// `[gateway.tls] client_ca`: mutual TLS at the edge; a client without a certificate
/// that CA signed gets no answer, one with it is proxied; the plain listener may only
/// redirect, or it would serve the routes to anyone.
#[tokio::test]
async fn with_a_client_ca_only_clients_presenting_its_certificates_are_served() {
    let upstream = Upstream::start("u");
    let (server_ca, client_ca) = (
        keel_testkit::tls::TestCa::new(),
        keel_testkit::tls::TestCa::new(),
    );
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-gateway-mtls"));
    let (cert, key) = server_ca.server_files(&dir);
    let mut config = test_config(vec![route_to("r", &[&upstream])]);
    config.tls = Some(TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificates: vec![keel_runtime::tls::CertificateConfig {
            cert,
            key,
            hosts: Vec::new(),
        }],
        redirect_http: false,
        client_ca: Some(client_ca.ca_file(&dir)),
    });
    let refused = GatewayServer::build(config.clone(), &Shutdown::new())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(refused.contains("redirect_http"), "{refused}");
    config.tls.as_mut().unwrap().redirect_http = true;
    let (gateway, tls) = start(config).await;
    let plain = keel_runtime::http_client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/x", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::PERMANENT_REDIRECT);
    let url = format!("https://localhost:{}/x", tls.unwrap().port());
    keel_runtime::http_client::trust_pem(server_ca.pem().as_bytes()).unwrap();
    assert!(keel_testkit::http().get(&url).send().await.is_err());
    let stranger = keel_testkit::tls::TestCa::new().client_files(&dir.join("stranger"));
    keel_runtime::http_client::present_certificate(&stranger.0, &stranger.1).unwrap();
    assert!(keel_testkit::http().get(&url).send().await.is_err());
    assert_eq!(upstream.hits(), 0);

    let (client_cert, client_key) = client_ca.client_files(&dir);
    keel_runtime::http_client::present_certificate(&client_cert, &client_key).unwrap();
    assert_eq!(keel_testkit::get_status(&url).await, 200);
    assert_eq!(upstream.hits(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn tls_picks_certificates_by_sni_and_reloads_them() {
    let upstream = Upstream::start("u");
    let mut a = cert_files(&["a.test"]);
    let b = cert_files(&["b.test", "*.b.test"]);
    let mut config = test_config(vec![route_to("r", &[&upstream])]);
    config.watch_interval = Duration::from_millis(50);
    config.tls = Some(TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificates: vec![a.config(&["a.test"]), b.config(&["b.test", "*.b.test"])],
        redirect_http: false,
        client_ca: None,
    });
    let (_gateway, tls) = start(config).await;
    let tls = tls.unwrap();

    assert_eq!(tls_connect(tls, "a.test", &[]).await.1, a.der);
    assert_eq!(tls_connect(tls, "b.test", &[]).await.1, b.der);
    assert_eq!(
        tls_connect(tls, "shop.b.test", &[]).await.1,
        b.der,
        "wildcard"
    );
    assert_eq!(
        tls_connect(tls, "other.test", &[]).await.1,
        a.der,
        "unknown names get the first certificate"
    );

    // A request over HTTPS reaches the upstream and says it came over TLS.
    let (stream, _, alpn) = tls_connect(tls, "a.test", &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("/x")
                .header("host", "a.test")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // New files are picked up without a restart.
    let before = a.der.clone();
    a.renew(&["a.test"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let presented = tls_connect(tls, "a.test", &[]).await.1;
        if presented == a.der {
            break;
        }
        assert_eq!(presented, before);
        assert!(
            Instant::now() < deadline,
            "the renewed certificate never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn_and_spoken_with_prior_knowledge() {
    let upstream = Upstream::start("u");
    let a = cert_files(&["a.test"]);
    let mut config = test_config(vec![route_to("r", &[&upstream])]);
    config.tls = Some(TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificates: vec![a.config(&["a.test"])],
        redirect_http: false,
        client_ca: None,
    });
    let (gateway, tls) = start(config).await;

    let (stream, _, alpn) = tls_connect(tls.unwrap(), "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("https://a.test/over-h2")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"u GET /over-h2"), "{body:?}");

    // h2c with prior knowledge on the plain port.
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let mut sender = h2_client(&gateway.url).await;
    let response = sender
        .send_request(
            Request::get(format!("http://{addr}/h2c"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn plain_http_can_redirect_to_https() {
    let upstream = Upstream::start("u");
    let a = cert_files(&["a.test"]);
    let mut config = test_config(vec![route_to("r", &[&upstream])]);
    config.tls = Some(TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificates: vec![a.config(&["a.test"])],
        redirect_http: true,
        client_ca: None,
    });
    let (gateway, tls) = start(config).await;
    let response = keel_runtime::http_client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/cart?item=3", gateway.url))
        .header("host", "shop.test:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        response.headers()["location"],
        format!("https://shop.test:{}/cart?item=3", tls.unwrap().port()).as_str()
    );
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn broken_certificates_stop_the_start_with_the_file_named() {
    let missing = CertificateConfig {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
        hosts: vec!["a.test".into()],
    };
    let mut config = test_config(Vec::new());
    config.tls = Some(TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificates: vec![missing],
        redirect_http: false,
        client_ca: None,
    });
    let error = match GatewayServer::build(config, &Shutdown::new()).await {
        Ok(_) => panic!("started without a certificate"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("/nonexistent/cert.pem"), "{error}");
}

/// Sends raw bytes and reads until the gateway closes or answers.
async fn limited_gateway(limits: ClientLimitsConfig) -> (TestServer, Upstream) {
    let upstream = Upstream::start("u");
    let mut config = test_config(vec![route_to("r", &[&upstream])]);
    config.limits = limits;
    let (gateway, _) = start(config).await;
    (gateway, upstream)
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let (gateway, upstream) = limited_gateway(ClientLimitsConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ClientLimitsConfig::default()
    })
    .await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();

    // Headers started and never finished.
    let (_, waited) = exchange(&addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    // Headers dripped one byte at a time.
    let started = Instant::now();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let mut closed = false;
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !closed {
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest)).await;
        closed = read.is_ok();
    }
    assert!(closed, "a dripping client is dropped");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(upstream.hits(), 0);

    // Ordinary clients are still served.
    assert_eq!(get_status(&gateway.url).await, StatusCode::OK);
}

/// Counts, when dropped, a response body its upstream gave up.
struct GivenUp(Arc<AtomicUsize>);

impl Drop for GivenUp {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An upstream answering every request with a body that never ends, and the count of such
/// bodies given up (their connection closed by the gateway).
async fn endless_upstream() -> (String, Arc<AtomicUsize>) {
    let given_up = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&given_up);
    let app = axum::Router::new().fallback(move || {
        let guard = GivenUp(Arc::clone(&counter));
        async move {
            let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
            Body::from_stream(futures_util::stream::repeat_with(move || {
                let _ = &guard;
                Ok::<_, std::convert::Infallible>(chunk.clone())
            }))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, given_up)
}

/// Waits up to 10 s for `count` to reach `want`.
async fn reaches(count: &AtomicUsize, want: usize) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if count.load(Ordering::SeqCst) >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A gateway in front of [`endless_upstream`] with a send timeout of 2 s (20 times the
/// pace of the tests' readers, so that a stalled test thread on a loaded machine cannot
/// pass for a client that stopped), and the count of bodies the upstream gave up.
async fn endless_gateway() -> (TestServer, Arc<AtomicUsize>) {
    let (url, given_up) = endless_upstream().await;
    let mut route = route_to("r", &[]);
    route.upstreams = vec![UpstreamConfig::Url(url)];
    let mut config = test_config(vec![route]);
    config.limits.send_timeout = Duration::from_secs(2);
    let (gateway, _) = start(config).await;
    (gateway, given_up)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_its_upstream_freed() {
    let (gateway, given_up) = endless_gateway().await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let request = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n";

    // A client that keeps reading is served for longer than the timeout, although the
    // gateway's writes wait on it between its reads (the upstream is far faster).
    let mut steady = TcpStream::connect(&addr).await.unwrap();
    steady.write_all(request).await.unwrap();
    let mut chunk = vec![0; 8 << 20];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read = steady.read(&mut chunk).await.unwrap();
        assert!(
            read > 0,
            "a reading client is cut off after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(given_up.load(Ordering::SeqCst), 0);
    drop(steady);
    assert!(
        reaches(&given_up, 1).await,
        "a closed client frees its upstream"
    );

    // One that stops reading is cut off, and the upstream's response given up.
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(request).await.unwrap();
    assert!(
        reaches(&given_up, 2).await,
        "a client that reads nothing holds its upstream"
    );
    // What was already on its way still arrives; then the connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while stalled.read(&mut chunk).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(ended.is_ok(), "the stalled connection is still open");
}

#[tokio::test]
async fn an_http2_client_that_stops_taking_a_stream_has_its_upstream_freed() {
    let (gateway, given_up) = endless_gateway().await;
    let mut sender = h2_client(&gateway.url).await;
    let get = || {
        Request::get(format!("{}/stream", gateway.url))
            .body(Body::empty())
            .unwrap()
    };
    // Two streams on one connection: one read, pausing now and then; one never read, so
    // the client grants it no window (its socket is read all along).
    let mut read = sender.send_request(get()).await.unwrap().into_body();
    let mut unread = sender.send_request(get()).await.unwrap().into_body();
    let started = Instant::now();
    let mut taken = 0usize;
    while given_up.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a stream its client takes nothing of holds its upstream"
        );
        let frame = read
            .frame()
            .await
            .expect("the read stream goes on")
            .unwrap();
        taken += frame.data_ref().map_or(0, |data| data.len());
        if taken >= 1 << 20 {
            taken = 0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    // Only the unread stream was given up, and it ends with an error once read.
    for _ in 0..64 {
        assert!(read.frame().await.unwrap().is_ok());
    }
    assert_eq!(given_up.load(Ordering::SeqCst), 1);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match unread.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => return,
                None => panic!("the given-up stream ended as if complete"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the given-up stream is still open");
}

#[tokio::test]
async fn the_targets_authority_wins_over_a_host_field_that_differs() {
    let (a, b) = (
        Upstream::start_echoing("a", &["x-forwarded-host"]),
        Upstream::start("b"),
    );
    let on_host = |name: &str, upstream: &Upstream| keel_gateway::config::GatewayRouteConfig {
        matches: keel_gateway::route::MatchConfig {
            host: Some(format!("{name}.test")),
            ..keel_gateway::route::MatchConfig::default()
        },
        ..route_to(name, &[upstream])
    };
    let (gateway, _) = start(test_config(vec![on_host("a", &a), on_host("b", &b)])).await;
    // HTTP/2: `:authority` says a.test, a stray `host` field b.test.
    let mut sender = h2_client(&gateway.url).await;
    let response = sender
        .send_request(
            Request::get("http://a.test/x")
                .header("host", "b.test")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-upstream"], "a");
    // And the upstream is told the host the client asked for.
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(" x-forwarded-host=a.test "), "{body}");
    // HTTP/1.1 absolute form: the target's authority, not `Host`.
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let (answer, _) = exchange(
        &addr,
        b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("x-upstream: a"), "{answer}");
}

#[tokio::test]
async fn cookies_split_over_http2_reach_an_http1_upstream_as_one_field() {
    let upstream = Upstream::start_echoing("u", &["cookie"]);
    let (gateway, _) = start(test_config(vec![route_to("r", &[&upstream])])).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let mut sender = h2_client(&gateway.url).await;
    let response = sender
        .send_request(
            Request::get(format!("http://{addr}/c"))
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(" cookie=a=1; b=2 "), "{body}");
}

#[tokio::test]
async fn a_body_that_does_not_come_is_cut_at_the_routes_time_as_the_clients_fault() {
    let upstream = Upstream::start("u");
    let route = keel_gateway::config::GatewayRouteConfig {
        timeout: Duration::from_millis(300),
        ..route_to("r", &[&upstream])
    };
    let (gateway, _) = start(test_config(vec![route])).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    // A small body announced, then not (all) sent: read whole for retries, within the
    // route's time, never for ever.
    for announced in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"[..],
        b"POST / HTTP/1.0\r\nContent-Length: 10\r\n\r\nabc",
    ] {
        let (answer, waited) = exchange(&addr, announced).await;
        assert!(answer.contains(" 408 "), "{answer}");
        assert!(answer.contains("body-too-slow"), "{answer}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
    assert_eq!(upstream.hits(), 0);
    // A large body streams on to the upstream; when it stalls, the route's time runs out
    // while it is still coming: the client's fault (408), not the instance's (504).
    for _ in 0..3 {
        let stalled = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc";
        let (answer, waited) = exchange(&addr, stalled).await;
        assert!(answer.contains(" 408 "), "{answer}");
        assert!(answer.contains("body-too-slow"), "{answer}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
    assert_eq!(get_status(&gateway.url).await, StatusCode::OK);
    // The whole body sent, and the instance slow to answer: the instance's 504.
    upstream.set(crate::support::Behaviour {
        delay: Duration::from_secs(2),
        ..crate::support::Behaviour::default()
    });
    let mut whole =
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n"
            .to_vec();
    whole.resize(whole.len() + 100_000, b'x');
    let (answer, _) = exchange(&addr, &whole).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
}

#[tokio::test]
async fn oversized_and_numerous_headers_get_431() {
    let (gateway, upstream) = limited_gateway(ClientLimitsConfig {
        max_header_bytes: 16 * 1024,
        max_headers: 20,
        ..ClientLimitsConfig::default()
    })
    .await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (answer, _) = exchange(&addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    let many: String = (0..40).map(|n| format!("X-H{n}: v\r\n")).collect();
    let (answer, _) = exchange(
        &addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn garbage_never_hurts_the_gateway() {
    let (gateway, _upstream) = limited_gateway(ClientLimitsConfig::default()).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    for junk in [
        &b"\x00\x01\x02\xff\xfe GARBAGE\r\n\r\n"[..],
        b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nzzzzz",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ] {
        let (answer, _) = exchange(&addr, junk).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer:.80}"
        );
    }
    // A broken HTTP/2 connection gets HTTP/2's answer (a GOAWAY frame) and is closed.
    let (answer, waited) = exchange(
        &addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x09\x00\x00\x00\x00\x00garbage",
    )
    .await;
    assert!(!answer.starts_with("HTTP/1.1 2") && waited < Duration::from_secs(5));
    assert_eq!(get_status(&gateway.url).await, StatusCode::OK);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let (gateway, _upstream) = limited_gateway(ClientLimitsConfig {
        max_connections: 2,
        ..ClientLimitsConfig::default()
    })
    .await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let _held: Vec<TcpStream> = vec![
        TcpStream::connect(&addr).await.unwrap(),
        TcpStream::connect(&addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (answer, waited) = exchange(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        answer.is_empty() && waited < Duration::from_secs(2),
        "{answer:.80}"
    );
}

#[tokio::test]
async fn a_connection_sending_too_fast_is_refused_and_closed() {
    let (gateway, _upstream) = limited_gateway(ClientLimitsConfig {
        max_requests_per_second_per_connection: 5,
        ..ClientLimitsConfig::default()
    })
    .await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let request = Request::get("/")
            .header("host", "x")
            .body(Body::empty())
            .unwrap();
        match sender.send_request(request).await {
            Ok(response) => statuses.push(response.status().as_u16()),
            Err(_) => break,
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    // Other connections are not affected.
    assert_eq!(get_status(&gateway.url).await, StatusCode::OK);
}

#[tokio::test]
async fn the_default_header_count_limit_holds() {
    let (gateway, upstream) = limited_gateway(ClientLimitsConfig::default()).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let many: String = (0..120).map(|n| format!("X-H{n}: v\r\n")).collect();
    let (answer, _) = exchange(
        &addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    let fine: String = (0..90).map(|n| format!("X-H{n}: v\r\n")).collect();
    let (answer, _) = exchange(
        &addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{fine}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.80}");
    assert_eq!(upstream.hits(), 1);
}

/// `https://` upstreams: spoken to over TLS, their certificate checked against the system's
/// roots and the CAs the process trusts; one signed by another CA is refused (502, from the
/// gateway).
#[tokio::test]
async fn https_upstreams_are_reached_when_their_ca_is_trusted_and_only_then() {
    let upstream = Upstream::start("secure");
    let backend: std::net::SocketAddr = upstream.url.trim_start_matches("http://").parse().unwrap();
    let ca = keel_testkit::tls::TestCa::new();
    let trusted = keel_testkit::tls::TlsFront::to(&ca, backend).await;
    let stranger =
        keel_testkit::tls::TlsFront::to(&keel_testkit::tls::TestCa::new(), backend).await;
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();

    let route = |name: &str, prefix: &str, url: String| {
        let mut route = route_to(name, &[]);
        route.matches.path_prefix = Some(prefix.into());
        route.upstreams = vec![UpstreamConfig::Url(url)];
        route
    };
    let gateway = crate::support::start_gateway(vec![
        route("trusted", "/trusted", trusted.url()),
        route("stranger", "/stranger", stranger.url()),
    ])
    .await;
    let http = keel_testkit::http();
    for _ in 0..2 {
        // Twice: the second over the pooled TLS connection.
        let response = http
            .get(format!("{}/trusted/a", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.text().await.unwrap(),
            "secure GET /trusted/a body="
        );
    }
    let (status, content_type, problem) =
        keel_testkit::send(http.get(format!("{}/stranger/a", gateway.url)), None).await;
    assert_eq!(status, 502, "{problem}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem["source"], "gateway");
    assert_eq!(upstream.hits(), 2, "nothing passed the failed handshake");
}
