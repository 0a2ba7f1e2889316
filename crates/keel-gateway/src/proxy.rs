//! One generation of the gateway's configuration, compiled: the route table and, per
//! route, what to do with a match. A reload builds a new [`Proxy`] beside the running one
//! and swaps it in; what must outlive a generation (connection pools, endpoint stats,
//! circuit breakers, retry budgets, rate limit buckets) lives in [`Shared`].
//!
//! A request passes: claim-header stripping → route match (a CORS preflight is answered
//! here) → authorization → rate limit → the action (redirect, or forward with balancing,
//! breaker and retries) → CORS and rate limit headers on the way back.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_jwt::Verifier;
use keel_registry::client::DiscoveryView;
use keel_registry::model::{Instance, validate_service_name};
use keel_runtime::http::REQUEST_ID;
use keel_runtime::{Problem, TrustedProxies};
use serde::Serialize;

use crate::auth::{Requirement, RouteAuthConfig};
use crate::balance::{BalanceConfig, EndpointSet, Fnv};
use crate::breaker::{BreakerConfig, CircuitBreaker, CircuitState};
use crate::config::{
    GatewayConfig, GatewayRouteConfig, HeaderActionsConfig, RedirectConfig, UpstreamProtocol,
};
use crate::cors::{Cors, preflight_method};
use crate::endpoint::{Endpoint, OutlierConfig, StatsDirectory, now_nanos};
use crate::forward::UpstreamMetrics;
use crate::ratelimit::{
    Decision, FailurePolicy, Limiters, LocalLimiter, RateLimitConfig, RedisLimiter,
};
use crate::retry::{RetryBudget, RetryConfig};
use crate::route::{RequestView, RouteError, RouteTable};
use crate::upstream::Http1Pool;

/// The client connection a request came on, as the listener saw it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    /// Arrived over TLS.
    pub secure: bool,
    /// The peer's IP address as a header value (`x-forwarded-for`), formatted once per
    /// connection.
    pub ip_header: HeaderValue,
    /// The trusted proxies, when the peer is one of them: the client is then the address
    /// they forwarded for, read from each request.
    proxies: Option<Arc<TrustedProxies>>,
}

impl ClientInfo {
    pub fn new(peer: SocketAddr, secure: bool, proxies: &Arc<TrustedProxies>) -> Self {
        let ip_header = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            secure,
            ip_header,
            proxies: proxies.trusts(peer.ip()).then(|| Arc::clone(proxies)),
        }
    }

    /// The client's address: the peer's, or behind a trusted proxy the one it forwarded
    /// for.
    pub(crate) fn address(&self, headers: &HeaderMap) -> IpAddr {
        match &self.proxies {
            None => self.peer.ip(),
            Some(proxies) => proxies.client(self.peer.ip(), headers),
        }
    }

    /// [`address`](Self::address) as text: without a proxy, the one formatted for the
    /// connection.
    pub(crate) fn address_value(&self, headers: &HeaderMap) -> HeaderValue {
        match &self.proxies {
            None => self.ip_header.clone(),
            Some(_) => HeaderValue::from_str(&self.address(headers).to_string())
                .unwrap_or_else(|_| self.ip_header.clone()),
        }
    }
}

/// A request's client connection, and when its head arrived: the clock reading that the
/// request's deadline, connection rate, balancer and metrics start from. Small and
/// `Copy`, so each layer of the request's handling passes it on without copying the
/// connection's details.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub client: &'a ClientInfo,
    pub received: Instant,
}

/// The component name on problem documents.
pub(crate) const SOURCE: &str = "gateway";

/// How hyper's clients connect: TCP, and TLS for `https` upstreams.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// State that outlives configuration generations.
pub struct Shared {
    /// Plain HTTP/1.1 upstreams (see [`crate::upstream`]).
    pub(crate) http1: Arc<Http1Pool>,
    /// Upgrades to HTTP/1.1 upstreams, streamed bodies, and `https` upstreams of
    /// HTTP/1.1 routes (the certificate checked against the system's roots and
    /// `[runtime] ca_file`; `[runtime] client_cert` presented when asked for).
    pooled_http1: Client<Connector, Body>,
    /// HTTP/2 upstreams: h2c to `http`, h2 by ALPN over TLS to `https`.
    http2: Client<Connector, Body>,
    pub(crate) discovery: DiscoveryView,
    stats: StatsDirectory,
    breakers: Mutex<HashMap<String, Arc<CircuitBreaker>>>,
    budgets: Mutex<HashMap<String, (RetryConfig, Arc<RetryBudget>)>>,
    pub(crate) verifier: Option<Verifier>,
    /// The `x-keel-*` headers of verified principals.
    pub(crate) claims: crate::auth::ClaimCache,
    pub(crate) limiters: Limiters,
    /// Requests no route matches go to the registry service their path starts with.
    discovery_routes: bool,
}

