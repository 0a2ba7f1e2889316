//! RP-initiated logout.

use crate::authorization_code::{REDIRECT, VERIFIER, authorize_query, flow};
use crate::helpers::*;

fn logout_query(pairs: &[(&str, &str)]) -> String {
    format!("/logout?{}", serde_urlencoded::to_string(pairs).unwrap())
}

#[tokio::test]
async fn an_id_token_hint_signs_out_at_once_and_returns_to_the_client() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let code = flow.code().await;
        let tokens = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        let id_token = tokens.body["id_token"].as_str().unwrap().to_owned();

        let out = flow
            .browser
            .get(&logout_query(&[
                ("id_token_hint", &id_token),
                ("post_logout_redirect_uri", REDIRECT),
                ("state", "bye"),
            ]))
            .await;
        assert_eq!(out.status, 303, "{}", out.body);
        assert_eq!(
            out.location.as_deref(),
            Some(format!("{REDIRECT}?state=bye").as_str())
        );
        // Signed out: the next authorization request asks for a sign-in again, even with
        // the old session cookie replayed.
        let again = flow.browser.get(&authorize_query(&[])).await;
        assert!(again.body.contains("Sign in to continue"));
        let events = flow.app.admin.audit_events(20).await.unwrap();
        assert!(events.iter().any(|e| e.kind == "logout"));
    }
}

#[tokio::test]
async fn without_a_hint_the_user_confirms_and_foreign_places_are_not_returned_to() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    flow.code().await;
    let session = flow.browser.cookies["keel_session"].clone();

    let ask = flow
        .browser
        .get(&logout_query(&[
            ("client_id", "spa"),
            ("post_logout_redirect_uri", "https://attacker.example/"),
        ]))
        .await;
    assert_eq!(ask.status, 200);
    assert!(ask.body.contains("Sign out?"));
    // A forged confirmation does nothing.
    let forged = flow
        .browser
        .post("/logout", &[("confirm", "forged"), ("client_id", "spa")])
        .await;
    assert!(forged.body.contains("Sign out?"));
    assert_eq!(
        flow.browser.cookies["keel_session"], session,
        "still signed in"
    );

    let done = flow
        .browser
        .post(
            "/logout",
            &[
                ("confirm", &ask.field("confirm")),
                ("client_id", "spa"),
                ("post_logout_redirect_uri", "https://attacker.example/"),
            ],
        )
        .await;
    assert_eq!(done.status, 200, "not redirected to an unregistered place");
    assert!(done.body.contains("You are signed out"));
    // The old cookie no longer opens a session.
    flow.browser.cookies.insert("keel_session".into(), session);
    let again = flow.browser.get(&authorize_query(&[])).await;
    assert!(again.body.contains("Sign in to continue"));

    let garbage = flow
        .browser
        .get(&logout_query(&[("id_token_hint", "not.a.token")]))
        .await;
    assert_eq!(garbage.status, 400);
}

#[tokio::test]
async fn a_client_id_other_than_the_hints_is_refused() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    let code = flow.code().await;
    let tokens = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
    let id_token = tokens.body["id_token"].as_str().unwrap().to_owned();
    let page = flow
        .browser
        .get(&logout_query(&[
            ("id_token_hint", &id_token),
            ("client_id", "other"),
        ]))
        .await;
    assert_eq!(page.status, 400);
    // Still signed in.
    let again = flow.browser.get(&authorize_query(&[])).await;
    assert_eq!(again.status, 303);
}

/// A client that registered `post_logout_redirect_uris` is returned only to one of them
/// (OpenID Connect RP-Initiated Logout 1.0 §3.1), not to its redirect URIs; invalid ones
/// are refused at registration.
#[tokio::test]
async fn registered_post_logout_redirect_uris_are_the_only_places_returned_to() {
    let mut app = new_client(
        "shop-app",
        keel_auth::AuthMethod::None,
        &["https://shop.example/callback"],
        &[keel_auth::GrantType::AuthorizationCode],
        "openid",
    );
    app.post_logout_redirect_uris = vec!["https://shop.example/bye".into()];
    for (uri, returned) in [
        ("https://shop.example/callback", false),
        ("https://shop.example/bye", true),
    ] {
        let store = sqlite();
        let mut flow = flow(&store).await;
        flow.app.admin.create_client(app.clone()).await.unwrap();
        flow.code().await;
        let mut form = vec![("client_id", "shop-app"), ("post_logout_redirect_uri", uri)];
        let ask = flow.browser.get(&logout_query(&form)).await;
        assert!(ask.body.contains("Sign out?"), "{}", ask.body);
        let confirm = ask.field("confirm");
        form.push(("confirm", &confirm));
        let done = flow.browser.post("/logout", &form).await;
        if returned {
            assert_eq!(done.status, 303, "{}", done.body);
            assert_eq!(done.location.as_deref(), Some(uri));
        } else {
            assert_eq!(done.status, 200, "not returned to a redirect URI");
            assert!(done.body.contains("You are signed out"));
        }
    }

    let store = sqlite();
    let admin = spawn(&store).await.admin;
    app.post_logout_redirect_uris = vec!["https://shop.example/bye#frag".into()];
    assert!(admin.create_client(app).await.is_err());
}
