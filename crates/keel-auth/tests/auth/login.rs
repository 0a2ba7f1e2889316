//! The sign-in and consent steps under attack: guessing, forged forms, replays across
//! clients, and the OpenID Connect prompts.

use keel_auth::{AuthMethod, GrantType};

use crate::authorization_code::{
    PASSWORD, REDIRECT, VERIFIER, authorize_query, decide, flow, log_in,
};
use crate::browser::Browser;
use crate::helpers::*;

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_account_for_a_growing_while() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let login = flow.browser.get(&authorize_query(&[])).await;
        let (csrf, request) = (login.field("csrf"), login.field("request"));
        for attempt in 1..=5 {
            let page = log_in(
                &mut flow.browser,
                "alice",
                "wrong password",
                &csrf,
                &request,
            )
            .await;
            assert_eq!(page.status, 401, "attempt {attempt}");
        }
        // Locked: even the right password is refused, answered as a wrong one, so that
        // the answer does not tell a locked account from a name that does not exist.
        let locked = log_in(&mut flow.browser, "alice", PASSWORD, &csrf, &request).await;
        let unknown = log_in(&mut flow.browser, "nobody", PASSWORD, &csrf, &request).await;
        assert_eq!(locked.status, 401);
        // The same page but for the name typed in, which it keeps.
        let unknown_body = unknown.body.replace("\"nobody\"", "\"alice\"");
        assert_eq!(
            (locked.status, &locked.body),
            (unknown.status, &unknown_body)
        );
        assert!(
            locked.body.contains("Wrong username or password."),
            "{}",
            locked.body
        );
        // After the lock (one minute), the right password works and clears the count.
        flow.app.admin.clock().advance(61);
        let consent = log_in(&mut flow.browser, "alice", PASSWORD, &csrf, &request).await;
        assert_eq!(consent.status, 200, "{}", consent.body);
        let events = flow.app.admin.audit_events(50).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.kind == "login_failed" && e.detail.as_deref() == Some("account locked"))
        );
        assert!(events.iter().any(|e| e.kind == "login_succeeded"));
    }
}

