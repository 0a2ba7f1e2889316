//! What a token must be: claims, time, type, size, algorithm attacks, tampering.

use keel_jwt::testing::{AUDIENCE, MintOptions, TestKey};
use keel_jwt::{Algorithm, VerifyError};
use serde_json::json;

use super::*;

// === valid tokens ===

#[tokio::test]
async fn valid_rs256_token_gives_the_principal() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let token = issuer.mint(json!({
        "sub": "alice",
        "scope": "orders:read orders:write",
        "roles": ["admin", "support"],
        "tenant": "acme",
    }));

    let principal = verifier.verify(&token).await.unwrap();

    assert_eq!(principal.subject, "alice");
    assert_eq!(principal.issuer, issuer.issuer());
    assert_eq!(principal.audience, vec![AUDIENCE]);
    assert_eq!(principal.client_id.as_deref(), Some("test-client"));
    assert!(principal.token_id.as_deref().unwrap().starts_with("token-"));
    assert!(principal.has_all_scopes(&["orders:read", "orders:write"]));
    assert!(!principal.has_scope("payments:read"));
    assert!(principal.has_role("admin") && principal.has_role("support"));
    assert_eq!(principal.claims["tenant"], "acme");
    let exp = principal
        .expires_at
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(exp > now() + 200);
    // One discovery, one key fetch; the second token is served from the cache.
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(
        (issuer.metadata_fetch_count(), issuer.fetch_count()),
        (1, 1)
    );
}

#[tokio::test]
async fn valid_es256_and_eddsa_tokens() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    for key in [TestKey::Ec1, TestKey::Ed1] {
        let token = issuer.mint_with(
            MintOptions {
                key: Some(key),
                ..MintOptions::default()
            },
            json!({"sub": key.kid()}),
        );
        let principal = verifier.verify(&token).await.unwrap();
        assert_eq!(principal.subject, key.kid());
    }
}

#[tokio::test]
async fn audience_may_be_an_array() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let token = issuer.mint(json!({"aud": ["billing", AUDIENCE]}));
    let principal = verifier.verify(&token).await.unwrap();
    assert_eq!(principal.audience, vec!["billing", AUDIENCE]);

    let token = issuer.mint(json!({"aud": ["billing", "catalog"]}));
    assert_rejected!(verifier, token, VerifyError::WrongAudience);
}

#[tokio::test]
async fn any_configured_audience_matches() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier_with(&issuer, |c| {
        c.audiences = vec!["gateway".into(), "orders".into()]
    });
    verifier
        .verify(&issuer.mint(json!({"aud": "orders"})))
        .await
        .unwrap();
    assert_rejected!(verifier, issuer.mint(json!({})), VerifyError::WrongAudience);
}

// === time ===

#[tokio::test]
async fn expired_token_is_rejected() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let t = now();
    let token = issuer.mint(json!({"iat": t - 600, "exp": t - 31}));
    assert_rejected!(verifier, token, VerifyError::Expired);
}

#[tokio::test]
async fn not_yet_valid_token_is_rejected() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let t = now();
    assert_rejected!(
        verifier,
        issuer.mint(json!({"nbf": t + 120})),
        VerifyError::NotYetValid
    );
    // Issued in the future is as wrong as not valid yet.
    let token = issuer.mint(json!({"iat": t + 120, "exp": t + 600}));
    assert_rejected!(verifier, token, VerifyError::NotYetValid);
}

#[tokio::test]
async fn skew_within_the_leeway_is_accepted() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer); // 30 s
    let t = now();
    let token = issuer.mint(json!({"iat": t + 10, "nbf": t + 10, "exp": t - 10}));
    // Only possible within the leeway: exp 10 s ago and nbf 10 s ahead.
    verifier.verify(&token).await.unwrap();

    let strict = verifier_with(&issuer, |c| c.leeway = Duration::ZERO);
    assert_rejected!(strict, token, VerifyError::Expired);
}

#[tokio::test]
async fn the_clock_is_a_parameter() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let token = issuer.mint(json!({}));
    let later = SystemTime::now() + Duration::from_secs(3600);
    let error = verifier.verify_at(&token, later).await.unwrap_err();
    assert!(matches!(error, VerifyError::Expired), "{error:?}");
    let earlier = SystemTime::now() - Duration::from_secs(3600);
    let error = verifier.verify_at(&token, earlier).await.unwrap_err();
    assert!(matches!(error, VerifyError::NotYetValid), "{error:?}");
}

// === issuer, type, size ===

#[tokio::test]
async fn wrong_issuer_is_rejected() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let trailing_slash = format!("{}/", issuer.issuer());
    for iss in ["http://evil.example", trailing_slash.as_str()] {
        let token = issuer.mint(json!({"iss": iss}));
        assert_rejected!(verifier, token, VerifyError::WrongIssuer);
    }
}

