//! CORS per route (the Fetch standard's protocol): preflights are answered at the gateway
//! and never reach the upstream; responses to allowed origins carry the CORS headers.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use keel_runtime::Problem;
use serde::{Deserialize, Serialize};

use crate::proxy::SOURCE;

/// `cors = { allow_origins = ["https://shop.example"], … }` of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://shop.example`), or `*` for any.
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    /// Request headers a page may send (case-insensitive).
    pub allow_headers: Vec<String>,
    /// Response headers a page may read beyond the CORS-safelisted ones.
    pub expose_headers: Vec<String>,
    /// Cookies and `Authorization` from the browser; not with `*` origins.
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allow_origins: Vec::new(),
            allow_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
                .map(String::from)
                .to_vec(),
            allow_headers: ["authorization", "content-type"].map(String::from).to_vec(),
            expose_headers: Vec::new(),
            allow_credentials: false,
            max_age: Duration::from_secs(600),
        }
    }
}

/// A compiled [`CorsConfig`].
#[derive(Debug)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: Vec<Method>,
    headers: Vec<HeaderName>,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

fn list_value(items: &[String], field: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&items.join(", ")).map_err(|_| format!("cors.{field} has a bad value"))
}

impl Cors {
    pub fn compile(config: &CorsConfig) -> Result<Self, String> {
        let any_origin = config.allow_origins.iter().any(|o| o == "*");
        if any_origin && config.allow_credentials {
            return Err("cors: allow_credentials cannot go with the origin \"*\"".into());
        }
        if config.allow_origins.is_empty() {
            return Err("cors.allow_origins is empty".into());
        }
        for origin in config.allow_origins.iter().filter(|o| *o != "*") {
            let uri: http::Uri = origin
                .parse()
                .map_err(|_| format!("cors.allow_origins: {origin:?} is not an origin"))?;
            let bare =
                uri.path_and_query().is_none_or(|p| p.as_str() == "/") && !origin.ends_with('/');
            if uri.scheme().is_none() || uri.host().is_none() || !bare {
                return Err(format!(
                    "cors.allow_origins: {origin:?} must be scheme://host[:port], nothing more"
                ));
            }
        }
        let methods = config
            .allow_methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("cors.allow_methods: {m:?} is not a method"))
            })
            .collect::<Result<_, _>>()?;
        let headers = config
            .allow_headers
            .iter()
            .map(|h| {
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("cors.allow_headers: {h:?} is not a header name"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            any_origin,
            origins: config.allow_origins.clone(),
            methods,
            headers,
            allow_methods: list_value(&config.allow_methods, "allow_methods")?,
            allow_headers: list_value(&config.allow_headers, "allow_headers")?,
            expose_headers: (!config.expose_headers.is_empty())
                .then(|| list_value(&config.expose_headers, "expose_headers"))
                .transpose()?,
            credentials: config.allow_credentials,
            max_age: HeaderValue::from(config.max_age.as_secs()),
        })
    }

    fn allowed_origin<'h>(&self, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        (self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(text)))
            .then_some(origin)
    }

    fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// Answers a preflight.
    pub fn preflight(&self, request: &HeaderMap) -> Response {
        let refuse = |why: &str| {
            Problem::new(
                StatusCode::FORBIDDEN,
                "cors-refused",
                "CORS preflight refused",
            )
            .with_detail(why.to_owned())
            .with_source(SOURCE)
            .into_response()
        };
        let Some(origin) = self.allowed_origin(request) else {
            return refuse("the origin is not allowed");
        };
        let method = request
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        if !method.is_some_and(|m| self.methods.contains(&m)) {
            return refuse("the method is not allowed");
        }
        let requested = request
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty());
        for name in requested {
            if !self
                .headers
                .iter()
                .any(|h| h.as_str().eq_ignore_ascii_case(name))
            {
                return refuse("a requested header is not allowed");
            }
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(origin),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        headers.insert(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        response
    }

    /// Adds the CORS headers to a response for an allowed origin.
    pub fn decorate(&self, request: &HeaderMap, response: &mut HeaderMap) {
        if !self.any_origin {
            response.append(header::VARY, HeaderValue::from_static("origin"));
        }
        let Some(origin) = self.allowed_origin(request) else {
            return;
        };
        response.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(origin),
        );
        if self.credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

/// Whether a request is a CORS preflight, and for which method.
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(header::ORIGIN) {
        return None;
    }
    headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(config: CorsConfig) -> Cors {
        Cors::compile(&config).unwrap()
    }

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered() {
        let cors = cors(CorsConfig {
            allow_origins: vec!["https://shop.example".into()],
            allow_credentials: true,
            ..CorsConfig::default()
        });
        let response = cors.preflight(&request(&[
            ("origin", "https://shop.example"),
            ("access-control-request-method", "PUT"),
            (
                "access-control-request-headers",
                "Content-Type, authorization",
            ),
        ]));
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://shop.example"
        );
        assert_eq!(headers["access-control-allow-credentials"], "true");
        assert_eq!(headers["access-control-max-age"], "600");

        for refused in [
            request(&[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "GET"),
            ]),
            request(&[
                ("origin", "https://shop.example"),
                ("access-control-request-method", "TRACE"),
            ]),
            request(&[
                ("origin", "https://shop.example"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-secret"),
            ]),
        ] {
            assert_eq!(cors.preflight(&refused).status(), StatusCode::FORBIDDEN);
        }
    }

    #[test]
    fn responses_carry_headers_only_for_allowed_origins() {
        let cors = cors(CorsConfig {
            allow_origins: vec!["https://shop.example".into()],
            expose_headers: vec!["x-request-id".into()],
            ..CorsConfig::default()
        });
        let mut response = HeaderMap::new();
        cors.decorate(
            &request(&[("origin", "https://shop.example")]),
            &mut response,
        );
        assert_eq!(
            response["access-control-allow-origin"],
            "https://shop.example"
        );
        assert_eq!(response["access-control-expose-headers"], "x-request-id");
        assert_eq!(response["vary"], "origin");
        let mut response = HeaderMap::new();
        cors.decorate(
            &request(&[("origin", "https://evil.example")]),
            &mut response,
        );
        assert!(!response.contains_key("access-control-allow-origin"));
    }

    #[test]
    fn bad_settings_are_refused() {
        for (config, expected) in [
            (
                CorsConfig {
                    allow_origins: vec!["*".into()],
                    allow_credentials: true,
                    ..CorsConfig::default()
                },
                "allow_credentials",
            ),
            (
                CorsConfig {
                    allow_origins: vec!["https://shop.example/path".into()],
                    ..CorsConfig::default()
                },
                "scheme://host",
            ),
            (CorsConfig::default(), "empty"),
        ] {
            let error = Cors::compile(&config).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }
}
