//! Forwarding one request: body limits, the circuit breaker, balancing, attempts with
//! retries on other instances, outlier detection, and the upstream response's way back.

use std::error::Error as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;
use keel_runtime::Problem;
use smallvec::SmallVec;

use crate::auth::ClaimHeaders;
use crate::balance::{BalanceConfig, EndpointSet, HashKeyConfig};
use crate::breaker::Refusal;
use crate::config::UpstreamProtocol;
use crate::endpoint::{instant_at, nanos, nanos_at, now_nanos};
use crate::proxy::{Arrival, Attempts, ClientInfo, Forward, Shared};
use crate::retry::is_idempotent;
use crate::upstream::{UpstreamError, UpstreamRequest};

/// How an attempt reaches its upstream: plain HTTP/1.1 with a body known in full goes on
/// the gateway's own pool, straight from the outgoing request (nothing copied); streamed
/// bodies, upgrades and HTTP/2 on hyper's client.
// One per attempt, inside the attempt's future: boxing the large variant would only add
// an allocation.
#[allow(clippy::large_enum_variant)]
enum Via<'a> {
    Pool(&'a http::uri::Authority, &'a Bytes),
    Hyper(http::Request<Body>),
}

/// Per-upstream metric handles, registered when a generation is built.
pub(crate) struct UpstreamMetrics {
    /// Attempts by outcome: 1xx … 5xx, then transport errors (refused, reset, timeout).
    attempts: [metrics::Counter; 6],
    duration: metrics::Histogram,
}

