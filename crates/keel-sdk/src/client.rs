//! Resilient HTTP calls to another service by name.
//!
//! A [`ServiceClient`] finds the service's instances in the registry client's live view
//! (or a static list), picks one by power of two choices over a peak-EWMA cost, and wraps
//! each call in the same machinery as the gateway's forwarding (`keel_runtime::resilience`):
//! an overall deadline and a per-try timeout; retries on another instance, of idempotent
//! requests after 502/503/504, a timeout or a broken connection, and of any request whose
//! connection failed before it was sent, bounded by a retry budget and spaced by jittered
//! backoff; passive outlier ejection; a circuit breaker whose concurrency limit and bounded
//! queue are the bulkhead. Calls carry the current `traceparent` and `x-request-id`.
//! Failures are typed ([`CallError`]) so callers can decide what to do.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use keel_registry::client::DiscoveryView;
use keel_registry::model::Instance;
use keel_runtime::resilience::balance::{BalanceConfig, EndpointSet};
use keel_runtime::resilience::breaker::{BreakerConfig, CircuitBreaker, CircuitState, Refusal};
use keel_runtime::resilience::endpoint::{Endpoint, OutlierConfig, StatsDirectory, now_nanos};
use keel_runtime::resilience::retry::{RetryBudget, RetryConfig, is_idempotent};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long an unused pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// How a client calls one service.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of a whole call, retries and queueing included.
    pub timeout: Duration,
    /// `retry.per_try_timeout` bounds each attempt (none: only `timeout`).
    pub retry: RetryConfig,
    /// `max_concurrent` and `max_pending` are the bulkhead.
    pub breaker: BreakerConfig,
    pub outlier: OutlierConfig,
    /// Largest response body read into memory by [`ServiceClient::call`].
    pub max_body_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retry: RetryConfig {
                per_try_timeout: Some(Duration::from_secs(3)),
                ..RetryConfig::default()
            },
            breaker: BreakerConfig::default(),
            outlier: OutlierConfig::default(),
            max_body_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Where a service's instances come from.
#[derive(Clone)]
pub enum Instances {
    /// The registry client's live view of passing instances.
    Registry(DiscoveryView),
    /// A fixed list of base URLs (`http://host:port`).
    Static(Vec<String>),
}

/// Why a call did not get a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{service}: no answer within {timeout:?}")]
    Timeout { service: String, timeout: Duration },
    #[error("{service} is unavailable: {reason}")]
    Unavailable {
        service: String,
        reason: String,
        /// Whether any instance was tried (false: none was known).
        reached: bool,
    },
    /// The answer was larger than `max_body_bytes` (it is not retried: the call may have
    /// done its work).
    #[error("{service}: the answer is larger than {limit} bytes")]
    TooLarge { service: String, limit: usize },
    #[error("{service}: the circuit is open; try again in {retry_after:?}")]
    CircuitOpen {
        service: String,
        retry_after: Duration,
    },
    #[error("{service}: too many calls in flight and queued (bulkhead)")]
    Saturated { service: String },
    /// The service answered with a server error (after any retries).
    #[error("{service} answered {}", answer.status)]
    Upstream {
        service: String,
        answer: Box<Answer>,
    },
    /// A gRPC status other than OK (after any retries).
    #[error("{service} answered {code:?}: {message}")]
    Status {
        service: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{service}: the answer is not what was expected: {reason}")]
    Decode { service: String, reason: String },
    #[error("the request cannot be built: {0}")]
    Request(String),
}

/// A call's answer, body read.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A request to send: method, path (with query) and optional body; built by the
/// [`ServiceClient`] helpers or by hand.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    pub fn new(method: Method, path: &str) -> Self {
        Self {
            method,
            path: path.to_owned(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    pub fn json(mut self, body: &impl Serialize) -> Result<Self, CallError> {
        self.body = serde_json::to_vec(body)
            .map_err(|error| CallError::Request(error.to_string()))?
            .into();
        self.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(self)
    }

    /// `Authorization: Bearer <token>`: the caller's token passed on, or the service's
    /// own.
    pub fn bearer(mut self, token: &str) -> Result<Self, CallError> {
        let value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| CallError::Request("the token is not a header value".into()))?;
        self.headers.insert(http::header::AUTHORIZATION, value);
        Ok(self)
    }
}

/// Calls one service. Cheap to clone; clones share breaker, budget and statistics.
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

