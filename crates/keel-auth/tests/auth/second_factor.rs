//! The TOTP second factor.

use crate::authorization_code::{
    PASSWORD, REDIRECT, VERIFIER, authorize_query, claims, flow, log_in,
};
use crate::browser::Browser;
use crate::helpers::*;

/// RFC 4648 base32 (no padding) back to bytes.
fn unbase32(text: &str) -> Vec<u8> {
    let (mut out, mut buffer, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => panic!("not base32: {text}"),
        };
        buffer = (buffer << 5) | u32::from(value);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

async fn sign_in_with(browser: &mut Browser, otp: Option<&str>) -> crate::browser::Page {
    let login = browser.get(&authorize_query(&[])).await;
    let (csrf, request) = (login.field("csrf"), login.field("request"));
    match otp {
        None => log_in(browser, "alice", PASSWORD, &csrf, &request).await,
        Some(code) => {
            browser
                .post(
                    "/login",
                    &[
                        ("username", "alice"),
                        ("password", PASSWORD),
                        ("otp", code),
                        ("csrf", &csrf),
                        ("request", &request),
                    ],
                )
                .await
        }
    }
}

#[tokio::test]
async fn a_user_with_totp_signs_in_with_password_and_a_fresh_code() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        // Tokens from before: enabling the second factor ends them.
        let code = flow.code().await;
        let before = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;

        let uri = flow.app.admin.enable_totp(&flow.user_id).await.unwrap();
        assert!(
            uri.starts_with("otpauth://totp/Keel%3Aalice?secret="),
            "{uri}"
        );
        let secret = uri
            .split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let secret = unbase32(secret);
        flow.refresh(before.body["refresh_token"].as_str().unwrap())
            .await
            .assert_error(400, "invalid_grant");

        let mut browser = Browser::new(&flow.app.server.url);
        let asked = sign_in_with(&mut browser, None).await;
        assert_eq!(asked.status, 401);
        assert!(asked.body.contains("name=\"otp\""), "{}", asked.body);
        let now = flow.app.admin.clock().now();
        let stale = keel_auth::totp::code_at(&secret, now - 3600);
        let wrong = sign_in_with(&mut browser, Some(&stale)).await;
        assert_eq!(wrong.status, 401);
        assert!(wrong.body.contains("Wrong or already used code"));

        let current = keel_auth::totp::code_at(&secret, now);
        // Consent was given before: signed in, the browser goes straight back with a code.
        let redirect = sign_in_with(&mut browser, Some(&current)).await;
        assert_eq!(redirect.status, 303, "{}", redirect.body);
        let tokens = flow
            .exchange(
                &redirect.redirect_params()["code"],
                Some(VERIFIER),
                REDIRECT,
            )
            .await;
        let id = claims(tokens.body["id_token"].as_str().unwrap());
        assert_eq!(id["amr"], serde_json::json!(["pwd", "otp"]));
        assert_eq!(id["acr"], "2");

        // The same code again, in another browser: used already.
        let mut other = Browser::new(&flow.app.server.url);
        let replay = sign_in_with(&mut other, Some(&current)).await;
        assert_eq!(replay.status, 401);
    }
}

/// Posts the enrolment form.
async fn enrol(browser: &mut Browser, form: [(&str, String); 3]) -> crate::browser::Page {
    let fields = form.each_ref().map(|(k, v)| (*k, v.as_str()));
    browser.post("/account/totp", &fields).await
}

