//! Authorization, CORS and rate limits at the gateway, against a real token issuer, real
//! upstreams and the real Redis (behind a fault proxy where the link must break).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, StatusCode};
use keel_gateway::auth::{Requirement, RouteAuthConfig};
use keel_gateway::balance::{BalanceConfig, HashKeyConfig};
use keel_gateway::config::{GatewayRouteConfig, HeaderActionsConfig, UpstreamProtocol};
use keel_gateway::cors::CorsConfig;
use keel_gateway::ratelimit::{FailurePolicy, RateKey, RateLimitBackendConfig, RateLimitConfig};
use keel_gateway::route::MatchConfig;
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_jwt::VerifierConfig;
use keel_jwt::testing::{MintOptions, TestIssuer, TestKey};
use keel_runtime::{Secret, Shutdown};
use keel_testkit::{FaultProxy, Service};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Running, Upstream, exchange, route_to, test_config};

/// The claim headers the gateway forwards; the upstreams here echo them.
const CLAIM_HEADERS: &[&str] = &[
    "x-keel-subject",
    "x-keel-client-id",
    "x-keel-scopes",
    "x-keel-roles",
];

const SHOP: &str = "https://shop.example";
const EVIL: &str = "https://evil.example";

// === helpers ===

/// A running gateway and its admin API's base URL.
async fn start(config: GatewayConfig) -> Running {
    Running::start(config).await
}

/// Trusts `issuer` for its audience. No minimum between key fetches, so a rotated key is
/// picked up by the very next token that names it.
fn verifier_config(issuer: &TestIssuer) -> VerifierConfig {
    VerifierConfig {
        audiences: vec![keel_jwt::testing::AUDIENCE.into()],
        min_refresh_interval: Duration::ZERO,
        ..issuer.config()
    }
}

/// A gateway that verifies `issuer`'s tokens.
async fn start_with_auth(issuer: &TestIssuer, routes: Vec<GatewayRouteConfig>) -> Running {
    start(GatewayConfig {
        auth: Some(verifier_config(issuer)),
        ..test_config(routes)
    })
    .await
}

/// A route on `prefix` to `upstream`.
fn on(name: &str, prefix: &str, upstream: &Upstream) -> GatewayRouteConfig {
    GatewayRouteConfig {
        matches: MatchConfig {
            path_prefix: Some(prefix.into()),
            ..MatchConfig::default()
        },
        ..route_to(name, &[upstream])
    }
}

fn authenticated(route: GatewayRouteConfig, scopes: &[&str], roles: &[&str]) -> GatewayRouteConfig {
    GatewayRouteConfig {
        auth: RouteAuthConfig {
            require: Requirement::Authenticated,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        },
        ..route
    }
}

fn limited(
    route: GatewayRouteConfig,
    key: RateKey,
    burst: u32,
    per_second: f64,
) -> GatewayRouteConfig {
    GatewayRouteConfig {
        rate_limit: Some(RateLimitConfig {
            key,
            per_second,
            burst,
            shared: false,
        }),
        ..route
    }
}

fn shared(mut route: GatewayRouteConfig) -> GatewayRouteConfig {
    route.rate_limit.as_mut().unwrap().shared = true;
    route
}

/// Shared limits in the Redis at `url`, under a key prefix of their own.
fn redis_backend(url: String, on_error: FailurePolicy) -> RateLimitBackendConfig {
    RateLimitBackendConfig {
        redis: Some(Secret::new(url)),
        key_prefix: format!("{}:", keel_testkit::unique_name("keel-test-ratelimit")),
        // Generous, so a busy machine does not turn into a store error.
        timeout: Duration::from_secs(1),
        on_error,
    }
}

fn with_cors(route: GatewayRouteConfig) -> GatewayRouteConfig {
    GatewayRouteConfig {
        cors: Some(CorsConfig {
            allow_origins: vec![SHOP.into()],
            expose_headers: vec!["x-upstream".into()],
            max_age: Duration::from_secs(120),
            ..CorsConfig::default()
        }),
        ..route
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name).map(|v| v.parse().unwrap())
}

/// Asserts a problem document of `status` that the gateway made itself (nothing came from
/// the upstream); returns the headers and the body.
async fn gateway_problem(response: reqwest::Response, status: StatusCode) -> (HeaderMap, String) {
    let headers = response.headers().clone();
    let actual = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(actual, status, "{body}");
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/problem+json")
    );
    assert!(
        !headers.contains_key("x-upstream"),
        "the gateway answered itself"
    );
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["source"], "gateway", "{body}");
    assert_eq!(problem["status"], status.as_u16(), "{body}");
    (headers, body)
}