impl Shared {
    /// The pools, the token verifier and the rate limit store: settings a reload cannot
    /// change.
    pub fn new(config: &GatewayConfig, discovery: DiscoveryView) -> Result<Self, String> {
        let verifier = config
            .auth
            .clone()
            .map(Verifier::new)
            .transpose()
            .map_err(|error| format!("gateway.auth: {error}"))?;
        let redis = RedisLimiter::new(&config.rate_limit)?;
        let discovery_routes = config.discovery_routes.unwrap_or(false);
        if discovery_routes {
            discovery.watch_catalog();
        }
        let config = &config.upstream;
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(config.connect_timeout));
        tcp.set_nodelay(true);
        let client = |http2: bool| {
            let connector = keel_runtime::http_client::hyper_connector(tcp.clone(), http2)
                .map_err(|error| format!("TLS to upstreams: {error}"))?;
            Ok::<_, String>(
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(config.idle_timeout)
                    .pool_max_idle_per_host(config.max_idle_per_host)
                    .http2_only(http2)
                    .build(connector),
            )
        };
        Ok(Self {
            http1: Arc::new(Http1Pool::new(config)),
            pooled_http1: client(false)?,
            http2: client(true)?,
            discovery,
            stats: StatsDirectory::default(),
            breakers: Mutex::default(),
            budgets: Mutex::default(),
            verifier,
            claims: crate::auth::ClaimCache::default(),
            limiters: Limiters::with_redis(redis),
            discovery_routes,
        })
    }

    pub(crate) fn client(&self, protocol: UpstreamProtocol) -> &Client<Connector, Body> {
        match protocol {
            UpstreamProtocol::Http1 => &self.pooled_http1,
            UpstreamProtocol::Http2 => &self.http2,
        }
    }

    /// The breaker of `key`, kept across reloads unless its settings changed.
    fn breaker(&self, key: &str, config: &BreakerConfig) -> Arc<CircuitBreaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        match breakers.get(key) {
            Some(breaker) if breaker.config() == config => Arc::clone(breaker),
            _ => {
                let breaker = Arc::new(CircuitBreaker::named(config.clone(), key));
                breakers.insert(key.to_owned(), Arc::clone(&breaker));
                breaker
            }
        }
    }

    fn budget(&self, route: &str, config: &RetryConfig) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        match budgets.get(route) {
            Some((kept, budget)) if kept == config => Arc::clone(budget),
            _ => {
                let budget = Arc::new(RetryBudget::new(config));
                budgets.insert(route.to_owned(), (config.clone(), Arc::clone(&budget)));
                budget
            }
        }
    }
}

/// Compiled [`HeaderActionsConfig`].
#[derive(Default)]
pub(crate) struct HeaderActions {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderActions {
    fn compile(config: &HeaderActionsConfig) -> Result<Self, String> {
        let name = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))
        };
        let pair = |(key, value): (&String, &String)| {
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("the value of header {key:?} is not a header value"))?;
            Ok::<_, String>((name(key)?, value))
        };
        Ok(Self {
            remove: config
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
            set: config.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: config.add.iter().map(pair).collect::<Result<_, _>>()?,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A path or location with `{param}` holes filled from the matched path template.
#[derive(Debug)]
pub(crate) struct Template(Vec<Piece>);

#[derive(Debug)]
enum Piece {
    Literal(String),
    Param(String),
}

impl Template {
    /// Parses `text`, accepting only parameters the route's path template captures.
    fn parse(field: &str, text: &str, captured: &[String]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{field} {text:?}: unclosed '{{'"))?;
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let name = rest[open + 1..open + close].trim_start_matches('*');
            if !captured.iter().any(|c| c == name) {
                return Err(format!(
                    "{field} {text:?}: {{{name}}} is not a parameter of the path_template"
                ));
            }
            pieces.push(Piece::Param(name.to_owned()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{field} {text:?}: unmatched '}}'"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        Ok(Self(pieces))
    }

    pub(crate) fn expand(&self, params: &[(String, String)]) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Param(name) => {
                    if let Some((_, value)) = params.iter().find(|(n, _)| n == name) {
                        out.push_str(value);
                    }
                }
            }
        }
        out
    }
}

/// How the upstream path is made from the request's.
pub(crate) enum PathAction {
    Keep,
    Strip(String),
    Rewrite(Template),
}

impl PathAction {
    pub(crate) fn apply<'a>(
        &self,
        path: &'a str,
        params: &[(String, String)],
    ) -> std::borrow::Cow<'a, str> {
        match self {
            Self::Keep => path.into(),
            Self::Strip(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some("") => "/".into(),
                Some(rest) if rest.starts_with('/') => rest.into(),
                _ => path.into(),
            },
            Self::Rewrite(template) => template.expand(params).into(),
        }
    }
}

