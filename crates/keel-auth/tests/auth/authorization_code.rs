//! The authorization code grant with PKCE, through the sign-in and consent pages, the ID
//! token, and refresh token rotation.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_auth::{AuthMethod, GrantType, NewClient, NewUser};
use keel_jwt::{Verifier, VerifierConfig};
use serde_json::Value;

use crate::browser::{Browser, Page};
use crate::helpers::*;

pub const REDIRECT: &str = "http://127.0.0.1:9/callback";
pub const PASSWORD: &str = "correct horse battery";
pub const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
pub const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

/// A user, a public client, and a browser.
pub struct Flow {
    pub app: App,
    pub client_id: String,
    pub user_id: String,
    pub browser: Browser,
}

pub async fn flow(store: &Store) -> Flow {
    let app = spawn(store).await;
    let user = app
        .admin
        .create_user(NewUser {
            username: "alice".into(),
            password: PASSWORD.into(),
            email: Some("alice@example.com".into()),
            name: Some("Alice".into()),
        })
        .await
        .unwrap();
    let (client, secret) = app
        .admin
        .create_client(NewClient {
            client_id: Some("spa".into()),
            name: "The <Shop>".into(),
            auth_method: AuthMethod::None,
            redirect_uris: vec![REDIRECT.into()],
            post_logout_redirect_uris: Vec::new(),
            grant_types: vec![GrantType::AuthorizationCode, GrantType::RefreshToken],
            scopes: "openid profile email orders:read orders:write payments:read".into(),
            audiences: vec![],
            signing_alg: None,
            access_token_ttl: None,
            jwks: None,
        })
        .await
        .unwrap();
    assert!(secret.is_none(), "a public client has no secret");
    let browser = Browser::new(&app.server.url);
    Flow {
        app,
        client_id: client.client_id,
        user_id: user.user_id,
        browser,
    }
}

pub fn authorize_query(extra: &[(&str, &str)]) -> String {
    let mut pairs = vec![
        ("response_type", "code"),
        ("client_id", "spa"),
        ("redirect_uri", REDIRECT),
        ("scope", "openid profile orders:read"),
        ("state", "st-1"),
        ("nonce", "n-1"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    for (name, value) in extra {
        pairs.retain(|(n, _)| n != name);
        if !value.is_empty() {
            pairs.push((name, value));
        }
    }
    format!(
        "/authorize?{}",
        serde_urlencoded::to_string(&pairs).unwrap()
    )
}

impl Flow {
    /// The consent page for `query`, signing in as Alice first unless signed in already.
    pub async fn consent_page(&mut self, query: &str) -> Page {
        let mut page = self.browser.get(query).await;
        assert_eq!(page.status, 200, "{}", page.body);
        if page.body.contains("Sign in to continue") {
            let (csrf, request) = (page.field("csrf"), page.field("request"));
            page = log_in(&mut self.browser, "alice", PASSWORD, &csrf, &request).await;
        }
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(page.body.contains("wants access"), "{}", page.body);
        page
    }

    /// Signs in (unless signed in already) and allows, from the authorization request to
    /// the redirect with the code.
    pub async fn sign_in_and_allow(&mut self, query: &str) -> Page {
        let page = self.consent_page(query).await;
        decide(&mut self.browser, &page, "allow").await
    }

    pub async fn exchange(&self, code: &str, verifier: Option<&str>, redirect: &str) -> Token {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("client_id", self.client_id.as_str()),
            ("redirect_uri", redirect),
        ];
        if let Some(verifier) = verifier {
            form.push(("code_verifier", verifier));
        }
        self.app.token(None, &form).await
    }

    /// A code: straight away when signed in and consented, else through the pages.
    pub async fn code(&mut self) -> String {
        let query = authorize_query(&[]);
        let mut redirect = self.browser.get(&query).await;
        if redirect.status != 303 {
            redirect = self.sign_in_and_allow(&query).await;
        }
        redirect.redirect_params()["code"].clone()
    }

    pub async fn refresh(&self, refresh_token: &str) -> Token {
        self.app
            .token(
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token),
                    ("client_id", self.client_id.as_str()),
                ],
            )
            .await
    }
}

