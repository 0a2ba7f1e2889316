//! The verifier against a real issuer over HTTP on 127.0.0.1:0 (`keel_jwt::testing`).
//! `checks`: what a token must be (claims, time, type, size, algorithm attacks, tampering).
//! `keys`: where keys come from (discovery, caching, rotation, rate limits, outages).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_jwt::testing::TestIssuer;
use keel_jwt::{Verifier, VerifierConfig};
use serde_json::Value;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn verifier(issuer: &TestIssuer) -> Verifier {
    Verifier::new(issuer.config()).unwrap()
}

fn verifier_with(issuer: &TestIssuer, change: impl FnOnce(&mut VerifierConfig)) -> Verifier {
    let mut config = issuer.config();
    change(&mut config);
    Verifier::new(config).unwrap()
}

/// Asserts that verification fails with the given variant, and that the error, as logged
/// and as sent to the client, does not contain any part of the token.
macro_rules! assert_rejected {
    ($verifier:expr, $token:expr, $pattern:pat) => {{
        let token: &str = &$token;
        let result = $verifier.verify(token).await;
        let error = match result {
            Err(error) => error,
            Ok(principal) => panic!("accepted: {principal:?}"),
        };
        assert!(matches!(error, $pattern), "got {error:?}");
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(!error.to_string().contains(part), "{error} leaks the token");
            assert!(!error.www_authenticate().contains(part));
        }
        error
    }};
}

/// `header.payload.signature` from JSON parts, for tokens no library would sign.
fn hand_made(header: Value, claims: &Value, signature: &str) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}.{signature}", part(&header), part(claims))
}

fn valid_claims(issuer: &TestIssuer) -> Value {
    Value::Object(issuer.claims())
}

/// Polls until `condition` holds, for background work; fails after 5 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

mod checks;
mod keys;