impl UpstreamMetrics {
    pub(crate) fn new(upstream: &str) -> Self {
        let attempts = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"].map(|outcome| {
            metrics::counter!(
                "keel_gateway_upstream_attempts_total",
                "upstream" => upstream.to_owned(),
                "outcome" => outcome
            )
        });
        Self {
            attempts,
            duration: keel_runtime::metrics::duration_histogram(
                "keel_gateway_upstream_duration_seconds",
                vec![("upstream", upstream.to_owned())],
            ),
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What one attempt came to.
enum Outcome {
    Answered(Response),
    /// The connection could not be made: nothing reached the upstream.
    ConnectFailed(Problem),
    Failed(Problem),
    TimedOut(Problem),
}

/// The headers the gateway adds to a forwarded request (`x-forwarded-*` and the verified
/// claims), kept beside the client's map instead of inserted into it: an insert hashes the
/// name and probes the map, seven times a request, a measurable share of the gateway's
/// work. The map then holds none of these names. An exchange on the gateway's own
/// HTTP/1.1 pool writes them after the map's fields; a request for hyper's client gets
/// them appended to its map. A route with request header rules has them merged into the
/// map first, so that its rules see them.
#[derive(Default)]
pub(crate) struct Added {
    /// Values of [`FORWARDED`].
    forwarded: [Option<HeaderValue>; 3],
    claims: Option<Arc<ClaimHeaders>>,
}

static FORWARDED: [HeaderName; 3] = [X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO];

impl Added {
    /// The headers, in a fixed order.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        FORWARDED
            .iter()
            .zip(&self.forwarded)
            .filter_map(|(name, value)| Some((name, value.as_ref()?)))
            .chain(self.claims.iter().flat_map(|claims| claims.fields()))
    }

    /// The value of the header named `name` (in any case).
    pub(crate) fn get(&self, name: &str) -> Option<&HeaderValue> {
        crate::auth::field(self.fields(), name)
    }

    /// Appends them to `headers`, which holds none of them.
    fn append_to(&self, headers: &mut HeaderMap) {
        for (name, value) in self.fields() {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The request as it goes upstream, reusable across attempts.
struct Outgoing {
    method: Method,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    /// Sent after `headers`.
    added: Added,
    /// The whole body when it is small enough to send again.
    replay: Option<Bytes>,
    /// Otherwise the streaming body, for the first attempt only.
    stream: Option<Body>,
    /// Whether the streaming body's reader is waiting on the client ([`Tracked`]).
    awaited: Option<Arc<AtomicBool>>,
    /// The client connection's upgrade (WebSocket and the like), when it asked for one.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// A request's time in [`now_nanos`]: integers, because `Instant` arithmetic was a
/// measurable share of a request (ARCHITECTURE.md, "Time").
struct Clock {
    /// When the next attempt starts; after an attempt, when it ended.
    now: u64,
    /// When the route's timeout runs out.
    deadline: u64,
}

impl Forward {
    pub(crate) async fn forward(
        &self,
        shared: &Shared,
        parts: Parts,
        body: Body,
        params: &[(String, String)],
        arrival: Arrival<'_>,
        claims: Option<Arc<ClaimHeaders>>,
    ) -> Result<(Response, Attempts), Problem> {
        let started = arrival.received;
        // Read before the forwarding headers are taken out of the map, and only for a
        // route that hashes by it (behind trusted proxies it is a walk of the chain).
        let client_ip = matches!(self.balance, BalanceConfig::Hash(HashKeyConfig::ClientIp))
            .then(|| arrival.client.address(&parts.headers));
        let deadline = started + self.timeout;
        let (mut outgoing, unread) = self
            .outgoing(parts, body, params, arrival.client, claims)
            .map_err(|problem| *problem)?;
        if let Some(body) = unread {
            // Within the route's time: a client that announced a body and sends it slowly
            // (or never) holds nothing of the upstream's, and is told it was too slow.
            let read = tokio::time::timeout_at(deadline.into(), self.read_whole(body)).await;
            outgoing.replay = Some(read.map_err(|_| self.body_too_slow())??);
        }

        // The arrival, in `now_nanos`: the breaker admits and the deadline counts from it.
        let now = nanos_at(started);
        let permit = match self.breaker.acquire(deadline, now).await {
            Ok(permit) => permit,
            Err(refusal) => return Err(self.refused(refusal)),
        };
        // A fresh reading for the first attempt: since the request arrived, its body may
        // have trickled in, its token's keys been fetched, or the breaker queued it.
        let mut clock = Clock {
            now: now_nanos(),
            deadline: now.saturating_add(nanos(self.timeout)),
        };
        self.budget.deposit_at(clock.now / 1_000_000_000);
        let set = self.endpoints(shared);
        if set.is_empty() {
            return Err(Problem::unavailable(format!(
                "route {:?}: {} has no passing instance",
                self.route, self.target
            ))
            .with_retry_after(Duration::from_secs(1)));
        }
        let hash = match &self.balance {
            BalanceConfig::Hash(key) => key.hash(
                &outgoing.headers,
                |name| outgoing.added.get(name),
                client_ip,
            ),
            _ => None,
        };
        let idempotent = is_idempotent(&outgoing.method);
        // Inline: most requests try one endpoint, and this runs for every request.
        let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
        let mut retries = 0;
        let mut last = None;
        let outcome = loop {
            let Some(index) = set.pick(&self.balance, hash, &tried, clock.now) else {
                break last;
            };
            tried.push(index);
            // The last possible attempt takes the headers instead of copying them.
            let final_attempt = outgoing.replay.is_none()
                || retries >= self.retry.attempts
                || tried.len() == set.endpoints.len();
            let outcome = self
                .attempt(
                    shared,
                    &set,
                    index,
                    &mut outgoing,
                    &mut clock,
                    final_attempt,
                )
                .await;
            let retry = match &outcome {
                Outcome::Answered(response) => {
                    idempotent && self.retry.retries_status(response.status().as_u16())
                }
                Outcome::ConnectFailed(_) => true,
                Outcome::Failed(_) | Outcome::TimedOut(_) => idempotent,
            };
            let replayable = outgoing.replay.is_some();
            let another = tried.len() < set.endpoints.len();
            if !(retry && replayable && another && retries < self.retry.attempts)
                || clock.now >= clock.deadline
                || !self.budget.withdraw()
            {
                break Some(outcome);
            }
            retries += 1;
            metrics::counter!("keel_gateway_retries_total", "route" => self.route.clone())
                .increment(1);
            let pause = self.retry.backoff(retries);
            if clock.now.saturating_add(nanos(pause)) >= clock.deadline {
                break Some(outcome);
            }
            last = Some(outcome);
            tokio::time::sleep(pause).await;
            clock.now = now_nanos();
        };
        // Its last use: emptied, the map holds a later message's headers.
        crate::h1::give_map(std::mem::take(&mut outgoing.headers));
        let result = match outcome {
            Some(Outcome::Answered(response)) => Ok(response),
            Some(
                Outcome::ConnectFailed(problem)
                | Outcome::Failed(problem)
                | Outcome::TimedOut(problem),
            ) => Err(problem),
            None => Err(Problem::unavailable(format!(
                "route {:?}: every instance of {} was tried",
                self.route, self.target
            ))),
        };
        let success = match &result {
            Ok(response) => !response.status().is_server_error(),
            Err(_) => false,
        };
        permit.record(success, clock.now);
        result.map(|mut response| {
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let upstream_upgrade = switching
                .then(|| {
                    response
                        .extensions_mut()
                        .remove::<hyper::upgrade::OnUpgrade>()
                })
                .flatten();
            let (mut parts, body) = response.into_parts();
            match (outgoing.upgrade.take(), upstream_upgrade) {
                (Some(client), Some(upstream)) => {
                    // Keep `connection: upgrade` and `upgrade` on the 101 so the client
                    // switches too, then splice the connections.
                    let protocol = parts.headers.remove(header::UPGRADE);
                    strip_hop_by_hop(&mut parts.headers);
                    if let Some(protocol) = protocol {
                        parts.headers.insert(header::UPGRADE, protocol);
                        parts
                            .headers
                            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    }
                    tokio::spawn(splice(client, upstream, self.route.clone()));
                }
                _ => strip_hop_by_hop(&mut parts.headers),
            }
            self.response_headers.apply(&mut parts.headers);
            // The endpoint of the last attempt is the one that answered.
            let attempts = Attempts {
                endpoint: tried
                    .last()
                    .map_or_else(|| Arc::from(""), |&i| Arc::clone(&set.endpoints[i].id)),
                retries,
            };
            (Response::from_parts(parts, body), attempts)
        })
    }

    /// Builds the upstream request's reusable parts, enforcing the body limit; with the
    /// body to read whole for replay, if there is one. Not async: most requests have no
    /// body, and an async layer moves the request once more.
    fn outgoing(
        &self,
        mut parts: Parts,
        body: Body,
        params: &[(String, String)],
        client: &ClientInfo,
        claims: Option<Arc<ClaimHeaders>>,
    ) -> Result<(Outgoing, Option<Limited<Body>>), Box<Problem>> {
        let too_large = || self.too_large();
        let seen = Seen::scan(&parts.headers);
        let length = seen.content_length;
        if length.is_some_and(|length| length > self.max_body_bytes) {
            return Err(Box::new(too_large()));
        }
        let path = self.path.apply(parts.uri.path(), params);
        let path_and_query = match (path, parts.uri.path_and_query()) {
            // Unchanged: the request's own (shared, already validated) target.
            (std::borrow::Cow::Borrowed(same), Some(original)) if same == original.path() => {
                original.clone()
            }
            (path, _) => crate::path::with_query(&path, parts.uri.query())?,
        };

        let headers = &mut parts.headers;
        let upgrade_to = if seen.connection {
            requested_upgrade(headers)
        } else {
            None
        };
        if seen.hop_by_hop {
            strip_hop_by_hop(headers);
        }
        if parts.version == http::Version::HTTP_2 {
            join_cookie_crumbs(headers);
        }
        if seen.te_trailers {
            // gRPC needs `te: trailers` end to end; it is the one TE value worth passing.
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // An upgrade is hop-by-hop too, but the gateway takes part in it: it asks the
        // upstream for the same protocol and splices the two connections once both agree.
        let upgrade = match upgrade_to {
            Some(protocol) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, protocol);
                parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
            }
            None => None,
        };
        let forwarded_for = if seen.forwarded_for {
            // Every field of the chain in order, as bytes, then the peer: a proxy in front
            // may have added a field of its own rather than extend the client's, and what
            // follows an entry that is not text still counts. Dropping either would let
            // the client's own entries pass for the proxy's to whoever reads the chain
            // from the right.
            let mut chain = Vec::with_capacity(64);
            for value in headers.get_all(X_FORWARDED_FOR) {
                if !value.is_empty() {
                    chain.extend_from_slice(value.as_bytes());
                    chain.extend_from_slice(b", ");
                }
            }
            headers.remove(X_FORWARDED_FOR);
            chain.extend_from_slice(client.ip_header.as_bytes());
            HeaderValue::from_bytes(&chain).ok()
        } else {
            // The connection's own formatted address, shared by its requests.
            Some(client.ip_header.clone())
        };
        if seen.forwarded_host_or_proto {
            // The client's copies are replaced.
            headers.remove(X_FORWARDED_HOST);
            headers.remove(X_FORWARDED_PROTO);
        }
        let host_field = if seen.host {
            headers.remove(header::HOST)
        } else {
            None
        };
        // The host the client asked for, as routing took it: the target's authority
        // (HTTP/2's `:authority`, an absolute-form target) before the `Host` field.
        let forwarded_host = match parts.uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => host_field,
        };
        let proto = if client.secure { "https" } else { "http" };
        let added = Added {
            forwarded: [
                forwarded_for,
                forwarded_host,
                Some(HeaderValue::from_static(proto)),
            ],
            claims,
        };
        let added = if self.request_headers.is_empty() {
            added
        } else {
            added.append_to(headers);
            self.request_headers.apply(headers);
            Added::default()
        };
        if keel_runtime::telemetry::exporting_traces() {
            keel_runtime::trace_context::inject_current(headers);
        }

        let empty =
            length == Some(0) || (length.is_none() && http_body::Body::is_end_stream(&body));
        let small = length.is_some_and(|length| length <= self.retry.buffer_bytes as u64);
        let limited = Limited::new(
            body,
            usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
        );
        let mut awaited = None;
        let (replay, stream, unread) = if empty {
            (Some(Bytes::new()), None, None)
        } else if small && self.retry.attempts > 0 {
            (None, None, Some(limited))
        } else {
            let waiting = Arc::new(AtomicBool::new(false));
            awaited = Some(Arc::clone(&waiting));
            (
                None,
                Some(Body::new(Tracked {
                    body: limited,
                    awaited: waiting,
                })),
                None,
            )
        };
        let outgoing = Outgoing {
            method: parts.method,
            path_and_query,
            headers: parts.headers,
            added,
            replay,
            stream,
            awaited,
            upgrade,
        };
        Ok((outgoing, unread))
    }

    /// A small body, read whole so that retries can send it again.
    async fn read_whole(&self, body: Limited<Body>) -> Result<Bytes, Problem> {
        let collected = body.collect().await.map_err(|error| {
            if error.is::<LengthLimitError>() {
                self.too_large()
            } else {
                Problem::bad_request("the request body could not be read")
            }
        })?;
        Ok(collected.to_bytes())
    }

    async fn attempt(
        &self,
        shared: &Shared,
        set: &EndpointSet,
        index: usize,
        outgoing: &mut Outgoing,
        clock: &mut Clock,
        final_attempt: bool,
    ) -> Outcome {
        let start = clock.now;
        let endpoint = &set.endpoints[index];
        let via = match (self.protocol, endpoint.base.authority(), &outgoing.replay) {
            // Keel's own pool speaks plain HTTP; https goes through hyper's client.
            (UpstreamProtocol::Http1, Some(authority), Some(body))
                if outgoing.upgrade.is_none() && endpoint.base.scheme_str() == Some("http") =>
            {
                Via::Pool(authority, body)
            }
            _ => match self.hyper_request(endpoint, outgoing, final_attempt) {
                Some(request) => Via::Hyper(request),
                None => return Outcome::Failed(Problem::internal("bad upstream URI")),
            },
        };

        let left = Duration::from_nanos(clock.deadline.saturating_sub(start));
        let (budget, per_try) = match self.retry.per_try_timeout {
            Some(per_try) if per_try < left => (per_try, true),
            _ => (left, false),
        };
        let in_flight = endpoint.stats.start();
        let answer = match via {
            Via::Pool(authority, body) => {
                let request = UpstreamRequest {
                    method: &outgoing.method,
                    target: &outgoing.path_and_query,
                    headers: &outgoing.headers,
                    added: &outgoing.added,
                    body,
                };
                // The pool bounds the exchange with the connection's own timer, and a
                // new connection's connect with the same deadline.
                let deadline = instant_at(start.saturating_add(nanos(budget)));
                shared.http1.send(authority, request, start, deadline).await
            }
            Via::Hyper(request) => {
                let send = shared.client(self.protocol).request(request);
                match tokio::time::timeout(budget, send).await {
                    Ok(answer) => answer
                        .map(|response| response.map(Body::new))
                        .map_err(UpstreamError::Pooled),
                    Err(_) => Err(UpstreamError::TimedOut),
                }
            }
        };
        drop(in_flight);
        let ended = now_nanos();
        clock.now = ended;
        let took = Duration::from_nanos(ended.saturating_sub(start));
        let base = &endpoint.base;
        let outcome = match answer {
            Ok(response) => {
                endpoint.stats.observe_latency(took, ended);
                Outcome::Answered(response)
            }
            // Waiting on the client's body when time ran out: the client is slow, not
            // the instance (an instance that does not take the body, or cannot be
            // reached, leaves it unasked, and is the one that timed out).
            Err(UpstreamError::TimedOut)
                if outgoing
                    .awaited
                    .as_ref()
                    .is_some_and(|waiting| waiting.load(Ordering::Acquire)) =>
            {
                let response = self
                    .body_too_slow()
                    .with_source(crate::proxy::SOURCE)
                    .into_response();
                return Outcome::Answered(response);
            }
            Err(UpstreamError::TimedOut) => {
                let limit = if per_try {
                    format!("the per-try timeout of {budget:?}")
                } else {
                    format!("the route's timeout of {:?}", self.timeout)
                };
                Outcome::TimedOut(self.timed_out(&format!("{base} did not answer within {limit}")))
            }
            Err(error) => {
                let causes = || std::iter::successors(error.source(), |e| (*e).source());
                // The client's body failing (too large, or malformed chunks) is the client's
                // fault, not the instance's: answered as such, no retry, no ejection.
                let client_fault = if causes().any(|e| e.is::<LengthLimitError>()) {
                    Some(self.too_large())
                } else if causes().any(|e| {
                    e.downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_user)
                }) {
                    Some(Problem::bad_request("the request body could not be read"))
                } else {
                    None
                };
                if let Some(problem) = client_fault {
                    let response = problem.with_source(crate::proxy::SOURCE).into_response();
                    return Outcome::Answered(response);
                }
                let problem = Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream-unavailable",
                    "Bad gateway",
                )
                .with_detail(format!("route {:?}: {base}: {error}", self.route));
                if error.is_connect() {
                    Outcome::ConnectFailed(problem)
                } else {
                    Outcome::Failed(problem)
                }
            }
        };
        let class = match &outcome {
            Outcome::Answered(response) => {
                usize::from(response.status().as_u16() / 100).clamp(1, 5) - 1
            }
            _ => 5,
        };
        self.upstream_metrics.attempts[class].increment(1);
        self.upstream_metrics.duration.record(took.as_secs_f64());
        if class >= 4 {
            self.record_failure(set, index, ended);
        } else {
            endpoint.stats.record_success();
        }
        outcome
    }

    /// The attempt's request for hyper's client: absolute URI, the body (streamed ones
    /// only once), and the headers, taken instead of copied on the last possible attempt.
    /// `None` when the endpoint and target make no URI.
    fn hyper_request(
        &self,
        endpoint: &crate::endpoint::Endpoint,
        outgoing: &mut Outgoing,
        final_attempt: bool,
    ) -> Option<http::Request<Body>> {
        let body = match (&outgoing.replay, outgoing.stream.take()) {
            (Some(bytes), _) if bytes.is_empty() => Body::empty(),
            (Some(bytes), _) => Body::from(bytes.clone()),
            (None, Some(stream)) => stream,
            (None, None) => Body::empty(),
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = endpoint.base.scheme().cloned();
        uri.authority = endpoint.base.authority().cloned();
        uri.path_and_query = Some(outgoing.path_and_query.clone());
        let uri = Uri::from_parts(uri).ok()?;
        let mut request = http::Request::new(body);
        *request.method_mut() = outgoing.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = match self.protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => Version::HTTP_2,
        };
        *request.headers_mut() = if final_attempt {
            std::mem::take(&mut outgoing.headers)
        } else {
            outgoing.headers.clone()
        };
        outgoing.added.append_to(request.headers_mut());
        Some(request)
    }

    /// Counts a failure at `now` (of [`now_nanos`]) and ejects the endpoint when it has
    /// failed too often in a row, unless the service already has its share of instances
    /// ejected.
    fn record_failure(&self, set: &EndpointSet, index: usize, now: u64) {
        let endpoint = &set.endpoints[index];
        if !endpoint.stats.record_failure(&self.outlier) {
            return;
        }
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.stats.is_ejected(now))
            .count();
        if ejected >= self.outlier.ejection_allowance(set.endpoints.len()) {
            return;
        }
        let duration = endpoint.stats.eject(&self.outlier, now);
        metrics::counter!("keel_gateway_ejections_total", "upstream" => self.target.clone())
            .increment(1);
        tracing::warn!(
            upstream = %self.target,
            instance = %endpoint.id,
            ?duration,
            "instance ejected after consecutive failures"
        );
    }

    fn refused(&self, refusal: Refusal) -> Problem {
        // A queue wait that ran out is a timeout, not the breaker's refusal.
        if refusal != Refusal::TimedOut {
            metrics::counter!("keel_gateway_circuit_refusals_total", "upstream" => self.target.clone())
                .increment(1);
        }
        match refusal {
            Refusal::Open(after) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit-open",
                "Circuit open",
            )
            .with_detail(format!(
                "route {:?}: the circuit to {} is open after repeated failures",
                self.route, self.target
            ))
            .with_retry_after(after.max(Duration::from_secs(1))),
            Refusal::Saturated => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-saturated",
                "Upstream saturated",
            )
            .with_detail(format!(
                "route {:?}: {} has its maximum of requests in flight and queued",
                self.route, self.target
            ))
            .with_retry_after(Duration::from_secs(1)),
            Refusal::TimedOut => self.timed_out("waited for a free slot"),
        }
    }

    fn body_too_slow(&self) -> Problem {
        Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-too-slow",
            "Request body too slow",
        )
        .with_detail(format!(
            "route {:?}: the request's body did not arrive within its {} ms",
            self.route,
            self.timeout.as_millis()
        ))
    }

    fn too_large(&self) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
        )
        .with_detail(format!(
            "route {:?} accepts bodies up to {} bytes",
            self.route, self.max_body_bytes
        ))
    }

    fn timed_out(&self, what: &str) -> Problem {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "Upstream timeout",
        )
        .with_detail(format!("route {:?}: {what}", self.route))
    }
}