pub fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn code_with_pkce_gives_tokens_the_verifier_accepts_and_an_id_token() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let page = flow.browser.get(&authorize_query(&[])).await;
        assert!(
            page.body.contains("The &lt;Shop&gt;"),
            "client name escaped"
        );
        let redirect = flow.sign_in_and_allow(&authorize_query(&[])).await;
        assert_eq!(redirect.status, 303);
        assert!(redirect.location.as_deref().unwrap().starts_with(REDIRECT));
        let params = redirect.redirect_params();
        assert_eq!(params["state"], "st-1");
        assert_eq!(params["iss"], flow.app.issuer(), "RFC 9207");
        let token = flow
            .exchange(&params["code"], Some(VERIFIER), REDIRECT)
            .await;
        assert_eq!(token.status, 200, "{}", token.body);
        assert_eq!(token.body["scope"], "openid orders:read profile");

        let access = token.body["access_token"].as_str().unwrap();
        let verifier = Verifier::new(VerifierConfig::new(flow.app.issuer(), ["keel-api"])).unwrap();
        let principal = verifier.verify(access).await.unwrap();
        assert_eq!(principal.subject, flow.user_id);
        assert_eq!(principal.client_id.as_deref(), Some("spa"));
        assert!(principal.has_scope("orders:read"));

        // The ID token: signed by the same keys, for the client, with the nonce.
        let id_token = token.body["id_token"].as_str().unwrap();
        let mut config = VerifierConfig::new(flow.app.issuer(), ["spa"]);
        config.require_typ = false;
        Verifier::new(config)
            .unwrap()
            .verify(id_token)
            .await
            .unwrap();
        let id = claims(id_token);
        assert_eq!(id["sub"], flow.user_id.as_str());
        assert_eq!(id["aud"], "spa");
        assert_eq!(id["nonce"], "n-1");
        assert_eq!(id["preferred_username"], "alice");
        assert!(id.get("email").is_none(), "email scope not asked");
        assert!(id["auth_time"].as_i64().unwrap() <= id["iat"].as_i64().unwrap());
        let hash = ring::digest::digest(&ring::digest::SHA256, access.as_bytes());
        assert_eq!(id["at_hash"], URL_SAFE_NO_PAD.encode(&hash.as_ref()[..16]));
        assert!(token.body["refresh_token"].as_str().is_some());

        // Signed in and consented: the next request goes straight back with a code.
        let again = flow
            .browser
            .get(&authorize_query(&[("state", "st-2")]))
            .await;
        assert_eq!(again.status, 303, "{}", again.body);
        assert_eq!(again.redirect_params()["state"], "st-2");
        let second = flow
            .exchange(&again.redirect_params()["code"], Some(VERIFIER), REDIRECT)
            .await;
        assert_eq!(second.status, 200, "{}", second.body);
    }
}

#[tokio::test]
async fn a_replayed_code_fails_and_revokes_what_it_issued() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let code = flow.code().await;
        let first = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        assert_eq!(first.status, 200, "{}", first.body);
        flow.exchange(&code, Some(VERIFIER), REDIRECT)
            .await
            .assert_error(400, "invalid_grant");
        // The refresh token from the first exchange is dead too.
        flow.refresh(first.body["refresh_token"].as_str().unwrap())
            .await
            .assert_error(400, "invalid_grant");
    }
}

#[tokio::test]
async fn pkce_and_redirect_uri_are_checked_at_the_exchange() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let wrong = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXj";
        let code = flow.code().await;
        flow.exchange(&code, Some(wrong), REDIRECT)
            .await
            .assert_error(400, "invalid_grant");
        // A failed exchange burns the code.
        flow.exchange(&code, Some(VERIFIER), REDIRECT)
            .await
            .assert_error(400, "invalid_grant");

        let code = flow.code().await;
        flow.exchange(&code, None, REDIRECT)
            .await
            .assert_error(400, "invalid_grant");

        let code = flow.code().await;
        flow.exchange(&code, Some(VERIFIER), "http://127.0.0.1:9/other")
            .await
            .assert_error(400, "invalid_grant");

        // Expired: codes live a minute.
        let code = flow.code().await;
        flow.app.admin.clock().advance(61);
        flow.exchange(&code, Some(VERIFIER), REDIRECT)
            .await
            .assert_error(400, "invalid_grant");
    }
}

#[tokio::test]
async fn requests_naming_an_unknown_client_or_redirect_uri_are_never_redirected() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    for query in [
        authorize_query(&[("client_id", "nobody")]),
        authorize_query(&[("redirect_uri", "https://attacker.example/cb")]),
        authorize_query(&[("client_id", "")]),
        "/authorize?client_id=spa&client_id=spa&response_type=code".to_owned(),
    ] {
        let page = flow.browser.get(&query).await;
        assert_eq!(page.status, 400, "{query}");
        assert!(page.location.is_none(), "{query}");
        assert!(!page.body.contains("attacker.example"));
    }
}

#[tokio::test]
async fn other_bad_requests_go_back_to_the_client_with_the_rfc_error() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    for (extra, error) in [
        (vec![("code_challenge", "")], "invalid_request"),
        (vec![("code_challenge_method", "")], "invalid_request"),
        (vec![("code_challenge_method", "plain")], "invalid_request"),
        (
            vec![("response_type", "token")],
            "unsupported_response_type",
        ),
        (vec![("scope", "openid keel-admin")], "invalid_scope"),
        (vec![("prompt", "none")], "login_required"),
    ] {
        let page = flow.browser.get(&authorize_query(&extra)).await;
        assert_eq!(page.status, 303, "{extra:?}: {}", page.body);
        let params = page.redirect_params();
        assert_eq!(params["error"], error, "{extra:?}");
        assert_eq!(params["state"], "st-1");
        assert!(!params.contains_key("code"));
    }
}