#[tokio::test]
async fn typ_must_say_access_token() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let with_typ = |typ: Option<&str>| {
        issuer.mint_with(
            MintOptions {
                typ: Some(typ.map(str::to_owned)),
                ..MintOptions::default()
            },
            json!({}),
        )
    };
    verifier
        .verify(&with_typ(Some("application/at+jwt")))
        .await
        .unwrap();
    for typ in [Some("JWT"), None, Some("secevent+jwt")] {
        assert_rejected!(verifier, with_typ(typ), VerifyError::WrongType);
    }
    // Opting out (for issuers without RFC 9068) accepts JWT or nothing, still not others.
    let lenient = verifier_with(&issuer, |c| c.require_typ = false);
    lenient.verify(&with_typ(Some("JWT"))).await.unwrap();
    lenient.verify(&with_typ(None)).await.unwrap();
    assert_rejected!(
        lenient,
        with_typ(Some("logout+jwt")),
        VerifyError::WrongType
    );
}

#[tokio::test]
async fn oversized_token_is_rejected_before_anything_else() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let token = issuer.mint(json!({"padding": "x".repeat(9000)}));
    assert!(token.len() > 8 * 1024);
    let error = assert_rejected!(verifier, token, VerifyError::TooLarge { limit: 8192 });
    assert_eq!(error.description(), "The access token is too large");
    assert_eq!(
        issuer.fetch_count(),
        0,
        "no key fetch for a token refused on size"
    );
}

#[tokio::test]
async fn garbage_is_malformed_and_fetches_nothing() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    for garbage in [
        "",
        "Bearer x",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJSUzI1NiJ9.e30.x.y",
    ] {
        let error = verifier.verify(garbage).await.unwrap_err();
        assert!(
            matches!(error, VerifyError::Malformed(_)),
            "{garbage}: {error:?}"
        );
    }
    assert_eq!(issuer.fetch_count() + issuer.metadata_fetch_count(), 0);
}

// === algorithm attacks ===

#[tokio::test]
async fn alg_none_is_rejected() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let claims = valid_claims(&issuer);
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "typ": "at+jwt", "kid": "rsa-1"});
        assert_rejected!(
            verifier,
            hand_made(header.clone(), &claims, ""),
            VerifyError::UnsupportedAlgorithm
        );
        // Even with something in the signature slot.
        let signed = hand_made(header, &claims, "c2lnbmF0dXJl");
        assert_rejected!(verifier, signed, VerifyError::UnsupportedAlgorithm);
    }
    assert_eq!(issuer.fetch_count(), 0);
}

#[tokio::test]
async fn hs256_with_the_public_key_as_secret_is_rejected() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    verifier.refresh().await.unwrap();
    let claims = valid_claims(&issuer);
    let jwk_n = TestKey::Rsa1.jwk()["n"].as_str().unwrap().to_owned();
    let secrets: [&[u8]; 3] = [
        TestKey::Rsa1.public_pem().as_bytes(),
        TestKey::Rsa1.public_der(),
        jwk_n.as_bytes(),
    ];
    for secret in secrets {
        for alg in [
            jsonwebtoken::Algorithm::HS256,
            jsonwebtoken::Algorithm::HS384,
            jsonwebtoken::Algorithm::HS512,
        ] {
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = Some("rsa-1".into());
            header.typ = Some("at+jwt".into());
            let token = jsonwebtoken::encode(
                &header,
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret),
            )
            .unwrap();
            assert_rejected!(verifier, token, VerifyError::UnsupportedAlgorithm);
        }
    }
}

#[tokio::test]
async fn the_key_not_the_header_decides_the_algorithm() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    // Validly signed by rsa-1, but as PS256 while rsa-1 is published for RS256 only.
    let token = issuer.mint_with(
        MintOptions {
            key: Some(TestKey::Rsa1),
            alg: Some(Algorithm::PS256),
            ..MintOptions::default()
        },
        json!({}),
    );
    assert_rejected!(verifier, token, VerifyError::AlgorithmMismatch);
    // An EC signature presented under the RSA key's id, and the other way round.
    for (key, kid) in [
        (TestKey::Ec1, "rsa-1"),
        (TestKey::Rsa1, "ec-1"),
        (TestKey::Ed1, "ec-1"),
    ] {
        let token = issuer.mint_with(
            MintOptions {
                key: Some(key),
                kid: Some(Some(kid.into())),
                ..MintOptions::default()
            },
            json!({}),
        );
        assert_rejected!(verifier, token, VerifyError::AlgorithmMismatch);
    }
    // An algorithm left out of the allow-list is refused even for its own key.
    let rsa_only = verifier_with(&issuer, |c| c.allowed_algorithms = vec![Algorithm::RS256]);
    let es256 = issuer.mint_with(
        MintOptions {
            key: Some(TestKey::Ec1),
            ..MintOptions::default()
        },
        json!({}),
    );
    assert_rejected!(rsa_only, es256, VerifyError::UnsupportedAlgorithm);
}

// === tampering ===