/// The protocol a request asks to switch to (`connection: upgrade` with `upgrade: …`),
/// when it is WebSocket. Any other (`h2c` above all) is not asked of the upstream: a
/// switched connection is spliced as raw bytes, so an upstream that agreed would take
/// requests for any path on it, past the gateway's routes and their policy ("h2c
/// smuggling"). As Envoy's `upgrade_configs`, which know `websocket` alone by default.
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE).filter(|_| asks)?;
    protocol
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"websocket")
        .then(|| protocol.clone())
}

/// A streamed request body that says whether its reader is waiting on the client, so
/// that a timeout then is put down to the client.
struct Tracked {
    body: Limited<Body>,
    /// Asked for a frame the client has not sent yet (not: never asked, the last frame
    /// came when asked, or read to its end).
    awaited: Arc<AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = <Limited<Body> as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.awaited.store(polled.is_pending(), Ordering::Release);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// HTTP/2 clients may split `cookie` into one field per cookie; RFC 9113 §8.2.3 has them
/// joined with `; ` before the request goes on over HTTP/1.1, where servers read one
/// `cookie` field (and many take only the first).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let crumbs = headers.get_all(header::COOKIE);
    if crumbs.iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in crumbs {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, joined);
    }
}

/// Copies bytes both ways between an upgraded client connection and the upstream's until
/// either side closes.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    route: String,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%route, %error, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%route, %error, "upgraded connection ended with an error");
    }
}

