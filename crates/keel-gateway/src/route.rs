//! The route table: which route serves a request.
//!
//! A route matches on host (exact, or a `*.` wildcard suffix), path (exact, segment-aware
//! prefix, or a template with `{param}` segments and an optional `{*rest}` tail), methods,
//! headers and query parameters. Routes are tried in order of explicit `priority` (higher
//! first), then specificity (see [`Specificity`]), then declaration order; the first that
//! matches wins. Routes are compiled once, when a configuration is loaded, so an invalid
//! one is rejected before it can replace the running table.

use std::collections::{BTreeMap, HashSet};

use http::Method;
use serde::{Deserialize, Serialize};

/// What a route matches, as configured (`match = { … }` of a `[[gateway.routes]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MatchConfig {
    /// `api.example.com`, or `*.example.com` for any subdomain.
    pub host: Option<String>,
    /// The whole path, exactly.
    pub path: Option<String>,
    /// A path prefix that ends at a segment boundary: `/api` matches `/api` and `/api/x`,
    /// not `/apix` (as Spring Cloud Gateway's `/api/**`).
    pub path_prefix: Option<String>,
    /// Segments with `{name}` parameters and an optional final `{*name}` for the rest:
    /// `/orders/{id}/items/{*rest}`.
    pub path_template: Option<String>,
    /// Allowed methods; empty allows all.
    pub methods: Vec<String>,
    /// Header name → required value; `*` requires only presence.
    pub headers: BTreeMap<String, String>,
    /// Query parameter → required value; `*` requires only presence.
    pub query: BTreeMap<String, String>,
}

/// A route as configured: a name, an optional priority and what it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Higher is tried first, before specificity decides.
    #[serde(default)]
    pub priority: i32,
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
}

/// Why a set of routes was rejected; names the route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route:?}: {reason}")]
pub struct RouteError {
    pub route: String,
    pub reason: String,
}

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The `Host` header or URI authority; a port is ignored.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// The route that matched and the template parameters it captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch<'t> {
    pub route: &'t str,
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

#[derive(Debug, Clone)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Template(Vec<Segment>),
}

/// How specific a route is, compared field by field: host (exact > wildcard, longer
/// wildcard first > none), path (exact > template > prefix > none, then more literal
/// characters), then the number of method, header and query conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    host_rank: u8,
    host_len: usize,
    path_rank: u8,
    path_literal_len: usize,
    conditions: usize,
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    name: String,
    priority: i32,
    specificity: Specificity,
    host: HostMatch,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(http::HeaderName, Option<String>)>,
    query: Vec<(String, Option<String>)>,
}

/// The compiled routes, in the order they are tried.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    /// Some route matches on the host.
    hosts: bool,
}

impl RouteTable {
    /// Compiles and orders `routes`; the first invalid one rejects the whole set.
    pub fn build(routes: &[RouteConfig]) -> Result<Self, RouteError> {
        let mut names = HashSet::new();
        let mut compiled = Vec::with_capacity(routes.len());
        for config in routes {
            let error = |reason: String| RouteError {
                route: config.name.clone(),
                reason,
            };
            if config.name.is_empty() {
                return Err(error("a route needs a name".into()));
            }
            if !names.insert(config.name.as_str()) {
                return Err(error("the name is used by another route".into()));
            }
            compiled.push(compile(config).map_err(error)?);
        }
        // A stable sort keeps declaration order among equals.
        compiled.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(b.specificity.cmp(&a.specificity))
        });
        let hosts = compiled
            .iter()
            .any(|route| !matches!(route.host, HostMatch::Any));
        Ok(Self {
            routes: compiled,
            hosts,
        })
    }

    /// Whether matching needs the request's host; when not, the caller need not find it
    /// (a header lookup) and passes none, so `find` does not normalise it (an allocation).
    pub fn needs_host(&self) -> bool {
        self.hosts
    }

    /// Route names in the order they are tried.
    pub fn order(&self) -> Vec<&str> {
        self.routes
            .iter()
            .map(|route| route.name.as_str())
            .collect()
    }

    /// The first route that matches `request`.
    pub fn find<'t>(&'t self, request: &RequestView<'_>) -> Option<RouteMatch<'t>> {
        let host = request.host.map(normalise_host);
        self.routes.iter().find_map(|route| {
            let params = route.matches(request, host.as_deref())?;
            Some(RouteMatch {
                route: &route.name,
                params,
            })
        })
    }
}