#[tokio::test]
async fn tampered_tokens_are_rejected() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let token = issuer.mint(json!({"sub": "alice", "roles": ["user"]}));
    let other = issuer.mint(json!({"sub": "mallory", "roles": ["admin"]}));
    let parts: Vec<&str> = token.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();

    // Another (validly signed) payload under this signature.
    let swapped = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
    assert_rejected!(verifier, swapped, VerifyError::BadSignature);
    // A payload edited in place.
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["roles"] = json!(["admin"]);
    let edited = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    );
    assert_rejected!(verifier, edited, VerifyError::BadSignature);
    // A flipped signature byte, and a truncated signature.
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[10] ^= 1;
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(&signature)
    );
    assert_rejected!(verifier, flipped, VerifyError::BadSignature);
    let truncated = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]);
    assert_rejected!(verifier, truncated, VerifyError::BadSignature);
    // Signed by a key the issuer never published, under a published kid.
    let forged = issuer.mint_with(
        MintOptions {
            key: Some(TestKey::Rsa2),
            kid: Some(Some("rsa-1".into())),
            ..MintOptions::default()
        },
        json!({}),
    );
    assert_rejected!(verifier, forged, VerifyError::BadSignature);

    verifier.verify(&token).await.unwrap();
}

// === errors for the client ===

#[tokio::test]
async fn www_authenticate_for_a_rejected_token() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let t = now();
    let token = issuer.mint(json!({"exp": t - 60, "iat": t - 600}));
    let error = assert_rejected!(verifier, token, VerifyError::Expired);
    assert_eq!(
        error.www_authenticate(),
        r#"Bearer error="invalid_token", error_description="The access token expired""#
    );
    let header = format!("Bearer {token}");
    assert_eq!(keel_jwt::bearer_token(&header), Some(token.as_str()));
}

#[tokio::test]
async fn a_remembered_token_still_expires() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let t = now();
    let token = issuer.mint(json!({"iat": t, "exp": t + 60}));
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    verifier.verify_at(&token, at(t)).await.unwrap();
    // Remembered: verified again without the signature check…
    verifier.verify_at(&token, at(t + 10)).await.unwrap();
    // …but never past exp + leeway (30 s).
    let expired = verifier.verify_at(&token, at(t + 91)).await;
    assert!(matches!(expired, Err(VerifyError::Expired)), "{expired:?}");
}

#[tokio::test]
async fn a_remembered_token_outlives_its_withdrawn_key_only_with_the_cache_on() {
    let issuer = TestIssuer::start().await;
    let token = issuer.mint(json!({}));
    for (cache_size, still_accepted) in [(4096, true), (0, false)] {
        let verifier = verifier_with(&issuer, |c| {
            c.cache_size = cache_size;
            c.min_refresh_interval = Duration::ZERO;
        });
        issuer.publish(&[keel_jwt::testing::TestKey::Rsa1]);
        verifier.verify(&token).await.unwrap();
        // The issuer withdraws the key; the next fetch no longer has it.
        issuer.publish(&[keel_jwt::testing::TestKey::Rsa2]);
        verifier.refresh().await.unwrap();
        assert_eq!(
            verifier.verify(&token).await.is_ok(),
            still_accepted,
            "cache_size {cache_size}"
        );
    }
}

#[tokio::test]
async fn authorization_header_values() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let token = issuer.mint(json!({"sub": "alice"}));
    // No bearer token: nothing to verify, and no error code to give (RFC 6750 §3.1).
    for value in ["", "Basic abc", "Bearer", "Bearer ", "Bearerabc"] {
        let found = verifier.verify_authorization(value.as_bytes()).await;
        assert!(matches!(found, Ok(None)), "{value:?}: {found:?}");
    }
    // A space inside is no bearer token, before and after the token is remembered.
    let spaced = format!("Bearer {token} x");
    assert!(matches!(
        verifier.verify_authorization(spaced.as_bytes()).await,
        Ok(None)
    ));
    for value in [format!("Bearer {token}"), format!("bearer   {token}")] {
        let principal = verifier.verify_authorization(value.as_bytes()).await;
        assert_eq!(principal.unwrap().unwrap().subject, "alice", "{value:?}");
    }
    assert!(matches!(
        verifier.verify_authorization(spaced.as_bytes()).await,
        Ok(None)
    ));
    // Remembered: the same principal again, found by the token's bytes.
    let first = verifier.verify(&token).await.unwrap();
    let again = verifier
        .verify_authorization(format!("Bearer {token}").as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    // Once remembered, the token under another scheme, or after a tab, is still no bearer
    // token.
    for value in [
        format!("Basic {token}"),
        format!("Bearer\t{token}"),
        format!("Bearertoken{token}"),
        format!("Bearer {token} "),
    ] {
        let found = verifier.verify_authorization(value.as_bytes()).await;
        assert!(matches!(found, Ok(None)), "{value:.20}: {found:?}");
    }
    // Not UTF-8, or tampered: refused as before.
    let mut bytes = format!("Bearer {token}").into_bytes();
    *bytes.last_mut().unwrap() = 0xff;
    assert!(matches!(
        verifier.verify_authorization(&bytes).await,
        Ok(None)
    ));
    let mut tampered = format!("Bearer {token}").into_bytes();
    let at = tampered.len() - 10;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let refused = verifier.verify_authorization(tampered.as_bytes()).await;
    assert!(refused.is_err(), "{refused:?}");
}
