use keel_auth::{AuthMethod, SigningAlg};
use keel_jwt::{Verifier, VerifierConfig};

use crate::helpers::*;

fn verifier(app: &App) -> Verifier {
    Verifier::new(VerifierConfig::new(app.issuer(), ["keel-api"])).unwrap()
}

#[tokio::test]
async fn a_client_credentials_token_passes_the_shared_verifier() {
    for store in stores().await {
        let app = spawn(&store).await;
        let verifier = verifier(&app);
        for alg in [None, Some(SigningAlg::ES256), Some(SigningAlg::EdDSA)] {
            let (id, secret) = app
                .service_client(
                    AuthMethod::ClientSecretBasic,
                    "orders:read orders:write",
                    alg,
                )
                .await;
            let token = app
                .token(
                    Some((&id, &secret)),
                    &[
                        ("grant_type", "client_credentials"),
                        ("scope", "orders:read"),
                    ],
                )
                .await;
            assert_eq!(token.status, 200, "{}", token.body);
            assert_eq!(token.headers["cache-control"], "no-store");
            assert_eq!(token.body["token_type"], "Bearer");
            assert_eq!(token.body["expires_in"], 600);
            assert_eq!(token.body["scope"], "orders:read");
            let access = token.body["access_token"].as_str().unwrap();
            let principal = verifier.verify(access).await.unwrap();
            assert_eq!(principal.subject, id);
            assert_eq!(principal.client_id.as_deref(), Some(id.as_str()));
            assert!(principal.has_scope("orders:read"));
            assert!(!principal.has_scope("orders:write"), "only what was asked");
            let header = access.split('.').next().unwrap();
            let header: serde_json::Value = serde_json::from_slice(
                &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(header["typ"], "at+jwt");
            assert_eq!(header["alg"], alg.unwrap_or(SigningAlg::RS256).name());
        }
    }
}

/// `[auth.http.tls]`: the server answers over HTTPS and its default issuer says so; the
/// shared verifier, trusting the server's CA, checks its tokens through the metadata and
/// key set fetched over HTTPS.
#[tokio::test]
async fn with_tls_the_issuer_is_https_and_its_tokens_verify() {
    let store = sqlite();
    let ca = keel_testkit::tls::TestCa::new();
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-auth-tls"));
    let (cert, key) = ca.server_files(&dir);
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();
    let app = spawn_with(&store, |config| {
        config.http.tls = Some(keel_runtime::http::ServerTlsConfig {
            cert,
            key,
            client_ca: None,
        });
    })
    .await;
    assert!(
        app.issuer().starts_with("https://127.0.0.1:"),
        "{}",
        app.issuer()
    );
    assert_eq!(app.server.url, app.issuer());
    let metadata = app.get_json("/.well-known/openid-configuration").await;
    assert_eq!(metadata["jwks_uri"], format!("{}/jwks.json", app.issuer()));

    let (id, secret) = app
        .service_client(AuthMethod::ClientSecretBasic, "orders:read", None)
        .await;
    let token = app
        .token(
            Some((&id, &secret)),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(token.status, 200, "{}", token.body);
    let principal = verifier(&app)
        .verify(token.body["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(principal.subject, id);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn client_secret_post_works_and_no_scope_asked_grants_all_allowed() {
    for store in stores().await {
        let app = spawn(&store).await;
        let (id, secret) = app
            .service_client(AuthMethod::ClientSecretPost, "a b", None)
            .await;
        let token = app
            .token(
                None,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", &id),
                    ("client_secret", &secret),
                ],
            )
            .await;
        assert_eq!(token.status, 200, "{}", token.body);
        assert_eq!(token.body["scope"], "a b");
        verifier(&app)
            .verify(token.body["access_token"].as_str().unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn failed_client_authentication_is_invalid_client_with_a_challenge() {
    for store in stores().await {
        let app = spawn(&store).await;
        let (basic_id, basic_secret) = app
            .service_client(AuthMethod::ClientSecretBasic, "a", None)
            .await;
        let (post_id, post_secret) = app
            .service_client(AuthMethod::ClientSecretPost, "a", None)
            .await;
        let grant = ("grant_type", "client_credentials");
        let cases = [
            (
                "wrong secret",
                app.token(Some((&basic_id, "wrong")), &[grant]).await,
            ),
            (
                "unknown client",
                app.token(Some(("nobody", &basic_secret)), &[grant]).await,
            ),
            (
                "another client's secret",
                app.token(Some((&basic_id, &post_secret)), &[grant]).await,
            ),
            (
                "a basic client posting its secret",
                app.token(
                    None,
                    &[
                        grant,
                        ("client_id", &basic_id),
                        ("client_secret", &basic_secret),
                    ],
                )
                .await,
            ),
            (
                "a post client using basic",
                app.token(Some((&post_id, &post_secret)), &[grant]).await,
            ),
            (
                "a confidential client without its secret",
                app.token(None, &[grant, ("client_id", &post_id)]).await,
            ),
            ("no client at all", app.token(None, &[grant]).await),
        ];
        let long_id = "x".repeat(10_000);
        let cases = cases.into_iter().chain([(
            "an id no client can have",
            app.token(Some((&long_id, "secret")), &[grant]).await,
        )]);
        for (case, answer) in cases {
            answer.assert_error(401, "invalid_client");
            let challenge = answer.headers["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Basic "), "{case}: {challenge}");
            assert!(
                !answer.body.to_string().contains(&basic_secret),
                "{case}: no secret echoed"
            );
        }
        // Each failure naming a possible client is in the audit trail with its reason (not
        // the request without a client, nor the id no client can have), and no secret is.
        let events = app.admin.audit_events(100).await.unwrap();
        let failures: Vec<_> = events
            .iter()
            .filter(|e| e.kind == "client_auth_failed")
            .collect();
        assert_eq!(failures.len(), 6, "{failures:?}");
        assert!(failures.iter().all(|e| e.outcome == "failure"));
        assert!(failures.iter().any(|e| {
            e.detail
                .as_deref()
                .is_some_and(|d| d.contains("wrong secret"))
        }));
        assert!(
            failures
                .iter()
                .any(|e| e.client_id.as_deref() == Some("nobody"))
        );
        for event in &events {
            let text = format!("{event:?}");
            assert!(
                !text.contains(&basic_secret) && !text.contains(&post_secret),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn scopes_beyond_the_clients_are_invalid_scope() {
    for store in stores().await {
        let app = spawn(&store).await;
        let (id, secret) = app
            .service_client(AuthMethod::ClientSecretBasic, "orders:read", None)
            .await;
        let basic = Some((id.as_str(), secret.as_str()));
        let escalation = app
            .token(
                basic,
                &[
                    ("grant_type", "client_credentials"),
                    ("scope", "orders:read keel-admin"),
                ],
            )
            .await;
        escalation.assert_error(400, "invalid_scope");
        assert!(
            escalation.body["error_description"]
                .as_str()
                .unwrap()
                .contains("keel-admin")
        );
        let malformed = app
            .token(
                basic,
                &[("grant_type", "client_credentials"), ("scope", "a\"b")],
            )
            .await;
        malformed.assert_error(400, "invalid_scope");
    }
}

#[tokio::test]
async fn malformed_token_requests_get_the_rfc_errors() {
    for store in stores().await {
        malformed_token_requests(&store).await;
    }
}

async fn malformed_token_requests(store: &Store) {
    let app = spawn(store).await;
    let (id, secret) = app
        .service_client(AuthMethod::ClientSecretBasic, "a", None)
        .await;
    let basic = Some((id.as_str(), secret.as_str()));

    app.token(basic, &[])
        .await
        .assert_error(400, "invalid_request");
    app.token(basic, &[("grant_type", "password")])
        .await
        .assert_error(400, "unsupported_grant_type");
    app.token(
        basic,
        &[
            ("grant_type", "client_credentials"),
            ("grant_type", "client_credentials"),
        ],
    )
    .await
    .assert_error(400, "invalid_request");

    // Basic credentials and another client_id in the body.
    app.token(
        basic,
        &[("grant_type", "client_credentials"), ("client_id", "other")],
    )
    .await
    .assert_error(400, "invalid_request");
    // openid is for users.
    app.token(
        basic,
        &[("grant_type", "client_credentials"), ("scope", "openid")],
    )
    .await
    .assert_error(400, "invalid_scope");

    // JSON instead of a form.
    let json = app
        .http
        .post(app.url("/token"))
        .basic_auth(&id, Some(&secret))
        .json(&serde_json::json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 400);
    let body: serde_json::Value = json.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // Garbage Basic credentials.
    let garbage = app
        .http
        .post(app.url("/token"))
        .header("authorization", "Basic %%%")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 401);

    // A body over the limit is refused before it is read whole.
    let huge = "a".repeat(200 * 1024);
    let too_big = app
        .http
        .post(app.url("/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", huge.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 400);
    let body: serde_json::Value = too_big.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // The token endpoint takes POST only.
    let get = app.http.get(app.url("/token")).send().await.unwrap();
    assert_eq!(get.status(), 405);
}