struct Inner {
    service: String,
    source: Source,
    http: reqwest::Client,
    options: ClientOptions,
    breaker: Arc<CircuitBreaker>,
    budget: RetryBudget,
    stats: StatsDirectory,
    /// gRPC channels by instance base URL.
    channels: Mutex<std::collections::HashMap<String, tonic::transport::Channel>>,
    /// What they connect with: TCP, and TLS asking for h2 to `https` instances.
    grpc_connector: HttpsConnector<HttpConnector>,
}

/// A [`ServiceClient`] as a tonic channel; see [`ServiceClient::grpc`].
#[derive(Clone)]
pub struct GrpcChannel {
    client: ServiceClient,
}

impl tower::Service<http::Request<tonic::body::Body>> for GrpcChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, tonic::Status>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), tonic::Status>> {
        // Readiness is per instance, known once one is picked.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            use tower::ServiceExt;

            let inner = &client.inner;
            let unavailable = |error: &dyn std::fmt::Display| {
                tonic::Status::unavailable(format!("{}: {error}", inner.service))
            };
            propagate(request.headers_mut());
            // The caller's own deadline when it set one (a long upload sets a long one).
            let timeout = request
                .headers()
                .get("grpc-timeout")
                .and_then(|value| grpc_timeout(value.to_str().ok()?))
                .unwrap_or(inner.options.timeout);
            let started = Instant::now();
            let deadline = started + timeout;
            let permit = match inner.breaker.acquire(deadline, now_nanos()).await {
                Ok(permit) => permit,
                Err(Refusal::TimedOut) => {
                    return Err(tonic::Status::deadline_exceeded(format!(
                        "{}: no slot within {timeout:?} (bulkhead)",
                        inner.service
                    )));
                }
                Err(refusal) => return Err(unavailable(&client.refused(refusal))),
            };
            // Time spent queueing for a slot is not the instance's to answer for, unless
            // it has not answered since its last failure (see `attempts`).
            let queued = started.elapsed() > Duration::from_millis(1);
            let set = client.endpoints();
            let Some(index) = set.pick(&BalanceConfig::LeastRequest, None, &[], now_nanos()) else {
                return Err(unavailable(&"no instance is registered and passing"));
            };
            let endpoint = &set.endpoints[index];
            let queued = queued && !endpoint.stats.failing();
            let answered = {
                let _in_flight = endpoint.stats.start();
                let sent = Instant::now();
                let remaining = deadline.saturating_duration_since(Instant::now());
                // Until the response's head: a stream may then run as long as it needs.
                let call = client.channel(endpoint).oneshot(request);
                let answered = tokio::time::timeout(remaining, call).await;
                endpoint.stats.observe_latency(sent.elapsed(), now_nanos());
                answered
            };
            match answered {
                Ok(Ok(response)) => {
                    // A status in the head is a trailers-only answer: the call is over. A
                    // head that is not HTTP 200 never came from a gRPC server (a proxy's
                    // 502, say). A failure reported later, in the trailers, is not seen.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
                        .map(tonic::Code::from_i32);
                    let failed = response.status() != http::StatusCode::OK
                        || code.is_some_and(instance_failure);
                    if failed {
                        client.failed(&set, endpoint);
                    } else {
                        endpoint.stats.record_success();
                    }
                    permit.record(!failed, now_nanos());
                    Ok(response.map(tonic::body::Body::new))
                }
                Ok(Err(error)) => {
                    client.failed(&set, endpoint);
                    permit.record(false, now_nanos());
                    Err(unavailable(&error))
                }
                Err(_elapsed) => {
                    if !queued {
                        client.failed(&set, endpoint);
                    }
                    permit.record(queued, now_nanos());
                    Err(tonic::Status::deadline_exceeded(format!(
                        "{}: no answer within {timeout:?}",
                        inner.service
                    )))
                }
            }
        })
    }
}

/// A `grpc-timeout` header's value (`<digits><unit>`, gRPC over HTTP/2).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    let amount: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// gRPC statuses that say the instance failed, not that the request was wrong.
fn instance_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DataLoss
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
    )
}

/// How one attempt ended, as the retry loop judges it.
enum Tried<T> {
    /// The answer to return.
    Answer(T),
    /// The instance failed: counted against it, and tried elsewhere when `retriable`.
    Failed { retriable: bool, error: CallError },
    /// An error to return that says nothing against the instance.
    Final(CallError),
}

