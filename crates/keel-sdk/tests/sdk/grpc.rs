//! Unary gRPC calls through the service client against real tonic servers: balancing,
//! retries of what surely did nothing, statuses, the breaker, metadata carried on.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use keel_runtime::resilience::breaker::{BreakerConfig, CircuitState};
use keel_sdk::client::{CallError, ClientOptions, Instances, ServiceClient};

#[derive(Clone, PartialEq, prost::Message)]
struct PriceRequest {
    #[prost(string, tag = "1")]
    sku: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PriceReply {
    #[prost(int64, tag = "1")]
    cents: i64,
    #[prost(string, tag = "2")]
    request_id: String,
}

const PRICE: &str = "/keel.test.Prices/Price";
const TICKS: &str = "/keel.test.Prices/Ticks";

/// A `keel.test.Prices` server: answers `Price` with 1250 cents, or with `status` when
/// set; counts calls.
#[derive(Clone, Default)]
struct Prices {
    hits: Arc<AtomicUsize>,
    status: Arc<Mutex<Option<tonic::Code>>>,
}

impl tonic::server::NamedService for Prices {
    const NAME: &'static str = "keel.test.Prices";
}

impl tower::Service<http::Request<tonic::body::Body>> for Prices {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let prices = self.clone();
        if request.uri().path() == TICKS {
            return Box::pin(async move { Ok(prices.ticks(request).await) });
        }
        Box::pin(async move {
            let method = tower::service_fn(move |request: tonic::Request<PriceRequest>| {
                let prices = prices.clone();
                async move {
                    prices.hits.fetch_add(1, Ordering::SeqCst);
                    if let Some(code) = *prices.status.lock().unwrap() {
                        return Err(tonic::Status::new(code, "as the test says"));
                    }
                    let request_id = request
                        .metadata()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    assert_eq!(request.get_ref().sku, "sku-1");
                    Ok(tonic::Response::new(PriceReply {
                        cents: 1250,
                        request_id,
                    }))
                }
            });
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}

impl Prices {
    /// `Ticks`: three prices in a stream (or the set status).
    async fn ticks(
        self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let method = tower::service_fn(move |_: tonic::Request<PriceRequest>| {
            let prices = self.clone();
            async move {
                prices.hits.fetch_add(1, Ordering::SeqCst);
                if let Some(code) = *prices.status.lock().unwrap() {
                    return Err(tonic::Status::new(code, "as the test says"));
                }
                let ticks = (1..=3).map(|cents| {
                    Ok(PriceReply {
                        cents,
                        request_id: String::new(),
                    })
                });
                Ok(tonic::Response::new(futures_util::stream::iter(ticks)))
            }
        });
        let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
        grpc.server_streaming(method, request).await
    }

    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(self.clone())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        format!("http://{addr}")
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn answer(&self, code: Option<tonic::Code>) {
        *self.status.lock().unwrap() = code;
    }
}

/// A client whose circuit opens after four calls, most of them failed.
fn touchy(urls: Vec<String>) -> ServiceClient {
    let options = ClientOptions {
        breaker: BreakerConfig {
            min_requests: 4,
            ..BreakerConfig::default()
        },
        ..ClientOptions::default()
    };
    ServiceClient::new("catalog", Instances::Static(urls), options).unwrap()
}

/// The gRPC status a `Price` call ends with, when it ends with one.
async fn status_of(client: &ServiceClient) -> Option<tonic::Code> {
    match client.unary::<_, PriceReply>(PRICE, request()).await {
        Err(CallError::Status { code, .. }) => Some(code),
        _ => None,
    }
}

fn request() -> PriceRequest {
    PriceRequest {
        sku: "sku-1".into(),
    }
}

#[tokio::test]
async fn unary_calls_are_balanced_and_retried_only_when_nothing_happened() {
    let (a, b) = (Prices::default(), Prices::default());
    let client = ServiceClient::new(
        "catalog",
        Instances::Static(vec![a.start().await, b.start().await]),
        ClientOptions::default(),
    )
    .unwrap();
    for _ in 0..20 {
        let reply: PriceReply = client.unary(PRICE, request()).await.unwrap();
        assert_eq!(reply.cents, 1250);
    }
    assert!(a.hits() > 0 && b.hits() > 0, "both instances serve");

    // UNAVAILABLE means not done: tried on the other instance.
    a.answer(Some(tonic::Code::Unavailable));
    for _ in 0..10 {
        let reply: PriceReply = client.unary(PRICE, request()).await.unwrap();
        assert_eq!(reply.cents, 1250);
    }
    // INTERNAL may have done something: not sent again; NOT_FOUND is an answer.
    let (before_a, before_b) = (a.hits(), b.hits());
    a.answer(Some(tonic::Code::Internal));
    b.answer(Some(tonic::Code::Internal));
    assert_eq!(status_of(&client).await, Some(tonic::Code::Internal));
    assert_eq!(a.hits() + b.hits() - before_a - before_b, 1, "sent once");
    b.answer(Some(tonic::Code::NotFound));
    a.answer(Some(tonic::Code::NotFound));
    assert_eq!(status_of(&client).await, Some(tonic::Code::NotFound));
}

#[tokio::test]
async fn a_dead_instance_is_skipped_and_a_failing_service_opens_the_circuit() {
    let live = Prices::default();
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let client = touchy(vec![dead, live.start().await]);
    for _ in 0..10 {
        let reply: PriceReply = client.unary(PRICE, request()).await.unwrap();
        assert_eq!(reply.cents, 1250);
    }
    assert_eq!(live.hits(), 10);

    // The service fails: the failure rate over the window (10 successes above) passes a
    // half, and the circuit opens.
    live.answer(Some(tonic::Code::Internal));
    for _ in 0..12 {
        let _ = client.unary::<_, PriceReply>(PRICE, request()).await;
    }
    assert_eq!(client.circuit(), CircuitState::Open);
    let error = client
        .unary::<_, PriceReply>(PRICE, request())
        .await
        .unwrap_err();
    assert!(matches!(error, CallError::CircuitOpen { .. }), "{error}");
}

#[tokio::test]
async fn method_paths_are_checked() {
    let client = ServiceClient::new(
        "catalog",
        Instances::Static(vec!["http://127.0.0.1:9".into()]),
        ClientOptions::default(),
    )
    .unwrap();
    for path in ["keel.test.Prices/Price", "/Price", "//evil/Price", "/a/b/c"] {
        let error = client
            .unary::<_, PriceReply>(path, request())
            .await
            .unwrap_err();
        assert!(matches!(error, CallError::Request(_)), "{path}: {error}");
    }
}

/// The prices `Ticks` streams, through the channel generated tonic clients use.
async fn ticks(client: ServiceClient) -> Result<Vec<i64>, tonic::Status> {
    use futures_util::StreamExt;

    let mut grpc = tonic::client::Grpc::new(client.grpc());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(TICKS);
    let codec = tonic_prost::ProstCodec::<PriceRequest, PriceReply>::default();
    let stream = grpc
        .server_streaming(tonic::Request::new(request()), path, codec)
        .await?;
    let replies: Vec<_> = stream.into_inner().collect().await;
    replies
        .into_iter()
        .map(|reply| reply.map(|reply| reply.cents))
        .collect::<Result<Vec<_>, _>>()
}

#[tokio::test]
async fn tonic_clients_stream_through_the_channel_and_its_breaker() {
    let (a, b) = (Prices::default(), Prices::default());
    let client = touchy(vec![a.start().await, b.start().await]);
    for _ in 0..6 {
        assert_eq!(ticks(client.clone()).await.unwrap(), [1, 2, 3]);
    }
    assert!(a.hits() > 0 && b.hits() > 0, "balanced");

    // Both fail: trailers-only INTERNAL answers count against the service.
    a.answer(Some(tonic::Code::Internal));
    b.answer(Some(tonic::Code::Internal));
    for _ in 0..10 {
        let status = ticks(client.clone()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        if client.circuit() == CircuitState::Open {
            break;
        }
    }
    assert_eq!(client.circuit(), CircuitState::Open);
    let hits = a.hits() + b.hits();
    let status = ticks(client.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert_eq!(a.hits() + b.hits(), hits, "an open circuit sends nothing");
}

/// An instance serving TLS (an `https` URL, as a service with `[http.tls]` registers; h2
/// agreed by ALPN, as an HTTP/2-only server asks) is called over TLS when its CA is
/// trusted, unary and through the channel generated clients use; one whose certificate
/// the process does not trust is not called at all.
#[tokio::test]
async fn https_instances_are_called_over_tls() {
    let prices = Prices::default();
    let backend = prices.start().await;
    let backend = backend.trim_start_matches("http://").parse().unwrap();
    let ca = keel_testkit::tls::TestCa::new();
    let front = keel_testkit::tls::TlsFront::h2_to(&ca, backend).await;
    let stranger =
        keel_testkit::tls::TlsFront::h2_to(&keel_testkit::tls::TestCa::new(), backend).await;
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();

    let client = touchy(vec![front.url()]);
    let reply: PriceReply = client.unary(PRICE, request()).await.unwrap();
    assert_eq!(reply.cents, 1250);
    assert_eq!(ticks(client).await.unwrap(), [1, 2, 3]);
    assert_eq!(prices.hits(), 2);

    let untrusted = touchy(vec![stranger.url()]);
    let error = untrusted
        .unary::<_, PriceReply>(PRICE, request())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            CallError::Unavailable { .. }
                | CallError::Status {
                    code: tonic::Code::Unavailable,
                    ..
                }
        ),
        "{error}"
    );
    assert_eq!(prices.hits(), 2, "nothing passed the failed handshake");
}