/// Where a route's endpoints come from.
pub(crate) enum Pool {
    Static(Arc<EndpointSet>),
    /// A registry service; the set is rebuilt when the discovery view changes.
    Service {
        name: String,
        cache: RwLock<(Arc<Vec<Instance>>, Arc<EndpointSet>)>,
    },
}

/// What a matched route forwards with.
pub(crate) struct Forward {
    pub(crate) route: String,
    pub(crate) pool: Pool,
    /// The service name (or `route:<name>` for static upstreams) on metrics and errors.
    pub(crate) target: String,
    pub(crate) protocol: UpstreamProtocol,
    pub(crate) path: PathAction,
    pub(crate) request_headers: HeaderActions,
    pub(crate) response_headers: HeaderActions,
    pub(crate) timeout: Duration,
    pub(crate) max_body_bytes: u64,
    pub(crate) balance: BalanceConfig,
    pub(crate) retry: RetryConfig,
    pub(crate) budget: Arc<RetryBudget>,
    pub(crate) outlier: OutlierConfig,
    pub(crate) breaker: Arc<CircuitBreaker>,
    pub(crate) upstream_metrics: UpstreamMetrics,
}

enum Action {
    Forward(Box<Forward>),
    Redirect {
        location: Template,
        status: StatusCode,
        keep_query: bool,
    },
}

/// What applies to a route's requests before its action: who may call, from which
/// origins, how often.
struct Policy {
    auth: RouteAuthConfig,
    cors: Option<Cors>,
    rate_limit: Option<RouteLimit>,
}

/// A route's rate limit, ready to check.
struct RouteLimit {
    config: RateLimitConfig,
    local: Arc<LocalLimiter>,
    /// `RateLimit-Limit`: the same on every answer, so made once.
    limit_header: HeaderValue,
}

struct RouteEntry {
    served: Served,
    policy: Policy,
    action: Action,
}

/// Per-route metric handles, registered once per generation so a request records without
/// a registry lookup.
pub struct RouteMetrics {
    /// By status class: 1xx … 5xx.
    requests: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let requests = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            metrics::counter!(
                "keel_gateway_requests_total",
                "route" => route.to_owned(),
                "status_class" => class
            )
        });
        Self {
            requests,
            duration: keel_runtime::metrics::duration_histogram(
                "keel_gateway_request_duration_seconds",
                vec![("route", route.to_owned())],
            ),
        }
    }

    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.requests[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// Which route answered, for the access log and metrics.
#[derive(Clone)]
pub struct Served {
    pub route: Arc<str>,
    pub metrics: Arc<RouteMetrics>,
}

/// A request's answer, with what the access log and metrics need to know about it.
pub struct Handled {
    pub response: Response,
    pub served: Served,
    /// Set when an upstream answered.
    pub attempts: Option<Attempts>,
    /// A rate-limited route's state, for the answer's `RateLimit-*` headers.
    pub rate: Option<RateState>,
}

/// The headers the gateway puts on its answer last: the request id and, on a rate-limited
/// route, the `RateLimit-*` state. Kept beside the response's map rather than inserted into
/// it, as `forward::Added` is for requests (four inserts and two allocated numbers were a
/// measurable share of a request): the gateway's HTTP/1.1 server writes them straight into
/// the response head, and a response for hyper's server gets them inserted
/// ([`insert_into`](Self::insert_into)). Copies the map holds (an upstream's) are replaced.
pub struct Stamp {
    pub request_id: HeaderValue,
    pub rate: Option<RateState>,
}

/// A route's rate-limit state after a request, for the `RateLimit-*` headers.
pub struct RateState {
    limit: HeaderValue,
    remaining: u64,
    /// Seconds until the bucket is full again, rounded up.
    reset: u64,
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

impl Stamp {
    /// Whether `name` is one of the headers this sets, so that a copy in the map is left out.
    pub(crate) fn replaces(&self, name: &HeaderName) -> bool {
        *name == REQUEST_ID
            || (self.rate.is_some()
                && (*name == RATELIMIT_LIMIT
                    || *name == RATELIMIT_REMAINING
                    || *name == RATELIMIT_RESET))
    }

    /// Appends the header lines to an HTTP/1.1 head.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        crate::h1::put_header(
            out,
            REQUEST_ID.as_str().as_bytes(),
            self.request_id.as_bytes(),
        );
        if let Some(rate) = &self.rate {
            let mut number = itoa::Buffer::new();
            let put = |out: &mut Vec<u8>, name: HeaderName, value: &[u8]| {
                crate::h1::put_header(out, name.as_str().as_bytes(), value);
            };
            put(out, RATELIMIT_LIMIT, rate.limit.as_bytes());
            put(
                out,
                RATELIMIT_REMAINING,
                number.format(rate.remaining).as_bytes(),
            );
            put(out, RATELIMIT_RESET, number.format(rate.reset).as_bytes());
        }
    }

    /// Inserts the headers into `headers`, replacing any copies.
    pub fn insert_into(self, headers: &mut http::HeaderMap) {
        if let Some(rate) = self.rate {
            rate.insert_into(headers);
        }
        headers.insert(REQUEST_ID, self.request_id);
    }
}