/// Lower-cases a host and drops its port (`Api.Example.com:8080` → `api.example.com`).
fn normalise_host(host: &str) -> String {
    let without_port = match host.rsplit_once(':') {
        // An IPv6 literal keeps its colons inside brackets.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    // A fully qualified name (`api.example.com.`) is the same host (RFC 1034 §3.1), as
    // Envoy's `strip_trailing_host_dot` takes it.
    let name = without_port.strip_suffix('.').unwrap_or(without_port);
    name.to_ascii_lowercase()
}

fn compile(config: &RouteConfig) -> Result<CompiledRoute, String> {
    let m = &config.matches;
    let host = match m.host.as_deref() {
        None => HostMatch::Any,
        Some("") => return Err("host is empty".into()),
        Some(host) => match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                HostMatch::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
            }
            _ if host.contains('*') => {
                return Err(format!(
                    "host {host:?}: a wildcard is only allowed as a leading `*.`"
                ));
            }
            _ => HostMatch::Exact(host.to_ascii_lowercase()),
        },
    };
    let paths = [&m.path, &m.path_prefix, &m.path_template]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if paths > 1 {
        return Err("use one of path, path_prefix and path_template".into());
    }
    let path = if let Some(path) = &m.path {
        PathMatch::Exact(absolute("path", path)?.to_owned())
    } else if let Some(prefix) = &m.path_prefix {
        let prefix = absolute("path_prefix", prefix)?.trim_end_matches('/');
        PathMatch::Prefix(prefix.to_owned())
    } else if let Some(template) = &m.path_template {
        PathMatch::Template(parse_template(absolute("path_template", template)?)?)
    } else {
        PathMatch::Any
    };
    let methods = m
        .methods
        .iter()
        .map(|method| {
            Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("method {method:?} is not an HTTP method"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let headers = m
        .headers
        .iter()
        .map(|(name, value)| {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header {name:?} is not a header name"))?;
            Ok((name, (value != "*").then(|| value.clone())))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let query: Vec<(String, Option<String>)> = m
        .query
        .iter()
        .map(|(name, value)| (name.clone(), (value != "*").then(|| value.clone())))
        .collect();
    let specificity = Specificity {
        host_rank: match host {
            HostMatch::Exact(_) => 2,
            HostMatch::Suffix(_) => 1,
            HostMatch::Any => 0,
        },
        host_len: match &host {
            HostMatch::Exact(h) | HostMatch::Suffix(h) => h.len(),
            HostMatch::Any => 0,
        },
        path_rank: match path {
            PathMatch::Exact(_) => 3,
            PathMatch::Template(_) => 2,
            PathMatch::Prefix(_) => 1,
            PathMatch::Any => 0,
        },
        path_literal_len: match &path {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p.len(),
            PathMatch::Template(segments) => segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => l.len() + 1,
                    Segment::Param(_) | Segment::Rest(_) => 0,
                })
                .sum(),
            PathMatch::Any => 0,
        },
        conditions: usize::from(!methods.is_empty()) + headers.len() + query.len(),
    };
    Ok(CompiledRoute {
        name: config.name.clone(),
        priority: config.priority,
        specificity,
        host,
        path,
        methods,
        headers,
        query,
    })
}

/// `path` when it starts with `/` and is canonical: requests are matched once their own
/// paths are made canonical ([`crate::path`]), so a route written otherwise could never
/// match.
fn absolute<'a>(field: &str, path: &'a str) -> Result<&'a str, String> {
    if !path.starts_with('/') {
        return Err(format!("{field} {path:?} must start with '/'"));
    }
    match crate::path::canonical(path) {
        Ok(std::borrow::Cow::Borrowed(_)) => Ok(path),
        Ok(std::borrow::Cow::Owned(canonical)) => Err(format!(
            "{field} {path:?} is matched against canonical paths only: write {canonical:?}"
        )),
        Err(refused) => Err(format!("{field} {path:?}: {refused}")),
    }
}

