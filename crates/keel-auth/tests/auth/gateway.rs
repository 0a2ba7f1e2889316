//! The gateway trusting this server: its routes' scope and role requirements hold for
//! tokens issued here.

use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use keel_gateway::auth::{Requirement, RouteAuthConfig};
use keel_gateway::config::{GatewayRouteConfig, UpstreamConfig};
use keel_gateway::route::MatchConfig;
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_jwt::VerifierConfig;
use keel_runtime::Shutdown;

use crate::helpers::*;
use crate::rbac::{staffed, tokens_for};

/// An upstream that answers with the `x-keel-*` headers the gateway sent it.
async fn echo_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(get(|headers: HeaderMap| async move {
        let mut seen: Vec<String> = headers
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("x-keel-"))
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap_or("?")))
            .collect();
        seen.sort();
        seen.join("\n")
    }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn route(
    name: &str,
    prefix: &str,
    upstream: &str,
    scopes: &[&str],
    roles: &[&str],
) -> GatewayRouteConfig {
    GatewayRouteConfig {
        name: name.into(),
        matches: MatchConfig {
            path_prefix: Some(prefix.into()),
            ..MatchConfig::default()
        },
        upstreams: vec![UpstreamConfig::Url(upstream.to_owned())],
        auth: RouteAuthConfig {
            require: Requirement::Authenticated,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        },
        ..GatewayRouteConfig::default()
    }
}

#[tokio::test]
async fn the_gateway_enforces_scopes_and_roles_of_this_servers_tokens() {
    let store = sqlite();
    let (flow, _) = staffed(&store).await;
    let upstream = echo_upstream().await;
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        auth: Some(VerifierConfig::new(flow.app.issuer(), ["keel-api"])),
        routes: vec![
            route("admin", "/admin", &upstream, &["orders:write"], &["admin"]),
            route("orders", "/orders", &upstream, &["orders:read"], &[]),
            route(
                "reports",
                "/reports",
                &upstream,
                &["orders:read"],
                &["admin"],
            ),
        ],
        ..GatewayConfig::default()
    };
    let gateway = keel_testkit::spawn(
        GatewayServer::build(config, &Shutdown::new())
            .await
            .unwrap(),
    );
    let http = keel_runtime::http_client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let call = |path: &str, token: Option<&str>| {
        let mut request = http.get(format!("{}{path}", gateway.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let alice = tokens_for(&flow, "alice", "openid orders:read orders:write").await;
    let alice = alice.body["access_token"].as_str().unwrap().to_owned();
    let bob = tokens_for(&flow, "bob", "openid orders:read orders:write").await;
    let bob = bob.body["access_token"].as_str().unwrap().to_owned();

    let admin = call("/admin/report", Some(&alice)).await.unwrap();
    assert_eq!(admin.status(), 200);
    let forwarded = admin.text().await.unwrap();
    assert!(
        forwarded.contains(&format!("x-keel-subject={}", flow.user_id)),
        "{forwarded}"
    );
    assert!(forwarded.contains("x-keel-roles=admin"), "{forwarded}");
    assert!(forwarded.contains("x-keel-client-id=spa"), "{forwarded}");

    // Bob has orders:read but neither the role nor the guarded scope.
    assert_eq!(call("/orders/1", Some(&bob)).await.unwrap().status(), 200);
    let refused = call("/admin/report", Some(&bob)).await.unwrap();
    assert_eq!(refused.status(), 403);
    let challenge = refused.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.contains("insufficient_scope"), "{challenge}");

    // A route that asks a role only: Bob has the scope, not the role.
    assert_eq!(call("/reports", Some(&alice)).await.unwrap().status(), 200);
    assert_eq!(call("/reports", Some(&bob)).await.unwrap().status(), 403);

    assert_eq!(call("/orders/1", None).await.unwrap().status(), 401);
    // A changed payload: the middle of the claims segment, one character swapped.
    let (header, rest) = alice.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let mut payload: Vec<char> = payload.chars().collect();
    let middle = payload.len() / 2;
    payload[middle] = if payload[middle] == 'x' { 'y' } else { 'x' };
    let payload: String = payload.into_iter().collect();
    let tampered = format!("{header}.{payload}.{signature}");
    assert_eq!(
        call("/orders/1", Some(&tampered)).await.unwrap().status(),
        401
    );
}