/// Whether `name` is hop-by-hop in itself (RFC 9110 §7.6.1), or `Expect`, which the
/// client's side has already answered (the upstream gets the body without waiting);
/// matched once rather than compared with every such name.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "expect"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

/// What a request's headers hold that forwarding acts on, found in one scan of them
/// instead of a lookup for each (most requests hold none of it).
#[derive(Default)]
struct Seen {
    /// The first `content-length`, when it is a number.
    content_length: Option<u64>,
    /// The first `te` is `trailers`.
    te_trailers: bool,
    connection: bool,
    hop_by_hop: bool,
    forwarded_for: bool,
    /// `x-forwarded-host` or `x-forwarded-proto`.
    forwarded_host_or_proto: bool,
    host: bool,
}

impl Seen {
    fn scan(headers: &HeaderMap) -> Self {
        let mut seen = Self::default();
        let (mut length_seen, mut te_seen) = (false, false);
        for (name, value) in headers {
            if *name == header::CONTENT_LENGTH {
                if !length_seen {
                    length_seen = true;
                    seen.content_length = value.to_str().ok().and_then(|v| v.parse().ok());
                }
            } else if *name == header::HOST {
                seen.host = true;
            } else if *name == X_FORWARDED_FOR {
                seen.forwarded_for = true;
            } else if *name == X_FORWARDED_HOST || *name == X_FORWARDED_PROTO {
                seen.forwarded_host_or_proto = true;
            } else if is_hop_by_hop(name) {
                seen.hop_by_hop = true;
                if *name == header::CONNECTION {
                    seen.connection = true;
                } else if *name == header::TE && !te_seen {
                    te_seen = true;
                    seen.te_trailers = value.as_bytes().eq_ignore_ascii_case(b"trailers");
                }
            }
        }
        seen
    }
}

/// Removes hop-by-hop headers ([`is_hop_by_hop`]) and those the `Connection` header
/// names: they are never forwarded in either direction.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One scan of the names present; most messages carry none.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut doomed: SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
    );
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "secret"),
            ("te", "gzip"),
            ("expect", "100-continue"),
            ("proxy-authorization", "Basic abc"),
            ("x-kept", "1"),
            ("content-type", "text/plain"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);

        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }
}
