//! Where keys come from: discovery, caching, rotation, rate limits, outages.

use keel_jwt::VerifyError;
use keel_jwt::testing::{MintOptions, TestKey};
use keel_testkit::tls::TestCa;
use serde_json::json;

use super::*;

// === key ids ===

#[tokio::test]
async fn kid_less_tokens_only_with_a_single_key() {
    let no_kid = MintOptions {
        kid: Some(None),
        ..MintOptions::default()
    };
    let single = TestIssuer::start_with_keys(&[TestKey::Ec1]).await;
    let verifier = verifier(&single);
    verifier
        .verify(&single.mint_with(no_kid.clone(), json!({})))
        .await
        .unwrap();

    let several = TestIssuer::start().await;
    let verifier = verifier_with(&several, |c| c.min_refresh_interval = Duration::ZERO);
    verifier.verify(&several.mint(json!({}))).await.unwrap();
    assert_rejected!(
        verifier,
        several.mint_with(no_kid, json!({})),
        VerifyError::UnknownKey
    );
    assert_eq!(
        several.fetch_count(),
        1,
        "a missing kid is not worth a refresh"
    );
}

#[tokio::test]
async fn rotation_a_new_kid_triggers_exactly_one_refresh() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier_with(&issuer, |c| c.min_refresh_interval = Duration::ZERO);
    let old = issuer.mint(json!({}));
    verifier.verify(&old).await.unwrap();
    assert_eq!(issuer.fetch_count(), 1);

    assert_eq!(issuer.rotate(), TestKey::Rsa2);
    let new = issuer.mint(json!({}));
    verifier.verify(&new).await.unwrap();
    assert_eq!(issuer.fetch_count(), 2);

    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    verifier.verify(&old).await.unwrap();
    assert_eq!(issuer.fetch_count(), 2, "both keys are cached now");
}

#[tokio::test]
async fn an_unknown_kid_stays_unknown_after_the_refresh() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier_with(&issuer, |c| c.min_refresh_interval = Duration::ZERO);
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    // Signed by rsa-2, which is not published.
    let token = issuer.mint_with(
        MintOptions {
            key: Some(TestKey::Rsa2),
            ..MintOptions::default()
        },
        json!({}),
    );
    assert_rejected!(verifier, token, VerifyError::UnknownKey);
    assert_eq!(issuer.fetch_count(), 2);
}

/// A token naming a key nobody published. Hand-made, since signing it would only cost time
/// (RSA signing is slow in debug builds): the verifier gives up at the `kid`.
fn unknown_kid_token(issuer: &TestIssuer, n: usize) -> String {
    let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": format!("attacker-{n}")});
    hand_made(header, &valid_claims(issuer), "c2lnbmF0dXJl")
}

#[tokio::test]
async fn concurrent_unknown_kids_share_one_fetch() {
    let issuer = TestIssuer::start().await;
    // No rate limit at all: only single flight keeps this to one fetch.
    let verifier = verifier_with(&issuer, |c| c.min_refresh_interval = Duration::ZERO);
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(issuer.fetch_count(), 1);

    let tokens: Vec<String> = (0..50).map(|n| unknown_kid_token(&issuer, n)).collect();
    let results =
        futures_util::future::join_all(tokens.iter().map(|token| verifier.verify(token))).await;
    for result in results {
        assert!(matches!(result, Err(VerifyError::UnknownKey)), "{result:?}");
    }
    assert_eq!(issuer.fetch_count(), 2);
}

#[tokio::test]
async fn an_unknown_kid_flood_fetches_at_most_once_per_min_refresh_interval() {
    let issuer = TestIssuer::start().await;
    let interval = Duration::from_millis(400);
    let verifier = verifier_with(&issuer, |c| c.min_refresh_interval = interval);
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(issuer.fetch_count(), 1);

    // Right after a fetch: none at all.
    for n in 0..20 {
        assert_rejected!(
            verifier,
            unknown_kid_token(&issuer, n),
            VerifyError::UnknownKey
        );
    }
    assert_eq!(issuer.fetch_count(), 1);

    // Once the interval has passed: one, then none again.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    for n in 0..20 {
        assert_rejected!(
            verifier,
            unknown_kid_token(&issuer, n),
            VerifyError::UnknownKey
        );
    }
    assert_eq!(issuer.fetch_count(), 2);
    // Valid tokens were never affected.
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(issuer.fetch_count(), 2);
}

