//! Roles and the scopes they guard, in tokens.

use keel_auth::{AuthMethod, GrantType, NewClient, NewUser, Subject};

use crate::authorization_code::{
    Flow, PASSWORD, REDIRECT, VERIFIER, authorize_query, claims, decide, flow, log_in,
};
use crate::browser::Browser;
use crate::helpers::*;

/// Alice is staff (the group holds `admin`, which unlocks `orders:write`) and an auditor
/// of payments (a role for that audience, unlocking `payments:read`); Bob holds nothing.
pub async fn staffed(store: &Store) -> (Flow, String) {
    let flow = flow(store).await;
    let admin = &flow.app.admin;
    admin
        .create_role("admin", None, "shop administrators", "orders:write")
        .await
        .unwrap();
    admin
        .create_role(
            "auditor",
            Some("payments"),
            "reads payments",
            "payments:read",
        )
        .await
        .unwrap();
    admin.create_group("staff").await.unwrap();
    admin
        .add_group_member("staff", &flow.user_id)
        .await
        .unwrap();
    admin
        .grant_role("admin", &Subject::Group("staff".into()))
        .await
        .unwrap();
    admin
        .grant_role("auditor", &Subject::User(flow.user_id.clone()))
        .await
        .unwrap();
    let bob = admin
        .create_user(NewUser {
            username: "bob".into(),
            password: PASSWORD.into(),
            email: None,
            name: None,
        })
        .await
        .unwrap();
    (flow, bob.user_id)
}

/// Tokens for `username` asking `scope`, through the pages.
pub async fn tokens_for(flow: &Flow, username: &str, scope: &str) -> Token {
    let mut browser = Browser::new(&flow.app.server.url);
    let login = browser.get(&authorize_query(&[("scope", scope)])).await;
    let consent = log_in(
        &mut browser,
        username,
        PASSWORD,
        &login.field("csrf"),
        &login.field("request"),
    )
    .await;
    assert_eq!(consent.status, 200, "{}", consent.body);
    let redirect = decide(&mut browser, &consent, "allow").await;
    let code = redirect.redirect_params()["code"].clone();
    let token = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
    assert_eq!(token.status, 200, "{}", token.body);
    token
}

#[tokio::test]
async fn a_guarded_scope_goes_only_to_its_roles_holders_and_roles_follow_the_audience() {
    for store in stores().await {
        let (flow, _) = staffed(&store).await;
        let alice = tokens_for(
            &flow,
            "alice",
            "openid orders:read orders:write payments:read",
        )
        .await;
        // `auditor` is for the payments audience, not this token's (keel-api): neither the
        // role nor the scope it unlocks is in the token.
        assert_eq!(alice.body["scope"], "openid orders:read orders:write");
        let access = claims(alice.body["access_token"].as_str().unwrap());
        assert_eq!(access["roles"], serde_json::json!(["admin"]));

        let bob = tokens_for(&flow, "bob", "openid orders:read orders:write").await;
        assert_eq!(
            bob.body["scope"], "openid orders:read",
            "granted less than asked"
        );
        assert!(
            claims(bob.body["access_token"].as_str().unwrap())
                .get("roles")
                .is_none()
        );
    }
}

#[tokio::test]
async fn a_revoked_role_leaves_the_token_at_the_next_refresh() {
    for store in stores().await {
        let (flow, _) = staffed(&store).await;
        let first = tokens_for(&flow, "alice", "openid orders:write").await;
        flow.app
            .admin
            .revoke_role("admin", &Subject::Group("staff".into()))
            .await
            .unwrap();
        let refreshed = flow
            .refresh(first.body["refresh_token"].as_str().unwrap())
            .await;
        assert_eq!(refreshed.status, 200, "{}", refreshed.body);
        assert_eq!(refreshed.body["scope"], "openid");
        assert!(
            claims(refreshed.body["access_token"].as_str().unwrap())
                .get("roles")
                .is_none()
        );
    }
}

#[tokio::test]
async fn service_clients_hold_roles_too() {
    for store in stores().await {
        let app = spawn(&store).await;
        let (client, secret) = app
            .admin
            .create_client(NewClient {
                audiences: vec!["keel-api".into()],
                ..new_client(
                    "billing",
                    AuthMethod::ClientSecretBasic,
                    &[],
                    &[GrantType::ClientCredentials],
                    "payments:capture orders:read",
                )
            })
            .await
            .unwrap();
        app.admin
            .create_role(
                "payments-service",
                None,
                "captures payments",
                "payments:capture",
            )
            .await
            .unwrap();
        let basic = Some(("billing", secret.as_deref().unwrap()));
        let before = app
            .token(basic, &[("grant_type", "client_credentials")])
            .await;
        assert_eq!(
            before.body["scope"], "orders:read",
            "the guarded scope needs the role"
        );
        app.admin
            .grant_role("payments-service", &Subject::Client(client.client_id))
            .await
            .unwrap();
        let after = app
            .token(basic, &[("grant_type", "client_credentials")])
            .await;
        assert_eq!(after.body["scope"], "orders:read payments:capture");
        let access = claims(after.body["access_token"].as_str().unwrap());
        assert_eq!(access["roles"], serde_json::json!(["payments-service"]));
    }
}

#[tokio::test]
async fn bindings_need_existing_roles_and_subjects() {
    let store = sqlite();
    let app = spawn(&store).await;
    let admin = &app.admin;
    assert!(
        admin
            .grant_role("nope", &Subject::User("x".into()))
            .await
            .is_err()
    );
    admin.create_role("r", None, "", "").await.unwrap();
    assert!(
        admin.create_role("r", None, "", "").await.is_err(),
        "exists"
    );
    assert!(admin.create_role("has space", None, "", "").await.is_err());
    assert!(
        admin
            .grant_role("r", &Subject::User("ghost".into()))
            .await
            .is_err()
    );
    assert!(
        admin
            .grant_role("r", &Subject::Group("ghosts".into()))
            .await
            .is_err()
    );
    assert!(
        admin
            .grant_role("r", &Subject::Client("ghost".into()))
            .await
            .is_err()
    );
}