impl RateState {
    fn of(limit: &RouteLimit, decision: &Decision) -> Self {
        let reset = decision.reset;
        Self {
            limit: limit.limit_header.clone(),
            remaining: decision.remaining,
            reset: reset.as_secs() + u64::from(reset.subsec_nanos() > 0),
        }
    }

    /// Inserts the `RateLimit-*` headers into `headers`, replacing any copies.
    pub fn insert_into(self, headers: &mut http::HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, self.limit);
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(self.reset));
    }
}

/// Which instance answered and after how many retries.
#[derive(Clone)]
pub struct Attempts {
    pub endpoint: Arc<str>,
    pub retries: u32,
}

/// One configuration generation.
pub struct Proxy {
    table: RouteTable,
    /// By route name. FNV (`balance::Fnv`): the names come from the configuration, never
    /// from clients, and SipHash was a measurable share of a request.
    actions: HashMap<String, RouteEntry, BuildHasherDefault<Fnv>>,
    /// For requests no route matched.
    unmatched: Served,
    /// Routes made on demand for registry services (see [`Proxy::discovered`]).
    discovered: RwLock<HashMap<String, Arc<RouteEntry>>>,
    /// The services configured routes reach: never discovered.
    configured_services: std::collections::HashSet<String>,
    routes: Vec<GatewayRouteConfig>,
    pub(crate) shared: Arc<Shared>,
}

impl Proxy {
    /// Validates every route; any error rejects the whole configuration.
    pub fn build(routes: &[GatewayRouteConfig], shared: Arc<Shared>) -> Result<Self, RouteError> {
        let table = RouteTable::build(
            &routes
                .iter()
                .map(GatewayRouteConfig::route)
                .collect::<Vec<_>>(),
        )?;
        // Outlier detection and the breaker belong to the service; routes reaching one
        // service must agree on them.
        let mut policies: HashMap<
            String,
            (&str, &OutlierConfig, &BreakerConfig, UpstreamProtocol),
        > = HashMap::new();
        let mut actions = HashMap::default();
        for route in routes {
            let error = |reason: String| RouteError {
                route: route.name.clone(),
                reason,
            };
            let policy = Self::compile_policy(route, &shared).map_err(error)?;
            let action = Self::compile(route, &shared).map_err(error)?;
            if let Action::Forward(forward) = &action {
                let policy = (
                    route.name.as_str(),
                    &route.outlier,
                    &route.circuit_breaker,
                    route.upstream_protocol,
                );
                if let Some(first) = policies.get(&forward.target)
                    && (first.1, first.2, first.3) != (policy.1, policy.2, policy.3)
                {
                    return Err(error(format!(
                        "reaches {} like route {:?} but with other outlier, circuit_breaker or \
                         upstream_protocol settings; routes to one service must agree",
                        forward.target, first.0
                    )));
                }
                policies.insert(forward.target.clone(), policy);
            }
            let served = Served {
                route: Arc::from(route.name.as_str()),
                metrics: Arc::new(RouteMetrics::new(&route.name)),
            };
            actions.insert(
                route.name.clone(),
                RouteEntry {
                    served,
                    policy,
                    action,
                },
            );
        }
        Ok(Self {
            table,
            actions,
            unmatched: Served {
                route: Arc::from(keel_runtime::metrics::UNMATCHED_ROUTE),
                metrics: Arc::new(RouteMetrics::new(keel_runtime::metrics::UNMATCHED_ROUTE)),
            },
            discovered: RwLock::default(),
            configured_services: routes.iter().filter_map(|r| r.service.clone()).collect(),
            routes: routes.to_vec(),
            shared,
        })
    }