// === discovery ===

#[tokio::test]
async fn metadata_naming_another_issuer_is_not_trusted() {
    let issuer = TestIssuer::start().await;
    issuer.advertise_issuer("http://evil.example");
    let verifier = verifier(&issuer);
    let error = assert_rejected!(
        verifier,
        issuer.mint(json!({})),
        VerifyError::KeysUnavailable(_)
    );
    assert!(error.to_string().contains("http://evil.example"), "{error}");
    assert!(error.is_unavailable());
    assert_eq!(
        issuer.fetch_count(),
        0,
        "keys from untrusted metadata are never fetched"
    );
}

#[tokio::test]
async fn rfc8414_metadata_when_openid_configuration_is_404() {
    let issuer = TestIssuer::start().await;
    issuer.serve_openid_configuration(false);
    let verifier = verifier(&issuer);
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(issuer.metadata_fetch_count(), 2);
}

#[tokio::test]
async fn metadata_errors_other_than_404_do_not_fall_back() {
    let issuer = TestIssuer::start().await;
    issuer.set_available(false);
    let verifier = verifier(&issuer);
    let error = assert_rejected!(
        verifier,
        issuer.mint(json!({})),
        VerifyError::KeysUnavailable(_)
    );
    assert!(error.to_string().contains("503"), "{error}");
    assert_eq!(issuer.metadata_fetch_count(), 1);
}

#[tokio::test]
async fn a_configured_jwks_uri_skips_discovery() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier_with(&issuer, |c| c.jwks_uri = Some(issuer.jwks_uri()));
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(
        (issuer.metadata_fetch_count(), issuer.fetch_count()),
        (0, 1)
    );
}

// === caching and outages ===

#[tokio::test]
async fn concurrent_first_use_shares_one_fetch() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    let tokens: Vec<String> = (0..20).map(|_| issuer.mint(json!({}))).collect();
    let results =
        futures_util::future::join_all(tokens.iter().map(|token| verifier.verify(token))).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        (issuer.metadata_fetch_count(), issuer.fetch_count()),
        (1, 1)
    );
}

#[tokio::test]
async fn issuer_down_at_first_use_is_keys_unavailable() {
    let mut issuer = TestIssuer::start().await;
    let token = issuer.mint(json!({}));
    issuer.stop().await;
    let verifier = verifier(&issuer);
    let error = assert_rejected!(verifier, token, VerifyError::KeysUnavailable(_));
    assert!(error.is_unavailable());
    assert_eq!(
        error.description(),
        "The token signing keys are unavailable, try again later"
    );
    // Also through the explicit warm-up.
    assert!(matches!(
        verifier.refresh().await,
        Err(VerifyError::KeysUnavailable(_))
    ));
}