fn parse_template(template: &str) -> Result<Vec<Segment>, String> {
    let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    let mut names = HashSet::new();
    let mut segments = Vec::with_capacity(parts.len());
    for (n, part) in parts.iter().enumerate() {
        let segment = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(inner) => {
                let (rest, name) = match inner.strip_prefix('*') {
                    Some(name) => (true, name),
                    None => (false, inner),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "path_template {template:?}: bad parameter {part:?}"
                    ));
                }
                if !names.insert(name) {
                    return Err(format!(
                        "path_template {template:?}: {name:?} appears twice"
                    ));
                }
                if rest && n + 1 != parts.len() {
                    return Err(format!(
                        "path_template {template:?}: {{*{name}}} must be the last segment"
                    ));
                }
                if rest {
                    Segment::Rest(name.to_owned())
                } else {
                    Segment::Param(name.to_owned())
                }
            }
            None if part.contains('{') || part.contains('}') => {
                return Err(format!(
                    "path_template {template:?}: a parameter must be a whole segment, not {part:?}"
                ));
            }
            None => Segment::Literal((*part).to_owned()),
        };
        segments.push(segment);
    }
    Ok(segments)
}

impl CompiledRoute {
    /// The captured parameters when the route matches.
    fn matches(
        &self,
        request: &RequestView<'_>,
        host: Option<&str>,
    ) -> Option<Vec<(String, String)>> {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(expected) => host == Some(expected.as_str()),
            HostMatch::Suffix(suffix) => {
                host.is_some_and(|h| h.len() > suffix.len() && h.ends_with(suffix.as_str()))
            }
        };
        if !host_ok {
            return None;
        }
        if !self.methods.is_empty() && !self.methods.contains(request.method) {
            return None;
        }
        let headers_ok = self.headers.iter().all(|(name, expected)| {
            let mut values = request.headers.get_all(name).iter();
            match expected {
                None => values.next().is_some(),
                Some(expected) => values.any(|v| v.as_bytes() == expected.as_bytes()),
            }
        });
        if !headers_ok {
            return None;
        }
        if !self.query.is_empty() {
            let pairs: Vec<(&str, &str)> = request
                .query
                .unwrap_or_default()
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                .collect();
            let query_ok = self.query.iter().all(|(name, expected)| {
                pairs.iter().any(|(key, value)| {
                    key == name && expected.as_ref().is_none_or(|expected| value == expected)
                })
            });
            if !query_ok {
                return None;
            }
        }
        match &self.path {
            PathMatch::Any => Some(Vec::new()),
            PathMatch::Exact(path) => (request.path == path).then(Vec::new),
            PathMatch::Prefix(prefix) => {
                let rest = request.path.strip_prefix(prefix.as_str())?;
                (rest.is_empty() || rest.starts_with('/') || prefix.is_empty()).then(Vec::new)
            }
            PathMatch::Template(segments) => match_template(segments, request.path),
        }
    }
}