    /// The routes this generation serves, as configured.
    pub fn routes(&self) -> &[GatewayRouteConfig] {
        &self.routes
    }

    fn compile_policy(route: &GatewayRouteConfig, shared: &Shared) -> Result<Policy, String> {
        route.auth.validate(shared.verifier.is_some())?;
        let cors = route.cors.as_ref().map(Cors::compile).transpose()?;
        let rate_limit = match &route.rate_limit {
            Some(limit) => {
                let authenticated = route.auth.require == Requirement::Authenticated;
                limit.validate(authenticated, shared.limiters.redis.is_some())?;
                Some(RouteLimit {
                    config: limit.clone(),
                    local: shared.limiters.local(&route.name),
                    limit_header: HeaderValue::from(limit.burst),
                })
            }
            None => None,
        };
        Ok(Policy {
            auth: route.auth.clone(),
            cors,
            rate_limit,
        })
    }

    fn compile(route: &GatewayRouteConfig, shared: &Shared) -> Result<Action, String> {
        let captured: Vec<String> = route
            .matches
            .path_template
            .as_deref()
            .map(template_params)
            .unwrap_or_default();
        if let Some(redirect) = &route.redirect {
            if route.service.is_some() || !route.upstreams.is_empty() {
                return Err("has a redirect and upstreams; choose one".into());
            }
            return Self::compile_redirect(redirect, &captured);
        }
        route.retry.validate()?;
        route.outlier.validate()?;
        route.circuit_breaker.validate()?;
        if let BalanceConfig::Hash(key) = &route.balance {
            key.validate()?;
        }
        let path = match (&route.strip_prefix, &route.rewrite) {
            (Some(_), Some(_)) => return Err("has strip_prefix and rewrite; choose one".into()),
            (Some(prefix), None) => PathAction::Strip(prefix.clone()),
            (None, Some(rewrite)) => {
                if !rewrite.starts_with('/') {
                    return Err(format!("rewrite {rewrite:?} must start with '/'"));
                }
                PathAction::Rewrite(Template::parse("rewrite", rewrite, &captured)?)
            }
            (None, None) => PathAction::Keep,
        };
        let (pool, target) = match (&route.service, route.upstreams.is_empty()) {
            (Some(_), false) => return Err("has both a service and upstreams; choose one".into()),
            (None, true) => return Err("needs a service, upstreams or a redirect".into()),
            (Some(service), true) => {
                validate_service_name(service)?;
                shared.discovery.watch(service);
                let empty = Arc::new(EndpointSet::new(Vec::new(), &route.balance));
                let pool = Pool::Service {
                    name: service.clone(),
                    cache: RwLock::new((Arc::default(), empty)),
                };
                (pool, service.clone())
            }
            (None, false) => {
                let endpoints = Self::static_endpoints(route, shared)?;
                let set = EndpointSet::new(endpoints, &route.balance);
                (Pool::Static(Arc::new(set)), format!("route:{}", route.name))
            }
        };
        Ok(Action::Forward(Box::new(Forward {
            route: route.name.clone(),
            pool,
            breaker: shared.breaker(&target, &route.circuit_breaker),
            upstream_metrics: UpstreamMetrics::new(&target),
            target,
            protocol: route.upstream_protocol,
            path,
            request_headers: HeaderActions::compile(&route.request_headers)
                .map_err(|reason| format!("request_headers: {reason}"))?,
            response_headers: HeaderActions::compile(&route.response_headers)
                .map_err(|reason| format!("response_headers: {reason}"))?,
            timeout: route.timeout,
            max_body_bytes: route.max_body_bytes,
            balance: route.balance.clone(),
            budget: shared.budget(&route.name, &route.retry),
            retry: route.retry.clone(),
            outlier: route.outlier.clone(),
        })))
    }

    fn compile_redirect(redirect: &RedirectConfig, captured: &[String]) -> Result<Action, String> {
        let status = StatusCode::from_u16(redirect.status)
            .ok()
            .filter(|s| [301, 302, 303, 307, 308].contains(&s.as_u16()))
            .ok_or_else(|| {
                format!(
                    "redirect.status {} must be 301, 302, 303, 307 or 308",
                    redirect.status
                )
            })?;
        HeaderValue::from_str(&redirect.location).map_err(|_| {
            format!(
                "redirect.location {:?} is not a header value",
                redirect.location
            )
        })?;
        Ok(Action::Redirect {
            location: Template::parse("redirect.location", &redirect.location, captured)?,
            status,
            keep_query: redirect.keep_query,
        })
    }

