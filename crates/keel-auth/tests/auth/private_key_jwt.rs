//! Client authentication with signed assertions (`private_key_jwt`, RFC 7523).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_auth::{AuthMethod, GrantType, NewClient};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::helpers::*;

/// A client's key pair and the JWK Set it registers.
struct ClientKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl ClientKey {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng).unwrap();
        Self { pair, rng }
    }

    fn jwks(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.pair.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

async fn with_assertion(app: &App, assertion: &str) -> Token {
    app.token(
        None,
        &[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
    )
    .await
}

#[tokio::test]
async fn a_signed_assertion_authenticates_once() {
    for store in stores().await {
        let app = spawn(&store).await;
        let key = ClientKey::new();
        app.admin
            .create_client(NewClient {
                jwks: Some(key.jwks()),
                ..new_client(
                    "signer",
                    AuthMethod::PrivateKeyJwt,
                    &[],
                    &[GrantType::ClientCredentials],
                    "reports:read",
                )
            })
            .await
            .unwrap();
        let now = app.admin.clock().now();
        let claims = |jti: &str, aud: &str, exp: i64| json!({"iss": "signer", "sub": "signer", "aud": aud, "exp": exp, "jti": jti});
        let token_endpoint = format!("{}/token", app.issuer());
        let issuer = app.issuer().to_owned();

        let first = key.sign(&claims("a-1", &issuer, now + 60));
        let token = with_assertion(&app, &first).await;
        assert_eq!(token.status, 200, "{}", token.body);
        assert_eq!(token.body["scope"], "reports:read");
        // The same assertion again: replayed.
        with_assertion(&app, &first)
            .await
            .assert_error(401, "invalid_client");

        let refused = [
            key.sign(&claims("a-2", "https://elsewhere.example/token", now + 60)),
            key.sign(&claims("a-3", &issuer, now - 120)),
            key.sign(&claims("a-4", &issuer, now + 3600)),
            // The token endpoint, or a list, is not this server's identifier.
            key.sign(&claims("a-8", &token_endpoint, now + 60)),
            key.sign(&json!({"iss": "signer", "sub": "signer", "aud": [issuer.as_str()], "exp": now + 60, "jti": "a-9"})),
            key.sign(&json!({"iss": "signer", "sub": "other", "aud": issuer, "exp": now + 60, "jti": "a-5"})),
            key.sign(&json!({"iss": "signer", "sub": "signer", "aud": issuer, "exp": now + 60})),
            ClientKey::new().sign(&claims("a-6", &issuer, now + 60)),
            "not.an.assertion".to_owned(),
        ];
        for assertion in refused {
            with_assertion(&app, &assertion)
                .await
                .assert_error(401, "invalid_client");
        }
        let again = key.sign(&claims("a-7", &issuer, now + 60));
        assert_eq!(
            with_assertion(&app, &again).await.status,
            200,
            "a new jti works"
        );
        let events = app.admin.audit_events(30).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.detail.as_deref().is_some_and(|d| d.contains("replayed")))
        );
    }
}

#[tokio::test]
async fn private_key_jwt_clients_register_public_keys_only() {
    let store = sqlite();
    let app = spawn(&store).await;
    let register = |jwks: Option<Value>| {
        app.admin.create_client(NewClient {
            jwks,
            ..new_client(
                "k",
                AuthMethod::PrivateKeyJwt,
                &[],
                &[GrantType::ClientCredentials],
                "",
            )
        })
    };
    assert!(register(None).await.is_err());
    assert!(register(Some(json!({"keys": []}))).await.is_err());
    let private =
        json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "secret"}]});
    assert!(register(Some(private)).await.is_err());
    // And a secret-based client may not carry keys.
    let mixed = app
        .admin
        .create_client(NewClient {
            jwks: Some(ClientKey::new().jwks()),
            ..new_client(
                "m",
                AuthMethod::ClientSecretBasic,
                &[],
                &[GrantType::ClientCredentials],
                "",
            )
        })
        .await;
    assert!(mixed.is_err());
}