/// One address failing on many accounts is slowed down; behind a trusted proxy, the address
/// is the client's.
#[tokio::test]
async fn one_address_failing_on_many_accounts_is_slowed_down() {
    for trusted in [false, true] {
        let store = sqlite();
        let app = spawn_with(&store, |c| {
            c.lockout.per_address = 3;
            if trusted {
                c.trusted_proxies = serde_json::from_str(r#"["127.0.0.1"]"#).unwrap();
            }
        })
        .await;
        let mut browser = Browser::new(&app.server.url);
        app.admin
            .create_client(new_client(
                "spa",
                AuthMethod::None,
                &[REDIRECT],
                &[GrantType::AuthorizationCode],
                "openid",
            ))
            .await
            .unwrap();
        let login = browser.get(&authorize_query(&[("scope", "openid")])).await;
        let (csrf, request) = (login.field("csrf"), login.field("request"));
        browser.forwarded_for = Some("203.0.113.1".into());
        for user in ["u1", "u2", "u3"] {
            let page = log_in(&mut browser, user, "wrong password", &csrf, &request).await;
            assert_eq!(page.status, 401);
        }
        let page = log_in(&mut browser, "u4", "wrong password", &csrf, &request).await;
        assert_eq!(page.status, 429);
        assert!(page.body.contains("Too many failed sign-ins"));
        // Another client behind the proxy still signs in; without the proxy trusted, a
        // client cannot get a fresh count by writing another address in the header.
        browser.forwarded_for = Some("203.0.113.2".into());
        let page = log_in(&mut browser, "u5", "wrong password", &csrf, &request).await;
        assert_eq!(
            page.status,
            if trusted { 401 } else { 429 },
            "trusted: {trusted}"
        );
        let failures = app.admin.audit_events(50).await.unwrap();
        let addresses: std::collections::BTreeSet<_> = failures
            .iter()
            .filter(|e| e.kind == "login_failed")
            .filter_map(|e| e.ip.as_deref())
            .collect();
        let expected: &[&str] = if trusted {
            &["203.0.113.1", "203.0.113.2"]
        } else {
            &["127.0.0.1"]
        };
        assert_eq!(addresses.into_iter().collect::<Vec<_>>(), expected);
    }
}

#[tokio::test]
async fn consent_forms_are_bound_to_the_session_and_the_request() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let consent = flow.consent_page(&authorize_query(&[])).await;
        // The token does not carry over to another request (here: another redirect of
        // the same client, or another state).
        let other = authorize_query(&[("state", "forged")]);
        let other = other.strip_prefix("/authorize?").unwrap();
        let forged = flow
            .browser
            .post(
                "/consent",
                &[
                    ("decision", "allow"),
                    ("csrf", &consent.field("csrf")),
                    ("request", other),
                ],
            )
            .await;
        assert_eq!(forged.status, 403);
        // Nor to another browser, even one holding the CSRF cookie.
        let mut stranger = Browser::new(&flow.app.server.url);
        stranger.cookies = flow.browser.cookies.clone();
        stranger.cookies.remove("keel_session");
        assert_eq!(decide(&mut stranger, &consent, "allow").await.status, 403);
        // A post from another site is refused whatever it carries.
        let cross_site = keel_testkit::http()
            .post(flow.app.url("/consent"))
            .header("origin", "https://evil.example")
            .header(
                "cookie",
                format!("keel_session={}", flow.browser.cookies["keel_session"]),
            )
            .form(&[
                ("decision", "allow"),
                ("csrf", consent.field("csrf").as_str()),
                ("request", consent.field("request").as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(cross_site.status(), 403);
        // The genuine form still works.
        let allowed = decide(&mut flow.browser, &consent, "allow").await;
        assert_eq!(allowed.status, 303);
    }
}

#[tokio::test]
async fn prompts_and_max_age_are_honoured() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    let consent = flow.consent_page(&authorize_query(&[])).await;
    // Signed in but not yet consented: prompt=none cannot ask.
    let none = flow
        .browser
        .get(&authorize_query(&[("prompt", "none")]))
        .await;
    assert_eq!(none.redirect_params()["error"], "consent_required");
    decide(&mut flow.browser, &consent, "allow").await;
    // Consented: prompt=none answers with a code.
    let silent = flow
        .browser
        .get(&authorize_query(&[("prompt", "none")]))
        .await;
    assert!(silent.redirect_params().contains_key("code"));
    // prompt=login and a max_age the session is older than show the sign-in page.
    let again = flow
        .browser
        .get(&authorize_query(&[("prompt", "login")]))
        .await;
    assert_eq!(again.status, 200);
    assert!(again.body.contains("Sign in to continue"));
    flow.app.admin.clock().advance(30);
    let aged = flow
        .browser
        .get(&authorize_query(&[("max_age", "10")]))
        .await;
    assert!(aged.body.contains("Sign in to continue"));
    let fresh = flow
        .browser
        .get(&authorize_query(&[("max_age", "3600")]))
        .await;
    assert_eq!(fresh.status, 303);
    // prompt=consent asks again; unknown prompts and modes are refused.
    let ask = flow
        .browser
        .get(&authorize_query(&[("prompt", "consent")]))
        .await;
    assert!(ask.body.contains("wants access"));
    // prompt=login consent: both, signing in again and then asked again.
    let both = authorize_query(&[("prompt", "login consent")]);
    let sign_in = flow.browser.get(&both).await;
    assert!(
        sign_in.body.contains("Sign in to continue"),
        "{}",
        sign_in.body
    );
    flow.consent_page(&both).await;
    // A repeated redirect URI is refused on a page, whatever else repeats before it.
    let ambiguous = format!(
        "{}&state=st-2&redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
        authorize_query(&[])
    );
    // OpenID Connect requests name their redirect URI; plain OAuth ones may leave out
    // the client's only one.
    let unnamed = flow
        .browser
        .get(&authorize_query(&[("redirect_uri", "")]))
        .await;
    assert_eq!((unnamed.status, unnamed.location.as_deref()), (400, None));
    let plain = flow
        .browser
        .get(&authorize_query(&[
            ("redirect_uri", ""),
            ("scope", "orders:read"),
        ]))
        .await;
    assert_ne!(plain.status, 400, "{}", plain.body);
    let page = flow.browser.get(&ambiguous).await;
    assert_eq!(
        (page.status, page.location.as_deref()),
        (400, None),
        "{}",
        page.body
    );
    for (name, value) in [
        ("prompt", "none login"),
        ("prompt", "sometimes"),
        ("response_mode", "fragment"),
        ("max_age", "-1"),
    ] {
        let page = flow.browser.get(&authorize_query(&[(name, value)])).await;
        assert_eq!(
            page.redirect_params()["error"],
            "invalid_request",
            "{name}={value}"
        );
    }
}

#[tokio::test]
async fn a_code_is_only_for_the_client_it_was_issued_to() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let (confidential, secret) = flow
            .app
            .admin
            .create_client(new_client(
                "web",
                AuthMethod::ClientSecretBasic,
                &[REDIRECT],
                &[GrantType::AuthorizationCode],
                "openid",
            ))
            .await
            .unwrap();
        let secret = secret.unwrap();
        let code = flow.code().await;
        let stolen = flow
            .app
            .token(
                Some(("web", &secret)),
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", VERIFIER),
                ],
            )
            .await;
        stolen.assert_error(400, "invalid_grant");

        // A confidential client may go without PKCE; its own code works for it.
        let query = format!(
            "/authorize?{}",
            serde_urlencoded::to_string([
                ("response_type", "code"),
                ("client_id", confidential.client_id.as_str()),
                ("redirect_uri", REDIRECT),
                ("scope", "openid"),
            ])
            .unwrap()
        );
        let redirect = flow.sign_in_and_allow(&query).await;
        let code = redirect.redirect_params()["code"].clone();
        let token = flow
            .app
            .token(
                Some(("web", &secret)),
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                ],
            )
            .await;
        assert_eq!(token.status, 200, "{}", token.body);
        assert!(
            token.body.get("refresh_token").is_none(),
            "web may not refresh"
        );
    }
}