    fn static_endpoints(
        route: &GatewayRouteConfig,
        shared: &Shared,
    ) -> Result<Vec<Endpoint>, String> {
        route
            .upstreams
            .iter()
            .map(|upstream| {
                let url = upstream.url();
                let base: Uri = url
                    .parse()
                    .map_err(|_| format!("upstream {url:?} is not a URL"))?;
                if !matches!(base.scheme_str(), Some("http" | "https"))
                    || base.authority().is_none()
                {
                    return Err(format!(
                        "upstream {url:?} must be http://host:port or https://host:port"
                    ));
                }
                if !(1..=10_000).contains(&upstream.weight()) {
                    return Err(format!("upstream {url:?}: weight must be 1 to 10000"));
                }
                Ok(Endpoint {
                    id: Arc::from(url),
                    stats: shared.stats.stats(&base),
                    base,
                    weight: upstream.weight(),
                })
            })
            .collect()
    }

    /// Routes and answers one request.
    pub async fn handle(self: Arc<Self>, request: Request, arrival: Arrival<'_>) -> Handled {
        // One async layer, not two: each layer moves the request and its answer again.
        let unmatched = |problem: Problem| Handled {
            response: problem.with_source(SOURCE).into_response(),
            served: self.unmatched.clone(),
            attempts: None,
            rate: None,
        };
        let (mut parts, body) = request.into_parts();
        // Claims headers are the gateway's to set; a client's copies never pass.
        crate::auth::strip_claim_headers(&mut parts.headers);
        // Routed, and forwarded, as the upstream will read the path.
        if let Err(problem) = canonical_target(&mut parts.uri) {
            return unmatched(*problem);
        }
        let preflight = preflight_method(&parts.method, &parts.headers);
        // The target's authority first: HTTP/2's `:authority`, or an absolute-form target,
        // which the `Host` field yields to (RFC 9113 §8.3.1, RFC 9112 §3.2.2).
        let host = if self.table.needs_host() {
            parts.uri.authority().map(|a| a.as_str()).or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
        } else {
            None
        };
        let mut view = RequestView {
            method: preflight.as_ref().unwrap_or(&parts.method),
            host,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        // A preflight is answered by the route of the method it asks about, when that
        // route has CORS; otherwise it is an ordinary OPTIONS request.
        let mut matched = self.table.find(&view);
        if preflight.is_some()
            && matched
                .as_ref()
                .and_then(|m| self.actions.get(m.route))
                .is_none_or(|entry| entry.policy.cors.is_none())
        {
            view.method = &parts.method;
            matched = self.table.find(&view);
        }
        let discovered;
        let (entry, params) = match matched {
            Some(matched) => match self.actions.get(matched.route) {
                Some(entry) => (entry, matched.params),
                None => return unmatched(Problem::internal("route without an action")),
            },
            None => match self.discovered(parts.uri.path()) {
                Some(entry) => {
                    discovered = entry;
                    (&*discovered, Vec::new())
                }
                None => {
                    return unmatched(Problem::not_found(format!(
                        "no route for {} {}",
                        parts.method,
                        parts.uri.path()
                    )));
                }
            },
        };
        let route: &str = &entry.served.route;
        let policy = &entry.policy;
        if let (Some(cors), Some(_)) = (&policy.cors, &preflight) {
            return Handled {
                response: cors.preflight(&parts.headers),
                served: entry.served.clone(),
                attempts: None,
                rate: None,
            };
        }
        let request_headers = policy.cors.as_ref().map(|_| parts.headers.clone());
        let (mut response, attempts, rate) = self
            .answer(route, entry, parts, body, &params, arrival)
            .await
            .unwrap_or_else(|problem| (problem.with_source(SOURCE).into_response(), None, None));
        if let (Some(cors), Some(headers)) = (&policy.cors, request_headers) {
            cors.decorate(&headers, response.headers_mut());
        }
        Handled {
            response,
            served: entry.served.clone(),
            attempts,
            rate,
        }
    }

    /// The route to a registry service named by the path's first segment, when discovery
    /// routes are on and the registry has that service: `/orders/42` → `orders`, `/42`.
    /// Routes are made once per service and kept for this generation. A service that a
    /// configured route reaches is reached only through its configured routes, whose
    /// policy (tokens, scopes, roles, rate limits) a discovered route, open to anyone,
    /// would otherwise get around.
    fn discovered(&self, path: &str) -> Option<Arc<RouteEntry>> {
        if !self.shared.discovery_routes {
            return None;
        }
        let service = path.strip_prefix('/')?.split('/').next()?;
        if service.is_empty()
            || self.configured_services.contains(service)
            || !self.shared.discovery.knows(service)
        {
            return None;
        }
        if let Some(entry) = self
            .discovered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
        {
            return Some(Arc::clone(entry));
        }
        let config = GatewayRouteConfig {
            name: format!("discovery:{service}"),
            service: Some(service.to_owned()),
            strip_prefix: Some(format!("/{service}")),
            ..GatewayRouteConfig::default()
        };
        let entry = Arc::new(RouteEntry {
            served: Served {
                route: Arc::from(config.name.as_str()),
                metrics: Arc::new(RouteMetrics::new(&config.name)),
            },
            policy: Self::compile_policy(&config, &self.shared).ok()?,
            action: Self::compile(&config, &self.shared).ok()?,
        });
        self.discovered
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(service.to_owned(), Arc::clone(&entry));
        Some(entry)
    }

    /// Authorization, rate limit, then the route's action; with the upstream's attempts and
    /// the route's rate-limit state.
    async fn answer(
        &self,
        route: &str,
        entry: &RouteEntry,
        parts: http::request::Parts,
        body: Body,
        params: &[(String, String)],
        arrival: Arrival<'_>,
    ) -> Result<(Response, Option<Attempts>, Option<RateState>), Problem> {
        let authorized = match crate::auth::authorize(
            &entry.policy.auth,
            self.shared.verifier.as_ref(),
            &self.shared.claims,
            &parts.headers,
        )
        .await
        {
            Ok(authorized) => authorized,
            Err(refusal) => return Ok((refusal, None, None)),
        };
        let decision = match &entry.policy.rate_limit {
            Some(limit) => {
                let client_ip = arrival.client.address_value(&parts.headers);
                let key = limit.config.key_of(
                    &parts.headers,
                    authorized.as_ref(),
                    client_ip.to_str().ok(),
                );
                match self
                    .rate_limit(route, limit, &key, arrival.received)
                    .await?
                {
                    Some(decision) if !decision.allowed => {
                        return Ok((rate_limited(route, limit, &decision), None, None));
                    }
                    decision => decision.map(|decision| (limit, decision)),
                }
            }
            None => None,
        };
        let (response, attempts) = match &entry.action {
            Action::Redirect {
                location,
                status,
                keep_query,
            } => {
                let mut target = location.expand(params);
                if let (true, Some(query)) = (*keep_query, parts.uri.query()) {
                    target.push(if target.contains('?') { '&' } else { '?' });
                    target.push_str(query);
                }
                let location = HeaderValue::from_str(&target)
                    .map_err(|_| Problem::bad_request("the redirect target is not a valid URL"))?;
                let response = (*status, [(http::header::LOCATION, location)]).into_response();
                (response, None)
            }
            Action::Forward(forward) => {
                let claims = authorized.map(|a| a.claims);
                let (response, attempts) = forward
                    .forward(&self.shared, parts, body, params, arrival, claims)
                    .await?;
                (response, Some(attempts))
            }
        };
        let rate = decision.map(|(limit, decision)| RateState::of(limit, &decision));
        Ok((response, attempts, rate))
    }

    /// The limiter's decision; `None` when a shared limit could not be checked and the
    /// configured policy lets the request through.
    async fn rate_limit(
        &self,
        route: &str,
        limit: &RouteLimit,
        key: &str,
        received: Instant,
    ) -> Result<Option<Decision>, Problem> {
        let redis = match (&self.shared.limiters.redis, limit.config.shared) {
            (Some(redis), true) => redis,
            _ => return Ok(Some(limit.local.check(&limit.config, key, received))),
        };
        match redis.check(&limit.config, route, key).await {
            Ok(decision) => Ok(Some(decision)),
            Err(error) => {
                metrics::counter!("keel_gateway_rate_limit_store_errors_total", "route" => route.to_owned())
                    .increment(1);
                tracing::warn!(route, %error, policy = ?redis.on_error, "rate limit store unavailable");
                match redis.on_error {
                    FailurePolicy::Allow => Ok(None),
                    FailurePolicy::Deny => Err(Problem::unavailable(format!(
                        "route {route:?}: its rate limit cannot be checked right now"
                    ))
                    .with_retry_after(Duration::from_secs(1))),
                }
            }
        }
    }
}

/// Makes `uri`'s path canonical ([`crate::path`]), keeping its query.
fn canonical_target(uri: &mut Uri) -> Result<(), Box<Problem>> {
    let path = match crate::path::canonical(uri.path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(path)) => path,
        Err(why) => return Err(Box::new(Problem::bad_request(why.to_string()))),
    };
    let target = crate::path::with_query(&path, uri.query())?;
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(target);
    *uri = Uri::from_parts(parts).map_err(|_| crate::path::unforwardable())?;
    Ok(())
}

