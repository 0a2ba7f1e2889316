//! The device authorization grant (RFC 8628): a CLI polls while a person approves.

use keel_auth::{AuthMethod, GrantType};

use crate::authorization_code::{PASSWORD, flow};
use crate::browser::{Browser, Page};
use crate::helpers::*;

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

async fn tv(app: &App) {
    app.admin
        .create_client(new_client(
            "tv",
            AuthMethod::None,
            &[],
            &[GrantType::DeviceCode, GrantType::RefreshToken],
            "openid profile",
        ))
        .await
        .unwrap();
}

async fn start(app: &App, client_id: &str) -> Token {
    app.token_endpoint(
        "/device_authorization",
        None,
        &[("client_id", client_id), ("scope", "openid profile")],
    )
    .await
}

async fn poll(app: &App, client_id: &str, device_code: &str) -> Token {
    app.token(
        None,
        &[
            ("grant_type", DEVICE_GRANT),
            ("device_code", device_code),
            ("client_id", client_id),
        ],
    )
    .await
}

/// Alice signs in on the verification page and answers `decision` for `user_code`.
async fn answer(browser: &mut Browser, user_code: &str, decision: &str) -> Page {
    let sign_in = browser.get(&format!("/device?user_code={user_code}")).await;
    assert_eq!(sign_in.status, 200);
    assert!(
        sign_in.body.contains("Sign in to connect a device"),
        "{}",
        sign_in.body
    );
    let approval = browser
        .post(
            "/device",
            &[
                ("user_code", &sign_in.field("user_code")),
                ("username", "alice"),
                ("password", PASSWORD),
                ("csrf", &sign_in.field("csrf")),
            ],
        )
        .await;
    assert_eq!(approval.status, 200, "{}", approval.body);
    assert!(approval.body.contains("asks to"), "{}", approval.body);
    browser
        .post(
            "/device",
            &[
                ("user_code", &approval.field("user_code")),
                ("decision", decision),
                ("csrf", &approval.field("csrf")),
            ],
        )
        .await
}

fn field(token: &Token, name: &str) -> String {
    token.body[name].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_device_polls_while_the_user_approves_then_gets_tokens_once() {
    for store in stores().await {
        let flow = flow(&store).await;
        let app = &flow.app;
        tv(app).await;
        let started = start(app, "tv").await;
        assert_eq!(started.status, 200, "{}", started.body);
        let (device_code, user_code) =
            (field(&started, "device_code"), field(&started, "user_code"));
        assert_eq!(user_code.len(), 9, "{user_code}");
        assert_eq!(started.body["interval"], 5);
        assert_eq!(
            field(&started, "verification_uri_complete"),
            format!("{}/device?user_code={user_code}", app.issuer())
        );

        poll(app, "tv", &device_code)
            .await
            .assert_error(400, "authorization_pending");
        // Again at once: too fast.
        poll(app, "tv", &device_code)
            .await
            .assert_error(400, "slow_down");

        let mut browser = Browser::new(&app.server.url);
        let done = answer(&mut browser, &user_code.to_lowercase(), "allow").await;
        assert!(done.body.contains("is connected"), "{}", done.body);

        app.admin.clock().advance(11);
        let tokens = poll(app, "tv", &device_code).await;
        assert_eq!(tokens.status, 200, "{}", tokens.body);
        let access = crate::authorization_code::claims(&field(&tokens, "access_token"));
        assert_eq!(access["sub"], flow.user_id.as_str());
        assert_eq!(access["client_id"], "tv");
        assert!(tokens.body["id_token"].is_string());
        assert!(tokens.body["refresh_token"].is_string());
        app.admin.clock().advance(11);
        poll(app, "tv", &device_code)
            .await
            .assert_error(400, "invalid_grant");
    }
}

/// Polls sent together within the interval: one is answered, the others are told to slow
/// down (each read the last poll's time before any wrote it, and all were let through).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_sent_together_are_answered_once_and_the_rest_slowed_down() {
    for store in stores().await {
        let app = spawn(&store).await;
        tv(&app).await;
        let started = start(&app, "tv").await;
        let device_code = field(&started, "device_code");
        poll(&app, "tv", &device_code)
            .await
            .assert_error(400, "authorization_pending");
        app.admin.clock().advance(6);
        let polls =
            futures_util::future::join_all((0..16).map(|_| poll(&app, "tv", &device_code))).await;
        let errors: Vec<&str> = polls
            .iter()
            .map(|token| token.body["error"].as_str().unwrap_or_default())
            .collect();
        let pending = errors
            .iter()
            .filter(|e| **e == "authorization_pending")
            .count();
        let slowed = errors.iter().filter(|e| **e == "slow_down").count();
        assert_eq!((pending, slowed), (1, 15), "{errors:?}");
    }
}

#[tokio::test]
async fn denied_expired_foreign_and_unknown_device_codes() {
    let store = sqlite();
    let flow = flow(&store).await;
    let app = &flow.app;
    tv(app).await;

    let denied = start(app, "tv").await;
    let mut browser = Browser::new(&app.server.url);
    let done = answer(&mut browser, &field(&denied, "user_code"), "deny").await;
    assert!(done.body.contains("was not allowed"));
    poll(app, "tv", &field(&denied, "device_code"))
        .await
        .assert_error(400, "access_denied");

    let expired = start(app, "tv").await;
    app.admin.clock().advance(601);
    poll(app, "tv", &field(&expired, "device_code"))
        .await
        .assert_error(400, "expired_token");

    let foreign = start(app, "tv").await;
    app.admin
        .create_client(new_client(
            "radio",
            AuthMethod::None,
            &[],
            &[GrantType::DeviceCode],
            "openid",
        ))
        .await
        .unwrap();
    poll(app, "radio", &field(&foreign, "device_code"))
        .await
        .assert_error(400, "invalid_grant");
    poll(app, "tv", "no-such-code")
        .await
        .assert_error(400, "invalid_grant");

    // A client without the device grant cannot start one.
    start(app, "spa")
        .await
        .assert_error(400, "unauthorized_client");

    // A wrong code on the page says so, and nothing is approved.
    let page = browser.get("/device").await;
    let wrong = browser
        .post(
            "/device",
            &[
                ("user_code", "BBBB-BBBB"),
                ("decision", "allow"),
                ("csrf", &page.field("csrf")),
            ],
        )
        .await;
    assert!(wrong.body.contains("not valid"), "{}", wrong.body);
}
