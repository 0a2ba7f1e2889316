//! Introspection (RFC 7662), revocation (RFC 7009) and userinfo.

use keel_auth::AuthMethod;
use serde_json::{Value, json};

use crate::authorization_code::{Flow, REDIRECT, VERIFIER, flow};
use crate::helpers::*;

/// A resource server's credentials: a client named after the tokens' audience,
/// `keel-api`, as a resource server registers to introspect.
async fn resource_server(app: &App) -> (String, String) {
    confidential(app, "keel-api").await
}

/// A confidential client named `id` and its secret.
async fn confidential(app: &App, id: &str) -> (String, String) {
    let (client, secret) = app
        .admin
        .create_client(new_client(
            id,
            AuthMethod::ClientSecretBasic,
            &[],
            &[keel_auth::GrantType::ClientCredentials],
            "",
        ))
        .await
        .unwrap();
    (client.client_id, secret.unwrap())
}

/// A resource server's credentials, and Alice's tokens from the code flow.
async fn setup(flow: &mut Flow) -> ((String, String), Token) {
    let resource = resource_server(&flow.app).await;
    let code = flow.code().await;
    let tokens = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
    assert_eq!(tokens.status, 200, "{}", tokens.body);
    (resource, tokens)
}

async fn introspect(app: &App, (id, secret): &(String, String), token: &str) -> Value {
    let answer = app
        .token_endpoint("/introspect", Some((id, secret)), &[("token", token)])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

async fn revoke(app: &App, client_id: &str, token: &str) -> u16 {
    app.token_endpoint(
        "/revoke",
        None,
        &[("token", token), ("client_id", client_id)],
    )
    .await
    .status
}

fn token(tokens: &Token, name: &str) -> String {
    tokens.body[name].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn live_tokens_introspect_active_and_revoked_ones_exactly_inactive() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let (resource, tokens) = setup(&mut flow).await;
        let (access, refresh) = (
            token(&tokens, "access_token"),
            token(&tokens, "refresh_token"),
        );

        let active = introspect(&flow.app, &resource, &access).await;
        assert_eq!(active["active"], true);
        assert_eq!(active["sub"], flow.user_id.as_str());
        assert_eq!(active["client_id"], "spa");
        assert_eq!(active["token_type"], "Bearer");
        assert_eq!(active["scope"], "openid orders:read profile");
        // A refresh token is for its own client's eyes only (and the spa, public, may not
        // introspect): to the resource server it is inactive.
        assert_eq!(
            introspect(&flow.app, &resource, &refresh).await,
            json!({"active": false})
        );

        // Another client cannot revoke it: 200, and nothing changes.
        assert_eq!(
            revoke(&flow.app, &resource.0, &access).await,
            401,
            "wrong auth method"
        );
        let stranger = flow
            .app
            .service_client(AuthMethod::ClientSecretPost, "a", None)
            .await;
        let attempt = flow
            .app
            .token_endpoint(
                "/revoke",
                None,
                &[
                    ("token", &access),
                    ("client_id", &stranger.0),
                    ("client_secret", &stranger.1),
                ],
            )
            .await;
        assert_eq!(attempt.status, 200);
        assert_eq!(
            introspect(&flow.app, &resource, &access).await["active"],
            true
        );
        // Nor learn about it: a client the token is not for hears "inactive".
        let outsider = confidential(&flow.app, "outsider").await;
        assert_eq!(
            introspect(&flow.app, &outsider, &access).await,
            json!({"active": false})
        );

        // Its own client revokes the access token: inactive, exactly as RFC 7662 says.
        assert_eq!(revoke(&flow.app, "spa", &access).await, 200);
        assert_eq!(
            introspect(&flow.app, &resource, &access).await,
            json!({"active": false})
        );
        // The refresh token lives on until revoked; then its grant ends with it.
        assert_eq!(revoke(&flow.app, "spa", &refresh).await, 200);
        flow.refresh(&refresh)
            .await
            .assert_error(400, "invalid_grant");

        // Unknown and garbage tokens: 200 and inactive, never an error.
        assert_eq!(revoke(&flow.app, "spa", "nonsense").await, 200);
        for garbage in ["nonsense", "a.b.c", &"x".repeat(20_000)] {
            assert_eq!(
                introspect(&flow.app, &resource, garbage).await,
                json!({"active": false})
            );
        }
    }
}

#[tokio::test]
async fn revoking_a_refresh_token_ends_the_access_tokens_of_its_grant() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let (resource, tokens) = setup(&mut flow).await;
        assert_eq!(
            revoke(&flow.app, "spa", &token(&tokens, "refresh_token")).await,
            200
        );
        let access = token(&tokens, "access_token");
        assert_eq!(
            introspect(&flow.app, &resource, &access).await,
            json!({"active": false})
        );
    }
}