/// Self-service (`/account/totp`): a user signed in within five minutes adds the shown key
/// to an app and turns the factor on with a code it made; from then on signing in asks for
/// a code, the enrolment's own code spent. An older sign-in, a wrong code, a form posted
/// from another site, the key taken to another session, an expired key, or a user whose
/// factor is on already changes nothing.
#[tokio::test]
async fn a_signed_in_user_turns_the_second_factor_on_themselves() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let url = flow.app.server.url.clone();
        let anonymous = Browser::new(&url).get("/account/totp").await;
        assert_eq!(anonymous.status, 401);

        flow.code().await;
        flow.app.admin.clock().advance(301);
        let stale = flow.browser.get("/account/totp").await;
        assert_eq!(stale.status, 401);
        assert!(stale.body.contains("too long ago"), "{}", stale.body);
        flow.browser.cookies.remove("keel_session");
        assert_eq!(sign_in_with(&mut flow.browser, None).await.status, 303);

        let page = flow.browser.get("/account/totp").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let key = page.body.split("Key: <code>").nth(1).unwrap();
        let secret = unbase32(key.split("</code>").next().unwrap());
        let (csrf, pending) = (page.field("csrf"), page.field("pending"));
        let now = flow.app.admin.clock().now();
        let form = |csrf: &str, otp: &str| {
            [
                ("csrf", csrf.to_owned()),
                ("pending", pending.clone()),
                ("otp", otp.to_owned()),
            ]
        };
        let stale_code = keel_auth::totp::code_at(&secret, now - 3600);
        let wrong = enrol(&mut flow.browser, form(&csrf, &stale_code)).await;
        assert_eq!(wrong.status, 400);
        assert!(wrong.body.contains("does not match"), "{}", wrong.body);

        let current = keel_auth::totp::code_at(&secret, now);
        // From another site: refused before anything is read.
        let cross = keel_testkit::http()
            .post(format!("{url}/account/totp"))
            .header(
                "cookie",
                format!("keel_session={}", flow.browser.cookies["keel_session"]),
            )
            .header("origin", "https://elsewhere.example")
            .form(&form(&csrf, &current))
            .send()
            .await
            .unwrap();
        assert_eq!(cross.status(), 403);
        // Another session of the same user, with its own form's CSRF token, cannot open
        // this session's key.
        let mut elsewhere = Browser::new(&url);
        assert_eq!(sign_in_with(&mut elsewhere, None).await.status, 303);
        let own = elsewhere.get("/account/totp").await.field("csrf");
        let taken = enrol(&mut elsewhere, form(&own, &current)).await;
        assert_eq!(taken.status, 400, "{}", taken.body);

        let done = enrol(&mut flow.browser, form(&csrf, &current)).await;
        assert_eq!(done.status, 200, "{}", done.body);
        assert!(done.body.contains("Second factor on"));
        let events = flow.app.admin.audit_events(20).await.unwrap();
        assert!(events.iter().any(|e| e.kind == "second_factor_enrolled"));

        // Signed out everywhere; signing in asks for a code; the enrolment's is spent.
        assert_eq!(elsewhere.get("/account/totp").await.status, 401);
        let mut browser = Browser::new(&url);
        let asked = sign_in_with(&mut browser, None).await;
        assert_eq!(asked.status, 401);
        assert!(asked.body.contains("name=\"otp\""), "{}", asked.body);
        assert_eq!(sign_in_with(&mut browser, Some(&current)).await.status, 401);
        flow.app.admin.clock().advance(30);
        let next = keel_auth::totp::code_at(&secret, now + 30);
        let signed_in = sign_in_with(&mut browser, Some(&next)).await;
        assert_eq!(signed_in.status, 303, "{}", signed_in.body);
        let again = browser.get("/account/totp").await;
        assert_eq!(again.status, 409, "on already: {}", again.body);
    }
}

/// A key serves only while the sign-in that showed it is recent: five minutes on, the
/// right code turns nothing on.
#[tokio::test]
async fn an_enrolment_needs_a_recent_sign_in_to_the_end() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    flow.code().await;
    let page = flow.browser.get("/account/totp").await;
    let key = page.body.split("Key: <code>").nth(1).unwrap();
    let secret = unbase32(key.split("</code>").next().unwrap());
    let clock = flow.app.admin.clock().clone();
    clock.advance(301);
    let late = flow
        .browser
        .post(
            "/account/totp",
            &[
                ("csrf", &page.field("csrf")),
                ("pending", &page.field("pending")),
                ("otp", &keel_auth::totp::code_at(&secret, clock.now())),
            ],
        )
        .await;
    assert_eq!(late.status, 401, "{}", late.body);
    let user = flow.app.admin.find_user("alice").await.unwrap().unwrap();
    assert!(!user.totp, "nothing turned on");
}