/// A 200 from the upstream; returns its body.
async fn upstream_ok(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

// === JWT ===

#[tokio::test]
async fn a_missing_token_is_challenged_and_a_valid_one_forwards_its_claims() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start_echoing("orders", CLAIM_HEADERS);
    let gateway = start_with_auth(
        &issuer,
        vec![authenticated(on("orders", "/orders", &upstream), &[], &[])],
    )
    .await;
    let url = format!("{}/orders/1", gateway.proxy.url);
    let client = keel_testkit::http();

    for request in [
        client.get(&url),
        client
            .get(&url)
            .header("authorization", "Basic dXNlcjpwYXNz"),
        client.get(&url).header("authorization", "Bearer "),
    ] {
        let (headers, _) =
            gateway_problem(request.send().await.unwrap(), StatusCode::UNAUTHORIZED).await;
        // RFC 6750 §3.1: no error code when the request carried no credentials.
        assert_eq!(
            header(&headers, "www-authenticate"),
            Some("Bearer realm=\"keel\"")
        );
    }
    assert_eq!(upstream.hits(), 0);

    let token = issuer.mint(json!({
        "scope": "orders:write orders:read",
        "roles": ["ops", "admin"],
    }));
    let body = upstream_ok(client.get(&url).bearer_auth(&token).send().await.unwrap()).await;
    assert!(body.starts_with("orders GET /orders/1 "), "{body}");
    for expected in [
        "x-keel-subject=user-1",
        "x-keel-client-id=test-client",
        "x-keel-scopes=orders:read orders:write",
        "x-keel-roles=admin ops",
    ] {
        assert!(body.contains(expected), "{expected} in {body}");
    }
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn a_path_reaches_the_route_the_upstream_will_read_it_as() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("app");
    // The admin API behind a token, everything else of the same upstream open: a path
    // that the upstream reads as /admin/... must meet the admin route's policy.
    let gateway = start_with_auth(
        &issuer,
        vec![
            authenticated(on("admin", "/admin", &upstream), &[], &["admin"]),
            on("public", "/", &upstream),
        ],
    )
    .await;
    let addr = gateway.proxy.addr.to_string();
    let get = |target: &str, token: Option<&str>| {
        let authorization = token.map_or(String::new(), |token| {
            format!("authorization: Bearer {token}\r\n")
        });
        format!("GET {target} HTTP/1.1\r\nhost: x\r\n{authorization}connection: close\r\n\r\n")
    };
    for disguised in [
        "/%61dmin/users",
        "/%61%64min/users",
        "/public/../admin/users",
        "/public/%2e%2e/admin/users",
        "/public/%2E./admin/users",
        "//admin/users",
        "/./admin//users",
    ] {
        let (answer, _) = exchange(&addr, get(disguised, None).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{disguised}: {answer}");
    }
    assert_eq!(upstream.hits(), 0);
    // With a token the route's own answer, and the upstream is sent the canonical path.
    let admin = issuer.mint(json!({"roles": ["admin"]}));
    let (answer, _) = exchange(
        &addr,
        get("/public/%2e%2e/%61dmin//users", Some(&admin)).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("app GET /admin/users "), "{answer}");
    let (answer, _) = exchange(&addr, get("/docs/./a%7e%c3%a9/?q=%2F..", None).as_bytes()).await;
    assert!(
        answer.contains("app GET /docs/a~%C3%A9/?q=%2F.. "),
        "{answer}"
    );
    // What could be read two ways is refused, never forwarded.
    for ambiguous in [
        "/admin%2Fusers",
        "/public%2f..%2fadmin",
        "/a%5Cb",
        "/a%00",
        "/a%g1",
        "/admin;x/users",
        "/public/..;/admin/users",
    ] {
        let (answer, _) = exchange(&addr, get(ambiguous, None).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{ambiguous}: {answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn client_supplied_claim_headers_never_reach_the_upstream() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start_echoing("u", CLAIM_HEADERS);
    let gateway = start_with_auth(
        &issuer,
        vec![
            on("public", "/public", &upstream),
            authenticated(on("private", "/private", &upstream), &[], &[]),
        ],
    )
    .await;
    let client = keel_testkit::http();
    let forged = |request: reqwest::RequestBuilder| {
        request
            .header("x-keel-subject", "admin")
            .header("X-Keel-Subject", "root")
            .header("x-keel-client-id", "forged-client")
            .header("x-keel-scopes", "forged:scope")
            .header("x-keel-roles", "forged-role")
    };

    let body = upstream_ok(
        forged(client.get(format!("{}/public/x", gateway.proxy.url)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!body.contains("x-keel-"), "anonymous route: {body}");

    let token = issuer.mint(json!({"roles": ["viewer"]}));
    let body = upstream_ok(
        forged(client.get(format!("{}/private/x", gateway.proxy.url)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(body.contains(" x-keel-subject=user-1 "), "{body}");
    assert!(body.contains(" x-keel-client-id=test-client "), "{body}");
    assert!(body.contains(" x-keel-roles=viewer "), "{body}");
    for forged in ["admin", "root", "forged"] {
        assert!(
            !body.contains(forged),
            "{forged} reached the upstream: {body}"
        );
    }

    // A token without a client id: the client's copy is not left standing in for it.
    let token = issuer.mint(json!({"client_id": null}));
    let body = upstream_ok(
        forged(client.get(format!("{}/private/x", gateway.proxy.url)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!body.contains("x-keel-client-id"), "{body}");
    assert!(!body.contains("forged"), "{body}");
}

/// An `alg: none` token: the claims of a valid one, no signature.
fn unsigned(issuer: &TestIssuer) -> String {
    let part = |value: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap());
    format!(
        "{}.{}.",
        part(&json!({"alg": "none", "typ": "at+jwt"})),
        part(&Value::Object(issuer.claims()))
    )
}

/// HS256 with the issuer's RSA public key (which anyone has) as the HMAC secret: the
/// algorithm-confusion forgery.
fn hs256_with_public_key(issuer: &TestIssuer) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(TestKey::Rsa1.kid().into());
    header.typ = Some("at+jwt".into());
    let secret = jsonwebtoken::EncodingKey::from_secret(TestKey::Rsa1.public_pem().as_bytes());
    jsonwebtoken::encode(&header, &issuer.claims(), &secret).unwrap()
}

/// A valid token whose claims were changed afterwards, signature kept.
fn tampered(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("admin");
    claims["roles"] = json!(["admin"]);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn invalid_tokens_are_refused_with_invalid_token() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("u");
    let gateway = start_with_auth(
        &issuer,
        vec![authenticated(route_to("r", &[&upstream]), &[], &[])],
    )
    .await;
    let client = keel_testkit::http();
    let now = now();
    let cases = [
        (
            "expired",
            issuer.mint(json!({"iat": now - 900, "exp": now - 300})),
            "expired",
        ),
        (
            "not yet valid",
            issuer.mint(json!({"nbf": now + 900})),
            "not valid yet",
        ),
        (
            "wrong issuer",
            issuer.mint(json!({"iss": "http://issuer.evil.example"})),
            "untrusted issuer",
        ),
        (
            "wrong audience",
            issuer.mint(json!({"aud": ["another-api"]})),
            "not intended for this audience",
        ),
        ("alg none", unsigned(&issuer), "algorithm is not accepted"),
        (
            "HS256 keyed with the public key",
            hs256_with_public_key(&issuer),
            "algorithm is not accepted",
        ),
        (
            "tampered payload",
            tampered(&issuer.mint(json!({}))),
            "signature is invalid",
        ),
        (
            "not an access token",
            issuer.mint_with(
                MintOptions {
                    typ: Some(Some("JWT".into())),
                    ..MintOptions::default()
                },
                json!({}),
            ),
            "not an access token",
        ),
        (
            "signed by a key the issuer never published",
            issuer.mint_with(
                MintOptions {
                    key: Some(TestKey::Rsa2),
                    ..MintOptions::default()
                },
                json!({}),
            ),
            "unknown key",
        ),
    ];
    for (case, token, reason) in cases {
        let response = client
            .get(&gateway.proxy.url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (headers, body) = gateway_problem(response, StatusCode::UNAUTHORIZED).await;
        let challenge = header(&headers, "www-authenticate").unwrap();
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
            "{case}: {challenge}"
        );
        assert!(challenge.contains(reason), "{case}: {challenge}");
        assert!(body.contains(reason), "{case}: {body}");
        // Neither the token nor any part of it is echoed.
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(
                !body.contains(part) && !challenge.contains(part),
                "{case}: {body}"
            );
        }
    }
    assert_eq!(upstream.hits(), 0, "no refused token reached the upstream");

    // The same issuer's valid token passes, so the refusals above were about the tokens.
    let response = client
        .get(&gateway.proxy.url)
        .bearer_auth(issuer.mint(json!({})))
        .send()
        .await
        .unwrap();
    upstream_ok(response).await;
}

#[tokio::test]
async fn a_rotated_key_is_accepted_after_one_key_refetch() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("u");
    let gateway = start_with_auth(
        &issuer,
        vec![authenticated(route_to("r", &[&upstream]), &[], &[])],
    )
    .await;
    let client = keel_testkit::http();
    let call = |token: String| client.get(&gateway.proxy.url).bearer_auth(token).send();

    let old = issuer.mint(json!({}));
    upstream_ok(call(old.clone()).await.unwrap()).await;
    assert_eq!(issuer.fetch_count(), 1, "keys fetched on first use");
    upstream_ok(call(issuer.mint(json!({}))).await.unwrap()).await;
    assert_eq!(issuer.fetch_count(), 1, "and then cached");

    // Signed with rsa-2 before the issuer publishes it: one refetch, still unknown.
    let early = issuer.mint_with(
        MintOptions {
            key: Some(TestKey::Rsa2),
            ..MintOptions::default()
        },
        json!({}),
    );
    let (headers, _) = gateway_problem(call(early).await.unwrap(), StatusCode::UNAUTHORIZED).await;
    assert!(
        header(&headers, "www-authenticate")
            .unwrap()
            .contains("unknown key")
    );
    assert_eq!(issuer.fetch_count(), 2);

    assert_eq!(issuer.rotate(), TestKey::Rsa2);
    let rotated = issuer.mint(json!({}));
    upstream_ok(call(rotated.clone()).await.unwrap()).await;
    assert_eq!(
        issuer.fetch_count(),
        3,
        "exactly one refetch for the new kid"
    );
    upstream_ok(call(rotated).await.unwrap()).await;
    upstream_ok(call(old).await.unwrap()).await;
    assert_eq!(
        issuer.fetch_count(),
        3,
        "the new key and the still-published old one are both cached"
    );
}

#[tokio::test]
async fn scopes_must_all_be_held_and_one_role_suffices() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("u");
    let gateway = start_with_auth(
        &issuer,
        vec![
            authenticated(
                on("write", "/orders", &upstream),
                &["orders:read", "orders:write"],
                &[],
            ),
            authenticated(on("admin", "/admin", &upstream), &[], &["admin", "ops"]),
        ],
    )
    .await;
    let client = keel_testkit::http();
    let call = |path: &str, claims: Value| {
        client
            .get(format!("{}{path}", gateway.proxy.url))
            .bearer_auth(issuer.mint(claims))
            .send()
    };

    for claims in [
        json!({}),
        json!({"scope": "orders:read"}),
        json!({"scope": "orders:read orders:writer"}),
    ] {
        let response = call("/orders", claims.clone()).await.unwrap();
        let (headers, _) = gateway_problem(response, StatusCode::FORBIDDEN).await;
        let challenge = header(&headers, "www-authenticate").unwrap();
        assert!(
            challenge.contains("error=\"insufficient_scope\"")
                && challenge.contains("scope=\"orders:read orders:write\""),
            "{claims}: {challenge}"
        );
    }
    let response = call(
        "/orders",
        json!({"scope": "orders:write profile orders:read"}),
    );
    upstream_ok(response.await.unwrap()).await;

    for claims in [
        json!({}),
        json!({"roles": []}),
        json!({"roles": ["viewer", "Admin"]}),
    ] {
        let response = call("/admin", claims).await.unwrap();
        gateway_problem(response, StatusCode::FORBIDDEN).await;
    }
    upstream_ok(
        call("/admin", json!({"roles": ["viewer", "ops"]}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        upstream.hits(),
        2,
        "only the two permitted requests went upstream"
    );
}

#[tokio::test]
async fn unavailable_signing_keys_mean_503_not_401() {
    let issuer = TestIssuer::start().await;
    issuer.set_available(false);
    let upstream = Upstream::start("u");
    let gateway = start_with_auth(
        &issuer,
        vec![authenticated(route_to("r", &[&upstream]), &[], &[])],
    )
    .await;
    let client = keel_testkit::http();
    let token = issuer.mint(json!({}));

    let response = client
        .get(&gateway.proxy.url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (headers, body) = gateway_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(number(&headers, "retry-after").unwrap() >= 1);
    assert!(
        !headers.contains_key("www-authenticate"),
        "the token was not judged, so it is not challenged"
    );
    assert!(!body.contains(&token));
    assert!(
        issuer.fetch_count() + issuer.metadata_fetch_count() > 0,
        "it tried"
    );

    // Once the issuer answers again, the same token passes.
    issuer.set_available(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = client
            .get(&gateway.proxy.url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::OK => break,
            StatusCode::SERVICE_UNAVAILABLE if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!(upstream.hits(), 1);
}

// === CORS ===

#[tokio::test]
async fn cors_preflights_are_answered_at_the_gateway() {
    let upstream = Upstream::start("u");
    let mut edit = with_cors(on("edit", "/items", &upstream));
    edit.matches.methods = vec!["PUT".into()];
    let mut read = with_cors(on("read", "/pages", &upstream));
    read.matches.methods = vec!["GET".into()];
    let running = start(test_config(vec![
        edit,
        read,
        on("plain", "/plain", &upstream),
    ]))
    .await;
    let url = |path: &str| format!("{}{path}", running.proxy.url);
    let client = keel_testkit::http();
    let preflight = |path: &str, origin: &str, method: &str, headers: &str| {
        client
            .request(Method::OPTIONS, url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
    };

    // The route only takes PUT; the preflight asking about PUT is matched to it.
    let response = preflight("/items/7", SHOP, "PUT", "Content-Type, authorization")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let headers = response.headers();
    assert_eq!(header(headers, "access-control-allow-origin"), Some(SHOP));
    let methods = header(headers, "access-control-allow-methods").unwrap();
    assert!(methods.split(", ").any(|m| m == "PUT"), "{methods}");
    let allowed = header(headers, "access-control-allow-headers").unwrap();
    assert!(allowed.contains("content-type") && allowed.contains("authorization"));
    assert_eq!(header(headers, "access-control-max-age"), Some("120"));
    assert!(!headers.contains_key("access-control-allow-credentials"));
    assert!(header(headers, "vary").unwrap().contains("origin"));
    assert!(!headers.contains_key("x-upstream"));
    assert_eq!(upstream.hits(), 0, "answered at the gateway");

    for (origin, headers) in [(EVIL, "content-type"), (SHOP, "x-secret")] {
        let response = preflight("/items/7", origin, "PUT", headers).await.unwrap();
        let (headers, _) = gateway_problem(response, StatusCode::FORBIDDEN).await;
        assert!(!headers.contains_key("access-control-allow-origin"));
    }
    assert_eq!(upstream.hits(), 0, "refused at the gateway too");

    // Actual requests: allowed origins get the headers, others do not.
    let response = client
        .put(url("/items/7"))
        .header("origin", SHOP)
        .body("x")
        .send()
        .await
        .unwrap();
    let headers = response.headers().clone();
    assert_eq!(upstream_ok(response).await, "u PUT /items/7 body=x");
    assert_eq!(header(&headers, "access-control-allow-origin"), Some(SHOP));
    assert_eq!(
        header(&headers, "access-control-expose-headers"),
        Some("x-upstream")
    );

    let response = client
        .get(url("/pages/1"))
        .header("origin", SHOP)
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        Some(SHOP)
    );
    upstream_ok(response).await;
    let response = client
        .get(url("/pages/1"))
        .header("origin", EVIL)
        .send()
        .await
        .unwrap();
    let headers = response.headers().clone();
    upstream_ok(response).await;
    assert!(!headers.contains_key("access-control-allow-origin"));
    assert!(!headers.contains_key("access-control-expose-headers"));
    assert_eq!(upstream.hits(), 3);

    // A route without CORS: OPTIONS is an ordinary request, preflight-shaped or not.
    let response = client
        .request(Method::OPTIONS, url("/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(upstream_ok(response).await, "u OPTIONS /plain body=");
    let response = preflight("/plain", SHOP, "GET", "content-type")
        .await
        .unwrap();
    let headers = response.headers().clone();
    assert_eq!(upstream_ok(response).await, "u OPTIONS /plain body=");
    assert!(!headers.contains_key("access-control-allow-origin"));
    assert_eq!(upstream.hits(), 5);
}

#[tokio::test]
async fn a_preflight_needs_no_token_and_refusals_carry_cors_headers() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("u");
    let route = with_cors(authenticated(route_to("r", &[&upstream]), &[], &[]));
    let gateway = start_with_auth(&issuer, vec![route]).await;
    let client = keel_testkit::http();

    let response = client
        .request(Method::OPTIONS, format!("{}/orders", gateway.proxy.url))
        .header("origin", SHOP)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "browsers send no token on preflights"
    );
    assert_eq!(
        header(response.headers(), "access-control-allow-origin"),
        Some(SHOP)
    );

    // The page can read why it was refused.
    let response = client
        .post(format!("{}/orders", gateway.proxy.url))
        .header("origin", SHOP)
        .send()
        .await
        .unwrap();
    let (headers, _) = gateway_problem(response, StatusCode::UNAUTHORIZED).await;
    assert_eq!(header(&headers, "access-control-allow-origin"), Some(SHOP));
    assert_eq!(upstream.hits(), 0);
}

// === local rate limits ===

#[tokio::test]
async fn a_burst_passes_then_429_with_retry_after_and_ratelimit_headers() {
    let upstream = Upstream::start("u");
    let route = limited(route_to("r", &[&upstream]), RateKey::ClientIp, 3, 1.0);
    let running = start(test_config(vec![route])).await;
    let client = keel_testkit::http();

    let mut remaining = Vec::new();
    for _ in 0..3 {
        let response = client.get(&running.proxy.url).send().await.unwrap();
        let headers = response.headers().clone();
        upstream_ok(response).await;
        assert_eq!(number(&headers, "ratelimit-limit"), Some(3));
        assert!(number(&headers, "ratelimit-reset").is_some());
        remaining.push(number(&headers, "ratelimit-remaining").unwrap());
    }
    assert_eq!(remaining, [2, 1, 0]);

    let response = client.get(&running.proxy.url).send().await.unwrap();
    let (headers, body) = gateway_problem(response, StatusCode::TOO_MANY_REQUESTS).await;
    let retry_after = number(&headers, "retry-after").unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(number(&headers, "ratelimit-limit"), Some(3));
    assert_eq!(number(&headers, "ratelimit-remaining"), Some(0));
    let reset = number(&headers, "ratelimit-reset").unwrap();
    assert!((1..=3).contains(&reset), "{reset}");
    assert!(body.contains("rate limit"), "{body}");
    assert_eq!(
        upstream.hits(),
        3,
        "the refused request did not go upstream"
    );
}

#[tokio::test]
async fn each_api_key_has_its_own_bucket() {
    let upstream = Upstream::start("u");
    let route = limited(
        route_to("r", &[&upstream]),
        RateKey::Header("x-api-key".into()),
        2,
        0.01,
    );
    let running = start(test_config(vec![route])).await;
    let client = keel_testkit::http();
    let statuses = |key: Option<&'static str>| {
        let (client, url) = (client.clone(), running.proxy.url.clone());
        async move {
            let mut statuses = Vec::new();
            for _ in 0..3 {
                let mut request = client.get(&url);
                if let Some(key) = key {
                    request = request.header("x-api-key", key);
                }
                statuses.push(request.send().await.unwrap().status().as_u16());
            }
            statuses
        }
    };
    assert_eq!(statuses(Some("key-a")).await, [200, 200, 429]);
    assert_eq!(statuses(Some("key-b")).await, [200, 200, 429]);
    // Without the header, the client IP is the key: another bucket again.
    assert_eq!(statuses(None).await, [200, 200, 429]);
    assert_eq!(statuses(Some("key-a")).await, [429, 429, 429]);
    assert_eq!(upstream.hits(), 6);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_ip_has_its_own_bucket() {
    for trusted in [false, true] {
        let upstream = Upstream::start("u");
        let route = limited(route_to("r", &[&upstream]), RateKey::ClientIp, 2, 0.01);
        let mut config = test_config(vec![route]);
        if trusted {
            config.trusted_proxies =
                keel_runtime::TrustedProxies::try_from(vec!["127.0.0.0/8".to_owned()]).unwrap();
        }
        let running = start(config).await;
        let client = keel_testkit::http();
        let statuses = |forwarded_for: &'static str| {
            let (client, url) = (client.clone(), running.proxy.url.clone());
            async move {
                let mut statuses = Vec::new();
                for _ in 0..3 {
                    let request = client.get(&url).header("x-forwarded-for", forwarded_for);
                    statuses.push(request.send().await.unwrap().status().as_u16());
                }
                statuses
            }
        };
        assert_eq!(statuses("203.0.113.1").await, [200, 200, 429]);
        if trusted {
            // Each client behind the proxy counts on its own...
            assert_eq!(statuses("203.0.113.2").await, [200, 200, 429]);
            // ...and what a client writes before the address the proxy vouches for is
            // not believed.
            assert_eq!(statuses("198.51.100.9, 203.0.113.1").await, [429, 429, 429]);
        } else {
            // Not trusted, the header is the client's own word: one bucket, the peer's.
            assert_eq!(statuses("203.0.113.2").await, [429, 429, 429]);
        }
    }
}

#[tokio::test]
async fn each_subject_has_its_own_bucket() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("u");
    let route = limited(
        authenticated(route_to("r", &[&upstream]), &[], &[]),
        RateKey::Subject,
        2,
        0.01,
    );
    let gateway = start_with_auth(&issuer, vec![route]).await;
    let client = keel_testkit::http();
    let status = |subject: &str| {
        // A fresh token each time: the bucket belongs to the subject, not the token.
        let token = issuer.mint(json!({"sub": subject}));
        let request = client.get(&gateway.proxy.url).bearer_auth(token);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut seen = Vec::new();
    for subject in ["alice", "alice", "alice", "bob", "bob", "alice", "bob"] {
        seen.push(status(subject).await);
    }
    assert_eq!(seen, [200, 200, 429, 200, 200, 429, 429]);
    assert_eq!(upstream.hits(), 4);
}

/// A limit keyed by a header the gateway adds from the token (`x-keel-subject`) counts by
/// the verified value, which the client cannot choose, and never by the client's copy.
#[tokio::test]
async fn a_limit_keyed_by_a_claim_header_counts_by_the_verified_claim() {
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start("u");
    let route = limited(
        authenticated(route_to("r", &[&upstream]), &[], &[]),
        RateKey::Header("X-Keel-Subject".into()),
        1,
        0.01,
    );
    let gateway = start_with_auth(&issuer, vec![route]).await;
    let client = keel_testkit::http();
    let status = |subject: &str, forged: &str| {
        let token = issuer.mint(json!({"sub": subject}));
        let request = client
            .get(&gateway.proxy.url)
            .bearer_auth(token)
            .header("x-keel-subject", forged);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut seen = Vec::new();
    // From one address: alice's bucket, then bob's; a forged subject changes nothing.
    for (subject, forged) in [("alice", "a"), ("alice", "b"), ("bob", "a"), ("bob", "c")] {
        seen.push(status(subject, forged).await);
    }
    assert_eq!(seen, [200, 429, 200, 429]);
    assert_eq!(upstream.hits(), 2);
}

// === shared rate limits (Redis) ===

#[tokio::test]
async fn a_shared_limit_is_one_bucket_across_gateway_instances() {
    if !keel_testkit::require(Service::Redis) {
        return;
    }
    let upstream = Upstream::start("u");
    // A slow refill (one every 10 s), so the ten requests below all see the same burst.
    let route = shared(limited(
        route_to("orders", &[&upstream]),
        RateKey::ClientIp,
        5,
        0.1,
    ));
    let backend = redis_backend(
        format!("redis://{}", Service::Redis.addr()),
        // Deny on store errors, so a Redis hiccup shows as a 503 instead of an uncounted pass.
        FailurePolicy::Deny,
    );
    let config = GatewayConfig {
        rate_limit: backend.clone(),
        ..test_config(vec![route])
    };
    let (a, b) = (start(config.clone()).await, start(config).await);
    let client = keel_testkit::http();

    let mut remaining = Vec::new();
    let mut refused = [0, 0];
    for n in 0..10 {
        let gateway = if n % 2 == 0 { &a } else { &b };
        let response = client.get(&gateway.proxy.url).send().await.unwrap();
        match response.status() {
            StatusCode::OK => {
                assert_eq!(number(response.headers(), "ratelimit-limit"), Some(5));
                remaining.push(number(response.headers(), "ratelimit-remaining").unwrap());
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let (headers, _) = gateway_problem(response, StatusCode::TOO_MANY_REQUESTS).await;
                assert!(number(&headers, "retry-after").unwrap() >= 1);
                refused[n % 2] += 1;
            }
            other => panic!("request {n}: {other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!(
        remaining,
        [4, 3, 2, 1, 0],
        "one bucket, counted down by both gateways"
    );
    assert_eq!(refused, [2, 3], "both gateways refuse once it is empty");
    assert_eq!(upstream.hits(), 5);

    // The bucket is one key under the configured prefix, and it expires.
    let redis = redis::Client::open(format!("redis://{}", Service::Redis.addr())).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", backend.key_prefix))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys, [format!("{}orders:ip:127.0.0.1", backend.key_prefix)]);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 50_000, "{ttl}");
    let _: i64 = redis::cmd("DEL")
        .arg(&keys[0])
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// The value of a counter with only a `route` label in a Prometheus exposition.
fn counter(metrics: &str, name: &str, route: &str) -> Option<f64> {
    let prefix = format!("{name}{{route=\"{route}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.parse().unwrap())
}

/// Sends requests until `done` accepts one (returning its headers) or 10 s pass.
async fn until(
    client: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(StatusCode, &HeaderMap) -> bool,
) -> HeaderMap {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = client.get(url).send().await.unwrap();
        let headers = response.headers().clone();
        if done(response.status(), &headers) {
            return headers;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} {:?}",
            response.status(),
            response.text().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis behind a fault proxy, and two gateways counting a shared limit in it: one
/// failing open, one failing closed. `None` when Redis is not running (SKIP).
struct Outage {
    proxy: FaultProxy,
    open: Running,
    closed: Running,
    _upstream: Upstream,
}

async fn outage(prefix: &str) -> Option<Outage> {
    if !keel_testkit::require(Service::Redis) {
        return None;
    }
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let url = format!("redis://{}", proxy.addr());
    let upstream = Upstream::start("u");
    let gateway = |name: String, on_error| {
        let route = shared(limited(
            route_to(&name, &[&upstream]),
            RateKey::ClientIp,
            1_000,
            1_000.0,
        ));
        start(GatewayConfig {
            rate_limit: redis_backend(url.clone(), on_error),
            ..test_config(vec![route])
        })
    };
    let open = gateway(format!("{prefix}-fail-open"), FailurePolicy::Allow).await;
    let closed = gateway(format!("{prefix}-fail-closed"), FailurePolicy::Deny).await;
    Some(Outage {
        proxy,
        open,
        closed,
        _upstream: upstream,
    })
}

#[tokio::test]
async fn when_redis_is_unreachable_the_failure_policy_decides() {
    let Some(Outage {
        proxy,
        open,
        closed,
        _upstream,
    }) = outage("outage").await
    else {
        return;
    };
    let client = keel_testkit::http();
    let counted = |status: StatusCode, headers: &HeaderMap| {
        status == StatusCode::OK && number(headers, "ratelimit-limit") == Some(1_000)
    };

    for gateway in [&open, &closed] {
        let response = client.get(&gateway.proxy.url).send().await.unwrap();
        assert!(
            counted(response.status(), response.headers()),
            "link up: counted in Redis"
        );
    }

    proxy.cut();
    // The first requests may still meet the old connection; from the first refusal on,
    // every request is refused.
    until(&client, &closed.proxy.url, "fail closed", |status, _| {
        status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    for _ in 0..3 {
        let response = client.get(&closed.proxy.url).send().await.unwrap();
        let (headers, body) = gateway_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(number(&headers, "retry-after").unwrap() >= 1);
        assert!(body.contains("rate limit"), "{body}");
    }
    until(&client, &open.proxy.url, "fail open", |status, headers| {
        assert_eq!(status, StatusCode::OK, "fail open never refuses");
        !headers.contains_key("ratelimit-limit")
    })
    .await;
    for _ in 0..3 {
        let response = client.get(&open.proxy.url).send().await.unwrap();
        let headers = response.headers().clone();
        upstream_ok(response).await;
        assert!(
            !headers.contains_key("ratelimit-limit"),
            "not counted while Redis is away"
        );
    }

    let metrics = client
        .get(format!("{}/metrics", open.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let name = "keel_gateway_rate_limit_store_errors_total";
    for route in ["outage-fail-open", "outage-fail-closed"] {
        let errors = counter(&metrics, name, route);
        assert!(errors.is_some_and(|n| n >= 3.0), "{route}: {errors:?}");
    }

    proxy.restore();
    until(&client, &closed.proxy.url, "closed recovers", counted).await;
    until(&client, &open.proxy.url, "open recovers", counted).await;
}

// === configuration ===

async fn refused(config: GatewayConfig) -> String {
    match GatewayServer::build(config, &Shutdown::new()).await {
        Ok(_) => panic!("accepted"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn policies_that_cannot_work_are_refused_naming_the_route() {
    let upstream = Upstream::start("u");
    let base = |name: &str| route_to(name, &[&upstream]);

    let error = refused(test_config(vec![authenticated(base("private"), &[], &[])])).await;
    assert!(
        error.contains("\"private\"") && error.contains("[gateway.auth]"),
        "{error}"
    );

    let mut scoped = base("scoped");
    scoped.auth.scopes = vec!["orders:read".into()];
    let error = refused(test_config(vec![scoped])).await;
    assert!(
        error.contains("\"scoped\"") && error.contains("authenticated"),
        "{error}"
    );

    let by_subject = limited(base("by-subject"), RateKey::Subject, 1, 1.0);
    let error = refused(test_config(vec![by_subject])).await;
    assert!(
        error.contains("\"by-subject\"")
            && error.contains("subject")
            && error.contains("authenticated"),
        "{error}"
    );

    let nowhere = shared(limited(base("shared-nowhere"), RateKey::ClientIp, 1, 1.0));
    let error = refused(test_config(vec![nowhere])).await;
    assert!(
        error.contains("\"shared-nowhere\"") && error.contains("redis"),
        "{error}"
    );

    let mut any_origin = base("any-origin");
    any_origin.cors = Some(CorsConfig {
        allow_origins: vec!["*".into()],
        allow_credentials: true,
        ..CorsConfig::default()
    });
    let error = refused(test_config(vec![any_origin])).await;
    assert!(
        error.contains("\"any-origin\"") && error.contains("allow_credentials"),
        "{error}"
    );

    // A Redis URL that cannot be used is refused without showing its password.
    let error = refused(GatewayConfig {
        rate_limit: RateLimitBackendConfig {
            redis: Some(Secret::new("redis://:hunter2@127.0.0.1:notaport".into())),
            ..RateLimitBackendConfig::default()
        },
        ..test_config(Vec::new())
    })
    .await;
    assert!(error.contains("gateway.rate_limit.redis"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}

#[tokio::test]
async fn a_silent_redis_is_caught_by_the_timeout() {
    let Some(Outage {
        proxy,
        open,
        closed,
        _upstream,
    }) = outage("silent").await
    else {
        return;
    };
    let client = keel_testkit::http();
    for gateway in [&open, &closed] {
        let response = client.get(&gateway.proxy.url).send().await.unwrap();
        assert_eq!(number(response.headers(), "ratelimit-limit"), Some(1_000));
    }

    // Redis stops answering without closing anything: only the store timeout (1 s here)
    // can tell, and it must, rather than hang the request.
    proxy.blackhole();
    for (gateway, expected) in [
        (&closed, StatusCode::SERVICE_UNAVAILABLE),
        (&open, StatusCode::OK),
    ] {
        let started = std::time::Instant::now();
        let response = client.get(&gateway.proxy.url).send().await.unwrap();
        assert_eq!(response.status(), expected);
        assert!(!response.headers().contains_key("ratelimit-limit"));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    proxy.restore();
    let counted = |status: StatusCode, headers: &HeaderMap| {
        status == StatusCode::OK && number(headers, "ratelimit-limit") == Some(1_000)
    };
    until(&client, &closed.proxy.url, "closed recovers", counted).await;
    until(&client, &open.proxy.url, "open recovers", counted).await;
}

/// The forwarding and claim headers the gateway adds arrive once each, in place of the
/// client's copies, whichever way a request goes upstream: on the gateway's own HTTP/1.1
/// pool (a small body), on hyper's client (a body too large to buffer, an h2c upstream),
/// and through a route's request header rules, which see them and may change them.
#[tokio::test]
async fn added_headers_reach_every_kind_of_upstream_once() {
    const ECHOED: &[&str] = &[
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-keel-subject",
        "x-keel-roles",
    ];
    let issuer = TestIssuer::start().await;
    let upstream = Upstream::start_echoing("u", ECHOED);
    let mut h2c = authenticated(on("h2c", "/h2c", &upstream), &[], &[]);
    h2c.upstream_protocol = UpstreamProtocol::Http2;
    let mut ruled = authenticated(on("ruled", "/ruled", &upstream), &[], &[]);
    ruled.request_headers = HeaderActionsConfig {
        remove: vec!["x-forwarded-host".into()],
        set: [("x-keel-roles".to_owned(), "set-by-route".to_owned())].into(),
        add: [("x-forwarded-proto".to_owned(), "added".to_owned())].into(),
    };
    let gateway = start_with_auth(
        &issuer,
        vec![
            authenticated(on("pooled", "/pooled", &upstream), &[], &[]),
            h2c,
            ruled,
        ],
    )
    .await;
    let token = issuer.mint(json!({"roles": ["viewer"]}));
    let client = keel_testkit::http();
    let large = "x".repeat(100 * 1024);
    // Each field of the client's chain is kept (a proxy in front may add its own), the
    // peer appended.
    let forwarded =
        "x-forwarded-for=203.0.113.7, 198.51.100.2, 127.0.0.1 x-forwarded-host=shop.example";
    let claims = "x-keel-subject=user-1 x-keel-roles=viewer";
    for (path, body, expected) in [
        (
            "/pooled/x",
            "small",
            format!("/pooled/x {forwarded} x-forwarded-proto=http {claims} body=small"),
        ),
        (
            "/pooled/large",
            large.as_str(),
            format!("/pooled/large {forwarded} x-forwarded-proto=http {claims} body=xxx"),
        ),
        (
            "/h2c/x",
            "small",
            format!("/h2c/x {forwarded} x-forwarded-proto=http {claims} body=small"),
        ),
        (
            "/ruled/x",
            "small",
            "/ruled/x x-forwarded-for=203.0.113.7, 198.51.100.2, 127.0.0.1 \
             x-forwarded-proto=http,added x-keel-subject=user-1 x-keel-roles=set-by-route \
             body=small"
                .to_owned(),
        ),
    ] {
        let response = client
            .post(format!("{}{path}", gateway.proxy.url))
            .bearer_auth(&token)
            .header("host", "shop.example")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.2")
            .header("x-forwarded-host", "forged.example")
            .header("x-forwarded-proto", "gopher")
            .header("x-keel-roles", "forged")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let echoed = upstream_ok(response).await;
        // HTTP/2 carries the absolute URI.
        assert!(echoed.starts_with("u POST "), "{path}: {echoed:.300}");
        assert!(echoed.contains(&expected), "{path}: {echoed:.300}");
    }

    // Without a Host header (HTTP/1.0) there is no x-forwarded-host to send, and the
    // client's copies of both go all the same.
    let addr = gateway.proxy.url.trim_start_matches("http://");
    let (answer, _) = crate::support::exchange(
        addr,
        format!(
            "GET /pooled/old HTTP/1.0\r\nauthorization: Bearer {token}\r\n\
             x-forwarded-host: forged.example\r\nx-forwarded-proto: gopher\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert!(
        answer.contains(&format!(
            "/pooled/old x-forwarded-for=127.0.0.1 x-forwarded-proto=http {claims} body="
        )),
        "{answer}"
    );
}

/// A route balanced by a header the gateway adds (the verified subject) keeps each
/// subject on one instance.
#[tokio::test]
async fn hashing_by_a_claim_header_keeps_a_subject_on_one_instance() {
    let issuer = TestIssuer::start().await;
    let instances = [
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    ];
    let mut route = authenticated(
        route_to("users", &instances.iter().collect::<Vec<_>>()),
        &[],
        &[],
    );
    route.balance = BalanceConfig::Hash(HashKeyConfig::Header("x-keel-subject".into()));
    let gateway = start_with_auth(&issuer, vec![route]).await;
    let client = keel_testkit::http();
    let mut owners = std::collections::HashSet::new();
    for subject in 0..12 {
        let token = issuer.mint(json!({ "sub": format!("user-{subject}") }));
        let mut served = std::collections::HashSet::new();
        for _ in 0..4 {
            let response = client
                .get(format!("{}/x", gateway.proxy.url))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            served.insert(
                response.headers()["x-upstream"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_eq!(served.len(), 1, "user-{subject} moved: {served:?}");
        owners.extend(served);
    }
    assert!(
        owners.len() > 1,
        "every subject on one instance: {owners:?}"
    );
}
