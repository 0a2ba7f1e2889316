//! Route actions besides plain forwarding: path rewrites, redirects, body limits.

use http::StatusCode;
use keel_gateway::config::{GatewayRouteConfig, RedirectConfig};
use keel_gateway::route::MatchConfig;

use crate::support::{Upstream, route_to, start_gateway};

fn templated(name: &str, template: &str) -> GatewayRouteConfig {
    GatewayRouteConfig {
        name: name.into(),
        matches: MatchConfig {
            path_template: Some(template.into()),
            ..MatchConfig::default()
        },
        ..GatewayRouteConfig::default()
    }
}

fn no_redirects() -> reqwest::Client {
    keel_runtime::http_client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn paths_are_rewritten_from_template_parameters() {
    let upstream = Upstream::start("u");
    let mut route = templated("items", "/shop/{id}/items/{*rest}");
    route.upstreams = route_to("x", &[&upstream]).upstreams;
    route.rewrite = Some("/v2/items/{id}/{rest}".into());
    let gateway = start_gateway(vec![route]).await;
    let body = keel_testkit::get_text(format!("{}/shop/42/items/a/b?x=1", gateway.url)).await;
    assert!(body.starts_with("u GET /v2/items/42/a/b?x=1"), "{body}");
}

#[tokio::test]
async fn redirects_answer_at_the_gateway() {
    let mut moved = templated("moved", "/old/{*rest}");
    moved.redirect = Some(RedirectConfig {
        location: "https://new.example.com/{rest}".into(),
        status: 308,
        keep_query: true,
    });
    let gateway = start_gateway(vec![moved]).await;
    let response = no_redirects()
        .get(format!("{}/old/a/b?q=1", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        response.headers()["location"],
        "https://new.example.com/a/b?q=1"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_whether_sized_or_streamed() {
    let upstream = Upstream::start("u");
    let mut route = route_to("small", &[&upstream]);
    route.max_body_bytes = 1024;
    route.retry.buffer_bytes = 0;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();

    let response = client
        .post(&gateway.url)
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "at the limit is fine");

    let response = client
        .post(&gateway.url)
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let hits = upstream.hits();
    assert_eq!(
        hits, 1,
        "a declared oversized body never reaches the upstream"
    );

    // Chunked, no length: counted as it streams.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'y'; 512])).collect();
    let response = client
        .post(&gateway.url)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = response.text().await.unwrap();
    assert!(body.contains("1024 bytes"), "{body}");
}

#[tokio::test]
async fn contradictory_actions_are_rejected() {
    let upstream = Upstream::start("u");
    let mut both = route_to("both", &[&upstream]);
    both.redirect = Some(RedirectConfig {
        location: "/x".into(),
        status: 302,
        keep_query: false,
    });
    let mut bad_status = templated("status", "/a/{id}");
    bad_status.redirect = Some(RedirectConfig {
        location: "/b/{id}".into(),
        status: 200,
        keep_query: false,
    });
    let mut unknown_param = templated("param", "/a/{id}");
    unknown_param.upstreams = both.upstreams.clone();
    unknown_param.rewrite = Some("/b/{other}".into());
    for (route, expected) in [
        (both, "redirect and upstreams"),
        (bad_status, "redirect.status"),
        (unknown_param, "{other}"),
    ] {
        let config = crate::support::test_config(vec![route]);
        let error = match keel_gateway::GatewayServer::build(config, &keel_runtime::Shutdown::new())
            .await
        {
            Ok(_) => panic!("accepted"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(expected), "{error}");
    }
}