#[tokio::test]
async fn a_disabled_user_is_out_at_once_and_a_new_password_replaces_the_old() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let code = flow.code().await;
        let tokens = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        let refresh = tokens.body["refresh_token"].as_str().unwrap().to_owned();
        let access = tokens.body["access_token"].as_str().unwrap().to_owned();
        let userinfo = |token: String| {
            flow.app
                .http
                .get(flow.app.url("/userinfo"))
                .bearer_auth(token)
                .send()
        };
        assert_eq!(userinfo(access.clone()).await.unwrap().status(), 200);

        assert!(
            flow.app
                .admin
                .set_user_disabled(&flow.user_id, true)
                .await
                .unwrap()
        );
        let dead = userinfo(access).await.unwrap().status();
        assert_eq!(dead, 401, "the token died with the account");
        flow.refresh(&refresh)
            .await
            .assert_error(400, "invalid_grant");
        let mut browser = Browser::new(&flow.app.server.url);
        let login = browser.get(&authorize_query(&[])).await;
        let (csrf, request) = (login.field("csrf"), login.field("request"));
        let refused = log_in(&mut browser, "alice", PASSWORD, &csrf, &request).await;
        assert_eq!(refused.status, 401);
        // Signed out everywhere: the old session no longer counts.
        let again = flow.browser.get(&authorize_query(&[])).await;
        assert!(again.body.contains("Sign in to continue"));

        assert!(
            flow.app
                .admin
                .set_user_disabled(&flow.user_id, false)
                .await
                .unwrap()
        );
        assert!(
            flow.app
                .admin
                .set_password(&flow.user_id, "a brand new secret".into())
                .await
                .unwrap()
        );
        let old = log_in(&mut browser, "alice", PASSWORD, &csrf, &request).await;
        assert_eq!(old.status, 401);
        let new = log_in(&mut browser, "alice", "a brand new secret", &csrf, &request).await;
        assert_eq!(
            new.status, 303,
            "consented before: straight back with a code"
        );
        assert!(
            flow.app
                .admin
                .set_password(&flow.user_id, "short".into())
                .await
                .is_err()
        );
        assert!(
            !flow
                .app
                .admin
                .set_user_disabled("nobody", true)
                .await
                .unwrap()
        );
    }
}

#[tokio::test]
async fn demo_seeding_runs_once_and_finishes_what_an_interrupted_run_began() {
    let store = sqlite();
    let app = spawn(&store).await;
    // An earlier run stopped after making the admin user.
    let early = app
        .admin
        .create_user(keel_auth::NewUser {
            username: "admin".into(),
            password: "whatever it was".into(),
            email: None,
            name: None,
        })
        .await
        .unwrap();
    let seeded = app.admin.seed_demo().await.unwrap().expect("resumed");
    assert_eq!(seeded.client_id, "keel-demo");
    let admin = app.admin.find_user("admin").await.unwrap().unwrap();
    assert_eq!(
        admin.user_id, early.user_id,
        "the same user, given a known password"
    );
    assert!(app.admin.seed_demo().await.unwrap().is_none(), "once");
}