fn rate_limited(route: &str, limit: &RouteLimit, decision: &Decision) -> Response {
    metrics::counter!("keel_gateway_rate_limited_total", "route" => route.to_owned()).increment(1);
    let after = decision.retry_after.max(Duration::from_secs(1));
    let mut response = Problem::too_many_requests(format!(
        "route {route:?}: rate limit of {} requests reached",
        decision.limit
    ))
    .with_retry_after(after)
    .with_source(SOURCE)
    .into_response();
    RateState::of(limit, decision).insert_into(response.headers_mut());
    response
}

impl Forward {
    /// The route's current endpoints.
    pub(crate) fn endpoints(&self, shared: &Shared) -> Arc<EndpointSet> {
        match &self.pool {
            Pool::Static(set) => Arc::clone(set),
            Pool::Service { name, cache } => {
                let instances = shared.discovery.instances(name);
                {
                    let cached = cache.read().unwrap_or_else(PoisonError::into_inner);
                    if Arc::ptr_eq(&cached.0, &instances) {
                        return Arc::clone(&cached.1);
                    }
                }
                let endpoints = instances
                    .iter()
                    .filter_map(|instance| {
                        let base: Uri = instance.base_url().parse().ok()?;
                        Some(Endpoint {
                            id: Arc::from(instance.id.as_str()),
                            stats: shared.stats.stats(&base),
                            base,
                            weight: instance.weight,
                        })
                    })
                    .collect();
                let set = Arc::new(EndpointSet::new(endpoints, &self.balance));
                *cache.write().unwrap_or_else(PoisonError::into_inner) =
                    (instances, Arc::clone(&set));
                set
            }
        }
    }
}