/// Why one exchange with an instance did not give an answer.
enum SendError {
    Http(reqwest::Error),
    TooLarge,
}

impl From<reqwest::Error> for SendError {
    fn from(error: reqwest::Error) -> Self {
        Self::Http(error)
    }
}

/// An endpoint set and the instance list it was built from.
type BuiltFrom = (Arc<Vec<Instance>>, Arc<EndpointSet>);

/// An endpoint set that changes with the registry's view, or does not change.
enum Source {
    Static(Arc<EndpointSet>),
    Registry {
        view: DiscoveryView,
        /// The set built from the last instance list seen, rebuilt when it changes.
        last: Mutex<Option<BuiltFrom>>,
    },
}

impl ServiceClient {
    pub fn new(
        service: &str,
        instances: Instances,
        options: ClientOptions,
    ) -> Result<Self, CallError> {
        options
            .retry
            .validate()
            .and_then(|()| options.breaker.validate())
            .and_then(|()| options.outlier.validate())
            .map_err(CallError::Request)?;
        if options.timeout.is_zero() {
            return Err(CallError::Request("timeout must be above zero".into()));
        }
        let http = keel_runtime::http_client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Below Keel's servers' idle timeout (75 s): the pool closes its connections
            // before a server does, so none is reused just as the server closes it.
            .pool_idle_timeout(POOL_IDLE)
            .build()
            .map_err(|error| CallError::Request(error.to_string()))?;
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        let grpc_connector = keel_runtime::http_client::hyper_connector(tcp, true)
            .map_err(|error| CallError::Request(format!("TLS for gRPC: {error}")))?;
        let stats = StatsDirectory::default();
        let source = match instances {
            Instances::Static(urls) => {
                let endpoints = urls
                    .iter()
                    .map(|url| {
                        let base: http::Uri = url
                            .parse()
                            .map_err(|_| CallError::Request(format!("{url:?} is not a URL")))?;
                        Ok(Endpoint {
                            id: Arc::from(url.as_str()),
                            stats: stats.stats(&base),
                            base,
                            weight: 1,
                        })
                    })
                    .collect::<Result<Vec<_>, CallError>>()?;
                Source::Static(Arc::new(EndpointSet::new(
                    endpoints,
                    &BalanceConfig::LeastRequest,
                )))
            }
            Instances::Registry(view) => {
                view.watch(service);
                Source::Registry {
                    view,
                    last: Mutex::new(None),
                }
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                service: service.to_owned(),
                source,
                http,
                budget: RetryBudget::new(&options.retry),
                breaker: Arc::new(CircuitBreaker::new(options.breaker.clone())),
                options,
                stats,
                channels: Mutex::default(),
                grpc_connector,
            }),
        })
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The circuit's state now.
    pub fn circuit(&self) -> CircuitState {
        self.inner.breaker.state()
    }

    /// `GET path`, the JSON answer decoded.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call_json(Call::new(Method::GET, path)).await
    }

    /// `POST path` with a JSON body, the JSON answer decoded.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, CallError> {
        self.call_json(Call::new(Method::POST, path).json(body)?)
            .await
    }

    /// `call`, its JSON answer decoded.
    pub async fn call_json<T: DeserializeOwned>(&self, call: Call) -> Result<T, CallError> {
        let answer = self.call(call).await?;
        serde_json::from_slice(&answer.body).map_err(|error| CallError::Decode {
            service: self.inner.service.clone(),
            reason: error.to_string(),
        })
    }

    /// Sends `call` with deadline, retries, balancing and the breaker; any status below
    /// 500 is an answer (a 4xx is the caller's to judge), 5xx after the last attempt is
    /// [`CallError::Upstream`].
    pub async fn call(&self, mut call: Call) -> Result<Answer, CallError> {
        // Appended to the instance's base URL: anything but an absolute path (`@host`,
        // `//host`) could send the request, and its token, somewhere else.
        if !call.path.starts_with('/') || call.path.starts_with("//") {
            return Err(CallError::Request(format!(
                "the path must start with a single '/': {:?}",
                call.path.chars().take(100).collect::<String>()
            )));
        }
        propagate(&mut call.headers);
        let idempotent = is_idempotent(&call.method);
        let retry = &self.inner.options.retry;
        let call = &call;
        self.guarded(idempotent, |endpoint, _| async move {
            match self.send(&endpoint, call).await {
                Ok(answer) if answer.status.is_server_error() => Tried::Failed {
                    retriable: idempotent && retry.retries_status(answer.status.as_u16()),
                    error: self.upstream(answer),
                },
                Ok(answer) => Tried::Answer(answer),
                Err(SendError::TooLarge) => Tried::Final(CallError::TooLarge {
                    service: self.inner.service.clone(),
                    limit: self.inner.options.max_body_bytes,
                }),
                // Never sent: safe to send elsewhere whatever the method.
                Err(SendError::Http(error)) if error.is_connect() => Tried::Failed {
                    retriable: true,
                    error: self.unavailable(&keel_runtime::http_client::error_chain(&error)),
                },
                Err(SendError::Http(error)) => Tried::Failed {
                    retriable: idempotent,
                    error: self.unavailable(&keel_runtime::http_client::error_chain(&error)),
                },
            }
        })
        .await
    }

    /// Calls the unary gRPC method `path` (`/package.Service/Method`) with `request`, with
    /// the same deadline, balancing, breaker and outlier detection as [`Self::call`].
    /// Retried on another instance only when the attempt surely did nothing: the
    /// connection failed, or the instance answered `UNAVAILABLE`. A status other than OK
    /// is [`CallError::Status`].
    pub async fn unary<Req, Resp>(&self, path: &str, request: Req) -> Result<Resp, CallError>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + 'static,
    {
        let method = path
            .strip_prefix('/')
            .filter(|rest| rest.split('/').count() == 2 && !rest.contains("//"))
            .and_then(|_| http::uri::PathAndQuery::try_from(path).ok())
            .ok_or_else(|| {
                CallError::Request(format!(
                    "{path:?} is not a gRPC method path (/package.Service/Method)"
                ))
            })?;
        let mut headers = HeaderMap::new();
        propagate(&mut headers);
        let metadata = tonic::metadata::MetadataMap::from_headers(headers);
        let (method, metadata, request) = (&method, &metadata, &request);
        // Not idempotent as far as anyone knows: a timed-out call may be running still.
        self.guarded(false, |endpoint, per_try| async move {
            let mut grpc = tonic::client::Grpc::new(self.channel(&endpoint));
            if let Err(error) = grpc.ready().await {
                return Tried::Failed {
                    retriable: true,
                    error: self.unavailable(&error.to_string()),
                };
            }
            let mut call = tonic::Request::new(request.clone());
            *call.metadata_mut() = metadata.clone();
            // The instance stops too when the attempt's time is up (`grpc-timeout`).
            call.set_timeout(per_try);
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            match grpc.unary(call, method.clone(), codec).await {
                Ok(response) => Tried::Answer(response.into_inner()),
                Err(status) => {
                    let error = CallError::Status {
                        service: self.inner.service.clone(),
                        code: status.code(),
                        message: status.message().chars().take(1024).collect(),
                    };
                    match status.code() {
                        // Not done: safe to try elsewhere.
                        tonic::Code::Unavailable => Tried::Failed {
                            retriable: true,
                            error,
                        },
                        code if instance_failure(code) => Tried::Failed {
                            retriable: false,
                            error,
                        },
                        _ => Tried::Final(error),
                    }
                }
            }
        })
        .await
    }

    /// A gRPC channel to the service for tonic clients, generated ones included, and for
    /// streaming calls: each call goes to an instance picked as for [`Self::call`], under
    /// the breaker (a refusal, or no instance, is a `Status` of `UNAVAILABLE`), carrying
    /// `traceparent` and `x-request-id`. A call's body may be a stream, so it is never sent
    /// twice: retries are [`Self::unary`]'s.
    pub fn grpc(&self) -> GrpcChannel {
        GrpcChannel {
            client: self.clone(),
        }
    }

    /// Runs `attempt` on instances under the call's deadline, the breaker (one permit
    /// per call) and the retry budget.
    async fn guarded<T, F, Fut>(&self, idempotent: bool, attempt: F) -> Result<T, CallError>
    where
        F: FnMut(Endpoint, Duration) -> Fut,
        Fut: Future<Output = Tried<T>>,
    {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.options.timeout;
        let permit = inner
            .breaker
            .acquire(deadline, now_nanos())
            .await
            .map_err(|refusal| self.refused(refusal))?;
        inner.budget.deposit_at(now_nanos() / 1_000_000_000);
        let (result, blamed) = self.attempts(idempotent, deadline, attempt).await;
        let failed = match &result {
            Ok(_) | Err(CallError::TooLarge { .. }) => Some(false),
            Err(CallError::Upstream { answer, .. }) => Some(answer.status.is_server_error()),
            Err(CallError::Status { code, .. }) => Some(instance_failure(*code)),
            // Nothing reached the service (no instance known), or the call's own deadline
            // cut its only tries short (time spent queueing): not the service's failure.
            Err(CallError::Unavailable { reached: false, .. }) => None,
            Err(CallError::Timeout { .. }) if !blamed => None,
            Err(_) => Some(true),
        };
        if let Some(failed) = failed {
            permit.record(!failed, now_nanos());
        }
        result
    }

    fn refused(&self, refusal: Refusal) -> CallError {
        let service = self.inner.service.clone();
        match refusal {
            Refusal::Open(retry_after) => CallError::CircuitOpen {
                service,
                retry_after,
            },
            Refusal::Saturated => CallError::Saturated { service },
            Refusal::TimedOut => CallError::Timeout {
                service,
                timeout: self.inner.options.timeout,
            },
        }
    }

    /// The call's outcome, and whether any try failed as the instance's fault (a timeout
    /// cut short by the call's deadline is not).
    async fn attempts<T, F, Fut>(
        &self,
        idempotent: bool,
        deadline: Instant,
        mut attempt: F,
    ) -> (Result<T, CallError>, bool)
    where
        F: FnMut(Endpoint, Duration) -> Fut,
        Fut: Future<Output = Tried<T>>,
    {
        let inner = &self.inner;
        let retry = &inner.options.retry;
        // One set for the whole call: `tried` holds indexes into it.
        let set = self.endpoints();
        let mut tried = Vec::new();
        let mut last: Option<CallError> = None;
        let mut blamed = false;
        for round in 0..=retry.attempts {
            if round > 0 {
                // No instance left to try: neither a token of the budget nor a pause.
                if tried.len() >= set.endpoints.len() || !inner.budget.withdraw() {
                    break;
                }
                let pause = retry.backoff(round);
                if Instant::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            if set.is_empty() {
                let error = CallError::Unavailable {
                    service: inner.service.clone(),
                    reason: "no instance is registered and passing".to_owned(),
                    reached: false,
                };
                return (Err(error), blamed);
            }
            let now = now_nanos();
            let Some(index) = set.pick(&BalanceConfig::LeastRequest, None, &tried, now) else {
                break;
            };
            tried.push(index);
            let endpoint = &set.endpoints[index];
            let remaining = deadline.saturating_duration_since(Instant::now());
            let per_try = retry
                .per_try_timeout
                .map_or(remaining, |t| t.min(remaining));
            // A try whose time was cut short by the call's own deadline (time spent
            // queueing for a slot, or on earlier tries) says nothing about an instance
            // that answers others when it times out (overloaded, not broken); one given
            // its whole time (the per-try timeout, else the call's; a tenth spared for the
            // call's own work on a busy machine) does, and so does any try at an instance
            // that has not answered since its last failure (hung: behind a small bulkhead
            // every later call is one that queued).
            let full = retry
                .per_try_timeout
                .map_or(inner.options.timeout, |t| t.min(inner.options.timeout));
            let cut_short = per_try < full.mul_f64(0.9) && !endpoint.stats.failing();
            let outcome = {
                let _in_flight = endpoint.stats.start();
                let sent = Instant::now();
                let outcome =
                    tokio::time::timeout(per_try, attempt(endpoint.clone(), per_try)).await;
                endpoint.stats.observe_latency(sent.elapsed(), now_nanos());
                outcome
            };
            // Whether another attempt may follow, and what this one leaves as the error.
            let (retriable, error) = match outcome {
                Ok(Tried::Answer(answer)) => {
                    endpoint.stats.record_success();
                    return (Ok(answer), blamed);
                }
                Ok(Tried::Final(error)) => {
                    endpoint.stats.record_success();
                    return (Err(error), blamed);
                }
                Ok(Tried::Failed { retriable, error }) => {
                    self.failed(&set, endpoint);
                    blamed = true;
                    (retriable, error)
                }
                Err(_elapsed) => {
                    if !cut_short {
                        self.failed(&set, endpoint);
                        blamed = true;
                    }
                    let error = CallError::Timeout {
                        service: inner.service.clone(),
                        timeout: per_try,
                    };
                    (idempotent, error)
                }
            };
            last = Some(error);
            if !retriable || Instant::now() >= deadline {
                break;
            }
        }
        let error = last.unwrap_or_else(|| self.unavailable("every instance was tried"));
        (Err(error), blamed)
    }

    /// The instance's gRPC channel: HTTP/2, made on first use and kept (it reconnects by
    /// itself), shared by every call to the instance.
    fn channel(&self, endpoint: &Endpoint) -> tonic::transport::Channel {
        let key = endpoint.base.to_string();
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if channels.len() > 256 {
            // Instances come and go: forget the channels of the ones no longer listed.
            let listed: Vec<String> = self
                .endpoints()
                .endpoints
                .iter()
                .map(|e| e.base.to_string())
                .collect();
            channels.retain(|base, _| listed.contains(base));
        }
        channels
            .entry(key)
            .or_insert_with(|| {
                let endpoint = tonic::transport::Endpoint::from(endpoint.base.clone())
                    .connect_timeout(Duration::from_secs(2));
                // tonic has no TLS of its own here: `https` instances (a service serving
                // TLS) are spoken to by the connector every Keel client uses, h2 by ALPN.
                endpoint.connect_with_connector_lazy(self.inner.grpc_connector.clone())
            })
            .clone()
    }

    async fn send(&self, endpoint: &Endpoint, call: &Call) -> Result<Answer, SendError> {
        let base = endpoint.base.to_string();
        let url = format!("{}{}", base.trim_end_matches('/'), call.path);
        let limit = self.inner.options.max_body_bytes;
        let mut response = self
            .inner
            .http
            .request(call.method.clone(), url)
            .headers(call.headers.clone())
            .body(call.body.clone())
            .send()
            .await?;
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(SendError::TooLarge);
        }
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > limit {
                return Err(SendError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            headers,
            body: body.into(),
        })
    }

    /// Counts a failure of `endpoint`, ejecting it when it failed too often and the set
    /// can spare it.
    fn failed(&self, set: &EndpointSet, endpoint: &Endpoint) {
        let outlier = &self.inner.options.outlier;
        if endpoint.stats.record_failure(outlier) {
            let now = now_nanos();
            let ejected = set
                .endpoints
                .iter()
                .filter(|other| other.stats.is_ejected(now))
                .count();
            if ejected < outlier.ejection_allowance(set.endpoints.len()) {
                let duration = endpoint.stats.eject(outlier, now);
                tracing::warn!(service = %self.inner.service, instance = %endpoint.id, ?duration, "instance ejected");
            }
        }
    }

    fn unavailable(&self, reason: &str) -> CallError {
        CallError::Unavailable {
            service: self.inner.service.clone(),
            reason: reason.to_owned(),
            reached: true,
        }
    }

    fn upstream(&self, answer: Answer) -> CallError {
        CallError::Upstream {
            service: self.inner.service.clone(),
            answer: Box::new(answer),
        }
    }

    /// The instances to balance over now.
    fn endpoints(&self) -> Arc<EndpointSet> {
        let inner = &self.inner;
        let (view, last) = match &inner.source {
            Source::Static(set) => return set.clone(),
            Source::Registry { view, last } => (view, last),
        };
        let instances = view.instances(&inner.service);
        let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, set)) = last.as_ref()
            && Arc::ptr_eq(seen, &instances)
        {
            return set.clone();
        }
        let endpoints = instances
            .iter()
            .filter_map(|instance| {
                let base: http::Uri = instance.base_url().parse().ok()?;
                Some(Endpoint {
                    id: Arc::from(instance.id.as_str()),
                    stats: inner.stats.stats(&base),
                    base,
                    weight: instance.weight.max(1),
                })
            })
            .collect();
        let set = Arc::new(EndpointSet::new(endpoints, &BalanceConfig::LeastRequest));
        *last = Some((instances, set.clone()));
        set
    }
}

/// Sets `traceparent` (the current span's) and `x-request-id` (the request being served),
/// unless the caller set them.
fn propagate(headers: &mut HeaderMap) {
    if !headers.contains_key("traceparent") {
        keel_runtime::trace_context::inject_current(headers);
    }
    if !headers.contains_key("x-request-id")
        && let Some(id) = keel_runtime::http::current_request_id()
    {
        headers.insert("x-request-id", id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("7u"), Some(Duration::from_micros(7)));
        for garbage in ["", "S", "12", "1x", "-1S", "123456789S", "1.5S"] {
            assert_eq!(grpc_timeout(garbage), None, "{garbage:?}");
        }
    }
}
