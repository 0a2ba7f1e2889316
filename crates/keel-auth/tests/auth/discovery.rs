use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn both_metadata_documents_say_what_is_supported() {
    for store in stores().await {
        let app = spawn(&store).await;
        let oidc = app.get_json("/.well-known/openid-configuration").await;
        let oauth = app
            .get_json("/.well-known/oauth-authorization-server")
            .await;
        assert_eq!(oidc, oauth);
        assert_eq!(oidc["issuer"], app.issuer());
        assert_eq!(oidc["token_endpoint"], format!("{}/token", app.issuer()));
        assert_eq!(oidc["jwks_uri"], format!("{}/jwks.json", app.issuer()));
        assert_eq!(
            oidc["authorization_endpoint"],
            format!("{}/authorize", app.issuer())
        );
        assert_eq!(
            oidc["grant_types_supported"],
            serde_json::json!([
                "authorization_code",
                "client_credentials",
                "refresh_token",
                "urn:ietf:params:oauth:grant-type:device_code"
            ])
        );
        assert_eq!(
            oidc["response_types_supported"],
            serde_json::json!(["code"])
        );
        assert_eq!(
            oidc["code_challenge_methods_supported"],
            serde_json::json!(["S256"])
        );
        assert_eq!(
            oidc["token_endpoint_auth_methods_supported"],
            serde_json::json!([
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
                "none"
            ])
        );
    }
}

#[tokio::test]
async fn the_key_set_publishes_one_public_key_per_algorithm() {
    for store in stores().await {
        let app = spawn(&store).await;
        let response = app.http.get(app.url("/jwks.json")).send().await.unwrap();
        assert!(
            response.headers()["cache-control"]
                .to_str()
                .unwrap()
                .contains("max-age")
        );
        let jwks: Value = response.json().await.unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        let mut algs: Vec<&str> = keys.iter().map(|k| k["alg"].as_str().unwrap()).collect();
        algs.sort_unstable();
        assert_eq!(algs, ["ES256", "EdDSA", "RS256"]);
        for key in keys {
            assert_eq!(key["use"], "sig");
            assert!(key["kid"].as_str().is_some_and(|kid| !kid.is_empty()));
            // No private member of any key type.
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                assert!(key.get(private).is_none(), "{private} published");
            }
        }
    }
}
