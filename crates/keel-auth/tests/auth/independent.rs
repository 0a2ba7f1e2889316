//! The server driven by independent client implementations, the `openidconnect` and
//! `oauth2` crates: discovery, the code flow with PKCE, ID token verification against the
//! published keys, refresh, and client credentials.

use keel_auth::AuthMethod;
use oauth2::basic::BasicClient;
use oauth2::{ClientSecret, TokenUrl};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AccessTokenHash, AuthorizationCode, ClientId, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, RedirectUrl, Scope, TokenResponse,
};

use crate::authorization_code::{REDIRECT, flow};
use crate::helpers::*;

/// The crates' HTTP client, over the workspace's reqwest.
async fn http(request: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, reqwest::Error> {
    let client = keel_runtime::http_client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let (parts, body) = request.into_parts();
    let response = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await?;
    let mut answer = oauth2::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        answer = answer.header(name, value);
    }
    let body = response.bytes().await?.to_vec();
    Ok(answer
        .body(body)
        .expect("a response rebuilt from a valid one"))
}

#[tokio::test]
async fn an_openid_connect_client_discovers_signs_in_verifies_and_refreshes() {
    for store in stores().await {
        let mut flow = flow(&store).await;
        let issuer = IssuerUrl::new(flow.app.issuer().to_owned()).unwrap();
        let metadata = CoreProviderMetadata::discover_async(issuer, &http)
            .await
            .expect("discovery and key set");
        let client =
            CoreClient::from_provider_metadata(metadata, ClientId::new("spa".into()), None)
                .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap());

        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, csrf, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        let path = url
            .as_str()
            .strip_prefix(flow.app.issuer())
            .unwrap()
            .to_owned();
        let redirect = flow.sign_in_and_allow(&path).await;
        let params = redirect.redirect_params();
        assert_eq!(&params["state"], csrf.secret());

        let tokens = client
            .exchange_code(AuthorizationCode::new(params["code"].clone()))
            .unwrap()
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await
            .expect("code exchange");
        let id_token = tokens.id_token().expect("an ID token");
        let verifier = client.id_token_verifier();
        let claims = id_token
            .claims(&verifier, &nonce)
            .expect("signature, issuer, audience, expiry and nonce verify");
        assert_eq!(claims.subject().as_str(), flow.user_id);
        assert_eq!(
            claims.preferred_username().map(|u| u.as_str()),
            Some("alice")
        );
        let at_hash = AccessTokenHash::from_token(
            tokens.access_token(),
            id_token.signing_alg().unwrap(),
            id_token.signing_key(&verifier).unwrap(),
        )
        .unwrap();
        assert_eq!(claims.access_token_hash(), Some(&at_hash));
        // Another nonce is refused.
        assert!(
            id_token
                .claims(&verifier, &Nonce::new("other".into()))
                .is_err()
        );

        let refreshed = client
            .exchange_refresh_token(tokens.refresh_token().expect("a refresh token"))
            .unwrap()
            .request_async(&http)
            .await
            .expect("refresh");
        assert_ne!(
            refreshed.refresh_token().unwrap().secret(),
            tokens.refresh_token().unwrap().secret(),
            "rotated"
        );
        // The used one is refused once the grace window has passed.
        flow.app.admin.clock().advance(11);
        assert!(
            client
                .exchange_refresh_token(tokens.refresh_token().unwrap())
                .unwrap()
                .request_async(&http)
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn an_oauth2_client_gets_client_credentials_tokens() {
    for store in stores().await {
        let app = spawn(&store).await;
        let (id, secret) = app
            .service_client(
                AuthMethod::ClientSecretBasic,
                "orders:read orders:write",
                None,
            )
            .await;
        let client = BasicClient::new(oauth2::ClientId::new(id.clone()))
            .set_client_secret(ClientSecret::new(secret))
            .set_token_uri(TokenUrl::new(format!("{}/token", app.issuer())).unwrap());
        let token = client
            .exchange_client_credentials()
            .add_scope(oauth2::Scope::new("orders:read".into()))
            .request_async(&http)
            .await
            .expect("client credentials");
        let scopes: Vec<&str> = token.scopes().unwrap().iter().map(|s| s.as_str()).collect();
        assert_eq!(scopes, ["orders:read"]);
        let verifier =
            keel_jwt::Verifier::new(keel_jwt::VerifierConfig::new(app.issuer(), ["keel-api"]))
                .unwrap();
        let principal = verifier
            .verify(token.access_token().secret())
            .await
            .unwrap();
        assert_eq!(principal.subject, id);

        // A wrong secret is an error the crate reads as the RFC's invalid_client.
        let wrong = BasicClient::new(oauth2::ClientId::new(id))
            .set_client_secret(ClientSecret::new("wrong".into()))
            .set_token_uri(TokenUrl::new(format!("{}/token", app.issuer())).unwrap());
        match wrong
            .exchange_client_credentials()
            .request_async(&http)
            .await
        {
            Err(oauth2::RequestTokenError::ServerResponse(response)) => {
                assert_eq!(
                    response.error(),
                    &oauth2::basic::BasicErrorResponseType::InvalidClient
                );
            }
            other => panic!("expected invalid_client, got {other:?}"),
        }
    }
}