#[tokio::test]
async fn first_use_failures_are_retried_after_a_short_backoff() {
    let issuer = TestIssuer::start().await;
    issuer.set_available(false);
    let verifier = verifier_with(&issuer, |c| {
        c.min_refresh_interval = Duration::from_millis(200)
    });
    let token = issuer.mint(json!({}));
    assert_rejected!(verifier, token, VerifyError::KeysUnavailable(_));
    issuer.set_available(true);
    // Within the backoff the last failure is repeated without asking again.
    assert_rejected!(verifier, token, VerifyError::KeysUnavailable(_));
    assert_eq!(issuer.metadata_fetch_count(), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    verifier.verify(&token).await.unwrap();
}

#[tokio::test]
async fn issuer_down_after_caching_keeps_verifying() {
    let mut issuer = TestIssuer::start().await;
    let verifier = verifier_with(&issuer, |c| {
        c.refresh_interval = Duration::from_millis(100);
        c.min_refresh_interval = Duration::from_millis(50);
    });
    let tokens: Vec<String> = (0..3).map(|_| issuer.mint(json!({}))).collect();
    verifier.verify(&tokens[0]).await.unwrap();
    issuer.stop().await;

    // The keys are stale: each of these starts a background refresh that fails.
    for token in &tokens {
        tokio::time::sleep(Duration::from_millis(150)).await;
        verifier.verify(token).await.unwrap();
    }
    // An unknown kid now gets a failed refresh, and is unknown, not "unavailable".
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_rejected!(
        verifier,
        unknown_kid_token(&issuer, 0),
        VerifyError::UnknownKey
    );
    verifier.verify(&tokens[0]).await.unwrap();
}

#[tokio::test]
async fn stale_keys_are_refreshed_in_the_background() {
    let issuer = TestIssuer::start().await;
    // A configured jwks_uri makes every refresh attempt one counted JWKS request.
    let verifier = verifier_with(&issuer, |c| {
        c.jwks_uri = Some(issuer.jwks_uri());
        c.refresh_interval = Duration::from_millis(200);
        c.min_refresh_interval = Duration::ZERO;
    });
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Served from the stale cache without waiting; the refresh runs behind it (and fails).
    issuer.set_available(false);
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    eventually("a background fetch", || issuer.fetch_count() == 2).await;
    // The failure left the keys stale, so a later request tries again, and succeeds. (The
    // failed refresh may still hold the refresh lock for a moment; then nothing starts.)
    issuer.set_available(true);
    issuer.rotate();
    let old_key = MintOptions {
        key: Some(TestKey::Rsa1),
        ..MintOptions::default()
    };
    let old_token = issuer.mint_with(old_key, json!({}));
    for _ in 0..500 {
        verifier.verify(&old_token).await.unwrap();
        if issuer.fetch_count() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(issuer.fetch_count(), 3);
    // That refresh brought rsa-2 without any unknown-kid fetch.
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(issuer.fetch_count(), 3);
}

#[tokio::test]
async fn a_key_set_without_usable_keys_does_not_replace_the_cache() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier_with(&issuer, |c| c.min_refresh_interval = Duration::ZERO);
    let token = issuer.mint(json!({}));
    verifier.verify(&token).await.unwrap();
    issuer.publish(&[]);
    let error = verifier.refresh().await.unwrap_err();
    assert!(error.to_string().contains("no usable"), "{error}");
    verifier.verify(&token).await.unwrap();
}

#[tokio::test]
async fn refresh_warms_the_cache() {
    let issuer = TestIssuer::start().await;
    let verifier = verifier(&issuer);
    verifier.refresh().await.unwrap();
    assert_eq!(issuer.fetch_count(), 1);
    verifier.verify(&issuer.mint(json!({}))).await.unwrap();
    assert_eq!(issuer.fetch_count(), 1);
}

/// An `https` issuer: metadata and keys come over TLS, checked against the system's roots
/// and the CAs the process was told to trust; an issuer whose certificate no trusted CA
/// signed gives no keys (no request gets past the handshake).
#[tokio::test]
async fn an_https_issuer_is_reached_when_its_ca_is_trusted_and_only_then() {
    let ca = TestCa::new();
    let issuer = TestIssuer::start_https(&ca).await;
    let stranger = TestIssuer::start_https(&TestCa::new()).await;
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();
    assert!(issuer.issuer().starts_with("https://localhost:"));

    let token = issuer.mint(json!({}));
    verifier(&issuer).verify(&token).await.unwrap();
    assert_eq!(
        (issuer.metadata_fetch_count(), issuer.fetch_count()),
        (1, 1)
    );

    let token = stranger.mint(json!({}));
    let error = assert_rejected!(verifier(&stranger), token, VerifyError::KeysUnavailable(_));
    assert!(error.is_unavailable());
    assert_eq!(
        (stranger.metadata_fetch_count(), stranger.fetch_count()),
        (0, 0)
    );
}
