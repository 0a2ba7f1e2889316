//! Authorization in services: the caller extractor and its requirements against tokens
//! from a test issuer, and the service's own client-credentials token from the real
//! authorization server, accepted by another service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use keel_jwt::testing::TestIssuer;
use keel_jwt::{Verifier, VerifierConfig};
use keel_runtime::{Secret, Shutdown};
use keel_sdk::auth::{Caller, ClientCredentials, Denied, FAILURE_KEPT, TokenError, authenticate};
use keel_sdk::client::{Call, ClientOptions, Instances, ServiceClient};
use serde_json::json;

/// A service whose `/orders` needs `orders:read`, `/admin` the `admin` role, and `/me`
/// any valid token; each answers with the caller's subject.
async fn service(verifier: Verifier) -> String {
    let router = Router::new()
        .route(
            "/orders",
            get(|caller: Caller| async move {
                caller.require_scope("orders:read")?;
                Ok::<_, Denied>(caller.subject().to_owned())
            }),
        )
        .route(
            "/admin",
            get(|caller: Caller| async move {
                caller.require_role("admin")?;
                Ok::<_, Denied>(caller.subject().to_owned())
            }),
        )
        .route(
            "/me",
            get(|caller: Caller| async move { caller.subject().to_owned() }),
        )
        .route("/open", get(|| async { "anyone" }))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(verifier),
            authenticate,
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn get_with(url: &str, token: Option<&str>) -> (u16, String, String) {
    let mut request = keel_testkit::http().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, challenge, response.text().await.unwrap())
}

#[tokio::test]
async fn handlers_get_the_verified_caller_and_refuse_what_it_lacks() {
    let issuer = TestIssuer::start().await;
    let base = service(Verifier::new(issuer.config()).unwrap()).await;
    let reader = issuer.mint(json!({"scope": "orders:read", "roles": ["customer"]}));
    let admin = issuer.mint(json!({"sub": "root", "roles": ["admin"]}));

    assert_eq!(get_with(&format!("{base}/open"), None).await.0, 200);
    let (status, challenge, body) = get_with(&format!("{base}/me"), None).await;
    assert_eq!((status, challenge.as_str()), (401, "Bearer"));
    assert!(body.contains("an access token is required"), "{body}");

    let (status, _, body) = get_with(&format!("{base}/orders"), Some(&reader)).await;
    assert_eq!((status, body.as_str()), (200, "user-1"));
    let (status, challenge, body) = get_with(&format!("{base}/orders"), Some(&admin)).await;
    assert_eq!(status, 403);
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    assert!(challenge.contains("scope=\"orders:read\""), "{challenge}");
    assert!(
        body.contains("application/problem") || body.contains("\"status\":403"),
        "{body}"
    );

    assert_eq!(
        get_with(&format!("{base}/admin"), Some(&admin)).await.0,
        200
    );
    assert_eq!(
        get_with(&format!("{base}/admin"), Some(&reader)).await.0,
        403
    );

    // Expired, tampered, or from nobody we trust: refused before any handler.
    let expired = issuer.mint(json!({"exp": 1_000_000_000}));
    let tampered = format!("{}x", &reader[..reader.len() - 1]);
    for token in [expired.as_str(), tampered.as_str(), "not-a-jwt"] {
        let (status, challenge, _) = get_with(&format!("{base}/open"), Some(token)).await;
        assert_eq!(status, 401, "even an open route refuses a bad token");
        assert!(challenge.contains("invalid_token"), "{challenge}");
    }
}

#[tokio::test]
async fn a_service_calls_another_with_its_own_client_credentials_token() {
    // The real authorization server, on SQLite, with a client for the calling service.
    let file = keel_testkit::TestSqlite::new("keel-sdk-auth");
    let config = keel_auth::AuthConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: keel_auth::config::DatabaseUrl::new(file.url()),
        key_encryption_key: Some(Secret::new(
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8".to_owned(),
        )),
        ..keel_auth::AuthConfig::default()
    };
    let server = keel_auth::AuthServer::build(config, &Shutdown::new())
        .await
        .unwrap();
    let admin = server.admin();
    let auth = keel_testkit::spawn(server);
    let (client, secret) = admin
        .create_client(keel_auth::NewClient {
            client_id: Some("orders-service".into()),
            name: "orders".into(),
            auth_method: keel_auth::AuthMethod::ClientSecretBasic,
            redirect_uris: vec![],
            post_logout_redirect_uris: Vec::new(),
            grant_types: vec![keel_auth::GrantType::ClientCredentials],
            scopes: "orders:read".into(),
            audiences: vec!["keel-api".into()],
            signing_alg: None,
            access_token_ttl: None,
            jwks: None,
        })
        .await
        .unwrap();
    let issuer = admin.issuer().to_owned();
    let token_endpoint = format!("{}/token", auth.url);

    // The called service trusts the server's tokens for its audience.
    let verifier = Verifier::new(VerifierConfig::new(&issuer, ["keel-api"])).unwrap();
    let inventory = service(verifier).await;

    let credentials = ClientCredentials::new(
        &token_endpoint,
        &client.client_id,
        Secret::new(secret.unwrap()),
        Some("orders:read"),
    );
    let token = credentials.token().await.unwrap();
    assert_eq!(
        credentials.token().await.unwrap(),
        token,
        "kept, not fetched again"
    );
    let calls = ServiceClient::new(
        "inventory",
        Instances::Static(vec![inventory]),
        ClientOptions::default(),
    )
    .unwrap();
    let answer = calls
        .call(
            Call::new(http::Method::GET, "/orders")
                .bearer(&token)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "orders-service", "the client is the subject");

    credentials.forget().await;
    assert_ne!(credentials.token().await.unwrap(), token, "fetched anew");

    let wrong = ClientCredentials::new(
        &token_endpoint,
        "orders-service",
        Secret::new("not-the-secret".to_owned()),
        None,
    );
    let error = wrong.token().await.unwrap_err();
    assert!(
        matches!(&error, TokenError::Refused { status: 401, error } if error == "invalid_client"),
        "{error}"
    );
}

#[tokio::test]
async fn a_failed_token_fetch_answers_its_waiters_rather_than_one_fetch_each() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    let router = Router::new().route(
        "/token",
        post(move || {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                (http::StatusCode::SERVICE_UNAVAILABLE, "down")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let credentials = Arc::new(ClientCredentials::new(
        &endpoint,
        "orders-service",
        Secret::new("s3cret".to_owned()),
        None,
    ));
    let callers: Vec<_> = (0..5)
        .map(|_| {
            let credentials = Arc::clone(&credentials);
            tokio::spawn(async move { credentials.token().await })
        })
        .collect();
    for caller in callers {
        let error = caller.await.unwrap().unwrap_err();
        assert!(
            matches!(error, TokenError::Refused { status: 503, .. }),
            "{error}"
        );
    }
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "one fetch for five callers"
    );
    // A while later, the next caller tries again.
    tokio::time::sleep(FAILURE_KEPT).await;
    assert!(credentials.token().await.is_err());
    assert_eq!(asked.load(Ordering::SeqCst), 2);
}
