//! Forwarding a matched request to one of the route's upstreams.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_runtime::Problem;

use keel_registry::client::DiscoveryView;
use keel_registry::model::validate_service_name;

use crate::config::{GatewayRouteConfig, HeaderActionsConfig};
use crate::route::{RequestView, RouteError, RouteTable};

/// The component name on problem documents.
const SOURCE: &str = "gateway";

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Where a route's requests go.
enum Targets {
    Static(Vec<Uri>),
    /// The passing instances of a registry service, from the live discovery view.
    Service(String),
}

/// Compiled [`HeaderActionsConfig`].
#[derive(Default)]
struct HeaderActions {
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

    fn apply(&self, headers: &mut http::HeaderMap) {
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

struct Upstreams {
    targets: Targets,
    request_headers: HeaderActions,
    response_headers: HeaderActions,
    next: AtomicUsize,
    strip_prefix: Option<String>,
    timeout: Duration,
}

/// The routes and their upstreams, with one pooled client for all of them.
pub struct Proxy {
    table: RouteTable,
    upstreams: HashMap<String, Upstreams>,
    client: Client<HttpConnector, Body>,
    discovery: DiscoveryView,
}

impl Proxy {
    /// Validates every route and upstream; any error rejects the whole configuration.
    pub fn build(
        routes: &[GatewayRouteConfig],
        discovery: DiscoveryView,
    ) -> Result<Self, RouteError> {
        let table = RouteTable::build(
            &routes
                .iter()
                .map(GatewayRouteConfig::route)
                .collect::<Vec<_>>(),
        )?;
        let mut upstreams = HashMap::new();
        for route in routes {
            let error = |reason: String| RouteError {
                route: route.name.clone(),
                reason,
            };
            let targets = match (&route.service, route.upstreams.is_empty()) {
                (Some(_), false) => {
                    return Err(error("has both a service and upstreams; choose one".into()));
                }
                (None, true) => return Err(error("needs a service or upstreams".into())),
                (Some(service), true) => {
                    validate_service_name(service).map_err(error)?;
                    discovery.watch(service);
                    Targets::Service(service.clone())
                }
                (None, false) => Targets::Static(Self::static_targets(route)?),
            };
            upstreams.insert(
                route.name.clone(),
                Upstreams {
                    targets,
                    request_headers: HeaderActions::compile(&route.request_headers)
                        .map_err(|reason| error(format!("request_headers: {reason}")))?,
                    response_headers: HeaderActions::compile(&route.response_headers)
                        .map_err(|reason| error(format!("response_headers: {reason}")))?,
                    next: AtomicUsize::new(0),
                    strip_prefix: route.strip_prefix.clone(),
                    timeout: route.timeout,
                },
            );
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build_http();
        Ok(Self {
            table,
            upstreams,
            client,
            discovery,
        })
    }

    fn static_targets(route: &GatewayRouteConfig) -> Result<Vec<Uri>, RouteError> {
        let error = |reason: String| RouteError {
            route: route.name.clone(),
            reason,
        };
        route
            .upstreams
            .iter()
            .map(|base| {
                let uri: Uri = base
                    .parse()
                    .map_err(|_| error(format!("upstream {base:?} is not a URL")))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(error(format!("upstream {base:?} must be http://host:port")));
                }
                Ok(uri)
            })
            .collect()
    }

    /// Routes and forwards one request.
    pub async fn handle(self: Arc<Self>, request: Request) -> Response {
        match self.forward(request).await {
            Ok(response) => response,
            Err(problem) => problem.with_source(SOURCE).into_response(),
        }
    }

    async fn forward(&self, request: Request) -> Result<Response, Problem> {
        let (mut parts, body) = request.into_parts();
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        let view = RequestView {
            method: &parts.method,
            host,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let matched = self.table.find(&view).ok_or_else(|| {
            Problem::not_found(format!(
                "no route for {} {}",
                parts.method,
                parts.uri.path()
            ))
        })?;
        let upstreams = self
            .upstreams
            .get(matched.route)
            .ok_or_else(|| Problem::internal("route without upstreams"))?;
        let turn = upstreams.next.fetch_add(1, Ordering::Relaxed);
        let base = match &upstreams.targets {
            Targets::Static(bases) => bases[turn % bases.len()].clone(),
            Targets::Service(service) => {
                let instances = self.discovery.instances(service);
                let Some(instance) =
                    (!instances.is_empty()).then(|| &instances[turn % instances.len()])
                else {
                    return Err(Problem::unavailable(format!(
                        "route {:?}: service {service:?} has no passing instance",
                        matched.route
                    ))
                    .with_retry_after(Duration::from_secs(1)));
                };
                instance.base_url().parse().map_err(|_| {
                    Problem::internal(format!("instance {} has no usable address", instance.id))
                })?
            }
        };

        let path = parts.uri.path();
        let path = match &upstreams.strip_prefix {
            Some(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some("") => "/",
                Some(rest) if rest.starts_with('/') => rest,
                _ => path,
            },
            None => path,
        };
        let target = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_owned(),
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = base.scheme().cloned();
        uri.authority = base.authority().cloned();
        uri.path_and_query = Some(
            target
                .parse()
                .map_err(|_| Problem::bad_request("the request target cannot be forwarded"))?,
        );
        parts.uri = Uri::from_parts(uri).map_err(|_| Problem::internal("bad upstream URI"))?;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<std::net::SocketAddr>>()
        {
            let forwarded = match parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(before) => format!("{before}, {}", peer.ip()),
                None => peer.ip().to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded) {
                parts.headers.insert("x-forwarded-for", value);
            }
        }
        parts.headers.remove(header::HOST);
        upstreams.request_headers.apply(&mut parts.headers);
        keel_runtime::trace_context::inject_current(&mut parts.headers);

        let upstream = Request::from_parts(parts, body);
        let response = tokio::time::timeout(upstreams.timeout, self.client.request(upstream))
            .await
            .map_err(|_| {
                Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    "Upstream timeout",
                )
                .with_detail(format!(
                    "route {:?}: {base} did not answer within {:?}",
                    matched.route, upstreams.timeout
                ))
            })?
            .map_err(|error| {
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream-unavailable",
                    "Bad gateway",
                )
                .with_detail(format!("route {:?}: {base}: {error}", matched.route))
            })?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        upstreams.response_headers.apply(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}
