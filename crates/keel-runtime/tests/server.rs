//! The HTTP server stack over a real socket: drain on shutdown, limits on slow and idle
//! clients and on connections, trace context propagation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use keel_runtime::{Health, HttpServer, HttpServerConfig, Shutdown};
use opentelemetry::trace::TracerProvider as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing_subscriber::layer::SubscriberExt;

type Served = (
    SocketAddr,
    Shutdown,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

async fn serve(router: Router, drain: Duration) -> Served {
    serve_with(
        router,
        HttpServerConfig {
            drain_timeout: drain,
            ..HttpServerConfig::default()
        },
    )
    .await
}

async fn serve_with(router: Router, config: HttpServerConfig) -> Served {
    let server = HttpServer::bind(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        router,
        Health::new(),
        config,
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    (addr, shutdown, handle)
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() {
    let router = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            "done"
        }),
    );
    let (addr, shutdown, handle) = serve(router, Duration::from_secs(5)).await;
    let in_flight =
        tokio::spawn(async move { keel_testkit::get_text(format!("http://{addr}/slow")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.trigger();
    assert_eq!(
        in_flight.await.unwrap(),
        "done",
        "the in-flight request completes"
    );
    handle.await.unwrap().unwrap();
    let refused = keel_testkit::http()
        .get(format!("http://{addr}/slow"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(refused.is_err(), "no longer accepting");
}

/// With a shutdown delay, a stopping server says `draining` on `/health/ready` and goes
/// on serving, new connections too, until the delay is over; only then does it stop
/// accepting.
#[tokio::test]
async fn a_stopping_server_answers_draining_and_serves_through_its_delay() {
    let router = Router::new().route("/work", get(|| async { "done" }));
    // Long enough that a loaded machine still answers within it.
    let delay = Duration::from_millis(1500);
    let (addr, shutdown, handle) = serve_with(
        router,
        HttpServerConfig {
            shutdown_delay: delay,
            ..HttpServerConfig::default()
        },
    )
    .await;
    let ready = |client: reqwest::Client| async move {
        let response = client
            .get(format!("http://{addr}/health/ready"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        (
            status,
            body["status"].as_str().unwrap_or_default().to_owned(),
        )
    };
    assert_eq!(ready(keel_testkit::http()).await, (200, "up".to_owned()));

    let started = Instant::now();
    shutdown.trigger();
    assert_eq!(
        ready(keel_testkit::http()).await,
        (503, "draining".to_owned())
    );
    let fresh = keel_testkit::http()
        .get(format!("http://{addr}/work"))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.text().await.unwrap(), "done");
    assert!(started.elapsed() < delay, "answered within the delay");

    handle.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= delay,
        "accepting until the delay was over"
    );
    let refused = keel_testkit::http()
        .get(format!("http://{addr}/work"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(refused.is_err(), "no longer accepting");
}

#[tokio::test]
async fn the_drain_deadline_cuts_requests_that_never_finish() {
    let router = Router::new().route("/stuck", get(std::future::pending::<&'static str>));
    let (addr, shutdown, handle) = serve(router, Duration::from_millis(300)).await;
    tokio::spawn(async move {
        keel_testkit::http()
            .get(format!("http://{addr}/stuck"))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    shutdown.trigger();
    handle.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "waited for the deadline ({took:?})"
    );
    assert!(took < Duration::from_secs(3), "but not longer ({took:?})");
}

/// How long the server takes to close `stream` (reading whatever it sends first), or
/// `None` if it keeps it open for `patience`.
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(patience, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

fn hello() -> Router {
    Router::new().route("/hello", get(|| async { "hello" }))
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_after_the_header_timeout() {
    let (addr, shutdown, handle) = serve_with(
        hello(),
        HttpServerConfig {
            header_read_timeout: Duration::from_millis(500),
            ..HttpServerConfig::default()
        },
    )
    .await;
    // Slowloris: headers begun, never finished, a byte now and then.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn({
        let mut writer = TcpStream::connect(addr).await.unwrap();
        async move {
            writer.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
            let started = Instant::now();
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if writer.write_all(b"X-A: b\r\n").await.is_err() {
                    return Some(started.elapsed());
                }
            }
            None
        }
    });
    // Connected and silent.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Part of HTTP/2's preface, then nothing.
    let mut preface = TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Kept alive after a request, then idle.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    for (name, stream) in [
        ("slow", &mut slow),
        ("silent", &mut silent),
        ("preface", &mut preface),
        ("idle", &mut idle),
    ] {
        let closed = closed_within(stream, Duration::from_secs(5)).await;
        let closed = closed.unwrap_or_else(|| panic!("{name}: still open after 5 s"));
        assert!(
            closed < Duration::from_secs(3),
            "{name}: closed after {closed:?}"
        );
    }
    let cut = trickle
        .await
        .unwrap()
        .expect("a trickling client is cut off");
    assert!(cut < Duration::from_secs(3), "trickle cut after {cut:?}");

    // A client that sends its request in time is served.
    let body = keel_testkit::get_text(format!("http://{addr}/hello")).await;
    assert_eq!(body, "hello");
    shutdown.trigger();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_the_held_ones_served() {
    let (addr, shutdown, handle) = serve_with(
        hello(),
        HttpServerConfig {
            max_connections: 2,
            ..HttpServerConfig::default()
        },
    )
    .await;
    let mut held = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    // Each held connection answers, so both are the server's before the third comes.
    for stream in &mut held {
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 1024];
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(buffer[..read].starts_with(b"HTTP/1.1 200"));
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer))
        .await
        .expect("closed at once, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "the third is not served");

    // The held connections close; a freed slot takes a new one.
    drop(held);
    let served = async {
        loop {
            if let Ok(response) = keel_testkit::http()
                .get(format!("http://{addr}/hello"))
                .send()
                .await
            {
                return response.text().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("a freed slot takes a new connection");
    assert_eq!(body, "hello");
    shutdown.trigger();
    handle.await.unwrap().unwrap();
}

#[test]
fn incoming_traceparent_becomes_the_request_span_parent() {
    // A subscriber with the OpenTelemetry layer, as `telemetry::init` installs, but scoped
    // to this test's runtime thread.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The handler reports the trace context it runs in, as an outgoing call would carry it.
        let router = Router::new().route(
            "/echo",
            get(|| async {
                let mut headers = http::HeaderMap::new();
                keel_runtime::trace_context::inject_current(&mut headers);
                headers
                    .get("traceparent")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            }),
        );
        let (addr, shutdown, handle) = serve(router, Duration::from_secs(1)).await;
        let client = keel_testkit::http();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let outgoing = client
            .get(format!("http://{addr}/echo"))
            .header("traceparent", traceparent)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let parts: Vec<&str> = outgoing.split('-').collect();
        assert_eq!(parts.len(), 4, "{outgoing:?}");
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(parts[2], "00f067aa0ba902b7", "a new span of our own");

        let fresh = client
            .get(format!("http://{addr}/echo"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            fresh.split('-').count(),
            4,
            "a trace is started when none comes in"
        );
        assert!(!fresh.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        shutdown.trigger();
        handle.await.unwrap().unwrap();
    });
}

/// A server answering `/work` with "done", over TLS as `tls` says.
async fn serve_work_over_tls(tls: keel_runtime::http::ServerTlsConfig) -> HttpServer {
    HttpServer::bind(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        Router::new().route("/work", get(|| async { "done" })),
        Health::new(),
        HttpServerConfig {
            tls: Some(tls),
            ..HttpServerConfig::default()
        },
    )
    .await
    .unwrap()
}

/// `[<component>.http.tls]`: HTTPS on the listen address, HTTP/2 or HTTP/1.1 as the client
/// asks by ALPN, for a client that trusts the certificate's CA; plain HTTP gets nothing;
/// unusable certificate files stop the start, naming the file.
#[tokio::test]
async fn a_server_with_tls_serves_https_choosing_the_protocol_by_alpn() {
    let ca = keel_testkit::tls::TestCa::new();
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-server-tls"));
    let (cert, key) = ca.server_files(&dir);
    let tls = keel_runtime::http::ServerTlsConfig {
        cert: cert.clone(),
        key,
        client_ca: None,
    };
    let server = serve_work_over_tls(tls.clone()).await;
    let (addr, url) = (server.local_addr(), server.url());
    assert_eq!(url, format!("https://{addr}"));
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    let connect = |http2: bool| async move {
        let connector = keel_runtime::http_client::hyper_connector(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            http2,
        )
        .unwrap();
        let uri = format!("https://localhost:{}", addr.port())
            .parse()
            .unwrap();
        tower::ServiceExt::oneshot(connector, uri).await
    };
    // Before the CA is trusted the handshake fails; trusting it reaches connectors made
    // from then on (the verifier they share is made again).
    assert!(connect(true).await.is_err(), "not trusted yet");

    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();
    let response = keel_testkit::http()
        .get(format!("{url}/work"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.text().await.unwrap(), "done");
    assert!(
        keel_testkit::http()
            .get(format!("http://{addr}/work"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_err(),
        "plain HTTP is not answered"
    );

    // HTTP/2 when the client offers it: what the connector of hyper clients (the
    // gateway's upstreams, gRPC channels) asks for when told to, and only then.
    for http2 in [true, false] {
        let stream = connect(http2).await.unwrap();
        assert!(matches!(stream, hyper_rustls::MaybeHttpsStream::Https(_)));
        assert_eq!(
            hyper_util::client::legacy::connect::Connection::connected(&stream).is_negotiated_h2(),
            http2
        );
    }

    shutdown.trigger();
    handle.await.unwrap().unwrap();

    // A key file that is not one.
    std::fs::write(&tls.key, "not a key").unwrap();
    let error = HttpServer::bind(
        "test",
        "127.0.0.1:0".parse().unwrap(),
        Router::new(),
        Health::new(),
        HttpServerConfig {
            tls: Some(tls.clone()),
            ..HttpServerConfig::default()
        },
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(error.contains("server.key"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Mutual TLS: with `client_ca`, only clients presenting a certificate that CA signed are
/// served, by reqwest's clients and the hyper connector's alike once the process presents
/// one; a client CA file replaced is reloaded.
#[tokio::test]
async fn a_server_with_a_client_ca_serves_only_clients_presenting_its_certificates() {
    let (server_ca, client_ca) = (
        keel_testkit::tls::TestCa::new(),
        keel_testkit::tls::TestCa::new(),
    );
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-server-mtls"));
    let (cert, key) = server_ca.server_files(&dir);
    let ca_file = client_ca.ca_file(&dir);
    let server = serve_work_over_tls(keel_runtime::http::ServerTlsConfig {
        cert,
        key,
        client_ca: Some(ca_file.clone()),
    })
    .await;
    let url = format!("{}/work", server.url());
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    keel_runtime::http_client::trust_pem(server_ca.pem().as_bytes()).unwrap();
    let served = || async { keel_testkit::http().get(&url).send().await.is_ok() };
    assert!(!served().await, "no client certificate, no answer");

    let (client_cert, client_key) = client_ca.client_files(&dir);
    keel_runtime::http_client::present_certificate(&client_cert, &client_key).unwrap();
    assert_eq!(keel_testkit::get_text(&url).await, "done");
    let connector = keel_runtime::http_client::hyper_connector(
        hyper_util::client::legacy::connect::HttpConnector::new(),
        false,
    )
    .unwrap();
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, axum::body::Body>(connector);
    let response = hyper.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);

    // Another CA in the file: the same certificate is refused once the file is reloaded,
    // by a client that connects afresh for every request and so would resume the TLS
    // session it had, were sessions resumed.
    let fresh = keel_runtime::http_client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let served = || async { fresh.get(&url).send().await.is_ok() };
    assert!(served().await && served().await);
    std::fs::write(&ca_file, keel_testkit::tls::TestCa::new().pem()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served().await {
        assert!(
            Instant::now() < deadline,
            "the client CA file was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.trigger();
    handle.await.unwrap().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