#[tokio::test]
async fn a_replayed_code_leaves_what_it_issued_inactive() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let resource = resource_server(&flow.app).await;
        let code = flow.code().await;
        let first = flow.exchange(&code, Some(VERIFIER), REDIRECT).await;
        let access = token(&first, "access_token");
        assert_eq!(
            introspect(&flow.app, &resource, &access).await["active"],
            true
        );
        flow.exchange(&code, Some(VERIFIER), REDIRECT)
            .await
            .assert_error(400, "invalid_grant");
        assert_eq!(
            introspect(&flow.app, &resource, &access).await,
            json!({"active": false})
        );
    }
}

#[tokio::test]
async fn introspection_is_for_authenticated_confidential_clients() {
    let store = sqlite();
    let mut flow = flow(&store).await;
    let (resource, tokens) = setup(&mut flow).await;
    let access = token(&tokens, "access_token");
    // A public client, a wrong secret, no client: invalid_client.
    flow.app
        .token_endpoint(
            "/introspect",
            None,
            &[("token", &access), ("client_id", "spa")],
        )
        .await
        .assert_error(401, "invalid_client");
    flow.app
        .token_endpoint(
            "/introspect",
            Some((&resource.0, "wrong")),
            &[("token", &access)],
        )
        .await
        .assert_error(401, "invalid_client");
    flow.app
        .token_endpoint("/introspect", Some((&resource.0, &resource.1)), &[])
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test]
async fn userinfo_answers_for_live_openid_tokens() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let (resource, tokens) = setup(&mut flow).await;
        let access = token(&tokens, "access_token");
        let userinfo = |token: Option<String>| {
            let mut request = flow.app.http.get(flow.app.url("/userinfo"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send()
        };
        let answer = userinfo(Some(access.clone())).await.unwrap();
        assert_eq!(answer.status(), 200);
        let claims: Value = answer.json().await.unwrap();
        assert_eq!(claims["sub"], flow.user_id.as_str());
        assert_eq!(claims["preferred_username"], "alice");
        assert!(claims.get("email").is_none(), "email was not granted");

        let anonymous = userinfo(None).await.unwrap();
        assert_eq!(anonymous.status(), 401);
        assert!(
            anonymous.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        // A service's token has no openid scope.
        let service = flow
            .app
            .token(
                Some((&resource.0, &resource.1)),
                &[("grant_type", "client_credentials")],
            )
            .await;
        let forbidden = userinfo(Some(token(&service, "access_token")))
            .await
            .unwrap();
        assert_eq!(forbidden.status(), 403);
        assert!(
            forbidden.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
        // Revoked: invalid_token.
        assert_eq!(revoke(&flow.app, "spa", &access).await, 200);
        let revoked = userinfo(Some(access)).await.unwrap();
        assert_eq!(revoked.status(), 401);
        assert!(
            revoked.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
    }
}

#[tokio::test]
async fn expired_records_are_swept_and_live_ones_kept() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let (_, tokens) = setup(&mut flow).await;
        let refresh = token(&tokens, "refresh_token");
        assert_eq!(
            flow.app.admin.sweep().await.unwrap(),
            0,
            "nothing has expired"
        );
        // Past the lives of the access token, the session and the code (plus the replay
        // memory), not the refresh token's (30 days).
        flow.app.admin.clock().advance(25 * 3600);
        assert!(flow.app.admin.sweep().await.unwrap() >= 2);
        let refreshed = flow.refresh(&refresh).await;
        assert_eq!(
            refreshed.status, 200,
            "the refresh token outlives the sweep"
        );
        // Past the grant's life and the replay memory: its refresh tokens and the grant go.
        flow.app.admin.clock().advance(32 * 86_400);
        assert!(flow.app.admin.sweep().await.unwrap() >= 3);
        let gone = flow
            .refresh(refreshed.body["refresh_token"].as_str().unwrap())
            .await;
        gone.assert_error(400, "invalid_grant");
    }
}

#[tokio::test]
async fn revoking_a_rotated_away_refresh_token_still_ends_the_grant() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let (_, tokens) = setup(&mut flow).await;
        let first = token(&tokens, "refresh_token");
        let rotated = flow.refresh(&first).await;
        let second = token(&rotated, "refresh_token");
        // The client suspects the old one leaked: revoking it ends the grant.
        assert_eq!(revoke(&flow.app, "spa", &first).await, 200);
        flow.refresh(&second)
            .await
            .assert_error(400, "invalid_grant");
    }
}