/// An upstream target as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    pub route: String,
    pub target: String,
    pub balance: BalanceConfig,
    pub circuit: CircuitState,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    pub id: String,
    pub url: String,
    pub weight: u32,
    pub in_flight: u32,
    pub latency_ms: f64,
    pub ejected_for_ms: Option<u128>,
    pub ejections: u64,
}

impl Proxy {
    /// Every forwarding route's endpoints with their health as the gateway sees it.
    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        let now = now_nanos();
        let mut statuses: Vec<UpstreamStatus> = self
            .actions
            .values()
            .filter_map(|entry| match &entry.action {
                Action::Forward(forward) => Some(forward),
                Action::Redirect { .. } => None,
            })
            .map(|forward| UpstreamStatus {
                route: forward.route.clone(),
                target: forward.target.clone(),
                balance: forward.balance.clone(),
                circuit: forward.breaker.state(),
                endpoints: forward
                    .endpoints(&self.shared)
                    .endpoints
                    .iter()
                    .map(|endpoint| EndpointStatus {
                        id: endpoint.id.to_string(),
                        url: endpoint.base.to_string(),
                        weight: endpoint.weight,
                        in_flight: endpoint.stats.in_flight(),
                        latency_ms: endpoint.stats.latency_nanos() as f64 / 1e6,
                        ejected_for_ms: endpoint.stats.ejected_for(now).map(|d| d.as_millis()),
                        ejections: endpoint.stats.ejections(),
                    })
                    .collect(),
            })
            .collect();
        statuses.sort_by(|a, b| a.route.cmp(&b.route));
        statuses
    }
}

/// The parameter names a path template captures.
fn template_params(template: &str) -> Vec<String> {
    template
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| name.trim_start_matches('*').to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_captured_parameters_and_refuse_unknown_ones() {
        let captured = template_params("/orders/{id}/items/{*rest}");
        assert_eq!(captured, ["id", "rest"]);
        let template = Template::parse("rewrite", "/v2/{id}/{*rest}", &captured).unwrap();
        let params = vec![("id".into(), "42".into()), ("rest".into(), "a/b".into())];
        assert_eq!(template.expand(&params), "/v2/42/a/b");
        let error = Template::parse("rewrite", "/v2/{nope}", &captured).unwrap_err();
        assert!(error.contains("{nope}"), "{error}");
        assert!(Template::parse("rewrite", "/v2/{id", &captured).is_err());
        assert!(Template::parse("rewrite", "/v2/id}", &captured).is_err());
    }

    #[test]
    fn strip_prefix_only_strips_whole_segments() {
        let strip = PathAction::Strip("/api".into());
        assert_eq!(strip.apply("/api/orders", &[]), "/orders");
        assert_eq!(strip.apply("/api", &[]), "/");
        assert_eq!(strip.apply("/apix", &[]), "/apix");
    }
}