/// Posts the sign-in form from `browser`.
pub async fn log_in(
    browser: &mut Browser,
    username: &str,
    password: &str,
    csrf: &str,
    request: &str,
) -> Page {
    browser
        .post(
            "/login",
            &[
                ("username", username),
                ("password", password),
                ("csrf", csrf),
                ("request", request),
            ],
        )
        .await
}

/// Answers the consent page `consent` with `decision` (allow or deny).
pub async fn decide(browser: &mut Browser, consent: &Page, decision: &str) -> Page {
    browser
        .post(
            "/consent",
            &[
                ("decision", decision),
                ("csrf", &consent.field("csrf")),
                ("request", &consent.field("request")),
            ],
        )
        .await
}

#[tokio::test]
async fn sign_in_failures_csrf_and_denial() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    let login = flow.browser.get(&authorize_query(&[])).await;
    let request = login.field("request");
    let csrf = login.field("csrf");

    let wrong = log_in(
        &mut flow.browser,
        "alice",
        "wrong password",
        &csrf,
        &request,
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Wrong username or password"));
    let unknown = log_in(&mut flow.browser, "mallory", PASSWORD, &csrf, &request).await;
    assert_eq!(unknown.status, 401);
    assert!(
        unknown.body.contains("Wrong username or password"),
        "same answer"
    );

    // A form without the CSRF token, or another browser's, is refused.
    let forged = log_in(&mut flow.browser, "alice", PASSWORD, "forged", &request).await;
    assert_eq!(forged.status, 403);
    let mut other = Browser::new(&flow.app.server.url);
    let cross_site = log_in(&mut other, "alice", PASSWORD, &csrf, &request).await;
    assert_eq!(cross_site.status, 403);

    // Signed in, the user denies.
    let consent = log_in(&mut flow.browser, "alice", PASSWORD, &csrf, &request).await;
    assert_eq!(consent.status, 200);
    let denied = decide(&mut flow.browser, &consent, "deny").await;
    assert_eq!(denied.status, 303);
    assert_eq!(denied.redirect_params()["error"], "access_denied");
}

/// A client refreshing from several requests at once (tabs, retries): every one is
/// answered, all with one new refresh token, which then goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refreshes_share_one_new_refresh_token() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let code = flow.code().await;
        let first = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        let r1 = first.body["refresh_token"].as_str().unwrap().to_owned();
        let answers = futures_util::future::join_all((0..6).map(|_| flow.refresh(&r1))).await;
        let issued: std::collections::BTreeSet<String> = answers
            .iter()
            .map(|answer| {
                assert_eq!(answer.status, 200, "{}", answer.body);
                answer.body["refresh_token"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(issued.len(), 1, "{issued:?}");
        let r2 = issued.into_iter().next().unwrap();
        assert_eq!(flow.refresh(&r2).await.status, 200);
    }
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_late_reuse_revokes_the_grant() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let code = flow.code().await;
        let first = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        let r1 = first.body["refresh_token"].as_str().unwrap().to_owned();

        let second = flow.refresh(&r1).await;
        assert_eq!(second.status, 200, "{}", second.body);
        let r2 = second.body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(r1, r2, "rotated");
        assert!(second.body["id_token"].as_str().is_some());

        // A concurrent refresh with r1 inside the grace window still works, and gets the
        // same r2: the grant does not fork into two live chains.
        for _ in 0..2 {
            let concurrent = flow.refresh(&r1).await;
            assert_eq!(concurrent.status, 200, "{}", concurrent.body);
            assert_eq!(concurrent.body["refresh_token"], r2.as_str());
            assert_ne!(concurrent.body["access_token"], second.body["access_token"]);
        }

        // Narrowing is allowed, widening is not.
        let narrowed = flow
            .app
            .token(
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &r2),
                    ("client_id", "spa"),
                    ("scope", "openid"),
                ],
            )
            .await;
        assert_eq!(narrowed.status, 200, "{}", narrowed.body);
        assert_eq!(narrowed.body["scope"], "openid");
        let r3 = narrowed.body["refresh_token"].as_str().unwrap().to_owned();
        flow.app
            .token(
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &r3),
                    ("client_id", "spa"),
                    ("scope", "openid email"),
                ],
            )
            .await
            .assert_error(400, "invalid_scope");

        // r1 comes back after r2 was used, even within the grace window: stolen. The whole
        // grant ends, the live r3 with it.
        flow.refresh(&r1).await.assert_error(400, "invalid_grant");
        flow.refresh(&r3).await.assert_error(400, "invalid_grant");

        // Another grant: long after, its first token comes back: stolen too.
        let code = flow.code().await;
        let first = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        let r1 = first.body["refresh_token"].as_str().unwrap().to_owned();
        let second = flow.refresh(&r1).await;
        let r2 = second.body["refresh_token"].as_str().unwrap().to_owned();
        flow.app.admin.clock().advance(11);
        flow.refresh(&r1).await.assert_error(400, "invalid_grant");
        flow.refresh(&r2).await.assert_error(400, "invalid_grant");

        flow.refresh("not-a-token")
            .await
            .assert_error(400, "invalid_grant");
    }
}