fn match_template(segments: &[Segment], path: &str) -> Option<Vec<(String, String)>> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let mut params = Vec::new();
    for segment in segments {
        match segment {
            Segment::Rest(name) => {
                let rest: Vec<&str> = parts.by_ref().collect();
                params.push((name.clone(), rest.join("/")));
                return Some(params);
            }
            Segment::Literal(literal) => {
                if parts.next()? != literal {
                    return None;
                }
            }
            Segment::Param(name) => {
                let value = parts.next().filter(|v| !v.is_empty())?;
                params.push((name.clone(), value.to_owned()));
            }
        }
    }
    parts.next().is_none().then_some(params)
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    fn route(name: &str, priority: i32, matches: MatchConfig) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            priority,
            matches,
        }
    }

    fn find<'t>(
        table: &'t RouteTable,
        method: &Method,
        host: Option<&str>,
        target: &str,
        headers: &HeaderMap,
    ) -> Option<RouteMatch<'t>> {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        table.find(&RequestView {
            method,
            host,
            path,
            query,
            headers,
        })
    }

    fn name<'t>(table: &'t RouteTable, target: &str) -> Option<&'t str> {
        find(
            table,
            &Method::GET,
            Some("api.example.com"),
            target,
            &HeaderMap::new(),
        )
        .map(|m| m.route)
    }

    #[test]
    fn the_most_specific_path_wins_without_priorities() {
        let table = RouteTable::build(&[
            route(
                "catch-all",
                0,
                MatchConfig {
                    path_prefix: Some("/".into()),
                    ..Default::default()
                },
            ),
            route(
                "api",
                0,
                MatchConfig {
                    path_prefix: Some("/api".into()),
                    ..Default::default()
                },
            ),
            route(
                "orders",
                0,
                MatchConfig {
                    path_prefix: Some("/api/orders".into()),
                    ..Default::default()
                },
            ),
            route(
                "order",
                0,
                MatchConfig {
                    path_template: Some("/api/orders/{id}".into()),
                    ..Default::default()
                },
            ),
            route(
                "health",
                0,
                MatchConfig {
                    path: Some("/api/orders/health".into()),
                    ..Default::default()
                },
            ),
        ])
        .expect("valid");
        assert_eq!(name(&table, "/api/orders/health"), Some("health"));
        assert_eq!(name(&table, "/api/orders/42"), Some("order"));
        assert_eq!(name(&table, "/api/orders/42/items"), Some("orders"));
        assert_eq!(name(&table, "/api/orders"), Some("orders"));
        assert_eq!(
            name(&table, "/api/ordersx"),
            Some("api"),
            "prefixes end at a segment"
        );
        assert_eq!(name(&table, "/apix"), Some("catch-all"));
        assert_eq!(name(&table, "/"), Some("catch-all"));
    }

    #[test]
    fn priority_comes_before_specificity_and_order_breaks_ties() {
        let table = RouteTable::build(&[
            route(
                "first",
                0,
                MatchConfig {
                    path_prefix: Some("/a".into()),
                    ..Default::default()
                },
            ),
            route(
                "second",
                0,
                MatchConfig {
                    path_prefix: Some("/b".into()),
                    ..Default::default()
                },
            ),
            route("maintenance", 10, MatchConfig::default()),
        ])
        .expect("valid");
        assert_eq!(table.order(), ["maintenance", "first", "second"]);
        assert_eq!(name(&table, "/a/x"), Some("maintenance"));
    }

    #[test]
    fn templates_capture_parameters_and_the_rest() {
        let table = RouteTable::build(&[route(
            "files",
            0,
            MatchConfig {
                path_template: Some("/users/{user}/files/{*path}".into()),
                ..Default::default()
            },
        )])
        .expect("valid");
        let found = find(
            &table,
            &Method::GET,
            None,
            "/users/ada/files/a/b.txt",
            &HeaderMap::new(),
        )
        .expect("matches");
        assert_eq!(
            found.params,
            vec![
                ("user".into(), "ada".into()),
                ("path".into(), "a/b.txt".into())
            ]
        );
        assert!(
            name(&table, "/users//files/x").is_none(),
            "a parameter is never empty"
        );
        assert!(name(&table, "/users/ada").is_none());
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard_ignoring_case_port_and_a_final_dot() {
        let table = RouteTable::build(&[
            route(
                "exact",
                0,
                MatchConfig {
                    host: Some("api.example.com".into()),
                    ..Default::default()
                },
            ),
            route(
                "wild",
                0,
                MatchConfig {
                    host: Some("*.example.com".into()),
                    ..Default::default()
                },
            ),
            route("other", 0, MatchConfig::default()),
        ])
        .expect("valid");
        let by_host = |host: &str| {
            find(&table, &Method::GET, Some(host), "/", &HeaderMap::new()).map(|m| m.route)
        };
        assert_eq!(by_host("API.example.com:8080"), Some("exact"));
        assert_eq!(
            by_host("api.example.com."),
            Some("exact"),
            "fully qualified"
        );
        assert_eq!(by_host("api.example.com.:443"), Some("exact"));
        assert_eq!(by_host("shop.example.com."), Some("wild"));
        assert_eq!(by_host("shop.example.com"), Some("wild"));
        assert_eq!(by_host("a.b.example.com"), Some("wild"));
        assert_eq!(
            by_host("example.com"),
            Some("other"),
            "the wildcard needs a subdomain"
        );
        assert_eq!(by_host("evil-example.com"), Some("other"));
        assert_eq!(by_host("[::1]:8080"), Some("other"));
    }

    #[test]
    fn methods_headers_and_query_narrow_a_route() {
        let table = RouteTable::build(&[
            route(
                "canary",
                0,
                MatchConfig {
                    path_prefix: Some("/api".into()),
                    methods: vec!["get".into(), "HEAD".into()],
                    headers: [("x-canary".into(), "1".into())].into(),
                    query: [("debug".into(), "*".into())].into(),
                    ..Default::default()
                },
            ),
            route(
                "api",
                0,
                MatchConfig {
                    path_prefix: Some("/api".into()),
                    ..Default::default()
                },
            ),
        ])
        .expect("valid");
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().expect("value"));
        let route_of = |method: &Method, target: &str, headers: &HeaderMap| {
            find(&table, method, None, target, headers).map(|m| m.route)
        };
        assert_eq!(
            route_of(&Method::GET, "/api/x?debug", &canary),
            Some("canary")
        );
        assert_eq!(
            route_of(&Method::GET, "/api/x?a=1&debug=yes", &canary),
            Some("canary")
        );
        assert_eq!(
            route_of(&Method::POST, "/api/x?debug", &canary),
            Some("api")
        );
        assert_eq!(route_of(&Method::GET, "/api/x", &canary), Some("api"));
        assert_eq!(
            route_of(&Method::GET, "/api/x?debug", &HeaderMap::new()),
            Some("api")
        );
    }

    #[test]
    fn invalid_routes_are_rejected_by_name() {
        let cases = [
            (
                MatchConfig {
                    path_prefix: Some("api".into()),
                    ..Default::default()
                },
                "must start",
            ),
            (
                MatchConfig {
                    path_template: Some("/a/{*rest}/b".into()),
                    ..Default::default()
                },
                "last segment",
            ),
            (
                MatchConfig {
                    path_template: Some("/a/x{id}".into()),
                    ..Default::default()
                },
                "whole segment",
            ),
            (
                MatchConfig {
                    path_template: Some("/{id}/{id}".into()),
                    ..Default::default()
                },
                "twice",
            ),
            (
                MatchConfig {
                    host: Some("api.*.com".into()),
                    ..Default::default()
                },
                "wildcard",
            ),
            (
                MatchConfig {
                    methods: vec!["GE T".into()],
                    ..Default::default()
                },
                "method",
            ),
            (
                MatchConfig {
                    path: Some("/a".into()),
                    path_prefix: Some("/a".into()),
                    ..Default::default()
                },
                "one of",
            ),
            // Requests are matched on canonical paths: these could never match.
            (
                MatchConfig {
                    path_prefix: Some("/%61dmin".into()),
                    ..Default::default()
                },
                "write \"/admin\"",
            ),
            (
                MatchConfig {
                    path: Some("/a//b".into()),
                    ..Default::default()
                },
                "write \"/a/b\"",
            ),
            (
                MatchConfig {
                    path_template: Some("/a;v=1/{id}".into()),
                    ..Default::default()
                },
                "';'",
            ),
        ];
        for (matches, needle) in cases {
            let error = RouteTable::build(&[route("bad", 0, matches)]).expect_err(needle);
            assert_eq!(error.route, "bad");
            assert!(error.reason.contains(needle), "{error}");
        }
        let duplicate = RouteTable::build(&[
            route("same", 0, MatchConfig::default()),
            route("same", 0, MatchConfig::default()),
        ])
        .expect_err("duplicate");
        assert!(duplicate.reason.contains("another route"));
    }

    #[test]
    fn routes_parse_from_the_configuration_shape() {
        #[derive(Deserialize)]
        struct Gateway {
            routes: Vec<RouteConfig>,
        }
        let parsed: Gateway = keel_runtime::config::from_toml(
            r#"
            [[routes]]
            name = "orders"
            match = { path_prefix = "/api/orders", methods = ["GET", "POST"] }

            [[routes]]
            name = "legacy"
            priority = -1
            match = { path_prefix = "/" }
            "#,
        )
        .expect("parses");
        let table = RouteTable::build(&parsed.routes).expect("valid");
        assert_eq!(table.order(), ["orders", "legacy"]);
        let unknown = keel_runtime::config::from_toml::<Gateway>(
            "[[routes]]\nname = \"x\"\nmatch = { path_prefx = \"/\" }\n",
        );
        assert!(unknown.is_err());
    }
}
